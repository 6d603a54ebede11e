//! Amazon Bedrock batch inference wire types for what nightshift reads itself (docs/providers.md
//! §5): the output records in S3 and the job's `manifest.json.out`. The control plane's job
//! objects come typed from `aws-sdk-bedrock`. Lenient: optional fields, unknown fields ignored,
//! `errorCode` as a number or as text.

use serde::Deserialize;

/// One line of a `*.jsonl.out` file: the record's answer or its error.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutputRecord {
    #[serde(default)]
    pub record_id: Option<String>,
    #[serde(default)]
    pub model_output: Option<serde_json::Value>,
    #[serde(default)]
    pub error: Option<RecordError>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordError {
    #[serde(default)]
    pub error_code: Option<NumberOrText>,
    #[serde(default)]
    pub error_message: Option<String>,
}

/// A value documented as a number that some writers send as a string.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum NumberOrText {
    Number(i64),
    Text(String),
}

impl NumberOrText {
    pub fn as_status(&self) -> Option<u16> {
        match self {
            NumberOrText::Number(n) => u16::try_from(*n).ok(),
            NumberOrText::Text(t) => t.trim().parse().ok(),
        }
    }

    pub fn as_text(&self) -> String {
        match self {
            NumberOrText::Number(n) => n.to_string(),
            NumberOrText::Text(t) => t.clone(),
        }
    }
}

/// A `Converse` response (`modelOutput` of a job with `modelInvocationType = "Converse"`).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConverseOutput {
    #[serde(default)]
    pub output: Option<ConverseMessageHolder>,
    #[serde(default)]
    pub stop_reason: Option<String>,
    #[serde(default)]
    pub usage: Option<ConverseUsage>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ConverseMessageHolder {
    #[serde(default)]
    pub message: Option<ConverseMessage>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ConverseMessage {
    #[serde(default)]
    pub content: Vec<ConverseBlock>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ConverseBlock {
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConverseUsage {
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
    #[serde(default)]
    pub cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    pub cache_write_input_tokens: Option<u64>,
}

impl ConverseUsage {
    /// Normalised: input counts every prompt token, cache reads and writes included
    /// (Converse, like Anthropic, reports them apart from `inputTokens`).
    pub fn normalised(&self) -> crate::cost::Usage {
        let read = self.cache_read_input_tokens.unwrap_or(0);
        let write = self.cache_write_input_tokens.unwrap_or(0);
        crate::cost::Usage {
            input_tokens: self.input_tokens + read + write,
            cached_input_tokens: read,
            cache_write_tokens: write,
            output_tokens: self.output_tokens,
            reasoning_tokens: 0,
        }
    }
}

/// `manifest.json.out`: the job's own totals.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    #[serde(default)]
    pub total_record_count: u64,
    #[serde(default)]
    pub processed_record_count: u64,
    #[serde(default)]
    pub success_record_count: u64,
    #[serde(default)]
    pub error_record_count: u64,
    #[serde(default)]
    pub input_token_count: u64,
    #[serde(default)]
    pub output_token_count: u64,
}
