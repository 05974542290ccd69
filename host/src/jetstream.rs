//! NATS JetStream as the shared input of several hosts: the
//! `nats://HOST:PORT/STREAM` address, the partition of an event (a stable
//! hash of its `event_id` into one of P subjects `STREAM.<p>`), and the
//! stream and per-partition consumers, created when missing.
//!
//! P is fixed when the stream is created (`--partitions`, default 16) and
//! kept in the stream's metadata: whoever finds the stream uses its P.
//! A consumer is named after its partition and the lease epoch of the
//! host that made it (`STREAM_p3_e7`): a host that lost a partition
//! pulls from a consumer that no longer exists, never from its
//! successor's.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};

/// Partitions of a stream this host creates, unless `--partitions` says.
pub const DEFAULT_PARTITIONS: u32 = 16;
/// The stream metadata key holding P.
const PARTITIONS_KEY: &str = "partitions";
/// The stream description: "partitions: P", as the metadata.
const DESCRIPTION_PREFIX: &str = "ecommerce events, partitions: ";
/// How long JetStream remembers a `Nats-Msg-Id` to drop a republished
/// message (JetStream's own default).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("{0:?} is not nats://HOST:PORT/STREAM (STREAM: letters, digits, - and _)")]
    Url(String),
    #[error("cannot connect to NATS at {server}: {message}")]
    Connect { server: String, message: String },
    #[error("JetStream stream {stream}: {message}")]
    Stream { stream: String, message: String },
    #[error("JetStream consumer {consumer}: {message}")]
    Consumer { consumer: String, message: String },
    #[error("cannot publish to {subject}: {message}")]
    Publish { subject: String, message: String },
}

/// `nats://HOST:PORT/STREAM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsUrl {
    /// `HOST:PORT`, as the client takes it.
    pub server: String,
    pub stream: String,
}

impl NatsUrl {
    /// `Some` for a `nats://` address (an error when malformed), `None`
    /// for anything else (a folder).
    pub fn detect(text: &str) -> Option<Result<NatsUrl, NatsError>> {
        let rest = text.strip_prefix("nats://")?;
        let bad = || NatsError::Url(text.to_owned());
        let parsed = rest.split_once('/').and_then(|(server, stream)| {
            let stream = stream.trim_end_matches('/');
            let ok = !server.is_empty()
                && !stream.is_empty()
                && stream
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            ok.then(|| NatsUrl {
                server: server.to_owned(),
                stream: stream.to_owned(),
            })
        });
        Some(parsed.ok_or_else(bad))
    }

    pub fn subject(&self, partition: u32) -> String {
        subject(&self.stream, partition)
    }
}

impl std::fmt::Display for NatsUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "nats://{}/{}", self.server, self.stream)
    }
}

pub fn subject(stream: &str, partition: u32) -> String {
    format!("{stream}.{partition}")
}

/// The partition of a record: FNV-1a (64 bit) of its key (the event id,
/// or a malformed row's first field) modulo P. Stable across hosts,
/// builds and platforms, which is all it needs to be.
pub fn partition_of(key: &[u8], partitions: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        hash ^= b as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % partitions.max(1) as u64) as u32
}

/// The key a CSV line is partitioned by: its first field (the event id),
/// without surrounding quotes and blanks.
pub fn line_key(line: &[u8]) -> &[u8] {
    let end = line.iter().position(|&b| b == b',').unwrap_or(line.len());
    let field = &line[..end];
    let field = field.trim_ascii();
    field
        .strip_prefix(b"\"")
        .and_then(|f| f.strip_suffix(b"\""))
        .unwrap_or(field)
}

/// Connects, reconnecting by itself for ever after; connection changes
/// go to `on_event` (the host's `/healthz`).
pub async fn connect(
    server: &str,
    on_event: impl Fn(async_nats::Event) + Send + Sync + 'static,
) -> Result<async_nats::Client, NatsError> {
    let on_event = std::sync::Arc::new(on_event);
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        .event_callback(move |event| {
            let on_event = on_event.clone();
            async move { on_event(event) }
        })
        .connect(server)
        .await
        .map_err(|e| NatsError::Connect {
            server: server.to_owned(),
            message: e.to_string(),
        })
}

