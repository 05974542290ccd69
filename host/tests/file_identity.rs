//! Files known by content as well as by inode, through the real host and
//! PostgreSQL: a new file on a reused inode, a copytruncate refilled past
//! the old offset, a file renamed out of the folder and back, a file read
//! again from its start, and a file gone for longer than `--forget-after`.
//! Each checks that no row is lost, none is read twice where it need not
//! be (`pipeline.batches.rows_in` counts every record read), and no
//! quarantine row is added twice.

mod common;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::*;

const HEADER: &str = "event_id,user_id,event_type,product_id,price,event_time";
/// A record the parser refuses: two fields where six are due.
const BAD: &str = "not,enough";

fn text(rows: &[String]) -> String {
    let mut text = format!("{HEADER}\n");
    for r in rows {
        text.push_str(r);
        text.push('\n');
    }
    text
}

fn fresh(n: usize) -> Vec<String> {
    (0..n).map(|i| row(i as i32 + 1, 7)).collect()
}

fn ids(rows: &[String]) -> Vec<String> {
    rows.iter()
        .filter_map(|r| r.split(',').next())
        .filter(|id| id.len() == 36)
        .map(str::to_owned)
        .collect()
}

/// Records read, over every committed batch.
fn rows_read(url: &str) -> i64 {
    // Nothing before the host has made its tables.
    if query(url, "SELECT to_regclass('pipeline.batches')::text")[0][0].is_none() {
        return 0;
    }
    count(
        url,
        "SELECT coalesce(sum(rows_in), 0) FROM pipeline.batches",
    )
}

fn quarantined(url: &str) -> i64 {
    count(url, "SELECT count(*) FROM pipeline.quarantine")
}

fn table_rows(url: &str) -> i64 {
    count(url, "SELECT count(*) FROM ecommerce_events")
}

fn assert_table_has(url: &str, ids: &[String]) {
    let table = table(url);
    for id in ids {
        assert!(table.contains_key(id), "event {id} lost");
    }
}

struct Rig {
    dir: PathBuf,
    input: PathBuf,
    url: String,
}

fn rig(name: &str) -> Rig {
    let dir = scratch(name);
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    let url = fresh_db(name);
    Rig { dir, input, url }
}

impl Rig {
    fn spawn(&self, extra: &[&str]) -> Running {
        let mut cmd = host();
        cmd.args(run_args(
            &plugins_dir(),
            &self.input,
            &self.url,
            &self.dir.join("state"),
        ))
        .args(extra);
        Running::spawn(cmd, &self.dir.join("host.log"))
    }

    /// Waits until `n` records have been read and committed.
    fn wait_read(&self, host: &mut Running, n: i64) {
        let url = self.url.clone();
        host.wait_until(&format!("{n} records read and committed"), || {
            rows_read(&url) >= n
        });
    }
}

fn rewrite_in_place(path: &Path, content: &str) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(content.as_bytes()).unwrap();
}

