//! Anthropic's wire format in the simulator (docs/providers.md §3): message-batch objects,
//! `POST /v1/messages/batches` with its requests inline, the results file, reading a Messages
//! request, messages (the forced tool's input) and result lines, errors, the credentials it
//! expects, and its HTTP routes (`/v1/messages/batches`, `/v1/messages`).

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::Sim;
use super::data::{Outcome, RecordedRequest, SimBatch, Status};
use super::http::{
    AppState, BatchListQuery, blocking, cancel_any, created, get_batch_any, has_bearer, has_header,
    list_any, online_any, stream_file,
};
use super::types::{self, Neutral, ProviderKind, Reply, SimError, default_schema, str_at};
use crate::cost::Usage;
use crate::cost::tokens::Tokenizer;

// ------------------------------------------------------------------ objects -------------------

/// A batch's `processing_status`.
fn processing_status(s: Status) -> &'static str {
    match s {
        Status::Cancelling => "canceling",
        s if s.terminal() => "ended",
        _ => "in_progress",
    }
}

/// A message-batch object; `base` is the simulator's root URL (for `results_url`).
pub(super) fn batch_json(b: &SimBatch, base: &str) -> Value {
    let stamp = |k: &str| b.stamps.get(k).copied();
    let ended = b.status.terminal();
    // Counts move all at once, when the batch ends.
    let mut c = json!({"processing": b.requests.len(), "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0});
    if ended {
        let n = |o: &[Outcome]| b.requests.iter().filter(|r| o.contains(&r.outcome)).count();
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
        "id": b.id,
        "type": "message_batch",
        "processing_status": processing_status(b.status),
        "request_counts": c,
        "created_at": types::rfc3339(b.created_at),
        "expires_at": types::rfc3339(b.created_at + 86_400),
        "ended_at": end.map(types::rfc3339),
        "cancel_initiated_at": stamp("cancelling_at").map(types::rfc3339),
        "archived_at": null,
        "results_url": ended.then(|| format!("{base}/v1/messages/batches/{}/results", b.id)),
    })
}

/// A page of message-batch objects, newest first.
pub(super) fn batch_list(
    page: Vec<Value>,
    has_more: bool,
    first: Option<String>,
    last: Option<String>,
) -> Value {
    json!({"data": page, "has_more": has_more, "first_id": first, "last_id": last})
}

impl Sim {
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
        let mut b = self.new_batch(&mut inner, "msgbatch", ProviderKind::Anthropic, name);
        b.counts = (recorded.len() as u64, 0, 0);
        b.requests = recorded;
        b.status = Status::InProgress;
        self.push_batch(&mut inner, b)
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
}

// ------------------------------------------------------------------ requests and answers ------

/// Reads a Messages request body.
pub(super) fn neutral(body: &Value) -> Neutral {
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let tok = Tokenizer::for_model(&model);
    let mut messages: Vec<(&str, &str)> = Vec::new();
    if let Some(s) = body.get("system").and_then(Value::as_str) {
        messages.push(("system", s));
    }
    for m in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        messages.push((str_at(m, "/role"), str_at(m, "/content")));
    }
    let tools = body.get("tools").map(|t| t.to_string());
    Neutral {
        prompt_tokens: tok.chat_prompt_tokens(messages, tools.as_deref()),
        schema: body
            .pointer("/tools/0/input_schema")
            .cloned()
            .unwrap_or_else(default_schema),
        max_tokens: body
            .get("max_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(1024),
        tokenizer: tok,
        model,
    }
}

/// The tool name nightshift's Anthropic requests force (read back from the request).
pub(super) fn tool(body: &Value) -> String {
    str_at(body, "/tool_choice/name").to_string()
}

/// The usage object of an answer.
fn usage_json(u: &Usage) -> Value {
    json!({
        "input_tokens": u.input_tokens - u.cached_input_tokens - u.cache_write_tokens,
        "cache_creation_input_tokens": u.cache_write_tokens,
        "cache_read_input_tokens": u.cached_input_tokens,
        "output_tokens": u.output_tokens,
        "service_tier": "batch",
    })
}

/// A message answering with the forced tool `tool`.
pub(super) fn answer_body(
    id: &str,
    model: &str,
    tool: &str,
    content: &str,
    truncated: bool,
    usage: &Usage,
) -> Value {
    // A structured answer comes back as the forced tool's input; anything that is not
    // a JSON object comes back as text (what a model that ignored the tool returns).
    let block = match serde_json::from_str::<Value>(content) {
        Ok(v @ Value::Object(_)) if !truncated => {
            json!({"type": "tool_use", "id": format!("toolu_{id}"), "name": tool, "input": v})
        }
        _ => json!({"type": "text", "text": content}),
    };
    json!({
        "id": format!("msg_{id}"), "type": "message", "role": "assistant", "model": model,
        "content": [block],
        "stop_reason": if truncated { "max_tokens" } else { "tool_use" },
        "stop_sequence": null,
        "usage": usage_json(usage),
    })
}

/// One line of a results file.
pub(super) fn result_line(
    custom_id: &str,
    id: &str,
    model: &str,
    tool: &str,
    reply: &Reply,
) -> Value {
    let result = match reply {
        Reply::Answer {
            content,
            truncated,
            usage,
        } => {
            json!({"type": "succeeded", "message": answer_body(id, model, tool, content, *truncated, usage)})
        }
        Reply::Error => json!({"type": "errored", "error": {"type": "error",
            "error": {"type": "api_error", "message": "Internal server error"}, "request_id": format!("req_{id}")}}),
        Reply::Expired => json!({"type": "expired"}),
        Reply::Cancelled => json!({"type": "canceled"}),
    };
    json!({"custom_id": custom_id, "result": result})
}

/// The body of an online request that failed on the server.
pub(super) fn server_error() -> Value {
    json!({"type": "error", "error": {"type": "api_error", "message": "Internal server error"}})
}

/// An error's `type`, by its HTTP status.
fn error_type(status: u16, kind: &str) -> &'static str {
    match status {
        401 => "authentication_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        500..=599 => "api_error",
        _ if kind == "not_found_error" => "not_found_error",
        _ => "invalid_request_error",
    }
}

