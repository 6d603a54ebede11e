//! Provider batch APIs behind one trait.
//!
//! [`BatchProvider`] is the batch life cycle: render the request shape, write input lines,
//! upload, create, get, list, cancel, download results and parse result lines. Each provider
//! has its own folder (`mod.rs`, `types.rs` for the wire types, `client.rs`).
//!
//! Errors steer retries ([`ProviderError`]): `Transient` may be retried (429, 5xx on a GET, a
//! connection refused before anything was sent); `Ambiguous` means a POST may have taken
//! effect (timeout, reset, 5xx after sending) and triggers reconciliation, never a blind
//! retry; `Permanent` is final. GETs are retried here with backoff and jitter, honouring
//! `retry-after`; POSTs never are.
//!
//! No text the provider sends back carries the API key further: each client talks through
//! [`http::Http`], which scrubs error bodies, transport errors and retry log lines with the
//! client's [`redact::Redactor`], and passes result lines and batch objects through the
//! same redactor before the worker sees them.

pub mod anthropic;
pub mod bedrock;
pub mod config;
pub mod gemini;
pub mod http;
pub mod openai;
pub mod redact;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;

use crate::cost::{PricingMode, Usage};
use crate::request::RequestShape;

/// What a provider needs to render the fixed part of every request.
#[derive(Clone, Debug)]
pub struct RequestSpec<'a> {
    pub model: &'a str,
    pub system: Option<&'a str>,
    pub max_output_tokens: u32,
    pub temperature: Option<f64>,
    pub schema: &'a serde_json::Value,
    pub schema_name: &'a str,
}

/// Provider job states, normalised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteStatus {
    Validating,
    InProgress,
    Finalizing,
    Completed,
    Failed,
    Expired,
    Cancelling,
    Cancelled,
    /// A state this version does not know; treated as still running.
    Unknown,
}

impl RemoteStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RemoteStatus::Completed
                | RemoteStatus::Failed
                | RemoteStatus::Expired
                | RemoteStatus::Cancelled
        )
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestCounts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

/// A provider batch job as last seen.
#[derive(Clone, Debug)]
pub struct RemoteBatch {
    pub id: String,
    pub status: RemoteStatus,
    /// The status text exactly as the provider sent it.
    pub raw_status: String,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub counts: Option<RequestCounts>,
    /// Token totals the provider reports for the whole batch, when it does.
    pub usage: Option<Usage>,
    /// Batch-level errors (validation failures).
    pub errors: Vec<String>,
    /// Our local batch id, read back from the batch metadata.
    pub local_id: Option<String>,
    /// Unix seconds.
    pub created_at: Option<i64>,
}

/// The outcome a result line reports for one request.
#[derive(Clone, Debug, PartialEq)]
pub enum LineOutcome {
    Answer {
        content: Option<String>,
        refusal: Option<String>,
        finish_reason: Option<String>,
        model: Option<String>,
        usage: Usage,
    },
    Error {
        status: Option<u16>,
        code: Option<String>,
        message: String,
        usage: Usage,
    },
    Expired,
    Cancelled,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ResultLine {
    pub custom_id: String,
    pub outcome: LineOutcome,
}

/// The input of a create call: the uploaded file, and the local file it was made from (for
/// providers that take the requests inline).
#[derive(Clone, Copy, Debug)]
pub struct CreateInput<'a> {
    pub file_id: Option<&'a str>,
    pub path: &'a Path,
}

/// Metadata sent with a batch so a restarted worker can find it again.
#[derive(Clone, Debug)]
pub struct BatchMeta<'a> {
    pub local_id: &'a str,
    pub run_id: &'a str,
    pub pipeline: &'a str,
    /// Requests in the batch (providers without metadata adopt by prefix, count and time).
    pub request_count: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// Safe to retry later (nothing took effect).
    #[error("temporary provider error{}: {message}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    Transient {
        status: Option<u16>,
        retry_after: Option<Duration>,
        message: String,
    },
    /// The request may have taken effect: reconcile before trying again.
    #[error("the provider may or may not have acted on the request: {message}")]
    Ambiguous { message: String },
    /// Final: retrying the same request will not help.
    #[error("provider refused the request{}: {message}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    Permanent {
        status: Option<u16>,
        code: Option<String>,
        message: String,
    },
    /// The API key was refused, or (`status` 0) no credentials could be found.
    #[error("{}", match status {
        0 => message.clone(),
        s => format!("the provider refused the API key (HTTP {s}): {message}"),
    })]
    Auth { status: u16, message: String },
    #[error("download over the cap of {cap} bytes")]
    TooLarge { cap: u64 },
    #[error("local I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("unexpected response from the provider: {0}")]
    Protocol(String),
}

