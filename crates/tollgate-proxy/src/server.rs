//! Listeners: accept, optional TLS, HTTP/1.1 and HTTP/2 on one port, and a
//! graceful drain on shutdown.
//!
//! # Failure behaviour
//! On shutdown the listener is closed first (new connections are refused),
//! then in-flight requests get up to `shutdown_grace` to finish; connections
//! still open after that are dropped, which aborts their responses.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::body::ProxyBody;
use crate::framing::{FramingMark, FramingWatch};
use crate::pipeline::ConnInfo;

/// How long to back off after an accept error such as EMFILE.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Connection-level settings shared by the data plane and the admin server.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Time a client has to finish its TLS handshake and each request head.
    pub header_timeout: Duration,
    /// How long in-flight requests may run once shutdown begins.
    pub shutdown_grace: Duration,
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
    let builder = Arc::new(connection_builder(&options));
    let graceful = GracefulShutdown::new();
    let proto = if tls.is_some() { "https" } else { "http" };
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_error(error).await;
                    continue;
                }
            },
        };
        let framing = FramingMark::default();
        let service = make_service(ConnInfo {
            peer,
            proto,
            framing: framing.clone(),
        });
        let connection = Connection {
            stream,
            peer,
            framing,
            tls: tls.clone(),
            header_timeout: options.header_timeout,
            builder: builder.clone(),
        };
        tokio::spawn(connection.run(service, graceful.watcher()));
    }
    drop(listener);
    tracing::debug!(
        message = "Listener closed; draining connections.",
        connections = graceful.count()
    );
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(options.shutdown_grace) => {
            tracing::warn!(
                message = "Shutdown grace period ended with connections still open.",
                grace_secs = options.shutdown_grace.as_secs_f64(),
            );
        }
    }
}

fn connection_builder(options: &ServerOptions) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

async fn accept_error(error: io::Error) {
    // Errors about one connection (reset before accept) need no pause;
    // resource exhaustion does, or the loop would spin.
    match error.kind() {
        io::ErrorKind::ConnectionAborted
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::Interrupted => {}
        _ => {
            tracing::warn!(message = "Accept failed.", %error);
            tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
        }
    }
}

struct Connection {
    stream: TcpStream,
    peer: SocketAddr,
    framing: FramingMark,
    tls: Option<TlsAcceptor>,
    header_timeout: Duration,
    builder: Arc<auto::Builder<TokioExecutor>>,
}

impl Connection {
    async fn run<S>(self, service: S, watcher: hyper_util::server::graceful::Watcher)
    where
        S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        if let Err(error) = self.stream.set_nodelay(true) {
            tracing::debug!(message = "Cannot set TCP_NODELAY.", %error);
        }
        let result = match self.tls {
            None => {
                let io = TokioIo::new(FramingWatch::new(self.stream, self.framing));
                let conn = self.builder.serve_connection(io, service);
                watcher.watch(conn).await
            }
            Some(acceptor) => {
                let handshake =
                    tokio::time::timeout(self.header_timeout, acceptor.accept(self.stream));
                let stream = match handshake.await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        tracing::debug!(message = "TLS handshake failed.", %error, peer = %self.peer);
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(message = "TLS handshake timed out.", peer = %self.peer);
                        return;
                    }
                };
                let io = TokioIo::new(FramingWatch::new(stream, self.framing));
                let conn = self.builder.serve_connection(io, service);
                watcher.watch(conn).await
            }
        };
        if let Err(error) = result {
            tracing::debug!(message = "Connection ended with an error.", error = %error, peer = %self.peer);
        }
    }
}
