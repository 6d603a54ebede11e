//! Unit tests of the simulator core: ids, draws, determinism across simulators and reopens,
//! the journal, the state folder and the batch timeline (docs/providers.md §7).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::data::Status;
use super::faults::is_reasoning_model;
use super::*;

#[test]
fn draws_are_uniform_enough_and_deterministic() {
    let hits = (0..10_000)
        .filter(|i| draw(1, "fail", &format!("c{i}")) < 0.03)
        .count();
    assert!((200..400).contains(&hits), "{hits}");
    assert_eq!(draw(1, "a", "b"), draw(1, "a", "b"));
    assert_ne!(draw(1, "a", "b"), draw(2, "a", "b"));
}

fn settings(batch_seconds: f64) -> SimSettings {
    SimSettings {
        batch_seconds,
        ..Default::default()
    }
}

fn line(cid: &str) -> String {
    json!({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": format!("ticket {cid}")}],
            "max_completion_tokens": 50}})
    .to_string()
}

/// Uploads an OpenAI batch input of `n` requests named `{prefix}{i}`; its file id.
fn upload(sim: &Sim, prefix: &str, n: usize) -> String {
    let text: String = (0..n)
        .map(|i| line(&format!("{prefix}{i}")) + "\n")
        .collect();
    upload_text(sim, text)
}

/// Uploads an OpenAI batch input; its file id.
fn upload_text(sim: &Sim, text: String) -> String {
    let path = sim.new_file_path();
    crate::util::fs::create_private(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap();
    let f = sim
        .add_file(
            ProviderKind::OpenAi,
            "in.jsonl".into(),
            "batch".into(),
            path,
            text.len() as u64,
            String::new(),
        )
        .unwrap();
    f["id"].as_str().unwrap().to_string()
}

fn create(sim: &Sim, file_id: &str) -> Value {
    sim.create_openai_batch(
        ProviderKind::OpenAi,
        &json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
    )
    .unwrap()
}

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

fn wait_terminal(sim: &Sim, id: &str) -> Value {
    for _ in 0..500 {
        let b = sim.get_batch(id).unwrap();
        if ["completed", "failed", "expired", "cancelled"].contains(&b["status"].as_str().unwrap())
        {
            return b;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("batch {id} never ended");
}

/// custom_id → answer content and usage, from a result file.
fn answers(sim: &Sim, file_id: &str) -> BTreeMap<String, (String, Value)> {
    let text = std::fs::read_to_string(sim.file_path(file_id).unwrap()).unwrap();
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let body = &v["response"]["body"];
            (
                v["custom_id"].as_str().unwrap().to_string(),
                (
                    body["choices"][0]["message"]["content"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                    body["usage"].clone(),
                ),
            )
        })
        .collect()
}

fn journal_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("journal.jsonl")).unwrap().len()
}

#[test]
fn every_id_kind_differs_between_two_sims_with_one_seed_and_keeps_its_shape() {
    let a = Sim::new(settings(0.0), PriceTable::builtin()).unwrap();
    let b = Sim::new(settings(0.0), PriceTable::builtin()).unwrap();
    type Shape = fn(&str) -> bool;
    let shapes: [(&str, Shape); 7] = [
        ("file", |s| {
            s.strip_prefix("file-").is_some_and(|h| h.len() == 22)
        }),
        ("azure-file", |s| {
            s.strip_prefix("file-").is_some_and(|h| h.len() == 32)
        }),
        ("gemini-file", |s| {
            s.strip_prefix("files/").is_some_and(|h| h.len() == 16)
        }),
        ("batch", |s| {
            s.strip_prefix("batch_").is_some_and(|h| h.len() == 24)
        }),
        ("azure-batch", |s| {
            s.strip_prefix("batch_")
                .is_some_and(|u| uuid::Uuid::parse_str(u).is_ok())
        }),
        ("msgbatch", |s| {
            s.strip_prefix("msgbatch_01").is_some_and(|h| h.len() == 24)
        }),
        ("gemini-batch", |s| {
            s.strip_prefix("batches/").is_some_and(|h| h.len() == 16)
        }),
    ];
    for (kind, shape) in shapes {
        let (x, y) = (
            a.next_id(&mut a.lock(), kind),
            b.next_id(&mut b.lock(), kind),
        );
        assert_ne!(x, y, "{kind}");
        assert!(shape(&x) && shape(&y), "{kind}: {x} {y}");
    }
    assert_ne!(
        a.start_session("x".into()),
        b.start_session("x".into()),
        "upload session tokens"
    );
    assert_ne!(
        a.new_file_path().file_name(),
        b.new_file_path().file_name(),
        "content file names"
    );
}

