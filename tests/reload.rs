//! Hot reload (`POST /v1/reload` in docs/ADMIN-API.md, SIGHUP): routes, tiers and
//! pricing change for new requests; a bad file changes nothing; a request
//! in flight finishes on the config it started with.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tollgate::config::Config;

/// A config file in `dir` with `routes_and_more` after the fixed part
/// (listeners on port 0, the database and spool in `dir`).
fn write_config(dir: &Path, body: &str) {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
instance_id = "reload-test"

[admin]
tokens = ["admin-test-token"]

[database]
url = "sqlite://{dir}/tollgate.db"

[usage]
spool_dir = "{dir}/spool"
flush_interval = "50ms"

{body}
"#,
        dir = dir.display()
    );
    std::fs::write(dir.join("tollgate.toml"), text).unwrap();
}

fn first(upstream: &str) -> String {
    format!(
        r#"
[[tiers]]
name = "t"

[[routes]]
name = "a"
prefix = "/a/"
upstream = "{upstream}"
strip_prefix = true
usage = "openai"

[pricing."m"]
input = 1.0
output = 1.0
"#
    )
}

/// A gateway on the file [`first`] writes into its own directory, and that
/// directory's path.
async fn start(mock: &MockUpstream) -> (TestGateway, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &first(&mock.url()));
    let config = Config::load(&dir.path().join("tollgate.toml")).unwrap();
    let path = dir.path().to_owned();
    (TestGateway::start_on(config, Some(dir)).await, path)
}

async fn reload(gw: &TestGateway) -> Reply {
    admin(gw, Method::POST, "/v1/reload", None).await
}

#[tokio::test]
async fn reload_applies_routes_tiers_and_prices_and_refuses_a_bad_file() {
    let mock = MockUpstream::start().await.unwrap();
    let (gw, path) = start(&mock).await;

    // Unchanged file: nothing changed, nothing to restart.
    let reply = reload(&gw).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let empty = json!({"added": [], "removed": [], "changed": []});
    assert_eq!(
        reply.json(),
        json!({"changed": {"routes": empty, "tiers": empty, "pricing": empty}, "restart_required": []})
    );
    assert_eq!(gw.get("/b/echo").await.status, StatusCode::NOT_FOUND);

    // A new route, a quota on the tier, a new price and a changed one, and
    // a setting that needs a restart.
    write_config(
        &path,
        &format!(
            r#"
[[tiers]]
name = "t"
monthly_requests = 3

[[routes]]
name = "a"
prefix = "/a/"
upstream = "{upstream}"
strip_prefix = true
usage = "openai"

[[routes]]
name = "b"
prefix = "/b/"
upstream = "{upstream}"
strip_prefix = true

[pricing."m"]
input = 2.0
output = 1.0

[pricing."n"]
input = 1.0
output = 1.0
"#,
            upstream = mock.url()
        ),
    );
    // And a [usage] setting, which needs a restart.
    let text = std::fs::read_to_string(path.join("tollgate.toml")).unwrap();
    std::fs::write(
        path.join("tollgate.toml"),
        text.replace("flush_interval = \"50ms\"", "flush_interval = \"60ms\""),
    )
    .unwrap();
    let reply = reload(&gw).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(
        reply.json(),
        json!({
            "changed": {
                "routes": {"added": ["b"], "removed": [], "changed": []},
                "tiers": {"added": [], "removed": [], "changed": ["t"]},
                "pricing": {"added": ["n"], "removed": [], "changed": ["m"]},
            },
            "restart_required": ["usage"],
        })
    );
    assert_eq!(gw.get("/b/echo").await.status, StatusCode::OK);
    // The quota of 3 now applies (one request above already counted).
    assert_eq!(gw.get("/a/echo").await.status, StatusCode::OK);
    assert_eq!(gw.get("/b/echo").await.status, StatusCode::OK);
    let refused = gw.get("/b/echo").await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.error_type(), "quota_exceeded");
    // New keys may name the new route.
    let key = admin(
        &gw,
        Method::POST,
        "/v1/keys",
        Some(json!({"customer": "test", "routes": ["b"]})),
    )
    .await;
    assert_eq!(key.status, StatusCode::CREATED, "{:?}", key.body);

    // A bad file: 400 naming file, line and field; nothing changes.
    let text = std::fs::read_to_string(path.join("tollgate.toml")).unwrap();
    let bad = text.replace(
        "monthly_requests = 3",
        "monthly_requests = 3\nmonthly_reqests = 4",
    );
    std::fs::write(path.join("tollgate.toml"), &bad).unwrap();
    let reply = reload(&gw).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error_type(), "invalid_request");
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    let line = bad
        .lines()
        .position(|line| line.starts_with("monthly_reqests"))
        .unwrap()
        + 1;
    assert!(
        message.contains(&format!("tollgate.toml:{line}")) && message.contains("monthly_reqests"),
        "{message}"
    );
    // Still the last good config: route b served, quota still enforced.
    assert_eq!(
        gw.get("/b/echo").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let (status, _) = quota_limit(&gw).await;
    assert_eq!(status, Some(3));

    // Removing a tier a customer is on would block that customer: refused.
    std::fs::write(path.join("tollgate.toml"), &text).unwrap();
    let without_t = text.replace(
        "[[tiers]]\nname = \"t\"\nmonthly_requests = 3\n",
        "[[tiers]]\nname = \"u\"\n",
    );
    assert_ne!(without_t, text);
    std::fs::write(path.join("tollgate.toml"), &without_t).unwrap();
    let reply = reload(&gw).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("tier \"t\" is removed but 1 customer(s) are on it"),
        "{message}"
    );
    assert_eq!(
        gw.get("/b/echo").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );

    // No file at all is refused too.
    std::fs::remove_file(path.join("tollgate.toml")).unwrap();
    let reply = reload(&gw).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        gw.get("/b/echo").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    gw.stop().await;
}

