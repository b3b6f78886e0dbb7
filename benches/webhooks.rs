//! Budget alerts, measured on the release binary (`TOLLGATE_BIN`, default
//! the bench build's `tollgate`) with a receiver that verifies every
//! signature:
//!
//! - `latency` (the default): 1,000 customers each cross their tier's 50 %
//!   alert with one request, paced 10 ms apart; for each, the time from the
//!   crossing request's answer to the receiver's 200 for its
//!   `quota.threshold`. Median, p99 and max.
//! - `down` (`WEBHOOK_BENCH=down`, `MINUTES`, default 10): the endpoint
//!   answers 503 throughout while 2,000 customers run through four alert
//!   fractions and their quota (10,000 events, every delivery failing and
//!   retried), and 16 connections keep the data plane busy. The gateway's
//!   resident memory is sampled every 10 s.
//!
//! Both run on SQLite, or on the Postgres database named by `DATABASE`
//! (a `postgres://` URL; it is used as it is).
//!
//! Run: `cargo bench --bench webhooks` and
//! `WEBHOOK_BENCH=down cargo bench --bench webhooks`.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_mock::WebhookReceiver;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

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

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn chat(client: &HttpClient, port: u16, key: &str) -> u16 {
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let request = http::Request::post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    match client.request(request).await {
        Ok(response) => {
            let status = response.status().as_u16();
            let _ = response.into_body().collect().await;
            status
        }
        Err(_) => 0,
    }
}

