//! The recorder's one door to the database: the only code of the recorder
//! that calls the [`Store`].

use std::sync::Arc;

use async_trait::async_trait;

use crate::store::{Store, StoreError};
use crate::usage::UsageEvent;

/// Where the recorder writes usage rows (a trait so that tests can make
/// writes fail or hang on cue).
#[async_trait]
pub(super) trait UsageDatabase: Send + Sync {
    /// Writes `rows` in one transaction. `again`: some of them may be in the
    /// database already (a replay, or the retry of a write whose outcome
    /// went unseen).
    async fn write(&self, rows: &[UsageEvent], again: bool) -> Result<(), StoreError>;
}

/// The [`Store`] as the recorder's database.
pub(super) struct StoreDatabase(pub(super) Arc<dyn Store>);

#[async_trait]
impl UsageDatabase for StoreDatabase {
    async fn write(&self, rows: &[UsageEvent], again: bool) -> Result<(), StoreError> {
        if again {
            self.0.write_usage_deduplicated(rows).await?;
        } else {
            self.0.write_usage(rows).await?;
        }
        Ok(())
    }
}
