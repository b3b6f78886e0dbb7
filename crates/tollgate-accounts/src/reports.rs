//! Usage reports and billing (README, Admin API, and the `usage` and `billing`
//! commands): one set of rules for the admin API and the CLI, from
//! parameter parsing to the JSON documents both print.
//!
//! Every number comes from `usage_daily` through the [`Store`], so a report
//! costs the same at any volume; only the export reads raw rows, a page at
//! a time. Money is integer nano-USD inside and a decimal USD string
//! outside.
//!
//! # Billing rule
//!
//! Per customer and calendar month (UTC): `requests` are its admitted
//! requests; `included_requests` its tier's `monthly_requests` (with the
//! customer's overrides); for `overage = "bill"`, `overage_requests =
//! max(0, requests − included)` and `overage_charge = overage_requests ×
//! overage_price_per_request_usd`; `metered_cost` is the sum of its rows'
//! `cost_nanos`; `total = overage_charge + metered_cost`. Each is an exact
//! integer number of nano-USD, so nothing is rounded on the way; the one
//! rounding is for people: `total_usd_cents`, the total rounded half up to
//! a whole cent, is what an invoice shows. The tier is the customer's tier
//! when the summary is made (or the period closed).

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime};
use tollgate_metering::billing::{
    BillingLine, BillingUsage, ClosedPeriod, GroupKey, Ranking, UsageFilter, UsageGroup,
    UsageTotals,
};
use tollgate_metering::limits::{Clock, Limits, Overage, Period};
use tollgate_metering::usage::{format_usd, UsageEvent};
use tollgate_metering::{CustomerId, KeyId, Store};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::accounts::AccountError;
use crate::webhooks::BillingEvents;

/// The longest ranking asked for.
pub(crate) const MAX_TOP: u32 = 1000;
/// The ranking length when none is asked for.
pub(crate) const DEFAULT_TOP: u32 = 10;
/// Rows per page when exporting.
pub(crate) const EXPORT_PAGE: u32 = 1000;

/// Report parameters as they arrive (query string or CLI flags).
#[derive(Clone, Debug, Default)]
pub struct ReportParams {
    pub from: Option<String>,
    pub to: Option<String>,
    pub customer: Option<String>,
}

/// A resolved report filter and the customer it names.
#[derive(Clone, Debug)]
pub struct Scope {
    pub filter: UsageFilter,
    pub customer: Option<(CustomerId, String)>,
}

/// Reports and billing over a store.
pub struct Reports {
    store: Arc<dyn Store>,
    /// Replaced on a config reload.
    tiers: std::sync::RwLock<Arc<HashMap<String, Limits>>>,
    clock: Arc<dyn Clock>,
    /// Told of every period closed here (`billing.period_closed`).
    billing_events: std::sync::OnceLock<Arc<dyn BillingEvents>>,
}

impl Reports {
    pub fn new(
        store: Arc<dyn Store>,
        tiers: HashMap<String, Limits>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Reports {
            store,
            tiers: std::sync::RwLock::new(Arc::new(tiers)),
            clock,
            billing_events: std::sync::OnceLock::new(),
        }
    }

    /// Where closing a period is announced; set once.
    pub fn announce_closes_to(&self, events: Arc<dyn BillingEvents>) {
        let _ = self.billing_events.set(events);
    }

