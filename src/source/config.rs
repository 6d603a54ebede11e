//! The `[source]` settings a reader is opened with: the file, its format and the limits on
//! one record. Plain data: the pipeline file is parsed and checked in `config`.

use std::path::PathBuf;

use rust_decimal::Decimal;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    Jsonl,
    Csv,
}

#[derive(Clone, Debug)]
pub struct SourceConfig {
    pub kind: SourceKind,
    pub path: PathBuf,
    pub id_field: String,
    pub max_record_bytes: usize,
    pub delimiter: u8,
    /// A run whose quarantined share of records is above this sends nothing and fails
    /// (0 to 1, default 0.5; 1 never stops a run).
    pub max_quarantined_share: Decimal,
}
