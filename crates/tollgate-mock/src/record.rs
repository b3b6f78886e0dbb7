//! What the mock received, for tests to inspect.

use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http::{HeaderMap, Method, Uri, Version};

/// Bytes of each request body kept in [`RecordedRequest::body`].
pub const RECORDED_BODY_PREFIX: usize = 64 * 1024;

/// One request as the mock received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: Method,
    /// The request target as received: path and query (HTTP/1), or the full
    /// URI with scheme and authority (HTTP/2).
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    /// The first [`RECORDED_BODY_PREFIX`] bytes of the body.
    pub body: Bytes,
    /// The whole body's length: every byte received, also when the client
    /// broke the body off early.
    pub body_len: u64,
}

/// A shared, append-only log of requests. Only [`crate::MockUpstream`] keeps
/// one: [`crate::serve`], which runs for as long as the CLI does, records
/// nothing so that its memory stays flat.
#[derive(Clone, Debug, Default)]
pub(crate) struct Recorder(Arc<Mutex<Vec<RecordedRequest>>>);

impl Recorder {
    pub(crate) fn push(&self, request: RecordedRequest) {
        // A panic while holding the lock cannot leave a Vec half-pushed, so a
        // poisoned log is still a good log.
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(request);
    }

    pub(crate) fn snapshot(&self) -> Vec<RecordedRequest> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}
