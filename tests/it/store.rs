//! The store contract, on SQLite and on PostgreSQL: every test below runs once per engine
//! (`store::sqlite::…`, `store::postgres::…`). Applying results is idempotent, item states
//! move only from `in_flight`, planning takes each plannable item exactly once (also when
//! planners race), leases fence out a worker that lost its batch, money sums exactly.

use std::collections::HashSet;

use nightshift::cost::{PricingMode, TokenPrice, Usage, Usd};
use nightshift::request::{PreparedRecord, RequestShape};
use nightshift::store::{
    AttemptOutcome, AttemptVerdict, BatchMode, BatchRow, BatchState, BatchUpdate, BudgetCheck,
    Claim, EndState, Engine, IngestTarget, ItemState, NewRun, PlanOutcome, PlanRequest,
    ProviderBill, RunStatus, SqlStore, Store, StoreError, WorkerInfo, now_ms,
};

use crate::common::TestDb;

/// Declares each contract test twice: on a SQLite file, and in a PostgreSQL schema of its
/// own (ignored, with the reason, when `NIGHTSHIFT_TEST_PG_URL` is not set).
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = crate::common::TestDb::sqlite().await;
                    super::$name(&db).await;
                    db.finish().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[cfg_attr(
                    not(pg_tests),
                    ignore = "NIGHTSHIFT_TEST_PG_URL is not set: PostgreSQL tests skipped (CI sets it)"
                )]
                async fn $name() {
                    let db = crate::common::TestDb::postgres(stringify!($name)).await;
                    super::$name(&db).await;
                    db.finish().await;
                }
            )*
        }
    };
}

conformance!(
    applying_the_same_results_twice_changes_nothing,
    an_oversized_request_is_exhausted_not_sent,
    attempts_never_sent_are_taken_back,
    ingest_dedupes_within_and_across_runs,
    racing_planners_take_every_item_exactly_once,
    a_budget_reserves_worst_cases_and_refuses_what_does_not_fit,
    a_lost_lease_fences_every_write,
    leases_run_out_and_are_released,
    reports_sum_money_exactly,
    the_audit_keeps_each_record_id_whole,
    the_audit_reads_in_pages_what_it_reads_whole,
    a_run_is_found_by_the_start_of_its_id,
    figures_count_each_item_once_across_retries_and_models,
    stale_runs_are_marked_interrupted,
    a_later_stage_link_decided_from_an_item_sent_again_is_not_stored,
    only_ingested_batches_are_left_to_clean_and_each_deletion_counts_once,
    a_pipeline_is_settled_only_when_no_work_is_left_in_any_state,
    a_batch_names_the_records_its_results_may_move_on,
    a_page_of_records_keeps_free_text_as_stored,
    pages_of_records_cross_gaps_in_the_lines,
    a_page_of_links_keeps_free_text_as_stored,
);

fn planned(o: PlanOutcome) -> Option<BatchRow> {
    match o {
        PlanOutcome::Planned { batch, .. } => Some(*batch),
        _ => None,
    }
}

fn new_run(id: &str) -> NewRun {
    NewRun {
        id: id.into(),
        pipeline: "p".into(),
        stage: "main".into(),
        pipeline_file: "p.toml".into(),
        source_path: "in.jsonl".into(),
        output_path: "out.jsonl".into(),
        provider: "openai".into(),
        model: "m".into(),
        pricing_mode: PricingMode::Batch,
        max_attempts: 2,
        host: "h".into(),
        pid: 1,
        budget: None,
        max_item: None,
        worker_id: Some("w-run".into()),
    }
}

fn records(shape: &RequestShape, n: usize, distinct: usize, tokens: u64) -> Vec<PreparedRecord> {
    (0..n)
        .map(|i| {
            let user = format!("\"u{}\"", i % distinct);
            PreparedRecord {
                input_tokens: tokens,
                line: i as u64 + 1,
                record_id: format!("r{i}"),
                key: shape.key(&user),
                body_bytes: shape.body_len(&user),
                user_json: user,
                data: None,
                more: Vec::new(),
            }
        })
        .collect()
}

async fn ingest(s: &SqlStore, run: &str, recs: &[PreparedRecord]) -> u64 {
    let shape = RequestShape::new("{\"m\":".into(), "}".into());
    let shape_id = s.ensure_shape(&shape).await.unwrap();
    s.ingest(
        &IngestTarget {
            run_id: run,
            pipeline: "p",
            stage: "main",
            shape_id,
            source: "in.jsonl",
            links: false,
        },
        recs,
        &[],
    )
    .await
    .unwrap()
    .new_items
}

/// A store with run `run1` and `n` records over `n - 1` distinct requests.
async fn seeded(s: &SqlStore, n: usize) -> String {
    s.create_run(&new_run("run1")).await.unwrap();
    let shape = RequestShape::new("{\"m\":".into(), "}".into());
    let new = ingest(s, "run1", &records(&shape, n, (n - 1).max(1), 10)).await;
    assert_eq!(new as usize, (n - 1).max(1), "one duplicate shares an item");
    "run1".into()
}

fn plan<'a>(run: &'a str, owner: &'a str) -> PlanRequest<'a> {
    PlanRequest {
        run_id: run,
        pipeline: "p",
        stage: "main",
        provider: "openai",
        model: "m",
        pricing_mode: PricingMode::Batch,
        max_requests: 1000,
        max_bytes: 1 << 20,
        line_overhead: 144,
        budget: None,
        only_retries: false,
        mode: BatchMode::Batch,
        owner,
        lease_ms: 60_000,
    }
}

fn outcomes_for(
    attempts: &[nightshift::store::AttemptRef],
    ok: impl Fn(usize) -> bool,
) -> Vec<AttemptOutcome> {
    attempts
        .iter()
        .enumerate()
        .map(|(i, a)| AttemptOutcome {
            attempt_id: a.id,
            item_id: a.item_id,
            attempt_no: a.attempt_no,
            custom_id: a.custom_id.clone(),
            succeeded: ok(i),
            verdict: if ok(i) {
                AttemptVerdict::Ok
            } else {
                AttemptVerdict::InvalidJson
            },
            error: None,
            finish_reason: Some("stop".into()),
            model: Some("m".into()),
            result: ok(i).then(|| "{}".to_string()),
            usage: Usage {
                input_tokens: 10,
                output_tokens: 5,
                ..Default::default()
            },
            cost: Usd::from_pico(1_000 + i as i128),
            standard_cost: Usd::from_pico(2_000),
        })
        .collect()
}

async fn applying_the_same_results_twice_changes_nothing(db: &TestDb) {
    let s = &db.store;
    let run = seeded(s, 11).await;
    let b = planned(s.plan_batch(&plan(&run, "w1")).await.unwrap()).unwrap();
    assert_eq!(b.request_count, 10);
    assert!(
        planned(s.plan_batch(&plan(&run, "w1")).await.unwrap()).is_none(),
        "nothing left to plan"
    );
    let attempts = s.batch_attempts(&b.id).await.unwrap();
    let outcomes = outcomes_for(&attempts, |i| i % 2 == 0);
    let first = s.apply_results(&b, &outcomes, 2).await.unwrap();
    assert_eq!((first.applied, first.succeeded, first.failed), (10, 5, 5));
    let second = s.apply_results(&b, &outcomes, 2).await.unwrap();
    assert_eq!(
        (second.applied, second.already_applied, second.succeeded),
        (0, 10, 0)
    );
    let t = s.ledger_totals_for_batch(&b.id).await.unwrap();
    assert_eq!(t.rows, 10);
    assert_eq!(t.usage.input_tokens, 100);
    assert_eq!(t.cost.pico(), (0..10).map(|i| 1_000 + i).sum::<i128>());

    // The failed half is planned again, as attempt 2, in a batch of its own.
    let ended = BatchUpdate {
        state: Some(BatchState::Ended),
        ..Default::default()
    };
    assert!(
        s.update_batch(&b, BatchState::Planned, &ended)
            .await
            .unwrap()
    );
    let rest = s
        .finish_ingest(&b, AttemptVerdict::Missing, "x", 2, None)
        .await
        .unwrap();
    assert_eq!(rest.applied, 0, "every attempt had a result");
    assert_eq!(
        s.batch(&b.id).await.unwrap().unwrap().state,
        BatchState::Ingested
    );
    let b2 = planned(s.plan_batch(&plan(&run, "w1")).await.unwrap()).unwrap();
    assert_eq!(b2.request_count, 5);
    let a2 = s.batch_attempts(&b2.id).await.unwrap();
    assert!(
        a2.iter()
            .all(|a| a.attempt_no == 2 && a.custom_id.ends_with("-2"))
    );
    // Nothing came back for them: they fail, and at the cap they are exhausted.
    let rest = s
        .finish_ingest(&b2, AttemptVerdict::Missing, "no line", 2, None)
        .await
        .unwrap();
    assert_eq!((rest.applied, rest.exhausted), (5, 5));
    assert!(planned(s.plan_batch(&plan(&run, "w1")).await.unwrap()).is_none());
    let f = s.run_figures(&run).await.unwrap();
    assert_eq!(
        (f.succeeded, f.exhausted, f.records_valid, f.unique_items),
        (5, 5, 11, 10)
    );
    assert_eq!(f.attempts, 15);
    // Raising the cap gives the exhausted items another chance.
    assert_eq!(s.revive_exhausted("p", "main", 3).await.unwrap(), 5);
    assert_eq!(s.plannable_retries("p", "main").await.unwrap(), 5);
}