#[test]
fn two_sims_with_one_seed_give_different_ids_and_the_same_answers() {
    let a = Sim::new(settings(0.0), PriceTable::builtin()).unwrap();
    let b = Sim::new(settings(0.0), PriceTable::builtin()).unwrap();
    let (fa, fb) = (upload(&a, "c", 20), upload(&b, "c", 20));
    assert_ne!(fa, fb);
    let (ba, bb) = (create(&a, &fa), create(&b, &fb));
    assert_ne!(id(&ba), id(&bb));
    let (ba, bb) = (wait_terminal(&a, &id(&ba)), wait_terminal(&b, &id(&bb)));
    assert_eq!(ba["status"], "completed");
    let (oa, ob) = (
        ba["output_file_id"].as_str().unwrap(),
        bb["output_file_id"].as_str().unwrap(),
    );
    assert_ne!(oa, ob, "output file ids");
    let answers_a = answers(&a, oa);
    assert_eq!(answers_a.len(), 20);
    assert_eq!(answers_a, answers(&b, ob));
    assert_eq!(
        a.record()["bill"]["totals"],
        b.record()["bill"]["totals"],
        "the same bill"
    );
}

/// A chat-completions body asking about `ticket`.
fn ticket(ticket: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": format!("ticket {ticket}")}],
        "max_completion_tokens": 50})
}

/// Uploads one batch of `(custom_id, body)` requests, runs it to its end; the outcome and
/// cached input tokens of each request, in input order.
fn run_batch(sim: &Sim, requests: &[(String, Value)]) -> Vec<(Outcome, u64)> {
    let text: String = requests
        .iter()
        .map(|(cid, body)| {
            json!({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body})
                .to_string()
                + "\n"
        })
        .collect();
    let b = wait_terminal(sim, &id(&create(sim, &upload_text(sim, text))));
    assert_eq!(b["status"], "completed");
    let inner = sim.lock();
    let bill: HashMap<&str, u64> = inner
        .bill
        .iter()
        .map(|e| (e.custom_id.as_str(), e.cached_input_tokens))
        .collect();
    let batch = &inner.batches[inner.batch_index[b["id"].as_str().unwrap()]];
    batch
        .requests
        .iter()
        .map(|r| {
            (
                r.outcome,
                bill.get(r.custom_id.as_str()).copied().unwrap_or(0),
            )
        })
        .collect()
}

fn weather() -> SimSettings {
    SimSettings {
        seed: 11,
        fail_rate: 0.3,
        invalid_json_rate: 0.3,
        cache_rate: 0.5,
        ..settings(0.0)
    }
}

#[test]
fn a_request_holding_the_fail_text_fails_every_time_and_no_other_does() {
    let sim = Sim::new(
        SimSettings {
            fail_when_contains: Some("ticket 7".into()),
            ..settings(0.0)
        },
        PriceTable::builtin(),
    )
    .unwrap();
    let requests: Vec<(String, Value)> = (0..5)
        .map(|i| (format!("b1-{i}-1"), ticket(&(i + 5).to_string())))
        .collect();
    for round in 0..3 {
        let got = run_batch(&sim, &requests);
        let failed: Vec<usize> = (0..got.len())
            .filter(|&i| got[i].0 == Outcome::Error)
            .collect();
        assert_eq!(failed, vec![2], "round {round}: {got:?}");
        assert!(
            got.iter()
                .all(|r| matches!(r.0, Outcome::Ok | Outcome::Error))
        );
    }
    let rec = sim.record();
    assert_eq!(rec["batches"][0]["model"], "gpt-4o-mini", "{rec}");
    assert_eq!(
        rec["bill"]["totals"]["requests"], 12,
        "error lines are not billed"
    );
    let empty = SimSettings {
        fail_when_contains: Some(String::new()),
        ..settings(0.0)
    };
    assert!(
        empty
            .problems()
            .iter()
            .any(|(f, _)| *f == "fail_when_contains")
    );
}

