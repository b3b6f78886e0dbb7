//! The accept loop, connections and shutdown.
//!
//! # Failure behaviour
//!
//! Accept errors (out of file descriptors, a connection reset before accept)
//! are logged and the loop goes on after a short pause; they never end
//! [`serve_with`]. On shutdown the listener closes at once, every connection
//! is asked to finish its in-flight requests (`x-mock-hang` requests end with a
//! broken response) and is dropped after [`SHUTDOWN_GRACE`] at the latest.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::handler;
use crate::record::Recorder;

/// How long a connection may take to finish its requests after shutdown.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Pause after a failed accept, so that running out of descriptors does not
/// become a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// Resolves once the server is shutting down. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub(crate) async fn wait(&mut self) {
        // An error means the sender, owned by the accept loop, is gone: that
        // is a shutdown too.
        let _ = self.0.wait_for(|down| *down).await;
    }
}

/// What every request handler shares.
#[derive(Debug)]
pub(crate) struct State {
    pub recorder: Option<Recorder>,
    pub shutdown: Shutdown,
    next_id: AtomicU64,
}

impl State {
    /// A fresh number for response ids (`chatcmpl-mock7`), unique per server.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// [`crate::serve`], with an optional log of every request received.
pub(crate) async fn serve_with(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    recorder: Option<Recorder>,
) -> io::Result<()> {
    let (signal, watch) = watch::channel(false);
    let state = Arc::new(State {
        recorder,
        shutdown: Shutdown(watch),
        next_id: AtomicU64::new(1),
    });
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    connections.spawn(serve_connection(
                        Arc::clone(&builder),
                        stream,
                        Arc::clone(&state),
                    ));
                }
                Err(error) => {
                    warn!(message = "Mock upstream failed to accept a connection.", %error);
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            // Reap finished connections so the set stays as small as the
            // number of open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }

    drop(listener);
    signal.send_replace(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

async fn serve_connection(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    state: Arc<State>,
) {
    // Streamed chunks are small; Nagle would hold them back.
    if let Err(error) = stream.set_nodelay(true) {
        debug!(message = "Mock upstream could not set TCP_NODELAY.", %error);
    }
    let mut shutdown = state.shutdown.clone();
    let service = service_fn(move |request| handler::handle(Arc::clone(&state), request));
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            // Broken connections are the point of some controls; not worth a warning.
            if let Err(error) = result {
                debug!(message = "Mock upstream connection ended with an error.", %error);
            }
        }
        () = shutdown.wait() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, connection).await;
        }
    }
}
