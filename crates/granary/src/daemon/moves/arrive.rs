//! The target's side of a move: the node link's move steps, answered
//! with this node's datasets and supervisor, and the mark that keeps
//! arriving data from starting before its placement switched here.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use granary_cluster::Moves;
use granary_cluster::moves::MoveFuture;
use granary_datasets::Datasets;
use granary_grains::{GrainId, Grains, Start};
use serde::{Deserialize, Serialize};

use super::msg;
use crate::daemon::cluster::Member;

/// The file beside an arriving grain's data: `{"move":..,"from_epoch":..}`.
const MARKER: &str = "moving";

#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    #[serde(rename = "move")]
    id: String,
    from_epoch: i64,
    /// The data moved was empty (a grain that stores nothing yet).
    #[serde(default)]
    empty: bool,
}

fn read_marker(datasets: &dyn Datasets, grain: &str) -> Option<Marker> {
    let text = std::fs::read(datasets.grain_dir(grain).join(MARKER)).ok()?;
    // A mark that cannot be read still marks: the grain does not start.
    Some(serde_json::from_slice(&text).unwrap_or(Marker {
        id: String::new(),
        from_epoch: i64::MAX,
        empty: false,
    }))
}

/// What the start gate asks of a grain's dataset on a cluster node:
/// `Ok` when it may start under the placement of epoch `epoch` here. Data
/// moved here is marked until the placement switches: it may start only
/// under a newer epoch than the one it was moved from, and the mark goes
/// then.
pub(crate) fn admit_arrival(
    datasets: &dyn Datasets,
    grain: &str,
    epoch: i64,
) -> Result<(), String> {
    let Some(marker) = read_marker(datasets, grain) else {
        return Ok(());
    };
    if epoch <= marker.from_epoch {
        return Err(format!(
            "its data is being moved here (move {}) and the placement has not switched yet",
            marker.id
        ));
    }
    // The rename that put it in place did not survive a crash: never start
    // the empty dataset a start makes instead.
    if !marker.empty && !datasets.has_data(grain).map_err(msg)? {
        return Err(format!(
            "the data moved here (move {}) is missing; move the grain again from its source's kept copy",
            marker.id
        ));
    }
    match std::fs::remove_file(datasets.grain_dir(grain).join(MARKER)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(format!("cannot clear its arrival mark: {e}"))
        }
        _ => {
            tracing::info!(grain, move_id = %marker.id, epoch, "a moved grain's data starts under its new placement");
            Ok(())
        }
    }
}

/// Puts the data staged in `staging` in place as `grain`'s (blocking):
/// synced, marked as arriving from the placement of `from_epoch` (so it
/// starts only under a newer one), renamed into place, and the rename
/// made durable. Data already in place is refused by the rename.
pub(super) fn put_in_place(
    datasets: &dyn Datasets,
    staging: &str,
    grain: &str,
    uid: u32,
    id: &str,
    from_epoch: i64,
) -> Result<(), String> {
    sync_fs(&datasets.path(staging))?;
    let dir = datasets.grain_dir(grain);
    std::fs::create_dir_all(&dir).map_err(msg)?;
    let empty = std::fs::read_dir(datasets.path(staging))
        .map_err(msg)?
        .next()
        .is_none();
    let marker = serde_json::to_vec(&Marker {
        id: id.to_owned(),
        from_epoch,
        empty,
    })
    .map_err(msg)?;
    granary_files::write_atomic(&dir.join(MARKER), &marker, 0o600).map_err(msg)?;
    if let Err(e) = datasets.rename(staging, grain, uid) {
        let _ = std::fs::remove_file(dir.join(MARKER));
        return Err(e.to_string());
    }
    // The rename itself durable before the placement switches.
    let parent = dir.parent().unwrap_or(&dir).to_path_buf();
    for d in [&dir, &parent] {
        granary_files::sync_dir(d).map_err(msg)?;
    }
    Ok(())
}

/// Removes data put in place by arrival `id` that never started (its
/// placement did not switch), and its mark (blocking). Data of another
/// arrival, or unmarked, is left alone.
pub(super) fn undo_arrival(datasets: &dyn Datasets, grain: &str, id: &str) -> Result<(), String> {
    if read_marker(datasets, grain).is_some_and(|m| m.id == id) {
        datasets.destroy_data(grain).map_err(msg)?;
        let _ = std::fs::remove_file(datasets.grain_dir(grain).join(MARKER));
    }
    Ok(())
}

