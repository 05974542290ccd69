//! The WebAssembly binding of the transform rules (see the crate docs).

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{is_normal, normalise_type, rejection, Config, Fields};

wit_bindgen::generate!({ world: "plugin", path: "../../../wit" });

use ecommerce::pipeline::types::{BatchResult, Event, Rejected};
use exports::ecommerce::pipeline::stage::Guest;

thread_local! {
    static CONFIG: RefCell<Config> = RefCell::new(Config::default());
}

struct Transform;

impl Guest for Transform {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        let parsed = Config::parse(&config)?;
        log(
            2,
            &format!(
                "transform: allowed event types [{}], max future skew {} s",
                parsed.allowed.join(", "),
                parsed.max_future_skew_us / 1_000_000
            ),
        );
        CONFIG.with(|c| *c.borrow_mut() = parsed);
        Ok(())
    }

    fn process(batch: Vec<Event>) -> Result<BatchResult, String> {
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        CONFIG.with(|config| {
            let config = config.borrow();
            let mut events = Vec::with_capacity(batch.len());
            let mut rejected = Vec::new();
            for mut event in batch {
                if !is_normal(&event.event_type) {
                    event.event_type = normalise_type(&event.event_type);
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
                "transform is stateless; refusing a {}-byte snapshot",
                state.len()
            ))
        }
    }
}

export!(Transform);
