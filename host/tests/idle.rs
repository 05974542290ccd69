//! Idle means idle: once its backlog is committed the host sleeps until a
//! file arrives, and a trickle of files at the seed's rate costs it next
//! to nothing. CPU is the host's own user+system time from `/proc`, so a
//! busy machine makes these tests slower, not wrong.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// The share of one core that a process used over `window`, from its own
/// clock ticks: (share, ticks).
fn cpu_share(pid: u32, window: Duration) -> (f64, u64) {
    let before = cpu_ticks(pid);
    let started = Instant::now();
    std::thread::sleep(window);
    let ticks = cpu_ticks(pid) - before;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks as f64 / hz / started.elapsed().as_secs_f64(), ticks)
}

/// utime + stime of a process, in clock ticks (/proc/PID/stat fields 14, 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the host is running");
    // The command name may hold spaces: the fields start after its ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn start(dir: &Path, input: &Path, url: &str) -> Running {
    let mut cmd = host();
    cmd.args(run_args(&plugins_dir(), input, url, &dir.join("state")));
    Running::spawn(cmd, &dir.join("host.log"))
}

#[test]
fn an_idle_host_uses_no_cpu_once_its_backlog_is_committed() {
    let dir = scratch("idle");
    let input = dir.join("input");
    generate(
        &input,
        &["--files", "20", "--events-per-file", "100", "--seed", "3"],
    );
    let url = fresh_db("idle");
    let mut host = start(&dir, &input, &url);
    let expected = expected(&input).rows.len() as i64;
    host.wait_until("the backlog committed", || {
        query(&url, "SELECT to_regclass('ecommerce_events')::text")[0][0].is_some()
            && count(&url, "SELECT count(*) FROM ecommerce_events") == expected
    });
    let (share, ticks) = cpu_share(host.id(), Duration::from_secs(10));
    println!(
        "idle: {:.2}% of a core ({ticks} ticks in 10 s)",
        share * 100.0
    );
    assert!(
        share < 0.02,
        "an idle host used {:.1}% of a core ({ticks} ticks in 10 s); its last lines:\n{}",
        share * 100.0,
        host.log_tail()
    );
    host.stop();
}

#[test]
fn a_file_a_second_costs_the_host_next_to_nothing() {
    let dir = scratch("trickle");
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    let url = fresh_db("trickle");
    let mut host = start(&dir, &input, &url);
    // Started and idle (its tables made) before the trickle begins.
    host.wait_until("the host's tables", || {
        query(&url, "SELECT to_regclass('pipeline.batches')::text")[0][0].is_some()
    });
    // The seed's generator at 5x its rate: 100 events every second.
    let mut generator = host_command_generate(&input, &["--interval", "1s", "--files", "12"]);
    std::thread::sleep(Duration::from_secs(1));
    let (share, ticks) = cpu_share(host.id(), Duration::from_secs(10));
    println!(
        "a file of 100 events a second: {:.2}% of a core ({ticks} ticks in 10 s)",
        share * 100.0
    );
    let status = generator.child.take().unwrap().wait().unwrap();
    assert!(
        status.success(),
        "the generator failed: {}",
        generator.log()
    );
    let expected = expected(&input).rows.len() as i64;
    wait_for_rows(&url, expected);
    assert!(
        share < 0.02,
        "the host used {:.1}% of a core for a file a second ({ticks} ticks in 10 s); its last lines:\n{}",
        share * 100.0,
        host.log_tail()
    );
    host.stop();
}

/// `host generate` into `output` in the background, held like a host.
fn host_command_generate(output: &Path, args: &[&str]) -> Running {
    let mut cmd = host();
    cmd.args(["generate", "--output"])
        .arg(output)
        .args(["--events-per-file", "100", "--seed", "4"])
        .args(args);
    Running::spawn(cmd, &output.with_extension("generator.log"))
}
