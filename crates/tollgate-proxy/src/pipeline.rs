//! The request path: one request through its phases, top to bottom.
//!
//! [`Gateway::handle`] is the only place that renders, logs and counts an
//! error; [`Gateway::handle_inner`] is a flat chain of phases, each of which
//! may end the request with a [`ProxyError`]:
//!
//! 1. check        — refuse a malformed request, on every request of a
//!    connection: conflicting Content-Length / Transfer-Encoding, a dot
//!    segment or encoded separator in the path, a bad `Host` (400), an
//!    oversized head (431, 414). The route is looked up first only to
//!    shape the error for its SDK ([`ErrorShape`])
//! 2. route        — longest prefix, else 404 `no_route`
//! 3. authenticate — the key from the configured headers, checked against
//!    the in-memory cache (401); from here on the request has a usage
//!    event ([`UsageGuard`]), unless metering is unavailable (503, no row);
//!    then its route list (403)
//! 4. admit        — a declared body over `max_request_body` is 413 first
//!    (it could never be served); then the customer's limits
//!    ([`tollgate_metering::limits`]): a request reservation, or 429 with
//!    `Retry-After` and `x-ratelimit-*`; a refusal consumes nothing
//! 5. body         — an OpenAI streaming request that did not ask for usage is read and
//!    rewritten to ask for it; a body that stalls for
//!    `request_body_timeout` is 408
//! 6. forward      — rewrite the head, stream the body, wait for response
//!    headers up to the route's timeout, which does not run while the
//!    upload waits for the client
//! 7. respond      — strip hop-by-hop and configured headers, stream the body
//!    back through the meter ([`MeteredBody`]), which records the usage
//!    event when the body ends
//!
//! A request that ends with the gateway's own error after step 3 records
//! its event in [`Gateway::handle`], with the error's outcome; one whose
//! client goes away records it when the guard is dropped. A panic anywhere
//! in the chain is answered 500 `internal_error`, never a dropped
//! connection.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::header::{
    HeaderValue, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, EXPECT, HOST,
    TRANSFER_ENCODING,
};
use http::request::Parts;
use http::{HeaderName, Method, Request, Response, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use time::OffsetDateTime;
use tollgate_metering::limits::{RateHeaders, Remaining};
use tollgate_metering::usage::format_usd;
use tollgate_metering::usage::Outcome;
use tollgate_metering::usage::Pricing;
use tollgate_metering::usage::{
    inject_include_usage, ResponseBody, UnmeterableRequest, UsageFormat,
};
use uuid::Uuid;

use crate::auth::Authenticator;
use crate::body::{BoxError, ProxyBody, RequestBody, Upload};
use crate::error::{ErrorShape, ProxyError};
use crate::events::{
    emit, AccessFields, CompressedResponse, RequestCompleted, RequestRefused, UpstreamAnswered,
    UpstreamFailed,
};
use crate::forward::{
    is_body_timed_out, is_body_too_large, is_client_body_failure, UpstreamBody, UpstreamClient,
};
use crate::framing::FramingMark;
use crate::headers::{
    remove_if_present, sane_request_id, set_forwarded, strip_hop_by_hop, strip_spoken_for,
    X_REQUEST_ID,
};
use crate::meter::{response_usage, MeteredBody, Metering, UsageGuard};
use crate::metrics::{RequestOutcome, RouteMetrics, UpstreamErrorKind};
use crate::panic::catch_panic;
use crate::quota::quota_document;
use crate::route::{Route, RouteTable};
use crate::validate;

/// What the data plane knows about the connection a request came in on.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The peer's address, as `x-forwarded-for` gives it.
    pub(crate) peer_ip: HeaderValue,
    /// `"http"` or `"https"`, for `x-forwarded-proto`.
    pub(crate) proto: &'static str,
    pub(crate) framing: FramingMark,
}

/// Settings of the data plane that are not per route.
#[derive(Clone, Debug)]
pub struct GatewaySettings {
    pub max_request_body: u64,
    /// Longest wait for the next bytes of a request body (408).
    pub request_body_timeout: Duration,
    /// Request line plus headers (431; 414 for the request line alone).
    pub max_header_bytes: u64,
}

/// The part of the data plane's config a reload replaces (SIGHUP,
/// `POST /v1/reload`). A request takes one snapshot when it starts and
/// keeps it to its end, so it finishes on the config it started with.
#[derive(Debug)]
pub struct LiveConfig {
    pub routes: RouteTable,
    pub pricing: Arc<Pricing>,
}

/// The data plane: routes, keys, metering and the upstream client.
pub struct Gateway {
    live: ArcSwap<LiveConfig>,
    auth: Authenticator,
    client: UpstreamClient,
    settings: GatewaySettings,
    metering: Arc<Metering>,
}

