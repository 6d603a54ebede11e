//! The fault matrix of docs/reliability.md (B6) for a single SQLite runner, beyond what the crash
//! sweep covers: overlapping runs, SIGTERM, a full disk, detach and collect, cancel, odd
//! result files, lost create responses, oversized downloads.

use std::time::{Duration, Instant};

use nightshift::sim::SimSettings;
use nightshift::store::{RunStatus, Store};

use crate::common::*;
use crate::crash::*;

fn slow(batch_seconds: f64) -> SimSettings {
    SimSettings {
        batch_seconds,
        retry_after_ms: 20,
        ..Default::default()
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn bin() -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_nightshift"));
    c.env_remove("NIGHTSHIFT_DB")
        .env_remove("RUST_LOG")
        .env_remove("NIGHTSHIFT_FAILPOINTS")
        .env("NS_CRASH_KEY", "sk-crash-test");
    c
}

/// B6 #20: two overlapping cron runs on one store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_on_the_same_store_exits_75_naming_the_holder() {
    let sc = scenario(300, 100, slow(3.0)).await;
    let mut first = sc.child(None).spawn().unwrap();
    let pid = first.id().unwrap();
    let lock = sc.db.with_file_name("state.db.lock");
    wait_for("the first run's lock", || {
        std::fs::read_to_string(&lock).is_ok_and(|s| s.contains("pid"))
    })
    .await;
    let second = sc.child(None).output().await.unwrap();
    assert_eq!(second.status.code(), Some(75));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains(&format!("pid {pid}")), "{err}");
    assert!(err.contains("on host") && err.contains("since"), "{err}");
    first.start_kill().unwrap();
    let _ = first.wait().await;
    // A lock left by a killed run is simply free.
    sc.run_until_done().await;
    assert_eq!(judge(&sc).await, Verdict::default());
}

/// B6 #23: SIGTERM finishes the current step, keeps everything, exits 75 promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_a_rerun_completes() {
    let sc = scenario(600, 100, slow(2.0)).await;
    let mut child = sc.child(None).spawn().unwrap();
    let pid = child.id().unwrap() as i32;
    // Let it submit its batches.
    let sim = &sc.sim;
    let t = Instant::now();
    loop {
        let rec = record(sim).await;
        if rec["batches"].as_array().unwrap().len() >= 3 || t.elapsed() > Duration::from_secs(20) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let sent = Instant::now();
    let status = child.wait().await.unwrap();
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "took {:?}",
        sent.elapsed()
    );
    assert_eq!(status.code(), Some(75));
    let store = nightshift::store::SqlStore::open_sqlite(&sc.db)
        .await
        .unwrap();
    let run = store.last_run(None).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Interrupted);
    store.close().await;
    sc.run_until_done().await;
    assert_eq!(judge(&sc).await, Verdict::default());
}

/// B6 #21: the disk fills up (a file-size limit): exit 2, the store stays consistent, and a
/// later run completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_with_exit_2_and_a_rerun_completes() {
    let sc = scenario(2000, 250, slow(0.2)).await;
    let cmd = format!(
        "ulimit -f 600; exec '{}' run '{}' --no-progress",
        env!("CARGO_BIN_EXE_nightshift"),
        sc.pipeline.display()
    );
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("NS_CRASH_KEY", "sk-crash-test")
        .env_remove("NIGHTSHIFT_DB")
        .env_remove("NIGHTSHIFT_FAILPOINTS")
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.starts_with("error:") || err.contains("\nerror:"),
        "{err}"
    );
    // The cause is what is reported, and nothing half-written is left behind.
    assert!(!err.contains("transaction depth"), "{err}");
    let work = sc.pipeline.parent().unwrap();
    let leftovers: Vec<_> = walkdir(work)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    sc.run_until_done().await;
    assert_eq!(judge(&sc).await, Verdict::default());
}

/// `--detach` sends what is ready and exits; `status` shows it in flight; the next `run`
/// collects it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_then_run_collects_and_status_shows_what_is_in_flight() {
    let sc = scenario(400, 100, slow(3.0)).await;
    let t = Instant::now();
    let out = sc
        .child(None)
        .arg("--detach")
        .stdout(std::process::Stdio::piped())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "detach waited for the provider"
    );
    let run_id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("detached "))
        .unwrap_or_else(|| panic!("no run id printed:\n{stdout}"))
        .to_string();
    let status = bin()
        .arg("status")
        .arg(&sc.pipeline)
        .output()
        .await
        .unwrap();
    let st = String::from_utf8_lossy(&status.stdout);
    assert_eq!(
        st.lines().filter(|l| l.contains("submitted")).count(),
        4,
        "{st}"
    );
    assert!(st.contains("batch_"), "{st}");
    let json = bin()
        .args(["status", "--json"])
        .arg(&sc.pipeline)
        .output()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["in_flight"].as_array().unwrap().len(), 4);

    sc.run_until_done().await;
    assert_eq!(judge(&sc).await, Verdict::default());
    // The detached run carries the cost of what it sent.
    let store = nightshift::store::SqlStore::open_sqlite(&sc.db)
        .await
        .unwrap();
    let f = store.run_figures(&run_id).await.unwrap();
    assert!(
        f.attempts >= f.unique_items && f.ledger.cost.pico() > 0,
        "{f:?}"
    );
    store.close().await;
    let status = bin()
        .arg("status")
        .arg(&sc.pipeline)
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&status.stdout).contains("no batch in flight"));
}

