//! The provider simulator.
//!
//! A local server that speaks the batch APIs of OpenAI, Azure OpenAI, Anthropic and Gemini,
//! and the real-time chat-completions and messages endpoints, on loopback, so the real client
//! code talks real HTTP without an API key. One provider-neutral core (batch timeline, answers,
//! faults, bill, record) sits behind a wire adapter per provider (`wire`, `server`).
//!
//! It is deterministic given its seed: answers are generated from the request's JSON schema
//! and the request body, prompt tokens are counted with the same function the planner uses,
//! and faults are drawn per attempt from the seed and the custom_id (a resubmitted request
//! has a new custom_id, so it draws afresh).
//!
//! It keeps the record of what it accepted and billed (`GET /_sim/record`): every batch (and
//! every online request), each request's custom_id, body hash and outcome, and the bill
//! (tokens and exact cost per custom_id, per model and pricing mode, and totals). Tests judge
//! "never sent twice" and "ledger = bill" from that record.
//!
//! Every id it hands out (files, batches, result files, content file names, upload sessions)
//! carries a nonce drawn afresh by each `Sim`, so two simulators with the same seed (two
//! processes, say) never hand out the same id. Everything else (answers, faults, expiry, the
//! order of result lines) is drawn from the seed and the request, never from an id.
//!
//! Files live in a private temporary folder, not in memory, so rehearsing a large backfill
//! does not need the memory to hold it.

pub mod answer;
mod server;
pub mod settings;
pub mod wire;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::cost::{PriceTable, PricingMode, Usage, Usd};

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

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Clone, Debug)]
struct SimFile {
    id: String,
    filename: String,
    purpose: String,
    bytes: u64,
    created_at: i64,
    path: PathBuf,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
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

#[derive(Clone, Debug, Serialize)]
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
    #[serde(skip)]
    pub cost: Usd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

#[derive(Debug)]
struct SimBatch {
    id: String,
    /// Creation number: 0 is the first batch this simulator created.
    ordinal: u64,
    flavor: Flavor,
    /// The requests, one native line each (the uploaded file, or the inline requests).
    input_path: PathBuf,
    input_file_id: Option<String>,
    endpoint: String,
    metadata: Option<Value>,
    display_name: Option<String>,
    /// Gemini: the model named in the create URL.
    url_model: Option<String>,
    inline: bool,
    created_at: i64,
    started: Instant,
    status: Status,
    stamps: BTreeMap<&'static str, i64>,
    expires: bool,
    cancel_at: Option<Instant>,
    /// Fraction of the requests that had run when the batch was cut short.
    done_fraction: f64,
    requests: Vec<RecordedRequest>,
    model: Option<String>,
    counts: (u64, u64, u64),
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    /// Gemini inline results, in input order.
    inline_output: Option<Vec<Value>>,
    /// Gemini: polls for which SUCCEEDED shows no output yet (the lagging-file quirk).
    output_lag: u8,
    errors: Vec<Value>,
    usage: Usage,
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
    /// Gemini resumable uploads started: token → display name.
    sessions: HashMap<String, String>,
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
    dir: tempfile::TempDir,
    /// Drawn afresh by every `Sim` and mixed into every id it hands out.
    nonce: [u8; 16],
    inner: Mutex<Inner>,
    base: OnceLock<String>,
}

impl Sim {
    pub fn new(settings: SimSettings, prices: PriceTable) -> std::io::Result<Arc<Self>> {
        let dir = tempfile::Builder::new()
            .prefix("nightshift-sim-")
            .tempdir()?;
        Ok(Arc::new(Sim {
            settings,
            prices,
            dir,
            nonce: *uuid::Uuid::new_v4().as_bytes(),
            inner: Mutex::new(Inner::default()),
            base: OnceLock::new(),
        }))
    }

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

    /// A path for a new file's content.
    fn new_content(&self, inner: &mut Inner) -> PathBuf {
        inner.seq += 1;
        let name = format!("f{}-{}", hex::encode(&self.nonce[..6]), inner.seq);
        self.dir.path().join(name)
    }

