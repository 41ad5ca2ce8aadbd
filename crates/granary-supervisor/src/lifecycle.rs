//! Starting, stopping and connecting: how a grain moves between phases.
//! A start goes through the jail (its Cap'n Proto channel on fd 3, the
//! hand-off socket on fd 4); concurrent callers share one start; a crash
//! restarts it after a doubling backoff; an idle grain is stopped.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdStream;
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use capnp_rpc::rpc_twoparty_capnp::Side;
use futures::FutureExt;
use granary_grains::{AuthMethod, Identity, Peer, Problem};
use granary_jail::GrainSpec;
use granary_jail::grain_log::LogPolicy;
use granary_jail::spawn::LaunchRequest;
use granary_model::Manifest;
use granary_schema::grain_capnp::{self, grain};
use tokio::io::unix::AsyncFd;

use crate::host::HostImpl;
use crate::inner::{Inner, db};
use crate::slot::{
    Activity, BusyKind, ConnectionGuard, LOG_FILE_BYTES, LOG_KEEP, MAX_CONNECTIONS, Phase, Running,
    Slot,
};

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Registers an owned descriptor with the reactor.
fn async_fd<T: AsRawFd + Into<OwnedFd>>(inner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: `T` owns its descriptor and the `AsyncFd` owns `T` without
    // handing out mutable access, so the descriptor stays open and the same
    // until the `AsyncFd` is dropped.
    unsafe { AsyncFd::register(inner) }.map_err(|e| e.into_parts().1)
}

pub(crate) fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill has no memory effects; the pid is our own child, which
    // we have not reaped yet (the exit monitor reaps it), so it cannot have
    // been reused.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

fn socketpair(kind: nix::sys::socket::SockType) -> std::io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{AddressFamily, SockFlag};
    nix::sys::socket::socketpair(AddressFamily::Unix, kind, None, SockFlag::SOCK_CLOEXEC)
        .map_err(std::io::Error::from)
}

