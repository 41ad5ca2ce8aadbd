//! Regenerates the Rust code from `schema/*.capnp` with the real `capnp`
//! compiler and compares it with what is checked in.

use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn checked_in_code_matches_the_schema() {
    let root = workspace_root();
    let schema_dir = root.join("schema");
    let src_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let out = tempfile::tempdir().unwrap();

    let mut cmd = capnpc::CompilerCommand::new();
    cmd.src_prefix(&schema_dir).output_path(out.path());
    for file in granary_schema::SCHEMA_FILES {
        cmd.file(schema_dir.join(file));
    }
    if let Err(e) = cmd.run() {
        panic!(
            "running the capnp compiler failed: {e}\n\
             install it with `apt-get install capnproto` (./run-tests does this)"
        );
    }

    let regenerate = std::env::var_os("GRANARY_REGENERATE_SCHEMA").is_some();
    let mut stale = Vec::new();
    for file in granary_schema::SCHEMA_FILES {
        let name = file.replace(".capnp", "_capnp.rs");
        let fresh = std::fs::read_to_string(out.path().join(&name)).unwrap();
        let checked_in_path = src_dir.join(&name);
        let checked_in = std::fs::read_to_string(&checked_in_path).unwrap_or_default();
        if fresh != checked_in {
            if regenerate {
                std::fs::write(&checked_in_path, fresh).unwrap();
            } else {
                stale.push(name);
            }
        }
    }
    assert!(
        stale.is_empty(),
        "generated code is out of date for {stale:?}; run \
         `GRANARY_REGENERATE_SCHEMA=1 cargo test -p granary-schema --test regenerate` and commit the result"
    );
}

#[test]
fn every_schema_file_is_listed() {
    let mut on_disk: Vec<String> = std::fs::read_dir(workspace_root().join("schema"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".capnp"))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = granary_schema::SCHEMA_FILES
        .iter()
        .map(|s| s.to_string())
        .collect();
    listed.sort();
    assert_eq!(
        on_disk, listed,
        "SCHEMA_FILES in granary-schema/src/lib.rs must list every schema/*.capnp"
    );
}
