//! Source records: streaming readers for JSONL and CSV.
//!
//! A reader never loads the whole file: it yields one [`SourceEvent`] per line (JSONL) or row
//! (CSV). A line that cannot become a record — malformed JSON, invalid UTF-8, a missing or
//! empty id, a line over the size cap, a CSV row with the wrong number of fields — becomes a
//! [`Quarantined`] event carrying its line number, the field at fault when there is one, and
//! the reason; the reader goes on. Only an I/O error on the file itself stops it.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::config::{Pipeline, SourceKind};

/// One usable record.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceRecord {
    /// 1-based line number in the source file (for CSV: the line the row starts on).
    pub line: u64,
    pub id: String,
    pub value: Value,
}

/// A line that was skipped, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quarantined {
    pub line: u64,
    pub field: Option<String>,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum SourceEvent {
    Record(SourceRecord),
    Quarantined(Quarantined),
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot open source {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot read source {path} at line {line}: {source}")]
    Read {
        path: PathBuf,
        line: u64,
        source: io::Error,
    },
    #[error("{path}: {message}")]
    Header { path: PathBuf, message: String },
}

/// A streaming reader over a pipeline's source.
pub enum SourceReader {
    Jsonl(JsonlReader<BufReader<File>>),
    Csv(CsvReader),
}

impl SourceReader {
    pub fn open(p: &Pipeline) -> Result<Self, SourceError> {
        let path = &p.source.path;
        let file = File::open(path).map_err(|source| SourceError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(match p.source.kind {
            SourceKind::Jsonl => SourceReader::Jsonl(JsonlReader::new(
                BufReader::with_capacity(256 * 1024, file),
                path.clone(),
                p.source.id_field.clone(),
                p.source.max_record_bytes,
            )),
            SourceKind::Csv => SourceReader::Csv(CsvReader::new(
                file,
                path.clone(),
                p.source.id_field.clone(),
                p.source.max_record_bytes,
                p.source.delimiter,
            )?),
        })
    }
}

impl Iterator for SourceReader {
    type Item = Result<SourceEvent, SourceError>;
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            SourceReader::Jsonl(r) => r.next(),
            SourceReader::Csv(r) => r.next(),
        }
    }
}

fn id_of(value: &Value, id_field: &str) -> Result<String, (Option<String>, String)> {
    match value.get(id_field) {
        None => Err((
            Some(id_field.to_string()),
            format!("the id field `{id_field}` is missing"),
        )),
        Some(Value::String(s)) if s.trim().is_empty() => Err((
            Some(id_field.to_string()),
            format!("the id field `{id_field}` is empty"),
        )),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(other) => Err((
            Some(id_field.to_string()),
            format!(
                "the id field `{id_field}` must be a string or a number, found {}",
                json_type(other)
            ),
        )),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

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

/// CSV with a header row; every column becomes a string field of the record.
pub struct CsvReader {
    reader: csv::Reader<CapReader<File>>,
    path: PathBuf,
    headers: Vec<String>,
    id_field: String,
    cap: usize,
    record: csv::ByteRecord,
    done: bool,
}

/// Wraps the CSV input so a single huge row cannot grow the csv buffer without bound: it
/// counts bytes since the last newline and fails the read past a hard ceiling.
pub struct CapReader<R> {
    inner: R,
    since_newline: usize,
    ceiling: usize,
}

impl<R: Read> Read for CapReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        for &b in &buf[..n] {
            if b == b'\n' {
                self.since_newline = 0;
            } else {
                self.since_newline += 1;
            }
        }
        if self.since_newline > self.ceiling {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a CSV line runs past {} bytes without a newline",
                    self.ceiling
                ),
            ));
        }
        Ok(n)
    }
}

