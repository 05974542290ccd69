//! One pipeline whose stages are written in three languages: Rust
//! (transform), Python (currency conversion) and JavaScript (user-id
//! bucketing), run by the real host and checked row by row.

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
