//! The admin listener: health endpoints now; the admin API, `/metrics` and
//! reload hang off the same router as they arrive.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::ProxyBody;
use crate::error::error_response;

/// Shared state the admin endpoints read.
#[derive(Clone, Debug, Default)]
pub struct AdminState {
    ready: Arc<AtomicBool>,
}

impl AdminState {
    /// Marks the gateway ready (keys and counters loaded, listeners open).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Answers one admin request.
    pub async fn handle(
        self,
        request: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let response = match (request.method(), request.uri().path()) {
            (&Method::GET | &Method::HEAD, "/healthz") => {
                json(StatusCode::OK, r#"{"status":"ok"}"#)
            }
            (&Method::GET | &Method::HEAD, "/readyz") => {
                if self.is_ready() {
                    json(StatusCode::OK, r#"{"status":"ready"}"#)
                } else {
                    json(StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"starting"}"#)
                }
            }
            _ => error_response(
                StatusCode::NOT_FOUND,
                "not_found",
                "No admin endpoint at this path.",
            ),
        };
        Ok(response)
    }
}

fn json(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
