//! `nightshift cancel`: cancel the batches in flight and record what they were billed.

use std::path::PathBuf;

use crate::cli::args::CancelArgs;
use crate::cli::exit::{EXIT_OK, Exit, run_error_exit};
use crate::cli::progress::LineObserver;
use crate::cli::session::{
    Membership, open_existing, prepare, record_sim_bill, resolve_run, watch_signals,
};
use crate::util::text;
use crate::worker::{self, RunContext};

pub(crate) async fn run(a: CancelArgs) -> Result<i32, Exit> {
    let lease = a.lease.duration()?;
    // The pipeline names the provider and its key: from the argument, or the run's record.
    let (file, run_id) = {
        let store = open_existing(&a.db, a.file.as_deref()).await?;
        let run = match &a.run {
            Some(prefix) => Some(resolve_run(&store, Some(prefix), None).await?),
            None => None,
        };
        let file = match (&a.file, &run) {
            (Some(f), _) => f.clone(),
            (None, Some(r)) => PathBuf::from(&r.pipeline_file),
            (None, None) => {
                let r = resolve_run(&store, None, None).await?;
                PathBuf::from(r.pipeline_file)
            }
        };
        store.close().await;
        (file, run.map(|r| r.id))
    };
    let what = format!("nightshift cancel {}", file.display());
    let pre = prepare(&file, &a.db, None, &what, lease).await?;
    let p = &pre.pipeline;
    let shutdown = worker::Shutdown::default();
    watch_signals(shutdown.clone());
    let member = Membership::join(&pre.store, "cancel", p.name.clone(), lease).await?;
    let ctx = RunContext {
        store: &pre.store,
        provider: &pre.client,
        pipeline: p,
        prices: &pre.prices,
        observer: &LineObserver,
        work_dir: pre.work_dir.clone(),
        output_path: p.output.path.clone(),
        shutdown,
        detach: false,
        ingest_only: false,
        budget: p.budget,
        worker_id: member.info.id.clone(),
        lease: member.lease,
    };
    let rep = worker::cancel(&ctx, run_id.as_deref(), !a.no_wait).await;
    member.leave(&pre.store).await;
    if let Some(h) = pre.sim {
        record_sim_bill(&pre.store, &h).await?;
        h.stop().await;
    }
    let rep = rep.map_err(run_error_exit)?;
    if rep.batches.is_empty() {
        println!("no batch in flight for pipeline `{}`", p.name);
        return Ok(EXIT_OK);
    }
    for (id, pid, what) in &rep.batches {
        println!(
            "{id}  {}  {}",
            pid.as_deref().unwrap_or("-"),
            text::printable(what)
        );
    }
    println!(
        "billed for requests that ran before the cancel: {} (input {} · cached {} · output {} tokens)",
        rep.billed.display_rounded(6),
        text::n(rep.usage.input_tokens),
        text::n(rep.usage.cached_input_tokens),
        text::n(rep.usage.output_tokens)
    );
    if rep.still_open > 0 {
        println!(
            "{} still cancelling at the provider; `nightshift run` collects them later",
            text::plural(rep.still_open as u64, "batch", "batches")
        );
    }
    println!(
        "their unfinished items go back to the queue: the next `nightshift run` sends them again"
    );
    pre.store.close().await;
    Ok(EXIT_OK)
}
