//! The environment checks behind `nightshift validate` and before every run: the files a
//! pipeline names are readable, the prompt's fields are in the source's first records (CSV:
//! its header), the schema compiles, the API key is set, the model has a price. The pipeline
//! file itself is parsed and checked, without I/O beyond reading it, in `config`; this module
//! opens what the file points at, so none of these problems is found after an upload.

use std::path::Path;

use serde_json::Value;

use crate::config::{
    ConfigError, FieldMiss, KeySource, MissKind, Pipeline, Problem, RenderError, Template,
    is_flagged,
};
use crate::cost::PriceTable;
use crate::source::{Quarantined, SourceEvent, SourceReader};

impl Pipeline {
    /// Everything `nightshift validate` checks, as one list: the parse and validation
    /// problems, then the environment checks ([`Pipeline::check_environment`]) on whatever
    /// parts of the file were valid. A check that depends on a value with a problem already
    /// is skipped, so one mistake is reported once. `Ok` only when nothing at all is wrong.
    pub fn check_file(path: &Path, prices: Option<&PriceTable>) -> Result<Pipeline, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            problems: vec![Problem::new("", format!("cannot read the file: {e}"))],
        })?;
        let (pipeline, mut problems) = crate::config::build(&text, path);
        if let Some(p) = &pipeline {
            let flagged: Vec<String> = problems.iter().map(|x| x.path.clone()).collect();
            problems.extend(p.environment_problems(prices, &flagged));
        }
        match pipeline {
            Some(p) if problems.is_empty() => Ok(p),
            _ => Err(ConfigError {
                file: path.to_path_buf(),
                problems,
            }),
        }
    }

    /// The I/O checks `nightshift validate` runs after the pure ones: files readable, the
    /// prompt's fields present in the source's first records (CSV: its header), schema
    /// compiles, key present, model priced. Returns every problem found.
    pub fn check_environment(&self, prices: Option<&PriceTable>) -> Vec<Problem> {
        self.environment_problems(prices, &[])
    }

    /// The environment checks, skipping those that depend on a TOML path in `flagged` (one
    /// with a problem already: checking its best-effort default would only add noise).
    fn environment_problems(
        &self,
        prices: Option<&PriceTable>,
        flagged: &[String],
    ) -> Vec<Problem> {
        let skip = |deps: &[&str]| deps.iter().any(|d| is_flagged(flagged, d));
        let mut problems = Vec::new();
        if skip(&["source.path"]) {
            // Nothing to open.
        } else if let Err(e) = std::fs::File::open(&self.source.path) {
            problems.push(Problem::new(
                "source.path",
                format!("cannot open {}: {e}", self.source.path.display()),
            ));
        } else if !skip(&[
            "source.kind",
            "source.id_field",
            "source.delimiter",
            "source.max_record_bytes",
        ]) {
            // A template with a problem was replaced by one without fields: nothing to check.
            match check_template_fields(self) {
                Err(msg) => problems.push(Problem::new("source.path", msg)),
                Ok(misses) => {
                    let at = if self.stages.len() > 1
                        || self.first_stage().name != crate::config::DEFAULT_STAGE
                    {
                        format!("stage.{}.prompt.user", self.first_stage().name)
                    } else {
                        "prompt.user".to_string()
                    };
                    problems.extend(misses.into_iter().map(|m| Problem::new(at.clone(), m)))
                }
            }
            problems.extend(check_later_stage_fields(self));
        }
        for stage in &self.stages {
            // The one stage of a one-stage file takes its schema from `output.schema`.
            let at = if self.is_multi_stage() || stage.name != crate::config::DEFAULT_STAGE {
                format!("stage.{}.schema", stage.name)
            } else {
                "output.schema".to_string()
            };
            if skip(&[at.as_str()]) {
                continue;
            }
            match crate::validate::OutputValidator::load(&stage.schema) {
                Err(msg) => problems.push(Problem::new(at, msg)),
                Ok(v) if stage.on_fail.is_some() => {
                    let pass = v.schema().pointer("/properties/pass/type");
                    if pass != Some(&Value::String("boolean".into())) {
                        problems.push(Problem::new(
                            at,
                            "a stage with on_fail reviews: its schema needs a boolean `pass` property (false = the review failed)",
                        ));
                    }
                }
                Ok(_) => {}
            }
        }
        if !skip(&["output.path"])
            && let Some(parent) = self.output.path.parent()
            && parent.exists()
            && !parent.is_dir()
        {
            problems.push(Problem::new(
                "output.path",
                format!("{} is not a folder", parent.display()),
            ));
        }
        let key_deps = [
            "provider.kind",
            "provider.simulate",
            "provider.api_key_env",
            "provider.api_key_file",
        ];
        if !self.provider.simulate && !skip(&key_deps) {
            match &self.provider.key {
                KeySource::Env(var) => match std::env::var(var) {
                    Ok(v) if !v.trim().is_empty() => {}
                    _ => problems.push(Problem::new(
                        "provider.api_key_env",
                        format!(
                            "environment variable {var} is not set (export it, or set `simulate = true` to rehearse against the built-in simulator)"
                        ),
                    )),
                },
                KeySource::File(f) => {
                    if let Err(e) = crate::provider::read_key_file(f) {
                        problems.push(Problem::new("provider.api_key_file", e));
                    }
                }
                // Environment, profile, web identity or instance role: only a call can tell.
                KeySource::AwsChain => {}
            }
        }
        let owned;
        let table = match prices {
            Some(t) => Some(t),
            None if skip(&["pricing.file"]) => None,
            None => match PriceTable::builtin_with(self.pricing_file.as_deref()) {
                Ok(t) => {
                    owned = t;
                    Some(&owned)
                }
                Err(e) => {
                    problems.push(Problem::new("pricing.file", e.to_string()));
                    None
                }
            },
        };
        if let Some(table) = table
            && !skip(&["provider.kind", "provider.model", "provider.mode"])
        {
            match table.lookup(self.provider.kind.as_str(), &self.provider.model) {
                Err(e) => problems.push(Problem::new("provider.model", e.to_string())),
                Ok(p) => {
                    let mode = self.provider.pricing_mode();
                    if p.rates(mode).is_none() {
                        problems.push(Problem::new(
                            "provider.model",
                            format!(
                                "model `{}` has no {mode} price in the pricing table; add a `batch` entry for it",
                                self.provider.model
                            ),
                        ));
                    }
                }
            }
        }
        problems
    }
}

