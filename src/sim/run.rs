//! Running a batch, provider-neutral: validating its input as the provider would, answering
//! the requests that got to run, writing its result files (a Bedrock job's: S3 objects, one
//! per input object, and its manifest) and saving it all with the bill in one journal line;
//! and answering an online request (docs/providers.md §7.1, §7.3). The lines themselves are
//! written by the provider's module, through `wire`.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::data::{Outcome, RecordedRequest, SimFile, Status};
use super::faults::draw;
use super::journal::Put;
use super::state::Inner;
use super::types::{OnlineReply, ProviderKind, Reply, SimError};
use super::wire;
use super::{Sim, answer};
use crate::cost::{PricingMode, Usage};
use crate::util::time::{now_ms, unix_now};

impl Sim {
    /// Checks the input file; the batch goes `in_progress` or `failed`.
    pub(super) fn validate(&self, inner: &mut Inner, idx: usize) {
        let flavor = inner.batches[idx].flavor;
        let path = self.content_path(&inner.batches[idx].input);
        let endpoint = inner.batches[idx].endpoint.clone();
        let url_model = inner.batches[idx].url_model.clone();
        let mut errors: Vec<Value> = Vec::new();
        let mut requests = Vec::new();
        let mut model: Option<String> = None;
        let mut seen = HashSet::new();
        let push = |errors: &mut Vec<Value>, code: &str, msg: String, line: Option<usize>| {
            if errors.len() < 20 {
                errors.push(json!({"code": code, "message": msg, "param": null, "line": line}));
            }
        };
        let limit = match flavor {
            ProviderKind::OpenAi | ProviderKind::Bedrock => 50_000,
            _ => 100_000,
        };
        match std::fs::File::open(&path) {
            Err(_) => push(
                &mut errors,
                "invalid_request",
                "input file unavailable".into(),
                None,
            ),
            Ok(f) => {
                for (i, line) in BufReader::new(f).split(b'\n').enumerate() {
                    let n = i + 1;
                    let Ok(line) = line else {
                        push(
                            &mut errors,
                            "invalid_request",
                            "unreadable input".into(),
                            None,
                        );
                        break;
                    };
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    if n == 1
                        && line.starts_with(&[0xEF, 0xBB, 0xBF])
                        && flavor == ProviderKind::Azure
                    {
                        push(&mut errors, "invalid_request", "Could not extract a valid deployment name from the input file (UTF-8 with BOM).".into(), Some(n));
                        continue;
                    }
                    let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                        push(
                            &mut errors,
                            "invalid_json_line",
                            format!("Line {n} is not valid JSON."),
                            Some(n),
                        );
                        continue;
                    };
                    let (cid, body) = wire::input_line(flavor, &v);
                    if cid.is_empty() {
                        push(
                            &mut errors,
                            "invalid_request",
                            format!("Line {n} has no {}.", wire::id_field(flavor)),
                            Some(n),
                        );
                        continue;
                    }
                    if !seen.insert(cid.clone()) {
                        push(
                            &mut errors,
                            "duplicate_custom_id",
                            format!("The custom_id '{cid}' appears more than once."),
                            Some(n),
                        );
                    }
                    for (code, msg) in wire::line_errors(flavor, n, &v, &endpoint) {
                        push(&mut errors, code, msg, Some(n));
                    }
                    let m = match flavor {
                        ProviderKind::Gemini | ProviderKind::Bedrock => {
                            url_model.clone().unwrap_or_default()
                        }
                        _ => body
                            .get("model")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    };
                    match &model {
                        None => {
                            if self.prices.lookup(flavor.as_str(), &m).is_err() {
                                push(
                                    &mut errors,
                                    "model_not_found",
                                    format!("The model '{m}' does not exist."),
                                    Some(n),
                                );
                            }
                            model = Some(m);
                        }
                        Some(first) if *first != m => push(
                            &mut errors,
                            "model_mismatch",
                            format!("Line {n} uses model '{m}', the batch uses '{first}'."),
                            Some(n),
                        ),
                        _ => {}
                    }
                    requests.push(RecordedRequest {
                        custom_id: cid,
                        body_sha256: hex::encode(Sha256::digest(body.to_string().as_bytes())),
                        outcome: Outcome::Pending,
                    });
                }
            }
        }
        let no_input_object = inner.batches[idx]
            .bedrock
            .as_ref()
            .filter(|j| j.parts.is_empty())
            .map(|j| j.input_config["s3InputDataConfig"]["s3Uri"].clone());
        if let Some(uri) = no_input_object {
            push(
                &mut errors,
                "invalid_request",
                format!("No .jsonl input object was found at {uri}."),
                None,
            );
        } else if requests.is_empty() && errors.is_empty() {
            push(
                &mut errors,
                "empty_file",
                "The input file is empty.".into(),
                None,
            );
        }
        let min = inner.batches[idx].settings.bedrock_min_records;
        if flavor == ProviderKind::Bedrock && !requests.is_empty() && (requests.len() as u64) < min
        {
            push(
                &mut errors,
                "too_few_records",
                format!(
                    "The job has {} records, fewer than the quota 'Minimum number of records per batch inference job' ({min}).",
                    requests.len()
                ),
                None,
            );
        }
        if requests.len() > limit {
            push(
                &mut errors,
                "too_many_tasks",
                if flavor == ProviderKind::Bedrock {
                    format!(
                        "The job has {} records, more than the quota 'Records per batch inference job' ({limit}).",
                        requests.len()
                    )
                } else {
                    format!(
                        "The batch has {} requests; the limit is {limit}.",
                        requests.len()
                    )
                },
                None,
            );
        }
        let b = &mut inner.batches[idx];
        b.model = model;
        if errors.is_empty() {
            b.counts = (requests.len() as u64, 0, 0);
            b.requests = requests;
            b.status = Status::InProgress;
            b.stamps.insert("in_progress_at".into(), unix_now());
        } else {
            for r in &mut requests {
                r.outcome = Outcome::NotRun;
            }
            b.requests = requests;
            b.errors = errors;
            b.status = Status::Failed;
            b.stamps.insert("failed_at".into(), unix_now());
        }
    }

    /// Runs the requests (those that got to run), writes the result files, and saves it all
    /// (result files, outcomes, bill) in one journal line, so a crash keeps all or nothing.
    /// The batch's own settings decide its faults, whatever this process runs with.
    pub(super) fn materialize(
        &self,
        inner: &mut Inner,
        idx: usize,
        status: Status,
        stamp: &'static str,
    ) {
        let b = &inner.batches[idx];
        let (flavor, input, batch_id, url_model, inline, ordinal) = (
            b.flavor,
            self.content_path(&b.input),
            b.id.clone(),
            b.url_model.clone(),
            b.inline,
            b.ordinal,
        );
        let s = b.settings.clone();
        // Bedrock: where each input object's lines end (the last object takes the rest).
        let part_ends: Vec<u64> = b
            .bedrock
            .iter()
            .flat_map(|j| &j.parts)
            .scan(0, |end, p| {
                *end += p.1;
                Some(*end)
            })
            .collect();
        // Gemini expiry, and a Bedrock job that expired without starting, have no results.
        let no_results =
            status == Status::Expired && (flavor == ProviderKind::Gemini || b.unstarted());
        // Cancelled before it was validated: the request list is read here, so the counts
        // still say how many requests the batch held.
        let unlisted = b.requests.is_empty();
        let mut listed = Vec::new();
        let total = b.requests.len();
        let done_fraction = if status == Status::Completed {
            1.0
        } else {
            inner.batches[idx].done_fraction
        };
        let done_n = ((total as f64) * done_fraction).floor() as usize;
        let mut out_lines: Vec<String> = Vec::new();
        let mut err_lines: Vec<String> = Vec::new();
        // Bedrock: the result lines of each input object.
        let mut part_lines: Vec<Vec<String>> = vec![Vec::new(); part_ends.len().max(1)];
        let mut usage_total = Usage::default();
        let mut bill = Vec::new();
        let mut outcomes = Vec::with_capacity(total);
        if let Ok(f) = std::fs::File::open(&input) {
            let mut i = 0usize;
            let mut nonblank = 0u64;
            for line in BufReader::new(f).split(b'\n').map_while(Result::ok) {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let part = part_ends
                    .iter()
                    .position(|&end| nonblank < end)
                    .unwrap_or(part_lines.len() - 1);
                nonblank += 1;
                let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                let (cid, body) = wire::input_line(flavor, &v);
                let body_hash: [u8; 32] = Sha256::digest(body.to_string().as_bytes()).into();
                if unlisted {
                    listed.push(RecordedRequest {
                        custom_id: cid.clone(),
                        body_sha256: hex::encode(body_hash),
                        outcome: Outcome::Pending,
                    });
                }
                let ran = i < done_n;
                i += 1;
                if no_results {
                    outcomes.push(Outcome::Expired);
                    continue;
                }
                let id = short(&cid);
                let n = wire::neutral(flavor, &body, url_model.as_deref());
                if !ran {
                    let (reply, outcome) = if status == Status::Cancelled {
                        (Reply::Cancelled, Outcome::Cancelled)
                    } else {
                        (Reply::Expired, Outcome::Expired)
                    };
                    if wire::writes_unrun_lines(flavor) {
                        err_lines.push(
                            wire::result_line(flavor, &cid, &id, &n.model, &body, &reply)
                                .to_string(),
                        );
                    }
                    outcomes.push(outcome);
                    continue;
                }
                // Faults are drawn on the body and how often it was answered, not on the
                // custom_id (which carries the run's batch id): the same from run to run.
                let key = inner.draw_key(&body_hash);
                if draw(s.seed, "missing", &key) < s.missing_line_rate {
                    outcomes.push(Outcome::Missing);
                    continue;
                }
                let (reply, outcome) = self.answer(&s, flavor, &key, &body_hash, &body, &n);
                if let Reply::Answer { usage, .. } = &reply {
                    usage_total.add(usage);
                    bill.push(self.bill(
                        flavor,
                        PricingMode::Batch,
                        &cid,
                        &batch_id,
                        &n.model,
                        usage,
                    ));
                }
                let mut line = wire::result_line(flavor, &cid, &id, &n.model, &body, &reply);
                wire::with_quirks(flavor, &mut line, draw(s.seed, "quirk", &key));
                let line = line.to_string();
                let twice = draw(s.seed, "duplicate", &key) < s.duplicate_line_rate;
                let lines = if flavor == ProviderKind::Bedrock {
                    &mut part_lines[part]
                } else if outcome == Outcome::Error
                    && matches!(flavor, ProviderKind::OpenAi | ProviderKind::Azure)
                {
                    &mut err_lines
                } else {
                    &mut out_lines
                };
                if twice {
                    lines.push(line.clone());
                }
                lines.push(line);
                outcomes.push(outcome);
            }
        }
        // Named after the batch's creation number, not its id: the same from run to run.
        let stray = short(&format!("{}:{ordinal}", s.seed));
        for n in 0..s.unknown_lines {
            let cid = format!("unknown-{stray}-{n}");
            let mut line =
                wire::result_line(flavor, &cid, &short(&cid), "", &Value::Null, &Reply::Error);
            wire::with_quirks(flavor, &mut line, draw(s.seed, "quirk", &cid));
            match flavor {
                ProviderKind::Bedrock => part_lines[0].push(line.to_string()),
                _ => err_lines.push(line.to_string()),
            }
        }
        let completed = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Ok | Outcome::InvalidJson))
            .count() as u64;
        let failed = outcomes.len() as u64 - completed;
        let seed = s.seed ^ 0x5eed;
        let mut objects = Vec::new();
        let (out_id, err_id, inline_output) = match flavor {
            ProviderKind::OpenAi | ProviderKind::Azure => {
                // Lines come back in no particular order.
                shuffle(&mut out_lines, seed);
                shuffle(&mut err_lines, seed.rotate_left(7));
                let out = (!out_lines.is_empty())
                    .then(|| self.write_output(inner, flavor, &batch_id, "output", &out_lines));
                // Azure gives even a clean batch an (empty) error file.
                let err = (!err_lines.is_empty() || flavor == ProviderKind::Azure)
                    .then(|| self.write_output(inner, flavor, &batch_id, "error", &err_lines));
                (out, err, None)
            }
            ProviderKind::Anthropic => {
                let mut all = out_lines;
                all.append(&mut err_lines);
                shuffle(&mut all, seed);
                (
                    Some(self.write_output(inner, flavor, &batch_id, "results", &all)),
                    None,
                    None,
                )
            }
            ProviderKind::Gemini | ProviderKind::Bedrock if no_results => (None, None, None),
            ProviderKind::Gemini => {
                // Input order (expired or cancelled lines, then stray ones, at the end).
                let mut all = out_lines;
                all.append(&mut err_lines);
                if inline {
                    (None, None, Some(wire::inline_items(&all)))
                } else {
                    (
                        Some(self.write_output(inner, flavor, &batch_id, "responses", &all)),
                        None,
                        None,
                    )
                }
            }
            ProviderKind::Bedrock => {
                // One `.out` object per input object, lines in no particular order, and the
                // manifest, under `{output URI}{job id}/`.
                let job = inner.batches[idx].bedrock.clone().unwrap_or_default();
                let job_id = batch_id.rsplit('/').next().unwrap_or(&batch_id);
                let dir = format!("{}{job_id}/", job.output_uri);
                for (k, (name, _)) in job.parts.iter().enumerate() {
                    let lines = &mut part_lines[k];
                    shuffle(lines, seed.rotate_left(k as u32));
                    objects.push(self.write_object(inner, format!("{dir}{name}.out"), lines));
                }
                let count = |o: &[Outcome]| outcomes.iter().filter(|x| o.contains(x)).count();
                let manifest = wire::bedrock_manifest(
                    outcomes.len(),
                    count(&[Outcome::Ok, Outcome::InvalidJson]),
                    count(&[Outcome::Error]),
                    &usage_total,
                );
                let manifest = [manifest.to_string()];
                objects.push(self.write_object(
                    inner,
                    format!("{dir}manifest.json.out"),
                    &manifest,
                ));
                (None, None, None)
            }
        };
        let b = &mut inner.batches[idx];
        if unlisted {
            b.requests = listed;
        }
        for (r, o) in b.requests.iter_mut().zip(outcomes) {
            r.outcome = o;
        }
        b.status = status;
        b.stamps.insert(stamp.into(), unix_now());
        b.output_file_id = out_id;
        b.error_file_id = err_id;
        b.inline_output = inline_output;
        if let Some(j) = &mut b.bedrock {
            j.outputs = objects;
        }
        if flavor == ProviderKind::Gemini && status == Status::Completed {
            b.output_lag = 1;
        }
        b.counts = (b.requests.len() as u64, completed, failed);
        b.usage = usage_total;
        let billed = bill.len();
        inner.bill.extend(bill);
        let b = &inner.batches[idx];
        let mut ops = Vec::with_capacity(billed + 5);
        let written = [&b.output_file_id, &b.error_file_id]
            .into_iter()
            .flatten()
            .chain(b.bedrock.iter().flat_map(|j| &j.outputs));
        for id in written {
            if let Some(f) = inner.files.get(id) {
                ops.push(Put::File(f));
            }
        }
        ops.push(Put::Batch(b));
        ops.push(Put::Requests {
            id: &b.id,
            requests: &b.requests,
        });
        if let Some(lines) = &b.inline_output {
            ops.push(Put::InlineOutput { id: &b.id, lines });
        }
        ops.extend(
            inner.bill[inner.bill.len() - billed..]
                .iter()
                .map(Put::Bill),
        );
        inner.log.write(inner.seq, &ops);
    }

    /// Writes `lines` (each followed by a newline) to a new content file, private to its
    /// owner: its name and size. A failed write breaks the state (every later call is
    /// refused) rather than leave a result file short.
    pub(super) fn write_lines(&self, inner: &mut Inner, lines: &[String]) -> (String, u64) {
        let (name, path) = self.new_content(inner);
        let mut bytes = 0u64;
        let written = crate::util::fs::create_private(&path).and_then(|f| {
            let mut w = std::io::BufWriter::new(f);
            for l in lines {
                w.write_all(l.as_bytes())?;
                w.write_all(b"\n")?;
                bytes += l.len() as u64 + 1;
            }
            w.flush()
        });
        if let Err(e) = written {
            inner.log.fail(format!(
                "the simulator could not write a result file {}: {e}",
                path.display()
            ));
        }
        (name, bytes)
    }

    fn write_output(
        &self,
        inner: &mut Inner,
        flavor: ProviderKind,
        batch_id: &str,
        kind: &str,
        lines: &[String],
    ) -> String {
        let (name, bytes) = self.write_lines(inner, lines);
        let id = match flavor {
            ProviderKind::Gemini => format!(
                "files/batch-{}-{kind}",
                batch_id.trim_start_matches("batches/")
            ),
            ProviderKind::Azure => self.next_id(inner, "azure-file"),
            _ => self.next_id(inner, "file"),
        };
        inner.files.insert(
            id.clone(),
            SimFile {
                id: id.clone(),
                filename: format!("{batch_id}_{kind}.jsonl"),
                purpose: "batch_output".into(),
                bytes,
                created_at: unix_now(),
                name,
            },
        );
        id
    }

    /// Answers a real-time request (`/v1/chat/completions`, `/v1/messages`), billed at
    /// standard prices and kept in the record under the client's request id.
    pub(crate) fn online(
        &self,
        flavor: ProviderKind,
        custom_id: &str,
        body: &Value,
    ) -> Result<OnlineReply, SimError> {
        self.online_model(flavor, custom_id, body, None)
    }

    /// The same, for a provider that names the model in the URL (Bedrock's
    /// `/model/{modelId}/invoke` and `/converse`).
    pub(crate) fn online_model(
        &self,
        flavor: ProviderKind,
        custom_id: &str,
        body: &Value,
        model: Option<&str>,
    ) -> Result<OnlineReply, SimError> {
        let n = wire::neutral(flavor, body, model);
        let body_hash: [u8; 32] = Sha256::digest(body.to_string().as_bytes()).into();
        let body_sha256 = hex::encode(body_hash);
        // Billed and named under the client's request id, or the body's hash without one.
        let key = if custom_id.is_empty() {
            body_sha256.clone()
        } else {
            custom_id.to_string()
        };
        let mut inner = self.state()?;
        // Drawn and counted under the lock, like a batch's requests: the count of earlier
        // answers to this body is the one the recorded entries give back on replay.
        let draw_key = inner.draw_key(&body_hash);
        let (reply, outcome) = self.answer(&self.settings, flavor, &draw_key, &body_hash, body, &n);
        let id = short(&key);
        let entry = json!({"custom_id": custom_id, "flavor": flavor, "at_ms": now_ms(),
            "prompt_tokens": n.prompt_tokens, "outcome": outcome,
            "body_sha256": body_sha256});
        let billed = match &reply {
            Reply::Answer { usage, .. } => Some(self.bill(
                flavor,
                PricingMode::Standard,
                &key,
                "online",
                &n.model,
                usage,
            )),
            _ => None,
        };
        let mut ops = vec![Put::Online(&entry)];
        ops.extend(billed.as_ref().map(Put::Bill));
        let seq = inner.seq;
        inner.log.write(seq, &ops);
        inner.online.push(entry);
        inner.bill.extend(billed);
        Self::saved(&inner, ())?;
        Ok(match &reply {
            Reply::Answer { .. } => OnlineReply {
                status: 200,
                body: wire::answer_body(flavor, &id, &n.model, body, &reply),
            },
            _ => OnlineReply {
                status: 500,
                body: wire::server_error(flavor),
            },
        })
    }
}

pub(super) fn short(cid: &str) -> String {
    hex::encode(&Sha256::digest(cid.as_bytes())[..8])
}

pub(super) fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut rng = answer::Rng::new(seed ^ v.len() as u64);
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}
