//! The command line: `args` holds its shape, `commands` one module per command, `session`
//! what the commands share (store, lock, heartbeat, provider or simulator, signals),
//! `progress` the progress observers and `exit` the exit codes every error maps to.
//!
//! Machine output (reports, JSON) goes to stdout; progress, warnings and errors go to stderr.

pub mod args;
mod commands;
pub mod exit;
pub(crate) mod progress;
pub(crate) mod session;

pub use args::{Cli, ColorChoice, Command, LogFormat};
pub use exit::{EXIT_CONFIG, EXIT_ERROR, EXIT_FAILED_ITEMS, EXIT_OK, EXIT_TEMPFAIL, Exit};

/// Whether messages for people go out as JSON log records (`--log-format json`).
pub(crate) static JSON_LOGS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

pub(crate) fn json_logs() -> bool {
    JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether `error:` and `warning:` are coloured (`--color`, `NO_COLOR`, a terminal).
static COLOR: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `error:`, `warning:` or `hint:`, in bold red, yellow or cyan when stderr takes colour.
pub(crate) fn label(kind: &str) -> String {
    use anstyle::{AnsiColor, Style};
    if !COLOR.load(std::sync::atomic::Ordering::Relaxed) {
        return format!("{kind}:");
    }
    let colour = match kind {
        "error" => AnsiColor::Red,
        "warning" => AnsiColor::Yellow,
        _ => AnsiColor::Cyan,
    };
    let style = Style::new().bold().fg_color(Some(colour.into()));
    format!("{style}{kind}:{style:#}")
}

/// A message for the person running the command, on stderr (with `--log-format json`, a
/// log record like every other line there).
pub(crate) fn say(msg: impl std::fmt::Display) {
    if json_logs() {
        tracing::info!(event = "note", "{msg}");
    } else {
        eprintln!("{msg}");
    }
}

/// A warning for the person running the command, on stderr.
pub(crate) fn warn(msg: impl std::fmt::Display) {
    if json_logs() {
        tracing::warn!("{msg}");
    } else {
        eprintln!("{} {msg}", label("warning"));
    }
}

/// Runs a parsed command line; returns the process exit code.
pub async fn main(cli: Cli) -> i32 {
    let json_logs = cli.log_format == LogFormat::Json;
    JSON_LOGS.store(json_logs, std::sync::atomic::Ordering::Relaxed);
    COLOR.store(cli.color.for_stderr(), std::sync::atomic::Ordering::Relaxed);
    let result = match cli.command {
        Command::Run(a) => commands::run::run(a, json_logs).await,
        Command::Init { dir } => commands::init::run(&dir),
        Command::Completions { shell } => commands::shell::completions(shell),
        Command::Man => commands::shell::man(),
        Command::Validate { file } => commands::validate::run(&file),
        Command::Report(a) => commands::report::run(a).await,
        Command::Runs(a) => commands::runs::run(a).await,
        Command::Status(a) => commands::status::run(a).await,
        Command::Cancel(a) => commands::cancel::run(a).await,
        Command::Gc(a) => commands::gc::run(a).await,
        Command::Simulate(a) => commands::simulate::run(a).await,
        Command::Plan(a) => commands::plan::run(a).await,
        Command::Reconcile(a) => commands::reconcile::run(a).await,
        Command::Worker(a) => commands::worker::run(a, json_logs).await,
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
        Err(Exit { code, error, hint }) => {
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
                tracing::error!(exit_code = code, causes = %causes.join("; "), hint = hint.as_deref(), "{error}");
            } else {
                eprintln!("{} {error}", label("error"));
                for c in causes {
                    eprintln!("  Caused by: {c}");
                }
                if let Some(h) = hint {
                    eprintln!("{} {h}", label("hint"));
                }
            }
            code
        }
    }
}
