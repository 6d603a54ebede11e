//! [`SqlStore`]: the one implementation of [`Store`], in the SQL that SQLite and PostgreSQL
//! share, over either engine ([`super::sqlite`] and [`super::postgres`] open them).
//!
//! Hot paths (ingest, planning, applying results) bind many rows per statement: every
//! statement is a round trip (to SQLite's worker thread, or over the network), so one row
//! per statement would cap throughput at ~15–19k rows/s. Where the engines differ the code
//! says so: PostgreSQL claims rows with `FOR UPDATE SKIP LOCKED` and honours leases held by
//! other live workers; SQLite has one writer at a time and one process per store (the run
//! lock), so every lease is its to take.
//!
//! This file holds the [`SqlStore`] type, the helpers the SQL files share (multi-row
//! `VALUES`, lease fencing, number conversions) and the [`Store`] impl, which routes each
//! operation to the file of its concern: `runs`, `ingest`, `planning`, `batches`, `leases`,
//! `online`, `results`, `reports`, `cleanup`.

mod batches;
mod cleanup;
mod ingest;
mod leases;
mod online;
mod planning;
mod reports;
mod results;
mod runs;
mod stages;

pub use ingest::SqlIngest;

use std::collections::HashSet;
use std::sync::OnceLock;

use super::db::{Db, Engine, Query, Tx, q};
use super::*;
use crate::cost::Usd;

/// Rows per multi-row statement (well under SQLite's 32,766 bound variables and
/// PostgreSQL's 65,535).
const ROWS_PER_STATEMENT: usize = 400;

/// The state store, on SQLite or PostgreSQL.
#[derive(Clone, Debug)]
pub struct SqlStore {
    pub(crate) db: Db,
    /// What the store is reached by, credentials removed (for messages).
    pub(crate) location: String,
}

impl SqlStore {
    pub fn engine(&self) -> Engine {
        self.db.engine()
    }

    /// Where the store lives (a file path, or a PostgreSQL URL without its password).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The SQLite pool, for checks and tests; `None` on PostgreSQL.
    pub fn sqlite_pool(&self) -> Option<&sqlx::SqlitePool> {
        match &self.db {
            Db::Sqlite(p) => Some(p),
            Db::Postgres(_) => None,
        }
    }

    /// The PostgreSQL pool, for checks and tests; `None` on SQLite.
    pub fn pg_pool(&self) -> Option<&sqlx::PgPool> {
        match &self.db {
            Db::Postgres(p) => Some(p),
            Db::Sqlite(_) => None,
        }
    }

    /// A single integer from a read-only query (checks, tests, reports).
    pub async fn count_where(&self, sql: &str) -> Result<i64> {
        self.db.scalar::<i64>(q(sql)).await
    }

    pub async fn close(&self) {
        self.db.close().await;
    }

    /// Engine-specific suffix of a claiming `SELECT`.
    fn skip_locked(&self) -> &'static str {
        match self.engine() {
            Engine::Postgres => " FOR UPDATE SKIP LOCKED",
            Engine::Sqlite => "",
        }
    }

    /// Checks, inside `tx`, that the batch is still held under `token`; on PostgreSQL the
    /// row stays locked until the transaction ends, so no one can take the lease meanwhile.
    async fn fence(&self, tx: &mut Tx, batch_id: &str, token: i64) -> Result<()> {
        let sql = match tx.engine() {
            Engine::Postgres => "SELECT lease_token FROM batches WHERE id = $1 FOR UPDATE",
            Engine::Sqlite => "SELECT lease_token FROM batches WHERE id = $1",
        };
        let held: Option<(i64,)> = tx.optional(q(sql).bind(batch_id)).await?;
        match held {
            Some((t,)) if t == token => Ok(()),
            _ => Err(StoreError::LeaseLost {
                batch_id: batch_id.to_string(),
            }),
        }
    }
}

/// `(?,?,…),(…)` for `rows` rows of `per_row` anonymous parameters.
///
/// Values shared by all rows are bound once, in a one-row `c` table (or CTE) placed first
/// in the text.
fn values_sql(rows: usize, per_row: usize) -> String {
    let mut row = String::with_capacity(per_row * 2 + 2);
    row.push('(');
    for c in 0..per_row {
        if c > 0 {
            row.push(',');
        }
        row.push('?');
    }
    row.push(')');
    let mut s = String::with_capacity(rows * (row.len() + 1));
    for r in 0..rows {
        if r > 0 {
            s.push(',');
        }
        s.push_str(&row);
    }
    s
}

