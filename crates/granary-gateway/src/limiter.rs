//! Failed logins, counted against where they come from, shared by every
//! listener: the client's address (an IPv6 client by its /64) and its
//! range (an IPv4 /24, an IPv6 /48). Past a limit, a source is refused
//! before any check runs, so a guessing client costs nothing, for a time
//! that doubles each time it is refused again within a day (five minutes,
//! then ten, ... up to a day).
//!
//! Nothing is counted against a user: failures for `alice` from one place
//! refuse that place, never Alice's own logins from anywhere else. (A
//! per-user count let any stranger keep a user out of their own account
//! for as long as they liked.) Credentials that cannot be guessed (an SSH
//! key that is registered, a taskd certificate this host issued) get in
//! even from a refused source; refused keys count once per connection.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures an address, and a range, may make within a window.
const ADDRESS_LIMIT: u32 = 10;
const RANGE_LIMIT: u32 = 50;
const WINDOW: Duration = Duration::from_secs(300);
/// The first refusal, and the longest.
const FIRST_BLOCK: Duration = Duration::from_secs(300);
const LONGEST_BLOCK: Duration = Duration::from_secs(86_400);
/// A source refused again within this long of the end of its last
/// refusal is refused for twice as long.
const STRIKES_REMEMBERED: Duration = Duration::from_secs(86_400);
/// Sources remembered: past this, stale ones are swept (at most once per
/// doubling of the map); past the hard cap, new addresses are not
/// remembered (their ranges still are), so a flood from many addresses
/// cannot grow memory without bound.
const SWEEP_AT: usize = 20_000;
const HARD_CAP: usize = 200_000;
/// Refused sources `granary status` lists, at most (the longest first).
const LISTED: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    Address(IpAddr),
    Range(IpAddr),
}

impl Source {
    fn limit(self) -> u32 {
        match self {
            Source::Address(_) => ADDRESS_LIMIT,
            Source::Range(_) => RANGE_LIMIT,
        }
    }
}

#[derive(Debug)]
struct Record {
    failures: u32,
    window_start: Instant,
    blocked_until: Option<Instant>,
    /// Refusals in a row (each within a day of the end of the last).
    strikes: u32,
}

impl Record {
    /// Whether the last refusal ended less than a day ago (or goes on).
    fn remembered(&self, now: Instant) -> bool {
        self.blocked_until
            .is_some_and(|u| now < u + STRIKES_REMEMBERED)
    }

    /// Nothing left to remember: the same as no record.
    fn stale(&self, now: Instant) -> bool {
        now.duration_since(self.window_start) >= WINDOW && !self.remembered(now)
    }
}

#[derive(Debug, Default)]
struct Records {
    map: HashMap<Source, Record>,
    /// The size at which the next sweep runs.
    next_sweep: usize,
}

/// The client's address as counted (IPv4 as is, IPv4-mapped IPv6 as
/// IPv4, other IPv6 by its /64) and its range (/24, /48).
fn sources(ip: IpAddr) -> [Source; 2] {
    // The same address a mail client counts as (IPv4-mapped as IPv4).
    let address = crate::smtp::limits::bucket(ip);
    let range = match address {
        IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) & 0xffff_ff00).into()),
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 80) - 1)).into()),
    };
    [Source::Address(address), Source::Range(range)]
}

/// A source refused now, for `granary status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Refused {
    /// `203.0.113.7`, `203.0.113.0/24`, `2001:db8:1:2::/64`, `2001:db8:1::/48`.
    pub source: String,
    /// Seconds until it may try again.
    pub for_secs: u64,
    /// Refusals in a row (each doubles the next).
    pub strikes: u32,
}

/// What the limiter holds, for `granary status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LimiterState {
    /// Sources with recent failures, or refused in the last day.
    pub tracked: u64,
    /// How many are refused now.
    pub refused_count: u64,
    /// The longest refused, at most 100.
    pub refused: Vec<Refused>,
}

#[derive(Debug, Default)]
pub struct LoginLimiter {
    records: Mutex<Records>,
    /// Failed logins counted, and logins refused unchecked, since start.
    failures: std::sync::atomic::AtomicU64,
    refusals: std::sync::atomic::AtomicU64,
}

