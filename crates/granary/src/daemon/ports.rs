//! `DATA_DIR/run/ports.json`: where the running daemon actually listens, so
//! that tests and scripts can use port 0 and still find it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Ports {
    pub(crate) pid: u32,
    /// Every bound listener by name (`https`, `ssh`, ...).
    pub(crate) listeners: BTreeMap<String, SocketAddr>,
    pub(crate) admin_socket: PathBuf,
}

impl Ports {
    /// Written atomically: a reader never sees a half-written file.
    pub(crate) fn write(&self, path: &Path) -> anyhow::Result<()> {
        let mut json = serde_json::to_vec_pretty(self).expect("ports serialise");
        json.push(b'\n');
        granary_files::write_atomic(path, &json, 0o644)
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ports.json");
        let ports = Ports {
            pid: 42,
            listeners: [
                ("https".to_owned(), "127.0.0.1:4443".parse().unwrap()),
                ("ssh".to_owned(), "127.0.0.1:2222".parse().unwrap()),
            ]
            .into(),
            admin_socket: "/x/run/admin.sock".into(),
        };
        ports.write(&path).unwrap();
        let read: Ports = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(read, ports);
    }
}
