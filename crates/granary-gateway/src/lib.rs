//! The gateway: what clients connect to.
//!
//! Each listener is a module with `serve(listener, shared, shutdown)`:
//! [`https`] (HTTP/1.1 and HTTP/2 over TLS, every request routed by the
//! [`services`] table and forwarded by [`proxy`]) and [`ssh`] (git over
//! SSH). They share one [`Shared`]: the domain, the [`Directory`] they ask
//! who is who, the [`Grains`] they reach grains through, the login
//! limiter and the TLS configuration.
//!
//! The gateway never opens the state database and never assumes a grain
//! runs on this node: it asks [`Directory`] and [`Grains`], which the
//! daemon implements.

pub mod acme;
pub mod autoconfig;
pub mod directory;
pub mod error;
pub mod home;
pub mod http;
pub mod https;
pub mod imap;
pub mod invite;
pub mod limiter;
pub mod proxy;
pub mod s2s;
pub mod services;
pub mod smtp;
pub mod ssh;
pub mod stats;
pub mod taskd;
pub mod tls;
pub mod xmpp;

use std::sync::Arc;
use std::time::Duration;

pub use directory::{
    BoxFuture, Credential, Directory, InviteInfo, InviteRedeemed, LookupFailed, MailRecipient,
    RedeemRefused,
};
pub use error::GatewayError;
use granary_grains::Grains;
pub use limiter::{LoginLimiter, VerifiedLogins};

/// Timeouts and bounds of the listeners, from `[gateway]`.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// From TCP accept to a finished TLS handshake.
    pub handshake_timeout: Duration,
    /// From the first byte of a request head to its end; also ends idle
    /// kept-alive HTTP connections.
    pub header_timeout: Duration,
    /// How long open connections get to finish when the server stops.
    pub drain_timeout: Duration,
    /// The largest request head (HTTP/1.1) accepted.
    pub max_header_bytes: usize,
    /// How long an unused pooled connection to a grain is kept (while
    /// kept, it holds the grain awake).
    pub upstream_idle: Duration,
    /// An SSH session idle this long is closed.
    pub ssh_idle: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
            max_header_bytes: 64 << 10,
            upstream_idle: Duration::from_secs(30),
            ssh_idle: Duration::from_secs(600),
        }
    }
}

/// What every listener of the gateway shares.
pub struct Shared {
    /// Granary's own domain (`example.org`): services are `<name>.<domain>`.
    pub domain: String,
    pub directory: Arc<dyn Directory>,
    pub grains: Arc<dyn Grains>,
    /// Failed logins per source address and per user, across protocols.
    pub limiter: Arc<LoginLimiter>,
    pub tls: Arc<rustls::ServerConfig>,
    /// The SSH listener's host key ([`ssh::host_key`]).
    pub ssh_host_key: russh::keys::PrivateKey,
    pub settings: Settings,
    /// The MX's spool, checks and limits; `None` when mail is not served.
    pub mx: Option<Arc<smtp::Mx>>,
    /// Federation with other chat servers; `None` when `xmpp-s2s` is off.
    pub s2s: Option<Arc<s2s::Federation>>,
    /// The chat domains served (Granary's and the added ones).
    pub chat_domains: Arc<ChatDomains>,
    /// Passwords verified in the last minute, across listeners.
    pub verified: Arc<VerifiedLogins>,
    /// Which client certificates the taskd listener lets finish the
    /// handshake; `None`: taskd is not served.
    pub taskd_clients: Option<TaskdClients>,
    /// The web home on the domain; `None`: the domain answers a plain
    /// front page.
    pub home: Option<Arc<dyn home::WebHome>>,
    /// What `/metrics` shows of the gateway.
    pub stats: Arc<stats::Stats>,
    /// ACME challenge answers and certificate status; `None` without
    /// `tls.acme`.
    pub acme: Option<Arc<acme::Acme>>,
}

/// The client certificates the taskd listener takes through the TLS
/// handshake. Either way the certificate is then looked up by its SHA-256
/// among those issued (`granary tasks cert`) and not revoked: that lookup
/// is what lets a client in.
#[derive(Debug, Clone)]
pub enum TaskdClients {
    /// Signed by this host's local CA (its `ca.pem`).
    LocalCa(std::path::PathBuf),
    /// Any certificate whose key signs the handshake: on a cluster each
    /// node has a CA of its own, and a certificate one node issued is good
    /// on every node (the issued ones are in the shared records).
    Issued,
}

