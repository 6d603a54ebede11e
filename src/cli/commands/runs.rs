//! `nightshift runs`: the latest runs, one line each.

use crate::cli::args::RunsArgs;
use crate::cli::exit::{EXIT_OK, Exit};
use crate::cli::session::{open_existing, pipeline_name};
use crate::report::{self, RunReport};
use crate::store::Store;

pub(crate) async fn run(a: RunsArgs) -> Result<i32, Exit> {
    let store = open_existing(&a.db, a.file.as_deref()).await?;
    let pipeline = pipeline_name(a.file.as_deref())?;
    let runs = store
        .recent_runs(pipeline.as_deref(), a.limit.max(1))
        .await?;
    let mut reports = Vec::with_capacity(runs.len());
    for run in runs {
        reports.push(RunReport::load(&store, run).await?);
    }
    if a.json {
        let list: Vec<_> = reports.iter().map(RunReport::to_json).collect();
        println!(
            "{}",
            serde_json::json!({"store": store.location(), "runs": list})
        );
        return Ok(EXIT_OK);
    }
    if reports.is_empty() {
        println!("no run in this store yet");
        return Ok(EXIT_OK);
    }
    print!("{}", report::runs_table(&reports, report::terminal_width()));
    Ok(EXIT_OK)
}
