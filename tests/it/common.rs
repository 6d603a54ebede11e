//! Shared fixtures: synthetic sources, pipeline files, a simulator, its record.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nightshift::config::Pipeline;
use nightshift::cost::PriceTable;
use nightshift::provider::http::RetryPolicy;
use nightshift::provider::openai::OpenAiClient;
use nightshift::sim::{Sim, SimHandle, SimSettings};
use nightshift::store::SqlStore;
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
) -> (RunOutcome, SqlStore) {
    let p = Pipeline::load(pipeline_file).unwrap();
    let store = SqlStore::open_sqlite(db).await.unwrap();
    let prices = PriceTable::builtin();
    let price = p.stage_prices(&prices).unwrap();
    let c = client(sim);
    let observer = Recorder::default();
    let ctx = RunContext {
        store: &store,
        provider: &c,
        pipeline: &p,
        prices: &price,
        observer: &observer,
        work_dir: db.parent().unwrap().to_path_buf(),
        output_path: p.output.path.clone(),
        shutdown: Default::default(),
        detach: false,
        ingest_only: false,
        budget: p.budget,
        worker_id: "test".into(),
        lease: Duration::from_secs(60),
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

/// The PostgreSQL server the PostgreSQL tests use (`NIGHTSHIFT_TEST_PG_URL`). Those tests
/// are compiled in only when it is set (see build.rs), and then fail if it is unreachable.
pub fn pg_url() -> String {
    std::env::var("NIGHTSHIFT_TEST_PG_URL")
        .expect("NIGHTSHIFT_TEST_PG_URL must name the PostgreSQL server for this test")
}

/// A schema of its own for one test, so tests run side by side on one database.
pub fn pg_schema(test: &str) -> String {
    let tag: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!(
        "t_{tag}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// A store for one test: a SQLite file in a temporary folder, or a PostgreSQL schema.
pub struct TestDb {
    pub store: SqlStore,
    pub url: String,
    schema: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        TestDb {
            store: SqlStore::open_sqlite(&path).await.unwrap(),
            url: path.display().to_string(),
            schema: None,
            _dir: Some(dir),
        }
    }

    pub async fn postgres(test: &str) -> Self {
        let url = pg_url();
        let schema = pg_schema(test);
        let store = SqlStore::open_postgres_in(&url, Some(&schema))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL at {} for {test}: {e}",
                    nightshift::store::postgres::redact_url(&url)
                )
            });
        TestDb {
            store,
            url: nightshift::store::postgres::with_search_path(&url, &schema),
            schema: Some(schema),
            _dir: None,
        }
    }

    /// Drops the test's schema (PostgreSQL).
    pub async fn finish(self) {
        self.store.close().await;
        if let Some(schema) = self.schema {
            nightshift::store::postgres::drop_schema(&pg_url(), &schema)
                .await
                .unwrap();
        }
    }
}

/// A row type both engines decode.
pub trait AnyRow:
    for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
    + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
    + Send
    + Unpin
{
}
impl<T> AnyRow for T where
    T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
        + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
        + Send
        + Unpin
{
}

/// Every row of a read-only query, on whichever engine the store runs (oracle checks).
pub async fn all<T: AnyRow>(store: &SqlStore, sql: &str) -> Vec<T> {
    match (store.sqlite_pool(), store.pg_pool()) {
        (Some(p), _) => sqlx::query_as(sql).fetch_all(p).await.unwrap(),
        (_, Some(p)) => sqlx::query_as(sql).fetch_all(p).await.unwrap(),
        _ => unreachable!("a store is on one engine or the other"),
    }
}

/// The one row of a read-only query.
pub async fn one<T: AnyRow>(store: &SqlStore, sql: &str) -> T {
    let mut rows = all::<T>(store, sql).await;
    assert_eq!(rows.len(), 1, "{sql}");
    rows.pop().unwrap()
}
