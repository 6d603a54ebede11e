//! Tests of the simulator's Amazon Bedrock batch inference and S3, driven over HTTP by the
//! official AWS SDK clients (`aws_test`): objects, jobs from create to output, idempotency,
//! listing and stopping, expiry with and without a start, the records quota, SigV4 scopes,
//! the runtime's online calls, HTTP faults in AWS's shapes, and a reopened state.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_bedrock::error::ProvideErrorMetadata;
use aws_sdk_bedrock::types::{
    ModelInvocationJobInputDataConfig, ModelInvocationJobOutputDataConfig,
    ModelInvocationJobS3InputDataConfig, ModelInvocationJobS3OutputDataConfig,
    ModelInvocationJobStatus,
};
use aws_sdk_s3::primitives::ByteStream;
use serde_json::{Value, json};

use super::aws_test;
use super::*;
use crate::cost::Usage;

const HAIKU: &str = "anthropic.claude-haiku-4-5-20251001-v1:0";
const NOVA: &str = "amazon.nova-lite-v1:0";
const BUCKET: &str = "nightshift-sim";
const ROLE: &str = "arn:aws:iam::123456789012:role/BedrockBatch";
const SCHEMA: &str = r#"{"type":"object","properties":{"label":{"type":"string","enum":["bug","question","praise"]},"score":{"type":"integer"}},"required":["label","score"],"additionalProperties":false}"#;

fn prices() -> PriceTable {
    let mut t = PriceTable::builtin();
    let extra = format!(
        r#"
[models."bedrock/{HAIKU}"]
provider = "bedrock"
standard = {{ input = "1", cached_input = "0.1", cache_write = "1.25", output = "5" }}
batch = {{ input = "0.5", cached_input = "0.05", cache_write = "0.625", output = "2.5" }}

[models."bedrock/{NOVA}"]
provider = "bedrock"
standard = {{ input = "0.06", output = "0.24" }}
batch = {{ input = "0.03", output = "0.12" }}
"#
    );
    t.merge(PriceTable::from_toml_str(&extra, "test prices").unwrap());
    t
}

fn fast() -> SimSettings {
    SimSettings {
        batch_seconds: 0.4,
        ..Default::default()
    }
}

/// Serves `sim` on a free local port.
async fn serve(sim: std::sync::Arc<Sim>) -> SimHandle {
    start(sim, "127.0.0.1:0".parse().unwrap()).await.unwrap()
}

async fn start_sim(settings: SimSettings) -> SimHandle {
    serve(Sim::new(settings, prices()).unwrap()).await
}

/// A running simulator, its root URL, and the S3 and Bedrock clients pointed at it.
type Served = (
    SimHandle,
    String,
    aws_sdk_s3::Client,
    aws_sdk_bedrock::Client,
);

/// `h` with its root URL and the clients for it (signing for `us-east-1`).
fn with_clients(h: SimHandle) -> Served {
    let root = h.root_url();
    let (s3, br) = aws_test::clients(&root, "us-east-1");
    (h, root, s3, br)
}

/// A simulator started with `settings`, with its root URL and the clients for it.
async fn start_with_clients(settings: SimSettings) -> Served {
    with_clients(start_sim(settings).await)
}

fn system() -> String {
    format!(
        "Label the support ticket and score it from 1 to 5. Answer with JSON only.\nIt must match this JSON Schema:\n{SCHEMA}"
    )
}

fn anthropic_input(i: usize) -> Value {
    json!({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 300,
        "messages": [{"role": "user", "content": format!("ticket {i}: the export button does nothing")}],
        "system": system()})
}

fn converse_input(i: usize) -> Value {
    json!({"inferenceConfig": {"maxTokens": 300},
        "messages": [{"content": [{"text": format!("ticket {i}: the export button does nothing")}], "role": "user"}],
        "system": [{"text": system()}]})
}

/// The records numbered `ids`, made by `input`, as a JSONL text.
fn records(ids: std::ops::Range<usize>, input: fn(usize) -> Value) -> String {
    ids.map(|i| {
        json!({"recordId": format!("REC{i:07}"), "modelInput": input(i)}).to_string() + "\n"
    })
    .collect()
}

async fn put(s3: &aws_sdk_s3::Client, key: &str, text: String) -> String {
    s3.put_object()
        .bucket(BUCKET)
        .key(key)
        .body(ByteStream::from(text.into_bytes()))
        .send()
        .await
        .unwrap()
        .e_tag()
        .unwrap()
        .to_string()
}

async fn delete(s3: &aws_sdk_s3::Client, key: &str) {
    s3.delete_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .unwrap();
}

