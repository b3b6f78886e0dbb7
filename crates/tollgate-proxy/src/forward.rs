//! The pooled upstream clients.
//!
//! One default client is shared by every route without TLS settings of its
//! own: HTTP/1.1 and HTTP/2 (by ALPN for https upstreams), rustls with the
//! webpki roots, TCP_NODELAY, idle connections kept for reuse. A route with
//! `ca_file` or `client_cert` gets a client of its own, built the same way
//! from its [`UpstreamTls`] when the routes are compiled, so choosing the
//! client costs a request nothing and a connection made with one route's
//! client certificate is never reused for another route.
//!
//! The pool is the gateway's own, over hyper's connection API: per upstream
//! origin, a stack of idle HTTP/1.1 connections (the most recently used
//! first, so a quiet period lets the others age out) and the HTTP/2
//! connections, each shared by up to [`MAX_STREAMS_PER_CONNECTION`]
//! requests. A request takes a connection, sends on it, and its response
//! body puts the connection back when it ends ([`UpstreamBody`]): no task,
//! channel or map lookup per request beyond the connection's own.
//!
//! # Failure behaviour
//! - A pooled connection the upstream closed while it sat idle is noticed
//!   before use (hyper's connection task has ended) and dropped; one that
//!   closes in the instant between the check and the send gives the request
//!   back unsent, and it goes on another connection. A request that was
//!   sent is never sent again.
//! - A response body dropped before its end (the client went away) takes
//!   its connection with it: hyper cannot reuse a connection with a
//!   response half read.
//! - Idle connections are closed after [`POOL_IDLE_TIMEOUT`]; at most
//!   [`MAX_IDLE_PER_ORIGIN`] are kept per origin.
//! - A request gets a connection within [`CONNECT_TIMEOUT`] (TCP and TLS),
//!   or fails as unable to connect: the time covers both its own attempt
//!   and any wait for a shared HTTP/2 connection being opened, so a
//!   request behind one that times out does not start a second wait of
//!   its own.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{HOST, TRAILER};
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tower_service::Service;

use crate::body::{BodyTimedOut, BodyTooLarge, ClientBodyFailed, RequestBody, Upload};
use crate::tls::UpstreamTls;

/// How long an idle upstream connection is kept for reuse.
pub(crate) const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long establishing an upstream connection (TCP, and TLS for
/// https) may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle HTTP/1.1 connections kept per upstream origin; more are closed
/// when they come back.
pub(crate) const MAX_IDLE_PER_ORIGIN: usize = 1024;
/// How often idle connections are checked for age when no request comes.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// Requests one HTTP/2 upstream connection carries at once; another
/// request opens another connection. RFC 9113 asks servers to allow at
/// least 100 (nginx allows 128): past the server's own limit a request
/// would wait, queued behind the connection's others, until one of them
/// ended, which for a streamed completion takes the whole completion.
pub(crate) const MAX_STREAMS_PER_CONNECTION: usize = 100;
/// Sweeps an HTTP/2 connection beyond an origin's first may sit without
/// a request before it is closed: about [`POOL_IDLE_TIMEOUT`].
const HTTP2_IDLE_SWEEPS: u32 = 3;

type Connector = HttpsConnector<HttpConnector>;
type Stream = MaybeHttpsStream<TokioIo<TcpStream>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A pooled upstream client. Cloning it shares its pool.
#[derive(Clone)]
pub struct UpstreamClient(Arc<Client>);

struct Client {
    connector: Connector,
    /// One pool per origin, found by a scan: a gateway has a handful.
    origins: ArcSwap<Vec<Arc<OriginPool>>>,
    /// Serializes adding an origin.
    adding: Mutex<()>,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("origins", &self.0.origins.load().len())
            .finish_non_exhaustive()
    }
}

/// Why an upstream request failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// No connection could be made (refused, unreachable, TLS): the
    /// upstream never saw the request.
    #[error("cannot connect to the upstream: {0}")]
    Connect(#[source] BoxError),
    /// The request did not get a response head.
    #[error(transparent)]
    Failed(#[from] hyper::Error),
}

impl UpstreamError {
    /// Only a failure to connect proves the upstream never saw the request.
    pub(crate) fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }
}

