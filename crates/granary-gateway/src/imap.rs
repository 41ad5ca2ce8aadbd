//! IMAP: the `imaps` listener (TLS from the first byte, like port 993)
//! and the `imap` listener (STARTTLS, like port 143: LOGINDISABLED before
//! TLS, never PREAUTH).
//!
//! Before login the gateway speaks IMAP itself (`granary_wire::imap`):
//! CAPABILITY, ID, NOOP, LOGOUT, STARTTLS, LOGIN and AUTHENTICATE PLAIN.
//! A login takes an app password of kind `mail`; failures count against
//! the client's address and range in the shared limiter. Then the connection is
//! handed to the user's mail grain with the identity: the grain greets
//! with its capabilities, which go into the tagged OK of the login, and
//! from there on bytes pass through untouched. After STARTTLS, whatever
//! the client sent in clear behind it is thrown away.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use granary_grains::{GrainId, Identity, Peer};
use granary_wire::imap::{
    Command, Parsed, greeting_capabilities, parse, sasl_plain, sasl_response,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::{LoginRefused, Shared};

/// How long a client may take to log in.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(120);
/// Failed logins on one connection before it is closed.
const MAX_FAILURES: u32 = 3;
/// How long the mail grain may take to greet.
const GRAIN_GREETING: Duration = Duration::from_secs(30);

const CAPS_PLAIN: &str = "IMAP4rev1 IMAP4rev2 STARTTLS LOGINDISABLED LITERAL+ ID";
const CAPS_TLS: &str = "IMAP4rev1 IMAP4rev2 AUTH=PLAIN SASL-IR LITERAL+ ID";

/// Serves the `imap` listener (STARTTLS) until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    run(listener, shared, shutdown, false).await
}

/// Serves the `imaps` listener (implicit TLS) until `shutdown`.
pub async fn serve_tls(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    run(listener, shared, shutdown, true).await
}

async fn run(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
    implicit: bool,
) {
    let protocol = if implicit { "imaps" } else { "imap" };
    let s = shared.clone();
    crate::accept_loop(
        listener,
        &shared,
        shutdown,
        protocol,
        move |tcp, peer, stop| connection(tcp, peer, s.clone(), implicit, stop),
    )
    .await
}

/// A client that logged in.
struct LoggedIn {
    tag: String,
    user: String,
    credential: i64,
    /// What the client pipelined behind its login.
    leftover: Vec<u8>,
}

enum PreLogin {
    LoggedIn(LoggedIn),
    StartTls,
    Done,
}

struct Client {
    shared: Arc<Shared>,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
    failures: u32,
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    implicit: bool,
    stop: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let mut client = Client {
        shared: shared.clone(),
        peer,
        stop,
        failures: 0,
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(shared.tls.clone());
    let handshake = shared.settings.handshake_timeout;
    let mut tcp = tcp;
    if !implicit {
        let hello =
            format!("* OK [CAPABILITY {CAPS_PLAIN}] Granary IMAP ready; STARTTLS first\r\n");
        if tcp.write_all(hello.as_bytes()).await.is_err() {
            return;
        }
        match client.pre_login(&mut tcp, false).await {
            PreLogin::StartTls => {}
            // LOGIN is never taken in clear.
            PreLogin::LoggedIn(_) | PreLogin::Done => return,
        }
    }
    let mut tls = match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        _ => {
            tracing::debug!("TLS handshake failed or timed out");
            return;
        }
    };
    if implicit {
        let hello = format!("* OK [CAPABILITY {CAPS_TLS}] Granary IMAP ready\r\n");
        if tls.write_all(hello.as_bytes()).await.is_err() {
            return;
        }
    }
    let session = tls.get_ref().1;
    let server_name = session.server_name().unwrap_or("").to_owned();
    let tls_version = match session.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "",
    };
    let PreLogin::LoggedIn(login) = client.pre_login(&mut tls, true).await else {
        return;
    };
    let peer_info = Peer {
        address: peer.to_string(),
        protocol: if implicit { "imaps" } else { "imap" }.to_owned(),
        tls_version: tls_version.to_owned(),
        server_name,
    };
    hand_over(&shared, tls, login, peer_info).await;
}

