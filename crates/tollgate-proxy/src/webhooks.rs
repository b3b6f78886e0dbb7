//! Webhooks: events recorded in the database's outbox, then delivered to
//! the configured endpoints, signed per Standard Webhooks.
//!
//! - [`Outbox`] records an event (once: the database's uniqueness on what
//!   the event is about decides) with a delivery per subscribed endpoint.
//!   The gateway, the admin API and the CLI record through it.
//! - [`Webhooks::start`] runs the two background tasks of a gateway: one
//!   turns the limiter's alerts (alert fractions reached, limits that
//!   refused a request) and soon-expiring keys into events; the other
//!   claims due deliveries (any instance may: claims skip what another
//!   holds) and sends them, retrying with exponential back-off for 24
//!   hours.
//!
//! # Failure behaviour
//! Nothing here is on the request path: a dead or slow endpoint costs a
//! delivery task's time, never a client's, and memory holds at most one
//! claimed batch. An attempt that gets no 2xx within [`ATTEMPT_TIMEOUT`] is
//! retried after 10 s, 20 s, 40 s … (at most an hour apart) until 24 hours
//! after the event, then marked `failed`. A gateway that stops mid-attempt
//! leaves the delivery claimed for [`LEASE`]; then any instance takes it
//! again, with the same `webhook-id`. While the database is down, events
//! wait in the limiter's memory (unmarked) and are recorded when it returns.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use ring::hmac;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tollgate_accounts::{
    delivery_id, delivery_page, AccountError, BillingEvents, BillingSummary, Deliveries,
    DeliveriesRequest, DeliveryView,
};
use tollgate_metering::keys::Page;
use tollgate_metering::limits::{LimitAlert, Limiter, MonthlyLimit, Period, Policies};
use tollgate_metering::usage::format_usd;
use tollgate_metering::webhooks::{Claimed, Delivery, EventType, NewEvent, Settlement};
use tollgate_metering::{Store, StoreError};
use uuid::Uuid;

use crate::metrics::{Metrics, WebhookMetrics};

/// The longest an attempt waits for the endpoint's answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a claimed delivery stays claimed: past an attempt's timeout,
/// so that only a sender that died (or was stopped) leaves it due again.
const LEASE: Duration = Duration::from_secs(15);
/// How long deliveries are retried, from the event.
const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);
const FIRST_RETRY: Duration = Duration::from_secs(10);
const MAX_RETRY: Duration = Duration::from_secs(3600);
/// Attempts in flight at once per instance.
const IN_FLIGHT: usize = 64;
/// Attempts in flight to one endpoint at which no more are claimed for
/// it: an endpoint that hangs holds at most twice this less one, and the
/// others' deliveries go on past it. Also the most one claim takes, which
/// is what keeps it under twice.
const PER_ENDPOINT: usize = 8;
/// How often due deliveries are looked for when nothing wakes the sender
/// (events recorded by another instance, retries coming due).
const POLL: Duration = Duration::from_secs(1);
/// How often the limiter is asked for alerts.
const ALERT_SCAN: Duration = Duration::from_millis(250);
/// How often keys about to expire are looked for.
const EXPIRY_SCAN: Duration = Duration::from_secs(20);
/// `key.expiring` fires this long before a key's expiry.
const EXPIRY_NOTICE: Duration = Duration::from_secs(7 * 24 * 3600);
/// An answer's body is read up to this much (to keep the connection), then
/// dropped.
const MAX_ANSWER: usize = 64 * 1024;

/// One `[[webhooks]]` endpoint.
#[derive(Clone)]
pub struct WebhookEndpoint {
    pub url: String,
    key: hmac::Key,
    pub events: Vec<EventType>,
}

impl std::fmt::Debug for WebhookEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookEndpoint")
            .field("url", &self.url)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl WebhookEndpoint {
    /// `secret` is `whsec_` and the base64 of the signing key; `None` when
    /// it is not (the config's validation refuses such a secret first).
    pub fn new(url: String, secret: &str, events: Vec<EventType>) -> Option<WebhookEndpoint> {
        let key = base64::engine::general_purpose::STANDARD
            .decode(secret.strip_prefix("whsec_")?)
            .ok()?;
        Some(WebhookEndpoint {
            url,
            key: hmac::Key::new(hmac::HMAC_SHA256, &key),
            events,
        })
    }

    /// `webhook-signature`: `v1,` and the base64 of HMAC-SHA256 over
    /// `{id}.{timestamp}.{body}`.
    fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut context = hmac::Context::with_key(&self.key);
        context.update(id.as_bytes());
        context.update(b".");
        context.update(timestamp.to_string().as_bytes());
        context.update(b".");
        context.update(body);
        let tag = context.sign();
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
        )
    }
}

