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

/// Creates an empty database for one test and returns its URL.
pub fn fresh_db(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
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
        client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db}"))
            .await
            .unwrap();
        client
            .batch_execute(&format!("CREATE DATABASE {db}"))
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
