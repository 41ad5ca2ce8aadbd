//! Replication: every `cluster.replicate_interval`, each grain this node
//! owns is snapshotted (consistently, as a backup's snapshot is) and sent
//! to `cluster.replicas` other nodes, as a delta from the copy each holds
//! (a tree stream over the node link, the move's framing), and the copy
//! recorded in etcd (`replica/<grain>/<node>`) with its snapshot's time:
//! the replication lag `granary node list` and `granary status` show.
//!
//! On the receiving node a copy lives in `DATA_DIR/replicas/<grain>/`
//! (root-only): `data/` and `state.json` (its sender, snapshot label,
//! epoch, and whether it is whole). A round marks the copy not whole before
//! it applies anything and whole again after a sync, so a round cut off
//! leaves a copy known to be partial, which the next round replaces whole.
//! Copies do not count against the grain's quota on its owner.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use granary_cluster::ReplicaRecord;
use granary_cluster::moves::{Step, Target};
use granary_grains::GrainId;
use serde::{Deserialize, Serialize};

use super::{Moving, Source, msg};

/// What a receiver says when its copy is not the base a delta is from:
/// the sender then sends the copy whole (any other failure does not throw
/// a good copy away).
const SEND_WHOLE: &str = "send it whole";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct State {
    pub(super) from: String,
    pub(super) label: String,
    pub(super) epoch: i64,
    pub(super) whole: bool,
}

/// This node's copies of other nodes' grains.
pub(crate) struct Copies {
    dir: PathBuf,
    busy: std::sync::Mutex<std::collections::HashSet<String>>,
}

pub(super) struct CopyClaim<'a> {
    copies: &'a Copies,
    grain: String,
}

impl Drop for CopyClaim<'_> {
    fn drop(&mut self) {
        self.copies
            .busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.grain);
    }
}

impl Copies {
    pub(crate) fn new(data_dir: &Path) -> Copies {
        Copies {
            dir: data_dir.join("replicas"),
            busy: std::sync::Mutex::default(),
        }
    }

    /// Drops copies no owner will update: of grains no longer placed
    /// anywhere (removed), or placed on a node other than the one that
    /// sent them (moved; the new owner sends whole if it picks this node).
    fn drop_orphans(&self, placements: &[granary_cluster::Placement]) {
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let grain = entry.file_name().to_string_lossy().into_owned();
            let owner = placements
                .iter()
                .find(|p| p.grain == grain)
                .map(|p| &p.node);
            let from = self.state(&grain).map(|s| s.from);
            if owner.is_none() || (from.is_some() && owner != from.as_ref()) {
                self.drop_copy(&grain);
            }
        }
    }

    pub(super) fn state(&self, grain: &str) -> Option<State> {
        let text = std::fs::read(self.dir.join(grain).join("state.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn write_state(&self, grain: &str, state: &State) -> Result<(), String> {
        let bytes = serde_json::to_vec(state).map_err(msg)?;
        granary_files::write_atomic(&self.dir.join(grain).join("state.json"), &bytes, 0o600)
            .map_err(msg)
    }

    /// Where the copy of `grain`'s data is.
    pub(super) fn data(&self, grain: &str) -> PathBuf {
        self.dir.join(grain).join("data")
    }

    /// Whether a stream that is a delta from `base` (or whole) applies to
    /// the copy of `grain` here.
    pub(crate) fn ready(&self, grain: &str, from: &str, base: Option<&str>) -> Result<(), String> {
        let Some(base) = base else { return Ok(()) };
        match self.state(grain) {
            Some(s) if s.whole && s.label == base && s.from == from => Ok(()),
            Some(s) if s.whole => Err(format!(
                "the copy of {grain} here is {}'s {}, not {from}'s {base}: {SEND_WHOLE}",
                s.from, s.label
            )),
            _ => Err(format!("no whole copy of {grain} here: {SEND_WHOLE}")),
        }
    }

    /// Applies one round's stream (blocking): see the module's text.
    fn apply(
        &self,
        grain: &str,
        state: State,
        base: Option<&str>,
        uid: u32,
        stream: &mut dyn std::io::Read,
    ) -> Result<u64, String> {
        let _one = self.claim(grain)?;
        self.ready(grain, &state.from, base)?;
        let dir = self.dir.join(grain);
        let data = dir.join("data");
        for d in [&self.dir, &dir] {
            std::fs::create_dir_all(d).map_err(msg)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).map_err(msg)?;
        }
        // A whole copy is made beside the old one, which stays whole until
        // the new one is; a delta changes the copy in place, marked not
        // whole until it is all applied and synced.
        let into = match base {
            None => {
                let fresh = dir.join("incoming");
                match std::fs::remove_dir_all(&fresh) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(msg(e)),
                    _ => {}
                }
                std::fs::create_dir(&fresh).map_err(msg)?;
                fresh
            }
            Some(_) => {
                self.write_state(
                    grain,
                    &State {
                        whole: false,
                        ..state.clone()
                    },
                )?;
                data.clone()
            }
        };
        let n = super::arrive::apply_synced(stream, &into, uid)?;
        if base.is_none() {
            self.write_state(
                grain,
                &State {
                    whole: false,
                    ..state.clone()
                },
            )?;
            match std::fs::remove_dir_all(&data) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(msg(e)),
                _ => {}
            }
            std::fs::rename(&into, &data).map_err(msg)?;
            granary_files::sync_dir(&dir).map_err(msg)?;
        }
        self.write_state(grain, &state)?;
        Ok(n)
    }

    /// One round at a time per copy: a second one (a sender that gave up
    /// on the first and tried again) is refused until the first ends.
    pub(super) fn claim(&self, grain: &str) -> Result<CopyClaim<'_>, String> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        if !busy.insert(grain.to_owned()) {
            return Err(format!(
                "a round of {grain}'s copy is still being applied here"
            ));
        }
        Ok(CopyClaim {
            copies: self,
            grain: grain.to_owned(),
        })
    }

    /// Drops the copy of `grain` (it runs here now, or is gone).
    pub(super) fn drop_copy(&self, grain: &str) {
        let dir = self.dir.join(grain);
        if dir.exists() {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => tracing::info!(grain, "dropped this node's copy of a grain it now runs"),
                Err(e) => tracing::warn!(grain, error = %e, "cannot drop a grain's copy"),
            }
        }
    }
}

