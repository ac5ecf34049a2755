//! Discovery against real sources on 127.0.0.1: a watched replicas file, a real DNS
//! server (dnsmasq) whose answers change, and a stand-in Kubernetes API that speaks
//! the list/watch protocol. In each, a replica that appears joins rotation and one that
//! disappears leaves it, while clients send requests the whole time: none may fail.

#[path = "support/kube_api.rs"]
mod kube_api;
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use llm_router::config::RouterConfig;
use llm_router::discovery::Role;
use llm_router::discovery::dns::DnsTarget;
use llm_router::discovery::k8s::K8sConfig;
use llm_router::server::RunningRouter;
use serde_json::json;
use support::{MockReplica, base, client, eventually, post};
use tokio::task::JoinSet;

/// Clients sending streaming requests back to back until stopped (or a bound is hit),
/// recording every answer.
struct Load {
    stop: Arc<AtomicBool>,
    clients: JoinSet<Vec<(u16, Option<String>, bool)>>,
}

impl Load {
    fn start(router: &RunningRouter, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let url = format!("{}/v1/chat/completions", base(router));
        let mut set = JoinSet::new();
        for _ in 0..clients {
            let (stop, url) = (stop.clone(), url.clone());
            set.spawn(async move {
                let client = client();
                let body =
                    json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true});
                let mut seen = Vec::new();
                for _ in 0..20_000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let (status, replica, bytes) = post(&client, &url, &body, &[]).await;
                    let text = String::from_utf8_lossy(&bytes);
                    let whole = text.ends_with("data: [DONE]\n\n") && !text.contains("\"error\"");
                    seen.push((status, replica, whole));
                }
                seen
            });
        }
        Load { stop, clients: set }
    }

    /// Stop and check: every request answered 200 with a whole stream. Returns how many
    /// each replica served.
    async fn finish(self) -> std::collections::BTreeMap<String, usize> {
        self.stop.store(true, Ordering::SeqCst);
        let mut served = std::collections::BTreeMap::new();
        let mut total = 0;
        for seen in self.clients.join_all().await {
            for (status, replica, whole) in seen {
                total += 1;
                assert!(
                    status == 200 && whole,
                    "a request failed during the change: {status} from {replica:?}"
                );
                *served.entry(replica.unwrap_or_default()).or_insert(0) += 1;
            }
        }
        assert!(total > 0);
        served
    }
}

fn names(router: &RunningRouter) -> Vec<String> {
    let mut names: Vec<String> = router.registry.replicas().iter().map(|r| r.name().to_owned()).collect();
    names.sort();
    names
}

fn in_rotation(router: &RunningRouter, name: &str) -> bool {
    router.registry.replicas().iter().any(|r| r.name() == name && r.is_healthy())
}

/// A config with no replicas of its own and fast health checks.
fn discovering(configure: impl FnOnce(&mut RouterConfig)) -> RouterConfig {
    let mut config = support::config(&[]);
    config.discovery.interval = Duration::from_millis(100);
    configure(&mut config);
    config
}

/// Replace a file atomically (write beside it, rename over it), as a deploy tool does.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn temp_path(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    std::env::temp_dir().join(format!("llm-router-{name}-{}-{nanos}", std::process::id()))
}

