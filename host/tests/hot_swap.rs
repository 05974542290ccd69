//! Hot swap while the pipeline runs: no row lost or doubled, every batch
//! processed wholly by one version, the batch records agreeing with the
//! rows, and stage state handed over.

mod common;

use std::path::Path;

use common::*;

fn start(plugins: &Path, input: &Path, url: &str, state: &Path) -> Running {
    let mut cmd = host();
    cmd.args(run_args(plugins, input, url, state)).args([
        "--batch-size",
        "50",
        "--snapshot-interval",
        "0",
    ]);
    std::fs::create_dir_all(state).unwrap();
    Running::spawn(cmd, &state.join("host.log"))
}

fn install(from: &Path, plugins: &Path, name: &str) {
    let tmp = plugins.join(format!(".{name}.tmp"));
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(tmp, plugins.join(name)).unwrap();
}

/// Writes a file of ten fresh events and waits until the table holds `total`.
fn feed_ten(input: &Path, url: &str, name: &str, total: i64) {
    write_csv(input, name, &(0..10).map(|_| row(1, 1)).collect::<Vec<_>>());
    wait_for_rows(url, total);
}

fn sha256(path: &Path) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn swapping_versions_mid_stream_marks_every_row_by_exactly_one_version() {
    let dir = scratch("swap");
    let (v1, v2) = (
        fixtures_dir().join("marker_v1.wasm"),
        fixtures_dir().join("marker_v2.wasm"),
    );
    let plugins = plugins_with(
        &dir,
        &[(&v1, "marker.wasm")],
        "[[stage]]\nname = \"marker\"\ncomponent = \"marker.wasm\"\n",
    );
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    let url = fresh_db("swap");
    let mut child = start(&plugins, &input, &url, &dir.join("state"));

    let rounds = 6;
    for round in 0..rounds {
        let rows: Vec<String> = (0..200).map(|_| row(1, 1)).collect();
        write_csv(&input, &format!("f{round}.csv"), &rows);
        wait_for_rows(&url, 200 * (round + 1) as i64 / 2);
        install(
            if round % 2 == 0 { &v2 } else { &v1 },
            &plugins,
            "marker.wasm",
        );
        // Every round changes the version: wait for it to be live.
        child.wait_for_log("stage plan ready", round + 1);
    }
    write_csv(
        &input,
        "last.csv",
        &(0..200).map(|_| row(1, 1)).collect::<Vec<_>>(),
    );
    wait_for_rows(&url, 200 * (rounds + 1) as i64);
    let log = child.stop();

    let total = 200 * (rounds + 1) as i64;
    assert_eq!(count(&url, "SELECT count(*) FROM ecommerce_events"), total);
    let v1_rows = count(
        &url,
        "SELECT count(*) FROM ecommerce_events WHERE event_type = 'view_v1'",
    );
    let v2_rows = count(
        &url,
        "SELECT count(*) FROM ecommerce_events WHERE event_type = 'view_v2'",
    );
    assert_eq!(
        v1_rows + v2_rows,
        total,
        "every row marked by exactly one version"
    );
    assert!(
        v1_rows > 0 && v2_rows > 0,
        "both versions ran: v1 {v1_rows}, v2 {v2_rows}\n{log}"
    );
    for (path, rows) in [(&v1, v1_rows), (&v2, v2_rows)] {
        let hash = sha256(path);
        let written = count(
            &url,
            &format!("SELECT coalesce(sum(rows_written), 0) FROM pipeline.batches WHERE stages->0->>'hash' = '{hash}'"),
        );
        assert_eq!(
            written,
            rows,
            "batch records agree with the marks for {}",
            path.display()
        );
    }
    assert!(log.contains("stage version swapped in"), "{log}");
}

