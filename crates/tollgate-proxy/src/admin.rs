//! The admin listener (README, Admin API): health and readiness, and under `/v1/` the
//! customer and key management API, behind bearer admin tokens.
//!
//! Handlers are thin: parse and validate the request, call
//! [`Accounts`], render. Every error has the gateway's JSON error shape.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_DISPOSITION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tollgate_accounts::{
    AccountError, Accounts, DeliveriesRequest, KeyLimitsView, KeyRequest, ReloadReport, MAX_PAGE,
};
use tollgate_accounts::{ReportParams, Reports, Scope};
use tollgate_console::{Answer, Console};
use tollgate_metering::billing::UsageGroup;
use tollgate_metering::keys::KeyUpdate;
use tollgate_metering::limits::Policies;
use tollgate_metering::StoreError;
use utoipa::{IntoParams, ToSchema};

use crate::body::{BoxError, ProxyBody};
use crate::csv::{csv_row, CSV_HEADER};
use crate::error::error_response;
use crate::events::{emit, AdminRequestFailed, ExportBrokenOff};
use crate::guesses::Guesses;
use crate::metrics::Metrics;
use crate::panic::catch_panic;
use crate::pipeline::ConnInfo;
use crate::quota::quota_document;

/// The largest admin request body accepted.
const MAX_ADMIN_BODY: usize = 1024 * 1024;
/// A console form's body at most (its largest field is a customer's
/// overrides): the console reads a body before it knows the session.
const MAX_CONSOLE_BODY: usize = 64 * 1024;
/// Longest an admin request's body may take to arrive, whole: a client
/// that sends part of one and stops cannot hold a connection (and its
/// buffer) of the admin listener, which health checks and scrapes need.
const ADMIN_BODY_DEADLINE: Duration = Duration::from_secs(10);
/// How long `/readyz?strict=true` waits for the database.
const STRICT_READY_TIMEOUT: Duration = Duration::from_secs(2);

/// What the admin endpoints need.
pub struct Admin {
    accounts: Arc<Accounts>,
    /// Customers' effective limits and counters (`/v1/quota`).
    policies: Arc<Policies>,
    /// Usage analytics and billing (`/v1/usage/*`, `/v1/billing/*`).
    reports: Arc<Reports>,
    /// BLAKE3 digests of the admin tokens: `blake3::Hash` equality is
    /// constant-time, so comparing digests leaks nothing about a token.
    tokens: Vec<blake3::Hash>,
    ready: AtomicBool,
    metrics: Arc<Metrics>,
    reloader: Arc<dyn Reload>,
    /// The operator console under `/console/`.
    console: Arc<Console>,
    /// Failed sign-ins (bearer tokens and the console's form) per address.
    guesses: Guesses,
}

/// Re-reads the config file (`POST /v1/reload`, as SIGHUP does).
pub trait Reload: Send + Sync {
    /// What changed, as the JSON document the endpoint answers with; or
    /// why nothing did (the running config is then untouched), answered
    /// as a 400 with the error's message.
    fn reload(&self) -> Result<ReloadReport, Box<dyn std::error::Error + Send + Sync>>;
}

/// An admin request that failed, rendered in one place.
#[derive(Debug)]
enum AdminError {
    Unauthorized,
    NotFound(String),
    Invalid(String),
    /// The body did not arrive within [`ADMIN_BODY_DEADLINE`].
    BodyTimeout,
    /// Too many failed sign-ins from this address; how long until the
    /// next attempt is taken.
    TooManyGuesses(Duration),
    /// With the methods the path takes, for the `Allow` header.
    MethodNotAllowed(String),
    DatabaseUnavailable,
    Internal(String),
}

impl AdminError {
    fn into_response(self) -> Response<ProxyBody> {
        match self {
            AdminError::Unauthorized => error_response(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "A valid admin token is required: `Authorization: Bearer <token>`.",
            ),
            AdminError::NotFound(what) => error_response(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("Not found: {what}."),
            ),
            AdminError::Invalid(message) => {
                error_response(StatusCode::BAD_REQUEST, "invalid_request", &message)
            }
            AdminError::TooManyGuesses(wait) => {
                let seconds = wait.as_secs().max(1);
                let mut response = error_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    &format!(
                        "Too many failed sign-ins from this address; try again in {seconds} seconds."
                    ),
                );
                response
                    .headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
                response
            }
            AdminError::BodyTimeout => {
                let mut response = error_response(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    &format!(
                        "The request body did not arrive within {} seconds.",
                        ADMIN_BODY_DEADLINE.as_secs()
                    ),
                );
                response
                    .headers_mut()
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
                response
            }
            AdminError::MethodNotAllowed(allow) => {
                let mut response = error_response(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "invalid_request",
                    "This method is not allowed on this path.",
                );
                if let Ok(allow) = HeaderValue::from_str(&allow) {
                    response.headers_mut().insert(http::header::ALLOW, allow);
                }
                response
            }
            AdminError::DatabaseUnavailable => error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "The database is unavailable; the change was not made. Retry later.",
            ),
            AdminError::Internal(message) => {
                emit(AdminRequestFailed { error: &message });
                error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "The request failed inside the gateway.",
                )
            }
        }
    }
}

impl From<AccountError> for AdminError {
    fn from(error: AccountError) -> Self {
        match error {
            AccountError::Invalid { field, message } => {
                AdminError::Invalid(format!("{field}: {message}"))
            }
            AccountError::NotFound(what) => AdminError::NotFound(what),
            AccountError::Store(error) => error.into(),
        }
    }
}

