//! `loadtest lua-costs`: what one Lua operation of tollgate's scripts costs Redis, by repeating
//! it in a loop inside one script and dividing (issue #15).
//!
//! Why a loop: a whole script's time on a shared host moves by more than a microsecond from one
//! run to the next, which hides any single change to it; a loop of thousands of the same
//! operation inside one call makes that movement small against what is measured. Each snippet
//! runs behind the libraries admit.lua carries (so their functions are what it calls), in
//! alternating order, and its cost is the median call's time less the empty loop's, divided by
//! the iterations. The snippets only read (missing keys), and each measurement is the change
//! in `INFO commandstats` over its calls: another client's `EVALSHA`s meanwhile would mix into
//! it, so use a Redis nothing else runs scripts on.

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::Parser;
use tollgate::hot::scripts::admit;

#[derive(Debug, Parser)]
#[command(name = "loadtest lua-costs")]
struct CostArgs {
    /// A Redis no other client runs scripts on meanwhile
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Iterations of the snippet inside one call
    #[arg(long, default_value_t = 2000)]
    iterations: u32,
    /// Calls per measurement
    #[arg(long, default_value_t = 20)]
    calls: u32,
    /// Measurements per snippet (alternating order); the median is reported
    #[arg(long, default_value_t = 7)]
    rounds: u32,
}

/// The snippets: (name, Lua run once per iteration). `cfn`, `rw`, `n`, `s` and `state` are set
/// up before the loop; ARGV[1] is an admission's "what was asked".
const SNIPPETS: [(&str, &str); 16] = [
    ("empty loop", ""),
    (
        "string.format('%.0f', n)",
        "local x = string.format('%.0f', n)",
    ),
    ("string.format('%d', n)", "local x = string.format('%d', n)"),
    ("tostring(n)", "local x = tostring(n)"),
    ("tonumber(s)", "local x = tonumber(s)"),
    ("an empty table", "local t = {}"),
    ("a closure", "local function f(x) return x end"),
    (
        "unpack_config(cfn)",
        "local a, b, c, d, e, f, g, h, i = unpack_config(cfn)",
    ),
    (
        "ring cursor unpack",
        "local a, b, c, d, e = struct.unpack('>ddi4i6i6', rw)",
    ),
    (
        "struct.pack of 8 numbers",
        "local x = struct.pack('>i8i8i8i8i8i8i8i8', 1, 2, 3, 4, 5, 6, 7, 8)",
    ),
    ("sibling(state, 'c')", "local x = sibling(state, 'c')"),
    (
        "string.match of ARGV[1]",
        "local r, t, m = string.match(ARGV[1], '^(%d+)\\31(%d+)\\31([^\\31]*)\\31')",
    ),
    ("TIME", "local t = redis.call('TIME')"),
    (
        "HMGET of 3 fields",
        "local v = redis.call('HMGET', 'lua-costs:none', 'cfn', 'rw', 'ver')",
    ),
    (
        "HMGET of 8 fields, unpacked",
        "local a, b, c, d, e, f, g, h = unpack(redis.call('HMGET', 'lua-costs:none', 'cfn', 'rw', \
         'ver', 'used', 'held', 'htok', 'lx', 'le'))",
    ),
    (
        "HMGET of 8 fields from a table",
        "local f = {'cfn', 'rw', 'ver'}; local b = #f; f[b + 1], f[b + 2], f[b + 3], f[b + 4], \
         f[b + 5] = 'used', 'held', 'htok', 'lx', 'le'; local v = redis.call('HMGET', \
         'lua-costs:none', unpack(f)); local basic = {v[b + 1], v[b + 2], v[b + 3], v[b + 4], \
         v[b + 5]}",
    ),
];

const SETUP: &str = "
local cfn = struct.pack('>i7Bi7i4i4i7i7i7', 1, 1, 0, 1000000, 1000000, 9000000000000000, -1, -1)
local rw = struct.pack('>ddi4i6i6', 10, 2, 16, 1700000000000, 1700000100000) .. string.rep('x', 30)
local state = 'lua-costs:{lua-costs.a}:k:' .. string.rep('a', 32)
local n, s = 1700000000123, '1700000000123'
";

