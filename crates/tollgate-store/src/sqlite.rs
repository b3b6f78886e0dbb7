//! The embedded backend: one SQLite file, one gateway instance (plus the CLI
//! working on the same file from other processes).
//!
//! The file is opened in WAL mode (readers never block the writer), with
//! foreign keys on and a 5 s busy timeout, so a CLI command and the gateway
//! writing at once wait for each other instead of failing. `synchronous`
//! stays at SQLite's default (FULL): the usage spool is checkpointed once a
//! commit returns, so a commit must survive power loss.
//!
//! Every call runs on tokio's blocking pool over one connection behind a
//! mutex: SQLite serializes writers anyway, and the gateway's reads are
//! rare (the key cache is in memory). The change feed has its own
//! connection so that polling never waits behind a long write.
//!
//! Encodings: ids are canonical lowercase UUID text (so text order is id
//! order), timestamps RFC 3339 UTC text with six fractional digits and `Z`
//! (so text order is time order), digests 32-byte BLOBs, routes a JSON array
//! or NULL, overrides JSON text.
//!
//! # Failure behaviour
//!
//! A busy database (another process holding the write lock past the busy
//! timeout) or an I/O error is `Unavailable`. The change feed polls the
//! durable `change_log` table, so a failed poll loses nothing: the next one
//! resumes after the last row seen. Only when rows it has not seen were
//! pruned (it fell more than [`CHANGE_LOG_KEEP`] rows behind) does it send
//! `Resync`.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::types::{ToSql, Value};
use rusqlite::{params, params_from_iter, Connection, Params, Row, Statement, TransactionBehavior};
use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime, UtcOffset};
use tokio::sync::mpsc;
use uuid::Uuid;

use tollgate_metering::billing::UsageReports;
use tollgate_metering::billing::{
    BillingLine, BillingUsage, ClosedPeriod, GroupKey, Ranking, UsageFilter, UsageGroup,
    UsageTotals,
};
use tollgate_metering::keys::AccountStore;
use tollgate_metering::keys::KeyDigest;
use tollgate_metering::keys::{
    ChangeFeed, Customer, CustomerUpdate, KeyFilter, KeyRecord, KeyUpdate, NewCustomer, NewKey,
    Page, StoreEvent,
};
use tollgate_metering::limits::{KeyLimits, Period, PeriodTotals};
use tollgate_metering::usage::UsageEvent;
use tollgate_metering::usage::UsageSink;
use tollgate_metering::webhooks::{
    Claimed, Delivery, DeliveryFilter, ExpiringKey, NewEvent, Settlement, WebhookOutbox,
};
use tollgate_metering::{CustomerId, KeyId};
use tollgate_metering::{MigrationReport, Store, StoreError};

use crate::migrations::{self, Migration};
use crate::usage::{self, bigint, text, Groups};
use crate::{
    backoff, change_event, key_limits_from, list_keys_sql, Constraint, Inserted, KeyArg,
    CUSTOMER_COLUMNS, KEY_BATCH, KEY_COLUMNS,
};

mod reports;
mod webhooks;

/// How long a statement waits for another connection's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the change feed polls `change_log`.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Rows of `change_log` kept when pruning.
pub const CHANGE_LOG_KEEP: i64 = 10_000;
/// Polls between two prunings of `change_log` (about a minute).
const PRUNE_EVERY: u64 = 240;
/// Rows of `change_log` read per poll.
const CHANGE_BATCH: i64 = 1_000;
/// Prepared statements kept per connection: every statement the store
/// issues, `list_keys`'s variants included, so none is re-parsed.
const STATEMENT_CACHE: usize = 64;

/// The SQLite [`Store`].
pub struct SqliteStore {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
}

/// What a blocking closure can fail with; classified into a [`StoreError`]
/// at the end of every call.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<Failure> for StoreError {
    fn from(failure: Failure) -> StoreError {
        match failure {
            Failure::Store(error) => error,
            Failure::Json(error) => StoreError::Corrupt(format!("bad JSON: {error}")),
            Failure::Sqlite(error) => classify(error),
        }
    }
}

fn classify(error: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode;
    match &error {
        rusqlite::Error::SqliteFailure(failure, message) => match failure.code {
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::CannotOpen
            | ErrorCode::OutOfMemory
            | ErrorCode::FileLockingProtocolFailed
            | ErrorCode::OperationInterrupted => StoreError::Unavailable(Box::new(error)),
            ErrorCode::ConstraintViolation => {
                StoreError::Conflict(message.clone().unwrap_or_else(|| error.to_string()))
            }
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase | ErrorCode::TypeMismatch => {
                StoreError::Corrupt(error.to_string())
            }
            // Permissions, a read-only file, a missing table (an unmigrated
            // database: SQLite reports it as a generic error).
            _ => StoreError::Config(error.to_string()),
        },
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::Utf8Error(..)
        | rusqlite::Error::InvalidColumnType(..) => StoreError::Corrupt(error.to_string()),
        _ => StoreError::Unavailable(Box::new(error)),
    }
}

