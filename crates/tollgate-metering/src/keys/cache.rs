//! The in-memory key cache: every key, keyed by its BLAKE3 digest.
//!
//! Authentication is one digest and one sharded-map lookup; it never touches
//! the database, so unknown keys cannot be used to load it. The cache holds
//! revoked and expired keys too, so a refusal can say why.
//!
//! [`run_feed`] keeps the cache current: it applies the store's change events
//! (a key created, revoked or rotated elsewhere is live here within the
//! feed's delay) and reloads everything after a [`StoreEvent::Resync`].
//!
//! # Failure behaviour
//! While the database is down the cache keeps serving what it has: revoked
//! keys stay revoked, and changes made meanwhile arrive when the feed
//! resyncs after the database returns. A change event whose record cannot be
//! read is retried (with backoff) until it can; nothing is dropped.

use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::events::{KeyFeedResynced, KeyFeedUpdateFailed};
use crate::keys::format::KeyDigest;
use crate::keys::ids::{CustomerId, KeyId};
use crate::limits::policy::Policies;
use crate::store::{KeyRecord, Store, StoreError, StoreEvent};
use crate::telemetry::emit;

/// Why a well-formed key is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyRefusal {
    #[error("unknown API key")]
    Unknown,
    #[error("this API key has been revoked")]
    Revoked,
    #[error("this API key has expired")]
    Expired,
}

/// What a successful lookup yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authenticated {
    pub key_id: KeyId,
    pub customer_id: CustomerId,
    /// Route names the key is limited to; `None` = all routes.
    pub routes: Option<RouteList>,
}

/// The routes a key is limited to, shared between the cache entry and every
/// lookup (a thin pointer: most keys have none, and entries stay small).
pub(crate) type RouteList = Arc<Vec<Box<str>>>;

impl Authenticated {
    pub fn may_use(&self, route: &str) -> bool {
        self.routes
            .as_ref()
            .is_none_or(|routes| routes.iter().any(|r| &**r == route))
    }
}

/// One key as the data plane needs it: 56 bytes, so a million keys fit in
/// well under 300 MB with the map's overhead.
#[derive(Clone, Debug)]
struct CachedKey {
    key_id: KeyId,
    customer_id: CustomerId,
    routes: Option<RouteList>,
    /// Unix microseconds; `i64::MAX` when the key never expires.
    expires_at: i64,
    /// The load generation that last saw this key (for resync sweeps).
    generation: u32,
    revoked: bool,
}

/// Digests are uniformly random already (and only stored keys are ever
/// inserted), so the first 8 bytes are the hash: no SipHash per lookup.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as one write of the 32 bytes (after a length
        // prefix for slices; arrays have none). Mixing every write keeps
        // this correct whatever the caller feeds.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }
}

type DigestMap<V> = DashMap<KeyDigest, V, BuildHasherDefault<DigestHasher>>;

/// Every key the store has, by digest. (There is no index by key id: change
/// events re-read the key, whose record carries its digest, and a digest
/// never changes.)
pub struct KeyCache {
    by_digest: DigestMap<CachedKey>,
    generation: AtomicU32,
}

impl Default for KeyCache {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyCache {
    pub fn new() -> KeyCache {
        KeyCache {
            by_digest: DigestMap::default(),
            generation: AtomicU32::new(0),
        }
    }

    /// Authenticates a digest at `now_micros` (Unix microseconds).
    pub fn lookup(&self, digest: &KeyDigest, now_micros: i64) -> Result<Authenticated, KeyRefusal> {
        let entry = self.by_digest.get(digest).ok_or(KeyRefusal::Unknown)?;
        if entry.revoked {
            return Err(KeyRefusal::Revoked);
        }
        if entry.expires_at <= now_micros {
            return Err(KeyRefusal::Expired);
        }
        Ok(Authenticated {
            key_id: entry.key_id,
            customer_id: entry.customer_id,
            routes: entry.routes.clone(),
        })
    }

    /// Inserts or replaces one key.
    /// Adds or replaces one key; whether it was new to the cache.
    pub fn upsert(&self, record: &KeyRecord) -> bool {
        let generation = self.generation.load(Ordering::Relaxed);
        self.insert(record, generation)
    }

    fn insert(&self, record: &KeyRecord, generation: u32) -> bool {
        let cached = CachedKey {
            key_id: record.id,
            customer_id: record.customer_id,
            routes: record
                .routes
                .as_ref()
                .map(|routes| Arc::new(routes.iter().map(|r| Box::from(r.as_str())).collect())),
            expires_at: record.expires_at.map_or(i64::MAX, unix_micros),
            revoked: record.revoked_at.is_some(),
            generation,
        };
        self.by_digest.insert(record.digest, cached).is_none()
    }

    /// Forgets a key that no longer exists in the store. Keys are never
    /// deleted in normal operation, so this scan is for the odd manual
    /// clean-up.
    pub(crate) fn remove(&self, id: KeyId) {
        self.by_digest.retain(|_, key| key.key_id != id);
    }

