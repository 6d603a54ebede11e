//! Tests of the pipeline file: parse, validate, and the checks `validate` runs.

use super::build::is_loopback_url;
use super::*;

const GOOD: &str = r#"
name = "t"
[source]
kind = "jsonl"
path = "data/in.jsonl"
id_field = "id"
[provider]
kind = "openai"
model = "gpt-5.4-mini"
simulate = true
[provider.simulator]
fail_rate = 0.1
[prompt]
system = "You tag things."
user = "Tag: {{text}}"
max_output_tokens = 100
[output]
schema = "s.json"
path = "out/r.jsonl"
"#;

#[test]
fn a_good_file_builds_with_paths_resolved_against_its_folder() {
    let p = Pipeline::from_str(GOOD, Path::new("/srv/jobs/t.toml")).unwrap();
    assert_eq!(p.source.path, Path::new("/srv/jobs/data/in.jsonl"));
    assert_eq!(p.first_stage().schema, Path::new("/srv/jobs/s.json"));
    assert_eq!(p.batch.max_requests, OPENAI_MAX_REQUESTS);
    assert_eq!(p.batch.max_bytes, OPENAI_MAX_BYTES);
    assert_eq!(p.first_stage().max_attempts, 3);
    assert_eq!(p.simulator.fail_rate, 0.1);
    assert_eq!(p.provider.key, KeySource::Env("OPENAI_API_KEY".into()));
}

#[test]
fn every_problem_is_reported_with_its_toml_path() {
    let bad = r#"
name = "t"
colour = "blue"
[source]
kind = "xml"
path = 12
id_field = "id"
extra = 1
[provider]
model = "gpt-5.4-mini"
base_url = "http://api.example.com/v1"
api_key_env = "sk-live-123"
[provider.simulator]
fail_rate = 3.0
typo_rate = 0.1
[prompt]
user = "no placeholders"
max_output_tokens = 0
[retry]
max_attempts = 0
"#;
    let err = Pipeline::from_str(bad, Path::new("bad.toml")).unwrap_err();
    let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
    for expected in [
        "colour",
        "source.kind",
        "source.path",
        "source.extra",
        "provider.base_url",
        "provider.api_key_env",
        "provider.simulator.typo_rate",
        "provider.simulator.fail_rate",
        "prompt.user",
        "prompt.max_output_tokens",
        "[output]",
        "retry.max_attempts",
    ] {
        assert!(paths.contains(&expected), "missing {expected} in {paths:?}");
    }
    let text = err.to_string();
    assert!(text.starts_with("bad.toml: "), "{text}");
}

fn with_source_line(extra: &str) -> String {
    GOOD.replace(
        "id_field = \"id\"\n",
        &format!("id_field = \"id\"\n{extra}\n"),
    )
}

#[test]
fn the_quarantined_share_defaults_to_half_and_takes_ratios() {
    let p = Pipeline::from_str(GOOD, Path::new("t.toml")).unwrap();
    assert_eq!(p.source.max_quarantined_share, Decimal::new(5, 1));
    for (text, want) in [
        ("\"0.05\"", Decimal::new(5, 2)),
        ("0.2", Decimal::new(2, 1)),
        ("0", Decimal::ZERO),
        ("1", Decimal::ONE),
    ] {
        let file = with_source_line(&format!("max_quarantined_share = {text}"));
        let p = Pipeline::from_str(&file, Path::new("t.toml")).unwrap();
        assert_eq!(p.source.max_quarantined_share, want, "{text}");
    }
    for (text, says) in [
        ("1.5", "between 0 and 1"),
        ("-0.1", "between 0 and 1"),
        ("\"half\"", "ratio"),
        ("\"\"", "ratio"),
        ("true", "decimal"),
    ] {
        let file = with_source_line(&format!("max_quarantined_share = {text}"));
        let err = Pipeline::from_str(&file, Path::new("t.toml")).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{text}: {err}");
        assert_eq!(
            err.problems[0].path, "source.max_quarantined_share",
            "{err}"
        );
        assert!(err.problems[0].message.contains(says), "{text}: {err}");
    }
}

#[test]
fn a_rejected_value_is_reported_once_not_again_as_missing() {
    let file = GOOD
        .replace("path = \"data/in.jsonl\"", "path = 12")
        .replace("max_output_tokens = 100", "max_output_tokens = \"lots\"");
    let err = Pipeline::from_str(&file, Path::new("t.toml")).unwrap_err();
    let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["prompt.max_output_tokens", "source.path"], "{err}");
    // A section that is not a table is one problem, not one per key it should hold.
    let file = format!("{GOOD}\n").replace(
        "[output]\nschema = \"s.json\"\npath = \"out/r.jsonl\"\n",
        "",
    );
    let file = file.replace("name = \"t\"", "name = \"t\"\noutput = \"out.jsonl\"");
    let err = Pipeline::from_str(&file, Path::new("t.toml")).unwrap_err();
    let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["output"], "{err}");
}

