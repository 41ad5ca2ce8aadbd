//! The Granary app SDK: what an app inside a grain links.
//!
//! A grain starts with two descriptors from the host: its Cap'n Proto
//! channel on fd 3 and the connection hand-off socket on fd 4. [`run`] takes
//! both, serves the app's [`App`] implementation as the grain's bootstrap
//! (`schema/grain.capnp`) and gives the app a [`Host`] handle
//! (`schema/host.capnp`).
//!
//! ```no_run
//! use std::rc::Rc;
//! use granary_sdk::{Accepted, App, GrainRef, Host};
//!
//! struct Echo;
//!
//! impl App for Echo {
//!     async fn accept(self: Rc<Self>, conn: Accepted) {
//!         let (mut r, mut w) = conn.stream.into_split();
//!         let _ = tokio::io::copy(&mut r, &mut w).await;
//!     }
//!     fn offer(&self, descriptor: &str, _: GrainRef) -> Result<capnp::capability::Client, capnp::Error> {
//!         Err(capnp::Error::failed(format!("nothing offered as {descriptor}")))
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     granary_sdk::run(|_host: Host| Echo)
//! }
//! ```
//!
//! Everything runs on one thread (a current-thread tokio runtime and a
//! `LocalSet`), because Cap'n Proto objects are `!Send`: the futures an app
//! returns need not be `Send` either. Use `tokio::task::spawn_local` for
//! background work.

#![allow(unsafe_code)]
// adopting fds 3 and 4, and descriptors received with SCM_RIGHTS
// The app's futures run on a LocalSet and are deliberately not `Send`.
#![allow(async_fn_in_trait)]

/// Connection hand-off (the same crate the host speaks).
pub use granary_handoff as handoff;

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdStream;
use std::process::ExitCode;
use std::rc::Rc;

use capnp::capability::{FromClientHook, Rc as CapRc};
use capnp_rpc::rpc_twoparty_capnp::Side;
use granary_schema::grain_capnp::{self, grain};
use granary_schema::host_capnp::{self, host};
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

pub mod log;

pub use granary_schema::grain_capnp::AuthMethod;
pub use granary_schema::host_capnp::LogLevel;
pub use granary_schema::services_capnp;
pub use granary_schema::stream_capnp;

/// The file the host puts at the root of a grain's data (`/var`) when it
/// set the data back to an earlier copy: a failover to another node's
/// copy, or a snapshot rollback. An app that hands out sync tokens,
/// counters or anything a client keeps across connections stops honouring
/// those made since that copy, then removes the file.
pub const REWOUND: &str = ".granary-rewound";

/// The descriptor of the host channel inside a grain.
pub const HOST_FD: i32 = 3;
/// The descriptor of the connection hand-off socket inside a grain.
pub const HANDOFF_FD: i32 = 4;

/// A client connection for one of the app's services. The gateway has
/// terminated TLS and authenticated the client already.
pub struct Accepted {
    pub service: String,
    /// The authenticated user; empty for anonymous clients.
    pub user: String,
    pub method: grain_capnp::AuthMethod,
    /// Which app password or SSH key it was (0 when none).
    pub credential_id: i64,
    /// The client's address as the gateway saw it. For `http`, the
    /// connection serves one identity's requests from possibly several
    /// clients; each request's client is in `x-granary-peer`.
    pub peer_address: String,
    /// The wire protocol the gateway spoke (`https`, `ssh`, `admin`).
    pub protocol: String,
    /// SNI or the HTTP host the client used.
    pub server_name: String,
    pub stream: tokio::net::UnixStream,
}

/// The grain that asks for a capability this app offers.
#[derive(Debug, Clone)]
pub struct GrainRef {
    pub id: String,
    pub owner: String,
    pub kind: String,
}

/// A grant this grain holds (`Host::grants`).
#[derive(Debug, Clone)]
pub struct Route {
    pub descriptor: String,
    pub provider: GrainRef,
}

/// Who this grain is (`Host::info`).
#[derive(Debug, Clone)]
pub struct GrainInfo {
    pub id: String,
    pub owner: String,
    pub kind: String,
    pub app_id: String,
    pub app_version: String,
}

/// What an app implements.
pub trait App: 'static {
    /// Serves one client connection; runs as its own task.
    async fn accept(self: Rc<Self>, conn: Accepted);

    /// The object this app provides for `descriptor`
    /// (`<interface>[:<argument>]`), for a grain the owner granted it to.
    fn offer(
        &self,
        descriptor: &str,
        requester: GrainRef,
    ) -> Result<capnp::capability::Client, capnp::Error>;

    /// Reach a consistent on-disk state before a snapshot; a one-line
    /// report.
    async fn prepare_snapshot(self: Rc<Self>) -> Result<String, capnp::Error> {
        Ok("nothing to flush".to_owned())
    }

    /// Stop accepting and finish work; the process exits after this.
    async fn shutdown(self: Rc<Self>) {}
}