/// The id of the arrival (a move's, or a failover's `failover-<epoch>`)
/// `grain`'s data here is, while it has not started yet.
pub(super) fn arrival(datasets: &dyn Datasets, grain: &str) -> Option<String> {
    read_marker(datasets, grain).map(|m| m.id)
}

/// A move being received: the staging dataset the streams go to, and
/// the node that drives it with the placement epoch it holds.
struct Incoming {
    grain: String,
    staging: String,
    uid: u32,
    from: String,
    epoch: i64,
}

/// The target's side of moves, served on the node link.
pub(crate) struct NodeMoves(Arc<Inner>);

struct Inner {
    member: Arc<Member>,
    store: Arc<granary_state::Store>,
    datasets: Arc<dyn Datasets>,
    /// This node's own grains (never forwarded).
    grains: Arc<dyn Grains>,
    apps_dir: PathBuf,
    incoming: Mutex<HashMap<String, Incoming>>,
    /// Copies of other nodes' grains kept here.
    copies: Arc<super::replicate::Copies>,
    /// One prepare, commit or abort at a time: an abort never removes
    /// what a commit is putting in place.
    steps: tokio::sync::Mutex<()>,
}

impl NodeMoves {
    pub(crate) fn new(
        member: Arc<Member>,
        store: Arc<granary_state::Store>,
        datasets: Arc<dyn Datasets>,
        grains: Arc<dyn Grains>,
        apps_dir: PathBuf,
        copies: Arc<super::replicate::Copies>,
    ) -> NodeMoves {
        NodeMoves(Arc::new(Inner {
            member,
            store,
            datasets,
            grains,
            apps_dir,
            incoming: Mutex::default(),
            copies,
            steps: tokio::sync::Mutex::new(()),
        }))
    }
}

impl Inner {
    /// This node as the source of a move it was asked to drive.
    fn source(&self) -> super::Source {
        super::Source {
            member: self.member.clone(),
            grains: self.grains.clone(),
            datasets: self.datasets.clone(),
            records: Arc::new(crate::daemon::ledger::NodeRecords {
                store: self.store.clone(),
                apps_dir: self.apps_dir.clone(),
            }),
        }
    }

    /// Move `id` of `grain` driven by `from`, if it is under way here:
    /// its staging dataset, the grain's uid and the placement's epoch.
    fn staging_of(
        &self,
        grain: &GrainId,
        id: &str,
        from: &str,
    ) -> Result<(String, u32, i64), String> {
        let incoming = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
        match incoming.get(id) {
            Some(i) if i.grain == grain.to_string() && i.from == from => {
                Ok((i.staging.clone(), i.uid, i.epoch))
            }
            _ => Err(format!(
                "node {} has no move {id} of {} from node {from} (did it restart?)",
                self.member.node,
                grain.shown()
            )),
        }
    }

    /// Where the cluster places `grain` now, as (node, epoch).
    async fn placed(&self, grain: &str) -> Result<Option<(String, i64)>, String> {
        self.member
            .coordinator
            .placement(grain)
            .await
            .map(|p| p.map(|p| (p.node, p.epoch)))
            .map_err(|e| format!("cannot check with the cluster: {e}"))
    }

