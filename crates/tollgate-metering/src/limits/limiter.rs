//! The limiter: per-customer counters and the admission decision.
//!
//! Each customer has one small state in a sharded map (dashmap), and an
//! admission holds that state's shard write lock for the few nanoseconds of
//! arithmetic: the check and the reservation happen under it, so a quota
//! with N left admits exactly N of any number of concurrent requests, and a
//! rejection leaves nothing behind (no request reserved, no rate slot
//! taken). The shard lock is the per-customer lock: a `Mutex` per customer
//! under a shard read lock measured 13% slower (four atomic operations per
//! admission instead of two) and bought nothing, since with hundreds of
//! shards two busy customers rarely share one (see `shard_amount`).
//!
//! Monthly counters are kept in two parts per customer: `own` (this
//! instance's admissions and settlements in the period, exact and
//! immediate) and `base` (everyone else's, from the database at the last
//! sync). See [`Limiter::apply_totals`] for the arithmetic that keeps the
//! two from overlapping.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dashmap::DashMap;
use time::OffsetDateTime;
use uuid::Uuid;

use super::clock::{from_unix_nanos, unix_nanos, Clock};
use super::config::{Limits, Overage};
use super::gcra::Gcra;
use super::period::Period;
use crate::keys::ids::{CustomerId, KeyId};
use crate::limits::alerts::{reached, Alerts, KeyAlert, LimitAlert, MonthlyLimit};
use crate::limits::config::KeyLimits;
use crate::usage::{Outcome, UsageEvent};

const NANOS_PER_SEC: i64 = 1_000_000_000;

mod sync;

pub use sync::SyncRead;

/// Monthly counts: a customer's period totals in the database, or a part
/// of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeriodTotals {
    /// Admitted requests.
    pub requests: u64,
    pub tokens: u64,
    pub cost_nanos: i64,
}

impl PeriodTotals {
    pub(crate) const ZERO: PeriodTotals = PeriodTotals {
        requests: 0,
        tokens: 0,
        cost_nanos: 0,
    };

    fn plus(self, other: PeriodTotals) -> PeriodTotals {
        PeriodTotals {
            requests: self.requests.saturating_add(other.requests),
            tokens: self.tokens.saturating_add(other.tokens),
            cost_nanos: self.cost_nanos.saturating_add(other.cost_nanos),
        }
    }

    /// Floored at zero in every field.
    fn minus(self, other: PeriodTotals) -> PeriodTotals {
        PeriodTotals {
            requests: self.requests.saturating_sub(other.requests),
            tokens: self.tokens.saturating_sub(other.tokens),
            cost_nanos: self.cost_nanos.saturating_sub(other.cost_nanos).max(0),
        }
    }
}

/// The tokens a usage row counts toward `monthly_tokens`: every class
/// (input, output, cache read, cache write). The database's period totals
/// and the values passed to [`Limiter::settle`] must count the same way,
/// or sync would drift.
pub fn event_tokens(event: &UsageEvent) -> u64 {
    event
        .input_tokens
        .saturating_add(event.output_tokens)
        .saturating_add(event.cache_read_tokens)
        .saturating_add(event.cache_write_tokens)
}

/// The outcome of [`Limiter::admit`].
#[derive(Debug)]
#[must_use]
pub struct Decision {
    pub result: Result<Admission, Rejection>,
    /// `x-ratelimit-*` for the tightest request limit, after this decision;
    /// `None` when the customer has no request limit.
    pub headers: Option<RateHeaders>,
    /// What is left of the monthly token and cost budgets as of admission
    /// (before this request's own tokens and cost), clamped at 0; `None`
    /// for a budget the customer does not have.
    pub remaining: Remaining,
}

/// The budgets left, for `x-tollgate-tokens-remaining` and
/// `x-tollgate-cost-remaining-usd`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Remaining {
    pub tokens: Option<u64>,
    pub cost_nanos: Option<i64>,
}

impl Remaining {
    /// The smaller of each, where either has one.
    fn least(self, other: Remaining) -> Remaining {
        fn min<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
        Remaining {
            tokens: min(self.tokens, other.tokens),
            cost_nanos: min(self.cost_nanos, other.cost_nanos),
        }
    }
}

/// A request let through: one monthly request reserved in `period`.
/// [`Limiter::release`] gives it back, [`Limiter::settle`] adds what the
/// response used.
#[derive(Debug)]
pub struct Admission {
    customer: CustomerId,
    /// The key's family, when the key has limits of its own.
    family: Option<Arc<KeyFamily>>,
    period: Period,
    released: AtomicBool,
    /// Still counted among the requests in flight (until its first
    /// settlement or release).
    in_flight: AtomicBool,
}

impl Admission {
    #[cfg(test)]
    /// The period the request was counted in.
    pub(crate) fn period(&self) -> Period {
        self.period
    }
}

/// Which budget refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Budget {
    Tokens,
    Cost,
}

/// Why a request was refused. Every `retry_after` is whole seconds, at
/// least one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// Over the short-window rate; `retry_after` = when the next request
    /// would conform.
    #[error("rate limit exceeded; retry after {} seconds", .retry_after.as_secs())]
    RateLimited { retry_after: Duration },
    /// `monthly_requests` used up with `overage = "block"`; `retry_after` =
    /// until the next period.
    #[error(
        "monthly request quota exceeded; it resets in {} seconds",
        .retry_after.as_secs()
    )]
    QuotaExceeded { retry_after: Duration },
    /// `monthly_tokens` or `monthly_cost_usd` used up (these always block);
    /// `retry_after` = until the next period.
    #[error(
        "monthly {} budget exceeded; it resets in {} seconds",
        match .which { Budget::Tokens => "token", Budget::Cost => "cost" },
        .retry_after.as_secs()
    )]
    BudgetExceeded {
        which: Budget,
        retry_after: Duration,
    },
    /// What is left of `monthly_tokens` or `monthly_cost_usd` may be used
    /// up by the customer's requests still in flight (see
    /// [`State::held`]); `retry_after` = one second, by when some of them
    /// may have ended.
    #[error(
        "the rest of the monthly {} budget is held by requests in flight; retry after {} seconds",
        match .which { Budget::Tokens => "token", Budget::Cost => "cost" },
        .retry_after.as_secs()
    )]
    BudgetHeld {
        which: Budget,
        retry_after: Duration,
    },
}

impl Rejection {
    /// Of two refusals (a key's and its customer's), the one to report: a
    /// quota or budget over a rate, since retrying soon cannot help; of two
    /// rates, the longer wait.
    fn graver(self, other: Rejection) -> Rejection {
        match (self, other) {
            (
                Rejection::RateLimited { retry_after: a },
                Rejection::RateLimited { retry_after: b },
            ) => Rejection::RateLimited {
                retry_after: a.max(b),
            },
            (Rejection::RateLimited { .. }, graver) => graver,
            (graver, _) => graver,
        }
    }

    /// For the `Retry-After` header.
    pub fn retry_after(&self) -> Duration {
        match self {
            Rejection::RateLimited { retry_after }
            | Rejection::QuotaExceeded { retry_after }
            | Rejection::BudgetExceeded { retry_after, .. }
            | Rejection::BudgetHeld { retry_after, .. } => *retry_after,
        }
    }

    /// The usage row's outcome (and the error `type`).
    pub fn outcome(&self) -> Outcome {
        match self {
            Rejection::RateLimited { .. } => Outcome::RateLimited,
            Rejection::QuotaExceeded { .. } => Outcome::QuotaExceeded,
            Rejection::BudgetExceeded { .. } | Rejection::BudgetHeld { .. } => {
                Outcome::BudgetExceeded
            }
        }
    }

    #[cfg(test)]
    /// The `limit` label of `tollgate_limit_rejections_total`.
    pub(crate) fn limit(&self) -> &'static str {
        match self {
            Rejection::RateLimited { .. } => "rate",
            Rejection::QuotaExceeded { .. } => "monthly_requests",
            Rejection::BudgetExceeded { which, .. } | Rejection::BudgetHeld { which, .. } => {
                match which {
                    Budget::Tokens => "monthly_tokens",
                    Budget::Cost => "monthly_cost",
                }
            }
        }
    }
}

/// `x-ratelimit-*` for one request limit.
///
/// For the rate: `limit` = count, `remaining` = requests that could be
/// admitted right now, `used` = limit − remaining, `reset` = when the
/// window is fully replenished. For `monthly_requests`: the period's
/// limit, used (may exceed the limit under `bill`), remaining (≥ 0) and the
/// next period's start. `reset` is unix seconds, rounded up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateHeaders {
    pub limit: u64,
    pub remaining: u64,
    pub used: u64,
    pub reset: i64,
}

/// One monthly counter for the quota views.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meter<T> {
    /// Database (other instances, earlier processes) + this instance.
    pub used: T,
    pub limit: Option<T>,
    /// `limit − used`, at least zero; `None` when unlimited.
    pub remaining: Option<T>,
}

/// Used / remaining / reset per limit, for `GET /_tollgate/usage` and
/// `GET /v1/quota/{customer}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaView {
    pub limits: Limits,
    pub period: Period,
    /// When the monthly counters start over: the next period's start.
    pub reset: OffsetDateTime,
    /// The rate window right now; `None` without a rate.
    pub rate: Option<RateHeaders>,
    pub requests: Meter<u64>,
    pub tokens: Meter<u64>,
    pub cost_nanos: Meter<i64>,
    /// What a response would carry now (the tightest request limit).
    pub headers: Option<RateHeaders>,
}

/// What this instance had committed to the database, per customer, at one
/// moment: see [`Limiter::apply_totals`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CommittedSnapshot {
    period: Period,
    committed: HashMap<CustomerId, PeriodTotals>,
    /// The same per key family.
    keys: HashMap<KeyId, PeriodTotals>,
}

impl CommittedSnapshot {
    #[cfg(test)]
    pub(crate) fn period(&self) -> Period {
        self.period
    }

    #[cfg(test)]
    /// This instance's committed rows of `customer` in the period.
    pub(crate) fn get(&self, customer: CustomerId) -> PeriodTotals {
        self.committed.get(&customer).copied().unwrap_or_default()
    }

    /// This instance's committed rows of `id` (in `of`, the customers' or
    /// the key families' map) in `period`; zero for a snapshot of another
    /// period.
    fn ours<K: std::hash::Hash + Eq>(
        &self,
        period: Period,
        of: &HashMap<K, PeriodTotals>,
        id: &K,
    ) -> PeriodTotals {
        if self.period == period {
            of.get(id).copied().unwrap_or_default()
        } else {
            PeriodTotals::ZERO
        }
    }
}

/// One customer's limits and counters.
#[derive(Debug)]
struct State {
    limits: Limits,
    gcra: Option<Gcra>,
    /// GCRA theoretical arrival time, unix ns; at or before now = idle.
    tat_ns: i64,
    /// The period every count below belongs to.
    period: Period,
    /// `period.next_start()` in unix ns, so the hot path can tell it is
    /// still in the period without calendar arithmetic.
    period_end_ns: i64,
    /// This instance's admissions and settlements in `period`.
    own: PeriodTotals,
    /// Database totals minus this instance's committed rows, at the last
    /// sync: everyone else's usage.
    base: PeriodTotals,
    /// This instance's rows committed to the database in `period`.
    committed: PeriodTotals,
    /// Monthly limits ([`MonthlyLimit::bit`]) that refused a request in
    /// `period`, and those whose refusal is recorded as an alert.
    refused: u8,
    exhausted_alerted: u8,
    /// Per monthly limit, the alert fractions (bit i: the i-th) recorded
    /// in `period`.
    alerted: [u16; 3],
    /// Requests admitted here in `period` and not yet settled or released.
    in_flight: u64,
    /// The most tokens and the highest cost one request has settled here
    /// (since the process started: a customer's size, not its month's).
    largest: PeriodTotals,
    /// Whether any request has settled here.
    settled_any: bool,
    /// The period before `period`, while it still owes alerts that are
    /// not recorded (the month turned with the database down, say): they
    /// happened, so they are still owed. Never more than one period back.
    closed: Option<Box<State>>,
    /// A key family given limits while running: its month's usage is not
    /// known until a totals read that began after it was made (this is
    /// the read count when it was made). Until then its monthly limits
    /// cannot be judged, and its requests wait (see [`State::check`]).
    totals_pending: Option<u64>,
}

impl State {
    fn new(limits: Limits, now_ns: i64) -> State {
        let period = Period::containing(from_unix_nanos(now_ns));
        State {
            gcra: limits.rate.map(Gcra::new),
            limits,
            tat_ns: 0,
            period,
            period_end_ns: unix_nanos(period.next_start()),
            own: PeriodTotals::ZERO,
            base: PeriodTotals::ZERO,
            committed: PeriodTotals::ZERO,
            refused: 0,
            exhausted_alerted: 0,
            alerted: [0; 3],
            in_flight: 0,
            largest: PeriodTotals::ZERO,
            settled_any: false,
            closed: None,
            totals_pending: None,
        }
    }