/// The host, as this grain sees it. Cheap to clone.
#[derive(Clone)]
pub struct Host {
    client: host::Client,
}

/// Held to keep the grain running while idle; released on drop.
pub struct WakeLock {
    _lock: host_capnp::wake_lock::Client,
}

impl Host {
    pub async fn info(&self) -> Result<GrainInfo, capnp::Error> {
        let answer = self.client.info_request().send().promise.await?;
        let g = answer.get()?.get_grain()?;
        Ok(GrainInfo {
            id: g.get_id()?.to_string()?,
            owner: g.get_owner()?.to_string()?,
            kind: g.get_kind()?.to_string()?,
            app_id: g.get_app_id()?.to_string()?,
            app_version: g.get_app_version()?.to_string()?,
        })
    }

    /// A capability another grain provides, if the owner granted it.
    pub async fn request(
        &self,
        descriptor: &str,
    ) -> Result<capnp::capability::Client, capnp::Error> {
        let mut req = self.client.request_request();
        req.get().set_descriptor(descriptor);
        let answer = req.send().promise.await?;
        answer.get()?.get_cap().get_as_capability()
    }

    /// [`Host::request`] from one provider grain (an id `grants` listed).
    pub async fn request_from(
        &self,
        descriptor: &str,
        provider: &str,
    ) -> Result<capnp::capability::Client, capnp::Error> {
        let mut req = self.client.request_from_request();
        req.get().set_descriptor(descriptor);
        req.get().set_provider(provider);
        let answer = req.send().promise.await?;
        answer.get()?.get_cap().get_as_capability()
    }

    /// The live grants this grain holds: what it may request, from whom.
    pub async fn grants(&self) -> Result<Vec<Route>, capnp::Error> {
        let answer = self.client.grants_request().send().promise.await?;
        let routes = answer.get()?.get_routes()?;
        let mut out = Vec::with_capacity(routes.len() as usize);
        for r in routes.iter() {
            out.push(Route {
                descriptor: r.get_descriptor()?.to_string()?,
                provider: GrainRef {
                    id: r.get_provider_id()?.to_string()?,
                    owner: r.get_provider_owner()?.to_string()?,
                    kind: r.get_provider_kind()?.to_string()?,
                },
            });
        }
        Ok(out)
    }

    /// [`Host::request`], typed (e.g. `notify::Client`).
    pub async fn request_as<C: FromClientHook>(&self, descriptor: &str) -> Result<C, capnp::Error> {
        Ok(C::new(self.request(descriptor).await?.hook))
    }

    /// A token that restores `cap` (obtained from `request` or `restore`)
    /// after restarts. Keep it in the dataset.
    pub async fn save(
        &self,
        cap: &capnp::capability::Client,
        label: &str,
    ) -> Result<Vec<u8>, capnp::Error> {
        let mut req = self.client.save_request();
        req.get().init_cap().set_as_capability(cap.hook.add_ref());
        req.get().set_label(label);
        let answer = req.send().promise.await?;
        Ok(answer.get()?.get_token()?.to_vec())
    }

    pub async fn restore(&self, token: &[u8]) -> Result<capnp::capability::Client, capnp::Error> {
        let mut req = self.client.restore_request();
        req.get().set_token(token);
        let answer = req.send().promise.await?;
        answer.get()?.get_cap().get_as_capability()
    }

    pub async fn drop_token(&self, token: &[u8]) -> Result<(), capnp::Error> {
        let mut req = self.client.drop_request();
        req.get().set_token(token);
        req.send().promise.await.map(drop)
    }

    /// Keeps the grain running while the lock lives; the owner sees
    /// `reason`.
    pub async fn stay_awake(&self, reason: &str) -> Result<WakeLock, capnp::Error> {
        let mut req = self.client.stay_awake_request();
        req.get().set_reason(reason);
        let answer = req.send().promise.await?;
        Ok(WakeLock {
            _lock: answer.get()?.get_lock()?,
        })
    }

    pub async fn log(&self, level: LogLevel, message: &str) -> Result<(), capnp::Error> {
        let mut req = self.client.log_request();
        req.get().set_level(level);
        req.get().set_message(message);
        req.send().promise.await.map(drop)
    }

