//! Planning: cutting batches from what is plannable, within the provider's limits and the
//! run's budget with every request's worst case reserved (docs/design.md, invariant 3);
//! choosing batch or online mode; the limits a worker takes from the run it serves; and
//! what a capped run says it would need to send the rest.

use std::time::Instant;

use super::{Event, RunError, Runner};
use crate::cost::{PricingMode, Rates};
use crate::provider::BatchProvider;
use crate::store::{BatchMode, PlanOutcome, PlanRequest, Store};

/// How a planning round ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Planning {
    /// At least one batch planned.
    Planned,
    /// Nothing planned (nothing plannable, or another worker had it locked).
    Nothing,
    /// Plannable items exist, but the budget or the per-item cap refuses them.
    Blocked,
}

impl<S: Store, P: BatchProvider> Runner<'_, S, P> {
    /// Plans batches of every stage, earlier stages first, until nothing more fits; says
    /// how planning ended.
    pub(super) async fn plan_round(&mut self) -> Result<Planning, RunError> {
        let mut outcome = Planning::Nothing;
        for i in 0..self.stages.len() {
            let name = self.stages[i].stage.name.clone();
            match self.plan_stage(&name).await? {
                Planning::Planned => outcome = Planning::Planned,
                Planning::Blocked => {
                    if outcome == Planning::Nothing {
                        outcome = Planning::Blocked;
                    }
                    self.budget_stage.get_or_insert(name);
                }
                Planning::Nothing => {}
            }
            if self.ctx.shutdown.is_set() {
                break;
            }
        }
        Ok(outcome)
    }

    /// Plans batches of one stage until nothing more fits.
    async fn plan_stage(&mut self, stage: &str) -> Result<Planning, RunError> {
        let ctx = self.ctx;
        let p = ctx.pipeline;
        let model = self.stage_run(stage)?.stage.model.clone();
        let mode = self.plan_mode(stage).await?;
        let pricing_mode = if mode == BatchMode::Online {
            PricingMode::Standard
        } else {
            PricingMode::Batch
        };
        let lease_ms = self.lease_ms();
        let t = Instant::now();
        let mut outcome = Planning::Nothing;
        while !ctx.shutdown.is_set() {
            let mut max_requests = p.batch.max_requests;
            if let (Some(bedrock), BatchMode::Batch) = (&p.provider.bedrock, mode) {
                // Every Bedrock job must hold the model's minimum: the items are spread evenly
                // over as few jobs as the cap allows (290 under a cap of 200: 145 and 145, not
                // 200 and a 90 that would fail), and a remainder below the minimum waits for
                // the next round, which sends it online.
                let pending = ctx.store.plannable_count(&p.name, stage).await?;
                if pending < bedrock.min_records {
                    break;
                }
                max_requests = even_share(pending, max_requests);
            }
            let budget = self.budget_check(stage, pricing_mode).await?;
            let req = PlanRequest {
                run_id: &self.run_id,
                pipeline: &p.name,
                stage,
                provider: ctx.provider.kind(),
                model: &model,
                pricing_mode,
                max_requests,
                max_bytes: p.batch.max_bytes,
                line_overhead: ctx.provider.codec().line_overhead(),
                budget,
                only_retries: self.budget_hit,
                mode,
                owner: &ctx.worker_id,
                lease_ms,
            };
            match ctx.store.plan_batch(&req).await? {
                PlanOutcome::Planned {
                    batch,
                    cut_by_budget,
                } => {
                    crate::failpoint!("plan.after_commit");
                    outcome = Planning::Planned;
                    ctx.observer.event(&Event::Planned {
                        batch_id: batch.id.clone(),
                        requests: batch.request_count as u64,
                    });
                    if cut_by_budget {
                        // The cap refused the next item: no later round starts new items
                        // (what ingested batches give back of their reservations must not
                        // dribble out as ever smaller batches).
                        self.budget_hit = true;
                        self.budget_stage.get_or_insert_with(|| stage.to_string());
                        break;
                    }
                }
                PlanOutcome::Nothing => {
                    // Nothing plannable within the per-item cap — or nothing this worker
                    // could lock: another one is planning the same items. Under a cap that
                    // refused an item, what is left waits for a bigger budget.
                    if outcome == Planning::Nothing
                        && (self.budget_hit || self.refused_by_item_cap(stage, budget).await?)
                    {
                        outcome = Planning::Blocked;
                    }
                    break;
                }
                PlanOutcome::OverBudget { .. } => {
                    self.budget_hit = true;
                    self.budget_stage.get_or_insert_with(|| stage.to_string());
                    if outcome == Planning::Nothing {
                        outcome = Planning::Blocked;
                    }
                    break;
                }
            }
        }
        self.times.prepare += t.elapsed();
        Ok(outcome)
    }

    /// Whether every plannable item is over the per-item cap.
    async fn refused_by_item_cap(
        &self,
        stage: &str,
        budget: Option<crate::store::BudgetCheck>,
    ) -> Result<bool, RunError> {
        let Some(limit) = budget.and_then(|b| b.max_item_input_tokens) else {
            return Ok(false);
        };
        let p = self.ctx.pipeline;
        let store = self.ctx.store;
        let over = store.plannable_over(&p.name, stage, limit).await?;
        Ok(over > 0 && over == store.plannable_count(&p.name, stage).await?)
    }

    /// How the next batch is sent: `online` for an online pipeline, or for a retry round
    /// smaller than `retry_online_below`; `batch` otherwise.
    pub(super) async fn plan_mode(&self, stage: &str) -> Result<BatchMode, RunError> {
        let p = self.ctx.pipeline;
        if p.provider.mode == crate::config::Mode::Online {
            return Ok(BatchMode::Online);
        }
        if let Some(bedrock) = &p.provider.bedrock {
            // A Bedrock job needs the model's minimum of records: a smaller round (a first
            // night of a few records, or the last retries) goes online.
            let pending = self.ctx.store.plannable_count(&p.name, stage).await?;
            if pending > 0 && pending < bedrock.min_records {
                return Ok(BatchMode::Online);
            }
        }
        if let Some(below) = p.provider.retry_online_below {
            let store = self.ctx.store;
            let pending = store.plannable_count(&p.name, stage).await?;
            let retries = store.plannable_retries(&p.name, stage).await?;
            if pending > 0 && pending == retries && pending < below {
                return Ok(BatchMode::Online);
            }
        }
        Ok(BatchMode::Batch)
    }

    /// The budget this planning round must fit in (`None`: no limits).
    async fn budget_check(
        &self,
        stage: &str,
        mode: PricingMode,
    ) -> Result<Option<crate::store::BudgetCheck>, RunError> {
        let b = self.budget;
        if b.max.is_none() && b.max_item.is_none() {
            return Ok(None);
        }
        let available = match b.max {
            Some(cap) => cap - self.ctx.store.run_commitment(&self.run_id).await?,
            None => crate::cost::Usd::from_pico(i64::MAX as i128),
        };
        let sr = self.stage_run(stage)?;
        let max_out = sr.stage.prompt.max_output_tokens as u64;
        let rates = *sr.rates(mode);
        Ok(Some(crate::store::BudgetCheck {
            available,
            input_price: rates.input,
            output_price: rates.output,
            max_output_tokens: max_out,
            max_item_input_tokens: b
                .max_item
                .map(|m| max_item_input_tokens(m, &rates, max_out)),
        }))
    }

    /// A worker serves the latest run of its pipeline: new batches are charged to it and
    /// planned under its limits. Returns false when the pipeline has no run yet.
    pub(super) async fn follow_latest_run(&mut self) -> Result<bool, RunError> {
        let p = self.ctx.pipeline;
        let Some(run) = self.ctx.store.last_run(Some(&p.name)).await? else {
            return Ok(false);
        };
        if run.id != self.run_id {
            tracing::info!(run = %run.id, pipeline = %p.name, "serving run");
            self.budget_hit = false;
            // Lines noted for the run served before mean nothing in this one: its records
            // are looked at whole.
            self.advance_lines = Vec::new();
            self.advance_due = true;
        }
        self.run_id = run.id;
        self.budget = crate::config::Budget {
            max: run
                .budget_pico
                .map(|v| crate::cost::Usd::from_pico(v as i128)),
            max_item: run
                .max_item_pico
                .map(|v| crate::cost::Usd::from_pico(v as i128)),
        };
        Ok(true)
    }

    /// What stopped a capped run and what the rest would take (per stage, naming the one
    /// the cap stopped first).
    pub(super) async fn budget_message(&self) -> Result<String, RunError> {
        let ctx = self.ctx;
        let p = ctx.pipeline;
        let store = ctx.store;
        let spent = store.run_commitment(&self.run_id).await?;
        let mut left = 0u64;
        let mut rest = crate::cost::Usd::ZERO;
        let mut refused = 0u64;
        for sr in &self.stages {
            let (n, tokens) = store.plannable_totals(&p.name, &sr.stage.name).await?;
            let rates = *sr.rates(p.provider.pricing_mode());
            let max_out = sr.stage.prompt.max_output_tokens as u64;
            left += n;
            rest = rest + rates.input.cost(tokens) + rates.output.cost(max_out.saturating_mul(n));
            if let Some(max_item) = self.budget.max_item {
                let limit = max_item_input_tokens(max_item, &rates, max_out);
                refused += store.plannable_over(&p.name, &sr.stage.name, limit).await?;
            }
        }
        let mut why = Vec::new();
        if let Some(cap) = self.budget.max {
            why.push(format!(
                "spent {} of the {} cap; the {} item(s) left need up to {} more (one attempt each, every answer at max_output_tokens)",
                spent.display_rounded(6),
                cap.display_rounded(6),
                crate::util::text::n(left),
                rest.display_rounded(6)
            ));
        }
        if let Some(max_item) = self.budget.max_item
            && refused > 0
        {
            why.push(format!(
                "{refused} item(s) refused: their worst case alone is above max_item_usd {}",
                max_item.display_rounded(6)
            ));
        }
        if p.is_multi_stage()
            && let Some(stage) = &self.budget_stage
        {
            why.push(format!(
                "stage `{stage}` was the first the cap stopped; the records waiting on it stay pending"
            ));
        }
        Ok(format!(
            "budget: {}; raise --budget-usd (or [budget]) and run again to send the rest",
            why.join("; ")
        ))
    }
}

/// The most input tokens an item may have for its worst case to stay within `max_item`.
fn max_item_input_tokens(max_item: crate::cost::Usd, rates: &Rates, max_out: u64) -> u64 {
    let room = max_item.pico() - rates.output.cost(max_out).pico();
    if room < 0 {
        return 0;
    }
    match rates.input.pico_per_token() {
        0 => u64::MAX,
        p => (room / p as i128).min(u64::MAX as i128) as u64,
    }
}

/// The size of each of the fewest batches of at most `cap` that hold `pending` items, as
/// even as can be.
fn even_share(pending: u64, cap: usize) -> usize {
    let cap = cap.max(1) as u64;
    let batches = pending.div_ceil(cap).max(1);
    pending.div_ceil(batches).min(cap) as usize
}

#[cfg(test)]
mod tests {
    use super::even_share;

    #[test]
    fn items_are_spread_evenly_over_the_fewest_batches() {
        assert_eq!(even_share(290, 200), 145);
        assert_eq!(even_share(201, 200), 101);
        assert_eq!(even_share(200, 200), 200);
        assert_eq!(even_share(120, 200), 120);
        assert_eq!(even_share(100_001, 50_000), 33_334);
        assert_eq!(even_share(0, 200), 0);
    }
}
