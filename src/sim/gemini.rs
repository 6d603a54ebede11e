//! Google Gemini's wire format in the simulator (docs/providers.md §4): file objects and
//! batch operations (the lagging output reference of a SUCCEEDED batch), `POST
//! /v1beta/models/{model}:batchGenerateContent` with a file or inline requests, inline
//! results, reading a generateContent request, responses and result lines, errors (Google's
//! `status` names and `RetryInfo`), the credentials it expects, and its HTTP routes
//! (`/v1beta/...`, the resumable `/upload/v1beta/files`, `/download/v1beta/files`).

use std::io::Write;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::Sim;
use super::data::{SimBatch, SimFile, Status};
use super::http::{
    AppState, BatchListQuery, Sink, blocking, created, get_batch_any, has_header, list_any,
    stream_file,
};
use super::types::{self, Neutral, ProviderKind, Reply, SimError, default_schema, str_at};
use crate::cost::Usage;
use crate::cost::tokens::Tokenizer;
use crate::util::time::unix_now;

// ------------------------------------------------------------------ objects -------------------

/// A file object.
pub(super) fn file_json(f: &SimFile) -> Value {
    json!({
        "name": f.id, "displayName": f.filename, "mimeType": "application/jsonl",
        "sizeBytes": f.bytes.to_string(), "createTime": types::rfc3339(f.created_at),
        "state": "ACTIVE", "source": if f.purpose == "batch" { "UPLOADED" } else { "GENERATED" },
    })
}

/// A page of file objects; `next` is the page token of the next page, if any.
pub(super) fn file_list(page: Vec<Value>, next: Option<&str>) -> Value {
    let mut v = json!({"files": page});
    if let Some(next) = next {
        v["nextPageToken"] = json!(next);
    }
    v
}

/// A batch's `state`.
fn state(s: Status) -> &'static str {
    match s {
        Status::Validating => "BATCH_STATE_PENDING",
        Status::InProgress | Status::Finalizing => "BATCH_STATE_RUNNING",
        Status::Completed => "BATCH_STATE_SUCCEEDED",
        Status::Failed => "BATCH_STATE_FAILED",
        Status::Expired => "BATCH_STATE_EXPIRED",
        Status::Cancelling | Status::Cancelled => "BATCH_STATE_CANCELLED",
    }
}

/// A batch operation. Rendering it counts down the lagging output reference of a
/// SUCCEEDED batch (`output_lag`).
pub(super) fn batch_json(b: &mut SimBatch) -> Value {
    let done = b.status.terminal();
    let mut output = Value::Null;
    if b.status == Status::Completed && b.output_lag > 0 {
        // SUCCEEDED, but the output reference is not there yet.
        b.output_lag -= 1;
    } else if matches!(b.status, Status::Completed | Status::Cancelled) {
        output = match (&b.inline_output, &b.output_file_id) {
            (Some(lines), _) => {
                json!({"inlinedResponses": {"inlinedResponses": lines}})
            }
            (None, Some(f)) => json!({"responsesFile": f}),
            _ => Value::Null,
        };
    }
    let total = b.requests.len() as u64;
    let pending = total.saturating_sub(b.counts.1 + b.counts.2);
    let stats = json!({
        "requestCount": total.to_string(),
        "successfulRequestCount": b.counts.1.to_string(),
        "failedRequestCount": b.counts.2.to_string(),
        "pendingRequestCount": if done { "0".to_string() } else { pending.to_string() },
    });
    let mut metadata = json!({
        "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch",
        "model": format!("models/{}", b.url_model.clone().unwrap_or_default()),
        "name": b.id,
        "displayName": b.display_name,
        "createTime": types::rfc3339(b.created_at),
        "updateTime": types::rfc3339(unix_now()),
        "batchStats": stats,
        "state": state(b.status),
        "priority": "0",
    });
    let mut op = json!({"name": b.id, "metadata": metadata.clone(), "done": done});
    if !output.is_null() {
        metadata["output"] = output.clone();
        op["metadata"] = metadata;
        let mut response = output;
        response["@type"] = json!(
            "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatchOutput"
        );
        op["response"] = response;
    }
    if b.status == Status::Failed {
        op["error"] = json!({"code": 3, "message": b.errors.first().and_then(|e| e["message"].as_str()).unwrap_or("the batch failed")});
    }
    if done {
        op["metadata"]["endTime"] = json!(types::rfc3339(unix_now()));
    }
    op
}

/// A page of batch operations, newest first; `last` is the next page's token.
pub(super) fn batch_list(page: Vec<Value>, has_more: bool, last: Option<String>) -> Value {
    let mut v = json!({"operations": page});
    if has_more {
        v["nextPageToken"] = json!(last);
    }
    v
}

impl Sim {
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
        let mut b = self.new_batch(&mut inner, "gemini-batch", ProviderKind::Gemini, input);
        b.input_file_id = input_file_id;
        b.display_name = display;
        b.url_model = Some(model.trim_start_matches("models/").to_string());
        b.inline = is_inline;
        self.push_batch(&mut inner, b)
    }
}

