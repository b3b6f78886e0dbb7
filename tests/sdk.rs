//! The official client SDKs against the gateway's own errors: each must
//! raise the exception class its users catch. The SDKs are Python
//! packages; the test command installs them (`scripts/test`).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use time::macros::datetime;
use time::OffsetDateTime;
use tollgate_metering::limits::Clock;

/// Runs `tests/sdk/{script}` with `args`; its stdout, one line per case.
fn python(script: &str, args: &[&str]) -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sdk")
        .join(script);
    let output = std::process::Command::new("python3")
        .arg(path)
        .args(args)
        .output()
        .expect("python3 runs (scripts/test installs what the SDK tests need)");
    assert!(
        output.status.success(),
        "{script} failed (is the SDK installed? scripts/test installs it):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn the_anthropic_sdk_raises_the_matching_exception_for_each_gateway_error() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = TestGateway::start(config(&format!(
        r#"
[[tiers]]
name = "one"
monthly_requests = 1

[[routes]]
name = "anthropic"
prefix = "/anthropic/"
upstream = "{}"
strip_prefix = true
usage = "anthropic"
"#,
        mock.url()
    )))
    .await;
    let base = gw.url("/anthropic");
    let key = gw.key.clone().unwrap();
    let lines = tokio::task::spawn_blocking(move || python("anthropic_errors.py", &[&base, &key]))
        .await
        .unwrap();
    assert_eq!(
        lines,
        [
            "first ok 200 -",
            "over_quota RateLimitError 429 quota_exceeded",
            "bad_key AuthenticationError 401 invalid_api_key",
            "no_route NotFoundError 404 no_route",
        ]
    );
    gw.stop().await;
}

/// The real clock moved to a minute before a month ends: a quota refused
/// now resets in under the two minutes of `Retry-After` the OpenAI SDK
/// waits for, so only `x-should-retry: false` keeps it from retrying.
struct MinuteBeforeMonthEnd(Instant);

impl Clock for MinuteBeforeMonthEnd {
    fn now(&self) -> OffsetDateTime {
        datetime!(2026-11-30 23:59:00 UTC) + self.0.elapsed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_does_not_retry_a_quota_429_and_retries_a_rate_429() {
    let mock = MockUpstream::start().await.unwrap();
    let mut config = config(&format!(
        r#"
[[tiers]]
name = "quota"
monthly_requests = 1
overage = "block"

[[tiers]]
name = "rate"
rate = "1/s"

[[routes]]
name = "openai"
prefix = "/v1/"
upstream = "{}"
usage = "openai"
"#,
        mock.url()
    ));
    // TestGateway makes the key of the first tier; the rate tier's key is
    // made here, before the gateway starts, so its limits apply at once.
    let dir = tempfile::tempdir().unwrap();
    config.database.url = format!("sqlite://{}/tollgate.db", dir.path().display());
    config.usage.spool_dir = dir.path().join("spool");
    let store = tollgate::app::open_store(&config).await.unwrap();
    let rate_key = tollgate::snapshot::accounts_for(&config, store)
        .create_key(tollgate_accounts::KeyRequest {
            customer: "rated".into(),
            tier: Some("rate".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .key;
    let clock = std::sync::Arc::new(MinuteBeforeMonthEnd(Instant::now()));
    let gw = TestGateway::start_on_clock(config, Some(dir), clock).await;
    let base = gw.url("/v1");
    let quota_key = gw.key.clone().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        python("openai_retry.py", &[&base, &quota_key, &rate_key])
    })
    .await
    .unwrap();
    assert_eq!(
        lines,
        [
            "first ok attempts=1 [200]",
            "over_quota RateLimitError attempts=1 [429 quota_exceeded should-retry=false]",
            "rate_first ok attempts=1 [200]",
            "rate_limited ok attempts=2 [429 rate_limited should-retry=true] [200]",
        ]
    );

    // The gateway counted the same five requests: the SDK sent no others.
    let requests = |outcome: &'static str, class: &'static str| async move {
        Scrape::of(gw.admin).await.value(
            "tollgate_requests_total",
            &[
                ("route", "openai"),
                ("status_class", class),
                ("outcome", outcome),
            ],
        )
    };
    eventually(Duration::from_secs(5), || async {
        requests("ok", "2xx").await == 3.0
    })
    .await;
    assert_eq!(requests("quota_exceeded", "4xx").await, 1.0);
    assert_eq!(requests("rate_limited", "4xx").await, 1.0);

    // The quota's Retry-After was one the SDK would have waited for.
    let refused = send(
        &client(),
        gw.request(http::Method::POST, "/v1/chat/completions")
            .header("content-type", "application/json")
            .body(http_body_util::Full::from(r#"{"model":"m","messages":[]}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(refused.error_type(), "quota_exceeded");
    assert_eq!(refused.headers["x-should-retry"], "false");
    let retry_after: u64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=60).contains(&retry_after),
        "Retry-After {retry_after} s: the month ends within the minute"
    );
    gw.stop().await;
}