/// Records events, each with a delivery per subscribed endpoint.
pub struct Outbox {
    store: Arc<dyn Store>,
    endpoints: ArcSwap<Vec<WebhookEndpoint>>,
    /// Woken when this process records an event, so it is sent at once.
    recorded: Notify,
}

impl Outbox {
    pub fn new(store: Arc<dyn Store>, endpoints: Vec<WebhookEndpoint>) -> Outbox {
        Outbox {
            store,
            endpoints: ArcSwap::from_pointee(endpoints),
            recorded: Notify::new(),
        }
    }

    /// Replaces the endpoints (a config reload). Deliveries already
    /// recorded keep their URL; one whose endpoint is gone fails at its
    /// next attempt.
    pub fn set_endpoints(&self, endpoints: Vec<WebhookEndpoint>) {
        self.endpoints.store(Arc::new(endpoints));
    }

    fn subscribed(&self, event: EventType) -> Vec<String> {
        self.endpoints
            .load()
            .iter()
            .filter(|endpoint| endpoint.events.contains(&event))
            .map(|endpoint| endpoint.url.clone())
            .collect()
    }

    fn wants(&self, event: EventType) -> bool {
        self.endpoints
            .load()
            .iter()
            .any(|endpoint| endpoint.events.contains(&event))
    }

    /// Records an event about `dedup` (nothing when one exists already, or
    /// no endpoint subscribes). Returns whether it was recorded now.
    pub(crate) async fn record(
        &self,
        event_type: EventType,
        dedup: String,
        data: Value,
    ) -> Result<bool, StoreError> {
        let urls = self.subscribed(event_type);
        if urls.is_empty() {
            return Ok(false);
        }
        let now = OffsetDateTime::now_utc();
        let body = json!({
            "type": event_type.as_str(),
            "timestamp": now.format(&Rfc3339).unwrap_or_default(),
            "data": data,
        });
        let event = NewEvent {
            id: Uuid::now_v7(),
            event_type,
            dedup,
            body: body.to_string(),
            created_at: now,
        };
        let recorded = self.store.record_event(&event, &urls).await?;
        if recorded {
            self.recorded.notify_one();
        }
        Ok(recorded)
    }
}

#[async_trait]
impl BillingEvents for Outbox {
    async fn period_closed(&self, summary: &BillingSummary) -> Result<(), StoreError> {
        self.record(
            EventType::BillingPeriodClosed,
            format!("billing.period_closed:{}", summary.period),
            json!({
                "period": summary.period,
                "total_usd": summary.total_usd,
                "customers": summary.data.len(),
            }),
        )
        .await
        .map(drop)
    }
}

#[async_trait]
impl Deliveries for Webhooks {
    async fn list(
        &self,
        request: &DeliveriesRequest,
    ) -> Result<(Vec<DeliveryView>, Option<String>), AccountError> {
        let (filter, limit, after) = request.parse()?;
        let found = self
            .outbox
            .store
            .deliveries(filter, Page { after, limit })
            .await?;
        Ok(delivery_page(found, limit))
    }

    async fn retry(&self, id: &str) -> Result<DeliveryView, AccountError> {
        let uuid = delivery_id(id)?;
        self.retry_now(uuid)
            .await?
            .map(DeliveryView::from)
            .ok_or_else(|| AccountError::NotFound(format!("delivery {id:?}")))
    }
}

/// A gateway's webhook machinery: the outbox, the sender and the scans
/// that feed it.
pub struct Webhooks {
    outbox: Arc<Outbox>,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    metrics: WebhookMetrics,
    /// `key.expiring` events recorded by this process (saves asking the
    /// database again every scan).
    expiring_seen: Mutex<HashSet<String>>,
    /// The events recorded this month before the first alert scan, read
    /// once by it. After a start the limiter owes every alert crossed this
    /// month; those found here are only marked, not recorded again one
    /// transaction each (which at tens of thousands of customers held up
    /// new alerts for minutes).
    recorded_before: tokio::sync::Mutex<FirstScan>,
}

