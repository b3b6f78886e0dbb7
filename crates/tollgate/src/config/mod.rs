//! Configuration: the TOML file described in docs/CONFIGURATION.md, read and validated into [`Config`].
//!
//! Loading happens in three steps, each in its own file:
//!
//! 1. `raw.rs`: serde reads the text into structs that mirror the file and
//!    reject unknown keys. Every string keeps its source span.
//! 2. `interpolate.rs`: each string value gets `${VAR}` substituted from the
//!    environment (see that module for the exact rules, including the `$${`
//!    escape).
//! 3. `validate.rs`: each value is parsed and checked (durations, sizes,
//!    addresses, header names, money) and the typed [`Config`] is built.
//!
//! Any failure is one [`ConfigError`] naming file, line, column and key path,
//! e.g. `tollgate.toml:14:11: routes[1].timeout: invalid duration "5 parsecs"
//! (expected ...)`. Loading stops at the first error.
//!
//! Loading is all-or-nothing and has no side effects beyond reading the file,
//! the environment and the PEM files of routes' `ca_file` and `client_cert`,
//! which is what lets a reload validate a new file completely before
//! swapping it in and keep the last good config when it fails. Those PEM
//! files are read here, not when the routes are built, so that a bad one is
//! reported like any other bad value: with the line and key that name it,
//! by `check-config` and by a reload alike. (`server.tls` and `admin.tls`
//! are read when the listeners start.)
//!
//! Money is never held as `f64` past parsing: USD amounts become integer
//! nano-USD (`1e-9` USD) as they are read.
//!
//! This module must not depend on the runtime (tokio, hyper, the database):
//! `tollgate check-config` uses it alone. From the proxy crate it uses only
//! `tls`'s PEM readers and [`UpstreamTls`], which are plain rustls.

pub mod defaults;
mod error;
mod interpolate;
mod raw;
pub mod units;
mod validate;

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (STYLE.md)
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use tollgate_proxy::UpstreamTls;

pub use error::{ConfigError, Location};
// The config speaks the domain's types where they are the same idea: a
// tier's overage and rate, a route's usage format, a model's prices. Their
// config-file spellings live with them (`as_str`).
pub use tollgate_metering::limits::{Alerts, Overage, Rate};
pub use tollgate_metering::usage::ModelPrice;
pub use tollgate_metering::usage::UsageFormat;
pub use tollgate_metering::webhooks::EventType;

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub database: DatabaseConfig,
    pub keys: KeysConfig,
    pub usage: UsageConfig,
    /// In file order; names are unique.
    pub tiers: Vec<TierConfig>,
    /// In file order; names and prefixes are unique. Longest-prefix matching
    /// is the router's job, not this order.
    pub routes: Vec<RouteConfig>,
    /// `[[webhooks]]`, in file order; URLs are unique.
    pub webhooks: Vec<WebhookConfig>,
    /// Model name -> price.
    pub pricing: BTreeMap<String, ModelPrice>,
    /// The file it was loaded from (what a reload re-reads); `None` for
    /// built-in defaults and parsed text.
    pub source: Option<PathBuf>,
}

impl Default for Config {
    /// The built-in defaults (docs/CONFIGURATION.md): what `serve` runs with when there is
    /// no config file at all. No admin tokens, tiers, routes or prices, so
    /// every data-plane request gets `no_route`.
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            admin: AdminConfig::default(),
            database: DatabaseConfig::default(),
            keys: KeysConfig::default(),
            usage: UsageConfig::default(),
            tiers: Vec::new(),
            routes: Vec::new(),
            webhooks: Vec::new(),
            pricing: BTreeMap::new(),
            source: None,
        }
    }
}

