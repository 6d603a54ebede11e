//! `nightshift report`: one run's figures, or its per-item audit.

use crate::cli::args::ReportArgs;
use crate::cli::exit::{EXIT_ERROR, EXIT_OK, Exit, exit};
use crate::cli::session::{open_existing, pipeline_name, resolve_run};
use crate::report::{self, RunReport};
use crate::store::Store;
use crate::util::text;

pub(crate) async fn run(a: ReportArgs) -> Result<i32, Exit> {
    let store = open_existing(&a.db, a.file.as_deref()).await?;
    let pipeline = pipeline_name(a.file.as_deref())?;
    let run = resolve_run(&store, a.run.as_deref(), pipeline.as_deref()).await?;
    if a.items {
        let q = store.quarantine(&run.id).await?;
        // A multi-stage run: each record's chain of items too, read a page at a time.
        let stages: Vec<String> = run.stage.split(',').map(str::to_string).collect();
        let mut chains = report::ChainPages::new(&store, &run.id, &stages, report::CHAIN_PAGE);
        let fail = |e: anyhow::Error| exit(EXIT_ERROR, e);
        if a.json {
            let quarantine: Vec<_> = q
                .iter()
                .map(|r| serde_json::json!({"source": r.source, "line": r.line, "field": r.field, "reason": r.reason}))
                .collect();
            items_json(&store, &run.id, &quarantine, &mut chains)
                .await
                .map_err(|e| fail(anyhow::anyhow!("writing the report: {e}")))?;
        } else {
            audit_text(&store, &run.id).await?;
            let mut first = true;
            while let Some(page) = chains.next().await.map_err(|e| fail(e.into()))? {
                if first {
                    println!();
                    first = false;
                }
                print!("{}", report::chains_text(&stages, &page.chains()));
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
    if let Some(path) = &a.html {
        report::write_html(&store, &rep, path)
            .await
            .map_err(|e| exit(EXIT_ERROR, e))?;
        if !a.json {
            eprintln!("wrote {}", path.display());
        }
    }
    if a.json {
        let details = report::Details::load(&store, &rep).await?;
        println!("{}", report::full_json(&rep, &details));
    } else {
        print!("{}", rep.to_text());
    }
    Ok(EXIT_OK)
}

/// `report --items` as text: the attempts of this run's batches (each attempt belongs to
/// exactly one run) as one table. A run of one page of items (see
/// [`crate::store::AUDIT_ITEMS`]) is laid out whole, to the terminal's width; a larger one is
/// read twice, a page at a time: once for the widths of its columns, then printed page by
/// page at those widths (the same table; on a terminal too narrow for it, its widest
/// columns narrowed to fit), so what it holds is a page of attempts, not the run's.
async fn audit_text<S: Store>(store: &S, run_id: &str) -> Result<(), Exit> {
    use std::io::Write;
    let items = store.audit_items(run_id).await?;
    if items.is_empty() {
        println!("run {run_id}: no attempt (nothing was sent by this run)");
        return Ok(());
    }
    let ids = store.audit_record_ids(run_id).await?;
    let page = |items: &[i64]| {
        let ids = &ids;
        let items = items.to_vec();
        async move {
            let mut rows = store.audit_page(run_id, &items).await?;
            for r in &mut rows {
                if let Some(list) = ids.get(&r.item_id) {
                    r.record_ids.clone_from(list);
                }
            }
            Ok::<_, crate::store::StoreError>(rows)
        }
    };
    let pages: Vec<&[i64]> = items.chunks(crate::store::AUDIT_ITEMS).collect();
    let width = report::terminal_width();
    if let [only] = pages[..] {
        print!("{}", report::audit_text(&page(only).await?, width));
        return Ok(());
    }
    let mut widths = report::AuditWidths::default();
    for items in &pages {
        widths.observe(&page(items).await?);
    }
    let widths = widths.within(width);
    for (i, items) in pages.iter().enumerate() {
        let text = report::audit_text_page(&page(items).await?, &widths, i == 0);
        std::io::stdout()
            .write_all(text.as_bytes())
            .map_err(|e| exit(EXIT_ERROR, anyhow::anyhow!("writing the report: {e}")))?;
    }
    Ok(())
}

/// `report --items --json`: one object (its keys in the order the whole object printed with
/// serde_json had them: `attempts`, `quarantined`, `records`, `run_id`), written an attempt and
/// a record at a time, both read a page at a time; `records` is null for a one-stage run. A
/// run's audit as one JSON value took about 1.5 GB at 100,000 records through two stages;
/// written as it goes with the attempts read whole, a 204 MB peak; with them in pages, 77 MB.
async fn items_json<S: Store>(
    store: &S,
    run_id: &str,
    quarantine: &[serde_json::Value],
    chains: &mut report::ChainPages<'_, S>,
) -> anyhow::Result<()> {
    use std::io::Write;
    let ids = store.audit_record_ids(run_id).await?;
    let mut w = std::io::BufWriter::new(std::io::stdout());
    w.write_all(b"{\"attempts\":[")?;
    let mut first = true;
    for items in store
        .audit_items(run_id)
        .await?
        .chunks(crate::store::AUDIT_ITEMS)
    {
        for mut r in store.audit_page(run_id, items).await? {
            if !first {
                w.write_all(b",")?;
            }
            first = false;
            if let Some(list) = ids.get(&r.item_id) {
                r.record_ids.clone_from(list);
            }
            serde_json::to_writer(&mut w, &report::audit_json(&r))?;
        }
    }
    w.write_all(b"],\"quarantined\":")?;
    serde_json::to_writer(&mut w, quarantine)?;
    w.write_all(b",\"records\":")?;
    let mut first = true;
    while let Some(page) = chains.next().await? {
        for c in page.chains() {
            w.write_all(if first { b"[" } else { b"," })?;
            first = false;
            serde_json::to_writer(&mut w, &report::chain_json(chains.stages(), &c))?;
        }
    }
    w.write_all(if first { b"null" } else { b"]" })?;
    w.write_all(b",\"run_id\":")?;
    serde_json::to_writer(&mut w, run_id)?;
    w.write_all(b"}\n")?;
    Ok(w.flush()?)
}
