//! The exporter's modules import one another without a circle: the pure modules (`ids`, `affiliates`, `payload`,
//! `feed`, `core`) never reach back to the store or the process, and no two modules need each other, directly or
//! through others. Read from the sources' `crate::` paths (comments aside), test code included.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The names `lib.rs` re-exports (`pub use module::{A, B};`), with the module each comes from.
fn reexports(src: &Path) -> BTreeMap<String, String> {
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("read lib.rs");
    let mut out = BTreeMap::new();
    for line in lib.lines() {
        let Some(rest) = line.strip_prefix("pub use ") else { continue };
        let Some((module, names)) = rest.split_once("::") else { continue };
        for name in names.trim_matches(|c| c == '{' || c == '}' || c == ';').split(',') {
            out.insert(name.trim().to_owned(), module.to_owned());
        }
    }
    out
}

/// Top-level module → the top-level modules its code names through `crate::` (a re-exported name counts as its
/// module).
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let reexported = reexports(&src);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = vec![src.clone()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).expect("read src") {
                files.push(entry.expect("dir entry").path());
            }
            continue;
        }
        let relative = path.strip_prefix(&src).expect("under src");
        let top = relative.components().next().expect("a component").as_os_str().to_string_lossy();
        let module = top.trim_end_matches(".rs").to_owned();
        if module == "bin" || module == "lib" || path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read source");
        let names = graph.entry(module.clone()).or_default();
        for line in text.lines().map(str::trim).filter(|l| !l.starts_with("//")) {
            for (at, _) in line.match_indices("crate::") {
                let name: String =
                    line[at + "crate::".len()..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                let name = reexported.get(&name).cloned().unwrap_or(name);
                if !name.is_empty() && name != module {
                    names.insert(name);
                }
            }
        }
    }
    graph
}

/// The modules reachable from `from`.
fn reach(graph: &BTreeMap<String, BTreeSet<String>>, from: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<&str> = graph.get(from).map(|n| n.iter().map(String::as_str).collect()).unwrap_or_default();
    while let Some(next) = todo.pop() {
        if seen.insert(next.to_owned()) {
            todo.extend(graph.get(next).into_iter().flatten().map(String::as_str));
        }
    }
    seen
}

#[test]
fn no_module_of_the_exporter_imports_one_that_imports_it_back() {
    let graph = imports();
    for module in ["core", "feed", "ids", "outbox", "process", "audit"] {
        assert!(graph.contains_key(module), "{module} not found: {graph:?}");
    }
    assert!(graph["process"].contains("core") && graph["outbox"].contains("core"), "{graph:?}");
    for module in graph.keys() {
        assert!(!reach(&graph, module).contains(module), "{module} imports itself back: {graph:?}");
    }
    // The rules do not depend on how they are stored or driven.
    for pure in ["core", "feed", "ids", "payload", "affiliates"] {
        let reached = reach(&graph, pure);
        for io in ["outbox", "process", "relay_link", "http", "audit"] {
            assert!(!reached.contains(io), "{pure} reaches {io}: {graph:?}");
        }
    }
}