/// What one request carries through the phases.
struct Exchange {
    usage_id: Uuid,
    client_request_id: Option<String>,
    started: Instant,
    ts: OffsetDateTime,
    /// Set once the key is known.
    guard: Option<UsageGuard>,
    /// `x-ratelimit-*` for the customer's tightest request limit.
    rate_headers: Option<RateHeaders>,
    /// The budgets left as of admission (`x-tollgate-*-remaining`).
    remaining: Remaining,
    /// The matched route's metrics, once routed.
    route: Option<Arc<RouteMetrics>>,
    /// A `/_tollgate/` request: not forwarded, not counted as traffic.
    self_service: bool,
    /// How the gateway's own errors are shaped for this request's route.
    shape: ErrorShape,
}

impl Gateway {
    pub fn new(
        live: LiveConfig,
        auth: Authenticator,
        client: UpstreamClient,
        settings: GatewaySettings,
        metering: Arc<Metering>,
    ) -> Self {
        Gateway {
            live: ArcSwap::from_pointee(live),
            auth,
            client,
            settings,
            metering,
        }
    }

    /// Replaces routes and prices for the requests that start from now on.
    pub fn reconfigure(&self, live: LiveConfig) {
        self.live.store(Arc::new(live));
    }

    /// The config requests start with now.
    pub fn live(&self) -> Arc<LiveConfig> {
        self.live.load_full()
    }

