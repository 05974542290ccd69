//! Batches: the unit that flows through the stages and is committed.
//!
//! The batcher closes a batch at `max_rows` records or `max_age` after
//! its first record, whichever comes first; the source also closes it at
//! once when the input goes idle, so a lone small file is committed
//! without waiting for the interval. A batch carries, for each file it
//! read from, the position right after its last record: committing the
//! batch commits exactly those positions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::parse::BadRow;
use crate::stage::Event;

/// How far a file has been consumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The file's identity (device, inode, birth time): see `source::file_key`.
    pub key: String,
    pub path: Arc<str>,
    /// Bytes consumed from the start of the file.
    pub offset: u64,
    /// Lines consumed from the start of the file.
    pub line: u64,
    /// How many times the file has been read again from its start (it was
    /// truncated): a committed position moves backwards only with a
    /// higher count, never by accident (see `sink`).
    pub reads: u32,
    /// Of the bytes consumed, up to `source::FINGERPRINT_BYTES` of them:
    /// tells the file from another one later found under its key. `None`
    /// for a position committed by a host that predates fingerprints.
    pub fingerprint: Option<crate::source::Fingerprint>,
}

/// Which file a record came from, by identity rather than name: with the
/// line, the natural key of a quarantined record, so that reading a file
/// again does not quarantine its records twice.
#[derive(Debug, Clone)]
pub struct FileRef {
    /// `Position::key`.
    pub key: Arc<str>,
    /// The checksum of the file's fingerprint at the record's end.
    pub fingerprint: i64,
}

/// Where an event came from, to point a quarantined event at its source.
#[derive(Debug, Clone)]
pub struct Origin {
    pub file: Arc<str>,
    pub line: u64,
    pub source: FileRef,
}

/// A record the parser could not read, with the file it is in.
#[derive(Debug, Clone)]
pub struct Malformed {
    pub file: Arc<str>,
    pub source: FileRef,
    pub row: BadRow,
}

/// Cloned only when a paused pipeline keeps a batch to try again.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Unique per batch: lets the sink tell, after a lost connection,
    /// whether its commit went through.
    pub id: uuid::Uuid,
    pub events: Vec<Event>,
    /// `origins[i]` is where `events[i]` came from.
    pub origins: Vec<Origin>,
    pub malformed: Vec<Malformed>,
    /// Position after the last record of this batch, per file.
    pub positions: BTreeMap<String, Position>,
    /// Keys of files gone for longer than the grace period: their
    /// positions are deleted with this batch's commit.
    pub forget: Vec<String>,
    /// When its first record was read: the start of its latency.
    pub opened: Instant,
    /// From its first record to its closing: the time spent reading and
    /// parsing its records (the source waits only between batches).
    pub read_time: Duration,
    /// For a batch of a shared stream: the partition it was read from and
    /// how far (see `source::nats`). `None` for files.
    pub partition: Option<PartitionMark>,
}

/// What a batch of one partition of a shared stream commits beside its
/// rows: the last stream sequence it read, under the lease epoch it was
/// read with; and for the first batch after a takeover, the stage state
/// the database holds for the partition.
#[derive(Debug, Clone, Default)]
pub struct PartitionMark {
    pub stream: Arc<str>,
    pub partition: u32,
    pub epoch: i64,
    /// The stream sequence of the batch's last message.
    pub seq: u64,
    /// Where to ack the last message once committed (acks all before it).
    pub ack: Option<String>,
    /// Stage states (by stage name) to restore before this batch.
    pub restore: Option<Vec<(String, Vec<u8>)>>,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            id: uuid::Uuid::new_v4(),
            events: Vec::new(),
            origins: Vec::new(),
            malformed: Vec::new(),
            positions: BTreeMap::new(),
            forget: Vec::new(),
            opened: Instant::now(),
            read_time: Duration::ZERO,
            partition: None,
        }
    }

    fn closed(mut self) -> Batch {
        self.read_time = self.opened.elapsed();
        self
    }

    /// Records read into this batch, good and bad.
    pub fn rows(&self) -> usize {
        self.events.len() + self.malformed.len()
    }

    /// The files this batch read from.
    pub fn files(&self) -> Vec<&str> {
        self.positions.values().map(|p| &*p.path).collect()
    }
}

pub struct Batcher {
    max_rows: usize,
    max_age: Duration,
    current: Option<Batch>,
}

impl Batcher {
    pub fn new(max_rows: usize, max_age: Duration) -> Batcher {
        Batcher {
            max_rows: max_rows.max(1),
            max_age,
            current: None,
        }
    }

    /// Adds one parsed record and the file position after it. Returns the
    /// batch when it is full. The position is borrowed: it is copied only
    /// the first time the batch meets its file, not once per record.
    pub fn push(
        &mut self,
        record: Result<(Event, Origin), Malformed>,
        position: &Position,
    ) -> Option<Batch> {
        let batch = self.current.get_or_insert_with(Batch::new);
        match record {
            Ok((event, origin)) => {
                batch.events.push(event);
                batch.origins.push(origin);
            }
            Err(bad) => batch.malformed.push(bad),
        }
        match batch.positions.get_mut(&position.key) {
            Some(p) => {
                p.offset = position.offset;
                p.line = position.line;
                p.reads = position.reads;
                p.fingerprint = position.fingerprint;
            }
            None => {
                batch
                    .positions
                    .insert(position.key.clone(), position.clone());
            }
        }
        if batch.rows() >= self.max_rows {
            self.take()
        } else {
            None
        }
    }

