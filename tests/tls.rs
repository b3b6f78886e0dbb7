//! TLS termination: HTTP/2 negotiated by ALPN and HTTP/1.1 over TLS, with a
//! self-signed certificate made by the test.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

struct Tls {
    _dir: tempfile::TempDir,
    cert_path: std::path::PathBuf,
    key_path: std::path::PathBuf,
    roots: rustls::RootCertStore,
}

fn self_signed() -> Tls {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = write_file(dir.path(), "gw.pem", &certified.cert.pem());
    let key_path = write_file(dir.path(), "gw.key", &certified.signing_key.serialize_pem());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    Tls {
        _dir: dir,
        cert_path,
        key_path,
        roots,
    }
}

fn tls_client(
    tls: &Tls,
    h2: bool,
) -> Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(tls.roots.clone())
        .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only();
    if h2 {
        Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(builder.enable_http2().build())
    } else {
        Client::builder(TokioExecutor::new()).build(builder.enable_http1().build())
    }
}

async fn tls_gateway(tls: &Tls, upstream: &str) -> TestGateway {
    let mut config = route_config(upstream, "");
    config.server.tls = Some(tollgate::config::TlsConfig {
        cert: tls.cert_path.clone(),
        key: tls.key_path.clone(),
    });
    TestGateway::start(config).await
}

#[tokio::test]
async fn http2_by_alpn_over_tls() {
    let mock = MockUpstream::start().await.unwrap();
    let tls = self_signed();
    let gw = tls_gateway(&tls, &mock.url()).await;
    let url = format!("https://localhost:{}/v1/chat/completions", gw.addr.port());
    let response = tls_client(&tls, true)
        .request(
            Request::post(url)
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {}", gw.key.as_deref().unwrap()))
                .body(Full::new(Bytes::from_static(
                    br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"one two three"}]}"#,
                )))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["usage"]["prompt_tokens"], 3);
    assert_eq!(mock.requests()[0].headers["x-forwarded-proto"], "https");
    gw.stop().await;
}

#[tokio::test]
async fn http1_over_tls() {
    let mock = MockUpstream::start().await.unwrap();
    let tls = self_signed();
    let gw = tls_gateway(&tls, &mock.url()).await;
    let url = format!("https://localhost:{}/v1/echo", gw.addr.port());
    let response = tls_client(&tls, false)
        .request(
            Request::get(url)
                .header("x-api-key", gw.key.as_deref().unwrap())
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.version(), Version::HTTP_11);
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(mock.requests()[0].headers["x-forwarded-proto"], "https");
    gw.stop().await;
}

#[tokio::test]
async fn a_bad_certificate_file_is_a_clear_start_error() {
    let dir = tempfile::tempdir().unwrap();
    let cert = write_file(dir.path(), "bad.pem", "not a certificate");
    let key = write_file(dir.path(), "bad.key", "not a key");
    let mut config = route_config("http://127.0.0.1:1", "");
    // Its own database, so the test leaves nothing in the working directory.
    config.database.url = format!("sqlite://{}/tollgate.db", dir.path().display());
    config.usage.spool_dir = dir.path().join("spool");
    config.server.tls = Some(tollgate::config::TlsConfig { cert, key });
    let error = match tollgate::app::start(config).await {
        Ok(_) => panic!("a gateway with a bad certificate must not start"),
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("bad.pem"), "{error}");
    assert!(error.contains("no certificate"), "{error}");
}

// ---- upstream TLS: ca_file and client_cert -----------------------------------

/// A test CA and the certificates it signed, as PEM files: a server
/// certificate for `localhost` (the upstream, or the admin listener) and a
/// client certificate (the gateway's, for mutual TLS).
struct TestCa {
    dir: tempfile::TempDir,
    ca: std::path::PathBuf,
    server_cert: std::path::PathBuf,
    server_key: std::path::PathBuf,
    client_cert: std::path::PathBuf,
    client_key: std::path::PathBuf,
    roots: rustls::RootCertStore,
    server_chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    server_key_der: rustls::pki_types::PrivateKeyDer<'static>,
}

