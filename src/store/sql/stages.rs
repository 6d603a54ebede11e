//! Stages: a multi-stage pipeline's record → item links. The first stage's links are written
//! at ingest (with the record fields later stages render from); a later stage's
//! links are written as the items it needs succeed ([`ready_records`] finds the records,
//! [`add_links`] stores what the runner rendered). Every write is an insert-or-ignore on a
//! key (the item's dedupe key, the link's (run, line, stage, chunk)), so doing it twice —
//! after a kill, or from two workers at once — changes nothing.

use super::*;
use crate::request::PreparedItem;

/// Binds: run_id, stage; then per row line, chunk, item id.
fn insert_links_sql(rows: usize) -> String {
    format!(
        "INSERT OR FAIL INTO record_items (run_id, line, stage, chunk, item_id) \
         SELECT c.r, v.column1, c.s, v.column2, v.column3 \
         FROM (SELECT ? AS r, ? AS s) AS c, (VALUES {}) AS v \
         WHERE true ON CONFLICT (run_id, line, stage, chunk) DO NOTHING",
        values_sql(rows, 3)
    )
}

/// Binds: per row item id, parent id.
fn insert_parents_sql(rows: usize) -> String {
    format!(
        "INSERT OR FAIL INTO item_parents (item_id, parent_id) VALUES {} \
         ON CONFLICT (item_id, parent_id) DO NOTHING",
        values_sql(rows, 2)
    )
}

/// Binds: run_id, stage; then per row line, error.
fn insert_itemless_links_sql(rows: usize) -> String {
    format!(
        "WITH c(r, s) AS (SELECT ?, ?) \
         INSERT OR FAIL INTO record_items (run_id, line, stage, chunk, item_id, error) \
         SELECT (SELECT r FROM c), v.column1, (SELECT s FROM c), 0, NULL, v.column2 \
         FROM (VALUES {}) AS v \
         WHERE true ON CONFLICT (run_id, line, stage, chunk) DO NOTHING",
        values_sql(rows, 2)
    )
}

/// Inserts `items` of the target's stage (new ones `pending`); returns how many are new and
/// the item id of each, in order.
async fn insert_items(
    tx: &mut Tx,
    t: &IngestTarget<'_>,
    now: i64,
    items: &[&PreparedItem],
) -> Result<(u64, Vec<i64>)> {
    super::ingest::insert_items(
        tx,
        t,
        now,
        items.iter().map(|it| {
            (
                &it.key[..],
                it.user_json.as_str(),
                it.body_bytes as u64,
                it.input_tokens,
            )
        }),
    )
    .await
}

/// Links `(line, chunk, item id)` of the target's stage.
async fn insert_links(tx: &mut Tx, t: &IngestTarget<'_>, links: &[(i64, i64, i64)]) -> Result<()> {
    static LINKS: OnceLock<String> = OnceLock::new();
    for chunk in links.chunks(ROWS_PER_STATEMENT) {
        let mut ins = q(cached_sql(&LINKS, chunk.len(), insert_links_sql))
            .bind(t.run_id)
            .bind(t.stage);
        for (line, c, item) in chunk {
            ins.push(*line);
            ins.push(*c);
            ins.push(*item);
        }
        tx.execute(ins).await?;
    }
    Ok(())
}

/// At ingest (inside its transaction, after the records and their first items, whose ids
/// `first` holds in record order): the first stage's links of every record, and the items
/// of its other chunks.
pub(super) async fn ingest_links(
    tx: &mut Tx,
    t: &IngestTarget<'_>,
    now: i64,
    records: &[crate::request::PreparedRecord],
    first: &[i64],
) -> Result<u64> {
    let more: Vec<&PreparedItem> = records.iter().flat_map(|r| &r.more).collect();
    let (new_items, more_ids) = insert_items(tx, t, now, &more).await?;
    let mut more_ids = more_ids.into_iter();
    let mut links: Vec<(i64, i64, i64)> = Vec::with_capacity(records.len() + more.len());
    for (r, &id) in records.iter().zip(first) {
        links.push((r.line as i64, 0, id));
        for i in 0..r.more.len() {
            let id = more_ids
                .next()
                .ok_or_else(|| StoreError::Invalid("an item of a later chunk has no id".into()))?;
            links.push((r.line as i64, i as i64 + 1, id));
        }
    }
    insert_links(tx, t, &links).await?;
    Ok(new_items)
}

