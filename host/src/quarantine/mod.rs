//! `host quarantine`: the records that did not reach the table
//! (`pipeline.quarantine`), listed (`list`) and run again through the
//! current chain once what refused them is fixed (`replay`).
//!
//! Both read only the rows still open, `replayed_batch IS NULL`; a replay
//! marks the rows it handled with the batch that committed them and keeps
//! them for audit. Neither takes the running host's pipeline lock or
//! touches its lease: they run beside `host run` on the same database.

pub mod list;
pub mod replay;

use anyhow::Context;
use tokio_postgres::{Client, NoTls};

use crate::sink::{redact, schema};

/// A kind of quarantined record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The parser could not read it (kept as its raw text).
    Malformed,
    /// A stage rejected it, with its reason.
    Rejected,
    /// A stage failed on it (trap, time or memory limit, bad output).
    Failed,
    /// PostgreSQL refused the row.
    Refused,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Malformed => "malformed",
            Kind::Rejected => "rejected",
            Kind::Failed => "failed",
            Kind::Refused => "refused",
        }
    }
}

/// Which open rows a command reads.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Empty: the command's default kinds.
    pub kinds: Vec<Kind>,
    pub stage: Option<String>,
    /// A part of the reason, in any case.
    pub reason: Option<String>,
    /// RFC 3339 time or date, or a duration back from now ("2h", "30m").
    pub since: Option<String>,
}

/// The WHERE clause of open rows matching a filter; its parameters are
/// `Filter::params` ($1 to $4).
pub const WHERE_OPEN: &str = "replayed_batch IS NULL AND kind = ANY($1::text[])
    AND ($2::text IS NULL OR stage = $2::text)
    AND ($3::text IS NULL OR strpos(lower(reason), lower($3::text)) > 0)
    AND ($4::text IS NULL OR at >= $4::text::timestamptz)";

/// The values of `WHERE_OPEN`'s parameters.
pub struct Params {
    pub kinds: Vec<String>,
    pub stage: Option<String>,
    pub reason: Option<String>,
    pub since: Option<String>,
}

impl Filter {
    /// `defaults` are the kinds read when the filter names none.
    pub fn params(&self, defaults: &[Kind]) -> anyhow::Result<Params> {
        let kinds = if self.kinds.is_empty() {
            defaults
        } else {
            &self.kinds
        };
        Ok(Params {
            kinds: kinds.iter().map(|k| k.as_str().to_owned()).collect(),
            stage: self.stage.clone(),
            reason: self.reason.clone().filter(|r| !r.is_empty()),
            since: self.since.as_deref().map(since).transpose()?,
        })
    }
}

/// `--since`: a duration back from now, or a time PostgreSQL reads.
fn since(text: &str) -> anyhow::Result<String> {
    match crate::stage::limits::parse_duration(text) {
        Ok(ago) => {
            let ago = chrono::Duration::from_std(ago)
                .with_context(|| format!("--since {text}: too long ago"))?;
            Ok((chrono::Utc::now() - ago).to_rfc3339())
        }
        Err(_) => Ok(text.to_owned()),
    }
}

/// Connects (the connection is driven on `rt`) and brings the schema up
/// to date, as a starting host would.
pub fn connect(rt: &tokio::runtime::Runtime, url: &str) -> anyhow::Result<Client> {
    rt.block_on(async {
        let (mut client, connection) = tokio_postgres::connect(url, NoTls)
            .await
            .with_context(|| format!("cannot connect to PostgreSQL at {}", redact(url)))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!("database connection lost: {e}");
            }
        });
        schema::migrate(&mut client)
            .await
            .context("cannot bring the database's schema up to date")?;
        Ok(client)
    })
}

/// The database URL, or what to do without one.
pub fn database_url(url: Option<String>) -> anyhow::Result<String> {
    url.filter(|u| !u.is_empty()).ok_or_else(|| {
        anyhow::anyhow!(
            "no database: pass --database-url or set DATABASE_URL (an embedded host prints its URL at start)"
        )
    })
}