    /// A path for a new file's content.
    pub(crate) fn new_file_path(&self) -> PathBuf {
        self.new_content(&mut self.lock())
    }

    pub(crate) fn add_file(
        &self,
        flavor: Flavor,
        filename: String,
        purpose: String,
        path: PathBuf,
        bytes: u64,
        sha256: String,
    ) -> Value {
        let mut inner = self.lock();
        let id = match flavor {
            Flavor::Azure => self.next_id(&mut inner, "azure-file"),
            Flavor::Gemini => self.next_id(&mut inner, "gemini-file"),
            _ => self.next_id(&mut inner, "file"),
        };
        inner.uploads.push(json!({"id": id, "filename": filename, "purpose": purpose, "bytes": bytes, "sha256": sha256}));
        let f = SimFile {
            id: id.clone(),
            filename,
            purpose,
            bytes,
            created_at: unix_now(),
            path,
        };
        let v = f.json(flavor);
        inner.files.insert(id, f);
        v
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
        self.lock()
            .files
            .get(id)
            .map(|f| f.json(flavor))
            .ok_or_else(|| SimError::not_found("file", id))
    }

    pub(crate) fn file_path(&self, id: &str) -> Result<PathBuf, SimError> {
        self.lock()
            .files
            .get(id)
            .map(|f| f.path.clone())
            .ok_or_else(|| SimError::not_found("file", id))
    }

    pub(crate) fn delete_file(&self, id: &str) -> Result<Value, SimError> {
        let f = self
            .lock()
            .files
            .remove(id)
            .ok_or_else(|| SimError::not_found("file", id))?;
        let _ = std::fs::remove_file(&f.path);
        Ok(json!({"id": id, "object": "file", "deleted": true}))
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

    fn push_batch(&self, inner: &mut Inner, mut b: SimBatch) -> Value {
        let v = b.json(self.base());
        let idx = inner.batches.len();
        inner.batch_index.insert(b.id.clone(), idx);
        inner.batches.push(b);
        v
    }

    /// Whether the next batch created expires: the first `expire_first` batches, and a draw
    /// on its creation number (never on its id, which is not the same from one run to the
    /// next).
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
        input_path: PathBuf,
    ) -> SimBatch {
        let id = self.next_id(inner, id_kind);
        let ordinal = inner.batches.len() as u64;
        SimBatch {
            id,
            ordinal,
            flavor,
            input_path,
            input_file_id: None,
            endpoint: String::new(),
            metadata: None,
            display_name: None,
            url_model: None,
            inline: false,
            created_at: unix_now(),
            started: Instant::now(),
            status: Status::Validating,
            stamps: BTreeMap::new(),
            expires: self.will_expire(ordinal, flavor),
            cancel_at: None,
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
        let mut inner = self.lock();
        let path = match inner.files.get(input_file_id) {
            None => return Err(SimError::not_found("file", input_file_id)),
            Some(f) if f.purpose != "batch" => {
                return Err(SimError::bad_request(format!(
                    "File {input_file_id} has purpose '{}', expected 'batch'.",
                    f.purpose
                )));
            }
            Some(f) => f.path.clone(),
        };
        let kind = if flavor == Flavor::Azure {
            "azure-batch"
        } else {
            "batch"
        };
        let mut b = self.new_batch(&mut inner, kind, flavor, path);
        b.input_file_id = Some(input_file_id.to_string());
        b.endpoint = endpoint.to_string();
        b.metadata = metadata;
        Ok(self.push_batch(&mut inner, b))
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
        let path = self.new_file_path();
        let mut w = std::io::BufWriter::new(
            std::fs::File::create(&path).map_err(|e| SimError::bad_request(e.to_string()))?,
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
            let _ = writeln!(w, "{}", json!({"custom_id": cid, "params": params}));
        }
        let _ = w.flush();
        drop(w);
        let mut inner = self.lock();
        let mut b = self.new_batch(&mut inner, "msgbatch", Flavor::Anthropic, path);
        b.counts = (recorded.len() as u64, 0, 0);
        b.requests = recorded;
        b.status = Status::InProgress;
        Ok(self.push_batch(&mut inner, b))
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
        let (path, input_file_id, is_inline) = match (file, inline) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(SimError::bad_request(
                    "exactly one of input_config.file_name and input_config.requests is required",
                ));
            }
            (Some(f), None) => {
                let path = self.file_path(f)?;
                (path, Some(f.to_string()), false)
            }
            (None, Some(reqs)) => {
                let path = self.new_file_path();
                let mut w = std::io::BufWriter::new(
                    std::fs::File::create(&path)
                        .map_err(|e| SimError::bad_request(e.to_string()))?,
                );
                for r in reqs {
                    let key = r
                        .pointer("/metadata/key")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    let _ = writeln!(w, "{}", json!({"key": key, "request": r.get("request")}));
                }
                let _ = w.flush();
                (path, None, true)
            }
        };
        let mut inner = self.lock();
        let mut b = self.new_batch(&mut inner, "gemini-batch", Flavor::Gemini, path);
        b.input_file_id = input_file_id;
        b.display_name = display;
        b.url_model = Some(model.trim_start_matches("models/").to_string());
        b.inline = is_inline;
        Ok(self.push_batch(&mut inner, b))
    }