/// Up to `limit` records of the run after line `after_line` that have no link at `stage` yet
/// and whose every link at
/// each of `needs` is final: its item succeeded, or the stage was skipped for the record.
/// Records with a failed needed item are never ready (they failed). In line order, with their
/// links at `needs`.
///
/// The records are read a window of [`READY_WINDOW`] lines at a time, until `limit` are
/// found or the run's last line is passed. Asked for the first `limit` of all the run's
/// records after a line, PostgreSQL without statistics (the first night) read every one of
/// them and sorted them for each page: at 100,000 records a page took 0.4 s, and a million
/// records would have taken hours to advance. A window bounds what one statement reads.
pub(super) async fn ready_records(
    store: &SqlStore,
    run_id: &str,
    stage: &str,
    needs: &[String],
    after_line: i64,
    limit: u32,
) -> Result<Vec<ReadyRecord>> {
    let last_line: Option<i64> = store
        .db
        .scalar(q("SELECT MAX(line) FROM records WHERE run_id = $1").bind(run_id))
        .await?;
    let Some(last_line) = last_line else {
        return Ok(Vec::new());
    };
    if after_line <= 0 && !any_final_link(store, run_id, needs).await? {
        return Ok(Vec::new());
    }
    let sql = record_fields_sql(
        store.engine(),
        &format!(
            "FROM records r WHERE r.line > $3 AND r.line <= $4 AND {} ORDER BY r.line LIMIT $5",
            ready_sql(1, 2, 6, needs.len())
        ),
    );
    let mut rows: Vec<(i64, String, String)> = Vec::new();
    let mut from = after_line;
    while rows.len() < limit as usize && from < last_line {
        let to = from.saturating_add(READY_WINDOW);
        let mut query = q(sql.as_str())
            .bind(run_id)
            .bind(stage)
            .bind(from)
            .bind(to)
            .bind((limit as usize - rows.len()) as i64);
        for s in needs {
            query = query.bind(s.as_str());
        }
        rows.extend(record_fields(store, query).await?);
        from = to;
    }
    with_inputs(store, run_id, needs, rows).await
}

/// Whether any of the run's links at `needs` is final (its item succeeded, or the stage was
/// skipped for the record): a record is ready only once all of its links there are. A pass
/// over the run (`ready_records` from its first line) starts with this one look: on a first
/// night the pass before any result is in finds nothing, and reading every record's links
/// to learn it took 0.21 s at 100,000 records, the look 0.02 s (two stages, SQLite).
async fn any_final_link(store: &SqlStore, run_id: &str, needs: &[String]) -> Result<bool> {
    if needs.is_empty() {
        return Ok(false);
    }
    let sql = format!(
        "SELECT CAST(1 AS BIGINT) FROM record_items x LEFT JOIN items i ON i.id = x.item_id \
         WHERE x.run_id = ? AND x.stage IN ({}) AND x.error IS NULL \
         AND (x.item_id IS NULL OR i.state = 'succeeded') LIMIT 1",
        params(needs.len())
    );
    let query = needs
        .iter()
        .fold(q(sql).bind(run_id), |query, s| query.bind(s.as_str()));
    Ok(store.db.optional::<(i64,)>(query).await?.is_some())
}

/// Of the run's records at `lines` (ascending, at most a few hundred), those ready for
/// `stage` (as [`ready_sql`] judges), in line order, with their links at `needs`: the
/// records an ingested batch's results may have made ready, tested without a pass over the
/// whole run. Their links at `needs` and at `stage` are read in one statement and judged
/// here (a record with a link at `stage` already went on; one with a needed link not final
/// waits), then the fields of those that are ready.
pub(super) async fn ready_records_at(
    store: &SqlStore,
    run_id: &str,
    stage: &str,
    needs: &[String],
    lines: &[i64],
) -> Result<Vec<ReadyRecord>> {
    if lines.is_empty() || needs.is_empty() {
        return Ok(Vec::new());
    }
    let mut with_stage: Vec<String> = needs.to_vec();
    with_stage.push(stage.to_string());
    let links = needed_links(store, run_id, lines, &with_stage).await?;
    let mut ready: Vec<(i64, Vec<LinkRow>)> = Vec::new();
    let mut rest = &links[..];
    while let Some(first) = rest.first() {
        let mine = LinkRow::of_line(rest, first.line);
        rest = &rest[mine.len()..];
        let went_on = mine.iter().any(|l| l.stage == stage);
        let all_final = needs.iter().all(|n| {
            let mut at = mine.iter().filter(|l| &l.stage == n).peekable();
            at.peek().is_some()
                && at.all(|l| {
                    l.error.is_none()
                        && (l.item_id.is_none() || l.state == Some(ItemState::Succeeded))
                })
        });
        if !went_on && all_final {
            let inputs = mine.iter().filter(|l| l.stage != stage).cloned().collect();
            ready.push((first.line, inputs));
        }
    }
    if ready.is_empty() {
        return Ok(Vec::new());
    }
    let ready_lines: Vec<i64> = ready.iter().map(|(line, _)| *line).collect();
    let sql = record_fields_sql(
        store.engine(),
        &format!(
            "FROM records r WHERE r.run_id = ? AND r.line BETWEEN ? AND ? AND {} ORDER BY r.line",
            among(store.engine(), "r.line", ready_lines.len())
        ),
    );
    let query = q(sql)
        .bind(run_id)
        .bind(ready_lines[0])
        .bind(ready_lines[ready_lines.len() - 1]);
    let rows = record_fields(store, bind_among(query, store.engine(), &ready_lines)).await?;
    let mut inputs = ready.into_iter();
    let mut out = Vec::with_capacity(rows.len());
    for (line, record_id, data) in rows {
        let Some((_, mine)) = inputs.by_ref().find(|(l, _)| *l == line) else {
            continue;
        };
        out.push(ReadyRecord {
            line,
            record_id,
            data,
            inputs: mine,
        });
    }
    Ok(out)
}

