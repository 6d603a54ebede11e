//! Run reports: the summary a run ends with, `report --json`, and the per-item audit.
//!
//! Everything rolls up to the *processed item* — a source record whose item succeeded —
//! never the API request: cost per processed item is the run's ledger cost divided by the
//! records it processed. Money is exact decimal text in JSON; figures for people are rounded.

use std::fmt::Write as _;

use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::cost::{Usage, Usd};
use crate::store::{AuditRow, RunFigures, RunRow, Store, StoreError};

/// The figures of one run, ready to print.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub run: RunRow,
    pub figures: RunFigures,
    pub anomalies: u64,
}

impl RunReport {
    pub async fn load<S: Store>(store: &S, run: RunRow) -> Result<Self, StoreError> {
        let figures = store.run_figures(&run.id).await?;
        let anomalies = store.anomaly_count(&run.id).await?;
        Ok(RunReport {
            run,
            figures,
            anomalies,
        })
    }

    pub fn duplicates(&self) -> u64 {
        self.figures
            .records_valid
            .saturating_sub(self.figures.unique_items)
    }

    pub fn retries(&self) -> u64 {
        self.figures
            .attempts
            .saturating_sub(self.figures.items_attempted)
    }

    /// Retries per item sent (0 when nothing was sent).
    pub fn retry_rate(&self) -> Decimal {
        if self.figures.items_attempted == 0 {
            return Decimal::ZERO;
        }
        (Decimal::from(self.retries()) / Decimal::from(self.figures.items_attempted)).round_dp(4)
    }

    pub fn cost(&self) -> Usd {
        self.figures.ledger.cost
    }

    pub fn standard_cost(&self) -> Usd {
        self.figures.ledger.standard_cost
    }

    pub fn cost_per_processed_item(&self) -> Option<Decimal> {
        self.cost().per(self.figures.processed_records)
    }

    pub fn to_json(&self) -> Value {
        let f = &self.figures;
        let u = &f.ledger.usage;
        let per = |v: Usd| v.per(f.processed_records).map(|d| d.to_string());
        json!({
            "run_id": self.run.id,
            "pipeline": self.run.pipeline,
            "status": self.run.status,
            "provider": self.run.provider,
            "model": self.run.model,
            "models_used": f.models,
            "pricing_mode": self.run.pricing_mode,
            "started_at": rfc3339(self.run.started_at),
            "finished_at": self.run.finished_at.map(rfc3339),
            "exit_code": self.run.exit_code,
            "message": self.run.message,
            "records": {
                "read": self.run.records_read,
                "quarantined": self.run.records_quarantined,
                "valid": f.records_valid,
                "processed": f.processed_records,
            },
            "items": {
                "unique": f.unique_items,
                "duplicates": self.duplicates(),
                "reused": f.reused,
                "succeeded": f.succeeded,
                "failed": f.exhausted,
                "unfinished": f.unfinished,
            },
            "batches": f.batches,
            "attempts": f.attempts,
            "retries": self.retries(),
            "retry_rate": self.retry_rate().to_string().parse::<f64>().unwrap_or(0.0),
            "tokens": usage_json(u),
            "cost_usd": self.cost().to_decimal_string(),
            "standard_cost_usd": self.standard_cost().to_decimal_string(),
            "saving_usd": (self.standard_cost() - self.cost()).to_decimal_string(),
            "cost_per_processed_item_usd": per(self.cost()),
            "standard_cost_per_processed_item_usd": per(self.standard_cost()),
            "saving_per_processed_item_usd": per(self.standard_cost() - self.cost()),
            "anomalies": self.anomalies,
            "budget_usd": self.run.budget_pico.map(|p| Usd::from_pico(p as i128).to_decimal_string()),
            "max_item_usd": self.run.max_item_pico.map(|p| Usd::from_pico(p as i128).to_decimal_string()),
        })
    }

