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
    /// Big files carried as their changed blocks only.
    pub delta_files: u64,
}

/// Files at least this big that changed in place travel as their changed
/// blocks (`delta/<path>` entries) when that is under half the file.
const DELTA_MIN: u64 = 1 << 20;
const BLOCK: usize = 64 << 10;
/// A delta entry's records: offset (u64 LE), length (u32 LE), bytes; after
/// the file's new size (u64 LE).
const MAX_FILE: u64 = 1 << 44;

/// Opens a regular file of a snapshot for reading: never a symlink, and
/// never blocking on a FIFO swapped in for it.
fn open_file(path: &Path) -> Result<fs::File, BackupError> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(walk_err(path))?;
    if !file.metadata().map_err(walk_err(path))?.is_file() {
        return Err(BackupError::Io(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    Ok(file)
}

/// The blocks of `new` that differ from the base file `old` (or lie past
/// its end), merged into ranges; `None` when a whole copy is as good.
fn changed_ranges(
    new: &fs::File,
    len: u64,
    old: &Path,
) -> Result<Option<Vec<(u64, u64)>>, BackupError> {
    let Ok(old) = open_file(old) else {
        return Ok(None);
    };
    let old_len = old
        .metadata()
        .map_err(|e| BackupError::Io(e.to_string()))?
        .len();
    let (mut a, mut b) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut changed = 0u64;
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(BLOCK as u64) as usize;
        read_exact_at(new, &mut a[..n], at)?;
        let same = at + n as u64 <= old_len && {
            read_exact_at(&old, &mut b[..n], at)?;
            a[..n] == b[..n]
        };
        if !same {
            changed += n as u64;
            match ranges.last_mut() {
                Some((start, end)) if *end == at && *end - *start < 1 << 30 => *end += n as u64,
                _ => ranges.push((at, at + n as u64)),
            }
            if changed * 2 > len {
                return Ok(None);
            }
        }
        at += n as u64;
    }
    Ok(Some(ranges))
}

fn read_exact_at(f: &fs::File, buf: &mut [u8], at: u64) -> Result<(), BackupError> {
    use std::os::unix::fs::FileExt;
    f.read_exact_at(buf, at)
        .map_err(|e| BackupError::Io(format!("cannot read a file of the snapshot: {e}")))
}

/// A delta entry's bytes, produced as they are read: the new size, then
/// each range's offset, length and bytes (ranges are at most 1 GiB).
struct DeltaReader<'f> {
    file: &'f fs::File,
    ranges: std::vec::IntoIter<(u64, u64)>,
    /// Header bytes not yet handed out (the size, or a range's head).
    head: Vec<u8>,
    /// The range being copied: (next offset, end).
    body: Option<(u64, u64)>,
    size: u64,
}

impl<'f> DeltaReader<'f> {
    fn new(file: &'f fs::File, len: u64, ranges: Vec<(u64, u64)>) -> DeltaReader<'f> {
        let size = 8 + ranges.iter().map(|(a, b)| 12 + (b - a)).sum::<u64>();
        DeltaReader {
            file,
            ranges: ranges.into_iter(),
            head: len.to_le_bytes().to_vec(),
            body: None,
            size,
        }
    }
}

impl Read for DeltaReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        loop {
            if !self.head.is_empty() {
                let n = out.len().min(self.head.len());
                out[..n].copy_from_slice(&self.head[..n]);
                self.head.drain(..n);
                return Ok(n);
            }
            if let Some((at, end)) = self.body {
                if at < end {
                    let want = out.len().min((end - at) as usize);
                    let n = self.file.read_at(&mut out[..want], at)?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "a snapshot file shrank",
                        ));
                    }
                    self.body = Some((at + n as u64, end));
                    return Ok(n);
                }
                self.body = None;
            }
            let Some((start, end)) = self.ranges.next() else {
                return Ok(0);
            };
            self.head.extend_from_slice(&start.to_le_bytes());
            self.head
                .extend_from_slice(&((end - start) as u32).to_le_bytes());
            self.body = Some((start, end));
        }
    }
}

