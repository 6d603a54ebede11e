//! Several workers on one PostgreSQL store, judged from outside: four `nightshift worker`
//! processes and the `nightshift run` that loads the source share the work against a
//! simulator with every kind of fault, while one worker after another is killed with
//! SIGKILL and restarted. Afterwards the simulator's record and the store must agree: no
//! custom_id in two created batches, every item final, ledger = bill, no orphan batch.

use std::process::Stdio;
use std::time::Duration;

use nightshift::sim::SimSettings;
use nightshift::store::Store;
use tokio::process::{Child, Command};

use crate::common::*;
use crate::crash::{
    Provider, STAGE_FAILPOINTS, Scenario, Shape, Verdict, judge_store, scenario_with, stormy,
};

const WORKERS: usize = 4;
/// Short leases so a killed worker's batches are adopted within seconds.
const LEASE_SECONDS: &str = "3";

/// A scenario whose pipeline answers quickly enough for a 3-second lease.
async fn shared_scenario(records: usize, per_batch: u32, weather: SimSettings) -> Scenario {
    shared(Shape::OneStage, records, per_batch, weather).await
}

async fn shared(shape: Shape, records: usize, per_batch: u32, weather: SimSettings) -> Scenario {
    let sc = scenario_with(shape, Provider::OpenAi, records, per_batch, weather).await;
    let text = std::fs::read_to_string(&sc.pipeline).unwrap().replace(
        "reconcile_grace_seconds = 0\n",
        "reconcile_grace_seconds = 0\nrequest_timeout_seconds = 1\n",
    );
    std::fs::write(&sc.pipeline, text).unwrap();
    sc
}

fn command(sc: &Scenario, url: &str, log: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nightshift"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(sc.dir.path().join(log))
        .unwrap();
    c.env("NS_CRASH_KEY", "sk-crash-test")
        .env("NIGHTSHIFT_DB", url)
        .env("NIGHTSHIFT_LEASE_SECONDS", LEASE_SECONDS)
        .env("NIGHTSHIFT_LOG", "nightshift=warn")
        .env_remove("RUST_LOG")
        .env_remove("NIGHTSHIFT_FAILPOINTS")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true);
    c
}

fn worker(sc: &Scenario, url: &str, i: usize) -> Child {
    command(sc, url, &format!("worker-{i}.log"))
        .arg("worker")
        .arg(&sc.pipeline)
        .spawn()
        .unwrap()
}

/// For a worker started now: a crash point of advancing to abort at, one time in three on a
/// staged pipeline.
fn arm(staged: bool, next: &mut impl FnMut() -> u64) -> Option<String> {
    if !staged || !next().is_multiple_of(3) {
        return None;
    }
    let fp = STAGE_FAILPOINTS[(next() % STAGE_FAILPOINTS.len() as u64) as usize];
    Some(format!("{fp}={}", 1 + next() % 3))
}

/// A worker process, and the crash point it was started to abort at, if any.
struct Worker {
    child: Child,
    armed: Option<String>,
}

impl Worker {
    fn start(sc: &Scenario, url: &str, i: usize, failpoint: Option<String>) -> Worker {
        let mut c = command(sc, url, &format!("worker-{i}.log"));
        if let Some(fp) = &failpoint {
            c.env("NIGHTSHIFT_FAILPOINTS", fp);
        }
        Worker {
            child: c.arg("worker").arg(&sc.pipeline).spawn().unwrap(),
            armed: failpoint,
        }
    }

    /// Whether the worker ended by itself, which it may only do at its crash point.
    fn aborted(&mut self, sc: &Scenario) -> bool {
        use std::os::unix::process::ExitStatusExt;
        let Some(status) = self.child.try_wait().unwrap() else {
            return false;
        };
        assert!(
            self.armed.is_some() && status.signal() == Some(libc::SIGABRT),
            "a worker ended by itself ({status:?}, failpoint {:?})\n{}",
            self.armed,
            logs(sc)
        );
        true
    }
}

fn runner(sc: &Scenario, url: &str) -> Child {
    command(sc, url, "run.log")
        .arg("run")
        .arg(&sc.pipeline)
        .arg("--no-progress")
        .spawn()
        .unwrap()
}

