//! The usage row (README, Usage metering): one per request that presented a valid key,
//! and how what an upstream reported about a request's usage becomes the
//! row's tokens and cost ([`Reported::apply`]): the one place where values
//! an upstream sent are judged, so that bad values never reach a row.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::keys::ids::{CustomerId, KeyId};
use crate::usage::cost::CostError;
use crate::usage::extract::{Count, Extracted, TokenCounts};
use crate::usage::pricing::Pricing;

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

/// The largest token count of one class believed for one request
/// (README, Usage metering). Far above any real request, far below what sums of many such
/// requests need to stay exact in 64 bits.
pub(crate) const MAX_TOKENS: u64 = 1_000_000_000_000;

/// The largest cost believed for one request, in nano-USD: 1,000,000 USD
/// (README, Usage metering), from a cost header or from the pricing table.
pub(crate) const MAX_COST_NANOS: i64 = 1_000_000 * 1_000_000_000;

/// Within [`MAX_COST_NANOS`] either way: a credit (from a negative price)
/// that large is as absurd as such a charge.
fn believable_cost(nanos: i64) -> bool {
    nanos.unsigned_abs() <= MAX_COST_NANOS.unsigned_abs()
}

/// A usage value an upstream reports: the `field` label of
/// `tollgate_usage_invalid_values_total`. The variants are declared in the
/// order of [`UsageField::ALL`], so `field as usize` is its position there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UsageField {
    InputTokens,
    OutputTokens,
    CacheReadTokens,
    CacheWriteTokens,
    Cost,
}

impl UsageField {
    pub const ALL: [UsageField; 5] = [
        UsageField::InputTokens,
        UsageField::OutputTokens,
        UsageField::CacheReadTokens,
        UsageField::CacheWriteTokens,
        UsageField::Cost,
    ];

    /// The `usage_events` column name (`cost` for `cost_nanos`, whichever
    /// source it came from).
    pub fn as_str(self) -> &'static str {
        match self {
            UsageField::InputTokens => "input_tokens",
            UsageField::OutputTokens => "output_tokens",
            UsageField::CacheReadTokens => "cache_read_tokens",
            UsageField::CacheWriteTokens => "cache_write_tokens",
            UsageField::Cost => "cost",
        }
    }
}

/// How many values of each field [`ResponseUsage::fill`](crate::usage::ResponseUsage::fill) ignored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InvalidValues([u8; UsageField::ALL.len()]);

impl InvalidValues {
    fn add(&mut self, field: UsageField) {
        let count = &mut self.0[field as usize];
        *count = count.saturating_add(1);
    }

    pub(crate) fn get(&self, field: UsageField) -> u64 {
        u64::from(self.0[field as usize])
    }

    /// The fields with at least one ignored value, and how many.
    pub fn iter(&self) -> impl Iterator<Item = (UsageField, u64)> + '_ {
        UsageField::ALL
            .into_iter()
            .map(|field| (field, self.get(field)))
            .filter(|&(_, count)| count > 0)
    }
}

/// Everything an upstream said about one request's usage, as read and
/// before any of it is believed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Reported {
    /// What the route's usage parser found in the body.
    pub body: Extracted,
    /// The route's token headers: each, when present, replaces the body's
    /// count of its class.
    pub input_tokens_header: Option<Count>,
    pub output_tokens_header: Option<Count>,
    /// The route's cost header, parsed; an error when it was present but
    /// not a cost (garbage, negative, beyond `i64`).
    pub cost_header: Option<Result<i64, CostError>>,
}

