//! A sick database through the real host: a shutdown while it is down,
//! a connection that dies in the middle of a COPY (cut, or silently
//! frozen as a half-open connection is), and a host that loses its
//! session while another one takes over. Connections go through a TCP
//! proxy written here, which can cut or freeze them.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use host::embedded::{EmbeddedPostgres, Tuning};

/// What the proxy does with a connection.
const FORWARD: u8 = 0;
/// Reads and drops what either side sends: the peers see a connection
/// that takes their data and never answers (a NAT that forgot the flow).
const FROZEN: u8 = 1;

struct Link {
    client: TcpStream,
    server: TcpStream,
    state: Arc<AtomicU8>,
}

/// A TCP proxy to a PostgreSQL server.
struct Proxy {
    port: u16,
    /// Refuse new connections (accepted, then closed at once).
    refuse: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<Link>>>,
    /// Bytes sent client -> server over all connections.
    upstream: Arc<AtomicU64>,
    /// When set, the connection that carries the byte past this total is
    /// frozen (once): to freeze one in the middle of a COPY.
    freeze_at: Arc<AtomicU64>,
}

impl Proxy {
    fn start(to: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = Proxy {
            port,
            refuse: Arc::new(AtomicBool::new(false)),
            links: Arc::new(Mutex::new(Vec::new())),
            upstream: Arc::new(AtomicU64::new(0)),
            freeze_at: Arc::new(AtomicU64::new(u64::MAX)),
        };
        let (refuse, links, upstream, freeze_at) = (
            proxy.refuse.clone(),
            proxy.links.clone(),
            proxy.upstream.clone(),
            proxy.freeze_at.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if refuse.load(Ordering::Relaxed) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                let state = Arc::new(AtomicU8::new(FORWARD));
                let pipe =
                    |from: &TcpStream,
                     to: &TcpStream,
                     count: Option<(Arc<AtomicU64>, Arc<AtomicU64>)>| {
                        let (mut from, mut to) =
                            (from.try_clone().unwrap(), to.try_clone().unwrap());
                        let state = state.clone();
                        std::thread::spawn(move || {
                            let mut buf = [0u8; 16 * 1024];
                            loop {
                                let n = match from.read(&mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => n,
                                };
                                if let Some((total, at)) = &count {
                                    let before = total.fetch_add(n as u64, Ordering::Relaxed);
                                    let limit = at.load(Ordering::Relaxed);
                                    if before < limit && before + n as u64 >= limit {
                                        at.store(u64::MAX, Ordering::Relaxed);
                                        state.store(FROZEN, Ordering::Relaxed);
                                    }
                                }
                                if state.load(Ordering::Relaxed) == FROZEN {
                                    continue;
                                }
                                if to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                            let _ = to.shutdown(Shutdown::Write);
                        });
                    };
                pipe(
                    &client,
                    &server,
                    Some((upstream.clone(), freeze_at.clone())),
                );
                pipe(&server, &client, None);
                links.lock().unwrap().push(Link {
                    client,
                    server,
                    state,
                });
            }
        });
        proxy
    }

    /// Closes every connection at once, both ways.
    fn cut(&self) {
        for link in self.links.lock().unwrap().drain(..) {
            let _ = link.client.shutdown(Shutdown::Both);
            let _ = link.server.shutdown(Shutdown::Both);
        }
    }

    fn frozen(&self) -> usize {
        self.links
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.state.load(Ordering::Relaxed) == FROZEN)
            .count()
    }
}

/// The URL of `database` on the shared test server, through `proxy`.
fn through(proxy: &Proxy, url: &str) -> String {
    let (base, db) = url.rsplit_once('/').unwrap();
    let (scheme_user, _hostport) = base.rsplit_once('@').unwrap();
    format!("{scheme_user}@127.0.0.1:{}/{db}", proxy.port)
}

fn server_port(url: &str) -> u16 {
    let (base, _) = url.rsplit_once('/').unwrap();
    base.rsplit_once(':').unwrap().1.parse().unwrap()
}

