//! The monitoring that ships in `deploy/`: the Prometheus rules pass `promtool check
//! rules` and their unit tests (`promtool test rules`); every metric the rules and the
//! Grafana dashboard name exists on a real router's (and a simulated engine's)
//! `/metrics`; and a real Prometheus scrapes a router, evaluates the rules and answers
//! `router_` series through its query API.
//!
//! Prometheus and promtool come from Debian's `prometheus` package. Without them the
//! tests that need them are skipped, unless `REQUIRE_PROMETHEUS=1` (as in CI).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Parser;
use llm_router::config::{Cli, PdConfig, RouterConfig};
use llm_router::policy::PolicyKind;
use llm_router::replicas::ReplicaUrl;
use llm_router::server::RunningRouter;
use serde_json::{Value, json};
use vllm_sim::{self as sim, Role, RunningSim, SimConfig};

const MODEL: &str = "Qwen/Qwen3-0.6B-FP8";

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path)
}

/// A Prometheus tool's path, or None (skip) when it is not installed and not required.
fn tool(name: &str) -> Option<PathBuf> {
    let found = ["/usr/bin", "/usr/local/bin"].iter().map(|d| Path::new(d).join(name)).find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("REQUIRE_PROMETHEUS").is_none(),
            "{name} is not installed (bash .ci/packages.sh installs it)"
        );
        eprintln!("skipped: {name} is not installed (bash .ci/packages.sh installs it)");
    }
    found
}

#[test]
fn the_rules_pass_promtool_and_their_unit_tests() {
    let Some(promtool) = tool("promtool") else { return };
    for args in [["check", "rules", "router-rules.yml"], ["test", "rules", "router-rules.test.yml"]] {
        let out = Command::new(&promtool).args(args).current_dir(deploy("prometheus")).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Metric names (`router_*`, `vllm:*`) a PromQL text names; a histogram's
/// `_bucket`/`_sum`/`_count` series name their family.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    for word in text.split(|c: char| !is_name(c)) {
        if word.starts_with("router_") || word.starts_with("vllm:") {
            let family =
                ["_bucket", "_sum", "_count"].iter().find_map(|s| word.strip_suffix(s)).unwrap_or(word);
            names.insert(family.to_owned());
        }
    }
    names
}

/// Every PromQL expression in the dashboard.
fn dashboard_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// The metric families a `/metrics` text exposes.
fn families(text: &str) -> BTreeSet<String> {
    text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next().map(str::to_owned)).collect()
}

async fn sims(n: usize, role: Role) -> Vec<RunningSim> {
    sim::start_fleet(n, &SimConfig { role, time_scale: 20.0, ..SimConfig::default() }).await.unwrap()
}

fn urls(sims: &[RunningSim]) -> Vec<ReplicaUrl> {
    sims.iter().map(|s| ReplicaUrl::parse(&s.url()).unwrap()).collect()
}

async fn chat(router: &RunningRouter, session: usize) {
    let body = json!({"model": MODEL, "stream": true, "max_tokens": 8, "user": format!("s{session}"),
        "messages": [{"role": "user", "content": format!("conversation {session}: tell me about routers")}]});
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", router.addr))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let _ = response.bytes().await.unwrap();
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_rules_name_exists() {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/llm-router.json")).unwrap()).unwrap();
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() > 20, "the dashboard has its queries");
    let mut named = metric_names(&exprs.join("\n"));
    named.extend(metric_names(&std::fs::read_to_string(deploy("prometheus/router-rules.yml")).unwrap()));

    // A P/D router whose second "prefill" replica runs no KV connector (so fallbacks
    // happen), and a kv-aware router (token-aware routing counters).
    let mut prefill = sims(1, Role::Prefill).await;
    prefill.extend(sims(1, Role::Decode).await);
    let decode = sims(1, Role::Decode).await;
    let mut config = RouterConfig::new(urls(&decode));
    config.pd = Some(PdConfig {
        prefill: urls(&prefill),
        prefill_policy: PolicyKind::RoundRobin,
        decode_policy: PolicyKind::RoundRobin,
        tokenize_once: true,
        sim_prefill: 0,
    });
    let pd = llm_router::server::start(config).await.unwrap();
    let cli = Cli::parse_from([
        "router",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--sim",
        "2",
        "--policy",
        "kv-aware",
    ]);
    let kv = llm_router::server::start(cli.into_config().unwrap()).await.unwrap();
    for session in 0..4 {
        chat(&pd, session).await;
        chat(&kv, session).await;
    }
    // The state store's series exist on a router that names one (here, one that is
    // not there).
    let store = Cli::parse_from([
        "router",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--sim",
        "1",
        "--state-store",
        "redis://127.0.0.1:1",
    ]);
    let store = llm_router::server::start(store.into_config().unwrap()).await.unwrap();
    let mut exposed = families(&pd.metrics.render());
    exposed.extend(families(&kv.metrics.render()));
    exposed.extend(families(&store.metrics.render()));
    exposed.extend(families(&decode[0].metrics().render()));
    let missing: Vec<&String> = named.iter().filter(|n| !exposed.contains(*n)).collect();
    assert!(missing.is_empty(), "named by the dashboard or the rules but not exposed: {missing:?}");
    assert!(named.len() > 20 && named.iter().any(|n| n.starts_with("vllm:")), "{named:?}");
    pd.shutdown().await;
    kv.shutdown().await;
    store.shutdown().await;
}

