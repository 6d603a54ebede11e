//! Shared fixtures: synthetic sources, pipeline files, a simulator, its record.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nightshift::config::Pipeline;
use nightshift::cost::PriceTable;
use nightshift::provider::http::RetryPolicy;
use nightshift::provider::openai::OpenAiClient;
use nightshift::sim::{Sim, SimHandle, SimSettings};
use nightshift::store::SqliteStore;
use nightshift::worker::{self, Event, Observer, RunContext, RunOutcome};
use secrecy::SecretString;
use serde_json::{Value, json};

pub const SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "properties": {
    "label": {"enum": ["billing", "bug", "shipping", "other"]},
    "summary": {"type": "string", "minLength": 5, "maxLength": 120},
    "confidence": {"type": "number", "minimum": 0, "maximum": 1}
  },
  "required": ["label", "summary", "confidence"],
  "additionalProperties": false
}"#;

/// What a synthetic source holds.
pub struct Source {
    /// Lines that are records (valid JSON with an id).
    pub valid: usize,
    /// Distinct rendered requests among the valid records.
    pub unique: usize,
    pub malformed: usize,
}

/// Writes `n` lines: ~`dup_pct`% exact duplicates (same text, other id), ~`bad_pct`% malformed.
pub fn write_source(dir: &Path, n: usize, dup_pct: usize, bad_pct: usize) -> Source {
    let mut lines = Vec::with_capacity(n);
    let mut unique = 0;
    let mut valid = 0;
    let mut malformed = 0;
    let mut texts: Vec<String> = Vec::new();
    for i in 0..n {
        if bad_pct > 0 && i % (100 / bad_pct) == 7 {
            malformed += 1;
            if i % 2 == 0 {
                lines.push(format!("{{\"id\": \"r{i}\", \"text\": \"unterminated"));
            } else {
                lines.push(format!("{{\"text\": \"record {i} without an id\"}}"));
            }
            continue;
        }
        valid += 1;
        let text = if dup_pct > 0 && i % (100 / dup_pct) == 3 && !texts.is_empty() {
            texts[i % texts.len()].clone()
        } else {
            unique += 1;
            let t = format!(
                "Ticket {i}: the invoice for order {} looks wrong, please check",
                i * 7919 % 100_003
            );
            texts.push(t.clone());
            t
        };
        lines.push(json!({"id": format!("r{i}"), "text": text, "n": i}).to_string());
    }
    let path = dir.join("records.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    Source {
        valid,
        unique,
        malformed,
    }
}

/// A pipeline file over `records.jsonl` in `dir`; `extra` is appended verbatim.
pub fn write_pipeline(dir: &Path, max_attempts: u32, max_requests: u32, extra: &str) -> PathBuf {
    std::fs::write(dir.join("schema.json"), SCHEMA).unwrap();
    let text = format!(
        r#"name = "it"
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

[prompt]
system = "Label the ticket."
user = "{{{{text}}}}"
max_output_tokens = 400

[output]
schema = "schema.json"
path = "out/results.jsonl"

[retry]
max_attempts = {max_attempts}

[batch]
max_requests = {max_requests}
{extra}
"#
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text).unwrap();
    path
}

pub async fn start_sim(settings: SimSettings) -> SimHandle {
    let sim = Sim::new(settings, PriceTable::builtin()).unwrap();
    nightshift::sim::start(sim, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// Fast simulator settings for tests (`batch_seconds` small, no faults).
pub fn quiet_sim() -> SimSettings {
    SimSettings {
        batch_seconds: 0.2,
        retry_after_ms: 20,
        ..Default::default()
    }
}

pub async fn record(sim: &SimHandle) -> Value {
    reqwest::get(format!("http://{}/_sim/record", sim.addr))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

pub fn client(sim: &SimHandle) -> OpenAiClient {
    OpenAiClient::new(
        &sim.base_url(),
        SecretString::from("sk-test".to_string()),
        Duration::from_secs(30),
        RetryPolicy {
            min_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(200),
            ..Default::default()
        },
    )
    .unwrap()
}

/// Collects events (tests read them back).
#[derive(Default)]
pub struct Recorder(pub std::sync::Mutex<Vec<Event>>);

impl Observer for Recorder {
    fn event(&self, e: &Event) {
        self.0.lock().unwrap().push(e.clone());
    }
}

/// Runs a pipeline in-process against `sim` with the store at `db`.
pub async fn run_against(
    sim: &SimHandle,
    pipeline_file: &Path,
    db: &Path,
) -> (RunOutcome, SqliteStore) {
    let p = Pipeline::load(pipeline_file).unwrap();
    let store = SqliteStore::open(db).await.unwrap();
    let prices = PriceTable::builtin();
    let price = prices.lookup("openai", &p.provider.model).unwrap().clone();
    let c = client(sim);
    let observer = Recorder::default();
    let ctx = RunContext {
        store: &store,
        provider: &c,
        pipeline: &p,
        price: &price,
        observer: &observer,
        work_dir: db.parent().unwrap().to_path_buf(),
        output_path: p.output.path.clone(),
        shutdown: Default::default(),
        detach: false,
        provider_forgets: false,
        budget: p.budget,
    };
    let outcome = worker::run(&ctx).await.unwrap();
    (outcome, store)
}

/// Per custom_id: (batch id, body sha, outcome) as the simulator saw them.
pub fn requests_by_custom_id(rec: &Value) -> HashMap<String, Vec<(String, String, String)>> {
    let mut m: HashMap<String, Vec<(String, String, String)>> = HashMap::new();
    for b in rec["batches"].as_array().unwrap() {
        for r in b["requests"].as_array().unwrap() {
            m.entry(r["custom_id"].as_str().unwrap().to_string())
                .or_default()
                .push((
                    b["id"].as_str().unwrap().to_string(),
                    r["body_sha256"].as_str().unwrap().to_string(),
                    r["outcome"].as_str().unwrap().to_string(),
                ));
        }
    }
    m
}
