//! Usage reports and billing: one set of rules for the admin API and the
//! CLI ([`Reports`]), over the sums a backend takes from `usage_daily`
//! ([`UsageReports`]) and the records it keeps of closed months.

pub(crate) mod records;
pub(crate) mod reports;

pub use crate::{
    billing::records::{
        BillingLine, BillingUsage, ClosedPeriod, GroupKey, Ranking, UsageFilter, UsageGroup,
        UsageTotals,
    },
    billing::reports::{ReportParams, Reports, Scope},
    store::UsageReports,
};