/// The target's side of a replication round: checks that `from` owns the
/// grain (and that it does not run here), then applies the stream.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn receive(
    member: &crate::daemon::cluster::Member,
    store: Arc<granary_state::Store>,
    copies: Arc<Copies>,
    grain: GrainId,
    from: String,
    label: String,
    base: Option<String>,
    epoch: i64,
    mut stream: Box<dyn std::io::Read + Send>,
) -> Result<u64, String> {
    let g = grain.to_string();
    match member.coordinator.placement(&g).await {
        Ok(Some(p)) if p.node == from && p.epoch == epoch => {}
        Ok(p) => {
            return Err(format!(
                "node {from} sent a copy of {} under epoch {epoch}, but it is placed {}",
                grain.shown(),
                p.map_or("nowhere".to_owned(), |p| format!(
                    "on node {} under epoch {}",
                    p.node, p.epoch
                ))
            ));
        }
        Err(e) => return Err(format!("cannot check with the cluster: {e}")),
    }
    let g2 = g.clone();
    tokio::task::spawn_blocking(move || {
        let uid = store
            .grain(&g2)
            .map_err(msg)?
            .ok_or_else(|| format!("no grain {g2} in this node's records yet"))?
            .host_uid;
        let state = State {
            from,
            label,
            epoch,
            whole: true,
        };
        copies.apply(&g2, state, base.as_deref(), uid, &mut *stream)
    })
    .await
    .map_err(msg)?
}

/// Replicates this node's grains every `every`, to `replicas` other
/// nodes each, for as long as the daemon runs.
pub(crate) fn spawn(src: Source, copies: Arc<Copies>, replicas: u32, every: Duration) {
    if replicas == 0 {
        return;
    }
    tokio::spawn(async move {
        let mut bases: HashMap<(String, String), String> = HashMap::new();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if !src.member.lease.is_live() {
                continue;
            }
            if let Err(e) = round(&src, &copies, replicas as usize, &mut bases).await {
                tracing::warn!(error = %e, "replication round failed");
            }
        }
    });
}