/// `cancel` stops what is in flight; what ran before is billed and recorded; the next run
/// sends the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_in_flight_batches_and_records_what_was_billed() {
    let sc = scenario(400, 200, slow(4.0)).await;
    let out = sc.child(None).arg("--detach").output().await.unwrap();
    assert_eq!(out.status.code(), Some(0));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = bin()
        .arg("cancel")
        .arg(&sc.pipeline)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("cancel requested"), "{stdout}");
    assert!(
        stdout.contains("billed for requests that ran before the cancel"),
        "{stdout}"
    );
    let rec = record(&sc.sim).await;
    let statuses: Vec<&str> = rec["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["status"].as_str().unwrap())
        .collect();
    assert!(statuses.iter().all(|s| *s == "cancelled"), "{statuses:?}");
    assert!(
        rec["bill"]["totals"]["requests"].as_u64().unwrap() > 0,
        "some requests ran before the cancel"
    );
    // What was billed is in the ledger already.
    let store = nightshift::store::SqlStore::open_sqlite(&sc.db)
        .await
        .unwrap();
    assert!(store.open_batches(None).await.unwrap().is_empty());
    store.close().await;
    sc.run_until_done().await;
    assert_eq!(judge(&sc).await, Verdict::default());
}

/// `cancel` of a batch that never reached the provider takes its attempts back: the items
/// keep every one of their `max_attempts`, and the next run sends them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_what_was_never_sent_costs_no_attempt() {
    if !cfg!(feature = "failpoints") {
        eprintln!("skipped: build with `--features failpoints` to stop a run after planning");
        return;
    }
    let sc = scenario(400, 100, slow(0.2)).await;
    // The run dies right after committing its first batch plan: nothing was sent.
    let out = sc
        .child(Some("plan.after_commit=1"))
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), None, "the failpoint did not fire");
    let out = bin()
        .arg("cancel")
        .arg(&sc.pipeline)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("cancelled before it was sent"), "{stdout}");
    let store = nightshift::store::SqlStore::open_sqlite(&sc.db)
        .await
        .unwrap();
    let (attempts,): (i64,) = one(&store, "SELECT COUNT(*) FROM attempts").await;
    let (tried,): (i64,) = one(
        &store,
        "SELECT COUNT(*) FROM items WHERE attempts > 0 OR state <> 'pending'",
    )
    .await;
    assert_eq!((attempts, tried), (0, 0));
    store.close().await;
    assert!(
        record(&sc.sim).await["batches"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    sc.run_until_done().await;
    assert_eq!(judge(&sc).await, Verdict::default());
}

/// B6 #11 and #12: duplicate result lines count once, missing lines are retried, lines for
/// custom_ids we never sent are recorded as anomalies and never applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_result_files_are_anomalies_not_charges() {
    let sc = scenario(
        1000,
        250,
        SimSettings {
            duplicate_line_rate: 0.05,
            missing_line_rate: 0.03,
            unknown_lines: 2,
            ..slow(0.2)
        },
    )
    .await;
    sc.run_until_done().await;
    assert_eq!(judge(&sc).await, Verdict::default());
    let store = nightshift::store::SqlStore::open_sqlite(&sc.db)
        .await
        .unwrap();
    let kinds: Vec<(String, i64)> =
        sqlx::query_as("SELECT kind, COUNT(*) FROM anomalies GROUP BY kind ORDER BY kind")
            .fetch_all(store.sqlite_pool().unwrap())
            .await
            .unwrap();
    let get = |k: &str| kinds.iter().find(|(n, _)| n == k).map(|x| x.1).unwrap_or(0);
    assert!(get("duplicate_line") > 0, "{kinds:?}");
    assert!(get("unknown_custom_id") >= 2, "{kinds:?}");
    let missing: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM attempts WHERE verdict = 'missing'")
            .fetch_one(store.sqlite_pool().unwrap())
            .await
            .unwrap();
    assert!(missing > 0, "missing lines became failed attempts");
    store.close().await;
}

/// B6 #6: every create response is lost after the batch was created; each is found by its
/// metadata and adopted, never created twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_create_responses_are_adopted_not_resent() {
    let sc = scenario(
        500,
        100,
        SimSettings {
            drop_create_rate: 1.0,
            ..slow(0.2)
        },
    )
    .await;
    sc.run_until_done().await;
    assert_eq!(judge(&sc).await, Verdict::default());
    let rec = record(&sc.sim).await;
    let store = nightshift::store::SqlStore::open_sqlite(&sc.db)
        .await
        .unwrap();
    let ours: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM batches")
        .fetch_one(store.sqlite_pool().unwrap())
        .await
        .unwrap();
    assert_eq!(rec["batches"].as_array().unwrap().len() as i64, ours);
    store.close().await;
}

/// B6 #13: a result file over the download cap is refused (recorded, not applied) and the
/// run still ends, its items retried and then failed, not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_result_file_is_refused_not_read() {
    let dir = tempfile::tempdir().unwrap();
    write_source(dir.path(), 30, 0, 0);
    let file = write_pipeline(dir.path(), 2, 100, "");
    let text = std::fs::read_to_string(&file).unwrap().replace(
        "simulate = true",
        "simulate = true\nmax_download_bytes = 2000",
    );
    std::fs::write(&file, text).unwrap();
    let sim = start_sim(slow(0.1)).await;
    let db = dir.path().join("state.db");
    let (outcome, store) = run_against(&sim, &file, &db).await;
    assert_eq!(outcome.exit_code, 1);
    let f = store.run_figures(&outcome.run_id).await.unwrap();
    assert_eq!((f.exhausted, f.unfinished), (30, 0));
    assert!(store.anomaly_count(&outcome.run_id).await.unwrap() >= 2);
    store.close().await;
}

/// Every file under `dir`.
fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walkdir(&p));
        } else {
            out.push(p);
        }
    }
    out
}
