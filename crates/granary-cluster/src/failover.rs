//! Failover: when a node's lease expires, its grains go to the nodes that
//! hold their newest copies.
//!
//! Every live node runs the same plan ([`takeovers`]) on the same records,
//! and each acts only on the grains whose newest copy is its own: it puts
//! that copy in place as the grain's data (marked, so it cannot start
//! under the dead node's placement), then switches the placement to itself
//! in one transaction that also checks the dead node still holds no lease
//! and is not at rest, and records what the failover lost
//! (`failover/<grain>`, a [`FailoverRecord`]). Two nodes can never both
//! win: the placement's epoch is compared.
//!
//! A node stopped cleanly leaves a rest mark (`rest/<node>`, for
//! [`crate::REST_GRACE`]) so that a restart is no failure; a node that
//! stays away longer is failed over too.

use serde::{Deserialize, Serialize};

use crate::coordinator::to_json;
use crate::{
    ClusterError, Coordinator, NodeLease, NodeStatus, Placement, PlacementRecord, Replica,
};

/// `failover/<grain>`: the grain's last failover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRecord {
    /// The node whose lease expired, and the epoch the grain had there.
    pub from: String,
    pub from_epoch: i64,
    /// The node that took it, and the copy it promoted (its label and
    /// when that snapshot was taken on `from`).
    pub to: String,
    pub label: String,
    pub snapshot_unix: i64,
    /// When the placement switched.
    pub at_unix: i64,
    /// At most this many seconds of the grain's writes, made on `from`
    /// after `label` and before it fenced itself, are not in the promoted
    /// copy (kept on `from` for `granary node reconcile`).
    pub lost_secs: i64,
}

/// A grain this node should take over, and its copy here to promote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Takeover {
    pub placement: Placement,
    pub copy: Replica,
}

/// The grains node `me` takes over now: those placed on a member that
/// holds no lease and is not at rest, whose newest copy on a live node
/// (sent under the grain's current epoch; ties go to the smaller node
/// name) is on `me`. A grain with no such copy stays where it is, to
/// start again when its node returns.
pub fn takeovers(
    me: &str,
    nodes: &[NodeStatus],
    resting: &[String],
    placements: &[Placement],
    replicas: &[Replica],
) -> Vec<Takeover> {
    let live = |name: &str| {
        nodes
            .iter()
            .any(|n| n.record.name == name && n.alive.is_some())
    };
    let dead = |name: &str| {
        nodes
            .iter()
            .any(|n| n.record.name == name && n.alive.is_none())
            && !resting.iter().any(|r| r == name)
    };
    placements
        .iter()
        .filter(|p| dead(&p.node))
        .filter_map(|p| {
            let newest = replicas
                .iter()
                .filter(|r| {
                    r.grain == p.grain
                        && r.node != p.node
                        && r.record.epoch == p.epoch
                        && live(&r.node)
                })
                .min_by(|a, b| {
                    b.record
                        .snapshot_unix
                        .cmp(&a.record.snapshot_unix)
                        .then_with(|| a.node.cmp(&b.node))
                })?;
            (newest.node == me).then(|| Takeover {
                placement: p.clone(),
                copy: newest.clone(),
            })
        })
        .collect()
}

