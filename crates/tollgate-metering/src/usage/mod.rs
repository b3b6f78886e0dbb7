//! Usage: the row every authenticated request becomes, the extractors that
//! fill it in while bodies stream, pricing, and the recorder that gets it
//! durably into the database.

pub(crate) mod cost;
pub(crate) mod event;
mod events;
pub(crate) mod extract;
pub(crate) mod pricing;
pub mod recorder;
pub(crate) mod spool;
mod spooler;
mod writer;

#[doc(hidden)]
pub use crate::usage::extract::baseline_count_blank_lines;
pub use crate::{
    store::UsageSink,
    usage::cost::{format_usd, parse_usd_to_nanos, CostError},
    usage::event::{CostSource, InvalidValues, Outcome, Reported, UsageEvent, UsageField},
    usage::extract::{
        inject_include_usage, Count, Extracted, TokenCounts, UsageChunkFilter, UsageFormat,
        UsageScanner,
    },
    usage::pricing::{ModelPrice, Pricing},
    usage::recorder::Recorder,
    usage::spool::Spool,
};
