//! The report: a serialisable record of the run, printed for people or as JSON.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::ceiling;
use crate::load::Outcome;
use crate::memory::MemoryReport;
use crate::observe::{self, HostCpu, RedisSnapshot, Sample};
use crate::script_cost::Measured;
use crate::verify::Invariant;

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            count: h.len(),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CeilingPart {
    pub seconds: f64,
    pub completed: u64,
    pub per_second: f64,
    /// EVALSHA round trips per completed unit (1 for admit, 2 for a flow).
    pub evalsha_per_unit: f64,
    /// Round trip of one pipeline.
    pub pipeline: Latency,
    pub redis_cpu_seconds: f64,
    /// Mean time Redis spent running one script (commandstats `usec` / calls).
    pub script_exec_us: f64,
    /// Busy share of each CPU of the host during the measurement.
    pub host_cpu_busy: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CeilingReport {
    pub keys: usize,
    pub connections: usize,
    pub pipeline_depth: usize,
    pub admit: CeilingPart,
    pub flow: Option<CeilingPart>,
    /// How long the syncer took to move the flow phase's usage events to Postgres.
    pub sync_drain_seconds: Option<f64>,
}

fn part(
    o: &ceiling::Outcome,
    before: &RedisSnapshot,
    after: &RedisSnapshot,
    host: (&HostCpu, &HostCpu),
    per: f64,
) -> CeilingPart {
    let calls = observe::delta(before, after);
    let secs = o.elapsed.as_secs_f64();
    let evalsha = hot_path_evalsha(&calls) as f64;
    CeilingPart {
        seconds: secs,
        completed: o.completed,
        per_second: o.completed as f64 / secs.max(1e-9),
        evalsha_per_unit: if o.completed > 0 {
            evalsha / o.completed as f64
        } else {
            per
        },
        pipeline: Latency::of(&o.batch),
        redis_cpu_seconds: after.cpu_seconds - before.cpu_seconds,
        script_exec_us: script_exec_us(before, after),
        host_cpu_busy: observe::host_delta(host.0, host.1, secs).1,
    }
}

impl CeilingReport {
    pub fn new(
        plan: &ceiling::Plan,
        admit: &ceiling::Outcome,
        before: &RedisSnapshot,
        after: &RedisSnapshot,
        host: (&HostCpu, &HostCpu),
    ) -> CeilingReport {
        CeilingReport {
            keys: plan.keys.len(),
            connections: plan.connections,
            pipeline_depth: plan.pipeline,
            admit: part(admit, before, after, host, 1.0),
            flow: None,
            sync_drain_seconds: None,
        }
    }

    pub fn add_flow(
        &mut self,
        flow: &ceiling::Outcome,
        before: &RedisSnapshot,
        after: &RedisSnapshot,
        host: (&HostCpu, &HostCpu),
        drained: Option<Duration>,
    ) {
        self.flow = Some(part(flow, before, after, host, 2.0));
        self.sync_drain_seconds = drained.map(|d| d.as_secs_f64());
    }
}

/// One script-cost phase (`--script-cost`): Redis's own time per call of one script.
#[derive(Debug, Clone, Serialize)]
pub struct ScriptPhase {
    pub id: String,
    /// The round (0-based; a reference phase's is its index, see `script_cost`).
    pub round: usize,
    pub name: String,
    pub script: String,
    pub seconds: f64,
    /// EVALSHA calls the harness sent, and those `INFO commandstats` counted: more counted
    /// than sent means another client ran scripts during the phase, and its figure is mixed.
    pub sent: u64,
    pub evalsha_calls: u64,
    /// Units on the allow path (calls, or flows of two calls).
    pub units: u64,
    pub unit: String,
    pub calls_per_second: f64,
    /// commandstats `usec` / `calls` of `evalsha`: execution alone, network I/O excluded.
    pub us_per_call: f64,
    /// commandstats `usec` / units: per flow for a flow, else per call.
    pub us_per_unit: f64,
    /// Redis CPU (`INFO cpu`, user + sys) per call sent, and per unit: execution and network
    /// I/O. Unlike `usec`, which is wall-clock time inside the call, CPU time does not grow
    /// when the host preempts Redis in the middle of a script.
    pub redis_cpu_us_per_call: f64,
    pub redis_cpu_us_per_unit: f64,
    /// The commands the scripts ran, per EVALSHA: what part of `us_per_call` is Redis's
    /// commands (the rest is Lua and the crossings between Lua and Redis).
    pub inner: Vec<InnerCommand>,
}

/// One command a phase's scripts ran.
#[derive(Debug, Clone, Serialize)]
pub struct InnerCommand {
    pub command: String,
    pub calls_per_call: f64,
    /// commandstats usec of the command per EVALSHA of the phase.
    pub us_per_call: f64,
}

/// A script's Redis time per unit against the reference's, with issue #15's goal if it sets one.
#[derive(Debug, Clone, Serialize)]
pub struct ScriptRatio {
    pub id: String,
    pub name: String,
    /// commandstats µs per unit / the reference's µs per call, each round against the
    /// reference phases that bracket it; the median over the rounds.
    pub ratio: f64,
    /// Each round's ratio, in round order.
    pub rounds: Vec<f64>,
    pub goal: Option<f64>,
    /// The same with Redis CPU per unit: the cross-check on a busy host (median).
    pub cpu_ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScriptCostReport {
    pub keys: usize,
    pub connections: usize,
    pub pipeline_depth: usize,
    /// Whether `CONFIG RESETSTAT` ran before each phase (else: before/after deltas).
    pub reset_stats: bool,
    pub phases: Vec<ScriptPhase>,
    /// The reference's µs per call (commandstats, and Redis CPU): the mean of all its phases.
    /// Each round's ratios divide by the mean of the two phases that bracket that round.
    pub reference_us: f64,
    pub reference_cpu_us: f64,
    pub ratios: Vec<ScriptRatio>,
}

/// What each ratio compares, and issue #15's goal for it.
const SCRIPT_GOALS: [(&str, Option<f64>); 9] = [
    ("admit_plain", Some(1.5)),
    ("flow_plain", Some(3.0)),
    ("admit_held", Some(2.5)),
    ("admit_held_in_members", Some(2.5)),
    ("settle_plain", None),
    ("settle_held", None),
    ("settle_held_in_members", None),
    ("flow_held", None),
    ("flow_held_in_members", None),
];

impl ScriptCostReport {
    pub fn new(plan: &ceiling::Plan, reset_stats: bool, measured: &[Measured]) -> Self {
        let phases: Vec<ScriptPhase> = measured
            .iter()
            .map(|m| ScriptPhase {
                id: m.id.clone(),
                round: m.round,
                name: m.name.clone(),
                script: m.script.clone(),
                seconds: m.seconds,
                sent: m.sent,
                evalsha_calls: m.evalsha_calls,
                units: m.units,
                unit: m.unit.into(),
                calls_per_second: m.sent as f64 / m.seconds.max(1e-9),
                us_per_call: m.evalsha_usec as f64 / m.evalsha_calls.max(1) as f64,
                us_per_unit: m.evalsha_usec as f64 / m.units.max(1) as f64,
                redis_cpu_us_per_call: m.redis_cpu_seconds * 1e6 / m.sent.max(1) as f64,
                redis_cpu_us_per_unit: m.redis_cpu_seconds * 1e6 / m.units.max(1) as f64,
                inner: m
                    .inner
                    .iter()
                    .map(|(command, calls, usec)| InnerCommand {
                        command: command.clone(),
                        calls_per_call: *calls as f64 / m.evalsha_calls.max(1) as f64,
                        us_per_call: *usec as f64 / m.evalsha_calls.max(1) as f64,
                    })
                    .collect(),
            })
            .collect();
        let refs: Vec<&ScriptPhase> = phases
            .iter()
            .filter(|p| p.script == "exact_window.lua")
            .collect();
        let mean = |ps: &[&ScriptPhase], f: fn(&ScriptPhase) -> f64| {
            ps.iter().map(|p| f(p)).sum::<f64>() / ps.len().max(1) as f64
        };
        let reference_us = mean(&refs, |p| p.us_per_call);
        let reference_cpu_us = mean(&refs, |p| p.redis_cpu_us_per_call);
        // Round r's reference: the phases r and r + 1 that bracket it (all of them when a
        // phase is missing, as in a run cut short).
        let bracket = |round: usize| -> Vec<&ScriptPhase> {
            let b: Vec<&ScriptPhase> = refs
                .iter()
                .copied()
                .filter(|p| p.round == round || p.round == round + 1)
                .collect();
            if b.is_empty() {
                refs.clone()
            } else {
                b
            }
        };
        let candidates = phases
            .iter()
            .filter(|p| p.id.starts_with("candidate:"))
            .map(|p| (p.id.as_str(), None));
        let mut ids: Vec<(&str, Option<f64>)> = SCRIPT_GOALS.to_vec();
        for c in candidates {
            if !ids.iter().any(|(id, _)| *id == c.0) {
                ids.push(c);
            }
        }
        let ratios = ids
            .into_iter()
            .filter_map(|(id, goal)| {
                let of: Vec<&ScriptPhase> = phases.iter().filter(|p| p.id == id).collect();
                let first = of.first()?;
                let (mut rounds, mut cpu) = (Vec::new(), Vec::new());
                for p in &of {
                    let r = bracket(p.round);
                    rounds.push(p.us_per_unit / mean(&r, |p| p.us_per_call).max(1e-9));
                    cpu.push(
                        p.redis_cpu_us_per_unit / mean(&r, |p| p.redis_cpu_us_per_call).max(1e-9),
                    );
                }
                Some(ScriptRatio {
                    id: first.id.clone(),
                    name: first.name.clone(),
                    ratio: median(&rounds),
                    rounds,
                    goal,
                    cpu_ratio: median(&cpu),
                })
            })
            .collect();
        ScriptCostReport {
            keys: plan.keys.len(),
            connections: plan.connections,
            pipeline_depth: plan.pipeline,
            reset_stats,
            phases,
            reference_us,
            reference_cpu_us,
            ratios,
        }
    }

    fn print(&self) {
        println!(
            "Redis time per script (issue #15; {} keys of each kind, {} connections × pipeline {}; INFO commandstats {}):",
            self.keys,
            self.connections,
            self.pipeline_depth,
            if self.reset_stats {
                "after CONFIG RESETSTAT per phase"
            } else {
                "deltas per phase"
            }
        );
        println!(
            "  {:<40} {:>8} {:>8} {:>9} {:>9} {:>9}",
            "phase", "µs/call", "µs/unit", "calls/s", "CPU/call", "CPU/unit"
        );
        let many = self.ratios.iter().any(|r| r.rounds.len() > 1);
        for p in &self.phases {
            let name = if many && p.script != "exact_window.lua" {
                format!("{} [round {}]", p.name, p.round + 1)
            } else {
                p.name.clone()
            };
            println!(
                "  {:<40} {:>8.1} {:>8.1} {:>9.0} {:>9.1} {:>9.1}  ({} {}s{})",
                name,
                p.us_per_call,
                p.us_per_unit,
                p.calls_per_second,
                p.redis_cpu_us_per_call,
                p.redis_cpu_us_per_unit,
                p.units,
                p.unit,
                if p.evalsha_calls > p.sent {
                    format!(
                        "; {} EVALSHA from another client: figure mixed",
                        p.evalsha_calls - p.sent
                    )
                } else {
                    String::new()
                }
            );
            // Commands run less than once in 200 calls are other clients' (the syncer's stream
            // reads) or rare branches: the JSON keeps them, the table leaves them out.
            let shown: Vec<&InnerCommand> = p
                .inner
                .iter()
                .filter(|c| c.calls_per_call >= 0.005)
                .collect();
            if !shown.is_empty() {
                let each: Vec<String> = shown
                    .iter()
                    .map(|c| {
                        format!(
                            "{} {:.2}×{:.2}",
                            c.command,
                            c.calls_per_call,
                            c.us_per_call / c.calls_per_call.max(1e-9)
                        )
                    })
                    .collect();
                let inside: f64 = shown.iter().map(|c| c.us_per_call).sum();
                println!(
                    "      inside, per call (command calls×µs): {}; {:.1} of its {:.1} µs",
                    each.join(", "),
                    inside,
                    p.us_per_call
                );
            }
        }
        println!(
            "  (µs: commandstats usec, the time inside the script; CPU: Redis's user + sys CPU µs, network I/O included)"
        );
        println!(
            "  per unit against the reference ({:.1} µs/call, {:.1} CPU µs/call: the mean of its phases{}):",
            self.reference_us,
            self.reference_cpu_us,
            if many {
                "; each round against the two that bracket it, the median of the rounds"
            } else {
                ""
            }
        );
        for r in &self.ratios {
            let goal = r.goal.map_or(String::new(), |g| {
                format!(
                    "goal ≤ {g}×: {}",
                    if r.ratio <= g { "met" } else { "not met" }
                )
            });
            let rounds = if r.rounds.len() > 1 {
                let each: Vec<String> = r.rounds.iter().map(|x| format!("{x:.2}")).collect();
                format!("  rounds {}", each.join("; "))
            } else {
                String::new()
            };
            println!(
                "    {:<40} {:>6.2}×  (CPU {:>5.2}×)  {goal}{rounds}",
                r.name, r.ratio, r.cpu_ratio
            );
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RedisUse {
    /// EVALSHA calls during the phase (each is one round trip running one script), less the
    /// syncer's `ack.lua` runs.
    pub evalsha: u64,
    /// The syncer's `ack.lua` runs, counted by the one `XACK` each runs (the syncer sends no
    /// `XACK` of its own): background work per batch of usage events, not per request.
    pub syncer_ack_scripts: u64,
    /// EVAL calls: the NOSCRIPT fallback; should be 0.
    pub eval: u64,
    /// Script calls the harness caused: admissions + settlements (+ repeats) + releases.
    pub script_calls_expected: u64,
    /// evalsha / script_calls_expected: 1.0 = one Redis command per admission and settlement.
    pub evalsha_per_call: f64,
    /// Every command Redis executed, by name. `INFO commandstats` also counts the commands
    /// scripts run (hmget, zadd, xadd, …), so these are not round trips.
    pub all_commands: BTreeMap<String, u64>,
    /// Mean time Redis spent running one script (`EVALSHA` `usec` / calls, the syncer's
    /// `ack.lua` included): execution alone; `cpu_seconds` adds the network I/O.
    pub script_exec_us: f64,
    pub cpu_seconds: f64,
    pub used_memory_before: u64,
    pub used_memory_after: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessUse {
    pub pid: Option<u32>,
    pub rss_start: Option<u64>,
    pub rss_middle: Option<u64>,
    pub rss_end: Option<u64>,
    pub rss_max: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub loadgen_cpu_seconds: Option<f64>,
}

/// Upper bounds (histogram buckets) of tollgate's own admission-duration percentiles.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerSide {
    pub p50_at_most: Option<f64>,
    pub p90_at_most: Option<f64>,
    pub p99_at_most: Option<f64>,
    pub p999_at_most: Option<f64>,
}

/// The host's CPU during the phase, to tell a clean measurement from a disturbed one.
#[derive(Debug, Clone, Serialize)]
pub struct HostUse {
    /// Cores busy on the whole host.
    pub busy_cores: f64,
    /// Busy share of each CPU.
    pub per_cpu_busy: Vec<f64>,
    /// Cores used by processes named `postgres` (the syncer's inserts, and any other
    /// database work on the host).
    pub postgres_cores: f64,
    /// Cores of the Postgres backends serving tollgate's database (`--postgres-db`).
    pub postgres_db_cores: Option<f64>,
    /// Busy cores not accounted for by tollgate, Redis, Postgres or the load generator
    /// (interrupts, and anything else running on the host).
    pub other_cores: Option<f64>,
    /// CPU cost per unit of work, microseconds: robust to a busy host where throughput is not.
    pub tollgate_cpu_us_per_request: Option<f64>,
    pub loadgen_cpu_us_per_request: Option<f64>,
    pub redis_cpu_us_per_script_call: Option<f64>,
    /// The busiest command names on the host during the phase, cores.
    pub top_processes: Vec<(String, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpReport {
    pub settings: serde_json::Value,
    pub seconds: f64,
    pub admissions: u64,
    pub admissions_per_second: f64,
    pub allowed: u64,
    pub denials: BTreeMap<String, u64>,
    pub settlements: u64,
    pub repeated_settlements: u64,
    pub releases: u64,
    /// Admitted flows completed (settled or released) per second.
    pub flows_per_second: f64,
    /// HTTP requests of every kind per second.
    pub requests_per_second: f64,
    pub latency: BTreeMap<String, Latency>,
    pub errors: BTreeMap<String, u64>,
    pub error_samples: Vec<String>,
    pub reconnects: u64,
    pub redis: Option<RedisUse>,
    pub tollgate: Option<ProcessUse>,
    pub samples: Vec<Sample>,
    pub host: Option<HostUse>,
    pub sync_drain_seconds: Option<f64>,
    /// tollgate's own admission duration (`tollgate_admission_duration_seconds`: the gate,
    /// its Redis call included, HTTP excluded), as histogram bucket bounds, microseconds.
    pub server_admission_us: ServerSide,
    /// flows_per_second / the ceiling's flows per second.
    pub flows_vs_ceiling: Option<f64>,
    /// Script calls per second through HTTP / the ceiling's script calls per second.
    pub script_calls_vs_ceiling: Option<f64>,
}

impl HttpReport {
    pub fn new(settings: &serde_json::Value, o: &Outcome, elapsed: Duration) -> HttpReport {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let mut latency = BTreeMap::new();
        latency.insert("admit".to_string(), Latency::of(&o.admit));
        latency.insert("settle".to_string(), Latency::of(&o.settle));
        latency.insert("release".to_string(), Latency::of(&o.release));
        let requests = o.admits + o.settles + o.resettles + o.releases;
        HttpReport {
            settings: settings.clone(),
            seconds: secs,
            admissions: o.admits,
            admissions_per_second: o.admits as f64 / secs,
            allowed: o.allowed,
            denials: o.denials.clone(),
            settlements: o.settles,
            repeated_settlements: o.resettles,
            releases: o.releases,
            flows_per_second: (o.settles + o.releases) as f64 / secs,
            requests_per_second: requests as f64 / secs,
            latency,
            errors: o.errors.clone(),
            error_samples: o.error_samples.clone(),
            reconnects: o.reconnects,
            redis: None,
            tollgate: None,
            samples: Vec::new(),
            host: None,
            sync_drain_seconds: None,
            server_admission_us: ServerSide::default(),
            flows_vs_ceiling: None,
            script_calls_vs_ceiling: None,
        }
    }

    pub fn set_redis(&mut self, before: &RedisSnapshot, after: &RedisSnapshot, o: &Outcome) {
        let calls = observe::delta(before, after);
        let evalsha = hot_path_evalsha(&calls);
        let expected = o.admits + o.settles + o.resettles + o.releases;
        self.redis = Some(RedisUse {
            evalsha,
            syncer_ack_scripts: *calls.get("xack").unwrap_or(&0),
            eval: *calls.get("eval").unwrap_or(&0),
            script_calls_expected: expected,
            evalsha_per_call: evalsha as f64 / (expected.max(1)) as f64,
            all_commands: calls,
            script_exec_us: script_exec_us(before, after),
            cpu_seconds: after.cpu_seconds - before.cpu_seconds,
            used_memory_before: before.used_memory,
            used_memory_after: after.used_memory,
        });
    }

    pub fn set_process(
        &mut self,
        pid: Option<u32>,
        cpu: Option<f64>,
        self_cpu: Option<f64>,
        samples: Vec<Sample>,
    ) {
        let rss: Vec<u64> = samples.iter().filter_map(|s| s.rss_bytes).collect();
        self.tollgate = Some(ProcessUse {
            pid,
            rss_start: rss.first().copied(),
            rss_middle: rss.get(rss.len() / 2).copied(),
            rss_end: rss.last().copied(),
            rss_max: rss.iter().max().copied(),
            cpu_seconds: cpu,
            loadgen_cpu_seconds: self_cpu,
        });
        self.samples = samples;
    }

    pub fn set_host(&mut self, a: &HostCpu, b: &HostCpu, processes: Vec<(String, f64)>) {
        let postgres_cpu_seconds: f64 = processes
            .iter()
            .filter(|(c, _)| c == "postgres")
            .map(|(_, s)| s)
            .sum();
        let (busy, per_cpu) = observe::host_delta(a, b, self.seconds);
        let ours = self.redis.as_ref().map(|r| r.cpu_seconds).zip(
            self.tollgate
                .as_ref()
                .and_then(|p| p.cpu_seconds.zip(p.loadgen_cpu_seconds)),
        );
        let pg = postgres_cpu_seconds / self.seconds;
        let requests = self.requests_per_second * self.seconds;
        let per = |cpu: Option<f64>, n: f64| cpu.filter(|_| n > 0.0).map(|c| c * 1e6 / n);
        let calls = self.redis.as_ref().map_or(0.0, |r| r.evalsha as f64);
        self.host = Some(HostUse {
            tollgate_cpu_us_per_request: per(
                self.tollgate.as_ref().and_then(|p| p.cpu_seconds),
                requests,
            ),
            loadgen_cpu_us_per_request: per(
                self.tollgate.as_ref().and_then(|p| p.loadgen_cpu_seconds),
                requests,
            ),
            redis_cpu_us_per_script_call: per(self.redis.as_ref().map(|r| r.cpu_seconds), calls),
            busy_cores: busy,
            per_cpu_busy: per_cpu,
            postgres_cores: pg,
            postgres_db_cores: None,
            other_cores: ours.map(|(r, (t, l))| (busy - pg - (r + t + l) / self.seconds).max(0.0)),
            top_processes: processes
                .into_iter()
                .take(6)
                .map(|(c, s)| (c, s / self.seconds))
                .collect(),
        });
    }

    pub fn set_server_side(
        &mut self,
        before: &[(f64, u64)],
        after: &[(f64, u64)],
        postgres_db_cpu_seconds: Option<f64>,
    ) {
        let q = |q| observe::bucket_quantile(before, after, q).map(|s| s * 1e6);
        self.server_admission_us = ServerSide {
            p50_at_most: q(0.5),
            p90_at_most: q(0.9),
            p99_at_most: q(0.99),
            p999_at_most: q(0.999),
        };
        if let (Some(h), Some(pg)) = (self.host.as_mut(), postgres_db_cpu_seconds) {
            h.postgres_db_cores = Some(pg / self.seconds);
        }
    }

    pub fn set_ceiling(&mut self, c: &CeilingReport) {
        if let Some(f) = &c.flow {
            if f.per_second > 0.0 {
                self.flows_vs_ceiling = Some(self.flows_per_second / f.per_second);
                let calls = self.redis.as_ref().map_or(0, |r| r.script_calls_expected) as f64;
                self.script_calls_vs_ceiling = Some(calls / self.seconds / (2.0 * f.per_second));
            }
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    #[serde(skip)]
    pub json: bool,
    pub mode: String,
    pub run_id: String,
    pub rate_window_ms: u64,
    pub ceiling: Option<CeilingReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub script_cost: Option<ScriptCostReport>,
    pub http: Option<HttpReport>,
    pub memory: Option<MemoryReport>,
    pub invariants: Vec<Invariant>,
    pub passed: bool,
}

impl Report {
    pub fn new(json: bool, mode: String, run_id: String) -> Report {
        Report {
            json,
            mode,
            run_id,
            rate_window_ms: 0,
            ceiling: None,
            script_cost: None,
            http: None,
            memory: None,
            invariants: Vec::new(),
            passed: false,
        }
    }

    pub fn finish(&mut self) {
        if let Some(m) = &self.memory {
            self.invariants.push(Invariant::new(
                "full_window_denies_next",
                format!(
                    "admission {} of a key limited to {}",
                    m.rate_limit + 1,
                    m.rate_limit
                ),
                if m.next_admission_rate_limited {
                    vec![]
                } else {
                    vec!["was not rate_limited".into()]
                },
            ));
        }
        self.passed = self.invariants.iter().all(|i| i.ok);
    }

    pub fn print(&self) {
        println!(
            "tollgate load test {} (mode {}, rate window {} ms)",
            self.run_id, self.mode, self.rate_window_ms
        );
        if let Some(c) = &self.ceiling {
            println!();
            c.print();
        }
        if let Some(s) = &self.script_cost {
            println!();
            s.print();
        }
        if let Some(h) = &self.http {
            println!();
            h.print();
        }
        if let Some(m) = &self.memory {
            println!();
            print_memory(m);
        }
        println!();
        print_invariants(&self.invariants);
        println!();
        println!("{}", if self.passed { "PASSED" } else { "FAILED" });
    }
}

impl CeilingReport {
    fn print(&self) {
        println!(
            "Redis ceiling ({} keys, {} connections × pipeline {}):",
            self.keys, self.connections, self.pipeline_depth
        );
        print_part("admit.lua alone", "admissions", &self.admit);
        if let Some(f) = &self.flow {
            print_part("admit.lua + settle.lua", "flows", f);
        }
        if let Some(s) = self.sync_drain_seconds {
            println!("  syncer drained the ceiling's usage events {s:.1} s after it ended");
        }
    }
}

impl HttpReport {
    fn print(&self) {
        self.print_counts();
        self.print_latency();
        if !self.errors.is_empty() {
            println!("  errors: {:?}; e.g. {:?}", self.errors, self.error_samples);
        }
        if let Some(r) = &self.redis {
            r.print();
        }
        if let (Some(f), Some(c)) = (self.flows_vs_ceiling, self.script_calls_vs_ceiling) {
            println!("  vs the Redis ceiling: flows {f:.2}×, script calls {c:.2}×");
        }
        if let Some(p) = &self.tollgate {
            p.print(self.seconds);
        }
        if let Some(host) = &self.host {
            host.print();
        }
        if let Some(s) = self.sync_drain_seconds {
            println!("  syncer drained the usage streams {s:.1} s after the load ended");
        }
    }

    /// The phase's settings, and what was admitted, denied, settled and released.
    fn print_counts(&self) {
        println!(
            "HTTP phase: {:.1} s, settings {}",
            self.seconds,
            serde_json::to_string(&self.settings).unwrap_or_default()
        );
        println!(
            "  admissions {} ({:.0}/s): allowed {}, denied {}",
            self.admissions,
            self.admissions_per_second,
            self.allowed,
            self.admissions - self.allowed
        );
        let denials: Vec<String> = self
            .denials
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!(
            "  denials by code: {}",
            if denials.is_empty() {
                "none".into()
            } else {
                denials.join(", ")
            }
        );
        println!(
            "  settlements {} (+{} repeated), releases {}: {:.0} flows/s, {:.0} HTTP requests/s",
            self.settlements,
            self.repeated_settlements,
            self.releases,
            self.flows_per_second,
            self.requests_per_second
        );
    }

    /// The harness's latency table, then tollgate's own admission time beside it.
    fn print_latency(&self) {
        println!("  latency (µs)      count      p50      p90      p99    p99.9      max");
        for (name, l) in &self.latency {
            if l.count > 0 {
                println!(
                    "    {name:<10} {:>10} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>8.0}",
                    l.count, l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us
                );
            }
        }
        let s = &self.server_admission_us;
        let b = |v: Option<f64>| {
            v.map_or("?".to_string(), |v| {
                if v.is_finite() {
                    format!("≤{v:.0}")
                } else {
                    ">max".to_string()
                }
            })
        };
        println!(
            "    tollgate's own admission time (its histogram buckets): p50 {} p90 {} p99 {} p99.9 {}",
            b(s.p50_at_most),
            b(s.p90_at_most),
            b(s.p99_at_most),
            b(s.p999_at_most)
        );
        if self.settings["rate_flows_per_second"].is_number() {
            println!(
                "    (open loop: an admission that had to wait counts from its scheduled time)"
            );
        }
    }
}

impl RedisUse {
    fn print(&self) {
        println!(
            "  Redis: {} EVALSHA for {} admit/settle/release calls = {:.3} per call; EVAL {}; Redis CPU {:.1} s",
            self.evalsha, self.script_calls_expected, self.evalsha_per_call, self.eval, self.cpu_seconds
        );
        println!(
            "    (not counted above: {} EVALSHA of the syncer's ack.lua, one per batch of usage events)",
            self.syncer_ack_scripts
        );
        println!("    (INFO commandstats; commands run inside scripts are counted there too, so only EVALSHA/EVAL are round trips)");
        println!(
            "    Redis ran each script in {:.1} µs on average (commandstats usec; CPU per call above adds network I/O)",
            self.script_exec_us
        );
        println!(
            "    used_memory {:.1} MiB → {:.1} MiB",
            mib(self.used_memory_before),
            mib(self.used_memory_after)
        );
    }
}

impl ProcessUse {
    /// `seconds`: the phase's length, to turn CPU seconds into cores.
    fn print(&self, seconds: f64) {
        if let Some(pid) = self.pid {
            println!(
                "  tollgate pid {pid}: RSS start {} / middle {} / end {} / max {} MiB; CPU {}",
                opt_mib(self.rss_start),
                opt_mib(self.rss_middle),
                opt_mib(self.rss_end),
                opt_mib(self.rss_max),
                self.cpu_seconds.map_or("?".into(), |c| format!(
                    "{c:.1} s = {:.2} cores",
                    c / seconds
                ))
            );
        }
        if let Some(c) = self.loadgen_cpu_seconds {
            println!("  load generator CPU {c:.1} s = {:.2} cores", c / seconds);
        }
    }
}

impl HostUse {
    fn print(&self) {
        println!(
            "  host CPU: {:.2} cores busy (per CPU {}); Postgres {:.2} cores{}{}",
            self.busy_cores,
            percents(&self.per_cpu_busy),
            self.postgres_cores,
            self.postgres_db_cores.map_or(String::new(), |c| format!(
                " ({c:.2} for tollgate's database)"
            )),
            self.other_cores.map_or(String::new(), |o| format!(
                "; {o:.2} cores outside tollgate, Redis, Postgres and the load generator"
            ))
        );
        let top: Vec<String> = self
            .top_processes
            .iter()
            .map(|(c, v)| format!("{c} {v:.2}"))
            .collect();
        println!("  busiest processes (cores): {}", top.join(", "));
        let us = |v: Option<f64>| v.map_or("?".to_string(), |v| format!("{v:.1}"));
        println!(
            "  CPU per unit (µs): tollgate {} per HTTP request, Redis {} per script call, load generator {} per request",
            us(self.tollgate_cpu_us_per_request),
            us(self.redis_cpu_us_per_script_call),
            us(self.loadgen_cpu_us_per_request)
        );
    }
}

fn print_memory(m: &MemoryReport) {
    println!("Redis memory per key (MEMORY USAGE, bytes):");
    println!(
        "  state hash at rest {} (after use {})",
        m.state_at_rest, m.state_after_use
    );
    println!(
        "  rate log with {} entries {} ({:.0}/entry); live-lease set with {} {} ({:.0}/entry)",
        m.rate_limit,
        m.rate_log_full,
        m.rate_log_full as f64 / m.rate_limit as f64,
        m.rate_limit,
        m.live_set_full,
        m.live_set_full as f64 / m.rate_limit as f64
    );
    println!(
        "  lease record {}; settled-lease tombstone {}",
        m.lease_record, m.tombstone
    );
    println!(
        "  key with a full window: {}; with all {} leases live: {}",
        m.key_with_full_window, m.rate_limit, m.key_with_full_window_all_live
    );
}

fn print_invariants(invariants: &[Invariant]) {
    println!("Invariants:");
    for i in invariants {
        println!(
            "  {} {:<34} {}",
            if i.ok { "ok  " } else { "FAIL" },
            i.name,
            i.scope
        );
        for f in &i.failures {
            println!("         {f}");
        }
    }
}

/// EVALSHA calls less the syncer's `ack.lua` runs (one inner `XACK` each).
fn hot_path_evalsha(calls: &BTreeMap<String, u64>) -> u64 {
    let evalsha = *calls.get("evalsha").unwrap_or(&0);
    evalsha.saturating_sub(*calls.get("xack").unwrap_or(&0))
}

/// Mean execution time of one `EVALSHA` between two snapshots, in µs.
fn script_exec_us(before: &RedisSnapshot, after: &RedisSnapshot) -> f64 {
    let d = |m: &BTreeMap<String, u64>| *m.get("evalsha").unwrap_or(&0);
    let us = d(&after.usec).saturating_sub(d(&before.usec));
    let n = d(&after.calls).saturating_sub(d(&before.calls));
    us as f64 / n.max(1) as f64
}

fn print_part(name: &str, unit: &str, p: &CeilingPart) {
    println!(
        "  {name:<24} {:.0} {unit}/s ({} in {:.1} s), {:.2} EVALSHA each, pipeline round trip p50 {:.0} µs p99 {:.0} µs",
        p.per_second, p.completed, p.seconds, p.evalsha_per_unit, p.pipeline.p50_us, p.pipeline.p99_us
    );
    println!(
        "  {:<24} Redis CPU {:.2} cores, {:.1} µs per script run; host CPUs busy {}",
        "",
        p.redis_cpu_seconds / p.seconds.max(1e-9),
        p.script_exec_us,
        percents(&p.host_cpu_busy)
    );
}

/// The median of `v` (the mean of the middle two for an even count); 0 for none.
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn percents(v: &[f64]) -> String {
    v.iter()
        .map(|f| format!("{:.0}%", f * 100.0))
        .collect::<Vec<_>>()
        .join(" / ")
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn opt_mib(b: Option<u64>) -> String {
    b.map_or("?".into(), |b| format!("{:.1}", mib(b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn phase(id: &str, script: &str, round: usize, usec_per_call: u64) -> Measured {
        Measured {
            id: id.into(),
            round,
            name: id.into(),
            script: script.into(),
            unit: "call",
            seconds: 1.0,
            sent: 100,
            units: 100,
            other: BTreeMap::new(),
            errors: 0,
            error_sample: None,
            evalsha_calls: 100,
            evalsha_usec: usec_per_call * 100,
            redis_cpu_seconds: usec_per_call as f64 * 100e-6,
            inner: vec![("hmget".into(), 100, 150), ("zadd".into(), 200, 500)],
        }
    }

    #[test]
    fn the_commands_inside_a_phase_are_given_per_evalsha() {
        let r = ScriptCostReport::new(&plan(), true, &[phase("admit_plain", "admit.lua", 0, 12)]);
        let inner: Vec<(&str, f64, f64)> = r.phases[0]
            .inner
            .iter()
            .map(|c| (c.command.as_str(), c.calls_per_call, c.us_per_call))
            .collect();
        assert_eq!(inner, [("hmget", 1.0, 1.5), ("zadd", 2.0, 5.0)]);
    }

    fn plan() -> ceiling::Plan {
        ceiling::Plan {
            redis_url: String::new(),
            keys: Vec::new(),
            connections: 1,
            pipeline: 1,
            duration: Duration::from_secs(1),
            window_ms: 60_000,
            lease_ttl_ms: 1,
            settle_window_ms: 1,
            max_cost_nanos: 0,
            known: Arc::default(),
            holds_in_members: false,
        }
    }

    #[test]
    fn each_round_is_divided_by_the_references_that_bracket_it_and_the_median_is_reported() {
        let reference = "exact_window.lua";
        let measured = [
            phase("admit_plain", "admit.lua", 0, 15),
            phase("reference_first", reference, 0, 10),
            phase("reference_1", reference, 1, 20),
            phase("admit_plain", "admit.lua", 1, 30),
            phase("reference_2", reference, 2, 10),
            phase("admit_plain", "admit.lua", 2, 12),
            phase("reference_last", reference, 3, 14),
        ];
        let r = ScriptCostReport::new(&plan(), true, &measured);
        assert!((r.reference_us - 13.5).abs() < 1e-9, "{}", r.reference_us);
        let admit = r
            .ratios
            .iter()
            .find(|r| r.id == "admit_plain")
            .expect("a ratio");
        // Rounds: 15 / mean(10, 20), 30 / mean(20, 10), 12 / mean(10, 14).
        assert_eq!(admit.rounds, vec![1.0, 2.0, 1.0]);
        assert_eq!(admit.ratio, 1.0, "the median");
        assert_eq!(admit.goal, Some(1.5));
        assert!(
            r.ratios.iter().all(|r| r.id == "admit_plain"),
            "phases not run have no ratio"
        );
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}
