//! The module graph of `src/` stays the one docs/architecture.md draws: no cycles, the MQTT side
//! and the databases never import each other, configuration is data over the leaf modules.
//! Read from the source text: every `crate::<module>` path outside comments, per top-level
//! module (a file `src/x.rs` or a folder `src/x/`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Modules that are the crate's entry points (they wire everything) and not part of the graph.
const ENTRY: [&str; 2] = ["lib", "main"];

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).unwrap();
            let top = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            if ENTRY.contains(&top.as_str()) {
                continue;
            }
            let deps = g.entry(top.clone()).or_default();
            for line in std::fs::read_to_string(&path).unwrap().lines() {
                let code = line.split("//").next().unwrap_or("");
                let mut rest = code;
                while let Some(i) = rest.find("crate::") {
                    let after = &rest[i + "crate::".len()..];
                    let name: String = after.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    if !name.is_empty() && name != top {
                        deps.insert(name);
                    }
                    rest = after;
                }
            }
        }
    }
    g
}

fn reaches(g: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str, seen: &mut BTreeSet<String>) -> bool {
    g.get(from)
        .is_some_and(|deps| deps.iter().any(|d| d == to || (seen.insert(d.clone()) && reaches(g, d, to, seen))))
}

#[test]
fn the_module_graph_has_no_cycles_and_keeps_its_layers() {
    let g = graph();
    for m in ["model", "topic", "config", "actions", "backends", "hooks", "broker"] {
        assert!(g.contains_key(m), "module {m} not found: {:?}", g.keys());
    }
    for m in g.keys() {
        assert!(!reaches(&g, m, m, &mut BTreeSet::new()), "import cycle through {m}: {g:#?}");
    }
    let deps = |m: &str| g.get(m).cloned().unwrap_or_default();
    for leaf in ["model", "topic", "metrics"] {
        assert!(deps(leaf).is_empty(), "leaf module {leaf} imports {:?}", deps(leaf));
    }
    let config: BTreeSet<String> = deps("config").into_iter().filter(|d| d != "model" && d != "topic").collect();
    assert!(config.is_empty(), "config imports more than the leaf modules: {config:?}");
    for (a, b) in [
        ("broker", "backends"),
        ("backends", "broker"),
        ("backends", "hooks"),
        ("actions", "backends"),
        ("actions", "hooks"),
    ] {
        assert!(!deps(a).contains(b), "{a} must not import {b}: {g:#?}");
    }
}
