//! The `transform` stage: normalises `event_type` and rejects events that
//! must not reach the table, each with a reason a person can act on.
//!
//! Config (all optional):
//! - `allowed-event-types`: comma separated, default
//!   `view,add_to_cart,remove_from_cart,purchase`
//! - `max-future-skew-seconds`: how far in the future an event time may
//!   be, default 300 (needs the "clock" grant in the manifest)
//!
//! Build: `cargo build --release --target wasm32-wasip2` in `plugins/rust`.
//! The rules live in plain functions, unit-tested on the native target;
//! `component` is the thin WebAssembly binding.

#[cfg(target_arch = "wasm32")]
mod component;

/// NUMERIC(10,2) holds at most 99999999.99.
pub const MAX_PRICE_CENTS: i64 = 9_999_999_999;
pub const DEFAULT_ALLOWED: &str = "view,add_to_cart,remove_from_cart,purchase";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub allowed: Vec<String>,
    pub max_future_skew_us: i64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            allowed: DEFAULT_ALLOWED.split(',').map(str::to_owned).collect(),
            max_future_skew_us: 300 * 1_000_000,
        }
    }
}

impl Config {
    pub fn parse(pairs: &[(String, String)]) -> Result<Config, String> {
        let mut config = Config::default();
        for (key, value) in pairs {
            match key.as_str() {
                "allowed-event-types" => {
                    config.allowed = value
                        .split(',')
                        .map(normalise_type)
                        .filter(|t| !t.is_empty())
                        .collect();
                    if config.allowed.is_empty() {
                        return Err("allowed-event-types must name at least one type".into());
                    }
                }
                "max-future-skew-seconds" => {
                    let seconds: i64 = value.trim().parse().map_err(|_| {
                        format!("max-future-skew-seconds {value:?} is not a whole number of seconds")
                    })?;
                    if seconds < 0 {
                        return Err(format!("max-future-skew-seconds {seconds} must not be negative"));
                    }
                    config.max_future_skew_us = seconds.saturating_mul(1_000_000);
                }
                other => {
                    return Err(format!(
                        "unknown config key {other:?} (known: allowed-event-types, max-future-skew-seconds)"
                    ))
                }
            }
        }
        Ok(config)
    }
}

/// `AddToCart`, `add-to-cart`, ` Add To Cart ` -> `add_to_cart`.
pub fn normalise_type(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len() + 4);
    let mut prev_lower = false;
    for c in raw.trim().chars() {
        if c == '-' || c == ' ' || c == '_' {
            if !out.ends_with('_') && !out.is_empty() {
                out.push('_');
            }
            prev_lower = false;
        } else if c.is_uppercase() {
            if prev_lower && !out.ends_with('_') {
                out.push('_');
            }
            out.extend(c.to_lowercase());
            prev_lower = false;
        } else {
            out.push(c);
            prev_lower = c.is_lowercase() || c.is_ascii_digit();
        }
    }
    out
}

/// Whether `normalise_type` would return `raw` unchanged, told without
/// allocating: lowercase ASCII letters, digits and underscores, none of
/// them first and no two together. Nearly every event is spelled so; the
/// others take the full normalisation.
pub fn is_normal(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    bytes.first() != Some(&b'_')
        && bytes
            .iter()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
        && !bytes.windows(2).any(|w| w == b"__")
}

/// The fields the rules look at, borrowed from an event.
pub struct Fields<'a> {
    pub event_id: &'a str,
    pub user_id: i32,
    pub event_type: &'a str,
    pub product_id: i32,
    pub price_cents: i64,
    pub event_time: i64,
}

