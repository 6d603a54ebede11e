//! What the commands share before they do their own work: where the store is and opening it
//! (with SQLite's run lock), joining the store as a worker (the heartbeat that renews leases),
//! loading a pipeline checked against its environment and prices, building its provider
//! client or starting the built-in simulator, watching for signals, and naming a run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use super::args::DbArg;
use super::exit::{EXIT_CONFIG, EXIT_ERROR, EXIT_TEMPFAIL, Exit, exit};
use super::say;
use crate::config::Pipeline;
use crate::cost::PriceTable;
use crate::sim::Sim;
use crate::store::{SqlStore, Store, WorkerInfo, default_db_path};
use crate::util::text;
use crate::worker;

/// Where the state store is.
#[derive(Clone, Debug)]
pub(crate) enum StoreLoc {
    Sqlite(PathBuf),
    /// The URL as given (it may hold a password: print [`SqlStore::location`] instead).
    Postgres(String),
}

/// Resolves where the state store is.
pub(crate) fn store_loc(db: &DbArg, pipeline_file: Option<&Path>) -> StoreLoc {
    if let Some(url) = &db.db {
        if crate::store::postgres::is_postgres_url(url) {
            return StoreLoc::Postgres(url.clone());
        }
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .unwrap_or(url);
        return StoreLoc::Sqlite(PathBuf::from(path));
    }
    StoreLoc::Sqlite(default_db_path(&pipeline_dir(pipeline_file)))
}

/// The folder of a pipeline file (the current one without it).
pub(crate) fn pipeline_dir(pipeline_file: Option<&Path>) -> PathBuf {
    pipeline_file
        .and_then(Path::parent)
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// An open store, with the SQLite run lock when this command needed it.
pub(crate) struct OpenStore {
    pub(crate) store: SqlStore,
    /// Folder for batch files and downloads: beside the SQLite file, or `.nightshift/`
    /// beside the pipeline file (each machine keeps its own with PostgreSQL).
    pub(crate) work_dir: PathBuf,
    pub(crate) _lock: Option<crate::store::RunLock>,
}

/// Opens the store. With `lock_for`, SQLite's run lock is taken first (one process per
/// SQLite store); PostgreSQL needs none: workers share it through leases.
pub(crate) async fn open_store(
    loc: &StoreLoc,
    pipeline_file: Option<&Path>,
    lock_for: Option<&str>,
) -> Result<OpenStore, Exit> {
    match loc {
        StoreLoc::Sqlite(db) => {
            let lock = match lock_for {
                Some(what) => Some(crate::store::RunLock::acquire(db, what).map_err(
                    |e| match e {
                        crate::store::LockError::Held { .. } => exit(EXIT_TEMPFAIL, e).hint(
                            "`nightshift status` shows what that run is doing; run again once it ends (a cron job can simply retry on exit 75)",
                        ),
                        other => exit(EXIT_ERROR, other),
                    },
                )?),
                None => None,
            };
            let store = SqlStore::open_sqlite(db)
                .await
                .with_context(|| format!("opening the state store {}", db.display()))?;
            let work_dir = db
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            Ok(OpenStore {
                store,
                work_dir,
                _lock: lock,
            })
        }
        StoreLoc::Postgres(url) => {
            let shown = crate::store::postgres::redact_url(url);
            let store = SqlStore::open_postgres(url).await.map_err(|e| {
                // Unreachable is "try later"; anything else (auth, migration) is an error.
                let code = match &e {
                    crate::store::StoreError::Db(
                        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut,
                    ) => EXIT_TEMPFAIL,
                    _ => EXIT_ERROR,
                };
                exit(
                    code,
                    anyhow::Error::new(e).context(format!("opening the state store {shown}")),
                )
            })?;
            Ok(OpenStore {
                store,
                work_dir: pipeline_dir(pipeline_file).join(".nightshift"),
                _lock: None,
            })
        }
    }
}

/// This process as a member of the store: a `workers` row kept alive by a heartbeat that
/// also renews the leases it holds.
pub(crate) struct Membership {
    pub(crate) info: WorkerInfo,
    pub(crate) lease: Duration,
    pub(crate) beat: tokio::task::JoinHandle<()>,
}

impl Membership {
    pub(crate) async fn join(
        store: &SqlStore,
        role: &'static str,
        pipelines: String,
        lease: Duration,
    ) -> Result<Self, Exit> {
        let info = WorkerInfo {
            id: uuid::Uuid::now_v7().hyphenated().to_string(),
            host: crate::util::host::hostname(),
            pid: std::process::id(),
            role,
            pipelines,
        };
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        store.heartbeat(&info, lease_ms).await?;
        let (s, i) = (store.clone(), info.clone());
        let beat = tokio::spawn(async move {
            let every = (lease / 4).max(Duration::from_millis(250));
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = s.heartbeat(&i, lease_ms).await {
                    tracing::warn!(error = %e, "heartbeat failed; leases run out unless the next one succeeds");
                }
            }
        });
        Ok(Membership { info, lease, beat })
    }

    /// Stops the heartbeat and hands the leases back, so other workers need not wait.
    pub(crate) async fn leave(self, store: &SqlStore) {
        self.beat.abort();
        if let Err(e) = store.release_leases(&self.info.id, true).await {
            tracing::warn!(error = %e, "could not release leases; they run out on their own");
        }
    }
}

