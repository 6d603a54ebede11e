//! HTTP plumbing shared by the provider clients: [`Http`] (the client, its retry policy and
//! its [`Redactor`]), classification of failures into [`ProviderError`] variants,
//! `retry-after` parsing, and the retry loop for idempotent requests.
//!
//! Every text that comes back from the provider passes the redactor here, before it is cut
//! to a preview, logged (retry lines) or returned in an error: error bodies, transport
//! errors, unreadable bodies, interrupted downloads. Provider error bodies can also quote
//! prompts; only a bounded preview of them ever reaches an error message, and request
//! headers (which carry the key) are never logged.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use reqwest::header::HeaderMap;
use reqwest::{RequestBuilder, Response, StatusCode};
use secrecy::SecretString;

use super::ProviderError;
use super::redact::Redactor;
use crate::util::text::preview;

/// The most of an error body that is read.
const ERROR_BODY_CAP: usize = 64 * 1024;
/// The most of an unreadable body that is scrubbed for its preview.
const PREVIEW_SOURCE_CAP: usize = 16 * 1024;

/// Bytes per read of a file sent as a request body, and per write of a downloaded file.
/// Each read or write of a `tokio::fs::File` is a hand-off to the blocking pool: at
/// `ReaderStream`'s default of 4 KB a 60 MB batch file took 15,000 of them.
pub const FILE_CHUNK: usize = 256 * 1024;

/// A file as a stream of `FILE_CHUNK`-sized pieces, for a request body.
pub fn file_stream(file: tokio::fs::File) -> tokio_util::io::ReaderStream<tokio::fs::File> {
    tokio_util::io::ReaderStream::with_capacity(file, FILE_CHUNK)
}

/// How GETs are retried.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub max_times: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// A `retry-after` longer than this is not waited out here: the error goes back to the
    /// caller, whose own loop comes back later.
    pub max_retry_after: Duration,
    /// No retry starts after this long: the error goes back to the caller, who decides
    /// whether the provider is unreachable (`provider.unreachable_timeout_seconds`).
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_times: 8,
            min_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(120),
            max_elapsed: Duration::from_secs(120),
        }
    }
}

/// Reads `retry-after-ms`, then `retry-after` (seconds or an HTTP date).
pub fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let v = headers.get("retry-after")?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<f64>()
        && secs.is_finite()
        && secs >= 0.0
    {
        return Some(Duration::from_secs_f64(secs));
    }
    let when =
        time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc2822).ok()?;
    let delta = when - time::OffsetDateTime::now_utc();
    Some(Duration::from_secs_f64(delta.as_seconds_f64().max(0.0)))
}

/// The `message` (and `code`) of a provider error envelope, or a bounded preview of the
/// body; scrubbed before they are cut.
pub fn error_message(body: &str, redactor: &Redactor) -> (Option<String>, String) {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(body) {
        let e = v.get("error").unwrap_or(&v);
        // The parsed strings too: JSON escapes (`\u0073k-…`) would hide a key from the raw body.
        let msg = e
            .get("message")
            .and_then(|m| m.as_str())
            .map(|m| preview(&redactor.scrub(m), 300));
        let code = e
            .get("code")
            .and_then(|c| c.as_str())
            .or_else(|| e.get("type").and_then(|t| t.as_str()))
            .map(|c| preview(&redactor.scrub(c), 100));
        if let Some(m) = msg {
            return (code, m);
        }
    }
    (None, preview(&redactor.scrub(body.trim()), 160))
}

/// Google's `RetryInfo.retryDelay` (`"58s"`) in an error body's details.
fn retry_delay(body: &str) -> Option<Duration> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v.pointer("/error/details")?
        .as_array()?
        .iter()
        .find_map(|d| d.get("retryDelay")?.as_str())
        .and_then(|s| s.strip_suffix('s')?.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

/// Turns an unsuccessful response into an error. `effectful` marks a request that changes
/// state at the provider (a POST): a 5xx after sending it is ambiguous.
pub fn classify_status(
    status: StatusCode,
    headers: &HeaderMap,
    body: &str,
    effectful: bool,
    redactor: &Redactor,
) -> ProviderError {
    let (code, message) = error_message(body, redactor);
    let should_retry = headers
        .get("x-should-retry")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.eq_ignore_ascii_case("true"));
    let s = status.as_u16();
    match s {
        401 | 403 => ProviderError::Auth { status: s, message },
        429 if code.as_deref() == Some("insufficient_quota") => ProviderError::Permanent {
            status: Some(s),
            code,
            message,
        },
        _ if should_retry == Some(false) => ProviderError::Permanent {
            status: Some(s),
            code,
            message,
        },
        408 | 409 | 429 => ProviderError::Transient {
            status: Some(s),
            retry_after: parse_retry_after(headers).or_else(|| retry_delay(body)),
            message,
        },
        500..=599 if effectful => ProviderError::Ambiguous {
            message: format!("HTTP {s}: {message}"),
        },
        500..=599 => ProviderError::Transient {
            status: Some(s),
            retry_after: parse_retry_after(headers),
            message,
        },
        _ => ProviderError::Permanent {
            status: Some(s),
            code,
            message,
        },
    }
}