impl From<StoreError> for AdminError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(_) => AdminError::DatabaseUnavailable,
            StoreError::Conflict(message) => AdminError::Invalid(message),
            StoreError::NotFound(what) => AdminError::NotFound(what),
            StoreError::SchemaTooNew { .. } | StoreError::Config(_) | StoreError::Corrupt(_) => {
                AdminError::Internal(error.to_string())
            }
        }
    }
}

type AdminResult = Result<Response<ProxyBody>, AdminError>;

/// `POST /v1/customers`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateCustomer {
    /// Unique; 1 to 128 characters without control characters.
    #[schema(min_length = 1, max_length = 128)]
    name: String,
    /// A configured tier.
    tier: String,
    /// Limits over the tier's: `rate`, `monthly_requests`,
    /// `monthly_tokens`, `monthly_cost_usd`, `overage`,
    /// `overage_price_per_request_usd`.
    #[schema(value_type = Option<Object>)]
    overrides: Option<serde_json::Value>,
}

/// `PATCH /v1/customers/{customer}`: a field left out is left as it is.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PatchCustomer {
    tier: Option<String>,
    /// Replaces the customer's overrides (see `POST /v1/customers`).
    #[schema(value_type = Option<Object>)]
    overrides: Option<serde_json::Value>,
}

/// `POST /v1/keys`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateKey {
    /// The customer's id or name.
    customer: String,
    /// Creates the customer with this tier if it does not exist; for an
    /// existing customer it must equal its tier.
    tier: Option<String>,
    name: Option<String>,
    /// RFC 3339, in the future.
    #[serde(default, with = "time::serde::rfc3339::option")]
    expires_at: Option<OffsetDateTime>,
    /// Route names the key is limited to; left out, every route.
    routes: Option<Vec<String>>,
    /// The key's own limits, nested inside the customer's.
    #[serde(default, deserialize_with = "limits_object")]
    limits: Option<KeyLimitsView>,
}

/// `PATCH /v1/keys/{key}`: an absent field is left as it is, `null`
/// clears it.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PatchKey {
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    name: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Vec<String>>)]
    routes: Option<Option<Vec<String>>>,
    /// RFC 3339, in the future; `null` for no expiry.
    #[serde(default, deserialize_with = "present_time")]
    #[schema(value_type = Option<OffsetDateTime>)]
    expires_at: Option<Option<OffsetDateTime>>,
    /// Replaces the key's own limits (on every key of its rotation
    /// chain); `null` clears them.
    #[serde(default, deserialize_with = "present_limits")]
    #[schema(value_type = Option<KeyLimitsView>)]
    limits: Option<Option<KeyLimitsView>>,
}

/// `limits`: an object or `null`, never an array of its values.
fn limits_object<'de, D>(deserializer: D) -> Result<Option<KeyLimitsView>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Option::<serde_json::Map<String, serde_json::Value>>::deserialize(deserializer)?
        .map(|fields| {
            serde_json::from_value(serde_json::Value::Object(fields))
                .map_err(serde::de::Error::custom)
        })
        .transpose()
}

/// [`limits_object`] for a field that may be left out: `Some(None)` for
/// `null`.
fn present_limits<'de, D>(deserializer: D) -> Result<Option<Option<KeyLimitsView>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    limits_object(deserializer).map(Some)
}

/// A field that is present, `null` included: `Some(None)` for `null`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// [`present`] for an RFC 3339 time.
fn present_time<'de, D>(deserializer: D) -> Result<Option<Option<OffsetDateTime>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    time::serde::rfc3339::option::deserialize(deserializer).map(Some)
}

/// `POST /v1/keys/{key}/rotate`; the body may be left out.
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RotateKey {
    /// How long the old key keeps working; default 86400 (24 hours).
    grace_seconds: Option<u64>,
}

/// `GET /readyz`.
#[derive(Deserialize, Default)]
struct ReadyQuery {
    strict: Option<String>,
}

/// `GET /v1/customers`.
#[derive(Deserialize, Default, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct CustomersQuery {
    /// The `next_cursor` of the previous page.
    #[param(format = Uuid)]
    cursor: Option<String>,
    /// Page size, 1 to 1000; default 100.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
}

/// `GET /v1/keys`.
#[derive(Deserialize, Default, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct KeysQuery {
    /// A customer's id or name.
    #[param(min_length = 1)]
    customer: Option<String>,
    /// `active`, `revoked` or `expired`.
    #[param(pattern = "^(active|revoked|expired)$")]
    status: Option<String>,
    /// The `next_cursor` of the previous page.
    #[param(format = Uuid)]
    cursor: Option<String>,
    /// Page size, 1 to 1000; default 100.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
}

/// `GET /v1/webhooks/deliveries`.
#[derive(Deserialize, Default, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct DeliveriesQuery {
    /// `pending`, `delivered` or `failed`.
    #[param(pattern = "^(pending|delivered|failed)$")]
    status: Option<String>,
    /// `quota.threshold`, `quota.exhausted`, `key.expiring` or
    /// `billing.period_closed`.
    #[param(
        pattern = "^(quota\\.threshold|quota\\.exhausted|key\\.expiring|billing\\.period_closed)$"
    )]
    event: Option<String>,
    /// The `next_cursor` of the previous page.
    #[param(format = Uuid)]
    cursor: Option<String>,
    /// Page size, 1 to 1000; default 100.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
}

