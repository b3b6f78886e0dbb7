//! A mock upstream for Tollgate's tests, demos and benches: an HTTP server that
//! speaks enough of the OpenAI and Anthropic APIs to be metered, plus a few
//! raw endpoints, and that misbehaves on request.
//!
//! It owns nothing of the gateway and must not depend on it (nor on any other
//! Tollgate crate): it plays the part of the origin, and its answers are
//! derived only from the request, so that a test can predict every number.
//!
//! Two ways to run it:
//!
//! - [`MockUpstream::start`] in a test: binds `127.0.0.1:0`, serves in the
//!   background, records every request ([`MockUpstream::requests`]) and stops
//!   when dropped.
//! - [`serve`] for `tollgate mock-upstream --listen ADDR`: serves until a
//!   shutdown future resolves and records nothing, so memory stays flat however
//!   long it runs.
//!
//! Both speak HTTP/1.1 and cleartext HTTP/2 (h2c, prior knowledge) on the same
//! port and set `TCP_NODELAY`.
//!
//! The crate also plays the other end of the gateway's webhooks:
//! [`WebhookReceiver`] (in [`webhooks`]) is an endpoint that verifies Standard
//! Webhooks signatures, records every delivery and fails on request.
//!
//! # Endpoints
//!
//! | request | answer |
//! |---|---|
//! | `POST /v1/chat/completions` | OpenAI Chat Completions; SSE with `"stream": true` |
//! | `POST /v1/responses` | OpenAI Responses API; SSE with `"stream": true` |
//! | `POST /v1/messages` | Anthropic Messages; SSE with `"stream": true` |
//! | `POST /v1/embeddings` | one 8-float embedding per input string |
//! | `GET /bytes/{n}` | exactly `n` bytes, byte `i` = `(i % 251) as u8`, in 64 KiB chunks, `application/octet-stream` |
//! | `POST` or `PUT /sink` | reads the body without keeping it; `{"bytes": N}` |
//! | anything else | the echo: `{"method", "path", "query", "headers": {name: [values]}, "body_bytes"}` |
//!
//! The four API endpoints need a JSON object body (else 400) of at most
//! 16 MiB (else 413); errors are OpenAI-shaped,
//! `{"error": {"type", "message"}}`, on every endpoint. Streams look like the
//! real ones: chat chunks end with `data: [DONE]`; the Responses stream runs
//! `response.created` … `response.output_text.delta` … `response.completed`;
//! Anthropic's runs `message_start`, `content_block_start`, `ping`,
//! `content_block_delta`…, `content_block_stop`, `message_delta`,
//! `message_stop`. SSE responses have `content-type: text/event-stream;
//! charset=utf-8`, as OpenAI and Anthropic send it.
//!
//! # Token rule
//!
//! Usage numbers are computed, not tokenized, so tests can state them:
//!
//! - **Prompt tokens** `P` = [`prompt_tokens`] of the request body: the number
//!   of whitespace-separated words in all prompt text (`messages[*].content`,
//!   `system`, `instructions`, `input`), at least 1.
//! - **Completion tokens** `N` = the number of content chunks: `x-mock-chunks`
//!   (default 3), capped by the request's own limit when smaller
//!   (`max_completion_tokens` or `max_tokens` for chat, `max_output_tokens` for
//!   responses, `max_tokens` for Anthropic). Each chunk is one word; the
//!   non-streamed content is the same `N` words joined by single spaces, and the
//!   streamed deltas (`"lorem"`, `" ipsum"`, …) concatenate to exactly it.
//! - **Cached tokens** `C` = `x-mock-cache-read` (default 0), reported as each
//!   API does: OpenAI `prompt_tokens` / `input_tokens` = `P + C` with
//!   `cached_tokens` = `C`; Anthropic `input_tokens` = `P` with
//!   `cache_read_input_tokens` = `C`. Either way the uncached input is `P`.
//! - Totals are sums; embeddings report `prompt_tokens` = `total_tokens` = `P`.
//!
//! # Controls
//!
//! Request headers that steer the response. A control with a value the mock
//! cannot parse is answered with 400 and a message naming the header.
//!
//! | header | effect |
//! |---|---|
//! | `x-mock-cost-usd: V` | response header `x-cost-usd: V`, copied verbatim (garbage too) |
//! | `x-mock-token-headers: 1` | response headers `x-tokens-input: P` and `x-tokens-output: N` (`N` = 0 where nothing is generated: embeddings, errors, raw endpoints; `P` for a non-JSON body is 1) |
//! | `x-mock-header: name: value` | adds that raw response header; may repeat. The first one of a name replaces the mock's own header of that name, later ones append. hyper may refuse or rewrite some (`transfer-encoding`, `content-length`) |
//! | `x-mock-chunks: N` | content chunks / completion tokens (at most 1 000 000) |
//! | `x-mock-chunk-delay-ms: D` | streams wait `D` ms before each content chunk after the first (each 64 KiB chunk for `/bytes`); no effect on whole JSON bodies |
//! | `x-mock-status: S` | status `S` (200–999) with `{"error":{"type":"server_error","message":"mock failure"}}` |
//! | `x-mock-hang: headers` | never answers; the connection closes when the server shuts down |
//! | `x-mock-hang: body` | sends the head and the first body frame, then nothing; at shutdown the body breaks |
//! | `x-mock-reset-after: K` | sends `K` body frames, waits 50 ms for them to reach the client, then breaks the body (see below) |
//! | `x-mock-cache-read: C` | cached prompt tokens, as in the token rule |
//! | `x-mock-content-length: 1` | `/bytes/{n}` sends `content-length: n` (it is chunked otherwise) |
//!
//! The header controls (`x-mock-cost-usd`, `x-mock-token-headers`,
//! `x-mock-header`) apply to every endpoint and to `x-mock-status` errors.
//!
//! A *body frame* is one SSE event (every event counts, `message_start` and
//! `[DONE]` included), one 64 KiB chunk of `/bytes`, or the whole body of any
//! other response. When a body control (`x-mock-reset-after`,
//! `x-mock-hang: body`) applies to a JSON response, that response loses its
//! `content-length` so that the client can tell it is incomplete.
//!
//! # Failure behaviour
//!
//! A broken body (`x-mock-reset-after`, or a shutdown during
//! `x-mock-hang: body`) ends with an error: hyper closes the HTTP/1 connection
//! without the terminating chunk, or resets the HTTP/2 stream, so the client
//! sees a failed body, never a clean end. `K` larger than the body's frame
//! count still breaks it, after the last frame. A request body that breaks off
//! is recorded with the bytes that arrived and its connection is closed.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let mock = tollgate_mock::MockUpstream::start().await?;
//! let base_url = mock.url(); // point the gateway's route here
//! # let _ = base_url;
//! // ... send requests through the gateway ...
//! assert!(mock.requests().iter().all(|r| r.headers.get("x-tollgate-key").is_none()));
//! # Ok(())
//! # }
//! ```

