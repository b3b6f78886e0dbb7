//! The mock over real sockets, through hyper's own client.

// Helpers outside #[test] functions unwrap too; tests may unwrap (STYLE.md).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tollgate_mock::{prompt_tokens, MockUpstream};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn request(
    mock: &MockUpstream,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("{}{path}", mock.url()));
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Full::new(body.into())).unwrap()
}

async fn send(
    mock: &MockUpstream,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response<Incoming> {
    client()
        .request(request(mock, method, path, headers, body))
        .await
        .unwrap()
}

/// A whole response.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|value| value.to_str().unwrap())
    }
}

async fn call(
    mock: &MockUpstream,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    let (parts, body) = send(mock, method, path, headers, body).await.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

async fn post_json(
    mock: &MockUpstream,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> Answer {
    call(mock, Method::POST, path, headers, body.to_string()).await
}

/// Reads a body until it ends or fails: what arrived, and the error if any.
async fn read_until_error(body: &mut Incoming) -> (Vec<u8>, Option<hyper::Error>) {
    let mut received = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => received.extend_from_slice(&frame.into_data().unwrap()),
            Err(error) => return (received, Some(error)),
        }
    }
    (received, None)
}

/// One server-sent event.
#[derive(Debug)]
struct Event {
    name: Option<String>,
    data: String,
}

impl Event {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap()
    }
}

fn events(body: &[u8]) -> Vec<Event> {
    let text = std::str::from_utf8(body).unwrap();
    assert!(text.ends_with("\n\n"), "events end with a blank line");
    text.split("\n\n")
        .filter(|block| !block.is_empty())
        .map(|block| {
            let mut event = Event {
                name: None,
                data: String::new(),
            };
            for line in block.lines() {
                if let Some(name) = line.strip_prefix("event: ") {
                    event.name = Some(name.to_owned());
                } else if let Some(data) = line.strip_prefix("data: ") {
                    event.data = data.to_owned();
                } else {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            event
        })
        .collect()
}

fn chat_request() -> Value {
    json!({
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Say hello to the mock"}]}
        ]
    })
}

fn with(mut request: Value, extra: Value) -> Value {
    let fields = request.as_object_mut().unwrap();
    for (key, value) in extra.as_object().unwrap() {
        fields.insert(key.clone(), value.clone());
    }
    request
}

#[tokio::test]
async fn chat_json_reports_the_token_rule() {
    let mock = MockUpstream::start().await.unwrap();
    let request = chat_request();
    assert_eq!(prompt_tokens(&request), 7);

    let answer = post_json(
        &mock,
        "/v1/chat/completions",
        &[("x-mock-chunks", "4")],
        &request,
    )
    .await;

    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert!(answer.header("content-length").is_some());
    let body = answer.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "gpt-test");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(body["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(body["choices"][0]["index"], 0);
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "lorem ipsum dolor sit"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        body["usage"],
        json!({
            "prompt_tokens": 7,
            "completion_tokens": 4,
            "total_tokens": 11,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        })
    );
}

#[tokio::test]
async fn chat_defaults_max_tokens_cap_and_cache_read() {
    let mock = MockUpstream::start().await.unwrap();

    let body = post_json(
        &mock,
        "/v1/chat/completions",
        &[],
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .json();
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["usage"]["prompt_tokens"], 1);
    assert_eq!(body["usage"]["completion_tokens"], 3);

    let request = with(chat_request(), json!({"max_tokens": 2}));
    let body = post_json(
        &mock,
        "/v1/chat/completions",
        &[("x-mock-chunks", "9")],
        &request,
    )
    .await
    .json();
    assert_eq!(body["usage"]["completion_tokens"], 2);
    assert_eq!(body["choices"][0]["message"]["content"], "lorem ipsum");

    let body = post_json(
        &mock,
        "/v1/chat/completions",
        &[("x-mock-cache-read", "10")],
        &chat_request(),
    )
    .await
    .json();
    // OpenAI counts cached tokens inside prompt_tokens.
    assert_eq!(body["usage"]["prompt_tokens"], 17);
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 10);
    assert_eq!(body["usage"]["total_tokens"], 20);
}

