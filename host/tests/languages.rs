//! Stages in three languages run by the real host: one pipeline whose
//! stages are written in Rust (transform), Python (currency conversion)
//! and JavaScript (user-id bucketing), checked row by row; and one
//! transform, the currency conversion, written in all three languages,
//! whose outputs must be identical row by row, rejections and config
//! errors included.

mod common;

use common::*;

fn bucket(user: i32, buckets: i64) -> i64 {
    ((user as i64 * 2_654_435_761) % 4_294_967_296) % buckets + 1
}

#[test]
fn rust_python_and_javascript_stages_in_one_chain() {
    let dir = scratch("languages");
    let built = plugins_dir();
    for name in ["currency.wasm", "mask_users.wasm"] {
        assert!(
            built.join(name).exists(),
            "{name} is built by `make plugins`"
        );
    }
    let plugins = plugins_with(
        &dir,
        &[
            (&built.join("transform.wasm"), "transform.wasm"),
            (&built.join("currency.wasm"), "currency.wasm"),
            (&built.join("mask_users.wasm"), "mask_users.wasm"),
        ],
        r#"
[[stage]]
name = "transform"
component = "transform.wasm"
grants = ["clock"]

[[stage]]
name = "currency"
component = "currency.wasm"
[stage.config]
rates = "USD:1.0,EUR:0.92"
target-currency = "EUR"

[[stage]]
name = "mask_users"
component = "mask_users.wasm"
[stage.config]
buckets = "100"
drop-event-types = "remove_from_cart"
"#,
    );
    let input = dir.join("input");
    generate(
        &input,
        &[
            "--files",
            "3",
            "--events-per-file",
            "400",
            "--seed",
            "5",
            "--duplicate-rate",
            "0",
        ],
    );
    let url = fresh_db("languages");
    run_once(&plugins, &input, &url, &dir.join("state"), &[]);

    let expected = expected(&input);
    let actual = table(&url);
    let mut kept = 0;
    for (id, (user, kind, product, price, time)) in &expected.rows {
        if kind == "remove_from_cart" {
            assert!(!actual.contains_key(id), "{id} was dropped by the JS stage");
            continue;
        }
        kept += 1;
        let (whole, cents) = price.split_once('.').unwrap();
        let usd_cents: i64 = whole.parse::<i64>().unwrap() * 100 + cents.parse::<i64>().unwrap();
        // EUR = USD * 0.92, rounded half to even to the cent.
        let scaled = usd_cents * 92;
        let (q, r) = (scaled / 100, scaled % 100);
        let eur = if r > 50 || (r == 50 && q % 2 == 1) {
            q + 1
        } else {
            q
        };
        let row = actual.get(id).unwrap_or_else(|| panic!("{id} missing"));
        assert_eq!(row.0 as i64, bucket(*user, 100), "user bucket of {id}");
        assert_eq!(&row.1, kind);
        assert_eq!(row.2, *product);
        assert_eq!(
            row.3,
            format!("{}.{:02}", eur / 100, eur % 100),
            "price of {id}"
        );
        assert_eq!(&row.4, time);
    }
    assert_eq!(actual.len(), kept);
    assert!(kept > 1000);
}

#[test]
fn plugin_test_shows_each_row_and_fails_on_a_bad_component() {
    let dir = scratch("plugin-test");
    let sample = dir.join("sample.csv");
    std::fs::write(
        &sample,
        "event_id,user_id,event_type,product_id,price,event_time\n\
         11111111-1111-4111-8111-111111111111,1,AddToCart,2,3.00,2026-01-05T00:00:00Z\n\
         22222222-2222-4222-8222-222222222222,1,view,2,3.00,2026-01-05T00:00:00Z\n\
         33333333-3333-4333-8333-333333333333,1,refund,2,3.00,2026-01-05T00:00:00Z\n\
         not-a-row\n",
    )
    .unwrap();
    let transform = plugins_dir().join("transform.wasm");
    let out = host()
        .args([
            "plugin",
            "test",
            &transform.display().to_string(),
            "--input",
            &sample.display().to_string(),
            "--grant",
            "clock",
            "--cache-dir",
            &cache_dir().display().to_string(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("changed  11111111-1111-4111-8111-111111111111  event_type: \"AddToCart\" -> \"add_to_cart\""), "{text}");
    assert!(
        text.contains("kept     22222222-2222-4222-8222-222222222222"),
        "{text}"
    );
    assert!(
        text.contains(
            "rejected 33333333-3333-4333-8333-333333333333: event_type \"refund\" is not allowed"
        ),
        "{text}"
    );
    assert!(text.contains("malformed line 5"), "{text}");
    assert!(
        text.contains("3 events: 1 kept, 1 changed, 1 rejected"),
        "{text}"
    );

    let json = host()
        .args([
            "plugin",
            "test",
            &transform.display().to_string(),
            "--input",
            &sample.display().to_string(),
            "--grant",
            "clock",
            "--json",
            "--cache-dir",
            "off",
        ])
        .output()
        .unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&json.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.last().unwrap()["summary"]["rejected"], 1);

    let wrong = host()
        .args([
            "plugin",
            "test",
            &fixtures_dir()
                .join("wrong_world.wasm")
                .display()
                .to_string(),
            "--input",
            &sample.display().to_string(),
            "--cache-dir",
            "off",
        ])
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("does not export the `stage` interface")
    );
}