async fn an_oversized_request_is_exhausted_not_sent(db: &TestDb) {
    let s = &db.store;
    let run = seeded(s, 3).await;
    let mut req = plan(&run, "w1");
    req.max_bytes = 100; // smaller than any line
    assert!(planned(s.plan_batch(&req).await.unwrap()).is_none());
    let f = s.run_figures(&run).await.unwrap();
    assert_eq!(f.exhausted, f.unique_items);
}

async fn attempts_never_sent_are_taken_back(db: &TestDb) {
    let s = &db.store;
    let run = seeded(s, 11).await;
    // Attempt 1: half succeed, half fail.
    let b = planned(s.plan_batch(&plan(&run, "w1")).await.unwrap()).unwrap();
    let attempts = s.batch_attempts(&b.id).await.unwrap();
    s.apply_results(&b, &outcomes_for(&attempts, |i| i % 2 == 0), 2)
        .await
        .unwrap();
    let ended = BatchUpdate {
        state: Some(BatchState::Ended),
        ..Default::default()
    };
    assert!(
        s.update_batch(&b, BatchState::Planned, &ended)
            .await
            .unwrap()
    );
    s.finish_ingest(&b, AttemptVerdict::Missing, "x", 2, None)
        .await
        .unwrap();
    // Attempt 2 is planned for the failed half, then cancelled before it is sent.
    let b2 = planned(s.plan_batch(&plan(&run, "w1")).await.unwrap()).unwrap();
    assert_eq!(b2.request_count, 5);
    assert_eq!(s.return_unsent(&b2, "cancelled").await.unwrap(), 5);
    let ended = s.batch(&b2.id).await.unwrap().unwrap();
    assert_eq!(
        (ended.state, ended.end_state),
        (BatchState::Ended, Some(EndState::Cancelled))
    );
    assert!(s.batch_attempts(&b2.id).await.unwrap().is_empty());
    assert_eq!(s.plannable_retries("p", "main").await.unwrap(), 5);
    // With max_attempts 2 they are not exhausted: attempt 2 is theirs to make.
    let rest = s
        .finish_ingest(
            &b2,
            AttemptVerdict::Cancelled,
            "before it was sent",
            2,
            None,
        )
        .await
        .unwrap();
    assert_eq!((rest.applied, rest.exhausted), (0, 0));
    let b3 = planned(s.plan_batch(&plan(&run, "w1")).await.unwrap()).unwrap();
    let a3 = s.batch_attempts(&b3.id).await.unwrap();
    assert_eq!(a3.len(), 5);
    assert!(a3.iter().all(|a| a.attempt_no == 2), "{a3:?}");
    // First attempts go back to pending.
    let fresh = seeded_more(s, &run).await;
    let b4 = planned(s.plan_batch(&plan(&run, "w1")).await.unwrap()).unwrap();
    assert_eq!(b4.request_count as u64, fresh);
    assert_eq!(s.return_unsent(&b4, "cancelled").await.unwrap(), fresh);
    assert_eq!(s.plannable_count("p", "main").await.unwrap(), fresh);
    assert_eq!(s.plannable_retries("p", "main").await.unwrap(), 0);
    let f = s.run_figures(&run).await.unwrap();
    assert_eq!(
        f.attempts, 15,
        "10 first attempts + 5 second; none for what was not sent"
    );
}

/// Ingests 4 more distinct records into `run`; returns how many new items that made.
async fn seeded_more(s: &SqlStore, run: &str) -> u64 {
    let shape = RequestShape::new("{\"m\":".into(), "}".into());
    let recs: Vec<PreparedRecord> = (0..4)
        .map(|i| {
            let user = format!("\"more{i}\"");
            PreparedRecord {
                input_tokens: 10,
                line: 100 + i,
                record_id: format!("m{i}"),
                key: shape.key(&user),
                body_bytes: shape.body_len(&user),
                user_json: user,
                data: None,
                more: Vec::new(),
            }
        })
        .collect();
    ingest(s, run, &recs).await
}

async fn ingest_dedupes_within_and_across_runs(db: &TestDb) {
    let s = &db.store;
    s.create_run(&new_run("a")).await.unwrap();
    s.create_run(&new_run("b")).await.unwrap();
    let shape = RequestShape::new("{\"m\":".into(), "}".into());
    // 1,000 records over 700 distinct requests: several statements per chunk.
    let recs = records(&shape, 1000, 700, 7);
    assert_eq!(ingest(s, "a", &recs).await, 700);
    // The same records in a later run add records, not items.
    assert_eq!(ingest(s, "b", &recs).await, 0);
    let fa = s.run_figures("a").await.unwrap();
    let fb = s.run_figures("b").await.unwrap();
    assert_eq!((fa.records_valid, fa.unique_items), (1000, 700));
    assert_eq!((fb.records_valid, fb.unique_items), (1000, 700));
    assert_eq!(s.plannable_count("p", "main").await.unwrap(), 700);
    let tokens = s.plannable_tokens("p", "main").await.unwrap();
    assert_eq!(tokens.len(), 700);
    assert_eq!((tokens.total(), tokens.max()), (4900, 7));
    let keys: Vec<[u8; 32]> = recs[..3].iter().map(|r| r.key).collect();
    assert!(
        s.succeeded_among("p", "main", &keys)
            .await
            .unwrap()
            .is_empty()
    );
    let page = s.run_records("b", 0, 10).await.unwrap();
    assert_eq!(page.len(), 10);
    assert_eq!(page[0].record_id, "r0");
    assert!(page.iter().all(|r| r.state == ItemState::Pending));

    // Every record points at the item of its own request, in both runs: records with the
    // same request share one item, and no two requests share one.
    let item_of = |run: &'static str| async move {
        s.run_records(run, 0, 2000)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.item_id)
            .collect::<Vec<_>>()
    };
    let (ia, ib) = (item_of("a").await, item_of("b").await);
    assert_eq!(ia, ib);
    assert_eq!(ia.len(), 1000);
    for (i, id) in ia.iter().enumerate() {
        assert_eq!(*id, ia[i % 700], "record {i}");
    }
    let distinct: std::collections::HashSet<_> = ia.iter().collect();
    assert_eq!(distinct.len(), 700);
    // New items take their ids in the order their records come (the store may write their
    // keys in another order): batches are cut in the source's order.
    assert!(ia[..700].windows(2).all(|w| w[0] < w[1]));

    // One chunk that holds a new request twice, beside stored ones.
    s.create_run(&new_run("c")).await.unwrap();
    let mixed: Vec<PreparedRecord> = ["\"c0\"", "\"u3\"", "\"c0\"", "\"c1\"", "\"u3\"", "\"c1\""]
        .iter()
        .enumerate()
        .map(|(i, user)| PreparedRecord {
            input_tokens: 7,
            line: i as u64 + 1,
            record_id: format!("c{i}"),
            key: shape.key(user),
            body_bytes: shape.body_len(user),
            user_json: user.to_string(),
            data: None,
            more: Vec::new(),
        })
        .collect();
    assert_eq!(ingest(s, "c", &mixed).await, 2);
    let ic = item_of("c").await;
    assert_eq!((ic[0], ic[3]), (ic[2], ic[5]));
    assert_ne!(ic[0], ic[3]);
    assert_eq!((ic[1], ic[4]), (ia[3], ia[3]));
    assert!(!ia.contains(&ic[0]) && !ia.contains(&ic[3]));
    assert_eq!(s.plannable_count("p", "main").await.unwrap(), 702);

    // The job a plan starts from, in two passes.
    let job = s.run_job("c").await.unwrap();
    assert_eq!(
        (job.records, job.records_done, job.items, job.items_done),
        (6, 0, 3, 0)
    );
    assert_eq!((job.tokens.len(), job.tokens.total()), (3, 21));

    // Every item's request is its own record's: the batch file's lines, by item id.
    let mut want: std::collections::HashMap<i64, &str> = std::collections::HashMap::new();
    for (r, id) in recs.iter().zip(&ia).chain(mixed.iter().zip(&ic)) {
        assert_eq!(*want.entry(*id).or_insert(&r.user_json), r.user_json);
    }
    let batch = planned(s.plan_batch(&plan("c", "w")).await.unwrap()).unwrap();
    assert_eq!(batch.request_count, 702);
    let mut lines: Vec<nightshift::store::BatchLine> = Vec::new();
    loop {
        let after = lines.last().map_or(0, |l| l.attempt_id);
        let page = s.batch_lines(&batch.id, after, 5000).await.unwrap();
        if page.is_empty() {
            break;
        }
        lines.extend(page);
    }
    assert_eq!(lines.len(), 702);
    for l in &lines {
        // custom_id: b<batch>-<item id>-<attempt>
        let id: i64 = l.custom_id.rsplit('-').nth(1).unwrap().parse().unwrap();
        assert_eq!(
            Some(&l.user_json.as_str()),
            want.get(&id),
            "{}",
            l.custom_id
        );
    }
}

