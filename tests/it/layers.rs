//! The module graph has no cycles: no module imports a module that imports it back.
//!
//! The check reads `src/` as text. A node is a top-level module (`src/x.rs` or `src/x/`);
//! an arrow goes from `a` to `b` when code in `a` names `crate::b` (tests aside: files named
//! `tests.rs` and inline `#[cfg(test)] mod tests` blocks are skipped, and so are comments).
//! Inside each folder module the same holds one level down, between sibling files
//! (`super::b` or `crate::a::b`), leaving out arrows to and from the folder's `mod.rs`,
//! which declares its children and re-exports what they own.
//!
//! Run it alone with `cargo test --test it layers`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its comments and inline test module.
fn code_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|l| l.trim_start().starts_with("mod tests"))
        {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        out.push_str(match line.find("// ") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        });
        out.push('\n');
    }
    out
}

/// The names that follow `prefix` in `code`: `prefix::name` and `prefix::{a, b::c}`.
fn names_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let needle = format!("{prefix}::");
    let mut rest = code;
    while let Some(i) = rest.find(&needle) {
        let before = rest[..i].chars().last();
        rest = &rest[i + needle.len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find(';').unwrap_or(group.len());
            // The first name of each item in the group, at any depth of braces.
            let mut depth = 0;
            let mut start = true;
            for (j, c) in group[..end].char_indices() {
                match c {
                    '{' => {
                        depth += 1;
                        start = true;
                    }
                    '}' => depth -= 1,
                    ',' => start = depth == 0,
                    c if start && (c.is_ascii_alphabetic() || c == '_') => {
                        if depth == 0 {
                            found.insert(ident(&group[j..]));
                        }
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found
}

/// The cycles of a graph: its strongly connected components of more than one node.
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    // Two nodes are in one component when each reaches the other.
    let reach = |from: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(n) = todo.pop() {
            for m in graph.get(&n).into_iter().flatten() {
                if seen.insert(m.clone()) {
                    todo.push(m.clone());
                }
            }
        }
        seen
    };
    let reached: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|k| (k, reach(k))).collect();
    let mut out: Vec<Vec<String>> = Vec::new();
    for (a, ra) in &reached {
        if !ra.contains(*a) || out.iter().any(|c| c.contains(a)) {
            continue;
        }
        let comp: Vec<String> = reached
            .iter()
            .filter(|(b, rb)| ra.contains(**b) && rb.contains(*a))
            .map(|(b, _)| (*b).clone())
            .collect();
        out.push(comp);
    }
    out
}

fn describe(graph: &Graph, comp: &[String]) -> String {
    comp.iter()
        .map(|a| {
            let to: Vec<&str> = graph[a]
                .iter()
                .filter(|b| comp.contains(b))
                .map(String::as_str)
                .collect();
            format!("{a} -> {}", to.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let top_of = |p: &Path| -> Vec<String> {
        p.strip_prefix(&src)
            .unwrap()
            .iter()
            .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
            .collect()
    };
    let tops: BTreeSet<String> = files
        .iter()
        .map(|f| top_of(f)[0].clone())
        .filter(|t| t != "lib" && t != "main")
        .collect();
    let mut top = Graph::new();
    // folder -> (sibling graph)
    let mut inner: BTreeMap<String, Graph> = BTreeMap::new();
    for f in &files {
        let parts = top_of(f);
        if parts.last().is_some_and(|p| p == "tests") || !tops.contains(&parts[0]) {
            continue;
        }
        let code = code_of(f);
        let me = &parts[0];
        let node = top.entry(me.clone()).or_default();
        for name in names_after(&code, "crate") {
            if &name != me && tops.contains(&name) {
                node.insert(name);
            }
        }
        // One level down: files (or folders) directly inside a folder module.
        if parts.len() >= 2 && parts[1] != "mod" {
            let folder = &parts[0];
            let child = &parts[1];
            let siblings: BTreeSet<String> = files
                .iter()
                .map(|g| top_of(g))
                .filter(|p| p.len() >= 2 && &p[0] == folder && p[1] != "mod" && p[1] != "tests")
                .map(|p| p[1].clone())
                .collect();
            let mut named = names_after(&code, &format!("crate::{folder}"));
            if parts.len() == 2 {
                named.extend(names_after(&code, "super"));
            }
            let g = inner.entry(folder.clone()).or_default();
            let edges = g.entry(child.clone()).or_default();
            for n in named {
                if &n != child && siblings.contains(&n) {
                    edges.insert(n);
                }
            }
        }
    }
    let mut problems = Vec::new();
    for c in cycles(&top) {
        problems.push(format!("modules {}", describe(&top, &c)));
    }
    for (folder, g) in &inner {
        for c in cycles(g) {
            problems.push(format!("inside {folder}/: {}", describe(g, &c)));
        }
    }
    assert!(
        problems.is_empty(),
        "import cycles (an arrow is `use crate::b` in a; see this test's header):\n  {}",
        problems.join("\n  ")
    );
    // The check sees what it should: a known arrow is there.
    assert!(top["worker"].contains("store"), "{top:?}");
}

#[test]
fn the_cycle_check_finds_a_cycle_and_reads_grouped_imports() {
    let code = "use crate::{a, b::{C, D}, c::E};\nfn f() { crate::d::g(); x_crate::e::h(); }";
    let names = names_after(code, "crate");
    assert_eq!(names.into_iter().collect::<Vec<_>>(), ["a", "b", "c", "d"]);
    let mut g = Graph::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    g.entry("c".into()).or_default().insert("a".into());
    g.entry("d".into()).or_default().insert("a".into());
    assert_eq!(
        cycles(&g),
        vec![vec!["a".to_string(), "b".into(), "c".into()]]
    );
}
