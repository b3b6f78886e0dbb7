//! Tollgate's storage backends: the [`Store`] of `tollgate-metering` for
//! SQLite (embedded, one gateway instance) and Postgres (production, many
//! instances sharing one database).
//!
//! This crate owns the schema and its versioned migrations
//! (`migrations/{sqlite,postgres}/NNNN_name.sql`, embedded in the binary)
//! and the data access of each role of the store: the rows of customers
//! and keys ([`AccountStore`]; the rules over them, such as lookups by id
//! or name and what rotation does to the old key, are in
//! `tollgate_metering::keys`, written once), usage rows and their
//! daily rollups ([`UsageSink::write_usage`]), the usage reports, export
//! and closed billing periods read from them ([`UsageReports`]; shared
//! rules in `reports`), and the change feed that keeps every gateway's key
//! cache current ([`ChangeFeed`]: Postgres `LISTEN/NOTIFY`; SQLite a
//! trigger-filled `change_log` table that is polled). It knows nothing of
//! HTTP and must not depend on the proxy crate; callers see only the
//! traits.
//!
//! Choose a backend by URL with [`open`]; [`testing`] has throwaway
//! databases for tests of this and other crates.
//!
//! # Failure behaviour
//!
//! Every method either succeeds or returns a classified [`StoreError`]:
//! an unreachable or failing database is `Unavailable` (Postgres gives up
//! after a few seconds instead of hanging: connect, pool wait and recycle
//! are all bounded), a uniqueness rule is `Conflict` (worded once here,
//! from one table of constraint names per backend), undecodable rows are
//! `Corrupt`. Writes are single statements or single transactions, so a
//! failed call changes nothing. The change feed ([`ChangeFeed::watch`])
//! never gives up: it reconnects with backoff (100 ms doubling to 2 s)
//! and, when it cannot rule out that changes were missed, sends
//! [`StoreEvent::Resync`] so the caller reloads.
//!
//! [`AccountStore`]: tollgate_metering::keys::AccountStore
//! [`UsageSink::write_usage`]: tollgate_metering::usage::UsageSink::write_usage
//! [`UsageReports`]: tollgate_metering::billing::UsageReports
//! [`ChangeFeed`]: tollgate_metering::keys::ChangeFeed
//! [`ChangeFeed::watch`]: tollgate_metering::keys::ChangeFeed::watch

use std::path::PathBuf;
use std::sync::Arc;

use time::OffsetDateTime;
use tollgate_metering::keys::{KeyFilter, KeyStatus, NewCustomer, NewKey, Page, StoreEvent};
use tollgate_metering::limits::KeyLimits;
use tollgate_metering::{CustomerId, KeyId};
use tollgate_metering::{Store, StoreError};

/// `column = stored.column + excluded.column` for the `DO UPDATE` of a
/// rollup upsert, saturating at the ends of the 64-bit range, in either
/// direction, rather than failing the batch (Postgres) or turning the sum
/// into a float (SQLite): the same as the writer's sums in Rust, which are
/// exact and clamped. Each branch adds or subtracts only what cannot
/// overflow. `$stored` names the stored row: `"d."` where the table is
/// aliased `d`, `""` where bare column names mean the stored row. With
/// `"d."`, for a column `x`:
///
/// ```sql
/// x = CASE WHEN excluded.x >= 0
///          THEN CASE WHEN d.x > 9223372036854775807 - excluded.x
///                    THEN 9223372036854775807 ELSE d.x + excluded.x END
///          WHEN d.x < -9223372036854775808 - excluded.x
///          THEN -9223372036854775808 ELSE d.x + excluded.x END
/// ```
///
/// On Postgres this replaced `LEAST(d.column::numeric + excluded.column,
/// max)` (and `GREATEST` of that for `cost_nanos`): in `psql` the numeric
/// arithmetic cost 0.07 to 0.19 µs more a column than this, depending on
/// the machine, and a batch written in a transaction of its own upserts a
/// group for every two or three rows (benches/usage_write.rs: 9–16% of the
/// server's CPU a row).
macro_rules! saturating_add {
    ($stored:literal, $column:literal) => {
        concat!(
            $column,
            " = CASE WHEN excluded.",
            $column,
            " >= 0 THEN CASE WHEN ",
            $stored,
            $column,
            " > 9223372036854775807 - excluded.",
            $column,
            " THEN 9223372036854775807 ELSE ",
            $stored,
            $column,
            " + excluded.",
            $column,
            " END WHEN ",
            $stored,
            $column,
            " < -9223372036854775808 - excluded.",
            $column,
            " THEN -9223372036854775808 ELSE ",
            $stored,
            $column,
            " + excluded.",
            $column,
            " END"
        )
    };
}

