//! Sustained rows/s of `Store::write_usage` (insert, dedupe and daily
//! rollup in one transaction per batch) into Postgres and SQLite, beside a
//! naive baseline: a plain binary COPY of the same rows, same batches, into
//! an unindexed, unpartitioned table, so that the ratio shows what the
//! dedupe and the rollup cost. Target: ≥ 200,000 rows/s into Postgres.
//! "Replayed rows" writes the same batches again (all already there), as a
//! spool replay would.
//!
//! Two ratios to the COPY: `write_usage` alone, one transaction per batch,
//! each with its batch's rollup upserts (a few thousand groups here); and
//! the whole recorder path (docs/PERFORMANCE.md, "usage ingestion"), whose
//! writer puts the batches that queue up while it writes into one
//! transaction, and so upserts each group once for several batches.
//!
//! Each figure is the median of a few rounds of fresh rows (min–max
//! beside it): on a shared machine a single run says little. Beside each
//! rate is the CPU time a row cost, in this process (the gateway's side:
//! recorder, spool, encoding) and in the Postgres server when it runs on
//! this machine: CPU time drifts far less than wall time on a shared
//! machine, and the two together bound what `cores × 1 s / CPU per row`
//! rows/s this machine can reach at all.
//!
//! Run: `cargo bench --bench usage_write` (needs the test Postgres of
//! `TOLLGATE_TEST_DATABASE_URL`; makes and drops its own database, and a
//! temporary SQLite file). `ROWS=50000 BATCH=1000 ROUNDS=1 cargo bench
//! --bench usage_write` to change sizes; `ONLY=recorder` measures the
//! recorder path alone (for profiling it).

#![allow(clippy::unwrap_used)]

// The gateway's allocator, so that the recorder path costs here what it
// costs in the gateway.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use tollgate_metering::usage::recorder::{self, RecorderConfig};
use tollgate_metering::usage::{CostSource, Outcome, UsageEvent};
use tollgate_metering::Store;
use tollgate_metering::{CustomerId, KeyId};
use tollgate_store::testing::TestSqlite;
use uuid::Uuid;

mod common;
use common::{env, Bench};

/// `n` rows as a busy gateway makes them: 300 customers (two keys for
/// two in three of them), three routes, two models (none on one route),
/// drawn at random, so a batch touches a few thousand `usage_daily`
/// groups; one row in fifty rejected, one in a hundred an upstream error;
/// ids and timestamps increasing.
fn rows(n: usize, start: OffsetDateTime) -> Vec<UsageEvent> {
    let customers: Vec<(CustomerId, [KeyId; 2])> = (0..300)
        .map(|c| {
            let key = KeyId::new();
            let second = if c % 3 == 0 { key } else { KeyId::new() };
            (CustomerId::new(), [key, second])
        })
        .collect();
    let routes = [
        ("openai", "/v1/chat/completions"),
        ("anthropic", "/v1/messages"),
        ("search", "/v1/search"),
    ];
    // xorshift64: deterministic and free of dependencies.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut random = move |below: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % below as u64) as usize
    };
    (0..n)
        .map(|i| {
            let k = i as u64;
            let (customer, keys) = customers[random(customers.len())];
            let (route, path) = routes[random(routes.len())];
            let model = match route {
                "search" => None,
                _ => Some(["gpt-4o", "gpt-4o-mini"][random(2)].to_owned()),
            };
            let (outcome, status) = match random(100) {
                0 | 50 => (Outcome::RateLimited, 429),
                1 => (Outcome::UpstreamError, 502),
                _ => (Outcome::Ok, 200),
            };
            UsageEvent {
                id: Uuid::now_v7(),
                client_request_id: (i % 10 == 0).then(|| format!("client-{i:08}")),
                ts: start + Duration::from_micros(k * 50),
                customer_id: customer,
                key_id: keys[random(2)],
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
                cache_read_tokens: if i % 3 == 0 { 1_024 } else { 0 },
                cache_write_tokens: 0,
                cost_nanos: 150_000 + (k % 1_000) as i64 * 1_313,
                cost_source: CostSource::Pricing,
            }
        })
        .collect()
}

/// Clock ticks per second in `/proc/*/stat` (USER_HZ, fixed by the
/// kernel's ABI).
const USER_HZ: f64 = 100.0;

/// CPU seconds used so far: by this process (all threads), and by the
/// Postgres server's processes if they run on this machine (live ones,
/// plus what the postmaster collected from those that exited).
#[derive(Clone, Copy)]
struct CpuTime {
    gateway: f64,
    postgres: Option<f64>,
}

/// utime + stime + cutime + cstime of `/proc/<pid>/stat`, in seconds, and
/// the command name.
fn proc_cpu(stat: &str) -> Option<(&str, f64)> {
    let (head, tail) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1;
    // After the command: state is field 3; utime..cstime are 14..17.
    let ticks: f64 = tail
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|t| t.parse::<f64>().unwrap_or(0.0))
        .sum();
    Some((comm, ticks / USER_HZ))
}