impl ProviderError {
    pub fn is_transient(&self) -> bool {
        matches!(self, ProviderError::Transient { .. })
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The batch life cycle of one provider.
pub trait BatchProvider: Send + Sync + 'static {
    fn kind(&self) -> &'static str;
    /// The base URL requests go to (for messages; it never carries credentials).
    fn endpoint(&self) -> &str;
    fn pricing_mode(&self) -> PricingMode {
        PricingMode::Batch
    }
    /// The provider's encoding: the request shape, the token counter, input and result
    /// lines (what it sends and reads, apart from how).
    fn codec(&self) -> &Codec;
    /// Whether a batch file of `bytes` is uploaded first; if not, its lines go inline in the
    /// create call.
    fn uploads(&self, _bytes: u64) -> bool {
        true
    }
    /// Whether a job that ended in `raw_status` surely never ran any of its requests (Bedrock's
    /// `Expired`: it timed out while still scheduled): its attempts are taken back, not
    /// charged against `max_attempts`.
    fn never_started(&self, _raw_status: &str) -> bool {
        false
    }
    /// Uploads a batch input file under `filename`; returns the provider's file id.
    fn upload(
        &self,
        filename: &str,
        path: &Path,
    ) -> impl Future<Output = Result<String, ProviderError>> + Send;
    /// Uploaded input files with this name, newest first (after a crash between upload and
    /// commit, or an ambiguous upload: more than one may exist).
    fn find_files(
        &self,
        filename: &str,
    ) -> impl Future<Output = Result<Vec<String>, ProviderError>> + Send;
    /// Deletes an uploaded file (best effort by callers).
    fn delete_file(&self, file_id: &str) -> impl Future<Output = Result<(), ProviderError>> + Send;
    /// Deletes an ended batch job and the results it keeps (Anthropic); a batch already
    /// gone is not an error. Providers whose jobs hold nothing to delete refuse.
    fn delete_batch(&self, id: &str) -> impl Future<Output = Result<(), ProviderError>> + Send {
        let _ = id;
        async {
            Err(ProviderError::Permanent {
                status: None,
                code: None,
                message: "this provider keeps no batch to delete".into(),
            })
        }
    }
    /// The files in a result folder (Bedrock: the objects under a job's `s3://` output
    /// prefix), each an id [`BatchProvider::delete_file`] takes. Providers whose results are
    /// single files refuse.
    fn list_folder(
        &self,
        folder: &str,
    ) -> impl Future<Output = Result<Vec<String>, ProviderError>> + Send {
        let _ = folder;
        async {
            Err(ProviderError::Permanent {
                status: None,
                code: None,
                message: "this provider has no result folders".into(),
            })
        }
    }
    fn create(
        &self,
        input: &CreateInput<'_>,
        meta: &BatchMeta<'_>,
    ) -> impl Future<Output = Result<RemoteBatch, ProviderError>> + Send;
    /// Finds the batch this tool created for `local_id` (planned at `since`, unix seconds,
    /// with `request_count` requests). Providers with batch metadata match our id there;
    /// providers without it match the custom_id prefix (`b<local id>-`), the request count
    /// and the creation time window.
    /// `known` holds the provider ids already tracked, which are never candidates.
    fn find_batch(
        &self,
        local_id: &str,
        since: i64,
        request_count: u64,
        known: &std::collections::HashSet<String>,
    ) -> impl Future<Output = Result<Option<RemoteBatch>, ProviderError>> + Send;
    fn get(&self, id: &str) -> impl Future<Output = Result<RemoteBatch, ProviderError>> + Send;
    fn cancel(&self, id: &str) -> impl Future<Output = Result<RemoteBatch, ProviderError>> + Send;
    /// Streams a result file to `dest` (private, atomic), refusing more than `cap` bytes.
    fn download(
        &self,
        file_id: &str,
        dest: &Path,
        cap: u64,
    ) -> impl Future<Output = Result<u64, ProviderError>> + Send;
    fn parse_result_line(&self, line: &[u8]) -> Result<ResultLine, String>;
    /// Sends one request in real time (online mode) and returns what a result line would
    /// have said. Providers without an online endpoint refuse.
    fn send_online(
        &self,
        custom_id: &str,
        shape: &RequestShape,
        user_json: &str,
    ) -> impl Future<Output = Result<LineOutcome, ProviderError>> + Send {
        let _ = (custom_id, shape, user_json);
        async {
            Err(ProviderError::Permanent {
                status: None,
                code: None,
                message: "this provider has no online mode".into(),
            })
        }
    }
}

/// Reads an API key file: one line, and only the owner may read it.
pub fn read_key_file(path: &Path) -> Result<SecretString, String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "key file {} is readable by others (mode {mode:o}); run `chmod 600` on it",
                path.display()
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
    let key = text.trim();
    if key.is_empty() {
        return Err(format!("key file {} is empty", path.display()));
    }
    Ok(SecretString::from(key.to_string()))
}

