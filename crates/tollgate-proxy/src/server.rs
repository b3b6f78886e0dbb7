//! Listeners: accept, optional TLS, HTTP/1.1 and HTTP/2 on one port, every
//! connection bounded in number and in time, and a graceful drain on
//! shutdown.
//!
//! A connection is watched by one timer of its own (`Watch::drive`):
//! - until its first request head is complete (the TLS handshake included)
//!   it has `header_timeout` from the moment it was accepted, so a client
//!   that connects and sends nothing, or only the HTTP/2 preface, is closed;
//! - with no request in flight it has `idle_timeout` before it is closed
//!   (HTTP/2: GOAWAY first);
//! - a response its client stops reading is abandoned after `idle_timeout`
//!   ([`crate::progress`]).
//!
//! Each listener holds at most `max_connections` connections: beyond that
//! the accept loop waits for one to close, and new clients wait in the
//! kernel's accept queue. Running out of file descriptors makes the loop
//! back off and retry, logging at most once a second.
//!
//! # Failure behaviour
//! On shutdown the listener is closed first (new connections are refused),
//! idle connections are closed, and in-flight requests get up to
//! `shutdown_grace` to finish; connections still open after that are
//! dropped, which aborts their responses (their usage rows are still
//! recorded, as `client_closed`).

use std::convert::Infallible;
use std::fmt::Display;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use metrics::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::body::ProxyBody;
use crate::events::{
    emit, AcceptFailed, ConnectionClosed, ConnectionEnd, ConnectionOpened, ShutdownGraceEnded,
};
use crate::framing::{FramingMark, FramingWatch};
use crate::pipeline::ConnInfo;
use crate::progress::{with_progress, ServedBody, StallWatch, WatchingExecutor};

/// Pause after an accept error such as EMFILE before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// At most one log line per this, however often accepting fails.
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(1);
/// How long a connection being closed for idleness may take to say goodbye
/// (flush a GOAWAY) before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// hyper's smallest read buffer.
const MIN_READ_BUFFER: usize = 8 * 1024;

/// Connection-level settings shared by the data plane and the admin server.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Time a client has from connecting (TLS handshake included) to its
    /// first complete request head; on a kept-alive HTTP/1 connection, from
    /// the first byte of each later head.
    pub header_timeout: Duration,
    /// A connection with no request in flight for this long is closed; a
    /// response its client stops reading for this long is abandoned.
    pub idle_timeout: Duration,
    /// Open connections at once on this listener.
    pub max_connections: usize,
    /// Request line plus headers. hyper refuses heads over twice this by
    /// itself (431/414, as the head cannot be read whole); the data plane
    /// answers heads between the two with its own error.
    pub max_header_bytes: u64,
    /// How long in-flight requests may run once shutdown begins.
    pub shutdown_grace: Duration,
    /// `tollgate_open_connections{listener}` of this listener.
    pub open_connections: Gauge,
}

/// What a connection is told by its listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Closing {
    No,
    /// Finish what is in flight, take nothing new.
    Drain,
    /// The drain's grace is over.
    Now,
}

