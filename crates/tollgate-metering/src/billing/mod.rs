//! What a backend reads back for reports and billing ([`UsageReports`]):
//! the sums it takes from `usage_daily`, the usage a month is billed on,
//! and the records it keeps of closed months. The reports and the billing
//! rule over them live in the `tollgate-accounts` crate.

pub(crate) mod records;

pub use crate::{
    billing::records::{
        BillingLine, BillingUsage, ClosedPeriod, GroupKey, Ranking, UsageFilter, UsageGroup,
        UsageTotals,
    },
    store::UsageReports,
};
