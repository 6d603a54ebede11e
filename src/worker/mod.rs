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
//!
//! This module is the drive loop: a run (`run`), a worker (`serve`), the `Runner` state
//! they share and the loop that moves each held batch one step along. The phases it drives
//! live beside it, in the order of docs/design.md ("The steps and where they live"):
//! `ingest` and `prepare`, `plan`, `build`, `submit`, `collect`, `apply`, `online`, `settle`
//! and `output`; `backoff` handles provider weather, `events`, `options` and `errors` hold
//! the public types.

mod apply;
mod backoff;
mod build;
mod collect;
mod errors;
mod events;
mod gc;
mod ingest;
mod online;
mod options;
mod output;
mod parquet_file;
mod planning;
mod prepare;
mod settle;
mod stages;
mod submit;
mod table;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::provider::BatchProvider;
use crate::store::{
    BatchMode, BatchRow, BatchState, Claim, LaterStage, NewRun, PipelineWork, RunStatus, Store,
    StoreError, now_ms,
};
use crate::util::fs as fsutil;

use backoff::jitter;
use options::{batches_dir, downloads_dir};
use planning::Planning;

pub use crate::stage::in_sample;
pub use apply::judge_line;
pub use build::upload_name;
pub use collect::{CancelReport, cancel};
pub use errors::{
    EXIT_CONFIG, EXIT_ERROR, EXIT_FAILED_ITEMS, EXIT_RESUMABLE, ExitStatus, RunError,
};
pub use events::{Event, LogObserver, Observer, Observers};
pub use gc::{GcOptions, GcOutcome, GcReport, GcTarget, gc};
pub use options::{RunContext, Shutdown, schema_name, spec, stage_schema_name};
pub use output::OutputFormat;
pub use settle::KEEP_RECORDS_OF_RUNS;
use stages::StageRun;

/// Lines of records an advance tracks from ingested results before it falls back to a pass
/// over the whole run (8 bytes each: at most a few MB).
const MAX_ADVANCE_LINES: usize = 250_000;

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

/// Polling state of one submitted batch.
struct PollClock {
    next: Instant,
    interval: Duration,
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
    /// Each stage's shape, validator and prices, in the pipeline's order.
    stages: Vec<StageRun>,
    /// A pass over every record of the run is due to advance the later stages (at the
    /// start, after too many results to track line by line).
    advance_due: bool,
    /// Lines of the records the results stored since the last advance may have made ready
    /// (those linked to the ingested batches' items): the next advance tests only these.
    advance_lines: Vec<i64>,
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
    /// The first stage whose items the cap kept from being planned.
    budget_stage: Option<String>,
    /// Nothing new is planned (the source could not be read): open batches are collected.
    collect_only: bool,
    /// The figures this run's end status was judged from, frozen as they are when the run
    /// settles (nothing changes in between: the figures take a pass over every record).
    final_figures: Option<crate::store::RunFigures>,
    /// Output files fetched ahead, while the batch before them was being applied: batch id
    /// and the provider's file id, at the batch's download path.
    fetched_ahead: HashMap<String, String>,
}

