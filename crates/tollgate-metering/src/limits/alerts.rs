//! What the limiter tells the webhook outbox: a monthly limit's use that
//! reached one of the tier's alert fractions, or that refused a request.
//! The limiter finds them ([`crate::limits::Limiter::alerts`]); whether an
//! alert is new is decided by the database (one row per event), so memory
//! only saves asking twice.

use crate::keys::ids::{CustomerId, KeyId};
use crate::limits::limiter::Rejection;
use crate::limits::Period;

/// The most alert fractions a tier may have.
pub const MAX_ALERTS: usize = 16;

/// One of the three monthly limits, by its configuration name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MonthlyLimit {
    Requests,
    Tokens,
    Cost,
}

impl MonthlyLimit {
    pub(crate) const ALL: [MonthlyLimit; 3] = [
        MonthlyLimit::Requests,
        MonthlyLimit::Tokens,
        MonthlyLimit::Cost,
    ];

    /// `monthly_requests`, `monthly_tokens` or `monthly_cost_usd`.
    pub fn as_str(self) -> &'static str {
        match self {
            MonthlyLimit::Requests => "monthly_requests",
            MonthlyLimit::Tokens => "monthly_tokens",
            MonthlyLimit::Cost => "monthly_cost_usd",
        }
    }

    /// The monthly limit behind a refusal; `None` for the rate.
    pub(crate) fn of(rejection: Rejection) -> Option<MonthlyLimit> {
        match rejection {
            // A refusal that passes once requests in flight end exhausts nothing.
            Rejection::RateLimited { .. } | Rejection::BudgetHeld { .. } => None,
            Rejection::QuotaExceeded { .. } => Some(MonthlyLimit::Requests),
            Rejection::BudgetExceeded {
                which: crate::limits::Budget::Tokens,
                ..
            } => Some(MonthlyLimit::Tokens),
            Rejection::BudgetExceeded {
                which: crate::limits::Budget::Cost,
                ..
            } => Some(MonthlyLimit::Cost),
        }
    }

    pub(crate) fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A tier's alert fractions, in millionths, ascending and distinct, at
/// most [`MAX_ALERTS`]: `0.8` is 800,000.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Alerts(Vec<u32>);

impl Alerts {
    /// No alerts.
    pub const fn none() -> Alerts {
        Alerts(Vec::new())
    }

    /// From millionths, which must be ascending, distinct, 1 to 1,000,000
    /// and at most [`MAX_ALERTS`] (the config's validation says which is
    /// wrong; this only refuses).
    pub fn from_millionths(fractions: Vec<u32>) -> Option<Alerts> {
        let ascending = fractions.windows(2).all(|pair| pair[0] < pair[1]);
        let in_range = fractions.iter().all(|&f| (1..=1_000_000).contains(&f));
        (ascending && in_range && fractions.len() <= MAX_ALERTS).then_some(Alerts(fractions))
    }

    pub fn millionths(&self) -> &[u32] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A monthly limit that needs a webhook event: its use reached an alert
/// fraction (`threshold`), or it refused a request (`threshold` `None`:
/// `quota.exhausted`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitAlert {
    pub customer: CustomerId,
    /// For a key's own limit; `None` for the customer's.
    pub key: Option<KeyAlert>,
    pub limit: MonthlyLimit,
    /// Millionths of the limit; `None` for exhaustion.
    pub threshold: Option<u32>,
    /// Use so far in the period (nano-USD for cost).
    pub used: u64,
    /// The limit (nano-USD for cost).
    pub limit_value: u64,
    pub period: Period,
}

/// The key an alert is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyAlert {
    /// The family whose limit it is (the same across rotations).
    pub family: KeyId,
    /// The family's newest key: the one the alert names.
    pub newest: KeyId,
}

/// Whether `used` has reached `millionths` of `limit`.
pub(crate) fn reached(used: u64, limit: u64, millionths: u32) -> bool {
    u128::from(used) * 1_000_000 >= u128::from(limit) * u128::from(millionths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_must_ascend_within_one_and_reach_exactly() {
        assert!(Alerts::from_millionths(vec![500_000, 800_000, 1_000_000]).is_some());
        assert!(Alerts::from_millionths(vec![800_000, 500_000]).is_none());
        assert!(Alerts::from_millionths(vec![0]).is_none());
        assert!(Alerts::from_millionths(vec![1_000_001]).is_none());
        assert!(Alerts::from_millionths((1..=17).collect()).is_none());
        assert!(reached(80, 100, 800_000));
        assert!(!reached(79, 100, 800_000));
        assert!(reached(u64::MAX, u64::MAX, 1_000_000));
        assert!(!reached(u64::MAX - 1, u64::MAX, 1_000_000));
    }
}
