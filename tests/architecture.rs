//! ARCHITECTURE.md's crate map is the truth about dependencies: every
//! workspace crate is named there, and no crate depends (directly or through
//! others, dev-dependencies aside) on anything its row forbids.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

struct Row {
    forbidden: Vec<String>,
}

/// Reads the rows of the crate table (under `## Crates`):
/// `| `name` | owns | must not depend on |`. Forbidden names are the
/// backticked words of the third column.
fn crate_map(text: &str) -> BTreeMap<String, Row> {
    let mut map = BTreeMap::new();
    let section = text
        .lines()
        .skip_while(|l| l.trim() != "## Crates")
        .skip(1)
        .take_while(|l| !l.starts_with("## "));
    for line in section {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 5 || !cells[1].starts_with('`') {
            continue;
        }
        let name = cells[1].trim_matches('`').to_owned();
        let forbidden = cells[3]
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        map.insert(name, Row { forbidden });
    }
    map
}

#[test]
fn every_crate_is_mapped_and_no_forbidden_edge_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let map = crate_map(&doc);

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1"])
        .current_dir(&root)
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    let name_of: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let members: BTreeSet<&str> = meta["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| name_of[id.as_str().unwrap()])
        .collect();

    let unmapped: Vec<_> = members.iter().filter(|m| !map.contains_key(**m)).collect();
    assert!(
        unmapped.is_empty(),
        "crates missing from ARCHITECTURE.md: {unmapped:?}"
    );
    let stale: Vec<_> = map
        .keys()
        .filter(|k| !members.contains(k.as_str()))
        .collect();
    assert!(
        stale.is_empty(),
        "ARCHITECTURE.md names crates that do not exist: {stale:?}"
    );

    // Normal and build dependency edges, by package name.
    let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().unwrap() {
        let from = name_of[node["id"].as_str().unwrap()];
        for dep in node["deps"].as_array().unwrap() {
            let runtime = dep["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kind"].as_str() != Some("dev"));
            if runtime {
                edges
                    .entry(from)
                    .or_default()
                    .insert(name_of[dep["pkg"].as_str().unwrap()]);
            }
        }
    }

    let mut violations = Vec::new();
    for (krate, row) in &map {
        // Walk the transitive closure, remembering one path to each crate.
        let mut path_to: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        let mut stack = vec![(krate.as_str(), vec![krate.as_str()])];
        while let Some((at, path)) = stack.pop() {
            for next in edges.get(at).into_iter().flatten() {
                if !path_to.contains_key(next) {
                    let mut p = path.clone();
                    p.push(next);
                    path_to.insert(next, p.clone());
                    stack.push((next, p));
                }
            }
        }
        for banned in &row.forbidden {
            if let Some(path) = path_to.get(banned.as_str()) {
                violations.push(format!(
                    "{krate} must not depend on {banned}, but: {}",
                    path.join(" -> ")
                ));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "forbidden dependencies:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_map_parser_reads_forbidden_names() {
    let map = crate_map(
        "## Crates\n| crate | owns | must not depend on |\n|---|---|---|\n| `a` | things | `tokio`, `hyper` |\n| `b` | more | — |\n## Other\n| `c` | not a crate | x |\n",
    );
    assert!(!map.contains_key("c"));
    assert_eq!(map["a"].forbidden, ["tokio", "hyper"]);
    assert!(map["b"].forbidden.is_empty());
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The gateway, the admin server and the backup code reach grains only
/// through `granary_grains::Grains`: in the binary, only the start-up that
/// makes the supervisor's thread names the supervisor. (The gateway's crate
/// cannot depend on it at all: its row forbids it.)
#[test]
fn grains_are_reached_only_through_the_grains_interface() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/granary/src");
    let allowed = src.join("daemon/start.rs");
    let mut offenders = Vec::new();
    for file in rust_files(&src) {
        if file == allowed {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        if text.contains("granary_supervisor") || text.contains("Supervisor::") {
            offenders.push(file.display().to_string());
        }
    }
    assert!(
        offenders.is_empty(),
        "these reach the supervisor directly instead of through granary_grains::Grains: {offenders:?}"
    );
}

/// Rooms that grow too big get split: no hand-written file of the binary
/// is over 600 lines.
#[test]
fn no_file_of_the_binary_is_over_600_lines() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/granary/src");
    let big: Vec<String> = rust_files(&src)
        .into_iter()
        .filter_map(|f| {
            let lines = std::fs::read_to_string(&f).unwrap().lines().count();
            (lines > 600).then(|| format!("{} ({lines} lines)", f.display()))
        })
        .collect();
    assert!(big.is_empty(), "split these by concern: {big:?}");
}
