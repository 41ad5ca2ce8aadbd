//! Node names: how a cluster member is called in etcd, in commands and in
//! host names, so a DNS label.

/// Whether `name` can name a node: 1-63 of `a-z`, `0-9` and `-`, starting
/// with a letter and not ending with `-`.
pub fn valid_node_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && !name.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_dns_labels() {
        for ok in ["n1", "pi-kitchen", "a"] {
            assert!(valid_node_name(ok), "{ok}");
        }
        for bad in ["", "1n", "N1", "n_1", "n1-", "a.b", &"a".repeat(64)] {
            assert!(!valid_node_name(bad), "{bad}");
        }
    }
}
