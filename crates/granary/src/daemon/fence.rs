//! Self-fencing, and rejoining after a lease was lost.
//!
//! A node that stops trusting its lease (not renewed for TTL/2) stops
//! every grain it runs before etcd can drop the lease at TTL and another
//! node take them over: nothing it runs acknowledges a write from then
//! on, and its start gate refuses new starts until the lease is live
//! again. Their datasets are made read-only where the backend can (ZFS,
//! btrfs), until the next start this node is allowed. `granary status`
//! shows the node fenced.
//!
//! Once etcd says the lease is gone, the node takes a new one as soon as
//! it reaches etcd again, and then puts aside, for `granary node
//! reconcile`, the data of every grain another node took over meanwhile
//! ([`crate::daemon::moves::fence_stale`]). It starts none of them: their
//! placements name the nodes that took them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use granary_cluster::LeaseState;
use granary_datasets::Datasets;

use crate::daemon::cluster::Member;

/// Self-fencing: once this node stops trusting its lease (not renewed for
/// TTL/2, or gone), it stops every grain it runs, before etcd can drop
/// the lease at TTL and another node could be given them. New starts are
/// refused meanwhile by the [`Gate`]; if the lease recovers (etcd was slow,
/// not gone), grains start again on their next use.
pub(crate) async fn fence_on_lapse(
    member: Arc<Member>,
    grains: Arc<dyn granary_grains::Grains>,
    datasets: Arc<dyn Datasets>,
) {
    let every = (member.lease.ttl() / 10).max(Duration::from_millis(50));
    let (mut fenced, mut said_lost) = (false, false);
    loop {
        tokio::time::sleep(every).await;
        let state = member.lease.state();
        match (state, fenced) {
            (LeaseState::Live, true) => {
                tracing::warn!(node = %member.node, "the cluster lease is live again; grains may start on their next use");
                fenced = false;
                member.fenced.store(false, Ordering::Relaxed);
            }
            (LeaseState::Live, false) => {}
            (_, false) => {
                fenced = true;
                member.fenced.store(true, Ordering::Relaxed);
                tracing::error!(
                    node = %member.node,
                    lease = member.lease_state(),
                    since_renewal = ?member.lease.since_renewal(),
                    "fencing: this node no longer trusts its cluster lease; stopping every grain it runs"
                );
                let stopped = stop_all(&*grains, gone_within(&member)).await;
                read_only(&datasets, stopped).await;
            }
            // Fenced, and still not live: anything that slipped through
            // (a start admitted just before the lapse) is stopped too.
            (_, true) => {
                let stopped = stop_all(&*grains, gone_within(&member)).await;
                read_only(&datasets, stopped).await;
            }
        }
        if state == LeaseState::Lost && !said_lost {
            said_lost = true;
            tracing::error!(node = %member.node, "the cluster lease is lost; a new one is taken once etcd answers");
        }
        if state != LeaseState::Lost {
            said_lost = false;
        }
    }
}

/// How long a fenced node's grains may take to stop: the node fences at
/// TTL/2 after its last renewal and etcd may drop its lease at TTL, so
/// they must be gone within the TTL/2 in between (less a tenth of the
/// TTL for the time a check takes).
fn gone_within(member: &Member) -> Duration {
    let ttl = member.lease.ttl();
    (ttl / 2).saturating_sub(ttl / 10)
}

/// Stops every grain that runs, all at once, each gone within `within`
/// (killed if need be); the ids of those it stopped.
async fn stop_all(grains: &dyn granary_grains::Grains, within: Duration) -> Vec<String> {
    let list = match grains.list().await {
        Ok(list) => list,
        Err(e) => {
            tracing::error!(error = %e, "fencing: cannot list grains");
            return Vec::new();
        }
    };
    let stops = list
        .into_iter()
        .filter(|g| g.state != "stopped" && g.state != "held")
        .filter_map(|g| granary_model::GrainId::parse(&g.id).ok())
        .map(|id| async move {
            match grains.stop_within(&id, within).await {
                Ok(_) => {
                    tracing::warn!(grain = %id, "fencing: grain stopped");
                    Some(id.to_string())
                }
                Err(e) => {
                    tracing::error!(grain = %id, error = %e, "fencing: cannot stop grain");
                    None
                }
            }
        });
    futures::future::join_all(stops)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Beside a dataset a fenced node made read-only; cleared by the next
/// start this node is allowed ([`writable_again`]).
const FENCED: &str = "fenced";

/// Makes the datasets of `grains` read-only (where the backend can), with
/// a mark beside each so the next admitted start makes it writable again.
async fn read_only(datasets: &Arc<dyn Datasets>, grains: Vec<String>) {
    // Plain directories have no switch: their grains being stopped is
    // what keeps them from writing.
    if grains.is_empty() || datasets.backend() == "plain" {
        return;
    }
    let datasets = datasets.clone();
    let _ = tokio::task::spawn_blocking(move || {
        for g in grains {
            let marked =
                granary_files::write_atomic(&datasets.grain_dir(&g).join(FENCED), b"", 0o600);
            let result = marked
                .map_err(|e| e.to_string())
                .and_then(|()| datasets.set_read_only(&g, true).map_err(|e| e.to_string()));
            match result {
                Ok(()) => tracing::warn!(grain = %g, "fencing: dataset read-only"),
                Err(e) => tracing::error!(grain = %g, error = %e, "fencing: cannot make the dataset read-only"),
            }
        }
    })
    .await;
}

/// Makes a dataset a fence made read-only writable again (blocking): the
/// start gate calls it once this node may start the grain.
pub(crate) fn writable_again(datasets: &dyn Datasets, grain: &str) -> Result<(), String> {
    let mark = datasets.grain_dir(grain).join(FENCED);
    if !mark.exists() {
        return Ok(());
    }
    datasets
        .set_read_only(grain, false)
        .map_err(|e| format!("cannot make its dataset writable after a fence: {e}"))?;
    match std::fs::remove_file(&mark) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
        _ => Ok(()),
    }
}

/// Takes a new lease whenever etcd says this node's is gone, trying every
/// second until etcd answers (with every grain stopped first); then
/// fences the data of grains other nodes took meanwhile.
pub(crate) async fn rejoin_when_lost(
    member: Arc<Member>,
    grains: Arc<dyn granary_grains::Grains>,
    store: Arc<granary_state::Store>,
    datasets: Arc<dyn granary_datasets::Datasets>,
    data_dir: std::path::PathBuf,
) {
    loop {
        member.lease.lost().await;
        loop {
            if member.stopping() {
                return;
            }
            // Nothing of this node may still run when it is a member again
            // (a stop that failed while fenced is tried again here).
            stop_all(&*grains, gone_within(&member)).await;
            let free = crate::daemon::disk_space(&data_dir).map_or(0, |(free, _)| free);
            let taken = member
                .coordinator
                .retake_lease(&member.lease, member.lease_ttl, free, &member.link)
                .await;
            match taken {
                Ok(()) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot take a new cluster lease yet");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        tracing::warn!(node = %member.node, lease = member.lease.id(), "rejoined the cluster under a new lease");
        // Until it worked: stale data left in place would keep this node
        // from taking those grains over later.
        while let Err(e) =
            crate::daemon::moves::fence_stale(&member, &store, datasets.clone(), &data_dir).await
        {
            tracing::error!(error = %e, "cannot look for grains other nodes took over; trying again");
            if member.stopping() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
}
