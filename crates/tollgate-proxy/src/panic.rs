//! Panics in request handlers, caught.
//!
//! A panic is a bug, but it must not reach the client as a dropped
//! connection (which looks like a network failure and invites retries that
//! hit the same bug): the data plane and the admin API both answer it with
//! 500 `internal_error` and log it.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::task::Poll;

/// Polls `future` to completion, turning a panic during any poll into
/// `Err` with the panic's message. Polled in place rather than spawned, so
/// a client that goes away still cancels the work as before; after a panic
/// the future is dropped and never polled again.
pub(crate) async fn catch_panic<F: Future>(future: F) -> Result<F::Output, String> {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(move |cx| {
        match std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(panic_message(payload.as_ref()))),
        }
    })
    .await
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
