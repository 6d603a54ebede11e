//! `nightshift completions SHELL` and `nightshift man`: shell completion scripts and the man
//! page, generated from the command line's own definition, so they never drift from it.

use clap::CommandFactory;

use crate::cli::Cli;
use crate::cli::exit::{EXIT_ERROR, EXIT_OK, Exit, exit};

pub(crate) fn completions(shell: clap_complete::Shell) -> Result<i32, Exit> {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "nightshift", &mut std::io::stdout());
    Ok(EXIT_OK)
}

pub(crate) fn man() -> Result<i32, Exit> {
    clap_mangen::Man::new(Cli::command())
        .render(&mut std::io::stdout())
        .map_err(|e| {
            exit(
                EXIT_ERROR,
                anyhow::anyhow!("cannot write the man page: {e}"),
            )
        })?;
    Ok(EXIT_OK)
}
