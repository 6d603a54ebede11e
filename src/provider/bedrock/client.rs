//! The Amazon Bedrock batch-inference client, on the official SDK crates: records are uploaded
//! to S3 (`aws-sdk-s3`), jobs created, read, listed and stopped on the Bedrock control plane
//! (`aws-sdk-bedrock`), results read back from the job's output folder in S3, and small rounds
//! sent online to the Bedrock runtime (InvokeModel or Converse, SigV4-signed with `aws-sigv4`).
//!
//! Write-ahead and adoption: a job's `clientRequestToken` is our local batch id (the create is
//! idempotent on it) and its `jobName` is `nightshift-<local id>`, so a create whose answer was
//! lost is found again with ListModelInvocationJobs (docs/reliability.md). Credentials come from
//! the standard AWS chain and never leave the SDK: nothing here formats them.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use aws_sdk_bedrock::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_bedrock::types::{
    ModelInvocationJobInputDataConfig, ModelInvocationJobOutputDataConfig,
    ModelInvocationJobS3InputDataConfig, ModelInvocationJobS3OutputDataConfig,
    ModelInvocationJobStatus, SortOrder,
};
use aws_sdk_s3::primitives::ByteStream;
use secrecy::SecretString;
use tokio::sync::OnceCell;

use super::codec::{BedrockCodec, Family};
use super::types::Manifest;
use crate::cost::Usage;
use crate::provider::config::BedrockSettings;
use crate::provider::http::{Http, PartFile, RetryPolicy};
use crate::provider::{
    BatchMeta, BatchProvider, Codec, CreateInput, LineOutcome, ProviderError, RemoteBatch,
    RemoteStatus, RequestCounts, ResultLine,
};
use crate::request::RequestShape;

/// Jobs read per page when looking for one of ours.
const LIST_PAGE: i32 = 100;
const MAX_LIST_PAGES: usize = 20;
/// A job's timeout: the shortest Bedrock accepts, the completion window every provider has.
const TIMEOUT_HOURS: i32 = 24;

/// Where the client talks to: AWS itself, or a simulator (static credentials, loopback).
#[derive(Clone, Debug)]
pub enum Target {
    Aws,
    Simulator { root: String },
}

/// The SDK clients, built on first use (loading the credential chain is asynchronous).
struct Clients {
    bedrock: aws_sdk_bedrock::Client,
    s3: aws_sdk_s3::Client,
    credentials: aws_credential_types::provider::SharedCredentialsProvider,
}

pub struct BedrockClient {
    settings: BedrockSettings,
    model: String,
    target: Target,
    codec: Codec,
    family: Family,
    /// The runtime's base URL (online calls), and what messages name as the endpoint.
    runtime: String,
    request_timeout: Duration,
    http: Http,
    clients: OnceCell<Clients>,
}

impl std::fmt::Debug for BedrockClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BedrockClient")
            .field("region", &self.settings.region)
            .field("model", &self.model)
            .field("runtime", &self.runtime)
            .finish()
    }
}

/// An `s3://bucket/key` URI split in two.
fn split_s3(uri: &str) -> Result<(&str, &str), ProviderError> {
    uri.strip_prefix("s3://")
        .and_then(|rest| rest.split_once('/'))
        .filter(|(b, _)| !b.is_empty())
        .ok_or_else(|| ProviderError::Protocol(format!("`{uri}` is not an s3:// URI")))
}

/// An S3 endpoint as the SDK needs it: one with a path (`https://host/s3`) must end with `/`,
/// or path-style requests glue the bucket onto its last segment (`/s3bucket/key`).
fn s3_endpoint(url: &str) -> String {
    let path = url
        .split_once("://")
        .map(|(_, rest)| rest)
        .and_then(|rest| rest.split_once('/'))
        .map(|(_, p)| p)
        .unwrap_or("");
    if path.is_empty() || url.ends_with('/') {
        url.to_string()
    } else {
        format!("{url}/")
    }
}

/// The job id: the last segment of its ARN.
fn job_id(arn: &str) -> &str {
    arn.rsplit('/').next().unwrap_or(arn)
}

