//! Provider weather: failures a later try may fix lengthen the pause, fatal ones end the
//! run, and a provider unreachable for `unreachable_timeout` ends it resumably
//! (docs/reliability.md §B9). Also the jitter polling is spread with.

use std::time::{Duration, Instant};

use super::{RunError, Runner};
use crate::provider::{BatchProvider, ProviderError};
use crate::store::Store;

impl<S: Store, P: BatchProvider> Runner<'_, S, P> {
    /// A call to the provider failed in a way a later try may fix. Provider weather (a 429,
    /// a 5xx) is normal and logged quietly; a provider that cannot be reached at all is
    /// reported at once at the default level, and a spell of failures that lasts
    /// `unreachable_timeout` ends the run (exit 75: everything is kept, run again later).
    pub(super) fn note_transient(&mut self, e: ProviderError) -> Result<(), RunError> {
        let p = &self.ctx.pipeline.provider;
        // The base URL is configuration, but it may carry `user:pass@`: never print that.
        let url = crate::provider::redact::Redactor::shapes_only()
            .scrub(self.ctx.provider.endpoint())
            .into_owned();
        self.transient_streak += 1;
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        let failing_for = since.elapsed();
        // Nothing answered at all (refused, unresolvable, timed out): say so at once.
        let unreachable = matches!(&e, ProviderError::Transient { status: None, .. })
            || matches!(&e, ProviderError::Ambiguous { .. });
        if !self.failing_warned && (unreachable || failing_for >= Duration::from_secs(30)) {
            self.failing_warned = true;
            tracing::warn!(
                url = %url,
                error = %e,
                give_up_after_seconds = p.unreachable_timeout.as_secs_f64(),
                "cannot reach the provider; retrying"
            );
        } else {
            tracing::info!(url = %url, error = %e, "provider call failed; will try again");
        }
        if failing_for >= p.unreachable_timeout {
            return Err(RunError::Unavailable {
                url,
                seconds: failing_for.as_secs(),
                timeout_seconds: p.unreachable_timeout.as_secs_f64(),
                cause: e.to_string(),
            });
        }
        Ok(())
    }

    pub(super) fn note_success(&mut self) {
        if self.failing_warned {
            tracing::warn!("the provider answers again");
        }
        self.transient_streak = 0;
        self.failing_since = None;
        self.failing_warned = false;
    }

    /// Classifies a provider error: fatal ones end the run, others are retried later.
    pub(super) fn provider_failure(&mut self, e: ProviderError) -> Result<(), RunError> {
        match e {
            ProviderError::Auth { .. } | ProviderError::Io(_) | ProviderError::Permanent { .. } => {
                Err(RunError::Provider(e))
            }
            other => self.note_transient(other),
        }
    }

    pub(super) async fn backoff_pause(&self) {
        let d = self
            .ctx
            .pipeline
            .provider
            .poll_min
            .max(Duration::from_millis(50))
            * self.transient_streak.clamp(1, 20);
        self.ctx
            .shutdown
            .sleep_until(Instant::now() + d.min(self.ctx.pipeline.provider.poll_max))
            .await;
    }
}

pub(super) fn jitter() -> f64 {
    use std::collections::hash_map::RandomState;
    use std::hash::BuildHasher;
    (RandomState::new().hash_one(Instant::now()) >> 11) as f64 / (1u64 << 53) as f64
}