impl LoginLimiter {
    /// Whether logins from `ip` are refused unchecked now.
    pub fn refused(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let records = self.records.lock().expect("not poisoned");
        let refused = sources(ip).iter().any(|s| {
            records
                .map
                .get(s)
                .and_then(|r| r.blocked_until)
                .is_some_and(|u| u > now)
        });
        if refused {
            self.refusals
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        refused
    }

    /// (failed logins, logins refused unchecked) since the daemon started.
    pub fn totals(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.failures.load(Relaxed), self.refusals.load(Relaxed))
    }

    /// Counts one failed login from `ip` (against its address and range).
    pub fn failed(&self, ip: IpAddr) {
        self.failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = Instant::now();
        let mut guard = self.records.lock().expect("not poisoned");
        let records = &mut *guard;
        if records.map.len() >= records.next_sweep.max(SWEEP_AT) {
            records.map.retain(|_, r| !r.stale(now));
            records.next_sweep = records.map.len() * 2;
        }
        for s in sources(ip) {
            let len = records.map.len();
            let full = len >= HARD_CAP;
            let r = match records.map.entry(s) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                // A new address past the cap is not remembered; its range
                // is (unless even ranges fill twice the cap).
                std::collections::hash_map::Entry::Vacant(_)
                    if full && matches!(s, Source::Address(_)) =>
                {
                    continue;
                }
                std::collections::hash_map::Entry::Vacant(_) if len >= 2 * HARD_CAP => {
                    continue;
                }
                std::collections::hash_map::Entry::Vacant(e) => e.insert(Record {
                    failures: 0,
                    window_start: now,
                    blocked_until: None,
                    strikes: 0,
                }),
            };
            if now.duration_since(r.window_start) >= WINDOW {
                r.failures = 0;
                r.window_start = now;
            }
            r.failures += 1;
            if r.failures >= s.limit() {
                r.strikes = if r.remembered(now) {
                    r.strikes.saturating_add(1)
                } else {
                    1
                };
                let block = FIRST_BLOCK
                    .saturating_mul(1u32 << (r.strikes - 1).min(16))
                    .min(LONGEST_BLOCK);
                // Never shorter than a refusal already running.
                let until = now + block;
                r.blocked_until = Some(r.blocked_until.map_or(until, |u| u.max(until)));
                r.failures = 0;
                r.window_start = now;
            }
        }
    }

    /// How many addresses and ranges are refused now (cheap: no listing).
    pub fn refused_count(&self) -> u64 {
        let now = Instant::now();
        let records = self.records.lock().expect("not poisoned");
        records
            .map
            .values()
            .filter(|r| r.blocked_until.is_some_and(|u| u > now))
            .count() as u64
    }

    /// Sources refused now, longest first.
    pub fn state(&self) -> LimiterState {
        let now = Instant::now();
        let records = self.records.lock().expect("not poisoned");
        let mut refused: Vec<Refused> = records
            .map
            .iter()
            .filter_map(|(s, r)| {
                let until = r.blocked_until.filter(|u| *u > now)?;
                Some(Refused {
                    source: match s {
                        Source::Address(IpAddr::V4(a)) => a.to_string(),
                        Source::Address(IpAddr::V6(a)) => format!("{a}/64"),
                        Source::Range(IpAddr::V4(a)) => format!("{a}/24"),
                        Source::Range(IpAddr::V6(a)) => format!("{a}/48"),
                    },
                    for_secs: until.duration_since(now).as_secs().max(1),
                    strikes: r.strikes,
                })
            })
            .collect();
        refused.sort_by(|a, b| b.for_secs.cmp(&a.for_secs).then(a.source.cmp(&b.source)));
        let refused_count = refused.len() as u64;
        refused.truncate(LISTED);
        LimiterState {
            tracked: records.map.values().filter(|r| !r.stale(now)).count() as u64,
            refused_count,
            refused,
        }
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
    verified: Mutex<Verified>,
}

