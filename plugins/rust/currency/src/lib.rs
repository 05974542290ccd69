//! The `currency` stage in Rust: the same conversion as the Python
//! (`plugins/python/currency`) and JavaScript (`plugins/js/currency`)
//! stages, rule for rule and message for message, so that the three can
//! be compared like for like (`host/tests/languages.rs` checks that their
//! outputs are identical; `benches/languages.sh` times them).
//!
//! Converts each event's price from `source-currency` to
//! `target-currency` exactly: a rate is a decimal with at most 9 decimals,
//! held as integer billionths, so the new price is
//! `price_cents * target_rate / source_rate`, computed in integers and
//! rounded once, half to even, to the cent. An event whose converted
//! price no longer fits NUMERIC(10,2) is rejected.
//!
//! Config:
//! - `rates` (required): units per 1 USD, e.g. `USD:1.0,EUR:0.92,GBP:0.79`
//! - `target-currency` (required), e.g. `EUR`
//! - `source-currency`: default `USD`
//!
//! Build: `cargo build --release --target wasm32-wasip2` in `plugins/rust`
//! (`bash plugins/rust/build.sh` installs it as `plugins/currency_rust.wasm`).
//! The rules are plain functions, unit-tested on the native target;
//! `component` is the thin WebAssembly binding.

#[cfg(target_arch = "wasm32")]
mod component;

/// NUMERIC(10,2) holds at most 99999999.99.
pub const MAX_PRICE_CENTS: i64 = 9_999_999_999;
/// Rates are held in billionths: 9 decimals at most.
const RATE_SCALE: i128 = 1_000_000_000;
/// The largest rate, 10^9, in billionths. With it a product
/// `price_cents * rate` stays below 2^63 * 10^18 < 2^127: no overflow.
const MAX_RATE: i128 = 1_000_000_000 * RATE_SCALE;
const KNOWN: &str = "rates, source-currency, target-currency";
/// The whitespace every language trims alike (not Unicode's wider set).
const WS: &[char] = &[' ', '\t', '\r', '\n'];

/// A parsed config: multiply by `num`, divide by `den` (both billionths).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversion {
    pub source: String,
    pub target: String,
    pub num: i128,
    pub den: i128,
}

impl Conversion {
    /// Reads the stage's config; the error is the message `init` returns.
    pub fn from_config(pairs: &[(String, String)]) -> Result<Conversion, String> {
        let (mut rates, mut source, mut target) = (None, None, None);
        // A repeated key: the last value wins (as a Python dict would).
        for (key, value) in pairs {
            match key.as_str() {
                "rates" => rates = Some(value.as_str()),
                "source-currency" => source = Some(value.as_str()),
                "target-currency" => target = Some(value.as_str()),
                other => return Err(format!("unknown config key \"{other}\" (known: {KNOWN})")),
            }
        }
        let (Some(rates), Some(target)) = (rates, target) else {
            return Err("config needs rates and target-currency".into());
        };
        let rates = parse_rates(rates)?;
        let source = currency_name("source-currency", source.unwrap_or("USD"))?;
        let target = currency_name("target-currency", target)?;
        let rate_of = |name: &str| {
            rates
                .iter()
                .rev()
                .find(|(n, _)| n == name)
                .map(|(_, r)| *r)
                .ok_or_else(|| format!("no rate for currency {name} in rates"))
        };
        let den = rate_of(&source)?;
        let num = rate_of(&target)?;
        Ok(Conversion {
            source,
            target,
            num,
            den,
        })
    }

    /// The converted price in cents, before the NUMERIC(10,2) check.
    pub fn convert(&self, cents: i64) -> i128 {
        round_half_even(i128::from(cents) * self.num, self.den)
    }
}

/// `USD:1.0,EUR:0.92` -> `[("USD", 1e9), ("EUR", 0.92e9)]`; blank parts
/// are skipped, a repeated currency's last rate wins.
pub fn parse_rates(text: &str) -> Result<Vec<(String, i128)>, String> {
    let mut rates = Vec::new();
    for part in text.split(',') {
        let part = part.trim_matches(WS);
        if part.is_empty() {
            continue;
        }
        let Some((name, value)) = part.split_once(':') else {
            return Err(format!("rate \"{part}\" is not CURRENCY:RATE"));
        };
        let name = currency_name("currency", name)?;
        let rate = parse_rate(&name, value.trim_matches(WS))?;
        rates.push((name, rate));
    }
    Ok(rates)
}

/// A currency name: ASCII letters, trimmed, upper-cased.
fn currency_name(what: &str, raw: &str) -> Result<String, String> {
    let name = raw.trim_matches(WS);
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(format!("{what} \"{name}\" is not made of letters A-Z"));
    }
    Ok(name.to_ascii_uppercase())
}