async fn round(
    src: &Source,
    copies: &Arc<Copies>,
    replicas: usize,
    bases: &mut HashMap<(String, String), String>,
) -> Result<(), String> {
    let c = &src.member.coordinator;
    let me = &src.member.node;
    let etcd = |e: granary_cluster::ClusterError| format!("cannot check with the cluster: {e}");
    let placements = c.placements().await.map_err(etcd)?;
    // Copies of grains that run here now are no copies; nor are those no
    // owner will update.
    {
        let (copies, placements, me) = (copies.clone(), placements.clone(), me.clone());
        tokio::task::spawn_blocking(move || {
            for p in placements.iter().filter(|p| p.node == me) {
                copies.drop_copy(&p.grain);
            }
            copies.drop_orphans(&placements);
        })
        .await
        .map_err(msg)?;
    }
    let mut nodes: Vec<(String, String, String)> = c
        .nodes()
        .await
        .map_err(etcd)?
        .into_iter()
        .filter(|n| n.record.name != *me && !n.record.drained)
        .filter_map(|n| {
            let alive = n.alive?;
            let link = match alive.link.is_empty() {
                true => n.record.address.clone(),
                false => alive.link,
            };
            Some((n.record.name, link, n.record.key))
        })
        .collect();
    nodes.sort();
    if nodes.is_empty() {
        return Ok(());
    }
    let (started, mut sent, mut bytes) = (std::time::Instant::now(), 0u64, 0u64);
    for p in placements.iter().filter(|p| p.node == *me) {
        let Ok(grain) = GrainId::parse(&p.grain) else {
            continue;
        };
        // Moved or being moved, or a round already at it: next time.
        let Ok(_busy) = Moving::claim(&p.grain, "replication") else {
            continue;
        };
        if !src.datasets.path(&p.grain).exists() {
            continue;
        }
        if src
            .grains
            .status(&grain)
            .await
            .is_ok_and(|s| s.state == "held")
        {
            continue;
        }
        // The nodes holding a copy first, then the next ones after a
        // place that depends on the grain, so copies spread.
        let start = p
            .grain
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
            % nodes.len();
        let mut targets: Vec<&(String, String, String)> = nodes
            .iter()
            .filter(|n| bases.contains_key(&(p.grain.clone(), n.0.clone())))
            .collect();
        for i in 0..nodes.len() {
            let n = &nodes[(start + i) % nodes.len()];
            if !targets.contains(&n) {
                targets.push(n);
            }
        }
        targets.truncate(replicas);
        match replicate(src, &grain, p.epoch, &targets, bases).await {
            Ok(Some(b)) => (sent, bytes) = (sent + 1, bytes + b),
            // Every target failed (each logged).
            Ok(None) => {}
            Err(e) => tracing::warn!(grain = %p.grain, error = %e, "cannot replicate a grain"),
        }
    }
    if sent > 0 {
        let millis = started.elapsed().as_millis() as u64;
        tracing::info!(grains = sent, bytes, millis, "replication round");
    }
    Ok(())
}

/// One grain's round: a snapshot, sent to each target as a delta from its
/// copy (whole when it has none or another), recorded; then the
/// replication snapshots no node's copy is of any more are deleted. The
/// bytes sent to all targets, `None` when no target took it.
async fn replicate(
    src: &Source,
    grain: &GrainId,
    epoch: i64,
    targets: &[&(String, String, String)],
    bases: &mut HashMap<(String, String), String>,
) -> Result<Option<u64>, String> {
    let mut total = None;
    let g = grain.to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let label = format!("replica-{now}");
    src.grains
        .snapshot(grain, &label)
        .await
        .map_err(|e| e.to_string())?;
    for (node, link, key) in targets {
        let t = Target { address: link, key };
        let base = bases.get(&(g.clone(), node.clone())).cloned();
        let mut sent = send(src, &t, grain, &label, base.clone(), epoch).await;
        if base.is_some() && sent.as_ref().is_err_and(|e| e.contains(SEND_WHOLE)) {
            // Its copy is not the one we think (either side restarted).
            sent = send(src, &t, grain, &label, None, epoch).await;
        }
        match sent {
            Ok(bytes) => {
                total = Some(total.unwrap_or(0) + bytes);
                tracing::debug!(grain = %g, node, bytes, label, "replicated");
                bases.insert((g.clone(), node.clone()), label.clone());
                let record = ReplicaRecord {
                    label: label.clone(),
                    snapshot_unix: now,
                    epoch,
                };
                if let Err(e) = src.member.coordinator.set_replica(&g, node, &record).await {
                    tracing::warn!(grain = %g, node, error = %e, "cannot record a replica");
                }
            }
            Err(e) => {
                // Its copy is no base to count on any more.
                bases.remove(&(g.clone(), node.clone()));
                tracing::warn!(grain = %g, node, error = %e, "cannot replicate a grain to a node")
            }
        }
    }
    // Nodes no longer targets hold no base we keep.
    bases.retain(|(bg, n), _| *bg != g || targets.iter().any(|t| t.0 == *n));
    // Keep what some copy is of (the next round's base), drop the rest.
    let keep: Vec<String> = bases
        .iter()
        .filter(|((bg, _), _)| *bg == g)
        .map(|(_, l)| l.clone())
        .collect();
    let datasets = src.datasets.clone();
    tokio::task::spawn_blocking(move || {
        for s in datasets.list_snapshots(&g).unwrap_or_default() {
            if !s.name.starts_with("replica-") {
                continue;
            }
            // Not held: retention prunes only `auto-` snapshots, and a
            // base deleted by hand only makes the next round send whole.
            if !keep.contains(&s.name)
                && let Err(e) = datasets.delete_snapshot(&g, &s.name)
            {
                tracing::debug!(grain = %g, snapshot = s.name, error = %e, "replication snapshot kept");
            }
        }
    })
    .await
    .map_err(msg)?;
    Ok(total)
}

async fn send(
    src: &Source,
    t: &Target<'_>,
    grain: &GrainId,
    label: &str,
    base: Option<String>,
    epoch: i64,
) -> Result<u64, String> {
    let produce = super::snapshot_stream(&src.datasets, grain, label, base.clone());
    let step = Step::Replica {
        label: label.to_owned(),
        base,
        epoch,
    };
    granary_cluster::moves::send_replica(t, &src.member.key, grain, step, produce).await
}