#[tokio::test]
async fn chat_stream_without_include_usage_has_no_usage() {
    let mock = MockUpstream::start().await.unwrap();
    let request = with(chat_request(), json!({"stream": true}));

    let answer = post_json(
        &mock,
        "/v1/chat/completions",
        &[("x-mock-chunks", "3")],
        &request,
    )
    .await;

    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    assert!(answer.header("content-length").is_none());
    let events = events(&answer.body);
    // 3 content chunks, the finish chunk, [DONE].
    assert_eq!(events.len(), 5);
    assert!(events.iter().all(|event| event.name.is_none()));
    assert_eq!(events[4].data, "[DONE]");
    let chunks: Vec<Value> = events[..4].iter().map(Event::json).collect();
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "gpt-test");
        assert!(chunk.get("usage").is_none(), "no usage key: {chunk}");
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks[1]["choices"][0]["delta"].get("role").is_none());
    let content: String = chunks[..3]
        .iter()
        .map(|chunk| chunk["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(content, "lorem ipsum dolor");
    assert!(chunks[..3]
        .iter()
        .all(|chunk| chunk["choices"][0]["finish_reason"].is_null()));
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[3]["choices"][0]["delta"], json!({}));
}

#[tokio::test]
async fn chat_stream_with_include_usage_ends_with_a_usage_chunk() {
    let mock = MockUpstream::start().await.unwrap();
    let request = with(
        chat_request(),
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );

    let answer = post_json(
        &mock,
        "/v1/chat/completions",
        &[("x-mock-chunks", "5"), ("x-mock-cache-read", "3")],
        &request,
    )
    .await;

    let events = events(&answer.body);
    // 5 content chunks, the finish chunk, the usage chunk, [DONE].
    assert_eq!(events.len(), 8);
    assert_eq!(events[7].data, "[DONE]");
    for event in &events[..6] {
        let chunk = event.json();
        assert!(chunk["usage"].is_null() && chunk.get("usage").is_some());
        assert_eq!(chunk["choices"].as_array().unwrap().len(), 1);
    }
    let usage_chunk = events[6].json();
    assert_eq!(usage_chunk["object"], "chat.completion.chunk");
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], 10);
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 5);
    assert_eq!(usage_chunk["usage"]["total_tokens"], 15);
    assert_eq!(
        usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"],
        3
    );
}

#[tokio::test]
async fn anthropic_json_excludes_cached_tokens_from_input() {
    let mock = MockUpstream::start().await.unwrap();
    let request = json!({
        "model": "claude-test",
        "max_tokens": 1024,
        "system": "You are a mock.",
        "messages": [{"role": "user", "content": "Hello there"}]
    });

    let body = post_json(
        &mock,
        "/v1/messages",
        &[("x-mock-cache-read", "100")],
        &request,
    )
    .await
    .json();

    assert_eq!(body["type"], "message");
    assert_eq!(body["role"], "assistant");
    assert_eq!(body["model"], "claude-test");
    assert_eq!(
        body["content"],
        json!([{"type": "text", "text": "lorem ipsum dolor"}])
    );
    assert_eq!(body["stop_reason"], "end_turn");
    assert!(body["stop_sequence"].is_null());
    assert_eq!(
        body["usage"],
        json!({
            "input_tokens": 6,
            "output_tokens": 3,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 100,
        })
    );
}

