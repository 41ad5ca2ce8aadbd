//! Granary's file-tree stream: how plain and btrfs snapshots are backed
//! up (ZFS uses `zfs send`), restorable onto any backend.
//!
//! A stream is a tar archive: `granary-tree.json` (format, base), then
//! `granary-deleted` (the paths gone since the base, NUL-separated, raw
//! bytes), then the entries under `data/` in sorted order, parents before
//! children. A full stream has every entry; an incremental one only what
//! is new or changed since the base snapshot (type, mode, size, mtime, or
//! a symlink's target), found by walking both snapshots side by side.
//! Owners are not carried: a restore hands everything to the grain's uid
//! on the target node.

use std::ffi::OsString;
use std::fs::{self, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::BackupError;

const HEADER: &str = "granary-tree.json";
const DELETED: &str = "granary-deleted";
/// Modes carried: permissions and sticky; never setuid or setgid.
const MODE_MASK: u32 = 0o1777;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamHeader {
    format: u32,
    base: Option<String>,
}

/// What a stream holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TreeStats {
    pub entries: u64,
    pub file_bytes: u64,
    pub deleted: u64,
    /// Sockets and FIFOs, which a backup cannot carry.
    pub skipped: u64,
}

fn walk_err(path: &Path) -> impl FnOnce(io::Error) -> BackupError + '_ {
    move |e| BackupError::Io(format!("cannot read {}: {e}", path.display()))
}

/// Sorted names in a directory (raw bytes order).
fn names(dir: &Path) -> Result<Vec<OsString>, BackupError> {
    let mut names: Vec<OsString> = fs::read_dir(dir)
        .map_err(walk_err(dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(walk_err(dir))?;
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Kind {
    Dir,
    File,
    Link,
    Other,
}

fn kind(meta: &Metadata) -> Kind {
    let t = meta.file_type();
    if t.is_dir() {
        Kind::Dir
    } else if t.is_file() {
        Kind::File
    } else if t.is_symlink() {
        Kind::Link
    } else {
        Kind::Other
    }
}

/// Bytes of changed file content a stream from `new` against `base` will
/// carry: the total for progress and ETA.
pub fn changed_bytes(new: &Path, base: Option<&Path>) -> Result<u64, BackupError> {
    let mut total = 0;
    visit(new, base, Path::new(""), &mut |_, meta, changed| {
        if changed && meta.is_file() {
            total += meta.len();
        }
        Ok(())
    })?;
    Ok(total)
}

/// Walks `new` in stream order, calling `f(rel, meta, changed)`; `changed`
/// says whether the entry differs from `base`.
fn visit(
    new: &Path,
    base: Option<&Path>,
    rel: &Path,
    f: &mut dyn FnMut(&Path, &Metadata, bool) -> Result<(), BackupError>,
) -> Result<(), BackupError> {
    let dir = new.join(rel);
    for name in names(&dir)? {
        let rel_child = rel.join(&name);
        let path = new.join(&rel_child);
        let meta = fs::symlink_metadata(&path).map_err(walk_err(&path))?;
        let old = base.and_then(|b| fs::symlink_metadata(b.join(&rel_child)).ok());
        let same_kind = old.as_ref().is_some_and(|o| kind(o) == kind(&meta));
        let changed = match (&old, kind(&meta)) {
            (Some(o), Kind::Dir) if same_kind => o.mode() != meta.mode(),
            (Some(o), Kind::File) if same_kind => {
                o.mode() != meta.mode()
                    || o.len() != meta.len()
                    || o.mtime() != meta.mtime()
                    || o.mtime_nsec() != meta.mtime_nsec()
            }
            (Some(_), Kind::Link) if same_kind => {
                let b = base.expect("old implies base").join(&rel_child);
                fs::read_link(&b).ok() != fs::read_link(&path).ok()
            }
            _ => true,
        };
        f(&rel_child, &meta, changed)?;
        if meta.is_dir() {
            let child_base = if same_kind { base } else { None };
            visit(new, child_base, &rel_child, f)?;
        }
    }
    Ok(())
}

/// Paths in `base` that are gone from `new` or changed type (only the top
/// of each removed subtree).
fn deleted(new: &Path, base: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), BackupError> {
    let dir = base.join(rel);
    for name in names(&dir)? {
        let rel_child = rel.join(&name);
        let old = fs::symlink_metadata(base.join(&rel_child)).map_err(walk_err(&dir))?;
        match fs::symlink_metadata(new.join(&rel_child)) {
            Ok(now) if kind(&now) == kind(&old) => {
                if old.is_dir() {
                    deleted(new, base, &rel_child, out)?;
                }
            }
            _ => out.push(rel_child),
        }
    }
    Ok(())
}

/// Writes the stream of snapshot directory `new`, incremental against
/// `base` (the previous snapshot's directory) when given.
pub fn write_stream(
    new: &Path,
    base: Option<(&Path, &str)>,
    out: impl Write,
) -> Result<TreeStats, BackupError> {
    let mut stats = TreeStats::default();
    let mut tar = tar::Builder::new(out);
    tar.mode(tar::HeaderMode::Complete);
    let header = serde_json::to_vec(&StreamHeader {
        format: 1,
        base: base.map(|(_, label)| label.to_owned()),
    })
    .map_err(|e| BackupError::Other(e.to_string()))?;
    append_bytes(&mut tar, HEADER, &header)?;
    let mut gone = Vec::new();
    if let Some((base_dir, _)) = base {
        deleted(new, base_dir, Path::new(""), &mut gone)?;
    }
    stats.deleted = gone.len() as u64;
    let mut list = Vec::new();
    for p in &gone {
        list.extend_from_slice(p.as_os_str().as_bytes());
        list.push(0);
    }
    append_bytes(&mut tar, DELETED, &list)?;
    let write_err = |e: io::Error| BackupError::Io(format!("cannot write the stream: {e}"));
    visit(
        new,
        base.map(|(d, _)| d),
        Path::new(""),
        &mut |rel, meta, changed| {
            if !changed {
                return Ok(());
            }
            let path = new.join(rel);
            let name = Path::new("data").join(rel);
            let mut h = tar::Header::new_gnu();
            h.set_mode(meta.mode() & MODE_MASK);
            h.set_mtime(meta.mtime().max(0) as u64);
            h.set_uid(0);
            h.set_gid(0);
            match kind(meta) {
                Kind::Dir => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    tar.append_data(&mut h, &name, io::empty())
                        .map_err(write_err)?;
                }
                Kind::File => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(meta.len());
                    let file = fs::OpenOptions::new()
                        .read(true)
                        .custom_flags(nix::libc::O_NOFOLLOW)
                        .open(&path)
                        .map_err(walk_err(&path))?;
                    tar.append_data(&mut h, &name, file.take(meta.len()))
                        .map_err(write_err)?;
                    stats.file_bytes += meta.len();
                }
                Kind::Link => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    let target = fs::read_link(&path).map_err(walk_err(&path))?;
                    tar.append_link(&mut h, &name, &target).map_err(write_err)?;
                }
                Kind::Other => {
                    if meta.file_type().is_socket() || meta.file_type().is_fifo() {
                        tracing::debug!(path = %path.display(), "socket or FIFO not backed up");
                    }
                    stats.skipped += 1;
                    return Ok(());
                }
            }
            stats.entries += 1;
            Ok(())
        },
    )?;
    tar.into_inner()
        .and_then(|mut w| w.flush())
        .map_err(write_err)?;
    Ok(stats)
}

