//! The results file: one line per source record of the run, in source order, as JSON lines
//! or CSV by the path's extension, written atomically.

use std::path::Path;

use super::{RunError, Runner};
use crate::provider::BatchProvider;
use crate::store::{ItemState, Store};
use crate::util::fs::AtomicFile;

impl<S: Store, P: BatchProvider> Runner<'_, S, P> {
    /// Writes one result line per source record of this run, in source order (JSON lines,
    /// or CSV when the path ends in `.csv`), atomically.
    pub(super) async fn write_output(&self) -> Result<(), RunError> {
        use std::io::Write;
        let ctx = self.ctx;
        let path = &ctx.output_path;
        let err = |source| RunError::Output {
            path: path.clone(),
            source,
        };
        let format = OutputFormat::for_path(path).map_err(RunError::Config)?;
        let mut file = AtomicFile::create(path).map_err(err)?;
        {
            // CSV rows go through the csv writer; JSON lines are assembled per page.
            let (mut csv, mut raw) = match format {
                OutputFormat::Csv => {
                    let mut w = csv::Writer::from_writer(&mut file);
                    w.write_record(["id", "line", "status", "attempts", "output", "error"])
                        .map_err(|e| err(std::io::Error::other(e)))?;
                    (Some(w), None)
                }
                OutputFormat::Jsonl => (None, Some(&mut file)),
            };
            let mut json = Vec::with_capacity(1 << 16);
            let mut after = 0i64;
            loop {
                let rows = ctx.store.run_records(&self.run_id, after, 10_000).await?;
                if rows.is_empty() {
                    break;
                }
                json.clear();
                for r in &rows {
                    after = r.line;
                    let succeeded = r.state == ItemState::Succeeded;
                    let status = match r.state {
                        ItemState::Succeeded => "succeeded",
                        ItemState::Exhausted => "failed",
                        _ => "pending",
                    };
                    let error = if succeeded {
                        None
                    } else {
                        r.last_error.as_deref()
                    };
                    match &mut csv {
                        Some(w) => {
                            let output = if succeeded {
                                r.result.as_deref().unwrap_or("")
                            } else {
                                ""
                            };
                            w.write_record([
                                crate::plan::guard(&r.record_id).as_str(),
                                &r.line.to_string(),
                                status,
                                &r.attempts.to_string(),
                                &crate::plan::guard(output),
                                &crate::plan::guard(error.unwrap_or("")),
                            ])
                            .map_err(|e| err(std::io::Error::other(e)))?;
                        }
                        None => {
                            let line = OutputLine {
                                id: &r.record_id,
                                line: r.line,
                                status,
                                attempts: r.attempts,
                                output: if succeeded {
                                    r.result.as_deref().and_then(|t| {
                                        serde_json::value::RawValue::from_string(t.to_string()).ok()
                                    })
                                } else {
                                    None
                                },
                                error,
                            };
                            serde_json::to_writer(&mut json, &line).map_err(|e| err(e.into()))?;
                            json.push(b'\n');
                        }
                    }
                }
                if let Some(w) = &mut csv {
                    w.flush().map_err(err)?;
                }
                if let Some(f) = &mut raw {
                    f.write_all(&json).map_err(err)?;
                }
                crate::failpoint!("output.mid_write");
            }
        }
        file.commit().map_err(err)
    }
}

/// How the results file is written, by its extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// One JSON object per line (`.jsonl`, `.ndjson`, `.json`).
    Jsonl,
    /// A header row, then one row per record; the answer as compact JSON text (`.csv`).
    Csv,
}

impl OutputFormat {
    /// The format a results path asks for; any other extension is refused (a results file
    /// named `.txt` or `.parquet` would otherwise silently get JSON lines).
    pub fn for_path(path: &Path) -> Result<Self, String> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("jsonl") | Some("ndjson") | Some("json") => Ok(OutputFormat::Jsonl),
            Some("csv") => Ok(OutputFormat::Csv),
            _ => Err(format!(
                "{} must end in .jsonl (JSON lines) or .csv",
                path.display()
            )),
        }
    }
}

/// One line of the results file: a source record and what became of it.
#[derive(serde::Serialize)]
struct OutputLine<'a> {
    id: &'a str,
    line: i64,
    status: &'static str,
    attempts: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<Box<serde_json::value::RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}
