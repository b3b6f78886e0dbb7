//! Per-key limits as stored, and the webhook outbox, run with the same
//! bodies against a real SQLite file and a real Postgres database.

#![allow(clippy::unwrap_used)] // tests may unwrap (STYLE.md)

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use time::macros::datetime;
use time::OffsetDateTime;
use tollgate_metering::keys::{KeyDigest, KeyUpdate, NewCustomer, NewKey, Page};
use tollgate_metering::limits::{KeyLimits, Limiter, ManualClock, Period, PeriodTotals, SyncRead};
use tollgate_metering::webhooks::{
    DeliveryFilter, DeliveryStatus, EventType, NewEvent, Settlement,
};
use tollgate_metering::{CustomerId, KeyId, Store};
use tollgate_store::testing::{test_store, usage_event, Backend};
use uuid::Uuid;

tollgate_store::both_backends!(
    key_limits_are_stored_shared_by_the_family_and_carried_by_rotation,
    key_period_totals_sum_each_limited_family,
    a_family_given_limits_after_a_whole_read_is_read_whole,
    an_event_is_recorded_once_with_a_delivery_per_endpoint,
    claims_take_due_deliveries_once_and_settle_them,
    a_claim_leaves_the_urls_it_is_told_to_skip,
    the_events_recorded_since_a_time_are_listed_by_dedup,
    concurrent_claimers_never_share_a_delivery,
    expiring_keys_leave_out_revoked_and_rotated_ones,
);

const T0: OffsetDateTime = datetime!(2026-12-01 08:00:00.123456 UTC);

fn customer(name: &str) -> NewCustomer {
    NewCustomer {
        id: CustomerId::new(),
        name: name.to_owned(),
        tier: "free".to_owned(),
        overrides: serde_json::json!({}),
        created_at: T0,
    }
}

fn key(customer: CustomerId, limits: Option<KeyLimits>) -> NewKey {
    let id = KeyId::new();
    NewKey {
        id,
        customer_id: customer,
        digest: KeyDigest::of(&format!("tg_secret_{id}")),
        prefix: format!("tg_{}", &id.to_string()[..8]),
        name: None,
        routes: None,
        created_at: T0,
        expires_at: None,
        family_id: id,
        limits,
    }
}

fn limits() -> KeyLimits {
    KeyLimits {
        rate: Some("10/s".parse().unwrap()),
        monthly_requests: Some(1_000),
        monthly_tokens: None,
        monthly_cost_nanos: Some(2_500_000_000),
    }
}

async fn key_limits_are_stored_shared_by_the_family_and_carried_by_rotation(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let acme = store.create_customer(customer("acme")).await.unwrap();
    let first = store
        .create_key(key(acme.id, Some(limits())))
        .await
        .unwrap();
    assert_eq!(first.limits, Some(limits()));
    assert_eq!(first.family_id, first.id);
    let plain = store.create_key(key(acme.id, None)).await.unwrap();
    assert_eq!(plain.limits, None);

    let (old, new) = store
        .rotate_key(
            first.id,
            key(acme.id, None),
            datetime!(2026-12-02 08:00 UTC),
        )
        .await
        .unwrap();
    assert_eq!(new.family_id, first.id, "the successor joins the family");
    assert_eq!(new.limits, Some(limits()), "and takes its limits");
    assert_eq!(old.family_id, first.id);

    // Changing the successor's limits changes the family's; other keys
    // keep theirs.
    let tighter = KeyLimits {
        monthly_requests: Some(10),
        ..KeyLimits::default()
    };
    let update = KeyUpdate {
        limits: Some(Some(tighter.clone())),
        ..KeyUpdate::default()
    };
    let changed = store.update_key(new.id, update).await.unwrap();
    assert_eq!(changed.limits, Some(tighter.clone()));
    assert_eq!(
        store.key(first.id).await.unwrap().unwrap().limits,
        Some(tighter)
    );
    assert_eq!(store.key(plain.id).await.unwrap().unwrap().limits, None);
    // Other fields are left alone; null clears the family's limits.
    assert_eq!(changed.name, new.name);
    let cleared = KeyUpdate {
        limits: Some(None),
        ..KeyUpdate::default()
    };
    assert_eq!(
        store.update_key(first.id, cleared).await.unwrap().limits,
        None
    );
    assert_eq!(store.key(new.id).await.unwrap().unwrap().limits, None);
    // A name change leaves the limits as they are.
    let named = KeyUpdate {
        name: Some(Some("ci".into())),
        ..KeyUpdate::default()
    };
    store
        .update_key(
            plain.id,
            KeyUpdate {
                limits: Some(Some(limits())),
                ..KeyUpdate::default()
            },
        )
        .await
        .unwrap();
    let renamed = store.update_key(plain.id, named).await.unwrap();
    assert_eq!(renamed.limits, Some(limits()));
    let mut loaded = Vec::new();
    store
        .load_keys(&mut |batch| loaded.extend(batch))
        .await
        .unwrap();
    let families: HashSet<(KeyId, KeyId)> = loaded.iter().map(|k| (k.id, k.family_id)).collect();
    assert!(families.contains(&(new.id, first.id)));
    assert!(families.contains(&(plain.id, plain.id)));
}

