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

pub mod template;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::cost::money::DecimalText;
use crate::cost::{PriceTable, PricingMode, Usd};
use crate::sim::SimSettings;
use rust_decimal::Decimal;
pub use template::{FieldMiss, MissKind, RenderError, Template};

/// OpenAI's limits for one batch input file.
pub const OPENAI_MAX_REQUESTS: usize = 50_000;
pub const OPENAI_MAX_BYTES: u64 = 200 * 1000 * 1000;
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
// Raw (serde) layer
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    kind: Option<String>,
    path: Option<String>,
    id_field: Option<String>,
    max_record_bytes: Option<u64>,
    delimiter: Option<String>,
    max_quarantined_share: Option<DecimalText>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    kind: Option<String>,
    model: Option<String>,
    base_url: Option<String>,
    api_key_env: Option<String>,
    api_key_file: Option<String>,
    simulate: Option<bool>,
    simulator: Option<SimSettings>,
    completion_window: Option<String>,
    mode: Option<String>,
    deployment: Option<String>,
    api_version: Option<String>,
    concurrency: Option<u32>,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u64>,
    retry_online_below: Option<u64>,
    poll_min_seconds: Option<f64>,
    poll_max_seconds: Option<f64>,
    request_timeout_seconds: Option<f64>,
    unreachable_timeout_seconds: Option<f64>,
    reconcile_grace_seconds: Option<f64>,
    max_download_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrompt {
    system: Option<String>,
    user: Option<String>,
    max_output_tokens: Option<u32>,
    temperature: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    schema: Option<String>,
    path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch {
    max_requests: Option<u64>,
    max_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPricing {
    file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    max_usd: Option<DecimalText>,
    max_item_usd: Option<DecimalText>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    timing: Option<String>,
    unit: Option<String>,
    expected_output_tokens: Option<u32>,
    retry_rate: Option<DecimalText>,
    safety_margin: Option<DecimalText>,
}

#[derive(Debug, Default)]
struct RawPipeline {
    name: Option<String>,
    description: Option<String>,
    source: Option<RawSource>,
    provider: Option<RawProvider>,
    prompt: Option<RawPrompt>,
    output: Option<RawOutput>,
    retry: Option<RawRetry>,
    batch: Option<RawBatch>,
    pricing: Option<RawPricing>,
    budget: Option<RawBudget>,
    plan: Option<RawPlan>,
    /// TOML paths whose values parsing rejected (or whose whole section it dropped): the
    /// checks after it say nothing more about them.
    flagged: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Built layer
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    Jsonl,
    Csv,
}

#[derive(Clone, Debug)]
pub struct SourceConfig {
    pub kind: SourceKind,
    pub path: PathBuf,
    pub id_field: String,
    pub max_record_bytes: usize,
    pub delimiter: u8,
    /// A run whose quarantined share of records is above this sends nothing and fails
    /// (0 to 1, default 0.5; 1 never stops a run).
    pub max_quarantined_share: Decimal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderKind {
    OpenAi,
    Azure,
    Anthropic,
    Gemini,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Azure => "azure",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
        }
    }

    pub fn default_key_env(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "OPENAI_API_KEY",
            ProviderKind::Azure => "AZURE_OPENAI_API_KEY",
            ProviderKind::Anthropic => "ANTHROPIC_API_KEY",
            ProviderKind::Gemini => "GEMINI_API_KEY",
        }
    }

    /// The provider's own limits for one batch: (requests, bytes).
    pub fn batch_limits(self) -> (usize, u64) {
        match self {
            ProviderKind::OpenAi => (OPENAI_MAX_REQUESTS, OPENAI_MAX_BYTES),
            ProviderKind::Azure => (100_000, 200 * 1000 * 1000),
            ProviderKind::Anthropic => (100_000, 256 * 1000 * 1000),
            // No documented request cap; files up to 2 GB.
            ProviderKind::Gemini => (100_000, 2 * 1000 * 1000 * 1000),
        }
    }
}

/// How requests are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Provider batch jobs, at batch prices.
    Batch,
    /// Real-time calls under concurrency and rate limits, at standard prices.
    Online,
}

/// The online-mode limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OnlineLimits {
    pub concurrency: usize,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
}

/// Where the API key comes from. The key itself is read only when a client is built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    Env(String),
    File(PathBuf),
}

#[derive(Clone, Debug)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    pub mode: Mode,
    pub model: String,
    /// Azure: the deployment the requests name (defaults to `model`).
    pub deployment: Option<String>,
    /// Azure: the `api-version` query parameter.
    pub api_version: String,
    pub online: OnlineLimits,
    /// A retry round with fewer items than this goes online instead of into a new batch.
    pub retry_online_below: Option<u64>,
    pub base_url: Option<String>,
    pub key: KeySource,
    pub simulate: bool,
    pub simulator: SimSettings,
    pub completion_window: String,
    pub poll_min: Duration,
    pub poll_max: Duration,
    pub request_timeout: Duration,
    /// How long the provider may stay unreachable (refused connections, timeouts, 5xx and
    /// 429s without end) before a run gives up with exit 75.
    pub unreachable_timeout: Duration,
    /// How long after an ambiguous create the provider's list is trusted to show the batch.
    pub reconcile_grace: Duration,
    pub max_download_bytes: u64,
}

