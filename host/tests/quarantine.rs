//! `host quarantine list` and `host quarantine replay` against a real
//! PostgreSQL and the shipped stages: a transform set up to reject two
//! event types quarantines them; once the manifest is fixed, a replay
//! writes them exactly once (also when it is killed and run again), marks
//! the replayed rows with their batch, and leaves malformed rows open,
//! while a host keeps running on the same database.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use rand::{RngExt, SeedableRng};

const ALL_TYPES: &str = "view,add_to_cart,remove_from_cart,purchase";

fn manifest(allowed: &str) -> String {
    format!(
        "[[stage]]\nname = \"transform\"\ncomponent = \"transform.wasm\"\ngrants = [\"clock\"]\n\
         [stage.config]\nallowed-event-types = \"{allowed}\"\nmax-future-skew-seconds = \"300\"\n\n\
         [[stage]]\nname = \"dedup\"\ncomponent = \"dedup.wasm\"\n"
    )
}

/// A database that ingested `input` with a transform rejecting
/// add_to_cart and remove_from_cart; its plugins folder, fixed since.
struct Setup {
    dir: PathBuf,
    url: String,
    input: PathBuf,
    plugins: PathBuf,
    expected: Expected,
}

fn setup(name: &str, seed: &str, events_per_file: &str) -> Setup {
    let dir = scratch(name);
    let url = fresh_db(name);
    let input = dir.join("input");
    generate(
        &input,
        &[
            "--files",
            "4",
            "--events-per-file",
            events_per_file,
            "--seed",
            seed,
            "--duplicate-rate",
            "0.05",
            "--invalid-rate",
            "0.02",
        ],
    );
    let stages = plugins_dir();
    let plugins = plugins_with(
        &dir,
        &[
            (&stages.join("transform.wasm"), "transform.wasm"),
            (&stages.join("dedup.wasm"), "dedup.wasm"),
        ],
        &manifest("view,purchase"),
    );
    run_once(&plugins, &input, &url, &dir.join("state"), &[]);
    let expected = expected(&input);
    let kept: BTreeMap<String, Row> = expected
        .rows
        .iter()
        .filter(|(_, r)| r.1 == "view" || r.1 == "purchase")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(
        table(&url),
        kept,
        "the broken run keeps views and purchases"
    );
    std::fs::write(plugins.join("pipeline.toml"), manifest(ALL_TYPES)).unwrap();
    Setup {
        dir,
        url,
        input,
        plugins,
        expected,
    }
}

