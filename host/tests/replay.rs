//! `host replay`: a candidate version of a stage run over stored input
//! beside the live one, without a database; its diff totals must equal
//! what the two versions' rules give for the same rows.

mod common;

use common::*;

/// What the marker fixture's v1 (live) and v2 (candidate) do to a row of
/// product `p`: v1 rejects 900, v2 rejects 901 and adds a cent to 902;
/// each marks the type with its version, so every row both keep changes.
#[derive(Debug, Default, PartialEq, Eq)]
struct Expected {
    kept_both: u64,
    changed: u64,
    live_only: u64,
    candidate_only: u64,
    live_rejected: u64,
    candidate_rejected: u64,
    event_type: u64,
    price_cents: u64,
}

fn expected_from_rules(products: impl Iterator<Item = i32>) -> Expected {
    let mut e = Expected::default();
    for p in products {
        match (p != 900, p != 901) {
            (true, true) => {
                e.kept_both += 1;
                e.changed += 1;
                e.event_type += 1;
                e.price_cents += u64::from(p == 902);
            }
            (true, false) => e.live_only += 1,
            (false, true) => e.candidate_only += 1,
            (false, false) => unreachable!(),
        }
        e.live_rejected += u64::from(p == 900);
        e.candidate_rejected += u64::from(p == 901);
    }
    e
}

#[test]
fn replay_of_a_candidate_counts_what_its_rules_change() {
    let dir = scratch("replay");
    let plugins = plugins_with(
        &dir,
        &[(&fixtures_dir().join("marker_v1.wasm"), "marker.wasm")],
        "[[stage]]\nname = \"marker\"\ncomponent = \"marker.wasm\"\n",
    );
    let input = dir.join("input");
    generate(
        &input,
        &[
            "--files",
            "3",
            "--events-per-file",
            "700",
            "--seed",
            "11",
            "--duplicate-rate",
            "0",
            "--invalid-rate",
            "0.02",
        ],
    );
    // The products the two versions treat differently, and some others.
    let special: Vec<String> = (0..90).map(|i| row(7, [900, 901, 902, 5][i % 4])).collect();
    write_csv(&input, "special.csv", &special);
    let stored = expected(&input);
    let want = expected_from_rules(stored.rows.values().map(|r| r.2));
    assert!(want.live_only >= 22 && want.candidate_only >= 22 && want.price_cents >= 22);

    let out = host()
        .args([
            "replay",
            "--input",
            &input.display().to_string(),
            "--component",
            &fixtures_dir().join("marker_v2.wasm").display().to_string(),
            "--stage",
            "marker",
            "--plugins",
            &plugins.display().to_string(),
            "--batch-size",
            "500",
            "--cache-dir",
            &cache_dir().display().to_string(),
            "--json",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    let c = &report["counts"];
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let got = Expected {
        kept_both: n(&c["kept_both"]),
        changed: n(&c["changed"]),
        live_only: n(&c["live_only"]),
        candidate_only: n(&c["candidate_only"]),
        live_rejected: n(&c["live_rejected"]),
        candidate_rejected: n(&c["candidate_rejected"]),
        event_type: n(&c["fields"]["event_type"]),
        price_cents: n(&c["fields"]["price_cents"]),
    };
    assert_eq!(got, want, "{report}");
    assert_eq!(n(&report["files"]), 4);
    assert_eq!(n(&report["malformed"]) as usize, stored.malformed);
    assert_eq!(n(&report["events"]) as usize, stored.rows.len());
    assert_eq!(n(&report["candidate_failed_batches"]), 0);
    // Samples of each kind say what differs.
    let samples = report["samples"].as_array().unwrap();
    for (kind, detail) in [
        ("changed", "event_type: "),
        (
            "live_only",
            "the candidate rejected it: product 901 is not sold_v2",
        ),
        (
            "candidate_only",
            "the live version rejected it: product 900 is not sold_v1",
        ),
    ] {
        assert!(
            samples
                .iter()
                .any(|s| s["kind"] == kind && s["detail"].as_str().unwrap().contains(detail)),
            "{kind}: {samples:?}"
        );
    }

    // The text form says the same, and a stage the manifest lacks is refused.
    let text_out = host()
        .args([
            "replay",
            "--input",
            &input.display().to_string(),
            "--component",
            &fixtures_dir().join("marker_v2.wasm").display().to_string(),
            "--stage",
            "marker",
            "--plugins",
            &plugins.display().to_string(),
            "--cache-dir",
            &cache_dir().display().to_string(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text_out.stdout);
    assert!(
        text.contains(&format!("kept by live only:      {}", want.live_only)),
        "{text}"
    );
    let wrong = host()
        .args([
            "replay",
            "--input",
            &input.display().to_string(),
            "--component",
            &fixtures_dir().join("marker_v2.wasm").display().to_string(),
            "--stage",
            "dedup",
            "--plugins",
            &plugins.display().to_string(),
            "--cache-dir",
            "off",
        ])
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr)
            .contains("has no stage \"dedup\"; its stages: marker"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
}
