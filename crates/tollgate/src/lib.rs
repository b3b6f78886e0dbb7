//! The `tollgate` binary's library half: configuration, command wiring and the
//! glue that turns a validated [`config::Config`] into running servers.
//!
//! `main.rs` stays thin; tests start gateways in-process through [`app`].

pub mod app;
mod background;
pub mod cli;
pub mod commands;
pub mod config;
mod descriptors;
mod events;
pub mod manage;
pub mod reload;
pub mod shutdown;
pub mod snapshot;
pub mod telemetry;
