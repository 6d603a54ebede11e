//! The core promise end to end: every record accounted for, duplicates never sent, retries
//! under the cap, and the ledger equal to the simulator's bill to the last pico-dollar.

use std::collections::{HashMap, HashSet};

use nightshift::sim::SimSettings;
use nightshift::store::Store;
use serde_json::Value;
use sqlx::Row;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_records_with_faults_end_exactly_billed() {
    let dir = tempfile::tempdir().unwrap();
    let src = write_source(dir.path(), 2000, 5, 2);
    assert!(
        src.malformed >= 30 && src.valid - src.unique >= 80,
        "fixture shape"
    );
    let max_attempts = 4;
    let file = write_pipeline(dir.path(), max_attempts, 250, "");
    let sim = start_sim(SimSettings {
        fail_rate: 0.03,
        invalid_json_rate: 0.02,
        expire_first: 1,
        http_429_rate: 0.05,
        cache_rate: 0.2,
        ..quiet_sim()
    })
    .await;
    let db = dir.path().join(".nightshift/state.db");
    let (outcome, store) = run_against(&sim, &file, &db).await;
    let rec = record(&sim).await;

    // 1. Every valid record has a result line, or is listed as failed.
    let out = std::fs::read_to_string(dir.path().join("out/results.jsonl")).unwrap();
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), src.valid);
    let mut failed = 0;
    for l in &lines {
        match l["status"].as_str().unwrap() {
            "succeeded" => assert!(l["output"]["label"].is_string(), "{l}"),
            "failed" => {
                failed += 1;
                assert!(l["error"].is_string(), "{l}");
            }
            other => panic!("record left {other}: {l}"),
        }
    }
    let f = store.run_figures(&outcome.run_id).await.unwrap();
    assert_eq!(f.processed_records as usize + failed, lines.len());
    assert_eq!(outcome.exit_code, if f.exhausted > 0 { 1 } else { 0 });
    assert_eq!(f.unique_items as usize, src.unique);
    assert_eq!(f.unfinished, 0);

    // 2. One expiring batch happened, and 429s were answered.
    let statuses: Vec<&str> = rec["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == "expired").count(),
        1,
        "{statuses:?}"
    );

    // 3. Never sent twice: each custom_id in exactly one batch; each distinct request body
    //    sent at most once per attempt number; first attempts = unique items.
    let by_cid = requests_by_custom_id(&rec);
    assert!(
        by_cid.values().all(|v| v.len() == 1),
        "a custom_id was submitted twice"
    );
    let mut per_body_attempt: HashSet<(String, String)> = HashSet::new();
    let mut first_attempts = 0;
    for (cid, v) in &by_cid {
        let attempt = cid.rsplit('-').next().unwrap().to_string();
        assert!(
            attempt.parse::<u32>().unwrap() <= max_attempts,
            "attempt over the cap: {cid}"
        );
        assert!(
            per_body_attempt.insert((v[0].1.clone(), attempt.clone())),
            "body sent twice in one attempt"
        );
        if attempt == "1" {
            first_attempts += 1;
        }
    }
    assert_eq!(
        first_attempts, src.unique,
        "duplicates must share one request"
    );

    // 4. Retry only what failed: an item retried only after a failed attempt.
    let mut outcomes: HashMap<String, Vec<(u32, String)>> = HashMap::new();
    for (cid, v) in &by_cid {
        let mut parts = cid.rsplitn(3, '-');
        let attempt: u32 = parts.next().unwrap().parse().unwrap();
        let item = parts.next().unwrap().to_string();
        outcomes
            .entry(item)
            .or_default()
            .push((attempt, v[0].2.clone()));
    }
    for (item, mut v) in outcomes {
        v.sort();
        for w in v.windows(2) {
            assert_ne!(w[0].1, "ok", "item {item} was resent after a good answer");
        }
    }

    // 5. Ledger = bill, per custom_id and in total, tokens and cost.
    let ledger = sqlx::query("SELECT custom_id, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, cost_pico FROM ledger")
        .fetch_all(store.sqlite_pool().unwrap())
        .await
        .unwrap();
    let mut ours: HashMap<String, (i64, i64, i64, i64, i64)> = HashMap::new();
    for r in &ledger {
        ours.insert(r.get(0), (r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)));
    }
    let bill = rec["bill"]["per_custom_id"].as_array().unwrap();
    assert!(!bill.is_empty());
    for e in bill {
        let cid = e["custom_id"].as_str().unwrap();
        let l = ours
            .get(cid)
            .unwrap_or_else(|| panic!("billed {cid} has no ledger row"));
        assert_eq!(l.0, e["input_tokens"].as_i64().unwrap(), "{cid}");
        assert_eq!(l.1, e["cached_input_tokens"].as_i64().unwrap(), "{cid}");
        assert_eq!(l.2, e["output_tokens"].as_i64().unwrap(), "{cid}");
        assert_eq!(l.3, e["reasoning_tokens"].as_i64().unwrap(), "{cid}");
        let billed = nightshift::cost::Usd::parse(e["cost_usd"].as_str().unwrap()).unwrap();
        assert_eq!(l.4 as i128, billed.pico(), "{cid}");
    }
    // Ledger rows with tokens are exactly the billed ones.
    let with_tokens = ours.values().filter(|l| l.0 > 0 || l.2 > 0).count();
    assert_eq!(with_tokens, bill.len());
    let total_bill =
        nightshift::cost::Usd::parse(rec["bill"]["totals"]["cost_usd"].as_str().unwrap()).unwrap();
    assert_eq!(f.ledger.cost, total_bill);
    assert_eq!(
        f.ledger.usage.input_tokens,
        rec["bill"]["totals"]["tokens"]["input_tokens"]
            .as_u64()
            .unwrap()
    );
    // Batch usage reported by the provider = the sum of our rows for that batch.
    for b in store.run_batches(&outcome.run_id).await.unwrap() {
        if let Some(u) = b.provider_usage {
            let u: nightshift::cost::Usage = serde_json::from_str(&u).unwrap();
            let t = store.ledger_totals_for_batch(&b.id).await.unwrap();
            assert_eq!(t.usage.input_tokens, u.input_tokens, "batch {}", b.id);
            assert_eq!(t.usage.output_tokens, u.output_tokens, "batch {}", b.id);
        }
    }
    let attempts = f.attempts as usize;
    assert_eq!(
        attempts,
        by_cid.len(),
        "every attempt reached the provider once"
    );
    assert!(
        f.attempts > f.items_attempted,
        "faults must have caused retries"
    );
    store.close().await;

    // 6. The rerun sends nothing and costs nothing.
    let (again, store) = run_against(&sim, &file, &db).await;
    let rec2 = record(&sim).await;
    assert_eq!(again.requests_sent, 0);
    assert_eq!(
        rec2["batches"].as_array().unwrap().len(),
        rec["batches"].as_array().unwrap().len()
    );
    let f2 = store.run_figures(&again.run_id).await.unwrap();
    assert_eq!(f2.attempts, 0);
    assert_eq!(f2.ledger.cost.pico(), 0);
    assert_eq!(f2.reused, f.succeeded);
    let out2 = std::fs::read_to_string(dir.path().join("out/results.jsonl")).unwrap();
    assert_eq!(out2.lines().count(), src.valid);
    assert_eq!(store.integrity_check().await.unwrap(), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_that_always_fails_is_exhausted_at_the_cap_and_revived_when_it_is_raised() {
    let dir = tempfile::tempdir().unwrap();
    write_source(dir.path(), 20, 0, 0);
    let file = write_pipeline(dir.path(), 2, 100, "");
    let sim = start_sim(SimSettings {
        fail_rate: 1.0,
        ..quiet_sim()
    })
    .await;
    let db = dir.path().join("state.db");
    let (outcome, store) = run_against(&sim, &file, &db).await;
    assert_eq!(outcome.exit_code, 1);
    let f = store.run_figures(&outcome.run_id).await.unwrap();
    assert_eq!((f.exhausted, f.attempts), (20, 40));
    // errors were not billed
    assert_eq!(f.ledger.cost.pico(), 0);
    store.close().await;
    // Same cap: nothing is sent again.
    let (again, store) = run_against(&sim, &file, &db).await;
    assert_eq!(again.requests_sent, 0);
    store.close().await;
    // Raised cap: one more attempt each.
    write_pipeline(dir.path(), 3, 100, "");
    let (third, store) = run_against(&sim, &file, &db).await;
    assert_eq!(third.requests_sent, 20);
    let by_cid = requests_by_custom_id(&record(&sim).await);
    assert!(by_cid.keys().all(|c| !c.ends_with("-4")));
    assert_eq!(by_cid.keys().filter(|c| c.ends_with("-3")).count(), 20);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_sharded_by_request_count_and_bytes() {
    let dir = tempfile::tempdir().unwrap();
    write_source(dir.path(), 120, 0, 0);
    let file = write_pipeline(dir.path(), 1, 50, "");
    let sim = start_sim(quiet_sim()).await;
    let db = dir.path().join("state.db");
    let (outcome, store) = run_against(&sim, &file, &db).await;
    let sizes: Vec<i64> = store
        .run_batches(&outcome.run_id)
        .await
        .unwrap()
        .iter()
        .map(|b| b.request_count)
        .collect();
    assert_eq!(sizes, vec![50, 50, 20]);
    store.close().await;

    // Now by bytes: each line is ~0.7 KB with the schema, so 2 KB files hold two or three.
    let dir = tempfile::tempdir().unwrap();
    write_source(dir.path(), 10, 0, 0);
    let file = write_pipeline(dir.path(), 1, 1000, "max_bytes = 2048");
    let db = dir.path().join("state.db");
    let (outcome, store) = run_against(&sim, &file, &db).await;
    let batches = store.run_batches(&outcome.run_id).await.unwrap();
    assert!(batches.len() >= 4, "{}", batches.len());
    for b in &batches {
        assert!(b.file_bytes.unwrap() <= 2048, "{:?}", b.file_bytes);
    }
    assert_eq!(batches.iter().map(|b| b.request_count).sum::<i64>(), 10);
    store.close().await;
}
