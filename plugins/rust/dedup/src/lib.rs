//! The `dedup` stage: drops an event whose `event_id` was already seen
//! within a window bounded by count and by event time. The seen-set is
//! the stage's state: `snapshot`/`restore` carry it across restarts and
//! hot swaps in a versioned binary format.
//!
//! Config (all optional):
//! - `window-events`: most ids remembered, oldest forgotten first (100000)
//! - `window-seconds`: ids whose event time is older than the newest seen
//!   minus this are forgotten (3600)
//!
//! A duplicate is dropped silently: it is neither kept nor rejected. After
//! a crash the last committed snapshot may be a few seconds stale; the
//! table's primary key still refuses what it lets through.

#[cfg(target_arch = "wasm32")]
mod component;

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};

pub const MAGIC: &[u8; 4] = b"DDUP";
/// Version 2 stores canonical UUID ids as 16 bytes; version 1 (ids as
/// text) is still read, so state survives a swap from an older build.
pub const FORMAT_VERSION: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub window_events: usize,
    pub window_us: i64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            window_events: 100_000,
            window_us: 3600 * 1_000_000,
        }
    }
}

impl Config {
    pub fn parse(pairs: &[(String, String)]) -> Result<Config, String> {
        let mut config = Config::default();
        for (key, value) in pairs {
            let number = |what: &str| -> Result<i64, String> {
                value
                    .trim()
                    .parse::<i64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("{what} {value:?} must be a positive whole number"))
            };
            match key.as_str() {
                "window-events" => config.window_events = number("window-events")? as usize,
                "window-seconds" => {
                    config.window_us = number("window-seconds")?.saturating_mul(1_000_000)
                }
                other => {
                    return Err(format!(
                        "unknown config key {other:?} (known: window-events, window-seconds)"
                    ))
                }
            }
        }
        Ok(config)
    }
}

/// An id as the seen-set holds it. The host hands over ids as canonical
/// UUID text (lowercase, hyphenated): those are packed into 16 bytes, so
/// remembering an id allocates nothing and compares in one instruction.
/// Any other text is kept as it is (equality stays exact either way:
/// only text that formats back to itself is packed).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Uuid(u128),
    Text(Box<str>),
}

