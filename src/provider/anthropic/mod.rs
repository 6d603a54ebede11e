//! Anthropic Message Batches: requests inline in the create call, results as a JSONL stream.

pub mod client;
pub mod codec;
pub mod types;

pub use client::AnthropicClient;

pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";
pub const API_VERSION: &str = "2023-06-01";