/// The constraints whose violation callers are told about in their own
/// terms, by the message SQLite gives for them. SQLite does not name a
/// foreign key: the only one an insert of a customer or key can break is
/// the key's customer.
const CONSTRAINTS: [(&str, Constraint); 5] = [
    (
        "UNIQUE constraint failed: customers.name",
        Constraint::CustomerName,
    ),
    (
        "UNIQUE constraint failed: customers.id",
        Constraint::CustomerId,
    ),
    (
        "UNIQUE constraint failed: api_keys.digest",
        Constraint::KeyDigest,
    ),
    ("UNIQUE constraint failed: api_keys.id", Constraint::KeyId),
    ("FOREIGN KEY constraint failed", Constraint::KeyCustomer),
];

/// `failure`, or what it means for inserting `new` when it broke one of
/// the [`CONSTRAINTS`].
fn refused(failure: Failure, new: &impl Inserted) -> Failure {
    let reported = match &failure {
        Failure::Sqlite(rusqlite::Error::SqliteFailure(error, message))
            if error.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            message.as_deref()
        }
        _ => None,
    };
    crate::refusal(&CONSTRAINTS, reported, new).map_or(failure, Failure::from)
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`, and its
    /// parent directories.
    pub async fn open(path: impl Into<PathBuf>) -> Result<SqliteStore, StoreError> {
        let path = path.into();
        let conn = blocking({
            let path = path.clone();
            move || connect(&path)
        })
        .await?;
        Ok(SqliteStore {
            path,
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` on the blocking pool with the store's connection.
    async fn call<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, Failure> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        blocking(move || {
            // A panic while holding the lock leaves the connection usable:
            // any open transaction was rolled back when it was dropped.
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            work(&mut conn).map_err(StoreError::from)
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| StoreError::Unavailable(Box::new(error)))?
}

/// Opens a configured connection to `path`.
fn connect(path: &Path) -> Result<Connection, StoreError> {
    let config_error = |what: &str, error: &dyn std::fmt::Display| {
        StoreError::Config(format!("{what} {}: {error}", path.display()))
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|error| config_error("cannot create the directory of", &error))?;
    }
    let conn = Connection::open(path)
        .and_then(|conn| conn.busy_timeout(BUSY_TIMEOUT).map(|()| conn))
        .map_err(|error| config_error("cannot open the SQLite database", &error))?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(|error| config_error("cannot open the SQLite database", &error))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(config_error(
            "cannot use WAL mode for",
            &format_args!("journal_mode stays {mode}"),
        ));
    }
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(|error| config_error("cannot enable foreign keys for", &error))?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

// ---- encoding ----------------------------------------------------------

/// RFC 3339 in UTC with exactly six fractional digits and `Z`.
fn ts(at: OffsetDateTime) -> String {
    // Only at the very edge of the supported range (year ±9999) can the
    // conversion overflow; then the instant is written in its own offset.
    let at = at.checked_to_offset(UtcOffset::UTC).unwrap_or(at);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.microsecond()
    )
}

fn parse_ts(text: &str) -> Result<OffsetDateTime, Failure> {
    OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|error| corrupt(format!("bad timestamp {text:?}: {error}")))
}

fn parse_uuid(text: &str) -> Result<Uuid, Failure> {
    Uuid::parse_str(text).map_err(|error| corrupt(format!("bad id {text:?}: {error}")))
}

fn decode_key_limits(json: &serde_json::Value) -> Result<KeyLimits, Failure> {
    key_limits_from(json).map_err(corrupt)
}

fn corrupt(message: String) -> Failure {
    Failure::Store(StoreError::Corrupt(message))
}

fn customer_row(row: &Row<'_>) -> Result<Customer, Failure> {
    Ok(Customer {
        id: CustomerId(parse_uuid(&row.get::<_, String>(0)?)?),
        name: row.get(1)?,
        tier: row.get(2)?,
        overrides: serde_json::from_str(&row.get::<_, String>(3)?)?,
        created_at: parse_ts(&row.get::<_, String>(4)?)?,
    })
}

fn key_row(row: &Row<'_>) -> Result<KeyRecord, Failure> {
    let digest: Vec<u8> = row.get(2)?;
    let optional_ts = |index: usize| -> Result<Option<OffsetDateTime>, Failure> {
        row.get::<_, Option<String>>(index)?
            .map(|text| parse_ts(&text))
            .transpose()
    };
    Ok(KeyRecord {
        id: KeyId(parse_uuid(&row.get::<_, String>(0)?)?),
        customer_id: CustomerId(parse_uuid(&row.get::<_, String>(1)?)?),
        digest: <[u8; 32]>::try_from(digest.as_slice())
            .map(KeyDigest)
            .map_err(|_| corrupt(format!("a key digest of {} bytes", digest.len())))?,
        prefix: row.get(3)?,
        name: row.get(4)?,
        routes: row
            .get::<_, Option<String>>(5)?
            .map(|json| serde_json::from_str(&json))
            .transpose()?,
        created_at: parse_ts(&row.get::<_, String>(6)?)?,
        expires_at: optional_ts(7)?,
        revoked_at: optional_ts(8)?,
        family_id: KeyId(parse_uuid(&row.get::<_, String>(9)?)?),
        limits: row
            .get::<_, Option<String>>(10)?
            .map(|json| decode_key_limits(&serde_json::from_str(&json)?))
            .transpose()?,
    })
}

