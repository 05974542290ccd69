//! The `dedup` stage: drops an event whose `event_id` was already seen
//! within a window bounded by count and by event time. A duplicate is
//! dropped silently: it is neither kept nor rejected. The remembered ids
//! are the stage's state; `snapshot`/`restore` carry them across restarts
//! and hot swaps in a versioned binary format (see [`Dedup::snapshot`]).
//!
//! Config (all optional; any other key refuses the stage):
//! - `window-events`: most ids remembered, oldest-inserted forgotten first
//!   (default 100000)
//! - `window-seconds`: an id whose event time is older than the newest
//!   event time seen minus this is forgotten (default 3600)
//!
//! The logic is plain Rust here, unit-tested on the native target;
//! `component` is the thin WebAssembly binding, compiled only for wasm32.

#[cfg(target_arch = "wasm32")]
mod component;

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

pub const MAGIC: &[u8; 4] = b"DDUP";
pub const FORMAT_VERSION: u8 = 1;
/// Magic, version, newest event time (i64), entry count (u32).
const HEADER_LEN: usize = 4 + 1 + 8 + 4;
/// The smallest entry: a one-byte length, no id bytes, the time.
const MIN_ENTRY_LEN: usize = 1 + 8;
const KNOWN_KEYS: &str = "window-events, window-seconds";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub window_events: usize,
    pub window_seconds: i64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            window_events: 100_000,
            window_seconds: 3600,
        }
    }
}

impl Config {
    pub fn parse(pairs: &[(String, String)]) -> Result<Config, String> {
        let mut config = Config::default();
        for (key, value) in pairs {
            let positive = || -> Result<u64, String> {
                value
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|n| (1..=i64::MAX as u64 / 1_000_000).contains(n))
                    .ok_or_else(|| format!("config {key} {value:?} is not a positive whole number"))
            };
            match key.as_str() {
                "window-events" => {
                    config.window_events = usize::try_from(positive()?)
                        .map_err(|_| format!("config {key} {value:?} is too large"))?
                }
                "window-seconds" => config.window_seconds = positive()? as i64,
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
            "dedup: window-events = {}; window-seconds = {}",
            self.window_events, self.window_seconds
        )
    }

    fn window_us(&self) -> i64 {
        self.window_seconds.saturating_mul(1_000_000)
    }
}

/// FxHash's mixing with a final avalanche. SipHash (std's default) costs
/// more than the rest of the per-event work together, and its HashDoS
/// resistance buys nothing here: the keys are the pipeline's own event ids,
/// and without the "random" grant its seed is a constant anyway.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(K);
        }
        let mut tail = [0u8; 8];
        tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(tail)).wrapping_mul(K);
    }

    fn write_u8(&mut self, b: u8) {
        self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn finish(&self) -> u64 {
        // The multiply leaves the low bits weak, and the table indexes by
        // them: murmur3's finaliser spreads the high bits down.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

/// An id as a map key, stored inline when it fits: event ids are UUIDs (36
/// bytes), and with a heap key every probe chased a pointer and every new id
/// cost an allocation, which together made up most of the per-event time.
/// Longer ids (transform rejects them, but dedup may run without it) go on
/// the heap.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<str>),
}

/// Makes `Key` 40 bytes, the same as an inline UUID needs anyway.
const INLINE: usize = 38;

impl Key {
    fn new(id: &str) -> Key {
        if id.len() <= INLINE {
            let mut bytes = [0u8; INLINE];
            bytes[..id.len()].copy_from_slice(id.as_bytes());
            Key::Inline {
                len: id.len() as u8,
                bytes,
            }
        } else {
            Key::Heap(id.into())
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Key::Heap(id) => id.as_bytes(),
        }
    }
}

// By hand so only the id's bytes are hashed, in one `write`: the derived
// impl would also hash the variant, the length and the padding.
impl std::hash::Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.as_bytes());
    }
}

/// The table is keyed by the id's hash, already mixed by [`IdHasher`].
#[derive(Default, Clone, Copy)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn write(&mut self, _: &[u8]) {
        unreachable!("only u64 keys are hashed")
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

fn hash_id(id: &[u8]) -> u64 {
    let mut h = IdHasher::default();
    h.write(id);
    h.finish()
}

