//! `host generate`: writes CSV files of realistic ecommerce events into
//! the input folder, like the generator of the pipeline this replaces
//! (100 events every 5 s), with optional duplicates and malformed rows.
//!
//! Each file is written under a hidden temporary name and renamed into
//! place, so the pipeline never sees half a file. With `--seed` the output
//! is byte-identical run to run: event times then start at a fixed instant
//! instead of now.

use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub output: PathBuf,
    pub interval: Duration,
    pub events_per_file: usize,
    pub files: Option<u64>,
    pub duplicate_rate: f64,
    pub invalid_rate: f64,
    pub seed: Option<u64>,
}

pub const HEADER: &str = "event_id,user_id,event_type,product_id,price,event_time";

/// Event types and their shares: browsing dominates, purchases are rare.
const TYPES: [(&str, f64); 4] = [
    ("view", 0.65),
    ("add_to_cart", 0.18),
    ("remove_from_cart", 0.07),
    ("purchase", 0.10),
];
/// Spellings other systems send, which the transform normalises.
const VARIANTS: [&str; 6] = [
    "VIEW",
    "AddToCart",
    "add-to-cart",
    " Purchase ",
    "Remove From Cart",
    "View",
];
const USERS: f64 = 100_000.0;
const PRODUCTS: f64 = 5_000.0;
/// 2026-01-01T00:00:00Z, the first event time of a seeded run.
const SEEDED_START_US: i64 = 1_767_225_600_000_000;
/// How many earlier events a duplicate may copy.
const RECENT: usize = 10_000;

pub struct Generator {
    config: GenerateConfig,
    rng: StdRng,
    recent: VecDeque<String>,
    file_index: u64,
    run_tag: String,
}

impl Generator {
    pub fn new(config: GenerateConfig) -> Generator {
        let rng = match config.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => rand::make_rng(),
        };
        let run_tag = match config.seed {
            Some(seed) => format!("seed{seed}"),
            None => chrono::Utc::now().format("%Y%m%dT%H%M%S").to_string(),
        };
        Generator {
            config,
            rng,
            recent: VecDeque::with_capacity(RECENT),
            file_index: 0,
            run_tag,
        }
    }

    /// Writes files until `--files` is reached (forever without it).
    pub fn run(&mut self, stop: &std::sync::atomic::AtomicBool) -> std::io::Result<u64> {
        self.run_with(stop, |_| {})
    }

    /// `run`, calling `written` with the count of files after each one.
    pub fn run_with(
        &mut self,
        stop: &std::sync::atomic::AtomicBool,
        written: impl FnMut(u64),
    ) -> std::io::Result<u64> {
        std::fs::create_dir_all(&self.config.output)?;
        self.run_into(stop, written, |generator| {
            let path = generator.write_file()?;
            Ok(path.display().to_string())
        })
    }

    /// The loop of `run_with`, with `emit` making and delivering each
    /// file (`next_file`); it returns what to log the file as.
    pub fn run_into(
        &mut self,
        stop: &std::sync::atomic::AtomicBool,
        mut written: impl FnMut(u64),
        mut emit: impl FnMut(&mut Generator) -> std::io::Result<String>,
    ) -> std::io::Result<u64> {
        while self.config.files.is_none_or(|n| self.file_index < n) {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            let file = emit(self)?;
            tracing::info!(file = %file, events = self.config.events_per_file, "generated");
            written(self.file_index);
            if self.config.files.is_none_or(|n| self.file_index < n) {
                // Sleep in steps so a stop request is honoured promptly.
                let until = std::time::Instant::now() + self.config.interval;
                while std::time::Instant::now() < until
                    && !stop.load(std::sync::atomic::Ordering::Relaxed)
                {
                    std::thread::sleep(
                        Duration::from_millis(50).min(until - std::time::Instant::now()),
                    );
                }
            }
        }
        Ok(self.file_index)
    }

    /// Changes the size of the files written from now on.
    pub fn set_events_per_file(&mut self, events: usize) {
        self.config.events_per_file = events;
    }

    /// Writes the next file; returns its path.
    pub fn write_file(&mut self) -> std::io::Result<PathBuf> {
        let (name, body) = self.next_file();
        let path = self.config.output.join(&name);
        let tmp = self.config.output.join(format!(".{name}.tmp"));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&body)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// The next file's name and contents (header first): what
    /// `write_file` writes, and what a publisher sends line by line.
    pub fn next_file(&mut self) -> (String, Vec<u8>) {
        self.file_index += 1;
        let name = format!("events_{}_{:06}.csv", self.run_tag, self.file_index);
        let mut body = Vec::with_capacity(self.config.events_per_file * 110 + 64);
        body.extend_from_slice(HEADER.as_bytes());
        body.push(b'\n');
        let base_us = match self.config.seed {
            Some(_) => {
                SEEDED_START_US
                    + (self.file_index as i64)
                        * self.config.interval.as_micros().max(1_000_000) as i64
            }
            None => chrono::Utc::now().timestamp_micros(),
        };
        for _ in 0..self.config.events_per_file {
            self.row(base_us, &mut body);
        }
        (name, body)
    }

    fn row(&mut self, base_us: i64, out: &mut Vec<u8>) {
        let roll: f64 = self.rng.random();
        if roll < self.config.invalid_rate {
            out.extend_from_slice(&self.malformed(base_us));
        } else if roll < self.config.invalid_rate + self.config.duplicate_rate
            && !self.recent.is_empty()
        {
            let i = self.rng.random_range(0..self.recent.len());
            out.extend_from_slice(self.recent[i].as_bytes());
        } else {
            let line = self.valid(base_us);
            out.extend_from_slice(line.as_bytes());
            if self.recent.len() == RECENT {
                self.recent.pop_front();
            }
            self.recent.push_back(line);
        }
        out.push(b'\n');
    }

    fn uuid(&mut self) -> String {
        let bytes: [u8; 16] = self.rng.random();
        uuid::Builder::from_random_bytes(bytes)
            .into_uuid()
            .hyphenated()
            .to_string()
    }

    /// A skewed id in 1..=n: a few users and products account for most events.
    fn skewed(&mut self, n: f64) -> i32 {
        let r: f64 = self.rng.random();
        (r.powi(3) * n) as i32 + 1
    }

    fn event_type(&mut self) -> &'static str {
        if self.rng.random_bool(0.03) {
            return VARIANTS[self.rng.random_range(0..VARIANTS.len())];
        }
        let mut roll: f64 = self.rng.random();
        for (name, share) in TYPES {
            if roll < share {
                return name;
            }
            roll -= share;
        }
        "view"
    }

    fn valid(&mut self, base_us: i64) -> String {
        let id = self.uuid();
        let user = self.skewed(USERS);
        let kind = self.event_type();
        let product = self.skewed(PRODUCTS);
        let cents = price_cents(product);
        let jitter = self.rng.random_range(0..2_000_000i64);
        let time = format_time(base_us - jitter);
        let kind = if kind.contains(' ') {
            format!("\"{kind}\"")
        } else {
            kind.to_owned()
        };
        format!(
            "{id},{user},{kind},{product},{}.{:02},{time}",
            cents / 100,
            cents % 100
        )
    }

    fn malformed(&mut self, base_us: i64) -> Vec<u8> {
        let id = self.uuid();
        let time = format_time(base_us);
        match self.rng.random_range(0..6) {
            0 => format!("{id},{},view,{}", self.skewed(USERS), self.skewed(PRODUCTS)).into_bytes(),
            1 => format!("{id},not-a-number,view,12,9.99,{time}").into_bytes(),
            2 => format!("{}-xyz,42,view,12,9.99,{time}", &id[..20]).into_bytes(),
            3 => format!("{id},42,view,12,9.99,31/12/2026 25:61").into_bytes(),
            4 => format!("{id},42,view,12,nine dollars,{time}").into_bytes(),
            _ => {
                let mut bytes = format!("{id},42,vi").into_bytes();
                bytes.extend_from_slice(&[0xff, 0xfe]);
                bytes.extend_from_slice(format!("ew,12,9.99,{time}").as_bytes());
                bytes
            }
        }
    }
}

