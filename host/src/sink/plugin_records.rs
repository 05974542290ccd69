//! The plugin side of a batch's transaction: shadow diffs of the batch
//! and the plugin events queued since the last batch. Written inside the
//! batch's transaction so they are committed exactly when its rows are.

use serde_json::json;
use tokio_postgres::Transaction;

use crate::stage::events::PluginEvent;
use crate::stage::shadow::ShadowDiff;

/// Inserts the diffs and events; does nothing (no round trip) when there
/// are none, which is the common case.
pub async fn write(
    tx: &Transaction<'_>,
    batch_id: i64,
    diffs: &[ShadowDiff],
    events: &[PluginEvent],
) -> Result<(), tokio_postgres::Error> {
    for d in diffs {
        let count = |f: fn(&crate::stage::shadow::DiffCounts) -> usize| {
            d.counts.as_ref().map(|c| f(c) as i32)
        };
        let fields = d.counts.as_ref().map(|c| json!(c.fields));
        tx.execute(
            "INSERT INTO pipeline.shadow_diffs (batch_id, stage, live_version, live_hash,
                 candidate_version, candidate_hash, rows_in, kept_both, changed, live_only,
                 candidate_only, live_rejected, candidate_rejected, field_changes, candidate_ms, error)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
            &[
                &batch_id,
                &d.stage,
                &d.live.version,
                &d.live.hash,
                &d.candidate_version,
                &d.candidate_hash,
                &(d.rows_in as i32),
                &count(|c| c.kept_both),
                &count(|c| c.changed),
                &count(|c| c.live_only),
                &count(|c| c.candidate_only),
                &count(|c| c.live_rejected),
                &count(|c| c.candidate_rejected),
                &fields,
                &(d.elapsed.as_secs_f64() * 1000.0),
                &d.error.as_ref().map(|e| e.replace('\0', "\\0")),
            ],
        )
        .await?;
    }
    for e in events {
        tx.execute(
            "INSERT INTO pipeline.plugin_events (batch_id, at, stage, kind, version, hash, reason)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &batch_id,
                &e.at,
                &e.stage,
                &e.kind.as_str(),
                &e.version,
                &e.hash,
                &e.reason.as_ref().map(|r| r.replace('\0', "\\0")),
            ],
        )
        .await?;
    }
    Ok(())
}
