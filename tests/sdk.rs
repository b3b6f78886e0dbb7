//! The official client SDKs against the gateway's own errors: each must
//! raise the exception class its users catch. The SDKs are Python
//! packages; the test command installs them (`scripts/test`).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

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
