//! The dispatch on provider kind: wherever the provider-neutral code (`batch`, `files`,
//! `run`, `http`) needs a provider's wire format, it comes here and is sent to that provider's
//! module (`openai`, `anthropic`, `gemini`, `bedrock`): reading a request and a batch's input
//! lines, answers and result lines, file and batch objects and their pages, error bodies
//! (docs/providers.md §1–§5, §7.1). The neutral request and reply are `types`' (re-exported
//! here: this module is public).

use serde_json::Value;

use super::data::{SimBatch, SimFile};
use super::types::SimError;
pub use super::types::{Neutral, ProviderKind, Reply, rfc3339};
use super::{anthropic, bedrock, gemini, openai};
use crate::cost::Usage;

/// Reads a request body of `flavor` (`model` overrides the body's, for Gemini and Bedrock
/// where the model is in the URL or the job). Prompt tokens are counted exactly as
/// nightshift's planner counts them for that provider: framing, system and user message, plus
/// the output-format JSON.
pub fn neutral(flavor: ProviderKind, body: &Value, model: Option<&str>) -> Neutral {
    match flavor {
        ProviderKind::OpenAi | ProviderKind::Azure => openai::neutral(body),
        ProviderKind::Anthropic => anthropic::neutral(body),
        ProviderKind::Gemini => gemini::neutral(body, model),
        ProviderKind::Bedrock => bedrock::neutral(body, model),
    }
}

/// The name of the field that carries a request's id in `flavor`'s input lines.
pub(super) fn id_field(flavor: ProviderKind) -> &'static str {
    match flavor {
        ProviderKind::Gemini => "key",
        ProviderKind::Bedrock => "recordId",
        ProviderKind::OpenAi | ProviderKind::Azure | ProviderKind::Anthropic => "custom_id",
    }
}

/// The custom_id and the request body of one line of a batch's input in `flavor`'s shape
/// (Anthropic's inline requests are kept as such lines).
pub(super) fn input_line(flavor: ProviderKind, v: &Value) -> (String, Value) {
    let body = match flavor {
        ProviderKind::Gemini => "request",
        ProviderKind::Anthropic => "params",
        ProviderKind::Bedrock => "modelInput",
        ProviderKind::OpenAi | ProviderKind::Azure => "body",
    };
    (
        v.get(id_field(flavor))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        v.get(body).cloned().unwrap_or(Value::Null),
    )
}

/// The synchronous response body of an answer to `body` (chat completion, message,
/// generateContent, Bedrock InvokeModel or Converse).
pub fn answer_body(
    flavor: ProviderKind,
    id: &str,
    model: &str,
    body: &Value,
    reply: &Reply,
) -> Value {
    let Reply::Answer {
        content,
        truncated,
        usage,
    } = reply
    else {
        return Value::Null;
    };
    match flavor {
        ProviderKind::OpenAi | ProviderKind::Azure => {
            openai::answer_body(id, model, content, *truncated, usage)
        }
        ProviderKind::Anthropic => anthropic::answer_body(
            id,
            model,
            &anthropic::tool(body),
            content,
            *truncated,
            usage,
        ),
        ProviderKind::Gemini => gemini::answer_body(id, model, content, *truncated, usage),
        ProviderKind::Bedrock => bedrock::answer_body(id, model, body, content, *truncated, usage),
    }
}

/// One line of a result file for `custom_id`, whose request was `body`.
pub fn result_line(
    flavor: ProviderKind,
    custom_id: &str,
    id: &str,
    model: &str,
    body: &Value,
    reply: &Reply,
) -> Value {
    match flavor {
        ProviderKind::OpenAi | ProviderKind::Azure => {
            openai::result_line(custom_id, id, model, reply)
        }
        ProviderKind::Anthropic => {
            anthropic::result_line(custom_id, id, model, &anthropic::tool(body), reply)
        }
        ProviderKind::Gemini => gemini::result_line(custom_id, id, model, reply),
        ProviderKind::Bedrock => bedrock::result_line(custom_id, id, model, body, reply),
    }
}

/// A result line as some of `flavor`'s results write it (`quirk`, a draw in [0, 1), picks
/// which): Bedrock writes a quarter of its error codes as strings (docs/providers.md §7.3 F18).
pub(super) fn with_quirks(flavor: ProviderKind, line: &mut Value, quirk: f64) {
    if flavor == ProviderKind::Bedrock && quirk < 0.25 {
        bedrock::error_code_as_string(line);
    }
}

/// A Bedrock job's manifest (`manifest.json.out`): record counts and the tokens answered.
pub(super) fn bedrock_manifest(total: usize, success: usize, error: usize, usage: &Usage) -> Value {
    bedrock::manifest(total, success, error, usage)
}