/// The range and customer every usage report takes.
#[derive(Deserialize, Default, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct RangeQuery {
    /// First day, UTC `YYYY-MM-DD`, inclusive; default the month's first.
    #[param(format = Date)]
    from: Option<String>,
    /// Last day, inclusive; default the month's last.
    #[param(format = Date)]
    to: Option<String>,
    /// A customer's id or name: only its usage.
    #[param(min_length = 1)]
    customer: Option<String>,
}

impl RangeQuery {
    fn report(&self) -> ReportParams {
        ReportParams {
            from: self.from.clone(),
            to: self.to.clone(),
            customer: self.customer.clone(),
        }
    }
}

/// `GET /v1/usage/top-customers`, besides the range.
#[derive(Deserialize, Default, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct TopQuery {
    /// `cost` (default), `requests` or `tokens`.
    #[param(pattern = "^(cost|requests|tokens)$")]
    by: Option<String>,
    /// How many, 1 to 1000; default 10.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
}

/// `GET /v1/usage/export`, besides the range.
#[derive(Deserialize, Default, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ExportQuery {
    /// `csv`, the default and only format.
    #[param(pattern = "^csv$")]
    format: Option<String>,
}

/// `GET /v1/billing/summary`.
#[derive(Deserialize, Default, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct BillingQuery {
    /// `YYYY-MM`; default the current month.
    #[param(pattern = "^[0-9]{4}-(0[1-9]|1[0-2])$")]
    period: Option<String>,
}

/// Parses an endpoint's query string; parameters it does not take are
/// ignored, but none may be given twice.
fn parse_query<T: DeserializeOwned>(query: Option<&str>) -> Result<T, AdminError> {
    let query = query.unwrap_or("");
    let invalid =
        |error: serde_urlencoded::de::Error| AdminError::Invalid(format!("query: {error}"));
    // A parameter given twice is ambiguous, whether or not this endpoint
    // reads it.
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).map_err(invalid)?;
    let mut names: Vec<&str> = pairs.iter().map(|(name, _)| name.as_str()).collect();
    names.sort_unstable();
    if let Some(twice) = names.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(AdminError::Invalid(format!(
            "query: `{}` is given more than once",
            twice[0]
        )));
    }
    serde_urlencoded::from_str(query).map_err(invalid)
}

/// The endpoints under `/v1/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Reload,
    CreateCustomer,
    ListCustomers,
    GetCustomer,
    PatchCustomer,
    CreateKey,
    ListKeys,
    GetKey,
    PatchKey,
    RevokeKey,
    RotateKey,
    Usage(Report),
    BillingSummary,
    ClosePeriod,
    Quota,
    Routes,
    Tiers,
    Deliveries,
    RetryDelivery,
}

/// The usage reports under `/v1/usage/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Report {
    Summary,
    Daily,
    ByCustomer,
    ByRoute,
    ByModel,
    ByKey,
    TopCustomers,
    Export,
}

/// A path segment of a route: fixed text, or a parameter (a customer, a
/// key, a report, a period) that matches any one segment.
#[derive(Clone, Copy, Debug)]
enum Segment {
    Fixed(&'static str),
    Param,
}

use Segment::{Fixed, Param};

/// Every endpoint under `/v1/`: method, path, what answers it. A path
/// listed here with other methods is 405; a path not listed is 404.
static V1_ROUTES: [(Method, &[Segment], Endpoint); 26] = [
    (Method::POST, &[Fixed("reload")], Endpoint::Reload),
    (
        Method::POST,
        &[Fixed("customers")],
        Endpoint::CreateCustomer,
    ),
    (Method::GET, &[Fixed("customers")], Endpoint::ListCustomers),
    (
        Method::GET,
        &[Fixed("customers"), Param],
        Endpoint::GetCustomer,
    ),
    (
        Method::PATCH,
        &[Fixed("customers"), Param],
        Endpoint::PatchCustomer,
    ),
    (Method::POST, &[Fixed("keys")], Endpoint::CreateKey),
    (Method::GET, &[Fixed("keys")], Endpoint::ListKeys),
    (Method::GET, &[Fixed("keys"), Param], Endpoint::GetKey),
    (Method::PATCH, &[Fixed("keys"), Param], Endpoint::PatchKey),
    (Method::DELETE, &[Fixed("keys"), Param], Endpoint::RevokeKey),
    (
        Method::POST,
        &[Fixed("keys"), Param, Fixed("rotate")],
        Endpoint::RotateKey,
    ),
    (
        Method::GET,
        &[Fixed("usage"), Fixed("summary")],
        Endpoint::Usage(Report::Summary),
    ),
    (
        Method::GET,
        &[Fixed("usage"), Fixed("daily")],
        Endpoint::Usage(Report::Daily),
    ),
    (
        Method::GET,
        &[Fixed("usage"), Fixed("by-customer")],
        Endpoint::Usage(Report::ByCustomer),
    ),
    (
        Method::GET,
        &[Fixed("usage"), Fixed("by-route")],
        Endpoint::Usage(Report::ByRoute),
    ),
    (
        Method::GET,
        &[Fixed("usage"), Fixed("by-model")],
        Endpoint::Usage(Report::ByModel),
    ),
    (
        Method::GET,
        &[Fixed("usage"), Fixed("by-key")],
        Endpoint::Usage(Report::ByKey),
    ),
    (
        Method::GET,
        &[Fixed("usage"), Fixed("top-customers")],
        Endpoint::Usage(Report::TopCustomers),
    ),
    (
        Method::GET,
        &[Fixed("usage"), Fixed("export")],
        Endpoint::Usage(Report::Export),
    ),
    (
        Method::GET,
        &[Fixed("billing"), Fixed("summary")],
        Endpoint::BillingSummary,
    ),
    (
        Method::POST,
        &[Fixed("billing"), Fixed("periods"), Param, Fixed("close")],
        Endpoint::ClosePeriod,
    ),
    (Method::GET, &[Fixed("quota"), Param], Endpoint::Quota),
    (Method::GET, &[Fixed("routes")], Endpoint::Routes),
    (Method::GET, &[Fixed("tiers")], Endpoint::Tiers),
    (
        Method::GET,
        &[Fixed("webhooks"), Fixed("deliveries")],
        Endpoint::Deliveries,
    ),
    (
        Method::POST,
        &[
            Fixed("webhooks"),
            Fixed("deliveries"),
            Param,
            Fixed("retry"),
        ],
        Endpoint::RetryDelivery,
    ),
];

/// The endpoint for `method` on the `/v1/` path `segments`, and the path's
/// parameters in order. 405 when the path is known for other methods only.
fn find_v1<'s>(
    method: &Method,
    segments: &[&'s str],
) -> Result<(Endpoint, Vec<&'s str>), AdminError> {
    let mut allowed: Vec<&str> = Vec::new();
    for (route_method, pattern, endpoint) in &V1_ROUTES {
        let Some(params) = match_path(pattern, segments) else {
            continue;
        };
        if route_method == method {
            return Ok((*endpoint, params));
        }
        allowed.push(route_method.as_str());
    }
    if !allowed.is_empty() {
        return Err(AdminError::MethodNotAllowed(allowed.join(", ")));
    }
    Err(AdminError::NotFound(format!(
        "admin endpoint /v1/{}",
        segments.join("/")
    )))
}

/// The parameters of `segments` when they match `pattern`.
fn match_path<'s>(pattern: &[Segment], segments: &[&'s str]) -> Option<Vec<&'s str>> {
    if pattern.len() != segments.len() {
        return None;
    }
    let mut params = Vec::new();
    for (expected, &segment) in pattern.iter().zip(segments) {
        match expected {
            Fixed(text) if *text == segment => {}
            Fixed(_) => return None,
            Param => params.push(segment),
        }
    }
    Some(params)
}

