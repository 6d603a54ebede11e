//! Amazon Bedrock's wire format in the simulator (docs/providers.md, Bedrock): model invocation
//! jobs (`POST /model-invocation-job`, get, list, stop) whose input and output are S3 objects
//! (`s3`), their job descriptions and statuses, reading a record's `modelInput` (an Anthropic
//! InvokeModel body or a Converse body, the JSON Schema at the end of its system text),
//! `modelOutput`s and output lines, the manifest, errors (the `x-amzn-ErrorType` header and
//! `{"message"}`), the SigV4 credential scope it expects, and its HTTP routes, with the
//! runtime's `POST /model/{modelId}/invoke` and `/converse` for online requests.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::sync::LazyLock;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::Sim;
use super::data::{BedrockJob, Outcome, SimBatch, Status, object_id, split_s3_uri};
use super::http::{AppState, SigV4Refusal, blocking, client_request_id, created, sigv4_scope};
use super::state::Inner;
use super::types::{Neutral, ProviderKind, Reply, SimError, default_schema, str_at};
use crate::cost::Usage;
use crate::cost::tokens::Tokenizer;
use crate::util::time::{now_ms, rfc3339};

/// Where the system text hands over to the JSON Schema the answer must match (the schema
/// follows, as compact JSON, up to the end of the text).
const SCHEMA_MARKER: &str = "It must match this JSON Schema:\n";

/// The account every simulated job ARN names.
pub(super) const ACCOUNT: &str = "123456789012";

// ------------------------------------------------------------------ errors --------------------

/// An error of `name` (an exception name Bedrock uses) with its HTTP status.
pub(super) fn exception(name: &'static str, message: impl Into<String>) -> SimError {
    SimError {
        status: status_of(name),
        kind: name,
        code: None,
        message: message.into(),
    }
}

/// The exception name of an error: its own when it has one, else the one its HTTP status
/// maps to.
pub(super) fn error_name(e: &SimError) -> &'static str {
    if e.kind.ends_with("Exception") {
        return e.kind;
    }
    match e.status {
        401 | 403 => "AccessDeniedException",
        404 => "ResourceNotFoundException",
        409 => "ConflictException",
        429 => "ThrottlingException",
        500..=599 => "InternalServerException",
        _ => "ValidationException",
    }
}

/// The HTTP status of an exception (Bedrock's conflicts and quota errors are 400s).
fn status_of(name: &str) -> u16 {
    match name {
        "ValidationException" | "ConflictException" | "ServiceQuotaExceededException" => 400,
        "AccessDeniedException" | "UnrecognizedClientException" | "InvalidSignatureException" => {
            403
        }
        "ResourceNotFoundException" => 404,
        "ThrottlingException" => 429,
        _ => 500,
    }
}

/// The HTTP status Bedrock answers an error with.
pub(super) fn error_status(e: &SimError) -> u16 {
    status_of(error_name(e))
}

/// An error body (the exception's name travels in `x-amzn-ErrorType`).
pub(super) fn error_body(e: &SimError) -> Value {
    json!({"message": e.message})
}

/// The body of an online request that failed on the server.
pub(super) fn server_error() -> Value {
    json!({"message": "Internal server error"})
}

fn validation(message: impl Into<String>) -> SimError {
    exception("ValidationException", message)
}

// ------------------------------------------------------------------ objects -------------------

/// A job's `status`. A job shows `Submitted` for its first instants, `Scheduled` while it
/// waits never to start, and `PartiallyCompleted` when it timed out mid-run.
fn status_name(b: &SimBatch) -> &'static str {
    match b.status {
        Status::Validating => {
            let since_ms = (now_ms() - b.started_ms).max(0) as f64;
            if since_ms < 0.05 * b.settings.batch_seconds * 1000.0 {
                "Submitted"
            } else {
                "Validating"
            }
        }
        Status::InProgress if b.unstarted() => "Scheduled",
        Status::InProgress | Status::Finalizing => "InProgress",
        Status::Completed => "Completed",
        Status::Failed => "Failed",
        Status::Expired if b.unstarted() => "Expired",
        Status::Expired => "PartiallyCompleted",
        Status::Cancelling => "Stopping",
        Status::Cancelled => "Stopped",
    }
}

