//! The deployment files agree with the router they deploy: the Kubernetes manifests
//! parse, the router Deployment's arguments are accepted by the router's own command
//! line, its probes and Service use the port it listens on, the RBAC grants exactly what
//! `--discover-k8s` does (list and watch EndpointSlices), the vLLM Services carry the
//! labels its selector and role label read, and the image runs as the user the pod
//! security context requires.

use std::path::Path;

use clap::Parser;
use llm_router::config::Cli;
use serde_json::Value;

fn manifests(file: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s").join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_saphyr::from_multiple::<Value>(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn arg<'a>(args: &'a [String], flag: &str) -> &'a str {
    args.iter().find_map(|a| a.strip_prefix(&format!("{flag}="))).unwrap_or_else(|| panic!("no {flag}"))
}

#[test]
fn the_router_deployment_runs_a_command_line_the_router_accepts() {
    let docs = manifests("router.yaml");
    let deployment = find(&docs, "Deployment", "llm-router");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<String> =
        container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect();
    let cli = Cli::try_parse_from(std::iter::once("router".to_owned()).chain(args.iter().cloned()))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let config = cli.into_config().unwrap();
    assert!(config.discovery.k8s.is_some() && config.pd.is_some());

    let port: u16 = arg(&args, "--port").parse().unwrap();
    assert_eq!(container["ports"][0]["containerPort"], port);
    assert_eq!(container["ports"][0]["name"], "http");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/health");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "http");
    let service = find(&docs, "Service", "llm-router");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    assert_eq!(service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"]);
    let monitor = find(&docs, "ServiceMonitor", "llm-router");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"]);

    // The grace period outlasts the shutdown delay and the drain, so in-flight streams
    // finish.
    let drain = humantime::parse_duration(arg(&args, "--drain-timeout")).unwrap();
    let delay = humantime::parse_duration(arg(&args, "--shutdown-delay")).unwrap();
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() > (drain + delay).as_secs());

    // Several instances, kept by a disruption budget and scaled on a router metric the
    // router exports.
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 3);
    let budget = find(&docs, "PodDisruptionBudget", "llm-router");
    assert_eq!(budget["spec"]["selector"]["matchLabels"], deployment["spec"]["selector"]["matchLabels"]);
    assert!(
        budget["spec"]["minAvailable"].as_u64().unwrap() < deployment["spec"]["replicas"].as_u64().unwrap()
    );
    let hpa = find(&docs, "HorizontalPodAutoscaler", "llm-router");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "llm-router");
    assert!(hpa["spec"]["minReplicas"].as_u64().unwrap() >= 3);
    let metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"].as_str().unwrap();
    let running = llm_router::metrics::Metrics::new().render();
    assert!(
        running.contains(&format!("\n{metric} ")),
        "the HPA scales on {metric}, which the router exports"
    );
    // The store's URL comes from an optional Secret, as the environment variable the
    // router reads.
    let env = &container["env"][0];
    assert_eq!(env["name"], "ROUTER_STATE_STORE");
    assert_eq!(env["valueFrom"]["secretKeyRef"]["optional"], true);

    // The image's user is the one the pod requires.
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).unwrap();
    let user = dockerfile.lines().rev().find_map(|l| l.strip_prefix("USER ")).unwrap();
    assert_eq!(user.split(':').next().unwrap(), pod["securityContext"]["runAsUser"].to_string());
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
}

#[test]
fn rbac_grants_the_endpointslice_watch_discovery_needs() {
    let docs = manifests("rbac.yaml");
    let role = find(&docs, "Role", "llm-router-discovery");
    let rule = &role["rules"][0];
    assert_eq!(rule["apiGroups"][0], "discovery.k8s.io");
    assert_eq!(rule["resources"][0], "endpointslices");
    let verbs: Vec<&str> = rule["verbs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(verbs.contains(&"list") && verbs.contains(&"watch"), "{verbs:?}");
    let binding = find(&docs, "RoleBinding", "llm-router-discovery");
    let account = &binding["subjects"][0]["name"];
    find(&docs, "ServiceAccount", account.as_str().unwrap());
    let router = manifests("router.yaml");
    let pod = &find(&router, "Deployment", "llm-router")["spec"]["template"]["spec"];
    assert_eq!(&pod["serviceAccountName"], account);
}

#[test]
fn the_vllm_services_carry_the_labels_discovery_reads() {
    let router = manifests("router.yaml");
    let args: Vec<String> =
        find(&router, "Deployment", "llm-router")["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect();
    let (key, value) = arg(&args, "--k8s-selector").split_once('=').unwrap();
    let role_label = Cli::parse_from(["router", "--sim", "1"]).discovery.k8s_role_label;
    let services = manifests("vllm-services.yaml");
    let mut roles = Vec::new();
    for service in &services {
        assert_eq!(service["metadata"]["labels"][key], value, "{}", service["metadata"]["name"]);
        roles.push(service["metadata"]["labels"][&role_label].as_str().unwrap().to_owned());
        assert_eq!(service["spec"]["ports"][0]["name"], arg(&args, "--k8s-port"));
    }
    roles.sort();
    assert_eq!(roles, ["decode", "prefill"]);
}
