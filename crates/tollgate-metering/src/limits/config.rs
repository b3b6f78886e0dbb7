//! What a customer is allowed: a tier's limits merged with the customer's
//! overrides. Parsing and validation live here, so the admin API refuses a
//! bad override with the same words the limiter would have used.

use std::fmt;
use std::time::Duration;

use serde_json::Value;

use crate::limits::alerts::Alerts;
use crate::usage::cost::{format_usd, parse_usd_to_nanos, CostError};

/// A short-window rate: `count` requests per `per`, e.g. 60 per minute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: u64,
    pub per: Duration,
}

/// The windows a rate may be written in.
const RATE_UNITS: [(&str, Duration); 3] = [
    ("s", Duration::from_secs(1)),
    ("min", Duration::from_secs(60)),
    ("h", Duration::from_secs(3600)),
];

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match RATE_UNITS.iter().find(|(_, per)| *per == self.per) {
            Some((unit, _)) => write!(f, "{}/{unit}", self.count),
            None => write!(f, "{} per {:?}", self.count, self.per),
        }
    }
}

/// Why a rate text was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("expected N/s, N/min or N/h (e.g. \"60/min\"), found {found:?}")]
    Format { found: String },
    #[error("the count must be a whole number from 1 to {max}, found {found:?}")]
    Count { found: String, max: u64 },
    #[error("unknown unit {unit:?}: use s, min or h")]
    Unit { unit: String },
}

/// The largest count a rate may have: one request per nanosecond per second
/// window would already be meaningless; above this the emission interval
/// would round to zero.
const MAX_RATE_COUNT: u64 = 1_000_000_000;

/// Parses `N/s`, `N/min` or `N/h` (surrounding whitespace allowed).
impl std::str::FromStr for Rate {
    type Err = RateError;

    fn from_str(text: &str) -> Result<Rate, RateError> {
        let trimmed = text.trim();
        let Some((count, unit)) = trimmed.split_once('/') else {
            return Err(RateError::Format {
                found: text.to_owned(),
            });
        };
        if count.is_empty() || unit.is_empty() {
            return Err(RateError::Format {
                found: text.to_owned(),
            });
        }
        let count_error = || RateError::Count {
            found: count.to_owned(),
            max: MAX_RATE_COUNT,
        };
        if !count.bytes().all(|b| b.is_ascii_digit()) {
            return Err(count_error());
        }
        let count: u64 = count.parse().map_err(|_| count_error())?;
        if count == 0 || count > MAX_RATE_COUNT {
            return Err(count_error());
        }
        let per = RATE_UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, per)| *per)
            .ok_or_else(|| RateError::Unit {
                unit: unit.to_owned(),
            })?;
        Ok(Rate { count, per })
    }
}

/// What happens once `monthly_requests` is used up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Overage {
    /// 429 `quota_exceeded`.
    #[default]
    Block,
    /// Requests go on and the excess is billed.
    Bill,
}

impl Overage {
    pub fn as_str(self) -> &'static str {
        match self {
            Overage::Block => "block",
            Overage::Bill => "bill",
        }
    }
}

/// A customer's effective limits (tier merged with per-customer overrides).
/// `None` = unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub rate: Option<Rate>,
    pub monthly_requests: Option<u64>,
    pub monthly_tokens: Option<u64>,
    pub monthly_cost_nanos: Option<i64>,
    pub overage: Overage,
    pub overage_price_nanos: i64,
    /// The tier's alert fractions (`quota.threshold` webhooks), for the
    /// customer's limits and its keys' own.
    pub alerts: Alerts,
}

/// Why overrides were refused; each names the field at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    #[error("overrides must be a JSON object, found {found}")]
    NotAnObject { found: String },
    #[error(
        "unknown field {field:?} in overrides (known: rate, monthly_requests, monthly_tokens, \
         monthly_cost_usd, overage, overage_price_per_request_usd)"
    )]
    UnknownField { field: String },
    #[error(
        "unknown field {field:?} in a key's limits (known: rate, monthly_requests, \
         monthly_tokens, monthly_cost_usd)"
    )]
    UnknownKeyField { field: String },
    #[error("invalid {field}: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
}

impl LimitsError {
    #[cfg(test)]
    /// The field at fault, for an admin API `invalid_request` that names it.
    pub(crate) fn field(&self) -> &str {
        match self {
            LimitsError::NotAnObject { .. } => "overrides",
            LimitsError::UnknownField { field } | LimitsError::UnknownKeyField { field } => field,
            LimitsError::Invalid { field, .. } => field,
        }
    }
}