    /// The tiers billing uses from now on (after a config reload).
    pub fn set_tiers(&self, tiers: HashMap<String, Limits>) {
        *self.tiers.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tiers);
    }

    /// Dates are UTC `YYYY-MM-DD`, inclusive, and default to the current
    /// month; `customer` is a name or an id.
    pub async fn scope(&self, params: &ReportParams) -> Result<Scope, AccountError> {
        let current = UsageFilter::period(Period::containing(self.clock.now()));
        let from = parse_date("from", params.from.as_deref())?.unwrap_or(current.from);
        let to = parse_date("to", params.to.as_deref())?.unwrap_or(current.to);
        if from > to {
            return Err(AccountError::Invalid {
                field: "from",
                message: format!("{from} is after to ({to})"),
            });
        }
        let customer = match params.customer.as_deref() {
            None => None,
            Some(name_or_id) => {
                let found = self.store.find_customer(name_or_id).await?;
                let customer = found.ok_or_else(|| AccountError::Invalid {
                    field: "customer",
                    message: format!("no customer {name_or_id:?}"),
                })?;
                Some((customer.id, customer.name))
            }
        };
        Ok(Scope {
            filter: UsageFilter {
                from,
                to,
                customer: customer.as_ref().map(|(id, _)| *id),
            },
            customer,
        })
    }

    /// `GET /v1/usage/summary`.
    pub async fn summary(&self, scope: &Scope) -> Result<UsageSummary, AccountError> {
        let totals = self.store.usage_summary(&scope.filter).await?;
        Ok(UsageSummary {
            scope: ReportScope::of(scope),
            sums: UsageSums::of(&totals),
        })
    }

    /// `GET /v1/usage/daily`, `by-customer`, `by-route`, `by-model`,
    /// `by-key`, and the grouped CLI reports.
    pub async fn grouped(
        &self,
        scope: &Scope,
        group: UsageGroup,
    ) -> Result<UsageRows, AccountError> {
        let rows = self.store.usage_grouped(&scope.filter, group).await?;
        Ok(UsageRows::of(scope, None, &rows))
    }

    /// `GET /v1/usage/top-customers`.
    pub async fn top(
        &self,
        scope: &Scope,
        by: Option<&str>,
        limit: Option<&str>,
    ) -> Result<UsageRows, AccountError> {
        let (ranking, by) = match by.unwrap_or("cost") {
            "cost" => (Ranking::Cost, "cost"),
            "requests" => (Ranking::Requests, "requests"),
            "tokens" => (Ranking::Tokens, "tokens"),
            other => {
                return Err(AccountError::Invalid {
                    field: "by",
                    message: format!("unknown ranking {other:?} (cost, requests or tokens)"),
                })
            }
        };
        let limit = match limit {
            None => DEFAULT_TOP,
            Some(text) => text
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=MAX_TOP).contains(n))
                .ok_or_else(|| AccountError::Invalid {
                    field: "limit",
                    message: format!("must be a whole number from 1 to {MAX_TOP}"),
                })?,
        };
        let rows = self
            .store
            .top_customers(&scope.filter, ranking, limit)
            .await?;
        Ok(UsageRows::of(scope, Some(by), &rows))
    }

    /// One page of the export: the rows after `after`, and the cursor for
    /// the next page (`None` at the end).
    pub async fn export_page(
        &self,
        scope: &Scope,
        after: Option<(OffsetDateTime, Uuid)>,
    ) -> Result<(Vec<UsageEvent>, Option<(OffsetDateTime, Uuid)>), AccountError> {
        let rows = self
            .store
            .usage_events_page(&scope.filter, after, EXPORT_PAGE)
            .await?;
        let next = (rows.len() == EXPORT_PAGE as usize)
            .then(|| rows.last().map(|row| (row.ts, row.id)))
            .flatten();
        Ok((rows, next))
    }

    /// `GET /v1/billing/summary?period=`: the frozen lines of a closed
    /// period, else computed now.
    pub async fn billing_summary(
        &self,
        period: Option<&str>,
    ) -> Result<BillingSummary, AccountError> {
        let period = self.parse_period(period)?;
        if let Some(closed) = self.store.closed_period(period).await? {
            return Ok(BillingSummary::of(
                period,
                &closed.lines,
                Some(closed.closed_at),
            ));
        }
        let lines = self.lines(period).await?;
        Ok(BillingSummary::of(period, &lines, None))
    }

    /// `POST /v1/billing/periods/{period}/close`: freezes the lines once;
    /// again (from anywhere) returns the same lines and creates nothing.
    pub async fn close(&self, period: &str) -> Result<BillingSummary, AccountError> {
        let period = self.parse_period(Some(period))?;
        let current = Period::containing(self.clock.now());
        if period >= current {
            return Err(AccountError::Invalid {
                field: "period",
                message: format!(
                    "{period} has not ended (the current month is {current}); only past months can be closed"
                ),
            });
        }
        let closed = match self.store.closed_period(period).await? {
            Some(closed) => closed,
            None => {
                let lines = self.lines(period).await?;
                self.store
                    .close_period(period, &lines, self.clock.now())
                    .await?
            }
        };
        let summary = BillingSummary::closed(&closed);
        if let Some(events) = self.billing_events.get() {
            // The period is closed whatever happens to the announcement; a
            // failure to record it is logged, and the next close of the
            // period records it (the event is recorded once however often
            // it is announced).
            if let Err(error) = events.period_closed(&summary).await {
                tracing::warn!(
                    message = "Cannot record billing.period_closed.",
                    period = %period,
                    %error
                );
            }
        }
        Ok(summary)
    }

    fn parse_period(&self, text: Option<&str>) -> Result<Period, AccountError> {
        match text {
            None => Ok(Period::containing(self.clock.now())),
            Some(text) => text.parse().map_err(|_| AccountError::Invalid {
                field: "period",
                message: format!("expected YYYY-MM, found {text:?}"),
            }),
        }
    }

    async fn lines(&self, period: Period) -> Result<Vec<BillingLine>, AccountError> {
        let usage = self.store.billing_usage(period).await?;
        let tiers = self.tiers.read().unwrap_or_else(|e| e.into_inner()).clone();
        Ok(usage
            .iter()
            .map(|usage| {
                // As the limiter admits it: the tier with the customer's
                // overrides (checked when they were set; should one no
                // longer apply, the tier's own).
                let limits = tiers.get(&usage.tier).map(|tier| {
                    tier.with_overrides(&usage.overrides)
                        .unwrap_or_else(|_| tier.clone())
                });
                billing_line(usage, limits.as_ref())
            })
            .collect())
    }
}

