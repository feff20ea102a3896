//! ack.lua's wire contract, written once: the stream, the group and the entry ids it
//! acknowledges and deletes together. The script's header says why together.

use super::ScriptArg;

pub const SOURCE: &str = include_str!("../../../lua/ack.lua");

#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub stream: &'a str,
    pub group: &'a str,
    pub ids: &'a [&'a str],
}

impl<'a> Call<'a> {
    pub fn keys(&self) -> [&'a str; 1] {
        [self.stream]
    }

    pub fn args(&self) -> Vec<ScriptArg<'a>> {
        let mut args = Vec::with_capacity(self.ids.len() + 1);
        args.push(ScriptArg::Str(self.group));
        args.extend(self.ids.iter().map(|id| ScriptArg::Str(id)));
        args
    }
}