fn spawn_host(args: Vec<String>, extra: &[&str], log: &Path) -> Running {
    Running::new(
        host()
            .args(args)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

fn rows(url: &str) -> i64 {
    if query(url, "SELECT to_regclass('ecommerce_events')::text")[0][0].is_some() {
        count(url, "SELECT count(*) FROM ecommerce_events")
    } else {
        0
    }
}

fn assert_table_exact(url: &str, input: &Path) {
    let expected = expected(input);
    let actual = table(url);
    assert_eq!(actual.len(), expected.rows.len(), "rows lost or doubled");
    for (id, row) in &expected.rows {
        assert_eq!(actual.get(id), Some(row), "event {id}");
    }
}

/// Waits for `child` to exit; its exit status, or None past `limit`.
fn wait_exit(host: &mut Running, limit: Duration) -> Option<std::process::ExitStatus> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Some(status) = host.child.as_mut().unwrap().try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn sigterm_while_the_database_is_down_exits_within_the_timeout_and_a_restart_commits_everything() {
    let dir = scratch("db_faults_sigterm");
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    let pg_dir = std::env::temp_dir().join(format!("pipeline-sigterm-{}", std::process::id()));
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
    let args = run_args(&plugins_dir(), &input, &url, &dir.join("state"));
    let log = dir.join("host.log");
    let mut running = spawn_host(args.clone(), &["--shutdown-timeout", "3s"], &log);

    generate(
        &input,
        &["--files", "2", "--events-per-file", "100", "--seed", "1"],
    );
    wait_until(
        Duration::from_secs(180),
        "the first files committed",
        || rows(&url) > 0,
    );
    server.stop();
    generate(
        &input,
        &["--files", "2", "--events-per-file", "100", "--seed", "2"],
    );
    // The host has read the new files and cannot commit them.
    wait_until(Duration::from_secs(180), "a failed commit", || {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("cannot commit batch")
    });
    unsafe { libc::kill(running.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut running, Duration::from_secs(120));
    let text = std::fs::read_to_string(&log).unwrap();
    let status = status.unwrap_or_else(|| panic!("the host did not exit after SIGTERM:\n{text}"));
    assert!(
        !status.success(),
        "exit non-zero when it could not commit: {text}"
    );
    assert!(text.contains("not committed within 3s"), "{text}");
    assert!(
        text.contains("records read"),
        "says how much was left: {text}"
    );
    drop(running);

    server.start_again().expect("start the server again");
    let once = host().args(&args).arg("--once").output().unwrap();
    assert!(
        once.status.success(),
        "{}",
        String::from_utf8_lossy(&once.stderr)
    );
    assert_table_exact(&url, &input);
    drop(server);
    let _ = std::fs::remove_dir_all(&pg_dir);
}

#[test]
fn a_connection_frozen_or_cut_mid_copy_is_given_up_and_nothing_is_lost_or_doubled() {
    let dir = scratch("db_faults_proxy");
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    let url = fresh_db("db_faults_proxy");
    let proxy = Proxy::start(server_port(&url));
    let via = through(&proxy, &url);
    let port = free_port();
    let log = dir.join("host.log");
    let host = spawn_host(
        run_args_on(&plugins_dir(), &input, &via, &dir.join("state"), port),
        &["--batch-size", "5000"],
        &log,
    );
    // Freeze the connection once some 2 MB more have gone up: inside the
    // COPY of one of the batches (each is ~300 kB of COPY data).
    generate(
        &input,
        &["--files", "20", "--events-per-file", "2000", "--seed", "3"],
    );
    wait_until(Duration::from_secs(180), "the first rows", || {
        rows(&url) > 0
    });
    proxy.freeze_at.store(
        proxy.upstream.load(Ordering::Relaxed) + 2_000_000,
        Ordering::Relaxed,
    );
    generate(
        &input,
        &["--files", "20", "--events-per-file", "2000", "--seed", "4"],
    );
    wait_until(Duration::from_secs(180), "a frozen connection", || {
        proxy.frozen() > 0
    });
    // Without a commit timeout the host would wait on it for as long as
    // the kernel keeps the connection (15 min and more).
    wait_until(Duration::from_secs(180), "the commit given up", || {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("did not finish within")
    });
    // Then a cut, in the middle of what follows.
    generate(
        &input,
        &["--files", "10", "--events-per-file", "2000", "--seed", "5"],
    );
    std::thread::sleep(Duration::from_millis(300));
    proxy.cut();
    let expected = expected(&input);
    wait_until(Duration::from_secs(180), "every row", || {
        rows(&url) as usize >= expected.rows.len()
    });
    wait_until(Duration::from_secs(60), "/healthz ok again", || {
        matches!(http_get(port, "/healthz"), Some((200, _)))
    });
    assert!(host.terminate(), "clean exit");
    assert_table_exact(&url, &input);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("db error"), "{text}");
}

#[test]
fn a_host_that_lost_its_session_to_another_cannot_commit_and_positions_never_go_back() {
    let dir = scratch("db_faults_fence");
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    let url = fresh_db("db_faults_fence");
    let proxy = Proxy::start(server_port(&url));
    let log_a = dir.join("a.log");
    let mut a = spawn_host(
        run_args(
            &plugins_dir(),
            &input,
            &through(&proxy, &url),
            &dir.join("state-a"),
        ),
        &[],
        &log_a,
    );
    generate(
        &input,
        &["--files", "2", "--events-per-file", "100", "--seed", "6"],
    );
    let first = expected(&input).rows.len() as i64;
    wait_until(Duration::from_secs(180), "A's first commit", || {
        rows(&url) == first
    });

    // A loses its session and cannot reconnect; it reads more meanwhile.
    proxy.refuse.store(true, Ordering::Relaxed);
    proxy.cut();
    generate(
        &input,
        &["--files", "2", "--events-per-file", "100", "--seed", "7"],
    );
    wait_until(Duration::from_secs(180), "A failing to commit", || {
        std::fs::read_to_string(&log_a)
            .unwrap()
            .contains("cannot commit batch")
    });

    // B takes over, commits what A holds, and stops.
    let out = host()
        .args(run_args(&plugins_dir(), &input, &url, &dir.join("state-b")))
        .arg("--once")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let positions = "SELECT file_key, byte_offset, reads FROM pipeline.positions ORDER BY 1";
    let after_b = query(&url, positions);
    let batches_after_b = count(&url, "SELECT count(*) FROM pipeline.batches");

    // A comes back: it must not commit what it read before B ran.
    proxy.refuse.store(false, Ordering::Relaxed);
    let status = wait_exit(&mut a, Duration::from_secs(180));
    let text = std::fs::read_to_string(&log_a).unwrap();
    let status = status.unwrap_or_else(|| panic!("A did not stop:\n{text}"));
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("another host took this database over"),
        "{text}"
    );
    assert_eq!(query(&url, positions), after_b, "positions moved");
    assert_eq!(
        count(&url, "SELECT count(*) FROM pipeline.batches"),
        batches_after_b
    );
    assert_table_exact(&url, &input);
}
