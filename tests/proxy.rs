//! The data plane over real sockets: forwarding, streaming, header rewriting,
//! the gateway's own errors, timeouts and framing.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn forwards_get_and_post_with_bodies_and_query() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = TestGateway::start(route_config(&mock.url(), "")).await;

    let reply = gw.get("/v1/things?limit=5&x=%20y").await;
    assert_eq!(reply.status, StatusCode::OK);
    let echo = reply.json();
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/v1/things");
    assert_eq!(echo["query"], "limit=5&x=%20y");
    assert_eq!(echo["body_bytes"], 0);

    let body = Bytes::from(vec![b'z'; 200_000]);
    let reply = send(
        &client(),
        gw.request(Method::POST, "/v1/upload")
            .header("content-type", "application/octet-stream")
            .body(Full::new(body.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["body_bytes"], 200_000);

    let recorded = mock.requests();
    let post = recorded.iter().find(|r| r.method == Method::POST).unwrap();
    assert_eq!(post.body_len, 200_000);
    assert_eq!(&post.body[..], &body[..post.body.len()]);
    // set_headers applied, Host rewritten to the upstream's authority.
    assert_eq!(post.headers["authorization"], "Bearer sk-test");
    assert_eq!(post.headers["host"], mock.addr().to_string().as_str());
    gw.stop().await;
}

#[tokio::test]
async fn strip_prefix_reroots_the_path() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = TestGateway::start(route_config(&mock.url(), "")).await;
    let reply = gw.get("/strip/v1/messages?beta=1").await;
    assert_eq!(reply.json()["path"], "/v1/messages");
    assert_eq!(reply.json()["query"], "beta=1");
    gw.stop().await;
}

#[tokio::test]
async fn sse_events_arrive_one_by_one() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = TestGateway::start(route_config(&mock.url(), "")).await;
    let delay = Duration::from_millis(300);
    let request = gw.request(Method::POST, "/v1/chat/completions")
        .header("content-type", "application/json")
        .header("x-mock-chunks", "4")
        .header("x-mock-chunk-delay-ms", delay.as_millis().to_string())
        .body(Full::new(Bytes::from_static(
            br#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi there"}]}"#,
        )))
        .unwrap();
    let started = Instant::now();
    let response = client().request(request).await.unwrap();
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut body = response.into_body();
    let first = loop {
        let frame = body.frame().await.unwrap().unwrap();
        if let Ok(data) = frame.into_data() {
            break data;
        }
    };
    let first_at = started.elapsed();
    assert!(
        first.starts_with(b"data: "),
        "first frame is an SSE event: {first:?}"
    );
    // The mock sends the last of its 4+ events at least 3 delays after the
    // first; the first must not wait for them.
    assert!(
        first_at < delay * 2,
        "first event took {first_at:?}, the stream was buffered"
    );
    let rest = body.collect().await.unwrap().to_bytes();
    let total = started.elapsed();
    assert!(total >= delay * 3, "stream ended after {total:?}");
    let all = [first, rest].concat();
    let text = String::from_utf8(all).unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    gw.stop().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = TestGateway::start(route_config(&mock.url(), "")).await;
    let request = gw
        .request(Method::GET, "/v1/echo")
        .header("connection", "keep-alive, x-hop-named")
        .header("x-hop-named", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers")
        .header("trailer", "x-checksum")
        .header("x-end-to-end", "kept")
        // Response side: the mock sends these back.
        .header("x-mock-header", "connection: x-resp-hop")
        .header("x-mock-header", "x-resp-hop: 1")
        .header("x-mock-header", "keep-alive: timeout=9")
        .header("x-mock-header", "x-resp-kept: 2")
        .header("x-mock-header", "x-cost-usd: 0.5")
        .body(Full::default())
        .unwrap();
    let reply = send(&client(), request).await;
    assert_eq!(reply.status, StatusCode::OK);

    let upstream = &mock.requests()[0].headers;
    for name in [
        "x-hop-named",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        assert!(!upstream.contains_key(name), "{name} reached the upstream");
    }
    assert_eq!(upstream["x-end-to-end"], "kept");
    // hyper's client adds its own `connection` only when closing; the
    // client's value naming x-hop-named must not be forwarded.
    if let Some(connection) = upstream.get("connection") {
        assert!(!connection.to_str().unwrap().contains("x-hop-named"));
    }

    assert!(!reply.headers.contains_key("x-resp-hop"));
    assert!(!reply.headers.contains_key("keep-alive"));
    assert!(
        !reply.headers.contains_key("x-cost-usd"),
        "strip_response_headers applies"
    );
    assert_eq!(reply.headers["x-resp-kept"], "2");
    gw.stop().await;
}

