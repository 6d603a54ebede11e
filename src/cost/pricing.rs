//! Price tables.
//!
//! Two formats load into one [`PriceTable`]:
//! - our TOML (`config/pricing.toml`, compiled in as the default), USD per million tokens as
//!   decimal text;
//! - LiteLLM's `model_prices_and_context_window.json` as is, USD per token, using its
//!   explicit `*_batches` and cache fields.
//!
//! A model is priced per mode: `standard` (real-time) and `batch`. Prices that cannot be held
//! exactly (finer than a pico-dollar per token) are refused, not rounded.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;

use super::money::{DecimalText, MoneyError, TokenPrice, f64_price_text};

/// The default table, compiled in so a fresh install prices the common models.
pub const BUILTIN_PRICING_TOML: &str = include_str!("../../config/pricing.toml");

/// Which price list applies to an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PricingMode {
    Batch,
    Standard,
}

impl PricingMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PricingMode::Batch => "batch",
            PricingMode::Standard => "standard",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "batch" => Some(PricingMode::Batch),
            "standard" => Some(PricingMode::Standard),
            _ => None,
        }
    }
}

impl fmt::Display for PricingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Per-token prices of one mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Rates {
    pub input: TokenPrice,
    pub cached_input: TokenPrice,
    pub cache_write: TokenPrice,
    pub output: TokenPrice,
}

/// Prices of one model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelPrice {
    pub model: String,
    pub standard: Rates,
    pub batch: Option<Rates>,
}

