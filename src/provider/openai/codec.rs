//! The OpenAI and Azure OpenAI batch encoding, with no client and no key: the fixed part of
//! every request, the prompt-token counter, input lines and result lines (docs/providers.md
//! §1–2). `plan` and the batch writer use it as it is; the client adds only the HTTP.

use serde_json::{Value, json};

use super::ENDPOINT;
use super::types::{self, ChatCompletion, OutputLine};
use crate::cost::Usage;
use crate::cost::tokens::PromptCounter;
use crate::provider::http;
use crate::provider::redact::Redactor;
use crate::provider::{LineOutcome, RequestSpec, ResultLine};
use crate::request::{RequestShape, USER_SLOT};

/// OpenAI's request lines, or Azure's: the same format, with the deployment as the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenAiCodec {
    /// Azure: the deployment every request names.
    pub deployment: Option<String>,
}

impl OpenAiCodec {
    pub fn kind(&self) -> &'static str {
        match self.deployment {
            None => "openai",
            Some(_) => "azure",
        }
    }

    pub fn request_shape(&self, spec: &RequestSpec<'_>) -> Result<RequestShape, String> {
        let mut messages = Vec::new();
        if let Some(sys) = spec.system {
            messages.push(json!({"role": "system", "content": sys}));
        }
        messages.push(json!({"role": "user", "content": USER_SLOT}));
        let model = self.deployment.as_deref().unwrap_or(spec.model);
        let mut body = json!({
            "model": model,
            "messages": messages,
            "max_completion_tokens": spec.max_output_tokens,
            "response_format": response_format(spec),
        });
        if let Some(t) = spec.temperature {
            body["temperature"] = json!(t);
        }
        // serde_json's map is ordered by key: this is the canonical form.
        RequestShape::from_canonical_with_slot(&body.to_string())
    }

    pub fn prompt_counter(&self, spec: &RequestSpec<'_>) -> PromptCounter {
        // Exactly what the request carries: the same response_format JSON the shape holds.
        let rf = response_format(spec).to_string();
        PromptCounter::for_chat(spec.model, spec.system, &rf)
    }

    pub fn line_overhead(&self) -> u64 {
        // {"custom_id":"<≤64>","method":"POST","url":"/v1/chat/completions","body":}
        64 + 80
    }

    pub fn write_line(
        &self,
        custom_id: &str,
        shape: &RequestShape,
        user_json: &str,
        out: &mut Vec<u8>,
    ) {
        // custom ids are ours, `[A-Za-z0-9_-]`, never needing escapes
        let head: [&[u8]; 5] = [
            b"{\"custom_id\":\"",
            custom_id.as_bytes(),
            b"\",\"method\":\"POST\",\"url\":\"",
            ENDPOINT.as_bytes(),
            b"\",\"body\":",
        ];
        shape.write_line(&head, user_json, out);
    }

    /// A line of an output or error file, its error preview scrubbed with `redactor`.
    pub fn parse_line(&self, line: &[u8], redactor: &Redactor) -> Result<ResultLine, String> {
        parse_line(line, redactor)
    }
}

/// What a chat completion says, as a result-line outcome.
pub(super) fn chat_outcome(c: ChatCompletion) -> LineOutcome {
    let usage = c.usage.map(|u| u.normalised()).unwrap_or_default();
    let (content, refusal, finish_reason) = match c.choices.into_iter().next() {
        Some(ch) => {
            let (content, refusal) = ch
                .message
                .map(|m| (m.content, m.refusal))
                .unwrap_or((None, None));
            (content, refusal, ch.finish_reason)
        }
        None => (None, None, None),
    };
    LineOutcome::Answer {
        content,
        refusal,
        finish_reason,
        model: c.model,
        usage,
    }
}

/// The structured-output request: the pipeline's schema, strict.
fn response_format(spec: &RequestSpec<'_>) -> Value {
    json!({
        "type": "json_schema",
        "json_schema": {"name": spec.schema_name, "schema": spec.schema, "strict": true}
    })
}

/// A line of an output or error file. Only the error preview is scrubbed here (before it is
/// cut); the caller scrubs the rest.
fn parse_line(line: &[u8], redactor: &Redactor) -> Result<ResultLine, String> {
    // Most lines are answers: one pass over the line, the body read as it goes. Whatever
    // that pass does not take (another status, no body, a body that is not a chat
    // completion, a malformed line) is read as before, so it ends the same way.
    if let Ok(types::AnsweredLine {
        custom_id,
        response:
            Some(types::AnsweredResponse {
                status_code: 200,
                body: Some(c),
            }),
        ..
    }) = serde_json::from_slice(line)
    {
        return Ok(ResultLine {
            custom_id: custom_id.into_owned(),
            outcome: chat_outcome(c),
        });
    }
    let l: OutputLine<'_> = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    let outcome = match (l.response, l.error) {
        (Some(resp), _) if resp.status_code == 200 => {
            let body = resp.body.map(|b| b.get()).unwrap_or("null");
            let c: ChatCompletion = serde_json::from_str(body)
                .map_err(|e| format!("response body is not a chat completion: {e}"))?;
            chat_outcome(c)
        }
        (Some(resp), _) => {
            let body: Value = resp
                .body
                .and_then(|b| serde_json::from_str(b.get()).ok())
                .unwrap_or(Value::Null);
            let usage = body
                .get("usage")
                .and_then(|u| serde_json::from_value::<types::CompletionUsage>(u.clone()).ok())
                .map(|u| u.normalised())
                .unwrap_or_default();
            let (code, message) = http::error_message(&body.to_string(), redactor);
            LineOutcome::Error {
                status: Some(resp.status_code),
                code,
                message,
                usage,
            }
        }
        (None, Some(err)) => match err.code.as_deref() {
            Some("batch_expired") => LineOutcome::Expired,
            Some("batch_cancelled") | Some("batch_canceled") => LineOutcome::Cancelled,
            _ => LineOutcome::Error {
                status: None,
                code: err.code,
                message: err.message.unwrap_or_default(),
                usage: Usage::default(),
            },
        },
        (None, None) => return Err("line has neither `response` nor `error`".into()),
    };
    Ok(ResultLine {
        custom_id: l.custom_id.into_owned(),
        outcome,
    })
}
