//! Test helper: the official AWS SDK S3 client pointed at a running simulator as nightshift's
//! Bedrock client points it (static credentials, `ROOT/s3/` path style as the endpoint,
//! checksums only when an operation requires them). The endpoint's trailing slash matters:
//! without it aws-sdk-s3 glues the bucket to the path (`/s3my-bucket/key`).

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
