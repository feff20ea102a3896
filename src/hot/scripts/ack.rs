//! ack.lua's wire contract, written once: the stream, the group and the entry ids it
//! acknowledges and deletes together, and the charges it gives back on the way. The script's
//! header says why together.

use super::ScriptArg;

pub const SOURCE: &str = include_str!("../../../lua/ack.lua");

/// A charge to give back with an entry's acknowledgement: `nanos` to the `used` of `state`.
#[derive(Debug, Clone, Copy)]
pub struct GiveBack<'a> {
    pub entry_id: &'a str,
    pub state: &'a str,
    pub nanos: i64,
}

#[derive(Debug, Clone)]
pub struct Call<'a> {
    keys: Vec<&'a str>,
    args: Vec<String>,
}

impl<'a> Call<'a> {
    pub fn new(stream: &'a str, group: &str, ids: &[&str], give_backs: &[GiveBack<'a>]) -> Self {
        let mut keys = vec![stream];
        let mut args = Vec::with_capacity(ids.len() + 1);
        args.push(group.to_string());
        for id in ids {
            match give_backs.iter().find(|g| g.entry_id == *id) {
                Some(g) => {
                    keys.push(g.state);
                    args.push(format!("{id}={}", g.nanos.max(0)));
                }
                None => args.push((*id).to_string()),
            }
        }
        Call { keys, args }
    }

    pub fn keys(&self) -> &[&'a str] {
        &self.keys
    }

    pub fn args(&self) -> Vec<ScriptArg<'_>> {
        self.args.iter().map(|a| ScriptArg::Str(a)).collect()
    }
}