impl ModelPrice {
    pub fn rates(&self, mode: PricingMode) -> Option<&Rates> {
        match mode {
            PricingMode::Standard => Some(&self.standard),
            PricingMode::Batch => self.batch.as_ref(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PricingError {
    #[error("cannot read pricing file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: model `{model}`, field `{field}`: {source}")]
    Price {
        path: String,
        model: String,
        field: String,
        source: MoneyError,
    },
}

/// A set of model prices, looked up by provider and model name.
#[derive(Clone, Debug, Default)]
pub struct PriceTable {
    models: BTreeMap<String, ModelPrice>,
    /// Models present in a LiteLLM file whose prices could not be held exactly.
    refused: BTreeMap<String, String>,
    sources: Vec<String>,
}

impl PriceTable {
    /// The compiled-in table (`config/pricing.toml`).
    pub fn builtin() -> Self {
        Self::from_toml_str(BUILTIN_PRICING_TOML, "built-in config/pricing.toml")
            .expect("the built-in pricing table is valid (checked by a test)")
    }

    /// The built-in table with `file` layered on top (its entries win).
    pub fn builtin_with(file: Option<&Path>) -> Result<Self, PricingError> {
        let mut table = Self::builtin();
        if let Some(path) = file {
            table.merge(Self::load(path)?);
        }
        Ok(table)
    }

    /// Loads a TOML table, or LiteLLM's JSON (by extension `.json` or a leading `{`).
    pub fn load(path: &Path) -> Result<Self, PricingError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PricingError::Read {
            path: display.clone(),
            source,
        })?;
        let looks_json =
            path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{');
        if looks_json {
            Self::from_litellm_str(&text, &display)
        } else {
            Self::from_toml_str(&text, &display)
        }
    }

    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, PricingError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[serde(default)]
            models: BTreeMap<String, Entry>,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Entry {
            #[serde(default)]
            #[allow(dead_code)]
            provider: Option<String>,
            standard: RawRates,
            batch: Option<RawRates>,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawRates {
            input: DecimalText,
            cached_input: Option<DecimalText>,
            cache_write: Option<DecimalText>,
            output: DecimalText,
        }
        let file: File = toml::from_str(text).map_err(|e| PricingError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        let mut table = PriceTable {
            sources: vec![origin.to_string()],
            ..Default::default()
        };
        for (model, entry) in file.models {
            let conv = |mode: &str, r: &RawRates| -> Result<Rates, PricingError> {
                let p = |field: &str, v: &DecimalText| {
                    TokenPrice::per_million(&v.0).map_err(|source| PricingError::Price {
                        path: origin.to_string(),
                        model: model.clone(),
                        field: format!("{mode}.{field}"),
                        source,
                    })
                };
                let input = p("input", &r.input)?;
                Ok(Rates {
                    input,
                    cached_input: match &r.cached_input {
                        Some(v) => p("cached_input", v)?,
                        None => input,
                    },
                    cache_write: match &r.cache_write {
                        Some(v) => p("cache_write", v)?,
                        None => input,
                    },
                    output: p("output", &r.output)?,
                })
            };
            let standard = conv("standard", &entry.standard)?;
            let batch = entry.batch.as_ref().map(|b| conv("batch", b)).transpose()?;
            table.models.insert(
                model.clone(),
                ModelPrice {
                    model,
                    standard,
                    batch,
                },
            );
        }
        Ok(table)
    }

    /// Reads LiteLLM's `model_prices_and_context_window.json`.
    ///
    /// Standard rates come from `input_cost_per_token`, `cache_read_input_token_cost`,
    /// `cache_creation_input_token_cost` and `output_cost_per_token`; batch rates from the
    /// `*_batches` variants. A model without `input_cost_per_token_batches` has no batch
    /// price (nightshift will not guess one). A batch cache-read price missing from the file
    /// falls back to the batch input price: the cache discount is assumed not to stack with
    /// the batch discount, which can only over-state the cost.
    pub fn from_litellm_str(text: &str, origin: &str) -> Result<Self, PricingError> {
        let root: serde_json::Value =
            serde_json::from_str(text).map_err(|e| PricingError::Parse {
                path: origin.to_string(),
                message: format!("not LiteLLM JSON: {e}"),
            })?;
        let obj = root.as_object().ok_or_else(|| PricingError::Parse {
            path: origin.to_string(),
            message: "expected a JSON object of models".into(),
        })?;
        let mut table = PriceTable {
            sources: vec![origin.to_string()],
            ..Default::default()
        };
        for (model, entry) in obj {
            let Some(e) = entry.as_object() else { continue };
            if model == "sample_spec" {
                continue;
            }
            let num = |k: &str| -> Option<Result<TokenPrice, (String, MoneyError)>> {
                let v = e.get(k)?;
                let text = match v {
                    serde_json::Value::Number(n) => match n.as_f64() {
                        Some(f) => f64_price_text(f),
                        None => n.to_string(),
                    },
                    serde_json::Value::String(s) => s.clone(),
                    _ => return None,
                };
                Some(TokenPrice::per_token(&text).map_err(|err| (k.to_string(), err)))
            };
            let (Some(input), Some(output)) =
                (num("input_cost_per_token"), num("output_cost_per_token"))
            else {
                continue;
            };
            let built = (|| -> Result<ModelPrice, (String, MoneyError)> {
                let input = input?;
                let output = output?;
                let cached = num("cache_read_input_token_cost").transpose()?;
                let write = num("cache_creation_input_token_cost").transpose()?;
                let standard = Rates {
                    input,
                    cached_input: cached.unwrap_or(input),
                    cache_write: write.unwrap_or(input),
                    output,
                };
                let batch = match num("input_cost_per_token_batches").transpose()? {
                    None => None,
                    Some(b_in) => {
                        let b_out = num("output_cost_per_token_batches")
                            .transpose()?
                            .unwrap_or(output);
                        let b_cached = num("cache_read_input_token_cost_batches")
                            .transpose()?
                            .unwrap_or(b_in);
                        let b_write = num("cache_creation_input_token_cost_batches")
                            .transpose()?
                            .unwrap_or(b_in);
                        Some(Rates {
                            input: b_in,
                            cached_input: b_cached,
                            cache_write: b_write,
                            output: b_out,
                        })
                    }
                };
                Ok(ModelPrice {
                    model: model.clone(),
                    standard,
                    batch,
                })
            })();
            match built {
                Ok(p) => {
                    table.models.insert(model.clone(), p);
                }
                Err((field, err)) => {
                    table
                        .refused
                        .insert(model.clone(), format!("field `{field}`: {err}"));
                }
            }
        }
        Ok(table)
    }

    /// Layers `other` on top of `self`: its models replace ours.
    pub fn merge(&mut self, other: PriceTable) {
        for (k, v) in other.models {
            self.refused.remove(&k);
            self.models.insert(k, v);
        }
        for (k, v) in other.refused {
            self.models.remove(&k);
            self.refused.insert(k, v);
        }
        self.sources.extend(other.sources);
    }

    /// Looks a model up as `provider/model`, then `model`, then `model` without a trailing
    /// `-YYYY-MM-DD` snapshot date.
    pub fn lookup(&self, provider: &str, model: &str) -> Result<&ModelPrice, LookupError> {
        let undated = strip_date_suffix(model);
        let candidates = [
            format!("{provider}/{model}"),
            model.to_string(),
            format!("{provider}/{undated}"),
            undated.to_string(),
        ];
        for c in &candidates {
            if let Some(p) = self.models.get(c) {
                return Ok(p);
            }
            if let Some(why) = self.refused.get(c) {
                return Err(LookupError::Refused {
                    model: c.clone(),
                    why: why.clone(),
                });
            }
        }
        Err(LookupError::Unknown {
            model: model.to_string(),
            sources: self.sources.join(", "),
        })
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum LookupError {
    #[error(
        "no price for model `{model}` in {sources}; add it to a pricing file (`[pricing] file` or `--pricing`)"
    )]
    Unknown { model: String, sources: String },
    #[error("the price of model `{model}` cannot be used: {why}")]
    Refused { model: String, why: String },
}

fn strip_date_suffix(model: &str) -> &str {
    // gpt-4o-mini-2024-07-18 → gpt-4o-mini
    let b = model.as_bytes();
    if b.len() > 11 {
        let tail = &b[b.len() - 11..];
        let ok = tail[0] == b'-'
            && tail[5] == b'-'
            && tail[8] == b'-'
            && tail[1..5].iter().all(u8::is_ascii_digit)
            && tail[6..8].iter().all(u8::is_ascii_digit)
            && tail[9..11].iter().all(u8::is_ascii_digit);
        if ok {
            return &model[..model.len() - 11];
        }
    }
    model
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_table_loads_and_prices_the_example_model() {
        let t = PriceTable::builtin();
        let p = t.lookup("openai", "gpt-5.4-mini").unwrap();
        assert_eq!(p.batch.unwrap().input.per_million_string(), "0.375");
        assert_eq!(p.standard.output.per_million_string(), "4.5");
        // a dated snapshot resolves to its family price
        assert!(t.lookup("openai", "gpt-5.4-mini-2026-03-17").is_ok());
        assert!(matches!(
            t.lookup("openai", "no-such-model"),
            Err(LookupError::Unknown { .. })
        ));
    }

    #[test]
    fn litellm_snapshot_loads_with_exact_batch_and_cache_prices() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/litellm_model_prices.json");
        let t = PriceTable::load(&path).unwrap();
        assert!(t.len() > 100);
        let p = t.lookup("openai", "gpt-5-mini").unwrap();
        let b = p.batch.unwrap();
        assert_eq!(b.input.pico_per_token(), 125_000); // 1.25e-07
        assert_eq!(b.cached_input.pico_per_token(), 12_500); // 1.25e-08
        assert_eq!(b.output.pico_per_token(), 1_000_000); // 1e-06
        assert_eq!(p.standard.cached_input.pico_per_token(), 25_000);
        // no explicit batch cache price: falls back to the batch input price
        let mini = t.lookup("openai", "gpt-4o-mini").unwrap();
        assert_eq!(mini.batch.unwrap().cached_input, mini.batch.unwrap().input);
        // Anthropic cache writes
        let s = t.lookup("anthropic", "claude-sonnet-4-5").unwrap();
        assert_eq!(s.batch.unwrap().cache_write.pico_per_token(), 1_875_000);
    }

    #[test]
    fn toml_prices_accept_numbers_and_refuse_sub_pico_prices() {
        let ok = PriceTable::from_toml_str(
            "[models.m]\nstandard = { input = 0.15, output = \"0.6\" }\n",
            "t.toml",
        )
        .unwrap();
        let m = ok.lookup("openai", "m").unwrap();
        assert_eq!(m.standard.input.pico_per_token(), 150_000);
        assert_eq!(m.standard.cached_input, m.standard.input);
        assert!(m.batch.is_none());
        let err = PriceTable::from_toml_str(
            "[models.m]\nstandard = { input = \"0.0000001\", output = \"1\" }\n",
            "t.toml",
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("t.toml") && msg.contains("standard.input"),
            "{msg}"
        );
    }

    #[test]
    fn date_suffixes_are_recognised() {
        assert_eq!(strip_date_suffix("gpt-4o-mini-2024-07-18"), "gpt-4o-mini");
        assert_eq!(strip_date_suffix("gpt-4o-mini"), "gpt-4o-mini");
        assert_eq!(strip_date_suffix("claude-x-20250929"), "claude-x-20250929");
    }
}