fn append_bytes<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    bytes: &[u8],
) -> Result<(), BackupError> {
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o600);
    h.set_size(bytes.len() as u64);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, name, bytes)
        .map_err(|e| BackupError::Io(format!("cannot write the stream: {e}")))
}

/// A relative path of plain components only.
fn clean(rel: &Path) -> Result<&Path, BackupError> {
    if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(BackupError::Integrity(format!(
            "stream entry {} is not a plain relative path",
            rel.display()
        )));
    }
    Ok(rel)
}

/// Every parent of `rel` under `root` must be a real directory (never a
/// symlink), so nothing is ever written or deleted outside `root`.
fn parents_are_dirs(root: &Path, rel: &Path) -> Result<bool, BackupError> {
    let mut at = root.to_path_buf();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            at.push(c);
            match fs::symlink_metadata(&at) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(BackupError::Integrity(format!(
                        "stream entry {} lies under a non-directory",
                        rel.display()
                    )));
                }
                Err(_) => return Ok(false),
            }
        }
    }
    Ok(true)
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Applies one stream to `dest` (empty for a full stream; holding the
/// base's files for an incremental one), handing every entry to `uid`
/// (when running as root). Returns the stream's base.
pub fn apply_stream(
    input: impl Read,
    dest: &Path,
    uid: Option<u32>,
) -> Result<Option<String>, BackupError> {
    let bad = |what: String| BackupError::Integrity(format!("tree stream: {what}"));
    let ioe = |what: &str, p: &Path| {
        let msg = format!("cannot {what} {}", p.display());
        move |e: io::Error| BackupError::Io(format!("{msg}: {e}"))
    };
    let mut archive = tar::Archive::new(input);
    let mut entries = archive.entries().map_err(|e| bad(e.to_string()))?;
    let mut next = |want: &str| -> Result<Vec<u8>, BackupError> {
        let mut e = entries
            .next()
            .ok_or_else(|| bad(format!("missing {want}")))?
            .map_err(|e| bad(e.to_string()))?;
        if e.path_bytes().as_ref() != want.as_bytes() || e.size() > 1 << 30 {
            return Err(bad(format!("expected {want}")));
        }
        let mut buf = Vec::new();
        e.read_to_end(&mut buf).map_err(|e| bad(e.to_string()))?;
        Ok(buf)
    };
    let header: StreamHeader =
        serde_json::from_slice(&next(HEADER)?).map_err(|e| bad(format!("header: {e}")))?;
    if header.format != 1 {
        return Err(bad(format!("format {} is not supported", header.format)));
    }
    for raw in next(DELETED)?.split(|b| *b == 0).filter(|p| !p.is_empty()) {
        let rel = PathBuf::from(OsString::from_vec(raw.to_vec()));
        let rel = clean(&rel)?;
        if parents_are_dirs(dest, rel)? {
            remove_any(&dest.join(rel)).map_err(ioe("remove", rel))?;
        }
    }
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(e.to_string()))?;
        let path = entry.path().map_err(|e| bad(e.to_string()))?.into_owned();
        let rel = path
            .strip_prefix("data")
            .map_err(|_| bad(format!("entry {} outside data/", path.display())))?;
        let rel = clean(rel)?;
        if !parents_are_dirs(dest, rel)? {
            return Err(bad(format!("{} comes before its directory", rel.display())));
        }
        let target = dest.join(rel);
        let mode = entry.header().mode().map_err(|e| bad(e.to_string()))? & MODE_MASK;
        let existing = fs::symlink_metadata(&target).ok();
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            if !existing.as_ref().is_some_and(Metadata::is_dir) {
                remove_any(&target).map_err(ioe("replace", &target))?;
                fs::create_dir(&target).map_err(ioe("create", &target))?;
            }
            fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                .map_err(ioe("set the mode of", &target))?;
        } else if kind.is_file() {
            remove_any(&target).map_err(ioe("replace", &target))?;
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .mode(0o600)
                .open(&target)
                .map_err(ioe("create", &target))?;
            io::copy(&mut entry, &mut file).map_err(ioe("write", &target))?;
            file.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(ioe("set the mode of", &target))?;
            let mtime = entry.header().mtime().unwrap_or(0);
            let _ =
                file.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime));
        } else if kind.is_symlink() {
            let link = entry
                .link_name()
                .map_err(|e| bad(e.to_string()))?
                .ok_or_else(|| bad(format!("symlink {} without a target", rel.display())))?
                .into_owned();
            remove_any(&target).map_err(ioe("replace", &target))?;
            std::os::unix::fs::symlink(&link, &target).map_err(ioe("create", &target))?;
        } else {
            return Err(bad(format!(
                "{} is not a file, directory or symlink",
                rel.display()
            )));
        }
        if let Some(uid) = uid {
            std::os::unix::fs::lchown(&target, Some(uid), Some(uid))
                .map_err(ioe("hand over", &target))?;
        }
    }
    Ok(header.base)
}

