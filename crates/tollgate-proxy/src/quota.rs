//! The quota document shared by `GET /_tollgate/usage` (a client, about
//! itself) and `GET /v1/quota/{customer}` (an operator): each limit with
//! used / remaining / reset, and the current period's totals. Money is a
//! decimal USD string.

use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use tollgate_metering::limits::{Meter, QuotaView, RateHeaders};
use tollgate_metering::usage::format_usd;
use tollgate_metering::{CustomerId, KeyId};
use utoipa::ToSchema;

/// A customer's limits and usage this period.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct QuotaDocument {
    #[schema(value_type = uuid::Uuid)]
    customer_id: CustomerId,
    /// The customer's name.
    customer: Option<String>,
    tier: Option<String>,
    /// `YYYY-MM`, UTC.
    period: String,
    /// When the period ends: unix seconds, as in `x-ratelimit-reset`.
    reset: i64,
    /// The same instant, RFC 3339.
    reset_at: String,
    /// `block` or `bill`.
    overage: &'static str,
    limits: QuotaLimits,
    totals: QuotaTotals,
    /// On `GET /_tollgate/usage`, when the calling key has limits of its
    /// own (nested inside the customer's): those limits and the key's use
    /// of them (shared with the keys it replaced by rotation).
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<KeyQuota>,
}

/// A key's own limits and their use this period.
#[derive(Debug, Serialize, ToSchema)]
struct KeyQuota {
    #[schema(value_type = uuid::Uuid)]
    key_id: KeyId,
    limits: QuotaLimits,
}

/// Each limit: `null` where none applies to the rate; `limit` and
/// `remaining` are `null` for a monthly limit that is not set.
#[derive(Debug, Serialize, ToSchema)]
struct QuotaLimits {
    rate: Option<RateMeter>,
    monthly_requests: CountMeter,
    monthly_tokens: CountMeter,
    monthly_cost_usd: UsdMeter,
}

/// The short-window rate, as `x-ratelimit-*` says it.
#[derive(Debug, Serialize, ToSchema)]
struct RateMeter {
    /// As configured, e.g. `60/min`.
    rate: Option<String>,
    limit: u64,
    used: u64,
    remaining: u64,
    /// Unix seconds when the window is fully replenished.
    reset: i64,
}

/// A monthly count limit.
#[derive(Debug, Serialize, ToSchema)]
struct CountMeter {
    limit: Option<u64>,
    used: u64,
    remaining: Option<u64>,
    /// Unix seconds when the period ends.
    reset: i64,
}

/// A monthly USD budget, as decimal strings.
#[derive(Debug, Serialize, ToSchema)]
struct UsdMeter {
    limit: Option<String>,
    used: String,
    remaining: Option<String>,
    /// Unix seconds when the period ends.
    reset: i64,
}

/// The period's totals.
#[derive(Debug, Serialize, ToSchema)]
struct QuotaTotals {
    requests: u64,
    tokens: u64,
    cost_usd: String,
}

/// Renders a customer's limits and usage.
pub(crate) fn quota_document(
    customer_id: CustomerId,
    customer: Option<&str>,
    tier: Option<&str>,
    view: &QuotaView,
) -> QuotaDocument {
    let reset = view.reset.unix_timestamp();
    QuotaDocument {
        customer_id,
        customer: customer.map(str::to_owned),
        tier: tier.map(str::to_owned),
        period: view.period.to_string(),
        reset,
        reset_at: view.reset.format(&Rfc3339).unwrap_or_default(),
        overage: view.limits.overage.as_str(),
        limits: quota_limits(view),
        totals: QuotaTotals {
            requests: view.requests.used,
            tokens: view.tokens.used,
            cost_usd: format_usd(view.cost_nanos.used),
        },
        key: None,
    }
}

impl QuotaDocument {
    /// Adds the calling key's own limits, `view` being their use.
    pub(crate) fn with_key(mut self, key_id: KeyId, view: &QuotaView) -> QuotaDocument {
        self.key = Some(KeyQuota {
            key_id,
            limits: quota_limits(view),
        });
        self
    }
}

fn quota_limits(view: &QuotaView) -> QuotaLimits {
    let reset = view.reset.unix_timestamp();
    let count = |meter: &Meter<u64>| CountMeter {
        limit: meter.limit,
        used: meter.used,
        remaining: meter.remaining,
        reset,
    };
    QuotaLimits {
        rate: view
            .rate
            .map(|window| rate_meter(view.limits.rate.map(|r| r.to_string()), &window)),
        monthly_requests: count(&view.requests),
        monthly_tokens: count(&view.tokens),
        monthly_cost_usd: UsdMeter {
            limit: view.cost_nanos.limit.map(format_usd),
            used: format_usd(view.cost_nanos.used),
            remaining: view.cost_nanos.remaining.map(format_usd),
            reset,
        },
    }
}

fn rate_meter(rate: Option<String>, window: &RateHeaders) -> RateMeter {
    RateMeter {
        rate,
        limit: window.limit,
        used: window.used,
        remaining: window.remaining,
        reset: window.reset,
    }
}
