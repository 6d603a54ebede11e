//! nightshift runs LLM batch pipelines: it collects source records, deduplicates them by
//! content hash, writes provider batch files within the provider's limits, submits and polls
//! the jobs, validates every answer against a JSON Schema, retries only what failed under a
//! cap, and keeps an exact ledger of tokens and money per processed item.
//!
//! The map (see docs/design.md), bottom up: `util` (files, time, text) and `cost` (exact
//! money, prices, tokens) import nothing of the rest; `prompt` renders templates and
//! `request` turns a rendered record into a request and its item key; `split` cuts long
//! texts and `stage` renders a stage's items for a record; `source` reads
//! records; `provider` holds each provider's encoding (`codec`) and HTTP client; `config`
//! reads the pipeline file, `preflight` checks what it points at; `store` holds the state;
//! `validate` judges answers; `worker` drives the pipeline; `plan`, `report` and `reconcile`
//! forecast, roll up and check the figures per processed item; `sim` is the offline provider
//! simulator every test runs against; `cli` is the command line. `tests/it/layers.rs` keeps
//! the arrows pointing one way.

pub mod bench;
pub mod cli;
pub mod config;
pub mod cost;
pub mod metrics;
pub mod plan;
pub mod preflight;
pub mod prompt;
pub mod provider;
pub mod reconcile;
pub mod report;
pub mod request;
pub mod sim;
pub mod source;
pub mod split;
pub mod stage;
pub mod store;
pub mod util;
pub mod validate;
pub mod worker;
