//! The binary as a user runs it: the example pipeline, reruns, reports, validation, exit
//! codes, and secrets kept out of everything written.

use std::path::{Path, PathBuf};
use std::process::Command;

use assert_cmd::cargo::CommandCargoExt;
use serde_json::Value;

pub(crate) fn bin() -> Command {
    let mut c = Command::cargo_bin("nightshift").unwrap();
    c.env_remove("NIGHTSHIFT_DB").env_remove("RUST_LOG");
    c
}

/// Copies `config/examples` into a temporary folder (runs write beside the pipeline).
pub(crate) fn examples() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples");
    copy_dir(&src, &dir.path().join("examples"));
    let p = dir.path().join("examples");
    (dir, p)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if name == "out" || name == ".nightshift" {
            continue;
        }
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(name));
        } else {
            std::fs::copy(e.path(), to.join(name)).unwrap();
        }
    }
}

pub(crate) fn faster(pipeline: &Path) {
    let text = std::fs::read_to_string(pipeline).unwrap();
    let text = text
        .replace("batch_seconds = 2\n", "batch_seconds = 0.3\n")
        .replace("batch_seconds = 1.5\n", "batch_seconds = 0.3\n");
    std::fs::write(pipeline, text).unwrap();
}

#[test]
fn the_example_runs_offline_and_a_rerun_sends_nothing() {
    let (_tmp, ex) = examples();
    let file = ex.join("catalog-enrichment.toml");
    faster(&file);
    let out = bin().arg("run").arg(&file).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(0) | Some(1)),
        "{stdout}\n{stderr}"
    );
    for needle in [
        "records",
        "quarantined 2",
        "duplicates reused",
        "retry rate",
        "cached input",
        "reasoning",
        "at standard prices",
        "per processed item",
    ] {
        assert!(
            stdout.contains(needle),
            "summary lacks `{needle}`:\n{stdout}"
        );
    }
    assert!(
        stderr.contains("products.jsonl:58"),
        "quarantine names file and line:\n{stderr}"
    );
    let results = std::fs::read_to_string(ex.join("out/products.enriched.jsonl")).unwrap();
    assert_eq!(results.lines().count(), 306);

    let again = bin().arg("run").arg(&file).output().unwrap();
    let stdout2 = String::from_utf8_lossy(&again.stdout);
    assert!(stdout2.contains("sent       0 requests"), "{stdout2}");
    assert!(stdout2.contains("cost       $0.00"), "{stdout2}");

    let rep = bin()
        .args(["report", "--json"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(rep.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&rep.stdout).unwrap();
    for key in [
        "run_id",
        "pipeline",
        "status",
        "attempts",
        "retry_rate",
        "cost_usd",
        "standard_cost_usd",
        "cost_per_processed_item_usd",
    ] {
        assert!(v.get(key).is_some(), "report lacks {key}: {v}");
    }
    for (obj, keys) in [
        ("records", &["read", "quarantined"][..]),
        (
            "items",
            &["unique", "duplicates", "reused", "succeeded", "failed"][..],
        ),
        (
            "tokens",
            &["input", "cached_input", "output", "reasoning"][..],
        ),
    ] {
        for k in keys {
            assert!(v[obj].get(k).is_some(), "report lacks {obj}.{k}: {v}");
        }
    }
    assert_eq!(v["cost_usd"], "0", "the rerun costs nothing");
    assert_eq!(
        v["items"]["reused"].as_u64(),
        v["items"]["succeeded"].as_u64()
    );
    assert!(v["cost_usd"].is_string());

    let items = bin()
        .args(["report", "--items", "--json"])
        .arg(&file)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&items.stdout).unwrap();
    assert_eq!(v["quarantined"].as_array().unwrap().len(), 2);

    let status = bin().arg("status").arg(&file).output().unwrap();
    assert!(String::from_utf8_lossy(&status.stdout).contains("no batch in flight"));
}

