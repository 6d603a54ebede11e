//! `nightshift reconcile`: plan vs actual, and the ledger vs the provider's own figures.

use anyhow::Context;

use crate::cli::args::ReconcileArgs;
use crate::cli::exit::{EXIT_OK, Exit};
use crate::cli::session::{open_existing, pipeline_name, resolve_run};
use crate::report::{self};

pub(crate) async fn run(a: ReconcileArgs) -> Result<i32, Exit> {
    let store = open_existing(&a.db, a.file.as_deref()).await?;
    let pipeline = pipeline_name(a.file.as_deref())?;
    let run = resolve_run(&store, a.run.as_deref(), pipeline.as_deref()).await?;
    let live = match &a.sim_url {
        Some(url) => {
            let url = format!(
                "{}/_sim/record",
                url.trim_end_matches('/').trim_end_matches("/v1")
            );
            let v: serde_json::Value = reqwest::get(&url)
                .await
                .with_context(|| format!("reading the simulator's record at {url}"))?
                .json()
                .await
                .context("the simulator's record is not JSON")?;
            Some(v)
        }
        None => None,
    };
    let r = crate::reconcile::reconcile(&store, &run, live.as_ref()).await?;
    if a.json {
        println!("{}", r.to_json());
    } else {
        print!("{}", r.to_text(report::terminal_width()));
    }
    Ok(EXIT_OK)
}
