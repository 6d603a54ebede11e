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
mod build;
mod collect;
mod errors;
mod events;
mod ingest;
mod online;
mod options;
mod plan;
mod prepare;
mod submit;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cost::{PricingMode, Rates};
use crate::dedupe::RequestShape;
use crate::provider::{BatchProvider, ProviderError};
use crate::store::{ApplyStats, BatchRow, Claim, NewRun, RunStatus, Store, StoreError, now_ms};
use crate::util::fs::{self as fsutil, AtomicFile};
use crate::validate::OutputValidator;

use options::{batches_dir, downloads_dir};
use plan::Planning;

pub use apply::judge_line;
pub use build::upload_name;
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

fn jitter() -> f64 {
    use std::collections::hash_map::RandomState;
    use std::hash::BuildHasher;
    (RandomState::new().hash_one(Instant::now()) >> 11) as f64 / (1u64 << 53) as f64
}