/// Lines of the run's records linked to an item attempted in `batch_id`, ascending: the
/// records its results may have made ready for a later stage. On SQLite the lines come as
/// one packed row ([`packed_sql`]), sorted and made distinct here: a batch is tens of
/// thousands of lines, each a row handed over from the driver's database thread, and
/// `DISTINCT … ORDER BY` ran SQLite's sorter over all of them (0.19 s for the two batches
/// of 50,000 at 100,000 records through two stages).
pub(super) async fn batch_record_lines(
    store: &SqlStore,
    run_id: &str,
    batch_id: &str,
) -> Result<Vec<i64>> {
    const LINES: &str = "SELECT x.line AS line FROM attempts a \
        JOIN record_items x ON x.item_id = a.item_id WHERE a.batch_id = $1 AND x.run_id = $2";
    if store.engine() == Engine::Sqlite {
        static PACKED: OnceLock<String> = OnceLock::new();
        let sql = PACKED.get_or_init(|| packed_sql(LINES, &["line"]));
        let (packed,): (Option<String>,) = store
            .db
            .one(q(sql.as_str()).bind(batch_id).bind(run_id))
            .await?;
        let mut lines = unpack::<1>(packed.as_deref())?
            .into_iter()
            .map(|[line]| int(line))
            .collect::<Result<Vec<i64>>>()?;
        lines.sort_unstable();
        lines.dedup();
        return Ok(lines);
    }
    let rows: Vec<(i64,)> = store
        .db
        .all(
            q("SELECT DISTINCT x.line FROM attempts a JOIN record_items x ON x.item_id = a.item_id \
               WHERE a.batch_id = $1 AND x.run_id = $2 ORDER BY x.line")
            .bind(batch_id)
            .bind(run_id),
        )
        .await?;
    Ok(rows.into_iter().map(|(l,)| l).collect())
}

/// `?, ?, …` for `n` anonymous parameters. A statement with hundreds of parameters takes
/// them anonymous, in order: SQLite looks a named one (`$n`) up in a list as it is bound,
/// and binding every one of hundreds that way costs more than the lookups themselves.
fn params(n: usize) -> String {
    let mut s = String::with_capacity(n * 3);
    for i in 0..n {
        if i > 0 {
            s.push_str(", ");
        }
        s.push('?');
    }
    s
}

/// `column` is one of `n` values ([`bind_among`] binds them): on SQLite a list of
/// anonymous parameters, on PostgreSQL one array (a list of hundreds is slower to plan and
/// to run there).
pub(super) fn among(engine: Engine, column: &str, n: usize) -> String {
    match engine {
        Engine::Sqlite => format!("{column} IN ({})", params(n)),
        Engine::Postgres => format!("{column} = ANY(?)"),
    }
}

/// Binds the values of an [`among`].
pub(super) fn bind_among<'a>(query: Query<'a>, engine: Engine, values: &'a [i64]) -> Query<'a> {
    match engine {
        Engine::Sqlite => values.iter().fold(query, |q, v| q.bind(*v)),
        Engine::Postgres => query.bind(values),
    }
}

/// Ready records (line, id, fields, in line order) with their links at `needs`.
async fn with_inputs(
    store: &SqlStore,
    run_id: &str,
    needs: &[String],
    rows: Vec<(i64, String, String)>,
) -> Result<Vec<ReadyRecord>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let lines: Vec<i64> = rows.iter().map(|r| r.0).collect();
    let links = needed_links(store, run_id, &lines, needs).await?;
    let mut out = Vec::with_capacity(rows.len());
    for (line, record_id, data) in rows {
        let inputs = LinkRow::of_line(&links, line).to_vec();
        out.push(ReadyRecord {
            line,
            record_id,
            data,
            inputs,
        });
    }
    Ok(out)
}

/// Lines of records one statement of [`ready_records`] reads at most.
const READY_WINDOW: i64 = 2_000;

/// The condition on a record `r` of being ready for a stage: of run `$run`, no link at stage
/// `$stage` yet, and every link at each of the `needs` stages (bound from `$first_need` on)
/// final: its item succeeded, or the stage was skipped for the record.
///
/// Each test is a scalar subquery (`… LIMIT 1) IS NULL`), not `[NOT] EXISTS`: PostgreSQL
/// turns those into joins that read every link of the run's stage, whatever few records
/// the statement asks about; a scalar subquery stays a lookup per record on either engine.
fn ready_sql(run: usize, stage: usize, first_need: usize, needs: usize) -> String {
    let mut sql = format!(
        "r.run_id = ${run} \
         AND (SELECT 1 FROM record_items x WHERE x.run_id = r.run_id AND x.line = r.line AND x.stage = ${stage} LIMIT 1) IS NULL"
    );
    for n in first_need..first_need + needs {
        sql.push_str(&format!(
            " AND (SELECT 1 FROM record_items x WHERE x.run_id = r.run_id AND x.line = r.line AND x.stage = ${n} LIMIT 1) IS NOT NULL \
              AND (SELECT 1 FROM record_items x LEFT JOIN items i ON i.id = x.item_id \
                WHERE x.run_id = r.run_id AND x.line = r.line AND x.stage = ${n} \
                AND (x.error IS NOT NULL OR (x.item_id IS NOT NULL AND i.state <> 'succeeded')) LIMIT 1) IS NULL"
        ));
    }
    sql
}

