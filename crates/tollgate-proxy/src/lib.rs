//! Tollgate's HTTP data plane and admin server.
//!
//! Owns everything that speaks HTTP: listeners and TLS, the request pipeline
//! (route, authenticate, admit, forward, respond), body streaming, header
//! rewriting, the pooled upstream clients and the gateway's own error
//! responses. It knows hyper; it must not know SQL or any storage driver.
//!
//! # Where to start
//!
//! - [`serve`] accepts connections and hands each request to a service:
//!   [`Gateway::handle`] on the data plane, [`Admin::handle`] on the admin
//!   listener.
//! - [`Gateway::handle`] runs one request through its phases, top to bottom
//!   (the list is in `src/pipeline.rs`): check, route, authenticate, admit,
//!   body, forward, respond. It is the only place that renders, logs and
//!   counts the gateway's own errors.
//!
//! # Where does a 429 come from?
//!
//! From the *admit* phase of [`Gateway::handle`]: it asks the customer's
//! limits, [`Limiter::admit`], for a reservation; a refusal (a
//! [`Rejection`]: rate, monthly requests, tokens or cost) becomes the
//! gateway's own error `ProxyError::Limited` (`src/error.rs`), rendered as
//! 429 with `Retry-After` and `x-ratelimit-*`. Every status the gateway
//! answers by itself (401, 403, 404, 408, 413, 429, 502, 503, 504, ...) is
//! one `ProxyError` variant, classified in one `match`.
//!
//! # Where is a usage row born?
//!
//! In the *authenticate* phase, as soon as the key is known: the request
//! gets a `UsageGuard` (`src/meter.rs`), which holds the row being filled.
//! It is finished exactly once: by [`Gateway::handle`] when the gateway
//! answers with its own error, by the metered response body when the
//! upstream's body ends or fails, or by its own `Drop` when the client goes
//! away first. Finishing settles or releases the limiter's reservation,
//! counts the request and hands the row to the usage [`Recorder`] held by
//! [`Metering`]; from there it is the metering crate's (spool, then the
//! database).
//!
//! # Telemetry
//!
//! [`Metrics`] is the gateway's own Prometheus registry (docs/METRICS.md).
//! What the proxy logs and counts is a set of named events
//! (`src/events.rs`): each one's `emit` writes its log line and moves its
//! counters in one call.
//!
//! [`Limiter::admit`]: tollgate_metering::limits::Limiter::admit
//! [`Rejection`]: tollgate_metering::limits::Rejection
//! [`Recorder`]: tollgate_metering::usage::recorder::Recorder

mod admin;
mod auth;
mod body;
mod csv;
mod error;
mod events;
mod forward;
mod framing;
mod guesses;
mod headers;
mod meter;
mod metrics;
mod openapi;
mod panic;
mod pipeline;
mod progress;
mod quota;
mod route;
mod server;
mod tls;
mod validate;
mod webhooks;

pub use admin::{Admin, Reload};
pub use auth::Authenticator;
pub use body::ProxyBody;
pub use forward::{upstream_client, UpstreamClient};
pub use meter::{Metering, RouteUsage};
pub use metrics::{Metrics, RequestOutcome, RouteMetrics, UPKEEP_INTERVAL};
pub use pipeline::{ConnInfo, Gateway, GatewaySettings, LiveConfig};
pub use route::{RouteError, RouteSpec, RouteTable};
pub use server::{serve, ServerOptions};
pub use tls::{
    acceptor, read_certificates, read_private_key, ClientIdentity, TlsError, UpstreamTls,
};
pub use tokio_rustls::TlsAcceptor;
pub use webhooks::{Outbox, WebhookEndpoint, Webhooks};
