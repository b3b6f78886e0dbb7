//! `Store::write_usage`, run with the same bodies against a real SQLite file
//! and a real Postgres database (one fresh database per test; see
//! `tollgate_store::testing` for the server they use).
//!
//! Expected values are computed here, in Rust, from the events written and
//! compared with what the database holds, read back as text so that both
//! backends are held to the same output.

#![allow(clippy::unwrap_used)] // tests may unwrap (STYLE.md)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use time::format_description::FormatItem;
use time::macros::{date, datetime, format_description};
use time::{Date, Month, OffsetDateTime, UtcOffset};
use tollgate_metering::billing::UsageFilter;
use tollgate_metering::usage::{CostSource, Outcome, UsageEvent};
use tollgate_metering::{CustomerId, KeyId};
use tollgate_metering::{Store, StoreError};
use tollgate_store::testing::{test_store, usage_event as event, Backend, TestGuard};
use uuid::Uuid;

tollgate_store::both_backends!(
    rows_round_trip_column_by_column,
    replayed_rows_are_skipped_and_not_counted_again,
    deduplicated_writes_count_only_the_new_rows,
    daily_rollups_match_the_rows,
    a_write_of_many_rows_and_groups_is_whole,
    rows_either_side_of_midnight_utc_land_on_two_days,
    an_empty_batch_writes_nothing,
    out_of_range_values_saturate_instead_of_failing,
    two_stores_writing_the_same_batch_count_it_once,
    large_replayed_batches_count_only_new_rows,
    rows_the_database_groups_together_are_one_group,
    migration_7_keys_usage_rows_by_ts_and_id_and_keeps_them_all,
);

const T0: OffsetDateTime = datetime!(2026-11-22 08:00:00.123456 UTC);

/// The `ts` text format of docs/STORAGE.md, written independently of the store.
const TS_FORMAT: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");
const DAY_FORMAT: &[FormatItem<'static>] = format_description!("[year]-[month]-[day]");

/// `n` varied rows over two customers (each with a key), two routes, two
/// models and none, every outcome, some 5xx, cache tokens and costs, spread
/// over a few hours from `start`.
fn varied(n: usize, start: OffsetDateTime) -> Vec<UsageEvent> {
    let customers = [
        (CustomerId::new(), KeyId::new()),
        (CustomerId::new(), KeyId::new()),
    ];
    (0..n)
        .map(|i| {
            let (customer, key) = customers[i % 2];
            let mut e = event(
                customer,
                key,
                start + Duration::from_millis(i as u64 * 61_003),
            );
            let k = i as u64;
            e.route = ["openai", "anthropic"][i % 3 % 2].to_owned();
            e.model = match i % 5 {
                0 | 3 => Some("gpt-4o".to_owned()),
                1 => Some("claude-sonnet-4".to_owned()),
                _ => None,
            };
            e.outcome = Outcome::ALL[i % Outcome::ALL.len()];
            e.status = match e.outcome {
                Outcome::Ok if i % 4 == 0 => 503,
                Outcome::Ok => 200,
                Outcome::UpstreamError => 502,
                Outcome::UpstreamTimeout => 504,
                Outcome::ClientClosed => 0,
                Outcome::RateLimited | Outcome::QuotaExceeded | Outcome::BudgetExceeded => 429,
                Outcome::RouteForbidden => 403,
                Outcome::PayloadTooLarge => 413,
                Outcome::ClientTimeout => 408,
            };
            e.client_request_id = (i % 3 == 0).then(|| format!("client-{i}"));
            e.latency_us = 1_000 + k * 7;
            e.upstream_latency_us = k * 5;
            e.request_bytes = 100 + k;
            e.response_bytes = 1_000 + k * 3;
            e.input_tokens = k * 11;
            e.output_tokens = k * 13;
            e.cache_read_tokens = k % 4 * 100;
            e.cache_write_tokens = k % 6 * 10;
            e.cost_nanos = 1_000_003 * k as i64 - 7;
            e.cost_source = [CostSource::Pricing, CostSource::Header, CostSource::None][i % 3];
            e
        })
        .collect()
}

/// `raw`, sorted (Postgres collations and SQLite order text differently).
async fn sorted(guard: &TestGuard, sql: &str) -> Vec<Vec<Option<String>>> {
    let mut rows = guard.raw(sql).await;
    rows.sort();
    rows
}

/// Every column of `usage_events`, as docs/STORAGE.md gives their text in both backends.
fn events_sql(backend: Backend) -> String {
    let ts = match backend {
        Backend::Sqlite => "ts",
        Backend::Postgres => r#"to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"#,
    };
    format!(
        "SELECT id, client_request_id, {ts}, customer_id, key_id, instance, route, method, \
         path, status, outcome, latency_us, upstream_latency_us, request_bytes, \
         response_bytes, model, input_tokens, output_tokens, cache_read_tokens, \
         cache_write_tokens, cost_nanos, cost_source FROM usage_events"
    )
}

fn expected_event(e: &UsageEvent) -> Vec<Option<String>> {
    let ts = e.ts.to_offset(UtcOffset::UTC).format(TS_FORMAT).unwrap();
    let text = |s: &str| Some(s.to_owned());
    vec![
        Some(e.id.hyphenated().to_string()),
        e.client_request_id.clone(),
        Some(ts),
        Some(e.customer_id.to_string()),
        Some(e.key_id.to_string()),
        text(&e.instance),
        text(&e.route),
        text(&e.method),
        text(&e.path),
        Some(e.status.to_string()),
        text(e.outcome.as_str()),
        Some(e.latency_us.to_string()),
        Some(e.upstream_latency_us.to_string()),
        Some(e.request_bytes.to_string()),
        Some(e.response_bytes.to_string()),
        e.model.clone(),
        Some(e.input_tokens.to_string()),
        Some(e.output_tokens.to_string()),
        Some(e.cache_read_tokens.to_string()),
        Some(e.cache_write_tokens.to_string()),
        Some(e.cost_nanos.to_string()),
        text(e.cost_source.as_str()),
    ]
}

fn expected_events<'a>(
    events: impl IntoIterator<Item = &'a UsageEvent>,
) -> Vec<Vec<Option<String>>> {
    let mut rows: Vec<_> = events.into_iter().map(expected_event).collect();
    rows.sort();
    rows
}

/// `usage_daily`, every column, as text.
fn daily_sql(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => {
            "SELECT day, customer_id, key_id, route, model, requests, rejected, errors, \
             input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, \
             request_bytes, response_bytes, cost_nanos FROM usage_daily"
        }
        Backend::Postgres => {
            "SELECT to_char(day, 'YYYY-MM-DD'), customer_id, key_id, route, model, requests, \
             rejected, errors, input_tokens, output_tokens, cache_read_tokens, \
             cache_write_tokens, request_bytes, response_bytes, cost_nanos FROM usage_daily"
        }
    }
}