/// Serves connections from `listener` until `shutdown` resolves, then drains.
pub async fn serve<F, S>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    options: ServerOptions,
    make_service: F,
    shutdown: impl Future<Output = ()>,
) where
    F: Fn(ConnInfo) -> S,
    S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let options = Arc::new(options);
    let builder = Arc::new(connection_builder(&options));
    // Semaphore permits are counted in u32 when taken all at once (drain).
    let budget = options
        .max_connections
        .clamp(1, u32::MAX as usize)
        .min(Semaphore::MAX_PERMITS);
    let permits = Arc::new(Semaphore::new(budget));
    let (closing, closing_rx) = watch::channel(Closing::No);
    let proto = if tls.is_some() { "https" } else { "http" };
    let mut accept_errors = AcceptErrors::default();
    let mut shutdown = pin!(shutdown);
    loop {
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                // Never closed while this loop holds it.
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_errors.back_off(error).await;
                    continue;
                }
            },
        };
        let framing = FramingMark::default();
        let service = make_service(ConnInfo {
            peer_ip: crate::headers::ip_header(peer.ip()),
            proto,
            framing: framing.clone(),
        });
        let connection = Connection {
            stream,
            peer,
            framing,
            tls: tls.clone(),
            options: options.clone(),
            builder: builder.clone(),
            closing: closing_rx.clone(),
            _permit: permit,
        };
        tokio::spawn(connection.run(service));
    }
    drop(listener);
    let open = budget - permits.available_permits();
    tracing::debug!(
        message = "Listener closed; draining connections.",
        connections = open
    );
    closing.send_replace(Closing::Drain);
    // Every connection holds a permit until it ends: all of them back means
    // all connections are closed.
    let all = u32::try_from(budget).unwrap_or(u32::MAX);
    tokio::select! {
        _ = permits.acquire_many(all) => {}
        () = tokio::time::sleep(options.shutdown_grace) => {
            emit(ShutdownGraceEnded {
                grace: options.shutdown_grace,
                connections: budget - permits.available_permits(),
            });
            closing.send_replace(Closing::Now);
        }
    }
}

fn connection_builder(options: &ServerOptions) -> auto::Builder<WatchingExecutor> {
    let mut builder = auto::Builder::new(WatchingExecutor {
        idle_timeout: options.idle_timeout,
    });
    let head_limit = usize::try_from(options.max_header_bytes.saturating_mul(2))
        .unwrap_or(usize::MAX)
        .max(MIN_READ_BUFFER);
    builder
        .http1()
        .timer(TokioTimer::new())
        // The connection's own timer enforces the header timeout, from the
        // moment of connecting and from the first byte of each later head;
        // hyper's would also close kept-alive connections that are merely
        // idle, before `idle_timeout`.
        .header_read_timeout(None)
        .max_buf_size(head_limit)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(head_limit).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

/// Backs off after accept errors, logging at most once a second.
#[derive(Default)]
struct AcceptErrors {
    last_logged: Option<Instant>,
    since_logged: u64,
}

impl AcceptErrors {
    async fn back_off(&mut self, error: io::Error) {
        // Errors about one connection (reset before accept) need no pause;
        // resource exhaustion (EMFILE, ENFILE, ENOBUFS) does, or the loop
        // would spin.
        if matches!(
            error.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::Interrupted
        ) {
            return;
        }
        if let Some(failures) = self.count(Instant::now()) {
            emit(AcceptFailed {
                error: &error,
                failures,
            });
        }
        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
    }

    /// Counts one failure at `now`; the failures since the last log line
    /// when it is time for another.
    fn count(&mut self, now: Instant) -> Option<u64> {
        self.since_logged += 1;
        let due = self
            .last_logged
            .is_none_or(|at| now.duration_since(at) >= ACCEPT_ERROR_LOG_EVERY);
        due.then(|| {
            self.last_logged = Some(now);
            std::mem::take(&mut self.since_logged)
        })
    }
}

/// What a connection's requests do, as its timer sees it.
#[derive(Debug, Default)]
struct Activity {
    /// Requests started on this connection.
    started: AtomicU64,
    /// Requests whose response has not yet been dropped.
    in_flight: AtomicUsize,
}

/// A request in flight on its connection, until its response body is gone.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.started.fetch_add(1, Ordering::Relaxed);
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The service as a connection serves it: each request marked in flight
/// until its response body is dropped.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>,
{
    type Response = Response<ServedBody<InFlight>>;
    type Error = Infallible;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        TrackedFuture {
            in_flight: Some(InFlight::start(&self.activity)),
            inner: self.inner.call(request),
        }
    }
}

pin_project_lite::pin_project! {
    struct TrackedFuture<F> {
        #[pin]
        inner: F,
        in_flight: Option<InFlight>,
    }
}

