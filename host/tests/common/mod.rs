//! The shared integration-test harness: find or start PostgreSQL, create a
//! fresh database per test (so tests run in parallel), make sure the
//! plugins are built, run the real `host` binary, and compute what the
//! table must hold from the generated files, independently of the host.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

pub fn plugins_dir() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = repo().join("plugins");
            let rust = ["transform.wasm", "dedup.wasm", "currency_rust.wasm"];
            if !rust.iter().all(|stage| dir.join(stage).exists()) {
                let status = Command::new("bash")
                    .arg(dir.join("rust/build.sh"))
                    .status()
                    .expect("run plugins/rust/build.sh");
                assert!(status.success(), "building the Rust plugins failed");
            }
            dir
        })
        .clone()
}

/// A scratch folder for one test, removed and recreated.
pub fn scratch(name: &str) -> PathBuf {
    let dir = repo().join("target/test-scratch").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// URL of the `postgres` database of a server tests may use: the one at
/// TEST_DATABASE_URL or 127.0.0.1:5432, else one started for the tests.
pub fn admin_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let candidate = std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        if block_on(tokio_postgres::connect(&candidate, tokio_postgres::NoTls)).is_ok() {
            return candidate;
        }
        // None answers: start a private cluster for this test run.
        let dir = std::env::temp_dir().join(format!("pipeline-test-pg-{}", std::process::id()));
        let tuning = host::embedded::Tuning {
            shared_buffers: "256MB".into(),
            max_wal_size: "2GB".into(),
        };
        let server = host::embedded::EmbeddedPostgres::start(&dir, &tuning)
            .expect("no PostgreSQL answers and none could be started");
        let url = server.url("postgres");
        // Keep it running for the rest of the test process.
        std::mem::forget(server);
        url
    })
    .clone()
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// What the comment of every test database starts with; the pid of the
/// test process that created it follows.
const TEST_DB_COMMENT: &str = "ecommerce-streaming-pipeline test database, pid ";

/// Creates an empty database for one test and returns its URL.
///
/// A test process cannot drop its databases when it ends (the harness has
/// no teardown), so the first call of each process drops those that
/// earlier test processes left: databases with this suite's comment whose
/// process is gone. The server is on loopback, so the pid is this
/// machine's; a database of a test still running is left alone.
pub fn fresh_db(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    static SWEPT: OnceLock<()> = OnceLock::new();
    let db = format!(
        "t_{name}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let admin = admin_url();
    block_on(async {
        let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        if SWEPT.set(()).is_ok() {
            let left = client
                .query(
                    "SELECT d.datname, s.description FROM pg_database d \
                     JOIN pg_shdescription s ON s.objoid = d.oid AND s.classoid = 'pg_database'::regclass \
                     WHERE starts_with(s.description, $1)",
                    &[&TEST_DB_COMMENT],
                )
                .await
                .unwrap();
            for row in left {
                let (old, comment): (String, String) = (row.get(0), row.get(1));
                let Ok(pid) = comment.trim_start_matches(TEST_DB_COMMENT).parse::<u32>() else {
                    continue;
                };
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let quoted = old.replace('"', "\"\"");
                    // Another sweeper may have dropped it first: not an error.
                    let _ = client
                        .batch_execute(&format!(
                            "DROP DATABASE IF EXISTS \"{quoted}\" WITH (FORCE)"
                        ))
                        .await;
                }
            }
        }
        client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db}"))
            .await
            .unwrap();
        client
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
        client
            .batch_execute(&format!(
                "COMMENT ON DATABASE {db} IS '{TEST_DB_COMMENT}{}'",
                std::process::id()
            ))
            .await
            .unwrap();
    });
    let base = admin.rsplit_once('/').unwrap().0;
    format!("{base}/{db}")
}

/// Runs a query and returns all rows as text columns.
pub fn query(url: &str, sql: &str) -> Vec<Vec<Option<String>>> {
    block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let messages = client.simple_query(sql).await.unwrap();
        messages
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                    (0..row.len())
                        .map(|i| row.get(i).map(str::to_owned))
                        .collect(),
                ),
                _ => None,
            })
            .collect()
    })
}

pub fn count(url: &str, sql: &str) -> i64 {
    query(url, sql)[0][0].as_ref().unwrap().parse().unwrap()
}

/// The `host` binary with the test-wide compile cache.
pub fn host() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_host"));
    cmd.env("RUST_LOG", "info,wasmtime=warn,cranelift=warn")
        .env_remove("DATABASE_URL");
    cmd
}

pub fn cache_dir() -> PathBuf {
    repo().join("target/test-cache")
}

/// The common arguments of `host run` in tests.
pub fn run_args(plugins: &Path, input: &Path, url: &str, state: &Path) -> Vec<String> {
    vec![
        "run".into(),
        "--plugins".into(),
        plugins.display().to_string(),
        "--input".into(),
        input.display().to_string(),
        "--database-url".into(),
        url.into(),
        "--state-dir".into(),
        state.display().to_string(),
        "--cache-dir".into(),
        cache_dir().display().to_string(),
        "--metrics-addr".into(),
        "127.0.0.1:0".into(),
    ]
}

