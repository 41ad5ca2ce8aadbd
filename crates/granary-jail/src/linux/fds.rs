//! File descriptors: what the launcher keeps, closes and opens.

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::JailError;

/// Closes every descriptor above 2 except those in `keep`.
pub fn close_inherited_fds(keep: &[i32]) -> Result<(), JailError> {
    let entries = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| JailError::os("listing /proc/self/fd", e))?;
    let fds: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: closing a descriptor number; the directory handle used
            // for the listing is already gone, and nothing else in this
            // single-threaded process holds these descriptors as objects.
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

/// Points standard input at /dev/null.
pub fn null_stdin() -> Result<(), JailError> {
    let null =
        std::fs::File::open("/dev/null").map_err(|e| JailError::os("opening /dev/null", e))?;
    // SAFETY: dup2 onto descriptor 0; `null` stays valid for the call.
    if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 0) } < 0 {
        return Err(JailError::last_os("redirecting stdin to /dev/null"));
    }
    Ok(())
}

/// Opens a directory as an `O_PATH` handle, refusing a symlink as the last
/// component, so the mount step binds exactly what was checked.
pub(crate) fn open_dir_path(path: &Path, what: &str) -> Result<OwnedFd, JailError> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        JailError::new(format!(
            "{what} path {} contains a NUL byte",
            path.display()
        ))
    })?;
    // SAFETY: `c` is a valid NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(JailError::last_os(format!(
            "opening {what} {}",
            path.display()
        )));
    }
    // SAFETY: open succeeded; we own the new descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
