//! Collection: poll submitted batches with backoff and jitter, download and apply the
//! results of ended ones, and `cancel` what is in flight (recording what was billed).

use std::time::Instant;

use super::{
    Event, PollClock, RunContext, RunError, Runner, apply, downloads_dir, jitter, upload_name,
};
use crate::cost::{Usage, Usd};
use crate::provider::{BatchProvider, ProviderError, RemoteStatus};
use crate::store::{
    ApplyStats, AttemptVerdict, BatchMode, BatchRow, BatchState, BatchUpdate, EndState, Store,
    now_ms,
};

/// Why the still-open attempts of an ended batch failed, by how the batch ended.
fn leftover_verdict(b: &BatchRow) -> (AttemptVerdict, String) {
    match b.end_state {
        Some(EndState::Failed) => (
            AttemptVerdict::BatchFailed,
            b.error
                .clone()
                .unwrap_or_else(|| "the provider failed the batch".into()),
        ),
        Some(EndState::Expired) => (
            AttemptVerdict::Expired,
            "the batch expired before this request ran".into(),
        ),
        Some(EndState::Cancelled) => (
            AttemptVerdict::Cancelled,
            "the batch was cancelled before this request ran".into(),
        ),
        Some(EndState::Lost) => (
            AttemptVerdict::Lost,
            b.error
                .clone()
                .unwrap_or_else(|| "the batch is lost".into()),
        ),
        _ => (
            AttemptVerdict::Missing,
            "the provider returned no result line for this request".into(),
        ),
    }
}

fn end_state(s: RemoteStatus) -> EndState {
    match s {
        RemoteStatus::Failed => EndState::Failed,
        RemoteStatus::Expired => EndState::Expired,
        RemoteStatus::Cancelled => EndState::Cancelled,
        _ => EndState::Completed,
    }
}

