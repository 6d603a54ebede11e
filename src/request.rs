//! Requests and their item keys: the fixed shape of a pipeline's requests, and each record's
//! rendered user message and dedupe key.
//!
//! An item is identified by sha256 over the canonical rendered request body (model, messages,
//! params, schema; sorted keys, no insignificant whitespace). Every request of a pipeline has
//! the same *shape* — everything but the user message is fixed — so the canonical body is
//! `prefix + user_json + suffix`, where `user_json` is the JSON string literal of the rendered
//! user message. The shape is serialised once; per record we render, escape and hash, with no
//! JSON tree built. Two records with the same key are the same item: one request, one answer.

use sha2::{Digest, Sha256};

use crate::cost::tokens::PromptCounter;
use crate::prompt::{RenderError, Template};

/// The fixed parts of a request body around the user message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestShape {
    prefix: String,
    suffix: String,
    /// sha256 of the shape itself (prefix, a separator, suffix), to store it once.
    pub sha256: [u8; 32],
    /// The dedupe key's hash with the prefix already in it: the prefix (the model, the
    /// system prompt, often a large part of every request body) is hashed once, not for
    /// every record.
    after_prefix: PrefixHash,
}

/// A hash state that follows from the shape's prefix, so it takes no part in comparisons.
#[derive(Clone)]
struct PrefixHash(Sha256);

impl PartialEq for PrefixHash {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for PrefixHash {}

impl std::fmt::Debug for PrefixHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrefixHash")
    }
}

/// The placeholder a provider puts where the user message goes when it serialises a shape.
pub const USER_SLOT: &str = "\u{1}nightshift-user-slot\u{1}";

impl RequestShape {
    /// Splits a canonical body serialised with [`USER_SLOT`] as the user message.
    pub fn from_canonical_with_slot(body: &str) -> Result<Self, String> {
        let slot = serde_json::to_string(USER_SLOT).expect("a string serialises");
        let mut parts = body.split(&slot);
        let (Some(prefix), Some(suffix), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err("the request body must contain the user message exactly once".into());
        };
        Ok(Self::new(prefix.to_string(), suffix.to_string()))
    }

    pub fn new(prefix: String, suffix: String) -> Self {
        let mut h = Sha256::new();
        h.update(prefix.as_bytes());
        h.update([0u8]);
        h.update(suffix.as_bytes());
        let after_prefix = PrefixHash(Sha256::new_with_prefix(prefix.as_bytes()));
        RequestShape {
            prefix,
            suffix,
            sha256: h.finalize().into(),
            after_prefix,
        }
    }

    /// The part of the body before the user message.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The part of the body after the user message.
    pub fn suffix(&self) -> &str {
        &self.suffix
    }

    /// The dedupe key of the request whose user message is `user_json`: sha256 of the
    /// whole body, `prefix + user_json + suffix`.
    pub fn key(&self, user_json: &str) -> [u8; 32] {
        let mut h = self.after_prefix.0.clone();
        h.update(user_json.as_bytes());
        h.update(self.suffix.as_bytes());
        h.finalize().into()
    }

    pub fn body_len(&self, user_json: &str) -> usize {
        self.prefix.len() + user_json.len() + self.suffix.len()
    }

    /// Appends one JSONL line to `out`: the provider's envelope `head` (its opening up to the
    /// body's key, with the custom id in it), the request body, `}` and a newline.
    pub fn write_line(&self, head: &[&[u8]], user_json: &str, out: &mut Vec<u8>) {
        for part in head {
            out.extend_from_slice(part);
        }
        out.extend_from_slice(self.prefix.as_bytes());
        out.extend_from_slice(user_json.as_bytes());
        out.extend_from_slice(self.suffix.as_bytes());
        out.extend_from_slice(b"}\n");
    }

    pub fn body(&self, user_json: &str) -> String {
        let mut s = String::with_capacity(self.body_len(user_json));
        s.push_str(&self.prefix);
        s.push_str(user_json);
        s.push_str(&self.suffix);
        s
    }
}

