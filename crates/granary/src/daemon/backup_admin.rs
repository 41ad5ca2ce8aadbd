//! The daemon side of backups: exports (snapshots through the supervisor,
//! streams on the blocking pool), restores onto this node, drills, and
//! the schedule of every configured target.
//!
//! The heavy work is `granary-backup`'s and blocks; it runs on one
//! blocking thread per operation, which asks the admin thread (where the
//! supervisor lives) for consistent snapshots over a channel and sends
//! progress the same way. One backup operation runs at a time.

use std::collections::HashSet;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use granary_backup::catalogue::{GrainEntry, GrantEntry};
use granary_backup::export::{Exporter, StreamReport};
use granary_backup::progress::Progress;
use granary_backup::restore::RestoreJob;
use granary_backup::target::{DirTarget, Target};
use granary_backup::{BackupError, crypt};
use granary_config::{Backup, BackupPlace};
use granary_datasets::Datasets;
use granary_model::UserName;
use granary_package::SigningKey;
use granary_schema::admin_capnp::progress;
use granary_state::{HostUid, Store};
use granary_supervisor::Supervisor;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

/// Who appears as the actor in audit events of backups.
const ACTOR: &str = "backup";

pub(super) struct Backups {
    pub(super) store: Arc<Store>,
    pub(super) sup: Supervisor,
    pub(super) datasets: Arc<dyn Datasets>,
    pub(super) uids: HostUid,
    pub(super) config: Backup,
    pub(super) data_dir: PathBuf,
    pub(super) busy: tokio::sync::Mutex<()>,
}

/// Where a backup is read or written.
#[derive(Debug, Clone)]
pub(super) enum Place {
    Dir(PathBuf),
    /// A `[[backup.targets]]` entry.
    Named(String),
}

/// What the blocking side asks of the admin thread.
enum Msg {
    Snapshot {
        grain: String,
        label: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Progress(Progress),
}

/// One grain's outcome in an export.
#[derive(Debug, Serialize)]
pub(super) struct GrainExport {
    pub(super) grain: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) stream: Option<StreamReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) error: Option<String>,
}

#[derive(Debug, Serialize)]
pub(super) struct RestoreReport {
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
pub(super) struct DrillResult {
    pub(super) grain: String,
    pub(super) ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) snapshot: Option<String>,
    pub(super) bytes: u64,
    pub(super) seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) error: Option<String>,
}

