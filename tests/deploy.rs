//! `deploy/` must not ship broken: every YAML and JSON file parses, every
//! Tollgate config under it passes the real binary's `check-config`, and the
//! pieces agree with each other (the compose file with its config and the
//! Prometheus targets, the Kubernetes probes with the ConfigMap's admin port)
//! and with the metric names Tollgate exports (docs/METRICS.md).
//!
//! Nothing here needs a database or a container runtime: `check-config` only
//! parses and validates, and the rest reads files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

mod common;
use common::EXPORTED_METRICS;

/// The exported histograms: their series are `_bucket`, `_sum` and `_count`.
const HISTOGRAMS: [&str; 4] = [
    "tollgate_request_duration_seconds",
    "tollgate_upstream_duration_seconds",
    "tollgate_usage_flush_duration_seconds",
    "tollgate_usage_batch_rows",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy() -> PathBuf {
    repo().join("deploy")
}

/// `path` relative to the repository, for messages.
fn shown(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", shown(path)))
}

/// Every file under `dir`, recursively, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", shown(&dir))) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn has_extension(path: &Path, extensions: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| extensions.contains(&e))
}

fn parse_yaml(path: &Path) -> Result<Vec<Yaml>, String> {
    let docs = YamlLoader::load_from_str(&read(path)).map_err(|e| e.to_string())?;
    if docs.is_empty() {
        return Err("no YAML document".to_owned());
    }
    Ok(docs)
}

fn load_yaml(path: &Path) -> Vec<Yaml> {
    parse_yaml(path).unwrap_or_else(|e| panic!("{}: {e}", shown(path)))
}

fn load_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", shown(path)))
}

/// A YAML scalar as text (compose and Kubernetes accept numbers and booleans
/// where they mean strings).
fn scalar(value: &Yaml) -> Option<String> {
    match value {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn string(value: &Yaml, what: &str) -> String {
    scalar(value).unwrap_or_else(|| panic!("{what}: expected a string, found {value:?}"))
}

fn list<'a>(value: &'a Yaml, what: &str) -> &'a [Yaml] {
    value
        .as_vec()
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("{what}: expected a list, found {value:?}"))
}

/// The `${VAR}` names in one string (`$${` is a literal `${`).
fn string_vars(text: &str, vars: &mut BTreeSet<String>) {
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$${") {
            rest = after;
        } else if let Some(body) = tail.strip_prefix("${") {
            let end = body.find('}').expect("unterminated ${ in a config");
            vars.insert(body[..end].to_owned());
            rest = &body[end + 1..];
        } else {
            rest = &tail[1..];
        }
    }
}

/// The `${VAR}` names a Tollgate config interpolates: as the gateway does,
/// only in string values (not in keys or comments).
fn config_vars(text: &str) -> BTreeSet<String> {
    fn walk(value: &toml::Value, vars: &mut BTreeSet<String>) {
        match value {
            toml::Value::String(s) => string_vars(s, vars),
            toml::Value::Array(items) => items.iter().for_each(|item| walk(item, vars)),
            toml::Value::Table(table) => table.values().for_each(|item| walk(item, vars)),
            _ => {}
        }
    }
    let config: toml::Value = toml::from_str(text).unwrap_or_else(|e| panic!("{e}"));
    let mut vars = BTreeSet::new();
    walk(&config, &mut vars);
    vars
}

/// `value` with each `${VAR}` replaced from `env` (unknown names kept).
fn substitute(value: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = value.to_owned();
    for (name, replacement) in env {
        out = out.replace(&format!("${{{name}}}"), replacement);
    }
    out
}

fn toml_str<'a>(config: &'a toml::Value, path: &[&str]) -> Option<&'a str> {
    let mut value = config;
    for key in path {
        value = value.get(key)?;
    }
    value.as_str()
}

/// The port of an `IP:port` listen address.
fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("{addr:?} has no port"))
}

/// Whether `path` is `dir` or below it.
fn is_under(path: &str, dir: &str) -> bool {
    Path::new(path).starts_with(dir)
}

// ---------------------------------------------------------------------------
// Every file parses.

