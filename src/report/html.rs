//! The HTML report: one self-contained page drawn from `report --json` alone (so the page and
//! the JSON cannot disagree), with that JSON embedded as `<script type="application/json">`.
//!
//! No network at view time: inline CSS, charts as inline SVG or CSS bars drawn here, no
//! script, and a Content-Security-Policy that forbids the page any request at all. The layout
//! is laid out by `report.html` (a minijinja template, HTML auto-escaped); this module turns
//! the JSON into display strings and SVG.

use std::str::FromStr;

use minijinja::Environment;
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde_json::{Value, json};

use crate::cost::Usd;
use crate::util::text::{duration_ms, n};

const TEMPLATE: &str = include_str!("report.html");

/// The id of the `<script type="application/json">` element that holds `report --json`.
pub const DATA_ELEMENT_ID: &str = "nightshift-report";

/// At most this many batches are drawn on the timeline (all are in the embedded JSON).
const TIMELINE_ROWS: usize = 120;

/// JSON text safe inside a `<script>` element: `<`, `>` and `&` written as `\u` escapes
/// (they only occur inside strings, where the escape means the same character).
fn embedded_json(v: &Value) -> String {
    let text = v.to_string();
    let mut out = String::with_capacity(text.len() + 64);
    for c in text.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            c => out.push(c),
        }
    }
    out
}