/// The sums of an incoming rollup row (`excluded`) added to the stored one,
/// each saturating ([`saturating_add!`]). Shared by `usage_daily` and
/// `usage_customer_daily`, which have the same sums, on both backends.
macro_rules! add_sums {
    ($stored:literal) => {
        concat!(
            saturating_add!($stored, "requests"),
            ", ",
            saturating_add!($stored, "rejected"),
            ", ",
            saturating_add!($stored, "errors"),
            ", ",
            saturating_add!($stored, "input_tokens"),
            ", ",
            saturating_add!($stored, "output_tokens"),
            ", ",
            saturating_add!($stored, "cache_read_tokens"),
            ", ",
            saturating_add!($stored, "cache_write_tokens"),
            ", ",
            saturating_add!($stored, "request_bytes"),
            ", ",
            saturating_add!($stored, "response_bytes"),
            ", ",
            saturating_add!($stored, "cost_nanos")
        )
    };
}

mod migrations;
mod postgres;
mod reports;
mod sqlite;
pub mod testing;
mod usage;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// Opens the database named by `url`:
///
/// - `sqlite://PATH`: a SQLite file, relative (`sqlite://data/tollgate.db`)
///   or absolute (`sqlite:///var/lib/tollgate.db`); missing parent
///   directories are created. `pool_size` is ignored.
/// - `postgres://…` or `postgresql://…`: a pool of `pool_size` connections,
///   opened lazily, so this succeeds while the server is down (the first
///   query then answers `Unavailable`).
///
/// Migrations are not applied here; call [`Store::migrate`].
pub async fn open(url: &str, pool_size: usize) -> Result<Arc<dyn Store>, StoreError> {
    match parse_url(url)? {
        Location::Sqlite(path) => Ok(Arc::new(SqliteStore::open(path).await?)),
        Location::Postgres => Ok(Arc::new(PostgresStore::new(url, pool_size)?)),
    }
}

enum Location {
    Sqlite(PathBuf),
    Postgres,
}

fn parse_url(url: &str) -> Result<Location, StoreError> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(StoreError::Config(
                "the SQLite URL has no path; use sqlite://PATH".to_owned(),
            ));
        }
        return Ok(Location::Sqlite(PathBuf::from(path)));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Location::Postgres);
    }
    // Only the scheme is echoed: the rest may hold a password.
    let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
    Err(StoreError::Config(format!(
        "unsupported database URL scheme {scheme:?}; use sqlite://PATH or postgres://…"
    )))
}

/// The change-feed event for a changed row of `kind` (`key` or `customer`),
/// or `None` when the pair cannot be understood.
fn change_event(kind: &str, id: &str) -> Option<StoreEvent> {
    match kind {
        "key" => id.parse().ok().map(|id| StoreEvent::Key(KeyId(id))),
        "customer" => id
            .parse()
            .ok()
            .map(|id| StoreEvent::Customer(CustomerId(id))),
        _ => None,
    }
}

/// A schema rule an insert of a customer or key can break, which callers
/// are told about in their own terms. Each backend names its constraints
/// for these in one table (`CONSTRAINTS`); what breaking one means is
/// worded here, once ([`Inserted::refused`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Constraint {
    CustomerName,
    CustomerId,
    KeyDigest,
    KeyId,
    /// The key's customer must exist.
    KeyCustomer,
}

