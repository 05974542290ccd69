//! WIT versioning, end to end: a plugin built for a later patch release of
//! `ecommerce:pipeline` (0.1.9, with a new type and a new function) loads
//! and runs in this 0.1.1 host, through `host plugin test` and
//! `host run --once`; plugins built for 0.2.0 or 1.0.0 are refused with a
//! message naming the version they target and the versions the host
//! supports, at start and on a hot swap (where the old version keeps
//! running and a later swap to the 0.1.9 plugin goes through). The
//! components are real, built from
//! `host/tests/fixtures/plugins/{wit_patch,wit_next}` against the WIT
//! copies beside them (`wit-0.1.9`, `wit-0.2.0`, `wit-1.0.0`).

mod common;

use std::path::Path;

use common::*;

fn sample(dir: &std::path::Path) -> std::path::PathBuf {
    let sample = dir.join("sample.csv");
    std::fs::write(
        &sample,
        "event_id,user_id,event_type,product_id,price,event_time\n\
         11111111-1111-4111-8111-111111111111,1,view,2,3.00,2026-01-05T00:00:00Z\n\
         22222222-2222-4222-8222-222222222222,11,purchase,2,3.00,2026-01-05T00:00:00Z\n",
    )
    .unwrap();
    sample
}

fn plugin_test(
    component: &std::path::Path,
    input: &std::path::Path,
    cache: &std::path::Path,
) -> std::process::Output {
    host()
        .args([
            "plugin",
            "test",
            &component.display().to_string(),
            "--input",
            &input.display().to_string(),
            "--cache-dir",
            &cache.display().to_string(),
        ])
        .output()
        .unwrap()
}

#[test]
fn a_plugin_for_a_later_patch_release_loads_and_runs() {
    let dir = scratch("wit-patch");
    let component = fixtures_dir().join("wit_0.1.9.wasm");
    let input = sample(&dir);
    // Twice with an empty cache of its own: compiled, then deserialised
    // (the semver-aware export map must survive the compile cache).
    let cache = dir.join("cache");
    for round in ["compiled", "cached"] {
        let out = plugin_test(&component, &input, &cache);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{round}: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains(
                "built for ecommerce:pipeline@0.1.9; this host implements ecommerce:pipeline@0.1.1"
            ),
            "{round}: {text}"
        );
        assert!(
            text.contains("changed  11111111-1111-4111-8111-111111111111  user_id: 1 -> 11"),
            "{round}: {text}"
        );
        assert!(
            text.contains("kept     22222222-2222-4222-8222-222222222222"),
            "{round}: {text}"
        );
        assert!(
            text.contains("2 events: 1 kept, 1 changed"),
            "{round}: {text}"
        );
    }

    // In a chain after the 0.1.1 transform (which takes batches in
    // columns): versions mix freely.
    let plugins = plugins_with(
        &dir,
        &[
            (&plugins_dir().join("transform.wasm"), "transform.wasm"),
            (&component, "patch.wasm"),
        ],
        r#"
[[stage]]
name = "transform"
component = "transform.wasm"
grants = ["clock"]

[[stage]]
name = "patch"
component = "patch.wasm"
"#,
    );
    let input = dir.join("input");
    generate(
        &input,
        &["--files", "2", "--events-per-file", "300", "--seed", "11"],
    );
    let url = fresh_db("wit_patch");
    run_once(&plugins, &input, &url, &dir.join("state"), &[]);
    let expected = expected(&input);
    let actual = table(&url);
    assert_eq!(actual.len(), expected.rows.len());
    for (id, (_, kind, product, price, time)) in &expected.rows {
        let row = actual.get(id).unwrap_or_else(|| panic!("{id} missing"));
        assert_eq!(row.0, 11, "user_id of {id} set by the 0.1.9 stage");
        assert_eq!(
            (&row.1, row.2, &row.3, &row.4),
            (kind, *product, price, time)
        );
    }
    let recorded = count(
        &url,
        "SELECT count(*) FROM pipeline.batches, jsonb_array_elements(stages) s WHERE s->>'name' = 'patch'",
    );
    assert!(recorded > 0, "batch records name the 0.1.9 stage");
}

