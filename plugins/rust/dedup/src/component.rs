//! The WebAssembly binding of the dedup stage (see the crate docs).

use std::cell::RefCell;

use crate::{Config, Dedup};

wit_bindgen::generate!({ world: "columnar-plugin", path: "../../../wit" });

use ecommerce::pipeline::types::{BatchResult, Event};
use exports::ecommerce::pipeline::columns::{self, ColumnsResult, EventColumns, TextColumn};
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

impl columns::Guest for DedupStage {
    fn process_columns(batch: EventColumns) -> Result<ColumnsResult, String> {
        let keep: Vec<bool> = STATE.with(|state| {
            let mut state = state.borrow_mut();
            ::columns::values(&batch.event_id.data, &batch.event_id.ends)
                .zip(&batch.event_time)
                .map(|(id, &time)| state.admit(id, time))
                .collect()
        });
        // Nearly every batch keeps every event: it goes back as it came,
        // without a copy.
        let events = match keep.iter().all(|&k| k) {
            true => batch,
            false => kept(&batch, &keep),
        };
        Ok(ColumnsResult {
            events,
            rejected: Vec::new(),
        })
    }
}

/// The events of `batch` whose `keep` is true.
fn kept(batch: &EventColumns, keep: &[bool]) -> EventColumns {
    let text = |c: &TextColumn| {
        let t = ::columns::kept_text(&c.data, &c.ends, keep, |_| None);
        TextColumn {
            data: t.data,
            ends: t.ends,
        }
    };
    EventColumns {
        event_id: text(&batch.event_id),
        user_id: ::columns::kept(&batch.user_id, keep),
        event_type: text(&batch.event_type),
        product_id: ::columns::kept(&batch.product_id, keep),
        price_cents: ::columns::kept(&batch.price_cents, keep),
        event_time: ::columns::kept(&batch.event_time, keep),
    }
}

export!(DedupStage);
