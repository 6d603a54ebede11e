//! Online mode: the attempts of a batch still to send, recording that they are about to be
//! sent (write ahead), and failing as `lost` those a dead process sent without recording the
//! answer (docs/design.md, invariant 1).

use super::results::states_to_stats;
use super::*;

pub(super) async fn online_page(
    store: &SqlStore,
    batch_id: &str,
    limit: u32,
) -> Result<Vec<OnlineLine>> {
    store.db
        .all(
            q("SELECT a.id AS attempt_id, a.item_id, a.attempt_no, a.custom_id, a.state, i.shape_id, \
               ib.user_json, i.input_tokens FROM attempts a JOIN items i ON i.id = a.item_id \
               JOIN item_bodies ib ON ib.item_id = a.item_id \
               WHERE a.batch_id = $1 AND a.state = 'in_flight' AND a.dispatched_at IS NULL \
               ORDER BY a.id LIMIT $2")
            .bind(batch_id)
            .bind(limit as i64),
        )
        .await
}

pub(super) async fn mark_dispatched(
    store: &SqlStore,
    batch: &BatchRow,
    attempt_ids: &[i64],
) -> Result<()> {
    let now = now_ms();
    let mut tx = store.db.begin().await?;
    store.fence(&mut tx, &batch.id, batch.lease_token).await?;
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

pub(super) async fn lose_dispatched(
    store: &SqlStore,
    batch: &BatchRow,
    max_attempts: u32,
) -> Result<ApplyStats> {
    let now = now_ms();
    let error = "lost: sent online by a process that ended before recording the answer (it may have been billed)";
    let mut tx = store.db.begin().await?;
    store.fence(&mut tx, &batch.id, batch.lease_token).await?;
    let states: Vec<(ItemState,)> = tx
        .all(
            q("UPDATE OR FAIL items SET \
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
            q("UPDATE OR FAIL attempts SET state = 'failed', verdict = 'lost', error = $2, completed_at = $3 \
               WHERE batch_id = $1 AND state = 'in_flight' AND dispatched_at IS NOT NULL")
            .bind(&batch.id)
            .bind(error)
            .bind(now),
        )
        .await?;
    tx.commit().await?;
    Ok(states_to_stats(n, &states))
}
