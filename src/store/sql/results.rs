//! Results: applying judged attempts (ledger rows once per `custom_id`, attempt verdicts, item
//! states) in one fenced transaction, taking back attempts never sent, closing a batch,
//! anomalies, and the provider's own bills (docs/design.md, invariants 1 and 2).

use super::*;

/// Binds: batch_id, run_id, pipeline, stage, pricing_mode, now; then per row custom_id,
/// attempt_id, model, input, cached input, cache write, output, reasoning, cost, standard cost.
pub(super) fn insert_ledger_sql(rows: usize) -> String {
    format!(
        "INSERT OR FAIL INTO ledger (batch_id, run_id, pipeline, stage, pricing_mode, created_at, \
         custom_id, attempt_id, model, input_tokens, cached_input_tokens, cache_write_tokens, \
         output_tokens, reasoning_tokens, cost_pico, standard_cost_pico) \
         SELECT c.b, c.r, c.p, c.s, c.m, c.t, v.column1, v.column2, v.column3, v.column4, v.column5, \
         v.column6, v.column7, v.column8, v.column9, v.column10 \
         FROM (SELECT ? AS b, ? AS r, ? AS p, ? AS s, ? AS m, ? AS t) AS c, (VALUES {}) AS v \
         WHERE true ON CONFLICT (attempt_id) DO NOTHING",
        values_sql(rows, 10)
    )
}

/// Binds: now; then per row attempt id, state, verdict, error, finish_reason, model.
pub(super) fn update_attempts_sql(rows: usize) -> String {
    format!(
        "WITH c(t) AS (SELECT ?), v(id, state, verdict, error, finish_reason, model) AS (VALUES {}) \
         UPDATE OR FAIL attempts SET state = v.state, verdict = v.verdict, error = v.error, \
         finish_reason = v.finish_reason, model = v.model, completed_at = (SELECT t FROM c) \
         FROM v WHERE attempts.id = v.id AND attempts.state = 'in_flight'",
        values_sql(rows, 6)
    )
}

/// Binds: now, the state the items move to; then per row item id, attempt_no, error.
pub(super) fn update_items_sql(rows: usize) -> String {
    format!(
        "WITH c(t, st) AS (SELECT ?, ?), v(item_id, attempt_no, error) AS (VALUES {}) \
         UPDATE OR FAIL items SET state = (SELECT st FROM c), last_error = v.error, updated_at = (SELECT t FROM c) \
         FROM v WHERE items.id = v.item_id AND items.state = 'in_flight' AND items.attempts = v.attempt_no",
        values_sql(rows, 3)
    )
}

/// Per row item id, attempt_no, result: the answer of an item whose attempt `attempt_no` is
/// the one in flight (a replayed chunk finds the item moved on and writes nothing).
pub(super) fn upsert_results_sql(rows: usize) -> String {
    format!(
        "INSERT OR FAIL INTO item_results (item_id, result) \
         SELECT i.id, v.column3 FROM (VALUES {}) AS v \
         JOIN items i ON i.id = v.column1 AND i.state = 'in_flight' AND i.attempts = v.column2 \
         WHERE true ON CONFLICT (item_id) DO UPDATE SET result = excluded.result",
        values_sql(rows, 3)
    )
}

/// Items a failed attempt leaves behind: `exhausted` at the cap, `failed` (retried) below.
pub(super) fn states_to_stats(applied: u64, states: &[(ItemState,)]) -> ApplyStats {
    let exhausted = states
        .iter()
        .filter(|(s,)| *s == ItemState::Exhausted)
        .count() as u64;
    ApplyStats {
        applied,
        failed: states.len() as u64 - exhausted,
        exhausted,
        ..Default::default()
    }
}

