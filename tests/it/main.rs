//! The integration tests: one binary, one `common` harness; each module is one area of the contract.

mod common;

mod access_log;
mod admin;
mod admission;
mod bad_input;
mod bounded_postgres;
mod cli;
mod cluster;
mod command_count;
mod connections;
mod dashboard;
mod fail_mode;
mod fd_limit;
mod idempotency;
mod key_state_layout;
mod keys_cli;
mod metrics;
mod noscript;
mod openapi;
mod postgres_away;
mod proxies;
mod rate_ring;
mod reconcile;
mod scripts;
mod sealed_leases;
mod secrets;
mod smoke;
mod state_format;
mod subrequest;
mod sync;
