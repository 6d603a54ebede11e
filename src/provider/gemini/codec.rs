//! The Gemini batch encoding, with no client and no key: the fixed part of every request
//! (the schema as `responseJsonSchema`), the prompt-token estimate, request lines and
//! response lines (docs/providers.md §4).

use serde_json::{Value, json};

use super::types::{GenerateContentResponse, ResponseLine};
use crate::cost::Usage;
use crate::cost::tokens::PromptCounter;
use crate::provider::{LineOutcome, RequestSpec, ResultLine};
use crate::request::{RequestShape, USER_SLOT};

/// Gemini's request and response lines.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GeminiCodec;

impl GeminiCodec {
    pub fn request_shape(&self, spec: &RequestSpec<'_>) -> Result<RequestShape, String> {
        let mut config = json!({
            "maxOutputTokens": spec.max_output_tokens,
            "responseMimeType": "application/json",
            "responseJsonSchema": spec.schema,
        });
        if let Some(t) = spec.temperature {
            config["temperature"] = json!(t);
        }
        let mut body = json!({
            "contents": [{"role": "user", "parts": [{"text": USER_SLOT}]}],
            "generationConfig": config,
        });
        if let Some(sys) = spec.system {
            body["systemInstruction"] = json!({"parts": [{"text": sys}]});
        }
        RequestShape::from_canonical_with_slot(&body.to_string())
    }

    pub fn prompt_counter(&self, spec: &RequestSpec<'_>) -> PromptCounter {
        // No local Gemini tokenizer: the conservative estimate, over the same text.
        PromptCounter::for_chat(spec.model, spec.system, &spec.schema.to_string())
    }

    pub fn line_overhead(&self) -> u64 {
        // {"key":"<≤64>","request":}
        64 + 24
    }

    pub fn write_line(
        &self,
        custom_id: &str,
        shape: &RequestShape,
        user_json: &str,
        out: &mut Vec<u8>,
    ) {
        let head: [&[u8]; 3] = [b"{\"key\":\"", custom_id.as_bytes(), b"\",\"request\":"];
        shape.write_line(&head, user_json, out);
    }

    /// A line of a responses file, as the provider wrote it (the caller scrubs it).
    pub fn parse_line(&self, line: &[u8]) -> Result<ResultLine, String> {
        parse_line(line)
    }
}

pub(super) fn response_outcome(r: GenerateContentResponse) -> LineOutcome {
    let usage = r.usage_metadata.map(|u| u.normalised()).unwrap_or_default();
    let cand = r.candidates.into_iter().next();
    let finish = cand.as_ref().and_then(|c| c.finish_reason.clone());
    let text = cand
        .and_then(|c| c.content)
        .map(|c| {
            c.parts
                .into_iter()
                .filter_map(|p| p.text)
                .collect::<Vec<_>>()
                .join("")
        })
        .filter(|t| !t.is_empty());
    let (finish_reason, refusal) = match finish.as_deref() {
        Some("MAX_TOKENS") => (Some("length".to_string()), None),
        Some(f @ ("SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII")) => {
            (Some(f.to_string()), Some(format!("blocked: {f}")))
        }
        Some(f) => (Some(f.to_ascii_lowercase()), None),
        None => (None, None),
    };
    LineOutcome::Answer {
        content: text,
        refusal,
        finish_reason,
        model: r.model_version,
        usage,
    }
}

/// A line of a responses file, as the provider wrote it (the caller scrubs it).
fn parse_line(line: &[u8]) -> Result<ResultLine, String> {
    let l: ResponseLine = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    let key = l
        .key
        .or_else(|| {
            l.metadata
                .as_ref()
                .and_then(|m| m.get("key"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .ok_or("line has no key")?;
    let outcome = match (l.response, l.error) {
        (Some(r), _) => response_outcome(r),
        (None, Some(e)) => LineOutcome::Error {
            status: e.code.map(|c| c.clamp(0, 999) as u16),
            code: None,
            message: e.message.unwrap_or_default(),
            usage: Usage::default(),
        },
        (None, None) => return Err("line has neither `response` nor `error`".into()),
    };
    Ok(ResultLine {
        custom_id: key,
        outcome,
    })
}
