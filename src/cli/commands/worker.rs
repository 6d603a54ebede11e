//! `nightshift worker`: serve pipelines beside other workers on a shared PostgreSQL store.

use crate::cli::args::WorkerArgs;
use crate::cli::exit::{EXIT_CONFIG, EXIT_OK, Exit, exit, run_error_exit};
use crate::cli::progress::LineObserver;
use crate::cli::session::{
    Membership, StoreLoc, load_checked, open_store, pipeline_dir, provider_client, store_loc,
    watch_signals,
};
use crate::cli::{say, warn};
use crate::config::Pipeline;
use crate::store::{SqlStore, Store};
use crate::worker::{self, Observer, RunContext};

pub(crate) async fn run(a: WorkerArgs, json_logs: bool) -> Result<i32, Exit> {
    let loc = store_loc(&a.db, None);
    if !matches!(loc, StoreLoc::Postgres(_)) {
        return Err(exit(
            EXIT_CONFIG,
            anyhow::anyhow!(
                "`nightshift worker` shares a PostgreSQL store with other workers: pass --db postgres://… \
                 (or set NIGHTSHIFT_DB); with a SQLite store, use `nightshift run`"
            ),
        ));
    }
    // Signals first: a worker told to stop while it starts stops cleanly too.
    let shutdown = worker::Shutdown::default();
    watch_signals(shutdown.clone());
    let lease = a.lease.duration()?;
    let mut loaded = Vec::new();
    for file in &a.files {
        let (p, price, prices) = load_checked(file, a.pricing.as_deref())?;
        if p.provider.simulate {
            return Err(exit(
                EXIT_CONFIG,
                anyhow::anyhow!(
                    "{}: the built-in simulator (simulate = true) lives inside one process, so workers \
                     cannot share it; start `nightshift simulate` and point provider.base_url at it",
                    file.display()
                ),
            ));
        }
        if loaded
            .iter()
            .any(|(_, q, _, _): &(_, Pipeline, _, _)| q.name == p.name)
        {
            return Err(exit(
                EXIT_CONFIG,
                anyhow::anyhow!("pipeline `{}` is named twice", p.name),
            ));
        }
        if lease <= p.provider.request_timeout {
            warn(format!(
                "{}: the lease ({}s) should be well above provider.request_timeout_seconds ({}s), \
                 or a slow create may outlive it",
                file.display(),
                lease.as_secs_f64(),
                p.provider.request_timeout.as_secs_f64()
            ));
        }
        loaded.push((file.clone(), p, price, prices));
    }
    let store = open_store(&loc, None, None).await?.store;
    let stale_before =
        crate::util::time::now_ms() - 3 * i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 4);
    store.mark_stale_runs(stale_before).await?;
    let mut clients = Vec::new();
    for (_, p, _, prices) in &loaded {
        clients.push(
            provider_client(p, prices, &pipeline_dir(None).join(".nightshift"))
                .await?
                .0,
        );
    }
    let names: Vec<&str> = loaded.iter().map(|(_, p, _, _)| p.name.as_str()).collect();
    // One set of metrics for the process, fed by an observer per pipeline.
    let metrics = crate::metrics::Metrics::new();
    let listener = match a.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                exit(
                    EXIT_CONFIG,
                    anyhow::anyhow!("--metrics-listen: cannot listen on {addr}: {e}"),
                )
            })?;
            let bound = l.local_addr().map_err(|e| exit(EXIT_CONFIG, e))?;
            say(format!("metrics on http://{bound}/metrics"));
            Some(crate::metrics::serve(l, metrics.clone()))
        }
        None => None,
    };
    let member = Membership::join(&store, "worker", names.join(","), lease).await?;
    say(format!(
        "worker {} ({}, pid {}) on {}: serving {}; lease {}s",
        member.info.id,
        member.info.host,
        member.info.pid,
        store.location(),
        names.join(", "),
        lease.as_secs_f64()
    ));
    let observer: Box<dyn Observer> = if json_logs {
        Box::new(worker::LogObserver)
    } else {
        Box::new(LineObserver)
    };
    let metric_observers: Vec<_> = loaded
        .iter()
        .map(|(_, p, _, _)| metrics.observer(&p.name, None))
        .collect();
    let observers: Vec<worker::Observers<'_>> = metric_observers
        .iter()
        .map(|m| {
            worker::Observers(if a.metrics_listen.is_some() {
                vec![observer.as_ref(), m]
            } else {
                vec![observer.as_ref()]
            })
        })
        .collect();
    let ctxs: Vec<RunContext<'_, SqlStore, crate::provider::AnyProvider>> = loaded
        .iter()
        .zip(&clients)
        .zip(&observers)
        .map(|(((file, p, price, _), client), observer)| RunContext {
            store: &store,
            provider: client,
            pipeline: p,
            prices: price,
            observer,
            work_dir: pipeline_dir(Some(file)).join(".nightshift"),
            output_path: p.output.path.clone(),
            shutdown: shutdown.clone(),
            detach: false,
            ingest_only: false,
            budget: p.budget,
            worker_id: member.info.id.clone(),
            lease,
        })
        .collect();
    // One pipeline failing for good stops the worker (its supervisor restarts it); the
    // others finish the step they are in first.
    let results = futures_util::future::join_all(ctxs.iter().map(|ctx| async {
        let r = worker::serve(ctx).await;
        if r.is_err() {
            ctx.shutdown.trigger();
        }
        r
    }))
    .await;
    member.leave(&store).await;
    store.close().await;
    if let Some(l) = listener {
        l.abort();
    }
    for r in results {
        r.map_err(run_error_exit)?;
    }
    say("worker stopped; its leases are released");
    Ok(EXIT_OK)
}
