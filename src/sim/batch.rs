//! A batch's life, provider-neutral: a new batch and its creation number, its timeline by the
//! wall clock (validating → in_progress → finalizing → completed, or failed, expired,
//! cancelled; a Bedrock job that never starts expires with nothing run), and polling,
//! cancelling and listing it (docs/providers.md §7.1). The batch itself is `data`'s; its wire
//! object is rendered by its provider's module (`openai`, `anthropic`, `gemini`, `bedrock`);
//! running its requests is `run`.

use std::collections::BTreeMap;

use serde_json::Value;

use super::data::{SimBatch, Status};
use super::settings::SimSettings;
use super::state::Inner;
use super::types::{ProviderKind, SimError};
use super::{Sim, wire};
use crate::cost::Usage;
use crate::util::time::{now_ms, unix_now};

impl Sim {
    /// Adds a new batch and saves it: the answer of a create.
    pub(super) fn push_batch(&self, inner: &mut Inner, mut b: SimBatch) -> Result<Value, SimError> {
        let v = wire::batch_json(&mut b, self.base());
        let idx = inner.batches.len();
        let with_requests = !b.requests.is_empty();
        inner.batch_index.insert(b.id.clone(), idx);
        inner.batches.push(b);
        inner.save_batch(idx, with_requests);
        Self::saved(inner, v)
    }

    /// The creation number of a batch (what create faults are drawn on).
    pub(crate) fn batch_ordinal(&self, id: &str) -> Option<u64> {
        let inner = self.lock();
        inner.batch_index.get(id).map(|&i| inner.batches[i].ordinal)
    }

    pub(super) fn new_batch(
        &self,
        inner: &mut Inner,
        id_kind: &str,
        flavor: ProviderKind,
        input: String,
    ) -> SimBatch {
        let id = self.next_id(inner, id_kind);
        let ordinal = inner.batches.len() as u64;
        SimBatch {
            id,
            ordinal,
            flavor,
            input,
            input_file_id: None,
            endpoint: String::new(),
            metadata: None,
            display_name: None,
            url_model: None,
            inline: false,
            created_at: unix_now(),
            started_ms: now_ms(),
            status: Status::Validating,
            stamps: BTreeMap::new(),
            expires: self.will_expire(ordinal, flavor),
            cancel_ms: None,
            done_fraction: 1.0,
            requests: Vec::new(),
            model: None,
            counts: (0, 0, 0),
            output_file_id: None,
            error_file_id: None,
            inline_output: None,
            output_lag: 0,
            errors: Vec::new(),
            usage: Usage::default(),
            settings: self.settings.clone(),
            bedrock: None,
            deleted: false,
        }
    }

    pub(super) fn index(&self, inner: &Inner, id: &str) -> Result<usize, SimError> {
        inner
            .batch_index
            .get(id)
            .copied()
            .filter(|&i| !inner.batches[i].deleted)
            .ok_or_else(|| SimError::not_found("batch", id))
    }

    /// A batch's wire object. Rendering can change it (Gemini's lagging output reference
    /// counts down), and such a change is saved too.
    pub(super) fn view(&self, inner: &mut Inner, idx: usize, base: &str) -> Value {
        let lag = inner.batches[idx].output_lag;
        let v = wire::batch_json(&mut inner.batches[idx], base);
        if inner.batches[idx].output_lag != lag {
            inner.save_batch(idx, false);
        }
        v
    }

    pub(crate) fn get_batch(&self, id: &str) -> Result<Value, SimError> {
        let mut inner = self.state()?;
        let idx = self.index(&inner, id)?;
        self.advance(&mut inner, idx);
        let v = self.view(&mut inner, idx, self.base());
        Self::saved(&inner, v)
    }

    pub(crate) fn cancel_batch(&self, id: &str) -> Result<Value, SimError> {
        let mut inner = self.state()?;
        let idx = self.index(&inner, id)?;
        self.advance(&mut inner, idx);
        let b = &mut inner.batches[idx];
        match b.status {
            Status::Cancelling | Status::Cancelled => {}
            s if s.terminal() => {
                return Err(SimError {
                    status: 409,
                    kind: "invalid_request_error",
                    code: None,
                    message: format!("Cannot cancel a batch with status '{}'.", s.as_str()),
                });
            }
            _ => {
                let now = now_ms();
                b.done_fraction = if b.unstarted() {
                    0.0
                } else {
                    progress(&b.settings, elapsed(b.started_ms, now))
                };
                b.status = Status::Cancelling;
                b.stamps.insert("cancelling_at".into(), unix_now());
                b.cancel_ms = Some(now);
                inner.save_batch(idx, false);
            }
        }
        self.advance(&mut inner, idx);
        let v = self.view(&mut inner, idx, self.base());
        Self::saved(&inner, v)
    }

