//! The pages: each reads through the account operations and reports, and
//! renders one template. A failure to read shows where it happened, on the
//! page, rather than as an error page.

use askama::Template;
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Response, StatusCode};
use tollgate_accounts::{AccountError, KeyLimitsView, ReportParams, UsageRows, UsageSums};
use tollgate_metering::billing::UsageGroup;
use tollgate_metering::keys::KeyUpdate;
use tollgate_metering::limits::{KeyLimits, Meter, QuotaView};

use crate::charts::{self, Day};
use crate::session::Session;
use crate::{ConsoleParts, GatewayStatus};

pub(crate) const CSS: &str = include_str!("../assets/console.css");
pub(crate) const JS: &str = include_str!("../assets/console.js");

/// Money as people read it, to the cent, with the exact figure for a
/// tooltip.
pub(crate) struct Money {
    pub(crate) cents: String,
    pub(crate) exact: String,
}

impl Money {
    /// From a decimal USD string as the reports give it (`"12.345678901"`):
    /// rounded half up, once, to a cent.
    pub(crate) fn of(usd: &str) -> Money {
        let (negative, digits) = match usd.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, usd),
        };
        let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
        let mut fraction = fraction.to_owned();
        fraction.truncate(9);
        while fraction.len() < 9 {
            fraction.push('0');
        }
        let nanos = whole.parse::<i128>().unwrap_or(0) * 1_000_000_000
            + fraction.parse::<i128>().unwrap_or(0);
        let cents = (nanos + 5_000_000) / 10_000_000;
        let sign = if negative && cents > 0 { "-" } else { "" };
        // A cost that rounds to nothing is still a cost: say so.
        let cents = if cents == 0 && nanos > 0 && !negative {
            "< $0.01".to_owned()
        } else {
            format!("{sign}${}.{:02}", group(cents / 100), cents % 100)
        };
        Money {
            cents,
            exact: format!("{usd} USD"),
        }
    }
}

/// Thousands separated by commas.
fn group(value: i128) -> String {
    let digits = value.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A count with thousands separated.
fn count(value: u64) -> String {
    group(i128::from(value))
}

/// The month-to-date sums, as shown.
pub(crate) struct Totals {
    pub(crate) requests: String,
    pub(crate) rejected: String,
    pub(crate) errors: String,
    pub(crate) tokens: String,
    pub(crate) cost: Money,
}

impl Totals {
    fn of(sums: &UsageSums) -> Totals {
        Totals {
            requests: count(sums.requests),
            rejected: count(sums.rejected),
            errors: count(sums.errors),
            tokens: count(sums.tokens),
            cost: Money::of(&sums.cost_usd),
        }
    }
}

pub(crate) struct Ranked {
    pub(crate) name: String,
    pub(crate) requests: String,
    pub(crate) cost: Money,
}

#[derive(Template)]
#[template(path = "login.html")]
struct Login<'a> {
    error: Option<&'a str>,
}

#[derive(Template)]
#[template(path = "overview.html")]
struct Overview<'a> {
    csrf: &'a str,
    from: String,
    to: String,
    error: Option<String>,
    month: Option<Totals>,
    chart: String,
    days: usize,
    peak_requests: String,
    peak_cost: Money,
    top: Vec<Ranked>,
    models: Vec<Ranked>,
    models_chart: String,
    status: GatewayStatus,
}

/// A customer row: each limit used against its limit.
pub(crate) struct CustomerRow {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) tier: String,
    pub(crate) meters: Vec<Gauge>,
}

/// Month-to-date use of one limit.
pub(crate) struct Gauge {
    pub(crate) label: &'static str,
    pub(crate) used: String,
    pub(crate) limit: String,
    /// 0 to 100, for the bar.
    pub(crate) percent: u64,
    /// `ok`, `warn` (80 % or more) or `over` (100 % or more).
    pub(crate) level: &'static str,
}

#[derive(Template)]
#[template(path = "customers.html")]
struct Customers<'a> {
    csrf: &'a str,
    query: String,
    rows: Vec<CustomerRow>,
    tiers: Vec<String>,
    next: Option<String>,
    error: Option<String>,
    notice: Option<String>,
}

#[derive(Template)]
#[template(path = "message.html")]
struct Message<'a> {
    csrf: Option<&'a str>,
    title: &'a str,
    message: &'a str,
}

pub(crate) fn html(status: StatusCode, page: Result<String, askama::Error>) -> Response<Bytes> {
    let (status, body) = match page {
        Ok(body) => (status, body),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("<!doctype html><title>Error</title><p>The page could not be drawn: {error}"),
        ),
    };
    let mut response = Response::new(Bytes::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

pub(crate) fn login(error: Option<&str>) -> Response<Bytes> {
    let status = if error.is_some() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    };
    html(status, Login { error }.render())
}

