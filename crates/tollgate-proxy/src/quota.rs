//! The quota document shared by `GET /_tollgate/usage` (a client, about
//! itself) and `GET /v1/quota/{customer}` (an operator): each limit with
//! used / remaining / reset, and the current period's totals. Money is a
//! decimal USD string.

use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use tollgate_metering::limits::{Meter, QuotaView, RateHeaders};
use tollgate_metering::usage::format_usd;
use tollgate_metering::CustomerId;

/// Renders a customer's limits and usage.
pub(crate) fn quota_document(
    customer_id: CustomerId,
    customer: Option<&str>,
    tier: Option<&str>,
    view: &QuotaView,
) -> Value {
    // `reset` is unix seconds everywhere, as in `x-ratelimit-reset`;
    // `reset_at` says the same for people.
    let reset = view.reset.unix_timestamp();
    let monthly = |meter: Value| {
        let mut meter = meter;
        meter["reset"] = Value::from(reset);
        meter
    };
    let limits = &view.limits;
    json!({
        "customer_id": customer_id,
        "customer": customer,
        "tier": tier,
        "period": view.period.to_string(),
        "reset": reset,
        "reset_at": view.reset.format(&Rfc3339).unwrap_or_default(),
        "overage": limits.overage.as_str(),
        "limits": {
            "rate": view.rate.map(|rate| rate_json(limits.rate.map(|r| r.to_string()), &rate)),
            "monthly_requests": monthly(count_json(&view.requests)),
            "monthly_tokens": monthly(count_json(&view.tokens)),
            "monthly_cost_usd": monthly(json!({
                "limit": view.cost_nanos.limit.map(format_usd),
                "used": format_usd(view.cost_nanos.used),
                "remaining": view.cost_nanos.remaining.map(format_usd),
            })),
        },
        "totals": {
            "requests": view.requests.used,
            "tokens": view.tokens.used,
            "cost_usd": format_usd(view.cost_nanos.used),
        },
    })
}

fn count_json(meter: &Meter<u64>) -> Value {
    json!({
        "limit": meter.limit,
        "used": meter.used,
        "remaining": meter.remaining,
    })
}

fn rate_json(rate: Option<String>, window: &RateHeaders) -> Value {
    json!({
        "rate": rate,
        "limit": window.limit,
        "used": window.used,
        "remaining": window.remaining,
        "reset": window.reset,
    })
}