#[test]
fn flagged_paths_cover_what_lies_inside_them() {
    let flagged = vec!["[source]".to_string(), "provider.model".to_string()];
    assert!(is_flagged(&flagged, "source.path"));
    assert!(is_flagged(&flagged, "source"));
    assert!(is_flagged(&["source".to_string()], "[source]"));
    assert!(is_flagged(&flagged, "provider.model"));
    assert!(!is_flagged(&flagged, "provider.models"));
    assert!(!is_flagged(&flagged, "provider.kind"));
    assert!(!is_flagged(&["".to_string()], "name"));
}

/// A folder with a pipeline file whose source, schema and key are all in order.
fn workspace(records: &str, user: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/in.jsonl"), records).unwrap();
    std::fs::write(dir.path().join("s.json"), r#"{"type": "object"}"#).unwrap();
    let file = dir.path().join("t.toml");
    std::fs::write(&file, GOOD.replace("Tag: {{text}}", user)).unwrap();
    (dir, file)
}

#[test]
fn check_file_runs_the_environment_checks_despite_structural_problems() {
    let (dir, file) = workspace("{\"id\": 1, \"text\": \"a\"}\n", "Tag: {{text}}");
    assert!(Pipeline::check_file(&file, None).is_ok());

    std::fs::remove_file(dir.path().join("data/in.jsonl")).unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text + "\n[retry]\nmax_attempts = 0\n").unwrap();
    let err = Pipeline::check_file(&file, None).unwrap_err();
    let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["retry.max_attempts", "source.path"], "{err}");
    // `load` (and so `run`) still refuses the file.
    assert!(Pipeline::load(&file).is_err());
}

#[test]
fn checks_that_depend_on_a_bad_value_are_skipped() {
    let (_dir, file) = workspace("{\"id\": 1, \"text\": \"a\"}\n", "Tag: {{text}}");
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("kind = \"openai\"", "kind = \"openia\"")
        .replace("simulate = true", "simulate = false")
        .replace("schema = \"s.json\"", "schema = 7")
        .replace("kind = \"jsonl\"", "kind = \"jsnl\"");
    std::fs::write(&file, text).unwrap();
    let err = Pipeline::check_file(&file, None).unwrap_err();
    let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
    // No key, price, schema or source-content checks on values that are wrong already.
    assert_eq!(
        paths,
        ["output.schema", "source.kind", "provider.kind"],
        "{err}"
    );
}

#[test]
fn a_template_field_no_record_has_is_a_problem_with_a_suggestion() {
    let records =
        "{\"id\": 1, \"material\": \"oak\"}\n{\"id\": 2, \"material\": \"ash\", \"text\": \"x\"}\n";
    let (_dir, file) = workspace(records, "{{materail}} {{text}} {{colour?}}");
    let err = Pipeline::check_file(&file, None).unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    let problem = &err.problems[0];
    assert_eq!(problem.path, "prompt.user");
    for needle in [
        "`materail`",
        "did you mean `material`?",
        "id, material, text",
        "first 2 records",
    ] {
        assert!(problem.message.contains(needle), "{needle}: {problem}");
    }
    let (_dir, file) = workspace(records, "{{materail?}} {{material}}");
    assert!(Pipeline::check_file(&file, None).is_ok());
    // The records are read as the run reads them: lines that would be quarantined are
    // not part of the sample, and a source with no usable line at all is a problem.
    let (_dir, file) = workspace("{\"id\": 1, \"text\": \"a\"\nnot json\n", "{{text}}");
    let err = Pipeline::check_file(&file, None).unwrap_err();
    assert_eq!(err.problems[0].path, "source.path", "{err}");
    assert!(
        err.to_string().contains("none of the first 2 lines"),
        "{err}"
    );
    let (_dir, file) = workspace("", "{{text}}");
    assert!(
        Pipeline::check_file(&file, None).is_ok(),
        "an empty source has nothing to run"
    );
}

#[test]
fn toml_syntax_errors_give_line_and_column() {
    let err = Pipeline::from_str("name = \"x\"\n[source\n", Path::new("x.toml")).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("line 2"), "{msg}");
}

#[test]
fn loopback_urls_are_recognised() {
    assert!(is_loopback_url("http://127.0.0.1:8080/v1"));
    assert!(is_loopback_url("http://localhost/v1"));
    assert!(is_loopback_url("http://[::1]:9/v1"));
    assert!(!is_loopback_url("http://127.0.0.1.evil.com/v1"));
    assert!(!is_loopback_url("ftp://localhost"));
}

const STAGED: &str = r#"
name = "t"
[source]
kind = "jsonl"
path = "in.jsonl"
id_field = "id"
[provider]
kind = "openai"
model = "gpt-5.4-mini"
simulate = true
[[stage]]
name = "main"
schema = "s.json"
prompt.user = "Tag: {{text}}"
prompt.max_output_tokens = 100
[[stage]]
name = "review"
needs = ["main"]
schema = "r.json"
prompt.user = "Check: {{text}} {{ main }}"
prompt.max_output_tokens = 50
expected_output_tokens = 30
[output]
path = "out/r.jsonl"
"#;

