//! The simulator's HTTP surface (axum), one route group per provider wire format:
//! OpenAI `/v1/files`, `/v1/batches`, `/v1/chat/completions`; Azure `/openai/...` (with
//! `api-version`); Anthropic `/v1/messages/batches`, `/v1/messages`; Gemini `/v1beta/...`,
//! `/upload/v1beta/files`, `/download/v1beta/files`; and `/_sim/record`. Each group checks
//! its provider's credentials header and injects HTTP faults in its provider's error shape.
//! Every state change runs on a blocking thread (the state lives behind a mutex and
//! materialising a batch reads and writes files).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use super::{Flavor, Sim, SimError, draw};

/// Largest upload accepted (OpenAI: 512 MB per file; Anthropic: 256 MB per create).
const MAX_UPLOAD: usize = 512 * 1024 * 1024;

#[derive(Clone)]
struct AppState {
    sim: Arc<Sim>,
    calls: Arc<AtomicU64>,
}

impl SimError {
    fn into_flavored(self, flavor: Flavor) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        let body = match flavor {
            Flavor::Anthropic => {
                json!({"type": "error", "error": {"type": anthropic_type(self.status, self.kind), "message": self.message}})
            }
            Flavor::Gemini => {
                json!({"error": {"code": self.status, "message": self.message, "status": google_status(self.status)}})
            }
            _ => {
                json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}})
            }
        };
        (status, Json(body)).into_response()
    }
}

impl IntoResponse for SimError {
    fn into_response(self) -> Response {
        self.into_flavored(Flavor::OpenAi)
    }
}

fn anthropic_type(status: u16, kind: &str) -> &'static str {
    match status {
        401 => "authentication_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        500..=599 => "api_error",
        _ if kind == "not_found_error" => "not_found_error",
        _ => "invalid_request_error",
    }
}

fn google_status(status: u16) -> &'static str {
    match status {
        400 => "INVALID_ARGUMENT",
        401 | 403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        _ => "INTERNAL",
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SimError> + Send + 'static,
) -> Result<T, SimError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(SimError {
            status: 500,
            kind: "server_error",
            code: None,
            message: format!("simulator task failed: {e}"),
        })
    })
}

/// A running simulator.
pub struct SimHandle {
    pub addr: SocketAddr,
    pub sim: Arc<Sim>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl SimHandle {
    /// The OpenAI-style base URL (`http://ADDR/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The root URL (`http://ADDR`), for the providers whose clients add their own prefix.
    pub fn root_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// Binds `addr` (port 0 = any) and serves in the background.
pub async fn start(sim: Arc<Sim>, addr: SocketAddr) -> std::io::Result<SimHandle> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    sim.set_base(format!("http://{addr}"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app = router(sim.clone());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await;
    });
    Ok(SimHandle {
        addr,
        sim,
        shutdown: Some(tx),
        task,
    })
}

/// Serves on an already bound listener until the process ends.
pub async fn serve(sim: Arc<Sim>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        sim.set_base(format!("http://{addr}"));
    }
    axum::serve(listener, router(sim)).await
}

fn group(state: &AppState, flavor: Flavor, routes: Router<AppState>) -> Router<AppState> {
    routes
        .layer(DefaultBodyLimit::max(MAX_UPLOAD))
        .route_layer(middleware::from_fn_with_state(
            (state.clone(), flavor),
            faults,
        ))
        .route_layer(middleware::from_fn_with_state(flavor, auth))
}

fn router(sim: Arc<Sim>) -> Router {
    let state = AppState {
        sim,
        calls: Arc::new(AtomicU64::new(0)),
    };
    let openai = Router::new()
        .route("/v1/files", post(upload_openai).get(list_files_openai))
        .route("/v1/files/{id}", get(get_file_openai).delete(delete_file))
        .route("/v1/files/{id}/content", get(file_content))
        .route("/v1/batches", post(create_openai).get(list_openai))
        .route("/v1/batches/{id}", get(get_batch_openai))
        .route("/v1/batches/{id}/cancel", post(cancel_openai))
        .route("/v1/chat/completions", post(online_openai));
    let azure = Router::new()
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
        );
    let anthropic = Router::new()
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
        .route("/v1/messages", post(online_anthropic));
    let gemini = Router::new()
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
        .route("/download/v1beta/files/{action}", get(download_gemini));
    Router::new()
        .merge(group(&state, Flavor::OpenAi, openai))
        .merge(group(&state, Flavor::Azure, azure))
        .merge(group(&state, Flavor::Anthropic, anthropic))
        .merge(group(&state, Flavor::Gemini, gemini))
        .route("/_sim/record", get(record))
        .with_state(state)
}