fn safe(s: String) -> minijinja::Value {
    minijinja::Value::from_safe_string(s)
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn count(v: &Value) -> String {
    n(u(v))
}

fn usd(v: &Value) -> Option<Usd> {
    v.as_str().and_then(|s| Usd::parse(s).ok())
}

fn dec(v: &Value) -> Option<Decimal> {
    v.as_str().and_then(|s| Decimal::from_str(s).ok())
}

/// `$0.209052` (at most 6 decimals), `-` when absent.
fn money(v: &Value) -> String {
    usd(v)
        .map(|c| c.display_rounded(6))
        .unwrap_or_else(|| "-".into())
}

/// A per-item figure: up to 8 decimals, `-` when absent.
fn per_item(v: &Value) -> String {
    dec(v)
        .map(|d| format!("${}", d.round_dp(8).normalize()))
        .unwrap_or_else(|| "-".into())
}

/// `part` as a share of `whole`, in percent with one decimal (0 when `whole` is 0).
fn pct(part: Decimal, whole: Decimal) -> Decimal {
    if whole.is_zero() {
        Decimal::ZERO
    } else {
        (part * Decimal::from(100) / whole).round_dp(1)
    }
}

/// A share in percent as CSS/SVG wants it (layout only).
fn width(p: Decimal) -> String {
    p.round_dp(2).normalize().to_string()
}

/// Milliseconds since the epoch of an RFC 3339 time.
fn ms(v: &Value) -> Option<i64> {
    let t =
        time::OffsetDateTime::parse(v.as_str()?, &time::format_description::well_known::Rfc3339)
            .ok()?;
    Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// `2026-12-05 03:12:20 UTC` of an RFC 3339 time.
fn when(v: &Value) -> String {
    match v.as_str() {
        Some(s) if s.len() >= 19 => format!("{} {} UTC", &s[..10], &s[11..19]),
        Some(s) => s.to_string(),
        None => "-".into(),
    }
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// What a verdict means to a reader, and the colour class it is drawn in.
fn verdict_label(v: &str) -> (&'static str, &'static str) {
    match v {
        "ok" => ("ok", "ok"),
        "provider_error" => ("provider error", "warn"),
        "invalid_json" => ("invalid JSON", "warn"),
        "schema_invalid" => ("schema failure", "warn"),
        "truncated" => ("length (out of output tokens)", "warn"),
        "refused" => ("refused", "warn"),
        "empty" => ("empty answer", "warn"),
        "missing" => ("no result returned", "warn"),
        "batch_failed" => ("batch failed", "bad"),
        "batch_rejected" => ("batch rejected", "bad"),
        "expired" => ("batch expired", "bad"),
        "cancelled" => ("cancelled", "bad"),
        "lost" => ("lost", "bad"),
        "pending" => ("not judged yet", "idle"),
        _ => ("other", "idle"),
    }
}

fn status_class(status: &str) -> &'static str {
    match status {
        "completed" => "ok",
        "running" | "detached" => "idle",
        "budget" | "interrupted" => "warn",
        _ => "bad",
    }
}

/// Everything the template shows, as display strings.
fn view(r: &Value) -> Value {
    let processed = u(&r["records"]["processed"]);
    let cost = usd(&r["cost_usd"]).unwrap_or(Usd::ZERO);
    let standard = usd(&r["standard_cost_usd"]).unwrap_or(Usd::ZERO);
    let saved = standard - cost;
    let saved_pct = pct(saved.to_decimal(), standard.to_decimal());
    let duration = r["duration_seconds"]
        .as_f64()
        .map(|s| duration_ms((s * 1000.0).round() as i64));
    let cards = vec![
        json!({"label": "processed items", "value": count(&r["records"]["processed"]),
            "sub": format!("of {} valid records · {} read", count(&r["records"]["valid"]), count(&r["records"]["read"]))}),
        json!({"label": "cost", "value": money(&r["cost_usd"]),
            "sub": format!("{} prices · {} at standard", r["pricing_mode"].as_str().unwrap_or("-"), money(&r["standard_cost_usd"]))}),
        json!({"label": "cost per processed item", "value": per_item(&r["cost_per_processed_item_usd"]),
            "sub": format!("{} at standard prices", per_item(&r["standard_cost_per_processed_item_usd"]))}),
        json!({"label": "calls per processed item",
            "value": r["calls_per_processed_item"].as_str().map(str::to_string)
                .or_else(|| (processed > 0).then(|| (Decimal::from(u(&r["attempts"])) / Decimal::from(processed)).round_dp(2).normalize().to_string()))
                .unwrap_or_else(|| "-".into()),
            "sub": format!("{} attempts · {} retries", count(&r["attempts"]), count(&r["retries"]))}),
        json!({"label": "saved", "value": saved.display_rounded(6),
            "sub": format!("{saved_pct}% against standard prices")}),
        json!({"label": "items", "value": format!("{} ok", count(&r["items"]["succeeded"])),
            "sub": format!("{} failed · {} unfinished · {} reused", count(&r["items"]["failed"]), count(&r["items"]["unfinished"]), count(&r["items"]["reused"]))}),
    ];
    let top = cost.to_decimal().max(standard.to_decimal());
    let price = json!({
        "batch": money(&r["cost_usd"]),
        "standard": money(&r["standard_cost_usd"]),
        "batch_width": width(pct(cost.to_decimal(), top)),
        "standard_width": width(pct(standard.to_decimal(), top)),
        "saved": saved.display_rounded(6),
        "saved_pct": saved_pct.to_string(),
    });
    json!({
        "pipeline": r["pipeline"],
        "run_id": r["run_id"],
        "status": r["status"],
        "status_class": status_class(r["status"].as_str().unwrap_or_default()),
        "provider": r["provider"],
        "model": r["model"],
        "pricing_mode": r["pricing_mode"],
        "started": when(&r["started_at"]),
        "duration": duration,
        "message": r["message"],
        "cards": cards,
        "price": price,
        "costs": costs(r, cost),
        "stages": stages(r),
        "outcomes": outcomes(r),
        "timeline": timeline(&r["batch_timeline"]),
        "plan": plan(r),
        "history": history(r),
        "data_id": DATA_ELEMENT_ID,
    })
}

/// Cost and tokens per stage, model and pricing mode, with each row's share of the cost.
fn costs(r: &Value, total: Usd) -> Value {
    let rows: Vec<Value> = r["by_model"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let share = pct(
                usd(&c["cost_usd"]).unwrap_or(Usd::ZERO).to_decimal(),
                total.to_decimal(),
            );
            json!({
                "stage": c["stage"], "model": c["model"], "pricing_mode": c["pricing_mode"],
                "calls": count(&c["calls"]),
                "input": count(&c["tokens"]["input"]),
                "cached": count(&c["tokens"]["cached_input"]),
                "output": count(&c["tokens"]["output"]),
                "reasoning": count(&c["tokens"]["reasoning"]),
                "cost": money(&c["cost_usd"]),
                "standard": money(&c["standard_cost_usd"]),
                "per_item": per_item(&c["cost_per_processed_item_usd"]),
                "share": share.to_string(),
                "width": width(share),
            })
        })
        .collect();
    Value::Array(rows)
}

/// A multi-stage run's stages (empty for one stage).
fn stages(r: &Value) -> Value {
    r["stages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let review = if s["review"].is_object() {
                format!(
                    "{} pass · {} flagged",
                    count(&s["review"]["pass"]),
                    count(&s["review"]["fail"])
                )
            } else {
                "-".into()
            };
            json!({
                "stage": s["stage"],
                "records": count(&s["records"]),
                "skipped": count(&s["skipped_records"]),
                "items": count(&s["items"]),
                "attempts": count(&s["attempts"]),
                "retries": count(&s["retries"]),
                "input": count(&s["tokens"]["input"]),
                "output": count(&s["tokens"]["output"]),
                "cost": money(&s["cost_usd"]),
                "per_item": per_item(&s["cost_per_processed_item_usd"]),
                "calls": s["calls_per_processed_item"].as_str().unwrap_or("-"),
                "models": s["models"].as_array().map(|m| m.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")).unwrap_or_default(),
                "review": review,
            })
        })
        .collect()
}