fn msg(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Backups {
    fn key(&self) -> Result<SigningKey, BackupError> {
        granary_backup::node_key(&self.data_dir)
    }

    /// Opens the place (blocking) and names it for hold tags.
    fn open(
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

    /// Forwards messages from the blocking side until it is done.
    async fn pump<T>(
        &self,
        mut rx: mpsc::Receiver<Msg>,
        work: tokio::task::JoinHandle<T>,
        progress: Option<progress::Client>,
    ) -> Result<T, String> {
        while let Some(m) = rx.recv().await {
            match m {
                Msg::Snapshot {
                    grain,
                    label,
                    reply,
                } => {
                    let r = self
                        .sup
                        .snapshot(&grain, &label)
                        .await
                        .map(drop)
                        .map_err(msg);
                    let _ = reply.send(r);
                }
                Msg::Progress(p) => {
                    tracing::debug!(grain = %p.grain, phase = %p.phase, bytes = p.bytes, "backup progress");
                    if let Some(client) = &progress {
                        let mut req = client.update_request();
                        req.get()
                            .set_json(serde_json::to_string(&p).unwrap_or_default());
                        // A CLI that went away or stalls does not stop the
                        // backup.
                        let _ = tokio::time::timeout(
                            std::time::Duration::from_secs(2),
                            req.send().promise,
                        )
                        .await;
                    }
                }
            }
        }
        work.await.map_err(|e| format!("internal error: {e}"))
    }

    /// What a catalogue records of each grain, gathered from the state.
    async fn metadata(
        &self,
        user: Option<String>,
        grain: Option<String>,
    ) -> Result<Vec<(String, GrainEntry)>, String> {
        let store = self.store.clone();
        let datasets = self.datasets.clone();
        tokio::task::spawn_blocking(move || {
            let grants = store.live_grants().map_err(msg)?;
            let mut out = Vec::new();
            for g in store.list_grains().map_err(msg)? {
                if user.as_ref().is_some_and(|u| *u != g.user)
                    || grain.as_ref().is_some_and(|x| *x != g.id)
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
                    grain.unwrap_or_default()
                ));
            }
            Ok(out)
        })
        .await
        .map_err(msg)?
    }

    /// Exports the selected grains to `place`; one grain failing does not
    /// stop the others.
    pub(super) async fn export(
        &self,
        place: Place,
        user: Option<String>,
        grain: Option<String>,
        progress: Option<progress::Client>,
    ) -> Result<Vec<GrainExport>, String> {
        let _busy = self.busy.lock().await;
        let recipients = crypt::Recipients::parse(&self.config.recipients).map_err(msg)?;
        let grains = self.metadata(user, grain).await?;
        let key = self.key().map_err(msg)?;
        let (config, datasets) = (self.config.clone(), self.datasets.clone());
        let (tx, rx) = mpsc::channel(16);
        let work = tokio::task::spawn_blocking(move || -> Result<Vec<GrainExport>, String> {
            let (mut target, place_name) = Self::open(&place, &config, &key).map_err(msg)?;
            let tag = granary_backup::hold_tag(&place_name);
            let mut exporter = Exporter::open(
                target.as_mut(),
                &key,
                &recipients,
                config.chunk_bytes as usize,
            )
            .map_err(msg)?;
            let mut results = Vec::new();
            for (id, meta) in grains {
                let r = export_one(&mut exporter, &id, meta, datasets.as_ref(), &tag, &tx);
                if let Err(e) = &r {
                    tracing::warn!(grain = %id, error = %e, "backup export failed");
                }
                results.push(GrainExport {
                    grain: id,
                    error: r.as_ref().err().cloned(),
                    stream: r.ok(),
                });
            }
            Ok(results)
        });
        let results = self.pump(rx, work, progress).await??;
        let (store, detail) = (
            self.store.clone(),
            results
                .iter()
                .map(|r| {
                    format!(
                        "{}={}",
                        r.grain,
                        if r.error.is_some() { "failed" } else { "ok" }
                    )
                })
                .collect::<Vec<_>>()
                .join(" "),
        );
        let _ = tokio::task::spawn_blocking(move || {
            store.record_event(ACTOR, "backup.export", "-", &detail)
        })
        .await;
        Ok(results)
    }

    /// Restores one grain from `place` onto this node and starts it.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn restore(
        &self,
        place: Place,
        grain_ref: &str,
        identity: Vec<u8>,
        as_user: Option<String>,
        snapshot: Option<String>,
        trust: Vec<String>,
        progress: Option<progress::Client>,
    ) -> Result<RestoreReport, String> {
        let _busy = self.busy.lock().await;
        let identity = crypt::Identity::parse(&identity).map_err(msg)?;
        let key = self.key().map_err(msg)?;
        let trusted = self.trusted(&key, &trust)?;
        let source_id = super::grain_admin::grain_id(grain_ref);

        // The catalogue first: nothing on this node changes until the
        // backup is known to be ours and to hold the grain.
        let (config, p2) = (self.config.clone(), place.clone());
        let k2 = key_copy(&key)?;
        let sid = source_id.clone();
        let entry = tokio::task::spawn_blocking(move || -> Result<GrainEntry, String> {
            let (mut target, _) = Self::open(&p2, &config, &k2).map_err(msg)?;
            let (catalogue, _) =
                granary_backup::restore::open_trusted(target.as_mut(), &trusted).map_err(msg)?;
            catalogue.grains.get(&sid).cloned().ok_or_else(|| {
                format!(
                    "the backup holds no grain {sid}; it holds: {}",
                    catalogue
                        .grains
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
        })
        .await
        .map_err(msg)??;

        // The app must be here: the same kind, signed by the same key.
        let store = self.store.clone();
        let kind = entry.kind.clone();
        let app = tokio::task::spawn_blocking(move || store.app(&kind))
            .await
            .map_err(msg)?
            .map_err(msg)?;
        let app = match app {
            Some(a) if a.app_id == entry.app_id => a,
            Some(a) => {
                return Err(format!(
                    "the {} app installed here is {} but the backup's is {}; install the backup's app (same signer) first",
                    entry.kind, a.app_id, entry.app_id
                ));
            }
            None => {
                return Err(format!(
                    "the {} app ({}, version {}) is not installed on this node; install it first: granary app install PACKAGE",
                    entry.kind, entry.app_id, entry.app_version
                ));
            }
        };
        let user = UserName::new(as_user.as_deref().unwrap_or(&entry.user)).map_err(msg)?;
        let id = super::grain_admin::grain_id(&format!("{user}/{}", entry.kind));

        // The owner and the grain record (as `user add` would make them).
        let (store, datasets, uids) = (self.store.clone(), self.datasets.clone(), self.uids);
        let (u2, i2, kind) = (user.clone(), id.clone(), entry.kind.clone());
        let (uid, user_created) = tokio::task::spawn_blocking(move || -> Result<(u32, bool), String> {
            let mut created = false;
            if store.user(&u2).map_err(msg)?.is_none() {
                // No password is known: the admin sets one afterwards.
                let unusable = granary_auth::generate_password().map_err(msg)?;
                let hash = granary_auth::hash_password(&unusable).map_err(msg)?;
                store.add_user(&u2, &hash, ACTOR).map_err(msg)?;
                created = true;
            }
            let grain = match store.grain(&i2).map_err(msg)? {
                Some(g) => g,
                None => store.create_grain(&i2, &u2, &kind, uids, ACTOR).map_err(msg)?,
            };
            if datasets.has_data(&i2).map_err(msg)? {
                return Err(format!(
                    "grain {} already holds data; restore it under another user (--as USER), or remove that data first",
                    i2.replacen('-', "/", 1)
                ));
            }
            Ok((grain.host_uid, created))
        })
        .await
        .map_err(msg)??;
        // Stopped and held while its data is put in place, so nothing
        // starts it on an empty dataset meanwhile; the start below clears
        // the hold.
        self.sup.retire(&id).await.map_err(msg)?;

        let (config, datasets) = (self.config.clone(), self.datasets.clone());
        let (tx, rx) = mpsc::channel(16);
        let (i2, sid, snap, e2) = (
            id.clone(),
            source_id.clone(),
            snapshot.clone(),
            entry.clone(),
        );
        let work = tokio::task::spawn_blocking(
            move || -> Result<granary_backup::restore::Restored, String> {
                let (mut target, _) = Self::open(&place, &config, &key).map_err(msg)?;
                let staging = granary_backup::staging_id("restore");
                let done = RestoreJob {
                    grain_id: &sid,
                    grain: &e2,
                    snapshot: snap.as_deref(),
                    identity: &identity,
                    datasets: datasets.as_ref(),
                    staging: &staging,
                    uid,
                }
                .run(target.as_mut(), &mut |p| {
                    let _ = tx.try_send(Msg::Progress(p.clone()));
                })
                .map_err(msg)?;
                if let Err(e) = datasets.rename(&staging, &i2, uid) {
                    let _ = datasets.destroy(&staging);
                    return Err(msg(e));
                }
                Ok(done)
            },
        );
        let done = match self.pump(rx, work, progress).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) | Err(e) => {
                self.sup.unretire(&id);
                return Err(e);
            }
        };

        // Metadata: the data's app version (an older one migrates on
        // start), and the grants whose other end exists here.
        let data_version = entry
            .data_version
            .clone()
            .unwrap_or_else(|| entry.app_version.clone());
        let (store, i2) = (self.store.clone(), id.clone());
        // Only grants between the restored grain and another grain of the
        // same owner come back (as the new owner's): a grant with another
        // user's grain needs that user's say.
        let old_prefix = format!("{}-", entry.user);
        let new_prefix = format!("{}-", user.as_str());
        let (from_id, to_id) = (source_id.clone(), id.clone());
        let map = move |g: &str| -> Option<String> {
            if g == from_id {
                return Some(to_id.clone());
            }
            g.strip_prefix(&old_prefix)
                .map(|rest| format!("{new_prefix}{rest}"))
        };
        let grants = entry.grants.clone();
        let detail = format!(
            "from={source_id} snapshot={} streams={} uid={uid}",
            done.snapshot, done.streams
        );
        let dv = data_version.clone();
        let recorded =
            tokio::task::spawn_blocking(move || -> Result<(Vec<String>, Vec<String>), String> {
                store.set_grain_app_version(&i2, &dv).map_err(msg)?;
                let live = store.live_grants().map_err(msg)?;
                let (mut restored, mut skipped) = (Vec::new(), Vec::new());
                for g in grants {
                    let (Some(from), Some(to)) = (map(&g.from), map(&g.to)) else {
                        skipped.push(format!(
                            "{} -> {} {} (another user's grain)",
                            g.from, g.to, g.capability
                        ));
                        continue;
                    };
                    let text = format!("{from} -> {to} {}", g.capability);
                    if live.iter().any(|l| {
                        l.from_grain == from && l.to_grain == to && l.capability == g.capability
                    }) {
                        restored.push(format!("{text} (already there)"));
                        continue;
                    }
                    let both = store.grain(&from).map_err(msg)?.is_some()
                        && store.grain(&to).map_err(msg)?.is_some();
                    if !both {
                        skipped.push(format!("{text} (the other grain is not on this node)"));
                        continue;
                    }
                    match store.add_grant(&from, &to, &g.capability, ACTOR) {
                        Ok(_) => restored.push(text),
                        Err(e) => skipped.push(format!("{text} ({e})")),
                    }
                }
                store
                    .record_event(ACTOR, "backup.restore", &i2, &detail)
                    .map_err(msg)?;
                Ok((restored, skipped))
            })
            .await
            .map_err(msg)
            .and_then(|r| r);
        let (restored, skipped) = match recorded {
            Ok(r) => r,
            Err(e) => {
                self.sup.unretire(&id);
                return Err(e);
            }
        };

        let start = self.sup.start_checked(&id).await;
        Ok(RestoreReport {
            grain: id.replacen('-', "/", 1),
            from_grain: source_id.replacen('-', "/", 1),
            snapshot: done.snapshot,
            streams: done.streams,
            bytes: done.bytes,
            seconds: done.seconds,
            host_uid: uid,
            app_version: format!("{} (data {data_version})", app.version),
            user_created,
            grants_restored: restored,
            grants_skipped: skipped,
            started: start.is_ok(),
            start_error: start.err().map(msg),
        })
    }

    /// Restores every grain (or one) into scratch datasets, compares each
    /// with the export's digest, and removes the scratch data.
    pub(super) async fn drill(
        &self,
        place: Place,
        grain: Option<String>,
        identity: Vec<u8>,
        trust: Vec<String>,
        progress: Option<progress::Client>,
    ) -> Result<Vec<DrillResult>, String> {
        let _busy = self.busy.lock().await;
        let identity = crypt::Identity::parse(&identity).map_err(msg)?;
        let key = self.key().map_err(msg)?;
        let trusted = self.trusted(&key, &trust)?;
        let (config, datasets) = (self.config.clone(), self.datasets.clone());
        let only = grain.map(|g| super::grain_admin::grain_id(&g));
        let (tx, rx) = mpsc::channel(16);
        let work = tokio::task::spawn_blocking(move || -> Result<Vec<DrillResult>, String> {
            let (mut target, _) = Self::open(&place, &config, &key).map_err(msg)?;
            let (catalogue, _) =
                granary_backup::restore::open_trusted(target.as_mut(), &trusted).map_err(msg)?;
            let mut results = Vec::new();
            for (id, entry) in &catalogue.grains {
                if only.as_ref().is_some_and(|o| o != id) {
                    continue;
                }
                let staging = granary_backup::staging_id("drill");
                let r = RestoreJob {
                    grain_id: id,
                    grain: entry,
                    snapshot: None,
                    identity: &identity,
                    datasets: datasets.as_ref(),
                    staging: &staging,
                    uid: nix::unistd::geteuid().as_raw(),
                }
                .run(target.as_mut(), &mut |p| {
                    let _ = tx.try_send(Msg::Progress(p.clone()));
                });
                if r.is_ok()
                    && let Err(e) = datasets.destroy(&staging)
                {
                    tracing::warn!(staging, error = %e, "cannot remove a drill's scratch dataset");
                }
                results.push(match r {
                    Ok(done) => DrillResult {
                        grain: id.clone(),
                        ok: true,
                        snapshot: Some(done.snapshot),
                        bytes: done.bytes,
                        seconds: done.seconds,
                        error: None,
                    },
                    Err(e) => DrillResult {
                        grain: id.clone(),
                        ok: false,
                        snapshot: None,
                        bytes: 0,
                        seconds: 0.0,
                        error: Some(e.to_string()),
                    },
                });
            }
            if results.is_empty() {
                return Err(match only {
                    Some(g) => format!("the backup holds no grain {g}"),
                    None => "the backup holds no grains".to_owned(),
                });
            }
            Ok(results)
        });
        let results = self.pump(rx, work, progress).await??;
        let (store, detail) = (
            self.store.clone(),
            results
                .iter()
                .map(|r| format!("{}={}", r.grain, if r.ok { "ok" } else { "failed" }))
                .collect::<Vec<_>>()
                .join(" "),
        );
        let _ = tokio::task::spawn_blocking(move || {
            store.record_event(ACTOR, "backup.drill", "-", &detail)
        })
        .await;
        Ok(results)
    }

    fn trusted(
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
    pub(super) fn describe(&self) -> Result<(String, Vec<String>, Vec<String>), String> {
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
    pub(super) fn schedule(self: &Rc<Self>) {
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
fn key_copy(key: &SigningKey) -> Result<SigningKey, String> {
    SigningKey::from_pkcs8(key.pkcs8_der()).map_err(msg)
}

/// One grain's export: resume its unfinished stream if the target has one
/// (and the snapshot is still here), else a new consistent snapshot,
/// incremental from the target's last one if this node still has it.
fn export_one(
    exporter: &mut Exporter<'_>,
    id: &str,
    meta: GrainEntry,
    datasets: &dyn Datasets,
    tag: &str,
    tx: &mpsc::Sender<Msg>,
) -> Result<StreamReport, String> {
    let here: HashSet<String> = datasets
        .list_snapshots(id)
        .map_err(msg)?
        .into_iter()
        .map(|s| s.name)
        .collect();
    let pending = exporter
        .pending(id)
        .map_err(msg)?
        .filter(|p| here.contains(&p.snapshot) && p.base.as_ref().is_none_or(|b| here.contains(b)));
    let (snapshot, base) = match pending {
        Some(p) => {
            tracing::info!(grain = id, snapshot = %p.snapshot, chunks = p.chunks, "resuming a cut-off export");
            (p.snapshot, p.base)
        }
        None => {
            // The tag's digits keep two targets' snapshots in one second apart.
            let stem = format!(
                "{}-{}",
                granary_datasets::timed_label("backup"),
                &tag[tag.len() - 6..]
            );
            // Two exports to one target within a second: number them.
            let label = std::iter::once(stem.clone())
                .chain((2..).map(|n| format!("{stem}-{n}")))
                .find(|l| !here.contains(l))
                .expect("an unused label");
            let (reply, answer) = oneshot::channel();
            tx.blocking_send(Msg::Snapshot {
                grain: id.to_owned(),
                label: label.clone(),
                reply,
            })
            .map_err(|_| "the daemon is stopping".to_owned())?;
            answer
                .blocking_recv()
                .map_err(|_| "the daemon is stopping".to_owned())??;
            let base = exporter.last_snapshot(id).filter(|b| here.contains(b));
            if base.is_none() && exporter.last_snapshot(id).is_some() {
                tracing::warn!(
                    grain = id,
                    "the last exported snapshot is gone from this node; exporting a full stream"
                );
            }
            (label, base)
        }
    };
    datasets.hold(id, &snapshot, tag).map_err(msg)?;
    let exported = exporter.export(id, meta, &snapshot, base.as_deref(), datasets, &mut |p| {
        let _ = tx.try_send(Msg::Progress(p.clone()));
    });
    let report = match exported {
        Ok(r) => r,
        Err(e) => {
            // Kept only if the next export can resume from it; otherwise
            // every failed round would leave a held snapshot behind.
            let resumable = exporter
                .pending(id)
                .ok()
                .flatten()
                .is_some_and(|p| p.snapshot == snapshot);
            if !resumable {
                let _ = datasets.release(id, &snapshot, tag);
                let _ = datasets.delete_snapshot(id, &snapshot);
            }
            return Err(msg(e));
        }
    };
    // The new snapshot is the next base; the old one may go.
    if let Some(b) = &base {
        datasets.release(id, b, tag).map_err(msg)?;
        if b.starts_with("backup-")
            && let Err(e) = datasets.delete_snapshot(id, b)
        {
            tracing::debug!(grain = id, snapshot = %b, error = %e, "old backup base kept (another target holds it)");
        }
    }
    Ok(report)
}