async fn racing_planners_take_every_item_exactly_once(db: &TestDb) {
    let s = &db.store;
    s.create_run(&new_run("run1")).await.unwrap();
    let shape = RequestShape::new("{\"m\":".into(), "}".into());
    ingest(s, "run1", &records(&shape, 2000, 2000, 3)).await;
    // Four planners at once, 50 requests per batch.
    let mut tasks = Vec::new();
    for w in 0..4 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let owner = format!("w{w}");
            let mut mine = Vec::new();
            let mut idle = 0;
            while idle < 3 {
                let mut req = plan("run1", &owner);
                req.max_requests = 50;
                match planned(s.plan_batch(&req).await.unwrap()) {
                    Some(b) => {
                        idle = 0;
                        assert_eq!(b.lease_owner.as_deref(), Some(owner.as_str()));
                        mine.push(b.id);
                    }
                    None => {
                        idle += 1;
                        tokio::task::yield_now().await;
                    }
                }
            }
            mine
        }));
    }
    let mut items = HashSet::new();
    let mut attempts = 0;
    for t in tasks {
        for b in t.await.unwrap() {
            for a in s.batch_attempts(&b).await.unwrap() {
                attempts += 1;
                assert!(items.insert(a.item_id), "item {} planned twice", a.item_id);
                assert_eq!(a.attempt_no, 1);
            }
        }
    }
    assert_eq!((items.len(), attempts), (2000, 2000));
    assert_eq!(s.plannable_count("p", "main").await.unwrap(), 0);
}

async fn a_budget_reserves_worst_cases_and_refuses_what_does_not_fit(db: &TestDb) {
    let s = &db.store;
    let run = seeded(s, 11).await; // 10 items of 10 input tokens
    // $1 per token in, $1 per token out, 5 output tokens at most: 15 dollars per item.
    let budget = |available: Usd| BudgetCheck {
        available,
        input_price: TokenPrice::per_token("1").unwrap(),
        output_price: TokenPrice::per_token("1").unwrap(),
        max_output_tokens: 5,
        max_item_input_tokens: None,
    };
    let dollars = |d: i128| Usd::from_pico(d * 1_000_000_000_000);
    let mut req = plan(&run, "w1");
    req.budget = Some(budget(dollars(50)));
    let b = planned(s.plan_batch(&req).await.unwrap()).unwrap();
    assert_eq!(b.request_count, 3, "three worst cases fit in $50");
    assert_eq!(b.reserved_pico as i128, dollars(45).pico());
    assert_eq!(s.run_commitment(&run).await.unwrap(), dollars(45));
    req.budget = Some(budget(dollars(50) - s.run_commitment(&run).await.unwrap()));
    match s.plan_batch(&req).await.unwrap() {
        PlanOutcome::OverBudget { next_worst_case } => assert_eq!(next_worst_case, dollars(15)),
        other => panic!("expected over budget, got {other:?}"),
    }
    // A per-item cap below every item's size refuses them all.
    req.budget = Some(BudgetCheck {
        max_item_input_tokens: Some(9),
        ..budget(dollars(1_000))
    });
    assert!(matches!(
        s.plan_batch(&req).await.unwrap(),
        PlanOutcome::Nothing
    ));
    assert_eq!(s.plannable_over("p", "main", 9).await.unwrap(), 7);
}

