//! The Anthropic Message Batches client.
//!
//! A batch is created with its requests inline (the batch file's lines, streamed into one
//! JSON body). Batches carry no metadata, so a batch whose create was ambiguous is found by
//! what we know of it: created after we planned it, with our request count, not already
//! tracked; several candidates are told apart by the custom_id prefix in their results.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use super::API_VERSION;
use super::codec::{AnthropicCodec, message_outcome};
use super::types::{ListPage, MessageBatch};
use crate::provider::http::{Http, RetryPolicy};
use crate::provider::{
    BatchMeta, BatchProvider, Codec, CreateInput, LineOutcome, ProviderError, RemoteBatch,
    RemoteStatus, RequestCounts, ResultLine,
};
use crate::request::RequestShape;

const LIST_SKEW_SECONDS: i64 = 15 * 60;
const MAX_LIST_PAGES: usize = 20;

pub struct AnthropicClient {
    base: String,
    key: SecretString,
    http: Http,
    codec: Codec,
}

impl std::fmt::Debug for AnthropicClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnthropicClient")
            .field("base", &self.base)
            .field("key", &"**REDACTED**")
            .finish()
    }
}

fn unix(t: &Option<String>) -> Option<i64> {
    t.as_deref().and_then(|s| {
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .ok()
            .map(|t| t.unix_timestamp())
    })
}

impl From<MessageBatch> for RemoteBatch {
    fn from(b: MessageBatch) -> Self {
        let status = match b.processing_status.as_str() {
            "in_progress" => RemoteStatus::InProgress,
            "canceling" => RemoteStatus::Cancelling,
            "ended" if b.cancel_initiated_at.is_some() => RemoteStatus::Cancelled,
            "ended" => RemoteStatus::Completed,
            _ => RemoteStatus::Unknown,
        };
        let ended = status.is_terminal();
        RemoteBatch {
            status,
            raw_status: b.processing_status.clone(),
            // The results are fetched by batch id, never from a URL the provider sends.
            output_file_id: ended.then(|| b.id.clone()),
            error_file_id: None,
            counts: b.request_counts.as_ref().map(|c| RequestCounts {
                total: c.total(),
                completed: c.succeeded,
                failed: c.errored + c.canceled + c.expired,
            }),
            usage: None,
            errors: Vec::new(),
            local_id: None,
            created_at: unix(&b.created_at),
            id: b.id,
        }
    }
}

impl AnthropicClient {
    pub fn new(
        base_url: &str,
        key: SecretString,
        request_timeout: Duration,
        policy: RetryPolicy,
    ) -> Result<Self, ProviderError> {
        let http = Http::new(&key, request_timeout, policy)?;
        Ok(AnthropicClient {
            base: base_url.trim_end_matches('/').to_string(),
            key,
            http,
            codec: Codec::Anthropic(AnthropicCodec),
        })
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, &format!("{}{path}", self.base))
            .header("x-api-key", self.key.expose_secret())
            .header("anthropic-version", API_VERSION)
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

    /// A batch as the provider described it, its texts scrubbed.
    fn remote(&self, b: MessageBatch) -> RemoteBatch {
        self.http.redactor().batch(b.into())
    }

    /// Whether the results of an ended batch carry our local id's custom_id prefix.
    async fn results_carry(&self, batch_id: &str, prefix: &str) -> Result<bool, ProviderError> {
        let path = format!("/v1/messages/batches/{batch_id}/results");
        let resp = self
            .http
            .send_idempotent("read results", || self.req(reqwest::Method::GET, &path))
            .await?;
        let mut stream = resp.bytes_stream();
        let mut head = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.http.body_error("results", &e, false))?;
            head.extend_from_slice(&chunk);
            if let Some(nl) = head.iter().position(|&c| c == b'\n') {
                head.truncate(nl);
                break;
            }
            if head.len() > 1 << 20 {
                break;
            }
        }
        let line: Value = serde_json::from_slice(&head).unwrap_or(Value::Null);
        Ok(line["custom_id"]
            .as_str()
            .is_some_and(|c| c.starts_with(prefix)))
    }
}

