//! Crash safety, judged from outside: the real binary runs as a child against a simulator
//! hosted by the test, is killed (SIGKILL at random moments, or aborted at named crash
//! points), and restarted until the run completes. Then the simulator's record and the store
//! must agree: no custom_id in two created batches, every item final, ledger = bill,
//! `integrity_check` ok, no orphan provider batch.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nightshift::cost::Usd;
use nightshift::sim::{SimHandle, SimSettings};
use nightshift::store::SqlStore;
use serde_json::{Value, json};
use tokio::process::Command;

use crate::common::*;

/// Crash points compiled in with `--features failpoints` (docs/reliability.md, B6).
pub const FAILPOINTS: &[&str] = &[
    "ingest.mid_tx",
    "ingest.after_chunk",
    "plan.mid_tx",
    "plan.after_commit",
    "build.mid_write",
    "upload.before_send",
    "upload.after_send",
    "create.before_send",
    "create.after_send",
    "create.after_store",
    "poll.after_get",
    "download.mid",
    "apply.after_chunk",
    "finish.before_commit",
    "retry.mid_tx",
    "output.mid_write",
];

/// Crash points of the stages after the first: right before a page of records gets its
/// next stage's items (results stored, the next items not yet), and right after.
pub const STAGE_FAILPOINTS: &[&str] = &["advance.before_links", "advance.after_commit"];

pub const MAX_ATTEMPTS: u32 = 4;

/// What a scenario's pipeline does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// The one-stage form: a label per ticket.
    OneStage,
    /// Three stages (`STAGED_PIPELINE`): notes on each chunk of a ticket's body, a summary
    /// from the notes, a review of 30 % of the summaries by a cheaper model.
    Stages,
}

impl Shape {
    fn write_source(self, dir: &Path, records: usize) -> Source {
        match self {
            Shape::OneStage => write_source(dir, records, 5, 2),
            Shape::Stages => write_staged_source(dir, records),
        }
    }
}

/// The chunk stage's budget. Every paragraph of a staged source counts more than half of it
/// and at most all of it, so a chunk is one paragraph, and a paragraph several tickets share
/// is one item.
pub const CHUNK_TOKENS: u32 = 60;
/// The model of the review stage (cheaper than the pipeline's).
pub const REVIEW_MODEL: &str = "gpt-5.4-nano";

/// The multi-stage pipeline of `Shape::Stages` (the `@…@` names filled in). The judge
/// renders the same templates to check each item was made from its own record and its own
/// earlier results.
const STAGED_PIPELINE: &str = r#"name = "it"
[source]
kind = "jsonl"
path = "records.jsonl"
id_field = "id"

[provider]
kind = "openai"
model = "gpt-5.4-mini"
simulate = true
poll_min_seconds = 0.02
poll_max_seconds = 0.2

[[stage]]
name = "notes"
for_each = "chunk"
split = { field = "body", max_tokens = @CHUNK_TOKENS@ }
schema = "schema.json"
prompt.system = "Take notes on this part of a support ticket."
prompt.user = "{{ chunk.text }}"
prompt.max_output_tokens = 300

[[stage]]
name = "summary"
needs = ["notes"]
schema = "schema.json"
prompt.system = "Summarise the support ticket from the notes on its parts."
prompt.user = "Ticket: {{ title }}\n{% for n in notes %}- {{ n.summary }}\n{% endfor %}"
prompt.max_output_tokens = 300

[[stage]]
name = "review"
needs = ["summary"]
sample = 0.3
provider = { model = "@REVIEW_MODEL@" }
schema = "schema.json"
prompt.system = "Check the summary of a support ticket."
prompt.user = "{{ title }}: {{ summary.summary }} ({{ summary.label }})"
prompt.max_output_tokens = 200

[output]
path = "out/results.jsonl"

[retry]
max_attempts = @MAX_ATTEMPTS@

[batch]
max_requests = @MAX_REQUESTS@
"#;