/// A page of a list; `next_cursor` is `null` on the last.
#[derive(Serialize, ToSchema)]
pub(crate) struct List<T> {
    data: Vec<T>,
    next_cursor: Option<String>,
}

impl Admin {
    pub fn new(
        accounts: Arc<Accounts>,
        policies: Arc<Policies>,
        reports: Arc<Reports>,
        tokens: &[String],
        metrics: Arc<Metrics>,
        reloader: Arc<dyn Reload>,
        console: Arc<Console>,
    ) -> Admin {
        Admin {
            accounts,
            policies,
            reports,
            tokens: tokens
                .iter()
                .map(|token| blake3::hash(token.as_bytes()))
                .collect(),
            ready: AtomicBool::new(false),
            metrics,
            reloader,
            console,
            guesses: Guesses::default(),
        }
    }

    /// Marks the gateway ready (keys and counters loaded, listeners open).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Answers one admin request. A panic anywhere in the handler is
    /// answered with 500 `internal_error` and logged, so the client never
    /// sees a dropped connection (README, Admin API).
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        conn: ConnInfo,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let peer = conn
            .peer_ip
            .to_str()
            .ok()
            .and_then(|ip| ip.parse::<IpAddr>().ok());
        let response = match catch_panic(self.route(request, peer)).await {
            Ok(result) => result.unwrap_or_else(AdminError::into_response),
            // Rendered (and logged, once) like any other internal failure.
            Err(panic) => {
                AdminError::Internal(format!("the handler of {method} {path} panicked: {panic}"))
                    .into_response()
            }
        };
        Ok(response)
    }

    async fn route(&self, request: Request<Incoming>, peer: Option<IpAddr>) -> AdminResult {
        let path = request.uri().path().to_owned();
        let decoded = path
            .trim_matches('/')
            .split('/')
            .map(decode_segment)
            .collect::<Result<Vec<_>, _>>()?;
        let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
        let method = request.method().clone();
        match segments.as_slice() {
            ["healthz"] => only_get(&method)
                .map(|()| json(StatusCode::OK, &serde_json::json!({"status": "ok"}))),
            ["readyz"] => {
                only_get(&method)?;
                let query: ReadyQuery = parse_query(request.uri().query())?;
                self.readyz(query.strict.as_deref() == Some("true")).await
            }
            ["metrics"] => {
                only_get(&method)?;
                // Rendering folds in every histogram sample since the last
                // upkeep: blocking work, kept off the data-plane workers.
                let metrics = self.metrics.clone();
                let text = tokio::task::spawn_blocking(move || metrics.render())
                    .await
                    .map_err(|error| {
                        AdminError::Internal(format!("rendering the metrics failed: {error}"))
                    })?;
                let mut response = Response::new(ProxyBody::full(text));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                Ok(response)
            }
            // The one `/v1/` document anyone may read: it describes, and
            // holds no data.
            ["v1", "openapi.json"] => {
                only_get(&method)?;
                let mut response = Response::new(ProxyBody::full(crate::openapi::DOCUMENT.clone()));
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                Ok(response)
            }
            ["console", ..] => {
                let signing_in = method == Method::POST && segments == ["console", "login"];
                if signing_in {
                    self.may_guess(peer)?;
                }
                let (parts, body) = request.into_parts();
                let body = collect_body(body, MAX_CONSOLE_BODY, "a form ").await?;
                match self.console.handle(Request::from_parts(parts, body)).await {
                    Answer::Page(response) => {
                        if signing_in {
                            self.guessed(peer, response.status() != StatusCode::UNAUTHORIZED);
                        }
                        Ok(response.map(ProxyBody::full))
                    }
                    Answer::Export(scope) => {
                        let mut response = self.export(scope, None).await?;
                        Console::secure(&mut response);
                        Ok(response)
                    }
                }
            }
            ["v1", ..] => {
                self.may_guess(peer)?;
                let authorized = self.authorize(&request);
                self.guessed(peer, authorized.is_ok());
                authorized?;
                let (endpoint, params) = find_v1(&method, &segments[1..])?;
                self.serve_v1(endpoint, &params, request).await
            }
            _ => Err(AdminError::NotFound(format!("admin endpoint {path}"))),
        }
    }

    async fn readyz(&self, strict: bool) -> AdminResult {
        if !self.is_ready() {
            return Ok(json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({"status": "starting"}),
            ));
        }
        if strict {
            let ping =
                tokio::time::timeout(STRICT_READY_TIMEOUT, self.accounts.store().ping()).await;
            if !matches!(ping, Ok(Ok(()))) {
                return Ok(json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({"status": "ready", "database": "unavailable"}),
                ));
            }
            return Ok(json(
                StatusCode::OK,
                &serde_json::json!({"status": "ready", "database": "ok"}),
            ));
        }
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({"status": "ready"}),
        ))
    }

    /// Refuses an address that has failed too often to sign in lately.
    fn may_guess(&self, peer: Option<IpAddr>) -> Result<(), AdminError> {
        match peer.and_then(|peer| self.guesses.wait(peer)) {
            Some(wait) => Err(AdminError::TooManyGuesses(wait)),
            None => Ok(()),
        }
    }

    fn guessed(&self, peer: Option<IpAddr>, right: bool) {
        if let Some(peer) = peer {
            if right {
                self.guesses.succeeded(peer);
            } else {
                self.guesses.failed(peer);
            }
        }
    }

    fn authorize(&self, request: &Request<Incoming>) -> Result<(), AdminError> {
        let presented = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| blake3::hash(token.trim().as_bytes()))
            .ok_or(AdminError::Unauthorized)?;
        // Every configured token is compared, so timing does not reveal
        // which (if any) matched.
        let matched = self
            .tokens
            .iter()
            .fold(false, |found, token| found | (*token == presented));
        if matched {
            Ok(())
        } else {
            Err(AdminError::Unauthorized)
        }
    }

    /// Answers one `/v1/` endpoint, `params` being its path parameters in
    /// order.
    async fn serve_v1(
        &self,
        endpoint: Endpoint,
        params: &[&str],
        request: Request<Incoming>,
    ) -> AdminResult {
        let accounts = &*self.accounts;
        let query = request.uri().query().map(str::to_owned);
        let query = query.as_deref();
        let param = |index: usize| params.get(index).copied().unwrap_or_default();
        match endpoint {
            Endpoint::Reload => self.reload().await,
            Endpoint::CreateCustomer => {
                let body: CreateCustomer = read_json(request).await?;
                let customer = accounts
                    .create_customer(&body.name, &body.tier, body.overrides)
                    .await?;
                Ok(json(StatusCode::CREATED, &customer))
            }
            Endpoint::ListCustomers => {
                let query: CustomersQuery = parse_query(query)?;
                let (data, next_cursor) = accounts
                    .list_customers(query.cursor.as_deref(), parse_limit(query.limit)?)
                    .await?;
                Ok(json(StatusCode::OK, &List { data, next_cursor }))
            }
            Endpoint::GetCustomer => Ok(json(StatusCode::OK, &accounts.customer(param(0)).await?)),
            Endpoint::PatchCustomer => {
                let body: PatchCustomer = read_json(request).await?;
                let customer = accounts
                    .update_customer(param(0), body.tier, body.overrides)
                    .await?;
                Ok(json(StatusCode::OK, &customer))
            }
            Endpoint::CreateKey => self.create_key(request).await,
            Endpoint::ListKeys => {
                let query: KeysQuery = parse_query(query)?;
                let (data, next_cursor) = accounts
                    .list_keys(
                        query.customer.as_deref(),
                        query.status.as_deref(),
                        query.cursor.as_deref(),
                        parse_limit(query.limit)?,
                    )
                    .await?;
                Ok(json(StatusCode::OK, &List { data, next_cursor }))
            }
            Endpoint::GetKey => Ok(json(StatusCode::OK, &accounts.key(param(0)).await?)),
            Endpoint::PatchKey => self.patch_key(param(0), request).await,
            Endpoint::RevokeKey => {
                accounts.revoke_key(param(0)).await?;
                let mut response = Response::new(ProxyBody::empty());
                *response.status_mut() = StatusCode::NO_CONTENT;
                Ok(response)
            }
            Endpoint::RotateKey => {
                let body: Option<RotateKey> = read_json_or_default(request).await?;
                let body = body.unwrap_or_default();
                let created = accounts
                    .rotate_key(param(0), body.grace_seconds.map(Duration::from_secs))
                    .await?;
                Ok(json(StatusCode::CREATED, &created))
            }
            Endpoint::Usage(report) => self.usage_report(report, query).await,
            Endpoint::BillingSummary => {
                let query: BillingQuery = parse_query(query)?;
                let document = self
                    .reports
                    .billing_summary(query.period.as_deref())
                    .await?;
                Ok(json(StatusCode::OK, &document))
            }
            Endpoint::ClosePeriod => Ok(json(StatusCode::OK, &self.reports.close(param(0)).await?)),
            Endpoint::Quota => self.quota(param(0)).await,
            Endpoint::Routes => Ok(whole_list(accounts.catalog().routes.clone())),
            Endpoint::Tiers => Ok(whole_list(accounts.catalog().tiers.clone())),
            Endpoint::Deliveries => {
                let query: DeliveriesQuery = parse_query(query)?;
                let request = DeliveriesRequest {
                    status: query.status,
                    event: query.event,
                    limit: parse_limit(query.limit)?,
                    cursor: query.cursor,
                };
                let (data, next_cursor) = self.console.deliveries().list(&request).await?;
                Ok(json(StatusCode::OK, &List { data, next_cursor }))
            }
            Endpoint::RetryDelivery => {
                let delivery = self.console.deliveries().retry(param(0)).await?;
                Ok(json(StatusCode::OK, &delivery))
            }
        }
    }

    /// `POST /v1/reload`.
    async fn reload(&self) -> AdminResult {
        // Reading the file and re-applying every customer's limits is
        // blocking work.
        let reloader = self.reloader.clone();
        match tokio::task::spawn_blocking(move || reloader.reload()).await {
            Ok(Ok(changed)) => Ok(json(StatusCode::OK, &changed)),
            Ok(Err(error)) => Err(AdminError::Invalid(error.to_string())),
            Err(error) => Err(AdminError::Internal(format!("reload failed: {error}"))),
        }
    }

    /// `PATCH /v1/keys/{key}`.
    async fn patch_key(&self, key: &str, request: Request<Incoming>) -> AdminResult {
        let body: PatchKey = read_json(request).await?;
        let limits = match body.limits {
            Some(Some(limits)) => Some(Some(limits.parse()?)),
            Some(None) => Some(None),
            None => None,
        };
        let update = KeyUpdate {
            name: body.name,
            routes: body.routes,
            expires_at: body.expires_at,
            limits,
        };
        Ok(json(
            StatusCode::OK,
            &self.accounts.update_key(key, update).await?,
        ))
    }

    /// `POST /v1/keys`.
    async fn create_key(&self, request: Request<Incoming>) -> AdminResult {
        let body: CreateKey = read_json(request).await?;
        let limits = body.limits.as_ref().map(KeyLimitsView::parse).transpose()?;
        let created = self
            .accounts
            .create_key(KeyRequest {
                customer: body.customer,
                tier: body.tier,
                name: body.name,
                expires_at: body.expires_at,
                routes: body.routes,
                limits,
            })
            .await?;
        Ok(json(StatusCode::CREATED, &created))
    }

    /// `GET /v1/usage/{report}`.
    async fn usage_report(&self, report: Report, query: Option<&str>) -> AdminResult {
        let reports = &*self.reports;
        let range: RangeQuery = parse_query(query)?;
        let scope = reports.scope(&range.report()).await?;
        let group = match report {
            Report::Summary => return Ok(json(StatusCode::OK, &reports.summary(&scope).await?)),
            Report::TopCustomers => {
                let top: TopQuery = parse_query(query)?;
                let top = reports
                    .top(&scope, top.by.as_deref(), top.limit.as_deref())
                    .await?;
                return Ok(json(StatusCode::OK, &top));
            }
            Report::Export => {
                let export: ExportQuery = parse_query(query)?;
                return self.export(scope, export.format.as_deref()).await;
            }
            Report::Daily => UsageGroup::Day,
            Report::ByCustomer => UsageGroup::Customer,
            Report::ByRoute => UsageGroup::Route,
            Report::ByModel => UsageGroup::Model,
            Report::ByKey => UsageGroup::Key,
        };
        Ok(json(StatusCode::OK, &reports.grouped(&scope, group).await?))
    }

    /// `GET /v1/quota/{customer}`.
    async fn quota(&self, customer: &str) -> AdminResult {
        let customer = self.accounts.customer(customer).await?;
        let limiter = self.policies.limiter();
        let view = limiter.view(customer.id);
        let tier = self.policies.tier(customer.id);
        let document = quota_document(
            customer.id,
            Some(&customer.name),
            Some(tier.as_deref().unwrap_or(&customer.tier)),
            &view,
        );
        Ok(json(StatusCode::OK, &document))
    }
}

