//! What a row must be to fit `ecommerce_events` (see `schema`): checked
//! before anything reaches the table, so that a value PostgreSQL would
//! refuse is quarantined with the culprit named instead of failing a COPY.
//!
//! The parser checks what it read from a file (a violation is `malformed`,
//! with the column and value); the stage chain checks what each stage
//! returns (a violation is a failure of that stage). The sink still
//! bisects a batch the database refuses, for what no check here foresaw.

use std::fmt;

use crate::stage::Event;

/// `event_id VARCHAR(36)`.
pub const MAX_EVENT_ID: usize = 36;
/// `event_type VARCHAR(20)`: PostgreSQL counts characters, not bytes.
pub const MAX_EVENT_TYPE: usize = 20;
/// `price NUMERIC(10,2)` holds at most 99999999.99.
pub const MAX_PRICE_CENTS: u64 = 9_999_999_999;
/// PostgreSQL's TIMESTAMP starts at 4713 BC; every later i64 microsecond
/// count fits (its end, 294276 AD, is past i64::MAX from 1970).
pub const MIN_EVENT_TIME_US: i64 = -210_866_803_200_000_000;

/// A value that does not fit its column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub column: &'static str,
    /// The value, as text (strings quoted and escaped).
    pub value: String,
    /// What the column requires.
    pub problem: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.column, self.value, self.problem)
    }
}

impl std::error::Error for Violation {}

/// The first column of `event` that the table would refuse, if any.
pub fn check(event: &Event) -> Result<(), Violation> {
    text("event_id", &event.event_id, MAX_EVENT_ID)?;
    text("event_type", &event.event_type, MAX_EVENT_TYPE)?;
    if event.price_cents.unsigned_abs() > MAX_PRICE_CENTS {
        return Err(Violation {
            column: "price",
            value: format!("{} cents", event.price_cents),
            problem: "does not fit NUMERIC(10,2) (at most 99999999.99 either way)".into(),
        });
    }
    if event.event_time < MIN_EVENT_TIME_US {
        return Err(Violation {
            column: "event_time",
            value: format!("{} us", event.event_time),
            problem: "is before PostgreSQL's earliest timestamp (4713 BC)".into(),
        });
    }
    Ok(())
}

/// A VARCHAR(max) that PostgreSQL text can hold: 1 to `max` characters
/// and no NUL (which no PostgreSQL text value can hold).
fn text(column: &'static str, value: &str, max: usize) -> Result<(), Violation> {
    // The common case without counting characters: a value of 1 to `max`
    // bytes has 1 to `max` characters.
    let bytes = value.as_bytes();
    if !bytes.is_empty() && bytes.len() <= max && !bytes.contains(&0) {
        return Ok(());
    }
    let violation = |problem: String| Violation {
        column,
        value: format!("{value:?}"),
        problem,
    };
    if value.contains('\0') {
        return Err(violation(
            "holds a NUL byte, which PostgreSQL text cannot store".into(),
        ));
    }
    let chars = value.chars().count();
    if chars == 0 {
        return Err(violation("is empty".into()));
    }
    if chars > max {
        return Err(violation(format!(
            "has {chars} characters; the column holds at most {max}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        Event {
            event_id: "550e8400-e29b-41d4-a716-446655440000".into(),
            user_id: 1,
            event_type: "view".into(),
            product_id: 2,
            price_cents: 999,
            event_time: 0,
        }
    }

    fn column_of(e: Event) -> Option<&'static str> {
        check(&e).err().map(|v| v.column)
    }

    #[test]
    fn a_fitting_event_passes() {
        assert_eq!(column_of(event()), None);
        let edge = Event {
            price_cents: -9_999_999_999,
            event_type: "é".repeat(20),
            event_time: MIN_EVENT_TIME_US,
            ..event()
        };
        assert_eq!(column_of(edge), None);
    }

    #[test]
    fn event_type_is_measured_in_characters() {
        // 20 two-byte characters are 40 bytes and fit VARCHAR(20).
        assert_eq!(
            column_of(Event {
                event_type: "ü".repeat(20),
                ..event()
            }),
            None
        );
        let long = Event {
            event_type: "x".repeat(21),
            ..event()
        };
        let v = check(&long).unwrap_err();
        assert_eq!(v.column, "event_type");
        assert!(v.to_string().contains("21 characters"), "{v}");
        assert_eq!(
            column_of(Event {
                event_type: String::new(),
                ..event()
            }),
            Some("event_type")
        );
    }

    #[test]
    fn nul_bytes_are_refused_and_shown_escaped() {
        let v = check(&Event {
            event_type: "vi\0ew".into(),
            ..event()
        })
        .unwrap_err();
        assert_eq!(v.column, "event_type");
        assert!(v.to_string().contains("\"vi\\0ew\""), "{v}");
        assert!(!v.to_string().contains('\0'));
        assert_eq!(
            column_of(Event {
                event_id: "a\0".into(),
                ..event()
            }),
            Some("event_id")
        );
    }

    #[test]
    fn price_limits_hold_at_the_extremes_of_i64() {
        // i64::MIN.abs() wraps to i64::MIN, which is "small": unsigned_abs is not fooled.
        for cents in [i64::MIN, i64::MAX, 10_000_000_000, -10_000_000_000] {
            assert_eq!(
                column_of(Event {
                    price_cents: cents,
                    ..event()
                }),
                Some("price"),
                "{cents}"
            );
        }
        assert_eq!(
            column_of(Event {
                price_cents: 9_999_999_999,
                ..event()
            }),
            None
        );
    }

    #[test]
    fn times_before_postgres_epoch_range_are_refused() {
        assert_eq!(
            column_of(Event {
                event_time: i64::MIN,
                ..event()
            }),
            Some("event_time")
        );
        assert_eq!(
            column_of(Event {
                event_time: i64::MAX,
                ..event()
            }),
            None
        );
        assert_eq!(
            column_of(Event {
                event_id: "x".repeat(37),
                ..event()
            }),
            Some("event_id")
        );
    }
}
