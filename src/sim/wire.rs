//! The providers' wire formats, as the simulator speaks them: the dispatch to each provider's
//! module (`openai`, `anthropic`, `gemini`) that reads a request in its provider's shape and
//! writes answers and result lines back in it (docs/providers.md §1–§4, §7.1). The neutral
//! request and reply are `types`' (re-exported here).

use serde_json::Value;

pub use super::types::{Flavor, Neutral, Reply, rfc3339};
use super::{anthropic, gemini, openai};

/// Reads a request body of `flavor` (`model` overrides the body's, for Gemini where the model
/// is in the URL). Prompt tokens are counted exactly as nightshift's planner counts them for
/// that provider: framing, system and user message, plus the output-format JSON.
pub fn neutral(flavor: Flavor, body: &Value, model: Option<&str>) -> Neutral {
    match flavor {
        Flavor::OpenAi | Flavor::Azure => openai::neutral(body),
        Flavor::Anthropic => anthropic::neutral(body),
        Flavor::Gemini => gemini::neutral(body, model),
    }
}

/// The custom_id and the request body of one line of a batch's input in `flavor`'s shape
/// (Anthropic's inline requests are kept as such lines).
pub(super) fn input_line(flavor: Flavor, v: &Value) -> (String, Value) {
    let (id, body) = match flavor {
        Flavor::Gemini => ("key", "request"),
        Flavor::Anthropic => ("custom_id", "params"),
        Flavor::OpenAi | Flavor::Azure => ("custom_id", "body"),
    };
    (
        v.get(id).and_then(Value::as_str).unwrap_or("").to_string(),
        v.get(body).cloned().unwrap_or(Value::Null),
    )
}

/// The tool name nightshift's Anthropic requests force (read back from the request).
pub fn anthropic_tool(body: &Value) -> String {
    anthropic::tool(body)
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
        Flavor::OpenAi | Flavor::Azure => {
            openai::answer_body(id, model, content, *truncated, usage)
        }
        Flavor::Anthropic => anthropic::answer_body(id, model, tool, content, *truncated, usage),
        Flavor::Gemini => gemini::answer_body(id, model, content, *truncated, usage),
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
        Flavor::OpenAi | Flavor::Azure => openai::result_line(custom_id, id, model, reply),
        Flavor::Anthropic => anthropic::result_line(custom_id, id, model, tool, reply),
        Flavor::Gemini => gemini::result_line(custom_id, id, model, reply),
    }
}

/// The body of an online request that failed on the server.
pub(super) fn server_error(flavor: Flavor) -> Value {
    match flavor {
        Flavor::Anthropic => anthropic::server_error(),
        _ => openai::server_error(),
    }
}
