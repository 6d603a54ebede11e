//! From raw to built: the pure validation of a pipeline file. It collects *every* problem
//! and builds the pipeline all the same, a default standing in for each bad value, so that
//! `nightshift validate` lists them all at once. No I/O (the environment is `preflight`'s).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rust_decimal::Decimal;

use super::raw::*;
use super::*;
use crate::provider::config::{BEDROCK_MIN_RECORDS, BedrockSettings};

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
        Some("bedrock") => ProviderKind::Bedrock,
        Some(other) => {
            p.push(Problem::new(
                "provider.kind",
                format!(
                    "unknown provider `{other}` (supported: openai, azure, anthropic, gemini, bedrock)"
                ),
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
    let bedrock = bedrock_settings(&prov, pkind, simulate, &mut p);
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
        (None, None) if pkind == ProviderKind::Bedrock => KeySource::AwsChain,
        (None, None) => KeySource::Env(pkind.default_key_env().into()),
    };
    let mut simulator = prov.simulator.clone().unwrap_or_default();
    if let Some(b) = &bedrock {
        // Requests are signed for the pipeline's region: the simulator expects that one.
        simulator.aws_region = b.region.clone();
    }
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

    // [retry]: the attempt cap of every stage that does not set its own
    let max_attempts = raw.retry.and_then(|r| r.max_attempts).unwrap_or(3);
    if !(1..=20).contains(&max_attempts) {
        p.push(Problem::new(
            "retry.max_attempts",
            "must be between 1 and 20",
        ));
    }

    // [prompt] + output.schema (one stage), or [[stage]] tables
    let out = raw.output.unwrap_or_default();
    let model = prov.model.clone().unwrap_or_default();
    let stages = if raw.staged {
        if raw.prompt.is_some() {
            p.push(Problem::new(
                "[prompt]",
                "with [[stage]] tables each stage has its own prompt: move [prompt] into the first stage as `prompt.system` / `prompt.user` (see README, \"Stages\")",
            ));
        }
        if out.schema.is_some() {
            p.push(Problem::new(
                "output.schema",
                "with [[stage]] tables each stage has its own `schema`: move it into the stage it validates",
            ));
        }
        let ctx = StageDefaults {
            dir,
            model: &model,
            kind: pkind,
            mode,
            max_attempts,
        };
        let mut stages: Vec<Stage> = raw
            .stages
            .into_iter()
            .map(|(path, rs)| stage(&path, rs, &ctx, &mut p))
            .collect();
        check_stages(&mut stages, &mut p);
        if stages.is_empty() {
            p.push(Problem::new(
                "stage",
                "is empty: give at least one [[stage]]",
            ));
        }
        stages
    } else {
        if raw.prompt.is_none() {
            p.push(Problem::new("[prompt]", "is required"));
        }
        if out.schema.is_none() {
            p.push(Problem::new(
                "output.schema",
                "is required: the JSON Schema every answer is validated against",
            ));
        }
        let (prompt, _) = prompt_config("prompt", raw.prompt.unwrap_or_default(), &mut p);
        let schema = resolve(dir, out.schema.as_deref().unwrap_or_default());
        vec![main_stage(prompt, schema, &model, max_attempts)]
    };
    let stages = if stages.is_empty() {
        // Nothing to build from (problems say why): a stand-in, so the rest can be checked.
        let prompt = prompt_config("prompt", RawPrompt::default(), &mut Vec::new()).0;
        vec![main_stage(prompt, PathBuf::new(), &model, max_attempts)]
    } else {
        stages
    };
    let max_output_tokens = stages[0].prompt.max_output_tokens;

    // [output]
    if out.path.is_none() {
        p.push(Problem::new(
            "output.path",
            "is required: where one result line per source record is written",
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

    // [cleanup]
    let c = raw.cleanup.unwrap_or_default();
    let cleanup = Cleanup {
        after_run: c.after_run.unwrap_or(false),
        older_than: match c.older_than.as_deref().map(crate::util::time::parse_age) {
            None => Duration::ZERO,
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                p.push(Problem::new("cleanup.older_than", e));
                Duration::ZERO
            }
        },
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
    if pl.expected_output_tokens.is_some() && stages[0].expected_output_tokens.is_some() {
        p.push(Problem::new(
            format!("stage.{}.expected_output_tokens", stages[0].name),
            "plan.expected_output_tokens already states the first stage's: keep one",
        ));
    }
    let plan = PlanSettings {
        timing,
        unit: pl.unit.unwrap_or_else(|| "record".into()),
        expected_output_tokens: pl
            .expected_output_tokens
            .or(stages[0].expected_output_tokens),
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
            model,
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
            bedrock,
        },
        simulator,
        stages,
        output: OutputConfig {
            path: resolve(dir, out.path.as_deref().unwrap_or_default()),
            include_source: out.include_source.unwrap_or(false),
        },
        batch: BatchLimits {
            max_requests: max_requests as usize,
            max_bytes,
        },
        pricing_file,
        budget,
        plan,
        report: ReportConfig {
            html: raw
                .report
                .and_then(|r| r.html)
                .filter(|h| !h.is_empty())
                .map(|h| resolve(dir, &h)),
        },
        cleanup,
    };
    (pipeline, p)
}

/// The one stage of a file in the one-stage form (top-level `[prompt]`, `output.schema`).
fn main_stage(prompt: PromptConfig, schema: PathBuf, model: &str, max_attempts: u32) -> Stage {
    Stage {
        name: DEFAULT_STAGE.into(),
        for_each: ForEach::Record,
        needs: Vec::new(),
        prompt,
        schema,
        model: model.to_string(),
        max_attempts,
        sample: None,
        when: None,
        when_text: None,
        on_fail: None,
        expected_output_tokens: None,
    }
}

/// What a stage takes from the rest of the file when it does not say.
struct StageDefaults<'a> {
    dir: &'a Path,
    model: &'a str,
    kind: ProviderKind,
    mode: Mode,
    max_attempts: u32,
}

/// Builds a prompt (`[prompt]`, or a stage's `prompt`) at `path`; also returns whether its
/// user template parsed.
fn prompt_config(path: &str, prompt: RawPrompt, p: &mut Vec<Problem>) -> (PromptConfig, bool) {
    let user_text = prompt.user.unwrap_or_default();
    let (user, parsed) = match Template::parse(&user_text) {
        Ok(t) => {
            if user_text.is_empty() {
                p.push(Problem::new(
                    format!("{path}.user"),
                    "is required: the user message template, with {{field}} placeholders",
                ));
            } else if !t.has_fields() {
                p.push(Problem::new(
                    format!("{path}.user"),
                    "uses no {{field}} placeholder, so every record would be the same request",
                ));
            }
            (t, true)
        }
        Err(e) => {
            p.push(Problem::new(format!("{path}.user"), e));
            (Template::parse("").expect("empty template parses"), false)
        }
    };
    let max_output_tokens = prompt.max_output_tokens.unwrap_or(0);
    if prompt.max_output_tokens.is_none() {
        p.push(Problem::new(
            format!("{path}.max_output_tokens"),
            "is required: it bounds the cost of every request",
        ));
    } else if max_output_tokens == 0 || max_output_tokens > 1_000_000 {
        p.push(Problem::new(
            format!("{path}.max_output_tokens"),
            "must be between 1 and 1000000",
        ));
    }
    if let Some(t) = prompt.temperature
        && !(0.0..=2.0).contains(&t)
    {
        p.push(Problem::new(
            format!("{path}.temperature"),
            format!("must be between 0 and 2, got {t}"),
        ));
    }
    (
        PromptConfig {
            system: prompt.system.filter(|s| !s.is_empty()),
            user,
            user_text,
            max_output_tokens,
            temperature: prompt.temperature,
        },
        parsed,
    )
}

/// Builds one `[[stage]]` table; the checks across stages are `check_stages`'.
fn stage(path: &str, rs: RawStage, d: &StageDefaults<'_>, p: &mut Vec<Problem>) -> Stage {
    let name = rs.name.unwrap_or_default();
    if name.is_empty() {
        p.push(Problem::new(
            format!("{path}.name"),
            "is required: the stage's name (it keys its items and names its results)",
        ));
    } else if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        || name.starts_with(|c: char| c.is_ascii_digit())
    {
        p.push(Problem::new(
            format!("{path}.name"),
            "use letters, digits and `_` only, not starting with a digit (templates name a stage's results by it)",
        ));
    } else if name == CHUNK_VAR {
        p.push(Problem::new(
            format!("{path}.name"),
            "`chunk` is the name a chunk stage's template gives its chunk: choose another",
        ));
    }
    let for_each = match (rs.for_each.as_deref(), rs.split) {
        (None | Some("record"), None) => ForEach::Record,
        (None | Some("record"), Some(_)) => {
            p.push(Problem::new(
                format!("{path}.split"),
                "applies only to `for_each = \"chunk\"`",
            ));
            ForEach::Record
        }
        (Some("chunk"), None) => {
            p.push(Problem::new(
                format!("{path}.split"),
                "is required with `for_each = \"chunk\"`: split = { field = \"body\", max_tokens = 1500, overlap_tokens = 100 }",
            ));
            ForEach::Record
        }
        (Some("chunk"), Some(sp)) => {
            let field = sp.field.unwrap_or_default();
            if field.is_empty() {
                p.push(Problem::new(
                    format!("{path}.split.field"),
                    "is required: the record field whose text is split",
                ));
            }
            let max_tokens = sp.max_tokens.unwrap_or(0);
            if !(16..=1_000_000).contains(&max_tokens) {
                p.push(Problem::new(
                    format!("{path}.split.max_tokens"),
                    "is required, between 16 and 1000000 (tokens of the stage's model per chunk)",
                ));
            }
            let overlap_tokens = sp.overlap_tokens.unwrap_or(0);
            if max_tokens >= 16 && overlap_tokens > max_tokens / 2 {
                p.push(Problem::new(
                    format!("{path}.split.overlap_tokens"),
                    format!("must be at most half of max_tokens ({})", max_tokens / 2),
                ));
            }
            ForEach::Chunk(Split {
                field,
                max_tokens,
                overlap_tokens,
            })
        }
        (Some(other), _) => {
            p.push(Problem::new(
                format!("{path}.for_each"),
                format!("unknown value `{other}` (expected \"record\" or \"chunk\")"),
            ));
            ForEach::Record
        }
    };
    let (prompt, _) = prompt_config(&format!("{path}.prompt"), rs.prompt.unwrap_or_default(), p);
    if rs.schema.is_none() {
        p.push(Problem::new(
            format!("{path}.schema"),
            "is required: the JSON Schema every answer of the stage is validated against",
        ));
    }
    let mut model = d.model.to_string();
    if let Some(sp) = rs.provider {
        if let Some(k) = sp.kind
            && k != d.kind.as_str()
        {
            p.push(Problem::new(
                format!("{path}.provider.kind"),
                format!(
                    "every stage is sent through the pipeline's provider ({}); a stage of another kind is not supported",
                    d.kind.as_str()
                ),
            ));
        }
        if let Some(m) = sp.mode
            && m.parse::<Mode>().ok() != Some(d.mode)
        {
            p.push(Problem::new(
                format!("{path}.provider.mode"),
                "every stage is sent in the pipeline's mode (provider.mode); a stage of another mode is not supported",
            ));
        }
        if let Some(m) = sp.model {
            if m.is_empty() {
                p.push(Problem::new(
                    format!("{path}.provider.model"),
                    "must not be empty",
                ));
            } else if d.kind == ProviderKind::Gemini && m != d.model {
                p.push(Problem::new(
                    format!("{path}.provider.model"),
                    "a Gemini batch job is created for one model: every stage uses provider.model",
                ));
            } else {
                model = m;
            }
        }
    }
    let max_attempts = rs.max_attempts.unwrap_or(d.max_attempts);
    if !(1..=20).contains(&max_attempts) {
        p.push(Problem::new(
            format!("{path}.max_attempts"),
            "must be between 1 and 20",
        ));
    }
    let sample = match rs.sample.map(|v| v.decimal()) {
        None => None,
        Some(Ok(d)) if d > Decimal::ZERO && d <= Decimal::ONE => Some(d),
        Some(Ok(d)) => {
            p.push(Problem::new(
                format!("{path}.sample"),
                format!(
                    "must be above 0 and at most 1 (the share of records: 0.05 = 5 %), got {d}"
                ),
            ));
            None
        }
        Some(Err(e)) => {
            p.push(Problem::new(format!("{path}.sample"), e.to_string()));
            None
        }
    };
    let when = rs.when.as_deref().and_then(|w| {
        match Template::parse(&format!("{{% if {w} %}}true{{% endif %}}")) {
            Ok(t) => Some(t),
            Err(e) => {
                p.push(Problem::new(
                    format!("{path}.when"),
                    format!("not a valid condition: {e}"),
                ));
                None
            }
        }
    });
    let on_fail = match rs.on_fail.as_deref() {
        None => None,
        Some("flag") => Some(OnFail::Flag),
        Some("regenerate") => Some(OnFail::Regenerate),
        Some(other) => {
            p.push(Problem::new(
                format!("{path}.on_fail"),
                format!("unknown value `{other}` (expected \"flag\" or \"regenerate\")"),
            ));
            None
        }
    };
    if let Some(t) = rs.expected_output_tokens
        && t > prompt.max_output_tokens
        && prompt.max_output_tokens > 0
    {
        p.push(Problem::new(
            format!("{path}.expected_output_tokens"),
            "cannot exceed prompt.max_output_tokens",
        ));
    }
    Stage {
        name,
        for_each,
        needs: rs.needs.unwrap_or_default(),
        prompt,
        schema: resolve(d.dir, rs.schema.as_deref().unwrap_or_default()),
        model,
        max_attempts,
        sample,
        when,
        when_text: rs.when,
        on_fail,
        expected_output_tokens: rs.expected_output_tokens,
    }
}

/// The checks across stages, all reported in one pass: duplicate names, `needs` naming an
/// unknown stage, the stage itself or a later one (a cycle is named as such), a first stage
/// that needs something or is sampled, a later stage that needs nothing, a template or
/// condition using the results of a stage it does not need, `on_fail` on a stage that
/// reviews nothing. Stages whose `needs` are wrong keep only their valid ones.
fn check_stages(stages: &mut [Stage], p: &mut Vec<Problem>) {
    let names: Vec<String> = stages.iter().map(|s| s.name.clone()).collect();
    let path = |s: &Stage, i: usize| {
        if s.name.is_empty() {
            format!("stage.{}", i + 1)
        } else {
            format!("stage.{}", s.name)
        }
    };
    for (i, s) in stages.iter().enumerate() {
        if !s.name.is_empty() && names[..i].contains(&s.name) {
            p.push(Problem::new(
                format!("{}.name", path(s, i)),
                format!(
                    "a stage named `{}` comes earlier: stage names must differ",
                    s.name
                ),
            ));
        }
    }
    // Cycles, over the whole graph, before the order rule (which a cycle always breaks too).
    let index = |n: &str| names.iter().position(|m| m == n);
    let mut in_cycle = vec![false; stages.len()];
    for start in 0..stages.len() {
        // Depth-first from `start`, looking for a way back to it.
        let mut stack = vec![(start, vec![start])];
        let mut seen = vec![false; stages.len()];
        while let Some((at, trail)) = stack.pop() {
            for n in &stages[at].needs {
                let Some(j) = index(n) else { continue };
                if j == start {
                    if !in_cycle[start] {
                        let mut names_in: Vec<&str> =
                            trail.iter().map(|&k| names[k].as_str()).collect();
                        names_in.push(&names[start]);
                        p.push(Problem::new(
                            format!("{}.needs", path(&stages[start], start)),
                            format!("a cycle: {}", names_in.join(" → needs → ")),
                        ));
                        for &k in &trail {
                            in_cycle[k] = true;
                        }
                    }
                } else if !seen[j] {
                    seen[j] = true;
                    let mut t = trail.clone();
                    t.push(j);
                    stack.push((j, t));
                }
            }
        }
    }
    for i in 0..stages.len() {
        let here = path(&stages[i], i);
        let needs = std::mem::take(&mut stages[i].needs);
        let mut kept = Vec::new();
        for n in needs {
            match index(&n) {
                None => p.push(Problem::new(
                    format!("{here}.needs"),
                    format!("no stage is named `{n}` (stages: {})", names.join(", ")),
                )),
                Some(j) if j == i => p.push(Problem::new(
                    format!("{here}.needs"),
                    "a stage cannot need itself",
                )),
                Some(j) if j > i => {
                    if !in_cycle[i] {
                        p.push(Problem::new(
                            format!("{here}.needs"),
                            format!(
                                "`{n}` comes later in the file: list stages in the order they run"
                            ),
                        ));
                    }
                }
                Some(_) if kept.contains(&n) => {}
                Some(_) => kept.push(n),
            }
        }
        stages[i].needs = kept;
        let s = &stages[i];
        if i == 0 {
            if !s.for_every_record() {
                p.push(Problem::new(
                    format!("{here}.sample"),
                    "the first stage runs for every record: sample and when apply to later stages",
                ));
            }
            if s.on_fail.is_some() {
                p.push(Problem::new(
                    format!("{here}.on_fail"),
                    "the first stage reviews nothing: on_fail belongs to a stage that needs the one it reviews",
                ));
            }
        } else if s.needs.is_empty() && !p.iter().any(|x| x.path == format!("{here}.needs")) {
            p.push(Problem::new(
                format!("{here}.needs"),
                format!(
                    "is required on every stage after the first: the earlier stages whose results it uses (e.g. needs = [\"{}\"])",
                    names[i - 1]
                ),
            ));
        }
        // Results used in the template or the condition must come from needed stages.
        let mut used: Vec<(&str, &str)> = s
            .prompt
            .user
            .fields()
            .map(|(f, _)| (f, "prompt.user"))
            .collect();
        if let Some(w) = &s.when {
            used.extend(w.fields().map(|(f, _)| (f, "when")));
        }
        for (field, at) in used {
            if let Some(j) = index(field)
                && !s.needs.iter().any(|n| n == field)
            {
                let why = if j == i {
                    "the stage's own results do not exist yet".to_string()
                } else {
                    format!(
                        "add `{field}` to needs (the results of a stage are in the template only once it succeeded for the record)"
                    )
                };
                p.push(Problem::new(
                    format!("{here}.{at}"),
                    format!("uses `{field}`, a stage this one does not need: {why}"),
                ));
            }
        }
        if s.on_fail == Some(OnFail::Regenerate) && s.needs.len() != 1 {
            p.push(Problem::new(
                format!("{here}.on_fail"),
                "\"regenerate\" sends the reviewed stage again: the stage must need exactly one stage, the one it reviews",
            ));
        }
    }
}

/// The region a simulated Bedrock pipeline signs for when it names none.
const DEFAULT_SIM_REGION: &str = "us-east-1";

/// The Bedrock keys of `[provider]`: required for `kind = "bedrock"` (but for a simulated run,
/// which has defaults), refused for the other providers.
fn bedrock_settings(
    prov: &RawProvider,
    kind: ProviderKind,
    simulate: bool,
    p: &mut Vec<Problem>,
) -> Option<BedrockSettings> {
    let given: [(&str, bool); 8] = [
        ("region", prov.region.is_some()),
        ("role_arn", prov.role_arn.is_some()),
        ("input_s3_uri", prov.input_s3_uri.is_some()),
        ("output_s3_uri", prov.output_s3_uri.is_some()),
        ("endpoint_url", prov.endpoint_url.is_some()),
        ("s3_endpoint_url", prov.s3_endpoint_url.is_some()),
        ("profile", prov.profile.is_some()),
        ("min_batch_records", prov.min_batch_records.is_some()),
    ];
    if kind != ProviderKind::Bedrock {
        for (field, _) in given.iter().filter(|(_, g)| *g) {
            p.push(Problem::new(
                format!("provider.{field}"),
                "applies only to `kind = \"bedrock\"`",
            ));
        }
        return None;
    }
    if prov.base_url.is_some() {
        p.push(Problem::new(
            "provider.base_url",
            "does not apply to Bedrock: use `endpoint_url` (both services) or `s3_endpoint_url`",
        ));
    }
    if prov.api_key_env.is_some() || prov.api_key_file.is_some() {
        p.push(Problem::new(
            "provider.api_key_env",
            "does not apply to Bedrock: credentials come from the AWS chain (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or `profile`, web identity, or the instance role)",
        ));
    }
    let required = |field: &str, v: &Option<String>, example: &str, p: &mut Vec<Problem>| match v {
        Some(s) if !s.trim().is_empty() => s.trim().to_string(),
        _ if simulate => String::new(),
        _ => {
            p.push(Problem::new(
                format!("provider.{field}"),
                format!("is required for Bedrock, e.g. {example}"),
            ));
            String::new()
        }
    };
    let region = required("region", &prov.region, "\"us-east-1\"", p);
    let role_arn = required(
        "role_arn",
        &prov.role_arn,
        "\"arn:aws:iam::123456789012:role/BedrockBatch\"",
        p,
    );
    let is_role = role_arn.starts_with("arn:aws") && role_arn.contains(":role/");
    if !role_arn.is_empty() && !is_role {
        p.push(Problem::new(
            "provider.role_arn",
            format!("`{role_arn}` is not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)"),
        ));
    }
    let prefix = |field: &str, v: &Option<String>, default: &str, p: &mut Vec<Problem>| {
        let uri = required(field, v, "\"s3://my-bucket/nightshift/\"", p);
        let uri = if uri.is_empty() && simulate {
            default.to_string()
        } else {
            uri
        };
        if !uri.is_empty() {
            let ok = uri
                .strip_prefix("s3://")
                .and_then(|rest| rest.split_once('/').map(|(b, _)| b))
                .is_some_and(|b| !b.is_empty());
            if !ok {
                p.push(Problem::new(
                    format!("provider.{field}"),
                    format!("`{uri}` is not an S3 folder URI like \"s3://my-bucket/nightshift/\""),
                ));
            }
        }
        // A folder: objects go under it.
        if uri.ends_with('/') || uri.is_empty() {
            uri
        } else {
            format!("{uri}/")
        }
    };
    let input_s3_uri = prefix(
        "input_s3_uri",
        &prov.input_s3_uri,
        "s3://nightshift-simulated/input/",
        p,
    );
    let output_s3_uri = prefix(
        "output_s3_uri",
        &prov.output_s3_uri,
        "s3://nightshift-simulated/output/",
        p,
    );
    for (field, url) in [
        ("endpoint_url", &prov.endpoint_url),
        ("s3_endpoint_url", &prov.s3_endpoint_url),
    ] {
        if let Some(u) = url {
            if !u.starts_with("https://") && !is_loopback_url(u) {
                p.push(Problem::new(
                    format!("provider.{field}"),
                    "must be an https:// URL (plain http is accepted only for a loopback address)",
                ));
            }
            if simulate {
                p.push(Problem::new(
                    format!("provider.{field}"),
                    "cannot be combined with `simulate = true` (the simulator runs on loopback)",
                ));
            }
        }
    }
    let min_records = prov.min_batch_records.unwrap_or(BEDROCK_MIN_RECORDS);
    if min_records == 0 {
        p.push(Problem::new(
            "provider.min_batch_records",
            "must be at least 1",
        ));
    }
    Some(BedrockSettings {
        region: if region.is_empty() {
            DEFAULT_SIM_REGION.into()
        } else {
            region
        },
        role_arn: if role_arn.is_empty() {
            "arn:aws:iam::123456789012:role/NightshiftSimulated".into()
        } else {
            role_arn
        },
        input_s3_uri,
        output_s3_uri,
        endpoint_url: prov.endpoint_url.clone(),
        s3_endpoint_url: prov.s3_endpoint_url.clone(),
        profile: prov.profile.clone(),
        min_records,
    })
}