/// What `usage_daily` must hold for `events` (docs/STORAGE.md), computed in Rust.
fn expected_daily<'a>(
    events: impl IntoIterator<Item = &'a UsageEvent>,
) -> Vec<Vec<Option<String>>> {
    let mut groups: BTreeMap<[String; 5], [i128; 10]> = BTreeMap::new();
    for e in events {
        let day =
            e.ts.to_offset(UtcOffset::UTC)
                .date()
                .format(DAY_FORMAT)
                .unwrap();
        let key = [
            day,
            e.customer_id.to_string(),
            e.key_id.to_string(),
            e.route.clone(),
            e.model.clone().unwrap_or_default(),
        ];
        let sums = groups.entry(key).or_default();
        let rejected = e.outcome.is_rejected();
        sums[0] += i128::from(!rejected);
        sums[1] += i128::from(rejected);
        sums[2] += i128::from(e.is_error());
        sums[3] += i128::from(e.input_tokens);
        sums[4] += i128::from(e.output_tokens);
        sums[5] += i128::from(e.cache_read_tokens);
        sums[6] += i128::from(e.cache_write_tokens);
        sums[7] += i128::from(e.request_bytes);
        sums[8] += i128::from(e.response_bytes);
        sums[9] += i128::from(e.cost_nanos);
    }
    let mut rows: Vec<Vec<Option<String>>> = groups
        .into_iter()
        .map(|(key, sums)| {
            key.into_iter()
                .chain(sums.iter().map(i128::to_string))
                .map(Some)
                .collect()
        })
        .collect();
    rows.sort();
    rows
}