    fn index(&self, inner: &Inner, id: &str) -> Result<usize, SimError> {
        inner
            .batch_index
            .get(id)
            .copied()
            .ok_or_else(|| SimError::not_found("batch", id))
    }

    pub(crate) fn get_batch(&self, id: &str) -> Result<Value, SimError> {
        let mut inner = self.lock();
        let idx = self.index(&inner, id)?;
        self.advance(&mut inner, idx);
        Ok(inner.batches[idx].json(self.base()))
    }

    pub(crate) fn cancel_batch(&self, id: &str) -> Result<Value, SimError> {
        let mut inner = self.lock();
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
                let elapsed = b.started.elapsed().as_secs_f64();
                b.done_fraction = self.progress(elapsed);
                b.status = Status::Cancelling;
                b.stamps.insert("cancelling_at", unix_now());
                b.cancel_at = Some(Instant::now());
            }
        }
        self.advance(&mut inner, idx);
        Ok(inner.batches[idx].json(self.base()))
    }

    /// The batches of one wire flavor, newest first, one page after `after`.
    pub(crate) fn list_batches(&self, flavor: Flavor, limit: usize, after: Option<&str>) -> Value {
        let mut inner = self.lock();
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
            .map(|&i| inner.batches[i].json(&base))
            .collect();
        let has_more = start + page.len() < order.len();
        let first = page_idx.first().map(|&i| inner.batches[i].id.clone());
        let last = page_idx.last().map(|&i| inner.batches[i].id.clone());
        match flavor {
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
        }
    }

    /// Anthropic results: the results file of an ended batch.
    pub(crate) fn results_path(&self, id: &str) -> Result<PathBuf, SimError> {
        let mut inner = self.lock();
        let idx = self.index(&inner, id)?;
        self.advance(&mut inner, idx);
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
            .map(|f| f.path.clone())
            .ok_or_else(|| SimError::not_found("results", id))
    }

    /// Share of the in-progress phase done after `elapsed` seconds.
    fn progress(&self, elapsed: f64) -> f64 {
        let t = self.settings.batch_seconds;
        if t <= 0.0 {
            return 1.0;
        }
        ((elapsed - 0.1 * t) / (0.8 * t)).clamp(0.0, 1.0)
    }

    /// Moves a batch along its timeline, as far as the clock allows.
    fn advance(&self, inner: &mut Inner, idx: usize) {
        let t = self.settings.batch_seconds;
        loop {
            let elapsed = inner.batches[idx].started.elapsed().as_secs_f64();
            let b = &inner.batches[idx];
            let next = match b.status {
                Status::Validating if elapsed >= 0.1 * t => Some(Status::InProgress),
                Status::InProgress if b.expires && elapsed >= 0.6 * t => Some(Status::Expired),
                Status::InProgress if elapsed >= 0.9 * t => Some(Status::Finalizing),
                Status::Finalizing if elapsed >= t => Some(Status::Completed),
                Status::Cancelling => {
                    let since = b
                        .cancel_at
                        .map(|c| c.elapsed().as_secs_f64())
                        .unwrap_or(0.0);
                    (since >= 0.05 * t || b.flavor == Flavor::Gemini).then_some(Status::Cancelled)
                }
                _ => None,
            };
            let Some(next) = next else {
                if inner.batches[idx].status == Status::InProgress
                    && inner.batches[idx].flavor != Flavor::Anthropic
                {
                    let total = inner.batches[idx].counts.0;
                    let done = (total as f64 * self.progress(elapsed)) as u64;
                    inner.batches[idx].counts.1 = done.min(total);
                }
                return;
            };
            match next {
                Status::InProgress => self.validate(inner, idx),
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
                    b.stamps.insert("finalizing_at", unix_now());
                    b.counts.1 = b.counts.0;
                }
                _ => return,
            }
        }
    }

    /// Checks the input file; the batch goes `in_progress` or `failed`.
    fn validate(&self, inner: &mut Inner, idx: usize) {
        let flavor = inner.batches[idx].flavor;
        let path = inner.batches[idx].input_path.clone();
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
            b.stamps.insert("in_progress_at", unix_now());
        } else {
            for r in &mut requests {
                r.outcome = Outcome::NotRun;
            }
            b.requests = requests;
            b.errors = errors;
            b.status = Status::Failed;
            b.stamps.insert("failed_at", unix_now());
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

    /// Runs the requests (those that got to run) and writes the result files.
    fn materialize(&self, inner: &mut Inner, idx: usize, status: Status, stamp: &'static str) {
        let (flavor, input, batch_id, url_model, inline, ordinal) = {
            let b = &inner.batches[idx];
            (
                b.flavor,
                b.input_path.clone(),
                b.id.clone(),
                b.url_model.clone(),
                b.inline,
                b.ordinal,
            )
        };
        // Cancelled before it was validated: the request list is read here, so the counts
        // still say how many requests the batch held.
        let unlisted = inner.batches[idx].requests.is_empty();
        let mut listed = Vec::new();
        let total = inner.batches[idx].requests.len();
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
                if unlisted {
                    listed.push(RecordedRequest {
                        custom_id: cid.clone(),
                        body_sha256: hex::encode(Sha256::digest(body.to_string().as_bytes())),
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
                if draw(self.settings.seed, "missing", &cid) < self.settings.missing_line_rate {
                    outcomes.push(Outcome::Missing);
                    continue;
                }
                let (reply, outcome) = self.answer(flavor, &cid, &body, &n);
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
                let twice =
                    draw(self.settings.seed, "duplicate", &cid) < self.settings.duplicate_line_rate;
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
        let stray = short(&format!("{}:{ordinal}", self.settings.seed));
        for n in 0..self.settings.unknown_lines {
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
        let seed = self.settings.seed ^ 0x5eed;
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
        b.stamps.insert(stamp, unix_now());
        b.output_file_id = out_id;
        b.error_file_id = err_id;
        b.inline_output = inline_output;
        if flavor == Flavor::Gemini && status == Status::Completed {
            b.output_lag = 1;
        }
        b.counts = (b.requests.len() as u64, completed, failed);
        b.usage = usage_total;
        inner.bill.extend(bill);
    }

    fn write_output(
        &self,
        inner: &mut Inner,
        flavor: Flavor,
        batch_id: &str,
        kind: &str,
        lines: &[String],
    ) -> String {
        let path = self.new_content(inner);
        let mut bytes = 0u64;
        if let Ok(mut f) = std::fs::File::create(&path) {
            let mut w = std::io::BufWriter::new(&mut f);
            for l in lines {
                let _ = w.write_all(l.as_bytes());
                let _ = w.write_all(b"\n");
                bytes += l.len() as u64 + 1;
            }
            let _ = w.flush();
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
                path,
            },
        );
        id
    }

    /// Answers one request: the reply and its outcome.
    fn answer(&self, flavor: Flavor, cid: &str, body: &Value, n: &Neutral) -> (Reply, Outcome) {
        let s = &self.settings;
        if draw(s.seed, "fail", cid) < s.fail_rate {
            return (Reply::Error, Outcome::Error);
        }
        let body_hash = Sha256::digest(body.to_string().as_bytes());
        let mut rng = answer::Rng::new(u64::from_le_bytes(body_hash[..8].try_into().expect("8")));
        let value = answer::generate(&n.schema, &n.schema, &mut rng);
        let mut content = value.to_string();
        let invalid = draw(s.seed, "invalid", cid) < s.invalid_json_rate;
        if invalid {
            content = if draw(s.seed, "invalid-kind", cid) < 0.5 {
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
        let (cached, written) = if draw(s.seed, "cache", cid) < s.cache_rate {
            (prompt / 2, 0)
        } else if flavor == Flavor::Anthropic && draw(s.seed, "cache-write", cid) < s.cache_rate {
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
    pub(crate) fn online(&self, flavor: Flavor, custom_id: &str, body: &Value) -> OnlineReply {
        let n = wire::neutral(flavor, body, None);
        let key = if custom_id.is_empty() {
            hex::encode(Sha256::digest(body.to_string().as_bytes()))
        } else {
            custom_id.to_string()
        };
        let (reply, outcome) = self.answer(flavor, &key, body, &n);
        let id = short(&key);
        let mut inner = self.lock();
        let entry = json!({"custom_id": custom_id, "flavor": flavor, "at_ms": now_ms(),
            "prompt_tokens": n.prompt_tokens, "outcome": outcome,
            "body_sha256": hex::encode(Sha256::digest(body.to_string().as_bytes()))});
        inner.online.push(entry);
        match &reply {
            Reply::Answer { usage, .. } => {
                let b = self.bill(
                    flavor,
                    PricingMode::Standard,
                    &key,
                    "online",
                    &n.model,
                    usage,
                );
                inner.bill.push(b);
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
        }
    }

    /// Notes a call refused by an HTTP fault (the client's request id, if it sent one).
    pub(crate) fn note_refused(&self, request_id: &str, status: u16) {
        if request_id.is_empty() {
            return;
        }
        self.lock()
            .refused
            .push(json!({"custom_id": request_id, "at_ms": now_ms(), "status": status}));
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
mod tests {
    use super::*;

    #[test]
    fn draws_are_uniform_enough_and_deterministic() {
        let hits = (0..10_000)
            .filter(|i| draw(1, "fail", &format!("c{i}")) < 0.03)
            .count();
        assert!((200..400).contains(&hits), "{hits}");
        assert_eq!(draw(1, "a", "b"), draw(1, "a", "b"));
        assert_ne!(draw(1, "a", "b"), draw(2, "a", "b"));
    }

    fn settings(batch_seconds: f64) -> SimSettings {
        SimSettings {
            batch_seconds,
            ..Default::default()
        }
    }

    fn line(cid: &str) -> String {
        json!({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": format!("ticket {cid}")}],
                "max_completion_tokens": 50}})
        .to_string()
    }

    /// Uploads an OpenAI batch input of `n` requests named `{prefix}{i}`; its file id.
    fn upload(sim: &Sim, prefix: &str, n: usize) -> String {
        let text: String = (0..n)
            .map(|i| line(&format!("{prefix}{i}")) + "\n")
            .collect();
        let path = sim.new_file_path();
        std::fs::write(&path, &text).unwrap();
        let f = sim.add_file(
            Flavor::OpenAi,
            "in.jsonl".into(),
            "batch".into(),
            path,
            text.len() as u64,
            String::new(),
        );
        f["id"].as_str().unwrap().to_string()
    }

    fn create(sim: &Sim, file_id: &str) -> Value {
        sim.create_openai_batch(
            Flavor::OpenAi,
            &json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
        )
        .unwrap()
    }

    fn id(v: &Value) -> String {
        v["id"].as_str().unwrap().to_string()
    }

    fn wait_terminal(sim: &Sim, id: &str) -> Value {
        for _ in 0..500 {
            let b = sim.get_batch(id).unwrap();
            if ["completed", "failed", "expired", "cancelled"]
                .contains(&b["status"].as_str().unwrap())
            {
                return b;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("batch {id} never ended");
    }

    /// custom_id → answer content and usage, from a result file.
    fn answers(sim: &Sim, file_id: &str) -> BTreeMap<String, (String, Value)> {
        let text = std::fs::read_to_string(sim.file_path(file_id).unwrap()).unwrap();
        text.lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                let body = &v["response"]["body"];
                (
                    v["custom_id"].as_str().unwrap().to_string(),
                    (
                        body["choices"][0]["message"]["content"]
                            .as_str()
                            .unwrap()
                            .to_string(),
                        body["usage"].clone(),
                    ),
                )
            })
            .collect()
    }

    #[test]
    fn every_id_kind_differs_between_two_sims_with_one_seed_and_keeps_its_shape() {
        let a = Sim::new(settings(0.0), PriceTable::builtin()).unwrap();
        let b = Sim::new(settings(0.0), PriceTable::builtin()).unwrap();
        type Shape = fn(&str) -> bool;
        let shapes: [(&str, Shape); 7] = [
            ("file", |s| {
                s.strip_prefix("file-").is_some_and(|h| h.len() == 22)
            }),
            ("azure-file", |s| {
                s.strip_prefix("file-").is_some_and(|h| h.len() == 32)
            }),
            ("gemini-file", |s| {
                s.strip_prefix("files/").is_some_and(|h| h.len() == 16)
            }),
            ("batch", |s| {
                s.strip_prefix("batch_").is_some_and(|h| h.len() == 24)
            }),
            ("azure-batch", |s| {
                s.strip_prefix("batch_")
                    .is_some_and(|u| uuid::Uuid::parse_str(u).is_ok())
            }),
            ("msgbatch", |s| {
                s.strip_prefix("msgbatch_01").is_some_and(|h| h.len() == 24)
            }),
            ("gemini-batch", |s| {
                s.strip_prefix("batches/").is_some_and(|h| h.len() == 16)
            }),
        ];
        for (kind, shape) in shapes {
            let (x, y) = (
                a.next_id(&mut a.lock(), kind),
                b.next_id(&mut b.lock(), kind),
            );
            assert_ne!(x, y, "{kind}");
            assert!(shape(&x) && shape(&y), "{kind}: {x} {y}");
        }
        assert_ne!(
            a.start_session("x".into()),
            b.start_session("x".into()),
            "upload session tokens"
        );
        assert_ne!(
            a.new_file_path().file_name(),
            b.new_file_path().file_name(),
            "content file names"
        );
    }

    #[test]
    fn two_sims_with_one_seed_give_different_ids_and_the_same_answers() {
        let a = Sim::new(settings(0.0), PriceTable::builtin()).unwrap();
        let b = Sim::new(settings(0.0), PriceTable::builtin()).unwrap();
        let (fa, fb) = (upload(&a, "c", 20), upload(&b, "c", 20));
        assert_ne!(fa, fb);
        let (ba, bb) = (create(&a, &fa), create(&b, &fb));
        assert_ne!(id(&ba), id(&bb));
        let (ba, bb) = (wait_terminal(&a, &id(&ba)), wait_terminal(&b, &id(&bb)));
        assert_eq!(ba["status"], "completed");
        let (oa, ob) = (
            ba["output_file_id"].as_str().unwrap(),
            bb["output_file_id"].as_str().unwrap(),
        );
        assert_ne!(oa, ob, "output file ids");
        let answers_a = answers(&a, oa);
        assert_eq!(answers_a.len(), 20);
        assert_eq!(answers_a, answers(&b, ob));
        assert_eq!(
            a.record()["bill"]["totals"],
            b.record()["bill"]["totals"],
            "the same bill"
        );
    }

    #[test]
    fn reasoning_models_are_recognised() {
        assert!(is_reasoning_model("gpt-5.4-mini"));
        assert!(is_reasoning_model("o4-mini"));
        assert!(!is_reasoning_model("gpt-4o-mini"));
        assert!(!is_reasoning_model("omni"));
    }
}
