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
//! # Failure behaviour
//!
//! Nothing waits on the server for long: connecting, waiting for a pooled
//! connection and recycling one are each bounded by a few seconds, after
//! which the call is `Unavailable`; TCP keepalives notice a server that
//! vanished without closing the connection. The change feed reconnects
//! after any failure with backoff (100 ms doubling to 2 s) and sends
//! `Resync` once it is listening again, since notifications sent while it
//! was away are lost.

use std::future::{poll_fn, Future};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime,
};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{AsyncMessage, NoTls, Row, Socket};
use uuid::Uuid;

use tollgate_metering::store::{
    Customer, CustomerUpdate, KeyFilter, KeyRecord, KeyStatus, MigrationReport, NewCustomer,
    NewKey, Page, Store, StoreError, StoreEvent,
};
use tollgate_metering::{CustomerId, KeyDigest, KeyId};

use crate::migrations;
use crate::{backoff, change_event, status_condition, KEY_BATCH};

/// Bound on opening a connection (unless the URL sets `connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on waiting for, creating or recycling a pooled connection.
const POOL_TIMEOUT: Duration = Duration::from_secs(5);
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

const CUSTOMER_COLUMNS: &str = "id, name, tier, overrides, created_at";
const KEY_COLUMNS: &str =
    "id, customer_id, digest, prefix, name, routes, created_at, expires_at, revoked_at";

/// The Postgres [`Store`].
pub struct PostgresStore {
    pool: Pool,
    /// For the change feed's own connection.
    config: tokio_postgres::Config,
}

/// What a call can fail with; classified into a [`StoreError`] at its end.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<Failure> for StoreError {
    fn from(failure: Failure) -> StoreError {
        match failure {
            Failure::Store(error) => error,
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
        "42" if *db.code() == SqlState::UNDEFINED_TABLE => StoreError::Config(format!(
            "{}; the schema is not migrated (run `tollgate migrate`)",
            db.message()
        )),
        // Authorization, unknown database, permissions and undefined names.
        "28" | "3D" | "42" => StoreError::Config(db.message().to_owned()),
        _ => StoreError::Corrupt(format!("{} (SQLSTATE {code})", db.message())),
    }
}

/// The constraint a unique violation names.
fn unique_violation(failure: &Failure) -> Option<&str> {
    let Failure::Postgres(error) = failure else {
        return None;
    };
    let db = error.as_db_error()?;
    (*db.code() == SqlState::UNIQUE_VIOLATION).then(|| db.constraint().unwrap_or_default())
}

fn foreign_key_violation(failure: &Failure) -> bool {
    matches!(failure, Failure::Postgres(error) if error.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION))
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
        Ok(PostgresStore { pool, config })
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, Failure> {
        Ok(self.pool.get().await?)
    }
}

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
        digest: KeyDigest::from_slice(digest)
            .ok_or_else(|| corrupt(format!("a key digest of {} bytes", digest.len())))?,
        prefix: get(row, 3)?,
        name: get(row, 4)?,
        routes: get(row, 5)?,
        created_at: get(row, 6)?,
        expires_at: get(row, 7)?,
        revoked_at: get(row, 8)?,
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
            "INSERT INTO api_keys (id, customer_id, digest, prefix, name, routes, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {KEY_COLUMNS}"
        ))
        .await?;
    let digest: &[u8] = new.digest.as_bytes();
    let inserted = client
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
            ],
        )
        .await
        .map_err(Failure::from);
    match inserted {
        Ok(row) => key_row(&row),
        Err(failure) if foreign_key_violation(&failure) => {
            Err(StoreError::NotFound(format!("customer {}", new.customer_id)).into())
        }
        Err(failure) => Err(match unique_violation(&failure) {
            Some("api_keys_digest_unique") => crate::key_digest_taken().into(),
            Some(_) => crate::key_id_taken(new.id).into(),
            None => failure,
        }),
    }
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

// ---- the trait -------------------------------------------------------------

