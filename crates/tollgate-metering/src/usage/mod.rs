//! Usage: the row every authenticated request becomes, the extractors that
//! fill it in while bodies stream, pricing, and the recorder that gets it
//! durably into the database.

pub(crate) mod cost;
mod database;
pub(crate) mod event;
mod events;
pub(crate) mod extract;
pub(crate) mod pricing;
pub mod recorder;
pub(crate) mod spool;
mod spooler;
mod writer;

pub use crate::store::UsageSink;
pub use cost::{format_usd, parse_usd_to_nanos, CostError};
pub use event::{CostSource, InvalidValues, Outcome, Reported, UsageEvent, UsageField};
#[doc(hidden)]
pub use extract::baseline_count_blank_lines;
pub use extract::{
    inject_include_usage, Count, Extracted, TokenCounts, UsageChunkFilter, UsageFormat,
    UsageScanner,
};
pub use pricing::{ModelPrice, Pricing};
pub use recorder::Recorder;
pub use spool::Spool;
