//! What a run is given: the [`RunContext`] its caller builds, the [`Shutdown`] request it
//! honours, the request settings derived from the pipeline ([`spec`], [`schema_name`]) and
//! where its work files live.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::Observer;
use crate::config::{Pipeline, Stage};
use crate::cost::ModelPrice;
use crate::provider::{BatchProvider, RequestSpec};
use crate::store::Store;

/// Everything a run needs, built by the caller.
pub struct RunContext<'a, S: Store, P: BatchProvider> {
    pub store: &'a S,
    pub provider: &'a P,
    pub pipeline: &'a Pipeline,
    /// The price of each stage's model, in the order of `pipeline.stages`.
    pub prices: &'a [ModelPrice],
    pub observer: &'a dyn Observer,
    /// Folder for batch files and downloads (`.nightshift/` beside the pipeline file).
    pub work_dir: PathBuf,
    /// Where the per-record results go (the pipeline's `output.path` unless overridden).
    pub output_path: PathBuf,
    pub shutdown: Shutdown,
    /// Submit what is ready and return without waiting for the provider.
    pub detach: bool,
    /// Read the source into the store and return: workers send it.
    pub ingest_only: bool,
    /// The run's spending limits (the pipeline's `[budget]`, or `--budget-usd`).
    pub budget: crate::config::Budget,
    /// This process's worker id, which its leases name, and how long a lease lasts without
    /// a heartbeat. Another worker adopts a batch whose lease ran out.
    pub worker_id: String,
    pub lease: Duration,
}

/// A request to stop (SIGINT, SIGTERM): the runner finishes the step it is in — its store
/// transaction, its HTTP call — and returns with everything resumable.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    flag: Arc<AtomicBool>,
    notify: Arc<tokio::sync::Notify>,
}

impl Shutdown {
    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Sleeps until `deadline` or until a stop is requested.
    pub async fn sleep_until(&self, deadline: Instant) {
        if self.is_set() {
            return;
        }
        let notified = self.notify.notified();
        tokio::select! {
            _ = tokio::time::sleep_until(deadline.into()) => {}
            _ = notified => {}
        }
    }
}

/// Where batch input files live.
pub(super) fn batches_dir(work: &Path) -> PathBuf {
    work.join("batches")
}

pub(super) fn downloads_dir(work: &Path) -> PathBuf {
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

/// The schema name a stage's requests carry: the pipeline's name for the one stage of a
/// one-stage file (as in the first releases, so its item keys stay), `<pipeline>_<stage>`
/// otherwise.
pub fn stage_schema_name(p: &Pipeline, stage: &Stage) -> String {
    if stage.name == crate::config::DEFAULT_STAGE {
        schema_name(&p.name)
    } else {
        schema_name(&format!("{}_{}", p.name, stage.name))
    }
}

/// What the provider is asked for by one stage.
pub fn spec<'a>(stage: &'a Stage, schema: &'a serde_json::Value, name: &'a str) -> RequestSpec<'a> {
    RequestSpec {
        model: &stage.model,
        system: stage.prompt.system.as_deref(),
        max_output_tokens: stage.prompt.max_output_tokens,
        temperature: stage.prompt.temperature,
        schema,
        schema_name: name,
    }
}
