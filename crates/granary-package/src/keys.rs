//! Ed25519 signing keys (ring) and the app ids derived from them.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::{PackageError, io, sha256_hex};

/// A packager's private key (PKCS#8, stored owner-only).
pub struct SigningKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

/// A packager's public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub [u8; 32]);

/// The app id a key signs as: `k` and the first 32 hex digits of the
/// SHA-256 of the public key.
pub fn app_id(key: &PublicKey) -> String {
    format!("k{}", &sha256_hex(&key.0)[..32])
}

impl std::fmt::Debug for SigningKey {
    /// Never prints the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", app_id(&self.public()))
    }
}

impl PublicKey {
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Checks `signature` over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(message, signature)
            .is_ok()
    }
}

impl SigningKey {
    pub fn generate() -> Result<SigningKey, PackageError> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| PackageError::Key("cannot generate an Ed25519 key".to_owned()))?;
        SigningKey::from_pkcs8(pkcs8.as_ref())
    }

    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<SigningKey, PackageError> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8)
            .map_err(|e| PackageError::Key(format!("not an Ed25519 PKCS#8 key: {e}")))?;
        Ok(SigningKey {
            pair,
            pkcs8: pkcs8.to_vec(),
        })
    }

    /// Reads a key file, refusing one that others can read.
    pub fn load(path: &Path) -> Result<SigningKey, PackageError> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).map_err(io(format!(
            "cannot read the signing key {} (make one with `granary pack keygen`)",
            path.display()
        )))?;
        if meta.mode() & 0o077 != 0 {
            return Err(PackageError::Key(format!(
                "the signing key {} is readable by others (mode {:o}); chmod 600 it",
                path.display(),
                meta.mode() & 0o777
            )));
        }
        let bytes = std::fs::read(path).map_err(io(format!("reading {}", path.display())))?;
        SigningKey::from_pkcs8(&bytes)
    }

    /// Writes a new key file (mode 0600); never overwrites one.
    pub fn save_new(&self, path: &Path) -> Result<(), PackageError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io(format!("creating the key file {}", path.display())))?;
        file.write_all(&self.pkcs8)
            .and_then(|()| file.sync_all())
            .map_err(io(format!("writing {}", path.display())))
    }

    /// The private key as PKCS#8 DER (for TLS with the same key).
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    pub fn public(&self) -> PublicKey {
        let mut key = [0u8; 32];
        key.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(key)
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.pair.sign(message).as_ref());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sign_verify_and_save_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate().unwrap();
        let path = dir.path().join("keys/pack.key");
        key.save_new(&path).unwrap();
        assert!(key.save_new(&path).is_err(), "never overwrites");
        let loaded = SigningKey::load(&path).unwrap();
        assert_eq!(loaded.public(), key.public());
        let sig = key.sign(b"hello");
        assert!(loaded.public().verify(b"hello", &sig));
        assert!(!loaded.public().verify(b"hellO", &sig));
        let id = app_id(&key.public());
        assert_eq!(id.len(), 33);
        assert_ne!(id, app_id(&SigningKey::generate().unwrap().public()));
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        assert!(
            SigningKey::load(&path)
                .unwrap_err()
                .to_string()
                .contains("chmod 600")
        );
    }
}
