//! Ingest: request shapes, and the chunks of records (new items as `pending`) and
//! quarantined lines a run reads, many rows per statement.

use std::collections::HashMap;

use super::*;

/// Binds: pipeline, stage, shape_id, run_id, now; then per row key, body_bytes, input_tokens.
/// PostgreSQL's returns the id and key of each item it inserted (not those already stored);
/// SQLite's nothing (see [`insert_items`]).
fn insert_items_sql(rows: usize, returning: bool) -> String {
    format!(
        "INSERT OR FAIL INTO items (pipeline, stage, shape_id, first_run_id, created_at, updated_at, state, attempts, \
         dedupe_key, body_bytes, input_tokens) \
         SELECT c.p, c.s, c.sh, c.r, c.t, c.t, 'pending', 0, v.column1, v.column2, v.column3 \
         FROM (SELECT ? AS p, ? AS s, ? AS sh, ? AS r, ? AS t) AS c, (VALUES {}) AS v \
         WHERE true ON CONFLICT (pipeline, stage, dedupe_key) DO NOTHING{}",
        values_sql(rows, 3),
        if returning {
            " RETURNING id, dedupe_key"
        } else {
            ""
        }
    )
}

/// Binds: per row item id, user_json. The prompts of the items just inserted (an item
/// stored before keeps its own: same key, same prompt).
fn insert_bodies_sql(rows: usize) -> String {
    format!(
        "INSERT OR FAIL INTO item_bodies (item_id, user_json) VALUES {}",
        values_sql(rows, 2)
    )
}

/// Binds: pipeline, stage; then the keys. The id and key of the items of those keys
/// already stored.
///
/// PostgreSQL looks each key up on its own (a lateral sub-query per key, fenced by its
/// `LIMIT`): asked for `dedupe_key IN (…)`, a planner without statistics (the first night:
/// the ingest's own transaction fills the table) expects one row for the pipeline and stage
/// alone, and used the unique index for those two columns only, filtering every item of
/// the stage for the keys. Each look-up grew with the table: 100 ms at 100,000 items, 17 of
/// the 54 seconds of statements of a 100,000-record two-stage run.
fn stored_ids_sql(rows: usize, engine: Engine) -> String {
    match engine {
        Engine::Sqlite => {
            let mut keys = String::with_capacity(rows * 2);
            for i in 0..rows {
                keys.push_str(if i == 0 { "?" } else { ",?" });
            }
            id_key_sql(
                engine,
                &format!("pipeline = ? AND stage = ? AND dedupe_key IN ({keys})"),
            )
        }
        Engine::Postgres => {
            let keys: Vec<String> = (0..rows).map(|i| format!("(${})", i + 3)).collect();
            format!(
                "SELECT i.id, i.dedupe_key FROM (VALUES {}) AS k (key) CROSS JOIN LATERAL \
                 (SELECT id, dedupe_key FROM items \
                  WHERE pipeline = $1 AND stage = $2 AND dedupe_key = k.key LIMIT 1) AS i",
                keys.join(", ")
            )
        }
    }
}

/// The id and key of the items `filter` selects: on SQLite as one packed row (ids, keys in
/// hex), read by [`id_keys`].
fn id_key_sql(engine: Engine, filter: &str) -> String {
    match engine {
        Engine::Sqlite => packed_sql(
            &format!("SELECT id, hex(dedupe_key) AS k FROM items WHERE {filter}"),
            &["id", "k"],
            "id",
        ),
        Engine::Postgres => format!("SELECT id, dedupe_key FROM items WHERE {filter}"),
    }
}

/// The (id, key) rows of an [`id_key_sql`] query.
async fn id_keys(tx: &mut Tx, query: Query<'_>) -> Result<Vec<(i64, Vec<u8>)>> {
    match tx.engine() {
        Engine::Postgres => tx.all(query).await,
        Engine::Sqlite => {
            let (packed,): (Option<String>,) = tx.one(query).await?;
            unpack::<2>(packed.as_deref())?
                .into_iter()
                .map(|[id, key]| {
                    let key = hex::decode(key).map_err(|_| {
                        StoreError::Invalid(format!("a packed row has {key:?} for a key"))
                    })?;
                    Ok((int(id)?, key))
                })
                .collect()
        }
    }
}

