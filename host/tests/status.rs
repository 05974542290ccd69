//! `/api/status` of a running host shows what happened: a version swapped
//! in, a version rejected with its reason, a malformed row quarantined
//! with a sample, a pause and its reason, a database outage and its error;
//! and its totals agree with the database.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use host::status::Document;

/// The host's status document, when it answers.
fn status(port: u16) -> Option<Document> {
    let (code, body) = http_get(port, "/api/status")?;
    if code != 200 {
        return None;
    }
    Some(serde_json::from_str(&body).expect("a status document"))
}

/// Waits until the status satisfies `ready`; a failed wait prints the
/// last document seen.
fn wait_status(port: u16, what: &str, mut ready: impl FnMut(&Document) -> bool) -> Document {
    let started = std::time::Instant::now();
    let mut last = None;
    loop {
        if let Some(doc) = status(port) {
            if ready(&doc) {
                return doc;
            }
            last = Some(doc);
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "timed out waiting for {what}; last status: {}",
            last.map(|d| serde_json::to_string_pretty(&d).unwrap())
                .unwrap_or_else(|| "none".into())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn spawn(plugins: &Path, input: &Path, url: &str, state: &Path, port: u16, log: &Path) -> Running {
    Running::new(
        host()
            .args(run_args_on(plugins, input, url, state, port))
            .args(["--batch-size", "20", "--snapshot-interval", "0"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

fn install(from: &Path, plugins: &Path, name: &str) {
    let tmp = plugins.join(format!(".{name}.tmp"));
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(tmp, plugins.join(name)).unwrap();
}

fn sha256(path: &Path) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn rows_in_table(url: &str) -> i64 {
    if query(url, "SELECT to_regclass('ecommerce_events')::text")[0][0].is_some() {
        count(url, "SELECT count(*) FROM ecommerce_events")
    } else {
        0
    }
}

#[test]
fn status_shows_a_swap_a_rejected_version_and_quarantined_rows() {
    let dir = scratch("status-swap");
    let v1 = fixtures_dir().join("marker_v1.wasm");
    let v2 = fixtures_dir().join("marker_v2.wasm");
    let plugins = plugins_with(
        &dir,
        &[(&v1, "marker.wasm")],
        "[[stage]]\nname = \"marker\"\ncomponent = \"marker.wasm\"\n",
    );
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    let url = fresh_db("status_swap");
    let port = free_port();
    let log = dir.join("host.log");
    let host = spawn(&plugins, &input, &url, &dir.join("state"), port, &log);

    // Ten rows and one malformed one.
    let mut rows: Vec<String> = (0..10).map(|_| row(1, 1)).collect();
    rows.insert(4, "not-a-uuid,1,view,1,9.99,2026-01-05T00:00:00Z".into());
    write_csv(&input, "a.csv", &rows);
    let doc = wait_status(port, "the first file", |d| d.totals.rows_written.0 == 10);
    assert_eq!(doc.stages.len(), 1);
    assert_eq!(doc.stages[0].name, "marker");
    assert_eq!(doc.stages[0].hash, sha256(&v1));
    assert_eq!(doc.stages[0].events_in.0, 10);
    assert_eq!(doc.totals.malformed.0, 1);
    let group = &doc.quarantine.by_reason[0];
    assert_eq!(group.kind, "malformed");
    assert_eq!(group.count.0, 1);
    assert_eq!(group.samples[0].line.map(|l| l.0), Some(6), "{group:?}");
    assert!(
        group.samples[0]
            .raw
            .as_deref()
            .is_some_and(|r| r.starts_with("not-a-uuid")),
        "{group:?}"
    );
    assert!(doc
        .events
        .iter()
        .any(|e| e.kind == "loaded" && e.stage == "marker"));

    // A file that is no component: rejected, with the reason, and the old
    // version goes on. The event is committed with the next batch.
    let garbage = dir.join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm not really").unwrap();
    install(&garbage, &plugins, "marker.wasm");
    wait_until(Duration::from_secs(60), "the rejection in the log", || {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("not a valid WebAssembly component")
    });
    write_csv(
        &input,
        "b.csv",
        &(0..10).map(|_| row(1, 1)).collect::<Vec<_>>(),
    );
    let doc = wait_status(port, "the rejected version", |d| {
        d.totals.rows_written.0 == 20 && d.events.iter().any(|e| e.kind == "rejected")
    });
    let rejected = doc.events.iter().find(|e| e.kind == "rejected").unwrap();
    assert_eq!(rejected.stage, "marker");
    assert!(
        rejected
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("not a valid WebAssembly component")),
        "{rejected:?}"
    );
    assert_eq!(doc.stages[0].hash, sha256(&v1), "the old version runs on");

    // A new version swapped in. The stage thread applies it at the next
    // batch boundary once the watcher has loaded it: files of ten rows
    // until a batch has run on it.
    install(&v2, &plugins, "marker.wasm");
    let v2_hash = sha256(&v2);
    let mut written = 20;
    let mut doc = doc;
    for i in 0.. {
        assert!(
            i < 60,
            "no batch ran on the new version; last status: {doc:?}"
        );
        write_csv(
            &input,
            &format!("c{i}.csv"),
            &(0..10).map(|_| row(1, 1)).collect::<Vec<_>>(),
        );
        written += 10;
        doc = wait_status(port, "the next file", |d| {
            d.totals.rows_written.0 == written
        });
        if doc.stages[0].hash == v2_hash {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let swapped = doc
        .events
        .iter()
        .find(|e| e.kind == "swapped_in")
        .expect("a swapped_in event");
    assert_eq!(swapped.hash.as_deref(), Some(v2_hash.as_str()));
    assert_eq!(doc.stages[0].events_in.0, written);
    assert_eq!(doc.totals.rows_written.0 as i64, rows_in_table(&url));
    assert_eq!(
        doc.totals.batches.0 as i64,
        count(&url, "SELECT count(*) FROM pipeline.batches")
    );
    assert!(doc.health.ok && doc.database.healthy && !doc.pause.paused);
    assert!(host.terminate(), "clean exit on SIGTERM");
}

#[test]
fn status_shows_a_pause_with_its_reason_and_the_resume() {
    let dir = scratch("status-pause");
    let manifest = "[[stage]]\nname = \"faulty\"\ncomponent = \"stage.wasm\"\n[stage.config]\nmode = \"trap\"\n";
    let plugins = plugins_with(
        &dir,
        &[(&fixtures_dir().join("faulty.wasm"), "stage.wasm")],
        manifest,
    );
    let input = dir.join("input");
    // Product 13 makes the faulty stage trap on every event.
    write_csv(
        &input,
        "a.csv",
        &(0..200).map(|_| row(1, 13)).collect::<Vec<_>>(),
    );
    let url = fresh_db("status_pause");
    let port = free_port();
    let host = spawn(
        &plugins,
        &input,
        &url,
        &dir.join("state"),
        port,
        &dir.join("host.log"),
    );
    // The pause is decided before its third batch is committed: wait for both.
    let doc = wait_status(port, "the pause", |d| {
        d.pause.paused && d.totals.failed.0 == 60
    });
    assert_eq!(doc.pause.stages.len(), 1);
    let pause = &doc.pause.stages[0];
    assert_eq!(pause.stage, "faulty");
    assert!(
        pause.reason.contains("paused the input") && pause.reason.contains("trapped"),
        "{pause:?}"
    );
    assert!(!doc.health.ok);
    assert!(doc
        .health
        .problems
        .iter()
        .any(|p| p.contains("stage faulty")));
    // Three batches of 20 failed before the pause: quarantined as failed,
    // one reason, with samples.
    assert_eq!(doc.totals.failed.0, 60);
    let failed = doc
        .quarantine
        .by_reason
        .iter()
        .find(|g| g.kind == "failed")
        .expect("a failed group");
    assert_eq!(failed.stage.as_deref(), Some("faulty"));
    assert_eq!(failed.count.0, 60);
    assert!(!failed.samples.is_empty() && failed.samples[0].event_id.is_some());
    assert_eq!(doc.stages[0].failed.0, 60);

    install(
        &fixtures_dir().join("marker_v1.wasm"),
        &plugins,
        "stage.wasm",
    );
    let doc = wait_status(port, "the resume", |d| {
        !d.pause.paused && d.totals.rows_written.0 == 140
    });
    assert!(doc.health.ok, "{:?}", doc.health);
    assert!(doc.events.iter().any(|e| e.kind == "swapped_in"));
    assert_eq!(rows_in_table(&url), 140);
    assert!(host.terminate(), "clean exit on SIGTERM");
}

#[test]
fn status_shows_a_database_outage_and_its_last_error() {
    use host::embedded::{EmbeddedPostgres, Tuning};
    let dir = scratch("status-outage");
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    let pg_dir = std::env::temp_dir().join(format!("status-outage-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pg_dir);
    let mut server =
        EmbeddedPostgres::start(&pg_dir, &Tuning::default()).expect("start a private PostgreSQL");
    block_on(host::embedded::ensure_database(
        &server.url("postgres"),
        "ecommerce",
    ))
    .unwrap();
    let url = server.url("ecommerce");
    let port = free_port();
    let host = spawn(
        &plugins_dir(),
        &input,
        &url,
        &dir.join("state"),
        port,
        &dir.join("host.log"),
    );
    write_csv(
        &input,
        "a.csv",
        &(0..20).map(|i| row(i + 1, 1)).collect::<Vec<_>>(),
    );
    let doc = wait_status(port, "the first rows", |d| d.totals.rows_written.0 == 20);
    assert!(doc.database.healthy && doc.database.last_error.is_none());

    server.stop();
    write_csv(
        &input,
        "b.csv",
        &(0..20).map(|i| row(i + 1, 1)).collect::<Vec<_>>(),
    );
    // Down, and b.csv seen in the input but not committed (the lag is
    // measured once a second).
    let doc = wait_status(port, "the outage", |d| {
        !d.database.healthy && d.lag.files >= 1
    });
    assert!(!doc.health.ok);
    assert!(doc.database.errors.0 >= 1);
    let error = doc.database.last_error.clone().expect("the last error");
    assert!(error.message.contains("cannot commit batch"), "{error:?}");
    // The batch is held, not counted: nothing of b.csv is written yet.
    assert_eq!(doc.totals.rows_written.0, 20);

    server.start_again().expect("start the server again");
    let doc = wait_status(port, "the recovery", |d| {
        d.database.healthy && d.totals.rows_written.0 == 40 && d.lag.files == 0
    });
    assert!(doc.health.ok);
    assert!(
        doc.database.last_error.is_some(),
        "the last error is kept after recovery"
    );
    assert_eq!(rows_in_table(&url), 40);
    assert!(host.terminate(), "clean exit after the outage");
    drop(server);
    let _ = std::fs::remove_dir_all(&pg_dir);
}