/// How many usable records [`check_template_fields`] reads from a JSONL source.
pub const TEMPLATE_SAMPLE_RECORDS: usize = 200;
/// How many lines it reads at most looking for them.
const TEMPLATE_SAMPLE_LINES: usize = 10_000;

/// Checks the prompt template's required fields against the source: a CSV source's header,
/// or the first [`TEMPLATE_SAMPLE_RECORDS`] usable records of a JSONL source. A field none of
/// them has would quarantine every record, so each is reported (for `prompt.user`), naming the
/// fields the records do have and a close match. `Err` is a problem with the source itself
/// (for `source.path`): unreadable, an empty CSV, a header without the id column, or no
/// usable record among the lines read.
pub fn check_template_fields(p: &Pipeline) -> Result<Vec<String>, String> {
    let first = p.first_stage();
    let template = &first.prompt.user;
    // A chunk stage's template also sees `chunk`, which no record has.
    let with_chunk = |mut v: Value| {
        if first.is_chunked()
            && let Value::Object(m) = &mut v
        {
            m.insert(
                crate::config::CHUNK_VAR.into(),
                serde_json::json!({"index": 0, "count": 1, "text": ""}),
            );
        }
        v
    };
    match SourceReader::open(&p.source).map_err(|e| e.to_string())? {
        SourceReader::Csv(reader) => {
            // Every row gets every column (or is quarantined), so the header is the sample.
            let row = with_chunk(Value::Object(
                reader
                    .headers()
                    .iter()
                    .map(|h| (h.clone(), Value::String(String::new())))
                    .collect(),
            ));
            let misses = record_misses(p, template.check_sample(std::slice::from_ref(&row)));
            let mut problems: Vec<String> = misses
                .iter()
                .map(|m| miss_message(m, &Sample::CsvHeader))
                .collect();
            if problems.is_empty() {
                let (rows, _, _) = first_records(SourceReader::Csv(reader))?;
                let rows: Vec<Value> = rows.into_iter().map(with_chunk).collect();
                let described = Sample::Records(rows.len(), &p.source.path);
                problems.extend(trial_render(template, &rows, &described));
            }
            Ok(problems)
        }
        reader @ SourceReader::Jsonl(_) => {
            let (sample, first_bad, lines) = first_records(reader)?;
            if sample.is_empty() {
                return match first_bad {
                    Some(q) => Err(format!(
                        "{}: none of {} is a usable record, so every one would be quarantined (line {}: {})",
                        display(&p.source.path),
                        first_n(lines, "line"),
                        q.line,
                        q.reason
                    )),
                    // An empty source is a run with nothing to do, not a mistake.
                    None => Ok(Vec::new()),
                };
            }
            let described = Sample::Records(sample.len(), &p.source.path);
            let sample: Vec<Value> = sample.into_iter().map(with_chunk).collect();
            let mut problems: Vec<String> = record_misses(p, template.check_sample(&sample))
                .iter()
                .map(|m| miss_message(m, &described))
                .collect();
            if problems.is_empty() {
                problems.extend(trial_render(template, &sample, &described));
            }
            Ok(problems)
        }
    }
}

