//! Attacks the gateway must survive, over real sockets. One section per
//! class, so a reader sees at a glance what is covered:
//!
//! 1. HTTP/1 framing and smuggling: conflicting lengths, pipelined on a
//!    connection that started innocently.
//! 2. Paths and hosts: dot segments and encoded separators that would escape
//!    a route and its key restriction; missing, doubled and malformed `Host`.
//! 3. Head sizes: 431 for a head over `max_header_bytes`, 414 for a long
//!    request line, both before anything is forwarded.
//! 4. Slow and silent clients: a connection that sends nothing, a slow
//!    upload (408, never blamed on the upstream), an idle keep-alive, a
//!    response the client never reads.
//! 5. HTTP/2 abuse with the `h2` crate and raw frames: preface only, rapid
//!    reset, CONTINUATION flood, zero window, idle streams.
//! 6. Connection exhaustion under a 256-descriptor limit (the real binary).
//! 7. Request bodies a lenient upstream would read as a stream the gateway
//!    did not see (duplicate keys, other encodings, no JSON content type,
//!    the endpoint's path spelled another way): metered or refused, never
//!    forwarded unmetered. And a client's `Accept-Encoding`, which would
//!    have the upstream compress the usage out of the gateway's sight.
//!
//! The parsers the gateway owns are attacked with arbitrary bytes by the
//! property tests named `arbitrary_input_*` beside them.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A gateway on `mock` with short timeouts, so slow-client tests run fast.
async fn gateway(mock: &MockUpstream) -> TestGateway {
    let mut config = route_config(&mock.url(), "");
    config.server.request_header_timeout = Duration::from_millis(500);
    config.server.idle_timeout = Duration::from_millis(600);
    config.server.request_body_timeout = Duration::from_millis(400);
    config.server.max_header_bytes = 16 * 1024;
    config.admin.tokens = vec!["admin-test-token".to_owned()];
    TestGateway::start(config).await
}

/// Writes `bytes` on a fresh connection and reads until the gateway closes
/// it (at most `within`).
async fn raw(addr: SocketAddr, bytes: &[u8], within: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    read_to_close(&mut stream, within).await
}

async fn read_to_close(stream: &mut TcpStream, within: Duration) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the gateway kept the connection open for {within:?}: {:?}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// The statuses of the responses in an HTTP/1 byte stream, in order.
fn statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(at, _)| text.get(at + 9..at + 12)?.parse().ok())
        .collect()
}

/// Usage rows of a test gateway's SQLite database: (path, outcome, status,
/// request_bytes, response_bytes), waiting until there are `count`.
async fn rows(gw: &TestGateway, count: usize) -> Vec<(String, String, i64, i64, i64)> {
    let path = gw
        .config
        .database
        .url
        .trim_start_matches("sqlite://")
        .to_owned();
    let mut found = Vec::new();
    eventually(Duration::from_secs(10), || {
        let conn = rusqlite::Connection::open(&path).unwrap();
        let mut statement = conn
            .prepare(
                "SELECT path, outcome, status, request_bytes, response_bytes \
                 FROM usage_events ORDER BY id",
            )
            .unwrap();
        found = statement
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        std::future::ready(found.len() >= count)
    })
    .await;
    found
}

fn key_header(gw: &TestGateway) -> String {
    format!("Authorization: Bearer {}\r\n", gw.key.as_deref().unwrap())
}

// ---- 1. HTTP/1 framing and smuggling ---------------------------------------

#[tokio::test]
async fn a_conflicting_request_pipelined_behind_an_innocent_one_is_refused() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = gateway(&mock).await;
    let key = key_header(&gw);
    // Both requests in one write: hyper reads them together, so the framing
    // scanner marks the connection before the first request is handled.
    let batch = format!(
        "GET /v1/first HTTP/1.1\r\nHost: a\r\n{key}\r\n\
         POST /v1/smuggled HTTP/1.1\r\nHost: a\r\n{key}Content-Length: 5\r\n\
         Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v1/hidden HTTP/1.1\r\nHost: a\r\n\r\n"
    );
    let text = raw(gw.addr, batch.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(statuses(&text), [200, 400], "{text}");
    assert!(text.contains("x-tollgate-error: invalid_request"), "{text}");
    let paths: Vec<String> = mock
        .requests()
        .iter()
        .map(|r| r.uri.path().to_owned())
        .collect();
    assert_eq!(
        paths,
        ["/v1/first"],
        "only the innocent request was forwarded"
    );
    gw.stop().await;
}

#[tokio::test]
async fn framing_variants_are_refused_before_anything_is_forwarded() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = gateway(&mock).await;
    let key = key_header(&gw);
    for (name, head) in [
        (
            "TE then CL",
            "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
        ),
        (
            "CL then TE",
            "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
        ),
        ("two lengths", "Content-Length: 3\r\nContent-Length: 4\r\n"),
        ("TE not chunked", "Transfer-Encoding: gzip\r\n"),
        ("bad length", "Content-Length: -1\r\n"),
    ] {
        let request = format!("POST /v1/x HTTP/1.1\r\nHost: a\r\n{key}{head}\r\n0\r\n\r\nabc");
        let text = raw(gw.addr, request.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(statuses(&text).first(), Some(&400), "{name}: {text}");
    }
    assert!(mock.requests().is_empty(), "nothing was forwarded");
    gw.stop().await;
}