impl CpuTime {
    fn now() -> CpuTime {
        let own = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let gateway = proc_cpu(&own).map_or(0.0, |(_, seconds)| seconds);
        let mut postgres = None;
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            if let Some(("postgres", seconds)) = proc_cpu(&stat) {
                *postgres.get_or_insert(0.0) += seconds;
            }
        }
        CpuTime { gateway, postgres }
    }

    /// Microseconds of CPU per row since `self`: gateway, Postgres.
    fn per_row(self, rows: usize) -> (f64, Option<f64>) {
        let now = CpuTime::now();
        let us = |seconds: f64| seconds * 1e6 / rows as f64;
        (
            us(now.gateway - self.gateway),
            now.postgres.zip(self.postgres).map(|(b, a)| us(b - a)),
        )
    }
}

/// One measured run: rows/s and CPU µs per row on each side.
struct Run {
    rate: f64,
    gateway_us: f64,
    postgres_us: Option<f64>,
}

impl Run {
    fn since(started: Instant, cpu: CpuTime, rows: usize) -> Run {
        let rate = rows as f64 / started.elapsed().as_secs_f64();
        let (gateway_us, postgres_us) = cpu.per_row(rows);
        Run {
            rate,
            gateway_us,
            postgres_us,
        }
    }
}

/// Writes every batch through `store`; returns the run and the rows that
/// were new.
async fn write_all(store: &dyn Store, batches: &[&[UsageEvent]]) -> (Run, u64) {
    let (started, cpu) = (Instant::now(), CpuTime::now());
    let mut new = 0;
    for batch in batches {
        new += store.write_usage(batch).await.unwrap();
    }
    let rows: usize = batches.iter().map(|b| b.len()).sum();
    (Run::since(started, cpu, rows), new)
}

const BASELINE_TYPES: [Type; 22] = [
    Type::UUID,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::UUID,
    Type::UUID,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT4,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
];

/// The naive baseline: each batch one binary COPY (its own transaction)
/// into `usage_baseline`, a table with the columns of `usage_events` and
/// nothing else.
async fn copy_all(client: &tokio_postgres::Client, batches: &[&[UsageEvent]]) -> Run {
    let big = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let (started, cpu) = (Instant::now(), CpuTime::now());
    for batch in batches {
        let sink = client
            .copy_in("COPY usage_baseline FROM STDIN (FORMAT binary)")
            .await
            .unwrap();
        let mut writer = pin!(BinaryCopyInWriter::new(sink, &BASELINE_TYPES));
        for e in *batch {
            writer
                .as_mut()
                .write(&[
                    &e.id,
                    &e.client_request_id,
                    &e.ts,
                    &e.customer_id.0,
                    &e.key_id.0,
                    &e.instance,
                    &e.route,
                    &e.method,
                    &e.path,
                    &i32::from(e.status),
                    &e.outcome.as_str(),
                    &big(e.latency_us),
                    &big(e.upstream_latency_us),
                    &big(e.request_bytes),
                    &big(e.response_bytes),
                    &e.model,
                    &big(e.input_tokens),
                    &big(e.output_tokens),
                    &big(e.cache_read_tokens),
                    &big(e.cache_write_tokens),
                    &e.cost_nanos,
                    &e.cost_source.as_str(),
                ])
                .await
                .unwrap();
        }
        writer.as_mut().finish().await.unwrap();
    }
    let rows: usize = batches.iter().map(|b| b.len()).sum();
    Run::since(started, cpu, rows)
}

/// Sustained rows/s of the whole recorder: `record` (as the data plane
/// calls it) → batch → spool append with fsync → `write_usage` →
/// checkpoint, from the first event recorded until the last is committed.
async fn through_recorder(store: Arc<dyn Store>, total: usize, batch_size: usize) -> Run {
    let spool = tempfile::tempdir().unwrap();
    let config = RecorderConfig {
        batch_size,
        flush_interval: Duration::from_millis(200),
        spool_dir: spool.path().to_owned(),
        spool_max: 1 << 30,
        reject_when_full: true,
        flush_metrics: Default::default(),
    };
    // On a thread of its own, as the gateway runs it.
    let handle = recorder::start_on_own_thread(config, store, None)
        .await
        .unwrap();
    let recorder = handle.recorder();
    let events = rows(total, OffsetDateTime::now_utc());
    let (started, cpu) = (Instant::now(), CpuTime::now());
    for event in events {
        recorder.record(event);
    }
    let stats = recorder.stats().clone();
    while stats.rows_written.load(Ordering::Relaxed) < total as u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let run = Run::since(started, cpu, total);
    handle.shutdown(recorder::SHUTDOWN_GRACE).await;
    run
}

/// The runs of several rounds.
#[derive(Default)]
struct Rates(Vec<Run>);

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