/// A record ready for the store: its item key and rendered user message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreparedRecord {
    pub line: u64,
    pub record_id: String,
    pub key: [u8; 32],
    /// Prompt tokens of the request (exact for OpenAI models).
    pub input_tokens: u64,
    /// The user message as a JSON string literal (quoted and escaped).
    pub user_json: String,
    pub body_bytes: usize,
    /// The record's fields (JSON) a multi-stage pipeline keeps for its later stages (those
    /// they read), or a pipeline for its results file (the whole record).
    pub data: Option<String>,
    /// The record's other items in the first stage (its chunks after the first), in order.
    pub more: Vec<PreparedItem>,
}

/// One more item of a record: a chunk, or an item of a later stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreparedItem {
    pub key: [u8; 32],
    pub input_tokens: u64,
    pub user_json: String,
    pub body_bytes: usize,
}

impl PreparedItem {
    /// Renders `context` with `template` into an item of `shape`.
    pub fn render(
        shape: &RequestShape,
        template: &Template,
        counter: Option<&PromptCounter>,
        context: &serde_json::Value,
        scratch: &mut String,
    ) -> Result<PreparedItem, RenderError> {
        scratch.clear();
        template.render_into(context, scratch)?;
        let user_json = json_string(scratch);
        Ok(PreparedItem {
            input_tokens: counter.map(|c| c.count(scratch)).unwrap_or(0),
            key: shape.key(&user_json),
            body_bytes: shape.body_len(&user_json),
            user_json,
        })
    }
}

impl From<PreparedRecord> for PreparedItem {
    fn from(r: PreparedRecord) -> Self {
        PreparedItem {
            key: r.key,
            input_tokens: r.input_tokens,
            user_json: r.user_json,
            body_bytes: r.body_bytes,
        }
    }
}

/// `text` as a JSON string literal, in a buffer about its own size: a record's prompt is held
/// until the store has written it (thousands at a time), and the doubling growth of
/// `serde_json::to_string` left up to half of each buffer unused.
fn json_string(text: &str) -> String {
    let mut out = Vec::with_capacity(text.len() + text.len() / 16 + 8);
    serde_json::to_writer(&mut out, text).expect("a string serialises");
    String::from_utf8(out).expect("JSON text is UTF-8")
}

/// Renders a record's user message and computes its item key.
pub fn prepare(
    shape: &RequestShape,
    template: &Template,
    counter: Option<&PromptCounter>,
    line: u64,
    record_id: String,
    record: &serde_json::Value,
    scratch: &mut String,
) -> Result<PreparedRecord, RenderError> {
    scratch.clear();
    template.render_into(record, scratch)?;
    let user_json = json_string(scratch);
    Ok(PreparedRecord {
        line,
        record_id,
        input_tokens: counter.map(|c| c.count(scratch)).unwrap_or(0),
        key: shape.key(&user_json),
        body_bytes: shape.body_len(&user_json),
        user_json,
        data: None,
        more: Vec::new(),
    })
}

