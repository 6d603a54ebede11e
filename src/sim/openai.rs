//! OpenAI's and Azure OpenAI's wire format in the simulator (docs/providers.md §1, §2): file
//! and batch objects (Azure's capitalised statuses and RFC 3339 times), `POST /batches`,
//! reading a chat-completions request, chat completions and result lines, errors, the
//! credentials each expects, and their HTTP routes (`/v1/...`, `/openai/...`).

use axum::extract::{Multipart, Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Sim;
use super::data::{SimBatch, SimFile, Status};
use super::http::{
    AppState, BatchListQuery, Sink, blocking, cancel_any, created, get_batch_any, has_bearer,
    has_header, list_any, online_any, stream_file,
};
use super::types::{self, Neutral, ProviderKind, Reply, SimError, default_schema, str_at};
use crate::cost::Usage;
use crate::cost::tokens::Tokenizer;

// ------------------------------------------------------------------ objects -------------------

/// A file object.
pub(super) fn file_json(f: &SimFile) -> Value {
    json!({
        "id": f.id, "object": "file", "bytes": f.bytes, "created_at": f.created_at,
        "filename": f.filename, "purpose": f.purpose, "status": "processed",
        "expires_at": null, "status_details": null
    })
}

/// A page of file objects.
pub(super) fn file_list(page: Vec<Value>, has_more: bool) -> Value {
    json!({
        "object": "list",
        "data": page,
        "first_id": page.first().map(|f| f["id"].clone()),
        "last_id": page.last().map(|f| f["id"].clone()),
        "has_more": has_more,
    })
}

/// Azure's batch status: OpenAI's, capitalised.
fn azure_status(s: Status) -> &'static str {
    match s {
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

/// A batch object (OpenAI or Azure, after the batch's flavor).
pub(super) fn batch_json(b: &SimBatch) -> Value {
    let stamp = |k: &str| b.stamps.get(k).copied();
    let azure = b.flavor == ProviderKind::Azure;
    let usage_visible = b.status.terminal() && b.status != Status::Failed;
    let time = |t: Option<i64>| -> Value {
        match t {
            None => Value::Null,
            Some(t) if azure => Value::String(types::rfc3339(t)),
            Some(t) => json!(t),
        }
    };
    let counts = if azure && b.status == Status::Validating {
        json!({"total": null, "completed": null, "failed": null})
    } else {
        json!({"total": b.counts.0, "completed": b.counts.1, "failed": b.counts.2})
    };
    json!({
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "model": b.model,
        "errors": if b.errors.is_empty() { Value::Null } else { json!({"object": "list", "data": b.errors}) },
        "input_file_id": b.input_file_id,
        "completion_window": "24h",
        "status": if azure { azure_status(b.status) } else { b.status.as_str() },
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": time(Some(b.created_at)),
        "in_progress_at": time(stamp("in_progress_at")),
        "expires_at": time(Some(b.created_at + 86_400)),
        "finalizing_at": time(stamp("finalizing_at")),
        "completed_at": time(stamp("completed_at")),
        "failed_at": time(stamp("failed_at")),
        "expired_at": time(stamp("expired_at")),
        "cancelling_at": time(stamp("cancelling_at")),
        "cancelled_at": time(stamp("cancelled_at")),
        "request_counts": counts,
        "metadata": b.metadata,
        "usage": if usage_visible && !azure { json!({
            "input_tokens": b.usage.input_tokens,
            "input_tokens_details": {"cached_tokens": b.usage.cached_input_tokens},
            "output_tokens": b.usage.output_tokens,
            "output_tokens_details": {"reasoning_tokens": b.usage.reasoning_tokens},
            "total_tokens": b.usage.input_tokens + b.usage.output_tokens,
        }) } else { Value::Null },
    })
}

/// A page of batch objects, newest first.
pub(super) fn batch_list(
    page: Vec<Value>,
    has_more: bool,
    first: Option<String>,
    last: Option<String>,
) -> Value {
    json!({"object": "list", "data": page, "first_id": first, "last_id": last, "has_more": has_more})
}

impl Sim {
    /// OpenAI / Azure `POST /batches`.
    pub(crate) fn create_openai_batch(
        &self,
        flavor: ProviderKind,
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
        let kind = if flavor == ProviderKind::Azure {
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
}

/// What is wrong with input line `n` (`v`) of a batch for `endpoint`, beyond what every
/// provider checks: its method and its url.
pub(super) fn line_errors(n: usize, v: &Value, endpoint: &str) -> Vec<(&'static str, String)> {
    let mut errors = Vec::new();
    if v.get("method").and_then(Value::as_str) != Some("POST") {
        errors.push(("invalid_request", format!("Line {n}: method must be POST.")));
    }
    let url = v.get("url").and_then(Value::as_str).unwrap_or("");
    if url.trim_start_matches("/v1") != endpoint.trim_start_matches("/v1") {
        errors.push((
            "url_mismatch",
            format!("Line {n}: url does not match the batch endpoint."),
        ));
    }
    errors
}

// ------------------------------------------------------------------ requests and answers ------

/// Reads a chat-completions request body.
pub(super) fn neutral(body: &Value) -> Neutral {
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let tok = Tokenizer::for_model(&model);
    let messages: Vec<(&str, &str)> = body
        .get("messages")
        .and_then(Value::as_array)
        .map(|ms| {
            ms.iter()
                .map(|m| (str_at(m, "/role"), str_at(m, "/content")))
                .collect()
        })
        .unwrap_or_default();
    let rf = body.get("response_format").map(|v| v.to_string());
    Neutral {
        prompt_tokens: tok.chat_prompt_tokens(messages, rf.as_deref()),
        schema: body
            .pointer("/response_format/json_schema/schema")
            .cloned()
            .unwrap_or_else(default_schema),
        max_tokens: body
            .get("max_completion_tokens")
            .or_else(|| body.get("max_tokens"))
            .and_then(Value::as_u64)
            .unwrap_or(4096),
        tokenizer: tok,
        model,
    }
}

/// The usage object of an answer.
fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
        "total_tokens": u.input_tokens + u.output_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
    })
}

/// A chat completion.
pub(super) fn answer_body(
    id: &str,
    model: &str,
    content: &str,
    truncated: bool,
    usage: &Usage,
) -> Value {
    json!({
        "id": format!("chatcmpl-{id}"), "object": "chat.completion", "created": crate::util::time::unix_now(),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": null, "annotations": []},
            "logprobs": null, "finish_reason": if truncated { "length" } else { "stop" }}],
        "usage": usage_json(usage),
        "service_tier": "default", "system_fingerprint": "fp_sim",
    })
}

