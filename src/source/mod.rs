//! Source records: streaming readers for JSONL and CSV.
//!
//! A reader never loads the whole file: it yields one [`SourceEvent`] per line (JSONL) or row
//! (CSV). A line that cannot become a record — malformed JSON, invalid UTF-8, a missing or
//! empty id, a line over the size cap, a CSV row with the wrong number of fields — becomes a
//! [`Quarantined`] event carrying its line number, the field at fault when there is one, and
//! the reason; the reader goes on. Only an I/O error on the file itself stops it.
//!
//! [`check_template_fields`] is the environment check behind `nightshift validate`: the
//! prompt template's required fields against a CSV header or the first JSONL records.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::config::{FieldMiss, MissKind, Pipeline, SourceKind};

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

/// How many usable records [`check_template_fields`] reads from a JSONL source.
pub const TEMPLATE_SAMPLE_RECORDS: usize = 200;
/// How many lines it reads at most looking for them.
const TEMPLATE_SAMPLE_LINES: usize = 10_000;

/// Checks the prompt template's required fields against the source: a CSV source's header,
/// or the first [`TEMPLATE_SAMPLE_RECORDS`] usable records of a JSONL source. A field none of
/// them has would quarantine every record, so each is reported (for `prompt.user`), naming the
/// fields the records do have and a close match. `Err` is a problem with the source itself
/// (for `source.path`): unreadable, an empty CSV, a header without the id column, or no
/// usable record among the lines read.
pub fn check_template_fields(p: &Pipeline) -> Result<Vec<String>, String> {
    let template = &p.prompt.user;
    match SourceReader::open(p).map_err(|e| e.to_string())? {
        SourceReader::Csv(reader) => {
            // Every row gets every column (or is quarantined), so the header is the sample.
            let row = Value::Object(
                reader
                    .headers()
                    .iter()
                    .map(|h| (h.clone(), Value::String(String::new())))
                    .collect(),
            );
            let misses = template.check_sample(std::slice::from_ref(&row));
            Ok(misses
                .iter()
                .map(|m| miss_message(m, &Sample::CsvHeader))
                .collect())
        }
        reader @ SourceReader::Jsonl(_) => {
            let mut sample = Vec::new();
            let mut first_bad: Option<Quarantined> = None;
            let mut lines = 0usize;
            for event in reader {
                match event.map_err(|e| e.to_string())? {
                    SourceEvent::Record(r) => sample.push(r.value),
                    SourceEvent::Quarantined(q) => {
                        first_bad.get_or_insert(q);
                    }
                }
                lines += 1;
                if sample.len() >= TEMPLATE_SAMPLE_RECORDS || lines >= TEMPLATE_SAMPLE_LINES {
                    break;
                }
            }
            if sample.is_empty() {
                return match first_bad {
                    Some(q) => Err(format!(
                        "{}: none of {} is a usable record, so every one would be quarantined (line {}: {})",
                        display(&p.source.path),
                        first_n(lines, "line"),
                        q.line,
                        q.reason
                    )),
                    // An empty source is a run with nothing to do, not a mistake.
                    None => Ok(Vec::new()),
                };
            }
            let described = Sample::Records(sample.len(), &p.source.path);
            Ok(template
                .check_sample(&sample)
                .iter()
                .map(|m| miss_message(m, &described))
                .collect())
        }
    }
}

/// At most this many field names are listed in a message.
const LIST_FIELDS: usize = 30;

/// What a template check looked at: a CSV header, or this many JSONL records.
enum Sample<'a> {
    CsvHeader,
    Records(usize, &'a Path),
}

