//! The sandbox holds against stages written to misbehave on a few events:
//! each run of `host run --once` (time-per-batch 1 s, memory 64 MiB) exits
//! 0, stays far below 1 GiB of memory, commits every good row, and
//! quarantines the bad events with the stage and the reason (a stage in
//! columns that returns columns that are not a batch included). And the
//! state of a counting stage committed with `snapshot = "every-batch"`
//! equals the events it processed in committed batches, whatever traps,
//! swaps and kills happen.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// What one measured run of the host did.
struct Measured {
    success: bool,
    elapsed: Duration,
    /// Peak resident memory of the host process, in kB.
    max_rss_kb: i64,
    stderr: String,
}

/// Runs the host to its end, measuring its wall time and peak memory
/// (`wait4` reports the peak of that one child, whatever else runs).
fn run_measured(mut cmd: Command, dir: &Path) -> Measured {
    let log = dir.join("host.log");
    let file = std::fs::File::create(&log).unwrap();
    cmd.stdout(Stdio::null()).stderr(file);
    let started = Instant::now();
    let child = cmd.spawn().unwrap();
    let pid = child.id() as libc::pid_t;
    // The guard kills the host if the wait below panics; wait4 reaps it.
    let guard = Running::new(child);
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(reaped, pid, "wait4 failed");
    std::mem::forget(guard);
    Measured {
        success: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        elapsed: started.elapsed(),
        max_rss_kb: usage.ru_maxrss,
        stderr: std::fs::read_to_string(&log).unwrap_or_default(),
    }
}

/// Runs the `faulty` fixture in `mode` over `n` rows, of which those at
/// `bad` have user 666 (what the modes misbehave on).
fn run_mode(name: &str, mode: &str, grants: &str, n: usize, bad: &[usize]) -> (String, Measured) {
    run_fixture(name, "faulty.wasm", mode, grants, n, bad)
}

/// `run_mode` with another misbehaving fixture, run as stage `faulty`.
fn run_fixture(
    name: &str,
    fixture: &str,
    mode: &str,
    grants: &str,
    n: usize,
    bad: &[usize],
) -> (String, Measured) {
    let dir = scratch(name);
    let plugins = plugins_with(
        &dir,
        &[(&fixtures_dir().join(fixture), "faulty.wasm")],
        &format!(
            "[[stage]]\nname = \"faulty\"\ncomponent = \"faulty.wasm\"\ngrants = [{grants}]\n\
             limits = {{ time-per-batch = \"1s\", memory = \"64MiB\" }}\n[stage.config]\nmode = \"{mode}\"\n"
        ),
    );
    let input = dir.join("input");
    let rows: Vec<String> = (0..n)
        .map(|i| match bad.contains(&i) {
            true => row(666, 1),
            false => row(1, 1),
        })
        .collect();
    write_csv(&input, "a.csv", &rows);
    let url = fresh_db(name);
    let mut cmd = host();
    cmd.args(run_args(&plugins, &input, &url, &dir.join("state")))
        .args(["--once", "--batch-size", "50"]);
    let run = run_measured(cmd, &dir);
    (url, run)
}

/// What every misbehaving run must show: a clean exit in time, bounded
/// memory, the good rows committed, the bad ones quarantined with reason.
fn assert_held(what: &str, url: &str, run: &Measured, good: i64, bad: usize, reason: &str) {
    eprintln!(
        "{what}: exit ok {}, {:.1} s, peak RSS {} MiB",
        run.success,
        run.elapsed.as_secs_f64(),
        run.max_rss_kb / 1024
    );
    assert!(run.success, "{what}: the host failed:\n{}", run.stderr);
    // The issue asks for 60 s; a loaded 2-core CI gets three times that.
    assert!(
        run.elapsed < Duration::from_secs(180),
        "{what}: took {:?}",
        run.elapsed
    );
    assert!(
        run.max_rss_kb < 1 << 20,
        "{what}: peak RSS {} kB",
        run.max_rss_kb
    );
    assert_eq!(
        count(url, "SELECT count(*) FROM ecommerce_events"),
        good,
        "{what}: good rows"
    );
    let failed = query(
        url,
        "SELECT stage, reason FROM pipeline.quarantine WHERE kind = 'failed' ORDER BY line",
    );
    assert_eq!(failed.len(), bad, "{what}: quarantined {failed:?}");
    for f in &failed {
        assert_eq!(f[0].as_deref(), Some("faulty"), "{what}: {failed:?}");
        assert!(
            f[1].as_deref().unwrap_or("").contains(reason),
            "{what}: reason {failed:?} lacks {reason:?}"
        );
    }
}

