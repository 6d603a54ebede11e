//! [`SqlStore`]: the one implementation of [`Store`], in the SQL that SQLite and PostgreSQL
//! share, over either engine ([`super::sqlite`] and [`super::postgres`] open them).
//!
//! Hot paths (ingest, planning, applying results) bind many rows per statement: every
//! statement is a round trip (to SQLite's worker thread, or over the network), so one row
//! per statement would cap throughput at ~15–19k rows/s. Where the engines differ the code
//! says so: PostgreSQL claims rows with `FOR UPDATE SKIP LOCKED` and honours leases held by
//! other live workers; SQLite has one writer at a time and one process per store (the run
//! lock), so every lease is its to take.

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

/// Binds: pipeline, stage, shape_id, run_id, now; then per row key, user_json, body_bytes,
/// input_tokens.
fn insert_items_sql(rows: usize) -> String {
    format!(
        "INSERT INTO items (pipeline, stage, shape_id, first_run_id, created_at, updated_at, state, attempts, \
         dedupe_key, user_json, body_bytes, input_tokens) \
         SELECT c.p, c.s, c.sh, c.r, c.t, c.t, 'pending', 0, v.column1, v.column2, v.column3, v.column4 \
         FROM (SELECT ? AS p, ? AS s, ? AS sh, ? AS r, ? AS t) AS c, (VALUES {}) AS v \
         WHERE true ON CONFLICT (pipeline, stage, dedupe_key) DO NOTHING",
        values_sql(rows, 4)
    )
}

/// Binds: run_id, pipeline, stage; then per row line, record_id, key.
///
/// The item is looked up per row by a scalar subquery: written as a join, SQLite's planner
/// may scan every item of the pipeline for each statement.
fn insert_records_sql(rows: usize) -> String {
    format!(
        "WITH c(r, p, s) AS (SELECT ?, ?, ?) \
         INSERT INTO records (run_id, line, record_id, item_id) \
         SELECT (SELECT r FROM c), v.column1, v.column2, \
           (SELECT i.id FROM items i, c WHERE i.pipeline = c.p AND i.stage = c.s AND i.dedupe_key = v.column3) \
         FROM (VALUES {}) AS v \
         WHERE true ON CONFLICT (run_id, line) DO NOTHING",
        values_sql(rows, 3)
    )
}

/// Binds: batch_id, run_id, pipeline, stage, pricing_mode, now; then per row custom_id,
/// attempt_id, model, input, cached input, cache write, output, reasoning, cost, standard cost.
fn insert_ledger_sql(rows: usize) -> String {
    format!(
        "INSERT INTO ledger (batch_id, run_id, pipeline, stage, pricing_mode, created_at, \
         custom_id, attempt_id, model, input_tokens, cached_input_tokens, cache_write_tokens, \
         output_tokens, reasoning_tokens, cost_pico, standard_cost_pico) \
         SELECT c.b, c.r, c.p, c.s, c.m, c.t, v.column1, v.column2, v.column3, v.column4, v.column5, \
         v.column6, v.column7, v.column8, v.column9, v.column10 \
         FROM (SELECT ? AS b, ? AS r, ? AS p, ? AS s, ? AS m, ? AS t) AS c, (VALUES {}) AS v \
         WHERE true ON CONFLICT (attempt_id) DO NOTHING",
        values_sql(rows, 10)
    )
}

/// Binds: now; then per row attempt id, state, verdict, error, finish_reason, model.
fn update_attempts_sql(rows: usize) -> String {
    format!(
        "WITH c(t) AS (SELECT ?), v(id, state, verdict, error, finish_reason, model) AS (VALUES {}) \
         UPDATE attempts SET state = v.state, verdict = v.verdict, error = v.error, \
         finish_reason = v.finish_reason, model = v.model, completed_at = (SELECT t FROM c) \
         FROM v WHERE attempts.id = v.id AND attempts.state = 'in_flight'",
        values_sql(rows, 6)
    )
}