// ---- 2. Paths and hosts -----------------------------------------------------

/// The status of a GET of `path` with `key`, once the gateway knows the
/// key (a key made through the admin API reaches its cache within a
/// second; until then it is 401).
async fn status_once_known(gw: &TestGateway, path: &str, key: &str) -> StatusCode {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let request = authorized(Method::GET, gw.url(path), Some(key))
            .body(Full::default())
            .unwrap();
        let status = send(&client(), request).await.status;
        if status != StatusCode::UNAUTHORIZED || Instant::now() > deadline {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn dot_segments_cannot_escape_a_route_or_its_key_restriction() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = gateway(&mock).await;
    let created = admin(
        &gw,
        Method::POST,
        "/v1/keys",
        Some(serde_json::json!({"customer": "test", "routes": ["stripped"]})),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let key = created.json()["key"].as_str().unwrap().to_owned();
    for path in [
        "/strip/../v1/secret",
        "/strip/../../v1/secret",
        "/strip/%2e%2e/v1/secret",
        "/strip/%2E%2e/%2e%2E/v1/secret",
        "/strip/.%2e/v1/secret",
        "/strip/./x",
        "/strip/a%2f..%2f..%2fv1",
        "/strip/a%5c..%5cv1",
        "/strip/..\\v1\\secret",
    ] {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
        );
        let text = raw(gw.addr, request.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(statuses(&text), [400], "{path}: {text}");
        assert!(text.contains("\"invalid_request\""), "{path}: {text}");
    }
    assert!(mock.requests().is_empty(), "nothing was forwarded");
    // The restriction itself still holds (once the new key has reached the
    // gateway's cache, within a second), and the route still works.
    assert_eq!(
        status_once_known(&gw, "/v1/secret", &key).await,
        StatusCode::FORBIDDEN
    );
    let reply = send(
        &client(),
        authorized(Method::GET, gw.url("/strip/v1/ok"), Some(&key))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(mock.requests()[0].uri.path(), "/v1/ok");

    // A key for the catch-all route only: a path the gateway would route
    // there but a server would read as `/v1/...` (decoding, merging
    // slashes, dropping `;` parameters, ignoring case) is refused or
    // routed as `/v1/` itself.
    let created = admin(
        &gw,
        Method::POST,
        "/v1/keys",
        Some(serde_json::json!({"customer": "test", "routes": ["any"]})),
    )
    .await;
    let catch_all = created.json()["key"].as_str().unwrap().to_owned();
    for path in [
        "/v%31/secret",
        "/%76%31/secret",
        "//v1/secret",
        "/v1;x/secret",
        "/strip/..;/v1/secret",
    ] {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {catch_all}\r\nConnection: close\r\n\r\n"
        );
        let text = raw(gw.addr, request.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(statuses(&text), [400], "{path}: {text}");
    }
    let status = status_once_known(&gw, "/V1/SECRET", &catch_all).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "routed as /v1/, which it may not use"
    );
    assert_eq!(mock.requests().len(), 1, "nothing more was forwarded");
    gw.stop().await;
}

#[tokio::test]
async fn host_must_be_one_plain_host_and_port() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = gateway(&mock).await;
    let key = key_header(&gw);
    for (name, hosts) in [
        ("missing", ""),
        ("doubled", "Host: a\r\nHost: b\r\n"),
        ("userinfo", "Host: user@evil.example\r\n"),
        ("path", "Host: a/b\r\n"),
        ("space", "Host: a b\r\n"),
        ("empty", "Host: \r\n"),
        ("bad port", "Host: a:http\r\n"),
    ] {
        let request = format!("GET /v1/x HTTP/1.1\r\n{hosts}{key}Connection: close\r\n\r\n");
        let text = raw(gw.addr, request.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(statuses(&text), [400], "{name}: {text}");
    }
    // An absolute-form target's authority stands in for Host: held to the
    // same.
    for target in ["http://user:pw@evil.example:1/v1/x", "http://a@b/v1/x"] {
        for (version, host) in [("HTTP/1.0", ""), ("HTTP/1.1", "Host: a\r\n")] {
            let request = format!("GET {target} {version}\r\n{host}{key}Connection: close\r\n\r\n");
            let text = raw(gw.addr, request.as_bytes(), Duration::from_secs(5)).await;
            // (hyper answers an HTTP/1.0 request in HTTP/1.0)
            let status = text.get(9..12);
            assert_eq!(status, Some("400"), "{target} {version}: {text}");
        }
    }
    assert!(mock.requests().is_empty());
    // HTTP/1.0 may omit it; a plain host:port passes and is forwarded as
    // x-forwarded-host.
    let text = raw(
        gw.addr,
        format!("GET /v1/ten HTTP/1.0\r\n{key}\r\n").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    // Headers that would speak for the gateway to the upstream (who the
    // client is, what it asked for) do not reach it.
    let spoken_for = "Forwarded: for=6.6.6.6;host=evil\r\nX-Real-IP: 6.6.6.6\r\n\
                      X-Original-URL: /v1/admin\r\nX-HTTP-Method-Override: DELETE\r\n";
    let text = raw(
        gw.addr,
        format!("GET /v1/ok HTTP/1.1\r\nHost: api.example:8443\r\n{spoken_for}{key}Connection: close\r\n\r\n")
            .as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(statuses(&text), [200], "{text}");
    let forwarded = mock.requests();
    assert_eq!(forwarded.len(), 2);
    assert_eq!(forwarded[1].headers["x-forwarded-host"], "api.example:8443");
    for name in [
        "forwarded",
        "x-real-ip",
        "x-original-url",
        "x-http-method-override",
    ] {
        assert!(
            forwarded[1].headers.get(name).is_none(),
            "{name} was forwarded"
        );
    }
    gw.stop().await;
}

// ---- 3. Head sizes ------------------------------------------------------------

#[tokio::test]
async fn oversized_heads_are_431_and_long_request_lines_414() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = gateway(&mock).await; // max_header_bytes = 16 KiB
    let key = key_header(&gw);
    // Over the limit but readable: the gateway's own JSON error.
    let big = "a".repeat(20 * 1024);
    let request = format!("GET /v1/x HTTP/1.1\r\nHost: a\r\n{key}x-big: {big}\r\n\r\n");
    let text = raw(gw.addr, request.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(statuses(&text), [431], "{text}");
    assert!(
        text.contains("x-tollgate-error: request_header_fields_too_large"),
        "{text}"
    );
    assert!(
        text.contains("\"request_header_fields_too_large\""),
        "{text}"
    );
    // Far over it (200 KiB): refused while reading, the head never whole.
    let huge = "a".repeat(200 * 1024);
    let request = format!("GET /v1/x HTTP/1.1\r\nHost: a\r\n{key}x-big: {huge}\r\n\r\n");
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    // The gateway may close before the whole head is written.
    let _ = stream.write_all(request.as_bytes()).await;
    let text = read_to_close(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(statuses(&text), [431], "{text}");
    // A request line alone over the limit.
    let long = "b".repeat(20 * 1024);
    let request = format!("GET /v1/{long} HTTP/1.1\r\nHost: a\r\n{key}\r\n");
    let text = raw(gw.addr, request.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(statuses(&text), [414], "{text}");
    assert!(mock.requests().is_empty(), "nothing was forwarded");
    gw.stop().await;
}

// ---- 4. Slow and silent clients -------------------------------------------------

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_timeout() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = gateway(&mock).await; // request_header_timeout = 500ms
    let started = Instant::now();
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    let text = read_to_close(&mut silent, Duration::from_secs(3)).await;
    let took = started.elapsed();
    assert!(text.is_empty(), "{text}");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(2),
        "closed after {took:?}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = gateway(&mock).await; // idle_timeout = 600ms
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let request = format!("GET /v1/ok HTTP/1.1\r\nHost: a\r\n{}\r\n", key_header(&gw));
    stream.write_all(request.as_bytes()).await.unwrap();
    let started = Instant::now();
    let text = read_to_close(&mut stream, Duration::from_secs(4)).await;
    let took = started.elapsed();
    assert_eq!(statuses(&text), [200], "{text}");
    assert!(
        took >= Duration::from_millis(550) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_stalled_upload_is_408_client_timeout_not_the_upstreams_fault() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = gateway(&mock).await; // request_body_timeout = 400ms
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/echo HTTP/1.1\r\nHost: a\r\n{}Content-Length: 100\r\n\r\n0123456789",
        key_header(&gw)
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let text = read_to_close(&mut stream, Duration::from_secs(5)).await;
    let took = started.elapsed();
    assert_eq!(statuses(&text), [408], "{text}");
    assert!(text.contains("x-tollgate-error: request_timeout"), "{text}");
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
    let rows = rows(&gw, 1).await;
    assert_eq!(rows[0].1, "client_timeout");
    assert_eq!(rows[0].2, 408);
    assert_eq!(rows[0].3, 10, "the bytes that did arrive");
    gw.stop().await;
}

#[tokio::test]
async fn a_slow_but_steady_upload_outlives_the_route_timeout() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = gateway(&mock).await;
    // Route "stripped" times out after 500ms; the upload takes ~1.5s, a
    // byte every 300ms, each within the 400ms body timeout.
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /strip/echo HTTP/1.1\r\nHost: a\r\n{}Content-Length: 5\r\nConnection: close\r\n\r\n",
        key_header(&gw)
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for byte in b"hello" {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stream.write_all(&[*byte]).await.unwrap();
    }
    let text = read_to_close(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(statuses(&text), [200], "{text}");
    assert!(text.contains("\"body_bytes\":5"), "{text}");
    gw.stop().await;
}

/// An upstream that answers each request head at once with `ok`, before
/// its body has come (as an early 404 does), and keeps reading whatever
/// follows; the number of connections it has accepted.
async fn early_answering_upstream() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    while let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n")
                    {
                        buffer.drain(..end + 4);
                        let answer = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if socket.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (format!("http://{address}"), accepted)
}

#[tokio::test]
async fn an_upload_still_trickling_does_not_hold_up_the_next_request() {
    use std::sync::atomic::Ordering;
    let (upstream, accepted) = early_answering_upstream().await;
    let gw = TestGateway::start(route_config(&upstream, "")).await;
    // One client's upload: answered at once, its body still coming, a byte
    // at a time within the body timeout.
    let mut trickle = TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/early HTTP/1.1\r\nHost: a\r\n{}Content-Length: 100\r\n\r\n0123456789",
        key_header(&gw)
    );
    trickle.write_all(head.as_bytes()).await.unwrap();
    let mut answer = [0u8; 512];
    let read = trickle.read(&mut answer).await.unwrap();
    assert!(
        String::from_utf8_lossy(&answer[..read]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer[..read])
    );
    let keep_trickling = tokio::spawn(async move {
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if trickle.write_all(b"x").await.is_err() {
                return;
            }
        }
    });
    // The next requests, anyone's, are answered at once, on a connection
    // of their own: the one still carrying the upload is not reused.
    for _ in 0..3 {
        let started = Instant::now();
        let reply = send(
            &client(),
            gw.request(Method::GET, "/v1/next")
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "waited {:?} behind another client's upload",
            started.elapsed()
        );
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "one more, then reused");
    // A whole upload gives its connection back as before, whether its
    // end is its length or the end of a chunked body.
    for length in [true, false] {
        let body = Full::new(Bytes::from_static(b"hello"));
        let mut request = gw.request(Method::POST, "/v1/whole");
        if length {
            request = request.header("content-length", "5");
        } else {
            request = request.header("transfer-encoding", "chunked");
        }
        let reply = send(&client(), request.body(body).unwrap()).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "reused after whole uploads"
    );
    keep_trickling.abort();
    gw.stop().await;
}

#[tokio::test]
async fn a_response_the_client_never_reads_is_abandoned() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = gateway(&mock).await; // idle_timeout = 600ms
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    // 64 MiB: far more than the socket buffers on both sides hold.
    let request = format!(
        "GET /strip/bytes/67108864 HTTP/1.1\r\nHost: a\r\n{}\r\n",
        key_header(&gw)
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    // Read nothing. The gateway gives up on us and on the upstream.
    let rows = rows(&gw, 1).await;
    assert_eq!(rows[0].1, "client_closed", "{rows:?}");
    assert_eq!(rows[0].2, 200);
    assert!(
        rows[0].4 > 0 && rows[0].4 < 67_108_864,
        "the bytes actually sent: {}",
        rows[0].4
    );
    gw.stop().await;
}

// ---- 5. HTTP/2 abuse -------------------------------------------------------------

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One HTTP/2 frame: 9-byte header and payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

#[tokio::test]
async fn an_h2_connection_that_sends_only_the_preface_is_closed() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = gateway(&mock).await;
    let started = Instant::now();
    let mut bytes = H2_PREFACE.to_vec();
    bytes.extend(frame(0x4, 0, 0, &[])); // empty SETTINGS
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream.write_all(&bytes).await.unwrap();
    read_to_close(&mut stream, Duration::from_secs(4)).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    gw.stop().await;
}

async fn h2_connect(addr: SocketAddr, window: u32) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// The status of a GET sent with prior-knowledge HTTP/2 on a new connection.
async fn h2_status(request: http::request::Builder) -> StatusCode {
    send(&h2c_client(), request.body(Full::default()).unwrap())
        .await
        .status
}

fn h2_request(gw: &TestGateway, path: &str) -> http::Request<()> {
    h2_get(gw.addr, gw.key.as_deref().unwrap(), path)
}

fn h2_get(addr: SocketAddr, key: &str, path: &str) -> http::Request<()> {
    http::Request::get(format!("http://{addr}{path}"))
        .header("authorization", format!("Bearer {key}"))
        .body(())
        .unwrap()
}

/// Opens `count` streams on one connection and resets each at once.
async fn rapid_reset(addr: SocketAddr, key: &str, count: usize) {
    let mut client = h2_connect(addr, 65_535).await;
    for _ in 0..count {
        let Ok(ready) = client.clone().ready().await else {
            return; // the gateway closed this connection: fine
        };
        client = ready;
        let Ok((_response, mut stream)) = client.send_request(h2_get(addr, key, "/v1/ok"), false)
        else {
            return;
        };
        stream.send_reset(h2::Reason::CANCEL);
    }
}

/// Sends a HEADERS frame and then up to 1 MiB of CONTINUATION frames that
/// never end the header block; returns once the gateway cut it off.
async fn continuation_flood(addr: SocketAddr) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut bytes = H2_PREFACE.to_vec();
    bytes.extend(frame(0x4, 0, 0, &[]));
    // :method GET, :scheme http, :path / (static table indices).
    bytes.extend(frame(0x1, 0x1, 1, &[0x82, 0x86, 0x84]));
    stream.write_all(&bytes).await.unwrap();
    // Literal without indexing, name "x-a", a 158-byte value (HPACK
    // integer 127 + 31).
    let mut literal = vec![0x00, 0x03, b'x', b'-', b'a', 0x7f, 0x1f];
    literal.extend(std::iter::repeat_n(b'a', 0x7f + 0x1f));
    let continuation = frame(0x9, 0, 1, &literal.repeat(16));
    let mut written = 0usize;
    while written < 1 << 20 {
        if stream.write_all(&continuation).await.is_err() {
            return;
        }
        written += continuation.len();
    }
    // Written into socket buffers; the gateway must still close it.
    read_to_close(&mut stream, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn rapid_reset_leaves_the_gateway_serving() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = gateway(&mock).await;
    rapid_reset(gw.addr, gw.key.as_deref().unwrap(), 2_000).await;
    // A fresh connection is served at once.
    assert_eq!(
        h2_status(gw.request(Method::GET, "/v1/ok")).await,
        StatusCode::OK
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_continuation_flood_is_cut_off() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = gateway(&mock).await; // header lists up to 32 KiB
    continuation_flood(gw.addr).await;
    // And it keeps serving.
    assert_eq!(gw.get("/v1/ok").await.status, StatusCode::OK);
    gw.stop().await;
}

#[tokio::test]
async fn an_h2_stream_whose_window_never_opens_is_abandoned() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = gateway(&mock).await; // idle_timeout = 600ms
    let client = h2_connect(gw.addr, 0).await;
    let mut client = client.ready().await.unwrap();
    let (response, _) = client
        .send_request(h2_request(&gw, "/strip/bytes/10485760"), true)
        .unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    // The window is closed: no data can come, and after the idle timeout
    // the gateway resets the stream.
    let ended = tokio::time::timeout(Duration::from_secs(5), body.data()).await;
    match ended {
        Ok(Some(Err(error))) => assert!(error.is_reset(), "{error}"),
        Ok(None) => {}
        other => panic!("the stream was not reset: {other:?}"),
    }
    let rows = rows(&gw, 1).await;
    assert_eq!(rows[0].1, "client_closed", "{rows:?}");
    // Other streams on the same connection were never at risk; a new one
    // with an open window is served.
    assert_eq!(
        h2_status(gw.request(Method::GET, "/v1/ok")).await,
        StatusCode::OK
    );
    gw.stop().await;
}

#[tokio::test]
async fn an_h2_stream_that_never_sends_its_body_is_408() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = gateway(&mock).await; // request_body_timeout = 400ms
    let client = h2_connect(gw.addr, 65_535).await;
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post(format!("http://{}/v1/echo", gw.addr))
        .header(
            "authorization",
            format!("Bearer {}", gw.key.as_deref().unwrap()),
        )
        .body(())
        .unwrap();
    // Headers without END_STREAM, and then nothing.
    let (response, _send) = client.send_request(request, false).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    assert_eq!(response.headers()["x-tollgate-error"], "request_timeout");
    let rows = rows(&gw, 1).await;
    assert_eq!(rows[0].1, "client_timeout");
    gw.stop().await;
}

/// A config for the real binary: one route to `mock`, one-second timeouts.
fn process_config(mock: &MockUpstream) -> String {
    format!(
        r#"
[server]
listen = "LISTEN"
admin_listen = "ADMIN"
request_header_timeout = "1s"
idle_timeout = "1s"

[[tiers]]
name = "test"

[[routes]]
name = "mock"
prefix = "/v1/"
upstream = "{}"
"#,
        mock.url()
    )
}

// ---- 6. Connection exhaustion ----------------------------------------------------

#[tokio::test]
async fn silent_sockets_under_a_low_descriptor_limit_take_down_nothing() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = Process::serve_with_descriptor_limit(&process_config(&mock), 256);
    let before = gw.status_kib("VmHWM");
    // 300 connections that never send a byte: more than the process has
    // descriptors for.
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    // The admin listener has its own budget: it answers at once.
    let started = Instant::now();
    let health = get(&format!("http://{}/healthz", gw.admin)).await;
    assert_eq!(health.status, StatusCode::OK);
    assert!(started.elapsed() < Duration::from_secs(1));
    // The data plane serves a real client once the silent ones are cut off.
    let started = Instant::now();
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        send(
            &client(),
            gw.request(Method::GET, "/v1/ok")
                .body(Full::default())
                .unwrap(),
        ),
    )
    .await
    .expect("served within 10s");
    assert_eq!(reply.status, StatusCode::OK);
    let waited = started.elapsed();
    // Every silent socket is closed by the gateway.
    for mut socket in silent {
        read_to_close(&mut socket, Duration::from_secs(10)).await;
    }
    let after = gw.status_kib("VmHWM");
    let logs = gw.logs();
    let too_many = logs
        .iter()
        .filter(|line| line.contains("Accepting connections failed"))
        .count();
    eprintln!(
        "descriptor limit 256, 300 silent sockets: real client served after {waited:?}; \
         VmHWM {before} -> {after} KiB; {too_many} accept-failure log lines"
    );
    assert!(
        too_many <= 15,
        "accept failures are logged at most once a second"
    );
    assert!(
        after < before + 32 * 1024,
        "memory stays bounded: {before} -> {after} KiB"
    );
}

