//! Webhook deliveries as operators see them, and the two things the
//! operators' side asks of the webhook machinery (which lives with the
//! gateway): list and retry deliveries ([`Deliveries`]), and record a
//! closed billing period ([`BillingEvents`]).

use async_trait::async_trait;
use serde::Serialize;
use time::OffsetDateTime;
use tollgate_metering::webhooks::{Delivery, DeliveryFilter, DeliveryStatus, EventType};
use tollgate_metering::StoreError;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::accounts::{next_cursor, page_limit, parse_cursor, AccountError};
use crate::reports::BillingSummary;

/// One event's delivery to one endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct DeliveryView {
    pub id: Uuid,
    /// The `webhook-id` header: the same on every attempt.
    pub event_id: Uuid,
    /// `quota.threshold`, `quota.exhausted`, `key.expiring` or
    /// `billing.period_closed`.
    pub event: String,
    pub url: String,
    /// `pending`, `delivered` or `failed` (given up after 24 hours).
    #[schema(value_type = String, pattern = "^(pending|delivered|failed)$")]
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub last_error: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When a pending delivery is next attempted; `null` once settled.
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub delivered_at: Option<OffsetDateTime>,
}

impl From<Delivery> for DeliveryView {
    fn from(delivery: Delivery) -> DeliveryView {
        DeliveryView {
            id: delivery.id,
            event_id: delivery.event_id,
            event: delivery.event,
            url: delivery.url,
            status: delivery.status,
            attempts: delivery.attempts,
            last_error: delivery.last_error,
            created_at: delivery.created_at,
            next_attempt_at: delivery.next_attempt_at,
            delivered_at: delivery.delivered_at,
        }
    }
}

/// Which deliveries to list, as asked for (`?status=&event=&limit=&cursor=`).
#[derive(Clone, Debug, Default)]
pub struct DeliveriesRequest {
    pub status: Option<String>,
    pub event: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

impl DeliveriesRequest {
    /// The filter, the page size and the cursor, checked.
    pub fn parse(&self) -> Result<(DeliveryFilter, u32, Option<Uuid>), AccountError> {
        let status = self
            .status
            .as_deref()
            .map(|text| {
                DeliveryStatus::parse(text).ok_or_else(|| {
                    AccountError::invalid("status", "expected pending, delivered or failed")
                })
            })
            .transpose()?;
        let event = self
            .event
            .as_deref()
            .map(|text| {
                EventType::parse(text).ok_or_else(|| {
                    AccountError::invalid(
                        "event",
                        format!(
                            "expected one of {}",
                            EventType::ALL.map(EventType::as_str).join(", ")
                        ),
                    )
                })
            })
            .transpose()?;
        Ok((
            DeliveryFilter { status, event },
            page_limit(self.limit)?,
            parse_cursor(self.cursor.as_deref())?,
        ))
    }
}

/// A page of deliveries, newest first, and the cursor of the next.
pub fn delivery_page(deliveries: Vec<Delivery>, limit: u32) -> (Vec<DeliveryView>, Option<String>) {
    let next = next_cursor(&deliveries, limit, |d| d.id.to_string());
    (
        deliveries.into_iter().map(DeliveryView::from).collect(),
        next,
    )
}

/// Listing and retrying deliveries.
#[async_trait]
pub trait Deliveries: Send + Sync {
    /// Newest first.
    async fn list(
        &self,
        request: &DeliveriesRequest,
    ) -> Result<(Vec<DeliveryView>, Option<String>), AccountError>;

    /// Attempts one delivery now, whatever its status, with its
    /// `webhook-id`; the delivery after the attempt.
    async fn retry(&self, id: &str) -> Result<DeliveryView, AccountError>;
}

/// Where a closed billing period is announced.
#[async_trait]
pub trait BillingEvents: Send + Sync {
    /// `billing.period_closed` for `summary`: recorded once per period,
    /// however often it is called.
    async fn period_closed(&self, summary: &BillingSummary) -> Result<(), StoreError>;
}

/// The id of a delivery in a path.
pub fn delivery_id(id: &str) -> Result<Uuid, AccountError> {
    Uuid::parse_str(id).map_err(|_| AccountError::NotFound(format!("delivery {id:?}")))
}
