//! `nightshift init [DIR]`: a starting pipeline of one's own — a commented pipeline file, its
//! JSON Schema and a small sample source — that runs offline at once against the simulator.
//! Files already there are kept as they are, so running it again only fills in what is
//! missing.

use std::path::{Path, PathBuf};

use crate::cli::exit::{EXIT_ERROR, EXIT_OK, Exit, exit};

/// What `init` writes, relative to the folder: (path, contents).
const FILES: [(&str, &str); 3] = [
    (
        "pipeline.toml",
        include_str!("../../../config/init/pipeline.toml"),
    ),
    (
        "schemas/ticket.json",
        include_str!("../../../config/init/schemas/ticket.json"),
    ),
    (
        "data/tickets.jsonl",
        include_str!("../../../config/init/data/tickets.jsonl"),
    ),
];

/// What happened to each file.
#[derive(Debug, PartialEq, Eq)]
pub enum Written {
    Created(PathBuf),
    Kept(PathBuf),
}

/// Writes the starting files into `dir` (created if need be), keeping any that exist.
pub fn write(dir: &Path) -> std::io::Result<Vec<Written>> {
    let mut out = Vec::with_capacity(FILES.len());
    for (rel, text) in FILES {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                std::io::Write::write_all(&mut f, text.as_bytes())?;
                out.push(Written::Created(path));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                out.push(Written::Kept(path));
            }
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("cannot write {}: {e}", path.display()),
                ));
            }
        }
    }
    Ok(out)
}

pub(crate) fn run(dir: &Path) -> Result<i32, Exit> {
    let written = write(dir).map_err(|e| exit(EXIT_ERROR, anyhow::anyhow!(e)))?;
    for w in &written {
        match w {
            Written::Created(p) => println!("created {}", p.display()),
            Written::Kept(p) => println!("kept    {} (already there, left as it is)", p.display()),
        }
    }
    let pipeline = dir.join("pipeline.toml");
    println!();
    println!("next:");
    println!(
        "  nightshift run {}      runs it offline against the built-in simulator",
        pipeline.display()
    );
    println!(
        "  nightshift report {}   the run's items, cost and cost per item",
        pipeline.display()
    );
    println!(
        "  then edit {}: your source, prompt and schema; drop `simulate = true` for the real provider",
        pipeline.display()
    );
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_starting_pipeline_builds_and_its_fields_are_in_the_sample() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path()).unwrap();
        let p = crate::config::Pipeline::check_file(&dir.path().join("pipeline.toml"), None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(p.provider.simulate);
    }
}