/// The simulator draws its faults and cache hits from the seed and each request's body, not
/// from the run's ids: the example run in two fresh copies gives the same figures and the same
/// results. Only what follows the clock may differ (durations, how retries fall into batches,
/// the odd HTTP 429, which is drawn per call and only delays).
#[test]
fn the_example_gives_the_same_figures_in_two_fresh_copies() {
    let figures = || {
        let (tmp, ex) = examples();
        let file = ex.join("catalog-enrichment.toml");
        faster(&file);
        let out = bin().arg("run").arg(&file).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let rep = bin()
            .args(["report", "--json"])
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(rep.status.code(), Some(0));
        let v: Value = serde_json::from_slice(&rep.stdout).unwrap();
        let figures: Vec<(&str, Value)> = [
            "status",
            "records",
            "items",
            "attempts",
            "retries",
            "requests_sent",
            "tokens",
            "cost_usd",
            "standard_cost_usd",
        ]
        .into_iter()
        .map(|k| (k, v[k].clone()))
        .collect();
        let results = std::fs::read_to_string(ex.join("out/products.enriched.jsonl")).unwrap();
        drop(tmp);
        (figures, results)
    };
    let (one, results_one) = figures();
    let (two, results_two) = figures();
    assert_eq!(one, two, "the same figures from the same seed");
    assert!(
        results_one == results_two,
        "the same results from the same seed"
    );
    let get = |k: &str| one.iter().find(|f| f.0 == k).unwrap().1.clone();
    assert!(
        get("retries").as_u64().unwrap() > 0,
        "faults were drawn: {one:?}"
    );
    assert!(
        get("tokens")["cached_input"].as_u64().unwrap() > 0,
        "{one:?}"
    );
}

#[test]
fn the_ticket_example_runs_from_csv() {
    let (_tmp, ex) = examples();
    let file = ex.join("ticket-tagging.toml");
    faster(&file);
    let out = bin().arg("run").arg(&file).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(matches!(out.status.code(), Some(0) | Some(1)), "{stdout}");
    assert!(stdout.contains("quarantined 1"), "{stdout}");
    let results = std::fs::read_to_string(ex.join("out/tickets.labels.jsonl")).unwrap();
    let first: Value = serde_json::from_str(results.lines().next().unwrap()).unwrap();
    assert!(first["id"].as_str().unwrap().starts_with("T-"));
}

#[test]
fn validate_lists_every_problem_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.toml");
    std::fs::write(
        &file,
        r#"name = "broken pipeline!"
[source]
kind = "parquet"
id_field = "id"
[provider]
model = "gpt-5.4-mini"
simulate = true
colour = "red"
[provider.simulator]
fail_rate = 2
[prompt]
user = "Summarise {{text"
max_output_tokens = 0
[output]
schema = "nope.json"
"#,
    )
    .unwrap();
    let out = bin().arg("validate").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    for path in [
        "name:",
        "source.kind",
        "source.path",
        "provider.colour",
        "provider.simulator.fail_rate",
        "prompt.user",
        "prompt.max_output_tokens",
        "output.path",
    ] {
        assert!(err.contains(path), "missing {path} in:\n{err}");
    }
    assert!(err.contains("broken.toml"), "{err}");

    // A well-formed file whose environment is wrong: schema unreadable, key missing, no price.
    std::fs::write(dir.path().join("in.jsonl"), "{\"id\":1,\"text\":\"x\"}\n").unwrap();
    std::fs::write(
        &file,
        r#"name = "env"
[source]
kind = "jsonl"
path = "in.jsonl"
id_field = "id"
[provider]
model = "gpt-unknown-9"
api_key_env = "NIGHTSHIFT_TEST_SURELY_UNSET"
[prompt]
user = "{{text}}"
max_output_tokens = 10
[output]
schema = "missing-schema.json"
path = "out.jsonl"
"#,
    )
    .unwrap();
    let out = bin().arg("validate").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "output.schema",
        "provider.api_key_env",
        "NIGHTSHIFT_TEST_SURELY_UNSET",
        "provider.model",
        "gpt-unknown-9",
    ] {
        assert!(err.contains(needle), "missing {needle} in:\n{err}");
    }
    // `run` refuses the same file before doing anything.
    let out = bin().arg("run").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(
        !dir.path().join(".nightshift").exists(),
        "nothing was created"
    );
}

#[test]
fn validate_lists_structural_and_environment_problems_together() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("schema.json"), r#"{"type": "object"}"#).unwrap();
    let file = dir.path().join("five.toml");
    std::fs::write(
        &file,
        r#"name = "five"
[source]
kind = "jsonl"
path = "no-such-source.jsonl"
id_field = "id"
[provider]
model = "gpt-unknown-9"
simulate = true
colour = "red"
[prompt]
user = "Summarise {{text"
max_output_tokens = 100
[output]
schema = "schema.json"
path = "out.jsonl"
[budget]
max_usd = "ten dollars"
"#,
    )
    .unwrap();
    let out = bin().arg("validate").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    for (path, detail) in [
        ("provider.colour", "unknown key"),
        ("prompt.user", "never closed"),
        ("budget.max_usd", ""),
        ("source.path", "no-such-source.jsonl"),
        ("provider.model", "gpt-unknown-9"),
    ] {
        let line = err
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("- {path}:")))
            .unwrap_or_else(|| panic!("no problem at {path} in:\n{err}"));
        assert!(line.contains(detail), "{path} lacks `{detail}`: {line}");
    }
    // Each once, and nothing derived from them.
    assert!(err.contains("5 problems"), "{err}");
}