/// Binds: now, max_attempts; then per row item id, attempt_no, ok, result, error.
fn update_items_sql(rows: usize) -> String {
    format!(
        "WITH c(t, m) AS (SELECT ?, ?), v(item_id, attempt_no, ok, result, error) AS (VALUES {}) \
         UPDATE items SET \
           state = CASE WHEN v.ok THEN 'succeeded' WHEN v.attempt_no >= (SELECT m FROM c) THEN 'exhausted' ELSE 'failed' END, \
           result = CASE WHEN v.ok THEN v.result ELSE items.result END, \
           last_error = CASE WHEN v.ok THEN NULL ELSE v.error END, \
           updated_at = (SELECT t FROM c) \
         FROM v WHERE items.id = v.item_id AND items.state = 'in_flight' AND items.attempts = v.attempt_no \
         RETURNING items.state",
        values_sql(rows, 5)
    )
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

const BATCH_COLUMNS: &str = "id, run_id, pipeline, stage, provider, model, pricing_mode, mode, state, \
    request_count, reserved_pico, file_path, file_sha256, file_bytes, input_file_id, provider_batch_id, \
    provider_status, end_state, output_file_id, error_file_id, provider_usage, error, created_at, \
    submitted_at, ended_at, ingested_at, lease_owner, lease_token, lease_expires_at, creating_at, \
    ingested_by_run";

const RUN_COLUMNS: &str = "id, pipeline, stage, status, pipeline_file, source_path, output_path, \
    provider, model, pricing_mode, max_attempts, records_read, records_quarantined, host, pid, \
    started_at, finished_at, exit_code, message, budget_pico, max_item_pico, plan_json, worker_id, \
    records_valid, figures_json";

/// Items a failed attempt leaves behind: `exhausted` at the cap, `failed` (retried) below.
fn states_to_stats(applied: u64, states: &[(String,)]) -> ApplyStats {
    let exhausted = states.iter().filter(|(s,)| s == "exhausted").count() as u64;
    ApplyStats {
        applied,
        failed: states.len() as u64 - exhausted,
        exhausted,
        ..Default::default()
    }
}

impl Store for SqlStore {
    async fn create_run(&self, run: &NewRun) -> Result<()> {
        self.db
            .execute(
                q("INSERT INTO runs (id, pipeline, stage, status, pipeline_file, source_path, output_path, \
                   provider, model, pricing_mode, max_attempts, host, pid, started_at, budget_pico, \
                   max_item_pico, worker_id) \
                   VALUES ($1, $2, $3, 'running', $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)")
                .bind(&run.id)
                .bind(&run.pipeline)
                .bind(&run.stage)
                .bind(&run.pipeline_file)
                .bind(&run.source_path)
                .bind(&run.output_path)
                .bind(&run.provider)
                .bind(&run.model)
                .bind(run.pricing_mode.as_str())
                .bind(run.max_attempts as i64)
                .bind(&run.host)
                .bind(run.pid as i64)
                .bind(now_ms())
                .bind(run.budget.map(money_i64).transpose()?)
                .bind(run.max_item.map(money_i64).transpose()?)
                .bind(run.worker_id.as_deref()),
            )
            .await?;
        Ok(())
    }

    async fn set_run_counts(
        &self,
        run_id: &str,
        records_read: u64,
        quarantined: u64,
    ) -> Result<()> {
        self.db
            .execute(
                q("UPDATE runs SET records_read = $2, records_quarantined = $3, records_valid = $4 WHERE id = $1")
                    .bind(run_id)
                    .bind(i64_of(records_read))
                    .bind(i64_of(quarantined))
                    .bind(i64_of(records_read.saturating_sub(quarantined))),
            )
            .await?;
        Ok(())
    }

    async fn finish_run(
        &self,
        run_id: &str,
        status: RunStatus,
        exit_code: i32,
        message: Option<&str>,
    ) -> Result<()> {
        self.db
            .execute(
                q("UPDATE runs SET status = $2, exit_code = $3, message = $4, finished_at = $5 WHERE id = $1")
                    .bind(run_id)
                    .bind(status.as_str())
                    .bind(exit_code as i64)
                    .bind(message)
                    .bind(now_ms()),
            )
            .await?;
        Ok(())
    }

    async fn run(&self, run_id: &str) -> Result<Option<RunRow>> {
        self.db
            .optional(q(format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1")).bind(run_id))
            .await
    }

    async fn mark_stale_runs(&self, stale_before: i64) -> Result<u64> {
        let sql = match self.engine() {
            // Under the run lock no other process is alive.
            Engine::Sqlite => {
                "UPDATE runs SET status = 'interrupted', finished_at = COALESCE(finished_at, $1), \
                 message = COALESCE(message, 'the process ended without finishing the run') \
                 WHERE status = 'running' AND $2 IS NOT NULL"
            }
            // Shared: only runs whose process stopped sending heartbeats.
            Engine::Postgres => {
                "UPDATE runs SET status = 'interrupted', finished_at = COALESCE(finished_at, $1), \
                 message = COALESCE(message, 'the process ended without finishing the run') \
                 WHERE status = 'running' AND NOT EXISTS (SELECT 1 FROM workers w \
                   WHERE w.id = runs.worker_id AND w.stopped_at IS NULL AND w.heartbeat_at >= $2)"
            }
        };
        let n = self
            .db
            .execute(q(sql).bind(now_ms()).bind(stale_before))
            .await?;
        // Workers long gone, holding nothing, are history.
        self.db
            .execute(
                q(
                    "DELETE FROM workers WHERE heartbeat_at < $1 AND NOT EXISTS \
                   (SELECT 1 FROM batches b WHERE b.lease_owner = workers.id)",
                )
                .bind(now_ms() - 30 * 86_400_000),
            )
            .await?;
        Ok(n)
    }

    async fn last_run(&self, pipeline: Option<&str>) -> Result<Option<RunRow>> {
        self.db
            .optional(
                q(format!(
                    "SELECT {RUN_COLUMNS} FROM runs WHERE ($1 IS NULL OR pipeline = $1) \
                     ORDER BY started_at DESC, id DESC LIMIT 1"
                ))
                .bind(pipeline),
            )
            .await
    }

    async fn runs_with_prefix(&self, prefix: &str, limit: u32) -> Result<Vec<RunRow>> {
        // A prefix match without LIKE, so `_` and `%` in what the user typed match themselves.
        self.db
            .all(
                q(format!(
                    "SELECT {RUN_COLUMNS} FROM runs WHERE substr(id, 1, $1) = $2 \
                     ORDER BY started_at DESC, id DESC LIMIT $3"
                ))
                .bind(prefix.chars().count() as i64)
                .bind(prefix)
                .bind(limit as i64),
            )
            .await
    }

    async fn recent_runs(&self, pipeline: Option<&str>, limit: u32) -> Result<Vec<RunRow>> {
        self.db
            .all(
                q(format!(
                    "SELECT {RUN_COLUMNS} FROM runs WHERE ($1 IS NULL OR pipeline = $1) \
                     ORDER BY started_at DESC, id DESC LIMIT $2"
                ))
                .bind(pipeline)
                .bind(limit as i64),
            )
            .await
    }

    async fn freeze_figures(&self, run_id: &str, figures_json: &str) -> Result<()> {
        self.db
            .execute(
                q("UPDATE runs SET figures_json = $2 WHERE id = $1")
                    .bind(run_id)
                    .bind(figures_json),
            )
            .await?;
        Ok(())
    }

    async fn prune_records(&self, pipeline: &str, keep: u32) -> Result<u64> {
        // The pipeline's runs past its newest `keep`, whose figures are frozen.
        let old: Vec<(String,)> = self
            .db
            .all(
                q(
                    "SELECT id FROM runs WHERE pipeline = $1 AND figures_json IS NOT NULL \
                   AND id NOT IN (SELECT id FROM runs WHERE pipeline = $1 \
                                  ORDER BY started_at DESC, id DESC LIMIT $2)",
                )
                .bind(pipeline)
                .bind(keep as i64),
            )
            .await?;
        let mut n = 0;
        for (id,) in old {
            n += self
                .db
                .execute(q("DELETE FROM records WHERE run_id = $1").bind(&id))
                .await?;
        }
        Ok(n)
    }

    async fn open_batch_count(&self, run_id: &str) -> Result<u64> {
        Ok(count(
            self.db
                .scalar(
                    q("SELECT COUNT(*) FROM batches WHERE run_id = $1 AND state <> 'ingested'")
                        .bind(run_id),
                )
                .await?,
        ))
    }

    async fn ensure_shape(&self, shape: &RequestShape) -> Result<i64> {
        let mut tx = self.db.begin().await?;
        tx.execute(
            q("INSERT INTO shapes (sha256, prefix, suffix) VALUES ($1, $2, $3) ON CONFLICT (sha256) DO NOTHING")
                .bind(&shape.sha256[..])
                .bind(&shape.prefix)
                .bind(&shape.suffix),
        )
        .await?;
        let id: i64 = tx
            .scalar(q("SELECT id FROM shapes WHERE sha256 = $1").bind(&shape.sha256[..]))
            .await?;
        tx.commit().await?;
        Ok(id)
    }

    async fn shape(&self, id: i64) -> Result<RequestShape> {
        let (prefix, suffix): (String, String) = self
            .db
            .one(q("SELECT prefix, suffix FROM shapes WHERE id = $1").bind(id))
            .await?;
        Ok(RequestShape::new(prefix, suffix))
    }

    async fn ingest(
        &self,
        target: &IngestTarget<'_>,
        records: &[PreparedRecord],
        quarantined: &[Quarantined],
    ) -> Result<IngestStats> {
        static ITEMS: OnceLock<String> = OnceLock::new();
        static RECORDS: OnceLock<String> = OnceLock::new();
        let IngestTarget {
            run_id,
            pipeline,
            stage,
            shape_id,
            source,
        } = *target;
        let now = now_ms();
        let mut stats = IngestStats {
            records: records.len() as u64,
            quarantined: quarantined.len() as u64,
            ..Default::default()
        };
        let mut tx = self.db.begin().await?;
        for chunk in records.chunks(ROWS_PER_STATEMENT) {
            let mut items = q(cached_sql(&ITEMS, chunk.len(), insert_items_sql))
                .bind(pipeline)
                .bind(stage)
                .bind(shape_id)
                .bind(run_id)
                .bind(now);
            for r in chunk {
                items.push(&r.key[..]);
                items.push(r.user_json.as_str());
                items.push(r.body_bytes as i64);
                items.push(i64_of(r.input_tokens));
            }
            stats.new_items += tx.execute(items).await?;
            crate::failpoint!("ingest.mid_tx");

            let mut recs = q(cached_sql(&RECORDS, chunk.len(), insert_records_sql))
                .bind(run_id)
                .bind(pipeline)
                .bind(stage);
            for r in chunk {
                recs.push(r.line as i64);
                recs.push(r.record_id.as_str());
                recs.push(&r.key[..]);
            }
            tx.execute(recs).await?;
        }
        for chunk in quarantined.chunks(ROWS_PER_STATEMENT) {
            let mut qq = q(format!(
                "INSERT INTO quarantine (run_id, source, line, field, reason) \
                 SELECT c.r, c.s, v.column1, v.column2, v.column3 \
                 FROM (SELECT ? AS r, ? AS s) AS c, (VALUES {}) AS v",
                values_sql(chunk.len(), 3)
            ))
            .bind(run_id)
            .bind(source);
            for r in chunk {
                qq.push(r.line as i64);
                qq.push(r.field.as_deref());
                qq.push(r.reason.as_str());
            }
            tx.execute(qq).await?;
        }
        tx.commit().await?;
        Ok(stats)
    }

    async fn plannable_count(&self, pipeline: &str, stage: &str) -> Result<u64> {
        let n: i64 = self
            .db
            .scalar(
                q("SELECT COUNT(*) FROM items WHERE pipeline = $1 AND stage = $2 AND state IN ('pending', 'failed')")
                    .bind(pipeline)
                    .bind(stage),
            )
            .await?;
        Ok(count(n))
    }

    async fn revive_exhausted(
        &self,
        pipeline: &str,
        stage: &str,
        max_attempts: u32,
    ) -> Result<u64> {
        self.db
            .execute(
                q("UPDATE items SET state = 'failed', updated_at = $4 WHERE pipeline = $1 AND stage = $2 \
                   AND state = 'exhausted' AND attempts > 0 AND attempts < $3")
                .bind(pipeline)
                .bind(stage)
                .bind(max_attempts as i64)
                .bind(now_ms()),
            )
            .await
    }

    async fn plan_batch(&self, req: &PlanRequest<'_>) -> Result<PlanOutcome> {
        let mut tx = self.db.begin().await?;
        let max_item = req
            .budget
            .and_then(|b| b.max_item_input_tokens)
            .map(|t| t.min(i64::MAX as u64) as i64)
            .unwrap_or(i64::MAX);
        // PostgreSQL: items another worker is planning right now are skipped, not waited on.
        let candidates: Vec<(i64, i64, i64, i64)> = tx
            .all(
                q(format!(
                    "SELECT id, body_bytes, attempts, input_tokens FROM items WHERE pipeline = $1 AND stage = $2 \
                     AND state IN {} AND input_tokens <= $4 ORDER BY id LIMIT $3{}",
                    plannable_states(req),
                    self.skip_locked()
                ))
                .bind(req.pipeline)
                .bind(req.stage)
                .bind(req.max_requests as i64)
                .bind(max_item),
            )
            .await?;
        let now = now_ms();
        let mut bytes = 0u64;
        let mut reserved = Usd::ZERO;
        let mut chosen: Vec<i64> = Vec::new();
        let mut over_budget = None;
        let mut budget_cut = false;
        for (id, body, _, tokens) in &candidates {
            let line = *body as u64 + req.line_overhead + 1;
            if line > req.max_bytes {
                // This request can never fit in a batch file: it is final, not retried.
                tx.execute(
                    q("UPDATE items SET state = 'exhausted', last_error = $2, updated_at = $3 WHERE id = $1")
                        .bind(*id)
                        .bind(format!(
                            "request is {line} bytes, over the batch file limit of {} bytes (batch.max_bytes)",
                            req.max_bytes
                        ))
                        .bind(now),
                )
                .await?;
                if chosen.is_empty() {
                    continue;
                }
                break;
            }
            if bytes + line > req.max_bytes {
                break;
            }
            if let Some(b) = &req.budget {
                let worst = b.worst_case(*tokens as u64);
                if reserved + worst > b.available {
                    if chosen.is_empty() {
                        over_budget = Some(worst);
                    } else {
                        budget_cut = true;
                    }
                    break;
                }
                reserved += worst;
            }
            bytes += line;
            chosen.push(*id);
        }
        let Some(&last_id) = chosen.last() else {
            tx.commit().await?;
            return Ok(match over_budget {
                Some(next_worst_case) => PlanOutcome::OverBudget { next_worst_case },
                None => PlanOutcome::Nothing,
            });
        };
        let cut_by_budget = over_budget.is_some() || budget_cut;
        let count = chosen.len() as i64;
        let id = uuid::Uuid::now_v7();
        let batch_id = id.hyphenated().to_string();
        let prefix = format!("b{}-", id.simple());
        tx.execute(
            q("INSERT INTO batches (id, run_id, pipeline, stage, provider, model, pricing_mode, state, \
               request_count, reserved_pico, created_at, mode, lease_owner, lease_token, lease_expires_at) \
               VALUES ($1, $2, $3, $4, $5, $6, $7, 'planned', $8, $9, $10, $11, $12, 1, $13)")
            .bind(&batch_id)
            .bind(req.run_id)
            .bind(req.pipeline)
            .bind(req.stage)
            .bind(req.provider)
            .bind(req.model)
            .bind(req.pricing_mode.as_str())
            .bind(count)
            .bind(money_i64(reserved)?)
            .bind(now)
            .bind(req.mode)
            .bind(req.owner)
            .bind(now.saturating_add(req.lease_ms)),
        )
        .await?;
        let inserted = tx
            .execute(plan_filter(
                q(format!(
                    "INSERT INTO attempts (item_id, batch_id, attempt_no, custom_id, state, created_at) \
                     SELECT id, $1, attempts + 1, $2 || id || '-' || (attempts + 1), 'in_flight', $3 \
                     FROM items WHERE {} ORDER BY id",
                    plan_filter_sql(self.engine(), 4, req)
                ))
                .bind(&batch_id)
                .bind(&prefix)
                .bind(now),
                req,
                max_item,
                &chosen,
                self.engine(),
            ))
            .await?;
        crate::failpoint!("plan.mid_tx");
        if candidates
            .iter()
            .any(|(id, _, tries, _)| *id <= last_id && *tries > 0)
        {
            crate::failpoint!("retry.mid_tx");
        }
        let moved = tx
            .execute(plan_filter(
                q(format!(
                    "UPDATE items SET state = 'in_flight', attempts = attempts + 1, updated_at = $1 WHERE {}",
                    plan_filter_sql(self.engine(), 2, req)
                ))
                .bind(now),
                req,
                max_item,
                &chosen,
                self.engine(),
            ))
            .await?;
        if inserted != count as u64 || moved != count as u64 {
            return Err(StoreError::Invalid(format!(
                "planning batch {batch_id}: expected {count} items, attempted {inserted}, moved {moved}"
            )));
        }
        let row: BatchRow = tx
            .one(q(format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1")).bind(&batch_id))
            .await?;
        tx.commit().await?;
        Ok(PlanOutcome::Planned {
            batch: Box::new(row),
            cut_by_budget,
        })
    }

    async fn run_commitment(&self, run_id: &str) -> Result<Usd> {
        let pico: i64 = self
            .db
            .scalar(
                q("SELECT CAST(COALESCE(SUM(CASE WHEN b.state = 'ingested' \
                     THEN (SELECT COALESCE(SUM(l.cost_pico), 0) FROM ledger l WHERE l.batch_id = b.id) \
                     ELSE b.reserved_pico END), 0) AS BIGINT) \
                   FROM batches b WHERE b.run_id = $1")
                .bind(run_id),
            )
            .await?;
        Ok(Usd::from_pico(pico as i128))
    }

    async fn plannable_over(
        &self,
        pipeline: &str,
        stage: &str,
        max_input_tokens: u64,
    ) -> Result<u64> {
        let n: i64 = self
            .db
            .scalar(
                q(
                    "SELECT COUNT(*) FROM items WHERE pipeline = $1 AND stage = $2 \
                   AND state IN ('pending', 'failed') AND input_tokens > $3",
                )
                .bind(pipeline)
                .bind(stage)
                .bind(max_input_tokens.min(i64::MAX as u64) as i64),
            )
            .await?;
        Ok(count(n))
    }

    async fn history(&self, pipeline: &str, stage: &str) -> Result<crate::plan::History> {
        let (answered, output): (i64, i64) = self
            .db
            .one(
                q("SELECT COUNT(*), CAST(COALESCE(SUM(l.output_tokens), 0) AS BIGINT) FROM ledger l \
                   WHERE l.pipeline = $1 AND l.stage = $2 AND l.output_tokens > 0")
                .bind(pipeline)
                .bind(stage),
            )
            .await?;
        let (attempts, items): (i64, i64) = self
            .db
            .one(
                q(
                    "SELECT COUNT(a.id), COUNT(DISTINCT a.item_id) FROM attempts a \
                   JOIN items i ON i.id = a.item_id WHERE i.pipeline = $1 AND i.stage = $2 \
                   AND a.state <> 'in_flight'",
                )
                .bind(pipeline)
                .bind(stage),
            )
            .await?;
        Ok(crate::plan::History {
            answered: count(answered),
            output_tokens: count(output),
            attempts: count(attempts),
            items_attempted: count(items),
        })
    }

    async fn succeeded_among(
        &self,
        pipeline: &str,
        stage: &str,
        keys: &[[u8; 32]],
    ) -> Result<Vec<[u8; 32]>> {
        let mut out = Vec::new();
        for chunk in keys.chunks(ROWS_PER_STATEMENT) {
            let mut qq = q(format!(
                "WITH c(p, s) AS (SELECT ?, ?), v(k) AS (VALUES {}) \
                 SELECT v.k FROM v WHERE EXISTS (SELECT 1 FROM items i, c WHERE i.pipeline = c.p \
                 AND i.stage = c.s AND i.dedupe_key = v.k AND i.state = 'succeeded')",
                values_sql(chunk.len(), 1)
            ))
            .bind(pipeline)
            .bind(stage);
            for k in chunk {
                qq.push(&k[..]);
            }
            for (k,) in self.db.all::<(Vec<u8>,)>(qq).await? {
                if let Ok(a) = <[u8; 32]>::try_from(k.as_slice()) {
                    out.push(a);
                }
            }
        }
        Ok(out)
    }

    async fn plannable_totals(&self, pipeline: &str, stage: &str) -> Result<(u64, u64)> {
        let (n, tokens): (i64, i64) = self
            .db
            .one(
                q(
                    "SELECT COUNT(*), CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT) FROM items \
                   WHERE pipeline = $1 AND stage = $2 AND state IN ('pending', 'failed')",
                )
                .bind(pipeline)
                .bind(stage),
            )
            .await?;
        Ok((count(n), count(tokens)))
    }

    async fn run_item_tokens(&self, run_id: &str) -> Result<Vec<u64>> {
        let v: Vec<(i64,)> = self
            .db
            .all(
                q("SELECT input_tokens FROM items WHERE id IN (SELECT item_id FROM records WHERE run_id = $1)")
                    .bind(run_id),
            )
            .await?;
        Ok(v.into_iter().map(|(n,)| count(n)).collect())
    }

    async fn plannable_tokens(&self, pipeline: &str, stage: &str) -> Result<Vec<u64>> {
        let v: Vec<(i64,)> = self
            .db
            .all(
                q(
                    "SELECT input_tokens FROM items WHERE pipeline = $1 AND stage = $2 \
                   AND state IN ('pending', 'failed')",
                )
                .bind(pipeline)
                .bind(stage),
            )
            .await?;
        Ok(v.into_iter().map(|(n,)| count(n)).collect())
    }

    async fn record_provider_bill(&self, b: &ProviderBill) -> Result<()> {
        self.db
            .execute(
                q("INSERT INTO provider_bills (provider_batch_id, requests, input_tokens, cached_input_tokens, \
                   cache_write_tokens, output_tokens, reasoning_tokens, cost_pico, source, recorded_at) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                   ON CONFLICT (provider_batch_id) DO UPDATE SET requests = excluded.requests, \
                   input_tokens = excluded.input_tokens, cached_input_tokens = excluded.cached_input_tokens, \
                   cache_write_tokens = excluded.cache_write_tokens, output_tokens = excluded.output_tokens, \
                   reasoning_tokens = excluded.reasoning_tokens, cost_pico = excluded.cost_pico, \
                   source = excluded.source, recorded_at = excluded.recorded_at")
                .bind(&b.provider_batch_id)
                .bind(i64_of(b.requests))
                .bind(i64_of(b.usage.input_tokens))
                .bind(i64_of(b.usage.cached_input_tokens))
                .bind(i64_of(b.usage.cache_write_tokens))
                .bind(i64_of(b.usage.output_tokens))
                .bind(i64_of(b.usage.reasoning_tokens))
                .bind(money_i64(b.cost)?)
                .bind(&b.source)
                .bind(now_ms()),
            )
            .await?;
        Ok(())
    }

    async fn provider_bill(&self, provider_batch_id: &str) -> Result<Option<ProviderBill>> {
        type Bill = (String, i64, i64, i64, i64, i64, i64, i64, String);
        let row: Option<Bill> = self
            .db
            .optional(
                q("SELECT provider_batch_id, requests, input_tokens, cached_input_tokens, cache_write_tokens, \
                   output_tokens, reasoning_tokens, cost_pico, source FROM provider_bills WHERE provider_batch_id = $1")
                .bind(provider_batch_id),
            )
            .await?;
        Ok(row.map(|r| ProviderBill {
            provider_batch_id: r.0,
            requests: count(r.1),
            usage: Usage {
                input_tokens: count(r.2),
                cached_input_tokens: count(r.3),
                cache_write_tokens: count(r.4),
                output_tokens: count(r.5),
                reasoning_tokens: count(r.6),
            },
            cost: Usd::from_pico(r.7 as i128),
            source: r.8,
        }))
    }

    async fn set_run_plan(&self, run_id: &str, plan_json: &str) -> Result<()> {
        self.db
            .execute(
                q("UPDATE runs SET plan_json = $2 WHERE id = $1")
                    .bind(run_id)
                    .bind(plan_json),
            )
            .await?;
        Ok(())
    }

    async fn batch_lines(
        &self,
        batch_id: &str,
        after_attempt_id: i64,
        limit: u32,
    ) -> Result<Vec<BatchLine>> {
        self.db
            .all(
                q(
                    "SELECT a.id AS attempt_id, a.custom_id, i.shape_id, i.user_json \
                   FROM attempts a JOIN items i ON i.id = a.item_id \
                   WHERE a.batch_id = $1 AND a.id > $2 ORDER BY a.id LIMIT $3",
                )
                .bind(batch_id)
                .bind(after_attempt_id)
                .bind(limit as i64),
            )
            .await
    }

    async fn batch(&self, id: &str) -> Result<Option<BatchRow>> {
        self.db
            .optional(q(format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1")).bind(id))
            .await
    }

    async fn open_batches(&self, pipeline: Option<&str>) -> Result<Vec<BatchRow>> {
        self.db
            .all(
                q(format!(
                    "SELECT {BATCH_COLUMNS} FROM batches WHERE state <> 'ingested' \
                     AND ($1 IS NULL OR pipeline = $1) ORDER BY created_at, id"
                ))
                .bind(pipeline),
            )
            .await
    }

    async fn claim_batches(&self, claim: &Claim<'_>) -> Result<Vec<BatchRow>> {
        let now = now_ms();
        let expires = now.saturating_add(claim.lease_ms);
        // Batches to take (or to renew: ours, past half their lease). SQLite: one process
        // per store (the run lock), so every open batch is ours to take. PostgreSQL: free,
        // or held under a lease that ran out (or any, by force).
        let take = match (self.engine(), claim.force) {
            (Engine::Sqlite, _) | (Engine::Postgres, true) => {
                "(lease_owner IS NULL OR lease_owner <> $3 OR lease_expires_at IS NULL OR lease_expires_at < $6)"
            }
            (Engine::Postgres, false) => {
                "(lease_owner IS NULL OR lease_expires_at IS NULL OR lease_expires_at < $5 \
                  OR (lease_owner = $3 AND lease_expires_at < $6))"
            }
        };
        let renew_before = now.saturating_add(claim.lease_ms / 2);
        self.db
            .execute(
                q(format!(
                    "UPDATE batches SET \
                       lease_token = CASE WHEN lease_owner = $3 THEN lease_token ELSE lease_token + 1 END, \
                       lease_owner = $3, lease_expires_at = $4 \
                     WHERE id IN (SELECT id FROM batches WHERE state <> 'ingested' \
                       AND ($1 IS NULL OR pipeline = $1) AND ($2 IS NULL OR id = $2) AND {take} \
                       ORDER BY created_at, id{})",
                    self.skip_locked()
                ))
                .bind(claim.pipeline)
                .bind(claim.batch_id)
                .bind(claim.owner)
                .bind(expires)
                .bind(now)
                .bind(renew_before),
            )
            .await?;
        // Everything the owner now holds (a read: holding costs no write per pass).
        self.db
            .all(
                q(format!(
                    "SELECT {BATCH_COLUMNS} FROM batches WHERE state <> 'ingested' AND lease_owner = $3 \
                     AND ($1 IS NULL OR pipeline = $1) AND ($2 IS NULL OR id = $2) ORDER BY created_at, id"
                ))
                .bind(claim.pipeline)
                .bind(claim.batch_id)
                .bind(claim.owner),
            )
            .await
    }

    async fn heartbeat(&self, worker: &WorkerInfo, lease_ms: i64) -> Result<u64> {
        let now = now_ms();
        let mut tx = self.db.begin().await?;
        tx.execute(
            q(
                "INSERT INTO workers (id, host, pid, role, pipelines, started_at, heartbeat_at) \
               VALUES ($1, $2, $3, $4, $5, $6, $6) \
               ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            )
            .bind(&worker.id)
            .bind(&worker.host)
            .bind(worker.pid as i64)
            .bind(worker.role)
            .bind(&worker.pipelines)
            .bind(now),
        )
        .await?;
        let held = tx
            .execute(
                q("UPDATE batches SET lease_expires_at = $2 \
                   WHERE lease_owner = $1 AND state <> 'ingested'")
                .bind(&worker.id)
                .bind(now.saturating_add(lease_ms)),
            )
            .await?;
        tx.commit().await?;
        Ok(held)
    }

    async fn release_leases(&self, worker_id: &str, stopped: bool) -> Result<u64> {
        let now = now_ms();
        let mut tx = self.db.begin().await?;
        let n = tx
            .execute(
                q("UPDATE batches SET lease_expires_at = NULL, lease_owner = NULL, lease_token = lease_token + 1 \
                   WHERE lease_owner = $1")
                .bind(worker_id),
            )
            .await?;
        if stopped {
            tx.execute(
                q("UPDATE workers SET stopped_at = $2 WHERE id = $1")
                    .bind(worker_id)
                    .bind(now),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(n)
    }

    async fn workers(&self, seen_since: i64) -> Result<Vec<WorkerRow>> {
        let now = now_ms();
        self.db
            .all(
                q("SELECT w.id, w.host, w.pid, w.role, w.pipelines, w.started_at, w.heartbeat_at, w.stopped_at, \
                     (SELECT COUNT(*) FROM batches b WHERE b.lease_owner = w.id AND b.state <> 'ingested' \
                        AND b.lease_expires_at >= $2) AS held \
                   FROM workers w WHERE (w.stopped_at IS NULL AND w.heartbeat_at >= $1) OR EXISTS \
                     (SELECT 1 FROM batches b WHERE b.lease_owner = w.id AND b.state <> 'ingested') \
                   ORDER BY w.started_at, w.id")
                .bind(seen_since)
                .bind(now),
            )
            .await
    }

    async fn plannable_retries(&self, pipeline: &str, stage: &str) -> Result<u64> {
        let n: i64 = self
            .db
            .scalar(
                q("SELECT COUNT(*) FROM items WHERE pipeline = $1 AND stage = $2 AND state = 'failed'")
                    .bind(pipeline)
                    .bind(stage),
            )
            .await?;
        Ok(count(n))
    }

    async fn run_batches(&self, run_id: &str) -> Result<Vec<BatchRow>> {
        self.db
            .all(
                q(format!(
                    "SELECT {BATCH_COLUMNS} FROM batches WHERE run_id = $1 ORDER BY created_at, id"
                ))
                .bind(run_id),
            )
            .await
    }

    async fn online_page(&self, batch_id: &str, limit: u32) -> Result<Vec<OnlineLine>> {
        self.db
            .all(
                q("SELECT a.id AS attempt_id, a.item_id, a.attempt_no, a.custom_id, a.state, i.shape_id, \
                   i.user_json, i.input_tokens FROM attempts a JOIN items i ON i.id = a.item_id \
                   WHERE a.batch_id = $1 AND a.state = 'in_flight' AND a.dispatched_at IS NULL \
                   ORDER BY a.id LIMIT $2")
                .bind(batch_id)
                .bind(limit as i64),
            )
            .await
    }

    async fn mark_dispatched(&self, batch: &BatchRow, attempt_ids: &[i64]) -> Result<()> {
        let now = now_ms();
        let mut tx = self.db.begin().await?;
        self.fence(&mut tx, &batch.id, batch.lease_token).await?;
        for chunk in attempt_ids.chunks(ROWS_PER_STATEMENT) {
            let mut qq = q(format!(
                "WITH c(t) AS (SELECT ?), v(id) AS (VALUES {}) \
                 UPDATE attempts SET dispatched_at = (SELECT t FROM c) FROM v \
                 WHERE attempts.id = v.id AND attempts.state = 'in_flight'",
                values_sql(chunk.len(), 1)
            ))
            .bind(now);
            for id in chunk {
                qq.push(*id);
            }
            tx.execute(qq).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn lose_dispatched(&self, batch: &BatchRow, max_attempts: u32) -> Result<ApplyStats> {
        let now = now_ms();
        let error = "lost: sent online by a process that ended before recording the answer (it may have been billed)";
        let mut tx = self.db.begin().await?;
        self.fence(&mut tx, &batch.id, batch.lease_token).await?;
        let states: Vec<(String,)> = tx
            .all(
                q("UPDATE items SET \
                     state = CASE WHEN items.attempts >= $2 THEN 'exhausted' ELSE 'failed' END, \
                     last_error = $3, updated_at = $4 \
                   FROM (SELECT item_id, attempt_no FROM attempts WHERE batch_id = $1 AND state = 'in_flight' \
                         AND dispatched_at IS NOT NULL) AS a \
                   WHERE items.id = a.item_id AND items.state = 'in_flight' AND items.attempts = a.attempt_no \
                   RETURNING items.state")
                .bind(&batch.id)
                .bind(max_attempts as i64)
                .bind(error)
                .bind(now),
            )
            .await?;
        let n = tx
            .execute(
                q("UPDATE attempts SET state = 'failed', verdict = 'lost', error = $2, completed_at = $3 \
                   WHERE batch_id = $1 AND state = 'in_flight' AND dispatched_at IS NOT NULL")
                .bind(&batch.id)
                .bind(error)
                .bind(now),
            )
            .await?;
        tx.commit().await?;
        Ok(states_to_stats(n, &states))
    }

    async fn known_provider_ids(&self, provider: &str) -> Result<HashSet<String>> {
        let v: Vec<(String,)> = self
            .db
            .all(
                q("SELECT provider_batch_id FROM batches WHERE provider = $1 AND provider_batch_id IS NOT NULL")
                    .bind(provider),
            )
            .await?;
        Ok(v.into_iter().map(|(s,)| s).collect())
    }

    async fn update_batch(&self, b: &BatchRow, from: &str, u: &BatchUpdate) -> Result<bool> {
        let n = self
            .db
            .execute(
                q("UPDATE batches SET \
                     state = COALESCE($3, state), \
                     file_path = COALESCE($4, file_path), \
                     file_sha256 = COALESCE($5, file_sha256), \
                     file_bytes = COALESCE($6, file_bytes), \
                     input_file_id = COALESCE($7, input_file_id), \
                     provider_batch_id = COALESCE($8, provider_batch_id), \
                     provider_status = COALESCE($9, provider_status), \
                     output_file_id = COALESCE($10, output_file_id), \
                     error_file_id = COALESCE($11, error_file_id), \
                     provider_usage = COALESCE($12, provider_usage), \
                     error = COALESCE($13, error), \
                     submitted_at = COALESCE($14, submitted_at), \
                     ended_at = COALESCE($15, ended_at), \
                     ingested_at = COALESCE($16, ingested_at), \
                     end_state = COALESCE($17, end_state), \
                     creating_at = COALESCE($19, creating_at) \
                   WHERE id = $1 AND state = $2 AND lease_token = $18")
                .bind(&b.id)
                .bind(from)
                .bind(u.state)
                .bind(&u.file_path)
                .bind(&u.file_sha256)
                .bind(u.file_bytes)
                .bind(&u.input_file_id)
                .bind(&u.provider_batch_id)
                .bind(&u.provider_status)
                .bind(&u.output_file_id)
                .bind(&u.error_file_id)
                .bind(&u.provider_usage)
                .bind(&u.error)
                .bind(u.submitted_at)
                .bind(u.ended_at)
                .bind(u.ingested_at)
                .bind(u.end_state)
                .bind(b.lease_token)
                .bind(u.creating_at),
            )
            .await?;
        if n == 1 {
            return Ok(true);
        }
        // Not applied: a lost lease is an error; a state already moved on is not.
        let token: Option<(i64,)> = self
            .db
            .optional(q("SELECT lease_token FROM batches WHERE id = $1").bind(&b.id))
            .await?;
        match token {
            Some((t,)) if t != b.lease_token => Err(StoreError::LeaseLost {
                batch_id: b.id.clone(),
            }),
            _ => Ok(false),
        }
    }

    async fn batch_attempts(&self, batch_id: &str) -> Result<Vec<AttemptRef>> {
        self.db
            .all(
                q("SELECT id, item_id, attempt_no, custom_id, state FROM attempts WHERE batch_id = $1 ORDER BY id")
                    .bind(batch_id),
            )
            .await
    }

    async fn apply_results(
        &self,
        batch: &BatchRow,
        outcomes: &[AttemptOutcome],
        max_attempts: u32,
    ) -> Result<ApplyStats> {
        static LEDGER: OnceLock<String> = OnceLock::new();
        static ATTEMPTS: OnceLock<String> = OnceLock::new();
        static ITEMS: OnceLock<String> = OnceLock::new();
        let now = now_ms();
        let mut stats = ApplyStats::default();
        let mut tx = self.db.begin().await?;
        self.fence(&mut tx, &batch.id, batch.lease_token).await?;
        for chunk in outcomes.chunks(ROWS_PER_STATEMENT) {
            let mut ledger = q(cached_sql(&LEDGER, chunk.len(), insert_ledger_sql))
                .bind(&batch.id)
                .bind(&batch.run_id)
                .bind(&batch.pipeline)
                .bind(&batch.stage)
                .bind(&batch.pricing_mode)
                .bind(now);
            for o in chunk {
                ledger.push(o.custom_id.as_str());
                ledger.push(o.attempt_id);
                ledger.push(o.model.as_deref().unwrap_or(&batch.model));
                ledger.push(i64_of(o.usage.input_tokens));
                ledger.push(i64_of(o.usage.cached_input_tokens));
                ledger.push(i64_of(o.usage.cache_write_tokens));
                ledger.push(i64_of(o.usage.output_tokens));
                ledger.push(i64_of(o.usage.reasoning_tokens));
                ledger.push(money_i64(o.cost)?);
                ledger.push(money_i64(o.standard_cost)?);
            }
            tx.execute(ledger).await?;

            let mut attempts = q(cached_sql(&ATTEMPTS, chunk.len(), update_attempts_sql)).bind(now);
            for o in chunk {
                attempts.push(o.attempt_id);
                attempts.push(if o.succeeded { "succeeded" } else { "failed" });
                attempts.push(o.verdict.as_str());
                attempts.push(o.error.as_deref());
                attempts.push(o.finish_reason.as_deref());
                attempts.push(o.model.as_deref());
            }
            let applied = tx.execute(attempts).await?;
            stats.applied += applied;
            stats.already_applied += chunk.len() as u64 - applied;

            let mut items = q(cached_sql(&ITEMS, chunk.len(), update_items_sql))
                .bind(now)
                .bind(max_attempts as i64);
            for o in chunk {
                items.push(o.item_id);
                items.push(o.attempt_no);
                items.push(o.succeeded);
                items.push(o.result.as_deref());
                items.push(o.error.as_deref().or(Some(o.verdict.as_str())));
            }
            for (state,) in tx.all::<(String,)>(items).await? {
                match state.as_str() {
                    "succeeded" => stats.succeeded += 1,
                    "exhausted" => stats.exhausted += 1,
                    _ => stats.failed += 1,
                }
            }
        }
        tx.commit().await?;
        Ok(stats)
    }

    async fn return_unsent(&self, batch: &BatchRow, why: &str) -> Result<u64> {
        const UNSENT: &str = "SELECT item_id, attempt_no FROM attempts \
             WHERE batch_id = $1 AND state = 'in_flight' AND dispatched_at IS NULL";
        let now = now_ms();
        let mut tx = self.db.begin().await?;
        self.fence(&mut tx, &batch.id, batch.lease_token).await?;
        // SET reads the row as it was: an item on its first attempt was pending, any other
        // was failed (its earlier error stays).
        let n = tx
            .execute(
                q(format!(
                    "UPDATE items SET attempts = items.attempts - 1, \
                       state = CASE WHEN items.attempts > 1 THEN 'failed' ELSE 'pending' END, \
                       updated_at = $2 \
                     FROM ({UNSENT}) AS a \
                     WHERE items.id = a.item_id AND items.state = 'in_flight' \
                       AND items.attempts = a.attempt_no"
                ))
                .bind(&batch.id)
                .bind(now),
            )
            .await?;
        tx.execute(
            q(
                "DELETE FROM attempts WHERE batch_id = $1 AND state = 'in_flight' \
               AND dispatched_at IS NULL",
            )
            .bind(&batch.id),
        )
        .await?;
        tx.execute(
            q(
                "UPDATE batches SET state = 'ended', end_state = 'cancelled', error = $2, \
                 ended_at = $3 WHERE id = $1 AND state NOT IN ('ended', 'ingested')",
            )
            .bind(&batch.id)
            .bind(why)
            .bind(now),
        )
        .await?;
        tx.commit().await?;
        Ok(n)
    }

    async fn finish_ingest(
        &self,
        batch: &BatchRow,
        verdict: &str,
        error: &str,
        max_attempts: u32,
        collector: Option<&str>,
    ) -> Result<ApplyStats> {
        let now = now_ms();
        let mut tx = self.db.begin().await?;
        self.fence(&mut tx, &batch.id, batch.lease_token).await?;
        let states: Vec<(String,)> = tx
            .all(
                q("UPDATE items SET \
                     state = CASE WHEN items.attempts >= $2 THEN 'exhausted' ELSE 'failed' END, \
                     last_error = $3, updated_at = $4 \
                   FROM (SELECT item_id, attempt_no FROM attempts WHERE batch_id = $1 AND state = 'in_flight') AS a \
                   WHERE items.id = a.item_id AND items.state = 'in_flight' AND items.attempts = a.attempt_no \
                   RETURNING items.state")
                .bind(&batch.id)
                .bind(max_attempts as i64)
                .bind(format!("{verdict}: {error}"))
                .bind(now),
            )
            .await?;
        let n = tx
            .execute(
                q("UPDATE attempts SET state = 'failed', verdict = $2, error = $3, completed_at = $4 \
                   WHERE batch_id = $1 AND state = 'in_flight'")
                .bind(&batch.id)
                .bind(verdict)
                .bind(error)
                .bind(now),
            )
            .await?;
        tx.execute(
            q(
                "UPDATE batches SET state = 'ingested', ingested_at = $2, lease_owner = NULL, \
               lease_expires_at = NULL, ingested_by_run = $3 WHERE id = $1 AND state = 'ended'",
            )
            .bind(&batch.id)
            .bind(now)
            .bind(collector),
        )
        .await?;
        tx.commit().await?;
        Ok(states_to_stats(n, &states))
    }

    async fn record_anomaly(
        &self,
        run_id: Option<&str>,
        batch_id: Option<&str>,
        kind: &str,
        custom_id: Option<&str>,
        detail: &str,
    ) -> Result<()> {
        self.db
            .execute(
                q(
                    "INSERT INTO anomalies (run_id, batch_id, kind, custom_id, detail, created_at) \
                   VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(run_id)
                .bind(batch_id)
                .bind(kind)
                .bind(custom_id)
                .bind(detail)
                .bind(now_ms()),
            )
            .await?;
        Ok(())
    }

    async fn anomalies_of_kind(&self, kind: &str) -> Result<u64> {
        let n: i64 = self
            .db
            .scalar(q("SELECT COUNT(*) FROM anomalies WHERE kind = $1").bind(kind))
            .await?;
        Ok(count(n))
    }

    async fn run_records(
        &self,
        run_id: &str,
        after_line: i64,
        limit: u32,
    ) -> Result<Vec<RecordResult>> {
        self.db
            .all(
                q("SELECT r.line, r.record_id, r.item_id, i.state, i.attempts, i.result, i.last_error \
                   FROM records r JOIN items i ON i.id = r.item_id \
                   WHERE r.run_id = $1 AND r.line > $2 ORDER BY r.line LIMIT $3")
                .bind(run_id)
                .bind(after_line)
                .bind(limit as i64),
            )
            .await
    }

    async fn run_figures(&self, run_id: &str) -> Result<RunFigures> {
        let db = &self.db;
        let started: i64 = db
            .scalar(q("SELECT started_at FROM runs WHERE id = $1").bind(run_id))
            .await?;
        let mut f = RunFigures {
            records_valid: count(
                db.scalar(q("SELECT COUNT(*) FROM records WHERE run_id = $1").bind(run_id))
                    .await?,
            ),
            ..Default::default()
        };
        let states: Vec<(String, i64)> = db
            .all(
                q("SELECT i.state, COUNT(*) FROM items i \
                   WHERE i.id IN (SELECT item_id FROM records WHERE run_id = $1) GROUP BY i.state")
                .bind(run_id),
            )
            .await?;
        for (state, n) in states {
            let n = count(n);
            f.unique_items += n;
            match state.as_str() {
                "succeeded" => f.succeeded += n,
                "exhausted" => f.exhausted += n,
                _ => f.unfinished += n,
            }
        }
        // Processed by this run: the item's successful attempt is in one of its batches.
        f.processed_records = count(
            db.scalar(
                q(
                    "SELECT COUNT(*) FROM records r JOIN items i ON i.id = r.item_id \
                   WHERE r.run_id = $1 AND i.state = 'succeeded' AND EXISTS \
                     (SELECT 1 FROM attempts a JOIN batches b ON b.id = a.batch_id \
                      WHERE a.item_id = i.id AND a.state = 'succeeded' AND b.run_id = $1)",
                )
                .bind(run_id),
            )
            .await?,
        );
        f.records_done = count(
            db.scalar(
                q(
                    "SELECT COUNT(*) FROM records r JOIN items i ON i.id = r.item_id \
                   WHERE r.run_id = $1 AND i.state = 'succeeded'",
                )
                .bind(run_id),
            )
            .await?,
        );
        let (attempts, attempted, sent): (i64, i64, i64) = db
            .one(
                q("SELECT COUNT(a.id), COUNT(DISTINCT a.item_id), \
                   COALESCE(SUM(CASE WHEN b.provider_batch_id IS NOT NULL OR a.dispatched_at IS NOT NULL \
                                THEN 1 ELSE 0 END), 0) \
                   FROM attempts a JOIN batches b ON b.id = a.batch_id WHERE b.run_id = $1")
                .bind(run_id),
            )
            .await?;
        f.attempts = count(attempts);
        f.items_attempted = count(attempted);
        f.requests_sent = count(sent);
        f.batches = count(
            db.scalar(q("SELECT COUNT(*) FROM batches WHERE run_id = $1").bind(run_id))
                .await?,
        );
        // Already done before this run started: succeeded in an attempt completed earlier.
        f.reused = count(
            db.scalar(
                q("SELECT COUNT(*) FROM items i WHERE i.state = 'succeeded' \
                   AND i.id IN (SELECT item_id FROM records WHERE run_id = $1) \
                   AND EXISTS (SELECT 1 FROM attempts a WHERE a.item_id = i.id \
                               AND a.state = 'succeeded' AND a.completed_at < $2)")
                .bind(run_id)
                .bind(started),
            )
            .await?,
        );
        f.ledger = self.ledger_totals(LedgerScope::Run, run_id).await?;
        f.answered = count(
            db.scalar(
                q("SELECT COUNT(*) FROM ledger WHERE output_tokens > 0 \
                   AND batch_id IN (SELECT id FROM batches WHERE run_id = $1)")
                .bind(run_id),
            )
            .await?,
        );
        f.models = db
            .all::<(String,)>(
                q("SELECT DISTINCT model FROM ledger WHERE batch_id IN (SELECT id FROM batches WHERE run_id = $1) \
                   AND (output_tokens > 0 OR input_tokens > 0) ORDER BY model")
                .bind(run_id),
            )
            .await?
            .into_iter()
            .map(|(m,)| m)
            .collect();
        // Batches of other runs this run's process ingested.
        let (batches, results, cost): (i64, i64, i64) = db
            .one(
                q("SELECT COUNT(*), \
                   CAST(COALESCE(SUM((SELECT COUNT(*) FROM attempts a WHERE a.batch_id = b.id)), 0) AS BIGINT), \
                   CAST(COALESCE(SUM((SELECT COALESCE(SUM(l.cost_pico), 0) FROM ledger l WHERE l.batch_id = b.id)), 0) AS BIGINT) \
                   FROM batches b WHERE b.ingested_by_run = $1 AND b.run_id <> $1")
                .bind(run_id),
            )
            .await?;
        f.collected.batches = count(batches);
        f.collected.results = count(results);
        f.collected.cost = Usd::from_pico(cost as i128);
        f.collected.runs = db
            .all::<(String,)>(
                q("SELECT DISTINCT run_id FROM batches WHERE ingested_by_run = $1 AND run_id <> $1 \
                   ORDER BY run_id")
                .bind(run_id),
            )
            .await?
            .into_iter()
            .map(|(r,)| r)
            .collect();
        Ok(f)
    }

    async fn ledger_totals_for_batch(&self, batch_id: &str) -> Result<LedgerTotals> {
        self.ledger_totals(LedgerScope::Batch, batch_id).await
    }

    async fn audit(&self, run_id: &str) -> Result<Vec<AuditRow>> {
        // The attempts of this run's batches: each attempt appears in exactly one run.
        self.db
            .all(
                q("SELECT b.run_id, i.id AS item_id, i.dedupe_key, i.state AS item_state, \
                     COALESCE((SELECT string_agg(record_id, ',') FROM records r \
                               WHERE r.run_id = b.run_id AND r.item_id = i.id), '') AS record_ids, \
                     a.attempt_no, a.custom_id, a.batch_id, b.provider_batch_id, a.state AS attempt_state, \
                     a.verdict, a.error, COALESCE(l.model, a.model) AS model, \
                     l.input_tokens, l.cached_input_tokens, l.cache_write_tokens, l.output_tokens, \
                     l.reasoning_tokens, l.cost_pico \
                   FROM attempts a JOIN batches b ON b.id = a.batch_id JOIN items i ON i.id = a.item_id \
                   LEFT JOIN ledger l ON l.attempt_id = a.id \
                   WHERE b.run_id = $1 \
                   ORDER BY i.id, a.attempt_no")
                .bind(run_id),
            )
            .await
    }

    async fn quarantine(&self, run_id: &str) -> Result<Vec<QuarantineRow>> {
        self.db
            .all(
                q("SELECT source, line, field, reason FROM quarantine WHERE run_id = $1 ORDER BY line")
                    .bind(run_id),
            )
            .await
    }

    async fn quarantine_summary(
        &self,
        run_id: &str,
        limit: u32,
    ) -> Result<Vec<(Option<String>, String, u64)>> {
        let rows: Vec<(Option<String>, String, i64)> = self
            .db
            .all(
                q(
                    "SELECT field, MIN(reason), COUNT(*) FROM quarantine WHERE run_id = $1 \
                   GROUP BY field ORDER BY COUNT(*) DESC, field LIMIT $2",
                )
                .bind(run_id)
                .bind(limit as i64),
            )
            .await?;
        Ok(rows.into_iter().map(|(f, r, n)| (f, r, count(n))).collect())
    }

    async fn anomaly_count(&self, run_id: &str) -> Result<u64> {
        Ok(count(
            self.db
                .scalar(
                    q("SELECT COUNT(*) FROM anomalies WHERE run_id = $1 \
                       OR batch_id IN (SELECT id FROM batches WHERE run_id = $1)")
                    .bind(run_id),
                )
                .await?,
        ))
    }
}

/// The items a planned batch takes, with parameters numbered from `first`: on SQLite (one
/// writer) every plannable item up to the last one chosen; on PostgreSQL exactly the rows the
/// planning transaction locked.
fn plan_filter_sql(engine: Engine, first: usize, req: &PlanRequest<'_>) -> String {
    let (p, s, t, i) = (first, first + 1, first + 2, first + 3);
    let ids = match engine {
        Engine::Sqlite => format!("id <= ${i}"),
        Engine::Postgres => format!("id = ANY(${i})"),
    };
    format!(
        "pipeline = ${p} AND stage = ${s} AND state IN {} AND input_tokens <= ${t} AND {ids}",
        plannable_states(req)
    )
}

/// The item states a planning round takes (a constant fragment, never user text).
fn plannable_states(req: &PlanRequest<'_>) -> &'static str {
    if req.only_retries {
        "('failed')"
    } else {
        "('pending', 'failed')"
    }
}

/// Binds what [`plan_filter_sql`] asks for.
fn plan_filter<'a>(
    qq: Query<'a>,
    req: &PlanRequest<'a>,
    max_item: i64,
    chosen: &'a [i64],
    engine: Engine,
) -> Query<'a> {
    let qq = qq.bind(req.pipeline).bind(req.stage).bind(max_item);
    match engine {
        Engine::Sqlite => qq.bind(*chosen.last().expect("a planned batch has items")),
        Engine::Postgres => qq.bind(chosen),
    }
}

#[derive(Clone, Copy)]
enum LedgerScope {
    Run,
    Batch,
}

impl SqlStore {
    async fn ledger_totals(&self, scope: LedgerScope, key: &str) -> Result<LedgerTotals> {
        const SUMS: &str = "SELECT COUNT(*), \
             CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(cached_input_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(cache_write_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(reasoning_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(cost_pico), 0) AS BIGINT), \
             CAST(COALESCE(SUM(standard_cost_pico), 0) AS BIGINT) FROM ledger ";
        let filter = match scope {
            LedgerScope::Run => "WHERE batch_id IN (SELECT id FROM batches WHERE run_id = $1)",
            LedgerScope::Batch => "WHERE batch_id = $1",
        };
        type Sums = (i64, i64, i64, i64, i64, i64, i64, i64);
        let r: Sums = self.db.one(q(format!("{SUMS}{filter}")).bind(key)).await?;
        Ok(LedgerTotals {
            rows: count(r.0),
            usage: Usage {
                input_tokens: count(r.1),
                cached_input_tokens: count(r.2),
                cache_write_tokens: count(r.3),
                output_tokens: count(r.4),
                reasoning_tokens: count(r.5),
            },
            cost: Usd::from_pico(r.6 as i128),
            standard_cost: Usd::from_pico(r.7 as i128),
        })
    }
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn money_i64(u: Usd) -> Result<i64> {
    u.to_pico_i64()
        .map_err(|_| StoreError::Invalid(format!("amount {u} USD does not fit the ledger")))
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
