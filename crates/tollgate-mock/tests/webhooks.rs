//! The webhook receiver over real sockets, through hyper's own client (and raw
//! TCP where a request must be left hanging).

// Helpers outside #[test] functions unwrap too; tests may unwrap (STYLE.md).
#![allow(clippy::unwrap_used)]

use std::io::ErrorKind;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate_mock::webhooks::{self, MAX_WEBHOOK_BODY};
use tollgate_mock::WebhookReceiver;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OTHER_SECRET: &str = "whsec_c2VjcmV0LWtleS1vZi1zb21lb25lLWVsc2U=";

fn now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

fn event(kind: &str) -> Vec<u8> {
    json!({
        "type": kind,
        "timestamp": "2025-03-01T09:30:00Z",
        "data": {"customer": "cus_1", "used_usd": "12.50"},
    })
    .to_string()
    .into_bytes()
}

/// A whole response.
struct Answer {
    status: StatusCode,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

async fn send(request: Request<Full<Bytes>>) -> Answer {
    let client = Client::builder(TokioExecutor::new()).build_http();
    let (parts, body) = client.request(request).await.unwrap().into_parts();
    Answer {
        status: parts.status,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// POSTs `body` to the receiver, signed with `secret` for `id` at `timestamp`.
async fn deliver(
    receiver: &WebhookReceiver,
    secret: &str,
    id: &str,
    timestamp: i64,
    body: Vec<u8>,
) -> Answer {
    let signature = webhooks::sign(secret, id, timestamp, &body).unwrap();
    let request = Request::post(receiver.url())
        .header("content-type", "application/json")
        .header(webhooks::WEBHOOK_ID, id)
        .header(webhooks::WEBHOOK_TIMESTAMP, timestamp.to_string())
        .header(webhooks::WEBHOOK_SIGNATURE, signature)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    send(request).await
}

async fn get_log(receiver: &WebhookReceiver) -> Answer {
    let request = Request::get(receiver.url())
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(request).await
}

/// Polls `condition` every 10 ms for up to two seconds.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..200 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test]
async fn a_signed_delivery_is_recorded_valid_and_answered_200() {
    let receiver = WebhookReceiver::start(SECRET).await.unwrap();
    assert!(receiver.url().ends_with("/webhooks"), "{}", receiver.url());

    let answer = deliver(
        &receiver,
        SECRET,
        "msg_1",
        now(),
        event("usage.threshold_reached"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);

    let events = receiver.wait_for(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(events.len(), 1);
    let delivery = &events[0];
    assert_eq!(delivery.id, "msg_1");
    assert_eq!(delivery.event_type, "usage.threshold_reached");
    assert_eq!(delivery.body["data"]["customer"], "cus_1");
    assert!(delivery.valid);
    assert_eq!(delivery.error, None);
    assert_eq!(delivery.attempt_status, 200);
    assert!(delivery.timestamp.is_some());
    assert_eq!(receiver.distinct_ids(), ["msg_1"]);

    // The log, for the demo.
    let log = get_log(&receiver).await;
    assert_eq!(log.status, StatusCode::OK);
    let log = log.json();
    assert_eq!(log[0]["id"], "msg_1");
    assert_eq!(log[0]["type"], "usage.threshold_reached");
    assert_eq!(log[0]["valid"], true);
    assert_eq!(log[0]["status"], 200);

    receiver.shutdown().await;
}

#[tokio::test]
async fn a_delivery_signed_with_another_secret_is_refused_with_401() {
    let receiver = WebhookReceiver::start(SECRET).await.unwrap();

    let answer = deliver(&receiver, OTHER_SECRET, "msg_1", now(), event("x.y")).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert!(
        answer.json()["error"]
            .as_str()
            .unwrap()
            .contains("signature"),
        "{:?}",
        answer.body
    );

    let received = receiver.received();
    assert_eq!(received.len(), 1);
    assert!(!received[0].valid);
    assert_eq!(received[0].attempt_status, 401);
    assert!(received[0].error.as_deref().unwrap().contains("signature"));
    assert!(receiver.valid().is_empty());
    assert!(receiver.distinct_ids().is_empty());
}

#[tokio::test]
async fn an_old_timestamp_is_refused() {
    let receiver = WebhookReceiver::start(SECRET).await.unwrap();

    let answer = deliver(&receiver, SECRET, "msg_1", now() - 600, event("x.y")).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let received = receiver.received();
    assert!(!received[0].valid);
    assert!(
        received[0]
            .error
            .as_deref()
            .unwrap()
            .contains("in the past"),
        "{:?}",
        received[0].error
    );

    // Within the tolerance it passes.
    let answer = deliver(&receiver, SECRET, "msg_2", now() - 60, event("x.y")).await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test]
async fn missing_headers_are_refused() {
    let receiver = WebhookReceiver::start(SECRET).await.unwrap();
    let request = Request::post(receiver.url())
        .header(webhooks::WEBHOOK_ID, "msg_1")
        .body(Full::new(Bytes::from(event("x.y"))))
        .unwrap();
    let answer = send(request).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        receiver.received()[0].error.as_deref(),
        Some("the `webhook-timestamp` header is missing")
    );
}

#[tokio::test]
async fn a_signed_body_that_is_not_an_event_is_refused_with_400() {
    let receiver = WebhookReceiver::start(SECRET).await.unwrap();

    let answer = deliver(
        &receiver,
        SECRET,
        "msg_1",
        now(),
        b"{\"type\": \"x.y\"}".to_vec(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    let answer = deliver(&receiver, SECRET, "msg_2", now(), b"not json".to_vec()).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);

    let received = receiver.received();
    assert!(received.iter().all(|delivery| !delivery.valid));
    assert_eq!(received[0].event_type, "x.y");
    assert!(received[1].error.as_deref().unwrap().contains("not JSON"));
    assert_eq!(received[1].body, Value::Null);
}

#[tokio::test]
async fn fail_next_fails_one_delivery_then_the_retry_lands() {
    let receiver = WebhookReceiver::start(SECRET).await.unwrap();
    receiver.fail_next(1, 500);

    let first = deliver(&receiver, SECRET, "msg_1", now(), event("x.y")).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(receiver.distinct_ids().is_empty());
    assert!(receiver
        .wait_for(1, Duration::from_millis(50))
        .await
        .is_err());

    // The retry: same id, a fresh timestamp and signature.
    let retry = deliver(&receiver, SECRET, "msg_1", now(), event("x.y")).await;
    assert_eq!(retry.status, StatusCode::OK);

    let events = receiver.wait_for(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].attempt_status, 200);

    let statuses: Vec<u16> = receiver
        .received()
        .iter()
        .map(|delivery| delivery.attempt_status)
        .collect();
    assert_eq!(statuses, [500, 200]);
    assert_eq!(receiver.valid().len(), 2);
    assert_eq!(receiver.accepted().len(), 1);
    assert_eq!(receiver.distinct_ids(), ["msg_1"]);
}

#[tokio::test]
async fn fail_next_counts_only_valid_deliveries() {
    let receiver = WebhookReceiver::start(SECRET).await.unwrap();
    receiver.fail_next(1, 429);

    let forged = deliver(&receiver, OTHER_SECRET, "msg_1", now(), event("x.y")).await;
    assert_eq!(forged.status, StatusCode::UNAUTHORIZED);
    let first = deliver(&receiver, SECRET, "msg_1", now(), event("x.y")).await;
    assert_eq!(first.status, StatusCode::TOO_MANY_REQUESTS);
    let second = deliver(&receiver, SECRET, "msg_1", now(), event("x.y")).await;
    assert_eq!(second.status, StatusCode::OK);
}

#[tokio::test]
async fn a_body_over_the_limit_is_answered_413() {
    let receiver = WebhookReceiver::start(SECRET).await.unwrap();

    let mut body = event("x.y");
    body.resize(MAX_WEBHOOK_BODY + 1, b' ');
    let answer = deliver(&receiver, SECRET, "msg_1", now(), body).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    let received = receiver.received();
    assert_eq!(received[0].attempt_status, 413);
    assert!(!received[0].valid);
    assert_eq!(received[0].body, Value::Null);

    // Right at the limit is fine (JSON allows trailing whitespace).
    let mut body = event("x.y");
    body.resize(MAX_WEBHOOK_BODY, b' ');
    let answer = deliver(&receiver, SECRET, "msg_2", now(), body).await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test]
async fn while_down_everything_is_answered_503() {
    let receiver = WebhookReceiver::start(SECRET).await.unwrap();
    receiver.set_down(true);

    let answer = deliver(&receiver, SECRET, "msg_1", now(), event("x.y")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        get_log(&receiver).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // Still recorded, and checked.
    let received = receiver.received();
    assert_eq!(received[0].attempt_status, 503);
    assert!(received[0].valid);

    receiver.set_down(false);
    let answer = deliver(&receiver, SECRET, "msg_1", now(), event("x.y")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(receiver.distinct_ids(), ["msg_1"]);
}

#[tokio::test]
async fn other_methods_are_answered_405() {
    let receiver = WebhookReceiver::start(SECRET).await.unwrap();
    let request = Request::builder()
        .method(Method::PUT)
        .uri(receiver.url())
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(request).await.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(receiver.received().is_empty());
}

/// Writes a signed delivery on a raw connection, for the hang tests.
async fn deliver_raw(receiver: &WebhookReceiver, id: &str) -> TcpStream {
    let body = event("x.y");
    let timestamp = now();
    let signature = webhooks::sign(SECRET, id, timestamp, &body).unwrap();
    let head = format!(
        "POST /webhooks HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
         webhook-id: {id}\r\nwebhook-timestamp: {timestamp}\r\nwebhook-signature: {signature}\r\n\
         content-length: {}\r\n\r\n",
        receiver.addr(),
        body.len()
    );
    let mut stream = TcpStream::connect(receiver.addr()).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body).await.unwrap();
    stream
}

#[tokio::test]
async fn hang_next_holds_the_connection_until_the_sender_leaves() {
    let receiver = WebhookReceiver::start(SECRET).await.unwrap();
    receiver.hang_next(1);

    let mut stream = deliver_raw(&receiver, "msg_1").await;
    let mut buf = [0_u8; 64];
    let read = tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf)).await;
    assert!(read.is_err(), "the receiver answered a held delivery");
    assert_eq!(receiver.holding(), 1);
    let received = receiver.received();
    assert_eq!(received[0].attempt_status, 0);
    assert!(received[0].valid);
    assert!(receiver.distinct_ids().is_empty());

    // The sender times out and closes: the held request goes away.
    drop(stream);
    eventually("the held delivery is released", || receiver.holding() == 0).await;

    // Only one was held; the retry lands.
    let retry = deliver(&receiver, SECRET, "msg_1", now(), event("x.y")).await;
    assert_eq!(retry.status, StatusCode::OK);
    assert_eq!(receiver.distinct_ids(), ["msg_1"]);
}

#[tokio::test]
async fn shutdown_breaks_a_held_delivery() {
    let receiver = WebhookReceiver::start(SECRET).await.unwrap();
    receiver.hang_next(1);
    let mut stream = deliver_raw(&receiver, "msg_1").await;
    let addr = receiver.addr();
    eventually("the delivery is held", || receiver.holding() == 1).await;

    tokio::time::timeout(Duration::from_secs(5), receiver.shutdown())
        .await
        .unwrap();

    // The connection closes without an answer, and nothing listens any more.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .unwrap();
    assert!(
        read.is_err() || answer.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    let error = TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::ConnectionRefused);
}

#[tokio::test]
async fn wait_for_counts_distinct_ids() {
    let receiver = WebhookReceiver::start(SECRET).await.unwrap();
    let waiter = receiver.wait_for(2, Duration::from_secs(5));
    let sender = async {
        for id in ["msg_1", "msg_1", "msg_2"] {
            let answer = deliver(&receiver, SECRET, id, now(), event("x.y")).await;
            assert_eq!(answer.status, StatusCode::OK);
        }
    };
    let (events, ()) = tokio::join!(waiter, sender);
    let ids: Vec<String> = events.unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(ids, ["msg_1", "msg_2"]);
    assert_eq!(receiver.accepted().len(), 3);

    let error = receiver
        .wait_for(3, Duration::from_millis(20))
        .await
        .unwrap_err();
    assert_eq!((error.wanted, error.got, error.received), (3, 2, 3));
}

#[tokio::test]
async fn a_malformed_secret_is_refused_at_start() {
    let error = WebhookReceiver::start("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidInput);
}
