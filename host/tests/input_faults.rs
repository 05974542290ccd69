//! Bad and awkward input through the real host, one test per fault of the
//! README's "Input" table: files truncated, replaced or deleted while
//! being read, empty and header-only files, BOM, CRLF, quoted fields, an
//! overlong line, binary garbage, a file of millions of rows (memory must
//! stay bounded) and a file the host may not read. Each test checks the
//! outcome the README documents.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

const HEADER: &str = "event_id,user_id,event_type,product_id,price,event_time";

/// A running host on its own database and input folder.
struct Rig {
    dir: PathBuf,
    input: PathBuf,
    url: String,
    log: PathBuf,
    host: Running,
}

/// Which stages a rig runs: the shipped transform and dedup, or dedup
/// alone (so a field reaches the table exactly as parsed).
enum Stages {
    Shipped,
    DedupOnly,
}

fn plugins_for(dir: &Path, stages: Stages) -> PathBuf {
    match stages {
        Stages::Shipped => plugins_dir(),
        Stages::DedupOnly => plugins_with(
            dir,
            &[(&plugins_dir().join("dedup.wasm"), "dedup.wasm")],
            "[[stage]]\nname = \"dedup\"\ncomponent = \"dedup.wasm\"\n",
        ),
    }
}

fn start(name: &str, stages: Stages, prepare: impl FnOnce(&Path)) -> Rig {
    let dir = scratch(name);
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    prepare(&input);
    let plugins = plugins_for(&dir, stages);
    let url = fresh_db(&name.replace('-', "_"));
    let log = dir.join("host.log");
    let host = Running::new(
        host()
            .args(run_args(&plugins, &input, &url, &dir.join("state")))
            .args(["--batch-size", "500"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    Rig {
        dir,
        input,
        url,
        log,
        host,
    }
}

impl Rig {
    fn rows(&self) -> i64 {
        let ready =
            query(&self.url, "SELECT to_regclass('ecommerce_events')::text")[0][0].is_some();
        if ready {
            count(&self.url, "SELECT count(*) FROM ecommerce_events")
        } else {
            0
        }
    }

    fn wait_rows(&self, at_least: i64) {
        wait_until(PATIENCE, "rows in the table", || self.rows() >= at_least);
    }

    fn ids(&self) -> BTreeSet<String> {
        query(&self.url, "SELECT event_id FROM ecommerce_events")
            .into_iter()
            .map(|r| r[0].clone().unwrap())
            .collect()
    }

    fn quarantined(&self) -> Vec<(String, Option<String>, String, String)> {
        query(
            &self.url,
            "SELECT kind, line::text, coalesce(raw, ''), reason FROM pipeline.quarantine ORDER BY file, line",
        )
        .into_iter()
        .map(|r| {
            (
                r[0].clone().unwrap(),
                r[1].clone(),
                r[2].clone().unwrap(),
                r[3].clone().unwrap(),
            )
        })
        .collect()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the host with SIGTERM and checks it exits cleanly.
    fn stop(self) -> String {
        let log = self.log.clone();
        assert!(self.host.terminate(), "host did not exit cleanly");
        std::fs::read_to_string(log).unwrap_or_default()
    }
}

/// `n` valid rows with fresh ids, and the ids.
fn fresh_rows(n: usize) -> (Vec<String>, Vec<String>) {
    let rows: Vec<String> = (0..n).map(|i| row(i as i32 + 1, 1)).collect();
    let ids = rows.iter().map(|r| r[..36].to_owned()).collect();
    (rows, ids)
}

fn csv_text(rows: &[String], newline: &str) -> String {
    let mut text = format!("{HEADER}{newline}");
    for r in rows {
        text.push_str(r);
        text.push_str(newline);
    }
    text
}

/// Writes a large file in place (not by rename), so the host reads it
/// while the test does something to it.
fn big_file(path: &Path, rows: usize) -> Vec<String> {
    let (rows, ids) = fresh_rows(rows);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, csv_text(&rows, "\n")).unwrap();
    std::fs::rename(tmp, path).unwrap();
    ids
}

/// The ids in the table that came from `ids` form a prefix of it: what was
/// read before the file went away, nothing skipped.
fn assert_prefix(table: &BTreeSet<String>, ids: &[String]) -> usize {
    let k = ids.iter().take_while(|id| table.contains(*id)).count();
    assert!(
        ids[k..].iter().all(|id| !table.contains(id)),
        "rows of the file after line {k} were committed but earlier ones were not"
    );
    k
}

#[test]
fn a_file_truncated_below_the_read_position_is_read_again_from_the_start() {
    let rig = start("truncated", Stages::Shipped, |_| {});
    let path = rig.input.join("a.csv");
    let old = big_file(&path, 150_000);
    rig.wait_rows(2_000);
    // Truncate in place (copytruncate-style) and write fresh rows: the
    // file is now shorter than what has been read of it.
    let (rows, new) = fresh_rows(100);
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap()
        .write_all(csv_text(&rows, "\n").as_bytes())
        .unwrap();
    wait_until(PATIENCE, "the new rows", || {
        let ids = rig.ids();
        new.iter().all(|id| ids.contains(id))
    });
    std::thread::sleep(Duration::from_millis(500));
    let table = rig.ids();
    let all: BTreeSet<&String> = old.iter().chain(&new).collect();
    assert!(table.iter().all(|id| all.contains(id)));
    assert_prefix(&table, &old);
    assert!(rig.quarantined().is_empty(), "{:?}", rig.quarantined());
    let log = rig.stop();
    assert!(log.contains("file shrank below the read position"), "{log}");
}

#[test]
fn a_file_replaced_under_its_name_is_read_as_a_new_file() {
    let rig = start("rewritten", Stages::Shipped, |_| {});
    let path = rig.input.join("a.csv");
    let old = big_file(&path, 150_000);
    rig.wait_rows(2_000);
    // Same name, new inode: written aside and renamed over the old file.
    let (rows, new) = fresh_rows(100);
    let tmp = rig.input.join(".a.csv.tmp");
    std::fs::write(&tmp, csv_text(&rows, "\n")).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    wait_until(PATIENCE, "the new file's rows", || {
        let ids = rig.ids();
        new.iter().all(|id| ids.contains(id))
    });
    std::thread::sleep(Duration::from_millis(500));
    let table = rig.ids();
    let all: BTreeSet<&String> = old.iter().chain(&new).collect();
    assert!(table.iter().all(|id| all.contains(id)));
    let from_old = assert_prefix(&table, &old);
    // Nothing read across the two files (a row cut in half would be
    // quarantined as malformed).
    assert!(rig.quarantined().is_empty(), "{:?}", rig.quarantined());
    rig.stop();
    println!("replaced: {from_old} rows of the old file committed, then all 100 of the new one");
}

#[test]
fn a_file_deleted_while_being_read_keeps_what_was_read_and_the_host_goes_on() {
    let rig = start("deleted", Stages::Shipped, |_| {});
    let path = rig.input.join("a.csv");
    let old = big_file(&path, 150_000);
    rig.wait_rows(2_000);
    std::fs::remove_file(&path).unwrap();
    let (rows, new) = fresh_rows(100);
    write_csv(&rig.input, "b.csv", &rows);
    wait_until(PATIENCE, "the next file's rows", || {
        let ids = rig.ids();
        new.iter().all(|id| ids.contains(id))
    });
    std::thread::sleep(Duration::from_millis(500));
    let table = rig.ids();
    let read = assert_prefix(&table, &old);
    assert_eq!(table.len(), read + new.len());
    assert!(rig.quarantined().is_empty(), "{:?}", rig.quarantined());
    rig.stop();
    println!("deleted: {read} of {} rows had been read", old.len());
}

#[test]
fn an_empty_file_is_read_once_it_has_content() {
    let (good, _) = fresh_rows(10);
    let rig = start("empty", Stages::Shipped, |input| {
        std::fs::write(input.join("empty.csv"), b"").unwrap();
        write_csv(input, "good.csv", &good);
    });
    rig.wait_rows(10);
    std::thread::sleep(Duration::from_millis(500));
    assert!(rig.quarantined().is_empty());
    // A writer that created the file first and fills it now.
    let (later, ids) = fresh_rows(5);
    std::fs::write(rig.input.join("empty.csv"), csv_text(&later, "\n")).unwrap();
    rig.wait_rows(15);
    assert!(ids.iter().all(|id| rig.ids().contains(id)));
    assert!(rig.quarantined().is_empty(), "{:?}", rig.quarantined());
    rig.stop();
}

#[test]
fn a_header_only_file_yields_nothing_and_its_header_applies_to_rows_appended_later() {
    // Columns in a non-default order: rows appended later must be read
    // with this header, not the default order.
    let header = "price,event_time,event_id,user_id,event_type,product_id\n";
    let rig = start("header-only", Stages::Shipped, |input| {
        std::fs::write(input.join("h.csv"), header).unwrap();
    });
    let (good, _) = fresh_rows(3);
    write_csv(&rig.input, "good.csv", &good);
    rig.wait_rows(3);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rig.rows(), 3);
    assert!(rig.quarantined().is_empty());
    let id = uuid::Uuid::new_v4().to_string();
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(rig.input.join("h.csv"))
        .unwrap();
    writeln!(file, "12.50,2026-01-05T00:00:00Z,{id},7,view,8").unwrap();
    drop(file);
    rig.wait_rows(4);
    let price = query(
        &rig.url,
        &format!("SELECT price::text, user_id::text FROM ecommerce_events WHERE event_id = '{id}'"),
    );
    assert_eq!(price[0][0].as_deref(), Some("12.50"));
    assert_eq!(price[0][1].as_deref(), Some("7"));
    assert!(rig.quarantined().is_empty(), "{:?}", rig.quarantined());
    rig.stop();
}

#[test]
fn a_utf8_bom_before_the_header_is_ignored() {
    let (rows, ids) = fresh_rows(10);
    let rig = start("bom", Stages::Shipped, |input| {
        let text = format!("\u{feff}{}", csv_text(&rows, "\n"));
        std::fs::write(input.join("bom.csv"), text).unwrap();
    });
    rig.wait_rows(10);
    assert_eq!(rig.ids(), ids.into_iter().collect());
    assert!(rig.quarantined().is_empty(), "{:?}", rig.quarantined());
    rig.stop();
}

#[test]
fn crlf_line_endings_are_read_like_lf() {
    let (mut rows, mut ids) = fresh_rows(10);
    // And one malformed row, to check CRLF lines are counted right.
    rows.insert(5, "not-a-uuid,1,view,1,9.99,2026-01-05T00:00:00Z".into());
    ids.sort();
    let rig = start("crlf", Stages::Shipped, |input| {
        std::fs::write(input.join("crlf.csv"), csv_text(&rows, "\r\n")).unwrap();
    });
    rig.wait_rows(10);
    std::thread::sleep(Duration::from_millis(300));
    let table: Vec<String> = rig.ids().into_iter().collect();
    assert_eq!(table, ids);
    let q = rig.quarantined();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0].1.as_deref(), Some("7"));
    assert!(
        !q[0].2.ends_with('\r'),
        "raw text without the CR: {:?}",
        q[0].2
    );
    rig.stop();
}