impl TestCa {
    fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Tollgate test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap()
                .signed_by(&server_key, &ca)
                .unwrap();
        let client_key = rcgen::KeyPair::generate().unwrap();
        let client = rcgen::CertificateParams::new(vec!["gateway".to_owned()])
            .unwrap()
            .signed_by(&client_key, &ca)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        TestCa {
            ca: write_file(dir.path(), "ca.pem", &ca.pem()),
            server_cert: write_file(dir.path(), "server.pem", &server.pem()),
            server_key: write_file(dir.path(), "server.key", &server_key.serialize_pem()),
            client_cert: write_file(dir.path(), "client.pem", &client.pem()),
            client_key: write_file(dir.path(), "client.key", &client_key.serialize_pem()),
            roots,
            server_chain: vec![server.der().clone()],
            server_key_der: rustls::pki_types::PrivateKeyDer::Pkcs8(
                server_key.serialize_der().into(),
            ),
            dir,
        }
    }
}

/// An https upstream that terminates TLS with `config` and relays the
/// plaintext to a mock upstream, counting the connections it accepts.
struct TlsRelay {
    port: u16,
    mock: MockUpstream,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsRelay {
    async fn start(config: rustls::ServerConfig) -> TlsRelay {
        let mock = MockUpstream::start().await.unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let backend = mock.addr();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A refused handshake just ends the connection.
                    let Ok(mut tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        TlsRelay {
            port,
            mock,
            connections,
            task,
        }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }
}

impl Drop for TlsRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An https upstream that requires a client certificate signed by the test
/// CA, in front of a mock upstream.
async fn mtls_upstream(ca: &TestCa) -> TlsRelay {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(ca.roots.clone()),
        provider.clone(),
    )
    .build()
    .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(ca.server_chain.clone(), ca.server_key_der.clone_key())
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    TlsRelay::start(config).await
}

/// The `[[routes]]` of the upstream TLS tests: `/private/` with both
/// settings, `/no-cert/` without the client certificate, `/no-ca/` without
/// the CA, `/bare/` to the same upstream with neither, and `/v1/` to a plain
/// http mock (the default client).
fn mtls_routes(ca: &TestCa, upstream: &TlsRelay, plain: &str) -> String {
    let route = |name: &str, tls: &str| {
        format!(
            "[[routes]]\nname = \"{name}\"\nprefix = \"/{name}/\"\nupstream = \"{}\"\n\
             strip_prefix = true\nusage = \"openai\"\n{tls}\n",
            upstream.url()
        )
    };
    let ca_file = format!("ca_file = \"{}\"\n", ca.ca.display());
    let client_cert = format!(
        "client_cert = {{ cert = \"{}\", key = \"{}\" }}\n",
        ca.client_cert.display(),
        ca.client_key.display()
    );
    [
        route("private", &format!("{ca_file}{client_cert}")),
        route("no-cert", &ca_file),
        route("no-ca", &client_cert),
        route("bare", ""),
        format!("[[routes]]\nname = \"plain\"\nprefix = \"/v1/\"\nupstream = \"{plain}\"\nusage = \"openai\"\n"),
    ]
    .concat()
}

fn mtls_config(routes: &str) -> tollgate::config::Config {
    config(&format!(
        "[[tiers]]\nname = \"test\"\n\n[usage]\nflush_interval = \"50ms\"\n\n{routes}"
    ))
}

const CHAT: &[u8] =
    br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"one two three"}]}"#;

fn chat_request(gw: &TestGateway, path: &str) -> http::Request<Full<Bytes>> {
    gw.request(http::Method::POST, path)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(CHAT)))
        .unwrap()
}

async fn chat(gw: &TestGateway, path: &str) -> Reply {
    send(&client(), chat_request(gw, path)).await
}

/// Sends `n` requests made by `request` at once, each on a client of its
/// own; their statuses, once all have answered.
async fn burst(
    gw: &TestGateway,
    n: usize,
    request: impl Fn(&TestGateway) -> http::Request<Full<Bytes>>,
) -> Vec<StatusCode> {
    let sent: Vec<_> = (0..n)
        .map(|_| {
            let request = request(gw);
            tokio::spawn(async move { send(&client(), request).await.status })
        })
        .collect();
    let mut statuses = Vec::with_capacity(n);
    for reply in sent {
        statuses.push(reply.await.unwrap());
    }
    statuses
}

