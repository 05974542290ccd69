//! The WebAssembly binding of the transform rules (see the crate docs).

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{is_normal, normalise_type, rejection, Config, Fields};

wit_bindgen::generate!({ world: "columnar-plugin", path: "../../../wit" });

use ecommerce::pipeline::types::{BatchResult, Event, Rejected};
use exports::ecommerce::pipeline::columns::{self, ColumnsResult, EventColumns, TextColumn};
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
        let now_us = now_us();
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

/// What the rules make of one event of a batch in columns.
enum Verdict {
    Keep,
    /// Kept, with its type normalised to this.
    Renamed(String),
    Reject(Rejected),
}

impl columns::Guest for Transform {
    fn process_columns(batch: EventColumns) -> Result<ColumnsResult, String> {
        let now_us = now_us();
        let verdicts: Vec<Verdict> = CONFIG.with(|config| {
            let config = config.borrow();
            let ids = ::columns::values(&batch.event_id.data, &batch.event_id.ends);
            let types = ::columns::values(&batch.event_type.data, &batch.event_type.ends);
            ids.zip(types)
                .enumerate()
                .map(|(i, (event_id, raw_type))| {
                    let renamed = (!is_normal(raw_type)).then(|| normalise_type(raw_type));
                    let fields = Fields {
                        event_id,
                        user_id: batch.user_id[i],
                        event_type: renamed.as_deref().unwrap_or(raw_type),
                        product_id: batch.product_id[i],
                        price_cents: batch.price_cents[i],
                        event_time: batch.event_time[i],
                    };
                    if let Some(reason) = rejection(&fields, &config, now_us) {
                        return Verdict::Reject(Rejected {
                            event: event(&fields),
                            reason,
                        });
                    }
                    match renamed {
                        Some(renamed) => Verdict::Renamed(renamed),
                        None => Verdict::Keep,
                    }
                })
                .collect()
        });
        let renamed = |i: usize| match &verdicts[i] {
            Verdict::Renamed(t) => Some(t.as_str()),
            _ => None,
        };
        let keep: Vec<bool> = verdicts
            .iter()
            .map(|v| !matches!(v, Verdict::Reject(_)))
            .collect();
        let renames = verdicts.iter().any(|v| matches!(v, Verdict::Renamed(_)));
        // Most batches reject nothing: every column but the renamed types
        // goes back as it came, without a copy.
        let events = if keep.iter().all(|&k| k) {
            let event_type = match renames {
                true => text(::columns::kept_text(
                    &batch.event_type.data,
                    &batch.event_type.ends,
                    &keep,
                    renamed,
                )),
                false => batch.event_type,
            };
            EventColumns {
                event_type,
                ..batch
            }
        } else {
            let (ids, types) = (&batch.event_id, &batch.event_type);
            EventColumns {
                event_id: text(::columns::kept_text(&ids.data, &ids.ends, &keep, |_| None)),
                user_id: ::columns::kept(&batch.user_id, &keep),
                event_type: text(::columns::kept_text(
                    &types.data,
                    &types.ends,
                    &keep,
                    renamed,
                )),
                product_id: ::columns::kept(&batch.product_id, &keep),
                price_cents: ::columns::kept(&batch.price_cents, &keep),
                event_time: ::columns::kept(&batch.event_time, &keep),
            }
        };
        let rejected = verdicts
            .into_iter()
            .filter_map(|v| match v {
                Verdict::Reject(r) => Some(r),
                _ => None,
            })
            .collect();
        Ok(ColumnsResult { events, rejected })
    }
}

fn text(t: ::columns::Text) -> TextColumn {
    TextColumn {
        data: t.data,
        ends: t.ends,
    }
}

fn event(f: &Fields) -> Event {
    Event {
        event_id: f.event_id.to_owned(),
        user_id: f.user_id,
        event_type: f.event_type.to_owned(),
        product_id: f.product_id,
        price_cents: f.price_cents,
        event_time: f.event_time,
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

export!(Transform);