impl UpstreamClient {
    fn new(connector: Connector) -> Self {
        UpstreamClient(Arc::new(Client {
            connector,
            origins: ArcSwap::from_pointee(Vec::new()),
            adding: Mutex::new(()),
        }))
    }

    /// Sends `request` (an absolute URI) on a pooled connection to its
    /// origin, or a new one; the response head, or why there is none.
    pub(crate) async fn request(
        &self,
        mut request: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let pool = self.pool_for(request.uri())?;
        // The time a request may spend getting a connection, whether it
        // opens its own or waits for one being opened, or both: set when it
        // first needs one, so that waiting for a connection that then fails
        // does not start the clock again.
        let mut deadline = None;
        let mut connect_by = || *deadline.get_or_insert_with(|| Instant::now() + CONNECT_TIMEOUT);
        loop {
            let (conn, reused) = match pool.checkout() {
                Checkout::Conn(conn) => (conn, true),
                // Boxed: connecting (TCP, TLS, the HTTP/2 handshake) is by far
                // the largest state of this future, and rare; inline, every
                // request would copy its size when the future is boxed.
                Checkout::Connect => (
                    Box::pin(pool.connect(&self.0.connector, connect_by())).await?,
                    false,
                ),
                Checkout::ConnectHttp2(mut opening) => {
                    let conn = Box::pin(pool.connect(&self.0.connector, connect_by())).await;
                    opening.opened = conn.is_ok();
                    drop(opening);
                    (conn?, false)
                }
                Checkout::Wait(waiting) => {
                    let by = connect_by();
                    if Box::pin(waiting.until_opened(by)).await {
                        continue;
                    }
                    // What it waited for failed: a connection of its own, as
                    // every other waiter opens now, so that none waits out a
                    // failure after another's; in the time left, none if
                    // the wait took it all.
                    (Box::pin(pool.connect(&self.0.connector, by)).await?, false)
                }
            };
            let sent = match conn {
                Conn::Http1(mut sender) => {
                    if reused && sender.ready().await.is_err() {
                        continue;
                    }
                    set_origin_form(request.uri_mut());
                    let upload = request.body().upload();
                    match sender.try_send_request(request).await {
                        Ok(response) => {
                            return Ok(
                                response.map(|body| UpstreamBody::new(body, sender, &pool, upload))
                            )
                        }
                        Err(error) => error,
                    }
                }
                Conn::Http2(mut sender, stream) => {
                    set_http2_authority(&mut request);
                    match sender.try_send_request(request).await {
                        Ok(response) => {
                            let announced_trailers = response.headers().contains_key(TRAILER);
                            return Ok(response.map(|body| {
                                UpstreamBody::http2(body, !announced_trailers, stream)
                            }));
                        }
                        // The stream is given back with the error.
                        Err(error) => error,
                    }
                }
            };
            // Given back unsent: the connection closed before it could
            // take the request. Another one may; a new one that fails so
            // is the upstream's failure.
            let mut error = sent;
            match error.take_message() {
                Some(unsent) if reused => request = restored(unsent, &pool),
                _ => return Err(UpstreamError::Failed(error.into_error())),
            }
        }
    }

    /// The pool of `uri`'s origin, made on first use.
    fn pool_for(&self, uri: &Uri) -> Result<Arc<OriginPool>, UpstreamError> {
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(UpstreamError::Connect(
                "the upstream URI has no origin".into(),
            ));
        };
        let find = |pools: &[Arc<OriginPool>]| {
            pools
                .iter()
                .find(|pool| pool.scheme == *scheme && pool.authority == *authority)
                .cloned()
        };
        if let Some(pool) = find(&self.0.origins.load()) {
            return Ok(pool);
        }
        let _adding = self.0.adding.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.0.origins.load_full();
        if let Some(pool) = find(&current) {
            return Ok(pool);
        }
        let pool = Arc::new(OriginPool {
            scheme: scheme.clone(),
            authority: authority.clone(),
            idle: Mutex::new(Vec::new()),
            http2: Mutex::new(Http2Pool::for_scheme(scheme)),
            opened: tokio::sync::Notify::new(),
        });
        spawn_sweeper(Arc::downgrade(&pool));
        let mut pools = Vec::with_capacity(current.len() + 1);
        pools.extend(current.iter().cloned());
        pools.push(pool.clone());
        self.0.origins.store(Arc::new(pools));
        Ok(pool)
    }
}