/// SQL text for a full chunk is built once; shorter tails are built on the fly.
fn cached_sql(
    cell: &'static OnceLock<String>,
    rows: usize,
    build: impl Fn(usize) -> String,
) -> std::borrow::Cow<'static, str> {
    if rows == ROWS_PER_STATEMENT {
        std::borrow::Cow::Borrowed(cell.get_or_init(|| build(rows)).as_str())
    } else {
        std::borrow::Cow::Owned(build(rows))
    }
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

const BATCH_COLUMNS: &str = "id, run_id, pipeline, stage, provider, model, pricing_mode, mode, state, \
    request_count, reserved_pico, file_path, file_sha256, file_bytes, input_file_id, provider_batch_id, \
    provider_status, end_state, output_file_id, error_file_id, provider_usage, error, created_at, \
    submitted_at, ended_at, ingested_at, lease_owner, lease_token, lease_expires_at, creating_at, \
    ingested_by_run";

/// SQLite: the rows of `page` as one row of text, `cols` joined by the unit separator and
/// rows by the record separator. The driver hands every row, and a copy of each of its
/// values, from its database thread to ours; a read of thousands of rows was as many
/// hand-offs. Only for columns that cannot hold the separators: integers, our own ids and
/// state names, JSON (whose strings escape every control character).
///
/// The rows come in whatever order SQLite reads them: a caller that needs an order sorts
/// what it unpacks. An `ORDER BY` inside the aggregate runs SQLite's sorter over every row
/// of the page (a page of prompts or answers is megabytes), where rows that come in order
/// already cost next to nothing to sort here.
fn packed_sql(page: &str, cols: &[&str]) -> String {
    format!(
        "SELECT group_concat({}, char(30)) FROM ({page}) AS t",
        packed_fields(cols)
    )
}

/// [`packed_sql`] for a page whose columns are never NULL, each row built by one `printf`
/// rather than a chain of `||` (each of which copies the row so far): a page of links read
/// 30 % faster by the SQLite shell. A NULL column would be an empty field here, where
/// `packed_sql` drops the whole row.
fn packed_printf_sql(page: &str, cols: &[&str]) -> String {
    let format = vec!["%s"; cols.len()].join("\x1f");
    let fields: Vec<String> = cols.iter().map(|c| format!("t.{c}")).collect();
    format!(
        "SELECT group_concat(printf('{format}', {}), char(30)) FROM ({page}) AS t",
        fields.join(", ")
    )
}

/// The columns of a packed row, joined by the unit separator.
fn packed_fields(cols: &[&str]) -> String {
    let fields: Vec<String> = cols.iter().map(|c| format!("t.{c}")).collect();
    fields.join(" || char(31) || ")
}

/// The rows of a [`packed_sql`] answer, each as its `N` fields (the last takes the rest of
/// the row); a row with fewer fields is an error, not a guess.
fn unpack<const N: usize>(packed: Option<&str>) -> Result<Vec<[&str; N]>> {
    let Some(packed) = packed else {
        return Ok(Vec::new());
    };
    packed
        .split('\x1e')
        .map(|row| {
            let mut f = row.splitn(N, '\x1f');
            let mut out = [""; N];
            for slot in &mut out {
                *slot = f.next().ok_or_else(|| {
                    StoreError::Invalid("a packed page of rows is malformed".into())
                })?;
            }
            Ok(out)
        })
        .collect()
}

/// A free-text field of a packed row, which the query hex-encoded.
fn unhex(field: &str) -> Result<String> {
    hex::decode(field)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| StoreError::Invalid(format!("a packed row has {field:?} for a text")))
}

/// A field of a packed row as one of the store's names (a state, a mode).
fn named<T: std::str::FromStr<Err = UnknownValue>>(field: &str) -> Result<T> {
    field
        .parse()
        .map_err(|e: UnknownValue| StoreError::Invalid(e.to_string()))
}

