//! The gateway's own error responses.
//!
//! Every response the gateway makes itself (as opposed to relaying the
//! upstream's) comes from one [`ProxyError`], rendered in one place,
//! [`ProxyError::into_response`]. Each variant maps to exactly one status and
//! `type` in one exhaustive `match`, so a new variant cannot be added without
//! deciding how the client sees it.
//!
//! The body is shaped like OpenAI's errors, so OpenAI SDKs show it; on a
//! route whose upstream speaks Anthropic's API it is shaped like Anthropic's
//! instead ([`ErrorShape`]), so the Anthropic SDKs raise the matching
//! exception class. Either way the `x-tollgate-error` header names the
//! gateway's own type, which tells a client and an operator that the
//! gateway answered, not the upstream.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use tollgate_metering::keys::KeyFormatError;
use tollgate_metering::keys::KeyRefusal;
use tollgate_metering::limits::Rejection;
use tollgate_metering::usage::{Outcome, UnmeterableRequest};

use crate::body::ProxyBody;
use crate::events::{ErrorSide, Refusal};
use crate::metrics::AuthFailure;

/// Why a presented key is not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum InvalidKey {
    #[error("malformed: {0}")]
    Malformed(KeyFormatError),
    #[error("{0}")]
    Refused(KeyRefusal),
}

impl InvalidKey {
    /// The `reason` label of `tollgate_auth_failures_total`.
    pub(crate) fn label(&self) -> AuthFailure {
        match self {
            InvalidKey::Malformed(_) => AuthFailure::Malformed,
            InvalidKey::Refused(KeyRefusal::Unknown) => AuthFailure::Unknown,
            InvalidKey::Refused(KeyRefusal::Revoked) => AuthFailure::Revoked,
            InvalidKey::Refused(KeyRefusal::Expired) => AuthFailure::Expired,
        }
    }
}

