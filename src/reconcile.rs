//! Reconciliation: did the run do what the plan said, and does the ledger match the
//! provider's own numbers?
//!
//! Plan vs actual compares the worksheet stored when the run started with what the store
//! shows now; for a multi-stage run, also stage by stage (calls per record, calls sent,
//! tokens per call, retry rate, cost). Ledger vs provider compares, batch by batch, the sum of our ledger rows with
//! the provider's batch usage (OpenAI reports it) and with its bill when we have one (the
//! simulator's, recorded at the end of a simulated run or read live from a simulator).
//! Differences are shown, never hidden.

use std::collections::HashMap;

use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::{Value, json};

use crate::cost::{Usage, Usd};
use crate::store::{
    BatchMode, LedgerTotals, ProviderBill, RunFigures, RunRow, StageFigures, Store, StoreError,
};

/// One line of plan vs actual.
#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    pub figure: &'static str,
    pub plan: String,
    pub actual: String,
    pub difference: String,
}

/// One batch: our ledger against the provider's figures.
#[derive(Clone, Debug)]
pub struct BatchCheck {
    pub batch_id: String,
    pub provider_batch_id: Option<String>,
    /// [`BatchMode::Online`]: real-time calls, no provider batch id.
    pub mode: BatchMode,
    pub requests: u64,
    pub ledger: LedgerTotals,
    pub provider_usage: Option<Usage>,
    pub bill: Option<ProviderBill>,
}

impl BatchCheck {
    /// Whether our ledger equals the provider's batch usage (`None`: no usage reported). The
    /// cached share of the prompt is compared when the provider reports one: a job's own
    /// totals without it (Bedrock's `manifest.json.out`) are compared on prompt and answer
    /// tokens.
    pub fn usage_matches(&self) -> Option<bool> {
        self.provider_usage.map(|u| {
            u.input_tokens == self.ledger.usage.input_tokens
                && u.output_tokens == self.ledger.usage.output_tokens
                && (u.cached_input_tokens == 0
                    || u.cached_input_tokens == self.ledger.usage.cached_input_tokens)
        })
    }

    /// Whether our ledger equals the provider's bill, tokens and cost.
    pub fn bill_matches(&self) -> Option<bool> {
        self.bill
            .as_ref()
            .map(|b| b.usage == self.ledger.usage && b.cost == self.ledger.cost)
    }
}

/// One line of a stage's plan vs actual (a multi-stage run).
#[derive(Clone, Debug, PartialEq)]
pub struct StageLine {
    pub stage: String,
    pub line: Line,
}

#[derive(Clone, Debug)]
pub struct Reconciliation {
    pub run_id: String,
    pub pipeline: String,
    pub lines: Vec<Line>,
    /// A multi-stage run: each stage's plan vs actual, stage by stage (empty for one stage).
    pub stages: Vec<StageLine>,
    pub batches: Vec<BatchCheck>,
}

fn fmt(d: Decimal, places: u32) -> String {
    d.round_dp_with_strategy(places, RoundingStrategy::MidpointAwayFromZero)
        .normalize()
        .to_string()
}

fn diff(plan: Option<Decimal>, actual: Decimal, places: u32) -> String {
    match plan {
        None => "-".into(),
        Some(p) => {
            let d = actual - p;
            let pct = if p.is_zero() {
                String::new()
            } else {
                format!(" ({}%)", fmt(d / p * Decimal::from(100), 1))
            };
            format!(
                "{}{}{pct}",
                if d >= Decimal::ZERO { "+" } else { "" },
                fmt(d, places)
            )
        }
    }
}

/// The bill per provider batch from a live simulator record (`GET /_sim/record`).
pub fn bills_from_record(record: &Value) -> HashMap<String, ProviderBill> {
    let mut out: HashMap<String, ProviderBill> = HashMap::new();
    for e in record["bill"]["per_custom_id"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let id = e["batch_id"].as_str().unwrap_or_default().to_string();
        let b = out.entry(id.clone()).or_insert_with(|| ProviderBill {
            provider_batch_id: id,
            requests: 0,
            usage: Usage::default(),
            cost: Usd::ZERO,
            source: "simulator (live)".into(),
        });
        b.requests += 1;
        b.usage.add(&Usage {
            input_tokens: e["input_tokens"].as_u64().unwrap_or(0),
            cached_input_tokens: e["cached_input_tokens"].as_u64().unwrap_or(0),
            cache_write_tokens: e["cache_write_tokens"].as_u64().unwrap_or(0),
            output_tokens: e["output_tokens"].as_u64().unwrap_or(0),
            reasoning_tokens: e["reasoning_tokens"].as_u64().unwrap_or(0),
        });
        b.cost += e["cost_usd"]
            .as_str()
            .and_then(|s| Usd::parse(s).ok())
            .unwrap_or(Usd::ZERO);
    }
    out
}

