//! The real binary: graceful shutdown on SIGTERM, streaming memory bound,
//! `check-config` exit codes.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::{BodyExt, Full};

fn serve_config(upstream: &str, extra_server: &str) -> String {
    format!(
        r#"
[[tiers]]
name = "test"

[server]
listen = "LISTEN"
admin_listen = "ADMIN"
{extra_server}

[[routes]]
name = "mock"
prefix = "/"
upstream = "{upstream}"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let mock = MockUpstream::start().await.unwrap();
    // One worker: the runtime is then the main thread's own (current
    // thread), and draining must work on it as on many.
    let mut gw = Process::serve(&serve_config(&mock.url(), "worker_threads = 1"));

    let health = get(&format!("http://{}/healthz", gw.admin)).await;
    assert_eq!(health.status, StatusCode::OK);

    let response = client()
        .request(
            gw.request(http::Method::POST, "/v1/chat/completions")
                .header("x-mock-chunks", "5")
                .header("x-mock-chunk-delay-ms", "200")
                .body(Full::new(Bytes::from_static(
                    br#"{"stream":true,"messages":[{"role":"user","content":"drain me"}]}"#,
                )))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());

    gw.signal("TERM");
    // New connections are refused once the listener is closed.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if tokio::net::TcpStream::connect(gw.addr).await.is_err() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the listener stayed open after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The stream in flight still completes.
    let rest = body
        .collect()
        .await
        .expect("in-flight stream completes")
        .to_bytes();
    let text = String::from_utf8_lossy(&rest);
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    let status = tokio::task::spawn_blocking(move || gw.child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "graceful shutdown exits 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_megabytes_stream_through_without_growing_memory() {
    const SIZE: u64 = 50 * 1024 * 1024;
    let mock = MockUpstream::start().await.unwrap();
    let gw = Process::serve(&serve_config(&mock.url(), r#"max_request_body = "64MiB""#));

    // Warm up: pools, buffers, allocator arenas.
    for _ in 0..3 {
        let reply = send(
            &client(),
            gw.request(http::Method::GET, "/bytes/1048576")
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(reply.body.len(), 1_048_576);
    }
    let before = gw.status_kib("VmHWM");

    // Download 50 MB, reading slowly enough that the gateway must apply
    // back-pressure rather than buffer.
    let response = client()
        .request(
            gw.request(http::Method::GET, &format!("/bytes/{SIZE}"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = response.into_body();
    let mut received = 0u64;
    let mut frames = 0u32;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received += data.len() as u64;
            frames += 1;
            if frames.is_multiple_of(64) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    assert_eq!(received, SIZE);

    // Upload 50 MB in 64 KiB chunks.
    let (mut sender, upload) = http_body_util::channel::Channel::<Bytes>::new(2);
    tokio::spawn(async move {
        let chunk = Bytes::from(vec![7u8; 64 * 1024]);
        for _ in 0..(SIZE / (64 * 1024)) {
            sender.send_data(chunk.clone()).await.unwrap();
        }
    });
    let streaming: hyper_util::client::legacy::Client<_, _> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let response = streaming
        .request(
            gw.request(http::Method::POST, "/sink")
                .body(upload)
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let json: serde_json::Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(json["bytes"], SIZE);

    let after = gw.status_kib("VmHWM");
    let growth_kib = after.saturating_sub(before);
    eprintln!("gateway peak RSS: {before} KiB before, {after} KiB after 2 x 50 MB");
    assert!(
        growth_kib < 8 * 1024,
        "peak RSS grew by {growth_kib} KiB while streaming 100 MB"
    );
}

#[test]
fn check_config_accepts_the_example_and_the_quick_start() {
    let root = env!("CARGO_MANIFEST_DIR");
    for file in ["config/tollgate.example.toml", "config/tollgate.toml"] {
        let output = Command::new(binary())
            .args(["check-config", "--config"])
            .arg(format!("{root}/{file}"))
            .env("TOLLGATE_ADMIN_TOKEN", "t")
            .env("OPENAI_API_KEY", "k")
            .output()
            .unwrap();
        assert_eq!(
            output.status.code(),
            Some(0),
            "{file}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("ok"), "{stdout}");
    }
}

#[test]
fn check_config_reports_file_line_and_field_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[server]\nlisten = \"127.0.0.1:8080\"\n\n[[routes]]\nname = \"a\"\nprefix = \"/\"\nupstream = \"http://x\"\ntimeout = \"5 parsecs\"\n",
            ":8:",
            "routes[0].timeout",
        ),
        ("[server]\nlisten = \"127.0.0.1:8080\"\nbogus = 1\n", ":3:", "bogus"),
        (
            "[admin]\ntokens = [\"${TOLLGATE_TEST_SURELY_UNSET_VAR}\"]\n",
            ":2:",
            "TOLLGATE_TEST_SURELY_UNSET_VAR",
        ),
    ];
    for (i, (text, line, field)) in cases.into_iter().enumerate() {
        let path = write_file(dir.path(), &format!("bad{i}.toml"), text);
        let output = Command::new(binary())
            .arg("check-config")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "case {i}: {stderr}");
        assert!(
            stderr.contains(&format!("bad{i}.toml{line}")),
            "case {i}: {stderr}"
        );
        assert!(stderr.contains(field), "case {i}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }

    let missing = Command::new(binary())
        .args(["check-config", "--config", "/nonexistent/tollgate.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/tollgate.toml"));
}

#[test]
fn migrate_applies_once_and_customers_commands_work() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(
        dir.path(),
        "tollgate.toml",
        &format!(
            "[database]\nurl = \"sqlite://{}/db/tollgate.db\"\n\n[[tiers]]\nname = \"free\"\n\n[[tiers]]\nname = \"pro\"\n",
            dir.path().display()
        ),
    );
    let (code, first, stderr) = cli(&config, &["migrate"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(first.contains("7 migrations applied"), "{first}");
    let (code, second, _) = cli(&config, &["migrate"]);
    assert_eq!(code, 0);
    assert!(second.contains("0 migrations applied"), "{second}");

    let created = cli_json(
        &config,
        &["customers", "create", "acme", "--tier", "free", "--json"],
    );
    assert_eq!(created["name"], "acme");
    assert_eq!(created["tier"], "free");
    let moved = cli_json(&config, &["customers", "set-tier", "acme", "pro", "--json"]);
    assert_eq!(moved["tier"], "pro");
    assert_eq!(moved["id"], created["id"]);
    let (code, table, _) = cli(&config, &["customers", "list"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("TIER"),
        "{table}"
    );
    assert!(
        lines[1].contains("acme") && lines[1].contains("pro"),
        "{table}"
    );

    let (code, _, stderr) = cli(&config, &["customers", "set-tier", "acme", "gold"]);
    assert_eq!(code, 2, "an unknown tier is a usage error");
    assert!(
        stderr.contains("gold") && stderr.contains("free, pro"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let (code, _, stderr) = cli(&config, &["customers", "set-tier", "nobody", "pro"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("nobody"), "{stderr}");
}
