//! What the providers' HTTP routes share (axum): the server state, errors answered in a
//! provider's shape, running state changes on a blocking thread (the state lives behind a
//! mutex and materialising a batch reads and writes files), the create and download faults
//! (docs/providers.md §7.3), receiving an upload, reading an AWS SigV4 credential scope
//! (Bedrock and S3), and the handlers that only differ by provider (get, cancel, list a
//! batch; online requests).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Json;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use super::Sim;
use super::faults::draw;
use super::types::{ProviderKind, SimError};

#[derive(Clone)]
pub(super) struct AppState {
    pub(super) sim: Arc<Sim>,
    pub(super) calls: Arc<AtomicU64>,
}

impl SimError {
    pub(super) fn into_flavored(self, flavor: ProviderKind) -> Response {
        let status =
            StatusCode::from_u16(self.wire_status(flavor)).unwrap_or(StatusCode::BAD_REQUEST);
        let mut resp = (status, Json(self.body(flavor))).into_response();
        if let Some((name, value)) = self.wire_header(flavor)
            && let Ok(v) = HeaderValue::from_str(&value)
        {
            resp.headers_mut().insert(name, v);
        }
        resp
    }
}

impl IntoResponse for SimError {
    fn into_response(self) -> Response {
        self.into_flavored(ProviderKind::OpenAi)
    }
}

pub(super) async fn blocking<T: Send + 'static>(
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

/// Whether the request carries a non-empty `name` header.
pub(super) fn has_header(h: &HeaderMap, name: &str) -> bool {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.trim().is_empty())
}

/// Whether the request carries a non-empty `Authorization: Bearer` key.
pub(super) fn has_bearer(h: &HeaderMap) -> bool {
    h.get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|k| !k.trim().is_empty())
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
pub(super) fn created(st: &AppState, batch: Value, flavor: ProviderKind) -> Response {
    let s = st.sim.settings();
    let id = batch
        .get("id")
        .or_else(|| batch.get("name"))
        .or_else(|| batch.get("jobArn"))
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

pub(super) async fn stream_file(
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
    // Each read of an async file is a hand-off to a blocking thread: 256 KB a read, not the
    // stream's default 4 KB (a 46 MB result file: 0.29 s of the simulator's CPU to serve).
    let stream = tokio_util::io::ReaderStream::with_capacity(file, FILE_PIECE);
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/octet-stream"),
    );
    resp.headers_mut()
        .insert("content-length", HeaderValue::from(len));
    Ok(resp)
}

/// Bytes read or written at a time by the simulator's file transfers.
const FILE_PIECE: usize = 256 << 10;

/// A file being received: bytes counted and hashed as they are written (through a buffer:
/// each write of an async file is a hand-off to a blocking thread).
pub(super) struct Sink {
    f: tokio::io::BufWriter<tokio::fs::File>,
    n: u64,
    hasher: sha2::Sha256,
}

impl Sink {
    /// Creates the file private to its owner (0600): it holds prompts.
    pub(super) async fn create(path: &std::path::Path) -> Result<Sink, SimError> {
        let f = crate::util::fs::create_private(path)
            .map_err(|e| SimError::bad_request(e.to_string()))?;
        Ok(Sink {
            f: tokio::io::BufWriter::with_capacity(FILE_PIECE, tokio::fs::File::from_std(f)),
            n: 0,
            hasher: <sha2::Sha256 as sha2::Digest>::new(),
        })
    }

    pub(super) async fn write(&mut self, chunk: &[u8]) -> Result<(), SimError> {
        self.n += chunk.len() as u64;
        sha2::Digest::update(&mut self.hasher, chunk);
        self.f
            .write_all(chunk)
            .await
            .map_err(|e| SimError::bad_request(e.to_string()))
    }

    pub(super) async fn finish(mut self) -> Result<(u64, String), SimError> {
        self.f
            .flush()
            .await
            .map_err(|e| SimError::bad_request(e.to_string()))?;
        Ok((self.n, hex::encode(sha2::Digest::finalize(self.hasher))))
    }
}

pub(super) async fn get_batch_any(st: AppState, flavor: ProviderKind, id: String) -> Response {
    let sim = st.sim.clone();
    match blocking(move || sim.get_batch(&id)).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_flavored(flavor),
    }
}

