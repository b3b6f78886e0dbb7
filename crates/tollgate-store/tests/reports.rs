//! Usage reports, the usage export and billing periods, run with the same
//! bodies against a real SQLite file and a real Postgres database (one
//! fresh database per test; see `tollgate_store::testing`).
//!
//! The seed is written through `write_usage`, as the gateway writes it.
//! Expected values are either counted by hand (the rows at the month
//! boundary, the ties) or computed here, in Rust, from the seed rows with
//! the definitions of docs/STORAGE.md, independently of `usage_daily`.

#![allow(clippy::unwrap_used)] // tests may unwrap (STYLE.md)

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use time::macros::{date, datetime};
use time::{Month, OffsetDateTime};
use tollgate_accounts::Reports;
use tollgate_metering::billing::{
    BillingLine, BillingUsage, GroupKey, Ranking, UsageFilter, UsageGroup, UsageTotals,
};
use tollgate_metering::keys::NewCustomer;
use tollgate_metering::limits::{
    Limiter, Limits, ManualClock, Overage, Period, PeriodTotals, SyncRead,
};
use tollgate_metering::usage::{CostSource, Outcome, UsageEvent};
use tollgate_metering::{CustomerId, KeyId};
use tollgate_metering::{Store, StoreError};
use tollgate_store::testing::{test_store, usage_event, Backend, TestGuard};
use uuid::Uuid;

tollgate_store::both_backends!(
    month_boundary_rows_land_on_their_own_day,
    summary_matches_the_rows_for_every_filter,
    groups_have_exact_keys_in_order,
    top_customers_rank_with_ties_by_name_and_limit,
    filters_matching_nothing_give_zeros,
    export_pages_walk_every_row_once_in_ts_id_order,
    billing_usage_lists_every_customer_by_name,
    closing_a_period_freezes_its_lines_once,
    concurrent_closes_from_two_stores_store_one_set_of_lines,
    duplicate_billing_lines_are_refused_and_store_nothing,
    report_sums_saturate_instead_of_failing,
    rows_at_the_bigint_limit_load_report_and_bill,
    rollup_upserts_saturate_at_both_ends_and_add_exactly_between,
    the_sync_on_the_blocking_pool_takes_in_the_months_totals,
    syncs_between_whole_reads_read_the_open_days_and_keep_the_closed_ones,
    an_own_row_of_a_closed_day_committed_late_makes_the_next_sync_read_everything,
);

fn february() -> Period {
    Period::new(2026, Month::February)
}

fn march() -> Period {
    Period::new(2026, Month::March)
}

/// The last microsecond of February and the first of March, UTC.
const FEB_END: OffsetDateTime = datetime!(2026-02-28 23:59:59.999999 UTC);
const MAR_START: OffsetDateTime = datetime!(2026-03-01 00:00:00 UTC);
/// The day of the hand-made ties.
const TIE_DAY: OffsetDateTime = datetime!(2026-03-20 10:00:00 UTC);

/// Instants of the generated rows, twelve rows each: the months' edges
/// and one instant inside each month, plus one on either side of the two
/// months.
const BULK_TIMES: [OffsetDateTime; 6] = [
    datetime!(2026-01-31 23:59:59.999999 UTC),
    datetime!(2026-02-01 00:00:00 UTC),
    datetime!(2026-02-14 12:30:00.5 UTC),
    datetime!(2026-03-15 08:00:00.25 UTC),
    datetime!(2026-03-31 23:59:59.999999 UTC),
    datetime!(2026-04-01 00:00:00 UTC),
];

struct Seed {
    /// Customers as created, names chosen so that bytewise order differs
    /// from a case-insensitive one: "Beta" < "acme" < "idle" < "zeta".
    acme: CustomerId,
    beta: CustomerId,
    zeta: CustomerId,
    /// A customer without usage.
    idle: CustomerId,
    /// Usage of an id that is no customer.
    ghost: CustomerId,
    events: Vec<UsageEvent>,
}

impl Seed {
    fn name(&self, id: CustomerId) -> String {
        match id {
            id if id == self.acme => "acme".to_owned(),
            id if id == self.beta => "Beta".to_owned(),
            id if id == self.zeta => "zeta".to_owned(),
            id if id == self.idle => "idle".to_owned(),
            other => other.to_string(),
        }
    }

    fn key(&self, id: CustomerId) -> GroupKey {
        GroupKey::Customer {
            id,
            name: self.name(id),
        }
    }
}

fn event(customer: CustomerId, ts: OffsetDateTime) -> UsageEvent {
    usage_event(customer, KeyId::new(), ts)
}

fn status_of(outcome: Outcome, n: usize) -> u16 {
    match outcome {
        Outcome::Ok if n.is_multiple_of(4) => 503,
        Outcome::Ok => 200,
        Outcome::UpstreamError => 502,
        Outcome::UpstreamTimeout => 504,
        Outcome::ClientClosed => 0,
        Outcome::RateLimited | Outcome::QuotaExceeded | Outcome::BudgetExceeded => 429,
        Outcome::RouteForbidden => 403,
        Outcome::PayloadTooLarge => 413,
        Outcome::ClientTimeout => 408,
    }
}

async fn create(store: &dyn Store, name: &str, tier: &str) -> CustomerId {
    store
        .create_customer(NewCustomer {
            id: CustomerId::new(),
            name: name.to_owned(),
            tier: tier.to_owned(),
            overrides: serde_json::json!({}),
            created_at: datetime!(2024-01-01 00:00 UTC),
        })
        .await
        .unwrap()
        .id
}

/// Customers, the hand-made boundary and tie rows, and generated rows:
/// every outcome, three routes, two models and none, 5xx statuses, some
/// negative costs, many rows sharing an instant. Generated latest instant
/// first, so that id order is not time order.
async fn seed(store: &dyn Store) -> Seed {
    let acme = create(store, "acme", "pro").await;
    let beta = create(store, "Beta", "free").await;
    let zeta = create(store, "zeta", "pro").await;
    let idle = create(store, "idle", "free").await;
    let ghost = CustomerId::new();

    let mut events = Vec::new();
    let mut n = 0usize;
    for (t, at) in BULK_TIMES.iter().enumerate().rev() {
        for _ in 0..12 {
            let customer = [acme, beta, zeta, ghost][(n + t) % 4];
            let mut e = event(customer, *at);
            let k = n as u64;
            e.route = ["openai", "anthropic", "search"][n % 3].to_owned();
            e.model = match n % 5 {
                0 | 1 => Some("gpt-4o".to_owned()),
                2 => Some("claude-sonnet-4".to_owned()),
                _ => None,
            };
            e.outcome = Outcome::ALL[(n * 5 + t) % Outcome::ALL.len()];
            e.status = status_of(e.outcome, n);
            e.client_request_id = n.is_multiple_of(3).then(|| format!("client-{n}"));
            e.request_bytes = 100 + k;
            e.response_bytes = 1_000 + k * 3;
            e.input_tokens = k * 11;
            e.output_tokens = k * 13;
            e.cache_read_tokens = k % 4 * 100;
            e.cache_write_tokens = k % 6 * 10;
            e.cost_nanos = 1_000_003 * k as i64 - if n.is_multiple_of(7) { 50_000_000 } else { 0 };
            e.cost_source = [CostSource::Pricing, CostSource::Header, CostSource::None][n % 3];
            events.push(e);
            n += 1;
        }
    }

    // At the last microsecond of February: acme admitted (cost 100), acme
    // rate limited, zeta upstream error (cost 7).
    let mut e = event(acme, FEB_END);
    e.cost_nanos = 100;
    events.push(e);
    let mut e = event(acme, FEB_END);
    (
        e.outcome,
        e.status,
        e.cost_nanos,
        e.input_tokens,
        e.output_tokens,
    ) = (Outcome::RateLimited, 429, 0, 0, 0);
    events.push(e);
    let mut e = event(zeta, FEB_END);
    (e.outcome, e.status, e.cost_nanos, e.route, e.model) =
        (Outcome::UpstreamError, 502, 7, "anthropic".to_owned(), None);
    events.push(e);
    // At the first microsecond of March: acme admitted with a 503 (an
    // error), Beta client closed, ghost admitted.
    let mut e = event(acme, MAR_START);
    e.status = 503;
    events.push(e);
    let mut e = event(beta, MAR_START);
    (e.outcome, e.status) = (Outcome::ClientClosed, 0);
    events.push(e);
    events.push(event(ghost, MAR_START));
    // A day on which acme and Beta tie on everything.
    events.push(event(acme, TIE_DAY));
    events.push(event(beta, TIE_DAY));

    // Two batches, as the recorder would send them.
    let (first, second) = events.split_at(40);
    let written =
        store.write_usage(first).await.unwrap() + store.write_usage(second).await.unwrap();
    assert_eq!(written, events.len() as u64);
    Seed {
        acme,
        beta,
        zeta,
        idle,
        ghost,
        events,
    }
}

