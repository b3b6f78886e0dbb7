//! The webhooks page: recent deliveries, newest first, a page at a time,
//! filtered by status and event (query parameters, so every view has its
//! own URL); retry one now.

use askama::Template;
use bytes::Bytes;
use http::{Response, StatusCode};
use tollgate_accounts::{DeliveriesRequest, DeliveryView};
use tollgate_metering::webhooks::{DeliveryStatus, EventType};

use crate::pages::{html, param, utc};
use crate::session::Session;
use crate::ConsoleParts;

/// Deliveries on a page.
const PAGE: u32 = 50;

/// A delivery as a row of the table.
pub(crate) struct DeliveryRow {
    pub(crate) id: String,
    pub(crate) event_id: String,
    pub(crate) event: String,
    pub(crate) url: String,
    /// The URL in pieces a line may break after: the scheme, then each
    /// path segment.
    pub(crate) url_parts: Vec<String>,
    /// `pending`, `delivered` or `failed`: also the badge's class.
    pub(crate) status: &'static str,
    pub(crate) attempts: u32,
    pub(crate) last_error: String,
    pub(crate) created: String,
    /// When a pending delivery is next attempted; empty once settled.
    pub(crate) next_attempt: String,
    /// When it was delivered; empty until then.
    pub(crate) delivered: String,
}

impl DeliveryRow {
    fn of(delivery: &DeliveryView) -> DeliveryRow {
        DeliveryRow {
            id: delivery.id.to_string(),
            event_id: delivery.event_id.to_string(),
            event: delivery.event.clone(),
            url: delivery.url.clone(),
            url_parts: url_parts(&delivery.url),
            status: delivery.status.as_str(),
            attempts: delivery.attempts,
            last_error: delivery.last_error.clone().unwrap_or_default(),
            created: utc(delivery.created_at),
            next_attempt: delivery.next_attempt_at.map(utc).unwrap_or_default(),
            delivered: delivery.delivered_at.map(utc).unwrap_or_default(),
        }
    }
}

/// `https://h.example/a/b` as `https://`, `h.example/`, `a/`, `b`.
fn url_parts(url: &str) -> Vec<String> {
    let (scheme, rest) = match url.find("://") {
        Some(at) => url.split_at(at + 3),
        None => ("", url),
    };
    let mut parts = vec![scheme.to_owned()];
    parts.extend(rest.split_inclusive('/').map(str::to_owned));
    parts.retain(|part| !part.is_empty());
    parts
}

#[derive(Template)]
#[template(path = "webhooks.html")]
struct WebhooksPage<'a> {
    csrf: &'a str,
    status: String,
    event: String,
    cursor: String,
    statuses: [(&'static str, &'static str); 4],
    events: Vec<&'static str>,
    rows: Vec<DeliveryRow>,
    /// The query of the next page.
    next: Option<String>,
    filtered: bool,
    notice: Option<String>,
    error: Option<String>,
}

/// The view a query asks for: `status`, `event` and `cursor`.
struct View {
    status: String,
    event: String,
    cursor: String,
}

impl View {
    fn of(get: impl Fn(&str) -> Option<String>) -> View {
        View {
            status: get("status").unwrap_or_default(),
            event: get("event").unwrap_or_default(),
            cursor: get("cursor").unwrap_or_default(),
        }
    }

    /// The query of this view at `cursor` (the filters first, empty ones
    /// left out, so a view has one URL).
    fn query(&self, cursor: &str) -> String {
        let pairs = [
            ("status", self.status.as_str()),
            ("event", self.event.as_str()),
            ("cursor", cursor),
        ];
        let pairs: Vec<_> = pairs
            .into_iter()
            .filter(|(_, value)| !value.is_empty())
            .collect();
        serde_urlencoded::to_string(pairs).unwrap_or_default()
    }
}

fn text(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}

/// `/console/webhooks`: the deliveries of a view.
pub(crate) async fn webhooks(
    parts: &ConsoleParts,
    session: &Session,
    query: &str,
    notice: Option<String>,
    error: Option<String>,
) -> Response<Bytes> {
    let view = View::of(|name| param(query, name));
    let mut page = WebhooksPage {
        csrf: &session.csrf,
        status: view.status.clone(),
        event: view.event.clone(),
        cursor: view.cursor.clone(),
        statuses: [
            ("", "any"),
            (DeliveryStatus::Pending.as_str(), "pending"),
            (DeliveryStatus::Delivered.as_str(), "delivered"),
            (DeliveryStatus::Failed.as_str(), "failed"),
        ],
        events: EventType::ALL.map(EventType::as_str).to_vec(),
        rows: Vec::new(),
        next: None,
        filtered: !view.status.is_empty() || !view.event.is_empty(),
        notice,
        error,
    };
    let request = DeliveriesRequest {
        status: text(&view.status),
        event: text(&view.event),
        limit: Some(PAGE),
        cursor: text(&view.cursor),
    };
    match parts.deliveries.list(&request).await {
        Ok((deliveries, next)) => {
            page.rows = deliveries.iter().map(DeliveryRow::of).collect();
            page.next = next.map(|next| view.query(&next));
        }
        Err(error) => {
            page.error.get_or_insert(error.to_string());
        }
    }
    html(StatusCode::OK, page.render())
}

/// `POST /console/webhooks/deliveries/{id}/retry`: one attempt now, then
/// the same view (the form carries its filters and cursor) saying how it
/// went.
pub(crate) async fn retry(
    parts: &ConsoleParts,
    session: &Session,
    id: &str,
    form: &[(String, String)],
) -> Response<Bytes> {
    let view = View::of(|name| crate::field(form, name).and_then(text));
    let query = view.query(&view.cursor);
    let (notice, error) = match parts.deliveries.retry(id).await {
        Ok(delivery) => outcome(&delivery),
        Err(error) => (None, Some(format!("Could not retry the delivery: {error}"))),
    };
    webhooks(parts, session, &query, notice, error).await
}

/// What a retry did: a notice when it was delivered, else an error.
fn outcome(delivery: &DeliveryView) -> (Option<String>, Option<String>) {
    let what = format!("{} to {}", delivery.event, delivery.url);
    if delivery.status == DeliveryStatus::Delivered {
        return (Some(format!("Delivered {what}.")), None);
    }
    let why = delivery.last_error.as_deref().unwrap_or("no answer");
    let then = match delivery.next_attempt_at {
        Some(at) => format!("next attempt {} UTC", utc(at)),
        None => "no more attempts".to_owned(),
    };
    (
        None,
        Some(format!("The retry of {what} failed: {why}; {then}.")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_breaks_after_its_scheme_and_each_slash() {
        assert_eq!(
            url_parts("https://hooks.example/tollgate/billing"),
            ["https://", "hooks.example/", "tollgate/", "billing"]
        );
        assert_eq!(url_parts("odd"), ["odd"]);
        assert_eq!(url_parts("http://h/").concat(), "http://h/");
    }
}