/// Attempts by verdict, per stage: a stacked bar and its table, and the reviews that
/// flagged records.
fn outcomes(r: &Value) -> Value {
    let mut stages: Vec<(String, Vec<(String, u64)>)> = Vec::new();
    for o in r["outcomes"].as_array().into_iter().flatten() {
        let stage = o["stage"].as_str().unwrap_or_default().to_string();
        let verdict = o["verdict"].as_str().unwrap_or_default().to_string();
        match stages.iter_mut().find(|(s, _)| *s == stage) {
            Some((_, v)) => v.push((verdict, u(&o["attempts"]))),
            None => stages.push((stage, vec![(verdict, u(&o["attempts"]))])),
        }
    }
    // The pipeline's stage order, as the run's figures list them.
    let order: Vec<&str> = r["stages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["stage"].as_str())
        .collect();
    stages.sort_by_key(|(s, _)| order.iter().position(|o| o == s).unwrap_or(usize::MAX));
    let reviews: Vec<(String, u64, u64)> = r["stages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["review"].is_object())
        .map(|s| {
            (
                s["stage"].as_str().unwrap_or_default().to_string(),
                u(&s["review"]["pass"]),
                u(&s["review"]["fail"]),
            )
        })
        .collect();
    let groups: Vec<Value> = stages
        .into_iter()
        .map(|(stage, mut verdicts)| {
            // ok first, then by how many
            verdicts.sort_by(|a, b| (b.0 == "ok").cmp(&(a.0 == "ok")).then(b.1.cmp(&a.1)));
            let total: u64 = verdicts.iter().map(|v| v.1).sum();
            let rows: Vec<Value> = verdicts
                .iter()
                .map(|(v, k)| {
                    let (label, class) = verdict_label(v);
                    let share = pct(Decimal::from(*k), Decimal::from(total));
                    json!({"verdict": v, "label": label, "class": class, "attempts": n(*k),
                        "share": share.to_string(), "width": width(share)})
                })
                .collect();
            let review = reviews.iter().find(|r| r.0 == stage).map(|r| {
                json!({"pass": n(r.1), "flagged": n(r.2),
                    "share": pct(Decimal::from(r.2), Decimal::from(r.1 + r.2)).to_string()})
            });
            json!({"stage": stage, "total": n(total), "rows": rows, "review": review})
        })
        .collect();
    Value::Array(groups)
}

/// The batches on a time axis (created → submitted → ended → results applied), and a table.
fn timeline(batches: &Value) -> Value {
    let list: Vec<&Value> = batches.as_array().into_iter().flatten().collect();
    if list.is_empty() {
        return Value::Null;
    }
    let times = |b: &Value| {
        [
            ms(&b["created_at"]),
            ms(&b["submitted_at"]),
            ms(&b["ended_at"]),
            ms(&b["ingested_at"]),
        ]
    };
    let t0 = list
        .iter()
        .filter_map(|b| ms(&b["created_at"]))
        .min()
        .unwrap_or(0);
    let t1 = list
        .iter()
        .flat_map(|b| times(b).into_iter().flatten())
        .max()
        .unwrap_or(t0)
        .max(t0 + 1);
    let span = (t1 - t0) as f64;
    let shown = &list[..list.len().min(TIMELINE_ROWS)];
    let (left, right, row_h, top) = (240.0, 985.0, 22.0, 8.0);
    let x = |t: i64| left + (right - left) * ((t - t0) as f64 / span);
    let height = top + row_h * shown.len() as f64 + 30.0;
    let mut svg = format!(
        "<svg class=\"timeline\" viewBox=\"0 0 1000 {height}\" role=\"img\" aria-label=\"batches over time\">"
    );
    for (i, b) in shown.iter().enumerate() {
        let y = top + row_h * i as f64;
        let [created, submitted, ended, ingested] = times(b);
        let created = created.unwrap_or(t0);
        let end_class = match b["end_state"].as_str() {
            Some("completed") => "ok",
            Some("expired") => "warn",
            Some("cancelled") => "idle",
            Some(_) => "bad",
            None => "run",
        };
        let id = b["batch_id"].as_str().unwrap_or_default();
        let short: String = id.chars().take(13).collect();
        let mode = b["mode"].as_str().unwrap_or_default();
        svg.push_str(&format!(
            "<text x=\"4\" y=\"{:.1}\" class=\"lbl\">{} · {} {}</text>",
            y + 15.0,
            esc(&short),
            n(u(&b["requests"])),
            if mode == "online" { "online" } else { "req" }
        ));
        let title = format!(
            "{id} ({mode}) · {} requests · {} · provider status {} · created {} · submitted {} · ended {} · applied {}",
            n(u(&b["requests"])),
            b["end_state"]
                .as_str()
                .or(b["state"].as_str())
                .unwrap_or("-"),
            b["provider_status"].as_str().unwrap_or("-"),
            when(&b["created_at"]),
            when(&b["submitted_at"]),
            when(&b["ended_at"]),
            when(&b["ingested_at"]),
        );
        svg.push_str(&format!("<g><title>{}</title>", esc(&title)));
        let mut seg = |from: i64, to: i64, class: &str, h: f64| {
            let (a, z) = (x(from), x(to.max(from)));
            svg.push_str(&format!(
                "<rect x=\"{a:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" class=\"{class}\"/>",
                y + (row_h - h) / 2.0,
                (z - a).max(1.5)
            ));
        };
        let sent = submitted.unwrap_or(created);
        seg(created, sent, "prep", 6.0);
        seg(sent, ended.unwrap_or(t1), end_class, 12.0);
        if let (Some(e), Some(g)) = (ended, ingested) {
            seg(e, g, "apply", 6.0);
        }
        svg.push_str("</g>");
    }
    let axis_y = top + row_h * shown.len() as f64 + 4.0;
    svg.push_str(&format!(
        "<line x1=\"{left}\" x2=\"{right}\" y1=\"{axis_y}\" y2=\"{axis_y}\" class=\"axis\"/>"
    ));
    for k in 0..=4 {
        let t = t0 + (t1 - t0) * k / 4;
        let anchor = match k {
            0 => "start",
            4 => "end",
            _ => "middle",
        };
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" class=\"lbl\" text-anchor=\"{anchor}\">+{}</text>",
            x(t),
            axis_y + 18.0,
            duration_ms(t - t0)
        ));
    }
    svg.push_str("</svg>");
    let rows: Vec<Value> = list
        .iter()
        .map(|b| {
            let took = match (
                ms(&b["created_at"]),
                ms(&b["ingested_at"]).or(ms(&b["ended_at"])),
            ) {
                (Some(a), Some(z)) => duration_ms(z - a),
                _ => "-".into(),
            };
            json!({
                "batch_id": b["batch_id"],
                "provider_batch_id": b["provider_batch_id"],
                "stage": b["stage"], "mode": b["mode"], "model": b["model"],
                "requests": count(&b["requests"]),
                "state": b["end_state"].as_str().or(b["state"].as_str()),
                "provider_status": b["provider_status"],
                "created": when(&b["created_at"]),
                "took": took,
            })
        })
        .collect();
    json!({
        "svg": svg,
        "rows": rows,
        "hidden": list.len().saturating_sub(shown.len()),
        "span": duration_ms(t1 - t0),
    })
}