/// One line of an output or error file.
pub(super) fn result_line(custom_id: &str, id: &str, model: &str, reply: &Reply) -> Value {
    match reply {
        Reply::Answer {
            content,
            truncated,
            usage,
        } => json!({
            "id": format!("batch_req_{id}"), "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": format!("req_{id}"),
                "body": answer_body(id, model, content, *truncated, usage)},
            "error": null
        }),
        Reply::Error => json!({
            "id": format!("batch_req_{id}"), "custom_id": custom_id,
            "response": {"status_code": 500, "request_id": format!("req_{id}"),
                "body": {"error": {"message": "The server had an error while processing your request.", "type": "server_error", "param": null, "code": null}}},
            "error": null
        }),
        Reply::Expired => {
            json!({"id": format!("batch_req_{id}"), "custom_id": custom_id, "response": null,
            "error": {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."}})
        }
        Reply::Cancelled => {
            json!({"id": format!("batch_req_{id}"), "custom_id": custom_id, "response": null,
            "error": {"code": "batch_cancelled", "message": "This request was cancelled before it ran."}})
        }
    }
}

/// The body of an online request that failed on the server.
pub(super) fn server_error() -> Value {
    json!({"error": {"message": "The server had an error while processing your request.", "type": "server_error", "param": null, "code": null}})
}

/// An error body.
pub(super) fn error_body(e: &SimError) -> Value {
    json!({"error": {"message": e.message, "type": e.kind, "param": null, "code": e.code}})
}

// ------------------------------------------------------------------ HTTP ----------------------

/// OpenAI's refusal of a call without a key: status and message.
pub(super) fn refuse_key(h: &HeaderMap) -> Option<(u16, &'static str)> {
    (!has_bearer(h)).then_some((
        401,
        "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
    ))
}

/// Azure's refusal of a call without a key or without `api-version`: status and message.
pub(super) fn refuse_azure_key(h: &HeaderMap, query: &str) -> Option<(u16, &'static str)> {
    if !has_header(h, "api-key") && !has_bearer(h) {
        return Some((
            401,
            "Access denied due to invalid subscription key or wrong API endpoint.",
        ));
    }
    if !query.contains("api-version=") {
        return Some((
            404,
            "Resource not found (the api-version query parameter is required).",
        ));
    }
    None
}

/// OpenAI's routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/files", post(upload_openai).get(list_files_openai))
        .route("/v1/files/{id}", get(get_file_openai).delete(delete_file))
        .route("/v1/files/{id}/content", get(file_content))
        .route("/v1/batches", post(create_openai).get(list_openai))
        .route("/v1/batches/{id}", get(get_batch_openai))
        .route("/v1/batches/{id}/cancel", post(cancel_openai))
        .route("/v1/chat/completions", post(online_openai))
}

/// Azure's routes.
pub(super) fn azure_routes() -> Router<AppState> {
    Router::new()
        .route("/openai/files", post(upload_azure).get(list_files_azure))
        .route(
            "/openai/files/{id}",
            get(get_file_azure).delete(delete_file),
        )
        .route("/openai/files/{id}/content", get(file_content))
        .route("/openai/batches", post(create_azure).get(list_azure))
        .route("/openai/batches/{id}", get(get_batch_azure))
        .route("/openai/batches/{id}/cancel", post(cancel_azure))
        .route(
            "/openai/deployments/{deployment}/chat/completions",
            post(online_azure),
        )
}

async fn receive_multipart(
    st: &AppState,
    flavor: ProviderKind,
    mut mp: Multipart,
) -> Result<Value, SimError> {
    let mut purpose: Option<String> = None;
    let mut stored: Option<(String, std::path::PathBuf, u64, String)> = None;
    while let Some(mut field) = mp
        .next_field()
        .await
        .map_err(|e| SimError::bad_request(format!("bad multipart body: {e}")))?
    {
        match field.name() {
            Some("purpose") => {
                purpose = Some(
                    field
                        .text()
                        .await
                        .map_err(|e| SimError::bad_request(e.to_string()))?,
                );
            }
            Some("file") => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_string();
                let path = st.sim.new_file_path();
                let mut sink = Sink::create(&path).await?;
                while let Some(chunk) = field
                    .chunk()
                    .await
                    .map_err(|e| SimError::bad_request(format!("upload interrupted: {e}")))?
                {
                    sink.write(&chunk).await?;
                }
                let (n, sha) = sink.finish().await?;
                stored = Some((name, path, n, sha));
            }
            _ => {}
        }
    }
    let purpose =
        purpose.ok_or_else(|| SimError::bad_request("Missing required parameter: 'purpose'."))?;
    let (name, path, n, sha) =
        stored.ok_or_else(|| SimError::bad_request("Missing required parameter: 'file'."))?;
    if purpose == "batch" && !name.ends_with(".jsonl") {
        return Err(SimError::bad_request(
            "Batch input files must have the .jsonl extension.",
        ));
    }
    let sim = st.sim.clone();
    blocking(move || sim.add_file(flavor, name, purpose, path, n, sha)).await
}