impl CsvReader {
    fn new(
        file: File,
        path: PathBuf,
        id_field: String,
        cap: usize,
        delimiter: u8,
    ) -> Result<Self, SourceError> {
        let capped = CapReader {
            inner: file,
            since_newline: 0,
            // A quoted field may hold newlines, so the hard ceiling is generous; the per-row
            // cap below is what quarantines big rows.
            ceiling: cap.saturating_mul(16).max(1 << 20),
        };
        let mut reader = csv::ReaderBuilder::new()
            .delimiter(delimiter)
            .flexible(false)
            .from_reader(capped);
        let headers = reader
            .byte_headers()
            .map_err(|e| SourceError::Header {
                path: path.clone(),
                message: format!("cannot read the CSV header: {e}"),
            })?
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let s = String::from_utf8_lossy(h).trim().to_string();
                if i == 0 {
                    s.trim_start_matches('\u{feff}').to_string()
                } else {
                    s
                }
            })
            .collect::<Vec<_>>();
        if headers.iter().all(String::is_empty) {
            let what = if headers.is_empty() {
                "the file is empty"
            } else {
                "the header row (the first line) is blank"
            };
            return Err(SourceError::Header {
                path,
                message: format!(
                    "{what}: a CSV source starts with a header row naming its columns, the id column `{id_field}` (source.id_field) among them"
                ),
            });
        }
        if !headers.iter().any(|h| h == &id_field) {
            return Err(SourceError::Header {
                path,
                message: format!(
                    "the CSV header has no `{id_field}` column (source.id_field); columns: {}",
                    headers.join(", ")
                ),
            });
        }
        Ok(CsvReader {
            reader,
            path,
            headers,
            id_field,
            cap,
            record: csv::ByteRecord::new(),
            done: false,
        })
    }

    pub fn headers(&self) -> &[String] {
        &self.headers
    }
}

impl Iterator for CsvReader {
    type Item = Result<SourceEvent, SourceError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let res = self.reader.read_byte_record(&mut self.record);
        let line = self.record.position().map(|p| p.line()).unwrap_or_default();
        let q = |line: u64, field: Option<String>, reason: String| {
            Some(Ok(SourceEvent::Quarantined(Quarantined {
                line,
                field,
                reason,
            })))
        };
        match res {
            Ok(false) => {
                self.done = true;
                None
            }
            Ok(true) => {
                let bytes: usize = self.record.as_slice().len();
                if bytes > self.cap {
                    return q(
                        line,
                        None,
                        format!(
                            "row is {bytes} bytes, over the {} byte cap (source.max_record_bytes)",
                            self.cap
                        ),
                    );
                }
                let mut map = Map::with_capacity(self.headers.len());
                for (h, raw) in self.headers.iter().zip(self.record.iter()) {
                    match std::str::from_utf8(raw) {
                        Ok(s) => {
                            map.insert(h.clone(), Value::String(s.to_string()));
                        }
                        Err(e) => {
                            return q(
                                line,
                                Some(h.clone()),
                                format!(
                                    "invalid UTF-8 in column `{h}` at byte {}",
                                    e.valid_up_to() + 1
                                ),
                            );
                        }
                    }
                }
                let value = Value::Object(map);
                match id_of(&value, &self.id_field) {
                    Ok(id) => Some(Ok(SourceEvent::Record(SourceRecord { line, id, value }))),
                    Err((field, reason)) => q(line, field, reason),
                }
            }
            Err(e) => {
                let line = e.position().map(|p| p.line()).unwrap_or(line);
                match e.kind() {
                    csv::ErrorKind::UnequalLengths {
                        expected_len, len, ..
                    } => q(
                        line,
                        None,
                        format!("row has {len} fields, the header has {expected_len}"),
                    ),
                    csv::ErrorKind::Utf8 { .. } => q(line, None, "invalid UTF-8".into()),
                    _ => {
                        self.done = true;
                        Some(Err(SourceError::Read {
                            path: self.path.clone(),
                            line,
                            source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
                        }))
                    }
                }
            }
        }
    }
}