/// Everything that makes the gateway answer a request itself.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    /// The request is malformed (for example it carries both Content-Length
    /// and Transfer-Encoding). The connection is closed after the response.
    #[error("malformed request: {reason}")]
    MalformedRequest { reason: &'static str },

    /// A request body to an OpenAI completions endpoint that the gateway
    /// cannot read well enough to be sure of metering the stream it may
    /// ask for. The body was read whole, so the connection stays open; the
    /// request gets no usage row, like any malformed request.
    #[error("unmeterable request body: {reason}")]
    UnmeterableBody { reason: UnmeterableRequest },

    /// The request line and headers together exceed `max_header_bytes`.
    #[error("request head exceeds the limit of {limit} bytes")]
    HeaderTooLarge { limit: u64 },

    /// The request line alone exceeds `max_header_bytes`.
    #[error("request line exceeds the limit of {limit} bytes")]
    UriTooLong { limit: u64 },

    /// The client sent nothing of its request body for
    /// `request_body_timeout`.
    #[error("the request body stalled for {}s", after.as_secs_f64())]
    RequestTimeout { after: Duration },

    /// No route's prefix matches the path.
    #[error("no route matches the request path")]
    NoRoute,

    /// No configured header carried a key.
    #[error("no API key was presented")]
    MissingApiKey,

    /// The key is malformed, unknown, revoked or expired.
    #[error("invalid API key: {reason}")]
    InvalidApiKey { reason: InvalidKey },

    /// The key is limited to other routes.
    #[error("the API key may not use route {route}")]
    RouteForbidden { route: std::sync::Arc<str> },

    /// A limit refused the request (429 with `Retry-After`).
    #[error("{0}")]
    Limited(Rejection),

    /// The request body is larger than `server.max_request_body`.
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge { limit: u64 },

    /// The upstream refused the connection, reset it, or sent garbage.
    #[error("upstream unavailable: {source}")]
    UpstreamUnavailable {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The upstream did not send response headers within the route's timeout.
    #[error("upstream did not respond within {}s", after.as_secs_f64())]
    UpstreamTimeout { after: Duration },

    /// The usage spool is full and the database is down: serving the
    /// request would leave it unmetered (`usage.on_spool_full = "reject"`).
    #[error("metering unavailable: the usage spool is full and the database is down")]
    MeteringUnavailable,

    /// The gateway could not build the upstream request (a bug or a config
    /// that slipped past validation).
    #[error("internal error: {reason}")]
    Internal { reason: String },
}

impl ProxyError {
    /// The HTTP status, the documented error `type`, and the side to blame.
    pub(crate) fn classify(&self) -> (StatusCode, &'static str, ErrorSide) {
        match self {
            ProxyError::MalformedRequest { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request",
                ErrorSide::Downstream,
            ),
            ProxyError::UnmeterableBody { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request",
                ErrorSide::Downstream,
            ),
            ProxyError::HeaderTooLarge { .. } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request_header_fields_too_large",
                ErrorSide::Downstream,
            ),
            ProxyError::UriTooLong { .. } => (
                StatusCode::URI_TOO_LONG,
                "invalid_request",
                ErrorSide::Downstream,
            ),
            ProxyError::RequestTimeout { .. } => (
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                ErrorSide::Downstream,
            ),
            ProxyError::NoRoute => (StatusCode::NOT_FOUND, "no_route", ErrorSide::Downstream),
            ProxyError::MissingApiKey => (
                StatusCode::UNAUTHORIZED,
                "missing_api_key",
                ErrorSide::Downstream,
            ),
            ProxyError::InvalidApiKey { .. } => (
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                ErrorSide::Downstream,
            ),
            ProxyError::RouteForbidden { .. } => (
                StatusCode::FORBIDDEN,
                "route_forbidden",
                ErrorSide::Downstream,
            ),
            ProxyError::Limited(rejection) => (
                StatusCode::TOO_MANY_REQUESTS,
                rejection.outcome().as_str(),
                ErrorSide::Downstream,
            ),
            ProxyError::PayloadTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                ErrorSide::Downstream,
            ),
            ProxyError::UpstreamUnavailable { .. } => (
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable",
                ErrorSide::Upstream,
            ),
            ProxyError::UpstreamTimeout { .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                ErrorSide::Upstream,
            ),
            ProxyError::MeteringUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "metering_unavailable",
                ErrorSide::Internal,
            ),
            ProxyError::Internal { .. } => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                ErrorSide::Internal,
            ),
        }
    }

    /// The message shown to the client. It names no key, no body content and
    /// nothing of the upstream's internals beyond what helps the caller.
    fn client_message(&self) -> String {
        match self {
            ProxyError::MalformedRequest { reason } => format!("Malformed request: {reason}."),
            ProxyError::UnmeterableBody { reason } => format!(
                "The gateway must read this request to meter the stream it may ask for, \
                 and cannot: {reason}."
            ),
            ProxyError::HeaderTooLarge { limit } => {
                format!("The request line and headers exceed the limit of {limit} bytes.")
            }
            ProxyError::UriTooLong { limit } => {
                format!("The request line exceeds the limit of {limit} bytes.")
            }
            ProxyError::RequestTimeout { after } => format!(
                "The request body sent nothing for {} seconds.",
                after.as_secs_f64()
            ),
            ProxyError::NoRoute => "No route is configured for this path.".to_owned(),
            ProxyError::MissingApiKey => {
                "No API key was presented. Send it as `Authorization: Bearer <key>`.".to_owned()
            }
            ProxyError::InvalidApiKey { reason } => match reason {
                InvalidKey::Malformed(error) => format!("The API key is malformed: {error}."),
                InvalidKey::Refused(refusal) => {
                    let mut message = refusal.to_string();
                    if let Some(first) = message.get_mut(..1) {
                        first.make_ascii_uppercase();
                    }
                    message.push('.');
                    message
                }
            },
            ProxyError::RouteForbidden { route } => {
                format!("This API key may not be used on route \"{route}\".")
            }
            ProxyError::Limited(rejection) => {
                let mut message = rejection.to_string();
                if let Some(first) = message.get_mut(..1) {
                    first.make_ascii_uppercase();
                }
                message.push('.');
                message
            }
            ProxyError::PayloadTooLarge { limit } => {
                format!("The request body exceeds the limit of {limit} bytes.")
            }
            ProxyError::UpstreamUnavailable { .. } => {
                "The upstream service is unavailable.".to_owned()
            }
            ProxyError::UpstreamTimeout { after } => format!(
                "The upstream service did not respond within {} seconds.",
                after.as_secs_f64()
            ),
            ProxyError::MeteringUnavailable => {
                "Usage metering is unavailable; retry later.".to_owned()
            }
            ProxyError::Internal { .. } => "The gateway failed to handle the request.".to_owned(),
        }
    }

    /// The usage row outcome of a request that presented a valid key and
    /// ended with this error; `None` for errors that record no row (they
    /// happen before the key is known, or mean nothing can be recorded).
    pub(crate) fn outcome(&self) -> Option<Outcome> {
        match self {
            ProxyError::RouteForbidden { .. } => Some(Outcome::RouteForbidden),
            ProxyError::Limited(rejection) => Some(rejection.outcome()),
            ProxyError::PayloadTooLarge { .. } => Some(Outcome::PayloadTooLarge),
            ProxyError::RequestTimeout { .. } => Some(Outcome::ClientTimeout),
            ProxyError::UpstreamTimeout { .. } => Some(Outcome::UpstreamTimeout),
            ProxyError::UpstreamUnavailable { .. } | ProxyError::Internal { .. } => {
                Some(Outcome::UpstreamError)
            }
            ProxyError::MalformedRequest { .. }
            | ProxyError::UnmeterableBody { .. }
            | ProxyError::HeaderTooLarge { .. }
            | ProxyError::UriTooLong { .. }
            | ProxyError::NoRoute
            | ProxyError::MissingApiKey
            | ProxyError::InvalidApiKey { .. }
            | ProxyError::MeteringUnavailable => None,
        }
    }

    /// Whether a request that presented a valid key and ended with this
    /// error is withdrawn from metering (no row, its reservation given
    /// back): a body found malformed only once it was read.
    pub(crate) fn withdraws_usage(&self) -> bool {
        matches!(self, ProxyError::UnmeterableBody { .. })
    }

    /// What this error counts besides the request, when it refused one: a
    /// missing or invalid key, a limit, or metering being unavailable.
    pub(crate) fn refusal(&self) -> Option<Refusal<'_>> {
        match self {
            ProxyError::MissingApiKey => Some(Refusal::Auth(AuthFailure::Missing)),
            ProxyError::InvalidApiKey { reason } => Some(Refusal::Auth(reason.label())),
            ProxyError::Limited(rejection) => Some(Refusal::Limit(rejection)),
            ProxyError::MeteringUnavailable => Some(Refusal::MeteringUnavailable),
            ProxyError::MalformedRequest { .. }
            | ProxyError::UnmeterableBody { .. }
            | ProxyError::HeaderTooLarge { .. }
            | ProxyError::UriTooLong { .. }
            | ProxyError::RequestTimeout { .. }
            | ProxyError::NoRoute
            | ProxyError::RouteForbidden { .. }
            | ProxyError::PayloadTooLarge { .. }
            | ProxyError::UpstreamUnavailable { .. }
            | ProxyError::UpstreamTimeout { .. }
            | ProxyError::Internal { .. } => None,
        }
    }

    /// Whether the connection must be closed after this response (HTTP/1
    /// only): after a framing error the rest of the byte stream cannot be
    /// trusted, and after an unread oversized or stalled body it is cheaper
    /// to close than to drain.
    fn closes_connection(&self) -> bool {
        matches!(
            self,
            ProxyError::MalformedRequest { .. }
                | ProxyError::HeaderTooLarge { .. }
                | ProxyError::UriTooLong { .. }
                | ProxyError::PayloadTooLarge { .. }
                | ProxyError::RequestTimeout { .. }
        )
    }

    /// Renders the error body in `shape`.
    pub(crate) fn into_response(self, shape: ErrorShape) -> Response<ProxyBody> {
        let (status, kind, _) = self.classify();
        let message = self.client_message();
        let mut response = match shape {
            ErrorShape::OpenAi => error_response(status, kind, &message),
            ErrorShape::Anthropic => anthropic_error_response(status, kind, &message),
        };
        if let ProxyError::Limited(rejection) = &self {
            let headers = response.headers_mut();
            headers.insert(
                RETRY_AFTER,
                HeaderValue::from(rejection.retry_after().as_secs()),
            );
            // The official OpenAI and Anthropic SDKs read this before
            // anything else: a rate limit passes in seconds, and a budget
            // held by requests in flight as they end; a quota or a spent
            // budget only when the period resets.
            let retry = matches!(
                rejection,
                Rejection::RateLimited { .. } | Rejection::BudgetHeld { .. }
            );
            headers.insert(
                X_SHOULD_RETRY.clone(),
                HeaderValue::from_static(if retry { "true" } else { "false" }),
            );
        }
        if self.closes_connection() {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// How an error body is shaped for the client's SDK.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum ErrorShape {
    /// `{"error": {"type", "code", "message"}}`: OpenAI's, and the default.
    #[default]
    OpenAi,
    /// `{"type": "error", "error": {"type", "message"}}` with Anthropic's
    /// error types: on routes with `usage = "anthropic"`.
    Anthropic,
}

/// Whether a client should retry a 429 (README, Data plane behaviour).
static X_SHOULD_RETRY: http::HeaderName = http::HeaderName::from_static("x-should-retry");

/// Names the gateway's own error type on every error it produces.
pub(crate) static X_TOLLGATE_ERROR: http::HeaderName =
    http::HeaderName::from_static("x-tollgate-error");

/// The gateway's error body (OpenAI's shape), on the data plane and the
/// admin API alike.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

/// What went wrong: `type` and `code` are the same machine-readable word
/// (`invalid_request`, `unauthorized`, `not_found`, ...); `message` says
/// it for people, naming the field at fault where there is one.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct ErrorDetail<'a> {
    r#type: &'a str,
    code: &'a str,
    message: &'a str,
}

