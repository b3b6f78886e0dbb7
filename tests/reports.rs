//! Usage analytics and billing end to end, on both backends: known events
//! across two months, customers and tiers, every endpoint's numbers, bad
//! input, idempotent (and concurrent) period close, and the CSV export.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use time::macros::datetime;
use time::OffsetDateTime;
use tollgate_metering::limits::ManualClock;
use tollgate_metering::usage::{CostSource, Outcome, UsageEvent};
use tollgate_metering::{CustomerId, KeyId};
use tollgate_store::testing::{Backend, TestGuard};
use uuid::Uuid;

struct Seeded {
    db: TestGuard,
    gateway: TestGateway,
    _dir: tempfile::TempDir,
    acme: CustomerId,
    /// acme's one stored key (id, prefix), named "ci": the key of its four
    /// October requests on `openai`.
    acme_key: (KeyId, String),
    events: Vec<UsageEvent>,
}

#[allow(clippy::too_many_arguments)]
fn event(
    customer: CustomerId,
    ts: OffsetDateTime,
    route: &str,
    model: Option<&str>,
    outcome: Outcome,
    status: u16,
    tokens: (u64, u64),
    cost_nanos: i64,
) -> UsageEvent {
    UsageEvent {
        id: Uuid::now_v7(),
        client_request_id: None,
        ts,
        customer_id: customer,
        key_id: KeyId::new(),
        instance: "gw-test".into(),
        route: route.into(),
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        status,
        outcome,
        latency_us: 1000,
        upstream_latency_us: 500,
        request_bytes: 100,
        response_bytes: 200,
        model: model.map(str::to_owned),
        input_tokens: tokens.0,
        output_tokens: tokens.1,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        cost_nanos,
        cost_source: if cost_nanos > 0 {
            CostSource::Pricing
        } else {
            CostSource::None
        },
    }
}

async fn seeded(backend: Backend) -> Seeded {
    let db = TestGuard::create(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"
[admin]
tokens = ["admin-test-token"]

[database]
url = "{db}"

[usage]
spool_dir = "{spool}"

[[tiers]]
name = "pro"
monthly_requests = 3
overage = "bill"
overage_price_per_request_usd = 0.01

[[tiers]]
name = "free"
monthly_requests = 2

[[tiers]]
name = "enterprise"
"#,
        db = db.url(),
        spool = dir.path().join("spool").display(),
    );
    // "Now" is late November 2026: October is closable, November is not.
    let clock = Arc::new(ManualClock::new(datetime!(2026-11-29 12:00 UTC)));
    let gateway = TestGateway::start_on_clock(config(&toml), None, clock).await;
    let accounts = tollgate::snapshot::accounts_for(&gateway.config, gateway.store.clone());
    let mut ids = Vec::new();
    for (name, tier) in [
        ("acme", "pro"),
        ("beta", "free"),
        ("corp", "enterprise"),
        ("idle", "free"),
    ] {
        ids.push(accounts.create_customer(name, tier, None).await.unwrap().id);
    }
    let (acme, beta, corp) = (ids[0], ids[1], ids[2]);
    // Customers are billed for the periods they existed in: these are
    // made "now", so they are dated back to the start of the year.
    db.raw("UPDATE customers SET created_at = '2026-01-01T00:00:00.000000Z'")
        .await;
    let key = accounts
        .create_key(tollgate_accounts::KeyRequest {
            customer: "acme".into(),
            tier: None,
            name: Some("ci".into()),
            expires_at: None,
            routes: None,
            limits: None,
        })
        .await
        .unwrap();
    let gpt = Some("gpt-4o-mini");
    let mut events = Vec::new();
    for hour in 0..4 {
        let ts = datetime!(2026-10-15 10:00 UTC) + Duration::from_secs(hour * 3600);
        let mut row = event(
            acme,
            ts,
            "openai",
            gpt,
            Outcome::Ok,
            200,
            (10, 20),
            1_000_000,
        );
        row.key_id = key.id;
        events.push(row);
    }
    // The last microsecond of October, and the first of November.
    let last = datetime!(2026-10-31 23:59:59.999_999 UTC);
    events.push(event(
        acme,
        last,
        "anthropic",
        Some("claude"),
        Outcome::Ok,
        200,
        (5, 5),
        2_500_001,
    ));
    events.push(event(
        acme,
        datetime!(2026-11-01 0:00 UTC),
        "openai",
        gpt,
        Outcome::Ok,
        200,
        (1, 1),
        7,
    ));
    for minute in 0..2 {
        let ts = datetime!(2026-10-20 08:00 UTC) + Duration::from_secs(minute * 60);
        events.push(event(beta, ts, "openai", None, Outcome::Ok, 200, (3, 0), 0));
    }
    events.push(event(
        beta,
        datetime!(2026-10-20 09:00 UTC),
        "openai",
        None,
        Outcome::QuotaExceeded,
        429,
        (0, 0),
        0,
    ));
    events.push(event(
        beta,
        datetime!(2026-11-02 09:00 UTC),
        "openai",
        None,
        Outcome::Ok,
        200,
        (3, 0),
        0,
    ));
    let mut odd = event(
        corp,
        datetime!(2026-10-01 0:00 UTC),
        "openai",
        gpt,
        Outcome::UpstreamError,
        502,
        (0, 0),
        0,
    );
    odd.path = "/v1/a,b".into();
    odd.client_request_id = Some("say \"hi\"".into());
    events.push(odd);
    gateway.store.write_usage(&events).await.unwrap();
    events.sort_by_key(|e| (e.ts, e.id));
    Seeded {
        db,
        gateway,
        _dir: dir,
        acme,
        acme_key: (key.id, key.prefix),
        events,
    }
}

