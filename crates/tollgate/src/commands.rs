//! What each command does, and how its outcome becomes an exit code
//! (README, Commands: 0 success, 1 runtime error, 2 usage or config error).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;

use tollgate_accounts::ReportParams;

use crate::cli::{Cli, Command};
use crate::config::{Config, ConfigError};
use crate::{app, manage, shutdown};

/// The config file used when neither `--config` nor `$TOLLGATE_CONFIG` names one.
pub const DEFAULT_CONFIG_PATH: &str = "config/tollgate.toml";

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve => {
            let (config, origin) = load_config(cli.config.as_deref())?;
            match &origin {
                Some(path) => tracing::info!(message = "Config loaded.", path = %path.display()),
                None => tracing::info!(
                    message = "No config file found; using built-in defaults.",
                    looked_for = DEFAULT_CONFIG_PATH
                ),
            }
            serve(config)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig => {
            let (config, origin) = load_config(cli.config.as_deref())?;
            let origin = origin.map_or_else(
                || "built-in defaults".to_owned(),
                |path| path.display().to_string(),
            );
            println!(
                "{origin}: ok ({} routes, {} tiers, {} priced models)",
                config.routes.len(),
                config.tiers.len(),
                config.pricing.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let (config, _) = load_config(cli.config.as_deref())?;
            runtime(1)?.block_on(async {
                let store = tollgate_store::open(&config.database.url, config.database.pool_size)
                    .await
                    .context("cannot open the database")?;
                let report = store.migrate().await.context("migration failed")?;
                println!(
                    "schema at version {} ({} migrations applied)",
                    report.current,
                    report.applied.len()
                );
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Customers(command) => {
            let (config, _) = load_config(cli.config.as_deref())?;
            runtime(1)?.block_on(manage::customers(&config, command))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(command) => {
            let (config, _) = load_config(cli.config.as_deref())?;
            runtime(1)?.block_on(manage::keys(&config, command))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Usage {
            customer,
            from,
            to,
            by,
            json,
        } => {
            let (config, _) = load_config(cli.config.as_deref())?;
            let params = ReportParams { from, to, customer };
            runtime(1)?.block_on(manage::usage(&config, params, by, json))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Billing(command) => {
            let (config, _) = load_config(cli.config.as_deref())?;
            runtime(1)?.block_on(manage::billing(&config, command))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::MockUpstream {
            listen,
            webhook_secret,
            webhook_listen,
        } => {
            let runtime = runtime(0)?;
            runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen}"))?;
                tracing::info!(message = "Mock upstream listening.", addr = %listener.local_addr()?);
                if let Some(secret) = webhook_secret {
                    let receiver = tollgate_mock::WebhookReceiver::start_on(webhook_listen, &secret)
                        .await
                        .with_context(|| format!("cannot receive webhooks on {webhook_listen}"))?;
                    tracing::info!(message = "Webhook receiver listening.", url = receiver.url());
                    tokio::spawn(print_webhooks(receiver));
                }
                tollgate_mock::serve(listener, shutdown::signal()).await?;
                Ok(ExitCode::SUCCESS)
            })
        }
    }
}

/// Prints each webhook delivery the receiver gets, as one JSON line on
/// stdout, until the process ends.
async fn print_webhooks(receiver: tollgate_mock::WebhookReceiver) {
    let mut printed = 0;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let received = receiver.received();
        for delivery in received.iter().skip(printed) {
            let line = serde_json::json!({
                "webhook_id": delivery.id,
                "signature_valid": delivery.valid,
                "type": delivery.event_type,
                "data": delivery.body.get("data"),
            });
            println!("{line}");
        }
        printed = received.len();
    }
}

/// Loads the config named by `--config`, else `$TOLLGATE_CONFIG`, else the
/// default path; with no file named and none at the default path, the
/// built-in defaults. Returns the file used, if any.
pub fn load_config(flag: Option<&Path>) -> Result<(Config, Option<PathBuf>), ConfigError> {
    let named = flag
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("TOLLGATE_CONFIG").map(PathBuf::from));
    let path = match named {
        Some(path) => path,
        None => {
            let default = PathBuf::from(DEFAULT_CONFIG_PATH);
            if !default.exists() {
                return Ok((Config::default(), None));
            }
            default
        }
    };
    let config = Config::load(&path)?;
    Ok((config, Some(path)))
}

fn serve(config: Config) -> anyhow::Result<()> {
    let runtime = runtime(config.server.worker_threads)?;
    runtime.block_on(async {
        // Listen for SIGHUP before anything else, so that one arriving
        // during start-up is not fatal (its default action).
        let hangups = shutdown::hangups();
        let running = app::start(config).await?;
        let reloader = running.reloader().clone();
        let reload = move || {
            let reloader = reloader.clone();
            // Blocking work; reloads are serialized inside the reloader.
            tokio::task::spawn_blocking(move || reloader.reload_and_log());
        };
        tokio::select! {
            () = shutdown::signal() => {}
            () = shutdown::reloads(hangups, reload) => {}
        }
        tracing::info!(message = "Shutdown requested; draining in-flight requests.");
        running.stop().await;
        tracing::info!(message = "Stopped.");
        Ok(())
    })
}

/// A multi-threaded runtime with `worker_threads` workers (0 = one per core).
pub fn runtime(worker_threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 0 {
        builder.worker_threads(worker_threads);
    }
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// The error as one line: the whole cause chain, joined.
pub fn one_line(error: &anyhow::Error) -> String {
    format!("{error:#}").replace('\n', " ")
}

/// 2 for config and usage errors, 1 for everything else.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    if error
        .chain()
        .any(|cause| cause.is::<ConfigError>() || cause.is::<manage::UsageError>())
    {
        2
    } else {
        1
    }
}
