//! Metering on the data plane: one usage event per authenticated request.
//!
//! A [`UsageGuard`] is made as soon as the key is known. It is finished in
//! exactly one of three places: by [`crate::pipeline::Gateway::handle`]
//! when the gateway answers with its own error, by [`MeteredBody`] when the
//! upstream's body ends or fails, or by its own `Drop` when the client goes
//! away first (outcome `client_closed`, with what was streamed so far). So
//! every request that presented a valid key yields exactly one row, and the
//! bytes and tokens in it are the ones that actually passed. The one
//! exception is withdrawn ([`UsageGuard::withdraw`]): a request found
//! malformed once its body was read, which gets no row, as a malformed
//! request found earlier does not.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use crate::forward::UpstreamBody;
use bytes::Bytes;
use http::{HeaderMap, HeaderName};
use http_body::{Body, Frame, SizeHint};
use time::OffsetDateTime;
use tollgate_metering::keys::Authenticated;
use tollgate_metering::limits::Policies;
use tollgate_metering::limits::{event_tokens, Admission, Limiter};
use tollgate_metering::usage::recorder::Recorder;
use tollgate_metering::usage::Pricing;
use tollgate_metering::usage::{CostSource, Outcome, UsageEvent};
use tollgate_metering::usage::{ResponseBody, ResponseUsage, UsageFormat, UsageHeaders};
use uuid::Uuid;

use crate::events::{emit, AccessFields, InvalidUsageIgnored, RequestCompleted, UpstreamFailed};
use crate::metrics::{Metrics, RequestOutcome, RouteMetrics, UpstreamErrorKind};

/// What metering needs that is the same for every request.
pub struct Metering {
    pub recorder: Recorder,
    /// Rate limits, quotas and budgets: admissions are settled or released
    /// when the usage event is finished.
    pub limiter: Arc<Limiter>,
    /// Customers' tiers (for the quota views).
    pub policies: Arc<Policies>,
    /// `usage_events.instance` of every row this process records.
    pub instance: String,
    pub metrics: Arc<Metrics>,
    /// Log one line per finished request (`server.access_log`).
    pub access_log: bool,
}

impl Metering {
    pub fn new(
        recorder: Recorder,
        policies: Arc<Policies>,
        instance: String,
        metrics: Arc<Metrics>,
        access_log: bool,
    ) -> Metering {
        Metering {
            recorder,
            limiter: policies.limiter().clone(),
            policies,
            instance,
            metrics,
            access_log,
        }
    }
}

/// Where a route's usage comes from (the route's config).
#[derive(Clone, Debug, Default)]
pub struct RouteUsage {
    pub format: tollgate_metering::usage::UsageFormat,
    pub cost_header: Option<HeaderName>,
    pub input_tokens_header: Option<HeaderName>,
    pub output_tokens_header: Option<HeaderName>,
}

/// The one usage event of a request, finished exactly once.
pub(crate) struct UsageGuard {
    event: Option<UsageEvent>,
    metering: Arc<Metering>,
    /// The route's metrics and the prices in force when the request
    /// started: a reload does not change how a running request is counted.
    route_metrics: Arc<RouteMetrics>,
    pricing: Arc<Pricing>,
    started: Instant,
    request_bytes: Arc<AtomicU64>,
    /// The request's monthly reservation, once admitted.
    admission: Option<Admission>,
    /// Whether the request (possibly) reached the upstream; a reservation
    /// of one that never did is given back.
    reached_upstream: bool,
}

/// The most of a request's path a usage row keeps: the client chooses a
/// path's length (up to `max_header_bytes`), and rows, refused ones
/// included, are kept in memory, in the spool and in the database.
const MAX_STORED_PATH: usize = 1024;
/// Likewise for an extension method's name.
const MAX_STORED_METHOD: usize = 32;

/// `text`, cut to at most `max` bytes at a character boundary.
fn stored(text: &str, max: usize) -> String {
    text[..text.floor_char_boundary(max)].to_owned()
}

