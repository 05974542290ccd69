//! The WebAssembly binding of the dedup stage: exports the `stage`
//! interface of `wit/pipeline.wit` over [`crate::Dedup`].

use std::cell::RefCell;

use crate::{Config, Dedup};

wit_bindgen::generate!({ world: "plugin", path: "../../../wit" });

use ecommerce::pipeline::types::{BatchResult, Event};
use exports::ecommerce::pipeline::stage::Guest;

// A component instance is single-threaded; a thread-local avoids the
// `static mut` a global would otherwise need.
thread_local! {
    static STATE: RefCell<Dedup> = RefCell::new(Dedup::new(Config::default()));
}

struct DedupStage;

impl Guest for DedupStage {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        let parsed = Config::parse(&config)?;
        log(2, &parsed.describe());
        STATE.with(|s| *s.borrow_mut() = Dedup::new(parsed));
        Ok(())
    }

    fn process(batch: Vec<Event>) -> Result<BatchResult, String> {
        STATE.with(|state| {
            let mut state = state.borrow_mut();
            let events = batch
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
        let result = STATE.with(|s| s.borrow_mut().restore(&state));
        if result.is_ok() {
            STATE.with(|s| {
                log(
                    2,
                    &format!(
                        "dedup: restored {} ids from a {}-byte snapshot",
                        s.borrow().len(),
                        state.len()
                    ),
                )
            });
        }
        result
    }
}

export!(DedupStage);
