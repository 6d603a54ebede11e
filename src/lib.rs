//! nightshift runs LLM batch pipelines: it collects source records, deduplicates them by
//! content hash, writes provider batch files within the provider's limits, submits and polls
//! the jobs, validates every answer against a JSON Schema, retries only what failed under a
//! cap, and keeps an exact ledger of tokens and money per processed item.
//!
//! The map (see docs/design.md): `source` reads records, `dedupe` keys items, `store` holds the
//! state, `provider` talks to batch APIs, `worker` drives the pipeline, `validate` judges
//! answers, `cost` prices them exactly, `report` rolls everything up per processed item, and
//! `sim` is the offline provider simulator every test runs against.

pub mod bench;
pub mod cli;
pub mod config;
pub mod cost;
pub mod dedupe;
pub mod plan;
pub mod preflight;
pub mod prompt;
pub mod provider;
pub mod reconcile;
pub mod report;
pub mod sim;
pub mod source;
pub mod store;
pub mod util;
pub mod validate;
pub mod worker;
