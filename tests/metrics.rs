//! `/metrics` (docs/METRICS.md): exact counter deltas after a known mix of
//! requests, and the exposition format checked line by line, and by
//! Prometheus's own `promtool` where it is installed (the test command
//! installs it).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::Full;
use serde_json::json;
use tollgate_store::testing::{Backend, TestGuard};

fn gateway_config(upstream: &str) -> tollgate::config::Config {
    config(&format!(
        r#"
[admin]
tokens = ["admin-test-token"]

[[tiers]]
name = "metered"
rate = "6/min"

[[routes]]
name = "llm"
prefix = "/v1/"
upstream = "{upstream}"
usage = "openai"
cost_header = "x-cost-usd"
timeout = "2s"

[[routes]]
name = "dead"
prefix = "/dead/"
upstream = "http://127.0.0.1:1"

[pricing."gpt-4o-mini"]
input = 0.15
output = 0.60
"#
    ))
}

async fn chat(
    gw: &TestGateway,
    key: Option<&str>,
    model: &str,
    prompt: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut request = authorized(Method::POST, gw.url("/v1/chat/completions"), key)
        .header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let body = json!({"model": model, "messages": [{"role": "user", "content": prompt}]});
    send(
        &client(),
        request
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap(),
    )
    .await
}

/// Sends the head of a JSON chat request that announces 1,000 bytes, 9 of
/// them, and closes the connection.
async fn abort_upload(gw: &TestGateway, key: &str) {
    use tokio::io::AsyncWriteExt as _;
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"model\":"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(stream);
}

tollgate_store::both_backends!(counters_move_by_exactly_what_the_requests_did);

