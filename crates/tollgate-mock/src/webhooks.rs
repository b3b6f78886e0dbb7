//! A webhook receiver for tests and the demo: an HTTP endpoint that verifies
//! Standard Webhooks signatures as an operator's endpoint would, keeps every
//! delivery it gets, and fails or stalls on request so that a test can watch
//! the gateway retry.
//!
//! # Signatures
//!
//! A delivery carries three headers:
//!
//! - `webhook-id`: unique per event, the same on every retry;
//! - `webhook-timestamp`: unix seconds when the attempt was signed;
//! - `webhook-signature`: one or more space-separated `v1,<base64>` entries,
//!   each the HMAC-SHA256 of the bytes `{id}.{timestamp}.{body}`, in standard
//!   padded base64. One matching entry is enough; entries of other versions
//!   are ignored.
//!
//! The HMAC key is the base64 text after the `whsec_` prefix of the secret,
//! decoded. [`sign`] makes a signature and [`verify`] checks one; the receiver
//! uses the same check with [`DEFAULT_TOLERANCE`] for the timestamp.
//!
//! The body is a JSON event, `{"type": "...", "timestamp": "<RFC 3339>",
//! "data": {...}}`; the receiver checks that shape after the signature.
//!
//! # Receiver
//!
//! [`WebhookReceiver::start`] serves HTTP/1.1 on `127.0.0.1` with a free port
//! until [`WebhookReceiver::shutdown`] or until it is dropped.
//!
//! | request | answer |
//! |---|---|
//! | anything while [`set_down(true)`](WebhookReceiver::set_down) | 503; a `POST` is still read, checked and recorded |
//! | `POST` with a body over [`MAX_WEBHOOK_BODY`] bytes | 413 |
//! | `POST` whose signature does not verify | 401 |
//! | `POST` signed right whose body is not an event | 400 |
//! | `POST` that checks out, under [`hang_next`](WebhookReceiver::hang_next) | no answer until the sender leaves or the receiver shuts down |
//! | `POST` that checks out, under [`fail_next`](WebhookReceiver::fail_next) | the status asked for |
//! | `POST` that checks out | 200 |
//! | `GET` or `HEAD`, any path | every delivery recorded so far, as a JSON array |
//! | any other method | 405 |
//!
//! Every `POST` whose body arrives whole is recorded as a [`Received`], with
//! the status it was answered. A path is not checked: [`WebhookReceiver::url`]
//! ends in `/webhooks` only so that it looks like an operator's endpoint.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use tollgate_mock::webhooks::WebhookReceiver;
//!
//! let receiver = WebhookReceiver::start("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").await?;
//! let endpoint = receiver.url(); // configure the gateway to deliver here
//! # let _ = endpoint;
//! receiver.fail_next(1, 500); // the first attempt fails, the retry lands
//! let events = receiver.wait_for(1, Duration::from_secs(10)).await?;
//! assert_eq!(events[0].event_type, "usage.threshold_reached");
//! # Ok(())
//! # }
//! ```

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use ring::hmac;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, warn};

use crate::server::SHUTDOWN_GRACE;

/// The header with the event's id.
pub const WEBHOOK_ID: &str = "webhook-id";
/// The header with the attempt's unix timestamp.
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// The header with the `v1,<base64>` signatures.
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";
/// What every secret starts with; the rest is the base64 key.
pub const SECRET_PREFIX: &str = "whsec_";
/// How far a timestamp may be from the receiver's clock, either way.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);
/// Largest body the receiver reads; a bigger one is answered 413.
pub const MAX_WEBHOOK_BODY: usize = 1024 * 1024;

/// [`MAX_WEBHOOK_BODY`] as a body length.
const MAX_BODY_LEN: u64 = MAX_WEBHOOK_BODY as u64;

/// Most entries a signature header may hold. Each one costs an HMAC over the
/// whole body, so a header of thousands would be a cheap way to burn CPU;
/// a sender rotating secrets needs two or three.
const MAX_SIGNATURES: usize = 16;

/// The only signature version there is for symmetric keys.
const V1: &str = "v1,";

