//! Apply: read a downloaded result file line by line (capped), judge each line — validate
//! the answer, price its usage — and store the verdicts in chunks. Lines that cannot be
//! matched to an attempt of this batch (unknown or repeated custom_ids, unparseable lines)
//! are recorded as anomalies and never applied.

use std::collections::{HashMap, HashSet};
use std::io::BufReader;
use std::path::Path;

use super::{RunError, Runner};
use crate::cost::{PricingMode, Rates, Usage};
use crate::provider::{BatchProvider, LineOutcome, ResultLine};
use crate::source::read_line_capped;
use crate::store::{ApplyStats, AttemptOutcome, AttemptRef, AttemptVerdict, BatchRow, Store};
use crate::util::text::preview;
use crate::validate::{OutputValidator, Verdict};

/// Result lines per store transaction.
const APPLY_CHUNK: usize = 1000;
/// The longest result line read; longer ones are refused (docs/reliability.md §B7.5).
pub const MAX_RESULT_LINE: usize = 16 << 20;

/// Judges one result line for `attempt`: validates the answer and prices the usage.
pub fn judge_line(
    validator: &OutputValidator,
    rates: &Rates,
    standard: &Rates,
    attempt: &AttemptRef,
    outcome: LineOutcome,
) -> AttemptOutcome {
    let mut out = AttemptOutcome {
        attempt_id: attempt.id,
        item_id: attempt.item_id,
        attempt_no: attempt.attempt_no,
        custom_id: attempt.custom_id.clone(),
        succeeded: false,
        // Set below for every outcome.
        verdict: AttemptVerdict::Missing,
        error: None,
        finish_reason: None,
        model: None,
        result: None,
        usage: Usage::default(),
        cost: Default::default(),
        standard_cost: Default::default(),
    };
    match outcome {
        LineOutcome::Answer {
            content,
            refusal,
            finish_reason,
            model,
            usage,
        } => {
            let verdict = validator.check(
                content.as_deref(),
                finish_reason.as_deref(),
                refusal.as_deref(),
            );
            out.verdict = verdict.code();
            out.error = verdict.detail();
            if let Verdict::Valid(v) = verdict {
                out.succeeded = true;
                out.result = Some(crate::util::text::compact_json(&v));
            } else if out.error.is_none() {
                out.error = Some(match verdict {
                    Verdict::Truncated => "the answer was cut off at max_output_tokens".into(),
                    _ => "the answer was empty".into(),
                });
            }
            out.finish_reason = finish_reason;
            out.model = model;
            out.usage = usage;
        }
        LineOutcome::Error {
            status,
            code,
            message,
            usage,
        } => {
            out.verdict = AttemptVerdict::ProviderError;
            let mut e = String::new();
            if let Some(s) = status {
                e.push_str(&format!("HTTP {s} "));
            }
            if let Some(c) = code {
                e.push_str(&c);
                e.push_str(": ");
            }
            e.push_str(&preview(&message, 300));
            out.error = Some(e);
            out.usage = usage;
        }
        LineOutcome::Expired => {
            out.verdict = AttemptVerdict::Expired;
            out.error = Some("the batch expired before this request ran".into());
        }
        LineOutcome::Cancelled => {
            out.verdict = AttemptVerdict::Cancelled;
            out.error = Some("the batch was cancelled before this request ran".into());
        }
    }
    out.cost = rates.cost(&out.usage);
    out.standard_cost = standard.cost(&out.usage);
    out
}

fn is_our_custom_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Finds the `custom_id` string in a result line without parsing the whole line.
fn scan_custom_id(line: &[u8]) -> Option<&str> {
    const KEY: &[u8] = b"\"custom_id\"";
    let at = line.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let rest = &line[at..];
    let colon = rest.iter().position(|&c| !c.is_ascii_whitespace())?;
    if rest[colon] != b':' {
        return None;
    }
    let rest = &rest[colon + 1..];
    let q = rest.iter().position(|&c| !c.is_ascii_whitespace())?;
    if rest[q] != b'"' {
        return None;
    }
    let rest = &rest[q + 1..];
    let end = rest.iter().position(|&c| c == b'"' || c == b'\\')?;
    if rest[end] != b'"' {
        return None;
    }
    std::str::from_utf8(&rest[..end]).ok()
}