async fn read(s3: &aws_sdk_s3::Client, key: &str) -> String {
    let out = s3
        .get_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .unwrap();
    let bytes = out.body.collect().await.unwrap().into_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

async fn keys(s3: &aws_sdk_s3::Client, prefix: &str) -> Vec<String> {
    let out = s3
        .list_objects_v2()
        .bucket(BUCKET)
        .prefix(prefix)
        .send()
        .await
        .unwrap();
    out.contents()
        .iter()
        .map(|o| o.key().unwrap().to_string())
        .collect()
}

/// `s3://BUCKET/key`.
fn s3_uri(key: &str) -> String {
    format!("s3://{BUCKET}/{key}")
}

type Create =
    aws_sdk_bedrock::operation::create_model_invocation_job::builders::CreateModelInvocationJobFluentBuilder;
type Job = aws_sdk_bedrock::operation::get_model_invocation_job::GetModelInvocationJobOutput;

/// A create of the job `name` running `model` over the `input` URI, writing under `output`.
fn create(
    br: &aws_sdk_bedrock::Client,
    name: &str,
    model: &str,
    input: &str,
    output: &str,
) -> Create {
    let input = ModelInvocationJobInputDataConfig::S3InputDataConfig(
        ModelInvocationJobS3InputDataConfig::builder()
            .s3_uri(input)
            .build()
            .unwrap(),
    );
    let output = ModelInvocationJobOutputDataConfig::S3OutputDataConfig(
        ModelInvocationJobS3OutputDataConfig::builder()
            .s3_uri(output)
            .build()
            .unwrap(),
    );
    br.create_model_invocation_job()
        .job_name(name)
        .role_arn(ROLE)
        .model_id(model)
        .input_data_config(input)
        .output_data_config(output)
}

fn terminal(s: &ModelInvocationJobStatus) -> bool {
    matches!(
        s,
        ModelInvocationJobStatus::Completed
            | ModelInvocationJobStatus::Failed
            | ModelInvocationJobStatus::Stopped
            | ModelInvocationJobStatus::Expired
            | ModelInvocationJobStatus::PartiallyCompleted
    )
}

/// Polls a job until it ends: its last description and every status seen on the way.
async fn wait(br: &aws_sdk_bedrock::Client, arn: &str) -> (Job, BTreeSet<String>) {
    let mut seen = BTreeSet::new();
    for _ in 0..500 {
        let job = br
            .get_model_invocation_job()
            .job_identifier(arn)
            .send()
            .await
            .unwrap();
        let status = job.status().unwrap().clone();
        seen.insert(status.as_str().to_string());
        if terminal(&status) {
            return (job, seen);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("job {arn} never ended");
}

/// Sends a create, which must be accepted: the job's ARN.
async fn submit(create: Create) -> String {
    create.send().await.unwrap().job_arn().to_string()
}

/// Creates a job as `create` does and waits for it to end: its ARN, its last description
/// and every status seen on the way.
async fn run(
    br: &aws_sdk_bedrock::Client,
    name: &str,
    model: &str,
    input: &str,
    output: &str,
) -> (String, Job, BTreeSet<String>) {
    let arn = submit(create(br, name, model, input, output)).await;
    let (job, seen) = wait(br, &arn).await;
    (arn, job, seen)
}

fn job_id(arn: &str) -> &str {
    arn.rsplit('/').next().unwrap()
}

/// Where a job whose output URI is `s3://BUCKET/out/` writes: `out/` and its id.
fn out_dir(arn: &str) -> String {
    format!("out/{}/", job_id(arn))
}

/// The `.out` object a job wrote for its input object `file` (or its manifest), as text.
async fn out_text(s3: &aws_sdk_s3::Client, arn: &str, file: &str) -> String {
    read(s3, &format!("{}{file}.out", out_dir(arn))).await
}

/// What the job's `.out` object for `file` says.
async fn out_lines(s3: &aws_sdk_s3::Client, arn: &str, file: &str) -> Lines {
    read_lines(&out_text(s3, arn, file).await)
}

/// The job's `manifest.json.out`.
async fn manifest(s3: &aws_sdk_s3::Client, arn: &str) -> Value {
    serde_json::from_str(&out_text(s3, arn, "manifest.json").await).unwrap()
}

/// The job description as it is on the wire (fields this SDK version does not read).
async fn raw_job(root: &str, arn: &str) -> Value {
    let url = format!(
        "{root}/model-invocation-job/{}",
        url::form_urlencoded::byte_serialize(arn.as_bytes()).collect::<String>()
    );
    aws_test::signed(reqwest::Method::GET, &url, "bedrock", "us-east-1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn record(root: &str) -> Value {
    reqwest::get(format!("{root}/_sim/record"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// What a job's `.out` lines say: recordId → (modelInput, answer text, usage as the neutral
/// tokens), and the error lines' recordIds.
struct Lines {
    answers: BTreeMap<String, (Value, String, Usage)>,
    errors: Vec<String>,
    count: usize,
}

fn read_lines(text: &str) -> Lines {
    let mut out = Lines {
        answers: BTreeMap::new(),
        errors: Vec::new(),
        count: 0,
    };
    for l in text.lines() {
        out.count += 1;
        let v: Value = serde_json::from_str(l).unwrap();
        let id = v["recordId"].as_str().unwrap().to_string();
        if v.get("error").is_some() {
            out.errors.push(id);
            continue;
        }
        let m = &v["modelOutput"];
        let (text, usage) = if m.get("usage").and_then(|u| u.get("input_tokens")).is_some() {
            let u = &m["usage"];
            let (cached, written) = (
                u["cache_read_input_tokens"].as_u64().unwrap(),
                u["cache_creation_input_tokens"].as_u64().unwrap(),
            );
            assert_eq!(m["type"], "message", "{l}");
            (
                m["content"][0]["text"].as_str().unwrap().to_string(),
                Usage {
                    input_tokens: u["input_tokens"].as_u64().unwrap() + cached + written,
                    cached_input_tokens: cached,
                    cache_write_tokens: written,
                    output_tokens: u["output_tokens"].as_u64().unwrap(),
                    reasoning_tokens: 0,
                },
            )
        } else {
            let u = &m["usage"];
            let (cached, written) = (
                u["cacheReadInputTokens"].as_u64().unwrap(),
                u["cacheWriteInputTokens"].as_u64().unwrap(),
            );
            assert_eq!(m["stopReason"], "end_turn", "{l}");
            let input = u["inputTokens"].as_u64().unwrap() + cached + written;
            let output = u["outputTokens"].as_u64().unwrap();
            assert_eq!(u["totalTokens"].as_u64().unwrap(), input + output, "{l}");
            (
                m["output"]["message"]["content"][0]["text"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                Usage {
                    input_tokens: input,
                    cached_input_tokens: cached,
                    cache_write_tokens: written,
                    output_tokens: output,
                    reasoning_tokens: 0,
                },
            )
        };
        let before = out
            .answers
            .insert(id.clone(), (v["modelInput"].clone(), text, usage));
        assert!(before.is_none(), "{id} answered twice");
    }
    out
}

fn sum(lines: &Lines) -> Usage {
    let mut total = Usage::default();
    for (_, _, u) in lines.answers.values() {
        total.add(u);
    }
    total
}

/// The bill of one model in one pricing mode, from the record.
fn billed<'a>(rec: &'a Value, model: &str, mode: &str) -> Option<&'a Value> {
    rec["bill"]["per_model"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model"] == model && m["pricing_mode"] == mode)
}

#[test]
fn a_sigv4_scope_is_read_from_its_header_and_a_malformed_one_says_why() {
    use super::http::{SigV4Refusal, sigv4_scope};
    let headers = |auth: Option<&str>, date: bool| {
        let mut h = axum::http::HeaderMap::new();
        if let Some(a) = auth {
            h.insert("authorization", a.parse().unwrap());
        }
        if date {
            h.insert("x-amz-date", "20260101T000000Z".parse().unwrap());
        }
        h
    };
    let good = "AWS4-HMAC-SHA256 Credential=AKIDSIM/20260101/us-east-1/s3/aws4_request, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature=0a1b";
    let scope = sigv4_scope(&headers(Some(good), true)).unwrap();
    assert_eq!(
        (scope.region.as_str(), scope.service.as_str()),
        ("us-east-1", "s3")
    );
    assert_eq!(
        (scope.access_key.as_str(), scope.date.as_str()),
        ("AKIDSIM", "20260101")
    );
    assert_eq!(
        sigv4_scope(&headers(None, true)),
        Err(SigV4Refusal::Missing)
    );
    let refused = |auth: &str, date: bool, why: &str| {
        let Err(SigV4Refusal::Malformed(m)) = sigv4_scope(&headers(Some(auth), date)) else {
            panic!("{auth} is refused");
        };
        assert!(m.contains(why), "{auth}: {m}");
    };
    refused(good, false, "x-amz-date");
    refused("Bearer abc", true, "AWS4-HMAC-SHA256");
    refused(&good.replace("aws4_request", "aws5"), true, "Credential");
    refused(&good.replace("20260101", "2026"), true, "Credential");
    refused(
        &good.replace("Signature=0a1b", "Signature=zz"),
        true,
        "Signature",
    );
    refused(
        &good.replace(", SignedHeaders=host;x-amz-content-sha256;x-amz-date", ""),
        true,
        "SignedHeaders",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_objects_round_trip_through_the_sdk_under_the_s3_prefix() {
    let h = start_sim(fast()).await;
    let root = h.root_url();
    let s3 = aws_test::s3(&root, "us-east-1");
    let mut tags = BTreeMap::new();
    for key in [
        "a/1.jsonl",
        "a/2.jsonl",
        "a/3.txt",
        "a/sub/4.jsonl",
        "b/x.jsonl",
        "a/odd key+plus&amp.jsonl",
    ] {
        tags.insert(key, put(&s3, key, format!("content of {key}\n")).await);
    }
    assert_eq!(
        keys(&s3, "a/").await,
        [
            "a/1.jsonl",
            "a/2.jsonl",
            "a/3.txt",
            "a/odd key+plus&amp.jsonl",
            "a/sub/4.jsonl"
        ]
    );
    // Pages of two, resumed with the continuation token.
    let mut pages = s3
        .list_objects_v2()
        .bucket(BUCKET)
        .prefix("a/")
        .max_keys(2)
        .into_paginator()
        .send();
    let mut paged = Vec::new();
    let mut n = 0;
    while let Some(page) = pages.next().await {
        let page = page.unwrap();
        n += 1;
        assert_eq!(page.is_truncated(), Some(n < 3), "page {n}");
        assert_eq!(page.key_count(), Some(if n < 3 { 2 } else { 1 }));
        paged.extend(page.contents().iter().map(|o| o.key().unwrap().to_string()));
    }
    assert_eq!(paged, keys(&s3, "a/").await);
    // Rolled up at a delimiter.
    let out = s3
        .list_objects_v2()
        .bucket(BUCKET)
        .prefix("a/")
        .delimiter("/")
        .send()
        .await
        .unwrap();
    assert_eq!(out.contents().len(), 4);
    let prefixes: Vec<&str> = out
        .common_prefixes()
        .iter()
        .map(|p| p.prefix().unwrap())
        .collect();
    assert_eq!(prefixes, ["a/sub/"]);
    let listed = &keys(&s3, "b/").await;
    assert_eq!(listed, &["b/x.jsonl"]);

    assert_eq!(read(&s3, "a/2.jsonl").await, "content of a/2.jsonl\n");
    assert_eq!(
        read(&s3, "a/odd key+plus&amp.jsonl").await,
        "content of a/odd key+plus&amp.jsonl\n"
    );
    let got = s3
        .get_object()
        .bucket(BUCKET)
        .key("a/1.jsonl")
        .send()
        .await
        .unwrap();
    assert_eq!(got.e_tag(), Some(tags["a/1.jsonl"].as_str()));
    assert_eq!(got.content_length(), Some(21));
    assert!(got.last_modified().is_some());
    let head = s3
        .head_object()
        .bucket(BUCKET)
        .key("a/1.jsonl")
        .send()
        .await
        .unwrap();
    assert_eq!(head.e_tag(), Some(tags["a/1.jsonl"].as_str()));

    delete(&s3, "a/1.jsonl").await;
    let err = s3
        .get_object()
        .bucket(BUCKET)
        .key("a/1.jsonl")
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(err.is_no_such_key(), "{err:?}");
    // Deleting what is not there is no error.
    delete(&s3, "a/1.jsonl").await;

    // The SDK's default checksums send the upload aws-chunked, with a checksum trailer.
    let chunked = aws_test::s3_checksums(
        &root,
        "us-east-1",
        aws_sdk_s3::config::RequestChecksumCalculation::WhenSupported,
    );
    let text = "x".repeat(100_000);
    chunked
        .put_object()
        .bucket(BUCKET)
        .key("c/big.jsonl")
        .body(ByteStream::from(text.clone().into_bytes()))
        .send()
        .await
        .unwrap();
    assert_eq!(read(&s3, "c/big.jsonl").await, text);

    // Without the endpoint's trailing slash the SDK glues the bucket to the path: told so.
    let glued = aws_test::s3_at(
        &format!("{root}/s3"),
        "us-east-1",
        aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
    );
    let err = glued
        .put_object()
        .bucket(BUCKET)
        .key("d/x.jsonl")
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        aws_sdk_s3::error::ProvideErrorMetadata::code(&err),
        Some("NoSuchBucket")
    );
    let message = aws_sdk_s3::error::ProvideErrorMetadata::message(&err).unwrap();
    assert!(message.contains("trailing slash"), "{message}");

    let rec = record(&root).await;
    let objects = rec["s3_objects"].as_array().unwrap();
    assert_eq!(objects.len(), 6, "{objects:?}");
    assert!(objects.iter().all(|o| o["written_by"] == "client"));
    assert!(
        objects
            .iter()
            .any(|o| o["key"] == "c/big.jsonl" && o["bytes"] == 100_000)
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converse_and_anthropic_jobs_write_every_record_once_and_the_manifest_matches_the_bill() {
    let (h, root, s3, br) = start_with_clients(SimSettings {
        cache_rate: 0.3,
        ..fast()
    })
    .await;
    type Case = (&'static str, &'static str, fn(usize) -> Value);
    let cases: [Case; 2] = [
        ("nightshift-conv-0001.jsonl", NOVA, converse_input),
        ("nightshift-anth-0001.jsonl", HAIKU, anthropic_input),
    ];
    for (file, model, input) in cases {
        put(&s3, &format!("in/{file}"), records(0..120, input)).await;
        let name = format!("ns-{}", &file[11..15]);
        let input_uri = s3_uri(&format!("in/{file}"));
        let arn = submit(create(&br, &name, model, &input_uri, &s3_uri("out/"))).await;
        let id = job_id(&arn);
        assert_eq!(id.len(), 12);
        assert!(arn.starts_with("arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/"));
        let (job, seen) = wait(&br, &arn).await;
        assert_eq!(
            job.status(),
            Some(&ModelInvocationJobStatus::Completed),
            "{seen:?}"
        );
        assert!(seen.contains("InProgress"), "{seen:?}");
        assert_eq!(job.model_id(), model);
        assert!(job.end_time().is_some() && job.message().is_none());
        let raw = raw_job(&root, &arn).await;
        assert_eq!(
            (
                &raw["totalRecordCount"],
                &raw["processedRecordCount"],
                &raw["successRecordCount"],
                &raw["errorRecordCount"]
            ),
            (&json!(120), &json!(120), &json!(120), &json!(0)),
            "{raw}"
        );

        let dir = out_dir(&arn);
        assert_eq!(
            keys(&s3, &dir).await,
            [
                format!("{dir}manifest.json.out"),
                format!("{dir}{file}.out")
            ]
        );
        let lines = out_lines(&s3, &arn, file).await;
        assert_eq!(lines.count, 120);
        assert!(lines.errors.is_empty());
        let expected: BTreeSet<String> = (0..120).map(|i| format!("REC{i:07}")).collect();
        assert_eq!(
            lines.answers.keys().cloned().collect::<BTreeSet<_>>(),
            expected
        );
        let schema: Value = serde_json::from_str(SCHEMA).unwrap();
        for (i, (rid, (model_input, text, _))) in lines.answers.iter().enumerate() {
            assert_eq!(model_input, &input(i), "{rid}");
            let answer: Value = serde_json::from_str(text).unwrap();
            assert!(jsonschema::is_valid(&schema, &answer), "{rid}: {answer}");
        }
        let total = sum(&lines);
        assert!(total.cached_input_tokens > 0, "some cache hits");
        assert_eq!(
            manifest(&s3, &arn).await,
            json!({"totalRecordCount": 120, "processedRecordCount": 120, "successRecordCount": 120,
                "errorRecordCount": 0, "inputTokenCount": total.input_tokens,
                "outputTokenCount": total.output_tokens})
        );
        let rec = record(&root).await;
        let bill = billed(&rec, model, "batch").unwrap();
        assert_eq!(bill["requests"], 120);
        assert_eq!(bill["tokens"]["input_tokens"], total.input_tokens);
        assert_eq!(
            bill["tokens"]["cached_input_tokens"],
            total.cached_input_tokens
        );
        assert_eq!(bill["tokens"]["output_tokens"], total.output_tokens);
        let rates = *prices()
            .lookup("bedrock", model)
            .unwrap()
            .rates(crate::cost::PricingMode::Batch)
            .unwrap();
        let mut cost = crate::cost::Usd::ZERO;
        for (_, _, u) in lines.answers.values() {
            cost += rates.cost(u);
        }
        assert_eq!(bill["cost_usd"], cost.to_decimal_string());
    }
    let rec = record(&root).await;
    let objects = rec["s3_objects"].as_array().unwrap();
    let by = |who: &str| objects.iter().filter(|o| o["written_by"] == who).count();
    assert_eq!((by("client"), by("simulator")), (2, 4), "{objects:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_records_get_error_lines_whose_code_is_now_a_number_now_a_string() {
    let (h, root, s3, br) = start_with_clients(SimSettings {
        fail_rate: 0.4,
        ..fast()
    })
    .await;
    put(&s3, "in/f.jsonl", records(0..200, anthropic_input)).await;
    let (arn, job, _) = run(&br, "faulty", HAIKU, &s3_uri("in/f.jsonl"), &s3_uri("out/")).await;
    assert_eq!(job.status(), Some(&ModelInvocationJobStatus::Completed));
    let text = out_text(&s3, &arn, "f.jsonl").await;
    let (mut numbers, mut strings) = (0, 0);
    for l in text.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        match &v["error"]["errorCode"] {
            Value::Null => assert!(v["modelOutput"].is_object()),
            Value::Number(n) => {
                assert_eq!(n.as_u64(), Some(500));
                numbers += 1;
            }
            Value::String(c) => {
                assert_eq!(c, "500");
                strings += 1;
            }
            other => panic!("errorCode {other}"),
        }
        if v.get("error").is_some() {
            assert!(v["error"]["errorMessage"].is_string() && v["modelInput"].is_object());
        }
    }
    assert!(numbers > strings && strings > 0, "{numbers} {strings}");
    let lines = read_lines(&text);
    assert_eq!(lines.errors.len(), numbers + strings);
    let manifest = manifest(&s3, &arn).await;
    assert_eq!(manifest["errorRecordCount"], numbers + strings);
    assert_eq!(manifest["successRecordCount"], lines.answers.len());
    assert_eq!(manifest["processedRecordCount"], 200);
    let rec = record(&root).await;
    assert_eq!(
        billed(&rec, HAIKU, "batch").unwrap()["requests"],
        lines.answers.len(),
        "error lines are not billed"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_create_makes_no_second_job_and_a_stopped_job_cannot_be_stopped_again() {
    let (h, root, s3, br) = start_with_clients(SimSettings {
        batch_seconds: 10.0,
        ..Default::default()
    })
    .await;
    put(&s3, "in/a.jsonl", records(0..120, converse_input)).await;
    let (input, output) = (s3_uri("in/a.jsonl"), s3_uri("out/"));
    let make = |name: &str, token: &str| {
        submit(create(&br, name, NOVA, &input, &output).client_request_token(token))
    };
    let first = make("alpha-1", "token-1").await;
    let again = make("alpha-1", "token-1").await;
    assert_eq!(first, again);
    let second = make("beta-2", "token-2").await;
    assert_ne!(first, second);
    assert_eq!(record(&root).await["batches"].as_array().unwrap().len(), 2);

    let named = br
        .list_model_invocation_jobs()
        .name_contains("alpha")
        .send()
        .await
        .unwrap();
    let arns: Vec<&str> = named
        .invocation_job_summaries()
        .iter()
        .map(|s| s.job_arn())
        .collect();
    assert_eq!(arns, [first.as_str()]);
    // One a page, newest first, resumed with nextToken.
    let mut pages = br
        .list_model_invocation_jobs()
        .max_results(1)
        .into_paginator()
        .send();
    let mut listed = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.unwrap();
        assert_eq!(page.invocation_job_summaries().len(), 1);
        listed.push(page.invocation_job_summaries()[0].job_arn().to_string());
    }
    assert_eq!(listed, [second.clone(), first.clone()]);

    // By its 12-character id as well as its ARN.
    let by_id = br
        .get_model_invocation_job()
        .job_identifier(job_id(&first))
        .send()
        .await
        .unwrap();
    assert_eq!(by_id.job_arn(), first);
    assert_eq!(by_id.client_request_token(), Some("token-1"));

    br.stop_model_invocation_job()
        .job_identifier(&first)
        .send()
        .await
        .unwrap();
    let (job, seen) = wait(&br, &first).await;
    assert_eq!(job.status(), Some(&ModelInvocationJobStatus::Stopped));
    assert!(seen.contains("Stopping"), "{seen:?}");
    let err = br
        .stop_model_invocation_job()
        .job_identifier(&first)
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(400));
    let err = err.into_service_error();
    assert!(err.is_conflict_exception(), "{err:?}");
    let err = br
        .get_model_invocation_job()
        .job_identifier("zzzzzzzzzzzz")
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(err.is_resource_not_found_exception(), "{err:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_never_starts_expires_empty_and_one_cut_short_bills_what_ran() {
    // The first job never starts; the second runs.
    let (h, root, s3, br) = start_with_clients(SimSettings {
        batch_seconds: 1.0,
        unstarted_first: 1,
        ..Default::default()
    })
    .await;
    put(&s3, "in/a.jsonl", records(0..120, anthropic_input)).await;
    let (input, output) = (s3_uri("in/a.jsonl"), s3_uri("out/"));
    let (_, job, seen) = run(&br, "never", HAIKU, &input, &output).await;
    assert_eq!(job.status(), Some(&ModelInvocationJobStatus::Expired));
    assert!(
        seen.contains("Scheduled") && !seen.contains("InProgress"),
        "{seen:?}"
    );
    assert!(keys(&s3, "out/").await.is_empty(), "no output at all");
    let rec = record(&root).await;
    assert_eq!(rec["bill"]["totals"]["requests"], 0);
    let (_, job, _) = run(&br, "runs", HAIKU, &input, &output).await;
    assert_eq!(job.status(), Some(&ModelInvocationJobStatus::Completed));
    h.stop().await;

    // The first job times out half-way.
    let (h, root, s3, br) = start_with_clients(SimSettings {
        expire_first: 1,
        ..fast()
    })
    .await;
    put(&s3, "in/a.jsonl", records(0..120, anthropic_input)).await;
    let (arn, job, _) = run(&br, "partly", HAIKU, &input, &output).await;
    assert_eq!(
        job.status(),
        Some(&ModelInvocationJobStatus::PartiallyCompleted)
    );
    let lines = out_lines(&s3, &arn, "a.jsonl").await;
    assert_eq!((lines.count, lines.answers.len()), (60, 60));
    let manifest = manifest(&s3, &arn).await;
    assert_eq!(manifest["totalRecordCount"], 120);
    assert_eq!(manifest["processedRecordCount"], 60);
    let raw = raw_job(&root, &arn).await;
    assert_eq!(raw["processedRecordCount"], 60);
    let rec = record(&root).await;
    let bill = billed(&rec, HAIKU, "batch").unwrap();
    assert_eq!(bill["requests"], 60);
    assert_eq!(bill["tokens"]["input_tokens"], manifest["inputTokenCount"]);
    assert_eq!(
        bill["tokens"]["output_tokens"],
        manifest["outputTokenCount"]
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_jobs_fail_with_a_message_and_bad_creates_are_refused() {
    let (h, _, s3, br) = start_with_clients(fast()).await;
    let output = s3_uri("out/");
    put(&s3, "in/small.jsonl", records(0..50, converse_input)).await;
    let (_, job, _) = run(&br, "small", NOVA, &s3_uri("in/small.jsonl"), &output).await;
    assert_eq!(job.status(), Some(&ModelInvocationJobStatus::Failed));
    let message = job.message().unwrap();
    assert!(
        message.contains("Minimum number of records per batch inference job")
            && message.contains("50")
            && message.contains("100"),
        "{message}"
    );

    let mut text = records(0..120, converse_input);
    text.push_str("{\"recordId\": \"REC-no-input\"}\n");
    put(&s3, "in/broken.jsonl", text).await;
    let (_, job, _) = run(&br, "broken", NOVA, &s3_uri("in/broken.jsonl"), &output).await;
    assert_eq!(job.status(), Some(&ModelInvocationJobStatus::Failed));
    assert!(job.message().unwrap().contains("Line 121"), "{job:?}");

    // A prefix: every .jsonl object under it, one .out for each.
    put(&s3, "in/many/one.jsonl", records(0..60, converse_input)).await;
    put(&s3, "in/many/notes.txt", "not records".into()).await;
    put(&s3, "in/many/two.jsonl", records(60..130, converse_input)).await;
    let (arn, job, _) = run(&br, "many", NOVA, &s3_uri("in/many/"), &output).await;
    assert_eq!(job.status(), Some(&ModelInvocationJobStatus::Completed));
    let one = out_lines(&s3, &arn, "one.jsonl").await;
    let two = out_lines(&s3, &arn, "two.jsonl").await;
    assert_eq!((one.count, two.count), (60, 70));
    assert!(one.answers.contains_key("REC0000059") && two.answers.contains_key("REC0000060"));

    // Refused at once.
    let input = s3_uri("in/small.jsonl");
    let refused = [
        create(&br, "bad name!", NOVA, &input, &output),
        create(&br, "timeout", NOVA, &input, &output).timeout_duration_in_hours(12),
        create(&br, "model", "vendor.unknown-model-v1:0", &input, &output),
        create(&br, "uri", NOVA, "https://example.com/in.jsonl", &output),
    ];
    for c in refused {
        let err = c.send().await.unwrap_err().into_service_error();
        assert!(err.is_validation_exception(), "{err:?}");
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_signed_for_another_region_or_service_are_refused() {
    let h = start_sim(fast()).await;
    let root = h.root_url();
    let err = aws_test::bedrock(&root, "eu-west-1")
        .list_model_invocation_jobs()
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(403));
    assert_eq!(err.code(), Some("InvalidSignatureException"), "{err:?}");
    assert!(err.message().unwrap().contains("eu-west-1"), "{err:?}");
    let err = aws_test::s3(&root, "eu-west-1")
        .list_objects_v2()
        .bucket(BUCKET)
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(403));
    assert_eq!(
        aws_sdk_s3::error::ProvideErrorMetadata::code(&err),
        Some("AuthorizationHeaderMalformed")
    );
    // No signature, or one for S3 on a Bedrock route.
    let url = format!("{root}/model-invocation-jobs");
    let r = reqwest::get(&url).await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.headers()["x-amzn-errortype"],
        "UnrecognizedClientException"
    );
    let r = aws_test::signed(reqwest::Method::GET, &url, "s3", "us-east-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-amzn-errortype"], "InvalidSignatureException");
    assert!(r.text().await.unwrap().contains("'bedrock'"));
    let r = reqwest::get(format!("{root}/s3/{BUCKET}/x")).await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("<Code>AccessDenied</Code>")
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoke_and_converse_answer_in_their_shapes_at_standard_prices() {
    let h = start_sim(SimSettings {
        fail_when_contains: Some("UNANSWERABLE".into()),
        ..fast()
    })
    .await;
    let root = h.root_url();
    let schema: Value = serde_json::from_str(SCHEMA).unwrap();
    let call = |model: &str, action: &str, id: &str, body: Value| {
        let model = url::form_urlencoded::byte_serialize(model.as_bytes()).collect::<String>();
        aws_test::signed(
            reqwest::Method::POST,
            &format!("{root}/model/{model}/{action}"),
            "bedrock",
            "us-east-1",
        )
        .header("x-client-request-id", id)
        .json(&body)
        .send()
    };
    let r = call(HAIKU, "invoke", "online-inv", anthropic_input(1))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m: Value = r.json().await.unwrap();
    assert_eq!(
        (&m["type"], &m["model"]),
        (&json!("message"), &json!(HAIKU))
    );
    assert_eq!(m["stop_reason"], "end_turn");
    let answer: Value = serde_json::from_str(m["content"][0]["text"].as_str().unwrap()).unwrap();
    assert!(jsonschema::is_valid(&schema, &answer), "{answer}");
    let r = call(NOVA, "converse", "online-conv", converse_input(1))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let c: Value = r.json().await.unwrap();
    let answer: Value = serde_json::from_str(
        c["output"]["message"]["content"][0]["text"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert!(jsonschema::is_valid(&schema, &answer), "{answer}");
    assert!(c["usage"]["inputTokens"].as_u64().unwrap() > 0);

    let rec = record(&root).await;
    let online: Vec<&str> = rec["online"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(online, ["online-inv", "online-conv"]);
    for (model, id, input, output) in [
        (
            HAIKU,
            "online-inv",
            &m["usage"]["input_tokens"],
            &m["usage"]["output_tokens"],
        ),
        (
            NOVA,
            "online-conv",
            &c["usage"]["inputTokens"],
            &c["usage"]["outputTokens"],
        ),
    ] {
        let e = rec["bill"]["per_custom_id"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["custom_id"] == id)
            .unwrap();
        assert_eq!(
            (&e["pricing_mode"], &e["model"]),
            (&json!("standard"), &json!(model))
        );
        assert_eq!((&e["input_tokens"], &e["output_tokens"]), (input, output));
        let u = Usage {
            input_tokens: input.as_u64().unwrap(),
            output_tokens: output.as_u64().unwrap(),
            ..Default::default()
        };
        let cost = prices().lookup("bedrock", model).unwrap().standard.cost(&u);
        assert_eq!(e["cost_usd"], cost.to_decimal_string());
    }

    let r = call("vendor.unknown-v1:0", "invoke", "x", anthropic_input(1))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["x-amzn-errortype"], "ValidationException");
    let r = call(HAIKU, "converse", "y", anthropic_input(1))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_faults_answer_in_aws_shapes_and_a_lost_create_still_makes_its_job() {
    let h = start_sim(SimSettings {
        http_429_rate: 0.45,
        http_500_rate: 0.45,
        ..fast()
    })
    .await;
    let root = h.root_url();
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        let r = aws_test::signed(
            reqwest::Method::GET,
            &format!("{root}/model-invocation-jobs"),
            "bedrock",
            "us-east-1",
        )
        .send()
        .await
        .unwrap();
        let name = r
            .headers()
            .get("x-amzn-errortype")
            .map(|v| v.to_str().unwrap().to_string());
        seen.insert((r.status().as_u16(), name));
        let r = aws_test::signed(
            reqwest::Method::GET,
            &format!("{root}/s3/{BUCKET}?list-type=2"),
            "s3",
            "us-east-1",
        )
        .send()
        .await
        .unwrap();
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        let code = body
            .split("<Code>")
            .nth(1)
            .and_then(|c| c.split("</Code>").next())
            .map(str::to_string);
        seen.insert((status, code));
    }
    for expected in [
        (429, "ThrottlingException"),
        (500, "InternalServerException"),
        (503, "SlowDown"),
        (500, "InternalError"),
    ] {
        assert!(
            seen.contains(&(expected.0, Some(expected.1.to_string()))),
            "{expected:?} in {seen:?}"
        );
    }
    h.stop().await;

    let (h, root, s3, br) = start_with_clients(SimSettings {
        drop_create_rate: 1.0,
        ..fast()
    })
    .await;
    put(&s3, "in/a.jsonl", records(0..120, converse_input)).await;
    let (input, output) = (s3_uri("in/a.jsonl"), s3_uri("out/"));
    let body = json!({"jobName": "lost", "roleArn": ROLE, "modelId": NOVA, "clientRequestToken": "lost-1",
        "inputDataConfig": {"s3InputDataConfig": {"s3Uri": input}},
        "outputDataConfig": {"s3OutputDataConfig": {"s3Uri": output}}});
    let r = aws_test::signed(
        reqwest::Method::POST,
        &format!("{root}/model-invocation-job"),
        "bedrock",
        "us-east-1",
    )
    .json(&body)
    .send()
    .await;
    let broke = match r {
        Err(_) => true,
        Ok(r) => r.bytes().await.is_err(),
    };
    assert!(broke, "the response breaks off");
    let jobs = br.list_model_invocation_jobs().send().await.unwrap();
    assert_eq!(jobs.invocation_job_summaries().len(), 1, "the job exists");
    let arn = jobs.invocation_job_summaries()[0].job_arn().to_string();
    // A replay with the same token learns its ARN, whole.
    let again =
        submit(create(&br, "lost", NOVA, &input, &output).client_request_token("lost-1")).await;
    assert_eq!(again, arn);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_and_jobs_survive_a_reopened_state() {
    let dir = tempfile::tempdir().unwrap();
    let open = || Sim::persistent(dir.path(), fast(), prices()).unwrap();
    let (h, root, s3, br) = with_clients(serve(open()).await);
    put(&s3, "in/a.jsonl", records(0..100, converse_input)).await;
    let (arn, job, _) = run(&br, "kept", NOVA, &s3_uri("in/a.jsonl"), &s3_uri("out")).await;
    assert_eq!(job.status(), Some(&ModelInvocationJobStatus::Completed));
    // The client cleans up its input: the job's output stays.
    delete(&s3, "in/a.jsonl").await;
    let before = record(&root).await;
    h.stop().await;

    let (h, root, s3, br) = with_clients(serve(open()).await);
    let after = record(&root).await;
    assert_eq!(before["s3_objects"], after["s3_objects"]);
    assert_eq!(before["bill"], after["bill"]);
    assert_eq!(out_lines(&s3, &arn, "a.jsonl").await.count, 100);
    let job = br
        .get_model_invocation_job()
        .job_identifier(&arn)
        .send()
        .await
        .unwrap();
    assert_eq!(job.status(), Some(&ModelInvocationJobStatus::Completed));
    h.stop().await;
}
