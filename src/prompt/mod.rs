//! Prompt templates: Jinja (minijinja) with the `{{field}}` placeholders of the first engine.
//!
//! `{{field}}` inserts a record field (dotted paths reach into objects: `{{dims.width}}`);
//! `{{field?}}` inserts nothing when the field is missing or null instead of quarantining the
//! record. Strings are inserted as they are, other values as compact JSON. Everything else is
//! Jinja: `{% for t in tags %}…{% endfor %}`, `{% if note %}…{% endif %}`, filters such as
//! `{{ tags | join(", ") }}`, and `{{ note | optional }}` (the Jinja spelling of `{{note?}}`).
//!
//! Compatibility: a `{{ … }}` whose content is a field path (no Jinja operator character, see
//! [`is_expression`]) keeps its first meaning exactly, field names with spaces, hyphens or
//! digits included (`{{Customer Tier}}`, `{{items.0}}` is the key `"0"`); it is rewritten into
//! an equivalent Jinja expression before the template is compiled, on the same line. Text and
//! whitespace are kept byte for byte (trailing newline included). What changed: `{%` and `{#`
//! now open Jinja statements and comments, which the first engine left as text.
//!
//! A missing field is an error, not an empty string (strict undefined), except under the
//! optional forms and in conditions (`{% if note %}` is false when `note` is absent). A
//! template is compiled once and rendered per record; each render converts only the
//! top-level fields the template names, and an object or array among them is not converted
//! at all: the template reads it in place, and inserting it writes its JSON directly.
//!
//! [`Template::check_sample`] compares the required fields with a sample of records, so a
//! typo that would quarantine every record is caught before the run (with the closest field
//! name the records do have).

use std::collections::BTreeMap;
use std::sync::Arc;

use minijinja::value::{
    Enumerator, Object, ObjectExt, ObjectRepr, Rest, Value as JValue, ValueKind,
};
use minijinja::{AutoEscape, Environment, Error as JError, ErrorKind, State, UndefinedBehavior};
use serde_json::Value;

use crate::util::text::compact_json;

mod compat;
#[cfg(test)]
mod tests;

pub use compat::is_expression;
use compat::{occurrences, required_in, rewrite};

/// The name of the template inside its environment (shown in minijinja's own messages).
const NAME: &str = "prompt";

/// A record field the template uses.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FieldRef {
    path: Vec<String>,
    /// Missing or null is fine: `{{field?}}`, `| optional`, a condition.
    optional: bool,
    /// Used inside an `{% if %}` block only: required when the block is rendered, so not
    /// checked against the sample.
    conditional: bool,
}

/// A compiled template.
#[derive(Clone)]
pub struct Template {
    source: String,
    env: Arc<Environment<'static>>,
    /// In template order: placeholders, and the fields named by Jinja expressions and
    /// statements (loop variables and `set` names excluded).
    refs: Vec<FieldRef>,
    /// The top-level record fields handed to the template.
    roots: Vec<Arc<str>>,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Template")
            .field("source", &self.source)
            .field("refs", &self.refs)
            .finish()
    }
}

impl PartialEq for Template {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Template {}

/// Why a record could not be rendered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error(
        "field `{0}` is missing (the prompt template uses it; write `{{{{{0}?}}}}` to allow it to be absent)"
    )]
    Missing(String),
    #[error(
        "field `{0}` is null (the prompt template uses it; write `{{{{{0}?}}}}` to allow it to be empty)"
    )]
    Null(String),
    /// Anything else the template refused for this record (a filter given the wrong type, a
    /// loop variable without the attribute used…), with minijinja's message and line.
    #[error("the prompt template failed: {0}")]
    Failed(String),
}

impl RenderError {
    /// The record field to blame, when there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            RenderError::Missing(f) | RenderError::Null(f) => Some(f),
            RenderError::Failed(_) => None,
        }
    }
}

