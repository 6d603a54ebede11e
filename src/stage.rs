//! A stage's work for one record, the same wherever it is computed (the runner, `plan`):
//! which records a sampled stage runs for ([`in_sample`]), and the items a stage renders
//! for a record ([`Renderer`]): one, or one per chunk of its split field, each with its
//! key and counted prompt tokens. Pure: no store, no provider.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::config::{ForEach, Stage};
use crate::cost::tokens::{PromptCounter, Tokenizer};
use crate::request::{PreparedItem, RequestShape};

/// Renders one stage's items for a record: one, or one per chunk of its split field.
#[derive(Clone)]
pub struct Renderer {
    stage: Stage,
    shape: RequestShape,
    counter: PromptCounter,
    tokenizer: Tokenizer,
}

impl Renderer {
    /// The renderer of `stage`'s requests of `shape`, counted by `counter`; `tokenizer` cuts
    /// a chunk stage's text (the stage model's).
    pub fn new(
        stage: Stage,
        shape: RequestShape,
        counter: PromptCounter,
        tokenizer: Tokenizer,
    ) -> Self {
        Renderer {
            stage,
            shape,
            counter,
            tokenizer,
        }
    }

    pub fn stage(&self) -> &Stage {
        &self.stage
    }

    /// `context` is the record's fields plus the results of the needed stages.
    pub fn render(
        &self,
        context: &Value,
        scratch: &mut String,
    ) -> Result<Vec<PreparedItem>, RenderFailure> {
        let template = &self.stage.prompt.user;
        match &self.stage.for_each {
            ForEach::Record => {
                PreparedItem::render(&self.shape, template, Some(&self.counter), context, scratch)
                    .map(|it| vec![it])
                    .map_err(|e| RenderFailure {
                        field: e.field().map(str::to_string),
                        reason: e.to_string(),
                    })
            }
            ForEach::Chunk(split) => {
                let text = match context.get(&split.field) {
                    Some(Value::String(s)) => s.as_str(),
                    Some(Value::Null) | None => "",
                    Some(_) => {
                        return Err(RenderFailure {
                            field: Some(split.field.clone()),
                            reason: format!(
                                "field `{}` is not text: nothing to split",
                                split.field
                            ),
                        });
                    }
                };
                let chunks = crate::split::split(
                    text,
                    crate::split::SplitSpec {
                        max_tokens: split.max_tokens,
                        overlap_tokens: split.overlap_tokens,
                    },
                    &self.tokenizer,
                );
                if chunks.is_empty() {
                    return Err(RenderFailure {
                        field: Some(split.field.clone()),
                        reason: format!(
                            "field `{}` is empty or missing: nothing to split",
                            split.field
                        ),
                    });
                }
                let count = chunks.len();
                let mut ctx = match context {
                    Value::Object(m) => m.clone(),
                    _ => Map::new(),
                };
                let mut items = Vec::with_capacity(count);
                for (index, text) in chunks.into_iter().enumerate() {
                    ctx.insert(
                        crate::config::CHUNK_VAR.into(),
                        serde_json::json!({"index": index, "count": count, "text": text}),
                    );
                    let v = Value::Object(std::mem::take(&mut ctx));
                    let r = PreparedItem::render(
                        &self.shape,
                        template,
                        Some(&self.counter),
                        &v,
                        scratch,
                    );
                    if let Value::Object(m) = v {
                        ctx = m;
                    }
                    items.push(r.map_err(|e| RenderFailure {
                        field: e.field().map(str::to_string),
                        reason: format!("chunk {} of {count}: {e}", index + 1),
                    })?);
                }
                Ok(items)
            }
        }
    }
}

/// Why a record's items could not be rendered.
#[derive(Clone, Debug)]
pub struct RenderFailure {
    pub field: Option<String>,
    pub reason: String,
}

/// Whether `record_id` falls in a stage's `share` of records: the first 8 bytes of
/// sha256(stage, NUL, id) as a fraction of 2^64, below the share.
pub fn in_sample(stage: &str, record_id: &str, share: rust_decimal::Decimal) -> bool {
    let mut h = Sha256::new();
    h.update(stage.as_bytes());
    h.update([0u8]);
    h.update(record_id.as_bytes());
    let d: [u8; 32] = h.finalize().into();
    let x = u64::from_be_bytes(d[..8].try_into().expect("8 bytes"));
    // x / 2^64 < share  ⇔  x < share · 2^64, in exact decimal arithmetic on the top 32 bits.
    let top = rust_decimal::Decimal::from(x >> 32);
    top < share * rust_decimal::Decimal::from(1u64 << 32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::Decimal;

    #[test]
    fn the_sample_is_a_stable_share_of_the_records() {
        let share = Decimal::new(5, 2);
        let picked: Vec<String> = (0..10_000)
            .map(|i| format!("sku-{i}"))
            .filter(|id| in_sample("review", id, share))
            .collect();
        // 5 % of 10,000, within a few standard deviations (σ ≈ 22).
        assert!((400..=600).contains(&picked.len()), "{}", picked.len());
        // The same ids every time, and another stage samples other records.
        let again: Vec<String> = (0..10_000)
            .map(|i| format!("sku-{i}"))
            .filter(|id| in_sample("review", id, share))
            .collect();
        assert_eq!(picked, again);
        let other = (0..10_000)
            .map(|i| format!("sku-{i}"))
            .filter(|id| in_sample("audit", id, share))
            .filter(|id| picked.contains(id))
            .count();
        assert!(other < 100, "{other}");
        assert!(in_sample("review", "x", Decimal::ONE));
    }
}