/// Pause after a failed accept, as in the mock upstream.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// A secret that cannot be used as a key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("the webhook secret does not start with `{SECRET_PREFIX}`")]
    MissingPrefix,
    #[error("the webhook secret after `{SECRET_PREFIX}` is not padded standard base64")]
    NotBase64,
    #[error("the webhook secret's key is empty")]
    EmptyKey,
}

/// Why a delivery's signature was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The header is absent, empty or not visible ASCII.
    #[error("the `{0}` header is missing")]
    MissingHeader(&'static str),
    /// Not a whole number of seconds: a sign, a fraction, a date, an overflow.
    #[error("`{WEBHOOK_TIMESTAMP}` is not a whole number of unix seconds")]
    InvalidTimestamp,
    #[error(
        "`{WEBHOOK_TIMESTAMP}` is {seconds} s in the past, more than the {tolerance} s allowed"
    )]
    TooOld { seconds: u64, tolerance: u64 },
    #[error(
        "`{WEBHOOK_TIMESTAMP}` is {seconds} s in the future, more than the {tolerance} s allowed"
    )]
    TooNew { seconds: u64, tolerance: u64 },
    #[error("`{WEBHOOK_SIGNATURE}` holds more than {MAX_SIGNATURES} signatures")]
    TooManySignatures,
    #[error("no `v1` signature in `{WEBHOOK_SIGNATURE}` matches")]
    NoMatchingSignature,
}

/// The three signature headers of a delivery, as text. `None` (or an empty
/// value) means the header was not sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WebhookHeaders<'a> {
    pub id: Option<&'a str>,
    pub timestamp: Option<&'a str>,
    pub signature: Option<&'a str>,
}

impl<'a> WebhookHeaders<'a> {
    /// Picks the three headers out of a request's. A value that is not
    /// visible ASCII counts as missing.
    pub fn from_map(headers: &'a HeaderMap) -> Self {
        let get = |name: &str| {
            headers
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::trim)
                .filter(|value| !value.is_empty())
        };
        Self {
            id: get(WEBHOOK_ID),
            timestamp: get(WEBHOOK_TIMESTAMP),
            signature: get(WEBHOOK_SIGNATURE),
        }
    }
}

/// The `webhook-signature` value for a delivery: `v1,` and the base64 HMAC of
/// `{id}.{timestamp}.{body}`.
///
/// # Errors
///
/// When the secret is not `whsec_` followed by non-empty padded base64.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Result<String, SecretError> {
    let key = signing_key(secret)?;
    let tag = hmac::sign(&key, &signed_content(id, timestamp, body));
    Ok(format!("{V1}{}", STANDARD.encode(tag.as_ref())))
}

/// Checks a delivery as a receiver would: the headers are there, the
/// timestamp is within `tolerance` of `now_unix` (either way, the bound
/// itself allowed), and one `v1` signature matches. Signatures are compared
/// in constant time.
///
/// # Errors
///
/// The first check that fails, in that order, after the secret's format.
pub fn verify(
    secret: &str,
    headers: &WebhookHeaders<'_>,
    body: &[u8],
    now_unix: i64,
    tolerance: Duration,
) -> Result<(), VerifyError> {
    let key = signing_key(secret)?;
    verify_with(&key, headers, body, now_unix, tolerance)
}

/// The HMAC key of a `whsec_` secret.
fn signing_key(secret: &str) -> Result<hmac::Key, SecretError> {
    let encoded = secret
        .strip_prefix(SECRET_PREFIX)
        .ok_or(SecretError::MissingPrefix)?;
    let raw = STANDARD
        .decode(encoded)
        .map_err(|_| SecretError::NotBase64)?;
    if raw.is_empty() {
        return Err(SecretError::EmptyKey);
    }
    Ok(hmac::Key::new(hmac::HMAC_SHA256, &raw))
}

/// The bytes that are signed: `{id}.{timestamp}.{body}`.
fn signed_content(id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let timestamp = timestamp.to_string();
    let mut content = Vec::with_capacity(id.len() + timestamp.len() + body.len() + 2);
    content.extend_from_slice(id.as_bytes());
    content.push(b'.');
    content.extend_from_slice(timestamp.as_bytes());
    content.push(b'.');
    content.extend_from_slice(body);
    content
}

