//! Requests to grains: routing by the service table, authentication (HTTP
//! Basic with app passwords, verified once a minute at most
//! ([`crate::VerifiedLogins`]); failed logins limited per source address and per
//! user before any hashing), the entry's access rules, and forwarding over
//! pooled HTTP/1.1 connections to the grain's `http` service.
//!
//! A pooled connection belongs to one grain and one identity: the grain's
//! `accept` was told who it is for, and only that identity's requests use
//! it. Each request also carries `x-granary-user`, `x-granary-auth` and
//! `x-granary-peer`, which the gateway strips from what clients send.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use granary_grains::{AuthMethod, Connection, GrainId, Identity, Peer};
use granary_wire::http::{self as wire, Owner};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;

use crate::services::{Access, HTTP_SERVICES, HttpService};
use crate::{Credential, GatewayError, Shared};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Idle upstream connections kept per grain and identity (more than a busy
/// client population keeps in flight: a connection made per request costs
/// a trip through the supervisor).
const POOL_PER_KEY: usize = 256;

struct Pooled {
    sender: SendRequest<Incoming>,
    _keep: Box<dyn Send + Sync>,
    /// When it was last handed back (an idle connection keeps its grain
    /// awake, so it is dropped after `upstream_idle`).
    idle_since: Instant,
}

/// Someone who logged in.
#[derive(Debug, Clone)]
struct Login {
    user: String,
    credential: Credential,
}

/// The HTTP side of the gateway: what the HTTPS listener hands each
/// request that is not the gateway's own.
pub struct Gateway {
    shared: Arc<Shared>,
    pool: Mutex<HashMap<String, Vec<Pooled>>>,
    /// Device secrets found in the last [`SECRET_CACHE_FOR`], by hash.
    secrets: Mutex<HashMap<[u8; 32], (Instant, String, Credential)>>,
}

/// How long a device secret that checked out is trusted without asking
/// the directory again: a revoked one is refused within this time.
const SECRET_CACHE_FOR: Duration = Duration::from_secs(2);

pub(crate) fn plain(status: StatusCode, text: &str) -> Response<Body> {
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

fn unauthorized(service: &HttpService) -> Response<Body> {
    let mut r = plain(
        StatusCode::UNAUTHORIZED,
        &format!(
            "Authentication required: your user name and an app password for {}.\n",
            service.login_prompt
        ),
    );
    let challenge = format!(
        "Basic realm=\"Granary {}\", charset=\"UTF-8\"",
        service.login_prompt
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_str(&challenge).expect("a static realm"),
    );
    r
}

fn forbidden() -> Response<Body> {
    plain(StatusCode::FORBIDDEN, "You cannot access this.\n")
}

fn not_served(host: &str, path: &str) -> Response<Body> {
    plain(
        StatusCode::NOT_FOUND,
        &format!("No Granary app serves https://{host}{path}.\n"),
    )
}

fn error_response(e: &GatewayError) -> Response<Body> {
    let mut r = plain(e.status(), &format!("{}\n", e.message));
    if e.retry_safe {
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
    }
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

fn method_name(m: AuthMethod) -> &'static str {
    match m {
        AuthMethod::Anonymous => "anonymous",
        AuthMethod::Password => "password",
        AuthMethod::AppPassword => "app-password",
        AuthMethod::SshKey => "ssh-key",
        AuthMethod::ClientSecret => "client-secret",
        AuthMethod::Admin => "admin",
    }
}

impl Gateway {
    /// The gateway over `shared`, with its janitor running: pooled
    /// connections idle longer than `upstream_idle` are closed so grains
    /// nobody uses can stop.
    pub fn new(shared: Arc<Shared>) -> Arc<Gateway> {
        let gateway = Arc::new(Gateway {
            shared,
            pool: Mutex::default(),
            secrets: Mutex::default(),
        });
        let weak = Arc::downgrade(&gateway);
        let idle = gateway.shared.settings.upstream_idle;
        let every = (idle / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(gateway) = weak.upgrade() else {
                    return;
                };
                let mut pool = gateway.pool.lock().expect("not poisoned");
                for list in pool.values_mut() {
                    list.retain(|p| !p.sender.is_closed() && p.idle_since.elapsed() < idle);
                }
                pool.retain(|_, list| !list.is_empty());
                drop(pool);
                gateway
                    .secrets
                    .lock()
                    .expect("not poisoned")
                    .retain(|_, (t, _, _)| t.elapsed() < SECRET_CACHE_FOR);
            }
        });
        gateway
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Checks Basic credentials for `kind`: `Ok(None)` when none were
    /// sent; `Err` is the answer to send.
    async fn authenticate(
        &self,
        req: &Request<Incoming>,
        peer: SocketAddr,
        service: &HttpService,
        kind: &str,
    ) -> Result<Option<Login>, Response<Body>> {
        let Some(header) = req.headers().get(header::AUTHORIZATION) else {
            return Ok(None);
        };
        let Some((user, password)) = wire::basic_credentials(header.as_bytes()) else {
            return Err(unauthorized(service));
        };
        // Before any hashing: a guessing client costs us nothing. Only
        // where it comes from counts, never whom it names.
        if self.shared.source_refused(peer.ip()) {
            tracing::warn!(%peer, user, "login rate limit hit");
            return Err(plain(
                StatusCode::TOO_MANY_REQUESTS,
                "Too many failed logins; try again later.\n",
            ));
        }
        if !wire::valid_user(&user) {
            self.shared.login_failed(peer.ip());
            return Err(unauthorized(service));
        }
        match self.shared.check_password(&user, kind, &password).await {
            Some(credential) => Ok(Some(Login { user, credential })),
            None => {
                tracing::info!(%peer, user, kind, "failed login");
                self.shared.login_failed_as(peer.ip(), &user).await;
                Err(unauthorized(service))
            }
        }
    }

    /// Checks a device secret sent in `header`; `Err` is the answer to
    /// send. Unknown secrets count against the client's address in the
    /// limiter, and are refused unchecked while it is limited.
    async fn client_secret(
        &self,
        req: &Request<Incoming>,
        peer: SocketAddr,
        header: &'static str,
    ) -> Result<Login, Response<Body>> {
        let Some(secret) = req.headers().get(header).and_then(|v| v.to_str().ok()) else {
            return Err(plain(
                StatusCode::BAD_REQUEST,
                &format!("Send your client id in {header} (granary tasks client add).\n"),
            ));
        };
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            secret.trim().to_ascii_lowercase().as_bytes(),
        );
        let mut hash = [0u8; 32];
        hash.copy_from_slice(digest.as_ref());
        if let Some((_, user, credential)) = self
            .secrets
            .lock()
            .expect("not poisoned")
            .get(&hash)
            .filter(|(t, _, _)| t.elapsed() < SECRET_CACHE_FOR)
        {
            return Ok(Login {
                user: user.clone(),
                credential: *credential,
            });
        }
        if self.shared.source_refused(peer.ip()) {
            tracing::warn!(%peer, "client id rate limit hit");
            return Err(plain(
                StatusCode::TOO_MANY_REQUESTS,
                "Too many unknown client ids; try again later.\n",
            ));
        }
        match self.shared.directory.client_secret(hash).await {
            Some((user, credential)) => {
                self.secrets
                    .lock()
                    .expect("not poisoned")
                    .insert(hash, (Instant::now(), user.clone(), credential));
                Ok(Login { user, credential })
            }
            None => {
                tracing::info!(%peer, "unknown client id");
                self.shared.login_failed(peer.ip());
                Err(plain(
                    StatusCode::FORBIDDEN,
                    "This client id is not known here (revoked, or never made).\n",
                ))
            }
        }
    }

    /// Answers a request that is not for the gateway itself: routes it by
    /// the service table, applies the entry's access rules, forwards it.
    pub async fn serve(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        host: &str,
        peer: SocketAddr,
        tls_version: &str,
    ) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let Some(route) = wire::route(HTTP_SERVICES, host, &path, &self.shared.domain) else {
            return not_served(host, &path);
        };
        let service = route.entry;
        let missing = service.secret_paths.map(|p| p.not_found);
        if let Some(paths) = service.secret_paths
            && !(paths.shape)(&path)
        {
            return plain(StatusCode::NOT_FOUND, paths.not_found);
        }
        let login = match (service.access, service.access.password_kind()) {
            (Access::ClientSecret { header }, _) => {
                match self.client_secret(&req, peer, header).await {
                    Ok(login) => Some(login),
                    Err(answer) => return answer,
                }
            }
            (_, Some(kind)) => match self.authenticate(&req, peer, service, kind).await {
                Ok(login) => login,
                Err(answer) => return answer,
            },
            (_, None) => None,
        };
        let owner = match route.owner {
            Owner::User(u) => u,
            Owner::Login => match &login {
                Some(l) => l.user.clone(),
                None => return unauthorized(service),
            },
            Owner::Registered(h) => match self.shared.directory.registered_host(&h).await {
                Some((owner, kind)) if kind == route.kind => owner,
                _ => return not_served(host, &path),
            },
        };
        let as_login = |l: &Login| Identity::new(&l.user, l.credential.method, l.credential.id);
        let identity = match service.access {
            Access::Public => Identity::anonymous(),
            Access::Own { .. } | Access::ClientSecret { .. } => match &login {
                Some(l) => as_login(l),
                None => return unauthorized(service),
            },
            Access::OwnerOrPublicRead {
                resource, writes, ..
            } => {
                let Some(resource) = resource(&path) else {
                    return not_served(host, &path);
                };
                let query = req.uri().query().unwrap_or("");
                let is_owner = login.as_ref().is_some_and(|l| l.user == owner);
                // Anyone may read a public resource; only its owner writes.
                // Otherwise the same answer whether or not the resource
                // exists.
                let public_read = !is_owner
                    && !writes(&path, query)
                    && self
                        .shared
                        .directory
                        .is_public(&owner, route.kind, resource)
                        .await;
                match &login {
                    Some(l) if is_owner || public_read => as_login(l),
                    None if public_read => Identity::anonymous(),
                    None => return unauthorized(service),
                    Some(_) => return forbidden(),
                }
            }
        };
        let Ok(grain) = GrainId::for_user(&owner, route.kind) else {
            return match missing {
                Some(text) => plain(StatusCode::NOT_FOUND, text),
                None => not_served(host, &path),
            };
        };
        // The grain is told the credential; the secret stays here.
        if let Access::ClientSecret { header } = service.access {
            req.headers_mut().remove(header);
        }
        let span = tracing::debug_span!(
            "request",
            service = service.pattern.name,
            grain = %grain,
            user = %identity.user
        );
        use tracing::Instrument;
        match self
            .forward(req, &grain, identity, peer, host, tls_version)
            .instrument(span)
            .await
        {
            Ok(response) => response,
            // No such owner (or no grain of this kind): told like a file
            // the grain does not have, where the entry asks for that.
            Err(e) if e.status() == StatusCode::NOT_FOUND && missing.is_some() => {
                plain(StatusCode::NOT_FOUND, missing.unwrap_or_default())
            }
            Err(e) => error_response(&e),
        }
    }

    /// A ready connection to the grain's `http` service for `identity`,
    /// from the pool or new.
    async fn sender(
        &self,
        key: &str,
        grain: &GrainId,
        identity: &Identity,
        peer: SocketAddr,
        host: &str,
        tls_version: &str,
    ) -> Result<Pooled, GatewayError> {
        // A pooled connection is handed back as soon as its answer's body
        // has been read, often before its connection task has noticed and
        // made it ready again: one that is not ready yet is waited for
        // (moments), rather than a new connection made through the
        // supervisor (a hand-off per request under load).
        loop {
            let candidate = {
                let mut pool = self.pool.lock().expect("not poisoned");
                let Some(list) = pool.get_mut(key) else {
                    break;
                };
                list.retain(|p| !p.sender.is_closed());
                match list.iter().position(|p| p.sender.is_ready()) {
                    Some(i) => return Ok(list.swap_remove(i)),
                    None => list.pop(),
                }
            };
            let Some(mut pooled) = candidate else {
                break;
            };
            if pooled.sender.ready().await.is_ok() {
                return Ok(pooled);
            }
        }
        self.fresh(grain, identity, peer, host, tls_version).await
    }

    /// A new connection to the grain's `http` service for `identity`.
    async fn fresh(
        &self,
        grain: &GrainId,
        identity: &Identity,
        peer: SocketAddr,
        host: &str,
        tls_version: &str,
    ) -> Result<Pooled, GatewayError> {
        let mut who = Peer::new(peer, "https");
        who.server_name = host.to_owned();
        who.tls_version = tls_version.to_owned();
        let Connection { stream, keep } = self
            .shared
            .grains
            .connect(grain, "http", identity.clone(), who)
            .await
            .map_err(|e| {
                tracing::warn!(%grain, error = %e, "cannot reach the grain");
                GatewayError::from(&e)
            })?;
        let host_failure = |what: &str, e: &dyn std::fmt::Display| {
            tracing::warn!(%grain, error = %e, "{what}");
            GatewayError {
                fault: granary_grains::Fault::Host,
                retry_safe: true,
                message: "The app is not available right now; try again soon.".to_owned(),
            }
        };
        stream
            .set_nonblocking(true)
            .map_err(|e| host_failure("grain connection", &e))?;
        let stream = tokio::net::UnixStream::from_std(stream)
            .map_err(|e| host_failure("grain connection", &e))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| host_failure("grain http handshake", &e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "grain http connection ended");
            }
        });
        Ok(Pooled {
            sender,
            _keep: keep,
            idle_since: Instant::now(),
        })
    }

    /// Sends the request to the grain: its answer, or why there is none
    /// (the grain cannot be reached, or failed the request), which the
    /// caller turns into a response.
    async fn forward(
        self: &Arc<Self>,
        req: Request<Incoming>,
        grain: &GrainId,
        identity: Identity,
        peer: SocketAddr,
        host: &str,
        tls_version: &str,
    ) -> Result<Response<Body>, GatewayError> {
        let key = format!(
            "{grain}\0{}\0{}\0{}",
            identity.user,
            method_name(identity.method),
            identity.credential_id
        );
        let pooled = self
            .sender(&key, grain, &identity, peer, host, tls_version)
            .await?;
        let (mut parts, body) = req.into_parts();
        strip(&mut parts.headers);
        let grain_host = format!("{}.{}", grain.kind(), self.shared.domain);
        parts.headers.insert(
            header::HOST,
            header::HeaderValue::from_str(&grain_host).expect("a valid domain"),
        );
        // Empty for an anonymous reader.
        parts.headers.insert(
            "x-granary-user",
            header::HeaderValue::from_str(&identity.user).expect("a checked user name"),
        );
        parts.headers.insert(
            "x-granary-auth",
            header::HeaderValue::from_static(method_name(identity.method)),
        );
        parts.headers.insert(
            "x-granary-peer",
            header::HeaderValue::from_str(&peer.to_string()).expect("an address"),
        );
        // The host the client asked for (a blog's own domain, say): the
        // connection's `accept` named only its first request's.
        parts.headers.insert(
            "x-granary-host",
            header::HeaderValue::from_str(host).expect("a checked host name"),
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
        let mut pooled = pooled;
        let mut sent = pooled
            .sender
            .try_send_request(Request::from_parts(parts, body))
            .await;
        // A pooled connection the grain closed just as it was taken (after
        // answering a request early without reading its body, say): none
        // of the request was written, so it goes again on a new one.
        if let Err(e) = &mut sent
            && let Some(req) = e.take_message()
        {
            tracing::debug!(%grain, "the pooled grain connection had closed; sending on a new one");
            pooled = self
                .fresh(grain, &identity, peer, host, tls_version)
                .await?;
            sent = pooled.sender.try_send_request(req).await;
        }
        let response = match sent.map_err(|e| e.into_error()) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%grain, error = %e, "the grain failed a request");
                return Err(GatewayError {
                    fault: granary_grains::Fault::Grain,
                    retry_safe: true,
                    message: "The app failed to answer; try again in a moment.".to_owned(),
                });
            }
        };
        let (mut parts, body) = response.into_parts();
        parts.headers.remove(header::CONNECTION);
        parts.headers.remove("keep-alive");
        // The connection is idle (and pooled) only once this body has been
        // read to its end; until then it keeps its grain awake.
        let mut body = Returning {
            inner: body,
            back: Some((self.clone(), key, pooled)),
        };
        if hyper::body::Body::is_end_stream(&body.inner) {
            body.give_back();
        }
        Ok(Response::from_parts(parts, body.boxed()))
    }

    fn pool_put(&self, key: String, mut pooled: Pooled) {
        if pooled.sender.is_closed() {
            return;
        }
        let mut pool = self.pool.lock().expect("not poisoned");
        let list = pool.entry(key).or_default();
        if list.len() < POOL_PER_KEY {
            pooled.idle_since = Instant::now();
            list.push(pooled);
        }
    }
}