/// (route, status, outcome, input tokens) of every usage row, once `count`
/// rows are in the database.
async fn usage_rows(gw: &TestGateway, count: usize) -> Vec<(String, i64, String, i64)> {
    let path = gw
        .config
        .database
        .url
        .strip_prefix("sqlite://")
        .unwrap()
        .to_owned();
    let read = move || {
        let db = rusqlite::Connection::open(&path).unwrap();
        let mut statement = db
            .prepare("SELECT route, status, outcome, input_tokens FROM usage_events ORDER BY route")
            .unwrap();
        statement
            .query_map([], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    };
    let mut rows = Vec::new();
    eventually(Duration::from_secs(5), || {
        rows = read();
        let done = rows.len() >= count;
        async move { done }
    })
    .await;
    rows
}

#[tokio::test]
async fn a_route_with_ca_file_and_client_cert_reaches_an_mtls_upstream() {
    let ca = TestCa::new();
    let upstream = mtls_upstream(&ca).await;
    let plain = MockUpstream::start().await.unwrap();
    let gw = TestGateway::start(mtls_config(&mtls_routes(&ca, &upstream, &plain.url()))).await;

    // (a) Both settings: the handshake succeeds, the reply and its usage
    // come through.
    let reply = chat(&gw, "/private/v1/chat/completions").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["usage"]["prompt_tokens"], 3);
    let seen = upstream.mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri.path(), "/v1/chat/completions");

    // (b) No client certificate: the upstream refuses the handshake.
    let reply = chat(&gw, "/no-cert/v1/chat/completions").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.error_type(), "upstream_unavailable");

    // (c) No CA file: the upstream's certificate has an unknown issuer.
    let reply = chat(&gw, "/no-ca/v1/chat/completions").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.error_type(), "upstream_unavailable");

    // (d) Routes without settings use the default client: webpki roots
    // only, so the test CA is not trusted, while plain http works as ever.
    let reply = chat(&gw, "/bare/v1/chat/completions").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.error_type(), "upstream_unavailable");
    let reply = chat(&gw, "/v1/chat/completions").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(plain.requests().len(), 1);
    // Only the one good handshake reached the mock behind the TLS upstream.
    assert_eq!(upstream.mock.requests().len(), 1);

    let rows = usage_rows(&gw, 5).await;
    assert_eq!(
        rows,
        [
            ("bare".to_owned(), 502, "upstream_error".to_owned(), 0),
            ("no-ca".to_owned(), 502, "upstream_error".to_owned(), 0),
            ("no-cert".to_owned(), 502, "upstream_error".to_owned(), 0),
            ("plain".to_owned(), 200, "ok".to_owned(), 3),
            ("private".to_owned(), 200, "ok".to_owned(), 3),
        ]
    );
    gw.stop().await;
}

/// HTTP/2 names the host in `:authority` only: a `Host` header beside it,
/// even an equal one, is a 400 from nginx ("duplicate host header").
#[tokio::test]
async fn an_http2_upstream_gets_the_authority_and_no_host_header() {
    let ca = TestCa::new();
    let upstream = mtls_upstream(&ca).await;
    let plain = MockUpstream::start().await.unwrap();
    // A second route to the same upstream gives its own Host.
    let named = format!(
        "[[routes]]\nname = \"named\"\nprefix = \"/named/\"\nupstream = \"{}\"\n\
         strip_prefix = true\nusage = \"openai\"\nca_file = \"{}\"\n\
         client_cert = {{ cert = \"{}\", key = \"{}\" }}\n\
         set_headers = {{ host = \"api.example.test\" }}\n",
        upstream.url(),
        ca.ca.display(),
        ca.client_cert.display(),
        ca.client_key.display()
    );
    let routes = mtls_routes(&ca, &upstream, &plain.url()) + &named;
    let gw = TestGateway::start(mtls_config(&routes)).await;

    for path in ["/private/v1/chat/completions", "/named/v1/chat/completions"] {
        let reply = chat(&gw, path).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
    }
    let seen = upstream.mock.requests();
    assert_eq!(seen.len(), 2);
    let expected = [
        format!("localhost:{}", upstream.port),
        "api.example.test".to_owned(),
    ];
    for (request, authority) in seen.iter().zip(expected) {
        // ALPN chose HTTP/2 (the upstream offers it first).
        assert_eq!(request.version, Version::HTTP_2);
        assert_eq!(request.headers.get(http::header::HOST), None);
        assert_eq!(request.uri.authority().unwrap().as_str(), authority);
        assert_eq!(request.uri.path(), "/v1/chat/completions");
    }
    gw.stop().await;
}

