//! The CSV reader: a header row, then one record per row with every column a string field.

use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;

use serde_json::{Map, Value};

use super::{Quarantined, SourceError, SourceEvent, SourceRecord, id_of};

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
    pub(super) fn new(
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
