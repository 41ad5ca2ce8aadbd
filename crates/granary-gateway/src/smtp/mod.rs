//! The MX: the `smtp` listener, where other mail servers hand over mail
//! for this host's users.
//!
//! Each connection is a [`granary_wire::smtp::Session`] driven by
//! [`connection`]: recipients are checked at RCPT time against the
//! [`Directory`](crate::Directory) (an unknown address gets 550 5.1.1
//! then, so nothing is accepted only to bounce later); after the data,
//! SPF, DKIM, DMARC and ARC are checked ([`checks`]), forged
//! `Authentication-Results` for this host are removed, `Received` and this
//! host's `Authentication-Results` are added, and the message is committed
//! to the spool (fsynced, file and directory) before the 250. The spool's
//! deliverer takes it from there into each recipient's mail grain.
//!
//! STARTTLS is offered with the gateway's certificate; whatever the client
//! pipelined after STARTTLS in clear is thrown away.
//!
//! Submission (`submission`, STARTTLS like port 587, and `submissions`,
//! TLS from the start like port 465) is the same session with AUTH: PLAIN
//! and LOGIN are offered only under TLS and take app passwords of kind
//! `mail` (failures count in the shared login limiter). The envelope
//! sender and every `From:` address must be the user's own (by name,
//! `+tag` or alias; 553 5.7.1 otherwise); each user has a send rate and a
//! recipient cap; a missing `Date` or `Message-ID` is added. Mail for
//! local users goes through the spool like the MX's; mail for other
//! domains is signed with the sender's domain's DKIM keys ([`dkim`]) and
//! committed to the outbound queue, which [`outbound::Remote`] delivers.

pub mod checks;
mod connection;
pub mod dkim;
pub(crate) mod limits;
pub mod outbound;
pub mod records;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use granary_spool::Spool;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

pub use checks::Checker;
pub use dkim::DkimKeys;

use crate::Shared;

/// The MX's limits and timeouts, from `[mail]`.
#[derive(Debug, Clone)]
pub struct MxSettings {
    pub hostname: String,
    pub max_message_bytes: u64,
    pub max_recipients: u32,
    pub max_connections_per_ip: u32,
    pub max_messages_per_ip: u32,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    /// Recipients per message on submission.
    pub send_max_recipients: u32,
    /// Messages one user may submit per hour.
    pub send_per_hour: u32,
    /// The MTA-STS mode the gateway's policy gives: testing, enforce, none.
    pub mta_sts_mode: String,
    /// Where mail clients reach this host (autoconfiguration).
    pub clients: crate::autoconfig::MailClients,
}

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// `smtp`: other servers hand over mail for local users.
    Mx,
    /// `submission`: clients send, STARTTLS then AUTH.
    Submission,
    /// `submissions`: clients send, TLS from the first byte.
    Submissions,
}

/// What the MX and submission need besides [`Shared`].
pub struct Mx {
    pub settings: MxSettings,
    pub spool: Arc<Spool>,
    /// The outbound queue: mail for other domains.
    pub outbound: Arc<Spool>,
    pub dkim: DkimKeys,
    pub checker: Checker,
    limits: Arc<limits::PerIp>,
    per_user: limits::Hourly<String>,
}

impl Mx {
    pub fn new(
        settings: MxSettings,
        spool: Arc<Spool>,
        outbound: Arc<Spool>,
        dkim: DkimKeys,
        checker: Checker,
    ) -> Mx {
        Mx {
            settings,
            spool,
            outbound,
            dkim,
            checker,
            limits: Arc::new(limits::PerIp::default()),
            per_user: limits::Hourly::default(),
        }
    }
}

/// Serves the MX on `listener` until `shutdown`; then idle sessions are
/// told 421 and closed, and a session in the middle of a message gets the
/// drain timeout to finish it.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    serve_as(Listener::Mx, listener, shared, shutdown).await
}

/// Serves submission with STARTTLS (like port 587), as [`serve`].
pub async fn serve_submission(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    serve_as(Listener::Submission, listener, shared, shutdown).await
}

/// Serves submission over TLS from the start (like port 465), as [`serve`].
pub async fn serve_submissions(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    serve_as(Listener::Submissions, listener, shared, shutdown).await
}

async fn serve_as(
    kind: Listener,
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let Some(mx) = shared.mx.clone() else {
        tracing::error!("{kind:?}: mail is not configured; not serving");
        return;
    };
    let protocol = match kind {
        Listener::Mx => "smtp",
        Listener::Submission => "submission",
        Listener::Submissions => "submissions",
    };
    let s = shared.clone();
    crate::accept_loop(
        listener,
        &shared,
        shutdown,
        protocol,
        move |tcp, peer, stop| {
            let slot = mx
                .limits
                .connect(peer.ip(), mx.settings.max_connections_per_ip);
            let (shared, mx) = (s.clone(), mx.clone());
            async move {
                let Some(slot) = slot else {
                    tracing::info!("too many connections from this address");
                    if kind != Listener::Submissions {
                        refuse(tcp, &mx.settings.hostname).await;
                    }
                    return;
                };
                connection::handle(tcp, peer, shared, mx, stop, kind).await;
                drop(slot);
            }
        },
    )
    .await
}

async fn refuse(mut tcp: tokio::net::TcpStream, hostname: &str) {
    let line =
        format!("421 4.7.0 {hostname} Too many connections from your address; try later\r\n");
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.write_all(line.as_bytes())).await;
}

/// The client's address as headers show it.
fn show_ip(peer: &SocketAddr) -> String {
    match peer.ip() {
        std::net::IpAddr::V4(ip) => ip.to_string(),
        std::net::IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => format!("IPv6:{ip}"),
        },
    }
}
