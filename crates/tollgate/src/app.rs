//! Wiring: a validated [`Config`] becomes running servers.
//!
//! [`start`] replays the usage spool, loads the keys, binds the listeners
//! and spawns the data plane and the admin server; [`Running::stop`] closes
//! the listeners, drains in-flight requests and then flushes every usage
//! row. Tests use the same two calls in-process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper::service::service_fn;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tollgate_accounts::Accounts;
use tollgate_console::{Console, ConsoleParts, GatewayStatus};
use tollgate_metering::keys::KeyFormat;
use tollgate_metering::keys::{run_feed, KeyCache};
use tollgate_metering::limits::Policies;
use tollgate_metering::limits::{Clock, Limiter, Limits, SystemClock};
use tollgate_metering::usage::recorder::{
    self, CommitHook, RecorderConfig, RecorderHandle, RecorderStats,
};
use tollgate_metering::Store;
use tollgate_proxy::{
    serve, Admin, Authenticator, Gateway, GatewaySettings, Metering, Metrics, Outbox,
    ServerOptions, TlsAcceptor, Webhooks,
};

use crate::background;
use crate::config::{Config, SpoolFullPolicy};
use crate::reload::Reloader;
use crate::snapshot::{webhook_endpoints, Catalog, Snapshot};

/// How long in-flight requests may run after shutdown begins. Saving their
/// usage rows may then take up to [`recorder::SHUTDOWN_GRACE`] more.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// A gateway that is serving.
pub struct Running {
    data_addr: SocketAddr,
    admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    keys: Arc<KeyCache>,
    recorder: RecorderHandle,
    metering: Arc<Metering>,
    reloader: Arc<Reloader>,
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

    /// The key cache the data plane authenticates against.
    pub fn keys(&self) -> &Arc<KeyCache> {
        &self.keys
    }

    /// Metering state shared with the data plane (recorder counters).
    pub fn metering(&self) -> &Arc<Metering> {
        &self.metering
    }

    /// Re-reads the config file (what SIGHUP does).
    pub fn reloader(&self) -> &Arc<Reloader> {
        &self.reloader
    }

    /// Closes the listeners, waits for in-flight requests (up to the
    /// grace), then flushes every usage row to the spool and the database
    /// (up to [`recorder::SHUTDOWN_GRACE`]).
    pub async fn stop(self) {
        self.stop_within(recorder::SHUTDOWN_GRACE).await;
    }

    /// [`Running::stop`], giving the usage rows `usage_grace` to be saved.
    pub async fn stop_within(self, usage_grace: Duration) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            if let Err(error) = task.await {
                tracing::error!(message = "A server task failed.", %error);
            }
        }
        for task in self.background {
            task.abort();
        }
        self.recorder.shutdown(usage_grace).await;
    }
}

/// Opens the configured database and, unless `database.migrate = false`,
/// applies pending migrations; with it, checks that the schema is this
/// binary's.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let store = tollgate_store::open(&config.database.url, config.database.pool_size)
        .await
        .context("cannot open the database")?;
    if config.database.migrate {
        let report = store
            .migrate()
            .await
            .context("cannot apply database migrations")?;
        if !report.applied.is_empty() {
            tracing::info!(
                message = "Database migrated.",
                applied = ?report.applied,
                version = report.current
            );
        }
    } else {
        store
            .check_schema()
            .await
            .context("cannot use the database (database.migrate = false)")?;
    }
    Ok(store)
}

/// Opens the database and starts the data plane and the admin server.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let store = open_store(&config).await?;
    start_with_store(config, store).await
}

/// Starts serving on an opened store: replays the usage spool, loads every
/// key, starts the change feed, then opens the listeners (so a request is
/// never authenticated against a half-loaded cache).
pub async fn start_with_store(config: Config, store: Arc<dyn Store>) -> anyhow::Result<Running> {
    start_with_clock(config, store, Arc::new(SystemClock)).await
}

/// Admin tokens are bearer secrets tried without any limit on attempts:
/// one that could be guessed is a way in to keys and bills.
const SHORT_ADMIN_TOKEN: usize = 24;