async fn key_period_totals_sum_each_limited_family(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let acme = store.create_customer(customer("acme")).await.unwrap();
    let limited = store
        .create_key(key(acme.id, Some(limits())))
        .await
        .unwrap();
    let (_, successor) = store
        .rotate_key(
            limited.id,
            key(acme.id, None),
            datetime!(2026-12-09 08:00 UTC),
        )
        .await
        .unwrap();
    let free = store.create_key(key(acme.id, None)).await.unwrap();
    let at = datetime!(2026-12-03 10:00 UTC);
    let mut rows = Vec::new();
    for (key, n) in [(limited.id, 2), (successor.id, 3), (free.id, 4)] {
        for _ in 0..n {
            rows.push(usage_event(acme.id, key, at));
        }
    }
    // Last month's row counts toward nothing.
    rows.push(usage_event(
        acme.id,
        limited.id,
        datetime!(2026-11-30 23:00 UTC),
    ));
    store.write_usage(&rows).await.unwrap();
    let totals = store
        .key_period_totals(Period::containing(at).days())
        .await
        .unwrap();
    assert_eq!(totals.len(), 1, "only families with limits: {totals:?}");
    assert_eq!(
        totals[&limited.id],
        PeriodTotals {
            requests: 5,
            tokens: 150,
            cost_nanos: 5_000
        }
    );
}