/// Each provider's credentials: any non-empty key is accepted; a missing one gets the
/// provider's own refusal.
async fn auth(State(flavor): State<Flavor>, req: Request, next: Next) -> Response {
    let h = req.headers();
    let present = |name: &str| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| !v.trim().is_empty())
    };
    let bearer = h
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|k| !k.trim().is_empty());
    let query = req.uri().query().unwrap_or("");
    let refuse = |status: u16, message: &str| {
        SimError {
            status,
            kind: "invalid_request_error",
            code: None,
            message: message.into(),
        }
        .into_flavored(flavor)
    };
    match flavor {
        Flavor::OpenAi if !bearer => {
            return refuse(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            );
        }
        Flavor::Azure => {
            if !present("api-key") && !bearer {
                return refuse(
                    401,
                    "Access denied due to invalid subscription key or wrong API endpoint.",
                );
            }
            if !query.contains("api-version=") {
                return refuse(
                    404,
                    "Resource not found (the api-version query parameter is required).",
                );
            }
        }
        Flavor::Anthropic => {
            if !present("x-api-key") && !bearer {
                return refuse(401, "x-api-key header is required");
            }
            if !present("anthropic-version") {
                return refuse(400, "anthropic-version: header is required");
            }
        }
        Flavor::Gemini if !present("x-goog-api-key") && !query.contains("key=") => {
            return refuse(
                403,
                "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
            );
        }
        _ => {}
    }
    next.run(req).await
}

/// HTTP-level faults, drawn per call before the handler runs (so they never take effect),
/// in the provider's own error shape.
async fn faults(
    State((st, flavor)): State<(AppState, Flavor)>,
    req: Request,
    next: Next,
) -> Response {
    let s = st.sim.settings();
    if s.http_429_rate > 0.0 || s.http_500_rate > 0.0 {
        let n = st.calls.fetch_add(1, Ordering::Relaxed);
        let u = draw(s.seed, "http", &n.to_string());
        let request_id = client_request_id(req.headers());
        if u < s.http_429_rate + s.http_500_rate {
            st.sim
                .note_refused(&request_id, if u < s.http_429_rate { 429 } else { 500 });
        }
        if u < s.http_429_rate {
            let ms = s.retry_after_ms;
            let mut resp = match flavor {
                Flavor::Gemini => {
                    let body = json!({"error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).", "status": "RESOURCE_EXHAUSTED",
                        "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": format!("{:.3}s", ms as f64 / 1000.0)}]}});
                    (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response()
                }
                _ => SimError {
                    status: 429,
                    kind: "requests",
                    code: Some("rate_limit_exceeded"),
                    message: "Rate limit reached for requests. Please try again later.".into(),
                }
                .into_flavored(flavor),
            };
            if flavor != Flavor::Gemini {
                let h = resp.headers_mut();
                h.insert("retry-after-ms", HeaderValue::from(ms));
                h.insert("retry-after", HeaderValue::from(ms.div_ceil(1000)));
                h.insert(
                    "x-ratelimit-remaining-requests",
                    HeaderValue::from_static("0"),
                );
            }
            return resp;
        }
        if u < s.http_429_rate + s.http_500_rate {
            return SimError {
                status: 500,
                kind: "server_error",
                code: None,
                message: "The server had an error while processing your request. Sorry about that!"
                    .into(),
            }
            .into_flavored(flavor);
        }
    }
    next.run(req).await
}

/// A 200 whose body breaks off half-way, as when the connection resets.
fn broken_response(full: Vec<u8>) -> Response {
    let len = full.len();
    let half = full[..len / 2].to_vec();
    let stream = futures_util::stream::iter(vec![
        Ok::<_, std::io::Error>(bytes::Bytes::from(half)),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "simulated connection reset",
        )),
    ]);
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    resp.headers_mut()
        .insert("content-length", HeaderValue::from(len));
    resp
}

