//! Secrets: how Granary makes, hashes and checks passwords.
//!
//! Passwords are only ever stored as argon2id PHC strings
//! (`$argon2id$v=19$m=...`), which carry their own salt and parameters, so
//! parameters can be raised later without breaking old hashes. This crate
//! does no I/O; its one piece of state is the gate that lets only one
//! argon2 computation per CPU run at once. It is CPU-bound and may wait at
//! that gate, so async callers should run it on a blocking thread.

pub mod totp;

use std::sync::{Condvar, Mutex, OnceLock};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

/// Shortest password an admin may set by hand. Generated ones are longer.
pub const MIN_PASSWORD_LEN: usize = 12;
/// Longest accepted password; longer input is refused before hashing so that
/// nobody can make the server hash megabytes.
pub const MAX_PASSWORD_LEN: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("password is shorter than {MIN_PASSWORD_LEN} characters")]
    TooShort,
    #[error("password is longer than {MAX_PASSWORD_LEN} bytes")]
    TooLong,
    #[error("stored password hash is malformed: {0}")]
    BadHash(String),
    #[error("hashing failed: {0}")]
    Hash(String),
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
}

/// argon2id with the OWASP-recommended minimum (19 MiB, 2 passes, 1 lane).
fn hasher() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).expect("constant argon2 parameters are valid");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// How many argon2 computations run at once in this process: one per CPU.
/// Each holds 19 MiB while it runs, so a burst of logins (fifty git clones
/// starting together, or a stranger's flood) costs memory in proportion to
/// the CPUs, not to the burst; more at once would only share the same CPUs.
struct Gate {
    busy: Mutex<usize>,
    freed: Condvar,
}

static GATE: Gate = Gate {
    busy: Mutex::new(0),
    freed: Condvar::new(),
};

fn gate_width() -> usize {
    static WIDTH: OnceLock<usize> = OnceLock::new();
    *WIDTH.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
}

/// A place at the gate; leaving it (even by a panic) lets the next in.
struct Permit;

impl Permit {
    fn wait() -> Permit {
        // A poisoned lock only means a holder panicked; the count is still
        // right because each Permit gives its place back in drop.
        let mut busy = GATE.busy.lock().unwrap_or_else(|e| e.into_inner());
        while *busy >= gate_width() {
            busy = GATE.freed.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        *busy += 1;
        Permit
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        *GATE.busy.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        GATE.freed.notify_one();
    }
}

/// Checks the length rules for a password chosen by a person.
pub fn check_password_policy(password: &str) -> Result<(), AuthError> {
    if password.chars().count() < MIN_PASSWORD_LEN {
        return Err(AuthError::TooShort);
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(AuthError::TooLong);
    }
    Ok(())
}

/// Hashes a password with a fresh random salt into a PHC string.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    if password.len() > MAX_PASSWORD_LEN {
        return Err(AuthError::TooLong);
    }
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| AuthError::Random(e.to_string()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| AuthError::Hash(e.to_string()))?;
    let _permit = Permit::wait();
    hasher()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// True when `password` matches the stored PHC string. A malformed stored
/// hash is an error, not a silent "no", so corruption gets noticed.
pub fn verify_password(password: &str, phc: &str) -> Result<bool, AuthError> {
    if password.len() > MAX_PASSWORD_LEN {
        return Ok(false);
    }
    let parsed = PasswordHash::new(phc).map_err(|e| AuthError::BadHash(e.to_string()))?;
    let _permit = Permit::wait();
    match hasher().verify_password(password.as_bytes(), &parsed) {
        Ok(()) => Ok(true),
        Err(argon2::password_hash::Error::Password) => Ok(false),
        Err(e) => Err(AuthError::BadHash(e.to_string())),
    }
}

/// Letters and digits that survive being read aloud or copied by hand: no
/// 0/O, 1/l/I.
const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";

