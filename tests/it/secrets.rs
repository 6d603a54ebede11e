//! The API key never leaves the process. A gateway in front of the provider that echoes
//! the whole key in its 401, or every request header in its 500s, is run here on loopback;
//! the real binary runs a pipeline against it (every provider kind, text and JSON logs,
//! every log level), and neither its stdout, its stderr, any file under the pipeline's
//! folder (the SQLite store and its WAL read as raw bytes) nor the reports on that store
//! hold any piece of the key.

use std::collections::HashSet;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::common::*;

/// A key of no known shape: only masking by value can catch it in free text.
const KEY: &str = "gw-live-7f3a9c1e5b2d4086-NSSECRETKEY-aa91c4e7d2b6f083d5";
const KEY_ENV: &str = "NS_SECRETS_TEST_KEY";
/// The shortest piece of the key none of the outputs may hold (the redactor's fragment).
const PIECE: usize = 12;

#[derive(Clone, Copy, Debug)]
enum Echo {
    /// 401 `Incorrect API key provided: <the whole key>`.
    KeyIn401,
    /// 500 quoting every request header (plain text for POSTs, a JSON envelope for GETs).
    HeadersIn500,
}

/// The gateway: a loopback server that answers every request with its echo.
struct Gateway {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    _rt: tokio::runtime::Runtime,
}

#[derive(Clone)]
struct GatewayState {
    echo: Echo,
    requests: Arc<AtomicUsize>,
}

impl Gateway {
    fn start(echo: Echo) -> Gateway {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let state = GatewayState {
            echo,
            requests: requests.clone(),
        };
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(answer).with_state(state);
        rt.spawn(async move { axum::serve(listener, app).await });
        Gateway {
            addr,
            requests,
            _rt: rt,
        }
    }
}

/// The credential the request carried, in whichever place its provider kind puts it.
fn presented_key(headers: &HeaderMap, uri: &Uri) -> String {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(v) = header("authorization") {
        return v.trim_start_matches("Bearer ").to_string();
    }
    for name in ["api-key", "x-api-key", "x-goog-api-key"] {
        if let Some(v) = header(name) {
            return v.to_string();
        }
    }
    uri.query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("key="))
        .unwrap_or("")
        .to_string()
}

async fn answer(
    State(st): State<GatewayState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    _body: Bytes,
) -> Response {
    st.requests.fetch_add(1, Ordering::SeqCst);
    match st.echo {
        Echo::KeyIn401 => {
            let key = presented_key(&headers, &uri);
            let body = json!({"error": {
                "message": format!("Incorrect API key provided: {key}. You can find your API key at https://platform.example/account/api-keys."),
                "type": "invalid_request_error",
                "param": null,
                "code": "invalid_api_key",
            }});
            (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response()
        }
        Echo::HeadersIn500 => {
            let mut dump = format!("{method} {uri}\n");
            for (name, value) in &headers {
                dump.push_str(&format!(
                    "{name}: {}\n",
                    String::from_utf8_lossy(value.as_bytes())
                ));
            }
            if method == Method::GET {
                let body = json!({"error": {"message": format!("upstream failed; request was {dump}"), "code": "upstream_error"}});
                (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body)).into_response()
            } else {
                let text = format!("upstream failed; request was:\n{dump}");
                (StatusCode::INTERNAL_SERVER_ERROR, text).into_response()
            }
        }
    }
}

/// `[provider]` lines pointing a pipeline of `kind` at the gateway.
fn provider_lines(kind: &str, gw: &Gateway) -> String {
    let root = format!("http://{}", gw.addr);
    let (model, base, extra) = match kind {
        "openai" => ("gpt-5.4-mini", format!("{root}/v1"), ""),
        "azure" => ("gpt-4.1-mini", root, "deployment = \"gpt-4.1-mini\"\n"),
        "anthropic" => ("claude-haiku-4-5", root, ""),
        "gemini" => ("gemini-2.5-flash", root, ""),
        other => panic!("{other}"),
    };
    format!(
        "kind = \"{kind}\"\nmodel = \"{model}\"\n{extra}simulate = false\nbase_url = \"{base}\"\napi_key_env = \"{KEY_ENV}\"\nrequest_timeout_seconds = 2\nreconcile_grace_seconds = 0\n"
    )
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nightshift"));
    c.env_remove("NIGHTSHIFT_DB")
        .env_remove("RUST_LOG")
        .env_remove("NIGHTSHIFT_FAILPOINTS")
        .env_remove("NIGHTSHIFT_LOG_FORMAT");
    c
}

/// Reads a pipe to the end on its own thread, counting lines that contain `needle`.
fn drain(
    mut pipe: impl Read + Send + 'static,
    needle: &'static str,
) -> (
    Arc<Mutex<Vec<u8>>>,
    Arc<AtomicUsize>,
    std::thread::JoinHandle<()>,
) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let hits = Arc::new(AtomicUsize::new(0));
    let (b, h) = (buf.clone(), hits.clone());
    let t = std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        // Complete lines before this offset are counted already.
        let mut counted = 0;
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut all = b.lock().unwrap();
                    all.extend_from_slice(&chunk[..n]);
                    if let Some(nl) = all[counted..].iter().rposition(|&c| c == b'\n') {
                        let end = counted + nl + 1;
                        let new = String::from_utf8_lossy(&all[counted..end])
                            .lines()
                            .filter(|l| l.contains(needle))
                            .count();
                        h.fetch_add(new, Ordering::SeqCst);
                        counted = end;
                    }
                }
            }
        }
    });
    (buf, hits, t)
}

