//! Usage reports, the usage export and billing periods on SQLite (see
//! `crate::reports` for what both backends share).
//!
//! SQLite's `sum()` fails the whole query with "integer overflow" when an
//! integer sum leaves the 64-bit range, and `usage_daily` holds sums that
//! the writer saturated at `i64::MAX`, so two of them would make a report
//! fail for good. So each column is summed in two halves, `x >> 32` (at
//! most 2^31 in size) and `x & 0xFFFFFFFF` (below 2^32), neither of which
//! can overflow for fewer than 2^31 rows, and Rust adds them up exactly
//! (in `i128`) and clamps the result, as Postgres clamps its `numeric`
//! sums: both backends give the same totals to the last unit.
//!
//! Day ranges read the primary key's `day` prefix (`day` is `YYYY-MM-DD`
//! text, which sorts as dates do), a customer filter `(customer_id, day)`;
//! the export reads `usage_events` itself, whose primary key is `(ts, id)`
//! (migration 7), in that order. Texts compare bytewise (BINARY), as
//! Postgres compares them under `COLLATE "C"`.

use std::collections::HashMap;
use std::ops::Range;

use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, Row, TransactionBehavior};
use time::macros::format_description;
use time::{Date, OffsetDateTime};
use uuid::Uuid;

use tollgate_metering::billing::{
    BillingLine, BillingUsage, ClosedPeriod, GroupKey, Ranking, UsageFilter, UsageGroup,
    UsageTotals,
};
use tollgate_metering::limits::{Period, PeriodTotals};
use tollgate_metering::usage::UsageEvent;
use tollgate_metering::{CustomerId, KeyId};

use super::{all, corrupt, day_text, first, parse_ts, parse_uuid, ts, Failure};
use crate::reports::{
    self, clamp, lower, totals, unsigned, Lower, EVENT_COLUMNS, LINE_COLUMNS, SUMMED,
};
use crate::usage::{bigint, text};

/// Statement parameters, numbered as they are bound.
#[derive(Default)]
struct Args(Vec<Value>);

impl Args {
    /// Adds `value`; returns its placeholder.
    fn bind(&mut self, value: impl Into<Value>) -> String {
        self.0.push(value.into());
        format!("?{}", self.0.len())
    }
}

