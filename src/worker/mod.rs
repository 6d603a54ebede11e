//! The pipeline runner: ingest → plan → build → upload → create → poll → download → apply →
//! retry, until every item is final.
//!
//! Write-ahead throughout: each batch's state is committed before the side effect that
//! depends on it (`uploading` before the upload, `creating` before the create), and a batch
//! found in one of those states is reconciled with the provider (file by name, batch by the
//! local id in its metadata) before anything is sent again. An ambiguous create — the
//! request may have taken effect — is never retried blindly. Results are applied in chunks
//! whose writes are idempotent, so a crash anywhere can be resumed by running again.

mod apply;
mod ingest;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::Pipeline;
use crate::cost::{ModelPrice, PricingMode, Rates};
use crate::dedupe::RequestShape;
use crate::fsutil::{self, AtomicFile};
use crate::provider::{
    BatchMeta, BatchProvider, ProviderError, RemoteBatch, RemoteStatus, RequestSpec,
};
use crate::store::{
    ApplyStats, BatchRow, BatchUpdate, NewRun, PlanRequest, RunStatus, Store, StoreError, now_ms,
};
use crate::validate::OutputValidator;

pub use apply::judge_line;

/// Progress the runner reports as it goes.
#[derive(Clone, Debug)]
pub enum Event {
    IngestProgress {
        records: u64,
        quarantined: u64,
    },
    IngestDone {
        records: u64,
        quarantined: u64,
        new_items: u64,
    },
    /// A source line skipped: file, line, field at fault, reason.
    Quarantined {
        source: String,
        line: u64,
        field: Option<String>,
        reason: String,
    },
    Planned {
        batch_id: String,
        requests: u64,
    },
    Submitted {
        batch_id: String,
        provider_batch_id: String,
        requests: u64,
    },
    Adopted {
        batch_id: String,
        provider_batch_id: String,
    },
    Polled {
        batch_id: String,
        status: String,
        completed: u64,
        failed: u64,
        total: u64,
    },
    Ingested {
        batch_id: String,
        stats: ApplyStats,
    },
    Waiting {
        in_flight: usize,
    },
    Note(String),
}

/// Receives [`Event`]s (progress bars, log lines).
pub trait Observer: Send + Sync {
    fn event(&self, event: &Event);
}

/// An observer that logs through `tracing`.
pub struct LogObserver;

