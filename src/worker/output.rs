//! The results file: one line (row) per source record of the run, in source order, as JSON
//! lines, CSV or Parquet by the path's extension, written atomically a page of records at a
//! time. CSV and Parquet spread each answer over the columns its schema describes
//! (`table.rs`); with `output.include_source` every line also carries the record's source
//! fields, which ingest then keeps in the store (`records.data`) so the results do not depend
//! on the source file still being there, unchanged, when the run ends.

use std::path::Path;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::parquet_file::ParquetSink;
use super::table::{AnswerLayout, Cell, Column, Kind, SourceColumns};
use super::{RunError, Runner};
use crate::provider::BatchProvider;
use crate::store::{ItemState, LinkRow, RecordResult, Store};
use crate::util::fs::AtomicFile;

/// Records per page of a one-stage pipeline's results (a Parquet row group each).
const PAGE: u32 = 10_000;
/// Records per page of a multi-stage pipeline's results (their links are read with them).
const STAGED_PAGE: u32 = 2_000;
/// Records per read when the source's fields are scanned for their columns.
const SOURCE_SCAN_PAGE: u32 = 5_000;

/// Where the lines or rows of the results file go.
enum Out<'f> {
    Lines {
        file: &'f mut AtomicFile,
        buf: Vec<u8>,
    },
    Csv(csv::Writer<&'f mut AtomicFile>),
    Parquet(ParquetSink<&'f mut AtomicFile>),
}

impl Out<'_> {
    fn line<T: serde::Serialize>(&mut self, line: &T) -> std::io::Result<()> {
        if let Out::Lines { buf, .. } = self {
            serde_json::to_writer(&mut *buf, line)?;
            buf.push(b'\n');
        }
        Ok(())
    }

    fn row(&mut self, cells: &[Cell]) -> std::io::Result<()> {
        match self {
            Out::Lines { .. } => Ok(()),
            Out::Csv(w) => w
                .write_record(cells.iter().map(Cell::csv_text))
                .map_err(std::io::Error::other),
            Out::Parquet(p) => {
                p.push(cells);
                Ok(())
            }
        }
    }

    fn end_page(&mut self) -> std::io::Result<()> {
        use std::io::Write;
        match self {
            Out::Lines { file, buf } => {
                file.write_all(buf)?;
                buf.clear();
                Ok(())
            }
            Out::Csv(w) => w.flush(),
            Out::Parquet(p) => p.end_page(),
        }
    }

    fn finish(mut self) -> std::io::Result<()> {
        self.end_page()?;
        match self {
            Out::Parquet(p) => p.finish(),
            _ => Ok(()),
        }
    }
}

/// How a stage's result fills its columns.
enum Answers {
    /// Spread over the columns its schema describes.
    Spread(AnswerLayout),
    /// One column of JSON text (a chunk stage's array of results).
    Whole,
}

impl Answers {
    fn cells(&self, answer: Option<&Value>, out: &mut Vec<Cell>) {
        match self {
            Answers::Spread(l) => l.cells(answer, out),
            Answers::Whole => out.push(match answer {
                None | Some(Value::Null) => Cell::Null,
                Some(v) => Cell::Json(crate::util::text::compact_json(v)),
            }),
        }
    }
}

/// The columns of a CSV or Parquet results file.
struct Table {
    columns: Vec<Column>,
    /// Per stage, in the pipeline's order.
    answers: Vec<Answers>,
    source: Option<SourceColumns>,
}

/// A record's source fields, from a page of them, by line.
struct SourcePage {
    rows: Vec<(i64, String, String)>,
    next: usize,
}

impl SourcePage {
    /// The fields of record `line` (lines are asked for in order).
    fn take(&mut self, line: i64) -> Option<&str> {
        while self.rows.get(self.next).is_some_and(|r| r.0 < line) {
            self.next += 1;
        }
        match self.rows.get(self.next) {
            Some(r) if r.0 == line => Some(&r.2),
            _ => None,
        }
    }
}