fn logs(sc: &Scenario) -> String {
    let mut out = String::new();
    for name in [
        "run.log",
        "worker-0.log",
        "worker-1.log",
        "worker-2.log",
        "worker-3.log",
    ] {
        let text = std::fs::read_to_string(sc.dir.path().join(name)).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        out.push_str(&format!("--- {name}\n"));
        for l in tail.into_iter().rev() {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

fn signal(c: &Child, sig: libc::c_int) {
    if let Some(pid) = c.id() {
        // SAFETY: sending a signal to a child we spawned and still own.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }
}

fn sigterm(c: &Child) {
    signal(c, libc::SIGTERM);
}

/// Waits (up to a minute) until a query's one count is zero.
async fn until_zero(db: &TestDb, sql: &str) {
    let t = std::time::Instant::now();
    loop {
        let (n,): (i64,) = one(&db.store, sql).await;
        if n == 0 {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "still {n}: {sql}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(pg_tests),
    ignore = "NIGHTSHIFT_TEST_PG_URL is not set: PostgreSQL tests skipped (CI sets it)"
)]
async fn four_workers_killed_one_by_one_never_double_submit_or_lose_anything() {
    let db = TestDb::postgres("four_workers").await;
    // ~5,000 distinct items (5 % duplicates and 2 % malformed lines on top).
    let sc = shared(Shape::OneStage, 5_400, 100, kill_weather()).await;
    four_workers_killed_one_by_one(db, sc).await;
}

/// The same with three stages: every worker advances the latest run's records to their
/// next stages as the results they need come in, so several make the same later items at
/// once, and kills land in between. ~1,200 tickets: ~2,900 chunks (~2,200 distinct), a
/// summary each, 30 % reviewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(pg_tests),
    ignore = "NIGHTSHIFT_TEST_PG_URL is not set: PostgreSQL tests skipped (CI sets it)"
)]
async fn four_workers_killed_one_by_one_on_a_staged_pipeline_never_double_submit_or_lose_anything()
{
    let db = TestDb::postgres("four_workers_staged").await;
    let sc = shared(Shape::Stages, 1_200, 100, kill_weather()).await;
    four_workers_killed_one_by_one(db, sc).await;
}

/// Batches that take a second at the provider: long enough for kills to land while workers
/// hold work in every state.
fn kill_weather() -> SimSettings {
    SimSettings {
        batch_seconds: 1.0,
        ..stormy()
    }
}

/// Four workers and a run share the scenario's pipeline on `db`; one worker after another
/// is killed until the run completes; then the judge.
async fn four_workers_killed_one_by_one(db: TestDb, sc: Scenario) {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("workers: seed {seed}");
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };

    // On a staged pipeline, a third of the restarted workers abort at a crash point of
    // advancing (its first, second or third hit) while the others advance the same records.
    let staged = sc.shape == Shape::Stages && cfg!(feature = "failpoints");
    let mut workers: Vec<Worker> = (0..WORKERS)
        .map(|i| Worker::start(&sc, &db.url, i, None))
        .collect();
    let mut run = runner(&sc, &db.url);
    let (mut kills, mut tripped) = (0u32, 0u32);
    let started = std::time::Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the pipeline did not finish in 10 minutes\n{}",
            logs(&sc)
        );
        let pause = Duration::from_millis(1_000 + next() % 2_000);
        tokio::select! {
            status = run.wait() => {
                match status.unwrap().code() {
                    Some(0) | Some(1) => break,
                    // Provider unavailable for too long: run again, as cron would.
                    Some(75) => run = runner(&sc, &db.url),
                    other => panic!("the run ended with {other:?}\n{}", logs(&sc)),
                }
            }
            _ = tokio::time::sleep(pause) => {
                for (i, w) in workers.iter_mut().enumerate() {
                    if w.aborted(&sc) {
                        tripped += 1;
                        *w = Worker::start(&sc, &db.url, i, arm(staged, &mut next));
                    }
                }
                let i = (next() % WORKERS as u64) as usize;
                workers[i].child.start_kill().unwrap();
                let _ = workers[i].child.wait().await;
                kills += 1;
                workers[i] = Worker::start(&sc, &db.url, i, arm(staged, &mut next));
            }
        }
    }
    // A clean stop: every worker finishes its step, hands its leases back, exits 0. (A
    // moment first, so a worker restarted just now is up.)
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut alive = Vec::new();
    for w in &mut workers {
        if w.aborted(&sc) {
            tripped += 1;
        } else {
            sigterm(&w.child);
            alive.push(w);
        }
    }
    for w in alive {
        let status = tokio::time::timeout(Duration::from_secs(60), w.child.wait())
            .await
            .expect("a worker did not stop within 60 s of SIGTERM")
            .unwrap();
        assert_eq!(status.code(), Some(0), "{}", logs(&sc));
    }

    let v = judge_store(&sc, &db.store).await;
    let anomalies = db
        .store
        .anomalies_of_kind("duplicate_submission")
        .await
        .unwrap();
    let sent = crate::common::record(&sc.sim).await["bill"]["totals"]["requests"].clone();
    println!(
        "{:?}: workers={WORKERS} kills={kills} aborted at a crash point={tripped} requests billed={sent} duplicate_submissions={} lost={} ledger_delta_usd={}",
        sc.shape,
        v.duplicate_submissions,
        v.lost,
        v.ledger_delta_usd.to_decimal_string()
    );
    assert_eq!(
        v,
        Verdict::default(),
        "duplicate_submissions, lost, ledger deltas and orphans must all be zero\n{}",
        logs(&sc)
    );
    assert_eq!(anomalies, 0, "no duplicate submission was even attempted");
    assert!(
        kills >= 3,
        "only {kills} kills: the test did not exercise adoption"
    );
    // Nothing is left held: the stopped workers released their leases.
    let held: Vec<(i64,)> = all(
        &db.store,
        "SELECT COUNT(*) FROM batches WHERE state <> 'ingested'",
    )
    .await;
    assert_eq!(held[0].0, 0);
    db.finish().await;
}

