//! Replica records: which nodes hold a copy of a grain's data, and as of
//! when (`replica/<grain>/<node>`), written by the grain's owner after
//! each replication round; what `granary node list` and `granary status`
//! compute replication lag from.

use serde::{Deserialize, Serialize};

use crate::coordinator::to_json;
use crate::{ClusterError, Coordinator};

/// `replica/<grain>/<node>`: the copy of a grain's data on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    /// The snapshot the copy is (its label on the owner).
    pub label: String,
    /// When that snapshot was taken: the data written after it is what a
    /// failover to this copy would lose.
    pub snapshot_unix: i64,
    /// The placement epoch of the owner that sent it.
    pub epoch: i64,
}

/// A replica, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub grain: String,
    pub node: String,
    pub record: ReplicaRecord,
}

impl Coordinator {
    /// Records that `node` holds `grain`'s data as of `record`.
    pub async fn set_replica(
        &self,
        grain: &str,
        node: &str,
        record: &ReplicaRecord,
    ) -> Result<(), ClusterError> {
        self.c()
            .put(
                self.key(&format!("replica/{grain}/{node}")),
                to_json(record),
                None,
            )
            .await
            .map_err(ClusterError::etcd("recording a replica"))?;
        Ok(())
    }

    /// Forgets the copy of `grain` on `node` (it cannot be promoted).
    pub async fn drop_replica(&self, grain: &str, node: &str) -> Result<(), ClusterError> {
        use etcd_client::{Txn, TxnOp};
        let key = self.key(&format!("replica/{grain}/{node}"));
        self.c()
            .txn(Txn::new().and_then([TxnOp::delete(key, None)]))
            .await
            .map_err(ClusterError::etcd("forgetting a replica"))?;
        Ok(())
    }

    /// Forgets a grain removed for good: its placement, its replica
    /// records and its last failover, in one transaction.
    pub async fn forget_grain(&self, grain: &str) -> Result<(), ClusterError> {
        use etcd_client::{DeleteOptions, Txn, TxnOp};
        let txn = Txn::new().and_then([
            TxnOp::delete(self.key(&format!("placement/{grain}")), None),
            TxnOp::delete(
                self.key(&format!("replica/{grain}/")),
                Some(DeleteOptions::new().with_prefix()),
            ),
            TxnOp::delete(self.key(&format!("failover/{grain}")), None),
        ]);
        self.c()
            .txn(txn)
            .await
            .map_err(ClusterError::etcd("forgetting a removed grain"))?;
        Ok(())
    }

    /// Every replica of every grain.
    pub async fn replicas(&self) -> Result<Vec<Replica>, ClusterError> {
        Ok(self
            .list::<ReplicaRecord>("replica/")
            .await?
            .into_iter()
            .filter_map(|(key, record, _)| {
                let (grain, node) = key.split_once('/')?;
                Some(Replica {
                    grain: grain.to_owned(),
                    node: node.to_owned(),
                    record,
                })
            })
            .collect())
    }
}

/// How far behind its newest copy on another node each grain placed on
/// `owner` is, at `now`: seconds since that copy's snapshot, or since the
/// grain was placed when no node has a copy yet. One entry per grain.
pub fn replication_lag(
    placements: &[crate::Placement],
    replicas: &[Replica],
    owner: &str,
    now: i64,
) -> Vec<(String, i64)> {
    placements
        .iter()
        .filter(|p| p.node == owner)
        .map(|p| {
            let newest = replicas
                .iter()
                .filter(|r| r.grain == p.grain && r.node != p.node)
                .map(|r| r.record.snapshot_unix)
                .max()
                .unwrap_or(p.placed_unix);
            (p.grain.clone(), (now - newest).max(0))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_from_the_newest_copy_elsewhere_or_the_placement() {
        let placed = |grain: &str, node: &str| crate::Placement {
            grain: grain.into(),
            node: node.into(),
            epoch: 1,
            placed_unix: 100,
        };
        let copy = |grain: &str, node: &str, at: i64| Replica {
            grain: grain.into(),
            node: node.into(),
            record: ReplicaRecord {
                label: format!("replica-{at}"),
                snapshot_unix: at,
                epoch: 1,
            },
        };
        let placements = [placed("a", "n1"), placed("b", "n1"), placed("c", "n2")];
        let replicas = [
            copy("a", "n2", 150),
            copy("a", "n3", 170),
            // A copy on the owner itself (from before a move) is no copy.
            copy("b", "n1", 190),
        ];
        let lag = replication_lag(&placements, &replicas, "n1", 200);
        assert_eq!(lag, [("a".to_owned(), 30), ("b".to_owned(), 100)]);
    }
}