    /// The raw client, for calls this wrapper lacks.
    pub fn client(&self) -> &host::Client {
        &self.client
    }
}

/// Descriptors received on the hand-off socket, matched with `accept`
/// calls by token (either may come first).
#[derive(Default)]
struct Handoffs {
    arrived: HashMap<u64, OwnedFd>,
    waiting: HashMap<u64, oneshot::Sender<OwnedFd>>,
}

struct GrainServer<A: App> {
    app: Rc<A>,
    handoffs: Rc<RefCell<Handoffs>>,
    shut_down: Rc<std::cell::Cell<bool>>,
}

fn text(r: capnp::Result<capnp::text::Reader<'_>>) -> Result<String, capnp::Error> {
    Ok(r?.to_str()?.to_owned())
}

impl<A: App> grain::Server for GrainServer<A> {
    async fn accept(
        self: CapRc<Self>,
        params: grain::AcceptParams,
        _: grain::AcceptResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let service = text(p.get_service())?;
        let identity = p.get_identity()?;
        let peer = p.get_peer()?;
        let token = match p.get_handoff()?.which()? {
            grain_capnp::handoff::Socket(token) => token,
            grain_capnp::handoff::Stream(_) => {
                return Err(capnp::Error::unimplemented(
                    "this SDK takes connections as sockets only".to_owned(),
                ));
            }
        };
        let fd = {
            let mut h = self.handoffs.borrow_mut();
            match h.arrived.remove(&token) {
                Some(fd) => Ok(fd),
                None => {
                    let (tx, rx) = oneshot::channel();
                    h.waiting.insert(token, tx);
                    Err(rx)
                }
            }
        };
        let fd = match fd {
            Ok(fd) => fd,
            Err(rx) => rx
                .await
                .map_err(|_| capnp::Error::failed("the hand-off socket closed".to_owned()))?,
        };
        let std = StdStream::from(fd);
        std.set_nonblocking(true)
            .map_err(|e| capnp::Error::failed(e.to_string()))?;
        let stream = tokio::net::UnixStream::from_std(std)
            .map_err(|e| capnp::Error::failed(e.to_string()))?;
        let conn = Accepted {
            service,
            user: text(identity.get_user())?,
            method: identity.get_method()?,
            credential_id: identity.get_credential_id(),
            peer_address: text(peer.get_address())?,
            protocol: text(peer.get_protocol())?,
            server_name: text(peer.get_server_name())?,
            stream,
        };
        tokio::task::spawn_local(self.app.clone().accept(conn));
        Ok(())
    }

    async fn offer(
        self: CapRc<Self>,
        params: grain::OfferParams,
        mut results: grain::OfferResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let descriptor = text(p.get_descriptor())?;
        let r = p.get_requester()?;
        let requester = GrainRef {
            id: text(r.get_id())?,
            owner: text(r.get_owner())?,
            kind: text(r.get_kind())?,
        };
        let cap = self.app.offer(&descriptor, requester)?;
        results.get().init_cap().set_as_capability(cap.hook);
        Ok(())
    }

    async fn prepare_snapshot(
        self: CapRc<Self>,
        _: grain::PrepareSnapshotParams,
        mut results: grain::PrepareSnapshotResults,
    ) -> Result<(), capnp::Error> {
        let report = self.app.clone().prepare_snapshot().await?;
        results.get().set_report(&report);
        Ok(())
    }

    async fn shutdown(
        self: CapRc<Self>,
        _: grain::ShutdownParams,
        _: grain::ShutdownResults,
    ) -> Result<(), capnp::Error> {
        if !self.shut_down.replace(true) {
            self.app.clone().shutdown().await;
        }
        Ok(())
    }
}

/// Takes ownership of an inherited descriptor, checking it is open.
fn adopt(fd: i32, what: &str) -> Result<OwnedFd, String> {
    // SAFETY: F_GETFD only reads the descriptor's flags.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!(
            "fd {fd} ({what}) is not open: this program runs inside a Granary grain, started by the supervisor"
        ));
    }
    // SAFETY: the descriptor is open, was handed to this process for this
    // purpose, and nothing else in the process owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Runs the app until the host closes the channel or sends SIGTERM.
pub fn run<A: App>(make: impl FnOnce(Host) -> A) -> ExitCode {
    // Blocking work (files, SQLite) gets a few threads: a grain's pids
    // limit counts every thread.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(8)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("granary-sdk: cannot build the runtime: {e}");
            return ExitCode::from(70);
        }
    };
    let local = tokio::task::LocalSet::new();
    match local.block_on(&runtime, serve(make)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("granary-sdk: {e}");
            ExitCode::from(70)
        }
    }
}

