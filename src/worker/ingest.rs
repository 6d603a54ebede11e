//! Ingest: stream the source, render and hash each record on a blocking thread, and store
//! the records in chunks (one transaction each) that the async side fills with the smaller
//! hand-offs as it receives them.

use tokio::sync::mpsc;

use super::stages::StageRun;
use super::{Event, RunContext, RunError};
use crate::plan::{LaterScan, LaterScanner};
use crate::provider::BatchProvider;
use crate::request::{PreparedRecord, prepare};
use crate::source::{Quarantined, SourceError, SourceEvent, SourceReader};
use crate::store::{IngestStats, IngestTarget, IngestTx, Store};
use crate::util::text::compact_json;

/// Records per store transaction: large, because item keys are random, so every transaction
/// rewrites (and checkpoints) nearly every page of the dedupe index once the index outgrows
/// the page cache. At a million records (`run --ingest-only`), 250,000 a transaction cost
/// 15 % less CPU and 23 % less wall time than 20,000, and 100,000 within 1 % of 250,000. The
/// hand-offs go into the open transaction as they arrive, so a transaction's worth is never
/// held in memory; an interrupted run reads the uncommitted part again.
const CHUNK: usize = 100_000;
/// Records per hand-off from the reading thread, and per call to the store, which writes a
/// call's keys to the dedupe index in key order: the larger the hand-off, the more keys share
/// each page the index writes. What is in flight (one hand-off being stored, the next being
/// filled) stays a fraction of a transaction's worth. At a million records (`run
/// --ingest-only`): 22.5–23 s with 2,000 a hand-off and keys in the order read, 12.8–14.2 s
/// with 10,000 in key order; 20,000 gave no more and held 15 MB more.
const HANDOFF: usize = 10_000;
/// A hand-off also ends at this much text: a multi-stage pipeline's records carry their
/// fields beside their prompts (twice the bytes), and many chunks make a record large.
const HANDOFF_BYTES: usize = 6 << 20;

/// One hand-off from the reading thread.
#[derive(Default)]
struct Chunk {
    records: Vec<PreparedRecord>,
    quarantined: Vec<Quarantined>,
    /// The text the records hold (prompts, and fields kept for later stages).
    bytes: usize,
}

impl Chunk {
    fn len(&self) -> usize {
        self.records.len() + self.quarantined.len()
    }

    fn push(&mut self, r: PreparedRecord) {
        self.bytes += r.record_id.len()
            + r.user_json.len()
            + r.data.as_ref().map_or(0, String::len)
            + r.more.iter().map(|m| m.user_json.len()).sum::<usize>();
        self.records.push(r);
    }

    /// Whether it is a hand-off's worth.
    fn full(&self) -> bool {
        self.len() >= HANDOFF || self.bytes >= HANDOFF_BYTES
    }
}

/// What [`ingest`] did: whether it read the whole source (else the open transaction rolled
/// back and the run stops), and, for a multi-stage pipeline read whole, what the later
/// stages' scan of the records it stored found (the worksheet's figures, counted while
/// each record was at hand rather than read back from the store).
pub(super) struct Ingested {
    pub(super) complete: bool,
    pub(super) later: Option<Vec<LaterScan>>,
}

