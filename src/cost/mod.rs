//! Tokens and money: exact prices, exact costs, and the token counts that bound them.
//!
//! `money` holds the exact amount types, `pricing` the price tables (our TOML and LiteLLM's
//! JSON), `tokens` the prompt-token counting shared by the planner and the simulator.

pub mod money;
pub mod pricing;
pub mod tokens;

pub use money::{TokenPrice, Usd};
pub use pricing::{ModelPrice, PriceTable, PricingMode, Rates};

use serde::{Deserialize, Serialize};

/// Token usage of one attempt, normalised across providers.
///
/// `input_tokens` is the whole prompt, *including* the cached and cache-write parts;
/// `output_tokens` is the whole completion, *including* reasoning tokens (as OpenAI reports
/// them). Cost is computed from the disjoint parts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
}

impl Usage {
    pub fn add(&mut self, other: &Usage) {
        self.input_tokens += other.input_tokens;
        self.cached_input_tokens += other.cached_input_tokens;
        self.cache_write_tokens += other.cache_write_tokens;
        self.output_tokens += other.output_tokens;
        self.reasoning_tokens += other.reasoning_tokens;
    }

    pub fn is_zero(&self) -> bool {
        *self == Usage::default()
    }
}

impl Rates {
    /// Exact cost of `usage` at these rates.
    pub fn cost(&self, usage: &Usage) -> Usd {
        let uncached = usage
            .input_tokens
            .saturating_sub(usage.cached_input_tokens)
            .saturating_sub(usage.cache_write_tokens);
        self.input.cost(uncached)
            + self.cached_input.cost(usage.cached_input_tokens)
            + self.cache_write.cost(usage.cache_write_tokens)
            + self.output.cost(usage.output_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_and_reasoning_tokens_are_not_double_counted() {
        let rates = Rates {
            input: TokenPrice::per_million("1").unwrap(),
            cached_input: TokenPrice::per_million("0.1").unwrap(),
            cache_write: TokenPrice::per_million("1.25").unwrap(),
            output: TokenPrice::per_million("4").unwrap(),
        };
        let usage = Usage {
            input_tokens: 1_000,
            cached_input_tokens: 400,
            cache_write_tokens: 100,
            output_tokens: 50,
            reasoning_tokens: 20,
        };
        // 500 uncached × 1 + 400 × 0.1 + 100 × 1.25 + 50 × 4, per million
        assert_eq!(rates.cost(&usage), Usd::parse("0.000865").unwrap());
    }
}