impl Webhooks {
    pub fn new(outbox: Arc<Outbox>, metrics: &Metrics) -> Result<Webhooks, rustls::Error> {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(crate::forward::default_connector()?);
        Ok(Webhooks {
            outbox,
            client,
            metrics: metrics.webhook_metrics(),
            expiring_seen: Mutex::new(HashSet::new()),
            recorded_before: tokio::sync::Mutex::new(FirstScan::Unread),
        })
    }

    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// Starts the scans and the sender; both run until aborted.
    pub fn start(self: &Arc<Self>, policies: Arc<Policies>) -> Vec<JoinHandle<()>> {
        let scans = {
            let this = self.clone();
            tokio::spawn(async move { this.run_scans(&policies).await })
        };
        let sender = {
            let this = self.clone();
            tokio::spawn(async move { this.run_sender().await })
        };
        vec![scans, sender]
    }

    async fn run_scans(&self, policies: &Policies) {
        let mut alerts = tokio::time::interval(ALERT_SCAN);
        alerts.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut expiry = tokio::time::interval(EXPIRY_SCAN);
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = alerts.tick() => self.record_alerts(policies.limiter(), policies).await,
                _ = expiry.tick() => self.record_expiring_keys().await,
            }
        }
    }

    /// Records the limiter's alerts; each is marked once recorded (or once
    /// known to exist), so a database outage only delays them.
    async fn record_alerts(&self, limiter: &Arc<Limiter>, policies: &Policies) {
        let wanted = [EventType::QuotaThreshold, EventType::QuotaExhausted];
        if !wanted.iter().any(|&event| self.outbox.wants(event)) {
            return;
        }
        // The scan reads every customer's counters (about 2 ms at 100,000
        // customers, four times a second): on the blocking pool, not on a
        // data-plane worker, where it would hold up that worker's requests.
        let scan = Arc::clone(limiter);
        let Ok(found) = tokio::task::spawn_blocking(move || scan.alerts()).await else {
            return;
        };
        let mut recorded_before = self.recorded_before.lock().await;
        if matches!(*recorded_before, FirstScan::Unread) && !found.is_empty() {
            // From a day early: an instance whose clock runs behind may
            // have recorded one of this month's events "last month".
            let since =
                Period::containing(OffsetDateTime::now_utc()).start() - time::Duration::days(1);
            if let Ok(dedups) = self.outbox.store.event_dedups(since).await {
                *recorded_before = FirstScan::Read(dedups.into_iter().collect());
            }
        }
        for alert in found {
            let event = match alert.threshold {
                Some(_) => EventType::QuotaThreshold,
                None => EventType::QuotaExhausted,
            };
            if !self.outbox.wants(event) {
                limiter.alerted(&alert);
                continue;
            }
            // A customer not loaded yet is asked about again next scan.
            let Some(customer) = policies.customer(alert.customer) else {
                continue;
            };
            let (dedup, data) = alert_event(&alert, &customer.name);
            if matches!(&*recorded_before, FirstScan::Read(recorded) if recorded.contains(&dedup)) {
                limiter.alerted(&alert);
                continue;
            }
            match self.outbox.record(event, dedup, data).await {
                Ok(_) => limiter.alerted(&alert),
                Err(error) => {
                    tracing::warn!(
                        message = "Cannot record a webhook event; retrying.",
                        event = event.as_str(),
                        %error
                    );
                    return;
                }
            }
        }
        // Gone through once: what start-up owed is marked.
        *recorded_before = FirstScan::Done;
    }

    async fn record_expiring_keys(&self) {
        if !self.outbox.wants(EventType::KeyExpiring) {
            return;
        }
        let now = OffsetDateTime::now_utc();
        let until = now + EXPIRY_NOTICE;
        let keys = match self.outbox.store.expiring_keys(now, until).await {
            Ok(keys) => keys,
            Err(error) => {
                tracing::warn!(message = "Cannot look for expiring keys; retrying.", %error);
                return;
            }
        };
        for key in keys {
            let expires_at = key.expires_at.format(&Rfc3339).unwrap_or_default();
            let dedup = format!("key.expiring:{}:{expires_at}", key.key_id);
            if self.seen(&dedup) {
                continue;
            }
            let data = json!({
                "key_id": key.key_id.to_string(),
                "prefix": key.prefix,
                "customer_id": key.customer_id.to_string(),
                "customer": key.customer,
                "expires_at": expires_at,
            });
            match self
                .outbox
                .record(EventType::KeyExpiring, dedup.clone(), data)
                .await
            {
                Ok(_) => self.remember(dedup),
                Err(error) => {
                    tracing::warn!(message = "Cannot record a webhook event; retrying.", event = "key.expiring", %error);
                    return;
                }
            }
        }
    }

    fn seen(&self, dedup: &str) -> bool {
        self.expiring_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(dedup)
    }

    /// Remembers a recorded `key.expiring`; the set starts over past
    /// 100,000 entries (the database still refuses a second event).
    fn remember(&self, dedup: String) {
        let mut seen = self.expiring_seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= 100_000 {
            seen.clear();
        }
        seen.insert(dedup);
    }

    /// Keeps up to [`IN_FLIGHT`] attempts going, at most [`PER_ENDPOINT`]
    /// to any one endpoint, claiming more as each one ends: a slow or dead
    /// endpoint takes its own slots for as long as its attempts last, and
    /// every other endpoint's deliveries go out meanwhile.
    async fn run_sender(&self) {
        let mut attempts = Attempts::default();
        let mut pending_at = tokio::time::Instant::now();
        loop {
            if let Err(error) = self.claim_more(&mut attempts).await {
                tracing::warn!(message = "Cannot claim webhook deliveries; retrying.", %error);
            }
            if tokio::time::Instant::now() >= pending_at {
                if let Ok(pending) = self.outbox.store.pending_deliveries().await {
                    self.metrics.set_pending(pending);
                }
                pending_at = tokio::time::Instant::now() + Duration::from_secs(5);
            }
            tokio::select! {
                Some(ended) = attempts.next() => {
                    if let Some((id, attempt, settlement)) = ended {
                        self.settle(id, attempt, &settlement).await;
                    }
                }
                () = self.outbox.recorded.notified() => {}
                () = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// Claims due deliveries into the free slots and starts their attempts.
    async fn claim_more(&self, attempts: &mut Attempts) -> Result<(), StoreError> {
        loop {
            let free = IN_FLIGHT
                .saturating_sub(attempts.running.len())
                .min(PER_ENDPOINT);
            if free == 0 {
                return Ok(());
            }
            let claimed = self
                .outbox
                .store
                .claim_deliveries(
                    OffsetDateTime::now_utc(),
                    LEASE,
                    free as u32,
                    &attempts.full(),
                )
                .await?;
            let more = claimed.len() == free;
            for delivery in claimed {
                attempts.start(&delivery, self.attempt(&delivery));
            }
            if !more {
                return Ok(());
            }
        }
    }

    /// Records an attempt's outcome. One that cannot be recorded (the
    /// database down) is attempted again once its claim runs out.
    async fn settle(&self, id: Uuid, attempt: u32, settlement: &Settlement) {
        if let Err(error) = self
            .outbox
            .store
            .settle_delivery(id, attempt, settlement)
            .await
        {
            tracing::warn!(
                message = "Cannot record a webhook delivery's outcome; it is sent again once its claim runs out.",
                delivery = %id,
                %error
            );
        }
    }

    /// One attempt now, whatever the delivery's status; the delivery after
    /// it, `None` if unknown.
    async fn retry_now(&self, id: Uuid) -> Result<Option<Delivery>, StoreError> {
        let store = &self.outbox.store;
        let Some(claimed) = store
            .claim_delivery(id, OffsetDateTime::now_utc(), LEASE)
            .await?
        else {
            return Ok(None);
        };
        let settlement = self.attempt(&claimed).await;
        store
            .settle_delivery(id, claimed.delivery.attempts, &settlement)
            .await?;
        store.delivery(id).await
    }

    /// One attempt; what it means for the delivery.
    fn attempt(
        &self,
        claimed: &Claimed,
    ) -> impl std::future::Future<Output = Settlement> + Send + 'static {
        let endpoint = self
            .outbox
            .endpoints
            .load()
            .iter()
            .find(|endpoint| endpoint.url == claimed.delivery.url)
            .cloned();
        let client = self.client.clone();
        let metrics = self.metrics.clone();
        let delivery = claimed.delivery.clone();
        let body = claimed.body.clone();
        async move {
            let event = EventType::parse(&delivery.event);
            let outcome = match endpoint {
                None => Err("the endpoint is no longer configured".to_owned()),
                Some(endpoint) => send(&client, &endpoint, &delivery, body).await,
            };
            let now = OffsetDateTime::now_utc();
            if let Some(event) = event {
                metrics.attempted(event, outcome.is_ok());
            }
            match outcome {
                Ok(()) => Settlement::Delivered { at: now },
                Err(error) => {
                    tracing::warn!(
                        message = "Webhook delivery failed.",
                        url = delivery.url,
                        webhook_id = %delivery.event_id,
                        attempt = delivery.attempts,
                        error
                    );
                    next_attempt(&delivery, now, error)
                }
            }
        }
    }
}

/// What the first alert scan after a start knows of the events recorded
/// before it.
enum FirstScan {
    /// Not read yet (or the read failed: the next scan tries again).
    Unread,
    Read(HashSet<String>),
    /// A scan has gone through: nothing more to skip.
    Done,
}

/// The sender's attempts in flight, and how many go to each endpoint.
#[derive(Default)]
struct Attempts {
    running: JoinSet<(Uuid, u32, Settlement)>,
    urls: HashMap<tokio::task::Id, String>,
    per_url: HashMap<String, usize>,
}

impl Attempts {
    fn start(
        &mut self,
        claimed: &Claimed,
        attempt: impl std::future::Future<Output = Settlement> + Send + 'static,
    ) {
        let (id, count) = (claimed.delivery.id, claimed.delivery.attempts);
        let url = claimed.delivery.url.clone();
        let task = self
            .running
            .spawn(async move { (id, count, attempt.await) });
        *self.per_url.entry(url.clone()).or_default() += 1;
        self.urls.insert(task.id(), url);
    }

    /// The endpoints with all their slots taken.
    fn full(&self) -> Vec<String> {
        self.per_url
            .iter()
            .filter(|(_, &n)| n >= PER_ENDPOINT)
            .map(|(url, _)| url.clone())
            .collect()
    }

    /// The next attempt to end (`None` when none is running); its outcome,
    /// unless it panicked.
    async fn next(&mut self) -> Option<Option<(Uuid, u32, Settlement)>> {
        let (task, outcome) = match self.running.join_next_with_id().await? {
            Ok((task, outcome)) => (task, Some(outcome)),
            Err(error) => (error.id(), None),
        };
        if let Some(url) = self.urls.remove(&task) {
            if let Some(n) = self.per_url.get_mut(&url) {
                *n -= 1;
                if *n == 0 {
                    self.per_url.remove(&url);
                }
            }
        }
        Some(outcome)
    }
}

/// Sends one delivery; `Err` says why it failed.
async fn send(
    client: &Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    endpoint: &WebhookEndpoint,
    delivery: &Delivery,
    body: String,
) -> Result<(), String> {
    let id = delivery.event_id.to_string();
    let timestamp = OffsetDateTime::now_utc().unix_timestamp();
    let signature = endpoint.sign(&id, timestamp, body.as_bytes());
    let request = Request::builder()
        .method(Method::POST)
        .uri(&endpoint.url)
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            header::USER_AGENT,
            concat!("tollgate/", env!("CARGO_PKG_VERSION")),
        )
        .header("webhook-id", &id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(Full::new(Bytes::from(body)))
        .map_err(|error| format!("cannot build the request: {error}"))?;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|error| format!("request failed: {}", error_chain(&error)))?;
        let status = response.status();
        // Read a little of the answer so the connection can be reused;
        // the rest is dropped.
        let _ = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await;
        Ok::<StatusCode, String>(status)
    };
    match tokio::time::timeout(ATTEMPT_TIMEOUT, exchange).await {
        Err(_) => Err(format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs())),
        Ok(Err(error)) => Err(error),
        Ok(Ok(status)) if status.is_success() => Ok(()),
        Ok(Ok(status)) => Err(format!("answered HTTP {}", status.as_u16())),
    }
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// After a failed attempt (the `attempts`-th): the next one 10 s later,
/// doubling each time up to an hour, until 24 hours after the event; then
/// given up.
fn next_attempt(delivery: &Delivery, now: OffsetDateTime, error: String) -> Settlement {
    let deadline = delivery.created_at + GIVE_UP_AFTER;
    if now >= deadline {
        return Settlement::Failed { error };
    }
    let doublings = delivery.attempts.saturating_sub(1).min(16);
    let wait = FIRST_RETRY.saturating_mul(1 << doublings).min(MAX_RETRY);
    Settlement::Retry {
        error,
        next_attempt_at: (now + wait).min(deadline),
    }
}

