//! Webhooks end to end: real gateways, a real database, and a receiver
//! that checks Standard Webhooks signatures as an operator's endpoint
//! would. Each event fires once per (customer or key, limit, threshold,
//! period) whatever the number of instances and restarts; deliveries are
//! retried with the same `webhook-id`.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use time::OffsetDateTime;
use tollgate_metering::limits::Period;
use tollgate_mock::{MockUpstream, WebhookReceiver};
use tollgate_store::testing::{Backend, TestGuard};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OTHER_SECRET: &str = "whsec_QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB";

/// A gateway's config: one route to the mock, tier `t` with `tier`'s
/// lines, and one webhook endpoint.
fn toml(db: &str, spool: &str, upstream: &str, tier: &str, hook_url: &str, secret: &str) -> String {
    format!(
        r#"
[admin]
tokens = ["admin-test-token"]

[database]
url = "{db}"

[usage]
spool_dir = "{spool}"
flush_interval = "20ms"
sync_interval = "200ms"

[[tiers]]
name = "t"
{tier}

[[routes]]
name = "openai"
prefix = "/v1/"
upstream = "{upstream}"
usage = "openai"

[[webhooks]]
url = "{hook_url}"
secret = "{secret}"
"#
    )
}

struct Setup {
    db: TestGuard,
    mock: MockUpstream,
    receiver: WebhookReceiver,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn new(backend: Backend) -> Setup {
        Setup {
            db: TestGuard::create(backend).await,
            mock: MockUpstream::start().await.unwrap(),
            receiver: WebhookReceiver::start(SECRET).await.unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A gateway on the shared database with its own spool and instance id.
    async fn gateway(&self, instance: &str, tier: &str, secret: &str) -> TestGateway {
        let spool = self.dir.path().join(format!("spool-{instance}"));
        let mut config = config(&toml(
            self.db.url(),
            &spool.display().to_string(),
            &self.mock.url(),
            tier,
            &self.receiver.url(),
            secret,
        ));
        config.server.instance_id = instance.to_owned();
        TestGateway::start_on(config, None).await
    }
}

async fn chat(gateway: &TestGateway) -> StatusCode {
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    send(
        &client(),
        gateway
            .request(Method::POST, "/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap(),
    )
    .await
    .status
}

async fn deliveries(gateway: &TestGateway, query: &str) -> Vec<Value> {
    let reply = admin(
        gateway,
        Method::GET,
        &format!("/v1/webhooks/deliveries{query}"),
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    reply.json()["data"].as_array().unwrap().clone()
}

/// Last month, `YYYY-MM`: a period that can be closed.
fn last_month() -> String {
    let first = OffsetDateTime::now_utc().replace_day(1).unwrap();
    Period::containing(first - time::Duration::days(1)).to_string()
}

async fn close_last_month(gateway: &TestGateway) {
    let reply = admin(
        gateway,
        Method::POST,
        &format!("/v1/billing/periods/{}/close", last_month()),
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_crossing_a_threshold_together_fire_it_once() {
    let s = Setup::new(Backend::Postgres).await;
    let tier = "monthly_requests = 10\nalerts = [0.8]";
    let a = s.gateway("gw-a", tier, SECRET).await;
    let b = s.gateway("gw-b", tier, SECRET).await;
    // Four each: neither instance alone reaches 80 %, together they do.
    for _ in 0..4 {
        assert_eq!(chat(&a).await, StatusCode::OK);
        assert_eq!(chat(&b).await, StatusCode::OK);
    }
    let got = s
        .receiver
        .wait_for(1, Duration::from_secs(10))
        .await
        .unwrap();
    let event = &got[0].body;
    assert_eq!(event["type"], "quota.threshold");
    let data = &event["data"];
    assert_eq!(data["customer"], "test");
    assert_eq!(data["key_id"], Value::Null);
    assert_eq!(data["limit"], "monthly_requests");
    assert_eq!(data["threshold"], json!(0.8));
    assert_eq!(data["used"], 8);
    assert_eq!(data["limit_value"], 10);
    assert_eq!(
        data["period"],
        Period::containing(OffsetDateTime::now_utc()).to_string()
    );
    // Both instances saw the crossing; one event was recorded.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.receiver.distinct_ids().len(), 1);
    assert_eq!(deliveries(&a, "?event=quota.threshold").await.len(), 1);

    // Both run out; the first refusal fires quota.exhausted, once.
    assert_eq!(chat(&a).await, StatusCode::OK);
    assert_eq!(chat(&b).await, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(800)).await; // both synced: 10 of 10
    assert_eq!(chat(&a).await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(chat(&b).await, StatusCode::TOO_MANY_REQUESTS);
    let got = s
        .receiver
        .wait_for(2, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(got[1].body["type"], "quota.exhausted");
    assert_eq!(got[1].body["data"]["limit_value"], 10);
    assert!(got[1].body["data"].get("threshold").is_none());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.receiver.distinct_ids().len(), 2, "each event once");
    assert!(s.receiver.received().iter().all(|r| r.valid));
    let listed = deliveries(&b, "?status=delivered").await;
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|d| d["attempts"] == 1));
    a.stop().await;
    b.stop().await;
}

async fn a_delivery_cut_by_a_restart_is_sent_again_with_the_same_id(backend: Backend) {
    let s = Setup::new(backend).await;
    let a = s.gateway("gw-a", "", SECRET).await;
    s.receiver.hang_next(1);
    close_last_month(&a).await;
    eventually(Duration::from_secs(5), || async {
        s.receiver.holding() == 1
    })
    .await;
    let held = s.receiver.received()[0].id.clone();
    a.stop().await;
    // Another gateway (a restart) takes the delivery once its claim runs
    // out, and sends it with the same webhook-id.
    let b = s.gateway("gw-b", "", SECRET).await;
    let got = s
        .receiver
        .wait_for(1, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(got[0].id, held);
    assert_eq!(got[0].body["type"], "billing.period_closed");
    assert_eq!(got[0].body["data"]["period"], last_month());
    assert_eq!(
        got[0].body["data"]["customers"], 0,
        "the one customer was made this month"
    );
    assert_eq!(got[0].body["data"]["total_usd"], "0");
    eventually(Duration::from_secs(5), || async {
        deliveries(&b, "?status=delivered").await.len() == 1
    })
    .await;
    let listed = deliveries(&b, "").await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["attempts"], 2);
    assert_eq!(listed[0]["event_id"], held.as_str());
    // Closing the month again announces nothing new.
    close_last_month(&b).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(s.receiver.distinct_ids().len(), 1);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_cut_by_a_restart_is_sent_again_with_the_same_id_sqlite() {
    a_delivery_cut_by_a_restart_is_sent_again_with_the_same_id(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_cut_by_a_restart_is_sent_again_with_the_same_id_postgres() {
    a_delivery_cut_by_a_restart_is_sent_again_with_the_same_id(Backend::Postgres).await;
}

async fn a_failing_endpoint_is_retried_until_it_recovers(backend: Backend) {
    let s = Setup::new(backend).await;
    let gw = s.gateway("gw-a", "", SECRET).await;
    s.receiver.fail_next(1, 500);
    close_last_month(&gw).await;
    // Settled after its first attempt: pending, with the error.
    let pending = eventually_delivery(&gw).await;
    assert_eq!(pending["last_error"], "answered HTTP 500");
    let next = OffsetDateTime::parse(
        pending["next_attempt_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let wait = next - OffsetDateTime::now_utc();
    assert!(
        wait <= time::Duration::seconds(10) && wait > time::Duration::seconds(5),
        "first retry within 10 s: {wait}"
    );
    let got = s
        .receiver
        .wait_for(1, Duration::from_secs(20))
        .await
        .unwrap();
    let attempts: Vec<_> = s.receiver.received();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].id, attempts[1].id, "the same webhook-id");
    assert_eq!(attempts[0].attempt_status, 500);
    assert_eq!(got[0].attempt_status, 200);
    eventually(Duration::from_secs(5), || async {
        deliveries(&gw, "?status=delivered").await.len() == 1
    })
    .await;
    let scrape = Scrape::of(gw.admin).await;
    let counted = |result| {
        scrape.value(
            "tollgate_webhook_deliveries_total",
            &[("event", "billing.period_closed"), ("result", result)],
        )
    };
    assert_eq!((counted("failed"), counted("delivered")), (1.0, 1.0));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_retried_until_it_recovers_sqlite() {
    a_failing_endpoint_is_retried_until_it_recovers(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_retried_until_it_recovers_postgres() {
    a_failing_endpoint_is_retried_until_it_recovers(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_is_refused_by_the_receiver_and_retried_on_demand() {
    let s = Setup::new(Backend::Sqlite).await;
    let gw = s.gateway("gw-a", "", OTHER_SECRET).await;
    close_last_month(&gw).await;
    eventually(Duration::from_secs(5), || async {
        !s.receiver.received().is_empty()
    })
    .await;
    let refused = &s.receiver.received()[0];
    assert!(!refused.valid);
    assert_eq!(refused.attempt_status, 401);
    let id = eventually_delivery(&gw).await;
    assert_eq!(id["last_error"], "answered HTTP 401");
    assert_eq!(id["status"], "pending");
    // An operator's retry attempts at once and answers with the outcome.
    let retried = admin(
        &gw,
        Method::POST,
        &format!(
            "/v1/webhooks/deliveries/{}/retry",
            id["id"].as_str().unwrap()
        ),
        None,
    )
    .await;
    assert_eq!(retried.status, StatusCode::OK);
    let after = retried.json();
    assert_eq!(after["attempts"], 2);
    assert_eq!(after["status"], "pending");
    assert_eq!(after["last_error"], "answered HTTP 401");
    assert_eq!(s.receiver.received().len(), 2);
    assert!(s.receiver.accepted().is_empty());
    let unknown = admin(
        &gw,
        Method::POST,
        "/v1/webhooks/deliveries/0190a0a0-0000-7000-8000-000000000000/retry",
        None,
    )
    .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let bad = deliveries_reply(&gw, "?status=lost").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    gw.stop().await;
}

async fn eventually_delivery(gw: &TestGateway) -> Value {
    eventually(Duration::from_secs(5), || async {
        deliveries(gw, "")
            .await
            .first()
            .is_some_and(|d| d["attempts"] == 1 && !d["last_error"].is_null())
    })
    .await;
    deliveries(gw, "").await[0].clone()
}

async fn deliveries_reply(gw: &TestGateway, query: &str) -> Reply {
    admin(
        gw,
        Method::GET,
        &format!("/v1/webhooks/deliveries{query}"),
        None,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_entering_their_last_week_are_announced_once() {
    let s = Setup::new(Backend::Sqlite).await;
    // Keys made before the gateway starts: its first scan finds them.
    let store = tollgate::app::open_store(&config(&toml(
        s.db.url(),
        "unused",
        &s.mock.url(),
        "",
        &s.receiver.url(),
        SECRET,
    )))
    .await
    .unwrap();
    let accounts = tollgate::snapshot::accounts_for(
        &config(&toml(
            s.db.url(),
            "unused",
            &s.mock.url(),
            "",
            &s.receiver.url(),
            SECRET,
        )),
        store,
    );
    let in_days = |days: i64| OffsetDateTime::now_utc() + time::Duration::days(days);
    let request = |name: &str, expires_at| tollgate_accounts::KeyRequest {
        customer: "acme".into(),
        tier: Some("t".into()),
        name: Some(name.into()),
        expires_at,
        ..Default::default()
    };
    let soon = accounts
        .create_key(request("soon", Some(in_days(3))))
        .await
        .unwrap();
    accounts
        .create_key(request("later", Some(in_days(30))))
        .await
        .unwrap();
    let outgoing = accounts.create_key(request("rotated", None)).await.unwrap();
    accounts
        .rotate_key(&outgoing.id.to_string(), Some(Duration::from_secs(3600)))
        .await
        .unwrap();
    let gw = s.gateway("gw-a", "", SECRET).await;
    let got = s
        .receiver
        .wait_for(1, Duration::from_secs(10))
        .await
        .unwrap();
    let data = &got[0].body["data"];
    assert_eq!(got[0].body["type"], "key.expiring");
    assert_eq!(data["key_id"], soon.id.to_string());
    assert_eq!(data["prefix"], soon.prefix);
    assert_eq!(data["customer"], "acme");
    assert_eq!(data["customer_id"], soon.customer_id.to_string());
    let expires_at = soon
        .expires_at
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    assert_eq!(data["expires_at"], expires_at);
    // Not the later key, not the outgoing key of the rotation; and a
    // restart does not announce it again.
    gw.stop().await;
    let gw = s.gateway("gw-b", "", SECRET).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.receiver.distinct_ids().len(), 1);
    gw.stop().await;
}

/// An endpoint that takes connections and never answers: every attempt to
/// it runs to the attempt's timeout.
async fn hanging_endpoint() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (url, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_hangs_does_not_hold_up_the_others() {
    let s = Setup::new(Backend::Sqlite).await;
    let (hanging, _held) = hanging_endpoint().await;
    let spool = s.dir.path().join("spool");
    // Each request crosses one more fraction: one event each, to both
    // endpoints; twelve at once fill more than the hanging endpoint's
    // slots.
    let fractions: Vec<String> = (1..=14).map(|n| format!("{}", n as f64 / 20.0)).collect();
    let tier = format!("monthly_requests = 20\nalerts = [{}]", fractions.join(", "));
    let toml = format!(
        "{}\n[[webhooks]]\nurl = \"{hanging}\"\nsecret = \"{SECRET}\"\n",
        toml(
            s.db.url(),
            &spool.display().to_string(),
            &s.mock.url(),
            &tier,
            &s.receiver.url(),
            SECRET,
        )
    );
    let gw = TestGateway::start_on(config(&toml), None).await;
    assert_eq!(chat(&gw).await, StatusCode::OK);
    s.receiver
        .wait_for(1, Duration::from_secs(5))
        .await
        .unwrap();
    // The first event's attempt to the hanging endpoint is under way; the
    // next ones still reach the receiver at once.
    for _ in 0..12 {
        assert_eq!(chat(&gw).await, StatusCode::OK);
    }
    let started = std::time::Instant::now();
    let got = s
        .receiver
        .wait_for(13, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(got.iter().all(|r| r.valid));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    // One more while the hanging endpoint holds all its slots.
    assert_eq!(chat(&gw).await, StatusCode::OK);
    s.receiver
        .wait_for(14, Duration::from_secs(3))
        .await
        .unwrap();
    gw.stop().await;
}
