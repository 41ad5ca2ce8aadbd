//! Applying a [`Plan`] on Linux. Runs inside `granary-launcher`, a
//! single-threaded process started as root.
//!
//! ```text
//! launcher (host root)                 child = grain pid 1 (new mnt/pid/net/ipc/uts ns)
//!   create cgroup, compile seccomp
//!   clone ───────────────────────────▶ join the cgroup, unshare cgroup ns,
//!                                      hostname, build root, pivot_root,
//!                                      unshare user ns, ask for maps
//!   write uid/gid maps, "maps" ─────▶ drop bounding caps, become uid 1000,
//!                                      no_new_privs, rlimits, seccomp
//!                                      fork ─▶ app (pid 2): setsid, exec
//!                                      reap and forward signals
//!   EOF on the report pipe = exec'd
//!   forward signals, wait, remove cgroup
//! ```

mod fds;
mod init;
mod mount;
mod sandbox;
pub mod seccomp;
pub mod zygote;

use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use crate::cgroup::GrainCgroup;
use crate::{INSIDE_GID, INSIDE_UID, JailError, Plan};

pub use fds::{close_inherited_fds, null_stdin};

/// Namespaces the first clone creates. The user namespace comes later, after
/// the root is built, so that the mount, uts, ipc, net and cgroup
/// namespaces stay owned by the host's user namespace: the grain's root
/// cannot mount, set the hostname or configure the network even within its
/// own namespaces.
const CLONE_FLAGS: libc::c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS;

/// Messages on the child's report pipe.
const MSG_NEED_MAPS: u8 = b'M';
const MSG_ERROR: u8 = b'E';

pub(crate) fn pipe() -> Result<(OwnedFd, OwnedFd), JailError> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(JailError::last_os("pipe2"));
    }
    // SAFETY: pipe2 succeeded, so both are fresh descriptors we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the zeroed set; sigaddset takes valid
    // signal numbers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in signals {
            libc::sigaddset(&mut set, *s);
        }
        set
    }
}

/// Signals the launcher and the grain's init wait for synchronously.
pub(crate) const WAITED_SIGNALS: &[libc::c_int] =
    &[libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD];

fn block_waited_signals() -> Result<libc::sigset_t, JailError> {
    let set = signal_set(WAITED_SIGNALS);
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    if unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } != 0 {
        return Err(JailError::last_os("blocking signals"));
    }
    Ok(set)
}

/// Runs the grain described by `plan` and returns its exit status as a
/// shell would (the code, or 128 + the signal).
pub fn launch(plan: &Plan) -> Result<i32, JailError> {
    launch_with(plan, &seccomp::compile()?)
}

/// [`launch`] with the seccomp filters already compiled (the zygote
/// compiles them once for every grain it forks).
pub fn launch_with(plan: &Plan, filters: &seccomp::Filters) -> Result<i32, JailError> {
    let waited = block_waited_signals()?;
    // SAFETY: geteuid cannot fail.
    let rootless = unsafe { libc::geteuid() } != 0;
    if rootless {
        eprintln!(
            "granary-launcher: WARNING: not running as root, so grain {} runs as YOUR uid: \
             every grain started this way shares one host uid with the others and with you, \
             and has no cgroup limits. Fine for a laptop demo; run granary as root to isolate grains.",
            plan.grain
        );
    }
    let cgroup = match &plan.cgroup {
        Some(_) if rootless => None,
        Some(driver) => Some(GrainCgroup::create(
            driver,
            &plan.cgroup_parent,
            &plan.grain,
            &plan.limits,
        )?),
        None => None,
    };
    // A kept cgroup counts across runs: this run's kills are the difference.
    let oom_before = plan
        .cgroup
        .as_ref()
        .filter(|_| cgroup.is_some())
        .and_then(|d| crate::cgroup::oom_kills(d, &plan.cgroup_parent, &plan.grain))
        .unwrap_or(0);
    let result = run_grain(plan, filters, &waited, cgroup.as_ref(), rootless);
    if let Some(cgroup) = cgroup {
        // Said plainly in the grain's log before the count goes with the
        // cgroup.
        if let Some(driver) = &plan.cgroup
            && let Some(total) = crate::cgroup::oom_kills(driver, &plan.cgroup_parent, &plan.grain)
            && let kills = total.saturating_sub(oom_before)
            && kills > 0
        {
            eprintln!(
                "granary: grain {} reached its memory limit of {} MiB; the kernel killed a process in it {kills} time(s)",
                plan.grain,
                plan.limits.memory_bytes >> 20
            );
        }
        if !plan.keep_cgroup
            && let Err(e) = cgroup.remove(Duration::from_secs(5))
        {
            eprintln!("granary-launcher: {e}");
        }
    }
    result
}

