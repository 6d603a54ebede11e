//! The planning worksheet: what a job will cost before anything is spent.
//!
//! Computed, never typed: the source is read and rendered exactly as a run would (records,
//! quarantine, dedupe), every request's prompt tokens are counted with the model's tokenizer,
//! and the store (when there is one) says which items are already done and what earlier runs
//! of the pipeline measured — output tokens per call, retry rate. Where there is no history,
//! the pipeline's `[plan]` settings stand in, and the worksheet says which figure came from
//! where.
//!
//! Expected cost = items to send × (mean input × input price + output per call × output
//! price) × (1 + retry rate). Worst case = every item at its counted input tokens plus
//! `max_output_tokens`, on every attempt up to `max_attempts` (exact, in pico-dollars).
//! Forecasts = cost per processed item (one attempt) × items × (1 + retry rate) × (1 +
//! safety margin).

use std::collections::HashMap;
use std::fmt::Write as _;

use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::{Value, json};

use crate::config::Pipeline;
use crate::cost::tokens::PromptCounter;
use crate::cost::{ModelPrice, PricingMode, Rates, Usd};
use crate::request::{RequestShape, prepare};
use crate::source::{SourceError, SourceEvent, SourceReader};
pub use crate::store::History;

/// What a source holds, as a run would see it.
#[derive(Clone, Debug, Default)]
pub struct SourceScan {
    pub records_read: u64,
    pub quarantined: u64,
    /// Distinct items: key → (prompt tokens, records sharing it).
    pub items: HashMap<[u8; 32], (u64, u64)>,
}

impl SourceScan {
    pub fn valid(&self) -> u64 {
        self.records_read - self.quarantined
    }
}

/// Reads and renders the whole source, counting every request's prompt tokens. Memory: one
/// entry (key, tokens, count) per distinct item.
pub fn scan_source(
    p: &Pipeline,
    shape: &RequestShape,
    counter: &PromptCounter,
) -> Result<SourceScan, SourceError> {
    let mut scan = SourceScan::default();
    let mut scratch = String::new();
    for ev in SourceReader::open(&p.source)? {
        scan.records_read += 1;
        match ev? {
            SourceEvent::Record(r) => {
                match prepare(
                    shape,
                    &p.first_stage().prompt.user,
                    Some(counter),
                    r.line,
                    r.id,
                    &r.value,
                    &mut scratch,
                ) {
                    Ok(rec) => {
                        scan.items
                            .entry(rec.key)
                            .and_modify(|e| e.1 += 1)
                            .or_insert((rec.input_tokens, 1));
                    }
                    Err(_) => scan.quarantined += 1,
                }
            }
            SourceEvent::Quarantined(_) => scan.quarantined += 1,
        }
    }
    Ok(scan)
}

/// The facts a worksheet is computed from.
#[derive(Clone, Debug)]
pub struct PlanInputs<'a> {
    pub pipeline: &'a Pipeline,
    pub price: &'a ModelPrice,
    pub mode: PricingMode,
    pub exact_tokens: bool,
    pub records_read: u64,
    pub quarantined: u64,
    pub unique_items: u64,
    pub already_done: u64,
    /// Prompt tokens of each item still to send.
    pub todo_tokens: Vec<u64>,
    /// Source records whose item is still to send.
    pub todo_records: u64,
    /// Prompt tokens of every item of the job (the source's unique items, done or not):
    /// what the forecasts are made of, whatever is left to send tonight.
    pub job_tokens: Vec<u64>,
    /// Valid records of the job.
    pub job_records: u64,
    pub history: History,
    pub monthly_items: Option<u64>,
    pub backfill_items: Option<u64>,
}

/// A figure and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Sourced<T> {
    pub value: T,
    pub source: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Forecast {
    pub items: u64,
    pub cost: Decimal,
    pub standard_cost: Decimal,
}

