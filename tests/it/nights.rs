//! Night two, night three: the calendar of a nightly job, run as a user runs it (the real
//! binary), with the built-in simulator (`simulate = true`, whose state outlives each run)
//! and with an external `nightshift simulate`. Each night's figures must be its own and add
//! up, across nights, to the ledger and to the simulator's bill.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nightshift::cost::{PriceTable, Usd};
use nightshift::sim::{Sim, SimSettings};
use serde_json::Value;

use crate::cli::{bin, examples, faster};
use crate::common::write_pipeline;

/// The output of a finished command: exit code, stdout, stderr.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn show(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn ran(cmd: &mut Command) -> Ran {
    let out = cmd.output().unwrap();
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn run(file: &Path, extra: &[&str]) -> Ran {
    ran(bin().arg("run").arg(file).args(extra))
}

fn report_json(file: &Path, run: Option<&str>) -> Value {
    let mut c = bin();
    c.args(["report", "--json"]).arg(file);
    if let Some(r) = run {
        c.args(["--run", r]);
    }
    let r = ran(&mut c);
    assert_eq!(r.code, Some(0), "{}", r.show());
    serde_json::from_str(&r.stdout).unwrap()
}

fn items_json(file: &Path, run: &str) -> Value {
    let r = ran(bin()
        .args(["report", "--items", "--json", "--run", run])
        .arg(file));
    assert_eq!(r.code, Some(0), "{}", r.show());
    serde_json::from_str(&r.stdout).unwrap()
}

fn usd(v: &Value) -> Usd {
    Usd::parse(v.as_str().unwrap_or_else(|| panic!("not money text: {v}"))).unwrap()
}

/// Sum of every ledger row, read straight from the store.
async fn ledger_total(db: &Path) -> Usd {
    let store = nightshift::store::SqlStore::open_sqlite(db).await.unwrap();
    let pico = store
        .count_where("SELECT CAST(COALESCE(SUM(cost_pico), 0) AS BIGINT) FROM ledger")
        .await
        .unwrap();
    store.close().await;
    Usd::from_pico(pico as i128)
}

/// The built-in simulator's record, read from the state it keeps beside the store.
fn builtin_sim_record(work_dir: &Path) -> Value {
    let sim = Sim::persistent(
        &work_dir.join("simulator"),
        SimSettings::default(),
        PriceTable::builtin(),
    )
    .unwrap();
    sim.record()
}