fn exit_text(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(125), _) => "the sandbox failed to start it (exit 125; see its log)".to_owned(),
        (Some(c), _) => format!("exit status {c}"),
        (_, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

impl Inner {
    /// The slot of a grain the state knows, made on first use.
    pub(crate) async fn slot(self: &Rc<Self>, grain: &str) -> Result<Rc<Slot>, Problem> {
        if let Some(s) = self.slots.borrow().get(grain) {
            return Ok(s.clone());
        }
        let id = grain.to_owned();
        let record = db(&self.params.store, move |s| s.grain(&id))
            .await?
            .ok_or(Problem::NoSuchGrain)?;
        Ok(self.slot_for(&record))
    }

    pub(crate) fn slot_for(self: &Rc<Self>, g: &granary_state::Grain) -> Rc<Slot> {
        self.slots
            .borrow_mut()
            .entry(g.id.clone())
            .or_insert_with(|| {
                Rc::new(Slot {
                    span: tracing::info_span!("grain", grain = %g.id, user = %g.user, kind = %g.kind),
                    id: g.id.clone(),
                    user: g.user.clone(),
                    kind: g.kind.clone(),
                    host_uid: g.host_uid,
                    phase: RefCell::new(Phase::Stopped),
                    starts: Cell::new(0),
                    crashes: RefCell::default(),
                    crash_total: Cell::new(0),
                    last_exit: RefCell::new(None),
                    oom_kills_before: Cell::new(0),
                    memory_limit: Cell::new(None),
                })
            })
            .clone()
    }

    /// Whether `grain` runs here, or is starting.
    pub(crate) fn is_up(&self, grain: &str) -> bool {
        self.slots
            .borrow()
            .get(grain)
            .is_some_and(|s| matches!(*s.phase.borrow(), Phase::Running(_) | Phase::Starting(_)))
    }

    /// The running grain, starting it if it is stopped. Concurrent callers
    /// share one start. A grain in backoff is waited for.
    pub(crate) async fn ensure_running(
        self: &Rc<Self>,
        grain: &str,
    ) -> Result<Rc<Running>, Problem> {
        let slot = self.slot(grain).await?;
        loop {
            let phase = slot.phase.borrow().clone();
            match phase {
                Phase::Running(r) => return Ok(r),
                Phase::Starting(f) => {
                    return f.await.map_err(Problem::Start);
                }
                Phase::Stopping(f) => f.await,
                Phase::Backoff { until } => tokio::time::sleep_until(until).await,
                Phase::Held { reason } => {
                    return Err(Problem::Held { reason });
                }
                Phase::Stopped if self.shutting_down.get() => return Err(Problem::Stopping),
                Phase::Stopped => {
                    let me = self.clone();
                    let s = slot.clone();
                    let span = s.span.clone();
                    let task = spawn_in(&span, async move {
                        let result = me.launch(&s).await;
                        let mut phase = s.phase.borrow_mut();
                        match &result {
                            Ok(r) => *phase = Phase::Running(r.clone()),
                            Err(e) => {
                                tracing::warn!(grain = %s.id, error = %e, "grain failed to start");
                                *s.last_exit.borrow_mut() = Some(e.clone());
                                *phase = Phase::Stopped;
                            }
                        }
                        result
                    });
                    let shared: Pin<Box<dyn Future<Output = _>>> =
                        Box::pin(task.map(|r| {
                            r.unwrap_or_else(|e| Err(format!("the start task failed: {e}")))
                        }));
                    *slot.phase.borrow_mut() = Phase::Starting(shared.shared());
                }
            }
        }
    }

    async fn launch(self: &Rc<Self>, slot: &Rc<Slot>) -> Result<Rc<Running>, String> {
        let kind = slot.kind.clone();
        let app = db(&self.params.store, move |s| s.app(&kind))
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no app of kind {} is installed", slot.kind))?;
        let manifest = Manifest::parse(&app.manifest).map_err(|e| e.to_string())?;
        let image: PathBuf = self.params.apps_dir.join(app.image_dir()).join("image");
        let dataset = self
            .params
            .datasets
            .create(&slot.id, slot.host_uid)
            .map_err(|e| e.to_string())?;
        if let Some(gate) = &self.params.start_gate {
            let exec = manifest.exec.first().cloned().unwrap_or_default();
            gate.admit(&slot.id, image.clone(), exec, self.params.datasets.clone())
                .await
                .map_err(|e| e.to_string())?;
        }

        // Read once: the grain and its route must agree on it.
        let domain = self
            .grain_domain(&slot.user, &slot.kind)
            .await
            .map_err(|e| format!("the owner's chat domain: {e}"))?;
        let mut limits = granary_jail::Limits::default();
        if let Some(m) = manifest.limits.memory_mib {
            limits.memory_bytes = m << 20;
        }
        if let Some(p) = manifest.limits.pids {
            limits.pids = p;
        }
        if let Some(w) = manifest.limits.cpu_weight {
            limits.cpu_weight = w;
        }
        let mut env = vec![
            "PATH=/usr/bin:/bin".to_owned(),
            "HOME=/var".to_owned(),
            format!("GRANARY_GRAIN={}", slot.id),
            // Whose grain this is (also `Host.info`), for apps that need
            // it before their first call.
            format!("GRANARY_OWNER={}", slot.user),
            // Granary's domain, so an app can write its users' addresses
            // (a chat grain gets its owner's chat domain).
            format!("GRANARY_DOMAIN={domain}"),
            // How many calls through the host it may have at once.
            format!("GRANARY_MAX_IN_FLIGHT={}", self.params.config.max_in_flight),
            format!("GRANARY_APP_VERSION={}", app.version),
            // So an app can tell its users what limit they hit.
            format!("GRANARY_MEMORY_MIB={}", limits.memory_bytes >> 20),
        ];
        slot.memory_limit.set(Some(limits.memory_bytes));
        if let Some(extra) = self.params.config.kind_env.get(&slot.kind) {
            env.extend(extra.iter().cloned());
        }
        // The manifest's own entries come last and win.
        env.extend(manifest.env.iter().cloned());
        let spec = GrainSpec {
            grain: slot.id.clone(),
            image,
            dataset,
            host_uid: slot.host_uid,
            argv: manifest.exec.clone(),
            env,
            keep_fds: vec![3, 4],
            limits,
        };

        // Data last used by another version (or none) is migrated first.
        let id = slot.id.clone();
        let migrated = db(&self.params.store, move |s| s.grain_app_version(&id))
            .await
            .map_err(|e| e.to_string())?;
        if migrated != app.version {
            if !manifest.migrate.is_empty() {
                self.migrate(slot, &spec, &manifest.migrate, &migrated, &app.version)
                    .await?;
            }
            let (id, version) = (slot.id.clone(), app.version.clone());
            db(&self.params.store, move |s| {
                s.retrying(|s| s.set_grain_app_version(&id, &version))
            })
            .await
            .map_err(|e| e.to_string())?;
        }
        let mut plan = self.params.jail.plan(&spec).map_err(|e| e.to_string())?;
        // The grain's cgroup is kept across its runs (removed when the grain
        // is deleted or the daemon stops), so what it counted outlives the
        // processes; this run counts from where it stands.
        plan.keep_cgroup = true;
        let oom_baseline = self
            .params
            .jail
            .cgroup
            .as_ref()
            .and_then(|d| {
                granary_jail::cgroup::oom_kills(d, &self.params.jail.cgroup_parent, &slot.id)
            })
            .unwrap_or(0);

        let (host_rpc, grain_rpc) = socketpair(nix::sys::socket::SockType::Stream)
            .map_err(|e| format!("socketpair: {e}"))?;
        let (host_side, grain_side) = socketpair(nix::sys::socket::SockType::SeqPacket)
            .map_err(|e| format!("socketpair: {e}"))?;
        let (log_write, log_write2, host_log) = self.log_pipe(&slot.id)?;

        let child = self
            .spawner
            .spawn(LaunchRequest {
                plan,
                stdout: log_write,
                stderr: log_write2,
                fds: vec![(grain_rpc, 3), (grain_side, 4)],
            })
            .map_err(|e| format!("spawning the launcher: {e}"))?;
        let pid = child.id();
        let pidfd = pidfd_open(pid).map_err(|e| format!("pidfd_open: {e}"))?;
        let pidfd = async_fd(pidfd).map_err(|e| format!("pidfd: {e}"))?;

        let rpc_stream = StdStream::from(host_rpc);
        rpc_stream
            .set_nonblocking(true)
            .map_err(|e| e.to_string())?;
        let rpc_stream = tokio::net::UnixStream::from_std(rpc_stream).map_err(|e| e.to_string())?;
        let side = StdStream::from(host_side);
        side.set_nonblocking(true).map_err(|e| e.to_string())?;
        let side = async_fd(side).map_err(|e| e.to_string())?;

        let generation = self.next_generation();
        let activity = Rc::new(Activity::default());
        activity.last.set(Some(Instant::now()));
        let host = HostImpl::new(self, slot, &app, activity.clone(), host_log, domain.clone());
        let host_client: granary_schema::host_capnp::host::Client = capnp_rpc::new_client(host);
        let mut system = crate::rpc::system(
            rpc_stream,
            Side::Client,
            Some(host_client.client),
            self.params.config.max_message_bytes,
        );
        let grain_client: grain::Client = system.bootstrap(Side::Server);
        let (exited_tx, exited) = tokio::sync::watch::channel(false);
        let running = Rc::new(Running {
            id: slot.id.clone(),
            generation,
            pid,
            grain: grain_client,
            activity,
            idle_timeout: manifest.idle_timeout_seconds.map(Duration::from_secs),
            side,
            next_token: Cell::new(0),
            started: SystemTime::now(),
            stopping: Cell::new(false),
            channel_end: RefCell::new(None),
            exited,
            oom_baseline,
            oom_seen: Cell::new(0),
            xmpp_deliver: RefCell::default(),
        });
        slot.starts.set(slot.starts.get() + 1);
        tracing::info!(grain = %slot.id, pid, generation, "grain started");

        // The RPC connection: when it ends while the grain still runs (a
        // message over the size limit, a protocol error, the grain closed
        // fd 3), the grain can no longer be reached: it is killed, and that
        // counts as a crash. Usually the process is exiting anyway.
        let weak_slot = Rc::downgrade(slot);
        spawn_in(&slot.span, async move {
            let result = system.await;
            let Some(slot) = weak_slot.upgrade() else {
                return;
            };
            let Some(r) = slot.running() else { return };
            if r.generation != generation || r.stopping.get() {
                return;
            }
            let why = match result {
                Ok(()) => "its channel closed".to_owned(),
                Err(e) => format!("its channel failed: {}", e.extra),
            };
            *r.channel_end.borrow_mut() = Some(why);
            if !wait_exit(&r, Duration::from_secs(1)).await {
                tracing::warn!(grain = %slot.id, "grain channel ended but the grain runs on; killing it");
                r.signal(libc::SIGKILL);
            }
        });

        // The exit monitor owns the child and reaps it.
        let weak_slot = Rc::downgrade(slot);
        let weak_running = Rc::downgrade(&running);
        let me = Rc::downgrade(self);
        spawn_in(&slot.span, async move {
            let mut child = child;
            let status = loop {
                match pidfd.readable().await {
                    Ok(mut guard) => {
                        guard.clear_ready();
                        match child.try_wait() {
                            Ok(Some(status)) => break Some(status),
                            Ok(None) => continue,
                            Err(_) => break None,
                        }
                    }
                    Err(_) => break child.wait().ok(),
                }
            };
            let (Some(slot), Some(inner)) = (weak_slot.upgrade(), me.upgrade()) else {
                let _ = exited_tx.send(true);
                return;
            };
            // This run's last count (its cgroup stays), then it joins the
            // earlier runs'; once `exited` is set nobody counts it again.
            if let Some(r) = weak_running.upgrade() {
                inner.count_oom_kills(&slot, &r);
                let _ = exited_tx.send(true);
                slot.fold_oom_kills(&r);
            } else {
                let _ = exited_tx.send(true);
            }
            inner.exited(&slot, generation, status);
        });
        self.watch_idle(slot, &running);
        Ok(running)
    }

    /// A pipe whose read end drains into the grain's log, and a packet
    /// socket pair for the host's own lines into the same log; returns the
    /// pipe's write end twice (the grain's stdout and stderr) and the
    /// host's end of the socket, on which `Host.log` lines are sent whole
    /// and without waiting.
    fn log_pipe(&self, grain: &str) -> Result<(OwnedFd, OwnedFd, OwnedFd), String> {
        let (log_read, log_write) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
        let log_write2 = log_write.try_clone().map_err(|e| format!("dup: {e}"))?;
        let (lines_read, host_end) = socketpair(nix::sys::socket::SockType::SeqPacket)
            .map_err(|e| format!("log socket: {e}"))?;
        granary_jail::grain_log::drain_with_lines(
            std::fs::File::from(log_read),
            Some(lines_read),
            LogPolicy {
                dir: self.log_dir(grain),
                max_file_bytes: LOG_FILE_BYTES,
                keep: LOG_KEEP,
            },
        )
        .map_err(|e| format!("grain log: {e}"))?;
        Ok((log_write, log_write2, host_end))
    }

    /// Runs the app's migration hook in the grain's sandbox (same image,
    /// dataset and uid, no host channel) and waits for it, within
    /// `call_timeout`.
    async fn migrate(
        &self,
        slot: &Slot,
        spec: &GrainSpec,
        hook: &[String],
        from: &str,
        to: &str,
    ) -> Result<(), String> {
        let mut spec = spec.clone();
        spec.argv = hook.to_vec();
        spec.keep_fds = Vec::new();
        spec.env.push(format!("GRANARY_PREVIOUS_VERSION={from}"));
        let plan = self.params.jail.plan(&spec).map_err(|e| e.to_string())?;
        let (out, err, _) = self.log_pipe(&slot.id)?;
        let mut child = self
            .spawner
            .spawn(LaunchRequest {
                plan,
                stdout: out,
                stderr: err,
                fds: Vec::new(),
            })
            .map_err(|e| format!("spawning the migration hook: {e}"))?;
        tracing::info!(grain = %slot.id, from, to, "running the app's migration hook");
        let pid = child.id();
        let pidfd = async_fd(pidfd_open(pid).map_err(|e| format!("pidfd_open: {e}"))?)
            .map_err(|e| format!("pidfd: {e}"))?;
        let waited = tokio::time::timeout(self.params.config.call_timeout, pidfd.readable()).await;
        if waited.is_err() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "the migration hook from {from:?} to {to} did not finish in time"
            ));
        }
        let status = child
            .wait()
            .map_err(|e| format!("waiting for the migration hook: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!(
                "the migration hook from {from:?} to {to} failed: {} (see `granary grain logs`)",
                exit_text(status)
            ))
        }
    }

    fn exited(
        self: &Rc<Self>,
        slot: &Rc<Slot>,
        generation: u64,
        status: Option<std::process::ExitStatus>,
    ) {
        self.exits.notify_one();
        let mut text = status.map_or_else(|| "unknown exit".to_owned(), exit_text);
        let running = slot.running();
        if let Some(why) = running
            .as_ref()
            .and_then(|r| r.channel_end.borrow().clone())
        {
            text = format!("{text} ({why})");
        }
        let (requested, current) = match &*slot.phase.borrow() {
            Phase::Running(r) => (r.stopping.get(), r.generation == generation),
            Phase::Stopping(_) => (true, true),
            Phase::Held { .. } => (true, true),
            _ => (true, false),
        };
        drop(running);
        if !current {
            return;
        }
        if requested {
            tracing::info!(grain = %slot.id, exit = %text, "grain stopped");
            if !matches!(*slot.phase.borrow(), Phase::Held { .. }) {
                *slot.phase.borrow_mut() = Phase::Stopped;
            }
            if slot.last_exit.borrow().is_none() {
                *slot.last_exit.borrow_mut() = Some(text);
            }
            return;
        }
        // A crash.
        let config = &self.params.config;
        slot.crash_total.set(slot.crash_total.get() + 1);
        *slot.last_exit.borrow_mut() = Some(text.clone());
        let now = Instant::now();
        let mut crashes = slot.crashes.borrow_mut();
        crashes.push_back(now);
        while crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > config.crash_window)
        {
            crashes.pop_front();
        }
        let n = crashes.len() as u32;
        if n >= config.crash_loop_crashes {
            let reason = format!(
                "crash loop: {n} crashes within {} s, the last {text}",
                config.crash_window.as_secs()
            );
            tracing::error!(grain = %slot.id, %reason, "grain held stopped");
            *slot.phase.borrow_mut() = Phase::Held { reason };
            return;
        }
        let delay = config
            .restart_backoff
            .saturating_mul(1 << (n - 1).min(16))
            .min(config.restart_backoff_max);
        tracing::warn!(grain = %slot.id, exit = %text, delay_ms = delay.as_millis() as u64, "grain crashed; restarting after backoff");
        let until = tokio::time::Instant::now() + delay;
        *slot.phase.borrow_mut() = Phase::Backoff { until };
        let me = self.clone();
        let span = slot.span.clone();
        let slot = slot.clone();
        spawn_in(&span, async move {
            tokio::time::sleep_until(until).await;
            let due = matches!(&*slot.phase.borrow(), Phase::Backoff { until: u } if *u == until);
            if due {
                *slot.phase.borrow_mut() = Phase::Stopped;
                if let Err(e) = me.ensure_running(&slot.id).await {
                    tracing::warn!(grain = %slot.id, error = %e, "restart after crash failed");
                }
            }
        });
    }

    fn watch_idle(self: &Rc<Self>, slot: &Rc<Slot>, running: &Rc<Running>) {
        let idle = running
            .idle_timeout
            .unwrap_or(self.params.config.idle_timeout);
        let tick = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(5));
        let me = Rc::downgrade(self);
        let span = slot.span.clone();
        let slot = Rc::downgrade(slot);
        let generation = running.generation;
        spawn_in(&span, async move {
            loop {
                tokio::time::sleep(tick).await;
                let (Some(inner), Some(slot)) = (me.upgrade(), slot.upgrade()) else {
                    return;
                };
                let Some(r) = slot.running() else { return };
                if r.generation != generation {
                    return;
                }
                inner.count_oom_kills(&slot, &r);
                if r.activity.idle_for().is_some_and(|d| d >= idle) {
                    tracing::info!(grain = %slot.id, idle_ms = idle.as_millis() as u64, "stopping idle grain");
                    inner.stop_slot(&slot).await;
                    return;
                }
            }
        });
    }

    /// Stops a grain: its `shutdown` call, SIGTERM, then SIGKILL of the
    /// whole tree (the launcher's death takes init and with it the grain's
    /// pid namespace). Returns whether it was running.
    pub(crate) async fn stop_slot(self: &Rc<Self>, slot: &Rc<Slot>) -> bool {
        self.stop_slot_with(slot, self.params.config.shutdown_grace)
            .await
    }

    /// [`Self::stop_slot`] with `grace` for the shutdown call and again
    /// for SIGTERM.
    pub(crate) async fn stop_slot_with(self: &Rc<Self>, slot: &Rc<Slot>, grace: Duration) -> bool {
        loop {
            let phase = slot.phase.borrow().clone();
            match phase {
                Phase::Stopped => return false,
                Phase::Backoff { .. } => {
                    *slot.phase.borrow_mut() = Phase::Stopped;
                    return false;
                }
                Phase::Held { .. } => return false,
                Phase::Starting(f) => {
                    let _ = f.await;
                }
                Phase::Stopping(f) => {
                    f.await;
                    return true;
                }
                Phase::Running(r) => {
                    r.stopping.set(true);
                    let slot2 = slot.clone();
                    let task = spawn_in(&slot.span, async move {
                        let mut request = r.grain.shutdown_request();
                        request.get().set_grace_millis(grace.as_millis() as u32);
                        let polite = tokio::time::timeout(grace, request.send().promise).await;
                        if !matches!(polite, Ok(Ok(_))) {
                            tracing::debug!(grain = %r.id, "no answer to shutdown");
                        }
                        // The app has finished its work (or had its
                        // chance); SIGTERM ends the process (the SDK exits
                        // on it), SIGKILL of the launcher ends the tree.
                        r.signal(libc::SIGTERM);
                        if !wait_exit(&r, grace).await {
                            tracing::warn!(grain = %r.id, "grain ignored SIGTERM; killing it");
                            r.signal(libc::SIGKILL);
                            wait_exit(&r, Duration::from_secs(30)).await;
                        }
                        if matches!(*slot2.phase.borrow(), Phase::Stopping(_)) {
                            *slot2.phase.borrow_mut() = Phase::Stopped;
                        }
                    });
                    let f: Pin<Box<dyn Future<Output = ()>>> = Box::pin(task.map(drop));
                    let f = f.shared();
                    *slot.phase.borrow_mut() = Phase::Stopping(f.clone());
                    f.await;
                    return true;
                }
            }
        }
    }

    /// Holds a grain stopped for `reason` and kills it if it runs.
    pub(crate) async fn hold_and_kill(self: &Rc<Self>, slot: &Rc<Slot>, reason: String) {
        loop {
            let phase = slot.phase.borrow().clone();
            match phase {
                Phase::Starting(f) => {
                    let _ = f.await;
                }
                Phase::Stopping(f) => f.await,
                _ => break,
            }
        }
        if let Some(r) = slot.hold(reason) {
            r.kill();
            wait_exit(&r, Duration::from_secs(30)).await;
        }
    }

    pub(crate) async fn connect(
        self: &Rc<Self>,
        grain: &str,
        service: &str,
        identity: Identity,
        peer: Peer,
    ) -> Result<crate::LocalConnection, Problem> {
        let running = self.ensure_running(grain).await?;
        if running.activity.connections.get() >= MAX_CONNECTIONS {
            return Err(Problem::Busy(format!(
                "{MAX_CONNECTIONS} connections are open already"
            )));
        }
        let busy = running.activity.start(BusyKind::Connection);
        let host = |what: &str, e: std::io::Error| Problem::Host(format!("{what}: {e}"));
        let (host_end, grain_end) =
            socketpair(nix::sys::socket::SockType::Stream).map_err(|e| host("socketpair", e))?;
        let token = running.next_token.get() + 1;
        running.next_token.set(token);
        loop {
            let mut guard = running
                .side
                .writable()
                .await
                .map_err(|e| host("hand-off socket", e))?;
            match guard
                .try_io(|s| crate::handoff::send_fd(s.get_ref(), token, grain_end.as_raw_fd()))
            {
                Ok(Ok(())) => break,
                // The grain closed its side: it is going away.
                Ok(Err(e)) => {
                    return Err(Problem::Grain(format!("handing over the connection: {e}")));
                }
                Err(_would_block) => continue,
            }
        }
        drop(grain_end);
        let mut request = running.grain.accept_request();
        {
            let mut p = request.get();
            p.set_service(service);
            let mut id = p.reborrow().init_identity();
            id.set_user(&identity.user);
            id.set_method(auth_method(identity.method));
            id.set_credential_id(identity.credential_id);
            let mut out = p.reborrow().init_peer();
            out.set_address(&peer.address);
            out.set_protocol(&peer.protocol);
            out.set_tls_version(&peer.tls_version);
            out.set_server_name(&peer.server_name);
            p.init_handoff().set_socket(token);
        }
        tokio::time::timeout(self.params.config.call_timeout, request.send().promise)
            .await
            .map_err(|_| Problem::Grain(format!("accept {service} timed out")))?
            .map_err(|e| Problem::Grain(format!("accept {service}: {e}")))?;
        let std = StdStream::from(host_end);
        std.set_nonblocking(true)
            .map_err(|e| host("the connection", e))?;
        let stream =
            tokio::net::UnixStream::from_std(std).map_err(|e| host("the connection", e))?;
        Ok(crate::LocalConnection {
            stream,
            guard: ConnectionGuard(busy),
        })
    }
}

/// Runs `work` on this thread in the grain's span.
fn spawn_in<F: Future + 'static>(
    span: &tracing::Span,
    work: F,
) -> tokio::task::JoinHandle<F::Output> {
    use tracing::Instrument;
    tokio::task::spawn_local(work.instrument(span.clone()))
}

/// The grain's view of how a client authenticated.
fn auth_method(m: AuthMethod) -> grain_capnp::AuthMethod {
    use grain_capnp::AuthMethod as Wire;
    match m {
        AuthMethod::Anonymous => Wire::Anonymous,
        AuthMethod::Password => Wire::Password,
        AuthMethod::AppPassword => Wire::AppPassword,
        AuthMethod::SshKey => Wire::SshKey,
        AuthMethod::ClientSecret => Wire::ClientSecret,
        AuthMethod::Admin => Wire::Admin,
    }
}

pub(crate) async fn wait_exit(r: &Running, within: Duration) -> bool {
    let mut exited = r.exited.clone();
    tokio::time::timeout(within, exited.wait_for(|e| *e))
        .await
        .is_ok()
}
