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
//! top-level fields the template names.
//!
//! [`Template::check_sample`] compares the required fields with a sample of records, so a
//! typo that would quarantine every record is caught before the run (with the closest field
//! name the records do have).

use std::collections::BTreeMap;
use std::sync::Arc;

use minijinja::value::{Rest, Value as JValue, ValueKind};
use minijinja::{AutoEscape, Environment, Error as JError, ErrorKind, State, UndefinedBehavior};
use serde_json::Value;

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

/// A placeholder of the first engine, found by [`rewrite`].
struct Placeholder {
    path: Vec<String>,
    optional: bool,
    /// The root is written as a Jinja name, so it may be a loop variable rather than a field.
    native_root: bool,
    /// Inside an `{% if %}` block.
    conditional: bool,
    at: usize,
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

/// A Jinja statement or expression as written in the template (not a field placeholder).
struct Span<'a> {
    /// The statement's keyword (`if`, `for`…); `None` for a `{{ … }}` expression.
    keyword: Option<&'a str>,
    content: &'a str,
}

/// What [`rewrite`] makes of a template's text.
struct Rewritten<'a> {
    /// Jinja source: placeholders replaced by equivalent expressions, all else as written.
    jinja: String,
    placeholders: Vec<Placeholder>,
    spans: Vec<Span<'a>>,
}

/// Characters that make the content of `{{ … }}` a Jinja expression rather than a field path.
const JINJA_CHARS: &[char] = &[
    '|', '(', ')', '[', ']', '\'', '"', '~', '+', '*', '/', '%', '=', '<', '>', '!', ',', ':',
];

/// Words that Jinja reads as literals or operators, not as names.
const KEYWORDS: &[&str] = &[
    "true", "false", "none", "True", "False", "None", "and", "or", "not", "in", "is", "if", "else",
];

/// Whether the content of a `{{ … }}` is a Jinja expression. Anything else — names, dots,
/// spaces, hyphens, digits, a final `?` — is a field path, as the first engine read it. A
/// content starting or ending with `-` is whitespace control (`{{- x -}}`).
pub fn is_expression(inner: &str) -> bool {
    let t = inner.trim();
    inner.contains(JINJA_CHARS) || t.starts_with('-') || t.ends_with('-')
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !KEYWORDS.contains(&s)
        && !s.starts_with("__")
}

fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// The Jinja expression equivalent to a placeholder of the first engine.
fn placeholder_expr(path: &[String], optional: bool) -> (String, bool) {
    let native_root = is_name(&path[0]);
    let root = if native_root {
        path[0].clone()
    } else {
        format!("__field({})", quoted(&path[0]))
    };
    let rest = &path[1..];
    if !optional && rest.iter().all(|s| is_name(s)) {
        let mut e = root;
        for s in rest {
            e.push('.');
            e.push_str(s);
        }
        return (e, native_root);
    }
    let f = if optional { "__optional" } else { "__path" };
    let mut e = format!("{f}({root}");
    for s in rest {
        e.push_str(", ");
        e.push_str(&quoted(s));
    }
    e.push(')');
    (e, native_root)
}

/// Where a statement or expression opened at the start of `s` ends (past `close`), skipping
/// string literals.
fn tag_end(s: &str, close: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = 2;
    let mut quote: Option<u8> = None;
    while i < b.len() {
        match quote {
            Some(q) => {
                if b[i] == b'\\' {
                    i += 1;
                } else if b[i] == q {
                    quote = None;
                }
            }
            None => {
                if b[i] == b'"' || b[i] == b'\'' {
                    quote = Some(b[i]);
                } else if s[i..].starts_with(close) {
                    return Some(i + close.len());
                }
            }
        }
        i += 1;
    }
    None
}

fn keyword(content: &str) -> &str {
    let t = content.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
    t.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .next()
        .unwrap_or("")
}

