//! The Store contract, run with the same bodies against a real SQLite file
//! and a real Postgres database (one fresh database per test; see
//! `tollgate_store::testing` for the server they use).

#![allow(clippy::unwrap_used)] // tests may unwrap (STYLE.md)

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use time::macros::datetime;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tollgate_metering::keys::KeyDigest;
use tollgate_metering::keys::{
    CustomerUpdate, KeyFilter, KeyRecord, KeyStatus, NewCustomer, NewKey, Page, StoreEvent,
};
use tollgate_metering::{CustomerId, KeyId};
use tollgate_metering::{Store, StoreError};
use tollgate_store::testing::{test_store, Backend, TestGuard};

tollgate_store::both_backends!(
    migrations_are_recorded_and_idempotent,
    concurrent_migrations_apply_each_version_once,
    a_newer_schema_is_refused,
    customers_are_created_found_and_updated,
    duplicate_customer_names_conflict,
    customers_list_in_pages,
    keys_are_created_and_found_by_id_or_prefix,
    ambiguous_prefixes_and_bad_keys_are_refused,
    keys_list_by_customer_and_status,
    keys_list_in_pages,
    revoking_is_idempotent,
    rotation_sets_the_old_expiry_and_refuses_revoked_keys,
    load_keys_streams_every_key_in_batches,
    watch_sees_changes_made_by_another_store,
);

const T0: OffsetDateTime = datetime!(2026-11-22 08:00:00.123456 UTC);
/// The schema version this binary migrates to.
const LATEST: u32 = 7;

fn customer(name: &str) -> NewCustomer {
    NewCustomer {
        id: CustomerId::new(),
        name: name.to_owned(),
        tier: "free".to_owned(),
        overrides: serde_json::json!({}),
        created_at: T0,
    }
}

fn key(customer: CustomerId, prefix: &str) -> NewKey {
    let id = KeyId::new();
    NewKey {
        id,
        customer_id: customer,
        digest: KeyDigest::of(&format!("tg_secret_{id}")),
        prefix: prefix.to_owned(),
        name: Some("ci".to_owned()),
        routes: Some(vec!["openai".to_owned(), "anthropic".to_owned()]),
        created_at: T0,
        expires_at: None,
        family_id: id,
        limits: None,
    }
}

fn page<Id>(after: Option<Id>, limit: u32) -> Page<Id> {
    Page { after, limit }
}

