//! Where a new grain goes: the live, undrained node with the most room
//! that can run the app's architecture.

use crate::{Arch, NodeStatus};

/// The node a new grain of an app built for `arches` should go to, or
/// why none can take it. Room is the free space the node last reported;
/// ties go to the node with fewer grains, then to the first name, so the
/// choice is the same on every node that makes it.
pub fn choose_node<'a>(arches: &[Arch], nodes: &'a [NodeStatus]) -> Result<&'a str, String> {
    let mut why = Vec::new();
    let mut best: Option<(&NodeStatus, u64)> = None;
    for n in nodes {
        let name = &n.record.name;
        let Some(alive) = &n.alive else {
            why.push(format!("{name}: down"));
            continue;
        };
        if n.record.drained {
            why.push(format!("{name}: drained"));
            continue;
        }
        if !arches.iter().any(|a| n.record.arches.contains(a)) {
            let runs: Vec<&str> = n.record.arches.iter().map(|a| a.as_str()).collect();
            why.push(format!("{name}: runs only {}", runs.join(", ")));
            continue;
        }
        if n.grains >= n.record.max_grains as usize {
            why.push(format!("{name}: full ({} grains)", n.grains));
            continue;
        }
        let better = match best {
            None => true,
            Some((b, room)) => {
                (
                    alive.free_bytes,
                    std::cmp::Reverse(n.grains),
                    std::cmp::Reverse(name),
                ) > (
                    room,
                    std::cmp::Reverse(b.grains),
                    std::cmp::Reverse(&b.record.name),
                )
            }
        };
        if better {
            best = Some((n, alive.free_bytes));
        }
    }
    match best {
        Some((n, _)) => Ok(&n.record.name),
        None if nodes.is_empty() => Err("the cluster has no nodes".to_owned()),
        None => Err(why.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Alive, NodeRecord};

    fn node(name: &str, arches: &[Arch], free: Option<u64>, grains: usize) -> NodeStatus {
        NodeStatus {
            record: NodeRecord {
                name: name.into(),
                arches: arches.to_vec(),
                address: String::new(),
                key: String::new(),
                max_grains: 10,
                drained: false,
                joined_unix: 0,
            },
            alive: free.map(|free_bytes| Alive {
                lease: 1,
                started_unix: 0,
                free_bytes,
                link: String::new(),
            }),
            lease_age_secs: None,
            grains,
        }
    }

    #[test]
    fn most_room_among_live_undrained_nodes_of_the_right_architecture() {
        let x = [Arch::X86_64];
        let mut nodes = vec![
            node("n1", &x, Some(100), 3),
            node("n2", &x, Some(500), 5),
            node("pi", &[Arch::Aarch64], Some(9000), 0),
            node("n4", &x, None, 0),
        ];
        assert_eq!(choose_node(&x, &nodes), Ok("n2"));
        assert_eq!(choose_node(&[Arch::Aarch64], &nodes), Ok("pi"));
        // An app with both images may go anywhere.
        assert_eq!(
            choose_node(&[Arch::X86_64, Arch::Aarch64], &nodes),
            Ok("pi")
        );
        nodes[1].record.drained = true;
        assert_eq!(choose_node(&x, &nodes), Ok("n1"));
        nodes[0].grains = 10;
        let why = choose_node(&x, &nodes).unwrap_err();
        assert!(
            why.contains("n1: full") && why.contains("n2: drained"),
            "{why}"
        );
        assert!(
            why.contains("pi: runs only aarch64") && why.contains("n4: down"),
            "{why}"
        );
        // Equal room: fewer grains, then the first name.
        let even = vec![
            node("b", &x, Some(7), 1),
            node("a", &x, Some(7), 1),
            node("c", &x, Some(7), 0),
        ];
        assert_eq!(choose_node(&x, &even), Ok("c"));
        assert_eq!(choose_node(&x, &even[..2]), Ok("a"));
        assert!(choose_node(&x, &[]).is_err());
    }
}
