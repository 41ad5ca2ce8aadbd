//! What can go wrong, each with what to do about it.

/// An error of the cluster layer. The messages are for the admin: each
/// says what happened and, where there is one, the command that helps.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("etcd ({what}): {source}")]
    Etcd {
        what: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("this etcd already holds cluster {0}; `granary cluster init` runs once")]
    AlreadyInitialised(String),
    #[error("this etcd holds no Granary cluster; run `granary cluster init` first")]
    NotInitialised,
    #[error(
        "the join token is unknown, already used or expired; ask for a new one with `granary cluster token`"
    )]
    BadToken,
    #[error(
        "a node named {0:?} is already a member; pick another name or `granary node remove` the old one"
    )]
    NameTaken(String),
    #[error("{0:?} is not a node name: 1-63 of a-z, 0-9 and '-', starting with a letter")]
    BadName(String),
    #[error("no node named {0:?} is a member (`granary node list`)")]
    NoSuchNode(String),
    #[error("node {0:?} is running (it holds its lease); stop its daemon before removing it")]
    NodeAlive(String),
    #[error(
        "node {node:?} still owns {count} grain(s); pass --force to drop their placement (their data stays on that node's disks)"
    )]
    NodeHasGrains { node: String, count: usize },
    #[error("{grain} is already placed on node {node:?} (epoch {epoch})")]
    AlreadyPlaced {
        grain: String,
        node: String,
        epoch: i64,
    },
    #[error("{0} has no placement")]
    NotPlaced(String),
    #[error("no node can take {grain}: {why}")]
    NoRoom { grain: String, why: String },
    #[error(
        "the placement of {grain} changed while we moved it (expected epoch {expected}); read it again and retry"
    )]
    Conflict { grain: String, expected: i64 },
    #[error("the record at {key} in etcd is damaged: {why}")]
    Damaged { key: String, why: String },
    #[error(
        "node {0:?} lost its lease; it must not start or serve grains until it holds a new one"
    )]
    LeaseLost(String),
    #[error(
        "node {0:?} is running elsewhere: another process renews its lease (a copy of this data dir? give the copy its own node name and join it)"
    )]
    LeaseHeld(String),
    #[error("{0}")]
    Changed(String),
}

impl ClusterError {
    pub(crate) fn etcd(what: &'static str) -> impl FnOnce(etcd_client::Error) -> ClusterError {
        move |source| ClusterError::Etcd { what, source }
    }
}