/// The real binary through every HTTP/2 abuse above at once, many
/// connections each: its peak memory stays bounded.
#[tokio::test]
async fn h2_abuse_keeps_the_gateways_memory_bounded() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = Process::serve(&process_config(&mock));
    let key = gw.key.clone().unwrap();
    // Warm up: the first requests allocate pools and caches.
    for _ in 0..20 {
        assert_eq!(
            h2_status(gw.request(Method::GET, "/v1/ok")).await,
            StatusCode::OK
        );
    }
    let before = gw.status_kib("VmHWM");
    let mut attacks = Vec::new();
    for _ in 0..20 {
        let (addr, key) = (gw.addr, key.clone());
        attacks.push(tokio::spawn(
            async move { rapid_reset(addr, &key, 1_000).await },
        ));
    }
    for handle in attacks {
        handle.await.unwrap();
    }
    let mut floods = Vec::new();
    for _ in 0..20 {
        floods.push(tokio::spawn(continuation_flood(gw.addr)));
    }
    for handle in floods {
        handle.await.unwrap();
    }
    // 100 connections that open a stream each and never read the answer.
    let mut stalled = Vec::new();
    for _ in 0..100 {
        let client = h2_connect(gw.addr, 0).await;
        let mut client = client.ready().await.unwrap();
        let (response, _) = client
            .send_request(h2_get(gw.addr, &key, "/v1/ok"), true)
            .unwrap();
        stalled.push((client, response));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = gw.status_kib("VmHWM");
    eprintln!(
        "h2 abuse (20x1000 rapid resets, 20 CONTINUATION floods of 1 MiB, 100 zero-window \
         streams): VmHWM {before} -> {after} KiB"
    );
    assert!(
        after < before + 64 * 1024,
        "memory stays bounded: {before} -> {after} KiB"
    );
    drop(stalled);
    assert_eq!(
        h2_status(gw.request(Method::GET, "/v1/ok")).await,
        StatusCode::OK
    );
}

