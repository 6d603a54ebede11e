//! Progress reporting: the typed [`Event`]s the runner emits as it goes, the [`Observer`]
//! that receives them, and [`LogObserver`], which turns each into one `tracing` record.

use crate::store::ApplyStats;

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
        /// What the batch's results cost (ledger).
        cost: crate::cost::Usd,
        /// The batch's stage, model and prices (`batch` or `standard`).
        stage: String,
        model: String,
        pricing_mode: String,
        /// The tokens of the batch's results (ledger).
        usage: crate::cost::Usage,
    },
    /// A batch this process held was taken over by another worker (its lease ran out).
    LeaseLost {
        batch_id: String,
    },
    /// A run's end status was recorded: by its own process, or (a detached run) by the
    /// process that ingested its last batch.
    RunEnded {
        run_id: String,
        status: crate::store::RunStatus,
        exit_code: i32,
    },
    /// What this run has to carry to the end: items waiting and items in open batches.
    Work {
        items: u64,
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

/// Several observers, each given every event in turn (progress for people and metrics, say).
pub struct Observers<'a>(pub Vec<&'a dyn Observer>);

impl Observer for Observers<'_> {
    fn event(&self, e: &Event) {
        for o in &self.0 {
            o.event(e);
        }
    }
}

/// An observer that logs through `tracing`, one record per event with named fields (what
/// `--log-format json` turns into one JSON object per line).
pub struct LogObserver;

impl Observer for LogObserver {
    fn event(&self, e: &Event) {
        match e {
            // A lost lease is logged where it is found; a run's end is the command's to report.
            Event::IngestProgress { .. }
            | Event::Waiting { .. }
            | Event::LeaseLost { .. }
            | Event::RunEnded { .. } => {}
            Event::IngestDone {
                records,
                quarantined,
                new_items,
            } => tracing::info!(
                event = "ingested",
                records,
                quarantined,
                new_items,
                "source read"
            ),
            Event::Quarantined {
                source,
                line,
                field,
                reason,
            } => tracing::info!(
                event = "quarantined",
                source = %source,
                line,
                field = field.as_deref(),
                reason = %reason,
                "line quarantined"
            ),
            Event::Planned { batch_id, requests } => {
                tracing::info!(event = "planned", batch_id = %batch_id, requests, "batch planned")
            }
            Event::Submitted {
                batch_id,
                provider_batch_id,
                requests,
            } => tracing::info!(
                event = "submitted",
                batch_id = %batch_id,
                provider_batch_id = %provider_batch_id,
                requests,
                "batch submitted"
            ),
            Event::Adopted {
                batch_id,
                provider_batch_id,
            } => tracing::info!(
                event = "adopted",
                batch_id = %batch_id,
                provider_batch_id = %provider_batch_id,
                "batch adopted: the provider already had it"
            ),
            Event::Polled {
                batch_id,
                status,
                completed,
                failed,
                total,
            } => tracing::debug!(
                event = "polled",
                batch_id = %batch_id,
                status = %status,
                completed,
                failed,
                total,
                "batch polled"
            ),
            Event::Ingested {
                batch_id,
                stats,
                cost,
                ..
            } => tracing::info!(
                event = "collected",
                batch_id = %batch_id,
                succeeded = stats.succeeded,
                to_retry = stats.failed,
                failed_for_good = stats.exhausted,
                cost_usd = %cost,
                "batch results applied"
            ),
            Event::Work { items } => {
                tracing::info!(event = "work", items, "items to carry to the end")
            }
            Event::Note(n) => tracing::info!(event = "note", "{n}"),
        }
    }
}
