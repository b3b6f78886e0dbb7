//! Prometheus metrics (docs/METRICS.md), served on the admin listener's `/metrics`.
//!
//! Each gateway owns its registry (no process-global recorder, so several
//! gateways in one process, as in the tests, never mix their numbers), and
//! the request path holds ready handles: counting is an atomic add, never a
//! lookup by name. Per-route handles live on the compiled route; the
//! (status class × outcome) and per-model ones are registered the first
//! time they are used, so the exposition lists only series that happened.
//!
//! Every label comes from a bounded set: route names and pricing model
//! names from the config, and fixed vocabularies here. No key, customer or
//! raw path ever becomes a label.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use tollgate_metering::keys::KeyCache;
use tollgate_metering::limits::{Budget, Rejection};
use tollgate_metering::usage::recorder::{FlushMetrics, RecorderStats};
use tollgate_metering::usage::Pricing;
use tollgate_metering::usage::{InvalidValues, UsageField};
use tollgate_metering::usage::{Outcome, UsageEvent};
use tollgate_metering::webhooks::EventType;

const REQUESTS: &str = "tollgate_requests_total";
const REQUEST_DURATION: &str = "tollgate_request_duration_seconds";
const UPSTREAM_DURATION: &str = "tollgate_upstream_duration_seconds";
const AUTH_FAILURES: &str = "tollgate_auth_failures_total";
const LIMIT_REJECTIONS: &str = "tollgate_limit_rejections_total";
const USAGE_ROWS: &str = "tollgate_usage_rows_total";
const FLUSH_DURATION: &str = "tollgate_usage_flush_duration_seconds";
const BATCH_ROWS: &str = "tollgate_usage_batch_rows";
const PENDING_ROWS: &str = "tollgate_usage_pending_rows";
const SPOOL_BYTES: &str = "tollgate_usage_spool_bytes";
const COST: &str = "tollgate_cost_nanos_total";
const TOKENS: &str = "tollgate_tokens_total";
const DATABASE_UP: &str = "tollgate_database_up";
const METERING_UNAVAILABLE: &str = "tollgate_metering_unavailable_total";
const KEYS_CACHED: &str = "tollgate_keys_cached";
const UPSTREAM_ERRORS: &str = "tollgate_upstream_errors_total";
const INVALID_USAGE_VALUES: &str = "tollgate_usage_invalid_values_total";
const OPEN_CONNECTIONS: &str = "tollgate_open_connections";
const WEBHOOK_DELIVERIES: &str = "tollgate_webhook_deliveries_total";
const WEBHOOK_PENDING: &str = "tollgate_webhook_pending";

/// Every metric with its help text, in exposition order.
const DESCRIPTIONS: [(&str, &str); 20] = [
    (
        WEBHOOK_DELIVERIES,
        "Webhook delivery attempts, by event and result (delivered: 2xx; failed: anything else).",
    ),
    (
        WEBHOOK_PENDING,
        "Webhook deliveries in the database neither delivered nor given up.",
    ),
    (
        REQUESTS,
        "Data-plane requests, by route, status class and outcome.",
    ),
    (
        REQUEST_DURATION,
        "Time from request to the last byte of the response, in seconds.",
    ),
    (
        UPSTREAM_DURATION,
        "Time from request to the upstream's response headers, in seconds.",
    ),
    (
        AUTH_FAILURES,
        "Requests refused for a missing or invalid API key, by reason.",
    ),
    (
        LIMIT_REJECTIONS,
        "Requests refused by a limit (429), by limit.",
    ),
    (
        USAGE_ROWS,
        "Usage rows spooled, written to the database, replayed at start, or in failed writes.",
    ),
    (
        FLUSH_DURATION,
        "Duration of usage writes to the database, failed ones included, in seconds.",
    ),
    (BATCH_ROWS, "Rows per usage write to the database."),
    (
        PENDING_ROWS,
        "Usage rows recorded but not yet in the spool.",
    ),
    (
        SPOOL_BYTES,
        "Bytes in the usage spool not yet confirmed written to the database.",
    ),
    (COST, "Metered cost in nano-USD, by route and priced model."),
    (
        TOKENS,
        "Metered tokens, by route, priced model and direction.",
    ),
    (
        DATABASE_UP,
        "1 when the last usage write to the database succeeded, else 0.",
    ),
    (
        METERING_UNAVAILABLE,
        "Requests refused with 503 metering_unavailable.",
    ),
    (KEYS_CACHED, "API keys in the in-memory cache."),
    (
        UPSTREAM_ERRORS,
        "Upstream failures, by route and kind (connect, timeout, reset).",
    ),
    (
        INVALID_USAGE_VALUES,
        "Usage values from upstreams ignored as invalid (unreadable or beyond the per-request bounds), by route and field.",
    ),
    (
        OPEN_CONNECTIONS,
        "Open client connections, by listener (data, admin).",
    ),
];

