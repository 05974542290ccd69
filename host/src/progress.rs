//! Progress of a long run you wait for (`host run --once`, `host
//! generate --files N`, `host bench`): a bar on a terminal (indicatif),
//! and a plain line every [`LINE_EVERY`] when stderr is a file or a pipe,
//! so logs of a CI job or a service show it too without a line per batch.
//!
//! [`Backfill`] works out what `host run --once` has left: the bytes of
//! the input files not yet committed when it started, and how many of
//! those files are done, from the positions each batch commits.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a plain progress line is printed.
pub const LINE_EVERY: Duration = Duration::from_secs(10);

/// What the bar counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Bytes,
    Files,
    Events,
}

enum Display {
    Bar(ProgressBar),
    Lines { last: Instant },
}

/// A progress display: a bar or plain lines on stderr.
pub struct Progress {
    what: String,
    unit: Unit,
    total: u64,
    done: u64,
    message: String,
    started: Instant,
    display: Display,
}

impl Progress {
    /// A bar when stderr is a terminal, lines every 10 s otherwise.
    pub fn new(what: &str, total: u64, unit: Unit) -> Progress {
        let terminal = std::io::stderr().is_terminal();
        Progress::with(what, total, unit, terminal)
    }

    fn with(what: &str, total: u64, unit: Unit, terminal: bool) -> Progress {
        let display = if terminal {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let counter = match unit {
                Unit::Bytes => "{bytes}/{total_bytes}",
                Unit::Files => "{pos}/{len} files",
                Unit::Events => "{human_pos}/{human_len} events",
            };
            let template =
                format!("{{prefix}} [{{bar:30}}] {counter} {{msg}} {{elapsed}}, eta {{eta}}");
            if let Ok(style) = ProgressStyle::with_template(&template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(what.to_owned());
            bar.enable_steady_tick(Duration::from_millis(250));
            Display::Bar(bar)
        } else {
            Display::Lines {
                last: Instant::now(),
            }
        };
        Progress {
            what: what.to_owned(),
            unit,
            total,
            done: 0,
            message: String::new(),
            started: Instant::now(),
            display,
        }
    }

    /// How far it got, and a short note (rows, rate).
    pub fn set(&mut self, done: u64, message: String) {
        self.done = done.min(self.total);
        match &mut self.display {
            Display::Bar(bar) => {
                bar.set_position(self.done);
                bar.set_message(message.clone());
            }
            Display::Lines { last } => {
                if last.elapsed() >= LINE_EVERY {
                    *last = Instant::now();
                    self.message = message;
                    eprintln!("{}", self.line());
                    return;
                }
            }
        }
        self.message = message;
    }

    /// The plain line: `run: 12.0 MB of 40.0 MB (30%), files 3/10, ... eta 20s`.
    pub fn line(&self) -> String {
        let amount = |n: u64| match self.unit {
            Unit::Bytes => format!("{:.1} MB", n as f64 / 1e6),
            Unit::Files => format!("{n} files"),
            Unit::Events => format!("{n} events"),
        };
        let percent = if self.total == 0 {
            100.0
        } else {
            self.done as f64 * 100.0 / self.total as f64
        };
        let eta = eta(self.started.elapsed(), self.done, self.total)
            .map(|d| format!("eta {}s", d.as_secs()))
            .unwrap_or_else(|| "eta unknown".into());
        let mut line = format!(
            "progress: {}: {} of {} ({percent:.0}%)",
            self.what,
            amount(self.done),
            amount(self.total)
        );
        if !self.message.is_empty() {
            line.push_str(", ");
            line.push_str(&self.message);
        }
        line.push_str(", ");
        line.push_str(&eta);
        line
    }

    /// Clears the bar; the caller prints its own summary.
    pub fn finish(self) {
        if let Display::Bar(bar) = self.display {
            bar.finish_and_clear();
        }
    }
}

/// Time left at the rate so far.
fn eta(elapsed: Duration, done: u64, total: u64) -> Option<Duration> {
    if done == 0 || elapsed.is_zero() {
        return None;
    }
    let rate = done as f64 / elapsed.as_secs_f64();
    Some(Duration::from_secs_f64(
        total.saturating_sub(done) as f64 / rate,
    ))
}

/// What a backfill has left: each input file present at the start, its
/// size then and its committed offset.
pub struct Backfill {
    files: HashMap<String, (u64, u64)>,
    start_done: u64,
}

impl Backfill {
    /// Lists the input folder; `committed` are offsets by file key.
    pub fn new(input: &Path, committed: &HashMap<String, u64>) -> Backfill {
        let mut files = HashMap::new();
        if let Ok(entries) = std::fs::read_dir(input) {
            for entry in entries.flatten() {
                if !crate::source::is_input_name(&entry.file_name().to_string_lossy()) {
                    continue;
                }
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_file() {
                    let key = crate::source::file_key(&meta);
                    let done = committed.get(&key).copied().unwrap_or(0);
                    files.insert(key, (meta.len(), done.min(meta.len())));
                }
            }
        }
        let start_done = files.values().map(|(_, done)| done).sum();
        Backfill { files, start_done }
    }

    /// Bytes that were left at the start.
    pub fn total_bytes(&self) -> u64 {
        self.files.values().map(|(size, _)| size).sum::<u64>() - self.start_done
    }

    pub fn total_files(&self) -> usize {
        self.files.len()
    }

    /// A committed position.
    pub fn committed(&mut self, key: &str, offset: u64) {
        if let Some((size, done)) = self.files.get_mut(key) {
            *done = offset.min(*size);
        }
    }

    /// Bytes committed since the start.
    pub fn done_bytes(&self) -> u64 {
        self.files.values().map(|(_, done)| done).sum::<u64>() - self.start_done
    }

    pub fn done_files(&self) -> usize {
        self.files
            .values()
            .filter(|(size, done)| done >= size)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_line_says_how_far_and_how_long() {
        let mut p = Progress::with("run", 1000, Unit::Files, false);
        p.set(250, "rows 10".into());
        let line = p.line();
        assert!(
            line.starts_with("progress: run: 250 files of 1000 files (25%), rows 10, eta "),
            "{line}"
        );
    }

    #[test]
    fn eta_follows_the_rate_so_far() {
        assert_eq!(eta(Duration::from_secs(10), 0, 100), None);
        assert_eq!(
            eta(Duration::from_secs(10), 25, 100),
            Some(Duration::from_secs(30))
        );
    }

    #[test]
    fn a_backfill_counts_bytes_and_files_from_committed_positions() {
        let dir = std::env::temp_dir().join(format!("backfill-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.csv"), vec![b'x'; 100]).unwrap();
        std::fs::write(dir.join("b.csv"), vec![b'x'; 50]).unwrap();
        std::fs::write(dir.join(".c.csv.tmp"), vec![b'x'; 70]).unwrap();
        let key = |name: &str| crate::source::file_key(&std::fs::metadata(dir.join(name)).unwrap());
        let committed = HashMap::from([(key("a.csv"), 40)]);
        let mut b = Backfill::new(&dir, &committed);
        assert_eq!((b.total_bytes(), b.total_files()), (110, 2));
        b.committed(&key("a.csv"), 100);
        assert_eq!((b.done_bytes(), b.done_files()), (60, 1));
        b.committed(&key("b.csv"), 50);
        assert_eq!((b.done_bytes(), b.done_files()), (110, 2));
        let _ = std::fs::remove_dir_all(dir);
    }
}