#[tokio::test]
async fn anthropic_stream_has_the_real_event_sequence_and_cumulative_output() {
    let mock = MockUpstream::start().await.unwrap();
    let request = json!({
        "model": "claude-test",
        "max_tokens": 1024,
        "stream": true,
        "messages": [{"role": "user", "content": "one two three four"}]
    });

    let answer = post_json(
        &mock,
        "/v1/messages",
        &[("x-mock-chunks", "5"), ("x-mock-cache-read", "7")],
        &request,
    )
    .await;

    assert_eq!(
        answer.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    let events = events(&answer.body);
    let names: Vec<&str> = events
        .iter()
        .map(|event| event.name.as_deref().unwrap())
        .collect();
    let mut expected = vec!["message_start", "content_block_start", "ping"];
    expected.extend(["content_block_delta"; 5]);
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected);
    for event in &events {
        assert_eq!(
            event.json()["type"].as_str(),
            event.name.as_deref(),
            "data type matches the event name"
        );
    }
    assert_eq!(events[2].data, r#"{"type": "ping"}"#);

    let start = events[0].json();
    assert_eq!(start["message"]["model"], "claude-test");
    assert_eq!(start["message"]["usage"]["input_tokens"], 4);
    assert_eq!(start["message"]["usage"]["output_tokens"], 1);
    assert_eq!(start["message"]["usage"]["cache_read_input_tokens"], 7);
    let text: String = events[3..8]
        .iter()
        .map(|event| event.json()["delta"]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(text, "lorem ipsum dolor sit amet");
    let delta = events[9].json();
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["usage"], json!({"output_tokens": 5}));
}

#[tokio::test]
async fn responses_json_counts_cached_tokens_in_input() {
    let mock = MockUpstream::start().await.unwrap();
    let request = json!({
        "model": "gpt-test",
        "instructions": "be nice",
        "input": "write a haiku",
    });

    let body = post_json(
        &mock,
        "/v1/responses",
        &[("x-mock-chunks", "2"), ("x-mock-cache-read", "4")],
        &request,
    )
    .await
    .json();

    assert_eq!(body["object"], "response");
    assert_eq!(body["status"], "completed");
    assert_eq!(body["model"], "gpt-test");
    assert!(body["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(body["output"][0]["type"], "message");
    assert_eq!(body["output"][0]["role"], "assistant");
    assert_eq!(body["output"][0]["status"], "completed");
    assert_eq!(
        body["output"][0]["content"],
        json!([{"type": "output_text", "text": "lorem ipsum", "annotations": []}])
    );
    assert_eq!(
        body["usage"],
        json!({
            "input_tokens": 9,
            "input_tokens_details": {"cached_tokens": 4},
            "output_tokens": 2,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 11,
        })
    );
}

#[tokio::test]
async fn responses_stream_ends_with_completed_carrying_usage() {
    let mock = MockUpstream::start().await.unwrap();
    let request = json!({
        "stream": true,
        "max_output_tokens": 4,
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "a b c"}]}],
    });

    let answer = post_json(&mock, "/v1/responses", &[("x-mock-chunks", "6")], &request).await;

    let events = events(&answer.body);
    let names: Vec<&str> = events
        .iter()
        .map(|event| event.name.as_deref().unwrap())
        .collect();
    let mut expected = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    expected.extend(["response.output_text.delta"; 4]);
    expected.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(names, expected);
    for (sequence, event) in events.iter().enumerate() {
        let data = event.json();
        assert_eq!(data["type"].as_str(), event.name.as_deref());
        assert_eq!(data["sequence_number"], sequence);
    }
    assert_eq!(events[0].json()["response"]["status"], "in_progress");
    let text: String = events[4..8]
        .iter()
        .map(|event| event.json()["delta"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(text, "lorem ipsum dolor sit");
    let completed = &events[11].json()["response"];
    assert_eq!(completed["status"], "completed");
    assert_eq!(completed["output"][0]["content"][0]["text"], text);
    assert_eq!(completed["usage"]["input_tokens"], 3);
    assert_eq!(completed["usage"]["output_tokens"], 4);
    assert_eq!(completed["usage"]["total_tokens"], 7);
}

#[tokio::test]
async fn embeddings_one_vector_per_input() {
    let mock = MockUpstream::start().await.unwrap();

    let body = post_json(
        &mock,
        "/v1/embeddings",
        &[],
        &json!({"model": "embed-test", "input": ["the same text", "other words", "the same text"]}),
    )
    .await
    .json();

    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "embed-test");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 8, "total_tokens": 8})
    );
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (index, item) in data.iter().enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], index);
        let vector = item["embedding"].as_array().unwrap();
        assert_eq!(vector.len(), 8);
        assert!(vector
            .iter()
            .all(|x| (-1.0..=1.0).contains(&x.as_f64().unwrap())));
    }
    assert_eq!(data[0]["embedding"], data[2]["embedding"]);
    assert_ne!(data[0]["embedding"], data[1]["embedding"]);

    let body = post_json(&mock, "/v1/embeddings", &[], &json!({"input": "solo"}))
        .await
        .json();
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    assert_eq!(body["model"], "text-embedding-3-small");
}

