//! Reports: a run's records with their outcomes, its figures, ledger totals, the per-item
//! audit, quarantine and anomaly counts. Read-only.

use std::collections::{BTreeSet, HashMap};

use super::*;

/// A page of the run's records with their items' outcomes, in line order. On SQLite as one
/// packed row ([`packed_sql`]): the record id and the error are free text, so they come
/// hex-encoded; a NULL answer or error is an empty field, any other is prefixed with `v`.
pub(super) async fn run_records(
    store: &SqlStore,
    run_id: &str,
    after_line: i64,
    limit: u32,
) -> Result<Vec<RecordResult>> {
    if store.engine() == Engine::Sqlite {
        static PACKED: OnceLock<String> = OnceLock::new();
        let sql = PACKED.get_or_init(|| {
            packed_sql(
                "SELECT r.line AS line, hex(r.record_id) AS rid, r.item_id AS item, \
                 i.state AS st, i.attempts AS att, COALESCE('v' || ir.result, '') AS res, \
                 CASE WHEN i.last_error IS NULL THEN '' ELSE 'v' || hex(i.last_error) END AS err \
                 FROM records r JOIN items i ON i.id = r.item_id \
                 LEFT JOIN item_results ir ON ir.item_id = r.item_id \
                 WHERE r.run_id = $1 AND r.line > $2 ORDER BY r.line LIMIT $3",
                &["line", "rid", "item", "st", "att", "res", "err"],
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
        let mut rows = unpack::<7>(packed.as_deref())?
            .into_iter()
            .map(|[line, rid, item, st, att, res, err]| {
                Ok(RecordResult {
                    line: int(line)?,
                    record_id: unhex(rid)?,
                    item_id: int(item)?,
                    state: named(st)?,
                    attempts: int(att)?,
                    result: res.strip_prefix('v').map(str::to_string),
                    last_error: err.strip_prefix('v').map(unhex).transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        rows.sort_unstable_by_key(|r| r.line);
        return Ok(rows);
    }
    super::stages::records_page(
        store,
        "SELECT r.line, r.record_id, r.item_id, i.state, i.attempts, ir.result, i.last_error \
         FROM records r JOIN items i ON i.id = r.item_id \
         LEFT JOIN item_results ir ON ir.item_id = r.item_id \
         WHERE r.run_id = $1 AND r.line > $2",
        "r.line",
        run_id,
        after_line,
        limit,
    )
    .await
}

/// The condition on an attempt `a` of having succeeded in a batch of run `$1`: the batch's
/// run read by its id, one lookup per attempt of the item. Written as a join of `attempts`
/// and `batches` instead, PostgreSQL without statistics (a fresh store: the first night)
/// took the run's batches as one row and walked all of each batch's attempts for every
/// record: at 100,000 records the figures of one run took minutes.
const SUCCEEDED_IN_RUN: &str =
    "a.state = 'succeeded' AND (SELECT b.run_id FROM batches b WHERE b.id = a.batch_id) = $1";

/// The condition on the item `item` (a column) of having succeeded in a batch of run `$1`.
///
/// SQLite reads the items that succeeded in the run's batches once (the run's batches, their
/// attempts) and tests each item against that set: at a million records (one stage, a first
/// night) the figures' pass took 1.38 s with a lookup of the item's attempts and of each
/// attempt's batch per record, 0.78 s this way, same counts. PostgreSQL keeps the lookup per
/// item ([`SUCCEEDED_IN_RUN`]), whose plan on a store without statistics (a first night) is
/// known; the set form was not measured there.
fn succeeded_in_run(engine: Engine, item: &str) -> String {
    match engine {
        Engine::Sqlite => format!(
            "{item} IN (SELECT a.item_id FROM attempts a WHERE a.state = 'succeeded' \
             AND a.batch_id IN (SELECT id FROM batches WHERE run_id = $1))"
        ),
        Engine::Postgres => format!(
            "EXISTS (SELECT 1 FROM attempts a WHERE a.item_id = {item} AND {SUCCEEDED_IN_RUN})"
        ),
    }
}

pub(super) async fn run_figures(store: &SqlStore, run_id: &str) -> Result<RunFigures> {
    let db = &store.db;
    let (started, stage_list): (i64, String) = db
        .one(q("SELECT started_at, stage FROM runs WHERE id = $1").bind(run_id))
        .await?;
    // A multi-stage run links its records to items in `record_items`; a one-stage run by
    // `records.item_id`.
    let stages: Vec<&str> = stage_list.split(',').collect();
    let staged = stages.len() > 1;
    let mut f = RunFigures::default();
    // Each item's state, and whether it was already done before this run started
    // ([`REUSED`]). A multi-stage run's are summed from its links counted stage by stage (an
    // item is of one stage); a one-stage run's are one pass over its items.
    let by_stage = if staged {
        let by_stage = stage_links(store, run_id, started, &stages).await?;
        for l in &by_stage {
            f.unique_items += count(l.items);
            f.succeeded += count(l.succeeded);
            f.exhausted += count(l.exhausted);
            f.reused += count(l.reused);
        }
        f.unfinished = f.unique_items - f.succeeded - f.exhausted;
        by_stage
    } else {
        let states: Vec<(ItemState, i64, i64)> = db
            .all(
                q(format!(
                    "SELECT i.state, COUNT(*), COALESCE(SUM(CASE WHEN {REUSED} THEN 1 ELSE 0 END), 0) \
                     FROM items i \
                     WHERE i.id IN (SELECT item_id FROM records WHERE run_id = $1) GROUP BY i.state"
                ))
                .bind(run_id)
                .bind(started),
            )
            .await?;
        for (state, n, reused) in states {
            let n = count(n);
            f.reused += count(reused);
            f.unique_items += n;
            match state {
                ItemState::Succeeded => f.succeeded += n,
                ItemState::Exhausted => f.exhausted += n,
                _ => f.unfinished += n,
            }
        }
        Vec::new()
    };
    if staged {
        f.records_valid = count(
            db.scalar(q("SELECT COUNT(*) FROM records WHERE run_id = $1").bind(run_id))
                .await?,
        );
        staged_records(store, run_id, stages.len(), &mut f).await?;
    } else {
        // One pass over the run's records: how many, how many done, and how many processed
        // by this run (the item's successful attempt is in one of its batches). See
        // [`succeeded_in_run`] for the form of the last.
        let (valid, done, processed): (i64, i64, i64) = db
            .one(
                q(format!(
                    "SELECT COUNT(*), \
                   COALESCE(SUM(CASE WHEN i.state = 'succeeded' THEN 1 ELSE 0 END), 0), \
                   COALESCE(SUM(CASE WHEN i.state = 'succeeded' AND {} \
                     THEN 1 ELSE 0 END), 0) \
                   FROM records r LEFT JOIN items i ON i.id = r.item_id WHERE r.run_id = $1",
                    succeeded_in_run(store.engine(), "i.id")
                ))
                .bind(run_id),
            )
            .await?;
        f.records_valid = count(valid);
        f.records_done = count(done);
        f.processed_records = count(processed);
    }
    // The run's attempts and ledger, summed batch by batch in one pass (see [`batch_sums`]).
    let by_batch = batch_sums(store, run_id).await?;
    f.batches = by_batch.len() as u64;
    let mut sums: LedgerSums = (0, 0, 0, 0, 0, 0, 0, 0);
    let mut answered = 0i64;
    let mut models: BTreeSet<String> = BTreeSet::new();
    for b in &by_batch {
        f.attempts += count(b.attempts);
        f.items_attempted += count(b.attempts - b.repeats);
        f.requests_sent += count(b.sent);
        sums = add_sums(sums, b.ledger)?;
        answered = add(answered, b.answered)?;
        models.extend(b.billed_models.iter().cloned());
    }
    f.ledger = ledger_sums(sums);
    f.answered = count(answered);
    f.models = models.into_iter().collect();
    // Batches of other runs this run's process ingested.
    let (batches, results, cost): (i64, i64, i64) = db
        .one(
            q("SELECT COUNT(*), \
               CAST(COALESCE(SUM((SELECT COUNT(*) FROM attempts a WHERE a.batch_id = b.id)), 0) AS BIGINT), \
               CAST(COALESCE(SUM((SELECT COALESCE(SUM(l.cost_pico), 0) FROM ledger l WHERE l.batch_id = b.id)), 0) AS BIGINT) \
               FROM batches b WHERE b.ingested_by_run = $1 AND b.run_id <> $1")
            .bind(run_id),
        )
        .await?;
    f.collected.batches = count(batches);
    f.collected.results = count(results);
    f.collected.cost = Usd::from_pico(cost as i128);
    if staged {
        stage_figures(store, run_id, &by_stage, &by_batch, &mut f).await?;
    }
    f.collected.runs = db
        .all::<(String,)>(
            q(
                "SELECT DISTINCT run_id FROM batches WHERE ingested_by_run = $1 AND run_id <> $1 \
               ORDER BY run_id",
            )
            .bind(run_id),
        )
        .await?
        .into_iter()
        .map(|(r,)| r)
        .collect();
    Ok(f)
}

/// One batch of a run, with what its attempts and their ledger rows add up to.
struct BatchSums {
    stage: String,
    model: String,
    pricing_mode: String,
    attempts: i64,
    /// Attempts of an item that had an earlier attempt in the run's batches: the distinct
    /// items a set of the run's batches carried are its attempts less these.
    repeats: i64,
    /// Attempts that reached the provider (the batch was created there, or each was
    /// dispatched online).
    sent: i64,
    ledger: LedgerSums,
    /// Ledger rows with an answer (output tokens billed).
    answered: i64,
    /// The models of its ledger rows that billed tokens.
    billed_models: Vec<String>,
}

/// The run's batches, each with the sums of its attempts and their ledger rows: one pass
/// over the run's attempts, batch by batch in the order of their index (no sort), with each
/// attempt's ledger row. Before, the run's figures made three passes (the attempts with
/// their batches, the ledger by model, and the attempts by stage, model and pricing mode
/// counting distinct items): 0.66 s against 0.33 s for this one at 100,000 records through
/// two stages (SQLite). A ledger row is its attempt's: [`super::results::apply_results`]
/// writes one per attempt of the batch it applies, so a batch's rows are those of its
/// attempts. An item's attempts count once however many of the run's batches carried it: a
/// retry whose item had an earlier attempt in the run is a repeat (looked up for retries
/// only). A batch's ledger rows are nearly always of one model; when the smallest and
/// largest differ, that batch's models are read on their own.
async fn batch_sums(store: &SqlStore, run_id: &str) -> Result<Vec<BatchSums>> {
    let db = &store.db;
    let batches: Vec<(String, String, String, String, i64)> = db
        .all(
            q("SELECT id, stage, model, pricing_mode, \
               CAST(CASE WHEN provider_batch_id IS NULL THEN 0 ELSE 1 END AS BIGINT) \
               FROM batches WHERE run_id = $1 ORDER BY id")
            .bind(run_id),
        )
        .await?;
    type Row = (
        String,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        Option<String>,
        Option<String>,
    );
    let rows: Vec<Row> = db
        .all(
            q("SELECT a.batch_id, COUNT(*), \
                 CAST(COALESCE(SUM(CASE WHEN a.dispatched_at IS NOT NULL THEN 1 ELSE 0 END), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(CASE WHEN a.attempt_no > 1 AND EXISTS (SELECT 1 FROM attempts p \
                   WHERE p.item_id = a.item_id AND p.attempt_no < a.attempt_no \
                   AND (SELECT pb.run_id FROM batches pb WHERE pb.id = p.batch_id) = $1) \
                   THEN 1 ELSE 0 END), 0) AS BIGINT), \
                 COUNT(l.attempt_id), \
                 CAST(COALESCE(SUM(l.input_tokens), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(l.cached_input_tokens), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(l.cache_write_tokens), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(l.output_tokens), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(l.reasoning_tokens), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(l.cost_pico), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(l.standard_cost_pico), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(CASE WHEN l.output_tokens > 0 THEN 1 ELSE 0 END), 0) AS BIGINT), \
                 MIN(CASE WHEN l.output_tokens > 0 OR l.input_tokens > 0 THEN l.model END), \
                 MAX(CASE WHEN l.output_tokens > 0 OR l.input_tokens > 0 THEN l.model END) \
               FROM attempts a LEFT JOIN ledger l ON l.attempt_id = a.id \
               WHERE a.batch_id IN (SELECT id FROM batches WHERE run_id = $1) \
               GROUP BY a.batch_id")
            .bind(run_id),
        )
        .await?;
    let mut by_batch: HashMap<String, Row> = rows.into_iter().map(|r| (r.0.clone(), r)).collect();
    let mut out = Vec::with_capacity(batches.len());
    for (id, stage, model, pricing_mode, created) in batches {
        let mut b = BatchSums {
            stage,
            model,
            pricing_mode,
            attempts: 0,
            repeats: 0,
            sent: 0,
            ledger: (0, 0, 0, 0, 0, 0, 0, 0),
            answered: 0,
            billed_models: Vec::new(),
        };
        if let Some(r) = by_batch.remove(&id) {
            b.attempts = r.1;
            b.sent = if created == 1 { r.1 } else { r.2 };
            b.repeats = r.3;
            b.ledger = (r.4, r.5, r.6, r.7, r.8, r.9, r.10, r.11);
            b.answered = r.12;
            b.billed_models = match (r.13, r.14) {
                (Some(lo), Some(hi)) if lo != hi => db
                    .all::<(String,)>(
                        q("SELECT DISTINCT model FROM ledger WHERE batch_id = $1 \
                           AND (output_tokens > 0 OR input_tokens > 0) ORDER BY model")
                        .bind(&id),
                    )
                    .await?
                    .into_iter()
                    .map(|(m,)| m)
                    .collect(),
                (Some(m), _) => vec![m],
                (None, _) => Vec::new(),
            };
        }
        out.push(b);
    }
    Ok(out)
}

/// `a + b`, or an error naming the run's sums.
fn add(a: i64, b: i64) -> Result<i64> {
    a.checked_add(b)
        .ok_or_else(|| StoreError::Invalid("the run's ledger sums overflow".into()))
}

fn add_sums(a: LedgerSums, b: LedgerSums) -> Result<LedgerSums> {
    Ok((
        add(a.0, b.0)?,
        add(a.1, b.1)?,
        add(a.2, b.2)?,
        add(a.3, b.3)?,
        add(a.4, b.4)?,
        add(a.5, b.5)?,
        add(a.6, b.6)?,
        add(a.7, b.7)?,
    ))
}

pub(super) async fn ledger_totals_for_batch(
    store: &SqlStore,
    batch_id: &str,
) -> Result<LedgerTotals> {
    let r: LedgerSums = store
        .db
        .one(
            q(format!(
                "SELECT {LEDGER_SUMS} FROM ledger WHERE batch_id = $1"
            ))
            .bind(batch_id),
        )
        .await?;
    Ok(ledger_sums(r))
}

/// The attempts of this run's batches (each attempt appears in exactly one run), in item and
/// attempt order, each with the ids of the run's records linked to its item, sorted: every
/// page of [`audit_page`] with [`audit_record_ids`] filled in.
pub(super) async fn audit(store: &SqlStore, run_id: &str) -> Result<Vec<AuditRow>> {
    let ids = audit_record_ids(store, run_id).await?;
    let mut rows: Vec<AuditRow> = Vec::new();
    for items in audit_items(store, run_id).await?.chunks(AUDIT_ITEMS) {
        rows.extend(
            audit_page(store, run_id, items)
                .await?
                .into_iter()
                .map(|mut r| {
                    if let Some(list) = ids.get(&r.item_id) {
                        r.record_ids.clone_from(list);
                    }
                    r
                }),
        );
    }
    Ok(rows)
}

/// The items this run's batches sent, ascending: what [`audit_page`] reads by.
pub(super) async fn audit_items(store: &SqlStore, run_id: &str) -> Result<Vec<i64>> {
    let mut items: Vec<i64> = store
        .db
        .all::<(i64,)>(
            q(
                "SELECT DISTINCT a.item_id FROM attempts a JOIN batches b ON b.id = a.batch_id \
               WHERE b.run_id = $1",
            )
            .bind(run_id),
        )
        .await?
        .into_iter()
        .map(|(id,)| id)
        .collect();
    items.sort_unstable();
    Ok(items)
}

/// The attempts of this run's batches of `items` (ascending), in item and attempt order, their
/// `record_ids` empty. Read by item alone, through the attempts' unique (item, attempt
/// number) index, and the other runs' attempts of those items (sent on other nights) left
/// out here: with the run as a condition, SQLite read and sorted every attempt of the run's
/// batches again for every page, and PostgreSQL matched each of the run's batches against
/// the page. PostgreSQL reads each attempt's batch, item and ledger row by its key
/// (`LATERAL … LIMIT 1`): joined, it hashed the whole ledger and items for every page (2.5 s
/// instead of 0.8 at 20,000 records through two stages). `report --items` of 100,000 records
/// through two stages held the run's 200,000 attempts at once (about 200 MB); a page holds
/// the attempts of [`AUDIT_ITEMS`] items.
pub(super) async fn audit_page(
    store: &SqlStore,
    run_id: &str,
    items: &[i64],
) -> Result<Vec<AuditRow>> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    const COLUMNS: &str = "b.run_id, i.id AS item_id, i.dedupe_key, i.state AS item_state, \
        i.stage, a.attempt_no, a.custom_id, a.batch_id, b.provider_batch_id, \
        a.state AS attempt_state, a.verdict, a.error, COALESCE(l.model, a.model) AS model, \
        l.input_tokens, l.cached_input_tokens, l.cache_write_tokens, l.output_tokens, \
        l.reasoning_tokens, l.cost_pico";
    let from = match store.engine() {
        Engine::Sqlite => {
            "attempts a JOIN batches b ON b.id = a.batch_id \
            JOIN items i ON i.id = a.item_id LEFT JOIN ledger l ON l.attempt_id = a.id"
        }
        Engine::Postgres => {
            "attempts a \
            CROSS JOIN LATERAL (SELECT run_id, provider_batch_id FROM batches \
              WHERE id = a.batch_id LIMIT 1) b \
            CROSS JOIN LATERAL (SELECT id, dedupe_key, state, stage FROM items \
              WHERE id = a.item_id LIMIT 1) i \
            LEFT JOIN LATERAL (SELECT model, input_tokens, cached_input_tokens, \
              cache_write_tokens, output_tokens, reasoning_tokens, cost_pico FROM ledger \
              WHERE attempt_id = a.id LIMIT 1) l ON true"
        }
    };
    let sql = format!(
        "SELECT {COLUMNS} FROM {from} WHERE {} ORDER BY a.item_id, a.attempt_no",
        super::stages::among(store.engine(), "a.item_id", items.len())
    );
    let query = super::stages::bind_among(q(sql), store.engine(), items);
    let mut rows: Vec<AuditRow> = store.db.all(query).await?;
    rows.retain(|r| r.run_id == run_id);
    Ok(rows)
}

/// The ids of the run's records linked to each item, sorted, without repeats. Read in one
/// pass over the run's links and matched by the caller: looked up per attempt, the records of
/// a one-stage link (`records.item_id`, which has no index) were scanned once per attempt,
/// and `report --items` of 100,000 records through two stages ran for more than ten minutes.
pub(super) async fn audit_record_ids(
    store: &SqlStore,
    run_id: &str,
) -> Result<HashMap<i64, Vec<String>>> {
    let links: Vec<(i64, String)> = store
        .db
        .all(
            q("SELECT r.item_id, r.record_id FROM records r \
               WHERE r.run_id = $1 AND r.item_id IS NOT NULL \
               UNION ALL SELECT x.item_id, r.record_id FROM record_items x \
               JOIN records r ON r.run_id = x.run_id AND r.line = x.line \
               WHERE x.run_id = $1 AND x.item_id IS NOT NULL")
            .bind(run_id),
        )
        .await?;
    let mut ids: HashMap<i64, Vec<String>> = HashMap::new();
    for (item, record) in links {
        ids.entry(item).or_default().push(record);
    }
    for list in ids.values_mut() {
        list.sort_unstable();
        list.dedup();
    }
    Ok(ids)
}

pub(super) async fn run_costs(store: &SqlStore, run_id: &str) -> Result<Vec<CostGroup>> {
    type Row = (
        String,
        String,
        String,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
    );
    let rows: Vec<Row> = store
        .db
        .all(
            q(format!(
                "SELECT stage, model, pricing_mode, {LEDGER_SUMS} FROM ledger \
                 WHERE batch_id IN (SELECT id FROM batches WHERE run_id = $1) \
                 GROUP BY stage, model, pricing_mode ORDER BY stage, model, pricing_mode"
            ))
            .bind(run_id),
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| CostGroup {
            stage: r.0,
            model: r.1,
            pricing_mode: r.2,
            totals: ledger_sums((r.3, r.4, r.5, r.6, r.7, r.8, r.9, r.10)),
        })
        .collect())
}

pub(super) async fn run_outcomes(store: &SqlStore, run_id: &str) -> Result<Vec<OutcomeGroup>> {
    let rows: Vec<(String, String, i64)> = store
        .db
        .all(
            q(
                "SELECT b.stage, COALESCE(a.verdict, 'pending') AS verdict, COUNT(*) \
               FROM attempts a JOIN batches b ON b.id = a.batch_id WHERE b.run_id = $1 \
               GROUP BY b.stage, COALESCE(a.verdict, 'pending') ORDER BY 1, 2",
            )
            .bind(run_id),
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|(stage, verdict, n)| OutcomeGroup {
            stage,
            verdict,
            attempts: count(n),
        })
        .collect())
}

pub(super) async fn quarantine(store: &SqlStore, run_id: &str) -> Result<Vec<QuarantineRow>> {
    store
        .db
        .all(
            q("SELECT source, line, field, reason FROM quarantine WHERE run_id = $1 ORDER BY line")
                .bind(run_id),
        )
        .await
}

pub(super) async fn quarantine_summary(
    store: &SqlStore,
    run_id: &str,
    limit: u32,
) -> Result<Vec<(Option<String>, String, u64)>> {
    let rows: Vec<(Option<String>, String, i64)> = store
        .db
        .all(
            q(
                "SELECT field, MIN(reason), COUNT(*) FROM quarantine WHERE run_id = $1 \
               GROUP BY field ORDER BY COUNT(*) DESC, field LIMIT $2",
            )
            .bind(run_id)
            .bind(limit as i64),
        )
        .await?;
    Ok(rows.into_iter().map(|(f, r, n)| (f, r, count(n))).collect())
}

pub(super) async fn anomaly_count(store: &SqlStore, run_id: &str) -> Result<u64> {
    Ok(count(
        store
            .db
            .scalar(
                q("SELECT COUNT(*) FROM anomalies WHERE run_id = $1 \
                   OR batch_id IN (SELECT id FROM batches WHERE run_id = $1)")
                .bind(run_id),
            )
            .await?,
    ))
}

/// The sums of a set of ledger rows, as [`ledger_sums`] reads them back.
const LEDGER_SUMS: &str = "COUNT(*), \
     CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT), \
     CAST(COALESCE(SUM(cached_input_tokens), 0) AS BIGINT), \
     CAST(COALESCE(SUM(cache_write_tokens), 0) AS BIGINT), \
     CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT), \
     CAST(COALESCE(SUM(reasoning_tokens), 0) AS BIGINT), \
     CAST(COALESCE(SUM(cost_pico), 0) AS BIGINT), \
     CAST(COALESCE(SUM(standard_cost_pico), 0) AS BIGINT)";

type LedgerSums = (i64, i64, i64, i64, i64, i64, i64, i64);

fn ledger_sums(r: LedgerSums) -> LedgerTotals {
    LedgerTotals {
        rows: count(r.0),
        usage: Usage {
            input_tokens: count(r.1),
            cached_input_tokens: count(r.2),
            cache_write_tokens: count(r.3),
            output_tokens: count(r.4),
            reasoning_tokens: count(r.5),
        },
        cost: Usd::from_pico(r.6 as i128),
        standard_cost: Usd::from_pico(r.7 as i128),
    }
}

/// A multi-stage run's record counts: a record is done once each stage has its links and
/// every linked item succeeded (a skipped stage counts as done); processed by this run when
/// one of its items succeeded in this run's batches; failed when an item failed for good or
/// a stage could not be rendered for it.
async fn staged_records(
    store: &SqlStore,
    run_id: &str,
    stages: usize,
    f: &mut RunFigures,
) -> Result<()> {
    // One pass over the run's links, grouped by record: how many stages it has links at,
    // how many links are not (yet) a success, how many failed for good, and how many
    // items succeeded in this run's batches. A record's links at a stage are written and
    // removed together, numbered by chunk from 0 (an itemless link is chunk 0): its stages
    // are its links of chunk 0, counted without the distinct set `COUNT(DISTINCT x.stage)`
    // builds per record (0.38 → 0.33 s at 100,000 records through two stages).
    let (done, processed, failed): (i64, i64, i64) = store
        .db
        .one(
            q(format!("SELECT \
                 COALESCE(SUM(CASE WHEN g.stages = $2 AND g.open = 0 THEN 1 ELSE 0 END), 0), \
                 COALESCE(SUM(CASE WHEN g.stages = $2 AND g.open = 0 AND g.here > 0 THEN 1 ELSE 0 END), 0), \
                 COALESCE(SUM(CASE WHEN g.failed > 0 THEN 1 ELSE 0 END), 0) \
               FROM (SELECT x.line, SUM(CASE WHEN x.chunk = 0 THEN 1 ELSE 0 END) AS stages, \
                   SUM(CASE WHEN x.error IS NOT NULL OR (x.item_id IS NOT NULL AND i.state <> 'succeeded') \
                       THEN 1 ELSE 0 END) AS open, \
                   SUM(CASE WHEN x.error IS NOT NULL OR i.state = 'exhausted' THEN 1 ELSE 0 END) AS failed, \
                   SUM(CASE WHEN i.state = 'succeeded' AND {} THEN 1 ELSE 0 END) AS here \
                 FROM record_items x LEFT JOIN items i ON i.id = x.item_id \
                 WHERE x.run_id = $1 GROUP BY x.line) AS g",
                succeeded_in_run(store.engine(), "x.item_id")))
            .bind(run_id)
            .bind(stages as i64),
        )
        .await?;
    f.records_done = count(done);
    f.processed_records = count(processed);
    f.records_failed = count(failed);
    Ok(())
}

/// The condition on an item `i` of run `$1` started at `$2` of having been done before the
/// run: it succeeded in an attempt completed earlier. An item the run created has no
/// attempt from before it, so its attempts are not looked at: on a first night or a
/// backfill, none are.
const REUSED: &str = "i.state = 'succeeded' AND i.first_run_id <> $1 AND EXISTS \
    (SELECT 1 FROM attempts a WHERE a.item_id = i.id AND a.state = 'succeeded' \
     AND a.completed_at < $2)";

/// A multi-stage run's links at one stage, counted.
struct StageLinks {
    stage: String,
    /// Distinct items, and of those how many succeeded, failed for good, and were done
    /// before the run ([`REUSED`]).
    items: i64,
    succeeded: i64,
    exhausted: i64,
    reused: i64,
    /// Records linked at the stage, and of those how many it was skipped for.
    records: i64,
    skipped: i64,
    /// Distinct records an error or an exhausted item failed at the stage.
    failed_records: i64,
    /// Links with an item.
    links: i64,
}

/// A multi-stage run's links counted stage by stage, in the order of `stages`: one
/// statement per stage rather than one grouped by stage: grouped, every link of the run
/// was sorted by stage first (0.27–0.31 s against 0.21 s for two stages at 100,000
/// records). Records and skipped ones are counted from their links of chunk 0 (see
/// [`staged_records`]); items and failed records need their distinct sets. The run's item
/// states are summed from these counts: a pass over its items of their own cost 0.11 s of
/// a two-stage run of 100,000 records (SQLite's statement log).
async fn stage_links(
    store: &SqlStore,
    run_id: &str,
    started: i64,
    stages: &[&str],
) -> Result<Vec<StageLinks>> {
    let sql = format!(
        "SELECT COUNT(DISTINCT x.item_id), \
           COALESCE(SUM(CASE WHEN x.chunk = 0 THEN 1 ELSE 0 END), 0), \
           COALESCE(SUM(CASE WHEN x.item_id IS NULL AND x.error IS NULL THEN 1 ELSE 0 END), 0), \
           COUNT(DISTINCT CASE WHEN x.error IS NOT NULL OR i.state = 'exhausted' THEN x.line END), \
           COUNT(DISTINCT CASE WHEN i.state = 'succeeded' THEN x.item_id END), \
           COUNT(DISTINCT CASE WHEN i.state = 'exhausted' THEN x.item_id END), \
           COUNT(x.item_id), \
           COUNT(DISTINCT CASE WHEN {REUSED} THEN x.item_id END) \
         FROM record_items x LEFT JOIN items i ON i.id = x.item_id \
         WHERE x.run_id = $1 AND x.stage = $3"
    );
    let mut out = Vec::with_capacity(stages.len());
    for &stage in stages {
        type Counts = (i64, i64, i64, i64, i64, i64, i64, i64);
        let c: Counts = store
            .db
            .one(q(sql.as_str()).bind(run_id).bind(started).bind(stage))
            .await?;
        out.push(StageLinks {
            stage: stage.to_string(),
            items: c.0,
            records: c.1,
            skipped: c.2,
            failed_records: c.3,
            succeeded: c.4,
            exhausted: c.5,
            links: c.6,
            reused: c.7,
        });
    }
    Ok(out)
}

/// A multi-stage run's figures per stage, in the order of `links` (see [`stage_links`]).
async fn stage_figures(
    store: &SqlStore,
    run_id: &str,
    links: &[StageLinks],
    batches: &[BatchSums],
    f: &mut RunFigures,
) -> Result<()> {
    let db = &store.db;
    // The reviews' verdicts, counted where they are stored: results are compact JSON, the
    // `LIKE` narrows, and only what it lets through is parsed, once, for its `pass` (as
    // JSON: `true`, `false`, or anything else), then counted. The first stage
    // reviews nothing (the pipeline's check refuses `on_fail` there), so its answers —
    // often the longest — are not read (0.35 → 0.21 s at 100,000 records through two
    // stages; one parse instead of two per verdict: 0.41 → 0.34 s by the SQLite shell).
    let verdict = match store.engine() {
        Engine::Sqlite => "CASE WHEN json_valid(ir.result) THEN json_type(ir.result, '$.pass') END",
        Engine::Postgres => "CAST(ir.result::jsonb -> 'pass' AS TEXT)",
    };
    let reviews: Vec<(String, i64, i64)> = db
        .all(
            q(format!(
                "SELECT g.stage, \
                   CAST(COALESCE(SUM(CASE WHEN g.v = 'true' THEN 1 ELSE 0 END), 0) AS BIGINT), \
                   CAST(COALESCE(SUM(CASE WHEN g.v = 'false' THEN 1 ELSE 0 END), 0) AS BIGINT) \
                 FROM (SELECT x.stage AS stage, {verdict} AS v \
                   FROM record_items x JOIN items i ON i.id = x.item_id \
                   JOIN item_results ir ON ir.item_id = x.item_id \
                   WHERE x.run_id = $1 AND x.stage <> $2 AND i.state = 'succeeded' \
                     AND ir.result LIKE '%\"pass\"%') AS g \
                 GROUP BY g.stage"
            ))
            .bind(run_id)
            .bind(links.first().map(|l| l.stage.as_str()).unwrap_or_default()),
        )
        .await?;
    f.stages = links
        .iter()
        .map(|l| {
            let name = l.stage.as_str();
            let mut s = StageFigures {
                stage: name.to_string(),
                items: count(l.items),
                records: count(l.records) - count(l.skipped),
                skipped: count(l.skipped),
                failed_records: count(l.failed_records),
                succeeded: count(l.succeeded),
                exhausted: count(l.exhausted),
                links: count(l.links),
                ..Default::default()
            };
            // In (stage, model, pricing mode) order, as the groups were listed before.
            let mut mine: Vec<&BatchSums> = batches.iter().filter(|b| b.stage == name).collect();
            mine.sort_by(|a, b| (&a.model, &a.pricing_mode).cmp(&(&b.model, &b.pricing_mode)));
            for b in mine {
                if b.attempts == 0 {
                    continue;
                }
                s.attempts += count(b.attempts);
                s.items_attempted += count(b.attempts - b.repeats);
                let l = ledger_sums(b.ledger);
                s.usage.add(&l.usage);
                s.cost += l.cost;
                s.standard_cost += l.standard_cost;
                s.answered += count(b.answered);
                if !s.models.contains(&b.model) {
                    s.models.push(b.model.clone());
                }
                if !s.pricing_modes.contains(&b.pricing_mode) {
                    s.pricing_modes.push(b.pricing_mode.clone());
                }
            }
            if let Some(r) = reviews.iter().find(|r| r.0 == name) {
                s.review_pass = count(r.1);
                s.review_fail = count(r.2);
            }
            s
        })
        .collect();
    Ok(())
}
