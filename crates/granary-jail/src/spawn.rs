//! The daemon side: starting launchers.
//!
//! On Linux one zygote (`granary-launcher --zygote`, see
//! [`crate::linux::zygote`]) forks every launcher, so a grain start costs
//! no exec; elsewhere, or if the zygote cannot start, each launcher is
//! forked and exec'd here. Either way the launcher is this process's child.
//!
//! The parent-death signal the launcher sets fires when the *thread* that
//! forked it (or, for the zygote's, that forked the zygote) exits, so both
//! are done from one long-lived thread ([`Spawner`]), never from
//! short-lived async worker threads.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;

use crate::Plan;

/// One launch: the plan, where the app's output goes, and descriptors to
/// hand over at given numbers (e.g. the capnp socket as 3).
pub struct LaunchRequest {
    pub plan: Plan,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub fds: Vec<(OwnedFd, i32)>,
}

/// A running launcher: a child of this process, waited for by pid.
#[derive(Debug)]
pub struct Launched {
    pid: libc::pid_t,
    status: Option<ExitStatus>,
}

impl Launched {
    pub fn id(&self) -> u32 {
        self.pid as u32
    }

    /// The exit status if it has ended (reaping it), else `None`.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.reap(libc::WNOHANG)
    }

    /// Waits for the end and reaps it.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.reap(0)? {
                return Ok(status);
            }
        }
    }

    /// SIGKILL, unless it was already reaped (its pid may be another's).
    pub fn kill(&mut self) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        // SAFETY: kill takes plain numbers; the pid is our unreaped child.
        if unsafe { libc::kill(self.pid, libc::SIGKILL) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn reap(&mut self, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let mut raw = 0;
        loop {
            // SAFETY: waitpid on our own child with a valid status pointer.
            let rc = unsafe { libc::waitpid(self.pid, &mut raw, flags) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if rc == 0 {
                return Ok(None);
            }
            let status = ExitStatus::from_raw(raw);
            self.status = Some(status);
            return Ok(Some(status));
        }
    }

    /// Takes over a child std spawned (std never reaps on drop).
    fn from_child(child: Child) -> Launched {
        Launched {
            pid: child.id() as libc::pid_t,
            status: None,
        }
    }
}

type Reply = mpsc::Sender<io::Result<Launched>>;

/// A thread that lives as long as the daemon and starts every launcher.
pub struct Spawner {
    requests: mpsc::Sender<(LaunchRequest, Reply)>,
}

impl Spawner {
    pub fn new(launcher: PathBuf) -> io::Result<Spawner> {
        let (tx, rx) = mpsc::channel::<(LaunchRequest, Reply)>();
        std::thread::Builder::new()
            .name("grain-spawner".to_owned())
            .spawn(move || {
                #[cfg(target_os = "linux")]
                let mut zygote = Zygote::start(&launcher).ok();
                for (request, reply) in rx {
                    #[cfg(target_os = "linux")]
                    let launched = launch_linux(&launcher, &mut zygote, request);
                    #[cfg(not(target_os = "linux"))]
                    let launched = spawn_launcher(&launcher, request).map(Launched::from_child);
                    let _ = reply.send(launched);
                }
            })?;
        Ok(Spawner { requests: tx })
    }

    pub fn spawn(&self, request: LaunchRequest) -> io::Result<Launched> {
        let (tx, rx) = mpsc::channel();
        self.requests
            .send((request, tx))
            .map_err(|_| io::Error::other("the spawner thread is gone"))?;
        rx.recv()
            .map_err(|_| io::Error::other("the spawner thread is gone"))?
    }
}

/// Through the zygote; a zygote that died is replaced once, and without
/// one the launcher is exec'd as before.
#[cfg(target_os = "linux")]
fn launch_linux(
    launcher: &std::path::Path,
    zygote: &mut Option<Zygote>,
    request: LaunchRequest,
) -> io::Result<Launched> {
    for _ in 0..2 {
        if zygote.is_none() {
            *zygote = Zygote::start(launcher).ok();
        }
        let Some(z) = zygote.as_mut() else { break };
        match z.launch(&request) {
            Ok(launched) => return Ok(launched),
            // The zygote answered: the launch itself failed.
            Err(ZygoteError::Refused(e)) => return Err(e),
            // It died with the request in hand: it may have forked the
            // launcher already, so this launch is not tried again.
            Err(ZygoteError::Lost(e)) => {
                *zygote = None;
                return Err(io::Error::other(format!(
                    "the launcher zygote died during the launch: {e}"
                )));
            }
            Err(ZygoteError::Gone(e)) => {
                eprintln!("granary: the launcher zygote is gone ({e}); starting another");
                *zygote = None;
            }
        }
    }
    spawn_launcher(launcher, request).map(Launched::from_child)
}

#[cfg(target_os = "linux")]
enum ZygoteError {
    /// It refused the launch.
    Refused(io::Error),
    /// It was gone before it got the request.
    Gone(io::Error),
    /// It went away after it got the request.
    Lost(io::Error),
}

/// The daemon's end of the zygote.
#[cfg(target_os = "linux")]
struct Zygote {
    socket: OwnedFd,
    process: Launched,
}

#[cfg(target_os = "linux")]
impl Zygote {
    fn start(launcher: &std::path::Path) -> io::Result<Zygote> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let theirs_raw = theirs.as_raw_fd();
        let mut cmd = Command::new(launcher);
        cmd.arg("--zygote")
            .arg("--parent-pid")
            .arg(std::process::id().to_string())
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // SAFETY: only dup2 runs between fork and exec (async-signal-safe).
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(theirs_raw, crate::linux::zygote::SOCKET_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(theirs);
        // A zygote that hangs must not hang grain starts: every exchange
        // with it has a deadline.
        let limit = nix::sys::time::TimeVal::new(ZYGOTE_PATIENCE.as_secs() as i64, 0);
        nix::sys::socket::setsockopt(&ours, nix::sys::socket::sockopt::ReceiveTimeout, &limit)?;
        nix::sys::socket::setsockopt(&ours, nix::sys::socket::sockopt::SendTimeout, &limit)?;
        let mut zygote = Zygote {
            socket: ours,
            process: Launched::from_child(child),
        };
        // Only a zygote that said it is ready is used (an old launcher
        // without --zygote, or one that failed to set up, is not).
        let mut answer = [0u8; 16];
        match nix::sys::socket::recv(
            zygote.socket.as_raw_fd(),
            &mut answer,
            nix::sys::socket::MsgFlags::empty(),
        ) {
            Ok(n) if &answer[..n] == crate::linux::zygote::READY => Ok(zygote),
            Ok(_) => Err(io::Error::other("the launcher zygote did not start")),
            Err(e) => {
                let _ = zygote.process.kill();
                Err(io::Error::other(format!(
                    "the launcher zygote did not start: {e}"
                )))
            }
        }
    }

    fn launch(&mut self, request: &LaunchRequest) -> Result<Launched, ZygoteError> {
        use nix::sys::socket::{AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType};
        use nix::sys::socket::{recv, sendmsg, socketpair};
        let (go, go_theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| ZygoteError::Refused(e.into()))?;
        let body = serde_json::to_vec(&crate::linux::zygote::Request {
            plan: request.plan.clone(),
            targets: request.fds.iter().map(|(_, to)| *to).collect(),
        })
        .map_err(|e| ZygoteError::Refused(io::Error::other(e)))?;
        if body.len() > crate::linux::zygote::MAX_REQUEST
            || request.fds.len() + 2 > crate::linux::zygote::MAX_FDS
        {
            return Err(ZygoteError::Refused(io::Error::other(
                "the plan is too large for the zygote",
            )));
        }
        let fds: Vec<i32> = [
            request.stdout.as_raw_fd(),
            request.stderr.as_raw_fd(),
            go_theirs.as_raw_fd(),
        ]
        .into_iter()
        .chain(request.fds.iter().map(|(fd, _)| fd.as_raw_fd()))
        .collect();
        let gone = |e: nix::errno::Errno| match e {
            nix::errno::Errno::EMSGSIZE | nix::errno::Errno::ETOOMANYREFS => {
                ZygoteError::Refused(io::Error::from(e))
            }
            e => ZygoteError::Gone(io::Error::from(e)),
        };
        let fd = self.socket.as_raw_fd();
        loop {
            match sendmsg::<()>(
                fd,
                &[io::IoSlice::new(&body)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => {
                    other.map_err(gone)?;
                    break;
                }
            }
        }
        drop(go_theirs);
        let mut answer = [0u8; 4096];
        let n = loop {
            match recv(fd, &mut answer, MsgFlags::empty()) {
                Err(nix::errno::Errno::EINTR) => continue,
                // It died with the request unread: nothing was forked.
                Err(nix::errno::Errno::ECONNRESET) => {
                    return Err(ZygoteError::Gone(io::Error::other("it died")));
                }
                Err(e) => {
                    // A zygote past its deadline is not waited for again.
                    let _ = self.process.kill();
                    return Err(self.lost(go, e.into()));
                }
                Ok(0) => {
                    return Err(self.lost(go, io::Error::other("it closed its socket")));
                }
                Ok(n) => break n,
            }
        };
        let text = String::from_utf8_lossy(&answer[..n]);
        if let Some(pid) = text.strip_prefix("ok ").and_then(|p| p.parse().ok()) {
            // The launcher waits for this before it starts the grain; if
            // it is gone already, its status tells the supervisor why.
            let _ = std::io::Write::write_all(&mut std::fs::File::from(go), b"g");
            return Ok(Launched { pid, status: None });
        }
        Err(ZygoteError::Refused(io::Error::other(
            text.strip_prefix("err ").unwrap_or(&text).to_owned(),
        )))
    }
}

#[cfg(target_os = "linux")]
impl Zygote {
    /// The zygote went away with a request in hand. If it had forked a
    /// launcher, that one has told `go` its pid and waits for a go that
    /// never comes: closing `go` ends it, and it is reaped here, so a
    /// launch given up never runs a grain and leaves no zombie.
    fn lost(&mut self, go: OwnedFd, why: io::Error) -> ZygoteError {
        use std::io::Read;
        let limit = nix::sys::time::TimeVal::new(ZYGOTE_PATIENCE.as_secs() as i64, 0);
        let _ =
            nix::sys::socket::setsockopt(&go, nix::sys::socket::sockopt::ReceiveTimeout, &limit);
        let mut go = std::fs::File::from(go);
        let mut pid = [0u8; 4];
        if go.read_exact(&mut pid).is_ok() {
            drop(go);
            let _ = Launched {
                pid: libc::pid_t::from_le_bytes(pid),
                status: None,
            }
            .wait();
        }
        ZygoteError::Lost(why)
    }
}

/// How long the daemon waits for the zygote at any one step.
#[cfg(target_os = "linux")]
const ZYGOTE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

#[cfg(target_os = "linux")]
impl Drop for Zygote {
    /// Closing the socket ends the zygote (killed too, in case it hangs:
    /// it holds no state); it is reaped here.
    fn drop(&mut self) {
        let _ =
            nix::sys::socket::shutdown(self.socket.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let _ = self.process.kill();
        let _ = self.process.wait();
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
        .stdout(Stdio::from(request.stdout))
        .stderr(Stdio::from(request.stderr));
    let moves: Vec<(i32, i32)> = request
        .fds
        .iter()
        .map(|(fd, to)| (fd.as_raw_fd(), *to))
        .collect();
    // Every source is first copied above every target, so that no dup2
    // replaces a source a later move still needs (a source numbered 3 with
    // another descriptor going to 3).
    let floor = moves.iter().map(|(_, to)| *to).max().unwrap_or(2).max(63) + 1;
    let mut high = vec![0i32; moves.len()];
    // SAFETY: the closure runs between fork and exec and only calls dup2
    // and fcntl, which are async-signal-safe; it touches no locks and does
    // not allocate (`high` is made before the fork).
    unsafe {
        cmd.pre_exec(move || {
            for ((from, _), slot) in moves.iter().zip(high.iter_mut()) {
                *slot = libc::fcntl(*from, libc::F_DUPFD_CLOEXEC, floor);
                if *slot < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            for ((_, to), from) in moves.iter().zip(high.iter()) {
                if libc::dup2(*from, *to) < 0 {
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
