//! Every Prometheus series tollgate exports, registered in one place.
//!
//! Handles are created once at start-up, so the hot path never hashes a label set; labels are
//! closed enums (decision codes, results, error kinds), never a key or user id.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::access_log::RecordResult;
use crate::decision::DenyCode;

pub(crate) const ADMISSIONS: &str = "tollgate_admissions_total";
pub(crate) const ADMISSION_DURATION: &str = "tollgate_admission_duration_seconds";
pub(crate) const SETTLEMENTS: &str = "tollgate_settlements_total";
pub(crate) const SYNC_LAG: &str = "tollgate_usage_sync_lag_seconds";
pub(crate) const EVENTS_PENDING: &str = "tollgate_usage_events_pending";
pub(crate) const REDIS_ERRORS: &str = "tollgate_redis_errors_total";
pub(crate) const FAIL_OPEN: &str = "tollgate_fail_open_admissions_total";
pub(crate) const KEY_LOOKUPS: &str = "tollgate_key_lookups_total";
pub(crate) const EVENTS_SYNCED: &str = "tollgate_usage_events_synced_total";
pub(crate) const EVENTS_DEAD: &str = "tollgate_usage_events_dead_lettered_total";
pub const SCRIPT_REFUSALS: &str = "tollgate_script_refusals_total";
pub(crate) const ACCESS_LOG_RECORDS: &str = "tollgate_access_log_records_total";
pub(crate) const TOKENS_SETTLED: &str = "tollgate_tokens_settled_total";

/// Buckets for sub-millisecond admissions, up to the Redis timeout range.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// How often histogram samples are folded into their buckets when nobody scrapes: without
/// it, every admission's sample would be kept until the next scrape.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Installs the process-wide recorder once; later calls return the same handle (tests start
/// many servers in one process).
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(ADMISSION_DURATION.into()), LATENCY_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only when another recorder is installed already; then ours just renders
            // nothing, which the metrics test would catch.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkeep.run_upkeep();
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "no metrics upkeep thread; samples wait for a scrape");
            }
            handle
        })
        .clone()
}

/// `# HELP` lines, so a scrape explains itself.
fn describe() {
    metrics::describe_counter!(
        ADMISSIONS,
        "Admission decisions, by decision: allowed or the denial code"
    );
    metrics::describe_histogram!(
        ADMISSION_DURATION,
        "Time to decide one admission, in seconds (Redis script, and Postgres on a cache miss)"
    );
    metrics::describe_counter!(
        SETTLEMENTS,
        "Settlements, by result: settled, duplicate, lease_expired, lease_unknown"
    );
    metrics::describe_gauge!(
        SYNC_LAG,
        "Age in seconds of the oldest usage event not yet in Postgres (0 when none waits)"
    );
    metrics::describe_gauge!(
        EVENTS_PENDING,
        "Usage events waiting in Redis streams to be written to Postgres"
    );
    metrics::describe_counter!(
        REDIS_ERRORS,
        "Failed Redis calls, by kind: timeout, connection, command"
    );
    metrics::describe_counter!(
        FAIL_OPEN,
        "Admissions allowed without Redis because TOLLGATE_FAIL_MODE=open"
    );
    metrics::describe_counter!(
        KEY_LOOKUPS,
        "Postgres look-ups of keys Redis did not know, by result: found, unknown, throttled"
    );
    metrics::describe_counter!(
        EVENTS_SYNCED,
        "Usage events newly written to Postgres by this process"
    );
    metrics::describe_counter!(
        SCRIPT_REFUSALS,
        "Script calls refused before any write, by script and code: LIMIT_EXCEEDED, \
         INVALID_ARGUMENT, CORRUPT_STATE"
    );
    metrics::describe_counter!(
        EVENTS_DEAD,
        "Usage events Postgres refused for their data, moved to a shard's <stream>:dead"
    );
    metrics::describe_counter!(TOKENS_SETTLED, "Tokens (total_tokens) of settled requests");
    metrics::describe_counter!(
        ACCESS_LOG_RECORDS,
        "Access-log records received, by result: settled, released, duplicate, lease_unknown, malformed"
    );
}

