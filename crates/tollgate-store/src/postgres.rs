//! The production backend: Postgres, shared by any number of gateway
//! instances.
//!
//! Queries go through a deadpool pool of `pool_size` connections (no TLS).
//! The change feed does not: it holds one dedicated connection that
//! `LISTEN`s on `tollgate_changes`, where triggers on `api_keys` and
//! `customers` send `key:<uuid>` / `customer:<uuid>` at commit.
//!
//! Types: ids `uuid`, times `timestamptz`, digests `bytea`, routes
//! `text[]`, overrides `jsonb`.
//!
//! Usage rows go in by binary `COPY`, with their `usage_daily` and
//! `usage_customer_daily` sums, one
//! transaction a batch: straight into the month's partition of
//! `usage_events` when none of them is there yet, else through a temporary staging table and
//! `INSERT … ON CONFLICT DO NOTHING`, rolling up exactly the rows inserted
//! (see the usage section below). The monthly partitions of `usage_events`
//! are created at `migrate` (this month and the next two) and before a
//! batch that holds a month this store has not ensured yet.
//!
//! # Failure behaviour
//!
//! Nothing waits on the server for long: connecting, waiting for a pooled
//! connection and recycling one are each bounded by a few seconds, after
//! which the call is `Unavailable`; TCP keepalives notice a server that
//! vanished without closing the connection. The change feed reconnects
//! after any failure with backoff (100 ms doubling to 2 s) and sends
//! `Resync` once it is listening again, since notifications sent while it
//! was away are lost.
//!
//! A usage batch is one transaction: it is written whole or not at all.
//! A partition that this store ensured but that was dropped since (say by
//! a retention job) is created again and the batch retried once.

use self::copy::{CopyWriter, Fields};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::{poll_fn, Future};
use std::ops::Range;
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime,
};
use time::{Date, OffsetDateTime};
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::types::{FromSql, ToSql, Type};
use tokio_postgres::{AsyncMessage, NoTls, Row, SimpleQueryMessage, Socket};
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

use crate::migrations;
use crate::usage::{self, bigint, text, CustomerDay, Groups, Rollup, Row as UsageRow};
use crate::{
    backoff, change_event, key_limits_from, list_keys_sql, Constraint, Inserted, KeyArg,
    CUSTOMER_COLUMNS, KEY_BATCH, KEY_COLUMNS,
};