fn filter(from: time::Date, to: time::Date, customer: Option<CustomerId>) -> UsageFilter {
    UsageFilter { from, to, customer }
}

fn both_months() -> UsageFilter {
    filter(date!(2026 - 02 - 01), date!(2026 - 03 - 31), None)
}

fn in_filter(e: &UsageEvent, filter: &UsageFilter) -> bool {
    let day = e.day();
    day >= filter.from && day <= filter.to && filter.customer.is_none_or(|c| c == e.customer_id)
}

/// The sums docs/STORAGE.md defines, from the rows.
fn add(totals: &mut UsageTotals, e: &UsageEvent) {
    if e.outcome.is_rejected() {
        totals.rejected += 1;
    } else {
        totals.requests += 1;
    }
    totals.errors += u64::from(e.is_error());
    totals.input_tokens += e.input_tokens;
    totals.output_tokens += e.output_tokens;
    totals.cache_read_tokens += e.cache_read_tokens;
    totals.cache_write_tokens += e.cache_write_tokens;
    totals.request_bytes += e.request_bytes;
    totals.response_bytes += e.response_bytes;
    totals.cost_nanos += e.cost_nanos;
}

fn expected_summary(seed: &Seed, filter: &UsageFilter) -> UsageTotals {
    let mut totals = UsageTotals::default();
    for e in seed.events.iter().filter(|e| in_filter(e, filter)) {
        add(&mut totals, e);
    }
    totals
}

/// Expected groups in the order the store must return them: the sort key
/// is the order (customer names and texts bytewise, as Rust compares).
fn expected_groups(
    seed: &Seed,
    filter: &UsageFilter,
    group: UsageGroup,
) -> Vec<(GroupKey, UsageTotals)> {
    let mut groups: BTreeMap<(String, String), (GroupKey, UsageTotals)> = BTreeMap::new();
    for e in seed.events.iter().filter(|e| in_filter(e, filter)) {
        let (sort, key) = match group {
            UsageGroup::Day => (e.day().to_string(), GroupKey::Day(e.day())),
            UsageGroup::Customer => (seed.name(e.customer_id), seed.key(e.customer_id)),
            UsageGroup::Route => (e.route.clone(), GroupKey::Route(e.route.clone())),
            UsageGroup::Model => {
                let model = e.model.clone().unwrap_or_default();
                (model.clone(), GroupKey::Model(model))
            }
            // The seed's keys are not stored: each shows its id as prefix.
            UsageGroup::Key => (
                format!("{}\u{0}{}", seed.name(e.customer_id), e.key_id),
                GroupKey::Key {
                    id: e.key_id,
                    prefix: e.key_id.to_string(),
                    name: None,
                    customer_id: e.customer_id,
                    customer: seed.name(e.customer_id),
                },
            ),
        };
        let tiebreak = e.customer_id.to_string();
        let tiebreak = if group == UsageGroup::Customer {
            tiebreak
        } else {
            String::new()
        };
        add(
            &mut groups
                .entry((sort, tiebreak))
                .or_insert((key, UsageTotals::default()))
                .1,
            e,
        );
    }
    groups.into_values().collect()
}

fn metric(totals: &UsageTotals, by: Ranking) -> i128 {
    match by {
        Ranking::Cost => i128::from(totals.cost_nanos),
        Ranking::Requests => i128::from(totals.requests),
        Ranking::Tokens => i128::from(totals.tokens()),
    }
}

fn expected_top(
    seed: &Seed,
    filter: &UsageFilter,
    by: Ranking,
    limit: usize,
) -> Vec<(GroupKey, UsageTotals)> {
    // Already by name; a stable sort by the metric keeps name order on ties.
    let mut groups = expected_groups(seed, filter, UsageGroup::Customer);
    groups.sort_by_key(|(_, totals)| std::cmp::Reverse(metric(totals, by)));
    groups.truncate(limit);
    groups
}

/// Runs `sql` (one integer) on the test database directly.
async fn count(guard: &TestGuard, sql: &str) -> i64 {
    match guard {
        TestGuard::Sqlite(db) => {
            let conn = rusqlite::Connection::open(db.path()).unwrap();
            conn.busy_timeout(Duration::from_secs(5)).unwrap();
            conn.query_row(sql, [], |row| row.get(0)).unwrap()
        }
        TestGuard::Postgres(db) => {
            let (client, connection) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls)
                .await
                .unwrap();
            let driver = tokio::spawn(connection);
            let value: i64 = client.query_one(sql, &[]).await.unwrap().get(0);
            drop(client);
            let _ = driver.await;
            value
        }
    }
}

// ---- reports ---------------------------------------------------------------

async fn month_boundary_rows_land_on_their_own_day(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let seed = seed(&*store).await;

    // Counted by hand from the rows written at FEB_END and MAR_START.
    let last_of_february = filter(date!(2026 - 02 - 28), date!(2026 - 02 - 28), None);
    let totals = store.usage_summary(&last_of_february).await.unwrap();
    assert_eq!(
        (
            totals.requests,
            totals.rejected,
            totals.errors,
            totals.cost_nanos
        ),
        (2, 1, 1, 107)
    );
    assert_eq!(totals.input_tokens, 20);
    let first_of_march = filter(date!(2026 - 03 - 01), date!(2026 - 03 - 01), None);
    let totals = store.usage_summary(&first_of_march).await.unwrap();
    assert_eq!(
        (
            totals.requests,
            totals.rejected,
            totals.errors,
            totals.cost_nanos
        ),
        (3, 0, 1, 3_000)
    );
    assert_eq!((totals.request_bytes, totals.response_bytes), (900, 2_700));

    // Both days, by day: exactly these two keys.
    let two_days = filter(date!(2026 - 02 - 28), date!(2026 - 03 - 01), None);
    let days: Vec<GroupKey> = store
        .usage_grouped(&two_days, UsageGroup::Day)
        .await
        .unwrap()
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    assert_eq!(
        days,
        [
            GroupKey::Day(date!(2026 - 02 - 28)),
            GroupKey::Day(date!(2026 - 03 - 01))
        ]
    );

    // February ends at its last microsecond, March begins at midnight: the
    // months' rows (incl. the generated ones at the edges) split there.
    for (period, rows) in [(february(), 24 + 3), (march(), 24 + 3 + 2)] {
        let totals = store
            .usage_summary(&UsageFilter::period(period))
            .await
            .unwrap();
        assert_eq!(totals.requests + totals.rejected, rows, "{period}");
        assert_eq!(
            totals,
            expected_summary(&seed, &UsageFilter::period(period))
        );
    }
}