#[test]
fn every_yaml_and_json_file_under_deploy_parses() {
    let mut errors = Vec::new();
    let (mut yaml, mut json) = (0, 0);
    for path in files_under(&deploy()) {
        if has_extension(&path, &["yaml", "yml"]) {
            yaml += 1;
            match parse_yaml(&path) {
                Ok(docs) => {
                    for (i, doc) in docs.iter().enumerate() {
                        if doc.as_hash().is_none() {
                            errors.push(format!(
                                "{}: document {i} is not a mapping: {doc:?}",
                                shown(&path)
                            ));
                        }
                    }
                }
                Err(e) => errors.push(format!("{}: {e}", shown(&path))),
            }
        } else if has_extension(&path, &["json"]) {
            json += 1;
            if let Err(e) = serde_json::from_str::<serde_json::Value>(&read(&path)) {
                errors.push(format!("{}: {e}", shown(&path)));
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    // compose, prometheus, 2 grafana provisioning files, 5 Kubernetes files.
    assert!(yaml >= 9, "only {yaml} YAML files found under deploy/");
    assert!(json >= 1, "no JSON file found under deploy/");
}

// ---------------------------------------------------------------------------
// Every Tollgate config passes `check-config`.

/// A value for a variable a deploy config interpolates that validation
/// accepts where it is used.
fn dummy_value(name: &str) -> String {
    if name.ends_with("DATABASE_URL") {
        "postgres://tollgate:dummy@localhost:5432/tollgate".to_owned()
    } else {
        format!("dummy-{}", name.to_ascii_lowercase())
    }
}

/// Every Tollgate config under deploy/: `*.toml` files, and the `*.toml`
/// entries of Kubernetes ConfigMaps (written to `scratch`).
fn tollgate_configs(scratch: &Path) -> Vec<(String, PathBuf)> {
    let mut configs = Vec::new();
    for path in files_under(&deploy()) {
        if has_extension(&path, &["toml"]) {
            configs.push((shown(&path), path));
        } else if has_extension(&path, &["yaml", "yml"]) {
            for doc in load_yaml(&path) {
                if doc["kind"].as_str() != Some("ConfigMap") {
                    continue;
                }
                let Some(data) = doc["data"].as_hash() else {
                    continue;
                };
                for (key, value) in data {
                    let key = string(key, "ConfigMap data key");
                    if !key.ends_with(".toml") {
                        continue;
                    }
                    let name = string(&doc["metadata"]["name"], "ConfigMap name");
                    let file = scratch.join(format!("{name}-{key}"));
                    std::fs::write(&file, string(value, &key)).unwrap();
                    configs.push((format!("{} ConfigMap {name} {key}", shown(&path)), file));
                }
            }
        }
    }
    configs
}

fn check_config(config: &Path, env: &BTreeMap<String, String>) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check-config", "--config"])
        .arg(config)
        // Only the variables given: a config that needs another one fails.
        .env_clear()
        .envs(env)
        .output()
        .unwrap()
}

#[test]
fn every_tollgate_config_under_deploy_passes_check_config() {
    let scratch = tempfile::tempdir().unwrap();
    let configs = tollgate_configs(scratch.path());
    let names: Vec<&str> = configs.iter().map(|(name, _)| name.as_str()).collect();
    // The image's default, compose's, systemd's and the ConfigMap's.
    assert!(configs.len() >= 4, "too few configs found: {names:?}");

    let mut failures = Vec::new();
    for (name, path) in &configs {
        let vars = config_vars(&read(path));
        let env: BTreeMap<String, String> = vars
            .iter()
            .map(|var| (var.clone(), dummy_value(var)))
            .collect();
        let output = check_config(path, &env);
        if !output.status.success() || !String::from_utf8_lossy(&output.stdout).contains(": ok") {
            failures.push(format!(
                "{name}: check-config {} with {:?}: {}{}",
                output.status,
                env.keys().collect::<Vec<_>>(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }

        // The check can fail: without its variables the config is refused,
        // naming one of them.
        if !vars.is_empty() {
            let output = check_config(path, &BTreeMap::new());
            let stderr = String::from_utf8_lossy(&output.stderr);
            let named = vars
                .iter()
                .any(|var| stderr.contains(&format!("environment variable {var} is not set")));
            if output.status.code() != Some(2) || !named {
                failures.push(format!(
                    "{name}: without {vars:?} check-config gave {}: {stderr}",
                    output.status
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------
// Dockerfile.

/// The Dockerfile's instructions: comments dropped, continuation lines joined.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (instruction, args) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((instruction.to_ascii_uppercase(), args.trim().to_owned()));
                current.clear();
            }
        }
    }
    out
}

#[test]
fn dockerfile_builds_in_one_stage_and_runs_as_non_root_in_another() {
    let dockerfile = deploy().join("Dockerfile");
    let instructions = dockerfile_instructions(&read(&dockerfile));
    let stages: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, (instruction, _))| instruction == "FROM")
        .map(|(i, _)| i)
        .collect();
    assert!(
        stages.len() >= 2,
        "expected a multi-stage build: {stages:?}"
    );

    // The builder's Rust is the toolchain the repository pins.
    let toolchain = read(&repo().join("rust-toolchain.toml"));
    let channel: toml::Value = toml::from_str(&toolchain).unwrap();
    let channel = channel["toolchain"]["channel"].as_str().unwrap();
    let minor = channel.splitn(3, '.').take(2).collect::<Vec<_>>().join(".");
    let builder = &instructions[stages[0]].1;
    assert!(
        builder.starts_with(&format!("rust:{minor}")),
        "builder {builder:?} is not Rust {minor} (rust-toolchain.toml)"
    );

    let last = &instructions[*stages.last().unwrap()..];
    let user = last
        .iter()
        .rev()
        .find(|(instruction, _)| instruction == "USER")
        .map(|(_, args)| args.clone())
        .expect("the final stage sets no USER: it would run as root");
    let name = user.split(':').next().unwrap();
    assert!(
        !["root", "0", ""].contains(&name),
        "final stage runs as {user:?}"
    );
    let args = |wanted: &str| -> Vec<String> {
        last.iter()
            .filter(|(instruction, _)| instruction == wanted)
            .map(|(_, args)| args.clone())
            .collect()
    };
    assert_eq!(args("ENTRYPOINT"), [r#"["tollgate"]"#]);
    assert_eq!(args("CMD"), [r#"["serve"]"#]);
    let exposed: BTreeSet<String> = args("EXPOSE")
        .iter()
        .flat_map(|a| a.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .collect();
    assert!(
        exposed.contains("8080") && exposed.contains("9090"),
        "{exposed:?}"
    );
    assert!(
        args("ENV")
            .iter()
            .any(|env| env.contains("TOLLGATE_CONFIG=/etc/tollgate/tollgate.toml")),
        "the final stage does not set TOLLGATE_CONFIG"
    );

    // Every COPY from the build context names something that exists and that
    // the Dockerfile's ignore file lets into the context.
    let ignore = read(&deploy().join("Dockerfile.dockerignore"));
    let allowed: Vec<&str> = ignore
        .lines()
        .filter_map(|line| line.trim().strip_prefix('!'))
        .collect();
    for (instruction, args) in &instructions {
        if instruction != "COPY" || args.starts_with("--from") {
            continue;
        }
        let words: Vec<&str> = args.split_whitespace().collect();
        for source in &words[..words.len() - 1] {
            let source = source.trim_start_matches("./");
            assert!(
                repo().join(source).exists(),
                "COPY {source}: no such file in the repository"
            );
            assert!(
                allowed.iter().any(|allow| is_under(source, allow)),
                "COPY {source}: excluded from the context by deploy/Dockerfile.dockerignore"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Compose.

/// A compose service's `environment`, map or list form.
fn compose_env(service: &Yaml, name: &str) -> BTreeMap<String, String> {
    match &service["environment"] {
        Yaml::Hash(map) => map
            .iter()
            .map(|(k, v)| (string(k, name), scalar(v).unwrap_or_default()))
            .collect(),
        Yaml::Array(items) => items
            .iter()
            .map(|item| {
                let item = string(item, name);
                let (k, v) = item.split_once('=').unwrap_or((&item, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// A compose service's volume mounts as (source, target) pairs (short syntax).
fn compose_mounts(service: &Yaml, name: &str) -> Vec<(String, String)> {
    service["volumes"]
        .as_vec()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|volume| {
            let volume = string(volume, name);
            let mut parts = volume.split(':');
            let source = parts.next().unwrap().to_owned();
            let target = parts.next().unwrap_or_else(|| panic!("{name}: {volume}"));
            (source, target.to_owned())
        })
        .collect()
}

struct ComposeGateway {
    name: String,
    env: BTreeMap<String, String>,
    config: toml::Value,
    data_volume: String,
}

fn compose_gateway(services: &Yaml, name: &str) -> ComposeGateway {
    let service = &services[name];
    let build = &service["build"];
    let context = deploy().join(string(&build["context"], name));
    let dockerfile = context.join(string(&build["dockerfile"], name));
    assert_eq!(
        dockerfile.canonicalize().unwrap(),
        deploy().join("Dockerfile").canonicalize().unwrap(),
        "{name} is not built from deploy/Dockerfile"
    );
    assert_eq!(
        context.canonicalize().unwrap(),
        repo().canonicalize().unwrap(),
        "{name}: the build context must be the repository"
    );

    let mounts = compose_mounts(service, name);
    let (config_source, _) = mounts
        .iter()
        .find(|(_, target)| target == "/etc/tollgate/tollgate.toml")
        .unwrap_or_else(|| panic!("{name} mounts no /etc/tollgate/tollgate.toml"));
    let config_path = deploy().join(config_source.trim_start_matches("./"));
    let text = read(&config_path);
    let config: toml::Value = toml::from_str(&text).unwrap();

    let env = compose_env(service, name);
    let missing: Vec<_> = config_vars(&text)
        .into_iter()
        .filter(|var| !env.contains_key(var))
        .collect();
    assert!(
        missing.is_empty(),
        "{name}: {} interpolates {missing:?}, which the service's environment does not set",
        shown(&config_path)
    );

    for key in ["listen", "admin_listen"] {
        let addr = toml_str(&config, &["server", key]).unwrap_or_default();
        assert!(
            addr.starts_with("0.0.0.0:"),
            "{name}: server.{key} = {addr:?} is unreachable from outside the container"
        );
    }
    let spool = toml_str(&config, &["usage", "spool_dir"]).expect("usage.spool_dir");
    let (data_volume, _) = mounts
        .iter()
        .find(|(source, target)| !source.starts_with('.') && is_under(spool, target))
        .unwrap_or_else(|| panic!("{name}: the spool {spool} is on no volume"));
    ComposeGateway {
        name: name.to_owned(),
        env,
        config,
        data_volume: data_volume.clone(),
    }
}

fn compose() -> Yaml {
    load_yaml(&deploy().join("compose.yaml")).remove(0)
}

#[test]
fn compose_runs_two_distinct_gateways_on_one_postgres() {
    let compose = compose();
    let services = &compose["services"];
    for name in [
        "postgres",
        "gateway-1",
        "gateway-2",
        "mock-upstream",
        "prometheus",
    ] {
        assert!(services[name].as_hash().is_some(), "no service {name}");
    }
    assert!(
        string(&services["postgres"]["image"], "postgres").starts_with("postgres:15"),
        "postgres is not postgres:15"
    );
    assert!(
        services["postgres"]["healthcheck"]["test"]
            .as_vec()
            .is_some(),
        "postgres has no healthcheck"
    );

    let gateways = [
        compose_gateway(services, "gateway-1"),
        compose_gateway(services, "gateway-2"),
    ];
    let resolved = |gateway: &ComposeGateway, path: &[&str]| {
        substitute(
            toml_str(&gateway.config, path).unwrap_or_default(),
            &gateway.env,
        )
    };

    let ids: Vec<String> = gateways
        .iter()
        .map(|g| resolved(g, &["server", "instance_id"]))
        .collect();
    assert!(
        ids.iter().all(|id| !id.is_empty() && !id.contains("${")),
        "{ids:?}"
    );
    assert_ne!(ids[0], ids[1], "both gateways have instance_id {}", ids[0]);

    let urls: Vec<String> = gateways
        .iter()
        .map(|g| resolved(g, &["database", "url"]))
        .collect();
    assert_eq!(urls[0], urls[1], "the gateways use different databases");
    assert!(
        urls[0].starts_with("postgres://") && urls[0].contains("@postgres:5432/"),
        "{} database is not the postgres service: {}",
        gateways[0].name,
        urls[0]
    );
    assert_ne!(
        gateways[0].data_volume, gateways[1].data_volume,
        "the gateways share a spool volume"
    );
    for gateway in &gateways {
        assert!(
            compose["volumes"]
                .as_hash()
                .is_some_and(|v| v.contains_key(&Yaml::String(gateway.data_volume.clone()))),
            "{}: volume {} is not declared",
            gateway.name,
            gateway.data_volume
        );
    }

    // Routes to the mock upstream use the port it listens on.
    let mock_command: Vec<String> = list(&services["mock-upstream"]["command"], "mock-upstream")
        .iter()
        .map(|word| string(word, "mock-upstream command"))
        .collect();
    assert_eq!(mock_command[0], "mock-upstream");
    let listen = mock_command
        .iter()
        .skip_while(|word| *word != "--listen")
        .nth(1)
        .expect("mock-upstream --listen");
    assert!(listen.starts_with("0.0.0.0:"), "mock-upstream on {listen}");
    let routes = gateways[0].config["routes"].as_array().expect("routes");
    for route in routes {
        let upstream = route["upstream"].as_str().unwrap();
        if upstream.contains("//mock-upstream:") {
            assert_eq!(
                port_of(upstream.trim_end_matches('/')),
                port_of(listen),
                "{upstream}"
            );
        }
    }
}

#[test]
fn prometheus_scrapes_both_compose_gateways_on_their_admin_port() {
    let compose = compose();
    let services = &compose["services"];
    let mounts = compose_mounts(&services["prometheus"], "prometheus");
    assert!(
        mounts
            .iter()
            .any(|(source, target)| source == "./prometheus.yml"
                && target == "/etc/prometheus/prometheus.yml"),
        "prometheus does not mount deploy/prometheus.yml: {mounts:?}"
    );

    let mut expected = BTreeSet::new();
    for name in ["gateway-1", "gateway-2"] {
        let gateway = compose_gateway(services, name);
        let admin = toml_str(&gateway.config, &["server", "admin_listen"]).unwrap();
        expected.insert(format!("{name}:{}", port_of(admin)));
    }

    let prometheus = load_yaml(&deploy().join("prometheus.yml")).remove(0);
    let mut targets = BTreeSet::new();
    for job in list(&prometheus["scrape_configs"], "scrape_configs") {
        let path = scalar(&job["metrics_path"]).unwrap_or_else(|| "/metrics".to_owned());
        assert_eq!(path, "/metrics");
        for config in job["static_configs"]
            .as_vec()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            for target in list(&config["targets"], "targets") {
                targets.insert(string(target, "target"));
            }
        }
    }
    assert_eq!(targets, expected);
}

// ---------------------------------------------------------------------------
// Kubernetes.

fn kubernetes_docs() -> Vec<(PathBuf, Yaml)> {
    files_under(&deploy().join("kubernetes"))
        .into_iter()
        .filter(|path| has_extension(path, &["yaml", "yml"]))
        .flat_map(|path| {
            load_yaml(&path)
                .into_iter()
                .map(move |doc| (path.clone(), doc))
        })
        .collect()
}

fn one_of_kind<'a>(docs: &'a [(PathBuf, Yaml)], kind: &str) -> &'a Yaml {
    let found: Vec<&Yaml> = docs
        .iter()
        .filter(|(_, doc)| doc["kind"].as_str() == Some(kind))
        .map(|(_, doc)| doc)
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind}");
    found[0]
}

/// A container port by name or number.
fn container_port(container: &Yaml, port: &Yaml) -> u16 {
    if let Some(number) = port.as_i64() {
        return u16::try_from(number).unwrap();
    }
    let name = string(port, "port");
    list(&container["ports"], "ports")
        .iter()
        .find(|p| p["name"].as_str() == Some(name.as_str()))
        .and_then(|p| p["containerPort"].as_i64())
        .map(|n| u16::try_from(n).unwrap())
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

fn labels(value: &Yaml) -> BTreeMap<String, String> {
    value
        .as_hash()
        .map(|map| {
            map.iter()
                .map(|(k, v)| (string(k, "label"), string(v, "label")))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn kubernetes_deployment_probes_the_admin_port_and_keeps_secrets_out() {
    let docs = kubernetes_docs();
    let deployment = one_of_kind(&docs, "Deployment");
    let config_map = one_of_kind(&docs, "ConfigMap");
    let service = one_of_kind(&docs, "Service");
    let pdb = one_of_kind(&docs, "PodDisruptionBudget");
    assert!(
        docs.iter()
            .all(|(_, doc)| doc["kind"].as_str() != Some("Secret")),
        "deploy/kubernetes must not ship a Secret"
    );

    let config_text = string(&config_map["data"]["tollgate.toml"], "tollgate.toml");
    let config: toml::Value = toml::from_str(&config_text).unwrap();
    let admin_port = port_of(toml_str(&config, &["server", "admin_listen"]).unwrap());
    let data_port = port_of(toml_str(&config, &["server", "listen"]).unwrap());

    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"].as_i64(), Some(2));
    let pod = &spec["template"]["spec"];
    let containers = list(&pod["containers"], "containers");
    let container = &containers[0];

    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe} path");
        assert_eq!(
            container_port(container, &get["port"]),
            admin_port,
            "{probe} is not on the admin port"
        );
    }

    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false));
    let non_root = security["runAsNonRoot"]
        .as_bool()
        .or(pod["securityContext"]["runAsNonRoot"].as_bool());
    assert_eq!(non_root, Some(true), "runAsNonRoot");
    for kind in ["requests", "limits"] {
        assert!(
            container["resources"][kind]["memory"].as_str().is_some(),
            "no memory {kind}"
        );
    }

    // The config is the ConfigMap, mounted where TOLLGATE_CONFIG points.
    let volumes = list(&pod["volumes"], "volumes");
    let volume = |name: &str| -> &Yaml {
        volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    let mounts = list(&container["volumeMounts"], "volumeMounts");
    let mount_of = |path: &str| -> &Yaml {
        mounts
            .iter()
            .filter(|m| is_under(path, m["mountPath"].as_str().unwrap_or("\0")))
            .max_by_key(|m| m["mountPath"].as_str().unwrap_or_default().len())
            .unwrap_or_else(|| panic!("{path} is on no volume (the root is read-only)"))
    };
    let config_mount = mount_of("/etc/tollgate/tollgate.toml");
    let config_volume = volume(&string(&config_mount["name"], "volumeMount"));
    assert_eq!(
        config_volume["configMap"]["name"].as_str(),
        config_map["metadata"]["name"].as_str(),
        "/etc/tollgate is not the ConfigMap"
    );

    // The spool is on a writable volume.
    let spool = toml_str(&config, &["usage", "spool_dir"]).expect("usage.spool_dir");
    let spool_mount = mount_of(spool);
    assert_ne!(spool_mount["readOnly"].as_bool(), Some(true), "{spool}");
    let spool_volume = volume(&string(&spool_mount["name"], "volumeMount"));
    assert!(
        spool_volume["emptyDir"].as_hash().is_some()
            || spool_volume["persistentVolumeClaim"].as_hash().is_some(),
        "the spool {spool} is not on an emptyDir or a claim"
    );

    // Every variable the config interpolates is set; secrets by reference;
    // instance_id from the pod's name.
    let env: BTreeMap<String, &Yaml> = list(&container["env"], "env")
        .iter()
        .map(|e| (string(&e["name"], "env"), e))
        .collect();
    for var in config_vars(&config_text) {
        assert!(env.contains_key(&var), "the config needs ${{{var}}}");
    }
    for secret in ["TOLLGATE_ADMIN_TOKEN", "TOLLGATE_DATABASE_URL"] {
        let entry = env
            .get(secret)
            .unwrap_or_else(|| panic!("{secret} is not set"));
        assert!(
            entry["valueFrom"]["secretKeyRef"].as_hash().is_some() && entry["value"].is_badvalue(),
            "{secret} must come from a Secret"
        );
    }
    let instance_id = toml_str(&config, &["server", "instance_id"]).expect("instance_id");
    let mut instance_vars = BTreeSet::new();
    string_vars(instance_id, &mut instance_vars);
    assert_eq!(instance_vars.len(), 1, "instance_id {instance_id:?}");
    let var = instance_vars.first().unwrap();
    assert_eq!(
        env[var]["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("metadata.name"),
        "instance_id must be unique per pod"
    );

    // The Service and the PodDisruptionBudget select the Deployment's pods.
    let pod_labels = labels(&spec["template"]["metadata"]["labels"]);
    for (what, selector) in [
        ("Service", labels(&service["spec"]["selector"])),
        (
            "PodDisruptionBudget",
            labels(&pdb["spec"]["selector"]["matchLabels"]),
        ),
        ("Deployment", labels(&spec["selector"]["matchLabels"])),
    ] {
        assert!(!selector.is_empty(), "{what} selects nothing");
        assert!(
            selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
            "{what} selector {selector:?} does not match the pods {pod_labels:?}"
        );
    }
    let service_ports: BTreeSet<u16> = list(&service["spec"]["ports"], "ports")
        .iter()
        .map(|port| container_port(container, &port["targetPort"]))
        .collect();
    assert_eq!(service_ports, BTreeSet::from([data_port, admin_port]));
    assert_eq!(pdb["spec"]["minAvailable"].as_i64(), Some(1));

    // The kustomization lists every manifest.
    let kustomization = docs
        .iter()
        .find(|(path, _)| path.ends_with("kustomization.yaml"))
        .map(|(_, doc)| doc)
        .expect("kustomization.yaml");
    let listed: BTreeSet<String> = list(&kustomization["resources"], "resources")
        .iter()
        .map(|r| string(r, "resource"))
        .collect();
    let manifests: BTreeSet<String> = docs
        .iter()
        .filter(|(path, _)| !path.ends_with("kustomization.yaml"))
        .map(|(path, _)| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed, manifests);
}

// ---------------------------------------------------------------------------
// Metric names.

fn allowed_metric(name: &str) -> bool {
    EXPORTED_METRICS.contains(&name)
        || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| HISTOGRAMS.contains(&base))
        })
}

/// The metric a series belongs to (`_bucket` etc. removed).
fn metric_base(name: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if HISTOGRAMS.contains(&base) {
                return base;
            }
        }
    }
    name
}

/// PromQL keywords and aggregation operators: identifiers that are not metrics.
const PROMQL_KEYWORDS: [&str; 24] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
];

/// Label lists follow these; their contents are label names.
const PROMQL_LABEL_LIST: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names a PromQL expression selects: identifiers outside label
/// matchers, ranges, strings and label lists that are neither functions,
/// keywords nor numbers.
fn promql_metrics(expr: &str) -> BTreeSet<String> {
    // Drop strings, `{...}` matchers and `[...]` ranges (Grafana variables
    // such as $__rate_interval live there).
    let mut bare = String::new();
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                while let Some(d) = chars.next() {
                    if d == '\\' {
                        chars.next();
                    } else if d == c {
                        break;
                    }
                }
                bare.push(' ');
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                for d in chars.by_ref() {
                    if d == close {
                        break;
                    }
                }
                bare.push(' ');
            }
            _ => bare.push(c),
        }
    }

    let mut metrics = BTreeSet::new();
    let bytes = bare.as_bytes();
    let mut i = 0;
    let mut skip_label_list = false;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_digit() || c == b'.' {
            // A number, including exponents like 1e9.
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == b'_' || c == b':' || c == b'$' {
            let start = i;
            while i < bytes.len()
                && (bytes[i].is_ascii_alphanumeric() || matches!(bytes[i], b'_' | b':' | b'$'))
            {
                i += 1;
            }
            let word = &bare[start..i];
            let next = bare[i..].trim_start().chars().next();
            let keyword = word.starts_with('$') || PROMQL_KEYWORDS.contains(&word);
            if !keyword && next != Some('(') {
                metrics.insert(word.to_owned());
            }
            // `by (le, route)`: the list that follows holds label names.
            skip_label_list = PROMQL_LABEL_LIST.contains(&word);
        } else if c == b'(' && skip_label_list {
            while i < bytes.len() && bytes[i] != b')' {
                i += 1;
            }
            skip_label_list = false;
            i += 1;
        } else {
            if !c.is_ascii_whitespace() {
                skip_label_list = false;
            }
            i += 1;
        }
    }
    metrics
}

/// Every `expr` string in a dashboard, with where it is.
fn dashboard_exprs(value: &serde_json::Value, at: &str, out: &mut Vec<(String, String)>) {
    match value {
        serde_json::Value::Object(map) => {
            let here = map
                .get("title")
                .and_then(|t| t.as_str())
                .map_or_else(|| at.to_owned(), |title| format!("panel {title:?}"));
            for (key, child) in map {
                match (key.as_str(), child) {
                    ("expr", serde_json::Value::String(expr)) => {
                        out.push((here.clone(), expr.clone()));
                    }
                    _ => dashboard_exprs(child, &here, out),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                dashboard_exprs(item, at, out);
            }
        }
        _ => {}
    }
}

/// The series selector of a Grafana `label_values(selector, label)` query.
fn label_values_selector(query: &str) -> &str {
    let inner = query
        .trim()
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .unwrap_or_else(|| panic!("unexpected variable query {query:?}"));
    let mut depth = 0;
    for (i, c) in inner.char_indices() {
        match c {
            '{' | '(' => depth += 1,
            '}' | ')' => depth -= 1,
            ',' if depth == 0 => return &inner[..i],
            _ => {}
        }
    }
    inner
}

#[test]
fn promql_metric_extraction_finds_metrics_only() {
    assert_eq!(
        promql_metrics(
            r#"histogram_quantile(0.99, sum by (le, route) (rate(tollgate_request_duration_seconds_bucket{instance=~"$instance", route=~"a|b"}[$__rate_interval]))) / 1e9"#
        ),
        BTreeSet::from(["tollgate_request_duration_seconds_bucket".to_owned()])
    );
    assert_eq!(
        promql_metrics("sum(rate(a_total[5m])) / on (instance) group_left b_up > bool 0"),
        BTreeSet::from(["a_total".to_owned(), "b_up".to_owned()])
    );
    assert!(allowed_metric("tollgate_usage_batch_rows_count"));
    assert!(!allowed_metric("tollgate_requests_total_count"));
    assert!(!allowed_metric("tollgate_request_total"));
}

#[test]
fn dashboard_and_prometheus_config_use_only_exported_metric_names() {
    let path = deploy().join("grafana").join("tollgate-dashboard.json");
    let dashboard = load_json(&path);

    // A Prometheus datasource variable that every panel uses.
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let datasource = variables
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("no datasource variable");
    assert_eq!(datasource["query"], "prometheus");
    let datasource_ref = format!("${{{}}}", datasource["name"].as_str().unwrap());
    let variable_names: BTreeSet<&str> = variables
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();

    let mut panels = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        panels.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            panels.extend(nested);
        }
    }
    let mut ids = BTreeSet::new();
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(
            ids.insert(panel["id"].as_i64().unwrap()),
            "duplicate id: {title}"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"].as_str(),
            Some(datasource_ref.as_str()),
            "panel {title:?} does not use the datasource variable"
        );
        assert!(
            panel["targets"].as_array().is_some_and(|t| !t.is_empty()),
            "panel {title:?} has no query"
        );
    }

    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard["panels"], "panels", &mut exprs);
    for variable in variables.iter().filter(|v| v["type"] == "query") {
        let query = variable["query"]["query"]
            .as_str()
            .or(variable["query"].as_str())
            .unwrap();
        exprs.push((
            format!("variable {}", variable["name"]),
            label_values_selector(query).to_owned(),
        ));
    }
    assert!(exprs.len() >= 20, "only {} queries found", exprs.len());

    let mut used = BTreeSet::new();
    let mut errors = Vec::new();
    for (at, expr) in &exprs {
        let metrics = promql_metrics(expr);
        if metrics.is_empty() {
            errors.push(format!("{at}: no metric in {expr:?}"));
        }
        for metric in metrics {
            if !allowed_metric(&metric) {
                errors.push(format!("{at}: {metric} is not a metric Tollgate exports"));
            }
            used.insert(metric_base(&metric).to_owned());
        }
        // Every $variable used is defined (Grafana's own $__ ones aside).
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$')) {
            if let Some(name) = word.strip_prefix('$') {
                if !name.starts_with("__") && !variable_names.contains(name) {
                    errors.push(format!("{at}: ${name} is not a dashboard variable"));
                }
            }
        }
    }
    let unused: Vec<&str> = EXPORTED_METRICS
        .iter()
        .copied()
        .filter(|m| !used.contains(*m))
        .collect();
    if !unused.is_empty() {
        errors.push(format!("the dashboard shows no panel for {unused:?}"));
    }

    // The Prometheus config names no metric (relabelling, rules) outside docs/METRICS.md.
    let prometheus = read(&deploy().join("prometheus.yml"));
    for word in prometheus.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("tollgate_") && !allowed_metric(word) {
            errors.push(format!(
                "deploy/prometheus.yml: {word} is not a metric Tollgate exports"
            ));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}
