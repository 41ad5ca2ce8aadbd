//! The catalogue: what a backup target holds, signed with the exporting
//! node's Ed25519 key.
//!
//! `granary-backup.catalogue` lists every grain's streams and every
//! chunk's size and SHA-256 (of the encrypted bytes, so it is checked
//! without any secret). Its first line is the hex Ed25519 signature over
//! [`SIGNING_CONTEXT`] followed by the rest of the file (pretty JSON), so
//! one atomic rename replaces both. A stream enters the catalogue only once
//! all its chunks are durable.

use std::collections::BTreeMap;

use granary_package::{PublicKey, SigningKey};
use serde::{Deserialize, Serialize};

use crate::BackupError;

pub const CATALOGUE_FILE: &str = "granary-backup.catalogue";
/// Domain separation: a catalogue signature is never valid as anything else.
pub const SIGNING_CONTEXT: &[u8] = b"granary backup catalogue v1\n";
/// The catalogue format written. 2: a zfs stream may have no
/// `tree_sha256`. Format 1 catalogues are read too; Granary releases before
/// format 2 refuse a format 2 catalogue that holds a zfs stream ("missing
/// field `tree_sha256`").
pub const FORMAT: u32 = 2;
/// Larger catalogues are refused before parsing.
pub const MAX_CATALOGUE_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalogue {
    pub format: u32,
    /// The exporting node's public key (hex).
    pub node: String,
    /// Unix seconds of the last change.
    pub updated: i64,
    pub grains: BTreeMap<String, GrainEntry>,
}

/// One grain: what a restore needs to bring it up where it left off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrainEntry {
    pub user: String,
    pub kind: String,
    pub app_id: String,
    pub app_version: String,
    /// The app version the data was last migrated to.
    pub data_version: Option<String>,
    /// The grain's uid on the exporting node (files are re-owned on restore).
    pub host_uid: u32,
    pub grants: Vec<GrantEntry>,
    pub streams: Vec<StreamEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantEntry {
    /// Grain ids: `<user>-<kind>`.
    pub from: String,
    pub to: String,
    pub capability: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamFormat {
    /// Granary's file-tree stream (plain and btrfs; restores anywhere).
    Tree,
    /// `zfs send` (restores onto ZFS).
    Zfs,
}

/// One snapshot's stream: full when `base` is none, else the changes
/// since `base`, the previous stream's snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamEntry {
    pub snapshot: String,
    pub base: Option<String>,
    pub format: StreamFormat,
    pub created: i64,
    /// The directory holding the chunks, relative to the target.
    pub dir: String,
    pub plain_bytes: u64,
    pub plain_sha256: String,
    /// [`crate::tree::digest`] of the snapshot's files: what a restore or a
    /// drill of a tree stream must reproduce. `None` for a `zfs send`
    /// stream: taking it meant reading the whole snapshot a second time,
    /// through FUSE, which doubled an export's time. Such a stream is
    /// checked as it is restored instead: every chunk's authenticated
    /// encryption, every piece's SHA-256 against the signed catalogue, and
    /// `zfs receive`'s own checksums of the stream and of every block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree_sha256: Option<String>,
    pub chunks: Vec<ChunkEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkEntry {
    /// File name inside the stream's directory.
    pub file: String,
    /// Size of the encrypted file.
    pub bytes: u64,
    /// SHA-256 of the encrypted file.
    pub sha256: String,
    /// SHA-256 of the plaintext piece (lets an export resume).
    pub plain_sha256: String,
}

impl ChunkEntry {
    /// Whether `cipher` has the size this chunk was exported with.
    pub fn check_size(&self, cipher: &[u8]) -> Result<(), ChunkDamage> {
        match cipher.len() as u64 {
            n if n == self.bytes => Ok(()),
            found => Err(ChunkDamage::Size {
                found,
                recorded: self.bytes,
            }),
        }
    }

    /// Whether `cipher` is this chunk as exported (its size and SHA-256);
    /// what is wrong with it otherwise.
    pub fn check(&self, cipher: &[u8]) -> Result<(), ChunkDamage> {
        self.check_size(cipher)?;
        let sha = crate::sha256(cipher);
        if sha != self.sha256 {
            return Err(ChunkDamage::Digest {
                found: sha,
                recorded: self.sha256.clone(),
            });
        }
        Ok(())
    }
}

/// How a chunk differs from what its catalogue recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkDamage {
    #[error("{found} bytes, the catalogue says {recorded} (changed or damaged)")]
    Size { found: u64, recorded: u64 },
    #[error("SHA-256 {found} does not match the catalogue's {recorded} (changed or damaged)")]
    Digest { found: String, recorded: String },
}

