//! Failover, the taking node's side: when another node's lease expires,
//! this node takes each of its grains whose newest copy is here
//! ([`granary_cluster::takeovers`]).
//!
//! For each: the copy is put in place as the grain's data, marked as an
//! arrival from the dead node's placement (so it cannot start under it);
//! the placement is switched here by compare-and-swap with the failover's
//! record; then the grain starts at once (wake locks lived in the dead
//! node's memory, so every grain is started; an idle one stops again
//! after its idle timeout). If the switch fails (the node came back, or
//! another node won), the data put in place goes again.
//!
//! A copy that cannot be promoted (not whole: a round was cut off) has
//! its replica record dropped, so the other nodes' plans pass over it and
//! the next newest copy is taken.

use std::sync::Arc;
use std::time::Duration;

use granary_cluster::{Placement, Takeover};
use granary_grains::{GrainId, Start};

use super::replicate::Copies;
use super::{Source, msg};

/// Watches for nodes whose lease expires and takes over what falls to
/// this node, for as long as the daemon runs.
pub(crate) fn spawn(src: Source, store: Arc<granary_state::Store>, copies: Arc<Copies>) {
    tokio::spawn(async move {
        loop {
            // A node's `alive` record going is the news; every second too,
            // in case a watch missed it or etcd was away.
            let changed = src.member.coordinator.alive_changed();
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(1), changed).await {
                tracing::debug!(error = %e, "watching the cluster's nodes for failover");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            if src.member.stopping() {
                return;
            }
            if !src.member.lease.is_live() {
                continue;
            }
            if let Err(e) = look(&src, &store, &copies).await {
                tracing::debug!(error = %e, "cannot look for grains to take over");
            }
        }
    });
}

async fn look(
    src: &Source,
    store: &Arc<granary_state::Store>,
    copies: &Arc<Copies>,
) -> Result<(), String> {
    let c = &src.member.coordinator;
    let etcd = |e: granary_cluster::ClusterError| format!("cannot check with the cluster: {e}");
    let nodes = c.nodes().await.map_err(etcd)?;
    if nodes.iter().all(|n| n.alive.is_some()) {
        return Ok(());
    }
    let resting = c.resting().await.map_err(etcd)?;
    let placements = c.placements().await.map_err(etcd)?;
    let replicas = c.replicas().await.map_err(etcd)?;
    let me = &src.member.node;
    for t in granary_cluster::takeovers(me, &nodes, &resting, &placements, &replicas) {
        let started = std::time::Instant::now();
        match take(src, store, copies, &t).await {
            Ok(p) => tracing::warn!(
                grain = %p.grain,
                from = %t.placement.node,
                epoch = p.epoch,
                copy = %t.copy.record.label,
                millis = started.elapsed().as_millis() as u64,
                "failover: took over a grain of a node whose lease expired"
            ),
            Err(e) => tracing::error!(
                grain = %t.placement.grain,
                from = %t.placement.node,
                error = %e,
                "failover: cannot take over a grain"
            ),
        }
    }
    Ok(())
}

