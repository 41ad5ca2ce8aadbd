//! The one `Inner` every part of the supervisor shares: the parameters,
//! the spawner, every grain's slot, and the bookkeeping of grants (which
//! membranes are live, which grants are revoked, calls per grant).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use granary_grains::{GrainStatus, Problem};
use granary_jail::spawn::Spawner;
use granary_state::{StateError, Store};

use crate::membrane::{Membrane, MembraneCap};
use crate::slot::{Busy, Slot};
use crate::{SupervisorParams, slot};

pub(crate) struct Inner {
    pub(crate) params: SupervisorParams,
    pub(crate) spawner: Spawner,
    pub(crate) slots: RefCell<HashMap<String, Rc<Slot>>>,
    generations: Cell<u64>,
    /// Membranes handed out, so `save` can recognise them and `revoke` cut
    /// them.
    pub(crate) membranes: RefCell<capnp_rpc::CapabilityServerSet<Membrane, MembraneCap>>,
    pub(crate) by_grant: RefCell<HashMap<i64, Vec<std::rc::Weak<Membrane>>>>,
    revoked: RefCell<HashSet<i64>>,
    /// Cross-grain calls per grant since the last flush.
    calls: RefCell<HashMap<i64, u64>>,
    /// Grants used since the daemon started (first use is logged).
    pub(crate) used: RefCell<HashSet<i64>>,
    /// The daemon is stopping: no grain starts any more.
    pub(crate) shutting_down: Cell<bool>,
    /// Added chat domains seen so far (they are never removed).
    pub(crate) chat_domains: RefCell<HashSet<String>>,
    /// Told each time a grain's processes have ended, for whatever reason.
    pub(crate) exits: Arc<tokio::sync::Notify>,
}

/// Runs blocking state work on the blocking pool.
pub(crate) async fn db<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&Store) -> Result<T, StateError> + Send + 'static,
) -> Result<T, Problem> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| Problem::Host(format!("state worker failed: {e}")))?
        .map_err(|e| Problem::Host(e.to_string()))
}

impl Inner {
    /// The shared state, with the audit flusher running. Call inside a
    /// `LocalSet`.
    pub(crate) fn new(params: SupervisorParams) -> std::io::Result<Rc<Inner>> {
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
            shutting_down: Cell::new(false),
            chat_domains: RefCell::default(),
            exits: Arc::default(),
        });
        let weak = Rc::downgrade(&inner);
        let every = inner.params.config.audit_flush;
        tokio::task::spawn_local(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = weak.upgrade() else { return };
                inner.flush_calls().await;
            }
        });
        Ok(inner)
    }

    /// What `granary grain status` shows, with the memory-limit kills the
    /// grain's cgroup counted so far.
    pub(crate) fn status(&self, slot: &Slot) -> GrainStatus {
        let running = slot.running();
        if let Some(r) = &running {
            self.count_oom_kills(slot, r);
        }
        let mut status = slot.status();
        if let (Some(_), Some(driver)) = (running, &self.params.jail.cgroup) {
            let cgroups = &self.params.jail.cgroup_parent;
            if let Some(u) = granary_jail::cgroup::usage(driver, cgroups, &slot.id) {
                status.memory_bytes = Some(u.memory_bytes);
                status.cpu_seconds = u.cpu_seconds;
            }
        }
        status
    }

    /// Reads the grain's cgroup for kills at its memory limit during run
    /// `r` (which must not have ended: an ended run's count was folded);
    /// logs each new one plainly.
    pub(crate) fn count_oom_kills(&self, slot: &Slot, r: &slot::Running) {
        let Some(driver) = &self.params.jail.cgroup else {
            return;
        };
        if *r.exited.borrow() {
            return;
        }
        let Some(read) =
            granary_jail::cgroup::oom_kills(driver, &self.params.jail.cgroup_parent, &slot.id)
        else {
            return;
        };
        let now = read.saturating_sub(r.oom_baseline);
        let before = r.oom_seen.replace(now.max(r.oom_seen.get()));
        if now > before {
            let limit = slot.memory_limit.get().map_or(0, |b| b >> 20);
            tracing::warn!(grain = %slot.id, kills = now - before, limit_mib = limit, "grain hit its memory limit; the kernel killed a process in it");
        }
    }

    /// Removes the cgroups of `grains` (kept across their runs), waiting a
    /// little for dying processes to leave, on the blocking pool.
    pub(crate) async fn remove_cgroups(&self, grains: Vec<String>) {
        let Some(driver) = self.params.jail.cgroup.clone() else {
            return;
        };
        let parent = self.params.jail.cgroup_parent.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for grain in grains {
                if let Err(e) = granary_jail::cgroup::remove_grain(
                    &driver,
                    &parent,
                    &grain,
                    std::time::Duration::from_secs(2),
                ) {
                    tracing::warn!(%grain, error = %e, "cannot remove the grain's cgroup");
                }
            }
        })
        .await;
    }

    /// Cuts every live capability of a revoked grant at once.
    pub(crate) fn revoke(&self, grant_id: i64) {
        self.revoked.borrow_mut().insert(grant_id);
        if let Some(list) = self.by_grant.borrow_mut().remove(&grant_id) {
            for m in list.iter().filter_map(std::rc::Weak::upgrade) {
                m.revoke();
            }
        }
    }

    /// Cuts every live capability `grain` holds or provides (it is held:
    /// its data is being replaced, moved or deleted). The grants stay:
    /// once it is released, the next call obtains the object again.
    pub(crate) fn cut_grants_of(&self, grain: &str) {
        let cut: Vec<_> = self
            .by_grant
            .borrow()
            .values()
            .flatten()
            .filter_map(std::rc::Weak::upgrade)
            .filter(|m| m.holder == grain || m.provider == grain)
            .collect();
        for m in cut {
            m.cut();
        }
    }

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
    pub(crate) fn admit_call(&self, holder: &str) -> Result<Busy, capnp::Error> {
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
                    slot::FLOOD_WINDOW.as_secs()
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

    pub(crate) async fn flush_calls(&self) {
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

    pub(crate) fn next_generation(&self) -> u64 {
        let g = self.generations.get() + 1;
        self.generations.set(g);
        g
    }

    pub(crate) fn log_dir(&self, grain: &str) -> PathBuf {
        self.params.datasets.grain_dir(grain).join("log")
    }
}
