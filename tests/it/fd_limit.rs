//! The process's file descriptors: it raises its soft open-file limit to the hard one, and an accept loop out of descriptors backs off instead of spinning.
//!
//! Alone in a process of its own (`common::alone`): it lowers its own soft limit, which its
//! children inherit.

use crate::common;

use std::time::Duration;

use common::alone::{in_own_process, this_test};
use common::process::{cleanup_state, TollgateProcess};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// (soft, hard) "Max open files" of a process.
fn nofile(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1])
}

/// CPU time (user + system, in clock ticks) a process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = stat.rsplit_once(')').expect("comm").1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted after the command name.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

async fn healthz(addr: std::net::SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&out).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_raises_its_soft_open_file_limit_and_backs_off_when_accept_runs_out_of_descriptors() {
    if !in_own_process(this_test!()).await {
        return;
    }
    require_services().await;
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).expect("getrlimit");
    let low = 256.min(hard);
    rlimit::setrlimit(rlimit::Resource::NOFILE, low, hard).expect("lower the soft limit");
    let settings = base_settings();
    struct Cleanup(std::collections::HashMap<&'static str, String>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            cleanup_state(&self.0);
        }
    }
    let _cleanup = Cleanup(settings.clone());
    let p = TollgateProcess::start(&settings).await;
    assert_eq!(
        nofile(p.pid),
        (hard, hard),
        "the soft limit (inherited {low}) is raised to the hard limit"
    );

    // Now take its descriptors away: a limit just above what it has open.
    let open = std::fs::read_dir(format!("/proc/{}/fd", p.pid))
        .expect("fds")
        .count() as u64;
    let cap = open + 4;
    let status = std::process::Command::new("prlimit")
        .arg("--pid")
        .arg(p.pid.to_string())
        .arg(format!("--nofile={cap}:{cap}"))
        .status()
        .expect("run prlimit");
    assert!(status.success());
    let mut held = Vec::new();
    for _ in 0..32 {
        if let Ok(s) = TcpStream::connect(p.data_addr).await {
            held.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cpu_ticks(p.pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(p.pid) - before;
    // A loop retrying a failing accept at once burns a whole core: ~200 ticks in 2 s.
    assert!(
        used < 60,
        "{used} ticks of CPU in 2 s while out of descriptors"
    );
    assert!(
        p.logs().contains("accept failed; backing off"),
        "accept ran out of descriptors:\n{}",
        p.logs()
    );

    drop(held);
    let mut answered = false;
    for _ in 0..40 {
        if healthz(p.data_addr)
            .await
            .is_some_and(|a| a.starts_with("HTTP/1.1 200"))
        {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        answered,
        "serves again once descriptors are free:\n{}",
        p.logs()
    );
}