/// Each summed column in two halves, aliased `<column>_hi`, `<column>_lo`.
fn split_sums() -> String {
    SUMMED
        .iter()
        .map(|column| {
            format!("sum({column} >> 32) AS {column}_hi, sum({column} & 4294967295) AS {column}_lo")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The halves' columns of a subquery aliased `alias`, in [`SUMMED`] order.
fn split_columns(alias: &str) -> String {
    SUMMED
        .iter()
        .map(|column| format!("{alias}.{column}_hi, {alias}.{column}_lo"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A column's sum from its halves (`NULL`, from an empty set, is 0).
fn add_halves(hi: Option<i64>, lo: Option<i64>) -> i64 {
    clamp((i128::from(hi.unwrap_or(0)) << 32) + i128::from(lo.unwrap_or(0)))
}

/// The ten sums, from their halves from column `first` on.
fn sums_at(row: &Row<'_>, first: usize) -> Result<UsageTotals, Failure> {
    let mut sums = [0; 10];
    for (index, sum) in sums.iter_mut().enumerate() {
        let at = first + 2 * index;
        *sum = add_halves(row.get(at)?, row.get(at + 1)?);
    }
    Ok(totals(sums))
}

/// The `usage_daily` or `usage_customer_daily` rows of `filter`.
fn daily_filter(filter: &UsageFilter, args: &mut Args) -> String {
    let mut sql = format!(
        "day >= {} AND day <= {}",
        args.bind(day_text(filter.from)),
        args.bind(day_text(filter.to))
    );
    if let Some(customer) = filter.customer {
        sql += &format!(" AND customer_id = {}", args.bind(customer.to_string()));
    }
    sql
}

fn parse_day(text: &str) -> Result<Date, Failure> {
    Date::parse(text, format_description!("[year]-[month]-[day]"))
        .map_err(|error| corrupt(format!("bad day {text:?}: {error}")))
}

/// Decodes a group's key from a row.
type KeyOf = fn(&Row<'_>) -> Result<GroupKey, Failure>;

fn customer_key(row: &Row<'_>) -> Result<GroupKey, Failure> {
    Ok(GroupKey::Customer {
        id: CustomerId(parse_uuid(&row.get::<_, String>(0)?)?),
        name: row.get(1)?,
    })
}

fn key_key(row: &Row<'_>) -> Result<GroupKey, Failure> {
    Ok(GroupKey::Key {
        id: KeyId(parse_uuid(&row.get::<_, String>(0)?)?),
        prefix: row.get(1)?,
        name: row.get(2)?,
        customer_id: CustomerId(parse_uuid(&row.get::<_, String>(3)?)?),
        customer: row.get(4)?,
    })
}

/// Per-key totals with each key's prefix and name and its customer's name
/// (a key or customer no longer stored shows its id), by customer name,
/// then prefix.
fn keys_sql(filter: &UsageFilter, args: &mut Args) -> String {
    let where_ = daily_filter(filter, args);
    let customer = "COALESCE(c.name, t.customer_id)";
    format!(
        "SELECT t.key_id, COALESCE(k.prefix, t.key_id), k.name, t.customer_id, {customer}, \
         {columns} \
         FROM (SELECT key_id, customer_id, {sums} FROM usage_daily WHERE {where_} \
               GROUP BY key_id, customer_id) AS t \
         LEFT JOIN api_keys AS k ON k.id = t.key_id \
         LEFT JOIN customers AS c ON c.id = t.customer_id \
         ORDER BY {customer}, k.prefix, t.key_id",
        columns = split_columns("t"),
        sums = split_sums(),
    )
}

/// A column's exact sum from the halves of subquery `t`, for ranking: an
/// integer, or a REAL where it leaves the 64-bit range (SQLite's `*` and
/// `+` turn to floating point on overflow rather than failing).
fn whole(column: &str) -> String {
    format!("(t.{column}_hi * 4294967296 + t.{column}_lo)")
}

/// Per-customer totals, named (a customer id that is not among the
/// customers is named by its id), ranked by `rank` descending first if
/// given, then by name, at most `limit`.
fn customers_sql(filter: &UsageFilter, rank: Option<(Ranking, u32)>, args: &mut Args) -> String {
    let where_ = daily_filter(filter, args);
    let name = "COALESCE(c.name, t.customer_id)";
    let (order, limit) = match rank {
        None => (String::new(), String::new()),
        Some((by, limit)) => {
            let rank = match by {
                Ranking::Cost => whole("cost_nanos"),
                Ranking::Requests => whole("requests"),
                Ranking::Tokens => [
                    "input_tokens",
                    "output_tokens",
                    "cache_read_tokens",
                    "cache_write_tokens",
                ]
                .map(whole)
                .join(" + "),
            };
            (
                format!("{rank} DESC, "),
                format!(" LIMIT {}", args.bind(i64::from(limit))),
            )
        }
    };
    format!(
        "SELECT t.customer_id, {name}, {columns} \
         FROM (SELECT customer_id, {sums} FROM usage_customer_daily WHERE {where_} \
               GROUP BY customer_id) AS t \
         LEFT JOIN customers AS c ON c.id = t.customer_id \
         ORDER BY {order}{name}, t.customer_id{limit}",
        columns = split_columns("t"),
        sums = split_sums(),
    )
}

fn grouped_rows(
    conn: &Connection,
    sql: &str,
    args: Args,
    key: KeyOf,
    first_sum: usize,
) -> Result<Vec<(GroupKey, UsageTotals)>, Failure> {
    let mut statement = conn.prepare_cached(sql)?;
    let mut rows = statement.query(params_from_iter(args.0))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push((key(row)?, sums_at(row, first_sum)?));
    }
    Ok(out)
}

pub(super) fn summary(conn: &Connection, filter: &UsageFilter) -> Result<UsageTotals, Failure> {
    let mut args = Args::default();
    let sql = format!(
        "SELECT {} FROM usage_customer_daily WHERE {}",
        split_sums(),
        daily_filter(filter, &mut args)
    );
    let mut statement = conn.prepare_cached(&sql)?;
    let mut rows = statement.query(params_from_iter(args.0))?;
    match rows.next()? {
        Some(row) => sums_at(row, 0),
        None => Ok(UsageTotals::default()),
    }
}

/// Each customer's totals of `period` for the limiter, from the customer
/// days, summed in halves as every report is.
pub(super) fn period_totals(
    conn: &Connection,
    days: Range<Date>,
) -> Result<HashMap<CustomerId, PeriodTotals>, Failure> {
    let sql = format!(
        "SELECT customer_id, {} FROM usage_customer_daily WHERE day >= ?1 AND day < ?2 \
         GROUP BY customer_id",
        split_sums()
    );
    totals_by(conn, &sql, days, CustomerId)
}

/// The period's totals per key family, for families with limits: from
/// `usage_daily` (per key), reached through the limited keys' customers.
pub(super) fn key_period_totals(
    conn: &Connection,
    days: Range<Date>,
) -> Result<HashMap<KeyId, PeriodTotals>, Failure> {
    let sql = format!(
        "SELECT COALESCE(k.family_id, k.id), {} FROM usage_daily d \
         JOIN api_keys k ON k.id = d.key_id \
         WHERE d.day >= ?1 AND d.day < ?2 \
         AND d.customer_id IN (SELECT customer_id FROM api_keys WHERE limits IS NOT NULL) \
         AND COALESCE(k.family_id, k.id) IN \
             (SELECT COALESCE(family_id, id) FROM api_keys WHERE limits IS NOT NULL) \
         GROUP BY 1",
        split_sums()
    );
    totals_by(conn, &sql, days, KeyId)
}

/// The rows of `sql` (an id, then the sums in halves; bound to the first
/// and the end of `days`) as period totals by id.
fn totals_by<Id: std::hash::Hash + Eq>(
    conn: &Connection,
    sql: &str,
    days: Range<Date>,
    id: fn(Uuid) -> Id,
) -> Result<HashMap<Id, PeriodTotals>, Failure> {
    let mut statement = conn.prepare_cached(sql)?;
    let mut rows = statement.query(params![day_text(days.start), day_text(days.end)])?;
    let mut totals = HashMap::new();
    while let Some(row) = rows.next()? {
        let key = id(parse_uuid(&row.get::<_, String>(0)?)?);
        totals.insert(key, reports::period_totals(&sums_at(row, 1)?));
    }
    Ok(totals)
}

pub(super) fn grouped(
    conn: &Connection,
    filter: &UsageFilter,
    group: UsageGroup,
) -> Result<Vec<(GroupKey, UsageTotals)>, Failure> {
    let mut args = Args::default();
    let (column, key): (&str, KeyOf) = match group {
        UsageGroup::Customer => {
            let sql = customers_sql(filter, None, &mut args);
            return grouped_rows(conn, &sql, args, customer_key, 2);
        }
        UsageGroup::Key => {
            let sql = keys_sql(filter, &mut args);
            return grouped_rows(conn, &sql, args, key_key, 5);
        }
        UsageGroup::Day => ("day", |row| {
            Ok(GroupKey::Day(parse_day(&row.get::<_, String>(0)?)?))
        }),
        UsageGroup::Route => ("route", |row| Ok(GroupKey::Route(row.get(0)?))),
        UsageGroup::Model => ("model", |row| Ok(GroupKey::Model(row.get(0)?))),
    };
    // Days need no finer grain than customer days; routes and models do.
    let table = match group {
        UsageGroup::Day => "usage_customer_daily",
        _ => "usage_daily",
    };
    let sql = format!(
        "SELECT {column}, {} FROM {table} WHERE {} GROUP BY {column} ORDER BY {column}",
        split_sums(),
        daily_filter(filter, &mut args)
    );
    grouped_rows(conn, &sql, args, key, 1)
}

pub(super) fn top_customers(
    conn: &Connection,
    filter: &UsageFilter,
    by: Ranking,
    limit: u32,
) -> Result<Vec<(GroupKey, UsageTotals)>, Failure> {
    let mut args = Args::default();
    let sql = customers_sql(filter, Some((by, limit)), &mut args);
    grouped_rows(conn, &sql, args, customer_key, 2)
}

/// One `usage_events` row, columns in [`EVENT_COLUMNS`] order.
fn event_row(row: &Row<'_>) -> Result<UsageEvent, Failure> {
    let count =
        |index: usize, what: &str| -> Result<u64, Failure> { Ok(unsigned(row.get(index)?, what)?) };
    let status: i64 = row.get(9)?;
    Ok(UsageEvent {
        id: parse_uuid(&row.get::<_, String>(0)?)?,
        client_request_id: row.get(1)?,
        ts: parse_ts(&row.get::<_, String>(2)?)?,
        customer_id: CustomerId(parse_uuid(&row.get::<_, String>(3)?)?),
        key_id: KeyId(parse_uuid(&row.get::<_, String>(4)?)?),
        instance: row.get(5)?,
        route: row.get(6)?,
        method: row.get(7)?,
        path: row.get(8)?,
        status: u16::try_from(status).map_err(|_| corrupt(format!("a status of {status}")))?,
        outcome: row.get::<_, String>(10)?.parse().map_err(corrupt)?,
        latency_us: count(11, "latency")?,
        upstream_latency_us: count(12, "upstream latency")?,
        request_bytes: count(13, "request size")?,
        response_bytes: count(14, "response size")?,
        model: row.get(15)?,
        input_tokens: count(16, "token count")?,
        output_tokens: count(17, "token count")?,
        cache_read_tokens: count(18, "token count")?,
        cache_write_tokens: count(19, "token count")?,
        cost_nanos: row.get(20)?,
        cost_source: row.get::<_, String>(21)?.parse().map_err(corrupt)?,
    })
}

pub(super) fn events_page(
    conn: &Connection,
    filter: &UsageFilter,
    after: Option<(OffsetDateTime, Uuid)>,
    limit: u32,
) -> Result<Vec<UsageEvent>, Failure> {
    let mut args = Args::default();
    // The row value alone, a range of the primary key `(ts, id)`: next to
    // a plain `ts >=` SQLite would take that as the key's range and scan
    // from the month's start on every page.
    let lower = match lower(filter, after) {
        Lower::Start(start) => format!("ts >= {}", args.bind(ts(start))),
        Lower::After(at, id) => {
            let at = args.bind(ts(at));
            format!("(ts, id) > ({at}, {})", args.bind(id.to_string()))
        }
    };
    let mut sql = format!(
        "SELECT {EVENT_COLUMNS} FROM usage_events WHERE {lower} AND ts <= {}",
        args.bind(ts(filter.last_instant()))
    );
    if let Some(customer) = filter.customer {
        sql += &format!(" AND customer_id = {}", args.bind(customer.to_string()));
    }
    sql += &format!(" ORDER BY ts, id LIMIT {}", args.bind(i64::from(limit)));
    let mut statement = conn.prepare_cached(&sql)?;
    all(&mut statement, params_from_iter(args.0), event_row)
}

const BILLING_USAGE: &str = "SELECT c.id, c.name, c.tier, \
    u.requests_hi, u.requests_lo, u.cost_nanos_hi, u.cost_nanos_lo, c.overrides \
    FROM customers AS c \
    LEFT JOIN (SELECT customer_id, \
        sum(requests >> 32) AS requests_hi, sum(requests & 4294967295) AS requests_lo, \
        sum(cost_nanos >> 32) AS cost_nanos_hi, sum(cost_nanos & 4294967295) AS cost_nanos_lo \
        FROM usage_customer_daily WHERE day >= ?1 AND day < ?2 GROUP BY customer_id) AS u \
    ON u.customer_id = c.id \
    WHERE c.created_at < ?3 OR u.customer_id IS NOT NULL \
    ORDER BY c.name, c.id";

pub(super) fn billing_usage(
    conn: &Connection,
    period: Period,
) -> Result<Vec<BillingUsage>, Failure> {
    let mut statement = conn.prepare_cached(BILLING_USAGE)?;
    all(
        &mut statement,
        params![
            day_text(period.first_day()),
            day_text(period.next().first_day()),
            ts(period.next().first_day().midnight().assume_utc())
        ],
        |row| {
            Ok(BillingUsage {
                customer_id: CustomerId(parse_uuid(&row.get::<_, String>(0)?)?),
                customer: row.get(1)?,
                tier: row.get(2)?,
                requests: u64::try_from(add_halves(row.get(3)?, row.get(4)?)).unwrap_or(0),
                cost_nanos: add_halves(row.get(5)?, row.get(6)?),
                overrides: serde_json::from_str(&row.get::<_, String>(7)?)?,
            })
        },
    )
}

fn line_row(row: &Row<'_>) -> Result<BillingLine, Failure> {
    let count =
        |index: usize, what: &str| -> Result<u64, Failure> { Ok(unsigned(row.get(index)?, what)?) };
    Ok(BillingLine {
        customer_id: CustomerId(parse_uuid(&row.get::<_, String>(0)?)?),
        customer: row.get(1)?,
        tier: row.get(2)?,
        requests: count(3, "request count")?,
        included_requests: row
            .get::<_, Option<i64>>(4)?
            .map(|included| unsigned(included, "request count"))
            .transpose()?,
        overage_requests: count(5, "request count")?,
        overage_charge_nanos: row.get(6)?,
        metered_cost_nanos: row.get(7)?,
        total_nanos: row.get(8)?,
    })
}

/// The closed period, read on `conn` (inside the closing transaction, or
/// on its own).
fn read_closed(conn: &Connection, period: Period) -> Result<Option<ClosedPeriod>, Failure> {
    let key = period.to_string();
    let mut statement =
        conn.prepare_cached("SELECT closed_at FROM billing_periods WHERE period = ?1")?;
    let Some(closed_at) = first(&mut statement, [&key], |row| {
        parse_ts(&row.get::<_, String>(0)?)
    })?
    else {
        return Ok(None);
    };
    let mut statement = conn.prepare_cached(&format!(
        "SELECT {LINE_COLUMNS} FROM billing_lines WHERE period = ?1 ORDER BY customer, customer_id"
    ))?;
    let lines = all(&mut statement, [&key], line_row)?;
    Ok(Some(ClosedPeriod {
        period,
        closed_at,
        lines,
    }))
}

pub(super) fn closed_period(
    conn: &mut Connection,
    period: Period,
) -> Result<Option<ClosedPeriod>, Failure> {
    // One read transaction: one snapshot for the period row and its lines.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
    let closed = read_closed(&tx, period)?;
    tx.commit()?;
    Ok(closed)
}

/// In one IMMEDIATE transaction, which takes the write lock first (another
/// process closing at the same time waits for it, within the busy
/// timeout): insert the period row unless it exists, the lines only if it
/// was inserted, then read back what is stored.
pub(super) fn close_period(
    conn: &mut Connection,
    period: Period,
    lines: &[BillingLine],
    at: OffsetDateTime,
) -> Result<ClosedPeriod, Failure> {
    reports::check_lines(period, lines)?;
    let key = period.to_string();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let inserted = tx
        .prepare_cached(
            "INSERT INTO billing_periods (period, closed_at) VALUES (?1, ?2) \
             ON CONFLICT (period) DO NOTHING",
        )?
        .execute(params![key, ts(at)])?
        == 1;
    if inserted {
        let mut insert = tx.prepare_cached(
            "INSERT INTO billing_lines (period, customer_id, customer, tier, requests, \
             included_requests, overage_requests, overage_charge_nanos, metered_cost_nanos, \
             total_nanos) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        for line in lines {
            insert.execute(params![
                key,
                line.customer_id.to_string(),
                text(&line.customer),
                text(&line.tier),
                bigint(line.requests),
                line.included_requests.map(bigint),
                bigint(line.overage_requests),
                line.overage_charge_nanos,
                line.metered_cost_nanos,
                line.total_nanos,
            ])?;
        }
    }
    let closed = read_closed(&tx, period)?
        .ok_or_else(|| corrupt(format!("billing period {period} vanished while closing")))?;
    tx.commit()?;
    Ok(closed)
}
