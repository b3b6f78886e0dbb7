//! The framework's floor: a plain reverse proxy on hyper and tokio, with
//! none of the gateway's work (no key, no limits, no metering, no header
//! rules). `benches/passthrough.sh` and `benches/instructions.sh` run it
//! beside Tollgate and nginx, so that one run shows what the gateway's own
//! work costs (Tollgate against this) apart from what its HTTP stack costs
//! (this against nginx).
//!
//! It is what a hyper proxy looks like when written the plain way: hyper's
//! HTTP/1.1 server, hyper-util's pooled client (keep-alive,
//! `TCP_NODELAY`), `X-Forwarded-For` set as nginx and the gateway set it,
//! one tokio worker and jemalloc, as the benchmarks run the gateway.
//!
//! ```text
//! cargo build --release --example hyper_proxy
//! target/release/examples/hyper_proxy 127.0.0.1:8080 http://127.0.0.1:9000
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;

use http::header::{HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{Either, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

type Body = Either<Incoming, Empty<Bytes>>;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream), None) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: hyper_proxy LISTEN-ADDRESS UPSTREAM-ORIGIN (e.g. 127.0.0.1:8080 http://127.0.0.1:9000)");
        return ExitCode::from(2);
    };
    let Ok(listen) = listen.parse::<SocketAddr>() else {
        eprintln!("hyper_proxy: {listen:?} is not an address such as 127.0.0.1:8080");
        return ExitCode::from(2);
    };
    let upstream = upstream.trim_end_matches('/').to_owned();
    let is_origin = |uri: Uri| uri.scheme_str() == Some("http") && uri.host().is_some();
    if !upstream.parse::<Uri>().is_ok_and(is_origin) {
        eprintln!("hyper_proxy: {upstream:?} is not an http origin such as http://127.0.0.1:9000");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("hyper_proxy: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(listen, upstream)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hyper_proxy: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(listen: SocketAddr, upstream: String) -> std::io::Result<()> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of descriptors, say: the next accept may succeed.
            Err(_) => continue,
        };
        // A connection without it is only slower.
        let _ = stream.set_nodelay(true);
        let forwarded_for = HeaderValue::try_from(peer.ip().to_string()).ok();
        let client = client.clone();
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                forward(client.clone(), &upstream, forwarded_for.clone(), request)
            });
            // A connection's errors are its client's business.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn forward(
    client: Client<HttpConnector, Incoming>,
    upstream: &str,
    forwarded_for: Option<HeaderValue>,
    mut request: Request<Incoming>,
) -> impl std::future::Future<Output = Result<Response<Body>, Infallible>> {
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |path| path.as_str());
    let uri = format!("{upstream}{path}").parse::<Uri>();
    if let Some(address) = forwarded_for {
        request
            .headers_mut()
            .append(X_FORWARDED_FOR.clone(), address);
    }
    async move {
        let Ok(uri) = uri else {
            return Ok(status(StatusCode::BAD_REQUEST));
        };
        *request.uri_mut() = uri;
        Ok(match client.request(request).await {
            Ok(response) => response.map(Either::Left),
            Err(_) => status(StatusCode::BAD_GATEWAY),
        })
    }
}

fn status(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Either::Right(Empty::new()));
    *response.status_mut() = status;
    response
}
