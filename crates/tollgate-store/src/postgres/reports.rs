//! Usage reports, the usage export and billing periods on Postgres (see
//! `crate::reports` for what both backends share).
//!
//! Reports sum `usage_customer_daily` (day × customer) in SQL, or
//! `usage_daily` when grouping by route or model: in `numeric` (`sum(bigint)`), so no
//! total can overflow, clamped to the bigint range on the way out as the
//! writer clamps. A filter on days alone reads the primary key's `day`
//! prefix (or scans the table, when the planner finds that cheaper for a
//! large share of it); a filter on a customer reads `(customer_id, day)`.
//! Names and texts are ordered bytewise (`COLLATE "C"`), as SQLite orders
//! them, so that both backends list in the same order.
//!
//! Each query variant (with or without a customer, first page or later)
//! is its own SQL text, so each gets a plan of its own: one text with
//! `$3 IS NULL OR customer_id = $3` would be planned once, generically,
//! for both.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;

use deadpool_postgres::GenericClient;
use time::Date;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use uuid::Uuid;

use tollgate_metering::billing::{
    BillingLine, BillingUsage, ClosedPeriod, GroupKey, Ranking, UsageFilter, UsageGroup,
    UsageTotals,
};
use tollgate_metering::limits::{Period, PeriodTotals};
use tollgate_metering::usage::UsageEvent;
use tollgate_metering::{CustomerId, KeyId};

use super::{corrupt, decode_all, get, Failure, PostgresStore};
use crate::reports::{self, lower, totals, unsigned, Lower, EVENT_COLUMNS, LINE_COLUMNS, SUMMED};
use crate::usage::{bigint, text};

/// Statement parameters, numbered as they are bound.
#[derive(Default)]
struct Args(Vec<Box<dyn ToSql + Sync + Send>>);

impl Args {
    /// Adds `value`; returns its placeholder.
    fn bind(&mut self, value: impl ToSql + Sync + Send + 'static) -> String {
        self.0.push(Box::new(value));
        format!("${}", self.0.len())
    }

    fn refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.0
            .iter()
            .map(|arg| arg.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }
}