    /// Serves one request. Never fails: every error becomes a response.
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        conn: ConnInfo,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let started = Instant::now();
        let ts = OffsetDateTime::now_utc();
        let usage_id = usage_id_at(ts);
        let client_request_id = sane_request_id(request.headers()).cloned();
        let mut exchange = Exchange {
            usage_id,
            client_request_id: client_request_id
                .as_ref()
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned),
            started,
            ts,
            guard: None,
            rate_headers: None,
            remaining: Remaining::default(),
            route: None,
            self_service: false,
            shape: ErrorShape::OpenAi,
        };
        let method = request.method().clone();
        let request_id = client_request_id.unwrap_or_else(|| usage_id_header(usage_id));
        let live = self.live.load_full();
        let result =
            catch_panic(self.handle_inner(request, &live, &conn, &request_id, &mut exchange))
                .await
                .unwrap_or_else(|panic| {
                    Err(ProxyError::Internal {
                        reason: format!("the request handler panicked: {panic}"),
                    })
                });
        drop(live);
        let mut response = match result {
            Ok(response) => response,
            Err(error) => {
                let (status, kind, side) = error.classify();
                let counted = (!exchange.self_service)
                    .then(|| error.refusal().map(|why| (&*self.metering.metrics, why)))
                    .flatten();
                match exchange.guard.take() {
                    // A malformed request found only once its body was
                    // read: no row, like the others.
                    Some(guard) if error.withdraws_usage() => {
                        guard.withdraw();
                        self.count_unmetered(
                            &error,
                            status.as_u16(),
                            &exchange,
                            &method,
                            &request_id,
                        );
                    }
                    // Every other request that presented a valid key has its
                    // row: an error with no outcome of its own after that
                    // point is the client's body failing (it went away or
                    // broke the framing mid-upload).
                    Some(guard) => guard.finish(
                        error.outcome().unwrap_or(Outcome::ClientClosed),
                        Some(status.as_u16()),
                    ),
                    None => self.count_unmetered(
                        &error,
                        status.as_u16(),
                        &exchange,
                        &method,
                        &request_id,
                    ),
                }
                emit(RequestRefused {
                    error: &error,
                    status: status.as_u16(),
                    kind,
                    side,
                    request_id: &request_id,
                    counted,
                });
                error.into_response(exchange.shape)
            }
        };
        let headers = response.headers_mut();
        headers.insert(X_REQUEST_ID.clone(), request_id);
        if let Some(rate) = exchange.rate_headers {
            set_rate_headers(headers, &rate);
        }
        set_remaining_headers(headers, &exchange.remaining);
        Ok(response)
    }

    /// Metrics and the access log for a request that ended without a usage
    /// event (before its key was known, or refused as unmeterable).
    fn count_unmetered(
        &self,
        error: &ProxyError,
        status: u16,
        exchange: &Exchange,
        method: &Method,
        request_id: &HeaderValue,
    ) {
        if exchange.self_service {
            return;
        }
        let metrics = &self.metering.metrics;
        let outcome = match error {
            ProxyError::MissingApiKey | ProxyError::InvalidApiKey { .. } => {
                RequestOutcome::AuthFailed
            }
            ProxyError::NoRoute => RequestOutcome::NoRoute,
            ProxyError::MeteringUnavailable => RequestOutcome::MeteringUnavailable,
            other => other
                .outcome()
                .map_or(RequestOutcome::InvalidRequest, RequestOutcome::Usage),
        };
        let route = exchange.route.as_ref().unwrap_or(metrics.unrouted());
        emit(RequestCompleted {
            route,
            status,
            outcome,
            took: exchange.started.elapsed(),
            access: self.metering.access_log.then(|| AccessFields {
                // The client's sane id or the usage id, both ASCII.
                request_id: request_id.to_str().unwrap_or_default(),
                method: method.as_str(),
                upstream_latency_us: 0,
            }),
        });
    }

    async fn handle_inner(
        &self,
        request: Request<Incoming>,
        live: &LiveConfig,
        conn: &ConnInfo,
        request_id: &HeaderValue,
        exchange: &mut Exchange,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let found = live.routes.find(request.uri().path());
        if found.is_some_and(|route| route.usage.format == UsageFormat::Anthropic) {
            exchange.shape = ErrorShape::Anthropic;
        }
        self.check_request(&request, conn)?;
        if request.uri().path().starts_with(SELF_SERVICE) {
            exchange.self_service = true;
            return self.self_service(&request);
        }
        let route = found.ok_or(ProxyError::NoRoute)?;
        exchange.route = Some(route.metrics.clone());
        let caller = self.auth.authenticate(request.headers())?;
        if !self.metering.recorder.accepting() {
            return Err(ProxyError::MeteringUnavailable);
        }
        let guard = exchange.guard.insert(UsageGuard::new(
            &self.metering,
            exchange.usage_id,
            exchange.client_request_id.take(),
            &caller,
            &route.metrics,
            &live.pricing,
            request.method(),
            request.uri().path(),
            exchange.started,
            exchange.ts,
        ));
        if !caller.may_use(&route.name) {
            return Err(ProxyError::RouteForbidden {
                route: route.name.clone(),
            });
        }
        self.check_declared_length(&request)?;
        let decision = self
            .metering
            .limiter
            .admit(caller.customer_id, caller.key_id);
        exchange.rate_headers = decision.headers;
        exchange.remaining = decision.remaining;
        let admission = decision.result.map_err(ProxyError::Limited)?;
        guard.admitted(admission);
        let format = usage_format(route, request.uri().path());
        let (mut parts, body) = request.into_parts();
        let (body, asked_for_usage) = self.request_body(route, &mut parts, body, guard).await?;
        let upstream_request = self.upstream_request(route, parts, body, conn, request_id)?;
        let upstream_response = self.forward(route, upstream_request, guard).await?;
        let upstream_latency = exchange.started.elapsed();
        guard.set_upstream_latency(upstream_latency);
        emit(UpstreamAnswered {
            route: &route.metrics,
            status: upstream_response.status().as_u16(),
            latency: upstream_latency,
        });
        let guard = exchange.guard.take().ok_or_else(|| ProxyError::Internal {
            reason: "usage event missing".to_owned(),
        })?;
        Ok(self.downstream_response(route, format, upstream_response, guard, asked_for_usage))
    }

    /// Step 0: the gateway's own paths. Authenticated like any request, but
    /// not forwarded, limited or metered.
    fn self_service(&self, request: &Request<Incoming>) -> Result<Response<ProxyBody>, ProxyError> {
        let caller = self.auth.authenticate(request.headers())?;
        let path = request.uri().path();
        if path != "/_tollgate/usage" {
            return Err(ProxyError::NoRoute);
        }
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return Err(ProxyError::MalformedRequest {
                reason: "/_tollgate/usage takes GET",
            });
        }
        let customer = caller.customer_id;
        let limiter = &self.metering.limiter;
        let view = limiter.view(customer);
        let known = self.metering.policies.customer(customer);
        let document = quota_document(
            customer,
            known.as_ref().map(|c| c.name.as_str()),
            known.as_ref().map(|c| c.tier.as_str()),
            &view,
        );
        let document = match limiter.key_view(caller.key_id) {
            Some(key_view) => document.with_key(caller.key_id, &key_view),
            None => document,
        };
        // A document of strings and integers always serializes.
        let body = serde_json::to_vec(&document).unwrap_or_default();
        let mut response = Response::new(ProxyBody::full(body));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(response)
    }

    /// The body to send upstream, and whether the gateway rewrote it to ask
    /// for usage (README, Usage metering: then the usage chunk this produces is
    /// hidden from the client).
    async fn request_body(
        &self,
        route: &Route,
        parts: &mut Parts,
        body: Incoming,
        guard: &mut UsageGuard,
    ) -> Result<(RequestBody, bool), ProxyError> {
        let limit = self.settings.max_request_body;
        let body = RequestBody::new(body, limit, self.settings.request_body_timeout);
        if !may_need_usage_option(route, parts) {
            return Ok((body.counted(guard.request_bytes()), false));
        }
        let bytes = match read_whole(body).await {
            Ok(bytes) => bytes,
            Err(error) => return Err(self.client_body_error(&*error)),
        };
        guard
            .request_bytes()
            .store(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let asked = if is_compressed(&parts.headers) {
            Err(UnmeterableRequest::Compressed)
        } else if !is_utf8(&parts.headers) {
            Err(UnmeterableRequest::NotUtf8)
        } else {
            inject_include_usage(&bytes)
        };
        match asked.map_err(|reason| ProxyError::UnmeterableBody { reason })? {
            Some(rewritten) => {
                parts
                    .headers
                    .insert(CONTENT_LENGTH, HeaderValue::from(rewritten.len()));
                Ok((RequestBody::buffered(Bytes::from(rewritten)), true))
            }
            None => Ok((RequestBody::buffered(bytes), false)),
        }
    }

    /// Phase 1: what makes a request malformed, on every request of a
    /// connection ([`crate::validate`], [`crate::framing`]).
    fn check_request(
        &self,
        request: &Request<Incoming>,
        conn: &ConnInfo,
    ) -> Result<(), ProxyError> {
        check_framing(request, conn)?;
        validate::check_head_size(
            request.method(),
            request.uri(),
            request.headers(),
            self.settings.max_header_bytes,
        )?;
        validate::check_path(request.uri().path())?;
        validate::check_host(request.version(), request.uri(), request.headers())
    }

    /// The error for a client body that failed on its way in: too large,
    /// stalled, or broken off.
    fn client_body_error(&self, error: &(dyn std::error::Error + 'static)) -> ProxyError {
        if is_body_too_large(error) {
            ProxyError::PayloadTooLarge {
                limit: self.settings.max_request_body,
            }
        } else if is_body_timed_out(error) {
            ProxyError::RequestTimeout {
                after: self.settings.request_body_timeout,
            }
        } else {
            ProxyError::MalformedRequest {
                reason: "the request body could not be read",
            }
        }
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
        mut parts: Parts,
        body: RequestBody,
        conn: &ConnInfo,
        request_id: &HeaderValue,
    ) -> Result<Request<RequestBody>, ProxyError> {
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
        strip_spoken_for(headers);
        self.auth.strip_key_headers(headers);
        // `Expect: 100-continue` was answered on the client's hop (hyper
        // sends the 100 when the body is first read); it does not travel on.
        remove_if_present(headers, &EXPECT);
        set_forwarded(headers, &conn.peer_ip, conn.proto, client_host);
        headers.insert(X_REQUEST_ID.clone(), request_id.clone());
        headers.insert(HOST, route.host_header().clone());
        // Usage is read from the response body as it passes, which a
        // compressed body hides: the official SDKs ask for gzip or br, and
        // upstreams behind a CDN grant it. So such a route asks for the
        // body as it is (a route's `set_headers` may still say otherwise).
        if route.usage.format != UsageFormat::None {
            headers.insert(ACCEPT_ENCODING, IDENTITY.clone());
        }
        for (name, value) in &route.set_headers {
            headers.insert(name.clone(), value.clone());
        }
        parts.uri = uri;
        // The pooled client speaks HTTP/2 on connections that negotiated it
        // whatever version the request says, but refuses an HTTP/2 request on
        // an HTTP/1 connection; HTTP/1.1 works on both.
        parts.version = Version::HTTP_11;
        parts.extensions = http::Extensions::new();
        Ok(Request::from_parts(parts, body))
    }

    async fn forward(
        &self,
        route: &Route,
        request: Request<RequestBody>,
        guard: &mut UsageGuard,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let upload = request.body().upload();
        let client = route.client(&self.client);
        // Boxed: the exchange with the upstream is a large state machine, and
        // inlined into the request's it would be copied about at every step.
        let exchange = Box::pin(client.request(request));
        let result = upstream_deadline(route.timeout, upload, exchange).await;
        // Only a failure to connect proves the upstream never saw it.
        if !matches!(&result, Some(Err(error)) if error.is_connect()) {
            guard.reached_upstream();
        }
        let client_failed = |error: &(dyn std::error::Error + 'static)| {
            is_body_too_large(error) || is_client_body_failure(error) || is_body_timed_out(error)
        };
        let failed = match &result {
            None => Some(UpstreamErrorKind::Timeout),
            Some(Err(error)) if error.is_connect() => Some(UpstreamErrorKind::Connect),
            Some(Err(error)) if client_failed(error) => None,
            Some(Err(_)) => Some(UpstreamErrorKind::Reset),
            Some(Ok(_)) => None,
        };
        if let Some(kind) = failed {
            emit(UpstreamFailed {
                route: &route.metrics,
                kind,
            });
        }
        let response = match result {
            None => {
                return Err(ProxyError::UpstreamTimeout {
                    after: route.timeout,
                })
            }
            Some(Err(error)) if client_failed(&error) => return Err(self.client_body_error(&error)),
            Some(Err(error)) => {
                return Err(ProxyError::UpstreamUnavailable {
                    source: Box::new(error),
                })
            }
            Some(Ok(response)) => response,
        };
        Ok(response)
    }
}

/// Waits for the upstream's response headers for `timeout`, not counting
/// the time the upload waits for the client: a slow client is the client's
/// (408, from the body), not the upstream's (504). `None` when the upstream
/// took too long.
async fn upstream_deadline<F: std::future::Future>(
    timeout: Duration,
    upload: Option<Arc<Upload>>,
    response: F,
) -> Option<F::Output> {
    let mut response = std::pin::pin!(response);
    let sleep = tokio::time::sleep(timeout);
    let mut sleep = std::pin::pin!(sleep);
    loop {
        tokio::select! {
            biased;
            output = &mut response => return Some(output),
            () = &mut sleep => {
                let now = tokio::time::Instant::now();
                let next = match upload.as_deref() {
                    Some(upload) if upload.waiting_on_client() => now + timeout,
                    Some(upload) => match upload.finished_at() {
                        Some(finished) if finished + timeout > now => finished + timeout,
                        _ => return None,
                    },
                    None => return None,
                };
                sleep.as_mut().reset(next);
            }
        }
    }
}

/// Phase 1: a request that arrived with both Content-Length and
/// Transfer-Encoding (see [`crate::framing`]) is refused.
fn check_framing(request: &Request<Incoming>, conn: &ConnInfo) -> Result<(), ProxyError> {
    if request.version() >= Version::HTTP_2 {
        return Ok(());
    }
    // Only a request that still shows Transfer-Encoding can be the one the
    // mark is about, so only such a request takes it: an earlier request
    // of a pipelined batch leaves it for the conflicting one behind it.
    if request.headers().contains_key(TRANSFER_ENCODING) && conn.framing.take() {
        return Err(ProxyError::MalformedRequest {
            reason: "both Content-Length and Transfer-Encoding are present",
        });
    }
    Ok(())
}

/// A body read whole, in one buffer: a body that came in many small frames
/// is held at its own size, where keeping the frames would keep each
/// one's read buffer too (a body sent a byte per frame, some 50 times its
/// size). A body that came in one frame is that frame.
async fn read_whole(mut body: RequestBody) -> Result<Bytes, BoxError> {
    let Some(first) = next_data(&mut body).await? else {
        return Ok(Bytes::new());
    };
    let Some(second) = next_data(&mut body).await? else {
        return Ok(first);
    };
    let more = usize::try_from(body.size_hint().lower())
        .unwrap_or(0)
        .min(1 << 20);
    let mut whole = BytesMut::with_capacity(first.len() + second.len() + more);
    whole.extend_from_slice(&first);
    whole.extend_from_slice(&second);
    while let Some(data) = next_data(&mut body).await? {
        whole.extend_from_slice(&data);
    }
    Ok(whole.freeze())
}

/// The body's next data, past any trailers; `None` at its end.
async fn next_data(body: &mut RequestBody) -> Result<Option<Bytes>, BoxError> {
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            return Ok(Some(data));
        }
    }
    Ok(None)
}

