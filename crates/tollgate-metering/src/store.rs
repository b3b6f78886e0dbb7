//! The storage contract. Two backends implement it (SQLite and Postgres, in
//! the `tollgate-store` crate) and must behave the same through it; the
//! gateway, the admin API and the CLI only ever see these traits: one
//! [`Store`] made of four roles, [`AccountStore`] (customers and keys, with
//! their rules, in [`crate::keys::accounts`]), [`UsageSink`], [`UsageReports`] and
//! [`ChangeFeed`].
//!
//! Nothing on the request path calls a `Store` method: keys are served from
//! the [`crate::keys::cache::KeyCache`], which the change feed keeps current.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;

use async_trait::async_trait;
use serde::Serialize;
use time::{Date, OffsetDateTime};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::billing::records::{
    BillingLine, BillingUsage, ClosedPeriod, GroupKey, Ranking, UsageFilter, UsageGroup,
    UsageTotals,
};
use crate::keys::accounts::AccountStore;
use crate::keys::format::KeyDigest;
use crate::keys::ids::{CustomerId, KeyId};
use crate::limits::{KeyLimits, Period, PeriodTotals};
use crate::usage::UsageEvent;
use crate::webhooks::WebhookOutbox;

/// A customer as stored.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Customer {
    pub id: CustomerId,
    /// Unique.
    pub name: String,
    /// The tier's name (tiers live in config).
    pub tier: String,
    /// Per-customer overrides of tier fields, a JSON object (`{}` for none).
    pub overrides: serde_json::Value,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// A key's record: everything but the plaintext, which is never stored.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyRecord {
    pub id: KeyId,
    pub customer_id: CustomerId,
    pub digest: KeyDigest,
    /// Display prefix, e.g. `tg_Ab3dE9xQ`; not unique, not secret.
    pub prefix: String,
    pub name: Option<String>,
    /// Route names the key may use; `None` = every route.
    pub routes: Option<Vec<String>>,
    pub created_at: OffsetDateTime,
    pub expires_at: Option<OffsetDateTime>,
    pub revoked_at: Option<OffsetDateTime>,
    /// The first key of its rotation chain (its own id unless it replaced
    /// another key): the key's own limits and counters belong to the
    /// family, so a rotated key's successor shares them.
    pub family_id: KeyId,
    /// The key's own limits (the same on every key of a family); `None`
    /// for none.
    pub limits: Option<KeyLimits>,
}

/// What a key's status is at a given moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    Active,
    Revoked,
    Expired,
}

impl KeyStatus {
    fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Revoked => "revoked",
            KeyStatus::Expired => "expired",
        }
    }
}

impl fmt::Display for KeyStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl KeyRecord {
    /// Revoked wins over expired; a key expires at `expires_at` exactly.
    pub fn status(&self, now: OffsetDateTime) -> KeyStatus {
        if self.revoked_at.is_some() {
            KeyStatus::Revoked
        } else if self.expires_at.is_some_and(|at| at <= now) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        }
    }
}

/// A customer to create.
#[derive(Clone, Debug)]
pub struct NewCustomer {
    pub id: CustomerId,
    pub name: String,
    pub tier: String,
    pub overrides: serde_json::Value,
    pub created_at: OffsetDateTime,
}

/// A key to create (its digest; the plaintext stays with the caller).
#[derive(Clone, Debug)]
pub struct NewKey {
    pub id: KeyId,
    pub customer_id: CustomerId,
    pub digest: KeyDigest,
    pub prefix: String,
    pub name: Option<String>,
    pub routes: Option<Vec<String>>,
    pub created_at: OffsetDateTime,
    pub expires_at: Option<OffsetDateTime>,
    /// Its own id for a new key; a rotation's backend sets the old key's.
    pub family_id: KeyId,
    /// A rotation's backend sets the old key's.
    pub limits: Option<KeyLimits>,
}

/// A change to a customer.
#[derive(Clone, Debug, Default)]
pub struct CustomerUpdate {
    pub tier: Option<String>,
    pub overrides: Option<serde_json::Value>,
}

