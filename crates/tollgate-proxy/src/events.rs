//! What the proxy logs and counts, as named events.
//!
//! Each event is one [`Event`]: [`Event::emit`] writes its log line (if it
//! has one) and moves its metrics in one call, with labels from enums. The
//! code that raises an event says what happened; how that is logged and
//! counted is decided here, once.
//!
//! Log lines keep the target of the component that raises them
//! (`tollgate_proxy::pipeline`, `tollgate_proxy::server`, ...), so a
//! `RUST_LOG` filter by component keeps working; the access log's target is
//! `tollgate::access`.

use std::fmt::Display;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::HeaderValue;
use metrics::Gauge;
use tollgate_metering::limits::Rejection;
use tollgate_metering::usage::InvalidValues;
use uuid::Uuid;

pub(crate) use tollgate_metering::telemetry::{emit, Event};

use crate::metrics::{AuthFailure, Metrics, RequestOutcome, RouteMetrics, UpstreamErrorKind};

const ACCESS: &str = "tollgate::access";
const ADMIN: &str = "tollgate_proxy::admin";
const METER: &str = "tollgate_proxy::meter";
const PIPELINE: &str = "tollgate_proxy::pipeline";
const SERVER: &str = "tollgate_proxy::server";

/// Which side of the proxy an error is attributed to: a refusal of the
/// client's request is logged at debug, a failure of the upstream or of
/// the gateway itself at warn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ErrorSide {
    /// The client sent something we refuse.
    Downstream,
    /// The origin failed us.
    Upstream,
    /// We failed ourselves.
    Internal,
}

/// What a refusal counts, besides the request itself.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Refusal<'a> {
    /// `tollgate_auth_failures_total{reason}`.
    Auth(AuthFailure),
    /// `tollgate_limit_rejections_total{limit}`.
    Limit(&'a Rejection),
    /// `tollgate_metering_unavailable_total`.
    MeteringUnavailable,
}

/// The gateway answered a request with its own error: logged as "Request
/// refused." (the client's fault) or "Request failed." (the upstream's or
/// ours), and counted by why, when it was refused for a missing or invalid
/// key, a limit, or metering being unavailable.
pub(crate) struct RequestRefused<'a> {
    pub(crate) error: &'a dyn Display,
    pub(crate) status: u16,
    /// The error's documented `type`.
    pub(crate) kind: &'static str,
    pub(crate) side: ErrorSide,
    pub(crate) request_id: &'a HeaderValue,
    /// The refusal's own counter, and the registry it is in; `None` for
    /// the gateway's own paths (`/_tollgate/`), which are not traffic.
    pub(crate) counted: Option<(&'a Metrics, Refusal<'a>)>,
}

impl Event for RequestRefused<'_> {
    fn emit(self) {
        let RequestRefused {
            error,
            status,
            kind,
            side,
            request_id,
            counted,
        } = self;
        match counted {
            Some((metrics, Refusal::Auth(reason))) => metrics.auth_failed(reason),
            Some((metrics, Refusal::Limit(rejection))) => metrics.limit_rejected(rejection),
            Some((metrics, Refusal::MeteringUnavailable)) => metrics.metering_unavailable(),
            None => {}
        }
        match side {
            ErrorSide::Downstream => tracing::debug!(
                target: PIPELINE,
                message = "Request refused.",
                %error, status, kind, request_id = ?request_id,
            ),
            ErrorSide::Upstream | ErrorSide::Internal => tracing::warn!(
                target: PIPELINE,
                message = "Request failed.",
                %error, status, kind, request_id = ?request_id,
            ),
        }
    }
}

/// A data-plane request ended, with or without a usage row: counted in
/// `tollgate_requests_total` and timed, and written to the access log when
/// it is on.
pub(crate) struct RequestCompleted<'a> {
    /// The route's handles (the unrouted ones before routing).
    pub(crate) route: &'a RouteMetrics,
    /// `0` when the client went away before any status was known.
    pub(crate) status: u16,
    pub(crate) outcome: RequestOutcome,
    /// From the request's start to its end.
    pub(crate) took: Duration,
    /// What only the access log says; `None` when it is off.
    pub(crate) access: Option<AccessFields<'a>>,
}

