//! The `transform` stage: normalises `event_type` and rejects events that
//! must not reach the table, each with a reason a person can act on.
//!
//! Config (all optional; any other key refuses the stage):
//! - `allowed-event-types`: comma separated, default
//!   `view,add_to_cart,remove_from_cart,purchase`
//! - `max-future-skew-seconds`: how far past "now" an event time may be,
//!   default 300 (the manifest must grant "clock", or now reads as zero)
//!
//! The rules are plain functions here so they are unit-tested on the
//! native target; `component` is the thin WebAssembly binding, compiled
//! only for wasm32.

#[cfg(target_arch = "wasm32")]
mod component;

use std::borrow::Cow;

/// NUMERIC(10,2) holds at most 99999999.99.
pub const MAX_PRICE_CENTS: i64 = 99_999_999_99;
/// A UUID in text form; the column is sized for it.
pub const MAX_EVENT_ID_CHARS: usize = 36;
/// The event_type column's size: an allowed type must fit it.
pub const MAX_EVENT_TYPE_CHARS: usize = 20;
pub const DEFAULT_ALLOWED: &str = "view,add_to_cart,remove_from_cart,purchase";
pub const DEFAULT_MAX_FUTURE_SKEW_SECONDS: i64 = 300;
const KNOWN_KEYS: &str = "allowed-event-types, max-future-skew-seconds";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Normalised, in the order given, so the reason lists them as configured.
    pub allowed: Vec<String>,
    pub max_future_skew_seconds: i64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            allowed: DEFAULT_ALLOWED.split(',').map(str::to_owned).collect(),
            max_future_skew_seconds: DEFAULT_MAX_FUTURE_SKEW_SECONDS,
        }
    }
}

impl Config {
    pub fn parse(pairs: &[(String, String)]) -> Result<Config, String> {
        let mut config = Config::default();
        for (key, value) in pairs {
            match key.as_str() {
                "allowed-event-types" => {
                    // Normalised like the events, so `AddToCart` in the
                    // manifest means what a reader expects.
                    let mut allowed: Vec<String> = Vec::new();
                    for t in value.split(',').map(|t| normalise_type(t).into_owned()) {
                        if !t.is_empty() && !allowed.contains(&t) {
                            allowed.push(t);
                        }
                    }
                    if let Some(long) = allowed.iter().find(|t| t.chars().count() > MAX_EVENT_TYPE_CHARS) {
                        return Err(format!(
                            "config allowed-event-types names {long:?}, longer than the \
                             {MAX_EVENT_TYPE_CHARS} characters the event_type column holds"
                        ));
                    }
                    if allowed.is_empty() {
                        return Err(format!(
                            "config allowed-event-types {value:?} names no event type"
                        ));
                    }
                    config.allowed = allowed;
                }
                "max-future-skew-seconds" => {
                    config.max_future_skew_seconds = value
                        .trim()
                        .parse::<i64>()
                        .ok()
                        .filter(|s| (0..=i64::MAX / 1_000_000).contains(s))
                        .ok_or_else(|| {
                            format!(
                                "config max-future-skew-seconds {value:?} is not a whole, \
                                 non-negative number of seconds"
                            )
                        })?;
                }
                other => {
                    return Err(format!(
                        "unknown config key {other:?} (known: {KNOWN_KEYS})"
                    ))
                }
            }
        }
        Ok(config)
    }

    /// The line logged at init, so an operator sees what is in force.
    pub fn describe(&self) -> String {
        format!(
            "transform: allowed-event-types = {}; max-future-skew-seconds = {}",
            self.allowed.join(","),
            self.max_future_skew_seconds
        )
    }
}

/// `AddToCart`, `add-to-cart`, ` Add To Cart `, `ADD_TO_CART` -> `add_to_cart`.
///
/// Borrows when the input is already normal, which is nearly always: most
/// producers already send snake_case.
pub fn normalise_type(raw: &str) -> Cow<'_, str> {
    let is_normal = !raw.is_empty()
        && raw
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !raw.starts_with('_')
        && !raw.ends_with('_')
        && !raw.contains("__");
    if is_normal {
        return Cow::Borrowed(raw);
    }
    let chars: Vec<char> = raw.trim().chars().collect();
    let mut out = String::with_capacity(raw.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if c == '-' || c == '_' || c.is_whitespace() {
            if !out.is_empty() && !out.ends_with('_') {
                out.push('_');
            }
            continue;
        }
        if c.is_uppercase() && !out.is_empty() && !out.ends_with('_') {
            let prev = chars[i - 1];
            let next_is_lower = chars.get(i + 1).is_some_and(|n| n.is_lowercase());
            // `addToCart` splits before T; `XMLHttp` splits before the H of
            // Http, not between the letters of the acronym.
            if prev.is_lowercase() || prev.is_ascii_digit() || (prev.is_uppercase() && next_is_lower)
            {
                out.push('_');
            }
        }
        out.extend(c.to_lowercase());
    }
    while out.ends_with('_') {
        out.pop();
    }
    Cow::Owned(out)
}

