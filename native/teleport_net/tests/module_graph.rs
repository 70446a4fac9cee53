//! The crates' modules depend on each other without a cycle: each can be read, and
//! changed, knowing only the modules below it. A module is a file under `src/` or a
//! folder of them; its dependencies are the `crate::name` paths its code names (its
//! `#[cfg(test)] mod tests` aside).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("source folder") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `crate::name` paths in `code`.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        // `crate::{a, b}` names several.
        if name.is_empty() && after.starts_with('{') {
            let group = &after[1..after.find('}').unwrap_or(after.len())];
            for item in group.split(',') {
                let item: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !item.is_empty() {
                    names.insert(item);
                }
            }
        } else if !name.is_empty() {
            names.insert(name);
        }
        rest = after;
    }
    names
}

fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph = Graph::new();
    for file in &files {
        let relative = file.strip_prefix(src).expect("under src");
        let first = relative.components().next().expect("a path");
        let module = Path::new(first.as_os_str())
            .file_stem()
            .expect("a name")
            .to_string_lossy()
            .into_owned();
        if module == "lib" {
            continue;
        }
        let code = fs::read_to_string(file).expect("readable source");
        let code = code.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
        let deps = crate_paths(code);
        graph.entry(module).or_default().extend(deps);
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for (module, deps) in graph.iter_mut() {
        deps.retain(|d| d != module && modules.contains(d));
    }
    graph
}

/// A cycle, if the graph has one: the modules along it.
fn cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_string());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in &graph[node] {
            if let Some(found) = visit(next, graph, done, path) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}

#[test]
fn the_checker_finds_a_cycle() {
    let mut graph = Graph::new();
    graph.insert("a".into(), ["b".to_string()].into());
    graph.insert("b".into(), ["c".to_string()].into());
    graph.insert("c".into(), ["a".to_string()].into());
    assert_eq!(cycle(&graph).map(|c| c.len()), Some(4));
    graph.get_mut("c").unwrap().clear();
    assert_eq!(cycle(&graph), None);
    assert_eq!(
        crate_paths("use crate::x::Y; use crate::{a, b::C};\n crate::z()"),
        ["a", "b", "x", "z"].iter().map(|s| s.to_string()).collect()
    );
}

#[test]
fn the_crates_modules_have_no_cycle() {
    let native = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for krate in ["teleport_net", "teleport_nif"] {
        let graph = graph(&native.join(krate).join("src"));
        assert!(graph.len() > 3, "{krate}: modules found: {graph:?}");
        if let Some(found) = cycle(&graph) {
            panic!("{krate}: modules in a cycle: {}", found.join(" -> "));
        }
    }
}