/// Answers a create, unless the fault says its response is lost after the batch was made.
fn created(st: &AppState, batch: Value, flavor: Flavor) -> Response {
    let s = st.sim.settings();
    let id = batch
        .get("id")
        .or_else(|| batch.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    // Drawn on the batch's creation number: its id differs from run to run.
    let n = st.sim.batch_ordinal(&id).unwrap_or_default();
    if draw(s.seed, "drop_create", &n.to_string()) < s.drop_create_rate {
        // The batch exists; the client never learns its id.
        return broken_response(batch.to_string().into_bytes());
    }
    let _ = flavor;
    Json(batch).into_response()
}

async fn stream_file(
    st: &AppState,
    id: &str,
    path: std::path::PathBuf,
) -> Result<Response, SimError> {
    let s = st.sim.settings();
    if s.reset_download_rate > 0.0 {
        let n = st.calls.fetch_add(1, Ordering::Relaxed);
        if draw(s.seed, "reset_download", &n.to_string()) < s.reset_download_rate {
            let full = tokio::fs::read(&path)
                .await
                .map_err(|_| SimError::not_found("file", id))?;
            return Ok(broken_response(full));
        }
    }
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| SimError::not_found("file", id))?;
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let stream = tokio_util::io::ReaderStream::new(file);
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/octet-stream"),
    );
    resp.headers_mut()
        .insert("content-length", HeaderValue::from(len));
    Ok(resp)
}

// ------------------------------------------------------------------ OpenAI and Azure ----------

