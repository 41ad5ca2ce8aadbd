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
//! Everything here is `!Send` (capnp-rpc objects are): the supervisor lives
//! on one thread's `LocalSet`. SQLite work goes to the blocking pool.

#![allow(unsafe_code)] // pidfd_open, kill, and descriptors received with SCM_RIGHTS

mod grain;
mod host;
mod membrane;
mod rpc;

/// Connection hand-off; the same crate the SDK speaks.
pub use granary_handoff as handoff;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use granary_datasets::Datasets;
use granary_jail::JailConfig;
use granary_jail::spawn::Spawner;
use granary_state::{StateError, Store};

pub use grain::{Connection, ConnectionGuard, GrainStatus, Identity};
pub use granary_datasets::Snapshot;

/// What `Supervisor::snapshot` did.
#[derive(Debug, Clone)]
pub struct SnapshotTaken {
    /// Where the backend keeps it (e.g. `pool/alice-git@manual-1700000000`).
    pub name: String,
    /// The app's one-line checkpoint report ("" when it was not running).
    pub report: String,
    /// How long the grain was frozen (0 when it was not running).
    pub frozen: Duration,
}

use crate::grain::{Running, Slot};
use crate::membrane::{Membrane, MembraneCap};

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
        }
    }
}

/// What the supervisor works with.
pub struct SupervisorParams {
    pub store: Arc<Store>,
    pub datasets: Arc<dyn Datasets>,
    pub jail: JailConfig,
    /// The `granary-launcher` binary.
    pub launcher: PathBuf,
    /// Where installed apps live: `<apps_dir>/<kind>/<version>/image`.
    pub apps_dir: PathBuf,
    pub config: SupervisorConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("no grain {0}")]
    NoSuchGrain(String),
    #[error("grain {grain} is held stopped: {reason}; `granary grain start {grain}` tries again")]
    Held { grain: String, reason: String },
    #[error("grain {grain} cannot start: {reason}")]
    Start { grain: String, reason: String },
    #[error("grain {grain}: {reason}")]
    Call { grain: String, reason: String },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Other(String),
}

pub(crate) struct Inner {
    params: SupervisorParams,
    spawner: Spawner,
    slots: RefCell<HashMap<String, Rc<Slot>>>,
    generations: Cell<u64>,
    /// Membranes handed out, so `save` can recognise them and `revoke` cut
    /// them.
    membranes: RefCell<capnp_rpc::CapabilityServerSet<Membrane, MembraneCap>>,
    by_grant: RefCell<HashMap<i64, Vec<std::rc::Weak<Membrane>>>>,
    revoked: RefCell<HashSet<i64>>,
    /// Cross-grain calls per grant since the last flush.
    calls: RefCell<HashMap<i64, u64>>,
    /// Grants used since the daemon started (first use is logged).
    used: RefCell<HashSet<i64>>,
}

/// The supervisor. Cheap to clone; lives on one thread's `LocalSet`.
#[derive(Clone)]
pub struct Supervisor {
    inner: Rc<Inner>,
}

/// Runs blocking state work on the blocking pool.
pub(crate) async fn db<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&Store) -> Result<T, StateError> + Send + 'static,
) -> Result<T, SupervisorError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| SupervisorError::Other(format!("state worker failed: {e}")))?
        .map_err(SupervisorError::State)
}

