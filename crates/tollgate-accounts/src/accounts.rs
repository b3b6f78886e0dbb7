//! Account operations: customers and keys as operators manage them, one
//! set of rules for the admin API, the CLI and the console. Tier and route
//! names must exist in config, `keys create` makes the customer when it is
//! new, rotation keeps the old key alive for its grace period, and every
//! input is checked here, naming the field to fix.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tollgate_metering::keys::{
    Customer, CustomerUpdate, KeyDigest, KeyFilter, KeyFormat, KeyRecord, KeyStatus, KeyUpdate,
    NewCustomer, NewKey, Page, PlainKey,
};
use tollgate_metering::limits::{KeyLimits, Limits};
use tollgate_metering::usage::format_usd;
use tollgate_metering::{CustomerId, KeyId, Store, StoreError};
use utoipa::ToSchema;

use crate::catalog::Catalog;

/// The longest page a list returns.
pub const MAX_PAGE: u32 = 1000;
/// The page size when none is asked for.
const DEFAULT_PAGE: u32 = 100;
/// How long a rotated key keeps working when no grace is given.
const DEFAULT_ROTATION_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Why an account operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// Bad input; `field` names what to fix.
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{0} not found")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AccountError {
    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        AccountError::Invalid {
            field,
            message: message.into(),
        }
    }
}

/// A key's own limits as operators write and read them, nested inside its
/// customer's: `rate` as in the configuration (e.g. `10/s`), counts as
/// integers, cost a decimal USD string. An absent field is no limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyLimitsView {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "10/s")]
    pub rate: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub monthly_requests: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub monthly_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "25.00")]
    pub monthly_cost_usd: Option<String>,
}

impl KeyLimitsView {
    /// Checked as the limiter reads them; an error names `limits` and the
    /// field within.
    pub fn parse(&self) -> Result<KeyLimits, AccountError> {
        let json = serde_json::to_value(self)
            .map_err(|error| AccountError::invalid("limits", error.to_string()))?;
        KeyLimits::from_json(&json)
            .map_err(|error| AccountError::invalid("limits", error.to_string()))
    }
}

impl From<&KeyLimits> for KeyLimitsView {
    fn from(limits: &KeyLimits) -> KeyLimitsView {
        KeyLimitsView {
            rate: limits.rate.map(|rate| rate.to_string()),
            monthly_requests: limits.monthly_requests,
            monthly_tokens: limits.monthly_tokens,
            monthly_cost_usd: limits.monthly_cost_nanos.map(format_usd),
        }
    }
}

/// A key as shown to operators: never the plaintext or the digest.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct KeyView {
    #[schema(value_type = uuid::Uuid)]
    pub id: KeyId,
    pub prefix: String,
    #[schema(value_type = uuid::Uuid)]
    pub customer_id: CustomerId,
    pub customer: String,
    pub tier: String,
    pub name: Option<String>,
    pub routes: Option<Vec<String>>,
    /// `active`, `revoked` or `expired`.
    #[schema(value_type = String, pattern = "^(active|revoked|expired)$")]
    pub status: KeyStatus,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    /// The key's own limits (shared with the keys it replaced or that
    /// replace it); `null` for none.
    pub limits: Option<KeyLimitsView>,
}

/// A key just made: the one time its plaintext is shown.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    #[schema(value_type = uuid::Uuid)]
    pub id: KeyId,
    /// The plaintext key: shown this once, never stored.
    pub key: String,
    pub prefix: String,
    #[schema(value_type = uuid::Uuid)]
    pub customer_id: CustomerId,
    pub customer: String,
    pub tier: String,
    pub name: Option<String>,
    pub routes: Option<Vec<String>>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// Set on rotation: when the replaced key stops working.
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub old_key_expires_at: Option<OffsetDateTime>,
    /// The key's own limits; `null` for none.
    pub limits: Option<KeyLimitsView>,
}

/// A customer as shown to operators.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct CustomerView {
    #[schema(value_type = uuid::Uuid)]
    pub id: CustomerId,
    #[schema(value_type = uuid::Uuid)]
    pub customer_id: CustomerId,
    pub name: String,
    pub customer: String,
    pub tier: String,
    /// The customer's own limits over its tier's (an object; see the
    /// configuration's tier fields).
    #[schema(value_type = Object)]
    pub overrides: serde_json::Value,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl From<Customer> for CustomerView {
    fn from(c: Customer) -> Self {
        CustomerView {
            id: c.id,
            customer_id: c.id,
            customer: c.name.clone(),
            name: c.name,
            tier: c.tier,
            overrides: c.overrides,
            created_at: c.created_at,
        }
    }
}