/// The billing rule (see the module docs). A tier the config no longer
/// has bills the metered cost only.
pub(crate) fn billing_line(usage: &BillingUsage, tier: Option<&Limits>) -> BillingLine {
    let included = tier.and_then(|limits| limits.monthly_requests);
    let (overage_requests, overage_charge_nanos) = match (tier, included) {
        (Some(limits), Some(included)) if limits.overage == Overage::Bill => {
            let over = usage.requests.saturating_sub(included);
            let charge = i64::try_from(over)
                .unwrap_or(i64::MAX)
                .saturating_mul(limits.overage_price_nanos);
            (over, charge)
        }
        _ => (0, 0),
    };
    BillingLine {
        customer_id: usage.customer_id,
        customer: usage.customer.clone(),
        tier: usage.tier.clone(),
        requests: usage.requests,
        included_requests: included,
        overage_requests,
        overage_charge_nanos,
        metered_cost_nanos: usage.cost_nanos,
        total_nanos: overage_charge_nanos.saturating_add(usage.cost_nanos),
    }
}

/// Nano-USD rounded half up (away from zero) to whole cents.
pub(crate) fn round_to_cents(nanos: i64) -> i64 {
    const NANOS_PER_CENT: i128 = 10_000_000;
    let nanos = i128::from(nanos);
    let cents = (nanos.abs() + NANOS_PER_CENT / 2) / NANOS_PER_CENT;
    let cents = if nanos < 0 { -cents } else { cents };
    i64::try_from(cents).unwrap_or(i64::MAX)
}

fn cents_string(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let cents = cents.unsigned_abs();
    format!("{sign}{}.{:02}", cents / 100, cents % 100)
}

fn parse_date(field: &'static str, text: Option<&str>) -> Result<Option<Date>, AccountError> {
    let Some(text) = text else {
        return Ok(None);
    };
    let format = time::macros::format_description!("[year]-[month]-[day]");
    Date::parse(text, &format)
        .map(Some)
        .map_err(|_| AccountError::Invalid {
            field,
            message: format!("expected a date YYYY-MM-DD, found {text:?}"),
        })
}

/// A report's range (UTC dates, inclusive) and, when it is narrowed to one
/// customer, that customer.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ReportScope {
    #[schema(format = Date)]
    pub from: String,
    #[schema(format = Date)]
    pub to: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<uuid::Uuid>)]
    pub customer_id: Option<CustomerId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
}