impl Config {
    /// Reads and validates a file, interpolating `${VAR}` from the process
    /// environment. Errors name the path as given (a variable that is set but
    /// not valid UTF-8 counts as not set).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let mut config = Self::parse(&text, &path.display().to_string(), &|name| {
            std::env::var(name).ok()
        })?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Same as [`Config::load`] from text; `origin` is the file name used in
    /// error messages; `env` looks up variables for `${VAR}`.
    ///
    /// The only other input is the host name and pid, read for the default
    /// `server.instance_id`.
    pub fn parse(
        text: &str,
        origin: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        validate::parse(text, origin, env)
    }

    /// The tier called `name`.
    pub fn tier(&self, name: &str) -> Option<&TierConfig> {
        self.tiers.iter().find(|tier| tier.name == name)
    }

    /// The route called `name`.
    pub fn route(&self, name: &str) -> Option<&RouteConfig> {
        self.routes.iter().find(|route| route.name == name)
    }
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Data-plane listen address.
    pub listen: SocketAddr,
    /// Admin API, `/metrics`, `/healthz`, `/readyz`.
    pub admin_listen: SocketAddr,
    /// TLS on the data plane; `None` = plain HTTP.
    pub tls: Option<TlsConfig>,
    /// Bytes; larger request bodies get 413.
    pub max_request_body: u64,
    /// Time a client gets to send a request head, counted from the moment
    /// it connects for the first request. Never zero.
    pub request_header_timeout: Duration,
    /// A connection with no request in flight for this long is closed; a
    /// response the client stops reading for this long is abandoned. Never zero.
    pub idle_timeout: Duration,
    /// Longest wait for the next bytes of a request body (408). Never zero.
    pub request_body_timeout: Duration,
    /// Open connections per listener (the admin listener has its own
    /// budget). At least 1.
    pub max_connections: usize,
    /// Request line plus headers, in bytes; above it 431 (414 when the
    /// request line alone is too long).
    pub max_header_bytes: u64,
    /// Tokio worker threads; 0 = one per core (see
    /// [`ServerConfig::effective_worker_threads`]).
    pub worker_threads: usize,
    /// Unique per running process; default `<hostname>-<pid>`. Non-empty, no
    /// whitespace or control characters (it lands in usage rows and logs).
    pub instance_id: String,
    /// One info line per data-plane request (target `tollgate::access`).
    pub access_log: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: defaults::LISTEN,
            admin_listen: defaults::ADMIN_LISTEN,
            tls: None,
            max_request_body: defaults::MAX_REQUEST_BODY,
            request_header_timeout: defaults::REQUEST_HEADER_TIMEOUT,
            idle_timeout: defaults::IDLE_TIMEOUT,
            request_body_timeout: defaults::REQUEST_BODY_TIMEOUT,
            max_connections: defaults::MAX_CONNECTIONS,
            max_header_bytes: defaults::MAX_HEADER_BYTES,
            worker_threads: defaults::WORKER_THREADS,
            instance_id: defaults::instance_id(),
            access_log: false,
        }
    }
}

impl ServerConfig {
    /// `worker_threads`, with 0 resolved to the number of cores (1 if that
    /// cannot be determined).
    pub fn effective_worker_threads(&self) -> usize {
        match self.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, |cores| cores.get()),
            threads => threads,
        }
    }
}

/// `server.tls`, `admin.tls` and a route's `client_cert`: a PEM certificate
/// chain (leaf first) and its private key. Relative paths are relative to
/// the working directory. The listeners' files are read when the server
/// starts, a route's when the config is loaded (see [`RouteTls`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[admin]`.
///
/// `Debug` prints how many tokens there are, never the tokens.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Bearer tokens for the admin API's `/v1/*`. Empty = every `/v1/*`
    /// request is refused. Each is non-empty and free of whitespace.
    pub tokens: Vec<String>,
    /// TLS on `admin_listen`; `None` = plain HTTP.
    pub tls: Option<TlsConfig>,
    /// How long a console sign-in lasts.
    pub session_ttl: Duration,
}

impl Default for AdminConfig {
    fn default() -> AdminConfig {
        AdminConfig {
            tokens: Vec::new(),
            tls: None,
            session_ttl: defaults::SESSION_TTL,
        }
    }
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("tokens", &format_args!("<{} redacted>", self.tokens.len()))
            .field("tls", &self.tls)
            .field("session_ttl", &self.session_ttl)
            .finish()
    }
}

/// `[database]`.
///
/// `Debug` hides the password in `url`.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseConfig {
    /// `sqlite://PATH`, `postgres://...` or `postgresql://...`.
    pub url: String,
    /// At least 1.
    pub pool_size: usize,
    /// Apply pending migrations before serving or running a database command.
    pub migrate: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: defaults::DATABASE_URL.to_owned(),
            pool_size: defaults::POOL_SIZE,
            migrate: defaults::MIGRATE,
        }
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &redact_url_password(&self.url))
            .field("pool_size", &self.pool_size)
            .field("migrate", &self.migrate)
            .finish()
    }
}

/// `scheme://user:secret@host/db` -> `scheme://user:***@host/db`; anything
/// without a password in the authority is returned unchanged.
fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
        None => url.to_owned(),
    }
}

impl DatabaseConfig {
    /// Which backend `url` names.
    pub fn backend(&self) -> DatabaseBackend {
        if self.url.starts_with("sqlite://") {
            DatabaseBackend::Sqlite
        } else {
            DatabaseBackend::Postgres
        }
    }
}

/// The database a [`DatabaseConfig::url`] points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseBackend {
    Sqlite,
    Postgres,
}

