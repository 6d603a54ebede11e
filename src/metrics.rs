//! Prometheus metrics: [`Metrics`] holds this process's figures, a [`MetricsObserver`] per
//! pipeline turns the runner's typed events into them, and they leave in the Prometheus text
//! format: served on `/metrics` (`worker --metrics-listen`), written for node_exporter's
//! textfile collector (`run --metrics-textfile`) or pushed to a Pushgateway
//! (`run --metrics-push`). Nothing else in the program updates a metric.
//!
//! Whole numbers (items, tokens, retries, batches in flight, run ends) go through the
//! `metrics` facade into a recorder of the Prometheus exporter that belongs to this
//! [`Metrics`] (not the process-wide one, so each command and test has its own). Money does
//! not: the `metrics` counter is an integer and its gauge an `f64`, which rounds a total of a
//! few thousand dollars in pico-dollars. The cost is kept as exact [`Usd`] per label set and
//! written as its exact decimal text (`# TYPE … counter`: it only grows), so the exposed
//! figure is the ledger's to the last pico-dollar.
//!
//! Labels are few and bounded: pipeline, stage, model, pricing mode, outcome, token kind.
//! Never an item, batch or run id.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{KeyName, Recorder, SharedString};
use metrics_exporter_prometheus::formatting::sanitize_label_value;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::cost::{Usage, Usd};
use crate::store::RunStatus;
use crate::worker::{Event, Observer};

/// Items final after a batch was ingested, by outcome (`succeeded`, or `failed` for good).
pub const ITEMS: &str = "nightshift_items_total";
/// Failed attempts whose item goes on to another attempt.
pub const RETRIES: &str = "nightshift_retries_total";
/// Tokens of ingested results, by kind (as the ledger counts them).
pub const TOKENS: &str = "nightshift_tokens_total";
/// What ingested results cost (ledger), exact decimal dollars.
pub const COST: &str = "nightshift_cost_usd_total";
/// Batches submitted (or adopted) by this process and not yet ingested.
pub const IN_FLIGHT: &str = "nightshift_batches_in_flight";
/// Batches this process ingested.
pub const BATCHES: &str = "nightshift_batches_ingested_total";
/// Source records read and quarantined.
pub const RECORDS_READ: &str = "nightshift_records_read_total";
pub const RECORDS_QUARANTINED: &str = "nightshift_records_quarantined_total";
/// When a run of the pipeline last completed with every item succeeded (Unix seconds).
pub const LAST_SUCCESS: &str = "nightshift_run_last_success_timestamp_seconds";
/// When a run of the pipeline last ended, whatever its status, and its exit code.
pub const LAST_END: &str = "nightshift_run_last_end_timestamp_seconds";
pub const LAST_EXIT: &str = "nightshift_run_last_exit_code";

/// The token kinds of [`TOKENS`], as `report --json` names them.
const TOKEN_KINDS: [&str; 5] = [
    "input",
    "cached_input",
    "cache_write",
    "output",
    "reasoning",
];

/// The labels of a cost: pipeline, stage, model, pricing mode.
type CostKey = (String, String, String, String);

