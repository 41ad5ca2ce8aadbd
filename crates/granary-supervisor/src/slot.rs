//! One grain as the supervisor knows it: its slot, the phase it is in
//! (stopped, starting, running, stopping, waiting out a backoff, or held
//! after a crash loop or a flood), and what keeps it awake.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::os::unix::net::UnixStream as StdStream;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use futures::future::Shared;
use granary_grains::GrainStatus;
use granary_schema::grain_capnp::grain;
use tokio::io::unix::AsyncFd;

pub(crate) const LOG_KEEP: u32 = 3;
pub(crate) const LOG_FILE_BYTES: u64 = 1 << 20;
/// Connections one grain may have open at once.
pub(crate) const MAX_CONNECTIONS: usize = 512;

pub(crate) type StartFuture = Shared<Pin<Box<dyn Future<Output = Result<Rc<Running>, String>>>>>;
pub(crate) type StopFuture = Shared<Pin<Box<dyn Future<Output = ()>>>>;

#[derive(Clone)]
pub(crate) enum Phase {
    Stopped,
    Starting(StartFuture),
    Running(Rc<Running>),
    Stopping(StopFuture),
    /// Crashed; restarts at `until`.
    Backoff {
        until: tokio::time::Instant,
    },
    /// Crash loop or flood: stays stopped until an admin starts it.
    Held {
        reason: String,
    },
}

/// One grain the supervisor knows.
pub(crate) struct Slot {
    pub(crate) id: String,
    pub(crate) user: String,
    pub(crate) kind: String,
    pub(crate) host_uid: u32,
    /// Every task of this grain (start, channel, exit, idle watch, stop)
    /// runs in it, so what is logged for it carries its fields.
    pub(crate) span: tracing::Span,
    pub(crate) phase: RefCell<Phase>,
    pub(crate) starts: Cell<u64>,
    pub(crate) crashes: RefCell<VecDeque<Instant>>,
    pub(crate) crash_total: Cell<u64>,
    pub(crate) last_exit: RefCell<Option<String>>,
    /// Memory-limit kills in runs that ended.
    pub(crate) oom_kills_before: Cell<u64>,
    pub(crate) memory_limit: Cell<Option<u64>>,
}

/// What keeps a grain awake, and what it has in flight.
#[derive(Default)]
pub(crate) struct Activity {
    /// Calls into the grain (through membranes, `accept`) and open
    /// connections.
    pub(crate) inbound: Cell<usize>,
    pub(crate) connections: Cell<usize>,
    /// Calls the grain made that the host has not answered.
    pub(crate) outbound: Cell<usize>,
    /// Calls refused for the in-flight bound in the current window.
    pub(crate) refused: Cell<u64>,
    pub(crate) refused_since: Cell<Option<Instant>>,
    /// `log` calls in the current window.
    logged: Cell<u64>,
    logged_since: Cell<Option<Instant>>,
    pub(crate) wake_locks: RefCell<Vec<(u64, String)>>,
    next_lock: Cell<u64>,
    pub(crate) last: Cell<Option<Instant>>,
}

/// Counts one unit of activity while alive.
pub(crate) struct Busy {
    activity: Rc<Activity>,
    kind: BusyKind,
}

#[derive(Clone, Copy)]
pub(crate) enum BusyKind {
    Inbound,
    Outbound,
    Connection,
}