/// A field of a packed row as a number.
fn int(field: &str) -> Result<i64> {
    field
        .parse()
        .map_err(|_| StoreError::Invalid(format!("a packed row has {field:?} for a number")))
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn money_i64(u: Usd) -> Result<i64> {
    u.to_pico_i64()
        .map_err(|_| StoreError::Invalid(format!("amount {u} USD does not fit the ledger")))
}

/// Each operation lives in the file of its concern; this impl only routes to it.
impl Store for SqlStore {
    async fn create_run(&self, run: &NewRun) -> Result<()> {
        runs::create_run(self, run).await
    }

    async fn set_run_counts(
        &self,
        run_id: &str,
        records_read: u64,
        quarantined: u64,
    ) -> Result<()> {
        runs::set_run_counts(self, run_id, records_read, quarantined).await
    }

    async fn finish_run(
        &self,
        run_id: &str,
        status: RunStatus,
        exit_code: i32,
        message: Option<&str>,
    ) -> Result<()> {
        runs::finish_run(self, run_id, status, exit_code, message).await
    }

    async fn run(&self, run_id: &str) -> Result<Option<RunRow>> {
        runs::run(self, run_id).await
    }

    async fn mark_stale_runs(&self, stale_before: i64) -> Result<u64> {
        runs::mark_stale_runs(self, stale_before).await
    }

    async fn last_run(&self, pipeline: Option<&str>) -> Result<Option<RunRow>> {
        runs::last_run(self, pipeline).await
    }

    async fn runs_with_prefix(&self, prefix: &str, limit: u32) -> Result<Vec<RunRow>> {
        runs::runs_with_prefix(self, prefix, limit).await
    }

    async fn recent_runs(&self, pipeline: Option<&str>, limit: u32) -> Result<Vec<RunRow>> {
        runs::recent_runs(self, pipeline, limit).await
    }

    async fn freeze_figures(&self, run_id: &str, figures_json: &str) -> Result<()> {
        runs::freeze_figures(self, run_id, figures_json).await
    }

    async fn prune_records(&self, pipeline: &str, keep: u32) -> Result<u64> {
        runs::prune_records(self, pipeline, keep).await
    }

    async fn open_batch_count(&self, run_id: &str) -> Result<u64> {
        runs::open_batch_count(self, run_id).await
    }

    async fn ensure_shape(&self, shape: &RequestShape) -> Result<i64> {
        ingest::ensure_shape(self, shape).await
    }

    async fn shape(&self, id: i64) -> Result<RequestShape> {
        ingest::shape(self, id).await
    }

    async fn ingest(
        &self,
        target: &IngestTarget<'_>,
        records: &[PreparedRecord],
        quarantined: &[Quarantined],
    ) -> Result<IngestStats> {
        let mut tx = self.begin_ingest().await?;
        let stats = tx.add(target, records, quarantined).await?;
        tx.commit().await?;
        Ok(stats)
    }

    type Ingest = ingest::SqlIngest;

    async fn begin_ingest(&self) -> Result<ingest::SqlIngest> {
        Ok(ingest::SqlIngest(self.db.begin().await?))
    }

    async fn ready_records(
        &self,
        run_id: &str,
        stage: &str,
        needs: &[String],
        after_line: i64,
        limit: u32,
    ) -> Result<Vec<ReadyRecord>> {
        stages::ready_records(self, run_id, stage, needs, after_line, limit).await
    }

    async fn ready_records_at(
        &self,
        run_id: &str,
        stage: &str,
        needs: &[String],
        lines: &[i64],
    ) -> Result<Vec<ReadyRecord>> {
        stages::ready_records_at(self, run_id, stage, needs, lines).await
    }

    async fn batch_record_lines(&self, run_id: &str, batch_id: &str) -> Result<Vec<i64>> {
        stages::batch_record_lines(self, run_id, batch_id).await
    }

    async fn add_links(&self, target: &IngestTarget<'_>, links: &[NewLinks]) -> Result<u64> {
        stages::add_links(self, target, links).await
    }

    async fn links_between(
        &self,
        run_id: &str,
        first: i64,
        last: i64,
        sharers: bool,
    ) -> Result<Vec<LinkRow>> {
        stages::links_between(self, run_id, first, last, sharers).await
    }

    async fn failed_reviews(
        &self,
        run_id: &str,
        review: &str,
        reviewed: &str,
    ) -> Result<Vec<(i64, String)>> {
        stages::failed_reviews(self, run_id, review, reviewed).await
    }

    async fn regenerate(
        &self,
        run_id: &str,
        item_id: i64,
        later_stages: &[String],
        reason: &str,
    ) -> Result<bool> {
        stages::regenerate(self, run_id, item_id, later_stages, reason).await
    }

    async fn stage_done_records(&self, run_id: &str, stage: &str) -> Result<Vec<String>> {
        stages::stage_done_records(self, run_id, stage).await
    }

    async fn stage_done_count(&self, run_id: &str, stage: &str) -> Result<u64> {
        stages::stage_done_count(self, run_id, stage).await
    }

    async fn run_stage_items(&self, run_id: &str, stage: &str) -> Result<StageItems> {
        stages::run_stage_items(self, run_id, stage).await
    }

    async fn run_record_data(
        &self,
        run_id: &str,
        after_line: i64,
        limit: u32,
    ) -> Result<Vec<(i64, String, String)>> {
        stages::run_record_data(self, run_id, after_line, limit).await
    }

    async fn run_record_ids(
        &self,
        run_id: &str,
        after_line: i64,
        limit: u32,
    ) -> Result<Vec<(i64, String)>> {
        stages::run_record_ids(self, run_id, after_line, limit).await
    }

    async fn settled(&self, run_id: &str, work: &PipelineWork<'_>) -> Result<bool> {
        stages::settled(self, run_id, work).await
    }

    async fn plannable_count(&self, pipeline: &str, stage: &str) -> Result<u64> {
        planning::plannable_count(self, pipeline, stage).await
    }

    async fn revive_exhausted(
        &self,
        pipeline: &str,
        stage: &str,
        max_attempts: u32,
    ) -> Result<u64> {
        planning::revive_exhausted(self, pipeline, stage, max_attempts).await
    }

    async fn plan_batch(&self, req: &PlanRequest<'_>) -> Result<PlanOutcome> {
        planning::plan_batch(self, req).await
    }

    async fn run_commitment(&self, run_id: &str) -> Result<Usd> {
        planning::run_commitment(self, run_id).await
    }

    async fn plannable_over(
        &self,
        pipeline: &str,
        stage: &str,
        max_input_tokens: u64,
    ) -> Result<u64> {
        planning::plannable_over(self, pipeline, stage, max_input_tokens).await
    }

    async fn history(&self, pipeline: &str, stage: &str) -> Result<crate::store::History> {
        planning::history(self, pipeline, stage).await
    }

    async fn succeeded_among(
        &self,
        pipeline: &str,
        stage: &str,
        keys: &[[u8; 32]],
    ) -> Result<Vec<[u8; 32]>> {
        planning::succeeded_among(self, pipeline, stage, keys).await
    }

    async fn plannable_totals(&self, pipeline: &str, stage: &str) -> Result<(u64, u64)> {
        planning::plannable_totals(self, pipeline, stage).await
    }

    async fn run_job(&self, run_id: &str) -> Result<RunJob> {
        planning::run_job(self, run_id).await
    }

    async fn plannable_tokens(&self, pipeline: &str, stage: &str) -> Result<TokenCounts> {
        planning::plannable_tokens(self, pipeline, stage).await
    }

    async fn record_provider_bill(&self, b: &ProviderBill) -> Result<()> {
        results::record_provider_bill(self, b).await
    }

    async fn provider_bill(&self, provider_batch_id: &str) -> Result<Option<ProviderBill>> {
        results::provider_bill(self, provider_batch_id).await
    }

    async fn set_run_plan(&self, run_id: &str, plan_json: &str) -> Result<()> {
        runs::set_run_plan(self, run_id, plan_json).await
    }

    async fn batch_lines(
        &self,
        batch_id: &str,
        after_attempt_id: i64,
        limit: u32,
    ) -> Result<Vec<BatchLine>> {
        batches::batch_lines(self, batch_id, after_attempt_id, limit).await
    }

    async fn batch(&self, id: &str) -> Result<Option<BatchRow>> {
        batches::batch(self, id).await
    }

    async fn open_batches(&self, pipeline: Option<&str>) -> Result<Vec<BatchRow>> {
        batches::open_batches(self, pipeline).await
    }

    async fn claim_batches(&self, claim: &Claim<'_>) -> Result<Vec<BatchRow>> {
        leases::claim_batches(self, claim).await
    }

    async fn heartbeat(&self, worker: &WorkerInfo, lease_ms: i64) -> Result<u64> {
        leases::heartbeat(self, worker, lease_ms).await
    }

    async fn release_leases(&self, worker_id: &str, stopped: bool) -> Result<u64> {
        leases::release_leases(self, worker_id, stopped).await
    }

    async fn workers(&self, seen_since: i64) -> Result<Vec<WorkerRow>> {
        leases::workers(self, seen_since).await
    }

    async fn plannable_retries(&self, pipeline: &str, stage: &str) -> Result<u64> {
        planning::plannable_retries(self, pipeline, stage).await
    }

    async fn run_batches(&self, run_id: &str) -> Result<Vec<BatchRow>> {
        batches::run_batches(self, run_id).await
    }

    async fn cleanup_candidates(
        &self,
        pipeline: &str,
        ingested_before: i64,
    ) -> Result<Vec<BatchRow>> {
        cleanup::cleanup_candidates(self, pipeline, ingested_before).await
    }

    async fn cleaned_targets(&self, batch_id: &str) -> Result<Vec<(String, String)>> {
        cleanup::cleaned_targets(self, batch_id).await
    }

    async fn record_cleaned(&self, batch_id: &str, kind: &str, target: &str) -> Result<()> {
        cleanup::record_cleaned(self, batch_id, kind, target).await
    }

    async fn mark_cleaned(&self, batch_id: &str) -> Result<()> {
        cleanup::mark_cleaned(self, batch_id).await
    }

    async fn online_page(&self, batch_id: &str, limit: u32) -> Result<Vec<OnlineLine>> {
        online::online_page(self, batch_id, limit).await
    }

    async fn mark_dispatched(&self, batch: &BatchRow, attempt_ids: &[i64]) -> Result<()> {
        online::mark_dispatched(self, batch, attempt_ids).await
    }

    async fn lose_dispatched(&self, batch: &BatchRow, max_attempts: u32) -> Result<ApplyStats> {
        online::lose_dispatched(self, batch, max_attempts).await
    }

    async fn known_provider_ids(&self, provider: &str) -> Result<HashSet<String>> {
        batches::known_provider_ids(self, provider).await
    }

    async fn update_batch(&self, b: &BatchRow, from: BatchState, u: &BatchUpdate) -> Result<bool> {
        batches::update_batch(self, b, from, u).await
    }

    async fn batch_attempts(&self, batch_id: &str) -> Result<Vec<AttemptRef>> {
        results::batch_attempts(self, batch_id).await
    }

    async fn apply_results(
        &self,
        batch: &BatchRow,
        outcomes: &[AttemptOutcome],
        max_attempts: u32,
    ) -> Result<ApplyStats> {
        results::apply_results(self, batch, outcomes, max_attempts).await
    }

    async fn return_unsent(&self, batch: &BatchRow, why: &str) -> Result<u64> {
        results::return_unsent(self, batch, why).await
    }

    async fn finish_ingest(
        &self,
        batch: &BatchRow,
        verdict: AttemptVerdict,
        error: &str,
        max_attempts: u32,
        collector: Option<&str>,
    ) -> Result<ApplyStats> {
        results::finish_ingest(self, batch, verdict, error, max_attempts, collector).await
    }

    async fn record_anomaly(
        &self,
        run_id: Option<&str>,
        batch_id: Option<&str>,
        kind: &str,
        custom_id: Option<&str>,
        detail: &str,
    ) -> Result<()> {
        results::record_anomaly(self, run_id, batch_id, kind, custom_id, detail).await
    }

    async fn anomalies_of_kind(&self, kind: &str) -> Result<u64> {
        results::anomalies_of_kind(self, kind).await
    }

    async fn run_records(
        &self,
        run_id: &str,
        after_line: i64,
        limit: u32,
    ) -> Result<Vec<RecordResult>> {
        reports::run_records(self, run_id, after_line, limit).await
    }

    async fn run_figures(&self, run_id: &str) -> Result<RunFigures> {
        reports::run_figures(self, run_id).await
    }

    async fn ledger_totals_for_batch(&self, batch_id: &str) -> Result<LedgerTotals> {
        reports::ledger_totals_for_batch(self, batch_id).await
    }

    async fn run_costs(&self, run_id: &str) -> Result<Vec<CostGroup>> {
        reports::run_costs(self, run_id).await
    }

    async fn run_outcomes(&self, run_id: &str) -> Result<Vec<OutcomeGroup>> {
        reports::run_outcomes(self, run_id).await
    }

    async fn audit(&self, run_id: &str) -> Result<Vec<AuditRow>> {
        reports::audit(self, run_id).await
    }

    async fn audit_items(&self, run_id: &str) -> Result<Vec<i64>> {
        reports::audit_items(self, run_id).await
    }

    async fn audit_page(&self, run_id: &str, items: &[i64]) -> Result<Vec<AuditRow>> {
        reports::audit_page(self, run_id, items).await
    }

    async fn audit_record_ids(
        &self,
        run_id: &str,
    ) -> Result<std::collections::HashMap<i64, Vec<String>>> {
        reports::audit_record_ids(self, run_id).await
    }

    async fn quarantine(&self, run_id: &str) -> Result<Vec<QuarantineRow>> {
        reports::quarantine(self, run_id).await
    }

    async fn quarantine_summary(
        &self,
        run_id: &str,
        limit: u32,
    ) -> Result<Vec<(Option<String>, String, u64)>> {
        reports::quarantine_summary(self, run_id, limit).await
    }

    async fn anomaly_count(&self, run_id: &str) -> Result<u64> {
        reports::anomaly_count(self, run_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_clause_uses_anonymous_parameters() {
        assert_eq!(values_sql(2, 2), "(?,?),(?,?)");
        assert_eq!(values_sql(1, 3), "(?,?,?)");
    }
}
