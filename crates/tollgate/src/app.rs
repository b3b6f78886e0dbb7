//! Wiring: a validated [`Config`] becomes running servers.
//!
//! [`start`] binds the listeners and spawns the data plane and the admin
//! server; [`Running::stop`] closes the listeners and drains in-flight
//! requests. Tests use the same two calls in-process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper::service::service_fn;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tollgate_proxy::{
    serve, AdminState, Gateway, GatewaySettings, RouteSpec, RouteTable, ServerOptions,
};

use crate::config::{Config, RouteConfig};

/// How long in-flight requests may run after shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// A gateway that is serving.
pub struct Running {
    data_addr: SocketAddr,
    admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// The data plane's bound address (useful when configured with port 0).
    pub fn data_addr(&self) -> SocketAddr {
        self.data_addr
    }

    /// The admin listener's bound address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Closes the listeners and waits for in-flight requests (up to the grace).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            if let Err(error) = task.await {
                tracing::error!(message = "A server task failed.", %error);
            }
        }
    }
}

/// Starts the data plane and the admin server.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let routes =
        RouteTable::new(config.routes.iter().map(route_spec).collect()).context("invalid route")?;
    let client = tollgate_proxy::forward::upstream_client()
        .context("cannot set up TLS for upstream connections")?;
    let gateway = Arc::new(Gateway::new(
        routes,
        client,
        GatewaySettings {
            max_request_body: config.server.max_request_body,
        },
    ));
    let tls = match &config.server.tls {
        Some(tls) => Some(tollgate_proxy::tls::acceptor(&tls.cert, &tls.key)?),
        None => None,
    };
    let options = ServerOptions {
        header_timeout: config.server.request_header_timeout,
        shutdown_grace: SHUTDOWN_GRACE,
    };

    let data_listener = bind(config.server.listen, "data plane").await?;
    let admin_listener = bind(config.server.admin_listen, "admin").await?;
    let data_addr = data_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let (stop, stopped) = watch::channel(false);

    let data_task = tokio::spawn(serve(
        data_listener,
        tls.clone(),
        options.clone(),
        move |conn| {
            let gateway = gateway.clone();
            service_fn(move |request| gateway.clone().handle(request, conn.clone()))
        },
        wait_for(stopped.clone()),
    ));
    let admin = AdminState::default();
    let admin_state = admin.clone();
    let admin_task = tokio::spawn(serve(
        admin_listener,
        None,
        options,
        move |_conn| {
            let admin = admin_state.clone();
            service_fn(move |request| admin.clone().handle(request))
        },
        wait_for(stopped),
    ));
    admin.set_ready(true);
    tracing::info!(
        message = "Data plane listening.",
        addr = %data_addr,
        tls = tls.is_some(),
        routes = config.routes.len(),
    );
    tracing::info!(message = "Admin listening.", addr = %admin_addr);
    Ok(Running {
        data_addr,
        admin_addr,
        stop,
        tasks: vec![data_task, admin_task],
    })
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({what})"))
}

async fn wait_for(mut stopped: watch::Receiver<bool>) {
    // An error means the sender is gone, which also means stop.
    let _ = stopped.wait_for(|stop| *stop).await;
}

fn route_spec(route: &RouteConfig) -> RouteSpec {
    RouteSpec {
        name: route.name.clone(),
        prefix: route.prefix.clone(),
        upstream: route.upstream.clone(),
        strip_prefix: route.strip_prefix,
        timeout: route.timeout,
        set_headers: route.set_headers.clone(),
        strip_response_headers: route.strip_response_headers.clone(),
    }
}