/// The custom_id prefix of a local batch (see the store's planning).
pub fn custom_id_prefix(local_id: &str) -> String {
    format!("b{}-", local_id.replace('-', ""))
}

/// `{"requests":[` + the file's lines, comma-separated + `]}`, streamed.
fn inline_body(file: tokio::fs::File) -> reqwest::Body {
    reqwest::Body::wrap_stream(inline_stream(file))
}

fn inline_stream(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send {
    let reader = crate::provider::http::file_stream(file);
    let state = (reader, false, false);
    let stream = futures_util::stream::unfold(state, |(mut r, mut held_comma, done)| async move {
        if done {
            return None;
        }
        match r.next().await {
            Some(Ok(chunk)) => {
                let mut out = Vec::with_capacity(chunk.len() + 1);
                if held_comma {
                    out.push(b',');
                }
                out.extend(chunk.iter().map(|&c| if c == b'\n' { b',' } else { c }));
                // A trailing newline may be the file's last: hold its comma back.
                held_comma = out.last() == Some(&b',');
                if held_comma {
                    out.pop();
                }
                Some((
                    Ok::<_, std::io::Error>(bytes::Bytes::from(out)),
                    (r, held_comma, false),
                ))
            }
            Some(Err(e)) => Some((Err(e), (r, held_comma, true))),
            None => Some((Ok(bytes::Bytes::from_static(b"]}")), (r, false, true))),
        }
    });
    let head = futures_util::stream::once(async {
        Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"{\"requests\":["))
    });
    head.chain(stream)
}

