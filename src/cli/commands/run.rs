//! `nightshift run`: one run of a pipeline, its summary, and its exit code.

use std::io::IsTerminal;

use anyhow::Context;

use crate::cli::args::RunArgs;
use crate::cli::exit::{EXIT_CONFIG, Exit, exit, run_error_exit};
use crate::cli::progress::{BarObserver, LineObserver};
use crate::cli::session::{Membership, prepare, record_sim_bill, watch_signals};
use crate::report::RunReport;
use crate::store::Store;
use crate::worker::{self, Observer, RunContext};

pub(crate) async fn run(a: RunArgs, json_logs: bool) -> Result<i32, Exit> {
    // Arguments first: a bad flag is reported before anything starts.
    let lease = a.lease.duration()?;
    let budget_flag = match &a.budget_usd {
        Some(text) => Some(
            crate::cost::Usd::parse(text)
                .ok()
                .filter(|u| u.pico() > 0)
                .ok_or_else(|| {
                    exit(
                        EXIT_CONFIG,
                        anyhow::anyhow!(
                            "--budget-usd: `{text}` is not an amount of dollars above 0 (e.g. 25 or 0.50)"
                        ),
                    )
                })?,
        ),
        None => None,
    };
    if let Some(out) = &a.out {
        crate::worker::OutputFormat::for_path(out)
            .map_err(|e| exit(EXIT_CONFIG, anyhow::anyhow!("--out: {e}")))?;
    }
    if let Some(path) = &a.metrics_textfile
        && path.is_dir()
    {
        return Err(exit(
            EXIT_CONFIG,
            anyhow::anyhow!(
                "--metrics-textfile: {} is a folder; name a file (e.g. nightshift.prom)",
                path.display()
            ),
        ));
    }
    let what = format!("nightshift run {}", a.file.display());
    let pre = prepare(&a.file, &a.db, a.pricing.as_deref(), &what, lease).await?;
    let p = &pre.pipeline;
    let budget = crate::config::Budget {
        max: budget_flag.or(p.budget.max),
        max_item: p.budget.max_item,
    };
    let output_path = a.out.clone().unwrap_or_else(|| p.output.path.clone());
    // Checked before anything is paid for: the results must have somewhere to go.
    crate::worker::OutputFormat::for_path(&output_path)
        .map_err(|e| exit(EXIT_CONFIG, anyhow::anyhow!("output.path: {e}")))?;
    if output_path.is_dir() {
        return Err(exit(
            EXIT_CONFIG,
            anyhow::anyhow!(
                "the results file {} is a folder; name a file (output.path or --out)",
                output_path.display()
            ),
        ));
    }
    let progress = !a.no_progress && !json_logs && std::io::stderr().is_terminal();
    let observer: Box<dyn Observer> = if json_logs {
        Box::new(worker::LogObserver)
    } else if progress {
        Box::new(BarObserver::new())
    } else {
        Box::new(LineObserver)
    };
    let metrics = match (&a.metrics_textfile, &a.metrics_push) {
        (None, None) => None,
        _ => Some(start_metrics(&a, &p.name)?),
    };
    let observers = crate::worker::Observers(
        std::iter::once(observer.as_ref())
            .chain(metrics.as_ref().map(|m| &m.observer as &dyn Observer))
            .collect(),
    );
    let shutdown = worker::Shutdown::default();
    watch_signals(shutdown.clone());
    let member = Membership::join(&pre.store, "run", p.name.clone(), lease).await?;
    let ctx = RunContext {
        store: &pre.store,
        provider: &pre.client,
        pipeline: p,
        prices: &pre.prices,
        observer: &observers,
        work_dir: pre.work_dir.clone(),
        output_path,
        shutdown,
        detach: a.detach,
        ingest_only: a.ingest_only,
        budget,
        worker_id: member.info.id.clone(),
        lease: member.lease,
    };
    let outcome = worker::run(&ctx).await;
    drop(observers);
    drop(observer);
    if let Some(m) = &metrics {
        let succeeded = outcome
            .as_ref()
            .is_ok_and(|o| o.status == crate::store::RunStatus::Completed);
        m.finish(succeeded).await;
    }
    let store = &pre.store;
    // `[cleanup] after_run`: a run that finished deletes what ingested batches left behind.
    let cleanup_opts = worker::GcOptions {
        older_than: p.cleanup.older_than,
        dry_run: false,
    };
    let cleanup = match &outcome {
        Ok(o)
            if p.cleanup.after_run
                && matches!(
                    o.status,
                    crate::store::RunStatus::Completed
                        | crate::store::RunStatus::Failed
                        | crate::store::RunStatus::Budget
                ) =>
        {
            Some(worker::gc(store, &pre.client, &p.name, &pre.work_dir, &cleanup_opts).await)
        }
        _ => None,
    };
    // Whatever is still open (detached, interrupted) goes to whoever works on it next.
    member.leave(store).await;
    if let Some(h) = pre.sim {
        record_sim_bill(store, &h).await?;
        h.stop().await;
    }
    let outcome = outcome.map_err(run_error_exit)?;
    let run = store
        .run(&outcome.run_id)
        .await?
        .context("the run row vanished")?;
    let rep = RunReport::load(store, run).await?;
    print!("{}", rep.to_text());
    if outcome.wrote_output {
        println!("  results    {}", outcome.output_path.display());
    } else {
        println!(
            "  results    {} left as it was",
            outcome.output_path.display()
        );
    }
    // The HTML report is a view: a failure to write it is said, never the run's outcome.
    if let Some(path) = &p.report.html {
        match crate::report::write_html(store, &rep, path).await {
            Ok(()) => println!("  report     {}", path.display()),
            Err(e) => {
                if json_logs {
                    tracing::warn!(path = %path.display(), "{e:#}");
                } else {
                    eprintln!("{} {e:#}", crate::cli::label("warning"));
                }
            }
        }
    }
    // The clean-up never changes the run's exit code: what it could not delete, the next
    // clean-up tries again.
    match cleanup {
        Some(Ok(rep)) => {
            for line in crate::cli::commands::gc::to_text(&rep, &cleanup_opts, &p.name).lines() {
                println!("  cleanup    {line}");
            }
        }
        Some(Err(e)) => eprintln!("{} cleanup: {e}", crate::cli::label("warning")),
        None => {}
    }
    if outcome.status == crate::store::RunStatus::Detached {
        println!("detached {}", outcome.run_id);
    }
    // A run that could not do its job says why where errors go, for cron and for people.
    if outcome.status == crate::store::RunStatus::Error
        && let Some(m) = &outcome.message
    {
        if json_logs {
            tracing::error!(exit_code = outcome.exit_code, "{m}");
        } else {
            eprintln!("{} {m}", crate::cli::label("error"));
        }
    }
    store.close().await;
    Ok(outcome.exit_code)
}