async fn upload_openai(State(st): State<AppState>, mp: Multipart) -> Result<Json<Value>, SimError> {
    receive_multipart(&st, ProviderKind::OpenAi, mp)
        .await
        .map(Json)
}

async fn upload_azure(State(st): State<AppState>, mp: Multipart) -> Response {
    match receive_multipart(&st, ProviderKind::Azure, mp).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_flavored(ProviderKind::Azure),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    purpose: Option<String>,
    order: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
}

async fn list_files_flavor(
    st: AppState,
    flavor: ProviderKind,
    q: ListQuery,
) -> Result<Json<Value>, SimError> {
    let sim = st.sim.clone();
    blocking(move || {
        Ok(Json(sim.list_files(
            flavor,
            q.purpose.as_deref(),
            q.order.as_deref() != Some("asc"),
            q.limit.unwrap_or(10_000).clamp(1, 10_000),
            q.after.as_deref(),
        )))
    })
    .await
}

async fn list_files_openai(
    State(st): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, SimError> {
    list_files_flavor(st, ProviderKind::OpenAi, q).await
}

async fn list_files_azure(
    State(st): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, SimError> {
    list_files_flavor(st, ProviderKind::Azure, q).await
}

async fn get_file_openai(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, SimError> {
    st.sim.file(ProviderKind::OpenAi, &id).map(Json)
}

async fn get_file_azure(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, SimError> {
    st.sim.file(ProviderKind::Azure, &id).map(Json)
}

async fn delete_file(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, SimError> {
    let sim = st.sim.clone();
    blocking(move || sim.delete_file(&id).map(Json)).await
}

async fn file_content(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, SimError> {
    let path = st.sim.file_path(&id)?;
    stream_file(&st, &id, path).await
}

async fn create_batch_flavor(st: AppState, flavor: ProviderKind, body: bytes::Bytes) -> Response {
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return SimError::bad_request(format!(
                "We could not parse the JSON body of your request: {e}"
            ))
            .into_flavored(flavor);
        }
    };
    let sim = st.sim.clone();
    match blocking(move || sim.create_openai_batch(flavor, &v)).await {
        Ok(batch) => created(&st, batch, flavor),
        Err(e) => e.into_flavored(flavor),
    }
}

async fn create_openai(State(st): State<AppState>, body: bytes::Bytes) -> Response {
    create_batch_flavor(st, ProviderKind::OpenAi, body).await
}

async fn create_azure(State(st): State<AppState>, body: bytes::Bytes) -> Response {
    create_batch_flavor(st, ProviderKind::Azure, body).await
}

async fn get_batch_openai(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    get_batch_any(st, ProviderKind::OpenAi, id).await
}

async fn get_batch_azure(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    get_batch_any(st, ProviderKind::Azure, id).await
}

async fn cancel_openai(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    cancel_any(st, ProviderKind::OpenAi, id).await
}

async fn cancel_azure(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    cancel_any(st, ProviderKind::Azure, id).await
}

async fn list_openai(
    State(st): State<AppState>,
    Query(q): Query<BatchListQuery>,
) -> Result<Json<Value>, SimError> {
    list_any(st, ProviderKind::OpenAi, q).await
}

async fn list_azure(
    State(st): State<AppState>,
    Query(q): Query<BatchListQuery>,
) -> Result<Json<Value>, SimError> {
    list_any(st, ProviderKind::Azure, q).await
}

async fn online_openai(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    online_any(st, ProviderKind::OpenAi, headers, body).await
}

async fn online_azure(
    State(st): State<AppState>,
    Path(_deployment): Path<String>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    online_any(st, ProviderKind::Azure, headers, body).await
}