/// The worksheet.
#[derive(Clone, Debug, PartialEq)]
pub struct Worksheet {
    pub job: String,
    pub timing: String,
    pub unit: String,
    pub model: String,
    pub pricing_mode: String,
    pub records_read: u64,
    pub quarantined: u64,
    pub records_valid: u64,
    pub unique_items: u64,
    pub already_done: u64,
    pub items_to_send: u64,
    pub records_to_process: u64,
    pub calls_per_item: u64,
    pub input_tokens_exact: bool,
    /// The per-call token figures are over the whole job (nothing is left to send).
    pub input_tokens_of_job: bool,
    pub input_tokens_total: u64,
    pub input_tokens_mean: Decimal,
    pub input_tokens_p95: u64,
    pub input_tokens_max: u64,
    pub output_tokens_per_call: Sourced<Decimal>,
    pub max_output_tokens: u64,
    pub validation: String,
    pub retry_rate: Sourced<Decimal>,
    pub max_attempts: u32,
    pub completion_window: String,
    pub safety_margin: Decimal,
    pub cost_per_call: Decimal,
    pub standard_cost_per_call: Decimal,
    pub expected_cost: Decimal,
    pub standard_expected_cost: Decimal,
    pub worst_case_cost: Usd,
    pub cost_per_processed_item: Decimal,
    pub standard_cost_per_processed_item: Decimal,
    pub monthly: Option<Forecast>,
    pub backfill: Option<Forecast>,
}

fn per_token(p: crate::cost::TokenPrice) -> Decimal {
    Decimal::from(p.pico_per_token()) / Decimal::from(1_000_000_000_000i64)
}

fn call_cost(rates: &Rates, input: Decimal, output: Decimal) -> Decimal {
    input * per_token(rates.input) + output * per_token(rates.output)
}

fn round(d: Decimal, places: u32) -> Decimal {
    d.round_dp_with_strategy(places, RoundingStrategy::MidpointAwayFromZero)
        .normalize()
}

