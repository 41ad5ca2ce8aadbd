//! Requests to grains: authentication (HTTP Basic with app passwords,
//! cached under a keyed hash so argon2 does not run on every request; failed
//! logins limited per source address and per user before any hashing), and
//! proxying each request over a per-grain pool of HTTP/1.1 connections to
//! the grain's `http` service. The identity goes in `x-granary-user`, which
//! the gateway strips from what clients send; grains never see passwords.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;

use granary_wire::http::{self as route, Route};

pub type Body = BoxBody<Bytes, hyper::Error>;
pub type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// A connection to a grain's service; `keep` holds the grain awake while
/// the connection lives.
pub struct Upstream {
    pub stream: std::os::unix::net::UnixStream,
    pub keep: Box<dyn Send + Sync>,
}

/// What the gateway asks of the daemon (it never opens the state itself).
pub trait Backend: Send + Sync + 'static {
    /// Whether `password` is one of `user`'s app passwords for `kind`.
    fn check_password(&self, user: &str, kind: &str, password: &str) -> BoxFuture<bool>;
    /// A connection to `service` of `owner`'s grain of `kind`, started if
    /// needed.
    fn connect(
        &self,
        owner: &str,
        kind: &str,
        service: &str,
    ) -> BoxFuture<Result<Upstream, String>>;
    /// Whether `owner` made git repository `repo` public.
    fn repo_public(&self, owner: &str, repo: &str) -> BoxFuture<bool>;
    /// Whether `key` (`type base64`) is one of `user`'s SSH keys.
    fn check_ssh_key(&self, user: &str, key: &str) -> BoxFuture<bool>;
    /// Whose blog a custom domain is, if anyone's.
    fn domain_owner(&self, host: &str) -> BoxFuture<Option<String>>;
}

/// Failed logins allowed per window, per source address and per user.
const FAILURES_PER_WINDOW: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(300);
/// How long a verified credential is trusted without argon2.
const CACHE_FOR: Duration = Duration::from_secs(60);
const MAX_CACHED: usize = 10_000;
/// Idle upstream connections kept per grain (more than a busy client
/// population keeps in flight: a connection made per request costs a trip
/// through the supervisor).
const POOL_PER_GRAIN: usize = 256;

struct Pooled {
    sender: SendRequest<Incoming>,
    _keep: Box<dyn Send + Sync>,
    /// When it was last handed back (an idle connection keeps its grain
    /// awake, so it is dropped after `upstream_idle`).
    idle_since: Instant,
}

/// Failed logins per source address and per user, shared by every
/// listener: past the limit a login is refused before any check runs.
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
        if failures.len() > MAX_CACHED {
            failures.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
        }
        let entry = failures.entry(key).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= FAILURE_WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }
}

pub struct Gateway {
    pub domain: String,
    backend: Arc<dyn Backend>,
    cache_key: ring::hmac::Key,
    verified: Mutex<HashMap<[u8; 32], Instant>>,
    limiter: Arc<LoginLimiter>,
    pool: Mutex<HashMap<String, Vec<Pooled>>>,
    upstream_idle: Duration,
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .body(
            Full::new(Bytes::from(text.to_owned()))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("static response parts are valid")
}

fn unauthorized() -> Response<Body> {
    let mut r = plain(
        StatusCode::UNAUTHORIZED,
        "Authentication required: your user name and an app password for git.\n",
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Basic realm=\"Granary git\", charset=\"UTF-8\""),
    );
    r
}

/// Request headers that belong to one hop, or that only the gateway sets.
fn strip(headers: &mut hyper::HeaderMap) {
    for h in [
        header::CONNECTION,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::AUTHORIZATION,
    ] {
        headers.remove(h);
    }
    let ours: Vec<header::HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-granary-") || k.as_str() == "keep-alive")
        .cloned()
        .collect();
    for k in ours {
        headers.remove(k);
    }
}