#[tokio::test]
async fn echo_reports_method_path_query_headers_and_body_bytes() {
    let mock = MockUpstream::start().await.unwrap();

    let answer = call(
        &mock,
        Method::PUT,
        "/some/where?a=1&b=two",
        &[("x-test", "one"), ("x-test", "two")],
        vec![b'x'; 1000],
    )
    .await;

    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let body = answer.json();
    assert_eq!(body["method"], "PUT");
    assert_eq!(body["path"], "/some/where");
    assert_eq!(body["query"], "a=1&b=two");
    assert_eq!(body["headers"]["x-test"], json!(["one", "two"]));
    assert_eq!(body["headers"]["content-length"], json!(["1000"]));
    assert_eq!(body["body_bytes"], 1000);

    // GET on an API path is echoed too.
    let body = call(&mock, Method::GET, "/v1/chat/completions", &[], "")
        .await
        .json();
    assert_eq!(body["path"], "/v1/chat/completions");
    assert!(body["query"].is_null());
    assert_eq!(body["body_bytes"], 0);
}

#[tokio::test]
async fn header_controls_apply_to_every_endpoint() {
    let mock = MockUpstream::start().await.unwrap();
    let controls = [
        ("x-mock-cost-usd", "0.0123"),
        ("x-mock-token-headers", "1"),
        ("x-mock-header", "connection: x-foo"),
        ("x-mock-header", "x-foo: 1"),
        ("x-mock-header", "keep-alive: timeout=5"),
        ("x-mock-chunks", "4"),
    ];

    let answer = post_json(&mock, "/v1/chat/completions", &controls, &chat_request()).await;
    assert_eq!(answer.header("x-cost-usd"), Some("0.0123"));
    assert_eq!(answer.header("x-tokens-input"), Some("7"));
    assert_eq!(answer.header("x-tokens-output"), Some("4"));
    assert_eq!(answer.header("connection"), Some("x-foo"));
    assert_eq!(answer.header("x-foo"), Some("1"));
    assert_eq!(answer.header("keep-alive"), Some("timeout=5"));

    let answer = call(&mock, Method::POST, "/echo", &controls, "not json").await;
    assert_eq!(answer.header("x-cost-usd"), Some("0.0123"));
    assert_eq!(answer.header("x-tokens-input"), Some("1"));
    assert_eq!(answer.header("x-tokens-output"), Some("0"));
    assert_eq!(answer.header("x-foo"), Some("1"));

    // Garbage is copied verbatim; the first x-mock-header of a name replaces
    // the mock's own header, later ones append.
    let answer = call(
        &mock,
        Method::GET,
        "/bytes/10",
        &[
            ("x-mock-cost-usd", "a lot"),
            ("x-mock-header", "content-type: text/plain"),
            ("x-mock-header", "x-multi: 1"),
            ("x-mock-header", "x-multi: 2"),
        ],
        "",
    )
    .await;
    assert_eq!(answer.header("x-cost-usd"), Some("a lot"));
    assert_eq!(answer.header("content-type"), Some("text/plain"));
    let multi: Vec<_> = answer.headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["1", "2"]);
}

#[tokio::test]
async fn bytes_streams_exactly_n_pattern_bytes() {
    let mock = MockUpstream::start().await.unwrap();

    let answer = call(&mock, Method::GET, "/bytes/200000", &[], "").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.header("content-type"),
        Some("application/octet-stream")
    );
    assert!(answer.header("content-length").is_none());
    assert_eq!(answer.header("transfer-encoding"), Some("chunked"));
    assert_eq!(answer.body.len(), 200_000);
    for (i, byte) in answer.body.iter().enumerate() {
        assert_eq!(*byte, (i % 251) as u8, "byte {i}");
    }

    let answer = call(
        &mock,
        Method::GET,
        "/bytes/70000",
        &[("x-mock-content-length", "1")],
        "",
    )
    .await;
    assert_eq!(answer.header("content-length"), Some("70000"));
    assert_eq!(answer.body.len(), 70_000);

    let answer = call(&mock, Method::GET, "/bytes/0", &[], "").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.body.is_empty());

    let answer = call(&mock, Method::GET, "/bytes/lots", &[], "").await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.json()["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn sink_counts_the_body_and_requests_records_a_prefix() {
    let mock = MockUpstream::start().await.unwrap();
    let upload: Vec<u8> = (0..1_048_576u32).map(|i| (i % 7) as u8).collect();

    let answer = call(
        &mock,
        Method::POST,
        "/sink",
        &[("x-upload", "big")],
        upload.clone(),
    )
    .await;
    assert_eq!(answer.json(), json!({"bytes": 1_048_576}));
    let answer = call(&mock, Method::PUT, "/sink?second", &[], "tiny").await;
    assert_eq!(answer.json(), json!({"bytes": 4}));

    let requests = mock.requests();
    assert_eq!(requests.len(), 2);
    let first = &requests[0];
    assert_eq!(first.method, Method::POST);
    assert_eq!(first.uri.path(), "/sink");
    assert_eq!(first.version, Version::HTTP_11);
    assert_eq!(first.headers["x-upload"], "big");
    assert_eq!(first.body_len, 1_048_576);
    assert_eq!(first.body.len(), tollgate_mock::RECORDED_BODY_PREFIX);
    assert_eq!(
        first.body[..],
        upload[..tollgate_mock::RECORDED_BODY_PREFIX]
    );
    let second = &requests[1];
    assert_eq!(second.method, Method::PUT);
    assert_eq!(second.uri.query(), Some("second"));
    assert_eq!(second.body, "tiny");
    assert_eq!(second.body_len, 4);
}