/// The misses that are record fields: a stage's results (a cross-stage mistake, reported by
/// the checks across stages) and `chunk` are not, and `chunk` is no field the records have.
fn record_misses(p: &Pipeline, misses: Vec<FieldMiss>) -> Vec<FieldMiss> {
    misses
        .into_iter()
        .filter(|m| {
            let root = m.field.split('.').next().unwrap_or(&m.field);
            !p.stages.iter().any(|s| s.name == root)
        })
        .map(|mut m| {
            m.known.retain(|k| k != crate::config::CHUNK_VAR);
            m
        })
        .collect()
}

/// The record fields the later stages' templates and conditions print, against the same
/// sample as the first stage's (results of needed stages and `chunk` aside: they are not
/// record fields). Problems at `stage.<name>.prompt.user` / `.when`.
fn check_later_stage_fields(p: &Pipeline) -> Vec<Problem> {
    if p.stages.len() < 2 {
        return Vec::new();
    }
    let Ok(reader) = SourceReader::open(&p.source) else {
        return Vec::new();
    };
    let (sample, described) = match reader {
        SourceReader::Csv(reader) => {
            let row = Value::Object(
                reader
                    .headers()
                    .iter()
                    .map(|h| (h.clone(), Value::String(String::new())))
                    .collect(),
            );
            (vec![row], Sample::CsvHeader)
        }
        reader @ SourceReader::Jsonl(_) => match first_records(reader) {
            Ok((sample, _, _)) if !sample.is_empty() => {
                let n = sample.len();
                (sample, Sample::Records(n, &p.source.path))
            }
            _ => return Vec::new(),
        },
    };
    let not_a_field = |field: &str| {
        let root = field.split('.').next().unwrap_or(field);
        root == crate::config::CHUNK_VAR || p.stages.iter().any(|s| s.name == root)
    };
    let mut problems = Vec::new();
    for stage in &p.stages[1..] {
        let mut checks = vec![("prompt.user", &stage.prompt.user)];
        if let Some(w) = &stage.when {
            checks.push(("when", w));
        }
        for (at, template) in checks {
            for m in template.check_sample(&sample) {
                if !not_a_field(&m.field) {
                    problems.push(Problem::new(
                        format!("stage.{}.{at}", stage.name),
                        miss_message(&m, &described),
                    ));
                }
            }
        }
    }
    problems
}