pub(crate) fn forbidden(message: &str) -> Response<Bytes> {
    let page = Message {
        csrf: None,
        title: "Not allowed",
        message,
    };
    html(StatusCode::FORBIDDEN, page.render())
}

pub(crate) fn not_found(session: &Session) -> Response<Bytes> {
    let page = Message {
        csrf: Some(&session.csrf),
        title: "Not found",
        message: "There is no such page in the console.",
    };
    html(StatusCode::NOT_FOUND, page.render())
}

/// The query's `from` and `to` (UTC days; default this month).
fn range(query: &str) -> ReportParams {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).unwrap_or_default();
    let get = |name: &str| {
        pairs
            .iter()
            .find(|(key, value)| key == name && !value.is_empty())
            .map(|(_, value)| value.clone())
    };
    ReportParams {
        from: get("from"),
        to: get("to"),
        customer: get("customer"),
    }
}

pub(crate) fn param(query: &str, name: &str) -> Option<String> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).unwrap_or_default();
    pairs
        .into_iter()
        .find(|(key, value)| key == name && !value.is_empty())
        .map(|(_, value)| value)
}

/// `/console/`: this month, a chosen range day by day, who and what cost
/// the most, and how the gateway is doing.
pub(crate) async fn overview(
    parts: &ConsoleParts,
    session: &Session,
    query: &str,
) -> Response<Bytes> {
    let reports = &parts.reports;
    let mut page = Overview {
        csrf: &session.csrf,
        from: String::new(),
        to: String::new(),
        error: None,
        month: None,
        chart: String::new(),
        days: 0,
        peak_requests: "0".to_owned(),
        peak_cost: Money::of("0"),
        top: Vec::new(),
        models: Vec::new(),
        models_chart: String::new(),
        status: (parts.status)(),
    };
    let read = async {
        let month = reports.scope(&ReportParams::default()).await?;
        page.month = Some(Totals::of(&reports.summary(&month).await?.sums));
        let scope = reports.scope(&range(query)).await?;
        let daily = reports.grouped(&scope, UsageGroup::Day).await?;
        page.from = daily.scope.from.clone();
        page.to = daily.scope.to.clone();
        let days = day_points(&daily);
        page.days = days.len();
        page.chart = charts::daily(&days, 720, 220);
        let peak = daily
            .data
            .iter()
            .max_by_key(|row| row.sums.requests)
            .map(|row| count(row.sums.requests));
        page.peak_requests = peak.unwrap_or_else(|| "0".to_owned());
        let peak_cost = daily
            .data
            .iter()
            .map(|row| row.sums.cost_usd.as_str())
            .max_by(|a, b| usd_value(a).total_cmp(&usd_value(b)));
        page.peak_cost = Money::of(peak_cost.unwrap_or("0"));
        let top = reports.top(&scope, Some("cost"), Some("10")).await?;
        page.top = ranked(&top, |row| row.group.customer.clone().unwrap_or_default());
        let models = reports.grouped(&scope, UsageGroup::Model).await?;
        let mut models = models;
        models
            .data
            .sort_by(|a, b| usd_value(&b.sums.cost_usd).total_cmp(&usd_value(&a.sums.cost_usd)));
        page.models_chart = charts::bars(
            &models
                .data
                .iter()
                .map(|row| usd_value(&row.sums.cost_usd))
                .collect::<Vec<_>>(),
            240,
            28,
        );
        page.models = ranked(&models, |row| {
            row.group
                .model
                .clone()
                .flatten()
                .unwrap_or_else(|| "(no model)".to_owned())
        });
        Ok::<(), AccountError>(())
    };
    if let Err(error) = read.await {
        page.error = Some(error.to_string());
    }
    html(StatusCode::OK, page.render())
}

fn ranked(rows: &UsageRows, name: impl Fn(&tollgate_accounts::UsageRow) -> String) -> Vec<Ranked> {
    rows.data
        .iter()
        .map(|row| Ranked {
            name: name(row),
            requests: count(row.sums.requests),
            cost: Money::of(&row.sums.cost_usd),
        })
        .collect()
}

/// A decimal USD string as a float, for drawing and ordering only.
fn usd_value(usd: &str) -> f64 {
    usd.parse().unwrap_or(0.0)
}