#[test]
fn quoted_fields_may_hold_commas_quotes_and_newlines() {
    let id = uuid::Uuid::new_v4().to_string();
    let plain = row(1, 1);
    let rows = vec![
        format!("{id},\"1\",\"add,to \"\"cart\"\"\nnow\",2,\"9.99\",2026-01-05T00:00:00Z"),
        // Line 4 of the file: the quoted newline above counts as a line.
        "not-a-uuid,1,view,1,9.99,2026-01-05T00:00:00Z".into(),
        plain,
    ];
    let rig = start("quoted", Stages::DedupOnly, |input| {
        write_csv(input, "q.csv", &rows);
    });
    rig.wait_rows(2);
    let kind = query(
        &rig.url,
        &format!("SELECT event_type FROM ecommerce_events WHERE event_id = '{id}'"),
    );
    assert_eq!(kind[0][0].as_deref(), Some("add,to \"cart\"\nnow"));
    let q = rig.quarantined();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0].1.as_deref(), Some("4"));
    rig.stop();
}

#[test]
fn a_line_over_one_mib_is_quarantined_and_the_rows_around_it_are_committed() {
    let (before, _) = fresh_rows(10);
    let (after, _) = fresh_rows(10);
    let (tail, _) = fresh_rows(20_000);
    let started = Instant::now();
    let rig = start("long-line", Stages::Shipped, |input| {
        let mut text = csv_text(&before, "\n");
        // 3 MiB without a line end, then the rows after it.
        text.push_str(&"x".repeat(3 << 20));
        text.push('\n');
        for r in &after {
            text.push_str(r);
            text.push('\n');
        }
        std::fs::write(input.join("long.csv"), text).unwrap();
        // A quote opened and never closed, with more than 1 MiB after it.
        let mut text = csv_text(&before[..0], "\n");
        text.push_str("\"unclosed,1,view,1,9.99,2026-01-05T00:00:00Z\n");
        for r in &tail {
            text.push_str(r);
            text.push('\n');
        }
        std::fs::write(input.join("quote.csv"), text).unwrap();
    });
    rig.wait_rows(20 + 20_000);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rig.rows(), 20_020);
    let q = rig.quarantined();
    assert_eq!(q.len(), 2, "{q:?}");
    let long = &q[0];
    assert_eq!(long.1.as_deref(), Some("12"));
    assert!(
        long.3.contains("longer than the limit") && long.3.contains("3145728 bytes"),
        "{}",
        long.3
    );
    assert!(long.2.len() < 70 * 1024, "raw kept short: {}", long.2.len());
    let quote = &q[1];
    assert_eq!(quote.1.as_deref(), Some("2"));
    assert!(quote.3.contains("not closed"), "{}", quote.3);
    println!("took {:?}", started.elapsed());
    rig.stop();
}