/// The fields the rules look at, borrowed from an event, so the rules do
/// not depend on the generated bindings.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    pub event_id: &'a str,
    pub user_id: i32,
    /// Already normalised.
    pub event_type: &'a str,
    pub product_id: i32,
    pub price_cents: i64,
    pub event_time: i64,
}

/// Why the event must be rejected, or None to keep it. Every broken rule is
/// named, so one look at the quarantine row tells the whole story.
pub fn rejection(f: &Fields, config: &Config, now_us: i64) -> Option<String> {
    let mut reasons: Vec<String> = Vec::new();
    if !config.allowed.iter().any(|t| t == f.event_type) {
        reasons.push(format!(
            "event_type {:?} is not allowed (allowed: {})",
            f.event_type,
            config.allowed.join(", ")
        ));
    }
    if f.price_cents < 0 {
        reasons.push(format!(
            "price_cents {} is negative ({})",
            f.price_cents,
            money(f.price_cents)
        ));
    } else if f.price_cents > MAX_PRICE_CENTS {
        reasons.push(format!(
            "price_cents {} ({}) does not fit NUMERIC(10,2) (at most 99999999.99)",
            f.price_cents,
            money(f.price_cents)
        ));
    }
    if f.user_id <= 0 {
        reasons.push(format!("user_id {} is not positive", f.user_id));
    }
    if f.product_id <= 0 {
        reasons.push(format!("product_id {} is not positive", f.product_id));
    }
    let skew_us = config.max_future_skew_seconds.saturating_mul(1_000_000);
    if f.event_time > now_us.saturating_add(skew_us) {
        reasons.push(format!(
            "event_time {} us is {} s in the future (allowed skew: {} s)",
            f.event_time,
            f.event_time.saturating_sub(now_us) / 1_000_000,
            config.max_future_skew_seconds
        ));
    }
    let id_chars = f.event_id.chars().count();
    if id_chars == 0 {
        // VARCHAR(36) would take it, but an empty primary key is never a real id.
        reasons.push("event_id \"\" is empty".to_string());
    } else if id_chars > MAX_EVENT_ID_CHARS {
        reasons.push(format!(
            "event_id {:?} has {id_chars} characters (at most {MAX_EVENT_ID_CHARS})",
            f.event_id
        ));
    }
    if reasons.is_empty() {
        None
    } else {
        Some(reasons.join("; "))
    }
}

