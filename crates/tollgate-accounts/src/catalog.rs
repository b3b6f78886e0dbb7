//! The loaded config as operators see it (`GET /v1/routes`, `GET
//! /v1/tiers`, the console): each route and tier in config order, never a
//! secret. Account operations check tier and route names against it.

use std::collections::BTreeMap;

use serde::Serialize;
use tollgate_metering::limits::{Limits, Overage};
use tollgate_metering::usage::format_usd;
use utoipa::ToSchema;

/// What `set_headers` values show as: they usually carry upstream
/// credentials.
pub const REDACTED: &str = "[redacted]";

/// The routes and tiers of one loaded config.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Catalog {
    pub routes: Vec<RouteView>,
    pub tiers: Vec<TierView>,
}

/// One `[[routes]]` entry. Header values the gateway sets upstream are
/// shown as [`REDACTED`]; TLS files by path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct RouteView {
    pub name: String,
    pub prefix: String,
    pub upstream: String,
    pub strip_prefix: bool,
    /// `openai`, `anthropic` or `none`.
    pub usage: String,
    pub cost_header: Option<String>,
    pub input_tokens_header: Option<String>,
    pub output_tokens_header: Option<String>,
    pub timeout_ms: u64,
    pub strip_response_headers: Vec<String>,
    /// Header name to [`REDACTED`].
    pub set_headers: BTreeMap<String, String>,
    pub ca_file: Option<String>,
    /// The client certificate's path, for mutual TLS.
    pub client_cert: Option<String>,
}

/// One `[[tiers]]` entry; money as decimal USD strings.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct TierView {
    pub name: String,
    /// As in the config, e.g. `"60/min"`.
    pub rate: Option<String>,
    pub monthly_requests: Option<u64>,
    pub monthly_tokens: Option<u64>,
    pub monthly_cost_usd: Option<String>,
    /// `block` or `bill`.
    pub overage: String,
    pub overage_price_per_request_usd: String,
    /// Fractions of each monthly limit that fire `quota.threshold`.
    pub alerts: Vec<f64>,
}

impl TierView {
    pub fn new(name: &str, limits: &Limits) -> TierView {
        TierView {
            name: name.to_owned(),
            rate: limits.rate.map(|rate| rate.to_string()),
            monthly_requests: limits.monthly_requests,
            monthly_tokens: limits.monthly_tokens,
            monthly_cost_usd: limits.monthly_cost_nanos.map(format_usd),
            overage: match limits.overage {
                Overage::Block => "block",
                Overage::Bill => "bill",
            }
            .to_owned(),
            overage_price_per_request_usd: format_usd(limits.overage_price_nanos),
            alerts: limits
                .alerts
                .millionths()
                .iter()
                .map(|&m| f64::from(m) / 1e6)
                .collect(),
        }
    }
}

/// What a reload changed: the `POST /v1/reload` reply and the log line.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReloadReport {
    pub changed: Changed,
    /// Changed settings that are read at start only and keep their running
    /// values until a restart.
    pub restart_required: Vec<&'static str>,
}

/// The names added, removed and changed in each reloadable section.
#[derive(Debug, Serialize, ToSchema)]
pub struct Changed {
    pub routes: NameChanges,
    pub tiers: NameChanges,
    pub pricing: NameChanges,
}

#[derive(Debug, Serialize, PartialEq, Eq, ToSchema)]
pub struct NameChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl Catalog {
    pub(crate) fn has_tier(&self, name: &str) -> bool {
        self.tiers.iter().any(|tier| tier.name == name)
    }

    pub(crate) fn has_route(&self, name: &str) -> bool {
        self.routes.iter().any(|route| route.name == name)
    }

    pub(crate) fn tier_names(&self) -> String {
        names(self.tiers.iter().map(|tier| tier.name.as_str()))
    }

    pub(crate) fn route_names(&self) -> String {
        names(self.routes.iter().map(|route| route.name.as_str()))
    }
}

fn names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names.collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_metering::limits::Alerts;

    #[test]
    fn tiers_show_limits_as_configured_and_money_as_decimal_strings() {
        let limits = Limits {
            rate: Some("60/min".parse().unwrap()),
            monthly_requests: Some(1000),
            monthly_tokens: None,
            monthly_cost_nanos: Some(12_500_000_000),
            overage: Overage::Bill,
            overage_price_nanos: 2_000_000,
            alerts: Alerts::from_millionths(vec![500_000, 800_000]).unwrap(),
        };
        let view = TierView::new("pro", &limits);
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "name": "pro",
                "rate": "60/min",
                "monthly_requests": 1000,
                "monthly_tokens": null,
                "monthly_cost_usd": "12.5",
                "overage": "bill",
                "overage_price_per_request_usd": "0.002",
                "alerts": [0.5, 0.8],
            })
        );
        let catalog = Catalog {
            routes: Vec::new(),
            tiers: vec![view, TierView::new("free", &Limits::default())],
        };
        assert!(catalog.has_tier("free") && !catalog.has_tier("gold"));
        assert_eq!(catalog.tier_names(), "pro, free");
    }
}