/// Whether the pipeline's work for the run is at rest, read in one statement (one snapshot
/// on either engine): no batch of the pipeline open, no item of its stages waiting for an
/// attempt, no record of the run ready for a later stage, and no failed review waiting to
/// be sent again. Each can change between separate reads while other workers plan, ingest
/// and advance (the last results coming in and going on to a later stage); at one snapshot
/// with all four empty nothing is left that could start again, so the run may end.
pub(super) async fn settled(
    store: &SqlStore,
    run_id: &str,
    work: &PipelineWork<'_>,
) -> Result<bool> {
    let mut sql = String::from(
        "SELECT (SELECT COUNT(*) FROM batches WHERE pipeline = $1 AND state <> 'ingested')",
    );
    let stage_params: Vec<String> = (3..3 + work.stages.len())
        .map(|i| format!("${i}"))
        .collect();
    let mut n = 3 + work.stages.len();
    if !stage_params.is_empty() {
        sql.push_str(&format!(
            " + (SELECT COUNT(*) FROM items WHERE pipeline = $1 AND stage IN ({}) \
               AND state IN ('pending', 'failed'))",
            stage_params.join(", ")
        ));
    }
    for later in work.later {
        sql.push_str(&format!(
            " + (CASE WHEN EXISTS (SELECT 1 FROM records r WHERE {}) THEN 1 ELSE 0 END)",
            ready_sql(2, n, n + 1, later.needs.len())
        ));
        n += 1 + later.needs.len();
    }
    for _ in work.regenerate {
        sql.push_str(&format!(
            " + (CASE WHEN EXISTS ({}) THEN 1 ELSE 0 END)",
            failed_reviews_sql(store.engine(), 2, n, n + 1)
        ));
        n += 2;
    }
    let mut query = q(sql).bind(work.pipeline).bind(run_id);
    for s in work.stages {
        query = query.bind(*s);
    }
    for later in work.later {
        query = query.bind(later.stage);
        for need in later.needs {
            query = query.bind(need.as_str());
        }
    }
    for (review, reviewed) in work.regenerate {
        query = query.bind(*review).bind(*reviewed);
    }
    let busy: i64 = store.db.scalar(query).await?;
    Ok(busy == 0)
}

/// The lines of run `$1`'s records done at stage `$2`: linked there, and every link an
/// item that succeeded or a skip. One pass over the run's links grouped by record (their
/// key order); it replaced two look-ups into the links per record of the run: at 100,000
/// records of two stages the worksheet's counts took 0.04 s instead of 0.18 s (SQLite's
/// statement log), 0.14 s instead of 0.64 s on a fresh PostgreSQL database.
const STAGE_DONE_LINES: &str = "SELECT x.line FROM record_items x \
    LEFT JOIN items i ON i.id = x.item_id \
    WHERE x.run_id = $1 AND x.stage = $2 GROUP BY x.line \
    HAVING SUM(CASE WHEN x.error IS NOT NULL \
      OR (x.item_id IS NOT NULL AND i.state <> 'succeeded') THEN 1 ELSE 0 END) = 0";

