//! The provider simulator.
//!
//! A local server that speaks the OpenAI Files + Batches wire format on loopback, so the real
//! client code talks real HTTP without an API key. It is deterministic given its seed: answers
//! are generated from the request's JSON schema and the request body, token counts come from
//! the same counter the planner uses, and faults are drawn per attempt from the seed and the
//! custom_id (a resubmitted request has a new custom_id, so it draws afresh).
//!
//! It keeps the record of what it accepted and billed (`GET /_sim/record`): every batch, each
//! request's custom_id, body hash and outcome, and the bill (tokens and exact cost per
//! custom_id, per model and pricing mode, and totals). Tests judge "never sent twice" and
//! "ledger = bill" from that record.
//!
//! Files live in a private temporary folder, not in memory, so rehearsing a large backfill
//! does not need the memory to hold it.

pub mod answer;
mod server;
pub mod settings;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::cost::tokens::Tokenizer;
use crate::cost::{PriceTable, PricingMode, Usage, Usd};

pub use server::{SimHandle, serve, start};
pub use settings::SimSettings;

/// OpenAI's request limit per batch file, enforced at validation.
const MAX_REQUESTS: usize = 50_000;

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

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
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
    fn json(&self) -> Value {
        json!({
            "id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
            "filename": self.filename, "purpose": self.purpose, "status": "processed",
            "expires_at": null, "status_details": null
        })
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
    fn as_str(self) -> &'static str {
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
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    metadata: Option<Value>,
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
    errors: Vec<Value>,
    usage: Usage,
}

impl SimBatch {
    fn json(&self) -> Value {
        let stamp = |k: &str| self.stamps.get(k).copied();
        let usage_visible = self.status.terminal() && self.status != Status::Failed;
        json!({
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": if self.errors.is_empty() { Value::Null } else { json!({"object": "list", "data": self.errors}) },
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status.as_str(),
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": stamp("in_progress_at"),
            "expires_at": self.created_at + 86_400,
            "finalizing_at": stamp("finalizing_at"),
            "completed_at": stamp("completed_at"),
            "failed_at": stamp("failed_at"),
            "expired_at": stamp("expired_at"),
            "cancelling_at": stamp("cancelling_at"),
            "cancelled_at": stamp("cancelled_at"),
            "request_counts": {"total": self.counts.0, "completed": self.counts.1, "failed": self.counts.2},
            "metadata": self.metadata,
            "usage": if usage_visible { json!({
                "input_tokens": self.usage.input_tokens,
                "input_tokens_details": {"cached_tokens": self.usage.cached_input_tokens},
                "output_tokens": self.usage.output_tokens,
                "output_tokens_details": {"reasoning_tokens": self.usage.reasoning_tokens},
                "total_tokens": self.usage.input_tokens + self.usage.output_tokens,
            }) } else { Value::Null },
        })
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
            kind: "invalid_request_error",
            code: None,
            message: format!("No {what} found with id '{id}'."),
        }
    }
}

