//! Several nodes as one Granary, coordinated through etcd v3.
//!
//! What lives in etcd, under one prefix (`/granary/` by default):
//!
//! | key | value | lifetime |
//! |---|---|---|
//! | `cluster` | [`ClusterInfo`]: the cluster's id | written once by `granary cluster init` |
//! | `join/<sha256 of token>` | [`JoinTicket`] | a lease of the token's lifetime; deleted by the join that uses it |
//! | `nodes/<name>` | [`NodeRecord`]: architectures, capacity, node link, node key, drained | from `granary node join` to `granary node remove` |
//! | `alive/<name>` | [`Alive`]: free space, when the daemon started | attached to the node's lease: gone when the lease expires |
//! | `placement/<grain>` | [`PlacementRecord`]: the owner node | its mod revision is the grain's epoch, the fencing token |
//! | `rest/<name>` | when the node stopped cleanly | a lease of [`REST_GRACE`]: its grains are not failed over meanwhile |
//! | `replica/<grain>/<node>` | [`ReplicaRecord`]: the copy of a grain's data on a node | until the grain is removed |
//! | `failover/<grain>` | [`FailoverRecord`]: the grain's last failover and what it lost | until the grain is removed |
//! | `log/<n>` | entry `n` of the shared records' log ([`Coordinator::log_append`]): the rows one write changed | kept |
//!
//! Every change that must not race is one etcd transaction: a join uses
//! its token and creates the node record at once, a placement is created
//! only where none exists and moved only from the epoch the mover read.
//! No consensus of our own: etcd's.

mod coordinator;
mod error;
mod etcd;
mod failover;
mod fence;
mod grains;
mod lease;
mod ledger;
pub mod link;
pub mod moves;
mod place;
mod records;
mod replicas;
pub mod spools;

pub use coordinator::{Coordinator, EtcdTls, Located, NodeStatus, Route};
pub use error::ClusterError;
pub use failover::{FailoverRecord, Takeover, takeovers};
pub use fence::{Refusal, may_start};
pub use grains::{ClusterGrains, Records, befriend_elsewhere, deliver_stanza, open_grant};
pub use granary_model::valid_node_name;
pub use lease::{LeaseState, NodeLease};
pub use ledger::{LEDGER_DEADLINE, LogWatch};
pub use moves::Moves;
pub use place::choose_node;
pub use records::{Alive, Arch, ClusterInfo, JoinTicket, NodeRecord, Placement, PlacementRecord};
pub use replicas::{Replica, ReplicaRecord, replication_lag};
pub use spools::SpoolCopies;

/// The key prefix every record of one cluster lives under.
pub const DEFAULT_PREFIX: &str = "/granary/";

/// How long a node stopped cleanly is not failed over: long enough for a
/// restart or an upgrade. Drain a node before a longer stop.
pub const REST_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// Seconds since the Unix epoch, for the records' timestamps.
pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
