//! The grain's init (pid 1): reaps every child, forwards termination
//! signals to the app, and exits with the app's status. Signals are taken
//! synchronously with `sigwaitinfo`, so there are no handlers and no shared
//! state.

/// Runs until the app exits, then exits the process with its status; the
/// kernel then kills whatever else is left in the grain's pid namespace.
///
/// `_launcher` is our end of the launcher's `go` pipe, held open for the
/// grain's life so the launcher's death is visible at any point.
pub(crate) fn run(app: libc::pid_t, waited: &libc::sigset_t, _launcher: std::fs::File) -> ! {
    let status = forward_signals_until_exit(app, waited);
    // SAFETY: leaving pid 1 ends the grain, which is the point.
    unsafe { libc::_exit(status) }
}

/// Forwards SIGTERM, SIGINT and SIGHUP to `child`, reaps every child that
/// exits, and returns `child`'s status (as a shell would give it) once it
/// has exited. Used by the grain's init for the app, and by the launcher
/// for the grain's init.
pub(crate) fn forward_signals_until_exit(child: libc::pid_t, waited: &libc::sigset_t) -> i32 {
    loop {
        // SAFETY: `info` is written by sigwaitinfo; `waited` is initialised.
        let sig = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::sigwaitinfo(waited, &mut info)
        };
        match sig {
            libc::SIGCHLD => {
                if let Some(status) = reap(child) {
                    return status;
                }
            }
            libc::SIGTERM | libc::SIGINT | libc::SIGHUP => {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(child, sig) };
            }
            _ => {}
        }
    }
}

/// Reaps exited children without blocking; returns `pid`'s status once it
/// has exited.
fn reap(pid: libc::pid_t) -> Option<i32> {
    let mut result = None;
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer.
        let got = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if got <= 0 {
            return result;
        }
        if got == pid {
            result = Some(crate::shell_status(status));
        }
    }
}