/// Every day of the range in order, days without usage as zero.
fn day_points(daily: &UsageRows) -> Vec<Day> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let (Ok(from), Ok(to)) = (
        time::Date::parse(&daily.scope.from, &format),
        time::Date::parse(&daily.scope.to, &format),
    ) else {
        return Vec::new();
    };
    let mut by_day = std::collections::HashMap::new();
    for row in &daily.data {
        if let Some(day) = &row.group.day {
            by_day.insert(
                day.clone(),
                (row.sums.requests, usd_value(&row.sums.cost_usd)),
            );
        }
    }
    let mut points = Vec::new();
    let mut day = from;
    // At most a year of bars: a longer range shows its first year.
    while day <= to && points.len() < 366 {
        let (requests, cost) = by_day.get(&day.to_string()).copied().unwrap_or((0, 0.0));
        points.push(Day { requests, cost });
        match day.next_day() {
            Some(next) => day = next,
            None => break,
        }
    }
    points
}

/// Customers on a page of the list.
const PAGE: u32 = 100;
/// The most customers a search looks through.
const SEARCH_LIMIT: usize = 10_000;

/// `/console/customers`: each customer with its tier and month-to-date use
/// against each limit.
pub(crate) async fn customers(
    parts: &ConsoleParts,
    session: &Session,
    query: &str,
) -> Response<Bytes> {
    customers_page(parts, session, query, None, None).await
}

async fn customers_page(
    parts: &ConsoleParts,
    session: &Session,
    query: &str,
    notice: Option<String>,
    error: Option<String>,
) -> Response<Bytes> {
    let search = param(query, "q").unwrap_or_default();
    let cursor = param(query, "cursor");
    let mut page = Customers {
        csrf: &session.csrf,
        query: search.clone(),
        rows: Vec::new(),
        tiers: parts
            .accounts
            .catalog()
            .tiers
            .iter()
            .map(|tier| tier.name.clone())
            .collect(),
        next: None,
        error,
        notice,
    };
    // A search looks through every customer (a page at a time, up to
    // `SEARCH_LIMIT` of them); a plain list shows one page.
    let needle = search.to_lowercase();
    let mut cursor = cursor;
    let mut seen = 0;
    loop {
        let listed = parts
            .accounts
            .list_customers(cursor.as_deref(), Some(PAGE))
            .await;
        let (customers, next) = match listed {
            Ok(listed) => listed,
            Err(error) => {
                page.error = Some(error.to_string());
                break;
            }
        };
        seen += customers.len();
        let limiter = parts.policies.limiter();
        page.rows.extend(
            customers
                .into_iter()
                .filter(|c| needle.is_empty() || c.name.to_lowercase().contains(&needle))
                .map(|c| {
                    let view = limiter.view(c.id);
                    CustomerRow {
                        id: c.id.to_string(),
                        name: c.name,
                        tier: c.tier,
                        meters: gauges(&view),
                    }
                }),
        );
        match next {
            Some(next) if !needle.is_empty() && seen < SEARCH_LIMIT => cursor = Some(next),
            Some(next) if needle.is_empty() => {
                page.next = Some(next);
                break;
            }
            Some(_) => {
                page.error = Some(format!(
                    "Only the first {SEARCH_LIMIT} customers were searched; narrow the search."
                ));
                break;
            }
            None => break,
        }
    }
    html(StatusCode::OK, page.render())
}

/// A customer's monthly limits as gauges (only the limits it has).
fn gauges(view: &QuotaView) -> Vec<Gauge> {
    let mut gauges = Vec::new();
    let mut add = |label: &'static str, meter: &Meter<u64>| {
        if let Some(limit) = meter.limit {
            gauges.push(gauge(
                label,
                meter.used as f64,
                limit as f64,
                count(meter.used),
                count(limit),
            ));
        }
    };
    add("requests", &view.requests);
    add("tokens", &view.tokens);
    if let Some(limit) = view.cost_nanos.limit {
        let usd = |nanos: i64| Money::of(&tollgate_metering::usage::format_usd(nanos)).cents;
        gauges.push(gauge(
            "cost",
            view.cost_nanos.used as f64,
            limit as f64,
            usd(view.cost_nanos.used),
            usd(limit),
        ));
    }
    gauges
}

fn gauge(
    label: &'static str,
    used: f64,
    limit: f64,
    used_text: String,
    limit_text: String,
) -> Gauge {
    let ratio = if limit > 0.0 { used / limit } else { 1.0 };
    let level = if ratio >= 1.0 {
        "over"
    } else if ratio >= 0.8 {
        "warn"
    } else {
        "ok"
    };
    Gauge {
        label,
        used: used_text,
        limit: limit_text,
        percent: (ratio.clamp(0.0, 1.0) * 100.0).round() as u64,
        level,
    }
}

