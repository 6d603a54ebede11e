//! The simulator's HTTP surface (axum): OpenAI's `/v1/files` and `/v1/batches`, plus
//! `/_sim/record`. Every state change runs on a blocking thread (the state lives behind a
//! mutex and materialising a batch reads and writes files).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use super::{Sim, SimError, draw};

/// Largest upload accepted (OpenAI: 512 MB per file, 200 MB per batch input).
const MAX_UPLOAD: usize = 512 * 1024 * 1024;

#[derive(Clone)]
struct AppState {
    sim: Arc<Sim>,
    calls: Arc<AtomicU64>,
}

impl IntoResponse for SimError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}});
        (status, Json(body)).into_response()
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
    /// The base URL clients use (`http://ADDR/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
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
    axum::serve(listener, router(sim)).await
}

fn router(sim: Arc<Sim>) -> Router {
    let state = AppState {
        sim,
        calls: Arc::new(AtomicU64::new(0)),
    };
    let api = Router::new()
        .route("/files", post(upload_file).get(list_files))
        .route("/files/{id}", get(get_file).delete(delete_file))
        .route("/files/{id}/content", get(file_content))
        .route("/batches", post(create_batch).get(list_batches))
        .route("/batches/{id}", get(get_batch))
        .route("/batches/{id}/cancel", post(cancel_batch))
        .layer(DefaultBodyLimit::max(MAX_UPLOAD))
        .route_layer(middleware::from_fn_with_state(state.clone(), faults))
        .route_layer(middleware::from_fn(auth));
    Router::new()
        .nest("/v1", api)
        .route("/_sim/record", get(record))
        .with_state(state)
}

/// Any non-empty bearer key is accepted; a missing one gets OpenAI's 401.
async fn auth(req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|k| !k.trim().is_empty());
    if !ok {
        return SimError {
            status: 401,
            kind: "invalid_request_error",
            code: None,
            message: "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).".into(),
        }
        .into_response();
    }
    next.run(req).await
}

/// HTTP-level faults, drawn per call before the handler runs (so they never take effect).
async fn faults(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let s = st.sim.settings();
    if s.http_429_rate > 0.0 || s.http_500_rate > 0.0 {
        let n = st.calls.fetch_add(1, Ordering::Relaxed);
        let u = draw(s.seed, "http", &n.to_string());
        if u < s.http_429_rate {
            let mut resp = SimError {
                status: 429,
                kind: "requests",
                code: Some("rate_limit_exceeded"),
                message: "Rate limit reached for requests. Please try again later.".into(),
            }
            .into_response();
            let h = resp.headers_mut();
            let ms = s.retry_after_ms;
            h.insert("retry-after-ms", HeaderValue::from(ms));
            h.insert("retry-after", HeaderValue::from(ms.div_ceil(1000)));
            h.insert(
                "x-ratelimit-remaining-requests",
                HeaderValue::from_static("0"),
            );
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
            .into_response();
        }
    }
    next.run(req).await
}

async fn upload_file(
    State(st): State<AppState>,
    mut mp: Multipart,
) -> Result<Json<Value>, SimError> {
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
                let mut f = tokio::fs::File::create(&path)
                    .await
                    .map_err(|e| SimError::bad_request(e.to_string()))?;
                let mut n = 0u64;
                let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
                while let Some(chunk) = field
                    .chunk()
                    .await
                    .map_err(|e| SimError::bad_request(format!("upload interrupted: {e}")))?
                {
                    n += chunk.len() as u64;
                    sha2::Digest::update(&mut hasher, &chunk);
                    f.write_all(&chunk)
                        .await
                        .map_err(|e| SimError::bad_request(e.to_string()))?;
                }
                f.flush()
                    .await
                    .map_err(|e| SimError::bad_request(e.to_string()))?;
                stored = Some((name, path, n, hex::encode(sha2::Digest::finalize(hasher))));
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
    Ok(Json(st.sim.add_file(name, purpose, path, n, sha)))
}

#[derive(Deserialize)]
struct ListQuery {
    purpose: Option<String>,
    order: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
}

async fn list_files(
    State(st): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, SimError> {
    let sim = st.sim.clone();
    blocking(move || {
        Ok(Json(sim.list_files(
            q.purpose.as_deref(),
            q.order.as_deref() != Some("asc"),
            q.limit.unwrap_or(10_000).clamp(1, 10_000),
            q.after.as_deref(),
        )))
    })
    .await
}

async fn get_file(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, SimError> {
    st.sim.file(&id).map(Json)
}

async fn delete_file(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, SimError> {
    st.sim.delete_file(&id).map(Json)
}

async fn file_content(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, SimError> {
    let path = st.sim.file_path(&id)?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| SimError::not_found("file", &id))?;
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

async fn create_batch(
    State(st): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, SimError> {
    let v: Value = serde_json::from_slice(&body).map_err(|e| {
        SimError::bad_request(format!(
            "We could not parse the JSON body of your request: {e}"
        ))
    })?;
    let sim = st.sim.clone();
    blocking(move || sim.create_batch(&v).map(Json)).await
}

async fn get_batch(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, SimError> {
    let sim = st.sim.clone();
    blocking(move || sim.get_batch(&id).map(Json)).await
}

async fn cancel_batch(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, SimError> {
    let sim = st.sim.clone();
    blocking(move || sim.cancel_batch(&id).map(Json)).await
}

#[derive(Deserialize)]
struct BatchListQuery {
    limit: Option<usize>,
    after: Option<String>,
}

async fn list_batches(
    State(st): State<AppState>,
    Query(q): Query<BatchListQuery>,
) -> Result<Json<Value>, SimError> {
    let sim = st.sim.clone();
    blocking(move || {
        Ok(Json(sim.list_batches(
            q.limit.unwrap_or(20).clamp(1, 100),
            q.after.as_deref(),
        )))
    })
    .await
}

async fn record(State(st): State<AppState>) -> Result<Json<Value>, SimError> {
    let sim = st.sim.clone();
    blocking(move || Ok(Json(sim.record()))).await
}
