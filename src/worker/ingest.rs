//! Ingest: stream the source, render and hash each record on a blocking thread, and store
//! the records in chunks (one transaction each) as the async side receives them.

use tokio::sync::mpsc;

use super::{Event, RunContext, RunError};
use crate::cost::tokens::PromptCounter;
use crate::provider::BatchProvider;
use crate::request::{PreparedRecord, RequestShape, prepare};
use crate::source::{Quarantined, SourceError, SourceEvent, SourceReader};
use crate::store::{IngestTarget, Store};

/// Records per store transaction: large, because every transaction rewrites the pages of the
/// dedupe index it touched, and item keys are random.
const CHUNK: usize = 20_000;

#[derive(Default)]
struct Chunk {
    records: Vec<PreparedRecord>,
    quarantined: Vec<Quarantined>,
}

impl Chunk {
    fn len(&self) -> usize {
        self.records.len() + self.quarantined.len()
    }
}

pub(super) async fn ingest<S: Store, P: BatchProvider>(
    ctx: &RunContext<'_, S, P>,
    run_id: &str,
    shape: &RequestShape,
    shape_id: i64,
    counter: PromptCounter,
) -> Result<bool, RunError> {
    let p = ctx.pipeline;
    let reader = SourceReader::open(&p.source)?;
    let (tx, mut rx) = mpsc::channel::<Result<Chunk, SourceError>>(1);
    let template = p.prompt.user.clone();
    let shape = shape.clone();
    let producer = tokio::task::spawn_blocking(move || {
        let mut chunk = Chunk::default();
        let mut scratch = String::new();
        for ev in reader {
            match ev {
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
                        Ok(prepared) => chunk.records.push(prepared),
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
                    return;
                }
            }
            if chunk.len() >= CHUNK && tx.blocking_send(Ok(std::mem::take(&mut chunk))).is_err() {
                return;
            }
        }
        if chunk.len() > 0 {
            let _ = tx.blocking_send(Ok(chunk));
        }
    });

    let source = p.source.path.display().to_string();
    let (mut records, mut quarantined, mut new_items) = (0u64, 0u64, 0u64);
    let mut complete = true;
    while let Some(msg) = rx.recv().await {
        if ctx.shutdown.is_set() {
            complete = false;
            break;
        }
        let chunk = msg?;
        for q in &chunk.quarantined {
            ctx.observer.event(&Event::Quarantined {
                source: source.clone(),
                line: q.line,
                field: q.field.clone(),
                reason: q.reason.clone(),
            });
        }
        let stats = ctx
            .store
            .ingest(
                &IngestTarget {
                    run_id,
                    pipeline: &p.name,
                    stage: p.stage(),
                    shape_id,
                    source: &source,
                },
                &chunk.records,
                &chunk.quarantined,
            )
            .await?;
        crate::failpoint!("ingest.after_chunk");
        records += stats.records;
        quarantined += stats.quarantined;
        new_items += stats.new_items;
        ctx.observer.event(&Event::IngestProgress {
            records: records + quarantined,
            quarantined,
        });
    }
    drop(rx);
    let _ = producer.await;
    ctx.store
        .set_run_counts(run_id, records + quarantined, quarantined)
        .await?;
    ctx.observer.event(&Event::IngestDone {
        records: records + quarantined,
        quarantined,
        new_items,
    });
    Ok(complete)
}