/// A record value as a template value. Objects and arrays are not copied into template
/// values: they are wrapped as they are ([`Json`]), read lazily by the template, and inserted
/// by serializing the JSON itself.
fn to_jinja(v: &Value) -> JValue {
    match v {
        Value::Null => JValue::from(()),
        Value::Bool(b) => JValue::from(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                JValue::from(i)
            } else if let Some(u) = n.as_u64() {
                JValue::from(u)
            } else {
                JValue::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => JValue::from(s.as_str()),
        Value::Array(_) | Value::Object(_) => JValue::from_object(Json(v.clone())),
    }
}

/// A record's object or array seen by the template: a map (keys in JSON order, which is
/// sorted) or a sequence, whose members become template values when read.
#[derive(Debug)]
struct Json(Value);

impl Object for Json {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        match self.0 {
            Value::Array(_) => ObjectRepr::Seq,
            _ => ObjectRepr::Map,
        }
    }

    fn get_value(self: &Arc<Self>, key: &JValue) -> Option<JValue> {
        match &self.0 {
            Value::Array(a) => a.get(key.as_usize()?).map(to_jinja),
            Value::Object(o) => o.get(key.as_str()?).map(to_jinja),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        match &self.0 {
            Value::Array(a) => Enumerator::Seq(a.len()),
            Value::Object(_) => self.mapped_enumerator(|this| match &this.0 {
                Value::Object(o) => Box::new(o.keys().map(|k| JValue::from(k.as_str()))),
                _ => Box::new(std::iter::empty()),
            }),
            _ => Enumerator::Empty,
        }
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        match &self.0 {
            Value::Array(a) => Some(a.len()),
            Value::Object(o) => Some(o.len()),
            _ => Some(0),
        }
    }
}

/// A template value back as JSON, to insert it as the first engine did; `None` for what JSON
/// cannot hold (undefined, functions…).
fn to_json(v: &JValue) -> Option<Value> {
    Some(match v.kind() {
        ValueKind::None => Value::Null,
        ValueKind::Bool => Value::Bool(v.is_true()),
        ValueKind::String => Value::String(v.as_str()?.to_string()),
        // `2.0` stays a float (`as_i64` would take it).
        ValueKind::Number if v.is_integer() => match v.as_i64() {
            Some(i) => Value::from(i),
            None => Value::from(u64::try_from(v.clone()).ok()?),
        },
        ValueKind::Number => Value::Number(serde_json::Number::from_f64(
            f64::try_from(v.clone()).ok()?,
        )?),
        ValueKind::Seq => Value::Array(
            v.try_iter()
                .ok()?
                .map(|x| to_json(&x))
                .collect::<Option<_>>()?,
        ),
        ValueKind::Map => Value::Object(
            v.try_iter()
                .ok()?
                .map(|k| Some((k.as_str()?.to_string(), to_json(&v.get_item(&k).ok()?)?)))
                .collect::<Option<_>>()?,
        ),
        _ => return None,
    })
}

/// Inserts a value: strings as they are, other values as compact JSON; null, undefined and
/// what JSON cannot hold are errors (the record is quarantined).
fn format_value(out: &mut minijinja::Output, _: &mut State, v: &JValue) -> Result<(), JError> {
    if v.kind() == ValueKind::String
        && let Some(s) = v.as_str()
    {
        return Ok(out.write_str(s)?);
    }
    if v.is_undefined() {
        return Err(JError::new(ErrorKind::UndefinedError, "undefined value"));
    }
    if v.is_none() {
        return Err(JError::new(
            ErrorKind::InvalidOperation,
            "a null value cannot be inserted",
        ));
    }
    // A record's own object or array: its JSON as it is (what `to_json` would rebuild).
    if let Some(Json(j)) = v.downcast_object_ref::<Json>() {
        return Ok(out.write_str(&compact_json(j))?);
    }
    match to_json(v) {
        Some(j) => Ok(out.write_str(&compact_json(&j))?),
        None => Err(JError::new(
            ErrorKind::InvalidOperation,
            format!("a {} cannot be inserted into the prompt", v.kind()),
        )),
    }
}

/// `path[1..]` below `root`, by object key only (as the first engine: no list indexes).
fn walk(root: JValue, rest: &[String]) -> JValue {
    let mut v = root;
    for key in rest {
        if v.kind() != ValueKind::Map {
            return JValue::UNDEFINED;
        }
        v = v
            .get_item(&JValue::from(key.as_str()))
            .unwrap_or(JValue::UNDEFINED);
    }
    v
}

fn absent_to_empty(v: JValue) -> JValue {
    if v.is_undefined() || v.is_none() {
        JValue::from("")
    } else {
        v
    }
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .keep_trailing_newline(true)
            .build()
            .expect("the default delimiters are valid"),
    );
    env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_formatter(format_value);
    env.add_filter("optional", absent_to_empty);
    // The rewritten placeholders (see `placeholder_expr`).
    env.add_function("__field", |state: &State, name: &str| {
        state.lookup(name).unwrap_or(JValue::UNDEFINED)
    });
    env.add_function("__path", |root: JValue, rest: Rest<String>| {
        walk(root, &rest.0)
    });
    env.add_function("__optional", |root: JValue, rest: Rest<String>| {
        absent_to_empty(walk(root, &rest.0))
    });
    env
}