/// A TLS listener on a free port that offers only HTTP/2 (ALPN `h2`),
/// with the test CA's server certificate: its acceptor, listener and port.
async fn h2_only_listener(
    ca: &TestCa,
) -> (tokio_rustls::TlsAcceptor, tokio::net::TcpListener, u16) {
    let config = server_config(ca, b"h2");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        listener,
        port,
    )
}

/// A TLS server's config with the test CA's server certificate, offering
/// only `alpn`.
fn server_config(ca: &TestCa, alpn: &[u8]) -> rustls::ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(ca.server_chain.clone(), ca.server_key_der.clone_key())
        .unwrap();
    config.alpn_protocols = vec![alpn.to_vec()];
    config
}

/// A `[[routes]]` entry `/{name}/` to `https://localhost:{port}`, trusting
/// the test CA, with OpenAI usage and the lines `extra`.
fn tls_route(name: &str, port: u16, ca: &TestCa, extra: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\nprefix = \"/{name}/\"\n\
         upstream = \"https://localhost:{port}\"\nstrip_prefix = true\nusage = \"openai\"\n\
         ca_file = \"{}\"\n{extra}",
        ca.ca.display()
    )
}

/// A chat completion to `/busy/` that [`ConcurrencyUpstream`] holds.
fn held_chat(gw: &TestGateway) -> http::Request<Full<Bytes>> {
    gw.request(http::Method::POST, "/busy/v1/chat/completions")
        .header("content-type", "application/json")
        .header("x-hold", "1")
        .body(Full::new(Bytes::from_static(CHAT)))
        .unwrap()
}

/// An https upstream that speaks only HTTP/2 (ALPN `h2`) and answers every
/// request with `body` under its `content-length`, sending the data at once
/// and END_STREAM, in an empty DATA frame of its own, only `end_after`
/// later.
struct LateEndUpstream {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl LateEndUpstream {
    async fn start(ca: &TestCa, body: &'static str, end_after: Duration) -> LateEndUpstream {
        let (acceptor, listener, port) = h2_only_listener(ca).await;
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let Ok(mut connection) = h2::server::handshake(tls).await else {
                        return;
                    };
                    while let Some(Ok((request, mut respond))) = connection.accept().await {
                        tokio::spawn(async move {
                            let mut upload = request.into_body();
                            while let Some(Ok(data)) = upload.data().await {
                                let _ = upload.flow_control().release_capacity(data.len());
                            }
                            let head = http::Response::builder()
                                .header("content-type", "application/json")
                                .header("content-length", body.len())
                                .body(())
                                .unwrap();
                            let Ok(mut stream) = respond.send_response(head, false) else {
                                return;
                            };
                            let _ = stream.send_data(Bytes::from_static(body.as_bytes()), false);
                            tokio::time::sleep(end_after).await;
                            let _ = stream.send_data(Bytes::new(), true);
                        });
                    }
                });
            }
        });
        LateEndUpstream { port, task }
    }
}

impl Drop for LateEndUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP/2 upstream's response is whole once its content-length has
/// arrived: the client gets its end and the row reads `ok` then, not when
/// the upstream gets round to END_STREAM (nginx sends it in a frame of its
/// own), nor `client_closed` because the client, holding every byte, hung
/// up first.
#[tokio::test]
async fn an_http2_response_ends_with_its_declared_length_not_a_late_end_stream() {
    const BODY: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-mini","usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12}}"#;
    let ca = TestCa::new();
    let upstream = LateEndUpstream::start(&ca, BODY, Duration::from_secs(30)).await;
    let routes = tls_route("late", upstream.port, &ca, "");
    let gw = TestGateway::start(mtls_config(&routes)).await;

    // Two requests, one after the other on one kept-alive connection: the
    // second goes only once the first response has ended.
    let started = std::time::Instant::now();
    let client = client();
    for _ in 0..2 {
        let reply = send(
            &client,
            gw.request(http::Method::POST, "/late/v1/chat/completions")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(CHAT)))
                .unwrap(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body, BODY.as_bytes());
    }
    // The client hangs up, holding both responses whole.
    drop(client);
    let rows = usage_rows(&gw, 2).await;
    assert_eq!(
        rows,
        [
            ("late".to_owned(), 200, "ok".to_owned(), 7),
            ("late".to_owned(), 200, "ok".to_owned(), 7),
        ]
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "{took:?}");
    gw.stop().await;
}