fn run_grain(
    plan: &Plan,
    filters: &seccomp::Filters,
    waited: &libc::sigset_t,
    cgroup: Option<&GrainCgroup>,
    rootless: bool,
) -> Result<i32, JailError> {
    let (go_read, go_write) = pipe()?;
    // Without root, the user namespace comes first: it is what lets the
    // child mount at all.
    let flags = if rootless {
        CLONE_FLAGS | libc::CLONE_NEWUSER
    } else {
        CLONE_FLAGS
    };
    let (report_read, report_write) = pipe()?;

    // SAFETY: the launcher is single-threaded, so the child may run any
    // code. A null stack makes clone behave like fork: the child continues
    // on a copy of this stack.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_int>(),
            std::ptr::null_mut::<libc::c_int>(),
            0 as libc::c_ulong,
        )
    };
    if pid < 0 {
        return Err(JailError::last_os("clone into new namespaces"));
    }
    if pid == 0 {
        drop(go_write);
        drop(report_read);
        sandbox::child_main(
            plan,
            filters,
            waited,
            cgroup,
            rootless,
            go_read,
            report_write,
        );
    }
    let pid = pid as libc::pid_t;
    drop(go_read);
    drop(report_write);

    // `go` stays open until the grain ends: its closing tells the grain's
    // init that the launcher is gone.
    let go = match parent_setup(plan, pid, go_write, report_read, rootless) {
        Ok(go) => go,
        Err(e) => {
            // SAFETY: `pid` is our child; killing and reaping it is sound.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            return Err(e);
        }
    };
    let status = init::forward_signals_until_exit(pid, waited);
    drop(go);
    Ok(status)
}

fn parent_setup(
    plan: &Plan,
    pid: libc::pid_t,
    go: OwnedFd,
    report: OwnedFd,
    rootless: bool,
) -> Result<std::fs::File, JailError> {
    let mut go = std::fs::File::from(go);
    let mut report = std::fs::File::from(report);

    let mut first = [0u8; 1];
    let (uid, gid) = if rootless {
        // The child is already in its user namespace; it can only map the
        // invoking user's own ids.
        // SAFETY: geteuid and getegid cannot fail.
        unsafe { (libc::geteuid(), libc::getegid()) }
    } else {
        let n = read_retrying(&mut report, &mut first)?;
        match (n, first[0]) {
            (0, _) => return Err(JailError::new("the grain exited during setup")),
            (_, MSG_ERROR) => return Err(read_error(&mut report)),
            (_, MSG_NEED_MAPS) => {}
            (_, other) => return Err(JailError::new(format!("unexpected setup message {other}"))),
        }
        (plan.host_uid, plan.host_gid)
    };
    let proc = format!("/proc/{pid}");
    let write = |file: &str, text: String| {
        std::fs::write(format!("{proc}/{file}"), &text)
            .map_err(|e| JailError::os(format!("writing {text:?} to {proc}/{file}"), e))
    };
    write("setgroups", "deny".to_owned())?;
    write("uid_map", format!("{INSIDE_UID} {uid} 1\n"))?;
    write("gid_map", format!("{INSIDE_GID} {gid} 1\n"))?;
    go.write_all(b"m")
        .map_err(|e| JailError::os("sending the id maps", e))?;

    // EOF (the write ends close on exec) means the app is running.
    let n = read_retrying(&mut report, &mut first)?;
    match (n, first[0]) {
        (0, _) => Ok(go),
        (_, MSG_ERROR) => Err(read_error(&mut report)),
        (_, other) => Err(JailError::new(format!("unexpected setup message {other}"))),
    }
}

fn read_retrying(file: &mut std::fs::File, buf: &mut [u8]) -> Result<usize, JailError> {
    loop {
        match file.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(JailError::os("reading the grain's setup report", e)),
        }
    }
}

fn read_error(report: &mut std::fs::File) -> JailError {
    let mut text = String::new();
    let _ = report.read_to_string(&mut text);
    JailError::new(text.strip_prefix("jail: ").unwrap_or(&text).to_owned())
}

/// Sets the parent-death signal so this process dies with the one that
/// started it, and fails if that parent is already gone.
pub fn die_with_parent(expected_parent: Option<libc::pid_t>) -> Result<(), JailError> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } != 0 {
        return Err(JailError::last_os("setting the parent-death signal"));
    }
    // SAFETY: getppid cannot fail.
    let parent = unsafe { libc::getppid() };
    if let Some(expected) = expected_parent
        && parent != expected
    {
        return Err(JailError::new(format!(
            "the daemon (pid {expected}) exited before the grain started"
        )));
    }
    Ok(())
}