/// Why an event (with its type already normalised) must be rejected.
pub fn rejection(f: &Fields, config: &Config, now_us: i64) -> Option<String> {
    if f.event_id.is_empty() || f.event_id.len() > 36 {
        return Some(format!(
            "event_id {:?} must have 1 to 36 characters",
            f.event_id
        ));
    }
    if !config.allowed.iter().any(|t| t == f.event_type) {
        return Some(format!(
            "event_type {:?} is not allowed (allowed: {})",
            f.event_type,
            config.allowed.join(", ")
        ));
    }
    if f.user_id <= 0 {
        return Some(format!("user_id {} must be positive", f.user_id));
    }
    if f.product_id <= 0 {
        return Some(format!("product_id {} must be positive", f.product_id));
    }
    if f.price_cents < 0 {
        return Some(format!("price {} is negative", cents(f.price_cents)));
    }
    if f.price_cents > MAX_PRICE_CENTS {
        return Some(format!(
            "price {} does not fit NUMERIC(10,2) (at most 99999999.99)",
            cents(f.price_cents)
        ));
    }
    let limit = now_us.saturating_add(config.max_future_skew_us);
    if f.event_time > limit {
        return Some(format!(
            "event_time is {} s in the future (allowed skew: {} s)",
            (f.event_time - now_us) / 1_000_000,
            config.max_future_skew_us / 1_000_000
        ));
    }
    None
}

fn cents(c: i64) -> String {
    format!(
        "{}{}.{:02}",
        if c < 0 { "-" } else { "" },
        c.unsigned_abs() / 100,
        c.unsigned_abs() % 100
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(kind: &str) -> Fields<'_> {
        Fields {
            event_id: "550e8400-e29b-41d4-a716-446655440000",
            user_id: 1,
            event_type: kind,
            product_id: 2,
            price_cents: 999,
            event_time: 1_000,
        }
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
        ] {
            assert_eq!(normalise_type(raw), "add_to_cart", "{raw}");
        }
        assert_eq!(normalise_type("VIEW"), "view");
        assert_eq!(normalise_type(" Purchase "), "purchase");
        assert_eq!(normalise_type("Remove From Cart"), "remove_from_cart");
    }

    #[test]
    fn what_is_normal_is_left_as_it_is() {
        for kind in [
            "view",
            "add_to_cart",
            "remove_from_cart",
            "purchase",
            "v2_",
            "a1",
        ] {
            assert!(is_normal(kind), "{kind}");
        }
        // Every string of up to 5 of these characters: a normal one is
        // what normalising it gives back.
        let alphabet = ['a', 'Z', '0', '_', '-', ' ', 'é'];
        let mut strings = vec![String::new()];
        for _ in 0..5 {
            let longer: Vec<String> = strings
                .iter()
                .filter(|s| s.chars().count() == strings.last().unwrap().chars().count())
                .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                .collect();
            strings.extend(longer);
        }
        for s in &strings {
            if is_normal(s) {
                assert_eq!(&normalise_type(s), s);
            }
        }
        for s in ["_view", "add__to", "View", "add-to", " view", "vié"] {
            assert!(!is_normal(s), "{s}");
        }
    }

    #[test]
    fn every_rule_has_a_reason() {
        let c = Config::default();
        assert_eq!(rejection(&fields("view"), &c, 0), None);
        assert!(rejection(&fields("refund"), &c, 0)
            .unwrap()
            .contains("\"refund\" is not allowed"));
        let mut f = fields("view");
        f.price_cents = -1;
        assert!(rejection(&f, &c, 0).unwrap().contains("negative"));
        f.price_cents = MAX_PRICE_CENTS + 1;
        assert!(rejection(&f, &c, 0).unwrap().contains("NUMERIC(10,2)"));
        let mut f = fields("view");
        f.user_id = 0;
        assert!(rejection(&f, &c, 0).unwrap().contains("user_id"));
        let mut f = fields("view");
        f.product_id = -3;
        assert!(rejection(&f, &c, 0).unwrap().contains("product_id"));
        let mut f = fields("view");
        f.event_time = 301 * 1_000_000;
        assert!(rejection(&f, &c, 0).unwrap().contains("future"));
        f.event_time = 299 * 1_000_000;
        assert_eq!(rejection(&f, &c, 0), None);
    }

    #[test]
    fn config_is_checked() {
        let c = Config::parse(&[
            ("allowed-event-types".into(), "View, AddToCart".into()),
            ("max-future-skew-seconds".into(), "60".into()),
        ])
        .unwrap();
        assert_eq!(c.allowed, vec!["view", "add_to_cart"]);
        assert_eq!(c.max_future_skew_us, 60_000_000);
        assert!(Config::parse(&[("colour".into(), "red".into())])
            .unwrap_err()
            .contains("colour"));
        assert!(Config::parse(&[("max-future-skew-seconds".into(), "soon".into())]).is_err());
    }
}
