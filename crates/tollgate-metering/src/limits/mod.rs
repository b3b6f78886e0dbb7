//! Limits: the in-memory admission core for rate limits, monthly request
//! quotas and token/cost budgets (README, Limits). Memory only, but for the
//! database read of [`Limiter::sync`]: the proxy
//! calls [`Limiter::admit`] before forwarding, [`Limiter::release`] /
//! [`Limiter::settle`] after; background tasks feed it limits
//! ([`Limiter::set_limits`]) and database totals
//! ([`Limiter::sync`]).
//!
//! - **Rate** (`rate = "60/min"`): GCRA per customer, per instance; a burst
//!   of `count` from idle, then one every `per / count`.
//! - **Monthly quotas and budgets**: counted per calendar month in UTC
//!   ([`Period`]); a new month starts lazily, on the first call that sees
//!   it. Requests are reserved at admission; tokens and cost are settled
//!   when the response ends, so concurrent in-flight requests may overshoot
//!   a budget by what they use (a budget can only refuse the next request).
//! - Time comes only from a [`Clock`], so tests move it by hand.
//!
//! # Failure behaviour
//! Everything here is memory. A crash loses this instance's counts; on
//! start the wiring loads the period's totals from the database
//! ([`Limiter::sync`]), so only usage not
//! yet in the database (rows still in the spool, replayed later) is
//! missing until the next sync. Across instances, quotas and budgets
//! overshoot by at most what the other instances admit between syncs:
//! (flush_interval + the time between syncs) × the customer's request
//! rate. The time between syncs is `sync_interval`, longer when syncs are
//! slow (the gateway spaces them out to a fifth of the time). Most syncs
//! read only the open days ([`SyncRead::OpenDays`]): another instance's
//! rows of an earlier day count from the next whole read, a minute or more
//! later.

mod alerts;
mod clock;
mod config;
mod gcra;
mod limiter;
mod period;
pub(crate) mod policy;

pub use crate::{
    limits::alerts::{Alerts, KeyAlert, LimitAlert, MonthlyLimit, MAX_ALERTS},
    limits::clock::{Clock, ManualClock, SystemClock},
    limits::config::{KeyLimits, Limits, LimitsError, Overage, Rate},
    limits::limiter::{
        event_tokens, Admission, Budget, Limiter, Meter, PeriodTotals, QuotaView, RateHeaders,
        Rejection, Remaining, SyncRead,
    },
    limits::period::Period,
    limits::policy::Policies,
};
