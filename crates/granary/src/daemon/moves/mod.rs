//! Moving a grain with its data to another node of the cluster
//! (`granary grain move`), both ends of it: [`move_out`] on the grain's
//! owner, which drives, and [`NodeMoves`] on the target, which answers
//! the node link's move steps (`granary_cluster::moves`).
//!
//! 1. Pre-copy while the grain runs: a consistent snapshot streamed in
//!    full, then deltas from the last one, until a delta is small.
//! 2. The grain held (stopped, kept stopped), a final snapshot and its
//!    delta; the target makes the data durable and puts it in place,
//!    marked as arriving (`moving` beside it), so its gate refuses to
//!    start it under the old placement.
//! 3. The placement switched by compare-and-swap: the new epoch.
//! 4. The source's copy fenced: kept aside as retired, never started
//!    again; the target told to start the grain. A lost `activate` is
//!    harmless: the gate clears the mark on the first start under the new
//!    placement.
//!
//! Before the switch any failure undoes the move: the target's staged or
//! placed data goes and the source's grain is released. After it, the
//! source never runs the grain again.

mod arrive;
mod failover;
mod jobs;
pub(crate) mod reconcile;
mod replicate;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use granary_backup::progress::{Meter, Progress};
use granary_cluster::moves::{Step, Target};
use granary_datasets::Datasets;
use granary_grains::{GrainId, Grains};
use serde::Serialize;
use tokio::sync::mpsc;

pub(crate) use arrive::{NodeMoves, admit_arrival};
pub(crate) use failover::spawn as take_over_failed;
pub(crate) use jobs::run;
pub(crate) use replicate::{Copies, spawn as replicate};

use crate::daemon::cluster::Member;

