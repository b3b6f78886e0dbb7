//! Logs (docs/CLI.md): with `--log-format json` every stderr line is one JSON
//! object; the access log has one line per request with the fields
//! operators need; and no key, valid or not, is ever written.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::Full;
use serde_json::Value;

#[test]
fn json_logs_parse_and_never_carry_a_key() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(MockUpstream::start()).unwrap();
    let toml = format!(
        r#"
[server]
listen = "LISTEN"
admin_listen = "ADMIN"
access_log = true

[[tiers]]
name = "t"
rate = "3/min"

[[routes]]
name = "llm"
prefix = "/v1/"
upstream = "{}"
usage = "openai"

[[routes]]
name = "dead"
prefix = "/dead/"
upstream = "http://127.0.0.1:1"
"#,
        upstream.url()
    );
    // Debug level everywhere: the most a production operator would turn on.
    let process = Process::serve_logged(&toml, "debug");
    let key = process.key.clone().unwrap();
    // A second key, revoked before use.
    let created = Command::new(binary())
        .args([
            "--config",
            "tollgate.toml",
            "keys",
            "create",
            "--customer",
            "test",
            "--json",
        ])
        .current_dir(process.dir.path())
        .output()
        .unwrap();
    assert!(created.status.success());
    let revoked: Value = serde_json::from_slice(&created.stdout).unwrap();
    let revoked_key = revoked["key"].as_str().unwrap().to_owned();
    let done = Command::new(binary())
        .args(["--config", "tollgate.toml", "keys", "revoke"])
        .arg(revoked["id"].as_str().unwrap())
        .current_dir(process.dir.path())
        .output()
        .unwrap();
    assert!(done.status.success());
    // A key-shaped string that is not a key (bad checksum).
    let forged = format!(
        "{}{}",
        &key[..key.len() - 1],
        if key.ends_with('A') { 'B' } else { 'A' }
    );

    let send_with = |path: &str, header: &str, value: &str, request_id: &str| {
        runtime.block_on(async {
            send(
                &client(),
                http::Request::builder()
                    .method(Method::POST)
                    .uri(process.url(path))
                    .header(header, value)
                    .header("x-request-id", request_id)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(
                        br#"{"model":"m","messages":[{"role":"user","content":"secret prompt words"}]}"#,
                    )))
                    .unwrap(),
            )
            .await
            .status
        })
    };
    let bearer = format!("Bearer {key}");
    assert_eq!(
        send_with("/v1/chat/completions", "authorization", &bearer, "req-ok"),
        StatusCode::OK
    );
    assert_eq!(
        send_with("/v1/chat/completions", "x-api-key", &key, "req-ok-2"),
        StatusCode::OK
    );
    assert_eq!(
        send_with("/dead/x", "authorization", &bearer, "req-dead"),
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(
        send_with(
            "/v1/chat/completions",
            "authorization",
            &bearer,
            "req-limited"
        ),
        StatusCode::TOO_MANY_REQUESTS
    );
    let revoked_bearer = format!("Bearer {revoked_key}");
    assert_eq!(
        send_with(
            "/v1/chat/completions",
            "authorization",
            &revoked_bearer,
            "req-revoked"
        ),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send_with(
            "/v1/chat/completions",
            "authorization",
            &format!("Bearer {forged}"),
            "req-forged"
        ),
        StatusCode::UNAUTHORIZED
    );
    process.signal("TERM");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !process
        .logs()
        .iter()
        .any(|line| line.contains("\"Stopped.\""))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway did not stop"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let lines = process.logs();
    assert!(lines.len() > 10, "{lines:?}");
    let mut access = Vec::new();
    for line in &lines {
        let entry: Value =
            serde_json::from_str(line).unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
        assert!(entry["timestamp"].is_string(), "{line}");
        assert!(entry["level"].is_string(), "{line}");
        assert!(
            entry["message"].is_string() || entry["message"].is_null(),
            "{line}"
        );
        for secret in [&key, &revoked_key, &forged] {
            // The whole key, and its secret part without the public prefix.
            assert!(!line.contains(secret.as_str()), "a key leaked: {line}");
            assert!(
                !line.contains(&secret[10..]),
                "a key's secret part leaked: {line}"
            );
        }
        assert!(
            !line.contains("secret prompt words"),
            "a body leaked: {line}"
        );
        if entry["target"] == "tollgate::access" {
            access.push(entry);
        }
    }
    let by_id = |id: &str| {
        access
            .iter()
            .find(|entry| entry["request_id"] == id)
            .unwrap_or_else(|| panic!("no access line for {id}: {access:?}"))
    };
    for (id, route, status, outcome) in [
        ("req-ok", "llm", 200, "ok"),
        ("req-ok-2", "llm", 200, "ok"),
        ("req-dead", "dead", 502, "upstream_error"),
        ("req-limited", "llm", 429, "rate_limited"),
        ("req-revoked", "llm", 401, "auth_failed"),
        ("req-forged", "llm", 401, "auth_failed"),
    ] {
        let entry = by_id(id);
        assert_eq!(entry["route"], route, "{entry}");
        assert_eq!(entry["status"], status, "{entry}");
        assert_eq!(entry["outcome"], outcome, "{entry}");
        assert_eq!(entry["method"], "POST", "{entry}");
        assert!(entry["latency_us"].as_u64().unwrap() > 0, "{entry}");
        assert_eq!(entry["level"], "INFO");
    }
    assert_eq!(access.len(), 6, "one line per request: {access:?}");
    assert!(by_id("req-ok")["upstream_latency_us"].as_u64().unwrap() > 0);
    drop(upstream);
}

