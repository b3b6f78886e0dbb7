//! Time and memory to load 1,000,000 keys into the key cache from Postgres,
//! as `serve` does at start (targets: under 3 s, under 300 MB).
//!
//! Run: `cargo bench --bench key_load` (needs the test Postgres of
//! `TOLLGATE_TEST_DATABASE_URL`; makes and drops its own database).
//! `KEYS=200000 cargo bench --bench key_load` for a smaller run.

#![allow(clippy::unwrap_used)]

use std::time::Instant;

use std::collections::HashMap;
use std::sync::Arc;

use tollgate_metering::keys::KeyCache;
use tollgate_metering::limits::{Limiter, Policies, SystemClock};

mod common;
use common::Bench;

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes "--bench"; nothing to parse.
    let keys = common::env("KEYS", 1_000_000) as u64;
    let Bench {
        db: _db,
        store,
        client,
    } = common::database().await;
    let seeded = Instant::now();
    client
        .batch_execute(&format!(
            "ALTER TABLE api_keys DISABLE TRIGGER api_keys_changed;
             INSERT INTO customers (id, name, tier, created_at)
                 VALUES ('00000000-0000-7000-8000-000000000001', 'bulk', 'free', now());
             INSERT INTO api_keys (id, customer_id, digest, prefix, name, routes, created_at)
                 SELECT gen_random_uuid(), '00000000-0000-7000-8000-000000000001',
                        decode(md5(i::text) || md5((-i)::text), 'hex'),
                        'tg_' || substr(md5(i::text), 1, 8), NULL,
                        CASE WHEN i % 10 = 0 THEN ARRAY['openai'] END, now()
                 FROM generate_series(1, {keys}) AS i;
             ANALYZE api_keys;"
        ))
        .await
        .unwrap();
    println!("seeded {keys} keys in {:.2?}", seeded.elapsed());

    let rss_before = status_kib("VmRSS");
    let cache = KeyCache::new();
    let started = Instant::now();
    let policies = Policies::new(
        HashMap::new(),
        Arc::new(Limiter::new(Arc::new(SystemClock))),
    );
    let loaded = cache.reload(&*store, &policies).await.unwrap();
    let took = started.elapsed();
    let rss_after = status_kib("VmRSS");
    let peak = status_kib("VmHWM");
    assert_eq!(loaded as u64, keys);
    assert_eq!(cache.len() as u64, keys);
    println!(
        "loaded {loaded} keys in {took:.2?}: RSS {} MiB -> {} MiB (+{} MiB held), process peak {} MiB",
        rss_before / 1024,
        rss_after / 1024,
        rss_after.saturating_sub(rss_before) / 1024,
        peak / 1024
    );
    drop(cache);
    drop(store);
}
