//! The JSONL reader: one JSON object per line, each line read under the size cap.

use std::io::{self, BufRead};
use std::path::PathBuf;

use serde_json::Value;

use super::{Quarantined, SourceError, SourceEvent, SourceRecord, id_of, json_type};

/// JSONL: one JSON object per line. Blank lines are skipped silently.
pub struct JsonlReader<R> {
    reader: R,
    path: PathBuf,
    id_field: String,
    cap: usize,
    line: u64,
    buf: Vec<u8>,
    done: bool,
}

impl<R: BufRead> JsonlReader<R> {
    pub fn new(reader: R, path: PathBuf, id_field: String, cap: usize) -> Self {
        JsonlReader {
            reader,
            path,
            id_field,
            cap,
            line: 0,
            buf: Vec::with_capacity(4096),
            done: false,
        }
    }
}

/// Reads one line (without its newline) into `buf`, keeping at most `cap + 1` bytes of it so a
/// huge line cannot exhaust memory; returns the line's full length, or `None` at the end.
pub fn read_line_capped<R: BufRead>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    cap: usize,
) -> io::Result<Option<usize>> {
    buf.clear();
    let mut seen = 0usize;
    loop {
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(if seen == 0 { None } else { Some(seen) });
        }
        let (chunk, found_newline) = match memchr_newline(available) {
            Some(i) => (&available[..i], true),
            None => (available, false),
        };
        let room = (cap + 1).saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        seen += chunk.len();
        let used = chunk.len() + usize::from(found_newline);
        reader.consume(used);
        if found_newline {
            return Ok(Some(seen));
        }
    }
}

fn memchr_newline(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

impl<R: BufRead> Iterator for JsonlReader<R> {
    type Item = Result<SourceEvent, SourceError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.done {
                return None;
            }
            let seen = match read_line_capped(&mut self.reader, &mut self.buf, self.cap) {
                Ok(Some(n)) => n,
                Ok(None) => {
                    self.done = true;
                    return None;
                }
                Err(source) => {
                    self.done = true;
                    return Some(Err(SourceError::Read {
                        path: self.path.clone(),
                        line: self.line + 1,
                        source,
                    }));
                }
            };
            self.line += 1;
            let line = self.line;
            let q = |field: Option<String>, reason: String| {
                Some(Ok(SourceEvent::Quarantined(Quarantined {
                    line,
                    field,
                    reason,
                })))
            };
            let mut bytes: &[u8] = &self.buf;
            if bytes.last() == Some(&b'\r') {
                bytes = &bytes[..bytes.len() - 1];
            }
            if seen > self.cap {
                return q(
                    None,
                    format!(
                        "line is {seen} bytes, over the {} byte cap (source.max_record_bytes)",
                        self.cap
                    ),
                );
            }
            if line == 1 && bytes.starts_with(&[0xEF, 0xBB, 0xBF]) {
                bytes = &bytes[3..];
            }
            if bytes.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let text = match std::str::from_utf8(bytes) {
                Ok(t) => t,
                Err(e) => {
                    return q(
                        None,
                        format!("invalid UTF-8 at byte {}", e.valid_up_to() + 1),
                    );
                }
            };
            let value: Value = match serde_json::from_str(text) {
                Ok(v) => v,
                Err(e) => {
                    return q(
                        None,
                        format!("malformed JSON at column {}: {}", e.column(), strip_pos(&e)),
                    );
                }
            };
            if !value.is_object() {
                return q(
                    None,
                    format!("expected a JSON object, found {}", json_type(&value)),
                );
            }
            return match id_of(&value, &self.id_field) {
                Ok(id) => Some(Ok(SourceEvent::Record(SourceRecord { line, id, value }))),
                Err((field, reason)) => q(field, reason),
            };
        }
    }
}

fn strip_pos(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.find(" at line ") {
        Some(p) => s[..p].to_string(),
        None => s,
    }
}
