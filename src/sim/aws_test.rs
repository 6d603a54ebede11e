//! Test helper: the official AWS SDK clients (S3, Bedrock) pointed at a running simulator as
//! nightshift's Bedrock client points them (static credentials, the simulator's root URL as
//! the Bedrock endpoint, `ROOT/s3/` path style as the S3 endpoint, checksums only when an
//! operation requires them), and a raw request carrying a SigV4-shaped header for what the
//! SDK clients here cannot send (the Bedrock runtime) or do not read. The S3 endpoint's
//! trailing slash matters: without it aws-sdk-s3 glues the bucket to the path
//! (`/s3my-bucket/key`).

use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};

/// The access key id the test clients sign with.
pub(crate) const ACCESS_KEY: &str = "AKIDSIM";

fn credentials() -> Credentials {
    Credentials::new(ACCESS_KEY, "secret", None, None, "test")
}

/// An S3 client for the simulator at `root`, signing for `region`.
pub(crate) fn s3(root: &str, region: &str) -> aws_sdk_s3::Client {
    s3_checksums(root, region, RequestChecksumCalculation::WhenRequired)
}

/// The same, computing request checksums as `checksums` says (the SDK's default,
/// `WhenSupported`, sends uploads `aws-chunked` with a checksum trailer).
pub(crate) fn s3_checksums(
    root: &str,
    region: &str,
    checksums: RequestChecksumCalculation,
) -> aws_sdk_s3::Client {
    s3_at(&format!("{root}/s3/"), region, checksums)
}

/// An S3 client for the endpoint `endpoint` (path style).
pub(crate) fn s3_at(
    endpoint: &str,
    region: &str,
    checksums: RequestChecksumCalculation,
) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .credentials_provider(credentials())
        .region(Region::new(region.to_string()))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .request_checksum_calculation(checksums)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// A Bedrock (control plane) client for the simulator at `root`, signing for `region`.
pub(crate) fn bedrock(root: &str, region: &str) -> aws_sdk_bedrock::Client {
    let config = aws_sdk_bedrock::Config::builder()
        .behavior_version(aws_sdk_bedrock::config::BehaviorVersion::latest())
        .credentials_provider(aws_sdk_bedrock::config::Credentials::new(
            ACCESS_KEY, "secret", None, None, "test",
        ))
        .region(aws_sdk_bedrock::config::Region::new(region.to_string()))
        .endpoint_url(root)
        .build();
    aws_sdk_bedrock::Client::from_conf(config)
}

/// Both clients for the simulator at `root`, signing for `region`: S3, then Bedrock.
pub(crate) fn clients(root: &str, region: &str) -> (aws_sdk_s3::Client, aws_sdk_bedrock::Client) {
    (s3(root, region), bedrock(root, region))
}

/// A request with an `Authorization` header shaped like a SigV4 signature for `service` in
/// `region` (the simulator checks the shape and the scope, not the signature).
pub(crate) fn signed(
    method: reqwest::Method,
    url: &str,
    service: &str,
    region: &str,
) -> reqwest::RequestBuilder {
    let auth = format!(
        "AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/20260101/{region}/{service}/aws4_request, SignedHeaders=host;x-amz-date, Signature=00ff"
    );
    reqwest::Client::new()
        .request(method, url)
        .header("authorization", auth)
        .header("x-amz-date", "20260101T000000Z")
}
