//! Clean-up (`nightshift gc`, `[cleanup] after_run`): deleting what the pipeline's ingested
//! batches left behind and no longer need — their files at the provider (input, output and
//! error files; Anthropic's ended batches with their results; the objects of a Bedrock job's
//! output folder) and their local batch files and downloads.
//!
//! Only batches whose results are in the store (`ingested`) are looked at, and of each only
//! what the store names as its own: a batch in flight, or a file no batch of ours recorded,
//! is never touched. Each deletion is recorded as it succeeds (`batch_cleanup`), a batch once
//! nothing of it is left (`cleaned_at`), so a clean-up stopped half-way or failing on some
//! files goes on where it was, and a second one finds nothing. A provider file already gone
//! counts as deleted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::options::{batches_dir, downloads_dir};
use crate::provider::{BatchProvider, ProviderError};
use crate::store::{BatchRow, Store, StoreError, now_ms};

/// What to clean.
#[derive(Clone, Copy, Debug)]
pub struct GcOptions {
    /// Only batches ingested at least this long ago.
    pub older_than: Duration,
    /// List what would be deleted; delete nothing.
    pub dry_run: bool,
}

/// One thing to delete.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GcTarget {
    /// The local batch id.
    pub batch: String,
    /// The provider (`openai`, …), or `local` for a file on this machine.
    pub provider: String,
    /// `input`, `output`, `error` (provider files), `batch` (an ended provider batch and its
    /// results), `object` (one object of a job's output folder), `batch_file` or `download`
    /// (local files).
    pub kind: &'static str,
    /// The provider's id, an `s3://` URI, or a local path.
    pub target: String,
}

/// What happened to a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GcOutcome {
    /// `--dry-run`: it would be deleted.
    WouldDelete,
    Deleted,
    /// It could not be deleted (the reason, scrubbed); a later clean-up tries again.
    Failed(String),
}

/// What a clean-up did.
#[derive(Debug, Default)]
pub struct GcReport {
    /// Batches looked at (ingested before the horizon, not yet cleaned).
    pub batches: usize,
    /// Every target, in batch order, with its outcome.
    pub targets: Vec<(GcTarget, GcOutcome)>,
    /// Batches sent by another provider than the pipeline's (its `kind` changed since): their
    /// provider files need a client of that provider, so they stay.
    pub other_provider: Vec<(String, String)>,
    /// Batches whose folder could not be listed: (batch, reason).
    pub unlisted: Vec<(String, String)>,
}

impl GcReport {
    pub fn deleted(&self) -> usize {
        self.count(|o| *o == GcOutcome::Deleted)
    }

    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, GcOutcome::Failed(_))) + self.unlisted.len()
    }

    fn count(&self, f: impl Fn(&GcOutcome) -> bool) -> usize {
        self.targets.iter().filter(|(_, o)| f(o)).count()
    }
}

/// The provider-side leftovers of an ingested batch the store names, less what it recorded
/// as deleted. A Bedrock output folder comes back as (`output`, folder): it is listed into
/// objects by the caller.
fn provider_targets(b: &BatchRow, done: &[(String, String)]) -> Vec<(&'static str, String)> {
    let gone = |kind: &str, t: &str| done.iter().any(|(k, d)| k == kind && d == t);
    let mut out = Vec::new();
    let mut add = |kind: &'static str, id: &Option<String>, ok: &dyn Fn(&str) -> bool| {
        if let Some(id) = id
            && !id.is_empty()
            && ok(id)
            && !gone(kind, id)
        {
            out.push((kind, id.clone()));
        }
    };
    match b.provider.as_str() {
        "openai" | "azure" => {
            add("input", &b.input_file_id, &|_| true);
            add("output", &b.output_file_id, &|_| true);
            add("error", &b.error_file_id, &|_| true);
        }
        "gemini" => {
            // Inline answers live in the batch itself, not in a file.
            let file = |id: &str| id.starts_with("files/");
            add("input", &b.input_file_id, &file);
            add("output", &b.output_file_id, &file);
            add("error", &b.error_file_id, &file);
        }
        "anthropic" => {
            // The requests went inline; the results are the batch's, deleted with it.
            add("batch", &b.provider_batch_id, &|_| b.end_state.is_some());
        }
        "bedrock" => {
            let s3 = |id: &str| id.starts_with("s3://");
            add("input", &b.input_file_id, &s3);
            add("output", &b.output_file_id, &|id| {
                s3(id) && id.ends_with('/')
            });
        }
        _ => {}
    }
    out
}

