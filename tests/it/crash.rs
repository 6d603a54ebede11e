//! Crash safety, judged from outside: the real binary runs as a child against a simulator
//! hosted by the test, is killed (SIGKILL at random moments, or aborted at named crash
//! points), and restarted until the run completes. Then the simulator's record and the store
//! must agree: no custom_id in two created batches, every item final, ledger = bill,
//! `integrity_check` ok, no orphan provider batch.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nightshift::cost::Usd;
use nightshift::sim::{SimHandle, SimSettings};
use nightshift::store::SqlStore;
use serde_json::Value;
use tokio::process::Command;

use crate::common::*;

/// Crash points compiled in with `--features failpoints` (docs/reliability.md, B6).
pub const FAILPOINTS: &[&str] = &[
    "ingest.mid_tx",
    "ingest.after_chunk",
    "plan.mid_tx",
    "plan.after_commit",
    "build.mid_write",
    "upload.before_send",
    "upload.after_send",
    "create.before_send",
    "create.after_send",
    "create.after_store",
    "poll.after_get",
    "download.mid",
    "apply.after_chunk",
    "finish.before_commit",
    "retry.mid_tx",
    "output.mid_write",
];

pub const MAX_ATTEMPTS: u32 = 4;

/// One pipeline, its folder, its store and the simulator it talks to.
pub struct Scenario {
    pub dir: tempfile::TempDir,
    pub pipeline: PathBuf,
    pub db: PathBuf,
    pub sim: SimHandle,
    pub records: AtomicUsize,
    pub valid_records: AtomicUsize,
}

/// The weather of the crash tests: every kind of provider fault, a little of each.
pub fn stormy() -> SimSettings {
    SimSettings {
        batch_seconds: 0.2,
        fail_rate: 0.03,
        invalid_json_rate: 0.02,
        expire_first: 1,
        http_429_rate: 0.02,
        http_500_rate: 0.01,
        drop_create_rate: 0.1,
        reset_download_rate: 0.1,
        retry_after_ms: 20,
        ..Default::default()
    }
}

pub async fn scenario(records: usize, per_batch: u32, settings: SimSettings) -> Scenario {
    scenario_for(Provider::OpenAi, records, per_batch, settings).await
}

/// The provider a scenario's pipeline talks to (all served by the test's simulator).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    OpenAi,
    Azure,
    Anthropic,
    Gemini,
    /// OpenAI chat completions, online mode.
    Online,
    /// Anthropic messages, online mode.
    AnthropicOnline,
}

impl Provider {
    fn lines(self, sim: &SimHandle) -> String {
        let (kind, model, base, extra) = match self {
            Provider::OpenAi => ("openai", "gpt-5.4-mini", sim.base_url(), ""),
            Provider::Azure => (
                "azure",
                "gpt-4.1-mini",
                sim.root_url(),
                "deployment = \"gpt-4.1-mini\"\n",
            ),
            Provider::Anthropic => ("anthropic", "claude-haiku-4-5", sim.root_url(), ""),
            Provider::Gemini => ("gemini", "gemini-2.5-flash", sim.root_url(), ""),
            Provider::Online => (
                "openai",
                "gpt-5.4-nano",
                sim.base_url(),
                "mode = \"online\"\nconcurrency = 4\n",
            ),
            Provider::AnthropicOnline => (
                "anthropic",
                "claude-haiku-4-5",
                sim.root_url(),
                "mode = \"online\"\nconcurrency = 4\n",
            ),
        };
        format!(
            "kind = \"{kind}\"\nmodel = \"{model}\"\n{extra}simulate = false\nbase_url = \"{base}\"\napi_key_env = \"NS_CRASH_KEY\"\nreconcile_grace_seconds = 0\n"
        )
    }
}

