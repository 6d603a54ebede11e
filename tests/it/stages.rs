//! Multi-stage pipelines as a user relies on them: long documents split into chunks, notes
//! per chunk, a summary per document from its notes, a review of a sample. What was sent is
//! read from the simulator's record (each stage speaks to its own model, so the record tells
//! the stages apart), what was kept from the store, the results file and `report --json`.
//! The runs are in-process against a simulator of the test's own; the store is a SQLite
//! file, and the same tests run again in a PostgreSQL schema when `NIGHTSHIFT_TEST_PG_URL`
//! is set.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nightshift::config::Pipeline;
use nightshift::cost::tokens::Tokenizer;
use nightshift::cost::{PriceTable, Usd};
use nightshift::sim::{SimHandle, SimSettings};
use nightshift::store::{RunStatus, SqlStore};
use nightshift::worker::{self, RunContext, RunOutcome};
use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::cli::bin;
use crate::common::{Recorder, TestDb, all, client, quiet_sim, record, start_sim};

/// The model of each stage: the simulator's record names the model of every batch.
const NOTES_MODEL: &str = "gpt-5.4-nano";
const SUMMARY_MODEL: &str = "gpt-5.4-mini";
const REVIEW_MODEL: &str = "gpt-4.1-nano";

const NOTES_SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "properties": {
    "points": {"type": "array", "items": {"type": "string", "minLength": 3, "maxLength": 80},
               "minItems": 1, "maxItems": 3}
  },
  "required": ["points"],
  "additionalProperties": false
}"#;

/// `{pattern}` is replaced: empty, or a `"pattern"` no answer of the simulator matches.
const SUMMARY_SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "properties": {
    "summary": {"type": "string", "minLength": 5, "maxLength": 200{pattern}},
    "confidence": {"type": "number", "minimum": 0, "maximum": 1}
  },
  "required": ["summary", "confidence"],
  "additionalProperties": false
}"#;

const REVIEW_SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "properties": {
    "pass": {"type": "boolean"},
    "issues": {"type": "array", "items": {"type": "string", "maxLength": 80}, "maxItems": 2}
  },
  "required": ["pass", "issues"],
  "additionalProperties": false
}"#;

const VOCAB: &[&str] = &[
    "account",
    "billing",
    "refund",
    "invoice",
    "customer",
    "order",
    "shipping",
    "warehouse",
    "policy",
    "request",
    "support",
    "agent",
    "payment",
    "card",
    "subscription",
    "renewal",
    "period",
    "notice",
    "data",
    "retention",
    "security",
    "review",
    "access",
    "team",
    "plan",
    "upgrade",
    "report",
    "export",
    "device",
    "return",
    "label",
    "carrier",
    "window",
    "days",
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "for",
    "with",
    "on",
    "is",
    "are",
    "may",
    "will",
    "can",
    "within",
    "after",
    "before",
    "every",
    "each",
    "our",
    "your",
];

/// Paragraph `k` of document `doc`: three sentences of words drawn from a generator seeded
/// by both, so no two paragraphs of the corpus are alike.
fn paragraph(doc: usize, k: usize) -> String {
    let mut state = (doc as u64 * 1_000 + k as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut below = |n: usize| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) % n as u64) as usize
    };
    let mut sentences = Vec::new();
    for _ in 0..3 {
        let words = 9 + below(5);
        let mut s = String::new();
        for w in 0..words {
            let word = VOCAB[below(VOCAB.len())];
            if w == 0 {
                s.push_str(&word[..1].to_uppercase());
                s.push_str(&word[1..]);
            } else {
                s.push(' ');
                s.push_str(word);
            }
        }
        s.push('.');
        sentences.push(s);
    }
    sentences.join(" ")
}

/// `n` documents of `paragraphs` paragraphs each, ids `doc-000`…
fn documents(n: usize, paragraphs: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let body: Vec<String> = (0..paragraphs).map(|k| paragraph(i, k)).collect();
            json!({"id": format!("doc-{i:03}"), "title": format!("Policy note {i}"), "body": body.join("\n\n")})
        })
        .collect()
}

fn write_documents(dir: &Path, docs: &[Value]) {
    let text: String = docs.iter().map(|d| d.to_string() + "\n").collect();
    std::fs::write(dir.join("docs.jsonl"), text).unwrap();
}