impl Admin {
    /// `GET /v1/usage/export`: raw rows as CSV, streamed a page at a time
    /// with back-pressure from the client, so memory stays flat however
    /// many rows there are. The first page is read before the response
    /// starts, so a database that is down is a clean 503; a failure later
    /// breaks the body off (the client sees an incomplete transfer, never a
    /// silently short file).
    async fn export(&self, scope: Scope, format: Option<&str>) -> AdminResult {
        if !matches!(format, None | Some("csv")) {
            return Err(AdminError::Invalid(
                "format: only \"csv\" is supported".to_owned(),
            ));
        }
        let (first, mut next) = self.reports.export_page(&scope, None).await?;
        let (mut sender, body) = Channel::<Bytes, BoxError>::new(2);
        let reports = self.reports.clone();
        tokio::spawn(async move {
            let mut text = String::from(CSV_HEADER);
            let mut page = first;
            loop {
                for row in &page {
                    csv_row(&mut text, row);
                }
                if sender
                    .send_data(Bytes::from(std::mem::take(&mut text)))
                    .await
                    .is_err()
                {
                    return; // the client went away
                }
                let Some(after) = next else {
                    return;
                };
                match reports.export_page(&scope, Some(after)).await {
                    Ok((rows, cursor)) => {
                        page = rows;
                        next = cursor;
                    }
                    Err(error) => {
                        emit(ExportBrokenOff { error: &error });
                        sender.abort(Box::new(error));
                        return;
                    }
                }
            }
        });
        let mut response = Response::new(ProxyBody::stream(body));
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/csv; charset=utf-8"),
        );
        headers.insert(
            CONTENT_DISPOSITION,
            HeaderValue::from_static("attachment; filename=\"usage.csv\""),
        );
        Ok(response)
    }
}

