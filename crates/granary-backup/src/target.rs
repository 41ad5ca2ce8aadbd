//! Where backups go: a directory (removable media, a mount from elsewhere)
//! or another Granary node ([`crate::remote`]). Both hold the same files.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::BackupError;

/// A place backup files are written to and read from. Writes are atomic
/// and durable when they return; names are checked with [`valid_name`].
pub trait Target: Send {
    /// For messages: the directory or the remote address.
    fn describe(&self) -> String;
    /// A whole file, or `None` when it is not there. A file larger than
    /// `max` bytes is an error (the media or the remote may be hostile).
    fn read(&mut self, name: &str, max: u64) -> Result<Option<Vec<u8>>, BackupError>;
    /// Writes a whole file: a temporary name, fsync, rename, fsync of the
    /// directory.
    fn write(&mut self, name: &str, bytes: &[u8]) -> Result<(), BackupError>;
    /// Writes a whole file whose name need not survive a crash until
    /// [`Target::sync_dir`] (a chunk of a stream still being exported: the
    /// journal is checked against the media on resume). Its content is
    /// durable under the name once the directory is synced.
    fn write_deferred(&mut self, name: &str, bytes: &[u8]) -> Result<(), BackupError> {
        self.write(name, bytes)
    }
    /// Writes a whole file that may be lost, or left torn, by a crash (a
    /// resume journal: its HMAC then fails and the export starts over).
    fn write_unsynced(&mut self, name: &str, bytes: &[u8]) -> Result<(), BackupError> {
        self.write_deferred(name, bytes)
    }
    /// Makes every file [`Target::write_deferred`] put in directory `dir`
    /// durable under its name.
    fn sync_dir(&mut self, _dir: &str) -> Result<(), BackupError> {
        Ok(())
    }
    /// Files under directory `prefix`, recursively, with their sizes.
    fn list(&mut self, prefix: &str) -> Result<Vec<(String, u64)>, BackupError>;
    /// Removes a file; a missing one is fine.
    fn remove(&mut self, name: &str) -> Result<(), BackupError>;
}

/// A relative path of `/`-separated components, each 1 to 128 of
/// `[A-Za-z0-9._-]` not starting with '.': never absolute, never `..`,
/// never a hidden (temporary) file.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 512
        && name.split('/').all(|c| {
            !c.is_empty()
                && c.len() <= 128
                && !c.starts_with('.')
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
}

fn check(name: &str) -> Result<(), BackupError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(BackupError::Other(format!(
            "{name:?} is not a backup file name"
        )))
    }
}

/// A directory, e.g. removable media mounted at `/media/backup`.
pub struct DirTarget {
    root: PathBuf,
}