/// An upstream that compresses its answer although the gateway asked it
/// not to: the body's usage is out of sight, which the operator hears of
/// as a warning naming the route, at most once a second however many
/// answers come that way.
#[test]
fn a_compressed_answer_is_a_warning_at_most_once_a_second() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(MockUpstream::start()).unwrap();
    let toml = format!(
        r#"
[server]
listen = "LISTEN"
admin_listen = "ADMIN"

[[tiers]]
name = "t"

[[routes]]
name = "llm"
prefix = "/v1/"
upstream = "{}"
usage = "openai"
"#,
        upstream.url()
    );
    let process = Process::serve_logged(&toml, "info");
    let key = process.key.clone().unwrap();
    let started = std::time::Instant::now();
    for _ in 0..5 {
        let status = runtime.block_on(async {
            let request = authorized(
                Method::POST,
                process.url("/v1/chat/completions"),
                Some(&key),
            )
            .header("content-type", "application/json")
            .header("x-mock-header", "content-encoding: gzip")
            .body(Full::new(Bytes::from_static(
                br#"{"model":"m","messages":[{"role":"user","content":"a b"}]}"#,
            )))
            .unwrap();
            send(&client(), request).await.status
        });
        assert_eq!(status, StatusCode::OK);
    }
    let seconds = started.elapsed().as_secs();
    let warned = || -> Vec<Value> {
        process
            .logs()
            .iter()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|entry| {
                entry["message"]
                    .as_str()
                    .is_some_and(|message| message.contains("compressed"))
            })
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while warned().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let lines = warned();
    assert!(!lines.is_empty(), "no warning: {:?}", process.logs());
    // Five answers within `seconds`: a line for each second they spanned.
    assert!(
        lines.len() as u64 <= seconds + 1,
        "{} lines in {seconds} s: {lines:?}",
        lines.len()
    );
    for line in &lines {
        assert_eq!(line["level"], "WARN", "{line}");
        assert_eq!(line["route"], "llm", "{line}");
    }
    drop(upstream);
}

#[test]
fn a_short_admin_token_is_a_warning_at_start_that_never_shows_it() {
    let process = Process::serve(
        "[server]\nlisten = \"LISTEN\"\nadmin_listen = \"ADMIN\"\n\n[admin]\ntokens = [\"letmein\", \"0123456789abcdef0123456789abcdef\"]\n",
    );
    let logs = process.logs().join("\n");
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("short enough to be guessed"))
        .collect();
    assert_eq!(warnings.len(), 1, "{logs}");
    assert!(warnings[0].contains("admin.tokens[0]"), "{}", warnings[0]);
    assert!(!logs.contains("letmein"), "{logs}");
}