async fn summary_matches_the_rows_for_every_filter(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let seed = seed(&*store).await;
    let customers = [
        None,
        Some(seed.acme),
        Some(seed.beta),
        Some(seed.ghost),
        Some(seed.idle),
    ];
    let ranges = [
        (date!(2026 - 01 - 01), date!(2026 - 12 - 31)),
        (date!(2026 - 02 - 01), date!(2026 - 03 - 31)),
        (date!(2026 - 02 - 01), date!(2026 - 02 - 01)),
        (date!(2026 - 02 - 02), date!(2026 - 03 - 30)),
        (date!(2026 - 03 - 31), date!(2026 - 04 - 01)),
        (date!(2026 - 01 - 31), date!(2026 - 01 - 31)),
    ];
    for (from, to) in ranges {
        for customer in customers {
            let f = filter(from, to, customer);
            assert_eq!(
                store.usage_summary(&f).await.unwrap(),
                expected_summary(&seed, &f),
                "{f:?}"
            );
        }
    }
    // Sanity of the model itself: the whole year holds every row.
    let all = expected_summary(
        &seed,
        &filter(date!(2026 - 01 - 01), date!(2026 - 12 - 31), None),
    );
    assert_eq!(all.requests + all.rejected, seed.events.len() as u64);
    assert!(all.errors > 0 && all.rejected > 0 && all.cache_write_tokens > 0);
}

async fn groups_have_exact_keys_in_order(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let seed = seed(&*store).await;

    let f = both_months();
    let by_day = store.usage_grouped(&f, UsageGroup::Day).await.unwrap();
    let days: Vec<GroupKey> = by_day.iter().map(|(key, _)| key.clone()).collect();
    assert_eq!(
        days,
        [
            date!(2026 - 02 - 01),
            date!(2026 - 02 - 14),
            date!(2026 - 02 - 28),
            date!(2026 - 03 - 01),
            date!(2026 - 03 - 15),
            date!(2026 - 03 - 20),
            date!(2026 - 03 - 31),
        ]
        .map(GroupKey::Day)
    );
    assert_eq!(by_day, expected_groups(&seed, &f, UsageGroup::Day));

    let by_customer = store.usage_grouped(&f, UsageGroup::Customer).await.unwrap();
    let names: Vec<GroupKey> = by_customer.iter().map(|(key, _)| key.clone()).collect();
    // Bytewise: the ghost's id (digits) < "Beta" < "acme" < "zeta"; the
    // idle customer has no usage, so no group.
    assert_eq!(
        names,
        [seed.ghost, seed.beta, seed.acme, seed.zeta].map(|id| seed.key(id))
    );
    assert_eq!(
        by_customer,
        expected_groups(&seed, &f, UsageGroup::Customer)
    );

    let by_route = store.usage_grouped(&f, UsageGroup::Route).await.unwrap();
    let routes: Vec<GroupKey> = by_route.iter().map(|(key, _)| key.clone()).collect();
    assert_eq!(
        routes,
        ["anthropic", "openai", "search"].map(|r| GroupKey::Route(r.to_owned()))
    );
    assert_eq!(by_route, expected_groups(&seed, &f, UsageGroup::Route));

    let by_model = store.usage_grouped(&f, UsageGroup::Model).await.unwrap();
    let models: Vec<GroupKey> = by_model.iter().map(|(key, _)| key.clone()).collect();
    assert_eq!(
        models,
        ["", "claude-sonnet-4", "gpt-4o"].map(|m| GroupKey::Model(m.to_owned()))
    );
    assert_eq!(by_model, expected_groups(&seed, &f, UsageGroup::Model));

    let by_key = store.usage_grouped(&f, UsageGroup::Key).await.unwrap();
    assert!(by_key.len() > by_customer.len(), "{} keys", by_key.len());
    assert_eq!(by_key, expected_groups(&seed, &f, UsageGroup::Key));

    // Every grouping adds up to the summary.
    let summary = store.usage_summary(&f).await.unwrap();
    for grouped in [&by_day, &by_customer, &by_route, &by_model, &by_key] {
        let mut sum = UsageTotals::default();
        for (_, totals) in grouped.iter() {
            sum.requests += totals.requests;
            sum.rejected += totals.rejected;
            sum.cost_nanos += totals.cost_nanos;
            sum.input_tokens += totals.input_tokens;
        }
        assert_eq!(
            (sum.requests, sum.rejected, sum.cost_nanos, sum.input_tokens),
            (
                summary.requests,
                summary.rejected,
                summary.cost_nanos,
                summary.input_tokens
            )
        );
    }

    // With a customer, and each grouping for one month.
    for f in [
        filter(
            date!(2026 - 02 - 01),
            date!(2026 - 03 - 31),
            Some(seed.acme),
        ),
        filter(
            date!(2026 - 03 - 01),
            date!(2026 - 03 - 31),
            Some(seed.ghost),
        ),
        UsageFilter::period(february()),
    ] {
        for group in [
            UsageGroup::Day,
            UsageGroup::Customer,
            UsageGroup::Route,
            UsageGroup::Model,
        ] {
            assert_eq!(
                store.usage_grouped(&f, group).await.unwrap(),
                expected_groups(&seed, &f, group),
                "{f:?} {group:?}"
            );
        }
    }
}

async fn top_customers_rank_with_ties_by_name_and_limit(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let seed = seed(&*store).await;

    for f in [both_months(), UsageFilter::period(march())] {
        for by in [Ranking::Cost, Ranking::Requests, Ranking::Tokens] {
            for limit in [0, 1, 2, 3, 10] {
                let top = store.top_customers(&f, by, limit).await.unwrap();
                assert_eq!(
                    top,
                    expected_top(&seed, &f, by, limit as usize),
                    "{f:?} {by:?} {limit}"
                );
            }
        }
    }
    // The model's ranking is not trivial: the leaders differ by metric.
    let f = both_months();
    let leaders: HashSet<String> = [Ranking::Cost, Ranking::Requests, Ranking::Tokens]
        .into_iter()
        .map(|by| format!("{:?}", expected_top(&seed, &f, by, 1)[0].0))
        .collect();
    assert!(leaders.len() > 1, "{leaders:?}");

    // On the tie day acme and Beta are equal on every metric: by name,
    // bytewise, "Beta" first; with a limit of one, only Beta.
    let tie = filter(date!(2026 - 03 - 20), date!(2026 - 03 - 20), None);
    for by in [Ranking::Cost, Ranking::Requests, Ranking::Tokens] {
        let top = store.top_customers(&tie, by, 10).await.unwrap();
        let keys: Vec<GroupKey> = top.iter().map(|(key, _)| key.clone()).collect();
        assert_eq!(keys, [seed.key(seed.beta), seed.key(seed.acme)], "{by:?}");
        assert_eq!(top[0].1.requests, 1);
        assert_eq!(top[0].1.cost_nanos, 1_000);
        assert_eq!(top[0].1.tokens(), 30);
        let top = store.top_customers(&tie, by, 1).await.unwrap();
        assert_eq!(top.len(), 1);
        assert_eq!(top[0].0, seed.key(seed.beta));
    }

    // A customer filter ranks that customer alone.
    let one = filter(
        date!(2026 - 02 - 01),
        date!(2026 - 03 - 31),
        Some(seed.zeta),
    );
    let top = store.top_customers(&one, Ranking::Cost, 10).await.unwrap();
    assert_eq!(top, expected_top(&seed, &one, Ranking::Cost, 10));
    assert_eq!(top.len(), 1);
}