impl Coordinator {
    /// Switches `t`'s grain to `lease`'s node, only if its placement is
    /// still the one read, its old node still holds no lease and is not
    /// at rest, and `lease` still holds this node's `alive` record; and
    /// records the failover. The new placement.
    pub async fn take_over(
        &self,
        t: &Takeover,
        lease: &NodeLease,
        lease_ttl_secs: i64,
    ) -> Result<Placement, ClusterError> {
        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
        let p = &t.placement;
        let me = lease.node();
        let key = self.key(&format!("placement/{}", p.grain));
        let dead_alive = self.key(&format!("alive/{}", p.node));
        let dead_rest = self.key(&format!("rest/{}", p.node));
        let my_alive = self.key(&format!("alive/{me}"));
        let now = crate::now_unix();
        let record = PlacementRecord {
            node: me.to_owned(),
            placed_unix: now,
        };
        // The old node stopped acknowledging once it stopped trusting its
        // lease: TTL/2 before etcd let it expire, which was at most now.
        let stopped = now - lease_ttl_secs / 2;
        let failover = FailoverRecord {
            from: p.node.clone(),
            from_epoch: p.epoch,
            to: me.to_owned(),
            label: t.copy.record.label.clone(),
            snapshot_unix: t.copy.record.snapshot_unix,
            at_unix: now,
            lost_secs: (stopped - t.copy.record.snapshot_unix).max(0),
        };
        let txn = Txn::new()
            .when([
                Compare::mod_revision(key.as_str(), CompareOp::Equal, p.epoch),
                Compare::version(dead_alive.as_str(), CompareOp::Equal, 0),
                Compare::version(dead_rest.as_str(), CompareOp::Equal, 0),
                Compare::lease(my_alive.as_str(), CompareOp::Equal, lease.id()),
            ])
            .and_then([
                TxnOp::put(key.as_str(), to_json(&record), None),
                TxnOp::put(
                    self.key(&format!("failover/{}", p.grain)),
                    to_json(&failover),
                    None,
                ),
            ]);
        let resp = self
            .c()
            .txn(txn)
            .await
            .map_err(ClusterError::etcd("taking over a grain"))?;
        if !resp.succeeded() {
            // A retried transaction etcd had applied is refused by its own
            // compare: the placement then names this node already.
            if let Some(now) = self.placement(&p.grain).await?
                && now.node == me
                && now.epoch > p.epoch
            {
                return Ok(now);
            }
            return Err(ClusterError::Changed(format!(
                "{} was not taken over: its placement changed, node {} came back, or this node's lease lapsed",
                p.grain, p.node
            )));
        }
        let epoch = resp
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| ClusterError::Changed("etcd sent no revision".to_owned()))?;
        Ok(Placement {
            grain: p.grain.clone(),
            node: me.to_owned(),
            epoch,
            placed_unix: now,
        })
    }

    /// Every grain's last failover, by grain.
    pub async fn failovers(&self) -> Result<Vec<(String, FailoverRecord)>, ClusterError> {
        Ok(self
            .list::<FailoverRecord>("failover/")
            .await?
            .into_iter()
            .map(|(grain, record, _)| (grain, record))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Alive, NodeRecord, ReplicaRecord};

    fn node(name: &str, up: bool) -> NodeStatus {
        NodeStatus {
            record: NodeRecord {
                name: name.into(),
                arches: vec![],
                address: String::new(),
                key: String::new(),
                max_grains: 10,
                drained: false,
                joined_unix: 0,
            },
            alive: up.then(|| Alive {
                lease: 1,
                started_unix: 0,
                free_bytes: 0,
                link: String::new(),
            }),
            lease_age_secs: None,
            grains: 0,
        }
    }

    fn placed(grain: &str, node: &str, epoch: i64) -> Placement {
        Placement {
            grain: grain.into(),
            node: node.into(),
            epoch,
            placed_unix: 0,
        }
    }

    fn copy(grain: &str, node: &str, at: i64, epoch: i64) -> Replica {
        Replica {
            grain: grain.into(),
            node: node.into(),
            record: ReplicaRecord {
                label: format!("replica-{at}"),
                snapshot_unix: at,
                epoch,
            },
        }
    }

    #[test]
    fn the_newest_copy_on_a_live_node_takes_a_dead_nodes_grain() {
        let nodes = [node("n1", false), node("n2", true), node("n3", true)];
        let placements = [
            placed("a", "n1", 10),
            placed("b", "n1", 11),
            placed("c", "n2", 12),
            placed("d", "n1", 13),
            placed("e", "n1", 14),
        ];
        let replicas = [
            copy("a", "n2", 100, 10),
            copy("a", "n3", 105, 10),
            copy("b", "n2", 100, 11),
            copy("b", "n3", 100, 11),
            // A copy from before the grain was placed again is no copy.
            copy("d", "n2", 200, 9),
            // Nor a copy on the dead node itself.
            copy("e", "n1", 200, 14),
        ];
        let grains = |me: &str, resting: &[String]| -> Vec<String> {
            takeovers(me, &nodes, resting, &placements, &replicas)
                .into_iter()
                .map(|t| t.placement.grain)
                .collect()
        };
        assert_eq!(grains("n3", &[]), ["a"]);
        // A tie goes to the smaller name.
        assert_eq!(grains("n2", &[]), ["b"]);
        // A node at rest is not failed over.
        assert!(grains("n2", &["n1".into()]).is_empty());
        assert!(grains("n3", &["n1".into()]).is_empty());
        // A copy on a node that is down too is passed over.
        let nodes = [node("n1", false), node("n2", true), node("n3", false)];
        let t = takeovers("n2", &nodes, &[], &placements, &replicas);
        let grains: Vec<&str> = t.iter().map(|t| t.placement.grain.as_str()).collect();
        assert_eq!(grains, ["a", "b"]);
        assert_eq!(t[0].copy.record.label, "replica-100");
    }
}
