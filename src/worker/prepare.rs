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

    /// Stores the worksheet this run starts from, for `reconcile` to hold it against.
    pub(super) async fn record_plan(&self, exact_tokens: bool) -> Result<(), RunError> {
        let ctx = self.ctx;
        let p = ctx.pipeline;
        let store = ctx.store;
        let run = store
            .run(&self.run_id)
            .await?
            .ok_or_else(|| StoreError::Invalid("the run row vanished".into()))?;
        let f = store.run_figures(&self.run_id).await?;
        let ws = crate::plan::Worksheet::compute(crate::plan::PlanInputs {
            pipeline: p,
            price: &ctx.prices[0],
            mode: ctx.pipeline.provider.pricing_mode(),
            exact_tokens,
            records_read: run.records_read as u64,
            quarantined: run.records_quarantined as u64,
            unique_items: f.unique_items,
            already_done: f.succeeded,
            todo_tokens: store
                .plannable_tokens(&p.name, &p.first_stage().name)
                .await?,
            todo_records: f.records_valid.saturating_sub(f.records_done),
            job_tokens: store.run_item_tokens(&self.run_id).await?,
            job_records: f.records_valid,
            history: store.history(&p.name, &p.first_stage().name).await?,
            monthly_items: None,
            backfill_items: None,
        });
        store
            .set_run_plan(&self.run_id, &ws.to_json().to_string())
            .await?;
        Ok(())
    }
}
