//! The webhook outbox on SQLite: one gateway process, whose writes take
//! turns on one connection, so a claim is a plain transaction.

use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, Row, TransactionBehavior};
use time::OffsetDateTime;
use uuid::Uuid;

use tollgate_metering::keys::Page;
use tollgate_metering::webhooks::{
    Claimed, Delivery, DeliveryFilter, DeliveryStatus, ExpiringKey, NewEvent, Settlement,
};
use tollgate_metering::{CustomerId, KeyId};

use crate::{later, DELIVERY_COLUMNS};

use super::{all, corrupt, first, parse_ts, parse_uuid, ts, Failure};

fn delivery_row(row: &Row<'_>) -> Result<Delivery, Failure> {
    let optional_ts = |index: usize| -> Result<Option<OffsetDateTime>, Failure> {
        row.get::<_, Option<String>>(index)?
            .map(|text| parse_ts(&text))
            .transpose()
    };
    let status: String = row.get(4)?;
    Ok(Delivery {
        id: parse_uuid(&row.get::<_, String>(0)?)?,
        event_id: parse_uuid(&row.get::<_, String>(1)?)?,
        event: row.get(2)?,
        url: row.get(3)?,
        status: DeliveryStatus::parse(&status)
            .ok_or_else(|| corrupt(format!("a delivery status {status:?}")))?,
        attempts: u32::try_from(row.get::<_, i64>(5)?).unwrap_or(0),
        last_error: row.get(6)?,
        created_at: parse_ts(&row.get::<_, String>(7)?)?,
        next_attempt_at: optional_ts(8)?,
        delivered_at: optional_ts(9)?,
    })
}

fn claimed_row(row: &Row<'_>) -> Result<Claimed, Failure> {
    Ok(Claimed {
        delivery: delivery_row(row)?,
        body: row.get(10)?,
    })
}

pub(super) fn record_event(
    conn: &mut Connection,
    event: &NewEvent,
    urls: &[String],
) -> Result<bool, Failure> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let inserted = tx.execute(
        "INSERT INTO webhook_events (id, type, dedup, body, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (dedup) DO NOTHING",
        params![
            event.id.to_string(),
            event.event_type.as_str(),
            event.dedup,
            event.body,
            ts(event.created_at),
        ],
    )?;
    if inserted == 0 {
        return Ok(false);
    }
    {
        let mut statement = tx.prepare_cached(
            "INSERT INTO webhook_deliveries \
             (id, event_id, url, status, attempts, created_at, next_attempt_at) \
             VALUES (?1, ?2, ?3, 'pending', 0, ?4, ?4)",
        )?;
        for url in urls {
            statement.execute(params![
                Uuid::now_v7().to_string(),
                event.id.to_string(),
                url,
                ts(event.created_at),
            ])?;
        }
    }
    tx.commit()?;
    Ok(true)
}

pub(super) fn claim(
    conn: &mut Connection,
    only: Option<Uuid>,
    now: OffsetDateTime,
    lease: Duration,
    limit: u32,
    skip: &[String],
) -> Result<Vec<Claimed>, Failure> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let ids: Vec<String> = match only {
        Some(id) => vec![id.to_string()],
        None => {
            let mut statement = tx.prepare_cached(
                "SELECT id FROM webhook_deliveries WHERE status = 'pending' \
                 AND next_attempt_at <= ?1 \
                 AND url NOT IN (SELECT value FROM json_each(?3)) \
                 ORDER BY next_attempt_at LIMIT ?2",
            )?;
            // A list of strings always serializes.
            let skip = serde_json::to_string(skip).unwrap_or_else(|_| "[]".to_owned());
            let rows =
                statement.query_map(params![ts(now), i64::from(limit), skip], |row| row.get(0))?;
            rows.collect::<Result<_, _>>()?
        }
    };
    let mut claimed = Vec::with_capacity(ids.len());
    {
        let mut update = tx.prepare_cached(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, status = 'pending', \
             next_attempt_at = ?2 WHERE id = ?1",
        )?;
        let mut read = tx.prepare_cached(&format!(
            "SELECT {DELIVERY_COLUMNS}, e.body FROM webhook_deliveries d \
             JOIN webhook_events e ON e.id = d.event_id WHERE d.id = ?1"
        ))?;
        for id in &ids {
            if update.execute(params![id, ts(later(now, lease))])? == 1 {
                claimed.extend(first(&mut read, params![id], claimed_row)?);
            }
        }
    }
    tx.commit()?;
    Ok(claimed)
}

