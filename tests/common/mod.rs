//! Shared harness for the end-to-end tests: gateways in-process or as the real
//! binary, the mock upstream, and small HTTP clients over real sockets.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate::config::Config;

#[allow(unused_imports)]
pub use tollgate_mock::MockUpstream;

/// Every metric name Tollgate exports (docs/METRICS.md).
pub const EXPORTED_METRICS: [&str; 20] = [
    "tollgate_requests_total",
    "tollgate_request_duration_seconds",
    "tollgate_upstream_duration_seconds",
    "tollgate_auth_failures_total",
    "tollgate_limit_rejections_total",
    "tollgate_usage_rows_total",
    "tollgate_usage_flush_duration_seconds",
    "tollgate_usage_batch_rows",
    "tollgate_usage_pending_rows",
    "tollgate_usage_spool_bytes",
    "tollgate_cost_nanos_total",
    "tollgate_tokens_total",
    "tollgate_database_up",
    "tollgate_metering_unavailable_total",
    "tollgate_keys_cached",
    "tollgate_upstream_errors_total",
    "tollgate_usage_invalid_values_total",
    "tollgate_open_connections",
    "tollgate_webhook_deliveries_total",
    "tollgate_webhook_pending",
];

/// The environment used to interpolate test configs.
pub fn test_env(name: &str) -> Option<String> {
    match name {
        "TOLLGATE_ADMIN_TOKEN" => Some("admin-test-token".into()),
        "OPENAI_API_KEY" => Some("sk-test".into()),
        _ => None,
    }
}

/// Parses a config for tests, on ephemeral ports.
pub fn config(toml: &str) -> Config {
    let mut config = Config::parse(toml, "test.toml", &test_env).expect("test config parses");
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    config
}

/// A config with one route `/v1/` (and `/strip/` with strip_prefix) to `upstream`.
pub fn route_config(upstream: &str, extra: &str) -> Config {
    config(&format!(
        r#"
[[tiers]]
name = "test"

[server]
max_request_body = "1MiB"
request_header_timeout = "1s"

[[routes]]
name = "mock"
prefix = "/v1/"
upstream = "{upstream}"
timeout = "2s"
strip_response_headers = ["x-cost-usd"]
[routes.set_headers]
authorization = "Bearer ${{OPENAI_API_KEY}}"

[[routes]]
name = "stripped"
prefix = "/strip/"
upstream = "{upstream}"
strip_prefix = true
timeout = "500ms"

[[routes]]
name = "any"
prefix = "/"
upstream = "{upstream}"
timeout = "2s"
{extra}
"#
    ))
}

/// An in-process gateway on its own SQLite file, with one key made before
/// it started (when the config has a tier to give its customer).
pub struct TestGateway {
    pub running: Option<tollgate::app::Running>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// A valid key for customer "test", if the config has tiers.
    pub key: Option<String>,
    pub store: std::sync::Arc<dyn tollgate_metering::Store>,
    pub config: Config,
    _dir: Option<tempfile::TempDir>,
}

impl TestGateway {
    /// Starts on a fresh SQLite database in a temporary directory.
    pub async fn start(mut config: Config) -> TestGateway {
        let dir = tempfile::tempdir().unwrap();
        config.database.url = format!("sqlite://{}/tollgate.db", dir.path().display());
        config.usage.spool_dir = dir.path().join("spool");
        Self::start_on(config, Some(dir)).await
    }

    /// Starts on the database the config names (which the caller owns).
    pub async fn start_on(config: Config, dir: Option<tempfile::TempDir>) -> TestGateway {
        Self::start_on_clock(
            config,
            dir,
            std::sync::Arc::new(tollgate_metering::limits::SystemClock),
        )
        .await
    }