/// Lines judged between two chances for the chunk being written to move on.
const JUDGE_YIELD: usize = 32;

/// Why a result line is not applied: the anomaly's kind, the line's custom id (when it has
/// one of ours) and the detail recorded.
type Refused = (&'static str, Option<String>, String);

/// Matches one result line to its attempt and judges it with `judge`, or says why it
/// cannot be applied.
fn judge_ref<'c, P: BatchProvider>(
    line: &[u8],
    line_no: u64,
    path: &Path,
    provider: &P,
    attempts: &HashMap<&str, &'c AttemptRef>,
    seen: &mut HashSet<i64>,
    judge: impl FnOnce(&'c AttemptRef, LineOutcome) -> AttemptOutcome,
) -> Result<AttemptOutcome, Refused> {
    match provider.parse_result_line(line) {
        Err(e) => Err((
            "malformed_line",
            None,
            format!("{}:{line_no}: {}", path.display(), preview(&e, 200)),
        )),
        Ok(ResultLine { custom_id, outcome }) => {
            if !is_our_custom_id(&custom_id) {
                Err((
                    "unknown_custom_id",
                    None,
                    format!("{}:{line_no}: custom_id is not one of ours", path.display()),
                ))
            } else if let Some(&att) = attempts.get(custom_id.as_str()) {
                if seen.insert(att.id) {
                    Ok(judge(att, outcome))
                } else {
                    Err((
                        "duplicate_line",
                        Some(custom_id),
                        format!(
                            "{}:{line_no}: second result for this custom_id ignored",
                            path.display()
                        ),
                    ))
                }
            } else {
                Err((
                    "unknown_custom_id",
                    Some(custom_id),
                    format!("{}:{line_no}: not a request of this batch", path.display()),
                ))
            }
        }
    }
}

/// Where a result line sits in the downloaded file.
struct LineRef {
    /// The attempt it answers, or `i64::MAX` when it cannot be matched cheaply.
    attempt_id: i64,
    line_no: u64,
    offset: u64,
    len: u64,
}

/// Applies one downloaded result file.
///
/// Lines come back in any order; applied in that order, every chunk would touch pages all over
/// the batch's rows, and SQLite would write most of the batch's pages once per chunk. So a
/// first pass notes each line's offset and attempt, and the second pass reads the lines back
/// in attempt order: each chunk then writes a contiguous run of rows.
pub(super) async fn apply_file<S: Store, P: BatchProvider>(
    runner: &mut Runner<'_, S, P>,
    b: &BatchRow,
    path: &Path,
    seen: &mut HashSet<i64>,
) -> Result<ApplyStats, RunError> {
    let ctx = runner.ctx;
    let store = ctx.store;
    let io_err = |source| RunError::Output {
        path: path.to_path_buf(),
        source,
    };
    // Up to a batch's size (50,000 at OpenAI) of each: the map borrows its keys from the
    // list, and `seen` holds attempt ids, not custom id strings (~10 MB less at that size).
    let list = store.batch_attempts(&b.id).await?;
    let attempts: HashMap<&str, &AttemptRef> =
        list.iter().map(|a| (a.custom_id.as_str(), a)).collect();
    let stage = runner.stage_run(&b.stage)?;
    let rates = *stage.rates(b.pricing_mode());
    let standard = *stage.rates(PricingMode::Standard);
    let max_attempts = stage.stage.max_attempts;

    // Pass 1: where is each line, and which attempt does it answer?
    let file = std::fs::File::open(path).map_err(io_err)?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::new();
    let mut refs: Vec<LineRef> = Vec::new();
    let (mut offset, mut line_no) = (0u64, 0u64);
    while let Some(n) = read_line_capped(&mut reader, &mut buf, MAX_RESULT_LINE).map_err(io_err)? {
        line_no += 1;
        let start = offset;
        offset += n as u64 + 1;
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let attempt_id = scan_custom_id(&buf)
            .and_then(|c| attempts.get(c))
            .map(|a| a.id)
            .unwrap_or(i64::MAX);
        refs.push(LineRef {
            attempt_id,
            line_no,
            offset: start,
            len: n as u64,
        });
    }
    refs.sort_by_key(|r| (r.attempt_id, r.line_no));

    // Pass 2: judge and apply in attempt order, a chunk of lines at a time. A chunk's
    // verdicts are written while the next chunk is judged: the writes run on the store's
    // own thread, the judging (parse, validate, price) on this one, so on two cores the
    // two overlap. The judging yields every few lines to let the writes move on.
    let mut file = reader.into_inner();
    let mut stats = ApplyStats::default();
    let mut writing: Vec<AttemptOutcome> = Vec::new();
    let mut judged: Vec<AttemptOutcome> = Vec::with_capacity(APPLY_CHUNK);
    let mut groups = refs.chunks(APPLY_CHUNK);
    loop {
        let group = groups.next();
        if group.is_none() && writing.is_empty() {
            break;
        }
        let write = async {
            if writing.is_empty() {
                return Ok(None);
            }
            store
                .apply_results(b, &writing, max_attempts)
                .await
                .map(Some)
        };
        let judge = async {
            for (n, r) in group.unwrap_or_default().iter().enumerate() {
                if n % JUDGE_YIELD == JUDGE_YIELD - 1 {
                    tokio::task::yield_now().await;
                }
                let line_no = r.line_no;
                let outcome: Result<AttemptOutcome, Refused> = if r.len as usize > MAX_RESULT_LINE {
                    Err((
                        "oversized_line",
                        None,
                        format!(
                            "{}:{line_no}: line of {} bytes refused",
                            path.display(),
                            r.len
                        ),
                    ))
                } else {
                    buf.resize(r.len as usize, 0);
                    crate::util::fs::read_exact_at(&mut file, &mut buf, r.offset)
                        .map_err(io_err)?;
                    judge_ref(
                        &buf,
                        line_no,
                        path,
                        ctx.provider,
                        &attempts,
                        seen,
                        |att, outcome| {
                            judge_line(&stage.validator, &rates, &standard, att, outcome)
                        },
                    )
                };
                match outcome {
                    Ok(o) => judged.push(o),
                    Err((kind, cid, detail)) => {
                        tracing::warn!(batch = %b.id, kind, %detail, "result line not applied");
                        store
                            .record_anomaly(
                                Some(&b.run_id),
                                Some(&b.id),
                                kind,
                                cid.as_deref(),
                                &detail,
                            )
                            .await?;
                    }
                }
            }
            Ok::<_, RunError>(())
        };
        let (written, judging) = tokio::join!(write, judge);
        if let Some(s) = written? {
            stats += s;
            crate::failpoint!("apply.after_chunk");
        }
        judging?;
        writing.clear();
        std::mem::swap(&mut writing, &mut judged);
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversized_result_line_is_measured_without_being_held() {
        // A 20 MB line then a normal one: the reader keeps at most the cap plus one byte,
        // reports the true length (so the line is refused as oversized) and goes on.
        let cap = 1 << 20;
        let mut file = vec![b'x'; 20 << 20];
        file.extend_from_slice(b"\n{\"custom_id\":\"b1-2-1\"}\n");
        let mut reader = std::io::BufReader::with_capacity(64 << 10, &file[..]);
        let mut buf = Vec::new();
        assert_eq!(
            read_line_capped(&mut reader, &mut buf, cap).unwrap(),
            Some(20 << 20)
        );
        assert!(buf.len() <= cap + 1, "{} bytes held", buf.len());
        read_line_capped(&mut reader, &mut buf, cap).unwrap();
        assert_eq!(scan_custom_id(&buf), Some("b1-2-1"));
        assert_eq!(read_line_capped(&mut reader, &mut buf, cap).unwrap(), None);
    }

    #[test]
    fn custom_ids_are_found_without_a_full_parse() {
        assert_eq!(
            scan_custom_id(br#"{"id":"x","custom_id":"b1-2-3","response":{}}"#),
            Some("b1-2-3")
        );
        assert_eq!(scan_custom_id(br#"{"custom_id" : "abc" }"#), Some("abc"));
        assert_eq!(scan_custom_id(br#"{"custom_id":"a\"b"}"#), None);
        assert_eq!(scan_custom_id(br#"{"id":"x"}"#), None);
    }
}
