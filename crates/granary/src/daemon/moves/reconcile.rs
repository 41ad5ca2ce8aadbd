//! What a node that was failed over keeps for its admin: for each grain
//! another node took over while this one was away, the data it still had
//! is kept aside (retired as `failover-<epoch>`), and what in it differs
//! from the copy that was promoted (its replica snapshot, still here) is
//! written down, file by file, in `DATA_DIR/reconcile/<grain>-<epoch>.json`
//! — the writes made in the window that the promoted copy does not hold.
//! `granary node reconcile` lists them.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One grain's divergent data, as `granary node reconcile` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Divergence {
    pub grain: String,
    /// The node that runs the grain now, under which epoch.
    pub placed_on: String,
    pub epoch: i64,
    /// The copy it promoted, and when the failover was.
    pub promoted: String,
    pub failed_over_unix: i64,
    /// Where this node's data of the grain is kept.
    pub kept: Option<String>,
    /// Files that differ from the promoted copy; `None` when the promoted
    /// copy's snapshot was no longer here to compare with.
    pub changes: Option<Vec<Change>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Change {
    pub path: String,
    /// `added`, `changed` or `removed`: what this node's data did to the
    /// file after the promoted copy was taken.
    pub change: String,
    /// Its size here (`removed`: in the promoted copy).
    pub bytes: u64,
}

pub(crate) fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("reconcile")
}

/// Writes `d` down (blocking), root-only.
pub(crate) fn record(data_dir: &Path, d: &Divergence) -> Result<PathBuf, String> {
    let dir = dir(data_dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let path = dir.join(format!("{}-{}.json", d.grain, d.epoch));
    let bytes = serde_json::to_vec_pretty(d).map_err(|e| e.to_string())?;
    granary_files::write_atomic(&path, &bytes, 0o600).map_err(|e| e.to_string())?;
    Ok(path)
}

/// Every divergence written down here, oldest failover first.
pub(crate) fn list(data_dir: &Path) -> Result<Vec<Divergence>, String> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir(data_dir)) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e.to_string()),
    };
    for entry in entries.flatten() {
        let text = std::fs::read(entry.path()).map_err(|e| e.to_string())?;
        let d: Divergence = serde_json::from_slice(&text)
            .map_err(|e| format!("{}: {e}", entry.path().display()))?;
        out.push(d);
    }
    out.sort_by_key(|d| (d.failed_over_unix, d.grain.clone()));
    Ok(out)
}

/// A file's kind and content digest, for comparing two trees.
#[derive(PartialEq, Eq)]
struct Entry {
    kind: u8,
    bytes: u64,
    digest: [u8; 32],
}

/// Every file, directory and symlink under `root` (not following
/// symlinks), by path relative to it.
fn walk(root: &Path) -> std::io::Result<BTreeMap<String, Entry>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            let meta = std::fs::symlink_metadata(&path)?;
            let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
            let kind = if meta.is_dir() {
                todo.push(path.clone());
                0
            } else if meta.file_type().is_symlink() {
                hash.update(std::fs::read_link(&path)?.as_os_str().as_encoded_bytes());
                1
            } else if meta.is_file() {
                let mut f = std::fs::File::open(&path)?;
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    hash.update(&buf[..n]);
                }
                2
            } else {
                3
            };
            out.insert(
                rel,
                Entry {
                    kind,
                    bytes: if meta.is_file() { meta.len() } else { 0 },
                    digest: hash.finish().as_ref().try_into().unwrap_or([0; 32]),
                },
            );
        }
    }
    Ok(out)
}

/// What `ours` holds that `promoted` does not, file by file (directories
/// only when added or removed).
pub(crate) fn diff(ours: &Path, promoted: &Path) -> std::io::Result<Vec<Change>> {
    let (a, b) = (walk(ours)?, walk(promoted)?);
    let mut out = Vec::new();
    for (path, e) in &a {
        match b.get(path) {
            None => out.push(Change {
                path: path.clone(),
                change: "added".into(),
                bytes: e.bytes,
            }),
            Some(p) if p != e && e.kind != 0 => out.push(Change {
                path: path.clone(),
                change: "changed".into(),
                bytes: e.bytes,
            }),
            Some(_) => {}
        }
    }
    for (path, p) in &b {
        if !a.contains_key(path) {
            out.push(Change {
                path: path.clone(),
                change: "removed".into(),
                bytes: p.bytes,
            });
        }
    }
    out.sort_by(|x, y| x.path.cmp(&y.path));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_diff_names_each_file_written_after_the_promoted_copy() {
        let t = tempfile::tempdir().unwrap();
        let (ours, theirs) = (t.path().join("ours"), t.path().join("theirs"));
        for d in [&ours, &theirs] {
            std::fs::create_dir_all(d.join("mail/new")).unwrap();
            std::fs::write(d.join("same"), "x").unwrap();
            std::fs::write(d.join("log"), "1\n").unwrap();
        }
        std::fs::write(ours.join("log"), "1\n2\n").unwrap();
        std::fs::write(ours.join("mail/new/m2"), "late mail").unwrap();
        std::fs::write(theirs.join("gone"), "deleted later").unwrap();
        std::os::unix::fs::symlink("same", ours.join("link")).unwrap();
        let changes = diff(&ours, &theirs).unwrap();
        let got: Vec<(&str, &str, u64)> = changes
            .iter()
            .map(|c| (c.path.as_str(), c.change.as_str(), c.bytes))
            .collect();
        assert_eq!(
            got,
            [
                ("gone", "removed", 13),
                ("link", "added", 0),
                ("log", "changed", 4),
                ("mail/new/m2", "added", 9),
            ]
        );
    }
}