/// The job name of a local batch (also what ListModelInvocationJobs is searched for).
pub fn job_name(local_id: &str) -> String {
    format!("nightshift-{local_id}")
}

fn unix(t: &aws_smithy_types::DateTime) -> i64 {
    t.secs()
}

/// Our state for a Bedrock status (docs/providers.md §5): `PartiallyCompleted` ended with part
/// of the output (the records without a line go back to the queue); `Expired` never started.
pub fn status_of(s: Option<&ModelInvocationJobStatus>) -> RemoteStatus {
    use ModelInvocationJobStatus as S;
    match s {
        Some(S::Submitted | S::Validating | S::Scheduled) => RemoteStatus::Validating,
        Some(S::InProgress) => RemoteStatus::InProgress,
        Some(S::Stopping) => RemoteStatus::Cancelling,
        Some(S::Completed) => RemoteStatus::Completed,
        Some(S::PartiallyCompleted | S::Expired) => RemoteStatus::Expired,
        Some(S::Failed) => RemoteStatus::Failed,
        Some(S::Stopped) => RemoteStatus::Cancelled,
        _ => RemoteStatus::Unknown,
    }
}

/// What a job looked like, in the fields the get and list answers share.
struct JobView<'a> {
    arn: &'a str,
    status: Option<&'a ModelInvocationJobStatus>,
    message: Option<&'a str>,
    output: Option<&'a ModelInvocationJobOutputDataConfig>,
    submitted: &'a aws_smithy_types::DateTime,
    name: Option<&'a str>,
}

impl JobView<'_> {
    fn remote(&self) -> RemoteBatch {
        let status = status_of(self.status);
        let out = self.output.and_then(|o| o.as_s3_output_data_config().ok());
        let output_file_id = (status.is_terminal() && status != RemoteStatus::Failed)
            .then(|| out.map(|o| folder(o.s3_uri(), job_id(self.arn))))
            .flatten();
        RemoteBatch {
            id: self.arn.to_string(),
            status,
            raw_status: self
                .status
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
            output_file_id,
            error_file_id: None,
            counts: None,
            usage: None,
            errors: self
                .message
                .map(|m| vec![m.to_string()])
                .unwrap_or_default(),
            local_id: self
                .name
                .and_then(|n| n.strip_prefix("nightshift-"))
                .map(str::to_string),
            created_at: Some(unix(self.submitted)),
        }
    }
}

/// A job's output folder: `{output prefix}{job id}/`.
fn folder(output_uri: &str, job: &str) -> String {
    let base = if output_uri.ends_with('/') {
        output_uri.to_string()
    } else {
        format!("{output_uri}/")
    };
    format!("{base}{job}/")
}

impl BedrockClient {
    pub fn new(
        settings: BedrockSettings,
        model: &str,
        target: Target,
        request_timeout: Duration,
        policy: RetryPolicy,
    ) -> Result<Self, ProviderError> {
        // No API key: the redactor still scrubs the shapes of keys from what comes back.
        let http = Http::new(
            &SecretString::from("nightshift-bedrock-no-key".to_string()),
            request_timeout,
            policy,
        )?;
        let runtime = match (&target, &settings.endpoint_url) {
            (Target::Simulator { root }, _) => root.trim_end_matches('/').to_string(),
            (Target::Aws, Some(u)) => u.trim_end_matches('/').to_string(),
            (Target::Aws, None) => {
                format!("https://bedrock-runtime.{}.amazonaws.com", settings.region)
            }
        };
        Ok(BedrockClient {
            family: Family::of(model),
            codec: Codec::Bedrock(BedrockCodec::for_model(model)),
            model: model.to_string(),
            settings,
            target,
            runtime,
            request_timeout,
            http,
            clients: OnceCell::new(),
        })
    }

