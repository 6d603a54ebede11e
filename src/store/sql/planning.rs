//! Planning: what is waiting to be sent, and [`plan_batch`], which takes plannable items into
//! a `planned` batch within the file limits and the budget's worst case (docs/design.md,
//! invariants 3 and 4; on PostgreSQL, rows are taken with `FOR UPDATE SKIP LOCKED`,
//! docs/reliability.md B2).

use super::*;

/// The items a planned batch takes, with parameters numbered from `first`: on SQLite (one
/// writer) every plannable item up to the last one chosen; on PostgreSQL exactly the rows the
/// planning transaction locked, within the range of their ids. The range is what keeps it
/// cheap: the driver prepares each statement once per connection, and from its sixth run
/// PostgreSQL may plan it for any array, so the membership test becomes a filter that walks
/// the array for every row the index yields. Without the range those rows were all the
/// stage's plannable items: 1.7 s for such a statement at 95,000 pending items and 5,000 ids
/// (a store without statistics), 0.1 s with it.
pub(super) fn plan_filter_sql(engine: Engine, first: usize, req: &PlanRequest<'_>) -> String {
    let (p, s, t, i) = (first, first + 1, first + 2, first + 3);
    let ids = match engine {
        Engine::Sqlite => format!("id <= ${i}"),
        Engine::Postgres => format!(
            "id BETWEEN ${} AND ${} AND id = ANY(${i})",
            first + 4,
            first + 5
        ),
    };
    format!(
        "pipeline = ${p} AND stage = ${s} AND state IN {} AND input_tokens <= ${t} AND {ids}",
        plannable_states(req)
    )
}

/// The item states a planning round takes (a constant fragment, never user text).
pub(super) fn plannable_states(req: &PlanRequest<'_>) -> &'static str {
    if req.only_retries {
        "('failed')"
    } else {
        "('pending', 'failed')"
    }
}

/// Binds what [`plan_filter_sql`] asks for.
pub(super) fn plan_filter<'a>(
    qq: Query<'a>,
    req: &PlanRequest<'a>,
    max_item: i64,
    chosen: &'a [i64],
    engine: Engine,
) -> Query<'a> {
    let qq = qq.bind(req.pipeline).bind(req.stage).bind(max_item);
    match engine {
        Engine::Sqlite => qq.bind(*chosen.last().expect("a planned batch has items")),
        Engine::Postgres => {
            let low = chosen.iter().min().expect("a planned batch has items");
            let high = chosen.iter().max().expect("a planned batch has items");
            qq.bind(chosen).bind(*low).bind(*high)
        }
    }
}

pub(super) async fn plannable_count(store: &SqlStore, pipeline: &str, stage: &str) -> Result<u64> {
    let n: i64 = store
        .db
        .scalar(
            q("SELECT COUNT(*) FROM items WHERE pipeline = $1 AND stage = $2 AND state IN ('pending', 'failed')")
                .bind(pipeline)
                .bind(stage),
        )
        .await?;
    Ok(count(n))
}

pub(super) async fn plannable_retries(
    store: &SqlStore,
    pipeline: &str,
    stage: &str,
) -> Result<u64> {
    let n: i64 = store
        .db
        .scalar(
            q("SELECT COUNT(*) FROM items WHERE pipeline = $1 AND stage = $2 AND state = 'failed'")
                .bind(pipeline)
                .bind(stage),
        )
        .await?;
    Ok(count(n))
}

pub(super) async fn revive_exhausted(
    store: &SqlStore,
    pipeline: &str,
    stage: &str,
    max_attempts: u32,
) -> Result<u64> {
    store.db
        .execute(
            q("UPDATE items SET state = 'failed', updated_at = $4 WHERE pipeline = $1 AND stage = $2 \
               AND state = 'exhausted' AND attempts > 0 AND attempts < $3")
            .bind(pipeline)
            .bind(stage)
            .bind(max_attempts as i64)
            .bind(now_ms()),
        )
        .await
}