/// Every row of `statement`, decoded.
fn all<T>(
    statement: &mut Statement<'_>,
    params: impl Params,
    decode: fn(&Row<'_>) -> Result<T, Failure>,
) -> Result<Vec<T>, Failure> {
    let mut rows = statement.query(params)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(decode(row)?);
    }
    Ok(out)
}

/// The first row of `statement`, decoded.
fn first<T>(
    statement: &mut Statement<'_>,
    params: impl Params,
    decode: fn(&Row<'_>) -> Result<T, Failure>,
) -> Result<Option<T>, Failure> {
    let mut rows = statement.query(params)?;
    match rows.next()? {
        Some(row) => Ok(Some(decode(row)?)),
        None => Ok(None),
    }
}

fn key_by_id(conn: &Connection, id: KeyId) -> Result<Option<KeyRecord>, Failure> {
    let mut statement =
        conn.prepare_cached(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1"))?;
    first(&mut statement, [id.to_string()], key_row)
}

fn customer_by_id(conn: &Connection, id: Uuid) -> Result<Option<Customer>, Failure> {
    let mut statement = conn.prepare_cached(&format!(
        "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE id = ?1"
    ))?;
    first(&mut statement, [id.to_string()], customer_row)
}

fn insert_key(conn: &Connection, new: &NewKey) -> Result<KeyRecord, Failure> {
    let routes = new.routes.as_ref().map(serde_json::to_string).transpose()?;
    let mut statement = conn.prepare_cached(&format!(
        "INSERT INTO api_keys (id, customer_id, digest, prefix, name, routes, created_at, \
         expires_at, family_id, limits) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) RETURNING {KEY_COLUMNS}"
    ))?;
    let inserted = first(
        &mut statement,
        params![
            new.id.to_string(),
            new.customer_id.to_string(),
            &new.digest.0,
            new.prefix,
            new.name,
            routes,
            ts(new.created_at),
            new.expires_at.map(ts),
            new.family_id.to_string(),
            new.limits
                .as_ref()
                .map(|limits| limits.to_json().to_string()),
        ],
        key_row,
    );
    inserted
        .map_err(|failure| refused(failure, new))?
        .ok_or_else(|| corrupt("INSERT … RETURNING returned no row".to_owned()))
}

// ---- usage -----------------------------------------------------------------

/// Inserts one row unless its `(ts, id)`, the primary key (migration 7), is
/// there already, as Postgres's primary key refuses it: a replayed row
/// carries the `ts` of its first write.
const INSERT_USAGE_EVENT: &str = "INSERT INTO usage_events (\
    id, client_request_id, ts, customer_id, key_id, instance, route, method, path, status, \
    outcome, latency_us, upstream_latency_us, request_bytes, response_bytes, model, \
    input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_nanos, cost_source) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, \
    ?19, ?20, ?21, ?22) \
    ON CONFLICT (ts, id) DO NOTHING";

/// Adds one group's sums to `usage_daily` ([`add_sums!`]).
const UPSERT_USAGE_DAILY: &str = concat!(
    "INSERT INTO usage_daily (\
    day, customer_id, key_id, route, model, requests, rejected, errors, input_tokens, \
    output_tokens, cache_read_tokens, cache_write_tokens, request_bytes, response_bytes, \
    cost_nanos) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15) \
    ON CONFLICT (day, customer_id, key_id, route, model) DO UPDATE SET ",
    add_sums!("")
);

/// Adds one customer day's sums to `usage_customer_daily`, clamped as in
/// [`UPSERT_USAGE_DAILY`].
const UPSERT_CUSTOMER_DAILY: &str = concat!(
    "INSERT INTO usage_customer_daily (\
    day, customer_id, requests, rejected, errors, input_tokens, output_tokens, \
    cache_read_tokens, cache_write_tokens, request_bytes, response_bytes, cost_nanos) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) \
    ON CONFLICT (day, customer_id) DO UPDATE SET ",
    add_sums!("")
);

/// Writes `batch` in one IMMEDIATE transaction: each row is inserted unless
/// its `(ts, id)` is present, and only the rows inserted are added to their
/// `usage_daily` group, which is upserted once per group at the end, and
/// to their `usage_customer_daily` row (day × customer), likewise.
fn write_usage(conn: &mut Connection, batch: &[UsageEvent]) -> Result<u64, Failure> {
    let rows = usage::rows(batch)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut inserted = 0u64;
    let mut groups = Groups::new();
    {
        let mut insert = tx.prepare_cached(INSERT_USAGE_EVENT)?;
        for row in yielding(&rows) {
            let event = row.event;
            let changed = insert.execute(params![
                event.id.to_string(),
                event.client_request_id.as_deref().map(text),
                ts(row.ts),
                event.customer_id.to_string(),
                event.key_id.to_string(),
                text(&event.instance),
                text(&event.route),
                text(&event.method),
                text(&event.path),
                event.status,
                event.outcome.as_str(),
                bigint(event.latency_us),
                bigint(event.upstream_latency_us),
                bigint(event.request_bytes),
                bigint(event.response_bytes),
                event.model.as_deref().map(text),
                bigint(event.input_tokens),
                bigint(event.output_tokens),
                bigint(event.cache_read_tokens),
                bigint(event.cache_write_tokens),
                event.cost_nanos,
                event.cost_source.as_str(),
            ])?;
            // 0 when the row was already there: skipped, not rolled up.
            if changed == 1 {
                inserted += 1;
                groups.add(row);
            }
        }
        let groups = groups.into_sorted();
        let mut upsert = tx.prepare_cached(UPSERT_USAGE_DAILY)?;
        for ((day, customer_id, key_id, route, model), sums) in yielding(&groups) {
            let key: [&dyn ToSql; 5] = [
                &day_text(*day),
                &customer_id.to_string(),
                &key_id.to_string(),
                route,
                model,
            ];
            upsert.execute(with_sums(&key, &sums.columns()))?;
        }
        let mut upsert = tx.prepare_cached(UPSERT_CUSTOMER_DAILY)?;
        for ((day, customer_id), sums) in yielding(&usage::customer_days(&groups)) {
            let key: [&dyn ToSql; 2] = [&day_text(*day), &customer_id.to_string()];
            upsert.execute(with_sums(&key, &sums.columns()))?;
        }
    }
    tx.commit()?;
    Ok(inserted)
}

/// Rows (or rollup groups) a usage write takes between two yields of its
/// thread: about a quarter of a millisecond of SQLite's work.
const YIELD_EVERY: usize = 64;

/// `items`, with the thread yielding its CPU ([`std::thread::yield_now`])
/// after every [`YIELD_EVERY`] of them. A usage write runs for
/// milliseconds on a thread of the gateway's own, and the kernel lets a
/// thread that is running finish its time slice before a request's thread
/// that wakes on the same core gets it: without the yields, each write
/// delayed the requests that arrived meanwhile by up to its whole length
/// (the one-connection p99 went from 1.5 to 0.4 ms with them). A yield
/// with nothing else waiting costs a system call and nothing more.
fn yielding<I: IntoIterator>(items: I) -> impl Iterator<Item = I::Item> {
    items.into_iter().enumerate().map(|(index, item)| {
        if index > 0 && index % YIELD_EVERY == 0 {
            std::thread::yield_now();
        }
        item
    })
}

/// A rollup row's parameters: its key columns, then its sums.
fn with_sums<'a>(
    key: &'a [&'a dyn ToSql],
    sums: &'a [i64],
) -> rusqlite::ParamsFromIter<impl Iterator<Item = &'a dyn ToSql>> {
    params_from_iter(
        key.iter()
            .copied()
            .chain(sums.iter().map(|sum| sum as &dyn ToSql)),
    )
}

