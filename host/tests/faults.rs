//! Stages that misbehave: each is stopped within its limits, the events
//! that make it fail are quarantined with the reason, and the rest of the
//! batch is committed.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn run_faulty(
    name: &str,
    mode: &str,
    limits: &str,
    rows: Vec<String>,
) -> (String, std::process::Output) {
    let dir = scratch(name);
    let faulty = fixtures_dir().join("faulty.wasm");
    let plugins = plugins_with(
        &dir,
        &[(&faulty, "faulty.wasm")],
        &format!("[[stage]]\nname = \"faulty\"\ncomponent = \"faulty.wasm\"\nlimits = {{ {limits} }}\n[stage.config]\nmode = \"{mode}\"\n"),
    );
    let input = dir.join("input");
    write_csv(&input, "a.csv", &rows);
    let url = fresh_db(name);
    let out = run_once(
        &plugins,
        &input,
        &url,
        &dir.join("state"),
        &["--batch-size", "100"],
    );
    (url, out)
}

fn rows_with(bad: &[usize], n: usize, make_bad: impl Fn() -> String) -> Vec<String> {
    (0..n)
        .map(|i| {
            if bad.contains(&i) {
                make_bad()
            } else {
                row(1, 1)
            }
        })
        .collect()
}

#[test]
fn a_trapping_stage_loses_only_the_events_that_trap_it() {
    let rows = rows_with(&[3, 150], 200, || row(1, 13));
    let (url, _) = run_faulty("trap", "trap", "time-per-batch = \"5s\"", rows);
    assert_eq!(count(&url, "SELECT count(*) FROM ecommerce_events"), 198);
    let failed = query(
        &url,
        "SELECT line, reason, stage FROM pipeline.quarantine WHERE kind = 'failed' ORDER BY line",
    );
    assert_eq!(failed.len(), 2);
    assert_eq!(failed[0][0].as_deref(), Some("5"));
    assert!(
        failed[0][1].as_deref().unwrap().contains("trapped"),
        "{failed:?}"
    );
    assert_eq!(failed[0][2].as_deref(), Some("faulty"));
}

#[test]
fn an_endless_loop_is_stopped_at_the_time_limit() {
    let rows = rows_with(&[42], 100, || row(666, 1));
    let started = Instant::now();
    let (url, _) = run_faulty("loop", "loop", "time-per-batch = \"200ms\"", rows);
    // Retry, then bisection of 100 events: about 2 + 2*log2(100) time-outs.
    assert!(
        started.elapsed().as_secs() < 30,
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(count(&url, "SELECT count(*) FROM ecommerce_events"), 99);
    let reason = query(
        &url,
        "SELECT reason FROM pipeline.quarantine WHERE kind = 'failed'",
    );
    assert_eq!(reason.len(), 1);
    assert!(
        reason[0][0].as_deref().unwrap().contains("time limit"),
        "{reason:?}"
    );
}

#[test]
fn a_memory_hog_is_stopped_at_its_cap() {
    let rows = rows_with(&[7], 50, || row(666, 1));
    let (url, _) = run_faulty("hog", "hog", "memory = \"32MiB\"", rows);
    assert_eq!(count(&url, "SELECT count(*) FROM ecommerce_events"), 49);
    let reason = query(
        &url,
        "SELECT reason FROM pipeline.quarantine WHERE kind = 'failed'",
    );
    assert!(
        reason[0][0].as_deref().unwrap().contains("memory limit"),
        "{reason:?}"
    );
}

#[test]
fn a_stage_without_grants_cannot_reach_files_or_the_network() {
    let (url, _) = run_faulty(
        "escape",
        "escape",
        "",
        rows_with(&[], 10, || unreachable!()),
    );
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM ecommerce_events WHERE event_type = 'view'"
        ),
        10
    );
}

#[test]
fn forged_event_ids_are_a_stage_failure() {
    let (url, _) = run_faulty("forge", "forge", "", rows_with(&[], 10, || unreachable!()));
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM ecommerce_events WHERE event_id LIKE '00000000%'"
        ),
        0
    );
    let reasons = query(
        &url,
        "SELECT DISTINCT reason FROM pipeline.quarantine WHERE kind = 'failed'",
    );
    assert!(
        reasons[0][0]
            .as_deref()
            .unwrap()
            .contains("was not in the batch"),
        "{reasons:?}"
    );
}

#[test]
fn a_component_of_another_world_is_refused_at_start_with_the_reason() {
    let dir = scratch("wrong-world");
    let plugins = plugins_with(
        &dir,
        &[(&fixtures_dir().join("wrong_world.wasm"), "other.wasm")],
        "[[stage]]\nname = \"other\"\ncomponent = \"other.wasm\"\n",
    );
    let url = fresh_db("wrong_world");
    let out = host()
        .args(run_args(
            &plugins,
            &dir.join("input"),
            &url,
            &dir.join("state"),
        ))
        .arg("--once")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("other.wasm") && stderr.contains("does not"),
        "{stderr}"
    );
}