/// A job description (GetModelInvocationJob; a ListModelInvocationJobs summary has the same
/// fields). Record counts appear once the job runs.
pub(super) fn job_json(b: &SimBatch) -> Value {
    let empty = BedrockJob::default();
    let job = b.bedrock.as_ref().unwrap_or(&empty);
    let ms = |unix: i64| unix * 1000;
    let last_ms = b
        .stamps
        .values()
        .map(|&t| ms(t))
        .fold(b.started_ms, i64::max);
    let hours = i64::from(job.timeout_hours);
    let mut v = json!({
        "jobArn": b.id,
        "jobName": b.display_name,
        "modelId": b.url_model,
        "roleArn": job.role_arn,
        "status": status_name(b),
        "submitTime": rfc3339(b.started_ms),
        "lastModifiedTime": rfc3339(last_ms),
        "inputDataConfig": job.input_config,
        "outputDataConfig": job.output_config,
        "timeoutDurationInHours": hours,
        "jobExpirationTime": rfc3339(b.started_ms + hours * 3_600_000),
    });
    if let Some(t) = &job.client_request_token {
        v["clientRequestToken"] = json!(t);
    }
    if let Some(t) = &job.invocation_type {
        v["modelInvocationType"] = json!(t);
    }
    if b.status == Status::Failed {
        let mut message = b
            .errors
            .iter()
            .filter_map(|e| e["message"].as_str())
            .collect::<Vec<_>>()
            .join(" ");
        if message.is_empty() {
            message = "The job failed.".into();
        }
        if message.len() > 2048 {
            let mut cut = 2045;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str("...");
        }
        v["message"] = json!(message);
    }
    let end = ["completed_at", "failed_at", "expired_at", "cancelled_at"]
        .iter()
        .find_map(|k| b.stamps.get(*k));
    if b.status.terminal()
        && let Some(&end) = end
    {
        v["endTime"] = json!(rfc3339(ms(end)));
    }
    let counts = match b.status {
        Status::Validating | Status::Failed => None,
        Status::InProgress if b.unstarted() => None,
        Status::InProgress | Status::Finalizing | Status::Cancelling => {
            (!b.requests.is_empty()).then_some((b.counts.0, b.counts.1, b.counts.1, 0))
        }
        Status::Completed | Status::Expired | Status::Cancelled => {
            let n = |o: &[Outcome]| b.requests.iter().filter(|r| o.contains(&r.outcome)).count();
            let ok = n(&[Outcome::Ok, Outcome::InvalidJson]) as u64;
            let err = n(&[Outcome::Error]) as u64;
            Some((b.requests.len() as u64, ok + err, ok, err))
        }
    };
    if let Some((total, processed, ok, err)) = counts {
        v["totalRecordCount"] = json!(total);
        v["processedRecordCount"] = json!(processed);
        v["successRecordCount"] = json!(ok);
        v["errorRecordCount"] = json!(err);
    }
    v
}

/// A page of job summaries; `next` is the next page's token.
pub(super) fn job_list(page: Vec<Value>, next: Option<String>) -> Value {
    let mut v = json!({"invocationJobSummaries": page});
    if let Some(next) = next {
        v["nextToken"] = json!(next);
    }
    v
}

/// A job's `manifest.json.out`: its record counts and the tokens of the records answered.
pub(super) fn manifest(total: usize, success: usize, error: usize, usage: &Usage) -> Value {
    json!({
        "totalRecordCount": total,
        "processedRecordCount": success + error,
        "successRecordCount": success,
        "errorRecordCount": error,
        "inputTokenCount": usage.input_tokens,
        "outputTokenCount": usage.output_tokens,
    })
}