impl Rates {
    fn print(&mut self, what: &str) {
        self.0.sort_by(|a, b| a.rate.total_cmp(&b.rate));
        let rate = self.median();
        let (min, max) = (self.0[0].rate, self.0[self.0.len() - 1].rate);
        let gateway = median(self.0.iter().map(|r| r.gateway_us).collect());
        let postgres = self
            .0
            .iter()
            .map(|r| r.postgres_us)
            .collect::<Option<Vec<f64>>>()
            .map_or("n/a (remote)".to_owned(), |us| format!("{:.2}", median(us)));
        println!(
            "{what:<36} {rate:>9.0} rows/s  ({min:.0}–{max:.0})  \
             CPU µs/row: here {gateway:.2}, postgres {postgres}"
        );
    }

    fn median(&self) -> f64 {
        median(self.0.iter().map(|r| r.rate).collect())
    }

    /// Median CPU µs per row, both sides together, if Postgres is local.
    fn cpu_us(&self) -> Option<f64> {
        let total = self
            .0
            .iter()
            .map(|r| r.postgres_us.map(|pg| pg + r.gateway_us))
            .collect::<Option<Vec<f64>>>()?;
        Some(median(total))
    }

    /// What this machine's cores could do at this CPU cost per row, with
    /// nothing else running: the ceiling the measured rate is under.
    fn print_ceiling(&self, what: &str) {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if let Some(us) = self.cpu_us() {
            println!(
                "{what:<36} {:>9.0} rows/s  ({cores} cores × 1 s / {us:.2} µs)",
                cores as f64 * 1e6 / us
            );
        }
    }
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes "--bench"; nothing to parse.
    let total = env("ROWS", 200_000);
    let batch_size = env("BATCH", 5_000).max(1);
    let rounds = env("ROUNDS", 3).max(1);
    let recorder_only = std::env::var("ONLY").is_ok_and(|only| only == "recorder");
    println!(
        "usage_write: {total} rows in batches of {batch_size}, {rounds} rounds \
         (median rows/s, min–max)"
    );

    let Bench {
        db: _db,
        store: postgres,
        client,
    } = common::database().await;
    // LIKE copies columns and NOT NULL, not keys or indexes.
    client
        .batch_execute("CREATE TABLE usage_baseline (LIKE usage_events)")
        .await
        .unwrap();
    let file = TestSqlite::create();
    let sqlite = tollgate_store::open(file.url(), 1).await.unwrap();
    sqlite.migrate().await.unwrap();

    // Warm-up rows (prepared statements, the staging table, caches) are
    // not measured.
    let warm_up = rows(batch_size, OffsetDateTime::now_utc());
    postgres.write_usage(&warm_up).await.unwrap();
    sqlite.write_usage(&warm_up).await.unwrap();

    let [mut pg, mut pg_replay, mut copy, mut lite, mut lite_replay, mut recorded] =
        std::array::from_fn(|_| Rates::default());
    if recorder_only {
        for _ in 0..rounds {
            recorded
                .0
                .push(through_recorder(postgres.clone(), total, batch_size).await);
        }
        recorded.print("recorder + spool + postgres");
        recorded.print_ceiling("  CPU ceiling of the recorder path");
        return;
    }
    for _ in 0..rounds {
        // Fresh ids every round: every measured row is new.
        let events = rows(total, OffsetDateTime::now_utc());
        let batches: Vec<&[UsageEvent]> = events.chunks(batch_size).collect();

        let (run, new) = write_all(&*postgres, &batches).await;
        assert_eq!(new, total as u64, "every row is new");
        pg.0.push(run);
        let (run, new) = write_all(&*postgres, &batches).await;
        assert_eq!(new, 0, "a replay writes nothing");
        pg_replay.0.push(run);
        client
            .batch_execute("TRUNCATE usage_baseline")
            .await
            .unwrap();
        copy.0.push(copy_all(&client, &batches).await);

        recorded
            .0
            .push(through_recorder(postgres.clone(), total, batch_size).await);

        let (run, new) = write_all(&*sqlite, &batches).await;
        assert_eq!(new, total as u64, "every row is new");
        lite.0.push(run);
        let (run, new) = write_all(&*sqlite, &batches).await;
        assert_eq!(new, 0, "a replay writes nothing");
        lite_replay.0.push(run);
    }

    let counted: i64 = client
        .query_one(
            "SELECT sum(requests + rejected)::bigint FROM usage_daily",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        counted,
        (total * rounds * 2 + batch_size) as i64,
        "the rollups count each row once"
    );

    pg.print("postgres write_usage, new rows");
    pg_replay.print("postgres write_usage, replayed rows");
    copy.print("postgres plain COPY (baseline)");
    println!(
        "{:<36} {:>9.2}",
        "postgres write_usage / plain COPY",
        pg.median() / copy.median()
    );
    recorded.print("recorder + spool + postgres");
    println!(
        "{:<36} {:>9.2}",
        "recorder path / plain COPY",
        recorded.median() / copy.median()
    );
    recorded.print_ceiling("  CPU ceiling of the recorder path");
    copy.print_ceiling("  CPU ceiling of plain COPY");
    println!(
        "{:<36} {:>9.2}",
        "recorder path / write_usage",
        recorded.median() / pg.median()
    );
    lite.print("sqlite write_usage, new rows");
    lite_replay.print("sqlite write_usage, replayed rows");
    drop(client);
    drop(postgres);
}