/// Join, leave with streams in flight, and a crash after leaving, under load: the
/// common part of every source.
/// `set(&[...])` makes the source show exactly those mocks.
async fn join_then_leave<F, Fut>(router: &RunningRouter, a: &MockReplica, b: &MockReplica, mut set: F)
where
    F: FnMut(Vec<String>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    eventually("the first replica in rotation", || in_rotation(router, &a.url())).await;
    assert_eq!(names(router), [a.url()]);
    let load = Load::start(router, 4);
    tokio::time::sleep(Duration::from_millis(200)).await;

    set(vec![a.url(), b.url()]).await;
    eventually("the new replica in rotation", || in_rotation(router, &b.url())).await;
    eventually("the new replica serving", || b.request_count() > 0).await;

    // Streams in flight on the replica that leaves: they finish after it left.
    a.set_mode(support::Mode::Hold);
    let leaving = router.registry.find(&a.url()).unwrap();
    let arrived = a.request_count();
    eventually("streams held on the leaving replica", || a.request_count() > arrived + 1).await;
    set(vec![b.url()]).await;
    eventually("the old replica out of the set", || names(router) == [b.url()]).await;
    assert!(leaving.in_flight() > 0, "still streaming after it left");
    a.release();
    eventually("its streams finished", || leaving.in_flight() == 0).await;
    assert_eq!(a.cancelled(), 0, "no stream on it was cut");
    let before = a.request_count();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.request_count(), before, "no request after it left");
    // Gone from discovery, then gone for real: the clients do not notice.
    a.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let served = load.finish().await;
    assert!(served.contains_key("r0") && served.contains_key("r1"), "{served:?}");
}