/// `jobName`'s pattern (docs/providers.md, Bedrock: 1 to 63 characters).
static JOB_NAME: LazyLock<regex::Regex> = LazyLock::new(|| {
    regex::Regex::new(r"^[a-zA-Z0-9]{1,63}(-*[a-zA-Z0-9\+\-\.]){0,63}$").expect("valid regex")
});

/// The fields of a create, checked.
struct CreateJob {
    name: String,
    role_arn: String,
    model: String,
    token: Option<String>,
    input_config: Value,
    output_config: Value,
    input_uri: String,
    output_uri: String,
    timeout_hours: u32,
    invocation_type: Option<String>,
}

/// Reads and checks a CreateModelInvocationJob body, as the service does before it answers.
fn read_create(body: &Value) -> Result<CreateJob, SimError> {
    let field = |k: &str| body.get(k).and_then(Value::as_str);
    let required = |k: &str| {
        field(k).filter(|v| !v.is_empty()).ok_or_else(|| {
            validation(format!(
                "1 validation error detected: Value null at '{k}' failed to satisfy constraint: Member must not be null"
            ))
        })
    };
    let name = required("jobName")?;
    if name.len() > 63 || !JOB_NAME.is_match(name) {
        return Err(validation(format!(
            "1 validation error detected: Value '{name}' at 'jobName' failed to satisfy constraint: Member must satisfy regular expression pattern: [a-zA-Z0-9]{{1,63}}(-*[a-zA-Z0-9\\+\\-\\.]){{0,63}} and length 1 to 63"
        )));
    }
    let role_arn = required("roleArn")?;
    if !(role_arn.starts_with("arn:aws") && role_arn.contains(":role/")) {
        return Err(validation(format!(
            "1 validation error detected: Value '{role_arn}' at 'roleArn' failed to satisfy constraint: Member must satisfy regular expression pattern: arn:aws(-[^:]+)?:iam::([0-9]{{12}})?:role/.+"
        )));
    }
    let model = required("modelId")?;
    let uri = |config: &str, inner: &str| -> Result<(Value, String), SimError> {
        let c = body.get(config).cloned().unwrap_or(Value::Null);
        let u = c
            .pointer(&format!("/{inner}/s3Uri"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if split_s3_uri(&u).is_none() {
            return Err(validation(format!(
                "1 validation error detected: Value '{u}' at '{config}.{inner}.s3Uri' failed to satisfy constraint: Member must satisfy regular expression pattern: s3://[a-z0-9][\\.\\-a-z0-9]{{1,61}}[a-z0-9](/.*)?"
            )));
        }
        Ok((c, u))
    };
    let (input_config, input_uri) = uri("inputDataConfig", "s3InputDataConfig")?;
    let (output_config, mut output_uri) = uri("outputDataConfig", "s3OutputDataConfig")?;
    if !output_uri.ends_with('/') {
        output_uri.push('/');
    }
    let timeout_hours = match body.get("timeoutDurationInHours") {
        None | Some(Value::Null) => 168,
        Some(v) => match v.as_u64().filter(|h| (24..=168).contains(h)) {
            Some(h) => h as u32,
            None => {
                return Err(validation(format!(
                    "1 validation error detected: Value '{v}' at 'timeoutDurationInHours' failed to satisfy constraint: Member must have value between 24 and 168"
                )));
            }
        },
    };
    let invocation_type = field("modelInvocationType").map(str::to_string);
    if let Some(t) = &invocation_type
        && t != "InvokeModel"
        && t != "Converse"
    {
        return Err(validation(format!(
            "1 validation error detected: Value '{t}' at 'modelInvocationType' failed to satisfy constraint: Member must satisfy enum value set: [InvokeModel, Converse]"
        )));
    }
    let token = field("clientRequestToken").map(str::to_string);
    if token
        .as_ref()
        .is_some_and(|t| t.is_empty() || t.len() > 256)
    {
        return Err(validation(
            "1 validation error detected: Value at 'clientRequestToken' failed to satisfy constraint: Member must have length between 1 and 256",
        ));
    }
    Ok(CreateJob {
        name: name.to_string(),
        role_arn: role_arn.to_string(),
        model: model.to_string(),
        token,
        input_config,
        output_config,
        input_uri,
        output_uri,
        timeout_hours,
        invocation_type,
    })
}

/// The ARN of the job made with `token`, if any.
fn job_with_token(inner: &Inner, token: Option<&str>) -> Option<String> {
    let token = token?;
    inner
        .batches
        .iter()
        .find(|b| {
            b.bedrock
                .as_ref()
                .is_some_and(|j| j.client_request_token.as_deref() == Some(token))
        })
        .map(|b| b.id.clone())
}

impl Sim {
    /// Bedrock `POST /model-invocation-job`: checks the request, reads the input objects (the
    /// object at the input URI, or every `.jsonl` object under it when it ends with `/`) into
    /// the job's own input, and creates the job. A create with the `clientRequestToken` of an
    /// earlier one returns that job and creates nothing. The answer, and whether it made a
    /// job.
    pub(crate) fn create_bedrock_job(&self, body: &Value) -> Result<(Value, bool), SimError> {
        let c = read_create(body)?;
        if self
            .prices
            .lookup(ProviderKind::Bedrock.as_str(), &c.model)
            .is_err()
        {
            return Err(validation(format!(
                "The provided model identifier is invalid: {}.",
                c.model
            )));
        }
        let (bucket, key) = split_s3_uri(&c.input_uri).expect("checked by read_create");
        let (sources, name, path) = {
            let mut inner = self.state()?;
            if let Some(arn) = job_with_token(&inner, c.token.as_deref()) {
                return Ok((json!({"jobArn": arn}), false));
            }
            let sources: Vec<(String, std::path::PathBuf)> = if key.is_empty() || key.ends_with('/')
            {
                let from = object_id(bucket, key);
                inner
                    .files
                    .range(from.clone()..)
                    .take_while(|(id, _)| id.starts_with(&from))
                    .filter(|(id, _)| id.ends_with(".jsonl"))
                    .map(|(_, f)| (f.filename.clone(), self.content_path(&f.name)))
                    .collect()
            } else {
                inner
                    .files
                    .get(&object_id(bucket, key))
                    .map(|f| (f.filename.clone(), self.content_path(&f.name)))
                    .into_iter()
                    .collect()
            };
            let (name, path) = self.new_content(&mut inner);
            (sources, name, path)
        };
        // Read outside the lock: an input can be large.
        let parts = copy_input(&sources, &path).map_err(|e| {
            let _ = std::fs::remove_file(&path);
            SimError::unsaved(&format!(
                "the simulator could not read the job's input: {e}"
            ))
        })?;
        let mut inner = self.state()?;
        if let Some(arn) = job_with_token(&inner, c.token.as_deref()) {
            let _ = std::fs::remove_file(&path);
            return Ok((json!({"jobArn": arn}), false));
        }
        let earlier = inner
            .batches
            .iter()
            .filter(|b| b.flavor == ProviderKind::Bedrock)
            .count() as u64;
        let unstarted = earlier < u64::from(self.settings.unstarted_first);
        let mut b = self.new_batch(&mut inner, "bedrock-job", ProviderKind::Bedrock, name);
        b.display_name = Some(c.name);
        b.url_model = Some(c.model);
        b.expires |= unstarted;
        b.bedrock = Some(BedrockJob {
            role_arn: c.role_arn,
            client_request_token: c.token,
            input_config: c.input_config,
            output_config: c.output_config,
            output_uri: c.output_uri,
            timeout_hours: c.timeout_hours,
            invocation_type: c.invocation_type,
            parts,
            unstarted,
            outputs: Vec::new(),
        });
        let arn = b.id.clone();
        self.push_batch(&mut inner, b)?;
        Ok((json!({"jobArn": arn}), true))
    }

    /// The job a `jobIdentifier` names: its ARN or its 12-character id.
    fn job_index(&self, inner: &Inner, ident: &str) -> Result<usize, SimError> {
        let found = match inner.batch_index.get(ident) {
            Some(&i) => Some(i),
            None if ident.len() == 12 => {
                let suffix = format!("/{ident}");
                inner.batches.iter().rposition(|b| b.id.ends_with(&suffix))
            }
            None => None,
        };
        found
            .filter(|&i| inner.batches[i].flavor == ProviderKind::Bedrock)
            .ok_or_else(|| {
                exception(
                    "ResourceNotFoundException",
                    format!("The specified model invocation job {ident} could not be found."),
                )
            })
    }

    /// Bedrock `GET /model-invocation-job/{jobIdentifier}`.
    pub(crate) fn get_bedrock_job(&self, ident: &str) -> Result<Value, SimError> {
        let mut inner = self.state()?;
        let idx = self.job_index(&inner, ident)?;
        self.advance(&mut inner, idx);
        let v = self.view(&mut inner, idx, self.base());
        Self::saved(&inner, v)
    }

    /// Bedrock `POST /model-invocation-job/{jobIdentifier}/stop`: the job goes Stopping, then
    /// Stopped; a job that has ended cannot be stopped.
    pub(crate) fn stop_bedrock_job(&self, ident: &str) -> Result<Value, SimError> {
        let id = {
            let mut inner = self.state()?;
            let idx = self.job_index(&inner, ident)?;
            self.advance(&mut inner, idx);
            Self::saved(&inner, ())?;
            let b = &inner.batches[idx];
            if b.status.terminal() {
                return Err(exception(
                    "ConflictException",
                    format!(
                        "The model invocation job {} is {} and cannot be stopped.",
                        b.id,
                        status_name(b)
                    ),
                ));
            }
            b.id.clone()
        };
        self.cancel_batch(&id)?;
        Ok(json!({}))
    }

    /// Bedrock `GET /model-invocation-jobs`: filtered by `nameContains`, `statusEquals`,
    /// `submitTimeAfter` and `submitTimeBefore`, sorted by creation time (`sortOrder`,
    /// newest first unless `Ascending`), `maxResults` a page, resumed at `nextToken`.
    pub(crate) fn list_bedrock_jobs(&self, q: &HashMap<String, String>) -> Result<Value, SimError> {
        let time = |k: &str| -> Result<Option<i64>, SimError> {
            q.get(k)
                .map(|t| {
                    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
                        .map_err(|_| validation(format!("{k}: '{t}' is not an ISO 8601 time")))
                })
                .transpose()
        };
        let (after, before) = (time("submitTimeAfter")?, time("submitTimeBefore")?);
        let max = match q.get("maxResults") {
            None => 1000,
            Some(m) => m
                .parse::<usize>()
                .ok()
                .filter(|m| (1..=1000).contains(m))
                .ok_or_else(|| {
                    validation(format!(
                        "1 validation error detected: Value '{m}' at 'maxResults' failed to satisfy constraint: Member must have value between 1 and 1000"
                    ))
                })?,
        };
        let ascending = match q.get("sortOrder").map(String::as_str) {
            None | Some("Descending") => false,
            Some("Ascending") => true,
            Some(o) => {
                return Err(validation(format!(
                    "1 validation error detected: Value '{o}' at 'sortOrder' failed to satisfy constraint: Member must satisfy enum value set: [Ascending, Descending]"
                )));
            }
        };
        if let Some(s) = q.get("sortBy").filter(|s| *s != "CreationTime") {
            return Err(validation(format!(
                "1 validation error detected: Value '{s}' at 'sortBy' failed to satisfy constraint: Member must satisfy enum value set: [CreationTime]"
            )));
        }
        // The token is the creation number of the last job of the page before.
        let resume = match q.get("nextToken") {
            None => None,
            Some(t) => Some(
                t.strip_prefix("sim-")
                    .and_then(|n| n.parse::<u64>().ok())
                    .ok_or_else(|| validation(format!("The nextToken '{t}' is not valid.")))?,
            ),
        };
        let mut inner = self.state()?;
        let mut order: Vec<usize> = (0..inner.batches.len())
            .filter(|&i| inner.batches[i].flavor == ProviderKind::Bedrock)
            .collect();
        for &i in &order {
            self.advance(&mut inner, i);
        }
        if !ascending {
            order.reverse();
        }
        let name = q.get("nameContains");
        let status = q.get("statusEquals");
        let matching: Vec<usize> = order
            .into_iter()
            .filter(|&i| {
                let b = &inner.batches[i];
                name.is_none_or(|n| b.display_name.as_deref().unwrap_or("").contains(n.as_str()))
                    && status.is_none_or(|s| status_name(b) == s)
                    && after.is_none_or(|t| b.started_ms > t)
                    && before.is_none_or(|t| b.started_ms < t)
                    && resume.is_none_or(|r| {
                        if ascending {
                            b.ordinal > r
                        } else {
                            b.ordinal < r
                        }
                    })
            })
            .collect();
        let base = self.base().to_string();
        let page: Vec<usize> = matching.iter().take(max).copied().collect();
        let next = (matching.len() > page.len())
            .then(|| {
                page.last()
                    .map(|&i| format!("sim-{}", inner.batches[i].ordinal))
            })
            .flatten();
        let items: Vec<Value> = page
            .iter()
            .map(|&i| self.view(&mut inner, i, &base))
            .collect();
        let v = job_list(items, next);
        Self::saved(&inner, v)
    }
}

/// Writes the input objects `sources` (key, content path), in order, into the job's input at
/// `dest`: the last segment of each key and the non-blank lines it held. One object is linked
/// rather than copied (its lines are not counted: the last object takes the rest).
fn copy_input(
    sources: &[(String, std::path::PathBuf)],
    dest: &std::path::Path,
) -> std::io::Result<Vec<(String, u64)>> {
    let segment = |key: &str| key.rsplit('/').next().unwrap_or(key).to_string();
    if let [(key, src)] = sources
        && std::fs::hard_link(src, dest).is_ok()
    {
        return Ok(vec![(segment(key), 0)]);
    }
    let mut w = std::io::BufWriter::new(crate::util::fs::create_private(dest)?);
    let mut parts = Vec::with_capacity(sources.len());
    for (key, src) in sources {
        let mut n = 0u64;
        for line in BufReader::new(std::fs::File::open(src)?).split(b'\n') {
            let line = line?;
            if !line.iter().all(u8::is_ascii_whitespace) {
                n += 1;
            }
            w.write_all(&line)?;
            w.write_all(b"\n")?;
        }
        parts.push((segment(key), n));
    }
    w.flush()?;
    Ok(parts)
}

// ------------------------------------------------------------------ requests and answers ------

/// Whether a `modelInput` is an Anthropic InvokeModel body (else it is a Converse body).
fn is_anthropic(body: &Value) -> bool {
    body.get("anthropic_version").is_some() || body.get("max_tokens").is_some()
}

/// The text of a `system` or message `content`: a string, or the `text` of its blocks.
fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// Reads a record's `modelInput` (or an online request's body) for `model`: the schema from
/// the end of its system text, prompt tokens counted as the planner counts them (system and
/// user text, no tools, no response format).
pub(super) fn neutral(body: &Value, model: Option<&str>) -> Neutral {
    let model = model.unwrap_or_default().to_string();
    let tok = Tokenizer::for_model(&model);
    let system = body.get("system").map(text_of);
    let messages: Vec<(String, String)> = body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|m| (str_at(m, "/role").to_string(), text_of(&m["content"])))
        .collect();
    let schema = system
        .as_deref()
        .and_then(|s| {
            s.rfind(SCHEMA_MARKER)
                .map(|i| &s[i + SCHEMA_MARKER.len()..])
        })
        .and_then(|s| serde_json::from_str::<Value>(s.trim()).ok())
        .filter(Value::is_object);
    let prompt = system
        .as_deref()
        .map(|s| ("system", s))
        .into_iter()
        .chain(messages.iter().map(|(r, c)| (r.as_str(), c.as_str())));
    let max_tokens = body
        .get("max_tokens")
        .or_else(|| body.pointer("/inferenceConfig/maxTokens"))
        .and_then(Value::as_u64)
        .unwrap_or(4096);
    Neutral {
        prompt_tokens: tok.chat_prompt_tokens(prompt, None),
        schema: schema.unwrap_or_else(default_schema),
        max_tokens,
        tokenizer: tok,
        model,
    }
}

/// A `modelOutput` (or a runtime response) answering `body`: an Anthropic message for an
/// Anthropic body, a Converse response otherwise. Input token counts leave out the tokens
/// read from or written to the cache, as both APIs do.
pub(super) fn answer_body(
    id: &str,
    model: &str,
    body: &Value,
    content: &str,
    truncated: bool,
    u: &Usage,
) -> Value {
    let uncached = u.input_tokens - u.cached_input_tokens - u.cache_write_tokens;
    if is_anthropic(body) {
        return json!({
            "id": format!("msg_bdrk_{id}"), "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": content}],
            "stop_reason": if truncated { "max_tokens" } else { "end_turn" },
            "stop_sequence": null,
            "usage": {
                "input_tokens": uncached,
                "output_tokens": u.output_tokens,
                "cache_read_input_tokens": u.cached_input_tokens,
                "cache_creation_input_tokens": u.cache_write_tokens,
            },
        });
    }
    let latency = 200 + u64::from_str_radix(id.get(..4).unwrap_or("0"), 16).unwrap_or(0) % 2000;
    json!({
        "output": {"message": {"role": "assistant", "content": [{"text": content}]}},
        "stopReason": if truncated { "max_tokens" } else { "end_turn" },
        "usage": {
            "inputTokens": uncached,
            "outputTokens": u.output_tokens,
            "totalTokens": u.input_tokens + u.output_tokens,
            "cacheReadInputTokens": u.cached_input_tokens,
            "cacheWriteInputTokens": u.cache_write_tokens,
        },
        "metrics": {"latencyMs": latency},
    })
}

