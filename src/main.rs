//! The `tollgate` binary: parse settings, start logging, hand over to the library.

use std::process::ExitCode;

use tollgate::app::{self, App};
use tollgate::config::{parse_cli, Command, Config, LogFormat};

/// glibc malloc was a large share of tollgate's CPU under load, and jemalloc took a tenth or
/// more off its CPU per request (docs/PERFORMANCE.md, "Load test"). jemalloc does not build
/// for MSVC.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// How often the process series are refreshed: well under any scrape interval, and reading
/// `/proc/self` this seldom costs nothing measurable.
const PROCESS_METRICS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// `process_cpu_seconds_total`, `process_resident_memory_bytes` and the other `process_*`
/// series (Prometheus's standard names) for the dashboard. Only the binary exports them: the
/// library is also started many times inside one test process, whose numbers mean nothing.
/// The recorder is installed by `App::build`, so this runs after it.
fn spawn_process_metrics() {
    let collector = metrics_process::Collector::default();
    collector.describe();
    collector.collect();
    let spawned = std::thread::Builder::new()
        .name("process-metrics".into())
        .spawn(move || loop {
            std::thread::sleep(PROCESS_METRICS_EVERY);
            collector.collect();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no process metrics thread: process_* series are not exported");
    }
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("tollgate: {message}");
    ExitCode::FAILURE
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = parse_cli();
    let (raw, serve) = match cli.command {
        Command::Serve(raw) => (raw, true),
        Command::Migrate(raw) => (raw, false),
        // A client of a running tollgate: no settings, no logging set-up.
        Command::Keys(args) => return tollgate::cli::run(args).await,
    };
    let config = match Config::from_raw(&raw) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    init_logging(config.log_format);
    if !serve {
        return match app::migrate(&config).await {
            Ok(()) => {
                tracing::info!("migrations applied");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        };
    }
    let app = match App::build(config).await {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    spawn_process_metrics();
    match app.run(app::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}
