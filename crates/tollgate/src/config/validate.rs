//! From [`RawConfig`] to [`Config`]: `${VAR}` substitution, parsing of every
//! string value and every cross-field rule (unique names and prefixes).
//!
//! Each check reports the key path and the span of the value it rejects.
//! Paths are built here by hand in the same notation `serde_path_to_error`
//! produces for deserialization errors (`routes[1].timeout`), with keys that
//! are not bare TOML keys quoted (`pricing."gpt-4.1".input`).

use std::collections::BTreeMap;
use std::fmt::{Display, Write as _};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use http::uri::Scheme;
use http::{HeaderName, HeaderValue, Uri};
use serde_spanned::Spanned;
use tollgate_metering::limits::MAX_ALERTS;
use tollgate_proxy::{read_certificates, read_private_key, ClientIdentity, TlsError, UpstreamTls};

use super::defaults;
use super::error::{ConfigError, Location};
use super::interpolate::{interpolate, InterpolateError};
use super::raw::{
    RawAdmin, RawConfig, RawDatabase, RawKeys, RawPrice, RawRoute, RawServer, RawTier, RawTls,
    RawUsage, RawUsd, RawWebhook, Str,
};
use super::units;
use super::{
    AdminConfig, Alerts, Config, DatabaseConfig, EventType, KeysConfig, ModelPrice, Overage, Rate,
    RouteConfig, RouteTls, ServerConfig, SpoolFullPolicy, TierConfig, TlsConfig, UsageConfig,
    UsageFormat, WebhookConfig,
};

/// Serde's span wrapper addresses its parts as map keys with this prefix;
/// they are plumbing, not config keys, and are left out of key paths.
/// Bounds of `server.max_header_bytes`.
const MIN_HEADER_BYTES: u64 = units::KIB;
const MAX_HEADER_BYTES: u64 = 16 * units::MIB;
const MAX_WORKER_THREADS: usize = 1024;
const MAX_BATCH_SIZE: usize = 100_000;

const SPANNED_KEY_PREFIX: &str = "$__serde_spanned_private_";

/// Hop-by-hop headers (RFC 9110 §7.6.1) and `content-length`: the proxy
/// manages these per connection and per body, so a configured value would be
/// removed or, worse, contradict the body actually sent.
const UNSETTABLE_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

pub(super) fn parse(
    text: &str,
    origin: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let validator = Validator { text, origin, env };
    let deserializer =
        toml::de::Deserializer::parse(text).map_err(|error| validator.syntax(&error))?;
    let raw: RawConfig = serde_path_to_error::deserialize(deserializer)
        .map_err(|error| validator.deserialize(error))?;
    validator.config(raw)
}

/// Appends `key` to a dotted path, quoting it when it is not a bare TOML key.
fn push_key(path: &mut String, key: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        path.push_str(key);
    } else {
        // Debug quoting escapes `"` and `\` the way a TOML basic string does.
        let _ = write!(path, "{key:?}");
    }
}

fn child(parent: &str, key: &str) -> String {
    let mut path = parent.to_owned();
    push_key(&mut path, key);
    path
}

fn render_serde_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => {
                let _ = write!(out, "[{index}]");
            }
            Segment::Map { key } if key.starts_with(SPANNED_KEY_PREFIX) => {}
            Segment::Map { key } => push_key(&mut out, key),
            Segment::Enum { variant } => push_key(&mut out, variant),
            Segment::Unknown => push_key(&mut out, "?"),
        }
    }
    out
}

