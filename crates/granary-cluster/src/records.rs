//! The records kept in etcd, as JSON. Unknown fields are kept out by
//! nothing: a newer node may add fields an older one ignores.

use serde::{Deserialize, Serialize};

/// A CPU architecture an app image can be built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    /// The architecture this binary was built for; `None` on one no image
    /// is built for.
    pub fn host() -> Option<Arch> {
        Arch::parse(std::env::consts::ARCH)
    }

    pub fn parse(s: &str) -> Option<Arch> {
        match s {
            "x86_64" | "amd64" => Some(Arch::X86_64),
            "aarch64" | "arm64" => Some(Arch::Aarch64),
            _ => None,
        }
    }

    /// The architecture an ELF executable is built for, from its first 20
    /// bytes; `None` for anything else (a script runs anywhere its
    /// interpreter does).
    pub fn of_elf(header: &[u8]) -> Option<Arch> {
        granary_model::elf_arch(header).and_then(Arch::parse)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `cluster`: written once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// 16 random bytes, hex.
    pub id: String,
    pub created_unix: i64,
}

/// `join/<hash>`: a join token waiting to be used. The token itself is
/// never stored, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTicket {
    pub created_unix: i64,
    pub expires_unix: i64,
}

/// `nodes/<name>`: a member, from its join to its removal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    /// What app images this node can run.
    pub arches: Vec<Arch>,
    /// Where other nodes reach its node link (`host:port`).
    pub address: String,
    /// Its Ed25519 node key (64 hex digits), pinned on node links.
    pub key: String,
    /// How many grains it may own.
    pub max_grains: u32,
    /// A drained node takes no new grains. Kept here, not in the node's
    /// own state, so it survives the node's restart.
    #[serde(default)]
    pub drained: bool,
    pub joined_unix: i64,
}

/// `alive/<name>`: present while the node's daemon holds its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alive {
    /// The lease this record is attached to.
    pub lease: i64,
    pub started_unix: i64,
    /// Free bytes where its datasets live, as the daemon last saw them.
    pub free_bytes: u64,
    /// Where its node link listens now (`host:port`); empty when it has
    /// none (other nodes then use the member record's address).
    #[serde(default)]
    pub link: String,
}

/// `placement/<grain>` as stored; the epoch is not in the value but is the
/// key's mod revision, so no writer can get it wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRecord {
    pub node: String,
    pub placed_unix: i64,
}

/// Where a grain runs, and the epoch that placement holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Placement {
    pub grain: String,
    pub node: String,
    /// The etcd revision of the write that placed the grain here: it only
    /// grows, so a dataset that carries a larger one was placed later.
    pub epoch: i64,
    pub placed_unix: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architectures_round_trip() {
        assert_eq!(Arch::parse("arm64"), Some(Arch::Aarch64));
        assert_eq!(Arch::parse("riscv64"), None);
        let json = serde_json::to_string(&[Arch::X86_64, Arch::Aarch64]).unwrap();
        assert_eq!(json, r#"["x86_64","aarch64"]"#);
        assert!(Arch::host().is_some());
    }

    #[test]
    fn an_elf_header_names_its_architecture() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(Arch::of_elf(&me[..20]), Arch::host());
        let mut arm = me[..20].to_vec();
        arm[18..20].copy_from_slice(&183u16.to_le_bytes());
        assert_eq!(Arch::of_elf(&arm), Some(Arch::Aarch64));
        arm[18..20].copy_from_slice(&243u16.to_le_bytes()); // RISC-V
        assert_eq!(Arch::of_elf(&arm), None);
        assert_eq!(Arch::of_elf(b"#!/bin/sh\necho hello\n"), None);
        assert_eq!(Arch::of_elf(b"\x7fELF"), None);
    }
}