// ---- 7. Bodies a lenient upstream reads differently -------------------------

/// A completions body is read whole on a metered route: one sent a byte per
/// chunk costs its own size in memory, not its chunks' (each of which
/// would hold on to a read buffer).
#[tokio::test]
async fn a_body_read_whole_costs_its_size_however_it_is_chunked() {
    let mock = MockUpstream::start().await.unwrap();
    let config =
        process_config(&mock).replace("prefix = \"/v1/\"", "prefix = \"/v1/\"\nusage = \"openai\"");
    let gw = Process::serve(&config.replace("[server]", "[server]\nmax_request_body = \"2MiB\""));
    let key = gw.key.clone().unwrap();
    assert_eq!(
        h2_status(gw.request(Method::GET, "/v1/ok")).await,
        StatusCode::OK
    );
    let before = gw.status_kib("VmHWM");
    // Two bodies of 256 KiB at once, a byte per chunk; each is read whole
    // (and then refused, as it is no JSON) before its answer comes.
    let chunks = "1\r\nx\r\n".repeat(256 << 10);
    let mut sent = Vec::new();
    for _ in 0..2 {
        let (addr, key, chunks) = (gw.addr, key.clone(), chunks.clone());
        sent.push(tokio::spawn(async move {
            let head = format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n\
                 Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\
                 Connection: close\r\n\r\n{chunks}0\r\n\r\n"
            );
            raw(addr, head.as_bytes(), Duration::from_secs(60)).await
        }));
    }
    for answer in sent {
        let text = answer.await.unwrap();
        assert_eq!(statuses(&text), [400], "{text}");
    }
    let after = gw.status_kib("VmHWM");
    eprintln!("2 bodies of 256 KiB in 1-byte chunks: VmHWM {before} -> {after} KiB");
    assert!(
        after < before + 8 * 1024,
        "512 KiB of bodies held in {} KiB at most",
        after - before
    );
}

