//! `host generate --output nats://HOST:PORT/STREAM`: publishes the
//! generator's files to a JetStream stream instead of writing them, one
//! CSV line a message (the header is not sent: a message is one record
//! in the default column order), each to the subject of its event id's
//! partition (see `jetstream`).
//!
//! Every message carries a `Nats-Msg-Id` made of the file name and line
//! (`events_seed7_000003.csv:41`): a publish retried after a lost reply,
//! or a seeded generator run again, is dropped by JetStream within its
//! duplicate window instead of being stored twice.

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture};
use async_nats::HeaderMap;

use crate::jetstream::{self as js, NatsError, NatsUrl};

/// Messages in flight before their acknowledgements are awaited.
const WINDOW: usize = 1000;
/// Attempts at a window of messages before giving up.
const ATTEMPTS: u32 = 30;

pub struct Publisher {
    runtime: tokio::runtime::Runtime,
    context: jetstream::Context,
    url: NatsUrl,
    partitions: u32,
}

impl Publisher {
    /// Connects and finds (or creates, with `partitions`) the stream.
    pub fn connect(url: NatsUrl, partitions: u32) -> Result<Publisher, NatsError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| NatsError::Connect {
                server: url.server.clone(),
                message: format!("cannot start the async runtime: {e}"),
            })?;
        let (context, partitions) = runtime.block_on(async {
            let client = js::connect(&url.server, |event| match event {
                async_nats::Event::Disconnected => {
                    tracing::warn!("NATS connection lost; reconnecting")
                }
                async_nats::Event::Connected => tracing::info!("NATS connection up"),
                other => tracing::debug!("NATS: {other}"),
            })
            .await?;
            let context = jetstream::new(client);
            let (_, partitions) = js::ensure_stream(&context, &url.stream, partitions).await?;
            Ok::<_, NatsError>((context, partitions))
        })?;
        tracing::info!(stream = %url, partitions, "publishing to the stream");
        Ok(Publisher {
            runtime,
            context,
            url,
            partitions,
        })
    }

    /// Publishes the records of one generated file; returns how many.
    pub fn publish_file(&self, name: &str, body: &[u8]) -> Result<usize, NatsError> {
        let records: Vec<(usize, &[u8])> = body
            .split(|&b| b == b'\n')
            .enumerate()
            // Line 1 is the header; a file ends with a line end.
            .filter(|(i, line)| *i > 0 && !line.is_empty())
            .map(|(i, line)| (i + 1, line))
            .collect();
        self.runtime.block_on(async {
            for window in records.chunks(WINDOW) {
                self.publish_window(name, window).await?;
            }
            Ok(records.len())
        })
    }

    async fn publish_window(&self, name: &str, window: &[(usize, &[u8])]) -> Result<(), NatsError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_window(name, window).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < ATTEMPTS => {
                    tracing::warn!("{e}; publishing the window again (JetStream drops what it has by Nats-Msg-Id)");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn try_window(&self, name: &str, window: &[(usize, &[u8])]) -> Result<(), NatsError> {
        let mut acks: Vec<(String, PublishAckFuture)> = Vec::with_capacity(window.len());
        for (line, record) in window {
            let partition = js::partition_of(js::line_key(record), self.partitions);
            let subject = self.url.subject(partition);
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("{name}:{line}").as_str());
            let ack = self
                .context
                .publish_with_headers(subject.clone(), headers, record.to_vec().into())
                .await
                .map_err(|e| NatsError::Publish {
                    subject: subject.clone(),
                    message: e.to_string(),
                })?;
            acks.push((subject, ack));
        }
        for (subject, ack) in acks {
            ack.await.map_err(|e| NatsError::Publish {
                subject,
                message: e.to_string(),
            })?;
        }
        Ok(())
    }
}
