//! Latency of the usage reports on Postgres at production size: 10 million
//! usage rows over three months (January to March 2025) from 1,000
//! customers, loaded through `Store::write_usage` (so `usage_daily` is the
//! writer's own rollup), then `ANALYZE`d. Target: under 50 ms for each of
//! `usage_summary`, `usage_grouped(Day)` and `top_customers(Cost, 10)` over
//! one month, with and without a customer filter.
//!
//! Each figure is the median and p99 (nearest rank) of `RUNS` runs after
//! two warm-up runs. Also timed, for scale: grouped by customer,
//! `billing_usage`, one export page, and an export of a whole day.
//!
//! It checks, from the table statistics, that no report touched
//! `usage_events` (`KEEP=1` leaves the database for `EXPLAIN`).
//!
//! Run: `cargo bench --bench reports` (needs the test Postgres of
//! `TOLLGATE_TEST_DATABASE_URL`; makes and drops its own database).
//! `ROWS=1000000 cargo bench --bench reports` for a smaller run;
//! `CUSTOMERS`, `BATCH`, `RUNS` change the rest; `KEEP=1` keeps the
//! database for inspection.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use time::macros::{date, datetime};
use time::{Month, OffsetDateTime};
use tokio_postgres::SimpleQueryMessage;
use tollgate_metering::billing::{Ranking, UsageFilter, UsageGroup};
use tollgate_metering::keys::NewCustomer;
use tollgate_metering::limits::Period;
use tollgate_metering::usage::{CostSource, Outcome, UsageEvent};
use tollgate_metering::Store;
use tollgate_metering::{CustomerId, KeyId};
use uuid::Uuid;

mod common;
use common::{env, Bench};

/// The three months loaded.
const START: OffsetDateTime = datetime!(2025-01-01 00:00 UTC);
const DAYS: u64 = 90;

/// Rows as a busy gateway makes them, in the style of
/// `benches/usage_write.rs`: customers drawn at random (each with one or
/// two keys), three routes, two models (none on one route), one row in
/// fifty rejected, one in a hundred an upstream error; timestamps evenly
/// spread over [`DAYS`] days from [`START`], increasing.
struct Rows {
    customers: Vec<(CustomerId, [KeyId; 2])>,
    state: u64,
    next: u64,
    total: u64,
    step_us: u64,
}

impl Rows {
    fn new(customers: &[CustomerId], total: u64) -> Rows {
        Rows {
            customers: customers
                .iter()
                .enumerate()
                .map(|(c, id)| {
                    let key = KeyId::new();
                    let second = if c % 3 == 0 { key } else { KeyId::new() };
                    (*id, [key, second])
                })
                .collect(),
            state: 0x2545_f491_4f6c_dd1d,
            next: 0,
            total,
            step_us: DAYS * 86_400_000_000 / total.max(1),
        }
    }

    /// xorshift64: deterministic and free of dependencies.
    fn random(&mut self, below: usize) -> usize {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        (self.state % below as u64) as usize
    }

    fn batch(&mut self, size: usize) -> Vec<UsageEvent> {
        let routes = [
            ("openai", "/v1/chat/completions"),
            ("anthropic", "/v1/messages"),
            ("search", "/v1/search"),
        ];
        let mut out = Vec::with_capacity(size);
        while out.len() < size && self.next < self.total {
            let k = self.next;
            self.next += 1;
            let pick = self.random(self.customers.len());
            let (customer, keys) = self.customers[pick];
            let (route, path) = routes[self.random(routes.len())];
            let model = match route {
                "search" => None,
                _ => Some(["gpt-4o", "gpt-4o-mini"][self.random(2)].to_owned()),
            };
            let (outcome, status) = match self.random(100) {
                0 | 50 => (Outcome::RateLimited, 429),
                1 => (Outcome::UpstreamError, 502),
                _ => (Outcome::Ok, 200),
            };
            let key = keys[self.random(2)];
            out.push(UsageEvent {
                id: Uuid::now_v7(),
                client_request_id: k.is_multiple_of(10).then(|| format!("client-{k:08}")),
                ts: START + Duration::from_micros(k * self.step_us),
                customer_id: customer,
                key_id: key,
                instance: "gw-1".to_owned(),
                route: route.to_owned(),
                method: "POST".to_owned(),
                path: path.to_owned(),
                status,
                outcome,
                latency_us: 80_000 + k % 5_000 * 97,
                upstream_latency_us: 60_000 + k % 3_000 * 89,
                request_bytes: 400 + k % 2_000,
                response_bytes: 1_200 + k % 9_000,
                model,
                input_tokens: 100 + k % 1_500,
                output_tokens: 20 + k % 800,
                cache_read_tokens: if k.is_multiple_of(3) { 1_024 } else { 0 },
                cache_write_tokens: 0,
                cost_nanos: 150_000 + (k % 1_000) as i64 * 1_313,
                cost_source: CostSource::Pricing,
            });
        }
        out
    }
}