/// A batch's inline results: its result lines, each with its key moved into `metadata`.
pub(super) fn inline_items(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|mut v| {
            let key = v["key"].take();
            let mut item = v;
            item.as_object_mut().map(|o| o.remove("key"));
            item["metadata"] = json!({"key": key});
            item
        })
        .collect()
}

// ------------------------------------------------------------------ requests and answers ------

/// Reads a generateContent request body; the model is the one named in the URL.
pub(super) fn neutral(body: &Value, model: Option<&str>) -> Neutral {
    let model = model
        .map(|m| m.trim_start_matches("models/").to_string())
        .unwrap_or_default();
    let tok = Tokenizer::for_model(&model);
    let mut messages: Vec<(&str, &str)> = Vec::new();
    let sys = str_at(body, "/systemInstruction/parts/0/text");
    if body.get("systemInstruction").is_some() {
        messages.push(("system", sys));
    }
    for c in body
        .get("contents")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        messages.push((str_at(c, "/role"), str_at(c, "/parts/0/text")));
    }
    let schema = body
        .pointer("/generationConfig/responseJsonSchema")
        .cloned();
    let schema_text = schema.as_ref().map(|s| s.to_string());
    Neutral {
        prompt_tokens: tok.chat_prompt_tokens(messages, schema_text.as_deref()),
        schema: schema.unwrap_or_else(default_schema),
        max_tokens: body
            .pointer("/generationConfig/maxOutputTokens")
            .and_then(Value::as_u64)
            .unwrap_or(8192),
        tokenizer: tok,
        model,
    }
}

/// The usage metadata of an answer.
fn usage_json(u: &Usage) -> Value {
    json!({
        "promptTokenCount": u.input_tokens,
        "cachedContentTokenCount": u.cached_input_tokens,
        "candidatesTokenCount": u.output_tokens - u.reasoning_tokens,
        "thoughtsTokenCount": u.reasoning_tokens,
        "totalTokenCount": u.input_tokens + u.output_tokens,
    })
}

/// A generateContent response.
pub(super) fn answer_body(
    id: &str,
    model: &str,
    content: &str,
    truncated: bool,
    usage: &Usage,
) -> Value {
    json!({
        "candidates": [{"content": {"parts": [{"text": content}], "role": "model"},
            "finishReason": if truncated { "MAX_TOKENS" } else { "STOP" }, "index": 0}],
        "usageMetadata": usage_json(usage),
        "modelVersion": model,
        "responseId": id,
    })
}

/// One line of a responses file (or one inline response, before its key is moved).
pub(super) fn result_line(custom_id: &str, id: &str, model: &str, reply: &Reply) -> Value {
    match reply {
        Reply::Answer {
            content,
            truncated,
            usage,
        } => {
            json!({"key": custom_id, "response": answer_body(id, model, content, *truncated, usage)})
        }
        Reply::Error => {
            json!({"key": custom_id, "error": {"code": 500, "message": "Internal error encountered.", "status": "INTERNAL"}})
        }
        Reply::Expired | Reply::Cancelled => {
            json!({"key": custom_id, "error": {"code": 499, "message": "The operation was cancelled.", "status": "CANCELLED"}})
        }
    }
}

/// Google's `status` name of an HTTP status.
fn status_name(status: u16) -> &'static str {
    match status {
        400 => "INVALID_ARGUMENT",
        401 | 403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        _ => "INTERNAL",
    }
}

/// An error body.
pub(super) fn error_body(e: &SimError) -> Value {
    json!({"error": {"code": e.status, "message": e.message, "status": status_name(e.status)}})
}

/// The body of a 429, with the delay in a `RetryInfo` (Google sends no `retry-after`).
pub(super) fn rate_limited(ms: u64) -> Value {
    json!({"error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).", "status": "RESOURCE_EXHAUSTED",
        "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": format!("{:.3}s", ms as f64 / 1000.0)}]}})
}

// ------------------------------------------------------------------ HTTP ----------------------

/// Google's refusal of a call without a key: status and message.
pub(super) fn refuse_key(h: &HeaderMap, query: &str) -> Option<(u16, &'static str)> {
    (!has_header(h, "x-goog-api-key") && !query.contains("key=")).then_some((
        403,
        "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
    ))
}

/// Gemini's routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1beta/models/{action}", post(create_gemini))
        .route("/v1beta/batches", get(list_gemini))
        .route(
            "/v1beta/batches/{id}",
            get(get_batch_gemini).post(cancel_gemini),
        )
        .route("/v1beta/files", get(list_files_gemini))
        .route(
            "/v1beta/files/{id}",
            get(get_file_gemini).delete(delete_file_gemini),
        )
        .route("/upload/v1beta/files", post(upload_gemini_start))
        .route(
            "/upload/v1beta/files/session/{token}",
            post(upload_gemini_bytes),
        )
        .route("/download/v1beta/files/{action}", get(download_gemini))
}

