//! The request path: one request through its phases, top to bottom.
//!
//! [`Gateway::handle`] is the only place that renders, logs and counts an
//! error; [`Gateway::handle_inner`] is a flat chain of phases, each of which
//! may end the request with a [`ProxyError`]:
//!
//! 1. framing      — refuse conflicting Content-Length / Transfer-Encoding
//! 2. route        — longest prefix, else 404 `no_route`
//! 3. authenticate — the key from the configured headers, checked against
//!    the in-memory cache (401), and its route list (403)
//! 4. body limit   — a declared body over `max_request_body` is 413 up front
//! 5. forward      — rewrite the head, stream the body, wait for response
//!    headers up to the route's timeout
//! 6. respond      — strip hop-by-hop and configured headers, stream the body
//!    back

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{HeaderValue, CONTENT_LENGTH, EXPECT, HOST, TRANSFER_ENCODING};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use uuid::Uuid;

use crate::auth::Authenticator;
use crate::body::{ProxyBody, RequestBody};
use crate::error::{ErrorSide, ProxyError};
use crate::forward::{is_body_too_large, UpstreamClient};
use crate::framing::FramingMark;
use crate::headers::{sane_request_id, set_forwarded, strip_hop_by_hop, X_REQUEST_ID};
use crate::route::{Route, RouteTable};

/// What the data plane knows about the connection a request came in on.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// `"http"` or `"https"`, for `x-forwarded-proto`.
    pub proto: &'static str,
    pub framing: FramingMark,
}

/// Settings of the data plane that are not per route.
#[derive(Clone, Debug)]
pub struct GatewaySettings {
    pub max_request_body: u64,
}

/// The data plane: routes, keys and the upstream client.
pub struct Gateway {
    routes: RouteTable,
    auth: Authenticator,
    client: UpstreamClient,
    settings: GatewaySettings,
}

impl Gateway {
    pub fn new(
        routes: RouteTable,
        auth: Authenticator,
        client: UpstreamClient,
        settings: GatewaySettings,
    ) -> Self {
        Gateway {
            routes,
            auth,
            client,
            settings,
        }
    }