impl Client {
    /// Speaks IMAP until the client logs in, asks for TLS, or leaves.
    async fn pre_login<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        tls: bool,
    ) -> PreLogin {
        let mut buf: Vec<u8> = Vec::new();
        let mut acked: Vec<usize> = Vec::new();
        let deadline = tokio::time::Instant::now() + LOGIN_TIMEOUT;
        loop {
            let reply = match parse(&buf) {
                Parsed::Incomplete => None,
                Parsed::Continue { at } => {
                    if !acked.contains(&at) {
                        acked.push(at);
                        if stream
                            .write_all(b"+ Ready for literal data\r\n")
                            .await
                            .is_err()
                        {
                            return PreLogin::Done;
                        }
                    }
                    None
                }
                Parsed::Bad {
                    tag,
                    why,
                    consumed,
                    close,
                } => {
                    buf.drain(..consumed.min(buf.len()));
                    acked.clear();
                    let line = format!("{tag} BAD {why}\r\n");
                    if stream.write_all(line.as_bytes()).await.is_err() || close {
                        return PreLogin::Done;
                    }
                    continue;
                }
                Parsed::Command {
                    tag,
                    command,
                    consumed,
                } => {
                    buf.drain(..consumed);
                    acked.clear();
                    Some((tag, command))
                }
            };
            let Some((tag, command)) = reply else {
                match self.read(stream, &mut buf, deadline).await {
                    Some(true) => continue,
                    Some(false) => return PreLogin::Done,
                    None => {
                        let _ = stream
                            .write_all(b"* BYE Granary is stopping or you were too slow\r\n")
                            .await;
                        return PreLogin::Done;
                    }
                }
            };
            let caps = if tls { CAPS_TLS } else { CAPS_PLAIN };
            let out = match command {
                Command::Capability => {
                    format!("* CAPABILITY {caps}\r\n{tag} OK CAPABILITY completed\r\n")
                }
                Command::Noop => format!("{tag} OK NOOP completed\r\n"),
                Command::Id => format!("* ID (\"name\" \"Granary\")\r\n{tag} OK ID completed\r\n"),
                Command::Logout => {
                    let bye = format!("* BYE Logging out\r\n{tag} OK LOGOUT completed\r\n");
                    let _ = stream.write_all(bye.as_bytes()).await;
                    return PreLogin::Done;
                }
                Command::StartTls if tls => format!("{tag} BAD TLS is already active\r\n"),
                Command::StartTls => {
                    let ok = format!("{tag} OK Begin TLS negotiation now\r\n");
                    // Whatever follows in `buf` came in clear: dropped.
                    let _ = stream.write_all(ok.as_bytes()).await;
                    return PreLogin::StartTls;
                }
                Command::Login { .. } | Command::Authenticate { .. } if !tls => {
                    format!("{tag} NO [PRIVACYREQUIRED] Use STARTTLS before logging in\r\n")
                }
                Command::Login { user, password } => {
                    match self.authenticate(&tag, &user, &password, &mut buf).await {
                        Ok(l) => return PreLogin::LoggedIn(l),
                        Err(line) => line,
                    }
                }
                Command::Authenticate { mechanism, .. } if mechanism != "PLAIN" => {
                    format!("{tag} NO [CANNOT] Only AUTHENTICATE PLAIN is offered\r\n")
                }
                Command::Authenticate { initial, .. } => {
                    let response = match initial {
                        Some(r) => Some(r),
                        None => {
                            if stream.write_all(b"+ \r\n").await.is_err() {
                                return PreLogin::Done;
                            }
                            match self.read_line(stream, &mut buf, deadline).await {
                                None => return PreLogin::Done,
                                Some(line) => match sasl_response(&line) {
                                    Ok(r) => r,
                                    Err(_) => {
                                        let bad =
                                            format!("{tag} BAD The response is not base64\r\n");
                                        if stream.write_all(bad.as_bytes()).await.is_err() {
                                            return PreLogin::Done;
                                        }
                                        continue;
                                    }
                                },
                            }
                        }
                    };
                    match response.map(|r| sasl_plain(&r)) {
                        None => format!("{tag} BAD AUTHENTICATE cancelled\r\n"),
                        Some(None) => {
                            self.failures += 1;
                            format!("{tag} NO [AUTHENTICATIONFAILED] Invalid credentials\r\n")
                        }
                        Some(Some((user, password))) => {
                            match self.authenticate(&tag, &user, &password, &mut buf).await {
                                Ok(l) => return PreLogin::LoggedIn(l),
                                Err(line) => line,
                            }
                        }
                    }
                }
                Command::NeedsLogin(name) => format!("{tag} BAD {name} needs a login first\r\n"),
            };
            if stream.write_all(out.as_bytes()).await.is_err() {
                return PreLogin::Done;
            }
            if self.failures >= MAX_FAILURES {
                let _ = stream.write_all(b"* BYE Too many failed logins\r\n").await;
                return PreLogin::Done;
            }
        }
    }

    /// Reads more; `Some(false)` at the end of input, `None` when the
    /// login deadline passed or the server is stopping.
    async fn read<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        buf: &mut Vec<u8>,
        deadline: tokio::time::Instant,
    ) -> Option<bool> {
        match crate::read_more(stream, buf, deadline, &self.stop).await {
            crate::ReadMore::More => Some(true),
            crate::ReadMore::Ended => Some(false),
            crate::ReadMore::TooSlow | crate::ReadMore::Stopping => None,
        }
    }

    async fn read_line<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        buf: &mut Vec<u8>,
        deadline: tokio::time::Instant,
    ) -> Option<Vec<u8>> {
        loop {
            if let Some(p) = buf.iter().position(|&b| b == b'\n') {
                return Some(buf.drain(..=p).collect());
            }
            if buf.len() > granary_wire::imap::MAX_PRE_LOGIN {
                return None;
            }
            if self.read(stream, buf, deadline).await != Some(true) {
                return None;
            }
        }
    }

    /// Checks a mail app password; the refusal line when it does not.
    async fn authenticate(
        &mut self,
        tag: &str,
        login: &str,
        password: &str,
        buf: &mut Vec<u8>,
    ) -> Result<LoggedIn, String> {
        match self
            .shared
            .mail_login(self.peer.ip(), login, password)
            .await
        {
            Ok((user, cred)) => {
                tracing::Span::current().record("user", user.as_str());
                tracing::info!(credential = cred.id, "logged in");
                Ok(LoggedIn {
                    tag: tag.to_owned(),
                    user,
                    credential: cred.id,
                    leftover: std::mem::take(buf),
                })
            }
            Err(LoginRefused::Limited) => Err(format!(
                "{tag} NO [UNAVAILABLE] Too many failed logins; try again in a few minutes\r\n"
            )),
            Err(LoginRefused::Invalid) => {
                self.failures += 1;
                Err(format!(
                    "{tag} NO [AUTHENTICATIONFAILED] Invalid credentials\r\n"
                ))
            }
        }
    }
}