#[test]
fn dedup_state_survives_a_swap() {
    let dir = scratch("dedup-swap");
    let dedup = plugins_dir().join("dedup.wasm");
    let manifest = |window: u32| {
        format!("[[stage]]\nname = \"dedup\"\ncomponent = \"dedup.wasm\"\n[stage.config]\nwindow-events = \"{window}\"\n")
    };
    let plugins = plugins_with(&dir, &[(&dedup, "dedup.wasm")], &manifest(100_000));
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    let url = fresh_db("dedup_swap");
    let mut child = start(&plugins, &input, &url, &dir.join("state"));

    let first: Vec<String> = (0..20).map(|_| row(1, 1)).collect();
    write_csv(&input, "a.csv", &first);
    wait_for_rows(&url, 20);
    // A config change makes a new instance, which must get the old state.
    std::fs::write(plugins.join("pipeline.toml"), manifest(99_999)).unwrap();
    child.wait_for_log("stage plan ready", 1);
    let mut second: Vec<String> = (0..10).map(|_| row(1, 1)).collect();
    second.push(first[5].clone());
    write_csv(&input, "b.csv", &second);
    wait_for_rows(&url, 30);
    let log = child.stop();

    assert_eq!(count(&url, "SELECT count(*) FROM ecommerce_events"), 30);
    assert_eq!(
        count(
            &url,
            "SELECT coalesce(sum(rows_dropped), 0) FROM pipeline.batches"
        ),
        1,
        "dedup dropped the repeat\n{log}"
    );
    assert_eq!(
        count(
            &url,
            "SELECT coalesce(sum(rows_conflicting), 0) FROM pipeline.batches"
        ),
        0,
        "not left to the primary key"
    );
    assert!(log.contains("stage version swapped in"), "{log}");
}

#[test]
fn a_broken_component_is_rejected_and_the_old_version_keeps_running() {
    let dir = scratch("reject");
    let v1 = fixtures_dir().join("marker_v1.wasm");
    let plugins = plugins_with(
        &dir,
        &[(&v1, "marker.wasm")],
        "[[stage]]\nname = \"marker\"\ncomponent = \"marker.wasm\"\n",
    );
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    let url = fresh_db("reject");
    let mut child = start(&plugins, &input, &url, &dir.join("state"));

    feed_ten(&input, &url, "a.csv", 10);
    // Garbage, then a component of the wrong world, then one that fails every batch.
    let garbage = dir.join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm not really").unwrap();
    let faulty_plugins = [garbage, fixtures_dir().join("wrong_world.wasm")];
    for (i, bad) in faulty_plugins.iter().enumerate() {
        install(bad, &plugins, "marker.wasm");
        child.wait_for_log("component rejected", i + 1);
        feed_ten(&input, &url, &format!("b{i}.csv"), 20 + 10 * i as i64);
    }
    // A component that fails its first batch is rolled back.
    std::fs::copy(
        fixtures_dir().join("faulty.wasm"),
        plugins.join("faulty.wasm"),
    )
    .unwrap();
    std::fs::write(
        plugins.join("pipeline.toml"),
        "[[stage]]\nname = \"marker\"\ncomponent = \"faulty.wasm\"\n[stage.config]\nmode = \"fail\"\n",
    )
    .unwrap();
    child.wait_for_log("stage plan ready", 1);
    feed_ten(&input, &url, "c.csv", 40);
    child.wait_for_log("failed its first batch", 1);
    // Fixing the file is picked up.
    install(
        &fixtures_dir().join("marker_v2.wasm"),
        &plugins,
        "marker.wasm",
    );
    std::fs::write(
        plugins.join("pipeline.toml"),
        "[[stage]]\nname = \"marker\"\ncomponent = \"marker.wasm\"\n",
    )
    .unwrap();
    child.wait_for_log("stage plan ready", 2);
    feed_ten(&input, &url, "d.csv", 50);
    let log = child.stop();

    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM ecommerce_events WHERE event_type = 'view_v1'"
        ),
        40,
        "{log}"
    );
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM ecommerce_events WHERE event_type = 'view_v2'"
        ),
        10,
        "{log}"
    );
    assert_eq!(count(&url, "SELECT count(*) FROM pipeline.quarantine"), 0);
    assert!(log.contains("not a valid WebAssembly component"), "{log}");
    assert!(
        log.contains("does not export the `stage` interface"),
        "{log}"
    );
    assert!(log.contains("failed its first batch"), "{log}");
}

/// Waits until `sql` (a single count) reaches `n`.
fn wait_for_count(url: &str, sql: &str, n: i64) {
    let ready = || query(url, "SELECT to_regclass('pipeline.batches')::text")[0][0].is_some();
    wait_for(
        &format!("{sql} to reach {n}"),
        || if ready() { count(url, sql) } else { 0 },
        |got| *got >= n,
    );
}

