//! Webhook events as the store keeps them: the durable outbox. An event is
//! recorded once, under a `dedup` text that names what it is about (the
//! database's uniqueness on it is what makes an event fire exactly once
//! across instances and restarts), with one delivery per subscribed
//! endpoint. Senders claim due deliveries, attempt them, and settle them.
//! The sending itself (HTTP, signing, back-off) is the proxy crate's.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::keys::ids::{CustomerId, KeyId};
use crate::store::{Page, StoreError};

/// The events a webhook endpoint may subscribe to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    QuotaThreshold,
    QuotaExhausted,
    KeyExpiring,
    BillingPeriodClosed,
}

impl EventType {
    pub const ALL: [EventType; 4] = [
        EventType::QuotaThreshold,
        EventType::QuotaExhausted,
        EventType::KeyExpiring,
        EventType::BillingPeriodClosed,
    ];

    /// The `type` field, e.g. `quota.threshold`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::QuotaThreshold => "quota.threshold",
            EventType::QuotaExhausted => "quota.exhausted",
            EventType::KeyExpiring => "key.expiring",
            EventType::BillingPeriodClosed => "billing.period_closed",
        }
    }

    pub fn parse(text: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == text)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    /// Its `webhook-id`: the same on every attempt.
    pub id: Uuid,
    pub event_type: EventType,
    /// What the event is about; a second event with the same text is not
    /// recorded.
    pub dedup: String,
    /// The JSON body, exactly as it is sent and signed.
    pub body: String,
    pub created_at: OffsetDateTime,
}

/// Where a delivery stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Not delivered yet; due at `next_attempt_at`.
    Pending,
    /// Answered 2xx.
    Delivered,
    /// Given up after 24 hours of attempts.
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<DeliveryStatus> {
        [
            DeliveryStatus::Pending,
            DeliveryStatus::Delivered,
            DeliveryStatus::Failed,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

/// One event's delivery to one endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub id: Uuid,
    pub event_id: Uuid,
    /// The event's type as stored.
    pub event: String,
    pub url: String,
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// When the event was recorded.
    pub created_at: OffsetDateTime,
    /// When a pending delivery is next due (a claimed one: when its claim
    /// runs out); `None` once settled for good.
    pub next_attempt_at: Option<OffsetDateTime>,
    pub delivered_at: Option<OffsetDateTime>,
}

/// A delivery claimed for an attempt, with the body to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claimed {
    pub delivery: Delivery,
    pub body: String,
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settlement {
    Delivered {
        at: OffsetDateTime,
    },
    /// Failed; due again at `next_attempt_at`.
    Retry {
        error: String,
        next_attempt_at: OffsetDateTime,
    },
    /// Failed, and the delivery is given up.
    Failed {
        error: String,
    },
}

/// Which deliveries to list.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeliveryFilter {
    pub status: Option<DeliveryStatus>,
    pub event: Option<EventType>,
}

/// A key that will soon expire, for `key.expiring`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpiringKey {
    pub key_id: KeyId,
    pub prefix: String,
    pub customer_id: CustomerId,
    pub customer: String,
    pub expires_at: OffsetDateTime,
}

/// The webhook outbox a backend stores.
#[async_trait]
pub trait WebhookOutbox: Send + Sync + 'static {
    /// Records `event` with a pending delivery to each of `urls`, due at
    /// once, in one transaction; nothing when an event with the same
    /// `dedup` exists (from any process). Returns whether it was new.
    async fn record_event(&self, event: &NewEvent, urls: &[String]) -> Result<bool, StoreError>;

    /// Claims up to `limit` pending deliveries due at `now`, oldest due
    /// first, skipping any another sender holds: each gets one more
    /// attempt counted and is due again at `now + lease` (so a sender that
    /// dies mid-attempt leaves it to be claimed again). Deliveries to the
    /// URLs in `skip` are left for a later claim.
    async fn claim_deliveries(
        &self,
        now: OffsetDateTime,
        lease: Duration,
        limit: u32,
        skip: &[String],
    ) -> Result<Vec<Claimed>, StoreError>;

    /// Claims one delivery, whatever its status (an operator's retry), as
    /// [`WebhookOutbox::claim_deliveries`] does; `None` if there is none.
    async fn claim_delivery(
        &self,
        id: Uuid,
        now: OffsetDateTime,
        lease: Duration,
    ) -> Result<Option<Claimed>, StoreError>;

    /// Records how an attempt ended: the one its claim counted as
    /// `attempt`. Nothing changes when the delivery has been claimed again
    /// since (a claim that ran out while its attempt went on): the later
    /// claim settles it.
    async fn settle_delivery(
        &self,
        id: Uuid,
        attempt: u32,
        settlement: &Settlement,
    ) -> Result<(), StoreError>;

    /// Newest first: ids strictly before `page.after`.
    async fn deliveries(
        &self,
        filter: DeliveryFilter,
        page: Page<Uuid>,
    ) -> Result<Vec<Delivery>, StoreError>;

    async fn delivery(&self, id: Uuid) -> Result<Option<Delivery>, StoreError>;

    /// Deliveries neither delivered nor given up.
    async fn pending_deliveries(&self) -> Result<u64, StoreError>;

    /// The `dedup` of every event recorded at or after `since`.
    async fn event_dedups(&self, since: OffsetDateTime) -> Result<Vec<String>, StoreError>;

    /// Keys that are active at `now` and expire at or before `until`:
    /// neither revoked nor replaced by a rotation (a newer key in their
    /// family).
    async fn expiring_keys(
        &self,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<Vec<ExpiringKey>, StoreError>;
}
