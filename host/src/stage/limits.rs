//! Sandbox settings of one stage: memory cap, time per batch and the WASI
//! capabilities it is granted. Defaults are safe: no capability at all.

use std::time::Duration;

/// What a stage may use. Everything not granted is absent or inert.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Grants {
    /// The real wall and monotonic clocks (otherwise both read zero).
    pub clock: bool,
    /// Real randomness (otherwise a fixed-seed generator).
    pub random: bool,
    /// The host's stderr (otherwise writes are discarded).
    pub stderr: bool,
}

impl Grants {
    pub fn parse(names: &[String]) -> Result<Self, String> {
        let mut grants = Grants::default();
        for name in names {
            match name.as_str() {
                "clock" => grants.clock = true,
                "random" => grants.random = true,
                "stderr" => grants.stderr = true,
                other => {
                    return Err(format!(
                        "unknown grant {other:?} (known: clock, random, stderr)"
                    ))
                }
            }
        }
        Ok(grants)
    }

    pub fn names(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.clock {
            names.push("clock");
        }
        if self.random {
            names.push("random");
        }
        if self.stderr {
            names.push("stderr");
        }
        names
    }
}

/// Resource limits applied to every call into a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest linear memory the stage may grow to, in bytes.
    pub memory_bytes: usize,
    /// Longest a single call (one batch) may run before it is interrupted.
    pub time_per_batch: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // Python and JavaScript runtimes need tens of MiB before any data.
            memory_bytes: 256 << 20,
            time_per_batch: Duration::from_secs(5),
        }
    }
}

/// Parses "64MiB", "512KiB", "1GiB", "1000000" (bytes).
pub fn parse_bytes(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (try \"64MiB\")"))?;
    let factor = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "KB" => 1 << 10,
        "MiB" | "M" | "MB" => 1 << 20,
        "GiB" | "G" | "GB" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?} (use KiB, MiB, GiB)"
            ))
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// Parses "250ms", "5s", "2m", "1h"; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (try \"500ms\" or \"10s\")"))?;
    let seconds = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} in {text:?} (use ms, s, m, h)"
            ))
        }
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("{text:?} is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse_with_units() {
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert!(parse_bytes("12 parsecs").is_err());
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn unknown_grant_is_named() {
        let err = Grants::parse(&["network".into()]).unwrap_err();
        assert!(err.contains("network"), "{err}");
        let grants = Grants::parse(&["clock".into()]).unwrap();
        assert!(grants.clock && !grants.random);
    }
}
