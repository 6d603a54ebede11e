//! The values the store reads and writes: rows as the SQL returns them ([`RunRow`],
//! [`BatchRow`], [`AuditRow`], …), the requests and changes handed to it ([`NewRun`],
//! [`PlanRequest`], [`BatchUpdate`], …) and what its operations report ([`ApplyStats`],
//! [`RunFigures`], …). Re-exported from [`crate::store`]; the operations are the
//! [`Store`](super::Store) trait's.
//!
//! Stored states and modes are typed ([`super::state`]): the derived `FromRow`s decode them
//! from their text ([`super::db`]), so a value the enums do not know is a decode error at
//! the SQL boundary.

use crate::cost::{PricingMode, Usage, Usd};

use super::state::{
    AttemptState, AttemptVerdict, BatchMode, BatchState, EndState, ItemState, RunStatus,
};

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
    pub status: RunStatus,
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
    /// A multi-stage pipeline: keep each record's fields and link it to every item.
    pub links: bool,
}

/// What a pipeline's work is made of, for [`Store::settled`](super::Store::settled): its
/// stages, each later stage with the stages it needs, and each `on_fail = "regenerate"`
/// review as (review stage, reviewed stage).
#[derive(Clone, Copy, Debug)]
pub struct PipelineWork<'a> {
    pub pipeline: &'a str,
    pub stages: &'a [&'a str],
    pub later: &'a [LaterStage<'a>],
    pub regenerate: &'a [(&'a str, &'a str)],
}

/// A stage after the first and the stages it needs.
#[derive(Clone, Copy, Debug)]
pub struct LaterStage<'a> {
    pub stage: &'a str,
    pub needs: &'a [String],
}

/// A record whose needed stages have all succeeded (or been skipped): ready for the next.
#[derive(Clone, Debug)]
pub struct ReadyRecord {
    pub line: i64,
    pub record_id: String,
    /// The record's fields (JSON).
    pub data: String,
    /// The record's links to the needed stages' items, by stage then chunk.
    pub inputs: Vec<LinkRow>,
}

/// A run's items of one stage.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StageItems {
    /// Links of the run's records to the stage's items (each record's chunks; an item
    /// shared by records once per record).
    pub links: u64,
    /// Prompt tokens of the distinct items.
    pub tokens: TokenCounts,
    /// Distinct items that succeeded.
    pub succeeded: u64,
}

/// A one-stage run's job: what its plan starts from ([`super::Store::run_job`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunJob {
    /// The run's valid records.
    pub records: u64,
    /// Records whose item has succeeded (in an earlier run: a plan is made before sending).
    pub records_done: u64,
    /// Distinct items of the records.
    pub items: u64,
    /// Of those, the items that have succeeded.
    pub items_done: u64,
    /// The items' prompt tokens, done or not.
    pub tokens: TokenCounts,
}

/// How many items have each prompt-token count: the distribution a worksheet's mean, p95,
/// max and totals come from, read as a few hundred grouped rows however many items there are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenCounts {
    /// (prompt tokens, items with that count), ascending by tokens, each count above zero.
    groups: Vec<(u64, u64)>,
}

impl TokenCounts {
    /// From (tokens, items) pairs in any order; equal token counts are merged.
    pub fn from_groups(groups: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut groups: Vec<(u64, u64)> = groups.into_iter().filter(|g| g.1 > 0).collect();
        groups.sort_unstable();
        groups.dedup_by(|b, a| {
            if a.0 == b.0 {
                a.1 += b.1;
                true
            } else {
                false
            }
        });
        TokenCounts { groups }
    }