async fn create_gemini(
    State(st): State<AppState>,
    Path(action): Path<String>,
    body: bytes::Bytes,
) -> Response {
    let Some(model) = action.strip_suffix(":batchGenerateContent") else {
        return SimError::not_found("method", &action).into_flavored(ProviderKind::Gemini);
    };
    let model = model.to_string();
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return SimError::bad_request(format!("Invalid JSON payload received. {e}"))
                .into_flavored(ProviderKind::Gemini);
        }
    };
    let sim = st.sim.clone();
    match blocking(move || sim.create_gemini_batch(&model, &v)).await {
        Ok(batch) => created(&st, batch, ProviderKind::Gemini),
        Err(e) => e.into_flavored(ProviderKind::Gemini),
    }
}

async fn list_gemini(State(st): State<AppState>, Query(q): Query<BatchListQuery>) -> Response {
    match list_any(st, ProviderKind::Gemini, q).await {
        Ok(v) => v.into_response(),
        Err(e) => e.into_flavored(ProviderKind::Gemini),
    }
}

async fn get_batch_gemini(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    get_batch_any(st, ProviderKind::Gemini, format!("batches/{id}")).await
}

async fn cancel_gemini(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    let Some(id) = id.strip_suffix(":cancel") else {
        return SimError::not_found("method", &id).into_flavored(ProviderKind::Gemini);
    };
    let sim = st.sim.clone();
    let id = format!("batches/{id}");
    match blocking(move || sim.cancel_batch(&id)).await {
        Ok(_) => Json(json!({})).into_response(),
        Err(e) => e.into_flavored(ProviderKind::Gemini),
    }
}

async fn list_files_gemini(
    State(st): State<AppState>,
    Query(q): Query<BatchListQuery>,
) -> Result<Json<Value>, SimError> {
    let sim = st.sim.clone();
    blocking(move || {
        Ok(Json(sim.list_files(
            ProviderKind::Gemini,
            None,
            true,
            q.page_size.unwrap_or(100).clamp(1, 100),
            q.page_token.as_deref(),
        )))
    })
    .await
}

async fn get_file_gemini(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    match st.sim.file(ProviderKind::Gemini, &format!("files/{id}")) {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_flavored(ProviderKind::Gemini),
    }
}

async fn delete_file_gemini(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    let sim = st.sim.clone();
    match blocking(move || sim.delete_file(&format!("files/{id}"))).await {
        Ok(_) => Json(json!({})).into_response(),
        Err(e) => e.into_flavored(ProviderKind::Gemini),
    }
}

/// Resumable upload, step 1: returns the session URL in `x-goog-upload-url`.
async fn upload_gemini_start(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    let is_start = headers
        .get("x-goog-upload-command")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.contains("start"));
    if !is_start {
        return SimError::bad_request("X-Goog-Upload-Command: start is required")
            .into_flavored(ProviderKind::Gemini);
    }
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let name = v
        .pointer("/file/display_name")
        .or_else(|| v.pointer("/file/displayName"))
        .and_then(Value::as_str)
        .unwrap_or("upload.jsonl")
        .to_string();
    let token = st.sim.start_session(name);
    let mut resp = Json(json!({})).into_response();
    let url = format!("{}/upload/v1beta/files/session/{token}", st.sim.base());
    if let Ok(v) = HeaderValue::from_str(&url) {
        resp.headers_mut().insert("x-goog-upload-url", v);
    }
    resp.headers_mut()
        .insert("x-goog-upload-status", HeaderValue::from_static("active"));
    resp
}

/// Resumable upload, step 2: the bytes, `upload, finalize`.
async fn upload_gemini_bytes(
    State(st): State<AppState>,
    Path(token): Path<String>,
    body: Body,
) -> Response {
    let Some(name) = st.sim.take_session(&token) else {
        return SimError::not_found("upload session", &token).into_flavored(ProviderKind::Gemini);
    };
    let path = st.sim.new_file_path();
    let written = async {
        use futures_util::StreamExt;
        let mut stream = body.into_data_stream();
        let mut sink = Sink::create(&path).await?;
        while let Some(c) = stream.next().await {
            let c = c.map_err(|e| SimError::bad_request(format!("upload interrupted: {e}")))?;
            sink.write(&c).await?;
        }
        sink.finish().await
    }
    .await;
    match written {
        Ok((n, sha)) => {
            let sim = st.sim.clone();
            let add =
                move || sim.add_file(ProviderKind::Gemini, name, "batch".into(), path, n, sha);
            let file = match blocking(add).await {
                Ok(f) => f,
                Err(e) => return e.into_flavored(ProviderKind::Gemini),
            };
            let mut resp = Json(json!({"file": file})).into_response();
            resp.headers_mut()
                .insert("x-goog-upload-status", HeaderValue::from_static("final"));
            resp
        }
        Err(e) => e.into_flavored(ProviderKind::Gemini),
    }
}

async fn download_gemini(State(st): State<AppState>, Path(action): Path<String>) -> Response {
    let id = format!("files/{}", action.trim_end_matches(":download"));
    let path = match st.sim.file_path(&id) {
        Ok(p) => p,
        Err(e) => return e.into_flavored(ProviderKind::Gemini),
    };
    match stream_file(&st, &id, path).await {
        Ok(r) => r,
        Err(e) => e.into_flavored(ProviderKind::Gemini),
    }
}