fn write_staged_pipeline(dir: &Path, max_requests: u32) -> PathBuf {
    std::fs::write(dir.join("schema.json"), SCHEMA).unwrap();
    let text = STAGED_PIPELINE
        .replace("@CHUNK_TOKENS@", &CHUNK_TOKENS.to_string())
        .replace("@REVIEW_MODEL@", REVIEW_MODEL)
        .replace("@MAX_ATTEMPTS@", &MAX_ATTEMPTS.to_string())
        .replace("@MAX_REQUESTS@", &max_requests.to_string());
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Paragraphs many tickets share (a preamble, a closing): their chunks are one item each.
const SHARED_PARAGRAPHS: [&str; 4] = [
    "Before we start: calls and chats with our support team are recorded for quality and training purposes, and the personal data they contain is handled under our published privacy policy.",
    "Reminder: refunds are paid back to the card or account used for the purchase, usually within five to ten working days of the moment our billing team approved the refund.",
    "You can reach the billing team Monday to Friday from nine to five by phone, on the number printed at the top of every invoice, or simply by replying to this message.",
    "If this answer did not solve your problem, reply within fourteen days and the same agent will pick up the conversation where it stopped, without you having to explain it again.",
];

/// Writes `n` ticket lines with a long `body` (one to three paragraphs of their own, a
/// quarter of them after a shared preamble, a fifth followed by a shared closing): ~5 %
/// exact duplicates (same title and body, other id), ~2 % malformed.
pub fn write_staged_source(dir: &Path, n: usize) -> Source {
    let tok = nightshift::cost::tokens::Tokenizer::for_model("gpt-5.4-mini");
    let fits = |p: &str| {
        let t = tok.count(p);
        assert!(
            t > u64::from(CHUNK_TOKENS) / 2 && t <= u64::from(CHUNK_TOKENS),
            "a paragraph of {t} tokens does not make one chunk of its own: {p}"
        );
    };
    for p in SHARED_PARAGRAPHS {
        fits(p);
    }
    let mut lines = Vec::with_capacity(n);
    let (mut valid, mut unique, mut malformed) = (0, 0, 0);
    let mut tickets: Vec<(String, String)> = Vec::new();
    for i in 0..n {
        if i % 50 == 7 {
            malformed += 1;
            if i % 2 == 0 {
                lines.push(format!("{{\"id\": \"r{i}\", \"body\": \"unterminated"));
            } else {
                lines.push(format!("{{\"body\": \"ticket {i} without an id\"}}"));
            }
            continue;
        }
        valid += 1;
        let (title, body) = if i % 20 == 3 && !tickets.is_empty() {
            tickets[i % tickets.len()].clone()
        } else {
            unique += 1;
            let mut paragraphs: Vec<String> = Vec::new();
            if i % 4 == 0 {
                paragraphs.push(SHARED_PARAGRAPHS[(i / 4) % 2].to_string());
            }
            for k in 0..1 + i % 3 {
                let p = format!(
                    "Part {k} of ticket {i}: the invoice for order {} was charged twice on day {}, and the refund the agent promised on the phone has still not reached the account.",
                    i * 7919 % 100_003,
                    (i + k) % 28 + 1
                );
                fits(&p);
                paragraphs.push(p);
            }
            if i % 5 == 1 {
                paragraphs.push(SHARED_PARAGRAPHS[2 + i % 2].to_string());
            }
            let t = (format!("Invoice query {i}"), paragraphs.join("\n\n"));
            tickets.push(t.clone());
            t
        };
        lines
            .push(json!({"id": format!("r{i}"), "title": title, "body": body, "n": i}).to_string());
    }
    std::fs::write(dir.join("records.jsonl"), lines.join("\n") + "\n").unwrap();
    Source {
        valid,
        unique,
        malformed,
    }
}

/// One pipeline, its folder, its store and the simulator it talks to.
pub struct Scenario {
    pub shape: Shape,
    pub dir: tempfile::TempDir,
    pub pipeline: PathBuf,
    pub db: PathBuf,
    pub sim: SimHandle,
    pub records: AtomicUsize,
    pub valid_records: AtomicUsize,
}

/// The weather of the crash tests: every kind of provider fault, a little of each.
pub fn stormy() -> SimSettings {
    SimSettings {
        batch_seconds: 0.2,
        fail_rate: 0.03,
        invalid_json_rate: 0.02,
        expire_first: 1,
        http_429_rate: 0.02,
        http_500_rate: 0.01,
        drop_create_rate: 0.1,
        reset_download_rate: 0.1,
        retry_after_ms: 20,
        ..Default::default()
    }
}

pub async fn scenario(records: usize, per_batch: u32, settings: SimSettings) -> Scenario {
    scenario_for(Provider::OpenAi, records, per_batch, settings).await
}

/// The provider a scenario's pipeline talks to (all served by the test's simulator).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    OpenAi,
    Azure,
    Anthropic,
    Gemini,
    /// OpenAI chat completions, online mode.
    Online,
    /// Anthropic messages, online mode.
    AnthropicOnline,
    /// Amazon Bedrock batch inference (Anthropic bodies), S3 on the simulator.
    Bedrock,
    /// Amazon Bedrock with a Converse model.
    BedrockConverse,
}

impl Provider {
    fn lines(self, sim: &SimHandle) -> String {
        let bedrock = |model: &str| {
            let root = sim.root_url();
            format!(
                "kind = \"bedrock\"\nmodel = \"{model}\"\nregion = \"us-east-1\"\nrole_arn = \"arn:aws:iam::123456789012:role/NightshiftTest\"\ninput_s3_uri = \"s3://ns-test/in/\"\noutput_s3_uri = \"s3://ns-test/out/\"\nendpoint_url = \"{root}\"\ns3_endpoint_url = \"{root}/s3\"\nsimulate = false\nreconcile_grace_seconds = 0\n"
            )
        };
        let (kind, model, base, extra) = match self {
            Provider::Bedrock => return bedrock("anthropic.claude-haiku-4-5-20251001-v1:0"),
            Provider::BedrockConverse => return bedrock("amazon.nova-lite-v1:0"),
            Provider::OpenAi => ("openai", "gpt-5.4-mini", sim.base_url(), ""),
            Provider::Azure => (
                "azure",
                "gpt-4.1-mini",
                sim.root_url(),
                "deployment = \"gpt-4.1-mini\"\n",
            ),
            Provider::Anthropic => ("anthropic", "claude-haiku-4-5", sim.root_url(), ""),
            Provider::Gemini => ("gemini", "gemini-2.5-flash", sim.root_url(), ""),
            Provider::Online => (
                "openai",
                "gpt-5.4-nano",
                sim.base_url(),
                "mode = \"online\"\nconcurrency = 4\n",
            ),
            Provider::AnthropicOnline => (
                "anthropic",
                "claude-haiku-4-5",
                sim.root_url(),
                "mode = \"online\"\nconcurrency = 4\n",
            ),
        };
        format!(
            "kind = \"{kind}\"\nmodel = \"{model}\"\n{extra}simulate = false\nbase_url = \"{base}\"\napi_key_env = \"NS_CRASH_KEY\"\nreconcile_grace_seconds = 0\n"
        )
    }
}

pub async fn scenario_for(
    provider: Provider,
    records: usize,
    per_batch: u32,
    settings: SimSettings,
) -> Scenario {
    scenario_with(Shape::OneStage, provider, records, per_batch, settings).await
}