/// Whether a request on `route` may be an OpenAI streaming request that
/// must be rewritten to ask for usage: a POST to a `…/completions` endpoint
/// (Chat Completions and the legacy Completions API, the ones with
/// `stream_options`) on a metered route, by the client's path or the
/// upstream's: an `anthropic` route too, as Anthropic serves OpenAI's Chat
/// Completions beside its own API. Only these bodies are read before
/// forwarding. The content type is not asked: some upstreams read a body
/// as JSON whatever it says (FastAPI does when there is none).
fn may_need_usage_option(route: &Route, parts: &Parts) -> bool {
    let path = parts.uri.path();
    route.usage.format != UsageFormat::None
        && parts.method == Method::POST
        // The client's path, and the upstream's where the route rewrites
        // it (a base path in its upstream URL can name the endpoint).
        && (names_completions(path)
            || route
                .rewrite_path(path)
                .is_some_and(|upstream| names_completions(&upstream)))
}

/// Whether the path's last segment is `completions` as a lenient server
/// could route it: percent-decoded, in any case, without a `;` parameter,
/// trailing slashes ignored. A path the gateway reads as another endpoint
/// must not reach one that streams.
fn names_completions(path: &str) -> bool {
    last_segments(path)
        .next()
        .is_some_and(|last| names(last, b"completions"))
}

