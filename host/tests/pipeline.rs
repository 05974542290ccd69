//! End to end through the real binary, the real components and a real
//! PostgreSQL: generated files in, exactly the right rows out.

mod common;

use common::*;

#[test]
fn once_writes_each_valid_event_exactly_once_and_quarantines_the_rest() {
    let dir = scratch("once");
    let input = dir.join("input");
    generate(
        &input,
        &[
            "--files",
            "40",
            "--events-per-file",
            "1000",
            "--duplicate-rate",
            "0.05",
            "--invalid-rate",
            "0.01",
            "--seed",
            "7",
        ],
    );
    let url = fresh_db("once");
    let out = run_once(&plugins_dir(), &input, &url, &dir.join("state"), &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("done:"), "{stdout}");

    let expected = expected(&input);
    assert!(
        expected.rows.len() > 35_000,
        "the generator wrote {} valid events",
        expected.rows.len()
    );
    let actual = table(&url);
    assert_eq!(
        actual.len(),
        expected.rows.len(),
        "one row per distinct valid event id"
    );
    for (id, row) in &expected.rows {
        assert_eq!(actual.get(id), Some(row), "event {id}");
    }

    let quarantined = count(
        &url,
        "SELECT count(*) FROM pipeline.quarantine WHERE kind = 'malformed'",
    );
    assert_eq!(quarantined as usize, expected.malformed);
    assert_eq!(count(&url, "SELECT count(*) FROM pipeline.quarantine WHERE reason = '' OR raw IS NULL OR line IS NULL OR file IS NULL"), 0);
    // Every batch names both stage versions that processed it.
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM pipeline.batches WHERE jsonb_array_length(stages) <> 2"
        ),
        0
    );

    // A second run finds nothing new.
    let batches = count(&url, "SELECT count(*) FROM pipeline.batches");
    run_once(&plugins_dir(), &input, &url, &dir.join("state"), &[]);
    assert_eq!(table(&url).len(), expected.rows.len());
    assert_eq!(
        count(&url, "SELECT count(*) FROM pipeline.quarantine") as usize,
        expected.malformed
    );
    assert_eq!(
        count(&url, "SELECT count(*) FROM pipeline.batches"),
        batches
    );
}

#[test]
fn transform_rejections_are_quarantined_with_their_reason() {
    let dir = scratch("rejections");
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::write(
        input.join("bad.csv"),
        "event_id,user_id,event_type,product_id,price,event_time\n\
         11111111-1111-4111-8111-111111111111,1,refund,2,3.00,2026-01-05T00:00:00Z\n\
         22222222-2222-4222-8222-222222222222,1,view,2,-3.00,2026-01-05T00:00:00Z\n\
         33333333-3333-4333-8333-333333333333,0,view,2,3.00,2026-01-05T00:00:00Z\n\
         44444444-4444-4444-8444-444444444444,1,view,2,3.00,2999-01-05T00:00:00Z\n\
         55555555-5555-4555-8555-555555555555,1,Add To Cart,2,3.00,2026-01-05T00:00:00+01:00\n\
         66666666-6666-4666-8666-666666666666,1,view,2,3.00,2026-01-05 00:00:00\n",
    )
    .unwrap();
    let url = fresh_db("rejections");
    run_once(&plugins_dir(), &input, &url, &dir.join("state"), &[]);
    let rows = query(
        &url,
        "SELECT event_id, event_type, event_time::text FROM ecommerce_events ORDER BY 1",
    );
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0][1].as_deref(), Some("add_to_cart"));
    assert_eq!(
        rows[0][2].as_deref(),
        Some("2026-01-04 23:00:00"),
        "offsets are converted to UTC"
    );
    assert_eq!(
        rows[1][2].as_deref(),
        Some("2026-01-05 00:00:00"),
        "no zone means UTC"
    );
    let reasons = query(
        &url,
        "SELECT line, reason, stage FROM pipeline.quarantine WHERE kind = 'rejected' ORDER BY line",
    );
    let text: Vec<String> = reasons
        .iter()
        .map(|r| format!("{}: {}", r[0].clone().unwrap(), r[1].clone().unwrap()))
        .collect();
    assert_eq!(text.len(), 4, "{text:?}");
    assert!(
        text[0].starts_with("2: event_type \"refund\" is not allowed"),
        "{text:?}"
    );
    assert!(
        text[1].starts_with("3: price -3.00 is negative"),
        "{text:?}"
    );
    assert!(text[2].starts_with("4: user_id 0"), "{text:?}");
    assert!(text[3].starts_with("5: event_time is"), "{text:?}");
    assert!(reasons.iter().all(|r| r[2].as_deref() == Some("transform")));
}