pub async fn scenario_for(
    provider: Provider,
    records: usize,
    per_batch: u32,
    settings: SimSettings,
) -> Scenario {
    let dir = tempfile::tempdir().unwrap();
    let src = write_source(dir.path(), records, 5, 2);
    let sim = start_sim(settings).await;
    let pipeline = write_pipeline(dir.path(), MAX_ATTEMPTS, per_batch, "");
    // Point the pipeline at the test's simulator, as at a real provider.
    let text = std::fs::read_to_string(&pipeline).unwrap().replace(
        "kind = \"openai\"\nmodel = \"gpt-5.4-mini\"\nsimulate = true\n",
        &provider.lines(&sim),
    );
    std::fs::write(&pipeline, text).unwrap();
    let db = dir.path().join(".nightshift/state.db");
    Scenario {
        dir,
        pipeline,
        db,
        sim,
        records: AtomicUsize::new(records),
        valid_records: AtomicUsize::new(src.valid),
    }
}

impl Scenario {
    /// New records arrive (the source grows; earlier lines stay as they were).
    pub fn grow(&self, more: usize) {
        let n = self.records.fetch_add(more, Ordering::SeqCst) + more;
        let src = write_source(self.dir.path(), n, 5, 2);
        self.valid_records.store(src.valid, Ordering::SeqCst);
    }

    pub fn child(&self, failpoints: Option<&str>) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_nightshift"));
        c.arg("run")
            .arg(&self.pipeline)
            .arg("--no-progress")
            .env("NS_CRASH_KEY", "sk-crash-test")
            .env("NIGHTSHIFT_LOG", "nightshift=error")
            .env_remove("NIGHTSHIFT_DB")
            .env_remove("RUST_LOG")
            .env_remove("NIGHTSHIFT_FAILPOINTS")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(fp) = failpoints {
            c.env("NIGHTSHIFT_FAILPOINTS", fp);
        }
        c
    }

    /// Runs the child until it finishes normally (exit 0 or 1); returns the runs it took.
    pub async fn run_until_done(&self) -> usize {
        for n in 1..=40 {
            let out = self.child(None).output().await.unwrap();
            match out.status.code() {
                Some(0) | Some(1) => return n,
                Some(75) => continue,
                other => panic!(
                    "recovery run ended with {other:?}:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                ),
            }
        }
        panic!("the pipeline never completed");
    }
}

/// The oracle's verdict.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub duplicate_submissions: u64,
    pub lost: u64,
    pub ledger_delta_tokens: u64,
    pub ledger_delta_usd: Usd,
    pub orphan_batches: u64,
}

pub async fn judge(sc: &Scenario) -> Verdict {
    let store = SqlStore::open_sqlite(&sc.db).await.unwrap();
    let v = judge_store(sc, &store).await;
    store.close().await;
    v
}

