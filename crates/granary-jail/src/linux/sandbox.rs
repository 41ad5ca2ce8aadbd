//! The grain's first process (pid 1 of its pid namespace): finishes the
//! sandbox, then becomes the grain's init.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};

use super::{MSG_ERROR, MSG_NEED_MAPS, init, mount, seccomp};
use crate::cgroup::GrainCgroup;
use crate::{INSIDE_GID, INSIDE_UID, JailError, Plan};

/// Reports `err` to the launcher and exits. Never returns.
fn fail(report: &OwnedFd, err: JailError) -> ! {
    let mut msg = vec![MSG_ERROR];
    msg.extend_from_slice(err.to_string().as_bytes());
    // SAFETY: writing a buffer we own to a descriptor we hold, then
    // exiting without running destructors or atexit handlers (we are a
    // forked copy of the launcher).
    unsafe {
        libc::write(report.as_raw_fd(), msg.as_ptr().cast(), msg.len());
        libc::_exit(1)
    }
}

fn check(rc: libc::c_int, step: &str) -> Result<(), JailError> {
    if rc != 0 {
        return Err(JailError::last_os(step));
    }
    Ok(())
}

/// Entry point of the cloned child. Never returns.
pub(crate) fn child_main(
    plan: &Plan,
    filters: &seccomp::Filters,
    waited: &libc::sigset_t,
    cgroup: Option<&GrainCgroup>,
    rootless: bool,
    go: OwnedFd,
    report: OwnedFd,
) -> ! {
    let mut go = std::fs::File::from(go);
    if let Err(e) = setup(plan, cgroup, rootless, &mut go, &report) {
        fail(&report, e);
    }
    // Installed once, here: the app inherits the filters through fork, and
    // setsid, sigprocmask and execve are all on the allowlist.
    if let Err(e) = filters.install() {
        fail(&report, e);
    }
    let app = match spawn_app(plan, &report) {
        Ok(pid) => pid,
        Err(e) => fail(&report, e),
    };
    // The app's copy of the report pipe closes when it execs; ours closes
    // here, so the launcher sees EOF exactly when the app is running.
    drop(report);
    init::run(app, waited, go)
}

fn setup(
    plan: &Plan,
    cgroup: Option<&GrainCgroup>,
    rootless: bool,
    go: &mut std::fs::File,
    report: &OwnedFd,
) -> Result<(), JailError> {
    super::die_with_parent(None)?;
    let mut byte = [0u8; 1];
    if rootless {
        // Already in our user namespace; nothing works until it has maps.
        go.read_exact(&mut byte)
            .map_err(|e| JailError::os("waiting for id maps", e))?;
    }
    // Before the cgroup namespace is made, so that the grain's own cgroup
    // is its root.
    if let Some(cgroup) = cgroup {
        cgroup.join_current()?;
    }

    // SAFETY: unshare and sethostname take plain arguments; the hostname
    // buffer outlives the call.
    unsafe {
        check(
            libc::unshare(libc::CLONE_NEWCGROUP),
            "unshare cgroup namespace",
        )?;
        check(
            libc::sethostname(plan.hostname.as_ptr().cast(), plan.hostname.len()),
            "sethostname",
        )?;
    }
    // Read while the host's /proc is still there (the grain's shows no
    // global files).
    let last_cap: libc::c_ulong = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| JailError::new("cannot read /proc/sys/kernel/cap_last_cap"))?;
    mount::build_root(plan, rootless)?;

    if !rootless {
        // SAFETY: setgroups with an empty list; unshare with a plain flag.
        unsafe {
            check(
                libc::setgroups(0, std::ptr::null()),
                "clearing supplementary groups",
            )?;
            check(libc::unshare(libc::CLONE_NEWUSER), "unshare user namespace")?;
        }
        let mut report_file =
            std::fs::File::from(report.try_clone().map_err(|e| JailError::os("dup", e))?);
        report_file
            .write_all(&[MSG_NEED_MAPS])
            .map_err(|e| JailError::os("asking for id maps", e))?;
        go.read_exact(&mut byte)
            .map_err(|e| JailError::os("waiting for id maps", e))?;
    }

    // SAFETY: PR_CAPBSET_DROP with capability numbers up to the kernel's
    // last, then plain id and prctl calls with constant arguments.
    unsafe {
        // A new user namespace starts with a full bounding set, so it is
        // emptied here, while we still hold CAP_SETPCAP inside it.
        for cap in 0..=last_cap {
            check(
                libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0),
                "dropping the capability bounding set",
            )?;
        }
        check(
            libc::setresgid(INSIDE_GID, INSIDE_GID, INSIDE_GID),
            "setresgid",
        )?;
        check(
            libc::setresuid(INSIDE_UID, INSIDE_UID, INSIDE_UID),
            "setresuid",
        )?;
        check(
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ),
            "clearing ambient capabilities",
        )?;
        check(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            "setting no_new_privs",
        )?;
    }
    // Changing credentials cleared the parent-death signal: set it again,
    // then make sure the launcher did not die in between (it holds the
    // write end of `go` until the grain ends).
    super::die_with_parent(None)?;
    if launcher_gone(go) {
        return Err(JailError::new("the launcher exited during setup"));
    }
    drop_all_capabilities()?;
    set_rlimits(plan, rootless)?;
    std::env::set_current_dir("/var").map_err(|e| JailError::os("entering /var", e))?;
    Ok(())
}

