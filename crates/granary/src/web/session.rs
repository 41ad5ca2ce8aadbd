//! Sign-in sessions, cookies and CSRF tokens of the web home.
//!
//! A session is a random 256-bit token in a `__Host-` cookie (Secure,
//! HttpOnly, SameSite=Strict, Path=/, no Domain: the browser sends it
//! only to this exact origin over TLS), kept here only as its SHA-256,
//! with the user's `Home` capability. A new token is made at every sign-in
//! and nothing a client sent before is ever promoted to a session, so a
//! planted cookie is worth nothing (fixation). Sessions end after an hour
//! unused or twelve hours in all, at sign-out, or when the daemon stops.
//!
//! Every form carries a CSRF token: a session's own random one once signed
//! in; before that, an HMAC of a pre-sign-in cookie (double submit). Each
//! POST must also come from this origin when the browser says where it
//! comes from (`Origin`, `Sec-Fetch-Site`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use granary_schema::admin_capnp::{home, second_factor};
use hyper::HeaderMap;

/// The session cookie.
pub(super) const SESSION: &str = "__Host-granary";
/// The cookie of a sign-in waiting for its second factor.
pub(super) const PENDING: &str = "__Host-granary-pending";
/// The cookie the sign-in form's CSRF token is bound to.
pub(super) const PRE: &str = "__Host-granary-pre";

/// A session unused this long ends.
pub(super) const IDLE: Duration = Duration::from_secs(3600);
/// A session ends this long after sign-in, used or not.
pub(super) const LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// A sign-in waits this long for its code.
pub(super) const PENDING_FOR: Duration = Duration::from_secs(300);
/// Sessions kept at most (the oldest go first).
const MAX_SESSIONS: usize = 10_000;

pub(super) struct Session {
    pub(super) user: String,
    pub(super) home: home::Client,
    pub(super) csrf: String,
    /// One of `web.admins` (the admin pages still ask the daemon each time).
    pub(super) admin: bool,
    created: Instant,
    seen: std::cell::Cell<Instant>,
    /// A second-factor secret being set up (base32, its URI): shown, not
    /// yet confirmed.
    pub(super) totp_secret: RefCell<Option<(String, String)>>,
}

pub(super) struct Pending {
    pub(super) second: second_factor::Client,
    created: Instant,
}

/// A fresh random token, URL-safe base64 (256 bits).
pub(super) fn token() -> String {
    let raw = granary_auth::generate_token().expect("the kernel's random source");
    URL_SAFE_NO_PAD.encode(raw)
}

fn key_of(token: &str) -> [u8; 32] {
    granary_auth::token_hash(token.as_bytes())
}

/// The value of cookie `name` in the request, if any.
pub(super) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    granary_wire::form::cookie(
        headers
            .get_all(hyper::header::COOKIE)
            .iter()
            .map(|v| v.as_bytes()),
        name,
    )
}

/// A `Set-Cookie` value for `name`; `None` clears it.
pub(super) fn set_cookie(name: &str, value: Option<&str>, max_age: Duration) -> String {
    match value {
        Some(v) => format!(
            "{name}={v}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={}",
            max_age.as_secs()
        ),
        None => format!("{name}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0"),
    }
}

/// Whether a POST comes from this origin, as far as the browser says.
/// `Origin` must be `https://<authority>` when sent; `Sec-Fetch-Site`,
/// when sent, must be `same-origin` (or `none`: typed by the user).
pub(super) fn same_origin(headers: &HeaderMap, authority: &str) -> bool {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let expected = format!("https://{authority}");
    if header("origin").is_some_and(|o| !o.eq_ignore_ascii_case(&expected)) {
        return false;
    }
    match header("sec-fetch-site") {
        Some(site) => matches!(site, "same-origin" | "none"),
        None => true,
    }
}

/// Equal strings, compared without stopping early.
pub(super) fn same(a: &str, b: &str) -> bool {
    granary_auth::same_bytes(a.as_bytes(), b.as_bytes())
}

pub(super) struct Sessions {
    live: RefCell<HashMap<[u8; 32], Session>>,
    pending: RefCell<HashMap<[u8; 32], Pending>>,
    /// Keys the pre-sign-in CSRF tokens (made at start, never stored).
    csrf_key: ring::hmac::Key,
}

