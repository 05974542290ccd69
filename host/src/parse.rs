//! CSV to typed events.
//!
//! The parser works on chunks of a file that end on a line boundary and
//! reports, per record, where it ends (bytes and lines consumed), so the
//! source can commit exact positions. A bad record never stops anything:
//! it becomes a `BadRow` with its line, raw text and reason.

use chrono::{DateTime, NaiveDateTime};

use crate::sink::columns;
use crate::stage::Event;

/// The columns of an event, in the default order of a headerless file.
pub const COLUMNS: [&str; 6] = [
    "event_id",
    "user_id",
    "event_type",
    "product_id",
    "price",
    "event_time",
];

/// Where each field is in a record: `index[i]` is the record position of
/// `COLUMNS[i]`. Set from the header when a file has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    index: [usize; 6],
    width: usize,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            index: [0, 1, 2, 3, 4, 5],
            width: 6,
        }
    }
}

impl Layout {
    /// Reads a header record. `Ok(None)` when the record is not a header.
    pub fn from_header(record: &csv::ByteRecord) -> Result<Option<Layout>, String> {
        let names: Vec<String> = record
            .iter()
            .map(|f| {
                String::from_utf8_lossy(f)
                    .trim_start_matches('\u{feff}')
                    .trim()
                    .to_ascii_lowercase()
            })
            .collect();
        if !names.iter().any(|n| n == "event_id") {
            return Ok(None);
        }
        let mut index = [0; 6];
        for (slot, column) in index.iter_mut().zip(COLUMNS) {
            *slot = names.iter().position(|n| n == column).ok_or_else(|| {
                format!(
                    "header has no column {column:?} (expected {})",
                    COLUMNS.join(",")
                )
            })?;
        }
        Ok(Some(Layout {
            index,
            width: names.len(),
        }))
    }
}

/// A record that could not be turned into an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    /// 1-based line number in the file where the record starts.
    pub line: u64,
    pub raw: String,
    pub reason: String,
}

/// One record of a chunk, with the position right after it.
#[derive(Debug)]
pub struct Parsed {
    pub result: Result<Event, BadRow>,
    /// Bytes of the chunk consumed up to and including this record.
    pub end: usize,
    /// Lines of the chunk consumed up to and including this record.
    pub lines: u64,
}

/// Per-file parse state that must persist across chunks.
#[derive(Debug, Default, Clone)]
pub struct FileParser {
    layout: Layout,
    /// Set once the first record of the file has been seen.
    started: bool,
}

impl FileParser {
    /// A parser for a file being resumed after `first_line` (the file's
    /// first line, to learn its header) at a later offset.
    pub fn resume(first_line: Option<&[u8]>) -> FileParser {
        let mut parser = FileParser::default();
        if let Some(line) = first_line {
            let mut reader = csv_reader(line);
            let mut record = csv::ByteRecord::new();
            if let Ok(true) = reader.read_byte_record(&mut record) {
                if let Ok(Some(layout)) = Layout::from_header(&record) {
                    parser.layout = layout;
                }
            }
        }
        parser.started = true;
        parser
    }

    /// The reader dropped a record it could not take whole (see the
    /// source's record limit): a header can no longer follow.
    pub fn skip_record(&mut self) {
        self.started = true;
    }

    /// Parses complete records of `chunk`, whose first line is line
    /// `first_line` (1-based) of the file. When `is_final` is false, a last
    /// record with an unclosed quote is left unconsumed: the rest of it has
    /// not been written yet. Returns the bytes and lines consumed.
    pub fn parse(
        &mut self,
        chunk: &[u8],
        first_line: u64,
        is_final: bool,
        emit: impl FnMut(Parsed),
    ) -> (usize, u64) {
        self.parse_with(&mut csv_reader(chunk), chunk, first_line, is_final, emit)
    }

