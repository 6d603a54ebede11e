//! Batches: reading them, the lines of their input files, the provider ids already
//! tracked, and [`update_batch`], the state-guarded, lease-fenced step from one batch state
//! to the next (docs/reliability.md B2, B5).

use super::*;

pub(super) async fn batch(store: &SqlStore, id: &str) -> Result<Option<BatchRow>> {
    store
        .db
        .optional(q(format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1")).bind(id))
        .await
}

pub(super) async fn open_batches(
    store: &SqlStore,
    pipeline: Option<&str>,
) -> Result<Vec<BatchRow>> {
    store
        .db
        .all(
            q(format!(
                "SELECT {BATCH_COLUMNS} FROM batches WHERE state <> 'ingested' \
                 AND ($1 IS NULL OR pipeline = $1) ORDER BY created_at, id"
            ))
            .bind(pipeline),
        )
        .await
}

pub(super) async fn run_batches(store: &SqlStore, run_id: &str) -> Result<Vec<BatchRow>> {
    store
        .db
        .all(
            q(format!(
                "SELECT {BATCH_COLUMNS} FROM batches WHERE run_id = $1 ORDER BY created_at, id"
            ))
            .bind(run_id),
        )
        .await
}

pub(super) async fn batch_lines(
    store: &SqlStore,
    batch_id: &str,
    after_attempt_id: i64,
    limit: u32,
) -> Result<Vec<BatchLine>> {
    const PAGE: &str = "SELECT a.id AS attempt_id, a.custom_id, i.shape_id, ib.user_json \
        FROM attempts a JOIN items i ON i.id = a.item_id \
        JOIN item_bodies ib ON ib.item_id = a.item_id \
        WHERE a.batch_id = $1 AND a.id > $2 ORDER BY a.id LIMIT $3";
    if store.engine() == Engine::Sqlite {
        // The page as one row ([`packed_sql`]). At most 1,000 lines
        // a page: the packed page is copied several times on its way (SQLite's aggregate, the
        // driver's copy, the lines), and the caller reads on until a page comes back empty.
        let limit = limit.min(1000);
        let (packed,): (Option<String>,) = store
            .db
            .one(
                q(packed_sql(
                    PAGE,
                    &["attempt_id", "custom_id", "shape_id", "user_json"],
                ))
                .bind(batch_id)
                .bind(after_attempt_id)
                .bind(limit as i64),
            )
            .await?;
        let mut lines = unpack::<4>(packed.as_deref())?
            .into_iter()
            .map(|[id, custom_id, shape, user_json]| {
                Ok(BatchLine {
                    attempt_id: int(id)?,
                    custom_id: custom_id.to_string(),
                    shape_id: int(shape)?,
                    user_json: user_json.to_string(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        lines.sort_unstable_by_key(|l| l.attempt_id);
        return Ok(lines);
    }
    store
        .db
        .all(
            q(PAGE)
                .bind(batch_id)
                .bind(after_attempt_id)
                .bind(limit as i64),
        )
        .await
}

pub(super) async fn known_provider_ids(
    store: &SqlStore,
    provider: &str,
) -> Result<HashSet<String>> {
    let v: Vec<(String,)> = store
        .db
        .all(
            q("SELECT provider_batch_id FROM batches WHERE provider = $1 AND provider_batch_id IS NOT NULL")
                .bind(provider),
        )
        .await?;
    Ok(v.into_iter().map(|(s,)| s).collect())
}

pub(super) async fn update_batch(
    store: &SqlStore,
    b: &BatchRow,
    from: BatchState,
    u: &BatchUpdate,
) -> Result<bool> {
    let n = store
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
    let token: Option<(i64,)> = store
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