async fn receive_multipart(
    st: &AppState,
    flavor: Flavor,
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

/// A file being received: bytes counted and hashed as they are written.
struct Sink {
    f: tokio::fs::File,
    n: u64,
    hasher: sha2::Sha256,
}

impl Sink {
    /// Creates the file private to its owner (0600): it holds prompts.
    async fn create(path: &std::path::Path) -> Result<Sink, SimError> {
        let f = crate::util::fs::create_private(path)
            .map_err(|e| SimError::bad_request(e.to_string()))?;
        Ok(Sink {
            f: tokio::fs::File::from_std(f),
            n: 0,
            hasher: <sha2::Sha256 as sha2::Digest>::new(),
        })
    }

    async fn write(&mut self, chunk: &[u8]) -> Result<(), SimError> {
        self.n += chunk.len() as u64;
        sha2::Digest::update(&mut self.hasher, chunk);
        self.f
            .write_all(chunk)
            .await
            .map_err(|e| SimError::bad_request(e.to_string()))
    }

    async fn finish(mut self) -> Result<(u64, String), SimError> {
        self.f
            .flush()
            .await
            .map_err(|e| SimError::bad_request(e.to_string()))?;
        Ok((self.n, hex::encode(sha2::Digest::finalize(self.hasher))))
    }
}

async fn upload_openai(State(st): State<AppState>, mp: Multipart) -> Result<Json<Value>, SimError> {
    receive_multipart(&st, Flavor::OpenAi, mp).await.map(Json)
}

async fn upload_azure(State(st): State<AppState>, mp: Multipart) -> Response {
    match receive_multipart(&st, Flavor::Azure, mp).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_flavored(Flavor::Azure),
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
    flavor: Flavor,
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
    list_files_flavor(st, Flavor::OpenAi, q).await
}

async fn list_files_azure(
    State(st): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, SimError> {
    list_files_flavor(st, Flavor::Azure, q).await
}

async fn get_file_openai(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, SimError> {
    st.sim.file(Flavor::OpenAi, &id).map(Json)
}

async fn get_file_azure(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, SimError> {
    st.sim.file(Flavor::Azure, &id).map(Json)
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

async fn create_batch_flavor(st: AppState, flavor: Flavor, body: bytes::Bytes) -> Response {
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
    create_batch_flavor(st, Flavor::OpenAi, body).await
}

async fn create_azure(State(st): State<AppState>, body: bytes::Bytes) -> Response {
    create_batch_flavor(st, Flavor::Azure, body).await
}

async fn get_batch_any(st: AppState, flavor: Flavor, id: String) -> Response {
    let sim = st.sim.clone();
    match blocking(move || sim.get_batch(&id)).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_flavored(flavor),
    }
}

async fn get_batch_openai(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    get_batch_any(st, Flavor::OpenAi, id).await
}

async fn get_batch_azure(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    get_batch_any(st, Flavor::Azure, id).await
}

async fn cancel_any(st: AppState, flavor: Flavor, id: String) -> Response {
    let sim = st.sim.clone();
    match blocking(move || sim.cancel_batch(&id)).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_flavored(flavor),
    }
}

async fn cancel_openai(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    cancel_any(st, Flavor::OpenAi, id).await
}

async fn cancel_azure(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    cancel_any(st, Flavor::Azure, id).await
}

#[derive(Deserialize)]
struct BatchListQuery {
    limit: Option<usize>,
    after: Option<String>,
    after_id: Option<String>,
    #[serde(rename = "pageSize")]
    page_size: Option<usize>,
    #[serde(rename = "pageToken")]
    page_token: Option<String>,
}

async fn list_any(
    st: AppState,
    flavor: Flavor,
    q: BatchListQuery,
) -> Result<Json<Value>, SimError> {
    let sim = st.sim.clone();
    let limit = q.limit.or(q.page_size).unwrap_or(20).clamp(1, 1000);
    let after = q.after.or(q.after_id).or(q.page_token);
    blocking(move || sim.list_batches(flavor, limit, after.as_deref()).map(Json)).await
}

async fn list_openai(
    State(st): State<AppState>,
    Query(q): Query<BatchListQuery>,
) -> Result<Json<Value>, SimError> {
    list_any(st, Flavor::OpenAi, q).await
}

async fn list_azure(
    State(st): State<AppState>,
    Query(q): Query<BatchListQuery>,
) -> Result<Json<Value>, SimError> {
    list_any(st, Flavor::Azure, q).await
}

fn client_request_id(h: &HeaderMap) -> String {
    h.get("x-client-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

async fn online_any(
    st: AppState,
    flavor: Flavor,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return SimError::bad_request(format!("invalid JSON body: {e}")).into_flavored(flavor);
        }
    };
    let cid = client_request_id(&headers);
    let sim = st.sim.clone();
    match blocking(move || sim.online(flavor, &cid, &v)).await {
        Ok(r) => (
            StatusCode::from_u16(r.status).unwrap_or(StatusCode::OK),
            Json(r.body),
        )
            .into_response(),
        Err(e) => e.into_flavored(flavor),
    }
}

async fn online_openai(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    online_any(st, Flavor::OpenAi, headers, body).await
}

async fn online_azure(
    State(st): State<AppState>,
    Path(_deployment): Path<String>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    online_any(st, Flavor::Azure, headers, body).await
}

// ------------------------------------------------------------------ Anthropic -----------------

async fn create_anthropic(State(st): State<AppState>, body: bytes::Bytes) -> Response {
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return SimError::bad_request(format!("invalid JSON body: {e}"))
                .into_flavored(Flavor::Anthropic);
        }
    };
    let sim = st.sim.clone();
    match blocking(move || sim.create_anthropic_batch(&v)).await {
        Ok(batch) => created(&st, batch, Flavor::Anthropic),
        Err(e) => e.into_flavored(Flavor::Anthropic),
    }
}

async fn list_anthropic(State(st): State<AppState>, Query(q): Query<BatchListQuery>) -> Response {
    match list_any(st, Flavor::Anthropic, q).await {
        Ok(v) => v.into_response(),
        Err(e) => e.into_flavored(Flavor::Anthropic),
    }
}

async fn get_batch_anthropic(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    get_batch_any(st, Flavor::Anthropic, id).await
}

async fn cancel_anthropic(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    cancel_any(st, Flavor::Anthropic, id).await
}

async fn delete_anthropic(Path(id): Path<String>) -> Response {
    Json(json!({"id": id, "type": "message_batch_deleted"})).into_response()
}

async fn results_anthropic(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    let sim = st.sim.clone();
    let lookup = id.clone();
    match blocking(move || sim.results_path(&lookup)).await {
        Ok(path) => match stream_file(&st, &id, path).await {
            Ok(r) => r,
            Err(e) => e.into_flavored(Flavor::Anthropic),
        },
        Err(e) => e.into_flavored(Flavor::Anthropic),
    }
}

async fn online_anthropic(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    online_any(st, Flavor::Anthropic, headers, body).await
}

// ------------------------------------------------------------------ Gemini --------------------

async fn create_gemini(
    State(st): State<AppState>,
    Path(action): Path<String>,
    body: bytes::Bytes,
) -> Response {
    let Some(model) = action.strip_suffix(":batchGenerateContent") else {
        return SimError::not_found("method", &action).into_flavored(Flavor::Gemini);
    };
    let model = model.to_string();
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return SimError::bad_request(format!("Invalid JSON payload received. {e}"))
                .into_flavored(Flavor::Gemini);
        }
    };
    let sim = st.sim.clone();
    match blocking(move || sim.create_gemini_batch(&model, &v)).await {
        Ok(batch) => created(&st, batch, Flavor::Gemini),
        Err(e) => e.into_flavored(Flavor::Gemini),
    }
}

