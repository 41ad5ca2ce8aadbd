//! The zygote: one `granary-launcher --zygote`, exec'd once per daemon, that
//! forks every grain's launcher. A grain start then costs a fork, not an
//! exec of the launcher, its dynamic linking and runtime set-up, and the
//! seccomp policy is compiled once, here, not at every start.
//!
//! ```text
//! daemon ──(fork+exec once)──▶ zygote (single-threaded, root)
//!    │  request: plan JSON + stdout, stderr, fds (SCM_RIGHTS)
//!    │ ─────────────────────────▶ clone(CLONE_PARENT) ─▶ launcher
//!    │  reply: "ok <pid>"                                (the daemon's child,
//!    │ ◀─────────────────────────                         as if it had forked it)
//! ```
//!
//! `CLONE_PARENT` makes each launcher the daemon's own child, so the daemon
//! waits for it, kills it and gets its exit status exactly as before, and
//! its parent-death signal fires when the daemon's spawner thread ends.
//! The zygote holds no grain state: if it dies, the daemon starts another.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, send};
use serde::{Deserialize, Serialize};

use super::{close_inherited_fds, die_with_parent, null_stdin, seccomp};
use crate::{JailError, Plan};

/// Where the zygote finds its socket to the daemon.
pub const SOCKET_FD: RawFd = 3;
/// Largest request: a plan is a few KiB; its environment is the only part
/// that grows.
pub const MAX_REQUEST: usize = 256 << 10;
/// Descriptors one request may carry: stdout, stderr and the app's own.
pub const MAX_FDS: usize = 16;

/// One launch, as the daemon sends it. The descriptors travel beside it,
/// in order: stdout, stderr, then one for each of `targets`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub plan: Plan,
    pub targets: Vec<i32>,
}

/// Serves launch requests on [`SOCKET_FD`] until the daemon closes it.
pub fn serve(parent: libc::pid_t) -> Result<(), JailError> {
    die_with_parent(Some(parent))?;
    close_inherited_fds(&[SOCKET_FD])?;
    null_stdin()?;
    let filters = seccomp::compile()?;
    let mut buf = vec![0u8; MAX_REQUEST];
    loop {
        let (len, fds) = match receive(&mut buf) {
            Ok(got) => got,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(JailError::os("reading a launch request", e.into())),
        };
        if len == 0 && fds.is_empty() {
            return Ok(());
        }
        let reply = match serde_json::from_slice::<Request>(&buf[..len]) {
            Ok(req) if fds.len() == req.targets.len() + 2 => {
                fork_launcher(&req, &fds, &filters, parent)
            }
            Ok(req) => Err(JailError::new(format!(
                "a launch request carried {} descriptors for {} targets",
                fds.len(),
                req.targets.len()
            ))),
            Err(e) => Err(JailError::new(format!("invalid launch request: {e}"))),
        };
        // Our copies: the launcher has its own.
        drop(fds);
        let text = match reply {
            Ok(pid) => format!("ok {pid}"),
            Err(e) => format!("err {e}"),
        };
        loop {
            match send(SOCKET_FD, text.as_bytes(), MsgFlags::empty()) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(JailError::os("answering a launch request", e.into())),
                Ok(_) => break,
            }
        }
    }
}

fn receive(buf: &mut [u8]) -> nix::Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        SOCKET_FD,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: the kernel just installed these descriptors in this
            // process for us; nothing else refers to them.
            fds.extend(
                received
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
    {
        return Err(nix::errno::Errno::EMSGSIZE);
    }
    Ok((msg.bytes, fds))
}

fn fork_launcher(
    req: &Request,
    fds: &[OwnedFd],
    filters: &seccomp::Filters,
    parent: libc::pid_t,
) -> Result<libc::pid_t, JailError> {
    // SAFETY: the zygote is single-threaded, so the child may run any code;
    // a null stack makes clone behave like fork. CLONE_PARENT gives the
    // child the zygote's parent (the daemon) as its own.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_int>(),
            std::ptr::null_mut::<libc::c_int>(),
            0 as libc::c_ulong,
        )
    };
    if pid < 0 {
        return Err(JailError::last_os("forking a launcher"));
    }
    if pid > 0 {
        return Ok(pid as libc::pid_t);
    }
    let code = match launcher(req, fds, filters, parent) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("granary-launcher: {e}");
            125
        }
    };
    std::process::exit(code)
}

/// In the forked launcher: descriptors in place, then the launch.
fn launcher(
    req: &Request,
    fds: &[OwnedFd],
    filters: &seccomp::Filters,
    parent: libc::pid_t,
) -> Result<i32, JailError> {
    let targets: Vec<i32> = [1, 2]
        .into_iter()
        .chain(req.targets.iter().copied())
        .collect();
    // First every source above every target, so that no dup2 below
    // replaces a source another move still needs.
    let floor = targets.iter().copied().max().unwrap_or(2) + 1;
    let mut high = Vec::with_capacity(fds.len());
    for fd in fds {
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor we hold.
        let copy = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor.max(64)) };
        if copy < 0 {
            return Err(JailError::last_os("moving a descriptor"));
        }
        high.push(copy);
    }
    for (from, to) in high.iter().zip(&targets) {
        // SAFETY: dup2 between descriptor numbers we hold; the new one is
        // not close-on-exec.
        if unsafe { libc::dup2(*from, *to) } < 0 {
            return Err(JailError::last_os(format!("placing descriptor {to}")));
        }
    }
    // The zygote's socket, the received copies and the moved ones all go.
    close_inherited_fds(&req.targets)?;
    null_stdin()?;
    die_with_parent(Some(parent))?;
    super::launch_with(&req.plan, filters)
}
