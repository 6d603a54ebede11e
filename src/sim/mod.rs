//! The provider simulator.
//!
//! A local server that speaks the batch APIs of OpenAI, Azure OpenAI, Anthropic and Gemini,
//! and the real-time chat-completions and messages endpoints, on loopback, so the real client
//! code talks real HTTP without an API key. One provider-neutral core (batch timeline, answers,
//! faults, bill, record) sits behind a wire adapter per provider (`wire`, `server`).
//!
//! It is deterministic given its seed: answers are generated from the request's JSON schema
//! and the request body, prompt tokens are counted with the same function the planner uses,
//! and a request's faults (failed, malformed, missing or duplicated line) and cache hits are
//! drawn from the seed, the body's hash and how many requests with that body this state has
//! answered before, batch or online (`Inner::draw_key`). Never from the custom_id, which
//! carries the client's run-specific batch id: a fresh state draws the same in every run and
//! every process, and a resent request (a retry) draws afresh. The count is not journaled but
//! rebuilt on reopening from the recorded outcomes. Batch expiry and lost create responses
//! are drawn on the batch's creation number, the other HTTP faults (`server`) on the
//! process's call counter.
//!
//! It keeps the record of what it accepted and billed (`GET /_sim/record`): every batch (and
//! every online request), each request's custom_id, body hash and outcome, and the bill
//! (tokens and exact cost per custom_id, per model and pricing mode, and totals). Tests judge
//! "never sent twice" and "ledger = bill" from that record.
//!
//! Every id it hands out (files, batches, result files, content file names, upload sessions)
//! carries a nonce drawn afresh by each `Sim`, so two simulators with the same seed, in two
//! processes or one after the other on the same state, never hand out the same id. Everything
//! else (answers, faults, expiry, the order of result lines) is drawn from the seed and the
//! request, never from an id.
//!
//! File contents live in a private folder, not in memory, so rehearsing a large backfill does
//! not need the memory to hold it. `Sim::new` keeps its state in memory and a temporary
//! folder (it dies with the process); `Sim::persistent` keeps everything in a state folder
//! (`journal`) that the next process reopens: its batches go on by the wall clock, their
//! results can be downloaded, and the record and the bill include them.

pub mod answer;
mod journal;
mod server;
pub mod settings;
pub mod wire;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::cost::{PriceTable, PricingMode, Usage, Usd};
use crate::util::time::{now_ms, unix_now};
use journal::{Got, Log, Put};

pub use server::{SimHandle, serve, start};
pub use settings::SimSettings;
pub use wire::Flavor;
use wire::{Neutral, Reply};