/// Turns a transport failure into an error. A refused connection never reached the provider;
/// anything later (timeout, reset) may have, if the request changes state.
pub fn classify_transport(
    err: &reqwest::Error,
    effectful: bool,
    redactor: &Redactor,
) -> ProviderError {
    // reqwest's Display can carry the URL (and a URL the provider handed us, its query).
    let message = redactor.scrub_string(err.to_string());
    if err.is_connect() || !effectful {
        ProviderError::Transient {
            status: None,
            retry_after: None,
            message,
        }
    } else {
        ProviderError::Ambiguous { message }
    }
}

/// Reads at most `cap + 1` bytes of a body (one more than kept, to tell a cut body).
async fn read_capped(mut resp: Response, cap: usize) -> Vec<u8> {
    let mut buf = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        let room = (cap + 1).saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if buf.len() > cap {
            break;
        }
    }
    buf
}

/// The HTTP client of one provider client: requests go out through it, and every failure
/// comes back as a [`ProviderError`] whose text has passed its [`Redactor`].
#[derive(Debug)]
pub struct Http {
    client: reqwest::Client,
    policy: RetryPolicy,
    redactor: Redactor,
}

impl Http {
    /// A client for a provider that is sent `key`: connect timeout 10 s, `request_timeout`
    /// between reads.
    pub fn new(
        key: &SecretString,
        request_timeout: Duration,
        policy: RetryPolicy,
    ) -> Result<Http, ProviderError> {
        let redactor = Redactor::new(key);
        let client = reqwest::Client::builder()
            .user_agent(concat!("nightshift/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(request_timeout)
            .build()
            .map_err(|e| {
                ProviderError::Protocol(format!(
                    "cannot build the HTTP client: {}",
                    redactor.scrub(&e.to_string())
                ))
            })?;
        Ok(Http {
            client,
            policy,
            redactor,
        })
    }

    /// A request (the caller adds the credentials).
    pub fn request(&self, method: reqwest::Method, url: &str) -> RequestBuilder {
        self.client.request(method, url)
    }

    /// What masks the key in provider texts this client did not build itself (result
    /// lines, batch objects).
    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    /// Sends a request once and classifies any failure; the body of an error is read
    /// (bounded) and scrubbed.
    pub async fn send_once(
        &self,
        req: RequestBuilder,
        effectful: bool,
    ) -> Result<Response, ProviderError> {
        let resp = req
            .send()
            .await
            .map_err(|e| classify_transport(&e, effectful, &self.redactor))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let headers = resp.headers().clone();
        let raw = read_capped(resp, ERROR_BODY_CAP).await;
        let body = self.redactor.scrub_head(&raw, ERROR_BODY_CAP);
        Err(classify_status(
            status,
            &headers,
            &body,
            effectful,
            &self.redactor,
        ))
    }

    /// Sends an idempotent request (a GET, or a POST that may be repeated), retrying
    /// transient failures with exponential backoff and jitter, honouring `retry-after`.
    /// Each retry is logged with the (scrubbed) error.
    pub async fn send_idempotent(
        &self,
        what: &str,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Response, ProviderError> {
        let policy = &self.policy;
        let backoff = ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(policy.min_delay)
            .with_max_delay(policy.max_delay)
            .with_max_times(policy.max_times);
        let max_ra = policy.max_retry_after;
        let started = std::time::Instant::now();
        let max_elapsed = policy.max_elapsed;
        (|| async { self.send_once(build(), false).await })
            .retry(backoff)
            .when(move |e| e.is_transient() && started.elapsed() < max_elapsed)
            .adjust(move |e, dur| match (e.retry_after(), dur) {
                (_, None) => None,
                (Some(ra), Some(_)) if ra > max_ra => None,
                (Some(ra), Some(_)) => Some(ra),
                (None, d) => d,
            })
            .notify(|e, dur| {
                tracing::info!(request = what, error = %e, retry_in_ms = dur.as_millis() as u64, "retrying");
            })
            .await
    }

    /// A body read failure (the connection broke off mid-body), scrubbed; `Ambiguous` when
    /// the request changed state at the provider.
    pub fn body_error(&self, what: &str, e: &reqwest::Error, effectful: bool) -> ProviderError {
        let message = self.redactor.scrub_string(format!("reading {what}: {e}"));
        if effectful {
            ProviderError::Ambiguous { message }
        } else {
            ProviderError::Transient {
                status: None,
                retry_after: None,
                message,
            }
        }
    }

    /// Reads a JSON response body (bounded). A body that does not parse is quoted, scrubbed,
    /// in the error.
    pub async fn json_body<T: serde::de::DeserializeOwned>(
        &self,
        resp: Response,
        what: &str,
    ) -> Result<T, ProviderError> {
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| self.body_error(what, &e, false))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            // serde's message can quote the value it choked on.
            let why = self.redactor.scrub_string(e.to_string());
            let head = self.redactor.scrub_head(&bytes, PREVIEW_SOURCE_CAP);
            ProviderError::Protocol(format!(
                "{what}: {why}; body starts {}",
                preview(&head, 120)
            ))
        })
    }

