//! The first engine's placeholders inside Jinja: finding `{{field}}` and `{{field?}}` in a
//! template's text and rewriting each into an equivalent Jinja expression on the same line,
//! and telling which fields a Jinja template requires (outside conditions, tests and the
//! `optional`/`default` filters).

/// A placeholder of the first engine, found by [`rewrite`].
pub(super) struct Placeholder {
    pub(super) path: Vec<String>,
    pub(super) optional: bool,
    /// The root is written as a Jinja name, so it may be a loop variable rather than a field.
    pub(super) native_root: bool,
    /// Inside an `{% if %}` block.
    pub(super) conditional: bool,
    pub(super) at: usize,
}

/// A Jinja statement or expression as written in the template (not a field placeholder).
pub(super) struct Span<'a> {
    /// The statement's keyword (`if`, `for`…); `None` for a `{{ … }}` expression.
    pub(super) keyword: Option<&'a str>,
    pub(super) content: &'a str,
}

/// What [`rewrite`] makes of a template's text.
pub(super) struct Rewritten<'a> {
    /// Jinja source: placeholders replaced by equivalent expressions, all else as written.
    pub(super) jinja: String,
    pub(super) placeholders: Vec<Placeholder>,
    pub(super) spans: Vec<Span<'a>>,
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
pub(super) fn rewrite(text: &str) -> Result<Rewritten<'_>, String> {
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
pub(super) fn occurrences<'a>(text: &'a str, path: &'a str) -> impl Iterator<Item = usize> + 'a {
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
pub(super) fn required_in(path: &str, spans: &[Span<'_>]) -> Option<bool> {
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