/// A product's price, stable across events: 1.00 to 999.99.
pub fn price_cents(product: i32) -> i64 {
    let mut x = product as u64 ^ 0x9e37_79b9_7f4a_7c15;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    100 + (x % 99_900) as i64
}

fn format_time(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: PathBuf) -> GenerateConfig {
        GenerateConfig {
            output: dir,
            interval: Duration::ZERO,
            events_per_file: 500,
            files: Some(3),
            duplicate_rate: 0.05,
            invalid_rate: 0.02,
            seed: Some(7),
        }
    }

    #[test]
    fn seeded_output_is_identical_and_parses_as_intended() {
        let base = std::env::temp_dir().join(format!("gen-test-{}", std::process::id()));
        let (a, b) = (base.join("a"), base.join("b"));
        let stop = std::sync::atomic::AtomicBool::new(false);
        Generator::new(config(a.clone())).run(&stop).unwrap();
        Generator::new(config(b.clone())).run(&stop).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(&a)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names.len(), 3);
        let (mut good, mut bad) = (0, 0);
        for name in names {
            let x = std::fs::read(a.join(&name)).unwrap();
            assert_eq!(x, std::fs::read(b.join(&name)).unwrap());
            let mut parser = crate::parse::FileParser::default();
            parser.parse(&x, 1, true, |p| {
                if p.result.is_ok() {
                    good += 1
                } else {
                    bad += 1
                }
            });
        }
        assert_eq!(good + bad, 1500);
        assert!(bad > 10 && bad < 60, "{bad} malformed of 1500 at 2%");
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn prices_are_stable_per_product_and_in_range() {
        assert_eq!(price_cents(42), price_cents(42));
        assert!((1..5000).all(|p| (100..=99_999).contains(&price_cents(p))));
    }
}