#[async_trait]
impl Store for PostgresStore {
    async fn migrate(&self) -> Result<MigrationReport, StoreError> {
        run(async {
            let mut client = self.client().await?;
            let mut applied = Vec::new();
            loop {
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
                    return Ok(MigrationReport { applied, current });
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
            }
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        run(async {
            self.client().await?.batch_execute("SELECT 1").await?;
            Ok(())
        })
        .await
    }

    async fn create_customer(&self, new: NewCustomer) -> Result<Customer, StoreError> {
        run(async {
            let client = self.client().await?;
            let statement = client
                .prepare_cached(&format!(
                    "INSERT INTO customers (id, name, tier, overrides, created_at) \
                     VALUES ($1, $2, $3, $4, $5) RETURNING {CUSTOMER_COLUMNS}"
                ))
                .await?;
            let inserted = client
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
                .map_err(Failure::from);
            match inserted {
                Ok(row) => customer_row(&row),
                Err(failure) => Err(match unique_violation(&failure) {
                    Some("customers_name_unique") => crate::customer_name_taken(&new.name).into(),
                    Some(_) => crate::customer_id_taken(new.id).into(),
                    None => failure,
                }),
            }
        })
        .await
    }

    async fn find_customer(&self, name_or_id: &str) -> Result<Option<Customer>, StoreError> {
        run(async {
            let client = self.client().await?;
            if let Ok(id) = Uuid::parse_str(name_or_id) {
                if let Some(customer) = customer_by_id(&client, id).await? {
                    return Ok(Some(customer));
                }
            }
            let statement = client
                .prepare_cached(&format!(
                    "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE name = $1"
                ))
                .await?;
            client
                .query_opt(&statement, &[&name_or_id])
                .await?
                .as_ref()
                .map(customer_row)
                .transpose()
        })
        .await
    }

    async fn customer(&self, id: CustomerId) -> Result<Option<Customer>, StoreError> {
        run(async { customer_by_id(&self.client().await?, id.0).await }).await
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

    async fn find_key(&self, id_or_prefix: &str) -> Result<Option<KeyRecord>, StoreError> {
        run(async {
            let client = self.client().await?;
            if let Ok(id) = Uuid::parse_str(id_or_prefix) {
                if let Some(record) = key_by_id(&client, KeyId(id), false).await? {
                    return Ok(Some(record));
                }
            }
            let statement = client
                .prepare_cached(&format!(
                    "SELECT {KEY_COLUMNS} FROM api_keys WHERE prefix = $1 ORDER BY id"
                ))
                .await?;
            let mut found =
                decode_all(&client.query(&statement, &[&id_or_prefix]).await?, key_row)?;
            match found.len() {
                0 | 1 => Ok(found.pop()),
                matches => Err(crate::ambiguous_prefix(id_or_prefix, matches).into()),
            }
        })
        .await
    }

    async fn key(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError> {
        run(async { key_by_id(&self.client().await?, id, false).await }).await
    }

    async fn list_keys(
        &self,
        filter: KeyFilter,
        page: Page<KeyId>,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        run(async {
            let mut sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE TRUE");
            let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
            let mut bind = |value: Box<dyn ToSql + Sync + Send>| {
                args.push(value);
                format!("${}", args.len())
            };
            if let Some(customer) = filter.customer {
                sql += &format!(" AND customer_id = {}", bind(Box::new(customer.0)));
            }
            if let Some(after) = page.after {
                sql += &format!(" AND id > {}", bind(Box::new(after.0)));
            }
            if let Some(status) = filter.status {
                let now = match status {
                    KeyStatus::Revoked => String::new(),
                    KeyStatus::Active | KeyStatus::Expired => {
                        bind(Box::new(filter.now.unwrap_or_else(OffsetDateTime::now_utc)))
                    }
                };
                sql += &format!(" AND {}", status_condition(status, &now));
            }
            sql += &format!(
                " ORDER BY id LIMIT {}",
                bind(Box::new(i64::from(page.limit)))
            );
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
            // FOR UPDATE: a concurrent revoke waits for this rotation (or
            // this rotation sees the revocation and refuses).
            let current = key_by_id(&tx, old, true)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("key {old}")))?;
            if current.revoked_at.is_some() {
                return Err(crate::key_revoked(old).into());
            }
            let created = insert_key(&tx, &new).await?;
            let expires_at = match current.expires_at {
                Some(existing) if existing <= old_expires_at => existing,
                _ => old_expires_at,
            };
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
            tokio::select! {
                () = events.closed() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = backoff::next(delay);
        }
    }
}
