//! The providers' wire formats, as the simulator speaks them: reading a request in each
//! provider's shape into one neutral form, and writing answers, result lines and batch
//! objects back in each provider's shape (docs/providers.md §1–§4, §7.1).

use serde_json::{Value, json};

use crate::cost::Usage;
use crate::cost::tokens::Tokenizer;

/// Which provider's wire format a batch or request speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flavor {
    OpenAi,
    Azure,
    Anthropic,
    Gemini,
}

impl Flavor {
    /// The namespace prices are looked up under.
    pub fn price_namespace(self) -> &'static str {
        match self {
            Flavor::OpenAi => "openai",
            Flavor::Azure => "azure",
            Flavor::Anthropic => "anthropic",
            Flavor::Gemini => "gemini",
        }
    }
}

/// A request in neutral form: what the answer generator and the token count need.
#[derive(Clone, Debug)]
pub struct Neutral {
    pub model: String,
    pub prompt_tokens: u64,
    pub schema: Value,
    pub max_tokens: u64,
    pub tokenizer: Tokenizer,
}

fn str_at<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

fn default_schema() -> Value {
    json!({"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]})
}

/// Reads a request body of `flavor` (`model` overrides the body's, for Gemini where the model
/// is in the URL). Prompt tokens are counted exactly as nightshift's planner counts them for
/// that provider: framing, system and user message, plus the output-format JSON.
pub fn neutral(flavor: Flavor, body: &Value, model: Option<&str>) -> Neutral {
    match flavor {
        Flavor::OpenAi | Flavor::Azure => {
            let model = body
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let tok = Tokenizer::for_model(&model);
            let messages: Vec<(&str, &str)> = body
                .get("messages")
                .and_then(Value::as_array)
                .map(|ms| {
                    ms.iter()
                        .map(|m| (str_at(m, "/role"), str_at(m, "/content")))
                        .collect()
                })
                .unwrap_or_default();
            let rf = body.get("response_format").map(|v| v.to_string());
            Neutral {
                prompt_tokens: tok.chat_prompt_tokens(messages, rf.as_deref()),
                schema: body
                    .pointer("/response_format/json_schema/schema")
                    .cloned()
                    .unwrap_or_else(default_schema),
                max_tokens: body
                    .get("max_completion_tokens")
                    .or_else(|| body.get("max_tokens"))
                    .and_then(Value::as_u64)
                    .unwrap_or(4096),
                tokenizer: tok,
                model,
            }
        }
        Flavor::Anthropic => {
            let model = body
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let tok = Tokenizer::for_model(&model);
            let mut messages: Vec<(&str, &str)> = Vec::new();
            if let Some(s) = body.get("system").and_then(Value::as_str) {
                messages.push(("system", s));
            }
            for m in body
                .get("messages")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                messages.push((str_at(m, "/role"), str_at(m, "/content")));
            }
            let tools = body.get("tools").map(|t| t.to_string());
            Neutral {
                prompt_tokens: tok.chat_prompt_tokens(messages, tools.as_deref()),
                schema: body
                    .pointer("/tools/0/input_schema")
                    .cloned()
                    .unwrap_or_else(default_schema),
                max_tokens: body
                    .get("max_tokens")
                    .and_then(Value::as_u64)
                    .unwrap_or(1024),
                tokenizer: tok,
                model,
            }
        }
        Flavor::Gemini => {
            let model = model
                .map(|m| m.trim_start_matches("models/").to_string())
                .unwrap_or_default();
            let tok = Tokenizer::for_model(&model);
            let mut messages: Vec<(&str, &str)> = Vec::new();
            let sys = str_at(body, "/systemInstruction/parts/0/text");
            if body.get("systemInstruction").is_some() {
                messages.push(("system", sys));
            }
            for c in body
                .get("contents")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                messages.push((str_at(c, "/role"), str_at(c, "/parts/0/text")));
            }
            let schema = body
                .pointer("/generationConfig/responseJsonSchema")
                .cloned();
            let schema_text = schema.as_ref().map(|s| s.to_string());
            Neutral {
                prompt_tokens: tok.chat_prompt_tokens(messages, schema_text.as_deref()),
                schema: schema.unwrap_or_else(default_schema),
                max_tokens: body
                    .pointer("/generationConfig/maxOutputTokens")
                    .and_then(Value::as_u64)
                    .unwrap_or(8192),
                tokenizer: tok,
                model,
            }
        }
    }
}

/// What happened to one request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// An answer (valid or not): content text, whether it was cut at the token limit, usage.
    Answer {
        content: String,
        truncated: bool,
        usage: Usage,
    },
    /// A server error for this request (not billed).
    Error,
    Expired,
    Cancelled,
}

