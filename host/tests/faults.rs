//! Stages that misbehave: each is stopped within its limits, the events
//! that make it fail are quarantined with the reason, and the rest of the
//! batch is committed.

mod common;

use std::time::Instant;

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
