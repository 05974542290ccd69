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
/// `replace(i)` where that gives one.
pub fn kept_text<'a>(
    data: &'a str,
    ends: &'a [u32],
    keep: &[bool],
    replace: impl Fn(usize) -> Option<&'a str>,
) -> Text {
    let mut out = Text::with_capacity(keep.len(), data.len());
    for (i, (value, &keep)) in values(data, ends).zip(keep).enumerate() {
        if keep {
            out.push(replace(i).unwrap_or(value));
        }
    }
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