/// Each summed column as `sum(..)` clamped to bigint, aliased by its name.
/// The sum of no rows is 0, not NULL: LEAST and GREATEST skip a NULL, so
/// unguarded they would turn it into the bound.
fn sums() -> String {
    SUMMED
        .iter()
        .map(|column| {
            format!(
                "GREATEST(LEAST(COALESCE(sum({column}), 0), 9223372036854775807), -9223372036854775808)::bigint \
                 AS {column}"
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `usage_daily` or `usage_customer_daily` rows of `filter`.
fn daily_filter(filter: &UsageFilter, args: &mut Args) -> String {
    let mut sql = format!(
        "day >= {} AND day <= {}",
        args.bind(filter.from),
        args.bind(filter.to)
    );
    if let Some(customer) = filter.customer {
        sql += &format!(" AND customer_id = {}", args.bind(customer.0));
    }
    sql
}

/// The ten sums from column `first` on (NULL, from an empty set, is 0).
fn sums_at(row: &Row, first: usize) -> Result<UsageTotals, Failure> {
    let mut sums = [0; 10];
    for (index, sum) in sums.iter_mut().enumerate() {
        *sum = get::<Option<i64>>(row, first + index)?.unwrap_or(0);
    }
    Ok(totals(sums))
}

/// Decodes a group's key from a row.
type KeyOf = fn(&Row) -> Result<GroupKey, Failure>;

fn customer_key(row: &Row) -> Result<GroupKey, Failure> {
    Ok(GroupKey::Customer {
        id: CustomerId(get(row, 0)?),
        name: get(row, 1)?,
    })
}

/// Per-customer totals, named (a customer id that is not among the
/// customers is named by its id), ranked by `rank` descending first if
/// given, then by name, at most `limit`.
fn customers_sql(filter: &UsageFilter, rank: Option<(Ranking, u32)>, args: &mut Args) -> String {
    let where_ = daily_filter(filter, args);
    let columns = SUMMED
        .iter()
        .map(|column| format!("t.{column}"))
        .collect::<Vec<_>>()
        .join(", ");
    let name = "COALESCE(c.name, t.customer_id::text)";
    let (rank_column, order, limit) = match rank {
        None => (String::new(), String::new(), String::new()),
        Some((by, limit)) => {
            // In numeric, unclamped: the order is exact even where the
            // displayed sums saturate.
            let rank = match by {
                Ranking::Cost => "sum(cost_nanos)",
                Ranking::Requests => "sum(requests)",
                Ranking::Tokens => {
                    "sum(input_tokens) + sum(output_tokens) + sum(cache_read_tokens) \
                     + sum(cache_write_tokens)"
                }
            };
            (
                format!(", {rank} AS rank"),
                "t.rank DESC, ".to_owned(),
                format!(" LIMIT {}", args.bind(i64::from(limit))),
            )
        }
    };
    format!(
        "SELECT t.customer_id, {name}, {columns} \
         FROM (SELECT customer_id, {sums}{rank_column} FROM usage_customer_daily WHERE {where_} \
               GROUP BY customer_id) AS t \
         LEFT JOIN customers AS c ON c.id = t.customer_id \
         ORDER BY {order}{name} COLLATE \"C\", t.customer_id{limit}",
        sums = sums(),
    )
}

fn key_key(row: &Row) -> Result<GroupKey, Failure> {
    Ok(GroupKey::Key {
        id: KeyId(get(row, 0)?),
        prefix: get(row, 1)?,
        name: get(row, 2)?,
        customer_id: CustomerId(get(row, 3)?),
        customer: get(row, 4)?,
    })
}

/// Per-key totals with each key's prefix and name and its customer's name
/// (a key or customer no longer stored shows its id), by customer name,
/// then prefix.
fn keys_sql(filter: &UsageFilter, args: &mut Args) -> String {
    let where_ = daily_filter(filter, args);
    let columns = SUMMED
        .iter()
        .map(|column| format!("t.{column}"))
        .collect::<Vec<_>>()
        .join(", ");
    let customer = "COALESCE(c.name, t.customer_id::text)";
    format!(
        "SELECT t.key_id, COALESCE(k.prefix, t.key_id::text), k.name, t.customer_id, {customer}, \
         {columns} \
         FROM (SELECT key_id, customer_id, {sums} FROM usage_daily WHERE {where_} \
               GROUP BY key_id, customer_id) AS t \
         LEFT JOIN api_keys AS k ON k.id = t.key_id \
         LEFT JOIN customers AS c ON c.id = t.customer_id \
         ORDER BY {customer} COLLATE \"C\", k.prefix COLLATE \"C\", t.key_id",
        sums = sums(),
    )
}

async fn grouped_rows(
    store: &PostgresStore,
    sql: &str,
    args: &Args,
    key: KeyOf,
    first_sum: usize,
) -> Result<Vec<(GroupKey, UsageTotals)>, Failure> {
    let client = store.client().await?;
    let statement = client.prepare_cached(sql).await?;
    let rows = client.query(&statement, &args.refs()).await?;
    rows.iter()
        .map(|row| Ok((key(row)?, sums_at(row, first_sum)?)))
        .collect()
}

pub(super) async fn summary(
    store: &PostgresStore,
    filter: &UsageFilter,
) -> Result<UsageTotals, Failure> {
    let mut args = Args::default();
    let sql = format!(
        "SELECT {} FROM usage_customer_daily WHERE {}",
        sums(),
        daily_filter(filter, &mut args)
    );
    let client = store.client().await?;
    let statement = client.prepare_cached(&sql).await?;
    let row = client.query_one(&statement, &args.refs()).await?;
    sums_at(&row, 0)
}

/// Each customer's totals of `period` for the limiter, from the customer
/// days, summed in numeric and clamped as every report is.
pub(super) async fn period_totals(
    store: &PostgresStore,
    days: Range<Date>,
) -> Result<HashMap<CustomerId, PeriodTotals>, Failure> {
    let sql = format!(
        "SELECT customer_id, {} FROM usage_customer_daily WHERE day >= $1 AND day < $2 \
         GROUP BY customer_id",
        sums()
    );
    totals_by(store, &sql, days, CustomerId).await
}

/// The period's totals per key family, for families with limits: from
/// `usage_daily` (per key), reached through the limited keys' customers.
pub(super) async fn key_period_totals(
    store: &PostgresStore,
    days: Range<Date>,
) -> Result<HashMap<KeyId, PeriodTotals>, Failure> {
    let sql = format!(
        "SELECT k.family_id, {} FROM usage_daily d JOIN api_keys k ON k.id = d.key_id \
         WHERE d.day >= $1 AND d.day < $2 \
         AND d.customer_id IN (SELECT customer_id FROM api_keys WHERE limits IS NOT NULL) \
         AND k.family_id IN (SELECT family_id FROM api_keys WHERE limits IS NOT NULL) \
         GROUP BY k.family_id",
        sums()
    );
    totals_by(store, &sql, days, KeyId).await
}

/// The rows of `sql` (an id, then the sums; bound to the first and the
/// end of `days`) as period totals by id.
async fn totals_by<Id: std::hash::Hash + Eq>(
    store: &PostgresStore,
    sql: &str,
    days: Range<Date>,
    id: fn(Uuid) -> Id,
) -> Result<HashMap<Id, PeriodTotals>, Failure> {
    let client = store.client().await?;
    let statement = client.prepare_cached(sql).await?;
    let rows = client.query(&statement, &[&days.start, &days.end]).await?;
    let mut totals = HashMap::with_capacity(rows.len());
    for row in &rows {
        totals.insert(id(get(row, 0)?), reports::period_totals(&sums_at(row, 1)?));
    }
    Ok(totals)
}

pub(super) async fn grouped(
    store: &PostgresStore,
    filter: &UsageFilter,
    group: UsageGroup,
) -> Result<Vec<(GroupKey, UsageTotals)>, Failure> {
    let mut args = Args::default();
    // `route` and `model` are COLLATE "C" columns: bytewise already.
    let (column, key): (&str, KeyOf) = match group {
        UsageGroup::Customer => {
            let sql = customers_sql(filter, None, &mut args);
            return grouped_rows(store, &sql, &args, customer_key, 2).await;
        }
        UsageGroup::Key => {
            let sql = keys_sql(filter, &mut args);
            return grouped_rows(store, &sql, &args, key_key, 5).await;
        }
        UsageGroup::Day => ("day", |row| Ok(GroupKey::Day(get::<Date>(row, 0)?))),
        UsageGroup::Route => ("route", |row| Ok(GroupKey::Route(get(row, 0)?))),
        UsageGroup::Model => ("model", |row| Ok(GroupKey::Model(get(row, 0)?))),
    };
    // Days need no finer grain than customer days; routes and models do.
    let table = match group {
        UsageGroup::Day => "usage_customer_daily",
        _ => "usage_daily",
    };
    let sql = format!(
        "SELECT {column}, {} FROM {table} WHERE {} GROUP BY {column} ORDER BY {column}",
        sums(),
        daily_filter(filter, &mut args)
    );
    grouped_rows(store, &sql, &args, key, 1).await
}

pub(super) async fn top_customers(
    store: &PostgresStore,
    filter: &UsageFilter,
    by: Ranking,
    limit: u32,
) -> Result<Vec<(GroupKey, UsageTotals)>, Failure> {
    let mut args = Args::default();
    let sql = customers_sql(filter, Some((by, limit)), &mut args);
    grouped_rows(store, &sql, &args, customer_key, 2).await
}

/// One `usage_events` row, columns in [`EVENT_COLUMNS`] order.
fn event_row(row: &Row) -> Result<UsageEvent, Failure> {
    let count = |index: usize, what: &str| -> Result<u64, Failure> {
        Ok(unsigned(get(row, index)?, what)?)
    };
    let status: i32 = get(row, 9)?;
    let outcome: &str = get(row, 10)?;
    let cost_source: &str = get(row, 21)?;
    Ok(UsageEvent {
        id: get(row, 0)?,
        client_request_id: get(row, 1)?,
        ts: get(row, 2)?,
        customer_id: CustomerId(get(row, 3)?),
        key_id: KeyId(get(row, 4)?),
        instance: get(row, 5)?,
        route: get(row, 6)?,
        method: get(row, 7)?,
        path: get(row, 8)?,
        status: u16::try_from(status).map_err(|_| corrupt(format!("a status of {status}")))?,
        outcome: outcome.parse().map_err(corrupt)?,
        latency_us: count(11, "latency")?,
        upstream_latency_us: count(12, "upstream latency")?,
        request_bytes: count(13, "request size")?,
        response_bytes: count(14, "response size")?,
        model: get(row, 15)?,
        input_tokens: count(16, "token count")?,
        output_tokens: count(17, "token count")?,
        cache_read_tokens: count(18, "token count")?,
        cache_write_tokens: count(19, "token count")?,
        cost_nanos: get(row, 20)?,
        cost_source: cost_source.parse().map_err(corrupt)?,
    })
}

pub(super) async fn events_page(
    store: &PostgresStore,
    filter: &UsageFilter,
    after: Option<(time::OffsetDateTime, Uuid)>,
    limit: u32,
) -> Result<Vec<UsageEvent>, Failure> {
    let mut args = Args::default();
    // `(ts, id) > (…)` is an index condition of the primary key, `(ts, id)`
    // (migration 7); the plain `ts >=` beside it is what prunes earlier
    // months' partitions.
    let lower = match lower(filter, after) {
        Lower::Start(start) => format!("ts >= {}", args.bind(start)),
        Lower::After(ts, id) => {
            let ts = args.bind(ts);
            format!("ts >= {ts} AND (ts, id) > ({ts}, {})", args.bind(id))
        }
    };
    let mut sql = format!(
        "SELECT {EVENT_COLUMNS} FROM usage_events WHERE {lower} AND ts <= {}",
        args.bind(filter.last_instant())
    );
    if let Some(customer) = filter.customer {
        sql += &format!(" AND customer_id = {}", args.bind(customer.0));
    }
    sql += &format!(" ORDER BY ts, id LIMIT {}", args.bind(i64::from(limit)));
    let client = store.client().await?;
    let statement = client.prepare_cached(&sql).await?;
    decode_all(&client.query(&statement, &args.refs()).await?, event_row)
}

const BILLING_USAGE: &str = "SELECT c.id, c.name, c.tier, \
    COALESCE(u.requests, 0), COALESCE(u.cost_nanos, 0), c.overrides \
    FROM customers AS c \
    LEFT JOIN (SELECT customer_id, \
        LEAST(sum(requests), 9223372036854775807)::bigint AS requests, \
        GREATEST(LEAST(sum(cost_nanos), 9223372036854775807), -9223372036854775808)::bigint \
            AS cost_nanos \
        FROM usage_customer_daily WHERE day >= $1 AND day < $2 GROUP BY customer_id) AS u \
    ON u.customer_id = c.id \
    WHERE c.created_at < $3 OR u.customer_id IS NOT NULL \
    ORDER BY c.name COLLATE \"C\", c.id";

pub(super) async fn billing_usage(
    store: &PostgresStore,
    period: Period,
) -> Result<Vec<BillingUsage>, Failure> {
    let client = store.client().await?;
    let statement = client.prepare_cached(BILLING_USAGE).await?;
    let rows = client
        .query(
            &statement,
            &[
                &period.first_day(),
                &period.next().first_day(),
                &period.next().first_day().midnight().assume_utc(),
            ],
        )
        .await?;
    decode_all(&rows, |row| {
        Ok(BillingUsage {
            customer_id: CustomerId(get(row, 0)?),
            customer: get(row, 1)?,
            tier: get(row, 2)?,
            requests: u64::try_from(get::<i64>(row, 3)?).unwrap_or(0),
            cost_nanos: get(row, 4)?,
            overrides: get(row, 5)?,
        })
    })
}

fn line_row(row: &Row) -> Result<BillingLine, Failure> {
    let count = |index: usize, what: &str| -> Result<u64, Failure> {
        Ok(unsigned(get(row, index)?, what)?)
    };
    Ok(BillingLine {
        customer_id: CustomerId(get(row, 0)?),
        customer: get(row, 1)?,
        tier: get(row, 2)?,
        requests: count(3, "request count")?,
        included_requests: get::<Option<i64>>(row, 4)?
            .map(|included| unsigned(included, "request count"))
            .transpose()?,
        overage_requests: count(5, "request count")?,
        overage_charge_nanos: get(row, 6)?,
        metered_cost_nanos: get(row, 7)?,
        total_nanos: get(row, 8)?,
    })
}

/// The closed period, read with `client` (inside the closing transaction,
/// or on its own).
async fn read_closed(
    client: &impl GenericClient,
    period: Period,
) -> Result<Option<ClosedPeriod>, Failure> {
    let key = period.to_string();
    let statement = client
        .prepare_cached("SELECT closed_at FROM billing_periods WHERE period = $1")
        .await?;
    let Some(row) = client.query_opt(&statement, &[&key]).await? else {
        return Ok(None);
    };
    let closed_at = get(&row, 0)?;
    let statement = client
        .prepare_cached(&format!(
            "SELECT {LINE_COLUMNS} FROM billing_lines WHERE period = $1 \
             ORDER BY customer COLLATE \"C\", customer_id"
        ))
        .await?;
    let lines = decode_all(&client.query(&statement, &[&key]).await?, line_row)?;
    Ok(Some(ClosedPeriod {
        period,
        closed_at,
        lines,
    }))
}

pub(super) async fn closed_period(
    store: &PostgresStore,
    period: Period,
) -> Result<Option<ClosedPeriod>, Failure> {
    // Two statements, no transaction needed: the period row and its lines
    // commit together, so once the row is visible the lines are too.
    read_closed(&store.client().await?, period).await
}

const INSERT_PERIOD: &str = "INSERT INTO billing_periods (period, closed_at) VALUES ($1, $2) \
    ON CONFLICT (period) DO NOTHING";

const INSERT_LINES: &str = "INSERT INTO billing_lines (period, customer_id, customer, tier, \
    requests, included_requests, overage_requests, overage_charge_nanos, metered_cost_nanos, \
    total_nanos) \
    SELECT $1, * FROM unnest($2::uuid[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], \
        $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[])";

/// In one transaction (READ COMMITTED): insert the period row unless it
/// exists, the lines only if it was inserted, then read back what is
/// stored. A concurrent closer's INSERT waits on this one's uncommitted
/// row; once this one commits, its ON CONFLICT finds the row, it inserts
/// nothing, and its read (a new snapshot per statement) sees these lines.
/// If this one rolls back instead, the other's insert goes ahead.
pub(super) async fn close_period(
    store: &PostgresStore,
    period: Period,
    lines: &[BillingLine],
    at: time::OffsetDateTime,
) -> Result<ClosedPeriod, Failure> {
    reports::check_lines(period, lines)?;
    let key = period.to_string();
    let mut client = store.client().await?;
    let insert_period = client.prepare_cached(INSERT_PERIOD).await?;
    let insert_lines = client.prepare_cached(INSERT_LINES).await?;
    let tx = client.transaction().await?;
    let inserted = tx.execute(&insert_period, &[&key, &at]).await? == 1;
    if inserted && !lines.is_empty() {
        let ids: Vec<Uuid> = lines.iter().map(|line| line.customer_id.0).collect();
        let names: Vec<Cow<'_, str>> = lines.iter().map(|line| text(&line.customer)).collect();
        let tiers: Vec<Cow<'_, str>> = lines.iter().map(|line| text(&line.tier)).collect();
        let column = |value: fn(&BillingLine) -> i64| lines.iter().map(value).collect::<Vec<_>>();
        let requests = column(|line| bigint(line.requests));
        let included: Vec<Option<i64>> = lines
            .iter()
            .map(|line| line.included_requests.map(bigint))
            .collect();
        let overage = column(|line| bigint(line.overage_requests));
        let charge = column(|line| line.overage_charge_nanos);
        let metered = column(|line| line.metered_cost_nanos);
        let total = column(|line| line.total_nanos);
        tx.execute(
            &insert_lines,
            &[
                &key, &ids, &names, &tiers, &requests, &included, &overage, &charge, &metered,
                &total,
            ],
        )
        .await?;
    }
    let closed = read_closed(&tx, period)
        .await?
        .ok_or_else(|| corrupt(format!("billing period {period} vanished while closing")))?;
    tx.commit().await?;
    Ok(closed)
}