fn quarantine(s: &Setup, args: &[&str]) -> serde_json::Value {
    let out = quarantine_cmd(s, args).output().unwrap();
    assert!(
        out.status.success(),
        "host quarantine {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn quarantine_cmd(s: &Setup, args: &[&str]) -> std::process::Command {
    let mut cmd = host();
    cmd.arg("quarantine")
        .args(args)
        .args(["--json", "--database-url", &s.url]);
    if args[0] == "replay" {
        cmd.args(["--plugins", &s.plugins.display().to_string()])
            .args(["--cache-dir", &cache_dir().display().to_string()]);
    }
    cmd
}

fn open(url: &str, kind: &str) -> i64 {
    count(
        url,
        &format!("SELECT count(*) FROM pipeline.quarantine WHERE kind = '{kind}' AND replayed_batch IS NULL"),
    )
}

/// Every replayed row names a batch that exists; none is marked twice
/// (a row is marked once, by the batch that committed its replay).
fn assert_replayed_rows_carry_their_batch(url: &str, rejected: i64) {
    assert_eq!(
        count(
            url,
            "SELECT count(*) FROM pipeline.quarantine q JOIN pipeline.batches b ON b.batch_id = q.replayed_batch"
        ),
        rejected,
        "each replayed row names the batch that committed it"
    );
    assert_eq!(
        count(
            url,
            "SELECT count(*) FROM pipeline.quarantine WHERE replay_of IS NOT NULL"
        ),
        0,
        "the fixed chain rejects nothing again"
    );
}

#[test]
fn replay_after_a_fix_writes_the_rejected_rows_once_beside_a_running_host() {
    let s = setup("quarantine_fix", "21", "300");
    let url = &s.url;
    let rejected = open(url, "rejected");
    let malformed = open(url, "malformed");
    assert!(
        rejected > 100,
        "the broken transform rejected {rejected} rows"
    );
    assert_eq!(malformed as usize, s.expected.malformed);
    // The quarantined ids are exactly the expected rows of the two types.
    let ids: std::collections::BTreeSet<String> = query(
        url,
        "SELECT DISTINCT event_id FROM pipeline.quarantine WHERE kind = 'rejected'",
    )
    .into_iter()
    .map(|r| r[0].clone().unwrap())
    .collect();
    let want: std::collections::BTreeSet<String> = s
        .expected
        .rows
        .iter()
        .filter(|(_, r)| r.1 == "add_to_cart" || r.1 == "remove_from_cart")
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(ids, want);

    // list: counts by kind and by (kind, stage, reason), as recorded.
    let list = quarantine(&s, &["list"]);
    assert_eq!(list["open"], rejected + malformed);
    let by_kind: BTreeMap<String, i64> = list["by_kind"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_owned(), p[1].as_i64().unwrap()))
        .collect();
    assert_eq!(
        by_kind,
        BTreeMap::from([
            ("malformed".into(), malformed),
            ("rejected".into(), rejected)
        ])
    );
    let groups: Vec<&serde_json::Value> = list["groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["kind"] == "rejected")
        .collect();
    assert_eq!(groups.len(), 2, "one reason per rejected type: {groups:?}");
    for t in ["add_to_cart", "remove_from_cart"] {
        let recorded = count(
            url,
            &format!(
                "SELECT count(*) FROM pipeline.quarantine WHERE kind = 'rejected' AND reason LIKE '%\"{t}\"%'"
            ),
        );
        let g = groups
            .iter()
            .find(|g| g["reason"].as_str().unwrap().contains(&format!("\"{t}\"")))
            .unwrap();
        assert_eq!(g["count"], recorded);
        assert_eq!(g["stage"], "transform");
    }
    assert_eq!(list["samples"].as_array().unwrap().len(), 10);
    let filtered = quarantine(
        &s,
        &[
            "list",
            "--kind",
            "rejected",
            "--reason",
            "REMOVE_FROM_CART",
            "--since",
            "1h",
        ],
    );
    assert_eq!(
        filtered["open"],
        count(
            url,
            "SELECT count(*) FROM pipeline.quarantine WHERE reason LIKE '%\"remove_from_cart\"%'"
        )
    );

    // A host keeps running on the database throughout.
    let state = s.dir.join("state");
    let mut running = Running::spawn(
        {
            let mut cmd = host();
            cmd.args(run_args(&s.plugins, &s.input, url, &state));
            cmd
        },
        &s.dir.join("run.log"),
    );
    running.wait_for_log("resuming from the last committed batch", 1);

    // --dry-run: the counts, and nothing written.
    let rows_before = count(url, "SELECT count(*) FROM ecommerce_events");
    let batches_before = count(url, "SELECT count(*) FROM pipeline.batches");
    let dry = quarantine(&s, &["replay", "--dry-run"]);
    assert_eq!(dry["rows"]["rejected"], rejected);
    assert_eq!(
        dry["kept"].as_i64().unwrap() + dry["dropped"].as_i64().unwrap(),
        rejected
    );
    assert_eq!(dry["kept"].as_u64().unwrap() as usize, want.len());
    assert_eq!(dry["rejected"], 0);
    assert_eq!(dry["already_in_table"], 0);
    assert_eq!(
        count(url, "SELECT count(*) FROM ecommerce_events"),
        rows_before
    );
    assert_eq!(
        count(url, "SELECT count(*) FROM pipeline.batches"),
        batches_before
    );
    assert_eq!(open(url, "rejected"), rejected);
    let dry_malformed = quarantine(&s, &["replay", "--dry-run", "--kind", "malformed"]);
    assert_eq!(
        dry_malformed["malformed"], malformed,
        "malformed rows still do not parse"
    );
    assert_eq!(dry_malformed["kept"], 0);

    // The replay, in small batches, while the host runs.
    let done = quarantine(&s, &["replay", "--batch-size", "100"]);
    assert_eq!(done["rows"]["rejected"], rejected);
    assert_eq!(done["written"].as_u64().unwrap() as usize, want.len());
    assert!(done["batches"].as_u64().unwrap() >= (rejected as u64).div_ceil(100));
    assert_eq!(
        table(url),
        s.expected.rows,
        "the table holds the full expected set"
    );
    assert_eq!(open(url, "rejected"), 0);
    assert_eq!(
        open(url, "malformed"),
        malformed,
        "malformed rows stay open"
    );
    assert_replayed_rows_carry_their_batch(url, rejected);
    let batches: Vec<i64> = done["batch_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_i64().unwrap())
        .collect();
    assert_eq!(
        count(
            url,
            &format!(
                "SELECT count(DISTINCT replayed_batch) FROM pipeline.quarantine WHERE replayed_batch IN ({})",
                batches.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
            )
        ) as usize,
        batches.len()
    );

    // A second replay finds nothing to do.
    let batches_after = count(url, "SELECT count(*) FROM pipeline.batches");
    let again = quarantine(&s, &["replay"]);
    assert_eq!(again["batches"], 0);
    assert_eq!(again["written"], 0);
    assert_eq!(
        count(url, "SELECT count(*) FROM pipeline.batches"),
        batches_after
    );
    assert_eq!(table(url), s.expected.rows);
    let list = quarantine(&s, &["list"]);
    assert_eq!(list["open"], malformed);
    assert_eq!(list["replayed"], rejected);

    // The running host was neither blocked nor fenced: it takes new input.
    let extra: Vec<String> = (0..25).map(|i| row(3, 100 + i)).collect();
    write_csv(&s.input, "after_replay.csv", &extra);
    let total = s.expected.rows.len() as i64 + 25;
    running.wait_until("the running host to commit a file after the replay", || {
        count(url, "SELECT count(*) FROM ecommerce_events") == total
    });
    assert!(
        !running.exited(),
        "the host still runs:\n{}",
        running.log_tail()
    );
    running.stop();
}

#[test]
fn replay_killed_at_random_moments_and_run_again_ends_in_the_same_table() {
    let s = setup("quarantine_kill", "22", "600");
    let url = &s.url;
    let rejected = open(url, "rejected");
    let malformed = open(url, "malformed");
    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
    let mut interrupted = 0;
    for round in 0..6 {
        if open(url, "rejected") == 0 {
            break;
        }
        let mut replay = Running::spawn(
            quarantine_cmd(&s, &["replay", "--batch-size", "3"]),
            &s.dir.join(format!("replay{round}.log")),
        );
        let committed_before = count(
            url,
            "SELECT count(*) FROM pipeline.quarantine WHERE replayed_batch IS NOT NULL",
        );
        // The first round dies before or around its first commit, the
        // others some time after a commit of their own.
        if round > 0 {
            wait_until(PATIENCE, "the replay to commit a batch or end", || {
                replay.exited()
                    || count(
                        url,
                        "SELECT count(*) FROM pipeline.quarantine WHERE replayed_batch IS NOT NULL",
                    ) > committed_before
            });
        }
        let alive_for = Duration::from_millis(rng.random_range(0..150));
        let started = std::time::Instant::now();
        while started.elapsed() < alive_for && !replay.exited() {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !replay.exited() {
            interrupted += 1;
        }
        replay.kill(); // SIGKILL
        let committed = count(
            url,
            "SELECT count(*) FROM pipeline.quarantine WHERE replayed_batch IS NOT NULL",
        );
        assert!(committed >= committed_before);
        // Whatever was committed is whole: its rows are in the table.
        assert_eq!(
            count(
                url,
                "SELECT count(*) FROM pipeline.quarantine q WHERE replayed_batch IS NOT NULL
                 AND NOT EXISTS (SELECT 1 FROM ecommerce_events e WHERE e.event_id = q.event_id)"
            ),
            0,
            "a replayed row whose event is not in the table"
        );
    }
    assert!(interrupted > 0, "no kill landed while a replay ran");
    let done = quarantine(&s, &["replay", "--batch-size", "20"]);
    assert_eq!(table(url), s.expected.rows, "the same table as one run");
    assert_eq!(open(url, "rejected"), 0);
    assert_eq!(open(url, "malformed"), malformed);
    assert_replayed_rows_carry_their_batch(url, rejected);
    // What the last run found is what the kills left open.
    assert!(done["rows"]["rejected"].as_i64().unwrap_or(0) <= rejected);
    let again = quarantine(&s, &["replay"]);
    assert_eq!(again["batches"], 0);
}