impl Supervisor {
    /// Starts the spawner thread and the audit flusher. Call inside a
    /// `LocalSet`.
    pub fn new(params: SupervisorParams) -> std::io::Result<Supervisor> {
        let spawner = Spawner::new(params.launcher.clone())?;
        let inner = Rc::new(Inner {
            params,
            spawner,
            slots: RefCell::default(),
            generations: Cell::new(0),
            membranes: RefCell::new(capnp_rpc::CapabilityServerSet::new()),
            by_grant: RefCell::default(),
            revoked: RefCell::default(),
            calls: RefCell::default(),
            used: RefCell::default(),
        });
        if let Some(every) = inner.params.config.snapshot_interval
            && inner.params.datasets.backend() != "plain"
        {
            let weak = Rc::downgrade(&inner);
            tokio::task::spawn_local(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Some(inner) = weak.upgrade() else { return };
                    Supervisor { inner }.snapshot_all().await;
                }
            });
        }
        let weak = Rc::downgrade(&inner);
        let every = inner.params.config.audit_flush;
        tokio::task::spawn_local(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = weak.upgrade() else { return };
                inner.flush_calls().await;
            }
        });
        Ok(Supervisor { inner })
    }

    pub fn config(&self) -> &SupervisorConfig {
        &self.inner.params.config
    }

    /// Starts a grain (or clears a crash-loop hold and starts it). Returns
    /// once it is running.
    pub async fn start(&self, grain: &str) -> Result<(), SupervisorError> {
        let slot = self.inner.slot(grain).await?;
        slot.clear_hold();
        self.inner.ensure_running(grain).await.map(drop)
    }

    /// Starts a grain and waits until its app serves its end of the channel
    /// (its bootstrap answers), within `call_timeout`: what an upgrade
    /// checks before it keeps a new version.
    pub async fn start_checked(&self, grain: &str) -> Result<(), SupervisorError> {
        self.start(grain).await?;
        let running = self.inner.ensure_running(grain).await?;
        let fail = |reason: String| SupervisorError::Start {
            grain: grain.to_owned(),
            reason,
        };
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
    pub async fn stop(&self, grain: &str) -> Result<bool, SupervisorError> {
        let slot = self.inner.slot(grain).await?;
        Ok(self.inner.stop_slot(&slot).await)
    }

    /// Every grain the state knows, with what the supervisor knows of it.
    pub async fn list(&self) -> Result<Vec<GrainStatus>, SupervisorError> {
        let grains = db(&self.inner.params.store, |s| s.list_grains()).await?;
        let mut out = Vec::new();
        for g in grains {
            let slot = self.inner.slot_for(&g);
            out.push(slot.status());
        }
        Ok(out)
    }

    pub async fn status(&self, grain: &str) -> Result<GrainStatus, SupervisorError> {
        Ok(self.inner.slot(grain).await?.status())
    }

    /// The last `max_bytes` of the grain's log (its stdout and stderr).
    pub fn logs(&self, grain: &str, max_bytes: u64) -> Result<Vec<u8>, SupervisorError> {
        let dir = self.inner.log_dir(grain);
        granary_jail::grain_log::read_tail(&dir, grain::LOG_KEEP, max_bytes)
            .map_err(|e| SupervisorError::Other(format!("reading the log of {grain}: {e}")))
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
    ) -> Result<Connection, SupervisorError> {
        self.inner.connect(grain, service, identity).await
    }

    /// Cuts every live capability of a revoked grant at once. The caller
    /// has already revoked it in the state.
    pub fn revoked(&self, grant_id: i64) {
        self.inner.revoked.borrow_mut().insert(grant_id);
        if let Some(list) = self.inner.by_grant.borrow_mut().remove(&grant_id) {
            for m in list.iter().filter_map(std::rc::Weak::upgrade) {
                m.cut();
            }
        }
    }

    /// Stops a grain for good (it is being deleted): held so nothing starts
    /// it again, and every live capability it holds or provides is cut.
    pub async fn retire(&self, grain: &str) -> Result<(), SupervisorError> {
        let slot = self.inner.slot(grain).await?;
        self.inner.stop_slot(&slot).await;
        self.inner
            .hold_and_kill(&slot, "being removed".to_owned())
            .await;
        let cut: Vec<i64> = self
            .inner
            .by_grant
            .borrow()
            .iter()
            .filter(|(_, list)| {
                list.iter()
                    .filter_map(std::rc::Weak::upgrade)
                    .any(|m| m.holder == grain || m.provider == grain)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in cut {
            self.revoked(id);
        }
        Ok(())
    }

    /// Undoes [`Supervisor::retire`] when the removal failed.
    pub fn unretire(&self, grain: &str) {
        if let Some(slot) = self.inner.slots.borrow().get(grain) {
            slot.clear_hold();
        }
    }

    /// Forgets what it knows of a grain that was deleted (after `retire`).
    pub fn forget(&self, grain: &str) {
        self.inner.slots.borrow_mut().remove(grain);
    }

    /// Stops every running grain and flushes the call counts.
    pub async fn shutdown(&self) {
        let slots: Vec<Rc<Slot>> = self.inner.slots.borrow().values().cloned().collect();
        let stops = slots.iter().map(|s| self.inner.stop_slot(s));
        futures::future::join_all(stops).await;
        self.inner.flush_calls().await;
        let jail = &self.inner.params.jail;
        if let Some(driver) = &jail.cgroup {
            granary_jail::cgroup::remove_leftovers(driver, &jail.cgroup_parent, None);
        }
    }

    /// An object a grain offers, for the host's own use (no grant, no
    /// membrane: the gateway delivering mail, benchmarks). Valid until the
    /// grain stops.
    pub async fn host_capability(
        &self,
        grain: &str,
        descriptor: &str,
    ) -> Result<capnp::capability::Client, SupervisorError> {
        let running = self.inner.ensure_running(grain).await?;
        self.inner.offer(&running, descriptor, "").await
    }

    /// A consistent snapshot: a running grain is asked to checkpoint
    /// (`Grain.prepareSnapshot`), its cgroup frozen (at most
    /// `freeze_limit`), the dataset snapshotted, and the grain thawed.
    pub async fn snapshot(
        &self,
        grain: &str,
        label: &str,
    ) -> Result<SnapshotTaken, SupervisorError> {
        let slot = self.inner.slot(grain).await?;
        let config = &self.inner.params.config;
        let running = slot.running();
        let mut report = String::new();
        if let Some(r) = &running {
            // A grain cannot veto its own snapshots: without a checkpoint
            // the snapshot is still taken, frozen (crash-consistent).
            let checkpoint = tokio::time::timeout(
                config.call_timeout.min(Duration::from_secs(10)),
                r.grain.prepare_snapshot_request().send().promise,
            )
            .await;
            report = match checkpoint {
                Ok(Ok(answer)) => answer
                    .get()
                    .and_then(|a| a.get_report())
                    .ok()
                    .and_then(|t| t.to_string().ok())
                    .unwrap_or_default(),
                Ok(Err(e)) => {
                    tracing::warn!(grain, error = %e.extra, "checkpoint failed; snapshot is crash-consistent");
                    format!("no checkpoint ({}); crash-consistent", e.extra)
                }
                Err(_) => {
                    tracing::warn!(grain, "checkpoint timed out; snapshot is crash-consistent");
                    "no checkpoint (timed out); crash-consistent".to_owned()
                }
            };
        }
        let datasets = self.inner.params.datasets.clone();
        let driver = self
            .inner
            .params
            .jail
            .cgroup
            .clone()
            .filter(|_| running.is_some());
        let parent = self.inner.params.jail.cgroup_parent.clone();
        let (id, label, limit) = (grain.to_owned(), label.to_owned(), config.freeze_limit);
        let (name, frozen) = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let freezer = match &driver {
                Some(d) => Some(
                    granary_jail::cgroup::freeze(d, &parent, &id, limit)
                        .map_err(|e| e.to_string())?,
                ),
                None => None,
            };
            let name = datasets.snapshot(&id, &label).map_err(|e| e.to_string());
            drop(freezer);
            let frozen = if driver.is_some() {
                started.elapsed()
            } else {
                Duration::ZERO
            };
            name.map(|n| (n, frozen))
        })
        .await
        .map_err(|e| SupervisorError::Other(e.to_string()))?
        .map_err(SupervisorError::Other)?;
        let name = name.ok_or_else(|| {
            SupervisorError::Other(
                "the plain storage backend has no snapshots; use storage.backend = \"zfs\" or \"btrfs\"".to_owned(),
            )
        })?;
        tracing::info!(grain, snapshot = %name, frozen_ms = frozen.as_millis() as u64, "snapshot taken");
        Ok(SnapshotTaken {
            name,
            report,
            frozen,
        })
    }

    pub async fn list_snapshots(&self, grain: &str) -> Result<Vec<Snapshot>, SupervisorError> {
        self.inner.slot(grain).await?;
        let (datasets, id) = (self.inner.params.datasets.clone(), grain.to_owned());
        tokio::task::spawn_blocking(move || datasets.list_snapshots(&id))
            .await
            .map_err(|e| SupervisorError::Other(e.to_string()))?
            .map_err(|e| SupervisorError::Other(e.to_string()))
    }

    /// Deletes the automatic snapshots the retention grid does not keep.
    pub async fn prune(&self, grain: &str) -> Result<Vec<String>, SupervisorError> {
        let snaps = self.list_snapshots(grain).await?;
        let doomed = self.inner.params.config.retention.prune(&snaps);
        let (datasets, id, list) = (self.inner.params.datasets.clone(), grain.to_owned(), doomed);
        tokio::task::spawn_blocking(move || {
            let mut deleted = Vec::new();
            for name in list {
                match datasets.delete_snapshot(&id, &name) {
                    Ok(()) => deleted.push(name),
                    // A backup's base stays until the next export moves on.
                    Err(e) if e.source.kind() == std::io::ErrorKind::ResourceBusy => {
                        tracing::debug!(grain = %id, snapshot = %name, "held; not pruned");
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok::<_, granary_datasets::DatasetError>(deleted)
        })
        .await
        .map_err(|e| SupervisorError::Other(e.to_string()))?
        .map_err(|e| SupervisorError::Other(e.to_string()))
    }

    /// Stops the grain, puts its dataset back to a snapshot, and starts it
    /// again if it was running. Returns whether it was.
    pub async fn rollback(&self, grain: &str, snapshot: &str) -> Result<bool, SupervisorError> {
        let slot = self.inner.slot(grain).await?;
        let was_running = self.inner.stop_slot(&slot).await;
        // Held while the data is swapped, so no call can start it on data
        // that is being replaced.
        self.inner
            .hold_and_kill(&slot, "rolling back to a snapshot".to_owned())
            .await;
        let (datasets, id, name, uid) = (
            self.inner.params.datasets.clone(),
            grain.to_owned(),
            snapshot.to_owned(),
            slot.host_uid,
        );
        let result = tokio::task::spawn_blocking(move || datasets.rollback(&id, &name, uid))
            .await
            .map_err(|e| SupervisorError::Other(e.to_string()))
            .and_then(|r| r.map_err(|e| SupervisorError::Other(e.to_string())));
        slot.clear_hold();
        result?;
        tracing::info!(grain, snapshot, "rolled back");
        if was_running {
            self.start(grain).await?;
        }
        Ok(was_running)
    }

    /// The scheduler's round: an automatic snapshot of every grain whose
    /// dataset exists, then pruning by the retention grid.
    async fn snapshot_all(&self) {
        let Ok(grains) = db(&self.inner.params.store, |s| s.list_grains()).await else {
            return;
        };
        let label = granary_datasets::timed_label("auto");
        for g in grains {
            if !self.inner.params.datasets.path(&g.id).exists() {
                continue;
            }
            let held = self
                .inner
                .slots
                .borrow()
                .get(&g.id)
                .is_some_and(|s| s.is_held());
            if held {
                continue;
            }
            if let Err(e) = self.snapshot(&g.id, &label).await {
                tracing::warn!(grain = %g.id, error = %e, "automatic snapshot failed");
                continue;
            }
            if let Err(e) = self.prune(&g.id).await {
                tracing::warn!(grain = %g.id, error = %e, "pruning snapshots failed");
            }
        }
    }

    /// Pid of the grain's launcher while it runs (tests, status).
    pub fn launcher_pid(&self, grain: &str) -> Option<u32> {
        let slot = self.inner.slots.borrow().get(grain).cloned()?;
        slot.running().map(|r| r.pid)
    }
}

impl Inner {
    pub(crate) fn check_grant_live(&self, grant_id: i64) -> Result<(), capnp::Error> {
        if self.revoked.borrow().contains(&grant_id) {
            Err(capnp::Error::failed(
                "capability revoked by its owner".to_owned(),
            ))
        } else {
            Ok(())
        }
    }

    /// Admits one call made by `holder` against its in-flight bound.
    pub(crate) fn admit_call(&self, holder: &str) -> Result<grain::Busy, capnp::Error> {
        let slot = self.slots.borrow().get(holder).cloned();
        let Some(running) = slot.as_ref().and_then(|s| s.running()) else {
            return Err(capnp::Error::disconnected(
                "the calling grain is not running".to_owned(),
            ));
        };
        let out = &running.activity.outbound;
        if out.get() >= self.params.config.max_in_flight {
            let refused = running.activity.refuse();
            if refused == self.params.config.flood_cutoff {
                let slot = slot.expect("running implies a slot");
                tracing::warn!(grain = %holder, refused, "grain flooded the host with calls; cutting it off");
                let reason = format!(
                    "cut off: {refused} calls over the in-flight limit of {} within {} s",
                    self.params.config.max_in_flight,
                    grain::FLOOD_WINDOW.as_secs()
                );
                if let Some(r) = slot.hold(reason) {
                    r.kill();
                }
            }
            return Err(capnp::Error::overloaded(format!(
                "more than {} calls in flight",
                self.params.config.max_in_flight
            )));
        }
        Ok(running.activity.outbound_call())
    }

    pub(crate) fn count_call(&self, grant_id: i64) {
        *self.calls.borrow_mut().entry(grant_id).or_default() += 1;
    }

    async fn flush_calls(&self) {
        let counts: Vec<(i64, u64)> = self.calls.borrow_mut().drain().collect();
        if counts.is_empty() {
            return;
        }
        let result = db(&self.params.store, move |s| {
            for (grant, n) in counts {
                s.record_event(
                    "supervisor",
                    "grant.calls",
                    &grant.to_string(),
                    &format!("calls={n}"),
                )?;
            }
            Ok(())
        })
        .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot record cross-grain call counts");
        }
    }

    fn next_generation(&self) -> u64 {
        let g = self.generations.get() + 1;
        self.generations.set(g);
        g
    }

    fn log_dir(&self, grain: &str) -> PathBuf {
        self.params.datasets.grain_dir(grain).join("log")
    }

    /// Wraps a provider's object in a new membrane for `holder`.
    pub(crate) fn wrap(
        self: &Rc<Self>,
        grant: &granary_state::Grant,
        generation: u64,
        target: capnp::capability::Client,
    ) -> capnp::capability::Client {
        let membrane = Rc::new(Membrane {
            sup: Rc::downgrade(self),
            grant_id: grant.id,
            holder: grant.from_grain.clone(),
            provider: grant.to_grain.clone(),
            descriptor: grant.capability.clone(),
            target: RefCell::new(Some((generation, target))),
        });
        {
            let mut by_grant = self.by_grant.borrow_mut();
            let list = by_grant.entry(grant.id).or_default();
            list.retain(|w| w.strong_count() > 0);
            list.push(Rc::downgrade(&membrane));
        }
        let mut set = self.membranes.borrow_mut();
        set.gc();
        set.new_client_from_rc(membrane).client
    }

    /// The membrane behind a capability a grain passed back, if it is one.
    pub(crate) async fn membrane_of(&self, cap: capnp::capability::Client) -> Option<Rc<Membrane>> {
        let resolved: MembraneCap =
            capnp::capability::get_resolved_cap(MembraneCap { client: cap }).await;
        self.membranes
            .borrow()
            .get_local_server_of_resolved(&resolved)
    }

    /// Obtains `grant`'s object from its provider (starting it) and wraps
    /// it for the holder; logs the first use of a grant.
    pub(crate) async fn obtain(
        self: &Rc<Self>,
        grant: &granary_state::Grant,
        how: &'static str,
    ) -> Result<capnp::capability::Client, capnp::Error> {
        let fail = |e: SupervisorError| capnp::Error::failed(format!("{}: {e}", grant.capability));
        let running = self.ensure_running(&grant.to_grain).await.map_err(fail)?;
        let _busy = running.activity.busy();
        let target = self
            .offer(&running, &grant.capability, &grant.from_grain)
            .await
            .map_err(fail)?;
        if self.used.borrow_mut().insert(grant.id) {
            let (id, holder, detail) = (
                grant.id,
                grant.from_grain.clone(),
                format!("grant={} cap={} via={how}", grant.id, grant.capability),
            );
            let _ = db(&self.params.store, move |s| {
                s.record_event(&holder, "grant.first-use", &id.to_string(), &detail)
            })
            .await;
        }
        Ok(self.wrap(grant, running.generation, target))
    }

    /// Asks a running provider for the object a descriptor names.
    pub(crate) async fn offer(
        &self,
        provider: &Rc<Running>,
        descriptor: &str,
        requester: &str,
    ) -> Result<capnp::capability::Client, SupervisorError> {
        let requester = self.slots.borrow().get(requester).cloned();
        let mut request = provider.grain.offer_request();
        request.get().set_descriptor(descriptor);
        if let Some(r) = requester {
            let mut g = request.get().init_requester();
            g.set_id(&r.id);
            g.set_owner(&r.user);
            g.set_kind(&r.kind);
        }
        let answer = tokio::time::timeout(self.params.config.call_timeout, request.send().promise)
            .await
            .map_err(|_| SupervisorError::Call {
                grain: provider.id.clone(),
                reason: "offer timed out".to_owned(),
            })?
            .map_err(|e| SupervisorError::Call {
                grain: provider.id.clone(),
                reason: format!("offer {descriptor}: {e}"),
            })?;
        answer
            .get()
            .and_then(|r| r.get_cap().get_as_capability())
            .map_err(|e| SupervisorError::Call {
                grain: provider.id.clone(),
                reason: format!("offer {descriptor}: {e}"),
            })
    }
}