/// What a key is to be created with.
#[derive(Clone, Debug, Default)]
pub struct KeyRequest {
    /// Name or id.
    pub customer: String,
    /// Required when the customer does not exist yet; else must match.
    pub tier: Option<String>,
    pub name: Option<String>,
    pub expires_at: Option<OffsetDateTime>,
    pub routes: Option<Vec<String>>,
    /// The key's own limits.
    pub limits: Option<KeyLimits>,
}

/// The account operations, over a store and the loaded config's catalog.
pub struct Accounts {
    store: Arc<dyn Store>,
    format: KeyFormat,
    /// The configured routes and tiers; replaced on a config reload.
    catalog: RwLock<Arc<Catalog>>,
}

impl Accounts {
    pub fn new(store: Arc<dyn Store>, format: KeyFormat, catalog: Catalog) -> Accounts {
        Accounts {
            store,
            format,
            catalog: RwLock::new(Arc::new(catalog)),
        }
    }

    /// The routes and tiers new customers and keys are checked against,
    /// and `GET /v1/routes` and `GET /v1/tiers` show, from now on (after a
    /// config reload).
    pub fn set_catalog(&self, catalog: Catalog) {
        *self.catalog.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(catalog);
    }

    /// The loaded config's routes and tiers.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn check_tier(&self, field: &'static str, tier: &str) -> Result<(), AccountError> {
        let catalog = self.catalog();
        if catalog.has_tier(tier) {
            return Ok(());
        }
        let known = if catalog.tiers.is_empty() {
            "no tiers are configured".to_owned()
        } else {
            format!("configured tiers: {}", catalog.tier_names())
        };
        Err(AccountError::invalid(
            field,
            format!("unknown tier {tier:?} ({known})"),
        ))
    }

    fn check_routes(&self, routes: &[String]) -> Result<(), AccountError> {
        if routes.is_empty() {
            return Err(AccountError::invalid(
                "routes",
                "an empty route list would make the key useless; omit it to allow every route",
            ));
        }
        let catalog = self.catalog();
        for route in routes {
            if !catalog.has_route(route) {
                return Err(AccountError::invalid(
                    "routes",
                    format!(
                        "unknown route {route:?} (configured routes: {})",
                        catalog.route_names()
                    ),
                ));
            }
        }
        Ok(())
    }

    pub async fn create_customer(
        &self,
        name: &str,
        tier: &str,
        overrides: Option<serde_json::Value>,
    ) -> Result<CustomerView, AccountError> {
        check_name("name", name)?;
        self.check_tier("tier", tier)?;
        let overrides = check_overrides(overrides.unwrap_or_else(|| serde_json::json!({})))?;
        if self.store.find_customer(name).await?.is_some() {
            return Err(AccountError::invalid(
                "name",
                format!("customer {name:?} already exists"),
            ));
        }
        let customer = self
            .store
            .create_customer(NewCustomer {
                id: CustomerId::new(),
                name: name.to_owned(),
                tier: tier.to_owned(),
                overrides,
                created_at: now(),
            })
            .await
            .map_err(|error| match error {
                StoreError::Conflict(message) => AccountError::invalid("name", message),
                other => other.into(),
            })?;
        Ok(customer.into())
    }

    pub async fn customer(&self, name_or_id: &str) -> Result<CustomerView, AccountError> {
        Ok(self.find_customer(name_or_id).await?.into())
    }

    async fn find_customer(&self, name_or_id: &str) -> Result<Customer, AccountError> {
        self.store
            .find_customer(name_or_id)
            .await?
            .ok_or_else(|| AccountError::NotFound(format!("customer {name_or_id:?}")))
    }

    pub async fn list_customers(
        &self,
        after: Option<&str>,
        limit: Option<u32>,
    ) -> Result<(Vec<CustomerView>, Option<String>), AccountError> {
        let limit = page_limit(limit)?;
        let after = parse_cursor::<CustomerId>(after)?;
        let customers = self.store.list_customers(Page { after, limit }).await?;
        let next = next_cursor(&customers, limit, |c| c.id.to_string());
        Ok((customers.into_iter().map(Into::into).collect(), next))
    }

    pub async fn update_customer(
        &self,
        name_or_id: &str,
        tier: Option<String>,
        overrides: Option<serde_json::Value>,
    ) -> Result<CustomerView, AccountError> {
        if let Some(tier) = &tier {
            self.check_tier("tier", tier)?;
        }
        let overrides = overrides.map(check_overrides).transpose()?;
        let customer = self.find_customer(name_or_id).await?;
        let updated = self
            .store
            .update_customer(customer.id, CustomerUpdate { tier, overrides })
            .await?;
        Ok(updated.into())
    }

    /// Creates a key, and its customer when `request.tier` is given and the
    /// customer does not exist yet.
    pub async fn create_key(&self, request: KeyRequest) -> Result<CreatedKey, AccountError> {
        if let Some(routes) = &request.routes {
            self.check_routes(routes)?;
        }
        if let Some(name) = &request.name {
            check_label("name", name)?;
        }
        let created_at = now();
        let mut request = request;
        request.expires_at = request.expires_at.map(in_utc).transpose()?;
        if request.expires_at.is_some_and(|at| at <= created_at) {
            return Err(AccountError::invalid("expires_at", "must be in the future"));
        }
        let customer = match self.store.find_customer(&request.customer).await? {
            Some(customer) => {
                if let Some(tier) = &request.tier {
                    if *tier != customer.tier {
                        return Err(AccountError::invalid(
                            "tier",
                            format!(
                                "customer {:?} has tier {:?}; change it with `customers set-tier`",
                                customer.name, customer.tier
                            ),
                        ));
                    }
                }
                customer
            }
            None => {
                let Some(tier) = &request.tier else {
                    return Err(AccountError::NotFound(format!(
                        "customer {:?} (give a tier to create it)",
                        request.customer
                    )));
                };
                match self.create_customer(&request.customer, tier, None).await {
                    Ok(view) => self.find_customer(&view.id.to_string()).await?,
                    // Made meanwhile by another request for a key of the
                    // same new customer: that one, if its tier is this.
                    Err(error) => match self.store.find_customer(&request.customer).await? {
                        Some(customer) if customer.tier == *tier => customer,
                        _ => return Err(error),
                    },
                }
            }
        };
        let (plain, new) = self.new_key(&customer, &request, created_at)?;
        let record = self.store.create_key(new).await?;
        Ok(created(plain, &record, &customer, None))
    }

    fn new_key(
        &self,
        customer: &Customer,
        request: &KeyRequest,
        created_at: OffsetDateTime,
    ) -> Result<(PlainKey, NewKey), AccountError> {
        let plain = self.format.generate().map_err(|error| {
            AccountError::Store(StoreError::Config(format!(
                "the OS random source failed: {error}"
            )))
        })?;
        let new = NewKey {
            id: KeyId::new(),
            customer_id: customer.id,
            digest: KeyDigest::of(plain.expose()),
            prefix: self.format.display_prefix(plain.expose()),
            name: request.name.clone(),
            routes: request.routes.clone(),
            created_at,
            expires_at: request.expires_at,
            family_id: KeyId::new(),
            limits: request.limits.clone().filter(|limits| !limits.is_empty()),
        };
        let new = NewKey {
            family_id: new.id,
            ..new
        };
        Ok((plain, new))
    }

    pub async fn key(&self, id_or_prefix: &str) -> Result<KeyView, AccountError> {
        let record = self.find_key(id_or_prefix).await?;
        self.view(record).await
    }

    async fn find_key(&self, id_or_prefix: &str) -> Result<KeyRecord, AccountError> {
        self.store
            .find_key(id_or_prefix)
            .await
            .map_err(|error| match error {
                StoreError::Conflict(message) => AccountError::invalid("id", message),
                other => other.into(),
            })?
            .ok_or_else(|| AccountError::NotFound(format!("key {id_or_prefix:?}")))
    }

    async fn view(&self, record: KeyRecord) -> Result<KeyView, AccountError> {
        let customer = self
            .store
            .customer(record.customer_id)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("key {} has no customer", record.id)))?;
        Ok(key_view(record, &customer))
    }

    pub async fn list_keys(
        &self,
        customer: Option<&str>,
        status: Option<&str>,
        after: Option<&str>,
        limit: Option<u32>,
    ) -> Result<(Vec<KeyView>, Option<String>), AccountError> {
        let limit = page_limit(limit)?;
        let after = parse_cursor::<KeyId>(after)?;
        let status = status.map(parse_status).transpose()?;
        let customer = match customer {
            Some(c) => Some(self.find_customer(c).await?),
            None => None,
        };
        let filter = KeyFilter {
            customer: customer.as_ref().map(|c| c.id),
            status,
            now: Some(now()),
        };
        let records = self.store.list_keys(filter, Page { after, limit }).await?;
        let next = next_cursor(&records, limit, |k| k.id.to_string());
        let mut views = Vec::with_capacity(records.len());
        for record in records {
            views.push(match &customer {
                Some(c) => key_view(record, c),
                None => self.view(record).await?,
            });
        }
        Ok((views, next))
    }

    /// Changes a key's name, routes or expiry, checked as at creation: a
    /// route must be configured, a name short and printable, an expiry in
    /// the future. `None` leaves a field; `Some(None)` clears it. The data
    /// plane sees the change within the change feed's delay.
    pub async fn update_key(
        &self,
        id_or_prefix: &str,
        mut update: KeyUpdate,
    ) -> Result<KeyView, AccountError> {
        if let Some(Some(name)) = &update.name {
            check_label("name", name)?;
        }
        if let Some(Some(routes)) = &update.routes {
            self.check_routes(routes)?;
        }
        if let Some(Some(at)) = update.expires_at {
            let at = in_utc(at)?;
            if at <= now() {
                return Err(AccountError::invalid("expires_at", "must be in the future"));
            }
            update.expires_at = Some(Some(at));
        }
        if let Some(limits) = &mut update.limits {
            limits.take_if(|limits| limits.is_empty());
        }
        let record = self.find_key(id_or_prefix).await?;
        let updated = self.store.update_key(record.id, update).await?;
        self.view(updated).await
    }

    pub async fn revoke_key(&self, id_or_prefix: &str) -> Result<KeyView, AccountError> {
        let record = self.find_key(id_or_prefix).await?;
        let revoked = self.store.revoke_key(record.id, now()).await?;
        self.view(revoked).await
    }

    pub async fn rotate_key(
        &self,
        id_or_prefix: &str,
        grace: Option<Duration>,
    ) -> Result<CreatedKey, AccountError> {
        let old = self.find_key(id_or_prefix).await?;
        if old.revoked_at.is_some() {
            return Err(AccountError::invalid(
                "id",
                "a revoked key cannot be rotated",
            ));
        }
        let customer = self
            .store
            .customer(old.customer_id)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("key {} has no customer", old.id)))?;
        let created_at = now();
        let old_expires_at = expiry_after(
            "grace_seconds",
            created_at,
            grace.unwrap_or(DEFAULT_ROTATION_GRACE),
        )?;
        let request = KeyRequest {
            customer: customer.name.clone(),
            tier: None,
            name: old.name.clone(),
            expires_at: old.expires_at.filter(|at| *at > created_at),
            routes: old.routes.clone(),
            // The store gives the successor the old key's family and limits.
            limits: None,
        };
        let (plain, new) = self.new_key(&customer, &request, created_at)?;
        let (old, new) = self.store.rotate_key(old.id, new, old_expires_at).await?;
        Ok(created(plain, &new, &customer, old.expires_at))
    }
}

