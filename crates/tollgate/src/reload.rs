//! Hot reload (SIGHUP, `POST /v1/reload`): the config file is read and
//! validated again, and what can change while serving is swapped in whole:
//! routes, pricing, tiers (and so every customer's limits), and the names
//! new customers and keys are checked against.
//!
//! A file that does not validate, or that removes a tier customers are on,
//! changes nothing. Requests already running
//! keep the routes and prices they started with (each holds its own
//! snapshot); limits apply from the next admission. A route's upstream TLS
//! (`ca_file`, `client_cert`) is part of the route: its files are read
//! again on every reload, and a route whose settings or file contents
//! changed gets a new upstream client. Listen addresses, listener TLS,
//! the database and the rest of `[server]`, `[admin]`, `[keys]` and
//! `[usage]` are read at start only: a reload that sees them changed says
//! so under `restart_required` and keeps running with the old values.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tollgate_accounts::Reports;
use tollgate_accounts::{Accounts, Changed, NameChanges, ReloadReport};
use tollgate_metering::limits::Policies;
use tollgate_metering::telemetry::emit;
use tollgate_proxy::{Gateway, Metrics, Outbox, Reload};

use crate::config::{Config, ConfigError};
use crate::events::{ConfigReloadFailed, ConfigReloaded, ReloadTrigger};
use crate::snapshot::{webhook_endpoints, Catalog, Snapshot};

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the gateway runs on built-in defaults, with no config file to re-read")]
    NoConfigFile,
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Customers on a removed tier would all be blocked: they must be moved
    /// first.
    #[error(
        "{file}: tiers: tier {tier:?} is removed but {customers} customer(s) are on it; \
         move them to another tier first (tollgate customers set-tier)"
    )]
    TierInUse {
        file: String,
        tier: String,
        customers: usize,
    },
    /// A route's upstream client could not be built.
    #[error("{0:#}")]
    Routes(anyhow::Error),
}

/// What a reload replaces, and the config it compares against.
pub struct Reloader {
    current: Mutex<Config>,
    gateway: Arc<Gateway>,
    policies: Arc<Policies>,
    reports: Arc<Reports>,
    accounts: Arc<Accounts>,
    metrics: Arc<Metrics>,
    outbox: Arc<Outbox>,
}

impl Reloader {
    pub fn new(
        current: Config,
        gateway: Arc<Gateway>,
        policies: Arc<Policies>,
        reports: Arc<Reports>,
        accounts: Arc<Accounts>,
        metrics: Arc<Metrics>,
        outbox: Arc<Outbox>,
    ) -> Reloader {
        Reloader {
            current: Mutex::new(current),
            gateway,
            policies,
            reports,
            accounts,
            metrics,
            outbox,
        }
    }

    /// Reads the file again and applies it; returns what changed. On any
    /// error nothing is applied.
    pub fn apply_file(&self) -> Result<ReloadReport, ReloadError> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let Some(path) = current.source.clone() else {
            return Err(ReloadError::NoConfigFile);
        };
        let next = Config::load(&path)?;
        for tier in &current.tiers {
            let customers = self.policies.customers_on(&tier.name);
            if next.tier(&tier.name).is_none() && customers > 0 {
                return Err(ReloadError::TierInUse {
                    file: path.display().to_string(),
                    tier: tier.name.clone(),
                    customers,
                });
            }
        }
        // Routes' TLS files were read and checked by `Config::load`; here
        // each route with TLS settings gets its client, kept from the
        // running routes when its settings did not change.
        let snapshot = Snapshot::build(&next, &self.metrics, Some(&self.gateway.live().routes))
            .map_err(ReloadError::Routes)?;
        let report = ReloadReport {
            changed: Changed {
                routes: changes(
                    by_name(&current.routes, |r| &r.name),
                    by_name(&next.routes, |r| &r.name),
                ),
                tiers: changes(
                    by_name(&current.tiers, |t| &t.name),
                    by_name(&next.tiers, |t| &t.name),
                ),
                pricing: changes(
                    current
                        .pricing
                        .iter()
                        .map(|(k, v)| (k.as_str(), v))
                        .collect(),
                    next.pricing.iter().map(|(k, v)| (k.as_str(), v)).collect(),
                ),
            },
            restart_required: restart_required(&current, &next),
        };
        self.install(snapshot);
        self.outbox.set_endpoints(webhook_endpoints(&next));
        // What needs a restart stays as it runs, so later reloads keep
        // reporting it until the process restarts.
        let kept = Config {
            tiers: next.tiers,
            routes: next.routes,
            pricing: next.pricing,
            webhooks: next.webhooks,
            ..current.clone()
        };
        *current = kept;
        Ok(report)
    }

    /// Swaps a built snapshot in; nothing here can fail. The data plane's
    /// routes and prices change in one step (a request holds the snapshot
    /// it started with); the tiers then apply from the next admission.
    fn install(&self, snapshot: Snapshot) {
        let Snapshot {
            live,
            catalog: Catalog { tiers, view },
        } = snapshot;
        self.gateway.reconfigure(live);
        self.policies.set_tiers(tiers.clone());
        self.reports.set_tiers(tiers);
        self.accounts.set_catalog(view);
    }

    /// A reload from SIGHUP: the outcome goes to the log.
    pub fn reload_and_log(&self) {
        let _ = self.apply_and_log(ReloadTrigger::Signal);
    }

    fn apply_and_log(&self, trigger: ReloadTrigger) -> Result<ReloadReport, ReloadError> {
        let result = self.apply_file();
        match &result {
            Ok(report) => emit(ConfigReloaded { report, trigger }),
            Err(error) => emit(ConfigReloadFailed { error, trigger }),
        }
        result
    }
}

