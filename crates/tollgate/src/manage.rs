//! The `customers` and `keys` commands: the same [`Accounts`] operations the
//! admin API runs, against the database named in the config, printed as a
//! table or (with `--json`) as exactly one JSON document on stdout.

use std::sync::Arc;

use anyhow::Context as _;
use serde::Serialize;
use time::OffsetDateTime;
use tollgate_accounts::{
    expiry_after, AccountError, Accounts, CreatedKey, CustomerView, KeyLimitsView, KeyRequest,
    KeyView, ReportParams, Reports, MAX_PAGE,
};
use tollgate_metering::billing::UsageGroup;
use tollgate_metering::keys::KeyUpdate;
use tollgate_metering::limits::KeyLimits;

use crate::cli::{BillingCommand, CustomersCommand, KeyLimitArgs, KeysCommand, UsageBy};
use crate::config::units::parse_duration;
use crate::config::Config;

/// A mistake in what the user asked for (exit code 2), as opposed to a
/// failure while doing it (exit code 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn account_error(error: AccountError) -> anyhow::Error {
    match error {
        AccountError::Invalid { field, message } => {
            UsageError(format!("{}: {message}", flag(field))).into()
        }
        other => other.into(),
    }
}

/// The command-line flag that carries an account field, so a usage error
/// names what the user typed (`--grace`, not the admin API's
/// `grace_seconds`). Fields with no flag of their own keep their name.
fn flag(field: &str) -> String {
    match field {
        "grace_seconds" => "--grace".to_owned(),
        "expires_at" => "--expires-in".to_owned(),
        "customer" | "tier" | "routes" | "status" | "from" | "to" | "period" => {
            format!("--{field}")
        }
        other => other.replace('_', "-"),
    }
}

/// Builds the account operations for `config`, opening (and migrating) its database.
pub async fn accounts(config: &Config) -> anyhow::Result<Accounts> {
    let store = crate::app::open_store(config).await?;
    Ok(crate::snapshot::accounts_for(config, store))
}

pub async fn customers(config: &Config, command: CustomersCommand) -> anyhow::Result<()> {
    let accounts = accounts(config).await?;
    match command {
        CustomersCommand::Create { name, tier, json } => {
            let customer = accounts
                .create_customer(&name, &tier, None)
                .await
                .map_err(account_error)?;
            print(json, &customer, || {
                customer_table(std::slice::from_ref(&customer))
            })
        }
        CustomersCommand::List { json } => {
            let accounts = &accounts;
            let all = all_pages(|cursor| async move {
                accounts
                    .list_customers(cursor.as_deref(), Some(MAX_PAGE))
                    .await
            })
            .await?;
            print(json, &all, || customer_table(&all))
        }
        CustomersCommand::SetTier {
            name_or_id,
            tier,
            json,
        } => {
            let customer = accounts
                .update_customer(&name_or_id, Some(tier), None)
                .await
                .map_err(account_error)?;
            print(json, &customer, || {
                customer_table(std::slice::from_ref(&customer))
            })
        }
    }
}

pub async fn keys(config: &Config, command: KeysCommand) -> anyhow::Result<()> {
    let accounts = accounts(config).await?;
    match command {
        KeysCommand::Create {
            customer,
            tier,
            name,
            expires_in,
            routes,
            limits,
            json,
        } => {
            let limits = key_limits(&limits)?;
            let expires_at = expires_in
                .map(|text| {
                    let lifetime = parse_duration(&text)
                        .map_err(|error| UsageError(format!("--expires-in: {error}")))?;
                    expiry_after("expires_at", OffsetDateTime::now_utc(), lifetime)
                        .map_err(account_error)
                })
                .transpose()?;
            let created = accounts
                .create_key(KeyRequest {
                    customer,
                    tier,
                    name,
                    expires_at,
                    routes,
                    limits,
                })
                .await
                .map_err(account_error)?;
            print(json, &created, || created_text(&created))
        }
        KeysCommand::SetLimits {
            prefix_or_id,
            limits,
            clear,
            json,
        } => {
            let limits = key_limits(&limits)?;
            if limits.is_none() && !clear {
                return Err(UsageError(
                    "give at least one of --rate, --monthly-requests, --monthly-tokens, \
                     --monthly-cost-usd, or --clear"
                        .to_owned(),
                )
                .into());
            }
            let update = KeyUpdate {
                limits: Some(limits),
                ..KeyUpdate::default()
            };
            let key = accounts
                .update_key(&prefix_or_id, update)
                .await
                .map_err(account_error)?;
            print(json, &key, || key_table(std::slice::from_ref(&key)))
        }
        KeysCommand::List {
            customer,
            status,
            json,
        } => {
            let (accounts, customer, status) = (&accounts, &customer, &status);
            let all = all_pages(|cursor| async move {
                accounts
                    .list_keys(
                        customer.as_deref(),
                        status.as_deref(),
                        cursor.as_deref(),
                        Some(MAX_PAGE),
                    )
                    .await
            })
            .await?;
            print(json, &all, || key_table(&all))
        }
        KeysCommand::Revoke { prefix_or_id, json } => {
            let key = accounts
                .revoke_key(&prefix_or_id)
                .await
                .map_err(account_error)?;
            print(json, &key, || key_table(std::slice::from_ref(&key)))
        }
        KeysCommand::Rotate {
            prefix_or_id,
            grace,
            json,
        } => {
            let grace =
                parse_duration(&grace).map_err(|error| UsageError(format!("--grace: {error}")))?;
            let created = accounts
                .rotate_key(&prefix_or_id, Some(grace))
                .await
                .map_err(account_error)?;
            print(json, &created, || created_text(&created))
        }
    }
}

