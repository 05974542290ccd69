//! Batches in columns: the `columns` interface of the WIT (0.1.1), the
//! fast path for stages that export it.
//!
//! Why: lowering a `list<event>` calls into the guest's allocator once per
//! string (two per event, ~650 instructions each, mostly the entry into
//! the guest), and lifting the result copies each field into its own host
//! value. In columns a batch is seven buffers: one allocator call and one
//! copy each, whatever the batch's size.
//!
//! The host keeps its events as rows ([`Event`]); a batch is put in
//! columns just before the call and the result is taken back to rows
//! right after it, checked as a hostile guest's output must be: columns
//! of one length, ends that rise, stay inside their data and fall on
//! character boundaries. A result that breaks any of these fails the
//! batch as invalid output, like any other output check.

use wasmtime::component::{ComponentType, Lift, Lower};

use super::bindings::{BatchResult, Event, Rejected};
use super::budget::{self, Budgeted, BudgetedList, LiftedRejected};

/// `text-column`, as the host lowers it.
#[derive(ComponentType, Lower, Default)]
#[component(record)]
pub struct TextColumn {
    data: String,
    ends: Vec<u32>,
}

impl TextColumn {
    fn with_capacity(values: usize, bytes: usize) -> TextColumn {
        TextColumn {
            data: String::with_capacity(bytes),
            ends: Vec::with_capacity(values),
        }
    }

    fn push(&mut self, value: &str) {
        self.data.push_str(value);
        // A batch's text is far below 4 GiB (a batch is bounded in
        // events, and every field in bytes); saturating keeps the
        // conversion total all the same.
        self.ends
            .push(u32::try_from(self.data.len()).unwrap_or(u32::MAX));
    }
}

/// `event-columns`, as the host lowers it.
#[derive(ComponentType, Lower, Default)]
#[component(record)]
pub struct EventColumns {
    #[component(name = "event-id")]
    event_id: TextColumn,
    #[component(name = "user-id")]
    user_id: Vec<i32>,
    #[component(name = "event-type")]
    event_type: TextColumn,
    #[component(name = "product-id")]
    product_id: Vec<i32>,
    #[component(name = "price-cents")]
    price_cents: Vec<i64>,
    #[component(name = "event-time")]
    event_time: Vec<i64>,
}

impl EventColumns {
    /// The batch in columns: one copy of each field into its column.
    pub fn from_rows(batch: &[Event]) -> EventColumns {
        let n = batch.len();
        let (ids, types) = batch.iter().fold((0, 0), |(i, t), e| {
            (i + e.event_id.len(), t + e.event_type.len())
        });
        let mut columns = EventColumns {
            event_id: TextColumn::with_capacity(n, ids),
            user_id: Vec::with_capacity(n),
            event_type: TextColumn::with_capacity(n, types),
            product_id: Vec::with_capacity(n),
            price_cents: Vec::with_capacity(n),
            event_time: Vec::with_capacity(n),
        };
        for e in batch {
            columns.event_id.push(&e.event_id);
            columns.user_id.push(e.user_id);
            columns.event_type.push(&e.event_type);
            columns.product_id.push(e.product_id);
            columns.price_cents.push(e.price_cents);
            columns.event_time.push(e.event_time);
        }
        columns
    }
}

/// `text-column`, lifted under the call's output budget.
#[derive(ComponentType, Lift)]
#[component(record)]
pub struct LiftedText {
    data: Budgeted,
    ends: BudgetedList<u32>,
}

impl LiftedText {
    /// Checks that every end lies inside `data`, on a character boundary,
    /// at or after the one before it.
    fn check(&self, column: &str) -> Result<(), String> {
        let data = self.data.0.as_str();
        let mut start = 0usize;
        for (i, &end) in self.ends.0.iter().enumerate() {
            let end = end as usize;
            if data.get(start..end).is_none() {
                return Err(bad_end(column, i, start, end, data.len()));
            }
            start = end;
        }
        Ok(())
    }

    /// The values; after a good [`LiftedText::check`] each is exact.
    fn values(&self) -> impl Iterator<Item = &str> {
        let data = self.data.0.as_str();
        let starts = std::iter::once(0).chain(self.ends.0.iter().copied());
        starts
            .zip(self.ends.0.iter().copied())
            .map(move |(start, end)| data.get(start as usize..end as usize).unwrap_or_default())
    }
}

fn bad_end(column: &str, i: usize, start: usize, end: usize, len: usize) -> String {
    let why = if end < start {
        format!("is before the end of value {} ({start})", i.wrapping_sub(1))
    } else if end > len {
        format!("is past the end of its {len} bytes of data")
    } else {
        "is not on a UTF-8 character boundary".to_owned()
    };
    format!("{column}: the end of value {i} ({end}) {why}")
}

/// `event-columns`, lifted under the call's output budget.
#[derive(ComponentType, Lift)]
#[component(record)]
pub struct LiftedColumns {
    #[component(name = "event-id")]
    event_id: LiftedText,
    #[component(name = "user-id")]
    user_id: BudgetedList<i32>,
    #[component(name = "event-type")]
    event_type: LiftedText,
    #[component(name = "product-id")]
    product_id: BudgetedList<i32>,
    #[component(name = "price-cents")]
    price_cents: BudgetedList<i64>,
    #[component(name = "event-time")]
    event_time: BudgetedList<i64>,
}

