//! Pipeline files: parse, validate, build.
//!
//! Three steps, as in the style guide:
//! 1. **parse** the TOML into raw structs (`deny_unknown_fields`, every field optional), one
//!    section at a time, so that one bad key does not hide the next: each unknown key and each
//!    wrongly typed value is reported with its TOML path;
//! 2. **validate** the raw structs with a pure function that collects *every* problem and
//!    builds the pipeline all the same, a default standing in for each bad value;
//! 3. **check the environment** (`check_environment`): the I/O checks that `nightshift
//!    validate` also runs — the source and schema files are readable, the prompt's fields are
//!    in the source's first records (CSV: its header), the schema compiles, the API key is
//!    set, the model has a price — so none of them is found after upload.
//!
//! `Pipeline::load` stops after step 2 when anything is wrong (so `run` refuses a broken
//! file); `Pipeline::check_file`, behind `nightshift validate`, runs all three and lists every
//! problem at once, skipping the environment checks that depend on a value already reported.
//!
//! Relative paths resolve against the pipeline file's folder. API keys never live here: the
//! file names an environment variable or a key file.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::cost::Usd;
use crate::cost::money::DecimalText;
pub use crate::provider::config::{
    KeySource, Mode, OPENAI_MAX_BYTES, OPENAI_MAX_REQUESTS, OnlineLimits, ProviderConfig,
    ProviderKind,
};
use crate::sim::SimSettings;
pub use crate::source::config::{SourceConfig, SourceKind};

mod build;
mod raw;
pub use crate::prompt::{FieldMiss, MissKind, RenderError, Template};
use rust_decimal::Decimal;

/// Default cap on one source record (one JSONL line or CSV row).
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1 << 20;
/// Default `source.max_quarantined_share`: half the source.
pub const DEFAULT_MAX_QUARANTINED_SHARE: Decimal = Decimal::from_parts(5, 0, 0, false, 1);

/// One problem in a pipeline file, at a TOML path such as `provider.model`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl Problem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in one pipeline file.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{}: {} problem{}",
            self.file.display(),
            n,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------------
// Built layer
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct PromptConfig {
    pub system: Option<String>,
    pub user: Template,
    pub user_text: String,
    pub max_output_tokens: u32,
    pub temperature: Option<f64>,
}

#[derive(Clone, Debug)]
pub struct OutputConfig {
    pub path: PathBuf,
    /// Each line of the results also carries the record's source fields (kept in the store
    /// from ingest on for that).
    pub include_source: bool,
}

/// `[report]`: what a run writes besides its summary.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReportConfig {
    /// `html`: the HTML report, rewritten at the end of every run.
    pub html: Option<PathBuf>,
}

/// The name under which a chunk stage's template sees its chunk (`index`, `count`, `text`).
pub const CHUNK_VAR: &str = "chunk";

/// What one item of a stage stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForEach {
    /// One item per record.
    Record,
    /// One item per chunk of a record's text field.
    Chunk(Split),
}

/// How a chunk stage cuts a record's text: by tokens of the stage's model, with overlap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    pub field: String,
    pub max_tokens: u32,
    pub overlap_tokens: u32,
}

/// What a review stage does with a record whose review says `"pass": false`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFail {
    /// Mark the record in the output and the report.
    Flag,
    /// Send the reviewed stage again, once, as another attempt of its item; then review again.
    Regenerate,
}

/// One stage of a pipeline: one call per record (or per chunk of a record), rendered from
/// the record and the results of the stages it needs.
#[derive(Clone, Debug)]
pub struct Stage {
    pub name: String,
    pub for_each: ForEach,
    /// Stages whose items must all have succeeded for a record before this stage's item is
    /// created; their results are in the template under their names.
    pub needs: Vec<String>,
    pub prompt: PromptConfig,
    /// The JSON Schema every answer of the stage is validated against.
    pub schema: PathBuf,
    /// The model the stage's requests go to (`provider.model` unless the stage sets its own).
    pub model: String,
    pub max_attempts: u32,
    /// A deterministic share of the records (by a hash of the record id) that get this stage.
    pub sample: Option<Decimal>,
    /// A condition on the record and earlier results that adds records to the stage.
    pub when: Option<Template>,
    /// The `when` expression as written.
    pub when_text: Option<String>,
    /// Set on a review stage: what a failed review does.
    pub on_fail: Option<OnFail>,
    /// What `nightshift plan` assumes the stage's answers count (output tokens per call);
    /// `None`: its history, else an assumption (the first stage: `[plan]`'s).
    pub expected_output_tokens: Option<u32>,
}

impl Stage {
    /// Whether every record gets this stage (no `sample`, no `when`).
    pub fn for_every_record(&self) -> bool {
        self.sample.is_none() && self.when.is_none()
    }

    pub fn is_chunked(&self) -> bool {
        matches!(self.for_each, ForEach::Chunk(_))
    }
}

#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    pub max_requests: usize,
    pub max_bytes: u64,
}

/// Spending limits of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    /// The run never spends more than this.
    pub max: Option<Usd>,
    /// Items whose worst case alone is above this are not sent.
    pub max_item: Option<Usd>,
}