/// A timestamp header as unix seconds: ASCII digits only, so that `+5`,
/// `-5` and `1.5` are refused rather than read some lenient way.
fn parse_timestamp(text: &str) -> Option<i64> {
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn verify_with(
    key: &hmac::Key,
    headers: &WebhookHeaders<'_>,
    body: &[u8],
    now_unix: i64,
    tolerance: Duration,
) -> Result<(), VerifyError> {
    fn present<'h>(value: Option<&'h str>, name: &'static str) -> Result<&'h str, VerifyError> {
        value
            .filter(|value| !value.is_empty())
            .ok_or(VerifyError::MissingHeader(name))
    }
    let id = present(headers.id, WEBHOOK_ID)?;
    let timestamp = present(headers.timestamp, WEBHOOK_TIMESTAMP)?;
    let signature = present(headers.signature, WEBHOOK_SIGNATURE)?;

    let timestamp = parse_timestamp(timestamp).ok_or(VerifyError::InvalidTimestamp)?;
    let tolerance = tolerance.as_secs();
    let seconds = now_unix.abs_diff(timestamp);
    if seconds > tolerance {
        return Err(if timestamp < now_unix {
            VerifyError::TooOld { seconds, tolerance }
        } else {
            VerifyError::TooNew { seconds, tolerance }
        });
    }

    let entries: Vec<&str> = signature.split_whitespace().collect();
    if entries.len() > MAX_SIGNATURES {
        return Err(VerifyError::TooManySignatures);
    }
    let content = signed_content(id, timestamp, body);
    let matched = entries
        .iter()
        .filter_map(|entry| entry.strip_prefix(V1))
        .filter_map(|encoded| STANDARD.decode(encoded).ok())
        .any(|tag| hmac::verify(key, &content, &tag).is_ok());
    if matched {
        Ok(())
    } else {
        Err(VerifyError::NoMatchingSignature)
    }
}

/// Checks that a body is a webhook event: a JSON object with a non-empty
/// `type`, an RFC 3339 `timestamp` and a `data` object.
fn check_event(body: &Value) -> Result<(), String> {
    let Some(event) = body.as_object() else {
        return Err("the body is not a JSON object".to_owned());
    };
    if event
        .get("type")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Err("the event has no `type` string".to_owned());
    }
    let Some(timestamp) = event.get("timestamp").and_then(Value::as_str) else {
        return Err("the event has no `timestamp` string".to_owned());
    };
    if OffsetDateTime::parse(timestamp, &Rfc3339).is_err() {
        return Err(format!(
            "the event's `timestamp` {timestamp:?} is not RFC 3339"
        ));
    }
    if !event.get("data").is_some_and(Value::is_object) {
        return Err("the event has no `data` object".to_owned());
    }
    Ok(())
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
        })
}

/// One `POST` as the receiver got it.
#[derive(Clone, Debug)]
pub struct Received {
    /// `webhook-id`, or empty when the header was missing.
    pub id: String,
    /// `webhook-timestamp`, when it was sent and is a number.
    pub timestamp: Option<i64>,
    /// The event's `type`, or empty when the body has none.
    pub event_type: String,
    /// The body as JSON; `Null` when it is not JSON or was over the limit.
    pub body: Value,
    /// Whether the signature verified and the body is an event. Says nothing
    /// about the answer: see `attempt_status`.
    pub valid: bool,
    /// Why the delivery is not valid.
    pub error: Option<String>,
    /// When its body had arrived.
    pub received_at: Instant,
    /// The status answered, or 0 for a delivery held by `hang_next`.
    pub attempt_status: u16,
}

impl Received {
    /// Valid and answered 2xx: what the sender can count as delivered.
    pub fn accepted(&self) -> bool {
        self.valid && (200..300).contains(&self.attempt_status)
    }
}

/// [`WebhookReceiver::wait_for`] ran out of time.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "waited {waited:?} for {wanted} accepted webhook ids, got {got} ({received} deliveries in all)"
)]
pub struct WaitTimeout {
    pub wanted: usize,
    pub got: usize,
    pub received: usize,
    pub waited: Duration,
}

/// A webhook endpoint running in the background of a test or the demo.
/// Dropping it shuts the server down, like [`WebhookReceiver::shutdown`]
/// without the wait.
#[derive(Debug)]
pub struct WebhookReceiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Sending `true`, or dropping this, stops the server.
    shutdown: watch::Sender<bool>,
    server: JoinHandle<()>,
}

