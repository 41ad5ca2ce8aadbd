//! Mail a cluster node acknowledged is never lost with the node
//! (`granary_spool`'s `keep` has the spool's side):
//!
//! - **Two nodes before the 250.** Each entry committed to the inbound
//!   spool or the outbound queue is first copied to another live node
//!   ([`ToAnotherNode`]), which keeps it durably in
//!   `DATA_DIR/spool-copies/<origin>/<spool>/<id>.msg` ([`CopiesHere`]).
//!   With no other node up the MX answers 451. A cluster of one node has
//!   nowhere to copy to and acknowledges as a single server does.
//! - **Kept until the grain's data is safe.** A delivered message stays
//!   in the spool (settled) until every recipient's mail grain has a copy
//!   on another node made after the delivery; then it goes, and every
//!   live node is asked to drop its copy. A failover to a copy made before
//!   the delivery has it delivered again (the grain drops an id it has).
//!   Sent mail goes once the other server took it.
//! - **Adopted when a node dies.** The copies a dead node (lease expired,
//!   not at rest) left here are taken into this node's spools and
//!   delivered from here under their ids, into the grains' new owners.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use granary_cluster::spools::SPOOLS;
use granary_cluster::{FailoverRecord, Placement, Replica, SpoolCopies};
use granary_grains::GrainId;
use granary_spool::{Mirror, MirrorFuture, Settled, Spool};
use tokio::sync::mpsc;

use crate::daemon::cluster::Member;

/// Other nodes' spool copies kept on this node.
pub(crate) struct CopiesHere {
    dir: PathBuf,
    /// Past this age a copy is dropped unread: longer than any entry can
    /// stay in its origin's spool ([`CopiesHere::new`]).
    max_age: Duration,
}

impl CopiesHere {
    /// Copies of entries of spools whose messages live at most
    /// `lifetime` (the longer of `mail.spool_lifetime` and
    /// `queue_lifetime`): kept that long, plus the day a delivered
    /// message may wait for a copy of its grain, plus a day.
    pub(crate) fn new(data_dir: &Path, lifetime: Duration) -> CopiesHere {
        CopiesHere {
            dir: data_dir.join("spool-copies"),
            max_age: lifetime + Duration::from_secs(KEEP_AT_MOST as u64 + 24 * 3600),
        }
    }

    fn spool_dir(&self, origin: &str, spool: &str) -> PathBuf {
        self.dir.join(origin).join(spool)
    }
}