async fn counters_move_by_exactly_what_the_requests_did(backend: Backend) {
    let db = TestGuard::create(backend).await;
    let mock = MockUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = gateway_config(&mock.url());
    config.database.url = db.url().to_owned();
    config.usage.spool_dir = dir.path().join("spool");
    let gw = TestGateway::start_on(config, Some(dir)).await;
    let key = gw.key.clone().unwrap();
    let before = Scrape::of(gw.admin).await;

    // Admitted (the rate allows 6): two priced models, one the dated name
    // of a priced model; one unpriced model with a cost header; one
    // upstream 503; one refused connection.
    type Headers<'a> = &'a [(&'a str, &'a str)];
    let calls: [(&str, &str, Headers, StatusCode); 4] = [
        (
            "gpt-4o-mini-2024-07-18",
            "one two three",
            &[],
            StatusCode::OK,
        ),
        (
            "gpt-4o-mini",
            "hello world",
            &[("x-mock-chunks", "5")],
            StatusCode::OK,
        ),
        (
            "mystery",
            "hi",
            &[("x-mock-cost-usd", "0.01")],
            StatusCode::OK,
        ),
        (
            "gpt-4o-mini",
            "x",
            &[("x-mock-status", "503")],
            StatusCode::SERVICE_UNAVAILABLE,
        ),
    ];
    for (model, prompt, headers, status) in calls {
        let reply = chat(&gw, Some(&key), model, prompt, headers).await;
        assert_eq!(reply.status, status, "{model} {headers:?}");
    }
    let dead = send(
        &client(),
        gw.request(Method::GET, "/dead/x")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(dead.status, StatusCode::BAD_GATEWAY);
    // A client that goes away halfway through its upload (admitted, then
    // its body fails): a client_closed row, not an upstream error.
    abort_upload(&gw, &key).await;
    // Over the rate.
    for _ in 0..2 {
        let reply = chat(&gw, Some(&key), "gpt-4o-mini", "x", &[]).await;
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    }
    // No key, a malformed key, no route; and the self-service path, which
    // is not traffic.
    for _ in 0..2 {
        assert_eq!(
            chat(&gw, None, "m", "x", &[]).await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    let bad = chat(&gw, Some("tg_not-a-key"), "m", "x", &[]).await;
    assert_eq!(bad.status, StatusCode::UNAUTHORIZED);
    assert_eq!(gw.get("/elsewhere").await.status, StatusCode::NOT_FOUND);
    assert_eq!(gw.get("/_tollgate/usage").await.status, StatusCode::OK);
    let anonymous = get(&gw.url("/_tollgate/usage")).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);

    let expected_requests: [(&str, &str, &str, f64); 8] = [
        ("llm", "2xx", "ok", 3.0),
        ("llm", "4xx", "client_closed", 1.0),
        ("llm", "5xx", "ok", 1.0),
        ("dead", "5xx", "upstream_error", 1.0),
        ("llm", "4xx", "rate_limited", 2.0),
        ("llm", "4xx", "auth_failed", 3.0),
        ("", "4xx", "no_route", 1.0),
        ("llm", "2xx", "auth_failed", 0.0),
    ];
    // Rows reach the database within a flush interval or so.
    eventually(Duration::from_secs(10), || async {
        Scrape::of(gw.admin)
            .await
            .value("tollgate_usage_rows_total", &[("result", "written")])
            == 8.0
    })
    .await;
    let after = Scrape::of(gw.admin).await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.value(name, labels)
    };

    for (route, class, outcome, count) in expected_requests {
        let labels = [
            ("route", route),
            ("status_class", class),
            ("outcome", outcome),
        ];
        assert_eq!(
            delta("tollgate_requests_total", &labels),
            count,
            "{labels:?}"
        );
    }
    assert_eq!(
        after.sum("tollgate_requests_total", &[]) - before.sum("tollgate_requests_total", &[]),
        12.0,
        "the self-service requests are not counted"
    );
    assert_eq!(
        delta("tollgate_auth_failures_total", &[("reason", "missing")]),
        2.0
    );
    assert_eq!(
        delta("tollgate_auth_failures_total", &[("reason", "malformed")]),
        1.0
    );
    assert_eq!(
        delta("tollgate_auth_failures_total", &[("reason", "unknown")]),
        0.0
    );
    assert_eq!(
        delta("tollgate_limit_rejections_total", &[("limit", "rate")]),
        2.0
    );
    assert_eq!(
        delta(
            "tollgate_limit_rejections_total",
            &[("limit", "monthly_requests")]
        ),
        0.0
    );
    assert_eq!(
        delta(
            "tollgate_upstream_errors_total",
            &[("route", "dead"), ("kind", "connect")]
        ),
        1.0
    );
    assert_eq!(
        after.sum("tollgate_upstream_errors_total", &[("route", "llm")]),
        0.0
    );
    assert_eq!(
        after.sum("tollgate_upstream_errors_total", &[]),
        1.0,
        "only the refused connection"
    );

    // Tokens: P = words of the prompt, N = chunks (3 by default); the dated
    // model counts under its priced prefix, the unpriced one under `other`.
    let tokens = |model: &str, direction: &str| {
        delta(
            "tollgate_tokens_total",
            &[("route", "llm"), ("model", model), ("direction", direction)],
        )
    };
    assert_eq!(tokens("gpt-4o-mini", "input"), 5.0);
    assert_eq!(tokens("gpt-4o-mini", "output"), 8.0);
    assert_eq!(tokens("other", "input"), 1.0);
    assert_eq!(tokens("other", "output"), 3.0);
    assert_eq!(tokens("gpt-4o-mini", "cache_read"), 0.0);
    // Cost: 5 × 0.15 + 8 × 0.60 USD per million = 5,550 nano-USD; the cost
    // header's 0.01 USD = 10,000,000.
    let cost = |model: &str| {
        delta(
            "tollgate_cost_nanos_total",
            &[("route", "llm"), ("model", model)],
        )
    };
    assert_eq!(cost("gpt-4o-mini"), 5_550.0);
    assert_eq!(cost("other"), 10_000_000.0);
    assert!(!after.text.contains("model=\"mystery\""));

    // Histograms: every counted request is timed; upstream time only for
    // the four that got response headers.
    let count = |name: &str, route: &str| delta(name, &[("route", route)]);
    assert_eq!(
        count("tollgate_request_duration_seconds_count", "llm"),
        10.0
    );
    assert_eq!(
        count("tollgate_request_duration_seconds_count", "dead"),
        1.0
    );
    assert_eq!(count("tollgate_request_duration_seconds_count", ""), 1.0);
    assert_eq!(
        count("tollgate_upstream_duration_seconds_count", "llm"),
        4.0
    );
    assert_eq!(
        count("tollgate_upstream_duration_seconds_count", "dead"),
        0.0
    );

    // The recorder: 7 rows (the admitted five and the two rate-limited).
    assert_eq!(
        delta("tollgate_usage_rows_total", &[("result", "spooled")]),
        8.0
    );
    assert_eq!(
        delta("tollgate_usage_rows_total", &[("result", "failed")]),
        0.0
    );
    assert_eq!(delta("tollgate_usage_batch_rows_sum", &[]), 8.0);
    assert!(delta("tollgate_usage_flush_duration_seconds_count", &[]) >= 1.0);
    assert_eq!(after.value("tollgate_database_up", &[]), 1.0);
    assert_eq!(after.value("tollgate_keys_cached", &[]), 1.0);
    assert_eq!(after.value("tollgate_usage_pending_rows", &[]), 0.0);

    check_exposition(&after.text);
    gw.stop().await;
}

/// The text format, checked the way a scraper reads it: every family has
/// one HELP and one TYPE before its samples; sample names belong to their
/// family (histograms: `_bucket`, `_sum`, `_count`); buckets are cumulative
/// and end in `+Inf` equal to `_count`; only exported names; no unbounded label.
fn check_exposition(text: &str) {
    let mut help = BTreeSet::new();
    let mut types = BTreeMap::new();
    let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut counts = BTreeMap::new();
    for line in text.lines().filter(|line| !line.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(help.insert(name.to_owned()), "HELP twice for {name}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(help.contains(name), "TYPE before HELP for {name}");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(types.insert(name.to_owned(), kind.to_owned()).is_none());
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment: {line}");
        // Panics on a line that is not `name{labels} value`.
        Scrape::parse(format!("{line}\n"));
        let (series, value) = line.rsplit_once(' ').unwrap();
        let name = series.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| types.get(*base).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample before its TYPE: {line}");
        assert!(
            EXPORTED_METRICS.contains(&family),
            "not an exported metric: {family}"
        );
        let value: f64 = value.parse().unwrap();
        assert!(value.is_finite() && value >= 0.0, "{line}");
        assert!(
            !series.contains("customer") && !series.contains("key_id"),
            "{line}"
        );
        let labels_without_le = series
            .split_once('{')
            .map(|(_, labels)| {
                labels
                    .trim_end_matches('}')
                    .split(',')
                    .filter(|label| !label.starts_with("le="))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        let id = format!("{family}{{{labels_without_le}}}");
        if name.ends_with("_bucket") {
            let le = series
                .split("le=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            buckets.entry(id).or_default().push((bound, value));
        } else if name.ends_with("_count") && family != name {
            counts.insert(id, value);
        }
    }
    for name in EXPORTED_METRICS {
        if matches!(
            name,
            "tollgate_upstream_errors_total" | "tollgate_usage_invalid_values_total"
        ) {
            continue; // exposed once one happens (upstream errors: checked above)
        }
        assert!(types.contains_key(name), "{name} is not exposed");
    }
    assert!(!buckets.is_empty());
    for (id, series) in &buckets {
        assert!(
            series
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "{id}: {series:?}"
        );
        let last = series.last().unwrap();
        assert_eq!(last.0, f64::INFINITY, "{id} ends in +Inf");
        assert_eq!(Some(&last.1), counts.get(id), "{id}: +Inf equals _count");
    }
    promtool_check(text);
}

/// `promtool check metrics` (Debian's `prometheus` package), which the test
/// command installs; a plain `cargo test` without it says so and skips
/// only this step.
fn promtool_check(text: &str) {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) if std::env::var_os("CI").is_none() => {
            eprintln!("promtool not run ({error}); the test command installs it");
            return;
        }
        Err(error) => panic!("promtool is required in CI: {error}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn metrics_need_no_token_and_take_only_get() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = TestGateway::start(gateway_config(&mock.url())).await;
    let scrape = Scrape::of(gw.admin).await;
    // Described at start: every exported family that exists before traffic has
    // its HELP line.
    for name in EXPORTED_METRICS {
        if matches!(
            name,
            "tollgate_requests_total"
                | "tollgate_upstream_errors_total"
                | "tollgate_usage_invalid_values_total"
                | "tollgate_cost_nanos_total"
                | "tollgate_tokens_total"
        ) {
            continue; // labelled by what happened; none has yet
        }
        assert!(scrape.text.contains(&format!("# HELP {name} ")), "{name}");
    }
    let post = send(
        &client(),
        http::Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}/metrics", gw.admin))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    gw.stop().await;
}
