//! The simulator's neutral state: what one `Sim` holds behind its lock (files, batches, the
//! bill, the record of uploads, online and refused calls), and how that state is written to
//! its journal and rebuilt from it (`journal`; docs/providers.md §7.1). What it holds is
//! `data`'s.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::Value;

use super::bill::BillEntry;
use super::data::{SimBatch, SimFile};
use super::journal::{self, Got, Log, Put};

#[derive(Default)]
pub(super) struct Inner {
    pub(super) files: BTreeMap<String, SimFile>,
    pub(super) batches: Vec<SimBatch>,
    pub(super) batch_index: HashMap<String, usize>,
    pub(super) seq: u64,
    pub(super) bill: Vec<BillEntry>,
    /// Every upload ever accepted (deleted ones too).
    pub(super) uploads: Vec<Value>,
    /// Every online request answered.
    pub(super) online: Vec<Value>,
    /// Every call refused with a fault before it ran: (client request id, time, status).
    pub(super) refused: Vec<Value>,
    /// How many requests with each body (by its SHA-256) this state has answered, batch and
    /// online: the next one with that body draws its faults on the count (`draw_key`). Not
    /// journaled: rebuilt on open from the recorded outcomes (`count_answered`).
    pub(super) answered: HashMap<[u8; 32], u64>,
    /// Gemini resumable uploads started: token → display name (not kept across processes).
    pub(super) sessions: HashMap<String, String>,
    /// Where every change is written (persistent mode).
    pub(super) log: Log,
}

impl Inner {
    /// Writes one batch (and its request list when that changed).
    pub(super) fn save_batch(&mut self, idx: usize, with_requests: bool) {
        let b = &self.batches[idx];
        let mut ops = vec![Put::Batch(b)];
        if with_requests {
            ops.push(Put::Requests {
                id: &b.id,
                requests: &b.requests,
            });
        }
        self.log.write(self.seq, &ops);
    }

    /// Applies one journal entry (replay).
    pub(super) fn apply(&mut self, seq: u64, op: Got) {
        self.seq = self.seq.max(seq);
        match op {
            Got::File(f) => {
                self.files.insert(f.id.clone(), f);
            }
            Got::DropFile(id) => {
                self.files.remove(&id);
            }
            Got::Batch(b) => match self.batch_index.get(&b.id) {
                Some(&i) => {
                    let old = std::mem::replace(&mut self.batches[i], *b);
                    self.batches[i].requests = old.requests;
                    self.batches[i].inline_output = old.inline_output;
                }
                None => {
                    self.batch_index.insert(b.id.clone(), self.batches.len());
                    self.batches.push(*b);
                }
            },
            Got::Requests { id, requests } => {
                if let Some(&i) = self.batch_index.get(&id) {
                    self.batches[i].requests = requests;
                }
            }
            Got::InlineOutput { id, lines } => {
                if let Some(&i) = self.batch_index.get(&id) {
                    self.batches[i].inline_output = Some(lines);
                }
            }
            Got::Bill(e) => self.bill.push(e),
            Got::Upload(v) => self.uploads.push(v),
            Got::Online(v) => self.online.push(v),
            Got::Refused(v) => self.refused.push(v),
        }
    }

    /// Writes the whole state, compactly, a bounded number of entities per line.
    pub(super) fn snapshot(&self, w: &mut journal::Snapshot) -> std::io::Result<()> {
        const CHUNK: usize = 512;
        let seq = self.seq;
        let files: Vec<&SimFile> = self.files.values().collect();
        for c in files.chunks(CHUNK) {
            let ops: Vec<Put> = c.iter().map(|f| Put::File(f)).collect();
            w.line(seq, &ops)?;
        }
        for b in &self.batches {
            let mut ops = vec![
                Put::Batch(b),
                Put::Requests {
                    id: &b.id,
                    requests: &b.requests,
                },
            ];
            if let Some(lines) = &b.inline_output {
                ops.push(Put::InlineOutput { id: &b.id, lines });
            }
            w.line(seq, &ops)?;
        }
        for c in self.bill.chunks(CHUNK) {
            w.line(seq, &c.iter().map(Put::Bill).collect::<Vec<_>>())?;
        }
        for c in self.uploads.chunks(CHUNK) {
            w.line(seq, &c.iter().map(Put::Upload).collect::<Vec<_>>())?;
        }
        for c in self.online.chunks(CHUNK) {
            w.line(seq, &c.iter().map(Put::Online).collect::<Vec<_>>())?;
        }
        for c in self.refused.chunks(CHUNK) {
            w.line(seq, &c.iter().map(Put::Refused).collect::<Vec<_>>())?;
        }
        Ok(())
    }

    /// The content files something still refers to.
    pub(super) fn referenced(&self) -> HashSet<&str> {
        self.files
            .values()
            .map(|f| f.name.as_str())
            .chain(self.batches.iter().map(|b| b.input.as_str()))
            .collect()
    }
}
