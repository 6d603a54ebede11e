//! Source records: streaming readers for JSONL and CSV.
//!
//! A reader never loads the whole file: it yields one [`SourceEvent`] per line (JSONL) or row
//! (CSV). A line that cannot become a record — malformed JSON, invalid UTF-8, a missing or
//! empty id, a line over the size cap, a CSV row with the wrong number of fields — becomes a
//! [`Quarantined`] event carrying its line number, the field at fault when there is one, and
//! the reason; the reader goes on. Only an I/O error on the file itself stops it.
//!
//! `config.rs` holds the `[source]` settings a reader is opened with; `jsonl.rs` and `csv.rs`
//! the two readers.

pub mod config;
mod csv;
mod jsonl;

use std::fs::File;
use std::io::{self, BufReader};
use std::path::PathBuf;

use serde_json::Value;

pub use self::config::{SourceConfig, SourceKind};
pub use self::csv::{CapReader, CsvReader};
pub use self::jsonl::{JsonlReader, read_line_capped};

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
    pub fn open(source: &SourceConfig) -> Result<Self, SourceError> {
        let path = &source.path;
        let file = File::open(path).map_err(|source| SourceError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(match source.kind {
            SourceKind::Jsonl => SourceReader::Jsonl(JsonlReader::new(
                BufReader::with_capacity(256 * 1024, file),
                path.clone(),
                source.id_field.clone(),
                source.max_record_bytes,
            )),
            SourceKind::Csv => SourceReader::Csv(CsvReader::new(
                file,
                path.clone(),
                source.id_field.clone(),
                source.max_record_bytes,
                source.delimiter,
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

pub(crate) fn id_of(value: &Value, id_field: &str) -> Result<String, (Option<String>, String)> {
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

pub(crate) fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
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
