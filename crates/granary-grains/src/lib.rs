//! The one way to reach a grain, wherever it runs.
//!
//! The gateway, the admin server and the backup code ask for grains only
//! through [`Grains`]: connect to a service with the authenticated
//! identity and the client's peer, start, stop, status, logs, snapshots.
//! Nothing that holds a `Grains` may assume the grain runs on this node:
//! today the local supervisor implements it (`granary_supervisor::LocalGrains`,
//! a `Send` handle to the supervisor's own thread); the cluster layer will
//! implement it across nodes.
//!
//! Every method takes what it needs by value or copies it, and returns a
//! `Send + 'static` future, so callers on any runtime or thread can hold
//! one `Arc<dyn Grains>`.

use std::future::Future;
use std::pin::Pin;

pub mod mail;

pub use granary_model::GrainId;
use serde::{Deserialize, Serialize};

/// What every [`Grains`] method returns.
pub type GrainsFuture<T> = Pin<Box<dyn Future<Output = Result<T, GrainError>> + Send + 'static>>;

/// How a client proved who it is, as the grain is told (`grain.capnp`'s
/// `AuthMethod`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    /// Nobody logged in: a public blog, a public repository, mail from the
    /// internet.
    Anonymous,
    /// The account password.
    Password,
    /// One of the user's per-device app passwords.
    AppPassword,
    /// One of the user's SSH public keys.
    SshKey,
    /// A bearer secret the user's client holds (Taskwarrior's client id).
    ClientSecret,
    /// The host's admin, through `granary grain connect` on the admin socket.
    Admin,
}

/// Who a connection is for, as the gateway (or the admin socket)
/// established it. Grains never see a password, only this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The authenticated user; empty when anonymous.
    pub user: String,
    pub method: AuthMethod,
    /// Which credential (app password, SSH key) it was; 0 when none.
    pub credential_id: i64,
}

impl Identity {
    pub fn anonymous() -> Identity {
        Identity {
            user: String::new(),
            method: AuthMethod::Anonymous,
            credential_id: 0,
        }
    }

    pub fn new(user: &str, method: AuthMethod, credential_id: i64) -> Identity {
        Identity {
            user: user.to_owned(),
            method,
            credential_id,
        }
    }
}

/// Where a connection came from, as the gateway saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// The client's address and port (`203.0.113.7:51234`).
    pub address: String,
    /// The wire protocol the gateway spoke with it (`https`, `ssh`, ...).
    pub protocol: String,
    /// `TLSv1.3`, or empty without TLS.
    pub tls_version: String,
    /// SNI, or the HTTP host.
    pub server_name: String,
}

impl Peer {
    pub fn new(address: impl ToString, protocol: &str) -> Peer {
        Peer {
            address: address.to_string(),
            protocol: protocol.to_owned(),
            ..Peer::default()
        }
    }
}

/// A client connection handed to a grain: the host's end of the socket
/// pair whose other end the grain received. While `keep` lives, the grain
/// counts the connection as activity and stays up; drop both when done.
pub struct Connection {
    pub stream: std::os::unix::net::UnixStream,
    pub keep: Box<dyn Send + Sync>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

/// How far [`Grains::start`] waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Until the grain's process runs (also clears a crash-loop hold).
    Running,
    /// Until its app answers a call on its channel: what an upgrade checks
    /// before it keeps a new version.
    Answering,
}

/// What `granary grain status` shows of one grain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrainStatus {
    pub id: String,
    pub user: String,
    pub kind: String,
    pub host_uid: u32,
    /// stopped, starting, running, stopping, backoff or held.
    pub state: String,
    /// Why it is held or backing off.
    pub reason: Option<String>,
    pub pid: Option<u32>,
    pub starts: u64,
    pub crashes: u64,
    pub last_exit: Option<String>,
    pub running_seconds: Option<u64>,
    pub connections: usize,
    pub calls_in_flight: usize,
    pub wake_locks: Vec<String>,
    /// Times the grain hit its memory limit (the kernel killed a process
    /// in it) since the daemon started.
    pub oom_kills: u64,
    /// The grain's memory limit in bytes, when it has one.
    pub memory_limit: Option<u64>,
    /// Memory it uses now, while running and where cgroups tell.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// CPU seconds its cgroup used (across runs), where cgroups tell.
    #[serde(default)]
    pub cpu_seconds: Option<f64>,
}

/// One snapshot of a grain's dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub name: String,
    /// Unix seconds.
    pub created: i64,
}

