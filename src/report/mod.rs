//! Run reports: the summary a run ends with, `report --json` (with [`details`]), the HTML
//! page ([`html`]) and the per-item audit.
//!
//! Everything rolls up to the *processed item* — a source record whose item succeeded —
//! never the API request: cost per processed item is the run's ledger cost divided by the
//! records it processed. Money is exact decimal text in JSON; figures for people are rounded.

use std::fmt::Write as _;

use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::cost::{Usage, Usd};
use crate::store::{
    AuditRow, ItemState, LinkRow, RunFigures, RunRow, RunStatus, StageFigures, Store, StoreError,
};
use crate::util::text::{duration_ms, n, plural, printable};
use crate::util::time::rfc3339;

pub mod chains;
pub mod details;
pub mod html;

pub use crate::util::table::{align_right, render, table, terminal_width};

pub use chains::{CHAIN_PAGE, ChainPage, ChainPages};
pub use details::{Details, full_json};

/// Writes the HTML report of `rep` to `path` (atomically): the page of its `report --json`.
pub async fn write_html<S: Store>(
    store: &S,
    rep: &RunReport,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let details = Details::load(store, rep).await?;
    let page = html::render(&full_json(rep, &details)).context("drawing the HTML report")?;
    let mut file = crate::util::fs::AtomicFile::create(path)
        .with_context(|| format!("writing the HTML report {}", path.display()))?;
    std::io::Write::write_all(&mut file, page.as_bytes())
        .and_then(|_| file.commit())
        .with_context(|| format!("writing the HTML report {}", path.display()))
}

/// The figures of one run, ready to print.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub run: RunRow,
    pub figures: RunFigures,
    pub anomalies: u64,
}

impl RunReport {
    /// The run's figures: frozen on its row once nothing of it is open, else counted now.
    pub async fn load<S: Store>(store: &S, run: RunRow) -> Result<Self, StoreError> {
        let figures = match run.figures_json.as_deref().and_then(RunFigures::from_json) {
            Some(f) => f,
            None => store.run_figures(&run.id).await?,
        };
        let anomalies = store.anomaly_count(&run.id).await?;
        Ok(RunReport {
            run,
            figures,
            anomalies,
        })
    }