pub(super) async fn batch_attempts(store: &SqlStore, batch_id: &str) -> Result<Vec<AttemptRef>> {
    const ALL: &str = "SELECT id, item_id, attempt_no, custom_id, state FROM attempts \
        WHERE batch_id = $1 ORDER BY id";
    if store.engine() == Engine::Sqlite {
        // A batch's attempts (up to its size): one packed row ([`packed_sql`]); the custom
        // ids are ours and the states are names.
        let (packed,): (Option<String>,) = store
            .db
            .one(
                q(packed_sql(
                    ALL,
                    &["id", "item_id", "attempt_no", "custom_id", "state"],
                ))
                .bind(batch_id),
            )
            .await?;
        let mut attempts = unpack::<5>(packed.as_deref())?
            .into_iter()
            .map(|[id, item_id, attempt_no, custom_id, state]| {
                Ok(AttemptRef {
                    id: int(id)?,
                    item_id: int(item_id)?,
                    attempt_no: int(attempt_no)?,
                    custom_id: custom_id.to_string(),
                    state: named(state)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        attempts.sort_unstable_by_key(|a| a.id);
        return Ok(attempts);
    }
    store.db.all(q(ALL).bind(batch_id)).await
}

/// The state an outcome moves its item to: succeeded, or failed below the attempt cap and
/// exhausted at it.
fn outcome_state(o: &AttemptOutcome, max_attempts: u32) -> ItemState {
    if o.succeeded {
        ItemState::Succeeded
    } else if o.attempt_no >= i64::from(max_attempts) {
        ItemState::Exhausted
    } else {
        ItemState::Failed
    }
}

pub(super) async fn apply_results(
    store: &SqlStore,
    batch: &BatchRow,
    outcomes: &[AttemptOutcome],
    max_attempts: u32,
) -> Result<ApplyStats> {
    static LEDGER: OnceLock<String> = OnceLock::new();
    static ATTEMPTS: OnceLock<String> = OnceLock::new();
    static ITEMS: OnceLock<String> = OnceLock::new();
    static RESULTS: OnceLock<String> = OnceLock::new();
    let now = now_ms();
    let mut stats = ApplyStats::default();
    let mut tx = store.db.begin().await?;
    store.fence(&mut tx, &batch.id, batch.lease_token).await?;
    for chunk in outcomes.chunks(ROWS_PER_STATEMENT) {
        let mut ledger = q(cached_sql(&LEDGER, chunk.len(), insert_ledger_sql))
            .bind(&batch.id)
            .bind(&batch.run_id)
            .bind(&batch.pipeline)
            .bind(&batch.stage)
            .bind(&batch.pricing_mode)
            .bind(now);
        for o in chunk {
            ledger.push(o.custom_id.as_str());
            ledger.push(o.attempt_id);
            ledger.push(o.model.as_deref().unwrap_or(&batch.model));
            ledger.push(i64_of(o.usage.input_tokens));
            ledger.push(i64_of(o.usage.cached_input_tokens));
            ledger.push(i64_of(o.usage.cache_write_tokens));
            ledger.push(i64_of(o.usage.output_tokens));
            ledger.push(i64_of(o.usage.reasoning_tokens));
            ledger.push(money_i64(o.cost)?);
            ledger.push(money_i64(o.standard_cost)?);
        }
        tx.execute(ledger).await?;

        let mut attempts = q(cached_sql(&ATTEMPTS, chunk.len(), update_attempts_sql)).bind(now);
        for o in chunk {
            attempts.push(o.attempt_id);
            attempts.push(if o.succeeded {
                AttemptState::Succeeded
            } else {
                AttemptState::Failed
            });
            attempts.push(o.verdict.as_str());
            attempts.push(o.error.as_deref());
            attempts.push(o.finish_reason.as_deref());
            attempts.push(o.model.as_deref());
        }
        let applied = tx.execute(attempts).await?;
        stats.applied += applied;
        stats.already_applied += chunk.len() as u64 - applied;

        // The answers first: their guard is the item still in flight at this attempt.
        let answered: Vec<&AttemptOutcome> = chunk.iter().filter(|o| o.succeeded).collect();
        if !answered.is_empty() {
            let mut results = q(cached_sql(&RESULTS, answered.len(), upsert_results_sql));
            for o in &answered {
                results.push(o.item_id);
                results.push(o.attempt_no);
                results.push(o.result.as_deref());
            }
            tx.execute(results).await?;
        }
        // Each item's next state is known here (an answer, or a failure below or at the
        // cap): one statement per state, counted by the rows it moved.
        for state in [
            ItemState::Succeeded,
            ItemState::Failed,
            ItemState::Exhausted,
        ] {
            let rows: Vec<&AttemptOutcome> = chunk
                .iter()
                .filter(|o| outcome_state(o, max_attempts) == state)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let mut items = q(cached_sql(&ITEMS, rows.len(), update_items_sql))
                .bind(now)
                .bind(state);
            for o in rows {
                items.push(o.item_id);
                items.push(o.attempt_no);
                items.push(if o.succeeded {
                    None
                } else {
                    Some(o.error.as_deref().unwrap_or(o.verdict.as_str()))
                });
            }
            let moved = tx.execute(items).await?;
            match state {
                ItemState::Succeeded => stats.succeeded += moved,
                ItemState::Exhausted => stats.exhausted += moved,
                _ => stats.failed += moved,
            }
        }
    }
    tx.commit().await?;
    Ok(stats)
}

pub(super) async fn return_unsent(store: &SqlStore, batch: &BatchRow, why: &str) -> Result<u64> {
    const UNSENT: &str = "SELECT item_id, attempt_no FROM attempts \
         WHERE batch_id = $1 AND state = 'in_flight' AND dispatched_at IS NULL";
    let now = now_ms();
    let mut tx = store.db.begin().await?;
    store.fence(&mut tx, &batch.id, batch.lease_token).await?;
    // SET reads the row as it was: an item on its first attempt was pending, any other
    // was failed (its earlier error stays).
    let n = tx
        .execute(
            q(format!(
                "UPDATE OR FAIL items SET attempts = items.attempts - 1, \
                   state = CASE WHEN items.attempts > 1 THEN 'failed' ELSE 'pending' END, \
                   updated_at = $2 \
                 FROM ({UNSENT}) AS a \
                 WHERE items.id = a.item_id AND items.state = 'in_flight' \
                   AND items.attempts = a.attempt_no"
            ))
            .bind(&batch.id)
            .bind(now),
        )
        .await?;
    tx.execute(
        q(
            "DELETE FROM attempts WHERE batch_id = $1 AND state = 'in_flight' \
           AND dispatched_at IS NULL",
        )
        .bind(&batch.id),
    )
    .await?;
    tx.execute(
        q(
            "UPDATE batches SET state = 'ended', end_state = 'cancelled', error = $2, \
             ended_at = $3 WHERE id = $1 AND state NOT IN ('ended', 'ingested')",
        )
        .bind(&batch.id)
        .bind(why)
        .bind(now),
    )
    .await?;
    tx.commit().await?;
    Ok(n)
}

pub(super) async fn finish_ingest(
    store: &SqlStore,
    batch: &BatchRow,
    verdict: AttemptVerdict,
    error: &str,
    max_attempts: u32,
    collector: Option<&str>,
) -> Result<ApplyStats> {
    let now = now_ms();
    let mut tx = store.db.begin().await?;
    store.fence(&mut tx, &batch.id, batch.lease_token).await?;
    let states: Vec<(ItemState,)> = tx
        .all(
            q("UPDATE OR FAIL items SET \
                 state = CASE WHEN items.attempts >= $2 THEN 'exhausted' ELSE 'failed' END, \
                 last_error = $3, updated_at = $4 \
               FROM (SELECT item_id, attempt_no FROM attempts WHERE batch_id = $1 AND state = 'in_flight') AS a \
               WHERE items.id = a.item_id AND items.state = 'in_flight' AND items.attempts = a.attempt_no \
               RETURNING items.state")
            .bind(&batch.id)
            .bind(max_attempts as i64)
            .bind(format!("{verdict}: {error}"))
            .bind(now),
        )
        .await?;
    let n = tx
        .execute(
            q(
                "UPDATE OR FAIL attempts SET state = 'failed', verdict = $2, error = $3, completed_at = $4 \
               WHERE batch_id = $1 AND state = 'in_flight'",
            )
            .bind(&batch.id)
            .bind(verdict.as_str())
            .bind(error)
            .bind(now),
        )
        .await?;
    tx.execute(
        q(
            "UPDATE batches SET state = 'ingested', ingested_at = $2, lease_owner = NULL, \
           lease_expires_at = NULL, ingested_by_run = $3 WHERE id = $1 AND state = 'ended'",
        )
        .bind(&batch.id)
        .bind(now)
        .bind(collector),
    )
    .await?;
    tx.commit().await?;
    Ok(states_to_stats(n, &states))
}

pub(super) async fn record_anomaly(
    store: &SqlStore,
    run_id: Option<&str>,
    batch_id: Option<&str>,
    kind: &str,
    custom_id: Option<&str>,
    detail: &str,
) -> Result<()> {
    store
        .db
        .execute(
            q(
                "INSERT INTO anomalies (run_id, batch_id, kind, custom_id, detail, created_at) \
               VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(run_id)
            .bind(batch_id)
            .bind(kind)
            .bind(custom_id)
            .bind(detail)
            .bind(now_ms()),
        )
        .await?;
    Ok(())
}

pub(super) async fn anomalies_of_kind(store: &SqlStore, kind: &str) -> Result<u64> {
    let n: i64 = store
        .db
        .scalar(q("SELECT COUNT(*) FROM anomalies WHERE kind = $1").bind(kind))
        .await?;
    Ok(count(n))
}

pub(super) async fn record_provider_bill(store: &SqlStore, b: &ProviderBill) -> Result<()> {
    store.db
        .execute(
            q("INSERT INTO provider_bills (provider_batch_id, requests, input_tokens, cached_input_tokens, \
               cache_write_tokens, output_tokens, reasoning_tokens, cost_pico, source, recorded_at) \
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
               ON CONFLICT (provider_batch_id) DO UPDATE SET requests = excluded.requests, \
               input_tokens = excluded.input_tokens, cached_input_tokens = excluded.cached_input_tokens, \
               cache_write_tokens = excluded.cache_write_tokens, output_tokens = excluded.output_tokens, \
               reasoning_tokens = excluded.reasoning_tokens, cost_pico = excluded.cost_pico, \
               source = excluded.source, recorded_at = excluded.recorded_at")
            .bind(&b.provider_batch_id)
            .bind(i64_of(b.requests))
            .bind(i64_of(b.usage.input_tokens))
            .bind(i64_of(b.usage.cached_input_tokens))
            .bind(i64_of(b.usage.cache_write_tokens))
            .bind(i64_of(b.usage.output_tokens))
            .bind(i64_of(b.usage.reasoning_tokens))
            .bind(money_i64(b.cost)?)
            .bind(&b.source)
            .bind(now_ms()),
        )
        .await?;
    Ok(())
}

pub(super) async fn provider_bill(
    store: &SqlStore,
    provider_batch_id: &str,
) -> Result<Option<ProviderBill>> {
    type Bill = (String, i64, i64, i64, i64, i64, i64, i64, String);
    let row: Option<Bill> = store
        .db
        .optional(
            q("SELECT provider_batch_id, requests, input_tokens, cached_input_tokens, cache_write_tokens, \
               output_tokens, reasoning_tokens, cost_pico, source FROM provider_bills WHERE provider_batch_id = $1")
            .bind(provider_batch_id),
        )
        .await?;
    Ok(row.map(|r| ProviderBill {
        provider_batch_id: r.0,
        requests: count(r.1),
        usage: Usage {
            input_tokens: count(r.2),
            cached_input_tokens: count(r.3),
            cache_write_tokens: count(r.4),
            output_tokens: count(r.5),
            reasoning_tokens: count(r.6),
        },
        cost: Usd::from_pico(r.7 as i128),
        source: r.8,
    }))
}
