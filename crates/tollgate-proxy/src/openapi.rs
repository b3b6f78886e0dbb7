//! The admin API's OpenAPI 3.1 document, `GET /v1/openapi.json`.
//!
//! Bodies, parameters and answers are the handlers' own types (their
//! `ToSchema` and `IntoParams` derives); each operation below stands for one
//! row of the router's table, and a test holds the two lists equal. The
//! functions are descriptions only: [`Admin`](crate::Admin) answers.

// The operations are described, not called.
#![allow(dead_code)]

use std::sync::LazyLock;

use bytes::Bytes;
use tollgate_accounts::{
    BillingSummary, CreatedKey, CustomerView, DeliveryView, KeyView, ReloadReport, RouteView,
    TierView, UsageRows, UsageSummary,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::admin::{
    BillingQuery, CreateCustomer, CreateKey, CustomersQuery, DeliveriesQuery, ExportQuery,
    KeysQuery, List, PatchCustomer, PatchKey, RangeQuery, RotateKey, TopQuery,
};
use crate::error::ErrorBody;
use crate::quota::QuotaDocument;

/// The document, serialized once.
pub(crate) static DOCUMENT: LazyLock<Bytes> = LazyLock::new(|| {
    let mut document = AdminApi::openapi();
    document.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let mut document = serde_json::to_value(document).unwrap_or_default();
    camel_case_links(&mut document);
    Bytes::from(serde_json::to_vec_pretty(&document).unwrap_or_default())
});

/// utoipa (5.5) writes a Link object's fields in snake case; OpenAPI
/// spells them `operationId`, `operationRef` and `requestBody`.
fn camel_case_links(document: &mut serde_json::Value) {
    let Some(paths) = document.get_mut("paths").and_then(|p| p.as_object_mut()) else {
        return;
    };
    let links = paths
        .values_mut()
        .filter_map(|item| item.as_object_mut())
        .flat_map(|item| item.values_mut())
        .filter_map(|operation| operation.get_mut("responses")?.as_object_mut())
        .flat_map(|responses| responses.values_mut())
        .filter_map(|response| response.get_mut("links")?.as_object_mut())
        .flat_map(|links| links.values_mut())
        .filter_map(|link| link.as_object_mut());
    for link in links {
        for (snake, camel) in [
            ("operation_id", "operationId"),
            ("operation_ref", "operationRef"),
            ("request_body", "requestBody"),
        ] {
            if let Some(value) = link.remove(snake) {
                link.insert(camel.to_owned(), value);
            }
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tollgate admin API",
        description = "Customers, keys, usage reports and billing of a Tollgate gateway. \
            Every operation needs `Authorization: Bearer <admin token>` but this document. \
            Errors have one shape, `{\"error\": {\"type\", \"code\", \"message\"}}`; \
            bad input is 400 `invalid_request` naming the field. Money is a decimal USD \
            string; dates are UTC `YYYY-MM-DD`, `from` and `to` inclusive.",
        license(name = "Apache-2.0")
    ),
    paths(
        reload,
        create_customer,
        list_customers,
        get_customer,
        patch_customer,
        create_key,
        list_keys,
        get_key,
        patch_key,
        revoke_key,
        rotate_key,
        usage_summary,
        usage_daily,
        usage_by_customer,
        usage_by_route,
        usage_by_model,
        usage_by_key,
        usage_top_customers,
        usage_export,
        billing_summary,
        close_period,
        quota,
        routes,
        tiers,
        list_deliveries,
        retry_delivery,
        openapi_document,
    ),
    modifiers(&AdminToken),
    security(("admin_token" = [])),
    tags(
        (name = "customers"),
        (name = "keys"),
        (name = "usage"),
        (name = "billing"),
        (name = "configuration"),
        (name = "webhooks"),
    )
)]
struct AdminApi;

/// Bearer admin tokens (`admin.tokens`).
struct AdminToken;

impl Modify for AdminToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Re-reads the configuration file, as SIGHUP does; a file that does not
/// load changes nothing.
#[utoipa::path(post, path = "/v1/reload", tag = "configuration", responses(
    (status = 200, description = "What changed", body = ReloadReport),
    (status = 400, description = "The file does not load; nothing changed", body = ErrorBody),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
    (status = 500, description = "Unexpected failure", body = ErrorBody),
))]
fn reload() {}