#[test]
fn a_sleep_with_the_clock_granted_is_stopped_at_the_time_limit() {
    let (url, run) = run_mode("sleep_clock", "sleep", "\"clock\"", 100, &[42]);
    assert_held(
        "sleep 30 s with clock",
        &url,
        &run,
        99,
        1,
        "time limit of 1s",
    );
}

#[test]
fn a_sleep_without_the_clock_grant_returns_at_once() {
    // Without the grant every clock pollable is ready: the sleep does not
    // wait, so nothing fails and nothing hits the limit.
    let (url, run) = run_mode("sleep_frozen", "sleep", "", 100, &[42]);
    assert_held("sleep 30 s without clock", &url, &run, 100, 0, "");
}

#[test]
fn printing_in_init_works_with_and_without_the_stderr_grant() {
    for (name, grants) in [("print_stderr", "\"stderr\""), ("print_none", "")] {
        let (url, run) = run_mode(name, "print", grants, 100, &[]);
        assert_held(name, &url, &run, 100, 0, "");
        if !grants.is_empty() {
            assert!(
                run.stderr.contains("faulty: hello on stderr from init"),
                "granted stderr reaches the host's: {}",
                run.stderr
            );
        } else {
            assert!(!run.stderr.contains("hello on stderr"), "{}", run.stderr);
        }
    }
}

#[test]
fn a_spin_in_snapshot_fails_the_batch_and_isolates_the_event() {
    // Every-batch snapshots: a snapshot that never returns fails the
    // attempt, and bisection finds the event after which it does.
    let (url, run) = run_mode("snapshot_spin", "snapshot-spin", "", 100, &[7]);
    assert_held("spin in snapshot", &url, &run, 99, 1, "time limit of 1s");
}

#[test]
fn a_result_aliasing_one_string_is_refused_before_the_host_copies_it() {
    let (url, run) = run_mode("alias", "alias", "", 100, &[60]);
    assert_held("aliased string", &url, &run, 99, 1, "output budget");
}

#[test]
fn columns_that_are_not_a_batch_are_a_stage_failure() {
    for (mode, reason) in [
        ("ragged", "columns have different lengths"),
        ("past-end", "is past the end of its"),
        ("split-char", "is not on a UTF-8 character boundary"),
    ] {
        let name = format!("columns_{}", mode.replace('-', "_"));
        let (url, run) = run_fixture(&name, "faulty_columns.wasm", mode, "", 100, &[41]);
        assert_held(mode, &url, &run, 99, 1, reason);
    }
}

#[test]
fn columns_that_would_make_too_many_host_events_are_refused() {
    // Each of the 20,000 empty events lifts within the budget; the events
    // the host would make of them do not.
    let (url, run) = run_fixture(
        "columns_inflate",
        "faulty_columns.wasm",
        "inflate",
        "",
        100,
        &[41],
    );
    assert_held("inflated columns", &url, &run, 99, 1, "output budget");
}

#[test]
fn ten_times_the_batch_with_forged_ids_is_a_stage_failure() {
    let (url, run) = run_mode("forge10", "forge10", "", 100, &[13]);
    assert_held("10x forged", &url, &run, 99, 1, "was not in the batch");
}

