//! `host top`: the status of a running host in the terminal (ratatui on
//! crossterm), read from its `/api/status` once a second.
//!
//! A fetch thread polls the host and hands each answer (or the reason
//! there is none) to the drawing loop, so a host that does not answer
//! never freezes the keys: the screen says it is unreachable, keeps the
//! last figures it had, and goes on trying.
//!
//! Keys: `q` (or Esc, Ctrl-C) quits; `s` changes the sort column, `r`
//! reverses it; `/` starts a stage filter (Enter keeps it, Esc clears it).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Row, Table, Wrap};
use ratatui::Frame;

use crate::http::client;
use crate::status::{Document, StageStatus};

/// How often the host is asked.
const POLL: Duration = Duration::from_secs(1);
/// How long one request may take before the host counts as unreachable.
const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error("terminal: {0}")]
    Terminal(#[from] std::io::Error),
}

/// The column the stage table is sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sort {
    Chain,
    Name,
    EventsIn,
    Rate,
    Failed,
    Latency,
}

impl Sort {
    fn next(self) -> Sort {
        match self {
            Sort::Chain => Sort::Name,
            Sort::Name => Sort::EventsIn,
            Sort::EventsIn => Sort::Rate,
            Sort::Rate => Sort::Failed,
            Sort::Failed => Sort::Latency,
            Sort::Latency => Sort::Chain,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Sort::Chain => "chain order",
            Sort::Name => "name",
            Sort::EventsIn => "events in",
            Sort::Rate => "in/s",
            Sort::Failed => "failed",
            Sort::Latency => "ms/batch",
        }
    }
}

/// What the screen shows.
struct App {
    addr: String,
    doc: Option<Document>,
    /// When the last good answer came.
    last_ok: Option<Instant>,
    /// Why the last request failed, if it did.
    error: Option<String>,
    sort: Sort,
    reverse: bool,
    filter: String,
    editing: bool,
}

impl App {
    fn new(addr: &str) -> App {
        App {
            addr: addr.to_owned(),
            doc: None,
            last_ok: None,
            error: None,
            sort: Sort::Chain,
            reverse: false,
            filter: String::new(),
            editing: false,
        }
    }

    fn answer(&mut self, answer: Result<Document, String>) {
        match answer {
            Ok(doc) => {
                self.doc = Some(doc);
                self.last_ok = Some(Instant::now());
                self.error = None;
            }
            Err(e) => self.error = Some(e),
        }
    }

    /// Handles a key; false when it is time to quit.
    fn key(&mut self, code: KeyCode, modifiers: KeyModifiers) -> bool {
        if modifiers.contains(KeyModifiers::CONTROL) && code == KeyCode::Char('c') {
            return false;
        }
        if self.editing {
            match code {
                KeyCode::Enter => self.editing = false,
                KeyCode::Esc => {
                    self.editing = false;
                    self.filter.clear();
                }
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) => self.filter.push(c),
                _ => {}
            }
            return true;
        }
        match code {
            KeyCode::Char('q') | KeyCode::Esc => return false,
            KeyCode::Char('s') => self.sort = self.sort.next(),
            KeyCode::Char('r') => self.reverse = !self.reverse,
            KeyCode::Char('/') => self.editing = true,
            _ => {}
        }
        true
    }

    /// The stages to show, filtered and sorted.
    fn stages(&self) -> Vec<&StageStatus> {
        let Some(doc) = &self.doc else {
            return Vec::new();
        };
        let needle = self.filter.to_lowercase();
        let mut stages: Vec<&StageStatus> = doc
            .stages
            .iter()
            .filter(|s| needle.is_empty() || s.name.to_lowercase().contains(&needle))
            .collect();
        match self.sort {
            Sort::Chain => {}
            Sort::Name => stages.sort_by(|a, b| a.name.cmp(&b.name)),
            Sort::EventsIn => stages.sort_by_key(|s| std::cmp::Reverse(s.events_in)),
            Sort::Rate => stages.sort_by(|a, b| b.rate_in.total_cmp(&a.rate_in)),
            Sort::Failed => stages.sort_by_key(|s| std::cmp::Reverse(s.failed)),
            Sort::Latency => stages.sort_by(|a, b| b.ms_per_batch.total_cmp(&a.ms_per_batch)),
        }
        if self.reverse {
            stages.reverse();
        }
        stages
    }
}

/// Runs until `q`.
pub fn run(addr: &str) -> Result<(), TopError> {
    let (tx, rx) = mpsc::channel();
    let target = addr.to_owned();
    std::thread::Builder::new()
        .name("top-fetch".into())
        .spawn(move || loop {
            let answer = client::get(&target, "/api/status", TIMEOUT)
                .map_err(|e| e.to_string())
                .and_then(|body| {
                    serde_json::from_str::<Document>(&body)
                        .map_err(|e| format!("{target}/api/status: not a status document: {e}"))
                });
            if tx.send(answer).is_err() {
                return;
            }
            std::thread::sleep(POLL);
        })?;

    let mut terminal = ratatui::try_init()?;
    let result = draw_loop(&mut terminal, App::new(addr), &rx);
    ratatui::restore();
    result
}