/// A gateway whose `/v1/` route meters OpenAI usage, in front of `mock`,
/// which reads request bodies as leniently as many servers do: as JSON
/// whatever the content type says, the last of duplicate keys winning. A
/// tier of `monthly_requests` requests, so that a reservation the gateway
/// failed to give back shows as a 429.
async fn openai_gateway(mock: &MockUpstream, monthly_requests: u64) -> TestGateway {
    TestGateway::start(config(&format!(
        r#"
[[tiers]]
name = "test"
monthly_requests = {monthly_requests}

[[routes]]
name = "openai"
prefix = "/v1/"
upstream = "{}"
usage = "openai"
timeout = "2s"

[[routes]]
name = "fixed"
prefix = "/fixed/"
upstream = "{}/v1/chat/completions"
strip_prefix = true
usage = "openai"
timeout = "2s"

[pricing."gpt-4o-mini"]
input = 0.15
output = 0.60
"#,
        mock.url(),
        mock.url()
    )))
    .await
}

/// The tokens of every usage row: (input, output).
fn row_tokens(gw: &TestGateway) -> Vec<(i64, i64)> {
    let path = gw.config.database.url.trim_start_matches("sqlite://");
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut statement = conn
        .prepare("SELECT input_tokens, output_tokens FROM usage_events ORDER BY id")
        .unwrap();
    statement
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn chat_post(gw: &TestGateway, path: &str) -> http::request::Builder {
    authorized(Method::POST, gw.url(path), gw.key.as_deref())
}

#[tokio::test]
async fn a_streaming_request_is_metered_whatever_content_type_it_names() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = openai_gateway(&mock, 100).await;
    let body =
        br#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"a b c"}]}"#;
    for content_type in [None, Some("text/plain")] {
        let mut request = chat_post(&gw, "/v1/chat/completions").header("x-mock-chunks", "4");
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let reply = send(&client(), request.body(Full::from(&body[..])).unwrap()).await;
        assert_eq!(reply.status, StatusCode::OK, "{content_type:?}");
        let text = String::from_utf8_lossy(&reply.body);
        assert!(text.contains("data: [DONE]"), "{content_type:?}: {text}");
        assert!(
            !text.contains("\"usage\""),
            "the added usage chunk is hidden: {text}"
        );
    }
    for seen in mock.requests() {
        let json: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
        assert_eq!(json["stream_options"]["include_usage"], true, "{json}");
    }
    let rows = {
        let mut rows = Vec::new();
        eventually(Duration::from_secs(10), || {
            rows = row_tokens(&gw);
            std::future::ready(rows.len() >= 2)
        })
        .await;
        rows
    };
    assert_eq!(rows, [(3, 4), (3, 4)], "both streams metered");
    gw.stop().await;
}