    /// Deletes an ended batch and its result files (Anthropic's `DELETE`); one still
    /// running is refused, as the API does.
    pub(crate) fn delete_batch(&self, id: &str) -> Result<(), SimError> {
        let mut inner = self.state()?;
        let idx = self.index(&inner, id)?;
        self.advance(&mut inner, idx);
        if !inner.batches[idx].status.terminal() {
            return Err(SimError::bad_request(format!(
                "Batch {id} cannot be deleted while it is processing; cancel it first."
            )));
        }
        inner.batches[idx].deleted = true;
        inner.save_batch(idx, false);
        let files = [
            inner.batches[idx].output_file_id.clone(),
            inner.batches[idx].error_file_id.clone(),
        ];
        for fid in files.into_iter().flatten() {
            if let Some(f) = inner.files.remove(&fid) {
                let seq = inner.seq;
                inner.log.write(seq, &[super::journal::Put::DropFile(&fid)]);
                let _ = std::fs::remove_file(self.content_path(&f.name));
            }
        }
        Self::saved(&inner, ())
    }

    /// The batches of one wire flavor, newest first, one page after `after`.
    pub(crate) fn list_batches(
        &self,
        flavor: ProviderKind,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Value, SimError> {
        let mut inner = self.state()?;
        for i in 0..inner.batches.len() {
            self.advance(&mut inner, i);
        }
        let order: Vec<usize> = (0..inner.batches.len())
            .rev()
            .filter(|&i| inner.batches[i].flavor == flavor && !inner.batches[i].deleted)
            .collect();
        let start = after
            .and_then(|a| {
                order
                    .iter()
                    .position(|&i| inner.batches[i].id == a)
                    .map(|p| p + 1)
            })
            .unwrap_or(0);
        let base = self.base().to_string();
        let page_idx: Vec<usize> = order.iter().skip(start).take(limit).copied().collect();
        let page: Vec<Value> = page_idx
            .iter()
            .map(|&i| self.view(&mut inner, i, &base))
            .collect();
        let has_more = start + page.len() < order.len();
        let first = page_idx.first().map(|&i| inner.batches[i].id.clone());
        let last = page_idx.last().map(|&i| inner.batches[i].id.clone());
        let v = wire::batch_list(flavor, page, has_more, first, last);
        Self::saved(&inner, v)
    }

    /// Moves a batch along its timeline, as far as the wall clock allows, saving each step.
    pub(super) fn advance(&self, inner: &mut Inner, idx: usize) {
        loop {
            let now = now_ms();
            let b = &inner.batches[idx];
            let t = b.settings.batch_seconds;
            let elapsed = elapsed(b.started_ms, now);
            let next = match b.status {
                Status::Validating if elapsed >= 0.1 * t => Some(Status::InProgress),
                Status::InProgress if b.expires && elapsed >= 0.6 * t => Some(Status::Expired),
                Status::InProgress if elapsed >= 0.9 * t => Some(Status::Finalizing),
                Status::Finalizing if elapsed >= t => Some(Status::Completed),
                Status::Cancelling => {
                    let since = b.cancel_ms.map(|c| self::elapsed(c, now)).unwrap_or(0.0);
                    (since >= 0.05 * t || b.flavor == ProviderKind::Gemini)
                        .then_some(Status::Cancelled)
                }
                _ => None,
            };
            let Some(next) = next else {
                // Progress is read off the clock, not saved: it changes on every poll.
                let b = &mut inner.batches[idx];
                if b.status == Status::InProgress
                    && b.flavor != ProviderKind::Anthropic
                    && !b.unstarted()
                {
                    let total = b.counts.0;
                    let done = (total as f64 * progress(&b.settings, elapsed)) as u64;
                    b.counts.1 = done.min(total);
                }
                return;
            };
            match next {
                Status::InProgress => {
                    self.validate(inner, idx);
                    inner.save_batch(idx, true);
                }
                Status::Expired => {
                    // Half-way, or (a Bedrock job that never started) nothing.
                    let b = &mut inner.batches[idx];
                    b.done_fraction = if b.unstarted() { 0.0 } else { 0.5 };
                    self.materialize(inner, idx, Status::Expired, "expired_at");
                }
                Status::Completed => {
                    self.materialize(inner, idx, Status::Completed, "completed_at")
                }
                Status::Cancelled => {
                    self.materialize(inner, idx, Status::Cancelled, "cancelled_at")
                }
                Status::Finalizing => {
                    let b = &mut inner.batches[idx];
                    b.status = Status::Finalizing;
                    b.stamps.insert("finalizing_at".into(), unix_now());
                    b.counts.1 = b.counts.0;
                    inner.save_batch(idx, false);
                }
                _ => return,
            }
        }
    }
}

/// Seconds from `from_ms` to `to_ms` (unix milliseconds), never negative.
fn elapsed(from_ms: i64, to_ms: i64) -> f64 {
    (to_ms - from_ms).max(0) as f64 / 1000.0
}

/// Share of the in-progress phase done `elapsed` seconds into a batch made under `s`.
fn progress(s: &SimSettings, elapsed: f64) -> f64 {
    let t = s.batch_seconds;
    if t <= 0.0 {
        return 1.0;
    }
    ((elapsed - 0.1 * t) / (0.8 * t)).clamp(0.0, 1.0)
}