impl Busy {
    fn counter(&self) -> &Cell<usize> {
        match self.kind {
            BusyKind::Inbound => &self.activity.inbound,
            BusyKind::Outbound => &self.activity.outbound,
            BusyKind::Connection => &self.activity.connections,
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let c = self.counter();
        c.set(c.get().saturating_sub(1));
        self.activity.last.set(Some(Instant::now()));
    }
}

/// Refusals for the in-flight bound are counted over this window; a grain
/// refused `flood_cutoff` times within it is cut off.
pub(crate) const FLOOD_WINDOW: Duration = Duration::from_secs(10);
/// `Host.log` calls a grain may make per window; the rest are dropped.
pub(crate) const LOG_LINES_PER_WINDOW: u64 = 2000;

/// Counts one event in a fixed window starting at the first event.
fn count_in_window(count: &Cell<u64>, since: &Cell<Option<Instant>>, window: Duration) -> u64 {
    let now = Instant::now();
    if since.get().is_none_or(|t| now.duration_since(t) > window) {
        since.set(Some(now));
        count.set(0);
    }
    count.set(count.get() + 1);
    count.get()
}

impl Activity {
    /// Records a refused call; returns the refusals in the current window.
    pub(crate) fn refuse(&self) -> u64 {
        count_in_window(&self.refused, &self.refused_since, FLOOD_WINDOW)
    }

    /// Whether another log line may be written now; exactly one `false`
    /// per window is `Some(false)` (to say lines are being dropped).
    pub(crate) fn may_log(&self) -> Option<bool> {
        let n = count_in_window(&self.logged, &self.logged_since, FLOOD_WINDOW);
        match n.cmp(&(LOG_LINES_PER_WINDOW + 1)) {
            std::cmp::Ordering::Less => Some(true),
            std::cmp::Ordering::Equal => Some(false),
            std::cmp::Ordering::Greater => None,
        }
    }

    pub(crate) fn start(self: &Rc<Self>, kind: BusyKind) -> Busy {
        let b = Busy {
            activity: self.clone(),
            kind,
        };
        b.counter().set(b.counter().get() + 1);
        self.last.set(Some(Instant::now()));
        b
    }
    pub(crate) fn busy(self: &Rc<Self>) -> Busy {
        self.start(BusyKind::Inbound)
    }
    pub(crate) fn outbound_call(self: &Rc<Self>) -> Busy {
        self.start(BusyKind::Outbound)
    }
    pub(crate) fn add_wake_lock(&self, reason: String) -> u64 {
        let id = self.next_lock.get() + 1;
        self.next_lock.set(id);
        self.wake_locks.borrow_mut().push((id, reason));
        id
    }
    pub(crate) fn release_wake_lock(&self, id: u64) {
        self.wake_locks.borrow_mut().retain(|(i, _)| *i != id);
        self.last.set(Some(Instant::now()));
    }
    pub(crate) fn idle_for(&self) -> Option<Duration> {
        if self.inbound.get() > 0
            || self.outbound.get() > 0
            || self.connections.get() > 0
            || !self.wake_locks.borrow().is_empty()
        {
            return None;
        }
        self.last.get().map(|t| t.elapsed())
    }
}

/// A running grain.
pub(crate) struct Running {
    pub(crate) id: String,
    pub(crate) generation: u64,
    pub(crate) pid: u32,
    pub(crate) grain: grain::Client,
    pub(crate) activity: Rc<Activity>,
    /// The app's own idle timeout, if its manifest sets one.
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) side: AsyncFd<StdStream>,
    pub(crate) next_token: Cell<u64>,
    pub(crate) started: SystemTime,
    pub(crate) stopping: Cell<bool>,
    /// Why the channel ended, if it ended before the process did.
    pub(crate) channel_end: RefCell<Option<String>>,
    pub(crate) exited: tokio::sync::watch::Receiver<bool>,
    /// The grain's cgroup is kept across runs: its memory-limit kill count
    /// when this run started, and this run's kills seen so far.
    pub(crate) oom_baseline: u64,
    pub(crate) oom_seen: Cell<u64>,
    /// The chat grain's `xmpp.deliver`, asked for once per run.
    pub(crate) xmpp_deliver: RefCell<Option<capnp::capability::Client>>,
}

