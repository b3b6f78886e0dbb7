//! Panics in request handlers, caught.
//!
//! A panic is a bug, but it must not reach the client as a dropped
//! connection (which looks like a network failure and invites retries that
//! hit the same bug): the data plane and the admin API both answer it with
//! 500 `internal_error` and log it.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Polls `future` to completion, turning a panic during any poll into
/// `Err` with the panic's message. Polled in place rather than spawned, so
/// a client that goes away still cancels the work as before; after a panic
/// the future is never polled again.
///
/// A plain future rather than an `async fn`: an `async fn` would move the
/// handler's whole (unstarted, several-kilobyte) future once more, into its
/// own state, on its first poll.
pub(crate) fn catch_panic<F: Future>(future: F) -> CatchPanic<F> {
    CatchPanic {
        future,
        done: false,
    }
}

pin_project_lite::pin_project! {
    /// The future of [`catch_panic`].
    pub(crate) struct CatchPanic<F> {
        #[pin]
        future: F,
        // Ready (or panicked) already: not polled again.
        done: bool,
    }
}

impl<F: Future> Future for CatchPanic<F> {
    type Output = Result<F::Output, String>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if *this.done {
            return Poll::Pending;
        }
        let future = this.future;
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| future.poll(cx)));
        let output = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(output)) => Ok(output),
            Err(payload) => Err(panic_message(payload.as_ref())),
        };
        *this.done = true;
        Poll::Ready(output)
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_owned()
    }
}
