//! The config file exactly as written: what serde reads before validation.
//!
//! Every struct rejects unknown keys, and every string, and every other value
//! that validation may reject, keeps its source span (`Spanned`) so that
//! validation, which happens later in `validate.rs`, can still point at the
//! line of the value it rejects. (Type errors get their span from toml itself.) Strings stay strings here
//! (durations, sizes, addresses, enums) because `${VAR}` substitution must run
//! before they are parsed.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use serde_spanned::Spanned;

pub(super) type Str = Spanned<String>;

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct RawConfig {
    pub server: RawServer,
    pub admin: RawAdmin,
    pub database: RawDatabase,
    pub keys: RawKeys,
    pub usage: RawUsage,
    pub tiers: Vec<RawTier>,
    pub routes: Vec<RawRoute>,
    pub webhooks: Vec<RawWebhook>,
    /// toml hands tables over sorted by key; validation restores file order
    /// from the spans where it matters.
    pub pricing: BTreeMap<String, Spanned<RawPrice>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct RawServer {
    pub listen: Option<Str>,
    pub admin_listen: Option<Str>,
    pub tls: Option<RawTls>,
    pub max_request_body: Option<Str>,
    pub request_header_timeout: Option<Str>,
    pub idle_timeout: Option<Str>,
    pub request_body_timeout: Option<Str>,
    pub max_connections: Option<Spanned<usize>>,
    pub max_header_bytes: Option<Str>,
    pub worker_threads: Option<Spanned<usize>>,
    pub instance_id: Option<Str>,
    pub access_log: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawTls {
    pub cert: Str,
    pub key: Str,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct RawAdmin {
    pub tokens: Vec<Str>,
    pub tls: Option<RawTls>,
    pub session_ttl: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct RawDatabase {
    pub url: Option<Str>,
    pub pool_size: Option<Spanned<usize>>,
    pub migrate: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct RawKeys {
    pub prefix: Option<Str>,
    pub headers: Option<Spanned<Vec<Str>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct RawUsage {
    pub flush_interval: Option<Str>,
    pub batch_size: Option<Spanned<usize>>,
    pub spool_dir: Option<Str>,
    pub spool_max: Option<Str>,
    pub on_spool_full: Option<Str>,
    pub sync_interval: Option<Str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawTier {
    pub name: Str,
    pub rate: Option<Str>,
    pub monthly_requests: Option<u64>,
    pub monthly_tokens: Option<u64>,
    pub monthly_cost_usd: Option<Spanned<RawUsd>>,
    pub overage: Option<Str>,
    pub overage_price_per_request_usd: Option<Spanned<RawUsd>>,
    pub alerts: Option<Spanned<Vec<f64>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawWebhook {
    pub url: Str,
    pub secret: Str,
    pub events: Option<Vec<Str>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawRoute {
    pub name: Str,
    pub prefix: Str,
    pub upstream: Str,
    pub strip_prefix: Option<bool>,
    pub usage: Option<Str>,
    pub cost_header: Option<Str>,
    pub input_tokens_header: Option<Str>,
    pub output_tokens_header: Option<Str>,
    pub timeout: Option<Str>,
    #[serde(default)]
    pub strip_response_headers: Vec<Str>,
    #[serde(default)]
    pub set_headers: BTreeMap<String, Str>,
    pub ca_file: Option<Str>,
    pub client_cert: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawPrice {
    pub input: Option<Spanned<RawUsd>>,
    pub output: Option<Spanned<RawUsd>>,
    pub cache_read: Option<Spanned<RawUsd>>,
    pub cache_write: Option<Spanned<RawUsd>>,
}

/// A USD amount as TOML allows it: an integer or a float. Kept apart so that
/// `500` is converted with integer arithmetic rather than through `f64`.
#[derive(Debug, Clone, Copy)]
pub(super) enum RawUsd {
    Integer(i64),
    Float(f64),
}

impl<'de> Deserialize<'de> for RawUsd {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct UsdVisitor;

        impl Visitor<'_> for UsdVisitor {
            type Value = RawUsd;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of USD (e.g. 0.15 or 500)")
            }

            fn visit_i64<E: de::Error>(self, value: i64) -> Result<RawUsd, E> {
                Ok(RawUsd::Integer(value))
            }

            fn visit_u64<E: de::Error>(self, value: u64) -> Result<RawUsd, E> {
                // TOML integers are i64, so this is only reached by other formats.
                i64::try_from(value)
                    .map(RawUsd::Integer)
                    .map_err(|_| E::custom(format!("amount {value} USD is too large")))
            }

            fn visit_f64<E: de::Error>(self, value: f64) -> Result<RawUsd, E> {
                Ok(RawUsd::Float(value))
            }
        }

        deserializer.deserialize_any(UsdVisitor)
    }
}
