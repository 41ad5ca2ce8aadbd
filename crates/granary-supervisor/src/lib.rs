//! The supervisor: grain lifecycle and the host side of each grain's
//! channel.
//!
//! A grain runs only while it is used. The first call for a stopped grain
//! starts it through the jail (its Cap'n Proto channel on fd 3, the
//! descriptor hand-off socket on fd 4) exactly once however many callers
//! arrive together; it stops after an idle time unless a wake lock or an
//! open connection keeps it up; a crash restarts it with exponential
//! backoff, and a crash loop stops it until an admin starts it again.
//!
//! Grains reach each other only through capabilities the owner granted
//! ([`Host.request`](granary_schema::host_capnp::host)): the host obtains the
//! object from the providing grain and hands the holder a [`membrane`] that
//! checks the grant on every call.
//!
//! Everything here is `!Send` (capnp-rpc objects are): the [`Supervisor`]
//! lives on one thread's `LocalSet`. The rest of the daemon reaches it
//! through [`LocalGrains`], the `Send` handle that implements
//! [`granary_grains::Grains`] by running each request on that thread.
//!
//! Rooms: `inner.rs` holds the one shared `Inner` and its bookkeeping;
//! `slot.rs` a grain's slot and its phases; `lifecycle.rs` start, stop,
//! crash and connect; `snapshots.rs` snapshots and the scheduler;
//! `grants.rs` membranes and offers; `host.rs` what each grain may call;
//! `local.rs` the thread and its `Send` handle.

#![allow(unsafe_code)] // pidfd_open, kill, and descriptors received with SCM_RIGHTS

mod grants;
mod host;
mod inner;
mod lifecycle;
mod local;
mod mail;
mod membrane;
mod rpc;
mod slot;
mod snapshots;
mod xmpp;

/// Connection hand-off; the same crate the SDK speaks.
pub use granary_handoff as handoff;

use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use granary_datasets::Datasets;
use granary_grains::{Connection, GrainError, GrainStatus, Identity, Peer, Problem};
use granary_jail::JailConfig;
use granary_state::Store;

pub use local::{LocalGrains, SupervisorThread};
pub use mail::MAIL_DELIVER;
pub use slot::ConnectionGuard;

use crate::inner::{Inner, db};
use crate::slot::Slot;

/// Timings and bounds; every one configurable so tests run in seconds.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// A running grain with no calls, connections or wake locks for this
    /// long is stopped.
    pub idle_timeout: Duration,
    /// Delay before the first restart after a crash; doubles per crash.
    pub restart_backoff: Duration,
    pub restart_backoff_max: Duration,
    /// This many crashes within `crash_window` is a crash loop: the grain
    /// stays stopped until an admin starts it.
    pub crash_loop_crashes: u32,
    pub crash_window: Duration,
    /// How long a grain gets to shut down after its `shutdown` call, and
    /// again after SIGTERM, before SIGKILL.
    pub shutdown_grace: Duration,
    /// Largest RPC message the host accepts from a grain.
    pub max_message_bytes: u64,
    /// Calls one grain may have in flight through the host at once.
    pub max_in_flight: usize,
    /// Calls refused for the in-flight bound before the grain is cut off
    /// (stopped and held like a crash loop): a flood.
    pub flood_cutoff: u64,
    /// How long the host waits for a grain's answer to `offer` and
    /// `accept`.
    pub call_timeout: Duration,
    /// How often cross-grain call counts go to the audit log.
    pub audit_flush: Duration,
    /// How often every grain gets an automatic snapshot (backends with
    /// snapshots only); `None` for never.
    pub snapshot_interval: Option<Duration>,
    /// Which automatic snapshots are kept.
    pub retention: granary_datasets::Grid,
    /// Longest a running grain stays frozen for a snapshot.
    pub freeze_limit: Duration,
    /// Granary's domain: users are `<user>@<domain>` to XMPP, and grains
    /// get it as `GRANARY_DOMAIN`.
    pub domain: String,
    /// Environment the grains of one app kind get from the configuration
    /// (`[xmpp]` for `xmpp`), as `NAME=value`.
    pub kind_env: std::collections::BTreeMap<String, Vec<String>>,
    /// Where chat stanzas for other domains go (the gateway's federation);
    /// `None`: they are refused with `remote-server-not-found`.
    pub xmpp_outbound: Option<XmppOutbound>,
    /// Group chats (room grains) one user may create by joining a room
    /// nobody has made yet.
    pub rooms_per_user: u32,
}