/// minijinja's message, with its line.
fn describe(e: &JError) -> String {
    let what = match e.detail() {
        Some(d) if e.kind() == ErrorKind::SyntaxError => d.to_string(),
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    };
    match e.line() {
        Some(l) => format!("line {l}: {what}"),
        None => what,
    }
}

impl Template {
    /// Compiles a template. The first engine's malformed placeholders are all reported
    /// (joined with `; `); a Jinja syntax error is reported with its line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let rewritten = rewrite(text)?;
        let mut env = environment();
        if let Err(e) = env.add_template_owned(NAME, rewritten.jinja) {
            let mut msg = format!("syntax error at {}", describe(&e));
            if text.contains("{%") || text.contains("{#") {
                msg.push_str(
                    " (`{%` and `{#` open Jinja statements and comments; where one is meant as text, as the first template engine read it, write `{{ \"{%\" }}` or wrap the text in `{% raw %}…{% endraw %}`)",
                );
            }
            return Err(msg);
        }
        let tmpl = env.get_template(NAME).expect("just added");
        let names = tmpl.undeclared_variables(false);
        let globals: Vec<&str> = env.globals().map(|(n, _)| n).collect();
        let mut refs: Vec<(usize, FieldRef)> = rewritten
            .placeholders
            .iter()
            // A root written as a name that the template itself declares (a loop variable)
            // is not a record field.
            .filter(|p| !p.native_root || names.contains(&p.path[0]))
            .map(|p| {
                let r = FieldRef {
                    path: p.path.clone(),
                    optional: p.optional,
                    conditional: p.conditional,
                };
                (p.at, r)
            })
            .collect();
        let named: Vec<(usize, FieldRef)> = tmpl
            .undeclared_variables(true)
            .into_iter()
            .filter(|n| !globals.contains(&n.split('.').next().unwrap_or("")))
            .filter(|n| !refs.iter().any(|(_, r)| r.path.join(".") == *n))
            .map(|n| {
                let required = required_in(&n, &rewritten.spans) == Some(true);
                let at = occurrences(text, &n).next().unwrap_or(usize::MAX);
                let path = n.split('.').map(str::to_string).collect();
                (
                    at,
                    FieldRef {
                        path,
                        optional: !required,
                        conditional: false,
                    },
                )
            })
            .collect();
        refs.extend(named);
        // In the order the template names them (the first engine reported the first one).
        refs.sort_by(|a, b| (a.0, &a.1.path).cmp(&(b.0, &b.1.path)));
        let refs: Vec<FieldRef> = refs.into_iter().map(|(_, r)| r).collect();
        let mut roots: Vec<Arc<str>> = refs.iter().map(|r| Arc::from(r.path[0].as_str())).collect();
        roots.sort();
        roots.dedup();
        Ok(Template {
            source: text.to_string(),
            env: Arc::new(env),
            refs,
            roots,
        })
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The record fields the template uses (first path segment), in template order, and
    /// whether each may be absent (optional, or used under a condition only).
    pub fn fields(&self) -> impl Iterator<Item = (&str, bool)> {
        self.refs
            .iter()
            .map(|r| (r.path[0].as_str(), r.optional || r.conditional))
    }

    pub fn has_fields(&self) -> bool {
        self.fields().next().is_some()
    }

    /// Renders the template against a record, appending to `out`.
    pub fn render_into(&self, record: &Value, out: &mut String) -> Result<(), RenderError> {
        let ctx: BTreeMap<Arc<str>, JValue> = self
            .roots
            .iter()
            .filter_map(|k| Some((k.clone(), to_jinja(record.get(&**k)?))))
            .collect();
        let tmpl = self.env.get_template(NAME).expect("added when parsed");
        match tmpl.render(JValue::from_object(ctx)) {
            Ok(s) => {
                out.push_str(&s);
                Ok(())
            }
            Err(e) => Err(self.diagnose(record, &e)),
        }
    }

