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