impl ReportScope {
    fn of(scope: &Scope) -> ReportScope {
        ReportScope {
            from: scope.filter.from.to_string(),
            to: scope.filter.to.to_string(),
            customer_id: scope.customer.as_ref().map(|(id, _)| *id),
            customer: scope.customer.as_ref().map(|(_, name)| name.clone()),
        }
    }
}

/// A report row's sums (the meanings in the admin API's usage reports);
/// money as a decimal USD string.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct UsageSums {
    pub requests: u64,
    pub rejected: u64,
    pub errors: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    /// The four classes together.
    pub tokens: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub cost_usd: String,
}

impl UsageSums {
    fn of(totals: &UsageTotals) -> UsageSums {
        UsageSums {
            requests: totals.requests,
            rejected: totals.rejected,
            errors: totals.errors,
            input_tokens: totals.input_tokens,
            output_tokens: totals.output_tokens,
            cache_read_tokens: totals.cache_read_tokens,
            cache_write_tokens: totals.cache_write_tokens,
            tokens: totals.tokens(),
            request_bytes: totals.request_bytes,
            response_bytes: totals.response_bytes,
            cost_usd: format_usd(totals.cost_nanos),
        }
    }
}

/// `GET /v1/usage/summary`: one set of sums for the range.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct UsageSummary {
    #[serde(flatten)]
    pub scope: ReportScope,
    #[serde(flatten)]
    pub sums: UsageSums,
}

/// A grouped report: one row per group with usage in the range.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct UsageRows {
    #[serde(flatten)]
    pub scope: ReportScope,
    /// The ranking (`top-customers` only): `cost`, `requests` or `tokens`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    pub data: Vec<UsageRow>,
}

impl UsageRows {
    fn of(scope: &Scope, by: Option<&str>, rows: &[(GroupKey, UsageTotals)]) -> UsageRows {
        UsageRows {
            scope: ReportScope::of(scope),
            by: by.map(str::to_owned),
            data: rows
                .iter()
                .map(|(key, totals)| UsageRow {
                    group: RowGroup::of(key),
                    sums: UsageSums::of(totals),
                })
                .collect(),
        }
    }
}

/// One row of a grouped report: what it groups by, then its sums.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct UsageRow {
    #[serde(flatten)]
    pub group: RowGroup,
    #[serde(flatten)]
    pub sums: UsageSums,
}

/// What a report row groups by: the fields of its grouping only (`day`;
/// `customer_id` and `customer`; `route`; `model`, `null` for rows without
/// one; or `key_id`, `prefix`, `name`, `customer_id` and `customer`, where a
/// key no longer stored shows its id as its prefix).
#[derive(Clone, Debug, Default, Serialize, ToSchema)]
pub struct RowGroup {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = Date)]
    pub day: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<uuid::Uuid>)]
    pub key_id: Option<KeyId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub name: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<uuid::Uuid>)]
    pub customer_id: Option<CustomerId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub model: Option<Option<String>>,
}

impl RowGroup {
    fn of(key: &GroupKey) -> RowGroup {
        match key {
            GroupKey::Day(day) => RowGroup {
                day: Some(day.to_string()),
                ..RowGroup::default()
            },
            GroupKey::Customer { id, name } => RowGroup {
                customer_id: Some(*id),
                customer: Some(name.clone()),
                ..RowGroup::default()
            },
            GroupKey::Route(route) => RowGroup {
                route: Some(route.clone()),
                ..RowGroup::default()
            },
            GroupKey::Model(model) => RowGroup {
                model: Some((!model.is_empty()).then(|| model.clone())),
                ..RowGroup::default()
            },
            GroupKey::Key {
                id,
                prefix,
                name,
                customer_id,
                customer,
            } => RowGroup {
                key_id: Some(*id),
                prefix: Some(prefix.clone()),
                name: Some(name.clone()),
                customer_id: Some(*customer_id),
                customer: Some(customer.clone()),
                ..RowGroup::default()
            },
        }
    }
}