    /// Items counted.
    pub fn len(&self) -> u64 {
        self.groups.iter().map(|g| g.1).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Prompt tokens of all the items together.
    pub fn total(&self) -> u64 {
        self.groups.iter().map(|(t, n)| t * n).sum()
    }

    pub fn max(&self) -> u64 {
        self.groups.last().map(|g| g.0).unwrap_or(0)
    }

    /// The nearest-rank percentile `pct` (0–100); 0 with no items.
    pub fn percentile(&self, pct: u64) -> u64 {
        let n = self.len();
        if n == 0 {
            return 0;
        }
        let rank = (n * pct).div_ceil(100).max(1);
        let mut seen = 0;
        for (t, k) in &self.groups {
            seen += k;
            if seen >= rank {
                return *t;
            }
        }
        self.max()
    }
}

impl FromIterator<u64> for TokenCounts {
    fn from_iter<I: IntoIterator<Item = u64>>(iter: I) -> Self {
        Self::from_groups(iter.into_iter().map(|t| (t, 1)))
    }
}

/// One link of a record to an item (or to none: skipped, or failed before an item).
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct LinkRow {
    pub line: i64,
    pub stage: String,
    pub chunk: i64,
    pub item_id: Option<i64>,
    pub state: Option<ItemState>,
    pub attempts: Option<i64>,
    pub result: Option<String>,
    pub last_error: Option<String>,
    /// Why the record has no item at this stage when that is a failure.
    pub error: Option<String>,
    /// What the item's attempts cost, in whichever run (as `attempts` counts them).
    pub cost_pico: i64,
    /// Records of the run linked to the same item (1: not shared).
    pub sharers: i64,
}

impl LinkRow {
    /// The links of record `line` among `links` in line order (as the store returns them).
    pub fn of_line(links: &[LinkRow], line: i64) -> &[LinkRow] {
        let start = links.partition_point(|l| l.line < line);
        let len = links[start..].partition_point(|l| l.line == line);
        &links[start..start + len]
    }
}

/// What a record gets at a later stage.
#[derive(Clone, Debug)]
pub enum StageLink {
    /// Its items (one, or one per chunk).
    Items {
        items: Vec<crate::request::PreparedItem>,
    },
    /// The stage does not run for the record (not sampled, `when` false, a needed stage
    /// skipped).
    Skipped,
    /// The stage cannot run for the record (its template failed, nothing to split).
    Failed(String),
}

/// The record a [`StageLink`] is for.
#[derive(Clone, Debug)]
pub struct NewLinks {
    pub line: i64,
    pub link: StageLink,
    /// The items of the needed stages the link was decided from (rendered, sampled, or
    /// judged by `when`): the link is stored only if they are all still succeeded.
    pub parents: Vec<i64>,
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
    pub mode: BatchMode,
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
    pub mode: BatchMode,
    pub state: BatchState,
    pub request_count: i64,
    pub reserved_pico: i64,
    pub file_path: Option<String>,
    pub file_sha256: Option<String>,
    pub file_bytes: Option<i64>,
    pub input_file_id: Option<String>,
    pub provider_batch_id: Option<String>,
    pub provider_status: Option<String>,
    pub end_state: Option<EndState>,
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
    pub state: Option<BatchState>,
    pub file_path: Option<String>,
    pub file_sha256: Option<String>,
    pub file_bytes: Option<i64>,
    pub input_file_id: Option<String>,
    pub provider_batch_id: Option<String>,
    pub provider_status: Option<String>,
    pub end_state: Option<EndState>,
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
    pub state: AttemptState,
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
    pub state: AttemptState,
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
    pub verdict: AttemptVerdict,
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
    pub state: ItemState,
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
    /// Multi-stage: records of this run that failed (an item failed for good, or a stage
    /// could not be rendered for them).
    pub records_failed: u64,
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
    /// A multi-stage pipeline's figures per stage, in the order of its stages (empty for a
    /// one-stage pipeline).
    pub stages: Vec<StageFigures>,
}

/// One stage's part of a run.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct StageFigures {
    pub stage: String,
    /// Distinct items of the stage linked to the run's records.
    pub items: u64,
    /// Links of the run's records to items of the stage (an item shared by records, or by
    /// chunks, counts once per link).
    pub links: u64,
    /// Records the stage runs for (chunk stages: records, not chunks).
    pub records: u64,
    /// Records the stage was skipped for (not in its sample, `when` false).
    pub skipped: u64,
    /// Records that failed at this stage (an item exhausted, or no item could be rendered).
    pub failed_records: u64,
    pub succeeded: u64,
    pub exhausted: u64,
    /// Attempts of the stage in this run's batches, and the distinct items they carried.
    pub attempts: u64,
    pub items_attempted: u64,
    /// Attempts of the stage in this run's batches that came back with an answer (output
    /// tokens billed).
    pub answered: u64,
    pub usage: Usage,
    pub cost: Usd,
    pub standard_cost: Usd,
    /// Models and pricing modes the stage's batches used.
    pub models: Vec<String>,
    pub pricing_modes: Vec<String>,
    /// A reviewing stage (one whose schema has a boolean `pass`): answers that passed and
    /// that failed, among the run's records.
    pub review_pass: u64,
    pub review_fail: u64,
}

impl StageFigures {
    pub fn retries(&self) -> u64 {
        self.attempts.saturating_sub(self.items_attempted)
    }
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

/// What one (stage, model, pricing mode) of a run's ledger came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CostGroup {
    pub stage: String,
    pub model: String,
    pub pricing_mode: String,
    pub totals: LedgerTotals,
}

/// How many of a stage's attempts in a run ended with one verdict (`pending` for attempts
/// not judged yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutcomeGroup {
    pub stage: String,
    pub verdict: String,
    pub attempts: u64,
}

/// One attempt in the per-item audit.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct AuditRow {
    pub run_id: String,
    pub item_id: i64,
    pub dedupe_key: Vec<u8>,
    pub item_state: ItemState,
    /// The run's records linked to the item, sorted (filled after the row is read).
    #[sqlx(skip)]
    pub record_ids: Vec<String>,
    pub stage: String,
    pub attempt_no: i64,
    pub custom_id: String,
    pub batch_id: String,
    pub provider_batch_id: Option<String>,
    pub attempt_state: AttemptState,
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

/// What earlier runs of a pipeline stage measured (the planning worksheet's history).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct History {
    /// Attempts that came back with an answer (output tokens billed).
    pub answered: u64,
    pub output_tokens: u64,
    /// Attempts and distinct items attempted, for the retry rate.
    pub attempts: u64,
    pub items_attempted: u64,
}

#[cfg(test)]
mod tests {
    use super::TokenCounts;

    #[test]
    fn token_counts_give_the_figures_of_the_list_they_count() {
        // Unsorted, with repeats: the grouped form must answer as the sorted list would.
        let list = [40u64, 7, 7, 300, 12, 12, 12, 40, 5, 99, 7, 1_000];
        let c: TokenCounts = list.iter().copied().collect();
        let mut sorted = list.to_vec();
        sorted.sort_unstable();
        assert_eq!(c.len(), list.len() as u64);
        assert_eq!(c.total(), list.iter().sum::<u64>());
        assert_eq!(c.max(), 1_000);
        for pct in [1, 25, 50, 90, 95, 100] {
            let rank = (sorted.len() as u64 * pct).div_ceil(100).max(1) as usize;
            assert_eq!(c.percentile(pct), sorted[rank - 1], "p{pct}");
        }
        // Groups as the store returns them (one row per distinct count) merge alike.
        let g = TokenCounts::from_groups([(12, 3), (7, 3), (40, 2), (5, 1), (99, 1)]);
        assert_eq!(g.len(), 10);
        assert_eq!(g.percentile(50), 12);
        assert_eq!(TokenCounts::default().percentile(95), 0);
    }
}