/// The local files the batch had on this machine that are still there.
fn local_targets(b: &BatchRow, work_dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let mut out = Vec::new();
    if let Some(f) = &b.file_path {
        let p = PathBuf::from(f);
        // Ours: a batch file lives in the batches folder under its batch's id.
        if p.starts_with(batches_dir(work_dir)) && p.is_file() {
            out.push(("batch_file", p));
        }
    }
    for kind in ["output", "error"] {
        let p = crate::provider::download_path(&downloads_dir(work_dir), &b.id, kind);
        if p.is_file() {
            out.push(("download", p));
        }
    }
    out
}

fn reason(e: &ProviderError) -> String {
    crate::util::text::printable(&e.to_string())
}

/// Cleans the pipeline's ingested batches (see the module doc). Store errors stop it;
/// everything recorded before stays recorded. A refused key stops the provider deletions
/// (the rest are reported as failed).
pub async fn gc<S: Store, P: BatchProvider>(
    store: &S,
    provider: &P,
    pipeline: &str,
    work_dir: &Path,
    opts: &GcOptions,
) -> Result<GcReport, StoreError> {
    let horizon =
        now_ms().saturating_sub(i64::try_from(opts.older_than.as_millis()).unwrap_or(i64::MAX));
    let batches = store.cleanup_candidates(pipeline, horizon).await?;
    let mut rep = GcReport {
        batches: batches.len(),
        ..Default::default()
    };
    let mut auth: Option<String> = None;
    for b in &batches {
        let mut complete = true;
        let ours = b.provider == provider.kind();
        let done = store.cleaned_targets(&b.id).await?;
        let mut remote = provider_targets(b, &done);
        if !ours && !remote.is_empty() {
            rep.other_provider.push((b.id.clone(), b.provider.clone()));
            remote.clear();
            complete = false;
        }
        for (kind, id) in remote {
            let is_folder = b.provider == "bedrock" && kind == "output";
            let items: Vec<(&'static str, String)> = if is_folder {
                match provider.list_folder(&id).await {
                    Ok(objs) => objs.into_iter().map(|o| ("object", o)).collect(),
                    Err(e) => {
                        rep.unlisted.push((b.id.clone(), reason(&e)));
                        complete = false;
                        continue;
                    }
                }
            } else {
                vec![(kind, id.clone())]
            };
            let mut all_gone = true;
            for (kind, target) in items {
                let t = GcTarget {
                    batch: b.id.clone(),
                    provider: b.provider.clone(),
                    kind,
                    target: target.clone(),
                };
                if opts.dry_run {
                    rep.targets.push((t, GcOutcome::WouldDelete));
                    continue;
                }
                if let Some(why) = &auth {
                    rep.targets.push((t, GcOutcome::Failed(why.clone())));
                    all_gone = false;
                    continue;
                }
                let r = if kind == "batch" {
                    provider.delete_batch(&target).await
                } else {
                    provider.delete_file(&target).await
                };
                match r {
                    Ok(()) => {
                        if !is_folder {
                            store.record_cleaned(&b.id, kind, &target).await?;
                        }
                        rep.targets.push((t, GcOutcome::Deleted));
                    }
                    Err(e) => {
                        if matches!(e, ProviderError::Auth { .. }) {
                            auth = Some(reason(&e));
                        }
                        tracing::warn!(batch = %b.id, kind, target = %target, error = %e, "could not delete");
                        rep.targets.push((t, GcOutcome::Failed(reason(&e))));
                        all_gone = false;
                    }
                }
            }
            if opts.dry_run {
                continue;
            }
            if all_gone && is_folder {
                store.record_cleaned(&b.id, "output", &id).await?;
            }
            complete &= all_gone;
        }
        for (kind, path) in local_targets(b, work_dir) {
            let t = GcTarget {
                batch: b.id.clone(),
                provider: "local".into(),
                kind,
                target: path.display().to_string(),
            };
            if opts.dry_run {
                rep.targets.push((t, GcOutcome::WouldDelete));
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => rep.targets.push((t, GcOutcome::Deleted)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    rep.targets.push((t, GcOutcome::Deleted))
                }
                Err(e) => {
                    rep.targets.push((t, GcOutcome::Failed(e.to_string())));
                    complete = false;
                }
            }
        }
        if !opts.dry_run && complete {
            store.mark_cleaned(&b.id).await?;
        }
    }
    Ok(rep)
}