/// A change to a key: `None` leaves a field as it is, `Some(None)` clears
/// it (no name; every route; no expiry).
#[derive(Clone, Debug, Default)]
pub struct KeyUpdate {
    pub name: Option<Option<String>>,
    pub routes: Option<Option<Vec<String>>>,
    pub expires_at: Option<Option<OffsetDateTime>>,
    /// Applies to every key of the key's family.
    pub limits: Option<Option<KeyLimits>>,
}

/// Which keys to list.
#[derive(Clone, Debug, Default)]
pub struct KeyFilter {
    pub customer: Option<CustomerId>,
    /// Evaluated at `now`.
    pub status: Option<KeyStatus>,
    pub now: Option<OffsetDateTime>,
}

/// Keyset pagination: items strictly after `after` (ids are time-ordered),
/// at most `limit` of them.
#[derive(Clone, Copy, Debug)]
pub struct Page<Id> {
    pub after: Option<Id>,
    pub limit: u32,
}

/// What the change feed reports. Backends deliver events after the change
/// is committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreEvent {
    /// This key was created or changed (revoked, rotated, expiry moved).
    Key(KeyId),
    /// This customer was created or changed (tier, overrides).
    Customer(CustomerId),
    /// Events may have been missed (the feed reconnected): reload everything.
    Resync,
}

/// What `migrate` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationReport {
    /// Versions applied by this call, in order.
    pub applied: Vec<u32>,
    /// The schema version after the call.
    pub current: u32,
}

/// Storage failures, classified by what the caller should do about them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or failed mid-operation; retry later.
    /// The admin API answers 503 `database_unavailable`.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A uniqueness rule was violated (e.g. a customer name that exists).
    #[error("{0}")]
    Conflict(String),
    /// The thing to change does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The database was migrated by a newer Tollgate.
    #[error("the database schema is at version {database}, newer than this binary's {binary}; upgrade tollgate")]
    SchemaTooNew { database: u32, binary: u32 },
    /// The database URL or file cannot be used.
    #[error("invalid database configuration: {0}")]
    Config(String),
    /// Stored data that cannot be decoded (a bug or manual tampering).
    #[error("corrupt data in the database: {0}")]
    Corrupt(String),
}

/// A storage backend: every role below, plus the schema. The gateway and
/// the CLI hold one as `Arc<dyn Store>`; each part of them uses one role.
///
/// The roles are thin data access: rows in, rows out, each write a single
/// statement or transaction. The rules over customers and keys (lookup by
/// id or name, what rotation does to the old key) are plain Rust in
/// `keys::accounts`, written once for every backend.
#[async_trait]
pub trait Store: AccountStore + UsageSink + UsageReports + ChangeFeed + WebhookOutbox {
    /// Applies pending migrations (recorded in a migrations table); a no-op
    /// when current; `SchemaTooNew` when the database is ahead of the binary.
    async fn migrate(&self) -> Result<MigrationReport, StoreError>;

    /// The database's schema version, checked against this binary's
    /// without changing anything: `SchemaTooNew` when the database is
    /// ahead, `Config` (run `tollgate migrate`) when it is behind.
    async fn check_schema(&self) -> Result<u32, StoreError>;

    /// Succeeds when the database answers a trivial query.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Where the recorder's usage rows go.
#[async_trait]
pub trait UsageSink: Send + Sync + 'static {
    /// Writes a batch of usage rows and their `usage_daily` rollups in one
    /// transaction. Idempotent on `id`: rows already present are skipped and
    /// are not rolled up again, so replaying a batch never double-counts.
    /// Returns how many rows were new.
    async fn write_usage(&self, batch: &[UsageEvent]) -> Result<u64, StoreError>;

    /// [`UsageSink::write_usage`] for a batch that may well hold rows the
    /// database already has (the first write of a spool replay, the retry of
    /// a write whose outcome went unseen): the same result, reached by
    /// deduplicating at once, without first trying the way that such rows
    /// make fail (on Postgres, a COPY the server logs as a unique violation).
    async fn write_usage_deduplicated(&self, batch: &[UsageEvent]) -> Result<u64, StoreError> {
        self.write_usage(batch).await
    }
}