/// The dedup text and `data` of a limit alert.
fn alert_event(alert: &LimitAlert, customer: &str) -> (String, Value) {
    let (subject, key_id) = match alert.key {
        None => (format!("customer:{}", alert.customer), Value::Null),
        Some(key) => (
            format!("key:{}", key.family),
            Value::String(key.newest.to_string()),
        ),
    };
    let amount = |value: u64| match alert.limit {
        MonthlyLimit::Cost => Value::String(format_usd(i64::try_from(value).unwrap_or(i64::MAX))),
        _ => Value::from(value),
    };
    let mut data = json!({
        "customer_id": alert.customer.to_string(),
        "customer": customer,
        "key_id": key_id,
        "limit": alert.limit.as_str(),
        "used": amount(alert.used),
        "limit_value": amount(alert.limit_value),
        "period": alert.period.to_string(),
    });
    let dedup = match alert.threshold {
        Some(millionths) => {
            data["threshold"] = json!(f64::from(millionths) / 1e6);
            format!(
                "quota.threshold:{subject}:{}:{millionths}:{}",
                alert.limit.as_str(),
                alert.period
            )
        }
        None => format!(
            "quota.exhausted:{subject}:{}:{}",
            alert.limit.as_str(),
            alert.period
        ),
    };
    (dedup, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn signatures_match_the_standard_webhooks_reference() {
        let endpoint = WebhookEndpoint::new(
            "http://example.test/".to_owned(),
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            EventType::ALL.to_vec(),
        )
        .unwrap();
        assert_eq!(
            endpoint.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert!(WebhookEndpoint::new("u".into(), "MfKQ9r8G", vec![]).is_none());
    }

    #[test]
    fn retries_double_from_ten_seconds_to_an_hour_and_stop_after_a_day() {
        let created = datetime!(2026-12-01 00:00 UTC);
        let delivery = |attempts| Delivery {
            id: Uuid::nil(),
            event_id: Uuid::nil(),
            event: "quota.threshold".into(),
            url: "http://example.test/".into(),
            status: tollgate_metering::webhooks::DeliveryStatus::Pending,
            attempts,
            last_error: None,
            created_at: created,
            next_attempt_at: None,
            delivered_at: None,
        };
        let wait = |attempts, now: OffsetDateTime| match next_attempt(
            &delivery(attempts),
            now,
            "x".into(),
        ) {
            Settlement::Retry {
                next_attempt_at, ..
            } => Some(next_attempt_at - now),
            _ => None,
        };
        let now = created + time::Duration::seconds(1);
        assert_eq!(wait(1, now), Some(time::Duration::seconds(10)));
        assert_eq!(wait(2, now), Some(time::Duration::seconds(20)));
        assert_eq!(wait(5, now), Some(time::Duration::seconds(160)));
        assert_eq!(wait(12, now), Some(time::Duration::hours(1)));
        assert_eq!(wait(u32::MAX, now), Some(time::Duration::hours(1)));
        let late = created + time::Duration::hours(23) + time::Duration::minutes(50);
        assert_eq!(
            wait(20, late),
            Some(time::Duration::minutes(10)),
            "the last try is at the deadline"
        );
        assert_eq!(
            wait(20, created + time::Duration::hours(24)),
            None,
            "given up"
        );
    }
}