impl Reload for Reloader {
    fn reload(&self) -> Result<ReloadReport, Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.apply_and_log(ReloadTrigger::Api)?)
    }
}

fn by_name<'a, T>(items: &'a [T], name: impl Fn(&'a T) -> &'a String) -> BTreeMap<&'a str, &'a T> {
    items
        .iter()
        .map(|item| (name(item).as_str(), item))
        .collect()
}

/// Names added, removed and changed between two versions of a section.
fn changes<T: PartialEq>(before: BTreeMap<&str, &T>, after: BTreeMap<&str, &T>) -> NameChanges {
    let names = |map: &BTreeMap<&str, &T>, keep: &dyn Fn(&str, &T) -> bool| -> Vec<String> {
        map.iter()
            .filter(|(name, item)| keep(name, item))
            .map(|(name, _)| (*name).to_owned())
            .collect()
    };
    NameChanges {
        added: names(&after, &|name, _| !before.contains_key(name)),
        removed: names(&before, &|name, _| !after.contains_key(name)),
        changed: names(&after, &|name, item| {
            before.get(name).is_some_and(|old| *old != item)
        }),
    }
}

/// The settings read at start only that differ in `next`. Every `[server]`
/// key is named here: the destructuring is exhaustive, so a new key cannot
/// be added without deciding how a reload reports it.
fn restart_required(current: &Config, next: &Config) -> Vec<&'static str> {
    let crate::config::ServerConfig {
        listen,
        admin_listen,
        tls,
        max_request_body,
        request_header_timeout,
        idle_timeout,
        request_body_timeout,
        max_connections,
        max_header_bytes,
        worker_threads,
        instance_id,
        access_log,
    } = &current.server;
    let b = &next.server;
    let checks = [
        ("server.listen", *listen != b.listen),
        ("server.admin_listen", *admin_listen != b.admin_listen),
        ("server.tls", *tls != b.tls),
        (
            "server.max_request_body",
            *max_request_body != b.max_request_body,
        ),
        (
            "server.request_header_timeout",
            *request_header_timeout != b.request_header_timeout,
        ),
        ("server.idle_timeout", *idle_timeout != b.idle_timeout),
        (
            "server.request_body_timeout",
            *request_body_timeout != b.request_body_timeout,
        ),
        (
            "server.max_connections",
            *max_connections != b.max_connections,
        ),
        (
            "server.max_header_bytes",
            *max_header_bytes != b.max_header_bytes,
        ),
        ("server.worker_threads", *worker_threads != b.worker_threads),
        ("server.instance_id", *instance_id != b.instance_id),
        ("server.access_log", *access_log != b.access_log),
        ("admin", current.admin != next.admin),
        ("database", current.database != next.database),
        ("keys", current.keys != next.keys),
        ("usage", current.usage != next.usage),
    ];
    checks
        .into_iter()
        .filter(|&(_, differs)| differs)
        .map(|(key, _)| key)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_settings_need_a_restart() {
        let current = Config::default();
        let mut next = current.clone();
        next.server.idle_timeout *= 2;
        next.server.request_body_timeout *= 2;
        next.server.max_connections += 1;
        next.server.max_header_bytes += 1;
        assert_eq!(
            restart_required(&current, &next),
            [
                "server.idle_timeout",
                "server.request_body_timeout",
                "server.max_connections",
                "server.max_header_bytes",
            ]
        );
        assert!(restart_required(&current, &current).is_empty());
    }
}
