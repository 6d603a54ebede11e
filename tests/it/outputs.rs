//! The results file in each format: a pipeline is run once, then again with another `--out`
//! on the same store (which sends nothing), and the CSV and Parquet files are read back and
//! rebuilt into JSON lines, which must be exactly the JSON lines file's: every record, its
//! status, attempts, each answer field with its type, the error, and the source's fields.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use arrow_array::Array;
use arrow_array::cast::AsArray;
use arrow_array::types::{Decimal128Type, Float64Type, Int64Type};
use arrow_schema::DataType;
use nightshift::cost::Usd;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{Value, json};

use crate::cli::bin;
use crate::common::{write_pipeline, write_source};

struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run(file: &Path, out: &Path) -> Ran {
    let o = bin()
        .arg("run")
        .arg(file)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    Ran {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Runs `file` writing JSON lines, then CSV, then Parquet; the later runs send nothing.
fn three_formats(file: &Path, code: i32) -> (PathBuf, PathBuf, PathBuf) {
    let dir = file.parent().unwrap();
    let paths = ["results.jsonl", "results.csv", "results.parquet"].map(|n| dir.join(n));
    for (k, p) in paths.iter().enumerate() {
        let r = run(file, p);
        let show = format!("{:?}\n{}\n{}", r.code, r.stdout, r.stderr);
        assert_eq!(r.code, Some(code), "{show}");
        if k > 0 {
            let sent = r.stdout.lines().find_map(|l| l.trim().strip_prefix("sent"));
            assert!(
                sent.is_some_and(|s| s.trim_start().starts_with("0 requests")),
                "{show}"
            );
        }
    }
    let [a, b, c] = paths;
    (a, b, c)
}

fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A line without its null fields (a table has no "absent": both are an empty cell), and a
/// staged line without `flagged`, which is `review = fail` (checked here).
fn normalized(v: &Value) -> Value {
    fn strip(v: &Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.clone(), strip(v)))
                    .collect(),
            ),
            Value::Array(a) => Value::Array(a.iter().map(strip).collect()),
            v => v.clone(),
        }
    }
    let mut v = strip(v);
    let m = v.as_object_mut().unwrap();
    if let Some(flagged) = m.remove("flagged") {
        assert_eq!(flagged, json!(true));
        assert_eq!(m["review"], "fail");
    }
    v
}

/// Every number as a float: a float column holds an integer the JSON had as `2` as `2.0`
/// (the columns' types are checked on their own).
fn floats(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), floats(v))).collect()),
        Value::Array(a) => Value::Array(a.iter().map(floats).collect()),
        Value::Number(n) => json!(n.as_f64().unwrap()),
        v => v.clone(),
    }
}

/// A row rebuilt into a JSON line: `output.a.b` → `output.a.b`, `stage.s.x` →
/// `stages.s.x`, `source.k` → `source.k`, each `_extra` merged into its object.
fn rebuild(row: &[(String, Value)]) -> Value {
    fn merge(into: &mut Value, from: Value) {
        match (into, from) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(Value::Null), v);
                }
            }
            (slot, v) => *slot = v,
        }
    }
    let mut out = json!({});
    for (name, v) in row {
        if v.is_null() {
            continue;
        }
        let path: Vec<String> = if let Some(k) = name.strip_prefix("source.") {
            vec!["source".into(), k.into()]
        } else if let Some(rest) = name.strip_prefix("stage.") {
            std::iter::once("stages".to_string())
                .chain(rest.split('.').map(str::to_string))
                .collect()
        } else {
            name.split('.').map(str::to_string).collect()
        };
        let (last, parents) = path.split_last().unwrap();
        let mut slot = &mut out;
        for p in parents {
            slot = slot
                .as_object_mut()
                .unwrap()
                .entry(p.clone())
                .or_insert(json!({}));
        }
        if last == "_extra" {
            merge(slot, v.clone());
        } else {
            slot.as_object_mut()
                .unwrap()
                .insert(last.clone(), v.clone());
        }
    }
    out
}

/// A row of a table file: (column, value), in column order.
type Row = Vec<(String, Value)>;

/// The columns holding JSON text: `_extra`, and those named.
fn is_json(name: &str, json_columns: &[&str]) -> bool {
    name.ends_with("._extra") || json_columns.contains(&name)
}

