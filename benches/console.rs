//! The console at production size: each page's server time (the answer's
//! last byte, over loopback) and its total load time in headless Chromium
//! (navigation start to the load event, the SVG charts, stylesheet and
//! script included), median and p99 over `RUNS` loads after one warm-up.
//!
//! It runs against a database loaded by the reports bench: 1,000 customers
//! and 10 million usage rows over January to March 2025:
//!
//! ```sh
//! KEEP=1 cargo bench --bench reports          # prints "kept database NAME"
//! DATABASE=NAME cargo bench --bench console   # needs chromium and chromedriver
//! ```
//!
//! The gateway is the release binary (`TOLLGATE_BIN`, default
//! `target/release/tollgate`), started on that database. Pages are read for
//! February 2025. Also printed: the size of the console's stylesheet and
//! script in the binary.

#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fantoccini::{ClientBuilder, Locator};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const TOKEN: &str = "console-bench-token";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| {
        let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
        samples[rank - 1].as_secs_f64() * 1e3
    };
    (at(0.5), at(0.99))
}

#[tokio::main]
async fn main() {
    let Ok(database) = std::env::var("DATABASE") else {
        println!("console: set DATABASE to a database the reports bench kept (KEEP=1); skipped");
        return;
    };
    let runs = env("RUNS", 20);
    let server = std::env::var("TOLLGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let url = match server.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{database}"),
        None => panic!("bad TOLLGATE_TEST_DATABASE_URL"),
    };
    let dir = tempfile::tempdir().unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("tollgate.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = "127.0.0.1:{data}"
admin_listen = "{admin}"

[admin]
tokens = ["{TOKEN}"]

[database]
url = "{url}"

[usage]
spool_dir = "{spool}"

[[tiers]]
name = "free"
monthly_requests = 20000

[[tiers]]
name = "pro"
monthly_requests = 100000
monthly_cost_usd = 500.0
overage = "bill"
overage_price_per_request_usd = 0.001

[[tiers]]
name = "enterprise"
"#,
            data = free_port(),
            spool = dir.path().join("spool").display(),
        ),
    )
    .unwrap();
    let bin = std::env::var("TOLLGATE_BIN").unwrap_or_else(|_| "target/release/tollgate".into());
    let _gateway = Killed(
        Command::new(&bin)
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot run {bin}: {error}")),
    );
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let base = format!("http://{admin}");
    for _ in 0..600 {
        let ready = client
            .get(format!("{base}/readyz").parse().unwrap())
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false);
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Sign in over HTTP for the server times.
    let login = hyper::Request::post(format!("{base}/console/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(format!("token={TOKEN}"))))
        .unwrap();
    let answer = client.request(login).await.unwrap();
    let cookie = answer.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let customer = {
        let request = hyper::Request::get(format!("{base}/v1/customers?limit=1"))
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Full::default())
            .unwrap();
        let body = client.request(request).await.unwrap().into_body();
        let body: serde_json::Value =
            serde_json::from_slice(&body.collect().await.unwrap().to_bytes()).unwrap();
        body["data"][0]["id"].as_str().unwrap().to_owned()
    };
    let pages = [
        (
            "overview",
            "/console/?from=2025-02-01&to=2025-02-28".to_owned(),
        ),
        ("customers", "/console/customers".to_owned()),
        ("customer", format!("/console/customers/{customer}")),
        ("keys", "/console/keys".to_owned()),
        ("billing", "/console/billing?period=2025-02".to_owned()),
        ("webhooks", "/console/webhooks".to_owned()),
    ];
    println!("console: database {database}, {runs} runs per page after one warm-up (ms)");
    println!(
        "{:<10} {:>12} {:>12} {:>14} {:>14} {:>9}",
        "page", "server p50", "server p99", "browser p50", "browser p99", "bytes"
    );
    let mut server_times = Vec::new();
    for (name, path) in &pages {
        let mut samples = Vec::new();
        let mut bytes = 0;
        for run in 0..=runs {
            let request = hyper::Request::get(format!("{base}{path}"))
                .header("cookie", &cookie)
                .body(Full::default())
                .unwrap();
            let started = Instant::now();
            let answer = client.request(request).await.unwrap();
            assert!(answer.status().is_success(), "{path}: {}", answer.status());
            bytes = answer.into_body().collect().await.unwrap().to_bytes().len();
            if run > 0 {
                samples.push(started.elapsed());
            }
        }
        server_times.push((name, percentiles(samples), bytes));
    }

    // The same pages in the browser: sign in, then load each.
    let driver_port = free_port();
    let _driver = Killed(
        Command::new("chromedriver")
            .arg(format!("--port={driver_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver"),
    );
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".to_owned(),
        serde_json::json!({"binary": "/usr/bin/chromium", "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking", "--disable-component-update", "--no-first-run",
            "--disable-sync", "--window-size=1280,1000"]}),
    );
    let mut browser = None;
    for _ in 0..50 {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        if let Ok(client) = ClientBuilder::new(connector)
            .capabilities(capabilities.clone())
            .connect(&format!("http://127.0.0.1:{driver_port}"))
            .await
        {
            browser = Some(client);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let browser = browser.expect("a browser session");
    browser
        .goto(&format!("{base}/console/login"))
        .await
        .unwrap();
    browser
        .find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(TOKEN)
        .await
        .unwrap();
    browser
        .find(Locator::Css("form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    for ((name, path), (_, (server_p50, server_p99), bytes)) in pages.iter().zip(&server_times) {
        let mut samples = Vec::new();
        for run in 0..=runs {
            browser.goto(&format!("{base}{path}")).await.unwrap();
            let took = browser
                .execute(
                    "const t = performance.getEntriesByType('navigation')[0]; \
                     return t.loadEventEnd - t.startTime;",
                    vec![],
                )
                .await
                .unwrap()
                .as_f64()
                .unwrap();
            if run > 0 {
                samples.push(Duration::from_secs_f64(took / 1e3));
            }
        }
        let (p50, p99) = percentiles(samples);
        println!(
            "{name:<10} {server_p50:>12.1} {server_p99:>12.1} {p50:>14.1} {p99:>14.1} {bytes:>9}"
        );
    }
    browser.close().await.unwrap();
    let css =
        std::fs::metadata("crates/tollgate-console/assets/console.css").map_or(0, |m| m.len());
    let js = std::fs::metadata("crates/tollgate-console/assets/console.js").map_or(0, |m| m.len());
    println!("assets in the binary: stylesheet {css} bytes, script {js} bytes (templates compiled into code)");
}
