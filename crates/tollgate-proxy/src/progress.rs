//! Responses a client stops reading: detected and abandoned.
//!
//! A response body is only polled while the client makes room for it (an
//! HTTP/1 socket that drains, an HTTP/2 stream window that opens). A client
//! that stops reading therefore stops the body silently: nothing is polled,
//! nothing times out, and the upstream connection behind the body stays
//! checked out for as long as the client keeps its socket open.
//!
//! [`ServedBody`] reports what the last poll of a response body did to the
//! [`Progress`] of the task polling it (a task-local): it handed out data
//! (and now waits for the client to take more), it waits for the upstream,
//! or it is done. The task's [`StallWatch`] arms a timer only while the body
//! waits for the client, and re-arms it whenever more data goes out; if it
//! fires, the response has been stuck on the client for `idle_timeout` and
//! the task drops it. Dropping the body records the usage row with outcome
//! `client_closed` and closes the upstream connection, which can no longer
//! be reused half-read.
//!
//! On HTTP/1 the task is the connection's (one response at a time, so the
//! whole connection goes); on HTTP/2 every stream runs in a task of its own
//! spawned through [`WatchingExecutor`], so one stalled stream is reset
//! without touching the others.
//!
//! A body that waits for its upstream is not stalled: a model may think for
//! minutes between two events. That wait is bounded by the upstream, not by
//! the client.
//!
//! # Failure behaviour
//! An abandoned response loses nothing that was metered: the row records the
//! bytes and tokens actually streamed. Detection happens between
//! `idle_timeout` and `idle_timeout` plus the time of one poll after the
//! last byte went out.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::body::{BoxError, ProxyBody};

tokio::task_local! {
    /// The progress of the response bodies polled by the current task.
    static PROGRESS: Arc<Progress>;
}

const IDLE: u8 = 0;
const AWAITING_UPSTREAM: u8 = 1;
const AWAITING_CLIENT: u8 = 2;

/// What the response bodies of one task last did.
///
/// Written and read by the same task only; atomics because the task may
/// move between threads, all `Relaxed` because there is no other data to
/// order against.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    state: AtomicU8,
    /// Bumped every time a body hands data out.
    handed_out: AtomicU32,
}

impl Progress {
    fn record<T>(&self, poll: &Poll<Option<T>>) {
        match poll {
            Poll::Ready(Some(_)) => {
                self.handed_out.fetch_add(1, Ordering::Relaxed);
                self.state.store(AWAITING_CLIENT, Ordering::Relaxed);
            }
            Poll::Pending => self.state.store(AWAITING_UPSTREAM, Ordering::Relaxed),
            Poll::Ready(None) => self.state.store(IDLE, Ordering::Relaxed),
        }
    }

    fn awaiting_client(&self) -> Option<u32> {
        (self.state.load(Ordering::Relaxed) == AWAITING_CLIENT)
            .then(|| self.handed_out.load(Ordering::Relaxed))
    }
}

/// The response head went to the client: until its body is polled, the
/// response waits for the client (an HTTP/2 stream whose window is closed
/// never polls its body at all).
pub(crate) fn head_handed_out() {
    let _ = PROGRESS.try_with(|progress| progress.record(&Poll::Ready(Some(()))));
}

/// Runs `poll` with `progress` as the current task's progress.
pub(crate) fn with_progress<R>(progress: &Arc<Progress>, poll: impl FnOnce() -> R) -> R {
    PROGRESS.sync_scope(progress.clone(), poll)
}

/// Decides when a task's response has been stuck on its client too long.
#[derive(Debug)]
pub(crate) struct StallWatch {
    progress: Arc<Progress>,
    timeout: Duration,
    /// Armed while a body waits for the client, with the `handed_out` count
    /// it was armed at.
    timer: Option<(Pin<Box<Sleep>>, u32)>,
}

impl StallWatch {
    pub(crate) fn new(timeout: Duration) -> Self {
        StallWatch {
            progress: Arc::default(),
            timeout,
            timer: None,
        }
    }

    pub(crate) fn progress(&self) -> &Arc<Progress> {
        &self.progress
    }

