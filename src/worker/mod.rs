//! The pipeline runner: ingest → plan → build → upload → create → poll → download → apply →
//! retry, until every item is final.
//!
//! Write-ahead throughout: each batch's state is committed before the side effect that
//! depends on it (`uploading` before the upload, `creating` before the create), and a batch
//! found in one of those states is reconciled with the provider (file by name, batch by the
//! local id it carries) before anything is sent again. An ambiguous create — the request may
//! have taken effect — is never retried blindly. Results are applied in chunks whose writes
//! are idempotent, so a crash anywhere is resumed by running again: a new run first carries
//! every open batch of its pipeline to the end, whichever run created it.

mod apply;
mod collect;
mod errors;
mod events;
mod ingest;
mod online;
mod options;
mod submit;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cost::{PricingMode, Rates};
use crate::dedupe::RequestShape;
use crate::provider::{BatchProvider, ProviderError};
use crate::store::{
    ApplyStats, BatchRow, Claim, NewRun, PlanOutcome, PlanRequest, RunStatus, Store, StoreError,
    now_ms,
};
use crate::util::fs::{self as fsutil, AtomicFile};
use crate::validate::OutputValidator;

use options::{batches_dir, downloads_dir};

pub use apply::judge_line;
pub use collect::{CancelReport, cancel};
pub use errors::{EXIT_CONFIG, EXIT_ERROR, EXIT_FAILED_ITEMS, EXIT_RESUMABLE, RunError};
pub use events::{Event, LogObserver, Observer};
pub use options::{RunContext, Shutdown, schema_name, spec};

/// What a finished (or stopped) run did.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    pub run_id: String,
    pub status: RunStatus,
    pub exit_code: i32,
    /// Requests this process sent to the provider (0 on a rerun with nothing to do).
    pub requests_sent: u64,
    pub output_path: PathBuf,
    /// Whether the results file was (re)written; a run stopped by bad input leaves it.
    pub wrote_output: bool,
    pub message: Option<String>,
    /// Time spent in local work, for benchmarks.
    pub times: PhaseTimes,
}

/// Wall time spent in this process's own work, apart from waiting on the provider.
#[derive(Clone, Copy, Debug, Default)]
pub struct PhaseTimes {
    /// Read, render, hash, dedupe, plan and write batch files.
    pub prepare: Duration,
    /// Download, parse, validate, price and store results.
    pub results: Duration,
}

/// Record rows (one per source line) are kept for this many of a pipeline's latest runs;
/// older runs keep their frozen figures, so every report still adds up.
pub const KEEP_RECORDS_OF_RUNS: u32 = 7;

/// Polling state of one submitted batch.
struct PollClock {
    next: Instant,
    interval: Duration,
}

/// How a planning round ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Planning {
    /// At least one batch planned.
    Planned,
    /// Nothing planned (nothing plannable, or another worker had it locked).
    Nothing,
    /// Plannable items exist, but the budget or the per-item cap refuses them.
    Blocked,
}

/// How a pass over the open batches ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// Nothing of the pipeline is open any more.
    Done,
    /// Items are left that the budget does not allow sending.
    Budget,
    /// A stop was requested.
    Interrupted,
    /// `--detach`: everything ready was sent.
    Detached,
}

pub(crate) struct Runner<'a, S: Store, P: BatchProvider> {
    ctx: &'a RunContext<'a, S, P>,
    /// The run this process records (empty for `cancel`; a worker's is the run it serves).
    run_id: String,
    /// Whether `run_id` is this process's own run (`nightshift run`).
    own_run: bool,
    /// Whether this run wrote its results file.
    wrote_output: bool,
    validator: OutputValidator,
    batch_rates: Rates,
    standard_rates: Rates,
    polls: HashMap<String, PollClock>,
    requests_sent: u64,
    times: PhaseTimes,
    /// Creates that failed ambiguously: reconcile before creating again (the grace counts
    /// from the batch's stored `creating_at`).
    maybe_created: HashSet<String>,
    /// Creates that failed before reaching the provider: safe to send again at once.
    not_created: HashSet<String>,
    /// Consecutive transient failures talking to the provider (they lengthen the pause).
    transient_streak: u32,
    /// Since when every call to the provider has failed: the run gives up once this is
    /// `unreachable_timeout` old.
    failing_since: Option<Instant>,
    /// Whether this failing spell was already reported at the default log level.
    failing_warned: bool,
    /// Set when a batch is deliberately left for later (reconcile grace period).
    waiting: bool,
    /// The limits planning honours: the run's own, or (a worker) those of the run it serves.
    budget: crate::config::Budget,
    /// The cap refused an item: from then on the run only retries what it sent (no creep).
    budget_hit: bool,
    /// Nothing new is planned (the source could not be read): open batches are collected.
    collect_only: bool,
}