pub fn run_once(plugins: &Path, input: &Path, url: &str, state: &Path, extra: &[&str]) -> Output {
    let out = host()
        .args(run_args(plugins, input, url, state))
        .arg("--once")
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "host run --once failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn generate(output: &Path, args: &[&str]) {
    let out = host()
        .args([
            "generate",
            "--output",
            &output.display().to_string(),
            "--interval",
            "0",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One expected row: (user_id, event_type, product_id, price text, event_time text).
pub type Row = (i32, String, i32, String, String);

/// What the input files must produce, computed without the host's code:
/// the valid rows (first occurrence per event id) and the malformed count.
pub struct Expected {
    pub rows: BTreeMap<String, Row>,
    pub malformed: usize,
}

pub fn expected(dir: &Path) -> Expected {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    files.sort();
    let mut rows = BTreeMap::new();
    let mut malformed = 0;
    for file in files {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(true)
            .from_path(&file)
            .unwrap();
        for record in reader.byte_records() {
            let record = record.unwrap();
            match expected_row(&record) {
                Some((id, row)) => {
                    rows.entry(id).or_insert(row);
                }
                None => malformed += 1,
            }
        }
    }
    Expected { rows, malformed }
}

fn expected_row(r: &csv::ByteRecord) -> Option<(String, Row)> {
    if r.len() != 6 {
        return None;
    }
    let f: Vec<&str> = r
        .iter()
        .map(|b| std::str::from_utf8(b).ok())
        .collect::<Option<_>>()?;
    let id = uuid::Uuid::parse_str(f[0].trim()).ok()?.to_string();
    let user: i32 = f[1].trim().parse().ok()?;
    let product: i32 = f[3].trim().parse().ok()?;
    let price = f[4].trim();
    let (whole, cents) = price.split_once('.').unwrap_or((price, "00"));
    if whole.parse::<u64>().is_err() || cents.len() != 2 || cents.parse::<u64>().is_err() {
        return None;
    }
    let time = chrono::DateTime::parse_from_rfc3339(f[5].trim()).ok()?;
    let kind = normalise(f[2]);
    Some((
        id,
        (
            user,
            kind,
            product,
            format!("{}.{cents}", whole.parse::<u64>().unwrap()),
            time.naive_utc().format("%Y-%m-%d %H:%M:%S%.f").to_string(),
        ),
    ))
}

/// The transform's normalisation, restated for the spellings the
/// generator writes.
pub fn normalise(kind: &str) -> String {
    let lower = kind.trim().to_lowercase().replace(['-', ' '], "_");
    match lower.as_str() {
        "addtocart" => "add_to_cart".into(),
        other => other.to_owned(),
    }
}

/// The table's rows in the same shape as `Expected::rows`.
pub fn table(url: &str) -> BTreeMap<String, Row> {
    query(
        url,
        "SELECT event_id, user_id, event_type, product_id, price::text, \
         to_char(event_time, 'YYYY-MM-DD HH24:MI:SS.US') FROM ecommerce_events",
    )
    .into_iter()
    .map(|r| {
        let s = |i: usize| r[i].clone().unwrap();
        // Trim trailing zeros of the fraction the way chrono's %.f prints it.
        let time = s(5);
        let (secs, frac) = time.split_once('.').unwrap();
        let frac = frac.trim_end_matches('0');
        let frac = match frac.len() {
            0 => String::new(),
            1..=3 => format!(".{:0<3}", frac),
            4..=6 => format!(".{:0<6}", frac),
            _ => format!(".{frac}"),
        };
        (
            s(0),
            (
                s(1).parse().unwrap(),
                s(2),
                s(3).parse().unwrap(),
                s(4),
                format!("{secs}{frac}"),
            ),
        )
    })
    .collect()
}

/// The built test-fixture components (built once per test process).
pub fn fixtures_dir() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = repo().join("host/tests/fixtures/plugins");
            let status = Command::new("bash")
                .arg(dir.join("build.sh"))
                .status()
                .expect("run fixtures build.sh");
            assert!(status.success(), "building the fixture components failed");
            dir.join("out")
        })
        .clone()
}

/// A plugins folder for one test: the given components copied in and a
/// manifest written.
pub fn plugins_with(dir: &Path, components: &[(&Path, &str)], manifest: &str) -> PathBuf {
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    for (from, name) in components {
        std::fs::copy(from, plugins.join(name)).unwrap();
    }
    std::fs::write(plugins.join("pipeline.toml"), manifest).unwrap();
    plugins
}

/// Writes a CSV file (header added) by write-then-rename.
pub fn write_csv(dir: &Path, name: &str, rows: &[String]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut text = String::from("event_id,user_id,event_type,product_id,price,event_time\n");
    for r in rows {
        text.push_str(r);
        text.push('\n');
    }
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join(name)).unwrap();
}

/// A valid CSV row with a fresh id.
pub fn row(user: i32, product: i32) -> String {
    format!(
        "{},{user},view,{product},9.99,2026-01-05T00:00:00Z",
        uuid::Uuid::new_v4()
    )
}