/// The script of one snippet: admit.lua's libraries (not admit.lua itself), the set-up, the
/// loop.
fn script(snippet: &str, iterations: u32) -> String {
    let libraries = &admit::SOURCE[..admit::SOURCE
        .find("-- admit.lua:")
        .unwrap_or(admit::SOURCE.len())];
    format!("{libraries}{SETUP}for _ = 1, {iterations} do {snippet} end return 1")
}

pub fn main(args: impl Iterator<Item = String>) -> ExitCode {
    let args = CostArgs::parse_from(args);
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadtest lua-costs: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `cmdstat_evalsha`'s calls and usec so far (zeros before the first).
fn evalsha_stats(c: &mut redis::Connection) -> Result<(u64, u64), String> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(c)
        .map_err(|e| e.to_string())?;
    let Some(line) = info
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:"))
    else {
        return Ok((0, 0));
    };
    let field = |name: &str| {
        line.split(',')
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| format!("no {name} in cmdstat_evalsha"))
    };
    Ok((field("calls=")?, field("usec=")?))
}

/// The middle value; NaN for none (every snippet has at least one round, but a figure is
/// printed, never a panic).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn run(args: &CostArgs) -> Result<(), String> {
    let client = redis::Client::open(args.redis_url.as_str()).map_err(|e| e.to_string())?;
    let mut c = client.get_connection().map_err(|e| format!("redis: {e}"))?;
    let asked = format!(
        "1000000000\x1f0\x1f{}\x1fopenai\x1fopenai:chat\x1fgpt-4o",
        "N".repeat(22)
    );
    let mut shas = Vec::new();
    for (name, snippet) in SNIPPETS {
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(script(snippet, args.iterations))
            .query(&mut c)
            .map_err(|e| format!("SCRIPT LOAD of {name}: {e}"))?;
        shas.push((name, sha));
    }
    let mut times: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for round in 0..args.rounds.max(1) {
        let order: Vec<&(&str, String)> = if round % 2 == 0 {
            shas.iter().collect()
        } else {
            shas.iter().rev().collect()
        };
        for (name, sha) in order {
            let (calls0, usec0) = evalsha_stats(&mut c)?;
            for _ in 0..args.calls.max(1) {
                redis::cmd("EVALSHA")
                    .arg(sha)
                    .arg(0)
                    .arg(&asked)
                    .query::<redis::Value>(&mut c)
                    .map_err(|e| format!("{name}: {e}"))?;
            }
            let (calls1, usec1) = evalsha_stats(&mut c)?;
            let per_call =
                usec1.saturating_sub(usec0) as f64 / calls1.saturating_sub(calls0).max(1) as f64;
            times.entry(name).or_default().push(per_call);
        }
    }
    let empty = median(times.get("empty loop").cloned().unwrap_or_default());
    println!(
        "Redis time of one operation inside a script (median of {} rounds of {} calls, {} iterations each, less the empty loop):",
        args.rounds, args.calls, args.iterations
    );
    for (name, _) in SNIPPETS.iter().skip(1) {
        let t = median(times.get(name).cloned().unwrap_or_default());
        println!(
            "  {name:<36} {:>7.0} ns",
            (t - empty) * 1000.0 / f64::from(args.iterations.max(1))
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_no_figures_is_not_a_number() {
        assert!(median(Vec::new()).is_nan());
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
    }

    #[test]
    fn a_snippets_script_carries_admits_libraries_and_not_admit_itself() {
        let s = script("local x = 1", 10);
        assert!(s.contains("local function unpack_config"));
        assert!(s.contains("local function sibling"));
        assert!(!s.contains("-- admit.lua:"));
        assert!(s.ends_with("for _ = 1, 10 do local x = 1 end return 1"));
    }
}