/// An https upstream that speaks only HTTP/2 and allows `max_streams`
/// requests at once on a connection; it holds the response to each request
/// marked `x-hold` until `hold_until` requests are in flight together (or
/// a few seconds have passed), and counts its connections and the most
/// requests it had at once. With `refuse_later`, every connection after the
/// first is held that long and then closed unanswered; with `goaway_first`,
/// the first connection is shut down (GOAWAY) after its first request.
struct ConcurrencyUpstream {
    port: u16,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    peak: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ConcurrencyUpstream {
    async fn start(
        ca: &TestCa,
        max_streams: u32,
        hold_until: usize,
        refuse_later: Option<Duration>,
        goaway_first: bool,
    ) -> ConcurrencyUpstream {
        use std::sync::atomic::{AtomicUsize, Ordering};
        const BODY: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","usage":{"prompt_tokens":1,"completion_tokens":1}}"#;
        let (acceptor, listener, port) = h2_only_listener(ca).await;
        let connections = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (enough, _) = tokio::sync::watch::channel(false);
        let enough = Arc::new(enough);
        let (counted, highest) = (connections.clone(), peak.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let nth = counted.fetch_add(1, Ordering::SeqCst) + 1;
                if let (Some(hold), true) = (refuse_later, nth > 1) {
                    tokio::spawn(async move {
                        tokio::time::sleep(hold).await;
                        drop(stream);
                    });
                    continue;
                }
                let (acceptor, highest, in_flight, enough) = (
                    acceptor.clone(),
                    highest.clone(),
                    in_flight.clone(),
                    enough.clone(),
                );
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let Ok(mut connection) = h2::server::Builder::new()
                        .max_concurrent_streams(max_streams)
                        .handshake(tls)
                        .await
                    else {
                        return;
                    };
                    while let Some(Ok((request, mut respond))) = connection.accept().await {
                        if goaway_first && nth == 1 {
                            connection.graceful_shutdown();
                        }
                        let (highest, in_flight, enough) =
                            (highest.clone(), in_flight.clone(), enough.clone());
                        tokio::spawn(async move {
                            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            highest.fetch_max(now, Ordering::SeqCst);
                            if now >= hold_until {
                                enough.send_replace(true);
                            } else if request.headers().contains_key("x-hold") {
                                let mut released = enough.subscribe();
                                let _ = tokio::time::timeout(
                                    Duration::from_secs(5),
                                    released.wait_for(|released| *released),
                                )
                                .await;
                            }
                            drop(request);
                            let head = http::Response::builder()
                                .header("content-type", "application/json")
                                .header("content-length", BODY.len())
                                .body(())
                                .unwrap();
                            if let Ok(mut stream) = respond.send_response(head, false) {
                                let _ = stream.send_data(Bytes::from_static(BODY.as_bytes()), true);
                            }
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                });
            }
        });
        ConcurrencyUpstream {
            port,
            connections,
            peak,
            task,
        }
    }
}