/// A record's source fields as they go into a JSON line.
fn raw_source(fields: Option<&str>) -> Option<Box<RawValue>> {
    RawValue::from_string(fields.unwrap_or("{}").to_string()).ok()
}

/// A record's source fields as they go into a row.
fn push_source(t: &Table, fields: Option<&str>, cells: &mut Vec<Cell>) {
    if let Some(s) = &t.source {
        let map = fields.and_then(|f| serde_json::from_str::<Map<String, Value>>(f).ok());
        s.cells(map.as_ref(), cells);
    }
}

impl<S: Store, P: BatchProvider> Runner<'_, S, P> {
    /// Writes one result line (row) per source record of this run, in source order, in the
    /// format the path's extension names, atomically.
    pub(super) async fn write_output(&self) -> Result<(), RunError> {
        let ctx = self.ctx;
        let path = &ctx.output_path;
        let err = |source| RunError::Output {
            path: path.clone(),
            source,
        };
        let format = OutputFormat::for_path(path).map_err(RunError::Config)?;
        let table = match format {
            OutputFormat::Jsonl => None,
            OutputFormat::Csv | OutputFormat::Parquet => Some(self.table().await?),
        };
        let mut file = AtomicFile::create(path).map_err(err)?;
        {
            let mut out = match (&table, format) {
                (Some(t), OutputFormat::Csv) => {
                    let mut w = csv::Writer::from_writer(&mut file);
                    w.write_record(t.columns.iter().map(|c| c.name.as_str()))
                        .map_err(|e| err(std::io::Error::other(e)))?;
                    Out::Csv(w)
                }
                (Some(t), OutputFormat::Parquet) => {
                    Out::Parquet(ParquetSink::new(&mut file, &t.columns).map_err(err)?)
                }
                _ => Out::Lines {
                    file: &mut file,
                    buf: Vec::with_capacity(1 << 16),
                },
            };
            if ctx.pipeline.is_multi_stage() {
                self.write_staged_output(&mut out, table.as_ref()).await?;
            } else {
                self.write_one_stage_output(&mut out, table.as_ref())
                    .await?;
            }
            out.finish().map_err(err)?;
        }
        file.commit().map_err(err)
    }

    /// The columns of this pipeline's table: the record's, each stage's answer (schema order),
    /// the error, then the source's fields (read from the store first when asked for).
    async fn table(&self) -> Result<Table, RunError> {
        let p = self.ctx.pipeline;
        let staged = p.is_multi_stage();
        let mut answers = Vec::new();
        for s in &p.stages {
            let prefix = if staged {
                format!("stage.{}", s.name)
            } else {
                "output".to_string()
            };
            answers.push(if staged && s.is_chunked() {
                Answers::Whole
            } else {
                let text = std::fs::read_to_string(&s.schema).map_err(|e| {
                    RunError::Config(format!("cannot read schema {}: {e}", s.schema.display()))
                })?;
                Answers::Spread(
                    AnswerLayout::from_schema(&prefix, &text).map_err(|e| {
                        RunError::Config(format!("schema {}: {e}", s.schema.display()))
                    })?,
                )
            });
        }
        let mut columns = vec![
            Column::new("id", Kind::Text, false),
            Column::new("line", Kind::Int, false),
            Column::new("status", Kind::Text, false),
        ];
        if staged {
            columns.push(Column::new("review", Kind::Text, true));
            columns.push(Column::new("cost_usd", Kind::Usd, false));
        }
        columns.push(Column::new("attempts", Kind::Int, false));
        for (s, a) in p.stages.iter().zip(&answers) {
            match a {
                Answers::Spread(l) => columns.extend_from_slice(l.columns()),
                Answers::Whole => {
                    columns.push(Column::new(format!("stage.{}", s.name), Kind::Json, true))
                }
            }
        }
        columns.push(Column::new("error", Kind::Text, true));
        let source = if p.output.include_source {
            let mut seen = SourceColumns::default();
            let mut after = 0i64;
            loop {
                let rows = self
                    .ctx
                    .store
                    .run_record_data(&self.run_id, after, SOURCE_SCAN_PAGE)
                    .await?;
                let Some(last) = rows.last() else { break };
                after = last.0;
                for (_, _, fields) in &rows {
                    if let Ok(map) = serde_json::from_str::<Map<String, Value>>(fields) {
                        seen.observe(&map);
                    }
                }
            }
            columns.extend(seen.columns());
            Some(seen)
        } else {
            None
        };
        Ok(Table {
            columns,
            answers,
            source,
        })
    }

    /// A page of the run's records' source fields from line `after` on, when asked for.
    async fn source_page(&self, after: i64, limit: u32) -> Result<SourcePage, RunError> {
        let rows = if self.ctx.pipeline.output.include_source {
            self.ctx
                .store
                .run_record_data(&self.run_id, after, limit)
                .await?
        } else {
            Vec::new()
        };
        Ok(SourcePage { rows, next: 0 })
    }

    /// A one-stage pipeline's results: id, line, status, attempts, the answer, the error.
    async fn write_one_stage_output(
        &self,
        out: &mut Out<'_>,
        table: Option<&Table>,
    ) -> Result<(), RunError> {
        let ctx = self.ctx;
        let err = |source| RunError::Output {
            path: ctx.output_path.clone(),
            source,
        };
        let with_source = ctx.pipeline.output.include_source;
        let mut cells = Vec::new();
        let mut after = 0i64;
        loop {
            let rows = ctx.store.run_records(&self.run_id, after, PAGE).await?;
            if rows.is_empty() {
                break;
            }
            let mut source = self.source_page(after, PAGE).await?;
            for r in &rows {
                after = r.line;
                let (status, succeeded) = status_of(r);
                let error = if succeeded {
                    None
                } else {
                    r.last_error.as_deref()
                };
                let fields = source.take(r.line);
                match table {
                    Some(t) => {
                        cells.clear();
                        cells.push(Cell::Text(r.record_id.clone()));
                        cells.push(Cell::Int(r.line));
                        cells.push(Cell::Text(status.into()));
                        cells.push(Cell::Int(r.attempts));
                        let answer = if succeeded {
                            r.result
                                .as_deref()
                                .and_then(|t| serde_json::from_str(t).ok())
                        } else {
                            None
                        };
                        t.answers[0].cells(answer.as_ref(), &mut cells);
                        cells.push(error.map_or(Cell::Null, |e| Cell::Text(e.into())));
                        push_source(t, fields, &mut cells);
                        out.row(&cells).map_err(err)?;
                    }
                    None => {
                        let line = OutputLine {
                            id: &r.record_id,
                            line: r.line,
                            status,
                            attempts: r.attempts,
                            output: if succeeded {
                                r.result
                                    .as_deref()
                                    .and_then(|t| RawValue::from_string(t.to_string()).ok())
                            } else {
                                None
                            },
                            error,
                            source: if with_source {
                                raw_source(fields)
                            } else {
                                None
                            },
                        };
                        out.line(&line).map_err(err)?;
                    }
                }
            }
            out.end_page().map_err(err)?;
            crate::failpoint!("output.mid_write");
        }
        Ok(())
    }

    /// The results file of a multi-stage pipeline: one line per source record with each
    /// stage's result under the stage's name (a chunk stage's as an array in chunk order),
    /// the record's status, its review verdict and what its items cost. Cost and attempts
    /// count every attempt of the items, in whichever run, so a record whose items did not
    /// change gets the same line night after night.
    async fn write_staged_output(
        &self,
        out: &mut Out<'_>,
        table: Option<&Table>,
    ) -> Result<(), RunError> {
        let ctx = self.ctx;
        let p = ctx.pipeline;
        let err = |source| RunError::Output {
            path: ctx.output_path.clone(),
            source,
        };
        let with_source = p.output.include_source;
        let mut cells = Vec::new();
        let mut after = 0i64;
        loop {
            let rows = ctx
                .store
                .run_record_ids(&self.run_id, after, STAGED_PAGE)
                .await?;
            let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
                break;
            };
            let links = ctx
                .store
                .links_between(&self.run_id, first.0, last.0, false)
                .await?;
            let mut source = self.source_page(after, STAGED_PAGE).await?;
            for (line, record_id) in &rows {
                after = *line;
                let mine: Vec<&LinkRow> = LinkRow::of_line(&links, *line).iter().collect();
                let chain = RecordChain::of(p, &mine);
                let fields = source.take(*line);
                match table {
                    Some(t) => {
                        cells.clear();
                        cells.push(Cell::Text(record_id.clone()));
                        cells.push(Cell::Int(*line));
                        cells.push(Cell::Text(chain.status.into()));
                        cells.push(chain.review.map_or(Cell::Null, |v| Cell::Text(v.into())));
                        cells.push(Cell::Usd(chain.cost.pico()));
                        cells.push(Cell::Int(chain.attempts));
                        for (i, a) in t.answers.iter().enumerate() {
                            a.cells(Some(&chain.value(i)), &mut cells);
                        }
                        cells.push(
                            chain
                                .error
                                .as_deref()
                                .map_or(Cell::Null, |e| Cell::Text(e.into())),
                        );
                        push_source(t, fields, &mut cells);
                        out.row(&cells).map_err(err)?;
                    }
                    None => {
                        let line = StagedLine {
                            id: record_id,
                            line: *line,
                            status: chain.status,
                            review: chain.review,
                            flagged: chain.review == Some("fail"),
                            cost_usd: chain.cost.to_string(),
                            attempts: chain.attempts,
                            stages: StageResults(&chain.stages),
                            error: chain.error.as_deref(),
                            source: if with_source {
                                raw_source(fields)
                            } else {
                                None
                            },
                        };
                        out.line(&line).map_err(err)?;
                    }
                }
            }
            out.end_page().map_err(err)?;
            crate::failpoint!("output.mid_write");
        }
        Ok(())
    }
}

