//! The command line's unit tests: every flag group parsed, every bad value refused in
//! one line naming it.

use super::*;

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("router").chain(args.iter().copied()))
}

#[test]
fn replicas_accept_lists_commas_and_repeats() {
    let cli =
        parse(&["--replicas", "http://a:1", "http://b:2,http://c:3", "--replicas", "http://d:4"]).unwrap();
    let names: Vec<_> = cli.fleet.replicas.iter().map(|r| r.name().to_owned()).collect();
    assert_eq!(names, ["http://a:1", "http://b:2", "http://c:3", "http://d:4"]);
    assert_eq!(cli.policy.policy, PolicyKind::PowerOfTwo);
}

#[test]
fn sim_replaces_replicas_and_checks_its_profile() {
    let config = parse(&["--sim", "3"]).unwrap().into_config().unwrap();
    assert_eq!(config.sim_replicas, 3);
    assert!(config.replicas.is_empty());
    let err = parse(&["--sim", "2", "--sim-profile", "gpt-5"]).unwrap().into_config().unwrap_err();
    assert!(err.contains("gpt-5"), "{err}");
}

#[test]
fn pd_sides_and_sim_pd() {
    let config = parse(&[
        "--pd",
        "prefill=http://p:1,http://p:2",
        "decode=http://d:1",
        "--decode-policy",
        "least-loaded",
    ])
    .unwrap()
    .into_config()
    .unwrap();
    let pd = config.pd.unwrap();
    assert_eq!(pd.prefill.len(), 2);
    assert_eq!(config.replicas.len(), 1);
    assert_eq!(config.policy, PolicyKind::LeastLoaded);
    assert!(pd.tokenize_once);
    let err = parse(&["--pd", "prefill=http://p:1", "middle=http://d:1"]).unwrap_err();
    assert!(one_line_error(&err).contains("middle"));
    let config = parse(&["--sim-pd", "1:2", "--no-tokenize-once"]).unwrap().into_config().unwrap();
    assert_eq!((config.pd.as_ref().unwrap().sim_prefill, config.sim_replicas), (1, 2));
    assert!(!config.pd.unwrap().tokenize_once);
    assert!(parse(&["--sim-pd", "0:1"]).is_err());
    assert!(parse(&["--pd", "prefill=http://p:1", "decode=http://d:1", "--replicas", "http://r:1"]).is_err());
}

#[test]
fn discovery_flags() {
    let config = parse(&[
        "--replicas-file",
        "/etc/router/replicas",
        "--discover-dns",
        "vllm.serving.svc:8000",
        "--discover-dns-prefill",
        "vllm-prefill.serving.svc:8000",
        "--discovery-interval",
        "2s",
    ])
    .unwrap()
    .into_config()
    .unwrap();
    assert!(config.discovery.is_on() && config.pd.is_some(), "a prefill name means P/D mode");
    assert_eq!(config.discovery.dns.len(), 2);
    assert_eq!(config.discovery.interval, Duration::from_secs(2));
    let err = parse(&["--pd-discovered", "--replicas", "http://a:1"]).unwrap().into_config().unwrap_err();
    assert!(err.contains("--pd-discovered needs"), "{err}");
    let err = parse(&["--discover-dns", "vllm"]).unwrap().into_config().unwrap_err();
    assert!(err.contains("`vllm` is not NAME:PORT"), "{err}");
    assert!(parse(&["--discover-k8s"]).is_err(), "--discover-k8s needs a selector");
    let config = parse(&["--discover-k8s", "--k8s-selector", "app=vllm", "--k8s-port", "http"])
        .unwrap()
        .into_config()
        .unwrap();
    let k8s = config.discovery.k8s.unwrap();
    assert_eq!((k8s.selector.as_str(), k8s.role_label.as_str()), ("app=vllm", "llm-router/role"));
    assert!(config.pd.is_none());
}

#[test]
fn duplicates_are_dropped() {
    let config = parse(&["--replicas", "http://a:1,http://a:1/"]).unwrap().into_config().unwrap();
    assert_eq!(config.replicas.len(), 1);
}

