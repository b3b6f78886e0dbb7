//! The webhook outbox on Postgres. Claims take due deliveries with `FOR
//! UPDATE SKIP LOCKED`, so any number of instances share the work and no
//! two hold one delivery at once.

use std::time::Duration;

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use uuid::Uuid;

use tollgate_metering::keys::Page;
use tollgate_metering::webhooks::{
    Claimed, Delivery, DeliveryFilter, DeliveryStatus, ExpiringKey, NewEvent, Settlement,
};
use tollgate_metering::{CustomerId, KeyId};

use crate::{later, DELIVERY_COLUMNS};

use super::{corrupt, decode_all, get, Failure, PostgresStore};

fn delivery_row(row: &Row) -> Result<Delivery, Failure> {
    let status: String = get(row, 4)?;
    let attempts: i32 = get(row, 5)?;
    Ok(Delivery {
        id: get(row, 0)?,
        event_id: get(row, 1)?,
        event: get(row, 2)?,
        url: get(row, 3)?,
        status: DeliveryStatus::parse(&status)
            .ok_or_else(|| corrupt(format!("a delivery status {status:?}")))?,
        attempts: u32::try_from(attempts).unwrap_or(0),
        last_error: get(row, 6)?,
        created_at: get(row, 7)?,
        next_attempt_at: get(row, 8)?,
        delivered_at: get(row, 9)?,
    })
}

fn claimed_row(row: &Row) -> Result<Claimed, Failure> {
    Ok(Claimed {
        delivery: delivery_row(row)?,
        body: get(row, 10)?,
    })
}

pub(super) async fn record_event(
    store: &PostgresStore,
    event: &NewEvent,
    urls: &[String],
) -> Result<bool, Failure> {
    let mut client = store.client().await?;
    let tx = client.transaction().await?;
    let inserted = tx
        .execute(
            "INSERT INTO webhook_events (id, type, dedup, body, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (dedup) DO NOTHING",
            &[
                &event.id,
                &event.event_type.as_str(),
                &event.dedup,
                &event.body,
                &event.created_at,
            ],
        )
        .await?;
    if inserted == 0 {
        return Ok(false);
    }
    let statement = tx
        .prepare_cached(
            "INSERT INTO webhook_deliveries \
             (id, event_id, url, status, attempts, created_at, next_attempt_at) \
             VALUES ($1, $2, $3, 'pending', 0, $4, $4)",
        )
        .await?;
    for url in urls {
        tx.execute(
            &statement,
            &[&Uuid::now_v7(), &event.id, url, &event.created_at],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(true)
}

pub(super) async fn claim(
    store: &PostgresStore,
    only: Option<Uuid>,
    now: OffsetDateTime,
    lease: Duration,
    limit: u32,
    skip: &[String],
) -> Result<Vec<Claimed>, Failure> {
    let client = store.client().await?;
    let due = match only {
        // $1 is unused here but must have a type.
        Some(_) => "id = $3 AND $1::timestamptz IS NOT NULL",
        None => {
            "status = 'pending' AND next_attempt_at <= $1 AND url <> ALL($4::text[]) \
             ORDER BY next_attempt_at LIMIT $3"
        }
    };
    let sql = format!(
        "WITH due AS (SELECT id FROM webhook_deliveries WHERE {due} FOR UPDATE SKIP LOCKED), \
         claimed AS (UPDATE webhook_deliveries d SET attempts = d.attempts + 1, \
             status = 'pending', next_attempt_at = $2 \
             FROM due WHERE d.id = due.id RETURNING d.*) \
         SELECT {}, e.body FROM claimed d JOIN webhook_events e ON e.id = d.event_id",
        DELIVERY_COLUMNS
    );
    let statement = client.prepare_cached(&sql).await?;
    let until = later(now, lease);
    let limit = i64::from(limit);
    let rows = match only {
        Some(id) => client.query(&statement, &[&now, &until, &id]).await?,
        None => {
            client
                .query(&statement, &[&now, &until, &limit, &skip])
                .await?
        }
    };
    decode_all(&rows, claimed_row)
}

pub(super) async fn settle(
    store: &PostgresStore,
    id: Uuid,
    attempt: u32,
    settlement: &Settlement,
) -> Result<(), Failure> {
    let attempt = i32::try_from(attempt).unwrap_or(i32::MAX);
    let client = store.client().await?;
    let (status, error, next, delivered): (&str, Option<&str>, Option<OffsetDateTime>, _) =
        match settlement {
            Settlement::Delivered { at } => ("delivered", None, None, Some(*at)),
            Settlement::Retry {
                error,
                next_attempt_at,
            } => (
                "pending",
                Some(error.as_str()),
                Some(*next_attempt_at),
                None,
            ),
            Settlement::Failed { error } => ("failed", Some(error.as_str()), None, None),
        };
    let statement = client
        .prepare_cached(
            "UPDATE webhook_deliveries SET status = $2, \
             last_error = COALESCE($3, last_error), next_attempt_at = $4, \
             delivered_at = COALESCE($5, delivered_at) WHERE id = $1 AND attempts = $6",
        )
        .await?;
    client
        .execute(
            &statement,
            &[&id, &status, &error, &next, &delivered, &attempt],
        )
        .await?;
    Ok(())
}

pub(super) async fn list(
    store: &PostgresStore,
    filter: DeliveryFilter,
    page: Page<Uuid>,
) -> Result<Vec<Delivery>, Failure> {
    let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let mut sql = format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d \
         JOIN webhook_events e ON e.id = d.event_id WHERE TRUE"
    );
    if let Some(status) = filter.status {
        args.push(Box::new(status.as_str()));
        sql += &format!(" AND d.status = ${}", args.len());
    }
    if let Some(event) = filter.event {
        args.push(Box::new(event.as_str()));
        sql += &format!(" AND e.type = ${}", args.len());
    }
    if let Some(after) = page.after {
        args.push(Box::new(after));
        sql += &format!(" AND d.id < ${}", args.len());
    }
    args.push(Box::new(i64::from(page.limit)));
    sql += &format!(" ORDER BY d.id DESC LIMIT ${}", args.len());
    let params: Vec<&(dyn ToSql + Sync)> = args
        .iter()
        .map(|arg| arg.as_ref() as &(dyn ToSql + Sync))
        .collect();
    let client = store.client().await?;
    let statement = client.prepare_cached(&sql).await?;
    decode_all(&client.query(&statement, &params).await?, delivery_row)
}

pub(super) async fn one(store: &PostgresStore, id: Uuid) -> Result<Option<Delivery>, Failure> {
    let client = store.client().await?;
    let statement = client
        .prepare_cached(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d \
             JOIN webhook_events e ON e.id = d.event_id WHERE d.id = $1"
        ))
        .await?;
    client
        .query_opt(&statement, &[&id])
        .await?
        .as_ref()
        .map(delivery_row)
        .transpose()
}

