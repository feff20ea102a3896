//! The `tollgate` binary: its help lists every setting of the contract with its default, a bad
//! setting stops it with one clear line and no panic, and `tollgate migrate` migrates.

use crate::common;

use std::process::Output;
use std::time::Duration;

use base64::Engine as _;
use common::*;
use sqlx::PgPool;

/// The contract's settings and their defaults.
const SETTINGS: [(&str, &str); 16] = [
    ("TOLLGATE_LISTEN", "127.0.0.1:8080"),
    ("TOLLGATE_ADMIN_LISTEN", "127.0.0.1:8081"),
    ("TOLLGATE_REDIS_URL", "redis://127.0.0.1:6379"),
    ("TOLLGATE_DATABASE_URL", "postgres://localhost/tollgate"),
    ("TOLLGATE_REDIS_NAMESPACE", "tollgate"),
    ("TOLLGATE_ADMIN_TOKEN", "none"),
    ("TOLLGATE_ENCRYPTION_KEY", "none"),
    ("TOLLGATE_KEY_PREFIX", "sk"),
    ("TOLLGATE_RATE_WINDOW_SECONDS", "60"),
    ("TOLLGATE_LEASE_TTL_SECONDS", "600"),
    ("TOLLGATE_FAIL_MODE", "closed"),
    ("TOLLGATE_CLEANUP_INTERVAL_SECONDS", "300"),
    ("TOLLGATE_AUTO_DELETE_EXPIRED", "false"),
    ("TOLLGATE_SUBREQUEST_LEASE_TTL_SECONDS", "60"),
    ("TOLLGATE_ACCESS_LOG_LISTEN", "none (off)"),
    ("TOLLGATE_PRICES_FILE", "none (the built-in table)"),
];

/// Runs the binary with exactly `env` as its environment (plus backtraces switched on, so a
/// panic would show), bounded in time.
async fn run(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.args(args)
        .env_clear()
        .env("RUST_BACKTRACE", "1")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("tollgate {args:?} with {env:?} did not exit within 60s"))
        .expect("run the tollgate binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The help line naming `name` (as a whole word).
fn line_naming<'a>(help: &'a str, name: &str) -> Option<&'a str> {
    help.lines().find(|l| {
        l.match_indices(name).any(|(i, _)| {
            let after = l[i + name.len()..].chars().next();
            let before = l[..i].chars().next_back();
            !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        })
    })
}