#[test]
fn bad_values_give_one_line_naming_them() {
    let err = parse(&["--replicas", "http://a:1", "--policy", "fastest"]).unwrap_err();
    let line = one_line_error(&err);
    assert!(line.contains("fastest") && line.contains("consistent-hash"), "{line}");
    let err = parse(&["--replicas", "ftp://a:1"]).unwrap_err();
    let line = one_line_error(&err);
    assert!(line.contains("ftp://a:1"), "{line}");
    let err = parse(&["--replicas", "http://a:1", "--hash-balance-factor", "0.5"]).unwrap_err();
    assert!(one_line_error(&err).contains("0.5"));
}

#[test]
fn hash_options_and_headers() {
    let config = parse(&[
        "--replicas",
        "http://a:1",
        "--policy",
        "consistent-hash",
        "--hash-balance-factor",
        "1.25",
        "--session-header",
        "x-correlation-id",
        "--session-header",
        "x-session-id",
    ])
    .unwrap()
    .into_config()
    .unwrap();
    assert_eq!(config.hash.balance_factor, Some(1.25));
    assert_eq!(config.session_headers, ["x-correlation-id", "x-session-id"]);
}

#[test]
fn prefix_options() {
    let config = parse(&[
        "--replicas",
        "http://a:1",
        "--policy",
        "prefix-aware",
        "--prefix-block-bytes",
        "512",
        "--prefix-min-match",
        "0.5",
        "--prefix-index-ttl",
        "90s",
    ])
    .unwrap()
    .into_config()
    .unwrap();
    assert_eq!(config.policy, PolicyKind::PrefixAware);
    assert_eq!(config.prefix.block_bytes, 512);
    assert_eq!(config.prefix.min_match, 0.5);
    assert_eq!(config.prefix.balance_abs, 4);
    assert_eq!(config.index.ttl, Duration::from_secs(90));
    for bad in [["--prefix-min-match", "1.5"], ["--prefix-balance-rel", "0.5"], ["--prefix-block-bytes", "8"]]
    {
        let err = parse(&["--replicas", "http://a:1", bad[0], bad[1]]).unwrap_err();
        assert!(one_line_error(&err).contains(bad[1]), "{}", one_line_error(&err));
    }
}

#[test]
fn generate_mode_needs_a_tokenizer_for_real_engines() {
    let config = parse(&["--replicas", "http://a:1"]).unwrap().into_config().unwrap();
    assert_eq!(config.engine_api, crate::frontend::EngineApi::Openai);
    assert!(config.tokenizer.is_none(), "openai mode loads no tokenizer");
    let err =
        parse(&["--replicas", "http://a:1", "--engine-api", "generate"]).unwrap().into_config().unwrap_err();
    assert!(err.contains("--engine-api generate needs --tokenizer"), "{err}");
    // Simulated engines: the built-in tokenizer.
    let config = parse(&["--sim", "2", "--engine-api", "generate"]).unwrap().into_config().unwrap();
    assert_eq!(config.engine_api, crate::frontend::EngineApi::Generate);
    assert!(config.tokenizer.is_some());
    let config = parse(&["--replicas", "http://a:1", "--engine-api", "generate", "--tokenizer", "builtin"])
        .unwrap()
        .into_config()
        .unwrap();
    assert!(config.sampling_defaults.0.is_empty());
    assert!(parse(&["--engine-api", "grpc"]).is_err());
    // A tokenizer that is not there: refused at start.
    let err =
        parse(&["--replicas", "http://a:1", "--engine-api", "generate", "--tokenizer", "/nonexistent/model"])
            .unwrap()
            .into_config()
            .unwrap_err();
    assert!(err.contains("cannot load tokenizer"), "{err}");
}

#[test]
fn a_state_store_is_a_redis_url_and_its_settings_need_it() {
    let config =
        parse(&["--sim", "2", "--state-store", "redis://:pw@store:6380/3", "--router-instances", "3"])
            .unwrap()
            .into_config()
            .unwrap();
    let store = config.state_store.unwrap();
    assert_eq!((store.target.address.as_str(), store.target.database, store.instances), ("store:6380", 3, 3));
    assert_eq!(store.timeout, Duration::from_millis(100));
    assert!(parse(&["--sim", "2"]).unwrap().into_config().unwrap().state_store.is_none());
    assert!(parse(&["--sim", "2", "--state-store", "redis://s", "--router-instances", "0"]).is_err());
    let err = parse(&["--sim", "2", "--state-store", "rediss://s"]).unwrap().into_config().unwrap_err();
    assert!(err.contains("rediss://"), "{err}");
}