/// Whether a process is stopped (state `T` in /proc).
fn stopped(c: &Child) -> bool {
    let Some(pid) = c.id() else { return false };
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.starts_with('T')))
        .unwrap_or(false)
}

/// A worker frozen past its lease (a long pause, a partition) between sending a create and
/// recording it: another worker adopts the batch — finding the provider batch by its local
/// id, not creating a second — and when the first wakes up its write is refused, it leaves
/// the batch alone, and nothing is sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(pg_tests),
    ignore = "NIGHTSHIFT_TEST_PG_URL is not set: PostgreSQL tests skipped (CI sets it)"
)]
async fn a_worker_paused_past_its_lease_is_fenced_out() {
    if !cfg!(feature = "failpoints") {
        eprintln!("skipped: build with `--features failpoints` to freeze a worker mid-create");
        return;
    }
    let db = TestDb::postgres("paused_worker").await;
    let weather = SimSettings {
        batch_seconds: 0.5,
        ..Default::default()
    };
    let sc = shared_scenario(600, 100, weather).await;
    let mut first = command(&sc, &db.url, "worker-0.log")
        .env("NIGHTSHIFT_FAILPOINTS", "create.after_send=1:stop")
        .arg("worker")
        .arg(&sc.pipeline)
        .spawn()
        .unwrap();
    let out = command(&sc, &db.url, "run.log")
        .arg("run")
        .arg(&sc.pipeline)
        .arg("--ingest-only")
        .status()
        .await
        .unwrap();
    assert_eq!(out.code(), Some(0), "{}", logs(&sc));
    // The first worker freezes right after its first create reached the provider.
    let t = std::time::Instant::now();
    while !stopped(&first) {
        assert!(t.elapsed() < Duration::from_secs(60), "{}", logs(&sc));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Its lease runs out; a second worker adopts every batch (new lease tokens).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut second = worker(&sc, &db.url, 1);
    until_zero(
        &db,
        "SELECT COUNT(*) FROM batches WHERE state <> 'ingested' AND lease_token = 1",
    )
    .await;
    until_zero(&db, "SELECT COUNT(*) FROM batches WHERE state IN ('planned', 'built', 'uploading', 'uploaded', 'creating')").await;
    signal(&first, libc::SIGCONT);
    let mut run = runner(&sc, &db.url);
    let status = tokio::time::timeout(Duration::from_secs(120), run.wait())
        .await
        .expect("the run did not finish")
        .unwrap();
    assert!(matches!(status.code(), Some(0) | Some(1)), "{}", logs(&sc));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for w in [&first, &second] {
        sigterm(w);
    }
    for w in [&mut first, &mut second] {
        let status = tokio::time::timeout(Duration::from_secs(60), w.wait())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.code(), Some(0), "{}", logs(&sc));
    }
    let v = judge_store(&sc, &db.store).await;
    assert_eq!(v, Verdict::default(), "{}", logs(&sc));
    assert_eq!(
        db.store
            .anomalies_of_kind("duplicate_submission")
            .await
            .unwrap(),
        0
    );
    // The second adopted the frozen create; the first, woken, was refused and let go.
    let adopted = std::fs::read_to_string(sc.dir.path().join("worker-1.log")).unwrap();
    assert!(adopted.contains("adopted batch"), "{}", logs(&sc));
    let woke = std::fs::read_to_string(sc.dir.path().join("worker-0.log")).unwrap();
    assert!(woke.contains("lease lost"), "{}", logs(&sc));
    db.finish().await;
}