fn warn_of_short_admin_tokens(tokens: &[String]) {
    for (index, token) in tokens.iter().enumerate() {
        let length = token.chars().count();
        if length < SHORT_ADMIN_TOKEN {
            tracing::warn!(
                message = "An admin token is short enough to be guessed; use at least 32 random characters (openssl rand -hex 32).",
                token = format!("admin.tokens[{index}]"),
                characters = length,
            );
        }
    }
}

/// As [`start_with_store`], with the clock the limits' periods and windows
/// follow (tests move it by hand).
pub async fn start_with_clock(
    config: Config,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Running> {
    warn_of_short_admin_tokens(&config.admin.tokens);
    // The listeners' certificates are read first: a bad one stops the
    // start before the spool is replayed or anything else is opened.
    let tls = acceptor(config.server.tls.as_ref(), "the data plane (server.tls)")?;
    let admin_tls = acceptor(config.admin.tls.as_ref(), "the admin listener (admin.tls)")?;
    let metrics = Arc::new(Metrics::new());
    // The same snapshot a reload builds: routes and prices for the data
    // plane, the catalog for the accounting side and the admin API.
    let Snapshot { live, catalog } = Snapshot::build(&config, &metrics, None)?;
    let client =
        tollgate_proxy::upstream_client().context("cannot set up TLS for upstream connections")?;
    let Accounting {
        recorder,
        policies,
        sync,
    } = start_accounting(&config, catalog.tiers.clone(), &store, &clock, &metrics).await?;
    let metering = Arc::new(Metering::new(
        recorder.recorder(),
        policies.clone(),
        config.server.instance_id.clone(),
        metrics.clone(),
        config.server.access_log,
    ));
    let (keys, feed) = load_keys(&store, &policies).await?;
    metrics.watch(recorder.recorder().stats().clone(), keys.clone());
    let upkeep = background::spawn_upkeep(metrics.clone());
    let auth = Authenticator::new(
        keys.clone(),
        KeyFormat::new(&config.keys.prefix),
        config.keys.headers.clone(),
    );
    let settings = gateway_settings(&config);
    let gateway = Arc::new(Gateway::new(live, auth, client, settings, metering.clone()));
    let (options, admin_options) = server_options(&config, &metrics);

    let data_listener = bind(config.server.listen, "data plane").await?;
    let admin_listener = bind(config.server.admin_listen, "admin").await?;
    let data_addr = data_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let (stop, stopped) = watch::channel(false);

    let data_task = tokio::spawn(serve_data(
        data_listener,
        tls.clone(),
        options,
        gateway.clone(),
        stopped.clone(),
    ));
    let status = gateway_status(&config, recorder.recorder().stats().clone(), keys.clone());
    let (webhooks, webhook_tasks) = start_webhooks(&config, &store, &metrics, &policies)?;
    let (admin, reloader) = admin_api(
        &config,
        catalog,
        &store,
        &clock,
        AdminParts {
            gateway,
            policies,
            metrics,
            status,
            webhooks,
        },
    );
    let admin_task = tokio::spawn(serve_admin(
        admin_listener,
        admin_tls.clone(),
        admin_options,
        admin.clone(),
        stopped,
    ));
    admin.set_ready(true);
    tracing::info!(
        message = "Data plane listening.",
        addr = %data_addr,
        tls = tls.is_some(),
        routes = config.routes.len(),
    );
    tracing::info!(message = "Admin listening.", addr = %admin_addr, tls = admin_tls.is_some());
    Ok(Running {
        data_addr,
        admin_addr,
        stop,
        tasks: vec![data_task, admin_task],
        background: [feed, sync, upkeep]
            .into_iter()
            .chain(webhook_tasks)
            .collect(),
        keys,
        recorder,
        metering,
        reloader,
    })
}

/// Every key from the database into a new cache, and the feed that keeps
/// it current from then on.
async fn load_keys(
    store: &Arc<dyn Store>,
    policies: &Arc<Policies>,
) -> anyhow::Result<(Arc<KeyCache>, JoinHandle<()>)> {
    let keys = Arc::new(KeyCache::new());
    let loaded = keys
        .reload(&**store, policies)
        .await
        .context("cannot load API keys from the database")?;
    // The keys' own limits are known now: their totals too.
    policies
        .limiter()
        .sync(&**store)
        .await
        .context("cannot load this month's usage totals from the database")?;
    tracing::info!(message = "API keys loaded.", keys = loaded);
    let feed = tokio::spawn(run_feed(store.clone(), keys.clone(), policies.clone()));
    Ok((keys, feed))
}

/// The accounting side, started in the order correctness needs.
struct Accounting {
    recorder: RecorderHandle,
    policies: Arc<Policies>,
    /// The periodic totals sync.
    sync: JoinHandle<()>,
}

/// Starts the usage recorder (replaying the spool), then loads customers
/// and this month's totals, then starts the periodic sync: the totals are
/// read after the replay, so they include every row an earlier run
/// recorded.
async fn start_accounting(
    config: &Config,
    tiers: HashMap<String, Limits>,
    store: &Arc<dyn Store>,
    clock: &Arc<dyn Clock>,
    metrics: &Metrics,
) -> anyhow::Result<Accounting> {
    let limiter = Arc::new(Limiter::new(clock.clone()));
    let committed: CommitHook = {
        let limiter = limiter.clone();
        Arc::new(move |batch| limiter.committed(batch))
    };
    let recorder_config = RecorderConfig {
        flush_metrics: metrics.flush_metrics(),
        ..recorder_config(config)
    };
    let recorder = recorder::start_on_own_thread(recorder_config, store.clone(), Some(committed))
        .await
        .context("cannot start usage recording")?;
    let policies = Arc::new(Policies::new(tiers, limiter.clone()));
    let customers = policies
        .reload(&**store)
        .await
        .context("cannot load customers from the database")?;
    limiter
        .sync(&**store)
        .await
        .context("cannot load this month's usage totals from the database")?;
    tracing::info!(
        message = "Customer limits and usage totals loaded.",
        customers
    );
    let sync = tokio::spawn(background::run_sync(
        store.clone(),
        limiter.clone(),
        config.usage.sync_interval,
    ));
    Ok(Accounting {
        recorder,
        policies,
        sync,
    })
}

/// The data plane's per-request bounds.
fn gateway_settings(config: &Config) -> GatewaySettings {
    GatewaySettings {
        max_request_body: config.server.max_request_body,
        request_body_timeout: config.server.request_body_timeout,
        max_header_bytes: config.server.max_header_bytes,
    }
}

/// The webhook outbox, its sender and the scans that feed it.
fn start_webhooks(
    config: &Config,
    store: &Arc<dyn Store>,
    metrics: &Metrics,
    policies: &Arc<Policies>,
) -> anyhow::Result<(Arc<Webhooks>, Vec<JoinHandle<()>>)> {
    let outbox = Arc::new(Outbox::new(store.clone(), webhook_endpoints(config)));
    let webhooks = Arc::new(
        Webhooks::new(outbox, metrics).context("cannot set up TLS for webhook deliveries")?,
    );
    let tasks = webhooks.start(policies.clone());
    Ok((webhooks, tasks))
}

/// What the admin listener shares with the data plane.
struct AdminParts {
    gateway: Arc<Gateway>,
    policies: Arc<Policies>,
    metrics: Arc<Metrics>,
    status: Arc<dyn Fn() -> GatewayStatus + Send + Sync>,
    webhooks: Arc<Webhooks>,
}

/// The console's view of how the gateway is doing.
fn gateway_status(
    config: &Config,
    stats: Arc<RecorderStats>,
    keys: Arc<KeyCache>,
) -> Arc<dyn Fn() -> GatewayStatus + Send + Sync> {
    let instance = config.server.instance_id.clone();
    Arc::new(move || GatewayStatus {
        database_up: stats.database_up.load(Ordering::Relaxed),
        pending_rows: stats.pending.load(Ordering::Relaxed),
        spool_bytes: stats.spool_bytes.load(Ordering::Relaxed),
        keys_cached: keys.len(),
        instance: instance.clone(),
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// The admin API and the console over the same accounts, reports and
/// policies as the data plane, and the reloader both SIGHUP and `POST
/// /v1/reload` use.
fn admin_api(
    config: &Config,
    catalog: Catalog,
    store: &Arc<dyn Store>,
    clock: &Arc<dyn Clock>,
    parts: AdminParts,
) -> (Arc<Admin>, Arc<Reloader>) {
    let AdminParts {
        gateway,
        policies,
        metrics,
        status,
        webhooks,
    } = parts;
    let accounts = Arc::new(Accounts::new(
        store.clone(),
        KeyFormat::new(&config.keys.prefix),
        catalog.view,
    ));
    let reports = Arc::new(tollgate_accounts::Reports::new(
        store.clone(),
        catalog.tiers,
        clock.clone(),
    ));
    reports.announce_closes_to(webhooks.outbox().clone());
    let reloader = Arc::new(Reloader::new(
        config.clone(),
        gateway,
        policies.clone(),
        reports.clone(),
        accounts.clone(),
        metrics.clone(),
        webhooks.outbox().clone(),
    ));
    let console = Arc::new(Console::new(ConsoleParts {
        accounts: accounts.clone(),
        reports: reports.clone(),
        policies: policies.clone(),
        tokens: config.admin.tokens.clone(),
        session_ttl: config.admin.session_ttl,
        secure: config.admin.tls.is_some(),
        status,
        deliveries: webhooks,
    }));
    let admin = Arc::new(Admin::new(
        accounts,
        policies,
        reports,
        &config.admin.tokens,
        metrics,
        reloader.clone(),
        console,
    ));
    (admin, reloader)
}

/// A TLS acceptor for a listener, if it has TLS.
fn acceptor(
    tls: Option<&crate::config::TlsConfig>,
    what: &str,
) -> anyhow::Result<Option<TlsAcceptor>> {
    tls.map(|tls| {
        tollgate_proxy::acceptor(&tls.cert, &tls.key)
            .with_context(|| format!("cannot set up TLS on {what}"))
    })
    .transpose()
}

/// The data plane's and the admin listener's connection settings: the
/// same timeouts, a budget each.
fn server_options(config: &Config, metrics: &Metrics) -> (ServerOptions, ServerOptions) {
    let budgets = crate::descriptors::budgets(config.server.max_connections);
    let data = ServerOptions {
        header_timeout: config.server.request_header_timeout,
        idle_timeout: config.server.idle_timeout,
        max_connections: budgets.data,
        max_header_bytes: config.server.max_header_bytes,
        shutdown_grace: SHUTDOWN_GRACE,
        open_connections: metrics.open_connections("data"),
    };
    let admin = ServerOptions {
        max_connections: budgets.admin,
        open_connections: metrics.open_connections("admin"),
        ..data.clone()
    };
    (data, admin)
}

/// Serves the data plane until `stopped`, then drains.
async fn serve_data(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    options: ServerOptions,
    gateway: Arc<Gateway>,
    stopped: watch::Receiver<bool>,
) {
    let make_service = move |conn: tollgate_proxy::ConnInfo| {
        let gateway = gateway.clone();
        // Boxed: the request's future is some 3 KB, and hyper moves it
        // several times before it first runs (into the connection, and on
        // HTTP/2 into a task of its own); boxed, it is copied once.
        service_fn(move |request| Box::pin(gateway.clone().handle(request, conn.clone())))
    };
    serve(listener, tls, options, make_service, wait_for(stopped)).await;
}

/// Serves the admin API, `/metrics` and the health endpoints until
/// `stopped`, then drains.
async fn serve_admin(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    options: ServerOptions,
    admin: Arc<Admin>,
    stopped: watch::Receiver<bool>,
) {
    let make_service = move |conn: tollgate_proxy::ConnInfo| {
        let admin = admin.clone();
        service_fn(move |request| admin.clone().handle(request, conn.clone()))
    };
    serve(listener, tls, options, make_service, wait_for(stopped)).await;
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

fn recorder_config(config: &Config) -> RecorderConfig {
    RecorderConfig {
        batch_size: config.usage.batch_size,
        flush_interval: config.usage.flush_interval,
        spool_dir: config.usage.spool_dir.clone(),
        spool_max: config.usage.spool_max,
        reject_when_full: config.usage.on_spool_full == SpoolFullPolicy::Reject,
        flush_metrics: Default::default(),
    }
}