async fn list_gemini(State(st): State<AppState>, Query(q): Query<BatchListQuery>) -> Response {
    match list_any(st, Flavor::Gemini, q).await {
        Ok(v) => v.into_response(),
        Err(e) => e.into_flavored(Flavor::Gemini),
    }
}

async fn get_batch_gemini(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    get_batch_any(st, Flavor::Gemini, format!("batches/{id}")).await
}

async fn cancel_gemini(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    let Some(id) = id.strip_suffix(":cancel") else {
        return SimError::not_found("method", &id).into_flavored(Flavor::Gemini);
    };
    let sim = st.sim.clone();
    let id = format!("batches/{id}");
    match blocking(move || sim.cancel_batch(&id)).await {
        Ok(_) => Json(json!({})).into_response(),
        Err(e) => e.into_flavored(Flavor::Gemini),
    }
}

async fn list_files_gemini(
    State(st): State<AppState>,
    Query(q): Query<BatchListQuery>,
) -> Result<Json<Value>, SimError> {
    let sim = st.sim.clone();
    blocking(move || {
        Ok(Json(sim.list_files(
            Flavor::Gemini,
            None,
            true,
            q.page_size.unwrap_or(100).clamp(1, 100),
            q.page_token.as_deref(),
        )))
    })
    .await
}

async fn get_file_gemini(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    match st.sim.file(Flavor::Gemini, &format!("files/{id}")) {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_flavored(Flavor::Gemini),
    }
}

async fn delete_file_gemini(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    let sim = st.sim.clone();
    match blocking(move || sim.delete_file(&format!("files/{id}"))).await {
        Ok(_) => Json(json!({})).into_response(),
        Err(e) => e.into_flavored(Flavor::Gemini),
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
            .into_flavored(Flavor::Gemini);
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
        return SimError::not_found("upload session", &token).into_flavored(Flavor::Gemini);
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
            let add = move || sim.add_file(Flavor::Gemini, name, "batch".into(), path, n, sha);
            let file = match blocking(add).await {
                Ok(f) => f,
                Err(e) => return e.into_flavored(Flavor::Gemini),
            };
            let mut resp = Json(json!({"file": file})).into_response();
            resp.headers_mut()
                .insert("x-goog-upload-status", HeaderValue::from_static("final"));
            resp
        }
        Err(e) => e.into_flavored(Flavor::Gemini),
    }
}

async fn download_gemini(State(st): State<AppState>, Path(action): Path<String>) -> Response {
    let id = format!("files/{}", action.trim_end_matches(":download"));
    let path = match st.sim.file_path(&id) {
        Ok(p) => p,
        Err(e) => return e.into_flavored(Flavor::Gemini),
    };
    match stream_file(&st, &id, path).await {
        Ok(r) => r,
        Err(e) => e.into_flavored(Flavor::Gemini),
    }
}

async fn record(State(st): State<AppState>) -> Result<Json<Value>, SimError> {
    let sim = st.sim.clone();
    blocking(move || Ok(Json(sim.record()))).await
}