/// True when the launcher's end of the `go` pipe has closed.
fn launcher_gone(go: &std::fs::File) -> bool {
    let mut pfd = libc::pollfd {
        fd: go.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

/// Empties the effective, permitted and inheritable sets (setresuid to a
/// non-zero uid already did; this makes it explicit and checked).
fn drop_all_capabilities() -> Result<(), JailError> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: header and two data structs as capset(2) version 3 expects.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(JailError::last_os("capset"));
    }
    Ok(())
}

fn set_rlimits(plan: &Plan, rootless: bool) -> Result<(), JailError> {
    let mut limits = vec![
        (libc::RLIMIT_NOFILE, plan.limits.nofile, "RLIMIT_NOFILE"),
        (libc::RLIMIT_CORE, 0, "RLIMIT_CORE"),
    ];
    if !rootless {
        // Counted per host uid, and every grain has its own: a second fence
        // behind pids.max. Without root the uid is the user's, whose other
        // processes count too, so it cannot be used.
        limits.push((libc::RLIMIT_NPROC, plan.limits.pids, "RLIMIT_NPROC"));
    }
    for (resource, value, name) in limits {
        let rl = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: `rl` is a valid rlimit.
        if unsafe { libc::setrlimit(resource, &rl) } != 0 {
            return Err(JailError::last_os(format!("setting {name}")));
        }
    }
    Ok(())
}

/// Forks the app (pid 2): a new session, default signal handling, then
/// exec (the seccomp filters are inherited from init). Returns its pid.
fn spawn_app(plan: &Plan, report: &OwnedFd) -> Result<libc::pid_t, JailError> {
    let args = crate::ExecArgs::new(plan)?;

    // SAFETY: pid 1 is single-threaded (a fork of the single-threaded
    // launcher), so the child may allocate and run ordinary code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(JailError::last_os("forking the app"));
    }
    if pid > 0 {
        return Ok(pid);
    }
    let result = (|| -> Result<(), JailError> {
        // SAFETY: setsid, signal and sigprocmask calls with valid arguments.
        unsafe {
            if libc::setsid() < 0 {
                return Err(JailError::last_os("setsid"));
            }
            for sig in super::WAITED_SIGNALS {
                libc::signal(*sig, libc::SIG_DFL);
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            check(
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()),
                "unblocking signals",
            )?;
        }
        Err(JailError::os(format!("exec {}", plan.argv[0]), args.exec()))
    })();
    match result {
        Ok(()) => unreachable!("execve returned without an error"),
        Err(e) => fail(report, e),
    }
}