/// Inserts the items of `rows` (key, prompt, body bytes, prompt tokens) at the target's
/// stage, new ones `pending`, and their prompts. Returns how many items are new, and the
/// item id of each row, in order.
///
/// Each key is looked up in the items' unique index once, by the insert; then the new
/// items are read back by id, and only the keys stored before are looked up again. On
/// SQLite the new items are those above the largest id before the insert: the transaction
/// is the only writer, and a statement's new rows take ids above every stored one. (Rows
/// returned one by one would each cross from the driver's database thread; the packed
/// read is one row.) PostgreSQL's insert returns them.
pub(super) async fn insert_items<'r>(
    tx: &mut Tx,
    t: &IngestTarget<'_>,
    now: i64,
    rows: impl IntoIterator<Item = (&'r [u8], &'r str, u64, u64)>,
) -> Result<(u64, Vec<i64>)> {
    static ITEMS_SQLITE: OnceLock<String> = OnceLock::new();
    static ITEMS_PG: OnceLock<String> = OnceLock::new();
    static BODIES: OnceLock<String> = OnceLock::new();
    static STORED_SQLITE: OnceLock<String> = OnceLock::new();
    static STORED_PG: OnceLock<String> = OnceLock::new();
    let engine = tx.engine();
    let sqlite = engine == Engine::Sqlite;
    let rows: Vec<_> = rows.into_iter().collect();
    let mut new_items = 0;
    let mut ids = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut items = if sqlite {
            q(cached_sql(&ITEMS_SQLITE, chunk.len(), |n| {
                insert_items_sql(n, false)
            }))
        } else {
            q(cached_sql(&ITEMS_PG, chunk.len(), |n| {
                insert_items_sql(n, true)
            }))
        }
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
        let added: Vec<(i64, Vec<u8>)> = if sqlite {
            let before: i64 = tx
                .scalar(q("SELECT COALESCE(MAX(id), 0) FROM items"))
                .await?;
            if tx.execute(items).await? == 0 {
                Vec::new()
            } else {
                let new = q(id_key_sql(engine, "id > $1")).bind(before);
                id_keys(tx, new).await?
            }
        } else {
            tx.all(items).await?
        };
        new_items += added.len() as u64;
        let mut by_key: HashMap<&[u8], (i64, bool)> = added
            .iter()
            .map(|(id, key)| (&key[..], (*id, true)))
            .collect();

        // The prompts of the new items, once each (a key may come twice in a chunk).
        if !added.is_empty() {
            let mut bodies = q(cached_sql(&BODIES, added.len(), insert_bodies_sql));
            for (key, user_json, _, _) in chunk {
                if let Some((id, unwritten)) = by_key.get_mut(key)
                    && std::mem::take(unwritten)
                {
                    bodies.push(*id);
                    bodies.push(*user_json);
                }
            }
            tx.execute(bodies).await?;
        }

        let mut stored: Vec<&[u8]> = chunk
            .iter()
            .map(|r| r.0)
            .filter(|k| !by_key.contains_key(k))
            .collect();
        let found = if stored.is_empty() {
            Vec::new()
        } else {
            stored.sort_unstable();
            stored.dedup();
            let sql = if sqlite {
                cached_sql(&STORED_SQLITE, stored.len(), |n| stored_ids_sql(n, engine))
            } else {
                cached_sql(&STORED_PG, stored.len(), |n| stored_ids_sql(n, engine))
            };
            let mut find = q(sql).bind(t.pipeline).bind(t.stage);
            for key in &stored {
                find.push(*key);
            }
            id_keys(tx, find).await?
        };
        for (id, key) in &found {
            if let Ok(i) = stored.binary_search(&&key[..]) {
                by_key.insert(stored[i], (*id, false));
            }
        }
        for (key, ..) in chunk {
            let (id, _) = by_key.get(key).ok_or_else(|| {
                StoreError::Invalid(format!(
                    "item {} of {}/{} was neither inserted nor found",
                    hex::encode(key),
                    t.pipeline,
                    t.stage
                ))
            })?;
            ids.push(*id);
        }
    }
    Ok((new_items, ids))
}

/// Binds: run_id; then per row line, record_id, item id, data (a multi-stage pipeline's
/// record fields, else NULL).
fn insert_records_sql(rows: usize) -> String {
    format!(
        "INSERT OR FAIL INTO records (run_id, line, record_id, item_id, data) \
         SELECT c.r, v.column1, v.column2, v.column3, v.column4 \
         FROM (SELECT ? AS r) AS c, (VALUES {}) AS v \
         WHERE true ON CONFLICT (run_id, line) DO NOTHING",
        values_sql(rows, 4)
    )
}

pub(super) async fn ensure_shape(store: &SqlStore, shape: &RequestShape) -> Result<i64> {
    let mut tx = store.db.begin().await?;
    tx.execute(
        q("INSERT INTO shapes (sha256, prefix, suffix) VALUES ($1, $2, $3) ON CONFLICT (sha256) DO NOTHING")
            .bind(&shape.sha256[..])
            .bind(shape.prefix())
            .bind(shape.suffix()),
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
    // The first item of every record, in order: a multi-stage pipeline links them.
    let mut first = Vec::with_capacity(if links { records.len() } else { 0 });
    for chunk in records.chunks(ROWS_PER_STATEMENT) {
        let (new_items, ids) = insert_items(
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
        stats.new_items += new_items;
        crate::failpoint!("ingest.mid_tx");

        let mut recs = q(cached_sql(&RECORDS, chunk.len(), insert_records_sql)).bind(run_id);
        for (r, &id) in chunk.iter().zip(&ids) {
            recs.push(r.line as i64);
            recs.push(r.record_id.as_str());
            recs.push(id);
            recs.push(r.data.as_deref());
        }
        tx.execute(recs).await?;
        if links {
            first.extend(ids);
        }
    }
    if links {
        stats.new_items += super::stages::ingest_links(tx, target, now, records, &first).await?;
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
