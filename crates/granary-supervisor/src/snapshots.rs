//! Snapshots of grains' datasets: consistent ones of running grains
//! (checkpoint, freeze, snapshot, thaw), rollback, pruning by the
//! retention grid, and the scheduler that takes them.

use std::rc::Rc;
use std::time::Duration;

use granary_grains::{GrainError, Problem, Snapshot, SnapshotTaken};

use crate::inner::{Inner, db};
use crate::{Supervisor, error};

/// Takes an automatic snapshot of every grain each `snapshot_interval`, on
/// every backend (plain ones link what did not change).
pub(crate) fn schedule(inner: &Rc<Inner>) {
    let Some(every) = inner.params.config.snapshot_interval else {
        return;
    };
    let weak = Rc::downgrade(inner);
    tokio::task::spawn_local(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(inner) = weak.upgrade() else { return };
            Supervisor { inner }.snapshot_all().await;
        }
    });
}

fn host(grain: &str) -> impl Fn(String) -> GrainError + '_ {
    move |e| error(grain, Problem::Host(e))
}

impl Supervisor {
    /// A consistent snapshot: a running grain is asked to checkpoint
    /// (`Grain.prepareSnapshot`), its cgroup frozen (at most
    /// `freeze_limit`), the dataset snapshotted, and the grain thawed.
    pub async fn snapshot(&self, grain: &str, label: &str) -> Result<SnapshotTaken, GrainError> {
        let slot = self.slot(grain).await?;
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
        let uid = slot.host_uid;
        // A held grain's data may be being removed or replaced: never make
        // it an empty dataset then.
        let may_create = !slot.is_held();
        let (name, frozen) = tokio::task::spawn_blocking(move || {
            // A grain that never ran has no dataset yet: it gets an empty
            // one, and the snapshot says so by being empty.
            if !datasets.path(&id).exists() {
                if !may_create {
                    return Err("it is held stopped and holds no data to snapshot".to_owned());
                }
                datasets.create(&id, uid).map_err(|e| e.to_string())?;
            }
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
        .map_err(|e| error(grain, Problem::Host(e.to_string())))?
        .map_err(host(grain))?;
        let name = name.ok_or_else(|| {
            error(grain, Problem::Host(
                "the plain storage backend has no snapshots; use storage.backend = \"zfs\" or \"btrfs\"".to_owned(),
            ))
        })?;
        tracing::info!(grain, snapshot = %name, frozen_ms = frozen.as_millis() as u64, "snapshot taken");
        Ok(SnapshotTaken {
            name,
            report,
            frozen_micros: frozen.as_micros() as u64,
        })
    }

    pub async fn list_snapshots(&self, grain: &str) -> Result<Vec<Snapshot>, GrainError> {
        self.slot(grain).await?;
        let (datasets, id) = (self.inner.params.datasets.clone(), grain.to_owned());
        let list = tokio::task::spawn_blocking(move || datasets.list_snapshots(&id))
            .await
            .map_err(|e| error(grain, Problem::Host(e.to_string())))?
            .map_err(|e| error(grain, Problem::Host(e.to_string())))?;
        Ok(list
            .into_iter()
            .map(|s| Snapshot {
                name: s.name,
                created: s.created,
            })
            .collect())
    }

    /// Deletes the automatic snapshots the retention grid does not keep.
    pub async fn prune(&self, grain: &str) -> Result<Vec<String>, GrainError> {
        self.slot(grain).await?;
        let (datasets, id) = (self.inner.params.datasets.clone(), grain.to_owned());
        let snaps = tokio::task::spawn_blocking(move || datasets.list_snapshots(&id))
            .await
            .map_err(|e| error(grain, Problem::Host(e.to_string())))?
            .map_err(|e| error(grain, Problem::Host(e.to_string())))?;
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
        .map_err(|e| error(grain, Problem::Host(e.to_string())))?
        .map_err(|e| error(grain, Problem::Host(e.to_string())))
    }

    /// Stops the grain, puts its dataset back to a snapshot, and starts it
    /// again if it was running. Returns whether it was.
    pub async fn rollback(&self, grain: &str, snapshot: &str) -> Result<bool, GrainError> {
        let slot = self.slot(grain).await?;
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
        let result = tokio::task::spawn_blocking(move || {
            datasets.rollback(&id, &name, uid)?;
            // The grain is told its data is older than what it last had.
            granary_datasets::mark_rewound(&datasets.path(&id), uid).map_err(|e| {
                granary_datasets::DatasetError {
                    grain: id.clone(),
                    op: "mark the data as set back",
                    source: e,
                }
            })
        })
        .await
        .map_err(|e| error(grain, Problem::Host(e.to_string())))
        .and_then(|r| r.map_err(|e| error(grain, Problem::Host(e.to_string()))));
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
    pub(crate) async fn snapshot_all(&self) {
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
}