impl DirTarget {
    /// Uses `root`, creating it (0700) when missing.
    pub fn new(root: &Path) -> Result<DirTarget, BackupError> {
        std::fs::create_dir_all(root)
            .map_err(io_err(format!("cannot create {}", root.display())))?;
        Ok(DirTarget {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

pub(crate) fn io_err(what: String) -> impl FnOnce(io::Error) -> BackupError {
    move |e| BackupError::Io(format!("{what}: {e}"))
}

/// `name` as (its directory's components, its file name).
fn split(name: &str) -> (Vec<&str>, &str) {
    let mut parts: Vec<&str> = name.split('/').collect();
    let file = parts.pop().expect("a valid name has a component");
    (parts, file)
}

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from(e)
}

impl DirTarget {
    /// The directory holding `name`, opened one component at a time beneath
    /// the root without following any symlink (removable media may hold
    /// planted links); made (and its parent synced) when `create`.
    fn dir(&self, parts: &[&str], create: bool) -> Result<Option<std::fs::File>, BackupError> {
        use std::os::fd::AsRawFd;
        let mut dir = std::fs::File::open(&self.root)
            .map_err(io_err(format!("cannot open {}", self.root.display())))?;
        for part in parts {
            let opened = granary_files::open_beneath(&dir, Path::new(part), false);
            let next = match opened {
                Ok(f) => f,
                Err(granary_files::FileError::Io { source, .. })
                    if source.kind() == io::ErrorKind::NotFound && create =>
                {
                    match nix::sys::stat::mkdirat(
                        Some(dir.as_raw_fd()),
                        *part,
                        nix::sys::stat::Mode::from_bits_truncate(0o700),
                    ) {
                        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                        Err(e) => return Err(io_err(format!("cannot create {part}"))(errno(e))),
                    }
                    // The new entry is durable before anything goes in it.
                    dir.sync_all()
                        .map_err(io_err(format!("cannot sync the directory of {part}")))?;
                    granary_files::open_beneath(&dir, Path::new(part), false)
                        .map_err(|e| BackupError::Io(format!("cannot open {part}: {e}")))?
                }
                Err(granary_files::FileError::Io { source, .. })
                    if source.kind() == io::ErrorKind::NotFound =>
                {
                    return Ok(None);
                }
                Err(e) => {
                    return Err(BackupError::Integrity(format!(
                        "{}: {part}: {e} (a symlink on the backup media is refused)",
                        self.root.display()
                    )));
                }
            };
            if !next.metadata().map(|m| m.is_dir()).unwrap_or(false) {
                return Err(BackupError::Integrity(format!("{part} is not a directory")));
            }
            dir = next;
        }
        Ok(Some(dir))
    }
}

/// What a write makes durable before it returns.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sync {
    Nothing,
    /// The content, before the rename.
    File,
    /// The content, then the name.
    FileAndDir,
}

impl DirTarget {
    /// Written under a temporary name, then renamed; synced as `sync` says.
    fn write_file(&mut self, name: &str, bytes: &[u8], sync: Sync) -> Result<(), BackupError> {
        use std::os::fd::AsRawFd;
        check(name)?;
        let (parts, file) = split(name);
        let dir = self.dir(&parts, true)?.expect("created");
        let tmp = format!(".tmp-{}", crate::nonce());
        let result = (|| {
            let mut f = granary_files::open_beneath(&dir, Path::new(&tmp), true)
                .map_err(|e| io::Error::other(e.to_string()))?;
            f.write_all(bytes)?;
            if sync != Sync::Nothing {
                f.sync_all()?;
            }
            nix::fcntl::renameat(
                Some(dir.as_raw_fd()),
                tmp.as_str(),
                Some(dir.as_raw_fd()),
                file,
            )
            .map_err(errno)?;
            if sync == Sync::FileAndDir {
                dir.sync_all()?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = nix::unistd::unlinkat(
                Some(dir.as_raw_fd()),
                tmp.as_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
        result.map_err(io_err(format!(
            "cannot write {name} in {}",
            self.root.display()
        )))
    }
}

impl Target for DirTarget {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn read(&mut self, name: &str, max: u64) -> Result<Option<Vec<u8>>, BackupError> {
        use std::io::Read;
        check(name)?;
        let (parts, file) = split(name);
        let Some(dir) = self.dir(&parts, false)? else {
            return Ok(None);
        };
        let f = match granary_files::open_beneath(&dir, Path::new(file), false) {
            Ok(f) => f,
            Err(granary_files::FileError::Io { source, .. })
                if source.kind() == io::ErrorKind::NotFound =>
            {
                return Ok(None);
            }
            Err(e) => {
                return Err(BackupError::Integrity(format!(
                    "{name}: {e} (a symlink on the backup media is refused)"
                )));
            }
        };
        let meta = f
            .metadata()
            .map_err(io_err(format!("cannot read {name}")))?;
        if !meta.is_file() {
            return Err(BackupError::Integrity(format!(
                "{name} is not a regular file"
            )));
        }
        if meta.len() > max {
            return Err(BackupError::Integrity(format!(
                "{name} is {} bytes, more than the {max} it may be",
                meta.len()
            )));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        f.take(max + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err(format!("cannot read {name}")))?;
        if bytes.len() as u64 > max {
            return Err(BackupError::Integrity(format!(
                "{name} grew past {max} bytes"
            )));
        }
        Ok(Some(bytes))
    }

    fn write(&mut self, name: &str, bytes: &[u8]) -> Result<(), BackupError> {
        self.write_file(name, bytes, Sync::FileAndDir)
    }

    fn write_deferred(&mut self, name: &str, bytes: &[u8]) -> Result<(), BackupError> {
        self.write_file(name, bytes, Sync::File)
    }

    fn write_unsynced(&mut self, name: &str, bytes: &[u8]) -> Result<(), BackupError> {
        self.write_file(name, bytes, Sync::Nothing)
    }

    fn sync_dir(&mut self, dir: &str) -> Result<(), BackupError> {
        check(dir)?;
        let parts: Vec<&str> = dir.split('/').collect();
        match self.dir(&parts, false)? {
            Some(d) => d.sync_all().map_err(io_err(format!(
                "cannot sync {dir} in {}",
                self.root.display()
            ))),
            None => Ok(()),
        }
    }

    fn list(&mut self, prefix: &str) -> Result<Vec<(String, u64)>, BackupError> {
        check(prefix)?;
        let mut out = Vec::new();
        let mut stack = vec![prefix.to_owned()];
        while let Some(rel) = stack.pop() {
            let parts: Vec<&str> = rel.split('/').collect();
            let Some(dir) = self.dir(&parts, false)? else {
                continue;
            };
            // Through the opened descriptor: never a planted link's target.
            let entries = std::fs::read_dir(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&dir)
            ))
            .map_err(io_err(format!("cannot list {rel}")))?;
            for entry in entries {
                let entry = entry.map_err(io_err(format!("cannot list {rel}")))?;
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if name.starts_with('.') || !valid_name(&name) {
                    continue;
                }
                let child = format!("{rel}/{name}");
                // DirEntry::metadata does not follow a symlink.
                let meta = entry
                    .metadata()
                    .map_err(io_err(format!("cannot list {child}")))?;
                if meta.is_dir() {
                    stack.push(child);
                } else if meta.is_file() {
                    out.push((child, meta.len()));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn remove(&mut self, name: &str) -> Result<(), BackupError> {
        use std::os::fd::AsRawFd;
        check(name)?;
        let (parts, file) = split(name);
        let Some(dir) = self.dir(&parts, false)? else {
            return Ok(());
        };
        match nix::unistd::unlinkat(
            Some(dir.as_raw_fd()),
            file,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        ) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
            Err(e) => Err(io_err(format!("cannot remove {name}"))(errno(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_inside() {
        for ok in [
            "granary-backup.json",
            "streams/a-b/000001-backup-1/00000000.age",
        ] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            ".tmp-1",
            "a/.hidden",
            "a b",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn dir_target_writes_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = DirTarget::new(dir.path()).unwrap();
        t.write("streams/g/1/a.age", b"abc").unwrap();
        assert_eq!(t.read("streams/g/1/a.age", 3).unwrap().unwrap(), b"abc");
        assert!(t.read("streams/g/1/a.age", 2).is_err(), "over the limit");
        assert_eq!(t.read("nope", 9).unwrap(), None);
        assert_eq!(
            t.list("streams").unwrap(),
            vec![("streams/g/1/a.age".to_owned(), 3)]
        );
        t.remove("streams/g/1/a.age").unwrap();
        t.remove("streams/g/1/a.age").unwrap();
        assert!(t.write("../escape", b"x").is_err());

        // Links planted on the media are never followed.
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("victim"), "keep").unwrap();
        let root = dir.path().join("media");
        let mut t = DirTarget::new(&root).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("x")).unwrap();
        std::os::unix::fs::symlink(outside.join("victim"), root.join("y")).unwrap();
        assert!(t.remove("x/victim").is_err());
        assert!(t.write("x/new", b"evil").is_err());
        assert!(t.read("x/victim", 99).is_err());
        assert!(t.read("y", 99).is_err());
        assert!(t.list("x").is_err());
        assert_eq!(
            std::fs::read_to_string(outside.join("victim")).unwrap(),
            "keep"
        );
        assert!(!outside.join("new").exists());
    }
}
