//! The stages of a run: what each one needs at run time ([`StageRun`]: its request shape,
//! validator, prices, prompt counter and tokenizer; rendering a record's items is
//! `crate::stage`'s), and advancing records: once every item a record needs at the earlier
//! stages has succeeded, its items of the next stage are rendered from the record and those
//! results and stored (insert-or-ignore, so a repeat after a kill or by another worker
//! changes nothing). A needed item that failed for good leaves the record failed: its later
//! stages are never created, so never sent nor paid for.

use serde_json::{Map, Value};

use super::{Event, RunContext, RunError, Runner, spec, stage_schema_name};
use crate::config::Stage;
use crate::cost::tokens::{PromptCounter, Tokenizer};
use crate::cost::{PricingMode, Rates};
use crate::provider::BatchProvider;
use crate::request::RequestShape;
use crate::stage::{Renderer, in_sample};
use crate::store::{IngestTarget, LinkRow, NewLinks, ReadyRecord, StageLink, Store};
use crate::validate::OutputValidator;

/// Records read per page when advancing (a page's lines are one statement's list).
const ADVANCE_PAGE: u32 = 500;

/// Bytes of record fields a page read when advancing may hold at most, as the source's
/// record cap counts them: SQLite hands a page over as one text value, and a text value
/// is at most 1,000,000,000 bytes there. Records of the default cap (1 MiB) fill a page of
/// [`ADVANCE_PAGE`]; larger ones make the page smaller.
const ADVANCE_PAGE_BYTES: usize = 512 << 20;

/// Records read per page when advancing, for records of at most `max_record_bytes`.
fn advance_page(max_record_bytes: usize) -> u32 {
    let fit = ADVANCE_PAGE_BYTES / max_record_bytes.max(1);
    u32::try_from(fit)
        .unwrap_or(u32::MAX)
        .clamp(1, ADVANCE_PAGE)
}

/// Records whose next-stage items are stored per transaction: several pages. A later
/// stage's items are new keys in the dedupe index, which are random, so each transaction
/// rewrites (and checkpoints) pages all over that index, however few items it adds. A
/// two-stage run of 100,000 records wrote 3.2 GB for a 360 MB store at a page (500
/// records) a transaction, 2.6 GB at 5,000, for about 5 % less CPU; 20,000 saved 1 % more.
/// What is rendered waits in memory until it is stored: the user prompts of 5,000 records,
/// or fewer records once their prompts reach [`ADVANCE_TX_BYTES`] (a summary of long
/// documents renders several KB a record).
const ADVANCE_TX: usize = 5_000;

/// Bytes of rendered user prompts held before they are stored, whatever the record count.
const ADVANCE_TX_BYTES: usize = 8 << 20;

/// What one stage needs at run time.
pub(crate) struct StageRun {
    pub(crate) stage: Stage,
    pub(crate) validator: OutputValidator,
    pub(crate) shape: RequestShape,
    pub(crate) counter: PromptCounter,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) batch_rates: Rates,
    pub(crate) standard_rates: Rates,
}

impl StageRun {
    pub(crate) fn new<S: Store, P: BatchProvider>(
        ctx: &RunContext<'_, S, P>,
        index: usize,
    ) -> Result<StageRun, RunError> {
        let p = ctx.pipeline;
        let stage = &p.stages[index];
        let validator = OutputValidator::load(&stage.schema).map_err(RunError::Config)?;
        let price = ctx.prices.get(index).ok_or_else(|| {
            RunError::Config(format!("no price given for stage `{}`", stage.name))
        })?;
        let mode = p.provider.pricing_mode();
        let batch_rates = match (mode, price.batch) {
            (_, Some(b)) => b,
            // Online only: batch prices are never needed.
            (PricingMode::Standard, None) => price.standard,
            (PricingMode::Batch, None) => {
                return Err(RunError::Config(format!(
                    "model `{}` has no batch price",
                    stage.model
                )));
            }
        };
        let name = stage_schema_name(p, stage);
        let codec = ctx.provider.codec();
        let s = spec(stage, validator.schema(), &name);
        let shape = codec.request_shape(&s).map_err(RunError::Config)?;
        let counter = codec.prompt_counter(&s);
        Ok(StageRun {
            stage: stage.clone(),
            validator,
            shape,
            counter,
            tokenizer: Tokenizer::for_model(&stage.model),
            batch_rates,
            standard_rates: price.standard,
        })
    }