/// Ids of the run's records whose every link at `stage` succeeded or is a skip.
pub(super) async fn stage_done_records(
    store: &SqlStore,
    run_id: &str,
    stage: &str,
) -> Result<Vec<String>> {
    let rows: Vec<(String,)> = store
        .db
        .all(
            q(format!(
                "SELECT r.record_id FROM ({STAGE_DONE_LINES}) AS d \
                 JOIN records r ON r.run_id = $1 AND r.line = d.line"
            ))
            .bind(run_id)
            .bind(stage),
        )
        .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// How many of the run's records are done at `stage` (as [`stage_done_records`] judges).
/// The worksheet counts each stage once at the start of a run.
pub(super) async fn stage_done_count(store: &SqlStore, run_id: &str, stage: &str) -> Result<u64> {
    let n: i64 = store
        .db
        .scalar(
            q(format!("SELECT COUNT(*) FROM ({STAGE_DONE_LINES}) AS d"))
                .bind(run_id)
                .bind(stage),
        )
        .await?;
    Ok(count(n))
}

/// The run's links at `stage` and its distinct items there (prompt tokens, how many succeeded).
pub(super) async fn run_stage_items(
    store: &SqlStore,
    run_id: &str,
    stage: &str,
) -> Result<StageItems> {
    let links: i64 = store
        .db
        .scalar(
            q("SELECT COUNT(*) FROM record_items WHERE run_id = $1 AND stage = $2 AND item_id IS NOT NULL")
                .bind(run_id)
                .bind(stage),
        )
        .await?;
    // The distinct items, by prompt tokens, and how many of them succeeded: one pass.
    let tokens: Vec<(i64, i64, i64)> = store
        .db
        .all(
            q(
                "SELECT i.input_tokens, COUNT(*), \
                 CAST(COALESCE(SUM(CASE WHEN i.state = 'succeeded' THEN 1 ELSE 0 END), 0) AS BIGINT) \
                 FROM items i WHERE i.id IN \
               (SELECT item_id FROM record_items WHERE run_id = $1 AND stage = $2) \
               GROUP BY i.input_tokens",
            )
            .bind(run_id)
            .bind(stage),
        )
        .await?;
    let succeeded = tokens.iter().map(|t| count(t.2)).sum();
    let tokens = tokens.into_iter().map(|(t, n, _)| (t, n)).collect();
    Ok(StageItems {
        links: count(links),
        succeeded,
        tokens: super::planning::token_counts(tokens),
    })
}

/// A page of the run's records with their stored fields.
pub(super) async fn run_record_data(
    store: &SqlStore,
    run_id: &str,
    after_line: i64,
    limit: u32,
) -> Result<Vec<(i64, String, String)>> {
    records_page(
        store,
        "SELECT line, record_id, COALESCE(data, '{}') FROM records \
         WHERE run_id = $1 AND line > $2",
        "line",
        run_id,
        after_line,
        limit,
    )
    .await
}

/// A page of the run's records: line and id.
pub(super) async fn run_record_ids(
    store: &SqlStore,
    run_id: &str,
    after_line: i64,
    limit: u32,
) -> Result<Vec<(i64, String)>> {
    if store.engine() == Engine::Sqlite {
        return record_ids_after(store, run_id, after_line, limit).await;
    }
    records_page(
        store,
        "SELECT line, record_id FROM records WHERE run_id = $1 AND line > $2",
        "line",
        run_id,
        after_line,
        limit,
    )
    .await
}

/// The statement reading records `r` (line, id, fields) `from_where` names (its `FROM …
/// WHERE … ORDER BY`), for [`record_fields`]. On SQLite as one packed row ([`packed_sql`]):
/// a page of records was a row per record handed over from the driver's database thread,
/// and each hand-off woke this one (futex calls of a two-stage run at 20,000 records:
/// 43,500, against 5,700 for one stage, whose reads were packed already). The record id is
/// free text, so it comes hex-encoded; the fields are JSON, whose strings escape every
/// control character, and come last.
fn record_fields_sql(engine: Engine, from_where: &str) -> String {
    let page = format!(
        "SELECT r.line AS line, hex(r.record_id) AS rid, COALESCE(r.data, '{{}}') AS data {from_where}"
    );
    match engine {
        Engine::Sqlite => packed_sql(&page, &["line", "rid", "data"]),
        Engine::Postgres => {
            format!("SELECT r.line, r.record_id, COALESCE(r.data, '{{}}') {from_where}")
        }
    }
}

/// The records (line, id, fields) a [`record_fields_sql`] query reads, in line order.
async fn record_fields(store: &SqlStore, query: Query<'_>) -> Result<Vec<(i64, String, String)>> {
    if store.engine() == Engine::Postgres {
        return store.db.all(query).await;
    }
    let (packed,): (Option<String>,) = store.db.one(query).await?;
    let mut rows = unpack::<3>(packed.as_deref())?
        .into_iter()
        .map(|[line, rid, data]| Ok((int(line)?, unhex(rid)?, data.to_string())))
        .collect::<Result<Vec<_>>>()?;
    rows.sort_unstable_by_key(|r| r.0);
    Ok(rows)
}

/// SQLite: up to `limit` of the run's records after line `after_line` (line and id), in
/// line order, as one packed row (see [`record_fields_sql`]). (The records' fields for the
/// results file stay a row each: a page of them could pass SQLite's limit on one text
/// value, 10⁹ bytes.)
async fn record_ids_after(
    store: &SqlStore,
    run_id: &str,
    after_line: i64,
    limit: u32,
) -> Result<Vec<(i64, String)>> {
    static PACKED: OnceLock<String> = OnceLock::new();
    let sql = PACKED.get_or_init(|| {
        packed_sql(
            "SELECT r.line AS line, hex(r.record_id) AS rid FROM records r \
             WHERE r.run_id = $1 AND r.line > $2 ORDER BY r.line LIMIT $3",
            &["line", "rid"],
        )
    });
    let (packed,): (Option<String>,) = store
        .db
        .one(
            q(sql.as_str())
                .bind(run_id)
                .bind(after_line)
                .bind(limit as i64),
        )
        .await?;
    let mut rows = unpack::<2>(packed.as_deref())?
        .into_iter()
        .map(|[line, rid]| Ok((int(line)?, unhex(rid)?)))
        .collect::<Result<Vec<_>>>()?;
    rows.sort_unstable_by_key(|r| r.0);
    Ok(rows)
}

/// Up to `limit` rows of `head` (a query on the run's records, binds `$1` the run and `$2`
/// the line after which the page starts) in the order of `line` (its line column), none
/// only once the run's last record is passed.
///
/// PostgreSQL reads a window of `limit` lines at a time (lines are dense: a record's
/// source line), until it finds a row or passes the run's last line. Asked for the first
/// `limit` records after a line, a planner without statistics (a first night: the worksheet
/// reads every record right after the ingest) expected a few hundred rows, read every
/// record after the line and sorted them on disk for each page: 0.14 s a page of 5,000 at
/// 100,000 records, and the pages of a run grow with it, so the whole read grew with the
/// square of its records.
pub(super) async fn records_page<T: crate::store::db::Decode>(
    store: &SqlStore,
    head: &str,
    line: &str,
    run_id: &str,
    after_line: i64,
    limit: u32,
) -> Result<Vec<T>> {
    if store.engine() == Engine::Sqlite {
        return store
            .db
            .all(
                q(format!("{head} ORDER BY {line} LIMIT $3"))
                    .bind(run_id)
                    .bind(after_line)
                    .bind(limit as i64),
            )
            .await;
    }
    let sql = format!("{head} AND {line} <= $4 ORDER BY {line} LIMIT $3");
    let mut from = after_line;
    // Twice as wide after each empty window: a run of lines without records (quarantined,
    // or blank) costs a few statements, not one per `limit` lines. The run's last line is
    // read once a window comes back empty.
    let mut window = i64::from(limit.max(1));
    let mut last = None;
    loop {
        let upto = from.saturating_add(window);
        let rows: Vec<T> = store
            .db
            .all(
                q(sql.as_str())
                    .bind(run_id)
                    .bind(from)
                    .bind(limit as i64)
                    .bind(upto),
            )
            .await?;
        if !rows.is_empty() {
            return Ok(rows);
        }
        let end = match last {
            Some(end) => end,
            None => {
                let end: i64 = store
                    .db
                    .scalar(
                        q("SELECT COALESCE(MAX(line), 0) FROM records WHERE run_id = $1")
                            .bind(run_id),
                    )
                    .await?;
                last = Some(end);
                end
            }
        };
        if upto >= end {
            return Ok(Vec::new());
        }
        from = upto;
        window = window.saturating_mul(2);
    }
}

/// The links at `needs` of the run's records at `lines` (ascending), with their items' states
/// and results: what rendering a later stage reads. The range of the lines is given too:
/// PostgreSQL without statistics (a first night) takes a list of hundreds of lines for a
/// large share of the run and joins every item and result to it (a quarter of a second a
/// page at 30,000 records); a range tells it the page is small. What each item cost and
/// how many records share it are not (0): every process advancing after every batch would
/// pay for those figures, which only the results file and the reports need.
async fn needed_links(
    store: &SqlStore,
    run_id: &str,
    lines: &[i64],
    needs: &[String],
) -> Result<Vec<LinkRow>> {
    if needs.is_empty() || lines.is_empty() {
        return Ok(Vec::new());
    }
    let filter = format!(
        "x.run_id = ? AND x.line BETWEEN ? AND ? AND x.stage IN ({}) AND {}",
        params(needs.len()),
        among(store.engine(), "x.line", lines.len())
    );
    let sql = links_sql(store.engine(), "0", "0", &filter);
    let mut query = q(sql)
        .bind(run_id)
        .bind(lines[0])
        .bind(lines[lines.len() - 1]);
    for s in needs {
        query = query.bind(s.as_str());
    }
    read_links(store, bind_among(query, store.engine(), lines)).await
}

/// A page of links ([`LinkRow`]): `record_items x` with its item `i` and answer `ir`, where
/// `filter`, in line, stage and chunk order; `cost` and `sharers` are the SQL of those two
/// columns. On SQLite as one packed row ([`packed_sql`], read and put in that
/// order by [`read_links`]): a page is thousands of links, each a hand-off from the driver's
/// database thread as a row of its own. The stage name and the errors are free text, so they
/// come hex-encoded; a NULL is an empty field, any other value of a nullable column is
/// prefixed with `v`.
fn links_sql(engine: Engine, cost: &str, sharers: &str, filter: &str) -> String {
    const FROM: &str = "FROM record_items x LEFT JOIN items i ON i.id = x.item_id \
        LEFT JOIN item_results ir ON ir.item_id = x.item_id";
    match engine {
        Engine::Sqlite => packed_printf_sql(
            &format!(
                "SELECT x.line AS line, hex(x.stage) AS st, x.chunk AS chunk, \
                 COALESCE('v' || x.item_id, '') AS item, COALESCE('v' || i.state, '') AS state, \
                 COALESCE('v' || i.attempts, '') AS att, \
                 CASE WHEN i.last_error IS NULL THEN '' ELSE 'v' || hex(i.last_error) END AS lerr, \
                 CASE WHEN x.error IS NULL THEN '' ELSE 'v' || hex(x.error) END AS xerr, \
                 {cost} AS cost, {sharers} AS sharers, COALESCE('v' || ir.result, '') AS res \
                 {FROM} WHERE {filter}"
            ),
            &[
                "line", "st", "chunk", "item", "state", "att", "lerr", "xerr", "cost", "sharers",
                "res",
            ],
        ),
        Engine::Postgres => format!(
            "SELECT x.line, x.stage, x.chunk, x.item_id, i.state, i.attempts, ir.result, \
             i.last_error, x.error, CAST({cost} AS BIGINT) AS cost_pico, \
             CAST({sharers} AS BIGINT) AS sharers \
             {FROM} WHERE {filter} ORDER BY x.line, x.stage, x.chunk"
        ),
    }
}

/// The links a [`links_sql`] query reads, in line, stage and chunk order (on SQLite sorted
/// here, stage names byte by byte as SQLite compares them: a range of the primary key reads
/// them in that order already, so the sort costs next to nothing).
async fn read_links(store: &SqlStore, query: Query<'_>) -> Result<Vec<LinkRow>> {
    if store.engine() == Engine::Postgres {
        return store.db.all(query).await;
    }
    let (packed,): (Option<String>,) = store.db.one(query).await?;
    fn opt(field: &str) -> Option<&str> {
        field.strip_prefix('v')
    }
    let opt_int = |f: &str| opt(f).map(int).transpose();
    let mut links = unpack::<11>(packed.as_deref())?
        .into_iter()
        .map(
            |[
                line,
                stage,
                chunk,
                item,
                state,
                att,
                lerr,
                xerr,
                cost,
                sharers,
                res,
            ]| {
                Ok(LinkRow {
                    line: int(line)?,
                    stage: unhex(stage)?,
                    chunk: int(chunk)?,
                    item_id: opt_int(item)?,
                    state: opt(state).map(named).transpose()?,
                    attempts: opt_int(att)?,
                    result: opt(res).map(str::to_string),
                    last_error: opt(lerr).map(unhex).transpose()?,
                    error: opt(xerr).map(unhex).transpose()?,
                    cost_pico: int(cost)?,
                    sharers: int(sharers)?,
                })
            },
        )
        .collect::<Result<Vec<LinkRow>>>()?;
    links.sort_by(|a, b| {
        (a.line, a.stage.as_bytes(), a.chunk).cmp(&(b.line, b.stage.as_bytes(), b.chunk))
    });
    Ok(links)
}

/// Every link of the run's records from `first` to `last` (lines), with its item's state,
/// result, what its attempts cost (in any run, as its attempt count counts them) and, with
/// `sharers`, how many of the run's records share it (else 0).
///
/// The sharers count starts from the item's links and filters the run in the count: a planner
/// without statistics (a fresh PostgreSQL store: a first night, every test) otherwise ANDs in
/// the run's whole key range for every link, and a page of links took seconds, not
/// milliseconds.
pub(super) async fn links_between(
    store: &SqlStore,
    run_id: &str,
    first: i64,
    last: i64,
    sharers: bool,
) -> Result<Vec<LinkRow>> {
    let sharers = if sharers {
        "(SELECT COUNT(*) FILTER (WHERE y.run_id = x.run_id) FROM record_items y \
           WHERE y.item_id = x.item_id)"
    } else {
        "0"
    };
    let cost = "COALESCE((SELECT SUM(l.cost_pico) FROM ledger l JOIN attempts a ON a.id = l.attempt_id \
        WHERE a.item_id = x.item_id), 0)";
    let sql = links_sql(
        store.engine(),
        cost,
        sharers,
        "x.run_id = $1 AND x.line BETWEEN $2 AND $3",
    );
    read_links(store, q(sql).bind(run_id).bind(first).bind(last)).await
}

/// Stores what a later stage became for each record: its items (new ones `pending`) and
/// links, the items they were rendered from, or a link saying it was skipped or failed.
/// Returns how many new items were created.
pub(super) async fn add_links(
    store: &SqlStore,
    t: &IngestTarget<'_>,
    links: &[NewLinks],
) -> Result<u64> {
    let now = now_ms();
    let mut tx = store.db.begin().await?;
    let links = still_decided(&mut tx, links).await?;
    let mut items: Vec<&PreparedItem> = Vec::new();
    // Per item: its record's line and chunk, and the parents it was rendered from.
    let mut placed: Vec<(i64, i64, &[i64])> = Vec::new();
    let mut itemless: Vec<(i64, Option<&str>)> = Vec::new();
    for l in &links {
        match &l.link {
            StageLink::Items { items: its } => {
                for (c, it) in its.iter().enumerate() {
                    items.push(it);
                    placed.push((l.line, c as i64, &l.parents));
                }
            }
            StageLink::Skipped => itemless.push((l.line, None)),
            StageLink::Failed(why) => itemless.push((l.line, Some(why.as_str()))),
        }
    }
    let (new_items, ids) = insert_items(&mut tx, t, now, &items).await?;
    let item_links: Vec<(i64, i64, i64)> = placed
        .iter()
        .zip(&ids)
        .map(|(&(line, c, _), &id)| (line, c, id))
        .collect();
    insert_links(&mut tx, t, &item_links).await?;
    for chunk in itemless.chunks(ROWS_PER_STATEMENT) {
        static ITEMLESS: OnceLock<String> = OnceLock::new();
        let mut ins = q(cached_sql(
            &ITEMLESS,
            chunk.len(),
            insert_itemless_links_sql,
        ))
        .bind(t.run_id)
        .bind(t.stage);
        for (line, error) in chunk {
            ins.push(*line);
            ins.push(*error);
        }
        tx.execute(ins).await?;
    }
    let parents: Vec<(i64, i64)> = placed
        .iter()
        .zip(&ids)
        .flat_map(|(&(_, _, ps), &id)| ps.iter().map(move |&p| (id, p)))
        .collect();
    for chunk in parents.chunks(ROWS_PER_STATEMENT) {
        static PARENTS: OnceLock<String> = OnceLock::new();
        let mut ins = q(cached_sql(&PARENTS, chunk.len(), insert_parents_sql));
        for (item, parent) in chunk {
            ins.push(*item);
            ins.push(*parent);
        }
        tx.execute(ins).await?;
    }
    tx.commit().await?;
    Ok(new_items)
}

/// The links whose parents are all still succeeded. An item a failed review sent again
/// (`regenerate`, maybe by another worker since the records were read) is not, and links
/// decided from its old answer are left out: the record is advanced again once it succeeds.
/// Inside the write transaction: SQLite's writer lock (`BEGIN IMMEDIATE`) covers it, and
/// PostgreSQL locks the parents, so a regeneration waits for this transaction and then
/// removes what it stored.
async fn still_decided<'a>(tx: &mut Tx, links: &'a [NewLinks]) -> Result<Vec<&'a NewLinks>> {
    let mut parents: Vec<i64> = links
        .iter()
        .flat_map(|l| l.parents.iter().copied())
        .collect();
    parents.sort_unstable();
    parents.dedup();
    // PostgreSQL locks every parent read, so each is read; on SQLite only the stale ones
    // (usually none) come back.
    let (filter, lock) = match tx.engine() {
        Engine::Postgres => ("", " FOR SHARE"),
        Engine::Sqlite => (" AND state <> 'succeeded'", ""),
    };
    let mut stale: HashSet<i64> = HashSet::new();
    for chunk in parents.chunks(ROWS_PER_STATEMENT) {
        let query = q(format!(
            "SELECT id, state FROM items WHERE {}{filter} ORDER BY id{lock}",
            among(tx.engine(), "id", chunk.len())
        ));
        let states: Vec<(i64, ItemState)> = tx.all(bind_among(query, tx.engine(), chunk)).await?;
        stale.extend(
            states
                .into_iter()
                .filter(|(_, s)| *s != ItemState::Succeeded)
                .map(|(id, _)| id),
        );
    }
    Ok(links
        .iter()
        .filter(|l| !l.parents.iter().any(|p| stale.contains(p)))
        .collect())
}

