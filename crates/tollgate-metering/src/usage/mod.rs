//! Usage: the row every authenticated request becomes, the extractors that
//! fill it in while bodies stream, pricing, and the recorder that gets it
//! durably into the database.

pub mod cost;
mod database;
pub mod event;
mod events;
pub mod extract;
pub mod pricing;
pub mod recorder;
pub mod spool;
mod spooler;
mod writer;

pub use crate::store::UsageSink;
pub use event::{CostSource, Outcome, UsageEvent};
