//! Encryption of chunks to the admin's age recipients.
//!
//! Every chunk is a complete age file (X25519 recipients, ChaCha20-Poly1305
//! payload), so a chunk can be written, checked and resumed on its own, and
//! the standard `age` tool decrypts a backup without Granary:
//! `for c in <stream>/*.age; do age -d -i key.txt "$c"; done > stream`.

use std::io::{Read, Write};

use age::secrecy::ExposeSecret;

use crate::BackupError;

/// The public keys backups are encrypted to (`backup.recipients`).
pub struct Recipients(Vec<age::x25519::Recipient>);

impl Recipients {
    /// Parses `age1...` recipients; at least one is needed.
    pub fn parse(list: &[String]) -> Result<Recipients, BackupError> {
        if list.is_empty() {
            return Err(BackupError::Config(
                "no backup recipient: set backup.recipients in the config to the public key `granary backup keygen` printed".to_owned(),
            ));
        }
        list.iter()
            .map(|r| {
                r.trim().parse::<age::x25519::Recipient>().map_err(|e| {
                    BackupError::Config(format!(
                        "backup recipient {r:?} is not an age X25519 public key (age1...): {e}"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Recipients)
    }

    /// One age file holding `plain`.
    pub fn encrypt(&self, plain: &[u8]) -> Result<Vec<u8>, BackupError> {
        let encryptor =
            age::Encryptor::with_recipients(self.0.iter().map(|r| r as &dyn age::Recipient))
                .map_err(|e| BackupError::Other(format!("cannot encrypt: {e}")))?;
        // age adds a 16-byte tag per 64 KiB and a header of a few hundred
        // bytes: reserved whole, so a 32 MiB chunk is not grown to 64.
        let mut out = Vec::with_capacity(plain.len() + plain.len() / 65536 * 16 + 4096);
        let mut writer = encryptor
            .wrap_output(&mut out)
            .map_err(|e| BackupError::Other(format!("cannot encrypt: {e}")))?;
        writer
            .write_all(plain)
            .and_then(|()| writer.finish().map(drop))
            .map_err(|e| BackupError::Other(format!("cannot encrypt: {e}")))?;
        Ok(out)
    }
}

/// The admin's secret identity, held in memory only for one restore.
pub struct Identity(Vec<age::x25519::Identity>);

impl Identity {
    /// Parses an identity file's text (`AGE-SECRET-KEY-1...` lines,
    /// `#` comments), as `age-keygen` and `granary backup keygen` write it.
    pub fn parse(text: &[u8]) -> Result<Identity, BackupError> {
        let text = std::str::from_utf8(text)
            .map_err(|_| BackupError::Config("the identity file is not text".to_owned()))?;
        let mut ids = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // The line is a secret: never echoed in the error.
            ids.push(line.parse::<age::x25519::Identity>().map_err(|_| {
                BackupError::Config(format!(
                    "line {} of the identity file is not an AGE-SECRET-KEY-1 key",
                    n + 1
                ))
            })?);
        }
        if ids.is_empty() {
            return Err(BackupError::Config(
                "the identity file holds no AGE-SECRET-KEY-1 line".to_owned(),
            ));
        }
        Ok(Identity(ids))
    }

    /// Decrypts one chunk; a wrong key or any changed byte is an error.
    pub fn decrypt(&self, cipher: &[u8]) -> Result<Vec<u8>, BackupError> {
        let decryptor = age::Decryptor::new_buffered(cipher)
            .map_err(|e| BackupError::Integrity(format!("not an age file: {e}")))?;
        let mut reader = decryptor
            .decrypt(self.0.iter().map(|i| i as &dyn age::Identity))
            .map_err(|e| match e {
                age::DecryptError::NoMatchingKeys => BackupError::Config(
                    "the identity does not match the backup's recipient (wrong key file?)"
                        .to_owned(),
                ),
                e => BackupError::Integrity(format!("cannot decrypt: {e}")),
            })?;
        let mut plain = Vec::with_capacity(cipher.len());
        reader
            .read_to_end(&mut plain)
            .map_err(|e| BackupError::Integrity(format!("cannot decrypt: {e}")))?;
        Ok(plain)
    }
}

/// A new identity: (the identity file's text, its public recipient).
pub fn generate() -> (String, String) {
    let id = age::x25519::Identity::generate();
    let public = id.to_public().to_string();
    let text = format!(
        "# Granary backup identity. Keep it OFF the Granary host; restores need it.\n# public key: {public}\n{}\n",
        id.to_string().expose_secret()
    );
    (text, public)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_wrong_key() {
        let (secret, public) = generate();
        let recipients = Recipients::parse(&[public]).unwrap();
        let cipher = recipients.encrypt(b"hello chunk").unwrap();
        let id = Identity::parse(secret.as_bytes()).unwrap();
        assert_eq!(id.decrypt(&cipher).unwrap(), b"hello chunk");
        let (other, _) = generate();
        let other = Identity::parse(other.as_bytes()).unwrap();
        assert!(matches!(
            other.decrypt(&cipher),
            Err(BackupError::Config(_))
        ));
        let mut bad = cipher.clone();
        let last = bad.len() - 3;
        bad[last] ^= 1;
        assert!(matches!(id.decrypt(&bad), Err(BackupError::Integrity(_))));
        assert!(Recipients::parse(&["age1nope".to_owned()]).is_err());
        assert!(Recipients::parse(&[]).is_err());
    }
}
