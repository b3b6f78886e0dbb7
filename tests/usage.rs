//! Metering end to end, on both backends: exact tokens and cost for every
//! upstream shape, the hidden usage chunk, every outcome, and no row lost or
//! doubled through a database outage or a SIGKILL.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tollgate_store::testing::{Backend, TestGuard};

/// One `usage_events` row, as both backends store it.
#[derive(Clone, Debug, PartialEq)]
struct Row {
    id: String,
    client_request_id: Option<String>,
    day: String,
    customer_id: String,
    key_id: String,
    instance: String,
    route: String,
    method: String,
    path: String,
    status: i64,
    outcome: String,
    latency_us: i64,
    upstream_latency_us: i64,
    request_bytes: i64,
    response_bytes: i64,
    model: Option<String>,
    input_tokens: i64,
    output_tokens: i64,
    cache_read_tokens: i64,
    cache_write_tokens: i64,
    cost_nanos: i64,
    cost_source: String,
}

const ROW_COLUMNS: &str = "client_request_id, customer_id, key_id, instance, route, method, \
    path, status, outcome, latency_us, upstream_latency_us, request_bytes, response_bytes, \
    model, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_nanos, \
    cost_source";

/// The `usage_daily` sums per (day, customer, key, route, model).
type Daily = BTreeMap<(String, String, String, String, String), [i64; 12]>;

/// Reads the usage tables of a test database.
async fn usage_rows(url: &str) -> Vec<Row> {
    if url.starts_with("postgres") {
        let client = pg(url).await;
        let sql = format!(
            "SELECT id::text, (ts AT TIME ZONE 'UTC')::date::text, {} FROM usage_events ORDER BY id",
            ROW_COLUMNS.replace("customer_id", "customer_id::text").replace("key_id", "key_id::text")
        );
        client
            .query(&sql, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| Row {
                id: r.get(0),
                day: r.get(1),
                client_request_id: r.get(2),
                customer_id: r.get(3),
                key_id: r.get(4),
                instance: r.get(5),
                route: r.get(6),
                method: r.get(7),
                path: r.get(8),
                status: i64::from(r.get::<_, i32>(9)),
                outcome: r.get(10),
                latency_us: r.get(11),
                upstream_latency_us: r.get(12),
                request_bytes: r.get(13),
                response_bytes: r.get(14),
                model: r.get(15),
                input_tokens: r.get(16),
                output_tokens: r.get(17),
                cache_read_tokens: r.get(18),
                cache_write_tokens: r.get(19),
                cost_nanos: r.get(20),
                cost_source: r.get(21),
            })
            .collect()
    } else {
        let conn = sqlite(url);
        let sql =
            format!("SELECT id, substr(ts, 1, 10), {ROW_COLUMNS} FROM usage_events ORDER BY id");
        let mut statement = conn.prepare(&sql).unwrap();
        statement
            .query_map([], |r| {
                Ok(Row {
                    id: r.get(0)?,
                    day: r.get(1)?,
                    client_request_id: r.get(2)?,
                    customer_id: r.get(3)?,
                    key_id: r.get(4)?,
                    instance: r.get(5)?,
                    route: r.get(6)?,
                    method: r.get(7)?,
                    path: r.get(8)?,
                    status: r.get(9)?,
                    outcome: r.get(10)?,
                    latency_us: r.get(11)?,
                    upstream_latency_us: r.get(12)?,
                    request_bytes: r.get(13)?,
                    response_bytes: r.get(14)?,
                    model: r.get(15)?,
                    input_tokens: r.get(16)?,
                    output_tokens: r.get(17)?,
                    cache_read_tokens: r.get(18)?,
                    cache_write_tokens: r.get(19)?,
                    cost_nanos: r.get(20)?,
                    cost_source: r.get(21)?,
                })
            })
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }
}

const DAILY_SQL: &str = "SELECT day::text, customer_id::text, key_id::text, route, model, \
    requests, rejected, errors, input_tokens, output_tokens, cache_read_tokens, \
    cache_write_tokens, request_bytes, response_bytes, cost_nanos, 0::bigint, 0::bigint \
    FROM usage_daily";

async fn usage_daily(url: &str) -> Daily {
    let mut daily = Daily::new();
    if url.starts_with("postgres") {
        for r in pg(url).await.query(DAILY_SQL, &[]).await.unwrap() {
            let mut sums = [0i64; 12];
            for (i, sum) in sums.iter_mut().enumerate() {
                *sum = r.get(5 + i);
            }
            daily.insert((r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)), sums);
        }
    } else {
        let sql = DAILY_SQL.replace("::text", "").replace("0::bigint", "0");
        let conn = sqlite(url);
        let mut statement = conn.prepare(&sql).unwrap();
        let rows = statement
            .query_map([], |r| {
                let mut sums = [0i64; 12];
                for (i, sum) in sums.iter_mut().enumerate() {
                    *sum = r.get(5 + i)?;
                }
                Ok((
                    (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?),
                    sums,
                ))
            })
            .unwrap();
        for row in rows {
            let (key, sums) = row.unwrap();
            daily.insert(key, sums);
        }
    }
    daily
}

const REJECTED: [&str; 5] = [
    "rate_limited",
    "quota_exceeded",
    "budget_exceeded",
    "route_forbidden",
    "payload_too_large",
];

/// `usage_daily` as docs/STORAGE.md defines it from `usage_events`.
fn expected_daily(rows: &[Row]) -> Daily {
    let mut daily = Daily::new();
    for row in rows {
        let key = (
            row.day.clone(),
            row.customer_id.clone(),
            row.key_id.clone(),
            row.route.clone(),
            row.model.clone().unwrap_or_default(),
        );
        let sums = daily.entry(key).or_insert([0; 12]);
        let rejected = REJECTED.contains(&row.outcome.as_str());
        let error = !rejected
            && (row.outcome == "upstream_error"
                || row.outcome == "upstream_timeout"
                || row.status >= 500);
        sums[0] += i64::from(!rejected);
        sums[1] += i64::from(rejected);
        sums[2] += i64::from(error);
        sums[3] += row.input_tokens;
        sums[4] += row.output_tokens;
        sums[5] += row.cache_read_tokens;
        sums[6] += row.cache_write_tokens;
        sums[7] += row.request_bytes;
        sums[8] += row.response_bytes;
        sums[9] += row.cost_nanos;
    }
    daily
}