/// The access log's fields beyond route, status, outcome and latency:
/// never a key, a body or a customer.
pub(crate) struct AccessFields<'a> {
    /// The client's sane `x-request-id`, else the usage id.
    pub(crate) request_id: &'a str,
    pub(crate) method: &'a str,
    pub(crate) upstream_latency_us: u64,
}

impl Event for RequestCompleted<'_> {
    fn emit(self) {
        self.route.request(self.status, self.outcome, self.took);
        if let Some(access) = self.access {
            tracing::info!(
                target: ACCESS,
                message = "request",
                request_id = access.request_id,
                route = self.route.name(),
                method = access.method,
                status = self.status,
                outcome = self.outcome.as_str(),
                latency_us = micros(self.took),
                upstream_latency_us = access.upstream_latency_us,
            );
        }
    }
}

/// The upstream sent its response headers: timed in
/// `tollgate_upstream_duration_seconds`, and traced.
pub(crate) struct UpstreamAnswered<'a> {
    pub(crate) route: &'a RouteMetrics,
    pub(crate) status: u16,
    /// From the request's start to the response headers.
    pub(crate) latency: Duration,
}

impl Event for UpstreamAnswered<'_> {
    fn emit(self) {
        self.route.upstream_answered(self.latency);
        tracing::trace!(
            target: PIPELINE,
            message = "Upstream answered.",
            route = self.route.name(),
            status = self.status,
            upstream_latency_us = micros(self.latency),
        );
    }
}

/// The upstream could not be reached, did not answer in time, or broke
/// the exchange (before or during its body): counted in
/// `tollgate_upstream_errors_total{route, kind}`. Its log line is the
/// request's ([`RequestRefused`]) when the gateway still answers.
pub(crate) struct UpstreamFailed<'a> {
    pub(crate) route: &'a RouteMetrics,
    pub(crate) kind: UpstreamErrorKind,
}

impl Event for UpstreamFailed<'_> {
    fn emit(self) {
        self.route.upstream_error(self.kind);
    }
}

/// Usage values the upstream reported were ignored as invalid: counted by
/// field, and logged once per request.
pub(crate) struct InvalidUsageIgnored<'a> {
    pub(crate) route: &'a RouteMetrics,
    pub(crate) usage_id: Uuid,
    pub(crate) invalid: &'a InvalidValues,
}

impl Event for InvalidUsageIgnored<'_> {
    fn emit(self) {
        if self.invalid.iter().next().is_none() {
            return;
        }
        self.route.invalid_values(self.invalid);
        let fields: Vec<&str> = self
            .invalid
            .iter()
            .map(|(field, _)| field.as_str())
            .collect();
        tracing::debug!(
            target: METER,
            message = "Ignored invalid usage values from the upstream.",
            route = %self.route.name(),
            usage_id = %self.usage_id,
            fields = ?fields,
        );
    }
}

/// An upstream compressed a response on a route that reads usage from
/// bodies, although the gateway asked for it uncompressed: the row gets
/// no tokens from that body. Logged at warn, at most once a second for the
/// whole process: it is an upstream to fix, not a passing event.
pub(crate) struct CompressedResponse<'a> {
    pub(crate) route: &'a RouteMetrics,
}

impl Event for CompressedResponse<'_> {
    fn emit(self) {
        static LAST_SECOND: AtomicU64 = AtomicU64::new(0);
        let second = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let last = LAST_SECOND.load(Ordering::Relaxed);
        if second > last
            && LAST_SECOND
                .compare_exchange(last, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                target: METER,
                message = "The upstream compressed a response although asked not to; its usage cannot be read from the body.",
                route = %self.route.name(),
            );
        }
    }
}