/// The Parquet file: its column names and types, and its rows as (column, value).
fn parquet_rows(path: &Path, json_columns: &[&str]) -> (Vec<(String, DataType)>, Vec<Row>) {
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap()).unwrap();
    let schema = builder.schema().clone();
    let columns: Vec<(String, DataType)> = schema
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().clone()))
        .collect();
    let mut rows = Vec::new();
    for batch in builder.build().unwrap() {
        let batch = batch.unwrap();
        for i in 0..batch.num_rows() {
            let mut row = Vec::new();
            for (k, (name, ty)) in columns.iter().enumerate() {
                let col = batch.column(k);
                let v = if col.is_null(i) {
                    Value::Null
                } else {
                    match ty {
                        DataType::Utf8 => {
                            let s = col.as_string::<i32>().value(i);
                            if is_json(name, json_columns) {
                                serde_json::from_str(s).unwrap()
                            } else {
                                json!(s)
                            }
                        }
                        DataType::Int64 => json!(col.as_primitive::<Int64Type>().value(i)),
                        DataType::Float64 => json!(col.as_primitive::<Float64Type>().value(i)),
                        DataType::Boolean => json!(col.as_boolean().value(i)),
                        DataType::Decimal128(38, 12) => json!(
                            Usd::from_pico(col.as_primitive::<Decimal128Type>().value(i))
                                .to_string()
                        ),
                        other => panic!("column {name} of unexpected type {other}"),
                    }
                };
                row.push((name.clone(), v));
            }
            rows.push(row);
        }
    }
    (columns, rows)
}

/// The CSV file's header, and its rows as (column, value), each cell read as the Parquet
/// file types its column (the formula guard's `'` taken off text).
fn csv_rows(
    path: &Path,
    types: &[(String, DataType)],
    json_columns: &[&str],
) -> (Vec<String>, Vec<Row>) {
    let mut rdr = csv::Reader::from_path(path).unwrap();
    let header: Vec<String> = rdr.headers().unwrap().iter().map(String::from).collect();
    let mut rows = Vec::new();
    for rec in rdr.records() {
        let rec = rec.unwrap();
        let row = header
            .iter()
            .zip(rec.iter())
            .map(|(name, cell)| {
                let ty = &types.iter().find(|(n, _)| n == name).unwrap().1;
                let v = if cell.is_empty() {
                    Value::Null
                } else if is_json(name, json_columns) {
                    serde_json::from_str(cell).unwrap()
                } else {
                    match ty {
                        DataType::Int64 => json!(cell.parse::<i64>().unwrap()),
                        DataType::Float64 => json!(cell.parse::<f64>().unwrap()),
                        DataType::Boolean => json!(cell.parse::<bool>().unwrap()),
                        _ => {
                            let unguarded = cell
                                .strip_prefix('\'')
                                .filter(|s| s.starts_with(['=', '+', '-', '@', '\t', '\r']));
                            json!(unguarded.unwrap_or(cell))
                        }
                    }
                };
                (name.clone(), v)
            })
            .collect();
        rows.push(row);
    }
    (header, rows)
}

/// Reads all three files and checks the CSV and Parquet rows rebuild the JSON lines exactly;
/// returns the JSON lines, the CSV header and the Parquet columns.
fn same_content(
    (jsonl, csv, parquet): &(PathBuf, PathBuf, PathBuf),
    json_columns: &[&str],
) -> (Vec<Value>, Vec<String>, Vec<(String, DataType)>) {
    let lines = json_lines(jsonl);
    let (types, prows) = parquet_rows(parquet, json_columns);
    let (header, crows) = csv_rows(csv, &types, json_columns);
    let names: Vec<&String> = types.iter().map(|(n, _)| n).collect();
    assert_eq!(header.iter().collect::<Vec<_>>(), names, "same columns");
    assert_eq!(lines.len(), crows.len());
    assert_eq!(lines.len(), prows.len());
    for ((line, c), p) in lines.iter().zip(&crows).zip(&prows) {
        let want = floats(&normalized(line));
        assert_eq!(floats(&rebuild(c)), want, "CSV row\n{c:?}");
        assert_eq!(floats(&rebuild(p)), want, "Parquet row\n{p:?}");
    }
    (lines, header, types)
}

const RICH_SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "properties": {
    "label": {"enum": ["billing", "bug", "shipping", "other"]},
    "summary": {"type": "string", "minLength": 5, "maxLength": 120},
    "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    "score": {"type": "integer", "minimum": 1, "maximum": 5},
    "urgent": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    "detail": {
      "type": "object",
      "properties": {
        "channel": {"enum": ["email", "phone", "chat"]},
        "words": {"type": "integer", "minimum": 0},
        "note": {"type": ["string", "null"], "maxLength": 40}
      },
      "required": ["channel", "words", "note"],
      "additionalProperties": false
    }
  },
  "required": ["label", "summary", "confidence", "score", "urgent", "tags", "detail"],
  "additionalProperties": false
}"#;