#[test]
fn a_new_file_on_a_reused_inode_after_a_restart_is_read_from_its_start() {
    let r = rig("identity_reused_inode");
    let old = fresh(30);
    write_csv(&r.input, "old.csv", &old);
    let old_meta = std::fs::metadata(r.input.join("old.csv")).unwrap();
    run_once(&plugins_dir(), &r.input, &r.url, &r.dir.join("state"), &[]);
    assert_eq!(table_rows(&r.url), 30);

    // Delete it and make new files until one gets its inode.
    std::fs::remove_file(r.input.join("old.csv")).unwrap();
    let new = fresh(60);
    let mut reused = false;
    for _ in 0..500 {
        write_csv(&r.input, "new.csv", &new);
        if std::fs::metadata(r.input.join("new.csv")).unwrap().ino() == old_meta.ino() {
            reused = true;
            break;
        }
        std::fs::remove_file(r.input.join("new.csv")).unwrap();
        write_csv(&r.input, "filler.csv", &[]);
        std::fs::remove_file(r.input.join("filler.csv")).unwrap();
    }
    if !reused {
        write_csv(&r.input, "new.csv", &new);
    }
    let new_key = host::source::file_key(&std::fs::metadata(r.input.join("new.csv")).unwrap());
    let old_key = host::source::file_key(&old_meta);
    if new_key != old_key {
        // This file system records birth times (or gave another inode):
        // put the old position under the new file's key, as a file system
        // without birth times would have it. Its fingerprint is the old
        // file's.
        let changed = count(
            &r.url,
            &format!(
                "WITH u AS (UPDATE pipeline.positions SET file_key = '{new_key}' WHERE file_key = '{old_key}' RETURNING 1) SELECT count(*) FROM u"
            ),
        );
        assert_eq!(changed, 1);
    }
    eprintln!("inode reused by the new file: {reused}; keys {old_key} / {new_key}");

    let out = run_once(&plugins_dir(), &r.input, &r.url, &r.dir.join("state"), &[]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert_table_has(&r.url, &ids(&new));
    assert_eq!(table_rows(&r.url), 90, "{log}");
    assert!(
        log.contains("file begins with other bytes than the ones read"),
        "{log}"
    );
}

#[test]
fn a_copytruncate_refilled_past_the_old_offset_loses_and_doubles_nothing() {
    let r = rig("identity_copytruncate");
    let mut host = r.spawn(&[]);
    let first = fresh(10);
    write_csv(&r.input, "a.csv", &first);
    r.wait_read(&mut host, 10);
    // Emptied and refilled in place, past the old offset, in one go.
    let second = fresh(30);
    rewrite_in_place(&r.input.join("a.csv"), &text(&second));
    r.wait_read(&mut host, 40);
    let log = host.stop();
    assert_table_has(&r.url, &ids(&first));
    assert_table_has(&r.url, &ids(&second));
    assert_eq!(table_rows(&r.url), 40, "{log}");
    assert_eq!(rows_read(&r.url), 40, "a record read twice: {log}");
}

#[test]
fn a_file_renamed_out_of_the_folder_and_back_resumes_where_it_was() {
    let r = rig("identity_rename_back");
    let mut host = r.spawn(&[]);
    let mut a = fresh(10);
    a.push(BAD.into());
    write_csv(&r.input, "a.csv", &a);
    r.wait_read(&mut host, 11);
    let outside = r.dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::rename(r.input.join("a.csv"), outside.join("a.csv")).unwrap();
    // Any pass that reads b.csv lists the folder without a.csv.
    let b = fresh(5);
    write_csv(&r.input, "b.csv", &b);
    r.wait_read(&mut host, 16);
    std::fs::rename(outside.join("a.csv"), r.input.join("a.csv")).unwrap();
    let more = fresh(5);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(r.input.join("a.csv"))
        .unwrap();
    f.write_all(
        text(&more)
            .trim_start_matches(HEADER)
            .trim_start()
            .as_bytes(),
    )
    .unwrap();
    drop(f);
    r.wait_read(&mut host, 21);
    let log = host.stop();
    for rows in [&a, &b, &more] {
        assert_table_has(&r.url, &ids(rows));
    }
    assert_eq!(table_rows(&r.url), 20, "{log}");
    assert_eq!(rows_read(&r.url), 21, "a record read twice: {log}");
    assert_eq!(quarantined(&r.url), 1, "{log}");
}

#[test]
fn a_file_read_again_from_its_start_does_not_quarantine_its_rows_twice() {
    let r = rig("identity_reread_quarantine");
    let mut host = r.spawn(&[]);
    let mut rows = fresh(5);
    rows.insert(2, BAD.into());
    rows.push(BAD.into());
    write_csv(&r.input, "a.csv", &rows);
    r.wait_read(&mut host, 7);
    assert_eq!(quarantined(&r.url), 2);
    // Emptied, then written again with the same content: read again
    // from the start.
    rewrite_in_place(&r.input.join("a.csv"), "");
    host.wait_for_log("file shrank below the read position", 1);
    rewrite_in_place(&r.input.join("a.csv"), &text(&rows));
    r.wait_read(&mut host, 14);
    let log = host.stop();
    assert_eq!(table_rows(&r.url), 5, "{log}");
    assert_eq!(quarantined(&r.url), 2, "quarantined twice: {log}");
    assert_eq!(
        count(&r.url, "SELECT max(reads) FROM pipeline.positions"),
        1,
        "{log}"
    );
}

#[test]
fn a_file_gone_longer_than_forget_after_loses_its_position_and_is_read_anew_without_doubles() {
    let r = rig("identity_forget");
    let mut host = r.spawn(&["--forget-after", "1s"]);
    let mut rows = fresh(5);
    rows.push(BAD.into());
    write_csv(&r.input, "a.csv", &rows);
    r.wait_read(&mut host, 6);
    let outside = r.dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::rename(r.input.join("a.csv"), outside.join("a.csv")).unwrap();
    let url = r.url.clone();
    host.wait_until("the gone file's position deleted", || {
        count(&url, "SELECT count(*) FROM pipeline.positions") == 0
    });
    std::fs::rename(outside.join("a.csv"), r.input.join("a.csv")).unwrap();
    r.wait_read(&mut host, 12);
    let log = host.stop();
    assert_table_has(&r.url, &ids(&rows));
    assert_eq!(table_rows(&r.url), 5, "{log}");
    assert_eq!(quarantined(&r.url), 1, "quarantined twice: {log}");
    assert_eq!(
        count(&r.url, "SELECT count(*) FROM pipeline.positions"),
        1,
        "{log}"
    );
}

fn append(path: &Path, rows: &[String]) {
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    for r in rows {
        writeln!(f, "{r}").unwrap();
    }
}

#[test]
fn a_done_file_appended_to_is_noticed_at_once_and_committed() {
    let r = rig("identity_done_appended");
    let mut host = r.spawn(&[]);
    let (a, b, c) = (fresh(4), fresh(5), fresh(6));
    write_csv(&r.input, "a.csv", &a);
    write_csv(&r.input, "b.csv", &b);
    write_csv(&r.input, "c.csv", &c);
    r.wait_read(&mut host, 15);
    // All three read to their end and committed: only an event names
    // them to a pass now, until the full pass a minute on.
    let appended = std::time::Instant::now();
    let more = fresh(3);
    append(&r.input.join("b.csv"), &more);
    r.wait_read(&mut host, 18);
    let noticed = appended.elapsed();
    // Renamed within the folder, then appended to: still the same file.
    std::fs::rename(r.input.join("c.csv"), r.input.join("c2.csv")).unwrap();
    let last = fresh(2);
    append(&r.input.join("c2.csv"), &last);
    r.wait_read(&mut host, 20);
    let log = host.stop();
    for rows in [&a, &b, &c, &more, &last] {
        assert_table_has(&r.url, &ids(rows));
    }
    assert_eq!(table_rows(&r.url), 20, "{log}");
    assert_eq!(rows_read(&r.url), 20, "a record read twice: {log}");
    assert!(
        noticed < host::source::FULL_PASS,
        "the append waited {noticed:?} for the full pass instead of its event: {log}"
    );
}
