//! Tests of the templates: the first engine's placeholders byte for byte, Jinja, and the
//! sample check.

use super::*;
use serde_json::json;

#[test]
fn renders_fields_paths_and_optionals() {
    let t = Template::parse("Title: {{title}} ({{ dims.w }}cm){{note?}} tags={{tags}}").unwrap();
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

/// A record's objects and arrays are read by the template where they stand: indexing,
/// lengths, iteration in key order, truthiness and nesting behave as for any Jinja value.
#[test]
fn record_objects_and_arrays_behave_as_jinja_values() {
    let r = json!({"tags": ["oak", "ash", 3], "empty": [], "none": {},
            "dims": {"w": 30, "d": {"x": 1.25, "y": [1, {"z": "deep"}]}, "a": "first"}});
    let t = Template::parse(
        "{{ tags[0] }} {{ tags[-1] }} {{ tags | length }} {{ dims | length }}|\
         {% for k in dims %}{{ k }},{% endfor %}|{% for k, v in dims.d | items %}{{ k }}={{ v }};{% endfor %}|\
         {% if empty %}E{% endif %}{% if none %}N{% endif %}{% if tags %}T{% endif %}{% if dims %}D{% endif %}|\
         {{ dims.d.y[1].z }} {{ dims['a'] }} {{ dims.d.y }} {{ tags | first }} {{ 'oak' in tags }} {{ 'w' in dims }}",
    )
    .unwrap();
    assert_eq!(
        t.render(&r).unwrap(),
        "oak 3 3 3|a,d,w,|x=1.25;y=[1,{\"z\":\"deep\"}];|TD|deep first [1,{\"z\":\"deep\"}] oak true true"
    );
    // A member the object does not have is undefined: an error where it is inserted.
    let t = Template::parse("{{ dims.q }}").unwrap();
    assert_eq!(t.render(&r), Err(RenderError::Missing("dims.q".into())));
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
    let t = Template::parse("{% for t in tagz %}{{ t }}{% endfor %}{{ titel | upper }}").unwrap();
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
    let t = Template::parse("{{ \"{%\" }} {% raw %}{{title}} {#{% endraw %} {{title}}").unwrap();
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
