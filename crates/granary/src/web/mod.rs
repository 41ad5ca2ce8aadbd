//! The web home at `https://<domain>/`: where users sign in, add devices,
//! see their grains and decide who may reach what.
//!
//! It runs on a thread of its own (Cap'n Proto clients are `!Send`) with
//! a single-threaded runtime. The gateway hands it each request for the
//! domain through [`granary_gateway::home::WebHome`]; it answers with
//! server-rendered pages. It holds one capability, a `WebGate` on a socket
//! pair to the admin thread, and gets a user's `Home` only by signing in
//! as them: it never opens the state, and holds the root `Admin` (from
//! `Home.admin`, for admins only) just for one admin page's request.

mod actions;
mod admin;
mod admin_views;
mod handlers;
mod pages;
mod session;
mod views;

use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

use granary_gateway::LoginLimiter;
use granary_gateway::home::{HomeRequest, WebHome};
use granary_schema::admin_capnp::web_gate;
use hyper::body::Bytes;
use hyper::{Response, StatusCode, header};
use tokio::sync::{mpsc, oneshot};

/// What the pages need to know of this host besides the gate.
pub(crate) struct Setup {
    pub(crate) domain: String,
    pub(crate) limiter: Arc<LoginLimiter>,
    /// Where mail clients connect (for the device settings and profile).
    pub(crate) mail: granary_gateway::autoconfig::MailClients,
    /// The listeners as bound (`name`, address): ports shown in settings.
    pub(crate) listeners: Vec<(String, SocketAddr)>,
}

type Job = (HomeRequest, oneshot::Sender<Response<Bytes>>);

/// The gateway's handle on the web home thread.
struct Handle {
    jobs: mpsc::Sender<Job>,
}

impl WebHome for Handle {
    fn answer(
        &self,
        request: HomeRequest,
    ) -> Pin<Box<dyn std::future::Future<Output = Response<Bytes>> + Send + 'static>> {
        let jobs = self.jobs.clone();
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            if jobs.send((request, tx)).await.is_err() {
                return plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "The web home is stopping.\n",
                );
            }
            rx.await.unwrap_or_else(|_| {
                plain(StatusCode::INTERNAL_SERVER_ERROR, "The web home failed.\n")
            })
        })
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Bytes> {
    let mut r = Response::new(Bytes::from(text.to_owned()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Starts the web home's thread on `stream` (the admin thread serves the
/// gate on its other end); its handle goes into the gateway's `Shared`.
pub(crate) fn start(
    stream: std::os::unix::net::UnixStream,
    setup: Setup,
) -> anyhow::Result<Arc<dyn WebHome>> {
    use anyhow::Context;
    stream.set_nonblocking(true).context("web home socket")?;
    let (jobs, mut rx) = mpsc::channel::<Job>(256);
    std::thread::Builder::new()
        .name("web-home".to_owned())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("web home runtime");
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, async move {
                let stream = match tokio::net::UnixStream::from_std(stream) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "the web home cannot reach the daemon");
                        return;
                    }
                };
                let mut rpc = crate::admin::rpc_over_unix(
                    stream,
                    capnp_rpc::rpc_twoparty_capnp::Side::Client,
                    None,
                );
                let gate: web_gate::Client =
                    rpc.bootstrap(capnp_rpc::rpc_twoparty_capnp::Side::Server);
                tokio::task::spawn_local(async move {
                    if let Err(e) = rpc.await {
                        tracing::debug!(error = %e, "web gate connection ended");
                    }
                });
                let web = Rc::new(handlers::Web {
                    gate,
                    setup,
                    sessions: session::Sessions::new(),
                });
                while let Some((request, reply)) = rx.recv().await {
                    let web = web.clone();
                    tokio::task::spawn_local(async move {
                        let mut answer = web.answer(request).await;
                        protect(answer.headers_mut());
                        let _ = reply.send(answer);
                    });
                }
            });
        })
        .context("cannot start the web home thread")?;
    Ok(Arc::new(Handle { jobs }))
}

/// The headers every answer carries: no script, no framing, no inline
/// style, forms only to here, no caching, HSTS (the home is served only
/// over TLS).
fn protect(headers: &mut hyper::HeaderMap) {
    let set = |h: &mut hyper::HeaderMap, name: &'static str, value: &'static str| {
        h.insert(name, header::HeaderValue::from_static(value));
    };
    set(
        headers,
        "content-security-policy",
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; \
         frame-ancestors 'none'; base-uri 'none'",
    );
    set(headers, "x-frame-options", "DENY");
    set(headers, "x-content-type-options", "nosniff");
    set(headers, "referrer-policy", "same-origin");
    set(headers, "cross-origin-opener-policy", "same-origin");
    set(headers, "cache-control", "no-store");
    set(headers, "strict-transport-security", "max-age=31536000");
}

/// The key that seals second-factor secrets: `keys/web.key`, 32 random
/// bytes made once (0600). On a cluster every node has its own, so a
/// second factor set up on one node is read only there (a known gap).
pub(crate) fn seal_key(data_dir: &std::path::Path) -> anyhow::Result<[u8; 32]> {
    use anyhow::Context;
    let path = data_dir.join("keys").join("web.key");
    match std::fs::read(&path) {
        Ok(bytes) => bytes
            .as_slice()
            .try_into()
            .with_context(|| format!("{} is not 32 bytes", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = granary_auth::generate_token().context("random key")?;
            let dir = path.parent().expect("keys/ has a parent");
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot make {}", dir.display()))?;
            granary_files::write_atomic(&path, &key, 0o600)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}