impl BatchProvider for AnthropicClient {
    fn endpoint(&self) -> &str {
        &self.base
    }
    fn kind(&self) -> &'static str {
        "anthropic"
    }
    fn codec(&self) -> &Codec {
        &self.codec
    }

    fn uploads(&self, _bytes: u64) -> bool {
        false
    }

    async fn upload(&self, _filename: &str, _path: &Path) -> Result<String, ProviderError> {
        Err(ProviderError::Protocol(
            "Anthropic batches take their requests inline".into(),
        ))
    }

    async fn find_files(&self, _filename: &str) -> Result<Vec<String>, ProviderError> {
        Ok(Vec::new())
    }

    async fn delete_file(&self, _file_id: &str) -> Result<(), ProviderError> {
        Ok(())
    }

    async fn create(
        &self,
        input: &CreateInput<'_>,
        _meta: &BatchMeta<'_>,
    ) -> Result<RemoteBatch, ProviderError> {
        let file = tokio::fs::File::open(input.path).await?;
        let req = self
            .req(reqwest::Method::POST, "/v1/messages/batches")
            .header("content-type", "application/json")
            .body(inline_body(file));
        let resp = self.http.send_once(req, true).await?;
        let b: MessageBatch = self
            .http
            .json_body(resp, "create response")
            .await
            .map_err(|e| match e {
                ProviderError::Transient { message, .. } | ProviderError::Protocol(message) => {
                    ProviderError::Ambiguous { message }
                }
                other => other,
            })?;
        Ok(self.remote(b))
    }

    async fn find_batch(
        &self,
        local_id: &str,
        since: i64,
        request_count: u64,
        known: &HashSet<String>,
    ) -> Result<Option<RemoteBatch>, ProviderError> {
        let mut candidates: Vec<MessageBatch> = Vec::new();
        let mut after: Option<String> = None;
        'pages: for _ in 0..MAX_LIST_PAGES {
            let mut q = vec![("limit", "100".to_string())];
            if let Some(a) = &after {
                q.push(("after_id", a.clone()));
            }
            let page: ListPage = self
                .get_json("list batches", "/v1/messages/batches", &q)
                .await?;
            for b in &page.data {
                let created = unix(&b.created_at).unwrap_or(i64::MAX);
                if created < since - LIST_SKEW_SECONDS {
                    break 'pages;
                }
                let count = b.request_counts.as_ref().map(|c| c.total()).unwrap_or(0);
                if count == request_count && !known.contains(&b.id) {
                    candidates.push(b.clone());
                }
            }
            if !page.has_more {
                break;
            }
            after = page
                .last_id
                .or_else(|| page.data.last().map(|b| b.id.clone()));
            if after.is_none() {
                break;
            }
        }
        match candidates.len() {
            0 => Ok(None),
            1 => Ok(Some(self.remote(candidates.remove(0)))),
            _ => {
                // Several batches fit: the ended ones tell by their custom_ids.
                let prefix = custom_id_prefix(local_id);
                let mut waiting = false;
                for c in candidates {
                    if c.processing_status == "ended" {
                        if self.results_carry(&c.id, &prefix).await? {
                            return Ok(Some(self.remote(c)));
                        }
                    } else {
                        waiting = true;
                    }
                }
                if waiting {
                    // Never create again while a candidate might be ours.
                    Err(ProviderError::Transient {
                        status: None,
                        retry_after: Some(Duration::from_secs(30)),
                        message:
                            "several Anthropic batches could be this one; waiting for them to end"
                                .into(),
                    })
                } else {
                    Ok(None)
                }
            }
        }
    }

    async fn get(&self, id: &str) -> Result<RemoteBatch, ProviderError> {
        let b: MessageBatch = self
            .get_json("get batch", &format!("/v1/messages/batches/{id}"), &[])
            .await?;
        Ok(self.remote(b))
    }

    async fn delete_batch(&self, id: &str) -> Result<(), ProviderError> {
        // Allowed once the batch has ended; its results go with it. Twice is a 404.
        let path = format!("/v1/messages/batches/{id}");
        match self
            .http
            .send_idempotent("delete batch", || self.req(reqwest::Method::DELETE, &path))
            .await
        {
            Ok(_)
            | Err(ProviderError::Permanent {
                status: Some(404), ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn cancel(&self, id: &str) -> Result<RemoteBatch, ProviderError> {
        let path = format!("/v1/messages/batches/{id}/cancel");
        let resp = self
            .http
            .send_idempotent("cancel batch", || self.req(reqwest::Method::POST, &path))
            .await?;
        let b: MessageBatch = self.http.json_body(resp, "cancel response").await?;
        Ok(self.remote(b))
    }

    async fn download(&self, batch_id: &str, dest: &Path, cap: u64) -> Result<u64, ProviderError> {
        let path = format!("/v1/messages/batches/{batch_id}/results");
        let resp = self
            .http
            .send_idempotent("download results", || {
                self.req(reqwest::Method::GET, &path)
                    .timeout(Duration::from_secs(3600))
            })
            .await?;
        self.http.stream_to_file(resp, dest, cap, batch_id).await
    }

    fn parse_result_line(&self, line: &[u8]) -> Result<ResultLine, String> {
        self.http
            .redactor()
            .result_line(self.codec.parse_line(line, self.http.redactor()))
    }

    async fn send_online(
        &self,
        custom_id: &str,
        shape: &RequestShape,
        user_json: &str,
    ) -> Result<LineOutcome, ProviderError> {
        let req = self
            .req(reqwest::Method::POST, "/v1/messages")
            .header("content-type", "application/json")
            .header("x-client-request-id", custom_id)
            .body(shape.body(user_json));
        let resp = self.http.send_once(req, true).await?;
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| self.http.body_error("the answer", &e, true))?;
        let m: super::types::Message = serde_json::from_slice(&bytes).map_err(|e| {
            self.http.redactor().error(ProviderError::Protocol(format!(
                "the answer is not a message: {e}"
            )))
        })?;
        Ok(self.http.redactor().outcome(message_outcome(m)))
    }
}

/// Writes `bytes` to a file (tests of the inline body).
#[cfg(test)]
async fn write(path: &Path, bytes: &[u8]) {
    tokio::fs::write(path, bytes).await.unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_inline_body_is_the_lines_as_a_json_array() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.jsonl");
        write(&p, b"{\"custom_id\":\"a\",\"params\":{}}\n{\"custom_id\":\"b\",\"params\":{\"x\":\"1\\n2\"}}\n").await;
        let stream = inline_stream(tokio::fs::File::open(&p).await.unwrap());
        let bytes: Vec<u8> = futures_util::TryStreamExt::try_concat(
            futures_util::TryStreamExt::map_ok(stream, |b| b.to_vec()),
        )
        .await
        .unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["requests"].as_array().unwrap().len(), 2);
        assert_eq!(v["requests"][1]["params"]["x"], "1\n2");
    }

    #[test]
    fn result_lines_of_every_type_parse_and_unknown_types_do_not_break() {
        let c = AnthropicClient::new(
            "http://127.0.0.1:9",
            SecretString::from("k".to_string()),
            Duration::from_secs(1),
            RetryPolicy::default(),
        )
        .unwrap();
        let ok = br#"{"custom_id":"my-second-request","result":{"type":"succeeded","message":{"id":"msg_014VwiXbi91y3JMjcpyGBHX5","type":"message","role":"assistant","model":"claude-opus-4-6","content":[{"type":"text","text":"Hello again!"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":11,"cache_creation_input_tokens":3,"cache_read_input_tokens":5,"output_tokens":36,"service_tier":"batch"}}}}"#;
        let l = c.parse_result_line(ok).unwrap();
        let LineOutcome::Answer { content, usage, .. } = l.outcome else {
            panic!()
        };
        assert_eq!(content.as_deref(), Some("Hello again!"));
        assert_eq!(
            (
                usage.input_tokens,
                usage.cached_input_tokens,
                usage.cache_write_tokens,
                usage.output_tokens
            ),
            (19, 5, 3, 36)
        );
        let tool = br#"{"custom_id":"t","result":{"type":"succeeded","message":{"model":"m","content":[{"type":"tool_use","id":"x","name":"out","input":{"label":"bug"}}],"stop_reason":"tool_use","usage":{"input_tokens":1,"output_tokens":2}}}}"#;
        let LineOutcome::Answer { content, .. } = c.parse_result_line(tool).unwrap().outcome else {
            panic!()
        };
        assert_eq!(content.as_deref(), Some(r#"{"label":"bug"}"#));
        let err = br#"{"custom_id":"bad-one","result":{"type":"errored","error":{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: Field required"},"request_id":"req_011"}}}"#;
        assert!(
            matches!(c.parse_result_line(err).unwrap().outcome, LineOutcome::Error { code: Some(ref k), .. } if k == "invalid_request_error")
        );
        assert_eq!(
            c.parse_result_line(br#"{"custom_id":"late-one","result":{"type":"expired"}}"#)
                .unwrap()
                .outcome,
            LineOutcome::Expired
        );
        assert_eq!(
            c.parse_result_line(br#"{"custom_id":"dropped","result":{"type":"canceled"}}"#)
                .unwrap()
                .outcome,
            LineOutcome::Cancelled
        );
        assert!(matches!(
            c.parse_result_line(br#"{"custom_id":"n","result":{"type":"brand_new","extra":1}}"#)
                .unwrap()
                .outcome,
            LineOutcome::Error { .. }
        ));
    }

    #[test]
    fn batch_objects_map_their_states_and_counts() {
        let b: MessageBatch = serde_json::from_str(r#"{"id":"msgbatch_01","type":"message_batch","processing_status":"ended","request_counts":{"processing":0,"succeeded":7,"errored":1,"canceled":1,"expired":1},"created_at":"2024-08-20T18:37:24.100435Z","ended_at":"2024-08-20T18:40:00Z","cancel_initiated_at":null,"archived_at":null,"results_url":"https://api.anthropic.com/v1/messages/batches/msgbatch_01/results","new_field":true}"#).unwrap();
        let r: RemoteBatch = b.into();
        assert_eq!(r.status, RemoteStatus::Completed);
        assert_eq!(r.counts.unwrap().total, 10);
        assert_eq!(r.output_file_id.as_deref(), Some("msgbatch_01"));
        assert_eq!(r.created_at, Some(1724179044));
        let c: MessageBatch = serde_json::from_str(r#"{"id":"x","processing_status":"ended","cancel_initiated_at":"2024-08-20T18:38:00Z"}"#).unwrap();
        assert_eq!(RemoteBatch::from(c).status, RemoteStatus::Cancelled);
        let u: MessageBatch =
            serde_json::from_str(r#"{"id":"x","processing_status":"archiving"}"#).unwrap();
        assert_eq!(RemoteBatch::from(u).status, RemoteStatus::Unknown);
    }
}
