//! Configuration: TOML file -> validated `Config`.