pub(super) async fn plan_batch(store: &SqlStore, req: &PlanRequest<'_>) -> Result<PlanOutcome> {
    let mut tx = store.db.begin().await?;
    let max_item = req
        .budget
        .and_then(|b| b.max_item_input_tokens)
        .map(|t| t.min(i64::MAX as u64) as i64)
        .unwrap_or(i64::MAX);
    let page = format!(
        "SELECT id, body_bytes, attempts, input_tokens FROM items WHERE pipeline = $1 AND stage = $2 \
         AND state IN {} AND input_tokens <= $4 ORDER BY id LIMIT $3{}",
        plannable_states(req),
        store.skip_locked()
    );
    let candidates: Vec<(i64, i64, i64, i64)> = if store.engine() == Engine::Sqlite {
        // Up to a batch's worth of rows of four numbers: one packed row ([`packed_sql`]),
        // put back in id order here.
        let (packed,): (Option<String>,) = tx
            .one(
                q(packed_sql(
                    &page,
                    &["id", "body_bytes", "attempts", "input_tokens"],
                ))
                .bind(req.pipeline)
                .bind(req.stage)
                .bind(req.max_requests as i64)
                .bind(max_item),
            )
            .await?;
        let mut rows = unpack::<4>(packed.as_deref())?
            .into_iter()
            .map(|[id, body, tries, tokens]| Ok((int(id)?, int(body)?, int(tries)?, int(tokens)?)))
            .collect::<Result<Vec<_>>>()?;
        rows.sort_unstable_by_key(|r| r.0);
        rows
    } else {
        // PostgreSQL: items another worker is planning right now are skipped, not waited on.
        tx.all(
            q(page)
                .bind(req.pipeline)
                .bind(req.stage)
                .bind(req.max_requests as i64)
                .bind(max_item),
        )
        .await?
    };
    let now = now_ms();
    let mut bytes = 0u64;
    let mut reserved = Usd::ZERO;
    let mut chosen: Vec<i64> = Vec::new();
    let mut over_budget = None;
    let mut budget_cut = false;
    for (id, body, _, tokens) in &candidates {
        let line = *body as u64 + req.line_overhead + 1;
        if line > req.max_bytes {
            // This request can never fit in a batch file: it is final, not retried.
            tx.execute(
                q("UPDATE items SET state = 'exhausted', last_error = $2, updated_at = $3 WHERE id = $1")
                    .bind(*id)
                    .bind(format!(
                        "request is {line} bytes, over the batch file limit of {} bytes (batch.max_bytes)",
                        req.max_bytes
                    ))
                    .bind(now),
            )
            .await?;
            if chosen.is_empty() {
                continue;
            }
            break;
        }
        if bytes + line > req.max_bytes {
            break;
        }
        if let Some(b) = &req.budget {
            let worst = b.worst_case(*tokens as u64);
            if reserved + worst > b.available {
                if chosen.is_empty() {
                    over_budget = Some(worst);
                } else {
                    budget_cut = true;
                }
                break;
            }
            reserved += worst;
        }
        bytes += line;
        chosen.push(*id);
    }
    let Some(&last_id) = chosen.last() else {
        tx.commit().await?;
        return Ok(match over_budget {
            Some(next_worst_case) => PlanOutcome::OverBudget { next_worst_case },
            None => PlanOutcome::Nothing,
        });
    };
    let cut_by_budget = over_budget.is_some() || budget_cut;
    let count = chosen.len() as i64;
    let id = uuid::Uuid::now_v7();
    let batch_id = id.hyphenated().to_string();
    let prefix = format!("b{}-", id.simple());
    tx.execute(
        q("INSERT INTO batches (id, run_id, pipeline, stage, provider, model, pricing_mode, state, \
           request_count, reserved_pico, created_at, mode, lease_owner, lease_token, lease_expires_at) \
           VALUES ($1, $2, $3, $4, $5, $6, $7, 'planned', $8, $9, $10, $11, $12, 1, $13)")
        .bind(&batch_id)
        .bind(req.run_id)
        .bind(req.pipeline)
        .bind(req.stage)
        .bind(req.provider)
        .bind(req.model)
        .bind(req.pricing_mode.as_str())
        .bind(count)
        .bind(money_i64(reserved)?)
        .bind(now)
        .bind(req.mode)
        .bind(req.owner)
        .bind(now.saturating_add(req.lease_ms)),
    )
    .await?;
    let inserted = tx
        .execute(plan_filter(
            q(format!(
                "INSERT OR FAIL INTO attempts (item_id, batch_id, attempt_no, custom_id, state, created_at) \
                 SELECT id, $1, attempts + 1, $2 || id || '-' || (attempts + 1), 'in_flight', $3 \
                 FROM items WHERE {} ORDER BY id",
                plan_filter_sql(store.engine(), 4, req)
            ))
            .bind(&batch_id)
            .bind(&prefix)
            .bind(now),
            req,
            max_item,
            &chosen,
            store.engine(),
        ))
        .await?;
    crate::failpoint!("plan.mid_tx");
    if candidates
        .iter()
        .any(|(id, _, tries, _)| *id <= last_id && *tries > 0)
    {
        crate::failpoint!("retry.mid_tx");
    }
    let moved = tx
        .execute(plan_filter(
            q(format!(
                "UPDATE OR FAIL items SET state = 'in_flight', attempts = attempts + 1, updated_at = $1 WHERE {}",
                plan_filter_sql(store.engine(), 2, req)
            ))
            .bind(now),
            req,
            max_item,
            &chosen,
            store.engine(),
        ))
        .await?;
    if inserted != count as u64 || moved != count as u64 {
        return Err(StoreError::Invalid(format!(
            "planning batch {batch_id}: expected {count} items, attempted {inserted}, moved {moved}"
        )));
    }
    let row: BatchRow = tx
        .one(q(format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1")).bind(&batch_id))
        .await?;
    tx.commit().await?;
    Ok(PlanOutcome::Planned {
        batch: Box::new(row),
        cut_by_budget,
    })
}

pub(super) async fn run_commitment(store: &SqlStore, run_id: &str) -> Result<Usd> {
    let pico: i64 = store
        .db
        .scalar(
            q("SELECT CAST(COALESCE(SUM(CASE WHEN b.state = 'ingested' \
                 THEN (SELECT COALESCE(SUM(l.cost_pico), 0) FROM ledger l WHERE l.batch_id = b.id) \
                 ELSE b.reserved_pico END), 0) AS BIGINT) \
               FROM batches b WHERE b.run_id = $1")
            .bind(run_id),
        )
        .await?;
    Ok(Usd::from_pico(pico as i128))
}

pub(super) async fn plannable_over(
    store: &SqlStore,
    pipeline: &str,
    stage: &str,
    max_input_tokens: u64,
) -> Result<u64> {
    let n: i64 = store
        .db
        .scalar(
            q(
                "SELECT COUNT(*) FROM items WHERE pipeline = $1 AND stage = $2 \
               AND state IN ('pending', 'failed') AND input_tokens > $3",
            )
            .bind(pipeline)
            .bind(stage)
            .bind(max_input_tokens.min(i64::MAX as u64) as i64),
        )
        .await?;
    Ok(count(n))
}

pub(super) async fn history(
    store: &SqlStore,
    pipeline: &str,
    stage: &str,
) -> Result<crate::store::History> {
    let (answered, output): (i64, i64) = store
        .db
        .one(
            q(
                "SELECT COUNT(*), CAST(COALESCE(SUM(l.output_tokens), 0) AS BIGINT) FROM ledger l \
               WHERE l.pipeline = $1 AND l.stage = $2 AND l.output_tokens > 0",
            )
            .bind(pipeline)
            .bind(stage),
        )
        .await?;
    let (attempts, items): (i64, i64) = store
        .db
        .one(
            q(
                "SELECT COUNT(a.id), COUNT(DISTINCT a.item_id) FROM attempts a \
               JOIN items i ON i.id = a.item_id WHERE i.pipeline = $1 AND i.stage = $2 \
               AND a.state <> 'in_flight'",
            )
            .bind(pipeline)
            .bind(stage),
        )
        .await?;
    Ok(crate::store::History {
        answered: count(answered),
        output_tokens: count(output),
        attempts: count(attempts),
        items_attempted: count(items),
    })
}

pub(super) async fn succeeded_among(
    store: &SqlStore,
    pipeline: &str,
    stage: &str,
    keys: &[[u8; 32]],
) -> Result<Vec<[u8; 32]>> {
    let mut out = Vec::new();
    for chunk in keys.chunks(ROWS_PER_STATEMENT) {
        let mut qq = q(format!(
            "WITH c(p, s) AS (SELECT ?, ?), v(k) AS (VALUES {}) \
             SELECT v.k FROM v WHERE EXISTS (SELECT 1 FROM items i, c WHERE i.pipeline = c.p \
             AND i.stage = c.s AND i.dedupe_key = v.k AND i.state = 'succeeded')",
            values_sql(chunk.len(), 1)
        ))
        .bind(pipeline)
        .bind(stage);
        for k in chunk {
            qq.push(&k[..]);
        }
        for (k,) in store.db.all::<(Vec<u8>,)>(qq).await? {
            if let Ok(a) = <[u8; 32]>::try_from(k.as_slice()) {
                out.push(a);
            }
        }
    }
    Ok(out)
}

pub(super) async fn plannable_totals(
    store: &SqlStore,
    pipeline: &str,
    stage: &str,
) -> Result<(u64, u64)> {
    let (n, tokens): (i64, i64) = store
        .db
        .one(
            q(
                "SELECT COUNT(*), CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT) FROM items \
               WHERE pipeline = $1 AND stage = $2 AND state IN ('pending', 'failed')",
            )
            .bind(pipeline)
            .bind(stage),
        )
        .await?;
    Ok((count(n), count(tokens)))
}

pub(super) async fn run_job(store: &SqlStore, run_id: &str) -> Result<RunJob> {
    // A multi-stage run's records link to their items in `record_items`, stage by stage
    // (`run_stage_items`): of its job only the count of records is read here.
    let stages: String = store
        .db
        .scalar(q("SELECT stage FROM runs WHERE id = $1").bind(run_id))
        .await?;
    if stages.contains(',') {
        let records: i64 = store
            .db
            .scalar(q("SELECT COUNT(*) FROM records WHERE run_id = $1").bind(run_id))
            .await?;
        return Ok(RunJob {
            records: count(records),
            ..Default::default()
        });
    }
    let groups: Vec<(i64, i64, i64)> = store
        .db
        .all(
            q("SELECT input_tokens, CAST(CASE WHEN state = 'succeeded' THEN 1 ELSE 0 END AS BIGINT), COUNT(*) \
               FROM items WHERE id IN (SELECT item_id FROM records WHERE run_id = $1) \
               GROUP BY 1, 2")
            .bind(run_id),
        )
        .await?;
    let (records, records_done): (i64, i64) = store
        .db
        .one(
            q("SELECT COUNT(*), COALESCE(SUM(CASE WHEN i.state = 'succeeded' THEN 1 ELSE 0 END), 0) \
               FROM records r LEFT JOIN items i ON i.id = r.item_id WHERE r.run_id = $1")
            .bind(run_id),
        )
        .await?;
    let mut job = RunJob {
        records: count(records),
        records_done: count(records_done),
        ..Default::default()
    };
    for (_, done, n) in &groups {
        job.items += count(*n);
        if *done == 1 {
            job.items_done += count(*n);
        }
    }
    job.tokens = token_counts(groups.into_iter().map(|(t, _, n)| (t, n)).collect());
    Ok(job)
}

pub(super) async fn plannable_tokens(
    store: &SqlStore,
    pipeline: &str,
    stage: &str,
) -> Result<TokenCounts> {
    let v: Vec<(i64, i64)> = store
        .db
        .all(
            q(
                "SELECT input_tokens, COUNT(*) FROM items WHERE pipeline = $1 AND stage = $2 \
               AND state IN ('pending', 'failed') GROUP BY input_tokens",
            )
            .bind(pipeline)
            .bind(stage),
        )
        .await?;
    Ok(token_counts(v))
}

/// Grouped (tokens, items) rows as the distribution they count.
pub(super) fn token_counts(rows: Vec<(i64, i64)>) -> TokenCounts {
    TokenCounts::from_groups(rows.into_iter().map(|(t, n)| (count(t), count(n))))
}