#[test]
fn plugin_new_scaffolds_a_stage_that_builds_and_passes_plugin_test() {
    let dir = scratch("plugin-new");
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    for (lang, toolchain) in [
        ("rust", None),
        ("python", Some("python/currency/.venv")),
        ("js", Some("js/mask_users/node_modules")),
    ] {
        let name = format!("my_{lang}");
        let out = host()
            .args([
                "plugin",
                "new",
                &name,
                "--lang",
                lang,
                "--plugins",
                &plugins.display().to_string(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stage_dir = plugins.join(lang).join(&name);
        // Reuse the toolchain `make plugins` installed instead of downloading it again.
        if let Some(installed) = toolchain {
            let from = repo().join("plugins").join(installed);
            if from.exists() {
                std::os::unix::fs::symlink(&from, stage_dir.join(from.file_name().unwrap()))
                    .unwrap();
            }
        }
        let build = std::process::Command::new("bash")
            .arg(stage_dir.join("build.sh"))
            .output()
            .unwrap();
        assert!(
            build.status.success(),
            "{lang} build: {}",
            String::from_utf8_lossy(&build.stderr)
        );
        let test = host()
            .args([
                "plugin",
                "test",
                &plugins.join(format!("{name}.wasm")).display().to_string(),
                "--input",
                &stage_dir.join("sample.csv").display().to_string(),
                "--cache-dir",
                &cache_dir().display().to_string(),
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&test.stdout);
        assert!(
            test.status.success(),
            "{lang}: {text}\n{}",
            String::from_utf8_lossy(&test.stderr)
        );
        assert!(
            text.contains("event_type: \"Purchase\" -> \"purchase\""),
            "{lang}: {text}"
        );
        assert!(
            text.contains("rejected 6ba7b810-9dad-41d1-80b4-00c04fd430c8: negative price"),
            "{lang}: {text}"
        );
        assert!(stage_dir.join("stage.toml").exists());
    }
}

/// The currency stage in each language, as built by `make plugins examples`.
fn currency_stages() -> [(&'static str, std::path::PathBuf); 3] {
    let built = plugins_dir();
    let stages = [
        ("rust", built.join("currency_rust.wasm")),
        ("python", built.join("currency.wasm")),
        ("js", built.join("currency_js.wasm")),
    ];
    for (lang, path) in &stages {
        assert!(
            path.exists(),
            "the {lang} currency stage {} is built by `make plugins examples`",
            path.display()
        );
    }
    stages
}

/// `host plugin test --json` of one component: its JSON lines, or the
/// error it exits with.
fn plugin_test_json(
    component: &std::path::Path,
    input: &std::path::Path,
    config: &[(&str, &str)],
) -> Result<Vec<serde_json::Value>, String> {
    let mut cmd = host();
    cmd.args([
        "plugin",
        "test",
        &component.display().to_string(),
        "--input",
        &input.display().to_string(),
        "--json",
        "--cache-dir",
        &cache_dir().display().to_string(),
    ]);
    for (key, value) in config {
        cmd.arg("--config").arg(format!("{key}={value}"));
    }
    let out = cmd.output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect())
}

#[test]
fn currency_in_rust_python_and_javascript_gives_identical_rows() {
    let dir = scratch("currency-languages");
    let stages = currency_stages();
    let input = dir.join("input");
    generate(
        &input,
        &["--files", "1", "--events-per-file", "2000", "--seed", "7"],
    );
    // Prices that test the rounding and the NUMERIC(10,2) bound.
    let edge: Vec<String> = [
        "0.00",
        "0.01",
        "0.03",
        "0.05",
        "0.15",
        "12.25",
        "99999999.99",
        "660066.00",
        "660066.01",
    ]
    .iter()
    .map(|price| {
        format!(
            "{},5,view,6,{price},2026-01-05T00:00:00Z",
            uuid::Uuid::new_v4()
        )
    })
    .collect();
    write_csv(&input, "edge.csv", &edge);
    let mut sample = Vec::new();
    for name in ["edge.csv"].into_iter().map(String::from).chain(
        std::fs::read_dir(&input)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".csv") && n != "edge.csv"),
    ) {
        let text = std::fs::read_to_string(input.join(&name)).unwrap();
        let body = text.split_once('\n').unwrap().1;
        if sample.is_empty() {
            sample.extend_from_slice(text.split_once('\n').unwrap().0.as_bytes());
            sample.push(b'\n');
        }
        sample.extend_from_slice(body.as_bytes());
    }
    let sample_path = dir.join("sample.csv");
    std::fs::write(&sample_path, sample).unwrap();

    let configs: [&[(&str, &str)]; 4] = [
        // The example config of the chain test.
        &[("rates", "USD:1.0,EUR:0.92"), ("target-currency", "EUR")],
        // EUR -> GBP: 0.79 / 0.92 has no finite decimal, so one rounding.
        &[
            ("rates", " USD:1 , eur:0.92,GBP:0.79,"),
            ("source-currency", "EUR"),
            ("target-currency", "gbp"),
        ],
        // A rate of one half makes every odd cent a tie: to even.
        &[("rates", "USD:1,HALF:0.5"), ("target-currency", "HALF")],
        // USD -> JPY pushes the largest prices past NUMERIC(10,2): rejected.
        &[("rates", "USD:1,JPY:151.5"), ("target-currency", "JPY")],
    ];
    for config in configs {
        let mut outputs = Vec::new();
        for (lang, component) in &stages {
            let lines = plugin_test_json(component, &sample_path, config)
                .unwrap_or_else(|e| panic!("{lang} {config:?}: {e}"));
            outputs.push((lang, lines));
        }
        let (_, reference) = &outputs[0];
        let rows = reference.len() - 1;
        assert!(rows > 2000, "{config:?}: {rows} rows");
        for (lang, lines) in &outputs[1..] {
            assert_eq!(lines.len(), reference.len(), "{lang} {config:?}");
            for (i, (a, b)) in reference.iter().zip(lines.iter()).take(rows).enumerate() {
                assert_eq!(a, b, "{lang} differs from rust at row {i} with {config:?}");
            }
            let summary = |v: &serde_json::Value| {
                let mut s = v["summary"].clone();
                s.as_object_mut().unwrap().remove("events_per_second");
                s
            };
            assert_eq!(
                summary(&reference[rows]),
                summary(&lines[rows]),
                "{lang} {config:?}"
            );
        }
        let summary = &reference[rows]["summary"];
        assert!(
            summary["changed"].as_u64().unwrap() > 1000,
            "{config:?}: {summary}"
        );
        assert_eq!(summary["failed"], 0, "{config:?}: {summary}");
    }

    // Spot checks against values worked out by hand, so that three equal
    // but wrong answers cannot pass.
    let edge_rows = |config: &[(&str, &str)]| -> Vec<serde_json::Value> {
        plugin_test_json(&stages[0].1, &sample_path, config).unwrap()[..edge.len()].to_vec()
    };
    let half = edge_rows(configs[2]);
    let to = |row: &serde_json::Value| row["changes"][0]["to"].as_str().map(str::to_owned);
    // 0.01 -> 0.005 -> 0 (to even); 0.03 -> 1.5 -> 2; 0.05 -> 2.5 -> 2; 12.25 -> 612.5 -> 612.
    assert_eq!(half[0]["outcome"], "kept");
    assert_eq!(to(&half[1]).as_deref(), Some("0"));
    assert_eq!(to(&half[2]).as_deref(), Some("2"));
    assert_eq!(to(&half[3]).as_deref(), Some("2"));
    assert_eq!(to(&half[5]).as_deref(), Some("612"));
    // 0.15 -> 7.5 -> 8.
    assert_eq!(to(&half[4]).as_deref(), Some("8"));
    let jpy = edge_rows(configs[3]);
    // 9999999999 * 151.5 = 1514999999848.5 -> 1514999999848 (to even).
    assert_eq!(jpy[6]["outcome"], "rejected");
    assert_eq!(
        jpy[6]["reason"],
        "converted price 1514999999848 cents does not fit NUMERIC(10,2)"
    );
    // 660066.00 USD is the last whole-dollar price that still fits in yen.
    assert_eq!(to(&jpy[7]).as_deref(), Some("9999999900"));
    assert_eq!(
        jpy[8]["reason"],
        "converted price 10000000052 cents does not fit NUMERIC(10,2)"
    );

    // The same refusals, word for word, for a bad config.
    let bad: [(&[(&str, &str)], &str); 6] = [
        (
            &[("colour", "red")],
            "unknown config key \"colour\" (known: rates, source-currency, target-currency)",
        ),
        (
            &[("rates", "USD:1")],
            "config needs rates and target-currency",
        ),
        (
            &[("rates", "USD:1"), ("target-currency", "JPY")],
            "no rate for currency JPY in rates",
        ),
        (
            &[("rates", "USD:1,EUR:1e3"), ("target-currency", "EUR")],
            "rate for EUR is not a decimal number like 0.92 (at most 9 decimals): \"1e3\"",
        ),
        (
            &[("rates", "USD:1,EUR:0.000"), ("target-currency", "EUR")],
            "rate for EUR must be positive, not 0.000",
        ),
        (
            &[("rates", "USD:1,€:1"), ("target-currency", "EUR")],
            "currency \"€\" is not made of letters A-Z",
        ),
    ];
    for (config, message) in bad {
        for (lang, component) in &stages {
            let err = plugin_test_json(component, &sample_path, config)
                .err()
                .unwrap_or_else(|| panic!("{lang} accepted {config:?}"));
            assert!(
                err.contains(&format!("init failed: {message}")),
                "{lang} {config:?}: {err}"
            );
        }
    }
}

/// Scaffolds stage `name` in `lang` under `plugins` and builds it with the
/// printed command; returns the component.
fn scaffold_and_build(
    plugins: &std::path::Path,
    lang: &str,
    name: &str,
    env: &[(&str, std::path::PathBuf)],
) -> std::path::PathBuf {
    let out = host()
        .args(["plugin", "new", name, "--lang", lang, "--plugins"])
        .arg(plugins)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stage_dir = plugins.join(lang).join(name);
    assert!(printed.contains(&format!("bash {}/build.sh", stage_dir.display())));
    let mut build = std::process::Command::new("bash");
    build.arg(stage_dir.join("build.sh"));
    for (key, value) in env {
        build.env(key, value);
    }
    let built = build.output().unwrap();
    assert!(
        built.status.success(),
        "{lang} build: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    plugins.join(format!("{name}.wasm"))
}

#[test]
fn a_c_stage_scaffolded_builds_passes_plugin_test_and_matches_rust_row_by_row() {
    let dir = scratch("plugin_new_c");
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    // The first build installs the C toolchain (apt, cargo) and caches it;
    // the Rust one keeps its build under target/ between runs.
    let c = scaffold_and_build(&plugins, "c", "my_c", &[]);
    let rust = scaffold_and_build(
        &plugins,
        "rust",
        "my_rust",
        &[("CARGO_TARGET_DIR", repo().join("target/test-scaffold-rust"))],
    );

    // As generated: `host plugin test` over its own sample.
    let sample = plugins.join("c/my_c/sample.csv");
    let test = host()
        .args(["plugin", "test"])
        .arg(&c)
        .arg("--input")
        .arg(&sample)
        .arg("--cache-dir")
        .arg(cache_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&test.stdout);
    assert!(
        test.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&test.stderr)
    );
    assert!(
        text.contains("event_type: \"Purchase\" -> \"purchase\""),
        "{text}"
    );
    assert!(
        text.contains("rejected 6ba7b810-9dad-41d1-80b4-00c04fd430c8: negative price"),
        "{text}"
    );
    assert!(plugins.join("c/my_c/stage.toml").exists());

    // The same rule in C and in Rust: the same outcome for every row, over
    // generated input with mixed-case types, negative prices and several
    // batches (an empty one among them when a batch holds only bad rows).
    let input = dir.join("input");
    generate(
        &input,
        &[
            "--files",
            "1",
            "--events-per-file",
            "3000",
            "--seed",
            "5",
            "--invalid-rate",
            "0.01",
        ],
    );
    let negative: Vec<String> = (0..40)
        .map(|i| {
            format!(
                "{},{},{},{},-{}.{:02},2026-01-05T00:00:00Z",
                uuid::Uuid::new_v4(),
                i + 1,
                ["VIEW", "Purchase", "add_to_cart"][i % 3],
                i + 7,
                i,
                i % 100
            )
        })
        .collect();
    write_csv(&input, "negative.csv", &negative);
    for file in std::fs::read_dir(&input).unwrap() {
        let file = file.unwrap().path();
        let with_batches = |component: &std::path::Path| {
            let mut cmd = host();
            cmd.args(["plugin", "test"])
                .arg(component)
                .arg("--input")
                .arg(&file)
                .args(["--json", "--batch-size", "700", "--cache-dir"])
                .arg(cache_dir());
            let out = cmd.output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .filter(|v| v.get("summary").is_none())
                .collect::<Vec<_>>()
        };
        let (from_c, from_rust) = (with_batches(&c), with_batches(&rust));
        assert!(
            from_c.len() >= 40,
            "{} rows from {}",
            from_c.len(),
            file.display()
        );
        assert_eq!(from_c, from_rust, "C and Rust differ on {}", file.display());
    }
}