#[derive(Default)]
struct Verified {
    logins: HashMap<[u8; 32], (Instant, crate::Credential)>,
    /// Bumped by every forget: a check begun before it is not remembered.
    generation: u64,
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
            .logins
            .get(&key)
            .filter(|(t, _)| t.elapsed() < VERIFIED_FOR)
            .map(|(_, c)| *c)
    }

    /// Where forgetting has got to: taken before a check, and given to
    /// [`VerifiedLogins::remember`] after it.
    pub fn generation(&self) -> u64 {
        self.verified.lock().expect("not poisoned").generation
    }

    /// Remembers that this password checked out as `credential`, unless
    /// something was forgotten since `generation` (the check may have read
    /// what was revoked meanwhile).
    pub fn remember(
        &self,
        user: &str,
        kind: &str,
        password: &str,
        credential: crate::Credential,
        generation: u64,
    ) {
        let key = self.key(user, kind, password);
        let mut verified = self.verified.lock().expect("not poisoned");
        if verified.generation != generation {
            return;
        }
        if verified.logins.len() >= MAX_VERIFIED {
            verified
                .logins
                .retain(|_, (t, _)| t.elapsed() < VERIFIED_FOR);
        }
        verified.logins.insert(key, (Instant::now(), credential));
    }

    /// Forgets every login verified as app password `id`: once it is
    /// revoked, the next use is checked against the state again (and
    /// fails), not a minute later.
    pub fn forget_credential(&self, id: i64) {
        let mut verified = self.verified.lock().expect("not poisoned");
        verified.generation += 1;
        verified.logins.retain(|_, (_, c)| c.id != id);
    }

    /// Forgets every verified login (a password was changed or revoked in
    /// bulk).
    pub fn forget_all(&self) {
        let mut verified = self.verified.lock().expect("not poisoned");
        verified.generation += 1;
        verified.logins.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_begun_before_a_forget_is_not_remembered() {
        let v = VerifiedLogins::default();
        let c = crate::Credential {
            method: granary_grains::AuthMethod::AppPassword,
            id: 7,
        };
        let before = v.generation();
        v.forget_all();
        v.remember("alice", "mail", "pw", c, before);
        assert_eq!(v.get("alice", "mail", "pw"), None);
        v.remember("alice", "mail", "pw", c, v.generation());
        assert_eq!(v.get("alice", "mail", "pw"), Some(c));
        v.forget_credential(7);
        assert_eq!(v.get("alice", "mail", "pw"), None);
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ten_failures_refuse_the_address_and_not_its_neighbours() {
        let l = LoginLimiter::default();
        for _ in 0..ADDRESS_LIMIT - 1 {
            l.failed(ip("192.0.2.1"));
        }
        assert!(!l.refused(ip("192.0.2.1")));
        l.failed(ip("192.0.2.1"));
        assert!(l.refused(ip("192.0.2.1")));
        // Another address of the range, and another range, are not.
        assert!(!l.refused(ip("192.0.2.2")));
        assert!(!l.refused(ip("198.51.100.1")));
        let state = l.state();
        assert_eq!(state.refused.len(), 1, "{state:?}");
        assert_eq!(state.refused[0].source, "192.0.2.1");
        assert!(state.refused[0].for_secs > 290 && state.refused[0].for_secs <= 300);
    }

    #[test]
    fn a_range_is_refused_after_many_addresses_fail() {
        let l = LoginLimiter::default();
        for n in 0..RANGE_LIMIT {
            // Five failures each from ten addresses: none is refused on
            // its own, the range is.
            l.failed(ip(&format!("203.0.113.{}", n / 5)));
        }
        assert!(l.refused(ip("203.0.113.200")));
        assert!(!l.refused(ip("203.0.114.1")));
        assert!(
            l.state()
                .refused
                .iter()
                .any(|r| r.source == "203.0.113.0/24")
        );
    }

    #[test]
    fn each_refusal_within_a_day_doubles() {
        let l = LoginLimiter::default();
        let a = ip("192.0.2.9");
        for round in 1..=3u64 {
            for _ in 0..ADDRESS_LIMIT {
                l.failed(a);
            }
            let r = l
                .state()
                .refused
                .into_iter()
                .find(|r| r.source == "192.0.2.9")
                .unwrap();
            let expected = 300 << (round - 1);
            assert!(
                r.for_secs > expected - 10 && r.for_secs <= expected,
                "{round}: {r:?}"
            );
            assert_eq!(u64::from(r.strikes), round);
        }
    }

    #[test]
    fn ipv6_clients_count_by_their_64_and_ranges_by_their_48() {
        let l = LoginLimiter::default();
        for n in 0..ADDRESS_LIMIT {
            l.failed(ip(&format!("2001:db8:1:2::{n:x}")));
        }
        assert!(l.refused(ip("2001:db8:1:2::ffff")));
        assert!(!l.refused(ip("2001:db8:1:3::1")));
        assert_eq!(l.state().refused[0].source, "2001:db8:1:2::/64");
        // An IPv4 client seen through an IPv6 socket is the IPv4 address.
        for _ in 0..ADDRESS_LIMIT {
            l.failed(ip("::ffff:192.0.2.77"));
        }
        assert!(l.refused(ip("192.0.2.77")));
    }
}
