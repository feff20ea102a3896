//! The Lua scripts in `lua/`, compiled into the binary, called by SHA; one module per script
//! holds its wire contract (KEYS, ARGV, reply) in Rust, next to its `.lua`.
//!
//! Every call is one `EVALSHA`. When Redis answers NOSCRIPT (a restart, a failover to a replica
//! that never saw the script, `SCRIPT FLUSH`), the same call is sent once as `EVAL` with the
//! source, which both answers it and caches the script on that node again: recovery costs one
//! extra round trip, once per node, and needs no cluster-wide `SCRIPT LOAD` routing.

use std::sync::LazyLock;

use redis::{Cmd, ToRedisArgs, Value};

use super::redis::{Redis, RedisFailure};

pub mod ack;
pub mod admit;
pub mod hydrate;
pub mod release;
pub mod settle;

#[derive(Debug)]
pub struct Script {
    pub name: &'static str,
    source: &'static str,
    sha: String,
}

impl Script {
    fn new(name: &'static str, source: &'static str) -> Self {
        let sha = redis::Script::new(source).get_hash().to_string();
        Script { name, source, sha }
    }

    pub fn sha(&self) -> &str {
        &self.sha
    }

    /// The `EVALSHA` of one call, for callers that pipeline it (the load harness).
    pub fn evalsha(&self, keys: &[&str], args: &[ScriptArg<'_>]) -> Cmd {
        self.command("EVALSHA", &self.sha, keys, args)
    }

    fn command(&self, verb: &str, body: &str, keys: &[&str], args: &[ScriptArg<'_>]) -> Cmd {
        let mut cmd = redis::cmd(verb);
        cmd.arg(body).arg(keys.len()).arg(keys);
        for a in args {
            a.write(&mut cmd);
        }
        cmd
    }

    /// Refuses a call without sending it, as the script would refuse it: for the bounds on
    /// arguments, which the typed builder checks so that the script need not spend Redis time
    /// on them. Counted with the script's own refusals.
    pub fn refuse(&self, code: &'static str, detail: &str) -> RedisFailure {
        metrics::counter!(crate::metrics::SCRIPT_REFUSALS, "script" => self.name, "code" => code)
            .increment(1);
        RedisFailure::Refused {
            code,
            detail: detail.to_string(),
        }
    }

    /// Runs the script: `EVALSHA`, falling back to `EVAL` on NOSCRIPT.
    pub async fn run(
        &self,
        redis: &Redis,
        keys: &[&str],
        args: &[ScriptArg<'_>],
    ) -> Result<Value, RedisFailure> {
        match redis
            .query(&self.command("EVALSHA", &self.sha, keys, args))
            .await
        {
            Err(RedisFailure::Command(code)) if code == "NOSCRIPT" => {
                metrics::counter!("tollgate_script_reloads_total", "script" => self.name)
                    .increment(1);
                redis
                    .query(&self.command("EVAL", self.source, keys, args))
                    .await
            }
            Err(RedisFailure::Refused { code, detail }) => {
                metrics::counter!(crate::metrics::SCRIPT_REFUSALS, "script" => self.name, "code" => code)
                    .increment(1);
                Err(RedisFailure::Refused { code, detail })
            }
            other => other,
        }
    }
}

/// One script argument; numbers go as decimal text, which is what Lua's `tonumber` reads.
#[derive(Debug, Clone, Copy)]
pub enum ScriptArg<'a> {
    Str(&'a str),
    Int(i64),
}

impl ScriptArg<'_> {
    fn write(&self, cmd: &mut Cmd) {
        match self {
            ScriptArg::Str(s) => {
                cmd.arg(*s);
            }
            ScriptArg::Int(n) => {
                cmd.arg(n.to_redis_args());
            }
        }
    }
}

/// The scripts tollgate runs.
#[derive(Debug)]
pub struct Scripts {
    pub admit: Script,
    pub settle: Script,
    pub release: Script,
    pub hydrate: Script,
    pub ack: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Scripts {
            admit: Script::new("admit", admit::SOURCE),
            settle: Script::new("settle", settle::SOURCE),
            release: Script::new("release", release::SOURCE),
            hydrate: Script::new("hydrate", hydrate::SOURCE),
            ack: Script::new("ack", ack::SOURCE),
        }
    }
}

/// The one registry of the process: every caller (the hot path, the syncer's acknowledgement)
/// runs the same scripts by the same SHAs.
pub fn scripts() -> &'static Scripts {
    static SCRIPTS: LazyLock<Scripts> = LazyLock::new(Scripts::default);
    &SCRIPTS
}

impl Scripts {
    /// `SCRIPT LOAD`s every script so the first requests do not pay the NOSCRIPT detour.
    /// Best effort: on a cluster, or while Redis is down, the fallback loads them later.
    pub(crate) async fn preload(&self, redis: &Redis) {
        if redis.is_cluster() {
            return;
        }
        for s in [
            &self.admit,
            &self.settle,
            &self.release,
            &self.hydrate,
            &self.ack,
        ] {
            let mut cmd = redis::cmd("SCRIPT");
            cmd.arg("LOAD").arg(s.source);
            if let Err(e) = redis.query(&cmd).await {
                tracing::warn!(script = s.name, error = %e, "could not preload script");
            }
        }
    }
}
