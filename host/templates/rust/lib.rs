//! The `{{name}}` stage. It lower-cases `event_type` and rejects events
//! with a negative price: replace the rules in `process` with yours.
//! Build: `bash build.sh`; try it: `host plugin test ../../{{name}}.wasm --input sample.csv`.

wit_bindgen::generate!({ world: "plugin", path: "wit" });

use ecommerce::pipeline::types::{BatchResult, Event, Rejected};
use exports::ecommerce::pipeline::stage::Guest;

struct Stage;

impl Guest for Stage {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        log(2, &format!("{{name}}: started with {} settings", config.len()));
        Ok(())
    }

    fn process(batch: Vec<Event>) -> Result<BatchResult, String> {
        let mut events = Vec::with_capacity(batch.len());
        let mut rejected = Vec::new();
        for mut event in batch {
            if event.price_cents < 0 {
                rejected.push(Rejected { event, reason: "negative price".into() });
                continue;
            }
            event.event_type = event.event_type.to_lowercase();
            events.push(event);
        }
        Ok(BatchResult { events, rejected })
    }

    fn snapshot() -> Vec<u8> {
        Vec::new()
    }

    fn restore(_state: Vec<u8>) -> Result<(), String> {
        Ok(())
    }
}

export!(Stage);