/// Rows for the marker's rules: products 1 (marked only), 900 (v1
/// rejects), 901 (v2 rejects), 902 (v2 adds a cent), in turn.
fn marker_rows(n: usize) -> Vec<(String, i32)> {
    let products = [1, 900, 901, 902, 1];
    (0..n)
        .map(|i| {
            let product = products[i % products.len()];
            (row(1, product), product)
        })
        .collect()
}

fn id_of(row: &str) -> String {
    row.split(',').next().unwrap().to_owned()
}

/// Shadow diff counts a test expects, from the marker's rules alone.
#[derive(Debug, Default, PartialEq, Eq)]
struct Diff {
    rows_in: i64,
    kept_both: i64,
    changed: i64,
    live_only: i64,
    candidate_only: i64,
    live_rejected: i64,
    candidate_rejected: i64,
    event_type: i64,
    price_cents: i64,
}

/// v1 live, v2 candidate: what differs, row by row.
fn expected_v1_v2(products: impl Iterator<Item = i32>) -> Diff {
    let mut d = Diff::default();
    for p in products {
        d.rows_in += 1;
        let (v1_keeps, v2_keeps) = (p != 900, p != 901);
        match (v1_keeps, v2_keeps) {
            (true, true) => {
                d.kept_both += 1;
                d.changed += 1; // the marks differ
                d.event_type += 1;
                if p == 902 {
                    d.price_cents += 1;
                }
            }
            (true, false) => d.live_only += 1,
            (false, true) => d.candidate_only += 1,
            (false, false) => unreachable!(),
        }
        d.live_rejected += i64::from(!v1_keeps);
        d.candidate_rejected += i64::from(!v2_keeps);
    }
    d
}

fn recorded_diff(url: &str, filter: &str) -> Diff {
    let r = &query(
        url,
        &format!(
            "SELECT sum(rows_in), sum(kept_both), sum(changed), sum(live_only), sum(candidate_only),
                    sum(live_rejected), sum(candidate_rejected),
                    coalesce(sum((field_changes->>'event_type')::int), 0),
                    coalesce(sum((field_changes->>'price_cents')::int), 0)
             FROM pipeline.shadow_diffs WHERE {filter}"
        ),
    )[0];
    let n = |i: usize| r[i].as_deref().unwrap_or("0").parse::<i64>().unwrap();
    Diff {
        rows_in: n(0),
        kept_both: n(1),
        changed: n(2),
        live_only: n(3),
        candidate_only: n(4),
        live_rejected: n(5),
        candidate_rejected: n(6),
        event_type: n(7),
        price_cents: n(8),
    }
}

/// The count in a marker snapshot (`MARK`, format byte, u64 LE).
fn marker_state(url: &str) -> (u8, u64) {
    let hex = query(
        url,
        "SELECT encode(state, 'hex') FROM pipeline.stage_state WHERE stage = 'marker'",
    )[0][0]
        .clone()
        .unwrap();
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    assert_eq!(&bytes[..4], b"MARK");
    (
        bytes[4],
        u64::from_le_bytes(bytes[5..13].try_into().unwrap()),
    )
}