pub(super) fn settle(
    conn: &Connection,
    id: Uuid,
    attempt: u32,
    settlement: &Settlement,
) -> Result<(), Failure> {
    let (status, error, next, delivered) = match settlement {
        Settlement::Delivered { at } => ("delivered", None, None, Some(ts(*at))),
        Settlement::Retry {
            error,
            next_attempt_at,
        } => (
            "pending",
            Some(error.as_str()),
            Some(ts(*next_attempt_at)),
            None,
        ),
        Settlement::Failed { error } => ("failed", Some(error.as_str()), None, None),
    };
    conn.prepare_cached(
        "UPDATE webhook_deliveries SET status = ?2, \
         last_error = COALESCE(?3, last_error), next_attempt_at = ?4, \
         delivered_at = COALESCE(?5, delivered_at) WHERE id = ?1 AND attempts = ?6",
    )?
    .execute(params![
        id.to_string(),
        status,
        error,
        next,
        delivered,
        attempt
    ])?;
    Ok(())
}

pub(super) fn list(
    conn: &Connection,
    filter: DeliveryFilter,
    page: Page<Uuid>,
) -> Result<Vec<Delivery>, Failure> {
    let mut args: Vec<Value> = Vec::new();
    let mut sql = format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d \
         JOIN webhook_events e ON e.id = d.event_id WHERE 1"
    );
    if let Some(status) = filter.status {
        args.push(Value::Text(status.as_str().to_owned()));
        sql += &format!(" AND d.status = ?{}", args.len());
    }
    if let Some(event) = filter.event {
        args.push(Value::Text(event.as_str().to_owned()));
        sql += &format!(" AND e.type = ?{}", args.len());
    }
    if let Some(after) = page.after {
        args.push(Value::Text(after.to_string()));
        sql += &format!(" AND d.id < ?{}", args.len());
    }
    args.push(Value::Integer(i64::from(page.limit)));
    sql += &format!(" ORDER BY d.id DESC LIMIT ?{}", args.len());
    let mut statement = conn.prepare_cached(&sql)?;
    all(&mut statement, params_from_iter(args), delivery_row)
}

pub(super) fn one(conn: &Connection, id: Uuid) -> Result<Option<Delivery>, Failure> {
    let mut statement = conn.prepare_cached(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d \
         JOIN webhook_events e ON e.id = d.event_id WHERE d.id = ?1"
    ))?;
    first(&mut statement, params![id.to_string()], delivery_row)
}

pub(super) fn pending(conn: &Connection) -> Result<u64, Failure> {
    let count: i64 = conn
        .prepare_cached("SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'")?
        .query_row([], |row| row.get(0))?;
    Ok(u64::try_from(count).unwrap_or(0))
}

pub(super) fn dedups(conn: &Connection, since: OffsetDateTime) -> Result<Vec<String>, Failure> {
    let mut statement =
        conn.prepare_cached("SELECT dedup FROM webhook_events WHERE created_at >= ?1")?;
    let rows = statement.query_map(params![ts(since)], |row| row.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn expiring_keys(
    conn: &Connection,
    now: OffsetDateTime,
    until: OffsetDateTime,
) -> Result<Vec<ExpiringKey>, Failure> {
    let mut statement = conn.prepare_cached(
        "SELECT k.id, k.prefix, k.customer_id, c.name, k.expires_at \
         FROM api_keys k JOIN customers c ON c.id = k.customer_id \
         WHERE k.revoked_at IS NULL AND k.expires_at > ?1 AND k.expires_at <= ?2 \
         AND NOT EXISTS (SELECT 1 FROM api_keys n \
             WHERE COALESCE(n.family_id, n.id) = COALESCE(k.family_id, k.id) AND n.id > k.id) \
         ORDER BY k.expires_at, k.id",
    )?;
    all(&mut statement, params![ts(now), ts(until)], |row| {
        Ok(ExpiringKey {
            key_id: KeyId(parse_uuid(&row.get::<_, String>(0)?)?),
            prefix: row.get(1)?,
            customer_id: CustomerId(parse_uuid(&row.get::<_, String>(2)?)?),
            customer: row.get(3)?,
            expires_at: parse_ts(&row.get::<_, String>(4)?)?,
        })
    })
}