async fn a_lost_lease_fences_every_write(db: &TestDb) {
    let s = &db.store;
    let run = seeded(s, 5).await;
    let b = planned(s.plan_batch(&plan(&run, "w1")).await.unwrap()).unwrap();
    assert_eq!((b.lease_owner.as_deref(), b.lease_token), (Some("w1"), 1));
    // w1 renews its own claim without a new token.
    let mine = s.claim_batches(&claim("w1", false, 60_000)).await.unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].lease_token, 1);
    // w2 asks while w1's lease runs: PostgreSQL says no; SQLite (one process per store,
    // under its run lock) hands it over. Forcing (`cancel`) takes it on both.
    let w2 = s.claim_batches(&claim("w2", false, 60_000)).await.unwrap();
    match s.engine() {
        Engine::Postgres => assert!(w2.is_empty(), "a live lease is honoured"),
        Engine::Sqlite => assert_eq!(w2.len(), 1),
    }
    let taken = s.claim_batches(&claim("w3", true, 60_000)).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert!(taken[0].lease_token > 1);
    assert_eq!(taken[0].lease_owner.as_deref(), Some("w3"));

    // Every write w1 still tries is refused, and changes nothing.
    let built = BatchUpdate {
        state: Some(BatchState::Built),
        ..Default::default()
    };
    assert!(matches!(
        s.update_batch(&b, BatchState::Planned, &built).await,
        Err(StoreError::LeaseLost { .. })
    ));
    let attempts = s.batch_attempts(&b.id).await.unwrap();
    let outcomes = outcomes_for(&attempts, |_| true);
    assert!(matches!(
        s.apply_results(&b, &outcomes, 2).await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert!(matches!(
        s.finish_ingest(&b, AttemptVerdict::Missing, "x", 2, None)
            .await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert!(matches!(
        s.mark_dispatched(&b, &[attempts[0].id]).await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert_eq!(s.ledger_totals_for_batch(&b.id).await.unwrap().rows, 0);
    assert_eq!(
        s.batch(&b.id).await.unwrap().unwrap().state,
        BatchState::Planned
    );
    // The holder's writes go through; a state that moved on is a plain `false`.
    let holder = &taken[0];
    assert!(
        s.update_batch(holder, BatchState::Planned, &built)
            .await
            .unwrap()
    );
    assert!(
        !s.update_batch(holder, BatchState::Planned, &built)
            .await
            .unwrap()
    );
    let applied = s.apply_results(holder, &outcomes, 2).await.unwrap();
    assert_eq!(applied.succeeded, 4);
}

fn claim(owner: &str, force: bool, lease_ms: i64) -> Claim<'_> {
    Claim {
        pipeline: Some("p"),
        batch_id: None,
        owner,
        lease_ms,
        force,
    }
}

async fn leases_run_out_and_are_released(db: &TestDb) {
    let s = &db.store;
    let run = seeded(s, 5).await;
    let w1 = WorkerInfo {
        id: "w1".into(),
        host: "host-a".into(),
        pid: 11,
        role: "worker",
        pipelines: "p".into(),
    };
    s.heartbeat(&w1, 60_000).await.unwrap();
    let mut req = plan(&run, "w1");
    req.lease_ms = 1; // runs out at once
    let b = planned(s.plan_batch(&req).await.unwrap()).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    // A heartbeat renews it again.
    assert_eq!(s.heartbeat(&w1, 60_000).await.unwrap(), 1);
    let ws = s.workers(0).await.unwrap();
    assert_eq!(ws.len(), 1);
    assert_eq!(
        (ws[0].host.as_str(), ws[0].pid, ws[0].held),
        ("host-a", 11, 1)
    );
    // w1's last heartbeat gives its lease a millisecond; then it dies and the lease runs
    // out; w2 adopts the batch.
    assert_eq!(s.heartbeat(&w1, 1).await.unwrap(), 1);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let adopted = s.claim_batches(&claim("w2", false, 60_000)).await.unwrap();
    assert_eq!(adopted.len(), 1);
    assert_eq!(adopted[0].id, b.id);
    assert_eq!(adopted[0].lease_token, b.lease_token + 1);
    // A clean stop hands leases back at once.
    assert_eq!(s.release_leases("w2", true).await.unwrap(), 1);
    let free = s.claim_batches(&claim("w3", false, 60_000)).await.unwrap();
    assert_eq!(free.len(), 1);
    assert_eq!(free[0].lease_owner.as_deref(), Some("w3"));
}

/// Plans a batch of one more of the run's items (a retry, once its first attempts are in)
/// and answers it; returns its attempts.
async fn answer_one_more(s: &SqlStore, run: &str) -> Vec<nightshift::store::AttemptRef> {
    let b = planned(
        s.plan_batch(&PlanRequest {
            max_requests: 1,
            ..plan(run, "w1")
        })
        .await
        .unwrap(),
    )
    .unwrap();
    let attempts = s.batch_attempts(&b.id).await.unwrap();
    s.apply_results(&b, &outcomes_for(&attempts, |_| true), 2)
        .await
        .unwrap();
    attempts
}

/// A second run, `run2`, of the same five records, once `seeded`'s run has left one item
/// failed: it plans that item's second attempt, and only that; returns its batch and attempts.
async fn run2_takes_the_last_failed_item(
    s: &SqlStore,
) -> (BatchRow, Vec<nightshift::store::AttemptRef>) {
    s.create_run(&new_run("run2")).await.unwrap();
    let shape = RequestShape::new("{\"m\":".into(), "}".into());
    ingest(s, "run2", &records(&shape, 5, 4, 10)).await;
    let b = planned(s.plan_batch(&plan("run2", "w1")).await.unwrap()).unwrap();
    let attempts = s.batch_attempts(&b.id).await.unwrap();
    assert_eq!((attempts.len(), attempts[0].attempt_no), (1, 2));
    (b, attempts)
}

async fn figures_count_each_item_once_across_retries_and_models(db: &TestDb) {
    let s = &db.store;
    let run = seeded(s, 5).await;
    // First batch: the four items; two answers, from two models, and two failures.
    let b1 = planned(s.plan_batch(&plan(&run, "w1")).await.unwrap()).unwrap();
    let attempts = s.batch_attempts(&b1.id).await.unwrap();
    assert_eq!(attempts.len(), 4);
    let mut outcomes = outcomes_for(&attempts, |i| i < 2);
    outcomes[1].model = Some("m-2024".into());
    s.apply_results(&b1, &outcomes, 2).await.unwrap();
    // Second batch of the same run: one of the two failed items again, answered.
    let retried = answer_one_more(s, &run).await;
    assert_eq!((retried.len(), retried[0].attempt_no), (1, 2));
    let f = s.run_figures(&run).await.unwrap();
    assert_eq!(
        (f.batches, f.attempts, f.items_attempted, f.answered),
        (2, 5, 4, 5),
        "five attempts carried four items"
    );
    assert_eq!(f.models, vec!["m".to_string(), "m-2024".to_string()]);
    assert_eq!(f.ledger.rows, 5);
    assert_eq!(
        f.ledger.cost.pico(),
        outcomes.iter().map(|o| o.cost.pico()).sum::<i128>() + 1_000
    );
    // The next run takes the last failed item: its first attempt was the earlier run's,
    // so here it is one attempt of one item.
    let (b3, last) = run2_takes_the_last_failed_item(s).await;
    s.apply_results(&b3, &outcomes_for(&last, |_| true), 2)
        .await
        .unwrap();
    let f2 = s.run_figures("run2").await.unwrap();
    assert_eq!(
        (f2.batches, f2.attempts, f2.items_attempted, f2.ledger.rows),
        (1, 1, 1, 1)
    );
    assert_eq!(f2.models, vec!["m".to_string()]);
    let f1 = s.run_figures(&run).await.unwrap();
    assert_eq!(
        (f1.attempts, f1.items_attempted),
        (5, 4),
        "run1 is unchanged"
    );
}

/// `--run` takes a run id or the start of one, on either engine; `_` and `%` are plain
/// characters there.
async fn a_run_is_found_by_the_start_of_its_id(db: &TestDb) {
    let s = &db.store;
    for id in ["01a2-aaaa", "01a2-abbb", "01b_c%"] {
        s.create_run(&new_run(id)).await.unwrap();
    }
    let found = |prefix: &'static str| async move {
        let mut ids: Vec<String> = s
            .runs_with_prefix(prefix, 5)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(found("01a2-aaaa").await, ["01a2-aaaa"], "a whole id");
    assert_eq!(found("01a2-a").await, ["01a2-aaaa", "01a2-abbb"]);
    assert_eq!(found("01a2-ab").await, ["01a2-abbb"]);
    assert_eq!(found("01b_").await, ["01b_c%"]);
    assert!(found("01a_").await.is_empty(), "`_` is not a wildcard");
    assert!(found("01a2%").await.is_empty(), "`%` is not a wildcard");
    assert!(found("01a2-aaaa-more").await.is_empty());
    assert_eq!(
        s.runs_with_prefix("01", 2).await.unwrap().len(),
        2,
        "at most the limit"
    );
}

/// `report --items --json` reads the audit a page of items at a time: the pages, at any size,
/// hold the run's attempts in item and attempt order, each once, and no other run's, though
/// another run sent one of the same items again.
async fn the_audit_reads_in_pages_what_it_reads_whole(db: &TestDb) {
    let s = &db.store;
    let run = seeded(s, 5).await;
    // Four items: two answered, two failed; then one of the failed sent again, answered.
    let b1 = planned(s.plan_batch(&plan(&run, "w1")).await.unwrap()).unwrap();
    let first = s.batch_attempts(&b1.id).await.unwrap();
    s.apply_results(&b1, &outcomes_for(&first, |i| i < 2), 2)
        .await
        .unwrap();
    answer_one_more(s, &run).await;
    // Another run takes the last failed item: its second attempt is that run's.
    let (_, other) = run2_takes_the_last_failed_item(s).await;

    let key = |r: &nightshift::store::AuditRow| (r.item_id, r.attempt_no, r.custom_id.clone());
    let whole: Vec<_> = s.audit(&run).await.unwrap().iter().map(key).collect();
    assert_eq!(whole.len(), 5, "four first attempts and one retry");
    let mut sorted = whole.clone();
    sorted.sort();
    assert_eq!(whole, sorted, "in item and attempt order");
    assert!(whole.iter().all(|k| k.2 != other[0].custom_id));
    let items = s.audit_items(&run).await.unwrap();
    assert_eq!(items.len(), 4, "the run's four items, each once");
    assert!(items.windows(2).all(|w| w[0] < w[1]), "ascending");
    for size in [1, 2, 3, 4] {
        let mut paged = Vec::new();
        for chunk in items.chunks(size) {
            let page = s.audit_page(&run, chunk).await.unwrap();
            assert!(
                page.iter()
                    .all(|r| r.run_id == run && r.record_ids.is_empty())
            );
            assert!(page.iter().all(|r| chunk.contains(&r.item_id)));
            paged.extend(page.iter().map(key));
        }
        assert_eq!(paged, whole, "pages of {size} item(s)");
    }
    let run2: Vec<_> = s
        .audit_page("run2", &s.audit_items("run2").await.unwrap())
        .await
        .unwrap()
        .iter()
        .map(key)
        .collect();
    assert_eq!(
        run2,
        [(other[0].item_id, 2, other[0].custom_id.clone())],
        "the other run's page holds its own attempt only"
    );
    // The records of each item, for the pages: the shared item lists both, sorted.
    let ids = s.audit_record_ids(&run).await.unwrap();
    assert_eq!(ids.len(), 4);
    assert!(
        ids.values()
            .any(|l| l == &["r0".to_string(), "r4".to_string()])
    );
    let audit = s.audit(&run).await.unwrap();
    assert!(
        audit
            .iter()
            .all(|r| ids.get(&r.item_id) == Some(&r.record_ids))
    );
}

/// A record id may hold a comma (a quoted CSV field): the audit lists it as one id.
async fn the_audit_keeps_each_record_id_whole(db: &TestDb) {
    let s = &db.store;
    s.create_run(&new_run("run1")).await.unwrap();
    let shape = RequestShape::new("{\"m\":".into(), "}".into());
    let mut recs = records(&shape, 2, 1, 10);
    recs[0].record_id = "sku,12".into();
    recs[1].record_id = "sku-7".into();
    assert_eq!(
        ingest(s, "run1", &recs).await,
        1,
        "both records share one item"
    );
    let b = planned(s.plan_batch(&plan("run1", "w1")).await.unwrap()).unwrap();
    let attempts = s.batch_attempts(&b.id).await.unwrap();
    s.apply_results(&b, &outcomes_for(&attempts, |_| true), 2)
        .await
        .unwrap();
    let audit = s.audit("run1").await.unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(
        audit[0].record_ids,
        ["sku,12".to_string(), "sku-7".to_string()]
    );
}

async fn reports_sum_money_exactly(db: &TestDb) {
    let s = &db.store;
    let run = seeded(s, 11).await;
    let b = planned(s.plan_batch(&plan(&run, "w1")).await.unwrap()).unwrap();
    let attempts = s.batch_attempts(&b.id).await.unwrap();
    let mut outcomes = outcomes_for(&attempts, |_| true);
    // Amounts near the top of the ledger's range still add up exactly.
    for (i, o) in outcomes.iter_mut().enumerate() {
        o.cost = Usd::from_pico(123_456_789_012_345 + i as i128);
        o.usage.cached_input_tokens = 3;
        o.usage.reasoning_tokens = 2;
    }
    s.apply_results(&b, &outcomes, 2).await.unwrap();
    let f = s.run_figures(&run).await.unwrap();
    assert_eq!(f.ledger.rows, 10);
    assert_eq!(
        f.ledger.cost.pico(),
        (0..10).map(|i| 123_456_789_012_345 + i).sum::<i128>()
    );
    assert_eq!(f.ledger.standard_cost.pico(), 20_000);
    assert_eq!(
        (
            f.ledger.usage.cached_input_tokens,
            f.ledger.usage.reasoning_tokens
        ),
        (30, 20)
    );
    assert_eq!((f.answered, f.succeeded, f.processed_records), (10, 10, 11));
    assert_eq!(f.models, vec!["m".to_string()]);
    let h = s.history("p", "main").await.unwrap();
    assert_eq!((h.answered, h.output_tokens, h.attempts), (10, 50, 10));
    let audit = s.audit(&run).await.unwrap();
    assert_eq!(audit.len(), 10);
    assert!(
        audit
            .iter()
            .any(|r| r.record_ids == ["r0".to_string(), "r10".to_string()]),
        "the shared item lists both records, sorted"
    );
    // The provider's own bill, recorded twice, is kept once (the latest).
    let mut bill = ProviderBill {
        provider_batch_id: "batch_x".into(),
        requests: 10,
        usage: f.ledger.usage,
        cost: f.ledger.cost,
        source: "simulator".into(),
    };
    s.record_provider_bill(&bill).await.unwrap();
    bill.requests = 11;
    s.record_provider_bill(&bill).await.unwrap();
    assert_eq!(s.provider_bill("batch_x").await.unwrap(), Some(bill));
    s.record_anomaly(
        Some(&run),
        Some(&b.id),
        "duplicate_line",
        Some("c1"),
        "twice",
    )
    .await
    .unwrap();
    assert_eq!(s.anomaly_count(&run).await.unwrap(), 1);
    assert_eq!(s.anomalies_of_kind("duplicate_line").await.unwrap(), 1);
    let keys: Vec<[u8; 32]> = {
        let shape = RequestShape::new("{\"m\":".into(), "}".into());
        records(&shape, 2, 2, 10).iter().map(|r| r.key).collect()
    };
    assert_eq!(
        s.succeeded_among("p", "main", &keys).await.unwrap().len(),
        2
    );
}

async fn stale_runs_are_marked_interrupted(db: &TestDb) {
    let s = &db.store;
    let live = WorkerInfo {
        id: "w-live".into(),
        host: "h".into(),
        pid: 2,
        role: "run",
        pipelines: "p".into(),
    };
    s.heartbeat(&live, 60_000).await.unwrap();
    // Run ids sort in creation order, as real (UUIDv7) ones do.
    let mut a = new_run("run-a-dead");
    a.worker_id = Some("w-gone".into());
    s.create_run(&a).await.unwrap();
    let mut b = new_run("run-b-alive");
    b.worker_id = Some("w-live".into());
    s.create_run(&b).await.unwrap();
    let marked = s.mark_stale_runs(now_ms() - 60_000).await.unwrap();
    let status = |id: &'static str| async move { s.run(id).await.unwrap().unwrap().status };
    match s.engine() {
        // Under the run lock nothing else can be running.
        Engine::Sqlite => assert_eq!(marked, 2),
        // Only the run whose process has no heartbeat.
        Engine::Postgres => {
            assert_eq!(marked, 1);
            assert_eq!(status("run-b-alive").await, RunStatus::Running);
        }
    }
    assert_eq!(status("run-a-dead").await, RunStatus::Interrupted);
    s.finish_run("run-b-alive", RunStatus::Completed, 0, None)
        .await
        .unwrap();
    assert_eq!(
        s.last_run(Some("p")).await.unwrap().unwrap().id,
        "run-b-alive"
    );
}

/// A record advanced from an item that is no longer succeeded (a failed review sent it again,
/// perhaps from another worker, since the record was read) gets no link, nor item, at the
/// next stage; once the item succeeds again, the same advance stores them; repeating it
/// changes nothing.
async fn a_later_stage_link_decided_from_an_item_sent_again_is_not_stored(db: &TestDb) {
    let s = &db.store;
    let shape_id = one_staged_record(s).await;
    let link = review_link(s).await;
    let target = |stage| staged_target(stage, shape_id);
    let count = |sql: &'static str| async move { s.count_where(sql).await.unwrap() };
    // The parent is pending (never succeeded, or sent again): nothing is stored.
    assert_eq!(
        s.add_links(&target("review"), std::slice::from_ref(&link))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM record_items WHERE stage = 'review'").await,
        0
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM items WHERE stage = 'review'").await,
        0
    );
    // Succeeded: the link, the item and its parent are stored, once.
    main_succeeded(s).await;
    for _ in 0..2 {
        s.add_links(&target("review"), std::slice::from_ref(&link))
            .await
            .unwrap();
        assert_eq!(
            count("SELECT COUNT(*) FROM record_items WHERE stage = 'review'").await,
            1
        );
        assert_eq!(
            count("SELECT COUNT(*) FROM items WHERE stage = 'review'").await,
            1
        );
        assert_eq!(count("SELECT COUNT(*) FROM item_parents").await, 1);
    }
}

/// After a batch's results, the runner advances only the records linked to the batch's
/// items (every record sharing one of them, and no other), and finds among those the same
/// ready records a pass over the whole run finds.
async fn a_batch_names_the_records_its_results_may_move_on(db: &TestDb) {
    let s = &db.store;
    // Six records over three requests: lines 1 and 4 share an item, 2 and 5, 3 and 6.
    let shape_id = staged_records(s, 6, 3).await;
    let mut req = plan("run1", "w1");
    req.max_requests = 2;
    let batch = planned(s.plan_batch(&req).await.unwrap()).expect("two items are planned");
    assert_eq!(
        s.batch_record_lines("run1", &batch.id).await.unwrap(),
        vec![1, 2, 4, 5],
        "every record linked to the batch's two items, once, in line order"
    );
    assert!(
        s.batch_record_lines("run2", &batch.id)
            .await
            .unwrap()
            .is_empty(),
        "only the run's own records"
    );
    let needs = ["main".to_string()];
    let all = [1, 2, 3, 4, 5, 6];
    let lines_of =
        |r: Vec<nightshift::store::ReadyRecord>| -> Vec<i64> { r.iter().map(|r| r.line).collect() };
    assert!(
        s.ready_records_at("run1", "review", &needs, &all)
            .await
            .unwrap()
            .is_empty(),
        "nothing is ready before a result"
    );
    assert!(
        s.ready_records("run1", "review", &needs, 0, 100)
            .await
            .unwrap()
            .is_empty(),
        "nor in a pass over the whole run"
    );
    exec(
        s,
        &format!(
            "UPDATE items SET state = 'succeeded' WHERE id IN \
             (SELECT item_id FROM attempts WHERE batch_id = '{}')",
            batch.id
        ),
    )
    .await;
    exec(
        s,
        "INSERT INTO item_results (item_id, result) \
         SELECT id, '{\"ok\":1}' FROM items WHERE state = 'succeeded'",
    )
    .await;
    let ready = s
        .ready_records_at("run1", "review", &needs, &all)
        .await
        .unwrap();
    let whole = s
        .ready_records("run1", "review", &needs, 0, 100)
        .await
        .unwrap();
    assert_eq!(lines_of(ready.clone()), vec![1, 2, 4, 5]);
    assert_eq!(
        lines_of(whole),
        vec![1, 2, 4, 5],
        "the same as a whole pass"
    );
    for r in &ready {
        assert_eq!(r.record_id, format!("r{}", r.line - 1));
        assert_eq!(r.inputs.len(), 1, "the record's one link at `main`");
        assert_eq!(r.inputs[0].result.as_deref(), Some("{\"ok\":1}"));
    }
    assert!(
        s.ready_records_at("run1", "review", &needs, &[3, 6])
            .await
            .unwrap()
            .is_empty(),
        "the records of the items still in flight are not"
    );
    // Once a record has its `review` link it is no longer ready.
    let link = review_link_at(1, ready[0].inputs[0].item_id.unwrap());
    s.add_links(&staged_target("review", shape_id), &[link])
        .await
        .unwrap();
    assert_eq!(
        lines_of(
            s.ready_records_at("run1", "review", &needs, &[1, 2])
                .await
                .unwrap()
        ),
        vec![2]
    );
}

/// A `review` item for the record at `line`, rendered from item `parent`.
fn review_link_at(line: i64, parent: i64) -> nightshift::store::NewLinks {
    use nightshift::request::PreparedItem;
    use nightshift::store::{NewLinks, StageLink};
    let shape = RequestShape::new("{\"m\":".into(), "}".into());
    let user = format!("\"review {line}\"");
    NewLinks {
        line,
        link: StageLink::Items {
            items: vec![PreparedItem {
                key: shape.key(&user),
                input_tokens: 5,
                body_bytes: shape.body_len(&user),
                user_json: user,
            }],
        },
        parents: vec![parent],
    }
}

/// Runs raw SQL on the store's pool (to put rows in a state a test needs).
async fn exec(s: &SqlStore, sql: &str) {
    match (s.sqlite_pool(), s.pg_pool()) {
        (Some(p), _) => {
            sqlx::query(sql).execute(p).await.unwrap();
        }
        (_, Some(p)) => {
            sqlx::query(sql).execute(p).await.unwrap();
        }
        _ => unreachable!(),
    }
}

/// Where a test's two-stage pipeline `p` stores: run `run1`, stage `stage`.
fn staged_target(stage: &str, shape_id: i64) -> IngestTarget<'_> {
    IngestTarget {
        run_id: "run1",
        pipeline: "p",
        stage,
        shape_id,
        source: "in.jsonl",
        links: true,
    }
}

/// Run `run1` with one record at stage `main` (its fields kept, its item pending); returns
/// the shape id.
async fn one_staged_record(s: &SqlStore) -> i64 {
    staged_records(s, 1, 1).await
}

/// Run `run1` with `n` records over `distinct` requests at stage `main` of a two-stage
/// pipeline (each record's fields kept, its item pending); returns the shape id.
async fn staged_records(s: &SqlStore, n: usize, distinct: usize) -> i64 {
    s.create_run(&new_run("run1")).await.unwrap();
    let shape = RequestShape::new("{\"m\":".into(), "}".into());
    let shape_id = s.ensure_shape(&shape).await.unwrap();
    let mut recs = records(&shape, n, distinct, 10);
    for r in &mut recs {
        r.data = Some(format!("{{\"id\":\"{}\"}}", r.record_id));
    }
    s.ingest(&staged_target("main", shape_id), &recs, &[])
        .await
        .unwrap();
    shape_id
}

/// The `main` item succeeded, with a result.
async fn main_succeeded(s: &SqlStore) {
    exec(
        s,
        "UPDATE items SET state = 'succeeded' WHERE stage = 'main'",
    )
    .await;
    exec(
        s,
        "INSERT INTO item_results (item_id, result) SELECT id, '{}' FROM items WHERE stage = 'main'",
    )
    .await;
}

/// What advancing the record to stage `review` stores: one item, the `main` item its parent.
async fn review_link(s: &SqlStore) -> nightshift::store::NewLinks {
    let (parent,): (i64,) =
        crate::common::one(s, "SELECT id FROM items WHERE stage = 'main'").await;
    review_link_at(1, parent)
}

/// The run ends only when `settled` says so: with an item waiting, a record ready for its
/// next stage, a batch open, or a failed review not yet sent again, there is work left (some
/// other worker may be about to do it), and only with none of them is the pipeline done.
async fn a_pipeline_is_settled_only_when_no_work_is_left_in_any_state(db: &TestDb) {
    use nightshift::store::{LaterStage, PipelineWork};
    let s = &db.store;
    let needs = ["main".to_string()];
    let later = [LaterStage {
        stage: "review",
        needs: &needs,
    }];
    let work = PipelineWork {
        pipeline: "p",
        stages: &["main", "review"],
        later: &later,
        regenerate: &[("review", "main")],
    };
    let settled = || async { s.settled("run1", &work).await.unwrap() };
    assert!(settled().await, "an empty pipeline has nothing left");

    let shape_id = one_staged_record(s).await;
    assert!(
        !settled().await,
        "the first stage's item waits for an attempt"
    );

    main_succeeded(s).await;
    assert!(!settled().await, "the record is ready for `review`");

    let link = review_link(s).await;
    assert_eq!(
        s.add_links(&staged_target("review", shape_id), &[link])
            .await
            .unwrap(),
        1
    );
    assert!(!settled().await, "the review item waits for an attempt");

    let mut req = plan("run1", "w1");
    req.stage = "review";
    let batch = planned(s.plan_batch(&req).await.unwrap()).expect("the review item is planned");
    assert_eq!(s.plannable_count("p", "review").await.unwrap(), 0);
    assert!(
        !settled().await,
        "a batch is open (another worker holds it)"
    );

    exec(
        s,
        "UPDATE items SET state = 'succeeded' WHERE stage = 'review'",
    )
    .await;
    exec(
        s,
        "INSERT INTO item_results (item_id, result) SELECT id, '{\"pass\":false,\"issues\":[\"too short\"]}' FROM items WHERE stage = 'review'",
    )
    .await;
    exec(
        s,
        &format!(
            "UPDATE batches SET state = 'ingested' WHERE id = '{}'",
            batch.id
        ),
    )
    .await;
    assert!(
        !settled().await,
        "the failed review sends its item again (on_fail = regenerate)"
    );

    // Written as text, a passing review only looks like a failed one: it is not.
    exec(
        s,
        "UPDATE item_results SET result = '{\"pass\":true,\"issues\":[\"said \\\"pass\\\":false\"]}' \
         WHERE item_id IN (SELECT id FROM items WHERE stage = 'review')",
    )
    .await;
    assert!(
        s.failed_reviews("run1", "review", "main")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(settled().await, "every record is done: the run may end");
}

/// A SQLite store at `path` with the migrations before `version` applied, as an older
/// nightshift left it, and a connection to it.
async fn store_before(path: &std::path::Path, version: i64) -> sqlx::SqliteConnection {
    use sqlx::Connection;
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true);
    let mut conn = sqlx::SqliteConnection::connect_with(&opts).await.unwrap();
    let all = sqlx::migrate::Migrator::new(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/migrations/sqlite"
    )))
    .await
    .unwrap();
    let before = sqlx::migrate::Migrator {
        migrations: all
            .migrations
            .iter()
            .filter(|m| m.version < version)
            .cloned()
            .collect::<Vec<_>>()
            .into(),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    before.run(&mut conn).await.unwrap();
    conn
}

/// A store made before prompts and answers left the items table (migration 0005) opens with
/// every prompt and answer where the new queries read them.
#[tokio::test]
async fn a_store_from_before_item_bodies_keeps_its_prompts_and_answers() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let mut conn = store_before(&path, 5).await;
    for sql in [
        "INSERT INTO shapes (id, sha256, prefix, suffix) VALUES (1, x'00', '{', '}')",
        "INSERT INTO items (id, pipeline, stage, dedupe_key, shape_id, user_json, body_bytes, \
         state, attempts, result, first_run_id, created_at, updated_at) \
         VALUES (1, 'p', 'main', x'01', 1, '\"one\"', 5, 'succeeded', 1, '{\"a\":1}', 'r', 0, 0), \
                (2, 'p', 'main', x'02', 1, '\"two\"', 5, 'pending', 0, NULL, 'r', 0, 0)",
    ] {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
    conn.close().await.unwrap();

    let s = SqlStore::open_sqlite(&path).await.unwrap();
    let bodies: Vec<(i64, String)> = crate::common::all(
        &s,
        "SELECT item_id, user_json FROM item_bodies ORDER BY item_id",
    )
    .await;
    assert_eq!(bodies, [(1, "\"one\"".into()), (2, "\"two\"".into())]);
    let results: Vec<(i64, String)> =
        crate::common::all(&s, "SELECT item_id, result FROM item_results").await;
    assert_eq!(results, [(1, "{\"a\":1}".into())]);
    // The item rows themselves are as they were, without the moved columns.
    let items: Vec<(i64, String, i64)> =
        crate::common::all(&s, "SELECT id, state, body_bytes FROM items ORDER BY id").await;
    assert_eq!(
        items,
        [(1, "succeeded".into(), 5), (2, "pending".into(), 5)]
    );
    assert_eq!(s.integrity_check().await.unwrap(), "ok");
    s.close().await;
}

/// Every row of `table`, each as the SQL literals of its columns in order.
async fn dump(conn: &mut sqlx::SqliteConnection, table: &str) -> Vec<String> {
    let cols: Vec<(String,)> = sqlx::query_as("SELECT name FROM pragma_table_info(?) ORDER BY cid")
        .bind(table)
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    let row = cols
        .iter()
        .map(|(c,)| format!("quote({c})"))
        .collect::<Vec<_>>()
        .join(" || ',' || ");
    let rows: Vec<(String,)> = sqlx::query_as(&format!("SELECT {row} FROM {table} ORDER BY 1"))
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    rows.into_iter().map(|(r,)| r).collect()
}

/// A store from before the foreign keys were checked at commit (migration 0007, which
/// rebuilds the tables written many rows at a time) keeps every row and column of them, and
/// a reference to a missing row still cannot be committed: the commit is refused and nothing
/// of its transaction is kept.
#[tokio::test]
async fn a_store_from_before_deferred_keys_keeps_its_rows_and_refuses_dangling_ones() {
    use sqlx::Connection;
    const REBUILT: [&str; 9] = [
        "items",
        "item_bodies",
        "item_results",
        "records",
        "record_items",
        "item_parents",
        "attempts",
        "ledger",
        "quarantine",
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let mut conn = store_before(&path, 7).await;
    for sql in [
        "INSERT INTO runs (id, pipeline, stage, status, pipeline_file, source_path, output_path, \
         provider, model, pricing_mode, max_attempts, host, pid, started_at) \
         VALUES ('r', 'p', 'main', 'completed', 'p.toml', 'in.jsonl', 'out.jsonl', 'openai', \
         'gpt-4o-mini', 'batch', 3, 'h', 1, 0)",
        "INSERT INTO batches (id, run_id, pipeline, stage, provider, model, pricing_mode, state, \
         request_count, created_at) \
         VALUES ('b', 'r', 'p', 'main', 'openai', 'gpt-4o-mini', 'batch', 'ingested', 2, 0)",
        "INSERT INTO shapes (id, sha256, prefix, suffix) VALUES (1, x'00', '{', '}')",
        "INSERT INTO items (id, pipeline, stage, dedupe_key, shape_id, body_bytes, input_tokens, \
         state, attempts, last_error, first_run_id, created_at, updated_at, regenerations) \
         VALUES (1, 'p', 'main', x'01', 1, 5, 3, 'succeeded', 1, NULL, 'r', 10, 11, 0), \
                (2, 'p', 'review', x'02', 1, 6, 4, 'failed', 1, 'flagged', 'r', 12, 13, 1)",
        "INSERT INTO item_bodies VALUES (1, '\"one\"'), (2, '\"two\"')",
        "INSERT INTO item_results VALUES (1, '{\"a\":1}')",
        "INSERT INTO records VALUES ('r', 1, 'one', 1, '{\"sku\":\"one\"}')",
        "INSERT INTO record_items VALUES ('r', 1, 'main', 0, 1, NULL), ('r', 1, 'review', 0, 2, NULL), \
         ('r', 1, 'summary', 0, NULL, 'template failed')",
        "INSERT INTO item_parents VALUES (2, 1)",
        "INSERT INTO attempts (id, item_id, batch_id, attempt_no, custom_id, state, verdict, \
         error, finish_reason, model, created_at, dispatched_at, completed_at) \
         VALUES (1, 1, 'b', 1, 'b-1', 'succeeded', 'ok', NULL, 'stop', 'gpt-4o-mini', 20, NULL, 21), \
                (2, 2, 'b', 1, 'b-2', 'failed', 'schema', 'bad', 'stop', 'gpt-4o-mini', 22, 23, 24)",
        "INSERT INTO ledger VALUES (1, 'b-1', 'b', 'r', 'p', 'main', 'gpt-4o-mini', 'batch', \
         10, 2, 1, 20, 3, 7, 14, 30)",
        "INSERT INTO quarantine (run_id, source, line, field, reason) \
         VALUES ('r', 'in.jsonl', 2, 'sku', 'missing')",
    ] {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
    let mut before = Vec::new();
    for t in REBUILT {
        before.push(dump(&mut conn, t).await);
    }
    conn.close().await.unwrap();

    let s = SqlStore::open_sqlite(&path).await.unwrap();
    assert_eq!(s.integrity_check().await.unwrap(), "ok");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    for (t, rows) in REBUILT.iter().zip(&before) {
        assert!(!rows.is_empty(), "{t}");
        assert_eq!(&dump(&mut conn, t).await, rows, "{t}");
    }
    conn.close().await.unwrap();

    // A record of a missing item, an attempt of a missing batch: each statement goes
    // through (the keys are checked at commit), the commit does not, and nothing is kept.
    let pool = s.sqlite_pool().unwrap();
    for sql in [
        "INSERT INTO records VALUES ('r', 9, 'nine', 999, NULL)",
        "INSERT INTO attempts (item_id, batch_id, attempt_no, custom_id, state, created_at) \
         VALUES (1, 'missing', 2, 'missing-1', 'in_flight', 0)",
    ] {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query(sql).execute(&mut *tx).await.unwrap();
        let err = tx.commit().await.unwrap_err().to_string();
        assert!(err.contains("FOREIGN KEY"), "{sql}: {err}");
    }
    let kept: (i64,) =
        sqlx::query_as("SELECT (SELECT COUNT(*) FROM records) + (SELECT COUNT(*) FROM attempts)")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(kept.0, 3);
    assert_eq!(s.integrity_check().await.unwrap(), "ok");
    s.close().await;
}

/// The page size of a store's file, read on a connection of its own.
async fn page_size(path: &std::path::Path) -> i64 {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let (n,): (i64,) = sqlx::query_as("PRAGMA page_size")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    n
}

/// A new store is made with 16 KB pages; a store an earlier version made with SQLite's
/// 4 KB pages (in WAL mode the size of an existing file cannot change) keeps them and runs
/// its nights as before: the first night's records all processed, the second sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_with_the_earlier_page_size_keeps_it_and_runs_its_nights() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("fresh.db");
    SqlStore::open_sqlite(&fresh).await.unwrap().close().await;
    assert_eq!(page_size(&fresh).await, 16_384);

    let src = crate::common::write_source(dir.path(), 60, 5, 0);
    let file = crate::common::write_pipeline(dir.path(), 2, 25, "");
    let db = dir.path().join("state.db");
    let mut conn = store_before(&db, i64::MAX).await;
    sqlx::query("PRAGMA journal_mode = WAL")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    assert_eq!(page_size(&db).await, 4096);

    let sim = crate::common::start_sim(crate::common::quiet_sim()).await;
    let (first, store) = crate::common::run_against(&sim, &file, &db).await;
    assert_eq!(first.exit_code, 0);
    let f = store.run_figures(&first.run_id).await.unwrap();
    assert_eq!(f.processed_records as usize, src.valid);
    assert_eq!(f.unique_items as usize, src.unique);
    store.close().await;
    let (second, store) = crate::common::run_against(&sim, &file, &db).await;
    assert_eq!((second.exit_code, second.requests_sent), (0, 0));
    assert_eq!(store.integrity_check().await.unwrap(), "ok");
    store.close().await;
    assert_eq!(page_size(&db).await, 4096);
}

/// A store a newer nightshift migrated further is refused with what happened and what to do,
/// and is left as it was.
#[tokio::test]
async fn a_store_from_a_newer_version_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let s = SqlStore::open_sqlite(&path).await.unwrap();
    let newer = "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
                 VALUES (9999, 'from a newer version', true, x'00', 0)";
    sqlx::query(newer)
        .execute(s.sqlite_pool().unwrap())
        .await
        .unwrap();
    s.close().await;
    let err = SqlStore::open_sqlite(&path).await.unwrap_err().to_string();
    assert!(
        err.contains("written by a newer nightshift") && err.contains("step 9999"),
        "{err}"
    );
    assert!(err.contains("--db"), "{err}");
    // Nothing was changed: the newer step is still recorded.
    let mut conn = {
        use sqlx::Connection;
        sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap()
    };
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM _sqlx_migrations WHERE version = 9999")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 1);
}

/// `nightshift gc`'s bookkeeping: a batch is a candidate only once ingested, and only past
/// the horizon; a deletion recorded twice is one; a cleaned batch is no candidate any more.
async fn only_ingested_batches_are_left_to_clean_and_each_deletion_counts_once(db: &TestDb) {
    let s = &db.store;
    let run = seeded(s, 5).await;
    let b = planned(s.plan_batch(&plan(&run, "w1")).await.unwrap()).unwrap();
    let ids = |v: Vec<BatchRow>| v.into_iter().map(|b| b.id).collect::<Vec<_>>();
    let far = now_ms() + 60_000;
    assert!(
        s.cleanup_candidates("p", far).await.unwrap().is_empty(),
        "in flight"
    );
    let ended = BatchUpdate {
        state: Some(BatchState::Ended),
        end_state: Some(EndState::Completed),
        input_file_id: Some("file-in".into()),
        output_file_id: Some("file-out".into()),
        ..Default::default()
    };
    assert!(
        s.update_batch(&b, BatchState::Planned, &ended)
            .await
            .unwrap()
    );
    assert!(
        s.cleanup_candidates("p", far).await.unwrap().is_empty(),
        "ended, its results not applied yet"
    );
    s.finish_ingest(&b, AttemptVerdict::Missing, "x", 2, None)
        .await
        .unwrap();
    let ingested_at = s.batch(&b.id).await.unwrap().unwrap().ingested_at.unwrap();
    assert_eq!(
        ids(s.cleanup_candidates("p", far).await.unwrap()),
        vec![b.id.clone()]
    );
    assert_eq!(
        ids(s.cleanup_candidates("p", ingested_at).await.unwrap()),
        vec![b.id.clone()]
    );
    assert!(
        s.cleanup_candidates("p", ingested_at - 1)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(s.cleanup_candidates("other", far).await.unwrap().is_empty());
    for _ in 0..2 {
        s.record_cleaned(&b.id, "output", "file-out").await.unwrap();
    }
    s.record_cleaned(&b.id, "input", "file-in").await.unwrap();
    assert_eq!(
        s.cleaned_targets(&b.id).await.unwrap(),
        [
            ("input".to_string(), "file-in".to_string()),
            ("output".to_string(), "file-out".to_string())
        ]
    );
    s.mark_cleaned(&b.id).await.unwrap();
    s.mark_cleaned(&b.id).await.unwrap();
    assert!(s.cleanup_candidates("p", far).await.unwrap().is_empty());
}

/// An answer with escaped separators, as a model may write one.
const ANSWER: &str = r#"{"t":"\u001e\u001f ✓"}"#;
/// An error with the packing separators in its text.
const SEPARATED_ERROR: &str = "bad \u{1f} line\u{1e} ✗";

/// Plans the three items of run `run1` and applies their results with one attempt allowed:
/// the first succeeds with [`ANSWER`], the second fails with [`SEPARATED_ERROR`], the third
/// with an empty error (the two failures are final). Returns the outcomes, in item order.
async fn answered_three(s: &SqlStore) -> Vec<AttemptOutcome> {
    let b = planned(s.plan_batch(&plan("run1", "w1")).await.unwrap()).unwrap();
    let attempts = s.batch_attempts(&b.id).await.unwrap();
    let mut outcomes = outcomes_for(&attempts, |i| i == 0);
    outcomes[0].result = Some(ANSWER.to_string());
    outcomes[1].error = Some(SEPARATED_ERROR.to_string());
    outcomes[2].error = Some(String::new());
    s.apply_results(&b, &outcomes, 1).await.unwrap();
    outcomes
}

/// What the results file reads of each record comes back as stored: record ids and errors
/// are free text (control characters, other scripts), an answer is the stored JSON, and a
/// missing answer or error stays missing (not an empty text).
async fn a_page_of_records_keeps_free_text_as_stored(db: &TestDb) {
    let s = &db.store;
    s.create_run(&new_run("run1")).await.unwrap();
    let shape = RequestShape::new("{\"m\":".into(), "}".into());
    let mut recs = records(&shape, 3, 3, 10);
    let ids = ["a\u{1e}b\u{1f}c", "ünïcødé ✓ 商品", "x\ny"];
    for (r, id) in recs.iter_mut().zip(ids) {
        r.record_id = id.to_string();
    }
    ingest(s, "run1", &recs).await;
    let outcomes = answered_three(s).await;
    let page = s.run_records("run1", 0, 10).await.unwrap();
    let by_item = |id: i64| page.iter().find(|r| r.item_id == id).unwrap();
    let ok = by_item(outcomes[0].item_id);
    assert_eq!(ok.state, ItemState::Succeeded);
    assert_eq!(
        (ok.result.as_deref(), ok.last_error.as_deref()),
        (Some(ANSWER), None)
    );
    let failed = by_item(outcomes[1].item_id);
    assert_eq!(failed.state, ItemState::Exhausted);
    assert_eq!(failed.result, None);
    assert_eq!(failed.last_error.as_deref(), Some(SEPARATED_ERROR));
    assert_eq!(by_item(outcomes[2].item_id).last_error.as_deref(), Some(""));
    let got: Vec<(i64, &str)> = page
        .iter()
        .map(|r| (r.line, r.record_id.as_str()))
        .collect();
    assert_eq!(got, vec![(1, ids[0]), (2, ids[1]), (3, ids[2])]);
    // Paging goes on after the given line.
    let rest = s.run_records("run1", 1, 10).await.unwrap();
    assert_eq!(rest.iter().map(|r| r.line).collect::<Vec<_>>(), vec![2, 3]);
}

/// Pages of a run's records go on past lines without a record (quarantined, blank), however
/// many, and end only after the last record.
async fn pages_of_records_cross_gaps_in_the_lines(db: &TestDb) {
    let s = &db.store;
    s.create_run(&new_run("run1")).await.unwrap();
    let shape = RequestShape::new("{\"m\":".into(), "}".into());
    let mut recs = records(&shape, 6, 6, 10);
    let lines = [1, 2, 3, 1000, 1001, 70000];
    for (r, line) in recs.iter_mut().zip(lines) {
        r.line = line;
    }
    ingest(s, "run1", &recs).await;
    let mut after = 0;
    let mut pages = Vec::new();
    loop {
        let ids = s.run_record_ids("run1", after, 2).await.unwrap();
        let records = s.run_records("run1", after, 2).await.unwrap();
        let data = s.run_record_data("run1", after, 2).await.unwrap();
        let Some(last) = ids.last() else {
            assert!(records.is_empty() && data.is_empty());
            break;
        };
        assert_eq!(
            records.iter().map(|r| r.line).collect::<Vec<_>>(),
            ids.iter().map(|r| r.0).collect::<Vec<_>>()
        );
        assert_eq!(
            data.iter().map(|r| r.0).collect::<Vec<_>>(),
            ids.iter().map(|r| r.0).collect::<Vec<_>>()
        );
        after = last.0;
        pages.push(ids.into_iter().map(|(line, _)| line).collect::<Vec<_>>());
    }
    let all: Vec<i64> = pages.iter().flatten().copied().collect();
    assert_eq!(all, lines.map(|l| l as i64));
    assert!(
        pages.iter().all(|p| !p.is_empty() && p.len() <= 2),
        "{pages:?}"
    );
}

/// What the multi-stage results file and a later stage's rendering read of each link comes
/// back as stored: the stage name, the item's error and the link's own error are free text,
/// an answer is the stored JSON, a missing item, answer or error stays missing, and each
/// item's cost is what its attempts cost.
async fn a_page_of_links_keeps_free_text_as_stored(db: &TestDb) {
    use nightshift::store::{NewLinks, StageLink};
    let s = &db.store;
    let shape_id = staged_records(s, 3, 3).await;
    let outcomes = answered_three(s).await;
    let item_of = |line: i64| outcomes[line as usize - 1].item_id;

    // A later stage whose name is not plain ASCII: line 1 gets an item, line 2 a failure
    // with separators in its text, line 3 is skipped.
    let review = "révision ✓";
    let why = "template \u{1e}failed\u{1f} ✗";
    let links = [
        review_link_at(1, item_of(1)),
        NewLinks {
            line: 2,
            link: StageLink::Failed(why.into()),
            parents: vec![],
        },
        NewLinks {
            line: 3,
            link: StageLink::Skipped,
            parents: vec![],
        },
    ];
    s.add_links(&staged_target(review, shape_id), &links)
        .await
        .unwrap();

    type Link = (
        i64,
        String,
        i64,
        Option<i64>,
        Option<ItemState>,
        Option<i64>,
        Option<String>,
        Option<String>,
        Option<String>,
        i64,
        i64,
    );
    let page: Vec<Link> = s
        .links_between("run1", 1, 3, true)
        .await
        .unwrap()
        .into_iter()
        .map(|l| {
            (
                l.line,
                l.stage,
                l.chunk,
                l.item_id,
                l.state,
                l.attempts,
                l.result,
                l.last_error,
                l.error,
                l.cost_pico,
                l.sharers,
            )
        })
        .collect();
    let (review_item,): (i64,) = crate::common::one(
        s,
        "SELECT item_id FROM record_items WHERE line = 1 AND item_id IS NOT NULL AND stage <> 'main'",
    )
    .await;
    let main = |line: i64, state, result: Option<&str>, error: Option<&str>, cost| {
        (
            line,
            "main".to_string(),
            0,
            Some(item_of(line)),
            Some(state),
            Some(1),
            result.map(str::to_string),
            error.map(str::to_string),
            None,
            cost,
            1,
        )
    };
    // A link with no item: failed (with why) or skipped.
    let itemless = |line: i64, why: Option<&str>| -> Link {
        let error = why.map(str::to_string);
        (
            line,
            review.into(),
            0,
            None,
            None,
            None,
            None,
            None,
            error,
            0,
            0,
        )
    };
    let expected: Vec<Link> = vec![
        main(1, ItemState::Succeeded, Some(ANSWER), None, 1_000),
        (
            1,
            review.into(),
            0,
            Some(review_item),
            Some(ItemState::Pending),
            Some(0),
            None,
            None,
            None,
            0,
            1,
        ),
        main(2, ItemState::Exhausted, None, Some(SEPARATED_ERROR), 1_001),
        itemless(2, Some(why)),
        main(3, ItemState::Exhausted, None, Some(""), 1_002),
        itemless(3, None),
    ];
    assert_eq!(page, expected);
    // Without the sharers count, the same links with 0 in its place.
    let quick = s.links_between("run1", 2, 3, false).await.unwrap();
    assert_eq!(quick.len(), 4);
    assert!(quick.iter().all(|l| l.sharers == 0 && l.line >= 2));
}
