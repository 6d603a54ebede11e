//! The SQLite store: one file, WAL mode, `synchronous = FULL`, foreign keys on.
//!
//! Hot paths (ingest, planning, applying results) bind many rows per statement: with sqlx
//! every statement is a round trip to the connection's worker thread, so one row per
//! statement would cap throughput at ~15–19k rows/s. Write transactions start with
//! `BEGIN IMMEDIATE` so a second writer queues on `busy_timeout` instead of failing on a
//! lock upgrade.

use std::path::Path;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};

use super::*;
use crate::cost::Usd;

/// Rows per multi-row statement (well under SQLite's 32,766 bound variables).
const ROWS_PER_STATEMENT: usize = 400;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The SQLite implementation of [`Store`].
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and applies migrations. The folder is
    /// created with mode 0700 and the file is private to its owner.
    pub async fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
            && !dir.exists()
        {
            crate::fsutil::create_private_dir_all(dir)?;
        }
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            .pragma("cache_size", "-16384")
            .pragma("temp_store", "memory");
        let store = Self::connect(opts, 2).await?;
        crate::fsutil::restrict_file(path);
        Ok(store)
    }

    /// A private in-memory database (tests).
    pub async fn open_in_memory() -> Result<Self> {
        let opts = SqliteConnectOptions::from_str("sqlite::memory:")?
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        Self::connect(opts, 1).await
    }

    async fn connect(opts: SqliteConnectOptions, max: u32) -> Result<Self> {
        let pool = SqlitePoolOptions::new()
            .max_connections(max)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(opts)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(SqliteStore { pool })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn write_tx(&self) -> Result<Transaction<'static, Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// `PRAGMA integrity_check` (and the foreign-key check): `ok` or the problems.
    pub async fn integrity_check(&self) -> Result<String> {
        let rows = sqlx::query("PRAGMA integrity_check")
            .fetch_all(&self.pool)
            .await?;
        let mut out: Vec<String> = rows.iter().map(|r| r.get::<String, _>(0)).collect();
        let fk = sqlx::query("PRAGMA foreign_key_check")
            .fetch_all(&self.pool)
            .await?;
        if !fk.is_empty() {
            out.push(format!("{} foreign key violation(s)", fk.len()));
        }
        Ok(out.join("; "))
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// `(?,?,…),(…)` for `rows` rows of `per_row` anonymous parameters.
///
/// Bulk statements use anonymous `?` parameters only: sqlx looks every parameter's name up,
/// and SQLite finds a named one (`$N`) by a linear scan, which makes a statement with
/// thousands of named parameters quadratic. Values shared by all rows are bound once, in a
/// one-row `c` table (or CTE) placed first in the text.
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
    submitted_at, ended_at, ingested_at";

impl Store for SqliteStore {
    async fn create_run(&self, run: &NewRun) -> Result<()> {
        sqlx::query(
            "INSERT INTO runs (id, pipeline, stage, status, pipeline_file, source_path, output_path, \
             provider, model, pricing_mode, max_attempts, host, pid, started_at, budget_pico, max_item_pico) \
             VALUES ($1, $2, $3, 'running', $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
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
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn set_run_counts(
        &self,
        run_id: &str,
        records_read: u64,
        quarantined: u64,
    ) -> Result<()> {
        sqlx::query("UPDATE runs SET records_read = $2, records_quarantined = $3 WHERE id = $1")
            .bind(run_id)
            .bind(i64_of(records_read))
            .bind(i64_of(quarantined))
            .execute(&self.pool)
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
        sqlx::query(
            "UPDATE runs SET status = $2, exit_code = $3, message = $4, finished_at = $5 WHERE id = $1",
        )
        .bind(run_id)
        .bind(status.as_str())
        .bind(exit_code as i64)
        .bind(message)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn run(&self, run_id: &str) -> Result<Option<RunRow>> {
        Ok(
            sqlx::query_as::<_, RunRow>("SELECT * FROM runs WHERE id = $1")
                .bind(run_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn mark_stale_runs(&self) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE runs SET status = 'interrupted', finished_at = COALESCE(finished_at, $1), \
             message = COALESCE(message, 'the process ended without finishing the run') \
             WHERE status = 'running'",
        )
        .bind(now_ms())
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn last_run(&self, pipeline: Option<&str>) -> Result<Option<RunRow>> {
        Ok(sqlx::query_as::<_, RunRow>(
            "SELECT * FROM runs WHERE ($1 IS NULL OR pipeline = $1) ORDER BY started_at DESC, rowid DESC LIMIT 1",
        )
        .bind(pipeline)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn ensure_shape(&self, shape: &RequestShape) -> Result<i64> {
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "INSERT INTO shapes (sha256, prefix, suffix) VALUES ($1, $2, $3) ON CONFLICT (sha256) DO NOTHING",
        )
        .bind(&shape.sha256[..])
        .bind(&shape.prefix)
        .bind(&shape.suffix)
        .execute(&mut *tx)
        .await?;
        let id: i64 = sqlx::query_scalar("SELECT id FROM shapes WHERE sha256 = $1")
            .bind(&shape.sha256[..])
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(id)
    }

    async fn shape(&self, id: i64) -> Result<RequestShape> {
        let row = sqlx::query("SELECT prefix, suffix FROM shapes WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        Ok(RequestShape::new(row.get(0), row.get(1)))
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
        let mut tx = self.write_tx().await?;
        for chunk in records.chunks(ROWS_PER_STATEMENT) {
            let sql = cached_sql(&ITEMS, chunk.len(), insert_items_sql);
            let mut q = sqlx::query(&sql)
                .bind(pipeline)
                .bind(stage)
                .bind(shape_id)
                .bind(run_id)
                .bind(now);
            for r in chunk {
                q = q
                    .bind(&r.key[..])
                    .bind(r.user_json.as_str())
                    .bind(r.body_bytes as i64)
                    .bind(i64_of(r.input_tokens));
            }
            stats.new_items += q.execute(&mut *tx).await?.rows_affected();
            crate::failpoint!("ingest.mid_tx");

            let sql = cached_sql(&RECORDS, chunk.len(), insert_records_sql);
            let mut q = sqlx::query(&sql).bind(run_id).bind(pipeline).bind(stage);
            for r in chunk {
                q = q
                    .bind(r.line as i64)
                    .bind(r.record_id.as_str())
                    .bind(&r.key[..]);
            }
            q.execute(&mut *tx).await?;
        }
        for chunk in quarantined.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO quarantine (run_id, source, line, field, reason) \
                 SELECT c.r, c.s, v.column1, v.column2, v.column3 \
                 FROM (SELECT ? AS r, ? AS s) AS c, (VALUES {}) AS v",
                values_sql(chunk.len(), 3)
            );
            let mut q = sqlx::query(&sql).bind(run_id).bind(source);
            for r in chunk {
                q = q
                    .bind(r.line as i64)
                    .bind(r.field.as_deref())
                    .bind(r.reason.as_str());
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(stats)
    }

    async fn plannable_count(&self, pipeline: &str, stage: &str) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM items WHERE pipeline = $1 AND stage = $2 AND state IN ('pending', 'failed')",
        )
        .bind(pipeline)
        .bind(stage)
        .fetch_one(&self.pool)
        .await?;
        Ok(n as u64)
    }

    async fn revive_exhausted(
        &self,
        pipeline: &str,
        stage: &str,
        max_attempts: u32,
    ) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE items SET state = 'failed', updated_at = $4 WHERE pipeline = $1 AND stage = $2 \
             AND state = 'exhausted' AND attempts > 0 AND attempts < $3",
        )
        .bind(pipeline)
        .bind(stage)
        .bind(max_attempts as i64)
        .bind(now_ms())
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn plan_batch(&self, req: &PlanRequest<'_>) -> Result<PlanOutcome> {
        let mut tx = self.write_tx().await?;
        let max_item = req
            .budget
            .and_then(|b| b.max_item_input_tokens)
            .map(|t| t.min(i64::MAX as u64) as i64)
            .unwrap_or(i64::MAX);
        let candidates: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT id, body_bytes, attempts, input_tokens FROM items WHERE pipeline = $1 AND stage = $2 \
             AND state IN ('pending', 'failed') AND input_tokens <= $4 ORDER BY id LIMIT $3",
        )
        .bind(req.pipeline)
        .bind(req.stage)
        .bind(req.max_requests as i64)
        .bind(max_item)
        .fetch_all(&mut *tx)
        .await?;
        let now = now_ms();
        let mut bytes = 0u64;
        let mut reserved = Usd::ZERO;
        let mut last_id = None;
        let mut count = 0i64;
        let mut over_budget = None;
        for (id, body, _, tokens) in &candidates {
            let line = *body as u64 + req.line_overhead + 1;
            if line > req.max_bytes {
                // This request can never fit in a batch file: it is final, not retried.
                sqlx::query(
                    "UPDATE items SET state = 'exhausted', last_error = $2, updated_at = $3 WHERE id = $1",
                )
                .bind(id)
                .bind(format!(
                    "request is {line} bytes, over the batch file limit of {} bytes (batch.max_bytes)",
                    req.max_bytes
                ))
                .bind(now)
                .execute(&mut *tx)
                .await?;
                if last_id.is_none() {
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
                    if last_id.is_none() {
                        over_budget = Some(worst);
                    }
                    break;
                }
                reserved += worst;
            }
            bytes += line;
            last_id = Some(*id);
            count += 1;
        }
        let Some(last_id) = last_id else {
            tx.commit().await?;
            return Ok(match over_budget {
                Some(next_worst_case) => PlanOutcome::OverBudget { next_worst_case },
                None => PlanOutcome::Nothing,
            });
        };
        let id = uuid::Uuid::now_v7();
        let batch_id = id.hyphenated().to_string();
        let prefix = format!("b{}-", id.simple());
        sqlx::query(
            "INSERT INTO batches (id, run_id, pipeline, stage, provider, model, pricing_mode, state, \
             request_count, reserved_pico, created_at, mode) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'planned', $8, $9, $10, $11)",
        )
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
        .execute(&mut *tx)
        .await?;
        let inserted = sqlx::query(
            "INSERT INTO attempts (item_id, batch_id, attempt_no, custom_id, state, created_at) \
             SELECT id, $1, attempts + 1, $2 || id || '-' || (attempts + 1), 'in_flight', $3 \
             FROM items WHERE pipeline = $4 AND stage = $5 AND state IN ('pending', 'failed') \
             AND input_tokens <= $7 AND id <= $6 ORDER BY id",
        )
        .bind(&batch_id)
        .bind(&prefix)
        .bind(now)
        .bind(req.pipeline)
        .bind(req.stage)
        .bind(last_id)
        .bind(max_item)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        crate::failpoint!("plan.mid_tx");
        if candidates
            .iter()
            .any(|(id, _, tries, _)| *id <= last_id && *tries > 0)
        {
            crate::failpoint!("retry.mid_tx");
        }
        let moved = sqlx::query(
            "UPDATE items SET state = 'in_flight', attempts = attempts + 1, updated_at = $1 \
             WHERE pipeline = $2 AND stage = $3 AND state IN ('pending', 'failed') \
             AND input_tokens <= $5 AND id <= $4",
        )
        .bind(now)
        .bind(req.pipeline)
        .bind(req.stage)
        .bind(last_id)
        .bind(max_item)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted != count as u64 || moved != count as u64 {
            return Err(StoreError::Invalid(format!(
                "planning batch {batch_id}: expected {count} items, attempted {inserted}, moved {moved}"
            )));
        }
        let row = sqlx::query_as::<_, BatchRow>(&format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1"
        ))
        .bind(&batch_id)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(PlanOutcome::Planned(Box::new(row)))
    }

    async fn run_commitment(&self, run_id: &str) -> Result<Usd> {
        let pico: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(CASE WHEN b.state = 'ingested' \
                 THEN (SELECT COALESCE(SUM(l.cost_pico), 0) FROM ledger l WHERE l.batch_id = b.id) \
                 ELSE b.reserved_pico END), 0) \
             FROM batches b WHERE b.run_id = $1",
        )
        .bind(run_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(Usd::from_pico(pico as i128))
    }

    async fn plannable_over(
        &self,
        pipeline: &str,
        stage: &str,
        max_input_tokens: u64,
    ) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM items WHERE pipeline = $1 AND stage = $2 \
             AND state IN ('pending', 'failed') AND input_tokens > $3",
        )
        .bind(pipeline)
        .bind(stage)
        .bind(max_input_tokens.min(i64::MAX as u64) as i64)
        .fetch_one(&self.pool)
        .await?;
        Ok(count(n))
    }

    async fn history(&self, pipeline: &str, stage: &str) -> Result<crate::plan::History> {
        let (answered, output): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COALESCE(SUM(l.output_tokens), 0) FROM ledger l \
             WHERE l.pipeline = $1 AND l.stage = $2 AND l.output_tokens > 0",
        )
        .bind(pipeline)
        .bind(stage)
        .fetch_one(&self.pool)
        .await?;
        let (attempts, items): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(a.id), COUNT(DISTINCT a.item_id) FROM attempts a \
             JOIN items i ON i.id = a.item_id WHERE i.pipeline = $1 AND i.stage = $2 \
             AND a.state <> 'in_flight'",
        )
        .bind(pipeline)
        .bind(stage)
        .fetch_one(&self.pool)
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
            let sql = format!(
                "WITH c(p, s) AS (SELECT ?, ?), v(k) AS (VALUES {}) \
                 SELECT v.k FROM v WHERE EXISTS (SELECT 1 FROM items i, c WHERE i.pipeline = c.p \
                 AND i.stage = c.s AND i.dedupe_key = v.k AND i.state = 'succeeded')",
                values_sql(chunk.len(), 1)
            );
            let mut q = sqlx::query_scalar::<_, Vec<u8>>(&sql)
                .bind(pipeline)
                .bind(stage);
            for k in chunk {
                q = q.bind(&k[..]);
            }
            for k in q.fetch_all(&self.pool).await? {
                if let Ok(a) = <[u8; 32]>::try_from(k.as_slice()) {
                    out.push(a);
                }
            }
        }
        Ok(out)
    }

    async fn plannable_tokens(&self, pipeline: &str, stage: &str) -> Result<Vec<u64>> {
        let v: Vec<i64> = sqlx::query_scalar(
            "SELECT input_tokens FROM items WHERE pipeline = $1 AND stage = $2 \
             AND state IN ('pending', 'failed')",
        )
        .bind(pipeline)
        .bind(stage)
        .fetch_all(&self.pool)
        .await?;
        Ok(v.into_iter().map(count).collect())
    }

    async fn record_provider_bill(&self, b: &ProviderBill) -> Result<()> {
        sqlx::query(
            "INSERT INTO provider_bills (provider_batch_id, requests, input_tokens, cached_input_tokens, \
             cache_write_tokens, output_tokens, reasoning_tokens, cost_pico, source, recorded_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (provider_batch_id) DO UPDATE SET requests = excluded.requests, \
             input_tokens = excluded.input_tokens, cached_input_tokens = excluded.cached_input_tokens, \
             cache_write_tokens = excluded.cache_write_tokens, output_tokens = excluded.output_tokens, \
             reasoning_tokens = excluded.reasoning_tokens, cost_pico = excluded.cost_pico, \
             source = excluded.source, recorded_at = excluded.recorded_at",
        )
        .bind(&b.provider_batch_id)
        .bind(i64_of(b.requests))
        .bind(i64_of(b.usage.input_tokens))
        .bind(i64_of(b.usage.cached_input_tokens))
        .bind(i64_of(b.usage.cache_write_tokens))
        .bind(i64_of(b.usage.output_tokens))
        .bind(i64_of(b.usage.reasoning_tokens))
        .bind(money_i64(b.cost)?)
        .bind(&b.source)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn provider_bill(&self, provider_batch_id: &str) -> Result<Option<ProviderBill>> {
        let row = sqlx::query(
            "SELECT provider_batch_id, requests, input_tokens, cached_input_tokens, cache_write_tokens, \
             output_tokens, reasoning_tokens, cost_pico, source FROM provider_bills WHERE provider_batch_id = $1",
        )
        .bind(provider_batch_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| ProviderBill {
            provider_batch_id: r.get(0),
            requests: count(r.get(1)),
            usage: Usage {
                input_tokens: count(r.get(2)),
                cached_input_tokens: count(r.get(3)),
                cache_write_tokens: count(r.get(4)),
                output_tokens: count(r.get(5)),
                reasoning_tokens: count(r.get(6)),
            },
            cost: Usd::from_pico(r.get::<i64, _>(7) as i128),
            source: r.get(8),
        }))
    }

    async fn set_run_plan(&self, run_id: &str, plan_json: &str) -> Result<()> {
        sqlx::query("UPDATE runs SET plan_json = $2 WHERE id = $1")
            .bind(run_id)
            .bind(plan_json)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn batch_lines(
        &self,
        batch_id: &str,
        after_attempt_id: i64,
        limit: u32,
    ) -> Result<Vec<BatchLine>> {
        Ok(sqlx::query_as::<_, BatchLine>(
            "SELECT a.id AS attempt_id, a.custom_id, i.shape_id, i.user_json \
             FROM attempts a JOIN items i ON i.id = a.item_id \
             WHERE a.batch_id = $1 AND a.id > $2 ORDER BY a.id LIMIT $3",
        )
        .bind(batch_id)
        .bind(after_attempt_id)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn batch(&self, id: &str) -> Result<Option<BatchRow>> {
        Ok(sqlx::query_as::<_, BatchRow>(&format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn open_batches(&self, pipeline: Option<&str>) -> Result<Vec<BatchRow>> {
        Ok(sqlx::query_as::<_, BatchRow>(&format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE state <> 'ingested' \
             AND ($1 IS NULL OR pipeline = $1) ORDER BY created_at, id"
        ))
        .bind(pipeline)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn run_batches(&self, run_id: &str) -> Result<Vec<BatchRow>> {
        Ok(sqlx::query_as::<_, BatchRow>(&format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE run_id = $1 ORDER BY created_at, id"
        ))
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn plannable_retries(&self, pipeline: &str, stage: &str) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM items WHERE pipeline = $1 AND stage = $2 AND state = 'failed'",
        )
        .bind(pipeline)
        .bind(stage)
        .fetch_one(&self.pool)
        .await?;
        Ok(count(n))
    }

    async fn online_page(&self, batch_id: &str, limit: u32) -> Result<Vec<OnlineLine>> {
        Ok(sqlx::query_as::<_, OnlineLine>(
            "SELECT a.id AS attempt_id, a.item_id, a.attempt_no, a.custom_id, a.state, i.shape_id, \
             i.user_json, i.input_tokens FROM attempts a JOIN items i ON i.id = a.item_id \
             WHERE a.batch_id = $1 AND a.state = 'in_flight' AND a.dispatched_at IS NULL \
             ORDER BY a.id LIMIT $2",
        )
        .bind(batch_id)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn mark_dispatched(&self, attempt_ids: &[i64]) -> Result<()> {
        let now = now_ms();
        let mut tx = self.write_tx().await?;
        for chunk in attempt_ids.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "WITH c(t) AS (SELECT ?), v(id) AS (VALUES {}) \
                 UPDATE attempts SET dispatched_at = (SELECT t FROM c) FROM v \
                 WHERE attempts.id = v.id AND attempts.state = 'in_flight'",
                values_sql(chunk.len(), 1)
            );
            let mut q = sqlx::query(&sql).bind(now);
            for id in chunk {
                q = q.bind(id);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn lose_dispatched(&self, batch_id: &str, max_attempts: u32) -> Result<ApplyStats> {
        let now = now_ms();
        let error = "lost: sent online by a process that ended before recording the answer (it may have been billed)";
        let mut tx = self.write_tx().await?;
        let states: Vec<String> = sqlx::query_scalar(
            "UPDATE items SET \
               state = CASE WHEN items.attempts >= $2 THEN 'exhausted' ELSE 'failed' END, \
               last_error = $3, updated_at = $4 \
             FROM (SELECT item_id, attempt_no FROM attempts WHERE batch_id = $1 AND state = 'in_flight' \
                   AND dispatched_at IS NOT NULL) AS a \
             WHERE items.id = a.item_id AND items.state = 'in_flight' AND items.attempts = a.attempt_no \
             RETURNING items.state",
        )
        .bind(batch_id)
        .bind(max_attempts as i64)
        .bind(error)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let n = sqlx::query(
            "UPDATE attempts SET state = 'failed', verdict = 'lost', error = $2, completed_at = $3 \
             WHERE batch_id = $1 AND state = 'in_flight' AND dispatched_at IS NOT NULL",
        )
        .bind(batch_id)
        .bind(error)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        let exhausted = states.iter().filter(|s| *s == "exhausted").count() as u64;
        Ok(ApplyStats {
            applied: n,
            failed: states.len() as u64 - exhausted,
            exhausted,
            ..Default::default()
        })
    }

    async fn known_provider_ids(&self) -> Result<std::collections::HashSet<String>> {
        let v: Vec<String> = sqlx::query_scalar(
            "SELECT provider_batch_id FROM batches WHERE provider_batch_id IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(v.into_iter().collect())
    }

    async fn update_batch(&self, id: &str, from: &str, u: &BatchUpdate) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE batches SET \
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
               end_state = COALESCE($17, end_state) \
             WHERE id = $1 AND state = $2",
        )
        .bind(id)
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
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn batch_attempts(&self, batch_id: &str) -> Result<Vec<AttemptRef>> {
        Ok(sqlx::query_as::<_, AttemptRef>(
            "SELECT id, item_id, attempt_no, custom_id, state FROM attempts WHERE batch_id = $1 ORDER BY id",
        )
        .bind(batch_id)
        .fetch_all(&self.pool)
        .await?)
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
        let mut tx = self.write_tx().await?;
        for chunk in outcomes.chunks(ROWS_PER_STATEMENT) {
            let sql = cached_sql(&LEDGER, chunk.len(), insert_ledger_sql);
            let mut q = sqlx::query(&sql)
                .bind(&batch.id)
                .bind(&batch.run_id)
                .bind(&batch.pipeline)
                .bind(&batch.stage)
                .bind(&batch.pricing_mode)
                .bind(now);
            for o in chunk {
                q = q
                    .bind(o.custom_id.as_str())
                    .bind(o.attempt_id)
                    .bind(o.model.as_deref().unwrap_or(&batch.model))
                    .bind(i64_of(o.usage.input_tokens))
                    .bind(i64_of(o.usage.cached_input_tokens))
                    .bind(i64_of(o.usage.cache_write_tokens))
                    .bind(i64_of(o.usage.output_tokens))
                    .bind(i64_of(o.usage.reasoning_tokens))
                    .bind(money_i64(o.cost)?)
                    .bind(money_i64(o.standard_cost)?);
            }
            q.execute(&mut *tx).await?;

            let sql = cached_sql(&ATTEMPTS, chunk.len(), update_attempts_sql);
            let mut q = sqlx::query(&sql).bind(now);
            for o in chunk {
                q = q
                    .bind(o.attempt_id)
                    .bind(if o.succeeded { "succeeded" } else { "failed" })
                    .bind(o.verdict.as_str())
                    .bind(o.error.as_deref())
                    .bind(o.finish_reason.as_deref())
                    .bind(o.model.as_deref());
            }
            let applied = q.execute(&mut *tx).await?.rows_affected();
            stats.applied += applied;
            stats.already_applied += chunk.len() as u64 - applied;

            let sql = cached_sql(&ITEMS, chunk.len(), update_items_sql);
            let mut q = sqlx::query(&sql).bind(now).bind(max_attempts as i64);
            for o in chunk {
                q = q
                    .bind(o.item_id)
                    .bind(o.attempt_no)
                    .bind(o.succeeded)
                    .bind(o.result.as_deref())
                    .bind(o.error.as_deref().or(Some(o.verdict.as_str())));
            }
            for row in q.fetch_all(&mut *tx).await? {
                match row.get::<&str, _>(0) {
                    "succeeded" => stats.succeeded += 1,
                    "exhausted" => stats.exhausted += 1,
                    _ => stats.failed += 1,
                }
            }
        }
        tx.commit().await?;
        Ok(stats)
    }

    async fn finish_ingest(
        &self,
        batch_id: &str,
        verdict: &str,
        error: &str,
        max_attempts: u32,
    ) -> Result<ApplyStats> {
        let now = now_ms();
        let mut tx = self.write_tx().await?;
        let states: Vec<String> = sqlx::query_scalar(
            "UPDATE items SET \
               state = CASE WHEN items.attempts >= $2 THEN 'exhausted' ELSE 'failed' END, \
               last_error = $3, updated_at = $4 \
             FROM (SELECT item_id, attempt_no FROM attempts WHERE batch_id = $1 AND state = 'in_flight') AS a \
             WHERE items.id = a.item_id AND items.state = 'in_flight' AND items.attempts = a.attempt_no \
             RETURNING items.state",
        )
        .bind(batch_id)
        .bind(max_attempts as i64)
        .bind(format!("{verdict}: {error}"))
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let n = sqlx::query(
            "UPDATE attempts SET state = 'failed', verdict = $2, error = $3, completed_at = $4 \
             WHERE batch_id = $1 AND state = 'in_flight'",
        )
        .bind(batch_id)
        .bind(verdict)
        .bind(error)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query(
            "UPDATE batches SET state = 'ingested', ingested_at = $2 WHERE id = $1 AND state = 'ended'",
        )
        .bind(batch_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let exhausted = states.iter().filter(|s| *s == "exhausted").count() as u64;
        Ok(ApplyStats {
            applied: n,
            failed: states.len() as u64 - exhausted,
            exhausted,
            ..Default::default()
        })
    }

    async fn record_anomaly(
        &self,
        run_id: Option<&str>,
        batch_id: Option<&str>,
        kind: &str,
        custom_id: Option<&str>,
        detail: &str,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO anomalies (run_id, batch_id, kind, custom_id, detail, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(run_id)
        .bind(batch_id)
        .bind(kind)
        .bind(custom_id)
        .bind(detail)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn run_records(
        &self,
        run_id: &str,
        after_line: i64,
        limit: u32,
    ) -> Result<Vec<RecordResult>> {
        Ok(sqlx::query_as::<_, RecordResult>(
            "SELECT r.line, r.record_id, r.item_id, i.state, i.attempts, i.result, i.last_error \
             FROM records r JOIN items i ON i.id = r.item_id \
             WHERE r.run_id = $1 AND r.line > $2 ORDER BY r.line LIMIT $3",
        )
        .bind(run_id)
        .bind(after_line)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn run_figures(&self, run_id: &str) -> Result<RunFigures> {
        let mut f = RunFigures::default();
        let mut conn = self.pool.acquire().await?;
        f.records_valid = count(
            sqlx::query_scalar("SELECT COUNT(*) FROM records WHERE run_id = $1")
                .bind(run_id)
                .fetch_one(&mut *conn)
                .await?,
        );
        let states: Vec<(String, i64)> = sqlx::query_as(
            "SELECT i.state, COUNT(*) FROM items i \
             WHERE i.id IN (SELECT item_id FROM records WHERE run_id = $1) GROUP BY i.state",
        )
        .bind(run_id)
        .fetch_all(&mut *conn)
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
        f.processed_records = count(
            sqlx::query_scalar(
                "SELECT COUNT(*) FROM records r JOIN items i ON i.id = r.item_id \
                 WHERE r.run_id = $1 AND i.state = 'succeeded'",
            )
            .bind(run_id)
            .fetch_one(&mut *conn)
            .await?,
        );
        let (attempts, attempted, batches): (i64, i64, i64) = sqlx::query_as(
            "SELECT COUNT(a.id), COUNT(DISTINCT a.item_id), \
             (SELECT COUNT(*) FROM batches WHERE run_id = $1) \
             FROM attempts a JOIN batches b ON b.id = a.batch_id WHERE b.run_id = $1",
        )
        .bind(run_id)
        .fetch_one(&mut *conn)
        .await?;
        f.attempts = count(attempts);
        f.items_attempted = count(attempted);
        f.batches = count(batches);
        f.reused = count(
            sqlx::query_scalar(
                "SELECT COUNT(*) FROM items i WHERE i.state = 'succeeded' \
                 AND i.id IN (SELECT item_id FROM records WHERE run_id = $1) \
                 AND NOT EXISTS (SELECT 1 FROM attempts a JOIN batches b ON b.id = a.batch_id \
                                 WHERE a.item_id = i.id AND b.run_id = $1)",
            )
            .bind(run_id)
            .fetch_one(&mut *conn)
            .await?,
        );
        f.ledger = ledger_totals(&mut conn, "run_id", run_id).await?;
        f.answered = count(
            sqlx::query_scalar(
                "SELECT COUNT(*) FROM ledger WHERE output_tokens > 0 \
                 AND batch_id IN (SELECT id FROM batches WHERE run_id = $1)",
            )
            .bind(run_id)
            .fetch_one(&mut *conn)
            .await?,
        );
        f.models = sqlx::query_scalar(
            "SELECT DISTINCT model FROM ledger WHERE batch_id IN (SELECT id FROM batches WHERE run_id = $1) \
             AND (output_tokens > 0 OR input_tokens > 0) ORDER BY model",
        )
        .bind(run_id)
        .fetch_all(&mut *conn)
        .await?;
        Ok(f)
    }

    async fn ledger_totals_for_batch(&self, batch_id: &str) -> Result<LedgerTotals> {
        let mut conn = self.pool.acquire().await?;
        ledger_totals(&mut conn, "batch_id", batch_id).await
    }

    async fn audit(&self, run_id: &str) -> Result<Vec<AuditRow>> {
        Ok(sqlx::query_as::<_, AuditRow>(
            "SELECT i.id AS item_id, i.dedupe_key, i.state AS item_state, \
               (SELECT group_concat(record_id, ',') FROM records r WHERE r.run_id = $1 AND r.item_id = i.id) AS record_ids, \
               a.attempt_no, a.custom_id, a.batch_id, b.provider_batch_id, a.state AS attempt_state, \
               a.verdict, a.error, COALESCE(l.model, a.model) AS model, \
               l.input_tokens, l.cached_input_tokens, l.cache_write_tokens, l.output_tokens, \
               l.reasoning_tokens, l.cost_pico \
             FROM items i JOIN attempts a ON a.item_id = i.id JOIN batches b ON b.id = a.batch_id \
             LEFT JOIN ledger l ON l.attempt_id = a.id \
             WHERE i.id IN (SELECT item_id FROM records WHERE run_id = $1) \
             ORDER BY i.id, a.attempt_no",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn quarantine(&self, run_id: &str) -> Result<Vec<QuarantineRow>> {
        Ok(sqlx::query_as::<_, QuarantineRow>(
            "SELECT source, line, field, reason FROM quarantine WHERE run_id = $1 ORDER BY line",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn anomaly_count(&self, run_id: &str) -> Result<u64> {
        Ok(count(
            sqlx::query_scalar(
                "SELECT COUNT(*) FROM anomalies WHERE run_id = $1 \
                 OR batch_id IN (SELECT id FROM batches WHERE run_id = $1)",
            )
            .bind(run_id)
            .fetch_one(&self.pool)
            .await?,
        ))
    }
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn money_i64(u: Usd) -> Result<i64> {
    u.to_pico_i64()
        .map_err(|_| StoreError::Invalid(format!("amount {u} USD does not fit the ledger")))
}

async fn ledger_totals(
    conn: &mut sqlx::pool::PoolConnection<Sqlite>,
    column: &'static str,
    value: &str,
) -> Result<LedgerTotals> {
    // `column` is one of two fixed names chosen by the caller above, never input.
    let sql = match column {
        "run_id" => {
            "SELECT COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(cached_input_tokens), 0), \
             COALESCE(SUM(cache_write_tokens), 0), COALESCE(SUM(output_tokens), 0), \
             COALESCE(SUM(reasoning_tokens), 0), COALESCE(SUM(cost_pico), 0), \
             COALESCE(SUM(standard_cost_pico), 0) FROM ledger \
             WHERE batch_id IN (SELECT id FROM batches WHERE run_id = $1)"
        }
        _ => {
            "SELECT COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(cached_input_tokens), 0), \
             COALESCE(SUM(cache_write_tokens), 0), COALESCE(SUM(output_tokens), 0), \
             COALESCE(SUM(reasoning_tokens), 0), COALESCE(SUM(cost_pico), 0), \
             COALESCE(SUM(standard_cost_pico), 0) FROM ledger WHERE batch_id = $1"
        }
    };
    let r = sqlx::query(sql).bind(value).fetch_one(&mut **conn).await?;
    Ok(LedgerTotals {
        rows: count(r.get(0)),
        usage: Usage {
            input_tokens: count(r.get(1)),
            cached_input_tokens: count(r.get(2)),
            cache_write_tokens: count(r.get(3)),
            output_tokens: count(r.get(4)),
            reasoning_tokens: count(r.get(5)),
        },
        cost: Usd::from_pico(r.get::<i64, _>(6) as i128),
        standard_cost: Usd::from_pico(r.get::<i64, _>(7) as i128),
    })
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
