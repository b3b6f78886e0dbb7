//! One data-plane authentication (format + checksum check, BLAKE3 digest,
//! cache lookup) against a naive baseline (SHA-256 + `Mutex<HashMap>`), both
//! holding 100,000 keys, on one thread and on two threads at once.
//!
//! Run: `cargo bench --bench auth`. Compare the ratio, not absolute times.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use sha2::{Digest, Sha256};
use time::macros::datetime;
use tollgate_metering::keys::KeyCache;
use tollgate_metering::keys::KeyRecord;
use tollgate_metering::keys::{KeyDigest, KeyFormat};
use tollgate_metering::{CustomerId, KeyId};

const KEYS: usize = 100_000;

struct Naive {
    map: Mutex<HashMap<[u8; 32], (KeyId, CustomerId)>>,
}

impl Naive {
    fn lookup(&self, key: &str) -> Option<(KeyId, CustomerId)> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        self.map.lock().unwrap().get(&digest).copied()
    }
}

fn fixtures() -> (Vec<String>, KeyCache, Naive, KeyFormat) {
    let format = KeyFormat::new("tg");
    let cache = KeyCache::new();
    let mut naive = HashMap::new();
    let mut keys = Vec::with_capacity(KEYS);
    for _ in 0..KEYS {
        let key = format.generate().unwrap().expose().to_owned();
        let record = KeyRecord {
            id: KeyId::new(),
            customer_id: CustomerId::new(),
            digest: KeyDigest::of(&key),
            prefix: format.display_prefix(&key),
            name: None,
            routes: None,
            created_at: datetime!(2026-01-01 0:00 UTC),
            expires_at: None,
            revoked_at: None,
            family_id: KeyId::new(),
            limits: None,
        };
        cache.upsert(&record);
        naive.insert(
            Sha256::digest(key.as_bytes()).into(),
            (record.id, record.customer_id),
        );
        keys.push(key);
    }
    (
        keys,
        cache,
        Naive {
            map: Mutex::new(naive),
        },
        format,
    )
}

fn tollgate_auth(format: &KeyFormat, cache: &KeyCache, key: &str) -> bool {
    format.check(key).is_ok() && cache.lookup(&KeyDigest::of(key), 0).is_ok()
}

/// Runs `op` over `keys` on `threads` threads at once; time per operation.
fn parallel<F: Fn(&str) -> bool + Sync>(
    threads: usize,
    keys: &[String],
    iters: u64,
    op: F,
) -> Duration {
    let barrier = Barrier::new(threads);
    let started = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, op) = (&barrier, &op);
                scope.spawn(move || {
                    barrier.wait();
                    let started = Instant::now();
                    for i in 0..iters {
                        let key = &keys[(i as usize * 7919 + t * 104_729) % keys.len()];
                        assert!(op(key));
                    }
                    started.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .max()
            .unwrap()
    });
    started / u32::try_from(iters).unwrap()
}

fn bench(c: &mut Criterion) {
    let (keys, cache, naive, format) = fixtures();
    let cache = Arc::new(cache);
    let mut group = c.benchmark_group("authenticate");
    let mut i = 0usize;
    group.bench_function("tollgate blake3 + dashmap", |b| {
        b.iter_batched(
            || {
                i = (i + 7919) % KEYS;
                &keys[i]
            },
            |key| assert!(tollgate_auth(&format, &cache, key)),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("naive sha256 + mutex hashmap", |b| {
        b.iter_batched(
            || {
                i = (i + 7919) % KEYS;
                &keys[i]
            },
            |key| assert!(naive.lookup(key).is_some()),
            BatchSize::SmallInput,
        )
    });
    // The parts, to see where the time goes.
    let sample = keys[12345].clone();
    let digest = KeyDigest::of(&sample);
    group.bench_function("part: format + checksum check", |b| {
        b.iter(|| format.check(std::hint::black_box(&sample)).is_ok())
    });
    group.bench_function("part: blake3 digest", |b| {
        b.iter(|| KeyDigest::of(std::hint::black_box(&sample)))
    });
    group.bench_function("part: sha256 digest", |b| {
        b.iter(|| -> [u8; 32] { Sha256::digest(std::hint::black_box(&sample).as_bytes()).into() })
    });
    group.bench_function("part: dashmap lookup", |b| {
        b.iter(|| cache.lookup(std::hint::black_box(&digest), 0).is_ok())
    });
    for threads in [1, 2] {
        group.bench_function(format!("tollgate, {threads} threads"), |b| {
            b.iter_custom(|iters| {
                parallel(threads, &keys, iters, |k| tollgate_auth(&format, &cache, k))
                    * u32::try_from(iters).unwrap()
            })
        });
        group.bench_function(format!("naive, {threads} threads"), |b| {
            b.iter_custom(|iters| {
                parallel(threads, &keys, iters, |k| naive.lookup(k).is_some())
                    * u32::try_from(iters).unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