#[tokio::test]
async fn a_watched_file_adds_and_removes_replicas_and_ignores_a_bad_edit() {
    let a = MockReplica::start("r0", &["m"]).await;
    let b = MockReplica::start("r1", &["m"]).await;
    let path = temp_path("replicas");
    write_atomically(&path, &format!("# the fleet\n{}\n", a.url()));
    let router = support::router(discovering(|c| c.discovery.file = Some(path.clone()))).await;

    // A bad edit keeps the last good set; so do a file caught empty (between a
    // truncate and a write) and one caught half-written (its last line unfinished).
    write_atomically(&path, &format!("{}\nthis is not a url\n", b.url()));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(names(&router), [a.url()], "a bad file changes nothing");
    std::fs::write(&path, "").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(names(&router), [a.url()], "an empty file is not an empty fleet");
    let cut = format!("{}\n{}", a.url(), b.url());
    std::fs::write(&path, &cut[..cut.len() - 2]).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(names(&router), [a.url()], "a half-written line is not a replica");
    // `none` empties the fleet on purpose.
    write_atomically(&path, "none\n");
    eventually("an empty fleet when the file says so", || names(&router).is_empty()).await;
    write_atomically(&path, &format!("{}\n", a.url()));

    let p = path.clone();
    join_then_leave(&router, &a, &b, move |urls| {
        write_atomically(&p, &format!("{}\n", urls.join("\n")));
        async {}
    })
    .await;
    router.shutdown().await;
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn the_router_refuses_to_start_on_a_missing_or_bad_file() {
    let path = temp_path("missing");
    let error = llm_router::server::start(discovering(|c| c.discovery.file = Some(path.clone())))
        .await
        .err()
        .expect("a missing file is an error at start");
    assert!(error.to_string().contains("--replicas-file"), "{error}");
    std::fs::write(&path, "prefill http://127.0.0.1:1\n").unwrap();
    let error = llm_router::server::start(discovering(|c| c.discovery.file = Some(path.clone())))
        .await
        .err()
        .expect("a prefill replica outside P/D mode is an error");
    assert!(error.to_string().contains("P/D"), "{error}");
    let _ = std::fs::remove_file(&path);
}

/// dnsmasq answering for `vllm.test` from a hosts file it re-reads on SIGHUP.
struct Dnsmasq {
    child: std::process::Child,
    hosts: PathBuf,
    addr: SocketAddr,
}

impl Dnsmasq {
    /// Start answering `vllm.test` with `ips`; returns once it answers.
    async fn start(ips: &[&str]) -> Option<Dnsmasq> {
        let binary = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"].into_iter().find(|p| Path::new(p).exists());
        let Some(binary) = binary else {
            assert!(
                std::env::var_os("REQUIRE_DNSMASQ").is_none(),
                "dnsmasq is not installed (bash .ci/packages.sh installs it)"
            );
            eprintln!("skipped: dnsmasq is not installed (bash .ci/packages.sh installs it)");
            return None;
        };
        let hosts = temp_path("hosts");
        // The port is free for UDP when picked, but dnsmasq binds TCP on it too, and
        // another test may hold that TCP port: then dnsmasq exits, and a new port is tried.
        for _attempt in 0..5 {
            // (Written each time: a failed attempt's drop removes it.)
            std::fs::write(&hosts, hosts_file(ips)).unwrap();
            let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let child = std::process::Command::new(binary)
                .args([
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                ])
                .args(["--listen-address=127.0.0.1", "--pid-file=", "--local-ttl=0", "--log-facility=-"])
                .arg(format!("--port={port}"))
                .arg(format!("--addn-hosts={}", hosts.display()))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let mut dns =
                Dnsmasq { child, hosts: hosts.clone(), addr: SocketAddr::from(([127, 0, 0, 1], port)) };
            // Until it has installed its SIGHUP handler a reload would kill it: wait for an answer.
            let resolver = llm_router::discovery::dns::resolver(Some(dns.addr)).unwrap();
            for _ in 0..100 {
                if dns.child.try_wait().unwrap().is_some() {
                    break; // it could not bind: another port
                }
                let lookup =
                    tokio::time::timeout(Duration::from_millis(200), resolver.lookup_ip("vllm.test"));
                if let Ok(Ok(_)) = lookup.await {
                    return Some(dns);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("dnsmasq did not answer");
    }

    /// Answer `vllm.test` with these addresses from now on.
    fn answer(&self, ips: &[&str]) {
        write_atomically(&self.hosts, &hosts_file(ips));
        let status =
            std::process::Command::new("kill").args(["-HUP", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }
}

fn hosts_file(ips: &[&str]) -> String {
    ips.iter().map(|ip| format!("{ip} vllm.test\n")).collect()
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.hosts);
    }
}

/// Two mocks on one port at 127.0.0.2 and 127.0.0.3, as pods behind a headless service.
async fn two_addresses() -> (Arc<MockReplica>, Arc<MockReplica>) {
    let a = MockReplica::start_on("r0", &["m"], "127.0.0.2:0".parse().unwrap()).await;
    let b = MockReplica::start_on("r1", &["m"], SocketAddr::from(([127, 0, 0, 3], a.addr.port()))).await;
    (a, b)
}

#[tokio::test]
async fn a_dns_name_adds_and_removes_replicas_as_its_answer_changes() {
    let Some(dns) = Dnsmasq::start(&["127.0.0.2"]).await else { return };
    let (a, b) = two_addresses().await;
    let target = DnsTarget::parse(Role::Main, &format!("vllm.test:{}", a.addr.port())).unwrap();
    let router = support::router(discovering(|c| {
        c.discovery.dns = vec![target];
        c.discovery.dns_server = Some(dns.addr);
    }))
    .await;
    let dns = &dns;
    join_then_leave(&router, &a, &b, move |urls| {
        let ips: Vec<String> = urls
            .iter()
            .map(|u| u.trim_start_matches("http://").rsplit_once(':').unwrap().0.to_owned())
            .collect();
        dns.answer(&ips.iter().map(String::as_str).collect::<Vec<_>>());
        async {}
    })
    .await;

    // The name stops resolving: the last set stays.
    dns.answer(&[]);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(names(&router), [b.url()], "a failed lookup keeps the last set");
    router.shutdown().await;
}

#[tokio::test]
async fn kubernetes_endpointslices_add_and_remove_replicas_and_a_broken_watch_resyncs() {
    let api = kube_api::KubeApi::start().await;
    let (a, b) = two_addresses().await;
    let port = a.addr.port();
    let labels = json!({"app": "vllm", "kubernetes.io/service-name": "vllm"});
    api.apply(kube_api::slice(
        "vllm-abc",
        labels.clone(),
        port,
        &[("127.0.0.2", true), ("127.0.0.3", false)],
    ));
    // Another app's slice in the namespace: not selected.
    api.apply(kube_api::slice("other-xyz", json!({"app": "other"}), port, &[("127.0.0.4", true)]));
    let router = support::router(discovering(|c| {
        c.discovery.k8s = Some(K8sConfig {
            api_server: Some(api.url().parse().unwrap()),
            namespace: Some("serving".into()),
            selector: "app=vllm".into(),
            port: None,
            role_label: "llm-router/role".into(),
        });
    }))
    .await;
    assert_eq!(names(&router), [a.url()], "ready endpoints of the selected slice only");

    let api_ref = &api;
    let labels_ref = &labels;
    join_then_leave(&router, &a, &b, move |urls| {
        let endpoints: Vec<(&str, bool)> =
            [("127.0.0.2", urls.contains(&a_url(port))), ("127.0.0.3", urls.contains(&b_url(port)))].to_vec();
        api_ref.apply(kube_api::slice("vllm-abc", labels_ref.clone(), port, &endpoints));
        async {}
    })
    .await;

    // The watch breaks (410 Gone) while the slice changes behind it: the router lists
    // again and follows. Here the slice is deleted behind the watch's back.
    let lists = api.state.lists.load(Ordering::SeqCst);
    a.restart().await;
    api.expire(kube_api::slice(
        "vllm-abc",
        labels.clone(),
        port,
        &[("127.0.0.2", true), ("127.0.0.3", true)],
    ));
    eventually("a new list after the watch broke", || api.state.lists.load(Ordering::SeqCst) > lists).await;
    eventually("the change made behind the watch is seen", || in_rotation(&router, &a.url())).await;
    api.delete("vllm-abc");
    eventually("a deleted slice's replicas leave", || names(&router).is_empty()).await;
    router.shutdown().await;
}

fn a_url(port: u16) -> String {
    format!("http://127.0.0.2:{port}")
}

fn b_url(port: u16) -> String {
    format!("http://127.0.0.3:{port}")
}

#[tokio::test]
async fn a_replicas_file_with_roles_runs_prefill_decode_with_nothing_on_the_command_line() {
    use vllm_sim::{self as sim, SimConfig};
    let sim = |role| SimConfig { role, time_scale: 20.0, ..SimConfig::default() };
    let prefill = sim::start_fleet(1, &sim(sim::Role::Prefill)).await.unwrap();
    let decode = sim::start_fleet(2, &sim(sim::Role::Decode)).await.unwrap();
    let path = temp_path("pd-replicas");
    let file = |decodes: &[&sim::RunningSim]| {
        let mut text = format!("prefill {}\n", prefill[0].url());
        for d in decodes {
            text.push_str(&format!("decode {}\n", d.url()));
        }
        text
    };
    write_atomically(&path, &file(&[&decode[0]]));
    let cli = <llm_router::config::Cli as clap::Parser>::parse_from([
        "router",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--pd-discovered",
        "--decode-policy",
        "round-robin",
        "--replicas-file",
        path.to_str().unwrap(),
        "--discovery-interval",
        "100ms",
        "--health-interval",
        "100ms",
    ]);
    let router = llm_router::server::start(cli.into_config().unwrap()).await.unwrap();
    let prefill_registry = router.prefill_registry.clone().expect("P/D mode");
    assert_eq!(prefill_registry.replicas().len(), 1);
    assert_eq!(names(&router), [decode[0].url()]);

    let url = format!("{}/v1/chat/completions", base(&router));
    let body = json!({"model": "Qwen/Qwen3-0.6B-FP8", "stream": true, "max_tokens": 4,
        "messages": [{"role": "user", "content": "hello"}]});
    let (status, _, bytes) = post(&client(), &url, &body, &[]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));

    write_atomically(&path, &file(&[&decode[0], &decode[1]]));
    eventually("the second decode replica in rotation", || in_rotation(&router, &decode[1].url())).await;
    for _ in 0..6 {
        let (status, _, _) = post(&client(), &url, &body, &[]).await;
        assert_eq!(status, 200);
    }
    let text = router.metrics.render();
    for d in &decode {
        let series =
            format!(r#"router_pd_decisions_total{{decode="{}",prefill="{}"}}"#, d.url(), prefill[0].url());
        assert!(support::metric(&text, &series) > 0.0, "{series} in\n{text}");
    }
    router.shutdown().await;
    let _ = std::fs::remove_file(&path);
}
