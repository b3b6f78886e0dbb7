//! Customers and keys as a backend stores them ([`AccountStore`]), and the
//! store's rules over them, here once in plain Rust rather than in each
//! backend's SQL: a customer is found by id or by name, a key by id or by
//! display prefix (a prefix shared by several keys is a conflict), and
//! rotating a key ends the old one at its grace end or at its own earlier
//! expiry, never for a revoked key ([`KeyRecord::expiry_after_rotation`]).
//! The operators' rules over the same rows live in the `tollgate-accounts`
//! crate.

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::keys::ids::{CustomerId, KeyId};
use crate::store::{
    Customer, CustomerUpdate, KeyFilter, KeyRecord, KeyUpdate, NewCustomer, NewKey, Page,
    StoreError,
};

/// The customers and keys a backend stores: rows in and out, each write
/// one statement or one transaction. The lookups by id or name
/// ([`AccountStore::find_customer`], [`AccountStore::find_key`]) are
/// written here over the plain reads, for every backend.
#[async_trait]
pub trait AccountStore: Send + Sync + 'static {
    async fn create_customer(&self, new: NewCustomer) -> Result<Customer, StoreError>;
    async fn customer(&self, id: CustomerId) -> Result<Option<Customer>, StoreError>;
    /// By exact name.
    async fn customer_named(&self, name: &str) -> Result<Option<Customer>, StoreError>;
    /// In id (creation) order.
    async fn list_customers(&self, page: Page<CustomerId>) -> Result<Vec<Customer>, StoreError>;
    async fn update_customer(
        &self,
        id: CustomerId,
        update: CustomerUpdate,
    ) -> Result<Customer, StoreError>;

    async fn create_key(&self, new: NewKey) -> Result<KeyRecord, StoreError>;
    async fn key(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError>;
    /// The keys with this display prefix, in id order.
    async fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<KeyRecord>, StoreError>;
    /// In id (creation) order.
    async fn list_keys(
        &self,
        filter: KeyFilter,
        page: Page<KeyId>,
    ) -> Result<Vec<KeyRecord>, StoreError>;
    /// Applies `update` (one statement); `NotFound` if there is no such key.
    async fn update_key(&self, id: KeyId, update: KeyUpdate) -> Result<KeyRecord, StoreError>;
    /// Sets `revoked_at` (idempotent: an already revoked key keeps its time).
    async fn revoke_key(&self, id: KeyId, at: OffsetDateTime) -> Result<KeyRecord, StoreError>;
    /// In one transaction, with the old key locked against a concurrent
    /// revoke: reads it (`NotFound` if there is none), takes its new expiry
    /// from [`KeyRecord::expiry_after_rotation`] (which refuses a revoked
    /// key), creates `new` and sets that expiry. Returns (old, new).
    async fn rotate_key(
        &self,
        old: KeyId,
        new: NewKey,
        old_expires_at: OffsetDateTime,
    ) -> Result<(KeyRecord, KeyRecord), StoreError>;

    /// Every key record, streamed to `sink` in batches (1M keys must load
    /// without holding them twice). Revoked and expired keys are included so
    /// the data plane can say why a key is refused.
    async fn load_keys(
        &self,
        sink: &mut (dyn FnMut(Vec<KeyRecord>) + Send),
    ) -> Result<(), StoreError>;

    /// By id (UUID text, any case) or, failing that, by name. A text with
    /// a control character names nothing (names cannot hold one, and
    /// Postgres refuses a NUL in text): `None`, without asking.
    async fn find_customer(&self, name_or_id: &str) -> Result<Option<Customer>, StoreError> {
        if name_or_id.contains(char::is_control) {
            return Ok(None);
        }
        if let Ok(id) = uuid::Uuid::parse_str(name_or_id) {
            if let Some(customer) = self.customer(CustomerId(id)).await? {
                return Ok(Some(customer));
            }
        }
        self.customer_named(name_or_id).await
    }

    /// By id (UUID text, any case) or, failing that, by display prefix. A
    /// prefix shared by several keys is a `Conflict` (ask for the id). A
    /// text with a control character names nothing, as for customers.
    async fn find_key(&self, id_or_prefix: &str) -> Result<Option<KeyRecord>, StoreError> {
        if id_or_prefix.contains(char::is_control) {
            return Ok(None);
        }
        if let Ok(id) = uuid::Uuid::parse_str(id_or_prefix) {
            if let Some(record) = self.key(KeyId(id)).await? {
                return Ok(Some(record));
            }
        }
        let mut found = self.keys_with_prefix(id_or_prefix).await?;
        match found.len() {
            0 | 1 => Ok(found.pop()),
            matches => Err(StoreError::Conflict(format!(
                "prefix {id_or_prefix} matches {matches} keys; use the id"
            ))),
        }
    }
}

impl KeyRecord {
    /// `new`, made by rotating this key: it joins this key's family and
    /// takes its limits. Backends call this inside the rotation's
    /// transaction, on the key as locked there.
    pub fn successor(&self, new: NewKey) -> NewKey {
        NewKey {
            family_id: self.family_id,
            limits: self.limits.clone(),
            ..new
        }
    }

    /// When this key stops working once rotated with a grace period ending
    /// at `grace_end`: then, or at its own expiry if that is earlier. A
    /// revoked key cannot be rotated (`Conflict`). Backends call this inside
    /// the rotation's transaction, on the key as locked there.
    pub fn expiry_after_rotation(
        &self,
        grace_end: OffsetDateTime,
    ) -> Result<OffsetDateTime, StoreError> {
        if self.revoked_at.is_some() {
            return Err(StoreError::Conflict(format!("key {} is revoked", self.id)));
        }
        Ok(match self.expires_at {
            Some(existing) if existing <= grace_end => existing,
            _ => grace_end,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::format::KeyDigest;
    use time::macros::datetime;

    fn record(expires_at: Option<OffsetDateTime>, revoked_at: Option<OffsetDateTime>) -> KeyRecord {
        KeyRecord {
            id: KeyId::new(),
            customer_id: CustomerId::new(),
            digest: KeyDigest::of("tg_test"),
            prefix: "tg_test0000".to_owned(),
            name: None,
            routes: None,
            created_at: datetime!(2026-11-22 08:00 UTC),
            expires_at,
            revoked_at,
            family_id: KeyId::new(),
            limits: None,
        }
    }

    #[test]
    fn rotation_ends_the_old_key_at_the_grace_end_or_its_earlier_expiry() {
        let grace_end = datetime!(2026-11-23 08:00 UTC);
        let soon = datetime!(2026-11-22 12:00 UTC);
        let far = datetime!(2030-01-01 00:00 UTC);
        let expiry = |expires_at| {
            record(expires_at, None)
                .expiry_after_rotation(grace_end)
                .ok()
        };
        assert_eq!(expiry(None), Some(grace_end));
        assert_eq!(expiry(Some(soon)), Some(soon));
        assert_eq!(expiry(Some(grace_end)), Some(grace_end));
        assert_eq!(expiry(Some(far)), Some(grace_end));

        let revoked = record(None, Some(soon));
        match revoked.expiry_after_rotation(grace_end) {
            Err(StoreError::Conflict(message)) => {
                assert_eq!(message, format!("key {} is revoked", revoked.id));
            }
            other => panic!("expected Conflict, got {other:?}"),
        }
    }
}
