//! The Anthropic Message Batches encoding, with no client and no key: the fixed part of
//! every request (the schema as the one forced tool), the prompt-token estimate, request
//! lines and result lines (docs/providers.md §3).

use serde_json::{Value, json};

use super::types::ResultLine as WireLine;
use crate::cost::Usage;
use crate::cost::tokens::PromptCounter;
use crate::provider::{LineOutcome, RequestSpec, ResultLine};
use crate::request::{RequestShape, USER_SLOT};

/// Anthropic's request and result lines.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AnthropicCodec;

impl AnthropicCodec {
    pub fn request_shape(&self, spec: &RequestSpec<'_>) -> Result<RequestShape, String> {
        let mut body = json!({
            "model": spec.model,
            "max_tokens": spec.max_output_tokens,
            "messages": [{"role": "user", "content": USER_SLOT}],
            "tools": tools(spec),
            "tool_choice": {"type": "tool", "name": spec.schema_name},
        });
        if let Some(sys) = spec.system {
            body["system"] = json!(sys);
        }
        if let Some(t) = spec.temperature {
            body["temperature"] = json!(t);
        }
        RequestShape::from_canonical_with_slot(&body.to_string())
    }

    pub fn prompt_counter(&self, spec: &RequestSpec<'_>) -> PromptCounter {
        // No public tokenizer for Claude: the conservative estimate, over the same text.
        PromptCounter::for_chat(spec.model, spec.system, &tools(spec).to_string())
    }

    pub fn line_overhead(&self) -> u64 {
        // {"custom_id":"<≤64>","params":}
        64 + 32
    }

    pub fn write_line(
        &self,
        custom_id: &str,
        shape: &RequestShape,
        user_json: &str,
        out: &mut Vec<u8>,
    ) {
        let head: [&[u8]; 3] = [
            b"{\"custom_id\":\"",
            custom_id.as_bytes(),
            b"\",\"params\":",
        ];
        shape.write_line(&head, user_json, out);
    }

    /// A line of a results file, as the provider wrote it (the caller scrubs it).
    pub fn parse_line(&self, line: &[u8]) -> Result<ResultLine, String> {
        parse_line(line)
    }
}

/// What a message says, as a result-line outcome: the forced tool's input is the answer.
pub(crate) fn message_outcome(m: super::types::Message) -> LineOutcome {
    let usage = m.usage.map(|u| u.normalised()).unwrap_or_default();
    let tool = m
        .content
        .iter()
        .find(|b| b.kind == "tool_use")
        .and_then(|b| b.input.as_ref())
        .map(|v| v.to_string());
    let text = m
        .content
        .iter()
        .filter_map(|b| b.text.as_deref())
        .collect::<Vec<_>>()
        .join("");
    let content = tool.or((!text.is_empty()).then_some(text));
    let (finish, refusal) = match m.stop_reason.as_deref() {
        Some("max_tokens") => (Some("length".to_string()), None),
        Some("refusal") => (
            Some("refusal".to_string()),
            Some("the model refused".to_string()),
        ),
        Some(other) => (Some(other.to_string()), None),
        None => (None, None),
    };
    LineOutcome::Answer {
        content,
        refusal,
        finish_reason: finish,
        model: m.model,
        usage,
    }
}

/// A line of a results file, as the provider wrote it (the caller scrubs it).
fn parse_line(line: &[u8]) -> Result<ResultLine, String> {
    let l: WireLine = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    let outcome = match l.result.kind.as_str() {
        "succeeded" => match l.result.message {
            Some(m) => message_outcome(m),
            None => return Err("a succeeded result without its message".into()),
        },
        "errored" => {
            let detail = l.result.error.and_then(|e| e.error);
            LineOutcome::Error {
                status: None,
                code: detail.as_ref().and_then(|d| d.kind.clone()),
                message: detail.and_then(|d| d.message).unwrap_or_default(),
                usage: Usage::default(),
            }
        }
        "expired" => LineOutcome::Expired,
        "canceled" | "cancelled" => LineOutcome::Cancelled,
        other => LineOutcome::Error {
            status: None,
            code: Some(other.to_string()),
            message: format!("unknown result type `{other}`"),
            usage: Usage::default(),
        },
    };
    Ok(ResultLine {
        custom_id: l.custom_id,
        outcome,
    })
}

/// The one tool every request is made to call: its input is the structured answer.
fn tools(spec: &RequestSpec<'_>) -> Value {
    json!([{
        "name": spec.schema_name,
        "description": "Record the answer in the required structure.",
        "input_schema": spec.schema,
    }])
}