fn only_get(method: &Method) -> Result<(), AdminError> {
    if method == Method::GET || method == Method::HEAD {
        Ok(())
    } else {
        Err(AdminError::MethodNotAllowed("GET, HEAD".to_owned()))
    }
}

/// A list endpoint's `limit`, a page size.
fn parse_limit(limit: Option<String>) -> Result<Option<u32>, AdminError> {
    limit
        .as_deref()
        .map(|limit| {
            limit.parse().map_err(|_| {
                AdminError::Invalid(format!(
                    "limit: must be a whole number from 1 to {MAX_PAGE}, found {limit:?}"
                ))
            })
        })
        .transpose()
}

/// One path segment, percent-decoded (README, Admin API: `/v1/customers/sp%20ace`
/// names the customer `sp ace`). Segments are split on the raw `/` first,
/// so `%2F` decodes to a slash inside a name rather than a new segment.
/// A malformed escape or bytes that are not UTF-8 are the client's
/// mistake, reported with the segment as it was sent.
fn decode_segment(raw: &str) -> Result<String, AdminError> {
    percent_decode(raw).map_err(|why| AdminError::Invalid(format!("path segment {raw:?}: {why}")))
}

fn percent_decode(raw: &str) -> Result<String, &'static str> {
    if !raw.contains('%') {
        return Ok(raw.to_owned());
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        if byte != b'%' {
            out.push(byte);
            i += 1;
            continue;
        }
        let high = bytes.get(i + 1).copied().and_then(hex_digit);
        let low = bytes.get(i + 2).copied().and_then(hex_digit);
        let (Some(high), Some(low)) = (high, low) else {
            return Err("invalid percent-encoding (a % must be followed by two hex digits)");
        };
        out.push(high << 4 | low);
        i += 3;
    }
    String::from_utf8(out).map_err(|_| "percent-decodes to bytes that are not UTF-8")
}