pub(super) async fn cancel_any(st: AppState, flavor: ProviderKind, id: String) -> Response {
    let sim = st.sim.clone();
    match blocking(move || sim.cancel_batch(&id)).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_flavored(flavor),
    }
}

#[derive(Deserialize)]
pub(super) struct BatchListQuery {
    pub(super) limit: Option<usize>,
    pub(super) after: Option<String>,
    pub(super) after_id: Option<String>,
    #[serde(rename = "pageSize")]
    pub(super) page_size: Option<usize>,
    #[serde(rename = "pageToken")]
    pub(super) page_token: Option<String>,
}

pub(super) async fn list_any(
    st: AppState,
    flavor: ProviderKind,
    q: BatchListQuery,
) -> Result<Json<Value>, SimError> {
    let sim = st.sim.clone();
    let limit = q.limit.or(q.page_size).unwrap_or(20).clamp(1, 1000);
    let after = q.after.or(q.after_id).or(q.page_token);
    blocking(move || sim.list_batches(flavor, limit, after.as_deref()).map(Json)).await
}

/// The credential scope of an AWS Signature Version 4 `Authorization` header (the signature
/// itself is not checked: the simulator has no secret).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct SigV4Scope {
    pub(super) access_key: String,
    pub(super) date: String,
    pub(super) region: String,
    pub(super) service: String,
}

/// Why a request carries no usable SigV4 signature.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SigV4Refusal {
    /// No `Authorization` header at all.
    Missing,
    /// There is one, but it is not a SigV4 signature as AWS writes them (or `x-amz-date`
    /// is missing).
    Malformed(String),
}

/// Reads the SigV4 credential scope of a request: `Authorization: AWS4-HMAC-SHA256
/// Credential=<akid>/<yyyymmdd>/<region>/<service>/aws4_request, SignedHeaders=...,
/// Signature=<hex>` and an `x-amz-date` header.
pub(super) fn sigv4_scope(h: &HeaderMap) -> Result<SigV4Scope, SigV4Refusal> {
    let Some(auth) = h.get("authorization") else {
        return Err(SigV4Refusal::Missing);
    };
    let bad = |why: &str| SigV4Refusal::Malformed(why.to_string());
    let auth = auth
        .to_str()
        .map_err(|_| bad("the Authorization header is not text"))?;
    let fields = auth.strip_prefix("AWS4-HMAC-SHA256 ").ok_or_else(|| {
        bad("the Authorization header does not start with the algorithm AWS4-HMAC-SHA256")
    })?;
    let mut credential = None;
    let mut signed_headers = None;
    let mut signature = None;
    for part in fields.split(',') {
        match part.trim().split_once('=') {
            Some(("Credential", v)) => credential = Some(v),
            Some(("SignedHeaders", v)) => signed_headers = Some(v),
            Some(("Signature", v)) => signature = Some(v),
            _ => {}
        }
    }
    let credential = credential.ok_or_else(|| bad("the Authorization header has no Credential"))?;
    if signed_headers.is_none_or(str::is_empty) {
        return Err(bad("the Authorization header has no SignedHeaders"));
    }
    if !signature.is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Err(bad("the Authorization header has no hexadecimal Signature"));
    }
    let parts: Vec<&str> = credential.split('/').collect();
    let [akid, date, region, service, terminator] = parts[..] else {
        return Err(bad(
            "the Credential is not <access key>/<yyyymmdd>/<region>/<service>/aws4_request",
        ));
    };
    if akid.is_empty()
        || date.len() != 8
        || !date.bytes().all(|b| b.is_ascii_digit())
        || region.is_empty()
        || service.is_empty()
        || terminator != "aws4_request"
    {
        return Err(bad(
            "the Credential is not <access key>/<yyyymmdd>/<region>/<service>/aws4_request",
        ));
    }
    if !has_header(h, "x-amz-date") {
        return Err(bad("the request has no x-amz-date header"));
    }
    Ok(SigV4Scope {
        access_key: akid.to_string(),
        date: date.to_string(),
        region: region.to_string(),
        service: service.to_string(),
    })
}

pub(super) fn client_request_id(h: &HeaderMap) -> String {
    h.get("x-client-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

pub(super) async fn online_any(
    st: AppState,
    flavor: ProviderKind,
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
