//! `host quarantine list`: the open quarantine rows counted by kind, stage
//! and reason, with sample rows (file, line, raw text, reason).

use super::{connect, Filter, Kind, WHERE_OPEN};

pub struct ListArgs {
    pub database_url: String,
    pub filter: Filter,
    pub samples: usize,
    pub json: bool,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct ListReport {
    pub open: i64,
    /// Rows replayed earlier (kept for audit), not counted in `open`.
    pub replayed: i64,
    pub by_kind: Vec<(String, i64)>,
    pub groups: Vec<Group>,
    pub samples: Vec<Sample>,
}

#[derive(Debug, serde::Serialize)]
pub struct Group {
    pub kind: String,
    pub stage: Option<String>,
    pub reason: String,
    pub count: i64,
}

#[derive(Debug, serde::Serialize)]
pub struct Sample {
    pub id: i64,
    pub kind: String,
    pub stage: Option<String>,
    pub file: Option<String>,
    pub line: Option<i64>,
    pub event_id: Option<String>,
    pub raw: Option<String>,
    pub reason: String,
    pub at: String,
}

const ALL: [Kind; 4] = [Kind::Malformed, Kind::Rejected, Kind::Failed, Kind::Refused];

pub fn run(args: ListArgs) -> anyhow::Result<ListReport> {
    let rt = tokio::runtime::Runtime::new()?;
    let client = connect(&rt, &args.database_url)?;
    let p = args.filter.params(&ALL)?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
        [&p.kinds, &p.stage, &p.reason, &p.since];
    let report = rt.block_on(async {
        let mut report = ListReport::default();
        for row in client
            .query(
                &format!(
                    "SELECT kind, stage, reason, count(*) FROM pipeline.quarantine WHERE {WHERE_OPEN}
                     GROUP BY 1, 2, 3 ORDER BY 4 DESC, 1, 2, 3"
                ),
                &params,
            )
            .await?
        {
            let group = Group {
                kind: row.get(0),
                stage: row.get(1),
                reason: row.get(2),
                count: row.get(3),
            };
            report.open += group.count;
            match report.by_kind.iter_mut().find(|(k, _)| *k == group.kind) {
                Some((_, n)) => *n += group.count,
                None => report.by_kind.push((group.kind.clone(), group.count)),
            }
            report.groups.push(group);
        }
        let limit = args.samples as i64;
        let mut with_limit: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params.to_vec();
        with_limit.push(&limit);
        for row in client
            .query(
                &format!(
                    "SELECT id, kind, stage, file, line, event_id, raw, reason, at::text
                     FROM pipeline.quarantine WHERE {WHERE_OPEN} ORDER BY id LIMIT $5"
                ),
                &with_limit,
            )
            .await?
        {
            report.samples.push(Sample {
                id: row.get(0),
                kind: row.get(1),
                stage: row.get(2),
                file: row.get(3),
                line: row.get(4),
                event_id: row.get(5),
                raw: row.get(6),
                reason: row.get(7),
                at: row.get(8),
            });
        }
        report.replayed = client
            .query_one(
                "SELECT count(*) FROM pipeline.quarantine WHERE replayed_batch IS NOT NULL",
                &[],
            )
            .await?
            .get(0);
        Ok::<_, tokio_postgres::Error>(report)
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_text(&report);
    }
    Ok(report)
}

fn print_text(r: &ListReport) {
    let kinds: Vec<String> = r.by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!(
        "open quarantine rows: {}{} ({} replayed earlier, kept for audit)",
        r.open,
        if kinds.is_empty() {
            String::new()
        } else {
            format!(" ({})", kinds.join(", "))
        },
        r.replayed
    );
    if r.groups.is_empty() {
        return;
    }
    println!("{:>8}  {:<10} {:<16} reason", "count", "kind", "stage");
    const SHOWN: usize = 40;
    if r.groups.len() > SHOWN {
        let rest: i64 = r.groups[SHOWN..].iter().map(|g| g.count).sum();
        println!("(the {} largest of {} groups; {rest} rows in the others: narrow with --kind, --stage, --reason or use --json)", SHOWN, r.groups.len());
    }
    for g in r.groups.iter().take(SHOWN) {
        println!(
            "{:>8}  {:<10} {:<16} {}",
            g.count,
            g.kind,
            g.stage.as_deref().unwrap_or("-"),
            g.reason
        );
    }
    println!("first {} open rows:", r.samples.len());
    for s in &r.samples {
        let place = match (&s.file, s.line) {
            (Some(f), Some(l)) => format!("{f}:{l}"),
            (Some(f), None) => f.clone(),
            _ => "-".into(),
        };
        println!(
            "  #{} {} {} {}\n      raw:    {}\n      reason: {}",
            s.id,
            s.kind,
            s.stage.as_deref().unwrap_or("-"),
            place,
            s.raw.as_deref().unwrap_or("").escape_debug(),
            s.reason
        );
    }
}
