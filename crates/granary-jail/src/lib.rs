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
//! the dataset at `/var`, a private `/tmp`, a minimal `/dev` and its own
//! `/proc` showing only its own processes; no network but a down `lo`;
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
    UidRange,
};

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
