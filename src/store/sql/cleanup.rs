//! Clean-up bookkeeping: which ingested batches still have something to delete at the
//! provider or on disk, what of each was deleted already, and closing a batch once nothing
//! of it is left (`batch_cleanup`, `batches.cleaned_at`; `nightshift gc`).

use super::*;

pub(super) async fn cleanup_candidates(
    store: &SqlStore,
    pipeline: &str,
    ingested_before: i64,
) -> Result<Vec<BatchRow>> {
    store
        .db
        .all(
            q(format!(
                "SELECT {BATCH_COLUMNS} FROM batches WHERE pipeline = $1 AND state = 'ingested' \
                 AND cleaned_at IS NULL AND COALESCE(ingested_at, ended_at, created_at) <= $2 \
                 ORDER BY ingested_at, id"
            ))
            .bind(pipeline)
            .bind(ingested_before),
        )
        .await
}

pub(super) async fn cleaned_targets(
    store: &SqlStore,
    batch_id: &str,
) -> Result<Vec<(String, String)>> {
    store
        .db
        .all(
            q("SELECT kind, target FROM batch_cleanup WHERE batch_id = $1 ORDER BY kind, target")
                .bind(batch_id),
        )
        .await
}

pub(super) async fn record_cleaned(
    store: &SqlStore,
    batch_id: &str,
    kind: &str,
    target: &str,
) -> Result<()> {
    store
        .db
        .execute(
            q(
                "INSERT INTO batch_cleanup (batch_id, kind, target, deleted_at) \
               VALUES ($1, $2, $3, $4) ON CONFLICT (batch_id, kind, target) DO NOTHING",
            )
            .bind(batch_id)
            .bind(kind)
            .bind(target)
            .bind(now_ms()),
        )
        .await?;
    Ok(())
}

pub(super) async fn mark_cleaned(store: &SqlStore, batch_id: &str) -> Result<()> {
    store
        .db
        .execute(
            q(
                "UPDATE batches SET cleaned_at = $2 WHERE id = $1 AND state = 'ingested' \
               AND cleaned_at IS NULL",
            )
            .bind(batch_id)
            .bind(now_ms()),
        )
        .await?;
    Ok(())
}