/// The oracle against a store of either engine.
pub async fn judge_store(sc: &Scenario, store: &SqlStore) -> Verdict {
    let rec = record(&sc.sim).await;
    assert_eq!(store.integrity_check().await.unwrap(), "ok");

    // 1. custom_ids in more than one created batch (or answered online more than once).
    let by_cid = requests_by_custom_id(&rec);
    let mut duplicate_submissions: u64 = by_cid.values().map(|v| v.len() as u64 - 1).sum();
    let mut online_seen = HashSet::new();
    for o in rec["online"].as_array().unwrap() {
        let cid = o["custom_id"].as_str().unwrap();
        if !online_seen.insert(cid.to_string()) || by_cid.contains_key(cid) {
            duplicate_submissions += 1;
        }
    }

    // 2. items not final, and valid records without a result in the last run.
    let (lost,): (i64,) = one(
        store,
        "SELECT COUNT(*) FROM items WHERE state NOT IN ('succeeded', 'exhausted')",
    )
    .await;
    let (last,): (String,) = one(
        store,
        "SELECT id FROM runs ORDER BY started_at DESC, id DESC LIMIT 1",
    )
    .await;
    // A run id is a UUID we generated: safe to inline.
    let (recorded,): (i64,) = one(
        store,
        &format!("SELECT COUNT(*) FROM records WHERE run_id = '{last}'"),
    )
    .await;
    let missing_records = sc.valid_records.load(Ordering::SeqCst) as i64 - recorded;
    let out = std::fs::read_to_string(sc.dir.path().join("out/results.jsonl")).unwrap();
    let pending_lines = out
        .lines()
        .filter(|l| l.contains("\"status\":\"pending\""))
        .count();

    // 3. ledger vs bill, per custom_id, in tokens and pico-dollars.
    let rows: Vec<(String, i64, i64, i64, i64, i64)> = all(
        store,
        "SELECT custom_id, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, cost_pico FROM ledger",
    )
    .await;
    let mut ours: HashMap<String, [i64; 5]> = HashMap::new();
    for r in rows {
        let prev = ours.insert(r.0, [r.1, r.2, r.3, r.4, r.5]);
        assert!(prev.is_none(), "two ledger rows for one custom_id");
    }
    let mut delta_tokens = 0u64;
    let mut delta_pico = 0i128;
    let mut billed_ids = HashSet::new();
    for e in rec["bill"]["per_custom_id"].as_array().unwrap() {
        let cid = e["custom_id"].as_str().unwrap().to_string();
        let bill = [
            e["input_tokens"].as_i64().unwrap(),
            e["cached_input_tokens"].as_i64().unwrap(),
            e["output_tokens"].as_i64().unwrap(),
            e["reasoning_tokens"].as_i64().unwrap(),
        ];
        let cost = Usd::parse(e["cost_usd"].as_str().unwrap()).unwrap().pico();
        let l = ours.get(&cid).copied().unwrap_or_default();
        for k in 0..4 {
            delta_tokens += (l[k] - bill[k]).unsigned_abs();
        }
        delta_pico += (l[4] as i128 - cost).abs();
        billed_ids.insert(cid);
    }
    for (cid, l) in &ours {
        if !billed_ids.contains(cid) {
            delta_tokens += (l[0] + l[2]).unsigned_abs();
            delta_pico += l[4] as i128;
        }
    }

    // 4. every batch the simulator created is one of ours, under the id we stored.
    let ours_batches: HashSet<String> = all::<(String,)>(
        store,
        "SELECT provider_batch_id FROM batches WHERE provider_batch_id IS NOT NULL",
    )
    .await
    .into_iter()
    .map(|(id,)| id)
    .collect();
    let orphan_batches = rec["batches"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| !ours_batches.contains(b["id"].as_str().unwrap()))
        .count() as u64;

    // 5. the attempt cap held, and uploaded files are the bytes we planned.
    let (max_attempt,): (i64,) = one(
        store,
        "SELECT CAST(COALESCE(MAX(attempt_no), 0) AS BIGINT) FROM attempts",
    )
    .await;
    assert!(
        max_attempt <= MAX_ATTEMPTS as i64,
        "attempt {max_attempt} over the cap"
    );
    let files: Vec<(String, Option<String>)> = all(
        store,
        "SELECT id, file_sha256 FROM batches WHERE input_file_id IS NOT NULL",
    )
    .await;
    for (id, sha) in files {
        let name = format!("{id}.jsonl");
        let uploads: Vec<&Value> = rec["uploads"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|u| u["filename"] == name.as_str())
            .collect();
        assert!(!uploads.is_empty(), "batch {id}: no upload");
        for u in uploads {
            assert_eq!(
                u["sha256"].as_str(),
                sha.as_deref(),
                "batch {id}: uploaded bytes differ"
            );
        }
    }
    Verdict {
        duplicate_submissions,
        lost: lost as u64 + missing_records.max(0) as u64 + pending_lines as u64,
        ledger_delta_tokens: delta_tokens,
        ledger_delta_usd: Usd::from_pico(delta_pico),
        orphan_batches,
    }
}

fn assert_clean(v: &Verdict, what: &str) {
    assert_eq!(
        v,
        &Verdict::default(),
        "{what}: duplicate_submissions, lost, ledger deltas and orphans must all be zero"
    );
}