async fn filters_matching_nothing_give_zeros(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let seed = seed(&*store).await;
    for f in [
        // Days without rows.
        filter(date!(2026 - 02 - 02), date!(2026 - 02 - 13), None),
        // A customer without usage.
        filter(
            date!(2026 - 01 - 01),
            date!(2026 - 12 - 31),
            Some(seed.idle),
        ),
        // `from` after `to`.
        filter(date!(2026 - 03 - 31), date!(2026 - 02 - 01), None),
    ] {
        assert_eq!(
            store.usage_summary(&f).await.unwrap(),
            UsageTotals::default()
        );
        for group in [
            UsageGroup::Day,
            UsageGroup::Customer,
            UsageGroup::Route,
            UsageGroup::Model,
        ] {
            assert!(store.usage_grouped(&f, group).await.unwrap().is_empty());
        }
        assert!(store
            .top_customers(&f, Ranking::Cost, 10)
            .await
            .unwrap()
            .is_empty());
        assert!(store
            .usage_events_page(&f, None, 100)
            .await
            .unwrap()
            .is_empty());
    }
}

// ---- export ----------------------------------------------------------------

/// Every row of `filter`, page by page of `size`.
async fn walk(store: &dyn Store, filter: &UsageFilter, size: u32) -> Vec<UsageEvent> {
    let mut rows: Vec<UsageEvent> = Vec::new();
    let mut after = None;
    loop {
        let page = store.usage_events_page(filter, after, size).await.unwrap();
        assert!(page.len() <= size as usize);
        let full = page.len() == size as usize;
        if let Some(last) = page.last() {
            after = Some((last.ts, last.id));
        }
        rows.extend(page);
        if !full {
            return rows;
        }
    }
}

async fn export_pages_walk_every_row_once_in_ts_id_order(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let seed = seed(&*store).await;

    let expected = |f: &UsageFilter| {
        let mut rows: Vec<UsageEvent> = seed
            .events
            .iter()
            .filter(|e| in_filter(e, f))
            .cloned()
            .collect();
        rows.sort_by_key(|e| (e.ts, e.id));
        rows
    };
    let filters = [
        both_months(),
        UsageFilter::period(february()),
        UsageFilter::period(march()),
        filter(date!(2026 - 02 - 28), date!(2026 - 03 - 01), None),
        filter(
            date!(2026 - 01 - 01),
            date!(2026 - 12 - 31),
            Some(seed.acme),
        ),
        filter(
            date!(2026 - 03 - 01),
            date!(2026 - 03 - 31),
            Some(seed.ghost),
        ),
    ];
    for f in &filters {
        let want = expected(f);
        assert!(!want.is_empty());
        for size in [1, 2, 5, 12, 13, 1_000] {
            let got = walk(&*store, f, size).await;
            // Whole rows, column by column: the export is the raw table.
            assert_eq!(got, want, "{f:?}, pages of {size}");
        }
    }

    // Hand-checked edges: March starts with its midnight rows and ends
    // with the last microsecond of the 31st; February is the reverse.
    let rows = walk(&*store, &UsageFilter::period(march()), 7).await;
    assert_eq!(rows.first().map(|e| e.ts), Some(MAR_START));
    assert_eq!(
        rows.last().map(|e| e.ts),
        Some(datetime!(2026-03-31 23:59:59.999999 UTC))
    );
    let rows = walk(&*store, &UsageFilter::period(february()), 7).await;
    assert_eq!(
        rows.first().map(|e| e.ts),
        Some(datetime!(2026-02-01 00:00 UTC))
    );
    assert_eq!(rows.last().map(|e| e.ts), Some(FEB_END));
    // Rows sharing an instant come in id order.
    let at_feb_end: Vec<Uuid> = rows
        .iter()
        .filter(|e| e.ts == FEB_END)
        .map(|e| e.id)
        .collect();
    assert_eq!(at_feb_end.len(), 3);
    assert!(at_feb_end.is_sorted());

    // A cursor before the filter's start starts at the start; one past the
    // last row gives nothing.
    let march_filter = UsageFilter::period(march());
    let before = Some((FEB_END, Uuid::max()));
    assert_eq!(
        store
            .usage_events_page(&march_filter, before, 1_000)
            .await
            .unwrap(),
        expected(&march_filter)
    );
    let past = Some((datetime!(2026-03-31 23:59:59.999999 UTC), Uuid::max()));
    assert!(store
        .usage_events_page(&march_filter, past, 1_000)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .usage_events_page(&march_filter, None, 0)
        .await
        .unwrap()
        .is_empty());
}

// ---- billing ---------------------------------------------------------------

async fn billing_usage_lists_every_customer_by_name(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let seed = seed(&*store).await;
    for period in [february(), march()] {
        let f = UsageFilter::period(period);
        let usage = store.billing_usage(period).await.unwrap();
        let want: Vec<BillingUsage> = [
            (seed.beta, "free"),
            (seed.acme, "pro"),
            (seed.idle, "free"),
            (seed.zeta, "pro"),
        ]
        .into_iter()
        .map(|(id, tier)| {
            let totals = expected_summary(
                &seed,
                &UsageFilter {
                    customer: Some(id),
                    ..f.clone()
                },
            );
            BillingUsage {
                customer_id: id,
                customer: seed.name(id),
                tier: tier.to_owned(),
                overrides: serde_json::json!({}),
                requests: totals.requests,
                cost_nanos: totals.cost_nanos,
            }
        })
        .collect();
        // The ghost has usage but is no customer: not billed.
        assert_eq!(usage, want, "{period}");
        assert_eq!(usage[2].requests, 0);
        assert_eq!(usage[2].cost_nanos, 0);
        assert!(usage[1].requests > 0);
    }
    // A tier change shows at once: billing takes the current tier.
    store
        .update_customer(
            seed.idle,
            tollgate_metering::keys::CustomerUpdate {
                tier: Some("pro".to_owned()),
                overrides: None,
            },
        )
        .await
        .unwrap();
    let usage = store.billing_usage(march()).await.unwrap();
    assert_eq!(usage[2].tier, "pro");
    // And so do overrides, which billing applies over the tier.
    let overrides = serde_json::json!({"monthly_requests": 250, "overage": "bill"});
    store
        .update_customer(
            seed.idle,
            tollgate_metering::keys::CustomerUpdate {
                tier: None,
                overrides: Some(overrides.clone()),
            },
        )
        .await
        .unwrap();
    let usage = store.billing_usage(march()).await.unwrap();
    assert_eq!(usage[2].overrides, overrides);
    // A month without usage still lists everyone.
    let empty = store
        .billing_usage(Period::new(2025, Month::December))
        .await
        .unwrap();
    assert_eq!(empty.len(), 4);
    assert!(empty.iter().all(|u| u.requests == 0 && u.cost_nanos == 0));
    // A customer is billed only for periods it existed in: created at the
    // very end of March, it is not in March's lines, but in April's.
    store
        .create_customer(NewCustomer {
            id: CustomerId::new(),
            name: "late".to_owned(),
            tier: "free".to_owned(),
            overrides: serde_json::json!({}),
            created_at: datetime!(2026-04-01 00:00 UTC),
        })
        .await
        .unwrap();
    let names = |usage: Vec<BillingUsage>| -> Vec<String> {
        usage.into_iter().map(|u| u.customer).collect()
    };
    assert!(!names(store.billing_usage(march()).await.unwrap()).contains(&"late".to_owned()));
    let april = store
        .billing_usage(Period::new(2026, Month::April))
        .await
        .unwrap();
    assert!(names(april).contains(&"late".to_owned()));
    // But usage in a period bills its customer whatever the customer's
    // `created_at` says: a clock ahead on the host that made it would
    // otherwise leave the usage out of every bill.
    let skewed = store
        .create_customer(NewCustomer {
            id: CustomerId::new(),
            name: "skewed".to_owned(),
            tier: "free".to_owned(),
            overrides: serde_json::json!({}),
            created_at: datetime!(2026-04-01 00:05 UTC),
        })
        .await
        .unwrap()
        .id;
    let mut row = event(skewed, datetime!(2026-03-31 23:59:59 UTC));
    row.outcome = Outcome::Ok;
    store.write_usage(&[row]).await.unwrap();
    let march_lines = store.billing_usage(march()).await.unwrap();
    let line = march_lines.iter().find(|u| u.customer == "skewed");
    assert_eq!(line.map(|u| u.requests), Some(1), "billed in March");
    assert!(
        !names(march_lines).contains(&"late".to_owned()),
        "no usage, not yet"
    );
}

