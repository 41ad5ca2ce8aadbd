//! XMPP clients: the `xmpp` listener (STARTTLS, like port 5222; TLS is
//! required before SASL) and `xmpps` (TLS from the first byte, like 5223,
//! ALPN `xmpp-client`, XEP-0368).
//!
//! Before login the gateway speaks the stream itself
//! (`granary_wire::xmpp`): the header, STARTTLS and SASL with
//! SCRAM-SHA-256, SCRAM-SHA-1 and PLAIN (over TLS only; SCRAM-*-PLUS is
//! not offered, as channel binding is not done). A login takes an app
//! password of kind `xmpp`: SCRAM checks the client's proof against the
//! stored verifiers of every such password (one salt per user and
//! mechanism makes that possible), PLAIN against their argon2 hashes.
//! Failures count against the client's address and range in the shared limiter.
//! After `<success/>` the connection goes to the user's chat grain with
//! the identity; the client's restarted stream header is the first thing
//! the grain reads.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use granary_grains::{GrainId, Identity, Peer};
use granary_wire::scram::{self, Hash, Verifier};
use granary_wire::stanza::escape;
use granary_wire::xmpp::{NS_SASL, Unit, XmppError, parse, stream_error};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::Shared;

mod register;

/// How long a client may take to log in.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(120);
/// Failed logins on one connection before it is closed.
const MAX_FAILURES: u32 = 3;

/// Serves the `xmpp` listener (STARTTLS) until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    run(listener, shared, shutdown, false).await
}

/// Serves the `xmpps` listener (direct TLS) until `shutdown`.
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
    // The same certificates; ALPN names XMPP, not HTTP (XEP-0368).
    let mut config = (*shared.tls).clone();
    config.alpn_protocols = vec![b"xmpp-client".to_vec()];
    let tls = Arc::new(config);
    let protocol = if implicit { "xmpps" } else { "xmpp" };
    // A key for the salts of users who do not exist, so a SCRAM exchange
    // for one looks like any other: derived from the host key SSH serves
    // (a secret kept across restarts), the same on every listener.
    let decoy = Arc::new(decoy_key(&shared));
    let s = shared.clone();
    crate::accept_loop(
        listener,
        &shared,
        shutdown,
        protocol,
        move |tcp, peer, stop| {
            let client = Client {
                shared: s.clone(),
                domain: None,
                peer,
                stop,
                failures: 0,
                buf: Vec::new(),
                deadline: tokio::time::Instant::now() + LOGIN_TIMEOUT,
                decoy: decoy.clone(),
                invite: None,
                registered: false,
            };
            client.connection(tcp, tls.clone(), implicit)
        },
    )
    .await
}

fn decoy_key(shared: &Shared) -> ring::hmac::Key {
    let secret = match shared.ssh_host_key.to_bytes() {
        Ok(bytes) => ring::digest::digest(&ring::digest::SHA256, &bytes)
            .as_ref()
            .to_vec(),
        Err(_) => {
            let mut key = vec![0u8; 32];
            let _ = getrandom::fill(&mut key);
            key
        }
    };
    let mut tagged = b"granary xmpp scram decoy salts\0".to_vec();
    tagged.extend_from_slice(&secret);
    let key = ring::digest::digest(&ring::digest::SHA256, &tagged);
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_ref())
}

struct Client {
    shared: Arc<Shared>,
    /// The chat domain the client's stream is to, once it named one of ours.
    domain: Option<String>,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
    failures: u32,
    buf: Vec<u8>,
    deadline: tokio::time::Instant,
    decoy: Arc<ring::hmac::Key>,
    /// The invite token a `<preauth/>` showed valid, for the registration
    /// that follows.
    invite: Option<String>,
    /// An account was made on this connection (one at most).
    registered: bool,
}

/// Who logged in.
struct LoggedIn {
    user: String,
    credential: i64,
}

enum Step {
    /// Go on reading units.
    Next,
    /// The stream ended or failed; the connection closes.
    Close,
}

/// Our stream header, with a fresh stream id.
fn stream_header(domain: &str) -> String {
    let mut id = [0u8; 12];
    let _ = getrandom::fill(&mut id);
    granary_wire::xmpp::stream_header(
        domain,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id),
    )
}