#[tokio::test]
async fn bodies_a_reader_could_take_for_an_unmetered_stream_are_refused_before_forwarding() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = openai_gateway(&mock, 1).await;
    let twice = &br#"{"model":"gpt-4o-mini","stream":false,"messages":[],"stream":true}"#[..];
    // (path, a header, body, what the message says)
    type Case<'a> = (&'a str, Option<(&'a str, &'a str)>, &'a [u8], &'a str);
    let cases: Vec<Case> = vec![
        (
            "/v1/chat/completions",
            None,
            twice,
            "duplicate field `stream`",
        ),
        // The same endpoint to a server that folds case before routing;
        // one that decodes or drops a `;` parameter is not sent such a
        // path at all.
        (
            "/v1/chat/COMPLETIONS/",
            None,
            twice,
            "duplicate field `stream`",
        ),
        (
            "/v1/chat/complet%69ons",
            None,
            twice,
            "encodes a character that needs no encoding",
        ),
        ("/v1/completions;x=1", None, twice, "`;` parameter"),
        // A route whose upstream URL names the endpoint.
        ("/fixed/", None, twice, "duplicate field `stream`"),
        // A key Go's or .NET's readers take for `stream`.
        (
            "/v1/chat/completions",
            None,
            br#"{"model":"gpt-4o-mini","Stream":true,"messages":[]}"#,
            "differs from `stream` only in case",
        ),
        // `"stream":true` in UTF-7, which Express's body-parser decodes.
        (
            "/v1/chat/completions",
            Some(("content-type", "application/json; charset=utf-7")),
            br#"{"model":"gpt-4o-mini","messages":[],"+AHM-tream":true}"#,
            "charset is not UTF-8",
        ),
        (
            "/v1/chat/completions",
            None,
            br#"{"model":"gpt-4o-mini","stream":"true","messages":[]}"#,
            "`stream` must be true, false or null",
        ),
        (
            "/v1/chat/completions",
            None,
            br#"{"stream":true,"stream_options":{"include_usage":true,"include_usage":false}}"#,
            "duplicate field `include_usage`",
        ),
        (
            "/v1/chat/completions",
            Some(("content-type", "application/json")),
            b"\xef\xbb\xbf{\"model\":\"gpt-4o-mini\",\"stream\":true,\"messages\":[]}",
            "not a JSON object",
        ),
        (
            "/v1/chat/completions",
            Some(("content-type", "application/json")),
            b"{\0\"\0s\0t\0r\0e\0a\0m\0\"\0:\0t\0r\0u\0e\0}\0",
            "cannot be read as JSON",
        ),
        (
            "/v1/chat/completions",
            Some(("content-encoding", "gzip")),
            br#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#,
            "compressed",
        ),
    ];
    // One connection for all of them: each body was read whole, so the
    // connection stays usable.
    let client = client();
    for (path, header, body, says) in cases {
        let mut request = chat_post(&gw, path);
        if let Some((name, value)) = header {
            request = request.header(name, value);
        }
        let reply = send(&client, request.body(Full::from(body)).unwrap()).await;
        let shown = String::from_utf8_lossy(body);
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{path}: {shown}");
        assert_eq!(reply.headers["x-tollgate-error"], "invalid_request");
        let message = reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(message.contains(says), "{path}: {message}");
    }
    assert!(mock.requests().is_empty(), "nothing was forwarded");
    // Refused requests give their reservation back: the tier's one
    // request a month is still there, and is the only row.
    let good =
        br#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"a b"}]}"#;
    let request = chat_post(&gw, "/v1/chat/completions")
        .header("content-type", "application/json")
        .header("x-mock-chunks", "3");
    let reply = send(&client, request.body(Full::from(&good[..])).unwrap()).await;
    assert_eq!(reply.status, StatusCode::OK);
    let request = chat_post(&gw, "/v1/chat/completions");
    let reply = send(&client, request.body(Full::from(&good[..])).unwrap()).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    let rows = rows(&gw, 2).await;
    let outcomes: Vec<_> = rows.iter().map(|row| (row.1.as_str(), row.2)).collect();
    assert_eq!(outcomes, [("ok", 200), ("quota_exceeded", 429)]);
    assert_eq!(row_tokens(&gw)[0], (2, 3));
    gw.stop().await;
}