    async fn clients(&self) -> Result<&Clients, ProviderError> {
        self.clients
            .get_or_try_init(|| async {
                let region = aws_config::Region::new(self.settings.region.clone());
                let timeouts = aws_config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(self.request_timeout)
                    .connect_timeout(Duration::from_secs(10))
                    .build();
                let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
                    .region(region)
                    .timeout_config(timeouts);
                let (bedrock_url, s3_url) = match &self.target {
                    Target::Simulator { root } => {
                        let root = root.trim_end_matches('/');
                        loader = loader.credentials_provider(
                            aws_credential_types::Credentials::new(
                                "NIGHTSHIFTSIMULATOR",
                                "nightshift-simulator-secret",
                                None,
                                None,
                                "nightshift-simulator",
                            ),
                        );
                        (Some(root.to_string()), Some(format!("{root}/s3/")))
                    }
                    Target::Aws => {
                        if let Some(p) = &self.settings.profile {
                            loader = loader.profile_name(p);
                        }
                        let s3 = self
                            .settings
                            .s3_endpoint_url
                            .clone()
                            .or_else(|| self.settings.endpoint_url.clone());
                        (self.settings.endpoint_url.clone(), s3)
                    }
                };
                let config = loader.load().await;
                let credentials = config.credentials_provider().ok_or_else(|| {
                    ProviderError::Auth {
                        status: 0,
                        message: "no AWS credentials found (environment, shared profile, web identity or instance role)".into(),
                    }
                })?;
                let mut b = aws_sdk_bedrock::config::Builder::from(&config);
                if let Some(u) = bedrock_url {
                    b = b.endpoint_url(u);
                }
                let mut s = aws_sdk_s3::config::Builder::from(&config)
                    // S3-compatible stores and the simulator take path-style addresses, and
                    // the default checksums would frame uploads as `aws-chunked`.
                    .force_path_style(true)
                    .request_checksum_calculation(
                        aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
                    )
                    .response_checksum_validation(
                        aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
                    );
                if let Some(u) = s3_url {
                    s = s.endpoint_url(s3_endpoint(&u));
                }
                Ok(Clients {
                    bedrock: aws_sdk_bedrock::Client::from_conf(b.build()),
                    s3: aws_sdk_s3::Client::from_conf(s.build()),
                    credentials,
                })
            })
            .await
    }

    /// A job as the provider describes it, its texts scrubbed.
    async fn describe(&self, id: &str) -> Result<RemoteBatch, ProviderError> {
        let c = self.clients().await?;
        let j = c
            .bedrock
            .get_model_invocation_job()
            .job_identifier(id)
            .send()
            .await
            .map_err(|e| self.sdk_error("get job", e, false))?;
        let mut r = JobView {
            arn: &j.job_arn,
            status: j.status.as_ref(),
            message: j.message.as_deref(),
            output: j.output_data_config.as_ref(),
            submitted: &j.submit_time,
            name: j.job_name.as_deref(),
        }
        .remote();
        if let Some(dir) = &r.output_file_id
            && let Some(m) = self.manifest(dir).await?
        {
            r.counts = Some(RequestCounts {
                total: m.total_record_count,
                completed: m.success_record_count,
                failed: m.error_record_count,
            });
            r.usage = Some(Usage {
                input_tokens: m.input_token_count,
                output_tokens: m.output_token_count,
                ..Usage::default()
            });
        }
        Ok(self.http.redactor().batch(r))
    }

    /// The job's `manifest.json.out`, if it wrote one.
    async fn manifest(&self, dir: &str) -> Result<Option<Manifest>, ProviderError> {
        let c = self.clients().await?;
        let (bucket, prefix) = split_s3(dir)?;
        let got =
            c.s3.get_object()
                .bucket(bucket)
                .key(format!("{prefix}manifest.json.out"))
                .send()
                .await;
        let obj = match got {
            Ok(o) => o,
            Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => return Ok(None),
            Err(e) => return Err(self.sdk_error("read the job's manifest", e, false)),
        };
        let bytes = obj
            .body
            .collect()
            .await
            .map_err(|e| ProviderError::Transient {
                status: None,
                retry_after: None,
                message: format!("reading the job's manifest: {e}"),
            })?
            .into_bytes();
        Ok(serde_json::from_slice(&bytes).ok())
    }