/// What was wrong with one override's value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Problem {
    #[error(transparent)]
    Rate(#[from] RateError),
    #[error("{0}")]
    Usd(#[from] CostError),
    #[error("expected {expected}, found {found}")]
    Type {
        expected: &'static str,
        found: String,
    },
}

impl Limits {
    /// No limits at all; overage `block` at no price (the tier defaults in docs/CONFIGURATION.md).
    pub const fn unlimited() -> Limits {
        Limits {
            rate: None,
            monthly_requests: None,
            monthly_tokens: None,
            monthly_cost_nanos: None,
            overage: Overage::Block,
            overage_price_nanos: 0,
            alerts: Alerts::none(),
        }
    }

    /// Applies a customer's `overrides` JSON object to these (tier) limits.
    ///
    /// Fields: `rate` (`"60/min"`, `"N/s"`, `"N/h"`), `monthly_requests`,
    /// `monthly_tokens` (non-negative integers), `monthly_cost_usd` (a
    /// number or a decimal string, read exactly), `overage` (`"block"` or
    /// `"bill"`), `overage_price_per_request_usd` (number or decimal
    /// string). A JSON `null` for one of the four limits removes it
    /// (unlimited); `overage` and the price are not limits and may not be
    /// null. Unknown fields are refused, as unknown config keys are.
    pub fn with_overrides(&self, overrides: &Value) -> Result<Limits, LimitsError> {
        let Value::Object(fields) = overrides else {
            return Err(LimitsError::NotAnObject {
                found: describe(overrides),
            });
        };
        let mut limits = self.clone();
        for (name, value) in fields {
            match name.as_str() {
                "rate" => {
                    limits.rate = nullable(value, |value| match value {
                        Value::String(text) => text.parse::<Rate>().map_err(Problem::from),
                        other => Err(type_problem(
                            "a rate like \"60/min\" (N/s, N/min or N/h) or null",
                            other,
                        )),
                    })
                    .map_err(invalid("rate"))?;
                }
                "monthly_requests" => {
                    limits.monthly_requests =
                        nullable(value, count).map_err(invalid("monthly_requests"))?;
                }
                "monthly_tokens" => {
                    limits.monthly_tokens =
                        nullable(value, count).map_err(invalid("monthly_tokens"))?;
                }
                "monthly_cost_usd" => {
                    limits.monthly_cost_nanos =
                        nullable(value, usd).map_err(invalid("monthly_cost_usd"))?;
                }
                "overage" => {
                    limits.overage = match value {
                        Value::String(text) if text == "block" => Overage::Block,
                        Value::String(text) if text == "bill" => Overage::Bill,
                        other => {
                            return Err(invalid("overage")(type_problem(
                                "\"block\" or \"bill\"",
                                other,
                            )))
                        }
                    };
                }
                "overage_price_per_request_usd" => {
                    limits.overage_price_nanos =
                        usd(value).map_err(invalid("overage_price_per_request_usd"))?;
                }
                _ => {
                    return Err(LimitsError::UnknownField {
                        field: name.clone(),
                    })
                }
            }
        }
        Ok(limits)
    }
}

/// A key's own limits, nested inside its customer's: a request must pass
/// both. `None` = no limit of the key's own. A key's limits always block
/// (there is no overage for a key) and are not billed separately.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyLimits {
    pub rate: Option<Rate>,
    pub monthly_requests: Option<u64>,
    pub monthly_tokens: Option<u64>,
    pub monthly_cost_nanos: Option<i64>,
}

/// The fields a key's limits may have.
const KEY_LIMIT_FIELDS: [&str; 4] = [
    "rate",
    "monthly_requests",
    "monthly_tokens",
    "monthly_cost_usd",
];

impl KeyLimits {
    /// No limit of the key's own.
    pub fn is_empty(&self) -> bool {
        *self == KeyLimits::default()
    }

    /// Reads `{rate?, monthly_requests?, monthly_tokens?,
    /// monthly_cost_usd?}` with the rules of customer overrides (a rate as
    /// in the config, counts as integers, cost a number or decimal
    /// string; `null` or absent = none). Anything else is refused, naming
    /// the field.
    pub fn from_json(value: &Value) -> Result<KeyLimits, LimitsError> {
        if let Value::Object(fields) = value {
            if let Some(field) = fields
                .keys()
                .find(|name| !KEY_LIMIT_FIELDS.contains(&name.as_str()))
            {
                return Err(LimitsError::UnknownKeyField {
                    field: field.clone(),
                });
            }
        }
        let limits = Limits::unlimited().with_overrides(value)?;
        Ok(KeyLimits {
            rate: limits.rate,
            monthly_requests: limits.monthly_requests,
            monthly_tokens: limits.monthly_tokens,
            monthly_cost_nanos: limits.monthly_cost_nanos,
        })
    }

