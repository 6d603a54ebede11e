//! `nightshift gc`: against the simulator's own list of files and objects, before and after.
//! `--dry-run` lists exactly what ingested batches left and deletes nothing; `gc` deletes
//! exactly that; a batch in flight and a file another tool put there survive; a second `gc`
//! deletes nothing. OpenAI files, Bedrock's S3 output objects, Anthropic's ended batches,
//! and `[cleanup] after_run`.

use std::collections::BTreeSet;
use std::time::Duration;

use nightshift::config::Pipeline;
use nightshift::provider::BatchProvider;
use nightshift::provider::bedrock::BedrockClient;
use nightshift::provider::bedrock::client::Target;
use nightshift::sim::SimSettings;
use nightshift::store::SqlStore;
use serde_json::Value;

use crate::common::*;
use crate::crash::*;

fn quiet() -> SimSettings {
    SimSettings {
        batch_seconds: 0.2,
        // Some failed lines, so batches have error files too, and retries more batches.
        fail_rate: 0.05,
        retry_after_ms: 20,
        bedrock_min_records: 1,
        ..Default::default()
    }
}

/// Every file and S3 object the simulator holds now.
async fn sim_files(sc: &Scenario) -> BTreeSet<String> {
    let rec = record(&sc.sim).await;
    let mut all: BTreeSet<String> = rec["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_string())
        .collect();
    all.extend(
        rec["s3_objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["uri"].as_str().unwrap().to_string()),
    );
    all
}

/// Runs the binary on the scenario's pipeline with the scenario's credentials.
async fn nightshift(sc: &Scenario, args: &[&str]) -> (i32, String, String) {
    let mut c = sc.child(None);
    // `child` runs `run FILE`; this runs what `args` say instead.
    let c = c.as_std_mut();
    let mut cmd = tokio::process::Command::new(c.get_program());
    cmd.args(args).arg(&sc.pipeline);
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn gc_json(sc: &Scenario, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["gc", "--json", "--older-than", "0s"];
    args.extend_from_slice(extra);
    let (code, out, err) = nightshift(sc, &args).await;
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    (code, v)
}

/// The provider-side targets a gc report names (local files aside).
fn remote_targets(v: &Value, outcome: &str) -> BTreeSet<String> {
    v["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["provider"] != "local" && t["outcome"] == outcome)
        .map(|t| t["target"].as_str().unwrap().to_string())
        .collect()
}

/// Batches of the store: (state, provider batch id, input, output, error file ids).
type Row = (
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

async fn batches(sc: &Scenario) -> Vec<Row> {
    let store = SqlStore::open_sqlite(&sc.db).await.unwrap();
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT state, provider_batch_id, input_file_id, output_file_id, error_file_id \
         FROM batches WHERE mode = 'batch' ORDER BY created_at",
    )
    .fetch_all(store.sqlite_pool().unwrap())
    .await
    .unwrap();
    store.close().await;
    rows
}

/// Runs the pipeline to the end, then leaves a second night's batch in flight (`--detach`).
async fn nights_with_one_in_flight(sc: &Scenario) {
    sc.run_until_done().await;
    sc.grow(30);
    let out = sc.child(None).arg("--detach").output().await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = batches(sc).await;
    assert!(
        rows.iter().any(|r| r.0 == "submitted"),
        "a batch stays in flight: {rows:?}"
    );
    assert!(
        rows.iter().filter(|r| r.0 == "ingested").count() >= 3,
        "{rows:?}"
    );
    // The batches in flight end at the provider (their results are there, uncollected):
    // what gc must leave alone is all there before it starts.
    let open: Vec<String> = rows
        .iter()
        .filter(|r| r.0 == "submitted")
        .filter_map(|r| r.1.clone())
        .collect();
    for _ in 0..200 {
        let rec = record(&sc.sim).await;
        let ended = rec["batches"].as_array().unwrap().iter().all(|b| {
            !open.iter().any(|id| b["id"] == id.as_str())
                || ["completed", "failed", "expired", "cancelled"]
                    .contains(&b["status"].as_str().unwrap())
        });
        if ended {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the batches in flight never ended at the provider");
}

/// The dry run, the clean-up and the second clean-up, checked against the simulator's list:
/// `expected` is what the ingested batches left there, `keep` what must survive.
async fn dry_run_then_gc(sc: &Scenario, expected: &BTreeSet<String>, keep: &BTreeSet<String>) {
    let before = sim_files(sc).await;
    assert!(!expected.is_empty());
    assert!(
        expected.is_subset(&before),
        "{expected:?} not in {before:?}"
    );
    assert!(keep.is_subset(&before) && keep.is_disjoint(expected));

    // Batches ingested just now are younger than the default week: nothing goes.
    let (code, out, err) = nightshift(sc, &["gc"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("nothing to delete"), "{out}");
    assert_eq!(sim_files(sc).await, before);

    let (code, dry) = gc_json(sc, &["--dry-run"]).await;
    assert_eq!(code, 0, "{dry}");
    assert_eq!(&remote_targets(&dry, "would_delete"), expected);
    assert_eq!(sim_files(sc).await, before, "a dry run deletes nothing");

    let (code, done) = gc_json(sc, &[]).await;
    assert_eq!(code, 0, "{done}");
    assert_eq!(&remote_targets(&done, "deleted"), expected);
    assert_eq!(done["failed"], 0);
    let after = sim_files(sc).await;
    let want: BTreeSet<String> = before.difference(expected).cloned().collect();
    assert_eq!(after, want, "exactly the ingested batches' leftovers go");
    assert!(keep.is_subset(&after));

    // Again: nothing left, and it says so.
    let (code, out, err) = nightshift(sc, &["gc", "--older-than", "0s"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("nothing to delete"), "{out}");
    assert_eq!(sim_files(sc).await, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_deletes_exactly_the_openai_files_of_ingested_batches() {
    let sc = scenario_for(Provider::OpenAi, 90, 20, quiet()).await;
    nights_with_one_in_flight(&sc).await;
    // A file another tool uploaded with the same key, tied to no batch of ours.
    let foreign_path = sc.dir.path().join("foreign.jsonl");
    std::fs::write(&foreign_path, "{\"custom_id\":\"not-ours\"}\n").unwrap();
    let foreign = client(&sc.sim)
        .upload("foreign.jsonl", &foreign_path)
        .await
        .unwrap();

    let rows = batches(&sc).await;
    let ingested = rows.iter().filter(|r| r.0 == "ingested");
    let expected: BTreeSet<String> = ingested
        .flat_map(|r| [r.3.clone(), r.4.clone()])
        .flatten()
        .collect();
    // What the batches in flight have at the provider (their inputs and their results,
    // uncollected), and the other tool's file.
    let mut keep: BTreeSet<String> = [foreign.clone()].into();
    for r in rows.iter().filter(|r| r.0 == "submitted") {
        keep.extend(r.2.clone());
        let remote = client(&sc.sim).get(r.1.as_ref().unwrap()).await.unwrap();
        assert!(remote.output_file_id.is_some(), "{remote:?}");
        keep.extend(
            remote
                .output_file_id
                .into_iter()
                .chain(remote.error_file_id),
        );
    }
    dry_run_then_gc(&sc, &expected, &keep).await;

    // The next night collects the batch in flight; its leftovers then go too, and only they.
    sc.run_until_done().await;
    let before = sim_files(&sc).await;
    let (code, done) = gc_json(&sc, &[]).await;
    assert_eq!(code, 0, "{done}");
    let deleted = remote_targets(&done, "deleted");
    assert!(!deleted.is_empty());
    assert_eq!(
        sim_files(&sc).await,
        before.difference(&deleted).cloned().collect()
    );
    assert!(sim_files(&sc).await.contains(&foreign));
    // Every ingested batch is clean now: nothing of theirs is left at the provider.
    let left = sim_files(&sc).await;
    for r in batches(&sc).await {
        for id in [r.2, r.3, r.4].into_iter().flatten() {
            assert!(!left.contains(&id), "{id} is still there");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_deletes_exactly_the_output_objects_of_ingested_bedrock_jobs() {
    let sc = scenario_for(Provider::Bedrock, 90, 20, quiet()).await;
    let text = std::fs::read_to_string(&sc.pipeline).unwrap().replace(
        "kind = \"bedrock\"\n",
        "kind = \"bedrock\"\nmin_batch_records = 1\n",
    );
    std::fs::write(&sc.pipeline, text).unwrap();
    nights_with_one_in_flight(&sc).await;
    // An object another tool put under the same input prefix, through the same client.
    let p = Pipeline::load(&sc.pipeline).unwrap();
    let other = BedrockClient::new(
        p.provider.bedrock.clone().unwrap(),
        &p.provider.model,
        Target::Simulator {
            root: sc.sim.root_url(),
        },
        Duration::from_secs(30),
        Default::default(),
    )
    .unwrap();
    let foreign_path = sc.dir.path().join("foreign.jsonl");
    std::fs::write(&foreign_path, "{\"recordId\":\"not-ours\"}\n").unwrap();
    let foreign = other
        .upload("foreign-tool.jsonl", &foreign_path)
        .await
        .unwrap();
    assert!(foreign.starts_with("s3://"), "{foreign}");

    let rows = batches(&sc).await;
    let before = sim_files(&sc).await;
    let folders: Vec<String> = rows
        .iter()
        .filter(|r| r.0 == "ingested")
        .filter_map(|r| r.3.clone())
        .collect();
    let expected: BTreeSet<String> = before
        .iter()
        .filter(|o| folders.iter().any(|f| o.starts_with(f.as_str())))
        .cloned()
        .collect();
    // Every job wrote its results and its manifest.
    assert!(expected.len() >= 2 * folders.len(), "{expected:?}");
    let mut keep: BTreeSet<String> = [foreign.clone()].into();
    for r in rows.iter().filter(|r| r.0 == "submitted") {
        keep.extend(r.2.clone());
        let job = r.1.clone().unwrap();
        let job_id = job.rsplit('/').next().unwrap();
        let objects: Vec<String> = before
            .iter()
            .filter(|o| o.contains(&format!("/{job_id}/")))
            .cloned()
            .collect();
        // Its results and manifest are there, uncollected.
        assert!(objects.len() >= 2, "{objects:?}");
        keep.extend(objects);
    }
    dry_run_then_gc(&sc, &expected, &keep).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_deletes_ended_anthropic_batches_and_leaves_the_one_in_flight() {
    let sc = scenario_for(Provider::Anthropic, 90, 20, quiet()).await;
    nights_with_one_in_flight(&sc).await;
    let rows = batches(&sc).await;
    let ended: BTreeSet<String> = rows
        .iter()
        .filter(|r| r.0 == "ingested")
        .filter_map(|r| r.1.clone())
        .collect();
    let in_flight = rows.iter().find(|r| r.0 == "submitted").unwrap().1.clone();
    let files_before = sim_files(&sc).await;

    let (code, dry) = gc_json(&sc, &["--dry-run"]).await;
    assert_eq!(code, 0, "{dry}");
    assert_eq!(remote_targets(&dry, "would_delete"), ended);
    let (code, done) = gc_json(&sc, &[]).await;
    assert_eq!(code, 0, "{done}");
    assert_eq!(remote_targets(&done, "deleted"), ended);

    let rec = record(&sc.sim).await;
    let deleted: BTreeSet<String> = rec["batches"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["deleted"] == true)
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(deleted, ended);
    assert!(!deleted.contains(in_flight.as_ref().unwrap()));
    // Their results went with them; the batch in flight is still there to collect.
    assert!(sim_files(&sc).await.len() < files_before.len());
    sc.run_until_done().await;
    assert!(
        batches(&sc).await.iter().all(|r| r.0 == "ingested"),
        "the batch in flight was collected after the clean-up"
    );
    let (code, done) = gc_json(&sc, &[]).await;
    assert_eq!(code, 0, "{done}");
    assert!(remote_targets(&done, "deleted").contains(in_flight.as_ref().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_with_cleanup_after_run_leaves_nothing_of_its_batches() {
    let sc = scenario_for(Provider::OpenAi, 60, 20, quiet()).await;
    let foreign_path = sc.dir.path().join("foreign.jsonl");
    std::fs::write(&foreign_path, "{\"custom_id\":\"not-ours\"}\n").unwrap();
    let foreign = client(&sc.sim)
        .upload("foreign.jsonl", &foreign_path)
        .await
        .unwrap();
    let mut text = std::fs::read_to_string(&sc.pipeline).unwrap();
    text.push_str("\n[cleanup]\nafter_run = true\n");
    std::fs::write(&sc.pipeline, text).unwrap();
    let (code, out, err) = nightshift(&sc, &["run", "--no-progress"]).await;
    assert!(code == 0 || code == 1, "{err}");
    assert!(out.contains("  cleanup    deleted "), "{out}");
    let rows = batches(&sc).await;
    assert!(rows.len() >= 3 && rows.iter().all(|r| r.0 == "ingested"));
    let left = sim_files(&sc).await;
    assert_eq!(left, [foreign].into(), "only the other tool's file is left");
    let store = SqlStore::open_sqlite(&sc.db).await.unwrap();
    let (unclean,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM batches WHERE cleaned_at IS NULL")
            .fetch_one(store.sqlite_pool().unwrap())
            .await
            .unwrap();
    store.close().await;
    assert_eq!(unclean, 0);
    // Local batch files and downloads went too.
    let local: Vec<_> = ["batches", "downloads"]
        .iter()
        .flat_map(|d| std::fs::read_dir(sc.dir.path().join(".nightshift").join(d)).unwrap())
        .collect();
    assert!(local.is_empty(), "{local:?}");
}

#[test]
fn the_cleanup_table_is_checked_like_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let base = write_pipeline(dir.path(), 3, 100, "");
    let text = std::fs::read_to_string(&base).unwrap();
    let with = |extra: &str| Pipeline::from_str(&format!("{text}\n{extra}"), &base);
    let p = with("[cleanup]\nafter_run = true\nolder_than = \"36h\"\n").unwrap();
    assert!(p.cleanup.after_run);
    assert_eq!(p.cleanup.older_than, Duration::from_secs(36 * 3600));
    assert!(!with("").unwrap().cleanup.after_run);
    let e = with("[cleanup]\nafter_run = true\nwhen = \"never\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("cleanup.when"), "{e}");
    let e = with("[cleanup]\nolder_than = \"7 days\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cleanup.older_than") && e.contains("not an age"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_provider_could_not_delete_is_reported_and_deleted_by_the_next_gc() {
    let sc = scenario_for(Provider::OpenAi, 60, 20, quiet()).await;
    sc.run_until_done().await;
    let expected: BTreeSet<String> = batches(&sc)
        .await
        .into_iter()
        .flat_map(|r| [r.3, r.4])
        .flatten()
        .collect();
    assert!(!expected.is_empty());
    let before = sim_files(&sc).await;
    // The provider cannot be reached: every delete fails after its retries.
    let good = std::fs::read_to_string(&sc.pipeline).unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/v1", closed.local_addr().unwrap());
    drop(closed);
    let bad = good.replace(&sc.sim.base_url(), &dead).replace(
        "reconcile_grace_seconds = 0\n",
        "reconcile_grace_seconds = 0\nunreachable_timeout_seconds = 1\n",
    );
    assert_ne!(bad, good);
    std::fs::write(&sc.pipeline, bad).unwrap();
    let (code, v) = gc_json(&sc, &[]).await;
    assert_eq!(code, 75, "{v}");
    assert_eq!(remote_targets(&v, "failed"), expected);
    assert_eq!(v["failed"], expected.len());
    assert_eq!(v["deleted"], 0);
    assert_eq!(sim_files(&sc).await, before);
    // Reachable again: the next gc deletes what the first could not.
    std::fs::write(&sc.pipeline, good).unwrap();
    let (code, v) = gc_json(&sc, &[]).await;
    assert_eq!(code, 0, "{v}");
    assert_eq!(remote_targets(&v, "deleted"), expected);
    assert_eq!(
        sim_files(&sc).await,
        before.difference(&expected).cloned().collect()
    );
}