/// Loads `total` rows through `write_usage`, generating the next batch on
/// another thread while the current one is written.
async fn load(store: Arc<dyn Store>, customers: &[CustomerId], total: usize, batch: usize) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<UsageEvent>>(2);
    let mut rows = Rows::new(customers, total as u64);
    let generator = std::thread::spawn(move || loop {
        let next = rows.batch(batch);
        if next.is_empty() || tx.blocking_send(next).is_err() {
            return;
        }
    });
    let started = Instant::now();
    let mut written = 0u64;
    let mut reported = 0u64;
    while let Some(next) = rx.recv().await {
        written += store.write_usage(&next).await.unwrap();
        if written - reported >= 1_000_000 {
            reported = written;
            eprintln!(
                "  loaded {written} rows ({:.0} rows/s)",
                written as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    generator.join().unwrap();
    assert_eq!(written, total as u64, "every row is new");
    println!(
        "loaded {written} rows in {:.1} s ({:.0} rows/s)",
        started.elapsed().as_secs_f64(),
        written as f64 / started.elapsed().as_secs_f64()
    );
}

/// Median and p99 (nearest rank) of `runs` timed runs of `work`, after two
/// untimed ones.
async fn time<F, Fut, T, E>(what: &str, runs: usize, mut work: F) -> (Duration, T)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Debug,
{
    for _ in 0..2 {
        work().await.unwrap();
    }
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let started = Instant::now();
        last = Some(work().await.unwrap());
        times.push(started.elapsed());
    }
    times.sort();
    let median = times[times.len() / 2];
    let p99 = times[(times.len() * 99).div_ceil(100).max(1) - 1];
    println!(
        "{what:<52} median {:>7.2} ms   p99 {:>7.2} ms",
        median.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
    (median, last.unwrap())
}

async fn simple(client: &tokio_postgres::Client, sql: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for message in client.simple_query(sql).await.unwrap() {
        if let SimpleQueryMessage::Row(row) = message {
            out.push(
                (0..row.len())
                    .map(|i| row.get(i).unwrap_or("").to_owned())
                    .collect(),
            );
        }
    }
    out
}

/// Scans of `usage_events`'s partitions and of the rollups (`usage_daily`
/// and `usage_customer_daily`) so far (sequential + index), as the
/// statistics collector has them.
async fn scans(client: &tokio_postgres::Client) -> (i64, i64) {
    let rows = simple(
        client,
        "SELECT coalesce(sum(seq_scan + coalesce(idx_scan, 0)) FILTER \
             (WHERE relname LIKE 'usage\\_events\\_%'), 0), \
         coalesce(sum(seq_scan + coalesce(idx_scan, 0)) FILTER \
             (WHERE relname IN ('usage_daily', 'usage_customer_daily')), 0) \
         FROM pg_stat_user_tables",
    )
    .await;
    (rows[0][0].parse().unwrap(), rows[0][1].parse().unwrap())
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes "--bench"; nothing to parse.
    let total = env("ROWS", 10_000_000);
    let customer_count = env("CUSTOMERS", 1_000).max(1);
    let batch = env("BATCH", 20_000).max(1);
    let runs = env("RUNS", 20).max(1);
    println!(
        "reports: {total} usage rows over {DAYS} days from {}, {customer_count} customers, \
         batches of {batch}; {runs} runs per figure",
        START.date()
    );

    let Bench { db, store, client } = common::database().await;

    let mut customers = Vec::with_capacity(customer_count);
    for c in 0..customer_count {
        let created = store
            .create_customer(NewCustomer {
                id: CustomerId::new(),
                name: format!("customer-{c:05}"),
                tier: ["free", "pro", "enterprise"][c % 3].to_owned(),
                overrides: serde_json::json!({}),
                created_at: START,
            })
            .await
            .unwrap();
        customers.push(created.id);
    }
    load(store.clone(), &customers, total, batch).await;
    let started = Instant::now();
    simple(&client, "VACUUM ANALYZE").await;
    println!("VACUUM ANALYZE in {:.1} s", started.elapsed().as_secs_f64());
    let sizes = simple(
        &client,
        "SELECT (SELECT count(*) FROM usage_daily), \
                (SELECT count(*) FROM usage_daily WHERE day >= '2025-02-01' AND day < '2025-03-01'), \
                pg_size_pretty(pg_total_relation_size('usage_daily')), \
                (SELECT pg_size_pretty(sum(pg_total_relation_size(inhrelid))) FROM pg_inherits \
                 WHERE inhparent = 'usage_events'::regclass), \
                (SELECT count(*) FROM usage_customer_daily), \
                (SELECT count(*) FROM usage_customer_daily \
                 WHERE day >= '2025-02-01' AND day < '2025-03-01'), \
                pg_size_pretty(pg_total_relation_size('usage_customer_daily'))",
    )
    .await;
    println!(
        "usage_daily: {} rows ({} in February), {}; usage_customer_daily: {} rows ({} in \
         February), {}; usage_events: {}\n",
        sizes[0][0], sizes[0][1], sizes[0][2], sizes[0][4], sizes[0][5], sizes[0][6], sizes[0][3]
    );
    for table in ["usage_daily", "usage_customer_daily"] {
        let counted = simple(
            &client,
            &format!("SELECT sum(requests + rejected) FROM {table}"),
        )
        .await;
        assert_eq!(counted[0][0], total.to_string(), "{table} counts every row");
    }

    let february = Period::new(2025, Month::February);
    let month = UsageFilter::period(february);
    let one = UsageFilter {
        customer: Some(customers[customer_count / 2]),
        ..month.clone()
    };
    let (events_before, daily_before) = scans(&client).await;

    let s = &store;
    let mut medians = Vec::new();
    for (label, filter) in [("month", &month), ("month, one customer", &one)] {
        let (median, totals) = time(&format!("usage_summary ({label})"), runs, || {
            s.usage_summary(filter)
        })
        .await;
        medians.push(median);
        assert!(totals.requests > 0);
        let (median, days) = time(&format!("usage_grouped Day ({label})"), runs, || {
            s.usage_grouped(filter, UsageGroup::Day)
        })
        .await;
        medians.push(median);
        // Every day of February has rows, except for a small customer.
        assert!(days.len() <= 28 && (filter.customer.is_some() || days.len() == 28));
        let (median, top) = time(&format!("top_customers Cost 10 ({label})"), runs, || {
            s.top_customers(filter, Ranking::Cost, 10)
        })
        .await;
        medians.push(median);
        assert!(!top.is_empty());
    }
    println!();
    time("usage_grouped Customer (month)", runs, || {
        s.usage_grouped(&month, UsageGroup::Customer)
    })
    .await;
    time("usage_grouped Model (month)", runs, || {
        s.usage_grouped(&month, UsageGroup::Model)
    })
    .await;
    time("top_customers Tokens 10 (month)", runs, || {
        s.top_customers(&month, Ranking::Tokens, 10)
    })
    .await;
    time("billing_usage (month)", runs, || s.billing_usage(february)).await;
    // No report above may have read usage_events; the statistics of the
    // store's sessions reach the collector within about ten seconds.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let (events_after, daily_after) = scans(&client).await;
    println!(
        "\nscans by the reports: usage_events partitions {}, rollups {}",
        events_after - events_before,
        daily_after - daily_before
    );
    assert_eq!(events_after, events_before, "a report read usage_events");
    assert!(daily_after > daily_before);

    let mid_month = (
        datetime!(2025-02-14 12:00 UTC),
        Uuid::from_u128(0), // before any id at that instant
    );
    println!();
    time("usage_events_page 1000, first of the month", runs, || {
        s.usage_events_page(&month, None, 1_000)
    })
    .await;
    time("usage_events_page 1000, mid-month cursor", runs, || {
        s.usage_events_page(&month, Some(mid_month), 1_000)
    })
    .await;
    time(
        "usage_events_page 100, one customer, mid-month",
        runs,
        || s.usage_events_page(&one, Some(mid_month), 100),
    )
    .await;
    let day = UsageFilter {
        from: date!(2025 - 02 - 14),
        to: date!(2025 - 02 - 14),
        customer: None,
    };
    let started = Instant::now();
    let mut exported = 0usize;
    let mut after = None;
    loop {
        let page = store.usage_events_page(&day, after, 5_000).await.unwrap();
        exported += page.len();
        match page.last() {
            Some(last) if page.len() == 5_000 => after = Some((last.ts, last.id)),
            _ => break,
        }
    }
    println!(
        "{:<52} {exported} rows in {:.2} s ({:.0} rows/s)",
        "export of one day, pages of 5000",
        started.elapsed().as_secs_f64(),
        exported as f64 / started.elapsed().as_secs_f64()
    );

    let worst = medians.iter().max().copied().unwrap_or_default();
    println!(
        "\nslowest median of the six target figures: {:.2} ms (target < 50 ms)",
        worst.as_secs_f64() * 1e3
    );
    drop(client);
    drop(store);
    if std::env::var_os("KEEP").is_some() {
        println!("kept database {}", db.name());
        std::mem::forget(db);
    }
}
