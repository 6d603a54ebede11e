//! The state store: runs, records, items, batches, attempts, ledger.
//!
//! One [`Store`] trait with coarse operations, each one transaction, so the pipeline logic
//! never sees SQL and a second backend (PostgreSQL) implements the same contract. Every
//! write that follows a provider side effect is guarded by the row's state (`WHERE state =
//! 'in_flight'`), so replaying it after a crash changes nothing; ledger rows are unique per
//! `custom_id` and written in the same transaction as the result they pay for.
//!
//! Item states: `pending → in_flight → succeeded | failed → in_flight … → exhausted`.
//! Batch states: `planned → built → uploading → uploaded → creating → submitted → ended →
//! ingested` ([`state`]; docs/design.md, "The model" and "Storage").
//!
//! This file keeps the trait, the error type and the module map:
//! - [`state`]: the stored states and modes as enums;
//! - [`rows`]: the rows and values the trait reads and writes (re-exported here);
//! - [`sql`]: [`SqlStore`], the implementation for both engines, by concern;
//! - [`db`]: the query API over either engine; [`sqlite`], [`postgres`]: opening them;
//! - [`lock`]: the run lock of a SQLite store.

pub mod db;
pub mod lock;
pub mod postgres;
pub mod rows;
pub mod sql;
pub mod sqlite;
pub mod state;

use std::future::Future;
use std::path::Path;

use crate::cost::{Usage, Usd};
use crate::request::{PreparedRecord, RequestShape};
use crate::source::Quarantined;

pub use db::Engine;
pub use lock::{LockError, RunLock};
pub use rows::*;
pub use sql::SqlStore;
pub use state::{
    AttemptState, AttemptVerdict, BatchMode, BatchState, EndState, ItemState, RunStatus,
    UnknownValue,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Another worker took the batch over (this one's lease ran out): nothing was written.
    #[error("the lease on batch {batch_id} was taken over by another worker")]
    LeaseLost { batch_id: String },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        match e {
            // A schema step this build does not have: the store was opened by a newer
            // nightshift (after an upgrade rolled back, say). Said so, not as a failure.
            sqlx::migrate::MigrateError::VersionMissing(v) => StoreError::Invalid(format!(
                "this store was written by a newer nightshift (its schema has step {v}, which \
                 this version does not know); run that version on it, or give this one another \
                 store with --db"
            )),
            e => StoreError::Migrate(e),
        }
    }
}

pub use crate::util::time::now_ms;

/// An open ingest transaction. Dropped without [`IngestTx::commit`], it rolls back.
pub trait IngestTx: Send {
    /// Inserts part of a chunk: records (new items as `pending`) and quarantined lines.
    fn add(
        &mut self,
        target: &IngestTarget<'_>,
        records: &[PreparedRecord],
        quarantined: &[Quarantined],
    ) -> impl Future<Output = Result<IngestStats>> + Send;
    fn commit(self) -> impl Future<Output = Result<()>> + Send;
}

/// Items per page of the per-item audit (`report --items`): their attempts, a few MB of rows
/// (peak RSS 77 MB with these pages against 73 with pages of 500, at 100,000 records through
/// two stages). Pages of 500 cost PostgreSQL a plan and the start of its parallel workers
/// each, 380 times at that size (6.5 s for the audit against 4.4 s read whole).
pub const AUDIT_ITEMS: usize = 5_000;