/// One customer's bill for a month (the billing rule in the module docs).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct BillingLineView {
    #[schema(value_type = uuid::Uuid)]
    pub customer_id: CustomerId,
    pub customer: String,
    pub tier: String,
    pub requests: u64,
    /// The tier's `monthly_requests` with the customer's overrides; `null`
    /// when unlimited.
    pub included_requests: Option<u64>,
    pub overage_requests: u64,
    pub overage_charge_usd: String,
    pub metered_cost_usd: String,
    pub total_usd: String,
    /// The total rounded half up to a whole cent: what an invoice shows.
    pub total_usd_cents: String,
}

impl BillingLineView {
    fn of(line: &BillingLine) -> BillingLineView {
        BillingLineView {
            customer_id: line.customer_id,
            customer: line.customer.clone(),
            tier: line.tier.clone(),
            requests: line.requests,
            included_requests: line.included_requests,
            overage_requests: line.overage_requests,
            overage_charge_usd: format_usd(line.overage_charge_nanos),
            metered_cost_usd: format_usd(line.metered_cost_nanos),
            total_usd: format_usd(line.total_nanos),
            total_usd_cents: cents_string(round_to_cents(line.total_nanos)),
        }
    }
}

/// A month's billing: every customer's line and the total; frozen once the
/// month is closed.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct BillingSummary {
    /// `YYYY-MM`.
    pub period: String,
    pub closed: bool,
    /// RFC 3339; `null` while the month is open.
    pub closed_at: Option<String>,
    pub data: Vec<BillingLineView>,
    pub total_usd: String,
    pub total_usd_cents: String,
}

impl BillingSummary {
    fn of(period: Period, lines: &[BillingLine], closed_at: Option<OffsetDateTime>) -> Self {
        let total = lines
            .iter()
            .fold(0i64, |sum, line| sum.saturating_add(line.total_nanos));
        BillingSummary {
            period: period.to_string(),
            closed: closed_at.is_some(),
            closed_at: closed_at.and_then(|at| at.format(&Rfc3339).ok()),
            data: lines.iter().map(BillingLineView::of).collect(),
            total_usd: format_usd(total),
            total_usd_cents: cents_string(round_to_cents(total)),
        }
    }

    fn closed(closed: &ClosedPeriod) -> Self {
        BillingSummary::of(closed.period, &closed.lines, Some(closed.closed_at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(requests: u64, cost_nanos: i64) -> BillingUsage {
        BillingUsage {
            customer_id: CustomerId::new(),
            customer: "acme".into(),
            tier: "pro".into(),
            overrides: serde_json::json!({}),
            requests,
            cost_nanos,
        }
    }

    #[test]
    fn bill_tiers_charge_the_excess_and_block_tiers_do_not() {
        let bill = Limits {
            monthly_requests: Some(100),
            overage: Overage::Bill,
            overage_price_nanos: 1_000_000,
            ..Limits::default()
        };
        let line = billing_line(&usage(130, 2_500), Some(&bill));
        assert_eq!(line.included_requests, Some(100));
        assert_eq!(line.overage_requests, 30);
        assert_eq!(line.overage_charge_nanos, 30_000_000);
        assert_eq!(line.total_nanos, 30_002_500);
        let under = billing_line(&usage(99, 0), Some(&bill));
        assert_eq!((under.overage_requests, under.total_nanos), (0, 0));
        let block = Limits {
            overage: Overage::Block,
            ..bill.clone()
        };
        let blocked = billing_line(&usage(130, 7), Some(&block));
        assert_eq!((blocked.overage_requests, blocked.total_nanos), (0, 7));
        let unlimited = billing_line(&usage(10_000, 7), Some(&Limits::default()));
        assert_eq!(
            (unlimited.included_requests, unlimited.total_nanos),
            (None, 7)
        );
        let gone = billing_line(&usage(5, 9), None);
        assert_eq!((gone.included_requests, gone.total_nanos), (None, 9));
    }

    #[test]
    fn cents_round_once_half_up() {
        assert_eq!(round_to_cents(5_000_000), 1, "half a cent rounds up");
        assert_eq!(round_to_cents(4_999_999), 0);
        assert_eq!(round_to_cents(-5_000_000), -1);
        assert_eq!(round_to_cents(1_234_567_890), 123);
        assert_eq!(cents_string(123), "1.23");
        assert_eq!(cents_string(5), "0.05");
        assert_eq!(cents_string(-5), "-0.05");
    }
}
