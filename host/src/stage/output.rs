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
    // A stage that keeps or drops events in place (as the shipped ones
    // do) returns each list in input order: one walk proves it without
    // hashing every id. Anything else is looked up in a set.
    if !in_input_order(input, &result.events)
        || !in_input_order(input, result.rejected.iter().map(|r| &r.event))
    {
        ids_from_input(input, result)?;
    }
    if let Some(problem) = result.events.iter().find_map(column_violation) {
        return Err(problem);
    }
    Ok(())
}

/// Whether `returned` is a subsequence of `input`, by event id.
fn in_input_order<'a>(input: &[Event], returned: impl IntoIterator<Item = &'a Event>) -> bool {
    let mut rest = input.iter();
    returned
        .into_iter()
        .all(|event| rest.any(|i| i.event_id == event.event_id))
}

/// Every returned or rejected event carries an id from `input`.
fn ids_from_input(input: &[Event], result: &BatchResult) -> Result<(), String> {
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

    #[test]
    fn any_order_and_repeats_of_input_ids_pass_and_a_forged_one_is_named() {
        let input = vec![event("a", "view"), event("b", "view"), event("c", "view")];
        let result = |ids: &[&str]| BatchResult {
            events: ids.iter().map(|id| event(id, "view")).collect(),
            rejected: vec![],
        };
        for ids in [
            &["a", "c"][..],
            &["c", "a"],
            &["b", "b"],
            &["c", "b", "a"],
            &[],
        ] {
            assert!(check(&input, &result(ids)).is_ok(), "{ids:?}");
        }
        let err = check(&input, &result(&["a", "c", "x", "y"])).unwrap_err();
        assert!(err.contains("\"x\""), "{err}");
        let both = BatchResult {
            events: vec![event("b", "view")],
            rejected: vec![Rejected {
                event: event("a", "view"),
                reason: "r".into(),
            }],
        };
        assert!(check(&input, &both).is_ok());
    }
}