/// A connection taken from the pool or just made.
enum Conn {
    Http1(http1::SendRequest<RequestBody>),
    /// An HTTP/2 connection and the stream taken on it for this request.
    Http2(http2::SendRequest<RequestBody>, StreamSlot),
}

/// What a request gets from its origin's pool.
enum Checkout<'a> {
    /// A pooled connection, and for HTTP/2 a stream on it.
    Conn(Conn),
    /// Nothing pooled: the request opens a connection, HTTP/1.1 or
    /// HTTP/2 as ALPN chooses, and keeps it.
    Connect,
    /// Every HTTP/2 connection is full (or, on an origin that speaks
    /// HTTP/2 or has not said yet, none is open), and those being opened
    /// will not take every waiting request: the request opens another.
    ConnectHttp2(Opening<'a>),
    /// As for `ConnectHttp2`, but one being opened has a stream for this
    /// request: it waits until that is done, then asks again, or if it
    /// failed, opens one of its own.
    Wait(Waiting<'a>),
}

/// A request counted as waiting for an HTTP/2 connection being opened,
/// until it is dropped.
struct Waiting<'a> {
    pool: &'a OriginPool,
    /// The pool's generation when the request began to wait.
    generation: u64,
}

impl Waiting<'_> {
    /// Until an HTTP/2 connection being opened is done (the pool's
    /// generation has moved on): whether one opened since the request began
    /// to wait, so that it asks the pool again. Not if one failed, nor if
    /// none is done by `deadline`, the request's time to get a connection.
    async fn until_opened(self, deadline: Instant) -> bool {
        let opened = self.pool.opened.notified();
        tokio::pin!(opened);
        // Listening before looking: one done in between moved the
        // generation on.
        opened.as_mut().enable();
        let generation = self.pool.http2_pool().generation;
        if generation == self.generation
            && tokio::time::timeout_at(deadline.into(), opened)
                .await
                .is_err()
        {
            return false;
        }
        let http2 = self.pool.http2_pool();
        http2.failed <= self.generation
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut http2 = self.pool.http2_pool();
        http2.waiting -= 1;
    }
}

/// An HTTP/2 connection being opened for requests that found every
/// connection full, or none open. When it is done, the waiting requests ask
/// the pool again if it opened (on an origin that had not said which
/// protocol it speaks, it may have turned out HTTP/1.1: then they open
/// connections of their own), and open their own if it failed.
struct Opening<'a> {
    pool: &'a OriginPool,
    opened: bool,
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        let mut http2 = self.pool.http2_pool();
        http2.opening -= 1;
        http2.generation += 1;
        if !self.opened {
            http2.failed = http2.generation;
        }
        drop(http2);
        self.pool.opened.notify_waiters();
    }
}

/// One request's stream on an HTTP/2 connection, counted against
/// [`MAX_STREAMS_PER_CONNECTION`] until it is dropped: with the response
/// body, or with the request when it could not be sent.
pub(crate) struct StreamSlot(Arc<AtomicUsize>);