fn assert_lists_every_setting(help: &str, what: &str) {
    for (name, default) in SETTINGS {
        let line = line_naming(help, name)
            .unwrap_or_else(|| panic!("{what} does not list {name}:\n{help}"));
        assert!(
            line.contains(&format!("[default: {default}]")),
            "{what}: {name} is not shown with its default {default}: {line:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_lists_every_setting_with_its_default() {
    for args in [&["--help"][..], &["serve", "--help"], &["help"], &["-h"]] {
        let out = run(args, &[]).await;
        assert!(
            out.status.success(),
            "tollgate {args:?}: {}",
            text(&out.stderr)
        );
        assert_lists_every_setting(&text(&out.stdout), &format!("tollgate {}", args.join(" ")));
    }
    let out = run(&["migrate", "--help"], &[]).await;
    assert!(out.status.success());
    let help = text(&out.stdout);
    assert!(
        line_naming(&help, "TOLLGATE_DATABASE_URL").is_some(),
        "{help}"
    );
}

/// Asserts a start-up failure: non-zero exit, one line on stderr naming `expect`, no panic.
fn assert_one_clear_line(out: &Output, expect: &str, secret: Option<&str>, what: &str) {
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{what}: exited 0; stderr: {stderr}");
    assert!(
        out.status.code().is_some(),
        "{what}: killed by a signal: {:?}",
        out.status
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: exactly one line on stderr, got:\n{stderr}"
    );
    assert!(
        lines[0].contains(expect),
        "{what}: {expect:?} not in {:?}",
        lines[0]
    );
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE", "stack"] {
        assert!(!stderr.contains(bad), "{what}: {bad} in {stderr}");
    }
    if let Some(s) = secret {
        assert!(
            !stderr.contains(s),
            "{what}: the bad secret is echoed: {stderr}"
        );
    }
    assert!(
        text(&out.stdout).trim().is_empty(),
        "{what}: stdout {}",
        text(&out.stdout)
    );
}

/// A database name that is dropped at the end of the test, whatever happens.
struct ScratchDb {
    name: String,
}

impl ScratchDb {
    fn new() -> Self {
        ScratchDb {
            name: unique("tollgate_cli_"),
        }
    }
    fn url(&self) -> String {
        format!("{}/{}", pg_server_url(), self.name)
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        cleanup_blocking(None, Some(self.name.clone()), redis_url(), unique("unused"));
    }
}

async fn database_exists(name: &str) -> bool {
    let pool = PgPool::connect(&format!("{}/postgres", pg_server_url()))
        .await
        .unwrap();
    let exists = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    exists
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_stop_start_up_with_one_clear_line() {
    require_services().await;
    let db = ScratchDb::new();
    // Should a bad database URL be taken for a good one, it must still name a scratch database.
    let other_db = ScratchDb::new();
    let mysql = format!("mysql://postgres@127.0.0.1:5432/{}", other_db.name);
    let bad_prices = std::env::temp_dir().join(unique("tollgate-bad-prices-"));
    std::fs::write(
        &bad_prices,
        r#"{"openai/gpt-4o": {"input_per_mtok_usd": "cheap"}}"#,
    )
    .expect("write a bad prices file");
    let short_key = base64::engine::general_purpose::STANDARD.encode([9u8; 31]);
    let long_key = base64::engine::general_purpose::STANDARD.encode([9u8; 33]);
    #[rustfmt::skip]
    let cases: Vec<(&str, String, &str, bool)> = vec![
        ("TOLLGATE_REDIS_URL", "http://127.0.0.1:6379".into(), "TOLLGATE_REDIS_URL", false),
        ("TOLLGATE_REDIS_URL", "redis://[::1".into(), "TOLLGATE_REDIS_URL", false),
        ("TOLLGATE_REDIS_URL", "redis://127.0.0.1:6379,not a url".into(), "TOLLGATE_REDIS_URL", false),
        ("TOLLGATE_DATABASE_URL", "not a url".into(), "TOLLGATE_DATABASE_URL", false),
        ("TOLLGATE_DATABASE_URL", mysql, "TOLLGATE_DATABASE_URL", false),
        ("TOLLGATE_ENCRYPTION_KEY", short_key, "TOLLGATE_ENCRYPTION_KEY", true),
        ("TOLLGATE_ENCRYPTION_KEY", long_key, "TOLLGATE_ENCRYPTION_KEY", true),
        ("TOLLGATE_ENCRYPTION_KEY", "not base64 at all!".into(), "TOLLGATE_ENCRYPTION_KEY", true),
        ("TOLLGATE_ADMIN_TOKEN", "short-token".into(), "TOLLGATE_ADMIN_TOKEN", true),
        ("TOLLGATE_FAIL_MODE", "ajar".into(), "TOLLGATE_FAIL_MODE", false),
        ("TOLLGATE_LISTEN", "nowhere".into(), "TOLLGATE_LISTEN", false),
        ("TOLLGATE_ADMIN_LISTEN", "127.0.0.1:99999".into(), "TOLLGATE_ADMIN_LISTEN", false),
        ("TOLLGATE_RATE_WINDOW_SECONDS", "0".into(), "TOLLGATE_RATE_WINDOW_SECONDS", false),
        ("TOLLGATE_LEASE_TTL_SECONDS", "-5".into(), "TOLLGATE_LEASE_TTL_SECONDS", false),
        ("TOLLGATE_CLEANUP_INTERVAL_SECONDS", "soon".into(), "TOLLGATE_CLEANUP_INTERVAL_SECONDS", false),
        ("TOLLGATE_AUTO_DELETE_EXPIRED", "maybe".into(), "TOLLGATE_AUTO_DELETE_EXPIRED", false),
        ("TOLLGATE_KEY_PREFIX", "s k".into(), "TOLLGATE_KEY_PREFIX", false),
        ("TOLLGATE_REDIS_NAMESPACE", "a b".into(), "TOLLGATE_REDIS_NAMESPACE", false),
        ("TOLLGATE_SUBREQUEST_LEASE_TTL_SECONDS", "0".into(), "TOLLGATE_SUBREQUEST_LEASE_TTL_SECONDS", false),
        ("TOLLGATE_ACCESS_LOG_LISTEN", "nowhere".into(), "TOLLGATE_ACCESS_LOG_LISTEN", false),
        ("TOLLGATE_PRICES_FILE", "/nonexistent/prices.json".into(), "TOLLGATE_PRICES_FILE", false),
        ("TOLLGATE_PRICES_FILE", bad_prices.display().to_string(), "TOLLGATE_PRICES_FILE", false),
    ];
    for (name, value, expect, secret) in &cases {
        let mut env = vec![
            ("TOLLGATE_DATABASE_URL", db.url()),
            ("TOLLGATE_LISTEN", "127.0.0.1:0".to_string()),
            ("TOLLGATE_ADMIN_LISTEN", "127.0.0.1:0".to_string()),
            ("TOLLGATE_REDIS_NAMESPACE", unique("t")),
        ];
        env.retain(|(k, _)| k != name);
        env.push((name, value.clone()));
        for command in ["serve", "migrate"] {
            let out = run(&[command], &env).await;
            let what = format!("{command} with {name}={value:?}");
            assert_one_clear_line(&out, expect, secret.then_some(value.as_str()), &what);
        }
    }
    // The same through flags, which win over the environment.
    let env = vec![
        ("TOLLGATE_DATABASE_URL", db.url()),
        ("TOLLGATE_FAIL_MODE", "closed".to_string()),
    ];
    let out = run(&["serve", "--fail-mode", "ajar"], &env).await;
    assert_one_clear_line(&out, "TOLLGATE_FAIL_MODE", None, "serve --fail-mode ajar");
    let out = run(
        &[
            "serve",
            "--listen",
            "nowhere",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        &env,
    )
    .await;
    assert_one_clear_line(&out, "TOLLGATE_LISTEN", None, "serve --listen nowhere");
    let _ = std::fs::remove_file(&bad_prices);
    assert!(
        !database_exists(&db.name).await,
        "a bad setting is found before anything is created"
    );
    assert!(
        !database_exists(&other_db.name).await,
        "a mysql:// URL is not used as Postgres"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_stops_start_up_with_one_clear_line() {
    require_services().await;
    let db = ScratchDb::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().unwrap().to_string();
    for (name, other) in [
        ("TOLLGATE_LISTEN", "TOLLGATE_ADMIN_LISTEN"),
        ("TOLLGATE_ADMIN_LISTEN", "TOLLGATE_LISTEN"),
    ] {
        let env = vec![
            (name, addr.clone()),
            (other, "127.0.0.1:0".to_string()),
            ("TOLLGATE_DATABASE_URL", db.url()),
            ("TOLLGATE_REDIS_URL", redis_url()),
            ("TOLLGATE_REDIS_NAMESPACE", unique("t")),
            ("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
            ("TOLLGATE_ENCRYPTION_KEY", encryption_key()),
        ];
        let out = run(&["serve"], &env).await;
        assert_one_clear_line(
            &out,
            &addr,
            Some(ADMIN_TOKEN),
            &format!("serve with {name} in use"),
        );
    }
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_the_tables_of_a_fresh_database_and_exits_0() {
    require_services().await;
    let db = ScratchDb::new();
    assert!(!database_exists(&db.name).await);
    // Redis is neither needed nor touched: an unreachable one does not matter.
    let env = vec![
        ("TOLLGATE_DATABASE_URL", db.url()),
        ("TOLLGATE_REDIS_URL", "redis://127.0.0.1:1".to_string()),
    ];
    for round in 0..2 {
        let out = run(&["migrate"], &env).await;
        assert!(
            out.status.success(),
            "migrate (round {round}) failed: {}",
            text(&out.stderr)
        );
        assert!(!text(&out.stderr).contains("panicked"));
    }
    let pool = PgPool::connect(&db.url())
        .await
        .expect("the database exists");
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for t in ["api_keys", "balance_ledger", "usage_daily", "usage_events"] {
        assert!(tables.iter().any(|x| x == t), "{t} missing from {tables:?}");
    }
    let (applied, failed): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE NOT success) FROM _sqlx_migrations",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(applied >= 1, "migrations recorded");
    assert_eq!(failed, 0);
    let expected = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql"))
        })
        .count();
    assert_eq!(
        applied, expected as i64,
        "every migration applied once, even run twice"
    );
    pool.close().await;

    // The flag wins over a bad environment variable.
    let db2 = ScratchDb::new();
    let url = db2.url();
    let out = run(
        &["migrate", "--database-url", &url],
        &[("TOLLGATE_DATABASE_URL", "not a url".to_string())],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(database_exists(&db2.name).await);
}