/// The chat domains this host serves: Granary's own and those added with
/// `granary xmpp domain add`. Added ones are remembered once seen; a name
/// not among them is looked up again each time (they are rare: streams to
/// a domain we do not serve, proofs of other servers' domains), so an added
/// domain is served at once.
pub struct ChatDomains {
    primary: String,
    directory: Arc<dyn Directory>,
    known: std::sync::Mutex<Arc<std::collections::HashSet<String>>>,
}

impl ChatDomains {
    pub fn new(primary: &str, directory: Arc<dyn Directory>) -> ChatDomains {
        ChatDomains {
            primary: primary.to_ascii_lowercase(),
            directory,
            known: std::sync::Mutex::default(),
        }
    }

    /// Granary's own domain.
    pub fn primary(&self) -> &str {
        &self.primary
    }

    /// Whether `domain` is ours: `None` when that cannot be told (the
    /// state could not be read). Callers refuse on `None`.
    pub async fn lookup(&self, domain: &str) -> Option<bool> {
        let d = domain.to_ascii_lowercase();
        let d = d.strip_suffix('.').unwrap_or(&d);
        if self.known_lowercase(d) {
            return Some(true);
        }
        let fresh: std::collections::HashSet<String> =
            self.directory.xmpp_domains().await?.into_iter().collect();
        let hit = fresh.contains(d);
        *self.known.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        Some(hit)
    }

    /// Whether chat for `domain` is served here (`false` when unsure).
    pub async fn serves(&self, domain: &str) -> bool {
        self.lookup(domain).await == Some(true)
    }

    /// Whether `domain` is certainly someone else's (`false` when unsure):
    /// what another server may prove.
    pub async fn foreign(&self, domain: &str) -> bool {
        self.lookup(domain).await == Some(false)
    }

    /// Whether `domain` is among the ones already known to be ours (no
    /// lookup).
    pub fn known(&self, domain: &str) -> bool {
        let d = domain.to_ascii_lowercase();
        self.known_lowercase(d.strip_suffix('.').unwrap_or(&d))
    }

    fn known_lowercase(&self, d: &str) -> bool {
        d == self.primary
            || self
                .known
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(d)
    }
}

/// Why a mail login was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginRefused {
    /// Too many recent failures from this address or for this user: not
    /// even checked.
    Limited,
    /// No such user, or not one of their mail app passwords.
    Invalid,
}

/// Accepts connections until `shutdown`, runs `handle` for each in a span
/// named for `protocol` (with the peer, and the user once known), then
/// gives open connections the drain timeout after telling them through the
/// watch to stop.
pub(crate) async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    shared: &Shared,
    shutdown: impl std::future::Future<Output = ()>,
    protocol: &'static str,
    mut handle: F,
) where
    F: FnMut(
        tokio::net::TcpStream,
        std::net::SocketAddr,
        tokio::sync::watch::Receiver<bool>,
    ) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use tracing::Instrument;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut sessions = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "{protocol} accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
        };
        shared.stats.connection(protocol);
        let span = tracing::info_span!("conn", protocol, %peer, user = tracing::field::Empty);
        sessions.spawn(handle(tcp, peer, stop.clone()).instrument(span));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(shared.settings.drain_timeout, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("{protocol} sessions still open after the drain timeout; closing them");
        sessions.shutdown().await;
    }
}