impl ProviderConfig {
    pub fn pricing_mode(&self) -> PricingMode {
        match self.mode {
            Mode::Batch => PricingMode::Batch,
            Mode::Online => PricingMode::Standard,
        }
    }
}

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

    /// Everything `nightshift validate` checks, as one list: the parse and validation
    /// problems, then the environment checks ([`Pipeline::check_environment`]) on whatever
    /// parts of the file were valid. A check that depends on a value with a problem already
    /// is skipped, so one mistake is reported once. `Ok` only when nothing at all is wrong.
    pub fn check_file(path: &Path, prices: Option<&PriceTable>) -> Result<Pipeline, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            problems: vec![Problem::new("", format!("cannot read the file: {e}"))],
        })?;
        let (pipeline, mut problems) = build(&text, path);
        if let Some(p) = &pipeline {
            let flagged: Vec<String> = problems.iter().map(|x| x.path.clone()).collect();
            problems.extend(p.environment_problems(prices, &flagged));
        }
        match pipeline {
            Some(p) if problems.is_empty() => Ok(p),
            _ => Err(ConfigError {
                file: path.to_path_buf(),
                problems,
            }),
        }
    }

    /// The stage name.
    pub fn stage(&self) -> &str {
        DEFAULT_STAGE
    }

    /// The I/O checks `nightshift validate` runs after the pure ones: files readable, the
    /// prompt's fields present in the source's first records (CSV: its header), schema
    /// compiles, key present, model priced. Returns every problem found.
    pub fn check_environment(&self, prices: Option<&PriceTable>) -> Vec<Problem> {
        self.environment_problems(prices, &[])
    }

    /// The environment checks, skipping those that depend on a TOML path in `flagged` (one
    /// with a problem already: checking its best-effort default would only add noise).
    fn environment_problems(
        &self,
        prices: Option<&PriceTable>,
        flagged: &[String],
    ) -> Vec<Problem> {
        let skip = |deps: &[&str]| deps.iter().any(|d| is_flagged(flagged, d));
        let mut problems = Vec::new();
        if skip(&["source.path"]) {
            // Nothing to open.
        } else if let Err(e) = std::fs::File::open(&self.source.path) {
            problems.push(Problem::new(
                "source.path",
                format!("cannot open {}: {e}", self.source.path.display()),
            ));
        } else if !skip(&[
            "source.kind",
            "source.id_field",
            "source.delimiter",
            "source.max_record_bytes",
        ]) {
            // A template with a problem was replaced by one without fields: nothing to check.
            match crate::source::check_template_fields(self) {
                Err(msg) => problems.push(Problem::new("source.path", msg)),
                Ok(misses) => {
                    problems.extend(misses.into_iter().map(|m| Problem::new("prompt.user", m)))
                }
            }
        }
        if !skip(&["output.schema"])
            && let Err(msg) = crate::validate::OutputValidator::load(&self.output.schema)
        {
            problems.push(Problem::new("output.schema", msg));
        }
        if !skip(&["output.path"])
            && let Some(parent) = self.output.path.parent()
            && parent.exists()
            && !parent.is_dir()
        {
            problems.push(Problem::new(
                "output.path",
                format!("{} is not a folder", parent.display()),
            ));
        }
        let key_deps = [
            "provider.kind",
            "provider.simulate",
            "provider.api_key_env",
            "provider.api_key_file",
        ];
        if !self.provider.simulate && !skip(&key_deps) {
            match &self.provider.key {
                KeySource::Env(var) => match std::env::var(var) {
                    Ok(v) if !v.trim().is_empty() => {}
                    _ => problems.push(Problem::new(
                        "provider.api_key_env",
                        format!(
                            "environment variable {var} is not set (export it, or set `simulate = true` to rehearse against the built-in simulator)"
                        ),
                    )),
                },
                KeySource::File(f) => {
                    if let Err(e) = crate::provider::read_key_file(f) {
                        problems.push(Problem::new("provider.api_key_file", e));
                    }
                }
            }
        }
        let owned;
        let table = match prices {
            Some(t) => Some(t),
            None if skip(&["pricing.file"]) => None,
            None => match PriceTable::builtin_with(self.pricing_file.as_deref()) {
                Ok(t) => {
                    owned = t;
                    Some(&owned)
                }
                Err(e) => {
                    problems.push(Problem::new("pricing.file", e.to_string()));
                    None
                }
            },
        };
        if let Some(table) = table
            && !skip(&["provider.kind", "provider.model", "provider.mode"])
        {
            match table.lookup(self.provider.kind.as_str(), &self.provider.model) {
                Err(e) => problems.push(Problem::new("provider.model", e.to_string())),
                Ok(p) => {
                    let mode = self.provider.pricing_mode();
                    if p.rates(mode).is_none() {
                        problems.push(Problem::new(
                            "provider.model",
                            format!(
                                "model `{}` has no {mode} price in the pricing table; add a `batch` entry for it",
                                self.provider.model
                            ),
                        ));
                    }
                }
            }
        }
        problems
    }
}

/// Parses and validates: the built pipeline (best effort: a default stands in for each bad
/// value, `None` only when the text is not TOML at all) and every problem found.
fn build(text: &str, path: &Path) -> (Option<Pipeline>, Vec<Problem>) {
    let (raw, mut problems) = parse(text);
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
    let (pipeline, more) = validate(raw, path, &dir);
    problems.extend(more);
    (Some(pipeline), problems)
}