/// Plan vs actual, for the whole run and per stage.
fn plan(r: &Value) -> Value {
    let lines = |v: &Value| -> Vec<Value> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|l| {
                let diff = l["difference"].as_str().unwrap_or("-");
                let class = if diff.starts_with('+') && diff != "+0" {
                    "up"
                } else if diff.starts_with('-') && diff != "-" {
                    "down"
                } else {
                    ""
                };
                json!({"stage": l["stage"], "figure": l["figure"], "plan": l["plan"],
                    "actual": l["actual"], "difference": diff, "class": class})
            })
            .collect()
    };
    let run = lines(&r["plan_vs_actual"]);
    if run.is_empty() {
        return Value::Null;
    }
    json!({"run": run, "stages": lines(&r["plan_vs_actual_per_stage"])})
}

/// Cost per processed item night by night: bars, oldest on the left, this run marked.
fn history(r: &Value) -> Value {
    let runs: Vec<&Value> = r["history"].as_array().into_iter().flatten().collect();
    if runs.is_empty() {
        return Value::Null;
    }
    let this = r["run_id"].as_str().unwrap_or_default();
    let values: Vec<Option<Decimal>> = runs
        .iter()
        .map(|h| dec(&h["cost_per_processed_item_usd"]))
        .collect();
    let top = values
        .iter()
        .flatten()
        .copied()
        .max()
        .unwrap_or(Decimal::ZERO);
    let (left, right, base, height) = (90.0, 990.0, 170.0, 150.0);
    let slot = (right - left) / runs.len() as f64;
    let bar = (slot * 0.7).min(40.0);
    let mut svg = String::from(
        "<svg class=\"history\" viewBox=\"0 0 1000 200\" role=\"img\" aria-label=\"cost per processed item by run\">",
    );
    svg.push_str(&format!(
        "<line x1=\"{left}\" x2=\"{right}\" y1=\"{base}\" y2=\"{base}\" class=\"axis\"/>"
    ));
    if !top.is_zero() {
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" class=\"lbl\" text-anchor=\"end\">${}</text>",
            left - 6.0,
            base - height + 4.0,
            top.round_dp(8).normalize()
        ));
    }
    svg.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{base}\" class=\"lbl\" text-anchor=\"end\">$0</text>",
        left - 6.0
    ));
    let every = runs.len().div_ceil(10).max(1);
    for (i, (h, v)) in runs.iter().zip(&values).enumerate() {
        let cx = left + slot * (i as f64 + 0.5);
        let share = match (v, top.is_zero()) {
            (Some(v), false) => (*v / top).to_f64().unwrap_or(0.0),
            _ => 0.0,
        };
        let bh = (height * share).max(if v.is_some() { 1.0 } else { 0.0 });
        let class = if h["run_id"].as_str() == Some(this) {
            "bar this"
        } else {
            "bar"
        };
        let title = format!(
            "{} · {} · {} per processed item · {} processed · {} in all",
            when(&h["started_at"]),
            h["status"].as_str().unwrap_or("-"),
            per_item(&h["cost_per_processed_item_usd"]),
            count(&h["processed"]),
            money(&h["cost_usd"]),
        );
        svg.push_str(&format!(
            "<g><title>{}</title><rect x=\"{:.1}\" y=\"{:.1}\" width=\"{bar:.1}\" height=\"{bh:.1}\" class=\"{class}\"/></g>",
            esc(&title),
            cx - bar / 2.0,
            base - bh
        ));
        if i % every == 0 || i + 1 == runs.len() {
            let day = h["started_at"]
                .as_str()
                .map(|s| s.get(5..10).unwrap_or(s))
                .unwrap_or("");
            svg.push_str(&format!(
                "<text x=\"{cx:.1}\" y=\"{:.1}\" class=\"lbl\" text-anchor=\"middle\">{}</text>",
                base + 18.0,
                esc(day)
            ));
        }
    }
    svg.push_str("</svg>");
    let rows: Vec<Value> = runs
        .iter()
        .rev()
        .map(|h| {
            json!({
                "run_id": h["run_id"],
                "this": h["run_id"].as_str() == Some(this),
                "started": when(&h["started_at"]),
                "status": h["status"],
                "processed": count(&h["processed"]),
                "cost": money(&h["cost_usd"]),
                "per_item": per_item(&h["cost_per_processed_item_usd"]),
                "calls": h["calls_per_processed_item"].as_str().unwrap_or("-"),
            })
        })
        .collect();
    json!({"svg": svg, "rows": rows, "runs": runs.len()})
}

