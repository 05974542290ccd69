//! Hot swap while the pipeline runs: no row lost or doubled, every batch
//! processed wholly by one version, the batch records agreeing with the
//! rows, and stage state handed over.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn start(plugins: &Path, input: &Path, url: &str, state: &Path) -> Child {
    host()
        .args(run_args(plugins, input, url, state))
        .args(["--batch-size", "50", "--snapshot-interval", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn stop(child: Child) -> String {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "host did not exit cleanly on SIGTERM:\n{stderr}"
    );
    stderr
}

fn install(from: &Path, plugins: &Path, name: &str) {
    let tmp = plugins.join(format!(".{name}.tmp"));
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(tmp, plugins.join(name)).unwrap();
}

fn wait_for_rows(url: &str, n: i64) {
    let started = Instant::now();
    let ready = || query(url, "SELECT to_regclass('ecommerce_events')::text")[0][0].is_some();
    while !ready() || count(url, "SELECT count(*) FROM ecommerce_events") < n {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "rows did not arrive"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes a file of ten fresh events and waits until the table holds `total`.
fn feed_ten(input: &Path, url: &str, name: &str, total: i64) {
    write_csv(input, name, &(0..10).map(|_| row(1, 1)).collect::<Vec<_>>());
    wait_for_rows(url, total);
}

fn sha256(path: &Path) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn swapping_versions_mid_stream_marks_every_row_by_exactly_one_version() {
    let dir = scratch("swap");
    let (v1, v2) = (
        fixtures_dir().join("marker_v1.wasm"),
        fixtures_dir().join("marker_v2.wasm"),
    );
    let plugins = plugins_with(
        &dir,
        &[(&v1, "marker.wasm")],
        "[[stage]]\nname = \"marker\"\ncomponent = \"marker.wasm\"\n",
    );
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    let url = fresh_db("swap");
    let child = start(&plugins, &input, &url, &dir.join("state"));

    let rounds = 6;
    for round in 0..rounds {
        let rows: Vec<String> = (0..200).map(|_| row(1, 1)).collect();
        write_csv(&input, &format!("f{round}.csv"), &rows);
        wait_for_rows(&url, 200 * (round + 1) as i64 / 2);
        install(
            if round % 2 == 0 { &v2 } else { &v1 },
            &plugins,
            "marker.wasm",
        );
        std::thread::sleep(Duration::from_millis(700));
    }
    write_csv(
        &input,
        "last.csv",
        &(0..200).map(|_| row(1, 1)).collect::<Vec<_>>(),
    );
    wait_for_rows(&url, 200 * (rounds + 1) as i64);
    let log = stop(child);

    let total = 200 * (rounds + 1) as i64;
    assert_eq!(count(&url, "SELECT count(*) FROM ecommerce_events"), total);
    let v1_rows = count(
        &url,
        "SELECT count(*) FROM ecommerce_events WHERE event_type = 'view_v1'",
    );
    let v2_rows = count(
        &url,
        "SELECT count(*) FROM ecommerce_events WHERE event_type = 'view_v2'",
    );
    assert_eq!(
        v1_rows + v2_rows,
        total,
        "every row marked by exactly one version"
    );
    assert!(
        v1_rows > 0 && v2_rows > 0,
        "both versions ran: v1 {v1_rows}, v2 {v2_rows}\n{log}"
    );
    for (path, rows) in [(&v1, v1_rows), (&v2, v2_rows)] {
        let hash = sha256(path);
        let written = count(
            &url,
            &format!("SELECT coalesce(sum(rows_written), 0) FROM pipeline.batches WHERE stages->0->>'hash' = '{hash}'"),
        );
        assert_eq!(
            written,
            rows,
            "batch records agree with the marks for {}",
            path.display()
        );
    }
    assert!(log.contains("stage version swapped in"), "{log}");
}

#[test]
fn dedup_state_survives_a_swap() {
    let dir = scratch("dedup-swap");
    let dedup = plugins_dir().join("dedup.wasm");
    let manifest = |window: u32| {
        format!("[[stage]]\nname = \"dedup\"\ncomponent = \"dedup.wasm\"\n[stage.config]\nwindow-events = \"{window}\"\n")
    };
    let plugins = plugins_with(&dir, &[(&dedup, "dedup.wasm")], &manifest(100_000));
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    let url = fresh_db("dedup_swap");
    let child = start(&plugins, &input, &url, &dir.join("state"));

    let first: Vec<String> = (0..20).map(|_| row(1, 1)).collect();
    write_csv(&input, "a.csv", &first);
    wait_for_rows(&url, 20);
    // A config change makes a new instance, which must get the old state.
    std::fs::write(plugins.join("pipeline.toml"), manifest(99_999)).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let mut second: Vec<String> = (0..10).map(|_| row(1, 1)).collect();
    second.push(first[5].clone());
    write_csv(&input, "b.csv", &second);
    wait_for_rows(&url, 30);
    std::thread::sleep(Duration::from_millis(300));
    let log = stop(child);

    assert_eq!(count(&url, "SELECT count(*) FROM ecommerce_events"), 30);
    assert_eq!(
        count(
            &url,
            "SELECT coalesce(sum(rows_dropped), 0) FROM pipeline.batches"
        ),
        1,
        "dedup dropped the repeat\n{log}"
    );
    assert_eq!(
        count(
            &url,
            "SELECT coalesce(sum(rows_conflicting), 0) FROM pipeline.batches"
        ),
        0,
        "not left to the primary key"
    );
    assert!(log.contains("stage version swapped in"), "{log}");
}

#[test]
fn a_broken_component_is_rejected_and_the_old_version_keeps_running() {
    let dir = scratch("reject");
    let v1 = fixtures_dir().join("marker_v1.wasm");
    let plugins = plugins_with(
        &dir,
        &[(&v1, "marker.wasm")],
        "[[stage]]\nname = \"marker\"\ncomponent = \"marker.wasm\"\n",
    );
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    let url = fresh_db("reject");
    let child = start(&plugins, &input, &url, &dir.join("state"));

    feed_ten(&input, &url, "a.csv", 10);
    // Garbage, then a component of the wrong world, then one that fails every batch.
    let garbage = dir.join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm not really").unwrap();
    let faulty_plugins = [garbage, fixtures_dir().join("wrong_world.wasm")];
    for (i, bad) in faulty_plugins.iter().enumerate() {
        install(bad, &plugins, "marker.wasm");
        std::thread::sleep(Duration::from_millis(800));
        feed_ten(&input, &url, &format!("b{i}.csv"), 20 + 10 * i as i64);
    }
    // A component that fails its first batch is rolled back.
    std::fs::copy(
        fixtures_dir().join("faulty.wasm"),
        plugins.join("faulty.wasm"),
    )
    .unwrap();
    std::fs::write(
        plugins.join("pipeline.toml"),
        "[[stage]]\nname = \"marker\"\ncomponent = \"faulty.wasm\"\n[stage.config]\nmode = \"fail\"\n",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    feed_ten(&input, &url, "c.csv", 40);
    // Fixing the file is picked up.
    install(
        &fixtures_dir().join("marker_v2.wasm"),
        &plugins,
        "marker.wasm",
    );
    std::fs::write(
        plugins.join("pipeline.toml"),
        "[[stage]]\nname = \"marker\"\ncomponent = \"marker.wasm\"\n",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    feed_ten(&input, &url, "d.csv", 50);
    let log = stop(child);

    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM ecommerce_events WHERE event_type = 'view_v1'"
        ),
        40,
        "{log}"
    );
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM ecommerce_events WHERE event_type = 'view_v2'"
        ),
        10,
        "{log}"
    );
    assert_eq!(count(&url, "SELECT count(*) FROM pipeline.quarantine"), 0);
    assert!(log.contains("not a valid WebAssembly component"), "{log}");
    assert!(
        log.contains("does not export the `stage` interface"),
        "{log}"
    );
    assert!(log.contains("failed its first batch"), "{log}");
}