impl<'a, S: Store, P: BatchProvider> Runner<'a, S, P> {
    fn new(ctx: &'a RunContext<'a, S, P>) -> Result<Self, RunError> {
        let p = ctx.pipeline;
        let validator = OutputValidator::load(&p.output.schema).map_err(RunError::Config)?;
        let mode = p.provider.pricing_mode();
        let batch_rates = match (mode, ctx.price.batch) {
            (_, Some(b)) => b,
            // Online only: batch prices are never needed.
            (PricingMode::Standard, None) => ctx.price.standard,
            (PricingMode::Batch, None) => {
                return Err(RunError::Config(format!(
                    "model `{}` has no batch price",
                    p.provider.model
                )));
            }
        };
        for dir in [batches_dir(&ctx.work_dir), downloads_dir(&ctx.work_dir)] {
            fsutil::create_private_dir_all(&dir).map_err(|source| RunError::Output {
                path: dir.clone(),
                source,
            })?;
            let _ = fsutil::sweep_temp_files(&dir);
        }
        Ok(Runner {
            ctx,
            run_id: String::new(),
            own_run: false,
            wrote_output: false,
            validator,
            batch_rates,
            standard_rates: ctx.price.standard,
            polls: HashMap::new(),
            requests_sent: 0,
            times: PhaseTimes::default(),
            maybe_created: HashSet::new(),
            not_created: HashSet::new(),
            transient_streak: 0,
            failing_since: None,
            failing_warned: false,
            waiting: false,
            budget: ctx.budget,
            budget_hit: false,
            collect_only: false,
        })
    }

    /// The run a batch ingested here is credited to as its collector: this process's run
    /// (`None` for a worker or `cancel`, which have none of their own).
    pub(super) fn collector(&self) -> Option<&str> {
        self.own_run.then_some(self.run_id.as_str())
    }

    /// Whether a batch found in `creating` is still within the grace the provider's list
    /// gets to show a create, counted from when the create was (last) sent.
    pub(super) fn within_grace(&self, b: &BatchRow, grace: Duration) -> bool {
        let since = b.creating_at.unwrap_or(b.created_at);
        let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        now_ms().saturating_sub(since) < grace_ms
    }

    fn lease_ms(&self) -> i64 {
        i64::try_from(self.ctx.lease.as_millis()).unwrap_or(i64::MAX)
    }

