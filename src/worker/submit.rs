//! Submission, write-ahead: `planned → built → uploading → uploaded → creating →
//! submitted`. Each state is committed before the side effect it announces; a batch found
//! in `uploading` or `creating` (a crash, an ambiguous failure) is first looked for at the
//! provider — its file by name, the batch by our local id — and adopted if found. A create
//! is sent again only when the provider has had the grace period to show it and does not.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{Event, PollClock, RunError, Runner, upload_name};
use crate::provider::{BatchMeta, BatchProvider, CreateInput, ProviderError, RemoteBatch};
use crate::store::{AttemptVerdict, BatchRow, BatchState, BatchUpdate, Store, StoreError, now_ms};

impl<S: Store, P: BatchProvider> Runner<'_, S, P> {
    /// Takes a batch from wherever it is up to `submitted`.
    pub(super) async fn submit(&mut self, mut b: BatchRow) -> Result<(), RunError> {
        let ctx = self.ctx;
        let store = ctx.store;
        loop {
            if ctx.shutdown.is_set() {
                return Ok(());
            }
            match b.state {
                BatchState::Planned => {
                    let t = Instant::now();
                    let (path, sha, bytes) = self.build_file(&b).await?;
                    self.times.prepare += t.elapsed();
                    store
                        .update_batch(
                            &b,
                            BatchState::Planned,
                            &BatchUpdate {
                                state: Some(BatchState::Built),
                                file_path: Some(path.display().to_string()),
                                file_sha256: Some(sha),
                                file_bytes: Some(bytes as i64),
                                ..Default::default()
                            },
                        )
                        .await?;
                }
                BatchState::Built if !ctx.provider.uploads(b.file_bytes.unwrap_or(0) as u64) => {
                    // The requests go inline in the create call: nothing to upload.
                    store
                        .update_batch(
                            &b,
                            BatchState::Built,
                            &BatchUpdate {
                                state: Some(BatchState::Uploaded),
                                ..Default::default()
                            },
                        )
                        .await?;
                }
                BatchState::Built => {
                    store
                        .update_batch(
                            &b,
                            BatchState::Built,
                            &BatchUpdate {
                                state: Some(BatchState::Uploading),
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
                BatchState::Uploading => {
                    // An earlier upload may have landed: adopt it by name, drop extra copies.
                    match ctx.provider.find_files(&upload_name(&b.id)).await {
                        Ok(files) if !files.is_empty() => {
                            for extra in &files[1..] {
                                if let Err(e) = ctx.provider.delete_file(extra).await {
                                    tracing::info!(file = %extra, error = %e, "could not delete a duplicate upload");
                                }
                            }
                            self.uploaded(&b, files[0].clone()).await?;
                        }
                        Ok(_) => match self.upload(&b).await {
                            Ok(file_id) => self.uploaded(&b, file_id).await?,
                            Err(e) => return self.provider_failure(e),
                        },
                        Err(e) => return self.provider_failure(e),
                    }
                }
                BatchState::Uploaded => {
                    store
                        .update_batch(
                            &b,
                            BatchState::Uploaded,
                            &BatchUpdate {
                                state: Some(BatchState::Creating),
                                creating_at: Some(now_ms()),
                                ..Default::default()
                            },
                        )
                        .await?;
                    crate::failpoint!("create.before_send");
                    if !self.try_create(&b).await? {
                        return Ok(());
                    }
                }
                BatchState::Creating => {
                    // The create may have taken effect: look for it before sending again.
                    let since = b.created_at / 1000;
                    let known = store.known_provider_ids(&b.provider).await?;
                    match ctx
                        .provider
                        .find_batch(&b.id, since, b.request_count as u64, &known)
                        .await
                    {
                        Ok(Some(remote)) => self.created(&b, remote, true).await?,
                        Ok(None) => {
                            if !self.not_created.contains(&b.id)
                                && self.within_grace(&b, ctx.pipeline.provider.reconcile_grace)
                            {
                                // The provider's list may lag the create: look again later.
                                tracing::debug!(batch = %b.id, "not in the provider's list yet; looking again until the reconcile grace has passed");
                                self.waiting = true;
                                return Ok(());
                            }
                            // Sent again: the grace counts from this send.
                            store
                                .update_batch(
                                    &b,
                                    BatchState::Creating,
                                    &BatchUpdate {
                                        creating_at: Some(now_ms()),
                                        ..Default::default()
                                    },
                                )
                                .await?;
                            if !self.try_create(&b).await? {
                                return Ok(());
                            }
                        }
                        Err(e) => return self.provider_failure(e),
                    }
                }
                _ => return Ok(()),
            }
            b = match self.reload(&b).await? {
                Some(now) => now,
                None => return Err(StoreError::LeaseLost { batch_id: b.id }.into()),
            };
        }
    }

    /// Sends the create; returns whether the batch moved on (submitted or rejected).
    async fn try_create(&mut self, b: &BatchRow) -> Result<bool, RunError> {
        match self.create(b).await {
            Ok(remote) => {
                self.created(b, remote, false).await?;
                Ok(true)
            }
            Err(ProviderError::Permanent { message, code, .. }) => {
                self.rejected(b, code, message).await?;
                Ok(true)
            }
            Err(ProviderError::Ambiguous { message }) => {
                tracing::info!(batch = %b.id, %message, "create may have taken effect; reconciling before any resend");
                self.maybe_created.insert(b.id.clone());
                self.not_created.remove(&b.id);
                self.note_transient(ProviderError::Ambiguous { message })?;
                Ok(false)
            }
            Err(e @ ProviderError::Transient { .. }) => {
                // Refused before it took effect (429, connection refused): safe to resend.
                if !self.maybe_created.contains(&b.id) {
                    self.not_created.insert(b.id.clone());
                }
                self.provider_failure(e)?;
                Ok(false)
            }
            Err(e) => {
                self.provider_failure(e)?;
                Ok(false)
            }
        }
    }

    /// The batch's input file, rebuilt byte for byte if it was lost.
    async fn local_file(&self, b: &BatchRow) -> Result<PathBuf, ProviderError> {
        Ok(match &b.file_path {
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
        })
    }

    async fn upload(&mut self, b: &BatchRow) -> Result<String, ProviderError> {
        let path = self.local_file(b).await?;
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
                b,
                BatchState::Uploading,
                &BatchUpdate {
                    state: Some(BatchState::Uploaded),
                    input_file_id: Some(file_id),
                    ..Default::default()
                },
            )
            .await?;
        Ok(())
    }

    async fn create(&mut self, b: &BatchRow) -> Result<RemoteBatch, ProviderError> {
        let path = self.local_file(b).await?;
        let r = self
            .ctx
            .provider
            .create(
                &CreateInput {
                    file_id: b.input_file_id.as_deref(),
                    path: &path,
                },
                &BatchMeta {
                    local_id: &b.id,
                    run_id: &b.run_id,
                    pipeline: &b.pipeline,
                    request_count: b.request_count as u64,
                },
            )
            .await;
        crate::failpoint!("create.after_send");
        if r.is_ok() {
            self.note_success();
        }
        r
    }

    pub(super) async fn created(
        &mut self,
        b: &BatchRow,
        remote: RemoteBatch,
        adopted: bool,
    ) -> Result<(), RunError> {
        let ctx = self.ctx;
        let stored = ctx
            .store
            .update_batch(
                b,
                BatchState::Creating,
                &BatchUpdate {
                    state: Some(BatchState::Submitted),
                    provider_batch_id: Some(remote.id.clone()),
                    provider_status: Some(remote.raw_status.clone()),
                    submitted_at: Some(now_ms()),
                    ..Default::default()
                },
            )
            .await;
        let ok = match stored {
            Ok(ok) => ok,
            Err(StoreError::LeaseLost { batch_id }) => {
                if !adopted {
                    self.created_after_lease_lost(b, &remote).await?;
                }
                return Err(StoreError::LeaseLost { batch_id }.into());
            }
            Err(e) => return Err(e.into()),
        };
        crate::failpoint!("create.after_store");
        self.maybe_created.remove(&b.id);
        self.not_created.remove(&b.id);
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

    /// This worker created a provider batch after another took the local batch over (its
    /// lease ran out while the create was in flight: a pause, a partition). If the new holder
    /// adopted this very provider batch, all is well; otherwise it is a second submission of
    /// the same requests: cancel it at once and record it, so it is counted and explained.
    async fn created_after_lease_lost(
        &mut self,
        b: &BatchRow,
        remote: &RemoteBatch,
    ) -> Result<(), RunError> {
        let ctx = self.ctx;
        let now = ctx.store.batch(&b.id).await?;
        let holder_has = now
            .as_ref()
            .and_then(|r| r.provider_batch_id.as_deref())
            .map(|id| id == remote.id);
        if holder_has == Some(true) {
            return Ok(());
        }
        if holder_has.is_none()
            && now
                .as_ref()
                .is_some_and(|r| r.state == BatchState::Creating)
        {
            // The new holder has not created anything yet: it will find this provider batch
            // by our local id and adopt it, exactly as after a crash.
            tracing::warn!(batch = %b.id, provider_batch = %remote.id, "lease lost after create; the new holder will adopt it");
            return Ok(());
        }
        let cancelled = match ctx.provider.cancel(&remote.id).await {
            Ok(r) => format!("cancel requested ({})", r.raw_status),
            Err(e) => format!("cancel failed: {e}"),
        };
        tracing::error!(batch = %b.id, provider_batch = %remote.id, %cancelled, "duplicate submission after a lost lease");
        ctx.store
            .record_anomaly(
                Some(&b.run_id),
                Some(&b.id),
                "duplicate_submission",
                None,
                &format!(
                    "provider batch {} was created by a worker whose lease had run out; the batch is held as {}; {cancelled}",
                    remote.id,
                    now.and_then(|r| r.provider_batch_id).unwrap_or_else(|| "-".into())
                ),
            )
            .await?;
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
                b,
                BatchState::Creating,
                &BatchUpdate {
                    state: Some(BatchState::Ended),
                    error: Some(error.clone()),
                    ended_at: Some(now_ms()),
                    ..Default::default()
                },
            )
            .await?;
        let stats = store
            .finish_ingest(
                b,
                AttemptVerdict::BatchRejected,
                &error,
                self.stage_run(&b.stage)?.stage.max_attempts,
                self.collector(),
            )
            .await?;
        self.ingested(b, stats).await?;
        Ok(())
    }
}
