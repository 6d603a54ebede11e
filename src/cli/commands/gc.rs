//! `nightshift gc`: delete what the pipeline's ingested batches left behind (provider files,
//! ended result batches, output objects, local batch files and downloads), or list it with
//! `--dry-run`; also what `[cleanup] after_run` prints at the end of a run.

use std::path::PathBuf;

use serde_json::json;

use crate::cli::args::GcArgs;
use crate::cli::exit::{EXIT_CONFIG, EXIT_OK, EXIT_TEMPFAIL, Exit, exit};
use crate::cli::session::{open_existing, prepare, resolve_run};
use crate::util::text;
use crate::worker::{GcOptions, GcOutcome, GcReport};

pub(crate) async fn run(a: GcArgs) -> Result<i32, Exit> {
    let older_than = crate::util::time::parse_age(&a.older_than)
        .map_err(|e| exit(EXIT_CONFIG, anyhow::anyhow!("--older-than: {e}")))?;
    let lease = a.lease.duration()?;
    // The pipeline names the provider and its key: from the argument, or the latest run's.
    let file = match &a.file {
        Some(f) => f.clone(),
        None => {
            let store = open_existing(&a.db, None).await?;
            let r = resolve_run(&store, None, None).await?;
            store.close().await;
            PathBuf::from(r.pipeline_file)
        }
    };
    let what = format!("nightshift gc {}", file.display());
    let pre = prepare(&file, &a.db, None, &what, lease).await?;
    let opts = GcOptions {
        older_than,
        dry_run: a.dry_run,
    };
    let rep = crate::worker::gc(
        &pre.store,
        &pre.client,
        &pre.pipeline.name,
        &pre.work_dir,
        &opts,
    )
    .await;
    if let Some(h) = pre.sim {
        h.stop().await;
    }
    let rep = rep?;
    if a.json {
        println!("{}", to_json(&rep, &opts));
    } else {
        print!("{}", to_text(&rep, &opts, &pre.pipeline.name));
    }
    pre.store.close().await;
    Ok(if rep.failed() > 0 {
        EXIT_TEMPFAIL
    } else {
        EXIT_OK
    })
}

fn outcome_word(o: &GcOutcome) -> &'static str {
    match o {
        GcOutcome::WouldDelete => "would delete",
        GcOutcome::Deleted => "deleted",
        GcOutcome::Failed(_) => "failed",
    }
}

/// The report for people: one line per target, then the totals.
pub(crate) fn to_text(rep: &GcReport, opts: &GcOptions, pipeline: &str) -> String {
    let age = crate::util::time::age_text(opts.older_than);
    let mut out = String::new();
    if rep.targets.is_empty() && rep.failed() == 0 && rep.other_provider.is_empty() {
        out.push_str(&format!(
            "nothing to delete: no batch of pipeline `{pipeline}` ingested {age} ago or more has anything left\n"
        ));
        return out;
    }
    for (t, o) in &rep.targets {
        out.push_str(&format!(
            "{:<12}  {:<9}  {:<10}  {}  batch {}",
            outcome_word(o),
            t.provider,
            t.kind,
            text::printable(&t.target),
            t.batch
        ));
        if let GcOutcome::Failed(why) = o {
            out.push_str(&format!("  ({why})"));
        }
        out.push('\n');
    }
    for (batch, why) in &rep.unlisted {
        out.push_str(&format!(
            "failed        could not list the output of batch {batch}: {why}\n"
        ));
    }
    for (batch, provider) in &rep.other_provider {
        out.push_str(&format!(
            "kept          batch {batch} was sent to {provider}, not this pipeline's provider: run gc with a pipeline file for {provider}\n"
        ));
    }
    let n = rep.targets.len() as u64;
    let batches = text::plural(rep.batches as u64, "batch", "batches");
    if opts.dry_run {
        out.push_str(&format!(
            "would delete {} of {batches} ingested {age} ago or more (dry run: nothing deleted)\n",
            text::plural(n, "leftover", "leftovers")
        ));
    } else {
        out.push_str(&format!(
            "deleted {} of {batches} ingested {age} ago or more",
            text::plural(rep.deleted() as u64, "leftover", "leftovers")
        ));
        if rep.failed() > 0 {
            out.push_str(&format!(
                "; {} could not be deleted: run gc again later",
                rep.failed()
            ));
        }
        out.push('\n');
    }
    out
}

/// The report as one JSON object.
pub(crate) fn to_json(rep: &GcReport, opts: &GcOptions) -> serde_json::Value {
    let targets: Vec<serde_json::Value> = rep
        .targets
        .iter()
        .map(|(t, o)| {
            let mut v = serde_json::to_value(t).unwrap_or_default();
            v["outcome"] = json!(outcome_word(o).replace(' ', "_"));
            if let GcOutcome::Failed(why) = o {
                v["error"] = json!(why);
            }
            v
        })
        .collect();
    json!({
        "dry_run": opts.dry_run,
        "older_than_seconds": opts.older_than.as_secs(),
        "batches": rep.batches,
        "targets": targets,
        "deleted": rep.deleted(),
        "failed": rep.failed(),
        "unlisted": rep.unlisted.iter().map(|(b, why)| json!({"batch": b, "error": why})).collect::<Vec<_>>(),
        "other_provider": rep.other_provider.iter().map(|(b, p)| json!({"batch": b, "provider": p})).collect::<Vec<_>>(),
    })
}
