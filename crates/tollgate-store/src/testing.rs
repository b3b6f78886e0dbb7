//! Throwaway databases, for tests only: this crate's and the other crates'
//! (the gateway's end-to-end tests run the same bodies on both backends).
//! Nothing here is used by the gateway itself; it is always compiled so that
//! other crates' tests can reach it without a feature flag.
//!
//! Postgres tests need a server where the configured user may
//! `CREATE DATABASE`: `TOLLGATE_TEST_DATABASE_URL`, by default
//! `postgres://postgres@127.0.0.1:5432/postgres`. Each [`TestDatabase`] is a
//! fresh database on it, dropped again when the guard is dropped, so tests
//! can run in parallel without seeing each other's rows.
//!
//! These helpers panic on failure, with a message saying what to fix: a test
//! that cannot get its database has nothing else to do.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;
use time::OffsetDateTime;
use tokio_postgres::NoTls;
use tollgate_metering::usage::{CostSource, Outcome, UsageEvent};
use tollgate_metering::Store;
use tollgate_metering::{CustomerId, KeyId};
use uuid::Uuid;

/// The environment variable naming the Postgres server for tests.
pub const DATABASE_URL_ENV: &str = "TOLLGATE_TEST_DATABASE_URL";
/// The server used when [`DATABASE_URL_ENV`] is unset.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Bound on reaching the test server, so a missing server fails fast.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Which backend a test body runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Sqlite, Backend::Postgres];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// The Postgres server tests use: [`DATABASE_URL_ENV`] or the default.
pub fn server_url() -> String {
    std::env::var(DATABASE_URL_ENV).unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

/// A fresh, empty Postgres database, dropped (`WITH (FORCE)`, so open
/// connections do not keep it alive) when this guard is dropped.
#[derive(Debug)]
pub struct TestDatabase {
    server_url: String,
    name: String,
    url: String,
}

impl TestDatabase {
    /// Creates `tollgate_test_<random>` on the test server.
    ///
    /// # Panics
    ///
    /// When the server cannot be reached or refuses `CREATE DATABASE`.
    pub async fn create() -> TestDatabase {
        let server_url = server_url();
        let name = format!("tollgate_test_{}", Uuid::now_v7().simple());
        let created = async {
            let client = connect(&server_url).await?;
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .map_err(|error| error.to_string())
        }
        .await;
        if let Err(error) = created {
            panic!(
                "cannot create a test database on the Postgres server at {server_url}: {error}\n\
                 Start Postgres there, or set {DATABASE_URL_ENV}=postgres://USER@HOST:PORT/DB \
                 naming a server where USER may CREATE DATABASE."
            );
        }
        TestDatabase {
            url: with_database(&server_url, &name),
            server_url,
            name,
        }
    }

    /// The URL of the new database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop cannot be async, and may run inside a runtime that must not
        // be blocked from within: run the DROP on a thread of its own.
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(error) = execute_detached(&[(&self.server_url, &sql)]) {
            eprintln!("warning: cannot drop test database {}: {error}", self.name);
        }
    }
}

/// Runs each `(url, sql)` in turn, on a thread and runtime of its own: for
/// `Drop` implementations, which cannot be async and may run inside a
/// runtime that must not be blocked from within.
///
/// # Errors
///
/// The first statement that fails, or a server that does not answer.
pub fn execute_detached(statements: &[(&str, &str)]) -> Result<(), String> {
    let statements: Vec<(String, String)> = statements
        .iter()
        .map(|&(url, sql)| (url.to_owned(), sql.to_owned()))
        .collect();
    std::thread::spawn(move || -> Result<(), String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| error.to_string())?;
        runtime.block_on(async {
            for (url, sql) in statements {
                let client = connect(&url).await?;
                client
                    .batch_execute(&sql)
                    .await
                    .map_err(|error| format!("{sql}: {error}"))?;
            }
            Ok(())
        })
    })
    .join()
    .map_err(|_| "the thread running it panicked".to_owned())?
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let (client, connection) =
        tokio::time::timeout(CONNECT_TIMEOUT, tokio_postgres::connect(url, NoTls))
            .await
            .map_err(|_| format!("no answer within {CONNECT_TIMEOUT:?}"))?
            .map_err(|error| error.to_string())?;
    tokio::spawn(async move {
        // Ends when `client` is dropped; errors surface through `client`.
        let _ = connection.await;
    });
    Ok(client)
}

