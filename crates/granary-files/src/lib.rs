//! Writing files so that a crash never leaves half of one behind.
//!
//! [`write_atomic`] writes a sibling temporary file, syncs it, renames it over
//! the target and syncs the directory: a reader sees the old content or the
//! new, never a mix, and the new content survives power loss once the call
//! returns. [`ensure_private_dir`] makes (or checks) a directory that only its
//! owner can enter. [`open_beneath`] opens a path inside a directory a grain
//! controls without following any symlink the grain may have planted.

#![allow(unsafe_code)] // openat2 has no safe wrapper; the one block says why it is sound

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

/// Opens `path` relative to `dir` (a grain's dataset, say) for reading, or
/// for writing with `write`, refusing to leave `dir` and to follow a
/// symlink. Host code that touches grain data goes through this, so a
/// symlink a grain plants at `/var/x -> /etc/shadow` is an error (`ELOOP`
/// on Linux), never a read of the host.
///
/// Linux: `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
/// RESOLVE_NO_MAGICLINKS` (no symlink at any step). FreeBSD:
/// `O_RESOLVE_BENEATH` (no step may leave `dir`) with `O_NOFOLLOW` (no
/// symlink as the last step).
#[cfg(any(target_os = "linux", target_os = "freebsd"))]
pub fn open_beneath(dir: &File, path: &Path, write: bool) -> Result<File, FileError> {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;

    let fail = |source| FileError::Io {
        op: "open beneath",
        path: path.to_path_buf(),
        source,
    };
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| fail(io::Error::from(io::ErrorKind::InvalidInput)))?;
    let access = if write {
        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC
    } else {
        libc::O_RDONLY
    };
    let fd = raw_open_beneath(
        dir.as_raw_fd(),
        &c_path,
        access | libc::O_CLOEXEC | libc::O_NOCTTY,
    );
    if fd < 0 {
        return Err(fail(io::Error::last_os_error()));
    }
    // SAFETY: the open call returned a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(target_os = "linux")]
fn raw_open_beneath(dir: libc::c_int, path: &std::ffi::CStr, flags: libc::c_int) -> libc::c_int {
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
    const RESOLVE_NO_SYMLINKS: u64 = 0x04;
    const RESOLVE_BENEATH: u64 = 0x08;
    let how = OpenHow {
        flags: flags as u64,
        // The kernel refuses a mode without O_CREAT.
        mode: if flags & libc::O_CREAT != 0 { 0o600 } else { 0 },
        resolve: RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: `dir` is an open descriptor, `path` NUL-terminated and `how`
    // an open_how of the size passed; the kernel only reads them.
    unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        ) as libc::c_int
    }
}

#[cfg(target_os = "freebsd")]
fn raw_open_beneath(dir: libc::c_int, path: &std::ffi::CStr, flags: libc::c_int) -> libc::c_int {
    // SAFETY: `dir` is an open descriptor and `path` NUL-terminated.
    unsafe {
        libc::openat(
            dir,
            path.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_RESOLVE_BENEATH,
            0o600,
        )
    }
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

    #[cfg(target_os = "linux")]
    #[test]
    fn open_beneath_refuses_symlinks_and_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("dataset");
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::write(root.join("sub/file"), b"inside").unwrap();
        fs::write(dir.path().join("outside"), b"host secret").unwrap();
        std::os::unix::fs::symlink(dir.path().join("outside"), root.join("evil")).unwrap();
        std::os::unix::fs::symlink("sub/file", root.join("relative")).unwrap();
        let base = File::open(&root).unwrap();

        let mut text = String::new();
        use std::io::Read;
        open_beneath(&base, Path::new("sub/file"), false)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "inside");
        let errno = |p: &str| match open_beneath(&base, Path::new(p), false) {
            Err(FileError::Io { source, .. }) => source.raw_os_error(),
            other => panic!("{p}: {other:?}"),
        };
        assert_eq!(errno("evil"), Some(libc::ELOOP), "absolute symlink out");
        assert_eq!(
            errno("relative"),
            Some(libc::ELOOP),
            "even a symlink that stays inside"
        );
        assert_eq!(errno("../outside"), Some(libc::EXDEV), "dot-dot out");
        assert_eq!(errno("/etc/passwd"), Some(libc::EXDEV), "absolute path");
        // Writing through a planted symlink does not create the target.
        assert!(open_beneath(&base, Path::new("evil"), true).is_err());
        assert_eq!(
            fs::read(dir.path().join("outside")).unwrap(),
            b"host secret"
        );
        open_beneath(&base, Path::new("new"), true).unwrap();
        assert!(root.join("new").exists());
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