    /// Streams a response body to `dest` (private; via a temporary file renamed when
    /// complete), refusing more than `cap` bytes (announced or counted). A download that
    /// breaks off leaves nothing behind. Downloads are never reused across a crash, so no
    /// fsync.
    pub async fn stream_to_file(
        &self,
        resp: Response,
        dest: &std::path::Path,
        cap: u64,
        what: &str,
    ) -> Result<u64, ProviderError> {
        use futures_util::StreamExt;
        if let Some(len) = resp.content_length()
            && len > cap
        {
            return Err(ProviderError::TooLarge { cap });
        }
        let mut part = PartFile::create(dest, cap)?;
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ProviderError::Transient {
                status: None,
                retry_after: None,
                message: self
                    .redactor
                    .scrub_string(format!("download of {what} interrupted: {e}")),
            })?;
            part.write(&chunk).await?;
        }
        part.commit().await
    }
}

/// A download being written: a private temporary file beside `dest`, renamed onto it once
/// complete and removed if dropped before, its bytes counted against a cap. Downloads are
/// never reused across a crash, so no fsync.
pub struct PartFile {
    tmp: std::path::PathBuf,
    dest: std::path::PathBuf,
    file: Option<tokio::io::BufWriter<tokio::fs::File>>,
    total: u64,
    cap: u64,
}

impl PartFile {
    pub fn create(dest: &std::path::Path, cap: u64) -> Result<PartFile, ProviderError> {
        let dir = dest.parent().unwrap_or(std::path::Path::new("."));
        crate::util::fs::create_private_dir_all(dir)?;
        let tmp = dir.join(format!(
            ".{}.part-{}",
            dest.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            std::process::id()
        ));
        let file = tokio::io::BufWriter::with_capacity(
            FILE_CHUNK,
            tokio::fs::File::from_std(crate::util::fs::create_private(&tmp)?),
        );
        Ok(PartFile {
            tmp,
            dest: dest.to_path_buf(),
            file: Some(file),
            total: 0,
            cap,
        })
    }