/// `POST /console/customers`: creates a customer, then shows the list
/// with it, or the form's error where it happened.
pub(crate) async fn create_customer(
    parts: &ConsoleParts,
    session: &Session,
    form: &[(String, String)],
) -> Response<Bytes> {
    let get = |name: &str| {
        crate::field(form, name)
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    let (name, tier) = (get("name"), get("tier"));
    match parts.accounts.create_customer(&name, &tier, None).await {
        Ok(created) => {
            let query =
                serde_urlencoded::to_string([("q", created.name.as_str())]).unwrap_or_default();
            customers_page(
                parts,
                session,
                &query,
                Some(format!("Customer {} created.", created.name)),
                None,
            )
            .await
        }
        Err(error) => customers_page(parts, session, "", None, Some(error.to_string())).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_rounds_once_to_the_cent_and_keeps_the_exact_figure() {
        let money = Money::of("1234.005");
        assert_eq!(
            (money.cents.as_str(), money.exact.as_str()),
            ("$1,234.01", "1234.005 USD")
        );
        assert_eq!(Money::of("0.004999999").cents, "< $0.01");
        assert_eq!(Money::of("0").cents, "$0.00");
        assert_eq!(Money::of("7").cents, "$7.00");
        assert_eq!(Money::of("-0.5").cents, "-$0.50");
        assert_eq!(count(1_234_567), "1,234,567");
    }

    #[test]
    fn a_keys_limits_read_from_the_form_and_show_in_a_line() {
        let fields = |rate: &str, requests: &str, cost: &str| LimitFields {
            rate: rate.to_owned(),
            monthly_requests: requests.to_owned(),
            monthly_tokens: String::new(),
            monthly_cost_usd: cost.to_owned(),
        };
        assert_eq!(fields("", "", "").parse().unwrap(), None, "empty: none");
        let limits = fields("10/s", "1000", "25").parse().unwrap().unwrap();
        let view = KeyLimitsView::from(&limits);
        assert_eq!(
            limits_line(Some(&view)).unwrap(),
            "10/s · 1,000 req/mo · 25 USD/mo"
        );
        assert_eq!(LimitFields::of(Some(&view)).monthly_requests, "1000");
        assert_eq!(limits_line(None), None);
        for (bad, field) in [
            (fields("ten per second", "", ""), "rate"),
            (fields("", "1e3", ""), "monthly_requests"),
            (fields("", "-1", ""), "monthly_requests"),
            (fields("", "", "lots"), "monthly_cost_usd"),
        ] {
            let error = bad.parse().unwrap_err().to_string();
            assert!(
                error.starts_with("limits: ") && error.contains(field),
                "{error}"
            );
        }
    }

    #[test]
    fn gauges_turn_amber_at_80_and_red_at_100_percent() {
        let levels: Vec<_> = [10.0, 80.0, 100.0, 150.0]
            .into_iter()
            .map(|used| gauge("requests", used, 100.0, String::new(), String::new()))
            .map(|g| (g.level, g.percent))
            .collect();
        assert_eq!(
            levels,
            [("ok", 10), ("warn", 80), ("over", 100), ("over", 100)]
        );
    }
}

// ---------------------------------------------------------------------------
// A customer.

#[derive(Template)]
#[template(path = "customer.html")]
struct CustomerPage<'a> {
    csrf: &'a str,
    id: String,
    name: String,
    tier: String,
    tiers: Vec<String>,
    overrides: String,
    meters: Vec<Gauge>,
    from: String,
    to: String,
    cost: Money,
    chart: String,
    models: Vec<Ranked>,
    keys: Vec<KeyRow>,
    notice: Option<String>,
    error: Option<String>,
}

/// A key as a row of a table.
pub(crate) struct KeyRow {
    pub(crate) id: String,
    pub(crate) prefix: String,
    pub(crate) customer: String,
    pub(crate) name: String,
    pub(crate) routes: String,
    pub(crate) status: String,
    pub(crate) created: String,
    pub(crate) expires: String,
    /// Its own limits in a line, or "customer's only".
    pub(crate) limits: String,
    pub(crate) has_limits: bool,
    /// The edit form's fields: its limits, or what was just refused.
    pub(crate) fields: LimitFields,
    /// The edit form starts open (its last save was refused).
    pub(crate) editing: bool,
}

/// A key's limits as the form's four fields; empty is no limit.
#[derive(Clone, Debug, Default)]
pub(crate) struct LimitFields {
    pub(crate) rate: String,
    pub(crate) monthly_requests: String,
    pub(crate) monthly_tokens: String,
    pub(crate) monthly_cost_usd: String,
}

impl LimitFields {
    fn of(limits: Option<&KeyLimitsView>) -> LimitFields {
        let Some(limits) = limits else {
            return LimitFields::default();
        };
        LimitFields {
            rate: limits.rate.clone().unwrap_or_default(),
            monthly_requests: limits
                .monthly_requests
                .map(|n| n.to_string())
                .unwrap_or_default(),
            monthly_tokens: limits
                .monthly_tokens
                .map(|n| n.to_string())
                .unwrap_or_default(),
            monthly_cost_usd: limits.monthly_cost_usd.clone().unwrap_or_default(),
        }
    }

    /// The four fields of a form.
    fn from_form(form: &[(String, String)]) -> LimitFields {
        let get = |name: &str| {
            crate::field(form, name)
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        LimitFields {
            rate: get("rate"),
            monthly_requests: get("monthly_requests"),
            monthly_tokens: get("monthly_tokens"),
            monthly_cost_usd: get("monthly_cost_usd"),
        }
    }

    /// Checked by the same rules as the admin API's `limits`; `None` when
    /// every field is empty. An error names the field.
    fn parse(&self) -> Result<Option<KeyLimits>, AccountError> {
        let text = |value: &str| (!value.is_empty()).then(|| value.to_owned());
        let whole = |field: &'static str, value: &str| {
            if value.is_empty() {
                return Ok(None);
            }
            value
                .parse::<u64>()
                .map(Some)
                .map_err(|_| AccountError::Invalid {
                    field: "limits",
                    message: format!("invalid {field}: expected a whole number, found {value:?}"),
                })
        };
        let view = KeyLimitsView {
            rate: text(&self.rate),
            monthly_requests: whole("monthly_requests", &self.monthly_requests)?,
            monthly_tokens: whole("monthly_tokens", &self.monthly_tokens)?,
            monthly_cost_usd: text(&self.monthly_cost_usd),
        };
        let limits = view.parse()?;
        Ok((!limits.is_empty()).then_some(limits))
    }
}

/// A key's own limits in a line: `10/s · 1,000 req/mo · 25 USD/mo`.
fn limits_line(limits: Option<&KeyLimitsView>) -> Option<String> {
    let limits = limits?;
    let mut parts = Vec::new();
    if let Some(rate) = &limits.rate {
        parts.push(rate.clone());
    }
    if let Some(requests) = limits.monthly_requests {
        parts.push(format!("{} req/mo", count(requests)));
    }
    if let Some(tokens) = limits.monthly_tokens {
        parts.push(format!("{} tokens/mo", count(tokens)));
    }
    if let Some(cost) = &limits.monthly_cost_usd {
        parts.push(format!("{cost} USD/mo"));
    }
    (!parts.is_empty()).then(|| parts.join(" · "))
}

pub(crate) fn utc(at: time::OffsetDateTime) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]");
    at.format(&format).unwrap_or_default()
}

