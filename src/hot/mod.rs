//! Where a decision is made: Redis, through one Lua script per operation. Callers reach it
//! through `crate::gate` (admissions, settlements, releases) and `crate::key_state` (key
//! configuration), never directly. The modules stay `pub` for what is outside the crate
//! (tests/it, loadtest, benches), which drives the scripts below the gate on purpose; what
//! only the crate uses in them is `pub(crate)`.
//!
//! - [`layout`]: Redis key names and their hash tags (which slot a key's state lives in)
//! - [`redis`]: the shared multiplexed connection and the failure taxonomy
//! - [`scripts`]: `lua/*.lua` compiled in, called by SHA, NOSCRIPT recovered; one module per
//!   script (`scripts/admit.rs`, …) writes its KEYS, ARGV and reply in Rust, once
//! - [`lease_id`]: sealed lease ids (what settlement needs, under an HMAC)
//! - [`known_keys`]: what the process remembers of keys it admitted (ids, whether they need
//!   their counters), so that admit.lua reads and answers less, and settle.lua reads less
//! - [`admission`]: the hot path — bounds checked, a script called, its reply made an outcome

pub mod admission;
pub mod known_keys;
pub mod layout;
pub mod lease_id;
pub mod redis;
pub mod scripts;
