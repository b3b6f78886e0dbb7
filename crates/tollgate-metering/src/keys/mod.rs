//! Who a request belongs to: the key format and its digest, the in-memory
//! key cache the data plane authenticates against, the change feed that
//! keeps it current, and customers and keys as a backend stores them.
//!
//! A key is checked offline first ([`KeyFormat::check`]: prefix, length,
//! alphabet, checksum), then by one BLAKE3 digest and one lookup in the
//! [`KeyCache`]; an unknown key never reaches the database. [`run_feed`]
//! applies the store's [`StoreEvent`]s so a key revoked on one instance is
//! refused on every instance within the feed's delay. [`AccountStore`] is
//! what a backend keeps of customers and keys, with the store's rules
//! (lookups by name or prefix, the rotation expiry) written once; the
//! operators' rules over it are the `tollgate-accounts` crate's.

pub(crate) mod accounts;
pub(crate) mod cache;
pub(crate) mod format;
pub(crate) mod ids;

pub use crate::{
    keys::accounts::AccountStore,
    keys::cache::{run_feed, Authenticated, KeyCache, KeyRefusal},
    keys::format::{KeyDigest, KeyFormat, KeyFormatError, PlainKey},
    keys::ids::{CustomerId, KeyId},
    store::{
        ChangeFeed, Customer, CustomerUpdate, KeyFilter, KeyRecord, KeyStatus, KeyUpdate,
        NewCustomer, NewKey, Page, StoreEvent,
    },
};