    /// `parse` with a reader positioned at the start of `chunk`.
    fn parse_with<R: std::io::Read>(
        &mut self,
        reader: &mut csv::Reader<R>,
        chunk: &[u8],
        first_line: u64,
        is_final: bool,
        mut emit: impl FnMut(Parsed),
    ) -> (usize, u64) {
        let mut record = csv::ByteRecord::new();
        let mut consumed = 0usize;
        let mut lines = 0u64;
        loop {
            match reader.read_byte_record(&mut record) {
                Ok(false) => break,
                Ok(true) => {}
                Err(e) => {
                    // csv reports only UTF-8 problems for ByteRecord, which
                    // do not happen; treat anything else as the end.
                    tracing::warn!("csv reader stopped: {e}");
                    break;
                }
            }
            let mut end = reader.position().byte() as usize;
            // csv ends a CRLF record at the CR; the LF belongs to it too.
            if end < chunk.len() && chunk[end] == b'\n' && end > 0 && chunk[end - 1] == b'\r' {
                end += 1;
            }
            let raw = &chunk[consumed..end];
            if !is_final && end == chunk.len() && !raw.ends_with(b"\n") {
                break;
            }
            // A record that runs to the end of the chunk may be cut inside
            // a quoted field whose rest is not read yet (csv then ends it at
            // the chunk's end): an odd number of quotes tells. One that
            // ends before the chunk's end is complete whatever its quotes;
            // holding it back would hold back everything after it.
            if !is_final
                && end == chunk.len()
                && raw.iter().filter(|&&b| b == b'"').count() % 2 == 1
            {
                break;
            }
            let raw_lines = raw.iter().filter(|&&b| b == b'\n').count() as u64;
            let start_line = first_line + lines + leading_blank_lines(raw);
            lines += raw_lines;
            consumed = end;
            let result = if !self.started {
                self.started = true;
                match Layout::from_header(&record) {
                    Ok(Some(layout)) => {
                        self.layout = layout;
                        continue;
                    }
                    Ok(None) => parse_event(&record, &self.layout),
                    Err(reason) => Err(reason),
                }
            } else {
                parse_event(&record, &self.layout)
            };
            emit(Parsed {
                result: result.map_err(|reason| BadRow {
                    line: start_line,
                    raw: raw_text(raw),
                    reason,
                }),
                end,
                lines,
            });
        }
        (consumed, lines)
    }
}

/// Parses a stream's messages, one CSV line each, with one csv reader for
/// all of them. Building a reader costs ~260,000 instructions (csv_core
/// builds its state machine), far more than a record: `FileParser::parse`
/// builds one per call, which is once per chunk of a file but would be
/// once per message of a stream.
pub struct MessageParser {
    rows: FileParser,
    reader: csv::Reader<Feed>,
}

impl Default for MessageParser {
    fn default() -> Self {
        MessageParser {
            // Messages carry no header.
            rows: FileParser::resume(None),
            reader: csv_builder().from_reader(Feed::default()),
        }
    }
}

impl MessageParser {
    /// Parses one whole message, numbered `line` (its stream sequence).
    pub fn parse(&mut self, message: &[u8], line: u64, emit: impl FnMut(Parsed)) -> (usize, u64) {
        let feed = self.reader.get_mut();
        feed.data.clear();
        feed.data.extend_from_slice(message);
        // Back to the start, the parser's state reset (its tables kept).
        // The feed cannot fail to seek; were it to, the message would read
        // as empty, never as the one before.
        if self
            .reader
            .seek_raw(std::io::SeekFrom::Start(0), csv::Position::new())
            .is_err()
        {
            return (0, 0);
        }
        self.rows
            .parse_with(&mut self.reader, message, line, true, emit)
    }
}

/// The bytes of the message a [`MessageParser`] is reading.
#[derive(Default)]
struct Feed {
    data: Vec<u8>,
    at: usize,
}

impl std::io::Read for Feed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let rest = self.data.get(self.at..).unwrap_or_default();
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.at += n;
        Ok(n)
    }
}

impl std::io::Seek for Feed {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        let at = match to {
            std::io::SeekFrom::Start(n) => usize::try_from(n).unwrap_or(usize::MAX),
            std::io::SeekFrom::End(_) => self.data.len(),
            std::io::SeekFrom::Current(_) => self.at,
        };
        self.at = at.min(self.data.len());
        Ok(self.at as u64)
    }
}

fn csv_reader(data: &[u8]) -> csv::Reader<&[u8]> {
    csv_builder().from_reader(data)
}

fn csv_builder() -> csv::ReaderBuilder {
    let mut builder = csv::ReaderBuilder::new();
    builder.has_headers(false).flexible(true);
    builder
}