#[test]
fn faults_follow_the_body_not_the_custom_id() {
    let a = Sim::new(weather(), PriceTable::builtin()).unwrap();
    let b = Sim::new(weather(), PriceTable::builtin()).unwrap();
    let requests = |run: &str| -> Vec<(String, Value)> {
        (0..40)
            .map(|i| (format!("b{run}-{i}-1"), ticket(&i.to_string())))
            .collect()
    };
    let (ra, rb) = (
        run_batch(&a, &requests("one")),
        run_batch(&b, &requests("two")),
    );
    assert_eq!(ra, rb, "other custom_ids, the same bodies: the same draws");
    let kinds: HashSet<Outcome> = ra.iter().map(|r| r.0).collect();
    assert_eq!(kinds.len(), 3, "{ra:?}");
    assert!(ra.iter().any(|r| r.1 > 0), "some cache hits: {ra:?}");
    let totals = |s: &Sim| {
        let mut t = s.record()["bill"]["totals"].clone();
        t.as_object_mut().unwrap().remove("requests");
        t
    };
    assert_eq!(totals(&a), totals(&b), "the same bill");
}

/// The same body sent again (a retry: in another batch, in the same one, online) draws
/// afresh, on how many times this state answered it before; the count survives a reopen,
/// so a state reopened between sends draws what one that never closed draws.
#[test]
fn a_body_sent_again_draws_afresh_and_the_count_survives_a_reopen() {
    let body = ticket("again");
    let round = |sim: &Sim, k: usize| -> Vec<(Outcome, u64)> {
        let requests: Vec<(String, Value)> = (0..3)
            .map(|i| (format!("r{k}-{i}"), body.clone()))
            .collect();
        let mut got = run_batch(sim, &requests);
        let r = sim
            .online(ProviderKind::OpenAi, &format!("o{k}"), &body)
            .unwrap();
        got.push(match r.status {
            500 => (Outcome::Error, 0),
            _ => (
                Outcome::Ok,
                r.body["usage"]["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap(),
            ),
        });
        got
    };
    let kept = Sim::new(weather(), PriceTable::builtin()).unwrap();
    let kept: Vec<_> = (0..4).flat_map(|k| round(&kept, k)).collect();
    let dir = tempfile::tempdir().unwrap();
    let reopened: Vec<_> = (0..4)
        .flat_map(|k| {
            let sim = Sim::persistent(dir.path(), weather(), PriceTable::builtin()).unwrap();
            round(&sim, k)
        })
        .collect();
    // Online answers that are not valid JSON still answer 200: compare what both see.
    let seen = |v: &[(Outcome, u64)]| -> Vec<(bool, u64)> {
        v.iter().map(|(o, c)| (*o == Outcome::Error, *c)).collect()
    };
    assert_eq!(seen(&kept), seen(&reopened));
    let hash = hex::encode(Sha256::digest(body.to_string().as_bytes()));
    let expected: Vec<bool> = (0..kept.len())
        .map(|n| draw(11, "fail", &format!("{hash}#{n}")) < 0.3)
        .collect();
    assert_eq!(
        seen(&kept).iter().map(|s| s.0).collect::<Vec<_>>(),
        expected
    );
    assert!(expected.contains(&true) && expected.contains(&false));
    let sim = Sim::persistent(dir.path(), weather(), PriceTable::builtin()).unwrap();
    let h: [u8; 32] = Sha256::digest(body.to_string().as_bytes()).into();
    assert_eq!(
        sim.lock().answered[&h],
        16,
        "12 batch requests and 4 online ones"
    );
}

#[test]
fn expire_first_counts_every_batch_the_state_ever_created() {
    let dir = tempfile::tempdir().unwrap();
    let s = SimSettings {
        expire_first: 1,
        ..settings(0.0)
    };
    let first = {
        let sim = Sim::persistent(dir.path(), s.clone(), PriceTable::builtin()).unwrap();
        let f = upload(&sim, "a", 4);
        wait_terminal(&sim, &id(&create(&sim, &f)))
    };
    assert_eq!(first["status"], "expired");
    let sim = Sim::persistent(dir.path(), s, PriceTable::builtin()).unwrap();
    let f = upload(&sim, "b", 4);
    let second = wait_terminal(&sim, &id(&create(&sim, &f)));
    assert_eq!(second["status"], "completed", "the state's second batch");
}

#[test]
fn a_batch_keeps_the_settings_it_was_created_under() {
    let dir = tempfile::tempdir().unwrap();
    let old = {
        let sim = Sim::persistent(dir.path(), settings(0.3), PriceTable::builtin()).unwrap();
        let f = upload(&sim, "a", 10);
        id(&create(&sim, &f))
    };
    // The user edits the settings: everything fails, and slowly.
    let edited = SimSettings {
        fail_rate: 1.0,
        ..settings(3600.0)
    };
    let sim = Sim::persistent(dir.path(), edited, PriceTable::builtin()).unwrap();
    let f = upload(&sim, "b", 10);
    let new = id(&create(&sim, &f));
    let b = wait_terminal(&sim, &old);
    assert_eq!(b["status"], "completed");
    assert_eq!(
        b["request_counts"],
        json!({"total": 10, "completed": 10, "failed": 0})
    );
    assert_eq!(sim.get_batch(&new).unwrap()["status"], "validating");
}

#[test]
fn polling_a_running_batch_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::persistent(dir.path(), settings(3.0), PriceTable::builtin()).unwrap();
    let f = upload(&sim, "p", 200);
    let b = id(&create(&sim, &f));
    while sim.get_batch(&b).unwrap()["status"] == "validating" {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let size = journal_len(dir.path());
    let mut seen = HashSet::new();
    for _ in 0..40 {
        let v = sim.get_batch(&b).unwrap();
        assert_eq!(v["status"], "in_progress");
        seen.insert(v["request_counts"]["completed"].as_u64().unwrap());
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert!(seen.len() > 1, "progress moves: {seen:?}");
    assert_eq!(journal_len(dir.path()), size, "no write per poll");
}

/// A kill at any instant leaves the journal cut at some byte: every cut reopens, and the
/// state it shows is whole (a batch's results, outcomes and bill all there, or none).
#[test]
fn a_journal_cut_at_any_point_reopens_to_a_whole_state() {
    let dir = tempfile::tempdir().unwrap();
    {
        let sim = Sim::persistent(dir.path(), settings(0.0), PriceTable::builtin()).unwrap();
        for k in 0..3 {
            let f = upload(&sim, &format!("k{k}-"), 5);
            wait_terminal(&sim, &id(&create(&sim, &f)));
        }
        let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
        sim.online(ProviderKind::OpenAi, "o1", &body).unwrap();
    }
    let journal = std::fs::read(dir.path().join("journal.jsonl")).unwrap();
    let mut cuts: Vec<usize> = vec![0, journal.len()];
    for (i, b) in journal.iter().enumerate() {
        if *b == b'\n' {
            cuts.extend([i, i + 1, i.saturating_sub(20)]);
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut last_bill = 0;
    for cut in cuts {
        let copy = tempfile::tempdir().unwrap();
        std::fs::create_dir(copy.path().join("files")).unwrap();
        for e in std::fs::read_dir(dir.path().join("files")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), copy.path().join("files").join(e.file_name())).unwrap();
        }
        std::fs::write(copy.path().join("journal.jsonl"), &journal[..cut]).unwrap();
        let sim = Sim::persistent(copy.path(), settings(0.0), PriceTable::builtin())
            .unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        // what the cut journal does not name is gone
        let kept = std::fs::read_dir(copy.path().join("files"))
            .unwrap()
            .count();
        assert_eq!(kept, sim.lock().referenced().len(), "cut at {cut}");
        // as replayed, before anything moves on
        let bills: BTreeMap<String, u64> = sim
            .batch_bills()
            .into_iter()
            .map(|(b, n, _, _)| (b, n))
            .collect();
        let replayed: Vec<(String, Status, usize, Option<String>)> = {
            let inner = sim.lock();
            inner
                .batches
                .iter()
                .map(|b| {
                    let ok = b.requests.iter().filter(|r| r.outcome == Outcome::Ok);
                    (b.id.clone(), b.status, ok.count(), b.output_file_id.clone())
                })
                .collect()
        };
        for (bid, status, ok, out) in &replayed {
            if status.terminal() {
                assert_eq!((bills.get(bid), *ok), (Some(&5), 5), "cut at {cut}");
                assert_eq!(answers(&sim, out.as_deref().unwrap()).len(), 5);
            } else {
                assert_eq!((bills.get(bid), *ok, out), (None, 0, &None), "cut at {cut}");
            }
        }
        // then run to their end by this simulator: billed once, whole
        for (bid, ..) in &replayed {
            let v = wait_terminal(&sim, bid);
            assert_eq!(v["status"], "completed", "cut at {cut}");
            let billed: u64 = sim
                .batch_bills()
                .into_iter()
                .filter(|(x, ..)| x == bid)
                .map(|(_, n, ..)| n)
                .sum();
            assert_eq!(billed, 5, "cut at {cut}");
            let out = v["output_file_id"].as_str().unwrap();
            assert_eq!(answers(&sim, out).len(), 5, "cut at {cut}");
        }
        let total = sim.record()["bill"]["totals"]["requests"].as_u64().unwrap();
        assert!(
            total >= last_bill,
            "cut at {cut}: a longer journal never bills less"
        );
        last_bill = total;
        // what the reopen left behind reopens again, identically
        let again = sim.record();
        drop(sim);
        let sim = Sim::persistent(copy.path(), settings(0.0), PriceTable::builtin()).unwrap();
        assert_eq!(sim.record(), again, "cut at {cut}");
    }
    assert_eq!(
        last_bill, 16,
        "the whole journal: 3 batches of 5 and one online request"
    );
}

#[cfg(unix)]
#[test]
fn a_state_folder_holds_only_private_files() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("sim");
    let sim = Sim::persistent(&state, settings(0.0), PriceTable::builtin()).unwrap();
    let f = upload(&sim, "a", 3);
    wait_terminal(&sim, &id(&create(&sim, &f)));
    drop(sim);
    let sim = Sim::persistent(&state, settings(0.0), PriceTable::builtin()).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let mut files: Vec<PathBuf> = std::fs::read_dir(state.join("files"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 2, "the input and the results");
    files.push(state.join("journal.jsonl"));
    for p in &files {
        assert_eq!(mode(p), 0o600, "{}", p.display());
    }
    assert_eq!(mode(&state), 0o700);
    drop(sim);
}

#[test]
fn a_second_opener_of_a_state_is_refused_until_the_first_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let first = Sim::persistent(dir.path(), settings(0.0), PriceTable::builtin()).unwrap();
    let Err(e) = Sim::persistent(dir.path(), settings(0.0), PriceTable::builtin()) else {
        panic!("refused");
    };
    assert!(
        e.to_string().contains(&dir.path().display().to_string()),
        "{e}"
    );
    drop(first);
    Sim::persistent(dir.path(), settings(0.0), PriceTable::builtin()).unwrap();
}

#[test]
fn a_batch_cancelled_while_validating_keeps_its_total() {
    // validating for 2 s; a cancel takes 1 s
    let sim = Sim::new(settings(20.0), PriceTable::builtin()).unwrap();
    let f = upload(&sim, "v", 50);
    let b = id(&create(&sim, &f));
    sim.cancel_batch(&b).unwrap();
    let v = wait_terminal(&sim, &b);
    assert_eq!(v["status"], "cancelled");
    assert_eq!(
        v["request_counts"],
        json!({"total": 50, "completed": 0, "failed": 50})
    );
    let rec = sim.record();
    let outcomes = rec["batches"][0]["requests"].as_array().unwrap();
    assert_eq!(outcomes.len(), 50);
    assert!(outcomes.iter().all(|r| r["outcome"] == "cancelled"));
}

#[test]
fn reasoning_models_are_recognised() {
    assert!(is_reasoning_model("gpt-5.4-mini"));
    assert!(is_reasoning_model("o4-mini"));
    assert!(!is_reasoning_model("gpt-4o-mini"));
    assert!(!is_reasoning_model("omni"));
}