    /// The JSON [`KeyLimits::from_json`] reads, with only the limits set:
    /// what the admin API shows and the store keeps.
    pub fn to_json(&self) -> Value {
        let mut fields = serde_json::Map::new();
        if let Some(rate) = self.rate {
            fields.insert("rate".into(), Value::String(rate.to_string()));
        }
        if let Some(n) = self.monthly_requests {
            fields.insert("monthly_requests".into(), n.into());
        }
        if let Some(n) = self.monthly_tokens {
            fields.insert("monthly_tokens".into(), n.into());
        }
        if let Some(nanos) = self.monthly_cost_nanos {
            fields.insert("monthly_cost_usd".into(), Value::String(format_usd(nanos)));
        }
        Value::Object(fields)
    }

    /// As the limiter checks them: overage always blocks.
    pub(crate) fn as_limits(&self) -> Limits {
        Limits {
            rate: self.rate,
            monthly_requests: self.monthly_requests,
            monthly_tokens: self.monthly_tokens,
            monthly_cost_nanos: self.monthly_cost_nanos,
            ..Limits::unlimited()
        }
    }
}

fn invalid(field: &'static str) -> impl Fn(Problem) -> LimitsError {
    move |problem| LimitsError::Invalid {
        field,
        problem: problem.to_string(),
    }
}

fn nullable<T>(
    value: &Value,
    parse: impl Fn(&Value) -> Result<T, Problem>,
) -> Result<Option<T>, Problem> {
    match value {
        Value::Null => Ok(None),
        value => parse(value).map(Some),
    }
}

fn count(value: &Value) -> Result<u64, Problem> {
    value
        .as_u64()
        .ok_or_else(|| type_problem("a non-negative integer or null", value))
}

/// A USD amount from a JSON number or decimal string, exactly: a number is
/// read through its shortest decimal text (`0.1` stays `0.1`), never
/// through binary floating point arithmetic.
fn usd(value: &Value) -> Result<i64, Problem> {
    match value {
        Value::Number(number) => Ok(parse_usd_to_nanos(&number.to_string())?),
        Value::String(text) => Ok(parse_usd_to_nanos(text)?),
        other => Err(type_problem(
            "a USD amount (number or decimal string)",
            other,
        )),
    }
}

fn type_problem(expected: &'static str, found: &Value) -> Problem {
    Problem::Type {
        expected,
        found: describe(found),
    }
}