/// csv skips blank lines before a record; they belong to its raw slice.
fn leading_blank_lines(raw: &[u8]) -> u64 {
    let mut count = 0;
    for &b in raw {
        match b {
            b'\n' => count += 1,
            b'\r' => {}
            _ => break,
        }
    }
    count
}

pub(crate) fn raw_text(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let text = text.trim_matches(|c| c == '\n' || c == '\r');
    // A single line can be huge; the quarantine keeps enough to act on.
    const MAX: usize = 64 * 1024;
    if text.len() > MAX {
        let mut cut = MAX;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}... [{} bytes]", &text[..cut], text.len())
    } else {
        text.to_owned()
    }
}

/// Turns one record into an event, or says precisely what is wrong.
pub fn parse_event(record: &csv::ByteRecord, layout: &Layout) -> Result<Event, String> {
    if record.len() != layout.width {
        return Err(format!(
            "expected {} fields, found {}",
            layout.width,
            record.len()
        ));
    }
    // One UTF-8 check for the whole record; a field is checked on its own
    // only when that fails or its bounds split a character, to say which.
    let whole = std::str::from_utf8(record.as_slice()).ok();
    let field = |i: usize| -> Result<&str, String> {
        let index = layout.index[i];
        let text = match whole.and_then(|w| w.get(record.range(index)?)) {
            Some(text) => text,
            None => std::str::from_utf8(&record[index]).map_err(|e| {
                format!(
                    "{} is not valid UTF-8 (bad byte at offset {})",
                    COLUMNS[i],
                    e.valid_up_to()
                )
            })?,
        };
        Ok(trim(text))
    };
    let event_id = field(0)?;
    let mut hyphenated = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let event_id = String::from(
        &*uuid::Uuid::try_parse(event_id)
            .map_err(|_| format!("event_id {event_id:?} is not a UUID"))?
            .hyphenated()
            .encode_lower(&mut hyphenated),
    );
    let event = Event {
        event_id,
        user_id: parse_int(field(1)?, "user_id")?,
        event_type: field(2)?.to_owned(),
        product_id: parse_int(field(3)?, "product_id")?,
        price_cents: parse_price_cents(field(4)?)?,
        event_time: parse_time_micros(field(5)?)?,
    };
    // A value the table cannot hold is the file's fault, whatever the
    // stages would do with it: say so here, with the column and value.
    columns::check(&event).map_err(|v| v.to_string())?;
    Ok(event)
}

/// A field without the spaces or byte order mark around it. Nearly every
/// field starts and ends with a visible ASCII character, which is neither
/// (no Unicode space is in 0x21..0x7F): those are returned as they are,
/// without decoding characters from each end.
fn trim(text: &str) -> &str {
    let visible = |b: Option<&u8>| b.is_some_and(|b| (0x21..0x7f).contains(b));
    match visible(text.as_bytes().first()) && visible(text.as_bytes().last()) {
        true => text,
        false => text.trim().trim_start_matches('\u{feff}'),
    }
}

fn parse_int(text: &str, column: &str) -> Result<i32, String> {
    text.parse()
        .map_err(|_| format!("{column} {text:?} is not a 32-bit integer"))
}

/// "12.5" -> 1250. Exact: no float is involved.
pub fn parse_price_cents(text: &str) -> Result<i64, String> {
    let bad = || format!("price {text:?} is not a decimal number with at most 2 decimals");
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() && fraction.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let significant = fraction.trim_end_matches('0');
    if significant.len() > 2 {
        return Err(bad());
    }
    let whole: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    // At most two digits, all ASCII digits: "5" is 50 cents, "05" is 5.
    let digits = significant
        .bytes()
        .fold(0i64, |n, b| n * 10 + i64::from(b - b'0'));
    let cents = if significant.len() == 1 {
        digits * 10
    } else {
        digits
    };
    let value = whole
        .checked_mul(100)
        .and_then(|w| w.checked_add(cents))
        .ok_or_else(bad)?;
    Ok(if negative { -value } else { value })
}