/// Whether the path is Anthropic's Messages API (`…/v1/messages`), read as
/// [`names_completions`] reads its last segment. An `openai` route's
/// upstream may serve it beside OpenAI's (vLLM, LiteLLM), and its stream
/// must then be read the Anthropic way, or its input tokens are lost.
fn names_messages(path: &str) -> bool {
    // A path that could name it ends in `s` (the request checks refuse a
    // percent-encoded letter and a `;`): most are done with at this byte.
    let end = path.bytes().rposition(|b| b != b'/');
    if !end.is_some_and(|at| matches!(path.as_bytes()[at], b's' | b'S')) {
        return false;
    }
    let mut segments = last_segments(path);
    segments.next().is_some_and(|last| names(last, b"messages"))
        && segments.next().is_some_and(|version| names(version, b"v1"))
}

/// The path's segments from the last, trailing slashes ignored.
fn last_segments(path: &str) -> impl Iterator<Item = &str> {
    let end = path.bytes().rposition(|b| b != b'/').map_or(0, |at| at + 1);
    path[..end].rsplit('/')
}

/// Whether `segment` is `name` in any case, percent-decoded, without a `;`
/// parameter.
fn names(segment: &str, name: &[u8]) -> bool {
    let bytes = segment.as_bytes();
    // The usual segment has neither, and is compared as it is.
    if memchr::memchr2(b';', b'%', bytes).is_none() {
        return bytes.eq_ignore_ascii_case(name);
    }
    let segment = segment.split(';').next().unwrap_or(segment);
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(segment).collect();
    decoded.eq_ignore_ascii_case(name)
}