#[test]
fn a_shadow_candidate_is_compared_on_every_batch_then_promoted() {
    let dir = scratch("shadow");
    let (v1, v2) = (
        fixtures_dir().join("marker_v1.wasm"),
        fixtures_dir().join("marker_v2.wasm"),
    );
    let plugins = plugins_with(
        &dir,
        &[(&v1, "marker.wasm"), (&v2, "marker_v2.wasm")],
        "# the marker stage\n[[stage]]\nname = \"marker\"\ncomponent = \"marker.wasm\"  # live\nshadow = \"marker_v2.wasm\"\n",
    );
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    let url = fresh_db("shadow");
    let rows_in = "SELECT coalesce(sum(rows_in), 0) FROM pipeline.batches";

    // Phase 1: v1 live, v2 in shadow.
    let mut phase1 = Vec::new();
    for f in 0..4 {
        let rows = marker_rows(100);
        write_csv(
            &input,
            &format!("a{f}.csv"),
            &rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
        );
        phase1.extend(rows);
    }
    // Phase 1 as a backfill: `--once` hands every batch to the candidate
    // (a streaming host skips a batch while its candidate is busy, so the
    // diffs would depend on timing).
    run_once(
        &plugins,
        &input,
        &url,
        &dir.join("state"),
        &["--batch-size", "50", "--snapshot-interval", "0"],
    );
    let mut child = start(&plugins, &input, &url, &dir.join("state"));

    let expected = expected_v1_v2(phase1.iter().map(|r| r.1));
    let recorded = recorded_diff(&url, "true");
    assert_eq!(recorded, expected, "diffs agree with the marker's rules");
    let (h1, h2) = (sha256(&v1), sha256(&v2));
    assert_eq!(
        count(&url, "SELECT count(*) FROM pipeline.batches WHERE rows_in > 0"),
        count(
            &url,
            &format!("SELECT count(*) FROM pipeline.shadow_diffs WHERE live_hash = '{h1}' AND candidate_hash = '{h2}' AND error IS NULL")
        ),
        "one diff per batch, naming both versions"
    );
    // Only the live version's output reached the table.
    let kept1 = phase1.iter().filter(|r| r.1 != 900).count() as i64;
    assert_eq!(count(&url, "SELECT count(*) FROM ecommerce_events"), kept1);
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM ecommerce_events WHERE event_type <> 'view_v1'"
        ),
        0
    );
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM ecommerce_events WHERE product_id = 902 AND price <> 9.99"
        ),
        0
    );

    // Promote: the manifest is rewritten and the watcher swaps v2 in.
    let out = host()
        .args(["plugins", "promote", "marker", "--plugins"])
        .arg(&plugins)
        .arg("--cache-dir")
        .arg(cache_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("promoted marker"), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(plugins.join("pipeline.toml")).unwrap(),
        "# the marker stage\n[[stage]]\nname = \"marker\"\ncomponent = \"marker_v2.wasm\"  # live\n"
    );
    child.wait_for_log("stage plan ready", 1);

    // Phase 2: v2 live, no shadow.
    let mut phase2 = Vec::new();
    for f in 0..2 {
        let rows = marker_rows(100);
        write_csv(
            &input,
            &format!("b{f}.csv"),
            &rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
        );
        phase2.extend(rows);
    }
    wait_for_count(&url, rows_in, (phase1.len() + phase2.len()) as i64);
    let log = child.stop();

    let kept2 = phase2.iter().filter(|r| r.1 != 901).count() as i64;
    let table = table(&url);
    let mut expected_ids: Vec<String> = phase1
        .iter()
        .filter(|r| r.1 != 900)
        .chain(phase2.iter().filter(|r| r.1 != 901))
        .map(|r| id_of(&r.0))
        .collect();
    expected_ids.sort();
    assert_eq!(
        table.keys().cloned().collect::<Vec<_>>(),
        expected_ids,
        "nothing lost or doubled\n{log}"
    );
    for (id, product) in &phase2 {
        if let Some(row) = table.get(&id_of(id)) {
            assert_eq!(row.1, "view_v2", "phase 2 is written by v2\n{log}");
            let price = if *product == 902 { "10.00" } else { "9.99" };
            assert_eq!(row.3, price);
        }
    }
    for (hash, kept) in [(&h1, kept1), (&h2, kept2)] {
        assert_eq!(
            count(
                &url,
                &format!("SELECT coalesce(sum(rows_written), 0) FROM pipeline.batches WHERE stages->0->>'hash' = '{hash}'")
            ),
            kept,
            "batch records agree with the rows"
        );
    }
    assert_eq!(
        count(&url, &format!("SELECT count(*) FROM pipeline.shadow_diffs d JOIN pipeline.batches b USING (batch_id) WHERE b.stages->0->>'hash' = '{h2}'")),
        0,
        "no shadow after the promotion"
    );
    assert_eq!(
        count(
            &url,
            &format!("SELECT count(*) FROM pipeline.plugin_events WHERE stage = 'marker' AND kind = 'promoted' AND hash = '{h2}'")
        ),
        1,
        "{log}"
    );
    // The live state was handed over: v2 went on counting from v1's count.
    assert_eq!(
        marker_state(&url),
        (1, (phase1.len() + phase2.len()) as u64)
    );
    assert!(log.contains("shadow candidate promoted"), "{log}");
}