/// The simulator's state.
pub struct Sim {
    settings: SimSettings,
    prices: PriceTable,
    dir: tempfile::TempDir,
    inner: Mutex<Inner>,
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
            inner: Mutex::new(Inner::default()),
        }))
    }

    pub fn settings(&self) -> &SimSettings {
        &self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_id(&self, inner: &mut Inner, prefix: &str) -> String {
        inner.seq += 1;
        let h = Sha256::digest(format!("{}:{}:{prefix}", self.settings.seed, inner.seq));
        match prefix {
            "file" => format!("file-{}", &hex::encode(&h[..11])),
            "batch" => format!("batch_{}", &hex::encode(&h[..12])),
            _ => format!("{prefix}_{}", &hex::encode(&h[..12])),
        }
    }

    /// A path for a new file's content.
    pub(crate) fn new_file_path(&self) -> PathBuf {
        let mut inner = self.lock();
        inner.seq += 1;
        self.dir.path().join(format!("f{}", inner.seq))
    }

    pub(crate) fn add_file(
        &self,
        filename: String,
        purpose: String,
        path: PathBuf,
        bytes: u64,
        sha256: String,
    ) -> Value {
        let mut inner = self.lock();
        let id = self.next_id(&mut inner, "file");
        inner.uploads.push(json!({"id": id, "filename": filename, "purpose": purpose, "bytes": bytes, "sha256": sha256}));
        let f = SimFile {
            id: id.clone(),
            filename,
            purpose,
            bytes,
            created_at: unix_now(),
            path,
        };
        let v = f.json();
        inner.files.insert(id, f);
        v
    }

    pub(crate) fn file(&self, id: &str) -> Result<Value, SimError> {
        self.lock()
            .files
            .get(id)
            .map(SimFile::json)
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
            .map(|f| f.json())
            .collect();
        let has_more = start + page.len() < files.len();
        json!({
            "object": "list",
            "data": page,
            "first_id": page.first().map(|f| f["id"].clone()),
            "last_id": page.last().map(|f| f["id"].clone()),
            "has_more": has_more,
        })
    }

    pub(crate) fn create_batch(&self, body: &Value) -> Result<Value, SimError> {
        let input_file_id = body
            .get("input_file_id")
            .and_then(Value::as_str)
            .ok_or_else(|| SimError::bad_request("Missing required parameter: 'input_file_id'."))?;
        let endpoint = body
            .get("endpoint")
            .and_then(Value::as_str)
            .ok_or_else(|| SimError::bad_request("Missing required parameter: 'endpoint'."))?;
        if endpoint != crate::provider::openai::ENDPOINT {
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
        match inner.files.get(input_file_id) {
            None => return Err(SimError::not_found("file", input_file_id)),
            Some(f) if f.purpose != "batch" => {
                return Err(SimError::bad_request(format!(
                    "File {input_file_id} has purpose '{}', expected 'batch'.",
                    f.purpose
                )));
            }
            _ => {}
        }
        let id = self.next_id(&mut inner, "batch");
        let ordinal = inner.batches.len() as u32 + 1;
        let expires = ordinal <= self.settings.expire_first
            || draw(self.settings.seed, "expire", &id) < self.settings.expire_rate;
        let b = SimBatch {
            id: id.clone(),
            input_file_id: input_file_id.to_string(),
            endpoint: endpoint.to_string(),
            completion_window: window.to_string(),
            metadata,
            created_at: unix_now(),
            started: Instant::now(),
            status: Status::Validating,
            stamps: BTreeMap::new(),
            expires,
            cancel_at: None,
            done_fraction: 1.0,
            requests: Vec::new(),
            model: None,
            counts: (0, 0, 0),
            output_file_id: None,
            error_file_id: None,
            errors: Vec::new(),
            usage: Usage::default(),
        };
        let v = b.json();
        let idx = inner.batches.len();
        inner.batches.push(b);
        inner.batch_index.insert(id, idx);
        Ok(v)
    }

    pub(crate) fn get_batch(&self, id: &str) -> Result<Value, SimError> {
        let mut inner = self.lock();
        let idx = *inner
            .batch_index
            .get(id)
            .ok_or_else(|| SimError::not_found("batch", id))?;
        self.advance(&mut inner, idx);
        Ok(inner.batches[idx].json())
    }

    pub(crate) fn cancel_batch(&self, id: &str) -> Result<Value, SimError> {
        let mut inner = self.lock();
        let idx = *inner
            .batch_index
            .get(id)
            .ok_or_else(|| SimError::not_found("batch", id))?;
        self.advance(&mut inner, idx);
        let b = &mut inner.batches[idx];
        match b.status {
            Status::Cancelling | Status::Cancelled => {}
            s if s.terminal() => {
                return Err(SimError {
                    status: 409,
                    kind: "invalid_request_error",
                    code: None,
                    message: format!("Cannot cancel a batch with status '{}'.", s.as_str()),
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
        Ok(inner.batches[idx].json())
    }

    pub(crate) fn list_batches(&self, limit: usize, after: Option<&str>) -> Value {
        let mut inner = self.lock();
        for i in 0..inner.batches.len() {
            self.advance(&mut inner, i);
        }
        let order: Vec<usize> = (0..inner.batches.len()).rev().collect();
        let start = after
            .and_then(|a| {
                order
                    .iter()
                    .position(|&i| inner.batches[i].id == a)
                    .map(|p| p + 1)
            })
            .unwrap_or(0);
        let page: Vec<Value> = order
            .iter()
            .skip(start)
            .take(limit)
            .map(|&i| inner.batches[i].json())
            .collect();
        let has_more = start + page.len() < order.len();
        json!({
            "object": "list",
            "data": page,
            "first_id": page.first().map(|b| b["id"].clone()),
            "last_id": page.last().map(|b| b["id"].clone()),
            "has_more": has_more,
        })
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
                    (since >= 0.05 * t).then_some(Status::Cancelled)
                }
                _ => None,
            };
            let Some(next) = next else {
                if inner.batches[idx].status == Status::InProgress {
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
        let file = inner.files.get(&inner.batches[idx].input_file_id).cloned();
        let mut errors: Vec<Value> = Vec::new();
        let mut requests = Vec::new();
        let mut model: Option<String> = None;
        let mut seen = std::collections::HashSet::new();
        let push = |errors: &mut Vec<Value>, code: &str, msg: String, line: Option<usize>| {
            if errors.len() < 20 {
                errors.push(json!({"code": code, "message": msg, "param": null, "line": line}));
            }
        };
        match file.and_then(|f| std::fs::File::open(&f.path).ok()) {
            None => push(
                &mut errors,
                "invalid_request",
                "input file unavailable".into(),
                None,
            ),
            Some(f) => {
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
                    let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                        push(
                            &mut errors,
                            "invalid_json_line",
                            format!("Line {n} is not valid JSON."),
                            Some(n),
                        );
                        continue;
                    };
                    let cid = v.get("custom_id").and_then(Value::as_str).unwrap_or("");
                    if cid.is_empty() {
                        push(
                            &mut errors,
                            "invalid_request",
                            format!("Line {n} has no custom_id."),
                            Some(n),
                        );
                        continue;
                    }
                    if !seen.insert(cid.to_string()) {
                        push(
                            &mut errors,
                            "duplicate_custom_id",
                            format!("The custom_id '{cid}' appears more than once."),
                            Some(n),
                        );
                    }
                    if v.get("method").and_then(Value::as_str) != Some("POST") {
                        push(
                            &mut errors,
                            "invalid_request",
                            format!("Line {n}: method must be POST."),
                            Some(n),
                        );
                    }
                    if v.get("url").and_then(Value::as_str)
                        != Some(inner.batches[idx].endpoint.as_str())
                    {
                        push(
                            &mut errors,
                            "url_mismatch",
                            format!("Line {n}: url does not match the batch endpoint."),
                            Some(n),
                        );
                    }
                    let body = v.get("body").cloned().unwrap_or(Value::Null);
                    let m = body.get("model").and_then(Value::as_str).unwrap_or("");
                    match &model {
                        None => {
                            if self.prices.lookup("openai", m).is_err() {
                                push(
                                    &mut errors,
                                    "model_not_found",
                                    format!("The model '{m}' does not exist."),
                                    Some(n),
                                );
                            }
                            model = Some(m.to_string());
                        }
                        Some(first) if first != m => push(
                            &mut errors,
                            "model_mismatch",
                            format!("Line {n} uses model '{m}', the batch uses '{first}'."),
                            Some(n),
                        ),
                        _ => {}
                    }
                    requests.push(RecordedRequest {
                        custom_id: cid.to_string(),
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
        if requests.len() > MAX_REQUESTS {
            push(
                &mut errors,
                "too_many_tasks",
                format!(
                    "The batch has {} requests; the limit is {MAX_REQUESTS}.",
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

    /// Runs the requests (those that got to run) and writes the output and error files.
    fn materialize(&self, inner: &mut Inner, idx: usize, status: Status, stamp: &'static str) {
        let input = inner
            .files
            .get(&inner.batches[idx].input_file_id)
            .map(|f| f.path.clone());
        let batch_id = inner.batches[idx].id.clone();
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
        if let Some(f) = input.and_then(|p| std::fs::File::open(p).ok()) {
            let mut i = 0usize;
            for line in BufReader::new(f).split(b'\n').map_while(Result::ok) {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                let cid = v
                    .get("custom_id")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let ran = i < done_n;
                i += 1;
                if !ran {
                    let (code, msg, outcome) = if status == Status::Cancelled {
                        (
                            "batch_cancelled",
                            "This request was cancelled before it ran.",
                            Outcome::Cancelled,
                        )
                    } else {
                        (
                            "batch_expired",
                            "This request could not be executed before the completion window expired.",
                            Outcome::Expired,
                        )
                    };
                    err_lines.push(json!({"id": format!("batch_req_{}", short(&cid)), "custom_id": cid, "response": null, "error": {"code": code, "message": msg}}).to_string());
                    outcomes.push(outcome);
                    continue;
                }
                if draw(self.settings.seed, "missing", &cid) < self.settings.missing_line_rate {
                    outcomes.push(Outcome::Missing);
                    continue;
                }
                let body = v.get("body").cloned().unwrap_or(Value::Null);
                let (line_json, outcome, usage) = self.answer(&cid, &body);
                let twice =
                    draw(self.settings.seed, "duplicate", &cid) < self.settings.duplicate_line_rate;
                if let Some(u) = usage {
                    let model = body
                        .get("model")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    let cost = self
                        .prices
                        .lookup("openai", &model)
                        .ok()
                        .and_then(|p| p.rates(PricingMode::Batch).copied())
                        .map(|r| r.cost(&u))
                        .unwrap_or(Usd::ZERO);
                    usage_total.add(&u);
                    bill.push(BillEntry {
                        custom_id: cid.clone(),
                        batch_id: batch_id.clone(),
                        model,
                        pricing_mode: "batch",
                        input_tokens: u.input_tokens,
                        cached_input_tokens: u.cached_input_tokens,
                        cache_write_tokens: u.cache_write_tokens,
                        output_tokens: u.output_tokens,
                        reasoning_tokens: u.reasoning_tokens,
                        cost_usd: cost.to_decimal_string(),
                        cost,
                    });
                }
                let lines = if outcome == Outcome::Error {
                    &mut err_lines
                } else {
                    &mut out_lines
                };
                if twice {
                    lines.push(line_json.clone());
                }
                lines.push(line_json);
                outcomes.push(outcome);
            }
        }
        for n in 0..self.settings.unknown_lines {
            let cid = format!("unknown-{}-{n}", short(&batch_id));
            err_lines.push(json!({"id": format!("batch_req_{}", short(&cid)), "custom_id": cid, "response": {"status_code": 500, "request_id": "req_x", "body": {"error": {"message": "stray line", "type": "server_error", "param": null, "code": null}}}, "error": null}).to_string());
        }
        // Lines come back in no particular order.
        let seed = self.settings.seed ^ 0x5eed;
        shuffle(&mut out_lines, seed);
        shuffle(&mut err_lines, seed.rotate_left(7));
        let completed = out_lines.len() as u64;
        let failed = err_lines.len() as u64;
        let out_id = (!out_lines.is_empty())
            .then(|| self.write_output(inner, &batch_id, "output", &out_lines));
        let err_id = (!err_lines.is_empty())
            .then(|| self.write_output(inner, &batch_id, "error", &err_lines));
        let b = &mut inner.batches[idx];
        for (r, o) in b.requests.iter_mut().zip(outcomes) {
            r.outcome = o;
        }
        b.status = status;
        b.stamps.insert(stamp, unix_now());
        b.output_file_id = out_id;
        b.error_file_id = err_id;
        b.counts = (b.counts.0, completed, failed);
        b.usage = usage_total;
        inner.bill.extend(bill);
    }

    fn write_output(
        &self,
        inner: &mut Inner,
        batch_id: &str,
        kind: &str,
        lines: &[String],
    ) -> String {
        inner.seq += 1;
        let path = self.dir.path().join(format!("f{}", inner.seq));
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
        let id = self.next_id(inner, "file");
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

    /// Answers one request: the output line, its outcome and the billed usage.
    fn answer(&self, cid: &str, body: &Value) -> (String, Outcome, Option<Usage>) {
        let s = &self.settings;
        let req_id = short(cid);
        if draw(s.seed, "fail", cid) < s.fail_rate {
            let line = json!({
                "id": format!("batch_req_{req_id}"), "custom_id": cid,
                "response": {"status_code": 500, "request_id": format!("req_{req_id}"),
                    "body": {"error": {"message": "The server had an error while processing your request.", "type": "server_error", "param": null, "code": null}}},
                "error": null
            });
            return (line.to_string(), Outcome::Error, None);
        }
        let model = body.get("model").and_then(Value::as_str).unwrap_or("");
        let tok = Tokenizer::for_model(model);
        let messages: Vec<(&str, &str)> = body
            .get("messages")
            .and_then(Value::as_array)
            .map(|ms| {
                ms.iter()
                    .map(|m| {
                        (
                            m.get("role").and_then(Value::as_str).unwrap_or(""),
                            m.get("content").and_then(Value::as_str).unwrap_or(""),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let rf = body.get("response_format").map(|v| v.to_string());
        let prompt_tokens = tok.chat_prompt_tokens(messages.iter().copied(), rf.as_deref());
        let max_tokens = body
            .get("max_completion_tokens")
            .or_else(|| body.get("max_tokens"))
            .and_then(Value::as_u64)
            .unwrap_or(4096);
        let schema = body
            .pointer("/response_format/json_schema/schema")
            .cloned()
            .unwrap_or(json!({"type": "object", "properties": {"answer": {"type": "string"}}}));
        let body_hash = Sha256::digest(body.to_string().as_bytes());
        let mut rng = answer::Rng::new(u64::from_le_bytes(body_hash[..8].try_into().expect("8")));
        let value = answer::generate(&schema, &schema, &mut rng);
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
        let mut visible = tok.count(&content);
        let reasoning = if s.answer_at_max_tokens {
            max_tokens.saturating_sub(visible)
        } else if is_reasoning_model(model) {
            16 + (u64::from(body_hash[9]) % 48)
        } else {
            0
        };
        let mut finish = "stop";
        if reasoning + visible > max_tokens {
            let room = max_tokens.saturating_sub(reasoning);
            content = tok.truncate(&content, room);
            visible = tok.count(&content);
            finish = "length";
        }
        let reasoning = reasoning.min(max_tokens);
        let cached = if draw(s.seed, "cache", cid) < s.cache_rate {
            prompt_tokens / 2
        } else {
            0
        };
        let usage = Usage {
            input_tokens: prompt_tokens,
            cached_input_tokens: cached,
            cache_write_tokens: 0,
            output_tokens: visible + reasoning,
            reasoning_tokens: reasoning,
        };
        let line = json!({
            "id": format!("batch_req_{req_id}"), "custom_id": cid,
            "response": {"status_code": 200, "request_id": format!("req_{req_id}"), "body": {
                "id": format!("chatcmpl-{req_id}"), "object": "chat.completion", "created": unix_now(),
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": null, "annotations": []}, "logprobs": null, "finish_reason": finish}],
                "usage": {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens,
                    "total_tokens": usage.input_tokens + usage.output_tokens,
                    "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens, "audio_tokens": 0},
                    "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}},
                "service_tier": "default", "system_fingerprint": "fp_sim"}},
            "error": null
        });
        let outcome = if invalid {
            Outcome::InvalidJson
        } else {
            Outcome::Ok
        };
        (line.to_string(), outcome, Some(usage))
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
                    "status": b.status.as_str(),
                    "local_id": b.metadata.as_ref().and_then(|m| m.get(crate::provider::openai::META_BATCH_ID)).cloned(),
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
            "uploads": inner.uploads,
            "bill": {
                "per_custom_id": inner.bill,
                "per_model": models,
                "totals": {"requests": inner.bill.len(), "tokens": usage_json(&total.0), "cost_usd": total.1.to_decimal_string()},
            }
        })
    }
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

    #[test]
    fn reasoning_models_are_recognised() {
        assert!(is_reasoning_model("gpt-5.4-mini"));
        assert!(is_reasoning_model("o4-mini"));
        assert!(!is_reasoning_model("gpt-4o-mini"));
        assert!(!is_reasoning_model("omni"));
    }
}