impl WebhookReceiver {
    /// Starts a receiver on `127.0.0.1` with a free port.
    ///
    /// # Errors
    ///
    /// `InvalidInput` when the secret is malformed (see [`SecretError`]);
    /// the bind error when the socket cannot be bound.
    pub async fn start(secret: &str) -> io::Result<Self> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), secret).await
    }

    /// Starts a receiver on `addr` (port 0 picks a free port). Must be called
    /// within a Tokio runtime, which then runs the server.
    ///
    /// # Errors
    ///
    /// As [`WebhookReceiver::start`].
    pub async fn start_on(addr: SocketAddr, secret: &str) -> io::Result<Self> {
        let key = signing_key(secret).map_err(invalid_secret)?;
        let listener = TcpListener::bind(addr).await?;
        Self::spawn(listener, key)
    }

    /// Starts a receiver on a socket already bound. Must be called within a
    /// Tokio runtime.
    ///
    /// # Errors
    ///
    /// `InvalidInput` when the secret is malformed; the listener's error
    /// when it has no local address.
    pub fn from_listener(listener: TcpListener, secret: &str) -> io::Result<Self> {
        let key = signing_key(secret).map_err(invalid_secret)?;
        Self::spawn(listener, key)
    }

    fn spawn(listener: TcpListener, key: hmac::Key) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        let (shutdown, down) = watch::channel(false);
        let shared = Arc::new(Shared {
            key,
            started: Instant::now(),
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            holding: AtomicUsize::new(0),
            shutdown: down,
        });
        let server = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Self {
            addr,
            shared,
            shutdown,
            server,
        })
    }

    /// The address the receiver listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The endpoint to configure, e.g. `http://127.0.0.1:40123/webhooks`.
    pub fn url(&self) -> String {
        format!("http://{}/webhooks", self.addr)
    }

    /// Every delivery so far, in the order they were answered.
    pub fn received(&self) -> Vec<Received> {
        self.shared.lock().deliveries.clone()
    }

    /// The deliveries whose signature and event checked out, whatever they
    /// were answered.
    pub fn valid(&self) -> Vec<Received> {
        self.filtered(|delivery| delivery.valid)
    }

    /// The deliveries the sender can count as delivered: valid and answered
    /// 2xx. Retries of one event all appear.
    pub fn accepted(&self) -> Vec<Received> {
        self.filtered(Received::accepted)
    }

    /// The ids of accepted deliveries, each once, in the order first accepted.
    pub fn distinct_ids(&self) -> Vec<String> {
        self.shared
            .first_accepted()
            .into_iter()
            .map(|delivery| delivery.id)
            .collect()
    }

    /// Waits until at least `n` distinct event ids have been accepted, then
    /// returns the first accepted delivery of each, in order.
    ///
    /// # Errors
    ///
    /// When `timeout` passes first; the error tells how far it got.
    pub async fn wait_for(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Received>, WaitTimeout> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before looking, so a delivery recorded between the
            // look and the wait still wakes us.
            let notified = self.shared.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let firsts = self.shared.first_accepted();
            if firsts.len() >= n {
                return Ok(firsts);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(WaitTimeout {
                    wanted: n,
                    got: firsts.len(),
                    received: self.shared.lock().deliveries.len(),
                    waited: timeout,
                });
            }
        }
    }

    /// Answers `status` to the next `n` valid deliveries, which are still
    /// recorded. Replaces an earlier `fail_next`. Meant for 4xx and 5xx; a
    /// status below 200 or above 999 is answered as 500.
    pub fn fail_next(&self, n: usize, status: u16) {
        let status = StatusCode::from_u16(status)
            .ok()
            .filter(|status| !status.is_informational())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut state = self.shared.lock();
        state.fail_left = n;
        state.fail_status = status;
    }

    /// While down, everything is answered 503 (deliveries are still read,
    /// checked and recorded).
    pub fn set_down(&self, down: bool) {
        self.shared.lock().down = down;
    }

    /// Holds the next `n` valid deliveries without answering: they are
    /// recorded with status 0 and the connection stays open until the sender
    /// gives up or the receiver shuts down. Replaces an earlier `hang_next`
    /// and goes before `fail_next`.
    pub fn hang_next(&self, n: usize) {
        self.shared.lock().hang_left = n;
    }

    /// How many deliveries are being held by `hang_next` right now. Drops
    /// back as soon as their senders close the connection.
    pub fn holding(&self) -> usize {
        self.shared.holding.load(Ordering::SeqCst)
    }

    /// Stops accepting, breaks held deliveries, and waits for the open
    /// connections to finish (at most two seconds).
    pub async fn shutdown(self) {
        self.shutdown.send_replace(true);
        if let Err(error) = self.server.await {
            warn!(message = "Webhook receiver task failed.", %error);
        }
    }

    fn filtered(&self, keep: impl Fn(&Received) -> bool) -> Vec<Received> {
        self.shared
            .lock()
            .deliveries
            .iter()
            .filter(|delivery| keep(delivery))
            .cloned()
            .collect()
    }
}

