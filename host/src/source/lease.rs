//! Partition leases of a shared stream, in PostgreSQL: one row per
//! partition in `pipeline.partitions` names its owner, the owner's epoch
//! and when the lease ends. Taking a partition bumps its epoch; a batch
//! commits only while its epoch is the row's and the lease runs (checked
//! inside the commit transaction, see `sink`), so a host that lost a
//! partition can no longer commit for it, whatever it still holds in
//! memory or in NATS.
//!
//! Each host renews its leases every third of the lease time and marks
//! itself alive in `pipeline.stream_hosts`; the live hosts split the
//! partitions evenly (a host holding more than its share gives the extra
//! back, so partitions move to a host that joins, and a dead host's are
//! taken once its leases end).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_postgres::Client;

use crate::sink::{self, SinkError};

/// A partition this host has just taken.
#[derive(Debug, Clone)]
pub struct Taken {
    pub partition: u32,
    pub epoch: i64,
    /// The last stream sequence committed for it.
    pub committed: u64,
    /// Its stage states, by stage name.
    pub states: Vec<(String, Vec<u8>)>,
}

/// A partition's row, for status and the end-of-run summary.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Holder {
    pub partition: u32,
    pub host: Option<String>,
    pub epoch: i64,
    /// Whether its lease still runs.
    pub live: bool,
    pub committed_seq: u64,
}

pub struct Leases {
    client: Client,
    stream: String,
    host: String,
    partitions: u32,
    lease: Duration,
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl Leases {
    /// Connects and makes sure the stream's partition rows exist.
    pub async fn connect(
        url: &str,
        stream: &str,
        host: &str,
        partitions: u32,
        lease: Duration,
    ) -> Result<Leases, SinkError> {
        let client = sink::connect_client(url).await?;
        client
            .execute(
                "INSERT INTO pipeline.partitions (stream, partition)
                 SELECT $1, p FROM generate_series(0, $2 - 1) AS p ON CONFLICT DO NOTHING",
                &[&stream, &(partitions as i32)],
            )
            .await?;
        Ok(Leases {
            client,
            stream: stream.to_owned(),
            host: host.to_owned(),
            partitions,
            lease,
        })
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Marks this host alive; returns how many hosts are (itself included).
    pub async fn heartbeat(&self) -> Result<usize, SinkError> {
        self.client
            .execute(
                "INSERT INTO pipeline.stream_hosts (stream, host) VALUES ($1, $2)
                 ON CONFLICT (stream, host) DO UPDATE SET seen_at = now()",
                &[&self.stream, &self.host],
            )
            .await?;
        let live: i64 = self
            .client
            .query_one(
                "SELECT count(*) FROM pipeline.stream_hosts
                 WHERE stream = $1 AND seen_at > now() - make_interval(secs => $2)",
                &[&self.stream, &seconds(self.lease)],
            )
            .await?
            .get(0);
        Ok((live as usize).max(1))
    }

    /// The share of partitions each of `live` hosts holds.
    pub fn share(&self, live: usize) -> usize {
        (self.partitions as usize).div_ceil(live.max(1))
    }

    /// Extends the leases of `held` (partition, epoch); returns those
    /// still this host's: the others were taken over after they ran out.
    pub async fn renew(&self, held: &[(u32, i64)]) -> Result<Vec<u32>, SinkError> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let parts: Vec<i32> = held.iter().map(|(p, _)| *p as i32).collect();
        let epochs: Vec<i64> = held.iter().map(|(_, e)| *e).collect();
        let rows = self
            .client
            .query(
                "UPDATE pipeline.partitions t SET expires_at = now() + make_interval(secs => $3)
                 FROM unnest($4::int4[], $5::int8[]) AS h(p, e)
                 WHERE t.stream = $1 AND t.host = $2 AND t.partition = h.p AND t.epoch = h.e
                 RETURNING t.partition",
                &[
                    &self.stream,
                    &self.host,
                    &seconds(self.lease),
                    &parts,
                    &epochs,
                ],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get::<_, i32>(0) as u32).collect())
    }

    /// Takes up to `want` partitions that are free or whose lease ran out,
    /// lowest first. A row locked by a commit in flight is skipped: its
    /// owner still holds it.
    pub async fn take(&self, want: usize) -> Result<Vec<Taken>, SinkError> {
        if want == 0 {
            return Ok(Vec::new());
        }
        let rows = self
            .client
            .query(
                "UPDATE pipeline.partitions t
                 SET host = $2, epoch = t.epoch + 1, expires_at = now() + make_interval(secs => $3)
                 FROM (SELECT partition FROM pipeline.partitions
                       WHERE stream = $1 AND (host IS NULL OR expires_at < now())
                       ORDER BY partition LIMIT $4 FOR UPDATE SKIP LOCKED) AS free
                 WHERE t.stream = $1 AND t.partition = free.partition
                 RETURNING t.partition, t.epoch, t.committed_seq",
                &[
                    &self.stream,
                    &self.host,
                    &seconds(self.lease),
                    &(want as i64),
                ],
            )
            .await?;
        let mut taken: BTreeMap<u32, Taken> = rows
            .iter()
            .map(|r| {
                let partition = r.get::<_, i32>(0) as u32;
                (
                    partition,
                    Taken {
                        partition,
                        epoch: r.get(1),
                        committed: r.get::<_, i64>(2).max(0) as u64,
                        states: Vec::new(),
                    },
                )
            })
            .collect();
        if taken.is_empty() {
            return Ok(Vec::new());
        }
        let parts: Vec<i32> = taken.keys().map(|p| *p as i32).collect();
        for row in self
            .client
            .query(
                "SELECT partition, stage, state FROM pipeline.partition_state
                 WHERE stream = $1 AND partition = ANY($2)",
                &[&self.stream, &parts],
            )
            .await?
        {
            if let Some(t) = taken.get_mut(&(row.get::<_, i32>(0) as u32)) {
                t.states.push((row.get(1), row.get(2)));
            }
        }
        Ok(taken.into_values().collect())
    }

    /// Gives a partition back (rebalancing, shutdown): free at once for
    /// another host. Its batches still in flight here fail their commit.
    pub async fn release(&self, partition: u32, epoch: i64) -> Result<(), SinkError> {
        self.client
            .execute(
                "UPDATE pipeline.partitions SET host = NULL, expires_at = '-infinity'
                 WHERE stream = $1 AND partition = $2 AND epoch = $3 AND host = $4",
                &[&self.stream, &(partition as i32), &epoch, &self.host],
            )
            .await?;
        Ok(())
    }

    /// Marks this host gone, so that the others count it out at once.
    pub async fn leave(&self) -> Result<(), SinkError> {
        self.client
            .execute(
                "DELETE FROM pipeline.stream_hosts WHERE stream = $1 AND host = $2",
                &[&self.stream, &self.host],
            )
            .await?;
        Ok(())
    }

    pub async fn holders(&self) -> Result<Vec<Holder>, SinkError> {
        holders(&self.client, &self.stream).await
    }
}

/// Every partition row of `stream`.
pub async fn holders(client: &Client, stream: &str) -> Result<Vec<Holder>, SinkError> {
    let rows = client
        .query(
            "SELECT partition, host, epoch, expires_at > now(), committed_seq
             FROM pipeline.partitions WHERE stream = $1 ORDER BY partition",
            &[&stream],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Holder {
            partition: r.get::<_, i32>(0) as u32,
            host: r.get(1),
            epoch: r.get(2),
            live: r.get(3),
            committed_seq: r.get::<_, i64>(4).max(0) as u64,
        })
        .collect())
}
