//! Reports: a run's records with their outcomes, its figures, ledger totals, the per-item
//! audit, quarantine and anomaly counts. Read-only.

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
    let links = if staged { "record_items" } else { "records" };
    let mut f = RunFigures::default();
    // Each item's state, and whether it was already done before this run started
    // (succeeded in an attempt completed earlier): one pass over the run's items. An item
    // this run created has no attempt from before it, so its attempts are not looked at: on
    // a first night or a backfill, none are.
    let states: Vec<(ItemState, i64, i64)> = db
        .all(
            q(format!(
                "SELECT i.state, COUNT(*), COALESCE(SUM(CASE WHEN i.state = 'succeeded' \
                   AND i.first_run_id <> $1 AND EXISTS \
                   (SELECT 1 FROM attempts a WHERE a.item_id = i.id AND a.state = 'succeeded' \
                    AND a.completed_at < $2) THEN 1 ELSE 0 END), 0) \
                 FROM items i \
                 WHERE i.id IN (SELECT item_id FROM {links} WHERE run_id = $1) GROUP BY i.state"
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
    let (attempts, attempted, sent): (i64, i64, i64) = db
        .one(
            q("SELECT COUNT(a.id), COUNT(DISTINCT a.item_id), \
               COALESCE(SUM(CASE WHEN b.provider_batch_id IS NOT NULL OR a.dispatched_at IS NOT NULL \
                            THEN 1 ELSE 0 END), 0) \
               FROM attempts a JOIN batches b ON b.id = a.batch_id WHERE b.run_id = $1")
            .bind(run_id),
        )
        .await?;
    f.attempts = count(attempts);
    f.items_attempted = count(attempted);
    f.requests_sent = count(sent);
    f.batches = count(
        db.scalar(q("SELECT COUNT(*) FROM batches WHERE run_id = $1").bind(run_id))
            .await?,
    );
    // The run's ledger in one pass, by model: the totals, the rows that carry an answer,
    // and the models that were billed (three passes over the run's rows before).
    type ModelRow = (String, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64);
    let groups: Vec<ModelRow> = db
        .all(
            q(format!(
                "SELECT model, {LEDGER_SUMS}, \
                 COALESCE(SUM(CASE WHEN output_tokens > 0 THEN 1 ELSE 0 END), 0), \
                 COALESCE(SUM(CASE WHEN output_tokens > 0 OR input_tokens > 0 THEN 1 ELSE 0 END), 0) \
                 FROM ledger WHERE batch_id IN (SELECT id FROM batches WHERE run_id = $1) \
                 GROUP BY model ORDER BY model"
            ))
            .bind(run_id),
        )
        .await?;
    let mut sums: LedgerSums = (0, 0, 0, 0, 0, 0, 0, 0);
    let mut answered = 0i64;
    for g in &groups {
        let add = |a: i64, b: i64| {
            a.checked_add(b)
                .ok_or_else(|| StoreError::Invalid("the run's ledger sums overflow".into()))
        };
        sums = (
            add(sums.0, g.1)?,
            add(sums.1, g.2)?,
            add(sums.2, g.3)?,
            add(sums.3, g.4)?,
            add(sums.4, g.5)?,
            add(sums.5, g.6)?,
            add(sums.6, g.7)?,
            add(sums.7, g.8)?,
        );
        answered = add(answered, g.9)?;
    }
    f.ledger = ledger_sums(sums);
    f.answered = count(answered);
    f.models = groups
        .into_iter()
        .filter(|g| g.10 > 0)
        .map(|g| g.0)
        .collect();
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
        stage_figures(store, run_id, &stages, &mut f).await?;
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

pub(super) async fn audit(store: &SqlStore, run_id: &str) -> Result<Vec<AuditRow>> {
    // The attempts of this run's batches: each attempt appears in exactly one run.
    store.db
        .all(
            q("SELECT b.run_id, i.id AS item_id, i.dedupe_key, i.state AS item_state, \
                 COALESCE((SELECT string_agg(record_id, ',') FROM \
                           (SELECT r.record_id FROM records r WHERE r.run_id = b.run_id AND r.item_id = i.id \
                            UNION SELECT r.record_id FROM record_items x JOIN records r \
                              ON r.run_id = x.run_id AND r.line = x.line \
                            WHERE x.run_id = b.run_id AND x.item_id = i.id) AS ids), '') AS record_ids, \
                 i.stage, \
                 a.attempt_no, a.custom_id, a.batch_id, b.provider_batch_id, a.state AS attempt_state, \
                 a.verdict, a.error, COALESCE(l.model, a.model) AS model, \
                 l.input_tokens, l.cached_input_tokens, l.cache_write_tokens, l.output_tokens, \
                 l.reasoning_tokens, l.cost_pico \
               FROM attempts a JOIN batches b ON b.id = a.batch_id JOIN items i ON i.id = a.item_id \
               LEFT JOIN ledger l ON l.attempt_id = a.id \
               WHERE b.run_id = $1 \
               ORDER BY i.id, a.attempt_no")
            .bind(run_id),
        )
        .await
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

/// A multi-stage run's figures per stage, in the order of `stages`.
async fn stage_figures(
    store: &SqlStore,
    run_id: &str,
    stages: &[&str],
    f: &mut RunFigures,
) -> Result<()> {
    let db = &store.db;
    // One statement per stage rather than one grouped by stage: grouped, every link of
    // the run was sorted by stage first (0.27–0.31 s against 0.21 s for two stages at
    // 100,000 records). Records and skipped ones are counted from their links of chunk 0
    // (see [`staged_records`]); items and failed records need their distinct sets.
    type Links = (String, i64, i64, i64, i64, i64, i64, i64);
    let mut links: Vec<Links> = Vec::with_capacity(stages.len());
    for &stage in stages {
        // Distinct items, records, skipped, failed records, distinct succeeded and
        // exhausted items, links with an item.
        type Counts = (i64, i64, i64, i64, i64, i64, i64);
        let c: Counts = db
            .one(
                q("SELECT COUNT(DISTINCT x.item_id), \
                     COALESCE(SUM(CASE WHEN x.chunk = 0 THEN 1 ELSE 0 END), 0), \
                     COALESCE(SUM(CASE WHEN x.item_id IS NULL AND x.error IS NULL THEN 1 ELSE 0 END), 0), \
                     COUNT(DISTINCT CASE WHEN x.error IS NOT NULL OR i.state = 'exhausted' THEN x.line END), \
                     COUNT(DISTINCT CASE WHEN i.state = 'succeeded' THEN x.item_id END), \
                     COUNT(DISTINCT CASE WHEN i.state = 'exhausted' THEN x.item_id END), \
                     COUNT(x.item_id) \
                   FROM record_items x LEFT JOIN items i ON i.id = x.item_id \
                   WHERE x.run_id = $1 AND x.stage = $2")
                .bind(run_id)
                .bind(stage),
            )
            .await?;
        links.push((stage.to_string(), c.0, c.1, c.2, c.3, c.4, c.5, c.6));
    }
    type Sent = (
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
        i64,
        i64,
    );
    let sent: Vec<Sent> = db
        .all(
            q("SELECT b.stage, b.model, b.pricing_mode, COUNT(a.id), COUNT(DISTINCT a.item_id), \
                 CAST(COALESCE(SUM(l.input_tokens), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(l.cached_input_tokens), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(l.cache_write_tokens), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(l.output_tokens), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(l.reasoning_tokens), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(l.cost_pico), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(l.standard_cost_pico), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(CASE WHEN l.output_tokens > 0 THEN 1 ELSE 0 END), 0) AS BIGINT) \
               FROM attempts a JOIN batches b ON b.id = a.batch_id LEFT JOIN ledger l ON l.attempt_id = a.id \
               WHERE b.run_id = $1 GROUP BY b.stage, b.model, b.pricing_mode ORDER BY b.stage, b.model")
            .bind(run_id),
        )
        .await?;
    // The reviews' verdicts, counted where they are stored: results are compact JSON, the
    // `LIKE` narrows, and only what it lets through is parsed. The first stage reviews
    // nothing (the pipeline's check refuses `on_fail` there), so its answers — often the
    // longest — are not read (0.35 → 0.21 s at 100,000 records through two stages).
    let (pass, fail) = match store.engine() {
        Engine::Sqlite => (
            "CASE WHEN json_valid(ir.result) THEN json_type(ir.result, '$.pass') = 'true' ELSE 0 END",
            "CASE WHEN json_valid(ir.result) THEN json_type(ir.result, '$.pass') = 'false' ELSE 0 END",
        ),
        Engine::Postgres => (
            "COALESCE((ir.result::jsonb -> 'pass') = 'true'::jsonb, false)",
            "COALESCE((ir.result::jsonb -> 'pass') = 'false'::jsonb, false)",
        ),
    };
    let reviews: Vec<(String, i64, i64)> = db
        .all(
            q(format!(
                "SELECT x.stage, \
                   CAST(COALESCE(SUM(CASE WHEN {pass} THEN 1 ELSE 0 END), 0) AS BIGINT), \
                   CAST(COALESCE(SUM(CASE WHEN {fail} THEN 1 ELSE 0 END), 0) AS BIGINT) \
                 FROM record_items x JOIN items i ON i.id = x.item_id \
                 JOIN item_results ir ON ir.item_id = x.item_id \
                 WHERE x.run_id = $1 AND x.stage <> $2 AND i.state = 'succeeded' \
                   AND ir.result LIKE '%\"pass\"%' \
                 GROUP BY x.stage"
            ))
            .bind(run_id)
            .bind(stages.first().copied().unwrap_or_default()),
        )
        .await?;
    f.stages = stages
        .iter()
        .map(|&name| {
            let mut s = StageFigures {
                stage: name.to_string(),
                ..Default::default()
            };
            if let Some(l) = links.iter().find(|l| l.0 == name) {
                s.items = count(l.1);
                s.records = count(l.2) - count(l.3);
                s.skipped = count(l.3);
                s.failed_records = count(l.4);
                s.succeeded = count(l.5);
                s.exhausted = count(l.6);
                s.links = count(l.7);
            }
            for x in sent.iter().filter(|x| x.0 == name) {
                s.attempts += count(x.3);
                s.items_attempted += count(x.4);
                s.usage.input_tokens += count(x.5);
                s.usage.cached_input_tokens += count(x.6);
                s.usage.cache_write_tokens += count(x.7);
                s.usage.output_tokens += count(x.8);
                s.usage.reasoning_tokens += count(x.9);
                s.cost += Usd::from_pico(x.10 as i128);
                s.standard_cost += Usd::from_pico(x.11 as i128);
                s.answered += count(x.12);
                if !s.models.contains(&x.1) {
                    s.models.push(x.1.clone());
                }
                if !s.pricing_modes.contains(&x.2) {
                    s.pricing_modes.push(x.2.clone());
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
