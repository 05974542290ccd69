//! The WebAssembly binding of the dedup stage (see the crate docs).

use std::cell::RefCell;

use crate::{Config, Dedup};

wit_bindgen::generate!({ world: "plugin", path: "../../../wit" });

use ecommerce::pipeline::types::{BatchResult, Event};
use exports::ecommerce::pipeline::stage::Guest;

thread_local! {
    // Replaced by `init`, which the host calls first: empty until then, so
    // that the window is reserved once, at the size configured.
    static STATE: RefCell<Dedup> = RefCell::new(Dedup::default());
}

struct DedupStage;

impl Guest for DedupStage {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        let parsed = Config::parse(&config)?;
        log(
            2,
            &format!(
                "dedup: window of {} events and {} s of event time",
                parsed.window_events,
                parsed.window_us / 1_000_000
            ),
        );
        STATE.with(|s| *s.borrow_mut() = Dedup::new(parsed));
        Ok(())
    }

    fn process(batch: Vec<Event>) -> Result<BatchResult, String> {
        STATE.with(|state| {
            let mut state = state.borrow_mut();
            let events: Vec<Event> = batch
                .into_iter()
                .filter(|e| state.admit(&e.event_id, e.event_time))
                .collect();
            Ok(BatchResult {
                events,
                rejected: Vec::new(),
            })
        })
    }

    fn snapshot() -> Vec<u8> {
        STATE.with(|s| s.borrow().snapshot())
    }

    fn restore(state: Vec<u8>) -> Result<(), String> {
        STATE.with(|s| s.borrow_mut().restore(&state))
    }
}

export!(DedupStage);
