//! The worksheet of a multi-stage pipeline: a row per stage (a chunk stage's calls per
//! record are the real chunks of the source, a sampled stage's its share of the records),
//! the item's total, what is already done after a run, and `reconcile` holding each stage
//! of a run against its row.

use std::path::{Path, PathBuf};
use std::process::Command;

use nightshift::cost::tokens::Tokenizer;
use nightshift::split::{SplitSpec, split};
use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::cli::bin;

const DOCS: usize = 12;
const SPLIT: SplitSpec = SplitSpec {
    max_tokens: 120,
    overlap_tokens: 10,
};
const SAMPLE: &str = "0.4";

/// Each document's body: a few paragraphs of its own (no two chunks alike).
fn body(i: usize) -> String {
    (0..2 + i % 4)
        .map(|j| {
            format!(
                "Policy {i}.{j} says that orders placed before day {} are refunded within {} days. \
                 A customer of region {} may ask for a copy of invoice {} at any time. \
                 Shipping to zone {} takes {} working days, and parcels above {} kg need a signature. \
                 Section {j} of document {i} ends here.",
                i * 7 + j,
                14 + j,
                i + j * 3,
                1000 + i * 31 + j,
                j + 1,
                2 + (i + j) % 5,
                5 + i % 3
            )
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// A source of documents and a three-stage pipeline over it: notes per chunk of the body,
/// a summary of each document from its notes, a review of a sample of the summaries by a
/// smaller model.
fn write_stages(dir: &Path) -> PathBuf {
    let lines: Vec<String> = (0..DOCS)
        .map(|i| json!({"id": format!("doc-{i}"), "title": format!("Policy document {i}"), "body": body(i)}).to_string())
        .collect();
    std::fs::write(dir.join("docs.jsonl"), lines.join("\n") + "\n").unwrap();
    let schemas = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/schemas");
    for s in ["notes.json", "summary.json", "review.json"] {
        std::fs::copy(schemas.join(s), dir.join(s)).unwrap();
    }
    let text = format!(
        r#"name = "docs"
[source]
kind = "jsonl"
path = "docs.jsonl"
id_field = "id"

[provider]
kind = "openai"
model = "gpt-5.4-mini"
simulate = true
poll_min_seconds = 0.02
poll_max_seconds = 0.2

[provider.simulator]
batch_seconds = 0.1
retry_after_ms = 20

[[stage]]
name = "notes"
for_each = "chunk"
split = {{ field = "body", max_tokens = {max}, overlap_tokens = {overlap} }}
schema = "notes.json"
prompt.system = "Take notes on one part of a document."
prompt.user = "{{{{title}}}}, part {{{{ chunk.index + 1 }}}} of {{{{ chunk.count }}}}:\n{{{{ chunk.text }}}}"
prompt.max_output_tokens = 200

[[stage]]
name = "summary"
needs = ["notes"]
schema = "summary.json"
prompt.system = "Summarise a document from its notes."
prompt.user = "{{{{title}}}}\n{{% for n in notes %}}{{% for p in n.points %}}- {{{{ p }}}}\n{{% endfor %}}{{% endfor %}}"
prompt.max_output_tokens = 400

[[stage]]
name = "review"
needs = ["summary"]
sample = {SAMPLE}
provider = {{ model = "gpt-5.4-nano" }}
schema = "review.json"
prompt.system = "Check a summary."
prompt.user = "{{{{title}}}}\n{{{{ summary.summary }}}}"
prompt.max_output_tokens = 150

[output]
path = "out/docs.jsonl"

[retry]
max_attempts = 3

[plan]
unit = "document"
"#,
        max = SPLIT.max_tokens,
        overlap = SPLIT.overlap_tokens,
    );
    let path = dir.join("docs.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json_of(cmd: &mut Command) -> Value {
    serde_json::from_str(&ok(cmd)).unwrap()
}

fn dec(v: &Value) -> Decimal {
    v.as_str()
        .unwrap_or_else(|| panic!("not decimal text: {v}"))
        .parse()
        .unwrap()
}

/// As the worksheet's JSON writes a decimal.
fn d12(x: Decimal) -> Decimal {
    x.round_dp(12).normalize()
}

fn stage<'a>(ws: &'a Value, name: &str) -> &'a Value {
    ws["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == name)
        .unwrap_or_else(|| panic!("no stage {name} in {ws:#}"))
}

/// The records the run's hash puts in the review's sample.
fn sampled() -> u64 {
    (0..DOCS)
        .filter(|i| {
            nightshift::stage::in_sample("review", &format!("doc-{i}"), SAMPLE.parse().unwrap())
        })
        .count() as u64
}

#[test]
fn plan_has_a_row_per_stage_with_the_real_chunks_and_the_sample_share() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_stages(dir.path());
    let ws = json_of(bin().args(["plan", "--json"]).arg(&file));
    let names: Vec<&str> = ws["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["notes", "summary", "review"]);

    // The chunk stage: the real splitter's chunks, with the stage model's tokenizer.
    let tok = Tokenizer::for_model("gpt-5.4-mini");
    let chunks: u64 = (0..DOCS)
        .map(|i| split(&body(i), SPLIT, &tok).len() as u64)
        .sum();
    assert!(chunks > 2 * DOCS as u64, "several chunks per document");
    let mean = Decimal::from(chunks) / Decimal::from(DOCS as u64);
    let notes = stage(&ws, "notes");
    assert_eq!(dec(&notes["chunks_per_record"]), d12(mean));
    // Every chunk is a request of its own here (no two alike).
    assert_eq!(dec(&notes["calls_per_record"]["value"]), d12(mean));
    assert_eq!(ws["items"]["unique"], chunks);
    assert_eq!(notes["input_tokens_per_call"]["exact"], true);

    // The summary: one call per record; its input depends on the notes, so an estimate.
    let summary = stage(&ws, "summary");
    assert_eq!(dec(&summary["calls_per_record"]["value"]), Decimal::ONE);
    assert_eq!(summary["input_tokens_per_call"]["exact"], false);
    let how = summary["input_tokens_per_call"]["source"].as_str().unwrap();
    assert!(
        how.starts_with("estimate") && how.contains("`notes`"),
        "{how}"
    );
    assert!(
        summary["output_tokens_per_call"]["source"]
            .as_str()
            .unwrap()
            .contains("assumption"),
        "{summary}"
    );
    assert_eq!(
        dec(&summary["output_tokens_per_call"]["value"]),
        Decimal::from(200)
    );

    // The sampled review: its share of these records, by the hash the run uses.
    let review = stage(&ws, "review");
    let share = Decimal::from(sampled()) / Decimal::from(DOCS as u64);
    assert!(share > Decimal::ZERO && share < Decimal::ONE, "{share}");
    assert_eq!(dec(&review["calls_per_record"]["value"]), d12(share));
    assert_eq!(dec(&review["runs_for"]["value"]), d12(share));
    assert_eq!(review["model"], "gpt-5.4-nano");

    // The item's total adds the stages up.
    let stages = ws["stages"].as_array().unwrap();
    let sum = |f: &dyn Fn(&Value) -> Decimal| stages.iter().map(f).sum::<Decimal>();
    let close = |a: Decimal, b: Decimal| (a - b).abs() < Decimal::new(1, 10);
    assert!(close(
        dec(&ws["calls_per_item"]),
        sum(&|s| dec(&s["calls_per_record"]["value"]))
    ));
    assert!(close(
        dec(&ws["cost_per_processed_item_usd"]),
        sum(&|s| dec(&s["cost_per_record_usd"]))
    ));
    assert!(close(
        dec(&ws["expected_cost_usd"]),
        sum(&|s| dec(&s["expected_cost_usd"]))
    ));
    for s in stages {
        assert_eq!(s["records"]["to_do"], DOCS as u64, "{s}");
        assert!(dec(&s["worst_case_per_record_usd"]) > dec(&s["cost_per_record_usd"]));
    }

    // For people, and for other tools.
    let text = ok(bin().arg("plan").arg(&file));
    for needle in ["per stage", "notes", "summary", "review", "calls per item"] {
        assert!(text.contains(needle), "{needle}:\n{text}");
    }
    let csv = ok(bin().args(["plan", "--csv"]).arg(&file));
    assert!(csv.contains("notes: calls per record"), "{csv}");
    assert!(csv.contains("review: runs for"), "{csv}");
}

#[test]
fn reconcile_holds_each_stage_of_a_run_against_its_row() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_stages(dir.path());
    ok(bin().arg("run").arg(&file));
    let report = json_of(bin().args(["report", "--json"]).arg(&file));
    let rec = json_of(bin().args(["reconcile", "--json"]).arg(&file));
    let lines = rec["plan_vs_actual_per_stage"].as_array().unwrap();
    let line = |stage: &str, figure: &str| -> &Value {
        lines
            .iter()
            .find(|l| l["stage"] == stage && l["figure"] == figure)
            .unwrap_or_else(|| panic!("no {stage} {figure} in {rec:#}"))
    };
    for name in ["notes", "summary", "review"] {
        for figure in [
            "calls per record",
            "calls sent",
            "input tokens per call (mean)",
            "output tokens per call (mean)",
            "retry rate (%)",
            "cost (USD)",
        ] {
            let l = line(name, figure);
            assert_ne!(l["plan"], "-", "{l}");
        }
        // The actual cost of a stage is the report's, to the pico-dollar.
        let st = report["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stage"] == name)
            .unwrap();
        assert_eq!(line(name, "cost (USD)")["actual"], st["cost_usd"], "{name}");
    }
    // What could be known before the run was: every chunk, every record's summary, the
    // sample's reviews.
    for name in ["notes", "summary", "review"] {
        let sent = line(name, "calls sent");
        assert_eq!(sent["plan"], sent["actual"], "{name}: {sent}");
    }
    let calls = line("notes", "calls per record");
    assert_eq!(calls["plan"], calls["actual"], "{calls}");
    assert_eq!(
        line("review", "calls sent")["actual"],
        sampled().to_string()
    );
    let text = ok(bin().arg("reconcile").arg(&file));
    assert!(text.contains("plan vs actual, per stage"), "{text}");

    // After the run, every stage of every record is done, and the plan knows it.
    let again = json_of(bin().args(["plan", "--json"]).arg(&file));
    for s in again["stages"].as_array().unwrap() {
        assert_eq!(s["records"]["to_do"], 0, "{s}");
        assert_eq!(dec(&s["expected_cost_usd"]), Decimal::ZERO, "{s}");
    }
    assert!(
        stage(&again, "summary")["records"]["done_source"]
            .as_str()
            .unwrap()
            .contains("latest run")
    );
    // The later stages' output tokens now come from what they answered.
    assert!(
        stage(&again, "summary")["output_tokens_per_call"]["source"]
            .as_str()
            .unwrap()
            .contains("earlier answers of this stage")
    );
}

/// A second run over the same records: its worksheet finds every record done at every stage
/// (the first stage's items succeeded before, the later stages' links to them are there after
/// its first advance), so it plans no call for any stage, and sends none.
#[test]
fn a_second_run_plans_no_call_at_a_stage_its_records_are_done_at() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_stages(dir.path());
    ok(bin().arg("run").arg(&file));
    ok(bin().arg("run").arg(&file));
    let rec = json_of(bin().args(["reconcile", "--json"]).arg(&file));
    let lines = rec["plan_vs_actual_per_stage"].as_array().unwrap();
    for name in ["notes", "summary", "review"] {
        let sent = lines
            .iter()
            .find(|l| l["stage"] == name && l["figure"] == "calls sent")
            .unwrap_or_else(|| panic!("no {name} calls sent in {rec:#}"));
        assert_eq!(sent["plan"], "0", "{name}: {sent}");
        assert_eq!(sent["actual"], "0", "{name}: {sent}");
    }
}