impl Key {
    fn new(id: &str) -> Key {
        match pack_uuid(id.as_bytes()) {
            Some(bits) => Key::Uuid(bits),
            None => Key::Text(id.into()),
        }
    }
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` in lowercase hex, as 128 bits.
fn pack_uuid(text: &[u8]) -> Option<u128> {
    let text: &[u8; 36] = text.try_into().ok()?;
    if [8, 13, 18, 23].iter().any(|&i| text[i] != b'-') {
        return None;
    }
    // Two 64-bit halves: on wasm32 a u128 is emulated, and shifting one
    // per digit cost more than the rest of the stage's work on an event.
    // A digit's value comes from a table, and a bad one sets a high bit
    // that is tested once per half, not once per digit.
    let digits = |acc: u64, range: std::ops::Range<usize>| -> (u64, u8) {
        text[range].iter().fold((acc, 0u8), |(n, bad), &c| {
            let digit = HEX[c as usize];
            (n << 4 | u64::from(digit & 0x0f), bad | digit)
        })
    };
    let (high, b1) = digits(0, 0..8);
    let (high, b2) = digits(high, 9..13);
    let (high, b3) = digits(high, 14..18);
    let (low, b4) = digits(0, 19..23);
    let (low, b5) = digits(low, 24..36);
    if (b1 | b2 | b3 | b4 | b5) & 0x80 != 0 {
        return None;
    }
    Some(u128::from(high) << 64 | u128::from(low))
}

/// The value of each lowercase hex digit; 0x80 for any other byte.
const HEX: [u8; 256] = {
    let mut table = [0x80u8; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

/// A multiply-rotate hasher (the Fx hash of rustc): ids are random, so the
/// default SipHash buys nothing here and costs most of the stage's time.
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_u128(&mut self, n: u128) {
        self.write_u64(n as u64);
        self.write_u64((n >> 64) as u64);
    }
    fn write_u8(&mut self, n: u8) {
        self.write_u64(n as u64);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    fn write_isize(&mut self, n: isize) {
        self.write_u64(n as u64);
    }
}

type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FxHasher>>;

/// The seen-set: ids with their event time, in insertion order.
#[derive(Debug, Default)]
pub struct Dedup {
    pub config: Config,
    seen: FastMap<Key, i64>,
    order: VecDeque<Key>,
    newest: i64,
}

impl Dedup {
    /// The seen-set is sized for the whole window at once: grown by
    /// doubling instead, each table would be copied into one twice its
    /// size, and the guest's memory, which never shrinks, would keep the
    /// room of the old tables beside the new ones (25 MB instead of 30 for
    /// the default window, with a batch in flight). Room not yet used is
    /// not touched, so it costs the host nothing until ids fill it. A
    /// window too large for the stage's memory limit grows as it fills,
    /// as before.
    pub fn new(config: Config) -> Dedup {
        let room = config.window_events.saturating_add(1);
        let mut dedup = Dedup {
            config,
            newest: i64::MIN,
            ..Dedup::default()
        };
        if dedup.seen.try_reserve(room).is_err() || dedup.order.try_reserve(room).is_err() {
            dedup.seen = FastMap::default();
            dedup.order = VecDeque::new();
        }
        dedup
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// True when the event is new (keep it), false for a duplicate.
    pub fn admit(&mut self, id: &str, time: i64) -> bool {
        self.admit_key(Key::new(id), time)
    }

    fn admit_key(&mut self, key: Key, time: i64) -> bool {
        // One lookup for both the check and the insert.
        match self.seen.entry(key) {
            Entry::Occupied(mut seen) => {
                if self.newest.saturating_sub(*seen.get()) <= self.config.window_us {
                    return false;
                }
                // Seen before the window: admitted again, with its new time.
                seen.insert(time);
            }
            Entry::Vacant(new) => {
                self.order.push_back(new.key().clone());
                new.insert(time);
            }
        }
        self.newest = self.newest.max(time);
        self.evict();
        true
    }

    fn evict(&mut self) {
        let horizon = self.newest.saturating_sub(self.config.window_us);
        while let Some(front) = self.order.front() {
            let expired = self.seen.get(front).is_none_or(|&t| t < horizon);
            if self.order.len() > self.config.window_events || expired {
                if let Some(id) = self.order.pop_front() {
                    self.seen.remove(&id);
                }
            } else {
                break;
            }
        }
    }

    /// MAGIC, version 2, newest (i64 LE), count (u32 LE), then per id,
    /// oldest first: tag 0 and the UUID's 16 bytes, or tag 1, length (u16
    /// LE) and the text; then its event time (i64 LE). Half the size of
    /// version 1, which held every id as text.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(17 + self.order.len() * 25);
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&self.newest.to_le_bytes());
        out.extend_from_slice(&(self.order.len() as u32).to_le_bytes());
        for key in &self.order {
            match key {
                Key::Uuid(bits) => {
                    out.push(0);
                    out.extend_from_slice(&bits.to_be_bytes());
                }
                Key::Text(text) => {
                    out.push(1);
                    out.extend_from_slice(&(text.len() as u16).to_le_bytes());
                    out.extend_from_slice(text.as_bytes());
                }
            }
            out.extend_from_slice(&self.seen.get(key).copied().unwrap_or(0).to_le_bytes());
        }
        out
    }

    pub fn restore(&mut self, state: &[u8]) -> Result<(), String> {
        if state.is_empty() {
            *self = Dedup::new(self.config.clone());
            return Ok(());
        }
        if state.len() < 17 || &state[..4] != MAGIC {
            return Err("not a dedup snapshot (bad magic bytes)".into());
        }
        let version = state[4];
        if version != 1 && version != 2 {
            return Err(format!(
                "dedup snapshot format version {version} is not supported (this build reads versions 1 and {FORMAT_VERSION})"
            ));
        }
        let truncated = || "dedup snapshot is truncated".to_string();
        let newest = i64::from_le_bytes(state[5..13].try_into().map_err(|_| truncated())?);
        let count = u32::from_le_bytes(state[13..17].try_into().map_err(|_| truncated())?) as usize;
        let mut fresh = Dedup::new(self.config.clone());
        let mut at = 17;
        let take = |at: &mut usize, n: usize| -> Result<&[u8], String> {
            let bytes = state.get(*at..*at + n).ok_or_else(truncated)?;
            *at += n;
            Ok(bytes)
        };
        for _ in 0..count {
            if version == 2 && take(&mut at, 1)?[0] == 0 {
                let bits =
                    u128::from_be_bytes(take(&mut at, 16)?.try_into().map_err(|_| truncated())?);
                let time =
                    i64::from_le_bytes(take(&mut at, 8)?.try_into().map_err(|_| truncated())?);
                if fresh.seen.insert(Key::Uuid(bits), time).is_none() {
                    fresh.order.push_back(Key::Uuid(bits));
                }
                continue;
            }
            let len = u16::from_le_bytes(
                state
                    .get(at..at + 2)
                    .ok_or_else(truncated)?
                    .try_into()
                    .map_err(|_| truncated())?,
            ) as usize;
            at += 2;
            let id = std::str::from_utf8(state.get(at..at + len).ok_or_else(truncated)?)
                .map_err(|_| "dedup snapshot holds an id that is not UTF-8".to_string())?;
            let key = Key::new(id);
            at += len;
            let time = i64::from_le_bytes(
                state
                    .get(at..at + 8)
                    .ok_or_else(truncated)?
                    .try_into()
                    .map_err(|_| truncated())?,
            );
            at += 8;
            if fresh.seen.insert(key.clone(), time).is_none() {
                fresh.order.push_back(key);
            }
        }
        if at != state.len() {
            return Err("dedup snapshot has trailing bytes".into());
        }
        fresh.newest = newest;
        // The window may have shrunk since the snapshot was taken.
        fresh.evict();
        *self = fresh;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_repeats_within_a_batch_and_across() {
        let mut d = Dedup::new(Config::default());
        assert!(d.admit("a", 1));
        assert!(!d.admit("a", 1));
        assert!(d.admit("b", 2));
        assert!(!d.admit("a", 3));
    }

    #[test]
    fn uuids_are_packed_and_survive_a_snapshot() {
        let id = "0f8fad5b-d9cb-469f-a165-70867728950e";
        let key = Key::new(id);
        assert!(matches!(key, Key::Uuid(_)));
        // Not canonical: kept as text, so equality stays exact.
        for other in [
            "0F8FAD5B-D9CB-469F-A165-70867728950E",
            "id-1",
            "0f8fad5bd9cb469fa16570867728950e",
        ] {
            assert!(matches!(Key::new(other), Key::Text(_)), "{other}");
        }
        let mut d = Dedup::new(Config::default());
        assert!(d.admit(id, 1));
        assert!(d.admit("0F8FAD5B-D9CB-469F-A165-70867728950E", 1));
        assert!(!d.admit(id, 2));
        let mut e = Dedup::new(Config::default());
        e.restore(&d.snapshot()).unwrap();
        assert!(!e.admit(id, 3));
        assert!(!e.admit("0F8FAD5B-D9CB-469F-A165-70867728950E", 3));
        assert_eq!(e.snapshot(), d.snapshot());
    }

    #[test]
    fn a_packed_uuid_is_its_32_hex_digits() {
        for id in [
            "0f8fad5b-d9cb-469f-a165-70867728950e",
            "00000000-0000-0000-0000-000000000000",
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
            "01234567-89ab-cdef-0123-456789abcdef",
        ] {
            let digits = id.replace('-', "");
            assert_eq!(
                pack_uuid(id.as_bytes()),
                u128::from_str_radix(&digits, 16).ok(),
                "{id}"
            );
        }
        for other in [
            "0f8fad5b-d9cb-469f-a165-70867728950",
            "0f8fad5b-d9cb-469f-a165-70867728950ee",
            "0f8fad5bdd9cb-469f-a165-70867728950e",
            "0f8fad5b-d9cb-469f-a165-70867728950g",
            "0f8fad5b-d9cb-469f-a165-7086772895-e",
            "+f8fad5b-d9cb-469f-a165-70867728950e",
            "0F8FAD5B-D9CB-469F-A165-70867728950E",
        ] {
            assert_eq!(pack_uuid(other.as_bytes()), None, "{other}");
        }
    }

    #[test]
    fn version_1_snapshots_are_still_read() {
        let mut v1 = Vec::new();
        v1.extend_from_slice(MAGIC);
        v1.push(1);
        v1.extend_from_slice(&7i64.to_le_bytes());
        v1.extend_from_slice(&2u32.to_le_bytes());
        for (id, time) in [("0f8fad5b-d9cb-469f-a165-70867728950e", 5i64), ("id-1", 7)] {
            v1.extend_from_slice(&(id.len() as u16).to_le_bytes());
            v1.extend_from_slice(id.as_bytes());
            v1.extend_from_slice(&time.to_le_bytes());
        }
        let mut d = Dedup::new(Config::default());
        d.restore(&v1).unwrap();
        assert_eq!(d.len(), 2);
        assert!(!d.admit("0f8fad5b-d9cb-469f-a165-70867728950e", 8));
        assert!(!d.admit("id-1", 8));
        assert_eq!(d.snapshot()[4], FORMAT_VERSION);
    }

    #[test]
    fn count_window_forgets_oldest_first() {
        let mut d = Dedup::new(Config {
            window_events: 2,
            window_us: i64::MAX,
        });
        assert!(d.admit("a", 1));
        assert!(d.admit("b", 2));
        assert!(d.admit("c", 3));
        assert_eq!(d.len(), 2);
        assert!(d.admit("a", 4), "a was evicted");
        assert!(!d.admit("c", 5));
    }

    #[test]
    fn time_window_forgets_old_ids() {
        let mut d = Dedup::new(Config {
            window_events: 100,
            window_us: 10,
        });
        assert!(d.admit("a", 0));
        assert!(!d.admit("a", 5));
        assert!(d.admit("b", 100));
        assert_eq!(d.len(), 1);
        assert!(d.admit("a", 101));
    }

    #[test]
    fn snapshot_round_trips_and_corruption_is_refused() {
        let mut d = Dedup::new(Config::default());
        for i in 0..1000 {
            d.admit(&format!("id-{i}"), i);
        }
        let snap = d.snapshot();
        let mut e = Dedup::new(Config::default());
        e.restore(&snap).unwrap();
        assert_eq!(e.len(), 1000);
        assert!(!e.admit("id-500", 2000));
        assert!(e.admit("id-new", 2000));

        let mut bad = snap.clone();
        bad[0] = b'X';
        assert!(e.restore(&bad).unwrap_err().contains("magic"));
        let mut newer = snap.clone();
        newer[4] = 9;
        assert!(e.restore(&newer).unwrap_err().contains("version 9"));
        assert!(e
            .restore(&snap[..snap.len() - 3])
            .unwrap_err()
            .contains("truncated"));
        assert!(e.restore(&[]).is_ok());
        assert!(e.is_empty());
    }

    #[test]
    fn config_is_checked() {
        let c = Config::parse(&[
            ("window-events".into(), "5".into()),
            ("window-seconds".into(), "2".into()),
        ])
        .unwrap();
        assert_eq!(
            c,
            Config {
                window_events: 5,
                window_us: 2_000_000
            }
        );
        assert!(Config::parse(&[("window-events".into(), "-1".into())]).is_err());
        assert!(Config::parse(&[("size".into(), "1".into())])
            .unwrap_err()
            .contains("size"));
    }
}