/// One process's metrics.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    costs: BTreeMap<CostKey, Usd>,
    /// Per pipeline, the batches in flight (ids stay here, never in a label).
    in_flight: HashMap<String, HashSet<String>>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let describe = |name: &'static str, help: &'static str, counter: bool| {
            let (key, help) = (KeyName::from_const_str(name), SharedString::const_str(help));
            if counter {
                recorder.describe_counter(key, None, help);
            } else {
                recorder.describe_gauge(key, None, help);
            }
        };
        describe(
            ITEMS,
            "Items final after their batch was ingested, by outcome (succeeded, failed for good).",
            true,
        );
        describe(RETRIES, "Failed attempts whose item is sent again.", true);
        describe(
            TOKENS,
            "Tokens of ingested results, by kind (ledger).",
            true,
        );
        describe(BATCHES, "Batches this process ingested.", true);
        describe(RECORDS_READ, "Source records read.", true);
        describe(
            RECORDS_QUARANTINED,
            "Source lines quarantined (unreadable, a field missing, too long).",
            true,
        );
        describe(
            IN_FLIGHT,
            "Batches submitted or adopted by this process and not yet ingested.",
            false,
        );
        describe(
            LAST_SUCCESS,
            "When a run of the pipeline last completed with every item succeeded (Unix time).",
            false,
        );
        describe(
            LAST_END,
            "When a run of the pipeline last ended, whatever its status (Unix time).",
            false,
        );
        describe(
            LAST_EXIT,
            "The exit code of the pipeline's last run.",
            false,
        );
        Arc::new(Metrics {
            recorder,
            handle,
            state: Mutex::new(State::default()),
        })
    }

    /// An observer feeding these metrics from the events of `pipeline`'s runner; with a
    /// `textfile`, that file is rewritten (atomically) whenever a figure moved.
    pub fn observer(
        self: &Arc<Self>,
        pipeline: &str,
        textfile: Option<PathBuf>,
    ) -> MetricsObserver {
        MetricsObserver {
            metrics: self.clone(),
            pipeline: pipeline.to_string(),
            textfile,
            writing: Mutex::new(()),
            warned: AtomicBool::new(false),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one event of `pipeline`; whether a figure moved.
    fn record(&self, pipeline: &str, e: &Event) -> bool {
        let p = pipeline.to_string();
        metrics::with_local_recorder(&self.recorder, || match e {
            Event::IngestDone {
                records,
                quarantined,
                ..
            } => {
                metrics::counter!(RECORDS_READ, "pipeline" => p.clone()).increment(*records);
                metrics::counter!(RECORDS_QUARANTINED, "pipeline" => p).increment(*quarantined);
                true
            }
            Event::Submitted { batch_id, .. }
            | Event::Adopted { batch_id, .. }
            | Event::Polled { batch_id, .. } => self.in_flight(&p, batch_id, true),
            Event::LeaseLost { batch_id } => self.in_flight(&p, batch_id, false),
            Event::Ingested {
                batch_id,
                stats,
                cost,
                stage,
                model,
                pricing_mode,
                usage,
            } => {
                self.in_flight(&p, batch_id, false);
                let s = stage.clone();
                metrics::counter!(BATCHES, "pipeline" => p.clone(), "stage" => s.clone())
                    .increment(1);
                for (outcome, n) in [("succeeded", stats.succeeded), ("failed", stats.exhausted)] {
                    metrics::counter!(ITEMS, "pipeline" => p.clone(), "stage" => s.clone(), "outcome" => outcome)
                        .increment(n);
                }
                metrics::counter!(RETRIES, "pipeline" => p.clone(), "stage" => s.clone())
                    .increment(stats.failed);
                for (kind, n) in TOKEN_KINDS.into_iter().zip(token_counts(usage)) {
                    metrics::counter!(TOKENS,
                        "pipeline" => p.clone(), "stage" => s.clone(), "model" => model.clone(),
                        "pricing_mode" => pricing_mode.clone(), "kind" => kind)
                    .increment(n);
                }
                *self
                    .state()
                    .costs
                    .entry((p, s, model.clone(), pricing_mode.clone()))
                    .or_default() += *cost;
                true
            }
            Event::RunEnded {
                status, exit_code, ..
            } => {
                let now = (crate::util::time::now_ms() / 1000) as f64;
                metrics::gauge!(LAST_END, "pipeline" => p.clone()).set(now);
                metrics::gauge!(LAST_EXIT, "pipeline" => p.clone()).set(f64::from(*exit_code));
                if *status == RunStatus::Completed {
                    metrics::gauge!(LAST_SUCCESS, "pipeline" => p).set(now);
                }
                true
            }
            _ => false,
        })
    }

    /// Marks a batch of `pipeline` in flight (or not); whether the count moved.
    fn in_flight(&self, pipeline: &str, batch_id: &str, flying: bool) -> bool {
        let n = {
            let mut st = self.state();
            let set = st.in_flight.entry(pipeline.to_string()).or_default();
            let moved = if flying {
                set.insert(batch_id.to_string())
            } else {
                set.remove(batch_id)
            };
            if !moved {
                return false;
            }
            set.len()
        };
        metrics::with_local_recorder(&self.recorder, || {
            metrics::gauge!(IN_FLIGHT, "pipeline" => pipeline.to_string()).set(n as f64);
        });
        true
    }

    /// The exact cost of everything ingested here, over every label set.
    pub fn cost_total(&self) -> Usd {
        self.state().costs.values().copied().sum()
    }

    /// Every metric in the Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = self.handle.render();
        let costs = self.state().costs.clone();
        if !costs.is_empty() {
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            let _ = writeln!(
                out,
                "# HELP {COST} What ingested results cost, per the ledger, in dollars (exact decimal).\n# TYPE {COST} counter"
            );
            for ((pipeline, stage, model, mode), usd) in &costs {
                let _ = writeln!(
                    out,
                    "{COST}{{pipeline=\"{}\",stage=\"{}\",model=\"{}\",pricing_mode=\"{}\"}} {}",
                    sanitize_label_value(pipeline),
                    sanitize_label_value(stage),
                    sanitize_label_value(model),
                    sanitize_label_value(mode),
                    usd.to_decimal_string()
                );
            }
        }
        out
    }

    /// Writes [`Metrics::render`] to `path` atomically (a temporary file in the same folder,
    /// renamed into place), readable by the collector (mode 0644).
    pub fn write_textfile(&self, path: &Path) -> std::io::Result<()> {
        let text = self.render();
        let mut f = crate::util::fs::AtomicFile::create(path)?;
        f.readable_by_all()?;
        f.write_all(text.as_bytes())?;
        f.commit()
    }

    /// Takes over `pipeline`'s last success time from an earlier run's textfile, so a run
    /// that does not succeed leaves it as it was instead of dropping it (the "no successful
    /// run in 26 h" alert needs it).
    pub fn carry_last_success(&self, pipeline: &str, textfile: &Path) {
        let Ok(text) = std::fs::read_to_string(textfile) else {
            return;
        };
        let prefix = format!(
            "{LAST_SUCCESS}{{pipeline=\"{}\"}} ",
            sanitize_label_value(pipeline)
        );
        let found = text
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|v| v.trim().parse::<f64>().ok())
            .find(|v| v.is_finite() && *v > 0.0);
        if let Some(at) = found {
            metrics::with_local_recorder(&self.recorder, || {
                metrics::gauge!(LAST_SUCCESS, "pipeline" => pipeline.to_string()).set(at);
            });
        }
    }
}

