//! Snapshots of a plain directory as trees of hard links, the way
//! `rsync --link-dest` makes them.
//!
//! Each snapshot keeps an index beside it: for every regular file, what the
//! live file was when it was copied (device, inode, size, ctime). The next
//! snapshot links a file from that snapshot when the live file at the same
//! path still has the same inode, size and ctime, and copies it otherwise
//! (a reflink where the filesystem has one). ctime changes with every write
//! and every metadata change, and no unprivileged process can set it, so a
//! grain cannot make a changed file look unchanged. A file whose ctime is
//! within a second of the walk is not indexed at all: a write in the same
//! clock tick as our stat would not have moved it (git's "racily clean").
//!
//! The walk never follows the grain's links: every directory is opened
//! relative to its parent with `O_NOFOLLOW`, and every file is opened and
//! then checked by `fstat`, so a grain swapping a directory for a symlink
//! in the middle of a walk cannot make the host copy what it should not.

#![allow(unsafe_code)] // nix 0.29's openat gives raw descriptors, and FICLONE has no wrapper; each block says why it is sound

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, readlinkat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat, mkdirat, mknodat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};

/// What a live file was when a snapshot copied it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl Stamp {
    fn of(st: &FileStat) -> Stamp {
        Stamp {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            ctime: st.st_ctime,
            ctime_nsec: st.st_ctime_nsec,
        }
    }
}

/// A snapshot's index: relative path (raw bytes) to stamp.
pub(crate) type Index = HashMap<Vec<u8>, Stamp>;

const MAGIC: &[u8] = b"granary plain snapshot index 1\n";

/// Reads an index; `None` for a missing or damaged one (the next snapshot
/// then copies everything, which is slower and still right).
pub(crate) fn read_index(path: &Path) -> Option<Index> {
    let bytes = std::fs::read(path).ok()?;
    let mut rest = bytes.strip_prefix(MAGIC)?;
    let mut index = Index::new();
    let take = |n: usize, rest: &mut &[u8]| -> Option<Vec<u8>> {
        let (a, b) = rest.split_at_checked(n)?;
        *rest = b;
        Some(a.to_vec())
    };
    while !rest.is_empty() {
        let len = u32::from_le_bytes(take(4, &mut rest)?.try_into().ok()?) as usize;
        let name = take(len, &mut rest)?;
        let mut nums = [0u64; 5];
        for n in &mut nums {
            *n = u64::from_le_bytes(take(8, &mut rest)?.try_into().ok()?);
        }
        let [dev, ino, size, ctime, ctime_nsec] = nums;
        index.insert(
            name,
            Stamp {
                dev,
                ino,
                size,
                ctime: ctime as i64,
                ctime_nsec: ctime_nsec as i64,
            },
        );
    }
    Some(index)
}

