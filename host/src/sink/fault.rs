//! What a database error means for the batch that met it: one small type,
//! as Vector's `RetryLogic::is_retriable_error`, so the sink's commit loop
//! reads as a decision and not as a list of codes.
//!
//! - `Transient`: the server or the path to it is in trouble (connection
//!   lost, admin shutdown, serialization failure, too many connections,
//!   disk full...). The batch is fine: retry it with capped backoff.
//! - `Data`: the database refuses a value of the batch (SQLSTATE classes
//!   22 and 23). Retrying the same rows fails the same way: the sink
//!   bisects the batch, quarantines the rows refused and commits the rest.
//! - `Persistent`: neither the rows nor the network: the schema or the
//!   permissions are wrong (class 42, 3D, 28...). Only an operator can
//!   fix it; the sink retries with backoff and says so at ERROR.

use tokio_postgres::error::SqlState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Transient,
    Data,
    Persistent,
}

impl Fault {
    /// The class of a SQLSTATE code (five characters, the first two its class).
    pub fn of_code(code: &str) -> Fault {
        match code.get(..2).unwrap_or("") {
            // connection exception, invalid transaction state (an idle
            // session timed out), transaction rollback (serialization
            // failure, deadlock), insufficient resources (disk full, too
            // many connections), object in use / lock not available,
            // operator intervention (admin shutdown, crash recovery,
            // query canceled by a statement timeout), system error (I/O).
            "08" | "25" | "40" | "53" | "55" | "57" | "58" => Fault::Transient,
            // data exception (too long, out of range, NUL, bad encoding),
            // integrity constraint violation (NOT NULL, CHECK, FK, unique).
            "22" | "23" => Fault::Data,
            _ => Fault::Persistent,
        }
    }

    /// What a `tokio_postgres` error is: one without a SQLSTATE is the
    /// connection's (I/O, closed, timeout) and so transient.
    pub fn of(e: &tokio_postgres::Error) -> Fault {
        match e.code() {
            Some(code) => Fault::of_code(code.code()),
            None => Fault::Transient,
        }
    }
}

/// Whether `e` is the unique violation the sink handles itself (a row the
/// table already has: it then goes through `ON CONFLICT DO NOTHING`).
pub fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

/// Whether the server ended the transaction to break a deadlock: two
/// batches in flight, each holding a row the other inserts.
pub fn is_deadlock(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED)
}

/// The database's own words for an error: its SQLSTATE, message, detail,
/// hint and the column or constraint concerned, never the bare `db
/// error` of `tokio_postgres::Error`'s Display; for an error without a
/// SQLSTATE, its chain of causes (`connection closed`, the I/O error...).
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            text.push_str(&format!(" (detail: {detail})"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!(" (hint: {hint})"));
        }
        if let Some(column) = db.column() {
            text.push_str(&format!(" (column {column})"));
        }
        if let Some(constraint) = db.constraint() {
            text.push_str(&format!(" (constraint {constraint})"));
        }
        if let Some(where_) = db.where_() {
            text.push_str(&format!(" (where: {where_})"));
        }
        return text.replace('\0', "\\0");
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_and_server_trouble_is_transient() {
        for code in [
            "08006", // connection failure
            "08003", // connection does not exist
            "40001", // serialization failure
            "40P01", // deadlock
            "53100", // disk full
            "53300", // too many connections
            "57P01", // admin shutdown
            "57P03", // cannot connect now (starting up)
            "57014", // query canceled (statement timeout)
            "55P03", // lock not available
            "58030", // I/O error
            "25P03", // idle in transaction session timeout
        ] {
            assert_eq!(Fault::of_code(code), Fault::Transient, "{code}");
        }
    }

    #[test]
    fn refused_values_are_data_errors() {
        for code in [
            "22001", // string data right truncation (VARCHAR too long)
            "22003", // numeric value out of range
            "22021", // character not in repertoire (NUL)
            "22P05", // untranslatable character
            "23502", // not null violation
            "23514", // check violation
            "23503", // foreign key violation
            "23505", // unique violation (handled apart, still data)
        ] {
            assert_eq!(Fault::of_code(code), Fault::Data, "{code}");
        }
    }

    #[test]
    fn schema_and_permission_problems_need_an_operator() {
        for code in [
            "42P01", "42501", "42703", "3D000", "28P01", "0A000", "", "4",
        ] {
            assert_eq!(Fault::of_code(code), Fault::Persistent, "{code:?}");
        }
    }
}