impl Catalogue {
    pub fn new(node: &PublicKey) -> Catalogue {
        Catalogue {
            format: FORMAT,
            node: node.hex(),
            updated: crate::now(),
            grains: BTreeMap::new(),
        }
    }

    /// The catalogue file: the signature line, then the JSON.
    pub fn sign(&self, key: &SigningKey) -> Result<Vec<u8>, BackupError> {
        let mut json = serde_json::to_vec_pretty(self)
            .map_err(|e| BackupError::Other(format!("cannot write the catalogue: {e}")))?;
        json.push(b'\n');
        let mut message = SIGNING_CONTEXT.to_vec();
        message.extend_from_slice(&json);
        let sig = key.sign(&message);
        let mut file: Vec<u8> = crate::hex(&sig).into_bytes();
        file.push(b'\n');
        file.extend_from_slice(&json);
        Ok(file)
    }

    /// Checks the signature against the key the catalogue names, then
    /// parses and checks every name in it. Returns the signer.
    pub fn open(file: &[u8]) -> Result<(Catalogue, PublicKey), BackupError> {
        let split = file.iter().position(|b| *b == b'\n').unwrap_or(file.len());
        let (sig, json) = (&file[..split], file.get(split + 1..).unwrap_or_default());
        if json.len() > MAX_CATALOGUE_BYTES {
            return Err(BackupError::Integrity(format!(
                "the catalogue is larger than {MAX_CATALOGUE_BYTES} bytes"
            )));
        }
        // The signer is read before trusting anything else: a minimal parse
        // of the one field, then the signature over the exact bytes.
        #[derive(Deserialize)]
        struct Signer {
            node: String,
        }
        let signer: Signer = serde_json::from_slice(json)
            .map_err(|e| BackupError::Integrity(format!("the catalogue is not valid: {e}")))?;
        let key = parse_key(&signer.node)?;
        let sig = std::str::from_utf8(sig)
            .ok()
            .and_then(|s| unhex(s.trim()))
            .filter(|s| s.len() == 64)
            .ok_or_else(|| {
                BackupError::Integrity(format!(
                    "{CATALOGUE_FILE} does not start with a hex Ed25519 signature"
                ))
            })?;
        let mut message = SIGNING_CONTEXT.to_vec();
        message.extend_from_slice(json);
        if !key.verify(&message, &sig) {
            return Err(BackupError::Integrity(format!(
                "the catalogue's signature does not match its contents (signer {})",
                fingerprint(&key)
            )));
        }
        let catalogue: Catalogue = serde_json::from_slice(json)
            .map_err(|e| BackupError::Integrity(format!("the catalogue is not valid: {e}")))?;
        catalogue.check()?;
        Ok((catalogue, key))
    }

    /// Every name the catalogue gives must be one a target may hold.
    fn check(&self) -> Result<(), BackupError> {
        if !(1..=FORMAT).contains(&self.format) {
            return Err(BackupError::Integrity(format!(
                "catalogue format {} is not supported (this Granary reads 1 to {FORMAT}; a newer release wrote it?)",
                self.format
            )));
        }
        let bad = |what: String| Err(BackupError::Integrity(format!("catalogue: {what}")));
        for (id, grain) in &self.grains {
            // The one rule: a valid user and kind, and the id they make.
            if granary_model::GrainId::for_user(&grain.user, &grain.kind)
                .map_or(true, |g| g.as_str() != id)
            {
                return bad(format!("{id:?} is not the grain id of its user and kind"));
            }
            // A grain's grants all involve the grain.
            if grain.grants.iter().any(|g| g.from != *id && g.to != *id) {
                return bad(format!("{id} lists a grant between other grains"));
            }
            let mut previous: Option<&str> = None;
            for s in &grain.streams {
                if !granary_datasets::valid_label(&s.snapshot)
                    // Each stream continues the one before, or starts a
                    // new chain with a full stream (its base was gone).
                    || (s.base.is_some() && s.base.as_deref() != previous)
                    || !crate::target::valid_name(&s.dir)
                    || s.chunks.is_empty()
                {
                    return bad(format!("stream {} of {id} is not well formed", s.snapshot));
                }
                for c in &s.chunks {
                    if !crate::target::valid_name(&c.file) || c.file.contains('/') {
                        return bad(format!("chunk name {:?} in {id}", c.file));
                    }
                }
                previous = Some(&s.snapshot);
            }
        }
        Ok(())
    }
}