fn hex_digit(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, AdminError> {
    collect_body(request.into_body(), MAX_ADMIN_BODY, "JSON ").await
}

/// A request's whole body: at most `limit` bytes (`what` names its kind in
/// the error), arrived within [`ADMIN_BODY_DEADLINE`].
async fn collect_body(body: Incoming, limit: usize, what: &str) -> Result<Bytes, AdminError> {
    match tokio::time::timeout(ADMIN_BODY_DEADLINE, Limited::new(body, limit).collect()).await {
        Err(_) => Err(AdminError::BodyTimeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(_)) => Err(AdminError::Invalid(format!(
            "body: must be {what}of at most {limit} bytes"
        ))),
    }
}

async fn read_json<T: DeserializeOwned>(request: Request<Incoming>) -> Result<T, AdminError> {
    let body = read_body(request).await?;
    parse_json(&body)
}

/// Parses a JSON body; an error names the field at fault (`expires_at:
/// ...`), or `body` when the document as a whole is wrong.
fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, AdminError> {
    // Every body is an object; serde would also read a struct from an
    // array of its fields' values.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(AdminError::Invalid(
            "body: expected a JSON object".to_owned(),
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let field = if path == "." { "body" } else { &path };
        AdminError::Invalid(format!("{field}: {}", error.inner()))
    })?;
    deserializer
        .end()
        .map_err(|error| AdminError::Invalid(format!("body: {error}")))?;
    Ok(value)
}

async fn read_json_or_default<T: DeserializeOwned + Default>(
    request: Request<Incoming>,
) -> Result<T, AdminError> {
    let body = read_body(request).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse_json(&body)
}