impl ConcurrencyUpstream {
    /// Connections accepted so far.
    fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The most requests in flight at once so far.
    fn peak(&self) -> usize {
        self.peak.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for ConcurrencyUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP/2 upstream connection carries at most 100 requests at once
/// (what RFC 9113 asks servers to allow at least); more requests open
/// another connection, as many as they need, instead of queueing behind
/// the first hundred, which for streamed completions would hold them for
/// whole responses.
#[tokio::test]
async fn requests_beyond_an_http2_connections_streams_open_another_connection() {
    const REQUESTS: usize = 150;
    let ca = TestCa::new();
    let upstream = ConcurrencyUpstream::start(&ca, 100, REQUESTS, None, false).await;
    let routes = tls_route("busy", upstream.port, &ca, "");
    let gw = TestGateway::start(mtls_config(&routes)).await;
    // One request first: the pool has its connection.
    assert_eq!(
        chat(&gw, "/busy/v1/chat/completions").await.status,
        StatusCode::OK
    );
    assert_eq!(upstream.connections(), 1);

    let started = std::time::Instant::now();
    let statuses = burst(&gw, REQUESTS, held_chat).await;
    assert_eq!(statuses, vec![StatusCode::OK; REQUESTS]);
    // All of them reached the upstream together, which held them until
    // they had: none waited for another's stream.
    assert_eq!(upstream.peak(), REQUESTS);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "{took:?}");
    // The fifty beyond the first connection's hundred waited for one more
    // connection, not one each.
    assert_eq!(upstream.connections(), 2);
    gw.stop().await;
}

/// When the connection opened for requests that found the HTTP/2 ones full
/// fails, slowly, those waiting for it do not take turns failing after it:
/// each opens its own, and all of them fail within about two attempts.
#[tokio::test]
async fn waiters_for_an_http2_connection_that_fails_do_not_fail_one_after_another() {
    const HELD: usize = 100;
    const MORE: usize = 20;
    let refuse_after = Duration::from_millis(500);
    let ca = TestCa::new();
    // The first connection's hundred streams are held (until 5 s pass);
    // every later connection hangs for half a second, then closes.
    let upstream =
        ConcurrencyUpstream::start(&ca, 100, HELD + MORE, Some(refuse_after), false).await;
    let routes = tls_route("busy", upstream.port, &ca, "");
    let gw = Arc::new(TestGateway::start(mtls_config(&routes)).await);
    assert_eq!(
        chat(&gw, "/busy/v1/chat/completions").await.status,
        StatusCode::OK
    );

    let held = |gw: &Arc<TestGateway>| {
        let gw = gw.clone();
        tokio::spawn(async move {
            let request = held_chat(&gw);
            let reply = send(&client(), request).await;
            (reply.status, std::time::Instant::now())
        })
    };
    let first: Vec<_> = (0..HELD).map(|_| held(&gw)).collect();
    // The first connection is full before the others come.
    eventually(Duration::from_secs(5), || {
        let full = upstream.peak() >= HELD;
        async move { full }
    })
    .await;
    let started = std::time::Instant::now();
    let more: Vec<_> = (0..MORE).map(|_| held(&gw)).collect();
    for request in more {
        let (status, at) = request.await.unwrap();
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        // One failed attempt to wait out, then one of its own: taking turns,
        // the last would have waited out twenty.
        let took = at - started;
        assert!(took < refuse_after * 5, "{took:?}");
    }
    for request in first {
        assert_eq!(request.await.unwrap().0, StatusCode::OK);
    }
    Arc::into_inner(gw).unwrap().stop().await;
}

/// When an HTTP/2 origin's connection closes (here by GOAWAY), the requests
/// that come before a new one is up wait for one new connection, rather
/// than open one each.
#[tokio::test]
async fn after_an_http2_connection_closes_the_next_requests_share_one_new_one() {
    const REQUESTS: usize = 50;
    let ca = TestCa::new();
    let upstream = ConcurrencyUpstream::start(&ca, 100, usize::MAX, None, true).await;
    let routes = tls_route("busy", upstream.port, &ca, "");
    let gw = TestGateway::start(mtls_config(&routes)).await;
    // The first request's connection answers it, then goes away.
    assert_eq!(
        chat(&gw, "/busy/v1/chat/completions").await.status,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(200)).await;

    let statuses = burst(&gw, REQUESTS, |gw| {
        chat_request(gw, "/busy/v1/chat/completions")
    })
    .await;
    assert_eq!(statuses, vec![StatusCode::OK; REQUESTS]);
    assert_eq!(upstream.connections(), 2);
    gw.stop().await;
}

/// A cold gateway (no connection to the origin yet) that meets a burst of
/// requests to an https origin opens one connection, not one each: they
/// wait for the first to tell, by ALPN, that the origin speaks HTTP/2, and
/// share it.
#[tokio::test]
async fn a_burst_on_a_cold_http2_origin_shares_one_connection() {
    const REQUESTS: usize = 50;
    let ca = TestCa::new();
    let upstream = ConcurrencyUpstream::start(&ca, 100, REQUESTS, None, false).await;
    let routes = tls_route("busy", upstream.port, &ca, "");
    let gw = TestGateway::start(mtls_config(&routes)).await;
    let statuses = burst(&gw, REQUESTS, held_chat).await;
    assert_eq!(statuses, vec![StatusCode::OK; REQUESTS]);
    // Held until all had arrived: they were in flight together.
    assert_eq!(upstream.peak(), REQUESTS);
    assert_eq!(upstream.connections(), 1);
    gw.stop().await;
}

/// The same burst on a cold https origin that speaks only HTTP/1.1: once
/// the first connection has told so, each request opens its own, and all
/// of them run at once, none after another's response.
#[tokio::test]
async fn a_burst_on_a_cold_http1_origin_runs_at_once_on_a_connection_each() {
    const REQUESTS: usize = 10;
    const STREAM: &[u8] =
        br#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"one"}]}"#;
    let ca = TestCa::new();
    let upstream = TlsRelay::start(server_config(&ca, b"http/1.1")).await;
    let routes = tls_route("slow", upstream.port, &ca, "");
    let gw = TestGateway::start(mtls_config(&routes)).await;
    let started = std::time::Instant::now();
    // Three chunks half a second apart: a second each.
    let statuses = burst(&gw, REQUESTS, |gw| {
        gw.request(http::Method::POST, "/slow/v1/chat/completions")
            .header("content-type", "application/json")
            .header("x-mock-chunks", "3")
            .header("x-mock-chunk-delay-ms", "500")
            .body(Full::new(Bytes::from_static(STREAM)))
            .unwrap()
    })
    .await;
    assert_eq!(statuses, vec![StatusCode::OK; REQUESTS]);
    // One after another, they would take ten seconds.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert_eq!(
        upstream
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        REQUESTS
    );
    assert_eq!(upstream.mock.requests().len(), REQUESTS);
    gw.stop().await;
}