/// The key a client uses: the configured one, or a placeholder for the simulator.
pub fn resolve_key(
    key: &crate::provider::config::KeySource,
    simulate: bool,
) -> Result<SecretString, String> {
    use crate::provider::config::KeySource;
    if simulate {
        return Ok(SecretString::from("nightshift-simulator".to_string()));
    }
    match key {
        KeySource::Env(var) => match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => Ok(SecretString::from(v.trim().to_string())),
            _ => Err(format!("environment variable {var} is not set")),
        },
        KeySource::File(p) => read_key_file(p),
        // The SDK finds the credentials; the client holds no key of ours.
        KeySource::AwsChain => Ok(SecretString::from("nightshift-aws-chain".to_string())),
    }
}

/// Where a provider keeps its downloads for a batch.
pub fn download_path(dir: &Path, batch_id: &str, kind: &str) -> PathBuf {
    dir.join(format!("{batch_id}.{kind}.jsonl"))
}

/// The pure half of a provider: how a pipeline's requests are encoded and its result lines
/// read, with no client, no key and no connection. `plan` works from this alone; each client
/// holds one and adds the HTTP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Codec {
    OpenAi(openai::codec::OpenAiCodec),
    Anthropic(anthropic::codec::AnthropicCodec),
    Gemini(gemini::codec::GeminiCodec),
    Bedrock(bedrock::codec::BedrockCodec),
}

macro_rules! each_codec {
    ($self:ident, $c:ident => $e:expr) => {
        match $self {
            Codec::OpenAi($c) => $e,
            Codec::Anthropic($c) => $e,
            Codec::Gemini($c) => $e,
            Codec::Bedrock($c) => $e,
        }
    };
}

