//! Guest-side helpers for batches in columns (the WIT's `columns`
//! interface, 0.1.1): reading a text column and keeping some entries of a
//! batch. Each stage's binding moves the buffers in and out of its own
//! generated `event-columns`; nothing here depends on the bindings.

/// The values of a text column: value `i` is `data[ends[i-1]..ends[i]]`.
/// The host checks the columns it sends; a bad end reads as "".
pub fn values<'a>(data: &'a str, ends: &'a [u32]) -> impl Iterator<Item = &'a str> + 'a {
    let starts = std::iter::once(0).chain(ends.iter().copied());
    starts
        .zip(ends.iter().copied())
        .map(move |(start, end)| data.get(start as usize..end as usize).unwrap_or_default())
}

/// A text column being built.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Text {
    pub data: String,
    pub ends: Vec<u32>,
}

impl Text {
    pub fn with_capacity(values: usize, bytes: usize) -> Text {
        Text {
            data: String::with_capacity(bytes),
            ends: Vec::with_capacity(values),
        }
    }

    pub fn push(&mut self, value: &str) {
        self.data.push_str(value);
        self.ends.push(self.data.len() as u32);
    }
}

/// The entries of `column` whose `keep` is true.
pub fn kept<T: Copy>(column: &[T], keep: &[bool]) -> Vec<T> {
    column
        .iter()
        .zip(keep)
        .filter_map(|(value, &keep)| keep.then_some(*value))
        .collect()
}

/// The values of a text column whose `keep` is true, each replaced by
/// `replace(i)` where that gives one. Runs of values kept as they are
/// are copied in one piece: a batch that drops one event in a hundred
/// costs a copy per run, not per value.
pub fn kept_text<'a>(
    data: &'a str,
    ends: &'a [u32],
    keep: &[bool],
    replace: impl Fn(usize) -> Option<&'a str>,
) -> Text {
    let mut out = Text::with_capacity(keep.len(), data.len());
    // The run being kept: where it starts in `data`, and its length.
    let mut run: Option<(usize, usize)> = None;
    let flush = |out: &mut Text, run: &mut Option<(usize, usize)>| {
        if let Some((from, len)) = run.take() {
            out.data
                .push_str(data.get(from..from + len).unwrap_or_default());
        }
    };
    let mut start = 0usize;
    for (i, (&end, &kept)) in ends.iter().zip(keep).enumerate() {
        let end = end as usize;
        let len = end.saturating_sub(start);
        match (kept, kept.then(|| replace(i)).flatten()) {
            (true, None) => {
                let (_, pending) = run.get_or_insert((start, 0));
                *pending += len;
                // Where the value will end once the run is copied.
                let pending = *pending;
                out.ends.push((out.data.len() + pending) as u32);
            }
            (true, Some(new)) => {
                flush(&mut out, &mut run);
                out.push(new);
            }
            (false, _) => flush(&mut out, &mut run),
        }
        start = end;
    }
    flush(&mut out, &mut run);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_column_reads_back_what_was_pushed() {
        let mut text = Text::default();
        for v in ["a", "", "ünï", "bc"] {
            text.push(v);
        }
        assert_eq!(text.ends, vec![1, 1, 6, 8]);
        let read: Vec<&str> = values(&text.data, &text.ends).collect();
        assert_eq!(read, vec!["a", "", "ünï", "bc"]);
        assert_eq!(values("abc", &[5]).collect::<Vec<_>>(), vec![""]);
    }

    /// `kept_text` one value at a time, as it is defined.
    fn kept_text_slowly<'a>(
        data: &'a str,
        ends: &'a [u32],
        keep: &[bool],
        replace: impl Fn(usize) -> Option<&'a str>,
    ) -> Text {
        let mut out = Text::default();
        for (i, (value, &keep)) in values(data, ends).zip(keep).enumerate() {
            if keep {
                out.push(replace(i).unwrap_or(value));
            }
        }
        out
    }

    #[test]
    fn keeping_runs_gives_what_keeping_each_value_gives() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let words = [
            "",
            "a",
            "view",
            "ünï",
            "add_to_cart",
            "550e8400-e29b-41d4-a716-446655440000",
        ];
        for _ in 0..2_000 {
            let n = next(40) as usize;
            let mut text = Text::default();
            for _ in 0..n {
                text.push(words[next(words.len() as u64) as usize]);
            }
            let keep: Vec<bool> = (0..n).map(|_| next(5) != 0).collect();
            let renamed: Vec<Option<&str>> = (0..n)
                .map(|_| (next(7) == 0).then_some("renamed"))
                .collect();
            let replace = |i: usize| renamed[i];
            assert_eq!(
                kept_text(&text.data, &text.ends, &keep, replace),
                kept_text_slowly(&text.data, &text.ends, &keep, replace),
                "{text:?} {keep:?} {renamed:?}"
            );
        }
    }

    #[test]
    fn keeping_selects_and_replaces() {
        let keep = [true, false, true];
        assert_eq!(kept(&[1, 2, 3], &keep), vec![1, 3]);
        let text = kept_text("abc", &[1, 2, 3], &keep, |i| (i == 2).then_some("zz"));
        assert_eq!(
            values(&text.data, &text.ends).collect::<Vec<_>>(),
            vec!["a", "zz"]
        );
    }
}
