//! `nightshift status`: batches in flight and the workers holding them.

use crate::cli::args::StatusArgs;
use crate::cli::exit::{EXIT_OK, Exit};
use crate::cli::session::open_existing;
use crate::report::{self};
use crate::store::Store;
use crate::util::text;

pub(crate) async fn run(a: StatusArgs) -> Result<i32, Exit> {
    let store = open_existing(&a.db, a.file.as_deref()).await?;
    let open = store.open_batches(None).await?;
    let now = crate::util::time::now_ms();
    // Workers seen in the last day, or still named on an open batch.
    let workers = store.workers(now - 86_400_000).await?;
    let holder = |b: &crate::store::BatchRow| -> String {
        match (&b.lease_owner, b.lease_expires_at) {
            (Some(w), Some(t)) if t >= now => short_id(w),
            (Some(w), _) => format!("{} (lease ran out)", short_id(w)),
            _ => "-".into(),
        }
    };
    if a.json {
        let rows: Vec<_> = open
            .iter()
            .map(|b| {
                serde_json::json!({
                    "batch_id": b.id, "run_id": b.run_id, "pipeline": b.pipeline, "state": b.state,
                    "provider": b.provider, "provider_batch_id": b.provider_batch_id,
                    "provider_status": b.provider_status, "requests": b.request_count,
                    "age_seconds": (now - b.created_at) / 1000,
                    "lease_owner": b.lease_owner, "lease_expires_at": b.lease_expires_at,
                })
            })
            .collect();
        let ws: Vec<_> = workers
            .iter()
            .map(|w| {
                serde_json::json!({
                    "worker_id": w.id, "host": w.host, "pid": w.pid, "role": w.role,
                    "pipelines": w.pipelines, "started_at": w.started_at,
                    "heartbeat_age_seconds": (now - w.heartbeat_at) / 1000,
                    "stopped": w.stopped_at.is_some(), "batches_held": w.held,
                    "batches": open.iter().filter(|b| b.lease_owner.as_deref() == Some(w.id.as_str())).map(|b| b.id.clone()).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"store": store.location(), "in_flight": rows, "workers": ws})
        );
        return Ok(EXIT_OK);
    }
    let width = report::terminal_width();
    if !workers.is_empty() {
        let mut t = report::table(
            &[
                "worker",
                "host",
                "pid",
                "role",
                "pipelines",
                "heartbeat",
                "holds",
                "state",
            ],
            width,
        );
        for w in &workers {
            let state = match w.stopped_at {
                Some(_) => "stopped",
                None if now - w.heartbeat_at > 60_000 => "silent",
                None => "alive",
            };
            t.add_row(vec![
                short_id(&w.id),
                text::printable(&w.host),
                w.pid.to_string(),
                w.role.clone(),
                text::printable(&w.pipelines),
                format!("{} ago", age((now - w.heartbeat_at).max(0) / 1000)),
                w.held.to_string(),
                state.to_string(),
            ]);
        }
        report::align_right(&mut t, &[2, 5, 6]);
        print!("{}", report::render(&t));
        println!();
    }
    if open.is_empty() {
        println!("no batch in flight");
        return Ok(EXIT_OK);
    }
    let mut t = report::table(
        &[
            "batch",
            "pipeline",
            "state",
            "provider batch",
            "provider",
            "requests",
            "age",
            "held by",
        ],
        width,
    );
    for b in &open {
        t.add_row(vec![
            b.id.clone(),
            text::printable(&b.pipeline),
            b.state.to_string(),
            b.provider_batch_id
                .as_deref()
                .map(text::printable)
                .unwrap_or_else(|| "-".into()),
            b.provider_status
                .as_deref()
                .map(text::printable)
                .unwrap_or_else(|| "-".into()),
            b.request_count.to_string(),
            age((now - b.created_at).max(0) / 1000),
            holder(b),
        ]);
    }
    report::align_right(&mut t, &[5, 6]);
    print!("{}", report::render(&t));
    Ok(EXIT_OK)
}

/// The first 13 characters of a v7 uuid (its time part): enough to tell workers apart.
fn short_id(id: &str) -> String {
    id.chars().take(13).collect()
}

fn age(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}
