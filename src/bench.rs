//! `nightshift bench`: the end-to-end throughput benchmark.
//!
//! Writes N synthetic records, starts the simulator as a separate process (so its memory is
//! not ours) with zero processing delay, runs a pipeline through the real client, and prints
//! items/s for preparation (read, render, hash, dedupe, plan, write batch files) and for
//! results (download, parse, validate, price, store), plus this process's peak RSS. Figures
//! only: nothing here asserts a time.

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
use crate::store::SqliteStore;
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

    let pipeline_text = format!(
        r#"name = "bench"
[source]
kind = "jsonl"
path = "records.jsonl"
id_field = "id"
[provider]
kind = "openai"
model = "gpt-4o-mini"
base_url = "{url}/v1"
poll_min_seconds = 0.05
poll_max_seconds = 0.5
reconcile_grace_seconds = 0
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
max_requests = {}
"#,
        opts.batch_size
    );
    let file = dir.join("bench.toml");
    std::fs::write(&file, pipeline_text)?;
    let p = Pipeline::load(&file).map_err(|e| anyhow::anyhow!("{e}"))?;
    let prices = PriceTable::builtin();
    let price = prices.lookup("openai", &p.provider.model)?.clone();
    let db = dir.join(".nightshift/state.db");
    let store = SqliteStore::open(&db).await?;
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
        price: &price,
        observer: &Quiet,
        work_dir: dir.join(".nightshift"),
        output_path: p.output.path.clone(),
        shutdown: Default::default(),
        detach: false,
        provider_forgets: false,
        budget: Default::default(),
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