/// Seconds, from tens of microseconds (the gateway's own overhead) to the
/// longest streamed responses.
pub(crate) const DURATION_BUCKETS: [f64; 22] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Rows per database write: one row at idle up to sixteen merged batches
/// of the default size.
pub(crate) const BATCH_ROW_BUCKETS: [f64; 11] = [
    1.0, 10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 20000.0, 40000.0, 80000.0,
];

/// How often histogram samples are folded in, between scrapes.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// `status_class` values; `none` for a request that ended (the client went
/// away) before any status was known.
const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// `outcome` of `tollgate_requests_total`: a usage row's outcome, or why a
/// request has no row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestOutcome {
    Usage(Outcome),
    AuthFailed,
    NoRoute,
    InvalidRequest,
    MeteringUnavailable,
}

const OUTCOME_LABELS: usize = Outcome::ALL.len() + 4;

impl RequestOutcome {
    fn index(self) -> usize {
        match self {
            RequestOutcome::Usage(outcome) => match outcome {
                Outcome::Ok => 0,
                Outcome::UpstreamError => 1,
                Outcome::UpstreamTimeout => 2,
                Outcome::ClientClosed => 3,
                Outcome::RateLimited => 4,
                Outcome::QuotaExceeded => 5,
                Outcome::BudgetExceeded => 6,
                Outcome::RouteForbidden => 7,
                Outcome::PayloadTooLarge => 8,
                Outcome::ClientTimeout => 9,
            },
            RequestOutcome::AuthFailed => Outcome::ALL.len(),
            RequestOutcome::NoRoute => Outcome::ALL.len() + 1,
            RequestOutcome::InvalidRequest => Outcome::ALL.len() + 2,
            RequestOutcome::MeteringUnavailable => Outcome::ALL.len() + 3,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RequestOutcome::Usage(outcome) => outcome.as_str(),
            RequestOutcome::AuthFailed => "auth_failed",
            RequestOutcome::NoRoute => "no_route",
            RequestOutcome::InvalidRequest => "invalid_request",
            RequestOutcome::MeteringUnavailable => "metering_unavailable",
        }
    }
}

/// `reason` of `tollgate_auth_failures_total`: why a request's key was not
/// accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AuthFailure {
    /// No configured header carried a key.
    Missing,
    /// Not a key of this gateway's format.
    Malformed,
    Unknown,
    Revoked,
    Expired,
}

impl AuthFailure {
    const ALL: [AuthFailure; 5] = [
        AuthFailure::Missing,
        AuthFailure::Malformed,
        AuthFailure::Unknown,
        AuthFailure::Revoked,
        AuthFailure::Expired,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Malformed => "malformed",
            AuthFailure::Unknown => "unknown",
            AuthFailure::Revoked => "revoked",
            AuthFailure::Expired => "expired",
        }
    }
}

/// `kind` of `tollgate_upstream_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UpstreamErrorKind {
    /// No connection could be made.
    Connect,
    /// No response headers within the route's timeout.
    Timeout,
    /// The exchange failed after the connection was made: reset, closed
    /// early, or not HTTP.
    Reset,
}

/// The gateway's registry and the handles that do not depend on a route.
pub struct Metrics {
    registry: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    auth_failures: [Counter; 5],
    /// rate, monthly_requests, monthly_tokens, monthly_cost.
    limit_rejections: [Counter; 4],
    metering_unavailable: Counter,
    /// written, spooled, replayed, failed.
    usage_rows: [Counter; 4],
    pending_rows: Gauge,
    spool_bytes: Gauge,
    database_up: Gauge,
    keys_cached: Gauge,
    flush: FlushMetrics,
    webhooks: WebhookMetrics,
    unrouted: Arc<RouteMetrics>,
    sources: OnceLock<Sources>,
}

/// The webhook sender's handles.
#[derive(Clone)]
pub(crate) struct WebhookMetrics {
    /// Per event type ([`EventType::ALL`] order): delivered, failed.
    deliveries: Arc<[[Counter; 2]; 4]>,
    pending: Gauge,
}