/// Custom ids the simulator saw in more than one created batch.
fn sent_twice(record: &Value) -> Vec<String> {
    let mut seen: HashMap<String, u32> = HashMap::new();
    for b in record["batches"].as_array().unwrap() {
        for r in b["requests"].as_array().unwrap() {
            *seen
                .entry(r["custom_id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    seen.into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(c, _)| c)
        .collect()
}

/// `nightshift simulate` in the background; stopped when dropped.
struct ExternalSim {
    child: Child,
    url: String,
}

impl ExternalSim {
    fn start(flags: &[&str]) -> Self {
        let mut child = bin()
            .args(["simulate", "--listen", "127.0.0.1:0"])
            .args(flags)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line}"))
            .to_string();
        ExternalSim { child, url }
    }

    async fn record(&self) -> Value {
        reqwest::get(format!("{}/_sim/record", self.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for ExternalSim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Points a pipeline at an external simulator instead of the built-in one.
fn use_external(file: &Path, url: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    // The key itself, not the mention in the file's opening comment.
    let text = text.replacen(
        "\nsimulate = true",
        &format!("\nsimulate = false\nbase_url = \"{url}/v1\"\npoll_min_seconds = 0.05\npoll_max_seconds = 0.5"),
        1,
    );
    std::fs::write(file, text).unwrap();
}

/// Night two's changes to the example feed: 20 new products, 5 changed, 3 deleted (none of
/// them a duplicate of another record, so each new or changed record is one new item).
fn change_the_feed(source: &Path) -> (usize, usize) {
    let text = std::fs::read_to_string(source).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // Records whose item no other record shares.
    let mut by_body: HashMap<String, usize> = HashMap::new();
    let mut parsed: Vec<Option<serde_json::Map<String, Value>>> = Vec::new();
    for l in &lines {
        let v: Option<Value> = serde_json::from_str(l).ok();
        let obj = v.and_then(|v| v.as_object().cloned());
        if let Some(o) = &obj {
            let mut body = o.clone();
            body.remove("sku");
            *by_body.entry(Value::Object(body).to_string()).or_default() += 1;
        }
        parsed.push(obj);
    }
    let alone: Vec<usize> = parsed
        .iter()
        .enumerate()
        .filter_map(|(i, o)| {
            let o = o.as_ref()?;
            let mut body = o.clone();
            body.remove("sku");
            (by_body[&Value::Object(body).to_string()] == 1).then_some(i)
        })
        .collect();
    let changed: BTreeSet<usize> = alone.iter().take(5).copied().collect();
    let deleted: BTreeSet<usize> = alone.iter().skip(5).take(3).copied().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if deleted.contains(&i) {
            continue;
        }
        if changed.contains(&i) {
            let mut o = parsed[i].clone().unwrap();
            let title = o["title"].as_str().unwrap_or("").to_string();
            o.insert(
                "title".into(),
                Value::String(format!("{title} (new season)")),
            );
            out.push(Value::Object(o).to_string());
        } else {
            out.push(l.to_string());
        }
    }
    let template = parsed[alone[10]].clone().unwrap();
    for n in 0..20 {
        let mut o = template.clone();
        o.insert("sku".into(), Value::String(format!("NEW-{n:03}")));
        o.insert(
            "title".into(),
            Value::String(format!("Night-two arrival number {n}")),
        );
        out.push(Value::Object(o).to_string());
    }
    std::fs::write(source, out.join("\n") + "\n").unwrap();
    (20 + 5, 3)
}

/// The three nights; `external` runs them against `nightshift simulate` instead of the
/// built-in simulator. Returns nothing: it asserts as it goes.
async fn three_nights(external: bool) {
    let (_tmp, ex) = examples();
    let file = ex.join("catalog-enrichment.toml");
    faster(&file);
    let sim = external.then(|| {
        let s = ExternalSim::start(&[
            "--seed",
            "7",
            "--batch-seconds",
            "0.3",
            "--fail-rate",
            "0.02",
            "--invalid-json-rate",
            "0.02",
            "--http-429-rate",
            "0.02",
            "--cache-rate",
            "0.1",
        ]);
        use_external(&file, &s.url);
        s
    });
    let key = [("OPENAI_API_KEY", "sk-test-three-nights")];
    let night = |extra: &[&str]| ran(bin().envs(key).arg("run").arg(&file).args(extra));

    // Night 1: the whole feed.
    let n1 = night(&[]);
    assert!(matches!(n1.code, Some(0) | Some(1)), "{}", n1.show());
    let r1 = report_json(&file, None);
    let run1 = r1["run_id"].as_str().unwrap().to_string();
    assert_eq!(r1["records"]["valid"], 306, "{r1}");
    assert!(r1["requests_sent"].as_u64().unwrap() >= 290, "{r1}");

    // Night 2: 20 new records, 5 changed, 3 deleted.
    let (new_items, deleted) = change_the_feed(&ex.join("data/products.jsonl"));
    let n2 = night(&[]);
    assert!(matches!(n2.code, Some(0) | Some(1)), "{}", n2.show());
    let r2 = report_json(&file, None);
    let run2 = r2["run_id"].as_str().unwrap().to_string();
    assert_ne!(run1, run2);
    let a2 = items_json(&file, &run2);
    let attempts2 = a2["attempts"].as_array().unwrap();
    // The example reviews a 5 % sample: night two's reviews are of new and changed records.
    let items2: BTreeSet<i64> = attempts2
        .iter()
        .filter(|a| a["stage"] == "main")
        .map(|a| a["item_id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        items2.len(),
        new_items,
        "night two sends exactly the new and changed items: {a2}"
    );
    let changed: BTreeSet<&str> = attempts2
        .iter()
        .filter(|a| a["stage"] == "main")
        .flat_map(|a| a["record_ids"].as_array().unwrap())
        .map(|id| id.as_str().unwrap())
        .collect();
    for a in attempts2.iter().filter(|a| a["stage"] == "review") {
        for id in a["record_ids"].as_array().unwrap() {
            assert!(
                changed.contains(id.as_str().unwrap()),
                "a review on night two is of a new or changed record: {a}"
            );
        }
    }
    assert!(attempts2.iter().all(|a| a["run_id"] == run2.as_str()));
    assert_eq!(attempts2.len() as u64, r2["attempts"].as_u64().unwrap());
    let output = std::fs::read_to_string(ex.join("out/products.enriched.jsonl")).unwrap();
    assert_eq!(
        output.lines().count(),
        306 + 20 - deleted,
        "one result line per record of tonight's source"
    );
    assert_eq!(r2["records"]["valid"], 306 + 20 - deleted as u64);
    assert_eq!(
        r2["records"]["processed"].as_u64().unwrap(),
        new_items as u64
    );

    // Night 3: nothing changed, nothing sent.
    let n3 = night(&[]);
    assert_eq!(n3.code, Some(0), "{}", n3.show());
    assert!(n3.stdout.contains("sent       0 requests"), "{}", n3.show());
    let r3 = report_json(&file, None);
    let run3 = r3["run_id"].as_str().unwrap().to_string();
    assert_eq!(r3["attempts"], 0, "{r3}");
    assert_eq!(usd(&r3["cost_usd"]), Usd::ZERO);
    assert!(
        items_json(&file, &run3)["attempts"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // Night one's own report still covers night one only, by a prefix of its id.
    let again1 = report_json(&file, Some(&run1[..13]));
    assert_eq!(again1["run_id"], run1.as_str());
    assert_eq!(again1["attempts"], r1["attempts"]);
    assert_eq!(usd(&again1["cost_usd"]), usd(&r1["cost_usd"]));

    // The nights add up: their costs = the ledger = the simulator's bill.
    let nights: Usd = [&r1, &r2, &r3].iter().map(|r| usd(&r["cost_usd"])).sum();
    let ledger = ledger_total(&ex.join(".nightshift/state.db")).await;
    let record = match &sim {
        Some(s) => s.record().await,
        None => builtin_sim_record(&ex.join(".nightshift")),
    };
    let bill = usd(&record["bill"]["totals"]["cost_usd"]);
    assert_eq!(nights, ledger, "sum of the nights vs the ledger");
    assert_eq!(ledger, bill, "ledger vs the simulator's bill");
    assert!(sent_twice(&record).is_empty(), "a custom_id sent twice");
    // No attempt in two runs: every attempt's run is one of the three, counted once.
    let total_attempts: u64 = [&r1, &r2, &r3]
        .iter()
        .map(|r| r["attempts"].as_u64().unwrap())
        .sum();
    let per_cid: usize = record["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["requests"].as_array().unwrap().len())
        .sum();
    assert_eq!(total_attempts as usize, per_cid);

    // `runs` lists the three nights, newest first.
    let runs = ran(bin().args(["runs", "--json"]).arg(&file));
    assert_eq!(runs.code, Some(0), "{}", runs.show());
    let v: Value = serde_json::from_str(&runs.stdout).unwrap();
    let ids: Vec<&str> = v["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![run3.as_str(), run2.as_str(), run1.as_str()]);
    let table = ran(bin().arg("runs").arg(&file));
    assert!(table.stdout.contains(&run2[..13]), "{}", table.show());
}

#[tokio::test(flavor = "multi_thread")]
async fn three_nights_with_the_builtin_simulator() {
    three_nights(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn three_nights_with_an_external_simulator() {
    three_nights(true).await;
}

/// A pipeline of `n` tickets with the built-in simulator; `batch_seconds` sets how long a
/// batch stays in flight.
fn ticket_pipeline(
    dir: &Path,
    n: usize,
    max_requests: u32,
    batch_seconds: f64,
    extra: &str,
) -> PathBuf {
    crate::common::write_source(dir, n, 0, 0);
    write_pipeline(
        dir,
        3,
        max_requests,
        &format!(
            "{extra}\n[provider.simulator]\nbatch_seconds = {batch_seconds}\nretry_after_ms = 20\n"
        ),
    )
}

/// Runs the binary in the background, its stderr lines coming through a channel.
fn spawn_run(file: &Path, extra: &[&str]) -> (Child, mpsc::Receiver<String>) {
    spawn_lines(bin().arg("run").arg(file).args(extra))
}

/// Starts `cmd` with its standard error read line by line into the receiver.
fn spawn_lines(cmd: &mut Command) -> (Child, mpsc::Receiver<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

fn wait_for_line(rx: &mpsc::Receiver<String>, needle: &str, within: Duration) -> Vec<String> {
    let end = Instant::now() + within;
    let mut seen = Vec::new();
    while Instant::now() < end {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            let hit = l.contains(needle);
            seen.push(l);
            if hit {
                return seen;
            }
        }
    }
    panic!("no line with `{needle}` within {within:?}: {seen:#?}");
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_then_run_resumes_with_the_builtin_simulator_sending_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let file = ticket_pipeline(dir.path(), 300, 100, 1.5, "");
    let (mut child, rx) = spawn_run(&file, &[]);
    wait_for_line(&rx, "submitted batch", Duration::from_secs(60));
    signal(&child, libc::SIGINT);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(75), "Ctrl-C: try again later");

    let second = run(&file, &[]);
    assert_eq!(second.code, Some(0), "{}", second.show());
    let record = builtin_sim_record(&dir.path().join(".nightshift"));
    assert!(sent_twice(&record).is_empty(), "nothing sent twice");
    // No attempt was charged for the interruption: the simulator answers everything (no
    // faults), so every item took exactly one attempt, and every attempt was answered.
    let store = nightshift::store::SqlStore::open_sqlite(&dir.path().join(".nightshift/state.db"))
        .await
        .unwrap();
    let items = store
        .count_where("SELECT COUNT(*) FROM items")
        .await
        .unwrap();
    let attempts = store
        .count_where("SELECT COUNT(*) FROM attempts")
        .await
        .unwrap();
    let ok = store
        .count_where("SELECT COUNT(*) FROM attempts WHERE verdict = 'ok'")
        .await
        .unwrap();
    assert_eq!(items, 300);
    assert_eq!(attempts, 300, "one attempt per item");
    assert_eq!(ok, 300);
    let ledger = ledger_total(&dir.path().join(".nightshift/state.db")).await;
    assert_eq!(ledger, usd(&record["bill"]["totals"]["cost_usd"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_capped_run_sends_one_round_stops_with_status_budget_and_a_rerun_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let file = ticket_pipeline(dir.path(), 200, 10_000, 0.2, "");
    // What one attempt of every item may cost at worst, from the worksheet.
    let plan = ran(bin().args(["plan", "--json"]).arg(&file));
    assert_eq!(plan.code, Some(0), "{}", plan.show());
    let ws: Value = serde_json::from_str(&plan.stdout).unwrap();
    let worst_all_attempts = usd(&ws["worst_case_cost_usd"]);
    let one_attempt_each = Usd::from_pico(worst_all_attempts.pico() / 3);
    // Room for about a tenth of the items at their worst case.
    let cap = Usd::from_pico(one_attempt_each.pico() / 10);
    let capped = run(&file, &["--budget-usd", &cap.to_decimal_string()]);
    assert_eq!(capped.code, Some(1), "{}", capped.show());
    let r = report_json(&file, None);
    assert_eq!(r["status"], "budget", "{r}");
    // No creep: one batch of first attempts (no faults, so no retry rounds), not a trickle
    // of ever smaller batches as reservations come back.
    assert_eq!(r["batches"], 1, "{r}");
    let sent = r["requests_sent"].as_u64().unwrap();
    assert!((5..=40).contains(&sent), "about a tenth of 200: {sent}");
    assert!(usd(&r["cost_usd"]) <= cap, "never above the cap");
    let message = r["message"].as_str().unwrap();
    assert!(
        message.contains("need up to $") && message.contains("--budget-usd"),
        "says what the rest needs: {message}"
    );

    let rerun = run(&file, &[]);
    assert_eq!(rerun.code, Some(0), "{}", rerun.show());
    let r2 = report_json(&file, None);
    assert_eq!(r2["status"], "completed");
    assert_eq!(r2["items"]["succeeded"], 200);
    let record = builtin_sim_record(&dir.path().join(".nightshift"));
    assert!(sent_twice(&record).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_detached_run_is_completed_by_the_run_that_collects_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = ticket_pipeline(dir.path(), 120, 50, 1.0, "");
    let detached = run(&file, &["--detach"]);
    assert_eq!(detached.code, Some(0), "{}", detached.show());
    let id = detached
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("detached "))
        .unwrap_or_else(|| panic!("{}", detached.show()))
        .to_string();
    let collecting = run(&file, &[]);
    assert_eq!(collecting.code, Some(0), "{}", collecting.show());
    assert!(
        collecting.stdout.contains("collected  "),
        "the collecting run says what it collected: {}",
        collecting.show()
    );
    let d = report_json(&file, Some(&id));
    assert_eq!(d["status"], "completed", "{d}");
    assert_eq!(d["items"]["succeeded"], 120, "{d}");
    assert_eq!(d["records"]["processed"], 120, "{d}");
    let c = report_json(&file, None);
    assert_eq!(c["attempts"], 0, "the collecting run sent nothing: {c}");
    assert_eq!(
        c["collected_for_earlier_runs"]["runs"][0].as_str(),
        Some(id.as_str())
    );
    assert_eq!(
        usd(&c["collected_for_earlier_runs"]["cost_usd"]),
        usd(&d["cost_usd"])
    );
    let ledger = ledger_total(&dir.path().join(".nightshift/state.db")).await;
    assert_eq!(usd(&d["cost_usd"]) + usd(&c["cost_usd"]), ledger);
    // The detached run's text report no longer asks to run again.
    let text = ran(bin().args(["report", "--run", &id]).arg(&file));
    assert!(
        !text.stdout.contains("run the pipeline again"),
        "{}",
        text.show()
    );
}

#[test]
fn plan_forecasts_the_job_after_a_run_as_on_a_fresh_store() {
    let (_tmp, ex) = examples();
    let file = ex.join("catalog-enrichment.toml");
    faster(&file);
    let forecast = || {
        let r = ran(bin()
            .args(["plan", "--json", "--monthly-items", "30000"])
            .arg(&file));
        assert_eq!(r.code, Some(0), "{}", r.show());
        let v: Value = serde_json::from_str(&r.stdout).unwrap();
        v
    };
    let fresh = forecast();
    let night = run(&file, &[]);
    assert!(matches!(night.code, Some(0) | Some(1)), "{}", night.show());
    let after = forecast();
    assert_eq!(after["items"]["to_send"], 0, "nothing left: {after}");
    assert_eq!(fresh["monthly"]["cost_usd"], after["monthly"]["cost_usd"]);
    assert_ne!(after["monthly"]["cost_usd"], "0");
    assert_eq!(
        fresh["input_tokens_per_call"]["mean"],
        after["input_tokens_per_call"]["mean"]
    );
}

#[test]
fn an_unreachable_provider_warns_at_once_and_gives_up_with_exit_75() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let file = ticket_pipeline(dir.path(), 10, 100, 0.2, "");
    let text = std::fs::read_to_string(&file).unwrap().replacen(
        "simulate = true",
        &format!(
            "simulate = false\nbase_url = \"http://127.0.0.1:{port}/v1\"\nunreachable_timeout_seconds = 2\nrequest_timeout_seconds = 2"
        ),
        1,
    );
    std::fs::write(&file, text).unwrap();
    let started = Instant::now();
    let r = ran(bin()
        .env("OPENAI_API_KEY", "sk-test-unreachable")
        .env_remove("NIGHTSHIFT_LOG")
        .arg("run")
        .arg(&file)
        .arg("--no-progress"));
    let took = started.elapsed();
    assert_eq!(r.code, Some(75), "{}", r.show());
    assert!(took < Duration::from_secs(30), "gave up after {took:?}");
    assert!(
        r.stderr.contains("cannot reach the provider") && r.stderr.contains(&port.to_string()),
        "warned with the URL at the default level: {}",
        r.show()
    );
    assert!(
        r.stderr.contains("unreachable_timeout_seconds"),
        "says what to do: {}",
        r.show()
    );
}

#[test]
fn json_logs_are_one_object_per_line_with_named_fields() {
    let dir = tempfile::tempdir().unwrap();
    let file = ticket_pipeline(dir.path(), 60, 25, 0.2, "");
    let r = ran(bin().args(["--log-format", "json", "run"]).arg(&file));
    assert_eq!(r.code, Some(0), "{}", r.show());
    let mut events = BTreeSet::new();
    for line in r.stderr.lines() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
        if let Some(e) = v["fields"]["event"].as_str() {
            events.insert(e.to_string());
        }
        if v["fields"]["event"] == "submitted" {
            assert!(v["fields"]["requests"].is_u64(), "a named number: {line}");
            assert!(v["fields"]["provider_batch_id"].is_string(), "{line}");
        }
    }
    for e in ["note", "ingested", "submitted", "collected"] {
        assert!(
            events.contains(e),
            "no `{e}` event in {events:?}:\n{}",
            r.stderr
        );
    }
    // Errors too: a refused flag is a JSON line, not plain text.
    let bad = ran(bin()
        .args(["--log-format", "json", "run", "--budget-usd", "abc"])
        .arg(&file));
    assert_eq!(bad.code, Some(78));
    for line in bad.stderr.lines() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {line}"));
        assert_eq!(v["level"], "ERROR", "{line}");
    }
    assert!(!bad.stderr.contains("simulator listening"));
}

#[test]
fn a_mostly_quarantined_source_fails_the_run_and_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = ticket_pipeline(dir.path(), 20, 100, 0.2, "");
    // Last night's good results stay as they are.
    assert_eq!(run(&file, &[]).code, Some(0));
    let results = dir.path().join("out/results.jsonl");
    let before = std::fs::read_to_string(&results).unwrap();
    // Tonight's export: most lines lack the field the prompt needs.
    let mut text = std::fs::read_to_string(dir.path().join("records.jsonl")).unwrap();
    for i in 0..40 {
        text.push_str(&format!(
            "{{\"id\": \"bad{i}\", \"body\": \"no text field\"}}\n"
        ));
    }
    std::fs::write(dir.path().join("records.jsonl"), text).unwrap();
    let r = run(&file, &[]);
    assert_eq!(r.code, Some(2), "{}", r.show());
    assert!(
        r.stderr.contains("40 of 60 records were quarantined")
            && r.stderr.contains("max_quarantined_share")
            && r.stderr.contains("field `text`"),
        "{}",
        r.show()
    );
    assert_eq!(
        std::fs::read_to_string(&results).unwrap(),
        before,
        "output untouched"
    );
    let rep = report_json(&file, None);
    assert_eq!(rep["attempts"], 0, "nothing sent: {rep}");
    assert_eq!(rep["status"], "error");
}

#[test]
fn an_empty_source_is_an_error_not_already_processed() {
    let dir = tempfile::tempdir().unwrap();
    let file = ticket_pipeline(dir.path(), 10, 100, 0.2, "");
    std::fs::write(dir.path().join("records.jsonl"), "").unwrap();
    let r = run(&file, &[]);
    assert_eq!(r.code, Some(2), "{}", r.show());
    assert!(r.stderr.contains("holds no records"), "{}", r.show());
}

#[test]
fn without_its_source_a_run_still_collects_what_is_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let file = ticket_pipeline(dir.path(), 80, 40, 1.0, "");
    let detached = run(&file, &["--detach"]);
    assert_eq!(detached.code, Some(0), "{}", detached.show());
    std::fs::remove_file(dir.path().join("records.jsonl")).unwrap();
    let r = run(&file, &[]);
    assert_eq!(r.code, Some(78), "{}", r.show());
    assert!(
        r.stderr.contains("cannot read the source") && r.stderr.contains("collected first"),
        "{}",
        r.show()
    );
    let d = report_json(
        &file,
        Some(
            detached
                .stdout
                .lines()
                .find_map(|l| l.strip_prefix("detached "))
                .unwrap(),
        ),
    );
    assert_eq!(d["status"], "completed", "{d}");
    assert_eq!(d["items"]["succeeded"], 80);
}

#[test]
fn results_go_to_csv_by_extension_and_other_extensions_are_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let file = ticket_pipeline(dir.path(), 20, 100, 0.2, "");
    let bad = run(&file, &["--out", "results.txt"]);
    assert_eq!(bad.code, Some(78), "{}", bad.show());
    assert!(bad.stderr.contains(".csv"), "{}", bad.show());
    let folder = dir.path().join("a-folder");
    std::fs::create_dir(&folder).unwrap();
    let bad = run(&file, &["--out", folder.to_str().unwrap()]);
    assert_eq!(bad.code, Some(78), "{}", bad.show());
    let csv_path = dir.path().join("results.csv");
    let ok = run(&file, &["--out", csv_path.to_str().unwrap()]);
    assert_eq!(ok.code, Some(0), "{}", ok.show());
    let mut rdr = csv::Reader::from_path(&csv_path).unwrap();
    assert_eq!(
        rdr.headers().unwrap(),
        vec![
            "id",
            "line",
            "status",
            "attempts",
            "output.label",
            "output.summary",
            "output.confidence",
            "output._extra",
            "error"
        ]
    );
    let rows: Vec<csv::StringRecord> = rdr.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 20);
    assert!(!rows[0][4].is_empty(), "{:?}", rows[0]);
}

#[test]
fn conflicting_and_bad_flags_are_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let file = ticket_pipeline(dir.path(), 5, 100, 0.2, "");
    let both = ran(bin().args(["plan", "--json", "--csv"]).arg(&file));
    assert_eq!(both.code, Some(2), "{}", both.show());
    assert!(
        both.stderr.contains("cannot be used with"),
        "{}",
        both.show()
    );
    let bad = run(&file, &["--budget-usd", "abc"]);
    assert_eq!(bad.code, Some(78), "{}", bad.show());
    assert!(
        !bad.stderr.contains("simulator listening"),
        "{}",
        bad.show()
    );
    assert!(!dir.path().join(".nightshift/state.db").exists());
}

#[test]
fn report_from_elsewhere_says_to_pass_the_pipeline_file() {
    let dir = tempfile::tempdir().unwrap();
    let r = ran(bin().arg("report").current_dir(dir.path()));
    assert_eq!(r.code, Some(78), "{}", r.show());
    assert!(r.stderr.contains("pass the pipeline file"), "{}", r.show());
}

#[test]
fn record_ids_never_reach_the_terminal_raw() {
    let dir = tempfile::tempdir().unwrap();
    let file = ticket_pipeline(dir.path(), 3, 100, 0.2, "");
    let evil = serde_json::json!({"id": "r\u{1b}[31mred\u{7}", "text": "a ticket about a refund"});
    let mut text = std::fs::read_to_string(dir.path().join("records.jsonl")).unwrap();
    text.push_str(&evil.to_string());
    text.push('\n');
    std::fs::write(dir.path().join("records.jsonl"), text).unwrap();
    let r = run(&file, &[]);
    assert_eq!(r.code, Some(0), "{}", r.show());
    let items = ran(bin().args(["report", "--items"]).arg(&file));
    assert_eq!(items.code, Some(0), "{}", items.show());
    assert!(!items.stdout.contains('\u{1b}'), "{}", items.show());
    assert!(items.stdout.contains("\\u{1b}[31mred"), "{}", items.show());
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_latest_runs_keep_their_record_rows_and_every_report_still_adds_up() {
    let dir = tempfile::tempdir().unwrap();
    let file = ticket_pipeline(dir.path(), 30, 100, 0.2, "");
    let first = run(&file, &[]);
    assert_eq!(first.code, Some(0), "{}", first.show());
    let r1 = report_json(&file, None);
    for _ in 0..8 {
        assert_eq!(run(&file, &[]).code, Some(0));
    }
    let store = nightshift::store::SqlStore::open_sqlite(&dir.path().join(".nightshift/state.db"))
        .await
        .unwrap();
    let runs_with_records = store
        .count_where("SELECT COUNT(DISTINCT run_id) FROM records")
        .await
        .unwrap();
    assert_eq!(
        runs_with_records,
        i64::from(nightshift::worker::KEEP_RECORDS_OF_RUNS)
    );
    store.close().await;
    let again = report_json(&file, Some(r1["run_id"].as_str().unwrap()));
    assert_eq!(again["records"], r1["records"]);
    assert_eq!(again["items"], r1["items"]);
    assert_eq!(again["cost_usd"], r1["cost_usd"]);
}

#[test]
fn the_store_and_its_journal_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let file = ticket_pipeline(dir.path(), 5, 100, 0.2, "");
    // Hold the store open elsewhere while checking, so its -wal and -shm exist.
    let r = run(&file, &[]);
    assert_eq!(r.code, Some(0), "{}", r.show());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt
        .block_on(nightshift::store::SqlStore::open_sqlite(
            &dir.path().join(".nightshift/state.db"),
        ))
        .unwrap();
    for name in ["state.db", "state.db-wal", "state.db-shm"] {
        let path = dir.path().join(".nightshift").join(name);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{name} is {mode:o}");
    }
    rt.block_on(store.close());
}

/// Sets `[provider]` keys of a pipeline written by [`ticket_pipeline`].
#[cfg(feature = "failpoints")]
fn provider_keys(file: &Path, keys: &str) {
    let text = std::fs::read_to_string(file).unwrap().replacen(
        "simulate = true",
        &format!("simulate = true\n{keys}"),
        1,
    );
    std::fs::write(file, text).unwrap();
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_caught_in_creating_moves_on_once_its_stored_age_passes_the_grace() {
    const WAITS: &str = "looking again until the reconcile grace has passed";
    let dir = tempfile::tempdir().unwrap();
    let file = ticket_pipeline(dir.path(), 40, 100, 0.3, "");
    provider_keys(&file, "reconcile_grace_seconds = 600");
    let db = dir.path().join(".nightshift/state.db");
    // Dies with the batch committed as `creating`, the create never sent.
    let first = ran(bin()
        .env("NIGHTSHIFT_FAILPOINTS", "create.before_send=1")
        .arg("run")
        .arg(&file));
    assert_eq!(
        first.code,
        None,
        "aborted at the failpoint: {}",
        first.show()
    );
    let creating = || async {
        let s = nightshift::store::SqlStore::open_sqlite(&db).await.unwrap();
        let n = s
            .count_where("SELECT COUNT(*) FROM batches WHERE state = 'creating'")
            .await
            .unwrap();
        let at = s
            .count_where("SELECT creating_at FROM batches WHERE state = 'creating'")
            .await
            .unwrap_or(0);
        s.close().await;
        (n, at)
    };
    let (n, sent_at) = creating().await;
    assert_eq!(n, 1);
    let with_debug = |c: &mut Command| {
        c.env("NIGHTSHIFT_LOG", "warn,nightshift::worker=debug")
            .arg("run")
            .arg(&file);
    };
    // Within the grace the create may yet show up in the provider's list: a run looks
    // again and sends nothing. It is killed while it waits.
    let mut c = bin();
    with_debug(&mut c);
    let (mut child, rx) = spawn_lines(&mut c);
    wait_for_line(&rx, WAITS, Duration::from_secs(120));
    signal(&child, libc::SIGKILL);
    let _ = child.wait();
    assert_eq!(
        creating().await,
        (1, sent_at),
        "nothing sent within the grace"
    );
    // The grace counts from the stored time the create was sent, not from a process's
    // start: once that time is further back than the grace, the next run resends at once.
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        text.replacen(
            "reconcile_grace_seconds = 600",
            "reconcile_grace_seconds = 1.5",
            1,
        ),
    )
    .unwrap();
    let due = sent_at + 1_600;
    while nightshift::util::time::now_ms() < due {
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut c = bin();
    with_debug(&mut c);
    let last = ran(&mut c);
    assert_eq!(last.code, Some(0), "{}", last.show());
    assert!(
        !last.stderr.contains(WAITS),
        "waited although the stored age had passed the grace: {}",
        last.show()
    );
    assert_eq!(creating().await.0, 0);
    let record = builtin_sim_record(&dir.path().join(".nightshift"));
    assert!(sent_twice(&record).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_key_exits_78_and_the_run_records_78() {
    use axum::Router;
    use axum::http::StatusCode;
    let app = Router::new().fallback(|| async {
        (
            StatusCode::UNAUTHORIZED,
            r#"{"error":{"message":"Incorrect API key provided.","type":"invalid_request_error","code":"invalid_api_key"}}"#,
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let dir = tempfile::tempdir().unwrap();
    let file = ticket_pipeline(dir.path(), 5, 100, 0.2, "");
    let text = std::fs::read_to_string(&file).unwrap().replacen(
        "simulate = true",
        &format!("simulate = false\nbase_url = \"http://{addr}/v1\""),
        1,
    );
    std::fs::write(&file, text).unwrap();
    let f = file.clone();
    let r = tokio::task::spawn_blocking(move || {
        ran(bin().env("OPENAI_API_KEY", "sk-refused").arg("run").arg(&f))
    })
    .await
    .unwrap();
    assert_eq!(r.code, Some(78), "{}", r.show());
    let store = nightshift::store::SqlStore::open_sqlite(&dir.path().join(".nightshift/state.db"))
        .await
        .unwrap();
    let code = store
        .count_where("SELECT exit_code FROM runs")
        .await
        .unwrap();
    assert_eq!(code, 78);
    store.close().await;
}

/// The ticket-tagging example (a tagging stage, then a review of the uncertain tickets by a
/// dearer model), copied into `dir`.
fn staged_tickets(dir: &Path) -> PathBuf {
    staged_example(dir, "ticket-tagging.toml")
}

/// An example pipeline file with its data and schemas, copied into `dir`.
fn staged_example(dir: &Path, name: &str) -> PathBuf {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples");
    for sub in ["data", "schemas"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        for e in std::fs::read_dir(examples.join(sub)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(sub).join(e.file_name())).unwrap();
        }
    }
    let file = dir.join(name);
    std::fs::copy(examples.join(name), &file).unwrap();
    file
}

fn output_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_review_sends_its_item_again_once_and_flags_the_record_when_it_fails_again() {
    let dir = tempfile::tempdir().unwrap();
    let file = staged_example(dir.path(), "ticket-tagging.toml");
    let first = run(&file, &[]);
    assert_eq!(first.code, Some(0), "{}", first.show());
    let db = dir.path().join(".nightshift/state.db");
    let store = nightshift::store::SqlStore::open_sqlite(&db).await.unwrap();
    let regenerated = store
        .count_where("SELECT COUNT(*) FROM items WHERE stage = 'main' AND regenerations > 0")
        .await
        .unwrap();
    assert!(
        regenerated > 0,
        "some reviews failed and sent their item again"
    );
    let more_than_once = store
        .count_where("SELECT COUNT(*) FROM items WHERE regenerations > 1 OR (stage <> 'main' AND regenerations > 0)")
        .await
        .unwrap();
    assert_eq!(more_than_once, 0, "once, and only the reviewed stage");
    // Sent again as another attempt of the item: two answers came back for each.
    let answered_once = store
        .count_where(
            "SELECT COUNT(*) FROM items i WHERE i.regenerations > 0 AND \
             (SELECT COUNT(*) FROM attempts a WHERE a.item_id = i.id AND a.state = 'succeeded') < 2",
        )
        .await
        .unwrap();
    assert_eq!(answered_once, 0);
    // A flagged record is one whose item was sent again and whose second review failed too.
    let flagged_ids: BTreeSet<String> = output_lines(&dir.path().join("out/tickets.labels.jsonl"))
        .iter()
        .filter(|l| {
            assert_eq!(l["flagged"] == true, l["review"] == "fail", "{l}");
            l["flagged"] == true
        })
        .map(|l| l["id"].as_str().unwrap().to_string())
        .collect();
    let regenerated_ids: BTreeSet<String> = crate::common::all::<(String,)>(
        &store,
        "SELECT r.record_id FROM records r JOIN record_items x \
         ON x.run_id = r.run_id AND x.line = r.line AND x.stage = 'main' \
         JOIN items i ON i.id = x.item_id WHERE i.regenerations > 0",
    )
    .await
    .into_iter()
    .map(|(id,)| id)
    .collect();
    assert!(!flagged_ids.is_empty(), "some second reviews fail too");
    assert!(
        flagged_ids.is_subset(&regenerated_ids),
        "no record is flagged after a single failed review"
    );
    let r = report_json(&file, None);
    let review = r["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "review")
        .unwrap();
    assert_eq!(review["review"]["fail"], flagged_ids.len() as u64, "{r}");
    let main = &r["stages"][0];
    assert!(
        main["retries"].as_u64().unwrap() >= regenerated as u64,
        "a regeneration counts in its stage's retries: {main}"
    );
    store.close().await;

    let again = run(&file, &[]);
    assert_eq!(again.code, Some(0), "{}", again.show());
    assert_eq!(
        report_json(&file, None)["attempts"],
        0,
        "nothing is reviewed twice"
    );
    let record = builtin_sim_record(&dir.path().join(".nightshift"));
    assert_eq!(
        ledger_total(&db).await,
        usd(&record["bill"]["totals"]["cost_usd"])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_review_with_on_fail_flag_flags_the_record_and_sends_nothing_again() {
    let dir = tempfile::tempdir().unwrap();
    let file = staged_example(dir.path(), "catalog-enrichment.toml");
    let first = run(&file, &[]);
    assert_eq!(first.code, Some(0), "{}", first.show());
    let lines = output_lines(&dir.path().join("out/products.enriched.jsonl"));
    let reviewed = lines.iter().filter(|l| l.get("review").is_some()).count();
    let flagged = lines.iter().filter(|l| l["flagged"] == true).count();
    // A 5 % sample of 306 valid records.
    assert!((5..=30).contains(&reviewed), "{reviewed}");
    assert!(flagged > 0 && flagged < reviewed, "{flagged} of {reviewed}");
    assert!(
        lines
            .iter()
            .all(|l| (l["flagged"] == true) == (l["review"] == "fail"))
    );
    let store = nightshift::store::SqlStore::open_sqlite(&dir.path().join(".nightshift/state.db"))
        .await
        .unwrap();
    let regenerated = store
        .count_where("SELECT COUNT(*) FROM items WHERE regenerations > 0")
        .await
        .unwrap();
    store.close().await;
    assert_eq!(regenerated, 0, "flag sends nothing again");
    let r = report_json(&file, None);
    assert_eq!(r["stages"][1]["review"]["fail"], flagged as u64, "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cap_that_stops_a_later_stage_names_it_leaves_its_records_pending_and_a_rerun_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let file = staged_tickets(dir.path());
    // The first stage's worst case, one attempt each, from the worksheet of the file without
    // its review stage: a quarter more than that lets the tagging through, not all reviews.
    let text = std::fs::read_to_string(&file).unwrap();
    let (head, rest) = text.split_once("[[stage]]\nname = \"review\"").unwrap();
    let first_only = dir.path().join("first-only.toml");
    std::fs::write(
        &first_only,
        format!("{head}{}", &rest[rest.find("[output]").unwrap()..]),
    )
    .unwrap();
    let plan = ran(bin().args(["plan", "--json"]).arg(&first_only));
    assert_eq!(plan.code, Some(0), "{}", plan.show());
    let ws: Value = serde_json::from_str(&plan.stdout).unwrap();
    let first_stage_once = usd(&ws["worst_case_cost_usd"]).pico() / 3;
    let cap = Usd::from_pico(first_stage_once * 5 / 4);
    let capped = run(&file, &["--budget-usd", &cap.to_decimal_string()]);
    assert_eq!(capped.code, Some(1), "{}", capped.show());
    let r = report_json(&file, None);
    assert_eq!(r["status"], "budget", "{r}");
    assert!(usd(&r["cost_usd"]) <= cap, "never above the cap: {r}");
    let message = r["message"].as_str().unwrap();
    assert!(
        message.contains("stage `review`"),
        "names the stage the cap stopped: {message}"
    );
    let stages = r["stages"].as_array().unwrap();
    assert_eq!(stages[0]["stage"], "main");
    assert_eq!(stages[0]["failed"], 0, "{r}");
    // Records whose review was not sent are pending in the output, not failed.
    let out = dir.path().join("out/tickets.labels.jsonl");
    let lines: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let pending = lines.iter().filter(|l| l["status"] == "pending").count();
    assert!(pending > 0, "some reviews wait for a bigger budget");
    assert!(lines.iter().all(|l| l["status"] != "failed"));

    let rerun = run(&file, &[]);
    assert_eq!(rerun.code, Some(0), "{}", rerun.show());
    let r2 = report_json(&file, None);
    assert_eq!(r2["status"], "completed", "{r2}");
    let lines: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.iter().all(|l| l["status"] == "succeeded"));
    let record = builtin_sim_record(&dir.path().join(".nightshift"));
    assert!(sent_twice(&record).is_empty());
    let ledger = ledger_total(&dir.path().join(".nightshift/state.db")).await;
    assert_eq!(ledger, usd(&record["bill"]["totals"]["cost_usd"]));
    assert_eq!(
        usd(&r["cost_usd"]) + usd(&r2["cost_usd"]),
        ledger,
        "the two nights add up to the ledger"
    );
}

#[test]
fn a_staged_run_writes_csv_with_a_column_per_stage_matching_its_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let file = staged_example(dir.path(), "catalog-enrichment.toml");
    let json_path = dir.path().join("out/products.enriched.jsonl");
    let first = run(&file, &[]);
    assert_eq!(first.code, Some(0), "{}", first.show());
    let csv_path = dir.path().join("results.csv");
    let again = run(&file, &["--out", csv_path.to_str().unwrap()]);
    assert_eq!(again.code, Some(0), "{}", again.show());
    let mut rdr = csv::Reader::from_path(&csv_path).unwrap();
    let header: Vec<String> = rdr.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(
        header,
        [
            "id",
            "line",
            "status",
            "review",
            "cost_usd",
            "attempts",
            "stage.main.title",
            "stage.main.short_description",
            "stage.main.category",
            "stage.main.attributes.material",
            "stage.main.attributes.color",
            "stage.main.attributes.room",
            "stage.main.tags",
            "stage.main.audience",
            "stage.main._extra",
            "stage.review.pass",
            "stage.review.issues",
            "stage.review.score",
            "stage.review._extra",
            "error"
        ]
    );
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let rows: Vec<csv::StringRecord> = rdr.records().map(Result::unwrap).collect();
    let lines = output_lines(&json_path);
    assert_eq!(rows.len(), lines.len());
    for (row, line) in rows.iter().zip(&lines) {
        assert_eq!(&row[0], line["id"].as_str().unwrap());
        assert_eq!(&row[2], line["status"].as_str().unwrap());
        assert_eq!(&row[3], line["review"].as_str().unwrap_or(""));
        assert_eq!(&row[4], line["cost_usd"].as_str().unwrap());
        let main = &line["stages"]["main"];
        assert_eq!(
            &row[col("stage.main.title")],
            main["title"].as_str().unwrap()
        );
        assert_eq!(
            &row[col("stage.main.attributes.material")],
            main["attributes"]["material"].as_str().unwrap()
        );
        let tags: Value = serde_json::from_str(&row[col("stage.main.tags")]).unwrap();
        assert_eq!(tags, main["tags"]);
        assert_eq!(&row[col("stage.main._extra")], "");
        match &line["stages"]["review"] {
            Value::Null => assert_eq!(&row[col("stage.review.pass")], ""),
            review => assert_eq!(
                &row[col("stage.review.pass")],
                review["pass"].as_bool().unwrap().to_string()
            ),
        }
    }
}