/// Creates a customer.
#[utoipa::path(post, path = "/v1/customers", tag = "customers", request_body = CreateCustomer,
    responses(
    (status = 201, description = "Created", body = CustomerView,
        links(
            ("GetCustomer" = (operation_id = "get_customer",
                parameters(("customer" = "$response.body#/id")))),
            ("PatchCustomer" = (operation_id = "patch_customer",
                parameters(("customer" = "$response.body#/id")))),
            ("Quota" = (operation_id = "quota", parameters(("customer" = "$response.body#/id")))),
        )),
    (status = 400, description = "Bad input, a name taken, an unknown tier", body = ErrorBody),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
    (status = 500, description = "Unexpected failure", body = ErrorBody),
    (status = 503, description = "The database does not answer", body = ErrorBody),
))]
fn create_customer() {}

/// Customers in creation order, a page at a time.
#[utoipa::path(get, path = "/v1/customers", tag = "customers", params(CustomersQuery),
    responses(
    (status = 200, description = "A page", body = List<CustomerView>),
    (status = 400, description = "Bad input", body = ErrorBody),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
    (status = 500, description = "Unexpected failure", body = ErrorBody),
    (status = 503, description = "The database does not answer", body = ErrorBody),
))]
fn list_customers() {}

/// One customer.
#[utoipa::path(get, path = "/v1/customers/{customer}", tag = "customers",
    params(("customer" = String, Path, description = "The customer's id or name")),
    responses(
    (status = 200, description = "The customer", body = CustomerView),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
    (status = 404, description = "No such customer", body = ErrorBody),
    (status = 500, description = "Unexpected failure", body = ErrorBody),
    (status = 503, description = "The database does not answer", body = ErrorBody),
))]
fn get_customer() {}

/// Changes a customer's tier or overrides; live on every instance within
/// a second.
#[utoipa::path(patch, path = "/v1/customers/{customer}", tag = "customers",
    params(("customer" = String, Path, description = "The customer's id or name")),
    request_body = PatchCustomer,
    responses(
    (status = 200, description = "The customer as changed", body = CustomerView),
    (status = 400, description = "Bad input", body = ErrorBody),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
    (status = 404, description = "No such customer", body = ErrorBody),
    (status = 500, description = "Unexpected failure", body = ErrorBody),
    (status = 503, description = "The database does not answer", body = ErrorBody),
))]
fn patch_customer() {}

/// Creates a key (and its customer, given a tier, when it is new). The
/// plaintext is in this answer only.
#[utoipa::path(post, path = "/v1/keys", tag = "keys", request_body = CreateKey,
    responses(
    (status = 201, description = "Created; `key` is the plaintext", body = CreatedKey,
        links(
            ("GetKey" = (operation_id = "get_key", parameters(("id" = "$response.body#/id")))),
            ("PatchKey" = (operation_id = "patch_key", parameters(("id" = "$response.body#/id")))),
            ("RevokeKey" = (operation_id = "revoke_key", parameters(("id" = "$response.body#/id")))),
            ("RotateKey" = (operation_id = "rotate_key", parameters(("id" = "$response.body#/id")))),
        )),
    (status = 400, description = "Bad input", body = ErrorBody),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
    (status = 404, description = "No such customer and no tier to create it", body = ErrorBody),
    (status = 500, description = "Unexpected failure", body = ErrorBody),
    (status = 503, description = "The database does not answer", body = ErrorBody),
))]
fn create_key() {}

/// Keys in creation order, a page at a time; never the plaintext.
#[utoipa::path(get, path = "/v1/keys", tag = "keys", params(KeysQuery),
    responses(
    (status = 200, description = "A page", body = List<KeyView>),
    (status = 400, description = "Bad input", body = ErrorBody),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
    (status = 404, description = "No such customer", body = ErrorBody),
    (status = 500, description = "Unexpected failure", body = ErrorBody),
    (status = 503, description = "The database does not answer", body = ErrorBody),
))]
fn list_keys() {}

/// One key.
#[utoipa::path(get, path = "/v1/keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "The key's id or display prefix")),
    responses(
    (status = 200, description = "The key", body = KeyView),
    (status = 400, description = "A prefix shared by several keys", body = ErrorBody),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
    (status = 404, description = "No such key", body = ErrorBody),
    (status = 500, description = "Unexpected failure", body = ErrorBody),
    (status = 503, description = "The database does not answer", body = ErrorBody),
))]
fn get_key() {}

/// Changes a key's name, routes or expiry; live on every instance within
/// a second.
#[utoipa::path(patch, path = "/v1/keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "The key's id or display prefix")),
    request_body = PatchKey,
    responses(
    (status = 200, description = "The key as changed", body = KeyView),
    (status = 400, description = "Bad input; nothing changed", body = ErrorBody),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
    (status = 404, description = "No such key", body = ErrorBody),
    (status = 500, description = "Unexpected failure", body = ErrorBody),
    (status = 503, description = "The database does not answer", body = ErrorBody),
))]
fn patch_key() {}

