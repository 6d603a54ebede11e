//! The subset of Amazon S3 a Bedrock client uses, in the simulator: path-style
//! PutObject, GetObject (and HeadObject), DeleteObject and ListObjectsV2 under `/s3`
//! (`/s3/{bucket}/{key}`), their XML, S3's error documents, the SigV4 credential scope it
//! expects (service `s3`), its answers to the HTTP faults (`SlowDown`, `InternalError`), and
//! decoding an `aws-chunked` upload. The objects themselves are files (`files`).

use std::collections::HashMap;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::data::{SimFile, object_id, split_s3_uri};
use super::http::{AppState, SigV4Refusal, Sink, blocking, sigv4_scope, stream_file};
use super::types::SimError;
use crate::util::time::rfc3339;

// ------------------------------------------------------------------ XML and errors ------------

/// `s` with XML's special characters escaped.
fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

fn xml_response(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/xml"));
    resp
}

/// An S3 error document: `<Error><Code>…</Code><Message>…</Message>…</Error>`.
pub(super) fn error(status: u16, code: &str, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    xml_response(
        status,
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{}</Code><Message>{}</Message><RequestId>SIMULATED</RequestId></Error>",
            xml(code),
            xml(message)
        ),
    )
}

/// S3's answer to a throttled call.
pub(super) fn slow_down() -> Response {
    error(503, "SlowDown", "Please reduce your request rate.")
}

/// S3's answer to a call that failed on the server.
pub(super) fn internal_error() -> Response {
    error(
        500,
        "InternalError",
        "We encountered an internal error. Please try again.",
    )
}

/// A simulator error as an S3 error document.
fn from_sim(e: SimError) -> Response {
    match e.status {
        404 => error(404, "NoSuchKey", &e.message),
        500..=599 => error(500, "InternalError", &e.message),
        s => error(s, "InvalidRequest", &e.message),
    }
}

fn no_such_key(key: &str) -> Response {
    error(
        404,
        "NoSuchKey",
        &format!("The specified key does not exist: {key}"),
    )
}

/// S3's refusal of a call without a SigV4 signature scoped to service `s3` in the simulator's
/// region (the signature itself is not checked).
pub(super) fn refuse(h: &HeaderMap, region: &str) -> Option<Response> {
    let malformed = |m: String| Some(error(403, "AuthorizationHeaderMalformed", &m));
    match sigv4_scope(h) {
        Ok(scope) if scope.service != "s3" => malformed(format!(
            "The authorization header is malformed; the credential is scoped to service '{}', not 's3'.",
            scope.service
        )),
        Ok(scope) if scope.region != region => malformed(format!(
            "The authorization header is malformed; the region '{}' is wrong; expecting '{region}'.",
            scope.region
        )),
        Ok(_) => None,
        Err(SigV4Refusal::Missing) => Some(error(
            403,
            "AccessDenied",
            "Access Denied: the request has no Authorization header (AWS Signature Version 4).",
        )),
        Err(SigV4Refusal::Malformed(why)) => {
            malformed(format!("The authorization header is malformed: {why}."))
        }
    }
}

/// An HTTP date (`Last-Modified`) of a unix time.
fn http_date(unix: i64) -> String {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_default()
}

// ------------------------------------------------------------------ aws-chunked ---------------

#[derive(Debug, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk's size line (`<hex>[;chunk-signature=…]`).
    Size,
    /// This many bytes of the chunk's data still to come.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// The trailer lines after the last (empty) chunk, up to an empty line.
    Trailers,
    Done,
}

/// Decodes an `aws-chunked` request body (`Content-Encoding: aws-chunked`) as it arrives:
/// chunks of `<hex size>[;chunk-signature=…]\r\n<data>\r\n`, an empty last chunk, then
/// optional trailers (`x-amz-checksum-…:…`) and an empty line. Signatures and checksums are
/// not checked.
pub(super) struct AwsChunked {
    buf: Vec<u8>,
    state: Chunk,
}

impl AwsChunked {
    pub(super) fn new() -> Self {
        AwsChunked {
            buf: Vec::new(),
            state: Chunk::Size,
        }
    }