/// How the test pipeline is set.
struct Setup {
    /// Attempts per item of the notes and summary stages.
    notes_attempts: u32,
    summary_attempts: u32,
    /// The review stage's sample share, if the pipeline has one.
    review: Option<&'static str>,
    /// Whether the summary schema carries a pattern no simulated answer matches.
    broken_summary: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            notes_attempts: 3,
            summary_attempts: 3,
            review: None,
            broken_summary: false,
        }
    }
}

fn write_summary_schema(dir: &Path, broken: bool) {
    let pattern = if broken {
        r#", "pattern": "^NEVER MATCHED$""#
    } else {
        ""
    };
    std::fs::write(
        dir.join("summary.json"),
        SUMMARY_SCHEMA.replace("{pattern}", pattern),
    )
    .unwrap();
}

/// Notes per chunk of `body` (at most 120 tokens each, no overlap), a summary per document
/// from its notes, optionally a review of a sample; each stage on its own model. The summary
/// template renders even with a chunk's notes missing, so only the runner keeps a summary of
/// a failed document from being sent.
fn write_pipeline(dir: &Path, s: &Setup) -> PathBuf {
    std::fs::write(dir.join("notes.json"), NOTES_SCHEMA).unwrap();
    std::fs::write(dir.join("review.json"), REVIEW_SCHEMA).unwrap();
    write_summary_schema(dir, s.broken_summary);
    let review = match s.review {
        Some(share) => format!(
            r#"
[[stage]]
name = "review"
needs = ["summary"]
sample = {share}
provider = {{ model = "{REVIEW_MODEL}" }}
schema = "review.json"
on_fail = "flag"
prompt.system = "Check a summary."
prompt.user = "{{{{title}}}}: {{{{ summary.summary }}}}"
prompt.max_output_tokens = 200
"#
        ),
        None => String::new(),
    };
    let text = format!(
        r#"name = "docs"
[source]
kind = "jsonl"
path = "docs.jsonl"
id_field = "id"

[provider]
kind = "openai"
model = "{SUMMARY_MODEL}"
simulate = true
poll_min_seconds = 0.02
poll_max_seconds = 0.2

[[stage]]
name = "notes"
for_each = "chunk"
split = {{ field = "body", max_tokens = 120, overlap_tokens = 0 }}
provider = {{ model = "{NOTES_MODEL}" }}
schema = "notes.json"
max_attempts = {notes_attempts}
prompt.system = "Take notes on one part of a longer document."
prompt.user = """
{{{{title}}}}, part {{{{ chunk.index + 1 }}}} of {{{{ chunk.count }}}}:
{{{{ chunk.text }}}}"""
prompt.max_output_tokens = 300

[[stage]]
name = "summary"
needs = ["notes"]
schema = "summary.json"
max_attempts = {summary_attempts}
prompt.system = "Summarise a document from the notes on its parts."
prompt.user = """
{{{{title}}}}
{{% for n in notes %}}Part {{{{ loop.index }}}}: {{% if n %}}{{{{ n.points | join("; ") }}}}{{% endif %}}
{{% endfor %}}"""
prompt.max_output_tokens = 300
{review}
[output]
path = "out/docs.jsonl"

[retry]
max_attempts = 3

[batch]
max_requests = 40
"#,
        notes_attempts = s.notes_attempts,
        summary_attempts = s.summary_attempts,
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs the pipeline in-process against `sim` with `store`.
async fn run(sim: &SimHandle, file: &Path, store: &SqlStore) -> RunOutcome {
    let p = Pipeline::load(file).unwrap();
    let price = p.stage_prices(&PriceTable::builtin()).unwrap();
    let c = client(sim);
    let observer = Recorder::default();
    let work_dir = file.parent().unwrap().join(".nightshift");
    std::fs::create_dir_all(&work_dir).unwrap();
    let ctx = RunContext {
        store,
        provider: &c,
        pipeline: &p,
        prices: &price,
        observer: &observer,
        work_dir,
        output_path: p.output.path.clone(),
        shutdown: Default::default(),
        detach: false,
        ingest_only: false,
        budget: p.budget,
        worker_id: "test".into(),
        lease: Duration::from_secs(60),
    };
    worker::run(&ctx).await.unwrap()
}

/// Requests the simulator's record holds, per model (every batch, every request in it).
fn sent_per_model(rec: &Value) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for b in rec["batches"].as_array().unwrap() {
        let model = b["model"]
            .as_str()
            .unwrap_or_else(|| panic!("a batch without its model: {b}"));
        *m.entry(model.to_string()).or_default() += b["requests"].as_array().unwrap().len();
    }
    assert!(
        rec["online"].as_array().unwrap().is_empty(),
        "nothing goes online"
    );
    m
}

/// What the simulator was sent between two of its records, per model.
fn sent_between(before: &Value, after: &Value) -> BTreeMap<String, usize> {
    let (b, a) = (sent_per_model(before), sent_per_model(after));
    a.into_iter()
        .map(|(k, n)| {
            let was = b.get(&k).copied().unwrap_or(0);
            (k, n - was)
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

fn n_of(m: &BTreeMap<String, usize>, model: &str) -> usize {
    m.get(model).copied().unwrap_or(0)
}

/// The results file, by record id.
fn results(outcome: &RunOutcome) -> BTreeMap<String, Value> {
    std::fs::read_to_string(&outcome.output_path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["id"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

fn usd(v: &Value) -> Usd {
    Usd::parse(v.as_str().unwrap_or_else(|| panic!("not money text: {v}"))).unwrap()
}

/// `nightshift report --json` of the latest run, from the store at `url`.
fn report_json(file: &Path, url: &str) -> Value {
    let out = bin()
        .args(["report", "--json", "--db", url])
        .arg(file)
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

/// Declares each test twice: on a SQLite file, and in a PostgreSQL schema of its own
/// (ignored, with the reason, when `NIGHTSHIFT_TEST_PG_URL` is not set).
macro_rules! on_both_engines {
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

on_both_engines!(
    a_failed_summary_reruns_without_resending_chunks,
    a_changed_paragraph_resends_one_chunk_and_one_summary,
    an_exhausted_chunk_fails_its_record_and_sends_no_summary,
    the_sample_is_the_same_set_on_two_machines,
    the_ledger_equals_the_bill_per_stage_and_in_total,
    a_rerun_with_nothing_changed_sends_nothing,
    report_json_has_a_figure_per_stage_that_adds_up,
);

/// A summary stage that fails for good (its schema has a pattern no answer matches, one
/// attempt) leaves the run failed with every chunk's notes kept; once the schema is fixed,
/// the next run sends the summaries and not one chunk again.
async fn a_failed_summary_reruns_without_resending_chunks(db: &TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let docs = documents(6, 10);
    write_documents(dir.path(), &docs);
    let file = write_pipeline(
        dir.path(),
        &Setup {
            summary_attempts: 1,
            broken_summary: true,
            ..Default::default()
        },
    );
    let sim = start_sim(quiet_sim()).await;

    let first = run(&sim, &file, &db.store).await;
    assert_eq!(first.status, RunStatus::Failed, "{:?}", first.message);
    assert_eq!(first.exit_code, 1);
    let rec1 = record(&sim).await;
    let sent1 = sent_per_model(&rec1);
    let chunks = n_of(&sent1, NOTES_MODEL);
    assert!(
        chunks >= docs.len() * 3,
        "several chunks per document: {sent1:?}"
    );
    assert_eq!(n_of(&sent1, SUMMARY_MODEL), docs.len(), "{sent1:?}");
    let lines = results(&first);
    for l in lines.values() {
        assert_eq!(l["status"], "failed", "{l}");
        assert!(l["error"].as_str().unwrap().starts_with("summary:"), "{l}");
        let notes = l["stages"]["notes"].as_array().unwrap();
        assert!(
            notes.len() >= 3 && notes.iter().all(|n| n["points"].is_array()),
            "{l}"
        );
    }

    write_summary_schema(dir.path(), false);
    let second = run(&sim, &file, &db.store).await;
    assert_eq!(second.status, RunStatus::Completed, "{:?}", second.message);
    assert_eq!(second.exit_code, 0);
    let rec2 = record(&sim).await;
    let sent2 = sent_between(&rec1, &rec2);
    assert_eq!(
        sent2,
        BTreeMap::from([(SUMMARY_MODEL.to_string(), docs.len())]),
        "the second run sends the summaries only, no chunk"
    );
    assert_eq!(second.requests_sent, docs.len() as u64);
    let lines = results(&second);
    assert_eq!(lines.len(), docs.len());
    for l in lines.values() {
        assert_eq!(l["status"], "succeeded", "{l}");
        assert!(l["stages"]["summary"]["summary"].is_string(), "{l}");
    }
}

/// Replaces one word of paragraph `k` of a document's body with another of the same token
/// count (the paragraph keeps its count, so only the chunk holding it changes).
fn edit_one_word(body: &str, k: usize) -> String {
    let tok = Tokenizer::for_model(NOTES_MODEL);
    let mut paragraphs: Vec<String> = body.split("\n\n").map(str::to_string).collect();
    let before = tok.count(&paragraphs[k]);
    let words: Vec<&str> = paragraphs[k].split(' ').collect();
    let at = words.len() / 2;
    let edited = VOCAB
        .iter()
        .filter(|w| **w != words[at].trim_end_matches('.'))
        .map(|w| {
            let mut ws = words.clone();
            let dot = if words[at].ends_with('.') { "." } else { "" };
            let replaced = format!("{w}{dot}");
            ws[at] = &replaced;
            ws.join(" ")
        })
        .find(|p| tok.count(p) == before)
        .expect("a word of the same token count");
    paragraphs[k] = edited;
    paragraphs.join("\n\n")
}

/// One word changed in one paragraph in the middle of one document: the next run sends one
/// chunk's notes and that document's summary, nothing else, and the other documents'
/// results are the same.
async fn a_changed_paragraph_resends_one_chunk_and_one_summary(db: &TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let mut docs = documents(5, 10);
    write_documents(dir.path(), &docs);
    let file = write_pipeline(dir.path(), &Setup::default());
    let sim = start_sim(quiet_sim()).await;
    let first = run(&sim, &file, &db.store).await;
    assert_eq!(first.status, RunStatus::Completed, "{:?}", first.message);
    let before = results(&first);
    let rec1 = record(&sim).await;

    let old_body = docs[2]["body"].as_str().unwrap().to_string();
    let new_body = edit_one_word(&old_body, 5);
    assert_ne!(old_body, new_body);
    // The premise, from the splitter itself: one chunk differs, the others are the same.
    let split = |text: &str| {
        nightshift::split::split(
            text,
            nightshift::split::SplitSpec {
                max_tokens: 120,
                overlap_tokens: 0,
            },
            &Tokenizer::for_model(NOTES_MODEL),
        )
    };
    let (old_chunks, new_chunks) = (split(&old_body), split(&new_body));
    assert!(old_chunks.len() >= 3, "{}", old_chunks.len());
    assert_eq!(old_chunks.len(), new_chunks.len());
    assert_eq!(
        old_chunks
            .iter()
            .zip(&new_chunks)
            .filter(|(a, b)| a != b)
            .count(),
        1
    );
    docs[2]["body"] = Value::String(new_body);
    write_documents(dir.path(), &docs);

    let second = run(&sim, &file, &db.store).await;
    assert_eq!(second.status, RunStatus::Completed, "{:?}", second.message);
    let sent = sent_between(&rec1, &record(&sim).await);
    assert_eq!(
        sent,
        BTreeMap::from([(NOTES_MODEL.to_string(), 1), (SUMMARY_MODEL.to_string(), 1)]),
        "one chunk's notes and one summary"
    );
    let after = results(&second);
    assert_eq!(before.len(), after.len());
    for (id, line) in &before {
        if id == "doc-002" {
            let new = &after[id];
            assert_eq!(new["status"], "succeeded");
            assert_ne!(new["stages"]["summary"], line["stages"]["summary"]);
            let (old_notes, new_notes) = (
                line["stages"]["notes"].as_array().unwrap(),
                new["stages"]["notes"].as_array().unwrap(),
            );
            let changed = old_notes
                .iter()
                .zip(new_notes)
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(changed, 1, "{line}\n{new}");
        } else {
            assert_eq!(line, &after[id], "{id} changed");
        }
    }
}

/// A chunk the provider fails every time is exhausted after its attempts: its record is
/// `failed` naming the notes stage, its summary is never sent, the other records succeed
/// and the run is `failed` (exit 1).
async fn an_exhausted_chunk_fails_its_record_and_sends_no_summary(db: &TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let mut docs = documents(5, 10);
    // One sentence more in paragraph 5 of document 3: the one chunk that never succeeds.
    let mut paragraphs: Vec<String> = docs[3]["body"]
        .as_str()
        .unwrap()
        .split("\n\n")
        .map(str::to_string)
        .collect();
    paragraphs[4].push_str(" The code UNANSWERABLE-7 applies.");
    docs[3]["body"] = Value::String(paragraphs.join("\n\n"));
    write_documents(dir.path(), &docs);
    let file = write_pipeline(
        dir.path(),
        &Setup {
            notes_attempts: 2,
            ..Default::default()
        },
    );
    let sim = start_sim(SimSettings {
        fail_when_contains: Some("UNANSWERABLE-7".into()),
        ..quiet_sim()
    })
    .await;
    let out = run(&sim, &file, &db.store).await;
    assert_eq!(out.status, RunStatus::Failed, "{:?}", out.message);
    assert_eq!(out.exit_code, 1);

    let rec = record(&sim).await;
    let sent = sent_per_model(&rec);
    assert_eq!(
        n_of(&sent, SUMMARY_MODEL),
        docs.len() - 1,
        "no summary for the failed document: {sent:?}"
    );
    // The failing chunk was sent twice (its two attempts) and failed both times.
    let errors: Vec<&Value> = rec["batches"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| b["requests"].as_array().unwrap())
        .filter(|r| r["outcome"] == "error")
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(errors[0]["body_sha256"], errors[1]["body_sha256"]);

    let lines = results(&out);
    let failed = &lines["doc-003"];
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed["error"].as_str().unwrap().starts_with("notes:"),
        "{failed}"
    );
    assert!(failed["stages"]["summary"].is_null(), "{failed}");
    assert!(
        failed["stages"]["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(Value::is_null),
        "{failed}"
    );
    for (id, l) in &lines {
        if id != "doc-003" {
            assert_eq!(l["status"], "succeeded", "{l}");
        }
    }
    // The store agrees: the failed record never went on to the summary stage.
    let (summaries,): (i64,) = crate::common::one(
        &db.store,
        "SELECT COUNT(*) FROM record_items x JOIN records r ON r.run_id = x.run_id AND r.line = x.line \
         WHERE x.stage = 'summary' AND r.record_id = 'doc-003'",
    )
    .await;
    assert_eq!(summaries, 0);
}

/// The records a run reviewed: those whose results line has a review.
fn reviewed(lines: &BTreeMap<String, Value>) -> BTreeSet<String> {
    lines
        .iter()
        .filter(|(_, l)| !l["stages"]["review"].is_null())
        .map(|(id, _)| id.clone())
        .collect()
}

/// Two machines (stores and simulators of their own) run the same source: the records
/// their review stage samples are the same set, about its share, and the one
/// `in_sample` gives.
async fn the_sample_is_the_same_set_on_two_machines(db: &TestDb) {
    let docs = documents(150, 1);
    let setup = Setup {
        review: Some("0.2"),
        ..Default::default()
    };
    let mut sets = Vec::new();
    // Machine one: the engine under test; machine two: a SQLite file of its own.
    let other = TestDb::sqlite().await;
    for store in [&db.store, &other.store] {
        let dir = tempfile::tempdir().unwrap();
        write_documents(dir.path(), &docs);
        let file = write_pipeline(dir.path(), &setup);
        let sim = start_sim(quiet_sim()).await;
        let out = run(&sim, &file, store).await;
        assert_eq!(out.status, RunStatus::Completed, "{:?}", out.message);
        let set = reviewed(&results(&out));
        let sent = sent_per_model(&record(&sim).await);
        assert_eq!(n_of(&sent, REVIEW_MODEL), set.len(), "{sent:?}");
        sets.push(set);
    }
    other.finish().await;
    assert_eq!(sets[0], sets[1], "the same records on both machines");
    let share = Decimal::new(2, 1);
    let expected: BTreeSet<String> = docs
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .filter(|id| worker::in_sample("review", id, share))
        .collect();
    assert_eq!(sets[0], expected);
    // 20 % of 150 is 30 (σ ≈ 4.9).
    assert!(
        (15..=45).contains(&sets[0].len()),
        "{} of 150 reviewed",
        sets[0].len()
    );
}

/// With failed, malformed and cached answers on every stage, what the ledger holds per
/// stage is what the simulator billed for that stage's model, to the pico-dollar, and the
/// report's per-stage costs add up to its total.
async fn the_ledger_equals_the_bill_per_stage_and_in_total(db: &TestDb) {
    let dir = tempfile::tempdir().unwrap();
    write_documents(dir.path(), &documents(12, 6));
    let file = write_pipeline(
        dir.path(),
        &Setup {
            review: Some("0.5"),
            ..Default::default()
        },
    );
    let sim = start_sim(SimSettings {
        seed: 3,
        fail_rate: 0.1,
        invalid_json_rate: 0.1,
        cache_rate: 0.3,
        ..quiet_sim()
    })
    .await;
    let out = run(&sim, &file, &db.store).await;
    assert!(
        matches!(out.status, RunStatus::Completed | RunStatus::Failed),
        "{:?}",
        out.message
    );
    let rec = record(&sim).await;
    let billed: BTreeMap<String, Usd> = rec["bill"]["per_model"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["model"].as_str().unwrap().to_string(),
                usd(&m["cost_usd"]),
            )
        })
        .collect();
    let ledger: Vec<(String, i64)> = all(
        &db.store,
        "SELECT b.stage, CAST(SUM(l.cost_pico) AS BIGINT) FROM ledger l \
         JOIN attempts a ON a.id = l.attempt_id JOIN batches b ON b.id = a.batch_id \
         GROUP BY b.stage ORDER BY b.stage",
    )
    .await;
    let ledger: BTreeMap<String, Usd> = ledger
        .into_iter()
        .map(|(s, p)| (s, Usd::from_pico(p as i128)))
        .collect();
    let model_of = BTreeMap::from([
        ("notes", NOTES_MODEL),
        ("summary", SUMMARY_MODEL),
        ("review", REVIEW_MODEL),
    ]);
    assert_eq!(ledger.len(), 3, "every stage was billed: {ledger:?}");
    for (stage, cost) in &ledger {
        assert!(*cost > Usd::ZERO);
        assert_eq!(
            *cost,
            billed[model_of[stage.as_str()]],
            "stage {stage}: ledger vs the simulator's bill"
        );
    }
    let total: Usd = ledger.values().copied().sum();
    assert_eq!(total, usd(&rec["bill"]["totals"]["cost_usd"]));
    // Some answers were retried: the faults reached every stage's ledger.
    let (retried,): (i64,) = crate::common::one(
        &db.store,
        "SELECT COUNT(*) FROM attempts WHERE verdict <> 'valid'",
    )
    .await;
    assert!(retried > 0, "no failed attempt: the faults did not bite");

    let r = report_json(&file, &db.url);
    assert_eq!(usd(&r["cost_usd"]), total, "{r}");
    let stages = r["stages"].as_array().unwrap();
    let per_stage: Usd = stages.iter().map(|s| usd(&s["cost_usd"])).sum();
    assert_eq!(per_stage, total, "the stages add up to the run: {r}");
    for s in stages {
        let name = s["stage"].as_str().unwrap();
        assert_eq!(usd(&s["cost_usd"]), ledger[name], "{s}");
    }
}

/// Run again with nothing changed: nothing is sent, the run completes (exit 0), and the
/// results are the same; and once more.
async fn a_rerun_with_nothing_changed_sends_nothing(db: &TestDb) {
    let dir = tempfile::tempdir().unwrap();
    write_documents(dir.path(), &documents(4, 10));
    let file = write_pipeline(
        dir.path(),
        &Setup {
            review: Some("0.5"),
            ..Default::default()
        },
    );
    let sim = start_sim(quiet_sim()).await;
    let first = run(&sim, &file, &db.store).await;
    assert_eq!(first.status, RunStatus::Completed, "{:?}", first.message);
    let lines = results(&first);
    let rec = record(&sim).await;
    for night in 2..=3 {
        let again = run(&sim, &file, &db.store).await;
        assert_eq!(
            (again.status, again.exit_code, again.requests_sent),
            (RunStatus::Completed, 0, 0),
            "run {night}: {:?}",
            again.message
        );
        assert_eq!(
            sent_per_model(&record(&sim).await),
            sent_per_model(&rec),
            "run {night} sent something"
        );
        let now = results(&again);
        assert_eq!(now.len(), lines.len());
        for (id, l) in &lines {
            assert_eq!(l, &now[id], "run {night}: {id}");
        }
        let r = report_json(&file, &db.url);
        assert_eq!(
            (r["attempts"].as_u64(), r["requests_sent"].as_u64()),
            (Some(0), Some(0)),
            "{r}"
        );
        assert_eq!(usd(&r["cost_usd"]), Usd::ZERO);
    }
}

/// `report --json` of a multi-stage run: one entry per stage in file order, whose attempts
/// add up to the run's, and calls per processed item for the run and each stage.
async fn report_json_has_a_figure_per_stage_that_adds_up(db: &TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let docs = documents(10, 10);
    write_documents(dir.path(), &docs);
    let file = write_pipeline(
        dir.path(),
        &Setup {
            review: Some("0.6"),
            ..Default::default()
        },
    );
    let sim = start_sim(SimSettings {
        seed: 9,
        invalid_json_rate: 0.1,
        ..quiet_sim()
    })
    .await;
    let out = run(&sim, &file, &db.store).await;
    assert_eq!(out.status, RunStatus::Completed, "{:?}", out.message);
    let r = report_json(&file, &db.url);
    let stages = r["stages"].as_array().unwrap();
    let names: Vec<&str> = stages
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["notes", "summary", "review"], "{r}");
    let attempts = r["attempts"].as_u64().unwrap();
    let sum: u64 = stages.iter().map(|s| s["attempts"].as_u64().unwrap()).sum();
    assert_eq!(sum, attempts, "{r}");
    let sent: usize = sent_per_model(&record(&sim).await).values().sum();
    assert_eq!(
        attempts, sent as u64,
        "every attempt is a request the simulator got"
    );
    assert_eq!(r["records"]["processed"], docs.len(), "{r}");
    let per_item = |a: u64| {
        (Decimal::from(a) / Decimal::from(docs.len() as u64))
            .round_dp(2)
            .to_string()
    };
    assert_eq!(r["calls_per_processed_item"], per_item(attempts), "{r}");
    assert!(
        attempts as usize > docs.len() * 4,
        "several calls per document"
    );
    let reviewed = stages[2]["records"].as_u64().unwrap();
    assert_eq!(
        reviewed,
        reviewed_of(&results(&out)),
        "the review stage's records are the sampled ones: {r}"
    );
    // The verdicts the report counts (in the store, on either engine) are the results
    // file's, record by record.
    let lines = results(&out);
    let verdicts = |v: &str| lines.values().filter(|l| l["review"] == v).count() as u64;
    assert!(reviewed > 0, "the sample reviews some documents: {r}");
    assert_eq!(stages[2]["review"]["pass"], verdicts("pass"), "{r}");
    assert_eq!(stages[2]["review"]["fail"], verdicts("fail"), "{r}");
    assert!(verdicts("pass") + verdicts("fail") > 0, "{r}");
    assert!(stages[0]["review"].is_null() && stages[1]["review"].is_null());
    // Every record has its links at every stage: run, or skipped (not in the review's
    // sample). A record counts once at a stage however many chunks it has there.
    for s in stages {
        let (records, skipped) = (
            s["records"].as_u64().unwrap(),
            s["skipped_records"].as_u64().unwrap(),
        );
        assert_eq!(records + skipped, docs.len() as u64, "{s}");
    }
    assert_eq!(stages[0]["records"], docs.len(), "{r}");
    assert!(
        stages[0]["items"].as_u64().unwrap() > docs.len() as u64,
        "several chunks per document: {r}"
    );
    assert_eq!(stages[2]["skipped_records"], docs.len() as u64 - reviewed);
    for s in stages {
        assert_eq!(
            s["calls_per_processed_item"],
            per_item(s["attempts"].as_u64().unwrap()),
            "{s}"
        );
    }
    // `report --items` reads the records' chains a page of records at a time: pages of 3
    // give every record once, in line order, with the links one page of all of them gives,
    // at every stage (run or skipped).
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let whole = chains_in_pages(&db.store, &out.run_id, &names, 10_000).await;
    assert_eq!(
        chains_in_pages(&db.store, &out.run_id, &names, 3).await,
        whole
    );
    assert_eq!(whole.len(), docs.len());
    assert!(whole.windows(2).all(|w| w[0].0 < w[1].0));
    for (line, id, links) in &whole {
        for n in &names {
            assert!(
                links.iter().any(|l| &l.0 == n),
                "{id} (line {line}): {links:?}"
            );
        }
    }
}

/// Each record's line, id and links (stage, chunk, item) as `report --items` reads them,
/// `page` records at a time.
async fn chains_in_pages(
    store: &SqlStore,
    run_id: &str,
    stages: &[String],
    page: u32,
) -> Vec<(i64, String, Vec<(String, i64, Option<i64>)>)> {
    let mut pages = nightshift::report::ChainPages::new(store, run_id, stages, page);
    let mut out = Vec::new();
    while let Some(p) = pages.next().await.unwrap() {
        for c in p.chains() {
            let links = c
                .links
                .iter()
                .map(|l| (l.stage.clone(), l.chunk, l.item_id));
            out.push((c.line, c.record_id.to_string(), links.collect()));
        }
    }
    out
}

fn reviewed_of(lines: &BTreeMap<String, Value>) -> u64 {
    reviewed(lines).len() as u64
}

/// `validate` lists every mistake across stages in one pass, each with its TOML path, and
/// exits 78.
#[test]
fn validate_catches_each_cross_stage_mistake_in_one_pass() {
    let dir = tempfile::tempdir().unwrap();
    write_documents(dir.path(), &documents(3, 2));
    std::fs::write(dir.path().join("notes.json"), NOTES_SCHEMA).unwrap();
    write_summary_schema(dir.path(), false);
    std::fs::write(dir.path().join("review.json"), REVIEW_SCHEMA).unwrap();
    let stage = |name: &str, extra: &str, user: &str| {
        format!(
            "\n[[stage]]\nname = \"{name}\"\nschema = \"summary.json\"\n{extra}\nprompt.user = \"\"\"{user}\"\"\"\nprompt.max_output_tokens = 100\n"
        )
    };
    let mut text = String::from(
        r#"name = "mistakes"
[source]
kind = "jsonl"
path = "docs.jsonl"
id_field = "id"

[provider]
kind = "openai"
model = "gpt-5.4-mini"
simulate = true

[output]
path = "out/x.jsonl"

[[stage]]
name = "notes"
for_each = "chunk"
split = { field = "body", max_tokens = 120 }
schema = "notes.json"
prompt.user = "{{ chunk.text }}"
prompt.max_output_tokens = 100
"#,
    );
    text += &stage("tags", "needs = [\"notes\"]", "{{title}}");
    // An unknown stage in needs; a template using `tags`, which it does not need.
    text += &stage(
        "summary",
        "needs = [\"notes\", \"ghost\"]",
        "{{title}} {{ tags.label }}",
    );
    // A condition using `tags`, not needed; a needs on a stage further down the file.
    text += &stage(
        "review",
        "needs = [\"summary\", \"publish\"]\nwhen = \"tags.confidence < 0.5\"",
        "{{ summary.summary }}",
    );
    text += &stage("publish", "needs = [\"summary\"]", "{{ summary.summary }}");
    // A cycle.
    text += &stage("loop_a", "needs = [\"loop_b\"]", "{{title}}");
    text += &stage("loop_b", "needs = [\"loop_a\"]", "{{title}}");
    // A second stage named `publish`.
    text += &stage("publish", "needs = [\"summary\"]", "{{title}}");
    let file = dir.path().join("mistakes.toml");
    std::fs::write(&file, text).unwrap();

    let out = bin().arg("validate").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    for (path, says) in [
        ("stage.summary.needs", "no stage is named `ghost`"),
        ("stage.summary.prompt.user", "uses `tags`"),
        ("stage.review.when", "uses `tags`"),
        ("stage.review.needs", "`publish` comes later"),
        (
            "stage.loop_a.needs",
            "a cycle: loop_a → needs → loop_b → needs → loop_a",
        ),
        (
            "stage.publish.name",
            "a stage named `publish` comes earlier",
        ),
    ] {
        assert!(
            err.lines().any(|l| l.contains(path) && l.contains(says)),
            "no `{path}`: `{says}` in:\n{err}"
        );
    }
    // Each is reported once, and nothing else: the cycle is not also a needs on a later stage.
    assert!(err.contains(": 6 problems"), "{err}");
    assert_eq!(err.matches("a cycle").count(), 1, "{err}");
    assert!(
        !err.contains("stage.loop_a.needs: `loop_b` comes later"),
        "{err}"
    );
    // Nothing was started.
    assert!(!dir.path().join(".nightshift").exists());
}