impl StreamSlot {
    fn open(streams: &Arc<AtomicUsize>) -> StreamSlot {
        streams.fetch_add(1, Ordering::Relaxed);
        StreamSlot(streams.clone())
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An origin's HTTP/2 connections, and the requests waiting for one.
#[derive(Default)]
struct Http2Pool {
    /// The oldest first.
    conns: Vec<Http2Conn>,
    /// Connections being opened because every one was full, or none open.
    opening: usize,
    /// Requests waiting for those.
    waiting: usize,
    /// Moves on whenever one of those is done, opened or failed.
    generation: u64,
    /// The generation the last failure to open one moved it on to.
    failed: u64,
    /// What the origin's last new connection spoke.
    protocol: Protocol,
}

/// What an origin speaks, as far as the pool knows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Protocol {
    /// An https origin no connection has been made to yet: ALPN will say.
    /// Until then, requests share the first connection being opened, as
    /// on an HTTP/2 origin, rather than open one each: when a cold gateway
    /// meets a burst of requests, an HTTP/2 API gets one connection (and
    /// more only per hundred requests), not one handshake per request. Had
    /// it chosen HTTP/1.1, the others open their own once it is up.
    #[default]
    Unknown,
    /// Plain http, or ALPN chose HTTP/1.1 (or nothing) last time: each
    /// request in flight has a connection of its own.
    Http1,
    /// ALPN chose HTTP/2 last time: when every connection has closed (a
    /// GOAWAY, say), the requests that come meanwhile wait for one new
    /// connection rather than open one each.
    Http2,
}

impl Http2Pool {
    /// An origin's pool before its first connection: only https may speak
    /// HTTP/2 (the gateway does not try HTTP/2 in the clear).
    fn for_scheme(scheme: &Scheme) -> Http2Pool {
        Http2Pool {
            protocol: if *scheme == Scheme::HTTPS {
                Protocol::Unknown
            } else {
                Protocol::Http1
            },
            ..Http2Pool::default()
        }
    }
}

/// A pooled HTTP/2 connection.
struct Http2Conn {
    sender: http2::SendRequest<RequestBody>,
    /// Its requests in flight.
    streams: Arc<AtomicUsize>,
    /// Sweeps in a row that found it without a request.
    idle_sweeps: u32,
}

/// The connections to one upstream origin.
struct OriginPool {
    scheme: Scheme,
    authority: Authority,
    /// Idle HTTP/1.1 connections, the most recently used last.
    idle: Mutex<Vec<Idle>>,
    /// The HTTP/2 connections, when the origin negotiated HTTP/2.
    http2: Mutex<Http2Pool>,
    /// Told when an HTTP/2 connection opened for waiting requests is done.
    opened: tokio::sync::Notify,
}

struct Idle {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
}

impl OriginPool {
    /// The HTTP/2 connections and their waiters, locked.
    fn http2_pool(&self) -> std::sync::MutexGuard<'_, Http2Pool> {
        self.http2.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An open connection, if the pool has one.
    /// An HTTP/2 connection is shared by up to [`MAX_STREAMS_PER_CONNECTION`]
    /// requests. With every one of them full, a request opens another, or
    /// waits for one being opened that will have a stream for it: as many
    /// connections open at once as the waiting requests need, not one per
    /// request.
    fn checkout(&self) -> Checkout<'_> {
        {
            let mut http2 = self.http2_pool();
            let shared = |http2: &Http2Pool| {
                !http2.conns.is_empty() || http2.opening > 0 || http2.protocol != Protocol::Http1
            };
            if shared(&http2) {
                http2.conns.retain(|conn| !conn.sender.is_closed());
                // Streams are only taken under this lock, so the count
                // read is never exceeded by another request's.
                let free = http2
                    .conns
                    .iter()
                    .find(|conn| conn.streams.load(Ordering::Relaxed) < MAX_STREAMS_PER_CONNECTION);
                if let Some(conn) = free {
                    return Checkout::Conn(Conn::Http2(
                        conn.sender.clone(),
                        StreamSlot::open(&conn.streams),
                    ));
                }
                if shared(&http2) {
                    if http2.opening * MAX_STREAMS_PER_CONNECTION > http2.waiting {
                        http2.waiting += 1;
                        return Checkout::Wait(Waiting {
                            pool: self,
                            generation: http2.generation,
                        });
                    }
                    http2.opening += 1;
                    return Checkout::ConnectHttp2(Opening {
                        pool: self,
                        opened: false,
                    });
                }
            }
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(Idle { sender, since }) = idle.pop() {
            if !sender.is_closed() && since.elapsed() < POOL_IDLE_TIMEOUT {
                return Checkout::Conn(Conn::Http1(sender));
            }
        }
        Checkout::Connect
    }