/// `YYYY-MM-DD`.
fn day_text(day: Date) -> String {
    format!(
        "{:04}-{:02}-{:02}",
        day.year(),
        u8::from(day.month()),
        day.day()
    )
}

// ---- migrations ----------------------------------------------------------

const CREATE_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER NOT NULL PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TEXT NOT NULL
)";

/// Applies the next pending migration, if any, in one IMMEDIATE transaction
/// (which takes the write lock first, so two processes migrating at once
/// apply each script once). Returns the version applied and the version the
/// database is at.
fn migrate_step(
    conn: &mut Connection,
    list: &'static [Migration],
) -> Result<(Option<u32>, u32), Failure> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(CREATE_MIGRATIONS_TABLE)?;
    let current: u32 = tx.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |row| row.get(0),
    )?;
    let Some(migration) = migrations::next(list, current)? else {
        tx.commit()?;
        return Ok((None, current));
    };
    tx.execute_batch(migration.sql)?;
    tx.execute(
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
        params![
            migration.version,
            migration.name,
            ts(OffsetDateTime::now_utc())
        ],
    )?;
    tx.commit()?;
    Ok((Some(migration.version), migration.version))
}

// ---- change feed ---------------------------------------------------------

/// The change feed's reading position.
struct Feed {
    conn: Option<Connection>,
    /// The last `change_log.seq` handled; `None` until the feed has read
    /// where the log stood when it started.
    last: Option<i64>,
    polls: u64,
}