async fn scrape(client: &HttpClient, port: u16, name: &str) -> f64 {
    let request = http::Request::get(format!("http://127.0.0.1:{port}/metrics"))
        .body(Full::default())
        .unwrap();
    let body = client
        .request(request)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

struct Gateway {
    process: Killed,
    port: u16,
    admin_port: u16,
    _dir: tempfile::TempDir,
}

/// Starts the gateway with `tiers`, after making `customers` customers of
/// tier `tiny` with a key each (returned by name), and one `bench` key.
async fn gateway(
    upstream: &str,
    hook: &str,
    tiny: &str,
    customers: usize,
) -> (Gateway, Vec<(String, String)>, String) {
    let dir = tempfile::tempdir().unwrap();
    let database = std::env::var("DATABASE")
        .unwrap_or_else(|_| format!("sqlite://{}/tollgate.db", dir.path().display()));
    let (port, admin_port) = (free_port(), free_port());
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"

[database]
url = "{database}"

[usage]
spool_dir = "{spool}"
flush_interval = "50ms"

[[tiers]]
name = "bench"

[[tiers]]
name = "tiny"
{tiny}

[[routes]]
name = "openai"
prefix = "/v1/"
upstream = "{upstream}"
usage = "openai"

[[webhooks]]
url = "{hook}"
secret = "{SECRET}"
events = ["quota.threshold", "quota.exhausted"]
"#,
        spool = dir.path().join("spool").display(),
    );
    let path = dir.path().join("tollgate.toml");
    std::fs::write(&path, &toml).unwrap();
    let config = tollgate::config::Config::load(&path).unwrap();
    let store = tollgate::app::open_store(&config).await.unwrap();
    let accounts = tollgate::snapshot::accounts_for(&config, store);
    let request = |customer: String, tier: &str| tollgate_accounts::KeyRequest {
        customer,
        tier: Some(tier.to_owned()),
        ..Default::default()
    };
    let mut keys = Vec::with_capacity(customers);
    for n in 0..customers {
        let name = format!("c{n:05}");
        let created = accounts
            .create_key(request(name.clone(), "tiny"))
            .await
            .unwrap();
        keys.push((name, created.key));
    }
    let plenty = accounts
        .create_key(request("load".into(), "bench"))
        .await
        .unwrap()
        .key;
    let bin =
        std::env::var("TOLLGATE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tollgate").to_owned());
    let process = Killed(
        Command::new(bin)
            .args(["--config", path.to_str().unwrap(), "serve"])
            .env("RUST_LOG", "error")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (
        Gateway {
            process,
            port,
            admin_port,
            _dir: dir,
        },
        keys,
        plenty,
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

async fn latency(upstream: &str, client: &HttpClient) {
    const EVENTS: usize = 1000;
    let receiver = WebhookReceiver::start(SECRET).await.unwrap();
    let (gw, keys, _) = gateway(
        upstream,
        &receiver.url(),
        "monthly_requests = 2\nalerts = [0.5]",
        EVENTS,
    )
    .await;
    let mut crossed: HashMap<String, Instant> = HashMap::with_capacity(EVENTS);
    for (name, key) in &keys {
        assert_eq!(chat(client, gw.port, key).await, 200);
        crossed.insert(name.clone(), Instant::now());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let got = receiver
        .wait_for(EVENTS, Duration::from_secs(120))
        .await
        .unwrap();
    let mut latencies: Vec<Duration> = got
        .iter()
        .map(|event| {
            let customer = event.body["data"]["customer"].as_str().unwrap();
            event
                .received_at
                .saturating_duration_since(crossed[customer])
        })
        .collect();
    latencies.sort();
    let invalid = receiver.received().iter().filter(|r| !r.valid).count();
    println!(
        "webhook delivery latency, threshold crossing to the receiver's 200, {} events: \
         median {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} deliveries in all, {invalid} badly signed)",
        latencies.len(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3,
        receiver.received().len(),
    );
    drop(gw);
}

async fn endpoint_down(upstream: &str, client: &HttpClient) {
    const CUSTOMERS: usize = 2000;
    let minutes: u64 = std::env::var("MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(10);
    let receiver = WebhookReceiver::start(SECRET).await.unwrap();
    receiver.set_down(true);
    let (gw, keys, plenty) = gateway(
        upstream,
        &receiver.url(),
        "monthly_requests = 4\nalerts = [0.25, 0.5, 0.75, 1.0]",
        CUSTOMERS,
    )
    .await;
    let pid = gw.process.0.id();
    let started = Instant::now();
    let until = started + Duration::from_secs(minutes * 60);
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    // The data plane under load all along.
    let mut load = Vec::new();
    for _ in 0..16 {
        let (client, key, stop, served, port) = (
            client.clone(),
            plenty.clone(),
            stop.clone(),
            served.clone(),
            gw.port,
        );
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if chat(&client, port, &key).await == 200 {
                    served.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // Every tiny customer through its four fractions and its quota, in
    // the first minute: 10,000 events whose deliveries all fail.
    let crossings = {
        let (client, port) = (client.clone(), gw.port);
        tokio::spawn(async move {
            for (_, key) in &keys {
                for _ in 0..5 {
                    chat(&client, port, key).await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    println!("endpoint down for {minutes} min under load: gateway RSS every 10 s");
    let first = rss_kib(pid);
    let mut peak = first;
    let mut last_served = 0;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let rss = rss_kib(pid);
        peak = peak.max(rss);
        let total = served.load(Ordering::Relaxed);
        let failed = scrape(
            client,
            gw.admin_port,
            "tollgate_webhook_deliveries_total{event=\"quota",
        )
        .await;
        let pending = scrape(client, gw.admin_port, "tollgate_webhook_pending").await;
        println!(
            "  {:>4} s  RSS {:>7} KiB  load {:>6.0} req/s  attempts {failed:>6}  pending {pending:>6}",
            started.elapsed().as_secs(),
            rss,
            (total - last_served) as f64 / 10.0,
        );
        last_served = total;
    }
    stop.store(true, Ordering::Relaxed);
    crossings.await.unwrap();
    for task in load {
        task.await.unwrap();
    }
    let end = rss_kib(pid);
    println!(
        "RSS: {first} KiB at start (customers loaded, before load), peak {peak} KiB, {end} KiB at the end; \
         {} requests served; the receiver refused {} attempts",
        served.load(Ordering::Relaxed),
        receiver.received().len(),
    );
    drop(gw);
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken from argv.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // The mock upstream that keeps no log of requests (a long run
        // sends millions).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(tollgate_mock::serve(listener, std::future::pending()));
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        match std::env::var("WEBHOOK_BENCH").as_deref() {
            Ok("down") => endpoint_down(&upstream, &client).await,
            _ => latency(&upstream, &client).await,
        }
    });
}