fn write_index(path: &Path, entries: &[(Vec<u8>, Stamp)]) -> io::Result<()> {
    let mut out = io::BufWriter::new(File::create(path)?);
    out.write_all(MAGIC)?;
    for (name, s) in entries {
        out.write_all(&(name.len() as u32).to_le_bytes())?;
        out.write_all(name)?;
        for n in [s.dev, s.ino, s.size, s.ctime as u64, s.ctime_nsec as u64] {
            out.write_all(&n.to_le_bytes())?;
        }
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// What one snapshot cost.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Stats {
    /// Files linked from the base snapshot.
    pub linked: u64,
    /// Files copied (changed, new, or not indexed).
    pub copied: u64,
    pub copied_bytes: u64,
}

/// Makes `dest` (which must not exist) a snapshot of `live`, linking from
/// `base` (a snapshot and its index) what did not change, and writes the
/// new index to `index_out`. Everything written is on disk when it returns.
pub(crate) fn snapshot(
    live: &Path,
    base: Option<(&Path, &Index)>,
    dest: &Path,
    index_out: &Path,
) -> io::Result<Stats> {
    snapshot_at(live, base, dest, index_out, None)
}

/// [`snapshot`], the walk's start given in unix nanoseconds (tests), or
/// `None`: now, by our clock or the filesystem's, whichever is behind.
fn snapshot_at(
    live: &Path,
    base: Option<(&Path, &Index)>,
    dest: &Path,
    index_out: &Path,
    started: Option<i128>,
) -> io::Result<Stats> {
    let live_fd = open_dir(None, live)?;
    let root_stat = fstat(live_fd.as_raw_fd())?;
    mkdirat(None, dest, Mode::from_bits_truncate(0o700))?;
    let dest_fd = open_dir(None, dest)?;
    // The filesystem's own clock (the new directory's ctime), if it is
    // behind ours: a changed file's ctime comes from that clock.
    let made = fstat(dest_fd.as_raw_fd())?;
    let started = started.unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        now.min(nanos(made.st_ctime, made.st_ctime_nsec))
    });
    // Pages a grain wrote through a mapping are written back now: a later
    // write to one faults again and moves its ctime, where a write to a
    // page still dirty would not.
    nix::unistd::syncfs(live_fd.as_raw_fd())?;
    let base_fd = match base {
        Some((path, _)) => open_dir(None, path).ok(),
        None => None,
    };
    let mut walk = Walk {
        base_index: base.map(|(_, i)| i),
        cutoff: started - 1_000_000_000,
        as_root: crate::running_as_root(),
        dest_root: dest.to_path_buf(),
        index: Vec::new(),
        links: HashMap::new(),
        stats: Stats::default(),
    };
    let mut rel = Vec::new();
    walk.dir(&live_fd, base_fd.as_ref(), &dest_fd, &mut rel, 0)?;
    walk.own(&dest_fd, &root_stat)?;
    // One flush of the filesystem instead of an fsync per copied file.
    nix::unistd::syncfs(dest_fd.as_raw_fd())?;
    write_index(index_out, &walk.index)?;
    Ok(walk.stats)
}