/// The test customer's `monthly_requests` limit, from `/v1/quota`.
async fn quota_limit(gw: &TestGateway) -> (Option<u64>, Value) {
    let reply = admin(gw, Method::GET, "/v1/quota/test", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();
    (body["limits"]["monthly_requests"]["limit"].as_u64(), body)
}

#[tokio::test]
async fn a_request_in_flight_finishes_on_the_config_it_started_with() {
    let mock = MockUpstream::start().await.unwrap();
    let (gw, path) = start(&mock).await;
    let before = Scrape::of(gw.admin).await;

    // A stream of 5 chunks, 150 ms apart, on route a, priced at 1 USD per
    // million tokens each way.
    let request = gw
        .request(Method::POST, "/a/v1/chat/completions")
        .header("content-type", "application/json")
        .header("x-mock-chunks", "5")
        .header("x-mock-chunk-delay-ms", "150")
        .body(Full::new(Bytes::from(
            json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "one two"}]})
                .to_string(),
        )))
        .unwrap();
    // The stream has started (its first chunk is here) before the reload.
    let response = client().request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut text = String::new();
    while !text.contains("\"content\"") {
        let frame = body.frame().await.unwrap().unwrap();
        text.push_str(std::str::from_utf8(frame.data_ref().unwrap()).unwrap());
    }

    // Meanwhile route a goes away and the price of m quadruples.
    write_config(
        &path,
        &format!(
            r#"
[[tiers]]
name = "t"

[[routes]]
name = "c"
prefix = "/c/"
upstream = "{upstream}"
strip_prefix = true
usage = "openai"

[pricing."m"]
input = 4.0
output = 4.0
"#,
            upstream = mock.url()
        ),
    );
    let reply = reload(&gw).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["changed"]["routes"]["removed"], json!(["a"]));
    assert_eq!(gw.get("/a/echo").await.status, StatusCode::NOT_FOUND);
    assert!(
        !text.contains("[DONE]"),
        "the stream is still running: {text}"
    );
    let rest = body.collect().await.unwrap().to_bytes();
    text.push_str(std::str::from_utf8(&rest).unwrap());
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(text.matches("\"content\"").count(), 5, "{text}");

    // Counted under route a at the old price: (2 + 5) tokens × 1 USD per
    // million = 7,000 nano-USD (the new price would make it 28,000).
    eventually(Duration::from_secs(5), || async {
        let after = Scrape::of(gw.admin).await;
        after.value(
            "tollgate_cost_nanos_total",
            &[("route", "a"), ("model", "m")],
        ) - before.value(
            "tollgate_cost_nanos_total",
            &[("route", "a"), ("model", "m")],
        ) == 7_000.0
    })
    .await;
    // A new request on the new route pays the new price: (2 + 3) × 4.
    let reply = send(
        &client(),
        gw.request(Method::POST, "/c/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                json!({"model": "m", "messages": [{"role": "user", "content": "one two"}]})
                    .to_string(),
            )))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    eventually(Duration::from_secs(5), || async {
        Scrape::of(gw.admin).await.value(
            "tollgate_cost_nanos_total",
            &[("route", "c"), ("model", "m")],
        ) == 20_000.0
    })
    .await;
    gw.stop().await;
}