/// A scenario of the multi-stage pipeline (`Shape::Stages`) on OpenAI batches.
pub async fn staged_scenario(records: usize, per_batch: u32, settings: SimSettings) -> Scenario {
    scenario_with(
        Shape::Stages,
        Provider::OpenAi,
        records,
        per_batch,
        settings,
    )
    .await
}

pub async fn scenario_with(
    shape: Shape,
    provider: Provider,
    records: usize,
    per_batch: u32,
    settings: SimSettings,
) -> Scenario {
    let dir = tempfile::tempdir().unwrap();
    let src = shape.write_source(dir.path(), records);
    let sim = start_sim(settings).await;
    let pipeline = match shape {
        Shape::OneStage => write_pipeline(dir.path(), MAX_ATTEMPTS, per_batch, ""),
        Shape::Stages => write_staged_pipeline(dir.path(), per_batch),
    };
    // Point the pipeline at the test's simulator, as at a real provider.
    let text = std::fs::read_to_string(&pipeline).unwrap().replace(
        "kind = \"openai\"\nmodel = \"gpt-5.4-mini\"\nsimulate = true\n",
        &provider.lines(&sim),
    );
    std::fs::write(&pipeline, text).unwrap();
    let db = dir.path().join(".nightshift/state.db");
    Scenario {
        shape,
        dir,
        pipeline,
        db,
        sim,
        records: AtomicUsize::new(records),
        valid_records: AtomicUsize::new(src.valid),
    }
}

impl Scenario {
    /// New records arrive (the source grows; earlier lines stay as they were).
    pub fn grow(&self, more: usize) {
        let n = self.records.fetch_add(more, Ordering::SeqCst) + more;
        let src = self.shape.write_source(self.dir.path(), n);
        self.valid_records.store(src.valid, Ordering::SeqCst);
    }

    pub fn child(&self, failpoints: Option<&str>) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_nightshift"));
        c.arg("run")
            .arg(&self.pipeline)
            .arg("--no-progress")
            .env("NS_CRASH_KEY", "sk-crash-test")
            // Bedrock's credentials, from the environment as the AWS chain reads them; never
            // the machine's own profile or instance role.
            .env("AWS_ACCESS_KEY_ID", "AKIDNIGHTSHIFTTEST")
            .env("AWS_SECRET_ACCESS_KEY", "nightshift-test-secret")
            .env("AWS_CONFIG_FILE", "/nonexistent/nightshift-test")
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                "/nonexistent/nightshift-test",
            )
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN")
            .env("NIGHTSHIFT_LOG", "nightshift=error")
            .env_remove("NIGHTSHIFT_DB")
            .env_remove("RUST_LOG")
            .env_remove("NIGHTSHIFT_FAILPOINTS")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(fp) = failpoints {
            c.env("NIGHTSHIFT_FAILPOINTS", fp);
        }
        c
    }

    /// Runs the child until it finishes normally (exit 0 or 1); returns the runs it took.
    pub async fn run_until_done(&self) -> usize {
        for n in 1..=40 {
            let out = self.child(None).output().await.unwrap();
            match out.status.code() {
                Some(0) | Some(1) => return n,
                Some(75) => continue,
                other => panic!(
                    "recovery run ended with {other:?}:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                ),
            }
        }
        panic!("the pipeline never completed");
    }
}

/// The oracle's verdict.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Requests the provider got twice: a custom_id in two batches (or answered online
    /// twice), or one attempt of one item sent under two custom_ids.
    pub duplicate_submissions: u64,
    pub lost: u64,
    pub ledger_delta_tokens: u64,
    pub ledger_delta_usd: Usd,
    pub orphan_batches: u64,
    /// Multi-stage: items of a stage made twice (two items of one stage rendered to the same
    /// request, or more items at the chunk stage than the sources have distinct chunks).
    pub duplicate_items: u64,
    /// Multi-stage: records of the last run whose links are not exactly one per (record,
    /// stage, chunk) as the source, the earlier results and the sample say.
    pub bad_links: u64,
    /// Multi-stage: ledger vs bill per stage and model, in tokens and pico-dollars.
    pub stage_ledger_delta_tokens: u64,
    pub stage_ledger_delta_usd: Usd,
    /// Multi-stage: answers billed for another model than their stage's.
    pub wrong_model: u64,
}

pub async fn judge(sc: &Scenario) -> Verdict {
    let store = SqlStore::open_sqlite(&sc.db).await.unwrap();
    let v = judge_store(sc, &store).await;
    store.close().await;
    v
}