/// Key families' totals are kept between whole reads like the customers':
/// closed days from the last whole read, open days from each sync. A family
/// that gains limits after a whole read has no closed days kept, so the
/// next sync reads everything.
async fn a_family_given_limits_after_a_whole_read_is_read_whole(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let acme = store.create_customer(customer("acme")).await.unwrap();
    let limited = store
        .create_key(key(acme.id, Some(limits())))
        .await
        .unwrap();
    let later = store.create_key(key(acme.id, None)).await.unwrap();
    let closed = datetime!(2026-12-03 10:00 UTC);
    let open = datetime!(2026-12-09 10:00 UTC);
    let rows: Vec<_> = [(limited.id, closed), (later.id, closed), (later.id, closed)]
        .into_iter()
        .chain([(limited.id, open), (later.id, open)])
        .map(|(key, at)| usage_event(acme.id, key, at))
        .collect();
    store.write_usage(&rows).await.unwrap();

    let limiter = Limiter::new(Arc::new(ManualClock::new(datetime!(2026-12-09 12:00 UTC))));
    let family = |key: &tollgate_metering::keys::KeyRecord| {
        limiter.set_key_limits(key.id, key.family_id, acme.id, key.limits.as_ref(), false);
    };
    family(&limited);
    let used = |key| limiter.key_view(key).map(|view| view.requests.used);
    let sync = |wanted| limiter.sync_read(&*store, wanted);
    assert_eq!(sync(SyncRead::Whole).await.unwrap(), SyncRead::Whole);
    assert_eq!((used(limited.id), used(later.id)), (Some(2), None));
    store
        .write_usage(&[usage_event(acme.id, limited.id, open)])
        .await
        .unwrap();
    assert_eq!(sync(SyncRead::OpenDays).await.unwrap(), SyncRead::OpenDays);
    assert_eq!(used(limited.id), Some(3));

    let update = KeyUpdate {
        limits: Some(Some(limits())),
        ..KeyUpdate::default()
    };
    let later = store.update_key(later.id, update).await.unwrap();
    family(&later);
    assert_eq!(sync(SyncRead::OpenDays).await.unwrap(), SyncRead::Whole);
    assert_eq!((used(limited.id), used(later.id)), (Some(3), Some(3)));
    assert_eq!(sync(SyncRead::OpenDays).await.unwrap(), SyncRead::OpenDays);
    assert_eq!((used(limited.id), used(later.id)), (Some(3), Some(3)));

    // Limits cleared: a whole read leaves the family out. Set again, its
    // closed days are read again.
    let limited_again = |limits| KeyUpdate {
        limits: Some(limits),
        ..KeyUpdate::default()
    };
    let later = store
        .update_key(later.id, limited_again(None))
        .await
        .unwrap();
    family(&later);
    assert_eq!(sync(SyncRead::Whole).await.unwrap(), SyncRead::Whole);
    let later = store
        .update_key(later.id, limited_again(Some(limits())))
        .await
        .unwrap();
    family(&later);
    assert_eq!(sync(SyncRead::OpenDays).await.unwrap(), SyncRead::Whole);
    assert_eq!((used(limited.id), used(later.id)), (Some(3), Some(3)));
}

fn event(dedup: &str, at: OffsetDateTime) -> NewEvent {
    NewEvent {
        id: Uuid::now_v7(),
        event_type: EventType::QuotaThreshold,
        dedup: dedup.to_owned(),
        body: format!(r#"{{"type":"quota.threshold","data":{{"dedup":"{dedup}"}}}}"#),
        created_at: at,
    }
}

fn urls(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("http://hook-{i}.test/")).collect()
}

async fn an_event_is_recorded_once_with_a_delivery_per_endpoint(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let first = event("a:0.8:2026-12", T0);
    assert!(store.record_event(&first, &urls(2)).await.unwrap());
    let again = event("a:0.8:2026-12", T0);
    assert!(
        !store.record_event(&again, &urls(2)).await.unwrap(),
        "the same thing twice is one event"
    );
    assert!(store
        .record_event(&event("a:1:2026-12", T0), &urls(1))
        .await
        .unwrap());
    let all = store
        .deliveries(
            DeliveryFilter::default(),
            Page {
                after: None,
                limit: 10,
            },
        )
        .await
        .unwrap();
    assert_eq!(all.len(), 3);
    assert!(
        all.windows(2).all(|pair| pair[0].id > pair[1].id),
        "newest first"
    );
    let of_first: Vec<_> = all.iter().filter(|d| d.event_id == first.id).collect();
    assert_eq!(of_first.len(), 2);
    for delivery in &of_first {
        assert_eq!(delivery.status, DeliveryStatus::Pending);
        assert_eq!(delivery.attempts, 0);
        assert_eq!(delivery.event, "quota.threshold");
        assert_eq!(delivery.created_at, T0);
        assert_eq!(delivery.next_attempt_at, Some(T0));
    }
    assert_eq!(store.pending_deliveries().await.unwrap(), 3);
    // Pages follow the cursor.
    let page = store
        .deliveries(
            DeliveryFilter::default(),
            Page {
                after: Some(all[0].id),
                limit: 10,
            },
        )
        .await
        .unwrap();
    assert_eq!(page, all[1..]);
    let none = DeliveryFilter {
        event: Some(EventType::KeyExpiring),
        ..DeliveryFilter::default()
    };
    assert!(store
        .deliveries(
            none,
            Page {
                after: None,
                limit: 10
            }
        )
        .await
        .unwrap()
        .is_empty());
}

