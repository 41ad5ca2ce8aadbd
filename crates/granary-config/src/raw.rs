//! The configuration file exactly as written: every field optional, unknown
//! keys rejected, no I/O.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub data_dir: Option<PathBuf>,
    pub domain: Option<String>,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub listen: RawListen,
    #[serde(default)]
    pub tls: RawTls,
    #[serde(default)]
    pub storage: RawStorage,
    #[serde(default)]
    pub jail: RawJail,
    #[serde(default)]
    pub grains: RawGrains,
    #[serde(default)]
    pub packages: RawPackages,
    #[serde(default)]
    pub snapshots: RawSnapshots,
    #[serde(default)]
    pub backup: RawBackup,
    #[serde(default)]
    pub gateway: RawGateway,
    #[serde(default)]
    pub mail: crate::mail::RawMail,
    #[serde(default)]
    pub xmpp: crate::xmpp::RawXmpp,
    /// Absent: one node, no etcd.
    pub cluster: Option<crate::cluster::RawCluster>,
    #[serde(default)]
    pub web: RawWeb,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWeb {
    pub admins: Option<Vec<String>>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    pub handshake_timeout: Option<String>,
    pub header_timeout: Option<String>,
    pub drain_timeout: Option<String>,
    pub max_header_kib: Option<u64>,
    pub upstream_idle: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackup {
    pub recipients: Option<Vec<String>>,
    pub chunk_mib: Option<u64>,
    pub trust: Option<Vec<String>>,
    #[serde(default)]
    pub targets: Vec<RawBackupTarget>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackupTarget {
    pub name: String,
    pub dir: Option<PathBuf>,
    pub remote: Option<String>,
    pub remote_key: Option<String>,
    pub interval: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSnapshots {
    pub interval: Option<String>,
    pub keep: Option<Vec<String>>,
    pub freeze_limit: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPackages {
    pub max_package_mib: Option<u64>,
    pub max_unpacked_mib: Option<u64>,
    pub max_entries: Option<u64>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGrains {
    pub idle_timeout: Option<String>,
    pub restart_backoff: Option<String>,
    pub restart_backoff_max: Option<String>,
    pub crash_loop_crashes: Option<u32>,
    pub crash_window: Option<String>,
    pub shutdown_grace: Option<String>,
    pub call_timeout: Option<String>,
    pub audit_flush: Option<String>,
    pub max_message_kib: Option<u64>,
    pub max_in_flight: Option<u32>,
    pub flood_cutoff: Option<u64>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub level: Option<String>,
}

/// `[listen]`: listener name to `address:port` (or `"off"`); the names
/// are checked when the config is resolved (`crate::listen`).
pub type RawListen = std::collections::BTreeMap<String, String>;

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub acme: Option<String>,
    pub acme_contact: Option<String>,
    pub acme_challenge: Option<String>,
    pub acme_ca: Option<PathBuf>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    pub backend: Option<String>,
    pub zfs_dataset: Option<String>,
    pub quota_mib: Option<u64>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJail {
    pub uid_range: Option<String>,
    pub cgroup_parent: Option<String>,
}

impl RawConfig {
    /// Parses TOML text. The error carries the line and column.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
}
