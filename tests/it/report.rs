//! The HTML report as a user opens it: one self-contained file that holds `report --json`
//! exactly, asks nothing of the network, and shows the run's cost, outcomes, batches, plan
//! and recent nights; `[report] html` rewrites it after every run.

use std::path::Path;

use nightshift::cost::Usd;
use serde_json::Value;

use crate::cli::{bin, examples, faster};

fn ok(c: &mut std::process::Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.code() == Some(0),
        "{:?}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn report_json(file: &Path, run: Option<&str>) -> Value {
    let mut c = bin();
    c.args(["report", "--json"]).arg(file);
    if let Some(r) = run {
        c.args(["--run", r]);
    }
    serde_json::from_str(&ok(&mut c)).unwrap()
}

/// The JSON object embedded in the page.
fn embedded(page: &str) -> Value {
    let open = "<script type=\"application/json\" id=\"nightshift-report\">";
    let start = page.find(open).expect("the page embeds its data") + open.len();
    let end = start + page[start..].find("</script>").unwrap();
    serde_json::from_str(&page[start..end]).expect("the embedded data is JSON")
}

/// What a page must never hold: a reference that would leave the file, or anything that runs.
fn assert_self_contained(page: &str) {
    for needle in ["http://", "https://", "src=", "href=", "url(", "@import"] {
        assert!(!page.contains(needle), "the page holds `{needle}`");
    }
    assert_eq!(
        page.matches("<script").count(),
        1,
        "one script element: the JSON data"
    );
    assert!(page.contains("Content-Security-Policy\" content=\"default-src 'none'"));
}

fn usd(v: &Value) -> Usd {
    Usd::parse(v.as_str().unwrap_or_else(|| panic!("not money text: {v}"))).unwrap()
}

/// The breakdowns add up to the run's own figures.
fn assert_breakdowns_add_up(v: &Value) {
    let by_model = v["by_model"].as_array().unwrap();
    assert!(!by_model.is_empty(), "{v}");
    let cost = by_model
        .iter()
        .fold(Usd::ZERO, |acc, c| acc + usd(&c["cost_usd"]));
    assert_eq!(cost, usd(&v["cost_usd"]), "cost by model adds up");
    let input: u64 = by_model
        .iter()
        .map(|c| c["tokens"]["input"].as_u64().unwrap())
        .sum();
    assert_eq!(input, v["tokens"]["input"].as_u64().unwrap());
    let attempts: u64 = v["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["attempts"].as_u64().unwrap())
        .sum();
    assert_eq!(attempts, v["attempts"].as_u64().unwrap(), "outcomes add up");
    assert_eq!(
        v["batch_timeline"].as_array().unwrap().len() as u64,
        v["batches"].as_u64().unwrap()
    );
}

#[test]
fn the_html_report_holds_report_json_and_nothing_from_the_network() {
    let (_tmp, ex) = examples();
    let file = ex.join("catalog-enrichment.toml");
    faster(&file);
    // `[report] html`: every run rewrites the page.
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        format!("{text}\n[report]\nhtml = \"out/night.html\"\n"),
    )
    .unwrap();
    let first = ok(bin().arg("run").arg(&file));
    let configured = ex.join("out/night.html");
    assert!(first.contains("report     "), "{first}");
    let night_one = std::fs::read_to_string(&configured).unwrap();
    let one = report_json(&file, None);
    assert_eq!(embedded(&night_one), one, "the page embeds report --json");
    assert_self_contained(&night_one);
    assert_breakdowns_add_up(&one);
    // The example's faults show as outcomes other than ok, and its plan against the actual.
    let verdicts: Vec<&str> = one["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["verdict"].as_str().unwrap())
        .collect();
    assert!(
        verdicts.contains(&"ok") && verdicts.len() > 1,
        "{verdicts:?}"
    );
    assert!(!one["plan_vs_actual"].as_array().unwrap().is_empty());
    for heading in [
        "Batch against standard prices",
        "Cost and tokens by stage and model",
        "Attempts by outcome",
        "Batches",
        "Plan against actual",
        "Cost per processed item, run by run",
        "<svg class=\"timeline\"",
        "<svg class=\"history\"",
    ] {
        assert!(night_one.contains(heading), "the page lacks `{heading}`");
    }
    assert_eq!(one["history"].as_array().unwrap().len(), 1);

    // Night two sends nothing; its page shows both nights, the second at no cost.
    ok(bin().arg("run").arg(&file));
    let night_two = std::fs::read_to_string(&configured).unwrap();
    let two = report_json(&file, None);
    assert_eq!(embedded(&night_two), two);
    let history = two["history"].as_array().unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0]["run_id"], one["run_id"], "oldest first");
    assert_eq!(history[0]["cost_usd"], one["cost_usd"]);
    assert_eq!(history[1]["run_id"], two["run_id"]);
    assert_eq!(history[1]["cost_usd"], "0");

    // `report --html` of the first night, asked for later, shows the nights up to it.
    let old = ex.join("night-one.html");
    let run_one = one["run_id"].as_str().unwrap();
    ok(bin()
        .args(["report", "--run", run_one, "--html"])
        .arg(&old)
        .arg(&file));
    let page = std::fs::read_to_string(&old).unwrap();
    let again = embedded(&page);
    assert_eq!(again, report_json(&file, Some(run_one)));
    assert_eq!(again["history"].as_array().unwrap().len(), 1);
    assert_eq!(again["cost_usd"], one["cost_usd"]);
}

#[test]
fn the_html_report_of_a_reviewed_multi_stage_run_shows_each_stage() {
    let (_tmp, ex) = examples();
    let file = ex.join("ticket-tagging.toml");
    faster(&file);
    let out = bin().arg("run").arg(&file).output().unwrap();
    assert!(
        matches!(out.status.code(), Some(0) | Some(1)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = ex.join("tickets.html");
    ok(bin().arg("report").arg("--html").arg(&html).arg(&file));
    let page = std::fs::read_to_string(&html).unwrap();
    let v = report_json(&file, None);
    assert_eq!(embedded(&page), v);
    assert_self_contained(&page);
    assert_breakdowns_add_up(&v);
    let stages: Vec<&str> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert!(stages.len() >= 2, "{stages:?}");
    for s in &stages {
        assert!(
            v["by_model"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["stage"] == *s),
            "no cost row for stage {s}"
        );
        assert!(
            page.contains(&format!("<h3>{s} · ")),
            "no outcome block for {s}"
        );
    }
    assert!(page.contains("review flagged (records)"));
}