async fn assert_daily_consistent(url: &str) {
    let rows = usage_rows(url).await;
    assert!(!rows.is_empty());
    assert_eq!(
        usage_daily(url).await,
        expected_daily(&rows),
        "usage_daily equals the sums of usage_events"
    );
}

async fn pg(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

fn sqlite(url: &str) -> rusqlite::Connection {
    let path = url.strip_prefix("sqlite://").unwrap();
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn
}

/// Waits until the database holds `count` usage rows (no more than that).
async fn wait_for_rows(url: &str, count: usize) -> Vec<Row> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = usage_rows(url).await;
        if rows.len() >= count {
            assert_eq!(rows.len(), count, "no more rows than requests");
            return rows;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {count} usage rows arrived",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A gateway with metered routes to a mock upstream, on a throwaway database.
struct Metered {
    db: TestGuard,
    mock: MockUpstream,
    gateway: TestGateway,
    _dir: tempfile::TempDir,
}

fn metered_toml(db_url: &str, spool: &Path, upstream: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
max_request_body = "64KiB"

[database]
url = "{db_url}"

[usage]
spool_dir = "{spool}"
flush_interval = "20ms"

[[tiers]]
name = "test"

[[routes]]
name = "openai"
prefix = "/v1/"
upstream = "{upstream}"
usage = "openai"
cost_header = "x-cost-usd"
strip_response_headers = ["x-cost-usd"]
timeout = "1s"

[[routes]]
name = "anthropic"
prefix = "/anthropic/"
strip_prefix = true
upstream = "{upstream}"
usage = "anthropic"

[[routes]]
name = "plain"
prefix = "/plain/"
strip_prefix = true
upstream = "{upstream}"
cost_header = "x-cost-usd"
input_tokens_header = "x-tokens-input"
output_tokens_header = "x-tokens-output"

[[routes]]
name = "dead"
prefix = "/dead/"
upstream = "http://127.0.0.1:1"

[pricing."gpt-4o-mini"]
input = 0.15
output = 0.60
cache_read = 0.075

[pricing."claude-3-5-haiku"]
input = 0.80
output = 4.0
cache_read = 0.08
cache_write = 1.0

[pricing."tiny"]
input = 0.0004
output = 0.0021
"#,
        spool = spool.display(),
    )
}

async fn metered(backend: Backend) -> Metered {
    let db = TestGuard::create(backend).await;
    let mock = MockUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let toml = metered_toml(db.url(), &dir.path().join("spool"), &mock.url());
    let gateway = TestGateway::start_on(config(&toml), None).await;
    Metered {
        db,
        mock,
        gateway,
        _dir: dir,
    }
}

impl Metered {
    /// POSTs JSON with the test key and `x-request-id: case`.
    async fn post(&self, path: &str, case: &str, body: Value, headers: &[(&str, &str)]) -> Reply {
        let mut request = self
            .gateway
            .request(Method::POST, path)
            .header("content-type", "application/json")
            .header("x-request-id", case);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        send(
            &client(),
            request
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap(),
        )
        .await
    }
}

fn by_case(rows: &[Row]) -> HashMap<String, Row> {
    rows.iter()
        .filter_map(|row| Some((row.client_request_id.clone()?, row.clone())))
        .collect()
}

fn chat(words: &str, stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "stream": stream, "messages": [{"role": "user", "content": words}]})
}

