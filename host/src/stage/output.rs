//! Checks on what a stage returns, before it can reach the table: a stage
//! may change events but not invent them, and every value must fit its
//! column. A violation counts as a failure of the stage for that batch.

use std::collections::HashSet;

use super::bindings::{BatchResult, Event};

/// Why a single event cannot be written to the table, if it cannot
/// (the table's own rules: `sink::columns`).
pub fn column_violation(event: &Event) -> Option<String> {
    crate::sink::columns::check(event)
        .err()
        .map(|v| v.to_string())
}

/// Checks a stage's result against its input: every returned or rejected
/// event must carry an id from the input, and kept events must fit.
pub fn check(input: &[Event], result: &BatchResult) -> Result<(), String> {
    let ids: HashSet<&str> = input.iter().map(|e| e.event_id.as_str()).collect();
    let returned = result
        .events
        .iter()
        .chain(result.rejected.iter().map(|r| &r.event));
    for event in returned {
        if !ids.contains(event.event_id.as_str()) {
            return Err(format!(
                "event_id {:?} was not in the batch it was given",
                event.event_id
            ));
        }
    }
    if let Some(problem) = result.events.iter().find_map(column_violation) {
        return Err(problem);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::Rejected;

    fn event(id: &str, kind: &str) -> Event {
        Event {
            event_id: id.into(),
            user_id: 1,
            event_type: kind.into(),
            product_id: 1,
            price_cents: 100,
            event_time: 0,
        }
    }

    #[test]
    fn forged_ids_and_oversized_columns_are_violations() {
        let input = vec![event("a", "view")];
        let ok = BatchResult {
            events: input.clone(),
            rejected: vec![],
        };
        assert!(check(&input, &ok).is_ok());
        let forged = BatchResult {
            events: vec![event("b", "view")],
            rejected: vec![],
        };
        assert!(check(&input, &forged).unwrap_err().contains("\"b\""));
        let forged_rejection = BatchResult {
            events: vec![],
            rejected: vec![Rejected {
                event: event("c", "view"),
                reason: "x".into(),
            }],
        };
        assert!(check(&input, &forged_rejection).is_err());
        let long = BatchResult {
            events: vec![event("a", "a_very_long_event_type_name")],
            rejected: vec![],
        };
        assert!(check(&input, &long).unwrap_err().contains("event_type"));
    }
}
