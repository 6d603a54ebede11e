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
    pub schema: PathBuf,
    pub path: PathBuf,
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
    pub prompt: PromptConfig,
    pub output: OutputConfig,
    pub max_attempts: u32,
    pub batch: BatchLimits,
    pub pricing_file: Option<PathBuf>,
    pub budget: Budget,
    pub plan: PlanSettings,
}

/// The one stage every pipeline has today; the store keys items by stage already.
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

    /// The stage name.
    pub fn stage(&self) -> &str {
        DEFAULT_STAGE
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
