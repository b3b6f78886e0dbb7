//! The request path: read and record the body, parse the controls, route,
//! then dress the endpoint's reply with the control headers.
//!
//! `handle` is the only place that turns a failure into a response or a
//! broken connection; the endpoints just build [`Reply`]s.

use std::io;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{json, Value};
use tracing::debug;

use crate::body::{BodyControls, MockBody, Plan};
use crate::controls::{ControlError, Controls, Hang};
use crate::record::{RecordedRequest, RECORDED_BODY_PREFIX};
use crate::server::State;
use crate::tokens::{completion_tokens, prompt_tokens, request_cap};
use crate::{anthropic, openai, raw};

/// Largest JSON request body the LLM endpoints read; bigger ones get a 413.
pub(crate) const MAX_JSON_BODY: usize = 16 * 1024 * 1024;

const TEXT_EVENT_STREAM: &str = "text/event-stream; charset=utf-8";
const X_COST_USD: &str = "x-cost-usd";
const X_TOKENS_INPUT: &str = "x-tokens-input";
const X_TOKENS_OUTPUT: &str = "x-tokens-output";

/// Which endpoint a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Chat,
    Responses,
    Messages,
    Embeddings,
    /// `GET /bytes/{n}`; `None` when `n` is not a number.
    Bytes(Option<u64>),
    Sink,
    Echo,
}

impl Route {
    fn of(method: &Method, path: &str) -> Self {
        match (method, path) {
            (&Method::POST, "/v1/chat/completions") => Self::Chat,
            (&Method::POST, "/v1/responses") => Self::Responses,
            (&Method::POST, "/v1/messages") => Self::Messages,
            (&Method::POST, "/v1/embeddings") => Self::Embeddings,
            (&Method::POST | &Method::PUT, "/sink") => Self::Sink,
            (&Method::GET | &Method::HEAD, _) if path.starts_with("/bytes/") => {
                Self::Bytes(path["/bytes/".len()..].parse().ok())
            }
            _ => Self::Echo,
        }
    }

    /// The endpoints that need the whole JSON request.
    fn reads_json(self) -> bool {
        matches!(
            self,
            Self::Chat | Self::Responses | Self::Messages | Self::Embeddings
        )
    }
}

/// What an endpoint answers, before the control headers are added.
pub(crate) struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    plan: Plan,
    /// Completion tokens generated, for `x-tokens-output`.
    output_tokens: u64,
}

impl Reply {
    pub(crate) fn json(value: &Value) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Self {
            status: StatusCode::OK,
            headers,
            plan: Plan::Full(Bytes::from(value.to_string())),
            output_tokens: 0,
        }
    }

    /// A `text/event-stream` response streaming `plan`.
    pub(crate) fn event_stream(plan: Plan) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(TEXT_EVENT_STREAM),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        Self {
            status: StatusCode::OK,
            headers,
            plan,
            output_tokens: 0,
        }
    }

    /// A raw body with the given content type.
    pub(crate) fn raw(content_type: &'static str, plan: Plan) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        Self {
            status: StatusCode::OK,
            headers,
            plan,
            output_tokens: 0,
        }
    }

    /// An OpenAI-shaped error: `{"error": {"type", "message"}}`.
    pub(crate) fn error(status: StatusCode, kind: &str, message: &str) -> Self {
        Self {
            status,
            ..Self::json(&json!({"error": {"type": kind, "message": message}}))
        }
    }

    pub(crate) fn with_output_tokens(mut self, tokens: u64) -> Self {
        self.output_tokens = tokens;
        self
    }

    pub(crate) fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Adds the header controls and builds the body.
    fn into_response(
        self,
        controls: &Controls,
        input_tokens: u64,
        state: &State,
    ) -> Response<MockBody> {
        let Self {
            status,
            mut headers,
            plan,
            output_tokens,
        } = self;
        if let Some(cost) = &controls.cost_usd {
            headers.insert(X_COST_USD, cost.clone());
        }
        if controls.token_headers {
            headers.insert(X_TOKENS_INPUT, HeaderValue::from(input_tokens));
            headers.insert(X_TOKENS_OUTPUT, HeaderValue::from(output_tokens));
        }
        // The first x-mock-header of a name replaces what the mock set (so a
        // test can override content-type or x-cost-usd); later ones append.
        let mut seen: Vec<&HeaderName> = Vec::new();
        for (name, value) in &controls.headers {
            if !seen.contains(&name) {
                seen.push(name);
                headers.insert(name.clone(), value.clone());
            } else {
                headers.append(name.clone(), value.clone());
            }
        }
        let body_controls = BodyControls {
            delay: controls.chunk_delay,
            reset_after: controls.reset_after,
            hang: controls.hang == Some(Hang::Body),
        };
        let mut response =
            Response::new(MockBody::new(plan, body_controls, state.shutdown.clone()));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        response
    }
}