/// What [`Grains::snapshot`] did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotTaken {
    /// Where the backend keeps it (e.g. `pool/alice-git@manual-1700000000`).
    pub name: String,
    /// The app's one-line checkpoint report ("" when it was not running).
    pub report: String,
    /// How long the grain was frozen (0 when it was not running).
    pub frozen_micros: u64,
}

/// Whose fault a failure is: what a protocol tells its client follows from
/// it (an HTTP status, an SMTP reply code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fault {
    /// The request named something that does not exist or is not allowed.
    Client,
    /// The grain failed: its app crashed, answered nonsense or is held
    /// after a crash loop.
    Grain,
    /// The host failed: its state, storage, or it is shutting down.
    Host,
}

/// What went wrong with a grain.
/// Carried between nodes as `{"kind": ..., "detail": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "kind", content = "detail", rename_all = "kebab-case")]
pub enum Problem {
    #[error("no such grain")]
    NoSuchGrain,
    #[error("it is held stopped: {reason}; `granary grain start` tries again")]
    Held { reason: String },
    #[error("it cannot start: {0}")]
    Start(String),
    #[error("{0}")]
    Grain(String),
    /// Too many connections or calls at once.
    #[error("it is busy: {0}")]
    Busy(String),
    #[error("the host is shutting down")]
    Stopping,
    #[error("{0}")]
    Host(String),
}

/// A failure reaching or managing one grain, saying which grain and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("grain {grain}: {problem}")]
pub struct GrainError {
    /// As admins write it (`alice/git`).
    pub grain: String,
    pub problem: Problem,
}

impl GrainError {
    pub fn new(grain: &GrainId, problem: Problem) -> GrainError {
        GrainError {
            grain: grain.shown(),
            problem,
        }
    }

    /// Whose fault it is.
    pub fn fault(&self) -> Fault {
        match self.problem {
            Problem::NoSuchGrain => Fault::Client,
            Problem::Held { .. } | Problem::Start(_) | Problem::Grain(_) => Fault::Grain,
            Problem::Busy(_) | Problem::Stopping | Problem::Host(_) => Fault::Host,
        }
    }

    /// Whether trying the same thing again later may succeed without anyone
    /// changing anything (a busy grain, a grain restarting after a crash).
    pub fn retry_safe(&self) -> bool {
        match self.problem {
            Problem::NoSuchGrain | Problem::Held { .. } => false,
            Problem::Start(_)
            | Problem::Grain(_)
            | Problem::Busy(_)
            | Problem::Stopping
            | Problem::Host(_) => true,
        }
    }
}

