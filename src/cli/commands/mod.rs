//! One module per command; each exposes `run`, called by `cli::main`.

pub(crate) mod cancel;
pub(crate) mod gc;
pub(crate) mod init;
pub(crate) mod plan;
pub(crate) mod reconcile;
pub(crate) mod report;
pub(crate) mod run;
pub(crate) mod runs;
pub(crate) mod shell;
pub(crate) mod simulate;
pub(crate) mod status;
pub(crate) mod validate;
pub(crate) mod worker;
