//! Response bodies: one buffer sent whole, or chunks streamed one body frame
//! at a time by a producer task.
//!
//! Streaming goes through a small channel so that each chunk leaves when it is
//! produced (after its `x-mock-chunk-delay-ms`), not when the whole response is
//! ready: a proxy under test sees the first event long before the last.
//!
//! # Failure behaviour
//!
//! `x-mock-reset-after` and a shutdown during `x-mock-hang: body` make the body
//! yield an error. hyper then drops the connection (HTTP/1) or resets the
//! stream (HTTP/2) without the closing chunk, so the client sees a broken body,
//! never a clean but short one. The producer stops as soon as the client goes
//! away (the channel closes), so an abandoned stream costs nothing.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

use crate::server::Shutdown;

/// Chunks the producer may run ahead of hyper.
const CHANNEL_DEPTH: usize = 4;

/// How long a broken body waits, after hyper has taken its last frame, before
/// it fails. hyper drops what it has buffered but not yet written when a body
/// fails, and it writes when it finds the body pending; this gives it time to
/// do so, so the client really receives the frames before the break.
const FLUSH_BEFORE_BREAK: Duration = Duration::from_millis(50);

/// One piece of a streamed body; each becomes one body frame.
pub(crate) struct Chunk {
    pub data: Bytes,
    /// Wait `x-mock-chunk-delay-ms` before sending this chunk (every content
    /// chunk after the first).
    pub delayed: bool,
}

impl Chunk {
    pub(crate) fn new(data: impl Into<Bytes>, delayed: bool) -> Self {
        Self {
            data: data.into(),
            delayed,
        }
    }
}

pub(crate) type Chunks = Box<dyn Iterator<Item = Chunk> + Send>;

/// What a response body will contain, before the body controls are applied.
pub(crate) enum Plan {
    /// A body sent in one frame, with a `content-length`.
    Full(Bytes),
    /// A body streamed chunk by chunk.
    Stream(Chunks),
}

/// The controls that act on the body rather than on the head.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BodyControls {
    pub delay: Duration,
    pub reset_after: Option<u64>,
    pub hang: bool,
}

/// The response body type of every mock response.
#[derive(Debug)]
pub(crate) struct MockBody(Inner);

#[derive(Debug)]
enum Inner {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<io::Result<Bytes>>),
}

impl MockBody {
    pub(crate) fn full(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        Self(Inner::Full((!data.is_empty()).then_some(data)))
    }

    /// Turns a plan into a body, spawning the producer task if it streams.
    ///
    /// A `Plan::Full` stays a single sized frame unless a body control needs
    /// to break or stall it; then it is streamed as one chunk without a
    /// `content-length`, so that the client can tell it is incomplete.
    pub(crate) fn new(plan: Plan, controls: BodyControls, shutdown: Shutdown) -> Self {
        let chunks: Chunks = match plan {
            Plan::Full(data) if !controls.hang && controls.reset_after.is_none() => {
                return Self::full(data)
            }
            Plan::Full(data) => Box::new(std::iter::once(Chunk::new(data, false))),
            Plan::Stream(chunks) => chunks,
        };
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        tokio::spawn(produce(tx, chunks, controls, shutdown));
        Self(Inner::Channel(rx))
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match &mut self.get_mut().0 {
            Inner::Full(data) => Poll::Ready(data.take().map(|data| Ok(Frame::data(data)))),
            Inner::Channel(rx) => rx
                .poll_recv(cx)
                .map(|item| item.map(|chunk| chunk.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.0, Inner::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Full(data) => {
                let len = data.as_ref().map_or(0, Bytes::len);
                SizeHint::with_exact(u64::try_from(len).unwrap_or(u64::MAX))
            }
            Inner::Channel(_) => SizeHint::default(),
        }
    }
}

/// Sends `chunks` into `tx`, applying the delay, reset and hang controls.
async fn produce(
    tx: mpsc::Sender<io::Result<Bytes>>,
    chunks: Chunks,
    controls: BodyControls,
    mut shutdown: Shutdown,
) {
    // `sent` counts the frames sent before this one.
    for (sent, chunk) in (0_u64..).zip(chunks) {
        if controls.reset_after == Some(sent) {
            break_body(&tx).await;
            return;
        }
        if controls.hang && sent == 1 {
            hang(&tx, &mut shutdown).await;
            return;
        }
        if chunk.delayed && !controls.delay.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(controls.delay) => {}
                () = tx.closed() => return,
            }
        }
        if tx.send(Ok(chunk.data)).await.is_err() {
            // The client went away; nobody is listening.
            return;
        }
    }
    if controls.reset_after.is_some() {
        // Also when the body had fewer than K chunks: the client gets all the
        // content but never a clean end.
        break_body(&tx).await;
    } else if controls.hang {
        hang(&tx, &mut shutdown).await;
    }
}

/// Fails the body once the frames before it have reached the client.
async fn break_body(tx: &mpsc::Sender<io::Result<Bytes>>) {
    // All permits free means hyper has taken every frame sent so far.
    match tx.reserve_many(CHANNEL_DEPTH).await {
        Ok(permits) => drop(permits),
        Err(_) => return, // The client went away already.
    }
    tokio::time::sleep(FLUSH_BEFORE_BREAK).await;
    let _ = tx
        .send(Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "x-mock-reset-after: the mock broke the body on purpose",
        )))
        .await;
}

/// Sends nothing more until the client leaves or the server shuts down; in
/// the latter case the body ends with an error, never cleanly.
async fn hang(tx: &mpsc::Sender<io::Result<Bytes>>, shutdown: &mut Shutdown) {
    tokio::select! {
        () = tx.closed() => {}
        () = shutdown.wait() => {
            let _ = tx
                .send(Err(io::Error::other(
                    "x-mock-hang: the mock upstream shut down during the hang",
                )))
                .await;
        }
    }
}