/// A one-stage record's status, and whether its item succeeded.
fn status_of(r: &RecordResult) -> (&'static str, bool) {
    match r.state {
        ItemState::Succeeded => ("succeeded", true),
        ItemState::Exhausted => ("failed", false),
        _ => ("pending", false),
    }
}

/// What became of one record across the stages.
pub(crate) struct RecordChain<'a> {
    /// `succeeded`, `failed` or `pending`.
    pub(crate) status: &'static str,
    /// Each stage's results, in pipeline order: its name, whether it is a chunk stage, and
    /// the result of each of its links as stored (none: no result, or not run).
    pub(crate) stages: Vec<StageResult<'a>>,
    /// `pass` or `fail` when a reviewing stage (`on_fail`) ran for the record.
    pub(crate) review: Option<&'static str>,
    /// What the attempts of the record's items cost, in any run (a shared item counts in
    /// full), as `attempts` counts them.
    pub(crate) cost: crate::cost::Usd,
    pub(crate) attempts: i64,
    /// Why the record failed: the stage, and its item's last error or why it has none.
    pub(crate) error: Option<String>,
}

/// One stage's results for a record. Results are kept as the stored JSON text: written
/// to a JSON lines file as they are, parsed only for a table's columns or a review's
/// verdict.
pub(crate) struct StageResult<'a> {
    name: &'a str,
    chunked: bool,
    results: Vec<Option<&'a RawValue>>,
}