/// Whether `path` (e.g. `source.path`) is, or lies inside, one of the `flagged` TOML paths
/// (`[source]` and `source` both cover `source.path`).
fn is_flagged(flagged: &[String], path: &str) -> bool {
    let path = path.trim_start_matches('[').trim_end_matches(']');
    flagged.iter().any(|f| {
        let f = f.trim_start_matches('[').trim_end_matches(']');
        !f.is_empty()
            && path
                .strip_prefix(f)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
    })
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

const TOP_LEVEL: &[&str] = &[
    "name",
    "description",
    "source",
    "provider",
    "prompt",
    "output",
    "retry",
    "batch",
    "pricing",
    "budget",
    "plan",
];

fn parse(text: &str) -> (Option<RawPipeline>, Vec<Problem>) {
    let mut problems = Vec::new();
    let table: toml::Table = match toml::from_str(text) {
        Ok(t) => t,
        Err(e) => {
            let at = e
                .span()
                .map(|s| {
                    let (line, col) = line_col(text, s.start);
                    format!("line {line}, column {col}: ")
                })
                .unwrap_or_default();
            problems.push(Problem::new(
                "",
                format!("not valid TOML: {at}{}", e.message()),
            ));
            return (None, problems);
        }
    };
    let mut raw = RawPipeline::default();
    let mut flagged = Vec::new();
    for (key, value) in table {
        let (p, f) = (&mut problems, &mut flagged);
        match key.as_str() {
            "name" => raw.name = scalar_string(&key, value, p),
            "description" => raw.description = scalar_string(&key, value, p),
            "source" => raw.source = section(&key, value, p, f),
            "provider" => raw.provider = section(&key, value, p, f),
            "prompt" => raw.prompt = section(&key, value, p, f),
            "output" => raw.output = section(&key, value, p, f),
            "retry" => raw.retry = section(&key, value, p, f),
            "batch" => raw.batch = section(&key, value, p, f),
            "pricing" => raw.pricing = section(&key, value, p, f),
            "budget" => raw.budget = section(&key, value, p, f),
            "plan" => raw.plan = section(&key, value, p, f),
            other => problems.push(Problem::new(
                other,
                format!("unknown key (expected one of: {})", TOP_LEVEL.join(", ")),
            )),
        }
    }
    flagged.extend(problems.iter().map(|p| p.path.clone()));
    raw.flagged = flagged;
    (Some(raw), problems)
}

fn scalar_string(key: &str, value: toml::Value, problems: &mut Vec<Problem>) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s),
        other => {
            problems.push(Problem::new(
                key,
                format!("expected a string, found {}", other.type_str()),
            ));
            None
        }
    }
}

/// Deserializes one section, reporting every bad key: after each error the offending key is
/// removed and the section is read again, so one typo does not hide the next. A key that
/// cannot be removed on its own goes with the top-level key of the section it is in (that key
/// is added to `flagged`); only an error at the section itself drops the section.
fn section<T: DeserializeOwned + Default>(
    name: &str,
    value: toml::Value,
    problems: &mut Vec<Problem>,
    flagged: &mut Vec<String>,
) -> Option<T> {
    let toml::Value::Table(mut table) = value else {
        problems.push(Problem::new(
            name,
            format!("expected a table `[{name}]`, found {}", value.type_str()),
        ));
        return None;
    };
    for _ in 0..64 {
        let de = toml::Value::Table(table.clone());
        match serde_path_to_error::deserialize::<_, T>(de) {
            Ok(v) => return Some(v),
            Err(err) => {
                let mut segments: Vec<String> = err
                    .path()
                    .iter()
                    .filter_map(|s| match s {
                        serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                        serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                        _ => None,
                    })
                    .collect();
                let inner = err.into_inner();
                let message = inner.message().to_string();
                // serde reports an unknown field at its parent's path; name the field itself.
                if let Some(field) = unknown_field_name(&message)
                    && segments.last().map(String::as_str) != Some(field.as_str())
                {
                    segments.push(field);
                }
                let path = std::iter::once(name.to_string())
                    .chain(segments.iter().cloned())
                    .collect::<Vec<_>>()
                    .join(".");
                problems.push(Problem::new(path, tidy_serde_message(&message)));
                if remove_path(&mut table, &segments) {
                    continue;
                }
                match segments.first() {
                    Some(top) if table.remove(top).is_some() => {
                        flagged.push(format!("{name}.{top}"));
                    }
                    _ => {
                        flagged.push(name.to_string());
                        return None;
                    }
                }
            }
        }
    }
    flagged.push(name.to_string());
    None
}

fn unknown_field_name(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

fn tidy_serde_message(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some(pos) = rest.find("`, expected ") {
            return format!("unknown key (expected {})", &rest[pos + 12..]);
        }
        return "unknown key".into();
    }
    message.to_string()
}

fn remove_path(table: &mut toml::Table, segments: &[String]) -> bool {
    match segments {
        [] => false,
        [last] => table.remove(last).is_some(),
        [first, rest @ ..] => match table.get_mut(first) {
            Some(toml::Value::Table(t)) => remove_path(t, rest),
            _ => false,
        },
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|p| p + 1).unwrap_or(0) + 1;
    (line, col)
}

// ---------------------------------------------------------------------------------------------
// Validation (pure)
// ---------------------------------------------------------------------------------------------

fn resolve(dir: &Path, p: &str) -> PathBuf {
    let path = Path::new(p);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        dir.join(path)
    }
}