/// The run's metrics: the observer that feeds them, where they go when the run ends.
struct RunMetrics {
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    observer: crate::metrics::MetricsObserver,
    push: Option<url::Url>,
}

/// Checks the metrics flags and writes a first textfile, so a path that cannot be written
/// stops the run before anything is spent.
fn start_metrics(a: &RunArgs, pipeline: &str) -> Result<RunMetrics, Exit> {
    let push = match &a.metrics_push {
        Some(u) => Some(
            crate::metrics::push_url(u, pipeline)
                .map_err(|e| exit(EXIT_CONFIG, anyhow::anyhow!("--metrics-push: {e}")))?,
        ),
        None => None,
    };
    let metrics = crate::metrics::Metrics::new();
    if let Some(path) = &a.metrics_textfile {
        metrics.carry_last_success(pipeline, path);
    }
    let observer = metrics.observer(pipeline, a.metrics_textfile.clone());
    if let (Some(path), Err(e)) = (&a.metrics_textfile, observer.write_textfile()) {
        return Err(exit(
            EXIT_CONFIG,
            anyhow::anyhow!("--metrics-textfile: cannot write {}: {e}", path.display()),
        ));
    }
    Ok(RunMetrics {
        metrics,
        observer,
        push,
    })
}

impl RunMetrics {
    /// The run ended: the textfile gets its final figures and the Pushgateway its one push.
    /// Neither failing fails the run: the work is done and paid for.
    async fn finish(&self, succeeded: bool) {
        if let Err(e) = self.observer.write_textfile() {
            crate::cli::warn(format!("--metrics-textfile: {e}"));
        }
        if let Some(url) = &self.push
            && let Err(e) = crate::metrics::push(url, self.metrics.render(), succeeded).await
        {
            crate::cli::warn(format!("--metrics-push: {e}"));
        }
    }
}
