//! Backups of grain datasets: encrypted, chunked, signed, resumable.
//!
//! - [`export::Exporter`] streams a snapshot (Granary's file-tree stream
//!   for plain and btrfs, `zfs send` for ZFS), full first and then
//!   incremental from the last exported snapshot, cuts it into chunks,
//!   encrypts each to the admin's age recipients ([`crypt`]) and writes it
//!   durably to a [`target::Target`], journaling as it goes so a cut-off
//!   export resumes at the last whole chunk.
//! - [`catalogue::Catalogue`] lists every stream and chunk hash, signed
//!   with the node's Ed25519 key; [`restore::verify`] checks it all with
//!   no secret key.
//! - [`restore::RestoreJob`] decrypts a grain's chain into a staging
//!   dataset, re-owned to the grain's uid on this node, and compares a
//!   tree stream's files with the digest taken at export (a `zfs send`
//!   stream is checked by its chunks' hashes and `zfs receive`'s own
//!   checksums instead).
//! - [`remote`] carries the same files to another Granary node over TLS
//!   1.3 with both ends authenticated by their node keys.
//!
//! Everything here blocks; the daemon runs it on its blocking pool.

pub mod catalogue;
pub mod crypt;
pub mod export;
pub mod pinned;
pub mod progress;
pub mod remote;
pub mod restore;
pub mod target;
pub mod tree;

use std::path::Path;

use granary_package::SigningKey;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Something in the setup: config, keys, names. Nothing was changed.
    #[error("{0}")]
    Config(String),
    /// A signature, hash or decryption check failed: the backup was
    /// changed or damaged, or is not ours.
    #[error("{0}")]
    Integrity(String),
    /// Reading or writing files, media or the network.
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Other(String),
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// SHA-256 in hex, as packages compute it.
pub(crate) use granary_package::sha256_hex as sha256;

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

pub(crate) fn nonce() -> String {
    let mut n = [0u8; 8];
    getrandom::fill(&mut n).expect("the kernel's random source");
    hex(&n)
}

/// The name of a staging dataset for a restore or drill. It starts with a
/// digit, which no user name (so no grain id) does.
pub fn staging_id(purpose: &str) -> String {
    format!("0{purpose}-{}", nonce())
}

/// The hold tag that keeps a target's base snapshot from being pruned.
pub fn hold_tag(target: &str) -> String {
    format!("granary-backup-{}", &sha256(target.as_bytes())[..12])
}

/// The node's Ed25519 key (`keys/node.key` in the data directory), made on
/// first use: it signs catalogues and authenticates node-to-node TLS.
pub fn node_key(data_dir: &Path) -> Result<SigningKey, BackupError> {
    let path = data_dir.join("keys").join("node.key");
    if !path.exists() {
        let key = SigningKey::generate().map_err(|e| BackupError::Other(e.to_string()))?;
        match key.save_new(&path) {
            Ok(()) => {
                tracing::info!(key = %catalogue::fingerprint(&key.public()), "made this node's key");
                return Ok(key);
            }
            // Another process made it first: use theirs.
            Err(_) if path.exists() => {}
            Err(e) => return Err(BackupError::Config(e.to_string())),
        }
    }
    SigningKey::load(&path).map_err(|e| BackupError::Config(e.to_string()))
}