async fn claims_take_due_deliveries_once_and_settle_them(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let e = event("b", T0);
    store.record_event(&e, &urls(1)).await.unwrap();
    let lease = Duration::from_secs(60);
    assert!(
        store
            .claim_deliveries(T0 - time::Duration::seconds(1), lease, 10, &[])
            .await
            .unwrap()
            .is_empty(),
        "not due yet"
    );
    let claimed = store.claim_deliveries(T0, lease, 10, &[]).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].body, e.body, "the exact body");
    assert_eq!(claimed[0].delivery.attempts, 1);
    assert_eq!(claimed[0].delivery.event_id, e.id);
    assert!(
        store
            .claim_deliveries(T0, lease, 10, &[])
            .await
            .unwrap()
            .is_empty(),
        "claimed"
    );
    let id = claimed[0].delivery.id;
    // Its claim runs out: due again, for anyone (a sender that died).
    let later = T0 + time::Duration::seconds(61);
    let again = store.claim_deliveries(later, lease, 10, &[]).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].delivery.attempts, 2);
    // The first claim's attempt ends late: the second claim has it now,
    // and the late outcome changes nothing.
    store
        .settle_delivery(id, 1, &Settlement::Delivered { at: later })
        .await
        .unwrap();
    let still = store.delivery(id).await.unwrap().unwrap();
    assert_eq!(still.status, DeliveryStatus::Pending, "fenced off");
    assert_eq!(still.delivered_at, None);
    let retry_at = later + time::Duration::seconds(10);
    store
        .settle_delivery(
            id,
            2,
            &Settlement::Retry {
                error: "answered HTTP 500".into(),
                next_attempt_at: retry_at,
            },
        )
        .await
        .unwrap();
    let pending = store.delivery(id).await.unwrap().unwrap();
    assert_eq!(pending.status, DeliveryStatus::Pending);
    assert_eq!(pending.last_error.as_deref(), Some("answered HTTP 500"));
    assert_eq!(pending.next_attempt_at, Some(retry_at));
    let delivered_at = retry_at + time::Duration::seconds(1);
    let claimed = store
        .claim_deliveries(retry_at, lease, 10, &[])
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    store
        .settle_delivery(id, 3, &Settlement::Delivered { at: delivered_at })
        .await
        .unwrap();
    let done = store.delivery(id).await.unwrap().unwrap();
    assert_eq!(done.status, DeliveryStatus::Delivered);
    assert_eq!(done.delivered_at, Some(delivered_at));
    assert_eq!(done.next_attempt_at, None);
    assert_eq!(done.attempts, 3);
    assert_eq!(store.pending_deliveries().await.unwrap(), 0);
    // An operator's retry claims it whatever its status.
    let retried = store
        .claim_delivery(id, delivered_at, lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(retried.delivery.attempts, 4);
    store
        .settle_delivery(
            id,
            4,
            &Settlement::Failed {
                error: "gone".into(),
            },
        )
        .await
        .unwrap();
    let failed = store.delivery(id).await.unwrap().unwrap();
    assert_eq!(failed.status, DeliveryStatus::Failed);
    assert_eq!(
        failed.delivered_at,
        Some(delivered_at),
        "when it was delivered stays"
    );
    assert!(store
        .claim_delivery(Uuid::now_v7(), T0, lease)
        .await
        .unwrap()
        .is_none());
}

async fn the_events_recorded_since_a_time_are_listed_by_dedup(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let day = time::Duration::days(1);
    for (dedup, at) in [("old", T0 - day), ("edge", T0), ("new", T0 + day)] {
        store
            .record_event(&event(dedup, at), &urls(1))
            .await
            .unwrap();
    }
    let mut found = store.event_dedups(T0).await.unwrap();
    found.sort();
    assert_eq!(found, ["edge", "new"]);
    assert!(store.event_dedups(T0 + day * 2).await.unwrap().is_empty());
}

