//! Ingest: request shapes, and the chunks of records (new items as `pending`) and
//! quarantined lines a run reads, many rows per statement.

use super::*;

/// Binds: pipeline, stage, shape_id, run_id, now; then per row key, body_bytes, input_tokens.
pub(super) fn insert_items_sql(rows: usize) -> String {
    format!(
        "INSERT OR FAIL INTO items (pipeline, stage, shape_id, first_run_id, created_at, updated_at, state, attempts, \
         dedupe_key, body_bytes, input_tokens) \
         SELECT c.p, c.s, c.sh, c.r, c.t, c.t, 'pending', 0, v.column1, v.column2, v.column3 \
         FROM (SELECT ? AS p, ? AS s, ? AS sh, ? AS r, ? AS t) AS c, (VALUES {}) AS v \
         WHERE true ON CONFLICT (pipeline, stage, dedupe_key) DO NOTHING",
        values_sql(rows, 3)
    )
}

/// Binds: pipeline, stage; then per row key, user_json. The prompts of the items just
/// inserted (an item stored before keeps its own: same key, same prompt).
///
/// The item is looked up per row by a scalar subquery, as in [`insert_records_sql`].
pub(super) fn insert_bodies_sql(rows: usize) -> String {
    format!(
        "WITH c(p, s) AS (SELECT ?, ?) \
         INSERT OR FAIL INTO item_bodies (item_id, user_json) \
         SELECT (SELECT i.id FROM items i, c WHERE i.pipeline = c.p AND i.stage = c.s AND i.dedupe_key = v.column1), \
           v.column2 \
         FROM (VALUES {}) AS v \
         WHERE true ON CONFLICT (item_id) DO NOTHING",
        values_sql(rows, 2)
    )
}

/// Inserts the items of `rows` (key, prompt, body bytes, prompt tokens) at the target's
/// stage, new ones `pending`, and their prompts; returns how many items are new.
pub(super) async fn insert_items<'r>(
    tx: &mut Tx,
    t: &IngestTarget<'_>,
    now: i64,
    rows: impl IntoIterator<Item = (&'r [u8], &'r str, u64, u64)>,
) -> Result<u64> {
    static ITEMS: OnceLock<String> = OnceLock::new();
    static BODIES: OnceLock<String> = OnceLock::new();
    let rows: Vec<_> = rows.into_iter().collect();
    let mut new_items = 0;
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut items = q(cached_sql(&ITEMS, chunk.len(), insert_items_sql))
            .bind(t.pipeline)
            .bind(t.stage)
            .bind(t.shape_id)
            .bind(t.run_id)
            .bind(now);
        for (key, _, body_bytes, tokens) in chunk {
            items.push(*key);
            items.push(i64_of(*body_bytes));
            items.push(i64_of(*tokens));
        }
        let added = tx.execute(items).await?;
        new_items += added;
        if added == 0 {
            continue;
        }
        let mut bodies = q(cached_sql(&BODIES, chunk.len(), insert_bodies_sql))
            .bind(t.pipeline)
            .bind(t.stage);
        for (key, user_json, _, _) in chunk {
            bodies.push(*key);
            bodies.push(*user_json);
        }
        tx.execute(bodies).await?;
    }
    Ok(new_items)
}

/// Binds: run_id, pipeline, stage; then per row line, record_id, key, data (a multi-stage
/// pipeline's record fields, else NULL).
///
/// The item is looked up per row by a scalar subquery: written as a join, SQLite's planner
/// may scan every item of the pipeline for each statement.
pub(super) fn insert_records_sql(rows: usize) -> String {
    format!(
        "WITH c(r, p, s) AS (SELECT ?, ?, ?) \
         INSERT OR FAIL INTO records (run_id, line, record_id, item_id, data) \
         SELECT (SELECT r FROM c), v.column1, v.column2, \
           (SELECT i.id FROM items i, c WHERE i.pipeline = c.p AND i.stage = c.s AND i.dedupe_key = v.column3), \
           v.column4 \
         FROM (VALUES {}) AS v \
         WHERE true ON CONFLICT (run_id, line) DO NOTHING",
        values_sql(rows, 4)
    )
}

pub(super) async fn ensure_shape(store: &SqlStore, shape: &RequestShape) -> Result<i64> {
    let mut tx = store.db.begin().await?;
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

pub(super) async fn shape(store: &SqlStore, id: i64) -> Result<RequestShape> {
    let (prefix, suffix): (String, String) = store
        .db
        .one(q("SELECT prefix, suffix FROM shapes WHERE id = $1").bind(id))
        .await?;
    Ok(RequestShape::new(prefix, suffix))
}

/// [`IngestTx`] on either engine: one write transaction.
pub struct SqlIngest(pub(super) Tx);

impl IngestTx for SqlIngest {
    async fn add(
        &mut self,
        target: &IngestTarget<'_>,
        records: &[PreparedRecord],
        quarantined: &[Quarantined],
    ) -> Result<IngestStats> {
        add(&mut self.0, target, records, quarantined).await
    }

    async fn commit(self) -> Result<()> {
        self.0.commit().await
    }
}

async fn add(
    tx: &mut Tx,
    target: &IngestTarget<'_>,
    records: &[PreparedRecord],
    quarantined: &[Quarantined],
) -> Result<IngestStats> {
    static RECORDS: OnceLock<String> = OnceLock::new();
    let IngestTarget {
        run_id,
        pipeline,
        stage,
        source,
        links,
        ..
    } = *target;
    let now = now_ms();
    let mut stats = IngestStats {
        records: records.len() as u64,
        quarantined: quarantined.len() as u64,
        ..Default::default()
    };
    for chunk in records.chunks(ROWS_PER_STATEMENT) {
        stats.new_items += insert_items(
            tx,
            target,
            now,
            chunk.iter().map(|r| {
                (
                    &r.key[..],
                    r.user_json.as_str(),
                    r.body_bytes as u64,
                    r.input_tokens,
                )
            }),
        )
        .await?;
        crate::failpoint!("ingest.mid_tx");

        let mut recs = q(cached_sql(&RECORDS, chunk.len(), insert_records_sql))
            .bind(run_id)
            .bind(pipeline)
            .bind(stage);
        for r in chunk {
            recs.push(r.line as i64);
            recs.push(r.record_id.as_str());
            recs.push(&r.key[..]);
            recs.push(r.data.as_deref());
        }
        tx.execute(recs).await?;
    }
    if links {
        stats.new_items += super::stages::ingest_links(tx, target, now, records).await?;
    }
    for chunk in quarantined.chunks(ROWS_PER_STATEMENT) {
        let mut qq = q(format!(
            "INSERT OR FAIL INTO quarantine (run_id, source, line, field, reason) \
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
    Ok(stats)
}
