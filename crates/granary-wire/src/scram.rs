//! SCRAM (RFC 5802; SHA-256 per RFC 7677), the server's side, sans I/O:
//! verifiers made from a password (what the state keeps instead of it),
//! the client's first and final messages parsed from untrusted bytes
//! (fuzzed), the server's messages, and the proof checked in constant
//! time. Channel binding (`-PLUS`) is not offered, so a client asking for
//! it (`p=`) is refused; one that could but believes the server cannot
//! (`y`) is accepted, as the RFC says when no `-PLUS` was advertised.
//!
//! Names and passwords go through SASLprep (RFC 4013, via `stringprep`);
//! `=2C` and `=3D` in the username are undone.

use base64::Engine;
use ring::{digest, hmac, pbkdf2};

/// The hash a mechanism uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    Sha1,
    Sha256,
}

impl Hash {
    /// The SASL mechanism name.
    pub fn mechanism(self) -> &'static str {
        match self {
            Hash::Sha1 => "SCRAM-SHA-1",
            Hash::Sha256 => "SCRAM-SHA-256",
        }
    }

    fn hmac(self) -> hmac::Algorithm {
        match self {
            Hash::Sha1 => hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
            Hash::Sha256 => hmac::HMAC_SHA256,
        }
    }

    fn digest(self) -> &'static digest::Algorithm {
        match self {
            Hash::Sha1 => &digest::SHA1_FOR_LEGACY_USE_ONLY,
            Hash::Sha256 => &digest::SHA256,
        }
    }

    fn pbkdf2(self) -> pbkdf2::Algorithm {
        match self {
            Hash::Sha1 => pbkdf2::PBKDF2_HMAC_SHA1,
            Hash::Sha256 => pbkdf2::PBKDF2_HMAC_SHA256,
        }
    }

    /// The length of its digests (and so of keys and proofs).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(self) -> usize {
        self.digest().output_len()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("the message is malformed: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not offered")]
    ChannelBinding,
    #[error("the name or password is not valid under SASLprep")]
    Prep,
    #[error("the nonce does not continue the exchange")]
    Nonce,
    #[error("the proof is wrong")]
    Proof,
    #[error("the stored verifier is malformed")]
    Verifier,
}

/// What a server keeps for one password and mechanism (RFC 5802 §3):
/// never the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verifier {
    pub hash: Hash,
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

/// The iteration count new verifiers get (RFC 7677 asks at least 4096).
pub const ITERATIONS: u32 = 4096;

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn unb64(text: &str) -> Result<Vec<u8>, ScramError> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| ScramError::Malformed("bad base64"))
}

fn hmac_of(hash: Hash, key: &[u8], data: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hash.hmac(), key), data)
        .as_ref()
        .to_vec()
}

/// SASLprep (RFC 4013) as a stored string.
pub fn saslprep(text: &str) -> Result<String, ScramError> {
    stringprep::saslprep(text)
        .map(|s| s.into_owned())
        .map_err(|_| ScramError::Prep)
}

impl Verifier {
    /// The verifier of `password` with `salt` and `iterations`.
    pub fn new(
        hash: Hash,
        password: &str,
        salt: &[u8],
        iterations: u32,
    ) -> Result<Verifier, ScramError> {
        let prepared = saslprep(password)?;
        let iters = std::num::NonZeroU32::new(iterations).ok_or(ScramError::Verifier)?;
        let mut salted = vec![0u8; hash.len()];
        pbkdf2::derive(hash.pbkdf2(), iters, salt, prepared.as_bytes(), &mut salted);
        let client_key = hmac_of(hash, &salted, b"Client Key");
        let stored_key = digest::digest(hash.digest(), &client_key).as_ref().to_vec();
        let server_key = hmac_of(hash, &salted, b"Server Key");
        Ok(Verifier {
            hash,
            salt: salt.to_vec(),
            iterations,
            stored_key,
            server_key,
        })
    }

    /// `MECH$iterations$salt$stored$server` (base64 parts), how the state
    /// keeps it.
    pub fn encode(&self) -> String {
        format!(
            "{}${}${}${}${}",
            self.hash.mechanism(),
            self.iterations,
            b64(&self.salt),
            b64(&self.stored_key),
            b64(&self.server_key)
        )
    }