/// The oracle against a store of either engine.
pub async fn judge_store(sc: &Scenario, store: &SqlStore) -> Verdict {
    let rec = record(&sc.sim).await;
    assert_eq!(store.integrity_check().await.unwrap(), "ok");

    // 1. custom_ids in more than one created batch (or answered online more than once),
    // and one attempt of one item under two custom_ids (`b<batch>-<item>-<attempt>`).
    let by_cid = requests_by_custom_id(&rec);
    let mut duplicate_submissions: u64 = by_cid.values().map(|v| v.len() as u64 - 1).sum();
    let mut online_seen = HashSet::new();
    for o in rec["online"].as_array().unwrap() {
        let cid = o["custom_id"].as_str().unwrap();
        if !online_seen.insert(cid.to_string()) || by_cid.contains_key(cid) {
            duplicate_submissions += 1;
        }
    }
    // A request that never ran (its job expired before starting it, or was cancelled first)
    // may be sent again as the same attempt: nothing of it was answered or billed.
    let ran = |cid: &String| {
        by_cid.get(cid).is_none_or(|v| {
            v.iter()
                .any(|(_, _, o)| !matches!(o.as_str(), "expired" | "cancelled" | "not_run"))
        })
    };
    let cids: HashSet<&String> = by_cid
        .keys()
        .chain(online_seen.iter())
        .filter(|c| ran(c))
        .collect();
    let mut item_attempts = HashSet::new();
    for cid in cids {
        let mut parts = cid.rsplitn(3, '-');
        let (Some(attempt), Some(item)) = (parts.next(), parts.next()) else {
            panic!("custom_id {cid} is not b<batch>-<item>-<attempt>");
        };
        if !item_attempts.insert((item.to_string(), attempt.to_string())) {
            eprintln!("item {item} attempt {attempt} was sent under two custom_ids");
            duplicate_submissions += 1;
        }
    }

    // 2. items not final, and valid records without a result in the last run.
    let (lost,): (i64,) = one(
        store,
        "SELECT COUNT(*) FROM items WHERE state NOT IN ('succeeded', 'exhausted')",
    )
    .await;
    let (last,): (String,) = one(
        store,
        "SELECT id FROM runs ORDER BY started_at DESC, id DESC LIMIT 1",
    )
    .await;
    // A run id is a UUID we generated: safe to inline.
    let (recorded,): (i64,) = one(
        store,
        &format!("SELECT COUNT(*) FROM records WHERE run_id = '{last}'"),
    )
    .await;
    let missing_records = sc.valid_records.load(Ordering::SeqCst) as i64 - recorded;
    let out = std::fs::read_to_string(sc.dir.path().join("out/results.jsonl")).unwrap();
    let pending_lines = out
        .lines()
        .filter(|l| l.contains("\"status\":\"pending\""))
        .count();

    // 3. ledger vs bill, per custom_id, in tokens and pico-dollars.
    let rows: Vec<(String, i64, i64, i64, i64, i64)> = all(
        store,
        "SELECT custom_id, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, cost_pico FROM ledger",
    )
    .await;
    let mut ours: HashMap<String, [i64; 5]> = HashMap::new();
    for r in rows {
        let prev = ours.insert(r.0, [r.1, r.2, r.3, r.4, r.5]);
        assert!(prev.is_none(), "two ledger rows for one custom_id");
    }
    let mut delta_tokens = 0u64;
    let mut delta_pico = 0i128;
    let mut billed_ids = HashSet::new();
    for e in rec["bill"]["per_custom_id"].as_array().unwrap() {
        let cid = e["custom_id"].as_str().unwrap().to_string();
        let bill = [
            e["input_tokens"].as_i64().unwrap(),
            e["cached_input_tokens"].as_i64().unwrap(),
            e["output_tokens"].as_i64().unwrap(),
            e["reasoning_tokens"].as_i64().unwrap(),
        ];
        let cost = Usd::parse(e["cost_usd"].as_str().unwrap()).unwrap().pico();
        let l = ours.get(&cid).copied().unwrap_or_default();
        if l[..4] != bill[..] {
            eprintln!("ledger ≠ bill for {cid}: ledger {l:?}, bill {bill:?}");
        }
        for k in 0..4 {
            delta_tokens += (l[k] - bill[k]).unsigned_abs();
        }
        delta_pico += (l[4] as i128 - cost).abs();
        billed_ids.insert(cid);
    }
    for (cid, l) in &ours {
        if !billed_ids.contains(cid) {
            delta_tokens += (l[0] + l[2]).unsigned_abs();
            delta_pico += l[4] as i128;
        }
    }

    // 4. every batch the simulator created is one of ours, under the id we stored.
    let ours_batches: HashSet<String> = all::<(String,)>(
        store,
        "SELECT provider_batch_id FROM batches WHERE provider_batch_id IS NOT NULL",
    )
    .await
    .into_iter()
    .map(|(id,)| id)
    .collect();
    let orphan_batches = rec["batches"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| !ours_batches.contains(b["id"].as_str().unwrap()))
        .count() as u64;

    // 5. the attempt cap held, and uploaded files are the bytes we planned.
    let (max_attempt,): (i64,) = one(
        store,
        "SELECT CAST(COALESCE(MAX(attempt_no), 0) AS BIGINT) FROM attempts",
    )
    .await;
    assert!(
        max_attempt <= MAX_ATTEMPTS as i64,
        "attempt {max_attempt} over the cap"
    );
    let files: Vec<(String, Option<String>)> = all(
        store,
        "SELECT id, file_sha256 FROM batches WHERE input_file_id IS NOT NULL",
    )
    .await;
    for (id, sha) in files {
        let name = format!("{id}.jsonl");
        let uploads: Vec<&Value> = rec["uploads"]
            .as_array()
            .unwrap()
            .iter()
            // S3 uploads are named by their key: the file name under the input prefix.
            .filter(|u| {
                u["filename"]
                    .as_str()
                    .is_some_and(|f| f == name || f.rsplit('/').next() == Some(name.as_str()))
            })
            .collect();
        assert!(!uploads.is_empty(), "batch {id}: no upload");
        for u in uploads {
            assert_eq!(
                u["sha256"].as_str(),
                sha.as_deref(),
                "batch {id}: uploaded bytes differ"
            );
        }
    }
    let mut v = Verdict {
        duplicate_submissions,
        lost: lost as u64 + missing_records.max(0) as u64 + pending_lines as u64,
        ledger_delta_tokens: delta_tokens,
        ledger_delta_usd: Usd::from_pico(delta_pico),
        orphan_batches,
        ..Verdict::default()
    };
    if sc.shape == Shape::Stages {
        judge_stages(sc, store, &rec, &last, &out, &mut v).await;
    }
    v
}

/// One link of a record of the last run, with its item.
struct Link {
    chunk: i64,
    item_id: Option<i64>,
    error: Option<String>,
    user_json: Option<String>,
    state: Option<String>,
    result: Option<Value>,
}