impl WebhookMetrics {
    /// One delivery attempt.
    pub(crate) fn attempted(&self, event: EventType, delivered: bool) {
        let index = EventType::ALL.iter().position(|&e| e == event).unwrap_or(0);
        self.deliveries[index][usize::from(!delivered)].increment(1);
    }

    pub(crate) fn set_pending(&self, pending: u64) {
        self.pending.set(pending as f64);
    }
}

/// Where the gauges and the usage-row counters are read at each scrape.
struct Sources {
    recorder: Arc<RecorderStats>,
    keys: Arc<KeyCache>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with every metric described (docs/METRICS.md) and the histogram
    /// buckets set.
    pub fn new() -> Metrics {
        let builder = [REQUEST_DURATION, UPSTREAM_DURATION, FLUSH_DURATION]
            .into_iter()
            .try_fold(PrometheusBuilder::new(), |builder, name| {
                builder.set_buckets_for_metric(Matcher::Full(name.to_owned()), &DURATION_BUCKETS)
            })
            .and_then(|builder| {
                builder.set_buckets_for_metric(
                    Matcher::Full(BATCH_ROWS.to_owned()),
                    &BATCH_ROW_BUCKETS,
                )
            });
        // Only an empty bucket list is refused, and these are constants.
        let registry = Arc::new(
            builder
                .unwrap_or_else(|_| PrometheusBuilder::new())
                .build_recorder(),
        );
        for (name, help) in DESCRIPTIONS {
            let name = KeyName::from_const_str(name);
            match name.as_str() {
                REQUEST_DURATION | UPSTREAM_DURATION | FLUSH_DURATION | BATCH_ROWS => {
                    registry.describe_histogram(name, None, help.into())
                }
                PENDING_ROWS | SPOOL_BYTES | DATABASE_UP | KEYS_CACHED | OPEN_CONNECTIONS
                | WEBHOOK_PENDING => registry.describe_gauge(name, None, help.into()),
                _ => registry.describe_counter(name, None, help.into()),
            }
        }
        let counter = |name: &'static str, label: &'static str, value: &'static str| {
            counter(
                &registry,
                name,
                vec![Label::from_static_parts(label, value)],
            )
        };
        Metrics {
            handle: registry.handle(),
            auth_failures: AuthFailure::ALL
                .map(|reason| counter(AUTH_FAILURES, "reason", reason.as_str())),
            limit_rejections: ["rate", "monthly_requests", "monthly_tokens", "monthly_cost"]
                .map(|limit| counter(LIMIT_REJECTIONS, "limit", limit)),
            metering_unavailable: registry
                .register_counter(&Key::from_static_name(METERING_UNAVAILABLE), &METADATA),
            usage_rows: ["written", "spooled", "replayed", "failed"]
                .map(|result| counter(USAGE_ROWS, "result", result)),
            pending_rows: registry.register_gauge(&Key::from_static_name(PENDING_ROWS), &METADATA),
            spool_bytes: registry.register_gauge(&Key::from_static_name(SPOOL_BYTES), &METADATA),
            database_up: registry.register_gauge(&Key::from_static_name(DATABASE_UP), &METADATA),
            keys_cached: registry.register_gauge(&Key::from_static_name(KEYS_CACHED), &METADATA),
            flush: FlushMetrics {
                duration: registry
                    .register_histogram(&Key::from_static_name(FLUSH_DURATION), &METADATA),
                rows: registry.register_histogram(&Key::from_static_name(BATCH_ROWS), &METADATA),
            },
            webhooks: WebhookMetrics {
                deliveries: Arc::new(EventType::ALL.map(|event| {
                    ["delivered", "failed"].map(|result| {
                        crate::metrics::counter(
                            &registry,
                            WEBHOOK_DELIVERIES,
                            vec![
                                Label::from_static_parts("event", event.as_str()),
                                Label::from_static_parts("result", result),
                            ],
                        )
                    })
                })),
                pending: registry
                    .register_gauge(&Key::from_static_name(WEBHOOK_PENDING), &METADATA),
            },
            unrouted: Arc::new(RouteMetrics::build(&registry, "", &[])),
            registry,
            sources: OnceLock::new(),
        }
    }

    /// The webhook sender's counters and gauge.
    pub(crate) fn webhook_metrics(&self) -> WebhookMetrics {
        self.webhooks.clone()
    }

    /// The histograms the usage recorder reports its writes to.
    pub fn flush_metrics(&self) -> FlushMetrics {
        self.flush.clone()
    }

    /// Reads the recorder's counters and the key cache's size at each
    /// scrape. Set once, when both exist.
    pub fn watch(&self, recorder: Arc<RecorderStats>, keys: Arc<KeyCache>) {
        let _ = self.sources.set(Sources { recorder, keys });
    }

    /// The handles of one route, whose usage is priced by `pricing`.
    /// Registering an existing route again (after a reload) continues its
    /// series.
    pub fn route(&self, name: &str, pricing: &Pricing) -> Arc<RouteMetrics> {
        let models: Vec<&str> = pricing.models().collect();
        Arc::new(RouteMetrics::build(&self.registry, name, &models))
    }

    /// `tollgate_open_connections{listener}`: `"data"` or `"admin"`.
    pub fn open_connections(&self, listener: &'static str) -> Gauge {
        self.registry.register_gauge(
            &Key::from_parts(
                OPEN_CONNECTIONS,
                vec![Label::from_static_parts("listener", listener)],
            ),
            &METADATA,
        )
    }

    /// Requests no route matched, or that failed before routing.
    pub(crate) fn unrouted(&self) -> &Arc<RouteMetrics> {
        &self.unrouted
    }

    /// A missing (`reason` = `missing`) or refused key.
    pub(crate) fn auth_failed(&self, reason: AuthFailure) {
        // `ALL` is in declaration order.
        self.auth_failures[reason as usize].increment(1);
    }

    pub(crate) fn limit_rejected(&self, rejection: &Rejection) {
        let index = match rejection {
            Rejection::RateLimited { .. } => 0,
            Rejection::QuotaExceeded { .. } => 1,
            Rejection::BudgetExceeded { which, .. } | Rejection::BudgetHeld { which, .. } => {
                match which {
                    Budget::Tokens => 2,
                    Budget::Cost => 3,
                }
            }
        };
        self.limit_rejections[index].increment(1);
    }

    pub(crate) fn metering_unavailable(&self) {
        self.metering_unavailable.increment(1);
    }

    /// Folds recent histogram samples in; run every [`UPKEEP_INTERVAL`] so
    /// that an unscraped gateway's memory stays bounded.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The text exposition, with gauges and usage-row counters read now.
    pub fn render(&self) -> String {
        if let Some(sources) = self.sources.get() {
            use std::sync::atomic::Ordering::Relaxed;
            let stats = &sources.recorder;
            let [written, spooled, replayed, failed] = &self.usage_rows;
            written.absolute(stats.rows_written.load(Relaxed));
            spooled.absolute(stats.rows_spooled.load(Relaxed));
            replayed.absolute(stats.rows_replayed.load(Relaxed));
            failed.absolute(stats.rows_failed.load(Relaxed));
            self.pending_rows.set(stats.pending.load(Relaxed) as f64);
            self.spool_bytes.set(stats.spool_bytes.load(Relaxed) as f64);
            self.database_up.set(if stats.database_up.load(Relaxed) {
                1.0
            } else {
                0.0
            });
            self.keys_cached.set(sources.keys.len() as f64);
        }
        self.handle.render()
    }
}

