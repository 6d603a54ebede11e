//! Tests of the simulator's S3, driven over HTTP by the official AWS SDK client (`aws_test`):
//! objects and the SigV4 credential scope.

use std::collections::BTreeMap;

use aws_sdk_s3::primitives::ByteStream;
use serde_json::Value;

use super::aws_test;
use super::*;

const BUCKET: &str = "nightshift-sim";

fn fast() -> SimSettings {
    SimSettings {
        batch_seconds: 0.4,
        ..Default::default()
    }
}

async fn start_sim(settings: SimSettings) -> SimHandle {
    let sim = Sim::new(settings, PriceTable::builtin()).unwrap();
    start(sim, "127.0.0.1:0".parse().unwrap()).await.unwrap()
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

async fn record(root: &str) -> Value {
    reqwest::get(format!("{root}/_sim/record"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
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

    s3.delete_object()
        .bucket(BUCKET)
        .key("a/1.jsonl")
        .send()
        .await
        .unwrap();
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
    s3.delete_object()
        .bucket(BUCKET)
        .key("a/1.jsonl")
        .send()
        .await
        .unwrap();

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