impl Link {
    fn succeeded(&self) -> bool {
        self.state.as_deref() == Some("succeeded")
    }
}

/// What became of a record, stage by stage, as the judge sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// Every stage it should get succeeded.
    Succeeded,
    /// An item it needs failed for good (attempt cap): its later stages are never made.
    FailedForGood,
    /// Something is missing or wrong (a bad link).
    Broken,
}

/// A record's links at `notes`, `summary` and `review` against what they should be, each
/// stage rendered from the one before: one `notes` link per chunk of its body, in order, to
/// the item of that chunk; one `summary` rendered from its title and those notes' results
/// (and their child in `item_parents`); a `review` of that summary when the record is in the
/// sample, else a link with no item. A record whose needed item failed for good has no
/// later links.
fn fate_of(
    title: &str,
    chunks: &[String],
    in_sample: bool,
    [notes, summary, review]: [&[Link]; 3],
    parents: &HashMap<i64, BTreeSet<i64>>,
) -> Result<Fate, String> {
    let quoted = |s: &str| serde_json::to_string(s).unwrap();
    let made_from = |l: &Link, want: &str, from: &BTreeSet<i64>| {
        l.chunk == 0
            && l.error.is_none()
            && l.user_json.as_deref() == Some(quoted(want).as_str())
            && l.item_id.and_then(|i| parents.get(&i)) == Some(from)
    };
    // `None` once every item of `links` succeeded.
    let unfinished = |links: &[Link], later: usize| -> Option<Result<Fate, String>> {
        if links.iter().all(Link::succeeded) {
            None
        } else if later == 0
            && links
                .iter()
                .any(|l| l.state.as_deref() == Some("exhausted"))
        {
            Some(Ok(Fate::FailedForGood))
        } else {
            let states: Vec<_> = links.iter().map(|l| l.state.clone()).collect();
            Some(Err(format!("items {states:?}, {later} later link(s)")))
        }
    };

    let got: Vec<(i64, Option<&str>)> = notes
        .iter()
        .map(|l| (l.chunk, l.user_json.as_deref()))
        .collect();
    let want: Vec<String> = chunks.iter().map(|c| quoted(c)).collect();
    let want: Vec<(i64, Option<&str>)> = (0..).zip(want.iter().map(|w| Some(w.as_str()))).collect();
    if got != want || notes.iter().any(|l| l.error.is_some()) {
        return Err(format!("notes links {got:?}, expected {want:?}"));
    }
    if let Some(f) = unfinished(notes, summary.len() + review.len()) {
        return f.map_err(|e| format!("notes: {e}"));
    }

    let mut text = format!("Ticket: {title}\n");
    for n in notes {
        let note = &n.result.as_ref().unwrap()["summary"];
        text.push_str(&format!("- {}\n", note.as_str().unwrap()));
    }
    let from: BTreeSet<i64> = notes.iter().filter_map(|l| l.item_id).collect();
    if !matches!(summary, [s] if made_from(s, &text, &from)) {
        let got: Vec<_> = summary
            .iter()
            .map(|l| {
                (
                    l.chunk,
                    &l.user_json,
                    l.item_id.and_then(|i| parents.get(&i)),
                )
            })
            .collect();
        return Err(format!(
            "summary links {got:?}, expected {text:?} from {from:?}"
        ));
    }
    if let Some(f) = unfinished(summary, review.len()) {
        return f.map_err(|e| format!("summary: {e}"));
    }

    let s = summary[0].result.as_ref().unwrap();
    let text = format!(
        "{title}: {} ({})",
        s["summary"].as_str().unwrap(),
        s["label"].as_str().unwrap()
    );
    let from = BTreeSet::from([summary[0].item_id.unwrap()]);
    match (review, in_sample) {
        ([r], true) if made_from(r, &text, &from) => match unfinished(review, 0) {
            None => Ok(Fate::Succeeded),
            Some(f) => f.map_err(|e| format!("review: {e}")),
        },
        ([r], false) if r.chunk == 0 && r.item_id.is_none() && r.error.is_none() => {
            Ok(Fate::Succeeded)
        }
        _ => {
            let got: Vec<_> = review.iter().map(|l| (l.chunk, l.item_id)).collect();
            Err(format!("review links {got:?} (in the sample: {in_sample})"))
        }
    }
}

