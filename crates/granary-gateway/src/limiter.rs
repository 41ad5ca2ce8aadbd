//! Failed logins per source address and per user, shared by every
//! listener: past the limit a login is refused before any check runs, so
//! a guessing client costs nothing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failed logins allowed per window, per source address and per user.
const FAILURES_PER_WINDOW: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(300);
/// Keys remembered before expired ones are swept.
const MAX_KEYS: usize = 10_000;

#[derive(Debug, Default)]
pub struct LoginLimiter {
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

impl LoginLimiter {
    /// Too many recent failures for this key (`ip:...`, `user:...`)?
    pub fn limited(&self, key: &str) -> bool {
        let failures = self.failures.lock().expect("not poisoned");
        failures
            .get(key)
            .is_some_and(|(n, since)| *n >= FAILURES_PER_WINDOW && since.elapsed() < FAILURE_WINDOW)
    }

    /// Counts one failure against `key`.
    pub fn fail(&self, key: String) {
        let mut failures = self.failures.lock().expect("not poisoned");
        if failures.len() > MAX_KEYS {
            failures.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
        }
        let entry = failures.entry(key).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= FAILURE_WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }
}

/// How long a verified password is trusted without argon2.
const VERIFIED_FOR: Duration = Duration::from_secs(60);
/// Verified logins remembered before expired ones are swept.
const MAX_VERIFIED: usize = 10_000;

/// Logins that checked out in the last minute, shared by every listener,
/// so a client that opens many connections (an IMAP client's one per
/// folder, HTTP requests) costs one argon2 a minute rather than one each.
/// Entries are keyed by an HMAC of user, kind and password under a key
/// made at start and never stored: the passwords are not kept, and a
/// changed or wrong password never matches.
pub struct VerifiedLogins {
    key: ring::hmac::Key,
    verified: Mutex<HashMap<[u8; 32], (Instant, crate::Credential)>>,
}

impl Default for VerifiedLogins {
    fn default() -> Self {
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .expect("the kernel's random source");
        VerifiedLogins {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
            verified: Mutex::default(),
        }
    }
}

impl std::fmt::Debug for VerifiedLogins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedLogins").finish_non_exhaustive()
    }
}

impl VerifiedLogins {
    fn key(&self, user: &str, kind: &str, password: &str) -> [u8; 32] {
        let tag = ring::hmac::sign(&self.key, format!("{user}\0{kind}\0{password}").as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(tag.as_ref());
        key
    }

    /// The credential this password was verified as within the last minute.
    pub fn get(&self, user: &str, kind: &str, password: &str) -> Option<crate::Credential> {
        let key = self.key(user, kind, password);
        self.verified
            .lock()
            .expect("not poisoned")
            .get(&key)
            .filter(|(t, _)| t.elapsed() < VERIFIED_FOR)
            .map(|(_, c)| *c)
    }

    /// Remembers that this password checked out as `credential`.
    pub fn remember(&self, user: &str, kind: &str, password: &str, credential: crate::Credential) {
        let key = self.key(user, kind, password);
        let mut verified = self.verified.lock().expect("not poisoned");
        if verified.len() >= MAX_VERIFIED {
            verified.retain(|_, (t, _)| t.elapsed() < VERIFIED_FOR);
        }
        verified.insert(key, (Instant::now(), credential));
    }
}