/// Custom ids a live simulator saw in more than one created batch.
pub fn duplicates_in_record(record: &Value) -> u64 {
    let mut seen: HashMap<&str, u64> = HashMap::new();
    for b in record["batches"].as_array().into_iter().flatten() {
        for r in b["requests"].as_array().into_iter().flatten() {
            *seen
                .entry(r["custom_id"].as_str().unwrap_or_default())
                .or_default() += 1;
        }
    }
    seen.values().map(|n| n - 1).sum()
}

pub async fn reconcile<S: Store>(
    store: &S,
    run: &RunRow,
    live: Option<&Value>,
) -> Result<Reconciliation, StoreError> {
    let f = store.run_figures(&run.id).await?;
    let plan = crate::plan::StoredPlan::parse(run.plan_json.as_deref());
    let u = &f.ledger.usage;
    let per = |total: u64, n: u64| {
        if n == 0 {
            Decimal::ZERO
        } else {
            Decimal::from(total) / Decimal::from(n)
        }
    };
    // A multi-stage plan's figures for the whole run add its stages up: calls to send,
    // and the per-call figures weighted by each stage's calls.
    let multi = !plan.stages.is_empty();
    let calls: Option<Decimal> = multi
        .then(|| {
            plan.stages
                .iter()
                .map(|s| s.calls_to_send)
                .sum::<Option<Decimal>>()
        })
        .flatten();
    let weighted = |get: fn(&crate::plan::StoredStage) -> Option<Decimal>| -> Option<Decimal> {
        let total = calls.filter(|c| !c.is_zero())?;
        let mut sum = Decimal::ZERO;
        for s in &plan.stages {
            sum += s.calls_to_send? * get(s)?;
        }
        Some(sum / total)
    };
    let (items_to_send, retry_plan, input_plan, output_plan) = if multi {
        (
            calls,
            weighted(|s| s.retry_rate),
            weighted(|s| s.input_tokens_per_call),
            weighted(|s| s.output_tokens_per_call),
        )
    } else {
        (
            plan.items_to_send.map(Decimal::from),
            plan.retry_rate,
            plan.input_tokens_mean,
            plan.output_tokens_per_call,
        )
    };
    let retries = f.attempts.saturating_sub(f.items_attempted);
    let duplicate_submissions = live.map(duplicates_in_record).unwrap_or(0);
    let mut lines = vec![
        Line {
            figure: "items sent",
            plan: items_to_send.map(|d| fmt(d, 1)).unwrap_or("-".into()),
            actual: f.items_attempted.to_string(),
            difference: diff(items_to_send, Decimal::from(f.items_attempted), 0),
        },
        Line {
            figure: "processed records",
            plan: plan
                .records_to_process
                .map(|v| v.to_string())
                .unwrap_or("-".into()),
            actual: f.processed_records.to_string(),
            difference: diff(
                plan.records_to_process.map(Decimal::from),
                Decimal::from(f.processed_records),
                0,
            ),
        },
        Line {
            figure: "input tokens per call (mean)",
            plan: input_plan.map(|d| fmt(d, 1)).unwrap_or("-".into()),
            actual: fmt(per(u.input_tokens, f.answered), 1),
            difference: diff(input_plan, per(u.input_tokens, f.answered), 1),
        },
        Line {
            figure: "output tokens per call (mean)",
            plan: output_plan.map(|d| fmt(d, 1)).unwrap_or("-".into()),
            actual: fmt(per(u.output_tokens, f.answered), 1),
            difference: diff(output_plan, per(u.output_tokens, f.answered), 1),
        },
        Line {
            figure: "validation calls (answers checked)",
            plan: match (items_to_send, retry_plan) {
                (Some(n), Some(r)) => fmt(n * (Decimal::ONE + r), 1),
                _ => "-".into(),
            },
            actual: f.answered.to_string(),
            difference: diff(
                items_to_send
                    .zip(retry_plan)
                    .map(|(n, r)| n * (Decimal::ONE + r)),
                Decimal::from(f.answered),
                1,
            ),
        },
        Line {
            figure: "failed items",
            plan: "0".into(),
            actual: f.exhausted.to_string(),
            difference: diff(Some(Decimal::ZERO), Decimal::from(f.exhausted), 0),
        },
        Line {
            figure: "retry attempts",
            plan: items_to_send
                .zip(retry_plan)
                .map(|(n, r)| fmt(n * r, 1))
                .unwrap_or("-".into()),
            actual: retries.to_string(),
            difference: diff(
                items_to_send.zip(retry_plan).map(|(n, r)| n * r),
                Decimal::from(retries),
                1,
            ),
        },
        Line {
            figure: "duplicate submissions",
            plan: "0".into(),
            actual: if live.is_some() {
                duplicate_submissions.to_string()
            } else {
                // Without the provider's record only the store's anomalies can tell.
                "0 (store only)".into()
            },
            difference: diff(Some(Decimal::ZERO), Decimal::from(duplicate_submissions), 0),
        },
        Line {
            figure: "model",
            plan: plan.model.clone().unwrap_or_else(|| run.model.clone()),
            actual: if f.models.is_empty() {
                "-".into()
            } else {
                f.models.join(", ")
            },
            difference: String::new(),
        },
        Line {
            figure: "pricing mode",
            plan: plan.pricing_mode.clone().unwrap_or_else(|| "-".into()),
            actual: run.pricing_mode.clone(),
            difference: String::new(),
        },
        Line {
            figure: "cost (USD)",
            plan: plan.expected_cost.map(|d| fmt(d, 6)).unwrap_or("-".into()),
            actual: fmt(f.ledger.cost.to_decimal(), 6),
            difference: diff(plan.expected_cost, f.ledger.cost.to_decimal(), 6),
        },
        Line {
            figure: "worst case (USD)",
            plan: plan
                .worst_case_cost
                .map(|d| fmt(d, 6))
                .unwrap_or("-".into()),
            actual: fmt(f.ledger.cost.to_decimal(), 6),
            difference: diff(plan.worst_case_cost, f.ledger.cost.to_decimal(), 6),
        },
    ];
    if let Some(cap) = run.budget_pico {
        let cap = Usd::from_pico(cap as i128).to_decimal();
        lines.push(Line {
            figure: "budget cap (USD)",
            plan: fmt(cap, 6),
            actual: fmt(f.ledger.cost.to_decimal(), 6),
            difference: diff(Some(cap), f.ledger.cost.to_decimal(), 6),
        });
    }
    let stages = stage_lines(&plan, &f);
    let live_bills = live.map(bills_from_record).unwrap_or_default();
    let mut batches = Vec::new();
    for b in store.run_batches(&run.id).await? {
        let ledger = store.ledger_totals_for_batch(&b.id).await?;
        let provider_usage = b
            .provider_usage
            .as_deref()
            .and_then(|t| serde_json::from_str::<Usage>(t).ok());
        let bill = match &b.provider_batch_id {
            Some(pid) => match live_bills.get(pid) {
                Some(bill) => Some(bill.clone()),
                None if live.is_some() => Some(ProviderBill {
                    provider_batch_id: pid.clone(),
                    requests: 0,
                    usage: Usage::default(),
                    cost: Usd::ZERO,
                    source: "simulator (live)".into(),
                }),
                None => store.provider_bill(pid).await?,
            },
            None => None,
        };
        batches.push(BatchCheck {
            batch_id: b.id,
            provider_batch_id: b.provider_batch_id,
            mode: b.mode,
            requests: b.request_count as u64,
            ledger,
            provider_usage,
            bill,
        });
    }
    Ok(Reconciliation {
        run_id: run.id.clone(),
        pipeline: run.pipeline.clone(),
        lines,
        stages,
        batches,
    })
}

