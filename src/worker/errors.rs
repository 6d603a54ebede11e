//! How a run fails: [`RunError`], and the process exit codes errors and run ends map to
//! (75 for everything that is kept and resumable: docs/reliability.md §B8, §B9).

use std::path::PathBuf;

use crate::provider::ProviderError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error("{0}")]
    Config(String),
    /// The provider refused our credentials, or answered in a way retrying cannot fix.
    #[error("provider: {0}")]
    Provider(ProviderError),
    /// The provider could not be reached for long enough that this run gives up; rerun later.
    #[error(
        "cannot reach the provider at {url}: every call failed for {seconds}s (last: {cause}). \
         Everything done so far is kept: check the network, the provider's status and \
         provider.base_url, then run again (the run gives up after \
         provider.unreachable_timeout_seconds = {timeout_seconds})"
    )]
    Unavailable {
        url: String,
        seconds: u64,
        timeout_seconds: f64,
        cause: String,
    },
    #[error("cannot write {path}: {source}")]
    Output {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl RunError {
    /// The process exit code this error maps to (also stored on the run).
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Config(_) => EXIT_CONFIG,
            RunError::Provider(ProviderError::Auth { .. }) => EXIT_CONFIG,
            RunError::Unavailable { .. } => EXIT_RESUMABLE,
            _ => EXIT_ERROR,
        }
    }
}

/// How a process ends: the exit codes of every command, in one place (README "Exit codes").
/// The runner stores the code on the run; `cli::exit` maps the command line's own errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// Every item final and none failed (or `--detach` sent what was ready).
    Ok,
    /// The run finished with items failed for good, or stopped by its budget.
    FailedItems,
    /// An error: I/O, the store, a provider answer retrying cannot fix.
    Error,
    /// Stopped by a signal, left in flight on purpose, the store locked, the provider
    /// unreachable: everything done is kept; try again later (sysexits' EX_TEMPFAIL).
    TryLater,
    /// Bad configuration: pipeline file, key, prices, a refused key (EX_CONFIG).
    Config,
}

impl ExitStatus {
    pub const fn code(self) -> i32 {
        match self {
            ExitStatus::Ok => 0,
            ExitStatus::FailedItems => 1,
            ExitStatus::Error => 2,
            ExitStatus::TryLater => 75,
            ExitStatus::Config => 78,
        }
    }
}

/// Exit code of a run that finished with items failed for good, or stopped by its budget.
pub const EXIT_FAILED_ITEMS: i32 = ExitStatus::FailedItems.code();
/// Exit code of an error (I/O, the store, a provider answer retrying cannot fix).
pub const EXIT_ERROR: i32 = ExitStatus::Error.code();
/// Exit code of a run stopped by a signal or left in flight on purpose: try again later.
pub const EXIT_RESUMABLE: i32 = ExitStatus::TryLater.code();
/// Exit code of bad configuration (pipeline file, key, prices, a refused key).
pub const EXIT_CONFIG: i32 = ExitStatus::Config.code();
