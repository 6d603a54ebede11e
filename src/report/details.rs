//! What `report --json` (and the HTML report built from it) adds to a run's figures: its
//! ledger by stage, model and pricing mode, its attempts by verdict, its batches' timeline,
//! plan vs actual, and the pipeline's recent runs night by night.
//!
//! The run's figures are frozen once it is over; these are read from the store at report
//! time (they do not change once the run's batches are closed).

use serde_json::{Value, json};

use super::{RunReport, usage_json};
use crate::cost::Usd;
use crate::store::{BatchRow, CostGroup, OutcomeGroup, Store, StoreError};
use crate::util::time::rfc3339;

/// How many of the pipeline's runs the history goes back (this one included).
pub const HISTORY_RUNS: u32 = 30;

/// The store's further figures of one run.
#[derive(Clone, Debug)]
pub struct Details {
    pub costs: Vec<CostGroup>,
    pub outcomes: Vec<OutcomeGroup>,
    pub batches: Vec<BatchRow>,
    pub plan: Option<crate::reconcile::Reconciliation>,
    /// The pipeline's runs up to this one, oldest first.
    pub history: Vec<RunReport>,
}

impl Details {
    pub async fn load<S: Store>(store: &S, rep: &RunReport) -> Result<Self, StoreError> {
        let run = &rep.run;
        let costs = store.run_costs(&run.id).await?;
        let outcomes = store.run_outcomes(&run.id).await?;
        let batches = store.run_batches(&run.id).await?;
        let plan = match run.plan_json {
            Some(_) => Some(crate::reconcile::reconcile(store, run, None).await?),
            None => None,
        };
        // The runs before this one (and this one), not the ones after it: a report of an
        // old run shows the nights that led to it.
        let mut history = Vec::new();
        for r in store
            .recent_runs(Some(&run.pipeline), HISTORY_RUNS * 4)
            .await?
        {
            if r.started_at > run.started_at {
                continue;
            }
            if history.len() as u32 == HISTORY_RUNS {
                break;
            }
            history.push(if r.id == run.id {
                rep.clone()
            } else {
                RunReport::load(store, r).await?
            });
        }
        history.reverse();
        Ok(Details {
            costs,
            outcomes,
            batches,
            plan,
            history,
        })
    }
}

/// `report --json`: the run's figures with the details added under their own keys.
pub fn full_json(rep: &RunReport, d: &Details) -> Value {
    let mut v = rep.to_json();
    let processed = rep.figures.processed_records;
    v["by_model"] = d
        .costs
        .iter()
        .map(|c| {
            json!({
                "stage": c.stage,
                "model": c.model,
                "pricing_mode": c.pricing_mode,
                "calls": c.totals.rows,
                "tokens": usage_json(&c.totals.usage),
                "cost_usd": c.totals.cost.to_decimal_string(),
                "standard_cost_usd": c.totals.standard_cost.to_decimal_string(),
                "cost_per_processed_item_usd": c.totals.cost.per(processed).map(|x| x.to_string()),
            })
        })
        .collect();
    v["outcomes"] = d
        .outcomes
        .iter()
        .map(|o| {
            json!({
                "stage": o.stage,
                "verdict": o.verdict,
                "attempts": o.attempts,
            })
        })
        .collect();
    v["batch_timeline"] = d.batches.iter().map(batch_json).collect();
    if let Some(r) = &d.plan {
        let rec = r.to_json();
        v["plan_vs_actual"] = rec["plan_vs_actual"].clone();
        if let Some(s) = rec.get("plan_vs_actual_per_stage") {
            v["plan_vs_actual_per_stage"] = s.clone();
        }
    }
    v["history"] = d
        .history
        .iter()
        .map(|h| {
            json!({
                "run_id": h.run.id,
                "started_at": rfc3339(h.run.started_at),
                "status": h.run.status,
                "processed": h.figures.processed_records,
                "cost_usd": h.cost().to_decimal_string(),
                "cost_per_processed_item_usd": h.cost_per_processed_item().map(|x| x.to_string()),
                "calls_per_processed_item": h.calls_per_processed_item(h.figures.attempts).map(|x| x.to_string()),
            })
        })
        .collect();
    v
}

fn batch_json(b: &BatchRow) -> Value {
    json!({
        "batch_id": b.id,
        "provider_batch_id": b.provider_batch_id,
        "stage": b.stage,
        "mode": b.mode,
        "model": b.model,
        "pricing_mode": b.pricing_mode,
        "requests": b.request_count,
        "state": b.state,
        "provider_status": b.provider_status,
        "end_state": b.end_state,
        "reserved_usd": Usd::from_pico(b.reserved_pico as i128).to_decimal_string(),
        "created_at": rfc3339(b.created_at),
        "submitted_at": b.submitted_at.map(rfc3339),
        "ended_at": b.ended_at.map(rfc3339),
        "ingested_at": b.ingested_at.map(rfc3339),
    })
}