#[test]
fn csv_and_parquet_hold_exactly_what_the_json_lines_hold() {
    let dir = tempfile::tempdir().unwrap();
    let source = write_source(dir.path(), 60, 10, 5);
    let file = write_pipeline(
        dir.path(),
        1,
        100,
        "[provider.simulator]\nbatch_seconds = 0.2\nretry_after_ms = 20\nfail_rate = 0.2\n",
    );
    std::fs::write(dir.path().join("schema.json"), RICH_SCHEMA).unwrap();
    // Some items fail for good (one attempt each): the run exits 1.
    let files = three_formats(&file, 1);
    let (lines, header, types) = same_content(&files, &["output.tags"]);
    assert_eq!(lines.len(), source.valid);
    assert!(
        lines
            .iter()
            .any(|l| l["status"] == "failed" && l["error"].is_string())
    );
    assert!(lines.iter().any(|l| l["status"] == "succeeded"));
    assert_eq!(
        header,
        [
            "id",
            "line",
            "status",
            "attempts",
            "output.label",
            "output.summary",
            "output.confidence",
            "output.score",
            "output.urgent",
            "output.tags",
            "output.detail.channel",
            "output.detail.words",
            "output.detail.note",
            "output._extra",
            "error"
        ]
    );
    let ty = |n: &str| types.iter().find(|(c, _)| c == n).unwrap().1.clone();
    assert_eq!(ty("line"), DataType::Int64);
    assert_eq!(ty("attempts"), DataType::Int64);
    assert_eq!(ty("output.confidence"), DataType::Float64);
    assert_eq!(ty("output.score"), DataType::Int64);
    assert_eq!(ty("output.urgent"), DataType::Boolean);
    assert_eq!(ty("output.detail.words"), DataType::Int64);
    assert_eq!(ty("output.label"), DataType::Utf8);
}

#[test]
fn include_source_adds_the_records_fields_from_a_jsonl_or_a_csv_source() {
    // JSON lines: fields of several types, one only some records have.
    let dir = tempfile::tempdir().unwrap();
    let records: Vec<Value> = (0..24)
        .map(|i| {
            let mut r = json!({
                "id": format!("r{i}"),
                "text": format!("Ticket {i}: my parcel {} never arrived", i * 31),
                "n": i,
                "price": if i % 2 == 0 { json!(i) } else { json!(i as f64 + 0.5) },
                "vip": i % 3 == 0,
                "meta": {"shop": format!("s{}", i % 4), "tags": ["a", "b"]},
            });
            if i % 5 == 0 {
                r["note"] = json!("=call back");
            }
            r
        })
        .collect();
    let text: String = records.iter().map(|r| r.to_string() + "\n").collect();
    std::fs::write(dir.path().join("records.jsonl"), text).unwrap();
    let file = write_pipeline(dir.path(), 3, 100, "");
    with_source(&file);
    let files = three_formats(&file, 0);
    let (lines, header, types) = same_content(&files, &["source.meta"]);
    for (line, record) in lines.iter().zip(&records) {
        assert_eq!(line["source"], *record);
    }
    assert_eq!(
        header[header.len() - 8..],
        [
            "error",
            "source.id",
            "source.meta",
            "source.n",
            "source.note",
            "source.price",
            "source.text",
            "source.vip"
        ]
    );
    let ty = |n: &str| types.iter().find(|(c, _)| c == n).unwrap().1.clone();
    assert_eq!(ty("source.n"), DataType::Int64);
    assert_eq!(ty("source.price"), DataType::Float64);
    assert_eq!(ty("source.vip"), DataType::Boolean);
    assert_eq!(ty("source.meta"), DataType::Utf8);

    // CSV: every column, as text.
    let dir = tempfile::tempdir().unwrap();
    let mut csv_text = String::from("id,text,qty\n");
    for i in 0..20 {
        csv_text.push_str(&format!("t{i},\"Order {i}, a refund please\",{}\n", i % 4));
    }
    std::fs::write(dir.path().join("records.csv"), &csv_text).unwrap();
    let file = write_pipeline(dir.path(), 3, 100, "");
    let p = std::fs::read_to_string(&file)
        .unwrap()
        .replace("kind = \"jsonl\"", "kind = \"csv\"")
        .replace("path = \"records.jsonl\"", "path = \"records.csv\"");
    std::fs::write(&file, p).unwrap();
    with_source(&file);
    let files = three_formats(&file, 0);
    let (lines, _, types) = same_content(&files, &[]);
    assert_eq!(lines.len(), 20);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(
            line["source"],
            json!({"id": format!("t{i}"), "text": format!("Order {i}, a refund please"), "qty": (i % 4).to_string()})
        );
    }
    let ty = |n: &str| types.iter().find(|(c, _)| c == n).unwrap().1.clone();
    assert_eq!(ty("source.qty"), DataType::Utf8);
}

fn with_source(file: &Path) {
    let p = std::fs::read_to_string(file).unwrap().replace(
        "path = \"out/results.jsonl\"",
        "path = \"out/results.jsonl\"\ninclude_source = true",
    );
    std::fs::write(file, p).unwrap();
}