impl Default for SupervisorConfig {
    fn default() -> SupervisorConfig {
        SupervisorConfig {
            idle_timeout: Duration::from_secs(120),
            restart_backoff: Duration::from_millis(500),
            restart_backoff_max: Duration::from_secs(60),
            crash_loop_crashes: 5,
            crash_window: Duration::from_secs(120),
            shutdown_grace: Duration::from_secs(5),
            max_message_bytes: 8 << 20,
            max_in_flight: 128,
            flood_cutoff: 10_000,
            call_timeout: Duration::from_secs(30),
            audit_flush: Duration::from_secs(60),
            snapshot_interval: Some(Duration::from_secs(15 * 60)),
            retention: granary_datasets::Grid::default(),
            freeze_limit: Duration::from_secs(5),
            domain: "localhost".to_owned(),
            kind_env: std::collections::BTreeMap::new(),
            xmpp_outbound: None,
            rooms_per_user: 20,
        }
    }
}

/// Where the supervisor hands stanzas for other domains: the gateway's
/// federation, when the `xmpp-s2s` listener is on. A full queue or no
/// federation fails the send at once, so the sender is told.
pub type XmppOutbound = tokio::sync::mpsc::Sender<granary_grains::mail::XmppStanza>;

/// Asked before every start of a grain, once its dataset exists: on a
/// cluster node, whether this node may run it now (it holds the grain's
/// placement under a live lease, and the dataset carries no newer epoch),
/// recording the placement's epoch in the dataset before saying yes. An
/// `Err` refuses the start, with the reason.
pub trait StartGate: Send + Sync {
    /// `image` is the app's image directory on the host and `exec` its
    /// program as the grain names it, so a node can check that it runs
    /// the app's architecture.
    fn admit(
        &self,
        grain: &str,
        image: PathBuf,
        exec: String,
        datasets: Arc<dyn Datasets>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StartRefused>> + Send>>;
}

/// Why a [`StartGate`] refused a start; told to whoever asked for the
/// grain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StartRefused(pub String);

/// On a cluster node: how a grain here reaches a capability whose
/// provider runs on another node, or another user's chat grain there.
pub trait RemoteGrants: Send + Sync {
    /// `None` when `provider` is this node's to run (placed here, not
    /// placed yet, or its placement cannot be read: the start gate
    /// decides). Otherwise a stream to the node that runs it, on which
    /// that node serves grant `grant` for `holder`
    /// ([`granary_grains::Grains::serve_grant`]), or why there is none.
    fn open(&self, grant: i64, holder: String, provider: String) -> RemoteOpen;

    /// A stanza a grain here routes to chat grain `grain`, which this
    /// node may not run: handed to the node that does. `None` when
    /// `grain` is this node's to run after all.
    fn deliver_xmpp(
        &self,
        grain: String,
        stanza: granary_grains::mail::XmppStanza,
    ) -> RemoteDeliver;

    /// Makes `jid` (named `name`) a contact of chat grain `grain`'s user
    /// on the node that runs it, when this node may not. `None` when
    /// `grain` is this node's to run after all.
    fn befriend(&self, grain: String, jid: String, name: String) -> RemoteDeliver;
}

/// What [`RemoteGrants::deliver_xmpp`] answers.
pub type RemoteDeliver = std::pin::Pin<
    Box<dyn std::future::Future<Output = Option<Result<(), granary_grains::GrainError>>> + Send>,
>;

/// What [`RemoteGrants::open`] answers.
pub type RemoteOpen =
    std::pin::Pin<Box<dyn std::future::Future<Output = Option<Result<Connection, String>>> + Send>>;

/// What the supervisor works with.
pub struct SupervisorParams {
    pub store: Arc<Store>,
    pub datasets: Arc<dyn Datasets>,
    /// `None` on a node on its own: every grain may start.
    pub start_gate: Option<Arc<dyn StartGate>>,
    /// `None` on a node on its own: every provider runs here.
    pub remote_grants: Option<Arc<dyn RemoteGrants>>,
    pub jail: JailConfig,
    /// The `granary-launcher` binary.
    pub launcher: PathBuf,
    /// Where installed apps live: `<apps_dir>/<kind>/<version>/image`.
    pub apps_dir: PathBuf,
    pub config: SupervisorConfig,
}

/// The supervisor. Cheap to clone; lives on one thread's `LocalSet`.
#[derive(Clone)]
pub struct Supervisor {
    inner: Rc<Inner>,
}

/// A grain id as admins read it in errors (`alice/git`).
pub(crate) fn shown(grain: &str) -> String {
    granary_model::GrainId::parse(grain).map_or_else(|_| grain.to_owned(), |g| g.shown())
}

pub(crate) fn error(grain: &str, problem: Problem) -> GrainError {
    GrainError {
        grain: shown(grain),
        problem,
    }
}

/// A live connection as the supervisor's own thread holds it.
pub struct LocalConnection {
    pub stream: tokio::net::UnixStream,
    /// Keeps the grain awake; drop it when the connection is done.
    pub guard: ConnectionGuard,
}

impl Supervisor {
    /// Starts the spawner thread, the audit flusher and the snapshot
    /// scheduler. Call inside a `LocalSet`.
    pub fn new(params: SupervisorParams) -> std::io::Result<Supervisor> {
        // What a daemon that died left of its grains' cgroups.
        if let Some(driver) = &params.jail.cgroup {
            granary_jail::cgroup::remove_children(driver, &params.jail.cgroup_parent);
        }
        let inner = Inner::new(params)?;
        snapshots::schedule(&inner);
        Ok(Supervisor { inner })
    }