impl Observer for LogObserver {
    fn event(&self, e: &Event) {
        match e {
            Event::IngestProgress { .. } | Event::Waiting { .. } => {}
            other => tracing::info!(event = ?other, "progress"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error("{0}")]
    Config(String),
    /// The provider refused our credentials or the request shape: fix and rerun.
    #[error("provider: {0}")]
    Provider(ProviderError),
    /// The provider could not be reached for long enough that this run gives up; rerun later.
    #[error("provider unavailable: {0}")]
    Unavailable(ProviderError),
    #[error("cannot write {path}: {source}")]
    Output {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a finished (or stopped) run did.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    pub run_id: String,
    pub status: RunStatus,
    pub exit_code: i32,
    /// Requests this process sent to the provider (0 on a rerun with nothing to do).
    pub requests_sent: u64,
    pub output_path: PathBuf,
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

/// Everything a run needs, built by the caller.
pub struct RunContext<'a, S: Store, P: BatchProvider> {
    pub store: &'a S,
    pub provider: &'a P,
    pub pipeline: &'a Pipeline,
    pub price: &'a ModelPrice,
    pub observer: &'a dyn Observer,
    /// Folder for batch files and downloads (`.nightshift/` beside the pipeline file).
    pub work_dir: PathBuf,
    /// Where the per-record results go (the pipeline's `output.path` unless overridden).
    pub output_path: PathBuf,
}

/// Where batch input files live.
fn batches_dir(work: &Path) -> PathBuf {
    work.join("batches")
}

fn downloads_dir(work: &Path) -> PathBuf {
    work.join("downloads")
}

/// A name usable as a JSON-schema name at the provider: `[A-Za-z0-9_-]{1,64}`.
pub fn schema_name(pipeline: &str) -> String {
    let s: String = pipeline
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if s.is_empty() { "output".into() } else { s }
}

/// Polling state of one submitted batch.
struct PollClock {
    next: Instant,
    interval: Duration,
}

pub(crate) struct Runner<'a, S: Store, P: BatchProvider> {
    ctx: &'a RunContext<'a, S, P>,
    run_id: String,
    validator: OutputValidator,
    batch_rates: Rates,
    standard_rates: Rates,
    polls: HashMap<String, PollClock>,
    started: Instant,
    requests_sent: u64,
    times: PhaseTimes,
    /// Consecutive transient failures talking to the provider, to give up eventually.
    transient_streak: u32,
    last_transient: Option<ProviderError>,
    /// Set when a batch is deliberately left for later (reconcile grace period).
    waiting: bool,
}

/// Runs a pipeline to completion (or until it cannot go on).
pub async fn run<S: Store, P: BatchProvider>(
    ctx: &RunContext<'_, S, P>,
) -> Result<RunOutcome, RunError> {
    let p = ctx.pipeline;
    let validator = OutputValidator::load(&p.output.schema).map_err(RunError::Config)?;
    let mode = ctx.provider.pricing_mode();
    let batch_rates = *ctx.price.rates(mode).ok_or_else(|| {
        RunError::Config(format!("model `{}` has no {mode} price", p.provider.model))
    })?;
    let shape = ctx
        .provider
        .request_shape(&RequestSpec {
            model: &p.provider.model,
            system: p.prompt.system.as_deref(),
            max_output_tokens: p.prompt.max_output_tokens,
            temperature: p.prompt.temperature,
            schema: validator.schema(),
            schema_name: &schema_name(&p.name),
        })
        .map_err(RunError::Config)?;
    for dir in [batches_dir(&ctx.work_dir), downloads_dir(&ctx.work_dir)] {
        fsutil::create_private_dir_all(&dir).map_err(|source| RunError::Output {
            path: dir.clone(),
            source,
        })?;
        let _ = fsutil::sweep_temp_files(&dir);
    }
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
            pricing_mode: mode,
            max_attempts: p.max_attempts,
            host: hostname(),
            pid: std::process::id(),
        })
        .await?;
    let mut runner = Runner {
        ctx,
        run_id: run_id.clone(),
        validator,
        batch_rates,
        standard_rates: ctx.price.standard,
        polls: HashMap::new(),
        started: Instant::now(),
        requests_sent: 0,
        times: PhaseTimes::default(),
        transient_streak: 0,
        last_transient: None,
        waiting: false,
    };
    let result = runner.run_all(&shape).await;
    let (status, exit_code, message) = match &result {
        Ok((status, code, msg)) => (*status, *code, msg.clone()),
        Err(e) => (RunStatus::Error, 2, Some(e.to_string())),
    };
    ctx.store
        .finish_run(&run_id, status, exit_code, message.as_deref())
        .await?;
    result?;
    Ok(RunOutcome {
        run_id,
        status,
        exit_code,
        requests_sent: runner.requests_sent,
        output_path: ctx.output_path.clone(),
        message,
        times: runner.times,
    })
}

