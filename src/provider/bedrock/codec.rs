//! The Bedrock batch-inference encoding, with no client and no credentials (docs/providers.md
//! §5): the record body per model family (the Anthropic Messages body for `anthropic.*` models,
//! a `Converse` body for the rest), the prompt-token estimate, the input records
//! (`recordId` + `modelInput`) and the output records.
//!
//! Batch inference takes no tools and no `response_format`: the JSON Schema goes into the
//! system prompt, after [`SCHEMA_LEAD`], and validation after the answer does the rest, as
//! for every provider.

use serde_json::{Value, json};

use super::types::{ConverseOutput, OutputRecord};
use crate::cost::Usage;
use crate::cost::tokens::PromptCounter;
use crate::provider::{LineOutcome, RequestSpec, ResultLine};
use crate::request::{RequestShape, USER_SLOT};

/// The `anthropic_version` Bedrock's Anthropic models take.
pub const ANTHROPIC_VERSION: &str = "bedrock-2023-05-31";

/// The line of the system prompt the schema follows (the schema itself, compact JSON, runs to
/// the end of the system prompt).
pub const SCHEMA_LEAD: &str =
    "Answer with one JSON object only, no other text. It must match this JSON Schema:\n";

/// Which body a model takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `anthropic.*` models (and inference profiles such as `us.anthropic.*`): the Anthropic
    /// Messages body through InvokeModel.
    Anthropic,
    /// Every other model: the `Converse` body (`modelInvocationType = "Converse"`).
    Converse,
}

impl Family {
    pub fn of(model: &str) -> Family {
        let m = model.rsplit('/').next().unwrap_or(model);
        if m.starts_with("anthropic.") || m.contains(".anthropic.") {
            Family::Anthropic
        } else {
            Family::Converse
        }
    }
}

/// Bedrock's records and output lines for one model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BedrockCodec {
    pub family: Family,
}

/// The system prompt: the pipeline's own, then the schema.
pub fn system_text(spec: &RequestSpec<'_>) -> String {
    let schema = spec.schema.to_string();
    match spec.system {
        Some(s) if !s.is_empty() => format!("{s}\n\n{SCHEMA_LEAD}{schema}"),
        _ => format!("{SCHEMA_LEAD}{schema}"),
    }
}

impl BedrockCodec {
    pub fn for_model(model: &str) -> BedrockCodec {
        BedrockCodec {
            family: Family::of(model),
        }
    }

    pub fn request_shape(&self, spec: &RequestSpec<'_>) -> Result<RequestShape, String> {
        let system = system_text(spec);
        let body = match self.family {
            Family::Anthropic => {
                let mut b = json!({
                    "anthropic_version": ANTHROPIC_VERSION,
                    "max_tokens": spec.max_output_tokens,
                    "messages": [{"role": "user", "content": USER_SLOT}],
                    "system": system,
                });
                if let Some(t) = spec.temperature {
                    b["temperature"] = json!(t);
                }
                b
            }
            Family::Converse => {
                let mut cfg = json!({"maxTokens": spec.max_output_tokens});
                if let Some(t) = spec.temperature {
                    cfg["temperature"] = json!(t);
                }
                json!({
                    "inferenceConfig": cfg,
                    "messages": [{"role": "user", "content": [{"text": USER_SLOT}]}],
                    "system": [{"text": system}],
                })
            }
        };
        RequestShape::from_canonical_with_slot(&body.to_string())
    }

    pub fn prompt_counter(&self, spec: &RequestSpec<'_>) -> PromptCounter {
        // No public tokenizer for these models: the conservative estimate, over the system
        // prompt with its schema.
        let system = system_text(spec);
        PromptCounter::for_chat(spec.model, Some(&system), "")
    }