#[tokio::test]
async fn a_metered_route_asks_for_bodies_it_can_read() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = openai_gateway(&mock, 100).await;
    let body = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"a b c"}]}"#;
    let client = client();
    // What the official SDKs send; a CDN in front of the upstream would
    // compress the answer, and the usage in it would be out of sight.
    for (header, sent_as) in [(None, "identity"), (Some("content-encoding: gzip"), "gzip")] {
        let mut request = chat_post(&gw, "/v1/chat/completions")
            .header("content-type", "application/json")
            .header("accept-encoding", "gzip, deflate, br, zstd")
            .header("x-mock-chunks", "4");
        if let Some(header) = header {
            // An upstream that compresses (here: says it does) anyway.
            request = request.header("x-mock-header", header);
        }
        let reply = send(&client, request.body(Full::from(&body[..])).unwrap()).await;
        assert_eq!(reply.status, StatusCode::OK);
        let encoding = reply.headers.get("content-encoding");
        assert_eq!(
            encoding.map_or("identity", |v| v.to_str().unwrap()),
            sent_as
        );
    }
    let seen = mock.requests();
    assert_eq!(seen.len(), 2);
    for request in &seen {
        assert_eq!(request.headers["accept-encoding"], "identity");
    }
    // Only the body the gateway could read has tokens; the other, which it
    // did not try to read, has none (and a warning is logged).
    let mut rows = Vec::new();
    eventually(Duration::from_secs(10), || {
        rows = row_tokens(&gw);
        std::future::ready(rows.len() >= 2)
    })
    .await;
    assert_eq!(rows, [(3, 4), (0, 0)]);
    gw.stop().await;
    // A route that reads no usage from bodies leaves the client's choice.
    let gw = gateway(&mock).await;
    let request = authorized(Method::GET, gw.url("/v1/ok"), gw.key.as_deref())
        .header("accept-encoding", "br")
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&client, request).await.status, StatusCode::OK);
    assert_eq!(mock.requests()[2].headers["accept-encoding"], "br");
    gw.stop().await;
}