impl Worksheet {
    pub fn compute(i: PlanInputs<'_>) -> Worksheet {
        let p = i.pipeline;
        let batch = i.price.rates(i.mode).copied().unwrap_or(i.price.standard);
        let standard = i.price.standard;
        let n = i.todo_tokens.len() as u64;
        let total: u64 = i.todo_tokens.iter().sum();
        // Per-call figures describe what is left to send; with nothing left, the job's own
        // items (whose tokens were counted all the same).
        let stats_of = if i.todo_tokens.is_empty() {
            &i.job_tokens
        } else {
            &i.todo_tokens
        };
        let mut sorted = stats_of.clone();
        sorted.sort_unstable();
        let p95 = if sorted.is_empty() {
            0
        } else {
            // nearest-rank percentile
            let rank = (sorted.len() * 95).div_ceil(100).max(1);
            sorted[rank - 1]
        };
        let max = sorted.last().copied().unwrap_or(0);
        let mean_of = |v: &[u64]| {
            if v.is_empty() {
                Decimal::ZERO
            } else {
                Decimal::from(v.iter().sum::<u64>()) / Decimal::from(v.len() as u64)
            }
        };
        let mean = mean_of(stats_of);
        let max_out = p.first_stage().prompt.max_output_tokens as u64;
        // Stated assumptions ([plan]) come first, so the forecast is the same on every
        // night; measured history fills in what the file leaves open and is shown beside.
        let measured_output = (i.history.answered > 0).then(|| {
            (Decimal::from(i.history.output_tokens) / Decimal::from(i.history.answered))
                .min(Decimal::from(max_out))
        });
        let output = if let Some(t) = p.plan.expected_output_tokens {
            Sourced {
                value: Decimal::from(t),
                source: match measured_output {
                    Some(m) => format!(
                        "plan.expected_output_tokens (measured {} over {} answers)",
                        round(m, 1),
                        i.history.answered
                    ),
                    None => "plan.expected_output_tokens".into(),
                },
            }
        } else if let Some(m) = measured_output {
            Sourced {
                value: m,
                source: format!("mean of {} earlier answers", i.history.answered),
            }
        } else {
            Sourced {
                value: Decimal::from(max_out),
                source: "no history and no plan.expected_output_tokens: max_output_tokens".into(),
            }
        };
        let measured_retry = (i.history.items_attempted > 0).then(|| {
            Decimal::from(i.history.attempts.saturating_sub(i.history.items_attempted))
                / Decimal::from(i.history.items_attempted)
        });
        let retry = match (p.plan.retry_rate, measured_retry) {
            (Some(r), Some(m)) => Sourced {
                value: r,
                source: format!(
                    "plan.retry_rate (measured {}% over {} items)",
                    round(m * Decimal::from(100), 2),
                    i.history.items_attempted
                ),
            },
            (Some(r), None) => Sourced {
                value: r,
                source: "plan.retry_rate".into(),
            },
            (None, Some(m)) => Sourced {
                value: m,
                source: format!(
                    "{} earlier attempts on {} items",
                    i.history.attempts, i.history.items_attempted
                ),
            },
            (None, None) => Sourced {
                value: Decimal::new(5, 2),
                source: "default (no history, no plan.retry_rate)".into(),
            },
        };
        let one = Decimal::ONE;
        let cost_per_call = call_cost(&batch, mean, output.value);
        let standard_cost_per_call = call_cost(&standard, mean, output.value);
        let attempts_factor = one + retry.value;
        let todo_mean = mean_of(&i.todo_tokens);
        let expected =
            Decimal::from(n) * call_cost(&batch, todo_mean, output.value) * attempts_factor;
        let standard_expected =
            Decimal::from(n) * call_cost(&standard, todo_mean, output.value) * attempts_factor;
        // Exact: each item at its own input tokens plus the full output budget, every attempt.
        let worst_one: Usd = batch.input.cost(total) + batch.output.cost(max_out * n);
        let worst = Usd::from_pico(worst_one.pico() * p.first_stage().max_attempts as i128);
        // Per processed item, and the forecasts, come from the whole job: all its unique
        // items over all its records (duplicates ride along for free).
        let job_n = i.job_tokens.len() as u64;
        let job_mean = mean_of(&i.job_tokens);
        let per_record = |per_call: Decimal| {
            if i.job_records == 0 {
                Decimal::ZERO
            } else {
                Decimal::from(job_n) * per_call / Decimal::from(i.job_records)
            }
        };
        let base = per_record(call_cost(&batch, job_mean, output.value));
        let base_std = per_record(call_cost(&standard, job_mean, output.value));
        let cost_per_item = base * attempts_factor;
        let std_per_item = base_std * attempts_factor;
        let margin = one + p.plan.safety_margin;
        let forecast = |items: u64| Forecast {
            items,
            cost: base * Decimal::from(items) * attempts_factor * margin,
            standard_cost: base_std * Decimal::from(items) * attempts_factor * margin,
        };
        Worksheet {
            job: p.name.clone(),
            timing: p.plan.timing.as_str().into(),
            unit: p.plan.unit.clone(),
            model: p.provider.model.clone(),
            pricing_mode: i.mode.as_str().into(),
            records_read: i.records_read,
            quarantined: i.quarantined,
            records_valid: i.records_read - i.quarantined,
            unique_items: i.unique_items,
            already_done: i.already_done,
            items_to_send: n,
            records_to_process: i.todo_records,
            calls_per_item: 1,
            input_tokens_exact: i.exact_tokens,
            input_tokens_of_job: i.todo_tokens.is_empty() && !i.job_tokens.is_empty(),
            input_tokens_total: total,
            input_tokens_mean: mean,
            input_tokens_p95: p95,
            input_tokens_max: max,
            output_tokens_per_call: output,
            max_output_tokens: max_out,
            validation: format!(
                "JSON Schema {} (+ finish_reason, refusal)",
                p.first_stage()
                    .schema
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ),
            retry_rate: retry,
            max_attempts: p.first_stage().max_attempts,
            completion_window: p.provider.completion_window.clone(),
            safety_margin: p.plan.safety_margin,
            cost_per_call,
            standard_cost_per_call,
            expected_cost: expected,
            standard_expected_cost: standard_expected,
            worst_case_cost: worst,
            cost_per_processed_item: cost_per_item,
            standard_cost_per_processed_item: std_per_item,
            monthly: i.monthly_items.map(forecast),
            backfill: i.backfill_items.map(forecast),
        }
    }