impl StageResult<'_> {
    /// The stage's result as a value: a chunk stage's as an array in chunk order, null
    /// where there is none.
    fn value(&self) -> Value {
        let parse = |r: &Option<&RawValue>| {
            r.and_then(|r| serde_json::from_str(r.get()).ok())
                .unwrap_or(Value::Null)
        };
        if self.chunked {
            Value::Array(self.results.iter().map(parse).collect())
        } else {
            self.results.first().map_or(Value::Null, parse)
        }
    }
}

impl serde::Serialize for StageResult<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.chunked {
            self.results.serialize(s)
        } else {
            self.results.first().copied().flatten().serialize(s)
        }
    }
}

/// The stages' results of a record as one JSON object, keyed by stage name in name order
/// (the order a JSON object map keeps).
struct StageResults<'c, 'a>(&'c [StageResult<'a>]);

impl serde::Serialize for StageResults<'_, '_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut by_name: Vec<&StageResult<'_>> = self.0.iter().collect();
        by_name.sort_by_key(|r| r.name);
        let mut map = s.serialize_map(Some(by_name.len()))?;
        for r in by_name {
            map.serialize_entry(r.name, r)?;
        }
        map.end()
    }
}

impl<'a> RecordChain<'a> {
    pub(crate) fn of(p: &'a crate::config::Pipeline, links: &[&'a LinkRow]) -> RecordChain<'a> {
        let mut stages = Vec::with_capacity(p.stages.len());
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
            let mut results = Vec::with_capacity(mine.len());
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
                    Some(ItemState::Succeeded) => results.push(
                        l.result
                            .as_deref()
                            .and_then(|t| serde_json::from_str::<&RawValue>(t).ok()),
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
                        results.push(None);
                    }
                    Some(_) => {
                        if status == "succeeded" {
                            status = "pending";
                        }
                        results.push(None);
                    }
                    None => results.push(None),
                }
            }
            if s.on_fail.is_some()
                && let Some(Some(first)) = results.first()
                && let Some(pass) = verdict_of(first)
            {
                review = Some(if pass { "pass" } else { "fail" });
            }
            stages.push(StageResult {
                name: &s.name,
                chunked: s.is_chunked(),
                results,
            });
        }
        RecordChain {
            status,
            stages,
            review,
            cost: crate::cost::Usd::from_pico(cost as i128),
            attempts,
            error,
        }
    }

    /// The result of the `i`th stage as a value (see [`StageResult::value`]).
    fn value(&self, i: usize) -> Value {
        self.stages.get(i).map_or(Value::Null, StageResult::value)
    }
}