/// Items of stage `reviewed` that a review at stage `review` failed (`"pass": false`) for a
/// record of the run, and that were never sent again for a failed review: with the failing
/// review's result.
pub(super) async fn failed_reviews(
    store: &SqlStore,
    run_id: &str,
    review: &str,
    reviewed: &str,
) -> Result<Vec<(i64, String)>> {
    store
        .db
        .all(
            q(failed_reviews_sql(store.engine(), 1, 2, 3))
                .bind(run_id)
                .bind(review)
                .bind(reviewed),
        )
        .await
}

/// The items of stage `$reviewed` whose review at stage `$review` for a record of run `$run`
/// says `"pass": false` and that were never regenerated, with the review's result. Results
/// are stored as compact JSON: the `LIKE` narrows, and only what it lets through is parsed
/// (in a `CASE`, so no other result is ever parsed) to decide.
fn failed_reviews_sql(engine: Engine, run: usize, review: usize, reviewed: usize) -> String {
    let pass_false = match engine {
        Engine::Sqlite => {
            "CASE WHEN rr.result LIKE '%\"pass\":false%' AND json_valid(rr.result) \
             THEN json_type(rr.result, '$.pass') = 'false' ELSE 0 END"
        }
        Engine::Postgres => {
            "CASE WHEN rr.result LIKE '%\"pass\":false%' \
             THEN (rr.result::jsonb -> 'pass') = 'false'::jsonb ELSE false END"
        }
    };
    format!(
        "SELECT DISTINCT t.item_id, rr.result FROM record_items x \
         JOIN items ri ON ri.id = x.item_id \
         JOIN item_results rr ON rr.item_id = x.item_id \
         JOIN record_items t ON t.run_id = x.run_id AND t.line = x.line AND t.stage = ${reviewed} \
         JOIN items ti ON ti.id = t.item_id \
         WHERE x.run_id = ${run} AND x.stage = ${review} AND ri.state = 'succeeded' \
         AND ti.state = 'succeeded' AND ti.regenerations = 0 AND {pass_false}"
    )
}