impl<'a, S: Store, P: BatchProvider> Runner<'a, S, P> {
    async fn run_all(
        &mut self,
        shape: &RequestShape,
    ) -> Result<(RunStatus, i32, Option<String>), RunError> {
        let ctx = self.ctx;
        let p = ctx.pipeline;
        let shape_id = ctx.store.ensure_shape(shape).await?;
        let t = Instant::now();
        ingest::ingest(ctx, &self.run_id, shape, shape_id).await?;
        self.times.prepare += t.elapsed();
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

        let pending = ctx.store.plannable_count(&p.name, p.stage()).await?;
        let open = ctx.store.open_batches(Some(&p.name)).await?;
        if pending == 0 && open.is_empty() {
            ctx.observer.event(&Event::Note(
                "nothing to send: every item of this source is already processed".into(),
            ));
        }
        self.drive().await?;
        self.write_output().await?;

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

    /// Plans, submits, polls and ingests until nothing of this pipeline is open.
    async fn drive(&mut self) -> Result<(), RunError> {
        let ctx = self.ctx;
        let p = ctx.pipeline;
        loop {
            // New batches (first attempts and retries) for whatever is plannable.
            let req = PlanRequest {
                run_id: &self.run_id,
                pipeline: &p.name,
                stage: p.stage(),
                provider: ctx.provider.kind(),
                model: &p.provider.model,
                pricing_mode: ctx.provider.pricing_mode(),
                max_requests: p.batch.max_requests,
                max_bytes: p.batch.max_bytes,
                line_overhead: ctx.provider.line_overhead(),
            };
            let t = Instant::now();
            while let Some(b) = ctx.store.plan_batch(&req).await? {
                ctx.observer.event(&Event::Planned {
                    batch_id: b.id.clone(),
                    requests: b.request_count as u64,
                });
            }
            self.times.prepare += t.elapsed();

            let open = ctx.store.open_batches(Some(&p.name)).await?;
            if open.is_empty() {
                if ctx.store.plannable_count(&p.name, p.stage()).await? == 0 {
                    return Ok(());
                }
                continue;
            }
            let mut in_flight = 0;
            self.waiting = false;
            for b in open {
                match b.state.as_str() {
                    "planned" | "built" | "uploading" | "uploaded" | "creating" => {
                        self.submit(b).await?;
                    }
                    "submitted" => {
                        in_flight += 1;
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
                tokio::time::sleep_until(next.into()).await;
            } else if self.waiting {
                tokio::time::sleep(p.provider.poll_min.max(Duration::from_millis(50))).await;
            }
        }
    }

    fn note_transient(&mut self, e: ProviderError) -> Result<(), RunError> {
        tracing::info!(error = %e, "provider call failed; will try again");
        self.transient_streak += 1;
        self.last_transient = Some(e);
        if self.transient_streak >= 30 {
            let e = self.last_transient.take().expect("just set");
            return Err(RunError::Unavailable(e));
        }
        Ok(())
    }

    fn note_success(&mut self) {
        self.transient_streak = 0;
    }

    /// Classifies a provider error: fatal ones end the run, others are retried later.
    fn provider_failure(&mut self, e: ProviderError) -> Result<(), RunError> {
        match e {
            ProviderError::Auth { .. } => Err(RunError::Provider(e)),
            ProviderError::Io(_) => Err(RunError::Provider(e)),
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
        tokio::time::sleep(d.min(self.ctx.pipeline.provider.poll_max)).await;
    }

    /// Takes a batch from wherever it is up to `submitted`.
    async fn submit(&mut self, mut b: BatchRow) -> Result<(), RunError> {
        let ctx = self.ctx;
        let store = ctx.store;
        loop {
            match b.state.as_str() {
                "planned" => {
                    let t = Instant::now();
                    let (path, sha, bytes) = self.build_file(&b).await?;
                    self.times.prepare += t.elapsed();
                    store
                        .update_batch(
                            &b.id,
                            "planned",
                            &BatchUpdate {
                                state: Some("built"),
                                file_path: Some(path.display().to_string()),
                                file_sha256: Some(sha),
                                file_bytes: Some(bytes as i64),
                                ..Default::default()
                            },
                        )
                        .await?;
                }
                "built" => {
                    store
                        .update_batch(
                            &b.id,
                            "built",
                            &BatchUpdate {
                                state: Some("uploading"),
                                ..Default::default()
                            },
                        )
                        .await?;
                    crate::failpoint!("upload.before_send");
                    match self.upload(&b).await {
                        Ok(file_id) => self.uploaded(&b, file_id).await?,
                        Err(e) => return self.provider_failure(e),
                    }
                }
                "uploading" => {
                    // A previous upload may have landed: adopt it by name.
                    let name = upload_name(&b.id);
                    match ctx.provider.find_file(&name).await {
                        Ok(Some(file_id)) => self.uploaded(&b, file_id).await?,
                        Ok(None) => match self.upload(&b).await {
                            Ok(file_id) => self.uploaded(&b, file_id).await?,
                            Err(e) => return self.provider_failure(e),
                        },
                        Err(e) => return self.provider_failure(e),
                    }
                }
                "uploaded" => {
                    store
                        .update_batch(
                            &b.id,
                            "uploaded",
                            &BatchUpdate {
                                state: Some("creating"),
                                ..Default::default()
                            },
                        )
                        .await?;
                    crate::failpoint!("create.before_send");
                    match self.create(&b).await {
                        Ok(remote) => self.created(&b, remote, false).await?,
                        Err(ProviderError::Permanent { message, code, .. }) => {
                            return self.rejected(&b, code, message).await;
                        }
                        Err(e) => return self.provider_failure(e),
                    }
                }
                "creating" => {
                    // The create may have taken effect: look for it before sending again.
                    let since = b.created_at / 1000;
                    match ctx.provider.find_batch(&b.id, since).await {
                        Ok(Some(remote)) => self.created(&b, remote, true).await?,
                        Ok(None) => {
                            let grace = ctx.pipeline.provider.reconcile_grace;
                            if self.started.elapsed() < grace {
                                self.waiting = true;
                                return Ok(());
                            }
                            match self.create(&b).await {
                                Ok(remote) => self.created(&b, remote, false).await?,
                                Err(ProviderError::Permanent { message, code, .. }) => {
                                    return self.rejected(&b, code, message).await;
                                }
                                Err(e) => return self.provider_failure(e),
                            }
                        }
                        Err(e) => return self.provider_failure(e),
                    }
                }
                _ => return Ok(()),
            }
            b = store
                .batch(&b.id)
                .await?
                .ok_or_else(|| StoreError::Invalid(format!("batch {} vanished", b.id)))?;
        }
    }

    async fn upload(&mut self, b: &BatchRow) -> Result<String, ProviderError> {
        let path = match &b.file_path {
            Some(p) if Path::new(p).exists() => PathBuf::from(p),
            // The file was lost (crash, cleanup): rebuild it, byte for byte.
            _ => {
                let (path, sha, _) = self
                    .build_file(b)
                    .await
                    .map_err(|e| ProviderError::Protocol(e.to_string()))?;
                if b.file_sha256.as_deref().is_some_and(|s| s != sha) {
                    return Err(ProviderError::Protocol(format!(
                        "rebuilt input file of batch {} differs from the original",
                        b.id
                    )));
                }
                path
            }
        };
        let r = self.ctx.provider.upload(&upload_name(&b.id), &path).await;
        if r.is_ok() {
            crate::failpoint!("upload.after_send");
            self.note_success();
        }
        r
    }

    async fn uploaded(&mut self, b: &BatchRow, file_id: String) -> Result<(), RunError> {
        self.ctx
            .store
            .update_batch(
                &b.id,
                "uploading",
                &BatchUpdate {
                    state: Some("uploaded"),
                    input_file_id: Some(file_id),
                    ..Default::default()
                },
            )
            .await?;
        Ok(())
    }

    async fn create(&mut self, b: &BatchRow) -> Result<RemoteBatch, ProviderError> {
        let file_id = b.input_file_id.clone().ok_or_else(|| {
            ProviderError::Protocol(format!("batch {} has no uploaded file", b.id))
        })?;
        let r = self
            .ctx
            .provider
            .create(
                &file_id,
                &BatchMeta {
                    local_id: &b.id,
                    run_id: &b.run_id,
                    pipeline: &b.pipeline,
                },
            )
            .await;
        crate::failpoint!("create.after_send");
        if r.is_ok() {
            self.note_success();
        }
        r
    }

    async fn created(
        &mut self,
        b: &BatchRow,
        remote: RemoteBatch,
        adopted: bool,
    ) -> Result<(), RunError> {
        let ctx = self.ctx;
        let ok = ctx
            .store
            .update_batch(
                &b.id,
                "creating",
                &BatchUpdate {
                    state: Some("submitted"),
                    provider_batch_id: Some(remote.id.clone()),
                    provider_status: Some(remote.raw_status.clone()),
                    submitted_at: Some(now_ms()),
                    ..Default::default()
                },
            )
            .await?;
        crate::failpoint!("create.after_store");
        if ok {
            if adopted {
                ctx.observer.event(&Event::Adopted {
                    batch_id: b.id.clone(),
                    provider_batch_id: remote.id.clone(),
                });
            } else {
                self.requests_sent += b.request_count as u64;
                ctx.observer.event(&Event::Submitted {
                    batch_id: b.id.clone(),
                    provider_batch_id: remote.id.clone(),
                    requests: b.request_count as u64,
                });
            }
            self.polls.insert(
                b.id.clone(),
                PollClock {
                    next: Instant::now() + ctx.pipeline.provider.poll_min,
                    interval: ctx.pipeline.provider.poll_min,
                },
            );
        }
        Ok(())
    }

    /// The provider refused to create the batch for good: its attempts fail (and are
    /// retried under the cap), nothing was billed.
    async fn rejected(
        &mut self,
        b: &BatchRow,
        code: Option<String>,
        message: String,
    ) -> Result<(), RunError> {
        let store = self.ctx.store;
        let error = format!("{}: {message}", code.unwrap_or_else(|| "rejected".into()));
        tracing::warn!(batch = %b.id, %error, "the provider refused to create the batch");
        store
            .update_batch(
                &b.id,
                "creating",
                &BatchUpdate {
                    state: Some("ended"),
                    error: Some(error.clone()),
                    ended_at: Some(now_ms()),
                    ..Default::default()
                },
            )
            .await?;
        let stats = store
            .finish_ingest(
                &b.id,
                "batch_rejected",
                &error,
                self.ctx.pipeline.max_attempts,
            )
            .await?;
        self.ctx.observer.event(&Event::Ingested {
            batch_id: b.id.clone(),
            stats,
        });
        Ok(())
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
        }
        file.commit().map_err(|source| RunError::Output {
            path: path.clone(),
            source,
        })?;
        Ok((path, hex::encode(hasher.finalize()), bytes))
    }

    async fn poll(&mut self, b: &BatchRow) -> Result<(), RunError> {
        let ctx = self.ctx;
        let Some(pid) = b.provider_batch_id.clone() else {
            return Ok(());
        };
        let clock = self.polls.entry(b.id.clone()).or_insert(PollClock {
            next: Instant::now(),
            interval: ctx.pipeline.provider.poll_min,
        });
        // Exponential backoff with ±20 % jitter, up to poll_max.
        let grown = clock
            .interval
            .mul_f64(1.5)
            .min(ctx.pipeline.provider.poll_max);
        clock.interval = grown;
        clock.next = Instant::now() + grown.mul_f64(0.8 + 0.4 * jitter());
        let remote = match ctx.provider.get(&pid).await {
            Ok(r) => {
                self.note_success();
                r
            }
            Err(e) => return self.provider_failure(e),
        };
        let c = remote.counts.unwrap_or_default();
        ctx.observer.event(&Event::Polled {
            batch_id: b.id.clone(),
            status: remote.raw_status.clone(),
            completed: c.completed,
            failed: c.failed,
            total: c.total,
        });
        if !remote.status.is_terminal() {
            if b.provider_status.as_deref() != Some(remote.raw_status.as_str()) {
                ctx.store
                    .update_batch(
                        &b.id,
                        "submitted",
                        &BatchUpdate {
                            provider_status: Some(remote.raw_status.clone()),
                            ..Default::default()
                        },
                    )
                    .await?;
            }
            return Ok(());
        }
        self.polls.remove(&b.id);
        let usage = remote
            .usage
            .map(|u| serde_json::to_string(&u).unwrap_or_default());
        let error = (!remote.errors.is_empty()).then(|| remote.errors.join("; "));
        ctx.store
            .update_batch(
                &b.id,
                "submitted",
                &BatchUpdate {
                    state: Some("ended"),
                    provider_status: Some(remote.raw_status.clone()),
                    output_file_id: remote.output_file_id.clone(),
                    error_file_id: remote.error_file_id.clone(),
                    provider_usage: usage,
                    error,
                    ended_at: Some(now_ms()),
                    ..Default::default()
                },
            )
            .await?;
        if remote.status == RemoteStatus::Failed {
            tracing::warn!(batch = %b.id, errors = ?remote.errors, "the provider failed the batch");
        }
        Ok(())
    }

    /// Downloads and applies an ended batch's results, then closes it.
    async fn ingest_batch(&mut self, b: &BatchRow) -> Result<(), RunError> {
        let ctx = self.ctx;
        let mut stats = ApplyStats::default();
        let mut files = Vec::new();
        for (kind, id) in [("output", &b.output_file_id), ("error", &b.error_file_id)] {
            let Some(file_id) = id else { continue };
            let dest = crate::provider::download_path(&downloads_dir(&ctx.work_dir), &b.id, kind);
            if !dest.exists() {
                let r = ctx
                    .provider
                    .download(file_id, &dest, ctx.pipeline.provider.max_download_bytes)
                    .await;
                match r {
                    Ok(_) => self.note_success(),
                    Err(ProviderError::TooLarge { cap }) => {
                        ctx.store
                            .record_anomaly(
                                Some(&self.run_id),
                                Some(&b.id),
                                "oversized_file",
                                None,
                                &format!("{kind} file {file_id} is over {cap} bytes"),
                            )
                            .await?;
                        continue;
                    }
                    Err(e) => return self.provider_failure(e),
                }
            }
            files.push(dest);
        }
        let mut seen = std::collections::HashSet::new();
        for path in &files {
            stats += apply::apply_file(self, b, path, &mut seen).await?;
        }
        let (verdict, error) = match b
            .provider_status
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("failed") => (
                "batch_failed",
                b.error
                    .clone()
                    .unwrap_or_else(|| "the provider failed the batch".into()),
            ),
            Some("expired") => (
                "expired",
                "the batch expired before this request ran".into(),
            ),
            Some("cancelled") | Some("canceled") => (
                "cancelled",
                "the batch was cancelled before this request ran".into(),
            ),
            _ => (
                "missing",
                "the provider returned no result line for this request".into(),
            ),
        };
        let rest = ctx
            .store
            .finish_ingest(&b.id, verdict, &error, ctx.pipeline.max_attempts)
            .await?;
        stats += ApplyStats { applied: 0, ..rest };
        ctx.observer.event(&Event::Ingested {
            batch_id: b.id.clone(),
            stats,
        });
        // Results are in the store now; local copies of prompts and answers can go.
        for path in files {
            let _ = std::fs::remove_file(path);
        }
        if let Some(f) = &b.file_path {
            let _ = std::fs::remove_file(f);
        }
        Ok(())
    }

    /// Writes one result line per source record of this run, in source order.
    async fn write_output(&self) -> Result<(), RunError> {
        use std::io::Write;
        let ctx = self.ctx;
        let path = &ctx.output_path;
        let err = |source| RunError::Output {
            path: path.clone(),
            source,
        };
        let mut file = AtomicFile::create(path).map_err(err)?;
        let mut after = 0i64;
        loop {
            let rows = ctx.store.run_records(&self.run_id, after, 10_000).await?;
            if rows.is_empty() {
                break;
            }
            for r in &rows {
                after = r.line;
                let succeeded = r.state == "succeeded";
                let line = OutputLine {
                    id: &r.record_id,
                    line: r.line,
                    status: match r.state.as_str() {
                        "succeeded" => "succeeded",
                        "exhausted" => "failed",
                        _ => "pending",
                    },
                    attempts: r.attempts,
                    output: if succeeded {
                        r.result.as_deref().and_then(|t| {
                            serde_json::value::RawValue::from_string(t.to_string()).ok()
                        })
                    } else {
                        None
                    },
                    error: if succeeded {
                        None
                    } else {
                        r.last_error.as_deref()
                    },
                };
                serde_json::to_writer(&mut file, &line).map_err(|e| err(e.into()))?;
                file.write_all(b"\n").map_err(err)?;
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

/// This machine's name, for run rows and lock holders.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