/// A new random password of five groups of five characters
/// (`k3fqa-...`): 125 bits of entropy, easy to type on a phone.
pub fn generate_password() -> Result<String, AuthError> {
    const GROUPS: usize = 5;
    const GROUP_LEN: usize = 5;
    let mut raw = [0u8; GROUPS * GROUP_LEN];
    getrandom::fill(&mut raw).map_err(|e| AuthError::Random(e.to_string()))?;
    let mut out = String::with_capacity(GROUPS * (GROUP_LEN + 1));
    for (i, byte) in raw.iter().enumerate() {
        if i > 0 && i % GROUP_LEN == 0 {
            out.push('-');
        }
        // 32 symbols divide 256 evenly, so taking the low five bits is unbiased.
        out.push(ALPHABET[usize::from(*byte) % ALPHABET.len()] as char);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_then_verify() {
        let hash = hash_password("correct horse battery").unwrap();
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(verify_password("correct horse battery", &hash).unwrap());
        assert!(!verify_password("correct horse battery!", &hash).unwrap());
        assert!(!verify_password("", &hash).unwrap());
    }

    #[test]
    fn same_password_gets_different_salts() {
        assert_ne!(
            hash_password("same password").unwrap(),
            hash_password("same password").unwrap()
        );
    }

    #[test]
    fn no_more_hash_at_once_than_cpus_and_a_panic_gives_its_place_back() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let inside = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for i in 0..4 * gate_width() + 3 {
                let (inside, most) = (&inside, &most);
                s.spawn(move || {
                    let held = std::panic::catch_unwind(|| {
                        let _permit = Permit::wait();
                        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                        assert!(i % 3 != 0, "a holder that panics");
                    });
                    assert_eq!(held.is_err(), i % 3 == 0);
                });
            }
        });
        let most = most.load(Ordering::SeqCst);
        assert!((1..=gate_width()).contains(&most), "{most} at once");
        // Every place was given back, so one more gets in at once.
        drop(Permit::wait());
    }

    #[test]
    fn malformed_hash_is_an_error() {
        assert!(matches!(
            verify_password("x", "not a hash"),
            Err(AuthError::BadHash(_))
        ));
    }

    #[test]
    fn overlong_passwords_are_refused_before_hashing() {
        let long = "x".repeat(MAX_PASSWORD_LEN + 1);
        assert!(matches!(hash_password(&long), Err(AuthError::TooLong)));
        let hash = hash_password("short but fine").unwrap();
        assert!(!verify_password(&long, &hash).unwrap());
    }

    #[test]
    fn generated_passwords_meet_the_policy_and_differ() {
        let a = generate_password().unwrap();
        let b = generate_password().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 29);
        check_password_policy(&a).unwrap();
        assert!(a.bytes().all(|c| c == b'-' || ALPHABET.contains(&c)));
    }

    #[test]
    fn policy_rejects_short_passwords() {
        assert!(matches!(
            check_password_policy("short"),
            Err(AuthError::TooShort)
        ));
    }
}

/// Whether `a` and `b` are equal, looking at every byte whatever the
/// first difference (for secrets compared with what a client sent).
pub fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Bytes in a sturdy-reference token.
pub const TOKEN_BYTES: usize = 32;

/// A fresh random bearer token (256 bits).
pub fn generate_token() -> Result<[u8; TOKEN_BYTES], AuthError> {
    let mut token = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut token).map_err(|e| AuthError::Random(e.to_string()))?;
    Ok(token)
}

/// What is stored of a token: its SHA-256. Tokens carry 256 random bits,
/// so a fast hash is enough (unlike passwords, which get argon2id).
pub fn token_hash(token: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

#[cfg(test)]
mod token_tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashes_stable() {
        let a = generate_token().unwrap();
        let b = generate_token().unwrap();
        assert_ne!(a, b);
        assert_eq!(token_hash(&a), token_hash(&a));
        assert_ne!(token_hash(&a), token_hash(&b));
        // SHA-256("abc")
        assert_eq!(token_hash(b"abc")[..4], [0xba, 0x78, 0x16, 0xbf],);
    }
}
