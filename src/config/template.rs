//! Prompt templates: literal text with `{{field}}` placeholders.
//!
//! `{{field}}` inserts a record field (dotted paths reach into objects: `{{dims.width}}`);
//! `{{field?}}` inserts nothing when the field is missing or null instead of quarantining the
//! record. Strings are inserted as they are, other values as compact JSON. A template is
//! parsed once and rendered per record without re-scanning.

use serde_json::Value;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Field { path: Vec<String>, optional: bool },
}

/// A parsed template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    segments: Vec<Segment>,
}

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
}

impl Template {
    /// Parses a template; every malformed placeholder is reported (joined with `; `), up to
    /// an unclosed `{{`, which ends the scan.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut segments = Vec::new();
        let mut errors = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                segments.push(Segment::Literal(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let Some(end) = after.find("}}") else {
                errors.push(format!(
                    "`{{{{` at byte {} is never closed with `}}}}`",
                    text.len() - rest.len() + start
                ));
                rest = "";
                break;
            };
            rest = &after[end + 2..];
            let inner = after[..end].trim();
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
            segments.push(Segment::Field { path, optional });
        }
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        if !rest.is_empty() {
            segments.push(Segment::Literal(rest.to_string()));
        }
        Ok(Template { segments })
    }

    /// The field names the template uses (first path segment), for CSV header checks.
    pub fn fields(&self) -> impl Iterator<Item = (&str, bool)> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Field { path, optional } => Some((path[0].as_str(), *optional)),
            Segment::Literal(_) => None,
        })
    }

    pub fn has_fields(&self) -> bool {
        self.fields().next().is_some()
    }

    /// Renders the template against a record, appending to `out`.
    pub fn render_into(&self, record: &Value, out: &mut String) -> Result<(), RenderError> {
        for seg in &self.segments {
            match seg {
                Segment::Literal(s) => out.push_str(s),
                Segment::Field { path, optional } => {
                    let mut v = Some(record);
                    for p in path {
                        v = v.and_then(|x| x.get(p));
                    }
                    match v {
                        None if *optional => {}
                        None => return Err(RenderError::Missing(path.join("."))),
                        Some(Value::Null) if *optional => {}
                        Some(Value::Null) => return Err(RenderError::Null(path.join("."))),
                        Some(Value::String(s)) => out.push_str(s),
                        Some(other) => out.push_str(&other.to_string()),
                    }
                }
            }
        }
        Ok(())
    }

    pub fn render(&self, record: &Value) -> Result<String, RenderError> {
        let mut s = String::new();
        self.render_into(record, &mut s)?;
        Ok(s)
    }
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
}