/// A TCP port free at the time of the call, for `--metrics-addr`.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on 127.0.0.1:port: (status code, body), or None when
/// nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    // One write: the server reads the request with a single read.
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .ok()?;
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// `run_args` with the metrics on a known port.
pub fn run_args_on(
    plugins: &Path,
    input: &Path,
    url: &str,
    state: &Path,
    port: u16,
) -> Vec<String> {
    let mut args = run_args(plugins, input, url, state);
    let last = args.len() - 1;
    args[last] = format!("127.0.0.1:{port}");
    args
}

/// Peak and current resident memory of a process, in kB (VmHWM, VmRSS).
pub fn memory_kb(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

/// How long a test waits for something the system must do: minutes, not
/// seconds, so that a busy CI machine (two cores, other jobs) makes a test
/// slow, never wrong. A wait that passes it prints what it saw.
pub const PATIENCE: std::time::Duration = std::time::Duration::from_secs(300);

/// Waits until `ready` holds, failing the test after `limit`.
pub fn wait_until(limit: std::time::Duration, what: &str, mut ready: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !ready() {
        assert!(
            started.elapsed() < limit,
            "timed out after {:?} waiting for {what}",
            started.elapsed()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Probes until `done` holds of what `probe` returns, for up to
/// `PATIENCE`; a timeout reports the last value seen. Returns it.
pub fn wait_for<T: std::fmt::Debug>(
    what: &str,
    mut probe: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let started = std::time::Instant::now();
    loop {
        let seen = probe();
        if done(&seen) {
            return seen;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "timed out after {:?} waiting for {what}; last seen: {seen:?}",
            started.elapsed()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Waits up to `PATIENCE` until the table holds at least `n` rows; a
/// timeout reports how many arrived.
pub fn wait_for_rows(url: &str, n: i64) {
    let rows = || {
        let exists = query(url, "SELECT to_regclass('ecommerce_events')::text")[0][0].is_some();
        if exists {
            count(url, "SELECT count(*) FROM ecommerce_events")
        } else {
            0
        }
    };
    let started = std::time::Instant::now();
    loop {
        let got = rows();
        if got >= n {
            return;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "timed out after {:?} waiting for {n} rows: {got} arrived",
            started.elapsed()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A spawned host, killed and reaped when dropped (also when the test
/// panics), so a failed test leaves no process behind. Its stdout and
/// stderr go to a log file (never to a pipe that nobody reads, which would
/// stall a chatty host); `log` reads it and failed waits print its tail.
pub struct Running {
    pub child: Option<std::process::Child>,
    log: Option<PathBuf>,
}

impl Running {
    /// Wraps a child whose output the caller arranged.
    pub fn new(child: std::process::Child) -> Running {
        Running {
            child: Some(child),
            log: None,
        }
    }

    /// Spawns `cmd` with its stdout and stderr appended to `log`.
    pub fn spawn(mut cmd: Command, log: &Path) -> Running {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let child = cmd
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn the host");
        Running {
            child: Some(child),
            log: Some(log.to_owned()),
        }
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Everything the host printed so far (empty without a log file).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last lines the host printed, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Waits up to `PATIENCE` until `ready` holds; a timeout, or the host
    /// exiting meanwhile, fails the test with the host's last log lines.
    pub fn wait_until(&mut self, what: &str, mut ready: impl FnMut() -> bool) {
        let started = std::time::Instant::now();
        while !ready() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                if ready() {
                    return;
                }
                panic!(
                    "host exited ({status}) while waiting for {what}; its last lines:\n{}",
                    self.log_tail()
                );
            }
            assert!(
                started.elapsed() < PATIENCE,
                "timed out after {:?} waiting for {what}; the host's last lines:\n{}",
                started.elapsed(),
                self.log_tail()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// How many times the host has logged `needle` so far.
    pub fn logged(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// Waits until the host has logged `needle` at least `times` times:
    /// how a test knows that a swap or a rejection has happened instead
    /// of sleeping and hoping.
    pub fn wait_for_log(&mut self, needle: &str, times: usize) {
        let what = format!("{times} log line(s) with {needle:?}");
        let log = self.log.clone().expect("a host spawned with a log file");
        self.wait_until(&what, || {
            std::fs::read(&log)
                .map(|b| String::from_utf8_lossy(&b).matches(needle).count() >= times)
                .unwrap_or(false)
        });
    }

    /// SIGTERM, then waits: whether it exited cleanly.
    pub fn terminate(mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// SIGTERM, waits, asserts a clean exit, and returns the host's log.
    pub fn stop(mut self) -> String {
        let mut child = self.child.take().expect("host already stopped");
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().expect("wait for the host");
        let log = self.log();
        assert!(
            status.success(),
            "host did not exit cleanly on SIGTERM ({status}):\n{log}"
        );
        log
    }

    /// SIGKILL, then waits.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .map(|c| c.try_wait().ok().flatten().is_some())
            .unwrap_or(true)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