    /// Replaces the whole cache with what `store` holds, and hands every
    /// key's own limits to `policies`. Lookups keep working throughout:
    /// entries are overwritten in place and the ones the store no longer
    /// has are swept at the end.
    pub async fn reload(
        &self,
        store: &dyn Store,
        policies: &Policies,
    ) -> Result<usize, StoreError> {
        let generation = self
            .generation
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1);
        let mut count = 0usize;
        store
            .load_keys(&mut |batch: Vec<KeyRecord>| {
                count += batch.len();
                for record in &batch {
                    // As for a key from the feed: one new to the cache
                    // (all of them at start, before the first totals
                    // read) that is not a rotation's successor is unused.
                    let made = self.insert(record, generation) && record.family_id == record.id;
                    policies.set_key(record, made);
                }
            })
            .await?;
        self.by_digest.retain(|_, key| key.generation == generation);
        Ok(count)
    }

    /// Number of keys held (active or not).
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

/// Unix microseconds of a timestamp (saturating far outside ±292,000 years).
pub(crate) fn unix_micros(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX)
}

/// Longest wait between retries of a failed reload.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Keeps `cache` current from `store`'s change feed until the feed ends.
/// The initial load is the caller's (so it can gate readiness on it).
pub async fn run_feed(store: Arc<dyn Store>, cache: Arc<KeyCache>, policies: Arc<Policies>) {
    let (sender, mut events) = mpsc::channel(1024);
    let watcher = {
        let store = store.clone();
        tokio::spawn(async move { store.watch(sender).await })
    };
    while let Some(event) = events.recv().await {
        let mut backoff = Duration::from_millis(100);
        loop {
            match apply(&*store, &cache, &policies, event).await {
                Ok(()) => break,
                Err(error) => {
                    emit(KeyFeedUpdateFailed {
                        error: &error,
                        event,
                        retry_in: backoff,
                    });
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
    watcher.abort();
}

async fn apply(
    store: &dyn Store,
    cache: &KeyCache,
    policies: &Policies,
    event: StoreEvent,
) -> Result<(), StoreError> {
    match event {
        StoreEvent::Key(id) => match store.key(id).await? {
            Some(record) => {
                // A key just made, not a rotation's successor, has been
                // used nowhere yet: its limits need no reading of usage.
                let made = cache.upsert(&record) && record.family_id == record.id;
                policies.set_key(&record, made);
            }
            None => cache.remove(id),
        },
        // Customers carry tiers and overrides, which the limiter follows.
        StoreEvent::Customer(id) => policies.refresh(store, id).await?,
        StoreEvent::Resync => {
            let keys = cache.reload(store, policies).await?;
            let customers = policies.reload(store).await?;
            emit(KeyFeedResynced { keys, customers });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn record(n: u8, routes: Option<Vec<&str>>) -> KeyRecord {
        KeyRecord {
            id: KeyId::new(),
            customer_id: CustomerId::new(),
            digest: KeyDigest([n; 32]),
            prefix: format!("tg_{n:08}"),
            name: None,
            routes: routes.map(|r| r.into_iter().map(String::from).collect()),
            created_at: datetime!(2026-01-01 0:00 UTC),
            expires_at: None,
            revoked_at: None,
            family_id: KeyId::new(),
            limits: None,
        }
    }

    #[test]
    fn lookup_reports_each_refusal() {
        let cache = KeyCache::new();
        let now = unix_micros(datetime!(2026-06-01 0:00 UTC));
        let active = record(1, None);
        let mut revoked = record(2, None);
        revoked.revoked_at = Some(datetime!(2026-02-01 0:00 UTC));
        let mut expired = record(3, None);
        expired.expires_at = Some(datetime!(2026-06-01 0:00 UTC));
        let mut later = record(4, Some(vec!["openai"]));
        later.expires_at = Some(datetime!(2026-06-01 0:00:00.000001 UTC));
        for r in [&active, &revoked, &expired, &later] {
            cache.upsert(r);
        }
        let ok = cache.lookup(&active.digest, now).unwrap();
        assert_eq!(ok.key_id, active.id);
        assert_eq!(ok.customer_id, active.customer_id);
        assert!(ok.may_use("anything"));
        assert_eq!(cache.lookup(&revoked.digest, now), Err(KeyRefusal::Revoked));
        assert_eq!(
            cache.lookup(&expired.digest, now),
            Err(KeyRefusal::Expired),
            "expiry is inclusive"
        );
        let limited = cache.lookup(&later.digest, now).unwrap();
        assert!(limited.may_use("openai"));
        assert!(!limited.may_use("anthropic"));
        assert_eq!(
            cache.lookup(&KeyDigest([9; 32]), now),
            Err(KeyRefusal::Unknown)
        );
    }

    #[test]
    fn entries_stay_small() {
        assert!(
            std::mem::size_of::<CachedKey>() <= 56,
            "{}",
            std::mem::size_of::<CachedKey>()
        );
    }

    #[test]
    fn upsert_replaces_and_remove_forgets() {
        let cache = KeyCache::new();
        let mut key = record(1, None);
        cache.upsert(&key);
        key.revoked_at = Some(datetime!(2026-02-01 0:00 UTC));
        cache.upsert(&key);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.lookup(&key.digest, 0), Err(KeyRefusal::Revoked));
        cache.remove(key.id);
        assert_eq!(cache.lookup(&key.digest, 0), Err(KeyRefusal::Unknown));
        assert!(cache.is_empty());
    }
}
