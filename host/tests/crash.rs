//! Exactly once under SIGKILL: the host is killed at random moments while
//! it ingests, restarted each time, and the table must end up equal to
//! the expected set: nothing lost, nothing doubled, no record quarantined
//! twice.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rand::{RngExt, SeedableRng};

#[test]
fn sigkill_at_random_moments_loses_and_doubles_nothing() {
    // Stage state committed with every batch.
    sigkill_rounds(
        "crash",
        &["--snapshot-interval", "0", "--writers", "2"],
        42,
        100,
    );
}

#[test]
fn sigkill_at_random_moments_with_4_writers_loses_and_doubles_nothing() {
    sigkill_rounds(
        "crash_writers4",
        &["--snapshot-interval", "0", "--writers", "4"],
        44,
        60,
    );
}

#[test]
fn sigkill_at_random_moments_with_the_default_snapshot_interval_loses_and_doubles_nothing() {
    // Dedup's state is committed every 10 s: after a kill it is older than
    // the positions, and the primary key catches what it lets by.
    sigkill_rounds("crash_default", &[], 43, 100);
}

/// SIGKILL while a later batch's rows are copied and its commit waits for
/// an earlier batch's, which a test hook holds: with 2 and 4 writers. No
/// stage drops duplicates, so batches in flight share ids too (the primary
/// key and the order of commits must cope: see `sink::order`).
#[test]
fn sigkill_between_a_later_batchs_copy_and_an_earlier_batchs_commit() {
    for writers in ["2", "4"] {
        let name = format!("crash_held_writers{writers}");
        let dir = scratch(&name);
        let input = dir.join("input");
        let url = fresh_db(&name);
        generate(
            &input,
            &[
                "--files",
                "6",
                "--events-per-file",
                "1000",
                "--duplicate-rate",
                "0.2",
                "--invalid-rate",
                "0.01",
                "--seed",
                "12",
            ],
        );
        // The transform alone: no stage drops the duplicates.
        let plugins = plugins_with(
            &dir,
            &[(&plugins_dir().join("transform.wasm"), "transform.wasm")],
            "[[stage]]\nname = \"transform\"\ncomponent = \"transform.wasm\"\ngrants = [\"clock\"]\n[stage.config]\nallowed-event-types = \"view,add_to_cart,remove_from_cart,purchase\"\n",
        );
        for round in 0..8 {
            let mut cmd = host();
            cmd.env("PIPELINE_TEST_HOLD_COMMIT_MS", "300")
                .env(
                    "RUST_LOG",
                    "info,host::sink=debug,wasmtime=warn,cranelift=warn",
                )
                .args(run_args(&plugins, &input, &url, &dir.join("state")))
                .args(["--batch-size", "200", "--writers", writers]);
            let mut child = Running::spawn(cmd, &dir.join(format!("host-{round}.log")));
            // Each commit is held 300 ms, so the next batch's rows are
            // copied by then and its commit waits: the moment to kill.
            let log = dir.join(format!("host-{round}.log"));
            child.wait_until("a commit waiting for the batch before it", || {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("its commit waits for the batch before it")
            });
            child.kill();
        }
        run_once(&plugins, &input, &url, &dir.join("state"), &[]);
        let expected = expected(&input);
        let actual = table(&url);
        assert_eq!(
            actual.len(),
            expected.rows.len(),
            "{writers} writers: rows lost or doubled"
        );
        for (id, row) in &expected.rows {
            assert_eq!(actual.get(id), Some(row), "{writers} writers: event {id}");
        }
        assert_eq!(
            count(&url, "SELECT count(*) FROM pipeline.quarantine") as usize,
            expected.malformed
        );
    }
}