/// The key limits given on the command line, checked; a bad one is a
/// usage error naming its flag.
fn key_limits(args: &KeyLimitArgs) -> anyhow::Result<Option<KeyLimits>> {
    let Some(view) = args.view() else {
        return Ok(None);
    };
    view.parse().map(Some).map_err(|error| match error {
        AccountError::Invalid { message, .. } => {
            // "invalid monthly_cost_usd: ..." names the field; say the flag.
            let message = [
                "rate",
                "monthly_requests",
                "monthly_tokens",
                "monthly_cost_usd",
            ]
            .iter()
            .fold(message, |text, field| {
                text.replace(
                    &format!("invalid {field}"),
                    &format!("--{}", field.replace('_', "-")),
                )
            });
            UsageError(message).into()
        }
        other => other.into(),
    })
}

/// Follows `next_cursor` until the last page.
async fn all_pages<T, F, Fut>(mut page: F) -> anyhow::Result<Vec<T>>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, Option<String>), AccountError>>,
{
    let mut all = Vec::new();
    let mut cursor = None;
    loop {
        let (items, next) = page(cursor).await.map_err(account_error)?;
        all.extend(items);
        match next {
            Some(next) => cursor = Some(next),
            None => return Ok(all),
        }
    }
}

/// The report operations over the config's database and tiers.
pub fn reports_for(config: &Config, store: Arc<dyn tollgate_metering::Store>) -> Reports {
    let outbox =
        tollgate_proxy::Outbox::new(store.clone(), crate::snapshot::webhook_endpoints(config));
    let reports = Reports::new(
        store,
        crate::snapshot::tier_limits(config),
        Arc::new(tollgate_metering::limits::SystemClock),
    );
    // A period closed here is announced by whichever gateway sends next.
    reports.announce_closes_to(Arc::new(outbox));
    reports
}

pub async fn usage(
    config: &Config,
    params: ReportParams,
    by: Option<UsageBy>,
    json: bool,
) -> anyhow::Result<()> {
    let store = crate::app::open_store(config).await?;
    let reports = reports_for(config, store);
    let scope = reports.scope(&params).await.map_err(account_error)?;
    // The JSON document is the admin API's; the table is drawn from it.
    let (document, key) = match by {
        None => (
            reports.summary(&scope).await.map(serde_json::to_value),
            None,
        ),
        Some(by) => {
            let (group, key) = match by {
                UsageBy::Day => (UsageGroup::Day, "day"),
                UsageBy::Customer => (UsageGroup::Customer, "customer"),
                UsageBy::Route => (UsageGroup::Route, "route"),
                UsageBy::Model => (UsageGroup::Model, "model"),
            };
            (
                reports
                    .grouped(&scope, group)
                    .await
                    .map(serde_json::to_value),
                Some(key),
            )
        }
    };
    let document = document.map_err(account_error)??;
    print(json, &document, || usage_table(&document, key))
}

pub async fn billing(config: &Config, command: BillingCommand) -> anyhow::Result<()> {
    let store = crate::app::open_store(config).await?;
    let reports = reports_for(config, store);
    let (document, json) = match command {
        BillingCommand::Summary { period, json } => {
            (reports.billing_summary(Some(&period)).await, json)
        }
        BillingCommand::Close { period, json } => (reports.close(&period).await, json),
    };
    let document = serde_json::to_value(document.map_err(account_error)?)?;
    print(json, &document, || billing_table(&document))
}

const USAGE_COLUMNS: [&str; 7] = [
    "requests",
    "rejected",
    "errors",
    "input_tokens",
    "output_tokens",
    "tokens",
    "cost_usd",
];