pub(super) async fn pending(store: &PostgresStore) -> Result<u64, Failure> {
    let client = store.client().await?;
    let statement = client
        .prepare_cached("SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'")
        .await?;
    let count: i64 = get(&client.query_one(&statement, &[]).await?, 0)?;
    Ok(u64::try_from(count).unwrap_or(0))
}

pub(super) async fn dedups(
    store: &PostgresStore,
    since: OffsetDateTime,
) -> Result<Vec<String>, Failure> {
    let client = store.client().await?;
    let statement = client
        .prepare_cached("SELECT dedup FROM webhook_events WHERE created_at >= $1")
        .await?;
    let rows = client.query(&statement, &[&since]).await?;
    rows.iter().map(|row| get(row, 0)).collect()
}

pub(super) async fn expiring_keys(
    store: &PostgresStore,
    now: OffsetDateTime,
    until: OffsetDateTime,
) -> Result<Vec<ExpiringKey>, Failure> {
    let client = store.client().await?;
    let statement = client
        .prepare_cached(
            "SELECT k.id, k.prefix, k.customer_id, c.name, k.expires_at \
             FROM api_keys k JOIN customers c ON c.id = k.customer_id \
             WHERE k.revoked_at IS NULL AND k.expires_at > $1 AND k.expires_at <= $2 \
             AND NOT EXISTS (SELECT 1 FROM api_keys n \
                 WHERE n.family_id = k.family_id AND n.id > k.id) \
             ORDER BY k.expires_at, k.id",
        )
        .await?;
    let rows = client.query(&statement, &[&now, &until]).await?;
    decode_all(&rows, |row| {
        Ok(ExpiringKey {
            key_id: KeyId(get(row, 0)?),
            prefix: get(row, 1)?,
            customer_id: CustomerId(get(row, 2)?),
            customer: get(row, 3)?,
            expires_at: get(row, 4)?,
        })
    })
}
