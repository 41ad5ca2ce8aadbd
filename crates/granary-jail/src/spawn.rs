//! The daemon side: starting launchers.
//!
//! The parent-death signal the launcher sets fires when the *thread* that
//! forked it exits, so launchers are spawned from one long-lived thread
//! ([`Spawner`]), never from short-lived async worker threads.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use crate::Plan;

/// One launch: the plan, where the app's output goes, and descriptors to
/// hand over at given numbers (e.g. the capnp socket as 3).
pub struct LaunchRequest {
    pub plan: Plan,
    pub stdout: Stdio,
    pub stderr: Stdio,
    pub fds: Vec<(OwnedFd, i32)>,
}

type Reply = mpsc::Sender<io::Result<Child>>;

/// A thread that lives as long as the daemon and forks every launcher.
pub struct Spawner {
    requests: mpsc::Sender<(LaunchRequest, Reply)>,
}

impl Spawner {
    pub fn new(launcher: PathBuf) -> io::Result<Spawner> {
        let (tx, rx) = mpsc::channel::<(LaunchRequest, Reply)>();
        std::thread::Builder::new()
            .name("grain-spawner".to_owned())
            .spawn(move || {
                for (request, reply) in rx {
                    let _ = reply.send(spawn_launcher(&launcher, request));
                }
            })?;
        Ok(Spawner { requests: tx })
    }

    pub fn spawn(&self, request: LaunchRequest) -> io::Result<Child> {
        let (tx, rx) = mpsc::channel();
        self.requests
            .send((request, tx))
            .map_err(|_| io::Error::other("the spawner thread is gone"))?;
        rx.recv()
            .map_err(|_| io::Error::other("the spawner thread is gone"))?
    }
}

/// Forks and execs the launcher with `request`. Call it from a thread that
/// outlives the grain (see [`Spawner`]).
pub fn spawn_launcher(launcher: &std::path::Path, request: LaunchRequest) -> io::Result<Child> {
    let plan = serde_json::to_string(&request.plan).map_err(io::Error::other)?;
    let mut cmd = Command::new(launcher);
    cmd.arg("--plan-json")
        .arg(plan)
        .arg("--parent-pid")
        .arg(std::process::id().to_string())
        .env_clear()
        .stdin(Stdio::null())
        .stdout(request.stdout)
        .stderr(request.stderr);
    let moves: Vec<(i32, i32)> = request
        .fds
        .iter()
        .map(|(fd, to)| (fd.as_raw_fd(), *to))
        .collect();
    // SAFETY: the closure runs between fork and exec and only calls dup2
    // and fcntl, which are async-signal-safe; it touches no locks or heap.
    unsafe {
        cmd.pre_exec(move || {
            for (from, to) in &moves {
                if from == to {
                    if libc::fcntl(*from, libc::F_SETFD, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(*from, *to) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn();
    drop(request.fds);
    child
}