    /// (figure, value, note) rows, in worksheet order.
    pub fn rows(&self) -> Vec<(String, String, String)> {
        let usd = |d: Decimal| format!("${}", round(d, 6));
        let mut r: Vec<(String, String, String)> = vec![
            ("job".into(), self.job.clone(), String::new()),
            ("timing model".into(), self.timing.clone(), String::new()),
            ("processed item".into(), self.unit.clone(), String::new()),
            (
                "model".into(),
                format!("{} ({} prices)", self.model, self.pricing_mode),
                String::new(),
            ),
            (
                "records read".into(),
                self.records_read.to_string(),
                String::new(),
            ),
            (
                "records quarantined".into(),
                self.quarantined.to_string(),
                String::new(),
            ),
            (
                "unique items after dedupe".into(),
                self.unique_items.to_string(),
                format!("{} records", self.records_valid),
            ),
            (
                "already done in the store".into(),
                self.already_done.to_string(),
                String::new(),
            ),
            (
                "items to send".into(),
                self.items_to_send.to_string(),
                format!("{} records", self.records_to_process),
            ),
            (
                "calls per item".into(),
                self.calls_per_item.to_string(),
                String::new(),
            ),
            (
                "input tokens per call".into(),
                format!(
                    "mean {} · p95 {} · max {}",
                    round(self.input_tokens_mean, 1),
                    self.input_tokens_p95,
                    self.input_tokens_max
                ),
                format!(
                    "{}{}",
                    if self.input_tokens_exact {
                        "counted with the model's tokenizer"
                    } else {
                        "estimate (no tokenizer for this model)"
                    },
                    if self.input_tokens_of_job {
                        "; over all the job's items (none left to send)"
                    } else {
                        ""
                    }
                ),
            ),
            (
                "output tokens per call".into(),
                round(self.output_tokens_per_call.value, 1).to_string(),
                format!(
                    "{}; at most {}",
                    self.output_tokens_per_call.source, self.max_output_tokens
                ),
            ),
            ("validation".into(), self.validation.clone(), String::new()),
            (
                "retry rate".into(),
                format!("{}%", round(self.retry_rate.value * Decimal::from(100), 2)),
                self.retry_rate.source.clone(),
            ),
            (
                "max attempts".into(),
                self.max_attempts.to_string(),
                String::new(),
            ),
            (
                "completion window".into(),
                self.completion_window.clone(),
                String::new(),
            ),
            (
                "safety margin".into(),
                format!("{}%", round(self.safety_margin * Decimal::from(100), 2)),
                "forecasts only".into(),
            ),
            (
                "cost per call".into(),
                usd(self.cost_per_call),
                format!("{} at standard prices", usd(self.standard_cost_per_call)),
            ),
            (
                "expected cost".into(),
                usd(self.expected_cost),
                format!("{} at standard prices", usd(self.standard_expected_cost)),
            ),
            (
                "worst-case cost".into(),
                self.worst_case_cost.display_rounded(6),
                "every call at max_output_tokens, every attempt".into(),
            ),
            (
                "cost per processed item".into(),
                usd(self.cost_per_processed_item),
                format!(
                    "{} at standard prices",
                    usd(self.standard_cost_per_processed_item)
                ),
            ),
            (
                "batch saving".into(),
                usd(self.standard_expected_cost - self.expected_cost),
                format!(
                    "{} per processed item",
                    usd(self.standard_cost_per_processed_item - self.cost_per_processed_item)
                ),
            ),
        ];
        for (name, f) in [
            ("monthly forecast", &self.monthly),
            ("backfill (one time)", &self.backfill),
        ] {
            if let Some(f) = f {
                r.push((
                    name.into(),
                    usd(f.cost),
                    format!(
                        "{} items; {} at standard prices, saving {}",
                        f.items,
                        usd(f.standard_cost),
                        usd(f.standard_cost - f.cost)
                    ),
                ));
            }
        }
        r
    }

    pub fn to_table(&self) -> String {
        let rows = self.rows();
        let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let w1 = rows.iter().map(|r| r.1.chars().count()).max().unwrap_or(0);
        let mut s = String::new();
        for (a, b, c) in rows {
            let pad = w1 - b.chars().count();
            let _ = writeln!(s, "{a:<w0$}  {b}{}  {c}", " ".repeat(pad));
        }
        s
    }

    pub fn to_markdown(&self) -> String {
        let esc = |t: &str| t.replace('|', "\\|");
        let mut s = String::from("| figure | value | note |\n|---|---|---|\n");
        for (a, b, c) in self.rows() {
            let _ = writeln!(s, "| {} | {} | {} |", esc(&a), esc(&b), esc(&c));
        }
        s
    }

    pub fn to_csv(&self) -> String {
        let mut w = csv::Writer::from_writer(Vec::new());
        let _ = w.write_record(["figure", "value", "note"]);
        for (a, b, c) in self.rows() {
            let _ = w.write_record([guard(&a), guard(&b), guard(&c)]);
        }
        String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
    }