fn created(
    plain: PlainKey,
    record: &KeyRecord,
    customer: &Customer,
    old_key_expires_at: Option<OffsetDateTime>,
) -> CreatedKey {
    CreatedKey {
        id: record.id,
        key: plain.expose().to_owned(),
        prefix: record.prefix.clone(),
        customer_id: customer.id,
        customer: customer.name.clone(),
        tier: customer.tier.clone(),
        name: record.name.clone(),
        routes: record.routes.clone(),
        created_at: record.created_at,
        expires_at: record.expires_at,
        old_key_expires_at,
        limits: record.limits.as_ref().map(KeyLimitsView::from),
    }
}

fn key_view(record: KeyRecord, customer: &Customer) -> KeyView {
    KeyView {
        status: record.status(now()),
        id: record.id,
        prefix: record.prefix,
        customer_id: customer.id,
        customer: customer.name.clone(),
        tier: customer.tier.clone(),
        name: record.name,
        routes: record.routes,
        created_at: record.created_at,
        expires_at: record.expires_at,
        revoked_at: record.revoked_at,
        limits: record.limits.as_ref().map(KeyLimitsView::from),
    }
}

fn now() -> OffsetDateTime {
    // Stored with microsecond precision; truncate so what we return equals
    // what a later read returns.
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000 * 1_000)
        .unwrap_or(now)
}