    /// Puts an HTTP/1.1 connection whose response has ended back.
    fn checkin(&self, sender: http1::SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE_PER_ORIGIN {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Closes the connections idle for too long (the oldest are first): the
    /// HTTP/1.1 ones idle for [`POOL_IDLE_TIMEOUT`], the HTTP/2 ones but
    /// the first without a request for [`HTTP2_IDLE_SWEEPS`] sweeps.
    fn sweep(&self) {
        {
            let mut http2 = self.http2_pool();
            let mut first = true;
            http2.conns.retain_mut(|conn| {
                if conn.sender.is_closed() {
                    return false;
                }
                if conn.streams.load(Ordering::Relaxed) == 0 {
                    conn.idle_sweeps += 1;
                } else {
                    conn.idle_sweeps = 0;
                }
                let keep = first || conn.idle_sweeps < HTTP2_IDLE_SWEEPS;
                first = false;
                keep
            });
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = idle
            .iter()
            .position(|conn| conn.since.elapsed() < POOL_IDLE_TIMEOUT && !conn.sender.is_closed())
            .unwrap_or(idle.len());
        idle.drain(..fresh);
        idle.retain(|conn| !conn.sender.is_closed());
    }

    /// Opens a connection by `deadline`: TCP (and TLS, with ALPN choosing
    /// the protocol for https), then the HTTP handshake. Its task runs until
    /// the connection closes.
    async fn connect(
        &self,
        connector: &Connector,
        deadline: Instant,
    ) -> Result<Conn, UpstreamError> {
        let uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|error| UpstreamError::Connect(error.into()))?;
        let mut connector = connector.clone();
        poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(UpstreamError::Connect)?;
        // The TCP connect has a timeout of its own; the TLS handshake after
        // it would have none short of the route's, so the two together get
        // the request's time to connect.
        let stream: Stream = tokio::time::timeout_at(deadline.into(), connector.call(uri))
            .await
            .map_err(|_| {
                UpstreamError::Connect(
                    format!(
                        "no connection within {} s (TCP and TLS)",
                        CONNECT_TIMEOUT.as_secs()
                    )
                    .into(),
                )
            })?
            .map_err(UpstreamError::Connect)?;
        if stream.connected().is_negotiated_h2() {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(stream)
                .await
                .map_err(|error| UpstreamError::Connect(error.into()))?;
            spawn_connection(connection);
            let streams = Arc::new(AtomicUsize::new(0));
            let stream = StreamSlot::open(&streams);
            let mut http2 = self.http2_pool();
            http2.protocol = Protocol::Http2;
            http2.conns.push(Http2Conn {
                sender: sender.clone(),
                streams,
                idle_sweeps: 0,
            });
            return Ok(Conn::Http2(sender, stream));
        }
        let (sender, connection) = http1::Builder::new()
            .handshake(stream)
            .await
            .map_err(|error| UpstreamError::Connect(error.into()))?;
        spawn_connection(connection);
        // ALPN chose HTTP/1.1 (or there was none), where it may have chosen
        // HTTP/2 before.
        self.http2_pool().protocol = Protocol::Http1;
        Ok(Conn::Http1(sender))
    }
}

/// Drives an upstream connection (HTTP/1.1 or HTTP/2) until it closes.
fn spawn_connection(
    connection: impl std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
) {
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(message = "Upstream connection ended.", %error);
        }
    });
}

/// Closes a pool's stale idle connections every [`SWEEP_EVERY`], until the
/// pool is gone.
fn spawn_sweeper(pool: Weak<OriginPool>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(SWEEP_EVERY);
        every.tick().await;
        loop {
            every.tick().await;
            match pool.upgrade() {
                Some(pool) => pool.sweep(),
                None => return,
            }
        }
    });
}