/// How a response on `route` to a request for `path` is read for usage:
/// the route's format, but Anthropic's for its Messages API on an `openai`
/// route.
fn usage_format(route: &Route, path: &str) -> UsageFormat {
    let messages = || {
        names_messages(path)
            || route
                .rewrite_path(path)
                .is_some_and(|upstream| names_messages(&upstream))
    };
    match route.usage.format {
        UsageFormat::Openai if messages() => UsageFormat::Anthropic,
        format => format,
    }
}

/// Whether a body carries a `Content-Encoding` other than `identity`.
fn is_compressed(headers: &http::HeaderMap) -> bool {
    headers.get_all(CONTENT_ENCODING).iter().any(|value| {
        !value
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"identity")
    })
}

/// Whether the `Content-Type` names no `charset` but UTF-8 (any case,
/// quoted or not). A reader that decodes by the charset could find a
/// `stream` key in a UTF-7 body whose bytes never spell it.
fn is_utf8(headers: &http::HeaderMap) -> bool {
    let Some(content_type) = headers.get(CONTENT_TYPE) else {
        return true;
    };
    content_type
        .as_bytes()
        .split(|&byte| byte == b';')
        .skip(1)
        .filter_map(|parameter| {
            let (name, value) = parameter.split_at(parameter.iter().position(|&b| b == b'=')?);
            name.trim_ascii()
                .eq_ignore_ascii_case(b"charset")
                .then(|| value[1..].trim_ascii())
        })
        .all(|value| {
            let value = value
                .strip_prefix(b"\"")
                .and_then(|rest| rest.strip_suffix(b"\""))
                .unwrap_or(value);
            value.eq_ignore_ascii_case(b"utf-8") || value.eq_ignore_ascii_case(b"utf8")
        })
}

/// A JSON media type (`application/json`, `application/problem+json`, …),
/// in any case, without allocating.
fn is_json(content_type: &[u8]) -> bool {
    // The first byte alone rules out most windows: `j` and `J` are the two
    // bytes that give `j` with the case bit set.
    content_type
        .windows(4)
        .any(|window| window[0] | 0x20 == b'j' && window[1..].eq_ignore_ascii_case(b"son"))
}

/// `text/event-stream`, in any case, parameters allowed.
fn is_event_stream(content_type: &[u8]) -> bool {
    const SSE: &[u8] = b"text/event-stream";
    content_type
        .get(..SSE.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(SSE))
}

impl Gateway {
    /// Phase 6: the upstream's response as the client will see it, its body
    /// metered.
    fn downstream_response(
        &self,
        route: &Route,
        format: UsageFormat,
        response: Response<UpstreamBody>,
        mut guard: UsageGuard,
        asked_for_usage: bool,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = response.into_parts();
        guard.set_status(parts.status.as_u16());
        let content_type = parts
            .headers
            .get(CONTENT_TYPE)
            .map_or(&b""[..], |value| value.as_bytes());
        let shape = if format != UsageFormat::None && is_compressed(&parts.headers) {
            // Sent compressed although the gateway asked for it as it is:
            // its usage cannot be read (a usage header still can).
            emit(CompressedResponse {
                route: &route.metrics,
            });
            ResponseBody::Opaque
        } else if is_event_stream(content_type) {
            ResponseBody::EventStream {
                hide_usage_chunk: asked_for_usage && parts.status.is_success(),
            }
        } else if is_json(content_type) {
            ResponseBody::Json
        } else {
            ResponseBody::Opaque
        };
        // Read before `strip_response_headers`, which often names them.
        let usage = response_usage(&parts.headers, &route.usage, format, shape);
        if usage.edits_body() {
            parts.headers.remove(CONTENT_LENGTH);
        }
        strip_hop_by_hop(&mut parts.headers);
        for name in &route.strip_response_headers {
            parts.headers.remove(name);
        }
        parts.version = Version::HTTP_11;
        let body = MeteredBody::new(body, guard, usage);
        Response::from_parts(parts, ProxyBody::metered(body))
    }
}

