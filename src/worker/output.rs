//! The results file: one line per source record of the run, in source order, as JSON lines
//! or CSV by the path's extension, written atomically.

use std::path::Path;

use super::{RunError, Runner};
use crate::provider::BatchProvider;
use crate::store::{ItemState, LinkRow, Store};
use crate::util::fs::AtomicFile;

impl<S: Store, P: BatchProvider> Runner<'_, S, P> {
    /// Writes one result line per source record of this run, in source order (JSON lines,
    /// or CSV when the path ends in `.csv`), atomically.
    pub(super) async fn write_output(&self) -> Result<(), RunError> {
        if self.ctx.pipeline.is_multi_stage() {
            return self.write_staged_output().await;
        }
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

impl<S: Store, P: BatchProvider> Runner<'_, S, P> {
    /// The results file of a multi-stage pipeline: one line per source record with each
    /// stage's result under the stage's name (a chunk stage's as an array in chunk order),
    /// the record's status, its review verdict and what its items cost. Cost and attempts
    /// count every attempt of the items, in whichever run, so a record whose items did not
    /// change gets the same line night after night.
    async fn write_staged_output(&self) -> Result<(), RunError> {
        use std::io::Write;
        let ctx = self.ctx;
        let p = ctx.pipeline;
        let path = &ctx.output_path;
        let err = |source| RunError::Output {
            path: path.clone(),
            source,
        };
        let format = OutputFormat::for_path(path).map_err(RunError::Config)?;
        let mut file = AtomicFile::create(path).map_err(err)?;
        {
            let (mut csv, mut raw) = match format {
                OutputFormat::Csv => {
                    let mut w = csv::Writer::from_writer(&mut file);
                    // A stage's column is `stage.<name>`: no stage name can take a fixed one.
                    let mut head: Vec<String> =
                        ["id", "line", "status", "review", "cost_usd", "attempts"]
                            .map(String::from)
                            .to_vec();
                    head.extend(p.stages.iter().map(|s| format!("stage.{}", s.name)));
                    head.push("error".into());
                    w.write_record(&head)
                        .map_err(|e| err(std::io::Error::other(e)))?;
                    (Some(w), None)
                }
                OutputFormat::Jsonl => (None, Some(&mut file)),
            };
            let mut json = Vec::with_capacity(1 << 16);
            let mut after = 0i64;
            loop {
                let rows = ctx.store.run_records(&self.run_id, after, 2_000).await?;
                let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
                    break;
                };
                let links = ctx
                    .store
                    .links_between(&self.run_id, first.line, last.line)
                    .await?;
                json.clear();
                for r in &rows {
                    after = r.line;
                    let mine: Vec<&LinkRow> = LinkRow::of_line(&links, r.line).iter().collect();
                    let chain = RecordChain::of(p, &mine);
                    match &mut csv {
                        Some(w) => {
                            let mut row = vec![
                                crate::plan::guard(&r.record_id),
                                r.line.to_string(),
                                chain.status.to_string(),
                                chain.review.unwrap_or("").to_string(),
                                chain.cost.to_string(),
                                chain.attempts.to_string(),
                            ];
                            for s in &p.stages {
                                let v = chain.results.get(&s.name).filter(|v| !v.is_null());
                                row.push(crate::plan::guard(
                                    &v.map(|v| v.to_string()).unwrap_or_default(),
                                ));
                            }
                            row.push(crate::plan::guard(chain.error.as_deref().unwrap_or("")));
                            w.write_record(&row)
                                .map_err(|e| err(std::io::Error::other(e)))?;
                        }
                        None => {
                            let line = StagedLine {
                                id: &r.record_id,
                                line: r.line,
                                status: chain.status,
                                review: chain.review,
                                flagged: chain.review == Some("fail"),
                                cost_usd: chain.cost.to_string(),
                                attempts: chain.attempts,
                                stages: &chain.results,
                                error: chain.error.as_deref(),
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

/// What became of one record across the stages.
pub(crate) struct RecordChain {
    /// `succeeded`, `failed` or `pending`.
    pub(crate) status: &'static str,
    /// Each stage's result (a chunk stage's as an array; null: none, or not run).
    pub(crate) results: serde_json::Map<String, serde_json::Value>,
    /// `pass` or `fail` when a reviewing stage (`on_fail`) ran for the record.
    pub(crate) review: Option<&'static str>,
    /// What the attempts of the record's items cost, in any run (a shared item counts in
    /// full), as `attempts` counts them.
    pub(crate) cost: crate::cost::Usd,
    pub(crate) attempts: i64,
    /// Why the record failed: the stage, and its item's last error or why it has none.
    pub(crate) error: Option<String>,
}

impl RecordChain {
    pub(crate) fn of(p: &crate::config::Pipeline, links: &[&LinkRow]) -> RecordChain {
        use serde_json::Value;
        let mut results = serde_json::Map::new();
        let mut status = "succeeded";
        let mut error = None;
        let mut review = None;
        let mut cost = 0i64;
        let mut attempts = 0i64;
        let mut seen = std::collections::HashSet::new();
        for s in &p.stages {
            let mine: Vec<&&LinkRow> = links.iter().filter(|l| l.stage == s.name).collect();
            if mine.is_empty() && status == "succeeded" {
                status = "pending";
            }
            let mut values = Vec::new();
            for l in &mine {
                if let Some(id) = l.item_id
                    && seen.insert(id)
                {
                    cost += l.cost_pico;
                    attempts += l.attempts.unwrap_or(0);
                }
                if let Some(why) = &l.error {
                    status = "failed";
                    error.get_or_insert_with(|| format!("{}: {why}", s.name));
                }
                match l.state {
                    Some(ItemState::Succeeded) => values.push(
                        l.result
                            .as_deref()
                            .and_then(|t| serde_json::from_str(t).ok())
                            .unwrap_or(Value::Null),
                    ),
                    Some(ItemState::Exhausted) => {
                        status = "failed";
                        error.get_or_insert_with(|| {
                            format!(
                                "{}: {}",
                                s.name,
                                l.last_error.as_deref().unwrap_or("failed for good")
                            )
                        });
                        values.push(Value::Null);
                    }
                    Some(_) => {
                        if status == "succeeded" {
                            status = "pending";
                        }
                        values.push(Value::Null);
                    }
                    None => values.push(Value::Null),
                }
            }
            if s.on_fail.is_some()
                && let Some(v) = values.first()
                && let Some(pass) = v.get("pass").and_then(Value::as_bool)
            {
                review = Some(if pass { "pass" } else { "fail" });
            }
            let v = if s.is_chunked() {
                Value::Array(values)
            } else {
                values.into_iter().next().unwrap_or(Value::Null)
            };
            results.insert(s.name.clone(), v);
        }
        RecordChain {
            status,
            results,
            review,
            cost: crate::cost::Usd::from_pico(cost as i128),
            attempts,
            error,
        }
    }
}

/// One line of a multi-stage pipeline's results file.
#[derive(serde::Serialize)]
struct StagedLine<'a> {
    id: &'a str,
    line: i64,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    review: Option<&'static str>,
    /// The (last) review failed: someone should look at the record.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    flagged: bool,
    cost_usd: String,
    attempts: i64,
    stages: &'a serde_json::Map<String, serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
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
