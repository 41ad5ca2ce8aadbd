//! Writing files so that a crash never leaves half of one behind.
//!
//! [`write_atomic`] writes a sibling temporary file, syncs it, renames it over
//! the target and syncs the directory: a reader sees the old content or the
//! new, never a mix, and the new content survives power loss once the call
//! returns. [`ensure_private_dir`] makes (or checks) a directory that only its
//! owner can enter.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "{path} is owned by uid {found}, not by uid {expected} which runs granary; fix it with `chown {expected} {path}`"
    )]
    WrongOwner {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("{path} has mode {mode:o}, which lets other users in; fix it with `chmod 700 {path}`")]
    TooOpen { path: PathBuf, mode: u32 },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FileError + 'a {
    move |source| FileError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Replaces `path` with `contents` atomically and durably, with permission
/// bits `mode` (e.g. `0o600` for secrets, which are never readable by others
/// even for an instant).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        // `mode` above is filtered by the umask; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err("chmod", &tmp))?;
        file.write_all(contents).map_err(io_err("write", &tmp))?;
        file.sync_all().map_err(io_err("fsync", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("rename into place", path))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Makes a directory's entries (a create, rename or unlink) durable.
pub fn sync_dir(dir: &Path) -> Result<(), FileError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// Creates `dir` (and missing parents) with mode 0700, or checks that an
/// existing one belongs to `owner` and is not open to group or others.
pub fn ensure_private_dir(dir: &Path, owner: u32) -> Result<(), FileError> {
    match fs::metadata(dir) {
        Ok(meta) => check_private(dir, &meta, owner),
        Err(e) if e.kind() == io::ErrorKind::NotFound => DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("create directory", dir)),
        Err(e) => Err(io_err("stat", dir)(e)),
    }
}

/// Checks that `path` belongs to `owner` (or root) and that group and others
/// have no write access, and for directories no access at all.
pub fn check_private(path: &Path, meta: &fs::Metadata, owner: u32) -> Result<(), FileError> {
    if meta.uid() != owner && meta.uid() != 0 {
        return Err(FileError::WrongOwner {
            path: path.to_path_buf(),
            found: meta.uid(),
            expected: owner,
        });
    }
    let mode = meta.mode() & 0o7777;
    let forbidden = if meta.is_dir() { 0o077 } else { 0o022 };
    if mode & forbidden != 0 {
        return Err(FileError::TooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        // No temporary file is left next to it.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["secret.key"]);
    }

    #[test]
    fn write_atomic_into_missing_dir_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_atomic(&dir.path().join("nope/x"), b"x", 0o644).unwrap_err();
        assert!(err.to_string().starts_with("create "), "{err}");
    }

    #[test]
    fn private_dir_is_created_0700_and_open_dirs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let me = fs::metadata(dir.path()).unwrap().uid();
        let private = dir.path().join("a/b");
        ensure_private_dir(&private, me).unwrap();
        assert_eq!(fs::metadata(&private).unwrap().mode() & 0o777, 0o700);
        ensure_private_dir(&private, me).unwrap();

        fs::set_permissions(&private, fs::Permissions::from_mode(0o755)).unwrap();
        let err = ensure_private_dir(&private, me).unwrap_err();
        assert!(
            matches!(err, FileError::TooOpen { mode: 0o755, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 700"), "{err}");
    }

    #[test]
    fn foreign_owner_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("p");
        ensure_private_dir(&private, 0).unwrap();
        let meta = fs::metadata(&private).unwrap();
        if meta.uid() == 0 {
            // As root: hand the directory to someone else, then insist on root.
            std::os::unix::fs::chown(&private, Some(54321), None).unwrap();
            let meta = fs::metadata(&private).unwrap();
            let err = check_private(&private, &meta, 0).unwrap_err();
            assert!(
                matches!(
                    err,
                    FileError::WrongOwner {
                        found: 54321,
                        expected: 0,
                        ..
                    }
                ),
                "{err}"
            );
            assert!(err.to_string().contains("chown 0"), "{err}");
        } else {
            let err = check_private(&private, &meta, meta.uid() + 1).unwrap_err();
            assert!(matches!(err, FileError::WrongOwner { .. }), "{err}");
        }
    }
}
