//! Rows the table cannot hold, through the real host and PostgreSQL,
//! whatever the chain: each is quarantined with the right culprit (the
//! file: `malformed`, with the column and value; a stage: `failed`, naming
//! it; the database itself: `refused`, with its SQLSTATE and message), the
//! rest of the batch is committed, and `--once` exits 0.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::*;

/// The chains a bad row is tried through.
enum Chain {
    /// A manifest with no stage at all.
    Empty,
    /// One stage that passes every event through unchanged.
    PassThrough,
    /// The faulty fixture in `poison` mode (user 666: price i64::MIN,
    /// user 777: a NUL in event_type).
    Poison,
}

fn plugins_for(dir: &Path, chain: Chain) -> PathBuf {
    let faulty = fixtures_dir().join("faulty.wasm");
    let stage = |mode: &str| {
        format!("[[stage]]\nname = \"faulty\"\ncomponent = \"faulty.wasm\"\n[stage.config]\nmode = \"{mode}\"\n")
    };
    match chain {
        Chain::Empty => plugins_with(
            dir,
            &[],
            "# no stages: rows go from the parser to the table\n",
        ),
        Chain::PassThrough => plugins_with(dir, &[(&faulty, "faulty.wasm")], &stage("pass")),
        Chain::Poison => plugins_with(dir, &[(&faulty, "faulty.wasm")], &stage("poison")),
    }
}

/// Writes `good` valid rows with `bad` rows among them; returns the ids
/// of the good ones.
fn input_with(input: &Path, good: usize, bad: &[String]) -> BTreeSet<String> {
    let mut rows = Vec::new();
    let mut ids = BTreeSet::new();
    for i in 0..good {
        let r = row(1, 1);
        ids.insert(r.split(',').next().unwrap().to_owned());
        rows.push(r);
        if let Some(b) = bad.get(i) {
            rows.push(b.clone());
        }
    }
    write_csv(input, "a.csv", &rows);
    ids
}

fn bad_row(user: i32, kind: &str, price: &str) -> String {
    format!(
        "{},{user},{kind},1,{price},2026-01-05T00:00:00Z",
        uuid::Uuid::new_v4()
    )
}

fn ids_in_table(url: &str) -> BTreeSet<String> {
    table(url).into_keys().collect()
}

/// (kind, stage, reason) of every quarantine row, by line.
fn quarantine(url: &str) -> Vec<(String, Option<String>, String)> {
    query(
        url,
        "SELECT kind, stage, reason FROM pipeline.quarantine ORDER BY line",
    )
    .into_iter()
    .map(|r| (r[0].clone().unwrap(), r[1].clone(), r[2].clone().unwrap()))
    .collect()
}

/// The poison rows of the issue, read from a file: a 25-character
/// event_type, a price past NUMERIC(10,2), a NUL byte in event_type.
fn file_poison() -> Vec<String> {
    vec![
        bad_row(1, &"x".repeat(25), "1.00"),
        bad_row(1, "view", "100000000.00"),
        bad_row(1, "vi\0ew", "1.00"),
    ]
}

fn assert_file_poison_is_malformed(name: &str, chain: Chain) {
    let dir = scratch(name);
    let input = dir.join("input");
    let good = input_with(&input, 20, &file_poison());
    let plugins = plugins_for(&dir, chain);
    let url = fresh_db(name);
    let out = run_once(
        &plugins,
        &input,
        &url,
        &dir.join("state"),
        &["--batch-size", "100"],
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        ids_in_table(&url),
        good,
        "every valid row committed, no other"
    );
    let q = quarantine(&url);
    assert_eq!(q.len(), 3, "{q:?}");
    for (kind, stage, _) in &q {
        assert_eq!(kind, "malformed", "the file is the culprit: {q:?}");
        assert_eq!(stage, &None, "no stage is blamed: {q:?}");
    }
    assert!(
        q[0].2.starts_with(&format!(
            "event_type \"{}\" has 25 characters",
            "x".repeat(25)
        )),
        "{q:?}"
    );
    assert!(
        q[1].2
            .starts_with("price 10000000000 cents does not fit NUMERIC(10,2)"),
        "{q:?}"
    );
    assert!(
        q[2].2
            .starts_with("event_type \"vi\\0ew\" holds a NUL byte"),
        "{q:?}"
    );
    assert!(!log.contains("db error"), "{log}");
    assert!(!log.contains("retrying"), "nothing was retried: {log}");
}