    async fn prepare(
        self: Arc<Self>,
        grain: GrainId,
        id: String,
        from: String,
        seen: u64,
    ) -> Result<(), String> {
        let g = grain.to_string();
        // The source has seen records this node may not have read yet (a
        // grain made a moment ago): read them first.
        if self.store.position() < seen {
            let records = crate::daemon::ledger::NodeRecords {
                store: self.store.clone(),
                apps_dir: self.apps_dir.clone(),
            };
            granary_cluster::Records::reach(&records, seen)
                .await
                .map_err(|e| {
                    format!(
                        "node {} is behind the cluster's records: {e}",
                        self.member.node
                    )
                })?;
        }
        // Only the grain's owner moves it, under the placement it holds.
        let epoch = match self.placed(&g).await? {
            Some((owner, epoch)) if owner == from => epoch,
            other => {
                return Err(format!(
                    "node {from} asked to move {} here, but it is placed on {}",
                    grain.shown(),
                    other.map_or("no node".to_owned(), |(n, _)| format!("node {n}"))
                ));
            }
        };
        let (store, datasets) = (self.store.clone(), self.datasets.clone());
        let node = self.member.node.clone();
        let g2 = g.clone();
        let (record, image) = tokio::task::spawn_blocking(move || {
            let record = store
                .grain(&g2)
                .map_err(msg)?
                .ok_or_else(|| format!("node {node} has no grain {g2} in its records yet"))?;
            let app = store
                .app(&record.kind)
                .map_err(msg)?
                .ok_or_else(|| format!("node {node} has no {} app in its records", record.kind))?;
            // What an earlier move left here, committed but never
            // switched to (the grain is placed elsewhere: checked above),
            // goes; anything else is real data.
            if read_marker(&*datasets, &g2).is_some() {
                datasets.destroy_data(&g2).map_err(msg)?;
                let _ = std::fs::remove_file(datasets.grain_dir(&g2).join(MARKER));
            }
            if datasets.has_data(&g2).map_err(msg)? {
                return Err(format!(
                    "node {node} already holds data of {g2} ({}); move it aside first",
                    datasets.path(&g2).display()
                ));
            }
            Ok::<_, String>((record, app.image_dir()))
        })
        .await
        .map_err(msg)??;
        // The app's image now, not while the grain is down (and before the
        // steps lock: other moves' commits do not wait for a fetch).
        let image = self.apps_dir.join(image).join("image");
        if !image.exists() {
            crate::daemon::cluster::fetch_image(&self.member, &image).await?;
        }
        let _step = self.steps.lock().await;
        // An earlier attempt's staging for this grain goes.
        let stale: Vec<Incoming> = {
            let mut incoming = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
            let ids: Vec<String> = incoming
                .iter()
                .filter(|(_, i)| i.grain == g)
                .map(|(k, _)| k.clone())
                .collect();
            ids.iter().filter_map(|k| incoming.remove(k)).collect()
        };
        let datasets = self.datasets.clone();
        let staging = granary_backup::staging_id("move");
        let (s2, uid) = (staging.clone(), record.host_uid);
        tokio::task::spawn_blocking(move || {
            for old in stale {
                let _ = datasets.destroy(&old.staging);
            }
            datasets.create(&s2, uid).map(drop).map_err(msg)
        })
        .await
        .map_err(msg)??;
        tracing::info!(grain = %g, move_id = id, from, staging, epoch, "taking a grain moved here");
        self.incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id,
                Incoming {
                    grain: g,
                    staging,
                    uid,
                    from,
                    epoch,
                },
            );
        Ok(())
    }

    async fn receive(
        self: Arc<Self>,
        grain: GrainId,
        id: String,
        from: String,
        stream: Box<dyn Read + Send>,
    ) -> Result<u64, String> {
        let (staging, uid, _) = self.staging_of(&grain, &id, &from)?;
        let datasets = self.datasets.clone();
        tokio::task::spawn_blocking(move || {
            // On disk now, while the grain still runs on the source: the
            // commit's sync (the grain down) then has only the last delta
            // to write.
            let mut stream = stream;
            apply_synced(&mut *stream, &datasets.path(&staging), uid)
        })
        .await
        .map_err(msg)?
    }

    async fn commit(
        self: Arc<Self>,
        grain: GrainId,
        id: String,
        from: String,
        from_epoch: i64,
    ) -> Result<(), String> {
        let _step = self.steps.lock().await;
        let (staging, uid, epoch) = self.staging_of(&grain, &id, &from)?;
        if from_epoch != epoch {
            return Err(format!(
                "move {id} was prepared under epoch {epoch}, not {from_epoch}"
            ));
        }
        let datasets = self.datasets.clone();
        let g = grain.to_string();
        let i2 = id.clone();
        tokio::task::spawn_blocking(move || {
            put_in_place(&*datasets, &staging, &g, uid, &i2, from_epoch)
        })
        .await
        .map_err(msg)??;
        self.incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        tracing::info!(grain = %grain, move_id = id, from_epoch, "a moved grain's data is in place, waiting for its placement");
        Ok(())
    }

    async fn activate(
        self: Arc<Self>,
        grain: GrainId,
        id: String,
        _from: String,
    ) -> Result<(), String> {
        // The gate clears the mark: it checks the placement switched.
        self.grains
            .start(&grain, Start::Running)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(grain = %grain, move_id = id, "a grain moved here runs");
        Ok(())
    }

    async fn abort(
        self: Arc<Self>,
        grain: GrainId,
        id: String,
        from: String,
    ) -> Result<(), String> {
        let _step = self.steps.lock().await;
        let g = grain.to_string();
        let staged = {
            let mut incoming = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
            match incoming.get(&id) {
                Some(i) if i.grain == g && i.from == from => incoming.remove(&id),
                _ => None,
            }
        };
        // Data put in place is this move's to remove only while the
        // grain is placed on the node that drove it: after a switch here
        // it is the grain's only live copy.
        let switched_here = match self.placed(&g).await? {
            Some((node, _)) => node == self.member.node,
            None => false,
        };
        let datasets = self.datasets.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(s) = staged {
                datasets.destroy(&s.staging).map_err(msg)?;
            }
            if !switched_here {
                undo_arrival(&*datasets, &g, &id)?;
            }
            Ok(())
        })
        .await
        .map_err(msg)?
    }
}

