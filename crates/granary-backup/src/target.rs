//! Where backups go: a directory (removable media, a mount from elsewhere)
//! or another Granary node ([`crate::remote`]). Both hold the same files.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::BackupError;

/// A place backup files are written to and read from. Writes are atomic
/// and durable when they return; names are checked with [`valid_name`].
pub trait Target: Send {
    /// For messages: the directory or the remote address.
    fn describe(&self) -> String;
    /// A whole file, or `None` when it is not there.
    fn read(&mut self, name: &str) -> Result<Option<Vec<u8>>, BackupError>;
    /// Writes a whole file: a temporary name, fsync, rename, fsync of the
    /// directory.
    fn write(&mut self, name: &str, bytes: &[u8]) -> Result<(), BackupError>;
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

impl Target for DirTarget {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn read(&mut self, name: &str) -> Result<Option<Vec<u8>>, BackupError> {
        check(name)?;
        let path = self.root.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(format!("cannot read {}", path.display()))(e)),
        }
    }

    fn write(&mut self, name: &str, bytes: &[u8]) -> Result<(), BackupError> {
        check(name)?;
        let path = self.root.join(name);
        let dir = path.parent().expect("a name has a parent").to_path_buf();
        std::fs::create_dir_all(&dir)
            .map_err(io_err(format!("cannot create {}", dir.display())))?;
        let tmp = dir.join(format!(".tmp-{}", crate::nonce()));
        let result = (|| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(io_err(format!("cannot write {}", path.display())))
    }

    fn list(&mut self, prefix: &str) -> Result<Vec<(String, u64)>, BackupError> {
        check(prefix)?;
        let mut out = Vec::new();
        let mut stack = vec![prefix.to_owned()];
        while let Some(rel) = stack.pop() {
            let entries = match std::fs::read_dir(self.root.join(&rel)) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(format!("cannot list {rel}"))(e)),
            };
            for entry in entries {
                let entry = entry.map_err(io_err(format!("cannot list {rel}")))?;
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if name.starts_with('.') {
                    continue;
                }
                let child = format!("{rel}/{name}");
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
        check(name)?;
        match std::fs::remove_file(self.root.join(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(io_err(format!("cannot remove {name}"))(e))
            }
            _ => Ok(()),
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
        assert_eq!(t.read("streams/g/1/a.age").unwrap().unwrap(), b"abc");
        assert_eq!(t.read("nope").unwrap(), None);
        assert_eq!(
            t.list("streams").unwrap(),
            vec![("streams/g/1/a.age".to_owned(), 3)]
        );
        t.remove("streams/g/1/a.age").unwrap();
        t.remove("streams/g/1/a.age").unwrap();
        assert!(t.write("../escape", b"x").is_err());
    }
}