impl UsageGuard {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        metering: &Arc<Metering>,
        id: Uuid,
        client_request_id: Option<String>,
        caller: &Authenticated,
        route: &Arc<RouteMetrics>,
        pricing: &Arc<Pricing>,
        method: &http::Method,
        path: &str,
        started: Instant,
        ts: OffsetDateTime,
    ) -> UsageGuard {
        metering.recorder.begin_row();
        UsageGuard {
            event: Some(UsageEvent {
                id,
                client_request_id,
                ts,
                customer_id: caller.customer_id,
                key_id: caller.key_id,
                instance: metering.instance.clone(),
                route: route.name().to_owned(),
                method: stored(method.as_str(), MAX_STORED_METHOD),
                path: stored(path, MAX_STORED_PATH),
                status: 0,
                outcome: Outcome::ClientClosed,
                latency_us: 0,
                upstream_latency_us: 0,
                request_bytes: 0,
                response_bytes: 0,
                model: None,
                input_tokens: 0,
                output_tokens: 0,
                cache_read_tokens: 0,
                cache_write_tokens: 0,
                cost_nanos: 0,
                cost_source: CostSource::None,
            }),
            metering: metering.clone(),
            route_metrics: route.clone(),
            pricing: pricing.clone(),
            started,
            request_bytes: Arc::new(AtomicU64::new(0)),
            admission: None,
            reached_upstream: false,
        }
    }

    /// The request was admitted by the limits: settle or release
    /// `admission` when the event is finished.
    pub(crate) fn admitted(&mut self, admission: Admission) {
        self.admission = Some(admission);
    }

    /// The request was handed to the upstream (it may have been received
    /// even if no response came back).
    pub(crate) fn reached_upstream(&mut self) {
        self.reached_upstream = true;
    }

    /// The counter the request body adds to as it streams upstream.
    pub(crate) fn request_bytes(&self) -> Arc<AtomicU64> {
        self.request_bytes.clone()
    }

    pub(crate) fn set_status(&mut self, status: u16) {
        if let Some(event) = &mut self.event {
            event.status = status;
        }
    }

    pub(crate) fn set_upstream_latency(&mut self, since_start: std::time::Duration) {
        if let Some(event) = &mut self.event {
            event.upstream_latency_us = micros(since_start);
        }
    }

    /// Ends the request without a row: it turned out to be malformed once
    /// its body was read, before anything was forwarded. Its reservation
    /// is given back.
    pub(crate) fn withdraw(mut self) {
        if self.event.take().is_some() {
            self.metering.recorder.end_row();
        }
        if let Some(admission) = self.admission.take() {
            self.metering.limiter.release(&admission);
        }
    }

    /// Records the event with `outcome` (and `status`, when the gateway
    /// answered itself).
    pub(crate) fn finish(mut self, outcome: Outcome, status: Option<u16>) {
        self.record(outcome, status);
    }

    fn record(&mut self, outcome: Outcome, status: Option<u16>) {
        let Some(mut event) = self.event.take() else {
            return;
        };
        event.outcome = outcome;
        if let Some(status) = status {
            event.status = status;
        }
        let latency = self.started.elapsed();
        event.latency_us = micros(latency);
        event.request_bytes = self.request_bytes.load(Ordering::Relaxed);
        if let Some(admission) = self.admission.take() {
            let limiter = &self.metering.limiter;
            if self.reached_upstream && !outcome.is_rejected() {
                limiter.settle(&admission, event_tokens(&event), event.cost_nanos);
            } else {
                limiter.release(&admission);
            }
        }
        self.route_metrics.usage(&event, &self.pricing);
        let usage_id;
        let access = if self.metering.access_log {
            let request_id = match event.client_request_id.as_deref() {
                Some(id) => id,
                None => {
                    usage_id = event.id.to_string();
                    &usage_id
                }
            };
            Some(AccessFields {
                request_id,
                method: &event.method,
                upstream_latency_us: event.upstream_latency_us,
            })
        } else {
            None
        };
        emit(RequestCompleted {
            route: &self.route_metrics,
            status: event.status,
            outcome: RequestOutcome::Usage(outcome),
            took: latency,
            access,
        });
        let recorder = &self.metering.recorder;
        recorder.record(event);
        recorder.end_row();
    }
}

impl Drop for UsageGuard {
    fn drop(&mut self) {
        // Not finished by the pipeline or the body: the client went away.
        self.record(Outcome::ClientClosed, None);
    }
}