/// Makes a directory's new entries durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn open_dir(parent: Option<&OwnedFd>, name: &Path) -> io::Result<OwnedFd> {
    let fd = openat(
        parent.map(|p| p.as_raw_fd()),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: openat returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn names(dir: &OwnedFd) -> io::Result<Vec<OsString>> {
    // The descriptor's own directory (the magic link is not resolved by
    // name again), listed by std.
    std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect()
}

/// Copies the data regions of the first `size` bytes of `src` into `out`
/// and gives `out` that size: holes stay holes (a grain's `truncate -s 1T`
/// costs the host nothing), and a file still growing is not chased.
/// Returns the bytes written.
fn copy_data(src: &mut File, out: &File, size: u64) -> io::Result<u64> {
    let (from, to) = (src.as_raw_fd(), out.as_raw_fd());
    let mut written = 0;
    let mut pos = 0i64;
    let size = size as i64;
    while pos < size {
        // SAFETY: lseek on a descriptor we hold.
        let data = unsafe { libc::lseek(from, pos, libc::SEEK_DATA) };
        if data < 0 {
            match Errno::last() {
                // Only a hole is left.
                Errno::ENXIO => break,
                e => return Err(e.into()),
            }
        }
        if data >= size {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(from, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { size } else { hole.min(size) };
        let (mut off_in, mut off_out) = (data, data);
        while off_in < end {
            let want = (end - off_in) as usize;
            // SAFETY: both offsets point at our own variables; the
            // descriptors are open.
            let n = unsafe { libc::copy_file_range(from, &mut off_in, to, &mut off_out, want, 0) };
            if n < 0 {
                match Errno::last() {
                    Errno::EINTR => continue,
                    // No in-kernel copy between these two: by hand.
                    Errno::EXDEV | Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EINVAL => {
                        written += copy_range(src, out, off_in as u64, end as u64)?;
                        break;
                    }
                    e => return Err(e.into()),
                }
            }
            if n == 0 {
                // The file shrank under us.
                break;
            }
            written += n as u64;
        }
        pos = end;
    }
    out.set_len(size as u64)?;
    Ok(written)
}

/// `[from, to)` of `src` into the same place in `out`, by reads and writes.
fn copy_range(src: &File, out: &File, from: u64, to: u64) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = from;
    while at < to {
        let want = ((to - at) as usize).min(buf.len());
        let n = src.read_at(&mut buf[..want], at)?;
        if n == 0 {
            break;
        }
        out.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    Ok(at - from)
}

fn nanos(secs: i64, nsec: i64) -> i128 {
    i128::from(secs) * 1_000_000_000 + i128::from(nsec)
}

/// Deeper than this, a snapshot fails with a clear error (each level holds
/// three descriptors and a stack frame). Real datasets are a few levels
/// deep; a grain making its own tree deeper only loses its own snapshots.
const MAX_DEPTH: usize = 128;

struct Walk<'a> {
    base_index: Option<&'a Index>,
    /// Files changed at or after this (unix nanoseconds) are not indexed.
    cutoff: i128,
    as_root: bool,
    dest_root: PathBuf,
    index: Vec<(Vec<u8>, Stamp)>,
    /// Live files with several names: their stamp and the first copy's
    /// path, so the others become links to it, as they are in the dataset.
    links: HashMap<(u64, u64), (Stamp, PathBuf)>,
    stats: Stats,
}

fn times(st: &FileStat) -> (TimeSpec, TimeSpec) {
    (
        TimeSpec::new(st.st_atime, st.st_atime_nsec),
        TimeSpec::new(st.st_mtime, st.st_mtime_nsec),
    )
}

impl Walk<'_> {
    fn dir(
        &mut self,
        live: &OwnedFd,
        base: Option<&OwnedFd>,
        dest: &OwnedFd,
        rel: &mut Vec<u8>,
        depth: usize,
    ) -> io::Result<()> {
        if depth > MAX_DEPTH {
            return Err(io::Error::other(format!(
                "{} is more than {MAX_DEPTH} directories deep",
                String::from_utf8_lossy(rel)
            )));
        }
        for name in names(live)? {
            let depth = rel.len();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(name.as_bytes());
            let name = Path::new(&name);
            self.entry(live, base, dest, name, rel, depth)?;
            rel.truncate(depth);
        }
        Ok(())
    }

    fn entry(
        &mut self,
        live: &OwnedFd,
        base: Option<&OwnedFd>,
        dest: &OwnedFd,
        name: &Path,
        rel: &[u8],
        depth: usize,
    ) -> io::Result<()> {
        let st = match fstatat(Some(live.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            // Removed since the listing: a running grain's tree moves.
            Err(Errno::ENOENT) => return Ok(()),
            other => other?,
        };
        let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
        let perm = Mode::from_bits_truncate(st.st_mode & 0o7777);
        match kind {
            SFlag::S_IFDIR => {
                mkdirat(
                    Some(dest.as_raw_fd()),
                    name,
                    Mode::from_bits_truncate(0o700),
                )?;
                let sub_live = match open_dir(Some(live), name) {
                    // Replaced by something else since the stat: skipped,
                    // as a file removed mid-walk is.
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::ENOENT | libc::ELOOP | libc::ENOTDIR)
                        ) =>
                    {
                        return Ok(());
                    }
                    other => other?,
                };
                let opened = fstat(sub_live.as_raw_fd())?;
                let sub_base = base.and_then(|b| open_dir(Some(b), name).ok());
                let sub_dest = open_dir(Some(dest), name)?;
                let mut rel = rel.to_vec();
                self.dir(&sub_live, sub_base.as_ref(), &sub_dest, &mut rel, depth + 1)?;
                self.own(&sub_dest, &opened)
            }
            SFlag::S_IFREG => self.file(live, base, dest, name, rel, &st),
            SFlag::S_IFLNK => {
                let target = match readlinkat(Some(live.as_raw_fd()), name) {
                    Err(Errno::ENOENT | Errno::EINVAL) => return Ok(()),
                    other => other?,
                };
                nix::unistd::symlinkat(target.as_os_str(), Some(dest.as_raw_fd()), name)?;
                self.own_at(dest, name, &st)
            }
            SFlag::S_IFIFO | SFlag::S_IFSOCK => {
                mknodat(Some(dest.as_raw_fd()), name, kind, perm, 0)?;
                self.own_at(dest, name, &st)
            }
            // Devices: a grain in its user namespace cannot make one.
            _ => {
                tracing::warn!(path = %String::from_utf8_lossy(rel), "not in the snapshot: a device node");
                Ok(())
            }
        }
    }

    fn file(
        &mut self,
        live: &OwnedFd,
        base: Option<&OwnedFd>,
        dest: &OwnedFd,
        name: &Path,
        rel: &[u8],
        st: &FileStat,
    ) -> io::Result<()> {
        let stamp = Stamp::of(st);
        let key = (st.st_dev, st.st_ino);
        // A second name of a file already in this snapshot: a link to it
        // (any failure, such as too many links, makes it a copy instead).
        if st.st_nlink > 1
            && let Some((seen, first)) = self.links.get(&key)
            && *seen == stamp
            && nix::unistd::linkat(
                None,
                first.as_path(),
                Some(dest.as_raw_fd()),
                name,
                AtFlags::empty(),
            )
            .is_ok()
        {
            self.remember(rel, stamp);
            return Ok(());
        }
        // Unchanged since the base: linked without opening it (a lease the
        // grain holds on it cannot stall or fail the snapshot).
        let unchanged = base.is_some()
            && self
                .base_index
                .and_then(|i| i.get(rel))
                .is_some_and(|s| *s == stamp);
        let linked = unchanged
            && nix::unistd::linkat(
                base.map(|b| b.as_raw_fd()),
                name,
                Some(dest.as_raw_fd()),
                name,
                AtFlags::empty(),
            )
            .is_ok();
        let stamp = if linked {
            self.stats.linked += 1;
            stamp
        } else {
            match self.copy(live, dest, name)? {
                Some((copied, bytes)) => {
                    self.stats.copied += 1;
                    self.stats.copied_bytes += bytes;
                    copied
                }
                // Gone, or no longer a file, since the listing.
                None => return Ok(()),
            }
        };
        if st.st_nlink > 1 {
            let mut path = self.dest_root.clone();
            path.push(std::ffi::OsStr::from_bytes(rel));
            self.links.insert(key, (stamp, path));
        }
        self.remember(rel, stamp);
        Ok(())
    }

    /// Copies one live file into `dest`: its stamp and the bytes written,
    /// or `None` if it is no longer a regular file.
    fn copy(
        &mut self,
        live: &OwnedFd,
        dest: &OwnedFd,
        name: &Path,
    ) -> io::Result<Option<(Stamp, u64)>> {
        // O_PATH opens anything without side effects (no FIFO wait, no
        // lease break); fstat then says what it is.
        let path_fd = match openat(
            Some(live.as_raw_fd()),
            name,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Err(Errno::ENOENT | Errno::ELOOP) => return Ok(None),
            other => other?,
        };
        // SAFETY: openat returned a fresh descriptor that nothing else owns.
        let path_fd = unsafe { OwnedFd::from_raw_fd(path_fd) };
        let st = fstat(path_fd.as_raw_fd())?;
        if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
            return Ok(None);
        }
        // Reopened for reading through the descriptor: the same inode,
        // checked above. A lease the grain holds is broken by the kernel
        // (after lease-break-time at most).
        let mut src = File::open(format!("/proc/self/fd/{}", path_fd.as_raw_fd()))?;
        let out = openat(
            Some(dest.as_raw_fd()),
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )?;
        // SAFETY: openat returned a fresh descriptor that nothing else owns.
        let out = unsafe { File::from_raw_fd(out) };
        // SAFETY: FICLONE takes the source descriptor as its argument.
        let cloned = unsafe { libc::ioctl(out.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } == 0;
        let bytes = if cloned {
            0
        } else {
            copy_data(&mut src, &out, st.st_size as u64)?
        };
        self.own(&out.into(), &st)?;
        Ok(Some((Stamp::of(&st), bytes)))
    }

    fn remember(&mut self, rel: &[u8], stamp: Stamp) {
        if nanos(stamp.ctime, stamp.ctime_nsec) < self.cutoff {
            self.index.push((rel.to_vec(), stamp));
        }
    }

    /// Gives an opened copy the live entry's owner, mode and times.
    fn own(&self, fd: &OwnedFd, st: &FileStat) -> io::Result<()> {
        let raw = fd.as_raw_fd();
        if self.as_root {
            nix::unistd::fchown(
                raw,
                Some(Uid::from_raw(st.st_uid)),
                Some(Gid::from_raw(st.st_gid)),
            )?;
        }
        // After chown, which clears set-id bits.
        nix::sys::stat::fchmod(raw, Mode::from_bits_truncate(st.st_mode & 0o7777))?;
        let (atime, mtime) = times(st);
        nix::sys::stat::futimens(raw, &atime, &mtime)?;
        Ok(())
    }

    /// The same for an entry that cannot be opened (a link, a FIFO).
    fn own_at(&self, dir: &OwnedFd, name: &Path, st: &FileStat) -> io::Result<()> {
        let raw = Some(dir.as_raw_fd());
        if self.as_root {
            nix::unistd::fchownat(
                raw,
                name,
                Some(Uid::from_raw(st.st_uid)),
                Some(Gid::from_raw(st.st_gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )?;
        }
        let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
        if kind != SFlag::S_IFLNK {
            nix::sys::stat::fchmodat(
                raw,
                name,
                Mode::from_bits_truncate(st.st_mode & 0o7777),
                // Our own new FIFO, in a directory only the host writes.
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )?;
        }
        let (atime, mtime) = times(st);
        nix::sys::stat::utimensat(
            raw,
            name,
            &atime,
            &mtime,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    /// A walk "started" a minute from now indexes every file just written.
    fn snap(live: &Path, base: Option<(&Path, &Index)>, dest: &Path) -> (Stats, Index) {
        let index = dest.with_extension("index");
        let later = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128
            + 60_000_000_000;
        let stats = snapshot_at(live, base, dest, &index, Some(later)).unwrap();
        (stats, read_index(&index).unwrap())
    }

    #[test]
    fn unchanged_files_are_links_and_nothing_live_is_shared() {
        let tmp = tempfile::tempdir().unwrap();
        let live = tmp.path().join("live");
        std::fs::create_dir_all(live.join("sub/deeper")).unwrap();
        std::fs::write(live.join("same"), b"never changes").unwrap();
        std::fs::write(live.join("sub/deeper/db"), b"page1 page2").unwrap();
        std::fs::write(live.join("gone"), b"removed later").unwrap();
        std::fs::hard_link(live.join("same"), live.join("same-too")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", live.join("sub/link")).unwrap();
        std::fs::set_permissions(live.join("sub"), std::fs::Permissions::from_mode(0o750)).unwrap();

        let first = tmp.path().join("first");
        let (stats, index) = snap(&live, None, &first);
        assert_eq!(
            (stats.linked, stats.copied),
            (0, 3),
            "the second name of `same` is a link"
        );
        assert_eq!(index.len(), 4);
        let live_ino = std::fs::metadata(live.join("same")).unwrap().ino();
        let first_ino = std::fs::metadata(first.join("same")).unwrap().ino();
        assert_ne!(
            live_ino, first_ino,
            "a snapshot never shares an inode with live data"
        );
        assert_eq!(
            std::fs::metadata(first.join("same-too")).unwrap().ino(),
            first_ino,
            "hard links inside the dataset stay links"
        );
        assert_eq!(
            std::fs::read_link(first.join("sub/link")).unwrap(),
            Path::new("/etc/passwd"),
            "symlinks are copied as links, never followed"
        );
        assert_eq!(
            std::fs::metadata(first.join("sub")).unwrap().mode() & 0o7777,
            0o750
        );

        // Written in place (same size, no rename), and one file removed.
        {
            use std::io::{Seek, SeekFrom};
            let mut db = std::fs::OpenOptions::new()
                .write(true)
                .open(live.join("sub/deeper/db"))
                .unwrap();
            db.seek(SeekFrom::Start(6)).unwrap();
            db.write_all(b"PAGE2").unwrap();
        }
        std::fs::remove_file(live.join("gone")).unwrap();
        std::fs::write(live.join("new"), b"fresh").unwrap();

        let second = tmp.path().join("second");
        let (stats, _) = snap(&live, Some((&first, &index)), &second);
        assert_eq!(
            stats.linked, 1,
            "only `same` is unchanged (its twin is linked to it)"
        );
        assert_eq!(stats.copied, 2, "the rewritten db and the new file");
        assert_eq!(
            std::fs::metadata(second.join("same")).unwrap().ino(),
            first_ino,
            "an unchanged file is the first snapshot's copy"
        );
        assert_eq!(
            std::fs::read(second.join("sub/deeper/db")).unwrap(),
            b"page1 PAGE2"
        );
        assert_eq!(
            std::fs::read(first.join("sub/deeper/db")).unwrap(),
            b"page1 page2"
        );
        assert!(!second.join("gone").exists());
        assert_eq!(std::fs::read(second.join("new")).unwrap(), b"fresh");

        // The base may go: the later snapshot keeps its own links.
        std::fs::remove_dir_all(&first).unwrap();
        assert_eq!(
            std::fs::read(second.join("same")).unwrap(),
            b"never changes"
        );
    }

    #[test]
    fn a_chmod_or_a_new_file_under_the_same_name_is_copied() {
        let tmp = tempfile::tempdir().unwrap();
        let live = tmp.path().join("live");
        std::fs::create_dir(&live).unwrap();
        std::fs::write(live.join("a"), b"one").unwrap();
        std::fs::write(live.join("b"), b"two").unwrap();
        let first = tmp.path().join("first");
        let (_, index) = snap(&live, None, &first);
        std::fs::set_permissions(live.join("a"), std::fs::Permissions::from_mode(0o400)).unwrap();
        // Replaced by rename: a new inode with the same size.
        std::fs::write(live.join("b.tmp"), b"TWO").unwrap();
        std::fs::rename(live.join("b.tmp"), live.join("b")).unwrap();
        let second = tmp.path().join("second");
        let (stats, _) = snap(&live, Some((&first, &index)), &second);
        assert_eq!((stats.linked, stats.copied), (0, 2));
        assert_eq!(
            std::fs::metadata(second.join("a")).unwrap().mode() & 0o777,
            0o400
        );
        assert_eq!(std::fs::read(second.join("b")).unwrap(), b"TWO");
    }

    #[test]
    fn files_changed_during_the_walk_are_not_indexed() {
        let tmp = tempfile::tempdir().unwrap();
        let live = tmp.path().join("live");
        std::fs::create_dir(&live).unwrap();
        std::fs::write(live.join("a"), b"one").unwrap();
        let dest = tmp.path().join("s");
        let index = tmp.path().join("s.index");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128;
        snapshot_at(&live, None, &dest, &index, Some(now)).unwrap();
        assert!(
            read_index(&index).unwrap().is_empty(),
            "a file changed this second could change again unseen"
        );
    }

    #[test]
    fn a_damaged_index_is_no_index() {
        let tmp = tempfile::tempdir().unwrap();
        let live = tmp.path().join("live");
        std::fs::create_dir(&live).unwrap();
        std::fs::write(live.join("a"), b"one").unwrap();
        let dest = tmp.path().join("s");
        let (_, _) = snap(&live, None, &dest);
        let path = dest.with_extension("index");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, &bytes).unwrap();
        assert!(read_index(&path).is_none());
        std::fs::write(&path, b"something else").unwrap();
        assert!(read_index(&path).is_none());
    }

    #[test]
    fn holes_stay_holes_and_the_size_is_the_stat_size() {
        let tmp = tempfile::tempdir().unwrap();
        let live = tmp.path().join("live");
        std::fs::create_dir(&live).unwrap();
        {
            use std::os::unix::fs::FileExt;
            let f = File::create(live.join("sparse")).unwrap();
            f.set_len(1 << 40).unwrap();
            f.write_all_at(b"middle", 1 << 30).unwrap();
        }
        let dest = tmp.path().join("s");
        let (stats, _) = snap(&live, None, &dest);
        let meta = std::fs::metadata(dest.join("sparse")).unwrap();
        assert_eq!(meta.len(), 1 << 40);
        assert!(
            meta.blocks() * 512 <= 1 << 20,
            "a 1 TiB sparse file took {} bytes",
            meta.blocks() * 512
        );
        assert!(stats.copied_bytes <= 1 << 20, "{stats:?}");
        let mut buf = [0u8; 6];
        use std::os::unix::fs::FileExt;
        File::open(dest.join("sparse"))
            .unwrap()
            .read_exact_at(&mut buf, 1 << 30)
            .unwrap();
        assert_eq!(&buf, b"middle");
    }

    #[test]
    fn a_tree_too_deep_fails_cleanly() {
        let tmp = tempfile::tempdir().unwrap();
        let live = tmp.path().join("live");
        let mut deep = live.clone();
        for _ in 0..=MAX_DEPTH + 1 {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        let dest = tmp.path().join("s");
        let index = tmp.path().join("s.index");
        let e = snapshot_at(&live, None, &dest, &index, None).unwrap_err();
        assert!(e.to_string().contains("directories deep"), "{e}");
        assert!(!index.exists());
    }
}
