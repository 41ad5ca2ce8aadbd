//! DKIM (RFC 6376) for mail leaving this host: each mail domain's keys,
//! and the signatures added to outbound messages.
//!
//! Every domain has an Ed25519 key (RFC 8463) and an RSA-2048 key, each
//! under its own selector, and every message gets both signatures:
//! receivers that know Ed25519 check that one, the others RSA. Keys live
//! in `DATA_DIR/dkim/<domain>/<selector>.key` (DER, mode 0600, owner-only
//! directories); the newest key of each algorithm signs. Rotating makes a
//! new pair that waits (`<selector>.pending`) until it is activated, once
//! its DNS records are published: signing with a key receivers cannot find
//! yet would fail every message. The old selectors stay (and stay in
//! `granary mail dns`) until retired, so mail signed before still
//! verifies.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use base64::Engine;
use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::generate::DkimKeyPair;
use mail_auth::dkim::{DkimSigner, Done};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer};

/// The header fields signed (RFC 6376 §5.4.1's list of those that matter),
/// each once more than present would be oversigning; these are signed as
/// present.
const SIGNED: &[&str] = &[
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Unsubscribe",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Ed25519,
    Rsa,
}

impl Algorithm {
    /// The `k=` tag.
    pub fn tag(self) -> &'static str {
        match self {
            Algorithm::Ed25519 => "ed25519",
            Algorithm::Rsa => "rsa",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Algorithm::Ed25519 => "ed",
            Algorithm::Rsa => "rsa",
        }
    }
}

/// One selector of a domain.
#[derive(Debug, Clone)]
pub struct KeyInfo {
    pub selector: String,
    pub algorithm: Algorithm,
    /// Unix seconds.
    pub created_at: i64,
    /// The newest active key of its algorithm: it signs.
    pub signing: bool,
    /// Made by a rotation, not signing until activated.
    pub pending: bool,
    /// The `p=` value (base64).
    pub public_key: String,
}