    pub(crate) fn rates(&self, mode: PricingMode) -> &Rates {
        match mode {
            PricingMode::Batch => &self.batch_rates,
            PricingMode::Standard => &self.standard_rates,
        }
    }

    /// What rendering the stage needs, to be moved to a blocking thread.
    pub(crate) fn renderer(&self) -> Renderer {
        Renderer::new(
            self.stage.clone(),
            self.shape.clone(),
            self.counter,
            self.tokenizer,
        )
    }

    /// Whether the stage runs for a record whatever its fields and earlier answers say: it
    /// runs for every record, or the record is in its sample (by a hash of the stage and the
    /// record id, the same on every machine). Otherwise it runs for the record when its
    /// `when` holds ([`StageRun::when_holds`]).
    fn sampled(&self, record_id: &str) -> bool {
        let s = &self.stage;
        s.for_every_record()
            || s.sample
                .is_some_and(|share| in_sample(&s.name, record_id, share))
    }

    /// Whether the stage's `when` holds for a record's template context (false without one).
    fn when_holds(&self, context: &Value) -> Result<bool, String> {
        match &self.stage.when {
            Some(w) => w.render(context).map(|out| out == "true").map_err(|e| {
                format!(
                    "when `{}`: {e}",
                    self.stage.when_text.as_deref().unwrap_or("")
                )
            }),
            None => Ok(false),
        }
    }
}

/// The template context of a record at a later stage: its fields, and under each needed
/// stage's name that stage's result (a chunk stage's as an array in chunk order).
pub(crate) fn context_of(
    data: &str,
    needs: &[String],
    chunked: impl Fn(&str) -> bool,
    inputs: &[LinkRow],
) -> Result<Value, String> {
    let mut ctx = match serde_json::from_str::<Value>(data) {
        Ok(Value::Object(m)) => m,
        Ok(_) => Map::new(),
        Err(e) => return Err(format!("the stored record is not JSON: {e}")),
    };
    for need in needs {
        let mut results = Vec::new();
        for l in inputs.iter().filter(|l| &l.stage == need) {
            let v = match &l.result {
                Some(text) => serde_json::from_str(text)
                    .map_err(|e| format!("the result of `{need}` is not JSON: {e}"))?,
                None => Value::Null,
            };
            results.push(v);
        }
        let v = if chunked(need) {
            Value::Array(results)
        } else {
            results.into_iter().next().unwrap_or(Value::Null)
        };
        ctx.insert(need.clone(), v);
    }
    Ok(Value::Object(ctx))
}