async fn admin_call(gateway: &TestGateway, method: Method, path: &str) -> Reply {
    admin(gateway, method, path, None).await
}

async fn get(gateway: &TestGateway, path: &str) -> Value {
    let reply = admin_call(gateway, Method::GET, path).await;
    assert_eq!(reply.status, StatusCode::OK, "{path}: {:?}", reply.body);
    reply.json()
}

/// Picks fields of every row of `data`.
fn column(document: &Value, field: &str) -> Vec<Value> {
    document["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row[field].clone())
        .collect()
}

async fn every_report_is_exact(backend: Backend) {
    let s = seeded(backend).await;
    let g = &s.gateway;
    let october = "from=2026-10-01&to=2026-10-31";

    let summary = get(g, &format!("/v1/usage/summary?{october}")).await;
    // acme 5, beta 2 admitted + 1 rejected, corp 1 error.
    assert_eq!(summary["requests"], 8);
    assert_eq!(summary["rejected"], 1);
    assert_eq!(summary["errors"], 1);
    assert_eq!(summary["input_tokens"], 4 * 10 + 5 + 2 * 3);
    assert_eq!(summary["output_tokens"], 4 * 20 + 5);
    assert_eq!(summary["cost_usd"], "0.006500001");
    assert_eq!(
        (summary["from"].clone(), summary["to"].clone()),
        (json!("2026-10-01"), json!("2026-10-31"))
    );

    let daily = get(g, &format!("/v1/usage/daily?{october}")).await;
    assert_eq!(
        column(&daily, "day"),
        [
            json!("2026-10-01"),
            json!("2026-10-15"),
            json!("2026-10-20"),
            json!("2026-10-31")
        ]
    );
    assert_eq!(
        column(&daily, "requests"),
        [json!(1), json!(4), json!(2), json!(1)]
    );
    assert_eq!(
        column(&daily, "cost_usd")[3],
        "0.002500001",
        "the last microsecond is October's"
    );

    let by_customer = get(g, &format!("/v1/usage/by-customer?{october}")).await;
    assert_eq!(
        column(&by_customer, "customer"),
        [json!("acme"), json!("beta"), json!("corp")]
    );
    assert_eq!(column(&by_customer, "customer_id")[0], json!(s.acme));
    assert_eq!(
        column(&by_customer, "rejected"),
        [json!(0), json!(1), json!(0)]
    );

    let top = get(
        g,
        &format!("/v1/usage/top-customers?{october}&by=requests&limit=2"),
    )
    .await;
    assert_eq!(column(&top, "customer"), [json!("acme"), json!("beta")]);
    let top = get(g, &format!("/v1/usage/top-customers?{october}&by=tokens")).await;
    assert_eq!(column(&top, "tokens"), [json!(130), json!(6), json!(0)]);

    // One customer, both months: November 1st 00:00 belongs to November.
    let acme = get(
        g,
        "/v1/usage/summary?customer=acme&from=2026-10-01&to=2026-11-30",
    )
    .await;
    assert_eq!(
        (acme["requests"].clone(), acme["customer"].clone()),
        (json!(6), json!("acme"))
    );
    let november = get(g, "/v1/usage/summary?from=2026-11-01&to=2026-11-01").await;
    assert_eq!(november["requests"], 1);
    // No from/to: the current month (November, on the gateway's clock).
    let current = get(g, "/v1/usage/summary").await;
    assert_eq!(
        (current["from"].clone(), current["requests"].clone()),
        (json!("2026-11-01"), json!(2))
    );

    for (query, field) in [
        ("/v1/usage/summary?from=2026-13-01", "from"),
        ("/v1/usage/summary?to=yesterday", "to"),
        ("/v1/usage/daily?from=2026-10-31&to=2026-10-01", "from"),
        ("/v1/usage/summary?customer=nobody", "customer"),
        ("/v1/usage/top-customers?by=banana", "by"),
        ("/v1/usage/top-customers?limit=0", "limit"),
        ("/v1/usage/export?format=xml", "format"),
        ("/v1/billing/summary?period=2026-13", "period"),
    ] {
        let reply = admin_call(g, Method::GET, query).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(reply.error_type(), "invalid_request");
        let message = reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(message.starts_with(field), "{query}: {message}");
    }
    s.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_report_is_exact_sqlite() {
    every_report_is_exact(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_report_is_exact_postgres() {
    every_report_is_exact(Backend::Postgres).await;
}

async fn usage_by_route_model_and_key(backend: Backend) {
    let s = seeded(backend).await;
    let g = &s.gateway;
    let october = "from=2026-10-01&to=2026-10-31";

    let by_route = get(g, &format!("/v1/usage/by-route?{october}")).await;
    assert_eq!(
        column(&by_route, "route"),
        [json!("anthropic"), json!("openai")]
    );
    // openai: acme 4, beta 2 (+1 refused), corp 1 error.
    assert_eq!(column(&by_route, "requests"), [json!(1), json!(7)]);
    assert_eq!(column(&by_route, "rejected"), [json!(0), json!(1)]);
    assert_eq!(
        column(&by_route, "cost_usd"),
        [json!("0.002500001"), json!("0.004")]
    );

    let by_model = get(g, &format!("/v1/usage/by-model?{october}")).await;
    assert_eq!(
        column(&by_model, "model"),
        [Value::Null, json!("claude"), json!("gpt-4o-mini")]
    );
    assert_eq!(
        column(&by_model, "requests"),
        [json!(2), json!(1), json!(5)]
    );

    let by_key = get(g, &format!("/v1/usage/by-key?{october}")).await;
    let rows = by_key["data"].as_array().unwrap();
    // acme: its stored key and the anthropic request's; beta: three; corp: one.
    assert_eq!(rows.len(), 6, "{by_key}");
    let (key_id, prefix) = &s.acme_key;
    let stored: Vec<&Value> = rows
        .iter()
        .filter(|row| row["key_id"] == json!(key_id))
        .collect();
    assert_eq!(stored.len(), 1, "{by_key}");
    assert_eq!(
        (
            &stored[0]["prefix"],
            &stored[0]["name"],
            &stored[0]["customer"],
            &stored[0]["customer_id"]
        ),
        (&json!(prefix), &json!("ci"), &json!("acme"), &json!(s.acme))
    );
    assert_eq!(
        (&stored[0]["requests"], &stored[0]["cost_usd"]),
        (&json!(4), &json!("0.004"))
    );
    let requests: u64 = rows
        .iter()
        .map(|row| row["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(requests, 8, "every grouping adds up to the summary");
    assert_eq!(
        column(&by_key, "customer")[..3],
        [json!("acme"), json!("acme"), json!("beta")],
        "by customer name"
    );

    let beta = get(g, &format!("/v1/usage/by-key?{october}&customer=beta")).await;
    assert_eq!(column(&beta, "customer"), vec![json!("beta"); 3]);
    assert_eq!(beta["customer"], "beta");
    s.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_by_route_model_and_key_sqlite() {
    usage_by_route_model_and_key(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_by_route_model_and_key_postgres() {
    usage_by_route_model_and_key(Backend::Postgres).await;
}

async fn billing_closes_once(backend: Backend) {
    let s = seeded(backend).await;
    let g = &s.gateway;
    let open = get(g, "/v1/billing/summary?period=2026-10").await;
    assert_eq!(open["closed"], false);
    let lines = open["data"].as_array().unwrap();
    // "test" is the customer of the gateway's own test key.
    assert_eq!(
        column(&open, "customer"),
        [
            json!("acme"),
            json!("beta"),
            json!("corp"),
            json!("idle"),
            json!("test")
        ]
    );
    // acme (pro, bill): 5 requests, 3 included, 2 over at 0.01.
    let acme = &lines[0];
    assert_eq!(acme["included_requests"], 3);
    assert_eq!(acme["overage_requests"], 2);
    assert_eq!(acme["overage_charge_usd"], "0.02");
    assert_eq!(acme["metered_cost_usd"], "0.006500001");
    assert_eq!(acme["total_usd"], "0.026500001");
    assert_eq!(acme["total_usd_cents"], "0.03");
    // beta (free, block): its refused request is not billed.
    assert_eq!(
        (
            lines[1]["requests"].clone(),
            lines[1]["overage_requests"].clone()
        ),
        (json!(2), json!(0))
    );
    // corp (enterprise): no quota.
    assert_eq!(lines[2]["included_requests"], Value::Null);
    assert_eq!(
        lines[3]["requests"], 0,
        "a customer without usage has a line"
    );
    assert_eq!(open["total_usd"], "0.026500001");

    // A customer's overrides are billed as they are enforced: beta's own
    // quota of 1, billed over it at 0.5, makes its second request overage.
    let patch = |overrides: Value| {
        admin(
            g,
            Method::PATCH,
            "/v1/customers/beta",
            Some(json!({ "overrides": overrides })),
        )
    };
    let patched = patch(json!({"monthly_requests": 1, "overage": "bill",
                               "overage_price_per_request_usd": 0.5}))
    .await;
    assert_eq!(patched.status, StatusCode::OK, "{:?}", patched.body);
    let overridden = get(g, "/v1/billing/summary?period=2026-10").await;
    let beta = &overridden["data"][1];
    assert_eq!(beta["included_requests"], 1);
    assert_eq!(beta["overage_requests"], 1);
    assert_eq!(beta["overage_charge_usd"], "0.5");
    // And an override of no quota at all includes every request.
    patch(json!({"monthly_requests": null})).await;
    let unlimited = get(g, "/v1/billing/summary?period=2026-10").await;
    assert_eq!(unlimited["data"][1]["included_requests"], Value::Null);
    patch(json!({})).await;
    assert_eq!(get(g, "/v1/billing/summary?period=2026-10").await, open);

    // Two closes at once: one set of lines, the same answer for both.
    let (a, b) = tokio::join!(
        admin_call(g, Method::POST, "/v1/billing/periods/2026-10/close"),
        admin_call(g, Method::POST, "/v1/billing/periods/2026-10/close"),
    );
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(a.json(), b.json());
    let closed = a.json();
    assert_eq!(closed["closed"], true);
    assert_eq!(closed["data"], open["data"]);
    // Late October usage does not change a closed period.
    let late = event(
        s.acme,
        datetime!(2026-10-30 12:00 UTC),
        "openai",
        None,
        Outcome::Ok,
        200,
        (1, 1),
        5,
    );
    g.store.write_usage(&[late]).await.unwrap();
    let again = admin_call(g, Method::POST, "/v1/billing/periods/2026-10/close").await;
    assert_eq!(again.json(), closed, "closing again returns the same lines");
    assert_eq!(get(g, "/v1/billing/summary?period=2026-10").await, closed);
    assert_eq!(count_lines(&s.db).await, 5, "one set of lines");

    for period in ["2026-11", "2027-01"] {
        let refused = admin_call(
            g,
            Method::POST,
            &format!("/v1/billing/periods/{period}/close"),
        )
        .await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{period}");
        assert!(refused.json()["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("period"));
    }
    s.gateway.stop().await;
}

async fn count_lines(db: &TestGuard) -> i64 {
    let rows = db.raw("SELECT count(*) FROM billing_lines").await;
    rows[0][0].as_deref().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_closes_once_sqlite() {
    billing_closes_once(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_closes_once_postgres() {
    billing_closes_once(Backend::Postgres).await;
}

/// Splits RFC 4180 text into records of fields.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => field.push(c),
        }
    }
    records
}

async fn export_is_csv(backend: Backend) {
    let s = seeded(backend).await;
    let reply = admin_call(
        &s.gateway,
        Method::GET,
        "/v1/usage/export?from=2026-10-01&to=2026-11-30&format=csv",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    let records = parse_csv(std::str::from_utf8(&reply.body).unwrap());
    assert_eq!(records[0][0], "id");
    assert_eq!(records[0].len(), 22);
    let rows = &records[1..];
    assert_eq!(rows.len(), s.events.len());
    for (row, event) in rows.iter().zip(&s.events) {
        assert_eq!(row[0], event.id.to_string(), "(ts, id) order");
        assert_eq!(row[1], event.client_request_id.clone().unwrap_or_default());
        assert_eq!(row[8], event.path);
        assert_eq!(row[10], event.outcome.as_str());
        assert_eq!(row[20], event.cost_nanos.to_string());
    }
    assert_eq!(rows[0][2], "2026-10-01T00:00:00.000000Z");
    assert_eq!(rows[0][1], "say \"hi\"", "quotes survive");
    assert_eq!(rows[0][8], "/v1/a,b", "commas survive");
    s.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_is_rfc4180_csv_in_order_sqlite() {
    export_is_csv(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_is_rfc4180_csv_in_order_postgres() {
    export_is_csv(Backend::Postgres).await;
}

#[test]
fn exporting_100k_rows_streams_in_flat_memory() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(TestGuard::create(Backend::Postgres));
    let gateway = Process::serve(&format!(
        "[admin]\ntokens = [\"admin-test-token\"]\n\n[database]\nurl = \"{}\"\n",
        db.url()
    ));
    let customer = CustomerId::new();
    let start = datetime!(2026-10-01 0:00 UTC);
    let events: Vec<UsageEvent> = (0..100_000u64)
        .map(|i| {
            let ts = start + Duration::from_millis(i * 10);
            event(
                customer,
                ts,
                "openai",
                Some("gpt-4o-mini"),
                Outcome::Ok,
                200,
                (i, 1),
                3,
            )
        })
        .collect();
    rt.block_on(async {
        let store = tollgate_store::open(db.url(), 2).await.unwrap();
        for batch in events.chunks(10_000) {
            store.write_usage(batch).await.unwrap();
        }
    });
    let before = gateway.status_kib("VmRSS");
    let reply = rt.block_on(async {
        let request = http::Request::get(format!(
            "http://{}/v1/usage/export?from=2026-10-01&to=2026-10-31",
            gateway.admin
        ))
        .header("authorization", "Bearer admin-test-token")
        .body(Full::new(Bytes::new()))
        .unwrap();
        send(&client(), request).await
    });
    let peak = gateway.status_kib("VmHWM");
    assert_eq!(reply.status, StatusCode::OK);
    let text = std::str::from_utf8(&reply.body).unwrap();
    let records = parse_csv(text);
    assert_eq!(records.len(), 100_001);
    for (row, event) in records[1..].iter().zip(&events) {
        assert_eq!(row[0], event.id.to_string());
        assert_eq!(row[16], event.input_tokens.to_string());
    }
    let body_kib = (text.len() / 1024) as u64;
    eprintln!("export of {body_kib} KiB: RSS before {before} KiB, peak {peak} KiB");
    assert!(
        peak < before + body_kib / 4,
        "memory stays flat: peak {peak} KiB vs {before} KiB before, for a {body_kib} KiB export"
    );
}

#[test]
fn the_cli_prints_the_same_reports() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config_path = write_file(
        dir.path(),
        "tollgate.toml",
        &format!(
            "[database]\nurl = \"sqlite://{}/tollgate.db\"\n\n[[tiers]]\nname = \"pro\"\nmonthly_requests = 1\noverage = \"bill\"\noverage_price_per_request_usd = 0.5\n",
            dir.path().display()
        ),
    );
    let created = cli_json(
        &config_path,
        &["customers", "create", "acme", "--tier", "pro", "--json"],
    );
    let acme: CustomerId = created["id"].as_str().unwrap().parse().unwrap();
    rt.block_on(async {
        let store =
            tollgate_store::open(&format!("sqlite://{}/tollgate.db", dir.path().display()), 1)
                .await
                .unwrap();
        let events: Vec<UsageEvent> = (0..3)
            .map(|i| {
                let ts = datetime!(2026-09-10 0:00 UTC) + Duration::from_secs(i * 86_400);
                event(
                    acme,
                    ts,
                    "openai",
                    Some("m"),
                    Outcome::Ok,
                    200,
                    (2, 3),
                    250_000_000,
                )
            })
            .collect();
        store.write_usage(&events).await.unwrap();
    });
    // The customer is billed for September only if it existed then.
    rusqlite::Connection::open(dir.path().join("tollgate.db"))
        .unwrap()
        .execute(
            "UPDATE customers SET created_at = '2026-01-01T00:00:00.000000Z'",
            [],
        )
        .unwrap();
    let by_day = cli_json(
        &config_path,
        &[
            "usage",
            "--from",
            "2026-09-01",
            "--to",
            "2026-09-30",
            "--by",
            "day",
            "--json",
        ],
    );
    assert_eq!(
        column(&by_day, "day"),
        [
            json!("2026-09-10"),
            json!("2026-09-11"),
            json!("2026-09-12")
        ]
    );
    assert_eq!(column(&by_day, "tokens"), [json!(5), json!(5), json!(5)]);
    let (code, table, _) = cli(
        &config_path,
        &[
            "usage",
            "--customer",
            "acme",
            "--from",
            "2026-09-01",
            "--to",
            "2026-09-30",
        ],
    );
    assert_eq!(code, 0);
    assert!(table.lines().nth(1).unwrap().contains("0.75"), "{table}");
    // 3 requests, 1 included, 2 over at 0.50, plus 0.75 metered.
    let closed = cli_json(
        &config_path,
        &["billing", "close", "--period", "2026-09", "--json"],
    );
    assert_eq!(closed["data"][0]["total_usd"], "1.75");
    let again = cli_json(
        &config_path,
        &["billing", "summary", "--period", "2026-09", "--json"],
    );
    assert_eq!(again, closed);
    let (code, _, stderr) = cli(&config_path, &["usage", "--from", "someday"]);
    assert_eq!(code, 2, "a bad date is a usage error: {stderr}");
    assert!(stderr.contains("from"), "{stderr}");
    let future = OffsetDateTime::now_utc().year() + 1;
    let (code, _, stderr) = cli(
        &config_path,
        &["billing", "close", "--period", &format!("{future}-01")],
    );
    assert_eq!(code, 2, "{stderr}");
}

/// docs/STORAGE.md: sums never overflow. A database already holding rows at the
/// top of the bigint range (several of them, so every sum leaves it) is
/// one a gateway starts on, enforces its quotas with, reports and bills.
async fn rows_at_the_bigint_limit(backend: Backend) {
    let db = TestGuard::create(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let store = tollgate_store::open(db.url(), 2).await.unwrap();
    store.migrate().await.unwrap();
    let huge = store
        .create_customer(tollgate_metering::keys::NewCustomer {
            id: CustomerId::new(),
            name: "huge".into(),
            tier: "capped".into(),
            overrides: json!({}),
            created_at: datetime!(2026-01-01 0:00 UTC),
        })
        .await
        .unwrap()
        .id;
    let max = i64::MAX as u64;
    let mut events = Vec::new();
    for day in 0..4u64 {
        let ts = datetime!(2026-11-02 10:00 UTC) + Duration::from_secs(day * 86_400);
        let mut e = event(
            huge,
            ts,
            "openai",
            Some("gpt-4o-mini"),
            Outcome::Ok,
            200,
            (max, max),
            i64::MAX,
        );
        (e.cache_read_tokens, e.cache_write_tokens) = (max, max);
        e.key_id = KeyId(Uuid::nil());
        events.push(e);
    }
    store.write_usage(&events).await.unwrap();
    drop(store);

    let toml = format!(
        r#"
[admin]
tokens = ["admin-test-token"]

[database]
url = "{db}"

[usage]
spool_dir = "{spool}"

[[tiers]]
name = "capped"
monthly_requests = 2
monthly_tokens = 1000
monthly_cost_usd = 5
overage = "bill"
overage_price_per_request_usd = 0.01

[[routes]]
name = "openai"
prefix = "/v1/"
upstream = "http://127.0.0.1:1"
"#,
        db = db.url(),
        spool = dir.path().join("spool").display(),
    );
    let clock = Arc::new(ManualClock::new(datetime!(2026-11-29 12:00 UTC)));
    // Loading the month's totals is part of starting.
    let gateway = TestGateway::start_on_clock(config(&toml), None, clock).await;

    let quota = get(&gateway, "/v1/quota/huge").await;
    let requests = &quota["limits"]["monthly_requests"];
    assert_eq!(
        (&requests["used"], &requests["remaining"]),
        (&json!(4), &json!(0))
    );
    let tokens = &quota["limits"]["monthly_tokens"];
    assert_eq!(
        (&tokens["used"], &tokens["remaining"]),
        (&json!(u64::MAX), &json!(0))
    );
    let cost = &quota["limits"]["monthly_cost_usd"];
    assert_eq!(
        (&cost["used"], &cost["remaining"]),
        (&json!("9223372036.854775807"), &json!("0"))
    );
    // The budgets are spent: the customer's next request is refused.
    let key = admin(
        &gateway,
        Method::POST,
        "/v1/keys",
        Some(json!({"customer": "huge"})),
    )
    .await;
    assert_eq!(key.status, StatusCode::CREATED, "{:?}", key.body);
    let key = key.json()["key"].as_str().unwrap().to_owned();
    // A new key reaches the data plane's cache within a second.
    let call = || async {
        send(
            &client(),
            authorized(Method::GET, gateway.url("/v1/models"), Some(&key))
                .body(Full::default())
                .unwrap(),
        )
        .await
    };
    eventually(Duration::from_secs(5), || async {
        call().await.status != StatusCode::UNAUTHORIZED
    })
    .await;
    let refused = call().await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.error_type(), "budget_exceeded");

    let summary = get(&gateway, "/v1/usage/summary").await;
    assert_eq!(summary["requests"], json!(4));
    assert_eq!(summary["input_tokens"], json!(max));
    assert_eq!(summary["tokens"], json!(u64::MAX));
    assert_eq!(summary["cost_usd"], json!("9223372036.854775807"));
    let daily = get(&gateway, "/v1/usage/daily").await;
    assert_eq!(
        column(&daily, "cost_usd"),
        vec![json!("9223372036.854775807"); 4]
    );
    for path in [
        "/v1/usage/by-customer",
        "/v1/usage/top-customers?by=tokens",
        "/v1/usage/top-customers?by=cost",
    ] {
        let document = get(&gateway, path).await;
        assert_eq!(
            column(&document, "cost_usd"),
            [json!("9223372036.854775807")],
            "{path}"
        );
        assert_eq!(column(&document, "output_tokens"), [json!(max)], "{path}");
    }
    let bill = get(&gateway, "/v1/billing/summary?period=2026-11").await;
    let line = &bill["data"][0];
    assert_eq!(line["customer"], "huge");
    assert_eq!(line["overage_requests"], json!(2));
    assert_eq!(line["overage_charge_usd"], "0.02");
    assert_eq!(line["metered_cost_usd"], "9223372036.854775807");
    assert_eq!(line["total_usd"], "9223372036.854775807");
    assert_eq!(line["total_usd_cents"], "9223372036.85");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_at_the_bigint_limit_sqlite() {
    rows_at_the_bigint_limit(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_at_the_bigint_limit_postgres() {
    rows_at_the_bigint_limit(Backend::Postgres).await;
}
