//! Usage: the row every authenticated request becomes, the extractors that
//! fill it in while bodies stream, pricing, and the recorder that gets it
//! durably into the database.

pub(crate) mod cost;
pub(crate) mod event;
mod events;
pub(crate) mod extract;
pub(crate) mod pricing;
pub mod recorder;
mod response;
pub(crate) mod spool;
mod spooler;
#[cfg(test)]
mod tests;
mod writer;

pub use crate::{
    store::UsageSink,
    usage::cost::format_usd,
    usage::event::{CostSource, InvalidValues, Outcome, UsageEvent, UsageField},
    usage::extract::{inject_include_usage, UnmeterableRequest, UsageFormat},
    usage::pricing::{ModelPrice, Pricing},
    usage::recorder::Recorder,
    usage::response::{ResponseBody, ResponseUsage, UsageHeaders},
};