/// `usage_daily` recomputed by SQL from `usage_events`; the outcome lists
/// come from `Outcome`, the error rule is the one docs/STORAGE.md gives.
fn regrouped_sql(backend: Backend) -> String {
    let list = |outcomes: Vec<Outcome>| {
        outcomes
            .iter()
            .map(|o| format!("'{}'", o.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let rejected = list(
        Outcome::ALL
            .into_iter()
            .filter(|o| o.is_rejected())
            .collect(),
    );
    let day = match backend {
        Backend::Sqlite => "substr(ts, 1, 10)",
        Backend::Postgres => "to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    };
    format!(
        "SELECT {day}, customer_id, key_id, route, COALESCE(model, ''), \
         count(*) FILTER (WHERE outcome NOT IN ({rejected})), \
         count(*) FILTER (WHERE outcome IN ({rejected})), \
         count(*) FILTER (WHERE outcome NOT IN ({rejected}) \
             AND (outcome IN ('upstream_error', 'upstream_timeout') OR status >= 500)), \
         sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), \
         sum(cache_write_tokens), sum(request_bytes), sum(response_bytes), sum(cost_nanos) \
         FROM usage_events GROUP BY 1, 2, 3, 4, 5"
    )
}

/// `usage_customer_daily`, every column, as text.
fn customer_daily_sql(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => {
            "SELECT day, customer_id, requests, rejected, errors, input_tokens, output_tokens, \
             cache_read_tokens, cache_write_tokens, request_bytes, response_bytes, cost_nanos \
             FROM usage_customer_daily"
        }
        Backend::Postgres => {
            "SELECT to_char(day, 'YYYY-MM-DD'), customer_id, requests, rejected, errors, \
             input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, \
             request_bytes, response_bytes, cost_nanos FROM usage_customer_daily"
        }
    }
}

/// What `usage_customer_daily` must hold for `events`: the sums of
/// [`expected_daily`]'s groups per day and customer, computed in Rust.
fn expected_customer_daily<'a>(
    events: impl IntoIterator<Item = &'a UsageEvent>,
) -> Vec<Vec<Option<String>>> {
    let mut days: BTreeMap<[Option<String>; 2], [i128; 10]> = BTreeMap::new();
    for row in expected_daily(events) {
        let sums = days.entry([row[0].clone(), row[1].clone()]).or_default();
        for (sum, value) in sums.iter_mut().zip(&row[5..]) {
            *sum += value.as_deref().unwrap().parse::<i128>().unwrap();
        }
    }
    let mut rows: Vec<Vec<Option<String>>> = days
        .into_iter()
        .map(|(key, sums)| {
            key.into_iter()
                .chain(sums.iter().map(|sum| Some(sum.to_string())))
                .collect()
        })
        .collect();
    rows.sort();
    rows
}

/// `usage_customer_daily` recomputed by SQL from `usage_events` alone.
fn regrouped_customer_sql(backend: Backend) -> String {
    format!(
        "WITH g (day, customer_id, key_id, route, model, requests, rejected, errors, \
             input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, \
             request_bytes, response_bytes, cost_nanos) AS ({}) \
         SELECT day, customer_id, sum(requests), sum(rejected), sum(errors), \
         sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), \
         sum(cache_write_tokens), sum(request_bytes), sum(response_bytes), sum(cost_nanos) \
         FROM g GROUP BY 1, 2",
        regrouped_sql(backend)
    )
}

/// `usage_customer_daily` holds exactly the sums of `events` per day and
/// customer, by Rust's count and by SQL's from `usage_events`.
async fn assert_customer_daily<'a>(
    guard: &TestGuard,
    backend: Backend,
    events: impl IntoIterator<Item = &'a UsageEvent>,
) {
    let stored = sorted(guard, customer_daily_sql(backend)).await;
    assert_eq!(
        stored,
        expected_customer_daily(events),
        "usage_customer_daily"
    );
    assert_eq!(
        sorted(guard, &regrouped_customer_sql(backend)).await,
        stored,
        "usage_customer_daily against usage_events"
    );
}

// ---- bodies ------------------------------------------------------------------

async fn rows_round_trip_column_by_column(backend: Backend) {
    let (store, guard) = test_store(backend).await;
    let acme = (CustomerId::new(), KeyId::new());
    let globex = (CustomerId::new(), KeyId::new());

    let mut ok = event(acme.0, acme.1, T0);
    ok.client_request_id = Some("req-from-client-1".to_owned());
    ok.cache_read_tokens = 1_024;
    ok.cache_write_tokens = 2_048;
    ok.cost_nanos = 123_456_789;

    let mut anthropic = event(acme.0, acme.1, T0 + Duration::from_micros(1));
    anthropic.route = "anthropic".to_owned();
    anthropic.path = "/v1/messages".to_owned();
    anthropic.model = Some("claude-sonnet-4".to_owned());
    anthropic.cost_source = CostSource::Header;

    let mut rejected = event(
        globex.0,
        globex.1,
        datetime!(2026-11-22 09:30:00.000001 +01:00),
    );
    rejected.outcome = Outcome::RateLimited;
    rejected.status = 429;
    rejected.model = None;
    rejected.upstream_latency_us = 0;
    rejected.response_bytes = 120;
    rejected.input_tokens = 0;
    rejected.output_tokens = 0;
    rejected.cost_nanos = 0;
    rejected.cost_source = CostSource::None;

    let mut upstream_error = event(globex.0, globex.1, T0 + Duration::from_secs(3));
    upstream_error.outcome = Outcome::UpstreamError;
    upstream_error.status = 502;
    upstream_error.model = None;

    let mut unavailable = event(globex.0, globex.1, T0 + Duration::from_secs(4));
    unavailable.status = 503;
    unavailable.instance = "gw-2".to_owned();
    unavailable.method = "GET".to_owned();

    let mut closed = event(acme.0, acme.1, T0 + Duration::from_secs(5));
    closed.outcome = Outcome::ClientClosed;
    closed.status = 0;
    closed.latency_us = u64::from(u32::MAX) + 1;

    let batch = vec![ok, anthropic, rejected, upstream_error, unavailable, closed];
    assert_eq!(store.write_usage(&batch).await.unwrap(), 6);

    let stored = sorted(&guard, &events_sql(backend)).await;
    assert_eq!(stored, expected_events(&batch));
    // The encodings docs/STORAGE.md names, spelled out once.
    let row = stored
        .iter()
        .find(|row| row[0].as_deref() == Some(&*batch[2].id.to_string()))
        .unwrap();
    assert_eq!(row[2].as_deref(), Some("2026-11-22T08:30:00.000001Z"));
    assert_eq!(row[0], row[0].as_ref().map(|id| id.to_lowercase()));
    assert_eq!(row[15], None, "no model is NULL in usage_events");
}

async fn deduplicated_writes_count_only_the_new_rows(backend: Backend) {
    // write_usage_deduplicated: the same results as write_usage, for new rows,
    // rows already there, and a mix.
    let (store, guard) = test_store(backend).await;
    let first = varied(30, T0);
    assert_eq!(store.write_usage_deduplicated(&first).await.unwrap(), 30);
    assert_eq!(store.write_usage_deduplicated(&first).await.unwrap(), 0);
    let more = varied(30, T0 + Duration::from_secs(86_400));
    let overlapping: Vec<UsageEvent> = first[10..].iter().chain(&more).cloned().collect();
    assert_eq!(
        store.write_usage_deduplicated(&overlapping).await.unwrap(),
        30
    );
    let written: Vec<&UsageEvent> = first.iter().chain(&more).collect();
    assert_eq!(
        sorted(&guard, &events_sql(backend)).await,
        expected_events(written.iter().copied())
    );
    assert_eq!(
        sorted(&guard, daily_sql(backend)).await,
        expected_daily(written.iter().copied())
    );
    assert_customer_daily(&guard, backend, written.iter().copied()).await;
}

async fn replayed_rows_are_skipped_and_not_counted_again(backend: Backend) {
    let (store, guard) = test_store(backend).await;
    let first = varied(40, T0);
    assert_eq!(store.write_usage(&first).await.unwrap(), 40);
    let daily = sorted(&guard, daily_sql(backend)).await;
    assert_eq!(daily, expected_daily(&first));
    assert_customer_daily(&guard, backend, &first).await;

    // The same batch again: nothing new, nothing counted.
    assert_eq!(store.write_usage(&first).await.unwrap(), 0);
    assert_eq!(sorted(&guard, daily_sql(backend)).await, daily);
    assert_customer_daily(&guard, backend, &first).await;
    assert_eq!(
        guard.raw("SELECT count(*) FROM usage_events").await[0][0].as_deref(),
        Some("40")
    );

    // Half old, half new (with the same customers): only the new half is
    // inserted and added.
    let mut more = varied(40, T0 + Duration::from_secs(3_600));
    for (i, e) in more.iter_mut().enumerate() {
        e.customer_id = first[i % 2].customer_id;
        e.key_id = first[i % 2].key_id;
    }
    let overlapping: Vec<UsageEvent> = first[20..].iter().chain(&more[..20]).cloned().collect();
    assert_eq!(store.write_usage(&overlapping).await.unwrap(), 20);
    let written: Vec<&UsageEvent> = first.iter().chain(&more[..20]).collect();
    assert_eq!(
        sorted(&guard, daily_sql(backend)).await,
        expected_daily(written.iter().copied())
    );
    assert_eq!(
        sorted(&guard, &events_sql(backend)).await,
        expected_events(written.iter().copied())
    );
    assert_customer_daily(&guard, backend, written.iter().copied()).await;

    // A batch holding the same id twice writes and counts it once (the
    // first occurrence).
    let mut twice = more[20].clone();
    twice.input_tokens = 999_999;
    let batch = vec![more[20].clone(), twice, more[21].clone()];
    assert_eq!(store.write_usage(&batch).await.unwrap(), 2);
    let written: Vec<&UsageEvent> = written.into_iter().chain(&more[20..22]).collect();
    assert_eq!(
        sorted(&guard, daily_sql(backend)).await,
        expected_daily(written.iter().copied())
    );
    assert_eq!(
        sorted(&guard, &events_sql(backend)).await,
        expected_events(written.iter().copied())
    );
    assert_customer_daily(&guard, backend, written.iter().copied()).await;
}

async fn daily_rollups_match_the_rows(backend: Backend) {
    let (store, guard) = test_store(backend).await;
    // Over two days, in three batches.
    let events = varied(900, datetime!(2026-11-21 20:00 UTC));
    let mut written = 0;
    for batch in events.chunks(300) {
        written += store.write_usage(batch).await.unwrap();
    }
    assert_eq!(written, 900);

    let daily = sorted(&guard, daily_sql(backend)).await;
    let expected = expected_daily(&events);
    assert_eq!(daily, expected);
    // Something to compare: both days, both customers, both routes, no
    // model, rejections and errors.
    let days: std::collections::BTreeSet<_> = daily.iter().map(|row| row[0].clone()).collect();
    assert_eq!(days.len(), 2, "{days:?}");
    assert!(daily.iter().any(|row| row[4].as_deref() == Some("")));
    let total = |column: usize| -> i64 {
        daily
            .iter()
            .map(|row| row[column].as_deref().unwrap().parse::<i64>().unwrap())
            .sum()
    };
    assert_eq!(total(5) + total(6), 900, "requests + rejected = rows");
    assert_eq!(total(6), 450, "5 of the 10 outcomes are rejections");
    assert_eq!(
        total(7) as usize,
        events.iter().filter(|e| e.is_error()).count()
    );
    assert!(total(7) > 200, "upstream errors, timeouts and 503s");

    // And SQL agrees, from usage_events alone.
    assert_eq!(sorted(&guard, &regrouped_sql(backend)).await, daily);

    // The customer days too: both days, both customers.
    assert_customer_daily(&guard, backend, &events).await;
    assert_eq!(
        sorted(&guard, customer_daily_sql(backend)).await.len(),
        4,
        "2 days × 2 customers"
    );

    // Migration 4 fills the table from usage_daily for databases that had
    // rows before it: its fill gives the same rows.
    let migration = match backend {
        Backend::Sqlite => include_str!("../migrations/sqlite/0004_customer_daily.sql"),
        Backend::Postgres => include_str!("../migrations/postgres/0004_customer_daily.sql"),
    };
    let fill = &migration[migration.find("INSERT INTO usage_customer_daily").unwrap()..];
    let before = sorted(&guard, customer_daily_sql(backend)).await;
    guard.raw("DELETE FROM usage_customer_daily").await;
    guard.raw(fill).await;
    assert_eq!(sorted(&guard, customer_daily_sql(backend)).await, before);
}

async fn a_write_of_many_rows_and_groups_is_whole(backend: Backend) {
    // A write of a few thousand rows, the size the Postgres store sends in
    // pieces of a few hundred rows and groups (SQLite yields its thread
    // as often): across a month's end (two partitions, each in several
    // pieces) and over hundreds of daily groups. Every row and every sum
    // arrives, once, whatever the pieces; and so for a write just too big
    // to be paced, beside it.
    for rows in [3_001, 4_500] {
        let (store, guard) = test_store(backend).await;
        // 298 keys: not a multiple of the 3 routes and 5 models `varied`
        // cycles through, so that each key has several groups a day.
        let keys: Vec<(CustomerId, KeyId)> = (0..149)
            .flat_map(|_| {
                let customer = CustomerId::new();
                [(customer, KeyId::new()), (customer, KeyId::new())]
            })
            .collect();
        let start = datetime!(2026-11-30 23:00 UTC);
        let events: Vec<UsageEvent> = varied(rows, start)
            .into_iter()
            .enumerate()
            .map(|(i, mut e)| {
                (e.customer_id, e.key_id) = keys[i * 7 % keys.len()];
                // Two hours, whatever `varied` spreads them over.
                e.ts = start + Duration::from_micros(i as u64 * 2_399_993);
                e
            })
            .collect();
        assert_eq!(store.write_usage(&events).await.unwrap(), rows as u64);

        assert_eq!(
            sorted(&guard, &events_sql(backend)).await,
            expected_events(&events)
        );
        let daily = sorted(&guard, daily_sql(backend)).await;
        assert_eq!(daily, expected_daily(&events));
        assert!(daily.len() > 1_000, "{} groups", daily.len());
        let days: std::collections::BTreeSet<_> = daily.iter().map(|row| row[0].clone()).collect();
        assert_eq!(days.len(), 2, "{days:?}");
        assert_customer_daily(&guard, backend, &events).await;
        assert_eq!(
            sorted(&guard, customer_daily_sql(backend)).await.len(),
            298,
            "2 days × 149 customers"
        );
    }
}

async fn rows_either_side_of_midnight_utc_land_on_two_days(backend: Backend) {
    let (store, guard) = test_store(backend).await;
    let (customer, key) = (CustomerId::new(), KeyId::new());
    let batch = vec![
        event(customer, key, datetime!(2026-11-30 23:59:59.999999 UTC)),
        // 23:30 UTC, though it is already December at +02:00.
        event(customer, key, datetime!(2026-12-01 01:30 +02:00)),
        event(customer, key, datetime!(2026-12-01 00:00 UTC)),
    ];
    assert_eq!(store.write_usage(&batch).await.unwrap(), 3);
    let days: Vec<(Option<String>, Option<String>)> = sorted(&guard, daily_sql(backend))
        .await
        .into_iter()
        .map(|row| (row[0].clone(), row[5].clone()))
        .collect();
    assert_eq!(
        days,
        [
            (Some("2026-11-30".to_owned()), Some("2".to_owned())),
            (Some("2026-12-01".to_owned()), Some("1".to_owned())),
        ]
    );
    assert_eq!(
        sorted(&guard, daily_sql(backend)).await,
        expected_daily(&batch)
    );
    assert_customer_daily(&guard, backend, &batch).await;
}

async fn an_empty_batch_writes_nothing(backend: Backend) {
    let (store, guard) = test_store(backend).await;
    assert_eq!(store.write_usage(&[]).await.unwrap(), 0);
    assert_eq!(
        guard.raw("SELECT count(*) FROM usage_daily").await[0][0].as_deref(),
        Some("0")
    );
    assert_eq!(
        guard.raw("SELECT count(*) FROM usage_customer_daily").await[0][0].as_deref(),
        Some("0")
    );
}

async fn out_of_range_values_saturate_instead_of_failing(backend: Backend) {
    let (store, guard) = test_store(backend).await;
    let (customer, key) = (CustomerId::new(), KeyId::new());
    let huge = |ts| {
        let mut e = event(customer, key, ts);
        e.input_tokens = u64::MAX;
        e.response_bytes = i64::MAX as u64 + 1;
        e.cost_nanos = i64::MAX;
        // Postgres text cannot hold NUL; a model name from a body can.
        e.model = Some("gpt\0x".to_owned());
        e
    };
    // Two in one batch and one more later: both the batch's sum and the
    // upsert's addition overflow.
    let batch = [huge(T0), huge(T0 + Duration::from_secs(1))];
    assert_eq!(store.write_usage(&batch).await.unwrap(), 2);
    assert_eq!(
        store
            .write_usage(&[huge(T0 + Duration::from_secs(2))])
            .await
            .unwrap(),
        1
    );
    let max = i64::MAX.to_string();
    let events = guard
        .raw("SELECT input_tokens, response_bytes, cost_nanos, model FROM usage_events")
        .await;
    assert_eq!(events.len(), 3);
    for row in events {
        assert_eq!(
            row,
            [
                Some(max.clone()),
                Some(max.clone()),
                Some(max.clone()),
                Some("gpt\u{FFFD}x".to_owned())
            ]
        );
    }
    let daily = guard
        .raw("SELECT requests, input_tokens, response_bytes, cost_nanos, model FROM usage_daily")
        .await;
    assert_eq!(
        daily,
        [[
            Some("3".to_owned()),
            Some(max.clone()),
            Some(max.clone()),
            Some(max.clone()),
            Some("gpt\u{FFFD}x".to_owned())
        ]]
    );
    let customer_daily = guard
        .raw("SELECT requests, input_tokens, response_bytes, cost_nanos FROM usage_customer_daily")
        .await;
    assert_eq!(
        customer_daily,
        [[
            Some("3".to_owned()),
            Some(max.clone()),
            Some(max.clone()),
            Some(max.clone()),
        ]]
    );
}

async fn two_stores_writing_the_same_batch_count_it_once(backend: Backend) {
    // Two gateways replaying the same spool at once.
    let (a, guard) = test_store(backend).await;
    let b = tollgate_store::open(guard.url(), 2).await.unwrap();
    let batch = varied(500, T0);
    let (ra, rb) = tokio::join!(a.write_usage(&batch), b.write_usage(&batch));
    assert_eq!(ra.unwrap() + rb.unwrap(), 500);
    assert_eq!(
        sorted(&guard, daily_sql(backend)).await,
        expected_daily(&batch)
    );
    assert_customer_daily(&guard, backend, &batch).await;
}

async fn large_replayed_batches_count_only_new_rows(backend: Backend) {
    // Big enough that the rows written before are met long after the
    // first bytes of the batch went out.
    let (store, guard) = test_store(backend).await;
    let events = varied(6_000, T0);
    assert_eq!(store.write_usage(&events[..4_000]).await.unwrap(), 4_000);
    assert_eq!(store.write_usage(&events).await.unwrap(), 2_000);
    assert_eq!(store.write_usage(&events).await.unwrap(), 0);
    assert_eq!(
        sorted(&guard, daily_sql(backend)).await,
        expected_daily(&events)
    );
    assert_customer_daily(&guard, backend, &events).await;
    assert_eq!(
        guard.raw("SELECT count(*) FROM usage_events").await[0][0].as_deref(),
        Some("6000")
    );
}

async fn rows_the_database_groups_together_are_one_group(backend: Backend) {
    // No model and an empty one are both '' in usage_daily; a NUL is
    // stored as U+FFFD. Each pair must land in one group, not fail the
    // batch by upserting the same group twice.
    let (store, guard) = test_store(backend).await;
    let (customer, key) = (CustomerId::new(), KeyId::new());
    let with_model = |model: Option<&str>| {
        let mut e = event(customer, key, T0);
        e.model = model.map(str::to_owned);
        e
    };
    let batch = [
        with_model(None),
        with_model(Some("")),
        with_model(Some("m\0")),
        with_model(Some("m\u{FFFD}")),
    ];
    assert_eq!(store.write_usage(&batch).await.unwrap(), 4);
    assert_eq!(
        sorted(&guard, "SELECT model, requests FROM usage_daily").await,
        [
            [Some(String::new()), Some("2".to_owned())],
            [Some("m\u{FFFD}".to_owned()), Some("2".to_owned())],
        ]
    );
    assert_eq!(
        sorted(&guard, "SELECT model FROM usage_events").await,
        [
            [None],
            [Some(String::new())],
            [Some("m\u{FFFD}".to_owned())],
            [Some("m\u{FFFD}".to_owned())],
        ]
    );
}

// ---- migration 7 ---------------------------------------------------------------

/// Migrations 1 to 6 as they shipped, with their names: what an older
/// Tollgate left a database at.
const SQLITE_UP_TO_6: [&str; 6] = [
    include_str!("../migrations/sqlite/0001_keys.sql"),
    include_str!("../migrations/sqlite/0002_usage.sql"),
    include_str!("../migrations/sqlite/0003_reports.sql"),
    include_str!("../migrations/sqlite/0004_customer_daily.sql"),
    include_str!("../migrations/sqlite/0005_key_limits.sql"),
    include_str!("../migrations/sqlite/0006_webhooks.sql"),
];
const POSTGRES_UP_TO_6: [&str; 6] = [
    include_str!("../migrations/postgres/0001_keys.sql"),
    include_str!("../migrations/postgres/0002_usage.sql"),
    include_str!("../migrations/postgres/0003_reports.sql"),
    include_str!("../migrations/postgres/0004_customer_daily.sql"),
    include_str!("../migrations/postgres/0005_key_limits.sql"),
    include_str!("../migrations/postgres/0006_webhooks.sql"),
];
const NAMES_UP_TO_6: [&str; 6] = [
    "keys",
    "usage",
    "reports",
    "customer_daily",
    "key_limits",
    "webhooks",
];

/// A fresh database at schema version 6, recorded as the migration runner
/// records it, with the `usage_events` partitions of `months` (Postgres).
async fn database_at_version_6(backend: Backend, months: &[Date]) -> TestGuard {
    let guard = TestGuard::create(backend).await;
    let (mut sql, scripts) = match backend {
        Backend::Sqlite => (
            "CREATE TABLE schema_migrations (version INTEGER NOT NULL PRIMARY KEY, \
             name TEXT NOT NULL, applied_at TEXT NOT NULL);\n"
                .to_owned(),
            SQLITE_UP_TO_6,
        ),
        Backend::Postgres => (
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT now());\n"
                .to_owned(),
            POSTGRES_UP_TO_6,
        ),
    };
    for (version, (script, name)) in (1..).zip(scripts.iter().zip(NAMES_UP_TO_6)) {
        sql += script;
        sql += &format!(
            "\nINSERT INTO schema_migrations (version, name, applied_at) \
             VALUES ({version}, '{name}', '2026-01-01T00:00:00.000000Z');\n"
        );
    }
    match &guard {
        TestGuard::Sqlite(db) => rusqlite::Connection::open(db.path())
            .unwrap()
            .execute_batch(&sql)
            .unwrap(),
        TestGuard::Postgres(_) => {
            for month in months {
                sql += &format!(
                    "SELECT tollgate_ensure_usage_partition('{}');\n",
                    month.format(DAY_FORMAT).unwrap()
                );
            }
            guard.raw(&sql).await;
        }
    }
    guard
}