    /// Adds positions to delete with the open batch (opening one): see
    /// `Batch::forget`.
    pub fn forget(&mut self, keys: impl IntoIterator<Item = String>) {
        let batch = self.current.get_or_insert_with(Batch::new);
        for key in keys {
            // Its rows are committed all the same; a position of it kept
            // here would outlive the delete and refuse the file, back
            // later and read from the start, as a move backwards.
            batch.positions.remove(&key);
            batch.forget.push(key);
        }
    }

    /// When the open batch must be closed, if one is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.current.as_ref().map(|b| b.opened + self.max_age)
    }

    /// Closes the open batch if it has reached its age.
    pub fn take_due(&mut self, now: Instant) -> Option<Batch> {
        match self.deadline() {
            Some(deadline) if now >= deadline => self.take(),
            _ => None,
        }
    }

    /// Closes the open batch now (idle input, shutdown, end of `--once`).
    pub fn take(&mut self) -> Option<Batch> {
        self.current.take().map(Batch::closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u32) -> (Event, Origin) {
        (
            Event {
                event_id: format!("id-{n}"),
                user_id: 1,
                event_type: "view".into(),
                product_id: 1,
                price_cents: 1,
                event_time: 0,
            },
            Origin {
                file: "f".into(),
                line: n as u64,
                source: source(),
            },
        )
    }

    fn source() -> FileRef {
        FileRef {
            key: "f".into(),
            fingerprint: 0,
        }
    }

    fn at(key: &str, offset: u64) -> Position {
        Position {
            key: key.into(),
            path: key.into(),
            offset,
            line: offset,
            reads: 0,
            fingerprint: None,
        }
    }

    #[test]
    fn closes_at_max_rows_with_last_position_per_file() {
        let mut b = Batcher::new(3, Duration::from_secs(60));
        assert!(b.push(Ok(event(1)), &at("a", 10)).is_none());
        assert!(b.push(Ok(event(2)), &at("b", 5)).is_none());
        let batch = b.push(Ok(event(3)), &at("a", 20)).expect("full");
        assert_eq!(batch.events.len(), 3);
        assert_eq!(batch.positions["a"].offset, 20);
        assert_eq!(batch.positions["b"].offset, 5);
        assert!(b.take().is_none());
    }

    #[test]
    fn malformed_rows_count_towards_the_size() {
        let mut b = Batcher::new(2, Duration::from_secs(60));
        let bad = Malformed {
            file: "f".into(),
            source: source(),
            row: BadRow {
                line: 1,
                raw: "x".into(),
                reason: "bad".into(),
            },
        };
        assert!(b.push(Err(bad), &at("a", 1)).is_none());
        let batch = b.push(Ok(event(2)), &at("a", 2)).expect("full");
        assert_eq!(batch.malformed.len(), 1);
        assert_eq!(batch.events.len(), 1);
    }

    #[test]
    fn closes_at_its_age() {
        let mut b = Batcher::new(100, Duration::from_millis(50));
        assert!(b.deadline().is_none());
        b.push(Ok(event(1)), &at("a", 1));
        let opened = b.deadline().unwrap() - Duration::from_millis(50);
        assert!(b.take_due(opened + Duration::from_millis(10)).is_none());
        assert!(b.take_due(opened + Duration::from_millis(50)).is_some());
    }

    #[test]
    fn a_position_forgotten_leaves_the_open_batch_with_its_rows() {
        let mut b = Batcher::new(100, Duration::from_secs(60));
        b.push(Ok(event(1)), &at("a", 10));
        b.push(Ok(event(2)), &at("b", 10));
        b.forget(["a".to_string()]);
        let batch = b.take().unwrap();
        assert_eq!(batch.events.len(), 2);
        assert_eq!(batch.positions.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(batch.forget, ["a"]);
    }

    proptest::proptest! {
        /// Model: concatenating the batches gives back every pushed record
        /// in order, and each batch's position for a file is the position
        /// of that file's last record in the batch.
        #[test]
        fn batches_partition_the_input(max in 1usize..20, files in proptest::collection::vec(0u8..3, 0..100)) {
            let mut b = Batcher::new(max, Duration::from_secs(3600));
            let mut batches = Vec::new();
            let mut offsets = [0u64; 3];
            for (n, f) in files.iter().enumerate() {
                offsets[*f as usize] += 1;
                let key = format!("f{f}");
                if let Some(batch) = b.push(Ok(event(n as u32)), &at(&key, offsets[*f as usize])) {
                    batches.push(batch);
                }
            }
            batches.extend(b.take());
            let mut seen = 0;
            let mut expected = [0u64; 3];
            for batch in &batches {
                proptest::prop_assert!(batch.rows() <= max && batch.rows() > 0);
                for origin in &batch.origins {
                    proptest::prop_assert_eq!(origin.line, seen as u64);
                    let f = files[seen] as usize;
                    expected[f] += 1;
                    seen += 1;
                }
                for (key, pos) in &batch.positions {
                    let f: usize = key[1..].parse().unwrap();
                    proptest::prop_assert_eq!(pos.offset, expected[f]);
                }
            }
            proptest::prop_assert_eq!(seen, files.len());
        }
    }
}