/// `[keys]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeysConfig {
    /// 1 to 16 characters of `[a-z0-9]`; keys look like `{prefix}_...`.
    pub prefix: String,
    /// Where clients may put their key, in lookup order; at least one, no
    /// duplicates. `authorization` means `Bearer <key>`.
    pub headers: Vec<HeaderName>,
}

impl Default for KeysConfig {
    fn default() -> Self {
        Self {
            prefix: defaults::KEY_PREFIX.to_owned(),
            headers: defaults::KEY_HEADERS
                .iter()
                .map(|&name| HeaderName::from_static(name))
                .collect(),
        }
    }
}

/// `[usage]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageConfig {
    /// Longest a finished request's row waits before the flush starts. Never zero.
    pub flush_interval: Duration,
    /// Rows per database write; at least 1.
    pub batch_size: usize,
    /// Durable local outbox for rows not yet in the database.
    pub spool_dir: PathBuf,
    /// Bytes.
    pub spool_max: u64,
    /// What to do when the spool is full and the database is down.
    pub on_spool_full: SpoolFullPolicy,
    /// Multi-instance: how often counters are refreshed. Never zero.
    pub sync_interval: Duration,
}

/// `usage.on_spool_full`: when the spool reaches `spool_max` while the
/// database is down, either answer new requests with 503
/// `metering_unavailable` (`"reject"`, the default: no unmetered traffic) or
/// keep serving and let the spool grow past `spool_max` (`"serve"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpoolFullPolicy {
    Reject,
    Serve,
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self {
            flush_interval: defaults::FLUSH_INTERVAL,
            batch_size: defaults::BATCH_SIZE,
            spool_dir: PathBuf::from(defaults::SPOOL_DIR),
            spool_max: defaults::SPOOL_MAX,
            on_spool_full: defaults::ON_SPOOL_FULL,
            sync_interval: defaults::SYNC_INTERVAL,
        }
    }
}

/// One `[[tiers]]` entry. `None` limits are unlimited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierConfig {
    pub name: String,
    pub rate: Option<Rate>,
    pub monthly_requests: Option<u64>,
    pub monthly_tokens: Option<u64>,
    /// From `monthly_cost_usd`, in nano-USD.
    pub monthly_cost_nanos: Option<i64>,
    pub overage: Overage,
    /// From `overage_price_per_request_usd`, in nano-USD. Accepted with
    /// `overage = "block"` too (it is then never charged), so that switching a
    /// tier between the two modes is a one-line change.
    pub overage_price_per_request_nanos: Option<i64>,
    /// Fractions of each monthly limit that fire `quota.threshold`.
    pub alerts: Alerts,
}

/// One `[[webhooks]]` endpoint. `Debug` never prints the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// Absolute `http` or `https` URL.
    pub url: String,
    /// `whsec_` and the base64 of the signing key.
    pub secret: String,
    /// The events it receives; every event when the file names none.
    pub events: Vec<EventType>,
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .field("events", &self.events)
            .finish()
    }
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Unique; 1 to 64 characters of `[A-Za-z0-9._-]` (it is a metric label
    /// and an item in `--routes r1,r2`).
    pub name: String,
    /// Starts with `/`; unique among routes.
    pub prefix: String,
    /// Absolute `http` or `https` URI with a host, no query and no user info.
    /// Its path, if any, is a base path the request path is appended to.
    pub upstream: Uri,
    pub strip_prefix: bool,
    pub usage: UsageFormat,
    pub cost_header: Option<HeaderName>,
    pub input_tokens_header: Option<HeaderName>,
    pub output_tokens_header: Option<HeaderName>,
    /// Upstream response-headers timeout. Never zero.
    pub timeout: Duration,
    pub strip_response_headers: Vec<HeaderName>,
    /// Added to (or replacing) the upstream request's headers, in file order,
    /// names unique. Values are marked sensitive (`HeaderValue::is_sensitive`)
    /// because they typically carry upstream credentials: `Debug` then hides
    /// them and HTTP/2 never puts them in the HPACK table.
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    /// `ca_file` and `client_cert`; `None` when the route has neither, and
    /// then it shares the gateway's default upstream client.
    pub tls: Option<RouteTls>,
}

/// A route's own upstream TLS settings (only on an `https://` upstream):
/// the paths as written and what the files held, read and checked when the
/// config was loaded. Equal values mean the same files with the same
/// contents, so a reload sees a rotated certificate as a changed route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTls {
    /// Extra trusted roots, beside the webpki ones.
    pub ca_file: Option<PathBuf>,
    /// Presented when the upstream asks for a client certificate.
    pub client_cert: Option<TlsConfig>,
    /// The certificates and key, ready for the route's connector.
    pub upstream: UpstreamTls,
}
