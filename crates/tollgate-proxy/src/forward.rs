//! The pooled upstream clients.
//!
//! One default client is shared by every route without TLS settings of its
//! own: HTTP/1.1 and HTTP/2 (by ALPN for https upstreams), rustls with the
//! webpki roots, TCP_NODELAY, idle connections kept for reuse. A route with
//! `ca_file` or `client_cert` gets a client of its own, built the same way
//! from its [`UpstreamTls`] when the routes are compiled, so choosing the
//! client costs a request nothing and a connection made with one route's
//! client certificate is never reused for another route.

use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::{BodyTimedOut, BodyTooLarge, ClientBodyFailed, RequestBody};
use crate::tls::UpstreamTls;

/// How long an idle upstream connection is kept for reuse.
pub(crate) const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long establishing an upstream TCP connection may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A pooled upstream client. Cloning it shares its pool.
#[derive(Clone, Debug)]
pub struct UpstreamClient(Client<HttpsConnector<HttpConnector>, RequestBody>);

impl UpstreamClient {
    /// Sends `request` on a pooled connection.
    pub(crate) fn request(&self, request: Request<RequestBody>) -> ResponseFuture {
        self.0.request(request)
    }
}

/// Builds the default upstream client.
pub fn upstream_client() -> Result<UpstreamClient, rustls::Error> {
    Ok(pooled(default_connector()?))
}

/// http or https (webpki roots), HTTP/1.1 or HTTP/2: the default upstream
/// client's connector, which the webhook sender shares.
pub(crate) fn default_connector() -> Result<HttpsConnector<HttpConnector>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(provider)?
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http_connector()))
}

/// Builds the client of a route with TLS settings of its own. It speaks
/// https only: such a route's upstream is https (config validation and
/// [`crate::route::Route::compile`] both insist), so a plain connection
/// would mean the settings were silently skipped.
pub(crate) fn upstream_client_with(tls: &UpstreamTls) -> UpstreamClient {
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls.client_config())
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http_connector());
    pooled(connector)
}

fn http_connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http
}

fn pooled(connector: HttpsConnector<HttpConnector>) -> UpstreamClient {
    UpstreamClient(
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector),
    )
}

/// Whether an upstream request failed because the client's body went over
/// the size limit (rather than because the upstream failed).
pub(crate) fn is_body_too_large(error: &(dyn std::error::Error + 'static)) -> bool {
    caused_by::<BodyTooLarge>(error)
}

/// Whether an upstream request failed because the client's own body
/// failed mid-upload.
pub(crate) fn is_client_body_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    caused_by::<ClientBodyFailed>(error)
}

/// Whether an upstream request failed because the client stopped sending
/// its body (408).
pub(crate) fn is_body_timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    caused_by::<BodyTimedOut>(error)
}

fn caused_by<T: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if error.is::<T>() {
            return true;
        }
        current = error.source();
    }
    false
}