/// Revokes a key; every instance refuses it within a second.
#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "The key's id or display prefix")),
    responses(
    (status = 204, description = "Revoked (again is a no-op)"),
    (status = 400, description = "A prefix shared by several keys", body = ErrorBody),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
    (status = 404, description = "No such key", body = ErrorBody),
    (status = 500, description = "Unexpected failure", body = ErrorBody),
    (status = 503, description = "The database does not answer", body = ErrorBody),
))]
fn revoke_key() {}

/// Makes a new key for the same customer; the old one works for the
/// grace period only.
#[utoipa::path(post, path = "/v1/keys/{id}/rotate", tag = "keys",
    params(("id" = String, Path, description = "The key's id or display prefix")),
    request_body(content = Option<RotateKey>, description = "May be left out"),
    responses(
    (status = 201, description = "The new key, with `old_key_expires_at`", body = CreatedKey),
    (status = 400, description = "Bad input, or a revoked key", body = ErrorBody),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
    (status = 404, description = "No such key", body = ErrorBody),
    (status = 500, description = "Unexpected failure", body = ErrorBody),
    (status = 503, description = "The database does not answer", body = ErrorBody),
))]
fn rotate_key() {}

/// One set of sums for the range.
#[utoipa::path(get, path = "/v1/usage/summary", tag = "usage", params(RangeQuery),
    responses(
    (status = 200, description = "The sums", body = UsageSummary),
    (status = 400, description = "Bad input", body = ErrorBody),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
    (status = 500, description = "Unexpected failure", body = ErrorBody),
    (status = 503, description = "The database does not answer", body = ErrorBody),
))]
fn usage_summary() {}

/// One row per day with usage, in date order.
#[utoipa::path(get, path = "/v1/usage/daily", tag = "usage", params(RangeQuery),
    responses(
    (status = 200, description = "The rows", body = UsageRows),
    (status = 400, description = "Bad input", body = ErrorBody),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
    (status = 500, description = "Unexpected failure", body = ErrorBody),
    (status = 503, description = "The database does not answer", body = ErrorBody),
))]
fn usage_daily() {}

/// One row per customer with usage, by name.
#[utoipa::path(get, path = "/v1/usage/by-customer", tag = "usage", params(RangeQuery),
    responses(
    (status = 200, description = "The rows", body = UsageRows),
    (status = 400, description = "Bad input", body = ErrorBody),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
    (status = 500, description = "Unexpected failure", body = ErrorBody),
    (status = 503, description = "The database does not answer", body = ErrorBody),
))]
fn usage_by_customer() {}

/// One row per route with usage, by name.
#[utoipa::path(get, path = "/v1/usage/by-route", tag = "usage", params(RangeQuery),
    responses(
    (status = 200, description = "The rows", body = UsageRows),
    (status = 400, description = "Bad input", body = ErrorBody),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
    (status = 500, description = "Unexpected failure", body = ErrorBody),
    (status = 503, description = "The database does not answer", body = ErrorBody),
))]
fn usage_by_route() {}

/// One row per model with usage (`null` for rows without one), by name.
#[utoipa::path(get, path = "/v1/usage/by-model", tag = "usage", params(RangeQuery),
    responses(
    (status = 200, description = "The rows", body = UsageRows),
    (status = 400, description = "Bad input", body = ErrorBody),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
    (status = 500, description = "Unexpected failure", body = ErrorBody),
    (status = 503, description = "The database does not answer", body = ErrorBody),
))]
fn usage_by_model() {}

/// One row per key with usage, with its prefix, name and customer.
#[utoipa::path(get, path = "/v1/usage/by-key", tag = "usage", params(RangeQuery),
    responses(
    (status = 200, description = "The rows", body = UsageRows),
    (status = 400, description = "Bad input", body = ErrorBody),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
    (status = 500, description = "Unexpected failure", body = ErrorBody),
    (status = 503, description = "The database does not answer", body = ErrorBody),
))]
fn usage_by_key() {}

/// The customers with the most cost, requests or tokens, largest first.
#[utoipa::path(get, path = "/v1/usage/top-customers", tag = "usage", params(RangeQuery, TopQuery),
    responses(
    (status = 200, description = "The ranking", body = UsageRows),
    (status = 400, description = "Bad input", body = ErrorBody),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
    (status = 500, description = "Unexpected failure", body = ErrorBody),
    (status = 503, description = "The database does not answer", body = ErrorBody),
))]
fn usage_top_customers() {}

