//! The simulator's HTTP server (axum): starting and stopping it, and its router, one route
//! group per provider wire format (`openai`: OpenAI `/v1/files`, `/v1/batches`,
//! `/v1/chat/completions` and Azure `/openai/...`; `anthropic`: `/v1/messages/batches`,
//! `/v1/messages`; `gemini`: `/v1beta/...`, `/upload/v1beta/files`,
//! `/download/v1beta/files`; `bedrock`: `/model-invocation-job...`, `/model/{id}/invoke`
//! and `/converse`; `s3`: `/s3/{bucket}/{key}`) plus `/_sim/record`. Each group checks its
//! provider's credentials (for Bedrock and S3, the SigV4 credential scope) and injects HTTP
//! faults in its provider's error shape (docs/providers.md §7.3).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::Value;

use super::faults::draw;
use super::http::{AppState, blocking, client_request_id};
use super::types::{ProviderKind, SimError};
use super::{Sim, anthropic, bedrock, gemini, openai, s3};

/// Largest upload accepted (OpenAI: 512 MB per file; Anthropic: 256 MB per create).
const MAX_UPLOAD: usize = 512 * 1024 * 1024;

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

/// Whose wire a route group speaks: a provider's, or S3's.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    Provider(ProviderKind),
    S3,
}

fn group(state: &AppState, api: Api, routes: Router<AppState>) -> Router<AppState> {
    // S3 uploads are streamed to disk, never held: no limit beyond the disk's.
    let limit = match api {
        Api::S3 => DefaultBodyLimit::disable(),
        Api::Provider(_) => DefaultBodyLimit::max(MAX_UPLOAD),
    };
    routes
        .layer(limit)
        .route_layer(middleware::from_fn_with_state((state.clone(), api), faults))
        .route_layer(middleware::from_fn_with_state((state.clone(), api), auth))
}

fn router(sim: Arc<Sim>) -> Router {
    let state = AppState {
        sim,
        calls: Arc::new(AtomicU64::new(0)),
    };
    let provider = |k| Api::Provider(k);
    Router::new()
        .merge(group(
            &state,
            provider(ProviderKind::OpenAi),
            openai::routes(),
        ))
        .merge(group(
            &state,
            provider(ProviderKind::Azure),
            openai::azure_routes(),
        ))
        .merge(group(
            &state,
            provider(ProviderKind::Anthropic),
            anthropic::routes(),
        ))
        .merge(group(
            &state,
            provider(ProviderKind::Gemini),
            gemini::routes(),
        ))
        .merge(group(
            &state,
            provider(ProviderKind::Bedrock),
            bedrock::routes(),
        ))
        .merge(group(&state, Api::S3, s3::routes()))
        .route("/_sim/record", get(record))
        .fallback(unrouted)
        .with_state(state)
}

/// Each provider's credentials: any non-empty key is accepted; a missing one gets the
/// provider's own refusal. Bedrock and S3 take any SigV4 signature whose credential scope
/// names their service and the simulator's region.
async fn auth(State((st, api)): State<(AppState, Api)>, req: Request, next: Next) -> Response {
    let h = req.headers();
    let query = req.uri().query().unwrap_or("");
    let region = &st.sim.settings().aws_region;
    let flavor = match api {
        Api::S3 => match s3::refuse(h, region) {
            Some(refusal) => return refusal,
            None => return next.run(req).await,
        },
        Api::Provider(ProviderKind::Bedrock) => match bedrock::refuse(h, region) {
            Some(refusal) => return refusal,
            None => return next.run(req).await,
        },
        Api::Provider(flavor) => flavor,
    };
    let refused = match flavor {
        ProviderKind::OpenAi => openai::refuse_key(h),
        ProviderKind::Azure => openai::refuse_azure_key(h, query),
        ProviderKind::Anthropic => anthropic::refuse_key(h),
        ProviderKind::Gemini => gemini::refuse_key(h, query),
        ProviderKind::Bedrock => None,
    };
    if let Some((status, message)) = refused {
        return SimError {
            status,
            kind: "invalid_request_error",
            code: None,
            message: message.into(),
        }
        .into_flavored(flavor);
    }
    next.run(req).await
}

/// HTTP-level faults, drawn per call before the handler runs (so they never take effect),
/// in the provider's own error shape (S3: `SlowDown` for throttling, as S3 answers).
async fn faults(State((st, api)): State<(AppState, Api)>, req: Request, next: Next) -> Response {
    let s = st.sim.settings();
    if s.http_429_rate > 0.0 || s.http_500_rate > 0.0 {
        let n = st.calls.fetch_add(1, Ordering::Relaxed);
        let u = draw(s.seed, "http", &n.to_string());
        let request_id = client_request_id(req.headers());
        if u < s.http_429_rate + s.http_500_rate {
            st.sim
                .note_refused(&request_id, if u < s.http_429_rate { 429 } else { 500 });
        }
        let flavor = match api {
            Api::S3 if u < s.http_429_rate => return s3::slow_down(),
            Api::S3 if u < s.http_429_rate + s.http_500_rate => return s3::internal_error(),
            Api::S3 => return next.run(req).await,
            Api::Provider(flavor) => flavor,
        };
        if u < s.http_429_rate {
            let ms = s.retry_after_ms;
            let mut resp = match flavor {
                ProviderKind::Gemini => (
                    StatusCode::TOO_MANY_REQUESTS,
                    Json(gemini::rate_limited(ms)),
                )
                    .into_response(),
                _ => SimError {
                    status: 429,
                    kind: "requests",
                    code: Some("rate_limit_exceeded"),
                    message: "Rate limit reached for requests. Please try again later.".into(),
                }
                .into_flavored(flavor),
            };
            // Gemini says when in its body; AWS says nothing.
            if !matches!(flavor, ProviderKind::Gemini | ProviderKind::Bedrock) {
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

/// A path no route takes: a bare 404, except where an S3 client set the endpoint without its
/// trailing slash (aws-sdk-s3 then glues the bucket to the path: `/s3my-bucket/key`).
async fn unrouted(req: Request) -> Response {
    let path = req.uri().path();
    if path.starts_with("/s3") && !path.starts_with("/s3/") {
        return s3::error(
            404,
            "NoSuchBucket",
            &format!(
                "No route for {path}: the simulator serves S3 at ROOT/s3/ (path style); set the S3 endpoint to ROOT/s3/ with the trailing slash, or aws-sdk-s3 glues the bucket name to the path"
            ),
        );
    }
    StatusCode::NOT_FOUND.into_response()
}

async fn record(State(st): State<AppState>) -> Result<Json<Value>, SimError> {
    let sim = st.sim.clone();
    blocking(move || Ok(Json(sim.record()))).await
}