/// Whether `flavor` writes a result line for a request that never ran (expired or cancelled
/// before its turn): Bedrock leaves it out.
pub(super) fn writes_unrun_lines(flavor: ProviderKind) -> bool {
    flavor != ProviderKind::Bedrock
}

/// The body of an online request that failed on the server.
pub(super) fn server_error(flavor: ProviderKind) -> Value {
    match flavor {
        ProviderKind::Anthropic => anthropic::server_error(),
        ProviderKind::Bedrock => bedrock::server_error(),
        _ => openai::server_error(),
    }
}

/// What is wrong with input line `n` (`v`) of a batch of `flavor` for `endpoint`, beyond what
/// every provider checks (OpenAI and Azure: its method and its url; Bedrock: its modelInput).
pub(super) fn line_errors(
    flavor: ProviderKind,
    n: usize,
    v: &Value,
    endpoint: &str,
) -> Vec<(&'static str, String)> {
    match flavor {
        ProviderKind::OpenAi | ProviderKind::Azure => openai::line_errors(n, v, endpoint),
        ProviderKind::Bedrock => bedrock::line_errors(n, v),
        ProviderKind::Anthropic | ProviderKind::Gemini => Vec::new(),
    }
}

/// A batch's inline results (Gemini's inline batches): its result lines, each with its key
/// moved into `metadata`.
pub(super) fn inline_items(lines: &[String]) -> Vec<Value> {
    gemini::inline_items(lines)
}

/// A file object in `flavor`'s shape.
pub(super) fn file_json(flavor: ProviderKind, f: &SimFile) -> Value {
    match flavor {
        ProviderKind::Gemini => gemini::file_json(f),
        _ => openai::file_json(f),
    }
}

/// A page of file objects in `flavor`'s shape; `next` is the id of the page's last file when
/// more follow (Gemini's page token).
pub(super) fn file_list(
    flavor: ProviderKind,
    page: Vec<Value>,
    has_more: bool,
    next: Option<&str>,
) -> Value {
    if flavor == ProviderKind::Gemini {
        return gemini::file_list(page, next);
    }
    openai::file_list(page, has_more)
}

/// A batch's wire object, in its provider's shape; `base` is the simulator's root URL.
/// Rendering can change it (Gemini's lagging output reference counts down).
pub(super) fn batch_json(b: &mut SimBatch, base: &str) -> Value {
    match b.flavor {
        ProviderKind::OpenAi | ProviderKind::Azure => openai::batch_json(b),
        ProviderKind::Anthropic => anthropic::batch_json(b, base),
        ProviderKind::Gemini => gemini::batch_json(b),
        ProviderKind::Bedrock => bedrock::job_json(b),
    }
}

/// A page of batch objects in `flavor`'s shape, newest first.
pub(super) fn batch_list(
    flavor: ProviderKind,
    page: Vec<Value>,
    has_more: bool,
    first: Option<String>,
    last: Option<String>,
) -> Value {
    match flavor {
        ProviderKind::Gemini => gemini::batch_list(page, has_more, last),
        ProviderKind::Anthropic => anthropic::batch_list(page, has_more, first, last),
        ProviderKind::Bedrock => bedrock::job_list(page, has_more.then_some(last).flatten()),
        ProviderKind::OpenAi | ProviderKind::Azure => {
            openai::batch_list(page, has_more, first, last)
        }
    }
}

impl SimError {
    /// The error's body in `flavor`'s shape.
    pub(super) fn body(&self, flavor: ProviderKind) -> Value {
        match flavor {
            ProviderKind::Anthropic => anthropic::error_body(self),
            ProviderKind::Gemini => gemini::error_body(self),
            ProviderKind::Bedrock => bedrock::error_body(self),
            ProviderKind::OpenAi | ProviderKind::Azure => openai::error_body(self),
        }
    }

    /// The HTTP status `flavor` answers the error with (Bedrock's conflicts are 400s).
    pub(super) fn wire_status(&self, flavor: ProviderKind) -> u16 {
        match flavor {
            ProviderKind::Bedrock => bedrock::error_status(self),
            _ => self.status,
        }
    }

    /// The header naming the error, for the providers that name it in one (Bedrock's
    /// `x-amzn-ErrorType`).
    pub(super) fn wire_header(&self, flavor: ProviderKind) -> Option<(&'static str, String)> {
        match flavor {
            ProviderKind::Bedrock => Some(("x-amzn-errortype", bedrock::error_name(self).into())),
            _ => None,
        }
    }
}