impl Reported {
    /// Fills `event`'s tokens, model, cost and cost source.
    ///
    /// A token count that is not a whole number, or above `MAX_TOKENS` (10¹²),
    /// is ignored as if absent (the row has 0 for it); a cost that is not
    /// a cost, or beyond `MAX_COST_NANOS` ($1M) either way, is ignored and the
    /// next source in precedence applies: the cost header, else the
    /// pricing table × the (believed) tokens, else none. Each ignored
    /// value is returned, to be counted; a value that was never consulted
    /// (the body's count where a header gave it, the priced cost where the
    /// header gave one) is not judged.
    pub(crate) fn apply(&self, event: &mut UsageEvent, pricing: &Pricing) -> InvalidValues {
        let mut invalid = InvalidValues::default();
        let body = self.body.tokens;
        let unusable = self.body.unusable;
        // The body's count of a class: absent without usage, unusable when
        // the parser said so.
        let from_body = |class: fn(&TokenCounts) -> u64, bad: bool| {
            body.map(|tokens| {
                if bad {
                    Count::Unusable
                } else {
                    Count::Whole(class(&tokens))
                }
            })
        };
        let mut believe = |count: Option<Count>, field: UsageField| match count {
            None => 0,
            Some(Count::Whole(count)) if count <= MAX_TOKENS => count,
            Some(_) => {
                invalid.add(field);
                0
            }
        };
        let tokens = TokenCounts {
            input: believe(
                self.input_tokens_header
                    .or_else(|| from_body(|t| t.input, unusable.input)),
                UsageField::InputTokens,
            ),
            output: believe(
                self.output_tokens_header
                    .or_else(|| from_body(|t| t.output, unusable.output)),
                UsageField::OutputTokens,
            ),
            cache_read: believe(
                from_body(|t| t.cache_read, unusable.cache_read),
                UsageField::CacheReadTokens,
            ),
            cache_write: believe(
                from_body(|t| t.cache_write, unusable.cache_write),
                UsageField::CacheWriteTokens,
            ),
        };
        event.input_tokens = tokens.input;
        event.output_tokens = tokens.output;
        event.cache_read_tokens = tokens.cache_read;
        event.cache_write_tokens = tokens.cache_write;
        event.model = self.body.model.clone();

        let header = match self.cost_header {
            None => None,
            Some(Ok(nanos)) if believable_cost(nanos) => Some(nanos),
            Some(_) => {
                invalid.add(UsageField::Cost);
                None
            }
        };
        // Priced only when the header gave no cost: a value never consulted
        // is not judged.
        let priced = match header {
            Some(_) => None,
            None => event
                .model
                .as_deref()
                .and_then(|model| pricing.cost_nanos(model, &tokens)),
        };
        let priced = match priced {
            Some(nanos) if !believable_cost(nanos) => {
                invalid.add(UsageField::Cost);
                None
            }
            priced => priced,
        };
        (event.cost_nanos, event.cost_source) = match (header, priced) {
            (Some(nanos), _) => (nanos, CostSource::Header),
            (None, Some(nanos)) => (nanos, CostSource::Pricing),
            (None, None) => (0, CostSource::None),
        };
        invalid
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

    fn row() -> UsageEvent {
        UsageEvent {
            id: Uuid::now_v7(),
            client_request_id: None,
            ts: OffsetDateTime::UNIX_EPOCH,
            customer_id: CustomerId::new(),
            key_id: KeyId::new(),
            instance: "gw-1".to_owned(),
            route: "openai".to_owned(),
            method: "POST".to_owned(),
            path: "/v1/chat/completions".to_owned(),
            status: 200,
            outcome: Outcome::Ok,
            latency_us: 0,
            upstream_latency_us: 0,
            request_bytes: 0,
            response_bytes: 0,
            model: None,
            input_tokens: 0,
            output_tokens: 0,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
            cost_nanos: 0,
            cost_source: CostSource::None,
        }
    }

    /// 1 USD per million tokens of every class: a token costs 1,000 nano-USD.
    fn pricing() -> Pricing {
        let usd = 1_000_000_000;
        Pricing::new([(
            "m".to_owned(),
            crate::usage::pricing::ModelPrice {
                input: usd,
                output: usd,
                cache_read: usd,
                cache_write: usd,
            },
        )])
    }

    fn body(input: u64, output: u64, cache_read: u64, cache_write: u64) -> Extracted {
        Extracted {
            tokens: Some(TokenCounts {
                input,
                output,
                cache_read,
                cache_write,
            }),
            model: Some("m".to_owned()),
            ..Extracted::default()
        }
    }

    fn apply(reported: &Reported) -> (UsageEvent, InvalidValues) {
        let mut event = row();
        let invalid = reported.apply(&mut event, &pricing());
        (event, invalid)
    }

    fn counts(invalid: &InvalidValues) -> Vec<(&'static str, u64)> {
        invalid
            .iter()
            .map(|(field, count)| (field.as_str(), count))
            .collect()
    }

    #[test]
    fn believable_values_pass_unchanged() {
        let (event, invalid) = apply(&Reported {
            body: body(MAX_TOKENS, 7, 3, 1),
            ..Reported::default()
        });
        assert_eq!(
            (
                event.input_tokens,
                event.output_tokens,
                event.cache_read_tokens,
                event.cache_write_tokens
            ),
            (MAX_TOKENS, 7, 3, 1)
        );
        assert_eq!(event.model.as_deref(), Some("m"));
        // (10^12 + 11) tokens × 1,000 nano-USD is 10^15 + 11,000 nano-USD,
        // just over the bound: the priced cost is ignored and counted.
        assert_eq!((event.cost_nanos, event.cost_source), (0, CostSource::None));
        assert_eq!(counts(&invalid), [("cost", 1)]);
        let (event, invalid) = apply(&Reported {
            body: body(MAX_TOKENS - 11, 7, 3, 1),
            ..Reported::default()
        });
        assert!(invalid.iter().next().is_none());
        assert_eq!(
            (event.cost_nanos, event.cost_source),
            (MAX_COST_NANOS, CostSource::Pricing)
        );
    }

    #[test]
    fn absurd_counts_are_zero_and_counted() {
        // The upstream of the incident: 5 × 10^18 prompt and completion tokens.
        let absurd = 5_000_000_000_000_000_000;
        let (event, invalid) = apply(&Reported {
            body: body(absurd, absurd, 2, MAX_TOKENS + 1),
            ..Reported::default()
        });
        assert_eq!(
            (
                event.input_tokens,
                event.output_tokens,
                event.cache_read_tokens,
                event.cache_write_tokens
            ),
            (0, 0, 2, 0)
        );
        assert_eq!(
            counts(&invalid),
            [
                ("input_tokens", 1),
                ("output_tokens", 1),
                ("cache_write_tokens", 1)
            ]
        );
        // Priced from what was believed: 2 tokens.
        assert_eq!(
            (event.cost_nanos, event.cost_source),
            (2_000, CostSource::Pricing)
        );
    }

    #[test]
    fn unusable_counts_are_zero_and_counted() {
        // What the parser makes of `"prompt_tokens": -5` and
        // `"cached_tokens": 1.5` beside good counts.
        let mut extracted = body(0, 0, 0, 0);
        extracted.unusable.input = true;
        extracted.tokens = Some(TokenCounts {
            input: 0,
            output: 6,
            cache_read: 0,
            cache_write: 8,
        });
        extracted.unusable.cache_read = true;
        let (event, invalid) = apply(&Reported {
            body: extracted,
            ..Reported::default()
        });
        assert_eq!(
            (
                event.input_tokens,
                event.output_tokens,
                event.cache_read_tokens
            ),
            (0, 6, 0)
        );
        assert_eq!(
            counts(&invalid),
            [("input_tokens", 1), ("cache_read_tokens", 1)]
        );
        assert_eq!(event.cost_nanos, 14_000);
    }

    #[test]
    fn headers_replace_the_body_and_are_judged_instead_of_it() {
        let (event, invalid) = apply(&Reported {
            body: body(MAX_TOKENS + 1, 4, 0, 0),
            input_tokens_header: Some(Count::Whole(3)),
            output_tokens_header: Some(Count::Unusable),
            ..Reported::default()
        });
        assert_eq!((event.input_tokens, event.output_tokens), (3, 0));
        assert_eq!(counts(&invalid), [("output_tokens", 1)]);
        let (event, invalid) = apply(&Reported {
            output_tokens_header: Some(Count::Whole(MAX_TOKENS + 1)),
            ..Reported::default()
        });
        assert_eq!(event.output_tokens, 0);
        assert_eq!(counts(&invalid), [("output_tokens", 1)]);
    }

    #[test]
    fn cost_falls_back_from_a_bad_header_to_pricing_to_none() {
        let tokens = body(10, 0, 0, 0);
        let cases = [
            (Ok(MAX_COST_NANOS), MAX_COST_NANOS, CostSource::Header, 0),
            (Ok(MAX_COST_NANOS + 1), 10_000, CostSource::Pricing, 1),
            (Ok(i64::MAX), 10_000, CostSource::Pricing, 1),
            (Err(CostError::Negative), 10_000, CostSource::Pricing, 1),
            (Err(CostError::Overflow), 10_000, CostSource::Pricing, 1),
        ];
        for (header, nanos, source, bad) in cases {
            let (event, invalid) = apply(&Reported {
                body: tokens.clone(),
                cost_header: Some(header),
                ..Reported::default()
            });
            assert_eq!(
                (event.cost_nanos, event.cost_source),
                (nanos, source),
                "{header:?}"
            );
            assert_eq!(invalid.get(UsageField::Cost), bad, "{header:?}");
        }
        // Both sources out of bounds: no cost, two values ignored.
        let (event, invalid) = apply(&Reported {
            body: body(MAX_TOKENS, MAX_TOKENS, 0, 0),
            cost_header: Some(Ok(i64::MAX)),
            ..Reported::default()
        });
        assert_eq!((event.cost_nanos, event.cost_source), (0, CostSource::None));
        assert_eq!(counts(&invalid), [("cost", 2)]);
    }

    #[test]
    fn field_names_are_the_metric_labels() {
        let names: Vec<&str> = UsageField::ALL.iter().map(|f| f.as_str()).collect();
        assert_eq!(
            names,
            [
                "input_tokens",
                "output_tokens",
                "cache_read_tokens",
                "cache_write_tokens",
                "cost"
            ]
        );
        for (index, field) in UsageField::ALL.into_iter().enumerate() {
            assert_eq!(field as usize, index);
        }
    }

    use proptest::prelude::*;

    proptest! {
        /// Whatever an upstream reports, the row holds only bounded values,
        /// every value kept is one reported, and every value dropped is
        /// counted.
        #[test]
        fn rows_hold_only_bounded_values(
            tokens in proptest::array::uniform4(prop_oneof![
                0..=MAX_TOKENS,
                MAX_TOKENS..=u64::MAX,
                Just(u64::MAX),
            ]),
            unusable in proptest::array::uniform4(proptest::bool::weighted(0.1)),
            header_input in proptest::option::of(prop_oneof![
                (0..=u64::MAX).prop_map(Count::Whole),
                Just(Count::Unusable),
            ]),
            cost in proptest::option::of(prop_oneof![
                (0..=i64::MAX).prop_map(Ok),
                (0..=MAX_COST_NANOS).prop_map(Ok),
                Just(Err(CostError::Overflow)),
            ]),
        ) {
            let [input, output, cache_read, cache_write] = tokens;
            let mut extracted = body(input, output, cache_read, cache_write);
            let [a, b, c, d] = unusable;
            extracted.unusable = crate::usage::extract::Unusable {
                input: a,
                output: b,
                cache_read: c,
                cache_write: d,
            };
            let reported = Reported {
                body: extracted,
                input_tokens_header: header_input,
                cost_header: cost,
                ..Reported::default()
            };
            let (event, invalid) = apply(&reported);
            let row = [
                event.input_tokens,
                event.output_tokens,
                event.cache_read_tokens,
                event.cache_write_tokens,
            ];
            let seen = [
                header_input.unwrap_or(if a { Count::Unusable } else { Count::Whole(input) }),
                if b { Count::Unusable } else { Count::Whole(output) },
                if c { Count::Unusable } else { Count::Whole(cache_read) },
                if d { Count::Unusable } else { Count::Whole(cache_write) },
            ];
            for ((kept, seen), field) in row.into_iter().zip(seen).zip(UsageField::ALL) {
                prop_assert!(kept <= MAX_TOKENS);
                let believable = matches!(seen, Count::Whole(n) if n <= MAX_TOKENS);
                let expected = match seen {
                    Count::Whole(n) if believable => n,
                    _ => 0,
                };
                prop_assert_eq!(kept, expected);
                prop_assert_eq!(invalid.get(field), u64::from(!believable));
            }
            prop_assert!(believable_cost(event.cost_nanos));
            match event.cost_source {
                CostSource::Header => prop_assert_eq!(Some(Ok(event.cost_nanos)), cost),
                CostSource::Pricing => prop_assert_eq!(
                    Some(event.cost_nanos),
                    pricing().cost_nanos("m", &TokenCounts {
                        input: row[0],
                        output: row[1],
                        cache_read: row[2],
                        cache_write: row[3],
                    })
                ),
                CostSource::None => prop_assert_eq!(event.cost_nanos, 0),
            }
            let header_bad = match cost {
                Some(Ok(nanos)) => !believable_cost(nanos),
                Some(Err(_)) => true,
                None => false,
            };
            prop_assert!(invalid.get(UsageField::Cost) >= u64::from(header_bad));
        }
    }
}
