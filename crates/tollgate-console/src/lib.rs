//! Tollgate's operator console, on the admin listener at `/console/`.
//!
//! Server-rendered HTML (askama templates compiled into the binary), charts
//! drawn as SVG on the server, one stylesheet and a few lines of script, all
//! part of the binary: nothing is fetched at run time and nothing needs a
//! Node toolchain. Every page is read from the same [`Accounts`] and
//! [`Reports`] the admin API answers from, so the numbers agree with it by
//! construction.
//!
//! Operators sign in with an admin token (`admin.tokens`); the console
//! keeps the session on the server and asks for its CSRF
//! token on every change. Every answer carries
//! `Content-Security-Policy: default-src 'self'`, `X-Frame-Options: DENY`
//! and `Referrer-Policy: no-referrer`.

#![warn(unreachable_pub)]

mod charts;
mod pages;
mod session;
mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, COOKIE, LOCATION, REFERRER_POLICY,
    SET_COOKIE, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use tollgate_accounts::{Accounts, Deliveries, Reports, Scope};
use tollgate_metering::limits::Policies;

use crate::session::{same_secret, session_cookie, Session, Sessions, COOKIE as SESSION_COOKIE};

/// How the gateway is doing, for the overview page.
#[derive(Clone, Debug, Default)]
pub struct GatewayStatus {
    pub database_up: bool,
    /// Usage rows recorded but not yet in the database.
    pub pending_rows: u64,
    /// Bytes in the spool not yet written to the database.
    pub spool_bytes: u64,
    pub keys_cached: usize,
    pub instance: String,
    pub version: &'static str,
}

/// What the console reads and acts through.
pub struct ConsoleParts {
    pub accounts: Arc<Accounts>,
    pub reports: Arc<Reports>,
    pub policies: Arc<Policies>,
    /// The admin tokens (`admin.tokens`); only their digests are kept.
    pub tokens: Vec<String>,
    /// `admin.session_ttl`.
    pub session_ttl: Duration,
    /// The admin listener is HTTPS: the session cookie is `Secure`.
    pub secure: bool,
    pub status: Arc<dyn Fn() -> GatewayStatus + Send + Sync>,
    /// Webhook deliveries, listed and retried.
    pub deliveries: Arc<dyn Deliveries>,
}

/// What the console answers: a page, or the usage export of a range, which
/// the admin listener streams as it streams `GET /v1/usage/export`.
pub enum Answer {
    Page(Response<Bytes>),
    Export(Scope),
}

/// The console of one gateway instance (its sessions are this instance's).
pub struct Console {
    parts: ConsoleParts,
    /// BLAKE3 digests of the admin tokens: comparing digests is
    /// constant-time and says nothing about a token.
    tokens: Vec<blake3::Hash>,
    sessions: Sessions,
}

impl Console {
    /// The webhook deliveries the console shows (the admin API lists and
    /// retries them through the same).
    pub fn deliveries(&self) -> &Arc<dyn Deliveries> {
        &self.parts.deliveries
    }

    pub fn new(mut parts: ConsoleParts) -> Console {
        let tokens = std::mem::take(&mut parts.tokens)
            .iter()
            .map(|token| blake3::hash(token.as_bytes()))
            .collect();
        Console {
            parts,
            tokens,
            sessions: Sessions::default(),
        }
    }

    /// Answers a request under `/console`; the body is already read (the
    /// admin listener caps it). Every page carries the security headers;
    /// the caller adds them to an export with [`Console::secure`].
    pub async fn handle(&self, request: Request<Bytes>) -> Answer {
        let path = request.uri().path().trim_end_matches('/').to_owned();
        let page = path.strip_prefix("/console").unwrap_or("/console");
        // HEAD is answered as GET (hyper leaves the body out).
        let method = match request.method() {
            &Method::HEAD => Method::GET,
            method => method.clone(),
        };
        let response = match (method.clone(), page) {
            (Method::GET, "/assets/console.css") => asset("text/css", pages::CSS),
            (Method::GET, "/assets/console.js") => asset("text/javascript", pages::JS),
            (Method::GET, "/login") => pages::login(None),
            (Method::POST, "/login") => self.sign_in(request.body()),
            _ => match self.session(&request) {
                None if method == Method::GET => redirect("/console/login"),
                None => pages::forbidden("Sign in again: the session has ended."),
                Some((id, session)) => {
                    match self.signed_in(&method, page, &request, &id, &session).await {
                        Answer::Page(response) => response,
                        export => return export,
                    }
                }
            },
        };
        let mut response = response;
        Console::secure(&mut response);
        Answer::Page(response)
    }