/// What one run left behind, by where it was found.
struct Run {
    stderr: String,
    blobs: Vec<(String, Vec<u8>)>,
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

fn snapshot(dir: &Path, when: &str, blobs: &mut Vec<(String, Vec<u8>)>) {
    for f in files_under(dir) {
        // A file may be renamed away between listing and reading.
        if let Ok(bytes) = std::fs::read(&f) {
            blobs.push((format!("{when}: {}", f.display()), bytes));
        }
    }
}

/// Runs the pipeline against a gateway answering with `echo` until the run ends (or, for
/// 500s, until a few retries were logged), then reads the reports on its store.
fn run_against(kind: &str, echo: Echo, log_format: &str) -> Run {
    let gw = Gateway::start(echo);
    let dir = tempfile::tempdir().unwrap();
    write_source(dir.path(), 6, 0, 0);
    let pipeline = write_pipeline(dir.path(), 2, 100, "");
    let text = std::fs::read_to_string(&pipeline).unwrap().replace(
        "kind = \"openai\"\nmodel = \"gpt-5.4-mini\"\nsimulate = true\n",
        &provider_lines(kind, &gw),
    );
    std::fs::write(&pipeline, text).unwrap();

    let mut child = bin()
        .args(["--log-format", log_format, "run", "--no-progress"])
        .arg(&pipeline)
        .env(KEY_ENV, KEY)
        .env("NIGHTSHIFT_LOG", "trace")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (out, _, out_t) = drain(child.stdout.take().unwrap(), "retrying");
    let (err, retries, err_t) = drain(child.stderr.take().unwrap(), "retrying");
    // GETs answered 500 are retried with backoff for minutes: three logged retries are
    // enough to judge what the retry lines say.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        let enough = matches!(echo, Echo::HeadersIn500) && retries.load(Ordering::SeqCst) >= 3;
        if enough || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    out_t.join().unwrap();
    err_t.join().unwrap();
    let stdout = std::mem::take(&mut *out.lock().unwrap());
    let stderr = std::mem::take(&mut *err.lock().unwrap());
    assert!(
        gw.requests.load(Ordering::SeqCst) > 0,
        "{kind}: the gateway was never asked:\n{}",
        String::from_utf8_lossy(&stderr)
    );

    let mut blobs = vec![
        ("run stdout".to_string(), stdout),
        ("run stderr".to_string(), stderr.clone()),
    ];
    snapshot(dir.path(), "after the run", &mut blobs);
    for args in [
        &["report"][..],
        &["report", "--json"],
        &["report", "--items"],
        &["report", "--items", "--json"],
        &["status"],
    ] {
        let o = bin()
            .args(["--log-format", log_format])
            .args(args)
            .arg(&pipeline)
            .env("NIGHTSHIFT_LOG", "trace")
            .output()
            .unwrap();
        let what = args.join(" ");
        blobs.push((format!("`{what}` stdout"), o.stdout));
        blobs.push((format!("`{what}` stderr"), o.stderr));
    }
    snapshot(dir.path(), "after the reports", &mut blobs);
    Run {
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        blobs,
    }
}

/// Fails if any blob holds the key or any piece of it of `PIECE` bytes.
fn assert_no_key(kind: &str, echo: Echo, log_format: &str, run: &Run) {
    let pieces: HashSet<&[u8]> = KEY.as_bytes().windows(PIECE).collect();
    for (where_, bytes) in &run.blobs {
        if let Some(at) = bytes.windows(PIECE).position(|w| pieces.contains(w)) {
            let from = at.saturating_sub(120);
            let to = (at + 120).min(bytes.len());
            panic!(
                "{kind} {echo:?} --log-format {log_format}: the key leaked into {where_}: …{}…",
                String::from_utf8_lossy(&bytes[from..to]).replace('\n', "⏎")
            );
        }
    }
}

fn check(kind: &str) {
    for echo in [Echo::KeyIn401, Echo::HeadersIn500] {
        for log_format in ["text", "json"] {
            let run = run_against(kind, echo, log_format);
            assert_no_key(kind, echo, log_format, &run);
            // Not vacuous: the echo came back, and was masked, not lost.
            let err = &run.stderr;
            match echo {
                Echo::KeyIn401 => {
                    assert!(
                        err.contains("refused the API key") && err.contains("provided: ***"),
                        "{kind} {log_format}: {err}"
                    );
                    // The run's error reached the store (and the report), masked.
                    for place in ["state.db", "`report` stdout"] {
                        assert!(
                            run.blobs.iter().any(|(w, b)| w.contains(place)
                                && b.windows(14).any(|x| x == b"provided: ***.")),
                            "{kind} {log_format}: nothing masked in {place}"
                        );
                    }
                }
                Echo::HeadersIn500 => {
                    let retries = err
                        .lines()
                        .filter(|l| l.contains("retrying") && l.contains("HTTP 500"))
                        .count();
                    assert!(retries >= 3, "{kind} {log_format}: {err}");
                    // The echoed credential header, masked (text logs print the body's
                    // line breaks as they are, JSON logs escape them).
                    let masked = match kind {
                        "openai" => "authorization: Bearer ***",
                        "azure" => "api-key: ***",
                        "anthropic" => "x-api-key: ***",
                        _ => "x-goog-api-key: ***",
                    };
                    assert!(err.contains(masked), "{kind} {log_format}: {err}");
                }
            }
        }
    }
}

#[test]
fn an_openai_gateway_echoing_the_key_never_gets_it_into_logs_store_or_reports() {
    check("openai");
}

#[test]
fn an_azure_gateway_echoing_the_key_never_gets_it_into_logs_store_or_reports() {
    check("azure");
}

#[test]
fn an_anthropic_gateway_echoing_the_key_never_gets_it_into_logs_store_or_reports() {
    check("anthropic");
}

#[test]
fn a_gemini_gateway_echoing_the_key_never_gets_it_into_logs_store_or_reports() {
    check("gemini");
}
