use std::fmt;
use std::io;

/// A failed sandbox step: which step, on what, and the OS error, e.g.
/// `jail: pivot_root into /tmp: EINVAL (Invalid argument)`.
#[derive(Debug)]
pub struct JailError {
    pub step: String,
    pub source: Option<io::Error>,
}

impl JailError {
    pub fn new(step: impl Into<String>) -> JailError {
        JailError {
            step: step.into(),
            source: None,
        }
    }

    pub fn os(step: impl Into<String>, source: io::Error) -> JailError {
        JailError {
            step: step.into(),
            source: Some(source),
        }
    }

    /// The step with the current `errno`.
    pub fn last_os(step: impl Into<String>) -> JailError {
        JailError::os(step, io::Error::last_os_error())
    }
}

impl fmt::Display for JailError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "jail: {}", self.step)?;
        if let Some(e) = &self.source {
            match e.raw_os_error() {
                Some(code) => write!(f, ": {} ({e})", errno_name(code))?,
                None => write!(f, ": {e}")?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for JailError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

fn errno_name(code: i32) -> String {
    let name = match code {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENOTDIR => "ENOTDIR",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::ENOSYS => "ENOSYS",
        libc::ELOOP => "ELOOP",
        libc::EXDEV => "EXDEV",
        libc::ENOMEM => "ENOMEM",
        libc::EAGAIN => "EAGAIN",
        _ => return format!("errno {code}"),
    };
    name.to_owned()
}
