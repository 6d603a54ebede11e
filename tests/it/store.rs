//! Store contract tests on SQLite: applying results is idempotent, item states move only
//! from `in_flight`, and planning takes what is plannable exactly once.

use nightshift::cost::{PricingMode, Usage, Usd};
use nightshift::dedupe::{PreparedRecord, RequestShape};
use nightshift::store::{
    AttemptOutcome, IngestTarget, NewRun, PlanOutcome, PlanRequest, SqliteStore, Store,
};

fn planned(o: PlanOutcome) -> Option<nightshift::store::BatchRow> {
    match o {
        PlanOutcome::Planned(b) => Some(*b),
        _ => None,
    }
}

async fn seeded(n: usize) -> (SqliteStore, String) {
    let s = SqliteStore::open_in_memory().await.unwrap();
    s.create_run(&NewRun {
        id: "run1".into(),
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
    })
    .await
    .unwrap();
    let shape = RequestShape::new("{\"m\":".into(), "}".into());
    let shape_id = s.ensure_shape(&shape).await.unwrap();
    let recs: Vec<PreparedRecord> = (0..n)
        .map(|i| {
            let user = format!("\"u{}\"", i % (n - 1).max(1));
            PreparedRecord {
                input_tokens: 10,
                line: i as u64 + 1,
                record_id: format!("r{i}"),
                key: shape.key(&user),
                body_bytes: shape.body_len(&user),
                user_json: user,
            }
        })
        .collect();
    let st = s
        .ingest(
            &IngestTarget {
                run_id: "run1",
                pipeline: "p",
                stage: "main",
                shape_id,
                source: "in.jsonl",
            },
            &recs,
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        st.new_items as usize,
        (n - 1).max(1),
        "one duplicate shares an item"
    );
    (s, "run1".into())
}

fn plan(run: &str) -> PlanRequest<'_> {
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
        mode: "batch",
    }
}

#[tokio::test]
async fn applying_the_same_results_twice_changes_nothing() {
    let (s, run) = seeded(11).await;
    let b = planned(s.plan_batch(&plan(&run)).await.unwrap()).unwrap();
    assert_eq!(b.request_count, 10);
    assert!(
        planned(s.plan_batch(&plan(&run)).await.unwrap()).is_none(),
        "nothing left to plan"
    );
    let attempts = s.batch_attempts(&b.id).await.unwrap();
    let outcomes: Vec<AttemptOutcome> = attempts
        .iter()
        .enumerate()
        .map(|(i, a)| AttemptOutcome {
            attempt_id: a.id,
            item_id: a.item_id,
            attempt_no: a.attempt_no,
            custom_id: a.custom_id.clone(),
            succeeded: i % 2 == 0,
            verdict: if i % 2 == 0 {
                "ok".into()
            } else {
                "invalid_json".into()
            },
            error: None,
            finish_reason: Some("stop".into()),
            model: Some("m".into()),
            result: (i % 2 == 0).then(|| "{}".to_string()),
            usage: Usage {
                input_tokens: 10,
                output_tokens: 5,
                ..Default::default()
            },
            cost: Usd::from_pico(1_000 + i as i128),
            standard_cost: Usd::from_pico(2_000),
        })
        .collect();
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
    let s_ = s.clone();
    let rest = s_.finish_ingest(&b.id, "missing", "x", 2).await.unwrap();
    assert_eq!(rest.applied, 0, "every attempt had a result");
    let b2 = planned(s.plan_batch(&plan(&run)).await.unwrap()).unwrap();
    assert_eq!(b2.request_count, 5);
    let a2 = s.batch_attempts(&b2.id).await.unwrap();
    assert!(
        a2.iter()
            .all(|a| a.attempt_no == 2 && a.custom_id.ends_with("-2"))
    );
    // Nothing came back for them: they fail, and at the cap they are exhausted.
    let rest = s
        .finish_ingest(&b2.id, "missing", "no line", 2)
        .await
        .unwrap();
    assert_eq!((rest.applied, rest.exhausted), (5, 5));
    assert!(planned(s.plan_batch(&plan(&run)).await.unwrap()).is_none());
    let f = s.run_figures(&run).await.unwrap();
    assert_eq!(
        (f.succeeded, f.exhausted, f.records_valid, f.unique_items),
        (5, 5, 11, 10)
    );
    assert_eq!(f.attempts, 15);
}

#[tokio::test]
async fn an_oversized_request_is_exhausted_not_sent() {
    let (s, run) = seeded(3).await;
    let mut req = plan(&run);
    req.max_bytes = 100; // smaller than any line
    assert!(planned(s.plan_batch(&req).await.unwrap()).is_none());
    let f = s.run_figures(&run).await.unwrap();
    assert_eq!(f.exhausted, f.unique_items);
}