/// Paths under this prefix are the gateway's own (README, Data plane behaviour).
const SELF_SERVICE: &str = "/_tollgate/";

static IDENTITY: HeaderValue = HeaderValue::from_static("identity");
static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RATELIMIT_USED: HeaderName = HeaderName::from_static("x-ratelimit-used");
static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// `x-ratelimit-*` (README, Data plane behaviour), on every response to a customer with
/// a request limit, the gateway's own 429s included.
fn set_rate_headers(headers: &mut http::HeaderMap, rate: &RateHeaders) {
    // The four numbers are written into one buffer and each value is a
    // slice of it: one allocation, where `HeaderValue::from` makes one for
    // each number (every answer carries these).
    let mut text = itoa::Buffer::new();
    let mut digits = BytesMut::with_capacity(4 * 20);
    let mut ends = [0; 4];
    digits.extend_from_slice(text.format(rate.limit).as_bytes());
    ends[0] = digits.len();
    digits.extend_from_slice(text.format(rate.remaining).as_bytes());
    ends[1] = digits.len();
    digits.extend_from_slice(text.format(rate.used).as_bytes());
    ends[2] = digits.len();
    digits.extend_from_slice(text.format(rate.reset).as_bytes());
    ends[3] = digits.len();
    let digits = digits.freeze();
    let mut start = 0;
    for (name, end) in [
        &X_RATELIMIT_LIMIT,
        &X_RATELIMIT_REMAINING,
        &X_RATELIMIT_USED,
        &X_RATELIMIT_RESET,
    ]
    .into_iter()
    .zip(ends)
    {
        // Digits and a minus sign are always a valid header value.
        if let Ok(value) = HeaderValue::from_maybe_shared(digits.slice(start..end)) {
            headers.insert(name.clone(), value);
        }
        start = end;
    }
}

static X_TOKENS_REMAINING: HeaderName = HeaderName::from_static("x-tollgate-tokens-remaining");
static X_COST_REMAINING: HeaderName = HeaderName::from_static("x-tollgate-cost-remaining-usd");

/// `x-tollgate-tokens-remaining` and `x-tollgate-cost-remaining-usd`
/// (README, Limits), where the customer has such a budget.
fn set_remaining_headers(headers: &mut http::HeaderMap, remaining: &Remaining) {
    if let Some(tokens) = remaining.tokens {
        headers.insert(X_TOKENS_REMAINING.clone(), HeaderValue::from(tokens));
    }
    if let Some(nanos) = remaining.cost_nanos {
        // A decimal string is always a valid header value.
        if let Ok(value) = HeaderValue::from_str(&format_usd(nanos)) {
            headers.insert(X_COST_REMAINING.clone(), value);
        }
    }
}

/// A request's usage id: a UUIDv7 whose time is its row's `ts` (one clock
/// read for both) and whose other 74 bits are random. `Uuid::now_v7` would
/// read the clock again and take a lock shared by every worker thread, for
/// a counter that orders ids within a millisecond, which nothing needs:
/// rows are ordered by `(ts, id)`.
fn usage_id_at(ts: OffsetDateTime) -> Uuid {
    // A clock set before 1970 gives ids of time 0, unique by their random bits.
    let seconds = u64::try_from(ts.unix_timestamp()).unwrap_or(0);
    Uuid::new_v7(uuid::Timestamp::from_unix(
        uuid::NoContext,
        seconds,
        ts.nanosecond(),
    ))
}