/// One line of a job's `.out` object: the record, its `modelInput`, and its `modelOutput` or
/// its `error`.
pub(super) fn result_line(
    record_id: &str,
    id: &str,
    model: &str,
    body: &Value,
    reply: &Reply,
) -> Value {
    let mut line = json!({"recordId": record_id, "modelInput": body});
    match reply {
        Reply::Answer {
            content,
            truncated,
            usage,
        } => {
            line["modelOutput"] = answer_body(id, model, body, content, *truncated, usage);
        }
        Reply::Error => {
            line["error"] = json!({"errorCode": 500, "errorMessage": "Internal server error: the model could not process this record."});
        }
        // Never written: a record the job did not reach has no line.
        Reply::Expired | Reply::Cancelled => {
            line["error"] = json!({"errorCode": 408, "errorMessage": "The job ended before this record was processed."});
        }
    }
    line
}

/// The same line with its `errorCode` as a string (`"500"`), as some of Bedrock's output has
/// it.
pub(super) fn error_code_as_string(line: &mut Value) {
    if let Some(code) = line.pointer_mut("/error/errorCode")
        && let Some(n) = code.as_u64()
    {
        *code = json!(n.to_string());
    }
}

/// What is wrong with input line `n` beyond its `recordId`: a record needs a `modelInput`
/// object.
pub(super) fn line_errors(n: usize, v: &Value) -> Vec<(&'static str, String)> {
    if v.get("modelInput").is_some_and(Value::is_object) {
        return Vec::new();
    }
    vec![(
        "invalid_request",
        format!("Line {n} has no modelInput object."),
    )]
}