/// An INSERT of `events` into `usage_events`, every value a quoted literal
/// in its stored text form (the same statement for both backends).
fn insert_events_sql(events: &[UsageEvent]) -> String {
    let rows: Vec<String> = events
        .iter()
        .map(|e| {
            let values: Vec<String> = expected_event(e)
                .into_iter()
                .map(|value| {
                    value.map_or("NULL".to_owned(), |v| {
                        format!("'{}'", v.replace('\'', "''"))
                    })
                })
                .collect();
            format!("({})", values.join(", "))
        })
        .collect();
    format!(
        "INSERT INTO usage_events (id, client_request_id, ts, customer_id, key_id, instance, \
         route, method, path, status, outcome, latency_us, upstream_latency_us, request_bytes, \
         response_bytes, model, input_tokens, output_tokens, cache_read_tokens, \
         cache_write_tokens, cost_nanos, cost_source) VALUES {}",
        rows.join(", ")
    )
}

/// The indexes of `usage_events` (and on Postgres of each partition), as
/// (table, definition) text.
async fn usage_event_indexes(guard: &TestGuard) -> Vec<Vec<Option<String>>> {
    match guard.backend() {
        Backend::Sqlite => {
            let mut rows = sorted(
                guard,
                "SELECT l.name, l.\"unique\", l.origin, group_concat(i.name, ', ') \
                 FROM pragma_index_list('usage_events') AS l \
                 JOIN pragma_index_info(l.name) AS i GROUP BY l.name",
            )
            .await;
            // group_concat's order is the key's: check it separately.
            for row in &mut rows {
                row.pop();
            }
            rows
        }
        Backend::Postgres => {
            sorted(
                guard,
                "SELECT i.indrelid::regclass::text, pg_get_indexdef(i.indexrelid), \
                 i.indisprimary::text FROM pg_index AS i \
                 WHERE i.indrelid = 'usage_events'::regclass OR i.indrelid IN \
                 (SELECT inhrelid FROM pg_inherits WHERE inhparent = 'usage_events'::regclass)",
            )
            .await
        }
    }
}