/// `0.92` -> 920_000_000 billionths. Accepts `DIGITS` or `DIGITS.DIGITS`
/// with 1 to 9 decimals, greater than 0 and at most 10^9.
pub fn parse_rate(name: &str, text: &str) -> Result<i128, String> {
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || (text.contains('.') && (!digits(frac) || frac.len() > 9)) {
        return Err(format!(
            "rate for {name} is not a decimal number like 0.92 (at most 9 decimals): \"{text}\""
        ));
    }
    let whole = whole.trim_start_matches('0');
    // More than 10 significant digits is above 10^9 whatever follows.
    if whole.len() > 10 {
        return Err(format!(
            "rate for {name} must be at most 1000000000, not {text}"
        ));
    }
    let whole: i128 = if whole.is_empty() {
        0
    } else {
        whole
            .parse()
            .map_err(|_| format!("rate for {name}: {text}"))?
    };
    let frac: i128 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}")
            .parse()
            .map_err(|_| format!("rate for {name}: {text}"))?
    };
    let rate = whole * RATE_SCALE + frac;
    if rate == 0 {
        return Err(format!("rate for {name} must be positive, not {text}"));
    }
    if rate > MAX_RATE {
        return Err(format!(
            "rate for {name} must be at most 1000000000, not {text}"
        ));
    }
    Ok(rate)
}

/// `n / d` rounded to the nearest integer, ties to even; `d > 0`.
pub fn round_half_even(n: i128, d: i128) -> i128 {
    let (q, r) = (n.div_euclid(d), n.rem_euclid(d));
    match (2 * r).cmp(&d) {
        std::cmp::Ordering::Greater => q + 1,
        std::cmp::Ordering::Equal if q % 2 != 0 => q + 1,
        _ => q,
    }
}

/// Why a converted price cannot be written, if it cannot.
pub fn rejection(converted: i128) -> Option<String> {
    (converted.abs() > i128::from(MAX_PRICE_CENTS))
        .then(|| format!("converted price {converted} cents does not fit NUMERIC(10,2)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<Conversion, String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Conversion::from_config(&pairs)
    }

    #[test]
    fn converts_exactly_with_ties_to_even() {
        let half = config(&[("rates", "USD:1,EUR:0.5"), ("target-currency", "EUR")]).unwrap();
        assert_eq!(half.convert(3), 2); // 1.5 -> 2
        assert_eq!(half.convert(5), 2); // 2.5 -> 2
        assert_eq!(half.convert(-3), -2);
        assert_eq!(half.convert(-5), -2);
        let eur = config(&[("rates", "USD:1.0,EUR:0.92"), ("target-currency", "eur")]).unwrap();
        assert_eq!(eur.convert(1999), 1839); // 1839.08
                                             // EUR -> GBP is 0.79 / 0.92, not a terminating decimal: one rounding.
        let gbp = config(&[
            ("rates", " USD:1 , EUR:0.92,GBP:0.79,"),
            ("source-currency", "EUR"),
            ("target-currency", "GBP"),
        ])
        .unwrap();
        assert_eq!(gbp.convert(10_000), 8587); // 8586.956...
        assert_eq!(gbp.convert(i64::MAX), (i128::from(i64::MAX) * 79 + 46) / 92);
    }

    #[test]
    fn rejects_what_does_not_fit() {
        assert_eq!(rejection(MAX_PRICE_CENTS.into()), None);
        assert_eq!(
            rejection(i128::from(MAX_PRICE_CENTS) + 1).unwrap(),
            "converted price 10000000000 cents does not fit NUMERIC(10,2)"
        );
    }

    #[test]
    fn config_errors_say_what_is_wrong() {
        let err = |pairs: &[(&str, &str)]| config(pairs).unwrap_err();
        assert_eq!(
            err(&[("colour", "red")]),
            "unknown config key \"colour\" (known: rates, source-currency, target-currency)"
        );
        assert_eq!(
            err(&[("rates", "USD:1")]),
            "config needs rates and target-currency"
        );
        assert_eq!(
            err(&[("rates", "USD:1"), ("target-currency", "JPY")]),
            "no rate for currency JPY in rates"
        );
        assert_eq!(
            err(&[("rates", "USD:1,EUR:0"), ("target-currency", "EUR")]),
            "rate for EUR must be positive, not 0"
        );
        assert_eq!(
            err(&[("rates", "USD:1,EUR:-1"), ("target-currency", "EUR")]),
            "rate for EUR is not a decimal number like 0.92 (at most 9 decimals): \"-1\""
        );
        assert_eq!(
            err(&[
                ("rates", "USD:1,EUR:0.0000000001"),
                ("target-currency", "EUR")
            ]),
            "rate for EUR is not a decimal number like 0.92 (at most 9 decimals): \"0.0000000001\""
        );
        assert_eq!(
            err(&[
                ("rates", "USD:1,EUR:1000000000.5"),
                ("target-currency", "EUR")
            ]),
            "rate for EUR must be at most 1000000000, not 1000000000.5"
        );
        assert_eq!(
            err(&[("rates", "USD 1"), ("target-currency", "EUR")]),
            "rate \"USD 1\" is not CURRENCY:RATE"
        );
        assert_eq!(
            err(&[("rates", "US$:1"), ("target-currency", "EUR")]),
            "currency \"US$\" is not made of letters A-Z"
        );
    }
}