impl Feed {
    /// Reads new `change_log` rows (opening the connection if needed).
    fn poll(&mut self, path: &Path) -> Result<Vec<StoreEvent>, StoreError> {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            slot @ None => slot.insert(connect(path)?),
        };
        let result = read_changes(conn, &mut self.last).map_err(StoreError::from);
        if result.is_ok() {
            self.polls += 1;
            if self.polls.is_multiple_of(PRUNE_EVERY) {
                // Pruning is housekeeping: a failure must not cost the
                // events just read.
                if let Err(error) = prune(conn, self.last).map_err(StoreError::from) {
                    tracing::warn!(message = "Change-log pruning failed.", %error);
                }
            }
        } else {
            // Start over with a fresh connection next time.
            self.conn = None;
        }
        result
    }
}

fn read_changes(conn: &Connection, last: &mut Option<i64>) -> Result<Vec<StoreEvent>, Failure> {
    let Some(after) = *last else {
        // The high-water mark, even when pruning left the table empty.
        let start: Option<i64> = conn
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'change_log'",
                [],
                |row| row.get(0),
            )
            .or_else(|error| match error {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                other => Err(other),
            })?;
        *last = Some(start.unwrap_or(0));
        // Live from here on: whatever happened before is the caller's to
        // (re)load, as the feed contract says.
        return Ok(vec![StoreEvent::Resync]);
    };
    let mut statement = conn.prepare_cached(
        "SELECT seq, kind, id FROM change_log WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let mut rows = statement.query(params![after, CHANGE_BATCH])?;
    let mut events = Vec::new();
    let mut expected = after + 1;
    let mut missed = false;
    while let Some(row) = rows.next()? {
        let seq: i64 = row.get(0)?;
        let kind: String = row.get(1)?;
        let id: String = row.get(2)?;
        // `seq` is contiguous (AUTOINCREMENT, single writer, rollbacks undo
        // their increments), so a jump means rows were pruned unseen.
        missed |= seq != expected;
        expected = seq + 1;
        match change_event(&kind, &id) {
            Some(event) => events.push(event),
            None => {
                tracing::warn!(
                    message = "Unreadable change-log row; resynchronising.",
                    seq,
                    kind
                );
                missed = true;
            }
        }
        *last = Some(seq);
    }
    if missed {
        return Ok(vec![StoreEvent::Resync]);
    }
    Ok(events)
}

fn prune(conn: &Connection, last: Option<i64>) -> Result<(), Failure> {
    if let Some(last) = last {
        conn.execute(
            "DELETE FROM change_log WHERE seq <= ?1",
            [last - CHANGE_LOG_KEEP],
        )?;
    }
    Ok(())
}

// ---- the trait -----------------------------------------------------------

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> Result<MigrationReport, StoreError> {
        self.call(|conn| {
            let mut applied = Vec::new();
            loop {
                let (step, current) = migrate_step(conn, migrations::SQLITE)?;
                match step {
                    Some(version) => applied.push(version),
                    None => return Ok(MigrationReport { applied, current }),
                }
            }
        })
        .await
    }

    async fn check_schema(&self) -> Result<u32, StoreError> {
        let current = self
            .call(|conn| {
                let exists: bool = conn.query_row(
                    "SELECT EXISTS (SELECT 1 FROM sqlite_master \
                     WHERE type = 'table' AND name = 'schema_migrations')",
                    [],
                    |row| row.get(0),
                )?;
                if !exists {
                    return Ok(0);
                }
                Ok(conn.query_row(
                    "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                    [],
                    |row| row.get::<_, u32>(0),
                )?)
            })
            .await?;
        migrations::check_current(migrations::SQLITE, current)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.call(|conn| Ok(conn.query_row("SELECT 1", [], |_| Ok(()))?))
            .await
    }
}

#[async_trait]
impl AccountStore for SqliteStore {
    async fn create_customer(&self, new: NewCustomer) -> Result<Customer, StoreError> {
        self.call(move |conn| {
            let mut statement = conn.prepare_cached(&format!(
                "INSERT INTO customers (id, name, tier, overrides, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5) RETURNING {CUSTOMER_COLUMNS}"
            ))?;
            let inserted = first(
                &mut statement,
                params![
                    new.id.to_string(),
                    new.name,
                    new.tier,
                    new.overrides.to_string(),
                    ts(new.created_at),
                ],
                customer_row,
            );
            inserted
                .map_err(|failure| refused(failure, &new))?
                .ok_or_else(|| corrupt("INSERT … RETURNING returned no row".to_owned()))
        })
        .await
    }

    async fn customer(&self, id: CustomerId) -> Result<Option<Customer>, StoreError> {
        self.call(move |conn| customer_by_id(conn, id.0)).await
    }

    async fn customer_named(&self, name: &str) -> Result<Option<Customer>, StoreError> {
        let name = name.to_owned();
        self.call(move |conn| {
            let mut statement = conn.prepare_cached(&format!(
                "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE name = ?1"
            ))?;
            first(&mut statement, [name], customer_row)
        })
        .await
    }

