//! Prometheus metrics as a monitoring system reads them: the textfile a finished run leaves
//! for node_exporter, what a run pushes to a Pushgateway, and a worker's `/metrics` scraped
//! while a batch is in flight. The cost they show must be the ledger's (`report --json`),
//! compared as exact decimals.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Output, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::Value;
use tokio::process::Command;

use crate::common::*;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nightshift"));
    c.env_remove("NIGHTSHIFT_DB")
        .env_remove("RUST_LOG")
        .env("NIGHTSHIFT_LOG", "nightshift=warn")
        .env("NS_CRASH_KEY", "sk-metrics-test")
        .kill_on_drop(true);
    c
}

async fn ok(c: &mut Command) -> Output {
    let out = c.output().await.unwrap();
    assert!(
        out.status.success(),
        "{:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One series of the text format: its name, its labels, its value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: String,
}

/// Parses the Prometheus text format (the subset nightshift writes: no escapes in values
/// of the labels used here, no timestamps).
fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a value");
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let labels = body
                    .split(',')
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').expect("k=v");
                        (k.to_string(), v.trim_matches('"').to_string())
                    })
                    .collect();
                (n.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        out.push(Sample {
            name,
            labels,
            value: value.to_string(),
        });
    }
    out
}

/// The sum of a metric's series whose labels include `with`, as an exact decimal.
fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> Decimal {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| Decimal::from_str(&s.value).unwrap_or_else(|e| panic!("{}: {e}", s.value)))
        .sum()
}

fn has(samples: &[Sample], name: &str) -> bool {
    samples.iter().any(|s| s.name == name)
}

async fn report(pipeline: &Path, db: Option<&str>) -> Value {
    let mut c = bin();
    c.arg("report").arg(pipeline).arg("--json");
    if let Some(db) = db {
        c.env("NIGHTSHIFT_DB", db);
    }
    serde_json::from_slice(&ok(&mut c).await.stdout).unwrap()
}

fn dec(v: &Value) -> Decimal {
    Decimal::from_str(v.as_str().expect("decimal text")).unwrap()
}

fn int(v: &Value) -> Decimal {
    Decimal::from(v.as_u64().expect("a count"))
}

/// A pipeline on the in-process simulator whose answers fail now and then (retries).
fn flaky_pipeline(dir: &Path) -> std::path::PathBuf {
    write_source(dir, 120, 5, 2);
    write_pipeline(
        dir,
        6,
        40,
        "[provider.simulator]\nbatch_seconds = 0.1\nfail_rate = 0.08\ncache_rate = 0.2\n",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_runs_textfile_holds_the_ledger_cost_and_the_reports_counts() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = flaky_pipeline(dir.path());
    let prom_dir = dir.path().join("textfile");
    std::fs::create_dir(&prom_dir).unwrap();
    let prom = prom_dir.join("nightshift.prom");
    ok(bin()
        .arg("run")
        .arg(&pipeline)
        .arg("--no-progress")
        .arg("--metrics-textfile")
        .arg(&prom))
    .await;
    let rep = report(&pipeline, None).await;
    let text = std::fs::read_to_string(&prom).unwrap();
    let s = parse(&text);

    let cost = sum(&s, "nightshift_cost_usd_total", &[("pipeline", "it")]);
    assert!(cost > Decimal::ZERO, "{text}");
    assert_eq!(cost, dec(&rep["cost_usd"]), "{text}");
    assert!(text.contains("# TYPE nightshift_cost_usd_total counter"));
    let items = |outcome| sum(&s, "nightshift_items_total", &[("outcome", outcome)]);
    assert_eq!(
        items("succeeded"),
        int(&rep["items"]["succeeded"]),
        "{text}"
    );
    assert_eq!(items("failed"), int(&rep["items"]["failed"]), "{text}");
    assert!(
        int(&rep["retries"]) > Decimal::ZERO,
        "the sim made no retry"
    );
    assert_eq!(
        sum(&s, "nightshift_retries_total", &[]),
        int(&rep["retries"])
    );
    for (kind, key) in [
        ("input", "input"),
        ("cached_input", "cached_input"),
        ("output", "output"),
    ] {
        assert_eq!(
            sum(&s, "nightshift_tokens_total", &[("kind", kind)]),
            int(&rep["tokens"][key]),
            "{kind} tokens\n{text}"
        );
    }
    assert_eq!(
        sum(&s, "nightshift_records_quarantined_total", &[]),
        int(&rep["records"]["quarantined"])
    );
    assert_eq!(sum(&s, "nightshift_batches_in_flight", &[]), Decimal::ZERO);
    assert_eq!(sum(&s, "nightshift_run_last_exit_code", &[]), Decimal::ZERO);
    let success = sum(
        &s,
        "nightshift_run_last_success_timestamp_seconds",
        &[("pipeline", "it")],
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        success > Decimal::from(now - 600) && success <= Decimal::from(now),
        "{text}"
    );
    // No id of an item, batch or run in any label.
    let run_id = rep["run_id"].as_str().unwrap();
    assert!(!text.contains(run_id));
    for sample in &s {
        for v in sample.labels.values() {
            assert!(v.len() < 40, "a label looks like an id: {v}");
        }
    }
    // Readable by the collector, and nothing half-written left beside it.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&prom).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
    let names: Vec<_> = std::fs::read_dir(&prom_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("nightshift.prom")]);

    // The next night has nothing to send: the file is rewritten, still with a success time.
    ok(bin()
        .arg("run")
        .arg(&pipeline)
        .arg("--no-progress")
        .arg("--metrics-textfile")
        .arg(&prom))
    .await;
    let again = parse(&std::fs::read_to_string(&prom).unwrap());
    assert!(has(&again, "nightshift_run_last_success_timestamp_seconds"));
    assert_eq!(sum(&again, "nightshift_cost_usd_total", &[]), Decimal::ZERO);
}