/// Applies a delta entry to the file already at `target`.
fn apply_delta(entry: &mut impl Read, target: &Path) -> Result<(), BackupError> {
    use std::os::unix::fs::FileExt;
    let bad = |what: &str| {
        BackupError::Integrity(format!(
            "tree stream: delta for {}: {what}",
            target.display()
        ))
    };
    match fs::symlink_metadata(target) {
        Ok(m) if m.is_file() => {}
        _ => return Err(bad("no such file to patch")),
    }
    let file = fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(target)
        .map_err(|e| BackupError::Io(format!("cannot open {}: {e}", target.display())))?;
    let mut word = [0u8; 8];
    entry.read_exact(&mut word).map_err(|_| bad("cut short"))?;
    let len = u64::from_le_bytes(word);
    if len > MAX_FILE {
        return Err(bad("too large"));
    }
    let mut buf = vec![0u8; BLOCK];
    loop {
        match entry.read(&mut word) {
            Ok(0) => break,
            Ok(n) => entry
                .read_exact(&mut word[n..])
                .map_err(|_| bad("cut short"))?,
            Err(_) => return Err(bad("cut short")),
        }
        let offset = u64::from_le_bytes(word);
        let mut four = [0u8; 4];
        entry.read_exact(&mut four).map_err(|_| bad("cut short"))?;
        let n = u64::from(u32::from_le_bytes(four));
        if offset.checked_add(n).is_none_or(|end| end > len) {
            return Err(bad("a range past the end"));
        }
        let mut done = 0u64;
        while done < n {
            let k = (n - done).min(BLOCK as u64) as usize;
            entry
                .read_exact(&mut buf[..k])
                .map_err(|_| bad("cut short"))?;
            file.write_all_at(&buf[..k], offset + done)
                .map_err(|e| BackupError::Io(format!("cannot write {}: {e}", target.display())))?;
            done += k as u64;
        }
    }
    file.set_len(len)
        .map_err(|e| BackupError::Io(format!("cannot size {}: {e}", target.display())))
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
    visit(
        new,
        base,
        false,
        Path::new(""),
        &mut |_, meta, changed, _| {
            if changed && meta.is_file() {
                total += meta.len();
            }
            Ok(())
        },
    )?;
    Ok(total)
}

/// What `visit` hands its callback: the entry's path relative to the root,
/// its metadata, whether it differs from the base, and the base's entry of
/// the same kind (reached through real directories only), if any.
type Visitor<'v> =
    dyn FnMut(&Path, &Metadata, bool, Option<&Metadata>) -> Result<(), BackupError> + 'v;

/// Walks `new` in stream order, calling `f` for every entry.
///
/// A file is unchanged when its type, mode, size and mtime are; on a
/// copy-on-write snapshot (btrfs), where the base's file keeps its inode
/// number, also its ctime, which nothing can set back (a rewrite with the
/// same size and `touch -d` is caught). Plain snapshots are copies with new
/// inodes: there the quick check is size and mtime, as rsync's.
///
/// `exact`: a file with another inode than the base's counts as changed
/// too. Two snapshots of one grain keep an unchanged file's inode on
/// every backend (plain ones hard-link it, ZFS and btrfs share it), so
/// this catches a rewrite that kept size and mtime, at the cost of
/// sending files a snapshot copied without a change.
fn visit(
    new: &Path,
    base: Option<&Path>,
    exact: bool,
    rel: &Path,
    f: &mut Visitor<'_>,
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
                    || (exact && o.ino() != meta.ino())
                    || o.len() != meta.len()
                    || o.mtime() != meta.mtime()
                    || o.mtime_nsec() != meta.mtime_nsec()
                    || (o.ino() == meta.ino()
                        && (o.ctime(), o.ctime_nsec()) != (meta.ctime(), meta.ctime_nsec()))
            }
            (Some(_), Kind::Link) if same_kind => {
                let b = base.expect("old implies base").join(&rel_child);
                fs::read_link(&b).ok() != fs::read_link(&path).ok()
            }
            _ => true,
        };
        f(
            &rel_child,
            &meta,
            changed,
            old.as_ref().filter(|_| same_kind),
        )?;
        if meta.is_dir() {
            let child_base = if same_kind { base } else { None };
            visit(new, child_base, exact, &rel_child, f)?;
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
    write_stream_with(new, base, false, out)
}