    async fn list_customers(&self, page: Page<CustomerId>) -> Result<Vec<Customer>, StoreError> {
        self.call(move |conn| {
            let limit = i64::from(page.limit);
            match page.after {
                Some(after) => {
                    let mut statement = conn.prepare_cached(&format!(
                        "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE id > ?1 ORDER BY id LIMIT ?2"
                    ))?;
                    all(&mut statement, params![after.to_string(), limit], customer_row)
                }
                None => {
                    let mut statement = conn.prepare_cached(&format!(
                        "SELECT {CUSTOMER_COLUMNS} FROM customers ORDER BY id LIMIT ?1"
                    ))?;
                    all(&mut statement, [limit], customer_row)
                }
            }
        })
        .await
    }

    async fn update_customer(
        &self,
        id: CustomerId,
        update: CustomerUpdate,
    ) -> Result<Customer, StoreError> {
        self.call(move |conn| {
            let mut statement = conn.prepare_cached(&format!(
                "UPDATE customers SET tier = COALESCE(?2, tier), overrides = COALESCE(?3, overrides) \
                 WHERE id = ?1 RETURNING {CUSTOMER_COLUMNS}"
            ))?;
            let overrides = update.overrides.as_ref().map(serde_json::Value::to_string);
            first(
                &mut statement,
                params![id.to_string(), update.tier, overrides],
                customer_row,
            )?
            .ok_or_else(|| StoreError::NotFound(format!("customer {id}")).into())
        })
        .await
    }

    async fn create_key(&self, new: NewKey) -> Result<KeyRecord, StoreError> {
        self.call(move |conn| insert_key(conn, &new)).await
    }

    async fn key(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.call(move |conn| key_by_id(conn, id)).await
    }

    async fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<KeyRecord>, StoreError> {
        let prefix = prefix.to_owned();
        self.call(move |conn| {
            let mut statement = conn.prepare_cached(&format!(
                "SELECT {KEY_COLUMNS} FROM api_keys WHERE prefix = ?1 ORDER BY id"
            ))?;
            all(&mut statement, [prefix], key_row)
        })
        .await
    }

    async fn list_keys(
        &self,
        filter: KeyFilter,
        page: Page<KeyId>,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        self.call(move |conn| {
            let mut args: Vec<Value> = Vec::new();
            let sql = list_keys_sql(KEY_COLUMNS, &filter, page, |arg| {
                args.push(match arg {
                    KeyArg::Customer(id) => Value::Text(id.to_string()),
                    KeyArg::After(id) => Value::Text(id.to_string()),
                    KeyArg::Now(now) => Value::Text(ts(now)),
                    KeyArg::Limit(limit) => Value::Integer(i64::from(limit)),
                });
                format!("?{}", args.len())
            });
            let mut statement = conn.prepare_cached(&sql)?;
            all(&mut statement, params_from_iter(args), key_row)
        })
        .await
    }

    async fn update_key(&self, id: KeyId, update: KeyUpdate) -> Result<KeyRecord, StoreError> {
        self.call(move |conn| {
            // Each field: a flag saying whether to set it, and the value
            // (NULL clears). Limits are the family's: the other keys of
            // the family get them in the same transaction.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let limits = update
                .limits
                .as_ref()
                .map(|limits| limits.as_ref().map(|limits| limits.to_json().to_string()));
            if let Some(limits) = &limits {
                tx.prepare_cached(
                    "UPDATE api_keys SET limits = ?2 WHERE id <> ?1 \
                     AND family_id = (SELECT family_id FROM api_keys WHERE id = ?1)",
                )?
                .execute(params![id.to_string(), limits])?;
            }
            let mut statement = tx.prepare_cached(&format!(
                "UPDATE api_keys SET \
                 name = CASE WHEN ?2 THEN ?3 ELSE name END, \
                 routes = CASE WHEN ?4 THEN ?5 ELSE routes END, \
                 expires_at = CASE WHEN ?6 THEN ?7 ELSE expires_at END, \
                 limits = CASE WHEN ?8 THEN ?9 ELSE limits END \
                 WHERE id = ?1 RETURNING {KEY_COLUMNS}"
            ))?;
            let routes = match &update.routes {
                Some(Some(routes)) => Some(serde_json::to_string(routes)?),
                _ => None,
            };
            let updated = first(
                &mut statement,
                params![
                    id.to_string(),
                    update.name.is_some(),
                    update.name.clone().flatten(),
                    update.routes.is_some(),
                    routes,
                    update.expires_at.is_some(),
                    update.expires_at.flatten().map(ts),
                    limits.is_some(),
                    limits.flatten(),
                ],
                key_row,
            )?
            .ok_or_else(|| StoreError::NotFound(format!("key {id}")))?;
            drop(statement);
            tx.commit()?;
            Ok(updated)
        })
        .await
    }

    async fn revoke_key(&self, id: KeyId, at: OffsetDateTime) -> Result<KeyRecord, StoreError> {
        self.call(move |conn| {
            let mut statement = conn.prepare_cached(&format!(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1 \
                 RETURNING {KEY_COLUMNS}"
            ))?;
            first(&mut statement, params![id.to_string(), ts(at)], key_row)?
                .ok_or_else(|| StoreError::NotFound(format!("key {id}")).into())
        })
        .await
    }