/// What is read back from the usage rollups: the limiter's period totals,
/// the reports and export, and the frozen billing periods.
#[async_trait]
pub trait UsageReports: Send + Sync + 'static {
    /// Each customer's totals over `days` (a range of days within one
    /// period: admitted requests, tokens of every class, cost), from the
    /// per-customer daily rollup; customers without rows there are absent.
    /// What the limiter loads at start and re-reads as it syncs, the open
    /// days every `sync_interval` and the whole period now and then
    /// ([`Limiter::sync`](crate::limits::Limiter::sync)), so it must stay
    /// cheap: the work grows with the customers × the days asked for.
    async fn period_totals(
        &self,
        days: Range<Date>,
    ) -> Result<HashMap<CustomerId, PeriodTotals>, StoreError>;

    /// The same totals per key family ([`KeyRecord::family_id`]), for the
    /// families that have limits of their own only: the sum over every key
    /// of the family, from the per-key daily rollup.
    async fn key_period_totals(
        &self,
        days: Range<Date>,
    ) -> Result<HashMap<KeyId, PeriodTotals>, StoreError>;

    /// Totals over `usage_daily` for the filter's days (and customer);
    /// zeros when nothing matches. Served from the rollup, never from
    /// `usage_events`.
    async fn usage_summary(&self, filter: &UsageFilter) -> Result<UsageTotals, StoreError>;

    /// Totals per group over `usage_daily`, only groups with rows, ordered
    /// by the key: days ascending, customers by name, routes and models
    /// bytewise (model `""` is "none" and comes first).
    async fn usage_grouped(
        &self,
        filter: &UsageFilter,
        group: UsageGroup,
    ) -> Result<Vec<(GroupKey, UsageTotals)>, StoreError>;

    /// Customers with usage in the filter, ranked by `by` descending (ties
    /// by name), at most `limit`. Keys are [`GroupKey::Customer`].
    async fn top_customers(
        &self,
        filter: &UsageFilter,
        by: Ranking,
        limit: u32,
    ) -> Result<Vec<(GroupKey, UsageTotals)>, StoreError>;

    /// Raw `usage_events` rows with `ts` in the filter's days (and of its
    /// customer), ordered by `(ts, id)`, at most `limit` of them after the
    /// keyset cursor `after`, the `(ts, id)` of the last row of the
    /// previous page. The caller pages through to stream an export
    /// without holding it in memory; each page is its own short query.
    async fn usage_events_page(
        &self,
        filter: &UsageFilter,
        after: Option<(OffsetDateTime, Uuid)>,
        limit: u32,
    ) -> Result<Vec<UsageEvent>, StoreError>;

    /// Every customer that existed during `period` (created before it
    /// ended; those without usage too, with zeros) with its current tier
    /// and the month's admitted requests and cost from `usage_daily`,
    /// ordered by name. Usage of ids that are not customers is left out.
    async fn billing_usage(&self, period: Period) -> Result<Vec<BillingUsage>, StoreError>;

    /// The frozen lines of `period`, if it was closed.
    async fn closed_period(&self, period: Period) -> Result<Option<ClosedPeriod>, StoreError>;

    /// Freezes `lines` as `period`'s billing, once, in one transaction. If
    /// the period is closed already (by an earlier call, or by a concurrent
    /// one from any process), stores nothing and returns what was stored
    /// first, so every caller gets the same answer. Two lines for one
    /// customer are a `Conflict` (and nothing is stored).
    async fn close_period(
        &self,
        period: Period,
        lines: &[BillingLine],
        at: OffsetDateTime,
    ) -> Result<ClosedPeriod, StoreError>;
}

/// The change feed that keeps every gateway's key cache current.
#[async_trait]
pub trait ChangeFeed: Send + Sync + 'static {
    /// Runs the change feed until `events` is closed. Its first event is a
    /// [`StoreEvent::Resync`], sent once the feed is live: from then on
    /// every committed change to keys and customers, from any process,
    /// arrives within a second. After any reconnect (or a gap it cannot rule
    /// out) it sends `Resync` again. Returns only when the receiver is gone.
    async fn watch(&self, events: mpsc::Sender<StoreEvent>);
}
