//! tollgate: an admission sidecar for API and LLM gateways.
//!
//! Before a gateway forwards a request upstream it asks tollgate whether this API key may make
//! this call now; tollgate answers from Redis in one atomic script. After the call the gateway
//! settles the lease with the real cost; the charge and its usage event are written by one
//! script, and a syncer moves the events into Postgres, the durable home of keys and usage.
//!
//! Module map (see `docs/ARCHITECTURE.md` for the data flow):
//!
//! - [`config`]: every setting, flag and `TOLLGATE_*` variable, validated in one place
//! - [`app`]: wiring of pools, scripts, background tasks and both listeners
//! - [`startup`]: Postgres brought up in the background, and what needs it started then
//! - [`http`]: where HTTP ends — routers, handlers, the one error-to-response mapping
//! - [`hot`]: where a decision is made — Redis key layout, Lua scripts, the gate
//! - [`store`]: Postgres — keys, usage, balance ledger, statistics, migrations
//! - [`key_state`]: key configuration from Postgres into Redis (push, reload, sweep)
//! - [`sync`]: background loops — where usage goes to Postgres, the reconciler, the sweeper
//! - [`access_log`]: where proxies report the end of a request (access-log receiver)
//! - [`prices`]: the price table, and a settlement's cost from its tokens
//! - [`cli`]: `tollgate keys …`, the operators' client of the admin API
//! - [`decision`], [`money`], [`keys`], [`label`], [`inference`], [`metrics`]: shared vocabulary

pub mod access_log;
pub mod app;
pub mod cli;
pub mod config;
pub mod decision;
pub mod gate;
pub mod hot;
pub mod http;
pub mod inference;
pub mod key_state;
pub mod keys;
pub mod label;
pub mod metrics;
pub mod money;
pub mod period;
pub mod prices;
pub mod startup;
pub mod store;
pub mod sync;