#[tokio::test]
async fn forwarded_headers_and_request_ids() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = TestGateway::start(route_config(&mock.url(), "")).await;

    let reply = send(
        &client(),
        gw.request(Method::GET, "/v1/a")
            .header("x-forwarded-for", "203.0.113.9")
            .header("x-request-id", "client-id-42")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.headers["x-request-id"], "client-id-42");
    let reply2 = gw.get("/v1/b").await;
    let generated = reply2.headers["x-request-id"].to_str().unwrap().to_owned();
    let uuid = uuid_fields(&generated);
    assert_eq!(uuid.0, 7, "generated ids are UUID v7: {generated}");
    let insane = send(
        &client(),
        gw.request(Method::GET, "/v1/c")
            .header("x-request-id", "has spaces in it")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    let replaced = insane.headers["x-request-id"].to_str().unwrap();
    assert_ne!(replaced, "has spaces in it");
    assert_eq!(uuid_fields(replaced).0, 7);

    let seen = mock.requests();
    assert_eq!(seen[0].headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen[0].headers["x-forwarded-proto"], "http");
    assert_eq!(
        seen[0].headers["x-forwarded-host"],
        gw.addr.to_string().as_str()
    );
    assert_eq!(seen[0].headers["x-request-id"], "client-id-42");
    assert_eq!(seen[1].headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen[1].headers["x-request-id"], generated.as_str());
    assert_eq!(seen[2].headers["x-request-id"], replaced);
    gw.stop().await;
}

/// (version, variant bits) of a hyphenated UUID.
fn uuid_fields(text: &str) -> (u32, u32) {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    assert_eq!(hex.len(), 32, "{text} is a hyphenated UUID");
    assert_eq!(text.len(), 36);
    let version = u32::from_str_radix(&hex[12..13], 16).unwrap();
    let variant = u32::from_str_radix(&hex[16..17], 16).unwrap() >> 2;
    assert_eq!(variant, 0b10, "RFC 4122 variant");
    (version, variant)
}

#[tokio::test]
async fn no_route_is_404_json() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = TestGateway::start(config(&format!(
        "[[routes]]\nname = \"m\"\nprefix = \"/v1/\"\nupstream = \"{}\"\n",
        mock.url()
    )))
    .await;
    let reply = gw.get("/v2/nothing").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.error_type(), "no_route");
    assert!(reply.headers.contains_key("x-request-id"));
    assert!(mock.requests().is_empty());

    // The built-in defaults have no routes at all.
    let defaults = TestGateway::start(config("")).await;
    let reply = defaults.get("/v1/chat/completions").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.error_type(), "no_route");
    defaults.stop().await;
    gw.stop().await;
}