#[tokio::test]
async fn an_admin_body_that_stops_arriving_cannot_hold_the_admin_listener() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = gateway(&mock).await;
    // Not signed in: the console reads the form before it knows that.
    let started = std::time::Instant::now();
    let answer = raw(
        gw.admin,
        b"POST /console/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ntoken=",
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(statuses(&answer), [408], "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(9), "{took:?}");
    // A form larger than any the console has is refused as it arrives.
    let mut big = format!(
        "POST /console/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        100 * 1024
    )
    .into_bytes();
    big.extend(std::iter::repeat_n(b'a', 100 * 1024));
    let answer = raw(gw.admin, &big, Duration::from_secs(5)).await;
    assert_eq!(statuses(&answer), [400], "{answer}");
    gw.stop().await;
}

#[tokio::test]
async fn a_row_keeps_at_most_a_kibibyte_of_the_path() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = gateway(&mock).await;
    let path = format!("/v1/{}", "a".repeat(12_000));
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\n{}Connection: close\r\n\r\n",
        key_header(&gw)
    );
    let answer = raw(gw.addr, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(!statuses(&answer).is_empty(), "{answer}");
    let found = rows(&gw, 1).await;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].0, path[..1024]);
    gw.stop().await;
}

#[tokio::test]
async fn admin_tokens_cannot_be_guessed_at_line_rate() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = gateway(&mock).await;
    let with_token = |token: &str| {
        http::Request::get(format!("http://{}/v1/customers", gw.admin))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::default())
            .unwrap()
    };
    for guess in 0..10 {
        let reply = send(&client(), with_token(&format!("guess-{guess}"))).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    // The eleventh is refused before it is looked at, the right one too.
    let refused = send(&client(), with_token("admin-test-token")).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.error_type(), "rate_limited");
    let wait: u64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((50..=60).contains(&wait), "{wait}");
    // So is the console's form; health and metrics are not.
    let form = http::Request::post(format!("http://{}/console/login", gw.admin))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from_static(b"token=admin-test-token")))
        .unwrap();
    assert_eq!(
        send(&client(), form).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let health = get(&format!("http://{}/healthz", gw.admin)).await;
    assert_eq!(health.status, StatusCode::OK);
    gw.stop().await;
}

#[tokio::test]
async fn failed_console_sign_ins_count_and_a_right_one_forgets_them() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = gateway(&mock).await;
    let sign_in = |token: &str| {
        http::Request::post(format!("http://{}/console/login", gw.admin))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(format!("token={token}"))))
            .unwrap()
    };
    for _ in 0..9 {
        assert_eq!(
            send(&client(), sign_in("nope")).await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    let signed_in = send(&client(), sign_in("admin-test-token")).await;
    assert_eq!(
        signed_in.status,
        StatusCode::SEE_OTHER,
        "{:?}",
        signed_in.body
    );
    // Forgotten: nine more wrong ones are still answered.
    for _ in 0..9 {
        assert_eq!(
            send(&client(), sign_in("nope")).await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    gw.stop().await;
}
