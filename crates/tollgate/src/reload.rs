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

use serde_json::{json, Value};
use tollgate_metering::accounts::Accounts;
use tollgate_metering::policy::Policies;
use tollgate_metering::reporting::Reports;
use tollgate_proxy::{Gateway, LiveConfig, Metrics, Reload};

use crate::app::{live_config, tier_limits};
use crate::config::Config;

/// What a reload replaces, and the config it compares against.
pub struct Reloader {
    current: Mutex<Config>,
    gateway: Arc<Gateway>,
    policies: Arc<Policies>,
    reports: Arc<Reports>,
    accounts: Arc<Accounts>,
    metrics: Arc<Metrics>,
}

impl Reloader {
    pub fn new(
        current: Config,
        gateway: Arc<Gateway>,
        policies: Arc<Policies>,
        reports: Arc<Reports>,
        accounts: Arc<Accounts>,
        metrics: Arc<Metrics>,
    ) -> Reloader {
        Reloader {
            current: Mutex::new(current),
            gateway,
            policies,
            reports,
            accounts,
            metrics,
        }
    }

    /// Reads the file again and applies it; returns what changed. On any
    /// error nothing is applied.
    pub fn apply_file(&self) -> Result<Value, String> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let Some(path) = current.source.clone() else {
            return Err(
                "the gateway runs on built-in defaults, with no config file to re-read".to_owned(),
            );
        };
        let next = Config::load(&path).map_err(|error| error.to_string())?;
        // A tier that customers are on cannot just vanish: they would all
        // be blocked. They must be moved first.
        for tier in &current.tiers {
            let on_it = self.policies.customers_on(&tier.name);
            if next.tier(&tier.name).is_none() && on_it > 0 {
                return Err(format!(
                    "{}: tiers: tier {:?} is removed but {on_it} customer(s) are on it; \
                     move them to another tier first (tollgate customers set-tier)",
                    path.display(),
                    tier.name
                ));
            }
        }
        // Routes' TLS files were read and checked by `Config::load`; here
        // each route with TLS settings gets its client, kept from the
        // running routes when its settings did not change.
        let running = self.gateway.live();
        let live: LiveConfig = live_config(&next, &self.metrics, Some(&running.routes))
            .map_err(|error| format!("{error:#}"))?;
        drop(running);

        // Everything is validated and built: from here on nothing fails.
        self.gateway.reconfigure(live);
        let tiers = tier_limits(&next);
        self.policies.set_tiers(tiers.clone());
        self.reports.set_tiers(tiers);
        self.accounts.set_names(
            next.tiers.iter().map(|tier| tier.name.clone()).collect(),
            next.routes.iter().map(|route| route.name.clone()).collect(),
        );
        let report = json!({
            "changed": {
                "routes": changes(by_name(&current.routes, |r| &r.name), by_name(&next.routes, |r| &r.name)),
                "tiers": changes(by_name(&current.tiers, |t| &t.name), by_name(&next.tiers, |t| &t.name)),
                "pricing": changes(
                    current.pricing.iter().map(|(k, v)| (k.as_str(), v)).collect(),
                    next.pricing.iter().map(|(k, v)| (k.as_str(), v)).collect(),
                ),
            },
            "restart_required": restart_required(&current, &next),
        });
        // What needs a restart stays as it runs, so later reloads keep
        // reporting it until the process restarts.
        let kept = Config {
            tiers: next.tiers,
            routes: next.routes,
            pricing: next.pricing,
            ..current.clone()
        };
        *current = kept;
        Ok(report)
    }

    /// A reload from SIGHUP: the outcome goes to the log.
    pub fn reload_and_log(&self) {
        match self.apply_file() {
            Ok(report) => {
                let pending = report["restart_required"]
                    .as_array()
                    .is_some_and(|keys| !keys.is_empty());
                tracing::info!(message = "Config reloaded.", changes = %report["changed"]);
                if pending {
                    tracing::warn!(
                        message = "Some changed settings take effect only after a restart.",
                        keys = %report["restart_required"],
                    );
                }
            }
            Err(error) => tracing::error!(
                message = "Config reload failed; the running config is unchanged.",
                %error,
            ),
        }
    }
}

impl Reload for Reloader {
    fn reload(&self) -> Result<Value, String> {
        let result = self.apply_file();
        match &result {
            Ok(report) => {
                tracing::info!(message = "Config reloaded.", changes = %report["changed"])
            }
            Err(error) => tracing::warn!(
                message = "Config reload refused; the running config is unchanged.",
                %error,
            ),
        }
        result
    }
}

fn by_name<'a, T>(items: &'a [T], name: impl Fn(&'a T) -> &'a String) -> BTreeMap<&'a str, &'a T> {
    items
        .iter()
        .map(|item| (name(item).as_str(), item))
        .collect()
}

/// Names added, removed and changed between two versions of a section.
fn changes<T: PartialEq>(before: BTreeMap<&str, &T>, after: BTreeMap<&str, &T>) -> Value {
    let added: Vec<&str> = after
        .keys()
        .filter(|name| !before.contains_key(*name))
        .copied()
        .collect();
    let removed: Vec<&str> = before
        .keys()
        .filter(|name| !after.contains_key(*name))
        .copied()
        .collect();
    let changed: Vec<&str> = after
        .iter()
        .filter(|(name, item)| before.get(*name).is_some_and(|old| old != *item))
        .map(|(name, _)| *name)
        .collect();
    json!({"added": added, "removed": removed, "changed": changed})
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