/// HTTP/2 carries the authority as `:authority`, which the client takes
/// from the URI. A `Host` header beside it, even an equal one, is refused by
/// some servers (nginx answers 400, "duplicate host header"), so the `Host`
/// the request was given (the upstream's, or a route's own in `set_headers`)
/// becomes the URI's authority instead, as RFC 9113 (8.3.1) has an
/// intermediary do. A `Host` that is not a valid authority is dropped and
/// the upstream's own stands.
fn set_http2_authority(request: &mut Request<RequestBody>) {
    let Some(host) = request.headers_mut().remove(HOST) else {
        return;
    };
    let Ok(authority) = Authority::try_from(host.as_bytes()) else {
        return;
    };
    let mut parts = std::mem::take(request.uri_mut()).into_parts();
    parts.authority = Some(authority);
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
}

/// A request given back unsent, put back as [`UpstreamClient::request`]
/// takes it, whichever protocol it was meant for: its `Host` (which HTTP/2
/// moved into the URI) and an absolute URI on `pool`'s origin (which
/// HTTP/1.1 made origin-form).
fn restored(mut request: Request<RequestBody>, pool: &OriginPool) -> Request<RequestBody> {
    let authority = request
        .uri()
        .authority()
        .cloned()
        .unwrap_or_else(|| pool.authority.clone());
    if !request.headers().contains_key(HOST) {
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            request.headers_mut().insert(HOST, host);
        }
    }
    let path = path_of(request.uri());
    if let Ok(uri) = Uri::builder()
        .scheme(pool.scheme.clone())
        .authority(pool.authority.clone())
        .path_and_query(path)
        .build()
    {
        *request.uri_mut() = uri;
    }
    request
}

/// HTTP/1.1 requests name only the path (`Host` carries the authority);
/// HTTP/2 ones keep the absolute URI for `:scheme` and `:authority`.
fn set_origin_form(uri: &mut Uri) {
    *uri = Uri::from(path_of(uri));
}

/// `uri`'s path and query, `/` where it has none.
fn path_of(uri: &Uri) -> http::uri::PathAndQuery {
    uri.path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"))
}

/// An upstream response body. An HTTP/1.1 connection goes back to its pool
/// when the body has been read to its end, and is closed with the body
/// when it is dropped before that.
pub(crate) struct UpstreamBody {
    inner: Incoming,
    checkin: Option<(http1::SendRequest<RequestBody>, Arc<OriginPool>)>,
    /// HTTP/1: the request body's upload, when it had one to stream.
    upload: Option<Arc<Upload>>,
    /// HTTP/2: the body has ended once its declared length has arrived.
    whole_at_length: bool,
    /// HTTP/2: the request's stream, counted until the body is dropped.
    _stream: Option<StreamSlot>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("pooled", &self.checkin.is_some())
            .finish_non_exhaustive()
    }
}

impl UpstreamBody {
    fn new(
        inner: Incoming,
        sender: http1::SendRequest<RequestBody>,
        pool: &Arc<OriginPool>,
        upload: Option<Arc<Upload>>,
    ) -> Self {
        let mut body = UpstreamBody {
            inner,
            checkin: Some((sender, pool.clone())),
            upload,
            whole_at_length: false,
            _stream: None,
        };
        if body.inner.is_end_stream() {
            body.check_in();
        }
        body
    }

    /// An HTTP/2 body, whose connection needs nothing from it. With
    /// `whole_at_length` (no trailers announced), it has ended as soon as
    /// the length its `content-length` declared has arrived, without
    /// waiting for the upstream's END_STREAM. A server may send that in a
    /// frame of its own after the data (nginx does), and until then the
    /// client, which has every byte, would be kept waiting for the end of
    /// the response, or close first and leave its row `client_closed`.
    /// (HTTP/2 refuses DATA past the declared length, so nothing more can
    /// come but the end or a reset; dropping the body before the end
    /// arrives cancels the stream, which the upstream has finished.)
    fn http2(inner: Incoming, whole_at_length: bool, stream: StreamSlot) -> Self {
        UpstreamBody {
            inner,
            checkin: None,
            upload: None,
            whole_at_length,
            _stream: Some(stream),
        }
    }