#[test]
fn binary_garbage_is_quarantined_row_by_row_and_the_host_goes_on() {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let garbage: Vec<u8> = (0..256 * 1024).map(|_| rng.random::<u8>()).collect();
    let (good, ids) = fresh_rows(50);
    let rig = start("garbage", Stages::Shipped, |input| {
        std::fs::write(input.join("garbage.bin.csv"), &garbage).unwrap();
        write_csv(input, "good.csv", &good);
    });
    rig.wait_rows(50);
    // The garbage settles (its last line has no end) and is read whole.
    wait_until(PATIENCE, "the garbage's quarantine", || {
        count(
            &rig.url,
            "SELECT coalesce(max(byte_offset), 0) FROM pipeline.positions WHERE path LIKE '%garbage%'",
        ) == garbage.len() as i64
    });
    assert_eq!(rig.ids(), ids.into_iter().collect());
    let q = rig.quarantined();
    assert!(q.len() > 100, "{}", q.len());
    assert!(q.iter().all(|r| r.0 == "malformed"));
    rig.stop();
}

#[test]
fn a_file_of_two_million_rows_is_streamed_in_bounded_memory() {
    let dir = scratch("huge");
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    let total = 2_000_000usize;
    let distinct = 1_000usize;
    // All but the last rows repeat one event: dedup drops them, so the
    // test measures reading, parsing and the stages, not the database.
    let repeated = row(1, 1);
    let (last, last_ids) = fresh_rows(distinct);
    let path = input.join("huge.csv");
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        writeln!(out, "{HEADER}").unwrap();
        for _ in 0..total - distinct {
            writeln!(out, "{repeated}").unwrap();
        }
        for r in &last {
            writeln!(out, "{r}").unwrap();
        }
    }
    let size = std::fs::metadata(&path).unwrap().len();
    let url = fresh_db("huge");
    let started = Instant::now();
    let child = host()
        .args(run_args(&plugins_dir(), &input, &url, &dir.join("state")))
        .arg("--once")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut host = Running::new(child);
    let mut peak_kb = 0;
    while !host.exited() {
        if let Some((hwm, _)) = memory_kb(pid) {
            peak_kb = peak_kb.max(hwm);
        }
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            started.elapsed() < PATIENCE,
            "still running after {PATIENCE:?}"
        );
    }
    let took = started.elapsed();
    let out = host.child.take().unwrap().wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        count(&url, "SELECT sum(rows_in) FROM pipeline.batches"),
        total as i64
    );
    let ids: BTreeSet<String> = query(&url, "SELECT event_id FROM ecommerce_events")
        .into_iter()
        .map(|r| r[0].clone().unwrap())
        .collect();
    assert_eq!(ids.len(), distinct + 1);
    assert!(last_ids.iter().all(|id| ids.contains(id)));
    let peak_mb = peak_kb / 1024;
    println!(
        "2M rows ({} MB file): {took:?}, host peak RSS {peak_mb} MB",
        size >> 20
    );
    assert!(
        peak_mb < 200 && (peak_mb << 20) < size,
        "peak RSS {peak_mb} MB for a {} MB file",
        size >> 20
    );
}

