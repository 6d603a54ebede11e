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
//! ingested`.

pub mod db;
pub mod lock;
pub mod postgres;
pub mod sql;
pub mod sqlite;

use std::future::Future;
use std::path::Path;

use crate::cost::{PricingMode, Usage, Usd};
use crate::request::{PreparedRecord, RequestShape};
use crate::source::Quarantined;

pub use db::Engine;
pub use lock::{LockError, RunLock};
pub use sql::SqlStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Another worker took the batch over (this one's lease ran out): nothing was written.
    #[error("the lease on batch {batch_id} was taken over by another worker")]
    LeaseLost { batch_id: String },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

pub use crate::util::time::now_ms;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStatus {
    Running,
    Completed,
    /// Over, with items that failed for good.
    Failed,
    /// Stopped by its spending cap with items left to send.
    Budget,
    Interrupted,
    Detached,
    Error,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Budget => "budget",
            RunStatus::Interrupted => "interrupted",
            RunStatus::Detached => "detached",
            RunStatus::Error => "error",
        }
    }
}

#[derive(Clone, Debug)]
pub struct NewRun {
    pub id: String,
    pub pipeline: String,
    pub stage: String,
    pub pipeline_file: String,
    pub source_path: String,
    pub output_path: String,
    pub provider: String,
    pub model: String,
    pub pricing_mode: PricingMode,
    pub max_attempts: u32,
    pub host: String,
    pub pid: u32,
    pub budget: Option<Usd>,
    pub max_item: Option<Usd>,
    /// The process (worker row) that runs it, whose heartbeat says it is alive.
    pub worker_id: Option<String>,
}

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct RunRow {
    pub id: String,
    pub pipeline: String,
    pub stage: String,
    pub status: String,
    pub pipeline_file: String,
    pub source_path: String,
    pub output_path: String,
    pub provider: String,
    pub model: String,
    pub pricing_mode: String,
    pub max_attempts: i64,
    pub records_read: i64,
    pub records_quarantined: i64,
    pub host: String,
    pub pid: i64,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub exit_code: Option<i64>,
    pub message: Option<String>,
    pub budget_pico: Option<i64>,
    pub max_item_pico: Option<i64>,
    pub plan_json: Option<String>,
    pub worker_id: Option<String>,
    /// Valid records the run read (`None` until its ingest finished).
    pub records_valid: Option<i64>,
    /// The run's figures once nothing of it is open any more ([`RunFigures::to_json`]).
    pub figures_json: Option<String>,
}

/// Where ingested records go: the run, the pipeline stage, the request shape, the source.
#[derive(Clone, Copy, Debug)]
pub struct IngestTarget<'a> {
    pub run_id: &'a str,
    pub pipeline: &'a str,
    pub stage: &'a str,
    pub shape_id: i64,
    pub source: &'a str,
}

/// What one ingest chunk did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngestStats {
    pub records: u64,
    pub new_items: u64,
    pub quarantined: u64,
}

#[derive(Clone, Debug)]
pub struct PlanRequest<'a> {
    pub run_id: &'a str,
    pub pipeline: &'a str,
    pub stage: &'a str,
    pub provider: &'a str,
    pub model: &'a str,
    pub pricing_mode: PricingMode,
    /// `batch` or `online`.
    pub mode: &'a str,
    pub max_requests: usize,
    pub max_bytes: u64,
    /// Bytes a JSONL line adds around the body (envelope and custom_id), an upper bound.
    pub line_overhead: u64,
    /// The spending limits this batch must fit in, if any.
    pub budget: Option<BudgetCheck>,
    /// Only items that failed an earlier attempt (`failed`), no first attempts: a run whose
    /// cap has refused an item finishes what it sent and starts nothing new.
    pub only_retries: bool,
    /// The worker that plans the batch holds its lease for `lease_ms` from now.
    pub owner: &'a str,
    pub lease_ms: i64,
}

/// What a planned batch may cost at worst: every request at its counted input tokens plus
/// `max_output_tokens`, at the prices that apply.
#[derive(Clone, Copy, Debug)]
pub struct BudgetCheck {
    /// Pico-dollars still free under the cap (cap − spent − reserved).
    pub available: Usd,
    pub input_price: crate::cost::TokenPrice,
    pub output_price: crate::cost::TokenPrice,
    pub max_output_tokens: u64,
    /// Items whose own worst case is above this many input tokens are left pending.
    pub max_item_input_tokens: Option<u64>,
}

impl BudgetCheck {
    pub fn worst_case(&self, input_tokens: u64) -> Usd {
        self.input_price.cost(input_tokens) + self.output_price.cost(self.max_output_tokens)
    }
}

