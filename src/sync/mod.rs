//! Background work between Redis and Postgres, off the hot path.
//!
//! - [`usage`]: where usage goes to Postgres — stream consumers, batch writer, acknowledgement
//! - [`reconcile`]: key state from Postgres into Redis, retried until Redis has it
//! - [`sweeper`]: the periodic expired-key clean-up

pub mod reconcile;
pub mod sweeper;
pub mod usage;