#[test]
fn a_file_the_host_may_not_read_is_retried_until_it_can_and_others_go_on() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("denied");
    let input = dir.join("input");
    let (secret, secret_ids) = fresh_rows(5);
    write_csv(&input, "secret.csv", &secret);
    std::fs::set_permissions(
        input.join("secret.csv"),
        std::fs::Permissions::from_mode(0o000),
    )
    .unwrap();
    let url = fresh_db("denied");
    let log = dir.join("host.log");
    // Root reads any file through CAP_DAC_OVERRIDE; run the host without
    // it (and without CAP_DAC_READ_SEARCH) so permissions apply to it too.
    let mut command = if unsafe { libc::geteuid() } == 0 {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--bounding-set", "-dac_override,-dac_read_search"])
            .arg(env!("CARGO_BIN_EXE_host"))
            .env("RUST_LOG", "info,wasmtime=warn,cranelift=warn")
            .env_remove("DATABASE_URL");
        c
    } else {
        host()
    };
    let rig = Rig {
        host: Running::new(
            command
                .args(run_args(&plugins_dir(), &input, &url, &dir.join("state")))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        ),
        dir,
        input,
        url,
        log,
    };
    let (good, _) = fresh_rows(10);
    write_csv(&rig.input, "good.csv", &good);
    rig.wait_rows(10);
    wait_until(PATIENCE, "the error in the log", || {
        rig.log().contains("Permission denied")
    });
    let log = rig.log();
    assert!(
        log.contains("secret.csv") && log.contains("will retry"),
        "{log}"
    );
    assert_eq!(rig.rows(), 10);
    std::fs::set_permissions(
        rig.input.join("secret.csv"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    // Picked up by the periodic rescan (a permission change is not a write).
    rig.wait_rows(15);
    assert!(secret_ids.iter().all(|id| rig.ids().contains(id)));
    assert!(rig.quarantined().is_empty());
    let _ = &rig.dir;
    rig.stop();
}