/// `data:` payloads of an SSE body, in order.
fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8(body.to_vec())
        .unwrap()
        .split("\n\n")
        .filter(|event| !event.trim().is_empty())
        .map(|event| {
            event
                .lines()
                .filter_map(|line| line.strip_prefix("data: "))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

/// Chat chunks without the fields that differ between two calls.
fn comparable_chunks(body: &[u8]) -> Vec<Value> {
    sse_data(body)
        .into_iter()
        .map(|data| match serde_json::from_str::<Value>(&data) {
            Ok(mut chunk) => {
                chunk.as_object_mut().unwrap().remove("id");
                chunk.as_object_mut().unwrap().remove("created");
                chunk
            }
            Err(_) => Value::String(data),
        })
        .collect()
}

/// (case, path, body, extra headers)
type Case = (
    &'static str,
    &'static str,
    Value,
    Vec<(&'static str, &'static str)>,
);
/// (input, output, cache_read, cache_write, model, cost_nanos, cost_source)
type Expected = (i64, i64, i64, i64, Option<&'static str>, i64, &'static str);

async fn shapes_are_metered_exactly(backend: Backend) {
    let m = metered(backend).await;
    let five = "one two three four five";
    let cases: Vec<Case> = vec![
        (
            "chat-json",
            "/v1/chat/completions",
            chat(five, false),
            vec![("x-mock-chunks", "7")],
        ),
        (
            "chat-cached",
            "/v1/chat/completions",
            chat(five, false),
            vec![("x-mock-chunks", "7"), ("x-mock-cache-read", "4")],
        ),
        (
            "chat-rounding",
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
            vec![("x-mock-chunks", "1")],
        ),
        (
            "chat-cost-header",
            "/v1/chat/completions",
            chat(five, false),
            vec![("x-mock-chunks", "7"), ("x-mock-cost-usd", "0.0123")],
        ),
        (
            "chat-garbage-cost",
            "/v1/chat/completions",
            chat(five, false),
            vec![("x-mock-chunks", "7"), ("x-mock-cost-usd", "abc")],
        ),
        (
            "chat-negative-cost",
            "/v1/chat/completions",
            chat(five, false),
            vec![("x-mock-chunks", "7"), ("x-mock-cost-usd", "-0.5")],
        ),
        (
            "chat-sse-hidden",
            "/v1/chat/completions",
            chat(five, true),
            vec![("x-mock-chunks", "7")],
        ),
        (
            "chat-sse-asked",
            "/v1/chat/completions",
            json!({"model": "gpt-4o-mini", "stream": true, "stream_options": {"include_usage": true},
                   "messages": [{"role": "user", "content": five}]}),
            vec![("x-mock-chunks", "7")],
        ),
        (
            "responses-json",
            "/v1/responses",
            json!({"model": "gpt-4o-mini", "input": "x y"}),
            vec![("x-mock-chunks", "4")],
        ),
        (
            "responses-sse",
            "/v1/responses",
            json!({"model": "gpt-4o-mini", "input": "x y", "stream": true}),
            vec![("x-mock-chunks", "4")],
        ),
        (
            "anthropic-json",
            "/anthropic/v1/messages",
            json!({"model": "claude-3-5-haiku-latest", "max_tokens": 100, "messages": [{"role": "user", "content": "a b c"}]}),
            vec![("x-mock-chunks", "5"), ("x-mock-cache-read", "2")],
        ),
        (
            "anthropic-sse",
            "/anthropic/v1/messages",
            json!({"model": "claude-3-5-haiku-latest", "max_tokens": 100, "stream": true, "messages": [{"role": "user", "content": "a b c"}]}),
            vec![("x-mock-chunks", "5"), ("x-mock-cache-read", "2")],
        ),
        // Anthropic's OpenAI-compatible endpoint, through the Anthropic
        // route: OpenAI's shapes, and a stream that did not ask for usage.
        (
            "anthropic-openai-json",
            "/anthropic/v1/chat/completions",
            json!({"model": "claude-3-5-haiku-latest", "messages": [{"role": "user", "content": "a b c"}]}),
            vec![("x-mock-chunks", "5"), ("x-mock-cache-read", "2")],
        ),
        (
            "anthropic-openai-sse",
            "/anthropic/v1/chat/completions",
            json!({"model": "claude-3-5-haiku-latest", "stream": true, "messages": [{"role": "user", "content": "a b c"}]}),
            vec![("x-mock-chunks", "5"), ("x-mock-cache-read", "2")],
        ),
        // Anthropic's Messages API served on the OpenAI route (vLLM and
        // LiteLLM serve both): read the Anthropic way.
        (
            "openai-route-messages-json",
            "/v1/messages",
            json!({"model": "claude-3-5-haiku-latest", "max_tokens": 100, "messages": [{"role": "user", "content": "a b c"}]}),
            vec![("x-mock-chunks", "5"), ("x-mock-cache-read", "2")],
        ),
        (
            "openai-route-messages-sse",
            "/v1/messages",
            json!({"model": "claude-3-5-haiku-latest", "max_tokens": 100, "stream": true, "messages": [{"role": "user", "content": "a b c"}]}),
            vec![("x-mock-chunks", "5"), ("x-mock-cache-read", "2")],
        ),
        (
            "embeddings",
            "/v1/embeddings",
            json!({"model": "text-embedding-3-small", "input": "six words are in this input"}),
            vec![],
        ),
        (
            "token-headers",
            "/plain/v1/chat/completions",
            chat(five, false),
            vec![
                ("x-mock-chunks", "2"),
                ("x-mock-token-headers", "1"),
                ("x-mock-cost-usd", "0.5"),
            ],
        ),
    ];
    let mut replies = HashMap::new();
    let mut sent = HashMap::new();
    for (case, path, body, headers) in &cases {
        let reply = m.post(path, case, body.clone(), headers).await;
        assert_eq!(reply.status, StatusCode::OK, "{case}: {:?}", reply.body);
        if path.starts_with("/v1/") {
            assert!(
                reply.headers.get("x-cost-usd").is_none(),
                "{case}: stripped"
            );
        }
        sent.insert(case.to_string(), body.to_string().len() as i64);
        replies.insert(case.to_string(), reply);
    }
    let rows = wait_for_rows(m.db.url(), cases.len()).await;
    let rows = by_case(&rows);
    // (input, output, cache_read, cache_write, model, cost_nanos, cost_source)
    let haiku = (
        3,
        5,
        2,
        0,
        Some("claude-3-5-haiku-latest"),
        22_560,
        "pricing",
    );
    let expected: [(&str, Expected); 18] = [
        // 5 × 0.15 + 7 × 0.60 = 4.95 USD per million = 4950 nano-USD
        (
            "chat-json",
            (5, 7, 0, 0, Some("gpt-4o-mini"), 4950, "pricing"),
        ),
        // 5 × 0.15 + 4 × 0.075 + 7 × 0.60 = 5.25
        (
            "chat-cached",
            (5, 7, 4, 0, Some("gpt-4o-mini"), 5250, "pricing"),
        ),
        // 0.4 + 2.1 = 2.5 nano: summed exactly, then rounded once, half up
        // (per-class rounding would give 2, half-even 2)
        ("chat-rounding", (1, 1, 0, 0, Some("tiny"), 3, "pricing")),
        (
            "chat-cost-header",
            (5, 7, 0, 0, Some("gpt-4o-mini"), 12_300_000, "header"),
        ),
        (
            "chat-garbage-cost",
            (5, 7, 0, 0, Some("gpt-4o-mini"), 4950, "pricing"),
        ),
        (
            "chat-negative-cost",
            (5, 7, 0, 0, Some("gpt-4o-mini"), 4950, "pricing"),
        ),
        (
            "chat-sse-hidden",
            (5, 7, 0, 0, Some("gpt-4o-mini"), 4950, "pricing"),
        ),
        (
            "chat-sse-asked",
            (5, 7, 0, 0, Some("gpt-4o-mini"), 4950, "pricing"),
        ),
        // 2 × 0.15 + 4 × 0.60 = 2.7
        (
            "responses-json",
            (2, 4, 0, 0, Some("gpt-4o-mini"), 2700, "pricing"),
        ),
        (
            "responses-sse",
            (2, 4, 0, 0, Some("gpt-4o-mini"), 2700, "pricing"),
        ),
        // dated name priced as "claude-3-5-haiku": 3 × 0.80 + 5 × 4.0 + 2 × 0.08 = 22.56
        (
            "anthropic-json",
            (
                3,
                5,
                2,
                0,
                Some("claude-3-5-haiku-latest"),
                22_560,
                "pricing",
            ),
        ),
        (
            "anthropic-sse",
            (
                3,
                5,
                2,
                0,
                Some("claude-3-5-haiku-latest"),
                22_560,
                "pricing",
            ),
        ),
        ("anthropic-openai-json", haiku),
        ("anthropic-openai-sse", haiku),
        ("openai-route-messages-json", haiku),
        ("openai-route-messages-sse", haiku),
        (
            "embeddings",
            (6, 0, 0, 0, Some("text-embedding-3-small"), 0, "none"),
        ),
        ("token-headers", (5, 2, 0, 0, None, 500_000_000, "header")),
    ];
    for (case, (input, output, cache_read, cache_write, model, cost, source)) in expected {
        let row = &rows[case];
        let reply = &replies[case];
        let got = (
            row.input_tokens,
            row.output_tokens,
            row.cache_read_tokens,
            row.cache_write_tokens,
            row.model.as_deref(),
            row.cost_nanos,
            row.cost_source.as_str(),
        );
        assert_eq!(
            got,
            (input, output, cache_read, cache_write, model, cost, source),
            "{case}"
        );
        assert_eq!(row.outcome, "ok", "{case}");
        assert_eq!(row.status, 200, "{case}");
        assert_eq!(row.method, "POST");
        assert_eq!(
            row.response_bytes,
            reply.body.len() as i64,
            "{case}: bytes the client got"
        );
        assert_eq!(
            row.request_bytes, sent[case],
            "{case}: bytes the client sent"
        );
        assert!(
            row.upstream_latency_us > 0 && row.upstream_latency_us <= row.latency_us,
            "{case}"
        );
        assert_eq!(row.instance, m.gateway.config.server.instance_id);
        assert_eq!(
            reply.headers["x-request-id"], case,
            "{case}: the client's id is echoed"
        );
        assert_ne!(row.id, case, "{case}: the usage id is the gateway's own");
    }
    assert_eq!(rows["token-headers"].route, "plain");
    assert_eq!(rows["token-headers"].path, "/plain/v1/chat/completions");
    assert_eq!(rows["anthropic-sse"].route, "anthropic");
    let scrape = Scrape::of(m.gateway.admin).await;
    assert_eq!(
        scrape.value(INVALID, &[("route", "openai"), ("field", "cost")]),
        2.0,
        "the garbage and the negative cost header"
    );

    // The client that did not ask for usage sees exactly the stream it
    // asked for, while the upstream was asked for usage.
    let hidden = &replies["chat-sse-hidden"].body;
    assert!(
        !String::from_utf8_lossy(hidden).contains("usage"),
        "no usage leaks"
    );
    let direct = send(
        &client(),
        http::Request::post(format!("{}/v1/chat/completions", m.mock.url()))
            .header("content-type", "application/json")
            .header("x-mock-chunks", "7")
            .body(Full::new(Bytes::from(chat(five, true).to_string())))
            .unwrap(),
    )
    .await;
    assert_eq!(comparable_chunks(hidden), comparable_chunks(&direct.body));
    assert_eq!(
        sse_data(hidden).len(),
        7 + 2,
        "7 content chunks, the final chunk, [DONE]"
    );
    let upstream_saw = |case: &str| -> Vec<Value> {
        m.mock
            .requests()
            .iter()
            .filter(|r| r.headers.get("x-request-id").is_some_and(|v| v == case))
            .map(|r| serde_json::from_slice(&r.body).unwrap())
            .collect()
    };
    let hidden_saw = upstream_saw("chat-sse-hidden");
    assert_eq!(hidden_saw.len(), 1);
    assert_eq!(hidden_saw[0]["stream_options"]["include_usage"], true);
    assert_eq!(hidden_saw[0]["messages"], chat(five, true)["messages"]);
    // Likewise on the Anthropic route's OpenAI-compatible endpoint.
    let anthropic_saw = upstream_saw("anthropic-openai-sse");
    assert_eq!(anthropic_saw[0]["stream_options"]["include_usage"], true);
    let anthropic_hidden = &replies["anthropic-openai-sse"].body;
    assert!(
        !String::from_utf8_lossy(anthropic_hidden).contains("usage"),
        "no usage leaks on the Anthropic route either"
    );
    assert_eq!(sse_data(anthropic_hidden).len(), 5 + 2);
    // The client that asked gets its usage chunk.
    let asked = sse_data(&replies["chat-sse-asked"].body);
    let usage_chunk: Value = serde_json::from_str(&asked[asked.len() - 2]).unwrap();
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 7);

    // A request without its own id: the usage id is the response's id.
    let reply = send(
        &client(),
        m.gateway
            .request(Method::GET, "/plain/anything")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let rows = wait_for_rows(m.db.url(), cases.len() + 1).await;
    let own = rows
        .iter()
        .find(|row| row.client_request_id.is_none())
        .unwrap();
    assert_eq!(reply.headers["x-request-id"], own.id.as_str());
    assert_eq!(
        (own.method.as_str(), own.path.as_str()),
        ("GET", "/plain/anything")
    );
    assert_eq!(own.cost_source, "none");
    assert_daily_consistent(m.db.url()).await;
    m.gateway.stop().await;
}

const INVALID: &str = "tollgate_usage_invalid_values_total";

/// An upstream that answers every request with the JSON body its path
/// names (`/absurd`, `/unusable`), as no real API would: the usage objects
/// an upstream with a bug sends. Closes each connection after one answer.
async fn lying_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // The head, then as many body bytes as it declares.
                let head_end = loop {
                    let Ok(n) = stream.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    if let Some(at) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                        break at + 4;
                    }
                };
                let head = String::from_utf8_lossy(&request[..head_end]).to_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .map_or(0, |value| value.trim().parse().unwrap());
                while request.len() < head_end + length {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let usage = if head.starts_with("post /absurd") {
                    // The incident: 5 × 10^18 tokens each way.
                    json!({"prompt_tokens": 5_000_000_000_000_000_000u64,
                           "completion_tokens": 5_000_000_000_000_000_000u64})
                } else {
                    json!({"prompt_tokens": -5, "completion_tokens": 7.5,
                           "prompt_tokens_details": {"cached_tokens": "2"}})
                };
                let body = json!({"model": "gpt-4o-mini", "usage": usage}).to_string();
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    format!("http://{addr}")
}

/// docs/STORAGE.md: bad values never reach a row. Absurd and unusable counts are
/// stored as 0, an absurd cost header gives way to pricing, and each
/// ignored value is counted by route and field.
async fn absurd_usage_is_ignored_and_counted(backend: Backend) {
    let db = TestGuard::create(backend).await;
    let mock = MockUpstream::start().await.unwrap();
    let lying = lying_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut toml = metered_toml(db.url(), &dir.path().join("spool"), &mock.url());
    toml += &format!(
        r#"
[[routes]]
name = "lying"
prefix = "/lying/"
strip_prefix = true
upstream = "{lying}"
usage = "openai"
"#
    );
    let gateway = TestGateway::start_on(config(&toml), None).await;
    let m = Metered {
        db,
        mock,
        gateway,
        _dir: dir,
    };
    let five = "one two three four five";
    let cases: [Case; 7] = [
        ("absurd-body", "/lying/absurd", chat(five, false), vec![]),
        (
            "unusable-body",
            "/lying/unusable",
            chat(five, false),
            vec![],
        ),
        (
            "absurd-cache",
            "/anthropic/v1/messages",
            json!({"model": "claude-3-5-haiku-latest", "max_tokens": 100,
                   "messages": [{"role": "user", "content": "a b c"}]}),
            vec![
                ("x-mock-chunks", "5"),
                ("x-mock-cache-read", "5000000000000000000"),
            ],
        ),
        (
            "absurd-cost",
            "/v1/chat/completions",
            chat(five, false),
            vec![
                ("x-mock-chunks", "7"),
                ("x-mock-cost-usd", "1000000.000000001"),
            ],
        ),
        (
            "largest-cost",
            "/v1/chat/completions",
            chat(five, false),
            vec![("x-mock-chunks", "7"), ("x-mock-cost-usd", "1000000")],
        ),
        (
            "absurd-headers",
            "/plain/v1/chat/completions",
            chat(five, false),
            vec![
                ("x-mock-header", "x-tokens-input: 5000000000000000000"),
                ("x-mock-header", "x-tokens-output: -3"),
                ("x-mock-cost-usd", "9223372036.854775807"),
            ],
        ),
        (
            "top-headers",
            "/plain/v1/chat/completions",
            chat(five, false),
            vec![
                ("x-mock-header", "x-tokens-input: 1000000000000"),
                ("x-mock-header", "x-tokens-output: 1.0"),
            ],
        ),
    ];
    for (case, path, body, headers) in &cases {
        let reply = m.post(path, case, body.clone(), headers).await;
        assert_eq!(reply.status, StatusCode::OK, "{case}: {:?}", reply.body);
    }
    let rows = wait_for_rows(m.db.url(), cases.len()).await;
    let rows = by_case(&rows);
    let expected: [(&str, Expected); 7] = [
        (
            "absurd-body",
            (0, 0, 0, 0, Some("gpt-4o-mini"), 0, "pricing"),
        ),
        (
            "unusable-body",
            (0, 0, 0, 0, Some("gpt-4o-mini"), 0, "pricing"),
        ),
        // Input and output stand; the cache count does not: 3 × 0.80 + 5 × 4.0.
        (
            "absurd-cache",
            (
                3,
                5,
                0,
                0,
                Some("claude-3-5-haiku-latest"),
                22_400,
                "pricing",
            ),
        ),
        (
            "absurd-cost",
            (5, 7, 0, 0, Some("gpt-4o-mini"), 4950, "pricing"),
        ),
        (
            "largest-cost",
            (
                5,
                7,
                0,
                0,
                Some("gpt-4o-mini"),
                1_000_000_000_000_000,
                "header",
            ),
        ),
        ("absurd-headers", (0, 0, 0, 0, None, 0, "none")),
        ("top-headers", (1_000_000_000_000, 0, 0, 0, None, 0, "none")),
    ];
    for (case, want) in expected {
        let row = &rows[case];
        let got = (
            row.input_tokens,
            row.output_tokens,
            row.cache_read_tokens,
            row.cache_write_tokens,
            row.model.as_deref(),
            row.cost_nanos,
            row.cost_source.as_str(),
        );
        assert_eq!(got, want, "{case}");
        assert_eq!(row.outcome, "ok", "{case}");
    }
    let scrape = Scrape::of(m.gateway.admin).await;
    let counted =
        |route: &str, field: &str| scrape.value(INVALID, &[("route", route), ("field", field)]);
    // The lying upstream: both counts of both bodies, and the cached count
    // written as text.
    assert_eq!(counted("lying", "input_tokens"), 2.0);
    assert_eq!(counted("lying", "output_tokens"), 2.0);
    assert_eq!(counted("lying", "cache_read_tokens"), 1.0);
    assert_eq!(counted("anthropic", "cache_read_tokens"), 1.0);
    assert_eq!(
        counted("openai", "cost"),
        1.0,
        "1,000,000 USD itself is fine"
    );
    assert_eq!(counted("plain", "input_tokens"), 1.0);
    assert_eq!(counted("plain", "output_tokens"), 2.0, "-3 and 1.0");
    assert_eq!(counted("plain", "cost"), 1.0);
    assert_eq!(scrape.sum(INVALID, &[]), 11.0, "nothing else");
    // What was believed is what the quota counts.
    let usage = m.gateway.get("/_tollgate/usage").await.json();
    assert_eq!(
        usage["totals"]["tokens"],
        json!(1_000_000_000_000u64 + 3 + 5 + 5 + 7 + 5 + 7),
        "{usage}"
    );
    assert_daily_consistent(m.db.url()).await;
    m.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_usage_is_ignored_and_counted_sqlite() {
    absurd_usage_is_ignored_and_counted(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_usage_is_ignored_and_counted_postgres() {
    absurd_usage_is_ignored_and_counted(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shapes_are_metered_exactly_sqlite() {
    shapes_are_metered_exactly(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shapes_are_metered_exactly_postgres() {
    shapes_are_metered_exactly(Backend::Postgres).await;
}

async fn every_outcome_is_recorded(backend: Backend) {
    let m = metered(backend).await;
    let stream = json!({"model": "claude-3-5-haiku-latest", "max_tokens": 1000, "stream": true,
                        "messages": [{"role": "user", "content": "a b c"}]});

    // Upstream breaks the body after two events: the client sees the head
    // and then a broken body.
    let response = client()
        .request(
            m.gateway
                .request(Method::POST, "/anthropic/v1/messages")
                .header("content-type", "application/json")
                .header("x-request-id", "reset")
                .header("x-mock-reset-after", "2")
                .body(Full::new(Bytes::from(stream.to_string())))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the head was already sent"
    );
    assert!(
        response.into_body().collect().await.is_err(),
        "the body breaks"
    );
    // Upstream never answers: 504 after the route's 1 s.
    let reply = m
        .post(
            "/v1/chat/completions",
            "hang",
            chat("x", false),
            &[("x-mock-hang", "headers")],
        )
        .await;
    assert_eq!(reply.error_type(), "upstream_timeout");
    // Upstream answers 500: its status is recorded.
    let reply = m
        .post(
            "/v1/chat/completions",
            "status-500",
            chat("x", false),
            &[("x-mock-status", "500")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    // Upstream refuses the connection.
    let reply = m.post("/dead/x", "refused", json!({}), &[]).await;
    assert_eq!(reply.error_type(), "upstream_unavailable");
    // Too large a body.
    let big = json!({"pad": "x".repeat(70_000)});
    let reply = m.post("/v1/chat/completions", "too-large", big, &[]).await;
    assert_eq!(reply.error_type(), "payload_too_large");
    // A key limited to another route.
    let accounts = tollgate::snapshot::accounts_for(&m.gateway.config, m.gateway.store.clone());
    let limited = accounts
        .create_key(tollgate_accounts::KeyRequest {
            customer: "limited".into(),
            tier: Some("test".into()),
            routes: Some(vec!["plain".into()]),
            ..Default::default()
        })
        .await
        .unwrap();
    let reply = eventually_status(&m, &limited.key, "/v1/chat/completions", "forbidden").await;
    assert_eq!(reply.error_type(), "route_forbidden");
    // Unknown keys and missing keys record nothing.
    let unknown = authorized(Method::GET, m.gateway.url("/v1/x"), Some("tg_nope"))
        .body(Full::default())
        .unwrap();
    assert_eq!(
        send(&client(), unknown).await.status,
        StatusCode::UNAUTHORIZED
    );

    // The client goes away mid-stream: client_closed with what passed.
    let response = client()
        .request(
            m.gateway
                .request(Method::POST, "/anthropic/v1/messages")
                .header("content-type", "application/json")
                .header("x-request-id", "gone-mid-body")
                .header("x-mock-chunks", "50")
                .header("x-mock-chunk-delay-ms", "20")
                .header("x-mock-cache-read", "2")
                .body(Full::new(Bytes::from(stream.to_string())))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = response.into_body();
    let mut received = 0;
    while received < 3 {
        let frame = body.frame().await.unwrap().unwrap();
        if frame.is_data() {
            received += 1;
        }
    }
    drop(body);
    // The client goes away before the upstream answered at all.
    let waiting = client().request(
        m.gateway
            .request(Method::POST, "/v1/chat/completions")
            .header("content-type", "application/json")
            .header("x-request-id", "gone-before-head")
            .header("x-mock-hang", "headers")
            .body(Full::new(Bytes::from(chat("x", false).to_string())))
            .unwrap(),
    );
    assert!(tokio::time::timeout(Duration::from_millis(300), waiting)
        .await
        .is_err());

    let rows = wait_for_rows(m.db.url(), 8).await;
    let rows = by_case(&rows);
    let outcome = |case: &str| (rows[case].outcome.as_str(), rows[case].status);
    assert_eq!(outcome("reset"), ("upstream_error", 200));
    assert_eq!(outcome("hang"), ("upstream_timeout", 504));
    assert_eq!(outcome("status-500"), ("ok", 500));
    assert_eq!(outcome("refused"), ("upstream_error", 502));
    assert_eq!(outcome("too-large"), ("payload_too_large", 413));
    assert_eq!(outcome("forbidden"), ("route_forbidden", 403));
    assert_eq!(outcome("gone-mid-body"), ("client_closed", 200));
    assert_eq!(outcome("gone-before-head"), ("client_closed", 0));
    let gone = &rows["gone-mid-body"];
    // message_start came through: its input and cache counts are known;
    // output is what message_start said so far, far below the 50 chunks.
    assert_eq!((gone.input_tokens, gone.cache_read_tokens), (3, 2));
    assert!(
        gone.output_tokens < 50,
        "partial output: {}",
        gone.output_tokens
    );
    assert!(gone.response_bytes > 0);
    assert_eq!(gone.model.as_deref(), Some("claude-3-5-haiku-latest"));
    let reset = &rows["reset"];
    assert!(
        reset.response_bytes > 0,
        "the two events that passed are counted"
    );
    assert_eq!(
        reset.input_tokens, 3,
        "message_start passed before the reset"
    );
    assert_eq!(
        rows["forbidden"].customer_id,
        limited.customer_id.to_string()
    );
    assert_eq!(rows["too-large"].response_bytes, 0);
    assert_daily_consistent(m.db.url()).await;
    let daily = usage_daily(m.db.url()).await;
    let totals = daily.values().fold([0i64; 3], |acc, sums| {
        [acc[0] + sums[0], acc[1] + sums[1], acc[2] + sums[2]]
    });
    // requests: reset, hang, status-500, refused, both gone; rejected:
    // too-large, forbidden; errors: reset, hang, status-500, refused.
    assert_eq!(totals, [6, 2, 4]);
    m.gateway.stop().await;
}

/// Sends until the new key is in the cache (the change feed is asynchronous).
async fn eventually_status(m: &Metered, key: &str, path: &str, case: &str) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let request = authorized(Method::POST, m.gateway.url(path), Some(key))
            .header("content-type", "application/json")
            .header("x-request-id", case)
            .body(Full::new(Bytes::from(chat("x", false).to_string())))
            .unwrap();
        let reply = send(&client(), request).await;
        if reply.status != StatusCode::UNAUTHORIZED || Instant::now() > deadline {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_is_recorded_sqlite() {
    every_outcome_is_recorded(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_is_recorded_postgres() {
    every_outcome_is_recorded(Backend::Postgres).await;
}

/// Sends `count` metered requests, `concurrency` at a time, each with its
/// own `x-request-id`; returns the ids of those that completed, with when.
async fn load(
    url: String,
    key: String,
    count: usize,
    concurrency: usize,
) -> Vec<(String, Instant)> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (url, key, next) = (url.clone(), key.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let client = client();
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return done;
                }
                let id = format!("load-{i}");
                let request = authorized(
                    Method::POST,
                    format!("{url}/v1/chat/completions"),
                    Some(&key),
                )
                .header("content-type", "application/json")
                .header("x-request-id", &id)
                .body(Full::new(Bytes::from(chat("a b", i % 2 == 0).to_string())))
                .unwrap();
                let Ok(response) = client.request(request).await else {
                    // The gateway is gone (killed): this worker is done.
                    return done;
                };
                if response.status() != StatusCode::OK {
                    continue;
                }
                if response.into_body().collect().await.is_ok() {
                    done.push((id, Instant::now()));
                }
            }
        }));
    }
    let mut completed = Vec::new();
    for worker in workers {
        completed.extend(worker.await.unwrap());
    }
    completed
}

/// The in-process gateway's recorder counters.
fn recorder_stats(
    gateway: &TestGateway,
) -> std::sync::Arc<tollgate_metering::usage::recorder::RecorderStats> {
    gateway
        .running
        .as_ref()
        .unwrap()
        .metering()
        .recorder
        .stats()
        .clone()
}

/// Each of the `completed` requests (by `x-request-id`) has a row in `rows`.
fn assert_every_request_has_its_row(rows: &[Row], completed: &[(String, Instant)]) {
    let recorded: HashSet<&str> = rows
        .iter()
        .filter_map(|row| row.client_request_id.as_deref())
        .collect();
    for (id, _) in completed {
        assert!(recorded.contains(id.as_str()), "{id} has its row");
    }
}

fn assert_no_duplicates(rows: &[Row]) {
    let ids: HashSet<&str> = rows.iter().map(|row| row.id.as_str()).collect();
    assert_eq!(ids.len(), rows.len(), "no usage id appears twice");
    let cases: HashSet<&str> = rows
        .iter()
        .filter_map(|row| row.client_request_id.as_deref())
        .collect();
    assert_eq!(cases.len(), rows.len(), "no request has two rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_under_load_loses_no_row() {
    let db = TestGuard::create(Backend::Postgres).await;
    let (proxy, through) = CutProxy::for_postgres(db.url()).await;
    let mock = MockUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let toml = metered_toml(&through, &dir.path().join("spool"), &mock.url());
    let gateway = TestGateway::start_on(config(&toml), None).await;
    let key = gateway.key.clone().unwrap();
    let url = format!("http://{}", gateway.addr);

    let traffic = tokio::spawn(load(url, key, 3000, 16));
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let stats = recorder_stats(&gateway);
    assert!(
        !stats.database_up.load(Ordering::Relaxed),
        "the recorder noticed the outage"
    );
    proxy.restore();
    let completed = traffic.await.unwrap();
    assert_eq!(
        completed.len(),
        3000,
        "requests are served through the outage"
    );
    let rows = wait_for_rows(db.url(), completed.len()).await;
    assert_no_duplicates(&rows);
    assert_every_request_has_its_row(&rows, &completed);
    assert!(rows
        .iter()
        .all(|row| row.outcome == "ok" && row.input_tokens == 2));
    assert_daily_consistent(db.url()).await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_database_write_holds_no_row_back_from_the_spool() {
    // A write that hangs (here on a lock another session holds) is not a
    // failure the writer can see; the spooler must still put every event on
    // disk within flush_interval, or a SIGKILL now would lose them.
    let db = TestGuard::create(Backend::Postgres).await;
    let mock = MockUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let toml = metered_toml(db.url(), &dir.path().join("spool"), &mock.url()).replace(
        "flush_interval = \"20ms\"",
        "flush_interval = \"20ms\"\nbatch_size = 10",
    );
    let gateway = TestGateway::start_on(config(&toml), None).await;
    let key = gateway.key.clone().unwrap();
    let stats = recorder_stats(&gateway);
    let locker = pg(db.url()).await;
    locker
        .batch_execute("BEGIN; LOCK TABLE usage_daily IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    // Far more batches of 10 than the writer may hold in memory.
    let completed = load(format!("http://{}", gateway.addr), key, 1000, 16).await;
    assert_eq!(completed.len(), 1000);
    let deadline = Instant::now() + Duration::from_secs(3);
    while stats.rows_spooled.load(Ordering::Relaxed) < 1000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        stats.rows_spooled.load(Ordering::Relaxed),
        1000,
        "every row is in the spool while the write hangs"
    );
    assert_eq!(
        stats.rows_written.load(Ordering::Relaxed),
        0,
        "the write did hang"
    );

    locker.batch_execute("COMMIT").await.unwrap();
    let rows = wait_for_rows(db.url(), 1000).await;
    assert_no_duplicates(&rows);
    assert_every_request_has_its_row(&rows, &completed);
    assert_daily_consistent(db.url()).await;
    gateway.stop().await;
}

async fn sigkill_loses_at_most_the_last_flush_interval(backend: Backend) {
    let db = TestGuard::create(backend).await;
    let mock = MockUpstream::start().await.unwrap();
    let flush = Duration::from_millis(200);
    let toml = metered_toml(db.url(), Path::new("spool"), &mock.url())
        .replace("flush_interval = \"20ms\"", "flush_interval = \"200ms\"");
    let gateway = Process::serve_logged(&toml, "info");
    let key = gateway.key.clone().unwrap();
    let url = format!("http://{}", gateway.addr);

    let traffic = tokio::spawn(load(url, key, 1_000_000, 16));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed_at = Instant::now();
    let gateway = gateway.kill_and_restart("info");
    let completed = traffic.await.unwrap();
    assert!(
        completed.len() > 100,
        "load ran: {} requests",
        completed.len()
    );

    // The restart replayed the spool; give the new process time to flush.
    let owed: Vec<&String> = completed
        .iter()
        .filter(|(_, at)| *at + flush < killed_at)
        .map(|(id, _)| id)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let rows = loop {
        let rows = usage_rows(db.url()).await;
        let recorded: HashSet<String> = rows
            .iter()
            .filter_map(|row| row.client_request_id.clone())
            .collect();
        let missing: Vec<&&String> = owed.iter().filter(|id| !recorded.contains(**id)).collect();
        if missing.is_empty() {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} rows owed are missing, e.g. {:?}",
            missing.len(),
            owed.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_no_duplicates(&rows);
    assert!(
        rows.len() <= completed.len() + 16,
        "no row for a request never sent"
    );
    let logs = gateway.logs();
    assert!(
        !logs.iter().any(|line| line.contains("\"ERROR\"")),
        "restart is clean: {logs:?}"
    );
    assert_daily_consistent(db.url()).await;
    drop(gateway);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_at_most_the_last_flush_interval_sqlite() {
    sigkill_loses_at_most_the_last_flush_interval(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_at_most_the_last_flush_interval_postgres() {
    sigkill_loses_at_most_the_last_flush_interval(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_flushes_every_row_and_replays_the_spool_on_start() {
    // The database goes away, requests keep coming and are served; the
    // gateway stops with its rows only in the spool; a new gateway on the
    // same spool writes them once the database is back.
    let db = TestGuard::create(Backend::Postgres).await;
    let (proxy, through) = CutProxy::for_postgres(db.url()).await;
    let mock = MockUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let toml = metered_toml(&through, &spool, &mock.url());
    let gateway = TestGateway::start_on(config(&toml), None).await;
    let key = gateway.key.clone().unwrap();
    proxy.cut();
    let completed = load(format!("http://{}", gateway.addr), key, 200, 8).await;
    assert_eq!(completed.len(), 200);
    gateway.stop().await;
    assert!(
        usage_rows(db.url()).await.is_empty(),
        "nothing reached the database"
    );
    let spooled: u64 = std::fs::read_dir(&spool)
        .unwrap()
        .map(|entry| entry.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        spooled > 200 * 100,
        "the rows wait in the spool ({spooled} bytes)"
    );

    proxy.restore();
    let gateway = TestGateway::start_on(config(&toml), None).await;
    let rows = usage_rows(db.url()).await;
    assert_eq!(rows.len(), 200, "replayed before serving");
    assert_no_duplicates(&rows);
    gateway.stop().await;
    // Another restart replays nothing twice.
    let gateway = TestGateway::start_on(config(&toml), None).await;
    gateway.stop().await;
    let rows = usage_rows(db.url()).await;
    assert_eq!(rows.len(), 200);
    assert_daily_consistent(db.url()).await;
}

/// A write hung past 15 s counts as failed: the database is down in the
/// gateway's eyes (so a full spool refuses), and the rows, still in the
/// spool, reach the database once, when it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_hung_past_its_bound_fails_and_is_written_again_once() {
    let Metered {
        db,
        mock: _mock,
        gateway,
        _dir,
    } = metered(Backend::Postgres).await;
    let key = gateway.key.clone().unwrap();
    let stats = recorder_stats(&gateway);
    let locker = pg(db.url()).await;
    locker
        .batch_execute("BEGIN; LOCK TABLE usage_daily IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let completed = load(format!("http://{}", gateway.addr), key, 50, 4).await;
    assert_eq!(completed.len(), 50);
    let started = Instant::now();
    while stats.database_up.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(25) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    assert!(
        !stats.database_up.load(Ordering::Relaxed),
        "down after {took:?}"
    );
    assert!(
        took > Duration::from_secs(10),
        "not before its bound: {took:?}"
    );
    assert_eq!(stats.rows_written.load(Ordering::Relaxed), 0);
    assert_eq!(stats.rows_spooled.load(Ordering::Relaxed), 50);
    locker.batch_execute("COMMIT").await.unwrap();
    let rows = wait_for_rows(db.url(), 50).await;
    assert_no_duplicates(&rows);
    assert_every_request_has_its_row(&rows, &completed);
    assert_daily_consistent(db.url()).await;
    assert!(stats.database_up.load(Ordering::Relaxed));
    gateway.stop().await;
}

/// Streams still running when the shutdown grace (30 s) ends are cut off,
/// and their rows, recorded as their tasks end, are saved before the
/// recorder stops: over HTTP/1 (a connection each) and HTTP/2 (streams of
/// one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_cut_off_at_shutdown_keep_their_rows() {
    let Metered {
        db,
        mock: _mock,
        gateway,
        _dir,
    } = metered(Backend::Sqlite).await;
    let config = gateway.config.clone();
    let key = gateway.key.clone().unwrap();
    let (http1, http2) = (client(), h2c_client());
    let mut open = Vec::new();
    for n in 0..150 {
        let client = if n % 3 == 0 { &http2 } else { &http1 };
        let request = authorized(
            Method::POST,
            gateway.url("/v1/chat/completions"),
            Some(&key),
        )
        .header("content-type", "application/json")
        .header("x-mock-hang", "body")
        .body(Full::new(Bytes::from(chat("a b", true).to_string())))
        .unwrap();
        open.push(client.request(request));
    }
    // Every response under way (its head and first chunk sent), none ended.
    let responses: Vec<_> = futures_join_all(open)
        .await
        .into_iter()
        .map(|response| response.expect("the response starts"))
        .collect();
    assert!(responses.iter().all(|r| r.status() == StatusCode::OK));
    // The gateway waits out its 30 s grace for them, then cuts them off.
    gateway.stop().await;
    drop(responses);
    let gateway = TestGateway::start_on(config, None).await;
    let rows = usage_rows(db.url()).await;
    assert_eq!(rows.len(), 150, "one row for each stream cut off");
    assert!(
        rows.iter()
            .all(|row| row.outcome == "client_closed" && row.response_bytes > 0),
        "{:?}",
        rows.iter()
            .map(|row| (&row.outcome, row.response_bytes))
            .collect::<Vec<_>>()
    );
    gateway.stop().await;
}

async fn spool_full_while_the_database_is_down(policy: &str) {
    let db = TestGuard::create(Backend::Postgres).await;
    let (proxy, through) = CutProxy::for_postgres(db.url()).await;
    let mock = MockUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let toml = metered_toml(&through, &dir.path().join("spool"), &mock.url()).replace(
        "flush_interval = \"20ms\"",
        &format!("flush_interval = \"20ms\"\nspool_max = \"2KiB\"\non_spool_full = \"{policy}\""),
    );
    let gateway = TestGateway::start_on(config(&toml), None).await;
    let key = gateway.key.clone().unwrap();
    let call = |case: String| {
        let request = authorized(
            Method::POST,
            gateway.url("/v1/chat/completions"),
            Some(&key),
        )
        .header("content-type", "application/json")
        .header("x-request-id", case)
        .body(Full::new(Bytes::from(chat("a b", false).to_string())))
        .unwrap();
        async move { send(&client(), request).await }
    };
    proxy.cut();
    // One row is some 150 bytes in the spool: 2 KiB fill within about a dozen
    // requests, flushed one by one.
    let mut served = Vec::new();
    let mut refused = 0;
    for i in 0..40 {
        let reply = call(format!("during-{i}")).await;
        match reply.status {
            StatusCode::OK => served.push(format!("during-{i}")),
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(reply.error_type(), "metering_unavailable");
                refused += 1;
            }
            other => panic!("unexpected {other}"),
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    if policy == "reject" {
        assert!(
            served.len() >= 6 && served.len() < 20,
            "served {}",
            served.len()
        );
        assert_eq!(refused, 40 - served.len());
        let scrape = Scrape::of(gateway.admin).await;
        assert_eq!(
            scrape.value("tollgate_metering_unavailable_total", &[]),
            refused as f64
        );
    } else {
        assert_eq!(served.len(), 40, "\"serve\" keeps serving past spool_max");
    }
    proxy.restore();
    // Once the spool drains into the database, requests are served again.
    let mut after = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while after == 0 {
        assert!(
            Instant::now() < deadline,
            "still refusing after the database came back"
        );
        if call(format!("after-{after}")).await.status == StatusCode::OK {
            served.push(format!("after-{after}"));
            after += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows = wait_for_rows(db.url(), served.len()).await;
    let recorded: HashSet<String> = rows
        .iter()
        .filter_map(|r| r.client_request_id.clone())
        .collect();
    assert_eq!(
        recorded,
        served.into_iter().collect::<HashSet<_>>(),
        "refused requests have no row"
    );
    assert_daily_consistent(db.url()).await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_with_the_database_down_refuses_rather_than_serve_unmetered() {
    spool_full_while_the_database_is_down("reject").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_spool_full_serve_keeps_serving() {
    spool_full_while_the_database_is_down("serve").await;
}