/// An error body.
pub(super) fn error_body(e: &SimError) -> Value {
    json!({"type": "error", "error": {"type": error_type(e.status, e.kind), "message": e.message}})
}

// ------------------------------------------------------------------ HTTP ----------------------

/// Anthropic's refusal of a call without a key or without `anthropic-version`: status and
/// message.
pub(super) fn refuse_key(h: &HeaderMap) -> Option<(u16, &'static str)> {
    if !has_header(h, "x-api-key") && !has_bearer(h) {
        return Some((401, "x-api-key header is required"));
    }
    if !has_header(h, "anthropic-version") {
        return Some((400, "anthropic-version: header is required"));
    }
    None
}

/// Anthropic's routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/messages/batches",
            post(create_anthropic).get(list_anthropic),
        )
        .route(
            "/v1/messages/batches/{id}",
            get(get_batch_anthropic).delete(delete_anthropic),
        )
        .route("/v1/messages/batches/{id}/cancel", post(cancel_anthropic))
        .route("/v1/messages/batches/{id}/results", get(results_anthropic))
        .route("/v1/messages", post(online_anthropic))
}

async fn create_anthropic(State(st): State<AppState>, body: bytes::Bytes) -> Response {
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return SimError::bad_request(format!("invalid JSON body: {e}"))
                .into_flavored(ProviderKind::Anthropic);
        }
    };
    let sim = st.sim.clone();
    match blocking(move || sim.create_anthropic_batch(&v)).await {
        Ok(batch) => created(&st, batch, ProviderKind::Anthropic),
        Err(e) => e.into_flavored(ProviderKind::Anthropic),
    }
}

async fn list_anthropic(State(st): State<AppState>, Query(q): Query<BatchListQuery>) -> Response {
    match list_any(st, ProviderKind::Anthropic, q).await {
        Ok(v) => v.into_response(),
        Err(e) => e.into_flavored(ProviderKind::Anthropic),
    }
}

async fn get_batch_anthropic(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    get_batch_any(st, ProviderKind::Anthropic, id).await
}

async fn cancel_anthropic(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    cancel_any(st, ProviderKind::Anthropic, id).await
}

async fn delete_anthropic(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    let sim = st.sim.clone();
    let lookup = id.clone();
    match blocking(move || sim.delete_batch(&lookup)).await {
        Ok(()) => Json(json!({"id": id, "type": "message_batch_deleted"})).into_response(),
        Err(e) => e.into_flavored(ProviderKind::Anthropic),
    }
}

async fn results_anthropic(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    let sim = st.sim.clone();
    let lookup = id.clone();
    match blocking(move || sim.results_path(&lookup)).await {
        Ok(path) => match stream_file(&st, &id, path).await {
            Ok(r) => r,
            Err(e) => e.into_flavored(ProviderKind::Anthropic),
        },
        Err(e) => e.into_flavored(ProviderKind::Anthropic),
    }
}

async fn online_anthropic(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    online_any(st, ProviderKind::Anthropic, headers, body).await
}
