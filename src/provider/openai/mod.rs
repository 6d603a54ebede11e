//! OpenAI Batch API: Files + Batches over `/v1/chat/completions` requests.

pub mod client;
pub mod codec;
pub mod types;

pub use client::OpenAiClient;

/// The endpoint every request line targets.
pub const ENDPOINT: &str = "/v1/chat/completions";
/// The production base URL.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";
/// Metadata key carrying our local batch id.
pub const META_BATCH_ID: &str = "nightshift_batch_id";