    pub fn line_overhead(&self) -> u64 {
        // {"recordId":"<≤64>","modelInput":}
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
            b"{\"recordId\":\"",
            custom_id.as_bytes(),
            b"\",\"modelInput\":",
        ];
        shape.write_line(&head, user_json, out);
    }

    /// A line of a `*.jsonl.out` file, as the provider wrote it (the caller scrubs it).
    pub fn parse_line(&self, line: &[u8]) -> Result<ResultLine, String> {
        let r: OutputRecord = serde_json::from_slice(line).map_err(|e| e.to_string())?;
        let custom_id = r
            .record_id
            .ok_or_else(|| "an output record without its recordId".to_string())?;
        let outcome = match (r.model_output, r.error) {
            (_, Some(e)) => LineOutcome::Error {
                status: e.error_code.as_ref().and_then(|c| c.as_status()),
                code: e.error_code.as_ref().map(|c| c.as_text()),
                message: e.error_message.unwrap_or_default(),
                usage: Usage::default(),
            },
            (Some(out), None) => self.answer(out)?,
            (None, None) => {
                return Err("an output record with neither modelOutput nor error".into());
            }
        };
        Ok(ResultLine { custom_id, outcome })
    }

    /// What a model's answer says (a `modelOutput`, or an online call's response body).
    pub fn answer(&self, out: Value) -> Result<LineOutcome, String> {
        // The shape tells which it is, whatever the model: a Converse response has `output`.
        if out.get("output").is_some() || out.get("stopReason").is_some() {
            let c: ConverseOutput = serde_json::from_value(out).map_err(|e| e.to_string())?;
            return Ok(converse_outcome(c));
        }
        let m: crate::provider::anthropic::types::Message =
            serde_json::from_value(out).map_err(|e| e.to_string())?;
        Ok(strip_fences(
            crate::provider::anthropic::codec::message_outcome(m),
        ))
    }
}

fn converse_outcome(c: ConverseOutput) -> LineOutcome {
    let text = c
        .output
        .and_then(|o| o.message)
        .map(|m| {
            m.content
                .into_iter()
                .filter_map(|b| b.text)
                .collect::<Vec<_>>()
                .join("")
        })
        .unwrap_or_default();
    let (finish, refusal) = match c.stop_reason.as_deref() {
        Some("max_tokens") => (Some("length".to_string()), None),
        Some("content_filtered" | "guardrail_intervened") => (
            Some("refusal".to_string()),
            Some("the model's answer was filtered".to_string()),
        ),
        Some(other) => (Some(other.to_string()), None),
        None => (None, None),
    };
    strip_fences(LineOutcome::Answer {
        content: (!text.is_empty()).then_some(text),
        refusal,
        finish_reason: finish,
        model: None,
        usage: c.usage.map(|u| u.normalised()).unwrap_or_default(),
    })
}

