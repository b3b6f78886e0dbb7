//! The `tollgate` binary's library half: configuration, command wiring and the
//! glue that turns a validated [`config::Config`] into running servers.

pub mod config;
