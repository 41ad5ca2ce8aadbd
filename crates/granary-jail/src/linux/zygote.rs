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
/// that grows. Below the socket's default send buffer.
pub const MAX_REQUEST: usize = 128 << 10;
/// Descriptors one request may carry: stdout, stderr, the go channel and
/// the app's own.
pub const MAX_FDS: usize = 16;
/// What the zygote says once it is ready to serve.
pub const READY: &[u8] = b"ready";

/// One launch, as the daemon sends it. The descriptors travel beside it,
/// in order: stdout, stderr, the go channel, then one for each of
/// `targets`.
///
/// The go channel is how the daemon learns the launcher's pid even if the
/// zygote dies before answering: the launcher writes its pid there first,
/// then waits for a `g` before it does anything. Without one it exits, so
/// a launch the daemon gave up on never runs a grain.
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
    answer(READY)?;
    let mut buf = vec![0u8; MAX_REQUEST];
    loop {
        let reply = match receive(&mut buf) {
            Err(nix::errno::Errno::EINTR) => continue,
            // The daemon is gone.
            Ok((0, fds)) if fds.is_empty() => return Ok(()),
            Err(nix::errno::Errno::ECONNRESET | nix::errno::Errno::EBADF) => return Ok(()),
            Err(e) => Err(JailError::os("reading a launch request", e.into())),
            Ok((len, fds)) => {
                let parsed = serde_json::from_slice::<Request>(&buf[..len]);
                // Earlier grains' plans are not left for later ones to
                // inherit.
                buf[..len].fill(0);
                let reply = match parsed {
                    Ok(req) => check(&req, fds.len())
                        .and_then(|()| fork_launcher(&req, &fds, &filters, parent)),
                    Err(e) => Err(JailError::new(format!("invalid launch request: {e}"))),
                };
                // Our copies: the launcher has its own.
                drop(fds);
                reply
            }
        };
        let text = match reply {
            Ok(pid) => format!("ok {pid}"),
            Err(e) => format!("err {e}"),
        };
        answer(text.as_bytes())?;
    }
}

fn answer(text: &[u8]) -> Result<(), JailError> {
    loop {
        match send(SOCKET_FD, text, MsgFlags::empty()) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(JailError::os("answering the daemon", e.into())),
            Ok(_) => return Ok(()),
        }
    }
}

/// The descriptors match the targets, and the targets are the plan's own
/// (above 2, each once): a request cannot hand a grain more, or replace
/// its stdout.
fn check(req: &Request, fds: usize) -> Result<(), JailError> {
    if fds != req.targets.len() + 3 {
        return Err(JailError::new(format!(
            "a launch request carried {fds} descriptors for {} targets",
            req.targets.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for t in &req.targets {
        if *t <= 2 || !req.plan.keep_fds.contains(t) || !seen.insert(*t) {
            return Err(JailError::new(format!(
                "descriptor {t} is not one the plan keeps"
            )));
        }
    }
    Ok(())
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
    // The daemon never sends more than fits; if it did, the descriptors
    // past the space were closed by the kernel and the request is refused.
    if msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
    {
        return Err(nix::errno::Errno::EMSGSIZE);
    }
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

/// In the forked launcher: its pid to the daemon and the daemon's go, the
/// descriptors in place, then the launch.
fn launcher(
    req: &Request,
    fds: &[OwnedFd],
    filters: &seccomp::Filters,
    parent: libc::pid_t,
) -> Result<i32, JailError> {
    {
        use std::io::{Read, Write};
        let mut go = std::fs::File::from(
            fds[2]
                .try_clone()
                .map_err(|e| JailError::os("the go channel", e))?,
        );
        // SAFETY: getpid cannot fail.
        let me = unsafe { libc::getpid() };
        // The daemon reads it only if the zygote failed to answer; when it
        // has its go already sent and its end closed, this write fails,
        // and the go is still there to read.
        let _ = go.write_all(&me.to_le_bytes());
        let mut byte = [0u8; 1];
        if go.read_exact(&mut byte).is_err() || byte[0] != b'g' {
            // The daemon gave this launch up: no grain.
            std::process::exit(125);
        }
    }
    let fds: Vec<&OwnedFd> = fds
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .map(|(_, f)| f)
        .collect();
    let targets: Vec<i32> = [1, 2]
        .into_iter()
        .chain(req.targets.iter().copied())
        .collect();
    // First every source above every target, so that no dup2 below
    // replaces a source another move still needs.
    let floor = targets.iter().copied().max().unwrap_or(2) + 1;
    let mut high = Vec::with_capacity(fds.len());
    for fd in &fds {
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
    // The zygote's socket, the go channel, the received copies and the
    // moved ones all go: only the plan's descriptors stay.
    close_inherited_fds(&req.plan.keep_fds)?;
    null_stdin()?;
    die_with_parent(Some(parent))?;
    super::launch_with(&req.plan, filters)
}
