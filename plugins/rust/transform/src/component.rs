//! The WebAssembly binding of the transform rules: exports the `stage`
//! interface of `wit/pipeline.wit` and maps its types onto the plain
//! functions of the crate root.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{normalise_type, rejection, Config, Fields};

wit_bindgen::generate!({ world: "plugin", path: "../../../wit" });

use exports::ecommerce::pipeline::stage::Guest;
use ecommerce::pipeline::types::{BatchResult, Event, Rejected};

// A component instance is single-threaded; a thread-local avoids the
// `static mut` a global would otherwise need.
thread_local! {
    static CONFIG: RefCell<Config> = RefCell::new(Config::default());
}

struct Transform;

impl Guest for Transform {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        let parsed = Config::parse(&config)?;
        log(2, &parsed.describe());
        CONFIG.with(|c| *c.borrow_mut() = parsed);
        Ok(())
    }

    fn process(batch: Vec<Event>) -> Result<BatchResult, String> {
        // Read once per batch: one host call instead of one per event, and
        // every event of a batch is judged against the same instant.
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        CONFIG.with(|config| {
            let config = config.borrow();
            let mut events = Vec::with_capacity(batch.len());
            let mut rejected = Vec::new();
            for mut event in batch {
                if let std::borrow::Cow::Owned(normal) = normalise_type(&event.event_type) {
                    event.event_type = normal;
                }
                let fields = Fields {
                    event_id: &event.event_id,
                    user_id: event.user_id,
                    event_type: &event.event_type,
                    product_id: event.product_id,
                    price_cents: event.price_cents,
                    event_time: event.event_time,
                };
                match rejection(&fields, &config, now_us) {
                    None => events.push(event),
                    Some(reason) => rejected.push(Rejected { event, reason }),
                }
            }
            Ok(BatchResult { events, rejected })
        })
    }

    fn snapshot() -> Vec<u8> {
        Vec::new()
    }

    fn restore(state: Vec<u8>) -> Result<(), String> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "transform is stateless and snapshots nothing; refusing a {}-byte state \
                 (was it taken by another stage?)",
                state.len()
            ))
        }
    }
}

export!(Transform);