async fn migration_7_keys_usage_rows_by_ts_and_id_and_keeps_them_all(backend: Backend) {
    // Rows either side of a month's end, as an older Tollgate wrote them,
    // their ids made in the reverse of their time order (two gateways'
    // clocks, say) and some sharing an instant, so that (ts, id) order and
    // id order disagree throughout.
    let mut events = varied(40, datetime!(2026-11-30 23:40 UTC));
    let ids: Vec<Uuid> = events.iter().map(|_| Uuid::now_v7()).collect();
    for (e, id) in events.iter_mut().zip(ids.into_iter().rev()) {
        e.id = id;
    }
    for i in (0..40).step_by(4) {
        events[i + 1].ts = events[i].ts;
    }
    let months = [date!(2026 - 11 - 01), date!(2026 - 12 - 01)];
    let guard = database_at_version_6(backend, &months).await;
    guard.raw(&insert_events_sql(&events)).await;
    let before = sorted(&guard, &events_sql(backend)).await;
    assert_eq!(before, expected_events(&events));

    let store = tollgate_store::open(guard.url(), 2).await.unwrap();
    let report = store.migrate().await.unwrap();
    assert_eq!((report.applied, report.current), (vec![7], 7));

    // Every row, column by column.
    assert_eq!(sorted(&guard, &events_sql(backend)).await, before);

    // One key, (ts, id), and no other index.
    let key = |table: &str| {
        vec![
            Some(table.to_owned()),
            Some(format!(
                "CREATE UNIQUE INDEX {table}_pkey ON public.{table} USING btree (ts, id)"
            )),
            Some("true".to_owned()),
        ]
    };
    let wanted = match backend {
        Backend::Sqlite => vec![vec![
            Some("sqlite_autoindex_usage_events_1".to_owned()),
            Some("1".to_owned()),
            Some("pk".to_owned()),
        ]],
        Backend::Postgres => {
            let mut tables: Vec<String> = partitions(&guard).await;
            tables.push("usage_events".to_owned());
            let mut wanted: Vec<_> = tables.iter().map(|table| key(table)).collect();
            wanted.sort();
            // The parent's index is created ON ONLY it.
            for row in &mut wanted {
                if row[0].as_deref() == Some("usage_events") {
                    row[1] = Some(
                        "CREATE UNIQUE INDEX usage_events_pkey ON ONLY public.usage_events \
                         USING btree (ts, id)"
                            .to_owned(),
                    );
                }
            }
            wanted
        }
    };
    assert_eq!(usage_event_indexes(&guard).await, wanted);
    if backend == Backend::Sqlite {
        assert_eq!(
            guard
                .raw("SELECT name FROM pragma_index_info('sqlite_autoindex_usage_events_1') ORDER BY seqno")
                .await,
            [[Some("ts".to_owned())], [Some("id".to_owned())]]
        );
    }

    // The export walks the rows in (ts, id) order, across the month's end.
    let filter = UsageFilter {
        from: date!(2026 - 11 - 30),
        to: date!(2026 - 12 - 01),
        customer: None,
    };
    let mut want: Vec<UsageEvent> = events.clone();
    want.sort_by_key(|e| (e.ts, e.id));
    let mut got = Vec::new();
    let mut after = None;
    loop {
        let page = store.usage_events_page(&filter, after, 7).await.unwrap();
        after = page.last().map(|e| (e.ts, e.id));
        let full = page.len() == 7;
        got.extend(page);
        if !full {
            break;
        }
    }
    assert_eq!(got, want);

    // The new key refuses the rows written before the migration: replayed,
    // they are neither inserted nor counted, whichever way they go.
    assert_eq!(store.write_usage(&events).await.unwrap(), 0);
    assert_eq!(store.write_usage_deduplicated(&events).await.unwrap(), 0);
    assert!(sorted(&guard, daily_sql(backend)).await.is_empty());
    let more = varied(10, datetime!(2026-12-01 00:30 UTC));
    assert_eq!(store.write_usage(&more).await.unwrap(), 10);
    assert_eq!(
        sorted(&guard, daily_sql(backend)).await,
        expected_daily(&more)
    );
    let all: Vec<&UsageEvent> = events.iter().chain(&more).collect();
    assert_eq!(
        sorted(&guard, &events_sql(backend)).await,
        expected_events(all.iter().copied())
    );

    // A partition made on demand after the migration has the same key.
    if backend == Backend::Postgres {
        let month = month_offset(OffsetDateTime::now_utc().date(), 24);
        let later = event(
            CustomerId::new(),
            KeyId::new(),
            month.midnight().assume_utc(),
        );
        assert_eq!(store.write_usage(&[later]).await.unwrap(), 1);
        let indexes = usage_event_indexes(&guard).await;
        assert!(
            indexes.contains(&key(&partition_name(month))),
            "{indexes:?}"
        );
    }
}