/// The usage object of an answer, in `flavor`'s names.
fn usage_json(flavor: Flavor, u: &Usage) -> Value {
    match flavor {
        Flavor::OpenAi | Flavor::Azure => json!({
            "prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
            "total_tokens": u.input_tokens + u.output_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
        }),
        Flavor::Anthropic => json!({
            "input_tokens": u.input_tokens - u.cached_input_tokens - u.cache_write_tokens,
            "cache_creation_input_tokens": u.cache_write_tokens,
            "cache_read_input_tokens": u.cached_input_tokens,
            "output_tokens": u.output_tokens,
            "service_tier": "batch",
        }),
        Flavor::Gemini => json!({
            "promptTokenCount": u.input_tokens,
            "cachedContentTokenCount": u.cached_input_tokens,
            "candidatesTokenCount": u.output_tokens - u.reasoning_tokens,
            "thoughtsTokenCount": u.reasoning_tokens,
            "totalTokenCount": u.input_tokens + u.output_tokens,
        }),
    }
}

/// The tool name nightshift's Anthropic requests force (read back from the request).
pub fn anthropic_tool(body: &Value) -> String {
    str_at(body, "/tool_choice/name").to_string()
}

/// The synchronous response body of an answer (chat completion, message, generateContent).
pub fn answer_body(flavor: Flavor, id: &str, model: &str, tool: &str, reply: &Reply) -> Value {
    let Reply::Answer {
        content,
        truncated,
        usage,
    } = reply
    else {
        return Value::Null;
    };
    match flavor {
        Flavor::OpenAi | Flavor::Azure => json!({
            "id": format!("chatcmpl-{id}"), "object": "chat.completion", "created": crate::util::time::unix_now(),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": null, "annotations": []},
                "logprobs": null, "finish_reason": if *truncated { "length" } else { "stop" }}],
            "usage": usage_json(flavor, usage),
            "service_tier": "default", "system_fingerprint": "fp_sim",
        }),
        Flavor::Anthropic => {
            // A structured answer comes back as the forced tool's input; anything that is not
            // a JSON object comes back as text (what a model that ignored the tool returns).
            let block = match serde_json::from_str::<Value>(content) {
                Ok(v @ Value::Object(_)) if !truncated => {
                    json!({"type": "tool_use", "id": format!("toolu_{id}"), "name": tool, "input": v})
                }
                _ => json!({"type": "text", "text": content}),
            };
            json!({
                "id": format!("msg_{id}"), "type": "message", "role": "assistant", "model": model,
                "content": [block],
                "stop_reason": if *truncated { "max_tokens" } else { "tool_use" },
                "stop_sequence": null,
                "usage": usage_json(flavor, usage),
            })
        }
        Flavor::Gemini => json!({
            "candidates": [{"content": {"parts": [{"text": content}], "role": "model"},
                "finishReason": if *truncated { "MAX_TOKENS" } else { "STOP" }, "index": 0}],
            "usageMetadata": usage_json(flavor, usage),
            "modelVersion": model,
            "responseId": id,
        }),
    }
}

/// One line of a result file for `custom_id`.
pub fn result_line(
    flavor: Flavor,
    custom_id: &str,
    id: &str,
    model: &str,
    tool: &str,
    reply: &Reply,
) -> Value {
    match flavor {
        Flavor::OpenAi | Flavor::Azure => match reply {
            Reply::Answer { .. } => json!({
                "id": format!("batch_req_{id}"), "custom_id": custom_id,
                "response": {"status_code": 200, "request_id": format!("req_{id}"),
                    "body": answer_body(flavor, id, model, tool, reply)},
                "error": null
            }),
            Reply::Error => json!({
                "id": format!("batch_req_{id}"), "custom_id": custom_id,
                "response": {"status_code": 500, "request_id": format!("req_{id}"),
                    "body": {"error": {"message": "The server had an error while processing your request.", "type": "server_error", "param": null, "code": null}}},
                "error": null
            }),
            Reply::Expired => {
                json!({"id": format!("batch_req_{id}"), "custom_id": custom_id, "response": null,
                "error": {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."}})
            }
            Reply::Cancelled => {
                json!({"id": format!("batch_req_{id}"), "custom_id": custom_id, "response": null,
                "error": {"code": "batch_cancelled", "message": "This request was cancelled before it ran."}})
            }
        },
        Flavor::Anthropic => {
            let result = match reply {
                Reply::Answer { .. } => {
                    json!({"type": "succeeded", "message": answer_body(flavor, id, model, tool, reply)})
                }
                Reply::Error => json!({"type": "errored", "error": {"type": "error",
                    "error": {"type": "api_error", "message": "Internal server error"}, "request_id": format!("req_{id}")}}),
                Reply::Expired => json!({"type": "expired"}),
                Reply::Cancelled => json!({"type": "canceled"}),
            };
            json!({"custom_id": custom_id, "result": result})
        }
        Flavor::Gemini => match reply {
            Reply::Answer { .. } => {
                json!({"key": custom_id, "response": answer_body(flavor, id, model, tool, reply)})
            }
            Reply::Error => {
                json!({"key": custom_id, "error": {"code": 500, "message": "Internal error encountered.", "status": "INTERNAL"}})
            }
            Reply::Expired | Reply::Cancelled => {
                json!({"key": custom_id, "error": {"code": 499, "message": "The operation was cancelled.", "status": "CANCELLED"}})
            }
        },
    }
}

pub use crate::util::time::rfc3339_micros as rfc3339;
