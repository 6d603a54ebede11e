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
//!
//! A multi-stage pipeline gets a row per stage ([`StagePlan`]) and the item's total: calls
//! per record (a chunk stage's chunks come from splitting the source's field with the real
//! splitter; a sampled stage's share from the hash the run uses), tokens per call, retry
//! rate, cost per record and worst case. The first stage is rendered and counted exactly;
//! a later stage's input depends on earlier answers, so its tokens are an estimate (its fixed
//! prompt, the template's text, the record fields it inserts, the expected answers of the
//! stages it needs), and its output tokens come from its history or are assumed: the
//! worksheet says which.

use std::collections::HashMap;
use std::fmt::Write as _;

use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::{Value, json};

use crate::config::{CHUNK_VAR, ForEach, Pipeline, Stage};
use crate::cost::tokens::{PromptCounter, Tokenizer};
use crate::cost::{ModelPrice, PricingMode, Rates, Usd};
use crate::request::{RequestShape, prepare};
use crate::source::{SourceError, SourceEvent, SourceReader};
use crate::stage::{Renderer, in_sample};
pub use crate::store::{History, TokenCounts};
use crate::store::{RunFigures, Store, StoreError};

/// What a source holds, as a run would see it.
#[derive(Clone, Debug, Default)]
pub struct SourceScan {
    pub records_read: u64,
    pub quarantined: u64,
    /// Distinct items: key → (prompt tokens, records sharing it).
    pub items: HashMap<[u8; 32], (u64, u64)>,
    /// A multi-stage pipeline: the first stage's items over the valid records before dedupe
    /// (a record's chunks).
    pub first_links: u64,
    /// A multi-stage pipeline: each valid record's id and its first-stage item keys.
    pub records: Vec<(String, Vec<[u8; 32]>)>,
    /// A multi-stage pipeline: what the source says of each stage after the first.
    pub later: Vec<LaterScan>,
}

impl SourceScan {
    pub fn valid(&self) -> u64 {
        self.records_read - self.quarantined
    }
}