/// Pre-registered handles.
#[derive(Clone)]
pub struct Metrics {
    allowed: Counter,
    denied: [Counter; DenyCode::ALL.len()],
    pub admission_duration: Histogram,
    pub settled: Counter,
    pub settle_duplicate: Counter,
    pub settle_lease_expired: Counter,
    pub settle_lease_unknown: Counter,
    pub fail_open: Counter,
    pub(crate) events_synced: Counter,
    pub(crate) events_dead_lettered: Counter,
    pub key_lookup_found: Counter,
    pub key_lookup_unknown: Counter,
    pub key_lookup_throttled: Counter,
    access_log_records: [Counter; RecordResult::ALL.len()],
    pub tokens_settled: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let m = Metrics {
            allowed: metrics::counter!(ADMISSIONS, "decision" => "allowed"),
            denied: DenyCode::ALL.map(|c| metrics::counter!(ADMISSIONS, "decision" => c.as_str())),
            admission_duration: metrics::histogram!(ADMISSION_DURATION),
            settled: metrics::counter!(SETTLEMENTS, "result" => "settled"),
            settle_duplicate: metrics::counter!(SETTLEMENTS, "result" => "duplicate"),
            settle_lease_expired: metrics::counter!(SETTLEMENTS, "result" => "lease_expired"),
            settle_lease_unknown: metrics::counter!(SETTLEMENTS, "result" => "lease_unknown"),
            fail_open: metrics::counter!(FAIL_OPEN),
            events_synced: metrics::counter!(EVENTS_SYNCED),
            events_dead_lettered: metrics::counter!(EVENTS_DEAD),
            key_lookup_found: metrics::counter!(KEY_LOOKUPS, "result" => "found"),
            key_lookup_unknown: metrics::counter!(KEY_LOOKUPS, "result" => "unknown"),
            key_lookup_throttled: metrics::counter!(KEY_LOOKUPS, "result" => "throttled"),
            access_log_records: RecordResult::ALL
                .map(|r| metrics::counter!(ACCESS_LOG_RECORDS, "result" => r.as_str())),
            tokens_settled: metrics::counter!(TOKENS_SETTLED),
        };
        // Make every series visible from the first scrape, at zero.
        m.allowed.increment(0);
        m.denied.iter().for_each(|c| c.increment(0));
        m.access_log_records.iter().for_each(|c| c.increment(0));
        for c in [
            &m.settled,
            &m.settle_duplicate,
            &m.settle_lease_expired,
            &m.settle_lease_unknown,
            &m.fail_open,
            &m.events_synced,
            &m.events_dead_lettered,
            &m.tokens_settled,
        ] {
            c.increment(0);
        }
        for kind in ["timeout", "connection", "command"] {
            metrics::counter!(REDIS_ERRORS, "kind" => kind).increment(0);
        }
        m
    }

    pub fn admission(&self, decision: Option<DenyCode>) {
        match decision {
            None => self.allowed.increment(1),
            Some(code) => {
                if let Some(i) = DenyCode::ALL.iter().position(|c| *c == code) {
                    self.denied[i].increment(1);
                }
            }
        }
    }

    pub(crate) fn access_log_record(&self, result: RecordResult) {
        if let Some(i) = RecordResult::ALL.iter().position(|r| *r == result) {
            self.access_log_records[i].increment(1);
        }
    }

    pub fn redis_error(&self, kind: &'static str) {
        // A script's refusal is an answer, counted in `tollgate_script_refusals_total`.
        if kind == "refused" {
            return;
        }
        metrics::counter!(REDIS_ERRORS, "kind" => kind).increment(1);
    }
}