fn install(from: &std::path::Path, plugins: &std::path::Path, name: &str) {
    let tmp = plugins.join(format!(".{name}.tmp"));
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(tmp, plugins.join(name)).unwrap();
}

fn table_ready(url: &str) -> bool {
    query(url, "SELECT to_regclass('pipeline.quarantine')::text")[0][0].is_some()
}

/// A stage that traps on every event: after three wholly failed batches
/// the input is held (nothing more quarantined), /healthz and the metric
/// say why, a version that fails too keeps it held without committing
/// anything, and a working version gets every held event.
#[test]
fn a_stage_that_fails_every_event_pauses_the_input_until_a_new_version_arrives() {
    let dir = scratch("pause");
    let manifest = |mode: &str| {
        format!("[[stage]]\nname = \"faulty\"\ncomponent = \"stage.wasm\"\n[stage.config]\nmode = \"{mode}\"\n")
    };
    let plugins = plugins_with(
        &dir,
        &[(&fixtures_dir().join("faulty.wasm"), "stage.wasm")],
        &manifest("trap"),
    );
    let input = dir.join("input");
    // Product 13 makes the faulty stage trap: every event of every batch.
    let rows: Vec<String> = (0..200).map(|_| row(1, 13)).collect();
    write_csv(&input, "a.csv", &rows);
    let url = fresh_db("pause");
    let port = free_port();
    let log = dir.join("host.log");
    let child = Running::new(
        host()
            .args(run_args_on(
                &plugins,
                &input,
                &url,
                &dir.join("state"),
                port,
            ))
            .args(["--batch-size", "20", "--snapshot-interval", "0"])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );

    let started = Instant::now();
    let health = || http_get(port, "/healthz");
    wait_until(
        PATIENCE,
        "the pause",
        || matches!(health(), Some((503, body)) if body.contains("paused the input")),
    );
    let detected = started.elapsed();
    let (_, body) = health().unwrap();
    assert!(
        body.contains("stage faulty") && body.contains("trapped"),
        "{body}"
    );
    let metrics = http_get(port, "/metrics").unwrap().1;
    assert!(
        metrics.contains("pipeline_stage_paused{stage=\"faulty\"} 1"),
        "{metrics}"
    );
    // Held: only the three failed batches are quarantined, nothing more.
    let failed = || count(&url, "SELECT count(*) FROM pipeline.quarantine");
    // The pause is declared as the third batch goes to the sink: wait for
    // its commit, then give a fourth batch every chance to (wrongly) come.
    wait_for("three quarantined batches", failed, |n| *n >= 60);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(failed(), 60, "three batches of 20, then held");
    assert_eq!(count(&url, "SELECT count(*) FROM ecommerce_events"), 0);

    // A new version that fails every event too: the held batch is not
    // committed (no quarantine), and the input stays held.
    std::fs::write(plugins.join("pipeline.toml"), manifest("fail")).unwrap();
    wait_until(PATIENCE, "the failed probe", || {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("fails every event of the held batch too")
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(failed(), 60);
    assert_eq!(health().unwrap().0, 503);

    // A working component renamed in: every held event reaches the table.
    install(
        &fixtures_dir().join("marker_v1.wasm"),
        &plugins,
        "stage.wasm",
    );
    wait_until(PATIENCE, "the held rows", || {
        table_ready(&url) && count(&url, "SELECT count(*) FROM ecommerce_events") == 140
    });
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM ecommerce_events WHERE event_type = 'view_v1'"
        ),
        140
    );
    assert_eq!(failed(), 60, "nothing of the held input was quarantined");
    assert_eq!(health().unwrap().0, 200);
    let metrics = http_get(port, "/metrics").unwrap().1;
    assert!(
        metrics.contains("pipeline_stage_paused{stage=\"faulty\"} 0"),
        "{metrics}"
    );
    assert!(child.terminate(), "clean exit on SIGTERM");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("input resumed"), "{text}");
    println!("pause detected {detected:?} after start (3 batches of 20 trapping events)");
}

#[test]
fn with_once_a_stage_that_fails_every_event_stops_the_run_without_committing_the_rest() {
    let dir = scratch("pause-once");
    let plugins = plugins_with(
        &dir,
        &[(&fixtures_dir().join("faulty.wasm"), "faulty.wasm")],
        "[[stage]]\nname = \"faulty\"\ncomponent = \"faulty.wasm\"\n[stage.config]\nmode = \"trap\"\n",
    );
    let input = dir.join("input");
    write_csv(
        &input,
        "a.csv",
        &(0..200).map(|_| row(1, 13)).collect::<Vec<_>>(),
    );
    let url = fresh_db("pause_once");
    let out = host()
        .args(run_args(&plugins, &input, &url, &dir.join("state")))
        .args(["--once", "--batch-size", "20"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("paused the input") && stderr.contains("--once"),
        "{stderr}"
    );
    assert_eq!(count(&url, "SELECT count(*) FROM pipeline.quarantine"), 60);
    // The held input is not committed: a fixed stage reads it next time.
    let committed = count(
        &url,
        "SELECT coalesce(max(line), 0) FROM pipeline.positions",
    );
    assert_eq!(committed, 61, "header and three batches");
}