/// Two `--once` runs of the `restore-panic` mode: the first commits a
/// state, the second must restore it, and the stage panics there.
fn restore_twice(name: &str, policy: &str) -> (String, Measured, Measured) {
    let dir = scratch(name);
    let plugins = plugins_with(
        &dir,
        &[(&fixtures_dir().join("faulty.wasm"), "faulty.wasm")],
        &format!(
            "[[stage]]\nname = \"faulty\"\ncomponent = \"faulty.wasm\"\non-incompatible-state = \"{policy}\"\n\
             limits = {{ time-per-batch = \"1s\", memory = \"64MiB\" }}\n[stage.config]\nmode = \"restore-panic\"\n"
        ),
    );
    let input = dir.join("input");
    let url = fresh_db(name);
    let run = |file: &str| {
        write_csv(
            &input,
            file,
            &(0..50).map(|_| row(1, 1)).collect::<Vec<_>>(),
        );
        let mut cmd = host();
        cmd.args(run_args(&plugins, &input, &url, &dir.join("state")))
            .args(["--once", "--batch-size", "50"]);
        run_measured(cmd, &dir)
    };
    let first = run("a.csv");
    let second = run("b.csv");
    (url, first, second)
}

#[test]
fn a_panic_in_restore_at_start_resets_the_stage_with_an_event() {
    let (url, first, second) = restore_twice("restore_reset", "reset");
    assert!(first.success, "{}", first.stderr);
    assert_held("panic in restore (reset)", &url, &second, 100, 0, "");
    assert!(
        second.stderr.contains("starting it with empty state"),
        "{}",
        second.stderr
    );
    let events = query(
        &url,
        "SELECT reason FROM pipeline.plugin_events WHERE stage = 'faulty' AND kind = 'state_reset'",
    );
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        events[0][0]
            .as_deref()
            .unwrap_or("")
            .contains("trapped in restore"),
        "{events:?}"
    );
}

#[test]
fn a_panic_in_restore_at_start_with_refuse_swap_refuses_to_start() {
    let (url, first, second) = restore_twice("restore_refuse", "refuse-swap");
    assert!(first.success, "{}", first.stderr);
    assert!(!second.success, "the host must not start");
    assert!(
        second.stderr.contains("stage faulty cannot restore")
            && second.stderr.contains("on-incompatible-state = \"reset\""),
        "the message names the stage and what to do: {}",
        second.stderr
    );
    assert_eq!(count(&url, "SELECT count(*) FROM ecommerce_events"), 50);
}