fn seconds(v: f64) -> Option<Duration> {
    (v.is_finite() && v >= 0.0).then(|| Duration::from_secs_f64(v))
}

fn is_loopback_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    let Some(rest) = rest else { return false };
    let host = rest.split('/').next().unwrap_or("");
    let host = if host.starts_with('[') {
        host.split(']').next().map(|h| &h[1..]).unwrap_or("")
    } else {
        host.split(':').next().unwrap_or("")
    };
    matches!(host, "localhost" | "127.0.0.1" | "::1")
}

/// Checks the raw pipeline and builds it, with every problem found. The pipeline is built
/// even when there are problems, with a default in place of each bad or missing value, so the
/// environment checks can still look at the parts that are valid. Problems at paths parsing
/// rejected already (`raw.flagged`) are left out: they only restate that the value is gone.
fn validate(raw: RawPipeline, file: &Path, dir: &Path) -> (Pipeline, Vec<Problem>) {
    let mut p: Vec<Problem> = Vec::new();
    let mut need = |path: &str, present: bool| {
        if !present {
            p.push(Problem::new(path, "is required"));
        }
    };

    need("name", raw.name.is_some());
    need("[source]", raw.source.is_some());
    need("[provider]", raw.provider.is_some());
    need("[prompt]", raw.prompt.is_some());
    need("[output]", raw.output.is_some());

    let name_given = raw.name.is_some();
    let name = raw.name.unwrap_or_default();
    if !name.is_empty()
        && !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        p.push(Problem::new(
            "name",
            "use letters, digits, `-`, `_` and `.` only (it names files and store rows)",
        ));
    }
    if name_given && name.is_empty() {
        p.push(Problem::new("name", "must not be empty"));
    }

    // [source]
    let src = raw.source.unwrap_or_default();
    let kind = match src.kind.as_deref() {
        Some("jsonl") => Some(SourceKind::Jsonl),
        Some("csv") => Some(SourceKind::Csv),
        Some(other) => {
            p.push(Problem::new(
                "source.kind",
                format!("unknown kind `{other}` (expected `jsonl` or `csv`)"),
            ));
            None
        }
        None => {
            p.push(Problem::new(
                "source.kind",
                "is required (`jsonl` or `csv`)",
            ));
            None
        }
    };
    if src.path.is_none() {
        p.push(Problem::new("source.path", "is required"));
    }
    match src.id_field.as_deref() {
        None => p.push(Problem::new(
            "source.id_field",
            "is required (the field that identifies a record, e.g. \"sku\")",
        )),
        Some("") => p.push(Problem::new("source.id_field", "must not be empty")),
        _ => {}
    }
    let max_record_bytes = src
        .max_record_bytes
        .unwrap_or(DEFAULT_MAX_RECORD_BYTES as u64);
    if !(64..=(256u64 << 20)).contains(&max_record_bytes) {
        p.push(Problem::new(
            "source.max_record_bytes",
            "must be between 64 bytes and 256 MiB",
        ));
    }
    let delimiter = match src.delimiter.as_deref() {
        None => b',',
        Some("\\t") | Some("\t") => b'\t',
        Some(d) if d.len() == 1 && d.is_ascii() => d.as_bytes()[0],
        Some(d) => {
            p.push(Problem::new(
                "source.delimiter",
                format!("must be one ASCII character, got `{d}`"),
            ));
            b','
        }
    };
    if src.delimiter.is_some() && kind == Some(SourceKind::Jsonl) {
        p.push(Problem::new(
            "source.delimiter",
            "applies only to `kind = \"csv\"`",
        ));
    }

    let max_quarantined_share = match src.max_quarantined_share.map(|v| v.decimal()) {
        None => DEFAULT_MAX_QUARANTINED_SHARE,
        Some(Ok(d)) if d >= Decimal::ZERO && d <= Decimal::ONE => d,
        Some(Ok(d)) => {
            p.push(Problem::new(
                "source.max_quarantined_share",
                format!(
                    "must be between 0 and 1 (the share of the source's records: 0.05 = 5 %, 1 = no cap), got {d}"
                ),
            ));
            DEFAULT_MAX_QUARANTINED_SHARE
        }
        Some(Err(e)) => {
            p.push(Problem::new(
                "source.max_quarantined_share",
                format!("{e} (a ratio between 0 and 1, e.g. \"0.05\")"),
            ));
            DEFAULT_MAX_QUARANTINED_SHARE
        }
    };

    // [provider]
    let prov = raw.provider.unwrap_or_default();
    let pkind = match prov.kind.as_deref() {
        Some("openai") | None => ProviderKind::OpenAi,
        Some("azure") => ProviderKind::Azure,
        Some("anthropic") => ProviderKind::Anthropic,
        Some("gemini") => ProviderKind::Gemini,
        Some(other) => {
            p.push(Problem::new(
                "provider.kind",
                format!("unknown provider `{other}` (supported: openai, azure, anthropic, gemini)"),
            ));
            ProviderKind::OpenAi
        }
    };
    let mode = match prov.mode.as_deref() {
        None | Some("batch") => Mode::Batch,
        Some("online") => Mode::Online,
        Some(other) => {
            p.push(Problem::new(
                "provider.mode",
                format!("unknown mode `{other}` (batch or online)"),
            ));
            Mode::Batch
        }
    };
    if mode == Mode::Online && matches!(pkind, ProviderKind::Gemini) {
        p.push(Problem::new(
            "provider.mode",
            "online mode speaks OpenAI-compatible chat completions (openai, azure) and Anthropic messages",
        ));
    }
    if prov.deployment.is_some() && pkind != ProviderKind::Azure {
        p.push(Problem::new(
            "provider.deployment",
            "applies only to `kind = \"azure\"`",
        ));
    }
    if pkind == ProviderKind::Azure && prov.base_url.is_none() && !prov.simulate.unwrap_or(false) {
        p.push(Problem::new(
            "provider.base_url",
            "is required for Azure: your resource endpoint, e.g. \"https://my-resource.openai.azure.com\"",
        ));
    }
    let concurrency = prov.concurrency.unwrap_or(8);
    if !(1..=512).contains(&concurrency) {
        p.push(Problem::new(
            "provider.concurrency",
            "must be between 1 and 512",
        ));
    }
    if prov.requests_per_minute == Some(0) {
        p.push(Problem::new(
            "provider.requests_per_minute",
            "must be above 0",
        ));
    }
    if prov.tokens_per_minute == Some(0) {
        p.push(Problem::new(
            "provider.tokens_per_minute",
            "must be above 0",
        ));
    }
    if prov.retry_online_below.is_some() && mode == Mode::Online {
        p.push(Problem::new(
            "provider.retry_online_below",
            "applies to batch mode (online mode sends everything online already)",
        ));
    }
    match prov.model.as_deref() {
        None => p.push(Problem::new(
            "provider.model",
            "is required, e.g. \"gpt-5.4-mini\"",
        )),
        Some("") => p.push(Problem::new("provider.model", "must not be empty")),
        _ => {}
    }
    let simulate = prov.simulate.unwrap_or(false);
    if let Some(url) = &prov.base_url {
        let https = url.starts_with("https://");
        if !https && !is_loopback_url(url) {
            p.push(Problem::new(
                "provider.base_url",
                "must be an https:// URL (plain http is accepted only for a loopback address), so a typo cannot send the API key to the wrong host",
            ));
        }
        if simulate {
            p.push(Problem::new(
                "provider.base_url",
                "cannot be combined with `simulate = true` (the simulator runs on loopback)",
            ));
        }
    }
    let key = match (&prov.api_key_env, &prov.api_key_file) {
        (Some(_), Some(_)) => {
            p.push(Problem::new(
                "provider.api_key_file",
                "give either api_key_env or api_key_file, not both",
            ));
            KeySource::Env(String::new())
        }
        (None, Some(f)) => KeySource::File(resolve(dir, f)),
        (Some(v), None) => {
            if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                p.push(Problem::new(
                    "provider.api_key_env",
                    "must be the *name* of an environment variable (the key itself never goes in the pipeline file)",
                ));
            }
            KeySource::Env(v.clone())
        }
        (None, None) => KeySource::Env(pkind.default_key_env().into()),
    };
    let simulator = prov.simulator.unwrap_or_default();
    for (field, msg) in simulator.problems() {
        p.push(Problem::new(format!("provider.simulator.{field}"), msg));
    }
    let completion_window = prov.completion_window.unwrap_or_else(|| "24h".into());
    if completion_window != "24h" {
        p.push(Problem::new(
            "provider.completion_window",
            "batch APIs accept only \"24h\"",
        ));
    }
    let mut dur = |field: &str, v: Option<f64>, default: f64| -> Duration {
        match v {
            None => Duration::from_secs_f64(default),
            Some(x) => seconds(x).unwrap_or_else(|| {
                p.push(Problem::new(
                    format!("provider.{field}"),
                    format!("must be a number of seconds ≥ 0, got {x}"),
                ));
                Duration::from_secs_f64(default)
            }),
        }
    };
    // Against the simulator, poll briskly; against a real provider, politely.
    let (poll_min_d, poll_max_d) = if simulate { (0.05, 1.0) } else { (10.0, 300.0) };
    let poll_min = dur("poll_min_seconds", prov.poll_min_seconds, poll_min_d);
    let poll_max = dur("poll_max_seconds", prov.poll_max_seconds, poll_max_d);
    let request_timeout = dur(
        "request_timeout_seconds",
        prov.request_timeout_seconds,
        120.0,
    );
    let reconcile_grace = dur(
        "reconcile_grace_seconds",
        prov.reconcile_grace_seconds,
        if simulate { 0.0 } else { 60.0 },
    );
    let unreachable_timeout = dur(
        "unreachable_timeout_seconds",
        prov.unreachable_timeout_seconds,
        300.0,
    );
    if poll_max < poll_min {
        p.push(Problem::new(
            "provider.poll_max_seconds",
            "must not be below poll_min_seconds",
        ));
    }
    if unreachable_timeout.is_zero() {
        p.push(Problem::new(
            "provider.unreachable_timeout_seconds",
            "must be above 0",
        ));
    }
    if request_timeout.is_zero() {
        p.push(Problem::new(
            "provider.request_timeout_seconds",
            "must be above 0",
        ));
    }
    let max_download_bytes = prov.max_download_bytes.unwrap_or(4 << 30);

    // [prompt]
    let prompt = raw.prompt.unwrap_or_default();
    let user_text = prompt.user.unwrap_or_default();
    let user = match Template::parse(&user_text) {
        Ok(t) => {
            if user_text.is_empty() {
                p.push(Problem::new(
                    "prompt.user",
                    "is required: the user message template, with {{field}} placeholders",
                ));
            } else if !t.has_fields() {
                p.push(Problem::new(
                    "prompt.user",
                    "uses no {{field}} placeholder, so every record would be the same request",
                ));
            }
            t
        }
        Err(e) => {
            p.push(Problem::new("prompt.user", e));
            Template::parse("").expect("empty template parses")
        }
    };
    let max_output_tokens = prompt.max_output_tokens.unwrap_or(0);
    if prompt.max_output_tokens.is_none() {
        p.push(Problem::new(
            "prompt.max_output_tokens",
            "is required: it bounds the cost of every request",
        ));
    } else if max_output_tokens == 0 || max_output_tokens > 1_000_000 {
        p.push(Problem::new(
            "prompt.max_output_tokens",
            "must be between 1 and 1000000",
        ));
    }
    if let Some(t) = prompt.temperature
        && !(0.0..=2.0).contains(&t)
    {
        p.push(Problem::new(
            "prompt.temperature",
            format!("must be between 0 and 2, got {t}"),
        ));
    }

    // [output]
    let out = raw.output.unwrap_or_default();
    if out.schema.is_none() {
        p.push(Problem::new(
            "output.schema",
            "is required: the JSON Schema every answer is validated against",
        ));
    }
    if out.path.is_none() {
        p.push(Problem::new(
            "output.path",
            "is required: where one result line per source record is written",
        ));
    }

    // [retry]
    let max_attempts = raw.retry.and_then(|r| r.max_attempts).unwrap_or(3);
    if !(1..=20).contains(&max_attempts) {
        p.push(Problem::new(
            "retry.max_attempts",
            "must be between 1 and 20",
        ));
    }

    // [batch]
    let b = raw.batch.unwrap_or_default();
    let (limit_requests, limit_bytes) = pkind.batch_limits();
    let max_requests = b.max_requests.unwrap_or(limit_requests as u64);
    if max_requests == 0 || max_requests > limit_requests as u64 {
        p.push(Problem::new(
            "batch.max_requests",
            format!(
                "must be between 1 and {limit_requests} ({}'s limit)",
                pkind.as_str()
            ),
        ));
    }
    let max_bytes = b.max_bytes.unwrap_or(limit_bytes);
    if !(1024..=limit_bytes).contains(&max_bytes) {
        p.push(Problem::new(
            "batch.max_bytes",
            format!(
                "must be between 1024 and {limit_bytes} ({}'s limit)",
                pkind.as_str()
            ),
        ));
    }

    let pricing_file = raw.pricing.and_then(|x| x.file).map(|f| resolve(dir, &f));

    // [budget]
    let b = raw.budget.unwrap_or_default();
    let mut money = |field: &str, v: Option<DecimalText>| -> Option<Usd> {
        let v = v?;
        match Usd::parse(&v.0) {
            Ok(u) if u.pico() > 0 => Some(u),
            Ok(_) => {
                p.push(Problem::new(format!("budget.{field}"), "must be above 0"));
                None
            }
            Err(e) => {
                p.push(Problem::new(format!("budget.{field}"), e.to_string()));
                None
            }
        }
    };
    let budget = Budget {
        max: money("max_usd", b.max_usd),
        max_item: money("max_item_usd", b.max_item_usd),
    };

    // [plan]
    let pl = raw.plan.unwrap_or_default();
    let timing = match pl.timing.as_deref() {
        None | Some("scheduled") => Timing::Scheduled,
        Some("realtime") => Timing::Realtime,
        Some("queued") => Timing::Queued,
        Some("backfill") => Timing::Backfill,
        Some(other) => {
            p.push(Problem::new(
                "plan.timing",
                format!("unknown timing `{other}` (realtime, queued, scheduled or backfill)"),
            ));
            Timing::Scheduled
        }
    };
    let mut ratio = |field: &str, v: Option<DecimalText>, default: Decimal| -> Decimal {
        let Some(v) = v else { return default };
        match v.decimal() {
            Ok(d) if d >= Decimal::ZERO && d <= Decimal::from(10) => d,
            Ok(d) => {
                p.push(Problem::new(
                    format!("plan.{field}"),
                    format!("must be between 0 and 10 (a ratio: 0.05 = 5 %), got {d}"),
                ));
                default
            }
            Err(e) => {
                p.push(Problem::new(format!("plan.{field}"), e.to_string()));
                default
            }
        }
    };
    let retry_rate_given = pl.retry_rate.is_some();
    let retry_rate = ratio("retry_rate", pl.retry_rate, Decimal::new(5, 2));
    let safety_margin = ratio("safety_margin", pl.safety_margin, Decimal::new(10, 2));
    if let Some(t) = pl.expected_output_tokens
        && t > max_output_tokens
        && max_output_tokens > 0
    {
        p.push(Problem::new(
            "plan.expected_output_tokens",
            "cannot exceed prompt.max_output_tokens",
        ));
    }
    let plan = PlanSettings {
        timing,
        unit: pl.unit.unwrap_or_else(|| "record".into()),
        expected_output_tokens: pl.expected_output_tokens,
        retry_rate: retry_rate_given.then_some(retry_rate),
        safety_margin,
    };

    p.retain(|x| !is_flagged(&raw.flagged, &x.path));
    let pipeline = Pipeline {
        name,
        description: raw.description,
        file: file.to_path_buf(),
        dir: dir.to_path_buf(),
        source: SourceConfig {
            kind: kind.unwrap_or(SourceKind::Jsonl),
            path: resolve(dir, src.path.as_deref().unwrap_or_default()),
            id_field: src.id_field.unwrap_or_default(),
            max_record_bytes: max_record_bytes as usize,
            delimiter,
            max_quarantined_share,
        },
        provider: ProviderConfig {
            kind: pkind,
            mode,
            model: prov.model.unwrap_or_default(),
            deployment: prov.deployment,
            api_version: prov.api_version.unwrap_or_else(|| "2024-10-21".into()),
            online: OnlineLimits {
                concurrency: concurrency as usize,
                requests_per_minute: prov.requests_per_minute,
                tokens_per_minute: prov.tokens_per_minute,
            },
            retry_online_below: prov.retry_online_below,
            base_url: prov.base_url.map(|u| u.trim_end_matches('/').to_string()),
            key,
            simulate,
            simulator,
            completion_window,
            poll_min,
            poll_max,
            request_timeout,
            unreachable_timeout,
            reconcile_grace,
            max_download_bytes,
        },
        prompt: PromptConfig {
            system: prompt.system.filter(|s| !s.is_empty()),
            user,
            user_text,
            max_output_tokens,
            temperature: prompt.temperature,
        },
        output: OutputConfig {
            schema: resolve(dir, out.schema.as_deref().unwrap_or_default()),
            path: resolve(dir, out.path.as_deref().unwrap_or_default()),
        },
        max_attempts,
        batch: BatchLimits {
            max_requests: max_requests as usize,
            max_bytes,
        },
        pricing_file,
        budget,
        plan,
    };
    (pipeline, p)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