/// What planning found.
#[derive(Clone, Debug)]
pub enum PlanOutcome {
    Planned {
        batch: Box<BatchRow>,
        /// The budget stopped the batch short: the next plannable item did not fit.
        cut_by_budget: bool,
    },
    /// Nothing plannable (within the per-item cap).
    Nothing,
    /// Plannable items exist, but not even one fits in what is left of the budget.
    OverBudget { next_worst_case: Usd },
}

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct BatchRow {
    pub id: String,
    pub run_id: String,
    pub pipeline: String,
    pub stage: String,
    pub provider: String,
    pub model: String,
    pub pricing_mode: String,
    pub mode: String,
    pub state: String,
    pub request_count: i64,
    pub reserved_pico: i64,
    pub file_path: Option<String>,
    pub file_sha256: Option<String>,
    pub file_bytes: Option<i64>,
    pub input_file_id: Option<String>,
    pub provider_batch_id: Option<String>,
    pub provider_status: Option<String>,
    pub end_state: Option<String>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub provider_usage: Option<String>,
    pub error: Option<String>,
    pub created_at: i64,
    pub submitted_at: Option<i64>,
    pub ended_at: Option<i64>,
    pub ingested_at: Option<i64>,
    /// The worker holding the batch, and the fencing token of its lease: every write to the
    /// batch names the token it was claimed under and is refused once another claim moved it.
    pub lease_owner: Option<String>,
    pub lease_token: i64,
    pub lease_expires_at: Option<i64>,
    /// When the batch entered `creating`: the reconcile grace counts from here, whichever
    /// process finds it there later.
    pub creating_at: Option<i64>,
    /// The run whose process ingested the batch (`None`: not yet, or a worker did).
    pub ingested_by_run: Option<String>,
}

impl BatchRow {
    pub fn pricing_mode(&self) -> PricingMode {
        PricingMode::parse(&self.pricing_mode).unwrap_or(PricingMode::Batch)
    }
}

/// A change to a batch row: the new state and whichever fields the step learned.
#[derive(Clone, Debug, Default)]
pub struct BatchUpdate {
    pub state: Option<&'static str>,
    pub file_path: Option<String>,
    pub file_sha256: Option<String>,
    pub file_bytes: Option<i64>,
    pub input_file_id: Option<String>,
    pub provider_batch_id: Option<String>,
    pub provider_status: Option<String>,
    pub end_state: Option<&'static str>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub provider_usage: Option<String>,
    pub error: Option<String>,
    pub submitted_at: Option<i64>,
    pub ended_at: Option<i64>,
    pub ingested_at: Option<i64>,
    pub creating_at: Option<i64>,
}

/// One line of a batch input file, as stored.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct BatchLine {
    pub attempt_id: i64,
    pub custom_id: String,
    pub shape_id: i64,
    pub user_json: String,
}

/// An attempt to send online, with what the request is made of.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct OnlineLine {
    pub attempt_id: i64,
    pub item_id: i64,
    pub attempt_no: i64,
    pub custom_id: String,
    pub state: String,
    pub shape_id: i64,
    pub user_json: String,
    pub input_tokens: i64,
}

/// An attempt of a batch, as the result applier needs it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct AttemptRef {
    pub id: i64,
    pub item_id: i64,
    pub attempt_no: i64,
    pub custom_id: String,
    pub state: String,
}

/// The judged result of one attempt, ready to apply.
#[derive(Clone, Debug)]
pub struct AttemptOutcome {
    pub attempt_id: i64,
    pub item_id: i64,
    pub attempt_no: i64,
    pub custom_id: String,
    pub succeeded: bool,
    /// `ok`, `invalid_json`, `schema_invalid`, `truncated`, `provider_error`, `expired`, …
    pub verdict: String,
    pub error: Option<String>,
    pub finish_reason: Option<String>,
    pub model: Option<String>,
    /// The validated answer (compact JSON) when `succeeded`.
    pub result: Option<String>,
    pub usage: Usage,
    pub cost: Usd,
    pub standard_cost: Usd,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub applied: u64,
    pub already_applied: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub exhausted: u64,
}

impl std::ops::AddAssign for ApplyStats {
    fn add_assign(&mut self, s: ApplyStats) {
        self.applied += s.applied;
        self.already_applied += s.already_applied;
        self.succeeded += s.succeeded;
        self.failed += s.failed;
        self.exhausted += s.exhausted;
    }
}

/// One source record of a run with its item's outcome, for the output file.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct RecordResult {
    pub line: i64,
    pub record_id: String,
    pub item_id: i64,
    pub state: String,
    pub attempts: i64,
    pub result: Option<String>,
    pub last_error: Option<String>,
}

/// Totals of a set of ledger rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LedgerTotals {
    pub rows: u64,
    pub usage: Usage,
    pub cost: Usd,
    pub standard_cost: Usd,
}