// ------------------------------------------------------------------ HTTP ----------------------

/// Bedrock's refusal of a call without a SigV4 signature scoped to service `bedrock` in the
/// simulator's region (the signature itself is not checked).
pub(super) fn refuse(h: &HeaderMap, region: &str) -> Option<Response> {
    let e = match sigv4_scope(h) {
        Ok(scope) if scope.service != "bedrock" => exception(
            "InvalidSignatureException",
            format!(
                "Credential should be scoped to correct service: 'bedrock', not '{}'.",
                scope.service
            ),
        ),
        Ok(scope) if scope.region != region => exception(
            "InvalidSignatureException",
            format!(
                "Credential should be scoped to a valid region: '{region}', not '{}'.",
                scope.region
            ),
        ),
        Ok(_) => return None,
        Err(SigV4Refusal::Missing) => exception(
            "UnrecognizedClientException",
            "Missing Authentication Token: the request has no Authorization header (AWS Signature Version 4).",
        ),
        Err(SigV4Refusal::Malformed(why)) => exception(
            "UnrecognizedClientException",
            format!("The security token included in the request is invalid: {why}."),
        ),
    };
    Some(e.into_flavored(ProviderKind::Bedrock))
}

/// Bedrock's routes: the control plane and the runtime.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/model-invocation-job", post(create_job))
        .route("/model-invocation-job/{id}", get(get_job))
        .route("/model-invocation-job/{id}/stop", post(stop_job))
        .route("/model-invocation-jobs", get(list_jobs))
        .route("/model/{model}/invoke", post(invoke))
        .route("/model/{model}/converse", post(converse))
}