mod anthropic;
mod body;
mod controls;
mod handler;
mod openai;
mod raw;
mod record;
mod server;
mod tokens;
pub mod webhooks;

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use tokio::net::TcpListener;
use tokio::sync::oneshot;

use record::Recorder;
pub use record::{RecordedRequest, RECORDED_BODY_PREFIX};
pub use tokens::prompt_tokens;
pub use webhooks::WebhookReceiver;

/// Serves the mock on `listener` until `shutdown` resolves. HTTP/1.1 and h2c,
/// `TCP_NODELAY`. Records nothing (see the crate docs).
///
/// After `shutdown` the listener closes at once; open connections get up to
/// two seconds to finish before this returns.
///
/// # Errors
///
/// None at present: accept errors are logged and retried. The `Result` leaves
/// room for listener failures that cannot be retried.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    server::serve_with(listener, shutdown, None).await
}

/// A mock running in the background of a test. Dropping it shuts the server
/// down (requests hung by `x-mock-hang` then break).
#[derive(Debug)]
pub struct MockUpstream {
    addr: SocketAddr,
    recorder: Recorder,
    /// Dropping this sender (with the mock) resolves the server's shutdown future.
    _shutdown: oneshot::Sender<()>,
}

impl MockUpstream {
    /// Starts a mock on `127.0.0.1` with a free port.
    ///
    /// # Errors
    ///
    /// When the socket cannot be bound.
    pub async fn start() -> io::Result<Self> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    /// Starts a mock on `addr` (port 0 picks a free port). Must be called
    /// within a Tokio runtime, which then runs the server.
    ///
    /// # Errors
    ///
    /// When the socket cannot be bound.
    pub async fn start_on(addr: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let recorder = Recorder::default();
        let (shutdown, down) = oneshot::channel::<()>();
        tokio::spawn(server::serve_with(
            listener,
            async move {
                // Resolves on send or when the sender is dropped: both mean stop.
                let _ = down.await;
            },
            Some(recorder.clone()),
        ));
        Ok(Self {
            addr,
            recorder,
            _shutdown: shutdown,
        })
    }

    /// The address the mock listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL, e.g. `http://127.0.0.1:40123`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, in the order their bodies finished
    /// arriving. A request is recorded before its response head is sent.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.recorder.snapshot()
    }
}
