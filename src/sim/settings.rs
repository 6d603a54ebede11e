//! The simulator's knobs, shared by `nightshift simulate` flags and a pipeline's
//! `[provider.simulator]` table (one struct, so the two cannot drift apart). A batch keeps a
//! copy of the settings it was created under (saved with it in a persistent state), so
//! editing them between runs changes new batches only.

use serde::{Deserialize, Serialize};

const DEFAULT_SEED: u64 = 42;
const DEFAULT_BATCH_SECONDS: f64 = 2.0;
const DEFAULT_RETRY_AFTER_MS: u64 = 200;
const DEFAULT_AWS_REGION: &str = "us-east-1";
const DEFAULT_BEDROCK_MIN_RECORDS: u64 = 100;

/// Fault and timing settings of the provider simulator. Every rate is a probability in
/// `[0, 1]`, drawn deterministically from `seed`: per request (on its body and how many times
/// the state answered that body before), per batch (on its creation number) or per HTTP call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct SimSettings {
    /// Seed for every draw (faults, answers).
    #[arg(long, default_value_t = DEFAULT_SEED)]
    pub seed: u64,
    /// Seconds from create to completion (validating → in_progress → finalizing → completed).
    #[arg(long, default_value_t = DEFAULT_BATCH_SECONDS)]
    pub batch_seconds: f64,
    /// Share of requests answered with an error line (HTTP 500 inside the batch).
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Share of requests answered with output that is not valid JSON for the schema.
    #[arg(long, default_value_t = 0.0)]
    pub invalid_json_rate: f64,
    /// Share of batches that expire with partial results.
    #[arg(long, default_value_t = 0.0)]
    pub expire_rate: f64,
    /// The first N batches created expire with partial results (deterministic expiry).
    #[arg(long, default_value_t = 0)]
    pub expire_first: u32,
    /// Share of API calls answered with HTTP 429 and a `retry-after`.
    #[arg(long = "http-429-rate", default_value_t = 0.0)]
    pub http_429_rate: f64,
    /// Share of API calls answered with HTTP 500 (before any effect).
    #[arg(long = "http-500-rate", default_value_t = 0.0)]
    pub http_500_rate: f64,
    /// Share of requests whose prompt is partly served from the provider's cache.
    #[arg(long, default_value_t = 0.0)]
    pub cache_rate: f64,
    /// Milliseconds announced in `retry-after-ms` on a 429 (`retry-after` is rounded up).
    #[arg(long, default_value_t = DEFAULT_RETRY_AFTER_MS)]
    pub retry_after_ms: u64,
    /// Share of batch creates that take effect and then lose their response (the
    /// connection drops mid-body): the client cannot know whether the batch exists.
    #[arg(long, default_value_t = 0.0)]
    pub drop_create_rate: f64,
    /// Share of file downloads cut off half-way by a connection reset.
    #[arg(long, default_value_t = 0.0)]
    pub reset_download_rate: f64,
    /// Share of result lines written twice.
    #[arg(long, default_value_t = 0.0)]
    pub duplicate_line_rate: f64,
    /// Share of requests that run but whose result line is missing from the files (not billed).
    #[arg(long, default_value_t = 0.0)]
    pub missing_line_rate: f64,
    /// Extra result lines per batch with custom_ids that were never submitted.
    #[arg(long, default_value_t = 0)]
    pub unknown_lines: u32,
    /// Every answer uses its whole output budget (`max_completion_tokens`), the rest as
    /// reasoning: the worst case a budget cap must hold against.
    #[arg(long, default_value_t = false)]
    pub answer_at_max_tokens: bool,
    /// Every request with this text in any string of its body (a message, the system
    /// prompt, the schema) is answered with an error line, every time: one deterministic
    /// request that never succeeds, for tests of what a failed item does.
    #[arg(long)]
    pub fail_when_contains: Option<String>,
    /// Amazon Bedrock and S3: the region every request's SigV4 credential scope must name
    /// (and the region of the job ARNs handed out).
    #[arg(long, default_value = DEFAULT_AWS_REGION)]
    pub aws_region: String,
    /// Amazon Bedrock: the first N jobs of this state expire without ever starting
    /// (`Expired`: no output, nothing billed), where `expire_first` and `expire_rate` give
    /// `PartiallyCompleted`.
    #[arg(long, default_value_t = 0)]
    pub unstarted_first: u32,
    /// Amazon Bedrock: a job with fewer records fails validation (the service quota "minimum
    /// number of records per batch inference job").
    #[arg(long, default_value_t = DEFAULT_BEDROCK_MIN_RECORDS)]
    pub bedrock_min_records: u64,
}

impl Default for SimSettings {
    fn default() -> Self {
        SimSettings {
            seed: DEFAULT_SEED,
            batch_seconds: DEFAULT_BATCH_SECONDS,
            fail_rate: 0.0,
            invalid_json_rate: 0.0,
            expire_rate: 0.0,
            expire_first: 0,
            http_429_rate: 0.0,
            http_500_rate: 0.0,
            cache_rate: 0.0,
            retry_after_ms: DEFAULT_RETRY_AFTER_MS,
            drop_create_rate: 0.0,
            reset_download_rate: 0.0,
            duplicate_line_rate: 0.0,
            missing_line_rate: 0.0,
            unknown_lines: 0,
            answer_at_max_tokens: false,
            fail_when_contains: None,
            aws_region: DEFAULT_AWS_REGION.to_string(),
            unstarted_first: 0,
            bedrock_min_records: DEFAULT_BEDROCK_MIN_RECORDS,
        }
    }
}

impl SimSettings {
    /// Every out-of-range setting, as `(field, message)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for (name, v) in [
            ("fail_rate", self.fail_rate),
            ("invalid_json_rate", self.invalid_json_rate),
            ("expire_rate", self.expire_rate),
            ("http_429_rate", self.http_429_rate),
            ("http_500_rate", self.http_500_rate),
            ("cache_rate", self.cache_rate),
            ("drop_create_rate", self.drop_create_rate),
            ("reset_download_rate", self.reset_download_rate),
            ("duplicate_line_rate", self.duplicate_line_rate),
            ("missing_line_rate", self.missing_line_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                out.push((name, format!("must be between 0 and 1, got {v}")));
            }
        }
        if self.http_429_rate + self.http_500_rate > 0.95 {
            out.push((
                "http_429_rate",
                "http_429_rate + http_500_rate above 0.95 would starve every client".into(),
            ));
        }
        if self.fail_when_contains.as_deref() == Some("") {
            out.push((
                "fail_when_contains",
                "must not be empty: every request would fail".into(),
            ));
        }
        let region_ok = !self.aws_region.is_empty()
            && self
                .aws_region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !region_ok {
            out.push((
                "aws_region",
                format!(
                    "must be an AWS region name such as \"us-east-1\", got {:?}",
                    self.aws_region
                ),
            ));
        }
        if !(self.batch_seconds.is_finite() && self.batch_seconds >= 0.0) {
            out.push((
                "batch_seconds",
                format!(
                    "must be a number of seconds ≥ 0, got {}",
                    self.batch_seconds
                ),
            ));
        }
        out
    }
}