impl Moves for NodeMoves {
    fn replica_ready(&self, grain: &GrainId, from: &str, base: Option<&str>) -> Result<(), String> {
        self.0.copies.ready(grain.as_ref(), from, base)
    }
    fn replica(
        &self,
        grain: &GrainId,
        from: &str,
        label: &str,
        base: Option<&str>,
        epoch: i64,
        stream: Box<dyn Read + Send>,
    ) -> MoveFuture<u64> {
        let inner = self.0.clone();
        let (grain, from, label, base) = (
            grain.clone(),
            from.to_owned(),
            label.to_owned(),
            base.map(str::to_owned),
        );
        Box::pin(async move {
            super::replicate::receive(
                &inner.member,
                inner.store.clone(),
                inner.copies.clone(),
                grain,
                from,
                label,
                base,
                epoch,
                stream,
            )
            .await
        })
    }
    fn prepare(&self, grain: &GrainId, id: &str, from: &str, seen: u64) -> MoveFuture<()> {
        let inner = self.0.clone();
        Box::pin(inner.prepare(grain.clone(), id.to_owned(), from.to_owned(), seen))
    }
    fn expects(&self, grain: &GrainId, id: &str, from: &str) -> Result<(), String> {
        self.0.staging_of(grain, id, from).map(drop)
    }
    fn receive(
        &self,
        grain: &GrainId,
        id: &str,
        from: &str,
        stream: Box<dyn Read + Send>,
    ) -> MoveFuture<u64> {
        let inner = self.0.clone();
        Box::pin(inner.receive(grain.clone(), id.to_owned(), from.to_owned(), stream))
    }
    fn commit(&self, grain: &GrainId, id: &str, from: &str, from_epoch: i64) -> MoveFuture<()> {
        let inner = self.0.clone();
        Box::pin(inner.commit(grain.clone(), id.to_owned(), from.to_owned(), from_epoch))
    }
    fn activate(&self, grain: &GrainId, id: &str, from: &str) -> MoveFuture<()> {
        let inner = self.0.clone();
        Box::pin(inner.activate(grain.clone(), id.to_owned(), from.to_owned()))
    }
    fn abort(&self, grain: &GrainId, id: &str, from: &str) -> MoveFuture<()> {
        let inner = self.0.clone();
        Box::pin(inner.abort(grain.clone(), id.to_owned(), from.to_owned()))
    }
    fn run(
        &self,
        job: granary_cluster::moves::Job,
        from: &str,
        progress: tokio::sync::mpsc::Sender<String>,
    ) -> MoveFuture<String> {
        let src = self.0.source();
        let from = from.to_owned();
        Box::pin(async move {
            // Progress as JSON lines for the link.
            let (tx, mut rx) = tokio::sync::mpsc::channel(64);
            let pass = tokio::spawn(async move {
                while let Some(p) = rx.recv().await {
                    if let Ok(line) = serde_json::to_string(&p) {
                        let _ = progress.try_send(line);
                    }
                }
            });
            let report = super::run(src, job, tx, Some(&from)).await;
            let _ = pass.await;
            report
        })
    }
}

/// Applies a tree stream to `into` (handing entries to `uid`), reads it to
/// its end frame (only then was it whole) and syncs the filesystem; the
/// bytes the stream carried.
pub(super) fn apply_synced(
    stream: &mut dyn Read,
    into: &std::path::Path,
    uid: u32,
) -> Result<u64, String> {
    struct Counted<'a>(&'a mut dyn Read, u64);
    impl Read for Counted<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.read(buf)?;
            self.1 += n as u64;
            Ok(n)
        }
    }
    let mut counted = Counted(stream, 0);
    granary_backup::tree::apply_stream(&mut counted, into, Some(uid)).map_err(msg)?;
    std::io::copy(&mut counted, &mut std::io::sink()).map_err(msg)?;
    sync_fs(into)?;
    Ok(counted.1)
}

/// Flushes the filesystem holding `dir` to disk.
pub(super) fn sync_fs(dir: &std::path::Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(dir).map_err(|e| format!("cannot open {}: {e}", dir.display()))?;
    nix::unistd::syncfs(f.as_raw_fd()).map_err(|e| format!("cannot sync {}: {e}", dir.display()))
}