fn invalid_secret(error: SecretError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, error)
}

/// What the server and the handle share.
#[derive(Debug)]
struct Shared {
    key: hmac::Key,
    started: Instant,
    state: Mutex<State>,
    /// Woken whenever a delivery is recorded.
    changed: Notify,
    /// Deliveries held by `hang_next` right now.
    holding: AtomicUsize,
    shutdown: watch::Receiver<bool>,
}

/// The log and the controls, under one lock so that deciding an answer and
/// recording it happen in the same order.
#[derive(Debug, Default)]
struct State {
    deliveries: Vec<Received>,
    down: bool,
    fail_left: usize,
    fail_status: StatusCode,
    hang_left: usize,
}

/// What the receiver does with a delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    /// Answer this status, with `{"error": message}` when there is one.
    Answer(StatusCode, Option<String>),
    Hang,
}

const DOWN: &str = "the receiver is down";
const FAILED: &str = "the receiver failed this delivery on purpose";

/// Why a delivery is refused, and with which status.
struct Rejection {
    status: StatusCode,
    reason: String,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change under this lock is a single push or assignment, so a
        // poisoned state is still a consistent one.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn first_accepted(&self) -> Vec<Received> {
        let state = self.lock();
        let mut seen = HashSet::new();
        state
            .deliveries
            .iter()
            .filter(|delivery| delivery.accepted() && seen.insert(delivery.id.as_str()))
            .cloned()
            .collect()
    }

    /// Decides the answer from the check and the controls, and records the
    /// delivery with it.
    fn settle(&self, mut delivery: Received, check: Result<(), Rejection>) -> Action {
        let rejection = check.err();
        delivery.valid = rejection.is_none();
        delivery.error = rejection.as_ref().map(|rejection| rejection.reason.clone());
        let mut state = self.lock();
        let action = if state.down {
            Action::Answer(StatusCode::SERVICE_UNAVAILABLE, Some(DOWN.to_owned()))
        } else if let Some(rejection) = rejection {
            Action::Answer(rejection.status, Some(rejection.reason))
        } else if state.hang_left > 0 {
            state.hang_left -= 1;
            Action::Hang
        } else if state.fail_left > 0 {
            state.fail_left -= 1;
            Action::Answer(state.fail_status, Some(FAILED.to_owned()))
        } else {
            Action::Answer(StatusCode::OK, None)
        };
        delivery.attempt_status = match &action {
            Action::Answer(status, _) => status.as_u16(),
            Action::Hang => 0,
        };
        state.deliveries.push(delivery);
        drop(state);
        self.changed.notify_waiters();
        action
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(stopped(shared.shutdown.clone()));
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    connections.spawn(serve_connection(stream, Arc::clone(&shared)));
                }
                Err(error) => {
                    warn!(message = "Webhook receiver failed to accept a connection.", %error);
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Resolves once the receiver is shutting down: `true` was sent, or the
/// handle that owns the sender is gone.
async fn stopped(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|down| *down).await;
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    if let Err(error) = stream.set_nodelay(true) {
        debug!(message = "Webhook receiver could not set TCP_NODELAY.", %error);
    }
    let shutdown = stopped(shared.shutdown.clone());
    let service = service_fn(move |request| handle(Arc::clone(&shared), request));
    let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                debug!(message = "Webhook receiver connection ended with an error.", %error);
            }
        }
        () = shutdown => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, connection).await;
        }
    }
}