#[test]
fn a_shadow_candidate_that_traps_never_affects_the_live_path() {
    let dir = scratch("shadow-trap");
    let plugins = plugins_with(
        &dir,
        &[
            (&fixtures_dir().join("marker_v1.wasm"), "marker.wasm"),
            (&fixtures_dir().join("faulty.wasm"), "faulty.wasm"),
        ],
        // faulty traps on any batch holding product 13; marker ignores `mode`.
        "[[stage]]\nname = \"marker\"\ncomponent = \"marker.wasm\"\nshadow = \"faulty.wasm\"\n[stage.config]\nmode = \"trap\"\n",
    );
    let input = dir.join("input");
    let mut first: Vec<String> = (0..10).map(|_| row(1, 1)).collect();
    first[3] = row(1, 13);
    write_csv(&input, "a.csv", &first);
    write_csv(
        &input,
        "b.csv",
        &(0..10).map(|_| row(1, 1)).collect::<Vec<_>>(),
    );
    let url = fresh_db("shadow_trap");
    let out = run_once(
        &plugins,
        &input,
        &url,
        &dir.join("state"),
        &["--batch-size", "10"],
    );
    let log = String::from_utf8_lossy(&out.stderr);

    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM ecommerce_events WHERE event_type = 'view_v1'"
        ),
        20,
        "every row written by the live version\n{log}"
    );
    assert_eq!(count(&url, "SELECT count(*) FROM pipeline.quarantine"), 0);
    let diffs = query(
        &url,
        "SELECT rows_in, kept_both, changed, error FROM pipeline.shadow_diffs ORDER BY batch_id",
    );
    assert_eq!(diffs.len(), 2, "{diffs:?}");
    assert_eq!(diffs[0][1], None, "no counts for the failed batch");
    let error = diffs[0][3].clone().unwrap_or_default();
    assert!(error.contains("trapped"), "{error}");
    // The next batch runs on a fresh candidate instance.
    assert_eq!(
        diffs[1],
        vec![
            Some("10".into()),
            Some("10".into()),
            Some("10".into()),
            None
        ]
    );
    assert!(log.contains("shadow candidate failed"), "{log}");
}

#[test]
fn refuse_swap_keeps_the_old_version_and_reset_starts_the_new_one_empty() {
    let dir = scratch("incompatible");
    let (v1, v3) = (
        fixtures_dir().join("marker_v1.wasm"),
        fixtures_dir().join("marker_v3.wasm"),
    );
    let manifest = |policy: &str| {
        format!("[[stage]]\nname = \"marker\"\ncomponent = \"marker.wasm\"\non-incompatible-state = \"{policy}\"\n")
    };
    let plugins = plugins_with(&dir, &[(&v1, "marker.wasm")], &manifest("refuse-swap"));
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    let url = fresh_db("incompatible");
    let mut child = start(&plugins, &input, &url, &dir.join("state"));

    feed_ten(&input, &url, "a.csv", 10);
    // v3 cannot read v1's state: refused, v1 goes on.
    install(&v3, &plugins, "marker.wasm");
    child.wait_for_log("stage plan ready", 1);
    feed_ten(&input, &url, "b.csv", 20);
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM ecommerce_events WHERE event_type = 'view_v1'"
        ),
        20
    );
    // With reset, the same file is swapped in and starts empty.
    std::fs::write(plugins.join("pipeline.toml"), manifest("reset")).unwrap();
    child.wait_for_log("stage plan ready", 2);
    feed_ten(&input, &url, "c.csv", 30);
    let log = child.stop();

    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM ecommerce_events WHERE event_type = 'view_v3'"
        ),
        10,
        "{log}"
    );
    let h3 = sha256(&v3);
    let refused = query(
        &url,
        &format!("SELECT reason FROM pipeline.plugin_events WHERE stage = 'marker' AND kind = 'rejected' AND hash = '{h3}'"),
    );
    assert_eq!(refused.len(), 1, "{log}");
    let reason = refused[0][0].clone().unwrap();
    assert!(
        reason.contains("not a marker snapshot of format 2") && reason.contains("refuse-swap"),
        "{reason}"
    );
    assert!(log.contains("not a marker snapshot of format 2"), "{log}");
    assert_eq!(
        count(
            &url,
            &format!("SELECT count(*) FROM pipeline.plugin_events WHERE stage = 'marker' AND kind = 'swapped_in' AND hash = '{h3}'")
        ),
        1
    );
    // Reset: v3's state counts only what it saw itself.
    assert_eq!(marker_state(&url), (2, 10));

    // `host plugins` shows the history from the database.
    let out = host()
        .args(["plugins", "--plugins"])
        .arg(&plugins)
        .args(["--database-url", &url, "--cache-dir"])
        .arg(cache_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("last swap   swapped_in"), "{text}");
    assert!(
        text.contains("last reject rejected") && text.contains("refuse-swap"),
        "{text}"
    );
}