    /// As [`TestGateway::start_on`], with the limits following `clock`.
    pub async fn start_on_clock(
        config: Config,
        dir: Option<tempfile::TempDir>,
        clock: std::sync::Arc<dyn tollgate_metering::limits::Clock>,
    ) -> TestGateway {
        let store = tollgate::app::open_store(&config)
            .await
            .expect("database opens");
        let key = match config.tiers.first() {
            Some(tier) => {
                let accounts = tollgate::snapshot::accounts_for(&config, store.clone());
                let created = accounts
                    .create_key(tollgate_accounts::KeyRequest {
                        customer: "test".into(),
                        tier: Some(tier.name.clone()),
                        ..Default::default()
                    })
                    .await
                    .expect("test key is created");
                Some(created.key)
            }
            None => None,
        };
        let running = tollgate::app::start_with_clock(config.clone(), store.clone(), clock)
            .await
            .expect("gateway starts");
        TestGateway {
            addr: running.data_addr(),
            admin: running.admin_addr(),
            running: Some(running),
            key,
            store,
            config,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A request builder for `path` carrying the test key.
    pub fn request(&self, method: http::Method, path: &str) -> http::request::Builder {
        authorized(method, self.url(path), self.key.as_deref())
    }

    /// GET `path` with the test key.
    pub async fn get(&self, path: &str) -> Reply {
        send(
            &client(),
            self.request(http::Method::GET, path)
                .body(Full::default())
                .unwrap(),
        )
        .await
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
    }
}

/// A request to the gateway's admin API with the tests' admin token
/// (`admin-test-token`), and a JSON body if given.
pub async fn admin(
    gw: &TestGateway,
    method: http::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Reply {
    let builder = http::Request::builder()
        .method(method)
        .uri(format!("http://{}{}", gw.admin, path))
        .header("authorization", "Bearer admin-test-token")
        .header("content-type", "application/json");
    let body = body.map_or_else(Full::default, |b| Full::new(Bytes::from(b.to_string())));
    send(&client(), builder.body(body).unwrap()).await
}

/// A request builder with `Authorization: Bearer <key>` when there is a key.
pub fn authorized(method: http::Method, url: String, key: Option<&str>) -> http::request::Builder {
    let builder = http::Request::builder().method(method).uri(url);
    match key {
        Some(key) => builder.header("authorization", format!("Bearer {key}")),
        None => builder,
    }
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2c_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A collected response.
pub struct Reply {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The gateway's error `type`, checking the whole documented error shape (docs/HTTP.md).
    pub fn error_type(&self) -> String {
        let json = self.json();
        let error = &json["error"];
        assert_eq!(error["type"], error["code"], "type and code agree: {json}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(
            self.headers["content-type"], "application/json",
            "errors are JSON"
        );
        error["type"].as_str().unwrap().to_owned()
    }
}

pub async fn send(client: &HttpClient, request: http::Request<Full<Bytes>>) -> Reply {
    let response = client.request(request).await.expect("request succeeds");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body completes").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
        version: parts.version,
    }
}

pub async fn get(url: &str) -> Reply {
    send(
        &client(),
        http::Request::get(url).body(Full::default()).unwrap(),
    )
    .await
}

/// The real binary, started with a config file and JSON logs.
pub struct Process {
    /// A key made by `tollgate keys create` before the gateway started,
    /// when the config has a tier.
    pub key: Option<String>,
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub stderr_lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tollgate"))
}

impl Process {
    /// Starts `tollgate serve` with `toml` (listen addresses are forced to
    /// port 0) and waits until both listeners are up.
    pub fn serve(toml: &str) -> Process {
        Self::serve_logged(toml, "info")
    }

    /// As [`Process::serve`] with `RUST_LOG` set to `log`.
    pub fn serve_logged(toml: &str, log: &str) -> Process {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.toml");
        let toml = format!(
            "{}\n",
            toml.replace("LISTEN", "127.0.0.1:0")
                .replace("ADMIN", "127.0.0.1:0")
        );
        std::fs::write(&path, &toml).unwrap();
        let key = toml.contains("[[tiers]]").then(|| {
            let tier = toml
                .split("[[tiers]]")
                .nth(1)
                .and_then(|rest| rest.split('"').nth(1))
                .unwrap()
                .to_owned();
            let output = Command::new(binary())
                .arg("--config")
                .arg(&path)
                .args([
                    "keys",
                    "create",
                    "--customer",
                    "test",
                    "--tier",
                    &tier,
                    "--json",
                ])
                .current_dir(dir.path())
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "keys create: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            json["key"].as_str().unwrap().to_owned()
        });
        Self::spawn(key, dir, log)
    }

    /// As [`Process::serve`], with the process's file-descriptor limit
    /// (soft and hard) set to `limit` by `prlimit`.
    pub fn serve_with_descriptor_limit(toml: &str, limit: u64) -> Process {
        let process = Self::serve_logged(toml, "info");
        let (key, dir) = process.into_parts();
        Self::spawn_with(key, dir, "info", Some(limit))
    }

    fn into_parts(mut self) -> (Option<String>, tempfile::TempDir) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let placeholder = tempfile::tempdir().unwrap();
        let dir = std::mem::replace(&mut self.dir, placeholder);
        (self.key.take(), dir)
    }

    /// Starts the binary on `dir/tollgate.toml`, in `dir`, and waits for
    /// both listeners.
    fn spawn(key: Option<String>, dir: tempfile::TempDir, log: &str) -> Process {
        Self::spawn_with(key, dir, log, None)
    }

    fn spawn_with(
        key: Option<String>,
        dir: tempfile::TempDir,
        log: &str,
        descriptors: Option<u64>,
    ) -> Process {
        let mut command = match descriptors {
            // prlimit sets the limit and then execs the binary: same pid.
            Some(limit) => {
                let mut command = Command::new("prlimit");
                command
                    .arg(format!("--nofile={limit}:{limit}"))
                    .arg("--")
                    .arg(binary());
                command
            }
            None => Command::new(binary()),
        };
        let mut child = command
            .args(["--log-format", "json", "--config"])
            .arg(dir.path().join("tollgate.toml"))
            .arg("serve")
            .current_dir(dir.path())
            .env("RUST_LOG", log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("binary starts");
        let stderr = child.stderr.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) {
                    let message = json["message"].as_str().unwrap_or_default().to_owned();
                    if let Some(addr) = json["addr"].as_str() {
                        let _ = tx.send((message, addr.to_owned()));
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let (mut addr, mut admin) = (None, None);
        while addr.is_none() || admin.is_none() {
            let (message, value) = rx
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("gateway did not start: {:?}", lines.lock().unwrap()));
            match message.as_str() {
                "Data plane listening." => addr = Some(value.parse().unwrap()),
                "Admin listening." => admin = Some(value.parse().unwrap()),
                _ => {}
            }
        }
        Process {
            key,
            child,
            addr: addr.unwrap(),
            admin: admin.unwrap(),
            dir,
            stderr_lines: lines,
        }
    }

    /// SIGKILLs the gateway and starts it again on the same directory
    /// (config, SQLite file, spool) with the same key.
    pub fn kill_and_restart(self, log: &str) -> Process {
        let (key, dir) = self.into_parts();
        Self::spawn(key, dir, log)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A request builder for `path` carrying the key made at start.
    pub fn request(&self, method: http::Method, path: &str) -> http::request::Builder {
        authorized(method, self.url(path), self.key.as_deref())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A field of /proc/PID/status in KiB (VmRSS, VmHWM).
    pub fn status_kib(&self, field: &str) -> u64 {
        proc_status_kib(self.pid(), field)
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn logs(&self) -> Vec<String> {
        self.stderr_lines.lock().unwrap().clone()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

pub fn write_file(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// Runs a `tollgate` command against `config_path`; returns (exit code, stdout, stderr).
pub fn cli(config_path: &Path, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(binary())
        .arg("--config")
        .arg(config_path)
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs a `--json` command that must succeed and returns its document.
pub fn cli_json(config_path: &Path, args: &[&str]) -> serde_json::Value {
    let (code, stdout, stderr) = cli(config_path, args);
    assert_eq!(code, 0, "tollgate {args:?} failed: {stderr}");
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{args:?} printed non-JSON ({e}): {stdout}"))
}

/// Polls `check` every 20 ms until it returns true or `within` passes;
/// returns how long it took.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "condition not met within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The socket address of a `postgres://` URL (default port 5432).
pub fn postgres_addr(url: &str) -> SocketAddr {
    let rest = url.split("://").nth(1).unwrap();
    let host_port = rest.rsplit('@').next().unwrap().split('/').next().unwrap();
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    };
    host_port.replace("localhost", "127.0.0.1").parse().unwrap()
}

/// A TCP proxy of the test's own in front of a dependency (the database), so
/// a test can take the dependency away without stopping a shared server.
pub struct CutProxy {
    pub addr: SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
}

impl CutProxy {
    /// A proxy in front of the Postgres of `url`, and `url` rewritten to
    /// go through it.
    pub async fn for_postgres(url: &str) -> (CutProxy, String) {
        let target = postgres_addr(url);
        let proxy = CutProxy::start(target).await;
        let through = url.replacen(&target.to_string(), &proxy.addr.to_string(), 1);
        (proxy, through)
    }

    pub async fn start(target: SocketAddr) -> CutProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if *watch.borrow() {
                    drop(client);
                    continue;
                }
                let mut watch = watch.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = watch.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        CutProxy { addr, cut }
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}

/// A `/metrics` scrape: every sample, by name and labels.
pub struct Scrape {
    pub text: String,
    samples: HashMap<(String, BTreeMap<String, String>), f64>,
}

impl Scrape {
    /// GETs `http://{admin}/metrics` (no token needed).
    pub async fn of(admin: SocketAddr) -> Scrape {
        let reply = get(&format!("http://{admin}/metrics")).await;
        assert_eq!(reply.status, http::StatusCode::OK);
        assert_eq!(
            reply.headers["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        Scrape::parse(String::from_utf8(reply.body.to_vec()).unwrap())
    }

    /// Parses the sample lines (`name{k="v",…} value`); comment lines are
    /// skipped. Panics on a line that is neither.
    pub fn parse(text: String) -> Scrape {
        let mut samples = HashMap::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let value: f64 = value.parse().expect("sample value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("closing brace");
                    (name, parse_labels(body))
                }
                None => (series, BTreeMap::new()),
            };
            samples.insert((name.to_owned(), labels), value);
        }
        Scrape { text, samples }
    }

    /// The sample `name` with exactly `labels`, 0 when absent (a counter
    /// never incremented is not exposed).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let labels = labels
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        self.samples
            .get(&(name.to_owned(), labels))
            .copied()
            .unwrap_or(0.0)
    }

    /// The sum of every `name` sample whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|((n, l), _)| {
                n == name
                    && labels
                        .iter()
                        .all(|&(k, v)| l.get(k).map(String::as_str) == Some(v))
            })
            .map(|(_, v)| v)
            .sum()
    }
}

fn parse_labels(body: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").expect("label key");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().expect("closing quote") {
                (i, '"') => break i,
                (_, '\\') => match chars.next().expect("escape").1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.to_owned(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    labels
}

/// Runs every future at once on the runtime; their outputs in order.
pub async fn futures_join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(handles.len());
    for handle in handles {
        outputs.push(handle.await.unwrap());
    }
    outputs
}
