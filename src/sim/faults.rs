//! The simulator's draws (docs/providers.md §7.2, §7.3): the uniform draw from the seed, the
//! key a request's faults are drawn on (its body and how often this state answered it),
//! batch expiry, one request's answer with its failure, invalid-answer and cache draws, and
//! the calls refused by an HTTP fault.

use std::collections::HashMap;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::data::Outcome;
use super::journal::Put;
use super::settings::SimSettings;
use super::state::Inner;
use super::types::{Neutral, ProviderKind, Reply};
use super::{Sim, answer};
use crate::cost::Usage;
use crate::util::time::now_ms;

/// A uniform draw in [0, 1) from the seed, a salt and a key.
pub fn draw(seed: u64, salt: &str, key: &str) -> f64 {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(salt.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    let d = h.finalize();
    let n = u64::from_le_bytes(d[..8].try_into().expect("8 bytes"));
    (n >> 11) as f64 / (1u64 << 53) as f64
}

impl Inner {
    /// The key a request with this body draws its faults on: the body's hash and how many
    /// requests with the same body this state answered before it, so the first answer to a
    /// body draws the same in every fresh state and a resend of it draws afresh. Counts it.
    pub(super) fn draw_key(&mut self, body_sha256: &[u8; 32]) -> String {
        let n = self.answered.entry(*body_sha256).or_insert(0);
        let key = format!("{}#{n}", hex::encode(body_sha256));
        *n += 1;
        key
    }

    /// Rebuilds `answered` from what the state recorded (after a replay): every batch request
    /// that ran (answered, failed, malformed or left out of the results) and every online
    /// request.
    pub(super) fn count_answered(&mut self) {
        let mut answered: HashMap<[u8; 32], u64> = HashMap::new();
        let mut count = |hash: &str| {
            let mut h = [0u8; 32];
            if hex::decode_to_slice(hash, &mut h).is_ok() {
                *answered.entry(h).or_insert(0) += 1;
            }
        };
        for r in self.batches.iter().flat_map(|b| &b.requests) {
            if r.outcome.answered() {
                count(&r.body_sha256);
            }
        }
        for e in &self.online {
            if let Some(h) = e.get("body_sha256").and_then(Value::as_str) {
                count(h);
            }
        }
        self.answered = answered;
    }
}

impl Sim {
    /// Whether the next batch created expires: the first `expire_first` batches this state
    /// ever created, and a draw on its creation number (never on its id, which is not the
    /// same from one run to the next).
    pub(super) fn will_expire(&self, ordinal: u64, flavor: ProviderKind) -> bool {
        // Azure batches are not expired (current docs): they run until cancelled.
        flavor != ProviderKind::Azure
            && (ordinal < u64::from(self.settings.expire_first)
                || draw(self.settings.seed, "expire", &ordinal.to_string())
                    < self.settings.expire_rate)
    }

    /// Answers one request: the reply and its outcome. Its faults are drawn on `key`
    /// (`Inner::draw_key`), its answer is generated from the body (its SHA-256, `body_hash`);
    /// a body holding `fail_when_contains` always gets an error line.
    pub(super) fn answer(
        &self,
        s: &SimSettings,
        flavor: ProviderKind,
        key: &str,
        body_hash: &[u8; 32],
        body: &Value,
        n: &Neutral,
    ) -> (Reply, Outcome) {
        if draw(s.seed, "fail", key) < s.fail_rate
            || s.fail_when_contains
                .as_deref()
                .is_some_and(|text| !text.is_empty() && mentions(body, text))
        {
            return (Reply::Error, Outcome::Error);
        }
        // The first answer to a body is generated from the body alone (the same in every
        // fresh state); a resend (a retry, a regeneration after a failed review) gets another
        // answer, as a model sampling at temperature > 0 would.
        let seed = if key.ends_with("#0") {
            u64::from_le_bytes(body_hash[..8].try_into().expect("8"))
        } else {
            let d = Sha256::digest(key.as_bytes());
            u64::from_le_bytes(d[..8].try_into().expect("8"))
        };
        let mut rng = answer::Rng::new(seed);
        let value = answer::generate(&n.schema, &n.schema, &mut rng);
        let mut content = value.to_string();
        let invalid = draw(s.seed, "invalid", key) < s.invalid_json_rate;
        if invalid {
            content = if draw(s.seed, "invalid-kind", key) < 0.5 {
                // cut mid-way: not JSON at all
                content[..content.len() / 2].to_string()
            } else {
                // JSON, but the wrong shape for the schema
                json!({"unexpected": "shape"}).to_string()
            };
        }
        let tok = n.tokenizer;
        let max_tokens = n.max_tokens;
        let mut visible = tok.count(&content);
        let reasoning = if s.answer_at_max_tokens {
            max_tokens.saturating_sub(visible)
        } else if is_reasoning_model(&n.model) {
            16 + (u64::from(body_hash[9]) % 48)
        } else {
            0
        };
        let mut truncated = false;
        if reasoning + visible > max_tokens {
            let room = max_tokens.saturating_sub(reasoning);
            content = tok.truncate(&content, room);
            visible = tok.count(&content);
            truncated = true;
        }
        let reasoning = reasoning.min(max_tokens);
        let prompt = n.prompt_tokens;
        let (cached, written) = if draw(s.seed, "cache", key) < s.cache_rate {
            (prompt / 2, 0)
        } else if flavor == ProviderKind::Anthropic
            && draw(s.seed, "cache-write", key) < s.cache_rate
        {
            (0, prompt / 2)
        } else {
            (0, 0)
        };
        let usage = Usage {
            input_tokens: prompt,
            cached_input_tokens: cached,
            cache_write_tokens: written,
            output_tokens: visible + reasoning,
            reasoning_tokens: reasoning,
        };
        let outcome = if invalid {
            Outcome::InvalidJson
        } else {
            Outcome::Ok
        };
        (
            Reply::Answer {
                content,
                truncated,
                usage,
            },
            outcome,
        )
    }

    /// Notes a call refused by an HTTP fault (the client's request id, if it sent one).
    pub(crate) fn note_refused(&self, request_id: &str, status: u16) {
        if request_id.is_empty() {
            return;
        }
        let mut inner = self.lock();
        let entry = json!({"custom_id": request_id, "at_ms": now_ms(), "status": status});
        let seq = inner.seq;
        inner.log.write(seq, &[Put::Refused(&entry)]);
        inner.refused.push(entry);
    }
}

/// Whether any string in `v` (keys excluded) contains `text`.
fn mentions(v: &Value, text: &str) -> bool {
    match v {
        Value::String(s) => s.contains(text),
        Value::Array(a) => a.iter().any(|x| mentions(x, text)),
        Value::Object(m) => m.values().any(|x| mentions(x, text)),
        _ => false,
    }
}

pub(super) fn is_reasoning_model(model: &str) -> bool {
    let m = model.to_ascii_lowercase();
    m.starts_with("gpt-5")
        || m.starts_with("gpt-6")
        || (m.starts_with('o') && m[1..].starts_with(|c: char| c.is_ascii_digit()))
}