/// `start + lifetime`, or a usage error naming `field` when that instant
/// is past what a timestamp can hold (the end of year 9999, UTC). The
/// lifetime comes from the user (a grace period, `--expires-in`), so the
/// sum is checked rather than trusted.
pub fn expiry_after(
    field: &'static str,
    start: OffsetDateTime,
    lifetime: Duration,
) -> Result<OffsetDateTime, AccountError> {
    time::Duration::try_from(lifetime)
        .ok()
        .and_then(|lifetime| start.checked_add(lifetime))
        .and_then(|at| at.checked_to_offset(time::UtcOffset::UTC))
        .ok_or_else(|| {
            AccountError::invalid(
                field,
                format!(
                    "{} seconds is out of range: the expiry would be after 9999-12-31T23:59:59Z",
                    lifetime.as_secs()
                ),
            )
        })
}

/// An expiry as UTC. An instant given with an offset can lie outside the
/// years a timestamp holds once converted (`9999-12-31T23:59:59-23:59`);
/// such a value is refused here, before a store has to convert it.
fn in_utc(at: OffsetDateTime) -> Result<OffsetDateTime, AccountError> {
    at.checked_to_offset(time::UtcOffset::UTC).ok_or_else(|| {
        AccountError::invalid(
            "expires_at",
            "out of range: must be at most 9999-12-31T23:59:59Z",
        )
    })
}

