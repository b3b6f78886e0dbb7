//! What the database benchmarks share: sizes from the environment, and a
//! fresh Postgres database of their own with the gateway's store on it.

use std::sync::Arc;

use tollgate_metering::Store;
use tollgate_store::testing::TestDatabase;

/// The number in the environment variable `name`, or `default`.
pub fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// A throwaway database on the test Postgres (`TOLLGATE_TEST_DATABASE_URL`),
/// dropped with it.
pub struct Bench {
    pub db: TestDatabase,
    /// The gateway's store, migrated, four connections.
    pub store: Arc<dyn Store>,
    /// A plain client, for seeding and for baselines.
    pub client: tokio_postgres::Client,
}

pub async fn database() -> Bench {
    let db = TestDatabase::create().await;
    let store = tollgate_store::open(db.url(), 4).await.unwrap();
    store.migrate().await.unwrap();
    let (client, connection) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    Bench { db, store, client }
}
