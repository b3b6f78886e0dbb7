//! The usage spool's append cost per event, fsync included, for batches of
//! 1, 100 and 5000 events, beside the naive baseline of only serializing the
//! same batch to JSON in memory (no framing, no checksum, no I/O); and the
//! cost of the checkpoint the recorder takes after each database commit.
//!
//! The spool lives under Cargo's target tmp dir (the project's disk, not a
//! tmpfs, so the fsync is real); set `TOLLGATE_BENCH_DIR` to measure
//! another disk. Run: `cargo bench --bench spool`; read ns/event as the
//! time divided by the batch size (criterion prints elements/s).

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use time::OffsetDateTime;
use tollgate_metering::usage::Spool;
use tollgate_metering::usage::{CostSource, Outcome, UsageEvent};
use tollgate_metering::{CustomerId, KeyId};
use uuid::Uuid;

const BATCH_SIZES: [usize; 3] = [1, 100, 5000];
/// Checkpoint (outside the timed region) once this much is pending, so the
/// spool's segments get deleted and the disk does not fill up.
const CHECKPOINT_EVERY: u64 = 256 << 20;

fn event(i: usize) -> UsageEvent {
    let now = OffsetDateTime::now_utc();
    UsageEvent {
        id: Uuid::now_v7(),
        client_request_id: None,
        ts: now.replace_nanosecond(now.microsecond() * 1000).unwrap(),
        customer_id: CustomerId::new(),
        key_id: KeyId::new(),
        instance: "gw-eu-1".to_owned(),
        route: "openai-chat".to_owned(),
        method: "POST".to_owned(),
        path: "/v1/chat/completions".to_owned(),
        status: 200,
        outcome: Outcome::Ok,
        latency_us: 812_345 + i as u64,
        upstream_latency_us: 245_678,
        request_bytes: 1_834,
        response_bytes: 24_981,
        model: Some("gpt-4o-mini-2024-07-18".to_owned()),
        input_tokens: 412,
        output_tokens: 1_187,
        cache_read_tokens: 128,
        cache_write_tokens: 0,
        cost_nanos: 774_000,
        cost_source: CostSource::Pricing,
    }
}

fn bench_dir() -> tempfile::TempDir {
    let base = std::env::var_os("TOLLGATE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

fn spool_append(c: &mut Criterion) {
    let dir = bench_dir();
    let (mut spool, _) = Spool::open(dir.path(), u64::MAX).unwrap();
    for size in BATCH_SIZES {
        let batch: Vec<UsageEvent> = (0..size).map(event).collect();
        let mut group = c.benchmark_group(format!("spool_append/batch_{size}"));
        group.throughput(Throughput::Elements(size as u64));
        group.sample_size(if size >= 5000 { 20 } else { 50 });
        group.measurement_time(Duration::from_secs(if size >= 5000 { 10 } else { 5 }));

        group.bench_function(BenchmarkId::new("spool_append_fsync", size), |b| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    std::hint::black_box(spool.append(&batch).unwrap());
                    elapsed += start.elapsed();
                    if spool.pending_bytes() >= CHECKPOINT_EVERY {
                        spool.checkpoint(spool.end_position()).unwrap();
                    }
                }
                elapsed
            });
        });

        let mut buf = Vec::new();
        group.bench_function(BenchmarkId::new("serialize_only", size), |b| {
            b.iter(|| {
                buf.clear();
                for event in &batch {
                    serde_json::to_writer(&mut buf, event).unwrap();
                    buf.push(b'\n');
                }
                std::hint::black_box(buf.len())
            });
        });
        group.finish();
    }

    // What the recorder pays after each database commit: the checkpoint
    // (temp file, fsync, rename, directory fsync), here after a 100-event
    // append that is not timed.
    let batch: Vec<UsageEvent> = (0..100).map(event).collect();
    let mut group = c.benchmark_group("spool_checkpoint");
    group.sample_size(50);
    group.bench_function("checkpoint_after_each_batch", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                let end = spool.append(&batch).unwrap();
                let start = Instant::now();
                spool.checkpoint(end).unwrap();
                elapsed += start.elapsed();
            }
            elapsed
        });
    });
    group.finish();

    let bytes_per_event = {
        let before = spool.end_position();
        let position = spool.append(&[event(0)]).unwrap();
        position.offset() - before.offset()
    };
    println!("spool record for one event: {bytes_per_event} bytes (framing included)");
}

criterion_group!(benches, spool_append);
criterion_main!(benches);