/// The remembered ids.
///
/// `entries` holds the ids in insertion order. `index` maps an id's hash to
/// the sequence number of its live entry (`evicted` + its position in
/// `entries`). Keying by hash keeps the table at 16 bytes a slot: the
/// per-event cost is cache misses in that table, and a 100k-id window of
/// 56-byte slots (id inline) missed twice as often. A hit is checked
/// against the entry's id, so two ids with one hash never drop an event
/// wrongly; the older of them just loses its protection, and the table's
/// primary key still refuses a duplicate that gets through.
///
/// An id forgotten by time but not yet evicted (it is not at the front) and
/// then seen again gets a second, newer entry; the older one is then stale,
/// and since it is expired too it goes as soon as it reaches the front.
#[derive(Debug)]
pub struct Dedup {
    config: Config,
    index: HashMap<u64, u64, BuildHasherDefault<PassThrough>>,
    entries: VecDeque<(Key, i64)>,
    /// How many entries have left the front: the sequence number of the front.
    evicted: u64,
    /// The newest event time seen; the time window is measured back from it.
    newest: i64,
}

impl Dedup {
    pub fn new(config: Config) -> Dedup {
        Dedup {
            config,
            index: HashMap::default(),
            entries: VecDeque::new(),
            evicted: 0,
            newest: i64::MIN,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    fn horizon(&self) -> i64 {
        self.newest.saturating_sub(self.config.window_us())
    }

    /// True when the event is new (keep it), false for a duplicate (drop it).
    pub fn admit(&mut self, id: &str, time: i64) -> bool {
        self.newest = self.newest.max(time);
        let horizon = self.horizon();
        let seq = self.evicted + self.entries.len() as u64;
        // One probe for both the look-up and the insert.
        match self.index.entry(hash_id(id.as_bytes())) {
            MapEntry::Occupied(mut seen) => {
                let (key, seen_at) = &self.entries[(*seen.get() - self.evicted) as usize];
                if key.as_bytes() == id.as_bytes() && *seen_at >= horizon {
                    return false;
                }
                // An event already outside the window would be forgotten at
                // once: remembering it would only take room from ids that count.
                if time < horizon {
                    return true;
                }
                seen.insert(seq);
            }
            MapEntry::Vacant(new) => {
                if time < horizon {
                    return true;
                }
                new.insert(seq);
            }
        }
        self.entries.push_back((Key::new(id), time));
        self.evict();
        true
    }

    fn evict(&mut self) {
        let horizon = self.horizon();
        let max_entries = self.config.window_events.saturating_mul(2);
        while let Some((_, time)) = self.entries.front() {
            let over = self.index.len() > self.config.window_events
                // Bounds the stale entries that out-of-order times can leave.
                || self.entries.len() > max_entries;
            if !over && *time >= horizon {
                break;
            }
            let (key, _) = self.entries.pop_front().expect("front exists");
            let seq = self.evicted;
            self.evicted += 1;
            if let MapEntry::Occupied(live) = self.index.entry(hash_id(key.as_bytes())) {
                if *live.get() == seq {
                    live.remove();
                }
            }
        }
    }

    /// The state as bytes, all integers little-endian:
    ///
    /// ```text
    /// "DDUP" | version u8 = 1 | newest event time i64 | count u32
    /// count x ( id length LEB128 u32 | id bytes (UTF-8) | event time i64 )
    /// ```
    ///
    /// Entries are in insertion order, so a restore evicts in the same
    /// order as the instance that took the snapshot would have. Only ids
    /// still inside the time window are written.
    pub fn snapshot(&self) -> Vec<u8> {
        let horizon = self.horizon();
        let live = self.entries.iter().filter(|(_, time)| *time >= horizon);
        let bytes: usize = live.clone().map(|(key, _)| key.as_bytes().len() + 1 + 8).sum();
        let mut out = Vec::with_capacity(HEADER_LEN + bytes + 8);
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&self.newest.to_le_bytes());
        let count_at = out.len();
        out.extend_from_slice(&0u32.to_le_bytes());
        let mut count: u32 = 0;
        for (key, time) in live {
            let id = key.as_bytes();
            let mut len = id.len() as u32;
            while len >= 0x80 {
                out.push((len as u8) | 0x80);
                len >>= 7;
            }
            out.push(len as u8);
            out.extend_from_slice(id);
            out.extend_from_slice(&time.to_le_bytes());
            count += 1;
        }
        out[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
        out
    }

    /// Replaces the remembered ids with a snapshot's, evicting under the
    /// current config (the window may have shrunk since). Empty means no
    /// state. On error nothing changes.
    pub fn restore(&mut self, state: &[u8]) -> Result<(), String> {
        if state.is_empty() {
            *self = Dedup::new(self.config.clone());
            return Ok(());
        }
        if state.len() < MAGIC.len() || &state[..MAGIC.len()] != MAGIC {
            return Err(format!(
                "not a dedup snapshot: it starts with {:02x?}, not the magic bytes \"DDUP\"",
                &state[..state.len().min(4)]
            ));
        }
        let mut r = Reader { buf: state, at: 4 };
        let version = r.u8()?;
        if version != FORMAT_VERSION {
            return Err(format!(
                "dedup snapshot has format version {version}; this build reads version \
                 {FORMAT_VERSION} only"
            ));
        }
        let newest = r.i64()?;
        let count = r.u32()? as usize;
        if count > (state.len() - HEADER_LEN) / MIN_ENTRY_LEN {
            return Err(r.truncated(&format!("{count} entries announced")));
        }
        let mut fresh = Dedup::new(self.config.clone());
        fresh.entries.reserve(count);
        fresh.index.reserve(count);
        for i in 0..count {
            let len = r.len()?;
            let id = std::str::from_utf8(r.take(len)?)
                .map_err(|_| format!("dedup snapshot entry {i}: id is not UTF-8"))?;
            let time = r.i64()?;
            // A writer never repeats an id (nor, but for a 2^-64 chance, a
            // hash); if one did, the first occurrence is the one a live
            // instance would have kept.
            let seq = fresh.entries.len() as u64;
            if let MapEntry::Vacant(new) = fresh.index.entry(hash_id(id.as_bytes())) {
                new.insert(seq);
                fresh.entries.push_back((Key::new(id), time));
            }
        }
        if r.at != state.len() {
            return Err(format!(
                "dedup snapshot has {} bytes after its {count} entries",
                state.len() - r.at
            ));
        }
        fresh.newest = newest;
        fresh.evict();
        *self = fresh;
        Ok(())
    }
}

/// A bounds-checked cursor: every read past the end is a "truncated" error.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn truncated(&self, what: &str) -> String {
        format!(
            "dedup snapshot is truncated ({what}; {} bytes in all)",
            self.buf.len()
        )
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or_else(|| self.truncated(&format!("{n} bytes wanted at offset {}", self.at)))?;
        let bytes = &self.buf[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    /// LEB128, at most five bytes (a u32).
    fn len(&mut self) -> Result<usize, String> {
        let mut value: u32 = 0;
        for shift in (0..35).step_by(7) {
            let b = self.u8()?;
            value |= u32::from(b & 0x7f).checked_shl(shift).unwrap_or(0);
            if b & 0x80 == 0 {
                return Ok(value as usize);
            }
        }
        Err(format!(
            "dedup snapshot has a malformed id length at offset {}",
            self.at
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const S: i64 = 1_000_000;

    fn with(window_events: usize, window_seconds: i64) -> Dedup {
        Dedup::new(Config {
            window_events,
            window_seconds,
        })
    }

    fn pairs(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn uuid(i: u64) -> String {
        format!("00000000-0000-4000-8000-{i:012x}")
    }

    #[test]
    fn a_uuid_key_is_stored_inline_in_40_bytes() {
        assert_eq!(std::mem::size_of::<Key>(), 40);
        assert!(matches!(Key::new(&uuid(1)), Key::Inline { .. }));
        assert!(matches!(Key::new(&"x".repeat(39)), Key::Heap(_)));
    }

    #[test]
    fn within_a_batch_the_first_occurrence_is_kept() {
        let mut d = with(100, 3600);
        let batch = [("a", 1), ("b", 2), ("a", 3), ("c", 4), ("b", 5), ("a", 6)];
        let kept: Vec<_> = batch
            .iter()
            .filter(|(id, t)| d.admit(id, *t))
            .map(|(id, t)| (*id, *t))
            .collect();
        assert_eq!(kept, vec![("a", 1), ("b", 2), ("c", 4)]);
        assert_eq!(d.len(), 3);
    }

    #[test]
    fn duplicates_across_batches_are_dropped() {
        let mut d = with(100, 3600);
        assert!(d.admit("a", 0));
        assert!(d.admit("b", S));
        assert!(!d.admit("a", 2 * S));
        assert!(!d.admit("b", 0));
    }

    #[test]
    fn count_window_forgets_the_oldest_first() {
        let mut d = with(2, 3600);
        assert!(d.admit("a", 1));
        assert!(d.admit("b", 2));
        assert!(d.admit("c", 3));
        assert_eq!(d.len(), 2);
        assert!(!d.admit("b", 4) && !d.admit("c", 4), "b and c remembered");
        assert!(d.admit("a", 5), "a was the oldest, so forgotten");
        assert!(d.admit("b", 6), "re-admitting a pushed b out");
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn time_window_forgets_ids_older_than_newest_minus_window() {
        let mut d = with(100, 10);
        assert!(d.admit("a", 0));
        assert!(!d.admit("a", 10 * S), "exactly at the window edge: still seen");
        assert!(d.admit("b", 11 * S), "moves the horizon past a");
        assert_eq!(d.len(), 1, "a evicted");
        assert!(d.admit("a", 11 * S));
        assert!(!d.admit("a", 11 * S));
    }

    #[test]
    fn time_window_applies_to_out_of_order_times() {
        let mut d = with(100, 10);
        assert!(d.admit("p", 20 * S));
        assert!(d.admit("q", 12 * S));
        // Horizon 15 s: q is out of the window, though it is still stored
        // behind p, which is not.
        assert!(d.admit("r", 25 * S));
        assert!(d.admit("q", 13 * S), "q forgotten though not yet evicted");
        assert!(!d.admit("p", 0));
        assert!(d.admit("old", 0), "already outside the window...");
        assert!(d.admit("old", 0), "...so never remembered");
    }

    #[test]
    fn evicting_a_stale_entry_keeps_the_readmitted_id() {
        let mut d = with(3, 10);
        assert!(d.admit("p", 20 * S));
        assert!(d.admit("q", 15 * S));
        assert!(d.admit("r", 26 * S)); // horizon 16 s: q expires behind p
        assert!(d.admit("q", 26 * S)); // a second entry for q
        assert_eq!(d.len(), 3);
        assert!(d.admit("s", 27 * S)); // evicts p by count, then q's old entry
        assert_eq!(d.len(), 3);
        assert!(!d.admit("q", 27 * S), "q's newer entry is still live");
        assert!(!d.admit("r", 27 * S) && !d.admit("s", 27 * S));
        assert!(d.admit("p", 27 * S), "p was evicted by count");
    }

    #[test]
    fn snapshot_round_trips_in_insertion_order() {
        let mut d = with(1000, 3600);
        for i in 0..500 {
            assert!(d.admit(&uuid(i), i as i64 * S));
        }
        let snap = d.snapshot();
        assert_eq!(&snap[..5], b"DDUP\x01");
        let mut e = with(1000, 3600);
        e.restore(&snap).unwrap();
        assert_eq!(e.len(), 500);
        assert_eq!(e.snapshot(), snap, "restore then snapshot is the identity");
        assert!(!e.admit(&uuid(250), 0));
        assert!(e.admit(&uuid(9999), 0));
        // A smaller window on restore evicts the oldest-inserted ids.
        let mut small = with(100, 3600);
        small.restore(&snap).unwrap();
        assert_eq!(small.len(), 100);
        assert!(!small.admit(&uuid(499), 0));
        assert!(small.admit(&uuid(0), 500 * S));
        // The newest time travels too, so the time window resumes where it was.
        let mut short = with(1000, 10);
        short.restore(&snap).unwrap();
        assert_eq!(short.len(), 11);
        assert!(short.admit(&uuid(488), 0));
        // Empty is "no state".
        e.restore(&[]).unwrap();
        assert!(e.is_empty());
    }

    #[test]
    fn ids_of_any_length_survive_a_snapshot() {
        let mut d = with(10, 3600);
        let long = "x".repeat(300);
        for id in ["", "é", long.as_str()] {
            assert!(d.admit(id, 0));
        }
        let mut e = with(10, 3600);
        e.restore(&d.snapshot()).unwrap();
        for id in ["", "é", long.as_str()] {
            assert!(!e.admit(id, 0), "{id}");
        }
    }

    #[test]
    fn corrupt_snapshots_are_refused_and_leave_the_state_alone() {
        let mut d = with(10, 3600);
        d.admit("a", 1);
        d.admit("b", 2);
        let snap = d.snapshot();
        let mut e = with(10, 3600);
        e.admit("kept", 0);

        let mut bad = snap.clone();
        bad[0] = b'X';
        let err = e.restore(&bad).unwrap_err();
        assert!(err.contains("magic"), "{err}");
        let err = e.restore(b"DD").unwrap_err();
        assert!(err.contains("magic"), "{err}");

        let mut newer = snap.clone();
        newer[4] = 9;
        let err = e.restore(&newer).unwrap_err();
        assert!(err.contains("format version 9"), "{err}");

        for cut in [5, 12, HEADER_LEN, snap.len() - 1] {
            let err = e.restore(&snap[..cut]).unwrap_err();
            assert!(err.contains("truncated"), "cut at {cut}: {err}");
        }
        let mut huge = snap.clone();
        huge[13..17].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(e.restore(&huge).unwrap_err().contains("truncated"));

        let mut long = snap.clone();
        long.push(0);
        assert!(e.restore(&long).unwrap_err().contains("after its 2 entries"));

        let mut not_utf8 = snap.clone();
        not_utf8[HEADER_LEN + 1] = 0xff;
        assert!(e.restore(&not_utf8).unwrap_err().contains("UTF-8"));

        assert_eq!(e.len(), 1);
        assert!(!e.admit("kept", 0), "a refused restore changes nothing");
    }

    #[test]
    fn config_defaults_and_overrides() {
        assert_eq!(Config::parse(&[]).unwrap(), Config::default());
        let c = Config::parse(&pairs(&[
            ("window-events", "5"),
            ("window-seconds", " 2 "),
        ]))
        .unwrap();
        assert_eq!(
            c,
            Config {
                window_events: 5,
                window_seconds: 2
            }
        );
        assert_eq!(
            c.describe(),
            "dedup: window-events = 5; window-seconds = 2"
        );
    }

    #[test]
    fn config_errors_name_the_key_and_value() {
        for (key, bad) in [
            ("window-events", "-1"),
            ("window-events", "0"),
            ("window-events", "lots"),
            ("window-seconds", "1.5"),
            ("window-seconds", "99999999999999999999"),
        ] {
            let e = Config::parse(&pairs(&[(key, bad)])).unwrap_err();
            assert!(
                e.contains(key) && e.contains(&format!("{bad:?}")),
                "{e}"
            );
        }
        let e = Config::parse(&pairs(&[("size", "1")])).unwrap_err();
        assert!(e.contains("\"size\""), "{e}");
    }

    /// Loose bounds, to catch an accidental quadratic or a slow hash, not
    /// to benchmark: debug builds and a busy machine must pass too.
    #[test]
    fn a_full_window_is_cheap_to_fill_snapshot_and_restore() {
        let mut d = Dedup::new(Config::default());
        let ids: Vec<String> = (0..105_000).map(uuid).collect();
        let start = Instant::now();
        for (i, id) in ids.iter().enumerate() {
            assert!(d.admit(id, i as i64));
        }
        let fill = start.elapsed();
        assert_eq!(d.len(), 100_000);
        let start = Instant::now();
        let snap = d.snapshot();
        let mut e = Dedup::new(Config::default());
        e.restore(&snap).unwrap();
        let round_trip = start.elapsed();
        assert_eq!(snap.len(), HEADER_LEN + 100_000 * (1 + 36 + 8));
        assert!(snap.len() < 5 << 20);
        assert!(!e.admit(&ids[104_999], 0) && e.admit(&ids[0], 0));
        eprintln!("105k admits {fill:?}, 100k snapshot+restore {round_trip:?}");
        assert!(fill.as_millis() < 2_000, "{fill:?}");
        assert!(round_trip.as_millis() < 2_000, "{round_trip:?}");
    }
}
#[cfg(test)]
mod bench_tmp {
    use super::*;
    #[test]
    fn steady() {
        let uuid = |i: u64| format!("{:08x}-0000-4000-8000-{i:012x}", i.wrapping_mul(2654435761) as u32);
        let mut d = Dedup::new(Config::default());
        let ids: Vec<String> = (0..200_000).map(uuid).collect();
        let t = std::time::Instant::now();
        for (i, id) in ids[..100_000].iter().enumerate() { d.admit(id, i as i64); }
        eprintln!("fill {:?}", t.elapsed());
        for round in 0..5 {
            let t = std::time::Instant::now();
            let base = 100_000 + round * 5000;
            for (i, id) in ids[base..base + 5000].iter().enumerate() { d.admit(id, (base + i) as i64); }
            eprintln!("5000 new {:?}", t.elapsed());
            let t = std::time::Instant::now();
            for (i, id) in ids[base..base + 5000].iter().enumerate() { d.admit(id, (base + i) as i64); }
            eprintln!("5000 dup {:?}", t.elapsed());
        }
        let t = std::time::Instant::now();
        let s = d.snapshot();
        eprintln!("snapshot {:?} {} bytes", t.elapsed(), s.len());
        let t = std::time::Instant::now();
        d.restore(&s).unwrap();
        eprintln!("restore {:?}", t.elapsed());
    }
}