/// Accepting connections failed (file descriptors ran out, ...); logged at
/// most once a second, with the failures since the last line.
pub(crate) struct AcceptFailed<'a> {
    pub(crate) error: &'a std::io::Error,
    pub(crate) failures: u64,
}

impl Event for AcceptFailed<'_> {
    fn emit(self) {
        tracing::warn!(
            target: SERVER,
            message = "Accepting connections failed; backing off.",
            error = %self.error,
            failures = self.failures,
        );
    }
}

/// A client connection was accepted: `tollgate_open_connections{listener}`
/// goes up.
pub(crate) struct ConnectionOpened<'a> {
    pub(crate) open_connections: &'a Gauge,
}

impl Event for ConnectionOpened<'_> {
    fn emit(self) {
        self.open_connections.increment(1.0);
    }
}

/// How a connection ended.
#[derive(Debug)]
pub(crate) enum ConnectionEnd {
    /// The client closed it, or it finished its last request.
    Done,
    Failed(String),
    /// No complete request head within the header timeout of connecting.
    HeaderTimeout,
    Idle,
    /// Its response waited for the client for `idle_timeout` (HTTP/1).
    Stalled,
    /// Closed for shutdown.
    Drained,
    /// Still open when the shutdown grace ended.
    Dropped,
}

/// A client connection ended: `tollgate_open_connections{listener}` goes
/// down, and why it ended is logged (at debug) unless it ended normally.
pub(crate) struct ConnectionClosed<'a> {
    pub(crate) open_connections: &'a Gauge,
    pub(crate) peer: SocketAddr,
    pub(crate) end: ConnectionEnd,
}

impl Event for ConnectionClosed<'_> {
    fn emit(self) {
        self.open_connections.decrement(1.0);
        let peer = self.peer;
        match self.end {
            ConnectionEnd::Done | ConnectionEnd::Drained => {}
            ConnectionEnd::Failed(error) => {
                tracing::debug!(target: SERVER, message = "Connection ended with an error.", %error, peer = %peer);
            }
            ConnectionEnd::HeaderTimeout => {
                tracing::debug!(target: SERVER, message = "Closed a connection that sent no request in time.", peer = %peer);
            }
            ConnectionEnd::Idle => {
                tracing::debug!(target: SERVER, message = "Closed an idle connection.", peer = %peer);
            }
            ConnectionEnd::Stalled => {
                tracing::debug!(
                    target: SERVER,
                    message = "Abandoned a response its client stopped reading.",
                    peer = %peer,
                );
            }
            ConnectionEnd::Dropped => {
                tracing::debug!(target: SERVER, message = "Dropped a connection at the end of the shutdown grace.", peer = %peer);
            }
        }
    }
}

/// The shutdown grace ended with connections still open; they are
/// dropped.
pub(crate) struct ShutdownGraceEnded {
    pub(crate) grace: Duration,
    pub(crate) connections: usize,
}

impl Event for ShutdownGraceEnded {
    fn emit(self) {
        tracing::warn!(
            target: SERVER,
            message = "Shutdown grace period ended with connections still open.",
            grace_secs = self.grace.as_secs_f64(),
            connections = self.connections,
        );
    }
}

/// An admin request failed inside the gateway (a store error that is not
/// the client's, a panic in a handler, ...): answered 500 and logged.
pub(crate) struct AdminRequestFailed<'a> {
    pub(crate) error: &'a str,
}

impl Event for AdminRequestFailed<'_> {
    fn emit(self) {
        tracing::error!(target: ADMIN, message = "Admin request failed.", error = %self.error);
    }
}

/// A usage export broke off after its first page: the client sees an
/// incomplete transfer.
pub(crate) struct ExportBrokenOff<'a> {
    pub(crate) error: &'a dyn Display,
}

impl Event for ExportBrokenOff<'_> {
    fn emit(self) {
        tracing::warn!(target: ADMIN, message = "Usage export failed mid-stream.", error = %self.error);
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}