/// [`run`] on an already running `LocalSet`, with the channel and hand-off
/// socket given explicitly (for tests and embedding).
pub async fn serve_on<A: App>(
    channel: OwnedFd,
    handoff: OwnedFd,
    make: impl FnOnce(Host) -> A,
) -> Result<(), String> {
    use futures::AsyncReadExt;
    use tokio_util::compat::TokioAsyncReadCompatExt;

    let channel = StdStream::from(channel);
    channel.set_nonblocking(true).map_err(|e| e.to_string())?;
    let channel = tokio::net::UnixStream::from_std(channel).map_err(|e| e.to_string())?;
    let handoff = StdStream::from(handoff);
    handoff.set_nonblocking(true).map_err(|e| e.to_string())?;
    // SAFETY: the stream owns its descriptor and the AsyncFd owns the
    // stream, so the descriptor stays open and the same while registered.
    let handoff =
        unsafe { AsyncFd::register(handoff) }.map_err(|e| e.into_parts().1.to_string())?;

    let (reader, writer) = channel.compat().split();
    let network = capnp_rpc::twoparty::VatNetwork::new(
        futures::io::BufReader::new(reader),
        futures::io::BufWriter::new(writer),
        Side::Server,
        capnp::message::ReaderOptions {
            traversal_limit_in_words: Some(8 << 20),
            nesting_limit: 64,
        },
    );
    // The host's bootstrap is known only once the system exists; the app
    // is made after, so the grain's own bootstrap is a promise for it.
    let (app_tx, app_rx) = oneshot::channel::<grain::Client>();
    let bootstrap: grain::Client = capnp_rpc::new_future_client(async move {
        app_rx
            .await
            .map_err(|_| capnp::Error::failed("the app was not made".to_owned()))
    });
    let mut system = capnp_rpc::RpcSystem::new(Box::new(network), Some(bootstrap.client));
    let host = Host {
        client: system.bootstrap(Side::Client),
    };
    log::attach(host.client.clone());
    let handoffs = Rc::new(RefCell::new(Handoffs::default()));
    let shut_down = Rc::new(std::cell::Cell::new(false));
    let app = Rc::new(make(host));
    let _ = app_tx.send(capnp_rpc::new_client(GrainServer {
        app: app.clone(),
        handoffs: handoffs.clone(),
        shut_down: shut_down.clone(),
    }));

    // Descriptors arriving on the hand-off socket.
    tokio::task::spawn_local(async move {
        loop {
            let Ok(mut guard) = handoff.readable().await else {
                return;
            };
            match guard.try_io(|s| handoff::recv_fd(s.get_ref())) {
                Ok(Ok((token, fd))) => {
                    let mut h = handoffs.borrow_mut();
                    match h.waiting.remove(&token) {
                        Some(tx) => {
                            let _ = tx.send(fd);
                        }
                        None => {
                            h.arrived.insert(token, fd);
                        }
                    }
                }
                Ok(Err(e)) => {
                    if e.kind() != std::io::ErrorKind::UnexpectedEof {
                        eprintln!("granary-sdk: hand-off socket: {e}");
                    }
                    // Waiting `accept` calls fail now rather than hang.
                    handoffs.borrow_mut().waiting.clear();
                    return;
                }
                Err(_would_block) => continue,
            }
        }
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("SIGTERM handler: {e}"))?;
    tokio::select! {
        result = system => result.map_err(|e| format!("host channel: {e}")),
        _ = term.recv() => {
            if !shut_down.replace(true) {
                app.shutdown().await;
            }
            Ok(())
        }
    }
}

async fn serve<A: App>(make: impl FnOnce(Host) -> A) -> Result<(), String> {
    let channel = adopt(HOST_FD, "the host channel")?;
    let handoff = adopt(HANDOFF_FD, "the hand-off socket")?;
    serve_on(channel, handoff, make).await
}

/// Runs `f` as a task of the current `LocalSet` (re-exported for apps).
pub fn spawn_local<F: Future + 'static>(f: F) -> tokio::task::JoinHandle<F::Output> {
    tokio::task::spawn_local(f)
}

/// A capability client for a local server object (what `offer` returns).
pub fn new_client<C, S>(server: S) -> C
where
    C: capnp::capability::FromServer<S>,
{
    capnp_rpc::new_client(server)
}

/// An error's message without the `remote exception: ` prefixes each RPC hop
/// adds.
pub fn message(e: &capnp::Error) -> &str {
    let mut m = e.extra.as_str();
    while let Some(rest) = m.strip_prefix("remote exception: ") {
        m = rest;
    }
    m
}