async fn migrations_are_recorded_and_idempotent(backend: Backend) {
    let guard = TestGuard::create(backend).await;
    let store = tollgate_store::open(guard.url(), 2).await.unwrap();

    // Checked without migrating: behind, which names the fix.
    match store.check_schema().await {
        Err(StoreError::Config(message)) => {
            assert!(
                message.contains("version 0") && message.contains("tollgate migrate"),
                "{message}"
            );
        }
        other => panic!("expected a Config error, got {other:?}"),
    }
    let first = store.migrate().await.unwrap();
    assert_eq!(first.applied, vec![1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(store.check_schema().await.unwrap(), LATEST);
    assert_eq!(first.current, LATEST);
    let second = store.migrate().await.unwrap();
    assert!(second.applied.is_empty(), "{second:?}");
    assert_eq!(second.current, LATEST);

    let rows = guard
        .raw("SELECT version, name, applied_at FROM schema_migrations ORDER BY version")
        .await;
    assert_eq!(rows.len(), 7);
    assert_eq!(rows[0][0].as_deref(), Some("1"));
    assert_eq!(rows[0][1].as_deref(), Some("keys"));
    assert!(rows[0][2].is_some());
    assert_eq!(rows[1][0].as_deref(), Some("2"));
    assert_eq!(rows[1][1].as_deref(), Some("usage"));
    assert_eq!(rows[2][0].as_deref(), Some("3"));
    assert_eq!(rows[2][1].as_deref(), Some("reports"));
    assert_eq!(rows[3][0].as_deref(), Some("4"));
    assert_eq!(rows[3][1].as_deref(), Some("customer_daily"));
    assert_eq!(rows[4][1].as_deref(), Some("key_limits"));
    assert_eq!(rows[5][1].as_deref(), Some("webhooks"));
    assert_eq!(rows[6][1].as_deref(), Some("usage_key"));
    store.ping().await.unwrap();
}

async fn concurrent_migrations_apply_each_version_once(backend: Backend) {
    let guard = TestGuard::create(backend).await;
    let a = tollgate_store::open(guard.url(), 2).await.unwrap();
    let b = tollgate_store::open(guard.url(), 2).await.unwrap();
    let (ra, rb) = tokio::join!(a.migrate(), b.migrate());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let mut applied = [ra.applied, rb.applied].concat();
    applied.sort_unstable();
    assert_eq!(applied, vec![1, 2, 3, 4, 5, 6, 7]);
    assert_eq!((ra.current, rb.current), (LATEST, LATEST));
    assert_eq!(
        guard.raw("SELECT count(*) FROM schema_migrations").await[0][0].as_deref(),
        Some("7")
    );
}

async fn a_newer_schema_is_refused(backend: Backend) {
    let (store, guard) = test_store(backend).await;
    guard.raw("INSERT INTO schema_migrations (version, name, applied_at) VALUES (99, 'future', '2030-01-01T00:00:00.000000Z')").await;
    match store.migrate().await {
        Err(StoreError::SchemaTooNew { database, binary }) => {
            assert_eq!((database, binary), (99, LATEST));
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
    assert!(
        matches!(
            store.check_schema().await,
            Err(StoreError::SchemaTooNew { database: 99, .. })
        ),
        "checked without migrating too"
    );
    let message = store.migrate().await.unwrap_err().to_string();
    assert!(
        message.contains("version 99") && message.contains("upgrade"),
        "{message}"
    );
}

async fn customers_are_created_found_and_updated(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let mut new = customer("acme");
    new.overrides = serde_json::json!({"rate": "10/s"});
    new.created_at = datetime!(2026-11-22 08:00:00.123456789 UTC);
    let created = store.create_customer(new.clone()).await.unwrap();
    assert_eq!(created.id, new.id);
    assert_eq!(created.name, "acme");
    assert_eq!(created.tier, "free");
    assert_eq!(created.overrides, serde_json::json!({"rate": "10/s"}));
    // Stored with microsecond precision.
    assert_eq!(created.created_at, T0);

    assert_eq!(store.customer(new.id).await.unwrap(), Some(created.clone()));
    assert_eq!(
        store.find_customer("acme").await.unwrap(),
        Some(created.clone())
    );
    assert_eq!(
        store.find_customer(&new.id.to_string()).await.unwrap(),
        Some(created.clone())
    );
    let upper = new.id.to_string().to_uppercase();
    assert_eq!(
        store.find_customer(&upper).await.unwrap(),
        Some(created.clone())
    );
    assert_eq!(store.find_customer("nobody").await.unwrap(), None);
    assert_eq!(store.customer(CustomerId::new()).await.unwrap(), None);

    let pro = store
        .update_customer(
            new.id,
            CustomerUpdate {
                tier: Some("pro".to_owned()),
                overrides: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(pro.tier, "pro");
    assert_eq!(pro.overrides, serde_json::json!({"rate": "10/s"}));
    let cleared = store
        .update_customer(
            new.id,
            CustomerUpdate {
                tier: None,
                overrides: Some(serde_json::json!({})),
            },
        )
        .await
        .unwrap();
    assert_eq!(cleared.tier, "pro");
    assert_eq!(cleared.overrides, serde_json::json!({}));
    assert_eq!(store.customer(new.id).await.unwrap(), Some(cleared));

    let unknown = CustomerId::new();
    match store
        .update_customer(unknown, CustomerUpdate::default())
        .await
    {
        Err(StoreError::NotFound(what)) => assert_eq!(what, format!("customer {unknown}")),
        other => panic!("expected NotFound, got {other:?}"),
    }
}

async fn duplicate_customer_names_conflict(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    store.create_customer(customer("acme")).await.unwrap();
    match store.create_customer(customer("acme")).await {
        Err(StoreError::Conflict(message)) => {
            assert_eq!(message, "customer \"acme\" already exists")
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    let list = store.list_customers(page(None, 10)).await.unwrap();
    assert_eq!(list.len(), 1);
}

async fn customers_list_in_pages(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(
            store
                .create_customer(customer(&format!("c{n}")))
                .await
                .unwrap()
                .id,
        );
    }
    ids.sort();
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let batch = store.list_customers(page(after, 2)).await.unwrap();
        assert!(batch.len() <= 2);
        if batch.is_empty() {
            break;
        }
        after = batch.last().map(|c| c.id);
        seen.extend(batch.into_iter().map(|c| c.id));
    }
    assert_eq!(seen, ids);
    assert!(store
        .list_customers(page(None, 0))
        .await
        .unwrap()
        .is_empty());
}

async fn keys_are_created_and_found_by_id_or_prefix(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let acme = store.create_customer(customer("acme")).await.unwrap();
    let mut new = key(acme.id, "tg_Ab3dE9xQ");
    new.expires_at = Some(datetime!(2027-01-01 00:00 UTC));
    let created = store.create_key(new.clone()).await.unwrap();
    let expected = KeyRecord {
        id: new.id,
        customer_id: acme.id,
        digest: new.digest,
        prefix: "tg_Ab3dE9xQ".to_owned(),
        name: Some("ci".to_owned()),
        routes: Some(vec!["openai".to_owned(), "anthropic".to_owned()]),
        created_at: T0,
        expires_at: Some(datetime!(2027-01-01 00:00 UTC)),
        revoked_at: None,
        family_id: new.id,
        limits: None,
    };
    assert_eq!(created, expected);
    assert_eq!(store.key(new.id).await.unwrap(), Some(expected.clone()));
    assert_eq!(
        store.find_key(&new.id.to_string()).await.unwrap(),
        Some(expected.clone())
    );
    assert_eq!(
        store.find_key("tg_Ab3dE9xQ").await.unwrap(),
        Some(expected.clone())
    );
    assert_eq!(store.find_key("tg_nothere").await.unwrap(), None);
    assert_eq!(store.key(KeyId::new()).await.unwrap(), None);

    // No routes and no name are kept as such.
    let mut open = key(acme.id, "tg_open0000");
    open.routes = None;
    open.name = None;
    let open_record = store.create_key(open.clone()).await.unwrap();
    assert_eq!((open_record.routes, open_record.name), (None, None));
    let mut empty = key(acme.id, "tg_empty000");
    empty.routes = Some(Vec::new());
    assert_eq!(
        store.create_key(empty).await.unwrap().routes,
        Some(Vec::new())
    );
}

async fn ambiguous_prefixes_and_bad_keys_are_refused(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let acme = store.create_customer(customer("acme")).await.unwrap();
    let first = store.create_key(key(acme.id, "tg_SAME0000")).await.unwrap();
    store.create_key(key(acme.id, "tg_SAME0000")).await.unwrap();
    match store.find_key("tg_SAME0000").await {
        Err(StoreError::Conflict(message)) => {
            assert_eq!(message, "prefix tg_SAME0000 matches 2 keys; use the id");
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    // The id still finds either.
    assert_eq!(
        store
            .find_key(&first.id.to_string())
            .await
            .unwrap()
            .map(|k| k.id),
        Some(first.id)
    );

    // A digest already stored.
    let mut copy = key(acme.id, "tg_copy0000");
    copy.digest = first.digest;
    match store.create_key(copy).await {
        Err(StoreError::Conflict(message)) => assert!(message.contains("digest"), "{message}"),
        other => panic!("expected Conflict, got {other:?}"),
    }
    // An id already stored.
    let mut again = key(acme.id, "tg_again000");
    again.id = first.id;
    match store.create_key(again).await {
        Err(StoreError::Conflict(message)) => {
            assert_eq!(message, format!("key {} already exists", first.id));
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    // A customer that does not exist.
    let ghost = CustomerId::new();
    match store.create_key(key(ghost, "tg_ghost000")).await {
        Err(StoreError::NotFound(what)) => assert_eq!(what, format!("customer {ghost}")),
        other => panic!("expected NotFound, got {other:?}"),
    }
}

async fn keys_list_by_customer_and_status(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    // An hour ago, so that the keys expired then are expired now too.
    let now =
        OffsetDateTime::now_utc().replace_microsecond(500).unwrap() - time::Duration::hours(1);
    let acme = store.create_customer(customer("acme")).await.unwrap();
    let globex = store.create_customer(customer("globex")).await.unwrap();

    let active = store.create_key(key(acme.id, "tg_active00")).await.unwrap();
    let mut later = key(acme.id, "tg_later000");
    later.expires_at = Some(now + time::Duration::microseconds(1));
    let later = store.create_key(later).await.unwrap();
    let mut at_now = key(acme.id, "tg_atnow000");
    at_now.expires_at = Some(now);
    let at_now = store.create_key(at_now).await.unwrap();
    let revoked = store.create_key(key(acme.id, "tg_revoked0")).await.unwrap();
    store.revoke_key(revoked.id, T0).await.unwrap();
    // Revoked wins over expired.
    let mut both = key(acme.id, "tg_both0000");
    both.expires_at = Some(T0);
    let both = store.create_key(both).await.unwrap();
    store.revoke_key(both.id, T0).await.unwrap();
    let other = store
        .create_key(key(globex.id, "tg_globex00"))
        .await
        .unwrap();

    let list = |customer: Option<CustomerId>, status: Option<KeyStatus>| {
        let store = store.clone();
        async move {
            let filter = KeyFilter {
                customer,
                status,
                now: Some(now),
            };
            let keys = store.list_keys(filter, page(None, 100)).await.unwrap();
            for record in &keys {
                if let Some(status) = status {
                    assert_eq!(record.status(now), status, "{record:?}");
                }
            }
            keys.into_iter().map(|k| k.id).collect::<Vec<_>>()
        }
    };
    let sorted = |mut ids: Vec<KeyId>| {
        ids.sort();
        ids
    };
    assert_eq!(
        list(None, None).await,
        sorted(vec![
            active.id, later.id, at_now.id, revoked.id, both.id, other.id
        ])
    );
    assert_eq!(list(Some(globex.id), None).await, vec![other.id]);
    assert_eq!(
        list(Some(acme.id), Some(KeyStatus::Active)).await,
        sorted(vec![active.id, later.id])
    );
    assert_eq!(
        list(Some(acme.id), Some(KeyStatus::Expired)).await,
        vec![at_now.id]
    );
    assert_eq!(
        list(None, Some(KeyStatus::Revoked)).await,
        sorted(vec![revoked.id, both.id])
    );
    assert_eq!(
        list(Some(CustomerId::new()), None).await,
        Vec::<KeyId>::new()
    );

    // Without `now`, the status is taken at the current time.
    let current = store
        .list_keys(
            KeyFilter {
                customer: Some(acme.id),
                status: Some(KeyStatus::Expired),
                now: None,
            },
            page(None, 100),
        )
        .await
        .unwrap();
    assert_eq!(
        sorted(current.into_iter().map(|k| k.id).collect()),
        sorted(vec![later.id, at_now.id])
    );
}

async fn keys_list_in_pages(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let acme = store.create_customer(customer("acme")).await.unwrap();
    let globex = store.create_customer(customer("globex")).await.unwrap();
    let mut acme_keys = Vec::new();
    for n in 0..7 {
        acme_keys.push(
            store
                .create_key(key(acme.id, &format!("tg_acme{n:04}")))
                .await
                .unwrap()
                .id,
        );
        store
            .create_key(key(globex.id, &format!("tg_glob{n:04}")))
            .await
            .unwrap();
    }
    acme_keys.sort();
    let filter = KeyFilter {
        customer: Some(acme.id),
        status: Some(KeyStatus::Active),
        now: None,
    };
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let batch = store
            .list_keys(filter.clone(), page(after, 3))
            .await
            .unwrap();
        assert!(batch.len() <= 3);
        let Some(last) = batch.last() else { break };
        after = Some(last.id);
        seen.extend(batch.iter().map(|k| k.id));
    }
    assert_eq!(seen, acme_keys);
}

async fn revoking_is_idempotent(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let acme = store.create_customer(customer("acme")).await.unwrap();
    let created = store.create_key(key(acme.id, "tg_revoke00")).await.unwrap();
    let first_at = datetime!(2026-11-23 10:00:00.000001 UTC);
    let revoked = store.revoke_key(created.id, first_at).await.unwrap();
    assert_eq!(revoked.revoked_at, Some(first_at));
    assert_eq!(revoked.status(first_at), KeyStatus::Revoked);
    let again = store
        .revoke_key(created.id, datetime!(2026-11-24 00:00 UTC))
        .await
        .unwrap();
    assert_eq!(again.revoked_at, Some(first_at));
    assert_eq!(store.key(created.id).await.unwrap(), Some(again));

    let unknown = KeyId::new();
    match store.revoke_key(unknown, first_at).await {
        Err(StoreError::NotFound(what)) => assert_eq!(what, format!("key {unknown}")),
        other => panic!("expected NotFound, got {other:?}"),
    }
}

async fn rotation_sets_the_old_expiry_and_refuses_revoked_keys(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let acme = store.create_customer(customer("acme")).await.unwrap();
    let grace_end = datetime!(2026-11-23 08:00 UTC);

    // No expiry before: the grace end becomes it.
    let old = store.create_key(key(acme.id, "tg_old00000")).await.unwrap();
    let new = key(acme.id, "tg_new00000");
    let (old_after, created) = store
        .rotate_key(old.id, new.clone(), grace_end)
        .await
        .unwrap();
    assert_eq!(old_after.id, old.id);
    assert_eq!(old_after.expires_at, Some(grace_end));
    assert_eq!(old_after.revoked_at, None);
    assert_eq!(created.id, new.id);
    assert_eq!(created.digest, new.digest);
    assert_eq!(store.key(old.id).await.unwrap(), Some(old_after));
    assert_eq!(store.key(new.id).await.unwrap(), Some(created));

    // An earlier expiry is kept.
    let mut soon = key(acme.id, "tg_soon0000");
    soon.expires_at = Some(datetime!(2026-11-22 12:00 UTC));
    let soon = store.create_key(soon).await.unwrap();
    let (kept, _) = store
        .rotate_key(soon.id, key(acme.id, "tg_soon0001"), grace_end)
        .await
        .unwrap();
    assert_eq!(kept.expires_at, Some(datetime!(2026-11-22 12:00 UTC)));

    // A later expiry is brought forward.
    let mut far = key(acme.id, "tg_far00000");
    far.expires_at = Some(datetime!(2030-01-01 00:00 UTC));
    let far = store.create_key(far).await.unwrap();
    let (moved, _) = store
        .rotate_key(far.id, key(acme.id, "tg_far00001"), grace_end)
        .await
        .unwrap();
    assert_eq!(moved.expires_at, Some(grace_end));

    // A revoked key cannot be rotated, and the new key is not created.
    let revoked = store.create_key(key(acme.id, "tg_gone0000")).await.unwrap();
    store.revoke_key(revoked.id, T0).await.unwrap();
    let refused = key(acme.id, "tg_gone0001");
    match store
        .rotate_key(revoked.id, refused.clone(), grace_end)
        .await
    {
        Err(StoreError::Conflict(message)) => {
            assert_eq!(message, format!("key {} is revoked", revoked.id));
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert_eq!(store.key(refused.id).await.unwrap(), None);

    // An unknown key.
    let unknown = KeyId::new();
    let orphan = key(acme.id, "tg_orphan00");
    match store.rotate_key(unknown, orphan.clone(), grace_end).await {
        Err(StoreError::NotFound(what)) => assert_eq!(what, format!("key {unknown}")),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert_eq!(store.key(orphan.id).await.unwrap(), None);

    // A failed insert (digest taken) rolls the whole rotation back.
    let mut clash = key(acme.id, "tg_clash000");
    clash.digest = soon.digest;
    let victim = store.create_key(key(acme.id, "tg_victim00")).await.unwrap();
    assert!(matches!(
        store.rotate_key(victim.id, clash, grace_end).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store
            .key(victim.id)
            .await
            .unwrap()
            .and_then(|k| k.expires_at),
        None
    );
}

async fn load_keys_streams_every_key_in_batches(backend: Backend) {
    let (store, guard) = test_store(backend).await;
    let acme = store.create_customer(customer("acme")).await.unwrap();
    let known = store.create_key(key(acme.id, "tg_known000")).await.unwrap();
    store.revoke_key(known.id, T0).await.unwrap();
    let known = store.key(known.id).await.unwrap().unwrap();

    // 10,050 more keys, inserted in bulk: more than one batch.
    let bulk = 10_050;
    let sql = match backend {
        Backend::Sqlite => format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {bulk}) \
             INSERT INTO api_keys (id, customer_id, digest, prefix, created_at) \
             SELECT printf('00000000-0000-7000-8000-%012x', i), '{id}', randomblob(32), \
                    'tg_bulk' || i, '2026-11-22T08:00:00.000000Z' FROM n",
            id = acme.id
        ),
        Backend::Postgres => format!(
            "INSERT INTO api_keys (id, customer_id, digest, prefix, created_at, family_id) \
             SELECT ('00000000-0000-7000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, '{id}', \
                    decode(md5(i::text) || md5('x' || i), 'hex'), 'tg_bulk' || i, now(), \
                    ('00000000-0000-7000-8000-' || lpad(to_hex(i), 12, '0'))::uuid \
             FROM generate_series(1, {bulk}) AS i",
            id = acme.id
        ),
    };
    guard.raw(&sql).await;

    let mut batches = Vec::new();
    let mut ids = HashSet::new();
    let mut found = None;
    store
        .load_keys(&mut |batch: Vec<KeyRecord>| {
            batches.push(batch.len());
            for record in batch {
                if record.id == known.id {
                    found = Some(record.clone());
                }
                assert!(ids.insert(record.id), "{:?} twice", record.id);
            }
        })
        .await
        .unwrap();
    assert_eq!(ids.len(), bulk + 1);
    assert!(batches.len() >= 2, "{batches:?}");
    assert!(batches.iter().all(|&n| n > 0 && n <= 10_000), "{batches:?}");
    assert_eq!(found, Some(known));
}

/// The next event, or `None` after `within`.
async fn next_event(
    events: &mut mpsc::Receiver<StoreEvent>,
    within: Duration,
) -> Option<StoreEvent> {
    tokio::time::timeout(within, events.recv())
        .await
        .ok()
        .flatten()
}

/// Makes changes through `other` until the feed reports one, so that the
/// feed is known to be running; then drains what is left.
async fn wait_until_watching(_other: &dyn Store, events: &mut mpsc::Receiver<StoreEvent>) {
    // A feed's first event is the Resync that says it is live: every change
    // committed from then on is delivered.
    assert_eq!(
        next_event(events, Duration::from_secs(10)).await,
        Some(StoreEvent::Resync),
        "the change feed announces itself with a Resync"
    );
}

/// Waits up to a second for `wanted`, skipping other events.
async fn expect_within_a_second(
    events: &mut mpsc::Receiver<StoreEvent>,
    wanted: StoreEvent,
) -> Duration {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(1);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_event(events, left).await {
            Some(event) if event == wanted => return started.elapsed(),
            Some(_) => {}
            None => panic!("{wanted:?} did not arrive within 1 s"),
        }
    }
}

async fn watch_sees_changes_made_by_another_store(backend: Backend) {
    let (store, guard) = test_store(backend).await;
    let other = tollgate_store::open(guard.url(), 2).await.unwrap();
    let (sender, mut events) = mpsc::channel(64);
    let watcher = {
        let store = store.clone();
        tokio::spawn(async move { store.watch(sender).await })
    };
    wait_until_watching(&*other, &mut events).await;

    let acme = other.create_customer(customer("acme")).await.unwrap();
    expect_within_a_second(&mut events, StoreEvent::Customer(acme.id)).await;
    let created = other.create_key(key(acme.id, "tg_watched0")).await.unwrap();
    expect_within_a_second(&mut events, StoreEvent::Key(created.id)).await;
    other.revoke_key(created.id, T0).await.unwrap();
    expect_within_a_second(&mut events, StoreEvent::Key(created.id)).await;
    other
        .update_customer(
            acme.id,
            CustomerUpdate {
                tier: Some("pro".to_owned()),
                overrides: None,
            },
        )
        .await
        .unwrap();
    expect_within_a_second(&mut events, StoreEvent::Customer(acme.id)).await;
    let replacement = key(acme.id, "tg_watched1");
    let rotatable = other.create_key(key(acme.id, "tg_watched2")).await.unwrap();
    expect_within_a_second(&mut events, StoreEvent::Key(rotatable.id)).await;
    other
        .rotate_key(rotatable.id, replacement.clone(), T0)
        .await
        .unwrap();
    // Both keys of a rotation are reported.
    let mut seen = HashSet::new();
    while seen.len() < 2 {
        match next_event(&mut events, Duration::from_secs(1)).await {
            Some(StoreEvent::Key(id)) => {
                seen.insert(id);
            }
            other => panic!("expected a key event, got {other:?}"),
        }
    }
    assert_eq!(seen, HashSet::from([rotatable.id, replacement.id]));

    // The feed ends once the receiver is gone.
    drop(events);
    tokio::time::timeout(Duration::from_secs(2), watcher)
        .await
        .expect("watch returned after the receiver was dropped")
        .unwrap();
}

mod postgres_only {
    use super::*;
    use tollgate_metering::keys::KeyUpdate;
    use tollgate_metering::limits::KeyLimits;
    use tollgate_store::PostgresStore;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_resyncs_after_its_connection_is_killed() {
        let (store, guard) = test_store(Backend::Postgres).await;
        let TestGuard::Postgres(db) = &guard else {
            unreachable!()
        };
        let other = tollgate_store::open(guard.url(), 2).await.unwrap();
        let (sender, mut events) = mpsc::channel(64);
        let watcher = {
            let store = store.clone();
            tokio::spawn(async move { store.watch(sender).await })
        };
        wait_until_watching(&*other, &mut events).await;

        let killed = guard
            .raw(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = '{}' AND query ILIKE 'LISTEN%'",
                db.name()
            ))
            .await;
        assert_eq!(killed.len(), 1, "exactly one listener: {killed:?}");
        assert_eq!(
            next_event(&mut events, Duration::from_secs(5)).await,
            Some(StoreEvent::Resync)
        );

        // And it keeps delivering.
        let acme = other.create_customer(customer("acme")).await.unwrap();
        expect_within_a_second(&mut events, StoreEvent::Customer(acme.id)).await;
        let created = other.create_key(key(acme.id, "tg_after000")).await.unwrap();
        expect_within_a_second(&mut events, StoreEvent::Key(created.id)).await;

        drop(events);
        tokio::time::timeout(Duration::from_secs(2), watcher)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_server_is_unavailable_within_seconds() {
        let store: Arc<dyn Store> =
            Arc::new(PostgresStore::new("postgres://postgres@127.0.0.1:1/x", 2).unwrap());
        let started = Instant::now();
        let result = store.ping().await;
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "{result:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let message = result.unwrap_err().to_string();
        assert!(message.starts_with("database unavailable"), "{message}");
        // Every call fails the same way, not only ping.
        assert!(matches!(
            store.find_customer("acme").await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            store.migrate().await,
            Err(StoreError::Unavailable(_))
        ));
    }

    /// A change of a family's limits made while a rotation of it is under
    /// way reaches the rotation's new key too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn limits_changed_during_a_rotation_reach_the_new_key() {
        let (store, guard) = test_store(Backend::Postgres).await;
        let acme = store.create_customer(customer("acme")).await.unwrap();
        let first = store
            .create_key(NewKey {
                limits: Some(KeyLimits {
                    monthly_requests: Some(100),
                    ..KeyLimits::default()
                }),
                ..key(acme.id, "tg_rotating")
            })
            .await
            .unwrap();
        // A rotation under way, by hand: the old key locked, its successor
        // (with the old limits) inserted, not yet committed.
        let (mut rotation, connection) =
            tokio_postgres::connect(guard.url(), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(connection);
        let tx = rotation.transaction().await.unwrap();
        tx.batch_execute(&format!(
            "SELECT 1 FROM api_keys WHERE id = '{id}' FOR UPDATE; \
             CREATE TEMP TABLE successor AS SELECT * FROM api_keys WHERE id = '{id}'; \
             UPDATE successor SET id = gen_random_uuid(), digest = sha256(digest); \
             INSERT INTO api_keys SELECT * FROM successor;",
            id = first.id
        ))
        .await
        .unwrap();
        let tighter = KeyLimits {
            monthly_requests: Some(10),
            ..KeyLimits::default()
        };
        let update = {
            let store = store.clone();
            let tighter = tighter.clone();
            tokio::spawn(async move {
                store
                    .update_key(
                        first.id,
                        KeyUpdate {
                            limits: Some(Some(tighter)),
                            ..KeyUpdate::default()
                        },
                    )
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!update.is_finished(), "waits for the rotation");
        tx.commit().await.unwrap();
        update.await.unwrap().unwrap();
        let rows = guard
            .raw(&format!(
                "SELECT count(*) FROM api_keys WHERE family_id = '{}' \
                 AND limits->>'monthly_requests' = '10'",
                first.id
            ))
            .await;
        assert_eq!(rows[0][0].as_deref(), Some("2"), "both keys of the family");
    }

    #[tokio::test]
    async fn bad_urls_and_sizes_are_config_errors() {
        assert!(matches!(
            PostgresStore::new("postgres://u@h/db", 0),
            Err(StoreError::Config(_))
        ));
        assert!(matches!(
            PostgresStore::new("postgres://u@h:notaport/db", 2),
            Err(StoreError::Config(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unmigrated_database_says_so() {
        let guard = TestGuard::create(Backend::Postgres).await;
        let store = tollgate_store::open(guard.url(), 2).await.unwrap();
        match store.find_customer("acme").await {
            Err(StoreError::Config(message)) => {
                assert!(message.contains("tollgate migrate"), "{message}")
            }
            other => panic!("expected Config, got {other:?}"),
        }
    }

    /// `cargo test --release -p tollgate-store -- --ignored --nocapture million`
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "slow: a million keys; run by hand to measure"]
    async fn load_a_million_keys() {
        let (store, guard) = test_store(Backend::Postgres).await;
        let acme = store.create_customer(customer("acme")).await.unwrap();
        guard.raw(&format!(
                "INSERT INTO api_keys (id, customer_id, digest, prefix, routes, created_at, expires_at) \
                 SELECT ('00000000-0000-7000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, '{}', \
                        decode(md5(i::text) || md5('x' || i), 'hex'), 'tg_' || lpad(i::text, 8, '0'), \
                        ARRAY['openai'], now(), now() + interval '30 days' \
                 FROM generate_series(1, 1000000) AS i",
                acme.id
            ),
        )
        .await;
        let started = Instant::now();
        let mut count = 0usize;
        store
            .load_keys(&mut |batch: Vec<KeyRecord>| count += batch.len())
            .await
            .unwrap();
        let elapsed = started.elapsed();
        eprintln!("loaded {count} keys in {elapsed:?}");
        assert_eq!(count, 1_000_000);
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    }
}

mod sqlite_only {
    use super::*;
    use tollgate_store::testing::TestSqlite;

    #[tokio::test]
    async fn the_file_and_its_directories_are_created_and_encoded_as_specified() {
        let db = TestSqlite::create();
        let path = db.dir().join("a/b/tollgate.db");
        let store = tollgate_store::open(&format!("sqlite://{}", path.display()), 1)
            .await
            .unwrap();
        store.migrate().await.unwrap();
        assert!(path.exists());

        let acme = store.create_customer(customer("acme")).await.unwrap();
        let mut new = key(acme.id, "tg_encoded0");
        new.created_at = datetime!(2026-11-22 09:00:00.123456789 +01:00);
        store.create_key(new.clone()).await.unwrap();

        let conn = rusqlite::Connection::open(&path).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |row| row.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let (id, customer_id, digest, routes, created_at, expires_at): (
            String,
            String,
            Vec<u8>,
            String,
            String,
            Option<String>,
        ) = conn
            .query_row(
                "SELECT id, customer_id, digest, routes, created_at, expires_at FROM api_keys",
                [],
                |row| {
                    Ok((
                        row.get(0)?,
                        row.get(1)?,
                        row.get(2)?,
                        row.get(3)?,
                        row.get(4)?,
                        row.get(5)?,
                    ))
                },
            )
            .unwrap();
        assert_eq!(id, new.id.to_string());
        assert_eq!(id, id.to_lowercase());
        assert_eq!(customer_id, acme.id.to_string());
        assert_eq!(digest, &new.digest.0);
        assert_eq!(routes, r#"["openai","anthropic"]"#);
        assert_eq!(created_at, "2026-11-22T08:00:00.123456Z");
        assert_eq!(expires_at, None);
        let overrides: String = conn
            .query_row("SELECT overrides FROM customers", [], |row| row.get(0))
            .unwrap();
        assert_eq!(overrides, "{}");
    }

    #[tokio::test]
    async fn unsupported_urls_and_unusable_files_are_config_errors() {
        assert!(matches!(
            tollgate_store::open("mysql://x", 1).await,
            Err(StoreError::Config(_))
        ));
        let db = TestSqlite::create();
        // A directory where the file should be.
        let url = format!("sqlite://{}", db.dir().display());
        match tollgate_store::open(&url, 1).await {
            Err(StoreError::Config(message)) => {
                assert!(message.contains("cannot open"), "{message}")
            }
            Err(other) => panic!("expected Config, got {other:?}"),
            Ok(_) => panic!("expected Config, got a store"),
        }
    }

    #[tokio::test]
    async fn corrupt_rows_are_reported_as_corrupt() {
        let (store, guard) = test_store(Backend::Sqlite).await;
        let acme = store.create_customer(customer("acme")).await.unwrap();
        let created = store.create_key(key(acme.id, "tg_corrupt0")).await.unwrap();
        guard
            .raw(&format!(
                "UPDATE api_keys SET created_at = 'yesterday' WHERE id = '{}'",
                created.id
            ))
            .await;
        match store.key(created.id).await {
            Err(StoreError::Corrupt(message)) => {
                assert!(message.contains("yesterday"), "{message}")
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
}
