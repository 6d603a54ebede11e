//! `nightshift bench`: the end-to-end throughput benchmark.
//!
//! Writes N synthetic records, starts the simulator as a separate process (so its memory is
//! not ours) with zero processing delay, runs a pipeline through the real client, and prints
//! items/s for preparation (read, render, hash, dedupe, plan, write batch files) and for
//! results (download, parse, validate, price, store), plus this process's peak RSS. Figures
//! only: nothing here asserts a time.
//!
//! With `--workers 1,2,4` and a PostgreSQL `--db`, it measures scale-out instead: for each
//! count, a fresh schema, `nightshift run --ingest-only`, then that many `nightshift worker`
//! processes until every item is final; it prints items/s, the CPU each worker used, the
//! simulator's, and the whole machine's (the database's share is the rest). The machine may
//! have fewer cores than workers: judge the scaling per core.

use std::io::{BufRead, BufWriter, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use secrecy::SecretString;

use crate::config::Pipeline;
use crate::cost::PriceTable;
use crate::provider::http::RetryPolicy;
use crate::provider::openai::OpenAiClient;
use crate::store::SqlStore;
use crate::worker::{self, Event, Observer, RunContext};

const SCHEMA: &str = r#"{"type":"object","properties":{"label":{"enum":["billing","bug","shipping","other"]},"summary":{"type":"string","maxLength":80}},"required":["label","summary"],"additionalProperties":false}"#;

/// Kills the simulator child however the benchmark ends.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Quiet;
impl Observer for Quiet {
    fn event(&self, _: &Event) {}
}

/// Options of one benchmark run.
pub struct BenchOptions {
    pub items: u64,
    pub batch_size: u64,
    pub dir: Option<std::path::PathBuf>,
    /// Worker counts to measure (needs `db`); empty: the single-process benchmark.
    pub workers: Vec<usize>,
    /// A PostgreSQL URL for the worker benchmark.
    pub db: Option<String>,
}

/// Peak resident set size of this process, in bytes (Linux; 0 elsewhere).
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn write_records(path: &Path, n: u64) -> Result<()> {
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    for i in 0..n {
        writeln!(
            w,
            r#"{{"id":"t{i}","channel":"email","subject":"Order {i} arrived damaged","body":"Hello, my order number {i} arrived with a broken lid and a dented box. Could you send a replacement or refund? Thanks, customer {c}"}}"#,
            c = i % 9973
        )?;
    }
    w.flush()?;
    Ok(())
}

/// Starts `nightshift simulate` with zero processing delay; returns it and its URL.
fn start_simulator() -> Result<(ChildGuard, String)> {
    let exe = std::env::current_exe()?;
    let mut sim = ChildGuard(
        Command::new(exe)
            .args([
                "simulate",
                "--listen",
                "127.0.0.1:0",
                "--batch-seconds",
                "0",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the simulator")?,
    );
    let mut first = String::new();
    std::io::BufReader::new(sim.0.stdout.take().context("simulator stdout")?)
        .read_line(&mut first)?;
    let url = first
        .trim()
        .strip_prefix("listening on ")
        .context("the simulator did not say where it listens")?
        .to_string();
    Ok((sim, url))
}

/// The benchmark pipeline: synthetic tickets to the simulator at `url`.
fn pipeline_text(url: &str, batch_size: u64, key_env: Option<&str>) -> String {
    let key = key_env
        .map(|k| format!("api_key_env = \"{k}\"\n"))
        .unwrap_or_default();
    format!(
        r#"name = "bench"
[source]
kind = "jsonl"
path = "records.jsonl"
id_field = "id"
[provider]
kind = "openai"
model = "gpt-4o-mini"
base_url = "{url}/v1"
{key}poll_min_seconds = 0.05
poll_max_seconds = 0.5
reconcile_grace_seconds = 0
request_timeout_seconds = 60
[prompt]
system = "Label the support ticket."
user = "Channel: {{{{channel}}}}\nSubject: {{{{subject}}}}\n{{{{body}}}}"
max_output_tokens = 200
[output]
schema = "schema.json"
path = "out/results.jsonl"
[retry]
max_attempts = 2
[batch]
max_requests = {batch_size}
"#
    )
}

/// CPU seconds (user + system) a process has used so far, from `/proc` (Linux).
fn proc_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line (11 and 12 after the name).
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}

/// CPU seconds the whole machine has spent busy (all cores: user, nice, system, irq,
/// softirq, steal), from `/proc/stat` (Linux).
fn machine_busy_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let f: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: f64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum();
    // SAFETY: sysconf has no preconditions.
    busy / unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// Stops a child with SIGTERM and reaps it; returns (CPU seconds, peak RSS in MB, exit code).
fn stop_and_measure(child: std::process::Child) -> (f64, f64, Option<i32>) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: signalling and reaping a child this process spawned and has not waited for.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
        let mut status = 0;
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::wait4(pid, &mut status, 0, &mut ru) != pid {
            return (0.0, 0.0, None);
        }
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
        (
            secs(ru.ru_utime) + secs(ru.ru_stime),
            ru.ru_maxrss as f64 / 1024.0,
            code,
        )
    }
}

