//! `host bench` end to end at a small scale: every figure it promises is
//! measured and written, and the pipeline part wrote exactly the rows the
//! files hold (a benchmark of a wrong result measures nothing).

mod common;

use common::*;

#[test]
fn bench_measures_every_part_and_writes_the_right_rows() {
    let dir = scratch("bench");
    let work = dir.join("work");
    let out = host()
        .args(["bench", "--events", "3000", "--events-per-file", "500"])
        .args(["--latency-seconds", "5", "--database-url", &admin_url()])
        .arg("--plugins")
        .arg(plugins_dir())
        .arg("--work-dir")
        .arg(&work)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "host bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for label in [
        "COPY ceiling",
        "ratio to the ceiling",
        "COPY ceiling, two sessions",
        "ratio to two-session ceiling",
        "peak RSS",
        "start to first commit",
        "p99",
        "CPU per 1M events: host",
        "host CPU idle",
        "host CPU at the seed rate",
    ] {
        assert!(stdout.contains(label), "no {label:?} in:\n{stdout}");
    }

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.join("result.json")).unwrap()).unwrap();
    let expected = expected(&work.join("input"));
    assert_eq!(report["rows_written"], expected.rows.len() as i64);
    for key in [
        "ceiling_eps",
        "ceiling2_eps",
        "ratio2",
        "pipeline_eps",
        "ratio",
        "peak_rss_mb",
        "startup_ms",
        "database_s",
        "host_cpu_s_per_m",
    ] {
        assert!(report[key].as_f64().unwrap_or(0.0) > 0.0, "{key}: {report}");
    }
    for key in ["idle_cpu_pct", "seed_rate_cpu_pct"] {
        assert!(
            report[key].as_f64().is_some_and(|p| p >= 0.0),
            "{key}: {report}"
        );
    }
    let stages: Vec<&str> = report["stage_s"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[0].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["transform", "dedup"]);
    let latency = report["latency"].as_array().unwrap();
    assert_eq!(latency.len(), 2);
    for l in latency {
        assert!(l["files"].as_u64().unwrap() >= 1, "{l}");
        assert!(l["p50_ms"].as_f64().unwrap() <= l["max_ms"].as_f64().unwrap());
    }
}
