//! The daemon side of backups: exports (consistent snapshots through
//! [`Grains`], streams on the blocking pool), restores onto this node,
//! drills, and the schedule of every configured target. The admin
//! socket's `Backups` capability is its face.
//!
//! The heavy work is `granary-backup`'s and blocks; it runs on one
//! blocking thread per operation, which takes snapshots through `Grains`
//! and sends progress to the admin thread over a channel (the CLI's
//! progress capability lives there). One backup operation runs at a time.
//! `export.rs` exports; `restore.rs` restores and drills.

mod export;
mod restore;

use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use granary_backup::BackupError;
use granary_backup::catalogue::{GrainEntry, GrantEntry};
use granary_backup::export::StreamReport;
use granary_backup::progress::Progress;
use granary_backup::target::{DirTarget, Target};
use granary_config::{Backup, BackupPlace};
use granary_datasets::Datasets;
use granary_grains::{GrainId, Grains};
use granary_package::SigningKey;
use granary_schema::admin_capnp::progress;
use granary_state::{HostUid, Store};
use serde::Serialize;
use tokio::sync::mpsc;

/// Who appears as the actor in audit events of backups.
pub(super) const ACTOR: &str = "backup";

pub(crate) struct Backups {
    pub(crate) store: Arc<Store>,
    pub(crate) grains: Arc<dyn Grains>,
    pub(crate) datasets: Arc<dyn Datasets>,
    pub(crate) uids: HostUid,
    pub(crate) config: Backup,
    pub(crate) data_dir: PathBuf,
    pub(crate) busy: tokio::sync::Mutex<()>,
    /// The local CA's directory when it issues the certificate, and the
    /// domain: a user a restore makes gets their name in it.
    pub(crate) local_ca: Option<PathBuf>,
    pub(crate) domain: String,
}

/// Where a backup is read or written.
#[derive(Debug, Clone)]
pub(crate) enum Place {
    Dir(PathBuf),
    /// A `[[backup.targets]]` entry.
    Named(String),
}

/// Where the blocking side reports progress.
type ProgressTx = mpsc::Sender<Progress>;

/// One grain's outcome in an export.
#[derive(Debug, Serialize)]
pub(crate) struct GrainExport {
    pub(super) grain: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) stream: Option<StreamReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) error: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct RestoreReport {
    pub(super) grain: String,
    pub(super) from_grain: String,
    pub(super) snapshot: String,
    pub(super) streams: usize,
    pub(super) bytes: u64,
    pub(super) seconds: f64,
    pub(super) host_uid: u32,
    pub(super) app_version: String,
    pub(super) user_created: bool,
    pub(super) grants_restored: Vec<String>,
    pub(super) grants_skipped: Vec<String>,
    pub(super) started: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) start_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct DrillResult {
    pub(super) grain: String,
    pub(super) ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) snapshot: Option<String>,
    pub(super) bytes: u64,
    pub(super) seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) error: Option<String>,
}