/// Checks a CSV source's header against the id field and the prompt's required fields.
pub fn check_csv_header(p: &Pipeline) -> Result<(), String> {
    let file = File::open(&p.source.path).map_err(|e| e.to_string())?;
    let reader = CsvReader::new(
        file,
        p.source.path.clone(),
        p.source.id_field.clone(),
        p.source.max_record_bytes,
        p.source.delimiter,
    )
    .map_err(|e| e.to_string())?;
    let missing: Vec<&str> = p
        .prompt
        .user
        .fields()
        .filter(|(f, optional)| !optional && !reader.headers().iter().any(|h| h == f))
        .map(|(f, _)| f)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}: the prompt uses column(s) {} that the CSV header lacks",
            display(&p.source.path),
            missing.join(", ")
        ))
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn jsonl(text: &[u8], cap: usize) -> Vec<SourceEvent> {
        JsonlReader::new(
            Cursor::new(text.to_vec()),
            "t.jsonl".into(),
            "id".into(),
            cap,
        )
        .map(|e| e.unwrap())
        .collect()
    }

    #[test]
    fn jsonl_quarantines_bad_lines_and_goes_on() {
        let mut text = Vec::new();
        text.extend_from_slice(b"{\"id\": \"a\", \"x\": 1}\n");
        text.extend_from_slice(b"{\"id\": \"b\", \"x\": \n");
        text.extend_from_slice(b"\n");
        text.extend_from_slice(b"{\"x\": 2}\n");
        text.extend_from_slice(b"{\"id\": \"c\", \"x\": \"\xff\"}\n");
        text.extend_from_slice(b"[1,2]\n");
        text.extend_from_slice(b"{\"id\": 7}\r\n");
        text.extend_from_slice(b"{\"id\": \"long\", \"pad\": \"");
        text.extend_from_slice(&[b'x'; 300]);
        text.extend_from_slice(b"\"}\n");
        text.extend_from_slice(b"{\"id\": \"last\"}");
        let ev = jsonl(&text, 200);
        let lines: Vec<(u64, bool)> = ev
            .iter()
            .map(|e| match e {
                SourceEvent::Record(r) => (r.line, true),
                SourceEvent::Quarantined(q) => (q.line, false),
            })
            .collect();
        assert_eq!(
            lines,
            vec![
                (1, true),
                (2, false),
                (4, false),
                (5, false),
                (6, false),
                (7, true),
                (8, false),
                (9, true)
            ]
        );
        let SourceEvent::Quarantined(missing) = &ev[2] else {
            panic!()
        };
        assert_eq!(missing.field.as_deref(), Some("id"));
        let SourceEvent::Quarantined(utf) = &ev[3] else {
            panic!()
        };
        assert!(utf.reason.contains("UTF-8"), "{}", utf.reason);
        let SourceEvent::Record(num) = &ev[5] else {
            panic!()
        };
        assert_eq!(num.id, "7");
        let SourceEvent::Quarantined(big) = &ev[6] else {
            panic!()
        };
        assert!(big.reason.contains("cap"), "{}", big.reason);
    }

    #[test]
    fn csv_rows_become_string_records_and_bad_rows_are_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        let mut body =
            b"ticket_id,subject,body\n1,Login,\"can't log in,\nhelp\"\n2,short\n,No id,x\n"
                .to_vec();
        body.extend_from_slice(b"4,Bad \xff,x\n5,Fine,ok\n");
        std::fs::write(&path, body).unwrap();
        let r = CsvReader::new(
            File::open(&path).unwrap(),
            path.clone(),
            "ticket_id".into(),
            1 << 20,
            b',',
        )
        .unwrap();
        let ev: Vec<_> = r.map(|e| e.unwrap()).collect();
        assert_eq!(ev.len(), 5);
        let SourceEvent::Record(first) = &ev[0] else {
            panic!("{:?}", ev[0])
        };
        assert_eq!(first.line, 2);
        assert_eq!(first.value["body"], "can't log in,\nhelp");
        let SourceEvent::Quarantined(short) = &ev[1] else {
            panic!()
        };
        assert_eq!(short.line, 4);
        assert!(short.reason.contains("fields"));
        let SourceEvent::Quarantined(noid) = &ev[2] else {
            panic!()
        };
        assert_eq!(noid.field.as_deref(), Some("ticket_id"));
        let SourceEvent::Quarantined(bad) = &ev[3] else {
            panic!()
        };
        assert_eq!(bad.field.as_deref(), Some("subject"));
        assert!(matches!(&ev[4], SourceEvent::Record(r) if r.id == "5"));
    }

    #[test]
    fn csv_without_the_id_column_is_refused_up_front() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        std::fs::write(&path, "a,b\n1,2\n").unwrap();
        let err = CsvReader::new(File::open(&path).unwrap(), path, "id".into(), 1024, b',')
            .err()
            .unwrap();
        assert!(err.to_string().contains("no `id` column"), "{err}");
    }

    #[test]
    fn an_empty_csv_says_it_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        for (body, says) in [
            ("", "the file is empty"),
            ("\n\n", "the file is empty"),
            (" \n1\n", "the header row (the first line) is blank"),
        ] {
            std::fs::write(&path, body).unwrap();
            let err = CsvReader::new(
                File::open(&path).unwrap(),
                path.clone(),
                "id".into(),
                1024,
                b',',
            )
            .err()
            .unwrap()
            .to_string();
            assert!(err.contains(says), "{body:?}: {err}");
            assert!(err.contains("header row"), "{err}");
            assert!(!err.contains("columns: "), "{err}");
        }
    }
}