pub fn parse_key(hex: &str) -> Result<PublicKey, BackupError> {
    let bytes = unhex(hex.trim()).filter(|b| b.len() == 32).ok_or_else(|| {
        BackupError::Integrity(format!("{hex:?} is not a hex Ed25519 public key"))
    })?;
    let mut key = [0u8; 32];
    key.copy_from_slice(&bytes);
    Ok(PublicKey(key))
}

/// How keys are shown to people: the first 16 hex digits of the key.
pub fn fingerprint(key: &PublicKey) -> String {
    key.hex()[..16].to_owned()
}

pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    hex::decode(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_catalogue_round_trips_and_refuses_changes() {
        let key = SigningKey::generate().unwrap();
        let mut cat = Catalogue::new(&key.public());
        cat.grains.insert(
            "alice-hello".to_owned(),
            GrainEntry {
                user: "alice".into(),
                kind: "hello".into(),
                app_id: "k00".into(),
                app_version: "1.0".into(),
                data_version: None,
                host_uid: 7,
                grants: vec![],
                streams: vec![StreamEntry {
                    snapshot: "backup-1".into(),
                    base: None,
                    format: StreamFormat::Tree,
                    created: 1,
                    dir: "streams/alice-hello/000001-backup-1".into(),
                    plain_bytes: 3,
                    plain_sha256: "00".into(),
                    tree_sha256: Some("00".into()),
                    chunks: vec![ChunkEntry {
                        file: "00000000.age".into(),
                        bytes: 3,
                        sha256: "00".into(),
                        plain_sha256: "00".into(),
                    }],
                }],
            },
        );
        let file = cat.sign(&key).unwrap();
        let (back, signer) = Catalogue::open(&file).unwrap();
        assert_eq!(back, cat);
        assert_eq!(signer, key.public());
        let mut changed = file.clone();
        let at = changed.windows(4).position(|w| w == b"alic").unwrap();
        changed[at] = b'e';
        assert!(matches!(
            Catalogue::open(&changed),
            Err(BackupError::Integrity(_))
        ));
        // Signed by another key but claiming this node: refused.
        let other = SigningKey::generate().unwrap();
        let forged = other.sign(&[SIGNING_CONTEXT, &file[129..]].concat());
        let forged = [crate::hex(&forged).as_bytes(), &file[128..]].concat();
        assert!(Catalogue::open(&forged).is_err());
        assert!(Catalogue::open(b"").is_err());
        // A grant between two other grains, or an id that is not the
        // grain's user and kind, is refused even when signed.
        let mut other = cat.clone();
        other.grains.get_mut("alice-hello").unwrap().grants = vec![GrantEntry {
            from: "carol-photos".into(),
            to: "bob-blog".into(),
            capability: "notify".into(),
        }];
        assert!(Catalogue::open(&other.sign(&key).unwrap()).is_err());
        let mut other = cat.clone();
        let entry = other.grains.remove("alice-hello").unwrap();
        other.grains.insert("bob-hello".into(), entry);
        assert!(Catalogue::open(&other.sign(&key).unwrap()).is_err());
        // A path-like chunk name is refused even when signed.
        cat.grains.get_mut("alice-hello").unwrap().streams[0].chunks[0].file = "../x".into();
        assert!(Catalogue::open(&cat.sign(&key).unwrap()).is_err());
    }
}
