//! Gemini Batch wire types (docs/providers.md §4): camelCase, int64 counts as strings, open
//! enums kept as text, unknown fields ignored.

use serde::Deserialize;
use serde_json::Value;

/// An int64 as Google sends it: a string (or, leniently, a number).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Int64(pub u64);

impl<'de> Deserialize<'de> for Int64 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Ok(Int64(match v {
            Value::String(s) => s.parse().unwrap_or(0),
            Value::Number(n) => n.as_u64().unwrap_or(0),
            _ => 0,
        }))
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchStats {
    #[serde(default)]
    pub request_count: Int64,
    #[serde(default)]
    pub successful_request_count: Int64,
    #[serde(default)]
    pub failed_request_count: Int64,
    #[serde(default)]
    pub pending_request_count: Int64,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Output {
    #[serde(default)]
    pub responses_file: Option<String>,
    #[serde(default)]
    pub inlined_responses: Option<InlinedResponses>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InlinedResponses {
    #[serde(default)]
    pub inlined_responses: Vec<Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub create_time: Option<String>,
    #[serde(default)]
    pub batch_stats: Option<BatchStats>,
    #[serde(default)]
    pub output: Option<Output>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Status {
    #[serde(default)]
    pub code: Option<i64>,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Operation {
    pub name: String,
    #[serde(default)]
    pub metadata: Option<Metadata>,
    #[serde(default)]
    pub done: bool,
    #[serde(default)]
    pub response: Option<Output>,
    #[serde(default)]
    pub error: Option<Status>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationList {
    #[serde(default)]
    pub operations: Vec<Operation>,
    #[serde(default)]
    pub next_page_token: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct File {
    pub name: String,
    #[serde(default)]
    pub display_name: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct FileEnvelope {
    pub file: File,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileList {
    #[serde(default)]
    pub files: Vec<File>,
    #[serde(default)]
    pub next_page_token: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageMetadata {
    #[serde(default)]
    pub prompt_token_count: u64,
    #[serde(default)]
    pub cached_content_token_count: u64,
    #[serde(default)]
    pub candidates_token_count: u64,
    #[serde(default)]
    pub thoughts_token_count: u64,
}

impl UsageMetadata {
    pub fn normalised(&self) -> crate::cost::Usage {
        crate::cost::Usage {
            input_tokens: self.prompt_token_count,
            cached_input_tokens: self.cached_content_token_count,
            cache_write_tokens: 0,
            output_tokens: self.candidates_token_count + self.thoughts_token_count,
            reasoning_tokens: self.thoughts_token_count,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct Part {
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Content {
    #[serde(default)]
    pub parts: Vec<Part>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub finish_reason: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GenerateContentResponse {
    #[serde(default)]
    pub candidates: Vec<Candidate>,
    #[serde(default)]
    pub usage_metadata: Option<UsageMetadata>,
    #[serde(default)]
    pub model_version: Option<String>,
}

/// One line of a responses file (or one inline response, with its key in metadata).
#[derive(Clone, Debug, Deserialize)]
pub struct ResponseLine {
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub response: Option<GenerateContentResponse>,
    #[serde(default)]
    pub error: Option<Status>,
}