/// `run` against PostgreSQL behaves as on SQLite: it completes, a second run sends nothing,
/// and `report` and `status` read the shared store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(pg_tests),
    ignore = "NIGHTSHIFT_TEST_PG_URL is not set: PostgreSQL tests skipped (CI sets it)"
)]
async fn run_against_postgres_works_as_on_sqlite() {
    let db = TestDb::postgres("run_on_pg").await;
    let sc = shared_scenario(800, 200, stormy()).await;
    let first = command(&sc, &db.url, "run.log")
        .arg("run")
        .arg(&sc.pipeline)
        .arg("--no-progress")
        .stdout(Stdio::piped())
        .output()
        .await
        .unwrap();
    assert!(
        matches!(first.status.code(), Some(0) | Some(1)),
        "{}",
        logs(&sc)
    );
    assert_eq!(judge_store(&sc, &db.store).await, Verdict::default());
    let again = command(&sc, &db.url, "run.log")
        .arg("run")
        .arg(&sc.pipeline)
        .arg("--no-progress")
        .stdout(Stdio::piped())
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(text.contains("sent       0 requests"), "{text}");
    let report = command(&sc, &db.url, "report.log")
        .args(["report", "--json"])
        .stdout(Stdio::piped())
        .output()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(v["attempts"], 0, "{v}");
    let status = command(&sc, &db.url, "status.log")
        .args(["status", "--json"])
        .stdout(Stdio::piped())
        .output()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["in_flight"].as_array().unwrap().len(), 0, "{v}");
    assert!(
        v["store"].as_str().unwrap().starts_with("postgres://"),
        "{v}"
    );
    db.finish().await;
}

/// `run --detach` against a shared store leaves batches another worker holds to that worker
/// and exits at once instead of waiting for the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(pg_tests),
    ignore = "NIGHTSHIFT_TEST_PG_URL is not set: PostgreSQL tests skipped (CI sets it)"
)]
async fn detach_leaves_batches_held_by_a_worker_to_it() {
    let db = TestDb::postgres("detach_shared").await;
    let weather = SimSettings {
        batch_seconds: 30.0,
        ..Default::default()
    };
    let sc = shared_scenario(300, 100, weather).await;
    let mut w = worker(&sc, &db.url, 0);
    let out = command(&sc, &db.url, "run.log")
        .arg("run")
        .arg(&sc.pipeline)
        .arg("--ingest-only")
        .status()
        .await
        .unwrap();
    assert_eq!(out.code(), Some(0), "{}", logs(&sc));
    // The worker plans and sends everything; the provider keeps it for 30 s.
    until_zero(&db, "SELECT COUNT(*) FROM items WHERE state = 'pending'").await;
    until_zero(
        &db,
        "SELECT COUNT(*) FROM batches WHERE state <> 'submitted'",
    )
    .await;
    let t = std::time::Instant::now();
    let out = command(&sc, &db.url, "run.log")
        .arg("run")
        .arg(&sc.pipeline)
        .args(["--detach", "--no-progress"])
        .stdout(Stdio::piped())
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", logs(&sc));
    assert!(text.contains("detached "), "{text}");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "detach waited for batches another worker holds"
    );
    // Still the worker's, still in flight.
    let (held, all): (i64, i64) = one(
        &db.store,
        "SELECT COUNT(*) FILTER (WHERE lease_owner IS NOT NULL), COUNT(*) FROM batches \
         WHERE state = 'submitted'",
    )
    .await;
    assert!(all > 0 && held == all, "{held} of {all} held");
    sigterm(&w);
    let status = tokio::time::timeout(Duration::from_secs(60), w.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", logs(&sc));
    db.finish().await;
}
