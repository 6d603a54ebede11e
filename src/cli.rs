//! The command line: argument types and the glue from commands to the library.
//!
//! Machine output (reports, JSON) goes to stdout; progress, warnings and errors go to stderr.
//! Exit codes: 0 all items final and none failed (or `--detach` sent what was ready);
//! 1 the run finished with failed items; 2 error; 75 try later (store locked by another
//! run, provider unavailable, stopped by a signal — everything done is kept); 78 bad
//! configuration.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::config::Pipeline;
use crate::cost::PriceTable;
use crate::report::{self, RunReport};
use crate::sim::{Sim, SimSettings};
use crate::store::{SqlStore, Store, WorkerInfo, default_db_path};
use crate::util::text;
use crate::worker::{self, Event, Observer, RunContext, RunError};

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED_ITEMS: i32 = worker::EXIT_FAILED_ITEMS;
pub const EXIT_ERROR: i32 = worker::EXIT_ERROR;
pub const EXIT_TEMPFAIL: i32 = worker::EXIT_RESUMABLE;
pub const EXIT_CONFIG: i32 = worker::EXIT_CONFIG;

#[derive(Parser, Debug)]
#[command(
    name = "nightshift",
    version,
    about = "Runs LLM batch pipelines with an exact per-item ledger."
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "NIGHTSHIFT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a pipeline: ingest the source, send what is new, retry what failed, report.
    Run(RunArgs),
    /// Check a pipeline file and its environment; list every problem.
    Validate {
        /// The pipeline file.
        file: PathBuf,
    },
    /// Show a run's figures (the latest run by default).
    Report(ReportArgs),
    /// List runs: start, duration, status, records, items sent, cost, cost per processed item.
    Runs(RunsArgs),
    /// Show batches still in flight.
    Status(StatusArgs),
    /// Cancel the batches in flight and record what they were billed.
    Cancel(CancelArgs),
    /// Serve the provider simulator (OpenAI Files + Batches wire format).
    Simulate(SimulateArgs),
    /// Measure end-to-end throughput on synthetic records against the simulator.
    Bench(BenchArgs),
    /// The cost worksheet of a pipeline, before anything is spent.
    Plan(PlanArgs),
    /// Plan vs actual for a run, and the ledger vs the provider's own figures.
    Reconcile(ReconcileArgs),
    /// Work on pipelines alongside other workers sharing a PostgreSQL store, until stopped.
    Worker(WorkerArgs),
}

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// The pipeline files to work on.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    #[command(flatten)]
    pub db: DbArg,
    /// A pricing file layered over the built-in prices.
    #[arg(long)]
    pub pricing: Option<PathBuf>,
    #[command(flatten)]
    pub lease: LeaseArg,
}

#[derive(Args, Debug, Clone, Copy)]
pub struct LeaseArg {
    /// How long a batch stays with a worker that stopped sending heartbeats before another
    /// worker adopts it. Keep it well above provider.request_timeout_seconds.
    #[arg(
        long,
        env = "NIGHTSHIFT_LEASE_SECONDS",
        default_value_t = 300.0,
        value_name = "SECONDS"
    )]
    pub lease_seconds: f64,
}

impl LeaseArg {
    fn duration(&self) -> Result<Duration, Exit> {
        if !(self.lease_seconds.is_finite() && self.lease_seconds >= 1.0) {
            return Err(exit(
                EXIT_CONFIG,
                anyhow::anyhow!(
                    "--lease-seconds must be at least 1, got {}",
                    self.lease_seconds
                ),
            ));
        }
        Ok(Duration::from_secs_f64(self.lease_seconds))
    }
}