/// `kills` SIGKILLs at random moments (each round short: the host lives 50
/// to 400 ms), new files arriving between restarts; then the table must
/// equal the expected set and no record be quarantined twice.
fn sigkill_rounds(name: &str, extra: &[&str], seed: u64, kills: u32) {
    let dir = scratch(name);
    let input = dir.join("input");
    let staging = dir.join("staging");
    let url = fresh_db(name);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
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

    for round in 0..kills {
        let mut cmd = host();
        cmd.args(run_args(&plugins_dir(), &input, &url, &dir.join("state")))
            .args(["--batch-size", "250"])
            .args(extra);
        let mut child = Running::spawn(cmd, &dir.join(format!("host-{round}.log")));
        let alive_for = Duration::from_millis(rng.random_range(50..400));
        let started = Instant::now();
        while started.elapsed() < alive_for {
            assert!(
                !child.exited(),
                "the host exited on its own in round {round}:\n{}",
                child.log_tail()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        child.kill(); // SIGKILL
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

fn install(from: &std::path::Path, plugins: &std::path::Path, name: &str) {
    let tmp = plugins.join(format!(".{name}.tmp"));
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(tmp, plugins.join(name)).unwrap();
}

fn sha256(path: &std::path::Path) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Moves freshly generated files into `input` under new names.
fn arrive(staging: &std::path::Path, input: &std::path::Path, round: u32, events: &str) {
    generate(
        staging,
        &[
            "--files",
            "1",
            "--events-per-file",
            events,
            "--duplicate-rate",
            "0.1",
            "--invalid-rate",
            "0.02",
            "--seed",
            &(2000 + round).to_string(),
        ],
    );
    for entry in std::fs::read_dir(staging).unwrap() {
        let path = entry.unwrap().path();
        let name = format!(
            "late_{round}_{}",
            path.file_name().unwrap().to_string_lossy()
        );
        std::fs::rename(&path, input.join(name)).unwrap();
    }
}

#[test]
fn sigkill_right_after_a_hot_swap_loses_and_doubles_nothing() {
    let dir = scratch("crash-swap");
    let input = dir.join("input");
    let staging = dir.join("staging");
    let url = fresh_db("crash_swap");
    let (v1, v2) = (
        fixtures_dir().join("marker_v1.wasm"),
        fixtures_dir().join("marker_v2.wasm"),
    );
    let transform = std::fs::read_to_string(plugins_dir().join("pipeline.toml")).unwrap();
    let transform = &transform[..transform.find("[[stage]]\nname = \"dedup\"").unwrap()];
    let plugins = plugins_with(
        &dir,
        &[
            (&plugins_dir().join("transform.wasm"), "transform.wasm"),
            (&v1, "marker.wasm"),
        ],
        &format!("{transform}\n[[stage]]\nname = \"marker\"\ncomponent = \"marker.wasm\"\n"),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    generate(
        &input,
        &[
            "--files",
            "10",
            "--events-per-file",
            "500",
            "--duplicate-rate",
            "0.05",
            "--invalid-rate",
            "0.01",
            "--seed",
            "21",
        ],
    );
    let rounds = 8;
    for round in 0..rounds {
        let mut cmd = host();
        cmd.args(run_args(&plugins, &input, &url, &dir.join("state")))
            .args(["--batch-size", "100", "--snapshot-interval", "0"]);
        let mut child = Running::spawn(cmd, &dir.join(format!("host-{round}.log")));
        if round == 0 {
            // v1 commits something before the first swap, whatever the
            // machine's speed, so that both versions are seen to run.
            child.wait_until("v1's first rows", || {
                query(&url, "SELECT to_regclass('ecommerce_events')::text")[0][0].is_some()
                    && count(&url, "SELECT count(*) FROM ecommerce_events") > 0
            });
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(300..800)));
        assert!(
            !child.exited(),
            "exited in round {round}:\n{}",
            child.log_tail()
        );
        // The new version lands; the kill comes while it is compiled,
        // swapped in, or running its first batches.
        install(
            if round % 2 == 0 { &v2 } else { &v1 },
            &plugins,
            "marker.wasm",
        );
        std::thread::sleep(Duration::from_millis(rng.random_range(0..400)));
        child.kill();
        arrive(&staging, &input, round, "300");
    }
    // The rest, with the last round's arrivals, goes to v2: it runs
    // whatever the kills left it.
    install(&v2, &plugins, "marker.wasm");
    run_once(&plugins, &input, &url, &dir.join("state"), &[]);

    let expected = expected(&input);
    let actual = table(&url);
    // Which version processed a row depends on where the kills fell; the
    // expected outcome of each row follows from the rules of the version
    // that did (see the marker fixture): v1 rejects product 900, v2
    // rejects 901 and adds a cent to 902. A row missing from the table
    // must be quarantined as rejected by a version whose rule rejects it.
    let rejects = |version: usize, product: i32| product == [900, 901][version];
    let rejected: std::collections::BTreeMap<String, (String, String)> = query(
        &url,
        "SELECT event_id, reason, file || ':' || line FROM pipeline.quarantine WHERE kind = 'rejected'",
    )
    .into_iter()
    .map(|r| (r[0].clone().unwrap(), (r[1].clone().unwrap(), r[2].clone().unwrap_or_default())))
    .collect();
    let mut marks = [0i64; 2];
    let mut missing = 0;
    for (id, row) in &expected.rows {
        let Some(got) = actual.get(id) else {
            let (reason, at) = rejected
                .get(id)
                .unwrap_or_else(|| panic!("event {id} lost: neither in the table nor rejected"));
            let version = (0..2)
                .find(|&v| reason == &format!("product {} is not sold_v{}", row.2, v + 1))
                .unwrap_or_else(|| panic!("event {id} ({at}) rejected for no rule: {reason}"));
            assert!(rejects(version, row.2), "event {id}: {reason}");
            missing += 1;
            continue;
        };
        let mut got = got.clone();
        let version = if let Some(k) = got.1.strip_suffix("_v1") {
            got.1 = k.to_owned();
            0
        } else if let Some(k) = got.1.strip_suffix("_v2") {
            got.1 = k.to_owned();
            1
        } else {
            panic!("event {id} not marked by either version: {}", got.1)
        };
        marks[version] += 1;
        assert!(
            !rejects(version, row.2),
            "event {id} kept by v{}",
            version + 1
        );
        let mut want = row.clone();
        if version == 1 && row.2 == 902 {
            let (whole, frac) = want.3.split_once('.').unwrap();
            let cents = whole.parse::<u64>().unwrap() * 100 + frac.parse::<u64>().unwrap() + 1;
            want.3 = format!("{}.{:02}", cents / 100, cents % 100);
        }
        assert_eq!(got, want, "event {id} (v{})", version + 1);
    }
    assert_eq!(
        actual.len() + missing,
        expected.rows.len(),
        "rows lost or doubled: {} in the table, {missing} rejected, {} expected",
        actual.len(),
        expected.rows.len()
    );
    assert!(marks[0] > 0 && marks[1] > 0, "both versions ran: {marks:?}");
    // Every committed batch names the version that marked its rows.
    for (path, marked) in [(&v1, marks[0]), (&v2, marks[1])] {
        let written = count(
            &url,
            &format!("SELECT coalesce(sum(rows_written), 0) FROM pipeline.batches WHERE stages->1->>'hash' = '{}'", sha256(path)),
        );
        assert_eq!(written, marked, "batch records of {}", path.display());
    }
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM pipeline.quarantine WHERE kind = 'malformed'"
        ) as usize,
        expected.malformed
    );
    assert_eq!(
        count(
            &url,
            "SELECT count(*) - count(DISTINCT (kind, file, line)) FROM pipeline.quarantine"
        ),
        0,
        "a record quarantined twice"
    );
}

/// The postmaster of an embedded cluster, from its postmaster.pid.
fn postmaster(cluster: &std::path::Path) -> Option<i32> {
    let text = std::fs::read_to_string(cluster.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    std::path::Path::new(&format!("/proc/{pid}"))
        .exists()
        .then_some(pid)
}

fn kill_and_wait(pid: i32, signal: i32) {
    unsafe { libc::kill(pid, signal) };
    let started = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && started.elapsed() < Duration::from_secs(30)
    {
        // A child of ours would be a zombie until reaped; the postmaster
        // is not ours (pg_ctl daemonises it), so it simply goes.
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigkill_while_the_embedded_postgres_starts_then_a_restart_recovers() {
    let dir = scratch("crash-embedded");
    let input = dir.join("input");
    // The cluster must be reachable by the unprivileged server user.
    let state =
        std::env::temp_dir().join(format!("pipeline-crash-embedded-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let cluster = state.join("postgres");
    generate(
        &input,
        &["--files", "4", "--events-per-file", "250", "--seed", "31"],
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let embedded_run = || {
        let mut args = run_args(&plugins_dir(), &input, "", &state);
        let at = args.iter().position(|a| a == "--database-url").unwrap();
        args.drain(at..at + 2);
        args
    };
    let mut killed_during_start = 0;
    for round in 0..6 {
        // From the second round on, the server left by the last round dies
        // too (SIGKILL): a stale postmaster.pid and shared memory remain.
        if let Some(pid) = postmaster(&cluster) {
            kill_and_wait(pid, libc::SIGKILL);
        }
        let log = dir.join(format!("host-{round}.log"));
        let mut cmd = host();
        cmd.args(embedded_run());
        let mut child = Running::spawn(cmd, &log);
        if round < 2 {
            // Early: during initdb.
            std::thread::sleep(Duration::from_millis(rng.random_range(100..1500)));
        } else {
            // Later: once the cluster exists, while the server starts
            // (from round 3 on, over the stale postmaster.pid).
            child.wait_until("initdb", || {
                std::fs::read_to_string(cluster.join("postgresql.conf"))
                    .is_ok_and(|t| t.contains("Set by the pipeline host"))
            });
            std::thread::sleep(Duration::from_millis(rng.random_range(0..800)));
        }
        let phase = match (cluster.join("PG_VERSION").exists(), postmaster(&cluster)) {
            (false, _) => "during initdb",
            (true, None) => "between initdb and the server's start",
            (true, Some(_)) => "with the server up or starting",
        };
        child.kill();
        // The URL is printed once the server is ready and the database made.
        let ready = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("embedded PostgreSQL:");
        if !ready {
            killed_during_start += 1;
        }
        println!("round {round}: killed {phase}, ready: {ready}");
    }
    assert!(
        killed_during_start > 0,
        "no kill landed during the embedded server's start-up"
    );
    if let Some(pid) = postmaster(&cluster) {
        kill_and_wait(pid, libc::SIGKILL);
    }
    let out = host().args(embedded_run()).arg("--once").output().unwrap();
    assert!(
        out.status.success(),
        "host run --once after the kills: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Read the table through the same cluster, then stop it.
    let server =
        host::embedded::EmbeddedPostgres::start(&cluster, &host::embedded::Tuning::default())
            .unwrap();
    let url = server.url("ecommerce");
    let expected = expected(&input);
    let actual = table(&url);
    let quarantined = count(&url, "SELECT count(*) FROM pipeline.quarantine") as usize;
    drop(server);
    if let Some(pid) = postmaster(&cluster) {
        kill_and_wait(pid, libc::SIGINT);
    }
    let _ = std::fs::remove_dir_all(&state);
    assert_eq!(actual.len(), expected.rows.len(), "rows lost or doubled");
    for (id, row) in &expected.rows {
        assert_eq!(actual.get(id), Some(row), "event {id}");
    }
    assert_eq!(quarantined, expected.malformed);
    println!("{killed_during_start} of 6 kills landed before the embedded server was ready");
}