/// Lower-case hex of a key.
pub fn hex_key(key: &[u8]) -> String {
    hex::encode(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn shape() -> RequestShape {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": USER_SLOT}], "temperature": 0.0});
        RequestShape::from_canonical_with_slot(&body.to_string()).unwrap()
    }

    #[test]
    fn the_key_is_the_hash_of_the_canonical_body() {
        let s = shape();
        let t = Template::parse("Hello {{name}}").unwrap();
        let mut scratch = String::new();
        let r = prepare(
            &s,
            &t,
            None,
            1,
            "a".into(),
            &json!({"name": "Ann \"A\""}),
            &mut scratch,
        )
        .unwrap();
        let full = json!({"model": "m", "messages": [{"role": "user", "content": "Hello Ann \"A\""}], "temperature": 0.0});
        let canonical = full.to_string();
        assert_eq!(s.body(&r.user_json), canonical);
        let expect: [u8; 32] = Sha256::digest(canonical.as_bytes()).into();
        assert_eq!(r.key, expect);
        assert_eq!(r.body_bytes, canonical.len());
    }

    #[test]
    fn same_rendering_same_key_whatever_the_other_fields() {
        let s = shape();
        let t = Template::parse("{{title}}").unwrap();
        let mut sc = String::new();
        let a = prepare(
            &s,
            &t,
            None,
            1,
            "sku-1".into(),
            &json!({"sku": "1", "title": "Lamp"}),
            &mut sc,
        )
        .unwrap();
        let b = prepare(
            &s,
            &t,
            None,
            2,
            "sku-2".into(),
            &json!({"sku": "2", "title": "Lamp"}),
            &mut sc,
        )
        .unwrap();
        let c = prepare(
            &s,
            &t,
            None,
            3,
            "sku-3".into(),
            &json!({"sku": "3", "title": "Lamp!"}),
            &mut sc,
        )
        .unwrap();
        assert_eq!(a.key, b.key);
        assert_ne!(a.key, c.key);
    }

    #[test]
    fn a_shape_needs_exactly_one_slot() {
        assert!(RequestShape::from_canonical_with_slot("{\"a\":1}").is_err());
    }

    /// The item keys of the example pipelines over their data, as the hand-written engine
    /// computed them: a change of the template engine must not change one byte of a rendered
    /// request, or every user would send (and pay for) everything again.
    #[test]
    fn the_example_pipelines_keep_their_item_keys() {
        use crate::source::{SourceEvent, SourceReader};
        // (file, records rendered, records quarantined, sha256 over "line key" lines)
        let golden = [
            (
                "catalog-enrichment.toml",
                306,
                0,
                "2a5796758e80ec68ae10d027969594c33d53d02d313196c883ea8531c91453e5",
            ),
            // Its first stage asks for a confidence now (another schema and system prompt):
            // new requests, new keys, on purpose.
            (
                "ticket-tagging.toml",
                208,
                0,
                "d6b0384c1c1d87a4a203a9515ff05e0cf0c65a43c161a71c2d98c6aede5f02a2",
            ),
            (
                "online.toml",
                208,
                0,
                "f93284e60f32fef62ee4fdd976b40c83bc58cc117e7ac941a310cf449fc5bd82",
            ),
            (
                "anthropic.toml",
                306,
                0,
                "15d6dbe70429b981fa8b06ddad69184a4ee5e5b1ee3e59e8400c9c64e8236bec",
            ),
            (
                "gemini.toml",
                306,
                0,
                "424dfd5b0f073ffaea7a0d7ba9d71d4196e43e53dc196b207704b31226619fdc",
            ),
            (
                "azure.toml",
                208,
                0,
                "f462eee38bdec3b1f6abe177972315c19a599b8271d2dda2278b917d802bb435",
            ),
        ];
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples");
        let mut report = Vec::new();
        for (file, _, _, _) in golden {
            let p = crate::config::Pipeline::load(&dir.join(file)).unwrap();
            let first = p.first_stage();
            let validator = crate::validate::OutputValidator::load(&first.schema).unwrap();
            let name = crate::worker::stage_schema_name(&p, first);
            let spec = crate::worker::spec(first, validator.schema(), &name);
            let shape = crate::provider::Codec::for_config(&p.provider)
                .request_shape(&spec)
                .unwrap();
            let (mut rendered, mut quarantined) = (0, 0);
            let mut h = Sha256::new();
            let mut scratch = String::new();
            for ev in SourceReader::open(&p.source).unwrap() {
                let SourceEvent::Record(r) = ev.unwrap() else {
                    continue;
                };
                match prepare(
                    &shape,
                    &first.prompt.user,
                    None,
                    r.line,
                    r.id,
                    &r.value,
                    &mut scratch,
                ) {
                    Ok(rec) => {
                        rendered += 1;
                        h.update(format!("{} {}\n", r.line, hex_key(&rec.key)));
                    }
                    Err(e) => {
                        quarantined += 1;
                        h.update(format!("{} {e}\n", r.line));
                    }
                }
            }
            report.push((file, rendered, quarantined, hex::encode(h.finalize())));
        }
        let expected: Vec<_> = golden
            .iter()
            .map(|&(f, r, q, d)| (f, r, q, d.to_string()))
            .collect();
        assert_eq!(report, expected);
    }
}