/// Cents as the decimal a person would type, e.g. -1 -> "-0.01".
fn money(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000_000;

    fn good() -> Fields<'static> {
        Fields {
            event_id: "550e8400-e29b-41d4-a716-446655440000",
            user_id: 1,
            event_type: "view",
            product_id: 2,
            price_cents: 999,
            event_time: NOW,
        }
    }

    fn reason(f: Fields) -> String {
        rejection(&f, &Config::default(), NOW).expect("should be rejected")
    }

    fn pairs(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn normalises_spellings() {
        for raw in [
            "AddToCart",
            "add-to-cart",
            " Add To Cart ",
            "ADD_TO_CART",
            "add_to_cart",
            "addToCart",
            "add__to--cart",
            "\tadd to\tcart\n",
            "Add-To-Cart_",
        ] {
            assert_eq!(normalise_type(raw), "add_to_cart", "{raw:?}");
        }
        assert_eq!(normalise_type("VIEW"), "view");
        assert_eq!(normalise_type(" Purchase "), "purchase");
        assert_eq!(normalise_type("RemoveFromCart"), "remove_from_cart");
        assert_eq!(normalise_type("XMLHttpView"), "xml_http_view");
        assert_eq!(normalise_type("step2Done"), "step2_done");
        assert_eq!(normalise_type("   "), "");
    }

    #[test]
    fn normal_types_are_borrowed() {
        assert!(matches!(normalise_type("add_to_cart"), Cow::Borrowed(_)));
        assert!(matches!(normalise_type("View"), Cow::Owned(_)));
    }

    #[test]
    fn a_good_event_is_kept() {
        assert_eq!(rejection(&good(), &Config::default(), NOW), None);
        let edge = Fields {
            price_cents: MAX_PRICE_CENTS,
            event_id: "x",
            ..good()
        };
        assert_eq!(rejection(&edge, &Config::default(), NOW), None);
        let free = Fields {
            price_cents: 0,
            ..good()
        };
        assert_eq!(rejection(&free, &Config::default(), NOW), None);
    }

    #[test]
    fn disallowed_type_names_the_value_and_the_allowed_set() {
        assert_eq!(
            reason(Fields {
                event_type: "refund",
                ..good()
            }),
            "event_type \"refund\" is not allowed \
             (allowed: view, add_to_cart, remove_from_cart, purchase)"
        );
    }

    #[test]
    fn prices_outside_numeric_10_2_are_rejected() {
        assert_eq!(
            reason(Fields {
                price_cents: -1,
                ..good()
            }),
            "price_cents -1 is negative (-0.01)"
        );
        let r = reason(Fields {
            price_cents: MAX_PRICE_CENTS + 1,
            ..good()
        });
        assert!(r.contains("price_cents 10000000000 (100000000.00)"), "{r}");
        assert!(r.contains("NUMERIC(10,2)"), "{r}");
    }

    #[test]
    fn ids_must_be_positive() {
        assert_eq!(
            reason(Fields {
                user_id: 0,
                ..good()
            }),
            "user_id 0 is not positive"
        );
        assert_eq!(
            reason(Fields {
                product_id: -3,
                ..good()
            }),
            "product_id -3 is not positive"
        );
    }

    #[test]
    fn future_events_beyond_the_skew_are_rejected() {
        let at = |secs: i64| Fields {
            event_time: NOW + secs * 1_000_000,
            ..good()
        };
        assert_eq!(rejection(&at(300), &Config::default(), NOW), None);
        let r = reason(at(301));
        assert!(r.starts_with("event_time "), "{r}");
        assert!(r.contains("301 s in the future (allowed skew: 300 s)"), "{r}");
        // Old events are fine: late data is still data.
        assert_eq!(rejection(&at(-86_400 * 365), &Config::default(), NOW), None);
    }

    #[test]
    fn long_event_ids_are_rejected() {
        let id = "550e8400-e29b-41d4-a716-446655440000x";
        let r = reason(Fields {
            event_id: id,
            ..good()
        });
        assert_eq!(
            r,
            format!("event_id {id:?} has 37 characters (at most 36)")
        );
        assert_eq!(
            reason(Fields {
                event_id: "",
                ..good()
            }),
            "event_id \"\" is empty"
        );
        // Characters, not bytes: VARCHAR(36) counts characters.
        let wide = "é".repeat(36);
        assert_eq!(
            rejection(
                &Fields {
                    event_id: &wide,
                    ..good()
                },
                &Config::default(),
                NOW
            ),
            None
        );
    }

    #[test]
    fn every_broken_rule_is_reported() {
        let r = reason(Fields {
            event_type: "refund",
            user_id: -1,
            product_id: 0,
            ..good()
        });
        assert_eq!(r.split("; ").count(), 3, "{r}");
    }

    #[test]
    fn config_defaults_and_overrides() {
        assert_eq!(Config::parse(&[]).unwrap(), Config::default());
        let c = Config::parse(&pairs(&[
            ("allowed-event-types", "View, AddToCart,,view"),
            ("max-future-skew-seconds", " 60 "),
        ]))
        .unwrap();
        assert_eq!(c.allowed, vec!["view", "add_to_cart"]);
        assert_eq!(c.max_future_skew_seconds, 60);
        assert_eq!(
            c.describe(),
            "transform: allowed-event-types = view,add_to_cart; max-future-skew-seconds = 60"
        );
        let r = rejection(
            &Fields {
                event_type: "purchase",
                ..good()
            },
            &c,
            NOW,
        )
        .unwrap();
        assert!(r.contains("(allowed: view, add_to_cart)"), "{r}");
    }

    #[test]
    fn config_errors_name_the_key_and_value() {
        let e = Config::parse(&pairs(&[("colour", "red")])).unwrap_err();
        assert!(e.contains("\"colour\""), "{e}");
        for bad in ["soon", "-5", "1.5", ""] {
            let e = Config::parse(&pairs(&[("max-future-skew-seconds", bad)])).unwrap_err();
            assert!(
                e.contains("max-future-skew-seconds") && e.contains(&format!("{bad:?}")),
                "{e}"
            );
        }
        let e = Config::parse(&pairs(&[("allowed-event-types", " , ")])).unwrap_err();
        assert!(e.contains("allowed-event-types"), "{e}");
        let e = Config::parse(&pairs(&[(
            "allowed-event-types",
            "view,a_type_name_of_twenty_one",
        )]))
        .unwrap_err();
        assert!(e.contains("\"a_type_name_of_twenty_one\""), "{e}");
    }
}
