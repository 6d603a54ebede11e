//! Settling: once nothing of a run is open its figures are final. A batch's close is
//! reported, a detached run gets its end status, figures are frozen on the run row and
//! record rows of older runs are pruned.

use super::{Event, RunError, Runner};
use crate::provider::BatchProvider;
use crate::store::{ApplyStats, BatchRow, RunStatus, Store};

/// Record rows (one per source line) are kept for this many of a pipeline's latest runs;
/// older runs keep their frozen figures, so every report still adds up.
pub const KEEP_RECORDS_OF_RUNS: u32 = 7;

impl<S: Store, P: BatchProvider> Runner<'_, S, P> {
    /// A batch was closed: reports it (with what its results cost) and, when it was the
    /// last open batch of its run, settles that run.
    pub(super) async fn ingested(&self, b: &BatchRow, stats: ApplyStats) -> Result<(), RunError> {
        let totals = self.ctx.store.ledger_totals_for_batch(&b.id).await?;
        self.ctx.observer.event(&Event::Ingested {
            batch_id: b.id.clone(),
            stats,
            cost: totals.cost,
            stage: b.stage.clone(),
            model: b.model.clone(),
            pricing_mode: b.pricing_mode.clone(),
            usage: totals.usage,
        });
        self.settle(&b.run_id).await
    }

    /// Once nothing of a run is open any more its figures are final: a detached run gets
    /// its end status (from whichever process ingested its last batch), the figures are
    /// frozen on the run row, and record rows of the pipeline's older runs are pruned.
    pub(super) async fn settle(&self, run_id: &str) -> Result<(), RunError> {
        let store = self.ctx.store;
        if store.open_batch_count(run_id).await? > 0 {
            return Ok(());
        }
        let Some(run) = store.run(run_id).await? else {
            return Ok(());
        };
        match run.status {
            // Its own process settles it when it finishes.
            RunStatus::Running => return Ok(()),
            RunStatus::Detached => {
                // Workers plan for the pipeline's latest run: while it is the latest and
                // work is waiting, more may still be charged to it.
                let latest = store
                    .last_run(Some(&run.pipeline))
                    .await?
                    .is_some_and(|l| l.id == run.id);
                // Asked first, and the figures (a pass over the whole run) only when nothing
                // is waiting: a lone worker finds no batch open after each one it ingests,
                // and reading the figures there made a run's cost grow with its square.
                if latest {
                    for stage in run.stage.split(',') {
                        if store.plannable_count(&run.pipeline, stage).await? > 0 {
                            return Ok(());
                        }
                    }
                }
                let f = store.run_figures(run_id).await?;
                // A multi-stage run whose records are not all final yet: its later stages
                // are still to be created (by the next run or a worker).
                let unsettled =
                    !f.stages.is_empty() && f.records_done + f.records_failed < f.records_valid;
                if latest && unsettled {
                    return Ok(());
                }
                let (status, code, message) = if f.exhausted > 0 {
                    (
                        RunStatus::Failed,
                        1,
                        format!(
                            "{} item(s) failed for good; its batches were collected later",
                            f.exhausted
                        ),
                    )
                } else {
                    (
                        RunStatus::Completed,
                        0,
                        "detached; its batches were collected later".to_string(),
                    )
                };
                store
                    .finish_run(run_id, status, code, Some(&message))
                    .await?;
                self.ctx.observer.event(&Event::RunEnded {
                    run_id: run_id.to_string(),
                    status,
                    exit_code: code,
                });
            }
            _ => {}
        }
        let f = match &self.final_figures {
            Some(f) if run_id == self.run_id => f.clone(),
            _ => store.run_figures(run_id).await?,
        };
        store.freeze_figures(run_id, &f.to_json()).await?;
        store
            .prune_records(&run.pipeline, KEEP_RECORDS_OF_RUNS)
            .await?;
        Ok(())
    }
}