#[test]
fn with_no_stages_rows_the_table_cannot_hold_are_malformed_and_the_rest_committed() {
    assert_file_poison_is_malformed("bad_rows_empty", Chain::Empty);
}

#[test]
fn through_a_pass_through_stage_the_file_not_the_stage_is_blamed() {
    assert_file_poison_is_malformed("bad_rows_pass", Chain::PassThrough);
}

#[test]
fn a_stage_returning_i64_min_or_a_nul_fails_only_those_events() {
    let name = "bad_rows_stage";
    let dir = scratch(name);
    let input = dir.join("input");
    let poisoned = [row(666, 1), row(777, 1)];
    let good = input_with(&input, 20, &poisoned);
    let plugins = plugins_for(&dir, Chain::Poison);
    let url = fresh_db(name);
    let out = run_once(
        &plugins,
        &input,
        &url,
        &dir.join("state"),
        &["--batch-size", "100"],
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        ids_in_table(&url),
        good,
        "the events the stage did not poison are committed"
    );
    let q = quarantine(&url);
    assert_eq!(q.len(), 2, "{q:?}");
    for (kind, stage, _) in &q {
        assert_eq!(kind, "failed", "{q:?}");
        assert_eq!(stage.as_deref(), Some("faulty"), "{q:?}");
    }
    assert!(q[0].2.contains("price -9223372036854775808 cents"), "{q:?}");
    assert!(q[1].2.contains("NUL"), "{q:?}");
    assert!(!log.contains("db error"), "{log}");
}

#[test]
fn rows_the_database_refuses_are_quarantined_with_its_sqlstate_and_the_rest_committed() {
    let name = "bad_rows_refused";
    let dir = scratch(name);
    let input = dir.join("input");
    // Valid for the host, refused by a constraint the operator added.
    let refused = [row(13, 1), row(13, 2)];
    let good = input_with(&input, 30, &refused);
    let url = fresh_db(name);
    query(&url, host::sink::schema::EVENTS_TABLE);
    query(
        &url,
        "ALTER TABLE ecommerce_events ADD CONSTRAINT no_user_13 CHECK (user_id <> 13)",
    );
    let plugins = plugins_for(&dir, Chain::Empty);
    let out = run_once(
        &plugins,
        &input,
        &url,
        &dir.join("state"),
        &["--batch-size", "100"],
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        ids_in_table(&url),
        good,
        "the rows the database accepts are committed"
    );
    let q = quarantine(&url);
    assert_eq!(q.len(), 2, "{q:?}");
    for (kind, stage, reason) in &q {
        assert_eq!(kind, "refused", "{q:?}");
        assert_eq!(stage, &None, "{q:?}");
        assert!(reason.contains("23514"), "the SQLSTATE: {q:?}");
        assert!(
            reason.contains("no_user_13"),
            "the database's message: {q:?}"
        );
    }
    // The refused rows point at their lines in the file (2 good rows, then each bad one).
    let lines = query(
        &url,
        "SELECT file, line FROM pipeline.quarantine ORDER BY line",
    );
    assert_eq!(lines[0][1].as_deref(), Some("3"), "{lines:?}");
    assert!(
        lines[0][0].as_deref().unwrap().ends_with("a.csv"),
        "{lines:?}"
    );
    // The batch record's counts add up.
    let sums = query(
        &url,
        "SELECT sum(rows_in), sum(rows_written + rows_conflicting + rows_malformed + rows_rejected + rows_failed + rows_dropped), sum(rows_failed) FROM pipeline.batches",
    );
    assert_eq!(sums[0][0], sums[0][1], "{sums:?}");
    assert_eq!(sums[0][2].as_deref(), Some("2"), "{sums:?}");
    assert!(
        log.contains("23514"),
        "the log carries the database's words: {log}"
    );
    assert!(!log.contains("db error"), "{log}");
}

