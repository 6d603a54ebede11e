//! The simulator's HTTP server (axum): starting and stopping it, and its router, one route
//! group per provider wire format (`openai`: OpenAI `/v1/files`, `/v1/batches`,
//! `/v1/chat/completions` and Azure `/openai/...`; `anthropic`: `/v1/messages/batches`,
//! `/v1/messages`; `gemini`: `/v1beta/...`, `/upload/v1beta/files`,
//! `/download/v1beta/files`) plus `/_sim/record`. Each group checks its provider's
//! credentials header and injects HTTP faults in its provider's error shape
//! (docs/providers.md §7.3).

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
use super::{Sim, anthropic, gemini, openai};

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

fn group(state: &AppState, flavor: ProviderKind, routes: Router<AppState>) -> Router<AppState> {
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
    Router::new()
        .merge(group(&state, ProviderKind::OpenAi, openai::routes()))
        .merge(group(&state, ProviderKind::Azure, openai::azure_routes()))
        .merge(group(&state, ProviderKind::Anthropic, anthropic::routes()))
        .merge(group(&state, ProviderKind::Gemini, gemini::routes()))
        .route("/_sim/record", get(record))
        .with_state(state)
}

/// Each provider's credentials: any non-empty key is accepted; a missing one gets the
/// provider's own refusal.
async fn auth(State(flavor): State<ProviderKind>, req: Request, next: Next) -> Response {
    let h = req.headers();
    let query = req.uri().query().unwrap_or("");
    let refused = match flavor {
        ProviderKind::OpenAi | ProviderKind::Bedrock => openai::refuse_key(h),
        ProviderKind::Azure => openai::refuse_azure_key(h, query),
        ProviderKind::Anthropic => anthropic::refuse_key(h),
        ProviderKind::Gemini => gemini::refuse_key(h, query),
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
/// in the provider's own error shape.
async fn faults(
    State((st, flavor)): State<(AppState, ProviderKind)>,
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
            if flavor != ProviderKind::Gemini {
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

async fn record(State(st): State<AppState>) -> Result<Json<Value>, SimError> {
    let sim = st.sim.clone();
    blocking(move || Ok(Json(sim.record()))).await
}