impl<F> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<ProxyBody>, Infallible>>,
{
    type Output = Result<Response<ServedBody<InFlight>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Poll::Ready(Ok(response)) = this.inner.poll(cx) else {
            return Poll::Pending;
        };
        // Polled again after completion (a hyper bug): count nothing.
        let in_flight = this
            .in_flight
            .take()
            .unwrap_or_else(|| InFlight(Arc::default()));
        crate::progress::head_handed_out();
        Poll::Ready(Ok(response.map(|body| ServedBody::new(body, in_flight))))
    }
}

struct Connection {
    stream: TcpStream,
    peer: SocketAddr,
    framing: FramingMark,
    tls: Option<TlsAcceptor>,
    options: Arc<ServerOptions>,
    builder: Arc<auto::Builder<WatchingExecutor>>,
    closing: watch::Receiver<Closing>,
    /// This connection's place in the listener's budget.
    _permit: OwnedSemaphorePermit,
}

impl Connection {
    async fn run<S>(self, service: S)
    where
        S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let opened = Instant::now();
        let gauge = self.options.open_connections.clone();
        emit(ConnectionOpened {
            open_connections: &gauge,
        });
        if let Err(error) = self.stream.set_nodelay(true) {
            tracing::debug!(message = "Cannot set TCP_NODELAY.", %error);
        }
        let activity = Arc::<Activity>::default();
        let service = Tracked {
            inner: service,
            activity: activity.clone(),
        };
        let watch = Watch {
            activity,
            framing: self.framing.clone(),
            opened,
            options: &self.options,
            closing: self.closing,
        };
        let ended = match self.tls {
            None => {
                let io = TokioIo::new(FramingWatch::new(self.stream, self.framing));
                watch
                    .drive(self.builder.serve_connection(io, service))
                    .await
            }
            Some(acceptor) => {
                let deadline = opened + self.options.header_timeout;
                let handshake = tokio::time::timeout_at(deadline, acceptor.accept(self.stream));
                match handshake.await {
                    Ok(Ok(stream)) => {
                        let io = TokioIo::new(FramingWatch::new(stream, self.framing));
                        watch
                            .drive(self.builder.serve_connection(io, service))
                            .await
                    }
                    Ok(Err(error)) => ConnectionEnd::Failed(error.to_string()),
                    Err(_) => ConnectionEnd::HeaderTimeout,
                }
            }
        };
        emit(ConnectionClosed {
            open_connections: &gauge,
            peer: self.peer,
            end: ended,
        });
    }
}

/// One connection's timer and shutdown signal.
struct Watch<'a> {
    activity: Arc<Activity>,
    /// Bytes received, to tell a head arriving from an idle connection.
    framing: FramingMark,
    opened: Instant,
    options: &'a ServerOptions,
    closing: watch::Receiver<Closing>,
}

impl Watch<'_> {
    /// Serves `conn` to its end, closing it when it idles or stalls, and
    /// when the listener shuts down.
    async fn drive<C>(mut self, conn: C) -> ConnectionEnd
    where
        C: GracefulConnection,
        C::Error: Display,
    {
        let mut conn = pin!(conn);
        let mut stall = StallWatch::new(self.options.idle_timeout);
        let mut quiet = Quiet::new(self.opened);
        let mut closed_for: Option<ConnectionEnd> = None;
        let timer = tokio::time::sleep_until(self.opened + self.options.header_timeout);
        let mut timer = pin!(timer);
        loop {
            let served = poll_fn(|cx| {
                let polled = with_progress(stall.progress(), || conn.as_mut().poll(cx));
                match polled {
                    Poll::Ready(result) => Poll::Ready(Some(result)),
                    Poll::Pending if stall.poll_stalled(cx) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            });
            tokio::select! {
                biased;
                served = served => {
                    return match (served, closed_for) {
                        (None, _) => ConnectionEnd::Stalled,
                        (Some(_), Some(reason)) => reason,
                        (Some(Ok(())), None) => ConnectionEnd::Done,
                        (Some(Err(error)), None) => ConnectionEnd::Failed(error.to_string()),
                    };
                }
                () = &mut timer => {
                    if let Some(reason) = closed_for.take() {
                        // It had its chance to say goodbye.
                        return reason;
                    }
                    let now = Instant::now();
                    match quiet.check(now, &self.activity, &self.framing, self.options) {
                        Check::Busy(next) => timer.as_mut().reset(next),
                        Check::Close(reason) => {
                            conn.as_mut().graceful_shutdown();
                            closed_for = Some(reason);
                            timer.as_mut().reset(now + CLOSE_GRACE);
                        }
                    }
                }
                changed = self.closing.changed() => {
                    let closing = if changed.is_ok() { *self.closing.borrow_and_update() } else { Closing::Now };
                    match closing {
                        Closing::No => {}
                        Closing::Drain => {
                            if closed_for.is_none() {
                                conn.as_mut().graceful_shutdown();
                            }
                            closed_for = Some(ConnectionEnd::Drained);
                            // No idle close while draining; the listener's
                            // grace decides.
                            timer.as_mut().reset(now_plus_forever());
                        }
                        Closing::Now => return ConnectionEnd::Dropped,
                    }
                }
            }
        }
    }
}