/// A review's verdict: its `pass` member when that is a boolean.
fn verdict_of(review: &RawValue) -> Option<bool> {
    #[derive(serde::Deserialize)]
    struct Verdict {
        pass: Option<bool>,
    }
    serde_json::from_str::<Verdict>(review.get())
        .ok()
        .and_then(|v| v.pass)
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
    stages: StageResults<'a, 'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    /// The record's source fields (`output.include_source`).
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<Box<RawValue>>,
}

/// How the results file is written, by its extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// One JSON object per line (`.jsonl`, `.ndjson`, `.json`).
    Jsonl,
    /// A header row, then one row per record; each answer spread over a column per field
    /// its schema describes (`.csv`).
    Csv,
    /// The same columns as CSV, typed, one row group per page of records (`.parquet`).
    Parquet,
}

impl OutputFormat {
    /// The format a results path asks for; any other extension is refused (a results file
    /// named `.txt` would otherwise silently get JSON lines).
    pub fn for_path(path: &Path) -> Result<Self, String> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("jsonl") | Some("ndjson") | Some("json") => Ok(OutputFormat::Jsonl),
            Some("csv") => Ok(OutputFormat::Csv),
            Some("parquet") => Ok(OutputFormat::Parquet),
            _ => Err(format!(
                "{} must end in .jsonl (JSON lines), .csv or .parquet",
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
    output: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    /// The record's source fields (`output.include_source`).
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<Box<RawValue>>,
}
