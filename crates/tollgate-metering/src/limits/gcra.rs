//! The generic cell rate algorithm: a rate limit as one number per customer.
//!
//! The state is the theoretical arrival time (TAT): when the customer's
//! window would be empty again if no further request came. A request at
//! `now` conforms if, after adding one emission interval `T = per / count`,
//! the TAT is at most `count × T` ahead of `now`, so from idle exactly
//! `count` requests pass at once and then one more every `T`. All times are
//! nanoseconds since the Unix epoch (i64: good until 2262).

use super::config::Rate;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Gcra {
    /// The configured count: the `x-ratelimit-limit` value.
    pub count: u64,
    /// T, at least 1 ns.
    interval_ns: i64,
    /// How far the TAT may run ahead of now: `count × T` rather than `per`,
    /// which keeps the burst at exactly `count` when `per` is not a multiple
    /// of `count`. T is truncated to whole nanoseconds, so the sustained
    /// rate can exceed `count / per` by a relative error below
    /// `count / per_ns` (7e-9 for 7/s): never noticeably.
    tolerance_ns: i64,
}

impl Gcra {
    pub(super) fn new(rate: Rate) -> Gcra {
        let per_ns = i64::try_from(rate.per.as_nanos())
            .unwrap_or(i64::MAX)
            .max(1);
        match i64::try_from(rate.count) {
            // Nothing ever conforms; the next look is one window away.
            Ok(0) => Gcra {
                count: 0,
                interval_ns: per_ns,
                tolerance_ns: 0,
            },
            Ok(count) => {
                let interval_ns = (per_ns / count).max(1);
                Gcra {
                    count: rate.count,
                    interval_ns,
                    tolerance_ns: interval_ns.saturating_mul(count),
                }
            }
            Err(_) => Gcra {
                count: rate.count,
                interval_ns: 1,
                tolerance_ns: i64::MAX,
            },
        }
    }

    /// The TAT after admitting a request at `now`, or how many nanoseconds
    /// until one would conform.
    pub(super) fn check(&self, tat: i64, now: i64) -> Result<i64, i64> {
        let new_tat = tat.max(now).saturating_add(self.interval_ns);
        let ahead = new_tat.saturating_sub(now);
        if ahead <= self.tolerance_ns {
            Ok(new_tat)
        } else {
            Err(ahead - self.tolerance_ns)
        }
    }

    /// How many requests would conform right now, back to back.
    pub(super) fn remaining(&self, tat: i64, now: i64) -> u64 {
        let ahead = tat.saturating_sub(now).max(0);
        let free = self.tolerance_ns.saturating_sub(ahead);
        if free <= 0 {
            0
        } else {
            u64::try_from(free / self.interval_ns)
                .unwrap_or(u64::MAX)
                .min(self.count)
        }
    }

    /// When the window is fully replenished.
    pub(super) fn reset(&self, tat: i64, now: i64) -> i64 {
        tat.max(now)
    }

    /// The TAT that keeps the same number of requests "in the window" under
    /// `self` as `tat` held under `old`, so a live rate change neither
    /// forgives nor charges past requests.
    pub(super) fn rescale_from(&self, old: &Gcra, tat: i64, now: i64) -> i64 {
        let ahead = tat.saturating_sub(now).max(0);
        if ahead == 0 {
            return tat;
        }
        let scaled = i128::from(ahead) * i128::from(self.interval_ns) / i128::from(old.interval_ns);
        now.saturating_add(i64::try_from(scaled).unwrap_or(i64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const SEC: i64 = 1_000_000_000;

    fn gcra(count: u64, per_secs: u64) -> Gcra {
        Gcra::new(Rate {
            count,
            per: Duration::from_secs(per_secs),
        })
    }

    #[test]
    fn burst_of_count_then_one_per_interval() {
        let g = gcra(3, 1);
        let now = 1_000 * SEC;
        let mut tat = 0;
        for remaining in [2, 1, 0] {
            tat = g.check(tat, now).unwrap();
            assert_eq!(g.remaining(tat, now), remaining);
        }
        assert_eq!(tat, now + 999_999_999);
        assert_eq!(g.check(tat, now), Err(333_333_333));
        assert_eq!(g.check(tat, now + 333_333_332), Err(1));
        assert_eq!(g.check(tat, now + 333_333_333), Ok(now + 1_333_333_332));
        assert_eq!(g.reset(tat, now), now + 999_999_999);
        assert_eq!(g.remaining(tat, now + SEC), 3);
    }

    #[test]
    fn counts_that_do_not_divide_the_window_keep_the_burst() {
        let g = gcra(7, 1);
        let now = 5 * SEC;
        let mut tat = 0;
        for _ in 0..7 {
            tat = g.check(tat, now).unwrap();
        }
        assert!(g.check(tat, now).is_err());
        assert!(tat <= now + SEC);
    }

    #[test]
    fn zero_count_never_conforms() {
        let g = gcra(0, 60);
        assert_eq!(g.check(0, SEC), Err(60 * SEC));
        assert_eq!(g.remaining(0, SEC), 0);
    }

    #[test]
    fn rescale_keeps_used_requests() {
        let (slow, fast) = (gcra(3, 1), gcra(6, 1));
        let now = 10 * SEC;
        let mut tat = 0;
        for _ in 0..3 {
            tat = slow.check(tat, now).unwrap();
        }
        let tat = fast.rescale_from(&slow, tat, now);
        assert_eq!(fast.remaining(tat, now), 3);
        let back = slow.rescale_from(&fast, tat, now);
        assert_eq!(slow.remaining(back, now), 0);
        assert_eq!(fast.rescale_from(&slow, 0, now), 0, "idle stays idle");
    }
}