/// RFC 3339 with `Z` or an offset, or a date-time without a zone (UTC).
pub fn parse_time_micros(text: &str) -> Result<i64, String> {
    if let Some(micros) = utc_micros(text.as_bytes()) {
        return Ok(micros);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp_micros());
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, format) {
            return Ok(t.and_utc().timestamp_micros());
        }
    }
    Err(format!(
        "event_time {text:?} is not a timestamp (use RFC 3339, e.g. 2026-01-05T14:47:56.000Z)"
    ))
}

/// The form nearly every event carries, `YYYY-MM-DDTHH:MM:SS[.f…]Z`
/// (years 1000 to 9999, no leap second), read without chrono's general
/// parser, which costs five times as much. Anything else is `None` and
/// goes to chrono: the answer is chrono's either way.
fn utc_micros(b: &[u8]) -> Option<i64> {
    if b.len() < 20 || b[b.len() - 1] != b'Z' {
        return None;
    }
    let (head, fraction) = b[..b.len() - 1].split_at(19);
    let head: &[u8; 19] = head.try_into().ok()?;
    const DIGITS: [usize; 14] = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18];
    let separators = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if DIGITS.iter().any(|&i| !head[i].is_ascii_digit())
        || separators.iter().any(|&(i, c)| head[i] != c)
    {
        return None;
    }
    let d = |i: usize| i64::from(head[i] - b'0');
    let year = d(0) * 1000 + d(1) * 100 + d(2) * 10 + d(3);
    let (month, day) = (d(5) * 10 + d(6), d(8) * 10 + d(9));
    let (hour, minute, second) = (d(11) * 10 + d(12), d(14) * 10 + d(15), d(17) * 10 + d(18));
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => return None,
    };
    if year < 1000 || day < 1 || day > days_in_month || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    // A fraction of 1 to 9 digits (chrono reads no more than 9 either
    // way; a longer one goes to it), truncated to microseconds.
    let micros = match fraction {
        [] => 0,
        [b'.', digits @ ..] if (1..=9).contains(&digits.len()) => {
            let nanos = digits.iter().try_fold(0i64, |n, &c| {
                c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
            })?;
            nanos * 10i64.pow(9 - digits.len() as u32) / 1_000
        }
        _ => return None,
    };
    // Days since 1970-01-01 of a proleptic Gregorian date (the
    // days-from-civil algorithm, with March as the first month).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + hour) * 60 + minute) * 60_000_000 + second * 1_000_000 + micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_reader_for_many_messages_reads_each_as_a_fresh_one_does() {
        let messages = [
            format!("{ID},1,view,2,3.00,2026-01-05T14:47:56.000Z"),
            format!("{ID},1,view,2,3.00,2026-01-05T14:47:56.000Z\r\n"),
            "not,a,row".to_owned(),
            format!("{ID},1,\"add,to cart\",2,3.00,2026-01-05T14:47:56Z"),
            format!("{ID},1,\"view,2,3.00,2026-01-05T14:47:56Z"),
            String::new(),
            format!("{ID},1,view,2,3.00,2026-01-05T14:47:56Z\n{ID},7,view,2,3.00,2026-01-05T14:47:56Z\n"),
            "\n\n".to_owned(),
            format!("{ID},1,view,2,-1.5,2026-01-05T14:47:56Z"),
        ];
        let shown = |p: &Parsed| format!("{:?} {} {}", p.result, p.end, p.lines);
        let mut shared = MessageParser::default();
        for round in 0..2 {
            for (i, message) in messages.iter().enumerate() {
                let line = (round * 100 + i) as u64;
                let (mut fresh, mut reused) = (Vec::new(), Vec::new());
                let a = FileParser::resume(None)
                    .parse(message.as_bytes(), line, true, |p| fresh.push(shown(&p)));
                let b = shared.parse(message.as_bytes(), line, |p| reused.push(shown(&p)));
                assert_eq!((a, &fresh), (b, &reused), "{message:?}");
            }
        }
    }

    #[test]
    fn trimming_skips_only_fields_with_nothing_to_trim() {
        for (raw, trimmed) in [
            ("view", "view"),
            (" view ", "view"),
            ("\tview\r", "view"),
            ("\u{feff}event_id", "event_id"),
            ("\u{a0}view\u{3000}", "view"),
            ("v", "v"),
            ("", ""),
            ("  ", ""),
            ("ünï", "ünï"),
            ("a b", "a b"),
        ] {
            assert_eq!(trim(raw), trimmed, "{raw:?}");
            assert_eq!(
                trim(raw),
                raw.trim().trim_start_matches('\u{feff}'),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn the_fast_utc_form_reads_as_chrono_reads_it() {
        let chrono_micros = |t: &str| {
            DateTime::parse_from_rfc3339(t)
                .ok()
                .map(|t| t.timestamp_micros())
        };
        let mut checked = 0;
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let fractions = [
            "",
            ".0",
            ".5",
            ".123",
            ".000001",
            ".1234567",
            ".999999999",
            ".1234567891",
            ".",
        ];
        for _ in 0..20_000 {
            let year = [999, 1000, 1900, 1970, 2000, 2024, 2026, 2100, 9999][next(9) as usize];
            let text = format!(
                "{year:04}-{:02}-{:02}T{:02}:{:02}:{:02}{}Z",
                next(14),
                next(33),
                next(26),
                next(62),
                next(62),
                fractions[next(fractions.len() as u64) as usize],
            );
            if let Some(fast) = utc_micros(text.as_bytes()) {
                assert_eq!(Some(fast), chrono_micros(&text), "{text}");
                checked += 1;
            } else if let Some(micros) = chrono_micros(&text) {
                // Not the fast form: still read, by chrono.
                assert_eq!(parse_time_micros(&text), Ok(micros), "{text}");
            }
        }
        assert!(checked > 5_000, "only {checked} in the fast form");
        for other in [
            "2026-01-05t14:47:56Z",
            "2026-01-05 14:47:56Z",
            "2026-01-05T14:47:56+00:00",
            "2026-01-05T14:47:60Z",
            "+2026-01-05T14:47:56Z",
            "2026-1-05T14:47:56Z",
            "2026-01-05T14:47:56.Z",
        ] {
            assert_eq!(utc_micros(other.as_bytes()), None, "{other}");
        }
        assert_eq!(
            utc_micros(b"2024-02-29T23:59:59.999999Z"),
            chrono_micros("2024-02-29T23:59:59.999999Z")
        );
        assert_eq!(utc_micros(b"1970-01-01T00:00:00Z"), Some(0));
    }

    fn parse_all(text: &str, is_final: bool) -> (Vec<Parsed>, usize) {
        let mut parser = FileParser::default();
        let mut out = Vec::new();
        let (used, _) = parser.parse(text.as_bytes(), 1, is_final, |p| out.push(p));
        (out, used)
    }

    const ID: &str = "550e8400-e29b-41d4-a716-446655440000";

    #[test]
    fn header_maps_columns_by_name() {
        let text = format!(
            "price,event_id,user_id,event_type,product_id,event_time\n99.99,{ID},1,view,2,2026-01-05T14:47:56.000Z\n"
        );
        let (rows, used) = parse_all(&text, false);
        assert_eq!(used, text.len());
        assert_eq!(rows.len(), 1);
        let event = rows[0].result.as_ref().unwrap();
        assert_eq!(event.price_cents, 9999);
        assert_eq!(event.user_id, 1);
        assert_eq!(rows[0].lines, 2);
    }

    #[test]
    fn values_the_table_cannot_hold_are_malformed_with_column_and_value() {
        let long = "x".repeat(25);
        let text = format!(
            "{ID},1,{long},2,3.00,2026-01-05T00:00:00Z\n{ID},1,view,2,100000000.00,2026-01-05T00:00:00Z\n{ID},1,vi\0ew,2,3.00,2026-01-05T00:00:00Z\n{ID},1,{},2,3.00,2026-01-05T00:00:00Z\n",
            "é".repeat(20)
        );
        let mut parser = FileParser::resume(None);
        let mut out = Vec::new();
        parser.parse(text.as_bytes(), 1, true, |p| out.push(p));
        let reasons: Vec<String> = out
            .iter()
            .map(|p| {
                p.result
                    .as_ref()
                    .err()
                    .map(|b| b.reason.clone())
                    .unwrap_or_default()
            })
            .collect();
        assert!(
            reasons[0].starts_with(&format!("event_type \"{long}\" has 25 characters")),
            "{reasons:?}"
        );
        assert!(
            reasons[1].starts_with("price 10000000000 cents"),
            "{reasons:?}"
        );
        assert!(reasons[2].contains("NUL"), "{reasons:?}");
        // 20 characters of 2 bytes each fit VARCHAR(20).
        assert!(out[3].result.is_ok(), "{reasons:?}");
    }

    #[test]
    fn headerless_rows_use_default_order() {
        let text = format!("{ID},12345,purchase,67890,99.99,2026-01-05T14:47:56Z\n");
        let (rows, _) = parse_all(&text, false);
        let e = rows[0].result.as_ref().unwrap();
        assert_eq!(e.event_type, "purchase");
        assert_eq!(e.product_id, 67890);
        assert_eq!(e.event_time, 1_767_624_476_000_000);
    }

    #[test]
    fn bad_rows_carry_line_raw_text_and_reason() {
        let text = format!(
            "event_id,user_id,event_type,product_id,price,event_time\n{ID},1,view,2,3.00\nnot-a-uuid,1,view,2,3.00,2026-01-05T00:00:00Z\n{ID},x,view,2,3.00,2026-01-05T00:00:00Z\n{ID},1,view,2,3.005,2026-01-05T00:00:00Z\n{ID},1,view,2,3.00,yesterday\n"
        );
        let (rows, _) = parse_all(&text, false);
        let bad: Vec<&BadRow> = rows
            .iter()
            .map(|r| r.result.as_ref().unwrap_err())
            .collect();
        assert_eq!(bad.len(), 5);
        assert_eq!(bad[0].line, 2);
        assert!(bad[0].reason.contains("expected 6 fields, found 5"));
        assert_eq!(bad[0].raw, format!("{ID},1,view,2,3.00"));
        assert!(bad[1].reason.contains("not a UUID"));
        assert!(bad[2].reason.contains("user_id"));
        assert!(bad[3].reason.contains("price"));
        assert!(bad[4].reason.contains("event_time"));
        assert_eq!(bad[4].line, 6);
    }

    #[test]
    fn non_utf8_is_reported() {
        let mut bytes = format!("{ID},1,vi").into_bytes();
        bytes.push(0xff);
        bytes.extend_from_slice(b"ew,2,3.00,2026-01-05T00:00:00Z\n");
        let mut parser = FileParser::default();
        let mut rows = Vec::new();
        parser.parse(&bytes, 1, false, |p| rows.push(p));
        assert!(rows[0]
            .result
            .as_ref()
            .unwrap_err()
            .reason
            .contains("UTF-8"));
    }

    #[test]
    fn a_character_split_across_two_fields_is_reported_in_the_first() {
        // The fields' bytes, without the comma, make a valid "é": the
        // record is checked as a whole, and each field's bounds too.
        let mut bytes: Vec<u8> = format!("{ID},1,view").into_bytes();
        bytes.push(0xc3);
        bytes.push(b',');
        bytes.push(0xa9);
        bytes.extend_from_slice(b"2,3.00,2026-01-05T00:00:00Z\n");
        let mut parser = FileParser::default();
        let mut rows = Vec::new();
        parser.parse(&bytes, 1, false, |p| rows.push(p));
        let reason = &rows[0].result.as_ref().unwrap_err().reason;
        assert!(
            reason.starts_with("event_type is not valid UTF-8"),
            "{reason}"
        );
    }

    #[test]
    fn incomplete_last_line_is_left_for_later() {
        let full = format!("{ID},1,view,2,3.00,2026-01-05T00:00:00Z\n");
        let text = format!("{full}{ID},1,vi");
        let (rows, used) = parse_all(&text, false);
        assert_eq!(rows.len(), 1);
        assert_eq!(used, full.len());
        let (rows, used) = parse_all(&text, true);
        assert_eq!(rows.len(), 2);
        assert_eq!(used, text.len());
    }

    #[test]
    fn quoted_fields_may_hold_commas_and_newlines() {
        let text = format!("{ID},1,\"add,to\ncart\",2,3.00,2026-01-05T00:00:00Z\n");
        let (rows, used) = parse_all(&text, false);
        assert_eq!(used, text.len());
        assert_eq!(rows[0].result.as_ref().unwrap().event_type, "add,to\ncart");
        assert_eq!(rows[0].lines, 2);
        // An open quote at the end of what has been written so far waits.
        let open = format!("{ID},1,\"add,to\n");
        let (rows, used) = parse_all(&open, false);
        assert!(rows.is_empty());
        assert_eq!(used, 0);
    }

    #[test]
    fn a_stray_quote_inside_a_field_does_not_hold_back_the_rest() {
        // csv reads a quote inside an unquoted field as a plain character;
        // the record is complete and what follows must not wait for a
        // closing quote that never comes.
        let text = format!(
            "{ID},1,vi\"ew,2,3.00,2026-01-05T00:00:00Z\n{ID},2,view,2,3.00,2026-01-05T00:00:00Z\n"
        );
        let (rows, used) = parse_all(&text, false);
        assert_eq!(used, text.len());
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].result.as_ref().unwrap().event_type, "vi\"ew");
        assert!(rows[1].result.is_ok());
    }

    #[test]
    fn crlf_and_bom_are_accepted() {
        let text = format!("\u{feff}event_id,user_id,event_type,product_id,price,event_time\r\n{ID},1,view,2,3.00,2026-01-05T00:00:00Z\r\n");
        let (rows, used) = parse_all(&text, false);
        assert_eq!(used, text.len());
        assert_eq!(rows.len(), 1);
        assert!(rows[0].result.is_ok());
    }

    #[test]
    fn prices_are_exact_cents() {
        assert_eq!(parse_price_cents("99.99"), Ok(9999));
        assert_eq!(parse_price_cents("5"), Ok(500));
        assert_eq!(parse_price_cents("0.5"), Ok(50));
        assert_eq!(parse_price_cents("-1.25"), Ok(-125));
        assert_eq!(parse_price_cents("1.50000"), Ok(150));
        assert_eq!(parse_price_cents("0.05"), Ok(5));
        assert_eq!(parse_price_cents("7."), Ok(700));
        assert_eq!(parse_price_cents(".1"), Ok(10));
        assert!(parse_price_cents("1.234").is_err());
        assert!(parse_price_cents("1e3").is_err());
        assert!(parse_price_cents("").is_err());
        assert!(parse_price_cents(".").is_err());
    }

    #[test]
    fn timestamps_with_and_without_zone() {
        let z = parse_time_micros("2026-01-05T14:47:56.000Z").unwrap();
        assert_eq!(parse_time_micros("2026-01-05T15:47:56+01:00"), Ok(z));
        assert_eq!(parse_time_micros("2026-01-05T14:47:56"), Ok(z));
        assert_eq!(parse_time_micros("2026-01-05 14:47:56.000"), Ok(z));
        assert_eq!(
            parse_time_micros("2026-01-05T14:47:56.123456Z"),
            Ok(z + 123_456)
        );
    }

    proptest::proptest! {
        #[test]
        fn chunking_does_not_change_what_is_parsed(cuts in proptest::collection::vec(0usize..400, 0..6)) {
            let mut text = String::from("event_id,user_id,event_type,product_id,price,event_time\n");
            for i in 0..6 {
                text.push_str(&format!("{ID},{i},\"a,{i}\",2,3.00,2026-01-05T00:00:00Z\n"));
                if i == 3 { text.push_str("garbage line\n"); }
            }
            let bytes = text.as_bytes();
            let (whole, _) = parse_all(&text, true);
            // Feed the same text in pieces cut at arbitrary points, the way a
            // growing file is read: results and positions must not change.
            let mut parser = FileParser::default();
            let mut pieces = Vec::new();
            let mut start = 0;
            let mut line = 1;
            let mut cuts = cuts.clone();
            cuts.sort();
            for cut in cuts.into_iter().chain([bytes.len()]) {
                let cut = cut.min(bytes.len()).max(start);
                let is_final = cut == bytes.len();
                let (used, lines_here) = parser.parse(&bytes[start..cut], line, is_final, |p| {
                    pieces.push((p.result, start + p.end));
                });
                start += used;
                line += lines_here;
            }
            proptest::prop_assert_eq!(start, bytes.len());
            proptest::prop_assert_eq!(pieces.len(), whole.len());
            for (a, b) in whole.iter().zip(&pieces) {
                proptest::prop_assert_eq!(&a.result, &b.0);
                proptest::prop_assert_eq!(a.end, b.1);
            }
        }
    }
}