[source]
kind = "jsonl"
path = "data/in.jsonl"
id_field = "id"
[provider]
kind = "openai"
model = "gpt-5.4-mini"
simulate = true
[provider.simulator]
fail_rate = 0.1
[prompt]
system = "You tag things."
user = "Tag: {{text}}"
max_output_tokens = 100
[output]
schema = "s.json"
path = "out/r.jsonl"
"#;

    #[test]
    fn a_good_file_builds_with_paths_resolved_against_its_folder() {
        let p = Pipeline::from_str(GOOD, Path::new("/srv/jobs/t.toml")).unwrap();
        assert_eq!(p.source.path, Path::new("/srv/jobs/data/in.jsonl"));
        assert_eq!(p.output.schema, Path::new("/srv/jobs/s.json"));
        assert_eq!(p.batch.max_requests, OPENAI_MAX_REQUESTS);
        assert_eq!(p.batch.max_bytes, OPENAI_MAX_BYTES);
        assert_eq!(p.max_attempts, 3);
        assert_eq!(p.provider.simulator.fail_rate, 0.1);
        assert_eq!(p.provider.key, KeySource::Env("OPENAI_API_KEY".into()));
    }

    #[test]
    fn every_problem_is_reported_with_its_toml_path() {
        let bad = r#"
name = "t"
colour = "blue"
[source]
kind = "xml"
path = 12
id_field = "id"
extra = 1
[provider]
model = "gpt-5.4-mini"
base_url = "http://api.example.com/v1"
api_key_env = "sk-live-123"
[provider.simulator]
fail_rate = 3.0
typo_rate = 0.1
[prompt]
user = "no placeholders"
max_output_tokens = 0
[retry]
max_attempts = 0
"#;
        let err = Pipeline::from_str(bad, Path::new("bad.toml")).unwrap_err();
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        for expected in [
            "colour",
            "source.kind",
            "source.path",
            "source.extra",
            "provider.base_url",
            "provider.api_key_env",
            "provider.simulator.typo_rate",
            "provider.simulator.fail_rate",
            "prompt.user",
            "prompt.max_output_tokens",
            "[output]",
            "retry.max_attempts",
        ] {
            assert!(paths.contains(&expected), "missing {expected} in {paths:?}");
        }
        let text = err.to_string();
        assert!(text.starts_with("bad.toml: "), "{text}");
    }

    fn with_source_line(extra: &str) -> String {
        GOOD.replace(
            "id_field = \"id\"\n",
            &format!("id_field = \"id\"\n{extra}\n"),
        )
    }

    #[test]
    fn the_quarantined_share_defaults_to_half_and_takes_ratios() {
        let p = Pipeline::from_str(GOOD, Path::new("t.toml")).unwrap();
        assert_eq!(p.source.max_quarantined_share, Decimal::new(5, 1));
        for (text, want) in [
            ("\"0.05\"", Decimal::new(5, 2)),
            ("0.2", Decimal::new(2, 1)),
            ("0", Decimal::ZERO),
            ("1", Decimal::ONE),
        ] {
            let file = with_source_line(&format!("max_quarantined_share = {text}"));
            let p = Pipeline::from_str(&file, Path::new("t.toml")).unwrap();
            assert_eq!(p.source.max_quarantined_share, want, "{text}");
        }
        for (text, says) in [
            ("1.5", "between 0 and 1"),
            ("-0.1", "between 0 and 1"),
            ("\"half\"", "ratio"),
            ("\"\"", "ratio"),
            ("true", "decimal"),
        ] {
            let file = with_source_line(&format!("max_quarantined_share = {text}"));
            let err = Pipeline::from_str(&file, Path::new("t.toml")).unwrap_err();
            assert_eq!(err.problems.len(), 1, "{text}: {err}");
            assert_eq!(
                err.problems[0].path, "source.max_quarantined_share",
                "{err}"
            );
            assert!(err.problems[0].message.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn a_rejected_value_is_reported_once_not_again_as_missing() {
        let file = GOOD
            .replace("path = \"data/in.jsonl\"", "path = 12")
            .replace("max_output_tokens = 100", "max_output_tokens = \"lots\"");
        let err = Pipeline::from_str(&file, Path::new("t.toml")).unwrap_err();
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["prompt.max_output_tokens", "source.path"], "{err}");
        // A section that is not a table is one problem, not one per key it should hold.
        let file = format!("{GOOD}\n").replace(
            "[output]\nschema = \"s.json\"\npath = \"out/r.jsonl\"\n",
            "",
        );
        let file = file.replace("name = \"t\"", "name = \"t\"\noutput = \"out.jsonl\"");
        let err = Pipeline::from_str(&file, Path::new("t.toml")).unwrap_err();
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["output"], "{err}");
    }

    #[test]
    fn flagged_paths_cover_what_lies_inside_them() {
        let flagged = vec!["[source]".to_string(), "provider.model".to_string()];
        assert!(is_flagged(&flagged, "source.path"));
        assert!(is_flagged(&flagged, "source"));
        assert!(is_flagged(&["source".to_string()], "[source]"));
        assert!(is_flagged(&flagged, "provider.model"));
        assert!(!is_flagged(&flagged, "provider.models"));
        assert!(!is_flagged(&flagged, "provider.kind"));
        assert!(!is_flagged(&["".to_string()], "name"));
    }

    /// A folder with a pipeline file whose source, schema and key are all in order.
    fn workspace(records: &str, user: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("data/in.jsonl"), records).unwrap();
        std::fs::write(dir.path().join("s.json"), r#"{"type": "object"}"#).unwrap();
        let file = dir.path().join("t.toml");
        std::fs::write(&file, GOOD.replace("Tag: {{text}}", user)).unwrap();
        (dir, file)
    }

    #[test]
    fn check_file_runs_the_environment_checks_despite_structural_problems() {
        let (dir, file) = workspace("{\"id\": 1, \"text\": \"a\"}\n", "Tag: {{text}}");
        assert!(Pipeline::check_file(&file, None).is_ok());

        std::fs::remove_file(dir.path().join("data/in.jsonl")).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, text + "\n[retry]\nmax_attempts = 0\n").unwrap();
        let err = Pipeline::check_file(&file, None).unwrap_err();
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["retry.max_attempts", "source.path"], "{err}");
        // `load` (and so `run`) still refuses the file.
        assert!(Pipeline::load(&file).is_err());
    }

    #[test]
    fn checks_that_depend_on_a_bad_value_are_skipped() {
        let (_dir, file) = workspace("{\"id\": 1, \"text\": \"a\"}\n", "Tag: {{text}}");
        let text = std::fs::read_to_string(&file)
            .unwrap()
            .replace("kind = \"openai\"", "kind = \"openia\"")
            .replace("simulate = true", "simulate = false")
            .replace("schema = \"s.json\"", "schema = 7")
            .replace("kind = \"jsonl\"", "kind = \"jsnl\"");
        std::fs::write(&file, text).unwrap();
        let err = Pipeline::check_file(&file, None).unwrap_err();
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        // No key, price, schema or source-content checks on values that are wrong already.
        assert_eq!(
            paths,
            ["output.schema", "source.kind", "provider.kind"],
            "{err}"
        );
    }

    #[test]
    fn a_template_field_no_record_has_is_a_problem_with_a_suggestion() {
        let records = "{\"id\": 1, \"material\": \"oak\"}\n{\"id\": 2, \"material\": \"ash\", \"text\": \"x\"}\n";
        let (_dir, file) = workspace(records, "{{materail}} {{text}} {{colour?}}");
        let err = Pipeline::check_file(&file, None).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        let problem = &err.problems[0];
        assert_eq!(problem.path, "prompt.user");
        for needle in [
            "`materail`",
            "did you mean `material`?",
            "id, material, text",
            "first 2 records",
        ] {
            assert!(problem.message.contains(needle), "{needle}: {problem}");
        }
        let (_dir, file) = workspace(records, "{{materail?}} {{material}}");
        assert!(Pipeline::check_file(&file, None).is_ok());
        // The records are read as the run reads them: lines that would be quarantined are
        // not part of the sample, and a source with no usable line at all is a problem.
        let (_dir, file) = workspace("{\"id\": 1, \"text\": \"a\"\nnot json\n", "{{text}}");
        let err = Pipeline::check_file(&file, None).unwrap_err();
        assert_eq!(err.problems[0].path, "source.path", "{err}");
        assert!(
            err.to_string().contains("none of the first 2 lines"),
            "{err}"
        );
        let (_dir, file) = workspace("", "{{text}}");
        assert!(
            Pipeline::check_file(&file, None).is_ok(),
            "an empty source has nothing to run"
        );
    }

    #[test]
    fn toml_syntax_errors_give_line_and_column() {
        let err = Pipeline::from_str("name = \"x\"\n[source\n", Path::new("x.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn loopback_urls_are_recognised() {
        assert!(is_loopback_url("http://127.0.0.1:8080/v1"));
        assert!(is_loopback_url("http://localhost/v1"));
        assert!(is_loopback_url("http://[::1]:9/v1"));
        assert!(!is_loopback_url("http://127.0.0.1.evil.com/v1"));
        assert!(!is_loopback_url("ftp://localhost"));
    }
}