/// What an LLM endpoint needs to build its answer.
pub(crate) struct Ctx<'a> {
    pub request: &'a Value,
    pub controls: &'a Controls,
    /// A number unique on this server, for response ids.
    pub id: u64,
    /// Unix seconds, for `created` / `created_at`.
    pub now: u64,
}

impl Ctx<'_> {
    /// The request's `model`, or `default`.
    pub(crate) fn model(&self, default: &str) -> String {
        self.request
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_owned()
    }

    /// Uncached prompt tokens: [`prompt_tokens`] of the request.
    pub(crate) fn prompt(&self) -> u64 {
        prompt_tokens(self.request)
    }

    /// Completion tokens (content chunks), capped by the first of `cap_fields`
    /// the request carries.
    pub(crate) fn completion(&self, cap_fields: &[&str]) -> u64 {
        completion_tokens(self.controls.chunks, request_cap(self.request, cap_fields))
    }

    /// Whether the request asked for `"stream": true`.
    pub(crate) fn stream(&self) -> bool {
        self.request.get("stream").and_then(Value::as_bool) == Some(true)
    }
}

/// A request body as read: a prefix kept in memory, and the full length.
struct Received {
    kept: Bytes,
    len: u64,
}

impl Received {
    /// Whether `kept` is the whole body.
    fn complete(&self) -> bool {
        u64::try_from(self.kept.len()).is_ok_and(|kept| kept == self.len)
    }

    /// The body as JSON, if it was kept whole and parses.
    fn json(&self) -> Option<Value> {
        if self.complete() {
            serde_json::from_slice(&self.kept).ok()
        } else {
            None
        }
    }
}

/// The service behind every connection.
///
/// Errors close the connection: that happens when the request body breaks
/// off and when an `x-mock-hang: headers` request outlives the server.
pub(crate) async fn handle(
    state: Arc<State>,
    request: Request<Incoming>,
) -> io::Result<Response<MockBody>> {
    let (parts, body) = request.into_parts();
    let route = Route::of(&parts.method, parts.uri.path());
    let keep = if route.reads_json() {
        MAX_JSON_BODY
    } else {
        RECORDED_BODY_PREFIX
    };
    let (received, body_error) = read_body(body, keep).await;
    // Recorded before the response head goes out, so a test that has its
    // response can already see its request in `requests()`.
    if let Some(recorder) = &state.recorder {
        recorder.push(RecordedRequest {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            body: prefix(&received.kept),
            body_len: received.len,
        });
    }
    if let Some(error) = body_error {
        return Err(io::Error::other(error));
    }

    let response = match Controls::parse(&parts.headers) {
        Ok(controls) => respond(&state, &parts, route, &received, &controls).await?,
        Err(error) => invalid_control(&error),
    };
    debug!(
        message = "Mock upstream answered a request.",
        method = %parts.method,
        path = parts.uri.path(),
        status = response.status().as_u16(),
    );
    Ok(response)
}