// ---- one backend ---------------------------------------------------------------

/// The first day of the month `months` after (or before) `day`'s.
fn month_offset(day: Date, months: i32) -> Date {
    let index = day.year() * 12 + i32::from(u8::from(day.month())) - 1 + months;
    let month = Month::try_from(u8::try_from(index.rem_euclid(12) + 1).unwrap()).unwrap();
    Date::from_calendar_date(index.div_euclid(12), month, 1).unwrap()
}

fn partition_name(month: Date) -> String {
    format!(
        "usage_events_{:04}_{:02}",
        month.year(),
        u8::from(month.month())
    )
}

async fn partitions(guard: &TestGuard) -> Vec<String> {
    guard
        .raw(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'usage_events'::regclass ORDER BY 1",
        )
        .await
        .into_iter()
        .map(|row| row[0].clone().unwrap())
        .collect()
}

mod postgres_only {
    use super::*;
    use tollgate_store::PostgresStore;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partitions_are_made_at_migrate_and_on_demand() {
        let (store, guard) = test_store(Backend::Postgres).await;
        let this_month = OffsetDateTime::now_utc().date();
        let ahead: Vec<String> = (0..3)
            .map(|n| partition_name(month_offset(this_month, n)))
            .collect();
        assert_eq!(partitions(&guard).await, ahead);

        // Far from now in both directions.
        let (customer, key) = (CustomerId::new(), KeyId::new());
        let future =
            month_offset(this_month, 24).midnight().assume_utc() + Duration::from_secs(86_400 * 14);
        let past =
            month_offset(this_month, -36).midnight().assume_utc() + Duration::from_secs(3_600);
        let batch = [event(customer, key, future), event(customer, key, past)];
        assert_eq!(store.write_usage(&batch).await.unwrap(), 2);
        let future_name = partition_name(month_offset(this_month, 24));
        let past_name = partition_name(month_offset(this_month, -36));
        let mut expected: Vec<String> = ahead
            .iter()
            .cloned()
            .chain([future_name.clone(), past_name.clone()])
            .collect();
        expected.sort();
        assert_eq!(partitions(&guard).await, expected);
        // Each row is in its month's partition.
        let placed = sorted(
            &guard,
            "SELECT tableoid::regclass::text, id FROM usage_events",
        )
        .await;
        let mut wanted = vec![
            vec![Some(future_name.clone()), Some(batch[0].id.to_string())],
            vec![Some(past_name.clone()), Some(batch[1].id.to_string())],
        ];
        wanted.sort();
        assert_eq!(placed, wanted);

        // Another store (its own cache, no migrate) writes into existing
        // and new months alike.
        let other = tollgate_store::open(guard.url(), 2).await.unwrap();
        let later = month_offset(this_month, 25).midnight().assume_utc();
        let batch = [event(customer, key, future), event(customer, key, later)];
        assert_eq!(other.write_usage(&batch).await.unwrap(), 2);
        assert_eq!(partitions(&guard).await.len(), 6);

        // A partition dropped behind the store's back (say by a retention
        // job) is made again, and the batch goes through.
        guard.raw(&format!("DROP TABLE {future_name}")).await;
        assert_eq!(partitions(&guard).await.len(), 5);
        let batch = [event(customer, key, future + Duration::from_secs(60))];
        assert_eq!(store.write_usage(&batch).await.unwrap(), 1);
        assert!(partitions(&guard).await.contains(&future_name));
        assert_eq!(
            guard
                .raw(&format!("SELECT count(*) FROM {future_name}"))
                .await[0][0]
                .as_deref(),
            Some("1")
        );
    }