impl Codec {
    /// The encoding of the provider `cfg` names.
    pub fn for_config(cfg: &config::ProviderConfig) -> Codec {
        use config::ProviderKind;
        match cfg.kind {
            ProviderKind::OpenAi => Codec::OpenAi(openai::codec::OpenAiCodec { deployment: None }),
            ProviderKind::Azure => Codec::OpenAi(openai::codec::OpenAiCodec {
                deployment: Some(cfg.deployment.clone().unwrap_or_else(|| cfg.model.clone())),
            }),
            ProviderKind::Anthropic => Codec::Anthropic(anthropic::codec::AnthropicCodec),
            ProviderKind::Gemini => Codec::Gemini(gemini::codec::GeminiCodec),
            ProviderKind::Bedrock => {
                Codec::Bedrock(bedrock::codec::BedrockCodec::for_model(&cfg.model))
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Codec::OpenAi(c) => c.kind(),
            Codec::Anthropic(_) => "anthropic",
            Codec::Gemini(_) => "gemini",
            Codec::Bedrock(_) => "bedrock",
        }
    }

    /// The fixed part of every request of a pipeline (see `request`).
    pub fn request_shape(&self, spec: &RequestSpec<'_>) -> Result<RequestShape, String> {
        each_codec!(self, c => c.request_shape(spec))
    }

    /// Counts the prompt tokens of requests of this shape as the provider bills them (exact
    /// for models with a known tokenizer, a conservative estimate otherwise).
    pub fn prompt_counter(&self, spec: &RequestSpec<'_>) -> crate::cost::tokens::PromptCounter {
        each_codec!(self, c => c.prompt_counter(spec))
    }

    /// An upper bound on the bytes a JSONL line adds around the request body.
    pub fn line_overhead(&self) -> u64 {
        each_codec!(self, c => c.line_overhead())
    }

    /// Appends one input line (with its newline) to `out`.
    pub fn write_line(
        &self,
        custom_id: &str,
        shape: &RequestShape,
        user_json: &str,
        out: &mut Vec<u8>,
    ) {
        each_codec!(self, c => c.write_line(custom_id, shape, user_json, out))
    }

    /// Reads one line of a result file; error previews are scrubbed with `redactor` before
    /// they are cut (the caller scrubs the rest).
    pub fn parse_line(
        &self,
        line: &[u8],
        redactor: &redact::Redactor,
    ) -> Result<ResultLine, String> {
        match self {
            Codec::OpenAi(c) => c.parse_line(line, redactor),
            Codec::Anthropic(c) => c.parse_line(line),
            Codec::Gemini(c) => c.parse_line(line),
            Codec::Bedrock(c) => c.parse_line(line),
        }
    }
}

/// One of the provider clients, chosen by the pipeline's `[provider] kind`.
#[derive(Debug)]
pub enum AnyProvider {
    OpenAi(openai::OpenAiClient),
    Anthropic(anthropic::AnthropicClient),
    Gemini(gemini::GeminiClient),
    Bedrock(Box<bedrock::BedrockClient>),
}

macro_rules! each {
    ($self:ident, $c:ident => $e:expr) => {
        match $self {
            AnyProvider::OpenAi($c) => $e,
            AnyProvider::Anthropic($c) => $e,
            AnyProvider::Gemini($c) => $e,
            AnyProvider::Bedrock($c) => $e,
        }
    };
}

impl AnyProvider {
    /// Builds the client for `cfg`. `simulator` is the root URL of a simulator to talk to
    /// instead of the provider (`simulate = true`).
    pub fn build(
        cfg: &config::ProviderConfig,
        key: SecretString,
        simulator: Option<&str>,
    ) -> Result<AnyProvider, ProviderError> {
        use config::ProviderKind;
        // A call retries on its own for a share of the give-up time; the runner judges the
        // whole spell of failures against `unreachable_timeout`.
        let policy = http::RetryPolicy {
            max_elapsed: (cfg.unreachable_timeout / 3).min(std::time::Duration::from_secs(120)),
            ..http::RetryPolicy::default()
        };
        let t = cfg.request_timeout;
        let root = |default: &str| -> String {
            match (simulator, &cfg.base_url) {
                (Some(sim), _) => sim.to_string(),
                (None, Some(b)) => b.clone(),
                (None, None) => default.to_string(),
            }
        };
        Ok(match cfg.kind {
            ProviderKind::OpenAi => {
                let base = match simulator {
                    Some(sim) => format!("{sim}/v1"),
                    None => cfg
                        .base_url
                        .clone()
                        .unwrap_or_else(|| openai::DEFAULT_BASE_URL.to_string()),
                };
                AnyProvider::OpenAi(openai::OpenAiClient::new(&base, key, t, policy)?)
            }
            ProviderKind::Azure => AnyProvider::OpenAi(openai::OpenAiClient::azure(
                &root(""),
                key,
                t,
                policy,
                &cfg.api_version,
                cfg.deployment.as_deref().unwrap_or(&cfg.model),
            )?),
            ProviderKind::Anthropic => AnyProvider::Anthropic(anthropic::AnthropicClient::new(
                &root(anthropic::DEFAULT_BASE_URL),
                key,
                t,
                policy,
            )?),
            ProviderKind::Gemini => AnyProvider::Gemini(gemini::GeminiClient::new(
                &root(gemini::DEFAULT_BASE_URL),
                key,
                t,
                policy,
                &cfg.model,
            )?),
            ProviderKind::Bedrock => {
                let settings = cfg.bedrock.clone().ok_or_else(|| {
                    ProviderError::Protocol("a Bedrock pipeline without its settings".into())
                })?;
                let target = match simulator {
                    Some(root) => bedrock::client::Target::Simulator {
                        root: root.to_string(),
                    },
                    None => bedrock::client::Target::Aws,
                };
                AnyProvider::Bedrock(Box::new(bedrock::BedrockClient::new(
                    settings, &cfg.model, target, t, policy,
                )?))
            }
        })
    }
}

impl BatchProvider for AnyProvider {
    fn kind(&self) -> &'static str {
        each!(self, c => c.kind())
    }
    fn endpoint(&self) -> &str {
        each!(self, c => c.endpoint())
    }
    fn codec(&self) -> &Codec {
        each!(self, c => c.codec())
    }
    fn uploads(&self, bytes: u64) -> bool {
        each!(self, c => c.uploads(bytes))
    }
    fn never_started(&self, raw_status: &str) -> bool {
        each!(self, c => c.never_started(raw_status))
    }
    async fn upload(&self, filename: &str, path: &Path) -> Result<String, ProviderError> {
        each!(self, c => c.upload(filename, path).await)
    }
    async fn find_files(&self, filename: &str) -> Result<Vec<String>, ProviderError> {
        each!(self, c => c.find_files(filename).await)
    }
    async fn delete_file(&self, file_id: &str) -> Result<(), ProviderError> {
        each!(self, c => c.delete_file(file_id).await)
    }
    async fn delete_batch(&self, id: &str) -> Result<(), ProviderError> {
        each!(self, c => c.delete_batch(id).await)
    }
    async fn list_folder(&self, folder: &str) -> Result<Vec<String>, ProviderError> {
        each!(self, c => c.list_folder(folder).await)
    }
    async fn create(
        &self,
        input: &CreateInput<'_>,
        meta: &BatchMeta<'_>,
    ) -> Result<RemoteBatch, ProviderError> {
        each!(self, c => c.create(input, meta).await)
    }
    async fn find_batch(
        &self,
        local_id: &str,
        since: i64,
        request_count: u64,
        known: &std::collections::HashSet<String>,
    ) -> Result<Option<RemoteBatch>, ProviderError> {
        each!(self, c => c.find_batch(local_id, since, request_count, known).await)
    }
    async fn get(&self, id: &str) -> Result<RemoteBatch, ProviderError> {
        each!(self, c => c.get(id).await)
    }
    async fn cancel(&self, id: &str) -> Result<RemoteBatch, ProviderError> {
        each!(self, c => c.cancel(id).await)
    }
    async fn download(&self, file_id: &str, dest: &Path, cap: u64) -> Result<u64, ProviderError> {
        each!(self, c => c.download(file_id, dest, cap).await)
    }
    fn parse_result_line(&self, line: &[u8]) -> Result<ResultLine, String> {
        each!(self, c => c.parse_result_line(line))
    }
    async fn send_online(
        &self,
        custom_id: &str,
        shape: &RequestShape,
        user_json: &str,
    ) -> Result<LineOutcome, ProviderError> {
        each!(self, c => c.send_online(custom_id, shape, user_json).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_client_shows_its_key_when_debug_printed() {
        let key = || SecretString::from("sk-debug-NEVERSHOWN-0123456789".to_string());
        let t = Duration::from_secs(1);
        let p = http::RetryPolicy::default;
        let root = "http://127.0.0.1:9";
        let all = [
            AnyProvider::OpenAi(openai::OpenAiClient::new(root, key(), t, p()).unwrap()),
            AnyProvider::OpenAi(
                openai::OpenAiClient::azure(root, key(), t, p(), "2024-10-21", "dep").unwrap(),
            ),
            AnyProvider::Anthropic(anthropic::AnthropicClient::new(root, key(), t, p()).unwrap()),
            AnyProvider::Gemini(gemini::GeminiClient::new(root, key(), t, p(), "m").unwrap()),
        ];
        for c in &all {
            let text = format!("{c:?} {c:#?}");
            assert!(!text.contains("NEVERSHOWN"), "{text}");
        }
        let h = http::Http::new(&key(), t, p()).unwrap();
        let text = format!("{h:?} {:?}", h.redactor());
        assert!(!text.contains("NEVERSHOWN"), "{text}");
    }
}