type Answer = Response<Full<Bytes>>;

/// The service behind every connection. An error closes the connection: a
/// request body that breaks off, or a held delivery at shutdown.
async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> io::Result<Answer> {
    let method = request.method().clone();
    if method == Method::POST {
        return receive(&shared, request).await;
    }
    let down = shared.lock().down;
    Ok(if down {
        error(StatusCode::SERVICE_UNAVAILABLE, DOWN)
    } else if method == Method::GET || method == Method::HEAD {
        listing(&shared)
    } else {
        let mut answer = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST a webhook, or GET the log",
        );
        answer
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST, GET, HEAD"));
        answer
    })
}

async fn receive(shared: &Shared, request: Request<Incoming>) -> io::Result<Answer> {
    let (parts, body) = request.into_parts();
    let body = read_body(body).await.map_err(io::Error::other)?;
    let headers = WebhookHeaders::from_map(&parts.headers);

    let (value, check) = match body {
        Body::Whole(bytes) => {
            let value = serde_json::from_slice(&bytes);
            let check = verify_with(&shared.key, &headers, &bytes, unix_now(), DEFAULT_TOLERANCE)
                .map_err(|error| Rejection {
                    status: StatusCode::UNAUTHORIZED,
                    reason: error.to_string(),
                })
                .and_then(|()| {
                    let value = value
                        .as_ref()
                        .map_err(|error| format!("the body is not JSON: {error}"));
                    value.and_then(check_event).map_err(|reason| Rejection {
                        status: StatusCode::BAD_REQUEST,
                        reason,
                    })
                });
            (value.unwrap_or(Value::Null), check)
        }
        Body::TooLarge(len) => (
            Value::Null,
            Err(Rejection {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                reason: format!(
                    "the body has {len} bytes, more than the {MAX_WEBHOOK_BODY} allowed"
                ),
            }),
        ),
    };
    let delivery = Received {
        id: headers.id.unwrap_or_default().to_owned(),
        timestamp: headers.timestamp.and_then(parse_timestamp),
        event_type: value
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        body: value,
        // `settle` fills in the verdict and the answer.
        valid: false,
        error: None,
        received_at: Instant::now(),
        attempt_status: 0,
    };

    match shared.settle(delivery, check) {
        Action::Hang => {
            let _held = Held::new(&shared.holding);
            // Dropped here when the sender closes the connection, which
            // bounds what held deliveries cost to the connections still open.
            stopped(shared.shutdown.clone()).await;
            Err(io::Error::other(
                "the webhook receiver shut down while holding a delivery",
            ))
        }
        Action::Answer(status, None) => Ok(plain(status, Bytes::new())),
        Action::Answer(status, Some(message)) => Ok(error(status, &message)),
    }
}

/// Counts a held delivery while it lives.
struct Held<'a>(&'a AtomicUsize);

impl<'a> Held<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A request body as read.
enum Body {
    Whole(Bytes),
    /// Over [`MAX_WEBHOOK_BODY`]: read to the end so that the sender gets its
    /// 413 rather than a reset, but not kept. Holds the full length.
    TooLarge(u64),
}

async fn read_body(mut body: Incoming) -> Result<Body, hyper::Error> {
    let mut kept = BytesMut::new();
    let mut len: u64 = 0;
    while let Some(frame) = body.frame().await {
        // Trailers are not data; ignore them.
        if let Ok(data) = frame?.into_data() {
            len = len.saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
            if len <= MAX_BODY_LEN {
                kept.extend_from_slice(&data);
            } else if !kept.is_empty() {
                // Over the limit for good: stop keeping it.
                kept = BytesMut::new();
            }
        }
    }
    Ok(if len <= MAX_BODY_LEN {
        Body::Whole(kept.freeze())
    } else {
        Body::TooLarge(len)
    })
}