/// Finds the placeholders of the first engine in `text` and rewrites them into Jinja;
/// every malformed placeholder is reported (joined with `; `), up to an unclosed `{{`, which
/// ends the scan. Comments, statements and `{% raw %}` blocks are passed through.
fn rewrite(text: &str) -> Result<Rewritten<'_>, String> {
    let mut out = Rewritten {
        jinja: String::with_capacity(text.len() + 16),
        placeholders: Vec::new(),
        spans: Vec::new(),
    };
    let mut errors = Vec::new();
    let mut if_depth = 0usize;
    let mut i = 0;
    while let Some(off) = text[i..].find('{') {
        let start = i + off;
        let rest = &text[start..];
        if rest.starts_with("{#") {
            let end = rest.find("#}").map_or(text.len(), |e| start + e + 2);
            out.jinja.push_str(&text[i..end]);
            i = end;
        } else if rest.starts_with("{%") {
            let Some(len) = tag_end(rest, "%}") else {
                break; // unclosed: minijinja reports it
            };
            let content = &rest[2..len - 2];
            let mut end = start + len;
            if keyword(content) == "raw" {
                // Everything up to the end of `{% endraw %}` is text.
                let mut j = end;
                end = text.len();
                while let Some(o) = text[j..].find("{%") {
                    let tag = &text[j + o..];
                    match tag_end(tag, "%}") {
                        Some(l) if keyword(&tag[2..l - 2]) == "endraw" => {
                            end = j + o + l;
                            break;
                        }
                        Some(l) => j += o + l,
                        None => break,
                    }
                }
            } else {
                let kw = keyword(content);
                match kw {
                    "if" => if_depth += 1,
                    "endif" => if_depth = if_depth.saturating_sub(1),
                    _ => {}
                }
                out.spans.push(Span {
                    keyword: Some(kw),
                    content,
                });
            }
            out.jinja.push_str(&text[i..end]);
            i = end;
        } else if let Some(after) = rest.strip_prefix("{{") {
            let Some(close) = after.find("}}") else {
                errors.push(format!(
                    "`{{{{` at byte {start} is never closed with `}}}}`"
                ));
                i = text.len();
                break;
            };
            let raw = &after[..close];
            if is_expression(raw) {
                let Some(len) = tag_end(rest, "}}") else {
                    break; // unclosed: minijinja reports it
                };
                out.spans.push(Span {
                    keyword: None,
                    content: &rest[2..len - 2],
                });
                out.jinja.push_str(&text[i..start + len]);
                i = start + len;
                continue;
            }
            out.jinja.push_str(&text[i..start]);
            i = start + 2 + close + 2;
            let inner = raw.trim();
            let (name, optional) = match inner.strip_suffix('?') {
                Some(n) => (n.trim(), true),
                None => (inner, false),
            };
            if name.is_empty() {
                errors.push("empty placeholder `{{}}`".into());
                continue;
            }
            let path: Vec<String> = name.split('.').map(|s| s.trim().to_string()).collect();
            if path.iter().any(|p| p.is_empty() || p.contains(['{', '}'])) {
                errors.push(format!("bad placeholder `{{{{{inner}}}}}`"));
                continue;
            }
            let (expr, native_root) = placeholder_expr(&path, optional);
            out.jinja.push_str("{{ ");
            out.jinja.push_str(&expr);
            // Same line numbers as the text as written.
            for _ in 0..raw.matches('\n').count() {
                out.jinja.push('\n');
            }
            out.jinja.push_str(" }}");
            out.placeholders.push(Placeholder {
                path,
                optional,
                native_root,
                conditional: if_depth > 0,
                at: start,
            });
        } else {
            out.jinja.push_str(&text[i..=start]);
            i = start + 1;
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    out.jinja.push_str(&text[i..]);
    Ok(out)
}

/// Where `path` stands as a whole name in `text` (not part of a longer name or path).
fn occurrences<'a>(text: &'a str, path: &'a str) -> impl Iterator<Item = usize> + 'a {
    let name_char = |ch: char| ch.is_alphanumeric() || ch == '_' || ch == '.';
    text.match_indices(path)
        .map(|(at, _)| at)
        .filter(move |&at| {
            let before = text[..at].chars().next_back();
            let after = text[at + path.len()..].chars().next();
            !before.is_some_and(name_char) && !after.is_some_and(name_char)
        })
}

/// Whether a field named by Jinja (not a placeholder) must be there: it is used outside a
/// condition (`{% if %}`/`{% elif %}`), a test (`x is defined`) and the `optional` and
/// `default` filters. `None`: not found as written (an attribute reached with `[…]`, say).
fn required_in(path: &str, spans: &[Span<'_>]) -> Option<bool> {
    let mut found = false;
    for span in spans {
        let c = span.content;
        for at in occurrences(c, path) {
            let after = &c[at + path.len()..];
            found = true;
            if matches!(span.keyword, Some("if" | "elif")) {
                continue;
            }
            let after = after.trim_start();
            let guarded = match after.strip_prefix('|') {
                Some(f) => {
                    let f = f.trim_start();
                    f.starts_with("optional") || f.starts_with("default") || f.starts_with("d(")
                }
                None => after.starts_with("is ") || after.starts_with("is\n"),
            };
            if !guarded {
                return Some(true);
            }
        }
    }
    found.then_some(false)
}

/// A record value as a template value.
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
        Value::Array(a) => JValue::from(a.iter().map(to_jinja).collect::<Vec<_>>()),
        Value::Object(o) => JValue::from(
            o.iter()
                .map(|(k, v)| (k.clone(), to_jinja(v)))
                .collect::<BTreeMap<String, JValue>>(),
        ),
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
    match to_json(v) {
        Some(j) => Ok(out.write_str(&j.to_string())?),
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_fields_paths_and_optionals() {
        let t =
            Template::parse("Title: {{title}} ({{ dims.w }}cm){{note?}} tags={{tags}}").unwrap();
        let r = json!({"title": "Lamp", "dims": {"w": 30}, "tags": ["a", "b"]});
        assert_eq!(
            t.render(&r).unwrap(),
            "Title: Lamp (30cm) tags=[\"a\",\"b\"]"
        );
        let fields: Vec<_> = t.fields().collect();
        assert_eq!(
            fields,
            vec![
                ("title", false),
                ("dims", false),
                ("note", true),
                ("tags", false)
            ]
        );
    }

    #[test]
    fn missing_and_null_fields_are_named() {
        let t = Template::parse("{{title}}").unwrap();
        assert_eq!(
            t.render(&json!({})),
            Err(RenderError::Missing("title".into()))
        );
        assert_eq!(
            t.render(&json!({"title": null})),
            Err(RenderError::Null("title".into()))
        );
    }

    #[test]
    fn malformed_templates_are_rejected() {
        assert!(Template::parse("hello {{name").is_err());
        assert!(Template::parse("hello {{}}").is_err());
        assert!(Template::parse("hello {{a..b}}").is_err());
        assert!(!Template::parse("no fields").unwrap().has_fields());
        // Every bad placeholder is named, not just the first.
        let err = Template::parse("{{}} and {{a..b}} and {{ok}}").unwrap_err();
        assert!(err.contains("empty placeholder"), "{err}");
        assert!(err.contains("{{a..b}}"), "{err}");
    }

    #[test]
    fn a_field_no_sampled_record_has_is_named_with_a_close_match() {
        let sample = vec![
            json!({"id": 1, "material": "oak", "title": "Lamp"}),
            json!({"id": 2, "material": "ash", "title": "Desk", "note": null}),
        ];
        let t = Template::parse("{{title}} {{materail}} {{materail}} {{colour?}}").unwrap();
        let misses = t.check_sample(&sample);
        assert_eq!(misses.len(), 1, "{misses:?}");
        assert_eq!(misses[0].field, "materail");
        assert_eq!(misses[0].suggestion.as_deref(), Some("material"));
        assert_eq!(misses[0].known, ["id", "material", "note", "title"]);
        assert_eq!(
            misses[0].kind,
            MissKind::Missing {
                parent: String::new()
            }
        );
        // Present in some records only: those records alone are quarantined, not an error.
        let t = Template::parse("{{note}}").unwrap();
        assert_eq!(t.check_sample(&sample)[0].kind, MissKind::AlwaysNull);
        let t = Template::parse("{{title}}").unwrap();
        assert!(t.check_sample(&sample[..1]).is_empty());
        let t = Template::parse("{{zzz}}").unwrap();
        assert_eq!(t.check_sample(&sample)[0].suggestion, None);
        assert!(t.check_sample(&[]).is_empty());
    }

    #[test]
    fn dotted_paths_are_checked_level_by_level() {
        let sample = vec![
            json!({"id": 1, "dims": {"width": 3, "depth": 4}, "title": "x"}),
            json!({"id": 2, "title": "y"}),
        ];
        assert!(
            Template::parse("{{dims.width}}")
                .unwrap()
                .check_sample(&sample)
                .is_empty()
        );
        let m = &Template::parse("{{dims.widht}}")
            .unwrap()
            .check_sample(&sample)[0];
        assert_eq!(m.field, "dims.widht");
        assert_eq!(m.known, ["depth", "width"]);
        assert_eq!(m.suggestion.as_deref(), Some("dims.width"));
        assert_eq!(
            m.kind,
            MissKind::Missing {
                parent: "dims".into()
            }
        );
        let m = &Template::parse("{{title.text}}")
            .unwrap()
            .check_sample(&sample)[0];
        assert_eq!(m.kind, MissKind::NotAnObject("title".into()));
        let m = &Template::parse("{{dimz.width}}")
            .unwrap()
            .check_sample(&sample)[0];
        assert_eq!(m.suggestion.as_deref(), Some("dims.width"));
    }

    /// Templates the hand-written engine accepted, with what it rendered (or which field it
    /// refused) for one record: a new engine must give the same bytes.
    #[test]
    fn templates_of_the_first_engine_render_byte_for_byte() {
        let r = json!({
            "title": "Lamp \"Aurora\" – 30 cm", "n": 3, "neg": -7, "big": 18446744073709551615u64,
            "f": 0.5, "g": 1e21, "h": 2.0, "yes": true, "no": false, "nil": null,
            "tags": ["a", "b\n", 1, null], "dims": {"w": 30, "d": {"x": 1.25}, "z": [], "e": {}},
            "Customer Tier": "gold", "unit-price": "9.90", "items": ["x", "y"], "obj": {"0": "zero", "b": 2, "a": 1},
            "ü": "umlaut", "none": "n-field", "range": "r-field", "loop": "l-field", "html": "<b>&amp;</b>",
            "back\\slash": "bs"
        });
        let cases: &[&str] = &[
            "Title: {{title}}\n",
            "{{ n }}|{{neg}}|{{big}}|{{f}}|{{g}}|{{h}}|{{yes}}|{{no}}",
            "{{tags}} {{dims}} {{dims.d}} {{dims.z}}{{dims.e}} {{obj}}",
            "{{ dims . w }}/{{dims.d.x}}\r\n\n\n",
            "{{Customer Tier}} {{unit-price}} {{ü}} {{none}} {{range}} {{loop}} {{html}}",
            "{{obj.0}} {{back\\slash}}",
            "[{{nil?}}][{{missing?}}][{{dims.q?}}][{{title.x?}}][{{ n ? }}][{{ missing.deep.er? }}]",
            "}} { } {x} }{ %} #} {{title}}",
            "  lead\ttab {{title}}   \n\n",
            "{{\n title \n}}",
            "{{items.0}}",
            "{{nil}}",
            "{{title.x}}",
            "{{missing.deep}}",
            "{{n}}{{nil}}{{missing}}",
        ];
        let got: Vec<String> = cases
            .iter()
            .map(|c| match Template::parse(c).unwrap().render(&r) {
                Ok(s) => s,
                Err(e) => format!("ERR {e:?}"),
            })
            .collect();
        let expected: &[&str] = &[
            "Title: Lamp \"Aurora\" – 30 cm\n",
            "3|-7|18446744073709551615|0.5|1e+21|2.0|true|false",
            "[\"a\",\"b\\n\",1,null] {\"d\":{\"x\":1.25},\"e\":{},\"w\":30,\"z\":[]} {\"x\":1.25} []{} {\"0\":\"zero\",\"a\":1,\"b\":2}",
            "30/1.25\r\n\n\n",
            "gold 9.90 umlaut n-field r-field l-field <b>&amp;</b>",
            "zero bs",
            "[][][][][3][]",
            "}} { } {x} }{ %} #} Lamp \"Aurora\" – 30 cm",
            "  lead\ttab Lamp \"Aurora\" – 30 cm   \n\n",
            "Lamp \"Aurora\" – 30 cm",
            "ERR Missing(\"items.0\")",
            "ERR Null(\"nil\")",
            "ERR Missing(\"title.x\")",
            "ERR Missing(\"missing.deep\")",
            "ERR Null(\"nil\")",
        ];
        assert_eq!(got, expected);
    }

    #[test]
    fn loops_joins_and_conditions() {
        let r = json!({"title": "Lamp", "tags": ["oak", "ash", 3], "dims": {"w": 30, "h": 2.5},
            "parts": [{"name": "shade"}, {"name": "base", "note": "heavy"}], "sale": false});
        let t = Template::parse(
            "{% for t in tags %}{{ t }}{% if not loop.last %}, {% endif %}{% endfor %}\n\
             {{ tags | join(\" / \") }} {{ title | upper }} {{ tags | length }}\n\
             {% if sale %}SALE{% else %}full price{% endif %}{% if note %} {{ note }}{% endif %}\n\
             {% for p in parts %}- {{ p.name }}{% if p.note %} ({{ p.note }}){% endif %}\n{% endfor %}\
             {% for k, v in dims | items %}{{ k }}={{ v }};{% endfor %} {{ dims }}",
        )
        .unwrap();
        assert_eq!(
            t.render(&r).unwrap(),
            "oak, ash, 3\noak / ash / 3 LAMP 3\nfull price\n- shade\n- base (heavy)\nh=2.5;w=30; {\"h\":2.5,\"w\":30}"
        );
        // Loop variables are not record fields; the fields are found in every statement.
        let fields: Vec<_> = t.fields().collect();
        assert_eq!(
            fields,
            vec![
                ("tags", false),
                ("title", false),
                ("sale", true),
                ("note", true),
                ("parts", false),
                ("dims", false)
            ]
        );
        // Whitespace control and the statement tags themselves add nothing.
        let t = Template::parse("A\n{%- for t in tags %}\n  {{- t }}{% endfor %}\nB\n").unwrap();
        assert_eq!(t.render(&r).unwrap(), "Aoakash3\nB\n");
    }

    #[test]
    fn the_optional_form_in_both_spellings() {
        let r = json!({"a": "x", "nil": null, "dims": {"w": 3}, "n": 0});
        for (old, jinja) in [
            ("[{{a?}}]", "[{{ a | optional }}]"),
            ("[{{nil?}}]", "[{{ nil | optional }}]"),
            ("[{{gone?}}]", "[{{ gone | optional }}]"),
            ("[{{dims.w?}}]", "[{{ dims.w | optional }}]"),
            ("[{{dims.q?}}]", "[{{ dims.q | optional }}]"),
            ("[{{n?}}]", "[{{ n | optional }}]"),
        ] {
            let (o, j) = (
                Template::parse(old).unwrap(),
                Template::parse(jinja).unwrap(),
            );
            assert_eq!(o.render(&r), j.render(&r), "{old} vs {jinja}");
            assert!(o.fields().next().unwrap().1, "{old}");
            assert!(j.fields().next().unwrap().1, "{jinja}");
        }
        assert_eq!(
            Template::parse("[{{nil?}}{{n?}}]")
                .unwrap()
                .render(&r)
                .unwrap(),
            "[0]"
        );
        // The `?` form also reaches below a missing parent.
        let t = Template::parse("[{{gone.deep?}}]").unwrap();
        assert_eq!(t.render(&r).unwrap(), "[]");
        // Optional fields are not checked against the sample.
        let t = Template::parse("{{ gone | optional }}{% if other %}x{% endif %}{{a?}}").unwrap();
        assert!(t.check_sample(std::slice::from_ref(&r)).is_empty());
    }

    #[test]
    fn undefined_names_are_errors_not_empty_strings() {
        let r = json!({"tags": ["a"], "title": "Lamp", "nil": null, "parts": [{"name": "x"}]});
        let t = Template::parse("{% for t in tagz %}{{ t }}{% endfor %}").unwrap();
        assert_eq!(t.render(&r), Err(RenderError::Missing("tagz".into())));
        let t = Template::parse("{{ titel | upper }}").unwrap();
        assert_eq!(t.render(&r), Err(RenderError::Missing("titel".into())));
        let t = Template::parse("{{ tags | join(\",\") }}").unwrap();
        assert_eq!(t.render(&r).unwrap(), "a");
        // Not a record field: minijinja's message, with the line.
        let t = Template::parse("line one\n{% for p in parts %}{{ p.nmae }}{% endfor %}").unwrap();
        let err = t.render(&r).unwrap_err();
        assert_eq!(err.field(), None);
        assert!(err.to_string().contains("line 2"), "{err}");
        // check_sample sees the fields Jinja uses, with the usual suggestion.
        let t =
            Template::parse("{% for t in tagz %}{{ t }}{% endfor %}{{ titel | upper }}").unwrap();
        let misses = t.check_sample(std::slice::from_ref(&r));
        let named: Vec<_> = misses
            .iter()
            .map(|m| (m.field.as_str(), m.suggestion.as_deref()))
            .collect();
        assert_eq!(named, [("tagz", Some("tags")), ("titel", Some("title"))]);
    }

    #[test]
    fn syntax_errors_name_their_line() {
        let err = Template::parse("Title: {{title}}\n{% for t in tags %}{{ t }}\n").unwrap_err();
        assert!(err.contains("line 2") || err.contains("line 3"), "{err}");
        assert!(err.contains("syntax error"), "{err}");
        let err = Template::parse("a\nb\n{{ title | }}").unwrap_err();
        assert!(err.contains("line 3"), "{err}");
        // Text the first engine kept that Jinja reads as a statement: the message says so.
        let err = Template::parse("50{% off {{title}}").unwrap_err();
        assert!(err.contains("{% raw %}"), "{err}");
        // The literal forms.
        let t =
            Template::parse("{{ \"{%\" }} {% raw %}{{title}} {#{% endraw %} {{title}}").unwrap();
        assert_eq!(
            t.render(&json!({"title": "T"})).unwrap(),
            "{% {{title}} {# T"
        );
        assert_eq!(t.fields().collect::<Vec<_>>(), [("title", false)]);
    }

    #[test]
    fn edit_distance_counts_a_swap_once() {
        assert_eq!(edit_distance("materail", "material"), 1);
        assert_eq!(edit_distance("title", "title"), 0);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        let c = vec!["brand".to_string(), "Title".to_string()];
        assert_eq!(closest("title", &c), Some("Title"));
        assert_eq!(closest("bran", &c), Some("brand"));
        assert_eq!(closest("id", &c), None);
    }
}
