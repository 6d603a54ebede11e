//! Price tables.
//!
//! Two formats load into one [`PriceTable`]:
//! - our TOML (`config/pricing.toml`, compiled in as the default), USD per million tokens as
//!   decimal text;
//! - LiteLLM's `model_prices_and_context_window.json` as is, USD per token, using its
//!   explicit `*_batches` and cache fields, with Amazon Bedrock's region-specific entries kept
//!   apart as a last resort (see [`PriceTable::from_litellm_str`]).
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
    /// Bedrock models LiteLLM prices only per region, as `bedrock/<model id>`: consulted only
    /// when neither `models` nor `refused` has any candidate name.
    regional: BTreeMap<String, ModelPrice>,
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
    ///
    /// Amazon Bedrock: entries whose `litellm_provider` is `bedrock` or `bedrock_converse` are
    /// Bedrock's. A pipeline names a Bedrock model by the id it sends (`amazon.nova-lite-v1:0`,
    /// or an inference profile such as `us.amazon.nova-lite-v1:0`); those are LiteLLM's keys
    /// without a region and are kept as they are. A `bedrock/<model id>` key has no region
    /// either and is found first for provider `bedrock`. A `bedrock/<region>/<model id>` key,
    /// where the region looks like `us-east-1` or `us-gov-west-1`, is that region's price
    /// (GovCloud's are higher): it is kept under its own key and never stands in for a price
    /// without a region. Only when no price without a region exists for the model, neither in
    /// this file nor in any table layered with it, and all its regional entries agree, does
    /// looking up provider `bedrock` and the bare model id fall back to the regional price;
    /// when the regions disagree the model stays unpriced and must be given in a pricing file.
    /// Other `bedrock/...` keys (`bedrock/claude_platform/...`, provisioned-throughput
    /// commitments, aliases without prices) are treated as any other entry: kept under their
    /// key, or skipped when they have no token prices.
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
        // Bedrock model id → its regional entries' prices (`None`: refused).
        let mut regional: BTreeMap<&str, Vec<Option<ModelPrice>>> = BTreeMap::new();
        for (model, entry) in obj {
            let Some(e) = entry.as_object() else { continue };
            if model == "sample_spec" {
                continue;
            }
            let is_bedrock = matches!(
                e.get("litellm_provider")
                    .and_then(serde_json::Value::as_str),
                Some("bedrock" | "bedrock_converse")
            );
            let region_of = if is_bedrock {
                bedrock_regional_model(model)
            } else {
                None
            };
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
            if let Some(bare) = region_of {
                regional
                    .entry(bare)
                    .or_default()
                    .push(built.as_ref().ok().cloned());
            }
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
        for (bare, prices) in regional {
            let key = format!("bedrock/{bare}");
            let has_own = [bare, key.as_str()]
                .iter()
                .any(|k| table.models.contains_key(*k) || table.refused.contains_key(*k));
            if has_own {
                continue;
            }
            let mut prices = prices.into_iter();
            let Some(Some(first)) = prices.next() else {
                continue;
            };
            let agree = prices
                .all(|p| p.is_some_and(|p| p.standard == first.standard && p.batch == first.batch));
            if agree {
                table.regional.insert(key, first);
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
        self.regional.extend(other.regional);
        self.sources.extend(other.sources);
    }

    /// Looks a model up as `provider/model`, then `model`, then `model` without a trailing
    /// `-YYYY-MM-DD` snapshot date; a Bedrock model priced only per region last (see
    /// [`PriceTable::from_litellm_str`]).
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
        if let Some(p) = candidates.iter().find_map(|c| self.regional.get(c)) {
            return Ok(p);
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

/// The model id of a LiteLLM key `bedrock/<region>/<model id>`, or `None` for any other key.
fn bedrock_regional_model(key: &str) -> Option<&str> {
    let (region, model) = key.strip_prefix("bedrock/")?.split_once('/')?;
    (looks_like_aws_region(region) && !model.is_empty() && !model.contains('/')).then_some(model)
}

/// `us-east-1`, `ap-southeast-2`, `us-gov-west-1`: two letters, one or two lowercase words,
/// a number.
fn looks_like_aws_region(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let [country, middle @ .., number] = parts.as_slice() else {
        return false;
    };
    country.len() == 2
        && country.bytes().all(|b| b.is_ascii_lowercase())
        && (1..=2).contains(&middle.len())
        && middle
            .iter()
            .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()))
        && !number.is_empty()
        && number.bytes().all(|b| b.is_ascii_digit())
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
    fn litellm_snapshot_prices_bedrock_models_exactly() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/litellm_model_prices.json");
        let t = PriceTable::load(&path).unwrap();
        // bedrock_converse, with batch and cache prices
        let haiku = t
            .lookup("bedrock", "anthropic.claude-haiku-4-5-20251001-v1:0")
            .unwrap();
        assert_eq!(haiku.standard.input.pico_per_token(), 1_000_000); // 1e-06
        assert_eq!(haiku.standard.cached_input.pico_per_token(), 100_000); // 1e-07
        assert_eq!(haiku.standard.cache_write.pico_per_token(), 1_250_000); // 1.25e-06
        assert_eq!(haiku.standard.output.pico_per_token(), 5_000_000); // 5e-06
        let b = haiku.batch.unwrap();
        assert_eq!(b.input.pico_per_token(), 500_000); // 5e-07
        assert_eq!(b.output.pico_per_token(), 2_500_000); // 2.5e-06
        assert_eq!(b.cached_input, b.input);
        let lite = t.lookup("bedrock", "amazon.nova-lite-v1:0").unwrap();
        assert_eq!(lite.standard.input.pico_per_token(), 60_000); // 6e-08, not GovCloud's 7.2e-08
        assert_eq!(lite.standard.cached_input.pico_per_token(), 15_000); // 1.5e-08
        assert_eq!(lite.standard.output.pico_per_token(), 240_000); // 2.4e-07
        let b = lite.batch.unwrap();
        assert_eq!(b.input.pico_per_token(), 30_000); // 3e-08
        assert_eq!(b.output.pico_per_token(), 120_000); // 1.2e-07
        // priced only under `bedrock/us-gov-*`: the regional price, for provider bedrock only
        let gov = t
            .lookup("bedrock", "anthropic.claude-3-haiku-20240307-v1:0")
            .unwrap();
        assert_eq!(gov.standard.input.pico_per_token(), 300_000);
        assert!(gov.batch.is_none());
        assert!(
            t.lookup("anthropic", "anthropic.claude-3-haiku-20240307-v1:0")
                .is_err()
        );
        // `bedrock/claude_platform/claude-haiku-4-5` does not stand in for Anthropic's own
        let own = t.lookup("anthropic", "claude-haiku-4-5").unwrap();
        assert_eq!(own.model, "claude-haiku-4-5");

        // The built-in Bedrock prices are the snapshot's, and layering the snapshot on the
        // built-in table keeps the built-in price of a model LiteLLM prices only per region.
        let builtin = PriceTable::builtin();
        for m in [
            "anthropic.claude-sonnet-4-5-20250929-v1:0",
            "anthropic.claude-haiku-4-5-20251001-v1:0",
            "anthropic.claude-3-5-haiku-20241022-v1:0",
            "amazon.nova-pro-v1:0",
            "amazon.nova-lite-v1:0",
            "amazon.nova-micro-v1:0",
            "meta.llama3-1-8b-instruct-v1:0",
        ] {
            let ours = builtin.lookup("bedrock", m).unwrap();
            let theirs = t.lookup("bedrock", m).unwrap();
            assert_eq!(ours.standard, theirs.standard, "{m}");
            assert!(ours.batch.is_some(), "{m}");
            if theirs.batch.is_some() {
                assert_eq!(ours.batch, theirs.batch, "{m}");
            }
        }
        let mut layered = PriceTable::builtin();
        layered.merge(t);
        let haiku3 = layered
            .lookup("bedrock", "anthropic.claude-3-haiku-20240307-v1:0")
            .unwrap();
        assert_eq!(haiku3.standard.input.pico_per_token(), 250_000);
        assert_eq!(haiku3.batch.unwrap().input.pico_per_token(), 125_000);
    }

    #[test]
    fn litellm_bedrock_regional_keys_are_a_last_resort() {
        let json = r#"{
            "amazon.nova-lite-v1:0": {"litellm_provider": "bedrock_converse",
                "input_cost_per_token": 6e-08, "output_cost_per_token": 2.4e-07},
            "bedrock/us-gov-west-1/amazon.nova-lite-v1:0": {"litellm_provider": "bedrock",
                "input_cost_per_token": 7.2e-08, "output_cost_per_token": 2.88e-07},
            "bedrock/meta.llama-x-v1:0": {"litellm_provider": "bedrock",
                "input_cost_per_token": 2e-07, "output_cost_per_token": 2e-07},
            "bedrock/us-east-1/meta.llama-x-v1:0": {"litellm_provider": "bedrock",
                "input_cost_per_token": 9e-07, "output_cost_per_token": 9e-07},
            "bedrock/us-gov-east-1/m.gov-only-v1:0": {"litellm_provider": "bedrock",
                "input_cost_per_token": 3e-07, "output_cost_per_token": 1.5e-06},
            "bedrock/us-gov-west-1/m.gov-only-v1:0": {"litellm_provider": "bedrock",
                "input_cost_per_token": 3e-07, "output_cost_per_token": 1.5e-06},
            "bedrock/us-east-1/m.split-v1:0": {"litellm_provider": "bedrock",
                "input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06},
            "bedrock/eu-west-1/m.split-v1:0": {"litellm_provider": "bedrock",
                "input_cost_per_token": 2e-06, "output_cost_per_token": 2e-06},
            "bedrock/us-east-1/m.other-v1:0": {"litellm_provider": "someone_else",
                "input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06},
            "bedrock/claude_platform/claude-x": {"litellm_provider": "bedrock",
                "input_cost_per_token": 1e-06, "output_cost_per_token": 5e-06},
            "bedrock/claude-x-latest": {"alias_of": "global.anthropic.claude-x"},
            "bedrock/guardrails": {"litellm_provider": "bedrock", "mode": "guardrail"}
        }"#;
        let t = PriceTable::from_litellm_str(json, "l.json").unwrap();
        let pico = |provider: &str, model: &str| {
            t.lookup(provider, model)
                .map(|p| p.standard.input.pico_per_token())
        };
        // a price without a region wins over a regional one
        assert_eq!(pico("bedrock", "amazon.nova-lite-v1:0"), Ok(60_000));
        assert_eq!(pico("bedrock", "meta.llama-x-v1:0"), Ok(200_000));
        // regional keys stay reachable under their own name
        assert_eq!(
            pico("bedrock", "us-gov-west-1/amazon.nova-lite-v1:0"),
            Ok(72_000)
        );
        // only regional, and the regions agree: their price, for provider bedrock
        assert_eq!(pico("bedrock", "m.gov-only-v1:0"), Ok(300_000));
        assert!(pico("openai", "m.gov-only-v1:0").is_err());
        // the regions disagree: no price rather than a guess
        assert!(matches!(
            t.lookup("bedrock", "m.split-v1:0"),
            Err(LookupError::Unknown { .. })
        ));
        // not Bedrock's by its provider, or not a region: no fallback
        assert!(pico("bedrock", "m.other-v1:0").is_err());
        assert!(pico("bedrock", "claude-x").is_err());
        assert_eq!(pico("bedrock", "claude_platform/claude-x"), Ok(1_000_000));
        // a region-free price from another table wins over the regional one
        let mut layered = PriceTable::from_toml_str(
            "[models.\"m.gov-only-v1:0\"]\nprovider = \"bedrock\"\nstandard = { input = \"0.25\", output = \"1.25\" }\n",
            "p.toml",
        )
        .unwrap();
        layered.merge(t);
        assert_eq!(
            layered
                .lookup("bedrock", "m.gov-only-v1:0")
                .map(|p| p.standard.input.pico_per_token()),
            Ok(250_000)
        );
    }

    #[test]
    fn aws_regions_are_recognised() {
        for r in [
            "us-east-1",
            "ap-southeast-2",
            "us-gov-west-1",
            "eu-central-1",
        ] {
            assert!(looks_like_aws_region(r), "{r}");
        }
        for s in [
            "claude_platform",
            "1024-x-1024",
            "invoke",
            "*",
            "us-east",
            "US-EAST-1",
        ] {
            assert!(!looks_like_aws_region(s), "{s}");
        }
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