    /// Gives the connection back once the exchange is over both ways. An
    /// upstream may answer before the request's body has all been sent
    /// (an early 404, say) and keep reading it; until it has, the
    /// connection cannot carry another request, and the next one taken
    /// from the pool would wait on this client's upload, for as long as
    /// it trickles in. Such a connection is not given back.
    fn check_in(&mut self) {
        if let Some((sender, pool)) = self.checkin.take() {
            let uploaded = self
                .upload
                .as_ref()
                .is_none_or(|upload| upload.finished_at().is_some());
            if uploaded {
                pool.checkin(sender);
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.check_in(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.check_in(),
            // A broken body leaves its connection unusable.
            Poll::Ready(Some(Err(_))) => this.checkin = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        // hyper counts the declared length down as the data arrives.
        self.inner.is_end_stream()
            || (self.whole_at_length && self.inner.size_hint().exact() == Some(0))
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Builds the default upstream client.
pub fn upstream_client() -> Result<UpstreamClient, rustls::Error> {
    Ok(UpstreamClient::new(default_connector()?))
}

/// http or https (webpki roots), HTTP/1.1 or HTTP/2: the default upstream
/// client's connector, which the webhook sender shares.
pub(crate) fn default_connector() -> Result<Connector, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(provider)?
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http_connector()))
}

/// Builds the client of a route with TLS settings of its own. It speaks
/// https only: such a route's upstream is https (config validation and
/// [`crate::route::Route::compile`] both insist), so a plain connection
/// would mean the settings were silently skipped.
pub(crate) fn upstream_client_with(tls: &UpstreamTls) -> UpstreamClient {
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls.client_config())
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http_connector());
    UpstreamClient::new(connector)
}

fn http_connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http
}

/// Whether an upstream request failed because the client's body went over
/// the size limit (rather than because the upstream failed).
pub(crate) fn is_body_too_large(error: &(dyn std::error::Error + 'static)) -> bool {
    caused_by::<BodyTooLarge>(error)
}

/// Whether an upstream request failed because the client's own body
/// failed mid-upload.
pub(crate) fn is_client_body_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    caused_by::<ClientBodyFailed>(error)
}

/// Whether an upstream request failed because the client stopped sending
/// its body (408).
pub(crate) fn is_body_timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    caused_by::<BodyTimedOut>(error)
}