/// Models asked for JSON in the prompt often wrap it in a Markdown code fence: the answer is
/// what is inside (validation judges it like any other).
fn strip_fences(o: LineOutcome) -> LineOutcome {
    match o {
        LineOutcome::Answer {
            content: Some(c),
            refusal,
            finish_reason,
            model,
            usage,
        } => {
            let t = c.trim();
            let inner = t
                .strip_prefix("```json")
                .or_else(|| t.strip_prefix("```"))
                .and_then(|r| r.strip_suffix("```"))
                .map(|r| r.trim().to_string());
            LineOutcome::Answer {
                content: Some(inner.unwrap_or(c)),
                refusal,
                finish_reason,
                model,
                usage,
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(model: &'a str, schema: &'a Value) -> RequestSpec<'a> {
        RequestSpec {
            model,
            system: Some("You tag tickets."),
            max_output_tokens: 300,
            temperature: Some(0.0),
            schema,
            schema_name: "tags",
        }
    }

    #[test]
    fn anthropic_models_get_the_messages_body_and_the_rest_converse() {
        let schema = json!({"type": "object", "properties": {"tag": {"type": "string"}}});
        for (model, family) in [
            (
                "anthropic.claude-haiku-4-5-20251001-v1:0",
                Family::Anthropic,
            ),
            (
                "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
                Family::Anthropic,
            ),
            ("amazon.nova-lite-v1:0", Family::Converse),
            ("meta.llama3-1-8b-instruct-v1:0", Family::Converse),
        ] {
            assert_eq!(Family::of(model), family, "{model}");
        }
        let user = serde_json::to_string("Printer on fire").unwrap();
        let a = BedrockCodec::for_model("anthropic.claude-haiku-4-5-20251001-v1:0");
        let mut line = Vec::new();
        a.write_line(
            "b1-0",
            &a.request_shape(&spec("m", &schema)).unwrap(),
            &user,
            &mut line,
        );
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["recordId"], "b1-0");
        let body = &v["modelInput"];
        assert_eq!(body["anthropic_version"], ANTHROPIC_VERSION);
        assert_eq!(body["max_tokens"], 300);
        assert_eq!(body["messages"][0]["content"], "Printer on fire");
        assert!(body.get("tools").is_none() && body.get("model").is_none());
        let system = body["system"].as_str().unwrap();
        assert!(system.starts_with("You tag tickets.\n\n"));
        let (_, tail) = system.split_once(SCHEMA_LEAD).unwrap();
        assert_eq!(serde_json::from_str::<Value>(tail).unwrap(), schema);

        let c = BedrockCodec::for_model("amazon.nova-lite-v1:0");
        let mut line = Vec::new();
        c.write_line(
            "b1-1",
            &c.request_shape(&spec("m", &schema)).unwrap(),
            &user,
            &mut line,
        );
        let v: Value = serde_json::from_slice(&line).unwrap();
        let body = &v["modelInput"];
        assert_eq!(body["messages"][0]["content"][0]["text"], "Printer on fire");
        assert_eq!(body["inferenceConfig"]["maxTokens"], 300);
        assert_eq!(body["inferenceConfig"]["temperature"], 0.0);
        let (_, tail) = body["system"][0]["text"]
            .as_str()
            .unwrap()
            .split_once(SCHEMA_LEAD)
            .unwrap();
        assert_eq!(serde_json::from_str::<Value>(tail).unwrap(), schema);
    }

    /// The example records of docs/providers.md §5.5, and the drift a reader must survive:
    /// unknown fields, `errorCode` as text, an output without usage.
    #[test]
    fn output_records_parse_in_both_shapes_and_errors_in_both_spellings() {
        let a = BedrockCodec::for_model("anthropic.claude-3-haiku-20240307-v1:0");
        let ok = br#"{"recordId":"CALL0000001","modelInput":{"anthropic_version":"bedrock-2023-05-31","max_tokens":1024,"messages":[{"role":"user","content":[{"type":"text","text":"Summarize..."}]}]},"modelOutput":{"id":"msg_bdrk_01","type":"message","role":"assistant","model":"claude-3-haiku-20240307","content":[{"type":"text","text":"```json\n{\"tag\":\"fire\"}\n```"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":20,"output_tokens":9,"cache_read_input_tokens":4,"cache_creation_input_tokens":2}},"brandNewField":{"x":1}}"#;
        let l = a.parse_line(ok).unwrap();
        assert_eq!(l.custom_id, "CALL0000001");
        let LineOutcome::Answer {
            content,
            usage,
            finish_reason,
            ..
        } = l.outcome
        else {
            panic!("{l:?}")
        };
        assert_eq!(content.as_deref(), Some(r#"{"tag":"fire"}"#));
        assert_eq!(finish_reason.as_deref(), Some("end_turn"));
        assert_eq!(
            (
                usage.input_tokens,
                usage.cached_input_tokens,
                usage.cache_write_tokens,
                usage.output_tokens
            ),
            (26, 4, 2, 9)
        );

        let c = BedrockCodec::for_model("amazon.nova-lite-v1:0");
        let conv = br#"{"recordId":"r2","modelInput":{},"modelOutput":{"output":{"message":{"role":"assistant","content":[{"text":"{\"tag\":"},{"text":"\"x\"}"}]}},"stopReason":"max_tokens","usage":{"inputTokens":11,"outputTokens":3,"totalTokens":14,"cacheReadInputTokens":5},"metrics":{"latencyMs":120}}}"#;
        let LineOutcome::Answer {
            content,
            usage,
            finish_reason,
            ..
        } = c.parse_line(conv).unwrap().outcome
        else {
            panic!()
        };
        assert_eq!(content.as_deref(), Some(r#"{"tag":"x"}"#));
        assert_eq!(finish_reason.as_deref(), Some("length"));
        assert_eq!(
            (
                usage.input_tokens,
                usage.cached_input_tokens,
                usage.output_tokens
            ),
            (16, 5, 3)
        );

        let num = br#"{"recordId":"1223213ABCD","modelInput":{"inputText":"Hello world"},"error":{"errorCode":400,"errorMessage":"bad request"}}"#;
        let text = br#"{"recordId":"1223213ABCE","modelInput":{},"error":{"errorCode":"429","errorMessage":"throttled"}}"#;
        for (line, status) in [(&num[..], 400), (&text[..], 429)] {
            let LineOutcome::Error {
                status: s, message, ..
            } = c.parse_line(line).unwrap().outcome
            else {
                panic!()
            };
            assert_eq!(s, Some(status));
            assert!(!message.is_empty());
        }
        assert!(c.parse_line(br#"{"modelInput":{}}"#).is_err());
        assert!(c.parse_line(br#"{"recordId":"x"}"#).is_err());
    }
}