    async fn rotate_key(
        &self,
        old: KeyId,
        new: NewKey,
        old_expires_at: OffsetDateTime,
    ) -> Result<(KeyRecord, KeyRecord), StoreError> {
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let old_key =
                key_by_id(&tx, old)?.ok_or_else(|| StoreError::NotFound(format!("key {old}")))?;
            let expires_at = old_key.expiry_after_rotation(old_expires_at)?;
            let created = insert_key(&tx, &old_key.successor(new))?;
            let updated = {
                let mut statement = tx.prepare_cached(&format!(
                    "UPDATE api_keys SET expires_at = ?2 WHERE id = ?1 RETURNING {KEY_COLUMNS}"
                ))?;
                first(
                    &mut statement,
                    params![old.to_string(), ts(expires_at)],
                    key_row,
                )?
                .ok_or_else(|| StoreError::NotFound(format!("key {old}")))?
            };
            tx.commit()?;
            Ok((updated, created))
        })
        .await
    }

    async fn load_keys(
        &self,
        sink: &mut (dyn FnMut(Vec<KeyRecord>) + Send),
    ) -> Result<(), StoreError> {
        // Keyset pages, each its own short read, so the gateway's writes are
        // never held up behind one long scan.
        let mut after: Option<KeyId> = None;
        loop {
            let batch = self
                .call(move |conn| {
                    let limit = KEY_BATCH as i64;
                    match after {
                        Some(after) => {
                            let mut statement = conn.prepare_cached(&format!(
                                "SELECT {KEY_COLUMNS} FROM api_keys WHERE id > ?1 ORDER BY id LIMIT ?2"
                            ))?;
                            all(&mut statement, params![after.to_string(), limit], key_row)
                        }
                        None => {
                            let mut statement = conn.prepare_cached(&format!(
                                "SELECT {KEY_COLUMNS} FROM api_keys ORDER BY id LIMIT ?1"
                            ))?;
                            all(&mut statement, [limit], key_row)
                        }
                    }
                })
                .await?;
            let full = batch.len() == KEY_BATCH;
            after = batch.last().map(|record| record.id);
            if !batch.is_empty() {
                sink(batch);
            }
            if !full {
                return Ok(());
            }
        }
    }
}

#[async_trait]
impl UsageSink for SqliteStore {
    async fn write_usage(&self, batch: &[UsageEvent]) -> Result<u64, StoreError> {
        if batch.is_empty() {
            return Ok(0);
        }
        // The blocking pool needs owned data; a copy costs far less than
        // the inserts.
        let batch = batch.to_vec();
        self.call(move |conn| write_usage(conn, &batch)).await
    }
}

#[async_trait]
impl UsageReports for SqliteStore {
    async fn period_totals(
        &self,
        days: Range<Date>,
    ) -> Result<HashMap<CustomerId, PeriodTotals>, StoreError> {
        self.call(move |conn| reports::period_totals(conn, days))
            .await
    }

    async fn key_period_totals(
        &self,
        days: Range<Date>,
    ) -> Result<HashMap<KeyId, PeriodTotals>, StoreError> {
        self.call(move |conn| reports::key_period_totals(conn, days))
            .await
    }

    async fn usage_summary(&self, filter: &UsageFilter) -> Result<UsageTotals, StoreError> {
        let filter = filter.clone();
        self.call(move |conn| reports::summary(conn, &filter)).await
    }

    async fn usage_grouped(
        &self,
        filter: &UsageFilter,
        group: UsageGroup,
    ) -> Result<Vec<(GroupKey, UsageTotals)>, StoreError> {
        let filter = filter.clone();
        self.call(move |conn| reports::grouped(conn, &filter, group))
            .await
    }

    async fn top_customers(
        &self,
        filter: &UsageFilter,
        by: Ranking,
        limit: u32,
    ) -> Result<Vec<(GroupKey, UsageTotals)>, StoreError> {
        let filter = filter.clone();
        self.call(move |conn| reports::top_customers(conn, &filter, by, limit))
            .await
    }

    async fn usage_events_page(
        &self,
        filter: &UsageFilter,
        after: Option<(OffsetDateTime, Uuid)>,
        limit: u32,
    ) -> Result<Vec<UsageEvent>, StoreError> {
        let filter = filter.clone();
        self.call(move |conn| reports::events_page(conn, &filter, after, limit))
            .await
    }

    async fn billing_usage(&self, period: Period) -> Result<Vec<BillingUsage>, StoreError> {
        self.call(move |conn| reports::billing_usage(conn, period))
            .await
    }

    async fn closed_period(&self, period: Period) -> Result<Option<ClosedPeriod>, StoreError> {
        self.call(move |conn| reports::closed_period(conn, period))
            .await
    }

