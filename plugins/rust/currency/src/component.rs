//! The WebAssembly binding of the currency rules (see the crate docs).

use std::cell::RefCell;

use crate::{rejection, Conversion};

wit_bindgen::generate!({ world: "plugin", path: "../../../wit" });

use ecommerce::pipeline::types::{BatchResult, Event, Rejected};
use exports::ecommerce::pipeline::stage::Guest;

thread_local! {
    static CONVERSION: RefCell<Option<Conversion>> = const { RefCell::new(None) };
}

struct Currency;

impl Guest for Currency {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        let conversion = Conversion::from_config(&config)?;
        log(
            2,
            &format!(
                "currency: {} -> {}, multiplying prices by {}/{}",
                conversion.source, conversion.target, conversion.num, conversion.den
            ),
        );
        CONVERSION.with(|c| *c.borrow_mut() = Some(conversion));
        Ok(())
    }

    fn process(batch: Vec<Event>) -> Result<BatchResult, String> {
        CONVERSION.with(|c| {
            let c = c.borrow();
            let conversion = c.as_ref().ok_or("currency: process called before init")?;
            let mut events = Vec::with_capacity(batch.len());
            let mut rejected = Vec::new();
            for mut event in batch {
                let converted = conversion.convert(event.price_cents);
                match rejection(converted) {
                    Some(reason) => rejected.push(Rejected { event, reason }),
                    None => {
                        // In range of NUMERIC(10,2), so in range of i64.
                        event.price_cents = converted as i64;
                        events.push(event);
                    }
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
            Err("currency is stateless; refusing a non-empty snapshot".into())
        }
    }
}

export!(Currency);