async fn a_claim_leaves_the_urls_it_is_told_to_skip(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let endpoints = urls(3);
    for n in 0..2 {
        store
            .record_event(&event(&format!("skip-{n}"), T0), &endpoints)
            .await
            .unwrap();
    }
    let lease = Duration::from_secs(60);
    let skip = endpoints[..2].to_vec();
    let claimed = store.claim_deliveries(T0, lease, 10, &skip).await.unwrap();
    let to: Vec<&str> = claimed.iter().map(|c| c.delivery.url.as_str()).collect();
    assert_eq!(to, [endpoints[2].as_str(); 2], "only the third endpoint's");
    let rest = store.claim_deliveries(T0, lease, 10, &[]).await.unwrap();
    assert_eq!(rest.len(), 4, "the skipped ones are still due");
    assert!(rest.iter().all(|c| skip.contains(&c.delivery.url)));
}

async fn concurrent_claimers_never_share_a_delivery(backend: Backend) {
    let (store, guard) = test_store(backend).await;
    for n in 0..100 {
        store
            .record_event(&event(&format!("c{n}"), T0), &urls(2))
            .await
            .unwrap();
    }
    // A second store on the same database, as a second instance has.
    let other: Arc<dyn Store> = tollgate_store::open(guard.url(), 4).await.unwrap();
    let claim = |store: Arc<dyn Store>| {
        tokio::spawn(async move {
            let mut ids = Vec::new();
            loop {
                let claimed = store
                    .claim_deliveries(T0, Duration::from_secs(60), 7, &[])
                    .await
                    .unwrap();
                if claimed.is_empty() {
                    return ids;
                }
                ids.extend(claimed.into_iter().map(|c| c.delivery.id));
            }
        })
    };
    let (a, b) = (claim(store.clone()), claim(other));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    let all: HashSet<Uuid> = a.iter().chain(&b).copied().collect();
    assert_eq!(a.len() + b.len(), 200, "each claimed once");
    assert_eq!(all.len(), 200);
}

async fn expiring_keys_leave_out_revoked_and_rotated_ones(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let acme = store.create_customer(customer("acme")).await.unwrap();
    let now = datetime!(2026-12-05 00:00 UTC);
    let until = datetime!(2026-12-12 00:00 UTC);
    let with_expiry = |at| {
        let mut new = key(acme.id, None);
        new.expires_at = Some(at);
        new
    };
    let soon = store
        .create_key(with_expiry(datetime!(2026-12-10 00:00 UTC)))
        .await
        .unwrap();
    store
        .create_key(with_expiry(datetime!(2026-12-20 00:00 UTC)))
        .await
        .unwrap();
    store
        .create_key(with_expiry(datetime!(2026-12-04 00:00 UTC)))
        .await
        .unwrap();
    let revoked = store
        .create_key(with_expiry(datetime!(2026-12-08 00:00 UTC)))
        .await
        .unwrap();
    store.revoke_key(revoked.id, T0).await.unwrap();
    let rotated = store.create_key(key(acme.id, None)).await.unwrap();
    store
        .rotate_key(
            rotated.id,
            key(acme.id, None),
            datetime!(2026-12-06 00:00 UTC),
        )
        .await
        .unwrap();
    let expiring = store.expiring_keys(now, until).await.unwrap();
    let ids: Vec<KeyId> = expiring.iter().map(|k| k.key_id).collect();
    assert_eq!(
        ids,
        [soon.id],
        "not later, not past, not revoked, not rotated out"
    );
    assert_eq!(expiring[0].customer, "acme");
    assert_eq!(expiring[0].prefix, soon.prefix);
    assert_eq!(expiring[0].expires_at, datetime!(2026-12-10 00:00 UTC));
}
