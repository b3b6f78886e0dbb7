//! The usage row (SPEC §5): one per request that presented a valid key.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::ids::{CustomerId, KeyId};

/// How a request ended, as recorded in `usage_events.outcome`.
///
/// The usage spool stores a variant by its position: add new ones last
/// (see `spool::WireEvent`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    UpstreamError,
    UpstreamTimeout,
    ClientClosed,
    RateLimited,
    QuotaExceeded,
    BudgetExceeded,
    RouteForbidden,
    PayloadTooLarge,
    /// The client stopped sending its request body for
    /// `request_body_timeout` (408).
    ClientTimeout,
}

impl Outcome {
    pub const ALL: [Outcome; 10] = [
        Outcome::Ok,
        Outcome::UpstreamError,
        Outcome::UpstreamTimeout,
        Outcome::ClientClosed,
        Outcome::RateLimited,
        Outcome::QuotaExceeded,
        Outcome::BudgetExceeded,
        Outcome::RouteForbidden,
        Outcome::PayloadTooLarge,
        Outcome::ClientTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::UpstreamError => "upstream_error",
            Outcome::UpstreamTimeout => "upstream_timeout",
            Outcome::ClientClosed => "client_closed",
            Outcome::RateLimited => "rate_limited",
            Outcome::QuotaExceeded => "quota_exceeded",
            Outcome::BudgetExceeded => "budget_exceeded",
            Outcome::RouteForbidden => "route_forbidden",
            Outcome::PayloadTooLarge => "payload_too_large",
            Outcome::ClientTimeout => "client_timeout",
        }
    }

    /// Refused before admission: counted in `usage_daily.rejected`, toward
    /// no quota and no bill. Every other outcome is an admitted request
    /// (`usage_daily.requests`).
    pub fn is_rejected(self) -> bool {
        match self {
            Outcome::RateLimited
            | Outcome::QuotaExceeded
            | Outcome::BudgetExceeded
            | Outcome::RouteForbidden
            | Outcome::PayloadTooLarge => true,
            Outcome::Ok
            | Outcome::UpstreamError
            | Outcome::UpstreamTimeout
            | Outcome::ClientClosed
            | Outcome::ClientTimeout => false,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Outcome {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Outcome::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| format!("unknown outcome {s:?}"))
    }
}

/// Where `cost_nanos` came from. Stored by position in the usage spool,
/// like [`Outcome`]: add new variants last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CostSource {
    /// The upstream's cost header.
    Header,
    /// The pricing table × tokens.
    Pricing,
    /// Neither: cost is zero.
    None,
}

impl CostSource {
    pub fn as_str(self) -> &'static str {
        match self {
            CostSource::Header => "header",
            CostSource::Pricing => "pricing",
            CostSource::None => "none",
        }
    }
}

impl FromStr for CostSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "header" => Ok(CostSource::Header),
            "pricing" => Ok(CostSource::Pricing),
            "none" => Ok(CostSource::None),
            other => Err(format!("unknown cost source {other:?}")),
        }
    }
}

/// One usage row. Field names are the `usage_events` column names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageEvent {
    /// The usage id: a UUID v7 made for the request; never written twice.
    pub id: Uuid,
    /// The client's `x-request-id`, if it sent one.
    pub client_request_id: Option<String>,
    /// Request start, UTC, microsecond precision.
    #[serde(with = "time::serde::rfc3339")]
    pub ts: OffsetDateTime,
    pub customer_id: CustomerId,
    pub key_id: KeyId,
    pub instance: String,
    pub route: String,
    pub method: String,
    /// Without the query string.
    pub path: String,
    /// Status returned to the client; 0 if none was.
    pub status: u16,
    pub outcome: Outcome,
    /// Total time to last byte.
    pub latency_us: u64,
    /// Time to upstream response headers (0 if never forwarded).
    pub upstream_latency_us: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub model: Option<String>,
    /// Excludes cached input.
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    /// Cost in 1e-9 USD.
    pub cost_nanos: i64,
    pub cost_source: CostSource,
}

impl UsageEvent {
    /// Admitted requests with outcome `upstream_error`, `upstream_timeout`
    /// or status ≥ 500 count in `usage_daily.errors`.
    pub fn is_error(&self) -> bool {
        !self.outcome.is_rejected()
            && (matches!(
                self.outcome,
                Outcome::UpstreamError | Outcome::UpstreamTimeout
            ) || self.status >= 500)
    }

    /// The UTC day the row is rolled up under.
    pub fn day(&self) -> time::Date {
        self.ts.to_offset(time::UtcOffset::UTC).date()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_names_round_trip() {
        for outcome in Outcome::ALL {
            assert_eq!(outcome.as_str().parse::<Outcome>(), Ok(outcome));
            assert_eq!(
                serde_json::to_string(&outcome).unwrap(),
                format!("\"{}\"", outcome.as_str())
            );
        }
        assert_eq!(Outcome::ALL.iter().filter(|o| o.is_rejected()).count(), 5);
    }
}
