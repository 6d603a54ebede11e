//! The simulator on the wire: what an OpenAI client sees.

use serde_json::{Value, json};

use crate::common::*;

async fn upload(base: &str, name: &str, body: String) -> Value {
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::text(body).file_name(name.to_string()),
        );
    reqwest::Client::new()
        .post(format!("{base}/files"))
        .bearer_auth("k")
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn create(base: &str, file_id: &str) -> Value {
    reqwest::Client::new()
        .post(format!("{base}/batches"))
        .bearer_auth("k")
        .json(&json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn wait_terminal(base: &str, id: &str) -> Value {
    for _ in 0..200 {
        let b: Value = reqwest::Client::new()
            .get(format!("{base}/batches/{id}"))
            .bearer_auth("k")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if ["completed", "failed", "expired", "cancelled"].contains(&b["status"].as_str().unwrap())
        {
            return b;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("batch {id} never ended");
}

fn line(cid: &str, model: &str) -> String {
    json!({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 50}})
    .to_string()
}

#[tokio::test]
async fn a_missing_key_gets_the_providers_401() {
    let sim = start_sim(quiet_sim()).await;
    let resp = reqwest::get(format!("{}/batches", sim.base_url()))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn a_bad_input_file_fails_the_batch_with_errors_data() {
    let sim = start_sim(quiet_sim()).await;
    let base = sim.base_url();
    let body = [
        line("a", "gpt-5.4-mini"),
        line("a", "gpt-5.4-mini"),
        line("b", "gpt-5.4-nano"),
        "{not json".into(),
    ]
    .join("\n");
    let f = upload(&base, "x.jsonl", body).await;
    let b = create(&base, f["id"].as_str().unwrap()).await;
    assert_eq!(b["status"], "validating");
    assert_eq!(b["request_counts"]["total"], 0);
    let b = wait_terminal(&base, b["id"].as_str().unwrap()).await;
    assert_eq!(b["status"], "failed");
    let codes: Vec<&str> = b["errors"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["code"].as_str().unwrap())
        .collect();
    assert!(codes.contains(&"duplicate_custom_id"), "{codes:?}");
    assert!(codes.contains(&"model_mismatch"), "{codes:?}");
    assert!(codes.contains(&"invalid_json_line"), "{codes:?}");
    assert!(b["output_file_id"].is_null() && b["error_file_id"].is_null());
}

#[tokio::test]
async fn completed_batches_return_shuffled_schema_valid_answers_with_usage() {
    let sim = start_sim(quiet_sim()).await;
    let base = sim.base_url();
    let schema: Value = serde_json::from_str(SCHEMA).unwrap();
    let lines: Vec<String> = (0..40)
        .map(|i| {
            json!({"custom_id": format!("c{i}"), "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": format!("ticket {i}")}],
                    "max_completion_tokens": 300,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": true}}}})
            .to_string()
        })
        .collect();
    let f = upload(&base, "y.jsonl", lines.join("\n") + "\n").await;
    let b = create(&base, f["id"].as_str().unwrap()).await;
    let b = wait_terminal(&base, b["id"].as_str().unwrap()).await;
    assert_eq!(b["status"], "completed");
    assert_eq!(
        b["request_counts"],
        json!({"total": 40, "completed": 40, "failed": 0})
    );
    let out = reqwest::Client::new()
        .get(format!(
            "{base}/files/{}/content",
            b["output_file_id"].as_str().unwrap()
        ))
        .bearer_auth("k")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let ids: Vec<String> = out
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let content = v["response"]["body"]["choices"][0]["message"]["content"]
                .as_str()
                .unwrap();
            assert!(
                validator.is_valid(&serde_json::from_str(content).unwrap()),
                "{content}"
            );
            assert!(
                v["response"]["body"]["usage"]["prompt_tokens"]
                    .as_u64()
                    .unwrap()
                    > 0
            );
            v["custom_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 40);
    let in_order: Vec<String> = (0..40).map(|i| format!("c{i}")).collect();
    assert_ne!(ids, in_order, "lines come back in no particular order");
    let usage = &b["usage"];
    assert!(usage["input_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn expired_batches_keep_partial_results_and_bill_only_those() {
    let sim = start_sim(nightshift::sim::SimSettings {
        expire_first: 1,
        ..quiet_sim()
    })
    .await;
    let base = sim.base_url();
    let lines: Vec<String> = (0..10)
        .map(|i| line(&format!("e{i}"), "gpt-4o-mini"))
        .collect();
    let f = upload(&base, "z.jsonl", lines.join("\n")).await;
    let b = create(&base, f["id"].as_str().unwrap()).await;
    let b = wait_terminal(&base, b["id"].as_str().unwrap()).await;
    assert_eq!(b["status"], "expired");
    assert_eq!(b["request_counts"]["completed"], 5);
    assert_eq!(b["request_counts"]["failed"], 5);
    let rec = record(&sim).await;
    assert_eq!(rec["bill"]["totals"]["requests"], 5);
    let outcomes: Vec<&str> = rec["batches"][0]["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes.iter().filter(|o| **o == "expired").count(), 5);
}

// ------------------------------------------------------------------ ids and persistence -------

async fn get(url: String) -> Value {
    reqwest::Client::new()
        .get(url)
        .bearer_auth("k")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn download(base: &str, file_id: &str) -> String {
    reqwest::Client::new()
        .get(format!("{base}/files/{file_id}/content"))
        .bearer_auth("k")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// custom_id → answer content, from an OpenAI result file.
fn contents(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let c = &v["response"]["body"]["choices"][0]["message"]["content"];
            (
                v["custom_id"].as_str().unwrap().to_string(),
                c.as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn lines(prefix: &str, n: usize) -> String {
    (0..n)
        .map(|i| line(&format!("{prefix}{i}"), "gpt-4o-mini") + "\n")
        .collect()
}

fn open_state(
    dir: &std::path::Path,
    settings: nightshift::sim::SimSettings,
) -> std::sync::Arc<nightshift::sim::Sim> {
    nightshift::sim::Sim::persistent(dir, settings, nightshift::cost::PriceTable::builtin())
        .unwrap()
}

async fn start_state(
    dir: &std::path::Path,
    settings: nightshift::sim::SimSettings,
) -> nightshift::sim::SimHandle {
    nightshift::sim::start(open_state(dir, settings), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// Two simulators with the same seed (two processes on two nights) never hand out the same
/// file or batch id, and answer the same request the same way.
#[tokio::test]
async fn two_simulators_with_one_seed_share_answers_not_ids() {
    let (one, two) = (start_sim(quiet_sim()).await, start_sim(quiet_sim()).await);
    let mut seen = Vec::new();
    for sim in [&one, &two] {
        let base = sim.base_url();
        let f = upload(&base, "x.jsonl", lines("c", 12)).await;
        let b = create(&base, f["id"].as_str().unwrap()).await;
        let b = wait_terminal(&base, b["id"].as_str().unwrap()).await;
        assert_eq!(b["status"], "completed");
        let out = b["output_file_id"].as_str().unwrap().to_string();
        let answers = contents(&download(&base, &out).await);
        seen.push((f["id"].clone(), b["id"].clone(), out, answers));
    }
    let (a, b) = (&seen[0], &seen[1]);
    assert_ne!(a.0, b.0, "input file ids");
    assert_ne!(a.1, b.1, "batch ids");
    assert_ne!(a.2, b.2, "output file ids");
    assert_eq!(a.3.len(), 12);
    assert_eq!(a.3, b.3, "the same answers");
}

/// The second night: a batch created by the process before is found, finishes on the wall
/// clock, and downloads; the earlier bill and record are all there.
#[tokio::test]
async fn a_restarted_simulator_serves_the_batches_of_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("simulator");
    let settings = nightshift::sim::SimSettings {
        batch_seconds: 0.8,
        ..quiet_sim()
    };
    let sim = start_state(&state, settings.clone()).await;
    let base = sim.base_url();
    let f = upload(&base, "a.jsonl", lines("a", 5)).await;
    let ended = create(&base, f["id"].as_str().unwrap()).await;
    let ended = wait_terminal(&base, ended["id"].as_str().unwrap()).await;
    assert_eq!(ended["status"], "completed");
    let ended_out = download(&base, ended["output_file_id"].as_str().unwrap()).await;
    let f = upload(&base, "b.jsonl", lines("b", 7)).await;
    let running = create(&base, f["id"].as_str().unwrap()).await;
    let running_id = running["id"].as_str().unwrap().to_string();
    while get(format!("{base}/batches/{running_id}")).await["status"] != "in_progress" {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let before = record(&sim).await;
    assert_eq!(before["bill"]["totals"]["requests"], 5);
    let Err(refused) = nightshift::sim::Sim::persistent(
        &state,
        settings.clone(),
        nightshift::cost::PriceTable::builtin(),
    ) else {
        panic!("one simulator per state folder");
    };
    assert!(
        refused.to_string().contains(&state.display().to_string()),
        "{refused}"
    );
    sim.stop().await;

    let sim = start_state(&state, settings).await;
    let base = sim.base_url();
    let b = wait_terminal(&base, &running_id).await;
    assert_eq!(b["status"], "completed");
    assert_eq!(
        b["request_counts"],
        json!({"total": 7, "completed": 7, "failed": 0})
    );
    let out = contents(&download(&base, b["output_file_id"].as_str().unwrap()).await);
    let want: Vec<String> = (0..7).map(|i| format!("b{i}")).collect();
    assert_eq!(out.keys().cloned().collect::<Vec<_>>(), {
        let mut w = want.clone();
        w.sort();
        w
    });
    let again = get(format!("{base}/batches/{}", ended["id"].as_str().unwrap())).await;
    assert_eq!(again["status"], "completed");
    assert_eq!(
        download(&base, again["output_file_id"].as_str().unwrap()).await,
        ended_out
    );

    let bills: std::collections::HashMap<String, u64> = sim
        .sim
        .batch_bills()
        .into_iter()
        .map(|(id, n, ..)| (id, n))
        .collect();
    assert_eq!(bills.get(ended["id"].as_str().unwrap()), Some(&5));
    assert_eq!(bills.get(&running_id), Some(&7));
    let after = record(&sim).await;
    assert_eq!(after["batches"].as_array().unwrap().len(), 2);
    assert_eq!(after["uploads"].as_array().unwrap().len(), 2);
    assert_eq!(after["bill"]["totals"]["requests"], 12);
    let earlier = before["bill"]["per_custom_id"].as_array().unwrap();
    let now = after["bill"]["per_custom_id"].as_array().unwrap();
    assert!(
        earlier.iter().all(|e| now.contains(e)),
        "the earlier bill, to the pico-dollar"
    );
    let outcomes = after["batches"][1]["requests"].as_array().unwrap();
    assert!(
        outcomes.iter().all(|r| r["outcome"] == "ok"),
        "{outcomes:?}"
    );
    #[cfg(unix)]
    for e in std::fs::read_dir(state.join("files")).unwrap() {
        use std::os::unix::fs::PermissionsExt;
        let mode = e.unwrap().metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "uploads and results are private");
    }
}

/// A kill mid-write leaves half a line at the end of the journal: it is ignored and gone
/// after the reopen.
#[tokio::test]
async fn a_torn_last_journal_line_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("simulator");
    let sim = start_state(&state, quiet_sim()).await;
    let base = sim.base_url();
    let f = upload(&base, "a.jsonl", lines("a", 3)).await;
    let b = create(&base, f["id"].as_str().unwrap()).await;
    wait_terminal(&base, b["id"].as_str().unwrap()).await;
    let before = record(&sim).await;
    sim.stop().await;

    // Half of the line that holds the upload: applied whole, it would add a second upload.
    let journal = state.join("journal.jsonl");
    let text = std::fs::read_to_string(&journal).unwrap();
    let upload_line = text
        .lines()
        .find(|l| l.contains(r#""op":"upload""#))
        .unwrap();
    let mut torn = text.clone();
    torn.push_str(&upload_line[..upload_line.len() * 2 / 3]);
    std::fs::write(&journal, torn).unwrap();

    let sim = start_state(&state, quiet_sim()).await;
    assert_eq!(record(&sim).await, before);
    let text = std::fs::read_to_string(&journal).unwrap();
    assert!(text.ends_with('\n'));
    for l in text.lines() {
        serde_json::from_str::<Value>(l).expect("only whole lines after the reopen");
    }
}

async fn send(req: reqwest::RequestBuilder) -> Value {
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert!(status.is_success(), "{status}: {v}");
    v
}

/// A cancelled batch still says how many requests it held, in every provider's counts.
#[tokio::test]
async fn cancelled_batches_keep_their_request_total() {
    // validating for 1 s; a cancel takes 0.5 s
    let sim = start_sim(nightshift::sim::SimSettings {
        batch_seconds: 10.0,
        ..quiet_sim()
    })
    .await;
    let root = sim.root_url();
    let http = reqwest::Client::new();
    let ended = |s: &Value| {
        ["cancelled", "Cancelled", "ended", "BATCH_STATE_CANCELLED"]
            .contains(&s.as_str().unwrap_or(""))
    };

    // OpenAI and Azure, cancelled while validating
    for azure in [false, true] {
        let (prefix, q) = if azure {
            (format!("{root}/openai"), "?api-version=2024-10-21")
        } else {
            (format!("{root}/v1"), "")
        };
        let auth = |r: reqwest::RequestBuilder| {
            if azure {
                r.header("api-key", "k")
            } else {
                r.bearer_auth("k")
            }
        };
        let form = reqwest::multipart::Form::new()
            .text("purpose", "batch")
            .part(
                "file",
                reqwest::multipart::Part::text(lines("c", 50)).file_name("in.jsonl"),
            );
        let f = send(auth(http.post(format!("{prefix}/files{q}"))).multipart(form)).await;
        let b = send(auth(http.post(format!("{prefix}/batches{q}"))).json(&json!({
            "input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"
        })))
        .await;
        let id = b["id"].as_str().unwrap();
        send(auth(http.post(format!("{prefix}/batches/{id}/cancel{q}")))).await;
        let mut b = Value::Null;
        for _ in 0..200 {
            b = send(auth(http.get(format!("{prefix}/batches/{id}{q}")))).await;
            if ended(&b["status"]) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(ended(&b["status"]), "{b}");
        assert_eq!(
            b["request_counts"],
            json!({"total": 50, "completed": 0, "failed": 50}),
            "azure: {azure}"
        );
    }

    // Anthropic
    let anthropic = |r: reqwest::RequestBuilder| {
        r.header("x-api-key", "k")
            .header("anthropic-version", "2023-06-01")
    };
    let requests: Vec<Value> = (0..50)
        .map(|i| {
            json!({"custom_id": format!("m{i}"), "params": {"model": "claude-haiku-4-5",
            "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}})
        })
        .collect();
    let b = send(
        anthropic(http.post(format!("{root}/v1/messages/batches")))
            .json(&json!({"requests": requests})),
    )
    .await;
    let id = b["id"].as_str().unwrap();
    send(anthropic(
        http.post(format!("{root}/v1/messages/batches/{id}/cancel")),
    ))
    .await;
    let mut b = Value::Null;
    for _ in 0..200 {
        b = send(anthropic(
            http.get(format!("{root}/v1/messages/batches/{id}")),
        ))
        .await;
        if b["processing_status"] == "ended" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(b["processing_status"], "ended", "{b}");
    let c = &b["request_counts"];
    let total: u64 = ["processing", "succeeded", "errored", "canceled", "expired"]
        .iter()
        .map(|k| c[k].as_u64().unwrap())
        .sum();
    assert_eq!((total, c["canceled"].as_u64().unwrap()), (50, 50), "{c}");

    // Gemini (inline), cancelled while pending
    let gemini = |r: reqwest::RequestBuilder| r.header("x-goog-api-key", "k");
    let requests: Vec<Value> = (0..50)
        .map(|i| {
            json!({"request": {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
            "metadata": {"key": format!("g{i}")}})
        })
        .collect();
    let op = send(
        gemini(http.post(format!(
            "{root}/v1beta/models/gemini-2.5-flash:batchGenerateContent"
        )))
        .json(&json!({"batch": {"displayName": "t", "inputConfig": {"requests": {"requests": requests}}}})),
    )
    .await;
    let name = op["name"].as_str().unwrap();
    send(gemini(http.post(format!("{root}/v1beta/{name}:cancel")))).await;
    let op = send(gemini(http.get(format!("{root}/v1beta/{name}")))).await;
    assert_eq!(op["metadata"]["state"], "BATCH_STATE_CANCELLED", "{op}");
    let stats = &op["metadata"]["batchStats"];
    assert_eq!(stats["requestCount"], "50", "{stats}");
    assert_eq!(stats["failedRequestCount"], "50", "{stats}");
}