/// The figures of one run. A batch's cost belongs to the run that planned it (whichever
/// process later sends or collects it), so the runs' costs add up to the ledger and no
/// attempt counts in two runs.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RunFigures {
    pub records_valid: u64,
    pub unique_items: u64,
    /// Items of this run that had succeeded before it started (never sent again).
    pub reused: u64,
    pub succeeded: u64,
    pub exhausted: u64,
    /// Items neither succeeded nor exhausted (the run stopped early).
    pub unfinished: u64,
    /// Records of this run whose item succeeded in one of this run's batches.
    pub processed_records: u64,
    /// Records of this run whose item has succeeded, in this run or before.
    pub records_done: u64,
    /// Attempts in this run's batches.
    pub attempts: u64,
    /// Distinct items that this run's batches carried.
    pub items_attempted: u64,
    /// Attempts of this run that came back with an answer (output tokens billed).
    pub answered: u64,
    pub batches: u64,
    /// Requests of this run's batches that reached the provider (created or adopted there,
    /// or dispatched online).
    pub requests_sent: u64,
    pub ledger: LedgerTotals,
    pub models: Vec<String>,
    /// Batches of earlier runs that this run's process collected (their cost stays theirs).
    pub collected: Collected,
}

/// What a run collected for earlier runs: their batches it ingested.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Collected {
    pub batches: u64,
    /// Attempts of those batches (result lines applied or failed as missing).
    pub results: u64,
    pub cost: Usd,
    /// The runs they belong to.
    pub runs: Vec<String>,
}

impl RunFigures {
    /// The frozen form stored on the run row once nothing of the run is open any more.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }
}

/// One attempt in the per-item audit.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct AuditRow {
    pub run_id: String,
    pub item_id: i64,
    pub dedupe_key: Vec<u8>,
    pub item_state: String,
    pub record_ids: String,
    pub attempt_no: i64,
    pub custom_id: String,
    pub batch_id: String,
    pub provider_batch_id: Option<String>,
    pub attempt_state: String,
    pub verdict: Option<String>,
    pub error: Option<String>,
    pub model: Option<String>,
    pub input_tokens: Option<i64>,
    pub cached_input_tokens: Option<i64>,
    pub cache_write_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub reasoning_tokens: Option<i64>,
    pub cost_pico: Option<i64>,
}

/// The provider's own bill for one batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderBill {
    pub provider_batch_id: String,
    pub requests: u64,
    pub usage: Usage,
    pub cost: Usd,
    /// Where the figures came from (`simulator`).
    pub source: String,
}

/// What a worker asks for when it claims batches.
#[derive(Clone, Copy, Debug)]
pub struct Claim<'a> {
    /// Only this pipeline's batches (all when `None`).
    pub pipeline: Option<&'a str>,
    /// Only this batch (all when `None`).
    pub batch_id: Option<&'a str>,
    pub owner: &'a str,
    pub lease_ms: i64,
    /// Take batches even from live holders (`cancel`): their writes are fenced out.
    pub force: bool,
}

/// A process working on the store (`run` or `worker`), as its heartbeat records it.
#[derive(Clone, Debug)]
pub struct WorkerInfo {
    pub id: String,
    pub host: String,
    pub pid: u32,
    /// `run` or `worker`.
    pub role: &'static str,
    /// The pipelines it works on, comma-separated.
    pub pipelines: String,
}

/// A worker as `status` shows it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct WorkerRow {
    pub id: String,
    pub host: String,
    pub pid: i64,
    pub role: String,
    pub pipelines: String,
    pub started_at: i64,
    pub heartbeat_at: i64,
    pub stopped_at: Option<i64>,
    /// Open batches it holds under a lease that has not run out.
    pub held: i64,
}

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct QuarantineRow {
    pub source: String,
    pub line: i64,
    pub field: Option<String>,
    pub reason: String,
}

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
    ) -> impl Future<Output = Result<crate::plan::History>> + Send;
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
    /// Prompt tokens of every distinct item of the run's records, done or not (the job).
    fn run_item_tokens(&self, run_id: &str) -> impl Future<Output = Result<Vec<u64>>> + Send;
    /// Prompt tokens of every item waiting to be sent.
    fn plannable_tokens(
        &self,
        pipeline: &str,
        stage: &str,
    ) -> impl Future<Output = Result<Vec<u64>>> + Send;
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
        from: &str,
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
        verdict: &str,
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
    fn audit(&self, run_id: &str) -> impl Future<Output = Result<Vec<AuditRow>>> + Send;
    fn quarantine(&self, run_id: &str) -> impl Future<Output = Result<Vec<QuarantineRow>>> + Send;
    /// The most common reasons the run quarantined lines: (field, a reason, how many).
    fn quarantine_summary(
        &self,
        run_id: &str,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<(Option<String>, String, u64)>>> + Send;
    fn anomaly_count(&self, run_id: &str) -> impl Future<Output = Result<u64>> + Send;
}

/// Where a pipeline keeps its state by default: `.nightshift/state.db` beside the file.
pub fn default_db_path(pipeline_dir: &Path) -> std::path::PathBuf {
    pipeline_dir.join(".nightshift").join("state.db")
}