fn micros(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// Reads the route's usage headers from a response and starts its usage.
pub(crate) fn response_usage(
    headers: &HeaderMap,
    usage: &RouteUsage,
    format: UsageFormat,
    body: ResponseBody,
) -> ResponseUsage {
    // A header that is not visible ASCII reads as garbage, not as absent:
    // it was sent, so it is judged (and counted) as invalid.
    let text = |name: &Option<HeaderName>| {
        let value = name.as_ref().and_then(|name| headers.get(name))?;
        Some(value.to_str().map(str::trim).unwrap_or("\u{FFFD}"))
    };
    let headers = UsageHeaders {
        cost: text(&usage.cost_header),
        input_tokens: text(&usage.input_tokens_header),
        output_tokens: text(&usage.output_tokens_header),
    };
    ResponseUsage::new(format, body, headers)
}

/// The upstream's response body on its way to the client: counted, scanned
/// for usage, optionally filtered (the hidden usage chunk), and the usage
/// event finished when it ends, fails or is dropped.
pub(crate) struct MeteredBody {
    inner: UpstreamBody,
    tally: Box<ResponseTally>,
    /// The event is recorded and nothing is left to send.
    done: bool,
}

impl std::fmt::Debug for MeteredBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredBody")
            .field("response_bytes", &self.tally.response_bytes)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// What has passed of a response body so far (bytes, and the usage the
/// scanner found in them), and the request's usage event it is finished
/// into.
struct ResponseTally {
    guard: UsageGuard,
    usage: ResponseUsage,
    response_bytes: u64,
}

impl MeteredBody {
    /// Wraps the upstream's body. A body that is already complete (HEAD,
    /// 204, 304, an empty 200) is recorded at once: the server never polls
    /// such a body, so waiting for its end would wait forever.
    pub(crate) fn new(inner: UpstreamBody, guard: UsageGuard, usage: ResponseUsage) -> MeteredBody {
        let mut body = MeteredBody {
            inner,
            tally: Box::new(ResponseTally {
                guard,
                usage,
                response_bytes: 0,
            }),
            done: false,
        };
        if body.inner.is_end_stream() {
            body.tally.finish(Outcome::Ok);
            body.done = true;
        }
        body
    }
}

impl ResponseTally {
    /// Fills tokens, model and cost into the usage event (from what was
    /// seen so far), believing only valid values: the ones ignored are counted and
    /// logged here, once per request.
    fn fill_event(&mut self) {
        let response_bytes = self.response_bytes;
        let Some(event) = self.guard.event.as_mut() else {
            return;
        };
        event.response_bytes = response_bytes;
        let invalid = self.usage.fill(event, &self.guard.pricing);
        emit(InvalidUsageIgnored {
            route: &self.guard.route_metrics,
            usage_id: event.id,
            invalid: &invalid,
        });
    }

    fn finish(&mut self, outcome: Outcome) {
        self.fill_event();
        self.guard.record(outcome, None);
    }

    /// Scans, filters and counts one chunk on its way to the client.
    fn pass_chunk(&mut self, data: Bytes) -> Bytes {
        let data = self.usage.pass(data);
        self.response_bytes += data.len() as u64;
        data
    }

    /// What the filter still holds at the end of the body.
    fn take_held_back(&mut self) -> Bytes {
        let rest = self.usage.held_back();
        self.response_bytes += rest.len() as u64;
        rest
    }
}

impl Drop for ResponseTally {
    fn drop(&mut self) {
        // Dropped before the end: the client went away mid-body. Fill in
        // what passed, then the guard records client_closed.
        if self.guard.event.is_some() {
            self.fill_event();
        }
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    let rest = this.tally.take_held_back();
                    this.tally.finish(Outcome::Ok);
                    this.done = true;
                    return Poll::Ready((!rest.is_empty()).then(|| Ok(Frame::data(rest))));
                }
                Poll::Ready(Some(Err(error))) => {
                    emit(UpstreamFailed {
                        route: &this.tally.guard.route_metrics,
                        kind: UpstreamErrorKind::Reset,
                    });
                    this.tally.finish(Outcome::UpstreamError);
                    this.done = true;
                    return Poll::Ready(Some(Err(error)));
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                // Trailers pass as they are.
                Err(frame) => return Poll::Ready(Some(Ok(frame))),
            };
            let mut data = this.tally.pass_chunk(data);
            // The server stops polling once the body says it has ended, so
            // the last chunk is also where the event is finished.
            if this.inner.is_end_stream() {
                let rest = this.tally.take_held_back();
                if !rest.is_empty() {
                    let mut joined = Vec::with_capacity(data.len() + rest.len());
                    joined.extend_from_slice(&data);
                    joined.extend_from_slice(&rest);
                    data = Bytes::from(joined);
                }
                this.tally.finish(Outcome::Ok);
                this.done = true;
                if data.is_empty() {
                    return Poll::Ready(None);
                }
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if data.is_empty() {
                // The filter held everything back (an incomplete event, or
                // the hidden usage chunk): nothing to send yet.
                continue;
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        if self.done {
            SizeHint::with_exact(0)
        } else if self.tally.usage.edits_body() {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}