impl KeyRow {
    fn of(key: &tollgate_accounts::KeyView) -> KeyRow {
        KeyRow {
            id: key.id.to_string(),
            prefix: key.prefix.clone(),
            customer: key.customer.clone(),
            name: key.name.clone().unwrap_or_default(),
            routes: key
                .routes
                .as_ref()
                .map_or_else(|| "every route".to_owned(), |routes| routes.join(", ")),
            status: serde_json_status(key),
            created: utc(key.created_at),
            expires: key
                .expires_at
                .map(utc)
                .unwrap_or_else(|| "never".to_owned()),
            limits: limits_line(key.limits.as_ref()).unwrap_or_else(|| CUSTOMERS_ONLY.to_owned()),
            has_limits: limits_line(key.limits.as_ref()).is_some(),
            fields: LimitFields::of(key.limits.as_ref()),
            editing: false,
        }
    }
}

/// What a key without limits of its own is held to.
const CUSTOMERS_ONLY: &str = "customer's only";

/// A key's status word, as the admin API writes it.
fn serde_json_status(key: &tollgate_accounts::KeyView) -> String {
    match key.status {
        tollgate_metering::keys::KeyStatus::Active => "active",
        tollgate_metering::keys::KeyStatus::Revoked => "revoked",
        tollgate_metering::keys::KeyStatus::Expired => "expired",
    }
    .to_owned()
}