    /// The first required field the record lacks or has null (what the first engine named),
    /// else minijinja's own message.
    fn diagnose(&self, record: &Value, e: &JError) -> RenderError {
        let required = self.refs.iter().filter(|r| !r.optional);
        // Unconditional uses first: a field under an `{% if %}` may not have been rendered.
        let (always, sometimes): (Vec<_>, Vec<_>) = required.partition(|r| !r.conditional);
        for r in always.into_iter().chain(sometimes) {
            match lookup(record, &r.path) {
                None => return RenderError::Missing(r.path.join(".")),
                Some(Value::Null) => return RenderError::Null(r.path.join(".")),
                Some(_) => {}
            }
        }
        RenderError::Failed(describe(e))
    }

    pub fn render(&self, record: &Value) -> Result<String, RenderError> {
        let mut s = String::new();
        self.render_into(record, &mut s)?;
        Ok(s)
    }

    /// The required fields (placeholders without `?`, and fields Jinja uses outside
    /// conditions and optional forms) that no record of `sample` can fill: each would
    /// quarantine every record like the sampled ones. A field present in some records only is
    /// not reported (those records alone are quarantined). An empty sample reports nothing.
    pub fn check_sample(&self, sample: &[Value]) -> Vec<FieldMiss> {
        let mut misses: Vec<FieldMiss> = Vec::new();
        if sample.is_empty() {
            return misses;
        }
        for r in &self.refs {
            if r.optional || r.conditional {
                continue;
            }
            let path = &r.path;
            let field = path.join(".");
            if misses.iter().any(|m| m.field == field) {
                continue;
            }
            let resolved: Vec<&Value> = sample.iter().filter_map(|r| lookup(r, path)).collect();
            if resolved.iter().any(|v| !v.is_null()) {
                continue;
            }
            if !resolved.is_empty() {
                misses.push(FieldMiss {
                    field,
                    kind: MissKind::AlwaysNull,
                    known: Vec::new(),
                    suggestion: None,
                });
                continue;
            }
            // The deepest prefix some record resolves: the miss is one level below it.
            let depth = (0..path.len())
                .rev()
                .find(|&k| sample.iter().any(|r| lookup(r, &path[..k]).is_some()))
                .unwrap_or(0);
            let parent = &path[..depth];
            let objects: Vec<&serde_json::Map<String, Value>> = sample
                .iter()
                .filter_map(|r| lookup(r, parent).and_then(Value::as_object))
                .collect();
            if objects.is_empty() {
                misses.push(FieldMiss {
                    field,
                    kind: MissKind::NotAnObject(parent.join(".")),
                    known: Vec::new(),
                    suggestion: None,
                });
                continue;
            }
            let mut known: Vec<String> = objects.iter().flat_map(|o| o.keys().cloned()).collect();
            known.sort();
            known.dedup();
            // The suggestion keeps the rest of the path: `dimz.width` → `dims.width`.
            let suggestion = closest(&path[depth], &known).map(|k| {
                let mut fixed = path.clone();
                fixed[depth] = k.to_string();
                fixed.join(".")
            });
            misses.push(FieldMiss {
                field,
                kind: MissKind::Missing {
                    parent: parent.join("."),
                },
                known,
                suggestion,
            });
        }
        misses
    }
}

/// A required placeholder no sampled record can fill (see [`Template::check_sample`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldMiss {
    /// The placeholder's path as written, e.g. `dims.width`.
    pub field: String,
    pub kind: MissKind,
    /// The keys the records have where the field was looked for (sorted, for `Missing`).
    pub known: Vec<String>,
    /// A key among `known` within a small edit distance, as a full path.
    pub suggestion: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MissKind {
    /// No record has the field; `parent` is the object it was looked for in (empty: the
    /// record itself).
    Missing { parent: String },
    /// Every record that has the field has it null.
    AlwaysNull,
    /// The path goes through this field, which is never an object.
    NotAnObject(String),
}

fn lookup<'a>(record: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(record, |v, p| v.get(p))
}

/// The candidate closest to `name` (case-insensitive optimal string alignment distance, so a
/// swap of two letters counts once), if it is close enough to be a likely typo.
pub fn closest<'a>(name: &str, candidates: &'a [String]) -> Option<&'a str> {
    let name_l = name.to_lowercase();
    let limit = if name.chars().count() <= 4 { 1 } else { 2 };
    candidates
        .iter()
        .map(|c| (edit_distance(&name_l, &c.to_lowercase()), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.as_str())
}

/// Optimal string alignment distance: insertions, deletions, substitutions and swaps of two
/// adjacent characters each cost 1.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}