impl CopiesHere {
    /// Drops `origin`'s copies older than `max_age` (blocking).
    fn drop_old(&self, origin: &str) {
        for spool in SPOOLS {
            let Ok(files) = std::fs::read_dir(self.spool_dir(origin, spool)) else {
                continue;
            };
            for f in files.flatten() {
                if self.too_old(&f.path()) {
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
    }
}

impl CopiesHere {
    fn too_old(&self, path: &Path) -> bool {
        std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > self.max_age)
    }
}

impl SpoolCopies for CopiesHere {
    fn keep(&self, origin: &str, spool: &str, id: &str, bytes: &[u8]) -> Result<(), String> {
        if !granary_cluster::valid_node_name(origin) {
            return Err(format!("{origin:?} is not a node name"));
        }
        let dir = self.spool_dir(origin, spool);
        if !dir.is_dir() {
            // Made durable too, or a crash could lose an acknowledged copy
            // with the directory it is in.
            let uid = nix::unistd::geteuid().as_raw();
            let origin_dir = self.dir.join(origin);
            for (d, parent) in [
                (&self.dir, self.dir.parent()),
                (&origin_dir, Some(self.dir.as_path())),
                (&dir, Some(origin_dir.as_path())),
            ] {
                granary_files::ensure_private_dir(d, uid).map_err(|e| e.to_string())?;
                if let Some(parent) = parent {
                    granary_files::sync_dir(parent).map_err(|e| e.to_string())?;
                }
            }
        }
        granary_files::write_atomic(&dir.join(format!("{id}.msg")), bytes, 0o600)
            .map_err(|e| format!("cannot keep a copy of {origin}'s spool entry {id}: {e}"))
    }

    fn release(&self, origin: &str, spool: &str, ids: &[String]) {
        if !granary_cluster::valid_node_name(origin) {
            return;
        }
        let dir = self.spool_dir(origin, spool);
        for id in ids {
            let _ = std::fs::remove_file(dir.join(format!("{id}.msg")));
        }
    }
}

/// Copies this node's spool entries to another live node.
pub(crate) struct ToAnotherNode {
    member: Arc<Member>,
}

impl Mirror for ToAnotherNode {
    fn copy(&self, spool: &'static str, id: String, bytes: Vec<u8>) -> MirrorFuture<'_> {
        Box::pin(async move {
            // A fenced node acknowledges nothing.
            if !self.member.lease.is_live() {
                return Err(format!(
                    "node {} is fenced: its cluster lease is {}",
                    self.member.node,
                    self.member.lease_state()
                ));
            }
            let nodes = self
                .member
                .coordinator
                .nodes()
                .await
                .map_err(|e| format!("cannot list the cluster's nodes: {e}"))?;
            let others: Vec<_> = nodes
                .iter()
                .filter(|n| n.record.name != self.member.node)
                .collect();
            if others.is_empty() {
                // A cluster of one: nowhere else to keep it.
                return Ok(());
            }
            let mut live: Vec<(String, String, String)> = others
                .iter()
                .filter_map(|n| {
                    let alive = n.alive.as_ref()?;
                    let link = match alive.link.is_empty() {
                        true => n.record.address.clone(),
                        false => alive.link.clone(),
                    };
                    Some((n.record.name.clone(), link, n.record.key.clone()))
                })
                .collect();
            live.sort();
            if live.is_empty() {
                return Err("no other node of the cluster is up".to_owned());
            }
            // Spread over the nodes by id; the next one if that one fails.
            let start = id
                .bytes()
                .fold(0usize, |h, b| h.wrapping_mul(31) + b as usize)
                % live.len();
            let mut tried = Vec::new();
            for i in 0..live.len() {
                let (name, link, key) = &live[(start + i) % live.len()];
                match granary_cluster::spools::copy_entry(
                    link,
                    key,
                    &self.member.key,
                    spool,
                    &id,
                    &bytes,
                )
                .await
                {
                    Ok(()) => return Ok(()),
                    Err(e) => tried.push(format!("{name}: {e}")),
                }
            }
            Err(tried.join("; "))
        })
    }
}

/// Sets `inbound` and `outbound` up as the module's text says, and runs
/// the keeper every `every` for as long as the daemon runs.
pub(crate) fn keep(
    member: Arc<Member>,
    inbound: Arc<Spool>,
    outbound: Arc<Spool>,
    copies: Arc<CopiesHere>,
    every: Duration,
) {
    let mirror: Arc<dyn Mirror> = Arc::new(ToAnotherNode {
        member: member.clone(),
    });
    let (tx, removed) = mpsc::unbounded_channel::<(&'static str, String)>();
    for (name, spool) in [(SPOOLS[0], &inbound), (SPOOLS[1], &outbound)] {
        spool.mirror_to(name, mirror.clone());
        let tx = tx.clone();
        spool.on_remove(move |id| {
            let _ = tx.send((name, id.to_owned()));
        });
    }
    // Without copies of grains' data there is nothing to wait for.
    inbound.keep_delivered(member.replicas > 0);
    let keeper = Keeper {
        member,
        inbound,
        outbound,
        copies,
        removed,
    };
    tokio::spawn(keeper.run(every.max(Duration::from_secs(1))));
}

struct Keeper {
    member: Arc<Member>,
    inbound: Arc<Spool>,
    outbound: Arc<Spool>,
    copies: Arc<CopiesHere>,
    removed: mpsc::UnboundedReceiver<(&'static str, String)>,
}

impl Keeper {
    async fn run(mut self, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.member.stopping() {
                return;
            }
            if !self.member.lease.is_live() {
                continue;
            }
            self.release().await;
            if let Err(e) = self.settle().await {
                tracing::debug!(error = %e, "cannot check kept mail against the grains' copies");
            }
            if let Err(e) = self.adopt().await {
                tracing::warn!(error = %e, "cannot take over a dead node's spool copies");
            }
        }
    }

    /// Asks every live node to drop its copies of what left the spools.
    async fn release(&mut self) {
        if self.removed.is_empty() {
            return;
        }
        // Read before the queue is taken: with etcd away, next time.
        let Ok(nodes) = self.member.coordinator.nodes().await else {
            return;
        };
        let mut gone: Vec<(&'static str, String)> = Vec::new();
        while let Ok(r) = self.removed.try_recv() {
            gone.push(r);
        }
        for n in nodes.iter().filter(|n| n.record.name != self.member.node) {
            let Some(alive) = &n.alive else { continue };
            let link = match alive.link.is_empty() {
                true => &n.record.address,
                false => &alive.link,
            };
            for spool in SPOOLS {
                let ids: Vec<String> = gone
                    .iter()
                    .filter(|(s, _)| *s == spool)
                    .map(|(_, id)| id.clone())
                    .collect();
                if ids.is_empty() {
                    continue;
                }
                let released = granary_cluster::spools::release_entries(
                    link,
                    &n.record.key,
                    &self.member.key,
                    spool,
                    &ids,
                )
                .await;
                if let Err(e) = released {
                    tracing::debug!(node = %n.record.name, error = %e, "cannot release spool copies; they are dropped there once too old");
                }
            }
        }
    }

    /// Forgets delivered mail whose grains' data is safe; delivers again
    /// what a failover lost.
    async fn settle(&self) -> Result<(), String> {
        let settled = self.inbound.settled();
        if settled.is_empty() {
            return Ok(());
        }
        let c = &self.member.coordinator;
        let etcd = |e: granary_cluster::ClusterError| e.to_string();
        let placements = c.placements().await.map_err(etcd)?;
        let replicas = c.replicas().await.map_err(etcd)?;
        let failovers = c.failovers().await.map_err(etcd)?;
        let spool = self.inbound.clone();
        tokio::task::spawn_blocking(move || {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            for s in settled {
                match judge(&s, &placements, &replicas, &failovers, now) {
                    Judged::Safe => {
                        if let Err(e) = spool.forget(&s.id) {
                            tracing::warn!(id = s.id, error = %e, "cannot forget delivered mail");
                        }
                    }
                    Judged::Expired => {
                        tracing::warn!(id = s.id, "no copy of its grain was made for a day after delivery; the spool keeps it no longer");
                        if let Err(e) = spool.forget(&s.id) {
                            tracing::warn!(id = s.id, error = %e, "cannot forget delivered mail");
                        }
                    }
                    Judged::Lost(users, failover) => {
                        tracing::warn!(id = s.id, ?users, failover, "its grain was failed over since it came; delivering it again (the grain drops it if it has it)");
                        if let Err(e) = spool.redeliver(&s.id, &users, failover) {
                            tracing::error!(id = s.id, error = %e, "cannot deliver mail again");
                        }
                    }
                    Judged::Wait => {}
                }
            }
        })
        .await
        .map_err(|e| e.to_string())
    }

    /// Takes the copies dead nodes left here into this node's spools.
    async fn adopt(&self) -> Result<(), String> {
        let have = std::fs::read_dir(&self.copies.dir)
            .map(|d| d.flatten().next().is_some())
            .unwrap_or(false);
        if !have {
            return Ok(());
        }
        let c = &self.member.coordinator;
        let etcd = |e: granary_cluster::ClusterError| e.to_string();
        let nodes = c.nodes().await.map_err(etcd)?;
        let resting = c.resting().await.map_err(etcd)?;
        for n in &nodes {
            let name = &n.record.name;
            if *name == self.member.node {
                continue;
            }
            if n.alive.is_some() || resting.contains(name) {
                // Copies whose release never came.
                let (copies, name) = (self.copies.clone(), name.clone());
                let _ = tokio::task::spawn_blocking(move || copies.drop_old(&name)).await;
                continue;
            }
            for (spool_name, spool) in [(SPOOLS[0], &self.inbound), (SPOOLS[1], &self.outbound)] {
                let dir = self.copies.spool_dir(name, spool_name);
                let Ok(files) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for f in files.flatten() {
                    let path = f.path();
                    if path.extension().is_none_or(|e| e != "msg") {
                        continue;
                    }
                    if self.copies.too_old(&path) {
                        let _ = std::fs::remove_file(&path);
                        continue;
                    }
                    match spool.adopt(&path).await {
                        Ok(Some(id)) => tracing::warn!(
                            id,
                            spool = spool_name,
                            from = %name,
                            "took over mail a dead node had acknowledged; delivering it from here"
                        ),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::error!(file = %path.display(), error = %e, "cannot take over a dead node's mail")
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// How far the nodes' clocks may differ (run NTP; systemd-timesyncd keeps
/// them within milliseconds): a copy counts as made after a delivery only
/// when its snapshot time is this much later, and a failover as after a
/// message's arrival when it is no more than this much earlier.
const SKEW: i64 = 5;
/// A delivered message waits at most this long for a copy of its grain.
const KEEP_AT_MOST: i64 = 24 * 3600;

#[derive(Debug, PartialEq, Eq)]
enum Judged {
    /// Every recipient's grain has it in a copy on another node.
    Safe,
    /// Its grains were failed over since it came (the last failover at
    /// this time): these users' grains may not have it.
    Lost(Vec<String>, i64),
    /// Kept a day, and a recipient's grain has no copy anywhere (never
    /// replicated: no node to copy to): kept no longer.
    Expired,
    Wait,
}

/// Where delivered message `s` stands against its recipients' grains, at
/// `now`. Any failover of a recipient's grain since the message came has
/// it delivered again, once per failover: the record keeps only a grain's
/// last failover, and whether the promoted copy holds the message cannot
/// be told from clocks alone; the grain drops it if it has it.
fn judge(
    s: &Settled,
    placements: &[Placement],
    replicas: &[Replica],
    failovers: &[(String, FailoverRecord)],
    now: i64,
) -> Judged {
    let mut lost = Vec::new();
    let mut last = i64::MIN;
    let mut safe = true;
    // A grain waited for that has no copy at all.
    let mut uncopied = false;
    for user in &s.delivered {
        let Ok(grain) = GrainId::for_user(user, "mail") else {
            continue;
        };
        let grain = grain.to_string();
        let Some(p) = placements.iter().find(|p| p.grain == grain) else {
            continue;
        };
        if let Some((_, f)) = failovers.iter().find(|(g, _)| *g == grain)
            && f.at_unix + SKEW >= s.received_at
            && s.redelivered_for.is_none_or(|r| f.at_unix > r)
        {
            lost.push(user.clone());
            last = last.max(f.at_unix);
            continue;
        }
        let copied = replicas.iter().any(|r| {
            r.grain == grain
                && r.node != p.node
                && r.record.epoch == p.epoch
                && r.record.snapshot_unix > s.at + SKEW
        });
        safe &= copied;
        uncopied |= !copied
            && !replicas
                .iter()
                .any(|r| r.grain == grain && r.node != p.node);
    }
    if !lost.is_empty() {
        Judged::Lost(lost, last)
    } else if safe {
        Judged::Safe
    } else if uncopied && now - s.at > KEEP_AT_MOST {
        Judged::Expired
    } else {
        Judged::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use granary_cluster::ReplicaRecord;

    #[test]
    fn delivered_mail_goes_once_a_later_copy_exists_and_comes_back_after_a_failover() {
        let s = Settled {
            id: "ab".into(),
            received_at: 95,
            at: 100,
            delivered: vec!["alice".into()],
            redelivered_for: None,
        };
        let placed = |node: &str, epoch| Placement {
            grain: "alice-mail".into(),
            node: node.into(),
            epoch,
            placed_unix: 0,
        };
        let copy = |node: &str, at, epoch| Replica {
            grain: "alice-mail".into(),
            node: node.into(),
            record: ReplicaRecord {
                label: format!("replica-{at}"),
                snapshot_unix: at,
                epoch,
            },
        };
        let p = [placed("n1", 5)];
        assert_eq!(judge(&s, &p, &[], &[], 101), Judged::Wait);
        // A copy within the clocks' skew of the delivery may not hold it.
        assert_eq!(judge(&s, &p, &[copy("n2", 105, 5)], &[], 106), Judged::Wait);
        assert_eq!(judge(&s, &p, &[copy("n2", 106, 5)], &[], 107), Judged::Safe);
        // A copy on the owner, or of an older placement, is no copy.
        assert_eq!(judge(&s, &p, &[copy("n1", 200, 5)], &[], 201), Judged::Wait);
        assert_eq!(judge(&s, &p, &[copy("n2", 200, 4)], &[], 201), Judged::Wait);
        // Kept a day at most when no copy is ever made; while copies
        // exist but lag, kept until one is newer.
        assert_eq!(judge(&s, &p, &[], &[], 100 + 86_401), Judged::Expired);
        assert_eq!(
            judge(&s, &p, &[copy("n2", 90, 5)], &[], 100 + 86_401),
            Judged::Wait
        );
        // Failed over since it came (whichever copy was promoted): once
        // more, once per failover.
        let f = FailoverRecord {
            from: "n1".into(),
            from_epoch: 5,
            to: "n2".into(),
            label: "replica-300".into(),
            snapshot_unix: 300,
            at_unix: 304,
            lost_secs: 2,
        };
        let p = [placed("n2", 9)];
        let fo = [("alice-mail".to_owned(), f.clone())];
        assert_eq!(
            judge(&s, &p, &[], &fo, 305),
            Judged::Lost(vec!["alice".into()], 304)
        );
        let again = Settled {
            redelivered_for: Some(304),
            at: 306,
            ..s.clone()
        };
        assert_eq!(judge(&again, &p, &[], &fo, 307), Judged::Wait);
        // A failover well before the message came is none of its business.
        let early = Settled {
            received_at: 400,
            at: 401,
            ..s.clone()
        };
        assert_eq!(judge(&early, &p, &[], &fo, 402), Judged::Wait);
        // A grain removed since: nothing to wait for.
        assert_eq!(judge(&s, &[], &[], &[], 101), Judged::Safe);
    }
}