/// Metadata is unused by the Prometheus registry but required to register.
static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

fn counter(registry: &PrometheusRecorder, name: &'static str, labels: Vec<Label>) -> Counter {
    registry.register_counter(&Key::from_parts(name, labels), &METADATA)
}

/// One route's handles.
pub struct RouteMetrics {
    name: Arc<str>,
    registry: Arc<PrometheusRecorder>,
    /// `tollgate_requests_total`, by status class × outcome, registered on
    /// first use.
    requests: Box<[OnceLock<Counter>]>,
    duration: Histogram,
    upstream_duration: Histogram,
    /// connect, timeout, reset.
    upstream_errors: [OnceLock<Counter>; 3],
    /// By [`UsageField`], registered on first use.
    invalid_values: [OnceLock<Counter>; UsageField::ALL.len()],
    /// Per priced model (a fast hash: the names are the operator's), and
    /// `other` for everything else.
    models: HashMap<Box<str>, OnceLock<ModelCounters>, foldhash::fast::RandomState>,
    other: OnceLock<ModelCounters>,
}

/// Cost and the four token directions of one route × model.
struct ModelCounters {
    cost: Counter,
    /// input, output, cache_read, cache_write.
    tokens: [Counter; 4],
}

impl RouteMetrics {
    fn build(registry: &Arc<PrometheusRecorder>, name: &str, models: &[&str]) -> RouteMetrics {
        let route = vec![Label::new("route", name.to_owned())];
        RouteMetrics {
            name: Arc::from(name),
            registry: registry.clone(),
            requests: (0..STATUS_CLASSES.len() * OUTCOME_LABELS)
                .map(|_| OnceLock::new())
                .collect(),
            duration: registry
                .register_histogram(&Key::from_parts(REQUEST_DURATION, route.clone()), &METADATA),
            upstream_duration: registry
                .register_histogram(&Key::from_parts(UPSTREAM_DURATION, route), &METADATA),
            upstream_errors: Default::default(),
            invalid_values: Default::default(),
            models: models
                .iter()
                .map(|&model| (Box::from(model), OnceLock::new()))
                .collect(),
            other: OnceLock::new(),
        }
    }