    /// Sorts an SDK failure into retry classes. `effectful`: the call may change something
    /// (a create), so a failure after sending is ambiguous, never a plain retry.
    fn sdk_error<E>(
        &self,
        what: &str,
        e: SdkError<E, aws_smithy_runtime_api::http::Response>,
        effectful: bool,
    ) -> ProviderError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let scrub = |s: String| self.http.redactor().scrub_string(s);
        match e {
            SdkError::ServiceError(ctx) => {
                let status = Some(ctx.raw().status().as_u16());
                let err = ctx.err();
                let code = err.code().unwrap_or("").to_string();
                let message = scrub(format!(
                    "{what}: {code}: {}",
                    err.message().unwrap_or("no message")
                ));
                classify(status, &code, message, effectful)
            }
            ref other if missing_credentials(other) => ProviderError::Auth {
                status: 0,
                message: format!("{what}: {NO_CREDENTIALS}"),
            },
            SdkError::ConstructionFailure(_) => ProviderError::Protocol(scrub(format!(
                "{what}: the request could not be built: {}",
                aws_smithy_types::error::display::DisplayErrorContext(&e)
            ))),
            other => {
                let message = scrub(format!(
                    "{what}: {}",
                    aws_smithy_types::error::display::DisplayErrorContext(&other)
                ));
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
        }
    }

    /// Signs and sends one online request to the runtime.
    async fn invoke(
        &self,
        custom_id: &str,
        body: String,
    ) -> Result<reqwest::Response, ProviderError> {
        use aws_credential_types::provider::ProvideCredentials;
        let c = self.clients().await?;
        let creds = c
            .credentials
            .provide_credentials()
            .await
            .map_err(|e| ProviderError::Auth {
                status: 0,
                message: format!("{NO_CREDENTIALS} ({e})"),
            })?;
        let op = match self.family {
            Family::Anthropic => "invoke",
            Family::Converse => "converse",
        };
        let model: String = url::form_urlencoded::byte_serialize(self.model.as_bytes()).collect();
        let url = format!("{}/model/{model}/{op}", self.runtime);
        let identity = creds.into();
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.settings.region)
            .name("bedrock")
            .time(SystemTime::now())
            .settings(aws_sigv4::http_request::SigningSettings::default())
            .build()
            .map_err(|e| ProviderError::Protocol(format!("signing: {e}")))?
            .into();
        let headers = [
            ("content-type", "application/json"),
            ("accept", "application/json"),
        ];
        let signable = aws_sigv4::http_request::SignableRequest::new(
            "POST",
            &url,
            headers.iter().copied(),
            aws_sigv4::http_request::SignableBody::Bytes(body.as_bytes()),
        )
        .map_err(|e| ProviderError::Protocol(format!("signing: {e}")))?;
        let (instructions, _) = aws_sigv4::http_request::sign(signable, &params)
            .map_err(|e| ProviderError::Protocol(format!("signing: {e}")))?
            .into_parts();
        let mut req = self
            .http
            .request(reqwest::Method::POST, &url)
            .header("x-client-request-id", custom_id);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        for (k, v) in instructions.headers() {
            req = req.header(k, v);
        }
        self.http.send_once(req.body(body), true).await
    }
}

/// What a user with no AWS credentials is told.
const NO_CREDENTIALS: &str = "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (or `profile` in [provider]) for a profile in ~/.aws, or run with a web identity, container or instance role";

/// Whether a call failed because the credential chain found nothing (or could not load it):
/// a setup problem to report at once, not a network fault to wait out.
fn missing_credentials<E, R>(e: &SdkError<E, R>) -> bool
where
    E: std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<aws_credential_types::provider::error::CredentialsError>()
            .is_some()
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// A service error's class, from its HTTP status and error code (docs/providers.md §5.6).
fn classify(status: Option<u16>, code: &str, message: String, effectful: bool) -> ProviderError {
    match (status, code) {
        (_, "ThrottlingException" | "SlowDown" | "TooManyRequestsException") | (Some(429), _) => {
            ProviderError::Transient {
                status,
                retry_after: None,
                message,
            }
        }
        (_, "ServiceQuotaExceededException") => ProviderError::Transient {
            status,
            // Too many jobs in flight: wait for one to end.
            retry_after: Some(Duration::from_secs(60)),
            message,
        },
        (
            _,
            "UnrecognizedClientException"
            | "InvalidSignatureException"
            | "ExpiredTokenException"
            | "AccessDeniedException"
            | "AccessDenied"
            | "InvalidAccessKeyId"
            | "SignatureDoesNotMatch"
            | "AuthorizationHeaderMalformed",
        )
        | (Some(401 | 403), _) => ProviderError::Auth {
            status: status.unwrap_or(403),
            message,
        },
        (Some(500..=599), _) | (_, "InternalServerException" | "InternalError") => {
            if effectful {
                ProviderError::Ambiguous { message }
            } else {
                ProviderError::Transient {
                    status,
                    retry_after: None,
                    message,
                }
            }
        }
        _ => ProviderError::Permanent {
            status,
            code: (!code.is_empty()).then(|| code.to_string()),
            message,
        },
    }
}