impl Command {
    /// Commands that only read the store and print.
    pub fn is_report(&self) -> bool {
        matches!(
            self,
            Command::Report(_)
                | Command::Runs(_)
                | Command::Status(_)
                | Command::Plan(_)
                | Command::Reconcile(_)
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
    Markdown,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// The pipeline file.
    pub file: PathBuf,
    #[command(flatten)]
    pub db: DbArg,
    /// A pricing file layered over the built-in prices.
    #[arg(long)]
    pub pricing: Option<PathBuf>,
    /// Items per month, for the monthly forecast.
    #[arg(long)]
    pub monthly_items: Option<u64>,
    /// Items of a one-time backfill, forecast apart from the monthly figure.
    #[arg(long)]
    pub backfill_items: Option<u64>,
    /// Output format of the worksheet.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Shorthand for `--format json`.
    #[arg(long, conflicts_with_all = ["format", "csv", "markdown"])]
    pub json: bool,
    /// Shorthand for `--format csv`.
    #[arg(long, conflicts_with_all = ["format", "markdown"])]
    pub csv: bool,
    /// Shorthand for `--format markdown`.
    #[arg(long, conflicts_with = "format")]
    pub markdown: bool,
}

#[derive(Args, Debug)]
pub struct ReconcileArgs {
    /// A pipeline file, to find its default store.
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub db: DbArg,
    /// The run: its id or a unique prefix of it (default: the latest).
    #[arg(long)]
    pub run: Option<String>,
    /// Also compare with a running simulator's bill (its base URL, e.g. http://127.0.0.1:8080).
    #[arg(long)]
    pub sim_url: Option<String>,
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Number of synthetic records.
    #[arg(long, default_value_t = 100_000)]
    pub items: u64,
    /// Requests per batch.
    #[arg(long, default_value_t = 50_000)]
    pub batch_size: u64,
    /// Work in this folder (kept) instead of a temporary one.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Measure these numbers of `nightshift worker` processes on a PostgreSQL store
    /// (`--db`), e.g. `1,2,4`.
    #[arg(long, value_delimiter = ',')]
    pub workers: Vec<usize>,
    #[command(flatten)]
    pub db: DbArg,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The pipeline file.
    pub file: PathBuf,
    #[command(flatten)]
    pub db: DbArg,
    /// Write the per-record results here instead of the pipeline's `output.path`: JSON
    /// lines for `.jsonl`/`.ndjson`, CSV for `.csv`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A pricing file (TOML, or LiteLLM's JSON) layered over the built-in prices.
    #[arg(long)]
    pub pricing: Option<PathBuf>,
    /// No progress bars, even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
    /// Submit what is ready and exit (0, printing the run id) without waiting for results;
    /// the next `run` of the pipeline collects them.
    #[arg(long, conflicts_with = "ingest_only")]
    pub detach: bool,
    /// Read the source into the store and exit (0, printing the run id): workers sharing a
    /// PostgreSQL store (`nightshift worker`) send it. Run again without it to wait for the
    /// results and write the output.
    #[arg(long)]
    pub ingest_only: bool,
    /// Never spend more than this many dollars in this run (overrides `[budget] max_usd`).
    #[arg(long, value_name = "USD")]
    pub budget_usd: Option<String>,
    #[command(flatten)]
    pub lease: LeaseArg,
}

#[derive(Args, Debug)]
pub struct CancelArgs {
    /// The pipeline file (default: the one the run was started with).
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub db: DbArg,
    /// Cancel only the batches of this run (its id or a unique prefix).
    #[arg(long)]
    pub run: Option<String>,
    /// Ask the provider to cancel and return, without waiting to collect what was billed.
    #[arg(long)]
    pub no_wait: bool,
    #[command(flatten)]
    pub lease: LeaseArg,
}

#[derive(Args, Debug, Clone)]
pub struct DbArg {
    /// The state store: a SQLite path (or `sqlite://PATH`), or a PostgreSQL URL
    /// (`postgres://user@host/db`) shared by several workers. Default: `.nightshift/state.db`
    /// beside the pipeline file.
    #[arg(long, env = "NIGHTSHIFT_DB")]
    pub db: Option<String>,
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// A pipeline file, to find its default store (and its runs).
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub db: DbArg,
    /// The run to report: its id or a unique prefix of it (`nightshift runs` lists them).
    #[arg(long, conflicts_with = "last")]
    pub run: Option<String>,
    /// The latest run (the default).
    #[arg(long)]
    pub last: bool,
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// The per-item audit: every attempt, its batch, tokens, cost and verdict.
    #[arg(long)]
    pub items: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// A pipeline file, to find its default store.
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub db: DbArg,
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RunsArgs {
    /// A pipeline file: its store, and only its runs (without one: every run in the store).
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub db: DbArg,
    /// How many of the latest runs.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// A pricing file for the bill (TOML or LiteLLM JSON) over the built-in prices.
    #[arg(long)]
    pub pricing: Option<PathBuf>,
    #[command(flatten)]
    pub settings: SimSettings,
}

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct Exit {
    pub code: i32,
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Exit {
    fn from(e: E) -> Self {
        Exit {
            code: EXIT_ERROR,
            error: e.into(),
        }
    }
}

fn exit(code: i32, error: impl Into<anyhow::Error>) -> Exit {
    Exit {
        code,
        error: error.into(),
    }
}

/// Whether messages for people go out as JSON log records (`--log-format json`).
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn json_logs() -> bool {
    JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed)
}

/// A message for the person running the command, on stderr (with `--log-format json`, a
/// log record like every other line there).
fn say(msg: impl std::fmt::Display) {
    if json_logs() {
        tracing::info!(event = "note", "{msg}");
    } else {
        eprintln!("{msg}");
    }
}

/// A warning for the person running the command, on stderr.
fn warn(msg: impl std::fmt::Display) {
    if json_logs() {
        tracing::warn!("{msg}");
    } else {
        eprintln!("warning: {msg}");
    }
}

/// Runs a parsed command line; returns the process exit code.
pub async fn main(cli: Cli) -> i32 {
    let json_logs = cli.log_format == LogFormat::Json;
    JSON_LOGS.store(json_logs, std::sync::atomic::Ordering::Relaxed);
    let result = match cli.command {
        Command::Run(a) => cmd_run(a, json_logs).await,
        Command::Validate { file } => cmd_validate(&file),
        Command::Report(a) => cmd_report(a).await,
        Command::Runs(a) => cmd_runs(a).await,
        Command::Status(a) => cmd_status(a).await,
        Command::Cancel(a) => cmd_cancel(a).await,
        Command::Simulate(a) => cmd_simulate(a).await,
        Command::Plan(a) => cmd_plan(a).await,
        Command::Reconcile(a) => cmd_reconcile(a).await,
        Command::Worker(a) => cmd_worker(a, json_logs).await,
        Command::Bench(a) => crate::bench::run(crate::bench::BenchOptions {
            items: a.items,
            batch_size: a.batch_size,
            dir: a.dir,
            workers: a.workers,
            db: a.db.db,
        })
        .await
        .map(|()| EXIT_OK)
        .map_err(Exit::from),
    };
    match result {
        Ok(code) => code,
        Err(Exit { code, error }) => {
            // Each cause once: an error whose text already quotes its cause does not print
            // it again.
            let mut shown = error.to_string();
            let mut causes = Vec::new();
            for cause in error.chain().skip(1) {
                let c = cause.to_string();
                if !shown.contains(&c) {
                    shown.push_str(&c);
                    causes.push(c);
                }
            }
            if json_logs {
                tracing::error!(exit_code = code, causes = %causes.join("; "), "{error}");
            } else {
                eprintln!("error: {error}");
                for c in causes {
                    eprintln!("  Caused by: {c}");
                }
            }
            code
        }
    }
}

/// Where the state store is.
#[derive(Clone, Debug)]
enum StoreLoc {
    Sqlite(PathBuf),
    /// The URL as given (it may hold a password: print [`SqlStore::location`] instead).
    Postgres(String),
}

/// Resolves where the state store is.
fn store_loc(db: &DbArg, pipeline_file: Option<&Path>) -> StoreLoc {
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
fn pipeline_dir(pipeline_file: Option<&Path>) -> PathBuf {
    pipeline_file
        .and_then(Path::parent)
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// An open store, with the SQLite run lock when this command needed it.
struct OpenStore {
    store: SqlStore,
    /// Folder for batch files and downloads: beside the SQLite file, or `.nightshift/`
    /// beside the pipeline file (each machine keeps its own with PostgreSQL).
    work_dir: PathBuf,
    _lock: Option<crate::store::RunLock>,
}

/// Opens the store. With `lock_for`, SQLite's run lock is taken first (one process per
/// SQLite store); PostgreSQL needs none: workers share it through leases.
async fn open_store(
    loc: &StoreLoc,
    pipeline_file: Option<&Path>,
    lock_for: Option<&str>,
) -> Result<OpenStore, Exit> {
    match loc {
        StoreLoc::Sqlite(db) => {
            let lock = match lock_for {
                Some(what) => Some(crate::store::RunLock::acquire(db, what).map_err(
                    |e| match e {
                        crate::store::LockError::Held { .. } => exit(EXIT_TEMPFAIL, e),
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
struct Membership {
    info: WorkerInfo,
    lease: Duration,
    beat: tokio::task::JoinHandle<()>,
}

impl Membership {
    async fn join(
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
    async fn leave(self, store: &SqlStore) {
        self.beat.abort();
        if let Err(e) = store.release_leases(&self.info.id, true).await {
            tracing::warn!(error = %e, "could not release leases; they run out on their own");
        }
    }
}

fn load_pipeline(file: &Path) -> Result<Pipeline, Exit> {
    Pipeline::load(file).map_err(|e| exit(EXIT_CONFIG, e))
}

fn cmd_validate(file: &Path) -> Result<i32, Exit> {
    // One list: what is wrong in the file and in its environment, all at once.
    let p = Pipeline::check_file(file, None).map_err(|e| exit(EXIT_CONFIG, e))?;
    println!(
        "{}: ok (pipeline `{}`, {} `{}`{}, source {})",
        file.display(),
        p.name,
        p.provider.kind.as_str(),
        p.provider.model,
        if p.provider.simulate {
            ", simulated"
        } else {
            ""
        },
        p.source.path.display()
    );
    Ok(EXIT_OK)
}

/// A pipeline ready to run: its prices, its store (locked on SQLite), its provider client.
struct Prepared {
    pipeline: Pipeline,
    price: crate::cost::ModelPrice,
    store: SqlStore,
    client: crate::provider::AnyProvider,
    sim: Option<crate::sim::SimHandle>,
    work_dir: PathBuf,
    _lock: Option<crate::store::RunLock>,
}

/// Loads and checks a pipeline, opens the store (taking SQLite's run lock) and builds the
/// provider client (starting the in-process simulator for `simulate = true`).
async fn prepare(
    file: &Path,
    db: &DbArg,
    pricing: Option<&Path>,
    what: &str,
    lease: Duration,
) -> Result<Prepared, Exit> {
    let loc = store_loc(db, Some(file));
    // `run` and `cancel` collect what is in flight even without the source.
    let (p, price, prices) = load_checked_with(file, pricing, false)?;
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
        price,
        store,
        client,
        sim,
        work_dir: opened.work_dir,
        _lock: opened._lock,
    })
}

/// A pipeline file, loaded and checked against its environment and prices.
fn load_checked(
    file: &Path,
    pricing: Option<&Path>,
) -> Result<(Pipeline, crate::cost::ModelPrice, PriceTable), Exit> {
    load_checked_with(file, pricing, true)
}

/// [`load_checked`]; without `need_source`, an unreadable source is left for the run to
/// report once it has collected what is in flight (which needs no source).
fn load_checked_with(
    file: &Path,
    pricing: Option<&Path>,
    need_source: bool,
) -> Result<(Pipeline, crate::cost::ModelPrice, PriceTable), Exit> {
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
    let price = prices
        .lookup(p.provider.kind.as_str(), &p.provider.model)
        .map_err(|e| exit(EXIT_CONFIG, e))?
        .clone();
    Ok((p, price, prices))
}

/// The pipeline's provider client; `simulate = true` starts the built-in simulator on
/// loopback (real HTTP all the way), its state kept in `work_dir/simulator` so that what
/// one run sent is still there for the next (after a crash, a signal, a budget stop).
async fn provider_client(
    p: &Pipeline,
    prices: &PriceTable,
    work_dir: &Path,
) -> Result<(crate::provider::AnyProvider, Option<crate::sim::SimHandle>), Exit> {
    let mut sim = None;
    if p.provider.simulate {
        let dir = work_dir.join("simulator");
        let s =
            Sim::persistent(&dir, p.provider.simulator.clone(), prices.clone()).map_err(|e| {
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
fn watch_signals(shutdown: worker::Shutdown) {
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

fn run_error_exit(e: RunError) -> Exit {
    exit(e.exit_code(), e)
}

async fn cmd_run(a: RunArgs, json_logs: bool) -> Result<i32, Exit> {
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
    let shutdown = worker::Shutdown::default();
    watch_signals(shutdown.clone());
    let member = Membership::join(&pre.store, "run", p.name.clone(), lease).await?;
    let ctx = RunContext {
        store: &pre.store,
        provider: &pre.client,
        pipeline: p,
        price: &pre.price,
        observer: observer.as_ref(),
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
    drop(observer);
    let store = &pre.store;
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
            eprintln!("error: {m}");
        }
    }
    store.close().await;
    Ok(outcome.exit_code)
}

/// Keeps the in-process simulator's bill per batch in the store, for `reconcile`.
async fn record_sim_bill(store: &SqlStore, h: &crate::sim::SimHandle) -> Result<(), Exit> {
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

async fn cmd_cancel(a: CancelArgs) -> Result<i32, Exit> {
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
        price: &pre.price,
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

/// A run named on the command line: its id or a unique prefix of it; without one, the
/// latest run (of `pipeline`, when given).
async fn resolve_run(
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

async fn cmd_plan(a: PlanArgs) -> Result<i32, Exit> {
    let p = load_pipeline(&a.file)?;
    let pricing_file = a.pricing.clone().or(p.pricing_file.clone());
    let prices =
        PriceTable::builtin_with(pricing_file.as_deref()).map_err(|e| exit(EXIT_CONFIG, e))?;
    let price = prices
        .lookup(p.provider.kind.as_str(), &p.provider.model)
        .map_err(|e| exit(EXIT_CONFIG, e))?
        .clone();
    let validator = crate::validate::OutputValidator::load(&p.output.schema)
        .map_err(|e| exit(EXIT_CONFIG, anyhow::anyhow!(e)))?;
    // Only the request shape and the token counter are needed: no key, no connection.
    let client = crate::provider::AnyProvider::build(
        &p.provider,
        secrecy::SecretString::from("plan".to_string()),
        Some("http://127.0.0.1:9"),
    )?;
    use crate::provider::BatchProvider;
    let name = worker::schema_name(&p.name);
    let spec = worker::spec(&p, validator.schema(), &name);
    let shape = client
        .request_shape(&spec)
        .map_err(|e| exit(EXIT_CONFIG, anyhow::anyhow!(e)))?;
    let counter = client.prompt_counter(&spec);
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
            .succeeded_among(&p.name, p.stage(), &keys)
            .await?
            .into_iter()
            .collect();
        let history = store.history(&p.name, p.stage()).await?;
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

async fn cmd_reconcile(a: ReconcileArgs) -> Result<i32, Exit> {
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

/// Opens a store that must already exist (reports, status).
async fn open_existing(db: &DbArg, file: Option<&Path>) -> Result<SqlStore, Exit> {
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
fn pipeline_name(file: Option<&Path>) -> Result<Option<String>, Exit> {
    Ok(match file {
        Some(f) => Some(load_pipeline(f)?.name),
        None => None,
    })
}

async fn cmd_report(a: ReportArgs) -> Result<i32, Exit> {
    let store = open_existing(&a.db, a.file.as_deref()).await?;
    let pipeline = pipeline_name(a.file.as_deref())?;
    let run = resolve_run(&store, a.run.as_deref(), pipeline.as_deref()).await?;
    if a.items {
        // The attempts of this run's batches (each attempt belongs to exactly one run).
        let rows = store.audit(&run.id).await?;
        let q = store.quarantine(&run.id).await?;
        if a.json {
            let quarantine: Vec<_> = q
                .iter()
                .map(|r| serde_json::json!({"source": r.source, "line": r.line, "field": r.field, "reason": r.reason}))
                .collect();
            println!(
                "{}",
                serde_json::json!({"run_id": run.id, "attempts": report::audit_json(&rows), "quarantined": quarantine})
            );
        } else {
            if rows.is_empty() {
                println!("run {}: no attempt (nothing was sent by this run)", run.id);
            } else {
                print!("{}", report::audit_text(&rows, report::terminal_width()));
            }
            for r in q {
                println!(
                    "quarantined {}:{}{}: {}",
                    text::printable(&r.source),
                    r.line,
                    r.field
                        .map(|f| format!(" ({})", text::printable(&f)))
                        .unwrap_or_default(),
                    text::printable(&r.reason)
                );
            }
        }
        return Ok(EXIT_OK);
    }
    let rep = RunReport::load(&store, run).await?;
    if a.json {
        println!("{}", rep.to_json());
    } else {
        print!("{}", rep.to_text());
    }
    Ok(EXIT_OK)
}

async fn cmd_runs(a: RunsArgs) -> Result<i32, Exit> {
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

async fn cmd_worker(a: WorkerArgs, json_logs: bool) -> Result<i32, Exit> {
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
    let ctxs: Vec<RunContext<'_, SqlStore, crate::provider::AnyProvider>> = loaded
        .iter()
        .zip(&clients)
        .map(|((file, p, price, _), client)| RunContext {
            store: &store,
            provider: client,
            pipeline: p,
            price,
            observer: observer.as_ref(),
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
    for r in results {
        r.map_err(run_error_exit)?;
    }
    say("worker stopped; its leases are released");
    Ok(EXIT_OK)
}

async fn cmd_status(a: StatusArgs) -> Result<i32, Exit> {
    let store = open_existing(&a.db, a.file.as_deref()).await?;
    let open = store.open_batches(None).await?;
    let now = crate::util::time::now_ms();
    // Workers seen in the last day, or still named on an open batch.
    let workers = store.workers(now - 86_400_000).await?;
    let holder = |b: &crate::store::BatchRow| -> String {
        match (&b.lease_owner, b.lease_expires_at) {
            (Some(w), Some(t)) if t >= now => short_id(w),
            (Some(w), _) => format!("{} (lease ran out)", short_id(w)),
            _ => "-".into(),
        }
    };
    if a.json {
        let rows: Vec<_> = open
            .iter()
            .map(|b| {
                serde_json::json!({
                    "batch_id": b.id, "run_id": b.run_id, "pipeline": b.pipeline, "state": b.state,
                    "provider": b.provider, "provider_batch_id": b.provider_batch_id,
                    "provider_status": b.provider_status, "requests": b.request_count,
                    "age_seconds": (now - b.created_at) / 1000,
                    "lease_owner": b.lease_owner, "lease_expires_at": b.lease_expires_at,
                })
            })
            .collect();
        let ws: Vec<_> = workers
            .iter()
            .map(|w| {
                serde_json::json!({
                    "worker_id": w.id, "host": w.host, "pid": w.pid, "role": w.role,
                    "pipelines": w.pipelines, "started_at": w.started_at,
                    "heartbeat_age_seconds": (now - w.heartbeat_at) / 1000,
                    "stopped": w.stopped_at.is_some(), "batches_held": w.held,
                    "batches": open.iter().filter(|b| b.lease_owner.as_deref() == Some(w.id.as_str())).map(|b| b.id.clone()).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"store": store.location(), "in_flight": rows, "workers": ws})
        );
        return Ok(EXIT_OK);
    }
    let width = report::terminal_width();
    if !workers.is_empty() {
        let mut t = report::table(
            &[
                "worker",
                "host",
                "pid",
                "role",
                "pipelines",
                "heartbeat",
                "holds",
                "state",
            ],
            width,
        );
        for w in &workers {
            let state = match w.stopped_at {
                Some(_) => "stopped",
                None if now - w.heartbeat_at > 60_000 => "silent",
                None => "alive",
            };
            t.add_row(vec![
                short_id(&w.id),
                text::printable(&w.host),
                w.pid.to_string(),
                w.role.clone(),
                text::printable(&w.pipelines),
                format!("{} ago", age((now - w.heartbeat_at).max(0) / 1000)),
                w.held.to_string(),
                state.to_string(),
            ]);
        }
        report::align_right(&mut t, &[2, 5, 6]);
        print!("{}", report::render(&t));
        println!();
    }
    if open.is_empty() {
        println!("no batch in flight");
        return Ok(EXIT_OK);
    }
    let mut t = report::table(
        &[
            "batch",
            "pipeline",
            "state",
            "provider batch",
            "provider",
            "requests",
            "age",
            "held by",
        ],
        width,
    );
    for b in &open {
        t.add_row(vec![
            b.id.clone(),
            text::printable(&b.pipeline),
            b.state.clone(),
            b.provider_batch_id
                .as_deref()
                .map(text::printable)
                .unwrap_or_else(|| "-".into()),
            b.provider_status
                .as_deref()
                .map(text::printable)
                .unwrap_or_else(|| "-".into()),
            b.request_count.to_string(),
            age((now - b.created_at).max(0) / 1000),
            holder(b),
        ]);
    }
    report::align_right(&mut t, &[5, 6]);
    print!("{}", report::render(&t));
    Ok(EXIT_OK)
}

/// The first 13 characters of a v7 uuid (its time part): enough to tell workers apart.
fn short_id(id: &str) -> String {
    id.chars().take(13).collect()
}

fn age(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

async fn cmd_simulate(a: SimulateArgs) -> Result<i32, Exit> {
    let problems = a.settings.problems();
    if let Some((field, msg)) = problems.first() {
        return Err(exit(
            EXIT_CONFIG,
            anyhow::anyhow!("--{}: {msg}", field.replace('_', "-")),
        ));
    }
    let prices =
        PriceTable::builtin_with(a.pricing.as_deref()).map_err(|e| exit(EXIT_CONFIG, e))?;
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    use std::io::Write;
    std::io::stdout().flush()?;
    let sim = Sim::new(a.settings, prices)?;
    tokio::select! {
        r = crate::sim::serve(sim, listener) => r?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(EXIT_OK)
}

/// Plain progress lines on stderr (not a terminal).
struct LineObserver;

impl Observer for LineObserver {
    fn event(&self, e: &Event) {
        match e {
            Event::IngestDone {
                records,
                quarantined,
                new_items,
            } => eprintln!(
                "read {}, {} quarantined, {}",
                text::plural(*records, "record", "records"),
                text::n(*quarantined),
                text::plural(*new_items, "new item", "new items")
            ),
            Event::Submitted {
                batch_id,
                provider_batch_id,
                requests,
            } => eprintln!(
                "submitted batch {batch_id} as {} ({})",
                text::printable(provider_batch_id),
                text::plural(*requests, "request", "requests")
            ),
            Event::Adopted {
                batch_id,
                provider_batch_id,
            } => eprintln!(
                "adopted batch {batch_id}: the provider already had it as {}",
                text::printable(provider_batch_id)
            ),
            Event::Ingested {
                batch_id,
                stats,
                cost,
            } => eprintln!(
                "collected batch {batch_id}: {} succeeded, {} to retry, {} failed for good ({})",
                stats.succeeded,
                stats.failed,
                stats.exhausted,
                cost.display_rounded(6)
            ),
            Event::Note(n) => eprintln!("{n}"),
            Event::Quarantined { .. } => eprintln!("{}", quarantine_line(e)),
            _ => {}
        }
    }
}

fn quarantine_line(e: &Event) -> String {
    match e {
        Event::Quarantined {
            source,
            line,
            field,
            reason,
        } => format!(
            "quarantined {}:{line}{}: {}",
            text::printable(source),
            field
                .as_ref()
                .map(|f| format!(" (field `{}`)", text::printable(f)))
                .unwrap_or_default(),
            text::printable(reason)
        ),
        _ => String::new(),
    }
}

/// Progress on a terminal: a spinner while the source is read, then one bar for the whole
/// run (items final out of items to carry, elapsed, ETA, cost so far, retries).
struct BarObserver {
    multi: MultiProgress,
    ingest: ProgressBar,
    bar: ProgressBar,
    state: Mutex<BarState>,
}

#[derive(Default)]
struct BarState {
    /// Items final (succeeded or failed for good).
    done: u64,
    retries: u64,
    cost: crate::cost::Usd,
    /// What the provider reports done in each batch still in flight.
    in_flight: std::collections::HashMap<String, u64>,
}

impl BarObserver {
    fn new() -> Self {
        let multi = MultiProgress::new();
        let ingest = multi.add(ProgressBar::new_spinner());
        ingest.set_style(
            ProgressStyle::with_template("{spinner} reading source: {msg}")
                .expect("valid template"),
        );
        ingest.enable_steady_tick(Duration::from_millis(120));
        let bar = multi.add(ProgressBar::hidden());
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} items  {elapsed_precise} (eta {eta})  {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        BarObserver {
            multi,
            ingest,
            bar,
            state: Mutex::new(BarState::default()),
        }
    }

    fn refresh(&self, st: &BarState) {
        let running: u64 = st.in_flight.values().sum();
        self.bar.set_position(st.done + running);
        self.bar.set_message(format!(
            "{} so far · {}",
            st.cost.display_rounded(4),
            text::plural(st.retries, "retry", "retries")
        ));
    }
}

impl Observer for BarObserver {
    fn event(&self, e: &Event) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match e {
            Event::IngestProgress {
                records,
                quarantined,
            } => self.ingest.set_message(format!(
                "{} records, {} quarantined",
                text::n(*records),
                text::n(*quarantined)
            )),
            Event::IngestDone {
                records,
                quarantined,
                new_items,
            } => self.ingest.finish_with_message(format!(
                "{} records, {} quarantined, {} new items",
                text::n(*records),
                text::n(*quarantined),
                text::n(*new_items)
            )),
            Event::Work { items } => {
                self.bar.set_length(*items);
                self.bar
                    .set_draw_target(indicatif::ProgressDrawTarget::stderr());
                self.bar.reset_elapsed();
                self.bar.enable_steady_tick(Duration::from_millis(250));
                self.refresh(&st);
            }
            Event::Polled {
                batch_id,
                completed,
                failed,
                ..
            } => {
                st.in_flight.insert(batch_id.clone(), completed + failed);
                self.refresh(&st);
            }
            Event::Ingested {
                batch_id,
                stats,
                cost,
            } => {
                st.in_flight.remove(batch_id);
                st.done += stats.succeeded + stats.exhausted;
                st.retries += stats.failed;
                st.cost += *cost;
                self.refresh(&st);
            }
            Event::Note(n) => {
                let _ = self.multi.println(n);
            }
            Event::Quarantined { .. } => {
                let _ = self.multi.println(quarantine_line(e));
            }
            _ => {}
        }
    }
}

impl Drop for BarObserver {
    fn drop(&mut self) {
        self.bar.finish();
    }
}