fn read_json(body: &[u8]) -> Result<Value, SimError> {
    serde_json::from_slice(body)
        .map_err(|e| validation(format!("The request body is not valid JSON: {e}")))
}

async fn create_job(State(st): State<AppState>, body: bytes::Bytes) -> Response {
    let v = match read_json(&body) {
        Ok(v) => v,
        Err(e) => return e.into_flavored(ProviderKind::Bedrock),
    };
    let sim = st.sim.clone();
    match blocking(move || sim.create_bedrock_job(&v)).await {
        // The lost-create fault hits a job just made, never a replay of one.
        Ok((v, true)) => created(&st, v, ProviderKind::Bedrock),
        Ok((v, false)) => Json(v).into_response(),
        Err(e) => e.into_flavored(ProviderKind::Bedrock),
    }
}

async fn get_job(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    let sim = st.sim.clone();
    match blocking(move || sim.get_bedrock_job(&id)).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_flavored(ProviderKind::Bedrock),
    }
}

async fn stop_job(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    let sim = st.sim.clone();
    match blocking(move || sim.stop_bedrock_job(&id)).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_flavored(ProviderKind::Bedrock),
    }
}

async fn list_jobs(
    State(st): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let sim = st.sim.clone();
    match blocking(move || sim.list_bedrock_jobs(&q)).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_flavored(ProviderKind::Bedrock),
    }
}