/// 1 to 64 characters of `[A-Za-z0-9._-]`: route and tier names end up in
/// metric labels, JSON, and comma-separated CLI lists.
fn is_identifier(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn parse_socket_addr(value: &str) -> Result<SocketAddr, String> {
    value.parse().map_err(|_| {
        format!(
            "invalid socket address {value:?} (expected IP:port, e.g. \"127.0.0.1:8080\" or \"[::]:8080\")"
        )
    })
}

/// Checks one config document: its text and origin (for locations in
/// errors) and the environment `${VAR}` reads.
struct Validator<'a> {
    text: &'a str,
    origin: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Validator<'_> {
    fn location(&self, span: Option<Range<usize>>) -> Option<Location> {
        span.map(|span| Location::of_offset(self.text, span.start))
    }

    fn syntax(&self, error: &toml::de::Error) -> ConfigError {
        ConfigError::Syntax {
            origin: self.origin.to_owned(),
            location: self.location(error.span()),
            message: error.message().trim_end().to_owned(),
        }
    }

    fn deserialize(&self, error: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
        let key_path = render_serde_path(error.path());
        let error = error.into_inner();
        ConfigError::Invalid {
            origin: self.origin.to_owned(),
            location: self.location(error.span()),
            key_path,
            message: error.message().trim_end().to_owned(),
        }
    }

    fn invalid(&self, span: Range<usize>, key_path: &str, message: impl Display) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_owned(),
            location: self.location(Some(span)),
            key_path: key_path.to_owned(),
            message: message.to_string(),
        }
    }

    /// The value with `${VAR}` substituted.
    fn string(&self, value: &Str, path: &str) -> Result<String, ConfigError> {
        interpolate(value.get_ref(), self.env).map_err(|error| match error {
            InterpolateError::Missing(var) => ConfigError::MissingEnvVar {
                origin: self.origin.to_owned(),
                location: self.location(Some(value.span())),
                key_path: path.to_owned(),
                var,
            },
            other => self.invalid(value.span(), path, other),
        })
    }

    /// The value, substituted, then run through `parse`.
    fn parsed<T, E: Display>(
        &self,
        value: &Str,
        path: &str,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Result<T, ConfigError> {
        let text = self.string(value, path)?;
        parse(&text).map_err(|error| self.invalid(value.span(), path, error))
    }

    /// Like [`Validator::parsed`] for an optional key, with its default.
    fn parsed_or<T, E: Display>(
        &self,
        value: Option<&Str>,
        path: &str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Result<T, ConfigError> {
        match value {
            Some(value) => self.parsed(value, path, parse),
            None => Ok(default),
        }
    }

    fn non_empty_path(&self, value: &Str, path: &str) -> Result<PathBuf, ConfigError> {
        self.parsed(value, path, |text| {
            if text.is_empty() {
                Err("must not be empty")
            } else {
                Ok(PathBuf::from(text))
            }
        })
    }

    fn header_name(&self, value: &Str, path: &str) -> Result<HeaderName, ConfigError> {
        // `from_bytes` lowercases, so `"X-Cost-USD"` is accepted as `x-cost-usd`.
        self.parsed(value, path, |text| {
            HeaderName::from_bytes(text.as_bytes())
                .map_err(|_| format!("invalid header name {text:?}"))
        })
    }

    fn optional_header_name(
        &self,
        value: Option<&Str>,
        path: &str,
    ) -> Result<Option<HeaderName>, ConfigError> {
        value.map(|value| self.header_name(value, path)).transpose()
    }

    fn usd(&self, value: &Spanned<RawUsd>, path: &str) -> Result<i64, ConfigError> {
        let nanos = match *value.get_ref() {
            RawUsd::Integer(usd) => units::usd_int_to_nanos(usd),
            RawUsd::Float(usd) => units::usd_to_nanos(usd),
        };
        nanos.map_err(|error| self.invalid(value.span(), path, error))
    }

    fn optional_usd(
        &self,
        value: Option<&Spanned<RawUsd>>,
        path: &str,
    ) -> Result<Option<i64>, ConfigError> {
        value.map(|value| self.usd(value, path)).transpose()
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        Ok(Config {
            server: self.server(raw.server)?,
            admin: self.admin(raw.admin)?,
            database: self.database(raw.database)?,
            keys: self.keys(raw.keys)?,
            usage: self.usage(raw.usage)?,
            tiers: self.tiers(raw.tiers)?,
            routes: self.routes(raw.routes)?,
            webhooks: self.webhooks(raw.webhooks)?,
            pricing: self.pricing(raw.pricing)?,
            source: None,
        })
    }

    fn server(&self, raw: RawServer) -> Result<ServerConfig, ConfigError> {
        let (listen, admin_listen) = self.listen_addresses(&raw)?;
        Ok(ServerConfig {
            listen,
            admin_listen,
            tls: self.tls_paths(raw.tls.as_ref(), "server.tls")?,
            max_request_body: self.parsed_or(
                raw.max_request_body.as_ref(),
                "server.max_request_body",
                defaults::MAX_REQUEST_BODY,
                units::parse_size,
            )?,
            request_header_timeout: self.positive_duration(
                raw.request_header_timeout.as_ref(),
                "server.request_header_timeout",
                defaults::REQUEST_HEADER_TIMEOUT,
            )?,
            idle_timeout: self.positive_duration(
                raw.idle_timeout.as_ref(),
                "server.idle_timeout",
                defaults::IDLE_TIMEOUT,
            )?,
            request_body_timeout: self.positive_duration(
                raw.request_body_timeout.as_ref(),
                "server.request_body_timeout",
                defaults::REQUEST_BODY_TIMEOUT,
            )?,
            max_connections: match raw.max_connections {
                Some(value) if *value.get_ref() == 0 => {
                    return Err(self.invalid(
                        value.span(),
                        "server.max_connections",
                        "must be at least 1",
                    ))
                }
                Some(value) => value.into_inner(),
                None => defaults::MAX_CONNECTIONS,
            },
            max_header_bytes: self.parsed_or(
                raw.max_header_bytes.as_ref(),
                "server.max_header_bytes",
                defaults::MAX_HEADER_BYTES,
                |text| match units::parse_size(text) {
                    // Below a request line and a Host header nothing could
                    // be served; above 16 MiB a head is an attack, not a
                    // request.
                    Ok(size) if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&size) => {
                        Err(format!("size {text:?} must be between 1KiB and 16MiB"))
                    }
                    Ok(size) => Ok(size),
                    Err(error) => Err(error.to_string()),
                },
            )?,
            worker_threads: match raw.worker_threads {
                // Each is an OS thread: beyond this, a typo, not a machine.
                Some(value) if *value.get_ref() > MAX_WORKER_THREADS => {
                    return Err(self.invalid(
                        value.span(),
                        "server.worker_threads",
                        format!("must be at most {MAX_WORKER_THREADS} (0: one per core)"),
                    ))
                }
                Some(value) => value.into_inner(),
                None => defaults::WORKER_THREADS,
            },
            instance_id: self.instance_id(raw.instance_id.as_ref())?,
            access_log: raw.access_log.unwrap_or(false),
        })
    }

    /// `server.listen` and `server.admin_listen`, which must differ.
    fn listen_addresses(&self, raw: &RawServer) -> Result<(SocketAddr, SocketAddr), ConfigError> {
        let listen = self.parsed_or(
            raw.listen.as_ref(),
            "server.listen",
            defaults::LISTEN,
            parse_socket_addr,
        )?;
        let admin_listen = self.parsed_or(
            raw.admin_listen.as_ref(),
            "server.admin_listen",
            defaults::ADMIN_LISTEN,
            parse_socket_addr,
        )?;
        // Port 0 (tests) binds two different ephemeral ports, so only a fixed
        // port can clash. Caught here because a bind error at start-up would
        // not say which key to fix.
        if listen == admin_listen && listen.port() != 0 {
            // The two defaults differ, so at least one of the keys was written.
            let written = (raw
                .admin_listen
                .as_ref()
                .map(|value| (value, "server.admin_listen")))
            .or_else(|| raw.listen.as_ref().map(|value| (value, "server.listen")));
            if let Some((value, path)) = written {
                return Err(self.invalid(
                    value.span(),
                    path,
                    format!("server.listen and server.admin_listen are both {listen}"),
                ));
            }
        }
        Ok((listen, admin_listen))
    }

    fn instance_id(&self, raw: Option<&Str>) -> Result<String, ConfigError> {
        let Some(value) = raw else {
            return Ok(defaults::instance_id());
        };
        self.parsed(value, "server.instance_id", |text| {
            if text.is_empty() {
                Err("must not be empty".to_owned())
            } else if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
                Err(format!(
                    "invalid instance id {text:?} (must not contain whitespace or control characters)"
                ))
            } else {
                Ok(text.to_owned())
            }
        })
    }

    /// A `{ cert, key }` table's two paths (files not read).
    fn tls_paths(
        &self,
        raw: Option<&RawTls>,
        path: &str,
    ) -> Result<Option<TlsConfig>, ConfigError> {
        raw.map(|tls| {
            Ok(TlsConfig {
                cert: self.non_empty_path(&tls.cert, &child(path, "cert"))?,
                key: self.non_empty_path(&tls.key, &child(path, "key"))?,
            })
        })
        .transpose()
    }

    /// A duration that must not be zero: a zero timeout or interval would
    /// either fail everything at once or spin.
    fn positive_duration(
        &self,
        value: Option<&Str>,
        path: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        self.parsed_or(value, path, default, |text| {
            match units::parse_duration(text) {
                Ok(duration) if duration.is_zero() => {
                    Err(format!("duration {text:?} must be greater than zero"))
                }
                Ok(duration) => Ok(duration),
                Err(error) => Err(error.to_string()),
            }
        })
    }

    fn admin(&self, raw: RawAdmin) -> Result<AdminConfig, ConfigError> {
        let tokens = raw
            .tokens
            .iter()
            .enumerate()
            .map(|(index, token)| {
                // The token itself is never put in a message: it is a secret.
                self.parsed(token, &format!("admin.tokens[{index}]"), |text| {
                    if text.is_empty() {
                        Err("admin token must not be empty")
                    } else if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
                        Err("admin token must not contain whitespace or control characters")
                    } else {
                        Ok(text.to_owned())
                    }
                })
            })
            .collect::<Result<_, _>>()?;
        let tls = self.tls_paths(raw.tls.as_ref(), "admin.tls")?;
        let session_ttl = self.positive_duration(
            raw.session_ttl.as_ref(),
            "admin.session_ttl",
            defaults::SESSION_TTL,
        )?;
        Ok(AdminConfig {
            tokens,
            tls,
            session_ttl,
        })
    }

    fn database(&self, raw: RawDatabase) -> Result<DatabaseConfig, ConfigError> {
        let url = match &raw.url {
            // The URL is not quoted in messages: it may hold a password.
            Some(value) => self.parsed(value, "database.url", |text| {
                let rest = ["sqlite://", "postgres://", "postgresql://"]
                    .iter()
                    .find_map(|scheme| text.strip_prefix(scheme));
                match rest {
                    None => Err(
                        "database URL must start with \"sqlite://\", \"postgres://\" or \"postgresql://\"",
                    ),
                    Some("") => Err("database URL names no database after the scheme"),
                    Some(_) => Ok(text.to_owned()),
                }
            })?,
            None => defaults::DATABASE_URL.to_owned(),
        };
        let pool_size = match raw.pool_size {
            Some(value) if *value.get_ref() == 0 => {
                return Err(self.invalid(value.span(), "database.pool_size", "must be at least 1"))
            }
            Some(value) => value.into_inner(),
            None => defaults::POOL_SIZE,
        };
        Ok(DatabaseConfig {
            url,
            pool_size,
            migrate: raw.migrate.unwrap_or(defaults::MIGRATE),
        })
    }

    fn keys(&self, raw: RawKeys) -> Result<KeysConfig, ConfigError> {
        let prefix = self.parsed_or(
            raw.prefix.as_ref(),
            "keys.prefix",
            defaults::KEY_PREFIX.to_owned(),
            |text| {
                let valid = (1..=16).contains(&text.len())
                    && text
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
                if valid {
                    Ok(text.to_owned())
                } else {
                    Err(format!(
                        "invalid key prefix {text:?} (expected 1 to 16 characters of a-z and 0-9)"
                    ))
                }
            },
        )?;
        let headers = match raw.headers {
            Some(list) => {
                if list.get_ref().is_empty() {
                    return Err(self.invalid(
                        list.span(),
                        "keys.headers",
                        "at least one header is needed, or no client could present a key",
                    ));
                }
                let mut headers: Vec<HeaderName> = Vec::with_capacity(list.get_ref().len());
                for (index, value) in list.get_ref().iter().enumerate() {
                    let path = format!("keys.headers[{index}]");
                    let name = self.header_name(value, &path)?;
                    if headers.contains(&name) {
                        return Err(self.invalid(
                            value.span(),
                            &path,
                            format!("duplicate header {:?}", name.as_str()),
                        ));
                    }
                    headers.push(name);
                }
                headers
            }
            None => KeysConfig::default().headers,
        };
        Ok(KeysConfig { prefix, headers })
    }

    fn usage(&self, raw: RawUsage) -> Result<UsageConfig, ConfigError> {
        let batch_size = match raw.batch_size {
            Some(value) if *value.get_ref() == 0 => {
                return Err(self.invalid(value.span(), "usage.batch_size", "must be at least 1"))
            }
            // The rows waiting for the spool are bounded at sixteen batches:
            // a batch of millions would leave them unbounded in practice.
            Some(value) if *value.get_ref() > MAX_BATCH_SIZE => {
                return Err(self.invalid(
                    value.span(),
                    "usage.batch_size",
                    format!("must be at most {MAX_BATCH_SIZE}"),
                ))
            }
            Some(value) => value.into_inner(),
            None => defaults::BATCH_SIZE,
        };
        Ok(UsageConfig {
            flush_interval: self.positive_duration(
                raw.flush_interval.as_ref(),
                "usage.flush_interval",
                defaults::FLUSH_INTERVAL,
            )?,
            batch_size,
            spool_dir: match &raw.spool_dir {
                Some(value) => self.non_empty_path(value, "usage.spool_dir")?,
                None => PathBuf::from(defaults::SPOOL_DIR),
            },
            spool_max: self.parsed_or(
                raw.spool_max.as_ref(),
                "usage.spool_max",
                defaults::SPOOL_MAX,
                units::parse_size,
            )?,
            on_spool_full: self.parsed_or(
                raw.on_spool_full.as_ref(),
                "usage.on_spool_full",
                defaults::ON_SPOOL_FULL,
                |text| match text {
                    "reject" => Ok(SpoolFullPolicy::Reject),
                    "serve" => Ok(SpoolFullPolicy::Serve),
                    _ => Err(format!(
                        "unknown policy {text:?} (expected \"reject\" or \"serve\")"
                    )),
                },
            )?,
            sync_interval: self.positive_duration(
                raw.sync_interval.as_ref(),
                "usage.sync_interval",
                defaults::SYNC_INTERVAL,
            )?,
        })
    }

    /// A route or tier name, checked for form and uniqueness against `seen`
    /// (name -> line of its first definition).
    fn unique_name(
        &self,
        value: &Str,
        path: &str,
        kind: &str,
        seen: &mut BTreeMap<String, usize>,
    ) -> Result<String, ConfigError> {
        let name = self.parsed(value, path, |text| {
            if is_identifier(text) {
                Ok(text.to_owned())
            } else {
                Err(format!(
                    "invalid {kind} name {text:?} (expected 1 to 64 characters of A-Z, a-z, 0-9, \".\", \"_\" and \"-\")"
                ))
            }
        })?;
        let line = Location::of_offset(self.text, value.span().start).line;
        if let Some(first) = seen.insert(name.clone(), line) {
            return Err(self.invalid(
                value.span(),
                path,
                format!("duplicate {kind} name {name:?} (first defined on line {first})"),
            ));
        }
        Ok(name)
    }

    fn tiers(&self, raw: Vec<RawTier>) -> Result<Vec<TierConfig>, ConfigError> {
        let mut seen = BTreeMap::new();
        raw.iter()
            .enumerate()
            .map(|(index, tier)| {
                let at = |key: &str| format!("tiers[{index}].{key}");
                let overage = self.parsed_or(
                    tier.overage.as_ref(),
                    &at("overage"),
                    defaults::TIER_OVERAGE,
                    |text| match text {
                        "block" => Ok(Overage::Block),
                        "bill" => Ok(Overage::Bill),
                        _ => Err(format!(
                            "unknown overage {text:?} (expected \"block\" or \"bill\")"
                        )),
                    },
                )?;
                Ok(TierConfig {
                    name: self.unique_name(&tier.name, &at("name"), "tier", &mut seen)?,
                    rate: tier
                        .rate
                        .as_ref()
                        .map(|value| {
                            self.parsed(value, &at("rate"), |text| {
                                units::parse_rate(text).map(|(count, per)| Rate { count, per })
                            })
                        })
                        .transpose()?,
                    monthly_requests: tier.monthly_requests,
                    monthly_tokens: tier.monthly_tokens,
                    monthly_cost_nanos: self
                        .optional_usd(tier.monthly_cost_usd.as_ref(), &at("monthly_cost_usd"))?,
                    overage,
                    overage_price_per_request_nanos: self.optional_usd(
                        tier.overage_price_per_request_usd.as_ref(),
                        &at("overage_price_per_request_usd"),
                    )?,
                    alerts: self.alerts(tier.alerts.as_ref(), &at("alerts"))?,
                })
            })
            .collect()
    }

    /// A tier's `alerts`: fractions in (0, 1], ascending, at most
    /// [`MAX_ALERTS`], each read to a millionth.
    fn alerts(&self, raw: Option<&Spanned<Vec<f64>>>, path: &str) -> Result<Alerts, ConfigError> {
        let Some(raw) = raw else {
            return Ok(Alerts::none());
        };
        let invalid = |message: String| self.invalid(raw.span(), path, message);
        if raw.get_ref().len() > MAX_ALERTS {
            return Err(invalid(format!("at most {MAX_ALERTS} alert fractions")));
        }
        let mut millionths = Vec::with_capacity(raw.get_ref().len());
        for &fraction in raw.get_ref() {
            if !(fraction > 0.0 && fraction <= 1.0) {
                return Err(invalid(format!(
                    "alert fraction {fraction} must be above 0 and at most 1 (e.g. 0.8 for 80 %)"
                )));
            }
            // In (0, 1] the product is at most 1e6: the cast cannot truncate.
            let part = (fraction * 1e6).round().max(1.0) as u32;
            if millionths.last().is_some_and(|&last| last >= part) {
                return Err(invalid(
                    "alert fractions must be in ascending order, each once".to_owned(),
                ));
            }
            millionths.push(part);
        }
        Alerts::from_millionths(millionths)
            .ok_or_else(|| invalid("alert fractions must ascend within (0, 1]".to_owned()))
    }

    fn webhooks(&self, raw: Vec<RawWebhook>) -> Result<Vec<WebhookConfig>, ConfigError> {
        let mut urls = BTreeMap::new();
        let mut webhooks = Vec::with_capacity(raw.len());
        for (index, hook) in raw.iter().enumerate() {
            let at = |key: &str| format!("webhooks[{index}].{key}");
            let url = self.parsed(&hook.url, &at("url"), |text| {
                // The URL is not put in a message: many carry a secret
                // in their path or query (Slack's, say).
                let uri: Uri = text
                    .parse()
                    .map_err(|error| format!("invalid webhook URL: {error}"))?;
                match (uri.scheme_str(), uri.host()) {
                    (Some("http" | "https"), Some(_)) => Ok(text.to_owned()),
                    _ => {
                        Err("a webhook URL must be an absolute http:// or https:// URL".to_owned())
                    }
                }
            })?;
            if let Some(first) = urls.insert(url.clone(), index) {
                return Err(self.invalid(
                    hook.url.span(),
                    &at("url"),
                    format!("the same URL as webhooks[{first}].url"),
                ));
            }
            // The secret is never put in a message.
            let secret = self.parsed(&hook.secret, &at("secret"), |text| {
                let key = text.strip_prefix("whsec_").ok_or(
                    "a webhook secret starts with \"whsec_\" followed by base64 (as Standard Webhooks secrets do)",
                )?;
                match base64::engine::general_purpose::STANDARD.decode(key) {
                    Ok(bytes) if bytes.len() >= 16 => Ok(text.to_owned()),
                    Ok(_) => Err("a webhook secret's key must be at least 16 bytes (24 base64 characters)"),
                    Err(_) => Err("the part of a webhook secret after \"whsec_\" must be base64"),
                }
            })?;
            let events = match &hook.events {
                None => EventType::ALL.to_vec(),
                Some(names) => {
                    let mut events: Vec<EventType> = Vec::with_capacity(names.len());
                    for (n, name) in names.iter().enumerate() {
                        let event =
                            self.parsed(name, &format!("webhooks[{index}].events[{n}]"), |text| {
                                EventType::parse(text).ok_or_else(|| {
                                    format!(
                                        "unknown event {text:?} (known: {})",
                                        EventType::ALL.map(EventType::as_str).join(", ")
                                    )
                                })
                            })?;
                        if !events.contains(&event) {
                            events.push(event);
                        }
                    }
                    events
                }
            };
            webhooks.push(WebhookConfig {
                url,
                secret,
                events,
            });
        }
        Ok(webhooks)
    }

    fn routes(&self, raw: Vec<RawRoute>) -> Result<Vec<RouteConfig>, ConfigError> {
        let mut names = BTreeMap::new();
        // prefix -> name of the route that has it
        let mut prefixes: BTreeMap<String, String> = BTreeMap::new();
        let mut routes = Vec::with_capacity(raw.len());
        for (index, route) in raw.iter().enumerate() {
            let at = |key: &str| format!("routes[{index}].{key}");
            let name = self.unique_name(&route.name, &at("name"), "route", &mut names)?;

            let prefix = self.parsed(&route.prefix, &at("prefix"), |text| {
                if !text.starts_with('/') {
                    Err(format!("route prefix {text:?} must start with \"/\""))
                } else if text
                    .chars()
                    .any(|c| matches!(c, '?' | '#') || c.is_whitespace() || c.is_control())
                {
                    Err(format!(
                        "route prefix {text:?} must not contain \"?\", \"#\", whitespace or control characters"
                    ))
                } else {
                    Ok(text.to_owned())
                }
            })?;
            if let Some(other) = prefixes.insert(prefix.clone(), name.clone()) {
                return Err(self.invalid(
                    route.prefix.span(),
                    &at("prefix"),
                    format!("duplicate route prefix {prefix:?} (also used by route {other:?})"),
                ));
            }

            let usage = self.parsed_or(
                route.usage.as_ref(),
                &at("usage"),
                defaults::ROUTE_USAGE,
                |text| match text {
                    "none" => Ok(UsageFormat::None),
                    "openai" => Ok(UsageFormat::Openai),
                    "anthropic" => Ok(UsageFormat::Anthropic),
                    _ => Err(format!(
                        "unknown usage format {text:?} (expected \"openai\", \"anthropic\" or \"none\")"
                    )),
                },
            )?;

            let strip_response_headers = route
                .strip_response_headers
                .iter()
                .enumerate()
                .map(|(i, value)| {
                    self.header_name(
                        value,
                        &format!("routes[{index}].strip_response_headers[{i}]"),
                    )
                })
                .collect::<Result<_, _>>()?;

            let upstream = self.parsed(&route.upstream, &at("upstream"), parse_upstream)?;
            let tls = self.route_tls(route, &upstream, &at)?;
            routes.push(RouteConfig {
                upstream,
                strip_prefix: route.strip_prefix.unwrap_or(defaults::ROUTE_STRIP_PREFIX),
                usage,
                cost_header: self
                    .optional_header_name(route.cost_header.as_ref(), &at("cost_header"))?,
                input_tokens_header: self.optional_header_name(
                    route.input_tokens_header.as_ref(),
                    &at("input_tokens_header"),
                )?,
                output_tokens_header: self.optional_header_name(
                    route.output_tokens_header.as_ref(),
                    &at("output_tokens_header"),
                )?,
                timeout: self.positive_duration(
                    route.timeout.as_ref(),
                    &at("timeout"),
                    defaults::ROUTE_TIMEOUT,
                )?,
                strip_response_headers,
                set_headers: self.set_headers(&route.set_headers, &at("set_headers"))?,
                tls,
                name,
                prefix,
            });
        }
        Ok(routes)
    }

    /// A route's `ca_file` and `client_cert`, with their files read and
    /// checked. Each failure points at the key whose file is at fault.
    fn route_tls(
        &self,
        route: &RawRoute,
        upstream: &Uri,
        at: &dyn Fn(&str) -> String,
    ) -> Result<Option<RouteTls>, ConfigError> {
        // The first TLS key written, for errors about the settings as a whole.
        let first = match (&route.ca_file, &route.client_cert) {
            (None, None) => return Ok(None),
            (Some(ca_file), _) => (ca_file.span(), at("ca_file")),
            (None, Some(client_cert)) => (client_cert.cert.span(), at("client_cert")),
        };
        if upstream.scheme() != Some(&Scheme::HTTPS) {
            return Err(self.invalid(
                first.0,
                &first.1,
                "ca_file and client_cert apply to https:// upstreams only; this route's upstream is http://",
            ));
        }
        let file_error = |value: &Str, path: &str| {
            let (span, path) = (value.span(), path.to_owned());
            move |error: TlsError| self.invalid(span, &path, error)
        };
        let (ca_file, roots) = match &route.ca_file {
            Some(value) => {
                let path = at("ca_file");
                let file = self.non_empty_path(value, &path)?;
                let roots = read_certificates(&file).map_err(file_error(value, &path))?;
                (Some(file), roots)
            }
            None => (None, Vec::new()),
        };
        let (client_cert, identity) = match &route.client_cert {
            Some(raw) => {
                let paths = TlsConfig {
                    cert: self.non_empty_path(&raw.cert, &at("client_cert.cert"))?,
                    key: self.non_empty_path(&raw.key, &at("client_cert.key"))?,
                };
                let chain = read_certificates(&paths.cert)
                    .map_err(file_error(&raw.cert, &at("client_cert.cert")))?;
                let key = read_private_key(&paths.key)
                    .map_err(file_error(&raw.key, &at("client_cert.key")))?;
                (Some(paths), Some(ClientIdentity { chain, key }))
            }
            None => (None, None),
        };
        let upstream = UpstreamTls::new(roots, identity).map_err(|error| {
            // A root that is no trust anchor is the CA file's fault; a key
            // rustls cannot load, or one of another certificate, the key's.
            let blame = match (&error, &route.ca_file, &route.client_cert) {
                (TlsError::TrustAnchor { .. }, Some(ca_file), _) => (ca_file.span(), at("ca_file")),
                (_, _, Some(client_cert)) => (client_cert.key.span(), at("client_cert.key")),
                _ => first.clone(),
            };
            self.invalid(blame.0, &blame.1, error)
        })?;
        Ok(Some(RouteTls {
            ca_file,
            client_cert,
            upstream,
        }))
    }

    fn set_headers(
        &self,
        raw: &BTreeMap<String, Str>,
        path: &str,
    ) -> Result<Vec<(HeaderName, HeaderValue)>, ConfigError> {
        // File order: what the operator reads, and the order errors should come in.
        let mut entries: Vec<(&String, &Str)> = raw.iter().collect();
        entries.sort_by_key(|(_, value)| value.span().start);
        let mut headers: Vec<(HeaderName, HeaderValue)> = Vec::with_capacity(entries.len());
        for (key, value) in entries {
            let path = child(path, key);
            // Errors about the name point at the value: its span is the one kept,
            // and it is on the same line as the name.
            let name = HeaderName::from_bytes(key.as_bytes()).map_err(|_| {
                self.invalid(value.span(), &path, format!("invalid header name {key:?}"))
            })?;
            if UNSETTABLE_HEADERS.contains(&name.as_str()) {
                return Err(self.invalid(
                    value.span(),
                    &path,
                    format!(
                        "{:?} is managed by the proxy and cannot be set on the upstream request",
                        name.as_str()
                    ),
                ));
            }
            if headers.iter().any(|(existing, _)| *existing == name) {
                return Err(self.invalid(
                    value.span(),
                    &path,
                    format!(
                        "duplicate header {:?} (header names are case-insensitive)",
                        name.as_str()
                    ),
                ));
            }
            // The value is not quoted in the message: it usually holds a credential.
            let mut header_value = self.parsed(value, &path, |text| {
                HeaderValue::from_str(text).map_err(|_| {
                    "invalid header value (control characters are not allowed, also after ${VAR} substitution)"
                })
            })?;
            header_value.set_sensitive(true);
            headers.push((name, header_value));
        }
        Ok(headers)
    }

    fn pricing(
        &self,
        raw: BTreeMap<String, Spanned<RawPrice>>,
    ) -> Result<BTreeMap<String, ModelPrice>, ConfigError> {
        // Checked in file order, so the first error reported is the first in the file.
        let mut entries: Vec<(String, Spanned<RawPrice>)> = raw.into_iter().collect();
        entries.sort_by_key(|(_, price)| price.span().start);
        let mut pricing = BTreeMap::new();
        for (model, price) in entries {
            let path = child("pricing", &model);
            if model.is_empty() {
                return Err(self.invalid(price.span(), &path, "model name must not be empty"));
            }
            let at = |key: &str| child(&path, key);
            let raw = price.get_ref();
            // Every pricing key is optional: a missing input or
            // output price is 0, a missing cache price is the input price.
            let input = self
                .optional_usd(raw.input.as_ref(), &at("input"))?
                .unwrap_or(0);
            let output = self
                .optional_usd(raw.output.as_ref(), &at("output"))?
                .unwrap_or(0);
            let cache_read = self
                .optional_usd(raw.cache_read.as_ref(), &at("cache_read"))?
                .unwrap_or(input);
            let cache_write = self
                .optional_usd(raw.cache_write.as_ref(), &at("cache_write"))?
                .unwrap_or(input);
            pricing.insert(
                model,
                ModelPrice {
                    input,
                    output,
                    cache_read,
                    cache_write,
                },
            );
        }
        Ok(pricing)
    }
}

/// An upstream base URI: absolute `http`/`https`, with a host, without user
/// info or query. The value is not quoted in messages since upstream URLs
/// sometimes carry credentials.
fn parse_upstream(text: &str) -> Result<Uri, &'static str> {
    const EXPECTED: &str =
        "upstream must be an absolute http:// or https:// URI, e.g. \"https://api.openai.com\"";
    // `Uri` would silently drop a fragment; a fragment in a base URI is a mistake.
    if text.contains('#') {
        return Err("upstream must not have a fragment (\"#...\")");
    }
    let uri: Uri = text.parse().map_err(|_| EXPECTED)?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(EXPECTED),
    }
    let Some(authority) = uri.authority() else {
        return Err(EXPECTED);
    };
    if authority.as_str().contains('@') {
        return Err("upstream must not contain user info; send credentials with set_headers");
    }
    if authority.host().is_empty() {
        return Err("upstream has no host");
    }
    if uri.query().is_some() {
        return Err("upstream must not have a query string (a base path is allowed)");
    }
    Ok(uri)
}