/// Reads and renders the whole source, counting every request's prompt tokens. Memory: one
/// entry (key, tokens, count) per distinct item; for a multi-stage pipeline also each
/// record's id and first-stage keys, and what [`LaterScanner`] counts.
pub fn scan_source(
    p: &Pipeline,
    shape: &RequestShape,
    counter: &PromptCounter,
) -> Result<SourceScan, SourceError> {
    let mut scan = SourceScan::default();
    let mut scratch = String::new();
    // A multi-stage pipeline's first stage renders as the run renders it (chunks included).
    let first = p.first_stage();
    let mut multi = p.is_multi_stage().then(|| {
        (
            Renderer::new(
                first.clone(),
                shape.clone(),
                *counter,
                Tokenizer::for_model(&first.model),
            ),
            LaterScanner::new(p),
        )
    });
    for ev in SourceReader::open(&p.source)? {
        scan.records_read += 1;
        match ev? {
            SourceEvent::Record(r) if multi.is_some() => {
                let (renderer, later) = multi.as_mut().expect("checked");
                match renderer.render(&r.value, &mut scratch) {
                    Ok(items) => {
                        scan.first_links += items.len() as u64;
                        let mut keys = Vec::with_capacity(items.len());
                        for it in items {
                            scan.items
                                .entry(it.key)
                                .and_modify(|e| e.1 += 1)
                                .or_insert((it.input_tokens, 1));
                            keys.push(it.key);
                        }
                        later.observe(&r.id, &r.value);
                        scan.records.push((r.id, keys));
                    }
                    Err(_) => scan.quarantined += 1,
                }
            }
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
    if let Some((_, later)) = multi {
        scan.later = later.finish();
    }
    Ok(scan)
}

/// What the source says about a stage after the first, before any earlier stage answered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LaterScan {
    /// Valid records in the stage's sample, by the hash the run uses (all of them when the
    /// stage has no `sample`).
    pub in_sample: u64,
    /// A chunk stage: the chunks its split field gives over the records in its sample, cut
    /// by the real splitter with the stage model's tokenizer, and their tokens.
    pub chunks: u64,
    pub chunk_tokens: u64,
    /// Tokens of the record fields the stage's template inserts, over the records counted
    /// for them (`field_records`: see [`LaterScanner`]).
    pub field_tokens: u64,
    pub field_records: u64,
}

/// Valid records whose fields [`LaterScanner`] counts one by one before it takes one in
/// [`FIELD_STRIDE`].
const FIELD_ALL: u64 = 2_000;

/// After the first [`FIELD_ALL`] records, [`LaterScanner`] counts the fields of one record
/// in this many. Their tokens only give a later stage's estimated mean input, and
/// tokenizing every record's fields again took 0.68 of the 23.6 billion instructions of a
/// two-stage run of 20,000 records. At 100,000 compare records the mean so counted is 95.0
/// tokens against 94.9 over every record.
const FIELD_STRIDE: u64 = 16;

/// Counts [`LaterScan`]s record by record: over the source for `plan`, over the records a
/// run reads in for the worksheet it starts from (the same records in the same order, so
/// the same figures). The sample and the chunks are counted over every valid record; the
/// fields' tokens over the first [`FIELD_ALL`] and one in [`FIELD_STRIDE`] after.
pub struct LaterScanner {
    stages: Vec<(Stage, Tokenizer, Vec<String>)>,
    scans: Vec<LaterScan>,
    /// Valid records observed.
    seen: u64,
}

impl LaterScanner {
    pub fn new(p: &Pipeline) -> Self {
        let stages: Vec<(Stage, Tokenizer, Vec<String>)> = p.stages[1..]
            .iter()
            .map(|s| {
                let mut fields: Vec<String> = Vec::new();
                for (f, _) in s.prompt.user.fields() {
                    if f != CHUNK_VAR
                        && !s.needs.iter().any(|n| n == f)
                        && !fields.iter().any(|g| g == f)
                    {
                        fields.push(f.to_string());
                    }
                }
                (s.clone(), Tokenizer::for_model(&s.model), fields)
            })
            .collect();
        let scans = vec![LaterScan::default(); stages.len()];
        LaterScanner {
            stages,
            scans,
            seen: 0,
        }
    }

    /// One valid record.
    pub fn observe(&mut self, record_id: &str, record: &Value) {
        let count_fields = self.seen < FIELD_ALL || self.seen.is_multiple_of(FIELD_STRIDE);
        self.seen += 1;
        for ((stage, tok, fields), scan) in self.stages.iter().zip(self.scans.iter_mut()) {
            if count_fields {
                scan.field_records += 1;
                for f in fields {
                    scan.field_tokens += match record.get(f) {
                        None | Some(Value::Null) => 0,
                        Some(Value::String(s)) => tok.count(s),
                        Some(v) => tok.count(&v.to_string()),
                    };
                }
            }
            if let Some(share) = stage.sample
                && !in_sample(&stage.name, record_id, share)
            {
                continue;
            }
            scan.in_sample += 1;
            if let ForEach::Chunk(split) = &stage.for_each
                && let Some(Value::String(text)) = record.get(&split.field)
            {
                let chunks = crate::split::split(
                    text,
                    crate::split::SplitSpec {
                        max_tokens: split.max_tokens,
                        overlap_tokens: split.overlap_tokens,
                    },
                    tok,
                );
                scan.chunks += chunks.len() as u64;
                scan.chunk_tokens += chunks.iter().map(|c| tok.count(c)).sum::<u64>();
            }
        }
    }

    pub fn finish(self) -> Vec<LaterScan> {
        self.scans
    }
}

/// The text of a template outside its `{{ }}`, `{% %}` and `{# #}` tags: what every request
/// of the stage carries whatever the record (text inside a loop counted once).
pub fn template_text(src: &str) -> String {
    let mut out = String::new();
    let mut rest = src;
    loop {
        let open = ["{{", "{%", "{#"]
            .iter()
            .filter_map(|t| rest.find(t).map(|i| (i, *t)))
            .min_by_key(|(i, _)| *i);
        let Some((i, tag)) = open else {
            out.push_str(rest);
            return out;
        };
        out.push_str(&rest[..i]);
        let close = match tag {
            "{{" => "}}",
            "{%" => "%}",
            _ => "#}",
        };
        match rest[i + 2..].find(close) {
            Some(j) => rest = &rest[i + 2 + j + 2..],
            None => return out,
        }
    }
}

/// An estimate of one call's prompt tokens at a stage after the first, whose input depends
/// on earlier answers: the stage's fixed part (system message, framing, schema: its
/// counter's count of an empty user message), its template's own text, the record fields it
/// inserts (mean over the records counted), a chunk stage's mean chunk, and the answers of the
/// stages it needs (`needs`: each one's output tokens per call × its calls per record it
/// runs for, its chunks). Returns the estimate and how it was made.
pub fn estimate_later_input(
    stage: &Stage,
    fixed_tokens: u64,
    tokenizer: &Tokenizer,
    scan: &LaterScan,
    needs: &[(String, Decimal, Decimal)],
) -> (Decimal, String) {
    let text = Decimal::from(tokenizer.count(&template_text(stage.prompt.user.source())));
    let mean = |total: u64, n: u64| {
        if n == 0 {
            Decimal::ZERO
        } else {
            Decimal::from(total) / Decimal::from(n)
        }
    };
    let fields = mean(scan.field_tokens, scan.field_records);
    let chunk = if stage.is_chunked() {
        Some(mean(scan.chunk_tokens, scan.chunks))
    } else {
        None
    };
    let mut total = Decimal::from(fixed_tokens) + text + fields + chunk.unwrap_or_default();
    let mut parts = vec![
        format!("{fixed_tokens} fixed (system, schema)"),
        format!("{text} template text"),
        format!("{} record fields", round(fields, 1)),
    ];
    if let Some(c) = chunk {
        parts.push(format!("{} chunk text", round(c, 1)));
    }
    for (name, out, calls) in needs {
        total += out * calls;
        if *calls == Decimal::ONE {
            parts.push(format!("{} from `{name}`", round(*out, 1)));
        } else {
            parts.push(format!(
                "{} from `{name}` ({} × {})",
                round(out * calls, 1),
                round(*calls, 2),
                round(*out, 1)
            ));
        }
    }
    (total, format!("estimate: {}", parts.join(" + ")))
}

/// What the store knows of a multi-stage pipeline's stages after the first: each one's
/// history, and what a `when` chose in the latest run (other than `except`) that got to the
/// stages at all: (records it ran for, records that reached it).
pub async fn later_history<S: Store>(
    store: &S,
    p: &Pipeline,
    except: Option<&str>,
) -> Result<Vec<(History, Option<(u64, u64)>)>, StoreError> {
    let mut figures = None;
    for run in store.recent_runs(Some(&p.name), 5).await? {
        if Some(run.id.as_str()) == except {
            continue;
        }
        let f = match run.figures_json.as_deref().and_then(RunFigures::from_json) {
            Some(f) => f,
            None => store.run_figures(&run.id).await?,
        };
        if !f.stages.is_empty() {
            figures = Some(f);
            break;
        }
    }
    let mut out = Vec::new();
    for s in &p.stages[1..] {
        let history = store.history(&p.name, &s.name).await?;
        let ran = figures
            .as_ref()
            .and_then(|f| f.stages.iter().find(|st| st.stage == s.name))
            .map(|st| (st.records, st.records + st.skipped))
            .filter(|(_, reached)| *reached > 0);
        out.push((history, ran));
    }
    Ok(out)
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
    /// Prompt tokens of the items still to send.
    pub todo_tokens: TokenCounts,
    /// Source records whose item is still to send.
    pub todo_records: u64,
    /// Prompt tokens of every item of the job (the source's unique items, done or not):
    /// what the forecasts are made of, whatever is left to send tonight.
    pub job_tokens: TokenCounts,
    /// Valid records of the job.
    pub job_records: u64,
    pub history: History,
    pub monthly_items: Option<u64>,
    pub backfill_items: Option<u64>,
    /// A multi-stage pipeline's facts beyond its first stage (`None`: one stage).
    pub stages: Option<StagesFacts<'a>>,
}

/// What a multi-stage worksheet knows beyond the first stage's figures.
#[derive(Clone, Debug)]
pub struct StagesFacts<'a> {
    /// The first stage's items over the job's valid records before dedupe (its chunks).
    pub first_links: u64,
    /// One per stage after the first, in order.
    pub later: Vec<StageFacts<'a>>,
}