    /// Starts the new period's counts when the clock has entered one.
    /// A clock that steps back across a month boundary keeps the later
    /// period: counts never go back to an earlier month.
    fn roll(&mut self, now_ns: i64) {
        if now_ns < self.period_end_ns {
            return;
        }
        let period = Period::containing(from_unix_nanos(now_ns));
        if period > self.period {
            self.closed = self.owes_alerts().then(|| Box::new(self.closed_copy()));
            self.period = period;
            self.period_end_ns = unix_nanos(period.next_start());
            self.own = PeriodTotals::ZERO;
            self.base = PeriodTotals::ZERO;
            self.committed = PeriodTotals::ZERO;
            self.refused = 0;
            self.exhausted_alerted = 0;
            self.alerted = [0; 3];
            // What is still in flight settles into the period it began in.
            self.in_flight = 0;
        }
    }

    fn used(&self) -> PeriodTotals {
        self.base.plus(self.own)
    }

    /// What the alerts of this state's period need, kept when it closes.
    fn closed_copy(&self) -> State {
        State {
            limits: self.limits.clone(),
            gcra: None,
            tat_ns: 0,
            period: self.period,
            period_end_ns: self.period_end_ns,
            own: self.own,
            base: self.base,
            committed: self.committed,
            refused: self.refused,
            exhausted_alerted: self.exhausted_alerted,
            alerted: self.alerted,
            in_flight: 0,
            largest: PeriodTotals::ZERO,
            settled_any: false,
            closed: None,
            totals_pending: None,
        }
    }

    /// Takes the database's `total` for `period` in, less `ours` (this
    /// instance's committed rows): see [`Limiter::apply_totals`].
    fn rebase(&mut self, now_ns: i64, period: Period, total: PeriodTotals, ours: PeriodTotals) {
        self.roll(now_ns);
        if self.period == period {
            self.base = total.minus(ours);
        }
    }

    /// A key family's alert fractions are its customer's tier's.
    fn alerts_from(&mut self, alerts: &Alerts) {
        if self.limits.alerts != *alerts {
            self.follow_alerts(alerts);
            self.limits.alerts = alerts.clone();
        }
    }

    /// Keeps what is recorded by fraction, not by place, when the list of
    /// fractions changes: a fraction recorded under the old list stays
    /// recorded, and one new to the list is owed when reached.
    fn follow_alerts(&mut self, new: &Alerts) {
        let old = self.limits.alerts.millionths();
        for recorded in &mut self.alerted {
            let mut moved = 0;
            for (index, millionths) in old.iter().enumerate() {
                if *recorded & (1 << index) != 0 {
                    if let Some(place) = new.millionths().iter().position(|m| m == millionths) {
                        moved |= 1 << place;
                    }
                }
            }
            *recorded = moved;
        }
    }

    fn set_limits(&mut self, limits: Limits, now_ns: i64) {
        let gcra = limits.rate.map(Gcra::new);
        match (self.gcra, gcra) {
            (Some(old), Some(new)) if old != new => {
                self.tat_ns = new.rescale_from(&old, self.tat_ns, now_ns);
            }
            (None, Some(_)) => self.tat_ns = 0,
            _ => {}
        }
        self.gcra = gcra;
        if self.limits.alerts != limits.alerts {
            self.follow_alerts(&limits.alerts);
        }
        self.limits = limits;
    }

    fn remaining(&self) -> Remaining {
        let used = self.used();
        Remaining {
            tokens: self
                .limits
                .monthly_tokens
                .map(|limit| limit.saturating_sub(used.tokens)),
            cost_nanos: self
                .limits
                .monthly_cost_nanos
                .map(|limit| limit.saturating_sub(used.cost_nanos).max(0)),
        }
    }

    /// Checks in order (rate, budgets, request quota) without taking
    /// anything; `Ok` carries the rate's new arrival time for
    /// [`State::take`].
    fn check(&self, now_ns: i64) -> Result<Option<i64>, Rejection> {
        let new_tat = match self.gcra.map(|gcra| gcra.check(self.tat_ns, now_ns)) {
            Some(Err(wait_ns)) => {
                return Err(Rejection::RateLimited {
                    retry_after: ceil_secs(wait_ns),
                })
            }
            Some(Ok(tat)) => Some(tat),
            None => None,
        };
        if self.totals_pending.is_some()
            && (self.limits.monthly_requests.is_some()
                || self.limits.monthly_tokens.is_some()
                || self.limits.monthly_cost_nanos.is_some())
        {
            // Judged against nothing, a key whose first limit was set to
            // stop a runaway would start the month afresh; its usage is
            // being read (milliseconds), so this passes at once.
            return Err(Rejection::RateLimited {
                retry_after: Duration::from_secs(1),
            });
        }
        let used = self.used();
        let to_next_period = || ceil_secs(self.period_end_ns.saturating_sub(now_ns));
        let budgets = [
            (Budget::Tokens, self.limits.monthly_tokens, used.tokens),
            (
                Budget::Cost,
                self.limits
                    .monthly_cost_nanos
                    .map(|limit| u64::try_from(limit).unwrap_or(0)),
                u64::try_from(used.cost_nanos).unwrap_or(0),
            ),
        ];
        for (which, limit, used) in budgets {
            if limit.is_some_and(|limit| used >= limit) {
                return Err(Rejection::BudgetExceeded {
                    which,
                    retry_after: to_next_period(),
                });
            }
        }
        if self.limits.overage == Overage::Block
            && self
                .limits
                .monthly_requests
                .is_some_and(|limit| used.requests >= limit)
        {
            return Err(Rejection::QuotaExceeded {
                retry_after: to_next_period(),
            });
        }
        // Last: the one refusal that passes within the period.
        for (which, limit, used) in budgets {
            if limit.is_some_and(|limit| used.saturating_add(self.held(which)) >= limit) {
                return Err(Rejection::BudgetHeld {
                    which,
                    retry_after: Duration::from_secs(1),
                });
            }
        }
        Ok(new_tat)
    }

    /// Takes the rate slot and the request that [`State::check`] allowed.
    fn take(&mut self, new_tat: Option<i64>) {
        if let Some(tat) = new_tat {
            self.tat_ns = tat;
        }
        self.own.requests = self.own.requests.saturating_add(1);
        self.in_flight = self.in_flight.saturating_add(1);
    }

    /// What the requests in flight may still add to `which`: each is
    /// counted at the most one request has used here, or at the period's
    /// average if that is more (after a restart, the database's totals
    /// are all there is). Budgets are settled when responses end, so
    /// without this any number of requests admitted together would all
    /// pass a budget with a cent left. Until the first request settles
    /// here and with no usage in the database, nothing is known of their
    /// size: they hold the whole budget, one request at a time.
    fn held(&self, which: Budget) -> u64 {
        if self.in_flight == 0 {
            return 0;
        }
        let used = self.used();
        let (largest, total) = match which {
            Budget::Tokens => (self.largest.tokens, used.tokens),
            Budget::Cost => (
                u64::try_from(self.largest.cost_nanos).unwrap_or(0),
                u64::try_from(used.cost_nanos).unwrap_or(0),
            ),
        };
        // The requests counted in `used` that have ended somewhere.
        let ended = used.requests.saturating_sub(self.in_flight);
        if !self.settled_any && ended == 0 {
            return u64::MAX;
        }
        let average = total.checked_div(ended).unwrap_or(0);
        largest.max(average).saturating_mul(self.in_flight)
    }

    /// One of the requests in flight has ended.
    fn ended(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// A request that reached the upstream ended having used `tokens` and
    /// `cost_nanos`.
    fn note_size(&mut self, tokens: u64, cost_nanos: i64) {
        self.settled_any = true;
        self.largest.tokens = self.largest.tokens.max(tokens);
        self.largest.cost_nanos = self.largest.cost_nanos.max(cost_nanos);
    }

    /// Notes which monthly limit refused a request in this period (for the
    /// `quota.exhausted` alert).
    fn note_refusal(&mut self, rejection: Rejection) {
        if let Some(limit) = MonthlyLimit::of(rejection) {
            self.refused |= limit.bit();
        }
    }

    fn rate_headers(&self, now_ns: i64) -> Option<RateHeaders> {
        self.gcra.map(|gcra| {
            let remaining = gcra.remaining(self.tat_ns, now_ns);
            RateHeaders {
                limit: gcra.count,
                remaining,
                used: gcra.count - remaining,
                reset: ceil_div(gcra.reset(self.tat_ns, now_ns), NANOS_PER_SEC),
            }
        })
    }

    fn quota_headers(&self) -> Option<RateHeaders> {
        self.limits.monthly_requests.map(|limit| {
            let used = self.used().requests;
            RateHeaders {
                limit,
                remaining: limit.saturating_sub(used),
                used,
                reset: ceil_div(self.period_end_ns, NANOS_PER_SEC),
            }
        })
    }

    /// The request limit with the fewest remaining; on a tie, the rate.
    fn headers(&self, now_ns: i64) -> Option<RateHeaders> {
        match (self.rate_headers(now_ns), self.quota_headers()) {
            (Some(rate), Some(quota)) if quota.remaining < rate.remaining => Some(quota),
            (Some(rate), _) => Some(rate),
            (None, quota) => quota,
        }
    }

    /// Use and limit of one monthly limit (cost in nano-USD); `None`
    /// without that limit.
    fn meter(&self, limit: MonthlyLimit) -> Option<(u64, u64)> {
        let used = self.used();
        match limit {
            MonthlyLimit::Requests => self.limits.monthly_requests.map(|l| (used.requests, l)),
            MonthlyLimit::Tokens => self.limits.monthly_tokens.map(|l| (used.tokens, l)),
            MonthlyLimit::Cost => self.limits.monthly_cost_nanos.map(|l| {
                let nonneg = |n: i64| u64::try_from(n).unwrap_or(0);
                (nonneg(used.cost_nanos), nonneg(l))
            }),
        }
    }

    /// Whether [`State::pending_alerts`] would find any.
    fn owes_alerts(&self) -> bool {
        let mut found = Vec::new();
        self.owed_in_period(
            &self.limits.alerts,
            CustomerId(Uuid::nil()),
            None,
            &mut found,
        );
        !found.is_empty()
    }

    /// Alerts this state owes and has not recorded: fractions of `alerts`
    /// reached, and monthly limits that refused a request, in its closed
    /// period first and then in its own.
    fn pending_alerts(
        &self,
        alerts: &Alerts,
        customer: CustomerId,
        key: Option<KeyAlert>,
        found: &mut Vec<LimitAlert>,
    ) {
        if let Some(closed) = &self.closed {
            closed.owed_in_period(&closed.limits.alerts, customer, key, found);
        }
        self.owed_in_period(alerts, customer, key, found);
    }

    fn owed_in_period(
        &self,
        alerts: &Alerts,
        customer: CustomerId,
        key: Option<KeyAlert>,
        found: &mut Vec<LimitAlert>,
    ) {
        for limit in MonthlyLimit::ALL {
            let Some((used, limit_value)) = self.meter(limit) else {
                continue;
            };
            let alert = |threshold| LimitAlert {
                customer,
                key,
                limit,
                threshold,
                used,
                limit_value,
                period: self.period,
            };
            let recorded = self.alerted[limit as usize];
            for (index, &millionths) in alerts.millionths().iter().enumerate() {
                if recorded & (1 << index) == 0 && reached(used, limit_value, millionths) {
                    found.push(alert(Some(millionths)));
                }
            }
            if self.refused & !self.exhausted_alerted & limit.bit() != 0 {
                found.push(alert(None));
            }
        }
    }

    /// Remembers that `alert` is recorded (in this period).
    fn mark_alerted(&mut self, alert: &LimitAlert) {
        if alert.period != self.period {
            if let Some(closed) = self.closed.as_mut().filter(|c| c.period == alert.period) {
                closed.mark_alerted(alert);
                if !closed.owes_alerts() {
                    self.closed = None;
                }
            }
            return;
        }
        match alert.threshold {
            None => self.exhausted_alerted |= alert.limit.bit(),
            Some(millionths) => {
                if let Some(index) = self
                    .limits
                    .alerts
                    .millionths()
                    .iter()
                    .position(|&m| m == millionths)
                {
                    self.alerted[alert.limit as usize] |= 1 << index;
                }
            }
        }
    }

    fn view(&self, now_ns: i64) -> QuotaView {
        let used = self.used();
        QuotaView {
            limits: self.limits.clone(),
            period: self.period,
            reset: self.period.next_start(),
            rate: self.rate_headers(now_ns),
            requests: Meter {
                used: used.requests,
                limit: self.limits.monthly_requests,
                remaining: self
                    .limits
                    .monthly_requests
                    .map(|limit| limit.saturating_sub(used.requests)),
            },
            tokens: Meter {
                used: used.tokens,
                limit: self.limits.monthly_tokens,
                remaining: self
                    .limits
                    .monthly_tokens
                    .map(|limit| limit.saturating_sub(used.tokens)),
            },
            cost_nanos: Meter {
                used: used.cost_nanos,
                limit: self.limits.monthly_cost_nanos,
                remaining: self
                    .limits
                    .monthly_cost_nanos
                    .map(|limit| limit.saturating_sub(used.cost_nanos).max(0)),
            },
            headers: self.headers(now_ns),
        }
    }
}

/// A key family's own limits and counters (keys with limits of their own;
/// a rotated key's successor joins its family). Locked after its
/// customer's state, never before.
#[derive(Debug)]
struct KeyFamily {
    id: KeyId,
    customer: CustomerId,
    state: Mutex<State>,
    /// The family's newest key (ids are time-ordered): the one its alerts
    /// name.
    newest: Mutex<KeyId>,
}

impl KeyFamily {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Admission control for every customer and every key with limits of its
/// own. `Send + Sync`; the data plane shares one behind an `Arc`.
pub struct Limiter {
    clock: Arc<dyn Clock>,
    customers: DashMap<CustomerId, State, IdHash>,
    /// Key families with limits of their own, by family id.
    families: DashMap<KeyId, Arc<KeyFamily>, IdHash>,
    /// Keys with limits of their own, to their family.
    members: DashMap<KeyId, Arc<KeyFamily>, IdHash>,
    /// `members.len()`, read on every admission so that a gateway without
    /// key limits looks nothing up.
    member_count: AtomicUsize,
    /// The closed days' totals from the last whole read of the period, for
    /// the syncs that read only the open days; locked for the whole of a
    /// sync, so that syncs take turns.
    closed: tokio::sync::Mutex<Option<sync::ClosedDays>>,
    /// Counts what makes kept closed days' totals stale: this instance's
    /// commits of closed days' rows ([`Limiter::committed`]) and keys
    /// gaining limits. Kept totals are good while it has not moved.
    closed_stale: AtomicU64,
    /// Totals reads begun ([`State::totals_pending`]).
    key_reads: AtomicU64,
    /// Woken when a key family needs its totals read.
    totals_wanted: tokio::sync::Notify,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("customers", &self.customers.len())
            .field("key_families", &self.families.len())
            .finish_non_exhaustive()
    }
}

impl Limiter {
    pub fn new(clock: Arc<dyn Clock>) -> Limiter {
        Limiter {
            clock,
            customers: DashMap::with_hasher_and_shard_amount(IdHash, shard_amount()),
            families: DashMap::with_hasher(IdHash),
            members: DashMap::with_hasher(IdHash),
            member_count: AtomicUsize::new(0),
            closed: tokio::sync::Mutex::new(None),
            closed_stale: AtomicU64::new(0),
            key_reads: AtomicU64::new(0),
            totals_wanted: tokio::sync::Notify::new(),
        }
    }