    /// Counts the COPY statements that go through usage_events from now on
    /// (a COPY straight into a partition fires only the partition's
    /// triggers); [`copies_through_parent`] reads the count.
    async fn count_copies_through_parent(guard: &TestGuard) {
        guard
            .raw(
                "CREATE TABLE through_parent (n int);
                 CREATE FUNCTION count_through_parent() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN INSERT INTO through_parent VALUES (1); RETURN NULL; END $$;
                 CREATE TRIGGER count_through_parent AFTER INSERT ON usage_events
                 FOR EACH STATEMENT EXECUTE FUNCTION count_through_parent()",
            )
            .await;
    }

    async fn copies_through_parent(guard: &TestGuard) -> String {
        guard.raw("SELECT count(*) FROM through_parent").await[0][0]
            .clone()
            .unwrap()
    }

    /// Which partition each row of usage_events is in, and its id; sorted.
    async fn placement(guard: &TestGuard) -> Vec<Vec<Option<String>>> {
        sorted(
            guard,
            "SELECT tableoid::regclass::text, id FROM usage_events",
        )
        .await
    }

    fn placed_in(partition: &str, events: &[UsageEvent]) -> Vec<Vec<Option<String>>> {
        let mut placed: Vec<Vec<Option<String>>> = events
            .iter()
            .map(|e| vec![Some(partition.to_owned()), Some(e.id.to_string())])
            .collect();
        placed.sort();
        placed
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partition_with_row_security_is_written_through_usage_events() {
        // Rows copied into a partition directly would answer to its own
        // row-level security policies, which an insert through usage_events
        // does not: a partition with row security on is never copied into.
        let (store, guard) = test_store(Backend::Postgres).await;
        count_copies_through_parent(&guard).await;
        let now = OffsetDateTime::now_utc();
        let name = partition_name(now.date());
        guard
            .raw(&format!(
                "ALTER TABLE {name} ENABLE ROW LEVEL SECURITY;
                 CREATE POLICY anything ON {name} USING (true)"
            ))
            .await;
        writes_go_through_usage_events(&*store, &guard, &name).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partition_the_gateway_may_not_insert_into_is_written_through_usage_events() {
        // An operator who grants the gateway's role INSERT on usage_events
        // but not on its partitions (made by another role) loses no row:
        // Postgres checks only the parent's privileges for rows inserted
        // through it, so that is the way they go.
        let (_, guard) = test_store(Backend::Postgres).await;
        count_copies_through_parent(&guard).await;
        let now = OffsetDateTime::now_utc();
        let name = partition_name(now.date());
        let role = format!("tollgate_writer_{}", Uuid::now_v7().simple());
        guard
            .raw(&format!(
                "CREATE ROLE {role} LOGIN PASSWORD 'writer';
                 GRANT USAGE ON SCHEMA public TO {role};
                 GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role};
                 REVOKE INSERT ON {name} FROM {role}"
            ))
            .await;
        let _role = TestRole {
            name: role.clone(),
            database_url: guard.url().to_owned(),
        };
        let store = tollgate_store::open(&as_user(guard.url(), &role, "writer"), 2)
            .await
            .unwrap();
        writes_go_through_usage_events(&*store, &guard, &name).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writing_again_never_tries_a_copy_that_duplicates_would_fail() {
        // A sequence is not rolled back with its transaction, so it counts
        // COPY statements into the partition that failed as well.
        let (store, guard) = test_store(Backend::Postgres).await;
        let now = OffsetDateTime::now_utc();
        let name = partition_name(now.date());
        guard
            .raw(&format!(
                "CREATE SEQUENCE copies;
                 CREATE FUNCTION count_copy() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN PERFORM nextval('copies'); RETURN NULL; END $$;
                 CREATE TRIGGER count_copy BEFORE INSERT ON {name}
                 FOR EACH STATEMENT EXECUTE FUNCTION count_copy()"
            ))
            .await;
        let copies = || async {
            guard
                .raw("SELECT last_value - 1 + is_called::int FROM copies")
                .await[0][0]
                .clone()
                .unwrap()
        };
        let (customer, key) = (CustomerId::new(), KeyId::new());
        let first: Vec<UsageEvent> = (0..3).map(|_| event(customer, key, now)).collect();
        assert_eq!(store.write_usage(&first).await.unwrap(), 3);
        assert_eq!(copies().await, "1");
        // Replayed through write_usage: a COPY that fails, then the
        // deduplicating way.
        assert_eq!(store.write_usage(&first).await.unwrap(), 0);
        assert_eq!(copies().await, "2");
        // Through write_usage_deduplicated: the deduplicating way only.
        let mut again = first.clone();
        again.push(event(customer, key, now));
        assert_eq!(store.write_usage_deduplicated(&again).await.unwrap(), 1);
        assert_eq!(copies().await, "2");
        assert_eq!(
            placement(&guard).await,
            placed_in(&name, &again),
            "rows written again still land in their partition"
        );
    }

    /// Two writes of this month's rows: both go through usage_events (the
    /// second without trying the partition again), every row lands in
    /// partition `name`, and each is rolled up once.
    async fn writes_go_through_usage_events(store: &dyn Store, guard: &TestGuard, name: &str) {
        let now = OffsetDateTime::now_utc();
        let (customer, key) = (CustomerId::new(), KeyId::new());
        let first = [event(customer, key, now), event(customer, key, now)];
        assert_eq!(store.write_usage(&first).await.unwrap(), 2);
        assert_eq!(copies_through_parent(guard).await, "1");
        let second = [event(customer, key, now)];
        assert_eq!(store.write_usage(&second).await.unwrap(), 1);
        assert_eq!(copies_through_parent(guard).await, "2");
        assert_eq!(
            placement(guard).await,
            placed_in(name, &[&first[..], &second].concat())
        );
        assert_eq!(
            guard
                .raw("SELECT sum(requests)::text FROM usage_daily")
                .await[0][0]
                .as_deref(),
            Some("3")
        );
    }

    /// `url` connecting as `user` with `password`.
    fn as_user(url: &str, user: &str, password: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap();
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        format!("{scheme}://{user}:{password}@{host}")
    }

    /// A login role of the test server, with what it was granted in one
    /// test database; both go when this is dropped (also when the test
    /// fails), so that no role outlives its test.
    struct TestRole {
        name: String,
        database_url: String,
    }

    impl Drop for TestRole {
        fn drop(&mut self) {
            let server = tollgate_store::testing::server_url();
            let dropped = tollgate_store::testing::execute_detached(&[
                (&self.database_url, &format!("DROP OWNED BY {}", self.name)),
                (&server, &format!("DROP ROLE IF EXISTS {}", self.name)),
            ]);
            if let Err(error) = dropped {
                eprintln!("warning: cannot drop test role {}: {error}", self.name);
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partition_that_is_not_what_its_name_says_is_written_through_usage_events() {
        // Rows are copied straight into their month's partition, by name;
        // when that name is no (attached) partition, they go through
        // usage_events instead, and nothing lands in an impostor.
        let (store, guard) = test_store(Backend::Postgres).await;
        count_copies_through_parent(&guard).await;
        let through_parent = || copies_through_parent(&guard);
        let now = OffsetDateTime::now_utc();
        let name = partition_name(now.date());
        let (customer, key) = (CustomerId::new(), KeyId::new());
        let first = [event(customer, key, now)];
        assert_eq!(store.write_usage(&first).await.unwrap(), 1);
        assert_eq!(through_parent().await, "0", "straight into the partition");

        // Renamed, and an impostor by the name: a plain table, not attached.
        let renamed = format!("{name}_renamed");
        guard
            .raw(&format!(
                "ALTER TABLE {name} RENAME TO {renamed}; CREATE TABLE {name} (LIKE usage_events)"
            ))
            .await;
        let second = [event(customer, key, now), event(customer, key, now)];
        assert_eq!(store.write_usage(&second).await.unwrap(), 2);
        assert_eq!(through_parent().await, "1");
        // The month stays on that path: no second failed attempt.
        let third = [event(customer, key, now)];
        assert_eq!(store.write_usage(&third).await.unwrap(), 1);
        assert_eq!(through_parent().await, "2");

        assert_eq!(
            guard.raw(&format!("SELECT count(*) FROM {name}")).await[0][0].as_deref(),
            Some("0")
        );
        // A store that never saw the partition by its name (a restarted
        // gateway) cannot attach the impostor, the month being taken, nor
        // make a partition of its own when the name is free; either way its
        // rows go through usage_events too.
        let fourth = [event(customer, key, now)];
        let fresh = tollgate_store::open(guard.url(), 2).await.unwrap();
        assert_eq!(fresh.write_usage(&fourth).await.unwrap(), 1);
        assert_eq!(through_parent().await, "3");
        guard.raw(&format!("DROP TABLE {name}")).await;
        let fifth = [event(customer, key, now)];
        let fresh = tollgate_store::open(guard.url(), 2).await.unwrap();
        assert_eq!(fresh.write_usage(&fifth).await.unwrap(), 1);
        assert_eq!(through_parent().await, "4");
        assert_eq!(partitions(&guard).await.len(), 3, "no partition added");

        assert_eq!(
            placement(&guard).await,
            placed_in(
                &renamed,
                &[&first[..], &second, &third, &fourth, &fifth].concat()
            )
        );
        // The refused attempts left nothing behind in the rollups either.
        assert_eq!(
            guard
                .raw("SELECT sum(requests)::text FROM usage_daily")
                .await[0][0]
                .as_deref(),
            Some("6")
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_server_is_unavailable_within_seconds() {
        let store: Arc<dyn Store> =
            Arc::new(PostgresStore::new("postgres://postgres@127.0.0.1:1/x", 2).unwrap());
        let started = Instant::now();
        let result = store
            .write_usage(&[event(CustomerId::new(), KeyId::new(), T0)])
            .await;
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "{result:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unmigrated_database_says_so() {
        let guard = TestGuard::create(Backend::Postgres).await;
        let store = tollgate_store::open(guard.url(), 2).await.unwrap();
        match store
            .write_usage(&[event(CustomerId::new(), KeyId::new(), T0)])
            .await
        {
            Err(StoreError::Config(message)) => {
                assert!(message.contains("tollgate migrate"), "{message}")
            }
            other => panic!("expected Config, got {other:?}"),
        }
    }
}
