//! The command line's shape: every command and flag, as clap types. Shared groups (`--db`,
//! `--lease-seconds`) are flattened into the commands that take them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use super::exit::{EXIT_CONFIG, Exit, exit};
use crate::sim::SimSettings;

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
    /// Colour `error:` and `warning:` on stderr: when it is a terminal (auto; `NO_COLOR`
    /// turns it off), always, or never.
    #[arg(long, global = true, env = "NIGHTSHIFT_COLOR", value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

impl ColorChoice {
    /// Whether stderr gets colour: `always`, `never`, or with `auto` when stderr is a
    /// terminal and `NO_COLOR` is unset or empty (no-color.org).
    pub fn for_stderr(self) -> bool {
        use std::io::IsTerminal;
        match self {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                    && std::io::stderr().is_terminal()
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a pipeline: ingest the source, send what is new, retry what failed, report.
    #[command(
        after_help = "Examples:\n  nightshift run pipeline.toml                    send what is new, wait, write the results\n  nightshift run pipeline.toml --detach           send and leave; a later run collects\n  nightshift run pipeline.toml --budget-usd 20    never commit more than $20 this run"
    )]
    Run(RunArgs),
    /// Write a starting pipeline (commented), its schema and a sample source into DIR; it runs
    /// offline at once. Files already there are kept.
    #[command(after_help = "Example:\n  nightshift init demo && nightshift run demo/pipeline.toml")]
    Init {
        /// The folder to write into (created if need be).
        #[arg(default_value = "nightshift-pipeline")]
        dir: PathBuf,
    },
    /// Print a shell completion script on stdout.
    #[command(
        after_help = "Example:\n  nightshift completions bash > ~/.local/share/bash-completion/completions/nightshift\n  nightshift completions zsh > \"${fpath[1]}/_nightshift\""
    )]
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout.
    #[command(after_help = "Example:\n  nightshift man > ~/.local/share/man/man1/nightshift.1")]
    Man,
    /// Check a pipeline file and its environment; list every problem.
    #[command(after_help = "Example:\n  nightshift validate pipeline.toml")]
    Validate {
        /// The pipeline file.
        file: PathBuf,
    },
    /// Show a run's figures (the latest run by default).
    #[command(
        after_help = "Examples:\n  nightshift report pipeline.toml\n  nightshift report pipeline.toml --json | jq .cost_per_processed_item_usd\n  nightshift report pipeline.toml --items      every attempt, its tokens, cost and verdict\n  nightshift report pipeline.toml --html night.html   one page to open in a browser"
    )]
    Report(ReportArgs),
    /// List runs: start, duration, status, records, items sent, cost, cost per processed item.
    #[command(
        after_help = "Example:\n  nightshift runs pipeline.toml --limit 14      the last two weeks of nights"
    )]
    Runs(RunsArgs),
    /// Show batches still in flight.
    #[command(after_help = "Example:\n  nightshift status pipeline.toml")]
    Status(StatusArgs),
    /// Cancel the batches in flight and record what they were billed.
    #[command(
        after_help = "Example:\n  nightshift cancel pipeline.toml               stop what is in flight, keep what was billed"
    )]
    Cancel(CancelArgs),
    /// Delete what ingested batches left behind: provider files, result batches, output
    /// objects, local batch files and downloads. Never a batch in flight.
    #[command(
        after_help = "Examples:\n  nightshift gc pipeline.toml --dry-run           list what would be deleted\n  nightshift gc pipeline.toml --older-than 36h    delete what batches ingested 36 hours ago or more left"
    )]
    Gc(GcArgs),
    /// Serve the provider simulator (OpenAI Files + Batches wire format).
    #[command(
        after_help = "Example:\n  nightshift simulate --listen 127.0.0.1:8080 --fail-rate 0.05 --batch-seconds 5"
    )]
    Simulate(SimulateArgs),
    /// Measure end-to-end throughput on synthetic records against the simulator.
    #[command(after_help = "Example:\n  nightshift bench --items 100000")]
    Bench(BenchArgs),
    /// The cost worksheet of a pipeline, before anything is spent.
    #[command(
        after_help = "Examples:\n  nightshift plan pipeline.toml\n  nightshift plan pipeline.toml --monthly-items 300000 --markdown"
    )]
    Plan(PlanArgs),
    /// Plan vs actual for a run, and the ledger vs the provider's own figures.
    #[command(after_help = "Example:\n  nightshift reconcile pipeline.toml --run 01a2")]
    Reconcile(ReconcileArgs),
    /// Work on pipelines alongside other workers sharing a PostgreSQL store, until stopped.
    #[command(
        after_help = "Example:\n  nightshift worker pipeline.toml --db postgres://nightshift@db.internal/nightshift"
    )]
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
    /// Serve Prometheus metrics on http://ADDR/metrics while the worker runs (port 0: any
    /// free port; the address is printed).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
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
    pub(crate) fn duration(&self) -> Result<Duration, Exit> {
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
                | Command::Completions { .. }
                | Command::Man
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
    /// lines for `.jsonl`/`.ndjson`, CSV for `.csv`, Parquet for `.parquet`.
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
    /// Write Prometheus metrics to this file (textfile-collector format, e.g.
    /// `/var/lib/node_exporter/textfile/nightshift.prom`), replaced atomically as the run
    /// goes and at its end.
    #[arg(long, value_name = "PATH")]
    pub metrics_textfile: Option<PathBuf>,
    /// Push the run's Prometheus metrics to this Pushgateway once it ends (a failed push is
    /// a warning, not a failed run).
    #[arg(long, value_name = "URL")]
    pub metrics_push: Option<String>,
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

#[derive(Args, Debug)]
pub struct GcArgs {
    /// The pipeline file (default: the one the latest run was started with).
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub db: DbArg,
    /// Only batches ingested at least this long ago: a whole number and s, m, h, d or w.
    #[arg(long, default_value = "7d", value_name = "AGE")]
    pub older_than: String,
    /// List what would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
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
    /// Also write the report as one self-contained HTML page (charts, batches, plan vs
    /// actual, recent runs) to FILE.
    #[arg(long, value_name = "FILE", conflicts_with = "items")]
    pub html: Option<PathBuf>,
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