/// An https upstream that takes the TCP connection and never answers the
/// TLS handshake: the connect timeout (10 s) covers the handshake too, so
/// the requests fail as a connection failure then, not at the route's
/// timeout. They come together to a cold gateway, so all but the first wait
/// for the first's connection: when it times out, so have they, rather
/// than each trying for another 10 s.
#[tokio::test]
async fn a_tls_handshake_that_never_ends_fails_within_the_connect_timeout() {
    const REQUESTS: usize = 5;
    let ca = TestCa::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let routes = tls_route("silent", port, &ca, "timeout = \"40s\"\n");
    let gw = Arc::new(TestGateway::start(mtls_config(&routes)).await);
    let started = std::time::Instant::now();
    let requests: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let gw = gw.clone();
            tokio::spawn(async move {
                let reply = chat(&gw, "/silent/v1/chat/completions").await;
                (reply, started.elapsed())
            })
        })
        .collect();
    for request in requests {
        let (reply, took) = request.await.unwrap();
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
        assert_eq!(reply.error_type(), "upstream_unavailable");
        assert!(
            (Duration::from_secs(9)..Duration::from_secs(15)).contains(&took),
            "{took:?}"
        );
    }
    let rows = usage_rows(&gw, REQUESTS).await;
    assert_eq!(
        rows,
        vec![("silent".to_owned(), 502, "upstream_error".to_owned(), 0); REQUESTS]
    );
    silent.abort();
    Arc::into_inner(gw).unwrap().stop().await;
}