/// `/console/customers/{id}`: its limits and use, its overrides (editable),
/// its usage day by day and by model, and its keys.
pub(crate) async fn customer(
    parts: &ConsoleParts,
    session: &Session,
    id: &str,
    notice: Option<String>,
    error: Option<String>,
) -> Response<Bytes> {
    let found = match parts.accounts.customer(id).await {
        Ok(found) => found,
        Err(AccountError::NotFound(_)) => return not_found(session),
        Err(error) => {
            let page = Message {
                csrf: Some(&session.csrf),
                title: "Could not read the customer",
                message: &error.to_string(),
            };
            return html(StatusCode::SERVICE_UNAVAILABLE, page.render());
        }
    };
    let view = parts.policies.limiter().view(found.id);
    let mut page = CustomerPage {
        csrf: &session.csrf,
        id: found.id.to_string(),
        name: found.name.clone(),
        tier: found.tier.clone(),
        tiers: tier_names(parts),
        overrides: if found.overrides.as_object().is_some_and(|o| o.is_empty()) {
            String::new()
        } else {
            found.overrides.to_string()
        },
        meters: gauges(&view),
        from: String::new(),
        to: String::new(),
        cost: Money::of("0"),
        chart: String::new(),
        models: Vec::new(),
        keys: Vec::new(),
        notice,
        error,
    };
    let reports = &parts.reports;
    let read = async {
        let scope = reports
            .scope(&ReportParams {
                customer: Some(found.id.to_string()),
                ..ReportParams::default()
            })
            .await?;
        let daily = reports.grouped(&scope, UsageGroup::Day).await?;
        page.from = daily.scope.from.clone();
        page.to = daily.scope.to.clone();
        page.chart = charts::daily(&day_points(&daily), 720, 200);
        page.cost = Money::of(&reports.summary(&scope).await?.sums.cost_usd);
        let models = reports.grouped(&scope, UsageGroup::Model).await?;
        page.models = ranked(&models, |row| {
            row.group
                .model
                .clone()
                .flatten()
                .unwrap_or_else(|| "(no model)".to_owned())
        });
        let (keys, _) = parts
            .accounts
            .list_keys(Some(&found.id.to_string()), None, None, Some(100))
            .await?;
        page.keys = keys.iter().map(KeyRow::of).collect();
        Ok::<(), AccountError>(())
    };
    if let Err(error) = read.await {
        page.error.get_or_insert(error.to_string());
    }
    html(StatusCode::OK, page.render())
}

fn tier_names(parts: &ConsoleParts) -> Vec<String> {
    parts
        .accounts
        .catalog()
        .tiers
        .iter()
        .map(|tier| tier.name.clone())
        .collect()
}

/// `POST /console/customers/{id}`: a new tier and overrides.
pub(crate) async fn update_customer(
    parts: &ConsoleParts,
    session: &Session,
    id: &str,
    form: &[(String, String)],
) -> Response<Bytes> {
    let tier = crate::field(form, "tier").map(str::to_owned);
    let overrides = crate::field(form, "overrides").unwrap_or_default().trim();
    let overrides = if overrides.is_empty() {
        Ok(serde_json::Value::Object(Default::default()))
    } else {
        serde_json::from_str(overrides).map_err(|error| format!("overrides: not JSON ({error})"))
    };
    let outcome = match overrides {
        Ok(overrides) => parts
            .accounts
            .update_customer(id, tier, Some(overrides))
            .await
            .map_err(|error| error.to_string()),
        Err(error) => Err(error),
    };
    match outcome {
        Ok(_) => customer(parts, session, id, Some("Saved.".to_owned()), None).await,
        Err(error) => customer(parts, session, id, None, Some(error)).await,
    }
}

// ---------------------------------------------------------------------------
// Keys.

/// A key just made, shown once.
pub(crate) struct Created {
    pub(crate) title: &'static str,
    pub(crate) key: String,
    pub(crate) prefix: String,
    pub(crate) customer: String,
    pub(crate) old_key_expires_at: Option<String>,
    /// Its own limits in a line, if it has any.
    pub(crate) limits: Option<String>,
}

impl Created {
    fn of(title: &'static str, key: &tollgate_accounts::CreatedKey) -> Created {
        Created {
            title,
            key: key.key.clone(),
            prefix: key.prefix.clone(),
            customer: key.customer.clone(),
            old_key_expires_at: key.old_key_expires_at.map(utc),
            limits: limits_line(key.limits.as_ref()),
        }
    }
}

#[derive(Template)]
#[template(path = "keys.html")]
struct KeysPage<'a> {
    csrf: &'a str,
    customer: String,
    status: String,
    statuses: [(&'static str, &'static str); 4],
    tiers: Vec<String>,
    keys: Vec<KeyRow>,
    next: Option<String>,
    created: Option<Created>,
    notice: Option<String>,
    error: Option<String>,
}

/// `/console/keys`: keys by customer and status; create, rotate, revoke,
/// and set each key's own limits.
pub(crate) async fn keys(
    parts: &ConsoleParts,
    session: &Session,
    query: &str,
    created: Option<Created>,
    notice: Option<String>,
    error: Option<String>,
) -> Response<Bytes> {
    keys_editing(parts, session, query, created, notice, error, None).await
}