    pub fn config(&self) -> &SupervisorConfig {
        &self.inner.params.config
    }

    /// Starts a grain (or clears a crash-loop hold and starts it). Returns
    /// once it is running.
    pub async fn start(&self, grain: &str) -> Result<(), GrainError> {
        let slot = self.slot(grain).await?;
        slot.clear_hold();
        self.inner
            .ensure_running(grain)
            .await
            .map(drop)
            .map_err(|p| error(grain, p))
    }

    /// Starts a grain and waits until its app serves its end of the channel
    /// (its bootstrap answers), within `call_timeout`: what an upgrade
    /// checks before it keeps a new version.
    pub async fn start_checked(&self, grain: &str) -> Result<(), GrainError> {
        self.start(grain).await?;
        let fail = |reason: String| error(grain, Problem::Start(reason));
        let running = self
            .inner
            .ensure_running(grain)
            .await
            .map_err(|p| error(grain, p))?;
        // Any answer from the app, even "nothing offered by that name",
        // shows it serves its channel; a broken channel does not answer.
        let mut probe = running.grain.offer_request();
        probe.get().set_descriptor("granary.health-check");
        match tokio::time::timeout(self.inner.params.config.call_timeout, probe.send().promise)
            .await
        {
            Err(_) => Err(fail("its app did not answer in time".to_owned())),
            Ok(Err(e)) if e.kind == capnp::ErrorKind::Disconnected => {
                Err(fail(format!("its app did not come up: {}", e.extra)))
            }
            Ok(_) => Ok(()),
        }
    }

    /// Stops a grain gracefully; false when it was not running.
    pub async fn stop(&self, grain: &str) -> Result<bool, GrainError> {
        let slot = self.slot(grain).await?;
        Ok(self.inner.stop_slot(&slot).await)
    }

    /// Stops a grain and has it gone within about `within`: its shutdown
    /// call and SIGTERM each get a quarter of it (at most the configured
    /// grace), then SIGKILL.
    pub async fn stop_within(&self, grain: &str, within: Duration) -> Result<bool, GrainError> {
        let slot = self.slot(grain).await?;
        let grace = self.inner.params.config.shutdown_grace.min(within / 4);
        Ok(self.inner.stop_slot_with(&slot, grace).await)
    }

    /// Every grain the state knows, with what the supervisor knows of it.
    pub async fn list(&self) -> Result<Vec<GrainStatus>, GrainError> {
        let grains = db(&self.inner.params.store, |s| s.list_grains())
            .await
            .map_err(|p| error("*", p))?;
        let mut out = Vec::new();
        for g in grains {
            let slot = self.inner.slot_for(&g);
            out.push(self.inner.status(&slot));
        }
        Ok(out)
    }

    pub async fn status(&self, grain: &str) -> Result<GrainStatus, GrainError> {
        let slot = self.slot(grain).await?;
        Ok(self.inner.status(&slot))
    }

    /// The last `max_bytes` of the grain's log (its stdout and stderr).
    pub async fn logs(&self, grain: &str, max_bytes: u64) -> Result<Vec<u8>, GrainError> {
        self.slot(grain).await?;
        let dir = self.inner.log_dir(grain);
        granary_jail::grain_log::read_tail(&dir, slot::LOG_KEEP, max_bytes)
            .map_err(|e| error(grain, Problem::Host(format!("reading its log: {e}"))))
    }

    /// Opens a connection to `service` of a grain for `identity`, starting
    /// the grain if needed. The grain receives the other end of a socket
    /// pair over its hand-off socket; the connection keeps it awake until
    /// dropped.
    pub async fn connect(
        &self,
        grain: &str,
        service: &str,
        identity: Identity,
        peer: Peer,
    ) -> Result<LocalConnection, GrainError> {
        self.inner
            .connect(grain, service, identity, peer)
            .await
            .map_err(|p| error(grain, p))
    }