pub(crate) fn load_pipeline(file: &Path) -> Result<Pipeline, Exit> {
    Pipeline::load(file).map_err(|e| {
        exit(EXIT_CONFIG, e).hint(format!(
            "`nightshift validate {}` lists every problem of the file and its environment",
            file.display()
        ))
    })
}

/// A pipeline ready to run: its prices, its store (locked on SQLite), its provider client.
pub(crate) struct Prepared {
    pub(crate) pipeline: Pipeline,
    /// Each stage's price, in stage order.
    pub(crate) prices: Vec<crate::cost::ModelPrice>,
    pub(crate) store: SqlStore,
    pub(crate) client: crate::provider::AnyProvider,
    pub(crate) sim: Option<crate::sim::SimHandle>,
    pub(crate) work_dir: PathBuf,
    pub(crate) _lock: Option<crate::store::RunLock>,
}

/// Loads and checks a pipeline, opens the store (taking SQLite's run lock) and builds the
/// provider client (starting the in-process simulator for `simulate = true`).
pub(crate) async fn prepare(
    file: &Path,
    db: &DbArg,
    pricing: Option<&Path>,
    what: &str,
    lease: Duration,
) -> Result<Prepared, Exit> {
    let loc = store_loc(db, Some(file));
    // `run` and `cancel` collect what is in flight even without the source.
    let (p, stage_prices, prices) = load_checked_with(file, pricing, false)?;
    let opened = open_store(&loc, Some(file), Some(what)).await?;
    let store = opened.store;
    // SQLite: we hold the lock, so runs still marked running died with their process.
    // PostgreSQL: runs whose process stopped its heartbeat for three leases.
    let stale_before =
        crate::util::time::now_ms() - 3 * i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 4);
    store.mark_stale_runs(stale_before).await?;
    let (client, sim) = provider_client(&p, &prices, &opened.work_dir).await?;
    Ok(Prepared {
        pipeline: p,
        prices: stage_prices,
        store,
        client,
        sim,
        work_dir: opened.work_dir,
        _lock: opened._lock,
    })
}

/// A pipeline file, loaded and checked against its environment and prices.
pub(crate) fn load_checked(
    file: &Path,
    pricing: Option<&Path>,
) -> Result<(Pipeline, Vec<crate::cost::ModelPrice>, PriceTable), Exit> {
    load_checked_with(file, pricing, true)
}

/// [`load_checked`]; without `need_source`, an unreadable source is left for the run to
/// report once it has collected what is in flight (which needs no source).
pub(crate) fn load_checked_with(
    file: &Path,
    pricing: Option<&Path>,
    need_source: bool,
) -> Result<(Pipeline, Vec<crate::cost::ModelPrice>, PriceTable), Exit> {
    let p = load_pipeline(file)?;
    let pricing_file = pricing.map(Path::to_path_buf).or(p.pricing_file.clone());
    let prices =
        PriceTable::builtin_with(pricing_file.as_deref()).map_err(|e| exit(EXIT_CONFIG, e))?;
    let mut problems = p.check_environment(Some(&prices));
    if !need_source && !p.source.path.exists() {
        problems.retain(|pr| pr.path != "source.path");
    }
    if !problems.is_empty() {
        return Err(exit(
            EXIT_CONFIG,
            crate::config::ConfigError {
                file: file.to_path_buf(),
                problems,
            },
        ));
    }
    let stage_prices = p.stage_prices(&prices).map_err(|e| exit(EXIT_CONFIG, e))?;
    Ok((p, stage_prices, prices))
}