/// A uniform draw in [0, 1) from the seed, a salt and a key.
pub fn draw(seed: u64, salt: &str, key: &str) -> f64 {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(salt.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    let d = h.finalize();
    let n = u64::from_le_bytes(d[..8].try_into().expect("8 bytes"));
    (n >> 11) as f64 / (1u64 << 53) as f64
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct SimFile {
    id: String,
    filename: String,
    purpose: String,
    bytes: u64,
    created_at: i64,
    /// The content's file name in the simulator's files folder.
    name: String,
}

impl SimFile {
    fn json(&self, flavor: Flavor) -> Value {
        match flavor {
            Flavor::Gemini => json!({
                "name": self.id, "displayName": self.filename, "mimeType": "application/jsonl",
                "sizeBytes": self.bytes.to_string(), "createTime": wire::rfc3339(self.created_at),
                "state": "ACTIVE", "source": if self.purpose == "batch" { "UPLOADED" } else { "GENERATED" },
            }),
            _ => json!({
                "id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "expires_at": null, "status_details": null
            }),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pending,
    Ok,
    Error,
    InvalidJson,
    Expired,
    Cancelled,
    NotRun,
    /// Ran, but its result line was left out of the files (a fault).
    Missing,
}

impl Outcome {
    /// Whether the request ran, so its faults were drawn.
    fn answered(self) -> bool {
        matches!(
            self,
            Outcome::Ok | Outcome::Error | Outcome::InvalidJson | Outcome::Missing
        )
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecordedRequest {
    pub custom_id: String,
    pub body_sha256: String,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, Serialize)]
pub struct BillEntry {
    pub custom_id: String,
    pub batch_id: String,
    pub model: String,
    pub pricing_mode: &'static str,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    /// Exact decimal dollars.
    pub cost_usd: String,
    /// `cost_usd` as an amount.
    #[serde(skip)]
    pub cost: Usd,
}

/// A bill entry as the journal holds it.
#[derive(Deserialize)]
struct BillRow {
    custom_id: String,
    batch_id: String,
    model: String,
    pricing_mode: String,
    input_tokens: u64,
    cached_input_tokens: u64,
    cache_write_tokens: u64,
    output_tokens: u64,
    reasoning_tokens: u64,
    cost_usd: String,
}

impl<'de> Deserialize<'de> for BillEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let r = BillRow::deserialize(d)?;
        let mode = PricingMode::parse(&r.pricing_mode).ok_or_else(|| {
            D::Error::custom(format!("unknown pricing mode {:?}", r.pricing_mode))
        })?;
        let cost = Usd::parse(&r.cost_usd).map_err(D::Error::custom)?;
        Ok(BillEntry {
            custom_id: r.custom_id,
            batch_id: r.batch_id,
            model: r.model,
            pricing_mode: mode.as_str(),
            input_tokens: r.input_tokens,
            cached_input_tokens: r.cached_input_tokens,
            cache_write_tokens: r.cache_write_tokens,
            output_tokens: r.output_tokens,
            reasoning_tokens: r.reasoning_tokens,
            cost_usd: r.cost_usd,
            cost,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Status {
    Validating,
    InProgress,
    Finalizing,
    Completed,
    Failed,
    Expired,
    Cancelling,
    Cancelled,
}

impl Status {
    fn openai(self) -> &'static str {
        match self {
            Status::Validating => "validating",
            Status::InProgress => "in_progress",
            Status::Finalizing => "finalizing",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Expired => "expired",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
        }
    }
    fn azure(self) -> &'static str {
        match self {
            Status::Validating => "Validating",
            Status::InProgress => "InProgress",
            Status::Finalizing => "Finalizing",
            Status::Completed => "Completed",
            Status::Failed => "Failed",
            Status::Expired => "Expired",
            Status::Cancelling => "Cancelling",
            Status::Cancelled => "Cancelled",
        }
    }
    fn anthropic(self) -> &'static str {
        match self {
            Status::Cancelling => "canceling",
            s if s.terminal() => "ended",
            _ => "in_progress",
        }
    }
    fn gemini(self) -> &'static str {
        match self {
            Status::Validating => "BATCH_STATE_PENDING",
            Status::InProgress | Status::Finalizing => "BATCH_STATE_RUNNING",
            Status::Completed => "BATCH_STATE_SUCCEEDED",
            Status::Failed => "BATCH_STATE_FAILED",
            Status::Expired => "BATCH_STATE_EXPIRED",
            Status::Cancelling | Status::Cancelled => "BATCH_STATE_CANCELLED",
        }
    }
    fn terminal(self) -> bool {
        matches!(
            self,
            Status::Completed | Status::Failed | Status::Expired | Status::Cancelled
        )
    }
}

/// A batch. In the journal without `requests` and `inline_output`, which are written on their
/// own when they change (they can be large; the rest changes on every step of the timeline).
#[derive(Debug, Serialize, Deserialize)]
struct SimBatch {
    id: String,
    /// Creation number in this simulator state: 0 is the first batch it ever created.
    ordinal: u64,
    flavor: Flavor,
    /// The requests, one native line each: the content file name of the uploaded file, or of
    /// the inline requests.
    input: String,
    input_file_id: Option<String>,
    endpoint: String,
    metadata: Option<Value>,
    display_name: Option<String>,
    /// Gemini: the model named in the create URL.
    url_model: Option<String>,
    inline: bool,
    created_at: i64,
    /// Unix milliseconds its timeline started (wall clock, so it survives a restart).
    started_ms: i64,
    status: Status,
    stamps: BTreeMap<String, i64>,
    expires: bool,
    /// Unix milliseconds the cancel was asked.
    cancel_ms: Option<i64>,
    /// Fraction of the requests that had run when the batch was cut short.
    done_fraction: f64,
    #[serde(skip)]
    requests: Vec<RecordedRequest>,
    model: Option<String>,
    counts: (u64, u64, u64),
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    /// Gemini inline results, in input order.
    #[serde(skip)]
    inline_output: Option<Vec<Value>>,
    /// Gemini: polls for which SUCCEEDED shows no output yet (the lagging-file quirk).
    output_lag: u8,
    errors: Vec<Value>,
    usage: Usage,
    /// The settings in force when it was created: its timeline and the faults of its results
    /// follow them, whatever a later process runs with.
    settings: SimSettings,
}

impl SimBatch {
    fn local_id(&self) -> Option<String> {
        self.metadata
            .as_ref()
            .and_then(|m| m.get(crate::provider::openai::META_BATCH_ID))
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| self.display_name.clone())
    }

    fn json(&mut self, base: &str) -> Value {
        let stamp = |k: &str| self.stamps.get(k).copied();
        match self.flavor {
            Flavor::OpenAi | Flavor::Azure => {
                let azure = self.flavor == Flavor::Azure;
                let usage_visible = self.status.terminal() && self.status != Status::Failed;
                let time = |t: Option<i64>| -> Value {
                    match t {
                        None => Value::Null,
                        Some(t) if azure => Value::String(wire::rfc3339(t)),
                        Some(t) => json!(t),
                    }
                };
                let counts = if azure && self.status == Status::Validating {
                    json!({"total": null, "completed": null, "failed": null})
                } else {
                    json!({"total": self.counts.0, "completed": self.counts.1, "failed": self.counts.2})
                };
                json!({
                    "id": self.id,
                    "object": "batch",
                    "endpoint": self.endpoint,
                    "model": self.model,
                    "errors": if self.errors.is_empty() { Value::Null } else { json!({"object": "list", "data": self.errors}) },
                    "input_file_id": self.input_file_id,
                    "completion_window": "24h",
                    "status": if azure { self.status.azure() } else { self.status.openai() },
                    "output_file_id": self.output_file_id,
                    "error_file_id": self.error_file_id,
                    "created_at": time(Some(self.created_at)),
                    "in_progress_at": time(stamp("in_progress_at")),
                    "expires_at": time(Some(self.created_at + 86_400)),
                    "finalizing_at": time(stamp("finalizing_at")),
                    "completed_at": time(stamp("completed_at")),
                    "failed_at": time(stamp("failed_at")),
                    "expired_at": time(stamp("expired_at")),
                    "cancelling_at": time(stamp("cancelling_at")),
                    "cancelled_at": time(stamp("cancelled_at")),
                    "request_counts": counts,
                    "metadata": self.metadata,
                    "usage": if usage_visible && !azure { json!({
                        "input_tokens": self.usage.input_tokens,
                        "input_tokens_details": {"cached_tokens": self.usage.cached_input_tokens},
                        "output_tokens": self.usage.output_tokens,
                        "output_tokens_details": {"reasoning_tokens": self.usage.reasoning_tokens},
                        "total_tokens": self.usage.input_tokens + self.usage.output_tokens,
                    }) } else { Value::Null },
                })
            }
            Flavor::Anthropic => {
                let ended = self.status.terminal();
                // Counts move all at once, when the batch ends.
                let mut c = json!({"processing": self.requests.len(), "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0});
                if ended {
                    let n = |o: &[Outcome]| {
                        self.requests
                            .iter()
                            .filter(|r| o.contains(&r.outcome))
                            .count()
                    };
                    c = json!({
                        "processing": 0,
                        "succeeded": n(&[Outcome::Ok, Outcome::InvalidJson, Outcome::Missing]),
                        "errored": n(&[Outcome::Error]),
                        "canceled": n(&[Outcome::Cancelled]),
                        "expired": n(&[Outcome::Expired]),
                    });
                }
                let end = stamp("completed_at")
                    .or(stamp("expired_at"))
                    .or(stamp("cancelled_at"));
                json!({
                    "id": self.id,
                    "type": "message_batch",
                    "processing_status": self.status.anthropic(),
                    "request_counts": c,
                    "created_at": wire::rfc3339(self.created_at),
                    "expires_at": wire::rfc3339(self.created_at + 86_400),
                    "ended_at": end.map(wire::rfc3339),
                    "cancel_initiated_at": stamp("cancelling_at").map(wire::rfc3339),
                    "archived_at": null,
                    "results_url": ended.then(|| format!("{base}/v1/messages/batches/{}/results", self.id)),
                })
            }
            Flavor::Gemini => {
                let done = self.status.terminal();
                let mut output = Value::Null;
                if self.status == Status::Completed && self.output_lag > 0 {
                    // SUCCEEDED, but the output reference is not there yet.
                    self.output_lag -= 1;
                } else if matches!(self.status, Status::Completed | Status::Cancelled) {
                    output = match (&self.inline_output, &self.output_file_id) {
                        (Some(lines), _) => {
                            json!({"inlinedResponses": {"inlinedResponses": lines}})
                        }
                        (None, Some(f)) => json!({"responsesFile": f}),
                        _ => Value::Null,
                    };
                }
                let total = self.requests.len() as u64;
                let pending = total.saturating_sub(self.counts.1 + self.counts.2);
                let stats = json!({
                    "requestCount": total.to_string(),
                    "successfulRequestCount": self.counts.1.to_string(),
                    "failedRequestCount": self.counts.2.to_string(),
                    "pendingRequestCount": if done { "0".to_string() } else { pending.to_string() },
                });
                let mut metadata = json!({
                    "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch",
                    "model": format!("models/{}", self.url_model.clone().unwrap_or_default()),
                    "name": self.id,
                    "displayName": self.display_name,
                    "createTime": wire::rfc3339(self.created_at),
                    "updateTime": wire::rfc3339(unix_now()),
                    "batchStats": stats,
                    "state": self.status.gemini(),
                    "priority": "0",
                });
                let mut op = json!({"name": self.id, "metadata": metadata.clone(), "done": done});
                if !output.is_null() {
                    metadata["output"] = output.clone();
                    op["metadata"] = metadata;
                    let mut response = output;
                    response["@type"] = json!(
                        "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatchOutput"
                    );
                    op["response"] = response;
                }
                if self.status == Status::Failed {
                    op["error"] = json!({"code": 3, "message": self.errors.first().and_then(|e| e["message"].as_str()).unwrap_or("the batch failed")});
                }
                if done {
                    op["metadata"]["endTime"] = json!(wire::rfc3339(unix_now()));
                }
                op
            }
        }
    }
}

#[derive(Default)]
struct Inner {
    files: BTreeMap<String, SimFile>,
    batches: Vec<SimBatch>,
    batch_index: HashMap<String, usize>,
    seq: u64,
    bill: Vec<BillEntry>,
    /// Every upload ever accepted (deleted ones too).
    uploads: Vec<Value>,
    /// Every online request answered.
    online: Vec<Value>,
    /// Every call refused with a fault before it ran: (client request id, time, status).
    refused: Vec<Value>,
    /// How many requests with each body (by its SHA-256) this state has answered, batch and
    /// online: the next one with that body draws its faults on the count (`draw_key`). Not
    /// journaled: rebuilt on open from the recorded outcomes (`count_answered`).
    answered: HashMap<[u8; 32], u64>,
    /// Gemini resumable uploads started: token → display name (not kept across processes).
    sessions: HashMap<String, String>,
    /// Where every change is written (persistent mode).
    log: Log,
}

impl Inner {
    /// The key a request with this body draws its faults on: the body's hash and how many
    /// requests with the same body this state answered before it, so the first answer to a
    /// body draws the same in every fresh state and a resend of it draws afresh. Counts it.
    fn draw_key(&mut self, body_sha256: &[u8; 32]) -> String {
        let n = self.answered.entry(*body_sha256).or_insert(0);
        let key = format!("{}#{n}", hex::encode(body_sha256));
        *n += 1;
        key
    }

    /// Rebuilds `answered` from what the state recorded (after a replay): every batch request
    /// that ran (answered, failed, malformed or left out of the results) and every online
    /// request.
    fn count_answered(&mut self) {
        let mut answered: HashMap<[u8; 32], u64> = HashMap::new();
        let mut count = |hash: &str| {
            let mut h = [0u8; 32];
            if hex::decode_to_slice(hash, &mut h).is_ok() {
                *answered.entry(h).or_insert(0) += 1;
            }
        };
        for r in self.batches.iter().flat_map(|b| &b.requests) {
            if r.outcome.answered() {
                count(&r.body_sha256);
            }
        }
        for e in &self.online {
            if let Some(h) = e.get("body_sha256").and_then(Value::as_str) {
                count(h);
            }
        }
        self.answered = answered;
    }

    /// Writes one batch (and its request list when that changed).
    fn save_batch(&mut self, idx: usize, with_requests: bool) {
        let b = &self.batches[idx];
        let mut ops = vec![Put::Batch(b)];
        if with_requests {
            ops.push(Put::Requests {
                id: &b.id,
                requests: &b.requests,
            });
        }
        self.log.write(self.seq, &ops);
    }

    /// Applies one journal entry (replay).
    fn apply(&mut self, seq: u64, op: Got) {
        self.seq = self.seq.max(seq);
        match op {
            Got::File(f) => {
                self.files.insert(f.id.clone(), f);
            }
            Got::DropFile(id) => {
                self.files.remove(&id);
            }
            Got::Batch(b) => match self.batch_index.get(&b.id) {
                Some(&i) => {
                    let old = std::mem::replace(&mut self.batches[i], *b);
                    self.batches[i].requests = old.requests;
                    self.batches[i].inline_output = old.inline_output;
                }
                None => {
                    self.batch_index.insert(b.id.clone(), self.batches.len());
                    self.batches.push(*b);
                }
            },
            Got::Requests { id, requests } => {
                if let Some(&i) = self.batch_index.get(&id) {
                    self.batches[i].requests = requests;
                }
            }
            Got::InlineOutput { id, lines } => {
                if let Some(&i) = self.batch_index.get(&id) {
                    self.batches[i].inline_output = Some(lines);
                }
            }
            Got::Bill(e) => self.bill.push(e),
            Got::Upload(v) => self.uploads.push(v),
            Got::Online(v) => self.online.push(v),
            Got::Refused(v) => self.refused.push(v),
        }
    }

    /// Writes the whole state, compactly, a bounded number of entities per line.
    fn snapshot(&self, w: &mut journal::Snapshot) -> std::io::Result<()> {
        const CHUNK: usize = 512;
        let seq = self.seq;
        let files: Vec<&SimFile> = self.files.values().collect();
        for c in files.chunks(CHUNK) {
            let ops: Vec<Put> = c.iter().map(|f| Put::File(f)).collect();
            w.line(seq, &ops)?;
        }
        for b in &self.batches {
            let mut ops = vec![
                Put::Batch(b),
                Put::Requests {
                    id: &b.id,
                    requests: &b.requests,
                },
            ];
            if let Some(lines) = &b.inline_output {
                ops.push(Put::InlineOutput { id: &b.id, lines });
            }
            w.line(seq, &ops)?;
        }
        for c in self.bill.chunks(CHUNK) {
            w.line(seq, &c.iter().map(Put::Bill).collect::<Vec<_>>())?;
        }
        for c in self.uploads.chunks(CHUNK) {
            w.line(seq, &c.iter().map(Put::Upload).collect::<Vec<_>>())?;
        }
        for c in self.online.chunks(CHUNK) {
            w.line(seq, &c.iter().map(Put::Online).collect::<Vec<_>>())?;
        }
        for c in self.refused.chunks(CHUNK) {
            w.line(seq, &c.iter().map(Put::Refused).collect::<Vec<_>>())?;
        }
        Ok(())
    }

    /// The content files something still refers to.
    fn referenced(&self) -> HashSet<&str> {
        self.files
            .values()
            .map(|f| f.name.as_str())
            .chain(self.batches.iter().map(|b| b.input.as_str()))
            .collect()
    }
}

/// An error the simulator answers with: HTTP status, `type`, `code`, message.
#[derive(Debug)]
pub struct SimError {
    pub status: u16,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub message: String,
}

impl SimError {
    fn bad_request(message: impl Into<String>) -> Self {
        SimError {
            status: 400,
            kind: "invalid_request_error",
            code: None,
            message: message.into(),
        }
    }
    fn unsaved(why: &str) -> Self {
        SimError {
            status: 500,
            kind: "server_error",
            code: None,
            message: why.to_string(),
        }
    }
    fn not_found(what: &str, id: &str) -> Self {
        SimError {
            status: 404,
            kind: "not_found_error",
            code: None,
            message: format!("No {what} found with id '{id}'."),
        }
    }
}

/// What an online request got: HTTP status, body, and whether the answer was valid.
pub struct OnlineReply {
    pub status: u16,
    pub body: Value,
}

/// The simulator's state.
pub struct Sim {
    settings: SimSettings,
    prices: PriceTable,
    /// The folder file contents are kept in.
    files: PathBuf,
    /// Drawn afresh by every `Sim` and mixed into every id it hands out.
    nonce: [u8; 16],
    inner: Mutex<Inner>,
    base: OnceLock<String>,
    /// In-memory mode: the temporary folder holding the file contents.
    _temp: Option<tempfile::TempDir>,
    /// Persistent mode: the state folder's lock, held as long as this `Sim` lives.
    _lock: Option<File>,
}

impl Sim {
    /// A simulator whose state lives in memory and a temporary folder, gone with the process.
    pub fn new(settings: SimSettings, prices: PriceTable) -> std::io::Result<Arc<Self>> {
        let dir = tempfile::Builder::new()
            .prefix("nightshift-sim-")
            .tempdir()?;
        Ok(Arc::new(Sim {
            settings,
            prices,
            files: dir.path().to_path_buf(),
            nonce: *uuid::Uuid::new_v4().as_bytes(),
            inner: Mutex::new(Inner::default()),
            base: OnceLock::new(),
            _temp: Some(dir),
            _lock: None,
        }))
    }

    /// A simulator whose state lives in the folder `dir` (created if need be, mode 0700) and
    /// survives the process: a later `Sim::persistent` on the same folder sees every file,
    /// batch, upload, online request and bill entry of the earlier ones, and their batches
    /// go on by the wall clock. Batches keep the settings they were created under; new ones
    /// follow `settings`. The folder is locked for the life of the returned `Sim`: a second
    /// opener, in this process or another, gets an error naming the folder.
    pub fn persistent(
        dir: &Path,
        settings: SimSettings,
        prices: PriceTable,
    ) -> std::io::Result<Arc<Self>> {
        let folder = journal::open_folder(dir)?;
        let mut inner = Inner::default();
        let replayed = journal::replay(&folder.journal, |seq, op| inner.apply(seq, op))?;
        inner.count_answered();
        if replayed.torn_tail {
            tracing::warn!(
                journal = %folder.journal.display(),
                "the simulator's last change before a crash was cut short and is dropped"
            );
        }
        let mut snap = journal::Snapshot::create(&folder.journal)?;
        inner.snapshot(&mut snap)?;
        let journal = snap.commit(&folder.journal)?;
        journal::remove_orphans(&folder.files, &inner.referenced())?;
        inner.log = Log::new(journal);
        Ok(Arc::new(Sim {
            settings,
            prices,
            files: folder.files,
            nonce: *uuid::Uuid::new_v4().as_bytes(),
            inner: Mutex::new(inner),
            base: OnceLock::new(),
            _temp: None,
            _lock: Some(folder.lock),
        }))
    }

    /// The settings new batches and every HTTP call follow.
    pub fn settings(&self) -> &SimSettings {
        &self.settings
    }

    /// The root URL the simulator is reachable at (set once it listens).
    pub(crate) fn set_base(&self, base: String) {
        let _ = self.base.set(base);
    }

    fn base(&self) -> &str {
        self.base.get().map(String::as_str).unwrap_or("")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state, unless it could not be saved (then every call is refused).
    fn state(&self) -> Result<std::sync::MutexGuard<'_, Inner>, SimError> {
        let inner = self.lock();
        match inner.log.broken() {
            Some(why) => Err(SimError::unsaved(why)),
            None => Ok(inner),
        }
    }

    /// The answer of a call that changed the state: refused if the change was not saved.
    fn saved<T>(inner: &Inner, v: T) -> Result<T, SimError> {
        match inner.log.broken() {
            Some(why) => Err(SimError::unsaved(why)),
            None => Ok(v),
        }
    }

    fn next_id(&self, inner: &mut Inner, prefix: &str) -> String {
        let h = self.next_hash(inner, prefix);
        match prefix {
            "file" => format!("file-{}", &hex::encode(&h[..11])),
            "azure-file" => format!("file-{}", &hex::encode(&h[..16])),
            "gemini-file" => format!("files/{}", &hex::encode(&h[..8])),
            "batch" => format!("batch_{}", &hex::encode(&h[..12])),
            "azure-batch" => {
                let u = uuid::Uuid::from_slice(&h[..16]).unwrap_or_default();
                format!("batch_{u}")
            }
            "msgbatch" => format!("msgbatch_01{}", &hex::encode(&h[..12])),
            "gemini-batch" => format!("batches/{}", &hex::encode(&h[..8])),
            _ => format!("{prefix}_{}", &hex::encode(&h[..12])),
        }
    }

    /// A fresh hash for an id: the seed, the next sequence number, what it is for and this
    /// simulator's nonce.
    fn next_hash(&self, inner: &mut Inner, what: &str) -> [u8; 32] {
        inner.seq += 1;
        let mut h = Sha256::new();
        h.update(format!("{}:{}:{what}:", self.settings.seed, inner.seq));
        h.update(self.nonce);
        h.finalize().into()
    }

    /// A name and path for a new file's content.
    fn new_content(&self, inner: &mut Inner) -> (String, PathBuf) {
        inner.seq += 1;
        let name = format!("f{}-{}", hex::encode(&self.nonce[..6]), inner.seq);
        let path = self.files.join(&name);
        (name, path)
    }

    /// A path for a new file's content (created 0600 by whoever writes it).
    pub(crate) fn new_file_path(&self) -> PathBuf {
        self.new_content(&mut self.lock()).1
    }

    fn content_path(&self, name: &str) -> PathBuf {
        self.files.join(name)
    }

    pub(crate) fn add_file(
        &self,
        flavor: Flavor,
        filename: String,
        purpose: String,
        path: PathBuf,
        bytes: u64,
        sha256: String,
    ) -> Result<Value, SimError> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let mut inner = self.state()?;
        let id = match flavor {
            Flavor::Azure => self.next_id(&mut inner, "azure-file"),
            Flavor::Gemini => self.next_id(&mut inner, "gemini-file"),
            _ => self.next_id(&mut inner, "file"),
        };
        let upload = json!({"id": id, "filename": filename, "purpose": purpose, "bytes": bytes, "sha256": sha256});
        let f = SimFile {
            id: id.clone(),
            filename,
            purpose,
            bytes,
            created_at: unix_now(),
            name,
        };
        let v = f.json(flavor);
        let seq = inner.seq;
        inner.log.write(seq, &[Put::Upload(&upload), Put::File(&f)]);
        inner.uploads.push(upload);
        inner.files.insert(id, f);
        Self::saved(&inner, v)
    }

    pub(crate) fn start_session(&self, display_name: String) -> String {
        let mut inner = self.lock();
        let token = hex::encode(&self.next_hash(&mut inner, "upload")[..12]);
        inner.sessions.insert(token.clone(), display_name);
        token
    }

    pub(crate) fn take_session(&self, token: &str) -> Option<String> {
        self.lock().sessions.remove(token)
    }

    pub(crate) fn file(&self, flavor: Flavor, id: &str) -> Result<Value, SimError> {
        self.state()?
            .files
            .get(id)
            .map(|f| f.json(flavor))
            .ok_or_else(|| SimError::not_found("file", id))
    }

    pub(crate) fn file_path(&self, id: &str) -> Result<PathBuf, SimError> {
        self.state()?
            .files
            .get(id)
            .map(|f| self.content_path(&f.name))
            .ok_or_else(|| SimError::not_found("file", id))
    }

    pub(crate) fn delete_file(&self, id: &str) -> Result<Value, SimError> {
        let mut inner = self.state()?;
        let f = inner
            .files
            .remove(id)
            .ok_or_else(|| SimError::not_found("file", id))?;
        let seq = inner.seq;
        inner.log.write(seq, &[Put::DropFile(id)]);
        let _ = std::fs::remove_file(self.content_path(&f.name));
        Self::saved(&inner, json!({"id": id, "object": "file", "deleted": true}))
    }

    pub(crate) fn list_files(
        &self,
        flavor: Flavor,
        purpose: Option<&str>,
        desc: bool,
        limit: usize,
        after: Option<&str>,
    ) -> Value {
        let inner = self.lock();
        let mut files: Vec<&SimFile> = inner
            .files
            .values()
            .filter(|f| purpose.is_none_or(|p| f.purpose == p))
            .filter(|f| (flavor == Flavor::Gemini) == f.id.starts_with("files/"))
            .collect();
        files.sort_by_key(|f| (f.created_at, f.id.clone()));
        if desc {
            files.reverse();
        }
        let start = after
            .and_then(|a| files.iter().position(|f| f.id == a).map(|p| p + 1))
            .unwrap_or(0);
        let page: Vec<Value> = files
            .iter()
            .skip(start)
            .take(limit)
            .map(|f| f.json(flavor))
            .collect();
        let has_more = start + page.len() < files.len();
        if flavor == Flavor::Gemini {
            let mut v = json!({"files": page});
            if has_more {
                v["nextPageToken"] = json!(files[start + limit - 1].id);
            }
            return v;
        }
        json!({
            "object": "list",
            "data": page,
            "first_id": page.first().map(|f| f["id"].clone()),
            "last_id": page.last().map(|f| f["id"].clone()),
            "has_more": has_more,
        })
    }

    /// Adds a new batch and saves it: the answer of a create.
    fn push_batch(&self, inner: &mut Inner, mut b: SimBatch) -> Result<Value, SimError> {
        let v = b.json(self.base());
        let idx = inner.batches.len();
        let with_requests = !b.requests.is_empty();
        inner.batch_index.insert(b.id.clone(), idx);
        inner.batches.push(b);
        inner.save_batch(idx, with_requests);
        Self::saved(inner, v)
    }

    /// Whether the next batch created expires: the first `expire_first` batches this state
    /// ever created, and a draw on its creation number (never on its id, which is not the
    /// same from one run to the next).
    fn will_expire(&self, ordinal: u64, flavor: Flavor) -> bool {
        // Azure batches are not expired (current docs): they run until cancelled.
        flavor != Flavor::Azure
            && (ordinal < u64::from(self.settings.expire_first)
                || draw(self.settings.seed, "expire", &ordinal.to_string())
                    < self.settings.expire_rate)
    }

    /// The creation number of a batch (what create faults are drawn on).
    pub(crate) fn batch_ordinal(&self, id: &str) -> Option<u64> {
        let inner = self.lock();
        inner.batch_index.get(id).map(|&i| inner.batches[i].ordinal)
    }

    fn new_batch(
        &self,
        inner: &mut Inner,
        id_kind: &str,
        flavor: Flavor,
        input: String,
    ) -> SimBatch {
        let id = self.next_id(inner, id_kind);
        let ordinal = inner.batches.len() as u64;
        SimBatch {
            id,
            ordinal,
            flavor,
            input,
            input_file_id: None,
            endpoint: String::new(),
            metadata: None,
            display_name: None,
            url_model: None,
            inline: false,
            created_at: unix_now(),
            started_ms: now_ms(),
            status: Status::Validating,
            stamps: BTreeMap::new(),
            expires: self.will_expire(ordinal, flavor),
            cancel_ms: None,
            done_fraction: 1.0,
            requests: Vec::new(),
            model: None,
            counts: (0, 0, 0),
            output_file_id: None,
            error_file_id: None,
            inline_output: None,
            output_lag: 0,
            errors: Vec::new(),
            usage: Usage::default(),
            settings: self.settings.clone(),
        }
    }

    /// OpenAI / Azure `POST /batches`.
    pub(crate) fn create_openai_batch(
        &self,
        flavor: Flavor,
        body: &Value,
    ) -> Result<Value, SimError> {
        let input_file_id = body
            .get("input_file_id")
            .and_then(Value::as_str)
            .ok_or_else(|| SimError::bad_request("Missing required parameter: 'input_file_id'."))?;
        let endpoint = body
            .get("endpoint")
            .and_then(Value::as_str)
            .ok_or_else(|| SimError::bad_request("Missing required parameter: 'endpoint'."))?;
        if endpoint.trim_start_matches("/v1") != "/chat/completions" {
            return Err(SimError::bad_request(format!(
                "Invalid value: '{endpoint}'. The simulator supports '/v1/chat/completions'."
            )));
        }
        let window = body
            .get("completion_window")
            .and_then(Value::as_str)
            .unwrap_or("");
        if window != "24h" {
            return Err(SimError::bad_request(format!(
                "Invalid value: '{window}'. Supported values are: '24h'."
            )));
        }
        let metadata = body.get("metadata").cloned().filter(|m| !m.is_null());
        if let Some(m) = &metadata {
            let Some(obj) = m.as_object() else {
                return Err(SimError::bad_request("metadata must be an object"));
            };
            if obj.len() > 16
                || obj
                    .iter()
                    .any(|(k, v)| k.len() > 64 || v.as_str().is_none_or(|s| s.len() > 512))
            {
                return Err(SimError::bad_request(
                    "metadata: at most 16 string pairs, keys ≤ 64 and values ≤ 512 characters",
                ));
            }
        }
        let mut inner = self.state()?;
        let input = match inner.files.get(input_file_id) {
            None => return Err(SimError::not_found("file", input_file_id)),
            Some(f) if f.purpose != "batch" => {
                return Err(SimError::bad_request(format!(
                    "File {input_file_id} has purpose '{}', expected 'batch'.",
                    f.purpose
                )));
            }
            Some(f) => f.name.clone(),
        };
        let kind = if flavor == Flavor::Azure {
            "azure-batch"
        } else {
            "batch"
        };
        let mut b = self.new_batch(&mut inner, kind, flavor, input);
        b.input_file_id = Some(input_file_id.to_string());
        b.endpoint = endpoint.to_string();
        b.metadata = metadata;
        self.push_batch(&mut inner, b)
    }

    /// Anthropic `POST /v1/messages/batches`: requests inline, checked at once.
    pub(crate) fn create_anthropic_batch(&self, body: &Value) -> Result<Value, SimError> {
        let requests = body
            .get("requests")
            .and_then(Value::as_array)
            .ok_or_else(|| SimError::bad_request("requests: Field required"))?;
        if requests.is_empty() || requests.len() > 100_000 {
            return Err(SimError::bad_request(format!(
                "requests: must hold between 1 and 100000 items, got {}",
                requests.len()
            )));
        }
        let mut seen = HashSet::new();
        let (name, path) = self.new_content(&mut *self.state()?);
        let mut w = std::io::BufWriter::new(
            crate::util::fs::create_private(&path)
                .map_err(|e| SimError::bad_request(e.to_string()))?,
        );
        let mut recorded = Vec::with_capacity(requests.len());
        for (i, r) in requests.iter().enumerate() {
            let cid = r.get("custom_id").and_then(Value::as_str).unwrap_or("");
            let valid = !cid.is_empty()
                && cid.len() <= 64
                && cid
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid {
                return Err(SimError::bad_request(format!(
                    "requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
                )));
            }
            if !seen.insert(cid) {
                return Err(SimError::bad_request(format!(
                    "requests.{i}.custom_id: duplicate custom_id '{cid}'"
                )));
            }
            let params = r.get("params").cloned().unwrap_or(Value::Null);
            recorded.push(RecordedRequest {
                custom_id: cid.to_string(),
                body_sha256: hex::encode(Sha256::digest(params.to_string().as_bytes())),
                outcome: Outcome::Pending,
            });
            writeln!(w, "{}", json!({"custom_id": cid, "params": params}))
                .map_err(|e| SimError::unsaved(&e.to_string()))?;
        }
        w.flush().map_err(|e| SimError::unsaved(&e.to_string()))?;
        drop(w);
        let mut inner = self.state()?;
        let mut b = self.new_batch(&mut inner, "msgbatch", Flavor::Anthropic, name);
        b.counts = (recorded.len() as u64, 0, 0);
        b.requests = recorded;
        b.status = Status::InProgress;
        self.push_batch(&mut inner, b)
    }

    /// Gemini `POST /v1beta/models/{model}:batchGenerateContent`.
    pub(crate) fn create_gemini_batch(&self, model: &str, body: &Value) -> Result<Value, SimError> {
        let batch = body.get("batch").unwrap_or(body);
        let config = batch
            .get("inputConfig")
            .or_else(|| batch.get("input_config"))
            .ok_or_else(|| SimError::bad_request("batch.input_config is required"))?;
        let display = batch
            .get("displayName")
            .or_else(|| batch.get("display_name"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let file = config
            .get("fileName")
            .or_else(|| config.get("file_name"))
            .and_then(Value::as_str);
        let inline = config
            .pointer("/requests/requests")
            .and_then(Value::as_array);
        let (input, input_file_id, is_inline) = match (file, inline) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(SimError::bad_request(
                    "exactly one of input_config.file_name and input_config.requests is required",
                ));
            }
            (Some(f), None) => {
                let name = self
                    .state()?
                    .files
                    .get(f)
                    .map(|sf| sf.name.clone())
                    .ok_or_else(|| SimError::not_found("file", f))?;
                (name, Some(f.to_string()), false)
            }
            (None, Some(reqs)) => {
                let (name, path) = self.new_content(&mut *self.state()?);
                let mut w = std::io::BufWriter::new(
                    crate::util::fs::create_private(&path)
                        .map_err(|e| SimError::bad_request(e.to_string()))?,
                );
                for r in reqs {
                    let key = r
                        .pointer("/metadata/key")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    writeln!(w, "{}", json!({"key": key, "request": r.get("request")}))
                        .map_err(|e| SimError::unsaved(&e.to_string()))?;
                }
                w.flush().map_err(|e| SimError::unsaved(&e.to_string()))?;
                (name, None, true)
            }
        };
        let mut inner = self.state()?;
        let mut b = self.new_batch(&mut inner, "gemini-batch", Flavor::Gemini, input);
        b.input_file_id = input_file_id;
        b.display_name = display;
        b.url_model = Some(model.trim_start_matches("models/").to_string());
        b.inline = is_inline;
        self.push_batch(&mut inner, b)
    }

    fn index(&self, inner: &Inner, id: &str) -> Result<usize, SimError> {
        inner
            .batch_index
            .get(id)
            .copied()
            .ok_or_else(|| SimError::not_found("batch", id))
    }

    /// A batch's wire object. Rendering can change it (Gemini's lagging output reference
    /// counts down), and such a change is saved too.
    fn view(&self, inner: &mut Inner, idx: usize, base: &str) -> Value {
        let lag = inner.batches[idx].output_lag;
        let v = inner.batches[idx].json(base);
        if inner.batches[idx].output_lag != lag {
            inner.save_batch(idx, false);
        }
        v
    }

    pub(crate) fn get_batch(&self, id: &str) -> Result<Value, SimError> {
        let mut inner = self.state()?;
        let idx = self.index(&inner, id)?;
        self.advance(&mut inner, idx);
        let v = self.view(&mut inner, idx, self.base());
        Self::saved(&inner, v)
    }

    pub(crate) fn cancel_batch(&self, id: &str) -> Result<Value, SimError> {
        let mut inner = self.state()?;
        let idx = self.index(&inner, id)?;
        self.advance(&mut inner, idx);
        let b = &mut inner.batches[idx];
        match b.status {
            Status::Cancelling | Status::Cancelled => {}
            s if s.terminal() => {
                return Err(SimError {
                    status: 409,
                    kind: "invalid_request_error",
                    code: None,
                    message: format!("Cannot cancel a batch with status '{}'.", s.openai()),
                });
            }
            _ => {
                let now = now_ms();
                b.done_fraction = progress(&b.settings, elapsed(b.started_ms, now));
                b.status = Status::Cancelling;
                b.stamps.insert("cancelling_at".into(), unix_now());
                b.cancel_ms = Some(now);
                inner.save_batch(idx, false);
            }
        }
        self.advance(&mut inner, idx);
        let v = self.view(&mut inner, idx, self.base());
        Self::saved(&inner, v)
    }

    /// The batches of one wire flavor, newest first, one page after `after`.
    pub(crate) fn list_batches(
        &self,
        flavor: Flavor,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Value, SimError> {
        let mut inner = self.state()?;
        for i in 0..inner.batches.len() {
            self.advance(&mut inner, i);
        }
        let order: Vec<usize> = (0..inner.batches.len())
            .rev()
            .filter(|&i| inner.batches[i].flavor == flavor)
            .collect();
        let start = after
            .and_then(|a| {
                order
                    .iter()
                    .position(|&i| inner.batches[i].id == a)
                    .map(|p| p + 1)
            })
            .unwrap_or(0);
        let base = self.base().to_string();
        let page_idx: Vec<usize> = order.iter().skip(start).take(limit).copied().collect();
        let page: Vec<Value> = page_idx
            .iter()
            .map(|&i| self.view(&mut inner, i, &base))
            .collect();
        let has_more = start + page.len() < order.len();
        let first = page_idx.first().map(|&i| inner.batches[i].id.clone());
        let last = page_idx.last().map(|&i| inner.batches[i].id.clone());
        let v = match flavor {
            Flavor::Gemini => {
                let mut v = json!({"operations": page});
                if has_more {
                    v["nextPageToken"] = json!(last);
                }
                v
            }
            Flavor::Anthropic => {
                json!({"data": page, "has_more": has_more, "first_id": first, "last_id": last})
            }
            _ => {
                json!({"object": "list", "data": page, "first_id": first, "last_id": last, "has_more": has_more})
            }
        };
        Self::saved(&inner, v)
    }

    /// Anthropic results: the results file of an ended batch.
    pub(crate) fn results_path(&self, id: &str) -> Result<PathBuf, SimError> {
        let mut inner = self.state()?;
        let idx = self.index(&inner, id)?;
        self.advance(&mut inner, idx);
        Self::saved(&inner, ())?;
        let b = &inner.batches[idx];
        if !b.status.terminal() {
            return Err(SimError::bad_request(format!(
                "Batch {id} is still processing; results are available once it has ended."
            )));
        }
        let fid = b
            .output_file_id
            .clone()
            .ok_or_else(|| SimError::not_found("results", id))?;
        inner
            .files
            .get(&fid)
            .map(|f| self.content_path(&f.name))
            .ok_or_else(|| SimError::not_found("results", id))
    }

    /// Moves a batch along its timeline, as far as the wall clock allows, saving each step.
    fn advance(&self, inner: &mut Inner, idx: usize) {
        loop {
            let now = now_ms();
            let b = &inner.batches[idx];
            let t = b.settings.batch_seconds;
            let elapsed = elapsed(b.started_ms, now);
            let next = match b.status {
                Status::Validating if elapsed >= 0.1 * t => Some(Status::InProgress),
                Status::InProgress if b.expires && elapsed >= 0.6 * t => Some(Status::Expired),
                Status::InProgress if elapsed >= 0.9 * t => Some(Status::Finalizing),
                Status::Finalizing if elapsed >= t => Some(Status::Completed),
                Status::Cancelling => {
                    let since = b.cancel_ms.map(|c| self::elapsed(c, now)).unwrap_or(0.0);
                    (since >= 0.05 * t || b.flavor == Flavor::Gemini).then_some(Status::Cancelled)
                }
                _ => None,
            };
            let Some(next) = next else {
                // Progress is read off the clock, not saved: it changes on every poll.
                let b = &mut inner.batches[idx];
                if b.status == Status::InProgress && b.flavor != Flavor::Anthropic {
                    let total = b.counts.0;
                    let done = (total as f64 * progress(&b.settings, elapsed)) as u64;
                    b.counts.1 = done.min(total);
                }
                return;
            };
            match next {
                Status::InProgress => {
                    self.validate(inner, idx);
                    inner.save_batch(idx, true);
                }
                Status::Expired => {
                    inner.batches[idx].done_fraction = 0.5;
                    self.materialize(inner, idx, Status::Expired, "expired_at");
                }
                Status::Completed => {
                    self.materialize(inner, idx, Status::Completed, "completed_at")
                }
                Status::Cancelled => {
                    self.materialize(inner, idx, Status::Cancelled, "cancelled_at")
                }
                Status::Finalizing => {
                    let b = &mut inner.batches[idx];
                    b.status = Status::Finalizing;
                    b.stamps.insert("finalizing_at".into(), unix_now());
                    b.counts.1 = b.counts.0;
                    inner.save_batch(idx, false);
                }
                _ => return,
            }
        }
    }

    /// Checks the input file; the batch goes `in_progress` or `failed`.
    fn validate(&self, inner: &mut Inner, idx: usize) {
        let flavor = inner.batches[idx].flavor;
        let path = self.content_path(&inner.batches[idx].input);
        let endpoint = inner.batches[idx].endpoint.clone();
        let url_model = inner.batches[idx].url_model.clone();
        let mut errors: Vec<Value> = Vec::new();
        let mut requests = Vec::new();
        let mut model: Option<String> = None;
        let mut seen = HashSet::new();
        let push = |errors: &mut Vec<Value>, code: &str, msg: String, line: Option<usize>| {
            if errors.len() < 20 {
                errors.push(json!({"code": code, "message": msg, "param": null, "line": line}));
            }
        };
        let limit = match flavor {
            Flavor::OpenAi => 50_000,
            _ => 100_000,
        };
        match std::fs::File::open(&path) {
            Err(_) => push(
                &mut errors,
                "invalid_request",
                "input file unavailable".into(),
                None,
            ),
            Ok(f) => {
                for (i, line) in BufReader::new(f).split(b'\n').enumerate() {
                    let n = i + 1;
                    let Ok(line) = line else {
                        push(
                            &mut errors,
                            "invalid_request",
                            "unreadable input".into(),
                            None,
                        );
                        break;
                    };
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    if n == 1 && line.starts_with(&[0xEF, 0xBB, 0xBF]) && flavor == Flavor::Azure {
                        push(&mut errors, "invalid_request", "Could not extract a valid deployment name from the input file (UTF-8 with BOM).".into(), Some(n));
                        continue;
                    }
                    let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                        push(
                            &mut errors,
                            "invalid_json_line",
                            format!("Line {n} is not valid JSON."),
                            Some(n),
                        );
                        continue;
                    };
                    let (cid, body) = match flavor {
                        Flavor::Gemini => (
                            v.get("key")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_string(),
                            v.get("request").cloned().unwrap_or(Value::Null),
                        ),
                        _ => (
                            v.get("custom_id")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_string(),
                            v.get("body").cloned().unwrap_or(Value::Null),
                        ),
                    };
                    if cid.is_empty() {
                        push(
                            &mut errors,
                            "invalid_request",
                            format!("Line {n} has no custom_id."),
                            Some(n),
                        );
                        continue;
                    }
                    if !seen.insert(cid.clone()) {
                        push(
                            &mut errors,
                            "duplicate_custom_id",
                            format!("The custom_id '{cid}' appears more than once."),
                            Some(n),
                        );
                    }
                    if matches!(flavor, Flavor::OpenAi | Flavor::Azure) {
                        if v.get("method").and_then(Value::as_str) != Some("POST") {
                            push(
                                &mut errors,
                                "invalid_request",
                                format!("Line {n}: method must be POST."),
                                Some(n),
                            );
                        }
                        let url = v.get("url").and_then(Value::as_str).unwrap_or("");
                        if url.trim_start_matches("/v1") != endpoint.trim_start_matches("/v1") {
                            push(
                                &mut errors,
                                "url_mismatch",
                                format!("Line {n}: url does not match the batch endpoint."),
                                Some(n),
                            );
                        }
                    }
                    let m = match flavor {
                        Flavor::Gemini => url_model.clone().unwrap_or_default(),
                        _ => body
                            .get("model")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    };
                    match &model {
                        None => {
                            if self.prices.lookup(flavor.price_namespace(), &m).is_err() {
                                push(
                                    &mut errors,
                                    "model_not_found",
                                    format!("The model '{m}' does not exist."),
                                    Some(n),
                                );
                            }
                            model = Some(m);
                        }
                        Some(first) if *first != m => push(
                            &mut errors,
                            "model_mismatch",
                            format!("Line {n} uses model '{m}', the batch uses '{first}'."),
                            Some(n),
                        ),
                        _ => {}
                    }
                    requests.push(RecordedRequest {
                        custom_id: cid,
                        body_sha256: hex::encode(Sha256::digest(body.to_string().as_bytes())),
                        outcome: Outcome::Pending,
                    });
                }
            }
        }
        if requests.is_empty() && errors.is_empty() {
            push(
                &mut errors,
                "empty_file",
                "The input file is empty.".into(),
                None,
            );
        }
        if requests.len() > limit {
            push(
                &mut errors,
                "too_many_tasks",
                format!(
                    "The batch has {} requests; the limit is {limit}.",
                    requests.len()
                ),
                None,
            );
        }
        let b = &mut inner.batches[idx];
        b.model = model;
        if errors.is_empty() {
            b.counts = (requests.len() as u64, 0, 0);
            b.requests = requests;
            b.status = Status::InProgress;
            b.stamps.insert("in_progress_at".into(), unix_now());
        } else {
            for r in &mut requests {
                r.outcome = Outcome::NotRun;
            }
            b.requests = requests;
            b.errors = errors;
            b.status = Status::Failed;
            b.stamps.insert("failed_at".into(), unix_now());
        }
    }

    /// Prices one answer and adds it to the bill.
    fn bill(
        &self,
        flavor: Flavor,
        mode: PricingMode,
        custom_id: &str,
        batch_id: &str,
        model: &str,
        u: &Usage,
    ) -> BillEntry {
        let cost = self
            .prices
            .lookup(flavor.price_namespace(), model)
            .ok()
            .and_then(|p| p.rates(mode).copied())
            .map(|r| r.cost(u))
            .unwrap_or(Usd::ZERO);
        BillEntry {
            custom_id: custom_id.to_string(),
            batch_id: batch_id.to_string(),
            model: model.to_string(),
            pricing_mode: mode.as_str(),
            input_tokens: u.input_tokens,
            cached_input_tokens: u.cached_input_tokens,
            cache_write_tokens: u.cache_write_tokens,
            output_tokens: u.output_tokens,
            reasoning_tokens: u.reasoning_tokens,
            cost_usd: cost.to_decimal_string(),
            cost,
        }
    }

    /// Runs the requests (those that got to run), writes the result files, and saves it all
    /// (result files, outcomes, bill) in one journal line, so a crash keeps all or nothing.
    /// The batch's own settings decide its faults, whatever this process runs with.
    fn materialize(&self, inner: &mut Inner, idx: usize, status: Status, stamp: &'static str) {
        let b = &inner.batches[idx];
        let (flavor, input, batch_id, url_model, inline, ordinal) = (
            b.flavor,
            self.content_path(&b.input),
            b.id.clone(),
            b.url_model.clone(),
            b.inline,
            b.ordinal,
        );
        let s = b.settings.clone();
        // Cancelled before it was validated: the request list is read here, so the counts
        // still say how many requests the batch held.
        let unlisted = b.requests.is_empty();
        let mut listed = Vec::new();
        let total = b.requests.len();
        let done_fraction = if status == Status::Completed {
            1.0
        } else {
            inner.batches[idx].done_fraction
        };
        let done_n = ((total as f64) * done_fraction).floor() as usize;
        let mut out_lines: Vec<String> = Vec::new();
        let mut err_lines: Vec<String> = Vec::new();
        let mut usage_total = Usage::default();
        let mut bill = Vec::new();
        let mut outcomes = Vec::with_capacity(total);
        // Gemini expiry has no results at all.
        let gemini_expired = flavor == Flavor::Gemini && status == Status::Expired;
        if let Ok(f) = std::fs::File::open(&input) {
            let mut i = 0usize;
            for line in BufReader::new(f).split(b'\n').map_while(Result::ok) {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                let (cid, body) = match flavor {
                    Flavor::Gemini => (
                        str_of(&v, "key"),
                        v.get("request").cloned().unwrap_or(Value::Null),
                    ),
                    Flavor::Anthropic => (
                        str_of(&v, "custom_id"),
                        v.get("params").cloned().unwrap_or(Value::Null),
                    ),
                    _ => (
                        str_of(&v, "custom_id"),
                        v.get("body").cloned().unwrap_or(Value::Null),
                    ),
                };
                let body_hash: [u8; 32] = Sha256::digest(body.to_string().as_bytes()).into();
                if unlisted {
                    listed.push(RecordedRequest {
                        custom_id: cid.clone(),
                        body_sha256: hex::encode(body_hash),
                        outcome: Outcome::Pending,
                    });
                }
                let ran = i < done_n;
                i += 1;
                if gemini_expired {
                    outcomes.push(Outcome::Expired);
                    continue;
                }
                let id = short(&cid);
                let n = wire::neutral(flavor, &body, url_model.as_deref());
                let tool = wire::anthropic_tool(&body);
                if !ran {
                    let (reply, outcome) = if status == Status::Cancelled {
                        (Reply::Cancelled, Outcome::Cancelled)
                    } else {
                        (Reply::Expired, Outcome::Expired)
                    };
                    err_lines.push(
                        wire::result_line(flavor, &cid, &id, &n.model, &tool, &reply).to_string(),
                    );
                    outcomes.push(outcome);
                    continue;
                }
                // Faults are drawn on the body and how often it was answered, not on the
                // custom_id (which carries the run's batch id): the same from run to run.
                let key = inner.draw_key(&body_hash);
                if draw(s.seed, "missing", &key) < s.missing_line_rate {
                    outcomes.push(Outcome::Missing);
                    continue;
                }
                let (reply, outcome) = self.answer(&s, flavor, &key, &body_hash, &n);
                if let Reply::Answer { usage, .. } = &reply {
                    usage_total.add(usage);
                    bill.push(self.bill(
                        flavor,
                        PricingMode::Batch,
                        &cid,
                        &batch_id,
                        &n.model,
                        usage,
                    ));
                }
                let line =
                    wire::result_line(flavor, &cid, &id, &n.model, &tool, &reply).to_string();
                let twice = draw(s.seed, "duplicate", &key) < s.duplicate_line_rate;
                let lines = if outcome == Outcome::Error
                    && matches!(flavor, Flavor::OpenAi | Flavor::Azure)
                {
                    &mut err_lines
                } else {
                    &mut out_lines
                };
                if twice {
                    lines.push(line.clone());
                }
                lines.push(line);
                outcomes.push(outcome);
            }
        }
        // Named after the batch's creation number, not its id: the same from run to run.
        let stray = short(&format!("{}:{ordinal}", s.seed));
        for n in 0..s.unknown_lines {
            let cid = format!("unknown-{stray}-{n}");
            let line =
                wire::result_line(flavor, &cid, &short(&cid), "", "", &Reply::Error).to_string();
            err_lines.push(line);
        }
        let completed = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Ok | Outcome::InvalidJson))
            .count() as u64;
        let failed = outcomes.len() as u64 - completed;
        let seed = s.seed ^ 0x5eed;
        let (out_id, err_id, inline_output) = match flavor {
            Flavor::OpenAi | Flavor::Azure => {
                // Lines come back in no particular order.
                shuffle(&mut out_lines, seed);
                shuffle(&mut err_lines, seed.rotate_left(7));
                let out = (!out_lines.is_empty())
                    .then(|| self.write_output(inner, flavor, &batch_id, "output", &out_lines));
                // Azure gives even a clean batch an (empty) error file.
                let err = (!err_lines.is_empty() || flavor == Flavor::Azure)
                    .then(|| self.write_output(inner, flavor, &batch_id, "error", &err_lines));
                (out, err, None)
            }
            Flavor::Anthropic => {
                let mut all = out_lines;
                all.append(&mut err_lines);
                shuffle(&mut all, seed);
                (
                    Some(self.write_output(inner, flavor, &batch_id, "results", &all)),
                    None,
                    None,
                )
            }
            Flavor::Gemini if gemini_expired => (None, None, None),
            Flavor::Gemini => {
                // Input order (expired or cancelled lines, then stray ones, at the end).
                let mut all = out_lines;
                all.append(&mut err_lines);
                if inline {
                    let items: Vec<Value> = all
                        .iter()
                        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                        .map(|mut v| {
                            let key = v["key"].take();
                            let mut item = v;
                            item.as_object_mut().map(|o| o.remove("key"));
                            item["metadata"] = json!({"key": key});
                            item
                        })
                        .collect();
                    (None, None, Some(items))
                } else {
                    (
                        Some(self.write_output(inner, flavor, &batch_id, "responses", &all)),
                        None,
                        None,
                    )
                }
            }
        };
        let b = &mut inner.batches[idx];
        if unlisted {
            b.requests = listed;
        }
        for (r, o) in b.requests.iter_mut().zip(outcomes) {
            r.outcome = o;
        }
        b.status = status;
        b.stamps.insert(stamp.into(), unix_now());
        b.output_file_id = out_id;
        b.error_file_id = err_id;
        b.inline_output = inline_output;
        if flavor == Flavor::Gemini && status == Status::Completed {
            b.output_lag = 1;
        }
        b.counts = (b.requests.len() as u64, completed, failed);
        b.usage = usage_total;
        let billed = bill.len();
        inner.bill.extend(bill);
        let b = &inner.batches[idx];
        let mut ops = Vec::with_capacity(billed + 5);
        for id in [&b.output_file_id, &b.error_file_id].into_iter().flatten() {
            if let Some(f) = inner.files.get(id) {
                ops.push(Put::File(f));
            }
        }
        ops.push(Put::Batch(b));
        ops.push(Put::Requests {
            id: &b.id,
            requests: &b.requests,
        });
        if let Some(lines) = &b.inline_output {
            ops.push(Put::InlineOutput { id: &b.id, lines });
        }
        ops.extend(
            inner.bill[inner.bill.len() - billed..]
                .iter()
                .map(Put::Bill),
        );
        inner.log.write(inner.seq, &ops);
    }

    fn write_output(
        &self,
        inner: &mut Inner,
        flavor: Flavor,
        batch_id: &str,
        kind: &str,
        lines: &[String],
    ) -> String {
        let (name, path) = self.new_content(inner);
        let mut bytes = 0u64;
        let written = crate::util::fs::create_private(&path).and_then(|f| {
            let mut w = std::io::BufWriter::new(f);
            for l in lines {
                w.write_all(l.as_bytes())?;
                w.write_all(b"\n")?;
                bytes += l.len() as u64 + 1;
            }
            w.flush()
        });
        if let Err(e) = written {
            inner.log.fail(format!(
                "the simulator could not write a result file {}: {e}",
                path.display()
            ));
        }
        let id = match flavor {
            Flavor::Gemini => format!(
                "files/batch-{}-{kind}",
                batch_id.trim_start_matches("batches/")
            ),
            Flavor::Azure => self.next_id(inner, "azure-file"),
            _ => self.next_id(inner, "file"),
        };
        inner.files.insert(
            id.clone(),
            SimFile {
                id: id.clone(),
                filename: format!("{batch_id}_{kind}.jsonl"),
                purpose: "batch_output".into(),
                bytes,
                created_at: unix_now(),
                name,
            },
        );
        id
    }

    /// Answers one request: the reply and its outcome. Its faults are drawn on `key`
    /// (`Inner::draw_key`), its answer is generated from the body (its SHA-256, `body_hash`).
    fn answer(
        &self,
        s: &SimSettings,
        flavor: Flavor,
        key: &str,
        body_hash: &[u8; 32],
        n: &Neutral,
    ) -> (Reply, Outcome) {
        if draw(s.seed, "fail", key) < s.fail_rate {
            return (Reply::Error, Outcome::Error);
        }
        let mut rng = answer::Rng::new(u64::from_le_bytes(body_hash[..8].try_into().expect("8")));
        let value = answer::generate(&n.schema, &n.schema, &mut rng);
        let mut content = value.to_string();
        let invalid = draw(s.seed, "invalid", key) < s.invalid_json_rate;
        if invalid {
            content = if draw(s.seed, "invalid-kind", key) < 0.5 {
                // cut mid-way: not JSON at all
                content[..content.len() / 2].to_string()
            } else {
                // JSON, but the wrong shape for the schema
                json!({"unexpected": "shape"}).to_string()
            };
        }
        let tok = n.tokenizer;
        let max_tokens = n.max_tokens;
        let mut visible = tok.count(&content);
        let reasoning = if s.answer_at_max_tokens {
            max_tokens.saturating_sub(visible)
        } else if is_reasoning_model(&n.model) {
            16 + (u64::from(body_hash[9]) % 48)
        } else {
            0
        };
        let mut truncated = false;
        if reasoning + visible > max_tokens {
            let room = max_tokens.saturating_sub(reasoning);
            content = tok.truncate(&content, room);
            visible = tok.count(&content);
            truncated = true;
        }
        let reasoning = reasoning.min(max_tokens);
        let prompt = n.prompt_tokens;
        let (cached, written) = if draw(s.seed, "cache", key) < s.cache_rate {
            (prompt / 2, 0)
        } else if flavor == Flavor::Anthropic && draw(s.seed, "cache-write", key) < s.cache_rate {
            (0, prompt / 2)
        } else {
            (0, 0)
        };
        let usage = Usage {
            input_tokens: prompt,
            cached_input_tokens: cached,
            cache_write_tokens: written,
            output_tokens: visible + reasoning,
            reasoning_tokens: reasoning,
        };
        let outcome = if invalid {
            Outcome::InvalidJson
        } else {
            Outcome::Ok
        };
        (
            Reply::Answer {
                content,
                truncated,
                usage,
            },
            outcome,
        )
    }

    /// Answers a real-time request (`/v1/chat/completions`, `/v1/messages`), billed at
    /// standard prices and kept in the record under the client's request id.
    pub(crate) fn online(
        &self,
        flavor: Flavor,
        custom_id: &str,
        body: &Value,
    ) -> Result<OnlineReply, SimError> {
        let n = wire::neutral(flavor, body, None);
        let body_hash: [u8; 32] = Sha256::digest(body.to_string().as_bytes()).into();
        let body_sha256 = hex::encode(body_hash);
        // Billed and named under the client's request id, or the body's hash without one.
        let key = if custom_id.is_empty() {
            body_sha256.clone()
        } else {
            custom_id.to_string()
        };
        let mut inner = self.state()?;
        // Drawn and counted under the lock, like a batch's requests: the count of earlier
        // answers to this body is the one the recorded entries give back on replay.
        let draw_key = inner.draw_key(&body_hash);
        let (reply, outcome) = self.answer(&self.settings, flavor, &draw_key, &body_hash, &n);
        let id = short(&key);
        let entry = json!({"custom_id": custom_id, "flavor": flavor, "at_ms": now_ms(),
            "prompt_tokens": n.prompt_tokens, "outcome": outcome,
            "body_sha256": body_sha256});
        let billed = match &reply {
            Reply::Answer { usage, .. } => Some(self.bill(
                flavor,
                PricingMode::Standard,
                &key,
                "online",
                &n.model,
                usage,
            )),
            _ => None,
        };
        let mut ops = vec![Put::Online(&entry)];
        ops.extend(billed.as_ref().map(Put::Bill));
        let seq = inner.seq;
        inner.log.write(seq, &ops);
        inner.online.push(entry);
        inner.bill.extend(billed);
        Self::saved(&inner, ())?;
        Ok(match &reply {
            Reply::Answer { .. } => {
                let tool = wire::anthropic_tool(body);
                OnlineReply {
                    status: 200,
                    body: wire::answer_body(flavor, &id, &n.model, &tool, &reply),
                }
            }
            _ => OnlineReply {
                status: 500,
                body: match flavor {
                    Flavor::Anthropic => {
                        json!({"type": "error", "error": {"type": "api_error", "message": "Internal server error"}})
                    }
                    _ => {
                        json!({"error": {"message": "The server had an error while processing your request.", "type": "server_error", "param": null, "code": null}})
                    }
                },
            },
        })
    }

    /// Notes a call refused by an HTTP fault (the client's request id, if it sent one).
    pub(crate) fn note_refused(&self, request_id: &str, status: u16) {
        if request_id.is_empty() {
            return;
        }
        let mut inner = self.lock();
        let entry = json!({"custom_id": request_id, "at_ms": now_ms(), "status": status});
        let seq = inner.seq;
        inner.log.write(seq, &[Put::Refused(&entry)]);
        inner.refused.push(entry);
    }

    /// The bill per provider batch: (batch id, billed requests, tokens, cost).
    pub fn batch_bills(&self) -> Vec<(String, u64, Usage, Usd)> {
        let inner = self.lock();
        let mut by: BTreeMap<String, (u64, Usage, Usd)> = BTreeMap::new();
        for e in &inner.bill {
            let slot = by.entry(e.batch_id.clone()).or_default();
            slot.0 += 1;
            slot.1.add(&Usage {
                input_tokens: e.input_tokens,
                cached_input_tokens: e.cached_input_tokens,
                cache_write_tokens: e.cache_write_tokens,
                output_tokens: e.output_tokens,
                reasoning_tokens: e.reasoning_tokens,
            });
            slot.2 += e.cost;
        }
        by.into_iter().map(|(k, (n, u, c))| (k, n, u, c)).collect()
    }

    /// The record of everything accepted and billed.
    pub fn record(&self) -> Value {
        let mut inner = self.lock();
        for i in 0..inner.batches.len() {
            self.advance(&mut inner, i);
        }
        let batches: Vec<Value> = inner
            .batches
            .iter()
            .map(|b| {
                json!({
                    "id": b.id,
                    "flavor": b.flavor,
                    "status": b.status.openai(),
                    "local_id": b.local_id(),
                    "requests": b.requests,
                })
            })
            .collect();
        let mut per_model: BTreeMap<(String, &str), (Usage, Usd, u64)> = BTreeMap::new();
        let mut total = (Usage::default(), Usd::ZERO);
        for e in &inner.bill {
            let u = Usage {
                input_tokens: e.input_tokens,
                cached_input_tokens: e.cached_input_tokens,
                cache_write_tokens: e.cache_write_tokens,
                output_tokens: e.output_tokens,
                reasoning_tokens: e.reasoning_tokens,
            };
            let slot = per_model
                .entry((e.model.clone(), e.pricing_mode))
                .or_insert((Usage::default(), Usd::ZERO, 0));
            slot.0.add(&u);
            slot.1 += e.cost;
            slot.2 += 1;
            total.0.add(&u);
            total.1 += e.cost;
        }
        let usage_json = |u: &Usage| {
            json!({
                "input_tokens": u.input_tokens, "cached_input_tokens": u.cached_input_tokens,
                "cache_write_tokens": u.cache_write_tokens, "output_tokens": u.output_tokens,
                "reasoning_tokens": u.reasoning_tokens
            })
        };
        let models: Vec<Value> = per_model
            .iter()
            .map(|((m, mode), (u, c, n))| {
                json!({"model": m, "pricing_mode": mode, "requests": n, "tokens": usage_json(u), "cost_usd": c.to_decimal_string()})
            })
            .collect();
        json!({
            "batches": batches,
            "online": inner.online,
            "refused": inner.refused,
            "uploads": inner.uploads,
            "bill": {
                "per_custom_id": inner.bill,
                "per_model": models,
                "totals": {"requests": inner.bill.len(), "tokens": usage_json(&total.0), "cost_usd": total.1.to_decimal_string()},
            }
        })
    }
}

/// Seconds from `from_ms` to `to_ms` (unix milliseconds), never negative.
fn elapsed(from_ms: i64, to_ms: i64) -> f64 {
    (to_ms - from_ms).max(0) as f64 / 1000.0
}

/// Share of the in-progress phase done `elapsed` seconds into a batch made under `s`.
fn progress(s: &SimSettings, elapsed: f64) -> f64 {
    let t = s.batch_seconds;
    if t <= 0.0 {
        return 1.0;
    }
    ((elapsed - 0.1 * t) / (0.8 * t)).clamp(0.0, 1.0)
}

fn str_of(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_str).unwrap_or("").to_string()
}

fn is_reasoning_model(model: &str) -> bool {
    let m = model.to_ascii_lowercase();
    m.starts_with("gpt-5")
        || m.starts_with("gpt-6")
        || (m.starts_with('o') && m[1..].starts_with(|c: char| c.is_ascii_digit()))
}

fn short(cid: &str) -> String {
    hex::encode(&Sha256::digest(cid.as_bytes())[..8])
}

fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut rng = answer::Rng::new(seed ^ v.len() as u64);
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

#[cfg(test)]
mod tests;