#[test]
fn a_reconnect_runs_no_ddl_and_logs_no_notice() {
    let name = "bad_rows_migrate";
    let dir = scratch(name);
    let input = dir.join("input");
    input_with(&input, 3, &[]);
    let url = fresh_db(name);
    let plugins = plugins_for(&dir, Chain::Empty);
    run_once(&plugins, &input, &url, &dir.join("state"), &[]);
    let version = count(&url, "SELECT version FROM pipeline.schema_version");
    assert_eq!(version as usize, host::sink::schema::MIGRATIONS.len());
    // A second start on a migrated database: no DDL, so no NOTICE
    // (`relation ... already exists`), whatever the log level.
    let out = host()
        .env("RUST_LOG", "debug,wasmtime=warn,cranelift=warn")
        .args(run_args(&plugins, &input, &url, &dir.join("state")))
        .arg("--once")
        .output()
        .unwrap();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!log.contains("already exists"), "{log}");
    assert!(!log.contains("schema migrated"), "{log}");
    assert_eq!(
        count(&url, "SELECT count(*) FROM pipeline.schema_version"),
        1
    );
}

/// With parallel writers a batch the database refuses rows of is bisected
/// while the batches after it are copied; they commit after it, in input
/// order, and the table is exact.
#[test]
fn a_refused_batch_holds_the_commits_after_it_with_2_and_4_writers() {
    for writers in ["2", "4"] {
        let name = format!("bad_rows_refused_writers{writers}");
        let dir = scratch(&name);
        let input = dir.join("input");
        // 1000 rows in batches of 100; the refused ones land in the fifth.
        let mut rows: Vec<String> = (0..1000).map(|_| row(1, 1)).collect();
        rows[450] = row(13, 1);
        rows[460] = row(13, 2);
        write_csv(&input, "a.csv", &rows);
        let good: BTreeSet<String> = rows
            .iter()
            .filter(|r| !r.contains(",13,"))
            .map(|r| r.split(',').next().unwrap().to_owned())
            .collect();
        let url = fresh_db(&name);
        query(&url, host::sink::schema::EVENTS_TABLE);
        query(
            &url,
            "ALTER TABLE ecommerce_events ADD CONSTRAINT no_user_13 CHECK (user_id <> 13)",
        );
        let plugins = plugins_for(&dir, Chain::Empty);
        let out = host()
            .env(
                "RUST_LOG",
                "info,host::sink=debug,wasmtime=warn,cranelift=warn",
            )
            .args(run_args(&plugins, &input, &url, &dir.join("state")))
            .args(["--once", "--batch-size", "100", "--writers", writers])
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}");
        assert_eq!(ids_in_table(&url), good, "{writers} writers");
        let q = quarantine(&url);
        assert_eq!(q.len(), 2, "{q:?}");
        assert!(q.iter().all(|(kind, _, _)| kind == "refused"), "{q:?}");
        // Batch ids are taken at commit: in their order the batches must
        // cover the file front to back, 100 rows each, and the refused
        // rows belong to the fifth.
        let batches = query(
            &url,
            "SELECT rows_in, rows_failed FROM pipeline.batches WHERE rows_in > 0 ORDER BY batch_id",
        );
        let counts: Vec<(String, String)> = batches
            .iter()
            .map(|r| (r[0].clone().unwrap(), r[1].clone().unwrap()))
            .collect();
        let mut want = vec![("100".to_owned(), "0".to_owned()); 10];
        want[4].1 = "2".to_owned();
        assert_eq!(counts, want, "{writers} writers: batches in commit order");
        let quarantined_in = count(
            &url,
            "SELECT count(DISTINCT q.batch_id) FROM pipeline.quarantine q JOIN (SELECT batch_id, row_number() OVER (ORDER BY batch_id) AS n FROM pipeline.batches WHERE rows_in > 0) b USING (batch_id) WHERE b.n = 5",
        );
        assert_eq!(
            quarantined_in, 1,
            "the refused rows' batch is the fifth committed"
        );
        let waited = log
            .matches("its commit waits for the batch before it")
            .count();
        println!("{writers} writers: {waited} commits waited for the batch before");
    }
}