/// Builds `{"error": {"type", "code", "message"}}` with the given status.
/// Shared by the data plane and the admin API so both speak the same shape.
pub(crate) fn error_response(
    status: StatusCode,
    kind: &'static str,
    message: &str,
) -> Response<ProxyBody> {
    let body = ErrorBody {
        error: ErrorDetail {
            r#type: kind,
            code: kind,
            message,
        },
    };
    json_error(status, kind, serde_json::to_value(body).unwrap_or_default())
}

/// Anthropic's error body: the SDKs pick their exception class from the
/// status, and show `error.message`; `error.type` is one of Anthropic's.
fn anthropic_error_response(
    status: StatusCode,
    kind: &'static str,
    message: &str,
) -> Response<ProxyBody> {
    let anthropic_type = match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    };
    let body = serde_json::json!({
        "type": "error",
        "error": { "type": anthropic_type, "message": message }
    });
    json_error(status, kind, body)
}

fn json_error(
    status: StatusCode,
    kind: &'static str,
    body: serde_json::Value,
) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(X_TOLLGATE_ERROR.clone(), HeaderValue::from_static(kind));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn renders_the_openai_error_shape() {
        let response = ProxyError::PayloadTooLarge { limit: 10 }.into_response(ErrorShape::OpenAi);
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(response.headers()[CONNECTION], "close");
        assert_eq!(response.headers()[&X_TOLLGATE_ERROR], "payload_too_large");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["type"], "payload_too_large");
        assert_eq!(json["error"]["code"], "payload_too_large");
        assert_eq!(
            json["error"]["message"],
            "The request body exceeds the limit of 10 bytes."
        );
    }

    #[test]
    fn timeouts_and_refusals_blame_the_upstream() {
        let timeout = ProxyError::UpstreamTimeout {
            after: Duration::from_millis(1500),
        };
        assert_eq!(
            timeout.classify(),
            (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                ErrorSide::Upstream
            )
        );
        assert_eq!(
            ProxyError::NoRoute.classify().0,
            StatusCode::NOT_FOUND,
            "no_route is a 404"
        );
    }

    #[tokio::test]
    async fn anthropic_routes_get_anthropic_error_types() {
        let cases = [
            (
                ProxyError::MissingApiKey,
                401,
                "authentication_error",
                "missing_api_key",
            ),
            (
                ProxyError::RouteForbidden { route: "r".into() },
                403,
                "permission_error",
                "route_forbidden",
            ),
            (ProxyError::NoRoute, 404, "not_found_error", "no_route"),
            (
                ProxyError::PayloadTooLarge { limit: 1 },
                413,
                "invalid_request_error",
                "payload_too_large",
            ),
            (
                ProxyError::RequestTimeout {
                    after: Duration::from_secs(1),
                },
                408,
                "invalid_request_error",
                "request_timeout",
            ),
            (
                ProxyError::HeaderTooLarge { limit: 1 },
                431,
                "invalid_request_error",
                "request_header_fields_too_large",
            ),
            (
                ProxyError::MeteringUnavailable,
                503,
                "api_error",
                "metering_unavailable",
            ),
        ];
        for (error, status, anthropic, ours) in cases {
            let response = error.into_response(ErrorShape::Anthropic);
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(response.headers()[&X_TOLLGATE_ERROR], ours);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["type"], "error");
            assert_eq!(json["error"]["type"], anthropic, "{status}");
            assert!(json["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()));
        }
    }
}