/// How the job runs, for the planning worksheet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timing {
    Realtime,
    Queued,
    Scheduled,
    Backfill,
}

impl Timing {
    pub fn as_str(self) -> &'static str {
        match self {
            Timing::Realtime => "realtime",
            Timing::Queued => "queued",
            Timing::Scheduled => "scheduled",
            Timing::Backfill => "backfill",
        }
    }
}

/// The assumptions `nightshift plan` uses where the store has no history yet.
#[derive(Clone, Debug)]
pub struct PlanSettings {
    pub timing: Timing,
    /// What one processed item is called (`product`, `ticket`).
    pub unit: String,
    pub expected_output_tokens: Option<u32>,
    /// `None` when the file does not say: measured history, else 5 %, stands in.
    pub retry_rate: Option<Decimal>,
    pub safety_margin: Decimal,
}

/// A validated pipeline.
#[derive(Clone, Debug)]
pub struct Pipeline {
    pub name: String,
    pub description: Option<String>,
    /// The pipeline file, as given.
    pub file: PathBuf,
    /// The folder relative paths resolve against.
    pub dir: PathBuf,
    pub source: SourceConfig,
    pub provider: ProviderConfig,
    /// The built-in simulator's settings (`[provider.simulator]`), used with `simulate = true`.
    pub simulator: SimSettings,
    /// The stages, in file order (every `needs` names an earlier one). A file in the
    /// one-stage form (top-level `[prompt]` and `output.schema`) has one stage, `main`.
    pub stages: Vec<Stage>,
    pub output: OutputConfig,
    pub batch: BatchLimits,
    pub pricing_file: Option<PathBuf>,
    pub budget: Budget,
    pub plan: PlanSettings,
    pub report: ReportConfig,
    /// `[cleanup]`: what a run deletes of its leftovers when it is over.
    pub cleanup: Cleanup,
}

/// `[cleanup]`: whether a run ends with `nightshift gc`, and of which batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// A run that finished (completed, failed, budget) deletes what its pipeline's ingested
    /// batches left behind.
    pub after_run: bool,
    /// Only batches ingested at least this long ago (default 0: every ingested batch).
    pub older_than: std::time::Duration,
}

/// The name of the one stage of a file in the one-stage form (top-level `[prompt]`): the
/// store keys items by stage, and this name keeps the keys of the first releases.
pub const DEFAULT_STAGE: &str = "main";

impl Pipeline {
    /// Reads and validates a pipeline file (no I/O beyond reading it).
    pub fn load(path: &Path) -> Result<Pipeline, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            problems: vec![Problem::new("", format!("cannot read the file: {e}"))],
        })?;
        Self::from_str(&text, path)
    }

    /// Parses and validates pipeline text that was read from `path`.
    pub fn from_str(text: &str, path: &Path) -> Result<Pipeline, ConfigError> {
        match build(text, path) {
            (Some(p), problems) if problems.is_empty() => Ok(p),
            (_, problems) => Err(ConfigError {
                file: path.to_path_buf(),
                problems,
            }),
        }
    }

    /// The first stage: the one rendered from the source records as they are read.
    pub fn first_stage(&self) -> &Stage {
        &self.stages[0]
    }

    /// The stage called `name`.
    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Whether the pipeline has more than one stage (records then keep their fields and
    /// their links to every item in the store).
    pub fn is_multi_stage(&self) -> bool {
        self.stages.len() > 1
    }

    /// The price of each stage's model, in stage order.
    pub fn stage_prices(
        &self,
        prices: &crate::cost::PriceTable,
    ) -> Result<Vec<crate::cost::ModelPrice>, crate::cost::pricing::LookupError> {
        self.stages
            .iter()
            .map(|s| {
                prices
                    .lookup(self.provider.kind.as_str(), &s.model)
                    .cloned()
            })
            .collect()
    }

    /// The stage names joined by `,` (what a run row records).
    pub fn stage_list(&self) -> String {
        self.stages
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Parses and validates: the built pipeline (best effort: a default stands in for each bad
/// value, `None` only when the text is not TOML at all) and every problem found.
pub(crate) fn build(text: &str, path: &Path) -> (Option<Pipeline>, Vec<Problem>) {
    let (raw, mut problems) = raw::parse(text);
    let Some(raw) = raw else {
        return (None, problems);
    };
    let dir = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_path_buf()
            }
        })
        .unwrap_or_else(|| PathBuf::from("."));
    let (pipeline, more) = build::validate(raw, path, &dir);
    problems.extend(more);
    (Some(pipeline), problems)
}

/// Whether `path` (e.g. `source.path`) is, or lies inside, one of the `flagged` TOML paths
/// (`[source]` and `source` both cover `source.path`).
pub(crate) fn is_flagged(flagged: &[String], path: &str) -> bool {
    let path = path.trim_start_matches('[').trim_end_matches(']');
    flagged.iter().any(|f| {
        let f = f.trim_start_matches('[').trim_end_matches(']');
        !f.is_empty()
            && path
                .strip_prefix(f)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
    })
}

#[cfg(test)]
mod tests;
