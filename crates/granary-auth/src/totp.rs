//! Time-based one-time passwords (RFC 6238, HOTP of RFC 4226 underneath):
//! the second factor of a web sign-in. Six digits, 30-second steps,
//! HMAC-SHA1, which is what every authenticator app reads from an
//! `otpauth://` URI. The secret is stored sealed (AES-256-GCM under a key
//! the caller keeps outside the database), and a step once accepted is
//! never accepted again, so a code seen over a shoulder is spent.

use ring::aead;
use ring::hmac;

use crate::AuthError;

/// Bytes of a new secret (160 bits, RFC 4226's recommendation).
pub const SECRET_BYTES: usize = 20;
/// Seconds a code lives.
pub const STEP_SECS: u64 = 30;
/// Steps on either side of now that are accepted (clock drift).
pub const DRIFT_STEPS: u64 = 1;

/// A fresh random secret.
pub fn new_secret() -> Result<[u8; SECRET_BYTES], AuthError> {
    let mut s = [0u8; SECRET_BYTES];
    getrandom::fill(&mut s).map_err(|e| AuthError::Random(e.to_string()))?;
    Ok(s)
}

/// The six-digit code of `secret` for time step `step` (RFC 4226 §5.3).
pub fn code(secret: &[u8], step: u64) -> u32 {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let mac = hmac::sign(&key, &step.to_be_bytes());
    let mac = mac.as_ref();
    let offset = (mac[mac.len() - 1] & 0x0f) as usize;
    let bin = u32::from_be_bytes([
        mac[offset] & 0x7f,
        mac[offset + 1],
        mac[offset + 2],
        mac[offset + 3],
    ]);
    bin % 1_000_000
}

/// The step `unix_secs` falls in.
pub fn step_at(unix_secs: u64) -> u64 {
    unix_secs / STEP_SECS
}

/// The step `given` (what a person typed: digits, spaces allowed) is the
/// code of, within [`DRIFT_STEPS`] of `now_step` and after `last_used`;
/// `None` when it is none of them. Comparison does not stop early.
pub fn verify(secret: &[u8], given: &str, now_step: u64, last_used: u64) -> Option<u64> {
    let digits: String = given.chars().filter(|c| !c.is_whitespace()).collect();
    if digits.len() != 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let wanted: u32 = digits.parse().ok()?;
    let mut found = None;
    for step in now_step.saturating_sub(DRIFT_STEPS)..=now_step + DRIFT_STEPS {
        let hit = crate::same_bytes(&code(secret, step).to_be_bytes(), &wanted.to_be_bytes());
        if hit && step > last_used && found.is_none() {
            found = Some(step);
        }
    }
    found
}

/// RFC 4648 base32 without padding: how authenticator apps take a secret.
pub fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// The inverse of [`base32`] (case and spaces ignored); `None` on any
/// other character.
pub fn from_base32(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut buffer, mut bits) = (0u32, 0u32);
    for c in text.chars().filter(|c| !c.is_whitespace() && *c != '=') {
        let v = match c.to_ascii_uppercase() {
            c @ 'A'..='Z' => c as u32 - 'A' as u32,
            c @ '2'..='7' => c as u32 - '2' as u32 + 26,
            _ => return None,
        };
        buffer = (buffer << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    Some(out)
}

/// The `otpauth://` URI an authenticator app scans.
pub fn uri(issuer: &str, account: &str, secret: &[u8]) -> String {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    format!(
        "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits=6&period={STEP_SECS}",
        enc(issuer),
        enc(account),
        base32(secret),
        enc(issuer)
    )
}

/// Bytes of the key that seals secrets.
pub const SEAL_KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 12;

/// `secret` sealed under `key` (AES-256-GCM, random nonce first), bound to
/// `context` (the user's name) so a sealed secret copied onto another
/// user's row does not open.
pub fn seal(
    key: &[u8; SEAL_KEY_BYTES],
    context: &str,
    secret: &[u8],
) -> Result<Vec<u8>, AuthError> {
    let key = aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::AES_256_GCM, key)
            .map_err(|_| AuthError::Hash("seal key".into()))?,
    );
    let mut nonce = [0u8; NONCE_BYTES];
    getrandom::fill(&mut nonce).map_err(|e| AuthError::Random(e.to_string()))?;
    let mut body = secret.to_vec();
    key.seal_in_place_append_tag(
        aead::Nonce::assume_unique_for_key(nonce),
        aead::Aad::from(context.as_bytes()),
        &mut body,
    )
    .map_err(|_| AuthError::Hash("sealing failed".into()))?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