#[test]
fn validate_catches_a_template_field_no_record_has() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("schema.json"), r#"{"type": "object"}"#).unwrap();
    let mut records = String::new();
    for i in 0..308 {
        records.push_str(&format!(
            "{{\"sku\": \"S-{i}\", \"title\": \"Chair {i}\", \"material\": \"oak\"}}\n"
        ));
    }
    std::fs::write(dir.path().join("products.jsonl"), records).unwrap();
    let pipeline = |user: &str| {
        format!(
            r#"name = "typo"
[source]
kind = "jsonl"
path = "products.jsonl"
id_field = "sku"
[provider]
model = "gpt-5.4-mini"
simulate = true
[prompt]
user = "Title: {{{{title}}}}\nMaterial: {user}"
max_output_tokens = 100
[output]
schema = "schema.json"
path = "out.jsonl"
"#
        )
    };
    let file = dir.path().join("typo.toml");
    std::fs::write(&file, pipeline("{{materail}}")).unwrap();
    let out = bin().arg("validate").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    for needle in [
        "prompt.user: field `materail`",
        "first 200 records",
        "did you mean `material`?",
        "The records have: material, sku, title.",
    ] {
        assert!(err.contains(needle), "missing {needle} in:\n{err}");
    }
    // `run` refuses it too, before sending anything.
    let out = bin().arg("run").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(!dir.path().join("out.jsonl").exists());

    // Optional: a field that may be absent is not an error.
    std::fs::write(&file, pipeline("{{materail?}}")).unwrap();
    let out = bin().arg("validate").arg(&file).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));
}

