//! OpenAI Batch API wire types (docs/providers.md §1), deserialised leniently: every field that
//! the API may omit or null is optional, unknown fields are ignored and enums are open, so a
//! new status or field never breaks parsing.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize)]
pub struct FileObject {
    pub id: String,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub filename: Option<String>,
    #[serde(default)]
    pub purpose: Option<String>,
    #[serde(default)]
    pub bytes: Option<u64>,
    #[serde(default)]
    pub created_at: Option<i64>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ListPage<T> {
    pub data: Vec<T>,
    #[serde(default)]
    pub has_more: bool,
    #[serde(default)]
    pub last_id: Option<String>,
}

/// Counts; Azure sends nulls while validating.
#[derive(Clone, Debug, Deserialize)]
pub struct RequestCounts {
    #[serde(default)]
    pub total: Option<u64>,
    #[serde(default)]
    pub completed: Option<u64>,
    #[serde(default)]
    pub failed: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct InputTokensDetails {
    #[serde(default)]
    pub cached_tokens: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct OutputTokensDetails {
    #[serde(default)]
    pub reasoning_tokens: Option<u64>,
}

/// `batch.usage` (batches created after 2025-09-07).
#[derive(Clone, Debug, Deserialize)]
pub struct BatchUsage {
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub input_tokens_details: Option<InputTokensDetails>,
    #[serde(default)]
    pub output_tokens: u64,
    #[serde(default)]
    pub output_tokens_details: Option<OutputTokensDetails>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct BatchError {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub line: Option<u64>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct BatchErrors {
    #[serde(default)]
    pub data: Vec<BatchError>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Batch {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub output_file_id: Option<String>,
    #[serde(default)]
    pub error_file_id: Option<String>,
    #[serde(default)]
    pub request_counts: Option<RequestCounts>,
    #[serde(default)]
    pub metadata: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    pub usage: Option<BatchUsage>,
    #[serde(default)]
    pub errors: Option<BatchErrors>,
    #[serde(default)]
    pub created_at: Option<serde_json::Value>,
    #[serde(default)]
    pub model: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CreateBatch<'a> {
    pub input_file_id: &'a str,
    pub endpoint: &'a str,
    pub completion_window: &'a str,
    pub metadata: std::collections::BTreeMap<&'static str, String>,
}

/// One line of an output or error file. The response body is kept raw and parsed once, into
/// the type its status calls for.
#[derive(Clone, Debug, Deserialize)]
pub struct OutputLine<'a> {
    #[serde(borrow)]
    pub custom_id: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    pub response: Option<LineResponse<'a>>,
    #[serde(default)]
    pub error: Option<LineError>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct LineResponse<'a> {
    pub status_code: u16,
    #[serde(default, borrow)]
    pub body: Option<&'a serde_json::value::RawValue>,
}

/// [`OutputLine`] read in one pass for the common case, an answered request: the body typed
/// as a chat completion while the line is read. Any other line (another status, a body that
/// is not a chat completion) is read again as an [`OutputLine`].
#[derive(Debug, Deserialize)]
pub struct AnsweredLine<'a> {
    #[serde(borrow)]
    pub custom_id: std::borrow::Cow<'a, str>,
    #[serde(default)]
    pub response: Option<AnsweredResponse>,
    #[serde(default)]
    pub error: Option<LineError>,
}

#[derive(Debug, Deserialize)]
pub struct AnsweredResponse {
    pub status_code: u16,
    #[serde(default)]
    pub body: Option<ChatCompletion>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct LineError {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ChatCompletion {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub choices: Vec<Choice>,
    #[serde(default)]
    pub usage: Option<CompletionUsage>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Choice {
    #[serde(default)]
    pub message: Option<ChoiceMessage>,
    #[serde(default)]
    pub finish_reason: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ChoiceMessage {
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default)]
    pub refusal: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PromptTokensDetails {
    #[serde(default)]
    pub cached_tokens: Option<u64>,
    #[serde(default)]
    pub cache_write_tokens: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct CompletionTokensDetails {
    #[serde(default)]
    pub reasoning_tokens: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct CompletionUsage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    #[serde(default)]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
}

impl CompletionUsage {
    pub fn normalised(&self) -> crate::cost::Usage {
        let d = self.prompt_tokens_details.clone().unwrap_or_default();
        crate::cost::Usage {
            input_tokens: self.prompt_tokens,
            cached_input_tokens: d.cached_tokens.unwrap_or(0),
            cache_write_tokens: d.cache_write_tokens.unwrap_or(0),
            output_tokens: self.completion_tokens,
            reasoning_tokens: self
                .completion_tokens_details
                .as_ref()
                .and_then(|c| c.reasoning_tokens)
                .unwrap_or(0),
        }
    }
}