/// [`write_stream`], where a file counts as changed also when its inode
/// is not the base's: for two snapshots of one dataset, where that is
/// exact (a grain's move, where the stream becomes the only live copy).
pub fn write_stream_exact(
    new: &Path,
    base: Option<(&Path, &str)>,
    out: impl Write,
) -> Result<TreeStats, BackupError> {
    write_stream_with(new, base, true, out)
}

fn write_stream_with(
    new: &Path,
    base: Option<(&Path, &str)>,
    exact: bool,
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
        exact,
        Path::new(""),
        &mut |rel, meta, changed, old| {
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
                    let file = open_file(&path)?;
                    // The base's file of the same path, when `visit` found
                    // a regular file there through real directories.
                    let old = base
                        .filter(|_| meta.len() >= DELTA_MIN && old.is_some_and(Metadata::is_file))
                        .map(|(b, _)| b.join(rel));
                    let ranges = match old {
                        Some(old) => changed_ranges(&file, meta.len(), &old)?,
                        None => None,
                    };
                    match ranges {
                        Some(ranges) => {
                            // Only the changed blocks of a big file, read
                            // from the file as the archive is written.
                            let delta = DeltaReader::new(&file, meta.len(), ranges);
                            h.set_entry_type(tar::EntryType::Regular);
                            h.set_size(delta.size);
                            stats.file_bytes += delta.size;
                            stats.delta_files += 1;
                            let name = Path::new("delta").join(rel);
                            tar.append_data(&mut h, &name, delta).map_err(write_err)?;
                        }
                        None => {
                            h.set_entry_type(tar::EntryType::Regular);
                            h.set_size(meta.len());
                            tar.append_data(&mut h, &name, file.take(meta.len()))
                                .map_err(write_err)?;
                            stats.file_bytes += meta.len();
                        }
                    }
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
        let (rel, delta) = match (path.strip_prefix("data"), path.strip_prefix("delta")) {
            (Ok(rel), _) => (rel, false),
            (_, Ok(rel)) => (rel, true),
            _ => return Err(bad(format!("entry {} outside data/", path.display()))),
        };
        let rel = clean(rel)?;
        if !parents_are_dirs(dest, rel)? {
            return Err(bad(format!("{} comes before its directory", rel.display())));
        }
        let target = dest.join(rel);
        let mode = entry.header().mode().map_err(|e| bad(e.to_string()))? & MODE_MASK;
        if delta {
            if !entry.header().entry_type().is_file() {
                return Err(bad(format!(
                    "delta for {} is not a file entry",
                    rel.display()
                )));
            }
            apply_delta(&mut entry, &target)?;
            fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                .map_err(ioe("set the mode of", &target))?;
            if let Ok(f) = fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&target)
            {
                let mtime = entry.header().mtime().unwrap_or(0);
                let _ =
                    f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime));
            }
            if let Some(uid) = uid {
                std::os::unix::fs::lchown(&target, Some(uid), Some(uid))
                    .map_err(ioe("hand over", &target))?;
            }
            continue;
        }
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

/// SHA-256 over every entry under `root` (path, type, mode; a file's size
/// and the SHA-256 of its content; a symlink's target), owners and times
/// left out: equal on two nodes exactly when the grain would see the same
/// files.
pub fn digest(root: &Path) -> Result<String, BackupError> {
    digest_owning(root, None)
}

/// Gives `path` itself (never a symlink's target) to `uid`, user and group.
fn own_to(path: &Path, uid: u32) -> Result<(), BackupError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid))
        .map_err(|e| BackupError::Io(format!("cannot hand {} to the grain: {e}", path.display())))
}

