//! The data the simulator holds, below its state and its journal: a file (`SimFile`, also
//! an S3 object, named by its `s3://` URI), a batch (`SimBatch`, with what only a Bedrock
//! job has in `BedrockJob`) and its neutral status (`Status`), and each request of a batch
//! with what became of it (`RecordedRequest`, `Outcome`). How they look on the wire is the
//! providers' (`openai`, `anthropic`, `gemini`, `bedrock`, `s3`, through `wire`); how a batch
//! moves along its timeline is `batch`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::settings::SimSettings;
use super::types::ProviderKind;
use crate::cost::Usage;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct SimFile {
    pub(super) id: String,
    pub(super) filename: String,
    pub(super) purpose: String,
    pub(super) bytes: u64,
    pub(super) created_at: i64,
    /// The content's file name in the simulator's files folder.
    pub(super) name: String,
}

/// The `purpose` of an S3 object a client put.
pub(super) const OBJECT_PUT: &str = "s3_put";
/// The `purpose` of an S3 object the simulator wrote (a Bedrock job's output).
pub(super) const OBJECT_WRITTEN: &str = "s3_output";

impl SimFile {
    /// Whether it is an S3 object (its id is its `s3://bucket/key` URI).
    pub(super) fn is_object(&self) -> bool {
        self.id.starts_with("s3://")
    }

    /// Its ETag as S3 gives it (quoted): one per version of an object, as each version has
    /// its own content file.
    pub(super) fn etag(&self) -> String {
        let h = <sha2::Sha256 as sha2::Digest>::digest(self.name.as_bytes());
        format!("\"{}\"", hex::encode(&h[..16]))
    }
}

/// The id of the S3 object `key` in `bucket`: its URI.
pub(super) fn object_id(bucket: &str, key: &str) -> String {
    format!("s3://{bucket}/{key}")
}

/// The bucket and key (possibly empty, or a prefix) of an `s3://bucket/key` URI.
pub(super) fn split_s3_uri(uri: &str) -> Option<(&str, &str)> {
    let rest = uri.strip_prefix("s3://")?;
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    let ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    ok.then_some((bucket, key))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Status {
    Validating,
    InProgress,
    Finalizing,
    Completed,
    Failed,
    Expired,
    Cancelling,
    Cancelled,
}

impl Status {
    /// The status's neutral name (OpenAI's on the wire).
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Status::Validating => "validating",
            Status::InProgress => "in_progress",
            Status::Finalizing => "finalizing",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Expired => "expired",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
        }
    }
    pub(super) fn terminal(self) -> bool {
        matches!(
            self,
            Status::Completed | Status::Failed | Status::Expired | Status::Cancelled
        )
    }
}

/// A batch. In the journal without `requests` and `inline_output`, which are written on their
/// own when they change (they can be large; the rest changes on every step of the timeline).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct SimBatch {
    pub(super) id: String,
    /// Creation number in this simulator state: 0 is the first batch it ever created.
    pub(super) ordinal: u64,
    pub(super) flavor: ProviderKind,
    /// The requests, one native line each: the content file name of the uploaded file, or of
    /// the inline requests.
    pub(super) input: String,
    pub(super) input_file_id: Option<String>,
    pub(super) endpoint: String,
    pub(super) metadata: Option<Value>,
    pub(super) display_name: Option<String>,
    /// Gemini: the model named in the create URL.
    pub(super) url_model: Option<String>,
    pub(super) inline: bool,
    pub(super) created_at: i64,
    /// Unix milliseconds its timeline started (wall clock, so it survives a restart).
    pub(super) started_ms: i64,
    pub(super) status: Status,
    pub(super) stamps: BTreeMap<String, i64>,
    pub(super) expires: bool,
    /// Unix milliseconds the cancel was asked.
    pub(super) cancel_ms: Option<i64>,
    /// Fraction of the requests that had run when the batch was cut short.
    pub(super) done_fraction: f64,
    #[serde(skip)]
    pub(super) requests: Vec<RecordedRequest>,
    pub(super) model: Option<String>,
    pub(super) counts: (u64, u64, u64),
    pub(super) output_file_id: Option<String>,
    pub(super) error_file_id: Option<String>,
    /// Gemini inline results, in input order.
    #[serde(skip)]
    pub(super) inline_output: Option<Vec<Value>>,
    /// Gemini: polls for which SUCCEEDED shows no output yet (the lagging-file quirk).
    pub(super) output_lag: u8,
    pub(super) errors: Vec<Value>,
    pub(super) usage: Usage,
    /// The settings in force when it was created: its timeline and the faults of its results
    /// follow them, whatever a later process runs with.
    pub(super) settings: SimSettings,
    /// What only an Amazon Bedrock job has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) bedrock: Option<BedrockJob>,
    /// Deleted by its client (Anthropic, once ended): gone from every endpoint, its result
    /// files with it; kept in the record.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(super) deleted: bool,
}

/// What an Amazon Bedrock model invocation job has beyond a batch: its name is the batch's
/// `display_name`, its model the batch's `url_model`, its ARN the batch's id.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct BedrockJob {
    pub(super) role_arn: String,
    pub(super) client_request_token: Option<String>,
    /// `inputDataConfig` and `outputDataConfig` as the create gave them.
    pub(super) input_config: Value,
    pub(super) output_config: Value,
    /// Where the output goes: the output URI, ending with `/`.
    pub(super) output_uri: String,
    pub(super) timeout_hours: u32,
    pub(super) invocation_type: Option<String>,
    /// The input objects read at create, in order: the last segment of each key and how many
    /// non-blank lines it held (the batch's input is their concatenation). Empty when the
    /// input URI named no object.
    pub(super) parts: Vec<(String, u64)>,
    /// Expires without ever starting (`Expired` rather than `PartiallyCompleted`).
    pub(super) unstarted: bool,
    /// The output objects written when it ended (ids, `s3://` URIs).
    pub(super) outputs: Vec<String>,
}

impl SimBatch {
    /// Whether it is a Bedrock job that never starts (it expires from `Scheduled`).
    pub(super) fn unstarted(&self) -> bool {
        self.bedrock.as_ref().is_some_and(|j| j.unstarted)
    }

    pub(super) fn local_id(&self) -> Option<String> {
        self.metadata
            .as_ref()
            .and_then(|m| m.get(crate::provider::openai::META_BATCH_ID))
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| self.display_name.clone())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pending,
    Ok,
    Error,
    InvalidJson,
    Expired,
    Cancelled,
    NotRun,
    /// Ran, but its result line was left out of the files (a fault).
    Missing,
}

impl Outcome {
    /// Whether the request ran, so its faults were drawn.
    pub(super) fn answered(self) -> bool {
        matches!(
            self,
            Outcome::Ok | Outcome::Error | Outcome::InvalidJson | Outcome::Missing
        )
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecordedRequest {
    pub custom_id: String,
    pub body_sha256: String,
    pub outcome: Outcome,
}