/// What a connection's timer concluded.
enum Check {
    /// Look again at this instant.
    Busy(Instant),
    Close(ConnectionEnd),
}

/// Since when a connection has had no request in flight, and whether a
/// request head has started arriving since.
struct Quiet {
    since: Instant,
    /// Requests started, as of `since`.
    started: u64,
    /// Bytes received, as of `since`.
    received: u64,
    /// When bytes of a new head were first seen (HTTP/1).
    head_since: Option<Instant>,
}

impl Quiet {
    fn new(opened: Instant) -> Self {
        Quiet {
            since: opened,
            started: 0,
            received: 0,
            head_since: None,
        }
    }

    /// The connection rules (README, Data plane behaviour), checked at `now`:
    /// - no complete first head within `header_timeout` of connecting;
    /// - a later head not complete within `header_timeout` of its first
    ///   byte (as seen by the timer);
    /// - no request in flight for `idle_timeout`.
    fn check(
        &mut self,
        now: Instant,
        activity: &Activity,
        framing: &FramingMark,
        options: &ServerOptions,
    ) -> Check {
        let started = activity.started.load(Ordering::Relaxed);
        let in_flight = activity.in_flight.load(Ordering::Relaxed);
        let received = framing.received();
        // Four looks per timeout: a connection closes within a quarter of
        // it after its deadline.
        let tick = options.header_timeout.min(options.idle_timeout) / 4;
        if in_flight > 0 || started != self.started {
            self.since = now;
            self.started = started;
            self.received = received;
            self.head_since = None;
            return Check::Busy(now + tick);
        }
        if started > 0 && self.head_since.is_none() && received != self.received {
            self.head_since = Some(now);
        }
        let (deadline, reason) = match self.head_since {
            _ if started == 0 => (
                self.since + options.header_timeout,
                ConnectionEnd::HeaderTimeout,
            ),
            Some(head) => (head + options.header_timeout, ConnectionEnd::HeaderTimeout),
            None => (self.since + options.idle_timeout, ConnectionEnd::Idle),
        };
        if now >= deadline {
            Check::Close(reason)
        } else {
            Check::Busy(deadline.min(now + tick))
        }
    }
}

/// A deadline that never comes in practice.
fn now_plus_forever() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_failures_are_logged_at_most_once_a_second_with_their_count() {
        let mut errors = AcceptErrors::default();
        let start = Instant::now();
        // A failure every back-off for five seconds: 100 failures.
        let logged: Vec<(u128, u64)> = (0..100u32)
            .filter_map(|i| {
                let at = start + ACCEPT_ERROR_BACKOFF * i;
                errors
                    .count(at)
                    .map(|failures| (at.duration_since(start).as_millis(), failures))
            })
            .collect();
        assert_eq!(
            logged,
            [(0, 1), (1000, 20), (2000, 20), (3000, 20), (4000, 20)]
        );
    }
}