/// What [`seal`] sealed; an error when the key or context is not the one
/// it was sealed with, or the bytes were changed.
pub fn open(
    key: &[u8; SEAL_KEY_BYTES],
    context: &str,
    sealed: &[u8],
) -> Result<Vec<u8>, AuthError> {
    if sealed.len() < NONCE_BYTES + aead::AES_256_GCM.tag_len() {
        return Err(AuthError::BadHash("sealed secret too short".into()));
    }
    let key = aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::AES_256_GCM, key)
            .map_err(|_| AuthError::Hash("seal key".into()))?,
    );
    let (nonce, body) = sealed.split_at(NONCE_BYTES);
    let nonce = aead::Nonce::try_assume_unique_for_key(nonce)
        .map_err(|_| AuthError::BadHash("nonce".into()))?;
    let mut body = body.to_vec();
    let plain = key
        .open_in_place(nonce, aead::Aad::from(context.as_bytes()), &mut body)
        .map_err(|_| {
            AuthError::BadHash("the sealed secret does not open with this node's key".into())
        })?;
    Ok(plain.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 Appendix B, SHA-1 rows (8 digits there; the last 6 here).
    #[test]
    fn rfc_6238_vectors() {
        let secret = b"12345678901234567890";
        for (time, eight) in [
            (59u64, 94287082u32),
            (1111111109, 7081804),
            (1111111111, 14050471),
            (1234567890, 89005924),
            (2000000000, 69279037),
            (20000000000, 65353130),
        ] {
            assert_eq!(code(secret, step_at(time)), eight % 1_000_000, "t={time}");
        }
    }

    #[test]
    fn verify_takes_drift_and_spends_steps() {
        let secret = b"12345678901234567890";
        let now = step_at(1234567890);
        let c = format!("{:06}", code(secret, now - 1));
        assert_eq!(verify(secret, &c, now, 0), Some(now - 1));
        // Already used: refused.
        assert_eq!(verify(secret, &c, now, now - 1), None);
        let far = format!("{:06}", code(secret, now - 3));
        assert_eq!(verify(secret, &far, now, 0), None);
        assert_eq!(verify(secret, "12345", now, 0), None);
        assert_eq!(verify(secret, "abcdef", now, 0), None);
        let spaced = format!("{} {}", &c[..3], &c[3..]);
        assert_eq!(verify(secret, &spaced, now, 0), Some(now - 1));
    }

    #[test]
    fn base32_round_trips_rfc_4648() {
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base32(b"f"), "MY");
        assert_eq!(from_base32("mzxw 6ytb oi").unwrap(), b"foobar");
        assert!(from_base32("MZ1").is_none());
        let s = new_secret().unwrap();
        assert_eq!(from_base32(&base32(&s)).unwrap(), s);
    }

    #[test]
    fn sealed_secrets_open_only_with_their_key_and_user() {
        let key = [7u8; SEAL_KEY_BYTES];
        let sealed = seal(&key, "alice", b"secret").unwrap();
        assert_eq!(open(&key, "alice", &sealed).unwrap(), b"secret");
        assert!(open(&key, "bob", &sealed).is_err());
        assert!(open(&[8u8; SEAL_KEY_BYTES], "alice", &sealed).is_err());
        let mut bent = sealed.clone();
        *bent.last_mut().unwrap() ^= 1;
        assert!(open(&key, "alice", &bent).is_err());
        assert!(open(&key, "alice", &sealed[..5]).is_err());
    }

    #[test]
    fn uri_names_issuer_and_account() {
        let u = uri("example.org", "alice", b"foobar");
        assert_eq!(
            u,
            "otpauth://totp/example.org:alice?secret=MZXW6YTBOI&issuer=example.org&algorithm=SHA1&digits=6&period=30"
        );
    }
}