/// Passes bytes both ways between a client and its grain. When the grain
/// ends first (it said goodbye, or sent a stream error), the client's side
/// is shut down and what the client still sends is read and dropped for a
/// few seconds: closing a socket with unread input resets the connection,
/// and the client would lose the last words it had not read yet.
///
/// `buffer` is each direction's copy buffer: small for protocols whose
/// connections mostly sit idle (chat), the default 8 KiB for bulk ones.
pub(crate) async fn splice<S>(client: S, grain: tokio::net::UnixStream, buffer: usize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
    let (from_client, mut to_client) = tokio::io::split(client);
    let (from_grain, mut to_grain) = grain.into_split();
    let mut from_client = BufReader::with_capacity(buffer, from_client);
    let mut from_grain = BufReader::with_capacity(buffer, from_grain);
    let grain_ended = {
        let up = async {
            let _ = tokio::io::copy_buf(&mut from_client, &mut to_grain).await;
            let _ = to_grain.shutdown().await;
        };
        let down = async {
            let _ = tokio::io::copy_buf(&mut from_grain, &mut to_client).await;
            let _ = to_client.shutdown().await;
        };
        tokio::pin!(up, down);
        tokio::select! {
            () = &mut down => true,
            () = &mut up => {
                down.await;
                false
            }
        }
    };
    if grain_ended {
        // On the heap, and only now: an array here would sit in every
        // session's future for its whole life.
        let mut sink = vec![0u8; 16 << 10];
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while let Ok(n) = from_client.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
}

/// What reading more before login came to.
pub(crate) enum ReadMore {
    /// Bytes were appended.
    More,
    /// The client closed, or the read failed.
    Ended,
    /// The login deadline passed.
    TooSlow,
    /// The server is stopping.
    Stopping,
}

/// Reads what the client sent next into `buf`, until `deadline` or until
/// `stop` turns true (the listener is shutting down).
pub(crate) async fn read_more<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    deadline: tokio::time::Instant,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> ReadMore {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    let mut stop = stop.clone();
    tokio::select! {
        r = tokio::time::timeout_at(deadline, stream.read(&mut chunk)) => match r {
            Ok(Ok(0)) | Ok(Err(_)) => ReadMore::Ended,
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                ReadMore::More
            }
            Err(_) => ReadMore::TooSlow,
        },
        _ = stop.wait_for(|s| *s) => ReadMore::Stopping,
    }
}

impl Shared {
    /// Whether logins from `ip` are refused unchecked for now (too many
    /// recent failures from its address or range; see [`LoginLimiter`]).
    /// Whoever it claims to be does not matter: nobody can lock a user out.
    pub fn source_refused(&self, ip: std::net::IpAddr) -> bool {
        self.limiter.refused(ip)
    }

    /// Counts a failed login (a wrong password, a bad token, a refused
    /// key) against where it came from.
    pub fn login_failed(&self, ip: std::net::IpAddr) {
        self.limiter.failed(ip);
    }

    /// [`Shared::login_failed`] for a login as `user`, unless `user` is
    /// disabled ([`Directory::disabled`]).
    pub async fn login_failed_as(&self, ip: std::net::IpAddr, user: &str) {
        if self.directory.disabled(user).await {
            tracing::info!(user, "login of a disabled user refused");
        } else {
            self.login_failed(ip);
        }
    }

    /// A mail client's login (IMAP, submission). `login` is a user name or
    /// one of the user's addresses; `password` one of their app passwords
    /// of kind `mail`. Failures count against the client's address and
    /// range in the [`LoginLimiter`]; while either is refused, attempts are
    /// refused unchecked (nothing looked up). Returns the user and the
    /// credential used.
    pub async fn mail_login(
        &self,
        ip: std::net::IpAddr,
        login: &str,
        password: &str,
    ) -> Result<(String, Credential), LoginRefused> {
        if self.source_refused(ip) {
            tracing::info!(login, "login refused: too many recent failures");
            return Err(LoginRefused::Limited);
        }
        let user = match login.contains('@') {
            true => self
                .directory
                .mail_sender_owner(login)
                .await
                .unwrap_or_else(|| login.to_ascii_lowercase()),
            false => login.to_ascii_lowercase(),
        };
        match self.check_password(&user, "mail", password).await {
            Some(cred) => Ok((user, cred)),
            None => {
                self.login_failed_as(ip, &user).await;
                tracing::info!(user, "login failed");
                Err(LoginRefused::Invalid)
            }
        }
    }

    /// Which of `user`'s app passwords of `kind` `password` is: from the
    /// last minute's verified logins, else asked of the [`Directory`]
    /// (argon2). Callers count failures in the [`LoginLimiter`].
    pub async fn check_password(
        &self,
        user: &str,
        kind: &str,
        password: &str,
    ) -> Option<Credential> {
        if let Some(credential) = self.verified.get(user, kind, password) {
            return Some(credential);
        }
        // A forget while the directory is asked (a revoke, a user
        // disabled) must not be undone by what it answers.
        let generation = self.verified.generation();
        let credential = self.directory.check_password(user, kind, password).await?;
        self.verified
            .remember(user, kind, password, credential, generation);
        Some(credential)
    }
}
