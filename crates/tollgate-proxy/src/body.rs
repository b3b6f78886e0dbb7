//! Body types of the data plane.
//!
//! Bodies stream: nothing here buffers more than the one frame in flight.
//! [`ProxyBody`] is what the gateway answers with (a relayed, metered upstream
//! body or one the gateway made); [`RequestBody`] is the client's body on its way
//! upstream, with the size limit enforced as the bytes pass.
//!
//! Both are plain enums/structs over `Unpin` parts, so they need no pinning
//! projections and no allocation per request.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::channel::Channel;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::meter::MeteredBody;

/// Errors a relayed body can end with.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body: relayed from the upstream (and metered), or made by
/// the gateway.
#[derive(Debug)]
pub struct ProxyBody(Source);

#[derive(Debug)]
enum Source {
    /// A complete body the gateway produced (error JSON, admin answers).
    Full(Option<Bytes>),
    /// The upstream's body, relayed frame by frame and metered.
    Metered(MeteredBody),
    /// A body the gateway produces piece by piece (an export), with
    /// back-pressure from the client.
    Stream(Channel<Bytes, BoxError>),
}

impl ProxyBody {
    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        ProxyBody(Source::Full(Some(bytes.into())))
    }

    pub(crate) fn empty() -> Self {
        ProxyBody(Source::Full(None))
    }

    pub(crate) fn metered(body: MeteredBody) -> Self {
        ProxyBody(Source::Metered(body))
    }

    pub(crate) fn stream(channel: Channel<Bytes, BoxError>) -> Self {
        ProxyBody(Source::Stream(channel))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().0 {
            Source::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Source::Metered(metered) => Pin::new(metered)
                .poll_frame(cx)
                .map_err(|error| Box::new(error) as BoxError),
            Source::Stream(channel) => Pin::new(channel).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Source::Full(bytes) => bytes.is_none(),
            Source::Metered(metered) => metered.is_end_stream(),
            Source::Stream(channel) => channel.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Source::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Source::Full(None) => SizeHint::with_exact(0),
            Source::Metered(metered) => metered.size_hint(),
            Source::Stream(channel) => channel.size_hint(),
        }
    }
}

/// The client's request body was larger than `server.max_request_body`.
///
/// Raised from inside the upstream request's body stream; the pipeline finds
/// it in the client error's source chain and answers 413.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit of {limit} bytes")]
pub(crate) struct BodyTooLarge {
    pub limit: u64,
}

/// The client's body failed on its way upstream (the client went away or
/// broke the framing mid-upload): the client's fault, not the upstream's.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body failed: {0}")]
pub(crate) struct ClientBodyFailed(#[source] pub hyper::Error);

/// The client sent nothing of its body for `request_body_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body sent nothing for {}s", after.as_secs_f64())]
pub(crate) struct BodyTimedOut {
    pub after: Duration,
}

/// How far a streamed upload has come, for the forwarder: the route's
/// timeout is the upstream's time to answer, so it does not run while the
/// upstream is still waiting for the client's bytes.
#[derive(Debug, Default)]
pub(crate) struct Upload {
    /// The last poll of the body found nothing from the client yet.
    waiting_on_client: AtomicBool,
    /// When the last byte was handed upstream.
    finished: OnceLock<Instant>,
}

impl Upload {
    pub(crate) fn waiting_on_client(&self) -> bool {
        self.waiting_on_client.load(Ordering::Relaxed)
    }

    pub(crate) fn finished_at(&self) -> Option<Instant> {
        self.finished.get().copied()
    }
}

/// The client's body on its way upstream, counted, capped, and cut off
/// when the client stops sending.
#[derive(Debug)]
pub(crate) struct RequestBody {
    source: RequestSource,
    limit: u64,
    seen: u64,
    /// Shared with the request's usage event (`request_bytes`).
    counter: Option<Arc<AtomicU64>>,
    /// Longest wait for the client's next bytes.
    stall_after: Duration,
    /// The wait for the client's next bytes, armed while it runs; the
    /// allocation is made on the first wait only (most bodies arrive whole
    /// with their head and never wait).
    stall: Option<(Pin<Box<Sleep>>, bool)>,
    upload: Option<Arc<Upload>>,
}

#[derive(Debug)]
enum RequestSource {
    Streaming(Incoming),
    /// Read whole by the gateway (the one exception to streaming: an OpenAI
    /// streaming request it rewrote to ask for usage).
    Buffered(Option<Bytes>),
}

impl RequestBody {
    /// The client's body, cut at `limit` bytes (413) and after `stall_after`
    /// without a byte (408).
    pub(crate) fn new(inner: Incoming, limit: u64, stall_after: Duration) -> Self {
        let upload = (!inner.is_end_stream()).then(Arc::default);
        RequestBody {
            source: RequestSource::Streaming(inner),
            limit,
            seen: 0,
            counter: None,
            stall_after,
            stall: None,
            upload,
        }
    }

    /// The upload's progress, for a body that has bytes to come.
    pub(crate) fn upload(&self) -> Option<Arc<Upload>> {
        self.upload.clone()
    }

    /// A body the gateway already holds; `counter` is not touched (the
    /// caller counted what the client sent).
    pub(crate) fn buffered(bytes: Bytes) -> Self {
        RequestBody {
            limit: u64::MAX,
            source: RequestSource::Buffered(Some(bytes)),
            seen: 0,
            counter: None,
            // Never waited on: the bytes are already here.
            stall_after: Duration::ZERO,
            stall: None,
            upload: None,
        }
    }

    /// Adds every byte that passes to `counter`.
    pub(crate) fn counted(mut self, counter: Arc<AtomicU64>) -> Self {
        self.counter = Some(counter);
        self
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let inner = match &mut this.source {
            RequestSource::Buffered(bytes) => {
                return Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b))))
            }
            RequestSource::Streaming(inner) => inner,
        };
        let polled = Pin::new(&mut *inner).poll_frame(cx);
        // hyper asks for no more once a body with a length says it has
        // ended, so the last frame may be the end.
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => inner.is_end_stream(),
            _ => false,
        };
        if let Some(upload) = &this.upload {
            upload
                .waiting_on_client
                .store(polled.is_pending(), Ordering::Relaxed);
            if ended {
                let _ = upload.finished.set(Instant::now());
            }
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some((_, armed)) = &mut this.stall {
                    *armed = false;
                }
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    this.seen += len;
                    if let Some(counter) = &this.counter {
                        counter.fetch_add(len, Ordering::Relaxed);
                    }
                    if this.seen > this.limit {
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge {
                            limit: this.limit,
                        }))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                Poll::Ready(Some(Err(Box::new(ClientBodyFailed(error)))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let deadline = Instant::now() + this.stall_after;
                let (sleep, armed) = this
                    .stall
                    .get_or_insert_with(|| (Box::pin(tokio::time::sleep_until(deadline)), true));
                if !*armed {
                    sleep.as_mut().reset(deadline);
                    *armed = true;
                }
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(Box::new(BodyTimedOut {
                        after: this.stall_after,
                    }))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            RequestSource::Streaming(inner) => inner.is_end_stream(),
            RequestSource::Buffered(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            RequestSource::Streaming(inner) => inner.size_hint(),
            RequestSource::Buffered(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            RequestSource::Buffered(None) => SizeHint::with_exact(0),
        }
    }
}
