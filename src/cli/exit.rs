//! Exit codes, and the error type every command returns: an error with the code it maps to.
//!
//! 0 all items final and none failed (or `--detach` sent what was ready); 1 the run finished
//! with failed items; 2 error; 75 try later (store locked by another run, provider
//! unavailable, stopped by a signal: everything done is kept); 78 bad configuration.

pub use crate::worker::ExitStatus;
use crate::worker::{self, RunError};

pub const EXIT_OK: i32 = ExitStatus::Ok.code();
pub const EXIT_FAILED_ITEMS: i32 = worker::EXIT_FAILED_ITEMS;
pub const EXIT_ERROR: i32 = worker::EXIT_ERROR;
pub const EXIT_TEMPFAIL: i32 = worker::EXIT_RESUMABLE;
pub const EXIT_CONFIG: i32 = worker::EXIT_CONFIG;

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct Exit {
    pub code: i32,
    pub error: anyhow::Error,
    /// What to do about it, printed after the error as `hint:`.
    pub hint: Option<String>,
}

impl Exit {
    /// The same error, with what to do about it.
    pub(crate) fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl<E: Into<anyhow::Error>> From<E> for Exit {
    fn from(e: E) -> Self {
        Exit {
            code: EXIT_ERROR,
            error: e.into(),
            hint: None,
        }
    }
}

pub(crate) fn exit(code: i32, error: impl Into<anyhow::Error>) -> Exit {
    Exit {
        code,
        error: error.into(),
        hint: None,
    }
}

pub(crate) fn run_error_exit(e: RunError) -> Exit {
    exit(e.exit_code(), e)
}
