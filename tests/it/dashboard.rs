//! The Grafana dashboard (deploy/grafana/tollgate.json) names only metrics that a running
//! tollgate binary exposes, and its checker fails for a panel naming one that does not exist.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::process::{cleanup_state, TollgateProcess};
use common::tools::{bin_dir, repo_file};
use common::*;
use serde_json::{json, Value};

/// Runs deploy/grafana/check_dashboard.py on `dashboard` against the scrape in `scrape`.
fn check(dashboard: &Path, scrape: &Path) -> Output {
    Command::new(bin_dir().join("python"))
        .arg(repo_file("deploy/grafana/check_dashboard.py"))
        .arg(dashboard)
        .arg("--scrape")
        .arg(scrape)
        .output()
        .expect("run check_dashboard.py")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A scrape of the real binary after one admission and one settlement, once the usage sync has
/// reported (its gauges appear only then) and the process series are there.
async fn real_scrape(tg: &TollgateProcess) -> String {
    let (key, _) = tg.create_key(json!({"user_id": "dash"})).await;
    let (status, admitted) = tg.admit(&key, json!({})).await;
    assert_eq!(status, 200, "{admitted}");
    let lease = admitted["lease_id"].as_str().expect("lease id");
    assert_eq!(tg.settle(lease, "0.01").await.0, 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let scrape = tg.metrics_text().await;
        let ready = [
            "tollgate_usage_sync_lag_seconds",
            "tollgate_usage_events_pending",
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "tollgate_admission_duration_seconds_bucket",
        ]
        .iter()
        .all(|m| scrape.lines().any(|l| l.starts_with(m)));
        if ready {
            return scrape;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the scrape never had every series:\n{scrape}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_the_dashboard_is_in_a_real_scrape_and_a_missing_one_fails_the_check() {
    require_services().await;
    let settings = base_settings();
    let mut tg = TollgateProcess::start(&settings).await;
    let scrape = real_scrape(&tg).await;
    tg.terminate(Duration::from_secs(20)).await;
    cleanup_state(&settings);

    let dir = std::env::temp_dir().join(unique("tollgate-dashboard-"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let scrape_file = dir.join("metrics.txt");
    std::fs::write(&scrape_file, &scrape).expect("write scrape");

    let dashboard = repo_file("deploy/grafana/tollgate.json");
    let out = check(&dashboard, &scrape_file);
    assert!(
        out.status.success(),
        "the dashboard names metrics tollgate does not expose:\n{}",
        text(&out)
    );
    for m in [
        "tollgate_admissions_total",
        "tollgate_admission_duration_seconds_bucket",
        "tollgate_settlements_total",
        "tollgate_usage_sync_lag_seconds",
        "tollgate_usage_events_pending",
        "tollgate_redis_errors_total",
        "tollgate_fail_open_admissions_total",
        "tollgate_access_log_records_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ] {
        assert!(
            text(&out).contains(m),
            "the dashboard has no panel on {m}: {}",
            text(&out)
        );
    }

    // The same dashboard with one more panel on a metric that does not exist must fail.
    let mut d: Value = serde_json::from_str(&std::fs::read_to_string(&dashboard).expect("read"))
        .expect("dashboard JSON");
    let mut panel = d["panels"][1].clone();
    panel["id"] = json!(999);
    panel["title"] = json!("bogus");
    panel["targets"][0]["expr"] =
        json!("sum(rate(tollgate_no_such_metric_total{job=~\"$job\"}[$__rate_interval]))");
    d["panels"].as_array_mut().expect("panels").push(panel);
    let bogus = dir.join("bogus.json");
    std::fs::write(&bogus, d.to_string()).expect("write");
    let out = check(&bogus, &scrape_file);
    assert!(
        !out.status.success(),
        "a panel on a missing metric passed:\n{}",
        text(&out)
    );
    assert!(
        text(&out).contains("tollgate_no_such_metric_total"),
        "the failure does not name the metric: {}",
        text(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
