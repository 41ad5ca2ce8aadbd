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
}

fn read_marker(datasets: &dyn Datasets, grain: &str) -> Option<Marker> {
    let text = std::fs::read(datasets.grain_dir(grain).join(MARKER)).ok()?;
    // A mark that cannot be read still marks: the grain does not start.
    Some(serde_json::from_slice(&text).unwrap_or(Marker {
        id: String::new(),
        from_epoch: i64::MAX,
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

/// A move being received: the staging dataset the streams go to.
struct Incoming {
    grain: String,
    staging: String,
    uid: u32,
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
}

impl NodeMoves {
    pub(crate) fn new(
        member: Arc<Member>,
        store: Arc<granary_state::Store>,
        datasets: Arc<dyn Datasets>,
        grains: Arc<dyn Grains>,
        apps_dir: PathBuf,
    ) -> NodeMoves {
        NodeMoves(Arc::new(Inner {
            member,
            store,
            datasets,
            grains,
            apps_dir,
            incoming: Mutex::default(),
        }))
    }
}

impl Inner {
    fn take(&self, id: &str) -> Option<Incoming> {
        self.incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)
    }

    fn staging_of(&self, grain: &GrainId, id: &str) -> Result<(String, u32), String> {
        let incoming = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
        match incoming.get(id) {
            Some(i) if i.grain == grain.to_string() => Ok((i.staging.clone(), i.uid)),
            _ => Err(format!(
                "node {} has no move {id} of {} (did it restart?)",
                self.member.node,
                grain.shown()
            )),
        }
    }

    async fn prepare(
        self: Arc<Self>,
        grain: GrainId,
        id: String,
        from: String,
    ) -> Result<(), String> {
        let g = grain.to_string();
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
            // switched to, goes; anything else is real data.
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
        // The app's image now, not while the grain is down.
        let image = self.apps_dir.join(image).join("image");
        if !image.exists() {
            crate::daemon::cluster::fetch_image(&self.member, &image).await?;
        }
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
        tracing::info!(grain = %g, move_id = id, from, staging, "taking a grain moved here");
        self.incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id,
                Incoming {
                    grain: g,
                    staging,
                    uid,
                },
            );
        Ok(())
    }

    async fn receive(
        self: Arc<Self>,
        grain: GrainId,
        id: String,
        stream: Box<dyn Read + Send>,
    ) -> Result<u64, String> {
        let (staging, uid) = self.staging_of(&grain, &id)?;
        let datasets = self.datasets.clone();
        tokio::task::spawn_blocking(move || {
            let mut counted = Counted {
                inner: stream,
                n: 0,
            };
            granary_backup::tree::apply_stream(&mut counted, &datasets.path(&staging), Some(uid))
                .map_err(msg)?;
            // To the end frame: only then was the stream whole.
            std::io::copy(&mut counted, &mut std::io::sink()).map_err(msg)?;
            Ok(counted.n)
        })
        .await
        .map_err(msg)?
    }

    async fn commit(
        self: Arc<Self>,
        grain: GrainId,
        id: String,
        from_epoch: i64,
    ) -> Result<(), String> {
        let (staging, uid) = self.staging_of(&grain, &id)?;
        let datasets = self.datasets.clone();
        let g = grain.to_string();
        let i2 = id.clone();
        tokio::task::spawn_blocking(move || {
            sync_fs(&datasets.path(&staging))?;
            let dir = datasets.grain_dir(&g);
            std::fs::create_dir_all(&dir).map_err(msg)?;
            let marker = serde_json::to_vec(&Marker { id: i2, from_epoch }).map_err(msg)?;
            granary_files::write_atomic(&dir.join(MARKER), &marker, 0o600).map_err(msg)?;
            if let Err(e) = datasets.rename(&staging, &g, uid) {
                let _ = std::fs::remove_file(dir.join(MARKER));
                return Err(e.to_string());
            }
            Ok(())
        })
        .await
        .map_err(msg)??;
        self.take(&id);
        tracing::info!(grain = %grain, move_id = id, from_epoch, "a moved grain's data is in place, waiting for its placement");
        Ok(())
    }

    async fn activate(self: Arc<Self>, grain: GrainId, id: String) -> Result<(), String> {
        // The gate clears the mark: it checks the placement switched.
        self.grains
            .start(&grain, Start::Running)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(grain = %grain, move_id = id, "a grain moved here runs");
        Ok(())
    }

    async fn abort(self: Arc<Self>, grain: GrainId, id: String) -> Result<(), String> {
        let staged = self.take(&id);
        let datasets = self.datasets.clone();
        let g = grain.to_string();
        tokio::task::spawn_blocking(move || {
            if let Some(s) = staged {
                datasets.destroy(&s.staging).map_err(msg)?;
            }
            // Committed but never switched to: only this move's data.
            if read_marker(&*datasets, &g).is_some_and(|m| m.id == id) {
                datasets.destroy_data(&g).map_err(msg)?;
                let _ = std::fs::remove_file(datasets.grain_dir(&g).join(MARKER));
            }
            Ok(())
        })
        .await
        .map_err(msg)?
    }
}

impl Moves for NodeMoves {
    fn prepare(&self, grain: &GrainId, id: &str, from: &str) -> MoveFuture<()> {
        Box::pin(
            self.0
                .clone()
                .prepare(grain.clone(), id.to_owned(), from.to_owned()),
        )
    }
    fn receive(&self, grain: &GrainId, id: &str, stream: Box<dyn Read + Send>) -> MoveFuture<u64> {
        Box::pin(self.0.clone().receive(grain.clone(), id.to_owned(), stream))
    }
    fn commit(&self, grain: &GrainId, id: &str, from_epoch: i64) -> MoveFuture<()> {
        Box::pin(
            self.0
                .clone()
                .commit(grain.clone(), id.to_owned(), from_epoch),
        )
    }
    fn activate(&self, grain: &GrainId, id: &str) -> MoveFuture<()> {
        Box::pin(self.0.clone().activate(grain.clone(), id.to_owned()))
    }
    fn abort(&self, grain: &GrainId, id: &str) -> MoveFuture<()> {
        Box::pin(self.0.clone().abort(grain.clone(), id.to_owned()))
    }
}

struct Counted {
    inner: Box<dyn Read + Send>,
    n: u64,
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

/// Flushes the filesystem holding `dir` to disk.
fn sync_fs(dir: &std::path::Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(dir).map_err(|e| format!("cannot open {}: {e}", dir.display()))?;
    nix::unistd::syncfs(f.as_raw_fd()).map_err(|e| format!("cannot sync {}: {e}", dir.display()))
}
