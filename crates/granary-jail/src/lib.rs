//! The grain sandbox.
//!
//! A grain's [`GrainSpec`] (its image, its dataset, its host uid, its limits)
//! is checked against the host's [`JailConfig`] and turned into a [`Plan`]:
//! plain data, serialised to the `granary-launcher` binary. The launcher is
//! small and single-threaded; it applies the plan and execs the app. The
//! daemon only ever fork+execs the launcher (see [`spawn`]), so no namespace
//! work happens inside a threaded process.
//!
//! What a grain gets on Linux (see ARCHITECTURE.md for the reasoning):
//! new mount, pid, net, ipc, uts, cgroup and user namespaces; its own host uid
//! mapped to uid 1000 inside; a root built on tmpfs with the image read-only,
//! the dataset at `/var`, a private `/tmp`, a minimal `/dev` and no `/proc`
//! (whose mount tables would name host paths); no network but a down `lo`;
//! cgroup limits; no capabilities; `no_new_privs`; a seccomp allowlist
//! installed last; an init as pid 1 that reaps and forwards signals.

#![allow(unsafe_code)] // the launcher makes raw syscalls; each block says why it is sound

pub mod cgroup;
mod error;
#[cfg(target_os = "freebsd")]
pub mod freebsd;
#[cfg(unix)]
pub mod grain_log;
#[cfg(target_os = "linux")]
pub mod linux;
pub mod spawn;
mod spec;

pub use error::JailError;
pub use spec::{
    CgroupDriver, DEFAULT_UID_RANGE, GrainSpec, INSIDE_GID, INSIDE_UID, JailConfig, Limits, Plan,
    UidRange, uid_range_free_on_host,
};

/// Whether the kernel says its clock is kept in step (by NTP, chrony or
/// systemd-timesyncd): `None` when it cannot be asked. DKIM signatures,
/// TLS certificates and backup schedules all depend on the clock.
pub fn clock_synchronized() -> Option<bool> {
    #[cfg(any(target_os = "linux", target_os = "freebsd"))]
    {
        // SAFETY: timex is plain old data; all zero (modes 0) asks the
        // kernel to read the state and change nothing.
        let mut t: libc::timex = unsafe { std::mem::zeroed() };
        // SAFETY: `t` is a valid, exclusively borrowed timex.
        let state = unsafe { libc::ntp_adjtime(&mut t) };
        match state {
            -1 => None,
            libc::TIME_ERROR => Some(false),
            _ => Some(true),
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "freebsd")))]
    {
        None
    }
}

/// One line for `granary status`: how grains are isolated on this host.
pub fn describe_host(uid_range: UidRange) -> String {
    #[cfg(target_os = "linux")]
    {
        let cgroup = match JailConfig::detect_cgroup() {
            Some(CgroupDriver::V1 { .. }) => "cgroup v1 limits",
            Some(CgroupDriver::V2 { .. }) => "cgroup v2 limits",
            None => "NO cgroup limits (no usable hierarchy)",
        };
        let seccomp = if linux::seccomp::compile().is_ok() {
            "seccomp"
        } else {
            "NO seccomp policy for this architecture (grains refused)"
        };
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return format!(
                "linux namespaces, {seccomp}; NOT root: grains share your uid and have no cgroup limits"
            );
        }
        format!(
            "linux namespaces, {seccomp}, {cgroup}; grain uids {}+{}",
            uid_range.start, uid_range.count
        )
    }
    #[cfg(target_os = "freebsd")]
    {
        format!(
            "freebsd jails, rctl limits; grain uids {}+{}",
            uid_range.start, uid_range.count
        )
    }
    #[cfg(not(any(target_os = "linux", target_os = "freebsd")))]
    {
        let _ = uid_range;
        "no sandbox on this operating system".to_owned()
    }
}

/// A plan's argv and environment as the NUL-terminated pointer arrays
/// `execve` takes, built before forking so the child only execs.
#[cfg(unix)]
pub(crate) struct ExecArgs {
    _strings: Vec<std::ffi::CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

#[cfg(unix)]
impl ExecArgs {
    pub(crate) fn new(plan: &Plan) -> Result<ExecArgs, JailError> {
        let to_c = |items: &[String], what: &str| {
            items
                .iter()
                .map(|a| std::ffi::CString::new(a.as_bytes()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| JailError::new(format!("{what} contains a NUL byte")))
        };
        let argv = to_c(&plan.argv, "argv")?;
        let env = to_c(&plan.env, "environment")?;
        let pointers = |strings: &[std::ffi::CString]| {
            let mut p: Vec<*const libc::c_char> = strings.iter().map(|s| s.as_ptr()).collect();
            p.push(std::ptr::null());
            p
        };
        let (argv_ptrs, envp_ptrs) = (pointers(&argv), pointers(&env));
        // The CStrings' heap buffers do not move when the vectors do, so the
        // pointers stay valid for as long as `_strings` lives.
        let mut strings = argv;
        strings.extend(env);
        Ok(ExecArgs {
            _strings: strings,
            argv: argv_ptrs,
            envp: envp_ptrs,
        })
    }

    /// Replaces the process image; returns only on failure.
    pub(crate) fn exec(&self) -> std::io::Error {
        // SAFETY: both arrays are NULL-terminated and point into strings
        // owned by `self`, which outlives the call.
        unsafe { libc::execve(self.argv[0], self.argv.as_ptr(), self.envp.as_ptr()) };
        std::io::Error::last_os_error()
    }
}

/// A wait status as a shell reports it: the exit code, or 128 + the signal.
#[cfg(unix)]
pub(crate) fn shell_status(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}