fn draw_loop(
    terminal: &mut ratatui::DefaultTerminal,
    mut app: App,
    answers: &mpsc::Receiver<Result<Document, String>>,
) -> Result<(), TopError> {
    loop {
        while let Ok(answer) = answers.try_recv() {
            app.answer(answer);
        }
        terminal.draw(|frame| draw(frame, &app))?;
        if event::poll(Duration::from_millis(200))? {
            if let Event::Key(key) = event::read()? {
                if key.kind == KeyEventKind::Press && !app.key(key.code, key.modifiers) {
                    return Ok(());
                }
            }
        }
    }
}

fn draw(frame: &mut Frame, app: &App) {
    let paused = app.doc.as_ref().is_some_and(|d| d.pause.paused);
    let [title, banner, summary, table, events, help] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(if paused || app.error.is_some() { 2 } else { 0 }),
        Constraint::Length(if app.doc.as_ref().is_some_and(|d| d.stream.is_some()) {
            6
        } else {
            5
        }),
        Constraint::Min(4),
        Constraint::Length(8),
        Constraint::Length(1),
    ])
    .areas(frame.area());

    let state = match (&app.error, app.last_ok) {
        (None, Some(_)) => Span::styled("connected", Style::new().fg(Color::Green)),
        (None, None) => Span::raw("connecting…"),
        (Some(_), _) => Span::styled(
            "UNREACHABLE",
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        ),
    };
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled("host top ", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(format!("{}  ", app.addr)),
            state,
        ])),
        title,
    );

    let mut banner_lines = Vec::new();
    if let Some(e) = &app.error {
        let last = app
            .last_ok
            .map(|t| format!("; figures below are {}s old", t.elapsed().as_secs()))
            .unwrap_or_default();
        banner_lines.push(Line::styled(
            format!("host unreachable: {e}; retrying every second{last}"),
            Style::new().fg(Color::Red),
        ));
    }
    if let Some(doc) = &app.doc {
        for p in &doc.pause.stages {
            banner_lines.push(Line::styled(
                format!("PAUSED by stage {}: {}", p.stage, p.reason),
                Style::new()
                    .fg(Color::Black)
                    .bg(Color::Yellow)
                    .add_modifier(Modifier::BOLD),
            ));
        }
    }
    frame.render_widget(
        Paragraph::new(banner_lines).wrap(Wrap { trim: true }),
        banner,
    );

    frame.render_widget(
        Paragraph::new(summary_lines(app.doc.as_ref()))
            .block(Block::bordered().title(" pipeline ")),
        summary,
    );

    let header = Row::new([
        "STAGE", "VERSION", "HASH", "IN", "OUT", "REJECTED", "FAILED", "IN/S", "MS/BATCH", "STATE",
        "SHADOW",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let rows: Vec<Row> = app
        .stages()
        .into_iter()
        .map(|s| {
            let shadow = s
                .shadow
                .as_ref()
                .map(|sh| {
                    format!(
                        "{}: {} changed, {} errors",
                        sh.version, sh.changed.0, sh.errors.0
                    )
                })
                .unwrap_or_else(|| "-".into());
            Row::new([
                s.name.clone(),
                s.version.clone(),
                s.hash.chars().take(12).collect(),
                s.events_in.0.to_string(),
                s.events_out.0.to_string(),
                s.rejected.0.to_string(),
                s.failed.0.to_string(),
                format!("{:.0}", s.rate_in),
                format!("{:.1}", s.ms_per_batch),
                s.state_bytes
                    .map(|b| format!("{} B", b.0))
                    .unwrap_or_else(|| "-".into()),
                shadow,
            ])
        })
        .collect();
    let filter = if app.editing {
        format!(" filter: {}▏ ", app.filter)
    } else if app.filter.is_empty() {
        String::new()
    } else {
        format!(" filter: {} ", app.filter)
    };
    let widths = [
        Constraint::Min(10),
        Constraint::Length(10),
        Constraint::Length(12),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(10),
        Constraint::Min(12),
    ];
    frame.render_widget(
        Table::new(rows, widths)
            .header(header)
            .block(Block::bordered().title(format!(
                " stages (sorted by {}{}){filter}",
                app.sort.label(),
                if app.reverse { ", reversed" } else { "" }
            ))),
        table,
    );

    let event_lines: Vec<Line> = app
        .doc
        .as_ref()
        .map(|d| {
            d.events
                .iter()
                .rev()
                .take(6)
                .map(|e| {
                    let time = e.at.get(11..19).unwrap_or(&e.at);
                    let mut text = format!("{time} {} {}", e.stage, e.kind);
                    if let Some(v) = &e.version {
                        text.push_str(&format!(" v{v}"));
                    }
                    if let Some(r) = &e.reason {
                        text.push_str(&format!(": {r}"));
                    }
                    let style = if e.kind.contains("rejected") {
                        Style::new().fg(Color::Red)
                    } else {
                        Style::new()
                    };
                    Line::styled(text, style)
                })
                .collect()
        })
        .unwrap_or_default();
    frame.render_widget(
        Paragraph::new(event_lines).block(Block::bordered().title(" last plugin events ")),
        events,
    );

    let keys = if app.editing {
        "type to filter stages · Enter keep · Esc clear"
    } else {
        "q quit · s sort · r reverse · / filter"
    };
    frame.render_widget(
        Paragraph::new(keys).style(Style::new().fg(Color::DarkGray)),
        help,
    );
}

/// The summary box: totals, rates, latency, lag, database.
fn summary_lines(doc: Option<&Document>) -> Vec<Line<'static>> {
    let Some(d) = doc else {
        return vec![Line::raw("waiting for the first answer…")];
    };
    let t = &d.totals;
    let ms = |v: Option<f64>| {
        v.map(|v| format!("{v:.0} ms"))
            .unwrap_or_else(|| "-".into())
    };
    let db = if d.database.healthy {
        Span::styled("healthy", Style::new().fg(Color::Green))
    } else {
        Span::styled(
            "DOWN (retrying)",
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        )
    };
    let mut db_line = vec![Span::raw("database "), db];
    db_line.push(Span::raw(format!(", {} errors", d.database.errors.0)));
    if let Some(e) = &d.database.last_error {
        db_line.push(Span::raw(format!(", last {}: {}", e.at, e.message)));
    }
    let mut lines = vec![
        Line::raw(format!(
            "rows read {}  written {}  malformed {}  rejected {}  failed {}  dropped {}  batches {}",
            t.rows_read.0,
            t.rows_written.0,
            t.malformed.0,
            t.rejected.0,
            t.failed.0,
            t.dropped.0,
            t.batches.0
        )),
        Line::raw(format!(
            "rate written {:.0}/s (10 s)  {:.0}/s (1 min)   latency p50 {}  p99 {}   lag {} files, {} bytes",
            d.rates.ten_seconds.rows_written,
            d.rates.one_minute.rows_written,
            ms(d.latency.p50_ms),
            ms(d.latency.p99_ms),
            d.lag.files,
            d.lag.bytes.0
        )),
        Line::from(db_line),
    ];
    if let Some(stream) = &d.stream {
        lines.push(Line::raw(stream_line(stream)));
    }
    lines
}