pub(super) fn msg(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Backups {
    pub(super) fn key(&self) -> Result<SigningKey, BackupError> {
        granary_backup::node_key(&self.data_dir)
    }

    /// Opens the place (blocking) and names it for hold tags.
    pub(super) fn open(
        place: &Place,
        config: &Backup,
        key: &SigningKey,
    ) -> Result<(Box<dyn Target>, String), BackupError> {
        let dir = |d: &PathBuf| -> Result<(Box<dyn Target>, String), BackupError> {
            let t = DirTarget::new(d)?;
            let canonical = std::fs::canonicalize(d).unwrap_or_else(|_| d.clone());
            Ok((Box::new(t), format!("dir:{}", canonical.display())))
        };
        match place {
            Place::Dir(d) => dir(d),
            Place::Named(name) => {
                let t = config
                    .targets
                    .iter()
                    .find(|t| &t.name == name)
                    .ok_or_else(|| {
                        BackupError::Config(format!(
                            "no backup target {name:?} in the config (backup.targets has: {})",
                            config
                                .targets
                                .iter()
                                .map(|t| t.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                    })?;
                match &t.place {
                    BackupPlace::Dir(d) => dir(d),
                    BackupPlace::Remote {
                        address,
                        key: server,
                    } => {
                        let server = granary_backup::catalogue::parse_key(server)?;
                        let remote =
                            granary_backup::remote::RemoteTarget::connect(address, key, server)?;
                        Ok((
                            Box::new(remote),
                            format!("remote:{address}:{}", server.hex()),
                        ))
                    }
                }
            }
        }
    }
}

/// Forwards progress reports to the CLI's `progress` until `work` is done,
/// and gives its result.
pub(crate) async fn pump<T>(
    mut rx: mpsc::Receiver<Progress>,
    work: tokio::task::JoinHandle<T>,
    progress: Option<progress::Client>,
) -> Result<T, String> {
    while let Some(p) = rx.recv().await {
        tracing::debug!(grain = %p.grain, phase = %p.phase, bytes = p.bytes, "progress");
        if let Some(client) = &progress {
            let mut req = client.update_request();
            req.get()
                .set_json(serde_json::to_string(&p).unwrap_or_default());
            // A CLI that went away or stalls does not stop the work.
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(2), req.send().promise).await;
        }
    }
    work.await.map_err(|e| format!("internal error: {e}"))
}

impl Backups {
    /// What a catalogue records of each grain, gathered from the state.
    pub(super) async fn metadata(
        &self,
        user: Option<String>,
        grain: Option<GrainId>,
    ) -> Result<Vec<(String, GrainEntry)>, String> {
        let store = self.store.clone();
        let datasets = self.datasets.clone();
        tokio::task::spawn_blocking(move || {
            let grants = store.live_grants().map_err(msg)?;
            let mut out = Vec::new();
            for g in store.list_grains().map_err(msg)? {
                if user.as_ref().is_some_and(|u| *u != g.user)
                    || grain.as_ref().is_some_and(|x| x.as_str() != g.id)
                {
                    continue;
                }
                // A grain that never ran has nothing to back up.
                if !datasets.has_data(&g.id).unwrap_or(false) {
                    continue;
                }
                let Some(app) = store.app(&g.kind).map_err(msg)? else {
                    continue;
                };
                let data_version = store.grain_app_version(&g.id).map_err(msg)?;
                out.push((
                    g.id.clone(),
                    GrainEntry {
                        user: g.user.clone(),
                        kind: g.kind.clone(),
                        app_id: app.app_id.clone(),
                        app_version: app.version.clone(),
                        data_version: Some(data_version).filter(|v| !v.is_empty()),
                        host_uid: g.host_uid,
                        grants: grants
                            .iter()
                            .filter(|x| x.from_grain == g.id || x.to_grain == g.id)
                            .map(|x| GrantEntry {
                                from: x.from_grain.clone(),
                                to: x.to_grain.clone(),
                                capability: x.capability.clone(),
                            })
                            .collect(),
                        streams: Vec::new(),
                    },
                ));
            }
            if out.is_empty() && grain.is_some() {
                return Err(format!(
                    "grain {} does not exist or holds no data yet",
                    grain.map(|g| g.shown()).unwrap_or_default()
                ));
            }
            Ok(out)
        })
        .await
        .map_err(msg)?
    }

    pub(super) fn trusted(
        &self,
        key: &SigningKey,
        extra: &[String],
    ) -> Result<Vec<granary_package::PublicKey>, String> {
        let mut keys = vec![key.public()];
        for k in self.config.trust.iter().chain(extra) {
            keys.push(granary_backup::catalogue::parse_key(k).map_err(msg)?);
        }
        Ok(keys)
    }

    /// This node's key, the recipients and the targets.
    pub(crate) fn describe(&self) -> Result<(String, Vec<String>, Vec<String>), String> {
        let key = self.key().map_err(msg)?;
        let targets = self
            .config
            .targets
            .iter()
            .map(|t| {
                let place = match &t.place {
                    BackupPlace::Dir(d) => d.display().to_string(),
                    BackupPlace::Remote { address, .. } => format!("granary node {address}"),
                };
                let every = t
                    .interval
                    .map_or("by hand".to_owned(), |i| format!("every {}s", i.as_secs()));
                format!("{}: {place} ({every})", t.name)
            })
            .collect();
        Ok((key.public().hex(), self.config.recipients.clone(), targets))
    }

    /// Exports to every target with an interval, each on its own timer.
    pub(crate) fn schedule(self: &Rc<Self>) {
        for t in &self.config.targets {
            let Some(every) = t.interval else { continue };
            let (weak, name) = (Rc::downgrade(self), t.name.clone());
            tokio::task::spawn_local(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Some(this) = weak.upgrade() else { return };
                    match this
                        .export(Place::Named(name.clone()), None, None, None)
                        .await
                    {
                        Ok(results) => {
                            let failed = results.iter().filter(|r| r.error.is_some()).count();
                            tracing::info!(target = %name, grains = results.len(), failed, "scheduled backup done");
                        }
                        Err(e) => {
                            tracing::warn!(target = %name, error = %e, "scheduled backup failed")
                        }
                    }
                }
            });
        }
    }
}

/// A second handle on the node key (`SigningKey` is not `Clone`).
pub(super) fn key_copy(key: &SigningKey) -> Result<SigningKey, String> {
    SigningKey::from_pkcs8(key.pkcs8_der()).map_err(msg)
}