async fn respond(
    state: &State,
    parts: &Parts,
    route: Route,
    received: &Received,
    controls: &Controls,
) -> io::Result<Response<MockBody>> {
    if controls.hang == Some(Hang::Headers) {
        state.shutdown.clone().wait().await;
        return Err(io::Error::other(
            "x-mock-hang: the mock upstream shut down during the hang",
        ));
    }
    let request = received.json();
    let input_tokens = prompt_tokens(request.as_ref().unwrap_or(&Value::Null));
    let reply = match controls.status {
        Some(status) => Reply::error(status, "server_error", "mock failure"),
        None => route_reply(state, parts, route, received, request.as_ref(), controls),
    };
    Ok(reply.into_response(controls, input_tokens, state))
}

fn route_reply(
    state: &State,
    parts: &Parts,
    route: Route,
    received: &Received,
    request: Option<&Value>,
    controls: &Controls,
) -> Reply {
    let endpoint: fn(&Ctx<'_>) -> Reply = match route {
        Route::Chat => openai::chat,
        Route::Responses => openai::responses,
        Route::Embeddings => openai::embeddings,
        Route::Messages => anthropic::messages,
        Route::Bytes(Some(len)) => return raw::bytes(len, controls.content_length),
        Route::Bytes(None) => {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "GET /bytes/{n}: n must be a whole number of bytes",
            )
        }
        Route::Sink => return raw::sink(received.len),
        Route::Echo => return raw::echo(parts, received.len),
    };
    if !received.complete() {
        return Reply::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            &format!("the mock reads JSON bodies of at most {MAX_JSON_BODY} bytes"),
        );
    }
    let Some(request) = request.filter(|request| request.is_object()) else {
        return Reply::error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "the request body is not a JSON object",
        );
    };
    endpoint(&Ctx {
        request,
        controls,
        id: state.next_id(),
        now: unix_now(),
    })
}

fn invalid_control(error: &ControlError) -> Response<MockBody> {
    let body = json!({"error": {"type": "invalid_request_error", "message": error.to_string()}});
    let mut response = Response::new(MockBody::full(body.to_string()));
    *response.status_mut() = StatusCode::BAD_REQUEST;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Reads the whole body, keeping at most `keep` bytes of it. A body that
/// breaks off comes back with what arrived and the error.
async fn read_body(mut body: Incoming, keep: usize) -> (Received, Option<hyper::Error>) {
    let mut kept = BytesMut::new();
    let mut len: u64 = 0;
    let mut error = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                // Trailers are not data; ignore them.
                if let Ok(data) = frame.into_data() {
                    let room = keep.saturating_sub(kept.len()).min(data.len());
                    kept.extend_from_slice(&data[..room]);
                    len = len.saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
                }
            }
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    let received = Received {
        kept: kept.freeze(),
        len,
    };
    (received, error)
}

/// The recorded prefix of a body, copied out when it is a slice of a larger
/// buffer so that the log does not keep megabytes alive.
fn prefix(kept: &Bytes) -> Bytes {
    if kept.len() <= RECORDED_BODY_PREFIX {
        kept.clone()
    } else {
        Bytes::copy_from_slice(&kept[..RECORDED_BODY_PREFIX])
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let post = Method::POST;
        assert_eq!(Route::of(&post, "/v1/chat/completions"), Route::Chat);
        assert_eq!(Route::of(&post, "/v1/responses"), Route::Responses);
        assert_eq!(Route::of(&post, "/v1/messages"), Route::Messages);
        assert_eq!(Route::of(&post, "/v1/embeddings"), Route::Embeddings);
        assert_eq!(Route::of(&post, "/sink"), Route::Sink);
        assert_eq!(Route::of(&Method::PUT, "/sink"), Route::Sink);
        assert_eq!(Route::of(&Method::GET, "/bytes/10"), Route::Bytes(Some(10)));
        assert_eq!(Route::of(&Method::GET, "/bytes/ten"), Route::Bytes(None));
        // Other methods on the API paths are echoed.
        assert_eq!(Route::of(&Method::GET, "/v1/chat/completions"), Route::Echo);
        assert_eq!(Route::of(&post, "/bytes/10"), Route::Echo);
        assert_eq!(Route::of(&Method::DELETE, "/anything"), Route::Echo);
    }
}