/// The stream and its P: found, or created with `partitions` subjects.
pub async fn ensure_stream(
    js: &jetstream::Context,
    name: &str,
    partitions: u32,
) -> Result<(stream::Stream, u32), NatsError> {
    let err = |e: &dyn std::fmt::Display| NatsError::Stream {
        stream: name.to_owned(),
        message: e.to_string(),
    };
    let mut config = stream::Config {
        name: name.to_owned(),
        subjects: vec![format!("{name}.*")],
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    };
    let partitions = partitions.max(1);
    config
        .metadata
        .insert(PARTITIONS_KEY.into(), partitions.to_string());
    // Servers before 2.10 keep no metadata: the description says it too.
    config.description = Some(format!("{DESCRIPTION_PREFIX}{partitions}"));
    let mut stream = js.get_or_create_stream(config).await.map_err(|e| err(&e))?;
    let info = stream.info().await.map_err(|e| err(&e))?;
    let found = info
        .config
        .metadata
        .get(PARTITIONS_KEY)
        .cloned()
        .or_else(|| {
            let description = info.config.description.as_deref()?;
            Some(description.strip_prefix(DESCRIPTION_PREFIX)?.to_owned())
        })
        .and_then(|p| p.parse::<u32>().ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| {
            err(&"exists without a partition count in its metadata (not made by this host): delete it or use another stream name")
        })?;
    Ok((stream, found))
}

pub fn consumer_name(stream: &str, partition: u32, epoch: i64) -> String {
    format!("{stream}_p{partition}_e{epoch}")
}

/// The consumer of one partition for one lease epoch, starting right
/// after `committed` (the sequence the database holds): it never relies
/// on earlier acks. The consumers of the epochs before, and one of this
/// epoch (a restart after a broken fetch), are deleted.
pub async fn partition_consumer(
    stream: &stream::Stream,
    name: &str,
    partition: u32,
    epoch: i64,
    committed: u64,
) -> Result<consumer::PullConsumer, NatsError> {
    let consumer = consumer_name(name, partition, epoch);
    let err = |e: &dyn std::fmt::Display| NatsError::Consumer {
        consumer: consumer.clone(),
        message: e.to_string(),
    };
    for old in (epoch - 3).max(0)..=epoch {
        // Absent is the usual case.
        let _ = stream
            .delete_consumer(&consumer_name(name, partition, old))
            .await;
    }
    let config = consumer::pull::Config {
        durable_name: Some(consumer.clone()),
        filter_subject: subject(name, partition),
        ack_policy: consumer::AckPolicy::All,
        deliver_policy: consumer::DeliverPolicy::ByStartSequence {
            start_sequence: committed + 1,
        },
        ack_wait: Duration::from_secs(60),
        // Acks come only after commits: a cap would stall deliveries on
        // batches in flight.
        max_ack_pending: -1,
        // Left behind by a host that lost the partition without noticing.
        inactive_threshold: Duration::from_secs(600),
        ..Default::default()
    };
    stream
        .get_or_create_consumer(&consumer, config)
        .await
        .map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_told_from_folders() {
        assert!(NatsUrl::detect("data/input").is_none());
        assert_eq!(
            NatsUrl::detect("nats://127.0.0.1:4222/EVENTS").map(Result::unwrap),
            Some(NatsUrl {
                server: "127.0.0.1:4222".into(),
                stream: "EVENTS".into()
            })
        );
        assert!(NatsUrl::detect("nats://h:1/").unwrap().is_err());
        assert!(NatsUrl::detect("nats://h:1/a.b").unwrap().is_err());
    }

    #[test]
    fn partitions_are_stable_and_spread() {
        assert_eq!(partition_of(b"abc", 16), partition_of(b"abc", 16));
        // FNV-1a of "a" is 0xaf63dc4c8601ec8c.
        assert_eq!(partition_of(b"a", 16), (0xaf63dc4c8601ec8c_u64 % 16) as u32);
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            counts[partition_of(uuid_like(i).as_bytes(), 16) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800 && c < 1200), "{counts:?}");
    }

    fn uuid_like(i: u32) -> String {
        format!(
            "{i:08x}-0000-4000-8000-{:012x}",
            i.wrapping_mul(2_654_435_761)
        )
    }

    #[test]
    fn lines_are_keyed_by_their_first_field() {
        assert_eq!(line_key(b"id-1,2,view"), b"id-1");
        assert_eq!(line_key(b" \"id-1\" ,2"), b"id-1");
        assert_eq!(line_key(b"no comma"), b"no comma");
    }
}
