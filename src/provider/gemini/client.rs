//! The Gemini Batch API client.
//!
//! Our local batch id travels as the batch's `displayName` (Gemini has no metadata), which
//! is how a batch whose create was ambiguous is found again. Names the provider hands back
//! (`files/…`, `batches/…`) are checked before they become part of a URL.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

use super::INLINE_LIMIT_BYTES;
use super::codec::GeminiCodec;
use super::types::{FileEnvelope, FileList, Operation, OperationList};
use crate::provider::http::{Http, RetryPolicy};
use crate::provider::{
    BatchMeta, BatchProvider, Codec, CreateInput, ProviderError, RemoteBatch, RemoteStatus,
    RequestCounts, ResultLine,
};
use crate::util::text::preview;

const MAX_LIST_PAGES: usize = 20;
/// The output id of a batch whose answers came back inline.
const INLINE_PREFIX: &str = "inline:";

pub struct GeminiClient {
    base: String,
    key: SecretString,
    http: Http,
    model: String,
    codec: Codec,
}

impl std::fmt::Debug for GeminiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeminiClient")
            .field("base", &self.base)
            .field("key", &"**REDACTED**")
            .finish()
    }
}

/// `files/abc-1`, `batches/xyz`: a provider name safe to put in a URL path.
fn safe_name(name: &str, kind: &str) -> bool {
    name.strip_prefix(kind)
        .and_then(|r| r.strip_prefix('/'))
        .is_some_and(|id| {
            !id.is_empty()
                && id.len() <= 128
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn unix(t: &Option<String>) -> Option<i64> {
    t.as_deref().and_then(|s| {
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .ok()
            .map(|t| t.unix_timestamp())
    })
}

impl From<Operation> for RemoteBatch {
    fn from(op: Operation) -> Self {
        let md = op.metadata.unwrap_or_default();
        let state = md.state.clone().unwrap_or_default();
        let output = op.response.or(md.output);
        let out_id = output.as_ref().and_then(|o| {
            o.responses_file.clone().or_else(|| {
                o.inlined_responses
                    .as_ref()
                    .map(|_| format!("{INLINE_PREFIX}{}", op.name))
            })
        });
        let s = state
            .trim_start_matches("BATCH_STATE_")
            .trim_start_matches("JOB_STATE_");
        let status = match s {
            "PENDING" | "QUEUED" => RemoteStatus::Validating,
            "RUNNING" => RemoteStatus::InProgress,
            // SUCCEEDED can show before the output reference does: keep polling.
            "SUCCEEDED" if out_id.is_none() => RemoteStatus::Finalizing,
            "SUCCEEDED" => RemoteStatus::Completed,
            "FAILED" => RemoteStatus::Failed,
            "CANCELLED" => RemoteStatus::Cancelled,
            "CANCELLING" => RemoteStatus::Cancelling,
            "EXPIRED" => RemoteStatus::Expired,
            _ => RemoteStatus::Unknown,
        };
        let stats = md.batch_stats.unwrap_or_default();
        RemoteBatch {
            status,
            raw_status: state,
            output_file_id: out_id,
            error_file_id: None,
            counts: Some(RequestCounts {
                total: stats.request_count.0,
                completed: stats.successful_request_count.0,
                failed: stats.failed_request_count.0,
            }),
            usage: None,
            errors: op.error.and_then(|e| e.message).into_iter().collect(),
            local_id: md.display_name,
            created_at: unix(&md.create_time),
            id: op.name,
        }
    }
}

impl GeminiClient {
    pub fn new(
        base_url: &str,
        key: SecretString,
        request_timeout: Duration,
        policy: RetryPolicy,
        model: &str,
    ) -> Result<Self, ProviderError> {
        let http = Http::new(&key, request_timeout, policy)?;
        Ok(GeminiClient {
            base: base_url.trim_end_matches('/').to_string(),
            key,
            http,
            model: model.trim_start_matches("models/").to_string(),
            codec: Codec::Gemini(GeminiCodec),
        })
    }

    fn req_url(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, url)
            .header("x-goog-api-key", self.key.expose_secret())
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.req_url(method, &format!("{}{path}", self.base))
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, ProviderError> {
        let resp = self
            .http
            .send_idempotent(what, || self.req(reqwest::Method::GET, path).query(query))
            .await?;
        self.http.json_body(resp, what).await
    }

    /// Refuses a name that fails [`safe_name`], quoting it scrubbed.
    fn checked(&self, name: &str, kind: &str) -> Result<(), ProviderError> {
        if safe_name(name, kind) {
            return Ok(());
        }
        Err(ProviderError::Protocol(format!(
            "unexpected {kind} name from the provider: {}",
            preview(&self.http.redactor().scrub(name), 80)
        )))
    }

    /// A batch as the provider described it, its texts scrubbed.
    fn remote(&self, op: Operation) -> RemoteBatch {
        self.http.redactor().batch(op.into())
    }

    async fn operation(&self, name: &str) -> Result<Operation, ProviderError> {
        self.checked(name, "batches")?;
        self.get_json("get batch", &format!("/v1beta/{name}"), &[])
            .await
    }
}

impl BatchProvider for GeminiClient {
    fn endpoint(&self) -> &str {
        &self.base
    }
    fn kind(&self) -> &'static str {
        "gemini"
    }
    fn codec(&self) -> &Codec {
        &self.codec
    }

    fn uploads(&self, bytes: u64) -> bool {
        bytes > INLINE_LIMIT_BYTES
    }

    async fn upload(&self, filename: &str, path: &Path) -> Result<String, ProviderError> {
        let len = tokio::fs::metadata(path).await?.len();
        // Step 1 (harmless): open an upload session.
        let start = self
            .req(reqwest::Method::POST, "/upload/v1beta/files")
            .header("X-Goog-Upload-Protocol", "resumable")
            .header("X-Goog-Upload-Command", "start")
            .header("X-Goog-Upload-Header-Content-Length", len.to_string())
            .header("X-Goog-Upload-Header-Content-Type", "application/jsonl")
            .json(&json!({"file": {"display_name": filename}}));
        let resp = self.http.send_once(start, false).await?;
        let url = resp
            .headers()
            .get("x-goog-upload-url")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| {
                ProviderError::Protocol("no x-goog-upload-url in the upload answer".into())
            })?;
        // The key goes only to the provider's own host.
        let host = |u: &str| {
            reqwest::Url::parse(u)
                .ok()
                .map(|u| (u.host_str().map(str::to_string), u.port_or_known_default()))
        };
        if host(&url) != host(&self.base) {
            return Err(ProviderError::Protocol(
                "the upload URL points to another host".into(),
            ));
        }
        // Step 2: the bytes, finalized in one go.
        let file = tokio::fs::File::open(path).await?;
        let body = reqwest::Body::wrap_stream(crate::provider::http::file_stream(file));
        let put = self
            .req_url(reqwest::Method::POST, &url)
            .header("X-Goog-Upload-Command", "upload, finalize")
            .header("X-Goog-Upload-Offset", "0")
            .header("content-length", len.to_string())
            .body(body);
        let resp = self.http.send_once(put, true).await?;
        let status = resp
            .headers()
            .get("x-goog-upload-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("final")
            .to_string();
        if status != "final" {
            return Err(ProviderError::Ambiguous {
                message: format!(
                    "upload ended with status `{}`, not `final`",
                    preview(&self.http.redactor().scrub(&status), 80)
                ),
            });
        }
        let f: FileEnvelope = self.http.json_body(resp, "upload response").await?;
        self.checked(&f.file.name, "files")?;
        Ok(f.file.name)
    }

    async fn find_files(&self, filename: &str) -> Result<Vec<String>, ProviderError> {
        let mut found = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_LIST_PAGES {
            let mut q = vec![("pageSize", "100".to_string())];
            if let Some(t) = &token {
                q.push(("pageToken", t.clone()));
            }
            let page: FileList = self.get_json("list files", "/v1beta/files", &q).await?;
            found.extend(
                page.files
                    .iter()
                    .filter(|f| f.display_name.as_deref() == Some(filename))
                    .filter(|f| safe_name(&f.name, "files"))
                    .map(|f| f.name.clone()),
            );
            token = page.next_page_token.filter(|t| !t.is_empty());
            if token.is_none() {
                break;
            }
        }
        Ok(found)
    }

    async fn delete_file(&self, file_id: &str) -> Result<(), ProviderError> {
        self.checked(file_id, "files")?;
        let path = format!("/v1beta/{file_id}");
        match self
            .http
            .send_idempotent("delete file", || self.req(reqwest::Method::DELETE, &path))
            .await
        {
            Ok(_)
            | Err(ProviderError::Permanent {
                status: Some(404), ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn create(
        &self,
        input: &CreateInput<'_>,
        meta: &BatchMeta<'_>,
    ) -> Result<RemoteBatch, ProviderError> {
        let config = match input.file_id {
            Some(f) => json!({"fileName": f}),
            None => {
                // Small batch: the requests inline, keyed in their metadata.
                let file = tokio::fs::File::open(input.path).await?;
                let mut lines = tokio::io::BufReader::new(file).lines();
                let mut requests = Vec::new();
                while let Some(line) = lines.next_line().await? {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let v: Value = serde_json::from_str(&line)
                        .map_err(|e| ProviderError::Protocol(format!("batch file line: {e}")))?;
                    requests.push(json!({"request": v["request"], "metadata": {"key": v["key"]}}));
                }
                json!({"requests": {"requests": requests}})
            }
        };
        let body = json!({"batch": {"displayName": meta.local_id, "inputConfig": config}});
        let path = format!("/v1beta/models/{}:batchGenerateContent", self.model);
        let req = self.req(reqwest::Method::POST, &path).json(&body);
        let resp = self.http.send_once(req, true).await?;
        let op: Operation =
            self.http
                .json_body(resp, "create response")
                .await
                .map_err(|e| match e {
                    ProviderError::Transient { message, .. } | ProviderError::Protocol(message) => {
                        ProviderError::Ambiguous { message }
                    }
                    other => other,
                })?;
        self.checked(&op.name, "batches")?;
        Ok(self.remote(op))
    }

    async fn find_batch(
        &self,
        local_id: &str,
        _since: i64,
        _request_count: u64,
        _known: &HashSet<String>,
    ) -> Result<Option<RemoteBatch>, ProviderError> {
        let mut token: Option<String> = None;
        for _ in 0..MAX_LIST_PAGES {
            let mut q = vec![("pageSize", "100".to_string())];
            if let Some(t) = &token {
                q.push(("pageToken", t.clone()));
            }
            let page: OperationList = self.get_json("list batches", "/v1beta/batches", &q).await?;
            for op in page.operations {
                let name = op.metadata.as_ref().and_then(|m| m.display_name.as_deref());
                if name == Some(local_id) && safe_name(&op.name, "batches") {
                    return Ok(Some(self.remote(op)));
                }
            }
            token = page.next_page_token.filter(|t| !t.is_empty());
            if token.is_none() {
                break;
            }
        }
        Ok(None)
    }

    async fn get(&self, id: &str) -> Result<RemoteBatch, ProviderError> {
        Ok(self.remote(self.operation(id).await?))
    }

    async fn cancel(&self, id: &str) -> Result<RemoteBatch, ProviderError> {
        self.checked(id, "batches")?;
        let path = format!("/v1beta/{id}:cancel");
        self.http
            .send_idempotent("cancel batch", || {
                self.req(reqwest::Method::POST, &path).json(&json!({}))
            })
            .await?;
        self.get(id).await
    }

    async fn download(&self, file_id: &str, dest: &Path, cap: u64) -> Result<u64, ProviderError> {
        if let Some(name) = file_id.strip_prefix(INLINE_PREFIX) {
            // Inline answers live in the operation itself: write them as lines.
            let op = self.operation(name).await?;
            let out = op.response.or(op.metadata.and_then(|m| m.output));
            let items = out
                .and_then(|o| o.inlined_responses)
                .map(|i| i.inlined_responses)
                .unwrap_or_default();
            let mut text = String::new();
            for item in items {
                text.push_str(&item.to_string());
                text.push('\n');
            }
            if text.len() as u64 > cap {
                return Err(ProviderError::TooLarge { cap });
            }
            let mut f = crate::util::fs::AtomicFile::create(dest)?;
            std::io::Write::write_all(&mut f, text.as_bytes())?;
            f.commit()?;
            return Ok(text.len() as u64);
        }
        self.checked(file_id, "files")?;
        let path = format!("/download/v1beta/{file_id}:download");
        let resp = self
            .http
            .send_idempotent("download results", || {
                self.req(reqwest::Method::GET, &path)
                    .query(&[("alt", "media")])
                    .timeout(Duration::from_secs(3600))
            })
            .await?;
        self.http.stream_to_file(resp, dest, cap, file_id).await
    }

    fn parse_result_line(&self, line: &[u8]) -> Result<ResultLine, String> {
        self.http
            .redactor()
            .result_line(self.codec.parse_line(line, self.http.redactor()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::LineOutcome;

    fn client() -> GeminiClient {
        GeminiClient::new(
            "http://127.0.0.1:9",
            SecretString::from("k".to_string()),
            Duration::from_secs(1),
            RetryPolicy::default(),
            "gemini-2.5-flash",
        )
        .unwrap()
    }

    #[test]
    fn operations_parse_with_string_counts_and_both_output_places() {
        let op: Operation = serde_json::from_str(r#"{"name":"batches/123456","metadata":{"@type":"type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch","model":"models/gemini-2.5-flash","name":"batches/123456","displayName":"L1","createTime":"2025-07-01T10:00:00.000000Z","batchStats":{"requestCount":"2","successfulRequestCount":"2","failedRequestCount":"0","pendingRequestCount":"0"},"state":"BATCH_STATE_SUCCEEDED","output":{"responsesFile":"files/batch-123456-responses"},"priority":"0"},"done":true,"response":{"@type":"x","responsesFile":"files/batch-123456-responses"}}"#).unwrap();
        let r: RemoteBatch = op.into();
        assert_eq!(r.status, RemoteStatus::Completed);
        assert_eq!(r.counts.unwrap().total, 2);
        assert_eq!(
            r.output_file_id.as_deref(),
            Some("files/batch-123456-responses")
        );
        assert_eq!(r.local_id.as_deref(), Some("L1"));
        // SUCCEEDED without an output reference yet: still finalizing.
        let lag: Operation = serde_json::from_str(
            r#"{"name":"batches/1","metadata":{"state":"BATCH_STATE_SUCCEEDED"},"done":true}"#,
        )
        .unwrap();
        assert_eq!(RemoteBatch::from(lag).status, RemoteStatus::Finalizing);
        let sdk: Operation = serde_json::from_str(
            r#"{"name":"batches/1","metadata":{"state":"JOB_STATE_RUNNING","newField":1}}"#,
        )
        .unwrap();
        assert_eq!(RemoteBatch::from(sdk).status, RemoteStatus::InProgress);
        let unknown: Operation = serde_json::from_str(
            r#"{"name":"batches/1","metadata":{"state":"BATCH_STATE_PAUSED"}}"#,
        )
        .unwrap();
        assert_eq!(RemoteBatch::from(unknown).status, RemoteStatus::Unknown);
        let inline: Operation = serde_json::from_str(r#"{"name":"batches/9","metadata":{"state":"BATCH_STATE_SUCCEEDED"},"response":{"inlinedResponses":{"inlinedResponses":[]}}}"#).unwrap();
        assert_eq!(
            RemoteBatch::from(inline).output_file_id.as_deref(),
            Some("inline:batches/9")
        );
    }

    #[test]
    fn response_lines_parse() {
        let c = client();
        let ok = br#"{"key":"request-1","response":{"candidates":[{"content":{"parts":[{"text":"hello"}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":7,"candidatesTokenCount":2,"totalTokenCount":9,"cachedContentTokenCount":3,"thoughtsTokenCount":4},"modelVersion":"gemini-2.5-flash","responseId":"x"}}"#;
        let l = c.parse_result_line(ok).unwrap();
        assert_eq!(l.custom_id, "request-1");
        let LineOutcome::Answer { content, usage, .. } = l.outcome else {
            panic!()
        };
        assert_eq!(content.as_deref(), Some("hello"));
        assert_eq!(
            (
                usage.input_tokens,
                usage.cached_input_tokens,
                usage.output_tokens,
                usage.reasoning_tokens
            ),
            (7, 3, 6, 4)
        );
        let err = br#"{"key":"request-2","error":{"code":400,"message":"bad","status":"INVALID_ARGUMENT"}}"#;
        assert!(matches!(
            c.parse_result_line(err).unwrap().outcome,
            LineOutcome::Error {
                status: Some(400),
                ..
            }
        ));
        let inline = br#"{"response":{"candidates":[{"content":{"parts":[{"text":"{}"}]},"finishReason":"MAX_TOKENS"}]},"metadata":{"key":"k9"}}"#;
        let l = c.parse_result_line(inline).unwrap();
        assert_eq!(l.custom_id, "k9");
        assert!(
            matches!(l.outcome, LineOutcome::Answer { finish_reason: Some(ref f), .. } if f == "length")
        );
    }

    #[test]
    fn provider_names_are_checked_before_they_reach_a_url() {
        assert!(safe_name("files/abc-1", "files"));
        assert!(!safe_name("files/../../etc", "files"));
        assert!(!safe_name("batches/x?key=1", "batches"));
        assert!(!safe_name("files/", "files"));
        // A refused name (a `/` in it) is quoted in the error, scrubbed before it is cut.
        let c = GeminiClient::new(
            "http://127.0.0.1:9",
            SecretString::from("AIzaSyD-gateway-test-KEY-0123456789abc".to_string()),
            Duration::from_secs(1),
            RetryPolicy::default(),
            "m",
        )
        .unwrap();
        // Cut after its first 4 characters, the key would be too short a piece to recognise.
        let name = format!(
            "files/{}/AIzaSyD-gateway-test-KEY-0123456789abc",
            "x".repeat(69)
        );
        let e = c.checked(&name, "files").unwrap_err().to_string();
        assert!(e.contains("files/xxx") && !e.contains("AIza"), "{e}");
    }
}
