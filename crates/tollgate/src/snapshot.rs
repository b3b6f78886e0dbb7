//! What the config gives the running gateway that a reload may replace:
//! the routes (with their metric handles and upstream clients), the
//! prices, the tiers' limits, and the tier and route names new customers
//! and keys are checked against.
//!
//! A [`Snapshot`] is built whole from a validated [`Config`] before
//! anything is swapped, so a reload either applies all of it or none.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;
use tollgate_accounts::{Accounts, RouteView, TierView, REDACTED};
use tollgate_metering::keys::KeyFormat;
use tollgate_metering::limits::Limits;
use tollgate_metering::usage::{Pricing, UsageFormat};
use tollgate_metering::Store;
use tollgate_proxy::{LiveConfig, Metrics, RouteSpec, RouteTable, RouteUsage, WebhookEndpoint};

use crate::config::{Config, RouteConfig, TierConfig};

/// Everything a reload replaces, built from one config.
pub struct Snapshot {
    /// Routes and prices, swapped into the data plane in one step.
    pub live: LiveConfig,
    /// What the accounting side and the admin API check against.
    pub catalog: Catalog,
}

/// The tiers' limits, and the routes and tiers as operators see them.
pub struct Catalog {
    /// Each tier's limits, by tier name.
    pub tiers: HashMap<String, Limits>,
    /// What account operations check names against and the admin API
    /// shows, in config order.
    pub view: tollgate_accounts::Catalog,
}

impl Snapshot {
    /// Builds every part from `config`. A route whose TLS settings are the
    /// same as in `previous` (the routes being replaced) keeps its
    /// upstream client and the connections it has open.
    pub fn build(
        config: &Config,
        metrics: &Metrics,
        previous: Option<&RouteTable>,
    ) -> anyhow::Result<Snapshot> {
        let pricing = Arc::new(pricing(config));
        let routes = RouteTable::new_reusing(
            config.routes.iter().map(route_spec).collect(),
            metrics,
            &pricing,
            previous,
        )
        .context("invalid route")?;
        Ok(Snapshot {
            live: LiveConfig { routes, pricing },
            catalog: Catalog {
                tiers: tier_limits(config),
                view: catalog_view(config),
            },
        })
    }
}

/// The account operations over `store`, checking names against `config`.
pub fn accounts_for(config: &Config, store: Arc<dyn Store>) -> Accounts {
    Accounts::new(
        store,
        KeyFormat::new(&config.keys.prefix),
        catalog_view(config),
    )
}

/// The routes and tiers as operators see them: no header values, no keys.
fn catalog_view(config: &Config) -> tollgate_accounts::Catalog {
    tollgate_accounts::Catalog {
        routes: config.routes.iter().map(route_view).collect(),
        tiers: config
            .tiers
            .iter()
            .map(|tier| TierView::new(&tier.name, &limits_of(tier)))
            .collect(),
    }
}

fn route_view(route: &RouteConfig) -> RouteView {
    let name = |header: &Option<http::HeaderName>| header.as_ref().map(|h| h.to_string());
    let path = |path: &std::path::Path| path.display().to_string();
    let tls = route.tls.as_ref();
    RouteView {
        name: route.name.clone(),
        prefix: route.prefix.clone(),
        upstream: route.upstream.to_string(),
        strip_prefix: route.strip_prefix,
        usage: match route.usage {
            UsageFormat::None => "none",
            UsageFormat::Openai => "openai",
            UsageFormat::Anthropic => "anthropic",
        }
        .to_owned(),
        cost_header: name(&route.cost_header),
        input_tokens_header: name(&route.input_tokens_header),
        output_tokens_header: name(&route.output_tokens_header),
        timeout_ms: u64::try_from(route.timeout.as_millis()).unwrap_or(u64::MAX),
        strip_response_headers: route
            .strip_response_headers
            .iter()
            .map(ToString::to_string)
            .collect(),
        set_headers: route
            .set_headers
            .iter()
            .map(|(header, _)| (header.to_string(), REDACTED.to_owned()))
            .collect(),
        ca_file: tls.and_then(|tls| tls.ca_file.as_deref()).map(path),
        client_cert: tls
            .and_then(|tls| tls.client_cert.as_ref())
            .map(|cert| path(&cert.cert)),
    }
}

/// The configured webhook endpoints.
pub fn webhook_endpoints(config: &Config) -> Vec<WebhookEndpoint> {
    config
        .webhooks
        .iter()
        // Validation has checked every secret; one that does not decode
        // cannot occur, and is left out rather than sent unsigned.
        .filter_map(|hook| {
            WebhookEndpoint::new(hook.url.clone(), &hook.secret, hook.events.clone())
        })
        .collect()
}

/// The configured tiers as limits.
pub fn tier_limits(config: &Config) -> HashMap<String, Limits> {
    config
        .tiers
        .iter()
        .map(|tier| (tier.name.clone(), limits_of(tier)))
        .collect()
}

fn limits_of(tier: &TierConfig) -> Limits {
    Limits {
        rate: tier.rate,
        monthly_requests: tier.monthly_requests,
        monthly_tokens: tier.monthly_tokens,
        monthly_cost_nanos: tier.monthly_cost_nanos,
        overage: tier.overage,
        overage_price_nanos: tier.overage_price_per_request_nanos.unwrap_or(0),
        alerts: tier.alerts.clone(),
    }
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
        tls: route.tls.as_ref().map(|tls| tls.upstream.clone()),
        usage: RouteUsage {
            format: route.usage,
            cost_header: route.cost_header.clone(),
            input_tokens_header: route.input_tokens_header.clone(),
            output_tokens_header: route.output_tokens_header.clone(),
        },
    }
}

fn pricing(config: &Config) -> Pricing {
    Pricing::new(
        config
            .pricing
            .iter()
            .map(|(model, price)| (model.clone(), *price)),
    )
}