    pub fn decode(text: &str) -> Result<Verifier, ScramError> {
        let parts: Vec<&str> = text.split('$').collect();
        let [mech, iterations, salt, stored, server] = parts[..] else {
            return Err(ScramError::Verifier);
        };
        let hash = match mech {
            "SCRAM-SHA-1" => Hash::Sha1,
            "SCRAM-SHA-256" => Hash::Sha256,
            _ => return Err(ScramError::Verifier),
        };
        let v = Verifier {
            hash,
            iterations: iterations.parse().map_err(|_| ScramError::Verifier)?,
            salt: unb64(salt).map_err(|_| ScramError::Verifier)?,
            stored_key: unb64(stored).map_err(|_| ScramError::Verifier)?,
            server_key: unb64(server).map_err(|_| ScramError::Verifier)?,
        };
        if v.stored_key.len() != hash.len() || v.server_key.len() != hash.len() {
            return Err(ScramError::Verifier);
        }
        Ok(v)
    }
}

/// A client's first message, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFirst {
    /// `n,,` or `y,,` (with an authzid, `n,a=...,`).
    pub gs2_header: String,
    /// The authorization identity, if the client named one.
    pub authzid: Option<String>,
    /// The user name, unescaped and SASLprepped.
    pub username: String,
    pub nonce: String,
    /// client-first-message-bare, for the AuthMessage.
    pub bare: String,
}

/// `=2C` → `,` and `=3D` → `=`; any other `=` is malformed.
fn unescape_name(s: &str) -> Result<String, ScramError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("=2C") | Some("=2c") => out.push(','),
            Some("=3D") | Some("=3d") => out.push('='),
            _ => return Err(ScramError::Malformed("a bare '=' in a name")),
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A nonce: printable ASCII except ','.
fn valid_nonce(n: &str) -> bool {
    !n.is_empty() && n.len() <= 1024 && n.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b',')
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Parses client-first-message (RFC 5802 §7).
pub fn parse_client_first(data: &[u8]) -> Result<ClientFirst, ScramError> {
    if data.len() > 4096 {
        return Err(ScramError::Malformed("too long"));
    }
    let text = std::str::from_utf8(data).map_err(|_| ScramError::Malformed("not UTF-8"))?;
    let mut parts = text.splitn(3, ',');
    let flag = parts.next().ok_or(ScramError::Malformed("empty"))?;
    let authz = parts.next().ok_or(ScramError::Malformed("no gs2 header"))?;
    let bare = parts.next().ok_or(ScramError::Malformed("no gs2 header"))?;
    match flag {
        "n" | "y" => {}
        f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
        _ => return Err(ScramError::Malformed("bad channel binding flag")),
    }
    let authzid = match authz {
        "" => None,
        a => Some(saslprep(&unescape_name(
            a.strip_prefix("a=")
                .ok_or(ScramError::Malformed("bad authzid"))?,
        )?)?),
    };
    let mut attrs = bare.split(',');
    let first = attrs.next().unwrap_or("");
    if first.starts_with("m=") {
        return Err(ScramError::Malformed(
            "mandatory extensions are not supported",
        ));
    }
    let name = first
        .strip_prefix("n=")
        .ok_or(ScramError::Malformed("no user name"))?;
    let nonce = attrs
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .ok_or(ScramError::Malformed("no nonce"))?;
    if !valid_nonce(nonce) {
        return Err(ScramError::Malformed("bad nonce"));
    }
    let username = saslprep(&unescape_name(name)?)?;
    if username.is_empty() {
        return Err(ScramError::Malformed("empty user name"));
    }
    Ok(ClientFirst {
        gs2_header: format!("{flag},{authz},"),
        authzid,
        username,
        nonce: nonce.to_owned(),
        bare: bare.to_owned(),
    })
}

/// server-first-message: the combined nonce, the salt and the count.
pub fn server_first(first: &ClientFirst, server_nonce: &str, v: &Verifier) -> String {
    format!(
        "r={}{},s={},i={}",
        first.nonce,
        server_nonce,
        b64(&v.salt),
        v.iterations
    )
}

