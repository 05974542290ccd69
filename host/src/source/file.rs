//! One input file being read: its identity, how far it has been read
//! (ahead of what is committed), and its parser state.

use std::io::{BufRead, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::batch::{Malformed, Origin, Position};
use crate::parse::FileParser;

use super::{Outlet, SourceConfig};

/// A file's identity: device, inode and birth time. A file renamed keeps
/// it; a new file under an old name (even on a reused inode) gets a new one.
pub fn file_key(meta: &std::fs::Metadata) -> String {
    let born = meta
        .created()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}:{}:{}", meta.dev(), meta.ino(), born)
}

pub(super) struct Tracked {
    key: String,
    path: Arc<str>,
    /// Bytes and lines read so far (handed to the batcher, maybe not yet
    /// committed).
    offset: u64,
    line: u64,
    parser: FileParser,
    /// The last error reported, so a persistent one is logged once.
    last_error: Option<String>,
}

impl Tracked {
    pub(super) fn open(key: String, path: &Path, committed: Option<Position>) -> Tracked {
        let path: Arc<str> = Arc::from(path.to_string_lossy().as_ref());
        let (offset, line, parser) = match committed {
            Some(p) if p.offset > 0 => {
                tracing::info!(file = %path, offset = p.offset, line = p.line, "resuming file from its committed position");
                (
                    p.offset,
                    p.line,
                    FileParser::resume(first_line(&path).as_deref()),
                )
            }
            _ => (0, 0, FileParser::default()),
        };
        Tracked {
            key,
            path,
            offset,
            line,
            parser,
            last_error: None,
        }
    }

    /// Follows a rename: positions and quarantine name the current path.
    pub(super) fn path_seen(&mut self, path: &Path) {
        if *self.path != *path.to_string_lossy() {
            self.path = Arc::from(path.to_string_lossy().as_ref());
        }
    }

    pub(super) fn report_error(&mut self, e: std::io::Error) {
        let message = e.to_string();
        if self.last_error.as_deref() != Some(message.as_str()) {
            tracing::error!(file = %self.path, "cannot read input file: {message}; will retry");
            self.last_error = Some(message);
        }
    }

    /// Reads every complete record added since the last call. Returns
    /// whether anything was consumed. `buf` is scratch space shared by all
    /// files (nothing in it outlives the call: an incomplete last record
    /// is read again from `offset` next time), so memory does not grow
    /// with the number of files in the folder.
    pub(super) fn read_new(
        &mut self,
        buf: &mut Vec<u8>,
        meta: &std::fs::Metadata,
        config: &SourceConfig,
        outlet: &mut Outlet,
        shutdown: &AtomicBool,
    ) -> std::io::Result<bool> {
        let len = meta.len();
        if len < self.offset {
            tracing::warn!(file = %self.path, size = len, offset = self.offset,
                "file shrank below the read position: it was truncated or rewritten; reading it again from the start");
            self.offset = 0;
            self.line = 0;
            self.parser = FileParser::default();
        }
        if len == self.offset {
            return Ok(false);
        }
        let quiet_for = meta
            .modified()
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .unwrap_or(Duration::ZERO);
        let settled = config.once || quiet_for >= config.settle;

        let mut file = std::fs::File::open(&*self.path)?;
        file.seek(SeekFrom::Start(self.offset))?;
        let mut remaining = len - self.offset;
        let mut want = config.chunk;
        let mut progressed = false;
        buf.clear();
        while remaining > 0 && !shutdown.load(Ordering::Relaxed) && !outlet.closed {
            let start = buf.len();
            let take = (want.saturating_sub(start) as u64).min(remaining) as usize;
            buf.resize(start + take, 0);
            let got = read_full(&mut file, &mut buf[start..])?;
            buf.truncate(start + got);
            remaining = remaining.saturating_sub(got as u64);
            let at_end = got == 0 || remaining == 0;
            let is_final = at_end && settled;
            let upto = if is_final {
                buf.len()
            } else {
                match buf.iter().rposition(|&b| b == b'\n') {
                    Some(i) => i + 1,
                    None => 0,
                }
            };
            let (used, lines) = if upto == 0 {
                (0, 0)
            } else {
                self.parse(&buf[..upto], is_final, outlet)
            };
            if used > 0 {
                progressed = true;
                self.offset += used as u64;
                self.line += lines;
                buf.drain(..used);
            } else if at_end {
                break;
            } else if buf.len() >= want {
                // One record is longer than the chunk: read more of it.
                want *= 2;
            }
            if got == 0 {
                break;
            }
        }
        // A record longer than the chunk grew the buffer; give that back.
        if buf.capacity() > 4 * config.chunk {
            *buf = Vec::new();
        }
        self.last_error = None;
        Ok(progressed)
    }

    fn parse(&mut self, chunk: &[u8], is_final: bool, outlet: &mut Outlet) -> (usize, u64) {
        let base_offset = self.offset;
        let base_line = self.line;
        let path = &self.path;
        let key = &self.key;
        self.parser.parse(chunk, base_line + 1, is_final, |parsed| {
            let position = Position {
                key: key.clone(),
                path: path.clone(),
                offset: base_offset + parsed.end as u64,
                line: base_line + parsed.lines,
            };
            let record = match parsed.result {
                Ok(event) => {
                    let origin = Origin {
                        file: path.clone(),
                        line: position.line,
                    };
                    Ok((event, origin))
                }
                Err(row) => Err(Malformed {
                    file: path.clone(),
                    row,
                }),
            };
            let full = outlet.batcher.push(record, position);
            outlet.send(full);
        })
    }
}

fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The first line of a file, to learn its header when resuming.
fn first_line(path: &str) -> Option<Vec<u8>> {
    let file = std::fs::File::open(path).ok()?;
    let mut line = Vec::new();
    std::io::BufReader::new(file)
        .take(1 << 20)
        .read_until(b'\n', &mut line)
        .ok()?;
    Some(line)
}