/// Sends an item again because its review failed: it becomes `failed` (so it is planned as
/// another attempt of its stage) and counts a regeneration; the links of the stages after it
/// are removed for every record of the run it serves, so they are rendered again from its new
/// result. Only once per item: returns false when it was regenerated already (or is no
/// longer succeeded), and then changes nothing.
pub(super) async fn regenerate(
    store: &SqlStore,
    run_id: &str,
    item_id: i64,
    later_stages: &[String],
    reason: &str,
) -> Result<bool> {
    let mut tx = store.db.begin().await?;
    let changed = tx
        .execute(
            q(
                "UPDATE items SET state = 'failed', regenerations = regenerations + 1, \
               last_error = $2, updated_at = $3 \
               WHERE id = $1 AND state = 'succeeded' AND regenerations = 0",
            )
            .bind(item_id)
            .bind(reason)
            .bind(now_ms()),
        )
        .await?;
    if changed == 1 {
        for stage in later_stages {
            tx.execute(
                q(
                    "DELETE FROM record_items WHERE run_id = $1 AND stage = $2 AND line IN \
                   (SELECT line FROM record_items WHERE run_id = $1 AND item_id = $3)",
                )
                .bind(run_id)
                .bind(stage.as_str())
                .bind(item_id),
            )
            .await?;
        }
    }
    tx.commit().await?;
    Ok(changed == 1)
}