impl BatchProvider for BedrockClient {
    fn endpoint(&self) -> &str {
        &self.runtime
    }
    fn kind(&self) -> &'static str {
        "bedrock"
    }
    fn codec(&self) -> &Codec {
        &self.codec
    }
    fn never_started(&self, raw_status: &str) -> bool {
        raw_status == ModelInvocationJobStatus::Expired.as_str()
    }

    async fn upload(&self, filename: &str, path: &Path) -> Result<String, ProviderError> {
        let c = self.clients().await?;
        let (bucket, prefix) = split_s3(&self.settings.input_s3_uri)?;
        let key = format!("{prefix}{filename}");
        let body = ByteStream::from_path(path)
            .await
            .map_err(|e| ProviderError::Io(std::io::Error::other(e.to_string())))?;
        c.s3.put_object()
            .bucket(bucket)
            .key(&key)
            .content_type("application/jsonl")
            .body(body)
            .send()
            .await
            .map_err(|e| self.sdk_error("upload the records", e, false))?;
        Ok(format!("s3://{bucket}/{key}"))
    }

    async fn find_files(&self, filename: &str) -> Result<Vec<String>, ProviderError> {
        let c = self.clients().await?;
        let (bucket, prefix) = split_s3(&self.settings.input_s3_uri)?;
        let key = format!("{prefix}{filename}");
        let page =
            c.s3.list_objects_v2()
                .bucket(bucket)
                .prefix(&key)
                .max_keys(10)
                .send()
                .await
                .map_err(|e| self.sdk_error("list uploaded records", e, false))?;
        Ok(page
            .contents()
            .iter()
            .filter_map(|o| o.key())
            .filter(|k| *k == key)
            .map(|k| format!("s3://{bucket}/{k}"))
            .collect())
    }

    async fn delete_file(&self, file_id: &str) -> Result<(), ProviderError> {
        let c = self.clients().await?;
        let (bucket, key) = split_s3(file_id)?;
        c.s3.delete_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.sdk_error("delete an object", e, false))?;
        Ok(())
    }

    async fn create(
        &self,
        input: &CreateInput<'_>,
        meta: &BatchMeta<'_>,
    ) -> Result<RemoteBatch, ProviderError> {
        let c = self.clients().await?;
        let uri = input.file_id.ok_or_else(|| {
            ProviderError::Protocol("a Bedrock job needs its records uploaded first".into())
        })?;
        let s3_in = ModelInvocationJobS3InputDataConfig::builder()
            .s3_uri(uri)
            .build()
            .map_err(|e| ProviderError::Protocol(e.to_string()))?;
        let s3_out = ModelInvocationJobS3OutputDataConfig::builder()
            .s3_uri(&self.settings.output_s3_uri)
            .build()
            .map_err(|e| ProviderError::Protocol(e.to_string()))?;
        let mut op = c
            .bedrock
            .create_model_invocation_job()
            .job_name(job_name(meta.local_id))
            .client_request_token(meta.local_id)
            .role_arn(&self.settings.role_arn)
            .model_id(&self.model)
            .timeout_duration_in_hours(TIMEOUT_HOURS)
            .input_data_config(ModelInvocationJobInputDataConfig::S3InputDataConfig(s3_in))
            .output_data_config(ModelInvocationJobOutputDataConfig::S3OutputDataConfig(
                s3_out,
            ))
            .customize();
        if self.family == Family::Converse {
            // `modelInvocationType` is newer than the SDK's model: added to the JSON body
            // before it is signed.
            op = op.mutate_request(|req| add_invocation_type(req, "Converse"));
        }
        let out = op
            .send()
            .await
            .map_err(|e| self.sdk_error("create the job", e, true))?;
        Ok(self.http.redactor().batch(RemoteBatch {
            id: out.job_arn,
            status: RemoteStatus::Validating,
            raw_status: "Submitted".into(),
            output_file_id: None,
            error_file_id: None,
            counts: Some(RequestCounts {
                total: meta.request_count,
                completed: 0,
                failed: 0,
            }),
            usage: None,
            errors: Vec::new(),
            local_id: Some(meta.local_id.to_string()),
            created_at: Some(crate::util::time::unix_now()),
        }))
    }

    async fn find_batch(
        &self,
        local_id: &str,
        _since: i64,
        _request_count: u64,
        known: &HashSet<String>,
    ) -> Result<Option<RemoteBatch>, ProviderError> {
        let c = self.clients().await?;
        let name = job_name(local_id);
        let mut token: Option<String> = None;
        for _ in 0..MAX_LIST_PAGES {
            let mut q = c
                .bedrock
                .list_model_invocation_jobs()
                .name_contains(local_id)
                .sort_order(SortOrder::Descending)
                .max_results(LIST_PAGE);
            if let Some(t) = &token {
                q = q.next_token(t);
            }
            let page = q
                .send()
                .await
                .map_err(|e| self.sdk_error("list jobs", e, false))?;
            for j in page.invocation_job_summaries() {
                let ours =
                    j.job_name == name || j.client_request_token.as_deref() == Some(local_id);
                if ours && !known.contains(&j.job_arn) {
                    let view = JobView {
                        arn: &j.job_arn,
                        status: j.status.as_ref(),
                        message: j.message.as_deref(),
                        output: j.output_data_config.as_ref(),
                        submitted: &j.submit_time,
                        name: Some(&j.job_name),
                    };
                    return Ok(Some(self.http.redactor().batch(view.remote())));
                }
            }
            token = page.next_token;
            if token.is_none() {
                break;
            }
        }
        Ok(None)
    }

    async fn get(&self, id: &str) -> Result<RemoteBatch, ProviderError> {
        self.describe(id).await
    }

    async fn cancel(&self, id: &str) -> Result<RemoteBatch, ProviderError> {
        let c = self.clients().await?;
        match c
            .bedrock
            .stop_model_invocation_job()
            .job_identifier(id)
            .send()
            .await
        {
            Ok(_) => {}
            // Already over (or already stopping): what it is now is the answer.
            Err(SdkError::ServiceError(e)) if e.err().code() == Some("ConflictException") => {}
            Err(e) => return Err(self.sdk_error("stop the job", e, false)),
        }
        self.describe(id).await
    }

    async fn list_folder(&self, folder: &str) -> Result<Vec<String>, ProviderError> {
        let c = self.clients().await?;
        let (bucket, prefix) = split_s3(folder)?;
        if prefix.is_empty() || !prefix.ends_with('/') {
            // Never a whole bucket, never a prefix other keys may share.
            return Err(ProviderError::Protocol(format!(
                "`{folder}` is not a job's output folder"
            )));
        }
        let mut uris = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut q = c.s3.list_objects_v2().bucket(bucket).prefix(prefix);
            if let Some(t) = &token {
                q = q.continuation_token(t);
            }
            let page = q
                .send()
                .await
                .map_err(|e| self.sdk_error("list the job's output", e, false))?;
            uris.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key())
                    .map(|k| format!("s3://{bucket}/{k}")),
            );
            token = page.next_continuation_token;
            if token.is_none() {
                break;
            }
        }
        uris.sort();
        Ok(uris)
    }

    async fn download(&self, folder: &str, dest: &Path, cap: u64) -> Result<u64, ProviderError> {
        let c = self.clients().await?;
        let (bucket, prefix) = split_s3(folder)?;
        // Every `*.out` file of the job but its manifest, in key order.
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut q = c.s3.list_objects_v2().bucket(bucket).prefix(prefix);
            if let Some(t) = &token {
                q = q.continuation_token(t);
            }
            let page = q
                .send()
                .await
                .map_err(|e| self.sdk_error("list the job's output", e, false))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key())
                    .filter(|k| k.ends_with(".out") && !k.ends_with("manifest.json.out"))
                    .map(str::to_string),
            );
            token = page.next_continuation_token;
            if token.is_none() {
                break;
            }
        }
        keys.sort();
        let mut part = PartFile::create(dest, cap)?;
        for key in &keys {
            let obj =
                c.s3.get_object()
                    .bucket(bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(|e| self.sdk_error("download the job's output", e, false))?;
            let mut body = obj.body;
            let mut last = b'\n';
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| ProviderError::Transient {
                    status: None,
                    retry_after: None,
                    message: format!("download of {key} interrupted: {e}"),
                })?;
                if let Some(&l) = chunk.last() {
                    last = l;
                }
                part.write(&chunk).await?;
            }
            // Files are joined line by line.
            if last != b'\n' {
                part.write(b"\n").await?;
            }
        }
        part.commit().await
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
        let resp = self.invoke(custom_id, shape.body(user_json)).await?;
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| self.http.body_error("the answer", &e, true))?;
        let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            self.http.redactor().error(ProviderError::Protocol(format!(
                "the answer is not JSON: {e}"
            )))
        })?;
        let Codec::Bedrock(codec) = &self.codec else {
            unreachable!("a Bedrock client holds the Bedrock codec")
        };
        let outcome = codec.answer(v).map_err(|e| {
            self.http.redactor().error(ProviderError::Protocol(format!(
                "the answer is unreadable: {e}"
            )))
        })?;
        Ok(self.http.redactor().outcome(outcome))
    }
}