/// Bound on opening a connection (unless the URL sets `connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on waiting for, creating or recycling a pooled connection.
const POOL_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a usage write may take before it counts as failed (a batch of
/// thousands of rows takes tens of milliseconds): one hung on a lock or on
/// a connection gone silent would otherwise keep the database up in the
/// gateway's eyes, and the spool from refusing, for as long as it hangs.
pub(crate) const USAGE_WRITE_TIMEOUT: Duration = Duration::from_secs(15);
/// TCP keepalive: first probe after this much silence…
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// …then every this often…
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// …and the connection is dead after this many unanswered probes.
const KEEPALIVE_RETRIES: u32 = 3;
/// Bound on the change feed's connect-and-LISTEN.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Subscribes to the NOTIFY channel the triggers of migration 1 use.
const LISTEN: &str = "LISTEN tollgate_changes";
/// The advisory lock serializing `migrate` across processes ("tollgate" in
/// ASCII).
const MIGRATION_LOCK: i64 = 0x746f_6c6c_6761_7465;

/// The Postgres [`Store`].
pub struct PostgresStore {
    pool: Pool,
    /// For the change feed's own connection.
    config: tokio_postgres::Config,
    /// The months (first days) whose `usage_events` partition this store
    /// has ensured. Only grows, by a few entries a month; a lock held for a
    /// lookup, never across an await.
    partitions: Mutex<HashSet<Date>>,
    /// Months whose partition refused a direct COPY (see [`CopyTarget`]):
    /// their rows go through `usage_events` until the gateway restarts.
    /// Only grows, and only when an operator changed a partition by hand.
    through_parent: Mutex<HashSet<Date>>,
}

/// What a call can fail with; classified into a [`StoreError`] at its end.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    /// A table named as a `usage_events` partition is not one (now).
    #[error("{0}")]
    NotAPartition(String),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<Failure> for StoreError {
    fn from(failure: Failure) -> StoreError {
        match failure {
            Failure::Store(error) => error,
            Failure::NotAPartition(message) => StoreError::Corrupt(message),
            Failure::Postgres(error) => classify(error),
            Failure::Pool(PoolError::Backend(error)) => classify(error),
            Failure::Pool(error) => StoreError::Unavailable(Box::new(error)),
        }
    }
}

fn classify(error: tokio_postgres::Error) -> StoreError {
    let Some(db) = error.as_db_error() else {
        // I/O, a closed connection, a timeout, a protocol error.
        return StoreError::Unavailable(Box::new(error));
    };
    let code = db.code().code();
    match code.get(..2).unwrap_or_default() {
        // Connection exception, transaction rollback (serialization,
        // deadlock), insufficient resources, lock not available, operator
        // intervention (shutdown, termination), system error.
        "08" | "40" | "53" | "55" | "57" | "58" => StoreError::Unavailable(Box::new(error)),
        "23" => StoreError::Conflict(db.message().to_owned()),
        "42" if *db.code() == SqlState::UNDEFINED_TABLE
            || *db.code() == SqlState::UNDEFINED_FUNCTION =>
        {
            StoreError::Config(format!(
                "{}; the schema is not migrated (run `tollgate migrate`)",
                db.message()
            ))
        }
        // Authorization, unknown database, permissions and undefined names.
        "28" | "3D" | "42" => StoreError::Config(db.message().to_owned()),
        _ => StoreError::Corrupt(format!("{} (SQLSTATE {code})", db.message())),
    }
}

/// The constraints whose violation callers are told about in their own
/// terms, by the names migration 1 gives them (explicitly, or Postgres's
/// defaults `<table>_pkey` and `<table>_<column>_fkey`).
const CONSTRAINTS: [(&str, Constraint); 5] = [
    ("customers_name_unique", Constraint::CustomerName),
    ("customers_pkey", Constraint::CustomerId),
    ("api_keys_digest_unique", Constraint::KeyDigest),
    ("api_keys_pkey", Constraint::KeyId),
    ("api_keys_customer_id_fkey", Constraint::KeyCustomer),
];

/// `failure`, or what it means for inserting `new` when it broke one of
/// the [`CONSTRAINTS`].
fn refused(failure: Failure, new: &impl Inserted) -> Failure {
    let reported = match &failure {
        Failure::Postgres(error) => error
            .as_db_error()
            .filter(|db| {
                *db.code() == SqlState::UNIQUE_VIOLATION
                    || *db.code() == SqlState::FOREIGN_KEY_VIOLATION
            })
            .and_then(|db| db.constraint()),
        _ => None,
    };
    crate::refusal(&CONSTRAINTS, reported, new).map_or(failure, Failure::from)
}

fn decode_key_limits(json: &serde_json::Value) -> Result<KeyLimits, Failure> {
    key_limits_from(json).map_err(corrupt)
}

fn corrupt(message: String) -> Failure {
    Failure::Store(StoreError::Corrupt(message))
}

impl PostgresStore {
    /// A store on the database at `url` with a pool of `pool_size`
    /// connections. Connects lazily: this fails only for a bad URL or size.
    pub fn new(url: &str, pool_size: usize) -> Result<PostgresStore, StoreError> {
        if pool_size == 0 {
            return Err(StoreError::Config(
                "the Postgres pool size must be at least 1".to_owned(),
            ));
        }
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|error| StoreError::Config(format!("invalid Postgres URL: {error}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("tollgate");
        }
        config
            .keepalives(true)
            .keepalives_idle(KEEPALIVE_IDLE)
            .keepalives_interval(KEEPALIVE_INTERVAL)
            .keepalives_retries(KEEPALIVE_RETRIES);
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                // A broken connection is noticed by the query that uses it
                // (and is then dropped); checking each one first would cost
                // a round trip per call.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .build()
            .map_err(|error| StoreError::Config(format!("cannot build the pool: {error}")))?;
        Ok(PostgresStore {
            pool,
            config,
            partitions: Mutex::new(HashSet::new()),
            through_parent: Mutex::new(HashSet::new()),
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, Failure> {
        Ok(self.pool.get().await?)
    }

    /// Makes sure the `usage_events` partitions of `months` (first days)
    /// exist, asking the database only about months this store has not
    /// ensured yet. Each call is its own short transaction, outside any
    /// write: the function's advisory lock and `ATTACH` never wait on a
    /// transaction of this connection.
    async fn ensure_partitions(
        &self,
        client: &impl GenericClient,
        months: &BTreeSet<Date>,
    ) -> Result<(), Failure> {
        let missing: Vec<Date> = {
            let ensured = self
                .partitions
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            months
                .iter()
                .filter(|month| !ensured.contains(*month))
                .copied()
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let statement = client.prepare_cached(ENSURE_PARTITION).await?;
        for month in missing {
            match client.query_one(&statement, &[&month]).await {
                Ok(row) => {
                    if get::<bool>(&row, 0)? {
                        tracing::info!(message = "Created a usage_events partition.", %month);
                    }
                }
                // The month's name is no partition, yet a partition by
                // another name (renamed, say) covers the month: that one
                // takes its rows, through usage_events.
                Err(error) if error.code() == Some(&SqlState::INVALID_OBJECT_DEFINITION) => {
                    tracing::warn!(
                        message = "A usage_events partition by another name covers this month; writing the month through usage_events until restart.",
                        %month,
                        %error,
                    );
                    self.through_parent
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(month);
                }
                Err(error) => return Err(error.into()),
            }
            self.partitions
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(month);
        }
        Ok(())
    }

    /// Whether any of `months` has to be written through `usage_events`.
    fn goes_through_parent(&self, months: &BTreeSet<Date>) -> bool {
        let parent = self
            .through_parent
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        months.iter().any(|month| parent.contains(month))
    }

    /// Forgets that `months` were ensured, so the next write asks again.
    fn forget_partitions(&self, months: &BTreeSet<Date>) {
        let mut ensured = self
            .partitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for month in months {
            ensured.remove(month);
        }
    }

    /// [`UsageSink::write_usage`], or with `deduplicate`
    /// [`UsageSink::write_usage_deduplicated`]: the deduplicating way at once.
    async fn write_usage_batch(
        &self,
        batch: &[UsageEvent],
        deduplicate: bool,
    ) -> Result<u64, StoreError> {
        if batch.is_empty() {
            return Ok(0);
        }
        run(async {
            let rows = usage::rows(batch)?;
            let months = months(&rows);
            let mut client = self.client().await?;
            let write = self.write_rows(&mut client, &rows, &months, deduplicate);
            match tokio::time::timeout(USAGE_WRITE_TIMEOUT, write).await {
                Ok(written) => written,
                Err(_) => {
                    // Hung (a lock, a connection that went silent): the
                    // rows stay in the spool to be written again, and the
                    // connection, in a state no one knows (mid-COPY, say),
                    // is not given back to the pool.
                    drop(deadpool_postgres::Object::take(client));
                    Err(Failure::Store(StoreError::Unavailable(
                        format!(
                            "a usage write took longer than {} s",
                            USAGE_WRITE_TIMEOUT.as_secs()
                        )
                        .into(),
                    )))
                }
            }
        })
        .await
    }

    /// The rows of one batch in one transaction on `client`, their
    /// months' partitions made first.
    async fn write_rows(
        &self,
        client: &mut deadpool_postgres::Client,
        rows: &[UsageRow<'_>],
        months: &BTreeSet<Date>,
        deduplicate: bool,
    ) -> Result<u64, Failure> {
        self.ensure_partitions(client, months).await?;
        let mut partitions_checked = false;
        let mut target = if self.goes_through_parent(months) {
            CopyTarget::Parent
        } else {
            CopyTarget::Partitions
        };
        loop {
            let attempt = if deduplicate {
                write_deduplicated(client, rows).await
            } else {
                write_new(client, rows, months, target).await
            };
            let written = match attempt {
                Err(failure) if !deduplicate && already_written(&failure) => {
                    tracing::debug!(
                        message = "Usage batch holds rows written before; deduplicating.",
                        rows = rows.len(),
                    );
                    write_deduplicated(client, rows).await
                }
                Err(failure)
                    if !deduplicate
                        && target == CopyTarget::Partitions
                        && partition_unusable(&failure) =>
                {
                    tracing::warn!(
                        message = "A usage_events partition cannot take rows directly; writing its months through usage_events until restart.",
                        months = ?months,
                        error = %failure,
                    );
                    self.through_parent
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .extend(months.iter().copied());
                    target = CopyTarget::Parent;
                    continue;
                }
                written => written,
            };
            match written {
                Err(failure) if no_partition(&failure) && !partitions_checked => {
                    tracing::warn!(
                        message = "A usage_events partition went missing; creating it again.",
                        error = %failure,
                    );
                    self.forget_partitions(months);
                    self.ensure_partitions(client, months).await?;
                    partitions_checked = true;
                }
                written => return written,
            }
        }
    }
}

mod copy;
mod reports;
mod webhooks;

/// Runs a call's body and classifies its failure.
async fn run<T>(work: impl Future<Output = Result<T, Failure>>) -> Result<T, StoreError> {
    work.await.map_err(StoreError::from)
}

// ---- decoding ------------------------------------------------------------

fn get<'a, T: FromSql<'a>>(row: &'a Row, index: usize) -> Result<T, Failure> {
    row.try_get(index)
        .map_err(|error| corrupt(error.to_string()))
}

fn customer_row(row: &Row) -> Result<Customer, Failure> {
    Ok(Customer {
        id: CustomerId(get(row, 0)?),
        name: get(row, 1)?,
        tier: get(row, 2)?,
        overrides: get(row, 3)?,
        created_at: get(row, 4)?,
    })
}

fn key_row(row: &Row) -> Result<KeyRecord, Failure> {
    let digest: &[u8] = get(row, 2)?;
    Ok(KeyRecord {
        id: KeyId(get(row, 0)?),
        customer_id: CustomerId(get(row, 1)?),
        digest: <[u8; 32]>::try_from(digest)
            .map(KeyDigest)
            .map_err(|_| corrupt(format!("a key digest of {} bytes", digest.len())))?,
        prefix: get(row, 3)?,
        name: get(row, 4)?,
        routes: get(row, 5)?,
        created_at: get(row, 6)?,
        expires_at: get(row, 7)?,
        revoked_at: get(row, 8)?,
        family_id: KeyId(get(row, 9)?),
        limits: get::<Option<serde_json::Value>>(row, 10)?
            .map(|json| decode_key_limits(&json))
            .transpose()?,
    })
}

fn decode_all<T>(rows: &[Row], decode: fn(&Row) -> Result<T, Failure>) -> Result<Vec<T>, Failure> {
    rows.iter().map(decode).collect()
}

// ---- shared statements -----------------------------------------------------

async fn key_by_id(
    client: &impl GenericClient,
    id: KeyId,
    lock: bool,
) -> Result<Option<KeyRecord>, Failure> {
    let sql = format!(
        "SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    let statement = client.prepare_cached(&sql).await?;
    client
        .query_opt(&statement, &[&id.0])
        .await?
        .as_ref()
        .map(key_row)
        .transpose()
}

/// Locks every key of `key`'s rotation family, in id order (so that two
/// transactions locking one family cannot deadlock).
async fn lock_family(client: &impl GenericClient, key: KeyId) -> Result<(), Failure> {
    let statement = client
        .prepare_cached(
            "SELECT id FROM api_keys WHERE family_id = \
             (SELECT family_id FROM api_keys WHERE id = $1) ORDER BY id FOR UPDATE",
        )
        .await?;
    client.query(&statement, &[&key.0]).await?;
    Ok(())
}

async fn customer_by_id(
    client: &impl GenericClient,
    id: Uuid,
) -> Result<Option<Customer>, Failure> {
    let statement = client
        .prepare_cached(&format!(
            "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE id = $1"
        ))
        .await?;
    client
        .query_opt(&statement, &[&id])
        .await?
        .as_ref()
        .map(customer_row)
        .transpose()
}

async fn insert_key(client: &impl GenericClient, new: &NewKey) -> Result<KeyRecord, Failure> {
    let statement = client
        .prepare_cached(&format!(
            "INSERT INTO api_keys (id, customer_id, digest, prefix, name, routes, created_at, \
             expires_at, family_id, limits) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING {KEY_COLUMNS}"
        ))
        .await?;
    let digest: &[u8] = &new.digest.0;
    let row = client
        .query_one(
            &statement,
            &[
                &new.id.0,
                &new.customer_id.0,
                &digest,
                &new.prefix,
                &new.name,
                &new.routes,
                &new.created_at,
                &new.expires_at,
                &new.family_id.0,
                &new.limits.as_ref().map(KeyLimits::to_json),
            ],
        )
        .await
        .map_err(|error| refused(error.into(), new))?;
    key_row(&row)
}

// ---- change feed -----------------------------------------------------------

type Connection = tokio_postgres::Connection<Socket, NoTlsStream>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

const CLOSED: &str = "the server closed the connection";

/// Why a listening session ended.
enum Ended {
    /// The receiver is gone: the feed is over.
    ReceiverGone,
    /// The connection failed or closed.
    Lost(Option<tokio_postgres::Error>),
}

/// Opens a connection and `LISTEN`s on it. The connection must be polled
/// for the `LISTEN` to complete, so both run here together.
async fn listen(
    config: &tokio_postgres::Config,
) -> Result<(tokio_postgres::Client, Connection), BoxError> {
    let (client, mut connection) = config.connect(NoTls).await?;
    {
        let listening = client.batch_execute(LISTEN);
        tokio::pin!(listening);
        loop {
            tokio::select! {
                done = &mut listening => {
                    done?;
                    break;
                }
                message = poll_fn(|cx| connection.poll_message(cx)) => match message {
                    // Nothing can be notified before LISTEN completes;
                    // notices are of no interest.
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return Err(error.into()),
                    None => return Err(CLOSED.into()),
                },
            }
        }
    }
    Ok((client, connection))
}

/// Forwards notifications from `connection` until it fails or the
/// receiver goes away.
async fn forward(connection: &mut Connection, events: &mpsc::Sender<StoreEvent>) -> Ended {
    loop {
        let message = tokio::select! {
            () = events.closed() => return Ended::ReceiverGone,
            message = poll_fn(|cx| connection.poll_message(cx)) => message,
        };
        let event = match message {
            Some(Ok(AsyncMessage::Notification(notification))) => {
                let payload = notification.payload();
                let parsed = payload
                    .split_once(':')
                    .and_then(|(kind, id)| change_event(kind, id));
                parsed.unwrap_or_else(|| {
                    tracing::warn!(
                        message = "Unreadable change notification; resynchronising.",
                        payload
                    );
                    StoreEvent::Resync
                })
            }
            Some(Ok(_)) => continue,
            Some(Err(error)) => return Ended::Lost(Some(error)),
            None => return Ended::Lost(None),
        };
        if events.send(event).await.is_err() {
            return Ended::ReceiverGone;
        }
    }
}

// ---- migrations ------------------------------------------------------------

const CREATE_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

// ---- usage -----------------------------------------------------------------
//
// A batch is written in one of two ways, each one transaction:
//
// - New rows (nearly every batch): binary COPY straight into the month's
//   partition of `usage_events` (or through `usage_events` itself when that
//   partition is not what its name says), then one upsert of the batch's `usage_daily` groups, summed in Rust,
//   and one of its `usage_customer_daily` rows (the groups summed per day
//   and customer), pipelined behind it. A small write sends the COPY and
//   the first upsert in pieces (see `Pieces`).
//   If any row is already there, the primary key, `(ts, id)`, fails the
//   COPY and the transaction is rolled back whole, nothing written. That
//   key is the table's only index (migration 7): it also serves the
//   export's `(ts, id)` keyset, so each row costs one b-tree entry, not
//   two.
// - Then, and only then, deduplicating: binary COPY into a staging table,
//   `INSERT … ON CONFLICT DO NOTHING RETURNING` into `usage_events`, and
//   the rollups of exactly the rows that statement inserted (usage_daily
//   in that statement, usage_customer_daily from the day × customer sums
//   it returns).
//
// Rows already present come from replays: the spool resends a batch whose
// commit it did not see acknowledged. That is rare, so the cheap way comes
// first. COPY inserts a page at a time and skips the speculative insertion
// that ON CONFLICT does for every row, and Rust sums the groups while the
// rows stream: benches/usage_write.rs measured about 210,000 rows/s this
// way against 110,000 through staging alone (2 cores, client and server on
// one machine). The cost of a replayed batch is one failed COPY, which the
// Postgres log shows as a unique violation on the partition's primary key;
// `write_usage_deduplicated`, which the recorder uses for the batches likeliest
// to hold such rows (the first after a restart or a failed write), goes
// the deduplicating way at once instead.

/// Creates the partition of `usage_events` for a month (migration 2).
const ENSURE_PARTITION: &str = "SELECT tollgate_ensure_usage_partition($1)";

/// The columns of `usage_events`, in the order [`EventValues`] gives them.
macro_rules! event_columns {
    () => {
        "id, client_request_id, ts, customer_id, key_id, instance, route, method, path, \
         status, outcome, latency_us, upstream_latency_us, request_bytes, response_bytes, \
         model, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, \
         cost_nanos, cost_source"
    };
}

/// Adds an incoming `usage_daily` row to the stored one (`d`), saturating
/// ([`add_sums!`]).
macro_rules! add_to_daily {
    () => {
        concat!(
            "ON CONFLICT (day, customer_id, key_id, route, model) DO UPDATE SET ",
            add_sums!("d.")
        )
    };
}

const COPY_EVENTS: &str = concat!(
    "COPY usage_events (",
    event_columns!(),
    ") FROM STDIN (FORMAT binary)"
);

/// [`COPY_EVENTS`] straight into the partition of `month` (a first day),
/// by the name `tollgate_ensure_usage_partition` gives it.
fn copy_into_partition(month: Date) -> String {
    format!(
        concat!(
            "COPY {} (",
            event_columns!(),
            ") FROM STDIN (FORMAT binary)"
        ),
        partition_name(month)
    )
}

/// `usage_events_YYYY_MM`, the partition of `month`.
fn partition_name(month: Date) -> String {
    format!(
        "usage_events_{:04}_{:02}",
        month.year(),
        u8::from(month.month())
    )
}

/// Locks the tables `names` (partitions, by name) as the COPY into them
/// would, then counts those a COPY can go straight into: attached
/// partitions of `usage_events`, not being detached, that this role may
/// insert into and that have no row-level security (which COPY FROM
/// refuses). One round trip, before the COPY, because a COPY that fails
/// before it starts (no such table, no privilege) breaks the client's
/// connection. The lock keeps a plain DETACH out until the transaction
/// ends. The names are [`partition_name`]s: nothing to quote.
fn lock_and_count_attached(names: &[String]) -> String {
    let regclasses: Vec<String> = names
        .iter()
        .map(|name| format!("'{name}'::regclass"))
        .collect();
    format!(
        "LOCK TABLE {} IN ROW EXCLUSIVE MODE;
         SELECT count(*) FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'usage_events'::regclass AND NOT i.inhdetachpending
           AND has_table_privilege(i.inhrelid, 'INSERT') AND NOT c.relrowsecurity
           AND i.inhrelid IN ({})",
        names.join(", "),
        regclasses.join(", ")
    )
}

/// Where [`write_new`] copies rows to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CopyTarget {
    /// Each month's partition, by name, checked to be attached: the
    /// database then skips routing every row through the parent (some 7%
    /// of its CPU per row, `benches/usage_write.rs`).
    Partitions,
    /// `usage_events`, which routes each row: for when a partition is not
    /// where its name says (renamed, replaced by hand, other bounds).
    Parent,
}

/// The column types of [`COPY_EVENTS`], in order.
const EVENT_TYPES: [Type; 22] = [
    Type::UUID,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::UUID,
    Type::UUID,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT4,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
];

/// Adds the batch's groups, one array per column, to `usage_daily`, in
/// the order given: [`Groups`] order, which is the table's key order
/// (bytewise texts), as in [`INSERT_FROM_STAGING`], so that two writers
/// touching the same groups lock them in the same order.
const UPSERT_DAILY: &str = concat!(
    "INSERT INTO usage_daily AS d (
        day, customer_id, key_id, route, model, requests, rejected, errors, input_tokens,
        output_tokens, cache_read_tokens, cache_write_tokens, request_bytes, response_bytes,
        cost_nanos)
    SELECT * FROM unnest(
        $1::date[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::bigint[], $7::bigint[],
        $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[], $13::bigint[],
        $14::bigint[], $15::bigint[])
    ",
    add_to_daily!()
);

/// Adds the batch's customer days (day × customer, the sums of its groups),
/// one array per column, to `usage_customer_daily`, clamped as in
/// [`add_to_daily!`], in key order. Every writer upserts `usage_daily`
/// first and this table second, each in key order, so that no two can
/// deadlock.
const UPSERT_CUSTOMER_DAILY: &str = concat!(
    "INSERT INTO usage_customer_daily AS d (
        day, customer_id, requests, rejected, errors, input_tokens, output_tokens,
        cache_read_tokens, cache_write_tokens, request_bytes, response_bytes, cost_nanos)
    SELECT * FROM unnest(
        $1::date[], $2::uuid[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[],
        $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[])
    ON CONFLICT (day, customer_id) DO UPDATE SET ",
    add_sums!("d.")
);

/// The staging table: the columns of `usage_events` plus what the rollup
/// needs and Rust defines (`UsageEvent::day`, `Outcome::is_rejected`,
/// `UsageEvent::is_error`). Temporary, so private to the connection and
/// never WAL-logged, and emptied at every commit.
///
/// Made once per connection, the first time it is needed
/// ([`staging_statements`]), not with `IF NOT EXISTS` in every batch: that
/// statement costs 0.6 to 0.9 ms a time (it builds the `LIKE` before it
/// looks), some 3 % of a 5,000-row batch.
const CREATE_STAGING: &str = "CREATE TEMPORARY TABLE IF NOT EXISTS usage_staging (
    LIKE usage_events INCLUDING DEFAULTS,
    day      date    NOT NULL,
    rejected boolean NOT NULL,
    error    boolean NOT NULL
) ON COMMIT DELETE ROWS";

const COPY_STAGING: &str = concat!(
    "COPY pg_temp.usage_staging (",
    event_columns!(),
    ", day, rejected, error) FROM STDIN (FORMAT binary)"
);

/// The column types of [`COPY_STAGING`], in order: [`EVENT_TYPES`], then
/// `day`, `rejected`, `error`.
static STAGING_TYPES: LazyLock<Vec<Type>> = LazyLock::new(|| {
    EVENT_TYPES
        .iter()
        .cloned()
        .chain([Type::DATE, Type::BOOL, Type::BOOL])
        .collect()
});

/// Moves the staged rows into `usage_events`, skipping those whose
/// (ts, id) is there already, adds the rows it inserted, and only those,
/// to `usage_daily`, and returns their customer days: day, customer, rows
/// inserted, then the sums of [`UPSERT_CUSTOMER_DAILY`], clamped, in key
/// order, for the caller to upsert next (after `usage_daily`, as
/// [`write_new`] does: one order of tables for all writers).
///
/// The rollup joins `RETURNING` back to the staging table, which holds each
/// id once (the batch is deduplicated before the COPY), so no row counts
/// twice. Groups go in key order, bytewise like `usage_daily`'s and like
/// [`UPSERT_DAILY`]'s, so that all writers lock groups in one order.
const INSERT_FROM_STAGING: &str = concat!(
    "WITH inserted AS (
        INSERT INTO usage_events (",
    event_columns!(),
    ")
        SELECT ",
    event_columns!(),
    " FROM pg_temp.usage_staging
        ON CONFLICT DO NOTHING
        RETURNING id, ts
    ), rolled_up AS (
        INSERT INTO usage_daily AS d (
            day, customer_id, key_id, route, model, requests, rejected, errors, input_tokens,
            output_tokens, cache_read_tokens, cache_write_tokens, request_bytes,
            response_bytes, cost_nanos)
        SELECT s.day, s.customer_id, s.key_id, s.route COLLATE \"C\",
            COALESCE(s.model, '') COLLATE \"C\",
            count(*) FILTER (WHERE NOT s.rejected),
            count(*) FILTER (WHERE s.rejected),
            count(*) FILTER (WHERE s.error),
            LEAST(sum(s.input_tokens), 9223372036854775807),
            LEAST(sum(s.output_tokens), 9223372036854775807),
            LEAST(sum(s.cache_read_tokens), 9223372036854775807),
            LEAST(sum(s.cache_write_tokens), 9223372036854775807),
            LEAST(sum(s.request_bytes), 9223372036854775807),
            LEAST(sum(s.response_bytes), 9223372036854775807),
            GREATEST(LEAST(sum(s.cost_nanos), 9223372036854775807), -9223372036854775808)
        FROM inserted AS i
        JOIN pg_temp.usage_staging AS s ON s.id = i.id AND s.ts = i.ts
        GROUP BY 1, 2, 3, 4, 5
        ORDER BY 1, 2, 3, 4, 5
        ",
    add_to_daily!(),
    "
    )
    SELECT s.day, s.customer_id, count(*),
        count(*) FILTER (WHERE NOT s.rejected),
        count(*) FILTER (WHERE s.rejected),
        count(*) FILTER (WHERE s.error),
        LEAST(sum(s.input_tokens), 9223372036854775807)::bigint,
        LEAST(sum(s.output_tokens), 9223372036854775807)::bigint,
        LEAST(sum(s.cache_read_tokens), 9223372036854775807)::bigint,
        LEAST(sum(s.cache_write_tokens), 9223372036854775807)::bigint,
        LEAST(sum(s.request_bytes), 9223372036854775807)::bigint,
        LEAST(sum(s.response_bytes), 9223372036854775807)::bigint,
        GREATEST(LEAST(sum(s.cost_nanos), 9223372036854775807),
                 -9223372036854775808)::bigint
    FROM inserted AS i
    JOIN pg_temp.usage_staging AS s ON s.id = i.id AND s.ts = i.ts
    GROUP BY 1, 2
    ORDER BY 1, 2"
);

/// The months (first days) that `rows` fall in.
fn months(rows: &[UsageRow<'_>]) -> BTreeSet<Date> {
    let mut months = BTreeSet::new();
    let mut last = None;
    for row in rows {
        let month = usage::month_of(row.day);
        // Batches are mostly one month: skip the set for repeats.
        if last != Some(month) {
            months.insert(month);
            last = Some(month);
        }
    }
    months
}

/// A write straight into partitions that they refused: one is missing,
/// not attached, not writable by this role, or holds other bounds than its
/// month.
fn partition_unusable(failure: &Failure) -> bool {
    match failure {
        Failure::NotAPartition(_) => true,
        Failure::Postgres(error) => {
            error.code() == Some(&SqlState::UNDEFINED_TABLE)
                || error.code() == Some(&SqlState::CHECK_VIOLATION)
        }
        _ => false,
    }
}

/// A row with no partition to go to: one this store ensured was dropped.
fn no_partition(failure: &Failure) -> bool {
    matches!(failure, Failure::Postgres(error) if error.code() == Some(&SqlState::CHECK_VIOLATION))
}

/// A row of the batch is in `usage_events` already.
fn already_written(failure: &Failure) -> bool {
    matches!(failure, Failure::Postgres(error) if error.code() == Some(&SqlState::UNIQUE_VIOLATION))
}

/// One row's `usage_events` values, converted for the COPY.
struct EventValues<'a> {
    row: &'a UsageRow<'a>,
    client_request_id: Option<Cow<'a, str>>,
    instance: Cow<'a, str>,
    route: Cow<'a, str>,
    method: Cow<'a, str>,
    path: Cow<'a, str>,
    status: i32,
    outcome: &'static str,
    cost_source: &'static str,
    /// latency_us, upstream_latency_us, request_bytes, response_bytes,
    /// input_tokens, output_tokens, cache_read_tokens, cache_write_tokens.
    counts: [i64; 8],
    model: Option<Cow<'a, str>>,
}

impl<'a> EventValues<'a> {
    fn new(row: &'a UsageRow<'a>) -> EventValues<'a> {
        let event = row.event;
        EventValues {
            row,
            client_request_id: event.client_request_id.as_deref().map(text),
            instance: text(&event.instance),
            route: text(&event.route),
            method: text(&event.method),
            path: text(&event.path),
            status: i32::from(event.status),
            outcome: event.outcome.as_str(),
            cost_source: event.cost_source.as_str(),
            counts: [
                event.latency_us,
                event.upstream_latency_us,
                event.request_bytes,
                event.response_bytes,
                event.input_tokens,
                event.output_tokens,
                event.cache_read_tokens,
                event.cache_write_tokens,
            ]
            .map(bigint),
            model: event.model.as_deref().map(text),
        }
    }

    /// The values of [`EventValues::params`], written straight into a COPY
    /// row: the way of the common path, thousands of rows a batch.
    fn write(&self, mut fields: Fields<'_>) {
        let event = self.row.event;
        fields
            .uuid(&event.id)
            .optional_text(self.client_request_id.as_deref())
            .timestamptz(self.row.ts)
            .uuid(&event.customer_id.0)
            .uuid(&event.key_id.0)
            .text(&self.instance)
            .text(&self.route)
            .text(&self.method)
            .text(&self.path)
            .int4(self.status)
            .text(self.outcome);
        for count in &self.counts[..4] {
            fields.int8(*count);
        }
        fields.optional_text(self.model.as_deref());
        for count in &self.counts[4..] {
            fields.int8(*count);
        }
        fields.int8(event.cost_nanos).text(self.cost_source);
    }

    /// In the order of [`event_columns!`] and [`EVENT_TYPES`].
    fn params(&self) -> [&(dyn ToSql + Sync); 22] {
        let event = self.row.event;
        let [latency, upstream_latency, request_bytes, response_bytes, input, output, cache_read, cache_write] =
            &self.counts;
        [
            &event.id,
            &self.client_request_id,
            &self.row.ts,
            &event.customer_id.0,
            &event.key_id.0,
            &self.instance,
            &self.route,
            &self.method,
            &self.path,
            &self.status,
            &self.outcome,
            latency,
            upstream_latency,
            request_bytes,
            response_bytes,
            &self.model,
            input,
            output,
            cache_read,
            cache_write,
            &event.cost_nanos,
            &self.cost_source,
        ]
    }
}

/// The way of writing for batches with no row written before: COPY into
/// `usage_events` (or straight into the partitions of `months`, the months
/// the rows are in), upsert the batch's groups, summed in Rust. Fails with
/// a unique violation, having written nothing, if any row exists already.
async fn write_new(
    client: &mut deadpool_postgres::Client,
    rows: &[UsageRow<'_>],
    months: &BTreeSet<Date>,
    target: CopyTarget,
) -> Result<u64, Failure> {
    let copies = match target {
        CopyTarget::Parent => vec![(None, client.prepare_cached(COPY_EVENTS).await?)],
        CopyTarget::Partitions => {
            let mut copies = Vec::with_capacity(months.len());
            for &month in months {
                let copy = client.prepare_cached(&copy_into_partition(month)).await?;
                copies.push((Some(month), copy));
            }
            copies
        }
    };
    let upsert = client.prepare_cached(UPSERT_DAILY).await?;
    let upsert_customers = client.prepare_cached(UPSERT_CUSTOMER_DAILY).await?;

    let tx = client.transaction().await?;
    if target == CopyTarget::Partitions {
        let names: Vec<String> = months.iter().map(|&month| partition_name(month)).collect();
        // Whatever goes wrong here (no such table, no privilege, a server
        // too old for the query) nothing is written yet: the caller goes
        // through `usage_events` instead.
        let answer = tx
            .simple_query(&lock_and_count_attached(&names))
            .await
            .map_err(|error| Failure::NotAPartition(format!("checking {names:?}: {error}")))?;
        let attached = answer.iter().find_map(|message| match message {
            SimpleQueryMessage::Row(row) => row.get(0),
            _ => None,
        });
        if attached != Some(names.len().to_string().as_str()) {
            return Err(Failure::NotAPartition(format!(
                "of {names:?}, only {} are attached partitions of usage_events this role can COPY into",
                attached.unwrap_or("none")
            )));
        }
    }
    let pieces = Pieces::of(rows.len());
    let mut inserted = 0;
    // Summing here, between sends, keeps it off the critical path: the
    // server is still inserting what was sent before.
    let mut groups = Groups::new();
    for (month, copy) in &copies {
        let in_month = |row: &&UsageRow<'_>| month.is_none_or(|m| usage::month_of(row.day) == m);
        let mut in_month = rows.iter().filter(in_month).peekable();
        while in_month.peek().is_some() {
            let sink = tx.copy_in(copy).await?;
            let mut writer = CopyWriter::new(sink, &EVENT_TYPES, pieces.rows.min(rows.len()));
            for row in in_month.by_ref().take(pieces.rows) {
                let values = EventValues::new(row);
                writer.write_fields(|fields| values.write(fields)).await?;
                groups.add(row);
            }
            inserted += writer.finish().await?;
        }
    }
    let groups = groups.into_sorted();
    let customers = CustomerDayArrays::new(&usage::customer_days(&groups));
    let mut upserts = groups.chunks(pieces.groups);
    let last = upserts.next_back().unwrap_or_default();
    for earlier in upserts {
        GroupArrays::new(earlier).upsert(&tx, &upsert).await?;
    }
    let last = GroupArrays::new(last);
    let daily = last.upsert(&tx, &upsert);
    // Pipelined: sent after the first, run after it, one round trip.
    let customer_daily = customers.upsert(&tx, &upsert_customers);
    tokio::try_join!(daily, customer_daily)?;
    tx.commit().await?;
    Ok(inserted)
}

/// How a write of new rows splits its work into statements: the rows of
/// one COPY and the groups of one `usage_daily` upsert.
///
/// The server works through a statement without a pause, and the kernel
/// lets a process that is running finish its time slice before one that
/// wakes on the same core gets it. So a COPY of 2,000 rows was 2–3 ms in
/// which a request's thread, or the client or upstream on a machine the
/// server shares, could not run: with the gateway, its upstream and
/// Postgres on two cores, one connection's p99 was 1.7–2.0 ms, and
/// 0.46–0.59 ms with the work in pieces. Between two pieces the server
/// waits for the next, and whatever waited for its core runs.
///
/// A piece costs a round trip and a statement's overhead, which a write
/// of a flush interval's rows at a moderate rate can spare. A write of
/// more than [`PACED_MAX`] rows (a full batch at a high rate, or a
/// backlog the writer catches up on) goes at full speed, one statement
/// each.
#[derive(Clone, Copy, Debug)]
struct Pieces {
    rows: usize,
    groups: usize,
}

/// Writes of up to this many rows are paced ([`Pieces`]).
const PACED_MAX: usize = 4096;

impl Pieces {
    /// The pieces of a write of `rows` rows: about a third of a
    /// millisecond of the server's work each when paced (a row's COPY is
    /// about 1.5 µs of it, a group's upsert about 3).
    fn of(rows: usize) -> Pieces {
        if rows <= PACED_MAX {
            Pieces {
                rows: 256,
                groups: 128,
            }
        } else {
            Pieces {
                rows: usize::MAX,
                groups: usize::MAX,
            }
        }
    }
}

/// The way of writing for batches with rows written before: stage, then
/// insert what is new and roll up exactly that.
async fn write_deduplicated(
    client: &mut deadpool_postgres::Client,
    rows: &[UsageRow<'_>],
) -> Result<u64, Failure> {
    let (copy, insert) = staging_statements(client).await?;
    let tx = client.transaction().await?;
    let sink = tx.copy_in(&copy).await?;
    let mut writer = CopyWriter::new(sink, &STAGING_TYPES[..], rows.len());
    for row in rows {
        let values = EventValues::new(row);
        let rejected = row.event.outcome.is_rejected();
        let error = row.event.is_error();
        let extra: [&(dyn ToSql + Sync); 3] = [&row.day, &rejected, &error];
        // An allocation a row, on the rare path only.
        let params: Vec<&(dyn ToSql + Sync)> = values.params().into_iter().chain(extra).collect();
        writer.write(&params).await?;
    }
    writer.finish().await?;
    let days = tx.query(&insert, &[]).await?;
    let mut inserted = 0i64;
    let mut customers = CustomerDayArrays::default();
    for day in &days {
        inserted += get::<i64>(day, 2)?;
        customers.day.push(get(day, 0)?);
        customers.customer_id.push(get(day, 1)?);
        for (index, column) in customers.sums.iter_mut().enumerate() {
            column.push(get(day, 3 + index)?);
        }
    }
    if !customers.day.is_empty() {
        let upsert = tx.prepare_cached(UPSERT_CUSTOMER_DAILY).await?;
        customers.upsert(&tx, &upsert).await?;
    }
    tx.commit().await?;
    u64::try_from(inserted).map_err(|_| corrupt(format!("{inserted} rows inserted")))
}

/// The prepared statements of the deduplicating way, [`COPY_STAGING`] and
/// [`INSERT_FROM_STAGING`], creating the staging table first if this
/// connection has none yet. A connection's statements are prepared once,
/// so after the first time this costs no round trip.
///
/// The INSERT is prepared first because preparing it is what tells whether
/// the table exists (a COPY is only resolved when it runs). This happens
/// outside any transaction, which the failed prepare would abort.
async fn staging_statements(
    client: &deadpool_postgres::Client,
) -> Result<(tokio_postgres::Statement, tokio_postgres::Statement), Failure> {
    let insert = match client.prepare_cached(INSERT_FROM_STAGING).await {
        // No table, or no temporary schema at all yet in this session.
        Err(error)
            if error.code() == Some(&SqlState::UNDEFINED_TABLE)
                || error.code() == Some(&SqlState::INVALID_SCHEMA_NAME) =>
        {
            client.batch_execute(CREATE_STAGING).await?;
            client.prepare_cached(INSERT_FROM_STAGING).await?
        }
        prepared => prepared?,
    };
    Ok((client.prepare_cached(COPY_STAGING).await?, insert))
}

/// [`Groups`] as the columns of `usage_daily`, one array each, for
/// [`UPSERT_DAILY`].
struct GroupArrays<'a> {
    day: Vec<Date>,
    customer_id: Vec<Uuid>,
    key_id: Vec<Uuid>,
    route: Vec<&'a str>,
    model: Vec<&'a str>,
    sums: [Vec<i64>; 10],
}

impl<'a> GroupArrays<'a> {
    fn new(groups: &'a [(usage::GroupKey<'a>, Rollup)]) -> GroupArrays<'a> {
        let mut arrays = GroupArrays {
            day: Vec::with_capacity(groups.len()),
            customer_id: Vec::with_capacity(groups.len()),
            key_id: Vec::with_capacity(groups.len()),
            route: Vec::with_capacity(groups.len()),
            model: Vec::with_capacity(groups.len()),
            sums: std::array::from_fn(|_| Vec::with_capacity(groups.len())),
        };
        for ((day, customer_id, key_id, route, model), rollup) in groups {
            arrays.day.push(*day);
            arrays.customer_id.push(customer_id.0);
            arrays.key_id.push(key_id.0);
            arrays.route.push(route);
            arrays.model.push(model);
            for (column, sum) in arrays.sums.iter_mut().zip(rollup.columns()) {
                column.push(sum);
            }
        }
        arrays
    }

    /// Runs [`UPSERT_DAILY`] (`statement`) with these arrays.
    async fn upsert(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        statement: &tokio_postgres::Statement,
    ) -> Result<u64, tokio_postgres::Error> {
        let key: [&(dyn ToSql + Sync); 5] = [
            &self.day,
            &self.customer_id,
            &self.key_id,
            &self.route,
            &self.model,
        ];
        tx.execute(statement, &with_sums(&key, &self.sums)).await
    }
}

/// Customer days as the columns of `usage_customer_daily`, one array each,
/// for [`UPSERT_CUSTOMER_DAILY`].
#[derive(Default)]
struct CustomerDayArrays {
    day: Vec<Date>,
    customer_id: Vec<Uuid>,
    sums: [Vec<i64>; 10],
}

impl CustomerDayArrays {
    fn new(days: &BTreeMap<CustomerDay, Rollup>) -> CustomerDayArrays {
        let mut arrays = CustomerDayArrays {
            day: Vec::with_capacity(days.len()),
            customer_id: Vec::with_capacity(days.len()),
            sums: std::array::from_fn(|_| Vec::with_capacity(days.len())),
        };
        for ((day, customer_id), rollup) in days {
            arrays.day.push(*day);
            arrays.customer_id.push(customer_id.0);
            for (column, sum) in arrays.sums.iter_mut().zip(rollup.columns()) {
                column.push(sum);
            }
        }
        arrays
    }

    /// Runs [`UPSERT_CUSTOMER_DAILY`] (`statement`) with these arrays.
    async fn upsert(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        statement: &tokio_postgres::Statement,
    ) -> Result<u64, tokio_postgres::Error> {
        let key: [&(dyn ToSql + Sync); 2] = [&self.day, &self.customer_id];
        tx.execute(statement, &with_sums(&key, &self.sums)).await
    }
}

/// A rollup upsert's parameters: its key columns' arrays, then its sums'.
fn with_sums<'a>(
    key: &[&'a (dyn ToSql + Sync)],
    sums: &'a [Vec<i64>; 10],
) -> Vec<&'a (dyn ToSql + Sync)> {
    let sums = sums.iter().map(|column| column as &(dyn ToSql + Sync));
    key.iter().copied().chain(sums).collect()
}

// ---- the trait -------------------------------------------------------------

#[async_trait]
impl Store for PostgresStore {
    async fn migrate(&self) -> Result<MigrationReport, StoreError> {
        run(async {
            let mut client = self.client().await?;
            let mut applied = Vec::new();
            let current = loop {
                // One transaction per migration, each under a transaction-
                // scoped advisory lock: a second process migrating at the
                // same time waits, then sees the version this one recorded.
                let tx = client.transaction().await?;
                tx.batch_execute(&format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
                    .await?;
                tx.batch_execute(CREATE_MIGRATIONS_TABLE).await?;
                let row = tx
                    .query_one(
                        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                        &[],
                    )
                    .await?;
                let current: i32 = get(&row, 0)?;
                let current = u32::try_from(current)
                    .map_err(|_| corrupt(format!("schema version {current}")))?;
                let Some(migration) = migrations::next(migrations::POSTGRES, current)? else {
                    tx.commit().await?;
                    break current;
                };
                tx.batch_execute(migration.sql).await?;
                let version = i32::try_from(migration.version)
                    .map_err(|_| corrupt(format!("schema version {}", migration.version)))?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    &[&version, &migration.name],
                )
                .await?;
                tx.commit().await?;
                applied.push(migration.version);
            };
            // Partitions ahead of time, so that writes at the start of a
            // month do not wait for one. Every start does this, not only
            // the first: a gateway running for months keeps creating them
            // on demand anyway.
            let today = OffsetDateTime::now_utc().date();
            let months = usage::months_from(today, usage::PARTITIONS_AHEAD)
                .into_iter()
                .collect();
            self.ensure_partitions(&client, &months).await?;
            Ok(MigrationReport { applied, current })
        })
        .await
    }

    async fn check_schema(&self) -> Result<u32, StoreError> {
        let current = run(async {
            let client = self.client().await?;
            let row = client
                .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
                .await?;
            if !get::<bool>(&row, 0)? {
                return Ok(0);
            }
            let row = client
                .query_one(
                    "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                    &[],
                )
                .await?;
            let current: i32 = get(&row, 0)?;
            u32::try_from(current).map_err(|_| corrupt(format!("schema version {current}")))
        })
        .await?;
        migrations::check_current(migrations::POSTGRES, current)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        run(async {
            self.client().await?.batch_execute("SELECT 1").await?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl AccountStore for PostgresStore {
    async fn create_customer(&self, new: NewCustomer) -> Result<Customer, StoreError> {
        run(async {
            let client = self.client().await?;
            let statement = client
                .prepare_cached(&format!(
                    "INSERT INTO customers (id, name, tier, overrides, created_at) \
                     VALUES ($1, $2, $3, $4, $5) RETURNING {CUSTOMER_COLUMNS}"
                ))
                .await?;
            let row = client
                .query_one(
                    &statement,
                    &[
                        &new.id.0,
                        &new.name,
                        &new.tier,
                        &new.overrides,
                        &new.created_at,
                    ],
                )
                .await
                .map_err(|error| refused(error.into(), &new))?;
            customer_row(&row)
        })
        .await
    }

    async fn customer(&self, id: CustomerId) -> Result<Option<Customer>, StoreError> {
        run(async { customer_by_id(&self.client().await?, id.0).await }).await
    }

    async fn customer_named(&self, name: &str) -> Result<Option<Customer>, StoreError> {
        run(async {
            let client = self.client().await?;
            let statement = client
                .prepare_cached(&format!(
                    "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE name = $1"
                ))
                .await?;
            client
                .query_opt(&statement, &[&name])
                .await?
                .as_ref()
                .map(customer_row)
                .transpose()
        })
        .await
    }

    async fn list_customers(&self, page: Page<CustomerId>) -> Result<Vec<Customer>, StoreError> {
        run(async {
            let client = self.client().await?;
            let limit = i64::from(page.limit);
            let rows = match page.after {
                Some(after) => {
                    let statement = client
                        .prepare_cached(&format!(
                            "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE id > $1 ORDER BY id LIMIT $2"
                        ))
                        .await?;
                    client.query(&statement, &[&after.0, &limit]).await?
                }
                None => {
                    let statement = client
                        .prepare_cached(&format!(
                            "SELECT {CUSTOMER_COLUMNS} FROM customers ORDER BY id LIMIT $1"
                        ))
                        .await?;
                    client.query(&statement, &[&limit]).await?
                }
            };
            decode_all(&rows, customer_row)
        })
        .await
    }

    async fn update_customer(
        &self,
        id: CustomerId,
        update: CustomerUpdate,
    ) -> Result<Customer, StoreError> {
        run(async {
            let client = self.client().await?;
            let statement = client
                .prepare_cached(&format!(
                    "UPDATE customers SET tier = COALESCE($2, tier), overrides = COALESCE($3, overrides) \
                     WHERE id = $1 RETURNING {CUSTOMER_COLUMNS}"
                ))
                .await?;
            let row = client
                .query_opt(&statement, &[&id.0, &update.tier, &update.overrides])
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("customer {id}")))?;
            customer_row(&row)
        })
        .await
    }

    async fn create_key(&self, new: NewKey) -> Result<KeyRecord, StoreError> {
        run(async { insert_key(&self.client().await?, &new).await }).await
    }

    async fn key(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError> {
        run(async { key_by_id(&self.client().await?, id, false).await }).await
    }

    async fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<KeyRecord>, StoreError> {
        run(async {
            let client = self.client().await?;
            let statement = client
                .prepare_cached(&format!(
                    "SELECT {KEY_COLUMNS} FROM api_keys WHERE prefix = $1 ORDER BY id"
                ))
                .await?;
            decode_all(&client.query(&statement, &[&prefix]).await?, key_row)
        })
        .await
    }

    async fn list_keys(
        &self,
        filter: KeyFilter,
        page: Page<KeyId>,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        run(async {
            let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
            let sql = list_keys_sql(KEY_COLUMNS, &filter, page, |arg| {
                args.push(match arg {
                    KeyArg::Customer(id) => Box::new(id.0),
                    KeyArg::After(id) => Box::new(id.0),
                    KeyArg::Now(now) => Box::new(now),
                    KeyArg::Limit(limit) => Box::new(i64::from(limit)),
                });
                format!("${}", args.len())
            });
            let params: Vec<&(dyn ToSql + Sync)> = args
                .iter()
                .map(|arg| arg.as_ref() as &(dyn ToSql + Sync))
                .collect();
            let client = self.client().await?;
            let statement = client.prepare_cached(&sql).await?;
            decode_all(&client.query(&statement, &params).await?, key_row)
        })
        .await
    }

    async fn update_key(&self, id: KeyId, update: KeyUpdate) -> Result<KeyRecord, StoreError> {
        run(async {
            let mut client = self.client().await?;
            let client = client.transaction().await?;
            // The family first, as a rotation does: a rotation under way
            // is waited for, and the update below (a new snapshot) then
            // sees its new key and gives it the limits too.
            lock_family(&client, id).await?;
            // Each field: a flag saying whether to set it, and the value
            // (NULL clears). Limits are the family's: the other keys of
            // the family get them in the same statement.
            let statement = client
                .prepare_cached(&format!(
                    "WITH family AS ( \
                         UPDATE api_keys SET limits = $9::jsonb \
                         WHERE $8 AND id <> $1 \
                         AND family_id = (SELECT family_id FROM api_keys WHERE id = $1)) \
                     UPDATE api_keys SET \
                     name = CASE WHEN $2 THEN $3::text ELSE name END, \
                     routes = CASE WHEN $4 THEN $5::text[] ELSE routes END, \
                     expires_at = CASE WHEN $6 THEN $7::timestamptz ELSE expires_at END, \
                     limits = CASE WHEN $8 THEN $9::jsonb ELSE limits END \
                     WHERE id = $1 RETURNING {KEY_COLUMNS}"
                ))
                .await?;
            let name = update.name.as_ref().map(Option::as_deref);
            let routes = update.routes.as_ref().map(Option::as_deref);
            let limits = update
                .limits
                .as_ref()
                .map(|limits| limits.as_ref().map(KeyLimits::to_json));
            let row = client
                .query_opt(
                    &statement,
                    &[
                        &id.0,
                        &name.is_some(),
                        &name.flatten(),
                        &routes.is_some(),
                        &routes.flatten(),
                        &update.expires_at.is_some(),
                        &update.expires_at.flatten(),
                        &limits.is_some(),
                        &limits.flatten(),
                    ],
                )
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("key {id}")))?;
            let record = key_row(&row)?;
            client.commit().await?;
            Ok(record)
        })
        .await
    }

    async fn revoke_key(&self, id: KeyId, at: OffsetDateTime) -> Result<KeyRecord, StoreError> {
        run(async {
            let client = self.client().await?;
            let statement = client
                .prepare_cached(&format!(
                    "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1 \
                     RETURNING {KEY_COLUMNS}"
                ))
                .await?;
            let row = client
                .query_opt(&statement, &[&id.0, &at])
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("key {id}")))?;
            key_row(&row)
        })
        .await
    }

    async fn rotate_key(
        &self,
        old: KeyId,
        new: NewKey,
        old_expires_at: OffsetDateTime,
    ) -> Result<(KeyRecord, KeyRecord), StoreError> {
        run(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            // The family: a change of its limits under way is waited for,
            // so the new key takes the limits it ends with.
            lock_family(&tx, old).await?;
            // FOR UPDATE: a concurrent revoke waits for this rotation (or
            // this rotation sees the revocation and refuses).
            let old_key = key_by_id(&tx, old, true)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("key {old}")))?;
            let expires_at = old_key.expiry_after_rotation(old_expires_at)?;
            let created = insert_key(&tx, &old_key.successor(new)).await?;
            let statement = tx
                .prepare_cached(&format!(
                    "UPDATE api_keys SET expires_at = $2 WHERE id = $1 RETURNING {KEY_COLUMNS}"
                ))
                .await?;
            let updated = key_row(&tx.query_one(&statement, &[&old.0, &expires_at]).await?)?;
            tx.commit().await?;
            Ok((updated, created))
        })
        .await
    }

    async fn load_keys(
        &self,
        sink: &mut (dyn FnMut(Vec<KeyRecord>) + Send),
    ) -> Result<(), StoreError> {
        run(async {
            // One portal (server-side cursor) in one read-only transaction:
            // a consistent snapshot, a plain sequential scan, and only one
            // batch in memory at a time.
            let mut client = self.client().await?;
            let tx = client.build_transaction().read_only(true).start().await?;
            let statement = tx
                .prepare(&format!("SELECT {KEY_COLUMNS} FROM api_keys"))
                .await?;
            let portal = tx.bind(&statement, &[]).await?;
            let max_rows = i32::try_from(KEY_BATCH).unwrap_or(i32::MAX);
            loop {
                let rows = tx.query_portal(&portal, max_rows).await?;
                let full = rows.len() == KEY_BATCH;
                let batch = decode_all(&rows, key_row)?;
                drop(rows);
                if !batch.is_empty() {
                    sink(batch);
                }
                if !full {
                    break;
                }
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl UsageSink for PostgresStore {
    async fn write_usage(&self, batch: &[UsageEvent]) -> Result<u64, StoreError> {
        self.write_usage_batch(batch, false).await
    }

    async fn write_usage_deduplicated(&self, batch: &[UsageEvent]) -> Result<u64, StoreError> {
        self.write_usage_batch(batch, true).await
    }
}

#[async_trait]
impl UsageReports for PostgresStore {
    async fn period_totals(
        &self,
        days: Range<Date>,
    ) -> Result<HashMap<CustomerId, PeriodTotals>, StoreError> {
        run(reports::period_totals(self, days)).await
    }

    async fn key_period_totals(
        &self,
        days: Range<Date>,
    ) -> Result<HashMap<KeyId, PeriodTotals>, StoreError> {
        run(reports::key_period_totals(self, days)).await
    }

    async fn usage_summary(&self, filter: &UsageFilter) -> Result<UsageTotals, StoreError> {
        run(reports::summary(self, filter)).await
    }

    async fn usage_grouped(
        &self,
        filter: &UsageFilter,
        group: UsageGroup,
    ) -> Result<Vec<(GroupKey, UsageTotals)>, StoreError> {
        run(reports::grouped(self, filter, group)).await
    }

    async fn top_customers(
        &self,
        filter: &UsageFilter,
        by: Ranking,
        limit: u32,
    ) -> Result<Vec<(GroupKey, UsageTotals)>, StoreError> {
        run(reports::top_customers(self, filter, by, limit)).await
    }

    async fn usage_events_page(
        &self,
        filter: &UsageFilter,
        after: Option<(OffsetDateTime, Uuid)>,
        limit: u32,
    ) -> Result<Vec<UsageEvent>, StoreError> {
        run(reports::events_page(self, filter, after, limit)).await
    }

    async fn billing_usage(&self, period: Period) -> Result<Vec<BillingUsage>, StoreError> {
        run(reports::billing_usage(self, period)).await
    }

    async fn closed_period(&self, period: Period) -> Result<Option<ClosedPeriod>, StoreError> {
        run(reports::closed_period(self, period)).await
    }

    async fn close_period(
        &self,
        period: Period,
        lines: &[BillingLine],
        at: OffsetDateTime,
    ) -> Result<ClosedPeriod, StoreError> {
        run(reports::close_period(self, period, lines, at)).await
    }
}

#[async_trait]
impl ChangeFeed for PostgresStore {
    async fn watch(&self, events: mpsc::Sender<StoreEvent>) {
        let mut delay = backoff::FIRST;
        loop {
            let attempt = tokio::select! {
                () = events.closed() => return,
                attempt = tokio::time::timeout(LISTEN_TIMEOUT, listen(&self.config)) => attempt,
            };
            let error: BoxError = match attempt {
                Ok(Ok((client, mut connection))) => {
                    delay = backoff::FIRST;
                    // Every successful LISTEN, the first included, is
                    // followed by a Resync: changes committed before it (or
                    // between a failure and this reconnect) were never
                    // notified to this connection.
                    if events.send(StoreEvent::Resync).await.is_err() {
                        return;
                    }
                    tracing::debug!(message = "Listening for key and customer changes.");
                    let ended = forward(&mut connection, &events).await;
                    drop(client);
                    match ended {
                        Ended::ReceiverGone => return,
                        Ended::Lost(Some(error)) => Box::new(error),
                        Ended::Lost(None) => CLOSED.into(),
                    }
                }
                Ok(Err(error)) => error,
                Err(elapsed) => Box::new(elapsed),
            };
            tracing::warn!(
                message = "Change feed connection lost; reconnecting.",
                error = %error,
                retry_in_ms = delay.as_millis() as u64,
            );
            if !backoff::wait(&events, &mut delay).await {
                return;
            }
        }
    }
}

#[async_trait]
impl WebhookOutbox for PostgresStore {
    async fn record_event(&self, event: &NewEvent, urls: &[String]) -> Result<bool, StoreError> {
        run(webhooks::record_event(self, event, urls)).await
    }

    async fn claim_deliveries(
        &self,
        now: OffsetDateTime,
        lease: Duration,
        limit: u32,
        skip: &[String],
    ) -> Result<Vec<Claimed>, StoreError> {
        run(webhooks::claim(self, None, now, lease, limit, skip)).await
    }

    async fn claim_delivery(
        &self,
        id: Uuid,
        now: OffsetDateTime,
        lease: Duration,
    ) -> Result<Option<Claimed>, StoreError> {
        Ok(run(webhooks::claim(self, Some(id), now, lease, 1, &[]))
            .await?
            .pop())
    }

    async fn settle_delivery(
        &self,
        id: Uuid,
        attempt: u32,
        settlement: &Settlement,
    ) -> Result<(), StoreError> {
        run(webhooks::settle(self, id, attempt, settlement)).await
    }

    async fn deliveries(
        &self,
        filter: DeliveryFilter,
        page: Page<Uuid>,
    ) -> Result<Vec<Delivery>, StoreError> {
        run(webhooks::list(self, filter, page)).await
    }

    async fn delivery(&self, id: Uuid) -> Result<Option<Delivery>, StoreError> {
        run(webhooks::one(self, id)).await
    }

    async fn pending_deliveries(&self) -> Result<u64, StoreError> {
        run(webhooks::pending(self)).await
    }

    async fn event_dedups(&self, since: OffsetDateTime) -> Result<Vec<String>, StoreError> {
        run(webhooks::dedups(self, since)).await
    }

    async fn expiring_keys(
        &self,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<Vec<ExpiringKey>, StoreError> {
        run(webhooks::expiring_keys(self, now, until)).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (STYLE.md)
mod tests {
    use time::macros::datetime;
    use tollgate_metering::usage::{CostSource, Outcome};
    use tollgate_metering::{CustomerId, KeyId};

    use super::*;

    fn event(ts: OffsetDateTime) -> UsageEvent {
        crate::testing::usage_event(CustomerId::new(), KeyId::new(), ts)
    }

    /// The fast row encoding is the `ToSql` one, byte for byte: NULLs and
    /// values, NUL-replaced and non-ASCII texts, counts past `i64`, times
    /// before 2000 and at the ends of the range.
    #[test]
    fn event_rows_encode_as_to_sql_encodes_them() {
        let mut all = vec![event(datetime!(2026-03-01 12:34:56.789012 UTC))];
        let mut full = event(datetime!(1999-12-31 23:59:59.999999 -05:00));
        full.client_request_id = Some("req-\0-ü".to_owned());
        full.model = Some("gpt-4o\0mini".to_owned());
        full.path = "/v1/ünïcode?q=1".to_owned();
        full.status = u16::MAX;
        full.outcome = Outcome::UpstreamError;
        full.latency_us = u64::MAX;
        full.input_tokens = u64::MAX;
        full.cost_nanos = i64::MIN;
        full.cost_source = CostSource::Pricing;
        all.push(full);
        all.push(event(datetime!(-9999-01-01 00:00 UTC)));
        all.push(event(datetime!(+9999-12-31 23:59:59.999999 UTC)));
        let mut bare = event(datetime!(1970-01-01 00:00 UTC));
        bare.model = None;
        all.push(bare);
        let rows = usage::rows(&all).unwrap();
        assert_eq!(rows.len(), all.len());
        for row in &rows {
            let values = EventValues::new(row);
            let slow = copy::values_row(&EVENT_TYPES, &values.params()).unwrap();
            let fast = copy::fields_row(&EVENT_TYPES, |fields| values.write(fields)).unwrap();
            assert_eq!(fast, slow, "{:?}", row.event);
        }
    }
}