/// Characters that change how the text around them is shown without
/// showing themselves: bidirectional overrides and isolates, marks,
/// zero-width characters. In a name they let one name pass for another
/// on the console, in tables and on invoices.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{061C}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2069}'
            | '\u{FEFF}'
    )
}

fn check_name(field: &'static str, name: &str) -> Result<(), AccountError> {
    if name.is_empty() || name.chars().count() > 128 {
        return Err(AccountError::invalid(field, "must be 1 to 128 characters"));
    }
    if name.chars().any(|c| c.is_control() || is_invisible(c)) {
        return Err(AccountError::invalid(
            field,
            "must not contain control characters or invisible ones (direction marks, zero-width characters)",
        ));
    }
    // A name that parses as a UUID would be ambiguous with an id.
    if uuid::Uuid::parse_str(name).is_ok() {
        return Err(AccountError::invalid(
            field,
            "must not look like an id (a UUID)",
        ));
    }
    Ok(())
}

fn check_label(field: &'static str, label: &str) -> Result<(), AccountError> {
    if label.chars().count() > 128 || label.chars().any(|c| c.is_control() || is_invisible(c)) {
        return Err(AccountError::invalid(
            field,
            "must be at most 128 characters without control or invisible characters",
        ));
    }
    Ok(())
}

/// Overrides are checked with the limiter's own parser, so a value the
/// admin API accepts is one the limiter understands.
fn check_overrides(overrides: serde_json::Value) -> Result<serde_json::Value, AccountError> {
    match Limits::default().with_overrides(&overrides) {
        Ok(_) => Ok(overrides),
        Err(error) => Err(AccountError::invalid("overrides", error.to_string())),
    }
}

fn parse_status(status: &str) -> Result<KeyStatus, AccountError> {
    match status {
        "active" => Ok(KeyStatus::Active),
        "revoked" => Ok(KeyStatus::Revoked),
        "expired" => Ok(KeyStatus::Expired),
        other => Err(AccountError::invalid(
            "status",
            format!("unknown status {other:?} (active, revoked or expired)"),
        )),
    }
}

pub(crate) fn page_limit(limit: Option<u32>) -> Result<u32, AccountError> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(_) => Err(AccountError::invalid(
            "limit",
            format!("must be between 1 and {MAX_PAGE}"),
        )),
    }
}

pub(crate) fn parse_cursor<T: std::str::FromStr>(
    cursor: Option<&str>,
) -> Result<Option<T>, AccountError> {
    cursor
        .map(|c| {
            c.parse()
                .map_err(|_| AccountError::invalid("cursor", "not a cursor this API returned"))
        })
        .transpose()
}

pub(crate) fn next_cursor<T>(items: &[T], limit: u32, id: impl Fn(&T) -> String) -> Option<String> {
    if items.len() as u64 == u64::from(limit) {
        items.last().map(id)
    } else {
        None
    }
}
