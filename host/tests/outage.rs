//! A database outage mid-stream: the host writes to a private PostgreSQL
//! (not the shared test server) that is stopped for several seconds while
//! input keeps arriving, then started again. Nothing may be lost or
//! doubled, `/healthz` must say the database is down meanwhile, and the
//! host's memory must stay bounded: input waits on disk, not in the host.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use host::embedded::{EmbeddedPostgres, Tuning};

/// Writes a file of `rows` fresh events every `every` until `stop`.
fn feed(input: &Path, rows: usize, every: Duration, stop: Arc<AtomicBool>) -> usize {
    let mut files = 0;
    while !stop.load(Ordering::Relaxed) {
        let batch: Vec<String> = (0..rows).map(|i| row(i as i32 + 1, 1)).collect();
        write_csv(input, &format!("f{files:05}.csv"), &batch);
        files += 1;
        std::thread::sleep(every);
    }
    files
}

#[test]
fn a_database_outage_mid_stream_loses_nothing_and_memory_stays_bounded() {
    let dir = scratch("outage");
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    // The cluster lives where the unprivileged server user can reach it.
    let pg_dir = std::env::temp_dir().join(format!("pipeline-outage-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pg_dir);
    let tuning = Tuning {
        shared_buffers: "128MB".into(),
        max_wal_size: "1GB".into(),
    };
    let mut server = EmbeddedPostgres::start(&pg_dir, &tuning).expect("start a private PostgreSQL");
    block_on(host::embedded::ensure_database(
        &server.url("postgres"),
        "ecommerce",
    ))
    .unwrap();
    let url = server.url("ecommerce");

    let port = free_port();
    let log = dir.join("host.log");
    let host = Running::new(
        host()
            .args(run_args_on(
                &plugins_dir(),
                &input,
                &url,
                &dir.join("state"),
                port,
            ))
            .args(["--batch-size", "200"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let pid = host.id();

    let stop_feeding = Arc::new(AtomicBool::new(false));
    let feeder = {
        let input = input.clone();
        let stop = stop_feeding.clone();
        std::thread::spawn(move || feed(&input, 100, Duration::from_millis(100), stop))
    };
    let rows = |url: &str| {
        if query(url, "SELECT to_regclass('ecommerce_events')::text")[0][0].is_some() {
            count(url, "SELECT count(*) FROM ecommerce_events")
        } else {
            0
        }
    };
    wait_until(PATIENCE, "rows before the outage", || rows(&url) >= 1000);
    assert_eq!(http_get(port, "/healthz").map(|r| r.0), Some(200));
    let (_, rss_before) = memory_kb(pid).unwrap();

    // The outage: stop the server (fast shutdown) for six seconds while
    // files keep arriving.
    let outage = Duration::from_secs(6);
    server.stop();
    let down_at = Instant::now();
    let mut unhealthy_after = None;
    let mut peak_rss = 0;
    while down_at.elapsed() < outage {
        if let Some((status, body)) = http_get(port, "/healthz") {
            if status == 503 && body.contains("database") && unhealthy_after.is_none() {
                unhealthy_after = Some(down_at.elapsed());
            }
        }
        if let Some((_, rss)) = memory_kb(pid) {
            peak_rss = peak_rss.max(rss);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    server.start_again().expect("start the server again");
    let up_at = Instant::now();
    wait_until(PATIENCE, "healthy again", || {
        matches!(http_get(port, "/healthz"), Some((200, _)))
    });
    let healthy_after = up_at.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    stop_feeding.store(true, Ordering::Relaxed);
    let files = feeder.join().unwrap();

    let expected = expected(&input);
    wait_until(PATIENCE, "every row", || {
        rows(&url) as usize >= expected.rows.len()
    });
    std::thread::sleep(Duration::from_millis(500));
    let actual = table(&url);
    assert_eq!(actual.len(), expected.rows.len(), "rows lost or doubled");
    for (id, row) in &expected.rows {
        assert_eq!(actual.get(id), Some(row), "event {id}");
    }
    assert_eq!(count(&url, "SELECT count(*) FROM pipeline.quarantine"), 0);
    assert!(host.terminate(), "clean exit after the outage");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("cannot commit batch"), "{text}");
    drop(server);
    let _ = std::fs::remove_dir_all(&pg_dir);

    let unhealthy_after = unhealthy_after.expect("/healthz said 503 during the outage");
    let peak_mb = peak_rss / 1024;
    println!(
        "outage {outage:?}: /healthz 503 after {unhealthy_after:?}, healthy {healthy_after:?} after restart; \
         RSS {} MB before, peak {peak_mb} MB during; {files} files, {} rows",
        rss_before / 1024,
        expected.rows.len()
    );
    assert!(peak_mb < 200, "RSS {peak_mb} MB during the outage");
}