/// The first usable records of a source (at most [`TEMPLATE_SAMPLE_RECORDS`], looking at
/// most [`TEMPLATE_SAMPLE_LINES`] lines), the first line it quarantined, and the lines read.
fn first_records(reader: SourceReader) -> Result<(Vec<Value>, Option<Quarantined>, usize), String> {
    let mut sample = Vec::new();
    let mut first_bad: Option<Quarantined> = None;
    let mut lines = 0usize;
    for event in reader {
        match event.map_err(|e| e.to_string())? {
            SourceEvent::Record(r) => sample.push(r.value),
            SourceEvent::Quarantined(q) => {
                first_bad.get_or_insert(q);
            }
        }
        lines += 1;
        if sample.len() >= TEMPLATE_SAMPLE_RECORDS || lines >= TEMPLATE_SAMPLE_LINES {
            break;
        }
    }
    Ok((sample, first_bad, lines))
}

/// Renders the template over the sampled records. When every one of them fails for a
/// reason no record field explains (an unknown filter, a filter given the wrong type), every
/// record of the source would be quarantined: that failure, for `prompt.user`. Missing fields
/// are `check_sample`'s to report; a template that renders some records is left alone.
fn trial_render(template: &Template, sample: &[Value], described: &Sample<'_>) -> Option<String> {
    let mut first = None;
    let mut out = String::new();
    for record in sample {
        out.clear();
        match template.render_into(record, &mut out) {
            Err(RenderError::Failed(m)) => {
                first.get_or_insert(m);
            }
            _ => return None,
        }
    }
    let n = match described {
        Sample::Records(n, path) => format!("{} of {}", first_n(*n, "record"), display(path)),
        Sample::CsvHeader => "the sampled records".to_string(),
    };
    first.map(|m| format!("the template fails on {n}, so every record would be quarantined: {m}"))
}

/// At most this many field names are listed in a message.
const LIST_FIELDS: usize = 30;

/// What a template check looked at: a CSV header, or this many JSONL records.
enum Sample<'a> {
    CsvHeader,
    Records(usize, &'a Path),
}

fn miss_message(m: &FieldMiss, sample: &Sample<'_>) -> String {
    let field = &m.field;
    let (unit, nowhere, have) = match sample {
        Sample::CsvHeader => (
            "row",
            "is not in the CSV header".to_string(),
            "The header has",
        ),
        Sample::Records(n, path) => (
            "record",
            format!(
                "is in none of {} of {}",
                first_n(*n, "record"),
                display(path)
            ),
            "The records have",
        ),
    };
    match &m.kind {
        MissKind::AlwaysNull => format!(
            "field `{field}` is null wherever it appears in the first records of the source, so every {unit} would be quarantined. Write `{{{{{field}?}}}}` if it may be empty."
        ),
        MissKind::NotAnObject(parent) => format!(
            "field `{field}` {nowhere}: `{parent}` is never an object with fields, so every {unit} would be quarantined."
        ),
        MissKind::Missing { parent } => {
            let mut msg =
                format!("field `{field}` {nowhere}, so every {unit} would be quarantined");
            match &m.suggestion {
                Some(s) => msg.push_str(&format!("; did you mean `{s}`?")),
                None => msg.push('.'),
            }
            let place = if parent.is_empty() {
                String::new()
            } else {
                format!(" in `{parent}`")
            };
            let mut list = m
                .known
                .iter()
                .take(LIST_FIELDS)
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            if m.known.len() > LIST_FIELDS {
                list.push_str(&format!(" and {} more", m.known.len() - LIST_FIELDS));
            }
            msg.push_str(&format!(
                " {have}{place}: {list}. Write `{{{{{field}?}}}}` if it may be absent."
            ));
            msg
        }
    }
}