fn msg(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A pre-copy round smaller than this is the last one before the cut-over.
const SMALL_DELTA: u64 = 8 << 20;
/// At most this many pre-copy rounds, however busy the grain is.
const MAX_ROUNDS: u32 = 5;
/// Tags the move's snapshots so that pruning leaves them alone.
const HOLD_TAG: &str = "granary-move";

/// What one move did, printed by `granary grain move --json`.
#[derive(Debug, Serialize)]
pub(crate) struct MoveReport {
    pub grain: String,
    pub from: String,
    pub to: String,
    pub move_id: String,
    /// The placement's epoch before and after the switch.
    pub from_epoch: i64,
    pub epoch: i64,
    /// Bytes of each pre-copy round, while the grain ran.
    pub rounds: Vec<u64>,
    /// Bytes sent while the grain was stopped.
    pub final_bytes: u64,
    /// From the grain's stop on this node to its start on the target.
    pub downtime_ms: u64,
    /// Where the source's copy is kept, fenced.
    pub fenced_as: Option<String>,
    /// The target could not start it at once (it starts on first use).
    pub warning: Option<String>,
}

/// What the owner's side of a move uses.
#[derive(Clone)]
pub(crate) struct Source {
    pub member: Arc<Member>,
    pub grains: Arc<dyn Grains>,
    pub datasets: Arc<dyn Datasets>,
    pub records: Arc<dyn granary_cluster::Records>,
}

/// Grains being moved or replicated from this node now, and which: one
/// of either at a time per grain.
static MOVING: Mutex<Option<HashMap<String, &'static str>>> = Mutex::new(None);

pub(crate) struct Moving(String);

impl Moving {
    /// Claims `grain` for `what` (`"move"`, `"replication"`), or says what
    /// holds it.
    pub(crate) fn claim(grain: &str, what: &'static str) -> Result<Moving, &'static str> {
        let mut map = MOVING.lock().unwrap_or_else(|e| e.into_inner());
        let map = map.get_or_insert_default();
        match map.get(grain) {
            Some(busy) => Err(busy),
            None => {
                map.insert(grain.to_owned(), what);
                Ok(Moving(grain.to_owned()))
            }
        }
    }

    /// Claims `grain` for a move, waiting out a replication round of it.
    async fn for_move(grain: &GrainId) -> Result<Moving, String> {
        for _ in 0..6000 {
            match Moving::claim(grain.as_ref(), "move") {
                Ok(m) => return Ok(m),
                Err("move") => return Err(format!("{} is already being moved", grain.shown())),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
        Err(format!(
            "{} has been replicating for 10 minutes; try again",
            grain.shown()
        ))
    }
}

impl Drop for Moving {
    fn drop(&mut self) {
        if let Some(map) = MOVING.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            map.remove(&self.0);
        }
    }
}

/// Moves `grain`, which this node owns, to node `to` with its data.
/// Progress goes to `progress` as it happens.
pub(crate) async fn move_out(
    src: Source,
    grain: GrainId,
    to: String,
    progress: mpsc::Sender<Progress>,
) -> Result<MoveReport, String> {
    let m = &src.member;
    let c = &m.coordinator;
    let g = grain.to_string();
    let etcd = |e: granary_cluster::ClusterError| format!("cannot check with the cluster: {e}");
    let _one = Moving::for_move(&grain).await?;
    let placed = c.placement(&g).await.map_err(etcd)?.ok_or_else(|| {
        format!(
            "{} is not placed on any node yet: it goes where it is first used",
            grain.shown()
        )
    })?;
    if placed.node != m.node {
        return Err(format!(
            "{} runs on node {}, not on {}: run the move there",
            grain.shown(),
            placed.node,
            m.node
        ));
    }
    if to == m.node {
        return Err(format!("{} already runs on node {to}", grain.shown()));
    }
    // The target must be up, undrained, have room and run the app.
    let nodes = c.nodes().await.map_err(etcd)?;
    let Some(target) = nodes.iter().find(|n| n.record.name == to) else {
        let names: Vec<&str> = nodes.iter().map(|n| n.record.name.as_str()).collect();
        return Err(format!(
            "no node {to:?} in the cluster (its nodes: {})",
            names.join(", ")
        ));
    };
    let arches = src
        .records
        .arches_of(&grain)
        .await
        .map_err(|e| e.to_string())?
        .unwrap_or_else(|| target.record.arches.clone());
    granary_cluster::choose_node(&arches, std::slice::from_ref(target))
        .map_err(|why| format!("node {to} cannot take {}: {why}", grain.shown()))?;
    let link = match &target.alive {
        Some(a) if !a.link.is_empty() => a.link.clone(),
        _ => target.record.address.clone(),
    };
    let t = Target {
        address: &link,
        key: &target.record.key,
    };
    let id = granary_cluster::moves::new_id();
    tracing::info!(grain = %g, to, move_id = id, epoch = placed.epoch, "moving a grain to another node");
    granary_cluster::moves::step(
        &t,
        &m.key,
        &grain,
        &id,
        Step::Prepare {
            from: m.node.clone(),
            seen: src.records.position(),
        },
    )
    .await
    .map_err(|e| format!("node {to} cannot take {}: {e}", grain.shown()))?;

    // Started on the target only if it ran here: a stopped grain stays
    // stopped (its first use starts it there).
    let was_running = src
        .grains
        .status(&grain)
        .await
        .is_ok_and(|s| s.state != "stopped");
    let mut labels: Vec<String> = Vec::new();
    let mut held = false;
    // Labels sort by the time in them, so each round's plain snapshot
    // links what the previous round's holds.
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let outcome = async {
        // Pre-copy while the grain runs.
        let mut rounds = Vec::new();
        for k in 1..=MAX_ROUNDS {
            let label = format!("move-{started}-{id}-{k}");
            let bytes = send_round(
                &src,
                &t,
                &grain,
                &id,
                &mut labels,
                label,
                "move pre-copy",
                &progress,
            )
            .await?;
            rounds.push(bytes);
            if bytes < SMALL_DELTA {
                break;
            }
        }
        // The cut-over: stopped and kept stopped, the last delta.
        let stopped = Instant::now();
        src.grains
            .hold(&grain, &format!("moving to node {to}"))
            .await
            .map_err(|e| e.to_string())?;
        held = true;
        let final_bytes = send_round(
            &src,
            &t,
            &grain,
            &id,
            &mut labels,
            format!("move-{started}-{id}-z"),
            "move final",
            &progress,
        )
        .await?;
        granary_cluster::moves::step(
            &t,
            &m.key,
            &grain,
            &id,
            Step::Commit {
                from_epoch: placed.epoch,
            },
        )
        .await?;
        if !m.lease.is_live() {
            return Err(format!("this node's cluster lease is {}", m.lease_state()));
        }
        // Nothing may have run here since the final snapshot: a rollback,
        // restore or removal releases any hold.
        let ours = format!("moving to node {to}");
        match src.grains.status(&grain).await {
            Ok(s) if s.state == "held" && s.reason.as_deref() == Some(ours.as_str()) => {}
            _ => {
                return Err(
                    "its hold was lifted during the move (a rollback, restore or removal?)"
                        .to_owned(),
                );
            }
        }
        Ok((rounds, final_bytes, stopped))
    }
    .await;
    let outcome = match outcome {
        Ok((rounds, final_bytes, stopped)) => match switch(c, &placed, &to, &m.node).await {
            Switch::Done(switched) => Ok((rounds, final_bytes, stopped, switched)),
            Switch::Refused(why) => Err(why),
            Switch::Unknown(why) => {
                tracing::error!(grain = %g, to, move_id = id, error = %why, "a move's switch has an unknown outcome; the grain stays held here");
                return Err(format!(
                    "moving {} to {to}: whether its placement switched is unknown ({why}); it stays held on node {} \
                     until `granary grain start` there or a restart. `granary node list` shows where it is placed: \
                     if that is node {to}, it starts there on first use",
                    grain.shown(),
                    m.node
                ));
            }
        },
        Err(why) => Err(why),
    };
    let (rounds, final_bytes, stopped, switched) = match outcome {
        Ok(done) => done,
        Err(why) => {
            tracing::warn!(grain = %g, to, move_id = id, error = %why, "a move failed before its switch; undoing it");
            if let Err(e) = granary_cluster::moves::step(&t, &m.key, &grain, &id, Step::Abort).await
            {
                tracing::warn!(grain = %g, to, error = %e, "cannot undo the move on the target; its next move there clears it");
            }
            forget_snapshots(&src, &g, &labels).await;
            if held && let Err(e) = src.grains.release(&grain).await {
                tracing::error!(grain = %g, error = %e, "cannot release a grain after a failed move");
            }
            return Err(format!("moving {} to {to} failed: {why}", grain.shown()));
        }
    };
    tracing::info!(grain = %g, to, epoch = switched.epoch, "a moved grain's placement switched");
    // Never started here again: the switch refuses it (an instance that
    // slipped through is stopped), and the copy goes aside (after the
    // target started it: removing its snapshots takes a while), so no
    // later placement here finds stale data in place.
    if let Err(e) = src.grains.stop(&grain).await {
        tracing::warn!(grain = %g, error = %e, "cannot stop a grain moved away");
    }
    let warning = match was_running {
        true => granary_cluster::moves::step(&t, &m.key, &grain, &id, Step::Activate)
            .await
            .err()
            .map(|e| format!("node {to} did not start it at once ({e}); it starts on first use")),
        false => None,
    };
    let downtime_ms = stopped.elapsed().as_millis() as u64;
    let (datasets, g2) = (src.datasets.clone(), g.clone());
    let label = format!("moved-{}", switched.epoch);
    let fenced = tokio::task::spawn_blocking(move || datasets.retire(&g2, &label))
        .await
        .map_err(msg)
        .and_then(|r| r.map_err(msg));
    let fenced_as = match fenced {
        Ok(kept) => kept,
        Err(e) => {
            tracing::error!(grain = %g, error = %e, "cannot move the source's copy aside; the placement still keeps it from starting");
            None
        }
    };
    if let Err(e) = src.grains.release(&grain).await {
        tracing::warn!(grain = %g, error = %e, "cannot release a grain moved away");
    }
    tracing::info!(grain = %g, to, downtime_ms, "grain moved");
    Ok(MoveReport {
        grain: grain.shown(),
        from: m.node.clone(),
        to,
        move_id: id,
        from_epoch: placed.epoch,
        epoch: switched.epoch,
        rounds,
        final_bytes,
        downtime_ms,
        fenced_as,
        warning,
    })
}

/// Takes snapshot `label` (held against pruning), streams it to the
/// target as a delta from the previous one in `labels`, and adds it there.
#[allow(clippy::too_many_arguments)]
async fn send_round(
    src: &Source,
    t: &Target<'_>,
    grain: &GrainId,
    id: &str,
    labels: &mut Vec<String>,
    label: String,
    phase: &'static str,
    progress: &mpsc::Sender<Progress>,
) -> Result<u64, String> {
    src.grains
        .snapshot(grain, &label)
        .await
        .map_err(|e| e.to_string())?;
    let g = grain.to_string();
    let (datasets, g2, l2) = (src.datasets.clone(), g.clone(), label.clone());
    tokio::task::spawn_blocking(move || datasets.hold(&g2, &l2, HOLD_TAG))
        .await
        .map_err(msg)?
        .map_err(msg)?;
    let base = labels.last().cloned();
    labels.push(label.clone());
    let datasets = src.datasets.clone();
    let (g2, l2, b2) = (g.clone(), label.clone(), base.clone());
    let total = tokio::task::spawn_blocking(move || {
        let new = datasets.view_snapshot(&g2, &l2).map_err(msg)?;
        let old = b2
            .map(|b| datasets.view_snapshot(&g2, &b))
            .transpose()
            .map_err(msg)?;
        granary_backup::tree::changed_bytes(&new.path, old.as_ref().map(|v| v.path.as_path()))
            .map_err(msg)
    })
    .await
    .map_err(msg)??;
    let produce = snapshot_stream(&src.datasets, grain, &label, base);
    let mut meter = Meter::new(&grain.shown(), phase, Some(total));
    let applied =
        granary_cluster::moves::send_stream(t, &src.member.key, grain, id, produce, |n| {
            meter.add(n);
            if let Some(p) = meter.tick() {
                let _ = progress.try_send(p);
            }
        })
        .await?;
    let _ = progress.try_send(meter.now(true));
    Ok(applied)
}

/// Writes (blocking) the exact tree stream of `grain`'s snapshot `label`,
/// a delta from snapshot `base` when given: what moves and replication
/// send over the link.
fn snapshot_stream(
    datasets: &Arc<dyn Datasets>,
    grain: &GrainId,
    label: &str,
    base: Option<String>,
) -> granary_cluster::moves::Producer {
    let (datasets, g, label) = (datasets.clone(), grain.to_string(), label.to_owned());
    Box::new(move |out: &mut dyn std::io::Write| {
        let new = datasets.view_snapshot(&g, &label).map_err(msg)?;
        let old = base
            .as_ref()
            .map(|b| datasets.view_snapshot(&g, b))
            .transpose()
            .map_err(msg)?;
        let old = old
            .as_ref()
            .zip(base.as_deref())
            .map(|(v, b)| (v.path.as_path(), b));
        granary_backup::tree::write_stream_exact(&new.path, old, out)
            .map(drop)
            .map_err(msg)
    })
}

/// Deletes a failed move's snapshots on this node.
async fn forget_snapshots(src: &Source, grain: &str, labels: &[String]) {
    let (datasets, g, labels) = (src.datasets.clone(), grain.to_owned(), labels.to_vec());
    let _ = tokio::task::spawn_blocking(move || {
        for l in labels {
            let _ = datasets.release(&g, &l, HOLD_TAG);
            if let Err(e) = datasets.delete_snapshot(&g, &l) {
                tracing::warn!(grain = %g, snapshot = l, error = %e, "cannot delete a failed move's snapshot");
            }
        }
    })
    .await;
}

/// How a move's compare-and-swap of the placement ended.
enum Switch {
    Done(granary_cluster::Placement),
    /// It did not happen: the move may be undone.
    Refused(String),
    /// etcd did not say: undoing could destroy the only live copy.
    Unknown(String),
}

/// Switches `placed` to node `to`; when etcd's answer is lost, reads the
/// placement back (a few times) to learn whether the write happened.
async fn switch(
    c: &granary_cluster::Coordinator,
    placed: &granary_cluster::Placement,
    to: &str,
    me: &str,
) -> Switch {
    let first = match c.switch(placed, to).await {
        Ok(p) => return Switch::Done(p),
        Err(e) => e.to_string(),
    };
    // The etcd client retries, and a write whose answer was lost may still
    // apply later: only a placement read back at the target, or our own
    // write of a newer epoch for this node (which the lost one can then
    // never overtake), settles it.
    for attempt in 0..5 {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        match c.placement(&placed.grain).await {
            Ok(Some(p)) if p.node == to && p.epoch > placed.epoch => return Switch::Done(p),
            Ok(Some(p)) if p.epoch == placed.epoch => {
                if c.switch(placed, me).await.is_ok() {
                    return Switch::Refused(format!(
                        "cannot switch its placement to {to}: {first}"
                    ));
                }
            }
            // Changed by someone else: the lost write's compare fails.
            Ok(_) => {
                return Switch::Refused(format!("its placement changed during the move ({first})"));
            }
            Err(_) => {}
        }
    }
    Switch::Unknown(first)
}

/// At start, and on rejoining under a new lease: a grain whose data is
/// here but whose placement names another node at a newer epoch than the
/// data carries was moved or failed over while this node could not retire
/// its copy (a crash between a move's switch and its retire, or this node
/// cut off). That copy is stale: it goes aside as a move's would, so a
/// later move here finds the place free and nothing stale can start. A
/// grain failed over from here also has what its data holds beyond the
/// promoted copy written down for `granary node reconcile`.
pub(crate) async fn fence_stale(
    member: &Member,
    store: &granary_state::Store,
    datasets: Arc<dyn Datasets>,
    data_dir: &std::path::Path,
) -> Result<(), String> {
    let etcd = |e: granary_cluster::ClusterError| format!("cannot check with the cluster: {e}");
    let placements = member.coordinator.placements().await.map_err(etcd)?;
    let failovers = member.coordinator.failovers().await.map_err(etcd)?;
    let grains = store.list_grains().map_err(msg)?;
    let me = member.node.clone();
    let data_dir = data_dir.to_owned();
    tokio::task::spawn_blocking(move || {
        for g in grains {
            let Some(p) = placements.iter().find(|p| p.grain == g.id) else {
                continue;
            };
            if p.node == me || !datasets.has_data(&g.id).unwrap_or(false) {
                continue;
            }
            // Data arriving here (a move's or a failover's, not started
            // yet) is no stale copy; nor is data with no epoch (never run
            // here) or an unreadable one: left alone.
            if arrive::arrival(&*datasets, &g.id).is_some() {
                continue;
            }
            let Ok(Some(held)) = datasets.epoch(&g.id) else {
                continue;
            };
            if held >= p.epoch {
                continue;
            }
            let failover = failovers
                .iter()
                .find(|(grain, f)| *grain == g.id && f.from == me && f.from_epoch == held)
                .map(|(_, f)| f);
            let label = match failover {
                Some(_) => format!("failover-{}", p.epoch),
                None => format!("stale-{}", p.epoch),
            };
            // Compared before the retire, which takes the snapshots along.
            let changes = failover.and_then(|f| {
                let promoted = datasets.view_snapshot(&g.id, &f.label).ok()?;
                reconcile::diff(&datasets.path(&g.id), &promoted.path)
                    .inspect_err(|e| tracing::warn!(grain = %g.id, error = %e, "cannot compare a failed-over grain's data"))
                    .ok()
            });
            match datasets.retire(&g.id, &label) {
                Ok(kept) => {
                    tracing::warn!(
                        grain = %g.id,
                        placed_on = %p.node,
                        epoch = p.epoch,
                        kept = kept.as_deref().unwrap_or(""),
                        "fenced a stale copy of a grain another node runs now"
                    );
                    if let Some(f) = failover {
                        let d = reconcile::Divergence {
                            grain: g.id.clone(),
                            placed_on: p.node.clone(),
                            epoch: p.epoch,
                            promoted: f.label.clone(),
                            failed_over_unix: f.at_unix,
                            kept,
                            changes,
                        };
                        if let Err(e) = reconcile::record(&data_dir, &d) {
                            tracing::error!(grain = %g.id, error = %e, "cannot write down a failed-over grain's divergent data");
                        }
                    }
                }
                Err(e) => tracing::error!(grain = %g.id, error = %e, "cannot fence a stale copy of a grain"),
            }
        }
    })
    .await
    .map_err(msg)
}