fn token_counts(u: &Usage) -> [u64; 5] {
    [
        u.input_tokens,
        u.cached_input_tokens,
        u.cache_write_tokens,
        u.output_tokens,
        u.reasoning_tokens,
    ]
}

/// Feeds one pipeline's events into [`Metrics`] (and rewrites its textfile, if any).
pub struct MetricsObserver {
    metrics: Arc<Metrics>,
    pipeline: String,
    textfile: Option<PathBuf>,
    writing: Mutex<()>,
    warned: AtomicBool,
}

impl MetricsObserver {
    /// Rewrites the textfile now (at the end of a run); an error is returned, not logged.
    pub fn write_textfile(&self) -> std::io::Result<()> {
        match &self.textfile {
            Some(path) => {
                let _one = self.writing.lock().unwrap_or_else(|e| e.into_inner());
                self.metrics.write_textfile(path)
            }
            None => Ok(()),
        }
    }
}

impl Observer for MetricsObserver {
    fn event(&self, e: &Event) {
        if self.metrics.record(&self.pipeline, e)
            && let Err(err) = self.write_textfile()
            && !self.warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                error = %err,
                path = %self.textfile.as_deref().unwrap_or(Path::new("")).display(),
                "cannot write the metrics textfile; the run goes on"
            );
        }
    }
}

/// Serves [`Metrics::render`] on `GET /metrics` from `listener` until the task is aborted.
pub fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
) -> tokio::task::JoinHandle<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    m.render(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the metrics listener stopped");
        }
    })
}

/// The Pushgateway URL of a pipeline's group: `URL/metrics/job/nightshift/pipeline/NAME`.
/// Refuses anything but an http(s) URL.
pub fn push_url(base: &str, pipeline: &str) -> Result<url::Url, String> {
    let parsed = url::Url::parse(base.trim())
        .map_err(|e| format!("`{}` is not a URL ({e})", shown_url_text(base)))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err(format!(
            "`{}` is not an http(s) URL of a Pushgateway",
            shown_url(&parsed)
        ));
    }
    let mut u = parsed;
    {
        let mut segs = u
            .path_segments_mut()
            .map_err(|_| "the URL cannot take a path".to_string())?;
        segs.pop_if_empty()
            .extend(["metrics", "job", "nightshift", "pipeline", pipeline]);
    }
    Ok(u)
}

/// A URL as it may be printed: without a password.
pub fn shown_url(u: &url::Url) -> String {
    let mut u = u.clone();
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    u.to_string()
}

fn shown_url_text(text: &str) -> String {
    match url::Url::parse(text.trim()) {
        Ok(u) => shown_url(&u),
        // Unparseable: show nothing after a scheme's `//` that might hold credentials.
        Err(_) => text.split('@').next_back().unwrap_or_default().to_string(),
    }
}