/// Hands every entry under `root` (and `root`) to `uid` (a restored ZFS
/// stream carries the exporting node's uids). Links are never followed.
pub fn reown(root: &Path, uid: u32) -> Result<(), BackupError> {
    let own = |p: &Path| {
        std::os::unix::fs::lchown(p, Some(uid), Some(uid))
            .map_err(|e| BackupError::Io(format!("cannot hand {} to the grain: {e}", p.display())))
    };
    own(root)?;
    visit(root, None, Path::new(""), &mut |rel, _, _| {
        own(&root.join(rel))
    })
}

/// SHA-256 over every entry under `root` (path, type, mode; a file's size
/// and content; a symlink's target), owners and times left out: equal on
/// two nodes exactly when the grain would see the same files.
pub fn digest(root: &Path) -> Result<String, BackupError> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 16];
    visit(root, None, Path::new(""), &mut |rel, meta, _| {
        let path = root.join(rel);
        let bytes = rel.as_os_str().as_bytes();
        let tag: &[u8] = match kind(meta) {
            Kind::Dir => b"d",
            Kind::File => b"f",
            Kind::Link => b"l",
            Kind::Other => return Ok(()),
        };
        ctx.update(tag);
        ctx.update(&(bytes.len() as u64).to_le_bytes());
        ctx.update(bytes);
        ctx.update(&(meta.mode() & MODE_MASK).to_le_bytes());
        match kind(meta) {
            Kind::File => {
                ctx.update(&meta.len().to_le_bytes());
                let mut f = fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(walk_err(&path))?;
                loop {
                    let n = f.read(&mut buf).map_err(walk_err(&path))?;
                    if n == 0 {
                        break;
                    }
                    ctx.update(&buf[..n]);
                }
            }
            Kind::Link => {
                let t = fs::read_link(&path).map_err(walk_err(&path))?;
                let t = t.as_os_str().as_bytes();
                ctx.update(&(t.len() as u64).to_le_bytes());
                ctx.update(t);
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(crate::hex(ctx.finish().as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, s: &str) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, s).unwrap();
    }

    #[test]
    fn full_then_incremental_reproduce_each_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let (s1, s2, out) = (
            tmp.path().join("s1"),
            tmp.path().join("s2"),
            tmp.path().join("out"),
        );
        write(&s1.join("a/b/file"), "one");
        write(&s1.join("keep"), "same");
        write(&s1.join("gone/deep/x"), "x");
        write(&s1.join("turns-dir"), "file first");
        std::os::unix::fs::symlink("/etc/passwd", s1.join("link")).unwrap();
        // Second snapshot: a change, a removal, a type change, a new file.
        fs::create_dir_all(&s2).unwrap();
        std::process::Command::new("cp")
            .args(["-a", "--"])
            .arg(s1.join("."))
            .arg(&s2)
            .status()
            .unwrap();
        write(&s2.join("a/b/file"), "two, longer");
        fs::remove_dir_all(s2.join("gone")).unwrap();
        fs::remove_file(s2.join("turns-dir")).unwrap();
        write(&s2.join("turns-dir/inside"), "now a dir");
        write(&s2.join("new"), "new");

        let mut full = Vec::new();
        let st = write_stream(&s1, None, &mut full).unwrap();
        assert_eq!(st.deleted, 0);
        let mut incr = Vec::new();
        let st2 = write_stream(&s2, Some((&s1, "s1")), &mut incr).unwrap();
        assert_eq!(st2.deleted, 2, "gone and turns-dir");
        assert!(st2.file_bytes < st.file_bytes + 30, "only changes carried");
        assert!(
            !String::from_utf8_lossy(&incr).contains("same"),
            "unchanged file not carried"
        );

        fs::create_dir(&out).unwrap();
        assert_eq!(apply_stream(&full[..], &out, None).unwrap(), None);
        assert_eq!(digest(&out).unwrap(), digest(&s1).unwrap());
        assert_eq!(
            apply_stream(&incr[..], &out, None).unwrap().as_deref(),
            Some("s1")
        );
        assert_eq!(digest(&out).unwrap(), digest(&s2).unwrap());
        assert_ne!(digest(&s1).unwrap(), digest(&s2).unwrap());
        assert_eq!(
            fs::read_link(out.join("link")).unwrap(),
            Path::new("/etc/passwd")
        );
    }

    #[test]
    fn hostile_streams_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("dest");
        fs::create_dir(&dest).unwrap();
        std::os::unix::fs::symlink(tmp.path(), dest.join("up")).unwrap();
        let make = |entries: &[(&str, &[u8])]| {
            let mut tar = tar::Builder::new(Vec::new());
            append_bytes(&mut tar, HEADER, br#"{"format":1,"base":null}"#).unwrap();
            append_bytes(&mut tar, DELETED, b"").unwrap();
            for (name, data) in entries {
                let mut h = tar::Header::new_gnu();
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                h.set_entry_type(tar::EntryType::Regular);
                // Raw names, bypassing the builder's own path checks.
                let raw = name.as_bytes();
                h.as_old_mut().name[..raw.len()].copy_from_slice(raw);
                h.set_cksum();
                tar.append(&h, *data).unwrap();
            }
            tar.into_inner().unwrap()
        };
        for name in [
            "data/up/escaped",
            "data/../escaped",
            "other/x",
            "data/missing/x",
        ] {
            let stream = make(&[(name, b"evil")]);
            assert!(apply_stream(&stream[..], &dest, None).is_err(), "{name}");
        }
        assert!(!tmp.path().join("escaped").exists());
        assert!(apply_stream(&b"garbage"[..], &dest, None).is_err());
    }
}