/// Checks client-final-message against the exchange so far; the
/// server-final-message (`v=...`) when the proof is right.
pub fn verify_client_final(
    first: &ClientFirst,
    server_first_message: &str,
    data: &[u8],
    v: &Verifier,
) -> Result<String, ScramError> {
    if data.len() > 4096 {
        return Err(ScramError::Malformed("too long"));
    }
    let text = std::str::from_utf8(data).map_err(|_| ScramError::Malformed("not UTF-8"))?;
    let (without_proof, proof) = text
        .rsplit_once(",p=")
        .ok_or(ScramError::Malformed("no proof"))?;
    let mut attrs = without_proof.split(',');
    let cbind = attrs
        .next()
        .and_then(|a| a.strip_prefix("c="))
        .ok_or(ScramError::Malformed("no channel binding"))?;
    if unb64(cbind)? != first.gs2_header.as_bytes() {
        return Err(ScramError::ChannelBinding);
    }
    let nonce = attrs
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .ok_or(ScramError::Malformed("no nonce"))?;
    let expected = server_first_message
        .split(',')
        .next()
        .and_then(|r| r.strip_prefix("r="))
        .ok_or(ScramError::Nonce)?;
    if nonce != expected {
        return Err(ScramError::Nonce);
    }
    let proof = unb64(proof)?;
    if proof.len() != v.hash.len() {
        return Err(ScramError::Proof);
    }
    let auth_message = format!("{},{server_first_message},{without_proof}", first.bare);
    let signature = hmac_of(v.hash, &v.stored_key, auth_message.as_bytes());
    let client_key: Vec<u8> = proof.iter().zip(&signature).map(|(a, b)| a ^ b).collect();
    let stored = digest::digest(v.hash.digest(), &client_key);
    if !same(stored.as_ref(), &v.stored_key) {
        return Err(ScramError::Proof);
    }
    let server_signature = hmac_of(v.hash, &v.server_key, auth_message.as_bytes());
    Ok(format!("v={}", b64(&server_signature)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 5802 §5 (SCRAM-SHA-1) and RFC 7677 §3 (SCRAM-SHA-256): the
    /// exchanges as printed there, byte for byte.
    #[test]
    fn the_rfc_examples() {
        for (hash, salt, client_first, server_first_expected, client_final, server_final) in [
            (
                Hash::Sha1,
                "QSXCR+Q6sek8bf92",
                "n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
                "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
                "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
                "v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
            ),
            (
                Hash::Sha256,
                "W22ZaJ0SNY7soEsUEjb6gQ==",
                "n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
                "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
                "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
                "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
            ),
        ] {
            let v = Verifier::new(hash, "pencil", &unb64(salt).unwrap(), 4096).unwrap();
            assert_eq!(Verifier::decode(&v.encode()).unwrap(), v);
            let first = parse_client_first(client_first.as_bytes()).unwrap();
            assert_eq!(first.username, "user");
            let server_nonce = server_first_expected
                .strip_prefix(&format!("r={}", first.nonce))
                .unwrap()
                .split(',')
                .next()
                .unwrap();
            let sf = server_first(&first, server_nonce, &v);
            assert_eq!(sf, server_first_expected);
            assert_eq!(
                verify_client_final(&first, &sf, client_final.as_bytes(), &v).unwrap(),
                server_final
            );
            // A wrong proof, a changed nonce, another channel binding.
            let (without, _) = client_final.rsplit_once(",p=").unwrap();
            let wrong = format!("{without},p={}", b64(&vec![0u8; hash.len()]));
            assert_eq!(
                verify_client_final(&first, &sf, wrong.as_bytes(), &v),
                Err(ScramError::Proof)
            );
            let other = Verifier::new(hash, "pencils", &unb64(salt).unwrap(), 4096).unwrap();
            assert_eq!(
                verify_client_final(&first, &sf, client_final.as_bytes(), &other),
                Err(ScramError::Proof)
            );
            let nonce = client_final.replacen("r=", "r=x", 1);
            assert!(verify_client_final(&first, &sf, nonce.as_bytes(), &v).is_err());
            let cb = client_final.replacen("c=biws", "c=eSws", 1);
            assert_eq!(
                verify_client_final(&first, &sf, cb.as_bytes(), &v),
                Err(ScramError::ChannelBinding)
            );
        }
    }

    #[test]
    fn names_are_unescaped_and_prepared() {
        let f = parse_client_first(b"n,,n=a=2Cb=3Dc,r=abc").unwrap();
        assert_eq!(f.username, "a,b=c");
        // U+00A0 (no-break space) maps to a space; U+00AD (soft hyphen)
        // to nothing.
        let f = parse_client_first("n,,n=al\u{ad}ice\u{a0}x,r=abc".as_bytes()).unwrap();
        assert_eq!(f.username, "alice x");
        assert_eq!(
            parse_client_first(b"p=tls-exporter,,n=a,r=b"),
            Err(ScramError::ChannelBinding)
        );
        assert!(parse_client_first(b"n,,n=a=2,r=b").is_err());
        assert!(parse_client_first(b"n,,m=x,n=a,r=b").is_err());
        assert!(parse_client_first(b"n,,n=,r=b").is_err());
        assert!(parse_client_first(b"n,,n=a,r=b,c").is_ok());
        assert!(parse_client_first(b"x").is_err());
        assert!(parse_client_first("n,,n=a\u{7}b,r=x".as_bytes()).is_err());
        let y = parse_client_first(b"y,a=admin,n=a,r=b").unwrap();
        assert_eq!(y.authzid.as_deref(), Some("admin"));
        assert_eq!(y.gs2_header, "y,a=admin,");
    }
}
