//! `nightshift plan`: the cost worksheet of a pipeline, before anything is spent.

use std::collections::HashSet;

use crate::cli::args::{Format, PlanArgs};
use crate::cli::exit::{EXIT_CONFIG, EXIT_OK, Exit, exit};
use crate::cli::session::{StoreLoc, load_pipeline, open_store, store_loc};
use crate::cost::PriceTable;
use crate::cost::tokens::PromptCounter;
use crate::plan::{History, StageFacts, StagesFacts};
use crate::store::Store;
use crate::worker::{self};

/// What the store says of a multi-stage pipeline's later stages.
struct LaterStore {
    /// Per later stage: its history and what a `when` chose last time.
    history: Vec<(History, Option<(u64, u64)>)>,
    /// Per later stage: the ids of the records whose work there was done in the latest run.
    done_ids: Vec<HashSet<String>>,
    /// That run.
    latest_run: Option<String>,
}

pub(crate) async fn run(a: PlanArgs) -> Result<i32, Exit> {
    let p = load_pipeline(&a.file)?;
    let pricing_file = a.pricing.clone().or(p.pricing_file.clone());
    let prices =
        PriceTable::builtin_with(pricing_file.as_deref()).map_err(|e| exit(EXIT_CONFIG, e))?;
    let first = p.first_stage();
    let stage_prices = p.stage_prices(&prices).map_err(|e| exit(EXIT_CONFIG, e))?;
    let price = stage_prices[0].clone();
    // Only the request shapes and the token counters are needed: no key, no connection.
    let codec = crate::provider::Codec::for_config(&p.provider);
    let mut counters: Vec<PromptCounter> = Vec::new();
    let mut shape = None;
    for s in &p.stages {
        let validator = crate::validate::OutputValidator::load(&s.schema)
            .map_err(|e| exit(EXIT_CONFIG, anyhow::anyhow!(e)))?;
        let name = worker::stage_schema_name(&p, s);
        let spec = worker::spec(s, validator.schema(), &name);
        if shape.is_none() {
            shape = Some(
                codec
                    .request_shape(&spec)
                    .map_err(|e| exit(EXIT_CONFIG, anyhow::anyhow!(e)))?,
            );
        }
        counters.push(codec.prompt_counter(&spec));
    }
    let shape = shape.expect("a pipeline has a stage");
    let counter = counters[0];
    let scan = crate::plan::scan_source(&p, &shape, &counter)?;
    // The store, when there is one, knows what is done and what earlier runs measured.
    let loc = store_loc(&a.db, Some(&a.file));
    let exists = match &loc {
        StoreLoc::Sqlite(path) => path.exists(),
        StoreLoc::Postgres(_) => true,
    };
    let (done, history, later) = if exists {
        let store = open_store(&loc, Some(&a.file), None).await?.store;
        let keys: Vec<[u8; 32]> = scan.items.keys().copied().collect();
        let done: HashSet<[u8; 32]> = store
            .succeeded_among(&p.name, &first.name, &keys)
            .await?
            .into_iter()
            .collect();
        let history = store.history(&p.name, &first.name).await?;
        let later = if p.is_multi_stage() {
            let latest_run = store.last_run(Some(&p.name)).await?.map(|r| r.id);
            let mut done_ids = Vec::new();
            for s in &p.stages[1..] {
                done_ids.push(match &latest_run {
                    Some(run) => store
                        .stage_done_records(run, &s.name)
                        .await?
                        .into_iter()
                        .collect(),
                    None => HashSet::new(),
                });
            }
            Some(LaterStore {
                history: crate::plan::later_history(&store, &p, None).await?,
                done_ids,
                latest_run,
            })
        } else {
            None
        };
        store.close().await;
        (done, history, later)
    } else {
        (Default::default(), Default::default(), None)
    };
    let mut todo_tokens = Vec::new();
    let mut todo_records = 0;
    for (key, (tokens, records)) in &scan.items {
        if !done.contains(key) {
            todo_tokens.push(*tokens);
            todo_records += records;
        }
    }
    let stages = p.is_multi_stage().then(|| {
        // A record is done at the first stage when every one of its items there succeeded;
        // at a later stage, when it is done at the first and the latest run's links say
        // that stage's items for it succeeded (or it was skipped there).
        let first_done: Vec<bool> = scan
            .records
            .iter()
            .map(|(_, keys)| keys.iter().all(|k| done.contains(k)))
            .collect();
        todo_records = first_done.iter().filter(|d| !**d).count() as u64;
        let later = (0..p.stages.len() - 1)
            .map(|k| {
                let (records_done, done_source) = match &later {
                    Some(l) if !l.done_ids[k].is_empty() => (
                        scan.records
                            .iter()
                            .zip(&first_done)
                            .filter(|((id, _), d)| **d && l.done_ids[k].contains(id))
                            .count() as u64,
                        format!(
                            "done at the first stage, and the latest run ({}) has this stage's items for them succeeded, or skipped",
                            l.latest_run.as_deref().map(crate::report::short_run_id).unwrap_or_default()
                        ),
                    ),
                    Some(_) => (
                        0,
                        "no earlier run got to this stage for these records".to_string(),
                    ),
                    None => (0, "no store yet".to_string()),
                };
                let (history, ran) = later
                    .as_ref()
                    .map(|l| l.history[k])
                    .unwrap_or_default();
                StageFacts {
                    price: &stage_prices[k + 1],
                    exact_tokens: counters[k + 1].is_exact(),
                    fixed_tokens: counters[k + 1].fixed,
                    scan: scan.later[k].clone(),
                    records_done,
                    done_source,
                    history,
                    ran,
                }
            })
            .collect();
        StagesFacts {
            first_links: scan.first_links,
            later,
        }
    });
    let ws = crate::plan::Worksheet::compute(crate::plan::PlanInputs {
        pipeline: &p,
        price: &price,
        mode: p.provider.pricing_mode(),
        exact_tokens: counter.is_exact(),
        records_read: scan.records_read,
        quarantined: scan.quarantined,
        unique_items: scan.items.len() as u64,
        already_done: done.len() as u64,
        todo_tokens: todo_tokens.into_iter().collect(),
        todo_records,
        job_tokens: scan.items.values().map(|(t, _)| *t).collect(),
        job_records: scan.valid(),
        history,
        monthly_items: a.monthly_items,
        backfill_items: a.backfill_items,
        stages,
    });
    let format = if a.json {
        Format::Json
    } else if a.csv {
        Format::Csv
    } else if a.markdown {
        Format::Markdown
    } else {
        a.format
    };
    match format {
        Format::Table => print!("{}", ws.to_table()),
        Format::Json => println!("{}", ws.to_json()),
        Format::Csv => print!("{}", ws.to_csv()),
        Format::Markdown => print!("{}", ws.to_markdown()),
    }
    Ok(EXIT_OK)
}