#[test]
fn sighup_reloads_the_binary_and_a_bad_file_keeps_the_running_config() {
    let mock = tokio::runtime::Runtime::new().unwrap();
    let upstream = mock.block_on(MockUpstream::start()).unwrap();
    let base = format!(
        r#"
[server]
listen = "LISTEN"
admin_listen = "ADMIN"

[[tiers]]
name = "t"

[[routes]]
name = "a"
prefix = "/a/"
upstream = "{}"
strip_prefix = true
"#,
        upstream.url()
    );
    let process = Process::serve(&base);
    let config_path = process.dir.path().join("tollgate.toml");
    let original = std::fs::read_to_string(&config_path).unwrap();
    let status = |path: &str| {
        mock.block_on(async {
            send(
                &client(),
                process
                    .request(Method::GET, path)
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .status
        })
    };
    assert_eq!(status("/a/echo"), StatusCode::OK);
    assert_eq!(status("/b/echo"), StatusCode::NOT_FOUND);

    let with_b = format!(
        "{original}\n[[routes]]\nname = \"b\"\nprefix = \"/b/\"\nupstream = \"{}\"\nstrip_prefix = true\n",
        upstream.url()
    );
    std::fs::write(&config_path, &with_b).unwrap();
    process.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while status("/b/echo") != StatusCode::OK {
        assert!(
            std::time::Instant::now() < deadline,
            "route b never appeared"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let logs = process.logs();
    let reloaded = logs
        .iter()
        .find(|line| line.contains("Config reloaded."))
        .expect("the reload is logged");
    let reloaded: Value = serde_json::from_str(reloaded).unwrap();
    assert!(reloaded["changes"]
        .as_str()
        .unwrap()
        .contains("\"added\":[\"b\"]"));

    std::fs::write(&config_path, format!("{with_b}\n[bogus]\n")).unwrap();
    process.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let failure = loop {
        if let Some(line) = process
            .logs()
            .into_iter()
            .find(|line| line.contains("Config reload failed"))
        {
            break line;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the failure is not logged"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let failure: Value = serde_json::from_str(&failure).unwrap();
    assert_eq!(failure["level"], "ERROR");
    assert!(
        failure["error"].as_str().unwrap().contains("bogus"),
        "{failure}"
    );
    assert_eq!(status("/a/echo"), StatusCode::OK);
    assert_eq!(status("/b/echo"), StatusCode::OK);
    // Still serving after both signals: SIGHUP never stops the gateway.
    drop(process);
    drop(upstream);
}

/// `GET /v1/routes` and `GET /v1/tiers` show the loaded config, in file
/// order, with the values of `set_headers` redacted; a reload replaces
/// them, and a key may then be limited to the new route.
#[tokio::test]
async fn routes_and_tiers_show_the_loaded_config_without_secrets() {
    let mock = MockUpstream::start().await.unwrap();
    let (gw, path) = start(&mock).await;
    let routes = admin(&gw, Method::GET, "/v1/routes", None).await;
    assert_eq!(routes.status, StatusCode::OK, "{:?}", routes.body);
    assert_eq!(
        routes.json(),
        json!({"data": [{
            "name": "a",
            "prefix": "/a/",
            "upstream": format!("{}/", mock.url()),
            "strip_prefix": true,
            "usage": "openai",
            "cost_header": null,
            "input_tokens_header": null,
            "output_tokens_header": null,
            "timeout_ms": 300000,
            "strip_response_headers": [],
            "set_headers": {},
            "ca_file": null,
            "client_cert": null,
        }], "next_cursor": null})
    );
    let tiers = admin(&gw, Method::GET, "/v1/tiers", None).await;
    assert_eq!(
        tiers.json()["data"],
        json!([{
            "name": "t",
            "rate": null,
            "monthly_requests": null,
            "monthly_tokens": null,
            "monthly_cost_usd": null,
            "overage": "block",
            "overage_price_per_request_usd": "0",
            "alerts": [],
        }])
    );
    let unknown = admin(
        &gw,
        Method::POST,
        "/v1/keys",
        Some(json!({"customer": "c", "tier": "t", "routes": ["b"]})),
    )
    .await;
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST);

    write_config(
        &path,
        &format!(
            r#"
[[tiers]]
name = "t"

[[tiers]]
name = "gold"
rate = "10/s"
monthly_cost_usd = 250.5
overage = "bill"
overage_price_per_request_usd = 0.0015

[[routes]]
name = "a"
prefix = "/a/"
upstream = "{upstream}"
strip_prefix = true
usage = "openai"

[[routes]]
name = "b"
prefix = "/b/"
upstream = "{upstream}"
timeout = "5s"
cost_header = "x-cost-usd"
strip_response_headers = ["x-internal"]
[routes.set_headers]
authorization = "Bearer upstream-secret"
"#,
            upstream = mock.url()
        ),
    );
    assert_eq!(reload(&gw).await.status, StatusCode::OK);
    let routes = admin(&gw, Method::GET, "/v1/routes", None).await;
    assert!(
        !String::from_utf8_lossy(&routes.body).contains("upstream-secret"),
        "{:?}",
        routes.body
    );
    let b = &routes.json()["data"][1];
    assert_eq!(
        (&b["name"], &b["timeout_ms"], &b["cost_header"]),
        (&json!("b"), &json!(5000), &json!("x-cost-usd"))
    );
    assert_eq!(b["set_headers"], json!({"authorization": "[redacted]"}));
    assert_eq!(b["strip_response_headers"], json!(["x-internal"]));
    let tiers = admin(&gw, Method::GET, "/v1/tiers", None).await;
    let gold = &tiers.json()["data"][1];
    assert_eq!(
        (
            &gold["name"],
            &gold["rate"],
            &gold["monthly_cost_usd"],
            &gold["overage"],
            &gold["overage_price_per_request_usd"]
        ),
        (
            &json!("gold"),
            &json!("10/s"),
            &json!("250.5"),
            &json!("bill"),
            &json!("0.0015")
        )
    );
    let created = admin(
        &gw,
        Method::POST,
        "/v1/keys",
        Some(json!({"customer": "c", "tier": "gold", "routes": ["b"]})),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
}