/// The quarantine in a comparable form: file name, line, kind, stage,
/// reason (with how far in the future a time is, which the clock moves).
fn quarantine_rows(url: &str) -> Vec<Vec<Option<String>>> {
    query(
        url,
        "SELECT regexp_replace(file, '^.*/', ''), line::text, kind, stage, \
         regexp_replace(reason, 'is [0-9]+ s in the future', 'is N s in the future') \
         FROM pipeline.quarantine ORDER BY 1, 2, 3",
    )
}

#[test]
fn the_shipped_stages_give_the_same_rows_in_columns_and_as_records() {
    let dir = scratch("columns_rows");
    let input = dir.join("input");
    generate(
        &input,
        &[
            "--files",
            "5",
            "--events-per-file",
            "2000",
            "--duplicate-rate",
            "0.05",
            "--invalid-rate",
            "0.02",
            "--seed",
            "11",
        ],
    );
    // Every rule of the transform, and spellings it renames, in one file
    // beside the generated ones (duplicates among them for dedup).
    std::fs::write(
        input.join("rules.csv"),
        "event_id,user_id,event_type,product_id,price,event_time\n\
         11111111-1111-4111-8111-111111111111,1,refund,2,3.00,2026-01-05T00:00:00Z\n\
         22222222-2222-4222-8222-222222222222,1,view,2,-3.00,2026-01-05T00:00:00Z\n\
         33333333-3333-4333-8333-333333333333,0,view,2,3.00,2026-01-05T00:00:00Z\n\
         44444444-4444-4444-8444-444444444444,1,view,2,3.00,2999-01-05T00:00:00Z\n\
         55555555-5555-4555-8555-555555555555,1,Add To Cart,2,3.00,2026-01-05T00:00:00Z\n\
         55555555-5555-4555-8555-555555555555,1,add_to_cart,2,3.00,2026-01-05T00:00:00Z\n\
         66666666-6666-4666-8666-666666666666,1,PURCHASE,2,99999999.99,2026-01-05T00:00:00Z\n\
         77777777-7777-4777-8777-777777777777,1,remove-from-cart,2,0.00,2026-01-05T00:00:00Z\n",
    )
    .unwrap();

    let tested = host()
        .args(["plugin", "test"])
        .arg(plugins_dir().join("transform.wasm"))
        .arg("--input")
        .arg(input.join("rules.csv"))
        .args(["--grant", "clock", "--cache-dir"])
        .arg(cache_dir())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&tested.stdout);
    assert!(
        said.contains("batches go in columns (it exports `columns`)"),
        "{said}\n{}",
        String::from_utf8_lossy(&tested.stderr)
    );

    let columns = fresh_db("columns_cols");
    run_once(&plugins_dir(), &input, &columns, &dir.join("state_c"), &[]);
    let records = fresh_db("columns_recs");
    let out = host()
        .args(run_args(
            &plugins_dir(),
            &input,
            &records,
            &dir.join("state_r"),
        ))
        .arg("--once")
        .env("PIPELINE_TEST_ROW_CALLS", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let table_c = table(&columns);
    assert!(table_c.len() > 9_000, "{} rows", table_c.len());
    assert_eq!(table_c, table(&records), "the same rows either way");
    assert_eq!(
        table_c
            .get("55555555-5555-4555-8555-555555555555")
            .map(|r| r.1.as_str()),
        Some("add_to_cart")
    );
    let quarantine_c = quarantine_rows(&columns);
    assert!(
        quarantine_c
            .iter()
            .filter(|r| r[2].as_deref() == Some("rejected"))
            .count()
            >= 4,
        "{quarantine_c:?}"
    );
    assert_eq!(
        quarantine_c,
        quarantine_rows(&records),
        "the same quarantine"
    );
}