/// What inserting `new` broke, in the caller's terms, when the driver
/// reported the constraint `reported` (its name, or SQLite's message) and
/// the backend's table `constraints` knows it; else `None`, and the
/// driver's error stands.
fn refusal(
    constraints: &[(&str, Constraint)],
    reported: Option<&str>,
    new: &impl Inserted,
) -> Option<StoreError> {
    let &(_, constraint) = constraints
        .iter()
        .find(|(known, _)| Some(*known) == reported)?;
    new.refused(constraint)
}

/// A row being inserted.
trait Inserted {
    /// What breaking `constraint` by inserting this row means, or `None`
    /// when it is not one this row can break (the driver's error stands).
    fn refused(&self, constraint: Constraint) -> Option<StoreError>;
}

impl Inserted for NewCustomer {
    fn refused(&self, constraint: Constraint) -> Option<StoreError> {
        let message = match constraint {
            Constraint::CustomerName => format!("customer {:?} already exists", self.name),
            Constraint::CustomerId => format!("customer {} already exists", self.id),
            Constraint::KeyDigest | Constraint::KeyId | Constraint::KeyCustomer => return None,
        };
        Some(StoreError::Conflict(message))
    }
}

impl Inserted for NewKey {
    fn refused(&self, constraint: Constraint) -> Option<StoreError> {
        Some(match constraint {
            Constraint::KeyDigest => {
                StoreError::Conflict("a key with this digest already exists".to_owned())
            }
            Constraint::KeyId => StoreError::Conflict(format!("key {} already exists", self.id)),
            Constraint::KeyCustomer => {
                StoreError::NotFound(format!("customer {}", self.customer_id))
            }
            Constraint::CustomerName | Constraint::CustomerId => return None,
        })
    }
}

/// A value [`list_keys_sql`] binds, for the backend to encode.
enum KeyArg {
    Customer(CustomerId),
    After(KeyId),
    Now(OffsetDateTime),
    Limit(u32),
}

/// The query of `list_keys`: `columns` of the keys that pass `filter` on
/// `page`, in id order, with a placeholder from `bind` (`$n` or `?n`) for
/// each value it binds. The status conditions agree with
/// [`KeyRecord::status`](tollgate_metering::keys::KeyRecord::status):
/// revoked wins over expired, and a key expires at `expires_at` exactly.
/// `Revoked` does not bind the instant (Postgres refuses a parameter it
/// cannot type).
fn list_keys_sql(
    columns: &str,
    filter: &KeyFilter,
    page: Page<KeyId>,
    mut bind: impl FnMut(KeyArg) -> String,
) -> String {
    let mut sql = format!("SELECT {columns} FROM api_keys WHERE TRUE");
    if let Some(customer) = filter.customer {
        sql += &format!(" AND customer_id = {}", bind(KeyArg::Customer(customer)));
    }
    if let Some(after) = page.after {
        sql += &format!(" AND id > {}", bind(KeyArg::After(after)));
    }
    let mut now = || {
        bind(KeyArg::Now(
            filter.now.unwrap_or_else(OffsetDateTime::now_utc),
        ))
    };
    match filter.status {
        None => {}
        Some(KeyStatus::Revoked) => sql += " AND revoked_at IS NOT NULL",
        Some(KeyStatus::Expired) => {
            sql += &format!(
                " AND revoked_at IS NULL AND expires_at IS NOT NULL AND expires_at <= {}",
                now()
            );
        }
        Some(KeyStatus::Active) => {
            sql += &format!(
                " AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > {})",
                now()
            );
        }
    }
    sql + &format!(" ORDER BY id LIMIT {}", bind(KeyArg::Limit(page.limit)))
}

/// The backoff of the change feed after a failure.
mod backoff {
    use std::time::Duration;

    use tokio::sync::mpsc;
    use tollgate_metering::keys::StoreEvent;

    pub(crate) const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(2);