#[test]
fn the_api_key_never_reaches_output_logs_or_the_store() {
    let (_tmp, ex) = examples();
    let file = ex.join("ticket-tagging.toml");
    // Point the pipeline at a separately started simulator with a real (fake) key.
    let mut sim = bin()
        .args([
            "simulate",
            "--listen",
            "127.0.0.1:0",
            "--batch-seconds",
            "0.2",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    {
        use std::io::BufRead;
        let stdout = sim.stdout.as_mut().unwrap();
        std::io::BufReader::new(stdout)
            .read_line(&mut first)
            .unwrap();
    }
    let url = first
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let text = std::fs::read_to_string(&file).unwrap();
    let text = text
        .replace(
            "simulate = true",
            &format!("simulate = false\nbase_url = \"{url}/v1\""),
        )
        .replace(
            "api_key_env = \"OPENAI_API_KEY\"",
            "api_key_env = \"NS_TEST_KEY\"",
        );
    std::fs::write(&file, text).unwrap();
    let secret = "sk-live-ZZTOPSECRET0123456789";
    let out = bin()
        .arg("--log-format")
        .arg("json")
        .arg("run")
        .arg(&file)
        .env("NS_TEST_KEY", secret)
        .env("NIGHTSHIFT_LOG", "nightshift=debug")
        .output()
        .unwrap();
    let _ = sim.kill();
    let _ = sim.wait();
    assert!(
        matches!(out.status.code(), Some(0) | Some(1)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all = [out.stdout, out.stderr].concat();
    assert!(!String::from_utf8_lossy(&all).contains("ZZTOPSECRET"));
    for entry in walk(&ex) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !bytes.windows(11).any(|w| w == b"ZZTOPSECRET"),
            "the key leaked into {}",
            entry.display()
        );
    }
    // And a missing key is refused before anything is sent.
    let out = bin()
        .arg("run")
        .arg(&file)
        .env_remove("NS_TEST_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// `init` gives a newcomer a pipeline of their own that runs offline at once; running it
/// again keeps what they have edited.
#[test]
fn init_writes_a_pipeline_that_runs_offline_and_a_second_init_keeps_edits() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    let out = bin().arg("init").arg(&demo).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = bin()
        .args(["run", "--no-progress"])
        .arg(demo.join("pipeline.toml"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records = std::fs::read_to_string(demo.join("data/tickets.jsonl"))
        .unwrap()
        .lines()
        .count();
    let results = std::fs::read_to_string(demo.join("out/tickets.jsonl")).unwrap();
    assert_eq!(results.lines().count(), records);
    assert!(
        results
            .lines()
            .all(|l| serde_json::from_str::<Value>(l).unwrap()["status"] == "succeeded"),
        "{results}"
    );

    let edited = std::fs::read_to_string(demo.join("pipeline.toml"))
        .unwrap()
        .replace("name = \"ticket-labels\"", "name = \"my-tickets\"");
    std::fs::write(demo.join("pipeline.toml"), &edited).unwrap();
    std::fs::remove_file(demo.join("schemas/ticket.json")).unwrap();
    let out = bin().arg("init").arg(&demo).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("kept") && said.contains("created"), "{said}");
    assert_eq!(
        std::fs::read_to_string(demo.join("pipeline.toml")).unwrap(),
        edited
    );
    assert!(demo.join("schemas/ticket.json").exists());
}

/// Completions and the man page come from the command line itself: every command is in
/// them, and bash accepts the script.
#[test]
fn completions_and_the_man_page_cover_every_command() {
    let commands = [
        "run",
        "init",
        "validate",
        "report",
        "runs",
        "status",
        "cancel",
        "plan",
        "reconcile",
        "worker",
    ];
    let bash = bin().args(["completions", "bash"]).output().unwrap();
    assert_eq!(bash.status.code(), Some(0));
    let script = String::from_utf8(bash.stdout).unwrap();
    for c in commands {
        assert!(script.contains(c), "bash completions lack {c}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nightshift.bash");
    std::fs::write(&path, &script).unwrap();
    let check = Command::new("bash").arg("-n").arg(&path).output().unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    for shell in ["zsh", "fish"] {
        let out = bin().args(["completions", shell]).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{shell}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("reconcile"),
            "{shell}"
        );
    }
    let man = bin().arg("man").output().unwrap();
    assert_eq!(man.status.code(), Some(0));
    let page = String::from_utf8(man.stdout).unwrap();
    assert!(
        page.starts_with(".ie") || page.contains(".TH nightshift 1"),
        "{page}"
    );
    for c in commands {
        assert!(page.contains(c), "the man page lacks {c}");
    }
}

/// Every command's `--help` ends with an example of its use.
#[test]
fn every_command_help_shows_an_example() {
    let top = bin().arg("--help").output().unwrap();
    let text = String::from_utf8(top.stdout).unwrap();
    let commands: Vec<String> = text
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect();
    assert!(commands.len() >= 14, "{commands:?}");
    for c in &commands {
        let out = bin().arg(c).arg("--help").output().unwrap();
        let help = String::from_utf8(out.stdout).unwrap();
        assert!(
            help.contains("Example") && help.contains(&format!("nightshift {c}")),
            "`nightshift {c} --help` shows no example:\n{help}"
        );
    }
}

/// `error:` and log lines carry colour only on a terminal (auto) or when asked for; a pipe,
/// `--color never` and `NO_COLOR` get plain text.
#[test]
fn colour_goes_to_terminals_or_on_request_only() {
    let plain = bin()
        .args(["validate", "/nonexistent/pipeline.toml"])
        .output()
        .unwrap();
    let err = String::from_utf8(plain.stderr).unwrap();
    assert!(
        err.starts_with("error: ") && !err.contains('\x1b'),
        "{err:?}"
    );
    let coloured = bin()
        .args([
            "--color",
            "always",
            "validate",
            "/nonexistent/pipeline.toml",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8(coloured.stderr).unwrap();
    assert!(err.starts_with('\x1b') && err.contains("error:"), "{err:?}");
    // A command that cannot load its pipeline says what to do next, on a line of its own.
    let hinted = bin()
        .args(["run", "/nonexistent/pipeline.toml"])
        .output()
        .unwrap();
    assert_eq!(hinted.status.code(), Some(78));
    let err = String::from_utf8(hinted.stderr).unwrap();
    assert!(
        err.lines().any(|l| l
            == "hint: `nightshift validate /nonexistent/pipeline.toml` lists every problem of the file and its environment"),
        "{err:?}"
    );
    let hinted = bin()
        .args(["--color", "always", "plan", "/nonexistent/pipeline.toml"])
        .output()
        .unwrap();
    let err = String::from_utf8(hinted.stderr).unwrap();
    assert!(
        err.lines().any(|l| l.starts_with('\x1b')
            && l.contains("hint:")
            && l.contains("nightshift validate")),
        "{err:?}"
    );
    // Debug logs of a whole run, through a pipe: no escape codes.
    let dir = tempfile::tempdir().unwrap();
    assert!(
        bin()
            .arg("init")
            .arg(dir.path())
            .output()
            .unwrap()
            .status
            .success()
    );
    let run = bin()
        .args(["run", "--no-progress"])
        .arg(dir.path().join("pipeline.toml"))
        .env("NIGHTSHIFT_LOG", "nightshift=debug")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let err = String::from_utf8(run.stderr).unwrap();
    assert!(err.lines().count() > 5 && !err.contains('\x1b'), "{err}");
}
