//! The simulator's neutral vocabulary, below every other part of it: which provider a batch or
//! request speaks (`ProviderKind`, the pipeline's own), the neutral form a request is read into (`Neutral`) and the
//! neutral reply it gets (`Reply`), the error the simulator answers with (`SimError`) and an
//! online request's reply, and the small readers the provider modules share.

use serde_json::{Value, json};

use crate::cost::Usage;
use crate::cost::tokens::Tokenizer;

/// Which provider's wire format a batch or request speaks: the pipeline's own provider kind.
pub use crate::provider::config::ProviderKind;

/// A request in neutral form: what the answer generator and the token count need.
#[derive(Clone, Debug)]
pub struct Neutral {
    pub model: String,
    pub prompt_tokens: u64,
    pub schema: Value,
    pub max_tokens: u64,
    pub tokenizer: Tokenizer,
}

pub(super) fn str_at<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

pub(super) fn default_schema() -> Value {
    json!({"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]})
}

/// A unix time in RFC 3339, as the providers write times.
pub use crate::util::time::rfc3339_micros as rfc3339;

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

/// An error the simulator answers with: HTTP status, `type`, `code`, message.
#[derive(Debug)]
pub struct SimError {
    pub status: u16,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub message: String,
}

impl SimError {
    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        SimError {
            status: 400,
            kind: "invalid_request_error",
            code: None,
            message: message.into(),
        }
    }
    pub(super) fn unsaved(why: &str) -> Self {
        SimError {
            status: 500,
            kind: "server_error",
            code: None,
            message: why.to_string(),
        }
    }
    pub(super) fn not_found(what: &str, id: &str) -> Self {
        SimError {
            status: 404,
            kind: "not_found_error",
            code: None,
            message: format!("No {what} found with id '{id}'."),
        }
    }
}

/// What an online request got: HTTP status, body, and whether the answer was valid.
pub struct OnlineReply {
    pub status: u16,
    pub body: Value,
}