/// Each stage's plan (the stored worksheet's row) against what the run did at that stage:
/// calls per record (first attempts: the stage's distinct items over the run's records),
/// calls sent, tokens per answered call, retry rate and cost (the report's per-stage cost).
fn stage_lines(plan: &crate::plan::StoredPlan, f: &RunFigures) -> Vec<StageLine> {
    let mut names: Vec<&str> = plan.stages.iter().map(|s| s.stage.as_str()).collect();
    for st in &f.stages {
        if !names.contains(&st.stage.as_str()) {
            names.push(&st.stage);
        }
    }
    let hundred = Decimal::from(100);
    let ratio = |a: u64, b: u64| {
        if b == 0 {
            Decimal::ZERO
        } else {
            Decimal::from(a) / Decimal::from(b)
        }
    };
    let mut out = Vec::new();
    for name in names {
        let p = plan.stages.iter().find(|s| s.stage == name);
        let zero = StageFigures::default();
        let st = f.stages.iter().find(|s| s.stage == name).unwrap_or(&zero);
        let get = |g: fn(&crate::plan::StoredStage) -> Option<Decimal>| p.and_then(g);
        let rows: [(&'static str, Option<Decimal>, Decimal, u32); 6] = [
            (
                "calls per record",
                get(|s| s.calls_per_record),
                ratio(st.items, f.records_valid),
                2,
            ),
            (
                "calls sent",
                get(|s| s.calls_to_send),
                Decimal::from(st.items_attempted),
                1,
            ),
            (
                "input tokens per call (mean)",
                get(|s| s.input_tokens_per_call),
                ratio(st.usage.input_tokens, st.answered),
                1,
            ),
            (
                "output tokens per call (mean)",
                get(|s| s.output_tokens_per_call),
                ratio(st.usage.output_tokens, st.answered),
                1,
            ),
            (
                "retry rate (%)",
                get(|s| s.retry_rate).map(|r| r * hundred),
                ratio(st.retries(), st.items_attempted) * hundred,
                2,
            ),
            (
                "cost (USD)",
                get(|s| s.expected_cost),
                st.cost.to_decimal(),
                6,
            ),
        ];
        for (figure, planned, actual, places) in rows {
            // The actual cost is the ledger's, exact: the report's figure for the stage.
            let actual_places = if figure == "cost (USD)" { 12 } else { places };
            out.push(StageLine {
                stage: name.to_string(),
                line: Line {
                    figure,
                    plan: planned.map(|d| fmt(d, places)).unwrap_or("-".into()),
                    actual: fmt(actual, actual_places),
                    difference: diff(planned, actual, places),
                },
            });
        }
    }
    out
}

impl Reconciliation {
    /// Batches whose ledger differs from a provider figure.
    pub fn mismatches(&self) -> usize {
        self.batches
            .iter()
            .filter(|b| b.usage_matches() == Some(false) || b.bill_matches() == Some(false))
            .count()
    }

    /// Plan vs actual and the ledger vs the provider, as tables that fit `width` columns.
    pub fn to_text(&self, width: Option<u16>) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(s, "run {}  pipeline {}", self.run_id, self.pipeline);
        let _ = writeln!(s, "\nplan vs actual");
        let mut t = crate::util::table::table(&["figure", "plan", "actual", "difference"], width);
        for l in &self.lines {
            t.add_row(vec![
                l.figure.to_string(),
                l.plan.clone(),
                l.actual.clone(),
                l.difference.clone(),
            ]);
        }
        crate::util::table::align_right(&mut t, &[1, 2]);
        s.push_str(&crate::util::table::render(&t));
        if !self.stages.is_empty() {
            let _ = writeln!(s, "\nplan vs actual, per stage");
            let mut t = crate::util::table::table(
                &["stage", "figure", "plan", "actual", "difference"],
                width,
            );
            let mut last = "";
            for l in &self.stages {
                t.add_row(vec![
                    if l.stage == last {
                        String::new()
                    } else {
                        l.stage.clone()
                    },
                    l.line.figure.to_string(),
                    l.line.plan.clone(),
                    l.line.actual.clone(),
                    l.line.difference.clone(),
                ]);
                last = &l.stage;
            }
            crate::util::table::align_right(&mut t, &[2, 3]);
            s.push_str(&crate::util::table::render(&t));
        }
        let _ = writeln!(s, "\nledger vs provider, per batch");
        let mut t = crate::util::table::table(
            &[
                "provider batch",
                "in",
                "out",
                "cost_usd",
                "provider usage",
                "provider bill",
            ],
            width,
        );
        let mut totals = (LedgerTotals::default(), Usd::ZERO, true);
        for b in &self.batches {
            let usage = match (b.provider_usage, b.usage_matches()) {
                (Some(_), Some(true)) => "= ledger".to_string(),
                (Some(u), _) => format!("in {} out {} ≠", u.input_tokens, u.output_tokens),
                (None, _) => "not reported".to_string(),
            };
            let bill = match (&b.bill, b.bill_matches()) {
                (Some(_), Some(true)) => "= ledger".to_string(),
                (Some(x), _) => format!("{} ({} req) ≠", x.cost.to_decimal_string(), x.requests),
                (None, _) => "-".to_string(),
            };
            let name = match (&b.provider_batch_id, b.mode) {
                (Some(id), _) => crate::util::text::printable(id),
                (None, BatchMode::Online) => format!(
                    "online ({})",
                    crate::util::text::plural(b.requests, "request", "requests")
                ),
                (None, _) => "(never reached the provider)".to_string(),
            };
            t.add_row(vec![
                name,
                b.ledger.usage.input_tokens.to_string(),
                b.ledger.usage.output_tokens.to_string(),
                b.ledger.cost.to_decimal_string(),
                usage,
                bill,
            ]);
            totals.0.usage.add(&b.ledger.usage);
            totals.0.cost += b.ledger.cost;
            if let Some(x) = &b.bill {
                totals.1 += x.cost;
            } else {
                totals.2 = false;
            }
        }
        t.add_row(vec![
            "total".to_string(),
            totals.0.usage.input_tokens.to_string(),
            totals.0.usage.output_tokens.to_string(),
            totals.0.cost.to_decimal_string(),
            String::new(),
            if totals.2 && !self.batches.is_empty() {
                format!(
                    "bill {} (difference {})",
                    totals.1.to_decimal_string(),
                    (totals.0.cost - totals.1).to_decimal_string()
                )
            } else {
                String::new()
            },
        ]);
        crate::util::table::align_right(&mut t, &[1, 2, 3]);
        s.push_str(&crate::util::table::render(&t));
        let m = self.mismatches();
        let _ = writeln!(
            s,
            "\n{}",
            if m == 0 {
                "every batch: ledger = provider figures".to_string()
            } else {
                format!(
                    "{} where the ledger differs from the provider's figures",
                    crate::util::text::plural(m as u64, "batch", "batches")
                )
            }
        );
        s
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "run_id": self.run_id,
            "pipeline": self.pipeline,
            "plan_vs_actual": self.lines.iter().map(|l| json!({
                "figure": l.figure, "plan": l.plan, "actual": l.actual, "difference": l.difference,
            })).collect::<Vec<_>>(),
            "batches": self.batches.iter().map(|b| json!({
                "batch_id": b.batch_id,
                "provider_batch_id": b.provider_batch_id,
                "ledger": {"input_tokens": b.ledger.usage.input_tokens, "cached_input_tokens": b.ledger.usage.cached_input_tokens,
                    "output_tokens": b.ledger.usage.output_tokens, "reasoning_tokens": b.ledger.usage.reasoning_tokens,
                    "cost_usd": b.ledger.cost.to_decimal_string()},
                "provider_usage": b.provider_usage,
                "usage_matches": b.usage_matches(),
                "bill": b.bill.as_ref().map(|x| json!({"requests": x.requests, "usage": x.usage,
                    "cost_usd": x.cost.to_decimal_string(), "source": x.source})),
                "bill_matches": b.bill_matches(),
            })).collect::<Vec<_>>(),
            "mismatches": self.mismatches(),
        });
        if !self.stages.is_empty() {
            v["plan_vs_actual_per_stage"] = self
                .stages
                .iter()
                .map(|l| {
                    json!({"stage": l.stage, "figure": l.line.figure, "plan": l.line.plan,
                        "actual": l.line.actual, "difference": l.line.difference})
                })
                .collect();
        }
        v
    }
}