#[tokio::test]
async fn oversized_bodies_are_413_declared_or_streamed() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = TestGateway::start(route_config(&mock.url(), "")).await;
    let limit = 1024 * 1024;

    let declared = send(
        &client(),
        gw.request(Method::POST, "/sink")
            .body(Full::new(Bytes::from(vec![0u8; limit + 1])))
            .unwrap(),
    )
    .await;
    assert_eq!(declared.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(declared.error_type(), "payload_too_large");
    assert!(
        mock.requests().is_empty(),
        "a declared oversize body is refused before forwarding"
    );

    // A chunked body declares nothing; it is cut off as it passes the limit.
    let (mut sender, body) = http_body_util::channel::Channel::<Bytes>::new(4);
    let feeder = tokio::spawn(async move {
        for _ in 0..40 {
            if sender
                .send_data(Bytes::from(vec![1u8; 64 * 1024]))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let chunked: hyper_util::client::legacy::Client<_, _> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let response = chunked
        .request(gw.request(Method::POST, "/sink").body(body).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let json: serde_json::Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(json["error"]["type"], "payload_too_large");
    feeder.abort();

    // Exactly at the limit is fine.
    let at_limit = send(
        &client(),
        gw.request(Method::POST, "/sink")
            .body(Full::new(Bytes::from(vec![0u8; limit])))
            .unwrap(),
    )
    .await;
    assert_eq!(at_limit.status, StatusCode::OK);
    assert_eq!(at_limit.json()["bytes"], limit);
    gw.stop().await;
}

#[tokio::test]
async fn refused_upstream_is_502() {
    // Bind then drop: nothing listens on this port any more.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let gw = TestGateway::start(route_config(&format!("http://127.0.0.1:{port}"), "")).await;
    let reply = gw.get("/v1/chat/completions").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.error_type(), "upstream_unavailable");
    gw.stop().await;
}

#[tokio::test]
async fn upstream_that_resets_before_answering_is_502() {
    // An upstream that accepts, reads the request, and closes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = socket.read(&mut buf).await;
            drop(socket);
        }
    });
    let gw = TestGateway::start(route_config(&format!("http://{addr}"), "")).await;
    let reply = gw.get("/v1/x").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.error_type(), "upstream_unavailable");
    gw.stop().await;
}

#[tokio::test]
async fn upstream_reset_mid_stream_breaks_the_client_body() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = TestGateway::start(route_config(&mock.url(), "")).await;
    let response = client()
        .request(
            gw.request(Method::POST, "/v1/chat/completions")
                .header("x-mock-chunks", "10")
                .header("x-mock-reset-after", "2")
                .body(Full::new(Bytes::from_static(
                    br#"{"stream":true,"messages":[{"role":"user","content":"a b"}]}"#,
                )))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let collected = response.into_body().collect().await;
    assert!(
        collected.is_err(),
        "the client must see a broken stream, not a clean end"
    );
    gw.stop().await;
}

#[tokio::test]
async fn hanging_upstream_is_504_after_the_route_timeout() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = TestGateway::start(route_config(&mock.url(), "")).await;
    let started = Instant::now();
    let reply = send(
        &client(),
        gw.request(Method::GET, "/strip/slow")
            .header("x-mock-hang", "headers")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.error_type(), "upstream_timeout");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(2),
        "the 500ms route timeout fired after {took:?}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn slow_client_is_cut_off_by_the_header_timeout() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = TestGateway::start(route_config(&mock.url(), "")).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"GET /v1/x HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    let took = started.elapsed();
    assert!(read.is_ok(), "the connection was still open after 5s");
    assert!(
        took >= Duration::from_millis(900),
        "closed after {took:?}, before the 1s timeout"
    );
    assert!(mock.requests().is_empty());

    // A prompt client on the same gateway is unaffected.
    assert_eq!(gw.get("/v1/ok").await.status, StatusCode::OK);
    gw.stop().await;
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = TestGateway::start(route_config(&mock.url(), "")).await;
    for head in [
        "POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST /v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
    ] {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(b"5\r\nhello\r\n0\r\n\r\n").await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw))
            .await
            .expect("the gateway closes the connection")
            .unwrap();
        let text = String::from_utf8_lossy(&raw);
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
        assert!(text.contains("\"invalid_request\""), "{text}");
        assert!(
            text.to_ascii_lowercase().contains("connection: close"),
            "{text}"
        );
    }
    assert!(mock.requests().is_empty(), "nothing was forwarded");

    // Transfer-Encoding alone is fine.
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let request = format!(
        "POST /v1/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        gw.key.as_deref().unwrap()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"body_bytes\":5"), "{text}");
    gw.stop().await;
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = TestGateway::start(route_config(&mock.url(), "")).await;
    let reply = send(
        &h2c_client(),
        gw.request(Method::POST, "/v1/echo?h2=1")
            .body(Full::new(Bytes::from_static(b"hello h2")))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.version, http::Version::HTTP_2);
    assert_eq!(reply.status, StatusCode::OK);
    let echo = reply.json();
    assert_eq!(echo["body_bytes"], 8);
    assert_eq!(echo["query"], "h2=1");
    // The h2 :authority became x-forwarded-host.
    assert_eq!(
        mock.requests()[0].headers["x-forwarded-host"],
        gw.addr.to_string().as_str()
    );
    gw.stop().await;
}
