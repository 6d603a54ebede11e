//! Progress for people: plain lines on stderr when it is not a terminal, a spinner and one
//! bar when it is. Both are observers of the runner's typed events.

use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::util::text;
use crate::worker::{Event, Observer};

/// Plain progress lines on stderr (not a terminal).
pub(crate) struct LineObserver;

impl Observer for LineObserver {
    fn event(&self, e: &Event) {
        match e {
            Event::IngestDone {
                records,
                quarantined,
                new_items,
            } => eprintln!(
                "read {}, {} quarantined, {}",
                text::plural(*records, "record", "records"),
                text::n(*quarantined),
                text::plural(*new_items, "new item", "new items")
            ),
            Event::Submitted {
                batch_id,
                provider_batch_id,
                requests,
            } => eprintln!(
                "submitted batch {batch_id} as {} ({})",
                text::printable(provider_batch_id),
                text::plural(*requests, "request", "requests")
            ),
            Event::Adopted {
                batch_id,
                provider_batch_id,
            } => eprintln!(
                "adopted batch {batch_id}: the provider already had it as {}",
                text::printable(provider_batch_id)
            ),
            Event::Ingested {
                batch_id,
                stats,
                cost,
                ..
            } => eprintln!(
                "collected batch {batch_id}: {} succeeded, {} to retry, {} failed for good ({})",
                stats.succeeded,
                stats.failed,
                stats.exhausted,
                cost.display_rounded(6)
            ),
            Event::Note(n) => eprintln!("{n}"),
            Event::Quarantined { .. } => eprintln!("{}", quarantine_line(e)),
            _ => {}
        }
    }
}

pub(crate) fn quarantine_line(e: &Event) -> String {
    match e {
        Event::Quarantined {
            source,
            line,
            field,
            reason,
        } => format!(
            "quarantined {}:{line}{}: {}",
            text::printable(source),
            field
                .as_ref()
                .map(|f| format!(" (field `{}`)", text::printable(f)))
                .unwrap_or_default(),
            text::printable(reason)
        ),
        _ => String::new(),
    }
}

/// Progress on a terminal: a spinner while the source is read, then one bar for the whole
/// run (items final out of items to carry, elapsed, ETA, cost so far, retries).
pub(crate) struct BarObserver {
    pub(crate) multi: MultiProgress,
    pub(crate) ingest: ProgressBar,
    pub(crate) bar: ProgressBar,
    pub(crate) state: Mutex<BarState>,
}

#[derive(Default)]
pub(crate) struct BarState {
    /// Items final (succeeded or failed for good).
    pub(crate) done: u64,
    pub(crate) retries: u64,
    pub(crate) cost: crate::cost::Usd,
    /// What the provider reports done in each batch still in flight.
    pub(crate) in_flight: std::collections::HashMap<String, u64>,
}

impl BarObserver {
    pub(crate) fn new() -> Self {
        let multi = MultiProgress::new();
        let ingest = multi.add(ProgressBar::new_spinner());
        ingest.set_style(
            ProgressStyle::with_template("{spinner} reading source: {msg}")
                .expect("valid template"),
        );
        ingest.enable_steady_tick(Duration::from_millis(120));
        let bar = multi.add(ProgressBar::hidden());
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} items  {elapsed_precise} (eta {eta})  {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        BarObserver {
            multi,
            ingest,
            bar,
            state: Mutex::new(BarState::default()),
        }
    }

    pub(crate) fn refresh(&self, st: &BarState) {
        let running: u64 = st.in_flight.values().sum();
        self.bar.set_position(st.done + running);
        self.bar.set_message(format!(
            "{} so far · {}",
            st.cost.display_rounded(4),
            text::plural(st.retries, "retry", "retries")
        ));
    }
}

impl Observer for BarObserver {
    fn event(&self, e: &Event) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match e {
            Event::IngestProgress {
                records,
                quarantined,
            } => self.ingest.set_message(format!(
                "{} records, {} quarantined",
                text::n(*records),
                text::n(*quarantined)
            )),
            Event::IngestDone {
                records,
                quarantined,
                new_items,
            } => self.ingest.finish_with_message(format!(
                "{} records, {} quarantined, {} new items",
                text::n(*records),
                text::n(*quarantined),
                text::n(*new_items)
            )),
            Event::Work { items } => {
                self.bar.set_length(*items);
                self.bar
                    .set_draw_target(indicatif::ProgressDrawTarget::stderr());
                self.bar.reset_elapsed();
                self.bar.enable_steady_tick(Duration::from_millis(250));
                self.refresh(&st);
            }
            Event::Polled {
                batch_id,
                completed,
                failed,
                ..
            } => {
                st.in_flight.insert(batch_id.clone(), completed + failed);
                self.refresh(&st);
            }
            Event::Ingested {
                batch_id,
                stats,
                cost,
                ..
            } => {
                st.in_flight.remove(batch_id);
                st.done += stats.succeeded + stats.exhausted;
                st.retries += stats.failed;
                st.cost += *cost;
                self.refresh(&st);
            }
            Event::Note(n) => {
                let _ = self.multi.println(n);
            }
            Event::Quarantined { .. } => {
                let _ = self.multi.println(quarantine_line(e));
            }
            _ => {}
        }
    }
}

impl Drop for BarObserver {
    fn drop(&mut self) {
        self.bar.finish();
    }
}