/// A small deterministic generator for kill times (seed printed).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Kills the child `kills` times at random moments within `window_ms` of its start. When a
/// run gets to finish before its kill, new records arrive, so there is always work to cut.
pub async fn random_kills(sc: &Scenario, kills: u32, seed: u64, window_ms: u64) -> u32 {
    let mut rng = Rng(seed | 1);
    let mut done = 0;
    let mut spawned = 0;
    while done < kills && spawned < kills * 4 {
        spawned += 1;
        let mut child = sc.child(None).spawn().unwrap();
        let wait = Duration::from_millis(rng.next() % window_ms);
        tokio::select! {
            status = child.wait() => {
                if matches!(status.unwrap().code(), Some(0) | Some(1)) {
                    sc.grow(200);
                }
            }
            _ = tokio::time::sleep(wait) => {
                child.start_kill().unwrap();
                let _ = child.wait().await;
                done += 1;
            }
        }
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_sigkills_never_double_submit_or_lose_anything() {
    let seed = std::env::var("NIGHTSHIFT_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("random kills: seed {seed} (NIGHTSHIFT_CRASH_SEED={seed} repeats it)");
    let sc = scenario(2000, 250, stormy()).await;
    let kills = random_kills(&sc, 25, seed, 2500).await;
    sc.run_until_done().await;
    let v = judge(&sc).await;
    eprintln!("kills={kills} {v:?}");
    assert_clean(&v, &format!("seed {seed}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failpoint_at_hits_one_to_three_recovers_cleanly() {
    if !cfg!(feature = "failpoints") {
        eprintln!("skipped: build with `--features failpoints` to sweep the named crash points");
        return;
    }
    let started = Instant::now();
    // Two scenarios at a time: this machine has two cores.
    let cases: Vec<(&str, u32)> = FAILPOINTS
        .iter()
        .flat_map(|fp| (1..=3).map(move |hit| (*fp, hit)))
        .collect();
    let mut tripped = 0;
    for pair in cases.chunks(2) {
        let runs = pair.iter().map(|&(fp, hit)| async move {
            let sc = scenario(2000, 250, stormy()).await;
            let spec = format!("{fp}={hit}");
            let out = sc.child(Some(&spec)).output().await.unwrap();
            let aborted = out.status.code().is_none();
            if !aborted {
                assert!(
                    matches!(out.status.code(), Some(0) | Some(1) | Some(75)),
                    "{spec}: {:?}\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            sc.run_until_done().await;
            let v = judge(&sc).await;
            assert_clean(&v, &spec);
            aborted
        });
        for aborted in futures_util::future::join_all(runs).await {
            tripped += aborted as u32;
        }
    }
    eprintln!(
        "failpoints={} tripped={tripped} in {:.0}s",
        cases.len(),
        started.elapsed().as_secs_f64()
    );
    // Every point is reached at least once in a 2,000-item run.
    assert!(
        tripped as usize >= FAILPOINTS.len(),
        "only {tripped} crash points fired"
    );
}

/// The soak: `NIGHTSHIFT_SOAK_KILLS` random kills (default 200) plus the failpoint sweep,
/// judged once at the end. `cargo test --release --features failpoints -- --ignored soak`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn soak() {
    let kills: u32 = std::env::var("NIGHTSHIFT_SOAK_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("soak: seed {seed}");
    let sc = scenario(2000, 250, stormy()).await;
    let mut done = 0;
    let mut failpoints = 0;
    let mut rng = Rng(seed | 1);
    while done < kills {
        // Every fifth crash is a named failpoint at a random hit, the rest SIGKILLs.
        if cfg!(feature = "failpoints") && rng.next().is_multiple_of(5) {
            let fp = FAILPOINTS[(rng.next() % FAILPOINTS.len() as u64) as usize];
            let spec = format!("{fp}={}", 1 + rng.next() % 3);
            let out = sc.child(Some(&spec)).output().await.unwrap();
            if out.status.code().is_none() {
                failpoints += 1;
                done += 1;
            }
        } else {
            done += random_kills(&sc, 1, rng.next(), 2500).await;
        }
        // Now and then let a run finish: the next runs find everything done and must send
        // nothing (a duplicate would show in the record).
        if rng.next().is_multiple_of(10) {
            sc.run_until_done().await;
        }
    }
    sc.run_until_done().await;
    let v = judge(&sc).await;
    println!(
        "kills={done} failpoints={failpoints} duplicate_submissions={} lost={} ledger_delta_tokens={} ledger_delta_usd={}",
        v.duplicate_submissions,
        v.lost,
        v.ledger_delta_tokens,
        v.ledger_delta_usd.to_decimal_string()
    );
    assert_clean(&v, "soak");
    assert_eq!(v.orphan_batches, 0);
}