    pub fn to_json(&self) -> Value {
        let d = |x: Decimal| round(x, 12).to_string();
        let forecast = |f: &Option<Forecast>| {
            f.as_ref().map(|f| {
                json!({"items": f.items, "cost_usd": d(f.cost), "standard_cost_usd": d(f.standard_cost),
                    "saving_usd": d(f.standard_cost - f.cost)})
            })
        };
        json!({
            "job": self.job,
            "timing": self.timing,
            "processed_item": self.unit,
            "model": self.model,
            "pricing_mode": self.pricing_mode,
            "records": {"read": self.records_read, "quarantined": self.quarantined, "valid": self.records_valid, "to_process": self.records_to_process},
            "items": {"unique": self.unique_items, "already_done": self.already_done, "to_send": self.items_to_send},
            "calls_per_item": self.calls_per_item,
            "input_tokens_per_call": {
                "exact": self.input_tokens_exact, "total": self.input_tokens_total,
                "mean": d(self.input_tokens_mean), "p95": self.input_tokens_p95, "max": self.input_tokens_max,
            },
            "output_tokens_per_call": {"value": d(self.output_tokens_per_call.value), "source": self.output_tokens_per_call.source, "max": self.max_output_tokens},
            "validation": self.validation,
            "retry_rate": {"value": d(self.retry_rate.value), "source": self.retry_rate.source},
            "max_attempts": self.max_attempts,
            "completion_window": self.completion_window,
            "safety_margin": d(self.safety_margin),
            "cost_per_call_usd": d(self.cost_per_call),
            "standard_cost_per_call_usd": d(self.standard_cost_per_call),
            "expected_cost_usd": d(self.expected_cost),
            "standard_expected_cost_usd": d(self.standard_expected_cost),
            "saving_usd": d(self.standard_expected_cost - self.expected_cost),
            "worst_case_cost_usd": self.worst_case_cost.to_decimal_string(),
            "cost_per_processed_item_usd": d(self.cost_per_processed_item),
            "standard_cost_per_processed_item_usd": d(self.standard_cost_per_processed_item),
            "monthly": forecast(&self.monthly),
            "backfill": forecast(&self.backfill),
        })
    }
}

/// The figures of a stored worksheet ([`Worksheet::to_json`]) that `reconcile` holds a run
/// against. Read here, beside the writer, so the JSON's shape has one owner.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoredPlan {
    pub items_to_send: Option<u64>,
    pub records_to_process: Option<u64>,
    pub input_tokens_mean: Option<Decimal>,
    pub output_tokens_per_call: Option<Decimal>,
    pub retry_rate: Option<Decimal>,
    pub expected_cost: Option<Decimal>,
    pub worst_case_cost: Option<Decimal>,
    pub model: Option<String>,
    pub pricing_mode: Option<String>,
}

impl StoredPlan {
    /// Reads what a run stored (`None` fields where it stored nothing, or is older).
    pub fn parse(text: Option<&str>) -> StoredPlan {
        let v: Value = text
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or(Value::Null);
        let dec = |v: &Value| v.as_str().and_then(|s| s.parse::<Decimal>().ok());
        StoredPlan {
            items_to_send: v["items"]["to_send"].as_u64(),
            records_to_process: v["records"]["to_process"].as_u64(),
            input_tokens_mean: dec(&v["input_tokens_per_call"]["mean"]),
            output_tokens_per_call: dec(&v["output_tokens_per_call"]["value"]),
            retry_rate: dec(&v["retry_rate"]["value"]),
            expected_cost: dec(&v["expected_cost_usd"]),
            worst_case_cost: dec(&v["worst_case_cost_usd"]),
            model: v["model"].as_str().map(str::to_string),
            pricing_mode: v["pricing_mode"].as_str().map(str::to_string),
        }
    }
}

/// CSV formula-injection guard: a cell starting with `= + - @`, tab or CR gets a `'`.
pub fn guard(s: &str) -> String {
    if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_cannot_start_a_formula() {
        assert_eq!(guard("=1+1"), "'=1+1");
        assert_eq!(guard("-5"), "'-5");
        assert_eq!(guard("ok"), "ok");
    }
}