/// The store contract. Each method is one transaction unless it says otherwise.
pub trait Store: Send + Sync + 'static {
    // --- runs -----------------------------------------------------------------------------
    fn create_run(&self, run: &NewRun) -> impl Future<Output = Result<()>> + Send;
    /// Records what the run's ingest read: lines, quarantined lines, valid records.
    fn set_run_counts(
        &self,
        run_id: &str,
        records_read: u64,
        quarantined: u64,
    ) -> impl Future<Output = Result<()>> + Send;
    fn finish_run(
        &self,
        run_id: &str,
        status: RunStatus,
        exit_code: i32,
        message: Option<&str>,
    ) -> impl Future<Output = Result<()>> + Send;
    fn run(&self, run_id: &str) -> impl Future<Output = Result<Option<RunRow>>> + Send;
    /// Marks runs still `running` whose process died as `interrupted`; returns how many. On
    /// SQLite the caller holds the run lock, so no other run can be alive; on PostgreSQL the
    /// runs whose process stopped, or sent its last heartbeat before `stale_before` (ms).
    fn mark_stale_runs(&self, stale_before: i64) -> impl Future<Output = Result<u64>> + Send;
    /// The latest run, of one pipeline or of any.
    fn last_run(
        &self,
        pipeline: Option<&str>,
    ) -> impl Future<Output = Result<Option<RunRow>>> + Send;
    /// The runs whose id starts with `prefix` (at most `limit`), newest first.
    fn runs_with_prefix(
        &self,
        prefix: &str,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<RunRow>>> + Send;
    /// The latest `limit` runs, of one pipeline or of any, newest first.
    fn recent_runs(
        &self,
        pipeline: Option<&str>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<RunRow>>> + Send;
    /// Stores a run's final figures ([`RunFigures::to_json`]).
    fn freeze_figures(
        &self,
        run_id: &str,
        figures_json: &str,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Deletes the record rows of the pipeline's runs older than its newest `keep` runs
    /// whose figures are frozen (their reports read the frozen figures); returns how many.
    fn prune_records(&self, pipeline: &str, keep: u32) -> impl Future<Output = Result<u64>> + Send;
    /// Batches of the run not yet ingested.
    fn open_batch_count(&self, run_id: &str) -> impl Future<Output = Result<u64>> + Send;

    // --- ingest ---------------------------------------------------------------------------
    /// Stores a request shape once and returns its id.
    fn ensure_shape(&self, shape: &RequestShape) -> impl Future<Output = Result<i64>> + Send;
    fn shape(&self, id: i64) -> impl Future<Output = Result<RequestShape>> + Send;
    /// Inserts one chunk of records (new items as `pending`) and quarantined lines.
    fn ingest(
        &self,
        target: &IngestTarget<'_>,
        records: &[PreparedRecord],
        quarantined: &[Quarantined],
    ) -> impl Future<Output = Result<IngestStats>> + Send;
    /// Opens an ingest transaction: parts of a chunk go in as the source is read, so the
    /// chunk is never held in memory whole; nothing is visible until it commits.
    fn begin_ingest(&self) -> impl Future<Output = Result<Self::Ingest>> + Send;
    /// The store's ingest transaction ([`Store::begin_ingest`]).
    type Ingest: IngestTx;

    // --- stages ---------------------------------------------------------------------------
    /// Records of the run after line `after_line` ready for `stage`: no link there yet,
    /// every link at each of `needs` final (succeeded, or skipped); up to `limit`, in line
    /// order.
    fn ready_records(
        &self,
        run_id: &str,
        stage: &str,
        needs: &[String],
        after_line: i64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<ReadyRecord>>> + Send;
    /// Of the run's records at `lines` (ascending; a page's worth), those ready for `stage`,
    /// as [`Store::ready_records`] judges, in line order.
    fn ready_records_at(
        &self,
        run_id: &str,
        stage: &str,
        needs: &[String],
        lines: &[i64],
    ) -> impl Future<Output = Result<Vec<ReadyRecord>>> + Send;
    /// Lines of the run's records linked to an item attempted in the batch, ascending.
    fn batch_record_lines(
        &self,
        run_id: &str,
        batch_id: &str,
    ) -> impl Future<Output = Result<Vec<i64>>> + Send;
    /// Stores a later stage's items and links for some records (insert-or-ignore: safe to
    /// repeat); returns how many items are new.
    fn add_links(
        &self,
        target: &IngestTarget<'_>,
        links: &[NewLinks],
    ) -> impl Future<Output = Result<u64>> + Send;
    /// Every record → item link of the run's records with lines in `first..=last`; with
    /// `sharers`, how many of the run's records share each item (else 0: the results file
    /// does not show it, and counting it is a lookup per link).
    fn links_between(
        &self,
        run_id: &str,
        first: i64,
        last: i64,
        sharers: bool,
    ) -> impl Future<Output = Result<Vec<LinkRow>>> + Send;

    /// Items of stage `reviewed` whose review at stage `review` failed for a record of the
    /// run and that were never regenerated, with the review's result.
    fn failed_reviews(
        &self,
        run_id: &str,
        review: &str,
        reviewed: &str,
    ) -> impl Future<Output = Result<Vec<(i64, String)>>> + Send;
    /// Sends an item again once because its review failed (see `on_fail = "regenerate"`):
    /// `failed` again, and the run's links at `later_stages` of the records it serves
    /// removed. False when it was regenerated already.
    fn regenerate(
        &self,
        run_id: &str,
        item_id: i64,
        later_stages: &[String],
        reason: &str,
    ) -> impl Future<Output = Result<bool>> + Send;
    /// Ids of the run's records whose work at `stage` is done: linked there, and every link
    /// an item that succeeded or a skip (no error).
    fn stage_done_records(
        &self,
        run_id: &str,
        stage: &str,
    ) -> impl Future<Output = Result<Vec<String>>> + Send;
    /// How many of the run's records are done at `stage` ([`Store::stage_done_records`],
    /// counted where they are stored).
    fn stage_done_count(
        &self,
        run_id: &str,
        stage: &str,
    ) -> impl Future<Output = Result<u64>> + Send;
    /// The run's items of `stage`: its links (a record's chunks, shared items once per
    /// record) and each distinct item's prompt tokens.
    fn run_stage_items(
        &self,
        run_id: &str,
        stage: &str,
    ) -> impl Future<Output = Result<StageItems>> + Send;
    /// Up to `limit` of the run's records after line `after_line`, in line order: (line,
    /// record id, fields as JSON; `{}` where the run kept none, as a one-stage run).
    fn run_record_data(
        &self,
        run_id: &str,
        after_line: i64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<(i64, String, String)>>> + Send;
    /// Up to `limit` of the run's records after line `after_line`, in line order: (line,
    /// record id).
    fn run_record_ids(
        &self,
        run_id: &str,
        after_line: i64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<(i64, String)>>> + Send;

    /// Whether nothing of the pipeline's work for the run is left, read at one snapshot: no
    /// open batch, no item waiting for an attempt, no record ready for a later stage, no
    /// failed review waiting to be sent again. The run ends only on this (separate reads
    /// race with other workers' plans and advances).
    fn settled(
        &self,
        run_id: &str,
        work: &PipelineWork<'_>,
    ) -> impl Future<Output = Result<bool>> + Send;

    // --- planning -------------------------------------------------------------------------
    /// Items waiting for an attempt (`pending`, or `failed` under the cap).
    fn plannable_count(
        &self,
        pipeline: &str,
        stage: &str,
    ) -> impl Future<Output = Result<u64>> + Send;
    /// Gives items that failed for good under a lower attempt cap another chance when the
    /// cap was raised (`exhausted` with `attempts < max_attempts` → `failed`).
    fn revive_exhausted(
        &self,
        pipeline: &str,
        stage: &str,
        max_attempts: u32,
    ) -> impl Future<Output = Result<u64>> + Send;
    /// In one transaction: creates a `planned` batch with up to the limits' worth of
    /// plannable items, an attempt per item, and moves those items to `in_flight`.
    fn plan_batch(&self, req: &PlanRequest<'_>)
    -> impl Future<Output = Result<PlanOutcome>> + Send;
    /// What a run has committed to spend: the actual cost of its ingested batches plus the
    /// reservations of its open ones.
    fn run_commitment(&self, run_id: &str) -> impl Future<Output = Result<Usd>> + Send;
    /// Plannable items whose input tokens exceed `max_input_tokens` (refused by the per-item
    /// cap), and the plannable items in all.
    fn plannable_over(
        &self,
        pipeline: &str,
        stage: &str,
        max_input_tokens: u64,
    ) -> impl Future<Output = Result<u64>> + Send;
    /// What earlier attempts of a pipeline stage measured (output tokens, retries).
    fn history(
        &self,
        pipeline: &str,
        stage: &str,
    ) -> impl Future<Output = Result<crate::store::History>> + Send;
    /// Which of `keys` are items of the stage that already succeeded.
    fn succeeded_among(
        &self,
        pipeline: &str,
        stage: &str,
        keys: &[[u8; 32]],
    ) -> impl Future<Output = Result<Vec<[u8; 32]>>> + Send;
    /// Items waiting to be sent and the sum of their prompt tokens.
    fn plannable_totals(
        &self,
        pipeline: &str,
        stage: &str,
    ) -> impl Future<Output = Result<(u64, u64)>> + Send;
    /// A one-stage run's job as its plan needs it: its records, its distinct items, which
    /// of them are done, and their prompt tokens. Two passes, where [`Store::run_figures`]
    /// takes several. Of a multi-stage run, only the count of its records (its items are
    /// read stage by stage: [`Store::run_stage_items`]).
    fn run_job(&self, run_id: &str) -> impl Future<Output = Result<RunJob>> + Send;
    /// Prompt tokens of the items waiting to be sent.
    fn plannable_tokens(
        &self,
        pipeline: &str,
        stage: &str,
    ) -> impl Future<Output = Result<TokenCounts>> + Send;
    /// Records what the provider says it billed for one of its batches.
    fn record_provider_bill(&self, bill: &ProviderBill) -> impl Future<Output = Result<()>> + Send;
    fn provider_bill(
        &self,
        provider_batch_id: &str,
    ) -> impl Future<Output = Result<Option<ProviderBill>>> + Send;
    /// Stores the plan a run starts from.
    fn set_run_plan(
        &self,
        run_id: &str,
        plan_json: &str,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Lines of a batch in attempt order, `limit` at a time after `after_attempt_id`.
    fn batch_lines(
        &self,
        batch_id: &str,
        after_attempt_id: i64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<BatchLine>>> + Send;

    // --- batches --------------------------------------------------------------------------
    fn batch(&self, id: &str) -> impl Future<Output = Result<Option<BatchRow>>> + Send;
    /// Batches not yet ingested, oldest first (all pipelines when `pipeline` is `None`).
    fn open_batches(
        &self,
        pipeline: Option<&str>,
    ) -> impl Future<Output = Result<Vec<BatchRow>>> + Send;
    fn run_batches(&self, run_id: &str) -> impl Future<Output = Result<Vec<BatchRow>>> + Send;

    // --- clean-up (`nightshift gc`) -------------------------------------------------------
    /// The pipeline's ingested batches ingested at or before `ingested_before` (ms) that
    /// still may have something to delete, oldest first.
    fn cleanup_candidates(
        &self,
        pipeline: &str,
        ingested_before: i64,
    ) -> impl Future<Output = Result<Vec<BatchRow>>> + Send;
    /// What of the batch was deleted already: (kind, target) pairs.
    fn cleaned_targets(
        &self,
        batch_id: &str,
    ) -> impl Future<Output = Result<Vec<(String, String)>>> + Send;
    /// Records that `target` (a provider file id, batch id or `s3://` URI) of the batch is
    /// gone (insert-or-ignore: safe to repeat).
    fn record_cleaned(
        &self,
        batch_id: &str,
        kind: &str,
        target: &str,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Records that nothing of the (ingested) batch is left to delete.
    fn mark_cleaned(&self, batch_id: &str) -> impl Future<Output = Result<()>> + Send;

    // --- workers and leases ---------------------------------------------------------------
    /// Takes the leases of open batches: those the owner holds (renewed), and those free or
    /// whose lease ran out (a new token each). SQLite, under the run lock, hands out every
    /// open batch. Returns what the owner now holds, oldest first.
    fn claim_batches(
        &self,
        claim: &Claim<'_>,
    ) -> impl Future<Output = Result<Vec<BatchRow>>> + Send;
    /// Records that the worker is alive and extends every lease it holds; returns how many.
    fn heartbeat(
        &self,
        worker: &WorkerInfo,
        lease_ms: i64,
    ) -> impl Future<Output = Result<u64>> + Send;
    /// Gives up the worker's leases (a clean stop), so others need not wait for them to
    /// run out; `stopped` also marks the worker stopped.
    fn release_leases(
        &self,
        worker_id: &str,
        stopped: bool,
    ) -> impl Future<Output = Result<u64>> + Send;
    /// Workers running (not stopped) with a heartbeat since `seen_since` (ms), and any
    /// still named on an open batch.
    fn workers(&self, seen_since: i64) -> impl Future<Output = Result<Vec<WorkerRow>>> + Send;
    /// Items waiting for a retry (`failed` under the cap).
    fn plannable_retries(
        &self,
        pipeline: &str,
        stage: &str,
    ) -> impl Future<Output = Result<u64>> + Send;
    /// Online mode: up to `limit` attempts of the batch not yet dispatched, in order.
    fn online_page(
        &self,
        batch_id: &str,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<OnlineLine>>> + Send;
    /// Online mode: records (and commits) that these attempts are about to be sent.
    fn mark_dispatched(
        &self,
        batch: &BatchRow,
        attempt_ids: &[i64],
    ) -> impl Future<Output = Result<()>> + Send;
    /// Online mode: attempts dispatched by a process that died before recording their
    /// answers fail as `lost` (they may have been billed); never sent again as such.
    fn lose_dispatched(
        &self,
        batch: &BatchRow,
        max_attempts: u32,
    ) -> impl Future<Output = Result<ApplyStats>> + Send;
    /// Batch ids of `provider` this store already tracks (never adopted for another batch).
    fn known_provider_ids(
        &self,
        provider: &str,
    ) -> impl Future<Output = Result<std::collections::HashSet<String>>> + Send;
    /// Applies `update` if the batch is still in state `from`; returns whether it was. Fenced
    /// by the batch's lease token: [`StoreError::LeaseLost`] if another claim moved it.
    fn update_batch(
        &self,
        batch: &BatchRow,
        from: BatchState,
        update: &BatchUpdate,
    ) -> impl Future<Output = Result<bool>> + Send;

    // --- results --------------------------------------------------------------------------
    fn batch_attempts(
        &self,
        batch_id: &str,
    ) -> impl Future<Output = Result<Vec<AttemptRef>>> + Send;
    /// Applies judged results: ledger rows (once per custom_id), attempt verdicts and item
    /// states, in one transaction. Attempts no longer `in_flight` are left alone.
    fn apply_results(
        &self,
        batch: &BatchRow,
        outcomes: &[AttemptOutcome],
        max_attempts: u32,
    ) -> impl Future<Output = Result<ApplyStats>> + Send;
    /// Ends a batch that never reached the provider (cancelled before its create was sent)
    /// as `cancelled` with `why`, and takes back its attempts not sent (for online batches,
    /// those never dispatched): their rows go and their items return to how planning found
    /// them, so an attempt never made does not count against `max_attempts`. One
    /// transaction; [`Store::finish_ingest`] then closes the batch. Returns how many items
    /// went back.
    fn return_unsent(
        &self,
        batch: &BatchRow,
        why: &str,
    ) -> impl Future<Output = Result<u64>> + Send;
    /// Fails every attempt of the batch still `in_flight` with `verdict` (no result line
    /// came back for it) and marks the batch `ingested` (by `collector`, the run whose
    /// process ingested it, if any), in one transaction.
    fn finish_ingest(
        &self,
        batch: &BatchRow,
        verdict: AttemptVerdict,
        error: &str,
        max_attempts: u32,
        collector: Option<&str>,
    ) -> impl Future<Output = Result<ApplyStats>> + Send;
    fn record_anomaly(
        &self,
        run_id: Option<&str>,
        batch_id: Option<&str>,
        kind: &str,
        custom_id: Option<&str>,
        detail: &str,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Anomalies of one kind, in the whole store.
    fn anomalies_of_kind(&self, kind: &str) -> impl Future<Output = Result<u64>> + Send;

    // --- reports --------------------------------------------------------------------------
    fn run_records(
        &self,
        run_id: &str,
        after_line: i64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<RecordResult>>> + Send;
    fn run_figures(&self, run_id: &str) -> impl Future<Output = Result<RunFigures>> + Send;
    fn ledger_totals_for_batch(
        &self,
        batch_id: &str,
    ) -> impl Future<Output = Result<LedgerTotals>> + Send;
    /// The attempts of the run's batches, in item and attempt order, with their records.
    fn audit(&self, run_id: &str) -> impl Future<Output = Result<Vec<AuditRow>>> + Send;
    /// The items the run's batches sent, ascending (the audit's pages are read by item).
    fn audit_items(&self, run_id: &str) -> impl Future<Output = Result<Vec<i64>>> + Send;
    /// [`Store::audit`]'s attempts of `items` (ascending; up to [`AUDIT_ITEMS`] of them), in
    /// the same order, with `record_ids` left empty (see [`Store::audit_record_ids`]).
    fn audit_page(
        &self,
        run_id: &str,
        items: &[i64],
    ) -> impl Future<Output = Result<Vec<AuditRow>>> + Send;
    /// The run's record ids linked to each item, sorted, without repeats.
    fn audit_record_ids(
        &self,
        run_id: &str,
    ) -> impl Future<Output = Result<std::collections::HashMap<i64, Vec<String>>>> + Send;
    fn quarantine(&self, run_id: &str) -> impl Future<Output = Result<Vec<QuarantineRow>>> + Send;
    /// The most common reasons the run quarantined lines: (field, a reason, how many).
    fn quarantine_summary(
        &self,
        run_id: &str,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<(Option<String>, String, u64)>>> + Send;
    fn anomaly_count(&self, run_id: &str) -> impl Future<Output = Result<u64>> + Send;
    /// The run's ledger by stage, model and pricing mode (ordered by them).
    fn run_costs(&self, run_id: &str) -> impl Future<Output = Result<Vec<CostGroup>>> + Send;
    /// The run's attempts by stage and verdict (ordered by them).
    fn run_outcomes(&self, run_id: &str) -> impl Future<Output = Result<Vec<OutcomeGroup>>> + Send;
}

/// Where a pipeline keeps its state by default: `.nightshift/state.db` beside the file.
pub fn default_db_path(pipeline_dir: &Path) -> std::path::PathBuf {
    pipeline_dir.join(".nightshift").join("state.db")
}
