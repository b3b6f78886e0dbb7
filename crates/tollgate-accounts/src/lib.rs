//! Tollgate's account operations, as operators use them through the admin
//! API, the CLI and the console: one set of rules for all three, so they
//! agree by construction.
//!
//! - [`Accounts`]: customers and keys: create, look up by name, id or
//!   display prefix, list a page at a time, update, revoke, rotate.
//! - [`Reports`]: usage summaries, breakdowns, rankings and the export,
//!   read from the daily rollups so a report costs the same at any volume;
//!   the monthly billing summary and closing a period.
//! - [`Catalog`]: the loaded config's routes and tiers as operators see
//!   them (no secrets), which names are checked against.
//!
//! Both work over a [`tollgate_metering::Store`]; what a backend keeps and
//! the rules over its rows are in `tollgate_metering`.

#![warn(unreachable_pub)]

mod accounts;
mod catalog;
mod reports;
mod webhooks;

pub use crate::{
    accounts::{
        expiry_after, AccountError, Accounts, CreatedKey, CustomerView, KeyLimitsView, KeyRequest,
        KeyView, MAX_PAGE,
    },
    catalog::{Catalog, Changed, NameChanges, ReloadReport, RouteView, TierView, REDACTED},
    reports::{
        BillingLineView, BillingSummary, ReportParams, ReportScope, Reports, RowGroup, Scope,
        UsageRow, UsageRows, UsageSummary, UsageSums,
    },
    webhooks::{
        delivery_id, delivery_page, BillingEvents, Deliveries, DeliveriesRequest, DeliveryView,
    },
};