fn sasl_failure(condition: &str, text: &str) -> String {
    format!(
        "<failure xmlns='{NS_SASL}'><{condition}/><text xml:lang='en'>{}</text></failure>",
        escape(text)
    )
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

impl Client {
    async fn connection(
        mut self,
        mut tcp: TcpStream,
        tls: Arc<rustls::ServerConfig>,
        implicit: bool,
    ) {
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let handshake = self.shared.settings.handshake_timeout;
        if !implicit {
            match self.before_tls(&mut tcp).await {
                Step::Next => {}
                Step::Close => return,
            }
        }
        let mut tls = match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            _ => {
                tracing::debug!("TLS handshake failed or timed out");
                return;
            }
        };
        // What came in clear after <starttls/> is not trusted.
        self.buf.clear();
        let session = tls.get_ref().1;
        let server_name = session.server_name().unwrap_or("").to_owned();
        let tls_version = match session.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "",
        };
        let Some(login) = self.login(&mut tls).await else {
            return;
        };
        let peer = Peer {
            address: self.peer.to_string(),
            protocol: if implicit { "xmpps" } else { "xmpp" }.to_owned(),
            tls_version: tls_version.to_owned(),
            server_name,
        };
        let leftover = std::mem::take(&mut self.buf);
        let domain = self
            .domain
            .clone()
            .unwrap_or_else(|| self.shared.domain.clone());
        hand_over(&self.shared, &domain, tls, login, peer, leftover).await;
    }

    /// The next unit, reading as needed; `Err` with the stream error to
    /// send when the stream must end.
    async fn unit<S: AsyncRead + Unpin>(&mut self, stream: &mut S) -> Result<Unit, Option<String>> {
        loop {
            let ws = self
                .buf
                .iter()
                .take_while(|b| b.is_ascii_whitespace())
                .count();
            self.buf.drain(..ws);
            match parse(&self.buf) {
                Ok(Some((unit, n))) => {
                    self.buf.drain(..n);
                    return Ok(unit);
                }
                Ok(None) => {}
                Err(XmppError::TooLarge) => {
                    return Err(Some(stream_error(
                        "policy-violation",
                        "that is too large before login",
                    )));
                }
                Err(e) => return Err(Some(stream_error("not-well-formed", &e.to_string()))),
            }
            match crate::read_more(stream, &mut self.buf, self.deadline, &self.stop).await {
                crate::ReadMore::More => {}
                crate::ReadMore::Ended => return Err(None),
                crate::ReadMore::TooSlow => {
                    return Err(Some(stream_error(
                        "connection-timeout",
                        "too slow to log in",
                    )));
                }
                crate::ReadMore::Stopping => {
                    return Err(Some(stream_error("system-shutdown", "Granary is stopping")));
                }
            }
        }
    }

    /// Reads the client's stream header and answers with ours and
    /// `features`; `Close` if the header is bad (after saying why).
    async fn open<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        features: &str,
    ) -> Step {
        let unit = self.unit(stream).await;
        // The domain the client asked for, when it is one of ours (the
        // same on every header of one connection).
        let asked = match &unit {
            Ok(Unit::StreamHeader { to: Some(to), .. }) => Some(to.to_ascii_lowercase()),
            _ => None,
        };
        let served = match (&asked, &self.domain) {
            (Some(a), Some(d)) => a == d,
            (Some(a), None) => self.shared.chat_domains.serves(a).await,
            _ => false,
        };
        if served {
            self.domain = asked;
        }
        let header = stream_header(self.domain.as_deref().unwrap_or(&self.shared.domain));
        let error = match unit {
            Ok(Unit::StreamHeader { default_ns, .. }) => {
                let ours = served;
                if default_ns.as_deref() != Some(granary_wire::xmpp::NS_CLIENT) {
                    Some(stream_error(
                        "invalid-namespace",
                        "this is a client stream: jabber:client",
                    ))
                } else if !ours {
                    Some(stream_error(
                        "host-unknown",
                        "that domain is not served here",
                    ))
                } else {
                    None
                }
            }
            Ok(_) => Some(stream_error(
                "not-well-formed",
                "a stream starts with its header",
            )),
            Err(None) => return Step::Close,
            Err(Some(e)) => Some(e),
        };
        let failed = error.is_some();
        let out = match error {
            None => format!("{header}<stream:features>{features}</stream:features>"),
            Some(e) => format!("{header}{e}"),
        };
        match stream.write_all(out.as_bytes()).await {
            Ok(()) if !failed => Step::Next,
            _ => Step::Close,
        }
    }

    /// The plain stream of the `xmpp` listener, up to `<proceed/>`.
    async fn before_tls(&mut self, tcp: &mut TcpStream) -> Step {
        let starttls = "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>";
        if let Step::Close = self.open(tcp, starttls).await {
            return Step::Close;
        }
        let out = match self.unit(tcp).await {
            Ok(Unit::StartTls) => {
                let ok = tcp
                    .write_all(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
                    .await
                    .is_ok();
                return if ok { Step::Next } else { Step::Close };
            }
            Ok(Unit::StreamEnd) => "</stream:stream>".to_owned(),
            Ok(_) => stream_error("policy-violation", "use STARTTLS before logging in"),
            Err(None) => return Step::Close,
            Err(Some(e)) => e,
        };
        let _ = tcp.write_all(out.as_bytes()).await;
        Step::Close
    }

    /// SASL over TLS, until a login succeeds or the stream ends.
    async fn login<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
    ) -> Option<LoggedIn> {
        let mechanisms = format!(
            "<mechanisms xmlns='{NS_SASL}'><mechanism>SCRAM-SHA-256</mechanism>\
             <mechanism>SCRAM-SHA-1</mechanism><mechanism>PLAIN</mechanism></mechanisms>{}",
            register::FEATURES
        );
        if let Step::Close = self.open(stream, &mechanisms).await {
            return None;
        }
        loop {
            let outcome = match self.unit(stream).await {
                Ok(Unit::Auth { mechanism, initial }) => {
                    let hash = match mechanism.as_str() {
                        "SCRAM-SHA-256" => Some(Hash::Sha256),
                        "SCRAM-SHA-1" => Some(Hash::Sha1),
                        "PLAIN" => None,
                        _ => {
                            let f = sasl_failure(
                                "invalid-mechanism",
                                "use SCRAM-SHA-256, SCRAM-SHA-1 or PLAIN",
                            );
                            if stream.write_all(f.as_bytes()).await.is_err() {
                                return None;
                            }
                            continue;
                        }
                    };
                    let initial = match initial {
                        Some(data) => Some(data),
                        None => self.response(stream, "=").await?,
                    };
                    match (initial, hash) {
                        (None, _) => Err(sasl_failure("aborted", "")),
                        (Some(data), None) => self.plain(&data).await,
                        (Some(data), Some(hash)) => self.scram(stream, hash, &data).await?,
                    }
                }
                Ok(Unit::Abort) => Err(sasl_failure("aborted", "")),
                Ok(Unit::Iq(el)) => match self.iq(stream, el).await {
                    Step::Next => continue,
                    Step::Close => return None,
                },
                Ok(Unit::StreamEnd) => {
                    let _ = stream.write_all(b"</stream:stream>").await;
                    return None;
                }
                Ok(_) => {
                    let e = stream_error("not-authorized", "log in first");
                    let _ = stream.write_all(e.as_bytes()).await;
                    return None;
                }
                Err(None) => return None,
                Err(Some(e)) => {
                    let _ = stream.write_all(e.as_bytes()).await;
                    return None;
                }
            };
            match outcome {
                Ok((login, success)) => {
                    if stream.write_all(success.as_bytes()).await.is_err() {
                        return None;
                    }
                    tracing::Span::current().record("user", login.user.as_str());
                    tracing::info!(credential = login.credential, "logged in");
                    return Some(login);
                }
                Err(failure) => {
                    if stream.write_all(failure.as_bytes()).await.is_err() {
                        return None;
                    }
                    if self.failures >= MAX_FAILURES {
                        let e = stream_error("policy-violation", "too many failed logins");
                        let _ = stream.write_all(e.as_bytes()).await;
                        return None;
                    }
                }
            }
        }
    }

    /// Sends a challenge and reads the client's response: `Some(None)`
    /// when it aborted, `None` when the stream ended.
    async fn response<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        challenge: &str,
    ) -> Option<Option<Vec<u8>>> {
        let c = format!("<challenge xmlns='{NS_SASL}'>{challenge}</challenge>");
        stream.write_all(c.as_bytes()).await.ok()?;
        match self.unit(stream).await {
            Ok(Unit::Response(data)) => Some(Some(data)),
            Ok(Unit::Abort) => Some(None),
            Ok(_) => {
                let e = stream_error("not-authorized", "the SASL exchange was not finished");
                let _ = stream.write_all(e.as_bytes()).await;
                None
            }
            Err(e) => {
                if let Some(e) = e {
                    let _ = stream.write_all(e.as_bytes()).await;
                }
                None
            }
        }
    }

    /// The user a SASL name stands for: the localpart, or a bare JID of
    /// the domain this stream is to.
    fn user_of(&self, name: &str) -> Option<String> {
        let domain = self.domain.as_deref().unwrap_or(&self.shared.domain);
        let local = match name.rsplit_once('@') {
            Some((l, d)) if d.eq_ignore_ascii_case(domain) => l,
            Some(_) => return None,
            None => name,
        };
        Some(local.to_lowercase()).filter(|l| !l.is_empty() && l.len() <= 64)
    }

    async fn refused(&mut self, user: Option<&str>) -> String {
        self.failures += 1;
        if let Some(user) = user {
            self.shared.login_failed_as(self.peer.ip(), user).await;
        }
        tracing::info!(user = user.unwrap_or(""), "login failed");
        sasl_failure("not-authorized", "wrong name or password")
    }

    fn limited(&self, user: &str) -> Option<String> {
        if self.shared.source_refused(self.peer.ip()) {
            tracing::info!(user, "login refused: too many recent failures");
            return Some(sasl_failure(
                "temporary-auth-failure",
                "too many failed logins; try again in a few minutes",
            ));
        }
        None
    }

    /// PLAIN (RFC 4616): `authzid NUL authcid NUL password`.
    async fn plain(&mut self, data: &[u8]) -> Result<(LoggedIn, String), String> {
        let mut parts = data.split(|&b| b == 0);
        let (Some(authz), Some(authc), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            self.failures += 1;
            return Err(sasl_failure(
                "malformed-request",
                "PLAIN is authzid NUL name NUL password",
            ));
        };
        let (Ok(authz), Ok(authc), Ok(password)) = (
            std::str::from_utf8(authz),
            std::str::from_utf8(authc),
            std::str::from_utf8(password),
        ) else {
            self.failures += 1;
            return Err(sasl_failure("malformed-request", "not UTF-8"));
        };
        let Some(user) = scram::saslprep(authc).ok().and_then(|n| self.user_of(&n)) else {
            return Err(self.refused(None).await);
        };
        if !authz.is_empty() && self.user_of(authz).as_deref() != Some(user.as_str()) {
            self.failures += 1;
            return Err(sasl_failure(
                "invalid-authzid",
                "you can only log in as yourself",
            ));
        }
        if let Some(f) = self.limited(&user) {
            return Err(f);
        }
        match self.shared.check_password(&user, "xmpp", password).await {
            Some(cred) => Ok((
                LoggedIn {
                    user,
                    credential: cred.id,
                },
                format!("<success xmlns='{NS_SASL}'/>"),
            )),
            None => Err(self.refused(Some(&user)).await),
        }
    }

    /// SCRAM (RFC 5802, RFC 7677): `Ok(None)` when the stream ended.
    async fn scram<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        hash: Hash,
        data: &[u8],
    ) -> Option<Result<(LoggedIn, String), String>> {
        let first = match scram::parse_client_first(data) {
            Ok(f) => f,
            Err(scram::ScramError::ChannelBinding) => {
                self.failures += 1;
                return Some(Err(sasl_failure(
                    "encryption-required",
                    "channel binding is not offered",
                )));
            }
            Err(e) => {
                self.failures += 1;
                return Some(Err(sasl_failure("malformed-request", &e.to_string())));
            }
        };
        let Some(user) = self.user_of(&first.username) else {
            return Some(Err(self.refused(None).await));
        };
        if first
            .authzid
            .as_deref()
            .is_some_and(|a| self.user_of(a).as_deref() != Some(user.as_str()))
        {
            self.failures += 1;
            return Some(Err(sasl_failure(
                "invalid-authzid",
                "you can only log in as yourself",
            )));
        }
        if let Some(f) = self.limited(&user) {
            return Some(Err(f));
        }
        // Every device's verifier with the salt the first one has: after
        // the first password, a user's passwords share it.
        let stored = self.shared.directory.scram_verifiers(&user, "xmpp").await;
        let mut candidates: Vec<(i64, Verifier)> = Vec::new();
        for (id, text) in &stored {
            for v in text.lines().filter_map(|l| Verifier::decode(l).ok()) {
                let same_salt = candidates
                    .first()
                    .is_none_or(|(_, c)| c.salt == v.salt && c.iterations == v.iterations);
                if v.hash == hash && same_salt {
                    candidates.push((*id, v));
                }
            }
        }
        let shown = match candidates.first() {
            Some((_, v)) => v.clone(),
            None => self.decoy_verifier(hash, &user),
        };
        let mut nonce = [0u8; 18];
        let _ = getrandom::fill(&mut nonce);
        let server_first = scram::server_first(&first, &b64(&nonce), &shown);
        let final_msg = match self.response(stream, &b64(server_first.as_bytes())).await {
            None => return None,
            // Aborted: not a failed password.
            Some(None) => return Some(Err(sasl_failure("aborted", ""))),
            Some(Some(m)) => m,
        };
        for (id, v) in &candidates {
            if let Ok(server_final) =
                scram::verify_client_final(&first, &server_first, &final_msg, v)
            {
                return Some(Ok((
                    LoggedIn {
                        user,
                        credential: *id,
                    },
                    format!(
                        "<success xmlns='{NS_SASL}'>{}</success>",
                        b64(server_final.as_bytes())
                    ),
                )));
            }
        }
        Some(Err(self.refused(Some(&user)).await))
    }

    /// A verifier that matches no password, with a salt that is the same
    /// for the same name every time (as a real one would be).
    fn decoy_verifier(&self, hash: Hash, user: &str) -> Verifier {
        let tag = ring::hmac::sign(
            &self.decoy,
            format!("{}:{user}", hash.mechanism()).as_bytes(),
        );
        let salt = tag.as_ref()[..16].to_vec();
        Verifier {
            hash,
            salt,
            iterations: scram::ITERATIONS,
            stored_key: vec![0; hash.len()],
            server_key: vec![0; hash.len()],
        }
    }
}

/// Connects the client to its chat grain and passes bytes both ways.
async fn hand_over<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    domain: &str,
    mut client: S,
    login: LoggedIn,
    peer: Peer,
    leftover: Vec<u8>,
) {
    let unavailable = |why: &str| {
        format!(
            "{}{}",
            stream_header(domain),
            stream_error("internal-server-error", why)
        )
    };
    let Ok(grain) = GrainId::for_user(&login.user, "xmpp") else {
        let _ = client
            .write_all(unavailable("no chat account for this user").as_bytes())
            .await;
        return;
    };
    let identity = Identity::new(
        &login.user,
        granary_grains::AuthMethod::AppPassword,
        login.credential,
    );
    let conn = match shared.grains.connect(&grain, "xmpp", identity, peer).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot reach the chat grain");
            let _ = client
                .write_all(unavailable("your chat account is not available; try again").as_bytes())
                .await;
            return;
        }
    };
    let keep = conn.keep;
    let Ok(mut grain_stream) = conn
        .stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(conn.stream))
    else {
        return;
    };
    if !leftover.is_empty() && grain_stream.write_all(&leftover).await.is_err() {
        return;
    }
    crate::splice(client, grain_stream, 4 << 10).await;
    drop(keep);
}