    /// Requests not sent because an identical one is another record's (or chunk's) item.
    pub fn duplicates(&self) -> u64 {
        let f = &self.figures;
        if f.stages.is_empty() {
            f.records_valid.saturating_sub(f.unique_items)
        } else {
            f.stages
                .iter()
                .map(|s| s.links)
                .sum::<u64>()
                .saturating_sub(f.unique_items)
        }
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
            "duration_seconds": self.run.finished_at.map(|f| (f - self.run.started_at) as f64 / 1000.0),
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
            "requests_sent": f.requests_sent,
            "collected_for_earlier_runs": {
                "batches": f.collected.batches,
                "results": f.collected.results,
                "cost_usd": f.collected.cost.to_decimal_string(),
                "runs": f.collected.runs,
            },
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
            "calls_per_processed_item": self.calls_per_processed_item(f.attempts).map(|d| d.to_string()),
            "stages": f.stages.iter().map(|st| self.stage_json(st)).collect::<Vec<_>>(),
        })
    }

    /// Calls (attempts) per processed item: `attempts` of this run over its processed records.
    pub fn calls_per_processed_item(&self, attempts: u64) -> Option<Decimal> {
        let n = self.figures.processed_records;
        (n > 0).then(|| (Decimal::from(attempts) / Decimal::from(n)).round_dp(2))
    }

    fn stage_json(&self, st: &StageFigures) -> Value {
        let n = self.figures.processed_records;
        let rate = |a: u64, b: u64| {
            (b > 0).then(|| {
                (Decimal::from(a) / Decimal::from(b))
                    .round_dp(4)
                    .to_string()
                    .parse::<f64>()
                    .unwrap_or(0.0)
            })
        };
        json!({
            "stage": st.stage,
            "items": st.items,
            "records": st.records,
            "skipped_records": st.skipped,
            "failed_records": st.failed_records,
            "succeeded": st.succeeded,
            "failed": st.exhausted,
            "attempts": st.attempts,
            "retries": st.retries(),
            "retry_rate": rate(st.retries(), st.items_attempted).unwrap_or(0.0),
            "tokens": usage_json(&st.usage),
            "cost_usd": st.cost.to_decimal_string(),
            "standard_cost_usd": st.standard_cost.to_decimal_string(),
            "models": st.models,
            "pricing_modes": st.pricing_modes,
            "calls_per_processed_item": self.calls_per_processed_item(st.attempts).map(|d| d.to_string()),
            "cost_per_processed_item_usd": st.cost.per(n).map(|d| d.to_string()),
            "review": (st.review_pass + st.review_fail > 0).then(|| json!({
                "pass": st.review_pass,
                "fail": st.review_fail,
                "pass_rate": rate(st.review_pass, st.review_pass + st.review_fail),
            })),
        })
    }

    /// The per-stage table of a multi-stage run.
    pub fn stages_table(&self, width: Option<u16>) -> String {
        let mut t = table(
            &[
                "stage",
                "records",
                "items",
                "attempts",
                "retry rate",
                "input tok",
                "output tok",
                "cost",
                "per item",
                "model",
                "prices",
                "review",
            ],
            width,
        );
        for st in &self.figures.stages {
            let retry = if st.items_attempted > 0 {
                format!(
                    "{}%",
                    (Decimal::from(st.retries()) * Decimal::from(100)
                        / Decimal::from(st.items_attempted))
                    .round_dp(1)
                )
            } else {
                "-".into()
            };
            let records = if st.skipped > 0 {
                format!("{} ({} skipped)", n(st.records), n(st.skipped))
            } else {
                n(st.records)
            };
            let review = if st.review_pass + st.review_fail > 0 {
                format!(
                    "{} pass · {} fail ({}%)",
                    st.review_pass,
                    st.review_fail,
                    (Decimal::from(st.review_pass * 100)
                        / Decimal::from(st.review_pass + st.review_fail))
                    .round_dp(1)
                )
            } else {
                String::new()
            };
            t.add_row(vec![
                st.stage.clone(),
                records,
                n(st.items),
                n(st.attempts),
                retry,
                n(st.usage.input_tokens),
                n(st.usage.output_tokens),
                st.cost.display_rounded(6),
                st.cost
                    .per(self.figures.processed_records)
                    .map(|d| format!("${}", d.round_dp(8).normalize()))
                    .unwrap_or_else(|| "-".into()),
                st.models.join(", "),
                st.pricing_modes.join(", "),
                review,
            ]);
        }
        align_right(&mut t, &[1, 2, 3, 4, 5, 6, 7, 8]);
        render(&t)
    }

    /// The human summary printed at the end of a run and by `report`.
    pub fn to_text(&self) -> String {
        let f = &self.figures;
        let u = &f.ledger.usage;
        let mut s = String::new();
        let took = match self.run.finished_at {
            Some(end) => format!("  in {}", duration_ms(end - self.run.started_at)),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "run {}  pipeline {}  {}{took}  ({} {}, {} prices)",
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
        if f.stages.is_empty() {
            let _ = writeln!(
                s,
                "  items      unique {}  ·  duplicates reused {}  ·  already done in earlier runs {}",
                n(f.unique_items),
                n(self.duplicates()),
                n(f.reused)
            );
        } else {
            let _ = writeln!(
                s,
                "  items      unique {} over {} stages  ·  duplicates reused {}  ·  already done in earlier runs {}",
                n(f.unique_items),
                f.stages.len(),
                n(self.duplicates()),
                n(f.reused)
            );
        }
        let _ = writeln!(
            s,
            "  outcome    succeeded {}  ·  failed {}{}{}",
            n(f.succeeded),
            n(f.exhausted),
            if f.unfinished > 0 {
                format!("  ·  unfinished {}", n(f.unfinished))
            } else {
                String::new()
            },
            if f.stages.is_empty() {
                String::new()
            } else {
                format!(
                    "  (items)  ·  records done {}  ·  records failed {}",
                    n(f.records_done),
                    n(f.records_failed)
                )
            }
        );
        let _ = writeln!(
            s,
            "  attempts   {} in {}  ·  retries {}  ·  retry rate {}%",
            n(f.attempts),
            plural(f.batches, "batch", "batches"),
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
        if !f.stages.is_empty() {
            if let Some(calls) = self.calls_per_processed_item(f.attempts) {
                let per_stage: Vec<String> = f
                    .stages
                    .iter()
                    .map(|st| {
                        format!(
                            "{} {}",
                            st.stage,
                            self.calls_per_processed_item(st.attempts)
                                .unwrap_or_default()
                                .normalize()
                        )
                    })
                    .collect();
                let _ = writeln!(
                    s,
                    "  calls      {} per processed item: {}",
                    calls.normalize(),
                    per_stage.join("  ·  ")
                );
            }
            for line in self.stages_table(None).lines() {
                let _ = writeln!(s, "  {line}");
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
        if f.collected.batches > 0 {
            let _ = writeln!(
                s,
                "  collected  {} of earlier runs ({}): {}, {} charged to those runs",
                plural(f.collected.batches, "batch", "batches"),
                f.collected
                    .runs
                    .iter()
                    .map(|r| short_run_id(r))
                    .collect::<Vec<_>>()
                    .join(", "),
                plural(f.collected.results, "result", "results"),
                f.collected.cost.display_rounded(6)
            );
        }
        if f.requests_sent > 0 {
            let _ = writeln!(
                s,
                "  sent       {} to the provider",
                plural(f.requests_sent, "request", "requests")
            );
        } else if f.unfinished > 0 {
            let _ = writeln!(
                s,
                "  sent       0 requests: {} still to send; run again to carry on",
                plural(f.unfinished, "item", "items")
            );
        } else if self.run.status == RunStatus::Completed {
            let _ = writeln!(
                s,
                "  sent       0 requests: nothing new to process, nothing charged by this run"
            );
        } else if self.run.status != RunStatus::Running {
            let _ = writeln!(s, "  sent       0 requests");
        }
        if let Some(m) = &self.run.message {
            let _ = writeln!(s, "  note       {}", printable(m));
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

/// The first 13 characters of a run id (its time part in a v7 uuid), enough to tell runs
/// apart and accepted by `--run`.
pub fn short_run_id(id: &str) -> String {
    id.chars().take(13).collect()
}

/// `nightshift runs`: one line per run, newest first.
pub fn runs_table(reports: &[RunReport], width: Option<u16>) -> String {
    let mut t = table(
        &[
            "run",
            "pipeline",
            "started",
            "took",
            "status",
            "records",
            "sent",
            "cost",
            "per processed item",
        ],
        width,
    );
    for r in reports {
        let f = &r.figures;
        t.add_row(vec![
            short_run_id(&r.run.id),
            printable(&r.run.pipeline),
            rfc3339(r.run.started_at)
                .replace('T', " ")
                .trim_end_matches('Z')
                .chars()
                .take(19)
                .collect(),
            r.run
                .finished_at
                .map(|e| duration_ms(e - r.run.started_at))
                .unwrap_or_else(|| "-".into()),
            r.run.status.to_string(),
            n(f.records_valid),
            n(f.requests_sent),
            r.cost().display_rounded(4),
            match r.cost_per_processed_item() {
                Some(per) => format!(
                    "${} ({})",
                    per.round_dp(6).normalize(),
                    n(f.processed_records)
                ),
                None => "-".into(),
            },
        ]);
    }
    align_right(&mut t, &[3, 5, 6, 7, 8]);
    render(&t)
}

/// One attempt of the per-item audit as JSON (`report --items --json` prints every attempt of
/// the run's batches, one after the other, without holding them all as JSON).
pub fn audit_json(r: &AuditRow) -> Value {
    json!({
        "run_id": r.run_id,
        "item_id": r.item_id,
        "dedupe_key": hex::encode(&r.dedupe_key),
        "item_state": r.item_state,
        "stage": r.stage,
        "record_ids": r.record_ids,
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
}

/// The per-item audit's columns.
const AUDIT_HEADER: [&str; 11] = [
    "item",
    "state",
    "try",
    "custom_id",
    "attempt",
    "verdict",
    "in",
    "out",
    "cost_usd",
    "records",
    "error",
];

/// The per-item audit's right-aligned columns (counts, money).
const AUDIT_RIGHT: [usize; 5] = [0, 2, 6, 7, 8];

/// One attempt's cells in the per-item audit.
fn audit_cells(r: &AuditRow) -> [String; 11] {
    let opt = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    [
        r.item_id.to_string(),
        r.item_state.to_string(),
        r.attempt_no.to_string(),
        r.custom_id.clone(),
        r.attempt_state.to_string(),
        r.verdict.clone().unwrap_or_else(|| "-".into()),
        opt(r.input_tokens),
        opt(r.output_tokens),
        r.cost_pico
            .map(|c| Usd::from_pico(c as i128).to_decimal_string())
            .unwrap_or_else(|| "-".into()),
        printable(&crate::util::text::preview(&r.record_ids.join(","), 40)),
        r.error
            .as_deref()
            .map(|e| printable(&crate::util::text::preview(e, 120)))
            .unwrap_or_default(),
    ]
}

/// The per-item audit as a table (`width`: the terminal's, if any).
pub fn audit_text(rows: &[AuditRow], width: Option<u16>) -> String {
    let mut t = table(&AUDIT_HEADER, width);
    for r in rows {
        t.add_row(audit_cells(r).to_vec());
    }
    align_right(&mut t, &AUDIT_RIGHT);
    render(&t)
}

/// The widths of the per-item audit's columns (as the table measures them), taken page by
/// page so that [`audit_text_page`] prints the pages of one table.
#[derive(Clone, Debug, Default)]
pub struct AuditWidths([usize; 11]);

impl AuditWidths {
    /// Widens the columns to fit the header and a page's rows.
    pub fn observe(&mut self, rows: &[AuditRow]) {
        let mut t = comfy_table::Table::new();
        t.set_header(AUDIT_HEADER.to_vec());
        for r in rows {
            t.add_row(audit_cells(r).to_vec());
        }
        for (w, page) in self.0.iter_mut().zip(t.column_max_content_widths()) {
            *w = (*w).max(usize::from(page));
        }
    }

    /// The widths to print at: as observed, or, for a terminal of `width` characters they
    /// do not fit in, narrowed a character at a time from the widest column (never below
    /// its header) until they fit; a narrowed column wraps its text.
    pub fn within(&self, width: Option<u16>) -> AuditWidths {
        let mut w = self.clone();
        let Some(width) = width else {
            return w;
        };
        // Each column has a space of padding on both sides.
        let total = |w: &[usize; 11]| w.iter().map(|c| c + 2).sum::<usize>();
        while total(&w.0) > usize::from(width) {
            let widest = (0..w.0.len())
                .filter(|&i| w.0[i] > AUDIT_HEADER[i].len())
                .max_by_key(|&i| w.0[i]);
            let Some(i) = widest else { break };
            w.0[i] -= 1;
        }
        w
    }
}

/// One page of the per-item audit printed with fixed column `widths` (the whole audit's,
/// see [`AuditWidths`]), with the header on the first page only: the pages printed one after
/// the other are the table [`audit_text`] prints of all the rows at once, without holding
/// them all (a run's attempts, a page of items at a time).
pub fn audit_text_page(rows: &[AuditRow], widths: &AuditWidths, header: bool) -> String {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled);
    if header {
        t.set_header(AUDIT_HEADER.to_vec());
    }
    for r in rows {
        t.add_row(audit_cells(r).to_vec());
    }
    for (i, w) in widths.0.iter().enumerate() {
        if let Some(col) = t.column_mut(i) {
            let w = u16::try_from(w + 2).unwrap_or(u16::MAX);
            col.set_constraint(comfy_table::ColumnConstraint::Absolute(
                comfy_table::Width::Fixed(w),
            ));
        }
    }
    align_right(&mut t, &AUDIT_RIGHT);
    render(&t)
}

/// One record of a multi-stage run and the items it caused, stage by stage.
pub struct Chain<'a> {
    pub record_id: &'a str,
    pub line: i64,
    pub links: Vec<&'a LinkRow>,
}

/// A record's status across `stages` from its links: failed (an item failed for good, or a
/// stage could not be rendered), succeeded (every stage linked, everything linked
/// succeeded or skipped), else pending.
pub fn chain_status(stages: &[String], links: &[&LinkRow]) -> &'static str {
    let failed = links
        .iter()
        .any(|l| l.error.is_some() || l.state == Some(ItemState::Exhausted));
    if failed {
        return "failed";
    }
    let done = stages.iter().all(|s| links.iter().any(|l| &l.stage == s))
        && links
            .iter()
            .all(|l| l.item_id.is_none() || l.state == Some(ItemState::Succeeded));
    if done { "succeeded" } else { "pending" }
}

fn link_state(l: &LinkRow) -> String {
    match (l.item_id, &l.error, l.state) {
        (None, Some(_), _) => "failed".into(),
        (None, None, _) => "skipped".into(),
        (Some(_), _, Some(s)) => s.to_string(),
        (Some(_), _, None) => "-".into(),
    }
}

/// `report --items` of a multi-stage run, as JSON: each record's chain of items.
pub fn chain_json(stages: &[String], c: &Chain<'_>) -> Value {
    let cost: i64 = c.links.iter().map(|l| l.cost_pico).sum();
    json!({
        "id": c.record_id,
        "line": c.line,
        "status": chain_status(stages, &c.links),
        "cost_usd": Usd::from_pico(cost as i128).to_decimal_string(),
        "items": c.links.iter().map(|l| json!({
            "stage": l.stage,
            "chunk": l.chunk,
            "item_id": l.item_id,
            "state": link_state(l),
            "attempts": l.attempts,
            "shared_with_records": (l.sharers - 1).max(0),
            "error": l.error.as_deref().or(if l.state == Some(ItemState::Exhausted) { l.last_error.as_deref() } else { None }),
        })).collect::<Vec<_>>(),
    })
}

/// `report --items` of a multi-stage run, as text: one line per record, then one per item
/// it caused (stage, chunk, state, attempts, and how many other records share the item).
pub fn chains_text(stages: &[String], chains: &[Chain<'_>]) -> String {
    let mut s = String::new();
    for c in chains {
        let cost: i64 = c.links.iter().map(|l| l.cost_pico).sum();
        let _ = writeln!(
            s,
            "{} (line {})  {}  {}",
            printable(c.record_id),
            c.line,
            chain_status(stages, &c.links),
            Usd::from_pico(cost as i128).display_rounded(6)
        );
        for l in &c.links {
            let at = if l.chunk > 0 || c.links.iter().any(|m| m.stage == l.stage && m.chunk > 0) {
                format!("{}[{}]", l.stage, l.chunk)
            } else {
                l.stage.clone()
            };
            let shared = if l.sharers > 1 {
                format!("  shared with {} other record(s)", l.sharers - 1)
            } else {
                String::new()
            };
            let why = l
                .error
                .as_deref()
                .or(if l.state == Some(ItemState::Exhausted) {
                    l.last_error.as_deref()
                } else {
                    None
                })
                .map(|e| format!("  {}", printable(&crate::util::text::preview(e, 100))))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "  {at:<14} {:<10} item {:<8} {} attempt(s){shared}{why}",
                link_state(l),
                l.item_id
                    .map(|i| i.to_string())
                    .unwrap_or_else(|| "-".into()),
                l.attempts.unwrap_or(0),
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AttemptState, ItemState};

    fn row(
        item_id: i64,
        records: &[&str],
        error: Option<&str>,
        cost_pico: Option<i64>,
    ) -> AuditRow {
        AuditRow {
            run_id: "r".into(),
            item_id,
            dedupe_key: vec![1, 2],
            item_state: if error.is_some() {
                ItemState::Failed
            } else {
                ItemState::Succeeded
            },
            record_ids: records.iter().map(|r| r.to_string()).collect(),
            stage: "main".into(),
            attempt_no: 1,
            custom_id: format!("b0123-{item_id}-1"),
            batch_id: "b0123".into(),
            provider_batch_id: None,
            attempt_state: if error.is_some() {
                AttemptState::Failed
            } else {
                AttemptState::Succeeded
            },
            verdict: error.map(|_| "schema_invalid".to_string()),
            error: error.map(str::to_string),
            model: None,
            input_tokens: Some(item_id * 1_000),
            cached_input_tokens: None,
            cache_write_tokens: None,
            output_tokens: Some(7),
            reasoning_tokens: None,
            cost_pico,
        }
    }

    /// `report --items` of a large run prints its attempts a page at a time: the pages at
    /// the widths taken from all of them are the table of all the rows at once, byte for
    /// byte, whichever page holds the widest cell.
    #[test]
    fn the_audit_printed_in_pages_is_the_audit_printed_whole() {
        let rows = vec![
            row(1, &["a"], None, Some(35_250_000)),
            row(
                22,
                &["sku-1", "sku-2"],
                Some("expected `category` to be one of …, got \"misc\""),
                None,
            ),
            row(333_333, &[], None, Some(1)),
            row(
                4,
                &["a-much-longer-record-id-than-the-others"],
                None,
                Some(123_456_789_012),
            ),
        ];
        let whole = audit_text(&rows, None);
        for pages in [
            vec![&rows[..1], &rows[1..]],
            vec![&rows[..2], &rows[2..3], &rows[3..]],
        ] {
            let mut widths = AuditWidths::default();
            for p in &pages {
                widths.observe(p);
            }
            let widths = widths.within(None);
            let paged: String = pages
                .iter()
                .enumerate()
                .map(|(i, p)| audit_text_page(p, &widths, i == 0))
                .collect();
            assert_eq!(paged, whole);
        }
    }

    /// On a terminal too narrow for the widest cells, the pages fit its width: the widest
    /// columns are narrowed (their text wraps), every line of every page within the width.
    #[test]
    fn the_audit_in_pages_fits_a_narrow_terminal() {
        let rows = vec![
            row(
                1,
                &["a-much-longer-record-id-than-the-others"],
                None,
                Some(1),
            ),
            row(2, &["b"], Some(&"a long reason ".repeat(8)), None),
        ];
        let mut widths = AuditWidths::default();
        widths.observe(&rows);
        let wide = widths.within(None);
        let narrow = widths.within(Some(100));
        let text = audit_text_page(&rows, &narrow, true) + &audit_text_page(&rows, &narrow, false);
        assert!(text.lines().all(|l| l.chars().count() <= 100), "{text}");
        let unwrapped = audit_text_page(&rows, &wide, true);
        assert!(unwrapped.lines().any(|l| l.chars().count() > 100));
        // A header and a line per row; narrowed, the rows wrap.
        assert_eq!(unwrapped.lines().count(), 3, "{unwrapped}");
        assert!(audit_text_page(&rows, &narrow, true).lines().count() > 3);
    }
}