fn usage_id_header(id: Uuid) -> HeaderValue {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = id.hyphenated().encode_lower(&mut buf);
    // A hyphenated UUID is always a valid header value.
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_is_recognised_however_a_server_could_route_it() {
        for path in [
            "/v1/chat/completions",
            "/v1/completions/",
            "/openai/deployments/d/chat/completions//",
            "/v1/chat/Completions",
            "/v1/chat/complet%69ons",
            "/v1/chat/%63%6F%6D%70%6C%65%74%69%6F%6E%73",
            "/v1/chat/completions;jsessionid=1",
            "completions",
        ] {
            assert!(names_completions(path), "{path}");
        }
        for path in [
            "/v1/responses",
            "/v1/chat/completions/x",
            "/v1/chat/completionsx",
            "/v1/chat/completion",
            "/v1/chat/completions%",
            "/v1/chat/%ff",
            "/",
            "",
        ] {
            assert!(!names_completions(path), "{path}");
        }
    }

    #[test]
    fn only_a_utf8_charset_or_none_is_utf8() {
        let with = |value: &'static str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(value));
            is_utf8(&headers)
        };
        assert!(is_utf8(&http::HeaderMap::new()));
        for value in [
            "application/json",
            "application/json; charset=utf-8",
            "application/json;CHARSET=\"UTF-8\"",
            "text/plain; format=x; charset = utf8",
        ] {
            assert!(with(value), "{value}");
        }
        for value in [
            "application/json; charset=utf-7",
            "application/json; charset=\"utf-16le\"",
            "application/json; charset=utf-8; charset=utf-7",
            "application/json; charset=",
        ] {
            assert!(!with(value), "{value}");
        }
    }

    #[test]
    fn the_messages_api_is_recognised_however_a_server_could_route_it() {
        // (A percent-encoded letter or a `;` never gets this far: the
        // request checks refuse such paths before routing.)
        for path in ["/v1/messages", "/anthropic/v1/messages/", "/V1/Messages"] {
            assert!(names_messages(path), "{path}");
        }
        for path in [
            "/v1/threads/thread_1/messages",
            "/v1/messages/count_tokens",
            "/messages",
            "/v2/messages",
            "/v1/chat/completions",
        ] {
            assert!(!names_messages(path), "{path}");
        }
    }

    #[test]
    fn json_media_types_are_recognised_in_any_case() {
        for json in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/problem+json",
            "application/vnd.api+Json",
            "json",
        ] {
            assert!(is_json(json.as_bytes()), "{json}");
        }
        for other in [
            "",
            "jso",
            "text/plain",
            "application/jsno",
            "application/ksn",
        ] {
            assert!(!is_json(other.as_bytes()), "{other}");
        }
        // Bytes one bit away from `j` or `J` are not it.
        for first in [b'*', b'\n', 0xea, 0xca, b'k', b'K', b'h'] {
            let mut other = *b"application/json";
            other[12] = first;
            assert!(!is_json(&other), "{other:?}");
        }
    }

    #[test]
    fn a_content_encoding_other_than_identity_is_compressed() {
        let mut headers = http::HeaderMap::new();
        assert!(!is_compressed(&headers));
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static(" Identity "));
        assert!(!is_compressed(&headers));
        headers.append(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert!(is_compressed(&headers));
    }

    #[test]
    fn usage_ids_carry_their_rows_time_and_differ_within_it() {
        let ts = time::macros::datetime!(2026-03-04 05:06:07.890_123 UTC);
        let ids: Vec<Uuid> = (0..1000).map(|_| usage_id_at(ts)).collect();
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        for id in &ids {
            assert_eq!(id.get_version_num(), 7);
            let (seconds, nanos) = id.get_timestamp().expect("a v7 id has a time").to_unix();
            assert_eq!(seconds, ts.unix_timestamp() as u64);
            // v7 keeps milliseconds.
            assert_eq!(nanos, 890_000_000);
        }
        let before_1970 = time::macros::datetime!(1969-12-31 23:59:59 UTC);
        assert_eq!(usage_id_at(before_1970).get_version_num(), 7);
    }

    #[test]
    fn rate_headers_carry_each_number_whole_and_replace_what_was_there() {
        for rate in [
            RateHeaders {
                limit: 60,
                remaining: 0,
                used: 60,
                reset: 1_700_000_000,
            },
            RateHeaders {
                limit: u64::MAX,
                remaining: 7,
                used: 1_234_567_890,
                reset: -1,
            },
            RateHeaders {
                limit: 0,
                remaining: 0,
                used: 0,
                reset: i64::MIN,
            },
        ] {
            let mut headers = http::HeaderMap::new();
            headers.insert(&X_RATELIMIT_USED, HeaderValue::from_static("stale"));
            headers.append(&X_RATELIMIT_USED, HeaderValue::from_static("older"));
            set_rate_headers(&mut headers, &rate);
            let values = |name: &HeaderName| -> Vec<String> {
                headers
                    .get_all(name)
                    .iter()
                    .map(|value| value.to_str().unwrap().to_owned())
                    .collect()
            };
            assert_eq!(values(&X_RATELIMIT_LIMIT), [rate.limit.to_string()]);
            assert_eq!(values(&X_RATELIMIT_REMAINING), [rate.remaining.to_string()]);
            assert_eq!(values(&X_RATELIMIT_USED), [rate.used.to_string()]);
            assert_eq!(values(&X_RATELIMIT_RESET), [rate.reset.to_string()]);
            assert_eq!(headers.len(), 4);
        }
    }
}