#[test]
fn embedded_default_starts_its_own_postgres() {
    let dir = scratch("embedded");
    // The server runs as an unprivileged user when we are root; it must
    // reach the folder, so use the system temp folder.
    let state = std::env::temp_dir().join(format!("pipeline-embedded-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let input = dir.join("input");
    generate(
        &input,
        &[
            "--files",
            "2",
            "--events-per-file",
            "50",
            "--seed",
            "3",
            "--duplicate-rate",
            "0",
        ],
    );
    let out = host()
        .args([
            "run",
            "--plugins",
            &plugins_dir().display().to_string(),
            "--input",
            &input.display().to_string(),
            "--state-dir",
            &state.display().to_string(),
            "--metrics-addr",
            "off",
            "--once",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = stdout
        .lines()
        .find_map(|l| l.strip_prefix("embedded PostgreSQL: "))
        .and_then(|l| l.split_whitespace().next())
        .expect("the host prints the URL of its server")
        .to_owned();
    assert!(stdout.contains("100 written"), "{stdout}");
    // The host stopped its server on exit; start it again to look.
    let server =
        host::embedded::EmbeddedPostgres::start(&state.join("postgres"), &Default::default())
            .unwrap();
    // Same URL but for the port, which a new start picks afresh.
    let port_of = |u: &str| {
        u.rsplit_once(':')
            .unwrap()
            .1
            .split('/')
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(
        url.replace(&port_of(&url), "PORT"),
        server
            .url("ecommerce")
            .replace(&server.port().to_string(), "PORT")
    );
    let url = server.url("ecommerce");
    assert_eq!(count(&url, "SELECT count(*) FROM ecommerce_events"), 100);
    drop(server);
    let _ = std::fs::remove_dir_all(&state);
}

/// Guards the sink's two paths: a batch whose rows are all new goes by
/// COPY straight into the table; one holding rows the table already has
/// (a replay) fails that COPY and is written through staging with ON
/// CONFLICT, so nothing is doubled and the new rows still land.
#[test]
fn rows_the_table_already_has_are_not_doubled_and_the_rest_are_written() {
    let dir = scratch("conflicts");
    let input = dir.join("input");
    let rows: Vec<String> = (0..300).map(|i| row(i + 1, 7)).collect();
    // Three files of 100; the table already holds every third row of the
    // second file, as if an earlier run had written them.
    for (n, chunk) in rows.chunks(100).enumerate() {
        write_csv(&input, &format!("f{n}.csv"), chunk);
    }
    let url = fresh_db("conflicts");
    query(&url, host::sink::schema::EVENTS_TABLE);
    let present: Vec<&String> = rows[100..200].iter().step_by(3).collect();
    for r in &present {
        let f: Vec<&str> = r.split(',').collect();
        query(
            &url,
            &format!(
                "INSERT INTO ecommerce_events VALUES ('{}', {}, 'view', {}, 9.99, '{}')",
                f[0], f[1], f[3], f[5]
            ),
        );
    }
    run_once(
        &plugins_dir(),
        &input,
        &url,
        &dir.join("state"),
        &["--batch-size", "100"],
    );

    assert_eq!(count(&url, "SELECT count(*) FROM ecommerce_events"), 300);
    assert_eq!(
        count(
            &url,
            "SELECT count(DISTINCT event_id) FROM ecommerce_events"
        ),
        300
    );
    assert_eq!(
        count(&url, "SELECT sum(rows_conflicting) FROM pipeline.batches"),
        present.len() as i64
    );
    assert_eq!(
        count(&url, "SELECT sum(rows_written) FROM pipeline.batches"),
        300 - present.len() as i64
    );
}