    /// The human summary printed at the end of a run and by `report`.
    pub fn to_text(&self) -> String {
        let f = &self.figures;
        let u = &f.ledger.usage;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "run {}  pipeline {}  {}  ({} {}, {} prices)",
            self.run.id,
            self.run.pipeline,
            self.run.status,
            self.run.provider,
            self.run.model,
            self.run.pricing_mode
        );
        let _ = writeln!(
            s,
            "  records    read {}  ·  quarantined {}  ·  valid {}",
            n(self.run.records_read as u64),
            n(self.run.records_quarantined as u64),
            n(f.records_valid)
        );
        let _ = writeln!(
            s,
            "  items      unique {}  ·  duplicates reused {}  ·  already done in earlier runs {}",
            n(f.unique_items),
            n(self.duplicates()),
            n(f.reused)
        );
        let _ = writeln!(
            s,
            "  outcome    succeeded {}  ·  failed {}{}",
            n(f.succeeded),
            n(f.exhausted),
            if f.unfinished > 0 {
                format!("  ·  unfinished {}", n(f.unfinished))
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            s,
            "  attempts   {} in {} batch{}  ·  retries {}  ·  retry rate {}%",
            n(f.attempts),
            n(f.batches),
            if f.batches == 1 { "" } else { "es" },
            n(self.retries()),
            (self.retry_rate() * Decimal::from(100)).round_dp(1)
        );
        let _ = writeln!(
            s,
            "  tokens     input {}  ·  cached input {}{}  ·  output {}  ·  reasoning {}",
            n(u.input_tokens),
            n(u.cached_input_tokens),
            if u.cache_write_tokens > 0 {
                format!("  ·  cache writes {}", n(u.cache_write_tokens))
            } else {
                String::new()
            },
            n(u.output_tokens),
            n(u.reasoning_tokens)
        );
        let saving = self.standard_cost() - self.cost();
        let pct = if self.standard_cost().pico() > 0 {
            format!(
                " ({}%)",
                (saving.to_decimal() / self.standard_cost().to_decimal() * Decimal::from(100))
                    .round_dp(1)
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "  cost       {} {}  ·  {} at standard prices  ·  saved {}{}",
            self.cost().display_rounded(6),
            self.run.pricing_mode,
            self.standard_cost().display_rounded(6),
            saving.display_rounded(6),
            pct
        );
        match self.cost_per_processed_item() {
            Some(per) => {
                let _ = writeln!(
                    s,
                    "  per item   ${} per processed item ({} processed)  ·  saved ${} per item",
                    per.round_dp(8).normalize(),
                    n(f.processed_records),
                    saving
                        .per(f.processed_records)
                        .unwrap_or_default()
                        .round_dp(8)
                        .normalize()
                );
            }
            None => {
                let _ = writeln!(s, "  per item   no item processed");
            }
        }
        if let Some(cap) = self.run.budget_pico {
            let cap = Usd::from_pico(cap as i128);
            let _ = writeln!(
                s,
                "  budget     {} cap  ·  {} spent  ·  {} left",
                cap.display_rounded(6),
                self.cost().display_rounded(6),
                (cap - self.cost()).display_rounded(6)
            );
        }
        if self.anomalies > 0 {
            let _ = writeln!(
                s,
                "  anomalies  {} (see `nightshift report --items`)",
                self.anomalies
            );
        }
        if let Some(m) = &self.run.message {
            let _ = writeln!(s, "  note       {m}");
        }
        s
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "input": u.input_tokens,
        "cached_input": u.cached_input_tokens,
        "cache_write": u.cache_write_tokens,
        "output": u.output_tokens,
        "reasoning": u.reasoning_tokens,
    })
}

/// `1234567` → `1,234,567`.
pub fn n(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// The per-item audit as JSON: every attempt of every item of the run.
pub fn audit_json(rows: &[AuditRow]) -> Value {
    Value::Array(
        rows.iter()
            .map(|r| {
                json!({
                    "item_id": r.item_id,
                    "dedupe_key": hex::encode(&r.dedupe_key),
                    "item_state": r.item_state,
                    "record_ids": r.record_ids.split(',').filter(|s| !s.is_empty()).collect::<Vec<_>>(),
                    "attempt": r.attempt_no,
                    "custom_id": r.custom_id,
                    "batch_id": r.batch_id,
                    "provider_batch_id": r.provider_batch_id,
                    "attempt_state": r.attempt_state,
                    "verdict": r.verdict,
                    "error": r.error,
                    "model": r.model,
                    "tokens": {
                        "input": r.input_tokens, "cached_input": r.cached_input_tokens,
                        "cache_write": r.cache_write_tokens, "output": r.output_tokens,
                        "reasoning": r.reasoning_tokens,
                    },
                    "cost_usd": r.cost_pico.map(|c| Usd::from_pico(c as i128).to_decimal_string()),
                })
            })
            .collect(),
    )
}

/// The per-item audit as a table.
pub fn audit_text(rows: &[AuditRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<8} {:<10} {:<3} {:<52} {:<10} {:<15} {:>8} {:>8} {:>14}  records",
        "item", "state", "try", "custom_id", "attempt", "verdict", "in", "out", "cost_usd"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<8} {:<10} {:<3} {:<52} {:<10} {:<15} {:>8} {:>8} {:>14}  {}",
            r.item_id,
            r.item_state,
            r.attempt_no,
            r.custom_id,
            r.attempt_state,
            r.verdict.as_deref().unwrap_or("-"),
            r.input_tokens
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into()),
            r.output_tokens
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into()),
            r.cost_pico
                .map(|c| Usd::from_pico(c as i128).to_decimal_string())
                .unwrap_or_else(|| "-".into()),
            crate::validate::preview(&r.record_ids, 60),
        );
        if let Some(e) = &r.error {
            let _ = writeln!(s, "{:>12} {}", "└", crate::validate::preview(e, 160));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(n(0), "0");
        assert_eq!(n(999), "999");
        assert_eq!(n(1000), "1,000");
        assert_eq!(n(1234567), "1,234,567");
    }
}