impl Gateway {
    /// `upstream_idle`: how long an unused connection to a grain is kept
    /// (while kept, it holds the grain awake).
    pub fn new(domain: &str, backend: Arc<dyn Backend>, upstream_idle: Duration) -> Gateway {
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .expect("the kernel's random source");
        Gateway {
            domain: domain.to_owned(),
            backend,
            cache_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
            verified: Mutex::default(),
            limiter: Arc::new(LoginLimiter::default()),
            pool: Mutex::default(),
            upstream_idle,
        }
    }

    /// The login limiter, for the other listeners (SSH).
    pub fn limiter(&self) -> Arc<LoginLimiter> {
        self.limiter.clone()
    }

    /// Drops pooled connections idle longer than `upstream_idle`, so grains
    /// nobody uses can stop. Runs until the gateway is dropped.
    pub fn start_janitor(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let every = (self.upstream_idle / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(gateway) = weak.upgrade() else {
                    return;
                };
                let mut pool = gateway.pool.lock().expect("not poisoned");
                for list in pool.values_mut() {
                    list.retain(|p| {
                        !p.sender.is_closed() && p.idle_since.elapsed() < gateway.upstream_idle
                    });
                }
                pool.retain(|_, list| !list.is_empty());
            }
        });
    }

    /// Checks Basic credentials for `kind`; `Err` is the answer to send.
    async fn authenticate(
        &self,
        req: &Request<Incoming>,
        peer: IpAddr,
        kind: &str,
    ) -> Result<Option<String>, Response<Body>> {
        let Some(header) = req.headers().get(header::AUTHORIZATION) else {
            return Ok(None);
        };
        let Some((user, password)) = route::basic_credentials(header.as_bytes()) else {
            return Err(unauthorized());
        };
        let (by_peer, by_user) = (format!("ip:{peer}"), format!("user:{user}"));
        // Before any hashing: a guessing client costs us nothing.
        if self.limiter.limited(&by_peer) || self.limiter.limited(&by_user) {
            tracing::warn!(%peer, user, "login rate limit hit");
            return Err(plain(
                StatusCode::TOO_MANY_REQUESTS,
                "Too many failed logins; try again later.\n",
            ));
        }
        if !route::valid_user(&user) {
            self.limiter.fail(by_peer);
            return Err(unauthorized());
        }
        let tag = ring::hmac::sign(
            &self.cache_key,
            format!("{user}\0{kind}\0{password}").as_bytes(),
        );
        let mut key = [0u8; 32];
        key.copy_from_slice(tag.as_ref());
        let cached = self
            .verified
            .lock()
            .expect("not poisoned")
            .get(&key)
            .is_some_and(|t| t.elapsed() < CACHE_FOR);
        if cached {
            return Ok(Some(user));
        }
        if self.backend.check_password(&user, kind, &password).await {
            let mut verified = self.verified.lock().expect("not poisoned");
            if verified.len() >= MAX_CACHED {
                verified.retain(|_, t| t.elapsed() < CACHE_FOR);
            }
            verified.insert(key, Instant::now());
            Ok(Some(user))
        } else {
            tracing::info!(%peer, user, kind, "failed login");
            self.limiter.fail(by_peer);
            self.limiter.fail(by_user);
            Err(unauthorized())
        }
    }

    /// Answers a request that is not for the gateway itself.
    pub async fn serve(&self, req: Request<Incoming>, host: &str, peer: IpAddr) -> Response<Body> {
        match route::route(host, req.uri().path(), &self.domain) {
            Route::Git { owner, repo } => {
                let user = match self.authenticate(&req, peer, "git").await {
                    Ok(user) => user,
                    Err(answer) => return answer,
                };
                let pushing = req.uri().path().ends_with("/git-receive-pack")
                    || req
                        .uri()
                        .query()
                        .is_some_and(|q| q.contains("service=git-receive-pack"));
                if user.as_deref() == Some(owner.as_str()) {
                    return self.forward(req, &owner, "git", &owner).await;
                }
                // Anyone may read a public repository; only its owner
                // writes. Otherwise the same answer whether or not the
                // repository exists.
                if !pushing && self.backend.repo_public(&owner, &repo).await {
                    let reader = user.unwrap_or_default();
                    return self.forward(req, &owner, "git", &reader).await;
                }
                match user {
                    None => unauthorized(),
                    Some(_) => plain(
                        StatusCode::FORBIDDEN,
                        "You cannot access this repository.\n",
                    ),
                }
            }
            // A site is public: no authentication, no identity.
            Route::Blog { owner } => self.forward(req, &owner, "blog", "").await,
            Route::Unknown
                if !host.ends_with(&format!(".{}", self.domain)) && host != self.domain =>
            {
                match self.backend.domain_owner(host).await {
                    // A domain its owner registered for their blog.
                    Some(owner) => self.forward(req, &owner, "blog", "").await,
                    None => plain(
                        StatusCode::NOT_FOUND,
                        &format!(
                            "No Granary app serves https://{host}{}.\n",
                            req.uri().path()
                        ),
                    ),
                }
            }
            Route::Unknown => plain(
                StatusCode::NOT_FOUND,
                &format!(
                    "No Granary app serves https://{host}{}.\n",
                    req.uri().path()
                ),
            ),
        }
    }

    /// A ready connection to the grain's `http` service, from the pool or new.
    async fn sender(&self, grain: &str, owner: &str, kind: &str) -> Result<Pooled, String> {
        {
            let mut pool = self.pool.lock().expect("not poisoned");
            if let Some(list) = pool.get_mut(grain) {
                list.retain(|p| !p.sender.is_closed());
                if let Some(i) = list.iter().position(|p| p.sender.is_ready()) {
                    return Ok(list.swap_remove(i));
                }
            }
        }
        let upstream = self.backend.connect(owner, kind, "http").await?;
        upstream
            .stream
            .set_nonblocking(true)
            .map_err(|e| e.to_string())?;
        let stream =
            tokio::net::UnixStream::from_std(upstream.stream).map_err(|e| e.to_string())?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "grain http connection ended");
            }
        });
        Ok(Pooled {
            sender,
            _keep: upstream.keep,
            idle_since: Instant::now(),
        })
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        owner: &str,
        kind: &str,
        user: &str,
    ) -> Response<Body> {
        let grain = format!("{owner}-{kind}");
        let mut pooled = match self.sender(&grain, owner, kind).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(grain, error = %e, "cannot reach the grain");
                return plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "The app is not available right now.\n",
                );
            }
        };
        let (mut parts, body) = req.into_parts();
        strip(&mut parts.headers);
        let host = format!("{kind}.{}", self.domain);
        parts.headers.insert(
            header::HOST,
            header::HeaderValue::from_str(&host).expect("a valid domain"),
        );
        // Empty for an anonymous reader of a public repository.
        parts.headers.insert(
            "x-granary-user",
            header::HeaderValue::from_str(user).expect("a checked user name"),
        );
        // HTTP/1.1 to the grain: origin-form URI, whatever the client spoke.
        parts.version = hyper::Version::HTTP_11;
        parts.uri = parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/")
            .parse()
            .expect("a path is a URI");
        let sent = pooled
            .sender
            .send_request(Request::from_parts(parts, body))
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(grain, error = %e, "the grain failed a request");
                return plain(StatusCode::BAD_GATEWAY, "The app failed to answer.\n");
            }
        };
        {
            let mut pool = self.pool.lock().expect("not poisoned");
            let list = pool.entry(grain).or_default();
            if list.len() < POOL_PER_GRAIN {
                pooled.idle_since = Instant::now();
                list.push(pooled);
            }
        }
        let (mut parts, body) = response.into_parts();
        parts.headers.remove(header::CONNECTION);
        parts.headers.remove("keep-alive");
        Response::from_parts(parts, body.boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_cannot_set_identity_headers() {
        let mut h = hyper::HeaderMap::new();
        h.insert("x-granary-user", "root".parse().unwrap());
        h.insert(header::AUTHORIZATION, "Basic eDp5".parse().unwrap());
        h.insert("git-protocol", "version=2".parse().unwrap());
        strip(&mut h);
        assert!(h.get("x-granary-user").is_none());
        assert!(h.get(header::AUTHORIZATION).is_none());
        assert_eq!(h.get("git-protocol").unwrap(), "version=2");
    }
}