/// Committed batches, or 0 before the host has made its tables.
fn batches(url: &str) -> i64 {
    block_on(async {
        let Ok((client, conn)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await else {
            return 0;
        };
        tokio::spawn(conn);
        match client
            .query_one("SELECT count(*) FROM pipeline.batches", &[])
            .await
        {
            Ok(row) => row.get::<_, i64>(0),
            Err(_) => 0,
        }
    })
}

/// The committed count of the counter stage.
fn committed_count(url: &str) -> i64 {
    let rows = query(
        url,
        "SELECT convert_from(state, 'UTF8') FROM pipeline.stage_state WHERE stage = 'counter'",
    );
    rows.first()
        .and_then(|r| r[0].as_deref())
        .map(|s| s.parse().unwrap())
        .unwrap_or(0)
}

#[test]
fn a_counting_stage_commits_exactly_the_events_of_committed_batches() {
    let dir = scratch("counter");
    let v1 = fixtures_dir().join("counter_v1.wasm");
    let v2 = fixtures_dir().join("counter_v2.wasm");
    let plugins = plugins_with(
        &dir,
        &[(&v1, "counter.wasm")],
        "[[stage]]\nname = \"counter\"\ncomponent = \"counter.wasm\"\n",
    );
    let input = dir.join("input");
    let url = fresh_db("counter");
    let mut traps = 0;
    let rounds = 20;
    let mut rng: rand::rngs::StdRng = rand::make_rng();
    for round in 0..rounds {
        // Each round: a file with a few events that trap the counter.
        let rows: Vec<String> = (0..400)
            .map(|i| match i % 97 == 5 {
                true => {
                    traps += 1;
                    row(1, 13)
                }
                false => row(1, 1),
            })
            .collect();
        write_csv(&input, &format!("r{round:02}.csv"), &rows);
        let mut host = Running::new(
            host()
                .args(run_args(&plugins, &input, &url, &dir.join("state")))
                .args(["--batch-size", "30", "--snapshot-interval", "1h"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        // Kill it once it has committed something of this round.
        let before = batches(&url);
        wait_until(Duration::from_secs(180), "a batch of this round", || {
            batches(&url) > before || host.exited()
        });
        if round % 3 == 1 {
            // A swap between two builds while it runs.
            let from = if round % 2 == 1 { &v2 } else { &v1 };
            std::fs::copy(from, plugins.join(".counter.tmp")).unwrap();
            std::fs::rename(plugins.join(".counter.tmp"), plugins.join("counter.wasm")).unwrap();
            std::thread::sleep(Duration::from_millis(700));
        }
        // At a random moment after it: mid-batch, mid-commit or idle.
        std::thread::sleep(Duration::from_millis(rand::RngExt::random_range(
            &mut rng,
            0..400,
        )));
        host.kill(); // SIGKILL
        let rows = count(&url, "SELECT count(*) FROM ecommerce_events");
        assert_eq!(
            committed_count(&url),
            rows,
            "round {round}: the committed count is the committed events"
        );
    }
    // A last run to the end of the input.
    let out = run_once(
        &plugins,
        &input,
        &url,
        &dir.join("state"),
        &["--batch-size", "30"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = count(&url, "SELECT count(*) FROM ecommerce_events");
    assert_eq!(rows, (rounds * 400 - traps) as i64, "every good row");
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM pipeline.quarantine WHERE kind = 'failed' AND stage = 'counter'"
        ),
        traps as i64
    );
    assert_eq!(committed_count(&url), rows);
}

/// A shadow candidate that misbehaves on every batch (sleeps to its time
/// limit, or spins) runs on its own thread: the live stage's time per
/// batch, from the batch records, stays far below the candidate's limit,
/// every row is committed by the live version, and the candidate's
/// failures are recorded until it is disabled.
fn a_misbehaving_shadow_candidate_delays_nothing(name: &str, mode: &str, grants: &str) {
    let dir = scratch(name);
    let limit_ms = 3000;
    let plugins = plugins_with(
        &dir,
        &[
            (&fixtures_dir().join("marker_v1.wasm"), "marker.wasm"),
            (&fixtures_dir().join("faulty.wasm"), "faulty.wasm"),
        ],
        // marker ignores `mode`; the candidate (faulty) misbehaves on user 666.
        &format!(
            "[[stage]]\nname = \"marker\"\ncomponent = \"marker.wasm\"\nshadow = \"faulty.wasm\"\n\
             grants = [{grants}]\nlimits = {{ time-per-batch = \"{limit_ms}ms\", memory = \"64MiB\" }}\n\
             [stage.config]\nmode = \"{mode}\"\n"
        ),
    );
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    let url = fresh_db(&name.replace('-', "_"));
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mut cmd = host();
    cmd.args(run_args(&plugins, &input, &url, &state))
        .args(["--batch-size", "10"]);
    let mut host = Running::spawn(cmd, &state.join("host.log"));
    // One file of ten events (one of them user 666) at a time, each waited
    // for, until the candidate has failed enough batches to be disabled
    // and a batch after that has committed the event: it goes on until
    // then, however long the candidate's failures take on a busy machine.
    let mut files = 0;
    host.wait_until("the candidate disabled", || {
        let mut rows: Vec<String> = (0..10).map(|_| row(1, 1)).collect();
        rows[4] = row(666, 1);
        write_csv(&input, &format!("f{files:05}.csv"), &rows);
        files += 1;
        wait_for_rows(&url, files * 10);
        std::thread::sleep(Duration::from_millis(50));
        count(
            &url,
            "SELECT count(*) FROM pipeline.plugin_events WHERE kind = 'shadow_disabled'",
        ) > 0
    });
    let log = host.stop();

    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM ecommerce_events WHERE event_type = 'view_v1'"
        ),
        files * 10,
        "every row written by the live version\n{log}"
    );
    // The live stage's own time in each batch, as the batch records say.
    let slowest = count(
        &url,
        "SELECT coalesce(max((s->>'ms')::float), 0)::bigint FROM pipeline.batches, jsonb_array_elements(stages) s",
    );
    assert!(
        slowest < limit_ms / 3,
        "the live stage took {slowest} ms in one batch: it waited for its candidate\n{log}"
    );
    let failures = count(
        &url,
        "SELECT count(*) FROM pipeline.shadow_diffs WHERE error LIKE '%time limit%'",
    );
    assert!(
        failures >= 1,
        "the candidate's failures are recorded: {:?}\n{log}",
        query(&url, "SELECT error FROM pipeline.shadow_diffs")
    );
    assert!(log.contains("shadow candidate failed"), "{log}");
}

#[test]
fn a_shadow_candidate_that_sleeps_delays_nothing() {
    a_misbehaving_shadow_candidate_delays_nothing("shadow-sleep", "sleep", "\"clock\"");
}

#[test]
fn a_shadow_candidate_that_spins_delays_nothing() {
    a_misbehaving_shadow_candidate_delays_nothing("shadow-spin", "loop", "");
}

/// A pause and a failed probe leave no trace in a counting stage in front
/// of the stage that fails: its committed count is the events of the
/// committed batches only (the held batch, run twice on the way, is
/// counted once, when it is committed).
#[test]
fn a_counting_stage_counts_a_held_batch_once_through_a_pause_and_a_failed_probe() {
    let dir = scratch("counter-pause");
    let manifest = |second: &str, mode: &str| {
        format!(
            "[[stage]]\nname = \"counter\"\ncomponent = \"counter.wasm\"\n\
             [[stage]]\nname = \"faulty\"\ncomponent = \"{second}\"\n[stage.config]\nmode = \"{mode}\"\n"
        )
    };
    let plugins = plugins_with(
        &dir,
        &[
            (&fixtures_dir().join("counter_v1.wasm"), "counter.wasm"),
            (&fixtures_dir().join("faulty.wasm"), "faulty.wasm"),
            (&fixtures_dir().join("marker_v1.wasm"), "marker.wasm"),
        ],
        &manifest("faulty.wasm", "fail"),
    );
    let input = dir.join("input");
    write_csv(
        &input,
        "a.csv",
        &(0..200).map(|_| row(1, 1)).collect::<Vec<_>>(),
    );
    let url = fresh_db("counter_pause");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mut cmd = host();
    cmd.args(run_args(&plugins, &input, &url, &state)).args([
        "--batch-size",
        "20",
        "--snapshot-interval",
        "0",
    ]);
    let mut host = Running::spawn(cmd, &state.join("host.log"));

    // Three batches fail wholly in `faulty`: committed (quarantined),
    // counted; the fourth is held.
    host.wait_for_log("paused the input", 1);
    let failed = || count(&url, "SELECT count(*) FROM pipeline.quarantine");
    wait_for("three quarantined batches", failed, |n| *n >= 60);
    // A new version that fails all of the held batch too: rewound.
    std::fs::write(
        plugins.join("pipeline.toml"),
        manifest("faulty.wasm", "fail")
            .replace("mode = \"fail\"", "mode = \"fail\"\nagain = \"1\""),
    )
    .unwrap();
    host.wait_for_log("fails every event of the held batch too", 1);
    // A working second stage: the held batch and the rest go through.
    std::fs::write(
        plugins.join("pipeline.toml"),
        manifest("marker.wasm", "pass"),
    )
    .unwrap();
    wait_for_rows(&url, 140);
    let log = host.stop();

    assert_eq!(failed(), 60, "{log}");
    assert_eq!(
        committed_count(&url),
        200,
        "every event counted once, the held batch too\n{log}"
    );
}