/// Pushes `body` to a Pushgateway group once. `replace` (a successful run) replaces the
/// whole group (`PUT`); otherwise (`POST`) only the metrics pushed now are replaced, so the
/// group keeps the last success time of an earlier run.
pub async fn push(url: &url::Url, body: String, replace: bool) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    let req = if replace {
        client.put(url.clone())
    } else {
        client.post(url.clone())
    };
    let shown = shown_url(url);
    let resp = req
        .header(
            reqwest::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )
        .body(body)
        .send()
        .await
        .map_err(|e| format!("pushing metrics to {shown}: {}", e.without_url()))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let text = resp.text().await.unwrap_or_default();
    Err(format!(
        "pushing metrics to {shown}: HTTP {status}: {}",
        crate::util::text::printable(text.trim().chars().take(300).collect::<String>().as_str())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ApplyStats;

    fn ingested(batch: &str, cost: &str, succeeded: u64, retried: u64) -> Event {
        Event::Ingested {
            batch_id: batch.into(),
            stats: ApplyStats {
                succeeded,
                failed: retried,
                ..Default::default()
            },
            cost: Usd::parse(cost).unwrap(),
            stage: "main".into(),
            model: "gpt-5.4-mini".into(),
            pricing_mode: "batch".into(),
            usage: Usage {
                input_tokens: 1000,
                output_tokens: 200,
                ..Default::default()
            },
        }
    }

    fn value_of<'a>(text: &'a str, series: &str) -> Option<&'a str> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
    }

    #[test]
    fn the_cost_is_exposed_as_its_exact_decimal_however_many_places() {
        let m = Metrics::new();
        let o = m.observer("nightly", None);
        // 4,321.987654321098 + 0.000000000003: 16 significant digits, which an f64 rounds.
        o.event(&ingested("b1", "4321.987654321098", 10, 1));
        o.event(&ingested("b2", "0.000000000003", 5, 0));
        let text = m.render();
        let series = "nightshift_cost_usd_total{pipeline=\"nightly\",stage=\"main\",model=\"gpt-5.4-mini\",pricing_mode=\"batch\"}";
        assert_eq!(value_of(&text, series), Some("4321.987654321101"), "{text}");
        assert_eq!(m.cost_total(), Usd::parse("4321.987654321101").unwrap());
        assert!(text.contains("# TYPE nightshift_cost_usd_total counter"));
        let succeeded =
            "nightshift_items_total{pipeline=\"nightly\",stage=\"main\",outcome=\"succeeded\"}";
        assert_eq!(value_of(&text, succeeded), Some("15"), "{text}");
        let retries = "nightshift_retries_total{pipeline=\"nightly\",stage=\"main\"}";
        assert_eq!(value_of(&text, retries), Some("1"), "{text}");
        let input = "nightshift_tokens_total{pipeline=\"nightly\",stage=\"main\",model=\"gpt-5.4-mini\",pricing_mode=\"batch\",kind=\"input\"}";
        assert_eq!(value_of(&text, input), Some("2000"), "{text}");
        // Ids never become labels.
        assert!(!text.contains("b1") && !text.contains("b2"), "{text}");
    }

    #[test]
    fn batches_in_flight_count_each_batch_once_until_ingested() {
        let m = Metrics::new();
        let o = m.observer("p", None);
        let submitted = |id: &str| Event::Submitted {
            batch_id: id.into(),
            provider_batch_id: "x".into(),
            requests: 3,
        };
        o.event(&submitted("b1"));
        o.event(&submitted("b2"));
        o.event(&Event::Polled {
            batch_id: "b1".into(),
            status: "in_progress".into(),
            completed: 0,
            failed: 0,
            total: 3,
        });
        let series = "nightshift_batches_in_flight{pipeline=\"p\"}";
        assert_eq!(value_of(&m.render(), series), Some("2"));
        o.event(&ingested("b1", "0.5", 3, 0));
        assert_eq!(value_of(&m.render(), series), Some("1"));
    }

    #[test]
    fn a_textfile_keeps_the_last_success_of_an_earlier_run_when_this_one_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nightshift.prom");
        let ok = Metrics::new();
        let o = ok.observer("p", Some(path.clone()));
        o.event(&Event::RunEnded {
            run_id: "r1".into(),
            status: RunStatus::Completed,
            exit_code: 0,
        });
        let first = std::fs::read_to_string(&path).unwrap();
        let series = "nightshift_run_last_success_timestamp_seconds{pipeline=\"p\"}";
        let at = value_of(&first, series)
            .expect("a success time")
            .to_string();

        let failing = Metrics::new();
        failing.carry_last_success("p", &path);
        let o = failing.observer("p", Some(path.clone()));
        o.event(&Event::RunEnded {
            run_id: "r2".into(),
            status: RunStatus::Failed,
            exit_code: 1,
        });
        let second = std::fs::read_to_string(&path).unwrap();
        assert_eq!(value_of(&second, series), Some(at.as_str()), "{second}");
        assert_eq!(
            value_of(&second, "nightshift_run_last_exit_code{pipeline=\"p\"}"),
            Some("1")
        );
    }

    #[test]
    fn push_urls_name_the_group_and_never_show_a_password() {
        let u = push_url("http://gw.example:9091/", "catalog-enrichment").unwrap();
        assert_eq!(
            u.as_str(),
            "http://gw.example:9091/metrics/job/nightshift/pipeline/catalog-enrichment"
        );
        let secret = push_url("https://user:s3cret@gw.example", "p").unwrap();
        assert!(!shown_url(&secret).contains("s3cret"));
        assert!(push_url("ftp://gw.example", "p").is_err());
        assert!(push_url("not a url", "p").is_err());
    }
}