    /// Serves one request. Never fails: every error becomes a response.
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        conn: ConnInfo,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let usage_id = Uuid::now_v7();
        let request_id = sane_request_id(request.headers())
            .cloned()
            .unwrap_or_else(|| usage_id_header(usage_id));
        let mut response = match self.handle_inner(request, &conn, &request_id).await {
            Ok(response) => response,
            Err(error) => {
                let (status, kind, side) = error.classify();
                match side {
                    ErrorSide::Downstream => tracing::debug!(
                        message = "Request refused.",
                        %error, status = status.as_u16(), kind, request_id = ?request_id,
                    ),
                    ErrorSide::Upstream | ErrorSide::Internal => tracing::warn!(
                        message = "Request failed.",
                        %error, status = status.as_u16(), kind, request_id = ?request_id,
                    ),
                }
                error.into_response()
            }
        };
        response
            .headers_mut()
            .insert(X_REQUEST_ID.clone(), request_id);
        Ok(response)
    }

    async fn handle_inner(
        &self,
        request: Request<Incoming>,
        conn: &ConnInfo,
        request_id: &HeaderValue,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        check_framing(&request, conn)?;
        let route = self
            .routes
            .find(request.uri().path())
            .ok_or(ProxyError::NoRoute)?;
        let caller = self.auth.authenticate(request.headers())?;
        if !caller.may_use(&route.name) {
            return Err(ProxyError::RouteForbidden {
                route: route.name.clone(),
            });
        }
        self.check_declared_length(&request)?;
        let upstream_request = self.upstream_request(route, request, conn, request_id)?;
        let upstream_response = self.forward(route, upstream_request).await?;
        Ok(downstream_response(route, upstream_response))
    }

    fn check_declared_length(&self, request: &Request<Incoming>) -> Result<(), ProxyError> {
        let limit = self.settings.max_request_body;
        let declared = request
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        match declared {
            Some(length) if length > limit => Err(ProxyError::PayloadTooLarge { limit }),
            _ => Ok(()),
        }
    }

    /// Rewrites the client's request for the upstream. The body is not
    /// touched: it streams through [`RequestBody`], which enforces the limit
    /// on bodies that did not declare their length.
    fn upstream_request(
        &self,
        route: &Route,
        request: Request<Incoming>,
        conn: &ConnInfo,
        request_id: &HeaderValue,
    ) -> Result<Request<RequestBody>, ProxyError> {
        let (mut parts, body) = request.into_parts();
        let uri = route
            .upstream_uri(&parts.uri)
            .map_err(|error| ProxyError::Internal {
                reason: format!("cannot build the upstream URI: {error}"),
            })?;
        // HTTP/2 clients carry the host in the URI authority, HTTP/1 ones in
        // the Host header.
        let client_host = parts.headers.remove(HOST).or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|authority| HeaderValue::from_str(authority.as_str()).ok())
        });
        let headers = &mut parts.headers;
        strip_hop_by_hop(headers);
        self.auth.strip_key_headers(headers);
        // `Expect: 100-continue` was answered on the client's hop (hyper
        // sends the 100 when the body is first read); it does not travel on.
        headers.remove(EXPECT);
        set_forwarded(headers, conn.peer.ip(), conn.proto, client_host);
        headers.insert(X_REQUEST_ID.clone(), request_id.clone());
        headers.insert(HOST, route.host_header().clone());
        for (name, value) in &route.set_headers {
            headers.insert(name.clone(), value.clone());
        }
        parts.uri = uri;
        // The pooled client speaks HTTP/2 on connections that negotiated it
        // whatever version the request says, but refuses an HTTP/2 request on
        // an HTTP/1 connection; HTTP/1.1 works on both.
        parts.version = Version::HTTP_11;
        parts.extensions = http::Extensions::new();
        let body = RequestBody::new(body, self.settings.max_request_body);
        Ok(Request::from_parts(parts, body))
    }

    async fn forward(
        &self,
        route: &Route,
        request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let started = Instant::now();
        let result = tokio::time::timeout(route.timeout, self.client.request(request)).await;
        let response = match result {
            Err(_elapsed) => {
                return Err(ProxyError::UpstreamTimeout {
                    after: route.timeout,
                })
            }
            Ok(Err(error)) if is_body_too_large(&error) => {
                return Err(ProxyError::PayloadTooLarge {
                    limit: self.settings.max_request_body,
                })
            }
            Ok(Err(error)) => {
                return Err(ProxyError::UpstreamUnavailable {
                    source: Box::new(error),
                })
            }
            Ok(Ok(response)) => response,
        };
        tracing::trace!(
            message = "Upstream answered.",
            route = %route.name,
            status = response.status().as_u16(),
            upstream_latency_us = started.elapsed().as_micros() as u64,
        );
        Ok(response)
    }
}

/// Phase 1: a request that arrived with both Content-Length and
/// Transfer-Encoding (see [`crate::framing`]) is refused.
fn check_framing(request: &Request<Incoming>, conn: &ConnInfo) -> Result<(), ProxyError> {
    if request.version() >= Version::HTTP_2 {
        return Ok(());
    }
    // Taken on every HTTP/1 request so a stale mark cannot outlive the
    // request that follows it.
    let conflicting = conn.framing.take();
    if conflicting && request.headers().contains_key(TRANSFER_ENCODING) {
        return Err(ProxyError::MalformedRequest {
            reason: "both Content-Length and Transfer-Encoding are present",
        });
    }
    Ok(())
}

/// Phase 5: the upstream's response as the client will see it.
fn downstream_response(route: &Route, response: Response<Incoming>) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    for name in &route.strip_response_headers {
        parts.headers.remove(name);
    }
    parts.version = Version::HTTP_11;
    Response::from_parts(parts, ProxyBody::Upstream(body))
}

fn usage_id_header(id: Uuid) -> HeaderValue {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = id.hyphenated().encode_lower(&mut buf);
    // A hyphenated UUID is always a valid header value.
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}
