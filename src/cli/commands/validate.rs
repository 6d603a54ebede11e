//! `nightshift validate`: the pipeline file and its environment, every problem in one list.

use std::path::Path;

use crate::cli::exit::{EXIT_CONFIG, EXIT_OK, Exit, exit};
use crate::config::Pipeline;

pub(crate) fn run(file: &Path) -> Result<i32, Exit> {
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