impl<S: Store, P: BatchProvider> Runner<'_, S, P> {
    /// Creates the items of every later stage for the records whose needed items have all
    /// succeeded, among the records at `lines` (ascending) or, with `None`, every record of
    /// the run; returns how many items are new.
    pub(super) async fn advance(&mut self, lines: Option<&[i64]>) -> Result<u64, RunError> {
        let ctx = self.ctx;
        let p = ctx.pipeline;
        if !p.is_multi_stage() || self.run_id.is_empty() {
            return Ok(0);
        }
        self.regenerate_failed_reviews().await?;
        let mut created = 0;
        for index in 1..self.stages.len() {
            let shape_id = ctx.store.ensure_shape(&self.stages[index].shape).await?;
            // One pass in line order: a record passed over is not ready in this pass.
            let mut after = 0;
            let page = advance_page(p.source.max_record_bytes);
            let mut pages = lines.map(|l| l.chunks(page as usize));
            // Rendered, not stored yet: stored every [`ADVANCE_TX`] records (or
            // [`ADVANCE_TX_BYTES`] of prompts) and at the end.
            let mut waiting: Vec<NewLinks> = Vec::new();
            let mut waiting_bytes = 0;
            loop {
                if ctx.shutdown.is_set() {
                    created += self.store_links(index, shape_id, &mut waiting).await?;
                    return Ok(created);
                }
                let sr = &self.stages[index];
                let (name, needs) = (&sr.stage.name, &sr.stage.needs);
                let ready = match &mut pages {
                    Some(pages) => match pages.next() {
                        Some(page) => {
                            ctx.store
                                .ready_records_at(&self.run_id, name, needs, page)
                                .await?
                        }
                        None => break,
                    },
                    None => {
                        let ready = ctx
                            .store
                            .ready_records(&self.run_id, name, needs, after, page)
                            .await?;
                        match ready.last() {
                            Some(last) => after = last.line,
                            None => break,
                        }
                        ready
                    }
                };
                if ready.is_empty() {
                    continue;
                }
                let links = self.links_for(index, &ready);
                waiting_bytes += links.iter().map(prompt_bytes).sum::<usize>();
                waiting.extend(links);
                if waiting.len() >= ADVANCE_TX || waiting_bytes >= ADVANCE_TX_BYTES {
                    created += self.store_links(index, shape_id, &mut waiting).await?;
                    waiting_bytes = 0;
                }
            }
            created += self.store_links(index, shape_id, &mut waiting).await?;
        }
        Ok(created)
    }

    /// Stores what stage `index` became for the records in `links` (one transaction) and
    /// empties it; returns how many items are new.
    async fn store_links(
        &self,
        index: usize,
        shape_id: i64,
        links: &mut Vec<NewLinks>,
    ) -> Result<u64, RunError> {
        if links.is_empty() {
            return Ok(0);
        }
        let ctx = self.ctx;
        let name = &self.stages[index].stage.name;
        // Results are stored, the next stage's items not yet: a crash here leaves the
        // records ready for whichever process advances next.
        crate::failpoint!("advance.before_links");
        let target = IngestTarget {
            run_id: &self.run_id,
            pipeline: &ctx.pipeline.name,
            stage: name,
            shape_id,
            source: "",
            links: true,
        };
        let new = ctx.store.add_links(&target, links).await?;
        crate::failpoint!("advance.after_commit");
        let failed = links
            .iter()
            .filter(|l| matches!(l.link, StageLink::Failed(_)))
            .count();
        if failed > 0 {
            ctx.observer.event(&Event::Note(format!(
                "{failed} record(s) cannot go on to stage `{name}`: see `nightshift report --items`"
            )));
        }
        links.clear();
        Ok(new)
    }

    /// `on_fail = "regenerate"`: each item whose review failed is sent again, once, as
    /// another attempt of its stage; the stages after it are rendered again from its new
    /// result (a second failed review only flags the record).
    async fn regenerate_failed_reviews(&mut self) -> Result<(), RunError> {
        let ctx = self.ctx;
        let p = ctx.pipeline;
        for s in &p.stages {
            if s.on_fail != Some(crate::config::OnFail::Regenerate) {
                continue;
            }
            let Some(reviewed) = s.needs.first() else {
                continue;
            };
            let failed = ctx
                .store
                .failed_reviews(&self.run_id, &s.name, reviewed)
                .await?;
            if failed.is_empty() {
                continue;
            }
            let later = later_stages(p, reviewed);
            let mut sent_again = 0;
            for (item_id, review) in failed {
                let v: Value = serde_json::from_str(&review).unwrap_or(Value::Null);
                if v.get("pass").and_then(Value::as_bool) != Some(false) {
                    continue;
                }
                let issues = v
                    .get("issues")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
                    .unwrap_or_default();
                let reason = format!("review `{}` failed: {issues}", s.name);
                if ctx
                    .store
                    .regenerate(&self.run_id, item_id, &later, &reason)
                    .await?
                {
                    sent_again += 1;
                }
            }
            if sent_again > 0 {
                ctx.observer.event(&Event::Note(format!(
                    "{sent_again} item(s) of stage `{reviewed}` failed review `{}` and go again (once)",
                    s.name
                )));
            }
        }
        Ok(())
    }

    /// What stage `index` becomes for each ready record.
    fn links_for(&self, index: usize, ready: &[ReadyRecord]) -> Vec<NewLinks> {
        let sr = &self.stages[index];
        let stages = &self.stages;
        let chunked = |name: &str| {
            stages
                .iter()
                .any(|s| s.stage.name == name && s.stage.is_chunked())
        };
        let renderer = sr.renderer();
        let mut scratch = String::new();
        ready
            .iter()
            .map(|r| {
                let sampled = sr.sampled(&r.record_id);
                let link = if r.inputs.iter().any(|l| l.item_id.is_none()) {
                    // A needed stage did not run for the record: neither does this one.
                    StageLink::Skipped
                } else if !sampled && sr.stage.when.is_none() {
                    // Out of the sample, with no `when` to ask: skipped without parsing the
                    // record's fields and answers (most records, at a sample of 5 %).
                    StageLink::Skipped
                } else {
                    match context_of(&r.data, &sr.stage.needs, chunked, &r.inputs) {
                        Err(why) => StageLink::Failed(why),
                        Ok(context) => {
                            let runs = if sampled {
                                Ok(true)
                            } else {
                                sr.when_holds(&context)
                            };
                            match runs {
                                Err(why) => StageLink::Failed(why),
                                Ok(false) => StageLink::Skipped,
                                Ok(true) => match renderer.render(&context, &mut scratch) {
                                    Ok(items) => StageLink::Items { items },
                                    Err(f) => StageLink::Failed(f.reason),
                                },
                            }
                        }
                    }
                };
                let mut parents: Vec<i64> = r.inputs.iter().filter_map(|l| l.item_id).collect();
                parents.sort_unstable();
                parents.dedup();
                NewLinks {
                    line: r.line,
                    link,
                    parents,
                }
            })
            .collect()
    }
}