/// `url` with its database name replaced by `name` (query kept).
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority = base.find("://").map_or(0, |at| at + 3);
    let base = match base[authority..].find('/') {
        Some(slash) => &base[..authority + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}

/// A SQLite database file in a temporary directory, removed with it.
#[derive(Debug)]
pub struct TestSqlite {
    dir: TempDir,
    url: String,
}

impl TestSqlite {
    /// # Panics
    ///
    /// When no temporary directory can be made.
    pub fn create() -> TestSqlite {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-test-")
            .tempdir()
            .unwrap_or_else(|error| panic!("cannot create a temporary directory: {error}"));
        let url = format!("sqlite://{}", dir.path().join("tollgate.db").display());
        TestSqlite { dir, url }
    }

    /// `sqlite://` and the file's absolute path.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database file (it exists once a store has opened it).
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("tollgate.db")
    }

    /// The temporary directory, for tests that put other files beside it.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Keeps a test's database alive; dropping it removes the database.
#[derive(Debug)]
pub enum TestGuard {
    Sqlite(TestSqlite),
    Postgres(TestDatabase),
}

impl TestGuard {
    /// A fresh, empty database of `backend`'s kind (not migrated).
    pub async fn create(backend: Backend) -> TestGuard {
        match backend {
            Backend::Sqlite => TestGuard::Sqlite(TestSqlite::create()),
            Backend::Postgres => TestGuard::Postgres(TestDatabase::create().await),
        }
    }

    /// The database URL, for `tollgate_store::open` or a gateway config.
    pub fn url(&self) -> &str {
        match self {
            TestGuard::Sqlite(db) => db.url(),
            TestGuard::Postgres(db) => db.url(),
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            TestGuard::Sqlite(_) => Backend::Sqlite,
            TestGuard::Postgres(_) => Backend::Postgres,
        }
    }
}

/// A migrated store on a fresh database of `backend`'s kind, and the guard
/// that keeps that database alive (keep it until the test ends).
///
/// # Panics
///
/// When the database cannot be created, opened or migrated.
pub async fn test_store(backend: Backend) -> (Arc<dyn Store>, TestGuard) {
    let guard = TestGuard::create(backend).await;
    let store = crate::open(guard.url(), 4)
        .await
        .unwrap_or_else(|error| panic!("cannot open the {} test store: {error}", backend.name()));
    if let Err(error) = store.migrate().await {
        panic!("cannot migrate the {} test store: {error}", backend.name());
    }
    (store, guard)
}

impl TestGuard {
    /// Runs `sql` on the test database directly, returning every row as
    /// text (`None` for NULL), so a test can check what was stored without
    /// going through the [`Store`] it is testing.
    pub async fn raw(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        match self {
            TestGuard::Sqlite(db) => {
                let conn = rusqlite::Connection::open(db.path()).expect("test SQLite opens");
                conn.busy_timeout(Duration::from_secs(5))
                    .expect("busy timeout is set");
                let mut statement = conn.prepare(sql).expect("test SQL prepares");
                let columns = statement.column_count();
                let mut rows = statement.query([]).expect("test SQL runs");
                let mut out = Vec::new();
                while let Some(row) = rows.next().expect("test SQL rows") {
                    out.push(
                        (0..columns)
                            .map(|i| match row.get::<_, rusqlite::types::Value>(i) {
                                Ok(rusqlite::types::Value::Null) | Err(_) => None,
                                Ok(rusqlite::types::Value::Integer(n)) => Some(n.to_string()),
                                Ok(rusqlite::types::Value::Real(x)) => Some(x.to_string()),
                                Ok(rusqlite::types::Value::Text(text)) => Some(text),
                                Ok(rusqlite::types::Value::Blob(bytes)) => {
                                    Some(format!("blob:{}", bytes.len()))
                                }
                            })
                            .collect(),
                    );
                }
                out
            }
            TestGuard::Postgres(db) => {
                let (client, connection) = tokio_postgres::connect(db.url(), NoTls)
                    .await
                    .expect("test Postgres connects");
                let driver = tokio::spawn(connection);
                let mut out = Vec::new();
                for message in client.simple_query(sql).await.expect("test SQL runs") {
                    if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
                        out.push(
                            (0..row.len())
                                .map(|i| row.get(i).map(str::to_owned))
                                .collect(),
                        );
                    }
                }
                drop(client);
                let _ = driver.await;
                out
            }
        }
    }
}

/// Generates, for each async test body `NAME(Backend)`, the tests
/// `NAME::sqlite` and `NAME::postgres`. The body must be in scope where the
/// macro is used.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::testing::Backend::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name($crate::testing::Backend::Postgres).await
                }
            }
        )*
    };
}

/// A plain admitted usage row of `customer` and `key` at `ts`: 200, 10 + 20
/// tokens of gpt-4o on route openai, 1,000 nano-USD by pricing. Tests
/// change what they need.
pub fn usage_event(customer: CustomerId, key: KeyId, ts: OffsetDateTime) -> UsageEvent {
    UsageEvent {
        id: Uuid::now_v7(),
        client_request_id: None,
        ts,
        customer_id: customer,
        key_id: key,
        instance: "gw-1".to_owned(),
        route: "openai".to_owned(),
        method: "POST".to_owned(),
        path: "/v1/chat/completions".to_owned(),
        status: 200,
        outcome: Outcome::Ok,
        latency_us: 1_500,
        upstream_latency_us: 1_200,
        request_bytes: 300,
        response_bytes: 900,
        model: Some("gpt-4o".to_owned()),
        input_tokens: 10,
        output_tokens: 20,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        cost_nanos: 1_000,
        cost_source: CostSource::Pricing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_replaced_in_urls() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "t1"),
            "postgres://postgres@127.0.0.1:5432/t1"
        );
        assert_eq!(
            with_database("postgres://u:p@h:1?sslmode=disable", "t1"),
            "postgres://u:p@h:1/t1?sslmode=disable"
        );
        assert_eq!(
            with_database("postgresql://h/db?x=1", "t1"),
            "postgresql://h/t1?x=1"
        );
    }
}
