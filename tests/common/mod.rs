//! Shared harness for the end-to-end tests: gateways in-process or as the real
//! binary, the mock upstream, and small HTTP clients over real sockets.
#![allow(dead_code, clippy::unwrap_used)]

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

pub use tollgate_mock::MockUpstream;

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

/// An in-process gateway.
pub struct TestGateway {
    pub running: Option<tollgate::app::Running>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

impl TestGateway {
    pub async fn start(config: Config) -> TestGateway {
        let running = tollgate::app::start(config).await.expect("gateway starts");
        TestGateway {
            addr: running.data_addr(),
            admin: running.admin_addr(),
            running: Some(running),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
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

    /// The gateway's error `type`, checking the whole SPEC shape.
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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.toml");
        let toml = format!(
            "{}\n",
            toml.replace("LISTEN", "127.0.0.1:0")
                .replace("ADMIN", "127.0.0.1:0")
        );
        std::fs::write(&path, toml).unwrap();
        let mut child = Command::new(binary())
            .args(["--log-format", "json", "--config"])
            .arg(&path)
            .arg("serve")
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
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
            child,
            addr: addr.unwrap(),
            admin: admin.unwrap(),
            dir,
            stderr_lines: lines,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
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
