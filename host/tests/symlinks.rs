//! Only regular files in the input folder are read: a symbolic link to a
//! file elsewhere is skipped with one log line, unless `--follow-symlinks`.

mod common;

use common::*;

#[test]
fn a_symlink_to_a_file_outside_the_folder_is_not_read() {
    let dir = scratch("symlinks");
    let input = dir.join("input");
    let outside = dir.join("outside");
    write_csv(&input, "a.csv", &[row(1, 1), row(1, 2)]);
    write_csv(&outside, "secret.csv", &[row(9, 9)]);
    std::os::unix::fs::symlink(outside.join("secret.csv"), input.join("link.csv")).unwrap();
    let plugins = plugins_with(&dir, &[], "");
    let url = fresh_db("symlinks");
    let out = run_once(&plugins, &input, &url, &dir.join("state"), &[]);
    let log = String::from_utf8_lossy(&out.stderr);
    let ids: Vec<String> = table(&url).into_keys().collect();
    assert_eq!(ids.len(), 2, "only a.csv is read: {ids:?}");
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM ecommerce_events WHERE user_id = 9"
        ),
        0
    );
    assert_eq!(count(&url, "SELECT count(*) FROM pipeline.quarantine"), 0);
    assert_eq!(
        log.matches("symbolic link").count(),
        1,
        "one log line: {log}"
    );

    // Opted in, the link is read.
    let url = fresh_db("symlinks_follow");
    run_once(
        &plugins,
        &input,
        &url,
        &dir.join("state2"),
        &["--follow-symlinks"],
    );
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM ecommerce_events WHERE user_id = 9"
        ),
        1
    );
}
