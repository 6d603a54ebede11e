//! The simulator's bill and record (docs/providers.md §7.1): one entry per answer, priced
//! exactly at the batch or standard rate, summed per provider batch, and the record of
//! everything accepted and billed that `GET /_sim/record` returns (with the S3 objects that
//! exist and who wrote each).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::Sim;
use super::data::{OBJECT_PUT, split_s3_uri};
use super::types::ProviderKind;
use crate::cost::{PricingMode, Usage, Usd};

#[derive(Clone, Debug, Serialize)]
pub struct BillEntry {
    pub custom_id: String,
    pub batch_id: String,
    pub model: String,
    pub pricing_mode: &'static str,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    /// Exact decimal dollars.
    pub cost_usd: String,
    /// `cost_usd` as an amount.
    #[serde(skip)]
    pub cost: Usd,
}

/// A bill entry as the journal holds it.
#[derive(Deserialize)]
struct BillRow {
    custom_id: String,
    batch_id: String,
    model: String,
    pricing_mode: String,
    input_tokens: u64,
    cached_input_tokens: u64,
    cache_write_tokens: u64,
    output_tokens: u64,
    reasoning_tokens: u64,
    cost_usd: String,
}

impl<'de> Deserialize<'de> for BillEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let r = BillRow::deserialize(d)?;
        let mode = PricingMode::parse(&r.pricing_mode).ok_or_else(|| {
            D::Error::custom(format!("unknown pricing mode {:?}", r.pricing_mode))
        })?;
        let cost = Usd::parse(&r.cost_usd).map_err(D::Error::custom)?;
        Ok(BillEntry {
            custom_id: r.custom_id,
            batch_id: r.batch_id,
            model: r.model,
            pricing_mode: mode.as_str(),
            input_tokens: r.input_tokens,
            cached_input_tokens: r.cached_input_tokens,
            cache_write_tokens: r.cache_write_tokens,
            output_tokens: r.output_tokens,
            reasoning_tokens: r.reasoning_tokens,
            cost_usd: r.cost_usd,
            cost,
        })
    }
}

impl Sim {
    /// Prices one answer and adds it to the bill.
    pub(super) fn bill(
        &self,
        flavor: ProviderKind,
        mode: PricingMode,
        custom_id: &str,
        batch_id: &str,
        model: &str,
        u: &Usage,
    ) -> BillEntry {
        let cost = self
            .prices
            .lookup(flavor.as_str(), model)
            .ok()
            .and_then(|p| p.rates(mode).copied())
            .map(|r| r.cost(u))
            .unwrap_or(Usd::ZERO);
        BillEntry {
            custom_id: custom_id.to_string(),
            batch_id: batch_id.to_string(),
            model: model.to_string(),
            pricing_mode: mode.as_str(),
            input_tokens: u.input_tokens,
            cached_input_tokens: u.cached_input_tokens,
            cache_write_tokens: u.cache_write_tokens,
            output_tokens: u.output_tokens,
            reasoning_tokens: u.reasoning_tokens,
            cost_usd: cost.to_decimal_string(),
            cost,
        }
    }

    /// The bill per provider batch: (batch id, billed requests, tokens, cost).
    pub fn batch_bills(&self) -> Vec<(String, u64, Usage, Usd)> {
        let inner = self.lock();
        let mut by: BTreeMap<String, (u64, Usage, Usd)> = BTreeMap::new();
        for e in &inner.bill {
            let slot = by.entry(e.batch_id.clone()).or_default();
            slot.0 += 1;
            slot.1.add(&Usage {
                input_tokens: e.input_tokens,
                cached_input_tokens: e.cached_input_tokens,
                cache_write_tokens: e.cache_write_tokens,
                output_tokens: e.output_tokens,
                reasoning_tokens: e.reasoning_tokens,
            });
            slot.2 += e.cost;
        }
        by.into_iter().map(|(k, (n, u, c))| (k, n, u, c)).collect()
    }

    /// The record of everything accepted and billed.
    pub fn record(&self) -> Value {
        let mut inner = self.lock();
        for i in 0..inner.batches.len() {
            self.advance(&mut inner, i);
        }
        let batches: Vec<Value> = inner
            .batches
            .iter()
            .map(|b| {
                json!({
                    "id": b.id,
                    "flavor": b.flavor,
                    "status": b.status.as_str(),
                    "local_id": b.local_id(),
                    "model": b.model,
                    "requests": b.requests,
                    "deleted": b.deleted,
                })
            })
            .collect();
        let mut per_model: BTreeMap<(String, &str), (Usage, Usd, u64)> = BTreeMap::new();
        let mut total = (Usage::default(), Usd::ZERO);
        for e in &inner.bill {
            let u = Usage {
                input_tokens: e.input_tokens,
                cached_input_tokens: e.cached_input_tokens,
                cache_write_tokens: e.cache_write_tokens,
                output_tokens: e.output_tokens,
                reasoning_tokens: e.reasoning_tokens,
            };
            let slot = per_model
                .entry((e.model.clone(), e.pricing_mode))
                .or_insert((Usage::default(), Usd::ZERO, 0));
            slot.0.add(&u);
            slot.1 += e.cost;
            slot.2 += 1;
            total.0.add(&u);
            total.1 += e.cost;
        }
        let usage_json = |u: &Usage| {
            json!({
                "input_tokens": u.input_tokens, "cached_input_tokens": u.cached_input_tokens,
                "cache_write_tokens": u.cache_write_tokens, "output_tokens": u.output_tokens,
                "reasoning_tokens": u.reasoning_tokens
            })
        };
        let models: Vec<Value> = per_model
            .iter()
            .map(|((m, mode), (u, c, n))| {
                json!({"model": m, "pricing_mode": mode, "requests": n, "tokens": usage_json(u), "cost_usd": c.to_decimal_string()})
            })
            .collect();
        // Every S3 object there is now, in URI order, and who wrote it: a client (PutObject)
        // or the simulator (a Bedrock job's output).
        let objects: Vec<Value> = inner
            .files
            .values()
            .filter(|f| f.is_object())
            .map(|f| {
                let bucket = split_s3_uri(&f.id).map(|(b, _)| b).unwrap_or_default();
                let by = if f.purpose == OBJECT_PUT { "client" } else { "simulator" };
                json!({"uri": f.id, "bucket": bucket, "key": f.filename, "bytes": f.bytes, "written_by": by})
            })
            .collect();
        // Every file there is now (uploads, inline inputs, result files; S3 objects are
        // above), in id order: what a clean-up is checked against.
        let files: Vec<Value> = inner
            .files
            .values()
            .filter(|f| !f.is_object())
            .map(|f| json!({"id": f.id, "filename": f.filename, "purpose": f.purpose, "bytes": f.bytes}))
            .collect();
        json!({
            "batches": batches,
            "files": files,
            "s3_objects": objects,
            "online": inner.online,
            "refused": inner.refused,
            "uploads": inner.uploads,
            "bill": {
                "per_custom_id": inner.bill,
                "per_model": models,
                "totals": {"requests": inner.bill.len(), "tokens": usage_json(&total.0), "cost_usd": total.1.to_decimal_string()},
            }
        })
    }
}