/// The raw usage rows of the range, streamed as RFC 4180 CSV with a
/// header row of the column names.
#[utoipa::path(get, path = "/v1/usage/export", tag = "usage", params(RangeQuery, ExportQuery),
    responses(
    (status = 200, description = "The rows", content_type = "text/csv", body = String),
    (status = 400, description = "Bad input", body = ErrorBody),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
    (status = 500, description = "Unexpected failure", body = ErrorBody),
    (status = 503, description = "The database does not answer", body = ErrorBody),
))]
fn usage_export() {}

/// Every customer's bill for a month: the frozen lines of a closed month,
/// else computed now.
#[utoipa::path(get, path = "/v1/billing/summary", tag = "billing", params(BillingQuery),
    responses(
    (status = 200, description = "The month's billing", body = BillingSummary),
    (status = 400, description = "Bad input", body = ErrorBody),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
    (status = 500, description = "Unexpected failure", body = ErrorBody),
    (status = 503, description = "The database does not answer", body = ErrorBody),
))]
fn billing_summary() {}

/// Freezes a past month's billing lines; again returns the same lines.
#[utoipa::path(post, path = "/v1/billing/periods/{period}/close", tag = "billing",
    params(("period" = String, Path, description = "`YYYY-MM`, before the current month")),
    responses(
    (status = 200, description = "The closed month", body = BillingSummary),
    (status = 400, description = "Bad input, or a month not yet over", body = ErrorBody),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
    (status = 500, description = "Unexpected failure", body = ErrorBody),
    (status = 503, description = "The database does not answer", body = ErrorBody),
))]
fn close_period() {}

/// A customer's limits, usage and resets this month, as the gateway
/// counts them.
#[utoipa::path(get, path = "/v1/quota/{customer}", tag = "customers",
    params(("customer" = String, Path, description = "The customer's id or name")),
    responses(
    (status = 200, description = "Limits and usage", body = QuotaDocument),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
    (status = 404, description = "No such customer", body = ErrorBody),
    (status = 500, description = "Unexpected failure", body = ErrorBody),
    (status = 503, description = "The database does not answer", body = ErrorBody),
))]
fn quota() {}

/// The loaded configuration's routes, in file order; header values the
/// gateway sets upstream are redacted.
#[utoipa::path(get, path = "/v1/routes", tag = "configuration", responses(
    (status = 200, description = "The routes", body = List<RouteView>),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
))]
fn routes() {}

/// The loaded configuration's tiers, in file order.
#[utoipa::path(get, path = "/v1/tiers", tag = "configuration", responses(
    (status = 200, description = "The tiers", body = List<TierView>),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
))]
fn tiers() {}

/// Webhook deliveries, newest first, a page at a time.
#[utoipa::path(get, path = "/v1/webhooks/deliveries", tag = "webhooks", params(DeliveriesQuery),
    responses(
    (status = 200, description = "A page", body = List<DeliveryView>),
    (status = 400, description = "Bad input", body = ErrorBody),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
    (status = 500, description = "Unexpected failure", body = ErrorBody),
    (status = 503, description = "The database does not answer", body = ErrorBody),
))]
fn list_deliveries() {}

/// Attempts a delivery now (again, for a delivered or failed one), with
/// the same `webhook-id`; answers with the delivery after the attempt.
#[utoipa::path(post, path = "/v1/webhooks/deliveries/{id}/retry", tag = "webhooks",
    params(("id" = String, Path, description = "The delivery's id")),
    responses(
    (status = 200, description = "The delivery after the attempt", body = DeliveryView),
    (status = 401, description = "No or a wrong admin token", body = ErrorBody),
    (status = 404, description = "No such delivery", body = ErrorBody),
    (status = 500, description = "Unexpected failure", body = ErrorBody),
    (status = 503, description = "The database does not answer", body = ErrorBody),
))]
fn retry_delivery() {}

/// This document; needs no token.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "configuration", security(()),
    responses(
    (status = 200, description = "OpenAPI 3.1", content_type = "application/json", body = Object),
))]
fn openapi_document() {}

/// Every operation in the document, as (method, path).
#[cfg(test)]
pub(crate) fn operations() -> Vec<(String, String)> {
    let document = AdminApi::openapi();
    let mut operations = Vec::new();
    for (path, item) in &document.paths.paths {
        let methods = [
            ("GET", item.get.is_some()),
            ("POST", item.post.is_some()),
            ("PATCH", item.patch.is_some()),
            ("DELETE", item.delete.is_some()),
            ("PUT", item.put.is_some()),
        ];
        for (method, present) in methods {
            if present {
                operations.push((method.to_owned(), path.clone()));
            }
        }
    }
    operations.sort();
    operations
}
