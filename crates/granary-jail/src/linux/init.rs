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
    loop {
        // SAFETY: `info` is written by sigwaitinfo; `waited` is initialised.
        let sig = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::sigwaitinfo(waited, &mut info)
        };
        match sig {
            libc::SIGCHLD => {
                if let Some(status) = super::reap(app) {
                    // SAFETY: leaving pid 1 ends the grain, which is the point.
                    unsafe { libc::_exit(status) };
                }
            }
            libc::SIGTERM | libc::SIGINT | libc::SIGHUP => {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(app, sig) };
            }
            _ => {}
        }
    }
}
