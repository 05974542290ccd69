//! PostgreSQL binary COPY encoding of a batch of events, built in one
//! buffer per batch (no per-row allocation, one send).
//!
//! Layout per the PostgreSQL docs ("COPY ... Binary Format"): a signature
//! and two zero words, then per row a field count and per field a length
//! and the value in network byte order, then a -1 trailer.

use bytes::{BufMut, Bytes, BytesMut};

use crate::stage::Event;

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
/// Microseconds from the Unix epoch to PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// Encodes rows for the staging table
/// `(event_id text, user_id int4, event_type text, product_id int4,
///   price_cents int8, event_time timestamp)`.
pub fn encode_staging(events: &[Event]) -> Bytes {
    let mut buf = BytesMut::with_capacity(19 + events.len() * 110 + 2);
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
        buf.put_i32(8);
        buf.put_i64(e.price_cents);
        buf.put_i32(8);
        buf.put_i64(e.event_time - PG_EPOCH_OFFSET_US);
    }
    buf.put_i16(-1);
    buf.freeze()
}

fn put_text(buf: &mut BytesMut, text: &str) {
    buf.put_i32(text.len() as i32);
    buf.put_slice(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

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
