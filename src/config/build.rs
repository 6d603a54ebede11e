//! From raw to built: the pure validation of a pipeline file. It collects *every* problem
//! and builds the pipeline all the same, a default standing in for each bad value, so that
//! `nightshift validate` lists them all at once. No I/O (the environment is `preflight`'s).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rust_decimal::Decimal;

use super::raw::*;
use super::*;

fn resolve(dir: &Path, p: &str) -> PathBuf {
    let path = Path::new(p);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        dir.join(path)
    }
}

fn seconds(v: f64) -> Option<Duration> {
    (v.is_finite() && v >= 0.0).then(|| Duration::from_secs_f64(v))
}

pub(super) fn is_loopback_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    let Some(rest) = rest else { return false };
    let host = rest.split('/').next().unwrap_or("");
    let host = if host.starts_with('[') {
        host.split(']').next().map(|h| &h[1..]).unwrap_or("")
    } else {
        host.split(':').next().unwrap_or("")
    };
    matches!(host, "localhost" | "127.0.0.1" | "::1")
}

/// Checks the raw pipeline and builds it, with every problem found. The pipeline is built
/// even when there are problems, with a default in place of each bad or missing value, so the
/// environment checks can still look at the parts that are valid. Problems at paths parsing
/// rejected already (`raw.flagged`) are left out: they only restate that the value is gone.
pub(super) fn validate(raw: RawPipeline, file: &Path, dir: &Path) -> (Pipeline, Vec<Problem>) {
    let mut p: Vec<Problem> = Vec::new();
    let mut need = |path: &str, present: bool| {
        if !present {
            p.push(Problem::new(path, "is required"));
        }
    };

    need("name", raw.name.is_some());
    need("[source]", raw.source.is_some());
    need("[provider]", raw.provider.is_some());
    need("[prompt]", raw.prompt.is_some());
    need("[output]", raw.output.is_some());

    let name_given = raw.name.is_some();
    let name = raw.name.unwrap_or_default();
    if !name.is_empty()
        && !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        p.push(Problem::new(
            "name",
            "use letters, digits, `-`, `_` and `.` only (it names files and store rows)",
        ));
    }
    if name_given && name.is_empty() {
        p.push(Problem::new("name", "must not be empty"));
    }

    // [source]
    let src = raw.source.unwrap_or_default();
    let kind = match src.kind.as_deref() {
        Some("jsonl") => Some(SourceKind::Jsonl),
        Some("csv") => Some(SourceKind::Csv),
        Some(other) => {
            p.push(Problem::new(
                "source.kind",
                format!("unknown kind `{other}` (expected `jsonl` or `csv`)"),
            ));
            None
        }
        None => {
            p.push(Problem::new(
                "source.kind",
                "is required (`jsonl` or `csv`)",
            ));
            None
        }
    };
    if src.path.is_none() {
        p.push(Problem::new("source.path", "is required"));
    }
    match src.id_field.as_deref() {
        None => p.push(Problem::new(
            "source.id_field",
            "is required (the field that identifies a record, e.g. \"sku\")",
        )),
        Some("") => p.push(Problem::new("source.id_field", "must not be empty")),
        _ => {}
    }
    let max_record_bytes = src
        .max_record_bytes
        .unwrap_or(DEFAULT_MAX_RECORD_BYTES as u64);
    if !(64..=(256u64 << 20)).contains(&max_record_bytes) {
        p.push(Problem::new(
            "source.max_record_bytes",
            "must be between 64 bytes and 256 MiB",
        ));
    }
    let delimiter = match src.delimiter.as_deref() {
        None => b',',
        Some("\\t") | Some("\t") => b'\t',
        Some(d) if d.len() == 1 && d.is_ascii() => d.as_bytes()[0],
        Some(d) => {
            p.push(Problem::new(
                "source.delimiter",
                format!("must be one ASCII character, got `{d}`"),
            ));
            b','
        }
    };
    if src.delimiter.is_some() && kind == Some(SourceKind::Jsonl) {
        p.push(Problem::new(
            "source.delimiter",
            "applies only to `kind = \"csv\"`",
        ));
    }

    let max_quarantined_share = match src.max_quarantined_share.map(|v| v.decimal()) {
        None => DEFAULT_MAX_QUARANTINED_SHARE,
        Some(Ok(d)) if d >= Decimal::ZERO && d <= Decimal::ONE => d,
        Some(Ok(d)) => {
            p.push(Problem::new(
                "source.max_quarantined_share",
                format!(
                    "must be between 0 and 1 (the share of the source's records: 0.05 = 5 %, 1 = no cap), got {d}"
                ),
            ));
            DEFAULT_MAX_QUARANTINED_SHARE
        }
        Some(Err(e)) => {
            p.push(Problem::new(
                "source.max_quarantined_share",
                format!("{e} (a ratio between 0 and 1, e.g. \"0.05\")"),
            ));
            DEFAULT_MAX_QUARANTINED_SHARE
        }
    };

    // [provider]
    let prov = raw.provider.unwrap_or_default();
    let pkind = match prov.kind.as_deref() {
        Some("openai") | None => ProviderKind::OpenAi,
        Some("azure") => ProviderKind::Azure,
        Some("anthropic") => ProviderKind::Anthropic,
        Some("gemini") => ProviderKind::Gemini,
        Some(other) => {
            p.push(Problem::new(
                "provider.kind",
                format!("unknown provider `{other}` (supported: openai, azure, anthropic, gemini)"),
            ));
            ProviderKind::OpenAi
        }
    };
    let mode = match prov.mode.as_deref().map(|m| (m, m.parse::<Mode>())) {
        None => Mode::Batch,
        Some((_, Ok(mode))) => mode,
        Some((other, Err(_))) => {
            p.push(Problem::new(
                "provider.mode",
                format!("unknown mode `{other}` (batch or online)"),
            ));
            Mode::Batch
        }
    };
    if mode == Mode::Online && matches!(pkind, ProviderKind::Gemini) {
        p.push(Problem::new(
            "provider.mode",
            "online mode speaks OpenAI-compatible chat completions (openai, azure) and Anthropic messages",
        ));
    }
    if prov.deployment.is_some() && pkind != ProviderKind::Azure {
        p.push(Problem::new(
            "provider.deployment",
            "applies only to `kind = \"azure\"`",
        ));
    }
    if pkind == ProviderKind::Azure && prov.base_url.is_none() && !prov.simulate.unwrap_or(false) {
        p.push(Problem::new(
            "provider.base_url",
            "is required for Azure: your resource endpoint, e.g. \"https://my-resource.openai.azure.com\"",
        ));
    }
    let concurrency = prov.concurrency.unwrap_or(8);
    if !(1..=512).contains(&concurrency) {
        p.push(Problem::new(
            "provider.concurrency",
            "must be between 1 and 512",
        ));
    }
    if prov.requests_per_minute == Some(0) {
        p.push(Problem::new(
            "provider.requests_per_minute",
            "must be above 0",
        ));
    }
    if prov.tokens_per_minute == Some(0) {
        p.push(Problem::new(
            "provider.tokens_per_minute",
            "must be above 0",
        ));
    }
    if prov.retry_online_below.is_some() && mode == Mode::Online {
        p.push(Problem::new(
            "provider.retry_online_below",
            "applies to batch mode (online mode sends everything online already)",
        ));
    }
    match prov.model.as_deref() {
        None => p.push(Problem::new(
            "provider.model",
            "is required, e.g. \"gpt-5.4-mini\"",
        )),
        Some("") => p.push(Problem::new("provider.model", "must not be empty")),
        _ => {}
    }
    let simulate = prov.simulate.unwrap_or(false);
    if let Some(url) = &prov.base_url {
        let https = url.starts_with("https://");
        if !https && !is_loopback_url(url) {
            p.push(Problem::new(
                "provider.base_url",
                "must be an https:// URL (plain http is accepted only for a loopback address), so a typo cannot send the API key to the wrong host",
            ));
        }
        if simulate {
            p.push(Problem::new(
                "provider.base_url",
                "cannot be combined with `simulate = true` (the simulator runs on loopback)",
            ));
        }
    }
    let key = match (&prov.api_key_env, &prov.api_key_file) {
        (Some(_), Some(_)) => {
            p.push(Problem::new(
                "provider.api_key_file",
                "give either api_key_env or api_key_file, not both",
            ));
            KeySource::Env(String::new())
        }
        (None, Some(f)) => KeySource::File(resolve(dir, f)),
        (Some(v), None) => {
            if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                p.push(Problem::new(
                    "provider.api_key_env",
                    "must be the *name* of an environment variable (the key itself never goes in the pipeline file)",
                ));
            }
            KeySource::Env(v.clone())
        }
        (None, None) => KeySource::Env(pkind.default_key_env().into()),
    };
    let simulator = prov.simulator.unwrap_or_default();
    for (field, msg) in simulator.problems() {
        p.push(Problem::new(format!("provider.simulator.{field}"), msg));
    }
    let completion_window = prov.completion_window.unwrap_or_else(|| "24h".into());
    if completion_window != "24h" {
        p.push(Problem::new(
            "provider.completion_window",
            "batch APIs accept only \"24h\"",
        ));
    }
    let mut dur = |field: &str, v: Option<f64>, default: f64| -> Duration {
        match v {
            None => Duration::from_secs_f64(default),
            Some(x) => seconds(x).unwrap_or_else(|| {
                p.push(Problem::new(
                    format!("provider.{field}"),
                    format!("must be a number of seconds ≥ 0, got {x}"),
                ));
                Duration::from_secs_f64(default)
            }),
        }
    };
    // Against the simulator, poll briskly; against a real provider, politely.
    let (poll_min_d, poll_max_d) = if simulate { (0.05, 1.0) } else { (10.0, 300.0) };
    let poll_min = dur("poll_min_seconds", prov.poll_min_seconds, poll_min_d);
    let poll_max = dur("poll_max_seconds", prov.poll_max_seconds, poll_max_d);
    let request_timeout = dur(
        "request_timeout_seconds",
        prov.request_timeout_seconds,
        120.0,
    );
    let reconcile_grace = dur(
        "reconcile_grace_seconds",
        prov.reconcile_grace_seconds,
        if simulate { 0.0 } else { 60.0 },
    );
    let unreachable_timeout = dur(
        "unreachable_timeout_seconds",
        prov.unreachable_timeout_seconds,
        300.0,
    );
    if poll_max < poll_min {
        p.push(Problem::new(
            "provider.poll_max_seconds",
            "must not be below poll_min_seconds",
        ));
    }
    if unreachable_timeout.is_zero() {
        p.push(Problem::new(
            "provider.unreachable_timeout_seconds",
            "must be above 0",
        ));
    }
    if request_timeout.is_zero() {
        p.push(Problem::new(
            "provider.request_timeout_seconds",
            "must be above 0",
        ));
    }
    let max_download_bytes = prov.max_download_bytes.unwrap_or(4 << 30);

    // [prompt]
    let prompt = raw.prompt.unwrap_or_default();
    let user_text = prompt.user.unwrap_or_default();
    let user = match Template::parse(&user_text) {
        Ok(t) => {
            if user_text.is_empty() {
                p.push(Problem::new(
                    "prompt.user",
                    "is required: the user message template, with {{field}} placeholders",
                ));
            } else if !t.has_fields() {
                p.push(Problem::new(
                    "prompt.user",
                    "uses no {{field}} placeholder, so every record would be the same request",
                ));
            }
            t
        }
        Err(e) => {
            p.push(Problem::new("prompt.user", e));
            Template::parse("").expect("empty template parses")
        }
    };
    let max_output_tokens = prompt.max_output_tokens.unwrap_or(0);
    if prompt.max_output_tokens.is_none() {
        p.push(Problem::new(
            "prompt.max_output_tokens",
            "is required: it bounds the cost of every request",
        ));
    } else if max_output_tokens == 0 || max_output_tokens > 1_000_000 {
        p.push(Problem::new(
            "prompt.max_output_tokens",
            "must be between 1 and 1000000",
        ));
    }
    if let Some(t) = prompt.temperature
        && !(0.0..=2.0).contains(&t)
    {
        p.push(Problem::new(
            "prompt.temperature",
            format!("must be between 0 and 2, got {t}"),
        ));
    }

    // [output]
    let out = raw.output.unwrap_or_default();
    if out.schema.is_none() {
        p.push(Problem::new(
            "output.schema",
            "is required: the JSON Schema every answer is validated against",
        ));
    }
    if out.path.is_none() {
        p.push(Problem::new(
            "output.path",
            "is required: where one result line per source record is written",
        ));
    }

    // [retry]
    let max_attempts = raw.retry.and_then(|r| r.max_attempts).unwrap_or(3);
    if !(1..=20).contains(&max_attempts) {
        p.push(Problem::new(
            "retry.max_attempts",
            "must be between 1 and 20",
        ));
    }

    // [batch]
    let b = raw.batch.unwrap_or_default();
    let (limit_requests, limit_bytes) = pkind.batch_limits();
    let max_requests = b.max_requests.unwrap_or(limit_requests as u64);
    if max_requests == 0 || max_requests > limit_requests as u64 {
        p.push(Problem::new(
            "batch.max_requests",
            format!(
                "must be between 1 and {limit_requests} ({}'s limit)",
                pkind.as_str()
            ),
        ));
    }
    let max_bytes = b.max_bytes.unwrap_or(limit_bytes);
    if !(1024..=limit_bytes).contains(&max_bytes) {
        p.push(Problem::new(
            "batch.max_bytes",
            format!(
                "must be between 1024 and {limit_bytes} ({}'s limit)",
                pkind.as_str()
            ),
        ));
    }

    let pricing_file = raw.pricing.and_then(|x| x.file).map(|f| resolve(dir, &f));

    // [budget]
    let b = raw.budget.unwrap_or_default();
    let mut money = |field: &str, v: Option<DecimalText>| -> Option<Usd> {
        let v = v?;
        match Usd::parse(&v.0) {
            Ok(u) if u.pico() > 0 => Some(u),
            Ok(_) => {
                p.push(Problem::new(format!("budget.{field}"), "must be above 0"));
                None
            }
            Err(e) => {
                p.push(Problem::new(format!("budget.{field}"), e.to_string()));
                None
            }
        }
    };
    let budget = Budget {
        max: money("max_usd", b.max_usd),
        max_item: money("max_item_usd", b.max_item_usd),
    };

    // [plan]
    let pl = raw.plan.unwrap_or_default();
    let timing = match pl.timing.as_deref() {
        None | Some("scheduled") => Timing::Scheduled,
        Some("realtime") => Timing::Realtime,
        Some("queued") => Timing::Queued,
        Some("backfill") => Timing::Backfill,
        Some(other) => {
            p.push(Problem::new(
                "plan.timing",
                format!("unknown timing `{other}` (realtime, queued, scheduled or backfill)"),
            ));
            Timing::Scheduled
        }
    };
    let mut ratio = |field: &str, v: Option<DecimalText>, default: Decimal| -> Decimal {
        let Some(v) = v else { return default };
        match v.decimal() {
            Ok(d) if d >= Decimal::ZERO && d <= Decimal::from(10) => d,
            Ok(d) => {
                p.push(Problem::new(
                    format!("plan.{field}"),
                    format!("must be between 0 and 10 (a ratio: 0.05 = 5 %), got {d}"),
                ));
                default
            }
            Err(e) => {
                p.push(Problem::new(format!("plan.{field}"), e.to_string()));
                default
            }
        }
    };
    let retry_rate_given = pl.retry_rate.is_some();
    let retry_rate = ratio("retry_rate", pl.retry_rate, Decimal::new(5, 2));
    let safety_margin = ratio("safety_margin", pl.safety_margin, Decimal::new(10, 2));
    if let Some(t) = pl.expected_output_tokens
        && t > max_output_tokens
        && max_output_tokens > 0
    {
        p.push(Problem::new(
            "plan.expected_output_tokens",
            "cannot exceed prompt.max_output_tokens",
        ));
    }
    let plan = PlanSettings {
        timing,
        unit: pl.unit.unwrap_or_else(|| "record".into()),
        expected_output_tokens: pl.expected_output_tokens,
        retry_rate: retry_rate_given.then_some(retry_rate),
        safety_margin,
    };

    p.retain(|x| !is_flagged(&raw.flagged, &x.path));
    let pipeline = Pipeline {
        name,
        description: raw.description,
        file: file.to_path_buf(),
        dir: dir.to_path_buf(),
        source: SourceConfig {
            kind: kind.unwrap_or(SourceKind::Jsonl),
            path: resolve(dir, src.path.as_deref().unwrap_or_default()),
            id_field: src.id_field.unwrap_or_default(),
            max_record_bytes: max_record_bytes as usize,
            delimiter,
            max_quarantined_share,
        },
        provider: ProviderConfig {
            kind: pkind,
            mode,
            model: prov.model.unwrap_or_default(),
            deployment: prov.deployment,
            api_version: prov.api_version.unwrap_or_else(|| "2024-10-21".into()),
            online: OnlineLimits {
                concurrency: concurrency as usize,
                requests_per_minute: prov.requests_per_minute,
                tokens_per_minute: prov.tokens_per_minute,
            },
            retry_online_below: prov.retry_online_below,
            base_url: prov.base_url.map(|u| u.trim_end_matches('/').to_string()),
            key,
            simulate,
            completion_window,
            poll_min,
            poll_max,
            request_timeout,
            unreachable_timeout,
            reconcile_grace,
            max_download_bytes,
        },
        simulator,
        prompt: PromptConfig {
            system: prompt.system.filter(|s| !s.is_empty()),
            user,
            user_text,
            max_output_tokens,
            temperature: prompt.temperature,
        },
        output: OutputConfig {
            schema: resolve(dir, out.schema.as_deref().unwrap_or_default()),
            path: resolve(dir, out.path.as_deref().unwrap_or_default()),
        },
        max_attempts,
        batch: BatchLimits {
            max_requests: max_requests as usize,
            max_bytes,
        },
        pricing_file,
        budget,
        plan,
    };
    (pipeline, p)
}