    async fn close_period(
        &self,
        period: Period,
        lines: &[BillingLine],
        at: OffsetDateTime,
    ) -> Result<ClosedPeriod, StoreError> {
        let lines = lines.to_vec();
        self.call(move |conn| reports::close_period(conn, period, &lines, at))
            .await
    }
}

#[async_trait]
impl ChangeFeed for SqliteStore {
    async fn watch(&self, events: mpsc::Sender<StoreEvent>) {
        let mut feed = Some(Feed {
            conn: None,
            last: None,
            polls: 0,
        });
        let mut ticker = tokio::time::interval(POLL_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut delay = backoff::FIRST;
        loop {
            tokio::select! {
                () = events.closed() => return,
                _ = ticker.tick() => {}
            }
            let Some(mut current) = feed.take() else {
                return;
            };
            let path = self.path.clone();
            let polled = tokio::task::spawn_blocking(move || {
                let result = current.poll(&path);
                (current, result)
            })
            .await;
            let result = match polled {
                Ok((state, result)) => {
                    feed = Some(state);
                    result
                }
                // The poll panicked: its position is lost, so start over
                // from the log's end and tell the caller to reload.
                Err(error) => {
                    feed = Some(Feed {
                        conn: None,
                        last: None,
                        polls: 0,
                    });
                    tracing::error!(message = "Change-log poll panicked; resynchronising.", %error);
                    Ok(vec![StoreEvent::Resync])
                }
            };
            match result {
                Ok(batch) => {
                    delay = backoff::FIRST;
                    for event in batch {
                        if events.send(event).await.is_err() {
                            return;
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(
                        message = "Change-log poll failed; retrying.",
                        %error,
                        retry_in_ms = delay.as_millis() as u64,
                    );
                    if !backoff::wait(&events, &mut delay).await {
                        return;
                    }
                }
            }
        }
    }
}

#[async_trait]
impl WebhookOutbox for SqliteStore {
    async fn record_event(&self, event: &NewEvent, urls: &[String]) -> Result<bool, StoreError> {
        let (event, urls) = (event.clone(), urls.to_vec());
        self.call(move |conn| webhooks::record_event(conn, &event, &urls))
            .await
    }

    async fn claim_deliveries(
        &self,
        now: OffsetDateTime,
        lease: Duration,
        limit: u32,
        skip: &[String],
    ) -> Result<Vec<Claimed>, StoreError> {
        let skip = skip.to_vec();
        self.call(move |conn| webhooks::claim(conn, None, now, lease, limit, &skip))
            .await
    }

    async fn claim_delivery(
        &self,
        id: Uuid,
        now: OffsetDateTime,
        lease: Duration,
    ) -> Result<Option<Claimed>, StoreError> {
        self.call(move |conn| Ok(webhooks::claim(conn, Some(id), now, lease, 1, &[])?.pop()))
            .await
    }

    async fn settle_delivery(
        &self,
        id: Uuid,
        attempt: u32,
        settlement: &Settlement,
    ) -> Result<(), StoreError> {
        let settlement = settlement.clone();
        self.call(move |conn| webhooks::settle(conn, id, attempt, &settlement))
            .await
    }

    async fn deliveries(
        &self,
        filter: DeliveryFilter,
        page: Page<Uuid>,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.call(move |conn| webhooks::list(conn, filter, page))
            .await
    }

    async fn delivery(&self, id: Uuid) -> Result<Option<Delivery>, StoreError> {
        self.call(move |conn| webhooks::one(conn, id)).await
    }

    async fn pending_deliveries(&self) -> Result<u64, StoreError> {
        self.call(|conn| webhooks::pending(conn)).await
    }

    async fn event_dedups(&self, since: OffsetDateTime) -> Result<Vec<String>, StoreError> {
        self.call(move |conn| webhooks::dedups(conn, since)).await
    }

    async fn expiring_keys(
        &self,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<Vec<ExpiringKey>, StoreError> {
        self.call(move |conn| webhooks::expiring_keys(conn, now, until))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn timestamps_are_utc_micros_with_z_and_round_trip() {
        let at = datetime!(2026-11-22 09:00:00.123456789 +01:00);
        let text = ts(at);
        assert_eq!(text, "2026-11-22T08:00:00.123456Z");
        assert_eq!(
            parse_ts(&text).ok(),
            Some(datetime!(2026-11-22 08:00:00.123456 UTC))
        );
        assert_eq!(
            ts(datetime!(0001-01-01 00:00 UTC)),
            "0001-01-01T00:00:00.000000Z"
        );
    }

    #[test]
    fn text_order_is_time_order() {
        let earlier = ts(datetime!(2026-01-01 00:00:00.9 UTC));
        let later = ts(datetime!(2026-01-01 00:00:01 UTC));
        assert!(earlier < later, "{earlier} < {later}");
    }

    #[test]
    fn bad_stored_timestamps_are_corrupt() {
        match parse_ts("yesterday").map_err(StoreError::from) {
            Err(StoreError::Corrupt(message)) => assert!(message.contains("yesterday")),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
}