    /// Takes the next bytes of the body; appends the data they complete to `out`.
    pub(super) fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        self.buf.extend_from_slice(input);
        let mut pos = 0;
        let line_at = |buf: &[u8], pos: usize| buf[pos..].windows(2).position(|w| w == b"\r\n");
        loop {
            match self.state {
                Chunk::Size => {
                    let Some(i) = line_at(&self.buf, pos) else {
                        if self.buf.len() - pos > 4096 {
                            return Err("an aws-chunked size line is too long".into());
                        }
                        break;
                    };
                    let line = &self.buf[pos..pos + i];
                    let hex = line.split(|&b| b == b';').next().unwrap_or_default();
                    let size = std::str::from_utf8(hex)
                        .ok()
                        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
                        .ok_or_else(|| {
                            format!(
                                "an aws-chunked size line is not hexadecimal: {:?}",
                                String::from_utf8_lossy(line)
                            )
                        })?;
                    pos += i + 2;
                    self.state = if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    };
                }
                Chunk::Data(n) => {
                    let take = n.min((self.buf.len() - pos) as u64) as usize;
                    out.extend_from_slice(&self.buf[pos..pos + take]);
                    pos += take;
                    if take as u64 == n {
                        self.state = Chunk::DataEnd;
                    } else {
                        self.state = Chunk::Data(n - take as u64);
                        break;
                    }
                }
                Chunk::DataEnd => {
                    if self.buf.len() - pos < 2 {
                        break;
                    }
                    if &self.buf[pos..pos + 2] != b"\r\n" {
                        return Err("an aws-chunked chunk is longer than its size says".into());
                    }
                    pos += 2;
                    self.state = Chunk::Size;
                }
                Chunk::Trailers => {
                    let Some(i) = line_at(&self.buf, pos) else {
                        break;
                    };
                    pos += i + 2;
                    if i == 0 {
                        self.state = Chunk::Done;
                    }
                }
                Chunk::Done => {
                    pos = self.buf.len();
                    break;
                }
            }
        }
        self.buf.drain(..pos);
        Ok(())
    }

    /// Checks the body ended after its last chunk.
    pub(super) fn finish(&self) -> Result<(), String> {
        match self.state {
            // Tolerated: a last trailer without the closing empty line.
            Chunk::Done | Chunk::Trailers => Ok(()),
            _ => Err("the aws-chunked body ended before its last (empty) chunk".into()),
        }
    }
}

// ------------------------------------------------------------------ HTTP ----------------------

/// S3's routes (path style, under `/s3`).
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/s3/{bucket}", get(list_objects))
        .route("/s3/{bucket}/", get(list_objects))
        .route(
            "/s3/{bucket}/{*key}",
            get(get_object).put(put_object).delete(delete_object),
        )
}

/// S3's refusal of a bucket name it does not allow, if it is one.
fn bad_bucket(bucket: &str) -> Option<Response> {
    split_s3_uri(&object_id(bucket, "")).is_none().then(|| {
        error(
            400,
            "InvalidBucketName",
            &format!("The specified bucket is not valid: {bucket}"),
        )
    })
}

async fn put_object(
    State(st): State<AppState>,
    Path((bucket, key)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some(refusal) = bad_bucket(&bucket) {
        return refusal;
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let chunked = header("content-encoding").is_some_and(|e| e.contains("aws-chunked"))
        || header("x-amz-content-sha256").is_some_and(|s| s.starts_with("STREAMING-"));
    let decoded_length = header("x-amz-decoded-content-length").and_then(|n| n.parse::<u64>().ok());
    let path = st.sim.new_file_path();
    let written = async {
        use futures_util::StreamExt;
        let mut stream = body.into_data_stream();
        let mut sink = Sink::create(&path).await?;
        let mut decoder = chunked.then(AwsChunked::new);
        let mut out = Vec::new();
        while let Some(c) = stream.next().await {
            let c = c.map_err(|e| SimError::bad_request(format!("upload interrupted: {e}")))?;
            match &mut decoder {
                Some(d) => {
                    out.clear();
                    d.feed(&c, &mut out).map_err(SimError::bad_request)?;
                    sink.write(&out).await?;
                }
                None => sink.write(&c).await?,
            }
        }
        if let Some(d) = &decoder {
            d.finish().map_err(SimError::bad_request)?;
        }
        sink.finish().await
    }
    .await;
    let (n, sha) = match written {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            return error(400, "IncompleteBody", &e.message);
        }
    };
    if chunked && decoded_length.is_some_and(|d| d != n) {
        let _ = std::fs::remove_file(&path);
        return error(
            400,
            "IncompleteBody",
            &format!(
                "The aws-chunked body decodes to {n} bytes; x-amz-decoded-content-length says {}.",
                decoded_length.unwrap_or_default()
            ),
        );
    }
    let sim = st.sim.clone();
    match blocking(move || sim.put_object(&bucket, &key, path, n, sha)).await {
        Ok(etag) => {
            let mut resp = StatusCode::OK.into_response();
            if let Ok(v) = HeaderValue::from_str(&etag) {
                resp.headers_mut().insert("etag", v);
            }
            resp
        }
        Err(e) => from_sim(e),
    }
}

async fn get_object(
    State(st): State<AppState>,
    Path((bucket, key)): Path<(String, String)>,
) -> Response {
    let found = match st.sim.object(&bucket, &key) {
        Ok(Some(found)) => found,
        Ok(None) => return no_such_key(&key),
        Err(e) => return from_sim(e),
    };
    let (f, path): (SimFile, _) = found;
    let mut resp = match stream_file(&st, &f.id, path).await {
        Ok(r) => r,
        // Deleted while being read.
        Err(_) => return no_such_key(&key),
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&f.etag()) {
        h.insert("etag", v);
    }
    if let Ok(v) = HeaderValue::from_str(&http_date(f.created_at)) {
        h.insert("last-modified", v);
    }
    resp
}

async fn delete_object(
    State(st): State<AppState>,
    Path((bucket, key)): Path<(String, String)>,
) -> Response {
    let sim = st.sim.clone();
    match blocking(move || sim.delete_object(&bucket, &key)).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => from_sim(e),
    }
}