/// "the first record", "the first 200 records".
fn first_n(n: usize, unit: &str) -> String {
    if n == 1 {
        format!("the first {unit}")
    } else {
        format!("the first {n} {unit}s")
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SourceKind;

    fn csv_pipeline(dir: &Path, header: &str, user: &str) -> Pipeline {
        std::fs::write(dir.join("in.csv"), format!("{header}\n1,a,b\n")).unwrap();
        let text = format!(
            "name = \"t\"\n[source]\nkind = \"csv\"\npath = \"in.csv\"\nid_field = \"id\"\n\
             [provider]\nmodel = \"gpt-5.4-mini\"\nsimulate = true\n\
             [prompt]\nuser = \"{user}\"\nmax_output_tokens = 10\n\
             [output]\nschema = \"s.json\"\npath = \"out.jsonl\"\n"
        );
        Pipeline::from_str(&text, &dir.join("t.toml")).unwrap()
    }

    #[test]
    fn csv_template_fields_are_checked_against_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let p = csv_pipeline(dir.path(), "id,subject,body", "{{subjcet}} {{body}} {{x?}}");
        let misses = check_template_fields(&p).unwrap();
        assert_eq!(misses.len(), 1, "{misses:?}");
        for needle in [
            "`subjcet` is not in the CSV header",
            "did you mean `subject`?",
            "The header has: body, id, subject.",
        ] {
            assert!(misses[0].contains(needle), "{needle}: {}", misses[0]);
        }
        // Columns are text: a dotted path cannot reach into one.
        let p = csv_pipeline(dir.path(), "id,subject,body", "{{subject.title}}");
        let misses = check_template_fields(&p).unwrap();
        assert!(misses[0].contains("never an object"), "{misses:?}");
        let p = csv_pipeline(dir.path(), "id,subject,body", "{{subject}}");
        assert_eq!(check_template_fields(&p).unwrap(), Vec::<String>::new());
        // The header's own problems come back as errors (for `source.path`).
        let p = csv_pipeline(dir.path(), "key,subject,body", "{{subject}}");
        let err = check_template_fields(&p).unwrap_err();
        assert!(err.contains("no `id` column"), "{err}");
    }

    #[test]
    fn jsonl_template_fields_are_checked_against_the_first_records_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = csv_pipeline(dir.path(), "id,a,b", "{{late}}");
        p.source.kind = SourceKind::Jsonl;
        p.source.path = dir.path().join("in.jsonl");
        // `late` first appears after the sample: the check cannot see it.
        let mut body = String::new();
        for i in 0..TEMPLATE_SAMPLE_RECORDS {
            body.push_str(&format!("{{\"id\": {i}, \"early\": 1}}\n"));
        }
        body.push_str("{\"id\": \"x\", \"late\": 1}\n");
        std::fs::write(&p.source.path, body).unwrap();
        let misses = check_template_fields(&p).unwrap();
        assert_eq!(misses.len(), 1);
        assert!(
            misses[0].contains("first 200 records") && misses[0].contains("early, id"),
            "{}",
            misses[0]
        );
    }

    #[test]
    fn a_template_that_fails_on_every_sampled_record_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        // An unknown filter compiles and fails only when rendered.
        let p = csv_pipeline(dir.path(), "id,subject,body", "{{ subject | nope }}");
        let misses = check_template_fields(&p).unwrap();
        assert_eq!(misses.len(), 1, "{misses:?}");
        assert!(
            misses[0].contains("unknown filter") && misses[0].contains("first record"),
            "{}",
            misses[0]
        );
        let mut p = csv_pipeline(dir.path(), "id,a,b", "{{ tags | join(', ') | nope }}");
        p.source.kind = SourceKind::Jsonl;
        p.source.path = dir.path().join("in.jsonl");
        std::fs::write(&p.source.path, "{\"id\": 1, \"tags\": [\"x\"]}\n").unwrap();
        let misses = check_template_fields(&p).unwrap();
        assert!(
            misses.len() == 1 && misses[0].contains("unknown filter"),
            "{misses:?}"
        );
        // A template that renders the sample is left alone.
        let p = csv_pipeline(dir.path(), "id,subject,body", "{{ subject | upper }}");
        assert_eq!(check_template_fields(&p).unwrap(), Vec::<String>::new());
    }
}