    /// Called after the task's work returned `Pending`: true when its
    /// response has waited for the client for the whole timeout.
    pub(crate) fn poll_stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(handed_out) = self.progress.awaiting_client() else {
            // Waiting for the upstream or for a request: not our business.
            self.timer = None;
            return false;
        };
        match &mut self.timer {
            Some((sleep, armed_at)) if *armed_at == handed_out => {}
            Some((sleep, armed_at)) => {
                sleep.as_mut().reset(Instant::now() + self.timeout);
                *armed_at = handed_out;
            }
            None => {
                self.timer = Some((Box::pin(tokio::time::sleep(self.timeout)), handed_out));
            }
        }
        self.timer
            .as_mut()
            .is_some_and(|(sleep, _)| sleep.as_mut().poll(cx).is_ready())
    }
}

pin_project_lite::pin_project! {
    /// A task that is dropped when its response stalls on the client.
    pub(crate) struct Watched<F> {
        #[pin]
        inner: F,
        watch: StallWatch,
    }
}

impl<F: Future<Output = ()>> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let inner = this.inner;
        if with_progress(this.watch.progress(), || inner.poll(cx)).is_ready() {
            return Poll::Ready(());
        }
        if this.watch.poll_stalled(cx) {
            tracing::debug!(message = "Abandoned an HTTP/2 response its client stopped reading.");
            // Returning drops the stream: h2 resets it, and the body's drop
            // records the usage row and closes the upstream connection.
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// Spawns hyper's HTTP/2 stream tasks, each watched for a stalled client.
#[derive(Clone, Debug)]
pub(crate) struct WatchingExecutor {
    pub idle_timeout: Duration,
}

impl<F> hyper::rt::Executor<F> for WatchingExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(Watched {
            inner: future,
            watch: StallWatch::new(self.idle_timeout),
        });
    }
}

/// A response body as served: reports its progress to the polling task,
/// and holds `guard` (the connection's in-flight mark) until it is dropped.
#[derive(Debug)]
pub(crate) struct ServedBody<G> {
    inner: ProxyBody,
    _guard: G,
}

impl<G> ServedBody<G> {
    pub(crate) fn new(inner: ProxyBody, guard: G) -> Self {
        ServedBody {
            inner,
            _guard: guard,
        }
    }
}

impl<G> Drop for ServedBody<G> {
    fn drop(&mut self) {
        // A body that ends without being polled to its end (hyper stops at
        // `is_end_stream`) must not leave the task looking stalled while it
        // serves the next request.
        let _ = PROGRESS.try_with(|progress| progress.state.store(IDLE, Ordering::Relaxed));
    }
}

impl<G: Unpin> Body for ServedBody<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let poll = Pin::new(&mut self.get_mut().inner).poll_frame(cx);
        // Outside a watched task (a test driving a body by hand) there is
        // nothing to report to.
        let _ = PROGRESS.try_with(|progress| progress.record(&poll));
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    fn handed_out(progress: &Progress) {
        progress.record(&Poll::Ready(Some(())));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_waiting_for_its_client_stalls_after_the_timeout() {
        let mut watch = StallWatch::new(Duration::from_secs(60));
        handed_out(watch.progress());
        assert!(!poll_fn(|cx| Poll::Ready(watch.poll_stalled(cx))).await);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(!poll_fn(|cx| Poll::Ready(watch.poll_stalled(cx))).await);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(poll_fn(|cx| Poll::Ready(watch.poll_stalled(cx))).await);
    }

    #[tokio::test(start_paused = true)]
    async fn data_going_out_restarts_the_wait() {
        let mut watch = StallWatch::new(Duration::from_secs(60));
        for _ in 0..5 {
            handed_out(watch.progress());
            assert!(!poll_fn(|cx| Poll::Ready(watch.poll_stalled(cx))).await);
            tokio::time::advance(Duration::from_secs(50)).await;
        }
        assert!(!poll_fn(|cx| Poll::Ready(watch.poll_stalled(cx))).await);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(poll_fn(|cx| Poll::Ready(watch.poll_stalled(cx))).await);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_the_upstream_or_the_next_request_is_not_a_stall() {
        let mut watch = StallWatch::new(Duration::from_secs(1));
        handed_out(watch.progress());
        watch.progress().record::<()>(&Poll::Pending);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(!poll_fn(|cx| Poll::Ready(watch.poll_stalled(cx))).await);
        watch.progress().record::<()>(&Poll::Ready(None));
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(!poll_fn(|cx| Poll::Ready(watch.poll_stalled(cx))).await);
    }
}
