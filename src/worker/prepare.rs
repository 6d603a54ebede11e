//! Preparing a run: the check that what was read is usable (not empty, not mostly quarantined: docs/design.md,
//! invariant 5), and the worksheet stored for `reconcile`. Reading and storing the records
//! themselves is `ingest.rs`.

use super::{RunError, Runner};
use crate::provider::BatchProvider;
use crate::store::{Store, StoreError};

impl<S: Store, P: BatchProvider> Runner<'_, S, P> {
    /// Whether the source as read is unusable: empty, or mostly quarantined (a template
    /// field no record has, the wrong id field, the wrong file). Such a run sends nothing.
    pub(super) async fn bad_input(&self) -> Result<Option<String>, RunError> {
        let ctx = self.ctx;
        let p = ctx.pipeline;
        let run = ctx
            .store
            .run(&self.run_id)
            .await?
            .ok_or_else(|| StoreError::Invalid("the run row vanished".into()))?;
        let (read, quarantined) = (run.records_read as u64, run.records_quarantined as u64);
        if read == 0 {
            return Ok(Some(format!(
                "the source {} holds no records: an empty export? Nothing was sent",
                p.source.path.display()
            )));
        }
        let share = rust_decimal::Decimal::from(quarantined) / rust_decimal::Decimal::from(read);
        if quarantined == 0 || share <= p.source.max_quarantined_share {
            return Ok(None);
        }
        let reasons = ctx.store.quarantine_summary(&self.run_id, 3).await?;
        let reasons: Vec<String> = reasons
            .iter()
            .map(|(field, reason, n)| match field {
                Some(f) => format!("{n} × field `{f}`: {reason}"),
                None => format!("{n} × {reason}"),
            })
            .collect();
        Ok(Some(format!(
            "{quarantined} of {read} records were quarantined ({}%), above source.max_quarantined_share = {}: \
             nothing was sent. Most common: {}. See `nightshift report --items`; `nightshift validate` checks the template against the source",
            (share * rust_decimal::Decimal::from(100)).round_dp(1),
            p.source.max_quarantined_share.normalize(),
            reasons.join("; ")
        )))
    }

    /// Stores the worksheet this run starts from, for `reconcile` to hold it against;
    /// `later`: the later stages' scan of the run's records, which ingest makes for a
    /// multi-stage pipeline as it stores them.
    pub(super) async fn record_plan(
        &self,
        exact_tokens: bool,
        later: Option<Vec<crate::plan::LaterScan>>,
    ) -> Result<(), RunError> {
        let ctx = self.ctx;
        let p = ctx.pipeline;
        let store = ctx.store;
        let run = store
            .run(&self.run_id)
            .await?
            .ok_or_else(|| StoreError::Invalid("the run row vanished".into()))?;
        // A multi-stage run's records link to their items elsewhere: of its job, only the
        // count of records is read (the store reads no more of it).
        let job = store.run_job(&self.run_id).await?;
        let first = &p.first_stage().name;
        let mut inputs = crate::plan::PlanInputs {
            pipeline: p,
            price: &ctx.prices[0],
            mode: ctx.pipeline.provider.pricing_mode(),
            exact_tokens,
            records_read: run.records_read as u64,
            quarantined: run.records_quarantined as u64,
            unique_items: job.items,
            already_done: job.items_done,
            todo_tokens: store.plannable_tokens(&p.name, first).await?,
            todo_records: job.records.saturating_sub(job.records_done),
            job_tokens: job.tokens,
            job_records: job.records,
            history: store.history(&p.name, first).await?,
            monthly_items: None,
            backfill_items: None,
            stages: None,
        };
        if p.is_multi_stage() {
            // The first stage's figures are its own items'; the later stages' come from the
            // records the run stored.
            let items = store.run_stage_items(&self.run_id, first).await?;
            inputs.unique_items = items.tokens.len();
            inputs.already_done = items.succeeded;
            inputs.job_tokens = items.tokens;
            let done_first = store.stage_done_count(&self.run_id, first).await?;
            inputs.todo_records = job.records.saturating_sub(done_first);
            let scans = later.ok_or_else(|| {
                StoreError::Invalid("ingest handed over no scan of the run's records".into())
            })?;
            inputs.stages = Some(self.later_facts(items.links, scans).await?);
        }
        let ws = crate::plan::Worksheet::compute(inputs);
        store
            .set_run_plan(&self.run_id, &ws.to_json().to_string())
            .await?;
        Ok(())
    }

    /// What the worksheet of a multi-stage run knows of its stages after the first: the
    /// records the run stored, scanned as `plan` scans the source (samples, chunks, the
    /// fields each template inserts) by ingest as it stored them (`scans`); the records
    /// whose work at each stage is done (this run's links, after the first advance); each
    /// stage's history.
    async fn later_facts(
        &self,
        first_links: u64,
        scans: Vec<crate::plan::LaterScan>,
    ) -> Result<crate::plan::StagesFacts<'_>, RunError> {
        let ctx = self.ctx;
        let p = ctx.pipeline;
        let store = ctx.store;
        let history = crate::plan::later_history(store, p, Some(&self.run_id)).await?;
        let mut later = Vec::new();
        for (k, (sr, scan)) in self.stages[1..].iter().zip(scans).enumerate() {
            let done = store.stage_done_count(&self.run_id, &sr.stage.name).await?;
            later.push(crate::plan::StageFacts {
                price: &ctx.prices[k + 1],
                exact_tokens: sr.counter.is_exact(),
                fixed_tokens: sr.counter.fixed,
                scan,
                records_done: done,
                done_source: "this run's links: the stage's items for them succeeded, or skipped"
                    .into(),
                history: history[k].0,
                ran: history[k].1,
            });
        }
        Ok(crate::plan::StagesFacts { first_links, later })
    }
}
