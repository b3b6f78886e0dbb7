//! Tollgate's HTTP data plane and admin server.
//!
//! Owns everything that speaks HTTP: listeners and TLS, the request pipeline
//! (route, forward, respond), body streaming, header rewriting, the pooled
//! upstream client and the gateway's own error responses. It knows hyper; it
//! must not know SQL or any storage driver.

pub mod admin;
pub mod auth;
pub mod body;
pub mod error;
pub mod forward;
pub mod framing;
pub mod headers;
pub mod meter;
pub mod metrics;
mod panic;
pub mod pipeline;
pub mod progress;
pub mod quota;
pub mod route;
pub mod server;
pub mod tls;
pub mod validate;

pub use admin::Admin;
pub use body::ProxyBody;
pub use error::ProxyError;
pub use pipeline::{ConnInfo, Gateway, GatewaySettings};
pub use route::{RouteSpec, RouteTable};
pub use server::{serve, ServerOptions};