#[test]
fn a_stage_states_what_plan_assumes_its_answers_count() {
    let p = Pipeline::from_str(STAGED, Path::new("/x/t.toml")).unwrap();
    assert_eq!(p.stages[0].expected_output_tokens, None);
    assert_eq!(p.stages[1].expected_output_tokens, Some(30));

    let over = STAGED.replace("expected_output_tokens = 30", "expected_output_tokens = 80");
    let e = Pipeline::from_str(&over, Path::new("/x/t.toml")).unwrap_err();
    assert_eq!(e.problems.len(), 1, "{e}");
    assert_eq!(e.problems[0].path, "stage.review.expected_output_tokens");
    assert!(e.problems[0].message.contains("max_output_tokens"), "{e}");

    // The first stage's may be stated in [plan] or in its table, not in both.
    let both = STAGED.replace(
        "prompt.max_output_tokens = 100",
        "prompt.max_output_tokens = 100\nexpected_output_tokens = 40",
    ) + "[plan]\nexpected_output_tokens = 40\n";
    let e = Pipeline::from_str(&both, Path::new("/x/t.toml")).unwrap_err();
    assert_eq!(e.problems.len(), 1, "{e}");
    assert_eq!(e.problems[0].path, "stage.main.expected_output_tokens");
    // Stated in the first stage's table, it is what the worksheet assumes for that stage.
    let in_table = STAGED.replace(
        "prompt.max_output_tokens = 100",
        "prompt.max_output_tokens = 100\nexpected_output_tokens = 40",
    );
    let p = Pipeline::from_str(&in_table, Path::new("/x/t.toml")).unwrap();
    assert_eq!(p.plan.expected_output_tokens, Some(40));
}

fn bedrock(provider: &str) -> String {
    GOOD.replace(
        "kind = \"openai\"\nmodel = \"gpt-5.4-mini\"\nsimulate = true\n",
        provider,
    )
}

#[test]
fn a_bedrock_pipeline_names_what_it_lacks_and_takes_folders() {
    let err = Pipeline::from_str(
        &bedrock(
            "kind = \"bedrock\"\nmodel = \"amazon.nova-lite-v1:0\"\nrole_arn = \"my-role\"\ninput_s3_uri = \"my-bucket/in\"\napi_key_env = \"AWS_KEY\"\nmin_batch_records = 0\n",
        ),
        Path::new("b.toml"),
    )
    .unwrap_err();
    let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
    for expected in [
        "provider.region",
        "provider.role_arn",
        "provider.input_s3_uri",
        "provider.output_s3_uri",
        "provider.api_key_env",
        "provider.min_batch_records",
    ] {
        assert!(paths.contains(&expected), "missing {expected} in {paths:?}");
    }

    let p = Pipeline::from_str(
        &bedrock(
            "kind = \"bedrock\"\nmodel = \"amazon.nova-lite-v1:0\"\nregion = \"eu-west-1\"\nrole_arn = \"arn:aws:iam::123456789012:role/Batch\"\ninput_s3_uri = \"s3://b/in\"\noutput_s3_uri = \"s3://b/out/\"\n",
        ),
        Path::new("b.toml"),
    )
    .unwrap();
    let b = p.provider.bedrock.unwrap();
    assert_eq!(
        (b.input_s3_uri.as_str(), b.output_s3_uri.as_str()),
        ("s3://b/in/", "s3://b/out/")
    );
    assert_eq!(b.min_records, crate::provider::config::BEDROCK_MIN_RECORDS);
    // No key of ours: the AWS chain, which `check` cannot judge without a call.
    assert_eq!(p.provider.key, KeySource::AwsChain);
    assert_eq!(p.batch.max_requests, 50_000);

    // Simulated, the AWS settings have stand-ins; other providers refuse them.
    let p = Pipeline::from_str(
        &bedrock("kind = \"bedrock\"\nmodel = \"amazon.nova-lite-v1:0\"\nsimulate = true\n"),
        Path::new("b.toml"),
    )
    .unwrap();
    assert!(p.provider.bedrock.is_some());
    let err = Pipeline::from_str(
        &with_source_line("").replace(
            "simulate = true\n",
            "simulate = true\nregion = \"us-east-1\"\n",
        ),
        Path::new("o.toml"),
    )
    .unwrap_err();
    assert_eq!(err.problems[0].path, "provider.region", "{err}");
}

#[test]
fn output_include_source_is_off_by_default_and_must_be_a_boolean() {
    let p = Pipeline::from_str(GOOD, Path::new("t.toml")).unwrap();
    assert!(!p.output.include_source);
    let on = GOOD.replace(
        "path = \"out/r.jsonl\"",
        "path = \"out/r.jsonl\"\ninclude_source = true",
    );
    let p = Pipeline::from_str(&on, Path::new("t.toml")).unwrap();
    assert!(p.output.include_source);
    for (line, path) in [
        ("include_source = \"yes\"", "output.include_source"),
        ("include_sources = true", "output.include_sources"),
    ] {
        let bad = GOOD.replace(
            "path = \"out/r.jsonl\"",
            &format!("path = \"out/r.jsonl\"\n{line}"),
        );
        let err = Pipeline::from_str(&bad, Path::new("t.toml")).unwrap_err();
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, [path], "{err}");
    }
}