async fn run_workers(opts: &BenchOptions, dir: &Path, sim: ChildGuard, url: &str) -> Result<()> {
    use crate::store::Store;
    let db = opts
        .db
        .as_deref()
        .filter(|u| crate::store::postgres::is_postgres_url(u))
        .context("--workers measures workers sharing a PostgreSQL store: pass --db postgres://… (or NIGHTSHIFT_DB)")?;
    const KEY: &str = "NIGHTSHIFT_BENCH_KEY";
    let file = dir.join("bench.toml");
    std::fs::write(&file, pipeline_text(url, opts.batch_size, Some(KEY)))?;
    let p = Pipeline::load(&file).map_err(|e| anyhow::anyhow!("{e}"))?;
    let exe = std::env::current_exe()?;
    let sim_pid = sim.0.id();
    println!("items={} batch_size={}", opts.items, opts.batch_size);
    for &n in &opts.workers {
        let schema = format!(
            "bench_w{n}_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let store = SqlStore::open_postgres_in(db, Some(&schema)).await?;
        let child_url = crate::store::postgres::with_search_path(db, &schema);
        let cmd = |args: &[&str]| {
            let mut c = Command::new(&exe);
            c.args(args)
                .arg(&file)
                .env(KEY, "sk-bench")
                .env("NIGHTSHIFT_DB", &child_url)
                .env("NIGHTSHIFT_LEASE_SECONDS", "120")
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            c
        };
        let t = Instant::now();
        let status = cmd(&["run", "--ingest-only", "--no-progress"]).status()?;
        anyhow::ensure!(status.success(), "ingest failed: {status}");
        let ingest = t.elapsed().as_secs_f64();
        let sim_cpu_before = proc_cpu_seconds(sim_pid);
        let machine_before = machine_busy_seconds();
        let t = Instant::now();
        let mut children = Vec::new();
        for _ in 0..n {
            children.push(cmd(&["worker"]).spawn()?);
        }
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if store
                .plannable_count(&p.name, &p.first_stage().name)
                .await?
                == 0
                && store.open_batches(Some(&p.name)).await?.is_empty()
            {
                break;
            }
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(3600),
                "the workers did not finish within an hour"
            );
        }
        let wall = t.elapsed().as_secs_f64();
        let sim_cpu = proc_cpu_seconds(sim_pid) - sim_cpu_before;
        let machine = machine_busy_seconds() - machine_before;
        let measured: Vec<(f64, f64, Option<i32>)> = tokio::task::spawn_blocking(move || {
            children.into_iter().map(stop_and_measure).collect()
        })
        .await?;
        let cpu: Vec<String> = measured.iter().map(|m| format!("{:.2}", m.0)).collect();
        let rss: Vec<String> = measured.iter().map(|m| format!("{:.0}", m.1)).collect();
        let total: f64 = measured.iter().map(|m| m.0).sum();
        let done = store
            .run_figures(&store.last_run(Some(&p.name)).await?.context("no run")?.id)
            .await?;
        println!(
            "workers={n} wall_seconds={wall:.2} items_per_s={:.0} worker_cpu_seconds=[{}] worker_cpu_total={total:.2} \
             items_per_worker_cpu_s={:.0} worker_peak_rss_mb=[{}] simulator_cpu_seconds={sim_cpu:.2} \
             machine_busy_cpu_seconds={machine:.2} ingest_seconds={ingest:.2} succeeded={}",
            opts.items as f64 / wall.max(1e-9),
            cpu.join(","),
            opts.items as f64 / total.max(1e-9),
            rss.join(","),
            done.succeeded
        );
        store.close().await;
        crate::store::postgres::drop_schema(db, &schema).await?;
    }
    Ok(())
}

pub async fn run(opts: BenchOptions) -> Result<()> {
    let tmp;
    let dir = match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    eprintln!(
        "writing {} synthetic records to {}",
        opts.items,
        dir.display()
    );
    write_records(&dir.join("records.jsonl"), opts.items)?;
    std::fs::write(dir.join("schema.json"), SCHEMA)?;

    let (sim, url) = start_simulator()?;
    if !opts.workers.is_empty() {
        return run_workers(&opts, &dir, sim, &url).await;
    }
    let pipeline_text = pipeline_text(&url, opts.batch_size, None);
    let file = dir.join("bench.toml");
    std::fs::write(&file, pipeline_text)?;
    let _ = &sim;
    let p = Pipeline::load(&file).map_err(|e| anyhow::anyhow!("{e}"))?;
    let prices = PriceTable::builtin();
    let price = p.stage_prices(&prices)?;
    let db = dir.join(".nightshift/state.db");
    let store = SqlStore::open_sqlite(&db).await?;
    let client = OpenAiClient::new(
        &format!("{url}/v1"),
        SecretString::from("bench".to_string()),
        Duration::from_secs(600),
        RetryPolicy::default(),
    )?;
    let ctx = RunContext {
        store: &store,
        provider: &client,
        pipeline: &p,
        prices: &price,
        observer: &Quiet,
        work_dir: dir.join(".nightshift"),
        output_path: p.output.path.clone(),
        shutdown: Default::default(),
        detach: false,
        ingest_only: false,
        budget: Default::default(),
        worker_id: "bench".into(),
        lease: Duration::from_secs(300),
    };
    let t = Instant::now();
    let outcome = worker::run(&ctx).await;
    let wall = t.elapsed();
    drop(sim);
    let outcome = outcome?;
    let n = opts.items as f64;
    let prep = outcome.times.prepare.as_secs_f64();
    let res = outcome.times.results.as_secs_f64();
    println!("items={}", opts.items);
    println!(
        "prepare_seconds={prep:.2} prepare_items_per_s={:.0}",
        n / prep.max(1e-9)
    );
    println!(
        "results_seconds={res:.2} results_items_per_s={:.0}",
        n / res.max(1e-9)
    );
    println!(
        "wall_seconds={:.2} (includes the simulator's own work)",
        wall.as_secs_f64()
    );
    println!(
        "peak_rss_mb={:.1}",
        peak_rss_bytes() as f64 / (1024.0 * 1024.0)
    );
    println!("exit_code={}", outcome.exit_code);
    store.close().await;
    Ok(())
}
