//! Cost control: the plan's numbers, the hard cap, reconciliation.

use std::path::Path;

use nightshift::cost::tokens::Tokenizer;
use nightshift::cost::{PriceTable, Usd};
use nightshift::sim::SimSettings;
use nightshift::store::{RunStatus, Store};
use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::common::*;
use crate::crash::*;

fn plan_json(pipeline: &Path, extra: &[&str]) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nightshift"))
        .arg("plan")
        .arg(pipeline)
        .arg("--json")
        .args(extra)
        .env_remove("NIGHTSHIFT_DB")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn dec(v: &Value) -> Decimal {
    v.as_str().unwrap().parse().unwrap()
}

/// The adversarial case: every answer spends its whole output budget and the cap is below
/// the total. The run stops, never spends a pico-dollar over the cap, exits 1, and leaves the
/// rest pending for a run with a higher cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_cap_holds_against_answers_at_max_tokens() {
    let sc = scenario(
        400,
        50,
        SimSettings {
            answer_at_max_tokens: true,
            batch_seconds: 0.1,
            ..Default::default()
        },
    )
    .await;
    let cap = "0.05";
    let out = sc
        .child(None)
        .args(["--budget-usd", cap])
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rec = record(&sc.sim).await;
    let billed = Usd::parse(rec["bill"]["totals"]["cost_usd"].as_str().unwrap()).unwrap();
    let cap = Usd::parse(cap).unwrap();
    assert!(billed <= cap, "billed {billed} over the cap {cap}");
    assert!(billed.pico() > 0);
    let store = nightshift::store::SqlStore::open_sqlite(&sc.db)
        .await
        .unwrap();
    let run = store.last_run(None).await.unwrap().unwrap();
    let f = store.run_figures(&run.id).await.unwrap();
    assert_eq!(f.ledger.cost, billed, "ledger = bill");
    assert!(f.unfinished > 0, "items left pending");
    assert_eq!(run.status, RunStatus::Budget);
    let message = run.message.unwrap();
    assert!(message.contains("item(s) left need up to $"), "{message}");
    // Every answer really was at the limit: the cap held against the true worst case.
    let max_out: u64 = rec["bill"]["per_custom_id"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["output_tokens"].as_u64().unwrap())
        .min()
        .unwrap();
    assert_eq!(max_out, 400);
    let pending = store.plannable_count("it", "main").await.unwrap();
    assert!(pending > 0);
    store.close().await;

    // A higher cap sends the rest; the first run's items are not sent again.
    let out = sc
        .child(None)
        .args(["--budget-usd", "100"])
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(judge(&sc).await, Verdict::default());
}

/// The plan counts prompt tokens exactly as the provider (here the simulator) bills them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_input_tokens_equal_the_billed_prompt_tokens() {
    let sc = scenario(
        300,
        100,
        SimSettings {
            batch_seconds: 0.1,
            ..Default::default()
        },
    )
    .await;
    let plan = plan_json(&sc.pipeline, &[]);
    let planned = plan["input_tokens_per_call"]["total"].as_u64().unwrap();
    assert!(plan["input_tokens_per_call"]["exact"].as_bool().unwrap());
    let out = sc.child(None).output().await.unwrap();
    assert_eq!(out.status.code(), Some(0));
    let rec = record(&sc.sim).await;
    let billed = rec["bill"]["totals"]["tokens"]["input_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(planned, billed);
    // And after the run, the plan knows everything is done.
    let again = plan_json(&sc.pipeline, &[]);
    assert_eq!(again["items"]["to_send"], 0);
    assert_eq!(again["items"]["already_done"], plan["items"]["unique"]);
    assert!(
        again["output_tokens_per_call"]["source"]
            .as_str()
            .unwrap()
            .contains("earlier answers")
    );
}

