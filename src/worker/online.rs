//! Online mode: a batch's requests sent as real-time calls by the runner itself, under a
//! concurrency limit and requests- and tokens-per-minute limits, at standard prices.
//!
//! The same rules as batches hold. An online request is an attempt: before a page of them is
//! sent, their dispatch is committed; answers are judged and applied with the same
//! idempotent writes. A process that dies with requests dispatched but unanswered leaves
//! them `lost` (they may have been billed) and their items are retried as new attempts —
//! never the same attempt twice. A 429 (nothing happened) is waited out and sent again as
//! the same attempt; anything that may have taken effect is never resent as such.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

// Tokio's clock, so the limiter follows a paused clock in tests.
use tokio::time::Instant;

use futures_util::StreamExt;

use super::{Event, RunError, Runner, apply::judge_line};
use crate::cost::{PricingMode, Usage};
use crate::provider::{BatchProvider, LineOutcome, ProviderError};
use crate::request::RequestShape;
use crate::store::{
    ApplyStats, AttemptOutcome, AttemptRef, AttemptVerdict, BatchMode, BatchRow, BatchState,
    BatchUpdate, EndState, OnlineLine, Store, now_ms,
};

/// Requests dispatched per page (each page's dispatch is one transaction).
const PAGE: u32 = 256;
/// Times a rate-limited request is waited out before it counts as a failure.
const MAX_RATE_LIMITED: u32 = 8;

/// Spaces requests so that neither the request rate nor the token rate is ever exceeded,
/// over any window: each request takes the next free slot of both clocks.
pub struct Limiter {
    request_gap: Option<Duration>,
    token_gap_per_token: Option<Duration>,
    next: Mutex<(Instant, Instant)>,
}

impl Limiter {
    pub fn new(requests_per_minute: Option<u32>, tokens_per_minute: Option<u64>) -> Self {
        let now = Instant::now();
        Limiter {
            request_gap: requests_per_minute.map(|r| Duration::from_secs_f64(60.0 / r as f64)),
            token_gap_per_token: tokens_per_minute
                .map(|t| Duration::from_secs_f64(60.0 / t as f64)),
            next: Mutex::new((now, now)),
        }
    }

