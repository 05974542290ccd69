//! The dashboard page, end to end: a host runs the shipped stages over
//! generated input (with malformed rows and duplicates), the page it
//! serves is opened in headless Chromium (Debian's `chromium`; `make
//! test` installs it), and the numbers the rendered page shows must equal
//! the database's. Screenshots of the page are saved as test artifacts:
//! `target/dashboard/laptop.png` and `target/dashboard/phone.png`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The browser: `CHROMIUM` when set, else `chromium` on the PATH.
fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".into())
}

/// Runs headless Chromium on `url` with `extra` arguments (a fresh
/// profile each time); returns its stdout.
fn browse(url: &str, profile: &Path, extra: &[String]) -> String {
    let _ = std::fs::remove_dir_all(profile);
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            // Virtual time runs the page's polling; network fetches pause it.
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): install Debian's chromium (make test does)",
                chromium()
            )
        });
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the element with `id` in a dumped DOM.
fn text_by_id(dom: &str, id: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element #{id} in the page"));
    inner_text(&dom[at..])
}

/// The text of the first element after `from` (its opening tag's end up
/// to the next tag).
fn inner_text(from: &str) -> String {
    let start = from.find('>').unwrap() + 1;
    let end = from[start..].find('<').unwrap() + start;
    from[start..end].trim().to_owned()
}

/// A cell of the stage table: the row with `data-stage`, the cell with `data-field`.
fn stage_cell(dom: &str, stage: &str, field: &str) -> String {
    let row = dom
        .find(&format!("data-stage=\"{stage}\""))
        .unwrap_or_else(|| panic!("no row for stage {stage} in the page"));
    let rest = &dom[row..];
    let cell = rest
        .find(&format!("data-field=\"{field}\""))
        .unwrap_or_else(|| panic!("no {field} cell for {stage}"));
    inner_text(&rest[cell..])
}

/// A displayed count as a number (digits grouped with commas).
fn number(text: &str) -> i64 {
    text.replace(',', "")
        .parse()
        .unwrap_or_else(|_| panic!("{text:?} is not a count"))
}

fn artifacts() -> PathBuf {
    let dir = repo().join("target/dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_dashboard_shows_the_numbers_the_database_holds() {
    let dir = scratch("dashboard");
    let input = dir.join("input");
    generate(
        &input,
        &[
            "--files",
            "4",
            "--events-per-file",
            "250",
            "--invalid-rate",
            "0.02",
            "--duplicate-rate",
            "0.05",
            "--seed",
            "14",
        ],
    );
    let url = fresh_db("dashboard");
    let port = free_port();
    let host = Running::new(
        host()
            .args(run_args_on(
                &plugins_dir(),
                &input,
                &url,
                &dir.join("state"),
                port,
            ))
            .args(["--batch-size", "100"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("host.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let expected = expected(&input);
    wait_until(Duration::from_secs(180), "every row in the table", || {
        query(&url, "SELECT to_regclass('ecommerce_events')::text")[0][0].is_some()
            && count(&url, "SELECT count(*) FROM ecommerce_events") as usize == expected.rows.len()
    });
    // Every file committed: the lag the page shows is zero too.
    wait_until(Duration::from_secs(60), "the lag at zero", || {
        http_get(port, "/api/status").is_some_and(|(_, b)| b.contains("\"lag\":{\"files\":0"))
    });

    let page = format!("http://127.0.0.1:{port}/");
    let dom = browse(&page, &dir.join("profile"), &["--dump-dom".into()]);
    assert!(
        dom.contains("data-ready=\"1\""),
        "the page never rendered a status:\n{dom}"
    );
    assert_eq!(text_by_id(&dom, "conn"), "connected");

    let db = |sql: &str| count(&url, sql);
    let shown = |id: &str| number(&text_by_id(&dom, id));
    assert_eq!(
        shown("total-rows_written"),
        db("SELECT count(*) FROM ecommerce_events")
    );
    assert_eq!(
        shown("total-rows_read"),
        db("SELECT coalesce(sum(rows_in), 0) FROM pipeline.batches")
    );
    assert_eq!(
        shown("total-malformed"),
        db("SELECT count(*) FROM pipeline.quarantine WHERE kind = 'malformed'")
    );
    assert!(shown("total-malformed") > 0, "the input has malformed rows");
    assert_eq!(
        shown("total-rejected"),
        db("SELECT count(*) FROM pipeline.quarantine WHERE kind = 'rejected'")
    );
    assert_eq!(
        shown("total-failed"),
        db("SELECT count(*) FROM pipeline.quarantine WHERE kind = 'failed'")
    );
    assert_eq!(
        shown("total-dropped"),
        db("SELECT coalesce(sum(rows_dropped), 0) FROM pipeline.batches")
    );
    assert!(shown("total-dropped") > 0, "the input has duplicates");
    assert_eq!(
        shown("total-batches"),
        db("SELECT count(*) FROM pipeline.batches")
    );
    assert_eq!(
        shown("quarantine-total"),
        db("SELECT count(*) FROM pipeline.quarantine")
    );
    assert_eq!(shown("lag-files"), 0);
    for stage in ["transform", "dedup"] {
        for (field, key) in [("in", "in"), ("out", "out"), ("rejected", "rejected")] {
            let recorded = db(&format!(
                "SELECT coalesce(sum((s->>'{key}')::bigint), 0) FROM pipeline.batches, jsonb_array_elements(stages) s WHERE s->>'name' = '{stage}'"
            ));
            assert_eq!(
                number(&stage_cell(&dom, stage, field)),
                recorded,
                "stage {stage}, {field}"
            );
        }
    }
    assert!(
        dom.contains("data-kind=\"loaded\""),
        "the load events are listed"
    );
    assert!(
        !dom.contains("id=\"paused-banner\" class=\"banner show\""),
        "no pause banner while running"
    );

    let out = artifacts();
    for (name, size) in [("laptop", "1280,1400"), ("phone", "390,2400")] {
        let file = out.join(format!("{name}.png"));
        let _ = std::fs::remove_file(&file);
        browse(
            &page,
            &dir.join(format!("profile-{name}")),
            &[
                format!("--screenshot={}", file.display()),
                format!("--window-size={size}"),
            ],
        );
        let len = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        assert!(len > 10_000, "screenshot {} is {len} bytes", file.display());
        println!("screenshot: {}", file.display());
    }
    assert!(host.terminate(), "clean exit on SIGTERM");
}