/// The multi-stage half of the oracle (`Shape::Stages`): every record of the last run has
/// one link per chunk of its body at `notes` (items rendered from those chunks), one
/// `summary` rendered from its title and its notes' results, and a `review` of that summary
/// exactly when it is in the stage's sample; the results file says so; no item was made
/// twice; and the ledger equals the bill stage by stage, each stage billed at its model.
async fn judge_stages(
    sc: &Scenario,
    store: &SqlStore,
    rec: &Value,
    last: &str,
    out: &str,
    v: &mut Verdict,
) {
    let p = nightshift::config::Pipeline::load(&sc.pipeline).unwrap();
    let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["notes", "summary", "review"]);
    let review_share = p.stages[2].sample.unwrap();
    let tok = nightshift::cost::tokens::Tokenizer::for_model(&p.stages[0].model);
    let spec = nightshift::split::SplitSpec {
        max_tokens: CHUNK_TOKENS,
        overlap_tokens: 0,
    };

    // The source as it is now (it only grew): each valid record's title and chunks.
    let text = std::fs::read_to_string(sc.dir.path().join("records.jsonl")).unwrap();
    let mut tickets: HashMap<String, (String, Vec<String>)> = HashMap::new();
    let mut distinct_chunks = HashSet::new();
    for line in text.lines() {
        let Ok(r) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let Some(id) = r["id"].as_str() else { continue };
        let chunks = nightshift::split::split(r["body"].as_str().unwrap(), spec, &tok);
        distinct_chunks.extend(chunks.iter().cloned());
        let title = r["title"].as_str().unwrap().to_string();
        tickets.insert(id.to_string(), (title, chunks));
    }

    // The last run's records and their links.
    let records: Vec<(i64, String)> = all(
        store,
        &format!("SELECT line, record_id FROM records WHERE run_id = '{last}' ORDER BY line"),
    )
    .await;
    type LinkRow = (
        i64,
        String,
        i64,
        Option<i64>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    let rows: Vec<LinkRow> = all(
        store,
        &format!(
            "SELECT x.line, x.stage, x.chunk, x.item_id, x.error, ib.user_json, i.state, ir.result \
             FROM record_items x LEFT JOIN items i ON i.id = x.item_id \
             LEFT JOIN item_bodies ib ON ib.item_id = x.item_id \
             LEFT JOIN item_results ir ON ir.item_id = x.item_id \
             WHERE x.run_id = '{last}' ORDER BY x.line, x.stage, x.chunk"
        ),
    )
    .await;
    let mut links: HashMap<(i64, String), Vec<Link>> = HashMap::new();
    for (line, stage, chunk, item_id, error, user_json, state, result) in rows {
        links.entry((line, stage)).or_default().push(Link {
            chunk,
            item_id,
            error,
            user_json,
            state,
            result: result.map(|r| serde_json::from_str(&r).unwrap()),
        });
    }
    let mut parents: HashMap<i64, BTreeSet<i64>> = HashMap::new();
    for (item, parent) in
        all::<(i64, i64)>(store, "SELECT item_id, parent_id FROM item_parents").await
    {
        parents.entry(item).or_default().insert(parent);
    }
    let lines: HashMap<String, Value> = out
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["id"].as_str().unwrap().to_string(), v)
        })
        .collect();

    let (mut succeeded, mut failed_for_good, mut sampled, mut chunks_seen) = (0, 0, 0, 0);
    let mut problems: Vec<String> = Vec::new();
    for (line, id) in &records {
        let Some((title, chunks)) = tickets.get(id) else {
            problems.push(format!("{id}: a record the source does not have"));
            v.bad_links += 1;
            continue;
        };
        let at = |stage: &str| -> &[Link] {
            links
                .get(&(*line, stage.to_string()))
                .map_or(&[], Vec::as_slice)
        };
        let in_sample = nightshift::worker::in_sample("review", id, review_share);
        sampled += in_sample as u64;
        chunks_seen += chunks.len();
        let fate = fate_of(
            title,
            chunks,
            in_sample,
            [at("notes"), at("summary"), at("review")],
            &parents,
        )
        .unwrap_or_else(|why| {
            problems.push(format!("{id} (line {line}): {why}"));
            Fate::Broken
        });
        // The results file agrees.
        let file_ok = lines.get(id).is_some_and(|l| {
            let st = &l["stages"];
            let status = l["status"].as_str();
            match fate {
                Fate::Succeeded => {
                    status == Some("succeeded")
                        && st["notes"].as_array().is_some_and(|n| {
                            n.len() == chunks.len() && n.iter().all(Value::is_object)
                        })
                        && st["summary"].is_object()
                        && st["review"].is_object() == in_sample
                        && (in_sample || st["review"].is_null())
                }
                Fate::FailedForGood => status == Some("failed"),
                Fate::Broken => false,
            }
        });
        match fate {
            Fate::Succeeded => succeeded += 1,
            Fate::FailedForGood => failed_for_good += 1,
            Fate::Broken => v.bad_links += 1,
        }
        if !file_ok {
            v.lost += 1;
            problems.push(format!("{id}: results line {:?}", lines.get(id)));
        }
    }
    if lines.len() != records.len() {
        problems.push(format!(
            "{} results lines for {} records",
            lines.len(),
            records.len()
        ));
        v.lost += lines.len().abs_diff(records.len()) as u64;
    }
    for p in problems.iter().take(10) {
        eprintln!("stages: {p}");
    }

    // No item made twice: within a stage no two items render the same request, and the
    // chunk stage has one item per distinct chunk of the source.
    let twice: Vec<(String, i64)> = all(
        store,
        "SELECT i.stage, COUNT(*) FROM items i JOIN item_bodies ib ON ib.item_id = i.id \
         GROUP BY i.stage, ib.user_json HAVING COUNT(*) > 1",
    )
    .await;
    v.duplicate_items += twice.iter().map(|(_, n)| *n as u64 - 1).sum::<u64>();
    let per_stage: Vec<(String, i64)> =
        all(store, "SELECT stage, COUNT(*) FROM items GROUP BY stage").await;
    let items: BTreeMap<String, i64> = per_stage.into_iter().collect();
    let notes_items = items.get("notes").copied().unwrap_or(0) as usize;
    if notes_items != distinct_chunks.len() {
        eprintln!(
            "stages: {notes_items} notes items for {} distinct chunks",
            distinct_chunks.len()
        );
        v.duplicate_items += notes_items.abs_diff(distinct_chunks.len()) as u64;
    }

    // Ledger vs bill per stage and model; the stage of a billed custom_id is its item's.
    let stage_of: HashMap<String, String> = all::<(String, String)>(
        store,
        "SELECT a.custom_id, i.stage FROM attempts a JOIN items i ON i.id = a.item_id",
    )
    .await
    .into_iter()
    .collect();
    let model_of: HashMap<&str, &str> = p
        .stages
        .iter()
        .map(|s| (s.name.as_str(), s.model.as_str()))
        .collect();
    assert_eq!(model_of["review"], REVIEW_MODEL);
    type Sums = [i64; 5];
    let mut bill: BTreeMap<(String, String), Sums> = BTreeMap::new();
    for e in rec["bill"]["per_custom_id"].as_array().unwrap() {
        let cid = e["custom_id"].as_str().unwrap();
        let stage = stage_of.get(cid).cloned().unwrap_or_else(|| "?".into());
        let model = e["model"].as_str().unwrap().to_string();
        if model_of.get(stage.as_str()) != Some(&model.as_str()) {
            v.wrong_model += 1;
        }
        let slot = bill.entry((stage, model)).or_default();
        for (k, f) in [
            "input_tokens",
            "cached_input_tokens",
            "output_tokens",
            "reasoning_tokens",
        ]
        .iter()
        .enumerate()
        {
            slot[k] += e[f].as_i64().unwrap();
        }
        slot[4] += Usd::parse(e["cost_usd"].as_str().unwrap()).unwrap().pico() as i64;
    }
    let ledger: Vec<(String, String, i64, i64, i64, i64, i64)> = all(
        store,
        "SELECT stage, model, CAST(SUM(input_tokens) AS BIGINT), CAST(SUM(cached_input_tokens) AS BIGINT), \
         CAST(SUM(output_tokens) AS BIGINT), CAST(SUM(reasoning_tokens) AS BIGINT), CAST(SUM(cost_pico) AS BIGINT) \
         FROM ledger GROUP BY stage, model",
    )
    .await;
    let ledger: BTreeMap<(String, String), Sums> = ledger
        .into_iter()
        .map(|(s, m, a, b, c, d, e)| ((s, m), [a, b, c, d, e]))
        .collect();
    for key in bill.keys().chain(ledger.keys()).collect::<BTreeSet<_>>() {
        let b = bill.get(key).copied().unwrap_or_default();
        let l = ledger.get(key).copied().unwrap_or_default();
        for k in 0..4 {
            v.stage_ledger_delta_tokens += (l[k] - b[k]).unsigned_abs();
        }
        v.stage_ledger_delta_usd += Usd::from_pico((l[4] - b[4]).abs().into());
    }
    for s in ["notes", "summary", "review"] {
        assert!(
            bill.keys().any(|(stage, _)| stage == s),
            "stage {s} was never billed: the scenario does not exercise it"
        );
    }
    let billed: Vec<String> = bill
        .iter()
        .map(|((s, m), t)| {
            format!(
                "{s}/{m} ${}",
                Usd::from_pico(t[4].into()).to_decimal_string()
            )
        })
        .collect();
    eprintln!(
        "stages: {} records ({succeeded} succeeded, {failed_for_good} failed for good), {chunks_seen} chunks, \
         {} distinct, {sampled} sampled for review; items {items:?}; billed {}",
        records.len(),
        distinct_chunks.len(),
        billed.join(", ")
    );
    assert!(
        chunks_seen > distinct_chunks.len() && chunks_seen > records.len(),
        "the source should give several chunks per record, some shared"
    );
}