/// The facts of one stage after the first.
#[derive(Clone, Debug)]
pub struct StageFacts<'a> {
    pub price: &'a ModelPrice,
    /// Whether the stage model's tokenizer is exact.
    pub exact_tokens: bool,
    /// The prompt tokens every request of the stage carries (system, framing, schema).
    pub fixed_tokens: u64,
    pub scan: LaterScan,
    /// Valid records whose work at this stage is already done, and how that is known.
    pub records_done: u64,
    pub done_source: String,
    pub history: History,
    /// Records the stage ran for and records that reached it, in the latest run that got
    /// there (what a `when` chose).
    pub ran: Option<(u64, u64)>,
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
    /// Calls (first attempts) per processed item: 1 for one stage, the stages' sum else.
    pub calls_per_item: Decimal,
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
    /// A multi-stage pipeline's stages (empty for one stage). The worksheet's own figures
    /// then add them up: calls per item, expected and worst-case cost, cost per processed
    /// item and the forecasts are over every stage; the per-call figures are the first
    /// stage's.
    pub stages: Vec<StagePlan>,
}

/// One stage of a multi-stage worksheet: its calls per record of the source and what each
/// costs.
#[derive(Clone, Debug, PartialEq)]
pub struct StagePlan {
    pub stage: String,
    pub model: String,
    /// `record` or `chunk`.
    pub for_each: &'static str,
    pub needs: Vec<String>,
    /// The share of records the stage runs for (its `sample`, its `when`).
    pub runs_for: Sourced<Decimal>,
    /// A chunk stage: chunks per record it runs for (before dedupe).
    pub chunks_per_record: Option<Decimal>,
    /// Calls (first attempts) per valid record of the source.
    pub calls_per_record: Sourced<Decimal>,
    pub input_tokens_per_call: Sourced<Decimal>,
    /// Counted from rendered requests with the model's tokenizer (else an estimate).
    pub input_tokens_exact: bool,
    pub output_tokens_per_call: Sourced<Decimal>,
    pub max_output_tokens: u64,
    pub retry_rate: Sourced<Decimal>,
    pub max_attempts: u32,
    pub cost_per_call: Decimal,
    pub standard_cost_per_call: Decimal,
    /// calls per record × cost per call × (1 + retry rate).
    pub cost_per_record: Decimal,
    pub standard_cost_per_record: Decimal,
    /// Every call it could make for a record at max_output_tokens, on every attempt.
    pub worst_case_per_record: Decimal,
    pub records_done: Sourced<u64>,
    pub records_to_do: u64,
    /// Calls the records left to do need (first attempts).
    pub calls_to_send: Decimal,
    pub expected_cost: Decimal,
    pub standard_expected_cost: Decimal,
    pub worst_case_cost: Decimal,
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

fn ratio(a: u64, b: u64) -> Decimal {
    if b == 0 {
        Decimal::ZERO
    } else {
        Decimal::from(a) / Decimal::from(b)
    }
}

fn pct(d: Decimal) -> String {
    format!("{}%", round(d * Decimal::from(100), 2))
}

/// A decimal amount of dollars as exact money, rounded up to the pico-dollar (a worst case
/// never rounds down).
fn usd_up(d: Decimal) -> Usd {
    use rust_decimal::prelude::ToPrimitive;
    let pico = (d * Decimal::from(crate::cost::money::PICO_PER_USD as i64))
        .round_dp_with_strategy(0, RoundingStrategy::AwayFromZero);
    Usd::from_pico(pico.to_i128().unwrap_or(i128::MAX))
}

/// A stage after the first: its share of the records, its calls per record, its estimated
/// tokens, its history or assumptions, and what that costs. `earlier` are the plans of the
/// stages before it (its needs are among them).
fn later_stage(
    p: &Pipeline,
    s: &Stage,
    f: &StageFacts<'_>,
    mode: PricingMode,
    records: u64,
    earlier: &[StagePlan],
) -> StagePlan {
    let batch = f.price.rates(mode).copied().unwrap_or(f.price.standard);
    let standard = f.price.standard;
    let max_out = s.prompt.max_output_tokens as u64;
    let scan = &f.scan;
    // Which records it runs for: its sample is known record by record; what a `when` will
    // say is not, before the earlier stages answered.
    let sample_share = ratio(scan.in_sample, records);
    let runs_for = match (&s.when_text, s.sample, f.ran) {
        (Some(w), _, Some((ran, reached))) if reached > 0 => Sourced {
            value: ratio(ran, reached),
            source: format!(
                "the latest run ran it for {ran} of the {reached} records that reached it (when `{w}`)"
            ),
        },
        (Some(w), sample, _) => Sourced {
            value: sample_share,
            source: format!(
                "when `{w}` cannot be known before the run: counted as true for every record{} (worst case)",
                if sample.is_some() {
                    " of its sample"
                } else {
                    ""
                }
            ),
        },
        (None, Some(share), _) => Sourced {
            value: sample_share,
            source: format!(
                "{} of {records} records fall in its sample of {} (by the hash the run uses)",
                scan.in_sample,
                pct(share)
            ),
        },
        (None, None, _) => Sourced {
            value: Decimal::ONE,
            source: "every record".into(),
        },
    };
    let chunks = s.is_chunked().then(|| ratio(scan.chunks, scan.in_sample));
    let per_run = chunks.unwrap_or(Decimal::ONE);
    let calls = Sourced {
        value: runs_for.value * per_run,
        source: match chunks {
            Some(c) => format!(
                "{} chunks per record it runs for (its field split over the source with the model's tokenizer) × {} of the records",
                round(c, 2),
                pct(runs_for.value)
            ),
            None => format!("one per record it runs for × {}", pct(runs_for.value)),
        },
    };
    // As for the first stage, what the file states comes first (the forecast is then the
    // same on every night), what the stage's earlier runs measured next (shown beside a
    // stated figure), else an assumption.
    let h = &f.history;
    let measured_output =
        (h.answered > 0).then(|| ratio(h.output_tokens, h.answered).min(Decimal::from(max_out)));
    let output = match (s.expected_output_tokens, measured_output) {
        (Some(t), m) => Sourced {
            value: Decimal::from(t),
            source: match m {
                Some(m) => format!(
                    "stage.{}.expected_output_tokens (measured {} over {} answers)",
                    s.name,
                    round(m, 1),
                    h.answered
                ),
                None => format!("stage.{}.expected_output_tokens", s.name),
            },
        },
        (None, Some(m)) => Sourced {
            value: m,
            source: format!("mean of {} earlier answers of this stage", h.answered),
        },
        (None, None) => Sourced {
            value: Decimal::from(max_out) / Decimal::from(2),
            source: "assumption: half of max_output_tokens (no earlier answers of this stage)"
                .into(),
        },
    };
    let measured_retry = (h.items_attempted > 0).then(|| {
        ratio(
            h.attempts.saturating_sub(h.items_attempted),
            h.items_attempted,
        )
    });
    let retry = if let Some(r) = p.plan.retry_rate {
        Sourced {
            value: r,
            source: match measured_retry {
                Some(m) => format!(
                    "plan.retry_rate (measured {} over {} items of this stage)",
                    pct(m),
                    h.items_attempted
                ),
                None => "plan.retry_rate".into(),
            },
        }
    } else if let Some(m) = measured_retry {
        Sourced {
            value: m,
            source: format!(
                "{} earlier attempts on {} items of this stage",
                h.attempts, h.items_attempted
            ),
        }
    } else {
        Sourced {
            value: Decimal::new(5, 2),
            source: "default (no history for this stage, no plan.retry_rate)".into(),
        }
    };
    // Input: the needed stages' answers at what they are expected to be (worst case: at
    // their max_output_tokens).
    let needed = |worst: bool| -> Vec<(String, Decimal, Decimal)> {
        s.needs
            .iter()
            .filter_map(|n| earlier.iter().find(|e| &e.stage == n))
            .map(|e| {
                let out = if worst {
                    Decimal::from(e.max_output_tokens)
                } else {
                    e.output_tokens_per_call.value
                };
                (
                    e.stage.clone(),
                    out,
                    e.chunks_per_record.unwrap_or(Decimal::ONE),
                )
            })
            .collect()
    };
    let tok = Tokenizer::for_model(&s.model);
    let (input, how) = estimate_later_input(s, f.fixed_tokens, &tok, scan, &needed(false));
    let (worst_input, _) = estimate_later_input(s, f.fixed_tokens, &tok, scan, &needed(true));
    let attempts_factor = Decimal::ONE + retry.value;
    let per_call = call_cost(&batch, input, output.value);
    let std_per_call = call_cost(&standard, input, output.value);
    // The worst case: every record its sample holds (a `when` true for all), every call at
    // max_output_tokens, on every attempt.
    let worst_per_record = sample_share
        * per_run
        * call_cost(&batch, worst_input, Decimal::from(max_out))
        * Decimal::from(s.max_attempts);
    let to_do = records.saturating_sub(f.records_done);
    let calls_to_send = Decimal::from(to_do) * calls.value;
    StagePlan {
        stage: s.name.clone(),
        model: s.model.clone(),
        for_each: if s.is_chunked() { "chunk" } else { "record" },
        needs: s.needs.clone(),
        runs_for,
        chunks_per_record: chunks,
        input_tokens_per_call: Sourced {
            value: input,
            source: how,
        },
        input_tokens_exact: false,
        output_tokens_per_call: output,
        max_output_tokens: max_out,
        retry_rate: retry,
        max_attempts: s.max_attempts,
        cost_per_call: per_call,
        standard_cost_per_call: std_per_call,
        cost_per_record: calls.value * per_call * attempts_factor,
        standard_cost_per_record: calls.value * std_per_call * attempts_factor,
        worst_case_per_record: worst_per_record,
        records_done: Sourced {
            value: f.records_done.min(records),
            source: f.done_source.clone(),
        },
        records_to_do: to_do,
        calls_to_send,
        expected_cost: calls_to_send * per_call * attempts_factor,
        standard_expected_cost: calls_to_send * std_per_call * attempts_factor,
        worst_case_cost: Decimal::from(to_do) * worst_per_record,
        calls_per_record: calls,
    }
}

impl Worksheet {
    pub fn compute(i: PlanInputs<'_>) -> Worksheet {
        let p = i.pipeline;
        let batch = i.price.rates(i.mode).copied().unwrap_or(i.price.standard);
        let standard = i.price.standard;
        let n = i.todo_tokens.len();
        let total = i.todo_tokens.total();
        // Per-call figures describe what is left to send; with nothing left, the job's own
        // items (whose tokens were counted all the same).
        let stats_of = if i.todo_tokens.is_empty() {
            &i.job_tokens
        } else {
            &i.todo_tokens
        };
        let p95 = stats_of.percentile(95);
        let max = stats_of.max();
        let mean_of = |v: &TokenCounts| {
            if v.is_empty() {
                Decimal::ZERO
            } else {
                Decimal::from(v.total()) / Decimal::from(v.len())
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
        let job_n = i.job_tokens.len();
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
        let mut ws = Worksheet {
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
            calls_per_item: Decimal::ONE,
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
            stages: Vec::new(),
        };
        let Some(facts) = &i.stages else {
            return ws;
        };
        // The first stage, from the figures above: its distinct requests per record (its
        // chunks after dedupe), counted exactly.
        let first = p.first_stage();
        let calls = ratio(job_n, i.job_records);
        let chunks = first
            .is_chunked()
            .then(|| ratio(facts.first_links, i.job_records));
        let per_call = call_cost(&batch, job_mean, ws.output_tokens_per_call.value);
        let std_per_call = call_cost(&standard, job_mean, ws.output_tokens_per_call.value);
        let done = i.job_records.saturating_sub(i.todo_records);
        let mut plans = vec![StagePlan {
            stage: first.name.clone(),
            model: first.model.clone(),
            for_each: if first.is_chunked() {
                "chunk"
            } else {
                "record"
            },
            needs: Vec::new(),
            runs_for: Sourced {
                value: Decimal::ONE,
                source: "every record".into(),
            },
            chunks_per_record: chunks,
            calls_per_record: Sourced {
                value: calls,
                source: match chunks {
                    Some(c) => format!(
                        "{} chunks over {} records ({} per record, split with the model's tokenizer), {} distinct requests",
                        facts.first_links,
                        i.job_records,
                        round(c, 2),
                        job_n
                    ),
                    None => format!("{job_n} distinct requests over {} records", i.job_records),
                },
            },
            input_tokens_per_call: Sourced {
                value: job_mean,
                source: if i.exact_tokens {
                    "counted with the model's tokenizer".into()
                } else {
                    "estimate (no tokenizer for this model)".into()
                },
            },
            input_tokens_exact: i.exact_tokens,
            output_tokens_per_call: ws.output_tokens_per_call.clone(),
            max_output_tokens: max_out,
            retry_rate: ws.retry_rate.clone(),
            max_attempts: first.max_attempts,
            cost_per_call: per_call,
            standard_cost_per_call: std_per_call,
            cost_per_record: calls * per_call * attempts_factor,
            standard_cost_per_record: calls * std_per_call * attempts_factor,
            worst_case_per_record: calls
                * call_cost(&batch, job_mean, Decimal::from(max_out))
                * Decimal::from(first.max_attempts),
            records_done: Sourced {
                value: done,
                source: "records whose every item of this stage succeeded".into(),
            },
            records_to_do: i.todo_records,
            calls_to_send: Decimal::from(n),
            expected_cost: expected,
            standard_expected_cost: standard_expected,
            worst_case_cost: worst.to_decimal(),
        }];
        for (k, f) in facts.later.iter().enumerate() {
            let plan = later_stage(p, &p.stages[k + 1], f, i.mode, i.job_records, &plans);
            plans.push(plan);
        }
        // The item's total: every stage's calls and costs added up.
        let sum = |get: fn(&StagePlan) -> Decimal| plans.iter().map(get).sum::<Decimal>();
        ws.calls_per_item = sum(|s| s.calls_per_record.value);
        ws.expected_cost = sum(|s| s.expected_cost);
        ws.standard_expected_cost = sum(|s| s.standard_expected_cost);
        ws.cost_per_processed_item = sum(|s| s.cost_per_record);
        ws.standard_cost_per_processed_item = sum(|s| s.standard_cost_per_record);
        ws.worst_case_cost = worst + usd_up(plans[1..].iter().map(|s| s.worst_case_cost).sum());
        let (per_item, std_per_item) = (
            ws.cost_per_processed_item,
            ws.standard_cost_per_processed_item,
        );
        let forecast = |items: u64| Forecast {
            items,
            cost: per_item * Decimal::from(items) * margin,
            standard_cost: std_per_item * Decimal::from(items) * margin,
        };
        ws.monthly = i.monthly_items.map(forecast);
        ws.backfill = i.backfill_items.map(forecast);
        let mut models: Vec<String> = Vec::new();
        for s in &p.stages {
            if !models.contains(&s.model) {
                models.push(s.model.clone());
            }
        }
        ws.model = models.join(", ");
        ws.stages = plans;
        ws
    }

    /// (figure, value, note) rows, in worksheet order; a multi-stage worksheet has each
    /// stage's rows after "calls per item" (figures named `stage: figure`).
    pub fn rows(&self) -> Vec<(String, String, String)> {
        let mut rows = self.general_rows();
        if let Some(at) = rows.iter().position(|r| r.0 == "calls per item") {
            let tail = rows.split_off(at + 1);
            rows.extend(self.stage_rows());
            rows.extend(tail);
        }
        rows
    }

    /// Each stage's figures as (figure, value, note) rows.
    fn stage_rows(&self) -> Vec<(String, String, String)> {
        let usd = |d: Decimal| format!("${}", round(d, 6));
        let mut r = Vec::new();
        for st in &self.stages {
            let name = &st.stage;
            let row = |figure: &str, value: String, note: String| {
                (format!("{name}: {figure}"), value, note)
            };
            r.push((
                format!("stage {name}"),
                format!("{} · {}", st.for_each, st.model),
                if st.needs.is_empty() {
                    "first stage".to_string()
                } else {
                    format!("needs {}", st.needs.join(", "))
                },
            ));
            r.push(row(
                "runs for",
                pct(st.runs_for.value),
                st.runs_for.source.clone(),
            ));
            r.push(row(
                "calls per record",
                round(st.calls_per_record.value, 2).to_string(),
                st.calls_per_record.source.clone(),
            ));
            r.push(row(
                "input tokens per call",
                round(st.input_tokens_per_call.value, 1).to_string(),
                st.input_tokens_per_call.source.clone(),
            ));
            r.push(row(
                "output tokens per call",
                round(st.output_tokens_per_call.value, 1).to_string(),
                format!(
                    "{}; at most {}",
                    st.output_tokens_per_call.source, st.max_output_tokens
                ),
            ));
            r.push(row(
                "retry rate",
                pct(st.retry_rate.value),
                format!("{}; max attempts {}", st.retry_rate.source, st.max_attempts),
            ));
            r.push(row(
                "cost per record",
                usd(st.cost_per_record),
                format!(
                    "{} at standard prices; {} per call",
                    usd(st.standard_cost_per_record),
                    usd(st.cost_per_call)
                ),
            ));
            r.push(row(
                "worst case per record",
                usd(st.worst_case_per_record),
                "every call at max_output_tokens, every attempt".into(),
            ));
            r.push(row(
                "records to do",
                st.records_to_do.to_string(),
                format!("{} done: {}", st.records_done.value, st.records_done.source),
            ));
            r.push(row(
                "expected cost",
                usd(st.expected_cost),
                format!(
                    "{} calls; worst case {}",
                    round(st.calls_to_send, 1),
                    usd(st.worst_case_cost)
                ),
            ));
        }
        r
    }

    /// The rows of the whole job: for a multi-stage worksheet, without the per-call rows
    /// (each stage has its own) and with the totals' notes saying they add the stages up.
    fn general_rows(&self) -> Vec<(String, String, String)> {
        let rows = self.one_stage_rows();
        if self.stages.is_empty() {
            return rows;
        }
        let first = &self.stages[0].stage;
        let per_call = [
            "input tokens per call",
            "output tokens per call",
            "validation",
            "retry rate",
            "max attempts",
            "cost per call",
        ];
        rows.into_iter()
            .filter(|r| !per_call.contains(&r.0.as_str()))
            .map(|(a, b, c)| {
                let c = match a.as_str() {
                    "unique items after dedupe" | "already done in the store" | "items to send" => {
                        if c.is_empty() {
                            format!("first stage `{first}`")
                        } else {
                            format!("{c}; first stage `{first}`")
                        }
                    }
                    "calls per item" => format!(
                        "sum over the {} stages: {}",
                        self.stages.len(),
                        self.stages
                            .iter()
                            .map(|s| format!("{} {}", s.stage, round(s.calls_per_record.value, 2)))
                            .collect::<Vec<_>>()
                            .join(" + ")
                    ),
                    "expected cost" | "worst-case cost" | "cost per processed item" => {
                        format!("{c}; all stages")
                    }
                    _ => c,
                };
                let b = if a == "calls per item" {
                    round(self.calls_per_item, 2).to_string()
                } else {
                    b
                };
                (a, b, c)
            })
            .collect()
    }

    fn one_stage_rows(&self) -> Vec<(String, String, String)> {
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
        if !self.stages.is_empty() {
            return self.stages_table();
        }
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

    /// A multi-stage worksheet for people: the job, a row per stage, how each stage's
    /// figures were made, then the item's total and the forecasts.
    fn stages_table(&self) -> String {
        let rows = self.general_rows();
        let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let w1 = rows.iter().map(|r| r.1.chars().count()).max().unwrap_or(0);
        let line = |s: &mut String, (a, b, c): &(String, String, String)| {
            let pad = w1 - b.chars().count();
            let l = format!("{a:<w0$}  {b}{}  {c}", " ".repeat(pad));
            let _ = writeln!(s, "{}", l.trim_end());
        };
        let at = rows
            .iter()
            .position(|r| r.0 == "calls per item")
            .unwrap_or(rows.len());
        let mut s = String::new();
        for r in &rows[..at] {
            line(&mut s, r);
        }
        let usd = |d: Decimal| format!("${}", round(d, 6));
        let mut t = crate::util::table::table(
            &[
                "stage",
                "for each",
                "model",
                "runs for",
                "calls/record",
                "input tok/call",
                "output tok/call",
                "retry",
                "cost/record",
                "worst/record",
                "to do",
                "expected",
            ],
            None,
        );
        for st in &self.stages {
            let mark = |exact: bool| if exact { "" } else { " ~" };
            t.add_row(vec![
                st.stage.clone(),
                st.for_each.to_string(),
                st.model.clone(),
                pct(st.runs_for.value),
                round(st.calls_per_record.value, 2).to_string(),
                format!(
                    "{}{}",
                    round(st.input_tokens_per_call.value, 1),
                    mark(st.input_tokens_exact)
                ),
                round(st.output_tokens_per_call.value, 1).to_string(),
                pct(st.retry_rate.value),
                usd(st.cost_per_record),
                usd(st.worst_case_per_record),
                st.records_to_do.to_string(),
                usd(st.expected_cost),
            ]);
        }
        crate::util::table::align_right(&mut t, &[3, 4, 5, 6, 7, 8, 9, 10, 11]);
        let _ = writeln!(s, "\nper stage (~ estimate)");
        s.push_str(&crate::util::table::render(&t));
        let _ = writeln!(s, "\nhow the stage figures were made");
        for st in &self.stages {
            let mut notes = vec![
                ("calls per record", st.calls_per_record.source.clone()),
                ("input tokens", st.input_tokens_per_call.source.clone()),
                ("output tokens", st.output_tokens_per_call.source.clone()),
                ("retry rate", st.retry_rate.source.clone()),
                (
                    "done",
                    format!(
                        "{} records: {}",
                        st.records_done.value, st.records_done.source
                    ),
                ),
            ];
            if st.runs_for.source != "every record" {
                notes.insert(0, ("runs for", st.runs_for.source.clone()));
            }
            for (figure, note) in notes {
                let _ = writeln!(s, "  {} · {figure}: {note}", st.stage);
            }
        }
        s.push('\n');
        for r in &rows[at..] {
            line(&mut s, r);
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
        let mut v = json!({
            "job": self.job,
            "timing": self.timing,
            "processed_item": self.unit,
            "model": self.model,
            "pricing_mode": self.pricing_mode,
            "records": {"read": self.records_read, "quarantined": self.quarantined, "valid": self.records_valid, "to_process": self.records_to_process},
            "items": {"unique": self.unique_items, "already_done": self.already_done, "to_send": self.items_to_send},
            "calls_per_item": if self.stages.is_empty() { json!(1) } else { json!(d(self.calls_per_item)) },
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
        });
        if !self.stages.is_empty() {
            v["stages"] = self.stages.iter().map(|st| st.to_json()).collect();
        }
        v
    }
}

impl StagePlan {
    pub fn to_json(&self) -> Value {
        let d = |x: Decimal| round(x, 12).to_string();
        let sourced = |s: &Sourced<Decimal>| json!({"value": d(s.value), "source": s.source});
        json!({
            "stage": self.stage,
            "model": self.model,
            "for_each": self.for_each,
            "needs": self.needs,
            "runs_for": sourced(&self.runs_for),
            "chunks_per_record": self.chunks_per_record.map(d),
            "calls_per_record": sourced(&self.calls_per_record),
            "input_tokens_per_call": {"value": d(self.input_tokens_per_call.value), "exact": self.input_tokens_exact,
                "source": self.input_tokens_per_call.source},
            "output_tokens_per_call": {"value": d(self.output_tokens_per_call.value),
                "source": self.output_tokens_per_call.source, "max": self.max_output_tokens},
            "retry_rate": sourced(&self.retry_rate),
            "max_attempts": self.max_attempts,
            "cost_per_call_usd": d(self.cost_per_call),
            "standard_cost_per_call_usd": d(self.standard_cost_per_call),
            "cost_per_record_usd": d(self.cost_per_record),
            "standard_cost_per_record_usd": d(self.standard_cost_per_record),
            "worst_case_per_record_usd": d(self.worst_case_per_record),
            "records": {"done": self.records_done.value, "done_source": self.records_done.source,
                "to_do": self.records_to_do},
            "calls_to_send": d(self.calls_to_send),
            "expected_cost_usd": d(self.expected_cost),
            "standard_expected_cost_usd": d(self.standard_expected_cost),
            "worst_case_cost_usd": d(self.worst_case_cost),
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
    /// A multi-stage worksheet's calls per item (the stages' sum).
    pub calls_per_item: Option<Decimal>,
    /// A multi-stage worksheet's stages, in order (empty for one stage).
    pub stages: Vec<StoredStage>,
}

/// One stage of a stored multi-stage worksheet.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoredStage {
    pub stage: String,
    pub calls_per_record: Option<Decimal>,
    pub input_tokens_per_call: Option<Decimal>,
    pub output_tokens_per_call: Option<Decimal>,
    pub retry_rate: Option<Decimal>,
    pub calls_to_send: Option<Decimal>,
    pub expected_cost: Option<Decimal>,
    pub worst_case_cost: Option<Decimal>,
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
            calls_per_item: dec(&v["calls_per_item"]),
            stages: v["stages"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|st| StoredStage {
                    stage: st["stage"].as_str().unwrap_or_default().to_string(),
                    calls_per_record: dec(&st["calls_per_record"]["value"]),
                    input_tokens_per_call: dec(&st["input_tokens_per_call"]["value"]),
                    output_tokens_per_call: dec(&st["output_tokens_per_call"]["value"]),
                    retry_rate: dec(&st["retry_rate"]["value"]),
                    calls_to_send: dec(&st["calls_to_send"]),
                    expected_cost: dec(&st["expected_cost_usd"]),
                    worst_case_cost: dec(&st["worst_case_cost_usd"]),
                })
                .collect(),
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

    const TWO_STAGES: &str = r#"
name = "t"
[source]
kind = "jsonl"
path = "in.jsonl"
id_field = "id"
[provider]
kind = "openai"
model = "gpt-5.4-mini"
simulate = true
[[stage]]
name = "notes"
for_each = "chunk"
split = { field = "body", max_tokens = 200, overlap_tokens = 0 }
schema = "n.json"
prompt.user = "{{ chunk.text }}"
prompt.max_output_tokens = 100
[[stage]]
name = "summary"
needs = ["notes"]
schema = "s.json"
prompt.user = "Title: {{title}}\n{% for n in notes %}- {{ n.points }}\n{% endfor %}{# done #}"
prompt.max_output_tokens = 300
[output]
path = "out.jsonl"
"#;

    #[test]
    fn a_template_text_is_what_is_left_outside_its_tags() {
        assert_eq!(
            template_text(
                "Title: {{title}}\n{% for n in notes %}- {{ n.points }}\n{% endfor %}{# x #}!"
            ),
            "Title: \n- \n!"
        );
        assert_eq!(template_text("no tags"), "no tags");
        assert_eq!(template_text("open {{ never closed"), "open ");
    }

    #[test]
    fn a_later_stage_input_is_its_fixed_part_its_text_its_fields_and_the_answers_it_needs() {
        let p = Pipeline::from_str(TWO_STAGES, std::path::Path::new("/x/t.toml")).unwrap();
        let tok = Tokenizer::for_model("gpt-5.4-mini");
        let mut scanner = LaterScanner::new(&p);
        let records = [
            serde_json::json!({"id": "a", "title": "Hello world", "body": "Some text."}),
            serde_json::json!({"id": "b", "title": "Another title, a longer one", "body": "More."}),
        ];
        for r in &records {
            scanner.observe(r["id"].as_str().unwrap(), r);
        }
        let scan = scanner.finish().remove(0);
        // Only `title` is a record field of the summary's template (`notes` is a needed
        // stage, `n` a loop variable); every record is in a stage without a sample.
        let title_tokens = tok.count("Hello world") + tok.count("Another title, a longer one");
        assert_eq!(scan.field_tokens, title_tokens);
        assert_eq!(scan.field_records, 2);
        assert_eq!(scan.in_sample, 2);
        assert_eq!(scan.chunks, 0, "a record stage cuts nothing");
        // 250 fixed + the template's own text + the mean title + 2.5 chunks of notes at 80
        // output tokens each.
        let needs = [("notes".to_string(), Decimal::from(80), Decimal::new(25, 1))];
        let (tokens, how) = estimate_later_input(&p.stages[1], 250, &tok, &scan, &needs);
        let expected = Decimal::from(250 + tok.count("Title: \n- \n"))
            + Decimal::from(title_tokens) / Decimal::from(2)
            + Decimal::from(200);
        assert_eq!(tokens, expected);
        assert!(how.starts_with("estimate: 250 fixed"), "{how}");
        assert!(how.contains("200 from `notes` (2.5 × 80)"), "{how}");
    }

    #[test]
    fn a_large_source_has_its_later_fields_counted_on_one_record_in_a_stride() {
        let p = Pipeline::from_str(TWO_STAGES, std::path::Path::new("/x/t.toml")).unwrap();
        let tok = Tokenizer::for_model("gpt-5.4-mini");
        let mut scanner = LaterScanner::new(&p);
        let n = FIELD_ALL + 5 * FIELD_STRIDE + 3;
        let title = |i: u64| format!("Title number {i}, {}", "word ".repeat((i % 7) as usize));
        let mut counted = 0;
        for i in 0..n {
            let id = format!("r{i}");
            scanner.observe(&id, &serde_json::json!({"id": id, "title": title(i)}));
            if i < FIELD_ALL || i.is_multiple_of(FIELD_STRIDE) {
                counted += tok.count(&title(i));
            }
        }
        let scan = scanner.finish().remove(0);
        // Every record up to FIELD_ALL, then the 1st, 17th, … after it (6 of the 83).
        assert_eq!(scan.field_records, FIELD_ALL + 6);
        assert_eq!(scan.field_tokens, counted);
        // The sample and the calls are still every record's.
        assert_eq!(scan.in_sample, n);
    }

    #[test]
    fn a_later_chunk_stage_counts_the_real_chunks_of_its_sample() {
        let text = TWO_STAGES
            .replace(
                "name = \"notes\"\nfor_each = \"chunk\"\nsplit = { field = \"body\", max_tokens = 200, overlap_tokens = 0 }",
                "name = \"notes\"",
            )
            .replace("prompt.user = \"{{ chunk.text }}\"", "prompt.user = \"{{ body }}\"")
            .replace(
                "needs = [\"notes\"]",
                "needs = [\"notes\"]\nfor_each = \"chunk\"\nsplit = { field = \"body\", max_tokens = 40, overlap_tokens = 5 }\nsample = 0.5",
            );
        let p = Pipeline::from_str(&text, std::path::Path::new("/x/t.toml")).unwrap();
        let tok = Tokenizer::for_model("gpt-5.4-mini");
        let body = "One sentence about the weather today. ".repeat(30);
        let mut scanner = LaterScanner::new(&p);
        let (mut sampled, mut chunks) = (0, 0);
        for i in 0..40 {
            let id = format!("r{i}");
            scanner.observe(
                &id,
                &serde_json::json!({"id": id, "title": "T", "body": body}),
            );
            if in_sample("summary", &id, Decimal::new(5, 1)) {
                sampled += 1;
                chunks += crate::split::split(
                    &body,
                    crate::split::SplitSpec {
                        max_tokens: 40,
                        overlap_tokens: 5,
                    },
                    &tok,
                )
                .len() as u64;
            }
        }
        let scan = scanner.finish().remove(0);
        assert!(sampled > 0 && sampled < 40, "{sampled}");
        assert_eq!(scan.in_sample, sampled);
        assert_eq!(scan.chunks, chunks);
        assert!(chunks > sampled, "several chunks per record");
    }

    #[test]
    fn csv_cells_cannot_start_a_formula() {
        assert_eq!(guard("=1+1"), "'=1+1");
        assert_eq!(guard("-5"), "'-5");
        assert_eq!(guard("ok"), "ok");
    }
}