impl KeyInfo {
    /// The TXT record's value.
    pub fn record(&self) -> String {
        format!("v=DKIM1; k={}; p={}", self.algorithm.tag(), self.public_key)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("DKIM keys in {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("DKIM: {0}")]
    Key(String),
}

/// A domain's ready signers, and the key directory's time they were
/// read at (a rotation or a retirement changes it).
type Signers = (Option<SystemTime>, Vec<Arc<DkimSigner<DkimKey, Done>>>);

/// The keys of every mail domain, under one directory. Cheap to clone
/// (the parsed signers are shared).
#[derive(Clone)]
pub struct DkimKeys {
    dir: PathBuf,
    /// Parsing an RSA key checks it, which costs more than a signature:
    /// each domain's signers are kept until its directory changes.
    signers: Arc<Mutex<HashMap<String, Signers>>>,
}

impl std::fmt::Debug for DkimKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DkimKeys").field("dir", &self.dir).finish()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DkimError + '_ {
    move |source| DkimError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl DkimKeys {
    pub fn new(dir: impl Into<PathBuf>) -> DkimKeys {
        DkimKeys {
            dir: dir.into(),
            signers: Arc::default(),
        }
    }

    fn domain_dir(&self, domain: &str) -> Result<PathBuf, DkimError> {
        let domain = domain.to_ascii_lowercase();
        if domain.is_empty()
            || domain.starts_with('.')
            || domain.contains("..")
            || !domain
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(DkimError::Key(format!("{domain:?} is not a domain")));
        }
        Ok(self.dir.join(domain))
    }

    /// Makes a new Ed25519 and RSA-2048 pair for `domain`, pending until
    /// [`DkimKeys::activate`] (a domain's first pair signs at once).
    /// Blocking (RSA key generation takes a moment).
    pub fn rotate(&self, domain: &str) -> Result<Vec<KeyInfo>, DkimError> {
        let first = self.list(domain)?.is_empty();
        self.make(domain, if first { "key" } else { "pending" })
    }

    /// Lets `domain`'s pending keys sign. Blocking.
    pub fn activate(&self, domain: &str) -> Result<Vec<KeyInfo>, DkimError> {
        let dir = self.domain_dir(domain)?;
        let pending: Vec<KeyInfo> = self
            .list(domain)?
            .into_iter()
            .filter(|k| k.pending)
            .collect();
        if pending.is_empty() {
            return Err(DkimError::Key(format!(
                "{domain} has no pending keys (granary mail dkim rotate {domain} makes some)"
            )));
        }
        for k in &pending {
            let from = dir.join(format!("{}.pending", k.selector));
            let to = dir.join(format!("{}.key", k.selector));
            std::fs::rename(&from, &to).map_err(io(&from))?;
        }
        granary_files::sync_dir(&dir).map_err(|e| DkimError::Key(e.to_string()))?;
        self.list(domain)
    }

    fn make(&self, domain: &str, suffix: &str) -> Result<Vec<KeyInfo>, DkimError> {
        let dir = self.domain_dir(domain)?;
        for d in [&self.dir, &dir] {
            if !d.exists() {
                std::fs::create_dir_all(d).map_err(io(d))?;
                std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                    .map_err(io(d))?;
            }
        }
        // Selectors sort by when they were made: UTC to the millisecond.
        let now = time::OffsetDateTime::now_utc();
        let mut stamp = format!(
            "{:04}{:02}{:02}{:02}{:02}{:02}{:03}",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute(),
            now.second(),
            now.millisecond()
        );
        while ["key", "pending"]
            .iter()
            .any(|s| std::fs::exists(dir.join(format!("ed-{stamp}.{s}"))).unwrap_or(false))
        {
            stamp.push('1');
        }
        let ed = DkimKeyPair::generate_ed25519().map_err(|e| DkimError::Key(e.to_string()))?;
        let rsa = DkimKeyPair::generate_rsa(2048).map_err(|e| DkimError::Key(e.to_string()))?;
        for (alg, pair) in [(Algorithm::Ed25519, ed), (Algorithm::Rsa, rsa)] {
            let path = dir.join(format!("{}-{stamp}.{suffix}", alg.prefix()));
            granary_files::write_atomic(&path, pair.private_key(), 0o600)
                .map_err(|e| DkimError::Key(e.to_string()))?;
        }
        self.list(domain)
    }

    /// Makes the first pair when `domain` has none. Blocking.
    pub fn ensure(&self, domain: &str) -> Result<(), DkimError> {
        if self.list(domain)?.is_empty() {
            self.rotate(domain)?;
        }
        Ok(())
    }

    /// Removes a selector that no longer signs. Blocking.
    pub fn retire(&self, domain: &str, selector: &str) -> Result<(), DkimError> {
        let keys = self.list(domain)?;
        let Some(key) = keys.iter().find(|k| k.selector == selector) else {
            return Err(DkimError::Key(format!(
                "{domain} has no selector {selector:?} (granary mail dkim list {domain})"
            )));
        };
        if key.signing {
            return Err(DkimError::Key(format!(
                "{selector} still signs {domain}'s mail; rotate first (granary mail dkim rotate {domain})"
            )));
        }
        let suffix = if key.pending { "pending" } else { "key" };
        let path = self
            .domain_dir(domain)?
            .join(format!("{selector}.{suffix}"));
        std::fs::remove_file(&path).map_err(io(&path))
    }

    /// Every selector of `domain`, newest first. Blocking.
    pub fn list(&self, domain: &str) -> Result<Vec<KeyInfo>, DkimError> {
        Ok(self
            .load(domain)?
            .into_iter()
            .map(|(info, _)| info)
            .collect())
    }

    fn load(&self, domain: &str) -> Result<Vec<(KeyInfo, Vec<u8>)>, DkimError> {
        let dir = self.domain_dir(domain)?;
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let (selector, pending) =
                match (name.strip_suffix(".key"), name.strip_suffix(".pending")) {
                    (Some(s), _) => (s, false),
                    (None, Some(s)) => (s, true),
                    (None, None) => continue,
                };
            let algorithm = if selector.starts_with("ed-") {
                Algorithm::Ed25519
            } else if selector.starts_with("rsa-") {
                Algorithm::Rsa
            } else {
                continue;
            };
            let path = entry.path();
            let der = std::fs::read(&path).map_err(io(&path))?;
            let created_at = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs() as i64);
            let public = public_key(algorithm, &der)
                .map_err(|e| DkimError::Key(format!("{}: {e}", path.display())))?;
            out.push((
                KeyInfo {
                    selector: selector.to_owned(),
                    algorithm,
                    created_at,
                    signing: false,
                    pending,
                    public_key: base64::engine::general_purpose::STANDARD.encode(public),
                },
                der,
            ));
        }
        // Newest first, by the time in the selector.
        out.sort_by(|(a, _), (b, _)| {
            let made = |k: &KeyInfo| k.selector.split_once('-').map(|(_, d)| d.to_owned());
            made(b).cmp(&made(a))
        });
        for alg in [Algorithm::Ed25519, Algorithm::Rsa] {
            if let Some((k, _)) = out
                .iter_mut()
                .find(|(k, _)| k.algorithm == alg && !k.pending)
            {
                k.signing = true;
            }
        }
        Ok(out)
    }

    /// The `DKIM-Signature` fields for `message` from `domain`'s signing
    /// keys (none when it has no keys). Blocking.
    pub fn sign(&self, domain: &str, message: &[u8]) -> Result<String, DkimError> {
        let mut headers = String::new();
        for signer in self.signers(domain)? {
            let signature = signer
                .sign(message)
                .map_err(|e| DkimError::Key(format!("signing for {domain}: {e}")))?;
            headers.push_str(&signature.to_header());
        }
        Ok(headers)
    }

    /// `domain`'s signers, parsed once per change of its key directory.
    fn signers(&self, domain: &str) -> Result<Vec<Arc<DkimSigner<DkimKey, Done>>>, DkimError> {
        let dir = self.domain_dir(domain)?;
        let stamp = std::fs::metadata(&dir).and_then(|m| m.modified()).ok();
        let mut cache = self.signers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, signers)) = cache.get(domain)
            && *at == stamp
            && stamp.is_some()
        {
            return Ok(signers.clone());
        }
        let mut signers = Vec::new();
        for (key, der) in self.load(domain)?.into_iter().filter(|(k, _)| k.signing) {
            let fail = |e: mail_auth::Error| DkimError::Key(format!("key {}: {e}", key.selector));
            let parsed: DkimKey = match key.algorithm {
                Algorithm::Ed25519 => Ed25519Key::from_pkcs8_der(&der).map_err(fail)?.into(),
                Algorithm::Rsa => RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs1(
                    PrivatePkcs1KeyDer::from(der),
                ))
                .map_err(fail)?
                .into(),
            };
            signers.push(Arc::new(
                DkimSigner::from_key(parsed)
                    .domain(domain)
                    .selector(&key.selector)
                    .headers(SIGNED.iter().copied()),
            ));
        }
        cache.insert(domain.to_owned(), (stamp, signers.clone()));
        Ok(signers)
    }
}

