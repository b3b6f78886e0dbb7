//! One admission (rate check + quota check and reservation) through the
//! `Limiter` against a naive baseline: one global `Mutex<HashMap>` doing a
//! token bucket and a quota check. One hot customer, and 10,000 customers
//! round-robin; on one thread and on two threads at once.
//!
//! Every customer has a rate (1,000,000,000/s, so the GCRA runs but never
//! refuses) and a monthly quota far out of reach, so every iteration is a
//! full admission. "admit + release" also gives the request back, the
//! other thing the data plane does per request on some paths.
//!
//! Times are per admission on each thread (a thread's wall time / its
//! admissions): with perfect scaling the 2-thread figure equals the
//! 1-thread one; contention shows as growth.
//!
//! "with key limits" is the same admission for keys that each have limits
//! of their own (a rate and a quota, nested inside the customer's): the
//! price of per-key limits, to compare with the plain admission in the
//! same run.
//!
//! "alert scan" times the webhook sender's scan for crossed alert fractions
//! at 10,000 and 100,000 customers, against the 250 ms between scans.
//!
//! Run: `cargo bench --bench admission`. Compare the ratio, not absolute times.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use tollgate_metering::keys::KeyId;
use tollgate_metering::limits::{Alerts, KeyLimits, Limiter, Limits, Overage, Rate, SystemClock};
use tollgate_metering::CustomerId;

/// One key of one customer.
type Caller = (CustomerId, KeyId);

const MANY: usize = 10_000;
const RATE: &str = "1000000000/s";
const QUOTA: u64 = 1 << 60;

/// The baseline: everything behind one lock, a float token bucket refilled
/// from `Instant::now()`, and a quota counter.
struct Naive {
    rate_per_sec: f64,
    burst: f64,
    quota: u64,
    map: Mutex<HashMap<CustomerId, (u64, f64, Instant)>>,
}

impl Naive {
    fn new(customers: &[CustomerId]) -> Naive {
        let now = Instant::now();
        Naive {
            rate_per_sec: 1e9,
            burst: 1e9,
            quota: QUOTA,
            map: Mutex::new(customers.iter().map(|c| (*c, (0, 1e9, now))).collect()),
        }
    }

    fn admit(&self, customer: CustomerId) -> bool {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap();
        let Some((used, tokens, last)) = map.get_mut(&customer) else {
            return false;
        };
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * self.rate_per_sec).min(self.burst);
        *last = now;
        if *tokens < 1.0 || *used >= self.quota {
            return false;
        }
        *tokens -= 1.0;
        *used += 1;
        true
    }
}

/// The callers; a limiter whose keys have no limits of their own, one
/// where every key has, and the baseline.
fn fixtures(customers: usize) -> (Vec<Caller>, Limiter, Limiter, Naive) {
    let ids: Vec<Caller> = (0..customers)
        .map(|_| (CustomerId::new(), KeyId::new()))
        .collect();
    let rate = RATE.parse::<Rate>().unwrap();
    let limits = Limits {
        rate: Some(rate),
        monthly_requests: Some(QUOTA),
        overage: Overage::Block,
        ..Limits::unlimited()
    };
    let key_limits = KeyLimits {
        rate: Some(rate),
        monthly_requests: Some(QUOTA),
        ..KeyLimits::default()
    };
    let limiter = Limiter::new(Arc::new(SystemClock));
    let keyed = Limiter::new(Arc::new(SystemClock));
    for &(customer, key) in &ids {
        limiter.set_limits(customer, limits.clone());
        keyed.set_limits(customer, limits.clone());
        keyed.set_key_limits(key, key, customer, Some(&key_limits), true);
    }
    let customer_ids: Vec<CustomerId> = ids.iter().map(|(customer, _)| *customer).collect();
    let naive = Naive::new(&customer_ids);
    (ids, limiter, keyed, naive)
}

/// Runs `op` `iters` times on each of `threads` threads at once, over
/// `customers` round-robin (a prime stride, so threads interleave); returns
/// the slowest thread's wall time.
fn parallel<F: Fn(Caller) -> bool + Sync>(
    threads: usize,
    customers: &[Caller],
    iters: u64,
    op: F,
) -> Duration {
    let barrier = Barrier::new(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, op) = (&barrier, &op);
                scope.spawn(move || {
                    let (len, stride) = (customers.len(), 7919 % customers.len());
                    let mut i = t * 104_729 % len;
                    barrier.wait();
                    let started = Instant::now();
                    for _ in 0..iters {
                        assert!(op(black_box(customers[i])));
                        i += stride;
                        if i >= len {
                            i -= len;
                        }
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
    })
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("admission");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    for (label, customers) in [("1 hot customer", 1), ("10k customers", MANY)] {
        let (ids, limiter, keyed, naive) = fixtures(customers);
        for threads in [1, 2] {
            group.bench_function(format!("tollgate admit, {label}, {threads} thr"), |b| {
                b.iter_custom(|iters| {
                    parallel(threads, &ids, iters, |(c, k)| {
                        limiter.admit(c, k).result.is_ok()
                    })
                })
            });
            group.bench_function(
                format!("tollgate admit with key limits, {label}, {threads} thr"),
                |b| {
                    b.iter_custom(|iters| {
                        parallel(threads, &ids, iters, |(c, k)| {
                            keyed.admit(c, k).result.is_ok()
                        })
                    })
                },
            );
            group.bench_function(
                format!("tollgate admit + release, {label}, {threads} thr"),
                |b| {
                    b.iter_custom(|iters| {
                        parallel(threads, &ids, iters, |(c, k)| {
                            match limiter.admit(c, k).result {
                                Ok(admission) => {
                                    limiter.release(&admission);
                                    true
                                }
                                Err(_) => false,
                            }
                        })
                    })
                },
            );
            group.bench_function(
                format!("naive mutex hashmap, {label}, {threads} thr"),
                |b| b.iter_custom(|iters| parallel(threads, &ids, iters, |(c, _)| naive.admit(c))),
            );
        }
    }
    group.finish();
}

/// The scan for crossed alert fractions that the webhook sender runs four
/// times a second when quota webhooks are configured: every customer's
/// counters (three fractions each, none crossed). Measured against the
/// 250 ms between scans; it runs on the blocking pool, not on a data-plane
/// worker.
fn alert_scan(c: &mut Criterion) {
    let mut group = c.benchmark_group("alert scan");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    let alerts = Alerts::from_millionths(vec![500_000, 800_000, 1_000_000]).unwrap();
    for customers in [MANY, 10 * MANY] {
        let limiter = Limiter::new(Arc::new(SystemClock));
        let limits = Limits {
            monthly_requests: Some(QUOTA),
            overage: Overage::Block,
            alerts: alerts.clone(),
            ..Limits::unlimited()
        };
        for _ in 0..customers {
            let customer = CustomerId::new();
            limiter.set_limits(customer, limits.clone());
            assert!(limiter.admit(customer, KeyId::new()).result.is_ok());
        }
        group.bench_function(format!("alerts(), {customers} customers"), |b| {
            b.iter(|| black_box(limiter.alerts()))
        });
    }
    group.finish();
}

criterion_group!(benches, bench, alert_scan);
criterion_main!(benches);