/// The page for one run's `report --json` object, with that object embedded.
pub fn render(report: &Value) -> Result<String, minijinja::Error> {
    let mut env = Environment::new();
    env.add_template("report.html", TEMPLATE)?;
    let view = view(report);
    let ctx = minijinja::context! {
        v => minijinja::Value::from(minijinja::value::Serde(&view)),
        timeline_svg => safe(view["timeline"]["svg"].as_str().unwrap_or_default().to_string()),
        history_svg => safe(view["history"]["svg"].as_str().unwrap_or_default().to_string()),
        data => safe(embedded_json(report)),
    };
    env.get_template("report.html")?.render(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Text from a source file or a provider (a run's message, a model name) can hold markup:
    /// it is shown as text, and the embedded JSON still reads back as the same object.
    #[test]
    fn hostile_text_stays_text_and_the_data_reads_back() {
        let evil = "</script><img src=x onerror=alert(1)><!-- & \u{2028}";
        let report = json!({
            "run_id": "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
            "pipeline": evil,
            "status": "completed",
            "model": evil,
            "message": evil,
            "cost_usd": "0.5", "standard_cost_usd": "1",
            "records": {"processed": 2, "valid": 2, "read": 2},
            "by_model": [{"stage": evil, "model": evil, "pricing_mode": "batch", "calls": 2,
                "tokens": {"input": 10}, "cost_usd": "0.5", "standard_cost_usd": "1"}],
            "outcomes": [{"stage": evil, "verdict": "ok", "attempts": 2}],
            "batch_timeline": [{"batch_id": evil, "mode": "batch", "requests": 2,
                "created_at": "2026-12-05T03:00:00Z", "submitted_at": "2026-12-05T03:00:01Z",
                "ended_at": "2026-12-05T03:10:00Z", "ingested_at": "2026-12-05T03:10:02Z",
                "end_state": "completed", "provider_status": evil}],
            "history": [{"run_id": "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", "started_at": "2026-12-05T03:00:00Z",
                "status": "completed", "processed": 2, "cost_usd": "0.5",
                "cost_per_processed_item_usd": "0.25"}],
        });
        let page = render(&report).unwrap();
        assert!(!page.contains("<img"), "markup reached the page as markup");
        assert!(!page.contains("<!-- &"));
        assert_eq!(page.matches("</script>").count(), 1);
        let open = format!("<script type=\"application/json\" id=\"{DATA_ELEMENT_ID}\">");
        let start = page.find(&open).unwrap() + open.len();
        let end = start + page[start..].find("</script>").unwrap();
        let back: Value = serde_json::from_str(&page[start..end]).unwrap();
        assert_eq!(back, report);
        // The figures are drawn: the cost share, the batch bar, this run's history bar.
        assert!(page.contains("$0.50"), "{page}");
        assert!(page.contains("class=\"ok\""));
        assert!(page.contains("class=\"bar this\""));
    }
}