async fn invoke(
    State(st): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    online(st, model, headers, body, false).await
}

async fn converse(
    State(st): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    online(st, model, headers, body, true).await
}

/// An online request: InvokeModel (any body the model takes) or Converse (a Converse body).
async fn online(
    st: AppState,
    model: String,
    headers: HeaderMap,
    body: bytes::Bytes,
    converse: bool,
) -> Response {
    let v = match read_json(&body) {
        Ok(v) => v,
        Err(e) => return e.into_flavored(ProviderKind::Bedrock),
    };
    if converse && is_anthropic(&v) {
        return validation("The Converse API takes a Converse request (messages with content blocks, inferenceConfig), not an InvokeModel body.")
            .into_flavored(ProviderKind::Bedrock);
    }
    if st
        .sim
        .prices
        .lookup(ProviderKind::Bedrock.as_str(), &model)
        .is_err()
    {
        return validation(format!(
            "The provided model identifier is invalid: {model}."
        ))
        .into_flavored(ProviderKind::Bedrock);
    }
    let cid = client_request_id(&headers);
    let sim = st.sim.clone();
    match blocking(move || sim.online_model(ProviderKind::Bedrock, &cid, &v, Some(&model))).await {
        Ok(r) if r.status == 200 => Json(r.body).into_response(),
        Ok(_) => exception("InternalServerException", "Internal server error")
            .into_flavored(ProviderKind::Bedrock),
        Err(e) => e.into_flavored(ProviderKind::Bedrock),
    }
}
