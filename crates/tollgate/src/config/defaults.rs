//! Every built-in default, in one place.
//!
//! These are exactly the values docs/CONFIGURATION.md documents, and
//! `config/tollgate.example.toml` shows them; a test parses that file and
//! checks it against these constants, so the three cannot drift apart.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use super::units::{GIB, KIB, MIB};
use super::{Overage, UsageFormat};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

// [server]
/// Data-plane listen address.
pub const LISTEN: SocketAddr = SocketAddr::new(LOCALHOST, 8080);
/// Admin API, `/metrics`, `/healthz` and `/readyz` listen address.
pub const ADMIN_LISTEN: SocketAddr = SocketAddr::new(LOCALHOST, 9090);
/// Request bodies above this are answered with 413.
pub const MAX_REQUEST_BODY: u64 = 10 * MIB;
/// Time a client gets to send the request headers.
pub const REQUEST_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Tokio worker threads; 0 means one per core.
pub const WORKER_THREADS: usize = 0;
/// A connection with no request in flight is closed after this.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the next bytes of a request body before 408.
pub const REQUEST_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// `admin.session_ttl`: a console sign-in lasts a working day.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Open connections per listener; beyond it new ones wait in the accept queue.
pub const MAX_CONNECTIONS: usize = 10_000;
/// Request line plus headers; above it 431 (414 for the request line alone).
pub const MAX_HEADER_BYTES: u64 = 64 * KIB;
/// Used for `server.instance_id` when the host name cannot be read.
pub const FALLBACK_HOSTNAME: &str = "tollgate";

// [database]
/// Embedded SQLite, relative to the working directory.
pub const DATABASE_URL: &str = "sqlite://data/tollgate.db";
pub const POOL_SIZE: usize = 16;
/// Apply pending migrations before serving or running a database command.
pub const MIGRATE: bool = true;

// [keys]
/// Keys look like `tg_...`.
pub const KEY_PREFIX: &str = "tg";
/// Request headers a client may put its key in, in lookup order.
/// (Strings rather than `HeaderName`s: a `HeaderName` const is interior-mutable.)
pub const KEY_HEADERS: &[&str] = &["authorization", "x-api-key"];

// [usage]
/// Longest a finished request's usage row waits before a flush starts.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// Rows per database write.
pub const BATCH_SIZE: usize = 5000;
/// Durable local outbox for rows not yet in the database.
pub const SPOOL_DIR: &str = "data/spool";
/// Spool size above which metering is considered unavailable.
pub const SPOOL_MAX: u64 = GIB;
/// `usage.on_spool_full`: refuse requests (503) rather than serve them unmetered.
pub const ON_SPOOL_FULL: super::SpoolFullPolicy = super::SpoolFullPolicy::Reject;
/// Multi-instance counter refresh interval.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);

// [[routes]]
pub const ROUTE_STRIP_PREFIX: bool = false;
pub const ROUTE_USAGE: UsageFormat = UsageFormat::None;
/// Upstream response-headers timeout.
pub const ROUTE_TIMEOUT: Duration = Duration::from_secs(300);

// [[tiers]]
pub const TIER_OVERAGE: Overage = Overage::Block;

/// The default `server.instance_id`: `<hostname>-<pid>`.
///
/// The host name comes from `/proc/sys/kernel/hostname`, else `$HOSTNAME`,
/// else [`FALLBACK_HOSTNAME`]. The pid makes two processes on one host (a
/// rolling restart, a test suite) distinct, which the usage pipeline relies on.
pub fn instance_id() -> String {
    format!("{}-{}", hostname(), std::process::id())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .or_else(|| {
            std::env::var("HOSTNAME")
                .ok()
                .map(|name| name.trim().to_owned())
                .filter(|name| !name.is_empty())
        })
        .unwrap_or_else(|| FALLBACK_HOSTNAME.to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (STYLE.md)
mod tests {
    use super::*;

    #[test]
    fn instance_id_is_hostname_dash_pid() {
        let id = instance_id();
        let suffix = format!("-{}", std::process::id());
        let host = id.strip_suffix(&suffix).unwrap();
        assert!(!host.is_empty());
        assert!(!host.contains(char::is_whitespace), "{host:?}");
    }
}