impl<'a, S: Store, P: BatchProvider> Runner<'a, S, P> {
    fn new(ctx: &'a RunContext<'a, S, P>) -> Result<Self, RunError> {
        let stages = (0..ctx.pipeline.stages.len())
            .map(|i| StageRun::new(ctx, i))
            .collect::<Result<Vec<_>, _>>()?;
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
            stages,
            advance_due: true,
            advance_lines: Vec::new(),
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
            budget_stage: None,
            collect_only: false,
            final_figures: None,
            fetched_ahead: HashMap::new(),
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

    /// Whether the run's work is done, every worker's included: read at one snapshot
    /// ([`Store::settled`]), since the separate reads that lead here race with other
    /// workers planning the last retries or advancing the last records.
    async fn settled(&self) -> Result<bool, RunError> {
        let p = self.ctx.pipeline;
        let stages: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
        let later: Vec<LaterStage<'_>> = p
            .stages
            .iter()
            .skip(1)
            .map(|s| LaterStage {
                stage: &s.name,
                needs: &s.needs,
            })
            .collect();
        let regenerate: Vec<(&str, &str)> = p
            .stages
            .iter()
            .filter(|s| s.on_fail == Some(crate::config::OnFail::Regenerate))
            .filter_map(|s| Some((s.name.as_str(), s.needs.first()?.as_str())))
            .collect();
        let work = PipelineWork {
            pipeline: &p.name,
            stages: &stages,
            later: if self.run_id.is_empty() { &[] } else { &later },
            regenerate: if self.run_id.is_empty() {
                &[]
            } else {
                &regenerate
            },
        };
        Ok(self.ctx.store.settled(&self.run_id, &work).await?)
    }

    /// Items of every stage waiting for an attempt.
    async fn plannable_count(&self) -> Result<u64, RunError> {
        let p = self.ctx.pipeline;
        let mut n = 0;
        for s in &p.stages {
            n += self.ctx.store.plannable_count(&p.name, &s.name).await?;
        }
        Ok(n)
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

    /// After a batch's results are stored: notes the records they may have made ready for
    /// a later stage, for the next advance to test (not every record of the run).
    async fn results_stored(&mut self, b: &BatchRow) -> Result<(), RunError> {
        if self.advance_due || !self.results_advance(&b.stage) {
            return Ok(());
        }
        let lines = self
            .ctx
            .store
            .batch_record_lines(&self.run_id, &b.id)
            .await?;
        self.advance_lines.extend(lines);
        if self.advance_lines.len() > MAX_ADVANCE_LINES {
            // A pass over the run costs less than tracking this many.
            self.advance_lines = Vec::new();
            self.advance_due = true;
        }
        Ok(())
    }

    /// Whether new results of `stage` can move records on: a later stage needs it, or it
    /// reviews with `on_fail = "regenerate"`. Results of a last stage that only flags make
    /// nothing ready: their records are not looked at again.
    fn results_advance(&self, stage: &str) -> bool {
        self.ctx.pipeline.stages.iter().any(|s| {
            s.needs.iter().any(|n| n == stage)
                || (s.name == stage && s.on_fail == Some(crate::config::OnFail::Regenerate))
        })
    }

    /// The stage a batch (or item) of `name` belongs to.
    pub(crate) fn stage_run(&self, name: &str) -> Result<&StageRun, RunError> {
        self.stages
            .iter()
            .find(|s| s.stage.name == name)
            .ok_or_else(|| {
                RunError::Config(format!(
                    "the store holds work of stage `{name}`, which {} no longer has (stages: {}); restore the stage to collect it",
                    self.ctx.pipeline.file.display(),
                    self.ctx.pipeline.stage_list()
                ))
            })
    }
}

/// Runs a pipeline to completion (or until it cannot go on, or is told to stop).
pub async fn run<S: Store, P: BatchProvider>(
    ctx: &RunContext<'_, S, P>,
) -> Result<RunOutcome, RunError> {
    let p = ctx.pipeline;
    let mut runner = Runner::new(ctx)?;
    let run_id = uuid::Uuid::now_v7().hyphenated().to_string();
    ctx.store
        .create_run(&NewRun {
            id: run_id.clone(),
            pipeline: p.name.clone(),
            stage: p.stage_list(),
            pipeline_file: p.file.display().to_string(),
            source_path: p.source.path.display().to_string(),
            output_path: ctx.output_path.display().to_string(),
            provider: ctx.provider.kind().to_string(),
            model: p.provider.model.clone(),
            pricing_mode: ctx.pipeline.provider.pricing_mode(),
            max_attempts: p.first_stage().max_attempts,
            host: crate::util::host::hostname(),
            pid: std::process::id(),
            budget: ctx.budget.max,
            max_item: ctx.budget.max_item,
            worker_id: Some(ctx.worker_id.clone()),
        })
        .await?;
    runner.run_id = run_id.clone();
    runner.own_run = true;
    let result = runner.run_all().await;
    let (status, exit_code, message) = match &result {
        Ok((status, code, msg)) => (*status, *code, msg.clone()),
        Err(e) => (RunStatus::Error, e.exit_code(), Some(e.to_string())),
    };
    let recorded = ctx
        .store
        .finish_run(&run_id, status, exit_code, message.as_deref())
        .await;
    if recorded.is_ok() {
        ctx.observer.event(&Event::RunEnded {
            run_id: run_id.clone(),
            status,
            exit_code,
        });
    }
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
    async fn run_all(&mut self) -> Result<(RunStatus, i32, Option<String>), RunError> {
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
        let first = &self.stages[0];
        let shape_id = ctx.store.ensure_shape(&first.shape).await?;
        let t = Instant::now();
        let ingest::Ingested { complete, later } =
            ingest::ingest(ctx, &self.run_id, first, shape_id).await?;
        self.times.prepare += t.elapsed();
        if complete && let Some(why) = self.bad_input().await? {
            return self.collect_then_stop(why, EXIT_ERROR).await;
        }
        for s in &p.stages {
            let revived = ctx
                .store
                .revive_exhausted(&p.name, &s.name, s.max_attempts)
                .await?;
            if revived > 0 {
                ctx.observer.event(&Event::Note(format!(
                    "{revived} item(s) of stage `{}` that failed under a lower attempt cap get another attempt (max_attempts = {})",
                    s.name, s.max_attempts
                )));
            }
        }
        if complete && !ctx.ingest_only {
            self.advance(None).await?;
            self.advance_due = false;
        }

        if complete {
            self.record_plan(self.stages[0].counter.is_exact(), later)
                .await?;
        }
        let pending = self.plannable_count().await?;
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
                let f = self
                    .final_figures
                    .insert(ctx.store.run_figures(&self.run_id).await?);
                if f.exhausted > 0 && !p.is_multi_stage() {
                    Ok((
                        RunStatus::Failed,
                        1,
                        Some(format!(
                            "{} item(s) failed for good (attempt cap {}); see `nightshift report --items`",
                            f.exhausted,
                            p.first_stage().max_attempts
                        )),
                    ))
                } else if f.exhausted > 0 || f.records_failed > 0 {
                    Ok((
                        RunStatus::Failed,
                        1,
                        Some(format!(
                            "{} record(s) failed ({} item(s) failed for good); their later stages were not sent; see `nightshift report --items`",
                            f.records_failed, f.exhausted
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
            // Later stages' items for the records whose earlier items succeeded.
            if !self.collect_only {
                if self.advance_due {
                    self.advance_due = false;
                    self.advance_lines = Vec::new();
                    self.advance(None).await?;
                } else if !self.advance_lines.is_empty() {
                    let mut lines = std::mem::take(&mut self.advance_lines);
                    lines.sort_unstable();
                    lines.dedup();
                    self.advance(Some(&lines)).await?;
                }
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
                let mut plannable = self.plannable_count().await?;
                // The run was found at rest (no need to read it again).
                let mut at_rest = false;
                if plannable == 0 && !held_elsewhere && p.is_multi_stage() {
                    // Another worker may have stored the last results: the records they
                    // complete go on to their next stage before the run may end. When the
                    // run is settled nothing is ready, and the pass over every record is
                    // spared.
                    if self.settled().await? {
                        at_rest = true;
                    } else {
                        self.advance(None).await?;
                        plannable = self.plannable_count().await?;
                    }
                }
                let stop = if held_elsewhere {
                    // Other workers hold what is open: wait for them, or for their leases
                    // to run out.
                    None
                } else if plannable == 0 && (serve || at_rest || self.settled().await?) {
                    Some(Stop::Done)
                } else if plannable == 0 {
                    // Another worker planned, collected or advanced between the reads
                    // above: look again.
                    None
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
            for (i, b) in open.iter().enumerate() {
                if ctx.shutdown.is_set() {
                    return Ok(Stop::Interrupted);
                }
                // The next ended batch's results can be fetched while these are applied.
                let next = open[i + 1..]
                    .iter()
                    .find(|n| n.state == BatchState::Ended && n.mode != BatchMode::Online);
                let id = b.id.clone();
                match self
                    .step(b.clone(), next, &mut in_flight, &mut unsent)
                    .await
                {
                    Err(RunError::Store(StoreError::LeaseLost { .. })) => {
                        // Another worker took it over (this one was too slow to renew):
                        // nothing was written; it is theirs now.
                        tracing::warn!(batch = %id, "lease lost; leaving the batch to its new holder");
                        ctx.observer.event(&Event::LeaseLost {
                            batch_id: id.clone(),
                        });
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
                    .all(|b| b.state == BatchState::Submitted)
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

    /// Moves one held batch one step along.
    async fn step(
        &mut self,
        b: BatchRow,
        next: Option<&BatchRow>,
        in_flight: &mut usize,
        unsent: &mut usize,
    ) -> Result<(), RunError> {
        match (b.state, b.mode) {
            (BatchState::Planned, BatchMode::Online) => self.start_online(&b).await?,
            (BatchState::Submitted, BatchMode::Online) => {
                let t = Instant::now();
                self.run_online(&b).await?;
                self.times.results += t.elapsed();
                self.results_stored(&b).await?;
            }
            (
                BatchState::Planned
                | BatchState::Built
                | BatchState::Uploading
                | BatchState::Uploaded
                | BatchState::Creating,
                _,
            ) => {
                self.submit(b).await?;
                *unsent += 1;
            }
            (BatchState::Submitted, _) => {
                *in_flight += 1;
                let due = self
                    .polls
                    .get(&b.id)
                    .is_none_or(|c| c.next <= Instant::now());
                if due {
                    self.poll(&b).await?;
                }
            }
            (BatchState::Ended, _) => {
                let t = Instant::now();
                self.ingest_batch(&b, next).await?;
                self.times.results += t.elapsed();
                self.results_stored(&b).await?;
            }
            _ => {}
        }
        Ok(())
    }
}