/// A shared stream in one line: the partitions this host holds with
/// their lag, and how many the other hosts hold.
fn stream_line(s: &crate::status::StreamDoc) -> String {
    let mine: Vec<&crate::status::PartitionDoc> = s
        .partitions
        .iter()
        .filter(|p| p.live && p.owner.as_deref() == Some(s.host.as_str()))
        .collect();
    let pending: u64 = mine.iter().map(|p| p.pending).sum();
    let redelivered: u64 = mine.iter().map(|p| p.redelivered).sum();
    let held: Vec<String> = mine
        .iter()
        .map(|p| format!("{}:{}", p.partition, p.pending))
        .collect();
    let others = s
        .partitions
        .iter()
        .filter(|p| p.live && p.owner.as_deref() != Some(s.host.as_str()))
        .count();
    let free = s.partitions.iter().filter(|p| !p.live).count();
    format!(
        "stream {} as {}: holds {}/{} partitions, pending {pending}, redelivered {redelivered} \
         (partition:pending {}); {others} held by other hosts, {free} free",
        s.stream,
        s.host,
        mine.len(),
        s.partitions.len(),
        if held.is_empty() {
            "-".into()
        } else {
            held.join(" ")
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_line_tells_what_this_host_holds_and_its_lag() {
        use crate::status::{PartitionDoc, StreamDoc};
        let part = |partition, owner: Option<&str>, live, pending| PartitionDoc {
            partition,
            owner: owner.map(str::to_owned),
            live,
            pending,
            ..Default::default()
        };
        let doc = StreamDoc {
            stream: "EVENTS".into(),
            host: "h1".into(),
            partitions: vec![
                part(0, Some("h1"), true, 12),
                part(1, Some("h2"), true, 0),
                part(2, Some("h1"), true, 3),
                part(3, Some("h1"), false, 0),
            ],
        };
        assert_eq!(
            stream_line(&doc),
            "stream EVENTS as h1: holds 2/4 partitions, pending 15, redelivered 0 \
             (partition:pending 0:12 2:3); 1 held by other hosts, 1 free"
        );
    }

    #[test]
    fn keys_sort_filter_and_quit() {
        let mut app = App::new("x");
        let none = KeyModifiers::NONE;
        assert!(app.key(KeyCode::Char('s'), none));
        assert_eq!(app.sort, Sort::Name);
        assert!(app.key(KeyCode::Char('/'), none));
        // While filtering, q is a letter of the filter.
        assert!(app.key(KeyCode::Char('q'), none));
        assert_eq!(app.filter, "q");
        assert!(app.key(KeyCode::Esc, none));
        assert!(app.filter.is_empty() && !app.editing);
        assert!(!app.key(KeyCode::Char('q'), none));
        assert!(!app.key(KeyCode::Char('c'), KeyModifiers::CONTROL));
    }
}