/// Lines as the admin might compute them: 5 requests included, 2,000
/// nano-USD per request over.
fn lines_for(usage: &[BillingUsage], bonus: i64) -> Vec<BillingLine> {
    usage
        .iter()
        .map(|u| {
            let included = (u.tier == "free").then_some(5);
            let overage = included.map_or(0, |i| u.requests.saturating_sub(i));
            let charge = overage as i64 * 2_000;
            BillingLine {
                customer_id: u.customer_id,
                customer: u.customer.clone(),
                tier: u.tier.clone(),
                requests: u.requests,
                included_requests: included,
                overage_requests: overage,
                overage_charge_nanos: charge,
                metered_cost_nanos: u.cost_nanos,
                total_nanos: charge + u.cost_nanos + bonus,
            }
        })
        .collect()
}

async fn closing_a_period_freezes_its_lines_once(backend: Backend) {
    let (store, guard) = test_store(backend).await;
    let _seed = seed(&*store).await;
    assert_eq!(store.closed_period(february()).await.unwrap(), None);

    let usage = store.billing_usage(february()).await.unwrap();
    // Given in reverse name order; stored and returned by name.
    let mut lines = lines_for(&usage, 0);
    lines.reverse();
    let at = datetime!(2026-03-01 09:30:00.123456789 UTC);
    let closed = store.close_period(february(), &lines, at).await.unwrap();
    assert_eq!(closed.period, february());
    assert_eq!(closed.closed_at, datetime!(2026-03-01 09:30:00.123456 UTC));
    lines.reverse();
    assert_eq!(closed.lines, lines);
    assert!(closed.lines.iter().any(|l| l.included_requests.is_none()));
    assert!(closed.lines.iter().any(|l| l.included_requests == Some(5)));
    assert_eq!(
        store.closed_period(february()).await.unwrap().as_ref(),
        Some(&closed)
    );

    // Again, later, with other lines: nothing new, the first answer.
    let other = lines_for(&usage, 1);
    let again = store
        .close_period(february(), &other, at + Duration::from_secs(3_600))
        .await
        .unwrap();
    assert_eq!(again, closed);
    assert_eq!(
        count(&guard, "SELECT count(*) FROM billing_periods").await,
        1
    );
    assert_eq!(
        count(&guard, "SELECT count(*) FROM billing_lines").await,
        lines.len() as i64
    );
    // Other periods are independent; a period may close with no lines.
    assert_eq!(store.closed_period(march()).await.unwrap(), None);
    let empty = store.close_period(march(), &[], at).await.unwrap();
    assert!(empty.lines.is_empty());
    assert_eq!(
        store.closed_period(march()).await.unwrap(),
        Some(empty.clone())
    );
    assert_eq!(
        store.close_period(march(), &other, at).await.unwrap(),
        empty
    );
    assert_eq!(
        count(&guard, "SELECT count(*) FROM billing_periods").await,
        2
    );
    assert_eq!(
        count(&guard, "SELECT count(*) FROM billing_lines").await,
        lines.len() as i64
    );

    // Values beyond i64 saturate as stored rather than failing.
    let mut huge = lines[0].clone();
    huge.requests = u64::MAX;
    huge.included_requests = Some(u64::MAX);
    let april = Period::new(2026, Month::April);
    let stored = store.close_period(april, &[huge], at).await.unwrap();
    assert_eq!(stored.lines[0].requests, i64::MAX as u64);
    assert_eq!(stored.lines[0].included_requests, Some(i64::MAX as u64));
}

async fn concurrent_closes_from_two_stores_store_one_set_of_lines(backend: Backend) {
    let (store, guard) = test_store(backend).await;
    let _seed = seed(&*store).await;
    let usage = store.billing_usage(february()).await.unwrap();
    // Two separate stores (pools, connections) on the same database, as
    // two processes would have.
    let a: Arc<dyn Store> = tollgate_store::open(guard.url(), 2).await.unwrap();
    let b: Arc<dyn Store> = tollgate_store::open(guard.url(), 2).await.unwrap();
    let lines_a = lines_for(&usage, 1);
    let lines_b = lines_for(&usage, 2);
    let at_a = datetime!(2026-03-01 10:00 UTC);
    let at_b = datetime!(2026-03-01 11:00 UTC);
    let periods: Vec<Period> = (1..=12)
        .map(|m| Period::new(2024, Month::try_from(m).unwrap()))
        .collect();
    for &period in &periods {
        let (ra, rb) = {
            let (a, b) = (a.clone(), b.clone());
            let (lines_a, lines_b) = (lines_a.clone(), lines_b.clone());
            let barrier = Arc::new(tokio::sync::Barrier::new(2));
            let (barrier_a, barrier_b) = (barrier.clone(), barrier);
            let ta = tokio::spawn(async move {
                barrier_a.wait().await;
                a.close_period(period, &lines_a, at_a).await
            });
            let tb = tokio::spawn(async move {
                barrier_b.wait().await;
                b.close_period(period, &lines_b, at_b).await
            });
            (ta.await.unwrap().unwrap(), tb.await.unwrap().unwrap())
        };
        assert_eq!(ra, rb, "{period}: both callers get the same answer");
        let winner = if ra.closed_at == at_a {
            &lines_a
        } else {
            &lines_b
        };
        assert!(ra.closed_at == at_a || ra.closed_at == at_b);
        assert_eq!(&ra.lines, winner, "{period}: one caller's lines, whole");
        assert_eq!(store.closed_period(period).await.unwrap(), Some(ra));
    }
    assert_eq!(
        count(&guard, "SELECT count(*) FROM billing_periods").await,
        periods.len() as i64
    );
    assert_eq!(
        count(&guard, "SELECT count(*) FROM billing_lines").await,
        (periods.len() * usage.len()) as i64
    );
}