/// The one way to reach grains. See the crate documentation.
pub trait Grains: Send + Sync + 'static {
    /// A connection to `service` of `grain` for `identity`, starting the
    /// grain if it is stopped. The grain's `Grain.accept` is told the
    /// identity and the peer.
    fn connect(
        &self,
        grain: &GrainId,
        service: &str,
        identity: Identity,
        peer: Peer,
    ) -> GrainsFuture<Connection>;

    /// Starts a grain (clearing a crash-loop hold) and waits as `how` says.
    fn start(&self, grain: &GrainId, how: Start) -> GrainsFuture<()>;

    /// Stops a grain gracefully; whether it was running.
    fn stop(&self, grain: &GrainId) -> GrainsFuture<bool>;

    /// Stops a grain and has it gone within `within`: asked politely
    /// with a grace cut to fit, then killed. What a fenced node does, as
    /// the grain must be gone before another node may start it.
    fn stop_within(&self, grain: &GrainId, within: std::time::Duration) -> GrainsFuture<bool> {
        let _ = within;
        self.stop(grain)
    }

    fn status(&self, grain: &GrainId) -> GrainsFuture<GrainStatus>;

    /// Every grain, with its state.
    fn list(&self) -> GrainsFuture<Vec<GrainStatus>>;

    /// The end of the grain's captured stdout and stderr.
    fn logs(&self, grain: &GrainId, max_bytes: u64) -> GrainsFuture<Vec<u8>>;

    /// A consistent snapshot: a running grain checkpoints, is frozen,
    /// snapshotted and thawed. An empty dataset is made first if the grain
    /// never ran.
    fn snapshot(&self, grain: &GrainId, label: &str) -> GrainsFuture<SnapshotTaken>;

    fn snapshots(&self, grain: &GrainId) -> GrainsFuture<Vec<Snapshot>>;

    /// Deletes the automatic snapshots the retention grid does not keep;
    /// their names.
    fn prune(&self, grain: &GrainId) -> GrainsFuture<Vec<String>>;

    /// Stops the grain, puts its dataset back to `snapshot`, and starts it
    /// again if it ran; whether it ran.
    fn rollback(&self, grain: &GrainId, snapshot: &str) -> GrainsFuture<bool>;

    /// Stops the grain and keeps it stopped for `reason` (its data is being
    /// replaced or removed); every live capability it holds or provides is
    /// cut.
    fn hold(&self, grain: &GrainId, reason: &str) -> GrainsFuture<()>;

    /// Undoes [`Grains::hold`].
    fn release(&self, grain: &GrainId) -> GrainsFuture<()>;

    /// Forgets a grain that was deleted (after [`Grains::hold`]).
    fn forget(&self, grain: &GrainId) -> GrainsFuture<()>;

    /// Cuts every live capability of a grant the state has revoked.
    fn grant_revoked(&self, grant: i64) -> GrainsFuture<()>;

    /// Serves grant `grant`'s object to its holder `holder`, which runs on
    /// another node: a stream carrying one Cap'n Proto connection whose
    /// bootstrap is the object the provider (a grain of this node) offers,
    /// behind this node's membrane. The grant is checked on every call, and
    /// revoking it cuts the object at once.
    fn serve_grant(&self, grant: i64, holder: &GrainId) -> GrainsFuture<Connection> {
        let _ = grant;
        let e = GrainError::new(
            holder,
            Problem::Host("capabilities are not served to other nodes here".to_owned()),
        );
        Box::pin(async move { Err(e) })
    }

    /// Hands one message to a mail grain (starting it if stopped); resolves
    /// once the grain has it durably. A grain that cannot take it now
    /// (down, storage full) fails with a retry-safe error.
    fn deliver_mail(&self, grain: &GrainId, mail: mail::MailDelivery) -> GrainsFuture<()>;

    /// A mail grain's mailboxes and deliveries (starting it if stopped).
    fn mail_status(&self, grain: &GrainId) -> GrainsFuture<mail::MailStatus>;

    /// A chat grain's sessions and sizes (starting it if stopped).
    fn xmpp_status(&self, grain: &GrainId) -> GrainsFuture<mail::XmppStatus> {
        let e = GrainError::new(grain, Problem::Host("chat is not served here".to_owned()));
        Box::pin(async move { Err(e) })
    }

    /// Makes `jid` a contact of the chat grain's user with a subscription
    /// both ways (starting the grain if stopped): someone redeemed an
    /// invite the user made. `name` is the roster name if it has none.
    fn xmpp_befriend(&self, grain: &GrainId, jid: &str, name: &str) -> GrainsFuture<()> {
        let _ = (jid, name);
        let e = GrainError::new(grain, Problem::Host("chat is not served here".to_owned()));
        Box::pin(async move { Err(e) })
    }

    /// A room grain's owner, admins and members (bare addresses),
    /// starting it if stopped.
    fn xmpp_room_members(&self, grain: &GrainId) -> GrainsFuture<Vec<String>> {
        let e = GrainError::new(grain, Problem::Host("chat is not served here".to_owned()));
        Box::pin(async move { Err(e) })
    }

    /// Hands a stanza from another server to a chat grain (starting it if
    /// stopped). A refusal by the grain is `Problem::Grain` with the
    /// stanza error's condition first (`service-unavailable: ...`).
    fn deliver_xmpp(&self, grain: &GrainId, stanza: mail::XmppStanza) -> GrainsFuture<()> {
        let _ = stanza;
        let e = GrainError::new(grain, Problem::Host("chat is not served here".to_owned()));
        Box::pin(async move { Err(e) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_and_retries_follow_the_problem() {
        let id = GrainId::parse("alice-git").unwrap();
        let e = GrainError::new(&id, Problem::NoSuchGrain);
        assert_eq!((e.fault(), e.retry_safe()), (Fault::Client, false));
        assert_eq!(e.to_string(), "grain alice/git: no such grain");
        let e = GrainError::new(&id, Problem::Busy("512 connections".into()));
        assert_eq!((e.fault(), e.retry_safe()), (Fault::Host, true));
        let e = GrainError::new(
            &id,
            Problem::Held {
                reason: "crash loop".into(),
            },
        );
        assert_eq!((e.fault(), e.retry_safe()), (Fault::Grain, false));
    }
}
