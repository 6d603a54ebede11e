//! The `[provider]` settings a client is built from: which provider, which model, how
//! requests are sent (batch or online), where the key comes from, and the timeouts. Plain
//! data: the pipeline file is parsed and checked in `config`, the key read in `provider`.

use std::path::PathBuf;
use std::time::Duration;

use crate::cost::PricingMode;

/// OpenAI's limits for one batch input file.
pub const OPENAI_MAX_REQUESTS: usize = 50_000;
pub const OPENAI_MAX_BYTES: u64 = 200 * 1000 * 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    OpenAi,
    Azure,
    Anthropic,
    Gemini,
    Bedrock,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Azure => "azure",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
            ProviderKind::Bedrock => "bedrock",
        }
    }

    pub fn default_key_env(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "OPENAI_API_KEY",
            ProviderKind::Azure => "AZURE_OPENAI_API_KEY",
            ProviderKind::Anthropic => "ANTHROPIC_API_KEY",
            ProviderKind::Gemini => "GEMINI_API_KEY",
            // Not read as a key: Bedrock takes the AWS credential chain (`KeySource::AwsChain`).
            ProviderKind::Bedrock => "AWS_ACCESS_KEY_ID",
        }
    }

    /// The provider's own limits for one batch: (requests, bytes).
    pub fn batch_limits(self) -> (usize, u64) {
        match self {
            ProviderKind::OpenAi => (OPENAI_MAX_REQUESTS, OPENAI_MAX_BYTES),
            ProviderKind::Azure => (100_000, 200 * 1000 * 1000),
            ProviderKind::Anthropic => (100_000, 256 * 1000 * 1000),
            // No documented request cap; files up to 2 GB.
            ProviderKind::Gemini => (100_000, 2 * 1000 * 1000 * 1000),
            // Default quotas: records per job, bytes per input file.
            ProviderKind::Bedrock => (50_000, 1000 * 1000 * 1000),
        }
    }
}

/// How requests are sent: provider batch jobs at batch prices, or real-time calls under
/// concurrency and rate limits at standard prices. One enum with the mode the store keeps for
/// each batch, so the pipeline's mode and a batch's are the same values.
pub use crate::store::BatchMode as Mode;

/// The online-mode limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OnlineLimits {
    pub concurrency: usize,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
}

/// Where the API key comes from. The key itself is read only when a client is built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    Env(String),
    File(PathBuf),
    /// No key: the AWS SDK's credential chain (Bedrock), resolved when the client first calls.
    AwsChain,
}

#[derive(Clone, Debug)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    pub mode: Mode,
    pub model: String,
    /// Azure: the deployment the requests name (defaults to `model`).
    pub deployment: Option<String>,
    /// Azure: the `api-version` query parameter.
    pub api_version: String,
    pub online: OnlineLimits,
    /// A retry round with fewer items than this goes online instead of into a new batch.
    pub retry_online_below: Option<u64>,
    pub base_url: Option<String>,
    pub key: KeySource,
    pub simulate: bool,
    pub completion_window: String,
    pub poll_min: Duration,
    pub poll_max: Duration,
    pub request_timeout: Duration,
    /// How long the provider may stay unreachable (refused connections, timeouts, 5xx and
    /// 429s without end) before a run gives up with exit 75.
    pub unreachable_timeout: Duration,
    /// How long after an ambiguous create the provider's list is trusted to show the batch.
    pub reconcile_grace: Duration,
    pub max_download_bytes: u64,
    /// Amazon Bedrock: where jobs run and where their records go (`kind = "bedrock"` only).
    pub bedrock: Option<BedrockSettings>,
}

/// The `[provider]` settings of Amazon Bedrock batch inference. Credentials are not here: they
/// come from the standard AWS chain (environment, shared profile, web identity, container or
/// instance role).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BedrockSettings {
    pub region: String,
    /// The IAM service role Bedrock assumes to read the input and write the output in S3.
    pub role_arn: String,
    /// `s3://bucket/prefix/`: where batch input files are uploaded.
    pub input_s3_uri: String,
    /// `s3://bucket/prefix/`: where jobs write their output (a folder per job).
    pub output_s3_uri: String,
    /// Overrides the endpoint of both services (Bedrock control plane and S3), e.g. a
    /// simulator or an S3-compatible store.
    pub endpoint_url: Option<String>,
    /// Overrides the S3 endpoint alone.
    pub s3_endpoint_url: Option<String>,
    /// The shared-config profile to take credentials and settings from (else `AWS_PROFILE`).
    pub profile: Option<String>,
    /// The model's minimum number of records per job (a service quota; 100 by default).
    /// Rounds with fewer requests go online (Converse or InvokeModel at on-demand prices).
    pub min_records: u64,
}

/// Bedrock's default minimum number of records per batch inference job.
pub const BEDROCK_MIN_RECORDS: u64 = 100;

impl ProviderConfig {
    pub fn pricing_mode(&self) -> PricingMode {
        match self.mode {
            Mode::Batch => PricingMode::Batch,
            Mode::Online => PricingMode::Standard,
        }
    }
}
