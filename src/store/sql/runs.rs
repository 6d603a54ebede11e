//! Runs: creating and finishing them, finding them (by id, prefix, recency), their plan,
//! their frozen figures, and pruning the record rows of old runs.

use super::*;

pub(super) const RUN_COLUMNS: &str = "id, pipeline, stage, status, pipeline_file, source_path, output_path, \
    provider, model, pricing_mode, max_attempts, records_read, records_quarantined, host, pid, \
    started_at, finished_at, exit_code, message, budget_pico, max_item_pico, plan_json, worker_id, \
    records_valid, figures_json";

pub(super) async fn create_run(store: &SqlStore, run: &NewRun) -> Result<()> {
    store.db
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

pub(super) async fn set_run_counts(
    store: &SqlStore,
    run_id: &str,
    records_read: u64,
    quarantined: u64,
) -> Result<()> {
    store.db
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

pub(super) async fn finish_run(
    store: &SqlStore,
    run_id: &str,
    status: RunStatus,
    exit_code: i32,
    message: Option<&str>,
) -> Result<()> {
    store.db
        .execute(
            q("UPDATE runs SET status = $2, exit_code = $3, message = $4, finished_at = $5 WHERE id = $1")
                .bind(run_id)
                .bind(status)
                .bind(exit_code as i64)
                .bind(message)
                .bind(now_ms()),
        )
        .await?;
    Ok(())
}

pub(super) async fn run(store: &SqlStore, run_id: &str) -> Result<Option<RunRow>> {
    store
        .db
        .optional(q(format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1")).bind(run_id))
        .await
}

pub(super) async fn mark_stale_runs(store: &SqlStore, stale_before: i64) -> Result<u64> {
    let sql = match store.engine() {
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
    let n = store
        .db
        .execute(q(sql).bind(now_ms()).bind(stale_before))
        .await?;
    // Workers long gone, holding nothing, are history.
    store
        .db
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

pub(super) async fn last_run(store: &SqlStore, pipeline: Option<&str>) -> Result<Option<RunRow>> {
    store
        .db
        .optional(
            q(format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE ($1 IS NULL OR pipeline = $1) \
                 ORDER BY started_at DESC, id DESC LIMIT 1"
            ))
            .bind(pipeline),
        )
        .await
}

pub(super) async fn runs_with_prefix(
    store: &SqlStore,
    prefix: &str,
    limit: u32,
) -> Result<Vec<RunRow>> {
    // A prefix match without LIKE, so `_` and `%` in what the user typed match themselves.
    // PostgreSQL has `substr(text, integer, integer)` only: a length bound as BIGINT made
    // every `--run` there an error.
    store
        .db
        .all(
            q(format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE substr(id, 1, CAST($1 AS INTEGER)) = $2 \
                 ORDER BY started_at DESC, id DESC LIMIT $3"
            ))
            .bind(prefix.chars().count() as i64)
            .bind(prefix)
            .bind(limit as i64),
        )
        .await
}

pub(super) async fn recent_runs(
    store: &SqlStore,
    pipeline: Option<&str>,
    limit: u32,
) -> Result<Vec<RunRow>> {
    store
        .db
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

pub(super) async fn freeze_figures(
    store: &SqlStore,
    run_id: &str,
    figures_json: &str,
) -> Result<()> {
    store
        .db
        .execute(
            q("UPDATE runs SET figures_json = $2 WHERE id = $1")
                .bind(run_id)
                .bind(figures_json),
        )
        .await?;
    Ok(())
}

pub(super) async fn prune_records(store: &SqlStore, pipeline: &str, keep: u32) -> Result<u64> {
    // The pipeline's runs past its newest `keep`, whose figures are frozen.
    let old: Vec<(String,)> = store
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
        store
            .db
            .execute(q("DELETE FROM record_items WHERE run_id = $1").bind(&id))
            .await?;
        n += store
            .db
            .execute(q("DELETE FROM records WHERE run_id = $1").bind(&id))
            .await?;
    }
    Ok(n)
}

pub(super) async fn open_batch_count(store: &SqlStore, run_id: &str) -> Result<u64> {
    Ok(count(
        store
            .db
            .scalar(
                q("SELECT COUNT(*) FROM batches WHERE run_id = $1 AND state <> 'ingested'")
                    .bind(run_id),
            )
            .await?,
    ))
}

pub(super) async fn set_run_plan(store: &SqlStore, run_id: &str, plan_json: &str) -> Result<()> {
    store
        .db
        .execute(
            q("UPDATE runs SET plan_json = $2 WHERE id = $1")
                .bind(run_id)
                .bind(plan_json),
        )
        .await?;
    Ok(())
}