fn miss_message(m: &FieldMiss, sample: &Sample<'_>) -> String {
    let field = &m.field;
    let (unit, nowhere, have) = match sample {
        Sample::CsvHeader => (
            "row",
            "is not in the CSV header".to_string(),
            "The header has",
        ),
        Sample::Records(n, path) => (
            "record",
            format!(
                "is in none of {} of {}",
                first_n(*n, "record"),
                display(path)
            ),
            "The records have",
        ),
    };
    match &m.kind {
        MissKind::AlwaysNull => format!(
            "field `{field}` is null wherever it appears in the first records of the source, so every {unit} would be quarantined. Write `{{{{{field}?}}}}` if it may be empty."
        ),
        MissKind::NotAnObject(parent) => format!(
            "field `{field}` {nowhere}: `{parent}` is never an object with fields, so every {unit} would be quarantined."
        ),
        MissKind::Missing { parent } => {
            let mut msg =
                format!("field `{field}` {nowhere}, so every {unit} would be quarantined");
            match &m.suggestion {
                Some(s) => msg.push_str(&format!("; did you mean `{s}`?")),
                None => msg.push('.'),
            }
            let place = if parent.is_empty() {
                String::new()
            } else {
                format!(" in `{parent}`")
            };
            let mut list = m
                .known
                .iter()
                .take(LIST_FIELDS)
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            if m.known.len() > LIST_FIELDS {
                list.push_str(&format!(" and {} more", m.known.len() - LIST_FIELDS));
            }
            msg.push_str(&format!(
                " {have}{place}: {list}. Write `{{{{{field}?}}}}` if it may be absent."
            ));
            msg
        }
    }
}

/// "the first record", "the first 200 records".
fn first_n(n: usize, unit: &str) -> String {
    if n == 1 {
        format!("the first {unit}")
    } else {
        format!("the first {n} {unit}s")
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

    fn csv_pipeline(dir: &Path, header: &str, user: &str) -> Pipeline {
        std::fs::write(dir.join("in.csv"), format!("{header}\n1,a,b\n")).unwrap();
        let text = format!(
            "name = \"t\"\n[source]\nkind = \"csv\"\npath = \"in.csv\"\nid_field = \"id\"\n\
             [provider]\nmodel = \"gpt-5.4-mini\"\nsimulate = true\n\
             [prompt]\nuser = \"{user}\"\nmax_output_tokens = 10\n\
             [output]\nschema = \"s.json\"\npath = \"out.jsonl\"\n"
        );
        Pipeline::from_str(&text, &dir.join("t.toml")).unwrap()
    }

    #[test]
    fn csv_template_fields_are_checked_against_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let p = csv_pipeline(dir.path(), "id,subject,body", "{{subjcet}} {{body}} {{x?}}");
        let misses = check_template_fields(&p).unwrap();
        assert_eq!(misses.len(), 1, "{misses:?}");
        for needle in [
            "`subjcet` is not in the CSV header",
            "did you mean `subject`?",
            "The header has: body, id, subject.",
        ] {
            assert!(misses[0].contains(needle), "{needle}: {}", misses[0]);
        }
        // Columns are text: a dotted path cannot reach into one.
        let p = csv_pipeline(dir.path(), "id,subject,body", "{{subject.title}}");
        let misses = check_template_fields(&p).unwrap();
        assert!(misses[0].contains("never an object"), "{misses:?}");
        let p = csv_pipeline(dir.path(), "id,subject,body", "{{subject}}");
        assert_eq!(check_template_fields(&p).unwrap(), Vec::<String>::new());
        // The header's own problems come back as errors (for `source.path`).
        let p = csv_pipeline(dir.path(), "key,subject,body", "{{subject}}");
        let err = check_template_fields(&p).unwrap_err();
        assert!(err.contains("no `id` column"), "{err}");
    }

    #[test]
    fn jsonl_template_fields_are_checked_against_the_first_records_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = csv_pipeline(dir.path(), "id,a,b", "{{late}}");
        p.source.kind = SourceKind::Jsonl;
        p.source.path = dir.path().join("in.jsonl");
        // `late` first appears after the sample: the check cannot see it.
        let mut body = String::new();
        for i in 0..TEMPLATE_SAMPLE_RECORDS {
            body.push_str(&format!("{{\"id\": {i}, \"early\": 1}}\n"));
        }
        body.push_str("{\"id\": \"x\", \"late\": 1}\n");
        std::fs::write(&p.source.path, body).unwrap();
        let misses = check_template_fields(&p).unwrap();
        assert_eq!(misses.len(), 1);
        assert!(
            misses[0].contains("first 200 records") && misses[0].contains("early, id"),
            "{}",
            misses[0]
        );
    }
}