/// `GET`: the log as a JSON array.
fn listing(shared: &Shared) -> Answer {
    let deliveries: Vec<Value> = shared
        .lock()
        .deliveries
        .iter()
        .map(|delivery| {
            let since_start = delivery
                .received_at
                .saturating_duration_since(shared.started);
            json!({
                "id": delivery.id,
                "timestamp": delivery.timestamp,
                "type": delivery.event_type,
                "valid": delivery.valid,
                "error": delivery.error,
                "status": delivery.attempt_status,
                "received_ms": u64::try_from(since_start.as_millis()).unwrap_or(u64::MAX),
                "body": delivery.body,
            })
        })
        .collect();
    json_answer(StatusCode::OK, &Value::Array(deliveries))
}

/// `{"error": message}` with `status`.
fn error(status: StatusCode, message: &str) -> Answer {
    json_answer(status, &json!({ "error": message }))
}

fn json_answer(status: StatusCode, value: &Value) -> Answer {
    let mut answer = plain(status, Bytes::from(value.to_string()));
    answer.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    answer
}

fn plain(status: StatusCode, body: Bytes) -> Answer {
    let mut answer = Response::new(Full::new(body));
    *answer.status_mut() = status;
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    // The reference vector of the Standard Webhooks specification.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: i64 = 1_614_265_330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn headers<'a>(timestamp: &'a str, signature: &'a str) -> WebhookHeaders<'a> {
        WebhookHeaders {
            id: Some(ID),
            timestamp: Some(timestamp),
            signature: Some(signature),
        }
    }

    fn check(headers: &WebhookHeaders<'_>, body: &[u8], now: i64) -> Result<(), VerifyError> {
        verify(SECRET, headers, body, now, DEFAULT_TOLERANCE)
    }

    #[test]
    fn signs_the_reference_vector() {
        assert_eq!(sign(SECRET, ID, TIMESTAMP, BODY).unwrap(), SIGNATURE);
    }

    #[test]
    fn verifies_the_reference_vector() {
        let ts = TIMESTAMP.to_string();
        assert_eq!(check(&headers(&ts, SIGNATURE), BODY, TIMESTAMP), Ok(()));
    }

    #[test]
    fn any_one_of_several_signatures_is_enough() {
        let ts = TIMESTAMP.to_string();
        let other = sign("whsec_c2VjcmV0LWtleQ==", ID, TIMESTAMP, BODY).unwrap();
        let several = format!("v1a,abcd {other} v1,!!notbase64 {SIGNATURE}");
        assert_eq!(check(&headers(&ts, &several), BODY, TIMESTAMP), Ok(()));
        assert_eq!(
            check(&headers(&ts, &other), BODY, TIMESTAMP),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn refuses_a_changed_body_id_or_timestamp() {
        let ts = TIMESTAMP.to_string();
        assert_eq!(
            check(
                &headers(&ts, SIGNATURE),
                br#"{"test": 2432232315}"#,
                TIMESTAMP
            ),
            Err(VerifyError::NoMatchingSignature)
        );
        let other_id = WebhookHeaders {
            id: Some("msg_other"),
            ..headers(&ts, SIGNATURE)
        };
        assert_eq!(
            check(&other_id, BODY, TIMESTAMP),
            Err(VerifyError::NoMatchingSignature)
        );
        let later = (TIMESTAMP + 1).to_string();
        assert_eq!(
            check(&headers(&later, SIGNATURE), BODY, TIMESTAMP),
            Err(VerifyError::NoMatchingSignature)
        );
        // Only the `v1` version is ours.
        let unversioned = SIGNATURE.trim_start_matches("v1,");
        assert_eq!(
            check(&headers(&ts, unversioned), BODY, TIMESTAMP),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn refuses_missing_headers() {
        let ts = TIMESTAMP.to_string();
        let full = headers(&ts, SIGNATURE);
        for (headers, name) in [
            (WebhookHeaders { id: None, ..full }, WEBHOOK_ID),
            (
                WebhookHeaders {
                    id: Some(""),
                    ..full
                },
                WEBHOOK_ID,
            ),
            (
                WebhookHeaders {
                    timestamp: None,
                    ..full
                },
                WEBHOOK_TIMESTAMP,
            ),
            (
                WebhookHeaders {
                    signature: None,
                    ..full
                },
                WEBHOOK_SIGNATURE,
            ),
        ] {
            assert_eq!(
                check(&headers, BODY, TIMESTAMP),
                Err(VerifyError::MissingHeader(name))
            );
        }
    }

    #[test]
    fn refuses_timestamps_that_are_not_whole_seconds() {
        for ts in [
            "abc",
            "+1614265330",
            "-1",
            "1614265330.0",
            " ",
            "99999999999999999999",
        ] {
            assert_eq!(
                check(&headers(ts, SIGNATURE), BODY, TIMESTAMP),
                Err(VerifyError::InvalidTimestamp),
                "{ts:?}"
            );
        }
    }

    #[test]
    fn timestamps_within_the_tolerance_pass_and_beyond_it_fail() {
        let ts = TIMESTAMP.to_string();
        let signed = headers(&ts, SIGNATURE);
        assert_eq!(check(&signed, BODY, TIMESTAMP + 300), Ok(()));
        assert_eq!(check(&signed, BODY, TIMESTAMP - 300), Ok(()));
        assert_eq!(
            check(&signed, BODY, TIMESTAMP + 301),
            Err(VerifyError::TooOld {
                seconds: 301,
                tolerance: 300
            })
        );
        assert_eq!(
            check(&signed, BODY, TIMESTAMP - 301),
            Err(VerifyError::TooNew {
                seconds: 301,
                tolerance: 300
            })
        );
        assert_eq!(
            verify(
                SECRET,
                &signed,
                BODY,
                TIMESTAMP + 301,
                Duration::from_secs(3600)
            ),
            Ok(())
        );
    }

    #[test]
    fn refuses_a_header_with_too_many_signatures() {
        let ts = TIMESTAMP.to_string();
        let many = vec![SIGNATURE; MAX_SIGNATURES + 1].join(" ");
        assert_eq!(
            check(&headers(&ts, &many), BODY, TIMESTAMP),
            Err(VerifyError::TooManySignatures)
        );
    }

    #[test]
    fn refuses_malformed_secrets() {
        assert_eq!(
            sign("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", ID, TIMESTAMP, BODY),
            Err(SecretError::MissingPrefix)
        );
        assert_eq!(
            sign("whsec_not base64!", ID, TIMESTAMP, BODY),
            Err(SecretError::NotBase64)
        );
        // Unpadded base64 is not the format.
        assert_eq!(
            sign("whsec_c2VjcmV0LWtleQ", ID, TIMESTAMP, BODY),
            Err(SecretError::NotBase64)
        );
        assert_eq!(
            sign("whsec_", ID, TIMESTAMP, BODY),
            Err(SecretError::EmptyKey)
        );
        let ts = TIMESTAMP.to_string();
        assert_eq!(
            verify(
                "whsec_",
                &headers(&ts, SIGNATURE),
                BODY,
                TIMESTAMP,
                DEFAULT_TOLERANCE
            ),
            Err(VerifyError::Secret(SecretError::EmptyKey))
        );
    }

    #[test]
    fn reads_the_headers_from_a_header_map() {
        let mut map = HeaderMap::new();
        map.insert(WEBHOOK_ID, HeaderValue::from_static(ID));
        map.insert(WEBHOOK_TIMESTAMP, HeaderValue::from_static("1614265330"));
        map.insert(WEBHOOK_SIGNATURE, HeaderValue::from_static(""));
        let headers = WebhookHeaders::from_map(&map);
        assert_eq!(headers.id, Some(ID));
        assert_eq!(headers.timestamp, Some("1614265330"));
        assert_eq!(headers.signature, None);
    }

    #[test]
    fn checks_the_event_shape() {
        let event = json!({"type": "usage.threshold_reached", "timestamp": "2024-05-01T12:00:00Z", "data": {}});
        assert_eq!(check_event(&event), Ok(()));
        for bad in [
            json!([]),
            json!({"timestamp": "2024-05-01T12:00:00Z", "data": {}}),
            json!({"type": "", "timestamp": "2024-05-01T12:00:00Z", "data": {}}),
            json!({"type": "x", "timestamp": "yesterday", "data": {}}),
            json!({"type": "x", "timestamp": 1_714_564_800, "data": {}}),
            json!({"type": "x", "timestamp": "2024-05-01T12:00:00Z", "data": []}),
        ] {
            assert!(check_event(&bad).is_err(), "{bad}");
        }
    }
}