fn assert_clean(v: &Verdict, what: &str) {
    assert_eq!(
        v,
        &Verdict::default(),
        "{what}: duplicate_submissions, lost, ledger deltas and orphans must all be zero"
    );
}

/// A small deterministic generator for kill times (seed printed).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Kills the child `kills` times at random moments within `window_ms` of its start. When a
/// run gets to finish before its kill, new records arrive, so there is always work to cut.
pub async fn random_kills(sc: &Scenario, kills: u32, seed: u64, window_ms: u64) -> u32 {
    let mut rng = Rng(seed | 1);
    let mut done = 0;
    let mut spawned = 0;
    while done < kills && spawned < kills * 4 {
        spawned += 1;
        let mut child = sc.child(None).spawn().unwrap();
        let wait = Duration::from_millis(rng.next() % window_ms);
        tokio::select! {
            status = child.wait() => {
                if matches!(status.unwrap().code(), Some(0) | Some(1)) {
                    sc.grow(200);
                }
            }
            _ = tokio::time::sleep(wait) => {
                child.start_kill().unwrap();
                let _ = child.wait().await;
                done += 1;
            }
        }
    }
    done
}

/// `NIGHTSHIFT_CRASH_SEED`, or the clock.
fn crash_seed() -> u64 {
    std::env::var("NIGHTSHIFT_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

/// 25 random SIGKILLs of `nightshift run`, then runs until done, then the judge.
async fn random_sigkills(sc: &Scenario) {
    let seed = crash_seed();
    eprintln!(
        "random kills ({:?}): seed {seed} (NIGHTSHIFT_CRASH_SEED={seed} repeats it)",
        sc.shape
    );
    let kills = random_kills(sc, 25, seed, 2500).await;
    let runs = sc.run_until_done().await;
    let v = judge(sc).await;
    let sent = record(&sc.sim).await["bill"]["totals"]["requests"].clone();
    eprintln!("kills={kills} recovery runs={runs} requests billed={sent} {v:?}");
    assert_clean(&v, &format!("seed {seed}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_sigkills_never_double_submit_or_lose_anything() {
    random_sigkills(&scenario(2000, 250, stormy()).await).await;
}

/// The same with three stages: chunks of each ticket (some shared between tickets), a
/// summary once every chunk has its notes, a review of 30 % of the summaries by a cheaper
/// model. The kills land while later stages' items are being made from earlier results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_sigkills_of_a_staged_pipeline_never_double_submit_or_lose_anything() {
    random_sigkills(&staged_scenario(600, 250, stormy()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failpoint_at_hits_one_to_three_recovers_cleanly() {
    if !cfg!(feature = "failpoints") {
        eprintln!("skipped: build with `--features failpoints` to sweep the named crash points");
        return;
    }
    let started = Instant::now();
    // Two scenarios at a time: this machine has two cores.
    let cases: Vec<(&str, u32)> = FAILPOINTS
        .iter()
        .flat_map(|fp| (1..=3).map(move |hit| (*fp, hit)))
        .collect();
    let mut tripped = 0;
    for pair in cases.chunks(2) {
        let runs = pair.iter().map(|&(fp, hit)| async move {
            let sc = scenario(2000, 250, stormy()).await;
            let spec = format!("{fp}={hit}");
            let out = sc.child(Some(&spec)).output().await.unwrap();
            let aborted = out.status.code().is_none();
            if !aborted {
                assert!(
                    matches!(out.status.code(), Some(0) | Some(1) | Some(75)),
                    "{spec}: {:?}\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            sc.run_until_done().await;
            let v = judge(&sc).await;
            assert_clean(&v, &spec);
            aborted
        });
        for aborted in futures_util::future::join_all(runs).await {
            tripped += aborted as u32;
        }
    }
    eprintln!(
        "failpoints={} tripped={tripped} in {:.0}s",
        cases.len(),
        started.elapsed().as_secs_f64()
    );
    // Every point is reached at least once in a 2,000-item run.
    assert!(
        tripped as usize >= FAILPOINTS.len(),
        "only {tripped} crash points fired"
    );
}

/// Weather whose faults follow each request alone (its body, and how often this simulator
/// answered it), never how requests fall into batches: a pipeline interrupted and resumed
/// then gets the very answers an uninterrupted one gets, and the same bill.
fn per_request_weather() -> SimSettings {
    SimSettings {
        expire_first: 0,
        ..stormy()
    }
}

/// What a finished scenario came to: its results lines (without `cost_usd`, which is what
/// the last run itself paid) and the simulator's bill totals.
async fn outcome(sc: &Scenario) -> (Vec<Value>, Value) {
    let text = std::fs::read_to_string(sc.dir.path().join("out/results.jsonl")).unwrap();
    let mut lines: Vec<Value> = text
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("cost_usd");
            v
        })
        .collect();
    lines.sort_by_key(|v| v["line"].as_i64());
    (lines, record(&sc.sim).await["bill"]["totals"].clone())
}

/// A staged run killed just before a page of records gets its next stage's items (the
/// results they need are stored), or just after, on the first, second or third page, then
/// run again: it ends exactly as the same pipeline run without a kill — the same results
/// line for every record, the same bill — and the judge finds nothing wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_run_killed_around_advancing_ends_as_an_uninterrupted_one() {
    if !cfg!(feature = "failpoints") {
        eprintln!("skipped: build with `--features failpoints` to kill a run while it advances");
        return;
    }
    let reference = staged_scenario(400, 100, per_request_weather()).await;
    assert_eq!(reference.run_until_done().await, 1);
    assert_clean(&judge(&reference).await, "uninterrupted");
    let want = outcome(&reference).await;
    let cases: Vec<String> = STAGE_FAILPOINTS
        .iter()
        .flat_map(|fp| (1..=3).map(move |hit| format!("{fp}={hit}")))
        .collect();
    let want = &want;
    for pair in cases.chunks(2) {
        let runs = pair.iter().map(|spec| async move {
            let sc = staged_scenario(400, 100, per_request_weather()).await;
            let out = sc.child(Some(spec)).output().await.unwrap();
            assert_eq!(
                out.status.code(),
                None,
                "{spec} did not fire:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let runs = sc.run_until_done().await;
            assert_clean(&judge(&sc).await, spec);
            let got = outcome(&sc).await;
            assert_eq!(
                got.1, want.1,
                "{spec}: the bill differs from an uninterrupted run"
            );
            assert_eq!(got.0.len(), want.0.len(), "{spec}");
            for (g, w) in got.0.iter().zip(&want.0) {
                assert_eq!(g, w, "{spec}: a record ended otherwise than uninterrupted");
            }
            eprintln!("{spec}: {runs} run(s) after the kill, as uninterrupted");
        });
        futures_util::future::join_all(runs).await;
    }
    eprintln!("uninterrupted: {} records, bill {}", want.0.len(), want.1);
}

/// The soak: `NIGHTSHIFT_SOAK_KILLS` random kills (default 200) plus the failpoint sweep,
/// judged once at the end. `cargo test --release --features failpoints -- --ignored soak`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn soak() {
    let kills: u32 = std::env::var("NIGHTSHIFT_SOAK_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("soak: seed {seed}");
    let sc = scenario(2000, 250, stormy()).await;
    let mut done = 0;
    let mut failpoints = 0;
    let mut rng = Rng(seed | 1);
    while done < kills {
        // Every fifth crash is a named failpoint at a random hit, the rest SIGKILLs.
        if cfg!(feature = "failpoints") && rng.next().is_multiple_of(5) {
            let fp = FAILPOINTS[(rng.next() % FAILPOINTS.len() as u64) as usize];
            let spec = format!("{fp}={}", 1 + rng.next() % 3);
            let out = sc.child(Some(&spec)).output().await.unwrap();
            if out.status.code().is_none() {
                failpoints += 1;
                done += 1;
            }
        } else {
            done += random_kills(&sc, 1, rng.next(), 2500).await;
        }
        // Now and then let a run finish: the next runs find everything done and must send
        // nothing (a duplicate would show in the record).
        if rng.next().is_multiple_of(10) {
            sc.run_until_done().await;
        }
    }
    sc.run_until_done().await;
    let v = judge(&sc).await;
    println!(
        "kills={done} failpoints={failpoints} duplicate_submissions={} lost={} ledger_delta_tokens={} ledger_delta_usd={}",
        v.duplicate_submissions,
        v.lost,
        v.ledger_delta_tokens,
        v.ledger_delta_usd.to_decimal_string()
    );
    assert_clean(&v, "soak");
    assert_eq!(v.orphan_batches, 0);
}