impl LiftedColumns {
    /// Back to rows, or why the columns do not make a batch. The rows are
    /// charged to the call's budget before they are made: without that,
    /// a million empty strings (4 bytes each in `ends`) would become a
    /// million host events. Their text is a second copy of text already
    /// charged, so the host holds at most twice its charge.
    fn into_rows(self) -> wasmtime::Result<Result<Vec<Event>, String>> {
        match self.checked() {
            Ok(n) => budget::charge(n.saturating_mul(std::mem::size_of::<Event>()))?,
            Err(bad) => return Ok(Err(bad)),
        }
        // Checked: every column has `n` entries and every end is valid.
        let rows = self
            .event_id
            .values()
            .zip(self.event_type.values())
            .enumerate()
            .map(|(i, (id, kind))| Event {
                event_id: id.to_owned(),
                user_id: self.user_id.0[i],
                event_type: kind.to_owned(),
                product_id: self.product_id.0[i],
                price_cents: self.price_cents.0[i],
                event_time: self.event_time.0[i],
            })
            .collect();
        Ok(Ok(rows))
    }

    /// The number of events, if the columns make a batch.
    fn checked(&self) -> Result<usize, String> {
        self.event_id.check("event-id")?;
        self.event_type.check("event-type")?;
        let n = self.event_id.ends.0.len();
        let lengths = [
            ("event-id", n),
            ("user-id", self.user_id.0.len()),
            ("event-type", self.event_type.ends.0.len()),
            ("product-id", self.product_id.0.len()),
            ("price-cents", self.price_cents.0.len()),
            ("event-time", self.event_time.0.len()),
        ];
        if lengths.iter().any(|&(_, len)| len != n) {
            let listed: Vec<String> = lengths
                .iter()
                .map(|(name, len)| format!("{name} {len}"))
                .collect();
            return Err(format!(
                "its columns have different lengths ({})",
                listed.join(", ")
            ));
        }
        Ok(n)
    }
}

/// `columns-result` of the WIT.
#[derive(ComponentType, Lift)]
#[component(record)]
pub struct LiftedColumnsResult {
    events: LiftedColumns,
    rejected: BudgetedList<LiftedRejected>,
}

impl LiftedColumnsResult {
    /// The result as the row call would have returned it, or why the
    /// columns are not a batch (the stage's output is then invalid). Made
    /// while the call's budget is charged: an `Err` is [`budget::OverBudget`].
    pub fn into_batch_result(self) -> wasmtime::Result<Result<BatchResult, String>> {
        Ok(self.events.into_rows()?.map(|events| BatchResult {
            events,
            rejected: self.rejected.0.into_iter().map(Rejected::from).collect(),
        }))
    }
}

/// What `process-columns` returns, as lifted under a budget.
pub type ColumnsResult = Result<LiftedColumnsResult, Budgeted>;

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, kind: &str, n: i32) -> Event {
        Event {
            event_id: id.into(),
            user_id: n,
            event_type: kind.into(),
            product_id: n + 1,
            price_cents: i64::from(n) * 100,
            event_time: i64::from(n) * 1_000,
        }
    }

    fn text(data: &str, ends: &[u32]) -> LiftedText {
        LiftedText {
            data: Budgeted(data.into()),
            ends: BudgetedList(ends.to_vec()),
        }
    }

    /// What a guest that echoes its batch would hand back.
    fn echoed(c: EventColumns) -> LiftedColumns {
        LiftedColumns {
            event_id: text(&c.event_id.data, &c.event_id.ends),
            user_id: BudgetedList(c.user_id),
            event_type: text(&c.event_type.data, &c.event_type.ends),
            product_id: BudgetedList(c.product_id),
            price_cents: BudgetedList(c.price_cents),
            event_time: BudgetedList(c.event_time),
        }
    }

    #[test]
    fn rows_survive_the_way_into_columns_and_back() {
        let batch = vec![
            event("a", "view", 1),
            event("", "", 2),
            event("ünïcödé-id", "add_to_cart", 3),
        ];
        let columns = EventColumns::from_rows(&batch);
        assert_eq!(
            columns.event_id.ends,
            vec![1, 1, 1 + "ünïcödé-id".len() as u32]
        );
        assert_eq!(echoed(columns).into_rows().unwrap().unwrap(), batch);
        assert!(echoed(EventColumns::from_rows(&[]))
            .into_rows()
            .unwrap()
            .unwrap()
            .is_empty());
    }

    #[test]
    fn columns_that_do_not_make_a_batch_are_refused_with_the_reason() {
        let mut c = echoed(EventColumns::from_rows(&[event("a", "view", 1)]));
        c.price_cents.0.push(5);
        let err = c.into_rows().unwrap().unwrap_err();
        assert!(
            err.contains("different lengths") && err.contains("price-cents 2"),
            "{err}"
        );

        let refused = |ends: &[u32], data: &str| text(data, ends).check("event-id").unwrap_err();
        assert!(refused(&[3, 2], "abc").contains("before the end of value 0"));
        assert!(refused(&[4], "abc").contains("past the end of its 3 bytes"));
        assert!(refused(&[1], "é").contains("not on a UTF-8 character boundary"));
        let good = text("abc", &[1, 1, 3]);
        assert!(good.check("x").is_ok());
        assert_eq!(good.values().collect::<Vec<_>>(), vec!["a", "", "bc"]);
    }
}