/// The keys page with one key's limits form open, holding `fields` (what
/// was just refused).
async fn keys_editing(
    parts: &ConsoleParts,
    session: &Session,
    query: &str,
    created: Option<Created>,
    notice: Option<String>,
    error: Option<String>,
    editing: Option<(String, LimitFields)>,
) -> Response<Bytes> {
    let customer = param(query, "customer").unwrap_or_default();
    let status = param(query, "status").unwrap_or_default();
    let cursor = param(query, "cursor");
    let mut page = KeysPage {
        csrf: &session.csrf,
        customer: customer.clone(),
        status: status.clone(),
        statuses: [
            ("", "any"),
            ("active", "active"),
            ("revoked", "revoked"),
            ("expired", "expired"),
        ],
        tiers: tier_names(parts),
        keys: Vec::new(),
        next: None,
        created,
        notice,
        error,
    };
    let listed = parts
        .accounts
        .list_keys(
            (!customer.is_empty()).then_some(customer.as_str()),
            (!status.is_empty()).then_some(status.as_str()),
            cursor.as_deref(),
            Some(100),
        )
        .await;
    match listed {
        Ok((keys, next)) => {
            page.keys = keys.iter().map(KeyRow::of).collect();
            page.next = next;
            if let Some((id, fields)) = editing {
                if let Some(row) = page.keys.iter_mut().find(|row| row.id == id) {
                    row.fields = fields;
                    row.editing = true;
                }
            }
        }
        Err(error) => {
            page.error.get_or_insert(error.to_string());
        }
    }
    html(StatusCode::OK, page.render())
}

/// `POST /console/keys`: a new key, shown once.
pub(crate) async fn create_key(
    parts: &ConsoleParts,
    session: &Session,
    form: &[(String, String)],
) -> Response<Bytes> {
    let get = |name: &str| {
        let value = crate::field(form, name).unwrap_or_default().trim();
        (!value.is_empty()).then(|| value.to_owned())
    };
    let request = tollgate_accounts::KeyRequest {
        customer: get("customer").unwrap_or_default(),
        tier: get("tier"),
        name: get("name"),
        expires_at: None,
        routes: get("routes").map(|routes| {
            routes
                .split(',')
                .map(|route| route.trim().to_owned())
                .filter(|route| !route.is_empty())
                .collect()
        }),
        limits: None,
    };
    let customer = request.customer.clone();
    let query = serde_urlencoded::to_string([("customer", customer.as_str())]).unwrap_or_default();
    let request = match LimitFields::from_form(form).parse() {
        Ok(limits) => tollgate_accounts::KeyRequest { limits, ..request },
        Err(error) => {
            return keys(parts, session, &query, None, None, Some(error.to_string())).await;
        }
    };
    match parts.accounts.create_key(request).await {
        Ok(created) => {
            let created = Created::of("New key", &created);
            keys(parts, session, &query, Some(created), None, None).await
        }
        Err(error) => keys(parts, session, &query, None, None, Some(error.to_string())).await,
    }
}

/// `POST /console/keys/{id}/revoke` and `.../rotate`.
pub(crate) async fn key_action(
    parts: &ConsoleParts,
    session: &Session,
    id: &str,
    action: &str,
) -> Response<Bytes> {
    let accounts = &parts.accounts;
    match action {
        "revoke" => match accounts.revoke_key(id).await {
            Ok(key) => {
                let query = serde_urlencoded::to_string([("customer", key.customer.as_str())])
                    .unwrap_or_default();
                let notice = format!("Key {} revoked.", key.prefix);
                keys(parts, session, &query, None, Some(notice), None).await
            }
            Err(error) => keys(parts, session, "", None, None, Some(error.to_string())).await,
        },
        "rotate" => match accounts.rotate_key(id, None).await {
            Ok(created) => {
                let query = serde_urlencoded::to_string([("customer", created.customer.as_str())])
                    .unwrap_or_default();
                let created = Created::of("Rotated: the new key", &created);
                keys(parts, session, &query, Some(created), None, None).await
            }
            Err(error) => keys(parts, session, "", None, None, Some(error.to_string())).await,
        },
        _ => not_found(session),
    }
}