/// Adds `"modelInvocationType": kind` to a create request's JSON body.
fn add_invocation_type(req: &mut aws_smithy_runtime_api::http::Request, kind: &str) {
    let Some(bytes) = req.body().bytes() else {
        return;
    };
    let Ok(serde_json::Value::Object(mut body)) = serde_json::from_slice(bytes) else {
        return;
    };
    body.insert("modelInvocationType".into(), kind.into());
    let text = serde_json::Value::Object(body).to_string();
    req.headers_mut()
        .insert("content-length", text.len().to_string());
    *req.body_mut() = aws_smithy_types::body::SdkBody::from(text);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bedrock_status_maps_and_unknown_ones_mean_still_running() {
        use ModelInvocationJobStatus as S;
        let cases = [
            ("Submitted", RemoteStatus::Validating),
            ("Validating", RemoteStatus::Validating),
            ("Scheduled", RemoteStatus::Validating),
            ("InProgress", RemoteStatus::InProgress),
            ("Stopping", RemoteStatus::Cancelling),
            ("Completed", RemoteStatus::Completed),
            ("PartiallyCompleted", RemoteStatus::Expired),
            ("Expired", RemoteStatus::Expired),
            ("Failed", RemoteStatus::Failed),
            ("Stopped", RemoteStatus::Cancelled),
            ("Hibernating", RemoteStatus::Unknown),
        ];
        for (text, want) in cases {
            assert_eq!(status_of(Some(&S::from(text))), want, "{text}");
        }
        assert_eq!(status_of(None), RemoteStatus::Unknown);
    }

    #[test]
    fn service_errors_sort_into_retry_classes() {
        let m = || "m".to_string();
        assert!(classify(Some(429), "ThrottlingException", m(), true).is_transient());
        assert!(matches!(
            classify(Some(400), "ServiceQuotaExceededException", m(), true),
            ProviderError::Transient {
                retry_after: Some(_),
                ..
            }
        ));
        assert!(matches!(
            classify(Some(403), "UnrecognizedClientException", m(), false),
            ProviderError::Auth { .. }
        ));
        assert!(matches!(
            classify(Some(500), "InternalServerException", m(), true),
            ProviderError::Ambiguous { .. }
        ));
        assert!(classify(Some(500), "InternalServerException", m(), false).is_transient());
        assert!(matches!(
            classify(Some(400), "ValidationException", m(), true),
            ProviderError::Permanent { code: Some(ref c), .. } if c == "ValidationException"
        ));
    }

    /// A control plane answering with the job description of docs/providers.md §5.4, fields
    /// this SDK version does not know (record counts, `modelInvocationType`, a new one) and a
    /// status no version knows: the job reads, as still running.
    #[tokio::test]
    async fn job_descriptions_with_unknown_fields_and_an_unknown_status_parse() {
        use axum::routing::get;
        let arn = "arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/abc123def456";
        let body = serde_json::json!({
            "jobArn": arn,
            "jobName": "nightshift-0192f3a4-7b1c-7def-8123-456789abcdef",
            "modelId": "anthropic.claude-3-haiku-20240307-v1:0",
            "clientRequestToken": "0192f3a4-7b1c-7def-8123-456789abcdef",
            "roleArn": "arn:aws:iam::123456789012:role/Batch",
            "status": "Hibernating",
            "submitTime": "2026-12-05T01:02:03Z",
            "lastModifiedTime": "2026-12-05T01:05:00.123Z",
            "inputDataConfig": {"s3InputDataConfig": {"s3Uri": "s3://b/in/x.jsonl", "s3InputFormat": "JSONL"}},
            "outputDataConfig": {"s3OutputDataConfig": {"s3Uri": "s3://b/out/"}},
            "timeoutDurationInHours": 24,
            "jobExpirationTime": "2026-12-06T01:02:03Z",
            "modelInvocationType": "Converse",
            "totalRecordCount": 120,
            "processedRecordCount": 60,
            "successRecordCount": 59,
            "errorRecordCount": 1,
            "somethingNew": {"nested": [1, 2]},
        });
        let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let s2 = seen.clone();
        let app = axum::Router::new().route(
            "/model-invocation-job/{id}",
            get(
                move |axum::extract::Path(id): axum::extract::Path<String>| {
                    let body = body.clone();
                    *s2.lock().unwrap() = id;
                    async move { axum::Json(body) }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let root = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let settings = BedrockSettings {
            region: "us-east-1".into(),
            role_arn: "arn:aws:iam::123456789012:role/Batch".into(),
            input_s3_uri: "s3://b/in/".into(),
            output_s3_uri: "s3://b/out/".into(),
            endpoint_url: None,
            s3_endpoint_url: None,
            profile: None,
            min_records: 100,
        };
        let c = BedrockClient::new(
            settings,
            "anthropic.claude-3-haiku-20240307-v1:0",
            Target::Simulator { root },
            Duration::from_secs(5),
            RetryPolicy::default(),
        )
        .unwrap();
        let r = c.get(arn).await.unwrap();
        assert_eq!(r.status, RemoteStatus::Unknown);
        assert_eq!(r.raw_status, "Hibernating");
        assert_eq!(r.id, arn);
        assert_eq!(r.created_at, Some(1_796_432_523));
        assert_eq!(
            r.local_id.as_deref(),
            Some("0192f3a4-7b1c-7def-8123-456789abcdef")
        );
        assert!(r.output_file_id.is_none(), "not over yet");
        // The ARN travels as one path segment.
        assert_eq!(*seen.lock().unwrap(), arn);
    }

    #[test]
    fn s3_uris_split_and_job_folders_are_under_the_output_prefix() {
        assert_eq!(split_s3("s3://b/in/x.jsonl").unwrap(), ("b", "in/x.jsonl"));
        assert!(split_s3("https://b/x").is_err());
        assert!(split_s3("s3:///x").is_err());
        let arn = "arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/abc123def456";
        assert_eq!(
            folder("s3://b/out/", job_id(arn)),
            "s3://b/out/abc123def456/"
        );
        assert_eq!(
            folder("s3://b/out", job_id(arn)),
            "s3://b/out/abc123def456/"
        );
        assert!(job_name("0192f3a4-7b1c-7def-8123-456789abcdef").len() <= 63);
        assert_eq!(
            s3_endpoint("https://s3.example.com"),
            "https://s3.example.com"
        );
        assert_eq!(
            s3_endpoint("http://127.0.0.1:9/s3"),
            "http://127.0.0.1:9/s3/"
        );
        assert_eq!(
            s3_endpoint("http://127.0.0.1:9/s3/"),
            "http://127.0.0.1:9/s3/"
        );
    }
}