    /// [`Supervisor::connect`], with the stream as a std socket another
    /// thread may adopt.
    pub async fn connect_send(
        &self,
        grain: &str,
        service: &str,
        identity: Identity,
        peer: Peer,
    ) -> Result<Connection, GrainError> {
        let conn = self.connect(grain, service, identity, peer).await?;
        let stream = conn
            .stream
            .into_std()
            .map_err(|e| error(grain, Problem::Host(format!("the connection: {e}"))))?;
        // The guard is `!Send`: it stays on this thread until the other
        // side drops its keep token.
        let (keep, dropped) = tokio::sync::oneshot::channel::<()>();
        let guard = conn.guard;
        tokio::task::spawn_local(async move {
            let _ = dropped.await;
            drop(guard);
        });
        Ok(Connection {
            stream,
            keep: Box::new(keep),
        })
    }

    /// Cuts every live capability of a revoked grant at once. The caller
    /// has already revoked it in the state.
    pub fn revoked(&self, grant_id: i64) {
        self.inner.revoke(grant_id);
    }

    /// Serves grant `grant`'s object to `holder`, a grain on another
    /// node: see [`granary_grains::Grains::serve_grant`]. The grant must be
    /// live and `holder`'s, and its provider this node's to run.
    pub async fn serve_grant(&self, grant: i64, holder: &str) -> Result<Connection, GrainError> {
        self.inner
            .serve_grant(grant, holder)
            .await
            .map_err(|p| error(holder, p))
    }

    /// Holds a grain stopped for `reason` (its data is being replaced or
    /// deleted): nothing starts it again, and every live capability it
    /// holds or provides is cut.
    pub async fn hold(&self, grain: &str, reason: &str) -> Result<(), GrainError> {
        let slot = self.slot(grain).await?;
        self.inner.stop_slot(&slot).await;
        self.inner.hold_and_kill(&slot, reason.to_owned()).await;
        self.inner.cut_grants_of(grain);
        Ok(())
    }

    /// Undoes [`Supervisor::hold`].
    pub fn release(&self, grain: &str) {
        if let Some(slot) = self.inner.slots.borrow().get(grain) {
            slot.clear_hold();
        }
    }

    /// Forgets what it knows of a grain that was deleted (after `hold`),
    /// and removes its cgroup.
    pub async fn forget(&self, grain: &str) {
        self.inner.slots.borrow_mut().remove(grain);
        self.inner.remove_cgroups(vec![grain.to_owned()]).await;
    }

    /// Stops every running grain (and refuses to start any more) and
    /// flushes the call counts.
    pub async fn shutdown(&self) {
        self.inner.shutting_down.set(true);
        // A start already under way when the flag was set finishes first;
        // stopping again until nothing runs catches it.
        loop {
            let slots: Vec<Rc<Slot>> = self.inner.slots.borrow().values().cloned().collect();
            if !slots.iter().any(|s| s.is_live()) {
                break;
            }
            let stops = slots.iter().map(|s| self.inner.stop_slot(s));
            futures::future::join_all(stops).await;
        }
        self.inner.flush_calls().await;
        // Each grain's cgroup (kept across its runs), then the parent.
        let ids: Vec<String> = self.inner.slots.borrow().keys().cloned().collect();
        self.inner.remove_cgroups(ids).await;
        let jail = &self.inner.params.jail;
        if let Some(driver) = &jail.cgroup {
            granary_jail::cgroup::remove_leftovers(driver, &jail.cgroup_parent, None);
        }
    }

    /// An object a grain offers, for the host's own use (no grant, no
    /// membrane: benchmarks, host services). Valid until the grain stops.
    pub async fn host_capability(
        &self,
        grain: &str,
        descriptor: &str,
    ) -> Result<capnp::capability::Client, GrainError> {
        let running = self
            .inner
            .ensure_running(grain)
            .await
            .map_err(|p| error(grain, p))?;
        self.inner
            .offer(&running, descriptor, "")
            .await
            .map_err(|p| error(grain, p))
    }

    /// Woken (one stored permit, as [`tokio::sync::Notify::notify_one`])
    /// each time a grain's processes end: a stop, an idle stop or a crash.
    /// The daemon gives freed memory back to the system after a burst of
    /// these.
    pub fn grain_exits(&self) -> Arc<tokio::sync::Notify> {
        self.inner.exits.clone()
    }

    /// Pid of the grain's launcher while it runs (tests, status).
    pub fn launcher_pid(&self, grain: &str) -> Option<u32> {
        let slot = self.inner.slots.borrow().get(grain).cloned()?;
        slot.running().map(|r| r.pid)
    }

    async fn slot(&self, grain: &str) -> Result<Rc<Slot>, GrainError> {
        self.inner.slot(grain).await.map_err(|p| error(grain, p))
    }
}