/// A list that is whole on one page.
fn whole_list<T: Serialize>(data: Vec<T>) -> Response<ProxyBody> {
    json(
        StatusCode::OK,
        &List {
            data,
            next_cursor: None,
        },
    )
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<ProxyBody> {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut response = Response::new(ProxyBody::full(body));
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(error) => AdminError::Internal(format!("cannot render JSON: {error}")).into_response(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (STYLE.md)
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The router's table and the OpenAPI document list the same
    /// operations, `GET /v1/openapi.json` (served before the token check)
    /// besides.
    #[test]
    fn the_router_and_the_openapi_document_list_the_same_operations() {
        let mut routed: Vec<(String, String)> = V1_ROUTES
            .iter()
            .map(|(method, pattern, _)| {
                let path: Vec<&str> = pattern
                    .iter()
                    .map(|segment| match segment {
                        Fixed(text) => *text,
                        Param => "{}",
                    })
                    .collect();
                (method.to_string(), format!("/v1/{}", path.join("/")))
            })
            .collect();
        routed.push(("GET".to_owned(), "/v1/openapi.json".to_owned()));
        routed.sort();
        let documented: Vec<(String, String)> = crate::openapi::operations()
            .into_iter()
            .map(|(method, path)| {
                let path: Vec<String> = path
                    .split('/')
                    .map(|part| {
                        if part.starts_with('{') {
                            "{}".to_owned()
                        } else {
                            part.to_owned()
                        }
                    })
                    .collect();
                (method, path.join("/"))
            })
            .collect();
        assert_eq!(routed.len(), 27);
        assert_eq!(routed, documented);
        if let Some(path) = std::env::var_os("DUMP_OPENAPI") {
            std::fs::write(path, &*crate::openapi::DOCUMENT).unwrap();
        }
    }

    /// A future that is pending once, then panics on its second poll: the
    /// panic happens after the wrapper has already returned `Pending`.
    async fn panics_after_yielding() -> u32 {
        tokio::task::yield_now().await;
        panic!("deliberate panic in a handler");
    }

    #[tokio::test]
    async fn a_panicking_handler_becomes_an_error_with_its_message() {
        assert_eq!(catch_panic(async { 7 }).await, Ok(7));
        assert_eq!(
            catch_panic(panics_after_yielding()).await,
            Err("deliberate panic in a handler".to_owned())
        );
        let formatted = catch_panic(async {
            let n = 3;
            if n > 2 {
                panic!("formatted {n}");
            }
        })
        .await;
        assert_eq!(formatted, Err("formatted 3".to_owned()));
    }

    #[test]
    fn a_caught_panic_renders_as_internal_error() {
        let response =
            AdminError::Internal("the handler panicked: boom".to_owned()).into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn segments_decode_percent_escapes() {
        assert_eq!(percent_decode("sp%20ace").unwrap(), "sp ace");
        assert_eq!(percent_decode("a%2Fb%2fc").unwrap(), "a/b/c");
        assert_eq!(percent_decode("na%C3%AFve").unwrap(), "naïve");
        assert_eq!(percent_decode("plain+name").unwrap(), "plain+name");
        for bad in ["%", "%2", "%zz", "%+f", "a%-1", "%ff", "%C3", "%C3%28"] {
            assert!(percent_decode(bad).is_err(), "{bad}");
        }
        let error = decode_segment("x%zz").unwrap_err();
        assert!(
            matches!(&error, AdminError::Invalid(m) if m.starts_with("path segment \"x%zz\": ")),
            "{error:?}"
        );
    }

    #[test]
    fn the_route_table_decides_between_an_endpoint_405_and_404() {
        let (endpoint, params) = find_v1(&Method::POST, &["keys", "k 1", "rotate"]).unwrap();
        assert_eq!((endpoint, params), (Endpoint::RotateKey, vec!["k 1"]));
        let (endpoint, params) =
            find_v1(&Method::POST, &["billing", "periods", "2026-01", "close"]).unwrap();
        assert_eq!((endpoint, params), (Endpoint::ClosePeriod, vec!["2026-01"]));
        assert!(matches!(
            find_v1(&Method::PUT, &["customers", "acme"]),
            Err(AdminError::MethodNotAllowed(allow)) if allow == "GET, PATCH"
        ));
        assert!(matches!(
            find_v1(&Method::TRACE, &["keys", "k"]),
            Err(AdminError::MethodNotAllowed(allow)) if allow == "GET, PATCH, DELETE"
        ));
        assert!(matches!(
            find_v1(&Method::GET, &["reload"]),
            Err(AdminError::MethodNotAllowed(allow)) if allow == "POST"
        ));
        assert!(matches!(
            find_v1(&Method::HEAD, &["keys"]),
            Err(AdminError::MethodNotAllowed(_))
        ));
        assert!(matches!(
            find_v1(&Method::GET, &["keys", "k", "x"]),
            Err(AdminError::NotFound(what)) if what == "admin endpoint /v1/keys/k/x"
        ));
    }

    /// Every byte percent-encoded, as a client library would.
    fn encode_all(text: &str) -> String {
        text.bytes().map(|b| format!("%{b:02X}")).collect()
    }

    /// Whether every `%` starts a two-hex-digit escape.
    fn escapes_well_formed(raw: &str) -> bool {
        let bytes = raw.as_bytes();
        bytes.iter().enumerate().all(|(i, &b)| {
            b != b'%'
                || (bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                    && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any text survives encoding then decoding, whether every byte or
        /// none is escaped.
        #[test]
        fn arbitrary_input_path_segment_round_trips(text in any::<String>()) {
            prop_assert_eq!(percent_decode(&encode_all(&text)).unwrap(), text.clone());
            if !text.contains('%') {
                prop_assert_eq!(percent_decode(&text).unwrap(), text);
            }
        }

        /// Any segment is decoded or refused, never a panic; it is refused
        /// exactly when an escape is malformed or the bytes are not UTF-8.
        #[test]
        fn arbitrary_input_path_segment_accepts_exactly_the_valid_ones(
            raw in "([%0-9a-fA-FgG+/ ]|[^%]){0,24}",
        ) {
            let decoded = percent_decode(&raw);
            if !escapes_well_formed(&raw) {
                prop_assert!(decoded.is_err());
            } else {
                // Well-formed escapes: refused only for bytes that are not UTF-8.
                let mut bytes = Vec::new();
                let mut i = 0;
                let raw_bytes = raw.as_bytes();
                while i < raw_bytes.len() {
                    if raw_bytes[i] == b'%' {
                        let hex = std::str::from_utf8(&raw_bytes[i + 1..i + 3]).unwrap();
                        bytes.push(u8::from_str_radix(hex, 16).unwrap());
                        i += 3;
                    } else {
                        bytes.push(raw_bytes[i]);
                        i += 1;
                    }
                }
                prop_assert_eq!(decoded.ok(), String::from_utf8(bytes).ok());
            }
        }
    }
}