impl<S: Store, P: BatchProvider> Runner<'_, S, P> {
    pub(super) async fn poll(&mut self, b: &BatchRow) -> Result<(), RunError> {
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
        crate::failpoint!("poll.after_get");
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
                        b,
                        BatchState::Submitted,
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
                b,
                BatchState::Submitted,
                &BatchUpdate {
                    state: Some(BatchState::Ended),
                    end_state: Some(end_state(remote.status)),
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

    /// Downloads and applies an ended batch's results, then closes it. Downloads are never
    /// trusted across a crash: each ingest fetches the files afresh (a file fetched ahead by
    /// this process is used once, by its batch's ingest).
    ///
    /// While the results are applied, the output file of `next` (the ended batch this
    /// process takes up after this one) is downloaded beside them: on a provider the
    /// download is mostly waiting, and it overlaps the local work instead of following it.
    /// A download ahead that fails is forgotten; the batch's own ingest downloads again,
    /// with the usual handling of what went wrong.
    pub(super) async fn ingest_batch(
        &mut self,
        b: &BatchRow,
        next: Option<&BatchRow>,
    ) -> Result<(), RunError> {
        let ctx = self.ctx;
        let mut stats = ApplyStats::default();
        if b.end_state == Some(EndState::Expired)
            && b.provider_status
                .as_deref()
                .is_some_and(|s| ctx.provider.never_started(s))
        {
            // Nothing ran and nothing was billed: the requests go back to the queue with
            // their attempts taken back.
            let n = ctx
                .store
                .return_unsent(b, "the job expired before it started")
                .await?;
            tracing::info!(batch = %b.id, requests = n, "the provider job expired before it started; its requests go back to the queue");
        }
        let mut files = Vec::new();
        for (kind, id) in [("output", &b.output_file_id), ("error", &b.error_file_id)] {
            let Some(file_id) = id else { continue };
            let dest = crate::provider::download_path(&downloads_dir(&ctx.work_dir), &b.id, kind);
            if kind == "output"
                && self.fetched_ahead.remove(&b.id).as_ref() == Some(file_id)
                && dest.is_file()
            {
                files.push(dest);
                continue;
            }
            let _ = std::fs::remove_file(&dest);
            let r = ctx
                .provider
                .download(file_id, &dest, ctx.pipeline.provider.max_download_bytes)
                .await;
            match r {
                Ok(_) => self.note_success(),
                Err(ProviderError::TooLarge { cap }) => {
                    ctx.store
                        .record_anomaly(
                            Some(&b.run_id),
                            Some(&b.id),
                            "oversized_file",
                            None,
                            &format!("{kind} file {file_id} is over {cap} bytes; its requests go back to the queue"),
                        )
                        .await?;
                    continue;
                }
                Err(e) => return self.provider_failure(e),
            }
            files.push(dest);
        }
        let ahead = next
            .filter(|n| n.id != b.id && !self.fetched_ahead.contains_key(&n.id))
            .and_then(|n| Some((n.id.clone(), n.output_file_id.clone()?)));
        let fetch = async {
            let (id, file_id) = ahead?;
            let dest = crate::provider::download_path(&downloads_dir(&ctx.work_dir), &id, "output");
            let _ = std::fs::remove_file(&dest);
            match ctx
                .provider
                .download(&file_id, &dest, ctx.pipeline.provider.max_download_bytes)
                .await
            {
                Ok(_) => Some((id, file_id)),
                Err(e) => {
                    tracing::debug!(batch = %id, error = %e, "fetching results ahead failed; the batch's ingest downloads them");
                    None
                }
            }
        };
        let apply = async {
            let mut stats = ApplyStats::default();
            let mut seen = std::collections::HashSet::new();
            for path in &files {
                stats += apply::apply_file(self, b, path, &mut seen).await?;
            }
            Ok::<_, RunError>(stats)
        };
        let (applied, fetched) = tokio::join!(apply, fetch);
        if let Some((id, file_id)) = fetched {
            self.fetched_ahead.insert(id, file_id);
        }
        stats += applied?;
        let (verdict, error) = leftover_verdict(b);
        crate::failpoint!("finish.before_commit");
        let rest = ctx
            .store
            .finish_ingest(
                b,
                verdict,
                &error,
                self.stage_run(&b.stage)?.stage.max_attempts,
                self.collector(),
            )
            .await?;
        stats += ApplyStats { applied: 0, ..rest };
        self.ingested(b, stats).await?;
        // Results are in the store now; local copies of prompts and answers can go, and so
        // can the input file at the provider.
        for path in files {
            let _ = std::fs::remove_file(path);
        }
        if let Some(f) = &b.file_path {
            let _ = std::fs::remove_file(f);
        }
        if let Some(file_id) = &b.input_file_id {
            match ctx.provider.delete_file(file_id).await {
                // Recorded, so `nightshift gc` knows it is gone.
                Ok(()) => ctx.store.record_cleaned(&b.id, "input", file_id).await?,
                Err(e) => {
                    tracing::info!(file = %file_id, error = %e, "could not delete the uploaded input file; `nightshift gc` tries again")
                }
            }
        }
        Ok(())
    }

    /// Closes a batch that never reached the provider (or cannot be found there). When it
    /// surely never did (`never_sent`), its attempts are taken back rather than failed, so a
    /// cancelled-before-sending batch costs its items none of their `max_attempts`.
    async fn close_unsent(
        &mut self,
        b: &BatchRow,
        why: &str,
        never_sent: bool,
    ) -> Result<(), RunError> {
        let store = self.ctx.store;
        if never_sent {
            store.return_unsent(b, why).await?;
        } else {
            store
                .update_batch(
                    b,
                    b.state,
                    &BatchUpdate {
                        state: Some(BatchState::Ended),
                        end_state: Some(EndState::Cancelled),
                        error: Some(why.to_string()),
                        ended_at: Some(now_ms()),
                        ..Default::default()
                    },
                )
                .await?;
        }
        let stats = store
            .finish_ingest(
                b,
                AttemptVerdict::Cancelled,
                why,
                self.stage_run(&b.stage)?.stage.max_attempts,
                self.collector(),
            )
            .await?;
        self.ingested(b, stats).await?;
        Ok(())
    }
}

/// What `cancel` did.
#[derive(Clone, Debug, Default)]
pub struct CancelReport {
    /// (local batch id, provider batch id, what happened)
    pub batches: Vec<(String, Option<String>, String)>,
    /// Tokens and cost billed by the cancelled batches (requests that ran before the cancel).
    pub usage: Usage,
    pub billed: Usd,
    /// Batches still cancelling when the command stopped waiting.
    pub still_open: usize,
}

/// Cancels the open batches of the pipeline (of one run, with `run`), waits for them to end
/// (unless `wait` is false) and ingests what ran, so what was billed is in the ledger.
pub async fn cancel<S: Store, P: BatchProvider>(
    ctx: &RunContext<'_, S, P>,
    run: Option<&str>,
    wait: bool,
) -> Result<CancelReport, RunError> {
    let mut runner = Runner::new(ctx)?;
    let store = ctx.store;
    let mut report = CancelReport::default();
    // Cancelling overrides whoever holds a batch: each target is claimed by force, which
    // fences out a worker still working on it.
    let mut targets: Vec<BatchRow> = Vec::new();
    for b in store.open_batches(Some(&ctx.pipeline.name)).await? {
        if run.is_some_and(|r| b.run_id != r) {
            continue;
        }
        let claim = crate::store::Claim {
            batch_id: Some(&b.id),
            force: true,
            ..runner.claim()
        };
        targets.extend(store.claim_batches(&claim).await?);
    }
    let ids: Vec<String> = targets.iter().map(|b| b.id.clone()).collect();
    for b in targets {
        let what = match b.state {
            _ if b.mode == BatchMode::Online => {
                // Online requests are ours to stop: what was answered is already recorded.
                let cap = runner.stage_run(&b.stage)?.stage.max_attempts;
                let lost = store.lose_dispatched(&b, cap).await?;
                runner
                    .close_unsent(&b, "cancelled before it was sent", true)
                    .await?;
                format!(
                    "online batch stopped ({} request(s) left unanswered)",
                    lost.applied
                )
            }
            BatchState::Planned | BatchState::Built => {
                runner
                    .close_unsent(&b, "cancelled before it was sent", true)
                    .await?;
                "cancelled before it was sent".to_string()
            }
            BatchState::Uploading | BatchState::Uploaded => {
                if let Ok(files) = ctx.provider.find_files(&upload_name(&b.id)).await {
                    for f in files {
                        if ctx.provider.delete_file(&f).await.is_ok() {
                            store.record_cleaned(&b.id, "input", &f).await?;
                        }
                    }
                }
                runner
                    .close_unsent(&b, "cancelled before it was sent", true)
                    .await?;
                "cancelled before it was sent (uploaded file deleted)".to_string()
            }
            BatchState::Creating => {
                let known = store.known_provider_ids(&b.provider).await?;
                let found = ctx
                    .provider
                    .find_batch(&b.id, b.created_at / 1000, b.request_count as u64, &known)
                    .await
                    .map_err(RunError::Provider)?;
                match found {
                    Some(remote) => {
                        let pid = remote.id.clone();
                        runner.created(&b, remote, true).await?;
                        match ctx.provider.cancel(&pid).await {
                            Ok(r) => format!("cancel requested ({})", r.raw_status),
                            Err(e) => format!("cancel refused: {e}"),
                        }
                    }
                    None => {
                        runner
                            .close_unsent(
                                &b,
                                "cancelled; the provider shows no batch for it",
                                false,
                            )
                            .await?;
                        "cancelled; the provider shows no batch for it".to_string()
                    }
                }
            }
            BatchState::Submitted => {
                let pid = b.provider_batch_id.clone().unwrap_or_default();
                match ctx.provider.cancel(&pid).await {
                    Ok(r) => format!("cancel requested ({})", r.raw_status),
                    // Already over: it will be collected as it ended.
                    Err(ProviderError::Permanent { message, .. }) => {
                        format!("not cancelled: {message}")
                    }
                    Err(e) => return Err(RunError::Provider(e)),
                }
            }
            _ => "already ended; collected".to_string(),
        };
        report
            .batches
            .push((b.id.clone(), b.provider_batch_id.clone(), what));
    }
    // Collect: poll until they end, then ingest what ran.
    loop {
        let open: Vec<BatchRow> = store
            .open_batches(Some(&ctx.pipeline.name))
            .await?
            .into_iter()
            .filter(|b| ids.contains(&b.id))
            .collect();
        if open.is_empty() || ctx.shutdown.is_set() {
            report.still_open = open.len();
            break;
        }
        let mut waiting = 0;
        for b in &open {
            match b.state {
                BatchState::Submitted => {
                    waiting += 1;
                    runner.poll(b).await?;
                }
                BatchState::Ended => runner.ingest_batch(b, None).await?,
                _ => {}
            }
        }
        if waiting > 0 {
            if !wait {
                report.still_open = waiting;
                break;
            }
            let next = runner
                .polls
                .values()
                .map(|c| c.next)
                .min()
                .unwrap_or_else(|| Instant::now() + ctx.pipeline.provider.poll_min);
            ctx.shutdown.sleep_until(next).await;
        }
    }
    for id in &ids {
        let t = store.ledger_totals_for_batch(id).await?;
        report.usage.add(&t.usage);
        report.billed += t.cost;
    }
    Ok(report)
}
