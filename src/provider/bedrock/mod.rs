//! Amazon Bedrock batch inference (model invocation jobs): records in S3, jobs on the Bedrock
//! control plane, results back from S3 (docs/providers.md §5), on the official AWS SDK crates.

pub mod client;
pub mod codec;
pub mod types;

pub use client::BedrockClient;