/// The offending value as JSON text, cut short so an error stays readable.
fn describe(value: &Value) -> String {
    const MAX: usize = 40;
    let text = value.to_string();
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pro() -> Limits {
        Limits {
            rate: Some(Rate {
                count: 600,
                per: Duration::from_secs(60),
            }),
            monthly_requests: Some(100_000),
            monthly_tokens: Some(50_000_000),
            monthly_cost_nanos: Some(500_000_000_000),
            overage: Overage::Bill,
            overage_price_nanos: 1_000_000,
            alerts: Alerts::none(),
        }
    }

    #[test]
    fn parse_rate_accepts_the_three_units() {
        assert_eq!(
            "60/min".parse::<Rate>(),
            Ok(Rate {
                count: 60,
                per: Duration::from_secs(60)
            })
        );
        assert_eq!(
            " 10/s ".parse::<Rate>(),
            Ok(Rate {
                count: 10,
                per: Duration::from_secs(1)
            })
        );
        assert_eq!(
            "5/h".parse::<Rate>(),
            Ok(Rate {
                count: 5,
                per: Duration::from_secs(3600)
            })
        );
        for text in ["60/min", "1/s", "1000000000/h"] {
            assert_eq!(text.parse::<Rate>().unwrap().to_string(), text);
        }
    }

    #[test]
    fn parse_rate_refuses_with_reasons() {
        assert_eq!(
            "60".parse::<Rate>().unwrap_err().to_string(),
            "expected N/s, N/min or N/h (e.g. \"60/min\"), found \"60\""
        );
        assert_eq!(
            "/min".parse::<Rate>().unwrap_err(),
            RateError::Format {
                found: "/min".into()
            }
        );
        assert_eq!(
            "0/s".parse::<Rate>().unwrap_err().to_string(),
            "the count must be a whole number from 1 to 1000000000, found \"0\""
        );
        for count in [
            "1.5",
            "-3",
            "+3",
            "99999999999999999999",
            "1000000001",
            "3 ",
        ] {
            assert!(
                matches!(
                    format!("{count}/s").parse::<Rate>(),
                    Err(RateError::Count { .. })
                ),
                "{count}"
            );
        }
        assert_eq!(
            "60/minute".parse::<Rate>().unwrap_err().to_string(),
            "unknown unit \"minute\": use s, min or h"
        );
        assert!(matches!("6/d".parse::<Rate>(), Err(RateError::Unit { .. })));
        assert!(matches!(
            "6/s/s".parse::<Rate>(),
            Err(RateError::Unit { .. })
        ));
    }

    #[test]
    fn empty_overrides_change_nothing() {
        assert_eq!(pro().with_overrides(&json!({})), Ok(pro()));
    }

    #[test]
    fn each_override_field_applies() {
        let limits = Limits::unlimited()
            .with_overrides(&json!({
                "rate": "10/s",
                "monthly_requests": 1000,
                "monthly_tokens": 0,
                "monthly_cost_usd": 0.1,
                "overage": "bill",
                "overage_price_per_request_usd": "0.001",
            }))
            .unwrap();
        assert_eq!(
            limits,
            Limits {
                rate: Some(Rate {
                    count: 10,
                    per: Duration::from_secs(1)
                }),
                monthly_requests: Some(1000),
                monthly_tokens: Some(0),
                monthly_cost_nanos: Some(100_000_000),
                overage: Overage::Bill,
                overage_price_nanos: 1_000_000,
                alerts: Alerts::none(),
            }
        );
        let limits = pro()
            .with_overrides(&json!({
                "monthly_cost_usd": "12.345678901",
                "overage": "block",
                "overage_price_per_request_usd": 1e-7,
            }))
            .unwrap();
        assert_eq!(limits.monthly_cost_nanos, Some(12_345_678_901));
        assert_eq!(limits.overage, Overage::Block);
        assert_eq!(limits.overage_price_nanos, 100);
        assert_eq!(limits.rate, pro().rate, "untouched fields stay");
        assert_eq!(
            pro()
                .with_overrides(&json!({"monthly_cost_usd": 500}))
                .unwrap()
                .monthly_cost_nanos,
            Some(500_000_000_000)
        );
    }

    #[test]
    fn null_removes_a_limit() {
        let limits = pro()
            .with_overrides(&json!({
                "rate": null,
                "monthly_requests": null,
                "monthly_tokens": null,
                "monthly_cost_usd": null,
            }))
            .unwrap();
        assert_eq!(
            limits,
            Limits {
                overage: Overage::Bill,
                overage_price_nanos: 1_000_000,
                ..Limits::unlimited()
            }
        );
    }

    #[test]
    fn bad_overrides_name_the_field() {
        let cases = [
            (
                json!({"rate": "60/minute"}),
                "rate",
                "invalid rate: unknown unit \"minute\": use s, min or h",
            ),
            (
                json!({"rate": 60}),
                "rate",
                "invalid rate: expected a rate like \"60/min\" (N/s, N/min or N/h) or null, found 60",
            ),
            (
                json!({"monthly_requests": -1}),
                "monthly_requests",
                "invalid monthly_requests: expected a non-negative integer or null, found -1",
            ),
            (
                json!({"monthly_requests": 1.5}),
                "monthly_requests",
                "invalid monthly_requests: expected a non-negative integer or null, found 1.5",
            ),
            (
                json!({"monthly_tokens": "10"}),
                "monthly_tokens",
                "invalid monthly_tokens: expected a non-negative integer or null, found \"10\"",
            ),
            (
                json!({"monthly_cost_usd": "-1"}),
                "monthly_cost_usd",
                "invalid monthly_cost_usd: the cost is negative",
            ),
            (
                json!({"monthly_cost_usd": "ten"}),
                "monthly_cost_usd",
                "invalid monthly_cost_usd: the cost is not a decimal number: unexpected 't' at byte 0",
            ),
            (
                json!({"monthly_cost_usd": true}),
                "monthly_cost_usd",
                "invalid monthly_cost_usd: expected a USD amount (number or decimal string), found true",
            ),
            (
                json!({"overage": "stop"}),
                "overage",
                "invalid overage: expected \"block\" or \"bill\", found \"stop\"",
            ),
            (
                json!({"overage": null}),
                "overage",
                "invalid overage: expected \"block\" or \"bill\", found null",
            ),
            (
                json!({"overage_price_per_request_usd": null}),
                "overage_price_per_request_usd",
                "invalid overage_price_per_request_usd: expected a USD amount (number or decimal string), found null",
            ),
            (
                json!({"monthly_request": 5}),
                "monthly_request",
                "unknown field \"monthly_request\" in overrides (known: rate, monthly_requests, \
                 monthly_tokens, monthly_cost_usd, overage, overage_price_per_request_usd)",
            ),
            (
                json!(["rate"]),
                "overrides",
                "overrides must be a JSON object, found [\"rate\"]",
            ),
        ];
        for (overrides, field, message) in cases {
            let error = pro().with_overrides(&overrides).unwrap_err();
            assert_eq!(error.field(), field, "{overrides}");
            assert_eq!(error.to_string(), message, "{overrides}");
        }
        let long = pro()
            .with_overrides(&json!({"monthly_tokens": vec!["y"; 50]}))
            .unwrap_err();
        assert!(long.to_string().ends_with("…"), "{long}");
    }
}