/// Hands `root` and everything under it to `uid` (a restored ZFS stream
/// carries the old node's uids), without reading any file. Entries that
/// already are the grain's, and are not setuid or setgid (chown clears
/// those bits), are left alone; the others are changed by up to eight
/// threads at once (each is a round trip to a FUSE-mounted dataset).
pub fn hand_over(root: &Path, uid: u32) -> Result<(), BackupError> {
    let own = |p: &Path| own_to(p, uid);
    own(root)?;
    let mut others: Vec<PathBuf> = Vec::new();
    visit(root, None, false, Path::new(""), &mut |rel, meta, _, _| {
        if meta.uid() != uid || meta.gid() != uid || meta.mode() & 0o6000 != 0 {
            others.push(root.join(rel));
        }
        Ok(())
    })?;
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..others.len().div_ceil(64).min(8))
            .map(|_| {
                scope.spawn(|| -> Result<(), BackupError> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(path) = others.get(i) else {
                            return Ok(());
                        };
                        own(path)?;
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .map_err(|_| BackupError::Other("a re-owning thread panicked".to_owned()))?
        })
    })
}

/// [`digest`], handing every entry (and `root`) to `uid` on the way: one
/// walk for a restored ZFS stream, which carries the old node's uids.
/// Files are hashed by a few threads at once (a FUSE-mounted dataset reads
/// faster with more than one request in flight).
pub fn digest_owning(root: &Path, uid: Option<u32>) -> Result<String, BackupError> {
    let own = |p: &Path| uid.map_or(Ok(()), |uid| own_to(p, uid));
    own(root)?;
    // The walk: every entry's record, files' content hashes left for later.
    let mut entries: Vec<(PathBuf, Kind, u32, u64, Vec<u8>)> = Vec::new();
    visit(root, None, false, Path::new(""), &mut |rel, meta, _, _| {
        let path = root.join(rel);
        own(&path)?;
        let extra = match kind(meta) {
            Kind::Link => fs::read_link(&path)
                .map_err(walk_err(&path))?
                .into_os_string()
                .into_vec(),
            Kind::Other => return Ok(()),
            _ => Vec::new(),
        };
        entries.push((
            rel.to_path_buf(),
            kind(meta),
            meta.mode() & MODE_MASK,
            meta.len(),
            extra,
        ));
        Ok(())
    })?;
    let files: Vec<usize> = (0..entries.len())
        .filter(|i| entries[*i].1 == Kind::File)
        .collect();
    let hashes: Vec<std::sync::Mutex<Option<[u8; 32]>>> = (0..entries.len())
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 4);
    std::thread::scope(|scope| -> Result<(), BackupError> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> Result<(), BackupError> {
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&i) = files.get(k) else {
                            return Ok(());
                        };
                        let path = root.join(&entries[i].0);
                        let mut f = open_file(&path)?;
                        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
                        loop {
                            let n = f.read(&mut buf).map_err(walk_err(&path))?;
                            if n == 0 {
                                break;
                            }
                            ctx.update(&buf[..n]);
                        }
                        let mut h = [0u8; 32];
                        h.copy_from_slice(ctx.finish().as_ref());
                        *hashes[i].lock().expect("not poisoned") = Some(h);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| BackupError::Other("a digest thread panicked".to_owned()))??;
        }
        Ok(())
    })?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for (i, (rel, k, mode, len, extra)) in entries.iter().enumerate() {
        let bytes = rel.as_os_str().as_bytes();
        ctx.update(match k {
            Kind::Dir => b"d",
            Kind::File => b"f",
            _ => b"l",
        });
        ctx.update(&(bytes.len() as u64).to_le_bytes());
        ctx.update(bytes);
        ctx.update(&mode.to_le_bytes());
        match k {
            Kind::File => {
                ctx.update(&len.to_le_bytes());
                let h = hashes[i]
                    .lock()
                    .expect("not poisoned")
                    .expect("hashed above");
                ctx.update(&h);
            }
            Kind::Link => {
                ctx.update(&(extra.len() as u64).to_le_bytes());
                ctx.update(extra);
            }
            _ => {}
        }
    }
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
    fn an_exact_stream_carries_a_rewrite_that_kept_size_and_mtime() {
        let tmp = tempfile::tempdir().unwrap();
        let (s1, s2) = (tmp.path().join("s1"), tmp.path().join("s2"));
        write(&s1.join("same"), "unchanged");
        write(&s1.join("rewritten"), "before");
        // As a plain snapshot is made: unchanged files hard-linked, a
        // changed one a new copy, here with the old size and mtime.
        fs::create_dir_all(&s2).unwrap();
        fs::hard_link(s1.join("same"), s2.join("same")).unwrap();
        write(&s2.join("rewritten"), "after!");
        let old = fs::metadata(s1.join("rewritten")).unwrap();
        let f = fs::File::options()
            .write(true)
            .open(s2.join("rewritten"))
            .unwrap();
        f.set_modified(old.modified().unwrap()).unwrap();
        drop(f);
        let quick = {
            let mut out = Vec::new();
            write_stream(&s2, Some((&s1, "s1")), &mut out).unwrap()
        };
        assert_eq!(quick.entries, 0, "the quick check misses it");
        let mut out = Vec::new();
        let exact = write_stream_exact(&s2, Some((&s1, "s1")), &mut out).unwrap();
        assert_eq!(exact.entries, 1, "only the rewritten file");
        let dest = tmp.path().join("dest");
        fs::create_dir(&dest).unwrap();
        let mut full = Vec::new();
        write_stream(&s1, None, &mut full).unwrap();
        apply_stream(&full[..], &dest, None).unwrap();
        apply_stream(&out[..], &dest, None).unwrap();
        assert_eq!(
            fs::read_to_string(dest.join("rewritten")).unwrap(),
            "after!"
        );
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
    fn big_files_changed_in_place_carry_only_their_changed_blocks() {
        use std::os::unix::fs::FileExt;
        let tmp = tempfile::tempdir().unwrap();
        let (s1, s2, out) = (
            tmp.path().join("s1"),
            tmp.path().join("s2"),
            tmp.path().join("out"),
        );
        fs::create_dir_all(&s1).unwrap();
        let big: Vec<u8> = (0..3u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        fs::write(s1.join("db"), &big).unwrap();
        fs::write(s1.join("grows"), &big[..2 << 20]).unwrap();
        fs::write(s1.join("shrinks"), &big).unwrap();
        // A FIFO in the base where the new snapshot has a big file: never
        // opened (it would block), the file goes whole.
        nix::unistd::mkfifo(
            &s1.join("was-fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        std::process::Command::new("cp")
            .args(["-a", "--"])
            .arg(&s1)
            .arg(&s2)
            .status()
            .unwrap();
        let f = fs::OpenOptions::new()
            .write(true)
            .open(s2.join("db"))
            .unwrap();
        f.write_all_at(&[0xAA; 5000], 1_000_000).unwrap();
        let f = fs::OpenOptions::new()
            .append(true)
            .open(s2.join("grows"))
            .unwrap();
        f.write_all_at(&[0x55; 100_000], 2 << 20).unwrap();
        let f = fs::OpenOptions::new()
            .write(true)
            .open(s2.join("shrinks"))
            .unwrap();
        f.set_len(1 << 20).unwrap();
        fs::remove_file(s2.join("was-fifo")).unwrap();
        fs::write(s2.join("was-fifo"), &big).unwrap();
        let mut full = Vec::new();
        write_stream(&s1, None, &mut full).unwrap();
        let mut incr = Vec::new();
        let st = write_stream(&s2, Some((&s1, "s1")), &mut incr).unwrap();
        assert_eq!(st.delta_files, 3, "{st:?}");
        assert!(
            incr.len() < 400_000 + big.len(),
            "{} bytes for ~170 KB of changes and the FIFO that became a 3 MiB file",
            incr.len()
        );
        fs::create_dir(&out).unwrap();
        apply_stream(&full[..], &out, None).unwrap();
        apply_stream(&incr[..], &out, None).unwrap();
        assert_eq!(digest(&out).unwrap(), digest(&s2).unwrap());
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
            "delta/up",
            "delta/up/x",
            "delta/nofile",
        ] {
            let stream = make(&[(name, b"evil")]);
            assert!(apply_stream(&stream[..], &dest, None).is_err(), "{name}");
        }
        assert!(!tmp.path().join("escaped").exists());
        assert!(apply_stream(&b"garbage"[..], &dest, None).is_err());
    }
}