/// The public key as DNS publishes it: Ed25519's 32 bytes, RSA's
/// SubjectPublicKeyInfo (what OpenDKIM publishes and every verifier takes).
fn public_key(algorithm: Algorithm, der: &[u8]) -> Result<Vec<u8>, String> {
    match algorithm {
        Algorithm::Ed25519 => Ed25519Key::from_pkcs8_der(der)
            .map(|k| k.public_key())
            .map_err(|e| e.to_string()),
        Algorithm::Rsa => {
            let key = RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs1(
                PrivatePkcs1KeyDer::from(der.to_vec()),
            ))
            .map_err(|e| e.to_string())?;
            Ok(spki_rsa(&key.public_key()))
        }
    }
}

/// Wraps a PKCS#1 RSAPublicKey in a SubjectPublicKeyInfo.
fn spki_rsa(pkcs1: &[u8]) -> Vec<u8> {
    fn len(n: usize) -> Vec<u8> {
        match n {
            0..=0x7f => vec![n as u8],
            0x80..=0xff => vec![0x81, n as u8],
            _ => vec![0x82, (n >> 8) as u8, n as u8],
        }
    }
    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend(len(body.len()));
        out.extend_from_slice(body);
        out
    }
    // AlgorithmIdentifier { rsaEncryption, NULL }
    let algorithm = tlv(
        0x30,
        &[
            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
        ],
    );
    let mut bits = vec![0u8];
    bits.extend_from_slice(pkcs1);
    let mut body = algorithm;
    body.extend(tlv(0x03, &bits));
    tlv(0x30, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_rotate_sign_and_retire() {
        let dir = tempfile::tempdir().unwrap();
        let keys = DkimKeys::new(dir.path().join("dkim"));
        assert!(keys.list("example.org").unwrap().is_empty());
        assert_eq!(
            keys.sign("example.org", b"From: a@example.org\r\n\r\nx\r\n")
                .unwrap(),
            ""
        );
        keys.ensure("example.org").unwrap();
        let first = keys.list("example.org").unwrap();
        assert_eq!(first.len(), 2);
        assert!(first.iter().all(|k| k.signing));
        let rsa = first
            .iter()
            .find(|k| k.algorithm == Algorithm::Rsa)
            .unwrap();
        // A 2048-bit key's SubjectPublicKeyInfo is 294 bytes.
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(&rsa.public_key)
                .unwrap()
                .len(),
            294
        );
        let signed = keys
            .sign(
                "example.org",
                b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n",
            )
            .unwrap();
        assert_eq!(signed.matches("DKIM-Signature:").count(), 2, "{signed}");
        assert!(signed.contains("a=ed25519-sha256"), "{signed}");
        assert!(signed.contains("a=rsa-sha256"), "{signed}");
        let again = keys.rotate("example.org").unwrap();
        assert_eq!(again.len(), 4);
        assert_eq!(again.iter().filter(|k| k.pending).count(), 2);
        // The pending pair does not sign until activated.
        let before = keys
            .sign("example.org", b"From: a@example.org\r\n\r\nx\r\n")
            .unwrap();
        assert!(
            before.contains(&format!("s={}", first[0].selector)),
            "{before}"
        );
        let again = keys.activate("example.org").unwrap();
        assert_eq!(again.iter().filter(|k| k.signing).count(), 2);
        assert!(
            again
                .iter()
                .filter(|k| k.signing)
                .all(|k| !first.iter().any(|f| f.selector == k.selector))
        );
        assert!(keys.activate("example.org").is_err());
        let old = again.iter().find(|k| !k.signing).unwrap().selector.clone();
        let current = again.iter().find(|k| k.signing).unwrap().selector.clone();
        assert!(keys.retire("example.org", &current).is_err());
        keys.retire("example.org", &old).unwrap();
        assert_eq!(keys.list("example.org").unwrap().len(), 3);
        assert!(keys.list("../etc").is_err());
    }
}
