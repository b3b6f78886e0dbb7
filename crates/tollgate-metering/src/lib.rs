//! Tollgate's accounting domain: who a request belongs to and what it costs.
//!
//! Owns the key format and digest, the in-memory key cache, identifiers, the
//! records the gateway keeps (customers, keys) and the [`Store`] trait that
//! storage backends implement. Limits, usage extraction, pricing and the
//! recorder join it as they arrive.
//!
//! It must know neither hyper nor any database driver: the proxy crate calls
//! into it on the hot path, and the store crate implements its trait.

pub mod accounts;
pub mod cache;
mod events;
pub mod ids;
pub mod key;
pub mod limits;
pub mod policy;
pub mod reporting;
pub mod reports;
pub mod store;
pub mod telemetry;
pub mod usage;

pub use ids::{CustomerId, KeyId};
pub use key::{KeyDigest, KeyFormat, KeyFormatError, PlainKey};
pub use store::{Store, StoreError};