/// ListObjectsV2. Continuation tokens are the hex of the key to resume after.
async fn list_objects(
    State(st): State<AppState>,
    Path(bucket): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(refusal) = bad_bucket(&bucket) {
        return refusal;
    }
    let prefix = q.get("prefix").cloned().unwrap_or_default();
    let delimiter = q.get("delimiter").cloned().filter(|d| !d.is_empty());
    let max = match q.get("max-keys").map(|m| m.parse::<usize>()) {
        None => 1000,
        Some(Ok(m)) => m.clamp(1, 1000),
        Some(Err(_)) => return error(400, "InvalidArgument", "max-keys is not a number"),
    };
    let token = q.get("continuation-token").cloned();
    let after = match &token {
        Some(t) => match hex::decode(t).ok().and_then(|k| String::from_utf8(k).ok()) {
            Some(k) => Some(k),
            None => {
                return error(
                    400,
                    "InvalidArgument",
                    "The continuation token provided is incorrect",
                );
            }
        },
        None => q.get("start-after").cloned(),
    };
    let sim = st.sim.clone();
    let (b, p, d) = (bucket.clone(), prefix.clone(), delimiter.clone());
    let page = match blocking(move || sim.list_objects(&b, &p, d.as_deref(), after.as_deref(), max))
        .await
    {
        Ok(page) => page,
        Err(e) => return from_sim(e),
    };
    let mut x = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">",
    );
    let mut tag = |name: &str, value: &str| {
        x.push_str(&format!("<{name}>{}</{name}>", xml(value)));
    };
    tag("Name", &bucket);
    tag("Prefix", &prefix);
    if let Some(d) = &delimiter {
        tag("Delimiter", d);
    }
    tag("MaxKeys", &max.to_string());
    tag(
        "KeyCount",
        &(page.objects.len() + page.common_prefixes.len()).to_string(),
    );
    tag(
        "IsTruncated",
        if page.next.is_some() { "true" } else { "false" },
    );
    if let Some(t) = &token {
        tag("ContinuationToken", t);
    }
    if let Some(next) = &page.next {
        tag("NextContinuationToken", &hex::encode(next));
    }
    if let Some(s) = q.get("start-after") {
        tag("StartAfter", s);
    }
    for f in &page.objects {
        x.push_str(&format!(
            "<Contents><Key>{}</Key><LastModified>{}</LastModified><ETag>{}</ETag><Size>{}</Size><StorageClass>STANDARD</StorageClass></Contents>",
            xml(&f.filename),
            rfc3339(f.created_at * 1000),
            xml(&f.etag()),
            f.bytes
        ));
    }
    for p in &page.common_prefixes {
        x.push_str(&format!(
            "<CommonPrefixes><Prefix>{}</Prefix></CommonPrefixes>",
            xml(p)
        ));
    }
    x.push_str("</ListBucketResult>");
    xml_response(StatusCode::OK, x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(body: &[u8], piece: usize) -> Result<Vec<u8>, String> {
        let mut d = AwsChunked::new();
        let mut out = Vec::new();
        for c in body.chunks(piece) {
            d.feed(c, &mut out)?;
        }
        d.finish()?;
        Ok(out)
    }

    #[test]
    fn aws_chunked_bodies_decode_whatever_their_pieces() {
        let signed = b"5;chunk-signature=abc\r\nhello\r\n6;chunk-signature=def\r\n world\r\n0;chunk-signature=00\r\n\r\n";
        let trailer = b"b\r\nhello world\r\n0\r\nx-amz-checksum-crc32:DUoRhQ==\r\n\r\n";
        for piece in [1, 2, 3, 7, 1000] {
            assert_eq!(decode(signed, piece).unwrap(), b"hello world", "{piece}");
            assert_eq!(decode(trailer, piece).unwrap(), b"hello world", "{piece}");
        }
        assert!(decode(b"5\r\nhello\r\n", 3).is_err(), "no last chunk");
        assert!(decode(b"zz\r\nhello\r\n0\r\n\r\n", 3).is_err(), "not hex");
        assert!(
            decode(b"3\r\nhello\r\n0\r\n\r\n", 4).is_err(),
            "longer than its size"
        );
    }

    #[test]
    fn xml_text_is_escaped() {
        assert_eq!(xml("a<b>&\"c'"), "a&lt;b&gt;&amp;&quot;c&apos;");
    }
}