#[test]
fn host_plugins_lists_stages_and_what_the_database_committed() {
    let dir = scratch("plugins-list");
    let (v1, v2) = (
        fixtures_dir().join("marker_v1.wasm"),
        fixtures_dir().join("marker_v2.wasm"),
    );
    let plugins = plugins_with(
        &dir,
        &[
            (&v1, "marker.wasm"),
            (&v2, "marker_v2.wasm"),
            (&fixtures_dir().join("faulty.wasm"), "faulty.wasm"),
        ],
        "[[stage]]\nname = \"marker\"\ncomponent = \"marker.wasm\"\nshadow = \"marker_v2.wasm\"\nversion = \"1.0\"\n\n\
         [[stage]]\nname = \"pass\"\ncomponent = \"faulty.wasm\"\ngrants = [\"clock\"]\nlimits = { memory = \"64MiB\", time-per-batch = \"250ms\" }\n\
         on-incompatible-state = \"refuse-swap\"\n[stage.config]\nmode = \"pass\"\n",
    );
    let list = |extra: &[&str]| {
        let out = host()
            .args(["plugins", "--plugins"])
            .arg(&plugins)
            .arg("--cache-dir")
            .arg(cache_dir())
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };

    // Without a database: the manifest and the components only.
    let (ok, text) = list(&[]);
    assert!(ok, "{text}");
    let (h1, h2) = (sha256(&v1), sha256(&v2));
    for expected in [
        "2 stage(s), in order",
        "1. marker",
        "2. pass",
        &format!("sha256      {h1}"),
        &format!("sha256      {h2}"),
        "version     1.0",
        "loads       yes, type-checks against ecommerce:pipeline@0.1.1",
        "limits      memory 64 MiB, time per batch 250 ms",
        "grants      clock",
        "config      mode=pass",
        "on incompatible state: refuse-swap",
        "shadow      none",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
    assert!(text.find("1. marker") < text.find("2. pass"));
    assert!(!text.contains("committed"), "{text}");

    // With a database the pipeline wrote to.
    let input = dir.join("input");
    write_csv(
        &input,
        "a.csv",
        &(0..10).map(|_| row(1, 1)).collect::<Vec<_>>(),
    );
    let url = fresh_db("plugins_list");
    run_once(&plugins, &input, &url, &dir.join("state"), &[]);
    let (ok, text) = list(&["--database-url", &url]);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("committed   version 1.0 ({}) in batch", &h1[..12])),
        "{text}"
    );
    assert!(
        text.contains("shadow diff 1 batches (0 failed), 10 rows in: kept by both 10 (changed 10)"),
        "{text}"
    );
    let (ok, json) = list(&["--database-url", &url, "--json"]);
    assert!(ok, "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["stages"][0]["component"]["hash"], h1.as_str());
    assert_eq!(v["stages"][0]["shadow"]["hash"], h2.as_str());
    assert_eq!(v["stages"][1]["grants"][0], "clock");
    assert_eq!(
        v["stages"][0]["database"]["last_batch"]["hash"],
        h1.as_str()
    );

    // A component that does not load is named, and the exit status says so.
    std::fs::write(plugins.join("faulty.wasm"), b"\0asm broken").unwrap();
    let (ok, text) = list(&[]);
    assert!(!ok);
    assert!(
        text.contains("loads       NO: component")
            && text.contains("not a valid WebAssembly component"),
        "{text}"
    );
}
