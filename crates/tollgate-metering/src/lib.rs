#![warn(unreachable_pub)]
//! Tollgate's accounting domain: who a request belongs to, what it may do,
//! what it cost, and what is kept of it for reports and bills. It knows
//! neither hyper nor any database driver: the proxy crate calls into it on
//! the hot path, and the store crate implements its storage traits.
//!
//! - [`keys`]: the key format and digest, the key cache the data plane
//!   authenticates against, customers and keys as stored.
//! - [`limits`]: rate limits, monthly quotas and USD budgets, checked in
//!   memory. **A 429 comes from here**: [`limits::Limiter::admit`] refuses
//!   with a [`limits::Rejection`] (rate, quota or budget), which the proxy
//!   renders.
//! - [`usage`]: reading what a response cost (headers, JSON and SSE
//!   bodies, pricing) and recording it. **A usage row is born** in the
//!   proxy as a [`usage::UsageEvent`] (one per request, enforced by its
//!   guard), handed to the [`usage::Recorder`], appended to the durable
//!   spool, and **reaches the database** when the recorder's writer calls
//!   [`usage::UsageSink::write_usage`] on the store.
//! - [`webhooks`]: the webhook outbox as stored (events recorded once,
//!   deliveries claimed and settled).
//! - [`billing`]: what reports and billing read back from `usage_daily`
//!   (the reports themselves and the billing rule are in `tollgate-accounts`).
//!
//! The [`Store`] trait is every storage role together ([`keys::AccountStore`],
//! [`keys::ChangeFeed`], [`usage::UsageSink`], [`billing::UsageReports`],
//! [`webhooks::WebhookOutbox`]);
//! the store crate implements it for Postgres and SQLite.

pub mod billing;
mod events;
pub mod keys;
pub mod limits;
mod store;
pub mod telemetry;
pub mod usage;
pub mod webhooks;

pub use crate::{
    keys::{CustomerId, KeyId},
    store::{MigrationReport, Store, StoreError},
};