const NOTES_SCHEMA: &str = r#"{
  "type": "object",
  "properties": {"points": {"type": "array", "items": {"type": "string", "maxLength": 60}, "minItems": 1, "maxItems": 2}},
  "required": ["points"],
  "additionalProperties": false
}"#;

const SUMMARY_SCHEMA: &str = r#"{
  "type": "object",
  "properties": {
    "summary": {"type": "string", "minLength": 5, "maxLength": 120},
    "facts": {"type": "object", "properties": {"count": {"type": "integer", "minimum": 0}, "sure": {"type": "boolean"}},
              "required": ["count", "sure"], "additionalProperties": false},
    "confidence": {"type": "number", "minimum": 0, "maximum": 1}
  },
  "required": ["summary", "facts", "confidence"],
  "additionalProperties": false
}"#;

const REVIEW_SCHEMA: &str = r#"{
  "type": "object",
  "properties": {"pass": {"type": "boolean"}, "issues": {"type": "array", "items": {"type": "string", "maxLength": 60}, "maxItems": 2}},
  "required": ["pass", "issues"],
  "additionalProperties": false
}"#;

#[test]
fn a_staged_pipeline_has_stage_columns_and_its_csv_and_parquet_match_its_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("notes.json"), NOTES_SCHEMA).unwrap();
    std::fs::write(d.join("summary.json"), SUMMARY_SCHEMA).unwrap();
    std::fs::write(d.join("review.json"), REVIEW_SCHEMA).unwrap();
    let docs: String = (0..10)
        .map(|i| {
            let para = |k: usize| {
                (0..40)
                    .map(|w| format!("word{}", (i * 7 + k * 13 + w * 3) % 97))
                    .collect::<Vec<_>>()
                    .join(" ")
                    + "."
            };
            json!({"id": format!("doc-{i}"), "title": format!("Note {i}"), "body": format!("{}\n\n{}", para(0), para(1))})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(d.join("docs.jsonl"), docs).unwrap();
    let file = d.join("pipeline.toml");
    std::fs::write(
        &file,
        r#"name = "docs"
[source]
kind = "jsonl"
path = "docs.jsonl"
id_field = "id"

[provider]
kind = "openai"
model = "gpt-5.4-mini"
simulate = true
poll_min_seconds = 0.02
poll_max_seconds = 0.2

[provider.simulator]
batch_seconds = 0.2
retry_after_ms = 20

[[stage]]
name = "notes"
for_each = "chunk"
split = { field = "body", max_tokens = 80, overlap_tokens = 0 }
schema = "notes.json"
prompt.system = "Take notes on one part of a document."
prompt.user = "{{ chunk.text }}"
prompt.max_output_tokens = 200

[[stage]]
name = "summary"
needs = ["notes"]
schema = "summary.json"
prompt.system = "Summarise a document from its notes."
prompt.user = "{{title}}: {% for n in notes %}{{ n.points | join('; ') }} {% endfor %}"
prompt.max_output_tokens = 200

[[stage]]
name = "review"
needs = ["summary"]
sample = 0.5
schema = "review.json"
on_fail = "flag"
prompt.system = "Check a summary."
prompt.user = "{{ summary.summary }}"
prompt.max_output_tokens = 100

[output]
path = "out/docs.jsonl"
include_source = true
"#,
    )
    .unwrap();
    let files = three_formats(&file, 0);
    let (lines, header, types) = same_content(&files, &["stage.notes", "stage.review.issues"]);
    assert_eq!(lines.len(), 10);
    assert!(
        lines
            .iter()
            .any(|l| l["stages"]["notes"].as_array().unwrap().len() > 1)
    );
    assert!(lines.iter().any(|l| l["review"].is_string()));
    assert!(lines.iter().any(|l| l["stages"]["review"].is_null()));
    assert_eq!(
        header,
        [
            "id",
            "line",
            "status",
            "review",
            "cost_usd",
            "attempts",
            "stage.notes",
            "stage.summary.summary",
            "stage.summary.facts.count",
            "stage.summary.facts.sure",
            "stage.summary.confidence",
            "stage.summary._extra",
            "stage.review.pass",
            "stage.review.issues",
            "stage.review._extra",
            "error",
            "source.body",
            "source.id",
            "source.title"
        ]
    );
    let ty = |n: &str| types.iter().find(|(c, _)| c == n).unwrap().1.clone();
    assert_eq!(ty("cost_usd"), DataType::Decimal128(38, 12));
    assert_eq!(ty("stage.summary.facts.count"), DataType::Int64);
    assert_eq!(ty("stage.review.pass"), DataType::Boolean);
    // Costs were charged, and each format says the same (compared as text above).
    let total: i128 = lines
        .iter()
        .map(|l| Usd::parse(l["cost_usd"].as_str().unwrap()).unwrap().pico())
        .sum();
    assert!(total > 0);
    let ids: BTreeSet<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 10);
}
