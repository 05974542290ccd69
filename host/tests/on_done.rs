//! `--on-done delete` and `--on-done move:DIR`: a file fully committed and
//! settled leaves the input folder, and nothing of it is lost or doubled.

mod common;

use std::path::Path;

use common::*;

fn csv_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".csv"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn run_until_done(name: &str, on_done: &str, done_dir: Option<&Path>) -> (String, Vec<String>) {
    let dir = scratch(name);
    let input = dir.join("input");
    generate(
        &input,
        &["--files", "3", "--events-per-file", "100", "--seed", "21"],
    );
    let written = csv_names(&input);
    let expected = expected(&input);
    let url = fresh_db(name);
    let mut cmd = host();
    cmd.args(run_args(&plugins_dir(), &input, &url, &dir.join("state")))
        .args(["--on-done", on_done]);
    let mut running = Running::spawn(cmd, &dir.join("host.log"));
    running.wait_until("every file done with", || csv_names(&input).is_empty());
    let log = running.stop();
    let actual = table(&url);
    assert_eq!(
        actual.len(),
        expected.rows.len(),
        "rows lost or doubled: {log}"
    );
    for (id, row) in &expected.rows {
        assert_eq!(actual.get(id), Some(row), "event {id}");
    }
    if let Some(done) = done_dir {
        assert_eq!(csv_names(done), written, "every file moved, under its name");
    }
    (url, written)
}

#[test]
fn on_done_delete_removes_each_file_once_committed() {
    run_until_done("on_done_delete", "delete", None);
}

#[test]
fn on_done_move_renames_each_file_into_the_folder_once_committed() {
    let done = scratch("on_done_move_target");
    run_until_done(
        "on_done_move",
        &format!("move:{}", done.display()),
        Some(&done),
    );
}