/// `POST /console/keys/{id}/limits`: the key's own limits (and its
/// rotation successors'), from the form's four fields; `clear` (or every
/// field empty) leaves only its customer's. Refused input changes nothing
/// and comes back in the open form, with the error naming the field.
pub(crate) async fn key_limits(
    parts: &ConsoleParts,
    session: &Session,
    id: &str,
    form: &[(String, String)],
) -> Response<Bytes> {
    let accounts = &parts.accounts;
    let clear = crate::field(form, "clear").is_some();
    let fields = if clear {
        LimitFields::default()
    } else {
        LimitFields::from_form(form)
    };
    let updated = match fields.parse() {
        Ok(limits) => {
            let update = KeyUpdate {
                limits: Some(limits),
                ..KeyUpdate::default()
            };
            accounts.update_key(id, update).await
        }
        Err(error) => Err(error),
    };
    match updated {
        Ok(key) => {
            let query = serde_urlencoded::to_string([("customer", key.customer.as_str())])
                .unwrap_or_default();
            let notice = match limits_line(key.limits.as_ref()) {
                Some(line) => format!("Limits of key {} saved: {line}.", key.prefix),
                None => format!(
                    "Limits of key {} cleared: only its customer's apply.",
                    key.prefix
                ),
            };
            keys(parts, session, &query, None, Some(notice), None).await
        }
        Err(error) => {
            // Shown where the key is listed, with the refused fields.
            let (query, message) = match accounts.key(id).await {
                Ok(key) => (
                    serde_urlencoded::to_string([("customer", key.customer.as_str())])
                        .unwrap_or_default(),
                    format!("Key {}: {error}", key.prefix),
                ),
                Err(_) => (String::new(), error.to_string()),
            };
            let editing = Some((id.to_owned(), fields));
            keys_editing(parts, session, &query, None, None, Some(message), editing).await
        }
    }
}

// ---------------------------------------------------------------------------
// Billing.

pub(crate) struct Line {
    pub(crate) customer: String,
    pub(crate) tier: String,
    pub(crate) requests: String,
    pub(crate) included: String,
    pub(crate) overage: String,
    pub(crate) overage_charge: Money,
    pub(crate) metered: Money,
    pub(crate) total: Money,
}

#[derive(Template)]
#[template(path = "billing.html")]
struct BillingPage<'a> {
    csrf: &'a str,
    period: String,
    closed: bool,
    closed_at: String,
    closable: bool,
    lines: Vec<Line>,
    total: Money,
    from: String,
    to: String,
    notice: Option<String>,
    error: Option<String>,
}

/// `/console/billing`: a month's billing summary; close a past month;
/// download the usage rows.
pub(crate) async fn billing(
    parts: &ConsoleParts,
    session: &Session,
    query: &str,
    notice: Option<String>,
    error: Option<String>,
) -> Response<Bytes> {
    let period = param(query, "period");
    let mut page = BillingPage {
        csrf: &session.csrf,
        period: period.clone().unwrap_or_default(),
        closed: false,
        closed_at: String::new(),
        closable: false,
        lines: Vec::new(),
        total: Money::of("0"),
        from: String::new(),
        to: String::new(),
        notice,
        error,
    };
    let reports = &parts.reports;
    let read = async {
        let summary = reports.billing_summary(period.as_deref()).await?;
        let current = reports.scope(&ReportParams::default()).await?;
        page.from = current.filter.from.to_string();
        page.to = current.filter.to.to_string();
        let this_month = page.from.get(..7).unwrap_or_default().to_owned();
        page.closable = !summary.closed && summary.period < this_month;
        page.period = summary.period.clone();
        page.closed = summary.closed;
        page.closed_at = summary
            .closed_at
            .as_deref()
            .and_then(|at| {
                time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok()
            })
            .map(utc)
            .unwrap_or_default();
        page.total = Money::of(&summary.total_usd);
        page.lines = summary
            .data
            .iter()
            .map(|line| Line {
                customer: line.customer.clone(),
                tier: line.tier.clone(),
                requests: count(line.requests),
                included: line
                    .included_requests
                    .map_or_else(|| "unlimited".to_owned(), count),
                overage: count(line.overage_requests),
                overage_charge: Money::of(&line.overage_charge_usd),
                metered: Money::of(&line.metered_cost_usd),
                total: Money::of(&line.total_usd),
            })
            .collect();
        Ok::<(), AccountError>(())
    };
    if let Err(error) = read.await {
        page.error.get_or_insert(error.to_string());
    }
    html(StatusCode::OK, page.render())
}

/// `POST /console/billing/close`.
pub(crate) async fn close_period(
    parts: &ConsoleParts,
    session: &Session,
    form: &[(String, String)],
) -> Response<Bytes> {
    let period = crate::field(form, "period").unwrap_or_default();
    let query = serde_urlencoded::to_string([("period", period)]).unwrap_or_default();
    match parts.reports.close(period).await {
        Ok(closed) => {
            let notice = format!("{} closed: its lines are frozen.", closed.period);
            billing(parts, session, &query, Some(notice), None).await
        }
        Err(error) => billing(parts, session, &query, None, Some(error.to_string())).await,
    }
}

/// The export range of `/console/billing/export`.
pub(crate) fn export_range(query: &str) -> ReportParams {
    range(query)
}