#[tokio::test]
async fn a_reload_applies_changed_upstream_tls_and_a_bad_file_changes_nothing() {
    let ca = TestCa::new();
    let upstream = mtls_upstream(&ca).await;
    let plain = MockUpstream::start().await.unwrap();
    let path = ca.dir.path().join("tollgate.toml");
    let routes = mtls_routes(&ca, &upstream, &plain.url());
    // The route starts without its client certificate.
    let without_cert = routes.replacen(
        &format!(
            "client_cert = {{ cert = \"{}\", key = \"{}\" }}\n",
            ca.client_cert.display(),
            ca.client_key.display()
        ),
        "",
        1,
    );
    let file = |routes: &str| {
        format!("[[tiers]]\nname = \"test\"\n\n[usage]\nflush_interval = \"50ms\"\n\n{routes}")
    };
    std::fs::write(&path, file(&without_cert)).unwrap();
    let mut config = mtls_config(&without_cert);
    config.source = Some(path.clone());
    let gw = TestGateway::start(config).await;
    let reloader = gw.running.as_ref().unwrap().reloader().clone();
    let reply = chat(&gw, "/private/v1/chat/completions").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);

    // The certificate is added: the route gets a client that presents it.
    std::fs::write(&path, file(&routes)).unwrap();
    let report = reloader.apply_file().unwrap();
    assert_eq!(report.changed.routes.changed, ["private"]);
    let reply = chat(&gw, "/private/v1/chat/completions").await;
    assert_eq!(reply.status, StatusCode::OK);

    // A CA file that is gone: the reload is refused with the line and key,
    // and the route keeps working on what it had.
    let missing = ca.dir.path().join("gone.pem");
    let broken = routes.replacen(
        &format!("ca_file = \"{}\"", ca.ca.display()),
        &format!("ca_file = \"{}\"", missing.display()),
        1,
    );
    std::fs::write(&path, file(&broken)).unwrap();
    let error = reloader.apply_file().unwrap_err().to_string();
    let line = file(&broken)
        .lines()
        .position(|line| line.contains("gone.pem"))
        .unwrap()
        + 1;
    assert!(
        error.starts_with(&format!(
            "{}:{line}:11: routes[0].ca_file: cannot read TLS certificate {}: ",
            path.display(),
            missing.display()
        )),
        "{error}"
    );
    let reply = chat(&gw, "/private/v1/chat/completions").await;
    assert_eq!(reply.status, StatusCode::OK);
    gw.stop().await;
}

// ---- admin listener over TLS --------------------------------------------------

#[tokio::test]
async fn the_admin_listener_serves_https_with_admin_tls() {
    let ca = TestCa::new();
    let mut config =
        config("[admin]\ntokens = [\"${TOLLGATE_ADMIN_TOKEN}\"]\n\n[[tiers]]\nname = \"test\"\n");
    config.admin.tls = Some(tollgate::config::TlsConfig {
        cert: ca.server_cert.clone(),
        key: ca.server_key.clone(),
    });
    let gw = TestGateway::start(config).await;
    let port = gw.admin.port();
    let tls = Tls {
        _dir: tempfile::tempdir().unwrap(),
        cert_path: ca.server_cert.clone(),
        key_path: ca.server_key.clone(),
        roots: ca.roots.clone(),
    };
    for h2 in [false, true] {
        let client = tls_client(&tls, h2);
        let health = client
            .request(
                Request::get(format!("https://localhost:{port}/healthz"))
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(health.status(), StatusCode::OK);
        let customers = client
            .request(
                Request::get(format!("https://localhost:{port}/v1/customers"))
                    .header("authorization", "Bearer admin-test-token")
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(customers.status(), StatusCode::OK);
        let body = customers.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(json.to_string().contains("\"test\""), "{json}");
    }
    // Plain http gets no HTTP answer from a TLS listener.
    let plain = client()
        .request(
            Request::get(format!("http://127.0.0.1:{port}/healthz"))
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert!(plain.is_err(), "plain http answered: {plain:?}");
    // The data plane is still plain http.
    assert_eq!(get(&gw.url("/healthz")).await.status, StatusCode::NOT_FOUND);
    gw.stop().await;
}

#[tokio::test]
async fn a_bad_admin_certificate_is_a_clear_start_error() {
    let dir = tempfile::tempdir().unwrap();
    let cert = write_file(dir.path(), "admin.pem", "not a certificate");
    let key = write_file(dir.path(), "admin.key", "not a key");
    let mut config = route_config("http://127.0.0.1:1", "");
    config.database.url = format!("sqlite://{}/tollgate.db", dir.path().display());
    config.usage.spool_dir = dir.path().join("spool");
    config.admin.tls = Some(tollgate::config::TlsConfig { cert, key });
    let error = match tollgate::app::start(config).await {
        Ok(_) => panic!("a gateway with a bad admin certificate must not start"),
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("admin.tls"), "{error}");
    assert!(error.contains("admin.pem"), "{error}");
}
