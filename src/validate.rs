//! Output validation: is this answer what the pipeline asked for?
//!
//! The answer text is parsed as JSON and checked against the pipeline's JSON Schema, compiled
//! once. A truncated answer (`finish_reason = length`), a refusal or an empty answer fails
//! before parsing. The verdict and the error paths are stored on the attempt.

use std::path::Path;

use serde_json::Value;

use crate::store::AttemptVerdict;
use crate::util::text::preview;

/// How many schema errors are kept per answer.
const MAX_ERRORS: usize = 8;

/// The compiled output schema.
pub struct OutputValidator {
    validator: jsonschema::Validator,
    schema: Value,
}

impl std::fmt::Debug for OutputValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputValidator").finish_non_exhaustive()
    }
}

/// The verdict on one answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Valid: the parsed answer.
    Valid(Value),
    /// Not JSON at all.
    InvalidJson(String),
    /// JSON, but not what the schema allows: `instance_path: message` per error.
    SchemaInvalid(Vec<String>),
    /// The model ran out of output tokens.
    Truncated,
    /// The model refused.
    Refused(String),
    /// No content.
    Empty,
}

impl Verdict {
    /// The verdict as the store keeps it.
    pub fn code(&self) -> AttemptVerdict {
        match self {
            Verdict::Valid(_) => AttemptVerdict::Ok,
            Verdict::InvalidJson(_) => AttemptVerdict::InvalidJson,
            Verdict::SchemaInvalid(_) => AttemptVerdict::SchemaInvalid,
            Verdict::Truncated => AttemptVerdict::Truncated,
            Verdict::Refused(_) => AttemptVerdict::Refused,
            Verdict::Empty => AttemptVerdict::Empty,
        }
    }

    pub fn detail(&self) -> Option<String> {
        match self {
            Verdict::Valid(_) | Verdict::Truncated | Verdict::Empty => None,
            Verdict::InvalidJson(e) => Some(e.clone()),
            Verdict::SchemaInvalid(errs) => Some(errs.join("; ")),
            Verdict::Refused(r) => Some(r.clone()),
        }
    }
}

impl OutputValidator {
    /// Reads and compiles a schema file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read schema {}: {e}", path.display()))?;
        let schema: Value = serde_json::from_str(&text).map_err(|e| {
            format!(
                "schema {} is not JSON: line {}, column {}: {e}",
                path.display(),
                e.line(),
                e.column()
            )
        })?;
        Self::new(schema).map_err(|e| format!("schema {}: {e}", path.display()))
    }

    pub fn new(schema: Value) -> Result<Self, String> {
        if !schema.is_object() {
            return Err("a JSON Schema must be an object".into());
        }
        let validator = jsonschema::validator_for(&schema)
            .map_err(|e| format!("not a valid JSON Schema: {e}"))?;
        Ok(OutputValidator { validator, schema })
    }

    pub fn schema(&self) -> &Value {
        &self.schema
    }

    /// Judges one answer.
    pub fn check(
        &self,
        content: Option<&str>,
        finish_reason: Option<&str>,
        refusal: Option<&str>,
    ) -> Verdict {
        if let Some(r) = refusal.filter(|r| !r.is_empty()) {
            return Verdict::Refused(preview(r, 200));
        }
        if finish_reason == Some("length") {
            return Verdict::Truncated;
        }
        let Some(text) = content.filter(|c| !c.trim().is_empty()) else {
            return Verdict::Empty;
        };
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => return Verdict::InvalidJson(format!("column {}: {e}", e.column())),
        };
        let errors: Vec<String> = self
            .validator
            .iter_errors(&value)
            .take(MAX_ERRORS)
            .map(|e| {
                let at = e.instance_path().to_string();
                format!(
                    "{}: {}",
                    if at.is_empty() { "/" } else { &at },
                    preview(&e.to_string(), 200)
                )
            })
            .collect();
        if errors.is_empty() {
            Verdict::Valid(value)
        } else {
            Verdict::SchemaInvalid(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn v() -> OutputValidator {
        OutputValidator::new(json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {"label": {"enum": ["billing", "bug"]}, "score": {"type": "number", "minimum": 0}},
            "required": ["label", "score"],
            "additionalProperties": false
        }))
        .unwrap()
    }

    #[test]
    fn valid_answers_pass() {
        assert_eq!(
            v().check(Some(r#"{"label":"bug","score":1}"#), Some("stop"), None),
            Verdict::Valid(json!({"label": "bug", "score": 1}))
        );
    }

    #[test]
    fn every_kind_of_bad_answer_gets_its_verdict() {
        let v = v();
        assert_eq!(
            v.check(Some("{\"label\":"), Some("length"), None),
            Verdict::Truncated
        );
        assert!(matches!(
            v.check(Some("{\"label\":"), Some("stop"), None),
            Verdict::InvalidJson(_)
        ));
        assert_eq!(v.check(None, Some("stop"), None), Verdict::Empty);
        assert!(matches!(
            v.check(None, Some("stop"), Some("no")),
            Verdict::Refused(_)
        ));
        let Verdict::SchemaInvalid(errs) =
            v.check(Some(r#"{"label":"maybe","score":-1}"#), Some("stop"), None)
        else {
            panic!()
        };
        assert_eq!(errs.len(), 2);
        assert!(errs.iter().any(|e| e.starts_with("/label")), "{errs:?}");
        assert!(errs.iter().any(|e| e.starts_with("/score")), "{errs:?}");
    }

    #[test]
    fn deeply_nested_answers_are_invalid_json_not_a_crash() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let Verdict::InvalidJson(e) = v().check(Some(&deep), Some("stop"), None) else {
            panic!("a 100,000-deep answer was accepted")
        };
        assert!(e.contains("recursion limit"), "{e}");
    }

    #[test]
    fn a_broken_schema_is_refused_when_loaded() {
        assert!(OutputValidator::new(json!({"type": "no-such-type"})).is_err());
        assert!(OutputValidator::new(json!([1])).is_err());
    }
}
