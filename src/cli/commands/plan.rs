//! `nightshift plan`: the cost worksheet of a pipeline, before anything is spent.

use crate::cli::args::{Format, PlanArgs};
use crate::cli::exit::{EXIT_CONFIG, EXIT_OK, Exit, exit};
use crate::cli::session::{StoreLoc, load_pipeline, open_store, store_loc};
use crate::cost::PriceTable;
use crate::store::Store;
use crate::worker::{self};

pub(crate) async fn run(a: PlanArgs) -> Result<i32, Exit> {
    let p = load_pipeline(&a.file)?;
    let pricing_file = a.pricing.clone().or(p.pricing_file.clone());
    let prices =
        PriceTable::builtin_with(pricing_file.as_deref()).map_err(|e| exit(EXIT_CONFIG, e))?;
    let first = p.first_stage();
    let price = prices
        .lookup(p.provider.kind.as_str(), &first.model)
        .map_err(|e| exit(EXIT_CONFIG, e))?
        .clone();
    let validator = crate::validate::OutputValidator::load(&first.schema)
        .map_err(|e| exit(EXIT_CONFIG, anyhow::anyhow!(e)))?;
    // Only the request shape and the token counter are needed: no key, no connection.
    let codec = crate::provider::Codec::for_config(&p.provider);
    let name = worker::stage_schema_name(&p, first);
    let spec = worker::spec(first, validator.schema(), &name);
    let shape = codec
        .request_shape(&spec)
        .map_err(|e| exit(EXIT_CONFIG, anyhow::anyhow!(e)))?;
    let counter = codec.prompt_counter(&spec);
    let scan = crate::plan::scan_source(&p, &shape, &counter)?;
    // The store, when there is one, knows what is done and what earlier runs measured.
    let loc = store_loc(&a.db, Some(&a.file));
    let exists = match &loc {
        StoreLoc::Sqlite(path) => path.exists(),
        StoreLoc::Postgres(_) => true,
    };
    let (done, history) = if exists {
        let store = open_store(&loc, Some(&a.file), None).await?.store;
        let keys: Vec<[u8; 32]> = scan.items.keys().copied().collect();
        let done: std::collections::HashSet<[u8; 32]> = store
            .succeeded_among(&p.name, &first.name, &keys)
            .await?
            .into_iter()
            .collect();
        let history = store.history(&p.name, &first.name).await?;
        store.close().await;
        (done, history)
    } else {
        (Default::default(), Default::default())
    };
    let mut todo_tokens = Vec::new();
    let mut todo_records = 0;
    for (key, (tokens, records)) in &scan.items {
        if !done.contains(key) {
            todo_tokens.push(*tokens);
            todo_records += records;
        }
    }
    let ws = crate::plan::Worksheet::compute(crate::plan::PlanInputs {
        pipeline: &p,
        price: &price,
        mode: p.provider.pricing_mode(),
        exact_tokens: counter.is_exact(),
        records_read: scan.records_read,
        quarantined: scan.quarantined,
        unique_items: scan.items.len() as u64,
        already_done: done.len() as u64,
        todo_tokens,
        todo_records,
        job_tokens: scan.items.values().map(|(t, _)| *t).collect(),
        job_records: scan.valid(),
        history,
        monthly_items: a.monthly_items,
        backfill_items: a.backfill_items,
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