#[test]
fn plugins_for_other_versions_are_refused_with_the_versions() {
    let dir = scratch("wit-next");
    let input = sample(&dir);
    for version in ["0.2.0", "1.0.0"] {
        let component = fixtures_dir().join(format!("wit_{version}.wasm"));
        let out = plugin_test(&component, &input, &cache_dir());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{version} must be refused");
        assert!(
            stderr.contains(&format!(
                "targets ecommerce:pipeline@{version} (it exports `ecommerce:pipeline/stage@{version}`)"
            )),
            "{version}: {stderr}"
        );
        assert!(
            stderr.contains(
                "it supports ecommerce:pipeline 0.1.x (0.1.0 and any later 0.1 patch release)"
            ),
            "{version}: {stderr}"
        );
        assert!(
            stderr.contains("Rebuild the plugin against this host's wit/pipeline.wit (ecommerce:pipeline@0.1.1)"),
            "{version}: {stderr}"
        );
    }

    // `host run` refuses to start with it, with the same message.
    let plugins = plugins_with(
        &dir,
        &[(&fixtures_dir().join("wit_0.2.0.wasm"), "next.wasm")],
        "[[stage]]\nname = \"next\"\ncomponent = \"next.wasm\"\n",
    );
    let input_dir = dir.join("input");
    generate(&input_dir, &["--files", "1", "--events-per-file", "10"]);
    let url = fresh_db("wit_next");
    let out = host()
        .args(run_args(&plugins, &input_dir, &url, &dir.join("state")))
        .arg("--once")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "host run must refuse a 0.2.0 stage");
    assert!(
        stderr.contains("targets ecommerce:pipeline@0.2.0"),
        "{stderr}"
    );
}

/// Writes a file of ten fresh events and waits until the table holds `total`.
fn feed_ten(input: &Path, url: &str, name: &str, total: i64) {
    write_csv(input, name, &(0..10).map(|_| row(1, 1)).collect::<Vec<_>>());
    wait_for_rows(url, total);
}

fn install(from: &Path, plugins: &Path, name: &str) {
    let tmp = plugins.join(format!(".{name}.tmp"));
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(tmp, plugins.join(name)).unwrap();
}

#[test]
fn a_hot_swap_refuses_0_2_0_and_takes_0_1_9() {
    let dir = scratch("wit-swap");
    let plugins = plugins_with(
        &dir,
        &[(&fixtures_dir().join("marker_v1.wasm"), "stage.wasm")],
        "[[stage]]\nname = \"stage\"\ncomponent = \"stage.wasm\"\n",
    );
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    let url = fresh_db("wit_swap");
    let mut cmd = host();
    cmd.args(run_args(&plugins, &input, &url, &dir.join("state")))
        .args(["--batch-size", "50"]);
    let mut child = Running::spawn(cmd, &dir.join("host.log"));

    feed_ten(&input, &url, "a.csv", 10);
    install(
        &fixtures_dir().join("wit_0.2.0.wasm"),
        &plugins,
        "stage.wasm",
    );
    child.wait_for_log("component rejected", 1);
    feed_ten(&input, &url, "b.csv", 20);
    install(
        &fixtures_dir().join("wit_0.1.9.wasm"),
        &plugins,
        "stage.wasm",
    );
    child.wait_for_log("stage plan ready", 1);
    feed_ten(&input, &url, "c.csv", 30);

    let log = child.stop();
    assert!(
        log.contains("targets ecommerce:pipeline@0.2.0"),
        "the refusal is logged: {log}"
    );
    // 0.1.1 marker for the first 20 (the 0.2.0 swap was refused), then 0.1.9.
    let by = |sql: &str| {
        count(
            &url,
            &format!("SELECT count(*) FROM ecommerce_events WHERE {sql}"),
        )
    };
    assert_eq!(by("event_type = 'view_v1' AND user_id = 1"), 20, "{log}");
    assert_eq!(by("event_type = 'view' AND user_id = 11"), 10, "{log}");
}