fn caused_by<T: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if error.is::<T>() {
            return true;
        }
        current = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// An upstream on a real socket that answers each request head with
    /// `body`, counting the connections it accepted; with `close_after`,
    /// it closes each connection after that many answers.
    async fn upstream(body: &'static str, close_after: Option<usize>) -> (Uri, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut answered = 0;
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        while let Some(end) = find_head_end(&buffer) {
                            buffer.drain(..end);
                            let head = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                                body.len()
                            );
                            socket.write_all(head.as_bytes()).await.unwrap();
                            socket.write_all(body.as_bytes()).await.unwrap();
                            answered += 1;
                            if close_after == Some(answered) {
                                return;
                            }
                        }
                        match socket.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        (format!("http://{address}/v1/x").parse().unwrap(), accepted)
    }

    fn find_head_end(buffer: &[u8]) -> Option<usize> {
        buffer
            .windows(4)
            .position(|window| window == b"\r\n\r\n")
            .map(|at| at + 4)
    }

    fn get(uri: &Uri) -> Request<RequestBody> {
        Request::get(uri.clone())
            .header(http::header::HOST, uri.authority().unwrap().as_str())
            .body(RequestBody::buffered(Bytes::new()))
            .unwrap()
    }

    async fn text(client: &UpstreamClient, uri: &Uri) -> String {
        let response = client.request(get(uri)).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_response_is_read() {
        let (uri, accepted) = upstream("hello", None).await;
        let client = upstream_client().unwrap();
        for _ in 0..20 {
            assert_eq!(text(&client, &uri).await, "hello");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_not_used() {
        let (uri, accepted) = upstream("again", Some(1)).await;
        let client = upstream_client().unwrap();
        for round in 1..=5 {
            assert_eq!(text(&client, &uri).await, "again");
            // Let the pooled connection see the upstream's close.
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(accepted.load(Ordering::SeqCst), round);
        }
    }

    #[tokio::test]
    async fn a_response_dropped_half_read_takes_its_connection_along() {
        let (uri, accepted) = upstream("a body of some length", None).await;
        let client = upstream_client().unwrap();
        let response = client.request(get(&uri)).await.unwrap();
        drop(response);
        assert_eq!(text(&client, &uri).await, "a body of some length");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // The second connection went back whole and serves the third.
        assert_eq!(text(&client, &uri).await, "a body of some length");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn concurrent_requests_open_what_they_need_and_then_share() {
        let (uri, accepted) = upstream("x", None).await;
        let client = upstream_client().unwrap();
        let requests: Vec<_> = (0..8)
            .map(|_| {
                let (client, uri) = (client.clone(), uri.clone());
                tokio::spawn(async move { text(&client, &uri).await })
            })
            .collect();
        for request in requests {
            assert_eq!(request.await.unwrap(), "x");
        }
        let opened = accepted.load(Ordering::SeqCst);
        assert!((1..=8).contains(&opened), "{opened} connections");
        for _ in 0..20 {
            assert_eq!(text(&client, &uri).await, "x");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), opened);
    }

    fn pool(uri: &Uri) -> OriginPool {
        OriginPool {
            scheme: uri.scheme().unwrap().clone(),
            authority: uri.authority().unwrap().clone(),
            idle: Mutex::new(Vec::new()),
            http2: Mutex::new(Http2Pool::for_scheme(uri.scheme().unwrap())),
            opened: tokio::sync::Notify::new(),
        }
    }

    #[test]
    fn an_http2_request_carries_its_host_as_the_authority_and_no_host_header() {
        let uri: Uri = "https://10.0.0.7:8443/v1/chat?x=1".parse().unwrap();
        let mut request = get(&uri);
        request
            .headers_mut()
            .insert(HOST, HeaderValue::from_static("api.example.test"));
        set_http2_authority(&mut request);
        assert_eq!(request.headers().get(HOST), None);
        assert_eq!(
            request.uri().to_string(),
            "https://api.example.test/v1/chat?x=1"
        );

        // A Host that is no authority goes; the upstream's stands.
        let mut request = get(&uri);
        request
            .headers_mut()
            .insert(HOST, HeaderValue::from_static("no such/host"));
        set_http2_authority(&mut request);
        assert_eq!(request.headers().get(HOST), None);
        assert_eq!(request.uri(), &uri);
    }

    #[test]
    fn a_request_given_back_unsent_is_put_back_for_either_protocol() {
        let uri: Uri = "https://10.0.0.7:8443/v1/chat?x=1".parse().unwrap();
        let pool = pool(&uri);
        let mut request = get(&uri);
        request
            .headers_mut()
            .insert(HOST, HeaderValue::from_static("api.example.test"));
        // Meant for HTTP/2: the Host comes back out of the URI.
        set_http2_authority(&mut request);
        let request = restored(request, &pool);
        assert_eq!(request.uri(), &uri);
        assert_eq!(request.headers()[HOST], "api.example.test");
        // Meant for HTTP/1.1: the URI is absolute again.
        let mut request = request;
        set_origin_form(request.uri_mut());
        assert_eq!(request.uri().to_string(), "/v1/chat?x=1");
        let request = restored(request, &pool);
        assert_eq!(request.uri(), &uri);
        assert_eq!(request.headers()[HOST], "api.example.test");
        // No Host at all: the upstream's.
        let mut request = get(&uri);
        request.headers_mut().remove(HOST);
        set_origin_form(request.uri_mut());
        let request = restored(request, &pool);
        assert_eq!(request.headers()[HOST], "10.0.0.7:8443");
        assert_eq!(request.uri(), &uri);
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let client = upstream_client().unwrap();
        let uri: Uri = format!("http://{address}/").parse().unwrap();
        let error = client.request(get(&uri)).await.unwrap_err();
        assert!(error.is_connect(), "{error}");
    }
}