impl Running {
    /// Signals the launcher unless it has been reaped already (its pid
    /// could then belong to someone else). Reaping and marking `exited`
    /// happen in one poll of the exit monitor, so this check is enough.
    pub(crate) fn signal(&self, sig: libc::c_int) {
        if !*self.exited.borrow() {
            crate::lifecycle::signal(self.pid, sig);
        }
    }

    /// Kills the whole grain now.
    pub(crate) fn kill(&self) {
        self.stopping.set(true);
        self.signal(libc::SIGKILL);
    }
}

/// Counts a connection as activity of its grain while alive.
pub struct ConnectionGuard(#[allow(dead_code)] pub(crate) Busy);

impl Slot {
    pub(crate) fn running(&self) -> Option<Rc<Running>> {
        match &*self.phase.borrow() {
            Phase::Running(r) => Some(r.clone()),
            _ => None,
        }
    }

    /// Holds the grain stopped; returns what was running, for the caller
    /// to kill.
    pub(crate) fn hold(&self, reason: String) -> Option<Rc<Running>> {
        let previous = std::mem::replace(&mut *self.phase.borrow_mut(), Phase::Held { reason });
        match previous {
            Phase::Running(r) => Some(r),
            _ => None,
        }
    }

    /// Starting, running or stopping: processes may exist.
    pub(crate) fn is_live(&self) -> bool {
        matches!(
            *self.phase.borrow(),
            Phase::Starting(_) | Phase::Running(_) | Phase::Stopping(_)
        )
    }

    pub(crate) fn is_held(&self) -> bool {
        matches!(*self.phase.borrow(), Phase::Held { .. })
    }

    pub(crate) fn clear_hold(&self) {
        let mut phase = self.phase.borrow_mut();
        if matches!(*phase, Phase::Held { .. } | Phase::Backoff { .. }) {
            *phase = Phase::Stopped;
        }
    }

    pub(crate) fn status(&self) -> GrainStatus {
        let phase = self.phase.borrow().clone();
        let (state, reason) = match &phase {
            Phase::Stopped => ("stopped", None),
            Phase::Starting(_) => ("starting", None),
            Phase::Running(_) => ("running", None),
            Phase::Stopping(_) => ("stopping", None),
            Phase::Backoff { until } => (
                "backoff",
                Some(format!(
                    "restarting in {} ms after a crash",
                    until
                        .saturating_duration_since(tokio::time::Instant::now())
                        .as_millis()
                )),
            ),
            Phase::Held { reason } => ("held", Some(reason.clone())),
        };
        let running = self.running();
        GrainStatus {
            id: self.id.clone(),
            user: self.user.clone(),
            kind: self.kind.clone(),
            host_uid: self.host_uid,
            state: state.to_owned(),
            reason,
            pid: running.as_ref().map(|r| r.pid),
            starts: self.starts.get(),
            crashes: self.crash_total.get(),
            last_exit: self.last_exit.borrow().clone(),
            running_seconds: running
                .as_ref()
                .and_then(|r| r.started.elapsed().ok())
                .map(|d| d.as_secs()),
            connections: running.as_ref().map_or(0, |r| r.activity.connections.get()),
            calls_in_flight: running
                .as_ref()
                .map_or(0, |r| r.activity.inbound.get() + r.activity.outbound.get()),
            wake_locks: running.map_or_else(Vec::new, |r| {
                r.activity
                    .wake_locks
                    .borrow()
                    .iter()
                    .map(|(_, why)| why.clone())
                    .collect()
            }),
            oom_kills: self.oom_kills_before.get() + self.running().map_or(0, |r| r.oom_seen.get()),
            memory_limit: self.memory_limit.get(),
            memory_bytes: None,
            cpu_seconds: None,
        }
    }

    /// Run `r` ended: its kills join the earlier runs'.
    pub(crate) fn fold_oom_kills(&self, r: &Running) {
        let seen = r.oom_seen.replace(0);
        self.oom_kills_before
            .set(self.oom_kills_before.get() + seen);
    }
}
