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
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub level: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub https: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    pub backend: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJail {
    pub uid_range: Option<String>,
}

impl RawConfig {
    /// Parses TOML text. The error carries the line and column.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
}
