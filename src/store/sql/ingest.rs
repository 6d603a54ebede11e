//! Ingest: request shapes, and the chunks of records (new items as `pending`) and
//! quarantined lines a run reads, many rows per statement.

use std::collections::HashMap;

use super::*;

/// PostgreSQL. Binds: pipeline, stage, shape_id, run_id, now; then per row key, body_bytes,
/// input_tokens. Returns the id and key of each item it inserted (not those already stored).
fn insert_items_sql(rows: usize) -> String {
    format!(
        "INSERT OR FAIL INTO items (pipeline, stage, shape_id, first_run_id, created_at, updated_at, state, attempts, \
         dedupe_key, body_bytes, input_tokens) \
         SELECT c.p, c.s, c.sh, c.r, c.t, c.t, 'pending', 0, v.column1, v.column2, v.column3 \
         FROM (SELECT ? AS p, ? AS s, ? AS sh, ? AS r, ? AS t) AS c, (VALUES {}) AS v \
         WHERE true ON CONFLICT (pipeline, stage, dedupe_key) DO NOTHING RETURNING id, dedupe_key",
        values_sql(rows, 3)
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
            // As one packed row (ids, keys in hex), read by [`id_keys`].
            packed_sql(
                &format!(
                    "SELECT id, hex(dedupe_key) AS k FROM items \
                     WHERE pipeline = ? AND stage = ? AND dedupe_key IN ({keys})"
                ),
                &["id", "k"],
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

/// The (id, key) rows of a [`stored_ids_sql`] query.
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
pub(super) async fn insert_items<'r>(
    tx: &mut Tx,
    t: &IngestTarget<'_>,
    now: i64,
    rows: impl IntoIterator<Item = (&'r [u8], &'r str, u64, u64)>,
) -> Result<(u64, Vec<i64>)> {
    let rows: Vec<_> = rows.into_iter().collect();
    match tx.engine() {
        Engine::Sqlite => insert_items_sqlite(tx, t, now, &rows).await,
        Engine::Postgres => insert_items_pg(tx, t, now, &rows).await,
    }
}

/// One row of [`insert_items`]: key, prompt, body bytes, prompt tokens.
type ItemRow<'r> = (&'r [u8], &'r str, u64, u64);

/// Binds: pipeline, stage, shape_id, run_id, now; then per row id, key, body_bytes,
/// input_tokens.
fn insert_items_with_ids_sql(rows: usize) -> String {
    format!(
        "INSERT OR FAIL INTO items (id, pipeline, stage, shape_id, first_run_id, created_at, updated_at, state, \
         attempts, dedupe_key, body_bytes, input_tokens) \
         SELECT v.column1, c.p, c.s, c.sh, c.r, c.t, c.t, 'pending', 0, v.column2, v.column3, v.column4 \
         FROM (SELECT ? AS p, ? AS s, ? AS sh, ? AS r, ? AS t) AS c, (VALUES {}) AS v \
         WHERE true ON CONFLICT (pipeline, stage, dedupe_key) DO NOTHING",
        values_sql(rows, 4)
    )
}

/// SQLite: the rows go into the items' unique index in the order of their keys. The keys
/// are hashes: in the order they come, each lands on a random page of the index, which
/// once the index outgrows the page cache is read, changed and written back for that one
/// key (at a million items, that was most of the ingest's time in the kernel, copying
/// pages). In key order, the keys that share a page are written to it together.
///
/// Each row is given its id before the insert, in the order the rows come, above every
/// stored one (the transaction is the only writer: no other row can take those ids
/// meanwhile): item ids still follow the source's order, so batches are cut in that order. A
/// row whose key is already stored (or came earlier in `rows`) leaves its id unused. The
/// ids present afterwards are the new items; only the other keys are looked up again.
async fn insert_items_sqlite(
    tx: &mut Tx,
    t: &IngestTarget<'_>,
    now: i64,
    rows: &[ItemRow<'_>],
) -> Result<(u64, Vec<i64>)> {
    static ITEMS: OnceLock<String> = OnceLock::new();
    static BODIES: OnceLock<String> = OnceLock::new();
    static STORED: OnceLock<String> = OnceLock::new();
    if rows.is_empty() {
        return Ok((0, Vec::new()));
    }
    let before: i64 = tx
        .scalar(q("SELECT COALESCE(MAX(id), 0) FROM items"))
        .await?;
    // By key, and a key's first row first: that one is inserted, the others find it.
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_unstable_by(|&a, &b| rows[a].0.cmp(rows[b].0).then(a.cmp(&b)));
    let mut inserted = 0;
    for chunk in order.chunks(ROWS_PER_STATEMENT) {
        let mut items = q(cached_sql(&ITEMS, chunk.len(), insert_items_with_ids_sql))
            .bind(t.pipeline)
            .bind(t.stage)
            .bind(t.shape_id)
            .bind(t.run_id)
            .bind(now);
        for &i in chunk {
            let (key, _, body_bytes, tokens) = rows[i];
            items.push(before + 1 + i as i64);
            items.push(key);
            items.push(i64_of(body_bytes));
            items.push(i64_of(tokens));
        }
        inserted += tx.execute(items).await?;
    }

    // Which rows were inserted: the ids present above `before`.
    let mut new_row = vec![false; rows.len()];
    if inserted > 0 {
        let present = packed_sql("SELECT id FROM items WHERE id > $1", &["id"]);
        let (packed,): (Option<String>,) = tx.one(q(present).bind(before)).await?;
        for [id] in unpack::<1>(packed.as_deref())? {
            let slot = usize::try_from(int(id)? - before - 1)
                .ok()
                .and_then(|i| new_row.get_mut(i))
                .ok_or_else(|| {
                    StoreError::Invalid(format!("item {id} was not given by this insert"))
                })?;
            *slot = true;
        }
    }
    let mut by_key: HashMap<&[u8], i64> = HashMap::with_capacity(rows.len());
    let mut new_items = 0u64;
    for (i, row) in rows.iter().enumerate() {
        if new_row[i] {
            by_key.insert(row.0, before + 1 + i as i64);
            new_items += 1;
        }
    }

    // The prompts of the new items, in id order.
    let new: Vec<usize> = (0..rows.len()).filter(|&i| new_row[i]).collect();
    for chunk in new.chunks(ROWS_PER_STATEMENT) {
        let mut bodies = q(cached_sql(&BODIES, chunk.len(), insert_bodies_sql));
        for &i in chunk {
            bodies.push(before + 1 + i as i64);
            bodies.push(rows[i].1);
        }
        tx.execute(bodies).await?;
    }

    // The keys stored before (in key order, once each).
    let mut stored: Vec<&[u8]> = Vec::new();
    for &i in &order {
        let key = rows[i].0;
        if !by_key.contains_key(key) && stored.last() != Some(&key) {
            stored.push(key);
        }
    }
    for chunk in stored.chunks(ROWS_PER_STATEMENT) {
        let sql = cached_sql(&STORED, chunk.len(), |n| stored_ids_sql(n, Engine::Sqlite));
        let mut find = q(sql).bind(t.pipeline).bind(t.stage);
        for key in chunk {
            find.push(*key);
        }
        for (id, key) in id_keys(tx, find).await? {
            if let Ok(i) = chunk.binary_search(&&key[..]) {
                by_key.insert(chunk[i], id);
            }
        }
    }
    let ids = rows
        .iter()
        .map(|(key, ..)| by_key.get(key).copied().ok_or_else(|| not_found(key, t)))
        .collect::<Result<Vec<i64>>>()?;
    Ok((new_items, ids))
}

/// A row of [`insert_items`] whose item is neither new nor stored: a broken invariant.
fn not_found(key: &[u8], t: &IngestTarget<'_>) -> StoreError {
    StoreError::Invalid(format!(
        "item {} of {}/{} was neither inserted nor found",
        hex::encode(key),
        t.pipeline,
        t.stage
    ))
}

/// PostgreSQL: each key is looked up in the items' unique index once, by the insert, which
/// returns the new items; only the keys stored before are looked up again.
async fn insert_items_pg(
    tx: &mut Tx,
    t: &IngestTarget<'_>,
    now: i64,
    rows: &[ItemRow<'_>],
) -> Result<(u64, Vec<i64>)> {
    static ITEMS: OnceLock<String> = OnceLock::new();
    static BODIES: OnceLock<String> = OnceLock::new();
    static STORED: OnceLock<String> = OnceLock::new();
    let mut new_items = 0;
    let mut ids = Vec::with_capacity(rows.len());
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
        let added: Vec<(i64, Vec<u8>)> = tx.all(items).await?;
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
            let sql = cached_sql(&STORED, stored.len(), |n| {
                stored_ids_sql(n, Engine::Postgres)
            });
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
            let (id, _) = by_key.get(key).ok_or_else(|| not_found(key, t))?;
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
    // Every item of the hand-off at once: the store writes their keys in key order.
    let (new_items, ids) = insert_items(
        tx,
        target,
        now,
        records.iter().map(|r| {
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
    for (chunk, ids) in records
        .chunks(ROWS_PER_STATEMENT)
        .zip(ids.chunks(ROWS_PER_STATEMENT))
    {
        let mut recs = q(cached_sql(&RECORDS, chunk.len(), insert_records_sql)).bind(run_id);
        for (r, &id) in chunk.iter().zip(ids) {
            recs.push(r.line as i64);
            recs.push(r.record_id.as_str());
            recs.push(id);
            recs.push(r.data.as_deref());
        }
        tx.execute(recs).await?;
    }
    if links {
        stats.new_items += super::stages::ingest_links(tx, target, now, records, &ids).await?;
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
