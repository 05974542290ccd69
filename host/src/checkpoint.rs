//! What the host resumes from: the file positions and stage states of the
//! last committed batch. The database is the truth; both are written in
//! the same transaction as the rows they produced (see `sink`), so reading
//! them back at start gives a consistent cut: no row lost or doubled.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::Client;

use crate::batch::Position;
use crate::source::Fingerprint;

#[derive(Debug, Default)]
pub struct Checkpoint {
    /// By file key.
    pub positions: HashMap<String, Position>,
    /// By stage name.
    pub states: HashMap<String, Vec<u8>>,
    /// The last committed batch id, if any.
    pub last_batch: Option<i64>,
}

pub async fn load(client: &Client) -> Result<Checkpoint, tokio_postgres::Error> {
    let mut checkpoint = Checkpoint::default();
    for row in client
        .query(
            "SELECT file_key, path, byte_offset, line, reads, fp_len, fp_sum FROM pipeline.positions",
            &[],
        )
        .await?
    {
        let key: String = row.get(0);
        let path: String = row.get(1);
        let offset: i64 = row.get(2);
        let line: i64 = row.get(3);
        let reads: i32 = row.get(4);
        let fp_len: Option<i32> = row.get(5);
        let fp_sum: Option<i64> = row.get(6);
        checkpoint.positions.insert(
            key.clone(),
            Position {
                key,
                path: Arc::from(path),
                offset: offset as u64,
                line: line as u64,
                reads: reads as u32,
                fingerprint: fp_len
                    .zip(fp_sum)
                    .map(|(len, sum)| Fingerprint::from_db(len, sum)),
            },
        );
    }
    for row in client
        .query("SELECT stage, state FROM pipeline.stage_state", &[])
        .await?
    {
        checkpoint.states.insert(row.get(0), row.get(1));
    }
    checkpoint.last_batch = client
        .query_one("SELECT max(batch_id) FROM pipeline.batches", &[])
        .await?
        .get(0);
    Ok(checkpoint)
}