pub(super) async fn ingest<S: Store, P: BatchProvider>(
    ctx: &RunContext<'_, S, P>,
    run_id: &str,
    first: &StageRun,
    shape_id: i64,
) -> Result<Ingested, RunError> {
    let p = ctx.pipeline;
    let reader = SourceReader::open(&p.source)?;
    let (tx, mut rx) = mpsc::channel::<Result<Chunk, SourceError>>(1);
    // The store says when it has taken a hand-off: the reading thread fills the next one only
    // then, so two are held at most (one being stored, one being filled or waiting).
    let (taken_tx, taken) = std::sync::mpsc::channel::<()>();
    let template = first.stage.prompt.user.clone();
    let shape = first.shape.clone();
    let counter = first.counter;
    // A multi-stage pipeline keeps the record fields its later stages read and links each
    // record to all its items.
    let multi = p.is_multi_stage().then(|| first.renderer());
    let kept = kept_fields(p);
    // A one-stage pipeline keeps them only for the results file (`output.include_source`).
    let keep_fields = p.output.include_source;
    // The later stages' scan, over the records stored (those the first stage rendered).
    let mut scanner = p.is_multi_stage().then(|| LaterScanner::new(p));
    let producer = tokio::task::spawn_blocking(move || {
        let mut chunk = Chunk::default();
        let mut scratch = String::new();
        for ev in reader {
            match ev {
                Ok(SourceEvent::Record(r)) if multi.is_some() => {
                    let renderer = multi.as_ref().expect("checked");
                    match renderer.render(&r.value, &mut scratch) {
                        Ok(items) => {
                            if let Some(s) = scanner.as_mut() {
                                s.observe(&r.id, &r.value);
                            }
                            let mut items = items.into_iter();
                            let first = items.next().expect("at least one item");
                            chunk.push(PreparedRecord {
                                line: r.line,
                                record_id: r.id,
                                key: first.key,
                                input_tokens: first.input_tokens,
                                user_json: first.user_json,
                                body_bytes: first.body_bytes,
                                data: Some(fields_of(&r.value, kept.as_deref())),
                                more: items.collect(),
                            });
                        }
                        Err(e) => chunk.quarantined.push(Quarantined {
                            line: r.line,
                            field: e.field,
                            reason: e.reason,
                        }),
                    }
                }
                Ok(SourceEvent::Record(r)) => {
                    match prepare(
                        &shape,
                        &template,
                        Some(&counter),
                        r.line,
                        r.id,
                        &r.value,
                        &mut scratch,
                    ) {
                        Ok(mut prepared) => {
                            if keep_fields {
                                prepared.data = Some(compact_json(&r.value));
                            }
                            chunk.push(prepared)
                        }
                        Err(e) => {
                            chunk.quarantined.push(Quarantined {
                                line: r.line,
                                field: e.field().map(str::to_string),
                                reason: e.to_string(),
                            });
                        }
                    }
                }
                Ok(SourceEvent::Quarantined(q)) => chunk.quarantined.push(q),
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return None;
                }
            }
            if chunk.full()
                && (tx.blocking_send(Ok(std::mem::take(&mut chunk))).is_err()
                    || taken.recv().is_err())
            {
                return None;
            }
        }
        if chunk.len() > 0 && tx.blocking_send(Ok(chunk)).is_err() {
            return None;
        }
        scanner.map(LaterScanner::finish)
    });

    let source = p.source.path.display().to_string();
    let target = IngestTarget {
        run_id,
        pipeline: &p.name,
        stage: &first.stage.name,
        shape_id,
        source: &source,
        links: p.is_multi_stage(),
    };
    let mut done = IngestStats::default();
    let mut complete = true;
    // The open transaction and what it will have stored once committed.
    let mut open: Option<(S::Ingest, IngestStats)> = None;
    loop {
        let msg = rx.recv().await;
        if ctx.shutdown.is_set() {
            // The open transaction rolls back: the next run reads those lines again.
            complete = false;
            break;
        }
        let Some(msg) = msg else { break };
        let _ = taken_tx.send(());
        let part = msg?;
        for q in &part.quarantined {
            ctx.observer.event(&Event::Quarantined {
                source: source.clone(),
                line: q.line,
                field: q.field.clone(),
                reason: q.reason.clone(),
            });
        }
        let (tx, stats) = match &mut open {
            Some(o) => o,
            None => open.insert((ctx.store.begin_ingest().await?, IngestStats::default())),
        };
        let added = tx.add(&target, &part.records, &part.quarantined).await?;
        drop(part);
        stats.records += added.records;
        stats.quarantined += added.quarantined;
        stats.new_items += added.new_items;
        // What has been read so far, the open transaction's included (a commit is far
        // apart at this size).
        ctx.observer.event(&Event::IngestProgress {
            records: done.records + done.quarantined + stats.records + stats.quarantined,
            quarantined: done.quarantined + stats.quarantined,
        });
        if stats.records + stats.quarantined >= CHUNK as u64 {
            let (tx, stats) = open.take().expect("open");
            commit::<S>(tx, &stats, &mut done).await?;
        }
    }
    drop(rx);
    drop(taken_tx);
    // The reading thread has ended (its channel closed) or ends now that nothing listens. A
    // panic there closed the channel as the end of the source would: the last transaction
    // is not committed and the panic goes on.
    let later = match producer.await {
        Ok(later) => later.filter(|_| complete),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => {
            complete = false;
            None
        }
    };
    if complete && let Some((tx, stats)) = open.take() {
        commit::<S>(tx, &stats, &mut done).await?;
    }
    ctx.store
        .set_run_counts(run_id, done.records + done.quarantined, done.quarantined)
        .await?;
    ctx.observer.event(&Event::IngestDone {
        records: done.records + done.quarantined,
        quarantined: done.quarantined,
        new_items: done.new_items,
    });
    Ok(Ingested { complete, later })
}

/// Commits a chunk's transaction, then adds what it stored to `done`.
async fn commit<S: Store>(
    tx: S::Ingest,
    chunk: &IngestStats,
    done: &mut IngestStats,
) -> Result<(), RunError> {
    tx.commit().await?;
    crate::failpoint!("ingest.after_chunk");
    done.records += chunk.records;
    done.quarantined += chunk.quarantined;
    done.new_items += chunk.new_items;
    Ok(())
}