/// One grain: see the module's text.
async fn take(
    src: &Source,
    store: &Arc<granary_state::Store>,
    copies: &Arc<Copies>,
    t: &Takeover,
) -> Result<Placement, String> {
    let g = t.placement.grain.clone();
    let grain = GrainId::parse(&g).map_err(msg)?;
    let from = t.placement.node.clone();
    let id = format!("failover-{}", t.placement.epoch);
    let (s, g2) = (store.clone(), g.clone());
    let uid = tokio::task::spawn_blocking(move || s.grain(&g2))
        .await
        .map_err(msg)?
        .map_err(msg)?
        .ok_or_else(|| format!("no grain {g} in this node's records"))?
        .host_uid;
    let (ds, cp, g2, i2) = (src.datasets.clone(), copies.clone(), g.clone(), id.clone());
    let (from_epoch, named, sender) =
        (t.placement.epoch, t.copy.record.label.clone(), from.clone());
    let promoted = tokio::task::spawn_blocking(move || -> Result<Promoted, String> {
        // No round changes the copy from here on.
        let _one = cp.claim(&g2)?;
        // The whole copy the record names, or a newer whole one from the
        // same sender (whose record could not be written).
        let label = match cp.state(&g2) {
            Some(s)
                if s.whole
                    && s.from == sender
                    && snapshot_time(&s.label) >= snapshot_time(&named) =>
            {
                s.label
            }
            _ => return Ok(Promoted::Unusable),
        };
        match super::arrive::arrival(&*ds, &g2) {
            // An earlier attempt put this copy in place, and its switch
            // had no clear answer: used as it is (never removed while its
            // switch may still apply).
            Some(a) if a == i2 => return Ok(Promoted::From(label)),
            // What a move from the dead node left before its switch: newer
            // than any copy, so kept aside for `granary node reconcile`.
            Some(a) => {
                let kept = ds.retire(&g2, &format!("unfinished-{a}")).map_err(msg)?;
                tracing::warn!(grain = %g2, kept = kept.as_deref().unwrap_or(""), "failover: kept aside the data of a move that never switched");
            }
            None => {}
        }
        if ds.has_data(&g2).map_err(msg)? {
            // This node's own older data of the grain (a stale copy the
            // start-up check could not put aside): kept aside too.
            match ds.epoch(&g2) {
                Ok(Some(e)) if e >= from_epoch => {
                    return Err(format!(
                        "this node holds data of {g2} under epoch {e}, not older than the placement's {from_epoch}"
                    ));
                }
                _ => {
                    let kept = ds.retire(&g2, &format!("stale-{from_epoch}")).map_err(msg)?;
                    tracing::warn!(grain = %g2, kept = kept.as_deref().unwrap_or(""), "failover: kept aside this node's older data of the grain");
                }
            }
        }
        let staging = granary_backup::staging_id("failover");
        ds.create(&staging, uid).map_err(msg)?;
        let copied = copy_tree(&cp.data(&g2), &ds.path(&staging), uid)
            // The grain is told its data is older than what it last had.
            .and_then(|()| granary_datasets::mark_rewound(&ds.path(&staging), uid).map_err(msg))
            .and_then(|()| super::arrive::put_in_place(&*ds, &staging, &g2, uid, &i2, from_epoch));
        if let Err(e) = copied {
            let _ = ds.destroy(&staging);
            return Err(e);
        }
        Ok(Promoted::From(label))
    })
    .await
    .map_err(msg)??;
    let label = match promoted {
        Promoted::From(label) => label,
        Promoted::Unusable => {
            // Its record is dropped so the next newest copy is taken.
            let _ = src
                .member
                .coordinator
                .drop_replica(&g, &src.member.node)
                .await;
            return Err(format!(
                "this node's copy is not the whole {} from {from}; its record is dropped so another copy is taken",
                t.copy.record.label
            ));
        }
    };
    let mut t = t.clone();
    t.copy.record.snapshot_unix = snapshot_time(&label).unwrap_or(t.copy.record.snapshot_unix);
    t.copy.record.label = label;
    if src.member.stopping() {
        return Err("this node is stopping; the copy stays in place, marked".to_owned());
    }
    let ttl = src.member.lease.ttl().as_secs() as i64;
    let placed = match src
        .member
        .coordinator
        .take_over(&t, &src.member.lease, ttl)
        .await
    {
        Ok(p) => p,
        Err(e) => {
            // Refused, or no answer: whether etcd applied it is known only
            // by reading the placement again. Until then the data stays,
            // marked: it cannot start under any placement but ours.
            let me = &src.member.node;
            match settled_placement(src, &g).await {
                Some(Some(p)) if p.node == *me && p.epoch > t.placement.epoch => p,
                // Unchanged: the switch may yet apply, so the data stays,
                // marked; the next look tries the switch again with it.
                Some(Some(p)) if p.epoch == t.placement.epoch => {
                    return Err(format!("{e}; the copy stays in place, marked"));
                }
                // Placed elsewhere since, or removed: it is not ours.
                Some(_) => {
                    let (ds, g2) = (src.datasets.clone(), g.clone());
                    let _ = tokio::task::spawn_blocking(move || {
                        super::arrive::undo_arrival(&*ds, &g2, &id)
                    })
                    .await;
                    return Err(e.to_string());
                }
                None => return Err(format!("{e}; the copy stays in place, marked")),
            }
        }
    };
    // The gate clears the arrival mark: the placement is newer now.
    if let Err(e) = src.grains.start(&grain, Start::Running).await {
        tracing::warn!(grain = %g, error = %e, "failover: the grain starts on its next use");
    }
    Ok(placed)
}

enum Promoted {
    /// Put in place: the copy of this snapshot.
    From(String),
    Unusable,
}

/// The time in a replica snapshot's label (`replica-<unix>`).
fn snapshot_time(label: &str) -> Option<i64> {
    label.strip_prefix("replica-")?.parse().ok()
}

/// The grain's placement as etcd has it, asked until etcd answers (at
/// most 30 s); `None` when it never did.
async fn settled_placement(src: &Source, grain: &str) -> Option<Option<Placement>> {
    for _ in 0..30 {
        if let Ok(p) = src.member.coordinator.placement(grain).await {
            return Some(p);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    None
}

/// Copies the tree at `from` into the empty directory `into` (blocking),
/// as a move's stream would carry it, owned by `uid`, and synced.
fn copy_tree(from: &std::path::Path, into: &std::path::Path, uid: u32) -> Result<(), String> {
    let (mut reader, mut writer) = std::io::pipe().map_err(msg)?;
    let from = from.to_owned();
    let writing = std::thread::spawn(move || {
        let written =
            granary_backup::tree::write_stream_exact(&from, None, &mut writer).map_err(msg);
        drop(writer);
        written
    });
    let applied = super::arrive::apply_synced(&mut reader, into, uid);
    drop(reader);
    let written = writing
        .join()
        .map_err(|_| "the copy's reader panicked".to_owned())?;
    written?;
    applied.map(drop)
}