    /// The claim this process makes on its pipeline's open batches.
    fn claim(&self) -> Claim<'_> {
        Claim {
            pipeline: Some(&self.ctx.pipeline.name),
            batch_id: None,
            owner: &self.ctx.worker_id,
            lease_ms: self.lease_ms(),
            force: false,
        }
    }

    /// The batch as stored now, if this process still holds it under the same lease.
    pub(super) async fn reload(&self, b: &BatchRow) -> Result<Option<BatchRow>, RunError> {
        let now = self
            .ctx
            .store
            .batch(&b.id)
            .await?
            .ok_or_else(|| StoreError::Invalid(format!("batch {} vanished", b.id)))?;
        Ok((now.lease_token == b.lease_token).then_some(now))
    }

    fn shape(&self) -> Result<RequestShape, RunError> {
        let p = self.ctx.pipeline;
        let name = schema_name(&p.name);
        self.ctx
            .provider
            .request_shape(&spec(p, self.validator.schema(), &name))
            .map_err(RunError::Config)
    }

    fn counter(&self) -> crate::cost::tokens::PromptCounter {
        let p = self.ctx.pipeline;
        let name = schema_name(&p.name);
        self.ctx
            .provider
            .prompt_counter(&spec(p, self.validator.schema(), &name))
    }

    /// The budget this planning round must fit in (`None`: no limits).
    async fn budget_check(
        &self,
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
        let max_out = self.ctx.pipeline.prompt.max_output_tokens as u64;
        let rates = *self.rates(mode);
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

/// Runs a pipeline to completion (or until it cannot go on, or is told to stop).
pub async fn run<S: Store, P: BatchProvider>(
    ctx: &RunContext<'_, S, P>,
) -> Result<RunOutcome, RunError> {
    let p = ctx.pipeline;
    let mut runner = Runner::new(ctx)?;
    let shape = runner.shape()?;
    let run_id = uuid::Uuid::now_v7().hyphenated().to_string();
    ctx.store
        .create_run(&NewRun {
            id: run_id.clone(),
            pipeline: p.name.clone(),
            stage: p.stage().to_string(),
            pipeline_file: p.file.display().to_string(),
            source_path: p.source.path.display().to_string(),
            output_path: ctx.output_path.display().to_string(),
            provider: ctx.provider.kind().to_string(),
            model: p.provider.model.clone(),
            pricing_mode: ctx.pipeline.provider.pricing_mode(),
            max_attempts: p.max_attempts,
            host: crate::util::host::hostname(),
            pid: std::process::id(),
            budget: ctx.budget.max,
            max_item: ctx.budget.max_item,
            worker_id: Some(ctx.worker_id.clone()),
        })
        .await?;
    runner.run_id = run_id.clone();
    runner.own_run = true;
    let result = runner.run_all(&shape).await;
    let (status, exit_code, message) = match &result {
        Ok((status, code, msg)) => (*status, *code, msg.clone()),
        Err(e) => (RunStatus::Error, e.exit_code(), Some(e.to_string())),
    };
    let recorded = ctx
        .store
        .finish_run(&run_id, status, exit_code, message.as_deref())
        .await;
    if let Err(e) = result {
        // The run's own error is the one to report (a full disk, say); the store may not
        // take the run's end either, and saying so must not hide the cause.
        if let Err(store) = recorded {
            tracing::warn!(error = %store, "could not record the end of the run");
        }
        return Err(e);
    }
    recorded?;
    runner.settle(&run_id).await?;
    Ok(RunOutcome {
        run_id,
        status,
        exit_code,
        requests_sent: runner.requests_sent,
        output_path: ctx.output_path.clone(),
        wrote_output: runner.wrote_output,
        message,
        times: runner.times,
    })
}

/// Works on a pipeline as one of several workers sharing the store, until told to stop:
/// adopts batches whose lease ran out, plans what the latest run of the pipeline left
/// pending (under that run's limits), submits, polls and ingests. Never reads the source
/// nor writes the output: that is the run's part.
pub async fn serve<S: Store, P: BatchProvider>(ctx: &RunContext<'_, S, P>) -> Result<(), RunError> {
    let mut runner = Runner::new(ctx)?;
    runner.drive(true).await?;
    Ok(())
}

impl<S: Store, P: BatchProvider> Runner<'_, S, P> {
    async fn run_all(
        &mut self,
        shape: &RequestShape,
    ) -> Result<(RunStatus, i32, Option<String>), RunError> {
        let ctx = self.ctx;
        let p = ctx.pipeline;
        // Collecting what is in flight needs no source: when it cannot be read, the batches
        // already paid for are still carried to the end before the run stops.
        if let Err(e) = std::fs::File::open(&p.source.path) {
            let why = format!(
                "cannot read the source {}: {e}; fix source.path (or restore the file) and run again",
                p.source.path.display()
            );
            return self.collect_then_stop(why, EXIT_CONFIG).await;
        }
        let shape_id = ctx.store.ensure_shape(shape).await?;
        let t = Instant::now();
        let counter = self.counter();
        let complete = ingest::ingest(ctx, &self.run_id, shape, shape_id, counter).await?;
        self.times.prepare += t.elapsed();
        if complete && let Some(why) = self.bad_input().await? {
            return self.collect_then_stop(why, EXIT_ERROR).await;
        }
        let revived = ctx
            .store
            .revive_exhausted(&p.name, p.stage(), p.max_attempts)
            .await?;
        if revived > 0 {
            ctx.observer.event(&Event::Note(format!(
                "{revived} item(s) that failed under a lower attempt cap get another attempt (max_attempts = {})",
                p.max_attempts
            )));
        }

        if complete {
            self.record_plan(counter.is_exact()).await?;
        }
        let pending = ctx.store.plannable_count(&p.name, p.stage()).await?;
        let open = ctx.store.open_batches(Some(&p.name)).await?;
        if !open.is_empty() {
            ctx.observer.event(&Event::Note(format!(
                "resuming {} batch(es) left open by earlier runs",
                open.len()
            )));
        }
        if pending == 0 && open.is_empty() && complete {
            ctx.observer.event(&Event::Note(
                "nothing to send: every item of this source is already processed".into(),
            ));
        }
        ctx.observer.event(&Event::Work {
            items: pending + open.iter().map(|b| b.request_count as u64).sum::<u64>(),
        });
        let stop = if complete && ctx.ingest_only {
            ctx.observer.event(&Event::Note(format!(
                "{pending} item(s) waiting: `nightshift worker` sends them; run again without --ingest-only to wait for the results"
            )));
            Stop::Detached
        } else if complete {
            self.drive(false).await?
        } else {
            Stop::Interrupted
        };
        self.write_output().await?;
        self.wrote_output = true;

        match stop {
            Stop::Interrupted => Ok((
                RunStatus::Interrupted,
                EXIT_RESUMABLE,
                Some(
                    "stopped by a signal; everything done so far is kept: run again to resume"
                        .into(),
                ),
            )),
            Stop::Budget => Ok((RunStatus::Budget, 1, Some(self.budget_message().await?))),
            Stop::Detached => Ok((
                RunStatus::Detached,
                0,
                Some(if ctx.ingest_only {
                    "ingested only: workers send the items; run the pipeline again to collect them"
                        .into()
                } else {
                    "batches are in flight; run the pipeline again to collect them".into()
                }),
            )),
            Stop::Done => {
                let f = ctx.store.run_figures(&self.run_id).await?;
                if f.exhausted > 0 {
                    Ok((
                        RunStatus::Failed,
                        1,
                        Some(format!(
                            "{} item(s) failed for good (attempt cap {}); see `nightshift report --items`",
                            f.exhausted, p.max_attempts
                        )),
                    ))
                } else {
                    Ok((RunStatus::Completed, 0, None))
                }
            }
        }
    }

    /// The run cannot go on (`why`): it still carries what is in flight to the end, since
    /// that needs no source and was paid for, then stops with `code` and does not touch the
    /// output file (last night's stays as it was).
    async fn collect_then_stop(
        &mut self,
        why: String,
        code: i32,
    ) -> Result<(RunStatus, i32, Option<String>), RunError> {
        let ctx = self.ctx;
        let open = ctx.store.open_batches(Some(&ctx.pipeline.name)).await?;
        let mut message = why;
        if !open.is_empty() {
            ctx.observer.event(&Event::Note(format!(
                "{message}; first collecting the {} batch(es) in flight",
                open.len()
            )));
            self.collect_only = true;
            if self.drive(false).await? == Stop::Interrupted {
                return Ok((
                    RunStatus::Interrupted,
                    EXIT_RESUMABLE,
                    Some("stopped by a signal while collecting; run again to resume".into()),
                ));
            }
            message = format!(
                "{message} (the {} batch(es) in flight were collected first)",
                open.len()
            );
        }
        Ok((RunStatus::Error, code, Some(message)))
    }

    /// Whether the source as read is unusable: empty, or mostly quarantined (a template
    /// field no record has, the wrong id field, the wrong file). Such a run sends nothing.
    async fn bad_input(&self) -> Result<Option<String>, RunError> {
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

    /// What stopped a capped run and what the rest would take.
    async fn budget_message(&self) -> Result<String, RunError> {
        let ctx = self.ctx;
        let p = ctx.pipeline;
        let store = ctx.store;
        let spent = store.run_commitment(&self.run_id).await?;
        let (left, tokens) = store.plannable_totals(&p.name, p.stage()).await?;
        let rates = *self.rates(p.provider.pricing_mode());
        let max_out = p.prompt.max_output_tokens as u64;
        let rest = rates.input.cost(tokens) + rates.output.cost(max_out.saturating_mul(left));
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
        if let Some(max_item) = self.budget.max_item {
            let limit = max_item_input_tokens(max_item, &rates, max_out);
            let refused = store.plannable_over(&p.name, p.stage(), limit).await?;
            if refused > 0 {
                why.push(format!(
                    "{refused} item(s) refused: their worst case alone is above max_item_usd {}",
                    max_item.display_rounded(6)
                ));
            }
        }
        Ok(format!(
            "budget: {}; raise --budget-usd (or [budget]) and run again to send the rest",
            why.join("; ")
        ))
    }

    /// A batch was closed: reports it (with what its results cost) and, when it was the
    /// last open batch of its run, settles that run.
    pub(super) async fn ingested(&self, b: &BatchRow, stats: ApplyStats) -> Result<(), RunError> {
        let cost = self.ctx.store.ledger_totals_for_batch(&b.id).await?.cost;
        self.ctx.observer.event(&Event::Ingested {
            batch_id: b.id.clone(),
            stats,
            cost,
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
        match run.status.as_str() {
            // Its own process settles it when it finishes.
            "running" => return Ok(()),
            "detached" => {
                // Workers plan for the pipeline's latest run: while it is the latest and
                // work is waiting, more may still be charged to it.
                let latest = store.last_run(Some(&run.pipeline)).await?;
                if latest.is_some_and(|l| l.id == run.id)
                    && store.plannable_count(&run.pipeline, &run.stage).await? > 0
                {
                    return Ok(());
                }
                let f = store.run_figures(run_id).await?;
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
            }
            _ => {}
        }
        let f = store.run_figures(run_id).await?;
        store.freeze_figures(run_id, &f.to_json()).await?;
        store
            .prune_records(&run.pipeline, KEEP_RECORDS_OF_RUNS)
            .await?;
        Ok(())
    }

    /// Plans, submits, polls and ingests until nothing of this pipeline is open (or, when
    /// `serve`, until told to stop: an idle worker waits for new work).
    async fn drive(&mut self, serve: bool) -> Result<Stop, RunError> {
        let ctx = self.ctx;
        let p = ctx.pipeline;
        let idle = p
            .provider
            .poll_min
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            if ctx.shutdown.is_set() {
                return Ok(Stop::Interrupted);
            }
            if serve && !self.follow_latest_run().await? {
                ctx.shutdown.sleep_until(Instant::now() + idle).await;
                continue;
            }
            // New batches (first attempts and retries) for whatever is plannable.
            let planning = if self.collect_only {
                Planning::Nothing
            } else {
                self.plan_round().await?
            };

            let open = ctx.store.claim_batches(&self.claim()).await?;
            self.polls.retain(|id, _| open.iter().any(|b| &b.id == id));
            if open.is_empty() {
                let held_elsewhere = !ctx.store.open_batches(Some(&p.name)).await?.is_empty();
                if self.collect_only && !held_elsewhere {
                    return Ok(Stop::Done);
                }
                let plannable = ctx.store.plannable_count(&p.name, p.stage()).await?;
                let stop = if held_elsewhere {
                    // Other workers hold what is open: wait for them, or for their leases
                    // to run out.
                    None
                } else if plannable == 0 {
                    Some(Stop::Done)
                } else if planning == Planning::Blocked {
                    // What is left does not fit the budget (or the per-item cap).
                    Some(Stop::Budget)
                } else {
                    // Another worker was planning those items at the same moment.
                    None
                };
                match stop {
                    Some(_) if serve => ctx.shutdown.sleep_until(Instant::now() + idle).await,
                    Some(stop) => return Ok(stop),
                    None if planning == Planning::Planned => {}
                    // `--detach`: nothing of ours is left to send; other workers carry the rest.
                    None if ctx.detach && held_elsewhere => return Ok(Stop::Detached),
                    None => ctx.shutdown.sleep_until(Instant::now() + idle).await,
                }
                continue;
            }
            let mut in_flight = 0;
            let mut unsent = 0;
            self.waiting = false;
            for b in open {
                if ctx.shutdown.is_set() {
                    return Ok(Stop::Interrupted);
                }
                let id = b.id.clone();
                match self.step(b, &mut in_flight, &mut unsent).await {
                    Err(RunError::Store(StoreError::LeaseLost { .. })) => {
                        // Another worker took it over (this one was too slow to renew):
                        // nothing was written; it is theirs now.
                        tracing::warn!(batch = %id, "lease lost; leaving the batch to its new holder");
                        self.polls.remove(&id);
                    }
                    r => r?,
                }
            }
            if ctx.detach && unsent == 0 && !self.waiting && self.transient_streak == 0 {
                let left = ctx.store.open_batches(Some(&p.name)).await?;
                if left
                    .iter()
                    .filter(|b| b.lease_owner.as_deref() == Some(ctx.worker_id.as_str()))
                    .all(|b| b.state == "submitted")
                {
                    return Ok(Stop::Detached);
                }
            }
            if self.transient_streak > 0 {
                self.backoff_pause().await;
            } else if in_flight > 0 {
                ctx.observer.event(&Event::Waiting { in_flight });
                let next = self
                    .polls
                    .values()
                    .map(|c| c.next)
                    .min()
                    .unwrap_or_else(|| Instant::now() + p.provider.poll_min);
                let next = if serve {
                    // A worker also looks for new work while it waits.
                    next.min(Instant::now() + idle)
                } else {
                    next
                };
                ctx.shutdown.sleep_until(next).await;
            } else if self.waiting {
                ctx.shutdown
                    .sleep_until(
                        Instant::now() + p.provider.poll_min.max(Duration::from_millis(50)),
                    )
                    .await;
            }
        }
    }

    /// Plans batches until nothing more fits; says how planning ended.
    async fn plan_round(&mut self) -> Result<Planning, RunError> {
        let ctx = self.ctx;
        let p = ctx.pipeline;
        let mode = self.plan_mode().await?;
        let pricing_mode = if mode == "online" {
            PricingMode::Standard
        } else {
            PricingMode::Batch
        };
        let lease_ms = self.lease_ms();
        let t = Instant::now();
        let mut outcome = Planning::Nothing;
        while !ctx.shutdown.is_set() {
            let budget = self.budget_check(pricing_mode).await?;
            let req = PlanRequest {
                run_id: &self.run_id,
                pipeline: &p.name,
                stage: p.stage(),
                provider: ctx.provider.kind(),
                model: &p.provider.model,
                pricing_mode,
                max_requests: p.batch.max_requests,
                max_bytes: p.batch.max_bytes,
                line_overhead: ctx.provider.line_overhead(),
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
                        break;
                    }
                }
                PlanOutcome::Nothing => {
                    // Nothing plannable within the per-item cap — or nothing this worker
                    // could lock: another one is planning the same items. Under a cap that
                    // refused an item, what is left waits for a bigger budget.
                    if outcome == Planning::Nothing
                        && (self.budget_hit || self.refused_by_item_cap(budget).await?)
                    {
                        outcome = Planning::Blocked;
                    }
                    break;
                }
                PlanOutcome::OverBudget { .. } => {
                    self.budget_hit = true;
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
        budget: Option<crate::store::BudgetCheck>,
    ) -> Result<bool, RunError> {
        let Some(limit) = budget.and_then(|b| b.max_item_input_tokens) else {
            return Ok(false);
        };
        let p = self.ctx.pipeline;
        let store = self.ctx.store;
        let over = store.plannable_over(&p.name, p.stage(), limit).await?;
        Ok(over > 0 && over == store.plannable_count(&p.name, p.stage()).await?)
    }

    /// A worker serves the latest run of its pipeline: new batches are charged to it and
    /// planned under its limits. Returns false when the pipeline has no run yet.
    async fn follow_latest_run(&mut self) -> Result<bool, RunError> {
        let p = self.ctx.pipeline;
        let Some(run) = self.ctx.store.last_run(Some(&p.name)).await? else {
            return Ok(false);
        };
        if run.id != self.run_id {
            tracing::info!(run = %run.id, pipeline = %p.name, "serving run");
            self.budget_hit = false;
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

    /// Moves one held batch one step along.
    async fn step(
        &mut self,
        b: BatchRow,
        in_flight: &mut usize,
        unsent: &mut usize,
    ) -> Result<(), RunError> {
        match b.state.as_str() {
            "planned" if b.mode == "online" => self.start_online(&b).await?,
            "submitted" if b.mode == "online" => {
                let t = Instant::now();
                self.run_online(&b).await?;
                self.times.results += t.elapsed();
            }
            "planned" | "built" | "uploading" | "uploaded" | "creating" => {
                self.submit(b).await?;
                *unsent += 1;
            }
            "submitted" => {
                *in_flight += 1;
                let due = self
                    .polls
                    .get(&b.id)
                    .is_none_or(|c| c.next <= Instant::now());
                if due {
                    self.poll(&b).await?;
                }
            }
            "ended" => {
                let t = Instant::now();
                self.ingest_batch(&b).await?;
                self.times.results += t.elapsed();
            }
            _ => {}
        }
        Ok(())
    }

    /// Stores the worksheet this run starts from, for `reconcile` to hold it against.
    async fn record_plan(&self, exact_tokens: bool) -> Result<(), RunError> {
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
            price: ctx.price,
            mode: ctx.pipeline.provider.pricing_mode(),
            exact_tokens,
            records_read: run.records_read as u64,
            quarantined: run.records_quarantined as u64,
            unique_items: f.unique_items,
            already_done: f.succeeded,
            todo_tokens: store.plannable_tokens(&p.name, p.stage()).await?,
            todo_records: f.records_valid.saturating_sub(f.records_done),
            job_tokens: store.run_item_tokens(&self.run_id).await?,
            job_records: f.records_valid,
            history: store.history(&p.name, p.stage()).await?,
            monthly_items: None,
            backfill_items: None,
        });
        store
            .set_run_plan(&self.run_id, &ws.to_json().to_string())
            .await?;
        Ok(())
    }

    /// How the next batch is sent: `online` for an online pipeline, or for a retry round
    /// smaller than `retry_online_below`; `batch` otherwise.
    async fn plan_mode(&self) -> Result<&'static str, RunError> {
        let p = self.ctx.pipeline;
        if p.provider.mode == crate::config::Mode::Online {
            return Ok("online");
        }
        if let Some(below) = p.provider.retry_online_below {
            let store = self.ctx.store;
            let pending = store.plannable_count(&p.name, p.stage()).await?;
            let retries = store.plannable_retries(&p.name, p.stage()).await?;
            if pending > 0 && pending == retries && pending < below {
                return Ok("online");
            }
        }
        Ok("batch")
    }

    /// A call to the provider failed in a way a later try may fix. Provider weather (a 429,
    /// a 5xx) is normal and logged quietly; a provider that cannot be reached at all is
    /// reported at once at the default level, and a spell of failures that lasts
    /// `unreachable_timeout` ends the run (exit 75: everything is kept, run again later).
    fn note_transient(&mut self, e: ProviderError) -> Result<(), RunError> {
        let p = &self.ctx.pipeline.provider;
        // The base URL is configuration, but it may carry `user:pass@`: never print that.
        let url = crate::provider::redact::Redactor::shapes_only()
            .scrub(self.ctx.provider.endpoint())
            .into_owned();
        self.transient_streak += 1;
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        let failing_for = since.elapsed();
        // Nothing answered at all (refused, unresolvable, timed out): say so at once.
        let unreachable = matches!(&e, ProviderError::Transient { status: None, .. })
            || matches!(&e, ProviderError::Ambiguous { .. });
        if !self.failing_warned && (unreachable || failing_for >= Duration::from_secs(30)) {
            self.failing_warned = true;
            tracing::warn!(
                url = %url,
                error = %e,
                give_up_after_seconds = p.unreachable_timeout.as_secs_f64(),
                "cannot reach the provider; retrying"
            );
        } else {
            tracing::info!(url = %url, error = %e, "provider call failed; will try again");
        }
        if failing_for >= p.unreachable_timeout {
            return Err(RunError::Unavailable {
                url,
                seconds: failing_for.as_secs(),
                timeout_seconds: p.unreachable_timeout.as_secs_f64(),
                cause: e.to_string(),
            });
        }
        Ok(())
    }

    fn note_success(&mut self) {
        if self.failing_warned {
            tracing::warn!("the provider answers again");
        }
        self.transient_streak = 0;
        self.failing_since = None;
        self.failing_warned = false;
    }

    /// Classifies a provider error: fatal ones end the run, others are retried later.
    fn provider_failure(&mut self, e: ProviderError) -> Result<(), RunError> {
        match e {
            ProviderError::Auth { .. } | ProviderError::Io(_) | ProviderError::Permanent { .. } => {
                Err(RunError::Provider(e))
            }
            other => self.note_transient(other),
        }
    }

    async fn backoff_pause(&self) {
        let d = self
            .ctx
            .pipeline
            .provider
            .poll_min
            .max(Duration::from_millis(50))
            * self.transient_streak.clamp(1, 20);
        self.ctx
            .shutdown
            .sleep_until(Instant::now() + d.min(self.ctx.pipeline.provider.poll_max))
            .await;
    }

    /// Writes the batch's JSONL file from the store, deterministically, atomically.
    async fn build_file(&self, b: &BatchRow) -> Result<(PathBuf, String, u64), RunError> {
        use sha2::{Digest, Sha256};
        use std::io::Write;
        let ctx = self.ctx;
        let path = batches_dir(&ctx.work_dir).join(upload_name(&b.id));
        let mut file = AtomicFile::create(&path).map_err(|source| RunError::Output {
            path: path.clone(),
            source,
        })?;
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        let mut shapes: HashMap<i64, RequestShape> = HashMap::new();
        let mut after = 0i64;
        let mut buf = Vec::with_capacity(1 << 20);
        loop {
            let lines = ctx.store.batch_lines(&b.id, after, 5000).await?;
            if lines.is_empty() {
                break;
            }
            buf.clear();
            for l in &lines {
                if let std::collections::hash_map::Entry::Vacant(e) = shapes.entry(l.shape_id) {
                    e.insert(ctx.store.shape(l.shape_id).await?);
                }
                ctx.provider
                    .write_line(&l.custom_id, &shapes[&l.shape_id], &l.user_json, &mut buf);
                after = l.attempt_id;
            }
            hasher.update(&buf);
            bytes += buf.len() as u64;
            file.write_all(&buf).map_err(|source| RunError::Output {
                path: path.clone(),
                source,
            })?;
            crate::failpoint!("build.mid_write");
        }
        file.commit().map_err(|source| RunError::Output {
            path: path.clone(),
            source,
        })?;
        Ok((path, hex::encode(hasher.finalize()), bytes))
    }

    /// Writes one result line per source record of this run, in source order (JSON lines,
    /// or CSV when the path ends in `.csv`), atomically.
    async fn write_output(&self) -> Result<(), RunError> {
        use std::io::Write;
        let ctx = self.ctx;
        let path = &ctx.output_path;
        let err = |source| RunError::Output {
            path: path.clone(),
            source,
        };
        let format = OutputFormat::for_path(path).map_err(RunError::Config)?;
        let mut file = AtomicFile::create(path).map_err(err)?;
        {
            // CSV rows go through the csv writer; JSON lines are assembled per page.
            let (mut csv, mut raw) = match format {
                OutputFormat::Csv => {
                    let mut w = csv::Writer::from_writer(&mut file);
                    w.write_record(["id", "line", "status", "attempts", "output", "error"])
                        .map_err(|e| err(std::io::Error::other(e)))?;
                    (Some(w), None)
                }
                OutputFormat::Jsonl => (None, Some(&mut file)),
            };
            let mut json = Vec::with_capacity(1 << 16);
            let mut after = 0i64;
            loop {
                let rows = ctx.store.run_records(&self.run_id, after, 10_000).await?;
                if rows.is_empty() {
                    break;
                }
                json.clear();
                for r in &rows {
                    after = r.line;
                    let succeeded = r.state == "succeeded";
                    let status = match r.state.as_str() {
                        "succeeded" => "succeeded",
                        "exhausted" => "failed",
                        _ => "pending",
                    };
                    let error = if succeeded {
                        None
                    } else {
                        r.last_error.as_deref()
                    };
                    match &mut csv {
                        Some(w) => {
                            let output = if succeeded {
                                r.result.as_deref().unwrap_or("")
                            } else {
                                ""
                            };
                            w.write_record([
                                crate::plan::guard(&r.record_id).as_str(),
                                &r.line.to_string(),
                                status,
                                &r.attempts.to_string(),
                                &crate::plan::guard(output),
                                &crate::plan::guard(error.unwrap_or("")),
                            ])
                            .map_err(|e| err(std::io::Error::other(e)))?;
                        }
                        None => {
                            let line = OutputLine {
                                id: &r.record_id,
                                line: r.line,
                                status,
                                attempts: r.attempts,
                                output: if succeeded {
                                    r.result.as_deref().and_then(|t| {
                                        serde_json::value::RawValue::from_string(t.to_string()).ok()
                                    })
                                } else {
                                    None
                                },
                                error,
                            };
                            serde_json::to_writer(&mut json, &line).map_err(|e| err(e.into()))?;
                            json.push(b'\n');
                        }
                    }
                }
                if let Some(w) = &mut csv {
                    w.flush().map_err(err)?;
                }
                if let Some(f) = &mut raw {
                    f.write_all(&json).map_err(err)?;
                }
                crate::failpoint!("output.mid_write");
            }
        }
        file.commit().map_err(err)
    }

    pub(crate) fn rates(&self, mode: PricingMode) -> &Rates {
        match mode {
            PricingMode::Batch => &self.batch_rates,
            PricingMode::Standard => &self.standard_rates,
        }
    }
}

/// How the results file is written, by its extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// One JSON object per line (`.jsonl`, `.ndjson`, `.json`).
    Jsonl,
    /// A header row, then one row per record; the answer as compact JSON text (`.csv`).
    Csv,
}

impl OutputFormat {
    /// The format a results path asks for; any other extension is refused (a results file
    /// named `.txt` or `.parquet` would otherwise silently get JSON lines).
    pub fn for_path(path: &Path) -> Result<Self, String> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("jsonl") | Some("ndjson") | Some("json") => Ok(OutputFormat::Jsonl),
            Some("csv") => Ok(OutputFormat::Csv),
            _ => Err(format!(
                "{} must end in .jsonl (JSON lines) or .csv",
                path.display()
            )),
        }
    }
}

/// One line of the results file: a source record and what became of it.
#[derive(serde::Serialize)]
struct OutputLine<'a> {
    id: &'a str,
    line: i64,
    status: &'static str,
    attempts: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<Box<serde_json::value::RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

/// The name a batch's input file is uploaded under: the local batch id.
pub fn upload_name(batch_id: &str) -> String {
    format!("{batch_id}.jsonl")
}

fn jitter() -> f64 {
    use std::collections::hash_map::RandomState;
    use std::hash::BuildHasher;
    (RandomState::new().hash_one(Instant::now()) >> 11) as f64 / (1u64 << 53) as f64
}
