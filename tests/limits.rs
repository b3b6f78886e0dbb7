//! Limits end to end: rate windows, monthly quotas (block and bill),
//! budgets from metered cost and tokens, the reservation race, restarts,
//! live tier changes, month rollover on a moved clock, several instances on
//! one Postgres, and the quota views.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::Full;
use serde_json::json;
use time::macros::datetime;
use time::OffsetDateTime;
use tollgate_metering::limits::{Clock, ManualClock, SystemClock};
use tollgate_store::testing::{Backend, TestGuard};

/// A gateway whose key belongs to a customer of tier `tier_toml`'s first
/// tier, on its own database, with the limits on `clock`.
struct Limited {
    db: TestGuard,
    _mock: MockUpstream,
    gateway: TestGateway,
    dir: tempfile::TempDir,
    toml: String,
}

async fn limited(backend: Backend, tiers: &str, clock: Arc<dyn Clock>) -> Limited {
    limited_syncing(backend, tiers, clock, "200ms").await
}

/// [`limited`], the totals read every `sync_interval`.
async fn limited_syncing(
    backend: Backend,
    tiers: &str,
    clock: Arc<dyn Clock>,
    sync_interval: &str,
) -> Limited {
    let db = TestGuard::create(backend).await;
    let mock = MockUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"
[admin]
tokens = ["admin-test-token"]

[database]
url = "{db}"

[usage]
spool_dir = "{spool}"
flush_interval = "20ms"
sync_interval = "{sync_interval}"

{tiers}

[[routes]]
name = "openai"
prefix = "/v1/"
upstream = "{upstream}"
usage = "openai"
cost_header = "x-cost-usd"
"#,
        db = db.url(),
        spool = dir.path().join("spool").display(),
        upstream = mock.url(),
    );
    let gateway = TestGateway::start_on_clock(config(&toml), None, clock).await;
    Limited {
        db,
        _mock: mock,
        gateway,
        dir,
        toml,
    }
}

async fn chat_call(
    gateway: &TestGateway,
    key: &str,
    headers: &[(&str, &str)],
    stream: bool,
) -> Reply {
    send(&client(), chat_request(gateway, key, headers, stream)).await
}

/// A Chat Completions request of five words with `key` and `headers`.
fn chat_request(
    gateway: &TestGateway,
    key: &str,
    headers: &[(&str, &str)],
    stream: bool,
) -> http::Request<Full<Bytes>> {
    let mut request = authorized(Method::POST, gateway.url("/v1/chat/completions"), Some(key))
        .header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let body = json!({"model": "gpt-4o-mini", "stream": stream,
                      "messages": [{"role": "user", "content": "one two three four five"}]});
    request
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// `key`'s own view of its limits and usage (`/_tollgate/usage`).
async fn own_usage(gateway: &TestGateway, key: &str) -> serde_json::Value {
    send(
        &client(),
        authorized(Method::GET, gateway.url("/_tollgate/usage"), Some(key))
            .body(Full::default())
            .unwrap(),
    )
    .await
    .json()
}

fn header(reply: &Reply, name: &str) -> Option<i64> {
    reply
        .headers
        .get(name)
        .map(|value| value.to_str().unwrap().parse().unwrap())
}

/// (limit, remaining, used, reset) from the `x-ratelimit-*` headers.
fn rate_headers(reply: &Reply) -> (i64, i64, i64, i64) {
    (
        header(reply, "x-ratelimit-limit").expect("x-ratelimit-limit"),
        header(reply, "x-ratelimit-remaining").unwrap(),
        header(reply, "x-ratelimit-used").unwrap(),
        header(reply, "x-ratelimit-reset").unwrap(),
    )
}

const NOW: OffsetDateTime = datetime!(2026-11-29 12:00:00 UTC);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_window_and_its_headers_are_exact() {
    let clock = Arc::new(ManualClock::new(NOW));
    let l = limited(
        Backend::Sqlite,
        "[[tiers]]\nname = \"t\"\nrate = \"3/min\"",
        clock.clone(),
    )
    .await;
    let key = l.gateway.key.clone().unwrap();
    let now = NOW.unix_timestamp();
    for used in 1..=3 {
        let reply = chat_call(&l.gateway, &key, &[], false).await;
        assert_eq!(reply.status, StatusCode::OK);
        // Three at once from idle; the window is whole again 20 s after
        // each one's emission: 20, 40, 60 s from now.
        assert_eq!(rate_headers(&reply), (3, 3 - used, used, now + 20 * used));
    }
    let refused = chat_call(&l.gateway, &key, &[], false).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.error_type(), "rate_limited");
    assert_eq!(
        header(&refused, "retry-after"),
        Some(20),
        "one emission interval"
    );
    assert_eq!(refused.headers["x-should-retry"], "true", "a rate passes");
    assert_eq!(rate_headers(&refused), (3, 0, 3, now + 60));
    clock.advance(Duration::from_secs(20));
    let again = chat_call(&l.gateway, &key, &[], false).await;
    assert_eq!(
        again.status,
        StatusCode::OK,
        "one slot came back after 20 s"
    );
    assert_eq!(rate_headers(&again), (3, 0, 3, now + 80));
    l.gateway.stop().await;
}

