//! Where a decision is made: Redis, through one Lua script per operation.
//!
//! - [`layout`]: Redis key names and their hash tags (which slot a key's state lives in)
//! - [`redis`]: the shared multiplexed connection and the failure taxonomy
//! - [`scripts`]: `lua/*.lua` compiled in, called by SHA, NOSCRIPT recovered
//! - [`admission`]: typed calls — admit, settle, release, hydrate
//! - [`gate`]: the decision service around them — hydration on a miss, the bound on
//!   Postgres look-ups for unknown keys, fail-open

pub mod admission;
pub mod gate;
pub mod layout;
pub mod lease_id;
pub mod redis;
pub mod scripts;