/// Prometheus' guidance: a series an alert or a rate reads exists at 0 from the start,
/// not from the first event it counts. Routers in every mode, scraped before any request.
#[tokio::test]
async fn every_router_metric_the_dashboard_and_the_rules_name_exists_before_traffic() {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/llm-router.json")).unwrap()).unwrap();
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    let mut named = metric_names(&exprs.join("\n"));
    named.extend(metric_names(&std::fs::read_to_string(deploy("prometheus/router-rules.yml")).unwrap()));
    named.retain(|n| n.starts_with("router_"));

    let start = |args: &[&str]| {
        let mut all = vec!["router", "--host", "127.0.0.1", "--port", "0"];
        all.extend_from_slice(args);
        llm_router::server::start(Cli::parse_from(all).into_config().unwrap())
    };
    let hash = start(&["--sim", "2", "--policy", "consistent-hash"]).await.unwrap();
    let pd = start(&["--sim-pd", "1:1"]).await.unwrap();
    let kv = start(&["--sim", "2", "--policy", "kv-aware"]).await.unwrap();
    let store = start(&["--sim", "1", "--state-store", "redis://127.0.0.1:1"]).await.unwrap();
    let texts = [hash.metrics.render(), pd.metrics.render(), kv.metrics.render(), store.metrics.render()];
    let exposed: BTreeSet<String> = texts.iter().flat_map(|t| families(t)).collect();
    let missing: Vec<&String> = named.iter().filter(|n| !exposed.contains(*n)).collect();
    assert!(missing.is_empty(), "named by the dashboard or the rules but absent before traffic: {missing:?}");

    // Labelled series at 0 for every label known at start.
    let series = |text: &str, name: &str, labels: &[(&str, &str)]| {
        text.lines().any(|l| {
            l.starts_with(name)
                && l.as_bytes().get(name.len()) == Some(&b'{')
                && labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
                && l.ends_with(" 0")
        })
    };
    let replica = hash.registry.fleet().replicas[0].name().to_owned();
    let r = replica.as_str();
    for (name, labels) in [
        ("router_requests_total", vec![("endpoint", "chat_completions"), ("replica", r), ("status", "200")]),
        (
            "router_routing_decisions_total",
            vec![("policy", "consistent-hash"), ("replica", r), ("reason", "affinity")],
        ),
        (
            "router_routing_decisions_total",
            vec![("policy", "consistent-hash"), ("replica", r), ("reason", "spill")],
        ),
        ("router_upstream_errors_total", vec![("replica", r), ("kind", "mid_body")]),
        ("router_ejections_total", vec![("replica", r), ("result", "ejected")]),
        ("router_retries_total", vec![("endpoint", "completions")]),
        ("router_time_to_first_event_seconds_count", vec![("endpoint", "chat_completions")]),
        ("router_stripped_fields_total", vec![("field", "kv_transfer_params")]),
    ] {
        assert!(series(&texts[0], name, &labels), "no {name}{labels:?} at 0 before traffic");
    }
    let prefill = pd.prefill_registry.as_ref().unwrap().fleet().replicas[0].name().to_owned();
    let decode = pd.registry.fleet().replicas[0].name().to_owned();
    for (name, labels) in [
        (
            "router_pd_fallbacks_total",
            vec![("prefill", prefill.as_str()), ("reason", "no_kv_transfer_params")],
        ),
        ("router_pd_decisions_total", vec![("prefill", prefill.as_str()), ("decode", decode.as_str())]),
        ("router_pd_tokenize_once_total", vec![("mode", "on")]),
        ("router_pd_phase_seconds_count", vec![("phase", "decode_ttft")]),
    ] {
        assert!(series(&texts[1], name, &labels), "no {name}{labels:?} at 0 before traffic");
    }
    let held = kv.registry.fleet().replicas[0].name().to_owned();
    for (name, labels) in [
        ("router_routed_prompt_tokens_total", vec![("policy", "kv-aware")]),
        ("router_routed_cached_tokens_total", vec![("policy", "kv-aware")]),
        ("router_kv_feed_errors_total", vec![("replica", held.as_str()), ("kind", "oversize")]),
        ("router_kv_index_resets_total", vec![("replica", held.as_str()), ("reason", "gap")]),
        ("router_kv_event_batches_total", vec![("replica", held.as_str()), ("outcome", "dropped")]),
    ] {
        assert!(series(&texts[2], name, &labels), "no {name}{labels:?} at 0 before traffic");
    }
    hash.shutdown().await;
    pd.shutdown().await;
    kv.shutdown().await;
}