#[tokio::test]
async fn requests_records_api_calls_before_the_response() {
    let mock = MockUpstream::start().await.unwrap();
    let request = chat_request();
    let answer = post_json(
        &mock,
        "/v1/chat/completions?x=1",
        &[("authorization", "Bearer sk-upstream")],
        &request,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);

    let requests = mock.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].method, Method::POST);
    assert_eq!(requests[0].uri.path(), "/v1/chat/completions");
    assert_eq!(requests[0].uri.query(), Some("x=1"));
    assert_eq!(requests[0].headers["authorization"], "Bearer sk-upstream");
    assert_eq!(requests[0].body, request.to_string());
    assert_eq!(requests[0].body_len, request.to_string().len() as u64);
}

#[tokio::test]
async fn status_control_answers_an_openai_error() {
    let mock = MockUpstream::start().await.unwrap();

    let answer = post_json(
        &mock,
        "/v1/chat/completions",
        &[("x-mock-status", "503"), ("x-mock-cost-usd", "0.5")],
        &chat_request(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_eq!(answer.header("x-cost-usd"), Some("0.5"));
    assert_eq!(
        answer.json(),
        json!({"error": {"type": "server_error", "message": "mock failure"}})
    );

    let answer = call(
        &mock,
        Method::GET,
        "/anything",
        &[("x-mock-status", "429")],
        "",
    )
    .await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn bad_controls_and_bodies_get_a_400_that_says_why() {
    let mock = MockUpstream::start().await.unwrap();

    let answer = post_json(
        &mock,
        "/v1/chat/completions",
        &[("x-mock-chunks", "many")],
        &chat_request(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        answer.json(),
        json!({"error": {
            "type": "invalid_request_error",
            "message": "x-mock-chunks: expected a whole number, got \"many\"",
        }})
    );

    let answer = call(&mock, Method::POST, "/v1/messages", &[], "{not json").await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        answer.json()["error"]["message"],
        "the request body is not a JSON object"
    );
}

#[tokio::test]
async fn reset_after_breaks_an_sse_body() {
    let mock = MockUpstream::start().await.unwrap();
    let request = with(chat_request(), json!({"stream": true}));
    let mut response = send(
        &mock,
        Method::POST,
        "/v1/chat/completions",
        &[("x-mock-chunks", "5"), ("x-mock-reset-after", "2")],
        request.to_string(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);

    let (received, error) = read_until_error(response.body_mut()).await;

    assert!(error.is_some(), "the body must break, not end cleanly");
    let events = events(&received);
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].json()["choices"][0]["delta"]["content"], " ipsum");
}

#[tokio::test]
async fn reset_after_beyond_the_last_frame_still_breaks_the_body() {
    let mock = MockUpstream::start().await.unwrap();
    let request = with(
        chat_request(),
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let mut response = send(
        &mock,
        Method::POST,
        "/v1/chat/completions",
        &[("x-mock-reset-after", "100")],
        request.to_string(),
    )
    .await;

    let (received, error) = read_until_error(response.body_mut()).await;

    assert!(error.is_some());
    assert_eq!(events(&received).last().unwrap().data, "[DONE]");
}

#[tokio::test]
async fn reset_after_breaks_bytes_chunked_and_sized() {
    let mock = MockUpstream::start().await.unwrap();
    for sized in ["0", "1"] {
        let mut response = send(
            &mock,
            Method::GET,
            "/bytes/1000000",
            &[
                ("x-mock-reset-after", "2"),
                ("x-mock-content-length", sized),
            ],
            "",
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);

        let (received, error) = read_until_error(response.body_mut()).await;

        assert!(
            error.is_some(),
            "content-length {sized}: the body must break"
        );
        assert_eq!(received.len(), 2 * 64 * 1024, "content-length {sized}");
    }
}

#[tokio::test]
async fn reset_after_zero_breaks_a_json_body() {
    let mock = MockUpstream::start().await.unwrap();
    let mut response = send(
        &mock,
        Method::POST,
        "/v1/chat/completions",
        &[("x-mock-reset-after", "0")],
        chat_request().to_string(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get("content-length").is_none());

    let (received, error) = read_until_error(response.body_mut()).await;

    assert!(error.is_some());
    assert!(received.is_empty());
}

#[tokio::test]
async fn hang_headers_never_answers_until_shutdown() {
    let mock = MockUpstream::start().await.unwrap();
    let pending = client().request(request(
        &mock,
        Method::POST,
        "/v1/chat/completions",
        &[("x-mock-hang", "headers")],
        chat_request().to_string(),
    ));
    let pending = tokio::spawn(pending);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pending.is_finished(), "no response head within 200 ms");
    // The request arrived; it is only the answer that hangs.
    assert_eq!(mock.requests().len(), 1);

    drop(mock);
    let result = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("shutdown ends the hang")
        .unwrap();
    assert!(result.is_err(), "the client sees a failure, not a response");
}

#[tokio::test]
async fn hang_body_sends_the_first_frame_then_stalls() {
    let mock = MockUpstream::start().await.unwrap();
    let request = with(chat_request(), json!({"stream": true}));
    let mut response = send(
        &mock,
        Method::POST,
        "/v1/chat/completions",
        &[("x-mock-hang", "body")],
        request.to_string(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);

    let first = response.body_mut().frame().await.unwrap().unwrap();
    let first = events(first.data_ref().unwrap());
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].json()["choices"][0]["delta"]["content"], "lorem");
    let next = tokio::time::timeout(Duration::from_millis(200), response.body_mut().frame()).await;
    assert!(next.is_err(), "nothing after the first frame");

    drop(mock);
    let (_, error) = tokio::time::timeout(
        Duration::from_secs(5),
        read_until_error(response.body_mut()),
    )
    .await
    .expect("shutdown ends the hang");
    assert!(error.is_some(), "the body breaks at shutdown");
}

#[tokio::test]
async fn streams_send_each_chunk_when_it_is_produced() {
    let mock = MockUpstream::start().await.unwrap();
    let request = with(chat_request(), json!({"stream": true}));
    let mut response = send(
        &mock,
        Method::POST,
        "/v1/chat/completions",
        &[("x-mock-chunks", "4"), ("x-mock-chunk-delay-ms", "150")],
        request.to_string(),
    )
    .await;

    let first = response.body_mut().frame().await.unwrap().unwrap();
    let first_at = Instant::now();
    assert!(std::str::from_utf8(first.data_ref().unwrap())
        .unwrap()
        .contains("lorem"));
    let (rest, error) = read_until_error(response.body_mut()).await;
    let waited = first_at.elapsed();

    assert!(error.is_none());
    assert!(String::from_utf8(rest)
        .unwrap()
        .ends_with("data: [DONE]\n\n"));
    // Three delays of 150 ms come after the first chunk, not before it.
    assert!(waited >= Duration::from_millis(400), "waited {waited:?}");
}

#[tokio::test]
async fn serves_h2c_with_prior_knowledge() {
    let mock = MockUpstream::start().await.unwrap();
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();

    let response = client
        .request(request(
            &mock,
            Method::POST,
            "/v1/chat/completions",
            &[],
            chat_request().to_string(),
        ))
        .await
        .unwrap();

    assert_eq!(response.version(), Version::HTTP_2);
    let body: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["usage"]["total_tokens"], 10);
    assert_eq!(mock.requests()[0].version, Version::HTTP_2);
}

#[tokio::test]
async fn serve_stops_when_its_shutdown_future_resolves() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tollgate_mock::serve(listener, async move {
        let _ = stopped.await;
    }));

    let response = client()
        .request(
            Request::get(format!("http://{addr}/bytes/5"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        Bytes::from_static(&[0, 1, 2, 3, 4])
    );

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returns after shutdown")
        .unwrap()
        .unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