/// The record fields a multi-stage pipeline keeps for its later stages, by name: those their
/// prompts and `when` conditions use, and a chunk stage's split field. A template sees only
/// the fields it names (`Template::render_into` converts those alone), so a later stage
/// renders the same from these as from the whole record. `None` keeps the whole record: the
/// results file carries it (`output.include_source`). Every record's fields are stored at
/// ingest and read back to render its later stages: 71 MB of a 392 MB store at 100,000
/// compare records through two stages, 66 MB now (their review reads most of each record,
/// its specs); a record with fields no later stage reads keeps less.
fn kept_fields(p: &crate::config::Pipeline) -> Option<Vec<String>> {
    if p.output.include_source {
        return None;
    }
    let mut keep: Vec<String> = Vec::new();
    for s in p.stages.iter().skip(1) {
        let fields = s.prompt.user.fields().map(|(f, _)| f);
        let when = s.when.iter().flat_map(|w| w.fields().map(|(f, _)| f));
        let split = match &s.for_each {
            crate::config::ForEach::Chunk(split) => Some(split.field.as_str()),
            crate::config::ForEach::Record => None,
        };
        // A needed stage's name is its answer (it replaces a field of that name), and the
        // chunk being rendered is not a field.
        keep.extend(
            fields
                .chain(when)
                .filter(|f| *f != crate::config::CHUNK_VAR && !s.needs.iter().any(|n| n == f))
                .chain(split)
                .map(str::to_string),
        );
    }
    keep.sort();
    keep.dedup();
    Some(keep)
}

/// A record's fields as stored for the later stages: the whole record, or the `keep` fields
/// (sorted) it has, in its own order.
fn fields_of(record: &serde_json::Value, keep: Option<&[String]>) -> String {
    struct Kept<'a>(&'a serde_json::Map<String, serde_json::Value>, &'a [String]);
    impl serde::Serialize for Kept<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_map(
                self.0
                    .iter()
                    .filter(|(k, _)| self.1.binary_search(k).is_ok()),
            )
        }
    }
    match (keep, record) {
        (Some(keep), serde_json::Value::Object(m)) => {
            serde_json::to_string(&Kept(m, keep)).expect("JSON values always serialize")
        }
        _ => compact_json(record),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PIPELINE: &str = r#"
name = "t"
[source]
kind = "jsonl"
path = "in.jsonl"
id_field = "id"
[provider]
kind = "openai"
model = "gpt-5.4-mini"
simulate = true
[output]
path = "out.jsonl"
[[stage]]
name = "main"
schema = "s.json"
prompt.user = "{{title}}: {{body}}"
prompt.max_output_tokens = 100
[[stage]]
name = "review"
needs = ["main"]
when = "main.score < 3 or tier == 'gold'"
schema = "r.json"
prompt.user = "{{title}} ({{extra?}}) {% for t in tags %}{{ t }} {% endfor %}{{ main }}"
prompt.max_output_tokens = 100
"#;

    /// A later stage renders the same from the fields kept as from the whole record, and the
    /// fields no later stage reads are not kept; with `include_source` the record is kept whole.
    #[test]
    fn a_record_keeps_the_fields_its_later_stages_read() {
        let p =
            crate::config::Pipeline::from_str(PIPELINE, std::path::Path::new("/t/p.toml")).unwrap();
        let keep = kept_fields(&p).unwrap();
        assert_eq!(keep, ["extra", "tags", "tier", "title"]);
        let record = json!({"id": "r1", "title": "Lamp", "body": "x".repeat(500),
            "tier": "gold", "tags": ["a", "b"], "extra": null, "other": {"n": 1}});
        let kept = fields_of(&record, Some(&keep));
        assert_eq!(
            kept,
            r#"{"extra":null,"tags":["a","b"],"tier":"gold","title":"Lamp"}"#
        );
        let review = p.stage("review").unwrap();
        let with_main = |fields: &str| {
            let mut v: serde_json::Value = serde_json::from_str(fields).unwrap();
            v["main"] = json!({"score": 2});
            v
        };
        let whole = with_main(&compact_json(&record));
        let from_kept = with_main(&kept);
        assert_eq!(
            review.prompt.user.render(&from_kept).unwrap(),
            review.prompt.user.render(&whole).unwrap()
        );
        let when = review.when.as_ref().unwrap();
        assert_eq!(when.render(&from_kept).unwrap(), "true");
        assert_eq!(
            when.render(&from_kept).unwrap(),
            when.render(&whole).unwrap()
        );

        let mut with_source = p.clone();
        with_source.output.include_source = true;
        assert_eq!(kept_fields(&with_source), None);
        assert_eq!(fields_of(&record, None), compact_json(&record));
    }
}