    fn now(&self) -> i64 {
        self.clock.unix_nanos()
    }

    fn period_at(now_ns: i64) -> Period {
        Period::containing(from_unix_nanos(now_ns))
    }

    /// Sets (or replaces, live) a customer's effective limits. Counters
    /// are kept; a changed rate applies from the next admission, with the
    /// requests already in the window carried over (3 of 3/s used, raised
    /// to 6/s: 3 more may pass at once).
    pub fn set_limits(&self, customer: CustomerId, limits: Limits) {
        let now_ns = self.now();
        let mut entry = self
            .customers
            .entry(customer)
            .or_insert_with(|| State::new(Limits::unlimited(), now_ns));
        let state = &mut *entry;
        state.roll(now_ns);
        state.set_limits(limits, now_ns);
    }

    /// Sets (or replaces, or with `None` removes) the limits of a key of
    /// `family`, live. Every key of a family shares one set of counters,
    /// kept across changes of its limits. A family new to this limiter
    /// holds the requests its monthly limits govern (429 `rate_limited`,
    /// `Retry-After: 1`) until a totals read has its month's usage, and
    /// asks for one at once ([`Limiter::totals_wanted`]), unless `unused`:
    /// a key just made, whose usage is nothing.
    pub fn set_key_limits(
        &self,
        key: KeyId,
        family: KeyId,
        customer: CustomerId,
        limits: Option<&KeyLimits>,
        unused: bool,
    ) {
        let Some(limits) = limits.filter(|limits| !limits.is_empty()) else {
            if self.members.remove(&key).is_some() {
                self.member_count.fetch_sub(1, Ordering::Relaxed);
            }
            return;
        };
        let now_ns = self.now();
        if !self.members.contains_key(&key) {
            // Its family's closed days may not have been read (families
            // without limits are not): before the family is counted.
            self.closed_stale.fetch_add(1, Ordering::SeqCst);
        }
        let mut made = false;
        let shared = self
            .families
            .entry(family)
            .or_insert_with(|| {
                made = true;
                let mut state = State::new(Limits::unlimited(), now_ns);
                if !unused {
                    state.totals_pending = Some(self.key_reads.load(Ordering::SeqCst));
                }
                Arc::new(KeyFamily {
                    id: family,
                    customer,
                    state: Mutex::new(state),
                    newest: Mutex::new(key),
                })
            })
            .clone();
        if made && !unused {
            self.totals_wanted.notify_one();
        }
        {
            let mut newest = shared.newest.lock().unwrap_or_else(|e| e.into_inner());
            *newest = (*newest).max(key);
        }
        {
            let mut state = shared.lock();
            state.roll(now_ns);
            state.set_limits(limits.as_limits(), now_ns);
        }
        if self.members.insert(key, shared).is_none() {
            self.member_count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The family of a key with limits of its own.
    fn family_of(&self, key: KeyId) -> Option<Arc<KeyFamily>> {
        if self.member_count.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.members.get(&key).map(|family| Arc::clone(&family))
    }

    /// Forgets a customer and its counters (the customer was deleted).
    pub(crate) fn remove(&self, customer: CustomerId) {
        self.customers.remove(&customer);
    }

    /// Decides a request of `key` (of `customer`) before it is forwarded.
    /// Checks, in order: the rate, the token and cost budgets (used ≥ limit
    /// refuses), then `monthly_requests` (`block`: reserved atomically;
    /// `bill`: always admitted, counted), at the customer's level and, when
    /// the key has limits of its own, at the key's (where overage always
    /// blocks). A request must pass both, and a rejection reserves
    /// nothing at either level, not even a rate slot: both states are
    /// locked (customer, then key) for the check and the reservation.
    ///
    /// A customer this limiter has no limits for yet (created a moment ago,
    /// not yet announced by the limits feed) is admitted as unlimited but
    /// counted, so the usage is there when its limits arrive.
    ///
    /// Does not allocate, except the first time a customer is seen.
    pub fn admit(&self, customer: CustomerId, key: KeyId) -> Decision {
        let now_ns = self.now();
        let family = self.family_of(key);
        let mut entry = match self.customers.get_mut(&customer) {
            Some(entry) => entry,
            None => self
                .customers
                .entry(customer)
                .or_insert_with(|| State::new(Limits::unlimited(), now_ns)),
        };
        let state = &mut *entry;
        state.roll(now_ns);
        let Some(family) = family else {
            let result = state.check(now_ns).map(|tat| state.take(tat));
            if let Err(rejection) = result {
                state.note_refusal(rejection);
            }
            return Decision {
                result: result.map(|()| Admission {
                    customer,
                    family: None,
                    period: state.period,
                    released: AtomicBool::new(false),
                    in_flight: AtomicBool::new(true),
                }),
                headers: state.headers(now_ns),
                remaining: state.remaining(),
            };
        };
        let mut key_state = family.lock();
        key_state.roll(now_ns);
        let result = match (state.check(now_ns), key_state.check(now_ns)) {
            (Ok(customer_tat), Ok(key_tat)) => {
                state.take(customer_tat);
                key_state.take(key_tat);
                Ok(())
            }
            (Err(rejection), Ok(_)) => {
                state.note_refusal(rejection);
                Err(rejection)
            }
            (Ok(_), Err(rejection)) => {
                key_state.note_refusal(rejection);
                Err(rejection)
            }
            (Err(by_customer), Err(by_key)) => {
                state.note_refusal(by_customer);
                key_state.note_refusal(by_key);
                Err(by_customer.graver(by_key))
            }
        };
        let headers = tightest(state.headers(now_ns), key_state.headers(now_ns));
        let remaining = state.remaining().least(key_state.remaining());
        let period = state.period;
        drop(key_state);
        Decision {
            result: result.map(|()| Admission {
                customer,
                family: Some(family),
                period,
                released: AtomicBool::new(false),
                in_flight: AtomicBool::new(true),
            }),
            headers,
            remaining,
        }
    }

    /// The request never reached the upstream (a 413 after admission, a
    /// refused connection): gives its monthly request back. The rate slot
    /// stays taken. Idempotent per admission; a no-op once its period is
    /// over.
    pub fn release(&self, admission: &Admission) {
        let ended = admission.in_flight.swap(false, Ordering::Relaxed);
        let give_back = !admission.released.swap(true, Ordering::Relaxed);
        if !ended && !give_back {
            return;
        }
        self.with_states_of(admission, |state, in_period| {
            if in_period {
                if ended {
                    state.ended();
                }
                if give_back {
                    state.own.requests = state.own.requests.saturating_sub(1);
                }
            }
        });
    }

    /// The response ended: adds its tokens and cost to the period the
    /// admission was made in (ignored once that period is over). Adds each
    /// time it is called; the request stops counting as in flight the
    /// first time.
    pub fn settle(&self, admission: &Admission, tokens: u64, cost_nanos: i64) {
        let ended = admission.in_flight.swap(false, Ordering::Relaxed);
        let cost_nanos = cost_nanos.max(0);
        self.with_states_of(admission, |state, in_period| {
            if in_period {
                if ended {
                    state.ended();
                }
                state.own.tokens = state.own.tokens.saturating_add(tokens);
                state.own.cost_nanos = state.own.cost_nanos.saturating_add(cost_nanos);
            }
            state.note_size(tokens, cost_nanos);
        });
    }

    /// Applies `apply` to the admission's customer and key family states,
    /// telling it whether each is still in the admission's period (a
    /// request of a period that is over counts there no longer).
    fn with_states_of(&self, admission: &Admission, apply: impl Fn(&mut State, bool)) {
        let now_ns = self.now();
        let apply = |state: &mut State| {
            state.roll(now_ns);
            let in_period = state.period == admission.period;
            apply(state, in_period);
        };
        if let Some(mut entry) = self.customers.get_mut(&admission.customer) {
            apply(&mut entry);
        }
        if let Some(family) = &admission.family {
            apply(&mut family.lock());
        }
    }

    /// Rows the gateway's own recorder has committed to the database (call
    /// after the commit, never before), of requests this limiter admitted:
    /// never a previous process's rows replayed from the spool, which are
    /// in the database's totals and not in `own`. Counts admitted rows of
    /// the current period; rejected rows and rows of other periods are
    /// ignored. A row's time is not compared with this limiter's start: a
    /// clock stepped back after the start gives this process's rows
    /// earlier times, and they are its own all the same. Any row of the period on
    /// a day before yesterday makes the next sync read the whole period
    /// ([`Limiter::sync_read`]).
    pub fn committed(&self, events: &[UsageEvent]) {
        let now_ns = self.now();
        let period = Self::period_at(now_ns);
        let mut stale = false;
        for event in events {
            let ts_ns = unix_nanos(event.ts);
            if Period::containing(event.ts) != period {
                continue;
            }
            // Before the row is counted: a sync whose snapshot holds the
            // row sees the count moved.
            if !stale && sync::on_closed_day(ts_ns, now_ns) {
                stale = true;
                self.closed_stale.fetch_add(1, Ordering::SeqCst);
            }
            if event.outcome.is_rejected() {
                continue;
            }
            let row = PeriodTotals {
                requests: 1,
                tokens: event_tokens(event),
                cost_nanos: event.cost_nanos.max(0),
            };
            let add = |state: &mut State| {
                state.roll(now_ns);
                if state.period == period {
                    state.committed = state.committed.plus(row);
                }
            };
            if let Some(mut entry) = self.customers.get_mut(&event.customer_id) {
                add(&mut entry);
            }
            if let Some(family) = self.family_of(event.key_id) {
                add(&mut family.lock());
            }
        }
    }

    /// What this instance has committed so far in the current period, per
    /// customer and key family. Take it just BEFORE reading the database
    /// totals.
    pub(crate) fn committed_snapshot(&self) -> CommittedSnapshot {
        let now_ns = self.now();
        let period = Self::period_at(now_ns);
        let mut committed = HashMap::new();
        for mut entry in self.customers.iter_mut() {
            let customer = *entry.key();
            let state = entry.value_mut();
            state.roll(now_ns);
            if state.period == period && state.committed != PeriodTotals::ZERO {
                committed.insert(customer, state.committed);
            }
        }
        let mut keys = HashMap::new();
        for family in self.all_families() {
            let mut state = family.lock();
            state.roll(now_ns);
            if state.period == period && state.committed != PeriodTotals::ZERO {
                keys.insert(family.id, state.committed);
            }
        }
        CommittedSnapshot {
            period,
            committed,
            keys,
        }
    }

    /// Every key family, copied out so that no map lock is held while a
    /// family is locked.
    fn all_families(&self) -> Vec<Arc<KeyFamily>> {
        self.families
            .iter()
            .map(|family| Arc::clone(&family))
            .collect()
    }

    /// The arithmetic of [`Limiter::sync`].
    ///
    /// `totals` are the database's totals of `period` per customer (a
    /// customer absent has none); `committed` is [`committed_snapshot`]
    /// taken just before the database read. Each customer's used becomes
    /// `(database total − committed snapshot) + own counts`: this
    /// instance's rows are never counted twice nor missed; rows committed
    /// between the snapshot and the read are counted twice until the next
    /// sync (the safe direction). Totals of any period but the current one
    /// are ignored, as is a snapshot of another period.
    ///
    /// Customers in `totals` this limiter has not seen are added, unlimited
    /// until their limits are set.
    ///
    /// [`committed_snapshot`]: Limiter::committed_snapshot
    pub(crate) fn apply_totals(
        &self,
        period: Period,
        totals: &HashMap<CustomerId, PeriodTotals>,
        committed: &CommittedSnapshot,
    ) {
        let now_ns = self.now();
        if period != Self::period_at(now_ns) {
            return;
        }
        let apply = |customer: CustomerId, state: &mut State| {
            let total = totals.get(&customer).copied().unwrap_or_default();
            state.rebase(
                now_ns,
                period,
                total,
                committed.ours(period, &committed.committed, &customer),
            );
        };
        for &customer in totals.keys() {
            match self.customers.get_mut(&customer) {
                Some(mut entry) => apply(customer, &mut entry),
                None => {
                    let mut entry = self
                        .customers
                        .entry(customer)
                        .or_insert_with(|| State::new(Limits::unlimited(), now_ns));
                    apply(customer, &mut entry);
                }
            }
        }
        for mut entry in self.customers.iter_mut() {
            if !totals.contains_key(entry.key()) {
                let customer = *entry.key();
                apply(customer, entry.value_mut());
            }
        }
    }

    /// [`Limiter::apply_totals`] for the key families, from the read
    /// numbered `read` ([`Limiter::begin_key_read`]).
    fn apply_key_totals(
        &self,
        period: Period,
        totals: &HashMap<KeyId, PeriodTotals>,
        committed: &CommittedSnapshot,
        read: u64,
    ) {
        let now_ns = self.now();
        if period != Self::period_at(now_ns) {
            return;
        }
        for family in self.all_families() {
            let total = totals.get(&family.id).copied().unwrap_or_default();
            let ours = committed.ours(period, &committed.keys, &family.id);
            let mut state = family.lock();
            state.rebase(now_ns, period, total, ours);
            // Made before this read began: the read had its rows.
            if state.totals_pending.is_some_and(|made| made < read) {
                state.totals_pending = None;
            }
        }
    }

    /// Numbers a totals read about to begin: families made from now on
    /// wait for a later one.
    fn begin_key_read(&self) -> u64 {
        self.key_reads.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Waits until a key family made since needs its totals read.
    pub async fn totals_wanted(&self) {
        self.totals_wanted.notified().await;
    }

    /// [`Limiter::view`] of a customer this limiter has seen.
    fn known_view(&self, customer: CustomerId) -> Option<QuotaView> {
        let now_ns = self.now();
        let mut entry = self.customers.get_mut(&customer)?;
        let state = &mut *entry;
        state.roll(now_ns);
        Some(state.view(now_ns))
    }

    /// Used / remaining / reset per limit. A customer this limiter has not
    /// seen yet (created a moment ago, not yet through the change feed) is
    /// shown as it is treated: no limits and no usage in the current period.
    pub fn view(&self, customer: CustomerId) -> QuotaView {
        self.known_view(customer).unwrap_or_else(|| {
            let period = Self::period_at(self.now());
            let nothing = Meter {
                used: 0,
                limit: None,
                remaining: None,
            };
            QuotaView {
                limits: Limits::unlimited(),
                period,
                reset: period.next_start(),
                rate: None,
                requests: nothing,
                tokens: nothing,
                cost_nanos: Meter {
                    used: 0,
                    limit: None,
                    remaining: None,
                },
                headers: None,
            }
        })
    }

    /// The key's own limits and their use (its family's), when it has
    /// limits of its own.
    pub fn key_view(&self, key: KeyId) -> Option<QuotaView> {
        let now_ns = self.now();
        let family = self.family_of(key)?;
        let mut state = family.lock();
        state.roll(now_ns);
        Some(state.view(now_ns))
    }

    /// Every alert owed and not yet recorded (by this process): alert
    /// fractions of the customer's tier reached by a customer's or a key
    /// family's monthly use, and monthly limits that refused a request in
    /// the current period. [`Limiter::alerted`] marks one recorded.
    pub fn alerts(&self) -> Vec<LimitAlert> {
        let now_ns = self.now();
        let mut found = Vec::new();
        // A state the month has turned on without a request since still
        // owes what it owes: the alerts carry their own period.
        for entry in self.customers.iter() {
            let state = entry.value();
            state.pending_alerts(&state.limits.alerts, *entry.key(), None, &mut found);
        }
        for family in self.all_families() {
            let alerts = self
                .customers
                .get(&family.customer)
                .map(|customer| customer.limits.alerts.clone())
                .unwrap_or_default();
            let newest = *family.newest.lock().unwrap_or_else(|e| e.into_inner());
            let mut state = family.lock();
            // The fractions first, so that a period the roll closes is
            // judged by them.
            state.alerts_from(&alerts);
            state.roll(now_ns);
            let key = KeyAlert {
                family: family.id,
                newest,
            };
            state.pending_alerts(&alerts, family.customer, Some(key), &mut found);
        }
        found
    }

    /// Remembers that `alert` is recorded, so [`Limiter::alerts`] stops
    /// returning it (until a restart, when the database says it exists).
    pub fn alerted(&self, alert: &LimitAlert) {
        match alert.key.map(|key| key.family) {
            None => {
                if let Some(mut state) = self.customers.get_mut(&alert.customer) {
                    state.mark_alerted(alert);
                }
            }
            Some(family) => {
                if let Some(family) = self.families.get(&family).map(|f| Arc::clone(&f)) {
                    family.lock().mark_alerted(alert);
                }
            }
        }
    }
}

/// Of two request limits' headers, the one with the fewest remaining; on a
/// tie, the first.
fn tightest(first: Option<RateHeaders>, second: Option<RateHeaders>) -> Option<RateHeaders> {
    match (first, second) {
        (Some(a), Some(b)) if b.remaining < a.remaining => Some(b),
        (a, b) => a.or(b),
    }
}

/// Map shards: customers of one shard take turns (for tens of nanoseconds
/// each), and every lookup writes the shard's lock word, so two cores on
/// one shard bounce its cache line. dashmap's default (4 per core: 8 on two
/// cores) made that common, and an admission on two threads over 10,000
/// customers took twice as long as on one; 32 per core, at least 256, makes
/// it rare, for 128 bytes a shard.
fn shard_amount() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    (cores * 32).next_power_of_two().clamp(256, 4096)
}

/// Rounds up to whole seconds, at least one (a `Retry-After: 0` invites a
/// tight retry loop).
fn ceil_secs(nanos: i64) -> Duration {
    let secs = ceil_div(nanos, NANOS_PER_SEC).max(1);
    Duration::from_secs(u64::try_from(secs).unwrap_or(1))
}

fn ceil_div(n: i64, d: i64) -> i64 {
    let quotient = n.div_euclid(d);
    if n.rem_euclid(d) > 0 {
        quotient + 1
    } else {
        quotient
    }
}

/// Hashes a customer id with one folded multiply per 8 bytes instead of
/// SipHash: ids are UUID v7 the gateway generates (74 random bits), not
/// attacker-chosen, so flooding one bucket is not a concern, and the
/// admission path saves the SipHash rounds.
#[derive(Clone, Copy, Debug, Default)]
struct IdHash;

impl BuildHasher for IdHash {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

struct IdHasher(u64);

impl IdHasher {
    fn mix(&mut self, word: u64) {
        const K: u64 = 0x9E37_79B9_7F4A_7C15;
        let product = u128::from(self.0 ^ word) * u128::from(K);
        self.0 = (product as u64) ^ ((product >> 64) as u64);
    }
}

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
    }

    /// Slice length prefixes: the same (16) for every id, so skipped.
    fn write_usize(&mut self, _: usize) {}

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;

    use proptest::prelude::*;
    use time::macros::datetime;
    use uuid::Uuid;

    use super::*;

    /// A key without limits of its own.
    const NO_KEY: KeyId = KeyId(uuid::Uuid::nil());
    use crate::keys::ids::KeyId;
    use crate::limits::{ManualClock, Rate};
    use crate::usage::CostSource;

    /// Key limits, as after the totals read that follows them at start.
    fn known_key_limits(
        limiter: &Limiter,
        key: KeyId,
        family: KeyId,
        customer: CustomerId,
        limits: Option<&KeyLimits>,
    ) {
        limiter.set_key_limits(key, family, customer, limits, false);
        if let Some(family) = limiter.families.get(&family) {
            family.lock().totals_pending = None;
        }
    }

    fn setup(at: OffsetDateTime) -> (Arc<ManualClock>, Limiter) {
        let clock = Arc::new(ManualClock::new(at));
        let limiter = Limiter::new(clock.clone());
        (clock, limiter)
    }

    fn customer(n: u128) -> CustomerId {
        CustomerId(Uuid::from_u128(n))
    }

    fn quota(monthly_requests: u64, overage: Overage) -> Limits {
        Limits {
            monthly_requests: Some(monthly_requests),
            overage,
            ..Limits::unlimited()
        }
    }

    fn rate(text: &str) -> Limits {
        Limits {
            rate: Some(text.parse::<Rate>().unwrap()),
            ..Limits::unlimited()
        }
    }

    fn admitted(decision: Decision) -> Admission {
        decision.result.unwrap()
    }

    fn rejected(decision: Decision) -> Rejection {
        decision.result.unwrap_err()
    }

    fn used(limiter: &Limiter, customer: CustomerId) -> PeriodTotals {
        let view = limiter.known_view(customer).unwrap();
        PeriodTotals {
            requests: view.requests.used,
            tokens: view.tokens.used,
            cost_nanos: view.cost_nanos.used,
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn event(
        customer: CustomerId,
        ts: OffsetDateTime,
        outcome: Outcome,
        tokens: u64,
        cost: i64,
    ) -> UsageEvent {
        UsageEvent {
            id: Uuid::now_v7(),
            client_request_id: None,
            ts,
            customer_id: customer,
            key_id: KeyId::new(),
            instance: "gw-1".into(),
            route: "openai".into(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            status: 200,
            outcome,
            latency_us: 1,
            upstream_latency_us: 1,
            request_bytes: 1,
            response_bytes: 1,
            model: None,
            input_tokens: tokens / 2,
            output_tokens: tokens - tokens / 2,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
            cost_nanos: cost,
            cost_source: CostSource::Header,
        }
    }

    #[test]
    fn gcra_three_per_second_from_idle() {
        let t0 = datetime!(2026-03-10 12:00 UTC);
        let s = t0.unix_timestamp();
        let (clock, limiter) = setup(t0);
        let c = customer(1);
        limiter.set_limits(c, rate("3/s"));
        for (used, remaining) in [(1, 2), (2, 1), (3, 0)] {
            let decision = limiter.admit(c, NO_KEY);
            assert_eq!(
                decision.headers,
                Some(RateHeaders {
                    limit: 3,
                    remaining,
                    used,
                    reset: s + 1
                })
            );
            admitted(decision);
        }
        let decision = limiter.admit(c, NO_KEY);
        assert_eq!(
            decision.headers,
            Some(RateHeaders {
                limit: 3,
                remaining: 0,
                used: 3,
                reset: s + 1
            })
        );
        assert_eq!(
            rejected(decision),
            Rejection::RateLimited {
                retry_after: secs(1)
            }
        );

        clock.advance(secs(1) / 3);
        let decision = limiter.admit(c, NO_KEY);
        // TAT is now t0 + 4 × 333_333_333 ns = t0 + 1.333 s: reset rounds up.
        assert_eq!(
            decision.headers,
            Some(RateHeaders {
                limit: 3,
                remaining: 0,
                used: 3,
                reset: s + 2
            })
        );
        admitted(decision);
        assert!(matches!(
            rejected(limiter.admit(c, NO_KEY)),
            Rejection::RateLimited { retry_after } if retry_after == secs(1)
        ));

        clock.advance(secs(2));
        let view = limiter.known_view(c).unwrap();
        assert_eq!(
            view.rate,
            Some(RateHeaders {
                limit: 3,
                remaining: 3,
                used: 0,
                reset: s + 3
            })
        );
        assert_eq!(
            view.requests.used, 4,
            "rate-limited requests count toward nothing"
        );
        assert_eq!(view.requests.limit, None);
    }

    #[test]
    fn slow_rate_retry_after_is_the_wait_for_one_slot() {
        let (clock, limiter) = setup(datetime!(2026-03-10 12:00 UTC));
        let c = customer(1);
        limiter.set_limits(c, rate("60/h"));
        for _ in 0..60 {
            admitted(limiter.admit(c, NO_KEY));
        }
        assert_eq!(
            limiter.admit(c, NO_KEY).result.unwrap_err().retry_after(),
            secs(60)
        );
        clock.advance(Duration::from_millis(59_500));
        assert_eq!(
            limiter.admit(c, NO_KEY).result.unwrap_err().retry_after(),
            secs(1)
        );
        clock.advance(Duration::from_millis(500));
        admitted(limiter.admit(c, NO_KEY));
    }

    #[test]
    fn concurrent_admits_reserve_exactly_the_remaining_quota() {
        let (_clock, limiter) = setup(datetime!(2026-03-10 12:00 UTC));
        let c = customer(7);
        limiter.set_limits(c, quota(60, Overage::Block));
        for _ in 0..10 {
            admitted(limiter.admit(c, NO_KEY));
        }
        let race = |threads: usize| -> (Vec<Admission>, Vec<Rejection>) {
            let barrier = Barrier::new(threads);
            std::thread::scope(|scope| {
                let handles: Vec<_> = (0..threads)
                    .map(|_| {
                        scope.spawn(|| {
                            barrier.wait();
                            limiter.admit(c, NO_KEY).result
                        })
                    })
                    .collect();
                let (mut ok, mut refused) = (Vec::new(), Vec::new());
                for handle in handles {
                    match handle.join().unwrap() {
                        Ok(admission) => ok.push(admission),
                        Err(rejection) => refused.push(rejection),
                    }
                }
                (ok, refused)
            })
        };
        let (ok, refused) = race(200);
        assert_eq!(ok.len(), 50);
        assert_eq!(refused.len(), 150);
        assert!(refused
            .iter()
            .all(|r| matches!(r, Rejection::QuotaExceeded { .. })));
        assert_eq!(used(&limiter, c).requests, 60);

        for admission in &ok[..10] {
            limiter.release(admission);
            limiter.release(admission); // a second release is a no-op
        }
        assert_eq!(used(&limiter, c).requests, 50);
        let (more, _) = race(200);
        assert_eq!(more.len(), 10);
        assert_eq!(used(&limiter, c).requests, 60);
    }

    #[test]
    fn block_refuses_until_next_month_and_bill_counts_past_the_quota() {
        let at = datetime!(2026-04-30 23:00 UTC);
        let may = datetime!(2026-05-01 0:00 UTC).unix_timestamp();
        let (_clock, limiter) = setup(at);
        let (block, bill) = (customer(1), customer(2));
        limiter.set_limits(block, quota(2, Overage::Block));
        limiter.set_limits(
            bill,
            Limits {
                overage_price_nanos: 1_000_000,
                ..quota(2, Overage::Bill)
            },
        );

        admitted(limiter.admit(block, NO_KEY));
        let decision = limiter.admit(block, NO_KEY);
        assert_eq!(
            decision.headers,
            Some(RateHeaders {
                limit: 2,
                remaining: 0,
                used: 2,
                reset: may
            })
        );
        admitted(decision);
        let decision = limiter.admit(block, NO_KEY);
        assert_eq!(
            decision.headers,
            Some(RateHeaders {
                limit: 2,
                remaining: 0,
                used: 2,
                reset: may
            })
        );
        let rejection = rejected(decision);
        assert_eq!(
            rejection,
            Rejection::QuotaExceeded {
                retry_after: secs(3600)
            }
        );
        assert_eq!(rejection.outcome(), Outcome::QuotaExceeded);
        assert_eq!(rejection.limit(), "monthly_requests");
        assert_eq!(
            rejection.to_string(),
            "monthly request quota exceeded; it resets in 3600 seconds"
        );

        for _ in 0..3 {
            admitted(limiter.admit(bill, NO_KEY));
        }
        let decision = limiter.admit(bill, NO_KEY);
        assert_eq!(
            decision.headers,
            Some(RateHeaders {
                limit: 2,
                remaining: 0,
                used: 4,
                reset: may
            })
        );
        admitted(decision);
        let view = limiter.known_view(bill).unwrap();
        assert_eq!(
            view.requests,
            Meter {
                used: 4,
                limit: Some(2),
                remaining: Some(0)
            }
        );
        assert_eq!(view.reset, datetime!(2026-05-01 0:00 UTC));
    }

    #[test]
    fn requests_in_flight_hold_the_rest_of_a_budget() {
        let (_clock, limiter) = setup(datetime!(2026-06-15 0:00 UTC));
        let c = customer(1);
        let cent = 10_000_000;
        limiter.set_limits(
            c,
            Limits {
                monthly_cost_nanos: Some(cent),
                ..Limits::unlimited()
            },
        );
        let first = admitted(limiter.admit(c, NO_KEY));
        limiter.settle(&first, 0, cent - 100);
        // A thousand at once with 100 nano-USD left: the first is let
        // through (alone, as a lone request always is), and the rest wait
        // for it, each counted at the 9,999,900 its customer's one request
        // cost.
        let decisions: Vec<Decision> = (0..1_000).map(|_| limiter.admit(c, NO_KEY)).collect();
        let (through, held): (Vec<_>, Vec<_>) = decisions
            .into_iter()
            .map(|d| d.result)
            .partition(Result::is_ok);
        assert_eq!(through.len(), 1);
        let held = held[0].as_ref().unwrap_err();
        assert_eq!(
            *held,
            Rejection::BudgetHeld {
                which: Budget::Cost,
                retry_after: secs(1)
            }
        );
        assert_eq!(held.outcome(), Outcome::BudgetExceeded);
        assert_eq!(held.limit(), "monthly_cost");
        assert_eq!(
            held.to_string(),
            "the rest of the monthly cost budget is held by requests in flight; retry after 1 seconds"
        );
        assert_eq!(
            used(&limiter, c).requests,
            2,
            "nothing reserved by the held"
        );
        assert!(limiter.alerts().is_empty(), "held is not exhausted");
        // The overshoot is one request's.
        let through = through.into_iter().next().unwrap().unwrap();
        limiter.settle(&through, 0, 2 * cent);
        assert!(matches!(
            rejected(limiter.admit(c, NO_KEY)),
            Rejection::BudgetExceeded {
                which: Budget::Cost,
                ..
            }
        ));
        assert_eq!(used(&limiter, c).cost_nanos, 3 * cent - 100);
    }

    #[test]
    fn a_customer_of_unknown_size_has_one_request_in_flight_until_one_ends() {
        let (_clock, limiter) = setup(datetime!(2026-06-15 0:00 UTC));
        let (c, k) = (customer(1), key(1));
        limiter.set_limits(
            c,
            Limits {
                monthly_tokens: Some(1_000_000),
                ..Limits::unlimited()
            },
        );
        let first = admitted(limiter.admit(c, NO_KEY));
        assert_eq!(
            rejected(limiter.admit(c, NO_KEY)),
            Rejection::BudgetHeld {
                which: Budget::Tokens,
                retry_after: secs(1)
            }
        );
        // One settled at 100 tokens: now each in flight holds 100.
        limiter.settle(&first, 100, 0);
        let many: Vec<Admission> = (0..50)
            .map(|_| admitted(limiter.admit(c, NO_KEY)))
            .collect();
        assert_eq!(many.len(), 50);
        // A release ends a request too, and a settlement after it does not
        // end it twice.
        limiter.release(&many[0]);
        limiter.settle(&many[0], 0, 0);
        limiter.settle(&many[1], 7, 0);
        limiter.settle(&many[1], 7, 0);
        let state_in_flight = limiter.customers.get(&c).unwrap().in_flight;
        assert_eq!(state_in_flight, 48);

        // A key's own budget holds the same way, at its own sizes.
        known_key_limits(
            &limiter,
            k,
            k,
            c,
            Some(&KeyLimits {
                monthly_tokens: Some(150),
                ..KeyLimits::default()
            }),
        );
        let by_key = admitted(limiter.admit(c, k));
        assert_eq!(
            rejected(limiter.admit(c, k)),
            Rejection::BudgetHeld {
                which: Budget::Tokens,
                retry_after: secs(1)
            },
            "the key's size is not known yet"
        );
        limiter.settle(&by_key, 60, 0);
        let again = admitted(limiter.admit(c, k));
        // 60 used, one in flight at 60: 120 < 150 lets one more through,
        // a third (180) would not.
        let third = admitted(limiter.admit(c, k));
        assert!(matches!(
            rejected(limiter.admit(c, k)),
            Rejection::BudgetHeld { .. }
        ));
        limiter.settle(&again, 10, 0);
        limiter.settle(&third, 10, 0);
        admitted(limiter.admit(c, k));
    }

    #[test]
    fn budgets_refuse_once_used_reaches_the_limit_and_reserve_nothing() {
        let at = datetime!(2026-06-15 0:00 UTC);
        let to_july = secs(16 * 86_400);
        let (_clock, limiter) = setup(at);
        let (tokens, cost) = (customer(1), customer(2));
        limiter.set_limits(
            tokens,
            Limits {
                monthly_tokens: Some(100),
                ..rate("3/s")
            },
        );
        limiter.set_limits(
            cost,
            Limits {
                monthly_cost_nanos: Some(1_000),
                ..quota(10, Overage::Block)
            },
        );

        let first = admitted(limiter.admit(tokens, NO_KEY));
        limiter.settle(&first, 99, 5);
        // 99 < 100: still admitted; the settlement can then overshoot.
        let second = admitted(limiter.admit(tokens, NO_KEY));
        limiter.settle(&second, 60, 5);
        assert_eq!(
            used(&limiter, tokens),
            PeriodTotals {
                requests: 2,
                tokens: 159,
                cost_nanos: 10
            }
        );
        let decision = limiter.admit(tokens, NO_KEY);
        // The rejection took no rate slot: still 1 of 3 free, as before.
        assert_eq!(decision.headers.map(|h| h.remaining), Some(1));
        let rejection = rejected(decision);
        assert_eq!(
            rejection,
            Rejection::BudgetExceeded {
                which: Budget::Tokens,
                retry_after: to_july
            }
        );
        assert_eq!(rejection.limit(), "monthly_tokens");
        assert_eq!(
            rejection.to_string(),
            "monthly token budget exceeded; it resets in 1382400 seconds"
        );
        assert_eq!(used(&limiter, tokens).requests, 2, "no request reserved");

        let a = admitted(limiter.admit(cost, NO_KEY));
        limiter.settle(&a, 0, 999);
        let b = admitted(limiter.admit(cost, NO_KEY));
        limiter.settle(&b, 0, 1);
        let decision = limiter.admit(cost, NO_KEY);
        assert_eq!(
            decision.headers,
            Some(RateHeaders {
                limit: 10,
                remaining: 8,
                used: 2,
                reset: datetime!(2026-07-01 0:00 UTC).unix_timestamp()
            })
        );
        assert_eq!(
            rejected(decision),
            Rejection::BudgetExceeded {
                which: Budget::Cost,
                retry_after: to_july
            }
        );
        let view = limiter.known_view(cost).unwrap();
        assert_eq!(view.requests.used, 2);
        assert_eq!(
            view.cost_nanos,
            Meter {
                used: 1_000,
                limit: Some(1_000),
                remaining: Some(0)
            }
        );
        // A negative cost cannot give budget back.
        limiter.settle(&b, 0, -500);
        assert_eq!(used(&limiter, cost).cost_nanos, 1_000);
    }

    #[test]
    fn a_budget_rejection_leaves_the_rate_window_untouched() {
        let (_clock, limiter) = setup(datetime!(2026-06-15 0:00 UTC));
        let c = customer(1);
        limiter.set_limits(
            c,
            Limits {
                monthly_tokens: Some(10),
                ..rate("2/s")
            },
        );
        let a = admitted(limiter.admit(c, NO_KEY));
        limiter.settle(&a, 10, 0);
        for _ in 0..5 {
            let decision = limiter.admit(c, NO_KEY);
            assert_eq!(decision.headers.map(|h| h.remaining), Some(1));
            assert!(matches!(
                rejected(decision),
                Rejection::BudgetExceeded {
                    which: Budget::Tokens,
                    ..
                }
            ));
        }
        limiter.set_limits(
            c,
            Limits {
                monthly_tokens: Some(20),
                ..rate("2/s")
            },
        );
        let decision = limiter.admit(c, NO_KEY);
        assert_eq!(decision.headers.map(|h| h.remaining), Some(0));
        admitted(decision);
    }

    #[test]
    fn new_month_resets_counts_at_midnight_utc() {
        let (clock, limiter) = setup(datetime!(2026-01-31 23:59:59.9 UTC));
        let c = customer(1);
        limiter.set_limits(
            c,
            Limits {
                monthly_tokens: Some(1_000),
                ..quota(1, Overage::Block)
            },
        );
        let january = admitted(limiter.admit(c, NO_KEY));
        assert_eq!(january.period().to_string(), "2026-01");
        assert_eq!(
            rejected(limiter.admit(c, NO_KEY)),
            Rejection::QuotaExceeded {
                retry_after: secs(1)
            },
            "0.1 s to February rounds up to 1 s"
        );
        clock.advance(Duration::from_millis(100));
        assert_eq!(clock.now(), datetime!(2026-02-01 0:00 UTC));
        let february = admitted(limiter.admit(c, NO_KEY));
        assert_eq!(february.period().to_string(), "2026-02");

        // January's late settlement and release touch nothing in February.
        limiter.settle(&january, 5_000, 7);
        limiter.release(&january);
        let view = limiter.known_view(c).unwrap();
        assert_eq!(view.period.to_string(), "2026-02");
        assert_eq!(view.requests.used, 1);
        assert_eq!(view.tokens.used, 0);
        assert_eq!(view.cost_nanos.used, 0);
        assert_eq!(view.reset, datetime!(2026-03-01 0:00 UTC));
    }

    #[test]
    fn new_year_rolls_december_into_january() {
        let (clock, limiter) = setup(datetime!(2026-12-31 23:59:59 UTC));
        let c = customer(1);
        limiter.set_limits(c, quota(1, Overage::Block));
        admitted(limiter.admit(c, NO_KEY));
        let decision = limiter.admit(c, NO_KEY);
        assert_eq!(
            decision.headers.map(|h| h.reset),
            Some(datetime!(2027-01-01 0:00 UTC).unix_timestamp())
        );
        assert_eq!(rejected(decision).retry_after(), secs(1));
        clock.advance(secs(1));
        let admission = admitted(limiter.admit(c, NO_KEY));
        assert_eq!(admission.period().to_string(), "2027-01");
        assert_eq!(used(&limiter, c).requests, 1);
    }

    #[test]
    fn leap_day_is_still_february_and_march_resets() {
        let (clock, limiter) = setup(datetime!(2028-02-28 12:00 UTC));
        let c = customer(1);
        limiter.set_limits(c, quota(1, Overage::Block));
        admitted(limiter.admit(c, NO_KEY));
        // 12 h of the 28th + all of the 29th.
        assert_eq!(
            rejected(limiter.admit(c, NO_KEY)).retry_after(),
            secs(36 * 3600)
        );
        clock.set(datetime!(2028-02-29 0:00 UTC));
        assert_eq!(
            rejected(limiter.admit(c, NO_KEY)).retry_after(),
            secs(86_400)
        );
        clock.set(datetime!(2028-02-29 23:59:59.5 UTC));
        assert_eq!(rejected(limiter.admit(c, NO_KEY)).retry_after(), secs(1));
        assert_eq!(used(&limiter, c).requests, 1);
        clock.set(datetime!(2028-03-01 0:00 UTC));
        assert_eq!(
            admitted(limiter.admit(c, NO_KEY)).period().to_string(),
            "2028-03"
        );
    }

    #[test]
    fn a_clock_stepping_back_a_month_keeps_the_later_counts() {
        let (clock, limiter) = setup(datetime!(2026-03-01 0:00:01 UTC));
        let c = customer(1);
        limiter.set_limits(c, quota(1, Overage::Block));
        admitted(limiter.admit(c, NO_KEY));
        clock.set(datetime!(2026-02-28 23:59:59 UTC));
        assert!(matches!(
            rejected(limiter.admit(c, NO_KEY)),
            Rejection::QuotaExceeded { .. }
        ));
        assert_eq!(limiter.known_view(c).unwrap().period.to_string(), "2026-03");
    }

    #[test]
    fn live_limit_changes_apply_on_the_next_admit() {
        let (_clock, limiter) = setup(datetime!(2026-03-10 12:00 UTC));
        let c = customer(1);
        limiter.set_limits(c, quota(2, Overage::Block));
        admitted(limiter.admit(c, NO_KEY));
        admitted(limiter.admit(c, NO_KEY));
        assert!(limiter.admit(c, NO_KEY).result.is_err());
        limiter.set_limits(c, quota(3, Overage::Block));
        admitted(limiter.admit(c, NO_KEY));
        assert!(limiter.admit(c, NO_KEY).result.is_err());
        limiter.set_limits(c, quota(1, Overage::Block));
        let decision = limiter.admit(c, NO_KEY);
        assert_eq!(
            decision.headers.map(|h| (h.limit, h.used, h.remaining)),
            Some((1, 3, 0))
        );
        assert!(decision.result.is_err());
        limiter.set_limits(c, Limits::unlimited());
        admitted(limiter.admit(c, NO_KEY));
        assert_eq!(
            used(&limiter, c).requests,
            4,
            "counters survive limit changes"
        );

        let r = customer(2);
        limiter.set_limits(r, rate("3/s"));
        for _ in 0..3 {
            admitted(limiter.admit(r, NO_KEY));
        }
        assert!(limiter.admit(r, NO_KEY).result.is_err());
        // Raised: the 3 already in the window stay counted, 3 more fit.
        limiter.set_limits(r, rate("6/s"));
        for remaining in [2, 1, 0] {
            let decision = limiter.admit(r, NO_KEY);
            assert_eq!(
                decision.headers.map(|h| (h.limit, h.remaining)),
                Some((6, remaining))
            );
            admitted(decision);
        }
        assert!(limiter.admit(r, NO_KEY).result.is_err());
        // Lowered: 6 in the window against 1/s.
        limiter.set_limits(r, rate("1/s"));
        let rejection = rejected(limiter.admit(r, NO_KEY));
        assert_eq!(rejection.retry_after(), secs(6));
        limiter.set_limits(r, Limits::unlimited());
        admitted(limiter.admit(r, NO_KEY));
        // A rate set again starts from an idle window.
        limiter.set_limits(r, rate("1/min"));
        admitted(limiter.admit(r, NO_KEY));
        assert_eq!(rejected(limiter.admit(r, NO_KEY)).retry_after(), secs(60));
    }

    #[test]
    fn tightest_request_limit_wins_and_ties_go_to_the_rate() {
        let at = datetime!(2026-03-10 12:00 UTC);
        let (_clock, limiter) = setup(at);
        let c = customer(1);
        limiter.set_limits(
            c,
            Limits {
                monthly_requests: Some(4),
                ..rate("3/s")
            },
        );
        let headers = |d: Decision| d.headers.unwrap();
        // quota 3 left vs rate 2 left: the rate.
        assert_eq!(headers(limiter.admit(c, NO_KEY)).limit, 3);
        // 2 vs 1: the rate.
        assert_eq!(headers(limiter.admit(c, NO_KEY)).limit, 3);
        // quota 1 left vs rate 0: the rate.
        assert_eq!(headers(limiter.admit(c, NO_KEY)).limit, 3);
        limiter.set_limits(
            c,
            Limits {
                monthly_requests: Some(4),
                ..rate("10/s")
            },
        );
        // quota 1 vs rate 7: the quota, with its reset.
        let view = limiter.known_view(c).unwrap();
        assert_eq!(
            view.headers,
            Some(RateHeaders {
                limit: 4,
                remaining: 1,
                used: 3,
                reset: datetime!(2026-04-01 0:00 UTC).unix_timestamp()
            })
        );
        assert_eq!(view.rate.map(|r| r.remaining), Some(7));
        // No request limit at all: no headers.
        let free = customer(2);
        limiter.set_limits(
            free,
            Limits {
                monthly_tokens: Some(5),
                ..Limits::unlimited()
            },
        );
        assert_eq!(limiter.admit(free, NO_KEY).headers, None);
    }

    #[test]
    fn unknown_customers_are_admitted_unlimited_but_counted() {
        let (_clock, limiter) = setup(datetime!(2026-03-10 12:00 UTC));
        let c = customer(9);
        assert_eq!(limiter.known_view(c), None);
        let unseen = limiter.view(c);
        assert_eq!((unseen.requests.used, unseen.requests.limit), (0, None));
        assert_eq!(unseen.limits, Limits::unlimited());
        let decision = limiter.admit(c, NO_KEY);
        assert_eq!(decision.headers, None);
        let admission = admitted(decision);
        limiter.settle(&admission, 10, 20);
        admitted(limiter.admit(c, NO_KEY));
        // Limits arrive later: the usage is already there.
        limiter.set_limits(c, quota(2, Overage::Block));
        let view = limiter.known_view(c).unwrap();
        assert_eq!(view.requests.remaining, Some(0));
        assert_eq!(view.tokens.used, 10);
        assert!(limiter.admit(c, NO_KEY).result.is_err());
        limiter.remove(c);
        assert_eq!(limiter.known_view(c), None);
        let unseen = limiter.view(c);
        assert_eq!((unseen.requests.used, unseen.requests.limit), (0, None));
        assert_eq!(unseen.limits, Limits::unlimited());
        limiter.release(&admission); // the customer is gone: nothing to do
        assert_eq!(limiter.known_view(c), None);
        let unseen = limiter.view(c);
        assert_eq!((unseen.requests.used, unseen.requests.limit), (0, None));
        assert_eq!(unseen.limits, Limits::unlimited());
    }

    #[test]
    fn a_clock_stepped_back_after_the_start_counts_each_row_once() {
        let at = datetime!(2026-03-10 12:00 UTC);
        let (clock, limiter) = setup(at);
        let c = customer(1);
        limiter.set_limits(c, quota(100, Overage::Block));
        clock.set(at - Duration::from_secs(300));
        let rows: Vec<_> = (0..5)
            .map(|_| {
                let admission = admitted(limiter.admit(c, NO_KEY));
                limiter.settle(&admission, 10, 100);
                event(c, clock.now(), Outcome::Ok, 10, 100)
            })
            .collect();
        limiter.committed(&rows);
        let snapshot = limiter.committed_snapshot();
        let totals = HashMap::from([(
            c,
            PeriodTotals {
                requests: 5,
                tokens: 50,
                cost_nanos: 500,
            },
        )]);
        limiter.apply_totals(Period::containing(at), &totals, &snapshot);
        assert_eq!(
            used(&limiter, c),
            PeriodTotals {
                requests: 5,
                tokens: 50,
                cost_nanos: 500
            }
        );
    }

    #[test]
    fn sync_counts_every_row_once() {
        let at = datetime!(2026-03-10 12:00 UTC);
        let (clock, limiter) = setup(at);
        let period = Period::containing(at);
        let c = customer(1);
        limiter.set_limits(c, quota(100, Overage::Block));
        clock.advance(secs(1));
        let now = clock.now();

        // Five own admissions, each settled with 10 tokens and 100 nanos.
        let admissions: Vec<_> = (0..5).map(|_| admitted(limiter.admit(c, NO_KEY))).collect();
        for a in &admissions {
            limiter.settle(a, 10, 100);
        }
        let own_rows: Vec<_> = (0..5)
            .map(|_| event(c, now, Outcome::Ok, 10, 100))
            .collect();

        // Three of them are committed, along with rows that must not count:
        // a rejected one and one from last month.
        limiter.committed(&own_rows[..3]);
        limiter.committed(&[
            event(c, now, Outcome::RateLimited, 0, 0),
            event(c, datetime!(2026-02-28 12:00 UTC), Outcome::Ok, 10, 100),
        ]);
        let snapshot = limiter.committed_snapshot();
        assert_eq!(snapshot.period(), period);
        assert_eq!(
            snapshot.get(c),
            PeriodTotals {
                requests: 3,
                tokens: 30,
                cost_nanos: 300
            }
        );

        // The database: our 3 rows + another instance's 7 (70 tokens, 700).
        let mut totals = HashMap::from([(
            c,
            PeriodTotals {
                requests: 10,
                tokens: 100,
                cost_nanos: 1_000,
            },
        )]);
        limiter.apply_totals(period, &totals, &snapshot);
        assert_eq!(
            used(&limiter, c),
            PeriodTotals {
                requests: 12,
                tokens: 120,
                cost_nanos: 1_200
            },
            "(10 − 3) + 5 own"
        );

        // Our other two rows are committed after the snapshot but before the
        // database read: counted twice until the next sync.
        let early = limiter.committed_snapshot();
        limiter.committed(&own_rows[3..]);
        totals.insert(
            c,
            PeriodTotals {
                requests: 12,
                tokens: 120,
                cost_nanos: 1_200,
            },
        );
        limiter.apply_totals(period, &totals, &early);
        assert_eq!(
            used(&limiter, c).requests,
            14,
            "over-counted by the 2, safely"
        );
        let snapshot = limiter.committed_snapshot();
        // The other instance added one more (12 → 13 rows in the database).
        totals.insert(
            c,
            PeriodTotals {
                requests: 13,
                tokens: 130,
                cost_nanos: 1_300,
            },
        );
        limiter.apply_totals(period, &totals, &snapshot);
        assert_eq!(
            used(&limiter, c),
            PeriodTotals {
                requests: 13,
                tokens: 130,
                cost_nanos: 1_300
            },
            "exact again: (13 − 5) + 5"
        );
        assert_eq!(limiter.known_view(c).unwrap().requests.remaining, Some(87));

        // A customer absent from the totals has no database usage.
        let other = customer(2);
        admitted(limiter.admit(other, NO_KEY));
        limiter.apply_totals(period, &HashMap::new(), &limiter.committed_snapshot());
        assert_eq!(used(&limiter, other).requests, 1);
        assert_eq!(used(&limiter, c).requests, 5, "only own counts remain");

        // Totals of an older period, or with a snapshot of another period,
        // change nothing / count everything as others'.
        limiter.apply_totals(period.previous(), &totals, &snapshot);
        assert_eq!(used(&limiter, c).requests, 5);
    }

    #[test]
    fn restart_loads_database_totals() {
        let at = datetime!(2026-03-10 12:00 UTC);
        let (clock, limiter) = setup(at);
        let period = Period::containing(at);
        let (c, d) = (customer(1), customer(2));
        limiter.set_limits(c, quota(10, Overage::Block));
        let totals = HashMap::from([
            (
                c,
                PeriodTotals {
                    requests: 9,
                    tokens: 90,
                    cost_nanos: 900,
                },
            ),
            (
                d,
                PeriodTotals {
                    requests: 4,
                    tokens: 0,
                    cost_nanos: 0,
                },
            ),
        ]);
        limiter.apply_totals(period, &totals, &limiter.committed_snapshot());
        assert_eq!(
            used(&limiter, c),
            PeriodTotals {
                requests: 9,
                tokens: 90,
                cost_nanos: 900
            }
        );
        // `d` had no limits yet: added, and its limits later find the count.
        limiter.set_limits(d, quota(4, Overage::Block));
        assert!(matches!(
            rejected(limiter.admit(d, NO_KEY)),
            Rejection::QuotaExceeded { .. }
        ));
        admitted(limiter.admit(c, NO_KEY));
        assert!(limiter.admit(c, NO_KEY).result.is_err());

        // This process's row, committed: in the next totals, once.
        limiter.committed(&[event(c, clock.now(), Outcome::Ok, 10, 100)]);
        clock.advance(secs(1));
        let mut totals = totals;
        totals.get_mut(&c).unwrap().requests = 10;
        limiter.apply_totals(period, &totals, &limiter.committed_snapshot());
        assert_eq!(used(&limiter, c).requests, 10);
    }

    #[test]
    fn committed_then_new_month_starts_from_zero() {
        let (clock, limiter) = setup(datetime!(2026-03-31 23:00 UTC));
        let c = customer(1);
        admitted(limiter.admit(c, NO_KEY));
        limiter.committed(&[event(c, clock.now(), Outcome::Ok, 1, 1)]);
        assert_eq!(limiter.committed_snapshot().get(c).requests, 1);
        let march = limiter.committed_snapshot();
        clock.set(datetime!(2026-04-01 0:00:01 UTC));
        let april = limiter.committed_snapshot();
        assert_eq!(april.get(c), PeriodTotals::ZERO);
        // A March snapshot against April totals: all of April is others'.
        let totals = HashMap::from([(
            c,
            PeriodTotals {
                requests: 3,
                tokens: 0,
                cost_nanos: 0,
            },
        )]);
        limiter.apply_totals(april.period(), &totals, &march);
        assert_eq!(used(&limiter, c).requests, 3);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Admit,
        Release(usize),
        Settle(usize, u64),
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Admit),
            2 => any::<usize>().prop_map(Op::Release),
            2 => (any::<usize>(), 0..40u64).prop_map(|(i, t)| Op::Settle(i, t)),
            1 => (0..4 * 3600u64).prop_map(Op::Advance),
        ]
    }

    fn key(n: u128) -> KeyId {
        KeyId(Uuid::from_u128(n))
    }

    fn key_quota(monthly_requests: u64) -> KeyLimits {
        KeyLimits {
            monthly_requests: Some(monthly_requests),
            ..KeyLimits::default()
        }
    }

    fn key_used(limiter: &Limiter, key: KeyId) -> u64 {
        limiter.key_view(key).unwrap().requests.used
    }

    /// 200 threads admit `key` of `c` at once; the number admitted.
    fn race_key(limiter: &Limiter, c: CustomerId, key: KeyId) -> usize {
        let barrier = Barrier::new(200);
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..200)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        limiter.admit(c, key).result.is_ok()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().unwrap())
                .filter(|&ok| ok)
                .count()
        })
    }

    #[test]
    fn key_limits_nest_inside_the_customers_and_a_refusal_takes_nothing() {
        let (clock, limiter) = setup(datetime!(2026-03-10 12:00 UTC));
        let c = customer(1);
        let (limited, other) = (key(10), key(11));
        limiter.set_limits(c, quota(100, Overage::Bill));
        known_key_limits(&limiter, limited, limited, c, Some(&key_quota(3)));
        for _ in 0..3 {
            admitted(limiter.admit(c, limited));
        }
        assert!(matches!(
            rejected(limiter.admit(c, limited)),
            Rejection::QuotaExceeded { .. }
        ));
        assert_eq!(used(&limiter, c).requests, 3, "the refusal took nothing");
        assert_eq!(key_used(&limiter, limited), 3);
        admitted(limiter.admit(c, other));
        assert_eq!(
            used(&limiter, c).requests,
            4,
            "other keys share the customer's"
        );
        assert!(limiter.key_view(other).is_none());

        // A key rate refuses without taking the customer's quota or rate.
        let fast = key(12);
        limiter.set_limits(
            c,
            Limits {
                rate: Some("100/s".parse().unwrap()),
                ..quota(100, Overage::Block)
            },
        );
        known_key_limits(
            &limiter,
            fast,
            fast,
            c,
            Some(&KeyLimits {
                rate: Some("2/s".parse().unwrap()),
                ..KeyLimits::default()
            }),
        );
        admitted(limiter.admit(c, fast));
        admitted(limiter.admit(c, fast));
        let refusal = rejected(limiter.admit(c, fast));
        assert_eq!(
            refusal,
            Rejection::RateLimited {
                retry_after: secs(1)
            }
        );
        assert_eq!(used(&limiter, c).requests, 6);
        assert_eq!(
            limiter.view(c).rate.unwrap().remaining,
            98,
            "two of the customer's slots, not three"
        );
        clock.advance(secs(1));
        admitted(limiter.admit(c, fast));

        // Clearing the limits frees the key; setting them again keeps the count.
        known_key_limits(&limiter, limited, limited, c, None);
        admitted(limiter.admit(c, limited));
        known_key_limits(&limiter, limited, limited, c, Some(&key_quota(3)));
        assert!(limiter.admit(c, limited).result.is_err());
    }

    #[test]
    fn two_hundred_racing_requests_stop_at_the_tighter_level_either_way() {
        let (_clock, limiter) = setup(datetime!(2026-03-10 12:00 UTC));
        // The key has 50 left, its customer plenty.
        let (c, k) = (customer(1), key(1));
        limiter.set_limits(c, quota(100_000, Overage::Block));
        known_key_limits(&limiter, k, k, c, Some(&key_quota(60)));
        for _ in 0..10 {
            admitted(limiter.admit(c, k));
        }
        assert_eq!(race_key(&limiter, c, k), 50);
        assert_eq!(
            (used(&limiter, c).requests, key_used(&limiter, k)),
            (60, 60)
        );
        // The customer has 50 left, its key plenty.
        let (c, k) = (customer(2), key(2));
        limiter.set_limits(c, quota(60, Overage::Block));
        known_key_limits(&limiter, k, k, c, Some(&key_quota(100_000)));
        for _ in 0..10 {
            admitted(limiter.admit(c, k));
        }
        assert_eq!(race_key(&limiter, c, k), 50);
        assert_eq!(
            (used(&limiter, c).requests, key_used(&limiter, k)),
            (60, 60)
        );
    }

    #[test]
    fn a_rotated_key_shares_its_familys_limits_and_counts() {
        let (_clock, limiter) = setup(datetime!(2026-03-10 12:00 UTC));
        let (c, old, new) = (customer(1), key(1), key(2));
        limiter.set_limits(c, Limits::unlimited());
        known_key_limits(&limiter, old, old, c, Some(&key_quota(5)));
        for _ in 0..3 {
            admitted(limiter.admit(c, old));
        }
        known_key_limits(&limiter, new, old, c, Some(&key_quota(5)));
        admitted(limiter.admit(c, new));
        admitted(limiter.admit(c, old));
        assert!(limiter.admit(c, new).result.is_err());
        assert!(limiter.admit(c, old).result.is_err());
        assert_eq!(key_used(&limiter, new), 5);
        let tokens = KeyLimits {
            monthly_tokens: Some(1_000),
            ..key_quota(5)
        };
        known_key_limits(&limiter, new, old, c, Some(&tokens));
        assert_eq!(
            limiter.key_view(old).unwrap().limits.monthly_tokens,
            Some(1_000),
            "limits are the family's"
        );
    }

    #[test]
    fn headers_and_budgets_left_are_the_tightest_of_key_and_customer() {
        let (_clock, limiter) = setup(datetime!(2026-03-10 12:00 UTC));
        let (c, k) = (customer(1), key(1));
        limiter.set_limits(
            c,
            Limits {
                monthly_tokens: Some(1_000),
                monthly_cost_nanos: Some(50),
                ..quota(100, Overage::Block)
            },
        );
        known_key_limits(
            &limiter,
            k,
            k,
            c,
            Some(&KeyLimits {
                monthly_tokens: Some(5_000),
                monthly_cost_nanos: Some(20),
                ..key_quota(5)
            }),
        );
        let decision = limiter.admit(c, k);
        let headers = decision.headers.unwrap();
        assert_eq!(
            (headers.limit, headers.remaining, headers.used),
            (5, 4, 1),
            "the key's quota"
        );
        assert_eq!(
            decision.remaining,
            Remaining {
                tokens: Some(1_000),
                cost_nanos: Some(20)
            }
        );
        let admission = admitted(decision);
        limiter.settle(&admission, 600, 15);
        let decision = limiter.admit(c, k);
        assert_eq!(
            decision.remaining,
            Remaining {
                tokens: Some(400),
                cost_nanos: Some(5)
            }
        );
        assert_eq!(used(&limiter, c).tokens, 600, "settled at both levels");
        assert_eq!(limiter.key_view(k).unwrap().cost_nanos.used, 15);
    }

    #[test]
    fn sync_takes_key_family_totals_without_counting_this_instances_rows_twice() {
        let at = datetime!(2026-03-10 12:00 UTC);
        let (_clock, limiter) = setup(at);
        let (c, k) = (customer(1), key(1));
        known_key_limits(&limiter, k, k, c, Some(&key_quota(100)));
        let ours: Vec<UsageEvent> = (0..2)
            .map(|_| {
                admitted(limiter.admit(c, k));
                UsageEvent {
                    key_id: k,
                    ..event(c, at, Outcome::Ok, 0, 0)
                }
            })
            .collect();
        limiter.committed(&ours);
        let snapshot = limiter.committed_snapshot();
        assert_eq!(snapshot.keys.get(&k).map(|t| t.requests), Some(2));
        // The database has ours (2) and another instance's (7).
        let period = Period::containing(at);
        let totals = HashMap::from([(
            k,
            PeriodTotals {
                requests: 9,
                tokens: 0,
                cost_nanos: 0,
            },
        )]);
        limiter.apply_key_totals(period, &totals, &snapshot, limiter.begin_key_read());
        assert_eq!(key_used(&limiter, k), 9);
    }

    #[test]
    fn alerts_are_owed_once_per_threshold_and_refusal_until_marked() {
        let (_clock, limiter) = setup(datetime!(2026-03-10 12:00 UTC));
        let (c, k) = (customer(1), key(1));
        let alerts = Alerts::from_millionths(vec![500_000, 1_000_000]).unwrap();
        limiter.set_limits(
            c,
            Limits {
                alerts,
                ..quota(4, Overage::Block)
            },
        );
        assert!(limiter.alerts().is_empty());
        admitted(limiter.admit(c, NO_KEY));
        admitted(limiter.admit(c, NO_KEY));
        let owed = limiter.alerts();
        assert_eq!(owed.len(), 1);
        assert_eq!(
            owed[0],
            LimitAlert {
                customer: c,
                key: None,
                limit: MonthlyLimit::Requests,
                threshold: Some(500_000),
                used: 2,
                limit_value: 4,
                period: Period::containing(datetime!(2026-03-10 12:00 UTC)),
            }
        );
        assert_eq!(limiter.alerts(), owed, "owed until marked");
        limiter.alerted(&owed[0]);
        assert!(limiter.alerts().is_empty());
        admitted(limiter.admit(c, NO_KEY));
        admitted(limiter.admit(c, NO_KEY));
        assert!(limiter.admit(c, NO_KEY).result.is_err());
        let owed = limiter.alerts();
        let kinds: Vec<Option<u32>> = owed.iter().map(|a| a.threshold).collect();
        assert_eq!(
            kinds,
            [Some(1_000_000), None],
            "100 % reached, then a refusal"
        );
        for alert in &owed {
            limiter.alerted(alert);
        }
        assert!(limiter.alerts().is_empty());
        assert!(limiter.admit(c, NO_KEY).result.is_err());
        assert!(limiter.alerts().is_empty(), "one exhaustion per period");

        // A key's own limit uses its customer's fractions and names the
        // family's newest key.
        let rotated = key(2);
        known_key_limits(&limiter, k, k, c, Some(&key_quota(2)));
        known_key_limits(&limiter, rotated, k, c, Some(&key_quota(2)));
        limiter.set_limits(
            c,
            Limits {
                alerts: Alerts::from_millionths(vec![500_000]).unwrap(),
                ..Limits::unlimited()
            },
        );
        admitted(limiter.admit(c, k));
        let owed = limiter.alerts();
        assert_eq!(owed.len(), 1);
        assert_eq!(
            owed[0].key,
            Some(KeyAlert {
                family: k,
                newest: rotated
            })
        );
        assert_eq!((owed[0].used, owed[0].limit_value), (1, 2));
    }

    #[test]
    fn a_key_given_its_first_limit_waits_for_its_months_usage() {
        let at = datetime!(2026-03-10 12:00 UTC);
        let (_clock, limiter) = setup(at);
        let (c, k) = (customer(1), key(1));
        // 50 requests this month before the key had a limit of its own.
        limiter.set_key_limits(k, k, c, Some(&key_quota(10)), false);
        let refused = rejected(limiter.admit(c, k));
        assert_eq!(
            refused,
            Rejection::RateLimited {
                retry_after: secs(1)
            }
        );
        // A read that began before the family was made does not count.
        let early = limiter.begin_key_read() - 1;
        let period = Period::containing(at);
        let totals = HashMap::from([(
            k,
            PeriodTotals {
                requests: 50,
                tokens: 0,
                cost_nanos: 0,
            },
        )]);
        let snapshot = limiter.committed_snapshot();
        limiter.apply_key_totals(period, &totals, &snapshot, early);
        assert!(limiter.admit(c, k).result.is_err(), "still waiting");
        limiter.apply_key_totals(period, &totals, &snapshot, limiter.begin_key_read());
        assert!(matches!(
            rejected(limiter.admit(c, k)),
            Rejection::QuotaExceeded { .. }
        ));
        // A key with a rate of its own only is not held.
        let (c2, k2) = (customer(2), key(2));
        limiter.set_key_limits(
            k2,
            k2,
            c2,
            Some(&KeyLimits {
                rate: Some("5/s".parse().unwrap()),
                ..KeyLimits::default()
            }),
            false,
        );
        // A key just made has been used nowhere: not held either.
        let (c3, k3) = (customer(3), key(3));
        limiter.set_key_limits(k3, k3, c3, Some(&key_quota(10)), true);
        admitted(limiter.admit(c2, k2));
        admitted(limiter.admit(c3, k3));
    }

    #[test]
    fn a_changed_list_of_fractions_keeps_what_is_recorded_by_fraction() {
        let (_clock, limiter) = setup(datetime!(2026-03-10 12:00 UTC));
        let c = customer(1);
        let with = |fractions: Vec<u32>| Limits {
            alerts: Alerts::from_millionths(fractions).unwrap(),
            ..quota(10, Overage::Block)
        };
        limiter.set_limits(c, with(vec![500_000, 800_000, 1_000_000]));
        for _ in 0..8 {
            admitted(limiter.admit(c, NO_KEY));
        }
        let owed = limiter.alerts();
        assert_eq!(
            owed.iter().map(|a| a.threshold).collect::<Vec<_>>(),
            [Some(500_000), Some(800_000)]
        );
        for alert in &owed {
            limiter.alerted(alert);
        }
        // 0.8 is now first and 1.0 second: 1.0 is not recorded.
        limiter.set_limits(c, with(vec![800_000, 1_000_000]));
        assert!(limiter.alerts().is_empty(), "0.8 stays recorded");
        admitted(limiter.admit(c, NO_KEY));
        admitted(limiter.admit(c, NO_KEY));
        let owed = limiter.alerts();
        assert_eq!(
            owed.iter().map(|a| a.threshold).collect::<Vec<_>>(),
            [Some(1_000_000)]
        );
        // A fraction new to the list and already passed is owed.
        limiter.alerted(&owed[0]);
        limiter.set_limits(c, with(vec![300_000, 1_000_000]));
        let owed = limiter.alerts();
        assert_eq!(
            owed.iter().map(|a| a.threshold).collect::<Vec<_>>(),
            [Some(300_000)]
        );
    }

    #[test]
    fn alerts_owed_when_the_month_turns_are_still_owed_for_their_month() {
        let march = datetime!(2026-03-31 23:59:59.9 UTC);
        let (clock, limiter) = setup(march);
        let (c, k) = (customer(1), key(1));
        limiter.set_limits(
            c,
            Limits {
                alerts: Alerts::from_millionths(vec![500_000]).unwrap(),
                ..quota(2, Overage::Block)
            },
        );
        known_key_limits(&limiter, k, k, c, Some(&key_quota(2)));
        admitted(limiter.admit(c, k));
        // Not recorded yet (the database is down) when April starts.
        clock.advance(Duration::from_millis(200));
        let owed = limiter.alerts();
        let march = Period::containing(march);
        assert_eq!(owed.len(), 2, "{owed:?}");
        assert!(owed.iter().all(|a| a.period == march && a.used == 1));
        // A request of April's counts in April, for the customer and the
        // key alike.
        admitted(limiter.admit(c, k));
        let owed = limiter.alerts();
        assert_eq!(owed.len(), 4, "{owed:?}");
        let april = Period::containing(clock.now());
        assert_eq!(
            owed.iter().filter(|a| a.period == april).count(),
            2,
            "{owed:?}"
        );
        for alert in &owed {
            limiter.alerted(alert);
        }
        assert!(limiter.alerts().is_empty(), "each once");
    }

    proptest! {
        #[test]
        fn block_quota_and_counts_match_a_model(
            monthly_requests in 0..12u64,
            monthly_tokens in 0..200u64,
            ops in proptest::collection::vec(op(), 1..120),
        ) {
            let (clock, limiter) = setup(datetime!(2026-01-31 20:00 UTC));
            let c = customer(1);
            limiter.set_limits(c, Limits {
                monthly_requests: Some(monthly_requests),
                monthly_tokens: Some(monthly_tokens),
                ..Limits::unlimited()
            });
            let mut period = Period::containing(clock.now());
            let (mut requests, mut tokens) = (0u64, 0u64);
            // The period's admissions not yet settled or released, the most
            // one settlement added (in any period), and whether there was one.
            let (mut in_flight, mut largest, mut settled_any) = (0u64, 0u64, false);
            // (admission, released, ended)
            let mut admissions: Vec<(Admission, bool, bool)> = Vec::new();
            for op in ops {
                match op {
                    Op::Admit => {
                        let ended = requests.saturating_sub(in_flight);
                        let held = if in_flight == 0 {
                            0
                        } else if !settled_any && ended == 0 {
                            u64::MAX
                        } else {
                            largest.max(tokens.checked_div(ended).unwrap_or(0)).saturating_mul(in_flight)
                        };
                        let expect_ok = requests < monthly_requests
                            && tokens < monthly_tokens
                            && tokens.saturating_add(held) < monthly_tokens;
                        let result = limiter.admit(c, NO_KEY).result;
                        prop_assert_eq!(result.is_ok(), expect_ok);
                        if let Ok(admission) = result {
                            prop_assert_eq!(admission.period(), period);
                            requests += 1;
                            in_flight += 1;
                            admissions.push((admission, false, false));
                        }
                    }
                    Op::Release(i) if !admissions.is_empty() => {
                        let i = i % admissions.len();
                        let (admission, released, ended) = &mut admissions[i];
                        limiter.release(admission);
                        if !*released && admission.period() == period {
                            requests -= 1;
                        }
                        if !*ended && admission.period() == period {
                            in_flight -= 1;
                        }
                        (*released, *ended) = (true, true);
                    }
                    Op::Settle(i, t) if !admissions.is_empty() => {
                        let i = i % admissions.len();
                        let (admission, _, ended) = &mut admissions[i];
                        limiter.settle(admission, t, 0);
                        if admission.period() == period {
                            tokens += t;
                        }
                        if !*ended && admission.period() == period {
                            in_flight -= 1;
                        }
                        *ended = true;
                        largest = largest.max(t);
                        settled_any = true;
                    }
                    Op::Advance(s) => clock.advance(Duration::from_secs(s)),
                    Op::Release(_) | Op::Settle(..) => {}
                }
                let now_period = Period::containing(clock.now());
                if now_period != period {
                    period = now_period;
                    requests = 0;
                    tokens = 0;
                    in_flight = 0;
                }
                let view = limiter.known_view(c).unwrap();
                prop_assert!(view.requests.used <= monthly_requests);
                prop_assert_eq!(view.requests.used, requests);
                prop_assert_eq!(view.tokens.used, tokens);
                prop_assert_eq!(view.requests.remaining, Some(monthly_requests - requests));
            }
        }
    }

    proptest! {
        /// Whatever the database's totals and the responses' usage, the
        /// counters saturate instead of overflowing: used is the exact sum
        /// capped at the type's bound, remaining is never negative, and a
        /// customer at the cap is refused rather than let through by a wrap.
        #[test]
        fn counters_saturate_at_any_magnitude(
            total_requests in any::<u64>(),
            total_tokens in any::<u64>(),
            total_cost in any::<i64>(),
            settled in proptest::collection::vec((any::<u64>(), any::<i64>()), 0..6),
            monthly_tokens in any::<u64>(),
            monthly_cost in any::<i64>(),
        ) {
            let (_, limiter) = setup(datetime!(2026-03-15 12:00 UTC));
            let c = customer(7);
            let period = Period::new(2026, time::Month::March);
            let totals = HashMap::from([(c, PeriodTotals {
                requests: total_requests,
                tokens: total_tokens,
                cost_nanos: total_cost,
            })]);
            limiter.apply_totals(period, &totals, &limiter.committed_snapshot());
            for &(tokens, cost) in &settled {
                let admission = admitted(limiter.admit(c, NO_KEY));
                limiter.settle(&admission, tokens, cost);
            }
            limiter.set_limits(c, Limits {
                monthly_tokens: Some(monthly_tokens),
                monthly_cost_nanos: Some(monthly_cost),
                ..Limits::unlimited()
            });
            let exact_tokens = u128::from(total_tokens)
                + settled.iter().map(|&(t, _)| u128::from(t)).sum::<u128>();
            let exact_cost = i128::from(total_cost.max(0))
                + settled.iter().map(|&(_, c)| i128::from(c.max(0))).sum::<i128>();
            let exact_requests = u128::from(total_requests) + settled.len() as u128;
            let view = limiter.known_view(c).unwrap();
            prop_assert_eq!(
                u128::from(view.requests.used),
                exact_requests.min(u128::from(u64::MAX))
            );
            prop_assert_eq!(
                u128::from(view.tokens.used),
                exact_tokens.min(u128::from(u64::MAX))
            );
            prop_assert_eq!(
                i128::from(view.cost_nanos.used),
                exact_cost.min(i128::from(i64::MAX))
            );
            prop_assert_eq!(
                view.tokens.remaining,
                Some(monthly_tokens.saturating_sub(view.tokens.used))
            );
            let cost_remaining = view.cost_nanos.remaining.unwrap_or(-1);
            prop_assert!(cost_remaining >= 0);
            prop_assert!(cost_remaining <= monthly_cost.max(0));
            let spent = view.tokens.used >= monthly_tokens
                || view.cost_nanos.used >= monthly_cost;
            prop_assert_eq!(limiter.admit(c, NO_KEY).result.is_err(), spent);
        }
    }
}