    pub(super) fn next(current: Duration) -> Duration {
        (current * 2).min(MAX)
    }

    /// Waits `delay` before the next try, then doubles it (up to 2 s);
    /// `false` when the receiver went away meanwhile: the feed is over.
    pub(crate) async fn wait(events: &mpsc::Sender<StoreEvent>, delay: &mut Duration) -> bool {
        tokio::select! {
            () = events.closed() => return false,
            () = tokio::time::sleep(*delay) => {}
        }
        *delay = next(*delay);
        true
    }
}

/// The columns of `customers` and of `api_keys`, in the order both
/// backends decode them.
const CUSTOMER_COLUMNS: &str = "id, name, tier, overrides, created_at";
const KEY_COLUMNS: &str = "id, customer_id, digest, prefix, name, routes, created_at, \
     expires_at, revoked_at, COALESCE(family_id, id), limits";

/// The columns of a webhook delivery, as both backends decode them, over
/// `webhook_deliveries d JOIN webhook_events e`.
const DELIVERY_COLUMNS: &str = "d.id, d.event_id, e.type, d.url, d.status, d.attempts, \
     d.last_error, e.created_at, d.next_attempt_at, d.delivered_at";

/// When a claim made at `now` for `lease` runs out (an hour if `lease`
/// does not fit; `now` at the end of representable time).
fn later(now: OffsetDateTime, lease: std::time::Duration) -> OffsetDateTime {
    now.checked_add(time::Duration::try_from(lease).unwrap_or(time::Duration::HOUR))
        .unwrap_or(now)
}

/// A key's stored limits; the error says what is wrong for a `Corrupt`.
fn key_limits_from(json: &serde_json::Value) -> Result<KeyLimits, String> {
    KeyLimits::from_json(json).map_err(|error| format!("a key's limits: {error}"))
}

/// How many keys one `load_keys` batch carries: large enough that a million
/// keys take a hundred round trips, small enough to stay a few MiB.
const KEY_BATCH: usize = 10_000;

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn urls_choose_the_backend() {
        assert!(matches!(
            parse_url("sqlite://data/tollgate.db"),
            Ok(Location::Sqlite(path)) if path == Path::new("data/tollgate.db")
        ));
        assert!(matches!(
            parse_url("sqlite:///var/lib/t.db"),
            Ok(Location::Sqlite(path)) if path == Path::new("/var/lib/t.db")
        ));
        assert!(matches!(
            parse_url("postgres://u@h/db"),
            Ok(Location::Postgres)
        ));
        assert!(matches!(
            parse_url("postgresql://u@h/db"),
            Ok(Location::Postgres)
        ));
    }

    #[test]
    fn bad_urls_say_what_is_accepted_without_echoing_secrets() {
        let error = parse_url("mysql://root:hunter2@db/x")
            .err()
            .map(|e| e.to_string());
        let error = error.unwrap_or_default();
        assert!(error.contains("\"mysql\""), "{error}");
        assert!(error.contains("sqlite://PATH"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
        assert!(matches!(parse_url("sqlite://"), Err(StoreError::Config(_))));
        assert!(matches!(parse_url("data.db"), Err(StoreError::Config(_))));
    }

    #[test]
    fn change_events_parse() {
        let key = KeyId::new();
        let customer = CustomerId::new();
        assert_eq!(
            change_event("key", &key.to_string()),
            Some(StoreEvent::Key(key))
        );
        assert_eq!(
            change_event("customer", &customer.to_string()),
            Some(StoreEvent::Customer(customer))
        );
        assert_eq!(change_event("key", "nope"), None);
        assert_eq!(change_event("route", &key.to_string()), None);
    }

    #[test]
    fn backoff_doubles_to_two_seconds() {
        let mut delay = backoff::FIRST;
        let mut seen = vec![delay.as_millis()];
        for _ in 0..6 {
            delay = backoff::next(delay);
            seen.push(delay.as_millis());
        }
        assert_eq!(seen, [100, 200, 400, 800, 1600, 2000, 2000]);
    }
}
