//! Prompt templates: literal text with `{{field}}` placeholders.
//!
//! `{{field}}` inserts a record field (dotted paths reach into objects: `{{dims.width}}`);
//! `{{field?}}` inserts nothing when the field is missing or null instead of quarantining the
//! record. Strings are inserted as they are, other values as compact JSON. A template is
//! parsed once and rendered per record without re-scanning.
//!
//! [`Template::check_sample`] compares the required fields with a sample of records, so a
//! typo that would quarantine every record is caught before the run (with the closest field
//! name the records do have).

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

    /// The required (non-optional) placeholders that no record of `sample` can fill: each
    /// would quarantine every record like the sampled ones. A field present in some records
    /// only is not reported (those records alone are quarantined). An empty sample reports
    /// nothing.
    pub fn check_sample(&self, sample: &[Value]) -> Vec<FieldMiss> {
        let mut misses: Vec<FieldMiss> = Vec::new();
        if sample.is_empty() {
            return misses;
        }
        for seg in &self.segments {
            let Segment::Field {
                path,
                optional: false,
            } = seg
            else {
                continue;
            };
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
