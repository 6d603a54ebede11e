//! The raw layer of a pipeline file: serde structs that mirror the TOML (every field
//! optional, unknown keys refused), parsed one section at a time so that one bad key does not
//! hide the next; each problem carries its TOML path and, for syntax errors, line and column.

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::Problem;
use crate::cost::money::DecimalText;
use crate::sim::SimSettings;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
    pub(super) kind: Option<String>,
    pub(super) path: Option<String>,
    pub(super) id_field: Option<String>,
    pub(super) max_record_bytes: Option<u64>,
    pub(super) delimiter: Option<String>,
    pub(super) max_quarantined_share: Option<DecimalText>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProvider {
    pub(super) kind: Option<String>,
    pub(super) model: Option<String>,
    pub(super) base_url: Option<String>,
    pub(super) api_key_env: Option<String>,
    pub(super) api_key_file: Option<String>,
    pub(super) simulate: Option<bool>,
    pub(super) simulator: Option<SimSettings>,
    pub(super) completion_window: Option<String>,
    pub(super) mode: Option<String>,
    pub(super) deployment: Option<String>,
    pub(super) api_version: Option<String>,
    pub(super) concurrency: Option<u32>,
    pub(super) requests_per_minute: Option<u32>,
    pub(super) tokens_per_minute: Option<u64>,
    pub(super) retry_online_below: Option<u64>,
    pub(super) poll_min_seconds: Option<f64>,
    pub(super) poll_max_seconds: Option<f64>,
    pub(super) request_timeout_seconds: Option<f64>,
    pub(super) unreachable_timeout_seconds: Option<f64>,
    pub(super) reconcile_grace_seconds: Option<f64>,
    pub(super) max_download_bytes: Option<u64>,
    pub(super) region: Option<String>,
    pub(super) role_arn: Option<String>,
    pub(super) input_s3_uri: Option<String>,
    pub(super) output_s3_uri: Option<String>,
    pub(super) endpoint_url: Option<String>,
    pub(super) s3_endpoint_url: Option<String>,
    pub(super) profile: Option<String>,
    pub(super) min_batch_records: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrompt {
    pub(super) system: Option<String>,
    pub(super) user: Option<String>,
    pub(super) max_output_tokens: Option<u32>,
    pub(super) temperature: Option<f64>,
}

/// `split = { field, max_tokens, overlap_tokens }` of a chunk stage.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSplit {
    pub(super) field: Option<String>,
    pub(super) max_tokens: Option<u32>,
    pub(super) overlap_tokens: Option<u32>,
}

/// The `[provider]` keys a stage may override.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStageProvider {
    pub(super) model: Option<String>,
    pub(super) kind: Option<String>,
    pub(super) mode: Option<String>,
}

/// One `[[stage]]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStage {
    pub(super) name: Option<String>,
    pub(super) for_each: Option<String>,
    pub(super) split: Option<RawSplit>,
    pub(super) needs: Option<Vec<String>>,
    pub(super) prompt: Option<RawPrompt>,
    pub(super) schema: Option<String>,
    pub(super) provider: Option<RawStageProvider>,
    pub(super) max_attempts: Option<u32>,
    pub(super) sample: Option<DecimalText>,
    pub(super) when: Option<String>,
    pub(super) on_fail: Option<String>,
    pub(super) expected_output_tokens: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutput {
    pub(super) schema: Option<String>,
    pub(super) path: Option<String>,
    pub(super) include_source: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetry {
    pub(super) max_attempts: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBatch {
    pub(super) max_requests: Option<u64>,
    pub(super) max_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPricing {
    pub(super) file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBudget {
    pub(super) max_usd: Option<DecimalText>,
    pub(super) max_item_usd: Option<DecimalText>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCleanup {
    pub(super) after_run: Option<bool>,
    pub(super) older_than: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPlan {
    pub(super) timing: Option<String>,
    pub(super) unit: Option<String>,
    pub(super) expected_output_tokens: Option<u32>,
    pub(super) retry_rate: Option<DecimalText>,
    pub(super) safety_margin: Option<DecimalText>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReport {
    pub(super) html: Option<String>,
}

#[derive(Debug, Default)]
pub(super) struct RawPipeline {
    pub(super) name: Option<String>,
    pub(super) description: Option<String>,
    pub(super) source: Option<RawSource>,
    pub(super) provider: Option<RawProvider>,
    pub(super) prompt: Option<RawPrompt>,
    pub(super) output: Option<RawOutput>,
    pub(super) retry: Option<RawRetry>,
    pub(super) batch: Option<RawBatch>,
    pub(super) pricing: Option<RawPricing>,
    pub(super) budget: Option<RawBudget>,
    pub(super) plan: Option<RawPlan>,
    pub(super) report: Option<RawReport>,
    pub(super) cleanup: Option<RawCleanup>,
    /// `[[stage]]` tables, in file order, each with the TOML path its problems are named by
    /// (`stage.<name>`, or `stage.<n>` for one without a name; n counts from 1).
    pub(super) stages: Vec<(String, RawStage)>,
    /// Whether the file has `[[stage]]` tables at all (even ones that failed to parse).
    pub(super) staged: bool,
    /// TOML paths whose values parsing rejected (or whose whole section it dropped): the
    /// checks after it say nothing more about them.
    pub(super) flagged: Vec<String>,
}

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
    "report",
    "stage",
    "cleanup",
];

pub(super) fn parse(text: &str) -> (Option<RawPipeline>, Vec<Problem>) {
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
            "report" => raw.report = section(&key, value, p, f),
            "cleanup" => raw.cleanup = section(&key, value, p, f),
            "stage" => {
                raw.staged = true;
                raw.stages = stages(value, p, f);
            }
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

/// The `[[stage]]` array: each table parsed as a section of its own, named by its `name`.
fn stages(
    value: toml::Value,
    problems: &mut Vec<Problem>,
    flagged: &mut Vec<String>,
) -> Vec<(String, RawStage)> {
    let toml::Value::Array(items) = value else {
        problems.push(Problem::new(
            "stage",
            format!("expected `[[stage]]` tables, found {}", value.type_str()),
        ));
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let path = match item.get("name").and_then(|n| n.as_str()) {
            Some(name) if !name.is_empty() && !name.contains('.') => format!("stage.{name}"),
            _ => format!("stage.{}", i + 1),
        };
        if let Some(s) = section::<RawStage>(&path, item, problems, flagged) {
            out.push((path, s));
        }
    }
    out
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
