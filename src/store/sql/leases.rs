//! Workers and leases: claiming open batches, heartbeats that renew the leases a worker
//! holds, releasing them, and the workers `status` shows (docs/reliability.md B2, B8).

use super::*;

pub(super) async fn claim_batches(store: &SqlStore, claim: &Claim<'_>) -> Result<Vec<BatchRow>> {
    let now = now_ms();
    let expires = now.saturating_add(claim.lease_ms);
    // Batches to take (or to renew: ours, past half their lease). SQLite: one process
    // per store (the run lock), so every open batch is ours to take. PostgreSQL: free,
    // or held under a lease that ran out (or any, by force).
    let take = match (store.engine(), claim.force) {
        (Engine::Sqlite, _) | (Engine::Postgres, true) => {
            "(lease_owner IS NULL OR lease_owner <> $3 OR lease_expires_at IS NULL OR lease_expires_at < $6)"
        }
        (Engine::Postgres, false) => {
            "(lease_owner IS NULL OR lease_expires_at IS NULL OR lease_expires_at < $5 \
              OR (lease_owner = $3 AND lease_expires_at < $6))"
        }
    };
    let renew_before = now.saturating_add(claim.lease_ms / 2);
    store.db
        .execute(
            q(format!(
                "UPDATE batches SET \
                   lease_token = CASE WHEN lease_owner = $3 THEN lease_token ELSE lease_token + 1 END, \
                   lease_owner = $3, lease_expires_at = $4 \
                 WHERE id IN (SELECT id FROM batches WHERE state <> 'ingested' \
                   AND ($1 IS NULL OR pipeline = $1) AND ($2 IS NULL OR id = $2) AND {take} \
                   ORDER BY created_at, id{})",
                store.skip_locked()
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
    store.db
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

pub(super) async fn heartbeat(store: &SqlStore, worker: &WorkerInfo, lease_ms: i64) -> Result<u64> {
    let now = now_ms();
    let mut tx = store.db.begin().await?;
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

pub(super) async fn release_leases(
    store: &SqlStore,
    worker_id: &str,
    stopped: bool,
) -> Result<u64> {
    let now = now_ms();
    let mut tx = store.db.begin().await?;
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

pub(super) async fn workers(store: &SqlStore, seen_since: i64) -> Result<Vec<WorkerRow>> {
    let now = now_ms();
    store.db
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