async fn reservation_race(backend: Backend) {
    let clock = Arc::new(ManualClock::new(NOW));
    let l = limited(
        backend,
        "[[tiers]]\nname = \"t\"\nmonthly_requests = 50",
        clock,
    )
    .await;
    let key = l.gateway.key.clone().unwrap();
    let gateway = Arc::new(l.gateway);
    let mut calls = Vec::new();
    for _ in 0..200 {
        let (gateway, key) = (gateway.clone(), key.clone());
        calls.push(tokio::spawn(async move {
            chat_call(&gateway, &key, &[], false).await
        }));
    }
    let mut passed = 0;
    let december = datetime!(2026-12-01 0:00 UTC).unix_timestamp();
    for call in calls {
        let reply = call.await.unwrap();
        match reply.status {
            StatusCode::OK => passed += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(reply.error_type(), "quota_exceeded");
                assert_eq!(
                    header(&reply, "retry-after"),
                    Some(december - NOW.unix_timestamp())
                );
                assert_eq!(reply.headers["x-should-retry"], "false", "not this month");
                assert_eq!(rate_headers(&reply), (50, 0, 50, december));
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(passed, 50, "exactly the remaining 50 pass");
    // Every request has its row: 50 admitted, 150 rejected.
    let gateway = Arc::into_inner(gateway).unwrap();
    gateway.stop().await;
    let totals = daily_totals(&l.db).await;
    assert_eq!(totals, (50, 150));
}

/// (requests, rejected) summed over `usage_daily`.
async fn daily_totals(db: &TestGuard) -> (i64, i64) {
    let row = db
        .raw("SELECT coalesce(sum(requests), 0), coalesce(sum(rejected), 0) FROM usage_daily")
        .await;
    let number = |i: usize| row[0][i].as_deref().unwrap().parse().unwrap();
    (number(0), number(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservation_race_lets_exactly_the_remaining_through_sqlite() {
    reservation_race(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservation_race_lets_exactly_the_remaining_through_postgres() {
    reservation_race(Backend::Postgres).await;
}

async fn restart_keeps_the_count(backend: Backend) {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let l = limited(
        backend,
        "[[tiers]]\nname = \"t\"\nmonthly_requests = 5",
        clock.clone(),
    )
    .await;
    let key = l.gateway.key.clone().unwrap();
    for _ in 0..3 {
        assert_eq!(
            chat_call(&l.gateway, &key, &[], false).await.status,
            StatusCode::OK
        );
    }
    l.gateway.stop().await;
    let mut config = config(&l.toml);
    config.usage.spool_dir = l.dir.path().join("spool");
    let gateway = TestGateway::start_on_clock(config, None, clock).await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(chat_call(&gateway, &key, &[], false).await.status.as_u16());
    }
    assert_eq!(
        statuses,
        [200, 200, 429],
        "3 of 5 were used before the restart"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_month_keeps_the_count_sqlite() {
    restart_keeps_the_count(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_month_keeps_the_count_postgres() {
    restart_keeps_the_count(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_and_bill() {
    let clock = Arc::new(ManualClock::new(NOW));
    let tiers = "[[tiers]]\nname = \"billed\"\nmonthly_requests = 2\noverage = \"bill\"\n\
                 overage_price_per_request_usd = 0.01\n\n\
                 [[tiers]]\nname = \"blocked\"\nmonthly_requests = 2";
    let l = limited(Backend::Sqlite, tiers, clock).await;
    let key = l.gateway.key.clone().unwrap();
    for used in 1..=5 {
        let reply = chat_call(&l.gateway, &key, &[], false).await;
        assert_eq!(reply.status, StatusCode::OK, "bill: requests continue");
        let (limit, remaining, reported, _) = rate_headers(&reply);
        assert_eq!((limit, remaining, reported), (2, 0.max(2 - used), used));
    }
    let patched = admin(
        &l.gateway,
        Method::PATCH,
        "/v1/customers/test",
        Some(json!({"tier": "blocked"})),
    )
    .await;
    assert_eq!(patched.status, StatusCode::OK, "{:?}", patched.body);
    let took = eventually(Duration::from_secs(1), || async {
        chat_call(&l.gateway, &key, &[], false).await.status == StatusCode::TOO_MANY_REQUESTS
    })
    .await;
    eprintln!("the tier change was live after {took:?}");
    let reply = chat_call(&l.gateway, &key, &[], false).await;
    assert_eq!(reply.error_type(), "quota_exceeded");
    l.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_change_and_overrides_take_effect_live() {
    let clock = Arc::new(ManualClock::new(NOW));
    let tiers = "[[tiers]]\nname = \"free\"\nmonthly_requests = 2\n\n\
                 [[tiers]]\nname = \"pro\"\nmonthly_requests = 100";
    let l = limited(Backend::Sqlite, tiers, clock).await;
    let key = l.gateway.key.clone().unwrap();
    for _ in 0..2 {
        assert_eq!(
            chat_call(&l.gateway, &key, &[], false).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        chat_call(&l.gateway, &key, &[], false).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let bad = admin(
        &l.gateway,
        Method::PATCH,
        "/v1/customers/test",
        Some(json!({"overrides": {"monthly_requests": "lots"}})),
    )
    .await;
    assert_eq!(bad.error_type(), "invalid_request");
    assert!(
        bad.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("monthly_requests"),
        "names the field: {}",
        bad.json()
    );
    admin(
        &l.gateway,
        Method::PATCH,
        "/v1/customers/test",
        Some(json!({"tier": "pro"})),
    )
    .await;
    eventually(Duration::from_secs(1), || async {
        chat_call(&l.gateway, &key, &[], false).await.status == StatusCode::OK
    })
    .await;
    // An override lowers the pro quota back below what is used.
    admin(
        &l.gateway,
        Method::PATCH,
        "/v1/customers/test",
        Some(json!({"overrides": {"monthly_requests": 4}})),
    )
    .await;
    eventually(Duration::from_secs(1), || async {
        let reply = chat_call(&l.gateway, &key, &[], false).await;
        reply.status == StatusCode::TOO_MANY_REQUESTS && rate_headers(&reply).0 == 4
    })
    .await;
    l.gateway.stop().await;
}

/// Budgets are settled when responses end: requests admitted together
/// must not all pass a budget with a little left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_at_once_cannot_spend_past_a_budget() {
    let clock = Arc::new(ManualClock::new(NOW));
    let tiers = "[[tiers]]\nname = \"cost\"\nmonthly_cost_usd = 0.01";
    let l = limited(Backend::Sqlite, tiers, clock).await;
    let key = l.gateway.key.clone().unwrap();
    // Each request costs 0.004 USD and streams for about 0.6 s.
    let slow = [
        ("x-mock-cost-usd", "0.004"),
        ("x-mock-chunks", "3"),
        ("x-mock-chunk-delay-ms", "200"),
    ];
    let first = chat_call(&l.gateway, &key, &slow, true).await;
    assert_eq!(first.status, StatusCode::OK);
    // 0.006 left: two more fit while each in flight is counted at 0.004
    // (0.004 + 0.004 < 0.01, a third would make 0.012).
    let replies = futures_join_all((0..40).map(|_| {
        let request = chat_request(&l.gateway, &key, &slow, true);
        async move { send(&client(), request).await }
    }))
    .await;
    let through = replies
        .iter()
        .filter(|reply| reply.status == StatusCode::OK)
        .count();
    assert_eq!(through, 2, "admitted of 40 at once");
    for held in replies
        .iter()
        .filter(|reply| reply.status != StatusCode::OK)
    {
        assert_eq!(held.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(held.error_type(), "budget_exceeded");
        assert_eq!(
            held.headers["x-should-retry"], "true",
            "it passes as they end"
        );
        assert_eq!(header(held, "retry-after"), Some(1));
    }
    let quota = admin(&l.gateway, Method::GET, "/v1/quota/test", None)
        .await
        .json();
    assert_eq!(quota["limits"]["monthly_cost_usd"]["used"], "0.012");
    // Spent: the next is refused until the period ends.
    let refused = chat_call(&l.gateway, &key, &slow, true).await;
    assert_eq!(refused.error_type(), "budget_exceeded");
    assert_eq!(refused.headers["x-should-retry"], "false");
    l.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_block_on_metered_cost_and_stream_tokens() {
    let clock = Arc::new(ManualClock::new(NOW));
    let tiers = "[[tiers]]\nname = \"cost\"\nmonthly_cost_usd = 0.01\n\n\
                 [[tiers]]\nname = \"tokens\"\nmonthly_tokens = 20";
    let l = limited(Backend::Sqlite, tiers, clock).await;
    let key = l.gateway.key.clone().unwrap();
    // 0.004 USD a request: 0, 0.004, 0.008 are under 0.01; then it is spent.
    let cost = [("x-mock-cost-usd", "0.004")];
    // The budget left as of each admission, before the request's own cost.
    for left in ["0.01", "0.006", "0.002"] {
        let reply = chat_call(&l.gateway, &key, &cost, false).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.headers["x-tollgate-cost-remaining-usd"], left);
        assert!(reply.headers.get("x-tollgate-tokens-remaining").is_none());
    }
    let refused = chat_call(&l.gateway, &key, &cost, false).await;
    assert_eq!(refused.error_type(), "budget_exceeded");
    assert_eq!(refused.headers["x-should-retry"], "false");
    assert_eq!(refused.headers["x-tollgate-cost-remaining-usd"], "0");
    let december = datetime!(2026-12-01 0:00 UTC).unix_timestamp();
    assert_eq!(
        header(&refused, "retry-after"),
        Some(december - NOW.unix_timestamp())
    );
    let quota = admin(&l.gateway, Method::GET, "/v1/quota/test", None)
        .await
        .json();
    assert_eq!(quota["limits"]["monthly_cost_usd"]["used"], "0.012");
    assert_eq!(quota["limits"]["monthly_cost_usd"]["limit"], "0.01");
    assert_eq!(quota["limits"]["monthly_cost_usd"]["remaining"], "0");
    assert_eq!(
        quota["totals"]["requests"], 3,
        "the refused request counts for nothing"
    );

    // Tokens from streamed usage: 5 prompt + 7 completion = 12 a request.
    let accounts = tollgate::snapshot::accounts_for(&l.gateway.config, l.gateway.store.clone());
    let tokens_key = accounts
        .create_key(tollgate_accounts::KeyRequest {
            customer: "streamer".into(),
            tier: Some("tokens".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .key;
    let chunks = [("x-mock-chunks", "7")];
    eventually(Duration::from_secs(2), || async {
        chat_call(&l.gateway, &tokens_key, &chunks, true)
            .await
            .status
            == StatusCode::OK
    })
    .await;
    assert_eq!(
        chat_call(&l.gateway, &tokens_key, &chunks, true)
            .await
            .status,
        StatusCode::OK
    );
    let refused = chat_call(&l.gateway, &tokens_key, &chunks, true).await;
    assert_eq!(
        refused.error_type(),
        "budget_exceeded",
        "24 tokens used of 20"
    );
    assert_eq!(refused.headers["x-tollgate-tokens-remaining"], "0");
    assert!(refused
        .headers
        .get("x-tollgate-cost-remaining-usd")
        .is_none());
    let mine = own_usage(&l.gateway, &tokens_key).await;
    assert_eq!(mine["tier"], "tokens");
    assert_eq!(mine["limits"]["monthly_tokens"]["used"], 24);
    assert_eq!(mine["limits"]["monthly_tokens"]["remaining"], 0);
    assert_eq!(mine["limits"]["monthly_tokens"]["reset"], december);
    assert_eq!(mine["totals"]["requests"], 2);
    assert_eq!(mine["period"], "2026-11");
    l.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_start_over_when_the_month_does() {
    let clock = Arc::new(ManualClock::new(datetime!(2026-12-31 23:59:59 UTC)));
    let l = limited(
        Backend::Sqlite,
        "[[tiers]]\nname = \"t\"\nmonthly_requests = 1",
        clock.clone(),
    )
    .await;
    let key = l.gateway.key.clone().unwrap();
    assert_eq!(
        chat_call(&l.gateway, &key, &[], false).await.status,
        StatusCode::OK
    );
    let refused = chat_call(&l.gateway, &key, &[], false).await;
    assert_eq!(refused.error_type(), "quota_exceeded");
    assert_eq!(
        header(&refused, "retry-after"),
        Some(1),
        "one second to January"
    );
    clock.advance(Duration::from_secs(1));
    let january = chat_call(&l.gateway, &key, &[], false).await;
    assert_eq!(january.status, StatusCode::OK, "a new year, a new quota");
    let february = datetime!(2027-02-01 0:00 UTC).unix_timestamp();
    assert_eq!(rate_headers(&january), (1, 0, 1, february));
    l.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_postgres_stay_within_the_documented_bound() {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let quota = 300;
    let l = limited(
        Backend::Postgres,
        &format!("[[tiers]]\nname = \"t\"\nmonthly_requests = {quota}"),
        clock.clone(),
    )
    .await;
    let key = l.gateway.key.clone().unwrap();
    let mut second = config(&l.toml);
    second.usage.spool_dir = l.dir.path().join("spool-2");
    let b = TestGateway::start_on_clock(second, None, clock).await;
    let gateways = [Arc::new(l.gateway), Arc::new(b)];
    let started = Instant::now();
    let mut workers = Vec::new();
    for gateway in &gateways {
        for _ in 0..4 {
            let (gateway, key) = (gateway.clone(), key.clone());
            workers.push(tokio::spawn(async move {
                let mut admitted = 0u32;
                let mut refused_in_a_row = 0;
                // Until this instance has refused 10 in a row: it then
                // knows the other's usage.
                while refused_in_a_row < 10 {
                    match chat_call(&gateway, &key, &[], false).await.status {
                        StatusCode::OK => {
                            admitted += 1;
                            refused_in_a_row = 0;
                        }
                        _ => refused_in_a_row += 1,
                    }
                }
                (admitted, Instant::now())
            }));
        }
    }
    let mut admitted = 0;
    let mut last = started;
    for worker in workers {
        let (count, at) = worker.await.unwrap();
        admitted += count;
        last = last.max(at);
    }
    // docs/RUNBOOK.md, Scaling out: the overshoot is bounded by (flush_interval + sync_interval)
    // × the customer's request rate; the rate is measured here.
    let rate = f64::from(admitted) / last.duration_since(started).as_secs_f64();
    let bound = ((0.020 + 0.200) * rate).ceil() as u32;
    let overshoot = admitted.saturating_sub(quota);
    eprintln!(
        "admitted {admitted} of {quota} at {rate:.0}/s: overshoot {overshoot}, bound {bound}"
    );
    assert!(admitted >= quota, "the quota itself is usable");
    assert!(
        overshoot <= bound,
        "overshoot {overshoot} above the bound {bound}"
    );
    for gateway in gateways {
        Arc::into_inner(gateway).unwrap().stop().await;
    }
}

/// Creates a key through the admin API; (plaintext, id, answer).
async fn create_key(
    gateway: &TestGateway,
    body: serde_json::Value,
) -> (String, String, serde_json::Value) {
    let reply = admin(gateway, Method::POST, "/v1/keys", Some(body)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.json());
    let created = reply.json();
    (
        created["key"].as_str().unwrap().to_owned(),
        created["id"].as_str().unwrap().to_owned(),
        created,
    )
}

/// Waits until `key` authenticates on the data plane.
async fn until_live(gateway: &TestGateway, key: &str) {
    eventually(Duration::from_secs(5), || async {
        chat_call(gateway, key, &[], false).await.status != StatusCode::UNAUTHORIZED
    })
    .await;
}

async fn key_limits_nest_follow_changes_rotation_and_restarts(backend: Backend) {
    let l = limited(
        backend,
        "[[tiers]]\nname = \"t\"\nmonthly_requests = 1000",
        Arc::new(SystemClock),
    )
    .await;
    let gw = &l.gateway;
    let shared = gw.key.clone().unwrap();
    let (key, id, created) = create_key(
        gw,
        json!({"customer": "test", "name": "app", "limits": {"monthly_requests": 3, "rate": "100/s"}}),
    )
    .await;
    assert_eq!(
        created["limits"],
        json!({"rate": "100/s", "monthly_requests": 3})
    );
    // The first call may come before the key reaches the cache; it counts
    // toward nothing if refused as unknown.
    until_live(gw, &key).await;
    let mut ok = 1;
    while ok < 3 {
        let reply = chat_call(gw, &key, &[], false).await;
        assert_eq!(reply.status, StatusCode::OK);
        ok += 1;
        let (limit, remaining, used, _) = rate_headers(&reply);
        assert_eq!(
            (limit, remaining, used),
            (3, 3 - ok, ok),
            "the key's quota is the tightest"
        );
    }
    let refused = chat_call(gw, &key, &[], false).await;
    assert_eq!(refused.error_type(), "quota_exceeded");
    assert_eq!(refused.headers["x-should-retry"], "false");
    assert_eq!(
        chat_call(gw, &shared, &[], false).await.status,
        StatusCode::OK,
        "the customer's other keys go on"
    );
    let mine = own_usage(gw, &key).await;
    assert_eq!(mine["customer"], "test");
    assert_eq!(mine["tier"], "t");
    assert_eq!(mine["limits"]["monthly_requests"]["used"], 4, "{mine}");
    assert_eq!(mine["key"]["key_id"], id.as_str());
    assert_eq!(mine["key"]["limits"]["monthly_requests"]["limit"], 3);
    assert_eq!(mine["key"]["limits"]["monthly_requests"]["used"], 3);
    assert_eq!(mine["key"]["limits"]["monthly_requests"]["remaining"], 0);
    assert_eq!(mine["key"]["limits"]["rate"]["rate"], "100/s");

    // Raised: live within a second.
    let patched = admin(
        gw,
        Method::PATCH,
        &format!("/v1/keys/{id}"),
        Some(json!({"limits": {"monthly_requests": 5}})),
    )
    .await;
    assert_eq!(patched.status, StatusCode::OK);
    assert_eq!(patched.json()["limits"], json!({"monthly_requests": 5}));
    let took = eventually(Duration::from_secs(1), || async {
        chat_call(gw, &key, &[], false).await.status == StatusCode::OK
    })
    .await;
    println!("a raised key limit was live after {took:?}");

    // The successor shares the family's count: one left of five.
    let rotated = admin(gw, Method::POST, &format!("/v1/keys/{id}/rotate"), None).await;
    assert_eq!(rotated.status, StatusCode::CREATED);
    assert_eq!(rotated.json()["limits"], json!({"monthly_requests": 5}));
    let successor = rotated.json()["key"].as_str().unwrap().to_owned();
    until_live(gw, &successor).await;
    assert_eq!(
        chat_call(gw, &successor, &[], false).await.error_type(),
        "quota_exceeded",
        "five used by the family"
    );
    assert_eq!(
        chat_call(gw, &key, &[], false).await.error_type(),
        "quota_exceeded"
    );

    // A restart keeps the family's count (from the per-key rollup).
    let toml = l.toml.clone();
    let Limited {
        db,
        _mock,
        gateway,
        dir,
        ..
    } = l;
    gateway.stop().await;
    let gw = TestGateway::start_on(config(&toml), None).await;
    assert_eq!(
        chat_call(&gw, &successor, &[], false).await.error_type(),
        "quota_exceeded",
        "counted from the database after a restart"
    );
    // Cleared: the key has only its customer's limits, within a second.
    let successor_id = admin(&gw, Method::GET, "/v1/keys?customer=test", None)
        .await
        .json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["status"] == "active" && k["limits"].is_object())
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .unwrap();
    let cleared = admin(
        &gw,
        Method::PATCH,
        &format!("/v1/keys/{successor_id}"),
        Some(json!({"limits": null})),
    )
    .await;
    assert_eq!(cleared.json()["limits"], serde_json::Value::Null);
    eventually(Duration::from_secs(1), || async {
        chat_call(&gw, &successor, &[], false).await.status == StatusCode::OK
    })
    .await;
    // Bad limits are refused, naming the field, at creation and on change.
    let bad = admin(
        &gw,
        Method::POST,
        "/v1/keys",
        Some(json!({"customer": "test", "limits": {"rate": "ten per second"}})),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(
        bad.json()["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("limits: invalid rate"),
        "{}",
        bad.json()
    );
    let bad = admin(
        &gw,
        Method::PATCH,
        &format!("/v1/keys/{successor_id}"),
        Some(json!({"limits": {"monthly_cost_usd": "-1"}})),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    gw.stop().await;
    drop((db, dir));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_limits_nest_follow_changes_rotation_and_restarts_sqlite() {
    key_limits_nest_follow_changes_rotation_and_restarts(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_limits_nest_follow_changes_rotation_and_restarts_postgres() {
    key_limits_nest_follow_changes_rotation_and_restarts(Backend::Postgres).await;
}

/// 200 requests at once with `key`; how many were admitted, and whether
/// every refusal was a quota's.
async fn race(gateway: &TestGateway, key: &str) -> (usize, bool) {
    let replies: Vec<Reply> = futures_join_all((0..200).map(|_| {
        let request = chat_request(gateway, key, &[], false);
        async move { send(&client(), request).await }
    }))
    .await;
    let admitted = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    let quota = replies
        .iter()
        .filter(|r| r.status != StatusCode::OK)
        .all(|r| r.error_type() == "quota_exceeded");
    (admitted, quota)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_racing_requests_admit_exactly_what_the_tighter_level_has_left() {
    let l = limited(
        Backend::Sqlite,
        "[[tiers]]\nname = \"plenty\"\nmonthly_requests = 100000\n\n\
         [[tiers]]\nname = \"tight\"\nmonthly_requests = 50",
        Arc::new(SystemClock),
    )
    .await;
    let gw = &l.gateway;
    // The key has 50 left; its customer plenty.
    let (key, _, _) = create_key(
        gw,
        json!({"customer": "test", "limits": {"monthly_requests": 50}}),
    )
    .await;
    until_live(gw, &key).await; // one used
    let (admitted, quota) = race(gw, &key).await;
    assert_eq!(admitted, 49);
    assert!(quota);
    // The customer has 50 left; its key plenty.
    let (key, _, _) = create_key(
        gw,
        json!({"customer": "tight", "tier": "tight", "limits": {"monthly_requests": 100000}}),
    )
    .await;
    until_live(gw, &key).await;
    let (admitted, quota) = race(gw, &key).await;
    assert_eq!(admitted, 49);
    assert!(quota);
    l.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_given_its_first_limit_is_judged_on_its_months_usage() {
    // Totals read every minute: only the read a new limit asks for can
    // tell the key's usage in time.
    let l = limited_syncing(
        Backend::Sqlite,
        "[[tiers]]\nname = \"t\"\nmonthly_requests = 1000",
        Arc::new(SystemClock),
        "60s",
    )
    .await;
    let gw = &l.gateway;
    let key = gw.key.clone().unwrap();
    for _ in 0..5 {
        assert_eq!(chat_call(gw, &key, &[], false).await.status, StatusCode::OK);
    }
    // Its rows are written (flush_interval 20 ms).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = admin(gw, Method::GET, "/v1/keys?customer=test", None)
        .await
        .json()["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let patched = admin(
        gw,
        Method::PATCH,
        &format!("/v1/keys/{id}"),
        Some(json!({"limits": {"monthly_requests": 3}})),
    )
    .await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.json());
    // Until the change reaches the limiter, the key has no limit of its own.
    eventually(Duration::from_secs(5), || async {
        own_usage(gw, &key).await["key"]["limits"]["monthly_requests"]["limit"] == 3
    })
    .await;
    // From then on: five used of three, never a fresh three.
    let started = std::time::Instant::now();
    let mut seen = Vec::new();
    loop {
        let reply = chat_call(gw, &key, &[], false).await;
        seen.push((reply.status, reply.headers.get("x-tollgate-error").cloned()));
        if reply.status == StatusCode::TOO_MANY_REQUESTS && reply.error_type() == "quota_exceeded" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{seen:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        seen.iter()
            .all(|(status, _)| *status == StatusCode::TOO_MANY_REQUESTS),
        "{seen:?}"
    );
    let took = started.elapsed();
    println!("the key's usage was read within {took:?}");
    l.gateway.stop().await;
}
