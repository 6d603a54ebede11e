//! Gemini Batch API (Developer API): files uploaded by the resumable protocol, or requests
//! inline for small batches; long-running operations with `BATCH_STATE_*` states.

pub mod client;
pub mod codec;
pub mod types;

pub use client::GeminiClient;

pub const DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com";
/// Batches up to this size send their requests inline instead of uploading a file.
pub const INLINE_LIMIT_BYTES: u64 = 20 * 1000 * 1000;