    /// Waits for the slot of one request of `tokens` tokens.
    pub async fn acquire(&self, tokens: u64) {
        let at = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let at = now.max(next.0).max(next.1);
            if let Some(g) = self.request_gap {
                next.0 = at + g;
            }
            if let Some(g) = self.token_gap_per_token {
                next.1 = at + g.mul_f64(tokens as f64);
            }
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

impl<S: Store, P: BatchProvider> Runner<'_, S, P> {
    /// An online batch needs no file: it goes straight to `submitted` (in our hands).
    pub(super) async fn start_online(&mut self, b: &BatchRow) -> Result<(), RunError> {
        self.ctx
            .store
            .update_batch(
                b,
                BatchState::Planned,
                &BatchUpdate {
                    state: Some(BatchState::Submitted),
                    provider_status: Some(BatchMode::Online.to_string()),
                    submitted_at: Some(now_ms()),
                    ..Default::default()
                },
            )
            .await?;
        self.ctx.observer.event(&Event::Submitted {
            batch_id: b.id.clone(),
            provider_batch_id: BatchMode::Online.to_string(),
            requests: b.request_count as u64,
        });
        Ok(())
    }

    /// Sends an online batch's requests and applies the answers, page by page.
    pub(super) async fn run_online(&mut self, b: &BatchRow) -> Result<(), RunError> {
        let ctx = self.ctx;
        let p = ctx.pipeline;
        let store = ctx.store;
        let stage = self.stage_run(&b.stage)?;
        let max_attempts = stage.stage.max_attempts;
        let max_out = stage.stage.prompt.max_output_tokens as u64;
        let rates = *stage.rates(PricingMode::Standard);
        let mut stats = store.lose_dispatched(b, max_attempts).await?;
        let limiter = Limiter::new(
            p.provider.online.requests_per_minute,
            p.provider.online.tokens_per_minute,
        );
        let standard = rates;
        let mut shapes: HashMap<i64, RequestShape> = HashMap::new();
        loop {
            if ctx.shutdown.is_set() {
                return Ok(());
            }
            let page = store.online_page(&b.id, PAGE).await?;
            if page.is_empty() {
                break;
            }
            for l in &page {
                if let std::collections::hash_map::Entry::Vacant(e) = shapes.entry(l.shape_id) {
                    e.insert(store.shape(l.shape_id).await?);
                }
            }
            let ids: Vec<i64> = page.iter().map(|l| l.attempt_id).collect();
            store.mark_dispatched(b, &ids).await?;
            self.requests_sent += ids.len() as u64;
            crate::failpoint!("online.after_dispatch");
            let provider = ctx.provider;
            let limiter = &limiter;
            let shapes = &shapes;
            let results: Vec<(OnlineLine, Result<LineOutcome, ProviderError>)> =
                futures_util::stream::iter(page.into_iter().map(|l| async move {
                    let shape = &shapes[&l.shape_id];
                    let tokens = l.input_tokens.max(0) as u64 + max_out;
                    let mut limited = 0;
                    let r = loop {
                        limiter.acquire(tokens).await;
                        match provider
                            .send_online(&l.custom_id, shape, &l.user_json)
                            .await
                        {
                            // Refused before it took effect: the same attempt, later.
                            Err(ProviderError::Transient { retry_after, .. })
                                if limited < MAX_RATE_LIMITED =>
                            {
                                limited += 1;
                                let wait = retry_after
                                    .unwrap_or(Duration::from_millis(250 << limited.min(6)));
                                tokio::time::sleep(wait.min(Duration::from_secs(120))).await;
                            }
                            other => break other,
                        }
                    };
                    (l, r)
                }))
                .buffer_unordered(p.provider.online.concurrency)
                .collect()
                .await;
            let mut outcomes: Vec<AttemptOutcome> = Vec::with_capacity(results.len());
            for (l, r) in results {
                let attempt = AttemptRef {
                    id: l.attempt_id,
                    item_id: l.item_id,
                    attempt_no: l.attempt_no,
                    custom_id: l.custom_id.clone(),
                    state: l.state,
                };
                let outcome = match r {
                    Ok(o) => o,
                    Err(ProviderError::Auth { status, message }) => {
                        return Err(RunError::Provider(ProviderError::Auth { status, message }));
                    }
                    Err(e) => {
                        let verdict_msg = match &e {
                            ProviderError::Ambiguous { .. } => {
                                format!("may have been processed (not resent as such): {e}")
                            }
                            _ => e.to_string(),
                        };
                        LineOutcome::Error {
                            status: None,
                            code: Some("online_request_failed".into()),
                            message: verdict_msg,
                            usage: Usage::default(),
                        }
                    }
                };
                outcomes.push(judge_line(
                    &self.stage_run(&b.stage)?.validator,
                    &rates,
                    &standard,
                    &attempt,
                    outcome,
                ));
            }
            stats += store.apply_results(b, &outcomes, max_attempts).await?;
            crate::failpoint!("online.after_apply");
        }
        let rest = store
            .finish_ingest(
                b,
                AttemptVerdict::Missing,
                "not answered online",
                max_attempts,
                self.collector(),
            )
            .await?;
        stats += ApplyStats { applied: 0, ..rest };
        // `finish_ingest` closes batches that ended; an online batch ends here.
        store
            .update_batch(
                b,
                BatchState::Submitted,
                &BatchUpdate {
                    state: Some(BatchState::Ingested),
                    end_state: Some(EndState::Completed),
                    ended_at: Some(now_ms()),
                    ingested_at: Some(now_ms()),
                    ..Default::default()
                },
            )
            .await?;
        self.ingested(b, stats).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_limiter_spaces_requests_by_both_rates() {
        let l = Limiter::new(Some(600), Some(60_000));
        let start = Instant::now();
        for _ in 0..10 {
            l.acquire(50).await;
        }
        // 600 rpm: 100 ms apart; 50 tokens at 60k tpm: 50 ms apart. The slower wins.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(900), "{took:?}");
        let l = Limiter::new(Some(6000), Some(6_000));
        let start = Instant::now();
        for _ in 0..5 {
            l.acquire(100).await;
        }
        // 100 tokens at 6k tpm: one second apart.
        assert!(start.elapsed() >= Duration::from_secs(4));
    }
}
