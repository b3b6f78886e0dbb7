//! TLS termination: HTTP/2 negotiated by ALPN and HTTP/1.1 over TLS, with a
//! self-signed certificate made by the test.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

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
    config.server.tls = Some(tollgate::config::TlsConfig { cert, key });
    let error = match tollgate::app::start(config).await {
        Ok(_) => panic!("a gateway with a bad certificate must not start"),
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("bad.pem"), "{error}");
    assert!(error.contains("no certificate"), "{error}");
}