/// What a small Pushgateway stand-in received: method, path, body.
type Pushed = Arc<Mutex<Vec<(String, String, String)>>>;

async fn gateway() -> (std::net::SocketAddr, Pushed) {
    let pushed: Pushed = Arc::default();
    let p = pushed.clone();
    let app = axum::Router::new().fallback(
        move |method: axum::http::Method, uri: axum::http::Uri, body: String| {
            let p = p.clone();
            async move {
                p.lock()
                    .unwrap()
                    .push((method.to_string(), uri.path().to_string(), body));
                axum::http::StatusCode::OK
            }
        },
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (addr, pushed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_pushes_its_metrics_once_and_a_failed_push_is_only_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = flaky_pipeline(dir.path());
    let (addr, pushed) = gateway().await;
    ok(bin()
        .arg("run")
        .arg(&pipeline)
        .arg("--no-progress")
        .arg("--metrics-push")
        .arg(format!("http://{addr}/")))
    .await;
    let rep = report(&pipeline, None).await;
    let got = pushed.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "one push per run: {got:?}");
    let (method, path, body) = &got[0];
    // A successful run replaces the pipeline's group.
    assert_eq!(method, "PUT");
    assert_eq!(path, "/metrics/job/nightshift/pipeline/it");
    let s = parse(body);
    assert_eq!(
        sum(&s, "nightshift_cost_usd_total", &[]),
        dec(&rep["cost_usd"])
    );
    assert!(has(&s, "nightshift_run_last_success_timestamp_seconds"));

    // Nothing listens there any more: the run still succeeds, and says what went wrong.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let out = ok(bin()
        .arg("run")
        .arg(&pipeline)
        .arg("--no-progress")
        .arg("--metrics-push")
        .arg(format!("http://user:pushsecret@{closed}")))
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--metrics-push"), "{err}");
    assert!(!err.contains("pushsecret"), "{err}");

    // A URL that is not one is refused before anything runs.
    let out = bin()
        .arg("run")
        .arg(&pipeline)
        .arg("--metrics-push")
        .arg("gateway:9091")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
}

/// Scrapes `url` (plain HTTP on loopback).
async fn scrape(url: &str) -> Vec<Sample> {
    let resp = reqwest::get(url).await.unwrap();
    assert!(resp.status().is_success());
    parse(&resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(pg_tests),
    ignore = "NIGHTSHIFT_TEST_PG_URL is not set: PostgreSQL tests skipped (CI sets it)"
)]
async fn a_workers_metrics_show_batches_in_flight_then_the_ledger_cost() {
    let db = TestDb::postgres("metrics_worker").await;
    // Batches that take a second at the provider, so one is in flight when scraped.
    let sc = crate::crash::scenario_for(
        crate::crash::Provider::OpenAi,
        200,
        50,
        nightshift::sim::SimSettings {
            batch_seconds: 1.0,
            ..quiet_sim()
        },
    )
    .await;
    // The source goes into the store; the worker sends and collects all of it.
    ok(bin()
        .arg("run")
        .arg(&sc.pipeline)
        .arg("--no-progress")
        .arg("--ingest-only")
        .env("NIGHTSHIFT_DB", &db.url))
    .await;
    let log_path = sc.dir.path().join("worker.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut worker = bin()
        .arg("worker")
        .arg(&sc.pipeline)
        .arg("--metrics-listen")
        .arg("127.0.0.1:0")
        .env("NIGHTSHIFT_DB", &db.url)
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let url = loop {
        if let Some(u) = log()
            .lines()
            .find_map(|l| l.strip_prefix("metrics on "))
            .map(str::to_string)
        {
            break u;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no metrics address\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Mid-run: at least one batch submitted and not yet ingested.
    loop {
        let s = scrape(&url).await;
        if sum(&s, "nightshift_batches_in_flight", &[("pipeline", "it")]) >= Decimal::ONE {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never saw a batch in flight\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Until the worker has ingested the run's last batch.
    let rep = loop {
        let rep = report(&sc.pipeline, Some(&db.url)).await;
        if rep["status"] == "completed" {
            break rep;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the run did not complete: {rep}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let s = scrape(&url).await;
    let cost = sum(&s, "nightshift_cost_usd_total", &[("pipeline", "it")]);
    assert!(cost > Decimal::ZERO);
    assert_eq!(cost, dec(&rep["cost_usd"]));
    assert_eq!(
        sum(&s, "nightshift_items_total", &[("outcome", "succeeded")]),
        int(&rep["items"]["succeeded"])
    );
    assert_eq!(sum(&s, "nightshift_batches_in_flight", &[]), Decimal::ZERO);
    // The worker completed the detached run: that is the pipeline's last success.
    assert!(has(&s, "nightshift_run_last_success_timestamp_seconds"));

    // A clean stop.
    if let Some(pid) = worker.id() {
        // SAFETY: signalling a child this test spawned and still owns.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    let status = tokio::time::timeout(Duration::from_secs(60), worker.wait())
        .await
        .expect("the worker stops within 60 s of SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", log());
    db.finish().await;
}