/// The pipeline's provider client; `simulate = true` starts the built-in simulator on
/// loopback (real HTTP all the way), its state kept in `work_dir/simulator` so that what
/// one run sent is still there for the next (after a crash, a signal, a budget stop).
pub(crate) async fn provider_client(
    p: &Pipeline,
    prices: &PriceTable,
    work_dir: &Path,
) -> Result<(crate::provider::AnyProvider, Option<crate::sim::SimHandle>), Exit> {
    let mut sim = None;
    if p.provider.simulate {
        let dir = work_dir.join("simulator");
        let s = Sim::persistent(&dir, p.simulator.clone(), prices.clone()).map_err(|e| {
            // Another command is using this simulator's state: try again later.
            let code = if e.kind() == std::io::ErrorKind::WouldBlock {
                EXIT_TEMPFAIL
            } else {
                EXIT_ERROR
            };
            exit(
                code,
                anyhow::Error::new(e).context(format!(
                    "opening the built-in simulator's state in {}",
                    dir.display()
                )),
            )
        })?;
        let h = crate::sim::start(s, "127.0.0.1:0".parse().expect("addr")).await?;
        say(format!(
            "simulator listening on {} (simulate = true: no API key, no charge)",
            h.root_url()
        ));
        sim = Some(h);
    }
    let key = crate::provider::resolve_key(&p.provider.key, p.provider.simulate)
        .map_err(|e| exit(EXIT_CONFIG, anyhow::anyhow!(e)))?;
    let root = sim.as_ref().map(|h| h.root_url());
    let client = crate::provider::AnyProvider::build(&p.provider, key, root.as_deref())?;
    Ok((client, sim))
}

/// SIGINT / SIGTERM: the first asks the runner to stop after its current step; a second
/// stops the process at once (every committed step is kept either way). The handlers are
/// installed before this returns, so a signal arriving at any later moment is caught.
pub(crate) fn watch_signals(shutdown: worker::Shutdown) {
    #[cfg(unix)]
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM");
            return;
        }
    };
    #[cfg(unix)]
    let mut int = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGINT");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            #[cfg(unix)]
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            #[cfg(not(unix))]
            let _ = tokio::signal::ctrl_c().await;
            if shutdown.is_set() {
                say("second signal: stopping now; run again to resume");
                std::process::exit(worker::EXIT_RESUMABLE);
            }
            say("stopping after the current step (a second signal stops at once)");
            shutdown.trigger();
        }
    });
}

/// Keeps the in-process simulator's bill per batch in the store, for `reconcile`.
pub(crate) async fn record_sim_bill(
    store: &SqlStore,
    h: &crate::sim::SimHandle,
) -> Result<(), Exit> {
    for (batch, requests, usage, cost) in h.sim.batch_bills() {
        store
            .record_provider_bill(&crate::store::ProviderBill {
                provider_batch_id: batch,
                requests,
                usage,
                cost,
                source: "simulator".into(),
            })
            .await?;
    }
    Ok(())
}

/// A run named on the command line: its id or a unique prefix of it; without one, the
/// latest run (of `pipeline`, when given).
pub(crate) async fn resolve_run(
    store: &SqlStore,
    prefix: Option<&str>,
    pipeline: Option<&str>,
) -> Result<crate::store::RunRow, Exit> {
    let Some(prefix) = prefix else {
        return store.last_run(pipeline).await?.ok_or_else(|| {
            exit(
                EXIT_ERROR,
                anyhow::anyhow!(match pipeline {
                    Some(p) => format!("pipeline `{p}` has no run in this store yet"),
                    None => "this store has no run yet".to_string(),
                }),
            )
        });
    };
    let prefix = prefix.trim();
    if prefix.is_empty() {
        return Err(exit(
            EXIT_CONFIG,
            anyhow::anyhow!("--run: give a run id or the start of one"),
        ));
    }
    let mut found = store.runs_with_prefix(prefix, 5).await?;
    match found.len() {
        0 => Err(exit(
            EXIT_ERROR,
            anyhow::anyhow!(
                "no run id starts with `{}` in this store (`nightshift runs` lists them)",
                text::printable(prefix)
            ),
        )),
        1 => Ok(found.remove(0)),
        _ => Err(exit(
            EXIT_CONFIG,
            anyhow::anyhow!(
                "`{}` is the start of several run ids ({}{}); give more of it",
                text::printable(prefix),
                found
                    .iter()
                    .take(4)
                    .map(|r| r.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                if found.len() > 4 { ", …" } else { "" }
            ),
        )),
    }
}

/// Opens a store that must already exist (reports, status).
pub(crate) async fn open_existing(db: &DbArg, file: Option<&Path>) -> Result<SqlStore, Exit> {
    let loc = store_loc(db, file);
    if let StoreLoc::Sqlite(path) = &loc
        && !path.exists()
    {
        let hint = if file.is_none() && db.db.is_none() {
            "pass the pipeline file (the store is `.nightshift/state.db` beside it), or --db / NIGHTSHIFT_DB"
        } else {
            "run the pipeline first, or pass --db / NIGHTSHIFT_DB"
        };
        return Err(exit(
            EXIT_CONFIG,
            anyhow::anyhow!("no state store at {}: {hint}", path.display()),
        ));
    }
    Ok(open_store(&loc, file, None).await?.store)
}

/// The pipeline named by a file argument, for commands that only read.
pub(crate) fn pipeline_name(file: Option<&Path>) -> Result<Option<String>, Exit> {
    Ok(match file {
        Some(f) => Some(load_pipeline(f)?.name),
        None => None,
    })
}
