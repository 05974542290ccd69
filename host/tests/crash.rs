//! Exactly once under SIGKILL: the host is killed at random moments while
//! it ingests, restarted each time, and the table must end up equal to
//! the expected set: nothing lost, nothing doubled, no record quarantined
//! twice.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use rand::{RngExt, SeedableRng};

#[test]
fn sigkill_at_random_moments_loses_and_doubles_nothing() {
    let dir = scratch("crash");
    let input = dir.join("input");
    let staging = dir.join("staging");
    let url = fresh_db("crash");
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    // A backlog to chew on, and more files arriving between restarts.
    generate(
        &input,
        &[
            "--files",
            "30",
            "--events-per-file",
            "1000",
            "--duplicate-rate",
            "0.05",
            "--invalid-rate",
            "0.01",
            "--seed",
            "11",
        ],
    );

    let kills = 24;
    for round in 0..kills {
        let mut child = host()
            .args(run_args(&plugins_dir(), &input, &url, &dir.join("state")))
            .args(["--batch-size", "250", "--snapshot-interval", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let alive_for = Duration::from_millis(rng.random_range(50..700));
        let started = Instant::now();
        while started.elapsed() < alive_for {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the host exited on its own in round {round}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // New files arrive while the host is down, under fresh names.
        generate(
            &staging,
            &[
                "--files",
                "1",
                "--events-per-file",
                "500",
                "--duplicate-rate",
                "0.1",
                "--invalid-rate",
                "0.02",
                "--seed",
                &(1000 + round).to_string(),
            ],
        );
        for entry in std::fs::read_dir(&staging).unwrap() {
            let path = entry.unwrap().path();
            let name = format!(
                "late_{round}_{}",
                path.file_name().unwrap().to_string_lossy()
            );
            std::fs::rename(&path, input.join(name)).unwrap();
        }
    }
    // Finish whatever is left, then compare.
    run_once(&plugins_dir(), &input, &url, &dir.join("state"), &[]);

    let expected = expected(&input);
    let actual = table(&url);
    assert_eq!(actual.len(), expected.rows.len(), "rows lost or doubled");
    for (id, row) in &expected.rows {
        assert_eq!(actual.get(id), Some(row), "event {id}");
    }
    assert_eq!(
        count(&url, "SELECT count(*) FROM pipeline.quarantine") as usize,
        expected.malformed
    );
    assert_eq!(count(&url, "SELECT count(*) FROM (SELECT file, line FROM pipeline.quarantine GROUP BY 1, 2 HAVING count(*) > 1) d"), 0);
    assert!(
        count(&url, "SELECT count(*) FROM pipeline.batches") > kills as i64,
        "the kills landed mid-ingest"
    );
}
