//! PostgreSQL binary COPY encoding of a batch of events, built in one
//! buffer per batch (no per-row allocation, one send).
//!
//! Two shapes: `encode_events` matches `ecommerce_events` itself (price
//! as NUMERIC), for the fast path that copies straight into the table;
//! `encode_staging` matches the staging table (price as integer cents),
//! for the path that has to go through `ON CONFLICT`.
//!
//! Layout per the PostgreSQL docs ("COPY ... Binary Format"): a signature
//! and two zero words, then per row a field count and per field a length
//! and the value in network byte order, then a -1 trailer.

use bytes::{BufMut, Bytes, BytesMut};

use crate::stage::Event;

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
/// Bytes before the first row (signature, flags, extension length) and
/// after the last (the -1 trailer): to send one COPY stream in pieces.
pub const HEADER_LEN: usize = 19;
pub const TRAILER_LEN: usize = 2;
/// Microseconds from the Unix epoch to PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// Encodes rows for the staging table
/// `(event_id text, user_id int4, event_type text, product_id int4,
///   price_cents int8, event_time timestamp)`.
pub fn encode_staging(events: &[Event]) -> Bytes {
    encode(events, |buf, cents| {
        buf.put_i32(8);
        buf.put_i64(cents);
    })
}

/// Encodes rows for `ecommerce_events` itself
/// `(event_id, user_id, event_type, product_id, price NUMERIC, event_time)`.
pub fn encode_events(events: &[Event]) -> Bytes {
    encode(events, put_numeric_cents)
}

/// The rows of a COPY stream; the tables differ only in the price column.
fn encode(events: &[Event], put_price: impl Fn(&mut BytesMut, i64)) -> Bytes {
    let mut buf = BytesMut::with_capacity(HEADER_LEN + events.len() * 120 + TRAILER_LEN);
    buf.put_slice(SIGNATURE);
    buf.put_i32(0);
    buf.put_i32(0);
    for e in events {
        buf.put_i16(6);
        put_text(&mut buf, &e.event_id);
        buf.put_i32(4);
        buf.put_i32(e.user_id);
        put_text(&mut buf, &e.event_type);
        buf.put_i32(4);
        buf.put_i32(e.product_id);
        put_price(&mut buf, e.price_cents);
        buf.put_i32(8);
        buf.put_i64(e.event_time - PG_EPOCH_OFFSET_US);
    }
    buf.put_i16(-1);
    buf.freeze()
}

/// A NUMERIC with two decimal places from integer cents, in PostgreSQL's
/// binary layout: digit count, weight, sign, display scale, then base-10000
/// digits, most significant first (the weight is the power of 10000 of the
/// first digit). Leading and trailing zero digits are left out, as
/// PostgreSQL itself sends them.
fn put_numeric_cents(buf: &mut BytesMut, cents: i64) {
    const POSITIVE: i16 = 0x0000;
    const NEGATIVE: i16 = 0x4000;
    let sign = if cents < 0 { NEGATIVE } else { POSITIVE };
    let abs = cents.unsigned_abs();
    let (mut whole, fraction) = (abs / 100, (abs % 100) as i16 * 100);
    // Base-10000 digits of the whole part, least significant first
    // (an i64 has at most 5 of them).
    let mut groups = [0i16; 5];
    let mut count = 0;
    while whole > 0 {
        groups[count] = (whole % 10_000) as i16;
        whole /= 10_000;
        count += 1;
    }
    let mut digits = [0i16; 6];
    let mut n = 0;
    for g in groups[..count].iter().rev() {
        digits[n] = *g;
        n += 1;
    }
    let weight = count as i16 - 1;
    if fraction != 0 {
        digits[n] = fraction;
        n += 1;
    }
    // Leading zeros cannot occur (the top group is non-zero); drop
    // trailing zero groups of the whole part when there is no fraction.
    while n > 0 && digits[n - 1] == 0 {
        n -= 1;
    }
    let weight = if count == 0 { -1 } else { weight };
    buf.put_i32(8 + 2 * n as i32);
    buf.put_i16(n as i16);
    buf.put_i16(if n == 0 { 0 } else { weight });
    buf.put_i16(if n == 0 { POSITIVE } else { sign });
    buf.put_i16(2);
    for d in &digits[..n] {
        buf.put_i16(*d);
    }
}

fn put_text(buf: &mut BytesMut, text: &str) {
    buf.put_i32(text.len() as i32);
    buf.put_slice(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (ndigits, weight, sign, dscale, digits) of an encoded NUMERIC.
    fn numeric(cents: i64) -> (i16, i16, i16, i16, Vec<i16>) {
        let mut buf = BytesMut::new();
        put_numeric_cents(&mut buf, cents);
        let word = |i: usize| i16::from_be_bytes([buf[4 + 2 * i], buf[5 + 2 * i]]);
        let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let n = word(0);
        assert_eq!(len, 8 + 2 * n as i32);
        (
            n,
            word(1),
            word(2),
            word(3),
            (0..n as usize).map(|i| word(4 + i)).collect(),
        )
    }

    #[test]
    fn numeric_cents_in_postgres_layout() {
        assert_eq!(numeric(0), (0, 0, 0, 2, vec![]));
        assert_eq!(numeric(5), (1, -1, 0, 2, vec![500]));
        assert_eq!(numeric(1999), (2, 0, 0, 2, vec![19, 9900]));
        assert_eq!(numeric(100), (1, 0, 0, 2, vec![1]));
        assert_eq!(numeric(1_000_000), (1, 1, 0, 2, vec![1]));
        assert_eq!(numeric(123_456_789), (3, 1, 0, 2, vec![123, 4567, 8900]));
        assert_eq!(numeric(-250), (2, 0, 0x4000, 2, vec![2, 5000]));
        assert_eq!(numeric(9_999_999_999), (3, 1, 0, 2, vec![9999, 9999, 9900]));
    }

    #[test]
    fn encodes_header_rows_and_trailer() {
        let e = Event {
            event_id: "ab".into(),
            user_id: 7,
            event_type: "view".into(),
            product_id: 9,
            price_cents: 1999,
            event_time: PG_EPOCH_OFFSET_US + 5,
        };
        let bytes = encode_staging(&[e]);
        assert_eq!(&bytes[..11], SIGNATURE);
        let row = &bytes[19..];
        assert_eq!(&row[..2], &6i16.to_be_bytes());
        assert_eq!(&row[2..6], &2i32.to_be_bytes());
        assert_eq!(&row[6..8], b"ab");
        assert_eq!(
            &bytes[bytes.len() - 10..bytes.len() - 2],
            &5i64.to_be_bytes()
        );
        assert_eq!(&bytes[bytes.len() - 2..], &(-1i16).to_be_bytes());
    }
}