    /// Appends `bytes`, refusing to go over the cap.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), ProviderError> {
        use tokio::io::AsyncWriteExt;
        self.total += bytes.len() as u64;
        if self.total > self.cap {
            return Err(ProviderError::TooLarge { cap: self.cap });
        }
        crate::failpoint!("download.mid");
        if let Some(f) = &mut self.file {
            f.write_all(bytes).await?;
        }
        Ok(())
    }

    /// Flushes and moves the file into place; the bytes written.
    pub async fn commit(mut self) -> Result<u64, ProviderError> {
        use tokio::io::AsyncWriteExt;
        if let Some(mut f) = self.file.take() {
            f.flush().await?;
        }
        std::fs::rename(&self.tmp, &self.dest)?;
        Ok(self.total)
    }
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn none() -> Redactor {
        Redactor::shapes_only()
    }

    const KEY: &str = "gw-0f9e8d7c6b5a49382716ZYXWVUTSRQPONMLK";

    fn keyed() -> Redactor {
        Redactor::new(&SecretString::from(KEY.to_string()))
    }

    #[test]
    fn retry_after_prefers_milliseconds() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", HeaderValue::from_static("150"));
        assert_eq!(parse_retry_after(&h), Some(Duration::from_millis(150)));
    }

    #[test]
    fn a_5xx_on_a_post_is_ambiguous_and_on_a_get_transient() {
        let h = HeaderMap::new();
        let body = r#"{"error":{"message":"boom","type":"server_error","param":null,"code":null}}"#;
        assert!(matches!(
            classify_status(StatusCode::INTERNAL_SERVER_ERROR, &h, body, true, &none()),
            ProviderError::Ambiguous { .. }
        ));
        assert!(matches!(
            classify_status(StatusCode::INTERNAL_SERVER_ERROR, &h, body, false, &none()),
            ProviderError::Transient { .. }
        ));
    }

    #[test]
    fn quota_exhaustion_and_should_retry_false_are_final() {
        let h = HeaderMap::new();
        let quota = r#"{"error":{"message":"You exceeded your quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
        assert!(matches!(
            classify_status(StatusCode::TOO_MANY_REQUESTS, &h, quota, false, &none()),
            ProviderError::Permanent { .. }
        ));
        let mut h = HeaderMap::new();
        h.insert("x-should-retry", HeaderValue::from_static("false"));
        assert!(matches!(
            classify_status(StatusCode::SERVICE_UNAVAILABLE, &h, "{}", false, &none()),
            ProviderError::Permanent { .. }
        ));
        assert!(matches!(
            classify_status(
                StatusCode::UNAUTHORIZED,
                &HeaderMap::new(),
                "{}",
                false,
                &none()
            ),
            ProviderError::Auth { status: 401, .. }
        ));
    }

    #[test]
    fn a_401_that_echoes_the_whole_key_never_carries_it() {
        // A gateway's OpenAI-shaped refusal, with a key that has no recognisable shape.
        let body = format!(
            r#"{{"error":{{"message":"Incorrect API key provided: {KEY}. You can find your API key at https://platform.example/account/api-keys.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}}}"#
        );
        let e = classify_status(
            StatusCode::UNAUTHORIZED,
            &HeaderMap::new(),
            &body,
            false,
            &keyed(),
        );
        let ProviderError::Auth {
            status,
            ref message,
        } = e
        else {
            panic!("{e:?}")
        };
        assert_eq!(status, 401);
        assert!(
            message.starts_with("Incorrect API key provided: ***."),
            "{message}"
        );
        for text in [e.to_string(), format!("{e:?}")] {
            assert!(!text.contains(&KEY[3..15]), "{text}");
        }
        // The same as plain text, long enough that the preview cuts where the key stands.
        let body = format!("{}Incorrect API key provided: {KEY}", "-".repeat(140));
        let e = classify_status(
            StatusCode::UNAUTHORIZED,
            &HeaderMap::new(),
            &body,
            true,
            &keyed(),
        );
        assert!(!e.to_string().contains(&KEY[..6]), "{e}");
        // JSON escapes do not hide it either.
        let escaped = KEY.replacen('g', "\\u0067", 1);
        let body = format!(r#"{{"error":{{"message":"bad key {escaped}"}}}}"#);
        let e = classify_status(
            StatusCode::FORBIDDEN,
            &HeaderMap::new(),
            &body,
            false,
            &keyed(),
        );
        assert!(!e.to_string().contains(&KEY[3..15]), "{e}");
    }

    #[test]
    fn a_5xx_that_echoes_the_request_headers_never_carries_them() {
        let body = format!(
            "upstream failed; request was:\nGET /v1/batches HTTP/1.1\nAuthorization: Bearer {KEY}\napi-key: {KEY}\nx-api-key: {KEY}\nx-goog-api-key: {KEY}\nuser-agent: nightshift/0"
        );
        for r in [keyed(), none()] {
            let e = classify_status(StatusCode::BAD_GATEWAY, &HeaderMap::new(), &body, false, &r);
            assert!(e.is_transient());
            assert!(!e.to_string().contains(&KEY[3..15]), "{e}");
        }
    }
}