    /// The route's name (`""` for unrouted requests).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    fn labels(&self, more: &[(&'static str, &str)]) -> Vec<Label> {
        let mut labels = vec![Label::new("route", self.name.to_string())];
        labels.extend(
            more.iter()
                .map(|&(key, value)| Label::new(key, value.to_owned())),
        );
        labels
    }

    /// One finished request: counted by status and outcome, and timed.
    pub fn request(&self, status: u16, outcome: RequestOutcome, took: Duration) {
        let class = match status {
            100..=599 => usize::from(status / 100 - 1),
            _ => STATUS_CLASSES.len() - 1,
        };
        let slot = &self.requests[class * OUTCOME_LABELS + outcome.index()];
        slot.get_or_init(|| {
            let labels = self.labels(&[
                ("status_class", STATUS_CLASSES[class]),
                ("outcome", outcome.as_str()),
            ]);
            self.registry
                .register_counter(&Key::from_parts(REQUESTS, labels), &METADATA)
        })
        .increment(1);
        self.duration.record(took.as_secs_f64());
    }

    /// Time to the upstream's response headers.
    pub fn upstream_answered(&self, took: Duration) {
        self.upstream_duration.record(took.as_secs_f64());
    }

    pub(crate) fn upstream_error(&self, kind: UpstreamErrorKind) {
        let (index, label) = match kind {
            UpstreamErrorKind::Connect => (0, "connect"),
            UpstreamErrorKind::Timeout => (1, "timeout"),
            UpstreamErrorKind::Reset => (2, "reset"),
        };
        self.upstream_errors[index]
            .get_or_init(|| {
                let labels = self.labels(&[("kind", label)]);
                self.registry
                    .register_counter(&Key::from_parts(UPSTREAM_ERRORS, labels), &METADATA)
            })
            .increment(1);
    }

    /// Usage values an upstream reported that were ignored as invalid.
    pub(crate) fn invalid_values(&self, invalid: &InvalidValues) {
        for (field, count) in invalid.iter() {
            self.invalid_values[field as usize]
                .get_or_init(|| {
                    let labels = self.labels(&[("field", field.as_str())]);
                    self.registry
                        .register_counter(&Key::from_parts(INVALID_USAGE_VALUES, labels), &METADATA)
                })
                .increment(count);
        }
    }

    /// A usage row's tokens and cost, under the pricing model that matches
    /// its model (`other` when none does).
    pub fn usage(&self, event: &UsageEvent, pricing: &Pricing) {
        let tokens = [
            event.input_tokens,
            event.output_tokens,
            event.cache_read_tokens,
            event.cache_write_tokens,
        ];
        let cost = u64::try_from(event.cost_nanos).unwrap_or(0);
        if cost == 0 && tokens.iter().all(|&n| n == 0) {
            return;
        }
        let priced = event
            .model
            .as_deref()
            .and_then(|model| pricing.resolve(model))
            .and_then(|(name, _)| self.models.get_key_value(name));
        let (label, slot) = match priced {
            Some((name, slot)) => (&**name, slot),
            None => ("other", &self.other),
        };
        let counters = slot.get_or_init(|| {
            let model = [("model", label)];
            let register = |direction: Option<&'static str>| {
                let mut labels = self.labels(&model);
                let name = match direction {
                    Some(direction) => {
                        labels.push(Label::from_static_parts("direction", direction));
                        TOKENS
                    }
                    None => COST,
                };
                self.registry
                    .register_counter(&Key::from_parts(name, labels), &METADATA)
            };
            ModelCounters {
                cost: register(None),
                tokens: ["input", "output", "cache_read", "cache_write"]
                    .map(|direction| register(Some(direction))),
            }
        });
        counters.cost.increment(cost);
        for (counter, count) in counters.tokens.iter().zip(tokens) {
            counter.increment(count);
        }
    }
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMetrics")
            .field("route", &self.name)
            .finish_non_exhaustive()
    }
}