/// A Prometheus server on a free loopback port, scraping `target` every second with
/// the shipped rules, its data in a temporary directory.
struct Prometheus {
    child: std::process::Child,
    dir: PathBuf,
    url: String,
}

impl Prometheus {
    fn start(binary: &Path, target: &str) -> Prometheus {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("llm-router-prometheus-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: llm-router\n    static_configs:\n      - targets: [\"{target}\"]\n",
            rules = deploy("prometheus/router-rules.yml").display()
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Prometheus { child, dir, url: format!("http://127.0.0.1:{port}") }
    }

    /// The result vector of an instant query (empty on any error: not up yet).
    async fn query(&self, query: &str) -> Vec<Value> {
        let response = reqwest::Client::new()
            .post(format!("{}/api/v1/query", self.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("query={}", form_encode(query)))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        let Ok(response) = response else { return Vec::new() };
        let bytes = response.bytes().await.unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or_default();
        body["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Poll a query every 250 ms for up to 30 s until it returns a series.
    async fn eventually(&self, query: &str) -> Vec<Value> {
        for _ in 0..120 {
            let result = self.query(query).await;
            if !result.is_empty() {
                return result;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("Prometheus never answered {query} with a series");
    }
}

/// `application/x-www-form-urlencoded` escaping of a query.
fn form_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_router_and_evaluates_the_rules() {
    let Some(binary) = tool("prometheus") else { return };
    let cli = Cli::parse_from(["router", "--host", "127.0.0.1", "--port", "0", "--sim", "2"]);
    let router = llm_router::server::start(cli.into_config().unwrap()).await.unwrap();
    for session in 0..3 {
        chat(&router, session).await;
    }
    let prometheus = Prometheus::start(&binary, &router.addr.to_string());
    let instance = router.addr.to_string();

    let requests =
        prometheus.eventually(r#"router_requests_total{endpoint="chat_completions",status="200"}"#).await;
    let total: f64 = requests.iter().map(|s| s["value"][1].as_str().unwrap().parse::<f64>().unwrap()).sum();
    assert_eq!(total, 3.0, "{requests:?}");
    assert!(requests.iter().all(|s| s["metric"]["instance"] == instance.as_str()));
    let healthy = prometheus.eventually("router_replica_healthy").await;
    assert_eq!(healthy.len(), 2, "one series per replica: {healthy:?}");
    // The shipped recording rules run in a real Prometheus.
    let recorded = prometheus.eventually("instance:router_replicas_healthy:sum").await;
    assert_eq!(recorded[0]["value"][1], "2");
    assert_eq!(recorded[0]["metric"]["instance"], instance.as_str());
    let alerts = prometheus.query("ALERTS").await;
    assert!(alerts.is_empty(), "a healthy router raises no alert: {alerts:?}");
    router.shutdown().await;
}