/// Bytes of the user prompts a record's new links hold.
fn prompt_bytes(l: &NewLinks) -> usize {
    match &l.link {
        StageLink::Items { items } => items.iter().map(|it| it.user_json.len()).sum(),
        StageLink::Skipped | StageLink::Failed(_) => 0,
    }
}

/// The stages that need `stage`, directly or through another stage, in pipeline order.
pub(crate) fn later_stages(p: &crate::config::Pipeline, stage: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in &p.stages {
        if s.needs.iter().any(|n| n == stage || out.contains(n)) {
            out.push(s.name.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page of records read when advancing fits in one SQLite text value (10⁹ bytes), with
    /// room for the ids, the separators and fields that grow when stored again, at any
    /// record cap the pipeline file accepts (64 bytes to 256 MiB).
    #[test]
    fn an_advance_page_fits_in_one_text_value_at_any_record_cap() {
        assert_eq!(
            advance_page(crate::config::DEFAULT_MAX_RECORD_BYTES),
            ADVANCE_PAGE
        );
        assert_eq!(advance_page(64), ADVANCE_PAGE);
        for cap in [2 << 20, 10 << 20, 256 << 20] {
            let page = advance_page(cap) as usize;
            assert!(page >= 1 && page < ADVANCE_PAGE as usize, "{cap}: {page}");
            assert!(page * cap <= 600_000_000, "{cap}: {page}");
        }
    }

    #[test]
    fn a_chunk_stage_result_is_an_array_in_chunk_order() {
        let link = |stage: &str, chunk: i64, result: &str| LinkRow {
            line: 1,
            stage: stage.into(),
            chunk,
            item_id: Some(chunk + 10),
            state: None,
            attempts: None,
            result: Some(result.into()),
            last_error: None,
            error: None,
            cost_pico: 0,
            sharers: 1,
        };
        let inputs = vec![
            link("notes", 0, r#"{"p":1}"#),
            link("notes", 1, r#"{"p":2}"#),
            link("summary", 0, r#"{"s":"x"}"#),
        ];
        let v = context_of(
            r#"{"id":"d1","title":"T"}"#,
            &["notes".into(), "summary".into()],
            |n| n == "notes",
            &inputs,
        )
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id":"d1","title":"T","notes":[{"p":1},{"p":2}],"summary":{"s":"x"}})
        );
    }
}