impl Sessions {
    pub(super) fn new() -> Sessions {
        let raw = granary_auth::generate_token().expect("the kernel's random source");
        Sessions {
            live: RefCell::default(),
            pending: RefCell::default(),
            csrf_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &raw),
        }
    }

    /// The CSRF token of a form shown before sign-in, bound to the
    /// `purpose` and to the browser's pre-sign-in (or pending) cookie.
    pub(super) fn pre_csrf(&self, purpose: &str, cookie: &str) -> String {
        let tag = ring::hmac::sign(&self.csrf_key, format!("{purpose}\0{cookie}").as_bytes());
        URL_SAFE_NO_PAD.encode(tag.as_ref())
    }

    /// Starts a session for `user`; its token goes in the cookie.
    pub(super) fn start(&self, user: String, home: home::Client, admin: bool) -> String {
        let token = token();
        let now = Instant::now();
        let mut live = self.live.borrow_mut();
        live.retain(|_, s| fresh(s, now));
        let oldest = live
            .iter()
            .min_by_key(|(_, s)| s.seen.get())
            .map(|(k, _)| *k);
        if let (true, Some(oldest)) = (live.len() >= MAX_SESSIONS, oldest) {
            live.remove(&oldest);
        }
        live.insert(
            key_of(&token),
            Session {
                user,
                home,
                admin,
                csrf: self::token(),
                created: now,
                seen: std::cell::Cell::new(now),
                totp_secret: RefCell::new(None),
            },
        );
        token
    }

    /// Runs `f` on the live session of cookie `token`, marking it used.
    pub(super) fn with<T>(&self, token: &str, f: impl FnOnce(&Session) -> T) -> Option<T> {
        let now = Instant::now();
        let key = key_of(token);
        let mut live = self.live.borrow_mut();
        match live.get(&key) {
            Some(s) if fresh(s, now) => {
                s.seen.set(now);
                Some(f(s))
            }
            Some(_) => {
                live.remove(&key);
                None
            }
            None => None,
        }
    }

    pub(super) fn end(&self, token: &str) {
        self.live.borrow_mut().remove(&key_of(token));
    }

    /// Ends every session of `user` but the one of `keep`.
    pub(super) fn end_others(&self, user: &str, keep: &str) {
        let keep = key_of(keep);
        self.live
            .borrow_mut()
            .retain(|k, s| s.user != user || *k == keep);
    }

    pub(super) fn wait_for_code(&self, second: second_factor::Client) -> String {
        let token = token();
        let now = Instant::now();
        let mut pending = self.pending.borrow_mut();
        pending.retain(|_, p| now.duration_since(p.created) < PENDING_FOR);
        if pending.len() < MAX_SESSIONS {
            pending.insert(
                key_of(&token),
                Pending {
                    second,
                    created: now,
                },
            );
        }
        token
    }

    pub(super) fn pending(&self, token: &str) -> Option<second_factor::Client> {
        let pending = self.pending.borrow();
        pending
            .get(&key_of(token))
            .filter(|p| p.created.elapsed() < PENDING_FOR)
            .map(|p| p.second.clone())
    }

    pub(super) fn end_pending(&self, token: &str) {
        self.pending.borrow_mut().remove(&key_of(token));
    }
}

fn fresh(s: &Session, now: Instant) -> bool {
    now.duration_since(s.seen.get()) < IDLE && now.duration_since(s.created) < LIFETIME
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_exact_name() {
        let mut h = HeaderMap::new();
        h.append(
            "cookie",
            "a=1; __Host-granary-pre=p; __Host-granary=s"
                .parse()
                .unwrap(),
        );
        assert_eq!(cookie(&h, SESSION).as_deref(), Some("s"));
        assert_eq!(cookie(&h, PRE).as_deref(), Some("p"));
        assert_eq!(cookie(&h, PENDING), None);
        let set = set_cookie(SESSION, Some("t"), LIFETIME);
        for flag in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
            assert!(set.contains(flag), "{set}");
        }
        assert!(!set.contains("Domain"));
    }

    #[test]
    fn other_origins_are_refused() {
        let mut h = HeaderMap::new();
        assert!(same_origin(&h, "example.org:8443"));
        h.insert("origin", "https://example.org:8443".parse().unwrap());
        assert!(same_origin(&h, "example.org:8443"));
        h.insert("origin", "https://evil.test".parse().unwrap());
        assert!(!same_origin(&h, "example.org:8443"));
        h.remove("origin");
        h.insert("sec-fetch-site", "cross-site".parse().unwrap());
        assert!(!same_origin(&h, "example.org:8443"));
        h.insert("sec-fetch-site", "same-origin".parse().unwrap());
        assert!(same_origin(&h, "example.org:8443"));
    }
}