/// A grain's response body, which hands its connection back to the pool
/// once it has been read to its end. Dropped unfinished (the client went
/// away), the connection goes with it.
struct Returning {
    inner: Incoming,
    back: Option<(Arc<Gateway>, String, Pooled)>,
}

impl Returning {
    fn give_back(&mut self) {
        if let Some((gateway, key, pooled)) = self.back.take() {
            gateway.pool_put(key, pooled);
        }
    }
}

impl Drop for Returning {
    /// Dropped after its end was read (but not seen by `poll_frame`), the
    /// connection is still good: it goes back to the pool.
    fn drop(&mut self) {
        if hyper::body::Body::is_end_stream(&self.inner) {
            self.give_back();
        }
    }
}

impl hyper::body::Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        // The end is known either from an empty poll or, with a length,
        // from the last frame (hyper's server stops polling a body whose
        // announced length has been written, so no empty poll comes).
        match &polled {
            std::task::Poll::Ready(None) => this.give_back(),
            std::task::Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.give_back(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_cannot_set_identity_headers() {
        let mut h = hyper::HeaderMap::new();
        h.insert("x-granary-user", "root".parse().unwrap());
        h.insert("x-granary-auth", "admin".parse().unwrap());
        h.insert(header::AUTHORIZATION, "Basic eDp5".parse().unwrap());
        h.insert("git-protocol", "version=2".parse().unwrap());
        strip(&mut h);
        assert!(h.get("x-granary-user").is_none());
        assert!(h.get("x-granary-auth").is_none());
        assert!(h.get(header::AUTHORIZATION).is_none());
        assert_eq!(h.get("git-protocol").unwrap(), "version=2");
    }
}