/// A small fixture, every figure of the worksheet recomputed here from first principles.
#[test]
fn plan_figures_for_a_known_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("schema.json"), SCHEMA).unwrap();
    let texts = [
        "Refund my order 1001",
        "Login fails on Android",
        "Refund my order 1001",
        "Where is parcel 77?",
    ];
    let mut lines: Vec<String> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"id": format!("t{i}"), "text": t}).to_string())
        .collect();
    lines.push("{\"id\": \"broken".into());
    std::fs::write(d.join("records.jsonl"), lines.join("\n") + "\n").unwrap();
    let file = write_pipeline(
        d,
        3,
        100,
        "[plan]\nexpected_output_tokens = 40\nretry_rate = \"0.1\"\nsafety_margin = \"0.2\"\nunit = \"ticket\"\ntiming = \"backfill\"",
    );
    let v = plan_json(
        &file,
        &["--monthly-items", "1000", "--backfill-items", "50000"],
    );

    // Counts.
    assert_eq!(v["records"]["read"], 5);
    assert_eq!(v["records"]["quarantined"], 1);
    assert_eq!(v["records"]["valid"], 4);
    assert_eq!(v["items"]["unique"], 3);
    assert_eq!(v["items"]["already_done"], 0);
    assert_eq!(v["items"]["to_send"], 3);
    assert_eq!(v["records"]["to_process"], 4);
    assert_eq!(v["processed_item"], "ticket");
    assert_eq!(v["timing"], "backfill");
    assert_eq!(v["max_attempts"], 3);

    // Tokens: system + user message, framing, and the response_format schema, with the
    // model's tokenizer.
    let tok = Tokenizer::for_model("gpt-5.4-mini");
    let schema: Value = serde_json::from_str(SCHEMA).unwrap();
    let rf = json!({"type": "json_schema", "json_schema": {"name": "it", "schema": schema, "strict": true}}).to_string();
    let count =
        |t: &str| tok.chat_prompt_tokens([("system", "Label the ticket."), ("user", t)], Some(&rf));
    let per_item: Vec<u64> = [
        "Refund my order 1001",
        "Login fails on Android",
        "Where is parcel 77?",
    ]
    .iter()
    .map(|t| count(t))
    .collect();
    let total: u64 = per_item.iter().sum();
    assert_eq!(v["input_tokens_per_call"]["total"], total);
    assert_eq!(
        v["input_tokens_per_call"]["max"],
        *per_item.iter().max().unwrap()
    );
    let mean = Decimal::from(total) / Decimal::from(3);
    assert_eq!(
        dec(&v["input_tokens_per_call"]["mean"]),
        mean.round_dp(12).normalize()
    );

    // Money, at gpt-5.4-mini batch prices (USD per million tokens: 0.375 in, 2.25 out).
    let prices = PriceTable::builtin();
    let batch = prices
        .lookup("openai", "gpt-5.4-mini")
        .unwrap()
        .batch
        .unwrap();
    assert_eq!(batch.input.per_million_string(), "0.375");
    let m = Decimal::from(1_000_000);
    let in_p = Decimal::new(375, 3) / m;
    let out_p = Decimal::new(225, 2) / m;
    let per_call = mean * in_p + Decimal::from(40) * out_p;
    assert_eq!(
        dec(&v["cost_per_call_usd"]),
        per_call.round_dp(12).normalize()
    );
    let expected = Decimal::from(3) * per_call * Decimal::new(11, 1);
    assert_eq!(
        dec(&v["expected_cost_usd"]),
        expected.round_dp(12).normalize()
    );
    // Standard prices are exactly twice the batch prices for this model.
    assert_eq!(
        dec(&v["standard_expected_cost_usd"]),
        (expected * Decimal::from(2)).round_dp(12).normalize()
    );
    assert_eq!(dec(&v["saving_usd"]), expected.round_dp(12).normalize());
    // Worst case: every item at its tokens + 400 output tokens, three attempts, exact.
    let worst = (Decimal::from(total) * in_p + Decimal::from(3 * 400) * out_p) * Decimal::from(3);
    assert_eq!(dec(&v["worst_case_cost_usd"]), worst.normalize());
    // Per processed item: four records share three items.
    assert_eq!(
        dec(&v["cost_per_processed_item_usd"]),
        (expected / Decimal::from(4)).round_dp(12).normalize()
    );
    // Forecasts: one attempt per item × items × (1 + retry) × (1 + margin).
    let base = Decimal::from(3) * per_call / Decimal::from(4);
    let monthly = base * Decimal::from(1000) * Decimal::new(11, 1) * Decimal::new(12, 1);
    assert_eq!(
        dec(&v["monthly"]["cost_usd"]),
        monthly.round_dp(12).normalize()
    );
    let backfill = base * Decimal::from(50_000) * Decimal::new(11, 1) * Decimal::new(12, 1);
    assert_eq!(
        dec(&v["backfill"]["cost_usd"]),
        backfill.round_dp(12).normalize()
    );
}

#[test]
fn plan_prints_in_every_format() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples");
    for example in ["catalog-enrichment.toml", "ticket-tagging.toml"] {
        for (flag, check) in [
            ("--json", "\"expected_cost_usd\""),
            ("--csv", "figure,value,note"),
            ("--markdown", "| figure | value | note |"),
            ("--format=table", "worst-case cost"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_nightshift"))
                .arg("plan")
                .arg(root.join(example))
                .args([
                    flag,
                    "--monthly-items",
                    "30000",
                    "--backfill-items",
                    "1000000",
                ])
                .arg("--db")
                .arg(dir.path().join("none.db"))
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert_eq!(out.status.code(), Some(0), "{example} {flag}");
            assert!(text.contains(check), "{example} {flag}:\n{text}");
            assert!(
                text.contains("monthly") && text.contains("backfill"),
                "{example} {flag}:\n{text}"
            );
        }
    }
}

/// `reconcile` after a run: plan vs actual, and every batch's ledger equal to the bill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_shows_plan_vs_actual_and_ledger_vs_bill() {
    let sc = scenario(
        300,
        100,
        SimSettings {
            batch_seconds: 0.1,
            fail_rate: 0.05,
            cache_rate: 0.3,
            ..Default::default()
        },
    )
    .await;
    let out = sc.child(None).output().await.unwrap();
    assert!(matches!(out.status.code(), Some(0) | Some(1)));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nightshift"))
        .arg("reconcile")
        .arg(&sc.pipeline)
        .args(["--json", "--sim-url"])
        .arg(sc.sim.base_url())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["mismatches"], 0, "{v:#}");
    let batches = v["batches"].as_array().unwrap();
    assert!(batches.len() >= 3);
    for b in batches {
        assert_eq!(b["usage_matches"], true, "{b}");
        assert_eq!(b["bill_matches"], true, "{b}");
    }
    let figures: Vec<&str> = v["plan_vs_actual"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["figure"].as_str().unwrap())
        .collect();
    for f in [
        "items sent",
        "input tokens per call (mean)",
        "output tokens per call (mean)",
        "validation calls (answers checked)",
        "failed items",
        "retry attempts",
        "duplicate submissions",
        "model",
        "pricing mode",
        "cost (USD)",
    ] {
        assert!(figures.contains(&f), "missing {f}");
    }
    let sent = &v["plan_vs_actual"][0];
    assert_eq!(sent["plan"], sent["actual"], "every planned item was sent");
    let dup = v["plan_vs_actual"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["figure"] == "duplicate submissions")
        .unwrap();
    assert_eq!(dup["actual"], "0");
    let text = std::process::Command::new(env!("CARGO_BIN_EXE_nightshift"))
        .arg("reconcile")
        .arg(&sc.pipeline)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("plan vs actual"));
}