fn cell(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => text.clone(),
        serde_json::Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

fn usage_table(document: &serde_json::Value, key: Option<&str>) -> String {
    let rows: Vec<&serde_json::Value> = match key {
        None => vec![document],
        Some(_) => document["data"]
            .as_array()
            .map(|rows| rows.iter().collect())
            .unwrap_or_default(),
    };
    let mut header = vec![key.unwrap_or("period")];
    header.extend(USAGE_COLUMNS);
    let period = format!("{}..{}", cell(&document["from"]), cell(&document["to"]));
    let rows = rows
        .into_iter()
        .map(|row| {
            let mut line = vec![match key {
                None => period.clone(),
                Some(key) => cell(&row[key]),
            }];
            line.extend(USAGE_COLUMNS.iter().map(|column| cell(&row[*column])));
            line
        })
        .collect();
    table(&header, rows)
}

fn billing_table(document: &serde_json::Value) -> String {
    let columns = [
        "customer",
        "tier",
        "requests",
        "included_requests",
        "overage_requests",
        "overage_charge_usd",
        "metered_cost_usd",
        "total_usd",
    ];
    let rows = document["data"]
        .as_array()
        .map(|lines| {
            lines
                .iter()
                .map(|line| columns.iter().map(|column| cell(&line[*column])).collect())
                .collect()
        })
        .unwrap_or_default();
    let status = match document["closed_at"].as_str() {
        Some(at) => format!("closed at {at}"),
        None => "open".to_owned(),
    };
    format!(
        "{} ({status}), total {} USD ({} rounded to cents)\n{}",
        cell(&document["period"]),
        cell(&document["total_usd"]),
        cell(&document["total_usd_cents"]),
        table(&columns, rows)
    )
}

fn print<T: Serialize>(
    json: bool,
    value: &T,
    table: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    if json {
        let text = serde_json::to_string_pretty(value).context("cannot render JSON")?;
        println!("{text}");
    } else {
        print!("{}", table());
    }
    Ok(())
}

fn rfc3339(at: Option<OffsetDateTime>) -> String {
    at.and_then(|at| {
        at.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
    .unwrap_or_else(|| "-".to_owned())
}

fn created_text(key: &CreatedKey) -> String {
    let mut out = format!(
        "key:        {}\n\
         id:         {}\n\
         prefix:     {}\n\
         customer:   {} ({})\n\
         tier:       {}\n\
         expires_at: {}\n",
        key.key,
        key.id,
        key.prefix,
        key.customer,
        key.customer_id,
        key.tier,
        rfc3339(key.expires_at),
    );
    if let Some(at) = key.old_key_expires_at {
        out.push_str(&format!("old key stops working at {}\n", rfc3339(Some(at))));
    }
    out.push_str("Store the key now: it is not shown again.\n");
    out
}

fn customer_table(customers: &[CustomerView]) -> String {
    table(
        &["ID", "NAME", "TIER", "CREATED"],
        customers
            .iter()
            .map(|c| {
                vec![
                    c.id.to_string(),
                    c.name.clone(),
                    c.tier.clone(),
                    rfc3339(Some(c.created_at)),
                ]
            })
            .collect(),
    )
}

fn key_table(keys: &[KeyView]) -> String {
    table(
        &[
            "ID", "PREFIX", "CUSTOMER", "TIER", "NAME", "STATUS", "ROUTES", "EXPIRES", "LIMITS",
        ],
        keys.iter()
            .map(|k| {
                vec![
                    k.id.to_string(),
                    k.prefix.clone(),
                    k.customer.clone(),
                    k.tier.clone(),
                    k.name.clone().unwrap_or_else(|| "-".to_owned()),
                    k.status.to_string(),
                    k.routes
                        .as_ref()
                        .map_or_else(|| "*".to_owned(), |r| r.join(",")),
                    rfc3339(k.expires_at),
                    k.limits
                        .as_ref()
                        .map_or_else(|| "-".to_owned(), limits_text),
                ]
            })
            .collect(),
    )
}

/// A key's own limits in a table cell, e.g. `10/s, 1000 req/mo, 25 USD/mo`.
fn limits_text(limits: &KeyLimitsView) -> String {
    let parts: Vec<String> = [
        limits.rate.clone(),
        limits.monthly_requests.map(|n| format!("{n} req/mo")),
        limits.monthly_tokens.map(|n| format!("{n} tok/mo")),
        limits
            .monthly_cost_usd
            .as_ref()
            .map(|usd| format!("{usd} USD/mo")),
    ]
    .into_iter()
    .flatten()
    .collect();
    parts.join(", ")
}

/// Left-aligned columns separated by two spaces.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