async fn duplicate_billing_lines_are_refused_and_store_nothing(backend: Backend) {
    let (store, guard) = test_store(backend).await;
    let _seed = seed(&*store).await;
    let usage = store.billing_usage(february()).await.unwrap();
    let mut lines = lines_for(&usage, 0);
    lines.push(lines[1].clone());
    let at = datetime!(2026-03-01 10:00 UTC);
    match store.close_period(february(), &lines, at).await {
        Err(StoreError::Conflict(message)) => {
            assert!(
                message.contains(&lines[1].customer_id.to_string()),
                "{message}"
            );
            assert!(message.contains("2026-02"), "{message}");
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert_eq!(store.closed_period(february()).await.unwrap(), None);
    assert_eq!(
        count(&guard, "SELECT count(*) FROM billing_periods").await,
        0
    );
    assert_eq!(count(&guard, "SELECT count(*) FROM billing_lines").await, 0);
}

// ---- saturation --------------------------------------------------------------

async fn report_sums_saturate_instead_of_failing(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let customer = create(&*store, "huge", "pro").await;
    let other = create(&*store, "small", "pro").await;
    // Each row saturates its usage_daily group; on three days, the sums of
    // the groups leave the 64-bit range (SQLite's sum() would fail).
    let mut events = Vec::new();
    for day in 1..=3 {
        let at = datetime!(2026-03-01 12:00 UTC) + Duration::from_secs(86_400 * (day - 1));
        let mut e = event(customer, at);
        e.input_tokens = u64::MAX;
        e.request_bytes = u64::MAX;
        e.cost_nanos = i64::MAX;
        events.push(e);
        let mut e = event(other, at);
        e.cost_nanos = i64::MIN;
        events.push(e);
    }
    store.write_usage(&events).await.unwrap();
    let f = UsageFilter::period(march());
    let totals = store.usage_summary(&f).await.unwrap();
    assert_eq!(totals.requests, 6);
    assert_eq!(totals.input_tokens, i64::MAX as u64);
    assert_eq!(totals.request_bytes, i64::MAX as u64);
    // 3 × MAX + 3 × MIN = -3.
    assert_eq!(totals.cost_nanos, -3);
    let by_customer = store.usage_grouped(&f, UsageGroup::Customer).await.unwrap();
    assert_eq!(by_customer.len(), 2);
    assert_eq!(by_customer[0].1.cost_nanos, i64::MAX);
    assert_eq!(by_customer[1].1.cost_nanos, i64::MIN);
    let top = store.top_customers(&f, Ranking::Tokens, 1).await.unwrap();
    assert_eq!(
        top[0].0,
        GroupKey::Customer {
            id: customer,
            name: "huge".to_owned()
        }
    );
    assert_eq!(top[0].1.tokens(), i64::MAX as u64 + 60);
    let top = store.top_customers(&f, Ranking::Cost, 2).await.unwrap();
    assert_eq!(top[0].1.cost_nanos, i64::MAX);
    assert_eq!(top[1].1.cost_nanos, i64::MIN);
    let billing = store.billing_usage(march()).await.unwrap();
    assert_eq!(billing[0].cost_nanos, i64::MAX);
    assert_eq!(billing[1].cost_nanos, i64::MIN);
    // The raw rows export as written (saturated per row).
    let rows = store.usage_events_page(&f, None, 10).await.unwrap();
    assert_eq!(rows.len(), 6);
    assert!(rows
        .iter()
        .filter(|e| e.customer_id == customer)
        .all(|e| e.input_tokens == i64::MAX as u64));
}

/// Inserts a rollup row of `day` straight into both rollup tables, as a
/// database written by other means may hold it: in `usage_daily` for
/// `key`, route `openai`, model `gpt-4o`, and in `usage_customer_daily`.
/// `sums` is the ten summed columns' values, in the tables' order.
async fn insert_rollups(
    guard: &TestGuard,
    day: &str,
    customer: CustomerId,
    key: KeyId,
    sums: &str,
) {
    guard
        .raw(&format!(
            "INSERT INTO usage_daily (day, customer_id, key_id, route, model, requests, \
             rejected, errors, input_tokens, output_tokens, cache_read_tokens, \
             cache_write_tokens, request_bytes, response_bytes, cost_nanos) \
             VALUES ('{day}', '{customer}', '{key}', 'openai', 'gpt-4o', {sums})"
        ))
        .await;
    guard
        .raw(&format!(
            "INSERT INTO usage_customer_daily (day, customer_id, requests, rejected, errors, \
             input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, \
             request_bytes, response_bytes, cost_nanos) \
             VALUES ('{day}', '{customer}', {sums})"
        ))
        .await;
}

/// A row added to rollup rows that hold the ends of the bigint range:
/// each sum saturates where it would leave the range, in either direction,
/// and is exact everywhere else, in both rollup tables, on both ways of
/// writing (new rows, and the deduplicating way a replay takes). The
/// expected sums are `i64::saturating_add`'s, for all ten columns.
async fn rollup_upserts_saturate_at_both_ends_and_add_exactly_between(backend: Backend) {
    let (store, guard) = test_store(backend).await;
    // Stored (requests, input_tokens, cost_nanos), and the added row's
    // cost, one day each from the 10th; the other sums are stored as 0.
    let cases: [([i64; 3], i64); 5] = [
        ([i64::MAX, i64::MAX - 3, i64::MIN], -5),
        ([4, 7, i64::MIN], 5),
        ([i64::MAX - 1, 0, i64::MAX], 5),
        ([0, 0, i64::MAX], -5),
        ([2, 3, i64::MIN + 2], -2),
    ];
    for deduplicating in [false, true] {
        let customer = create(&*store, &format!("edges-{deduplicating}"), "pro").await;
        let key = KeyId::new();
        let mut added = Vec::new();
        for (n, ([requests, input, cost], added_cost)) in (0u64..).zip(cases) {
            let at = datetime!(2026-03-10 12:00 UTC) + Duration::from_secs(86_400 * n);
            let day = at.date();
            let sums = format!("{requests}, 0, 0, {input}, 0, 0, 0, 0, 0, {cost}");
            insert_rollups(&guard, &day.to_string(), customer, key, &sums).await;
            let mut row = usage_event(customer, key, at);
            (row.input_tokens, row.cost_nanos) = (10, added_cost);
            (row.cache_read_tokens, row.cache_write_tokens) = (3, 4);
            added.push(row);
        }
        let written = if deduplicating {
            store.write_usage_deduplicated(&added).await.unwrap()
        } else {
            store.write_usage(&added).await.unwrap()
        };
        assert_eq!(written, 5);

        let expected: Vec<Vec<Option<String>>> = cases
            .iter()
            .zip(&added)
            .map(|(&([requests, input, cost], _), row)| {
                [
                    requests.saturating_add(1),
                    0,
                    0,
                    input.saturating_add(10),
                    i64::try_from(row.output_tokens).unwrap(),
                    3,
                    4,
                    i64::try_from(row.request_bytes).unwrap(),
                    i64::try_from(row.response_bytes).unwrap(),
                    cost.saturating_add(row.cost_nanos),
                ]
                .iter()
                .map(|sum| Some(sum.to_string()))
                .collect()
            })
            .collect();
        for table in ["usage_daily", "usage_customer_daily"] {
            let stored = guard
                .raw(&format!(
                    "SELECT requests, rejected, errors, input_tokens, output_tokens, \
                     cache_read_tokens, cache_write_tokens, request_bytes, response_bytes, \
                     cost_nanos FROM {table} WHERE customer_id = '{customer}' ORDER BY day"
                ))
                .await;
            assert_eq!(stored, expected, "{table}, deduplicating: {deduplicating}");
        }
    }
}

/// Sets every summed column of a rollup row to `i64::MAX`: what a database
/// holds after upstreams reported absurd numbers before they were bounded.
const AT_THE_LIMIT: &str = "9223372036854775807, 9223372036854775807, 9223372036854775807, \
    9223372036854775807, 9223372036854775807, 9223372036854775807, 9223372036854775807, \
    9223372036854775807, 9223372036854775807, 9223372036854775807";

async fn rows_at_the_bigint_limit_load_report_and_bill(backend: Backend) {
    let (store, guard) = test_store(backend).await;
    let huge = create(&*store, "huge", "pro").await;
    let small = create(&*store, "small", "pro").await;
    // Through the writer: rows with i64::MAX in every count and the cost,
    // several of them, so that each customer day saturates.
    let max = i64::MAX as u64;
    let mut events = Vec::new();
    for n in 0..3u64 {
        let at = datetime!(2026-03-02 12:00 UTC) + Duration::from_secs(86_400 * (n % 2));
        let mut e = event(huge, at);
        (e.input_tokens, e.output_tokens) = (max, max);
        (e.cache_read_tokens, e.cache_write_tokens) = (max, max);
        e.cost_nanos = i64::MAX;
        events.push(e);
    }
    events.push(event(small, datetime!(2026-03-05 12:00 UTC)));
    store.write_usage(&events).await.unwrap();
    // Inserted directly: rollup rows at the limit in every column, the
    // request counts included, on days of their own.
    let key = KeyId::new();
    for day in ["2026-03-10", "2026-03-11", "2026-03-12"] {
        insert_rollups(&guard, day, huge, key, AT_THE_LIMIT).await;
    }
    // A new row added to those at the limit: both upserts saturate.
    let mut more = usage_event(huge, key, datetime!(2026-03-10 18:00 UTC));
    more.cost_nanos = i64::MAX;
    assert_eq!(store.write_usage(&[more]).await.unwrap(), 1);
    let stored = guard
        .raw(
            "SELECT requests, input_tokens, cost_nanos FROM usage_daily WHERE day = '2026-03-10' \
             UNION ALL \
             SELECT requests, input_tokens, cost_nanos FROM usage_customer_daily \
             WHERE day = '2026-03-10'",
        )
        .await;
    let max_text = Some(i64::MAX.to_string());
    assert_eq!(stored, vec![vec![max_text.clone(); 3]; 2]);

    // The limiter's start-up load: saturated, not failed.
    let totals = store.period_totals(march().days()).await.unwrap();
    assert_eq!(
        totals[&huge],
        PeriodTotals {
            requests: max,
            tokens: u64::MAX,
            cost_nanos: i64::MAX,
        }
    );
    assert_eq!(
        totals[&small],
        PeriodTotals {
            requests: 1,
            tokens: 30,
            cost_nanos: 1_000,
        }
    );
    let clock = Arc::new(ManualClock::new(datetime!(2026-03-20 12:00 UTC)));
    let limiter = Limiter::new(clock.clone());
    let quota = Limits {
        monthly_requests: Some(1_000),
        monthly_tokens: Some(1_000_000),
        monthly_cost_nanos: Some(5_000_000_000),
        ..Limits::default()
    };
    limiter.set_limits(huge, quota.clone());
    limiter.sync(&*store).await.unwrap();
    let view = limiter.view(huge);
    assert_eq!(
        (view.requests.used, view.requests.remaining),
        (max, Some(0))
    );
    assert_eq!(
        (view.tokens.used, view.tokens.remaining),
        (u64::MAX, Some(0))
    );
    assert_eq!(
        (view.cost_nanos.used, view.cost_nanos.remaining),
        (i64::MAX, Some(0))
    );
    assert!(
        limiter
            .admit(huge, KeyId(uuid::Uuid::nil()))
            .result
            .is_err(),
        "over every quota"
    );

    // Reports: every sum saturates at the column's range.
    let f = UsageFilter::period(march());
    let summary = store.usage_summary(&f).await.unwrap();
    assert_eq!(summary.requests, max);
    assert_eq!(summary.input_tokens, max);
    assert_eq!(summary.tokens(), u64::MAX);
    assert_eq!(summary.cost_nanos, i64::MAX);
    for group in [
        UsageGroup::Day,
        UsageGroup::Customer,
        UsageGroup::Route,
        UsageGroup::Model,
    ] {
        let rows = store.usage_grouped(&f, group).await.unwrap();
        assert!(!rows.is_empty(), "{group:?}");
        let top = rows.iter().map(|(_, t)| t.cost_nanos).max();
        assert_eq!(top, Some(i64::MAX), "{group:?}");
    }
    let days = store.usage_grouped(&f, UsageGroup::Day).await.unwrap();
    assert_eq!(days.len(), 6, "three written days and three inserted");
    for by in [Ranking::Cost, Ranking::Requests, Ranking::Tokens] {
        let top = store.top_customers(&f, by, 2).await.unwrap();
        assert_eq!(top.len(), 2, "{by:?}");
        assert_eq!(
            top[0].0,
            GroupKey::Customer {
                id: huge,
                name: "huge".to_owned()
            },
            "{by:?}"
        );
        assert_eq!(top[0].1.requests, max, "{by:?}");
    }

    // Billing: the overage charge and the total saturate too, and the
    // money strings say exactly what the saturated integers are.
    let billing = store.billing_usage(march()).await.unwrap();
    assert_eq!(
        (billing[0].requests, billing[0].cost_nanos),
        (max, i64::MAX)
    );
    let bill = Limits {
        monthly_requests: Some(100),
        overage: Overage::Bill,
        overage_price_nanos: 1_000_000,
        ..Limits::default()
    };
    let april = Arc::new(ManualClock::new(datetime!(2026-04-02 12:00 UTC)));
    let reports = Reports::new(store.clone(), [("pro".to_owned(), bill)].into(), april);
    let summary =
        serde_json::to_value(reports.billing_summary(Some("2026-03")).await.unwrap()).unwrap();
    let line = &summary["data"][0];
    assert_eq!(line["customer"], "huge");
    assert_eq!(line["requests"], max);
    assert_eq!(line["overage_requests"], max - 100);
    assert_eq!(line["overage_charge_usd"], "9223372036.854775807");
    assert_eq!(line["metered_cost_usd"], "9223372036.854775807");
    assert_eq!(line["total_usd"], "9223372036.854775807");
    assert_eq!(line["total_usd_cents"], "9223372036.85");
    assert_eq!(summary["total_usd"], "9223372036.854775807");
    let closed = serde_json::to_value(reports.close("2026-03").await.unwrap()).unwrap();
    assert_eq!(closed["data"], summary["data"], "closed as computed");
    assert_eq!(closed["total_usd"], "9223372036.854775807");
}

/// The periodic sync runs on the blocking pool (`sync_on_blocking_pool`):
/// the same totals as `sync`, this month's only, and again after more rows.
async fn the_sync_on_the_blocking_pool_takes_in_the_months_totals(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let acme = create(&*store, "acme", "pro").await;
    let beta = create(&*store, "beta", "pro").await;
    let key = KeyId::new();
    let mut rows = vec![
        usage_event(acme, key, datetime!(2026-03-02 12:00 UTC)),
        usage_event(acme, key, datetime!(2026-03-19 23:59:59 UTC)),
        usage_event(beta, key, datetime!(2026-03-05 08:00 UTC)),
        // February's: not this month's.
        usage_event(beta, key, datetime!(2026-02-28 23:59:59 UTC)),
    ];
    rows[1].input_tokens = 1_000;
    rows[2].cost_nanos = 7_000;
    assert_eq!(store.write_usage(&rows).await.unwrap(), 4);

    let clock = Arc::new(ManualClock::new(datetime!(2026-03-20 12:00 UTC)));
    let limiter = Arc::new(Limiter::new(clock));
    let used = |customer| {
        let view = limiter.view(customer);
        (view.requests.used, view.tokens.used, view.cost_nanos.used)
    };
    let reports: Arc<dyn tollgate_metering::billing::UsageReports> = store.clone();
    let read = limiter
        .clone()
        .sync_on_blocking_pool(reports.clone(), SyncRead::OpenDays)
        .await
        .unwrap();
    assert_eq!(read, SyncRead::Whole, "nothing kept yet");
    assert_eq!(used(acme), (2, 30 + 1_020, 2_000));
    assert_eq!(used(beta), (1, 30, 7_000));

    let later = usage_event(beta, key, datetime!(2026-03-20 11:00 UTC));
    assert_eq!(store.write_usage(&[later]).await.unwrap(), 1);
    let read = limiter
        .clone()
        .sync_on_blocking_pool(reports, SyncRead::OpenDays)
        .await
        .unwrap();
    assert_eq!(read, SyncRead::OpenDays);
    assert_eq!(used(acme), (2, 1_050, 2_000));
    assert_eq!(used(beta), (2, 60, 8_000));
}

/// A sync of the open days (today and yesterday) adds the closed days'
/// totals kept from the last whole read: it sees every new row of an open
/// day, and another instance's late rows on a closed day only at the next
/// whole read. This instance's own closed-day rows, the open days moving on
/// at midnight and a new month each make the next sync read everything.
async fn syncs_between_whole_reads_read_the_open_days_and_keep_the_closed_ones(backend: Backend) {
    let (store, _guard) = test_store(backend).await;
    let acme = create(&*store, "acme", "pro").await;
    let beta = create(&*store, "beta", "pro").await;
    let key = KeyId::new();
    let write = |rows: Vec<UsageEvent>| {
        let store = store.clone();
        async move { assert_eq!(store.write_usage(&rows).await.unwrap(), rows.len() as u64) }
    };
    write(vec![
        usage_event(acme, key, datetime!(2026-03-02 12:00 UTC)),
        usage_event(acme, key, datetime!(2026-03-19 23:59:59 UTC)),
        usage_event(beta, key, datetime!(2026-03-05 08:00 UTC)),
        usage_event(beta, key, datetime!(2026-02-28 23:59:59 UTC)),
    ])
    .await;

    let clock = Arc::new(ManualClock::new(datetime!(2026-03-20 12:00 UTC)));
    let limiter = Limiter::new(clock.clone());
    let requests = |customer| limiter.view(customer).requests.used;
    let sync = |wanted| {
        let limiter = &limiter;
        let store = store.clone();
        async move { limiter.sync_read(&*store, wanted).await.unwrap() }
    };
    // Nothing kept yet: the whole month.
    assert_eq!(sync(SyncRead::OpenDays).await, SyncRead::Whole);
    assert_eq!((requests(acme), requests(beta)), (2, 1));

    // Another instance's rows: a late one on a closed day, one today.
    write(vec![
        usage_event(acme, key, datetime!(2026-03-10 09:00 UTC)),
        usage_event(beta, key, datetime!(2026-03-20 11:00 UTC)),
    ])
    .await;
    assert_eq!(sync(SyncRead::OpenDays).await, SyncRead::OpenDays);
    assert_eq!((requests(acme), requests(beta)), (2, 2));
    // Yesterday is open too.
    write(vec![usage_event(
        acme,
        key,
        datetime!(2026-03-19 00:00 UTC),
    )])
    .await;
    assert_eq!(sync(SyncRead::OpenDays).await, SyncRead::OpenDays);
    assert_eq!((requests(acme), requests(beta)), (3, 2));
    assert_eq!(sync(SyncRead::Whole).await, SyncRead::Whole);
    assert_eq!((requests(acme), requests(beta)), (4, 2));
    assert_eq!(sync(SyncRead::OpenDays).await, SyncRead::OpenDays);
    assert_eq!((requests(acme), requests(beta)), (4, 2));

    // This instance commits a row of a closed day (one it spooled while
    // the database was down, written late): the next sync reads
    // everything, another instance's late row too.
    write(vec![usage_event(
        acme,
        key,
        datetime!(2026-03-11 09:00 UTC),
    )])
    .await;
    let ours = usage_event(beta, key, datetime!(2026-03-12 09:00 UTC));
    assert!(limiter.admit(beta, key).result.is_ok());
    write(vec![ours.clone()]).await;
    limiter.committed(&[ours]);
    assert_eq!(sync(SyncRead::OpenDays).await, SyncRead::Whole);
    assert_eq!((requests(acme), requests(beta)), (5, 3));
    assert_eq!(sync(SyncRead::OpenDays).await, SyncRead::OpenDays);
    assert_eq!((requests(acme), requests(beta)), (5, 3));

    // Past midnight, the 19th closes: everything is read once more.
    clock.advance(Duration::from_secs(12 * 3600 + 5));
    write(vec![usage_event(
        acme,
        key,
        datetime!(2026-03-21 00:00:01 UTC),
    )])
    .await;
    assert_eq!(sync(SyncRead::OpenDays).await, SyncRead::Whole);
    assert_eq!((requests(acme), requests(beta)), (6, 3));
    assert_eq!(sync(SyncRead::OpenDays).await, SyncRead::OpenDays);
    assert_eq!((requests(acme), requests(beta)), (6, 3));

    // A new month: March's totals are not April's.
    clock.advance(Duration::from_secs(11 * 86_400));
    write(vec![usage_event(
        beta,
        key,
        datetime!(2026-04-01 00:00:01 UTC),
    )])
    .await;
    assert_eq!(sync(SyncRead::OpenDays).await, SyncRead::Whole);
    assert_eq!((requests(acme), requests(beta)), (0, 1));
    assert_eq!(sync(SyncRead::OpenDays).await, SyncRead::OpenDays);
    assert_eq!((requests(acme), requests(beta)), (0, 1));
}

/// This instance's own row of a closed day, committed late (its spool
/// replaying after an outage of days), is in its own counts and in the
/// snapshot of what it committed, but not in the closed days' totals kept
/// from before: the next sync reads everything, so that the count is
/// exact, not one short.
async fn an_own_row_of_a_closed_day_committed_late_makes_the_next_sync_read_everything(
    backend: Backend,
) {
    let (store, _guard) = test_store(backend).await;
    let acme = create(&*store, "acme", "pro").await;
    let key = KeyId::new();
    // Another instance's rows.
    let theirs = vec![usage_event(acme, key, datetime!(2026-03-05 09:00 UTC)); 5];
    let theirs: Vec<_> = theirs
        .into_iter()
        .map(|row| UsageEvent {
            id: Uuid::now_v7(),
            ..row
        })
        .collect();
    assert_eq!(store.write_usage(&theirs).await.unwrap(), 5);

    let clock = Arc::new(ManualClock::new(datetime!(2026-03-10 10:00 UTC)));
    let limiter = Limiter::new(clock.clone());
    let admitted = limiter.admit(acme, key).result.unwrap();
    let ours = usage_event(acme, key, datetime!(2026-03-10 10:00 UTC));
    limiter.settle(&admitted, 30, 1_000);
    // Three days later the row is still in the spool.
    clock.advance(Duration::from_secs(3 * 86_400 + 2 * 3600));
    let requests = || limiter.view(acme).requests.used;
    let sync = |wanted| limiter.sync_read(&*store, wanted);
    assert_eq!(sync(SyncRead::OpenDays).await.unwrap(), SyncRead::Whole);
    assert_eq!(requests(), 6);
    assert_eq!(sync(SyncRead::OpenDays).await.unwrap(), SyncRead::OpenDays);
    assert_eq!(requests(), 6);

    assert_eq!(
        store
            .write_usage(std::slice::from_ref(&ours))
            .await
            .unwrap(),
        1
    );
    limiter.committed(&[ours]);
    assert_eq!(sync(SyncRead::OpenDays).await.unwrap(), SyncRead::Whole);
    assert_eq!(requests(), 6);
    assert_eq!(sync(SyncRead::OpenDays).await.unwrap(), SyncRead::OpenDays);
    assert_eq!(requests(), 6);
    assert_eq!(limiter.view(acme).tokens.used, 5 * 30 + 30);
}

/// A sync on the blocking pool whose future is dropped (a stopping gateway
/// aborts its sync) ends at once, though the database has not answered: a
/// lock held by another session keeps its query waiting. Otherwise the
/// blocking thread would wait with it, and the runtime's shutdown too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_sync_on_the_blocking_pool_stops_waiting_for_the_database() {
    let (store, guard) = test_store(Backend::Postgres).await;
    let (locker, connection) = tokio_postgres::connect(guard.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    locker
        .batch_execute("BEGIN; LOCK TABLE usage_customer_daily IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    let clock = Arc::new(ManualClock::new(datetime!(2026-03-20 12:00 UTC)));
    let limiter = Arc::new(Limiter::new(clock));
    let reports: Arc<dyn tollgate_metering::billing::UsageReports> = store.clone();
    let sync = tokio::spawn(
        limiter
            .clone()
            .sync_on_blocking_pool(reports, SyncRead::Whole),
    );
    // Until the sync's query (the customers' month totals; its text is
    // cut short before the table's name) waits for the lock.
    let waiting = "SELECT count(*) FROM pg_stat_activity \
                   WHERE datname = current_database() AND wait_event_type = 'Lock' \
                   AND query LIKE 'SELECT customer_id,%'";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while count(&guard, waiting).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sync's query never waited for the lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!sync.is_finished(), "the sync waits for the lock");
    assert_eq!(
        Arc::strong_count(&limiter),
        2,
        "the blocking thread holds the limiter"
    );

    sync.abort();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while Arc::strong_count(&limiter) > 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the blocking sync still runs 5 s after it was dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The lock is still held: the sync stopped waiting, it was not answered.
    locker.batch_execute("COMMIT").await.unwrap();
}