    /// The headers on every console answer: no framing, no referrer, no
    /// script or style from anywhere but the gateway itself.
    pub fn secure<B>(response: &mut Response<B>) {
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'self'"),
        );
        headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
        headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        headers
            .entry(CACHE_CONTROL)
            .or_insert(HeaderValue::from_static("no-store"));
    }

    async fn signed_in(
        &self,
        method: &Method,
        page: &str,
        request: &Request<Bytes>,
        id: &str,
        session: &Session,
    ) -> Answer {
        let parts = &self.parts;
        let query = request.uri().query().unwrap_or("");
        let segments: Vec<&str> = page.split('/').skip(1).collect();
        if *method == Method::POST {
            let form: Vec<(String, String)> =
                serde_urlencoded::from_bytes(request.body()).unwrap_or_default();
            let csrf = field(&form, "csrf").unwrap_or_default();
            if !same_secret(csrf, &session.csrf) {
                return Answer::Page(pages::forbidden(
                    "The form has expired; reload the page and try again.",
                ));
            }
            return Answer::Page(match segments.as_slice() {
                ["logout"] => {
                    self.sessions.end(id);
                    let mut response = redirect("/console/login");
                    response
                        .headers_mut()
                        .insert(SET_COOKIE, self.cookie("", Duration::ZERO));
                    response
                }
                ["customers"] => pages::create_customer(parts, session, &form).await,
                ["customers", customer] => {
                    pages::update_customer(parts, session, customer, &form).await
                }
                ["keys"] => pages::create_key(parts, session, &form).await,
                ["keys", key, "limits"] => pages::key_limits(parts, session, key, &form).await,
                ["keys", key, action] => pages::key_action(parts, session, key, action).await,
                ["billing", "close"] => pages::close_period(parts, session, &form).await,
                ["webhooks", "deliveries", delivery, "retry"] => {
                    webhooks::retry(parts, session, delivery, &form).await
                }
                _ => pages::not_found(session),
            });
        }
        if *method != Method::GET && *method != Method::HEAD {
            return Answer::Page(pages::not_found(session));
        }
        Answer::Page(match segments.as_slice() {
            [] => pages::overview(parts, session, query).await,
            ["customers"] => pages::customers(parts, session, query).await,
            ["customers", customer] => pages::customer(parts, session, customer, None, None).await,
            ["keys"] => pages::keys(parts, session, query, None, None, None).await,
            ["billing"] => pages::billing(parts, session, query, None, None).await,
            ["billing", "export"] => match parts.reports.scope(&pages::export_range(query)).await {
                Ok(scope) => return Answer::Export(scope),
                Err(error) => {
                    pages::billing(parts, session, "", None, Some(error.to_string())).await
                }
            },
            ["webhooks"] => webhooks::webhooks(parts, session, query, None, None).await,
            _ => pages::not_found(session),
        })
    }

    fn sign_in(&self, body: &[u8]) -> Response<Bytes> {
        let form: Vec<(String, String)> = serde_urlencoded::from_bytes(body).unwrap_or_default();
        let token = field(&form, "token").unwrap_or_default().trim();
        let presented = blake3::hash(token.as_bytes());
        // Every configured token is compared, so timing says nothing.
        let matched = self
            .tokens
            .iter()
            .fold(false, |found, known| found | (*known == presented));
        if token.is_empty() || !matched {
            return pages::login(Some("That is not one of this gateway's admin tokens."));
        }
        let Some((id, _csrf)) = self.sessions.start(self.parts.session_ttl) else {
            return pages::login(Some("The gateway could not start a session; try again."));
        };
        let mut response = redirect("/console/");
        response
            .headers_mut()
            .insert(SET_COOKIE, self.cookie(&id, self.parts.session_ttl));
        response
    }

    fn session(&self, request: &Request<Bytes>) -> Option<(String, Session)> {
        let cookies = request.headers().get_all(COOKIE);
        let id = cookies
            .iter()
            .filter_map(|value| value.to_str().ok())
            .find_map(session_cookie)?;
        let session = self.sessions.get(id)?;
        Some((id.to_owned(), session))
    }

    /// The session cookie: `HttpOnly`, `SameSite=Strict`, `Path=/`, and
    /// `Secure` under admin TLS; an empty value and no lifetime ends it.
    fn cookie(&self, id: &str, ttl: Duration) -> HeaderValue {
        let secure = if self.parts.secure { "; Secure" } else { "" };
        let value = format!(
            "{SESSION_COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
            ttl.as_secs()
        );
        HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// The first value of `name` in a form.
fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

fn asset(content_type: &'static str, body: &'static str) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from_static(body.as_bytes()));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("max-age=3600"));
    response
}

pub(crate) fn redirect(to: &'static str) -> Response<Bytes> {
    let mut response = Response::new(Bytes::new());
    *response.status_mut() = StatusCode::SEE_OTHER;
    response
        .headers_mut()
        .insert(LOCATION, HeaderValue::from_static(to));
    response
}