/// Connects the client to its mail grain and passes bytes both ways.
async fn hand_over<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    mut client: S,
    login: LoggedIn,
    peer: Peer,
) {
    let tag = &login.tag;
    let grain = match GrainId::for_user(&login.user, "mail") {
        Ok(g) => g,
        Err(_) => {
            let _ = client
                .write_all(
                    format!("{tag} NO [UNAVAILABLE] No mailbox for this user\r\n").as_bytes(),
                )
                .await;
            return;
        }
    };
    let identity = Identity::new(
        &login.user,
        granary_grains::AuthMethod::AppPassword,
        login.credential,
    );
    let conn = match shared.grains.connect(&grain, "imap", identity, peer).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot reach the mail grain");
            let why = if e.retry_safe() {
                "try again in a moment"
            } else {
                "ask your admin"
            };
            let _ = client
                .write_all(
                    format!("{tag} NO [UNAVAILABLE] Your mailbox is not available; {why}\r\n")
                        .as_bytes(),
                )
                .await;
            return;
        }
    };
    let keep = conn.keep;
    let grain_stream = match conn
        .stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(conn.stream))
    {
        Ok(s) => s,
        Err(_) => return,
    };
    let mut grain_stream = grain_stream;
    let mut greeting = Vec::new();
    let read = tokio::time::timeout(GRAIN_GREETING, async {
        let mut chunk = [0u8; 1024];
        while !greeting.contains(&b'\n') && greeting.len() < 4096 {
            let n = grain_stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            greeting.extend_from_slice(&chunk[..n]);
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
    let line_end = greeting.iter().position(|&b| b == b'\n').map(|p| p + 1);
    let caps = match (read, line_end) {
        (Ok(Ok(())), Some(end)) => greeting_capabilities(&greeting[..end]),
        _ => None,
    };
    let Some(caps) = caps else {
        tracing::warn!("the mail grain did not greet");
        let _ = client
            .write_all(
                format!("{tag} NO [UNAVAILABLE] Your mailbox did not answer; try again\r\n")
                    .as_bytes(),
            )
            .await;
        return;
    };
    let mut ok = format!("{tag} OK [CAPABILITY {caps}] Logged in\r\n").into_bytes();
    // Anything the grain sent after its greeting follows the OK.
    ok.extend_from_slice(&greeting[line_end.unwrap_or(greeting.len())..]);
    if client.write_all(&ok).await.is_err() {
        return;
    }
    if !login.leftover.is_empty() && grain_stream.write_all(&login.leftover).await.is_err() {
        return;
    }
    crate::splice(client, grain_stream, 8 << 10).await;
    drop(keep);
}
