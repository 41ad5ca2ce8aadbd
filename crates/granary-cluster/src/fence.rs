//! The one rule that keeps a grain from running on two nodes at once.
//!
//! Before a node starts a grain it must hold, under a live lease, the
//! grain's placement, and the grain's dataset must not carry a newer epoch
//! than that placement: a newer epoch means the grain was placed again
//! after the placement this node read (its view is stale, or its copy of
//! the data came back from a node that ran the grain later). The caller
//! then writes the placement's epoch into the dataset before the grain
//! starts, so any later owner's check sees it.

use crate::Placement;

/// Why a node must not start a grain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("this node's lease is not live, so it may start nothing")]
    LeaseNotLive,
    #[error("the grain has no placement")]
    NotPlaced,
    #[error("the grain is placed on node {node:?} (epoch {epoch}), not here")]
    OwnedBy { node: String, epoch: i64 },
    #[error(
        "the dataset carries epoch {dataset}, newer than this placement's {placement}: it was placed again since"
    )]
    DatasetNewer { dataset: i64, placement: i64 },
}

/// Whether node `me` may start the grain: `Ok` with the epoch to write
/// into its dataset first.
pub fn may_start(
    me: &str,
    placement: Option<&Placement>,
    lease_live: bool,
    dataset_epoch: Option<i64>,
) -> Result<i64, Refusal> {
    if !lease_live {
        return Err(Refusal::LeaseNotLive);
    }
    let p = placement.ok_or(Refusal::NotPlaced)?;
    if p.node != me {
        return Err(Refusal::OwnedBy {
            node: p.node.clone(),
            epoch: p.epoch,
        });
    }
    match dataset_epoch {
        Some(d) if d > p.epoch => Err(Refusal::DatasetNewer {
            dataset: d,
            placement: p.epoch,
        }),
        _ => Ok(p.epoch),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(node: &str, epoch: i64) -> Placement {
        Placement {
            grain: "alice-git".into(),
            node: node.into(),
            epoch,
            placed_unix: 0,
        }
    }

    #[test]
    fn only_the_owner_under_a_live_lease_with_data_no_newer() {
        let p = placed("n1", 40);
        assert_eq!(may_start("n1", Some(&p), true, None), Ok(40));
        assert_eq!(may_start("n1", Some(&p), true, Some(40)), Ok(40));
        assert_eq!(may_start("n1", Some(&p), true, Some(12)), Ok(40));
        assert_eq!(
            may_start("n1", Some(&p), false, Some(40)),
            Err(Refusal::LeaseNotLive)
        );
        assert_eq!(
            may_start("n2", Some(&p), true, None),
            Err(Refusal::OwnedBy {
                node: "n1".into(),
                epoch: 40
            })
        );
        assert_eq!(may_start("n1", None, true, None), Err(Refusal::NotPlaced));
        assert_eq!(
            may_start("n1", Some(&p), true, Some(41)),
            Err(Refusal::DatasetNewer {
                dataset: 41,
                placement: 40
            })
        );
    }
}
