//! One SMTP connection, on the MX or a submission listener: the sans-IO
//! session driven over TCP, then over TLS after STARTTLS (or over TLS from
//! the start on `submissions`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use granary_spool::{Envelope, Incoming, Recipient, Spool};
use granary_wire::smtp::headers::{fields, header_block, own_auth_results, remove_ranges};
use granary_wire::smtp::{Event, Limits, Reply, Session};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{Listener, Mx, show_ip};
use crate::{LoginRefused, MailRecipient, Shared};

/// More `Received` fields than this is a mail loop (RFC 5321 §6.3).
const MAX_HOPS: usize = 100;

/// The largest header block taken (Postfix's `header_size_limit` is
/// 100 KiB); real mail stays far below, and every check reads it.
const MAX_HEADER_BYTES: usize = 256 << 10;
/// How much the driver reads at a time.
const READ: usize = 16 << 10;

/// Why a connection ended.
enum End {
    /// The client or the session closed it.
    Closed,
    /// STARTTLS: upgrade this stream.
    StartTls,
}

/// What one connection carries between transactions.
struct Conn {
    listener: Listener,
    shared: Arc<Shared>,
    mx: Arc<Mx>,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
    /// Recipients accepted so far, and the user each reaches.
    users: HashMap<String, String>,
    /// Recipients on other domains (submission only).
    remote: Vec<String>,
    incoming: Option<Incoming>,
}

pub(super) async fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mx: Arc<Mx>,
    stop: watch::Receiver<bool>,
    listener: Listener,
) {
    let _ = tcp.set_nodelay(true);
    let settings = &mx.settings;
    let submission = listener != Listener::Mx;
    let mut session = Session::new(Limits {
        hostname: settings.hostname.clone(),
        max_message_bytes: settings.max_message_bytes,
        max_recipients: if submission {
            settings.send_max_recipients as usize
        } else {
            settings.max_recipients as usize
        },
        starttls: listener != Listener::Submissions,
        submission,
    });
    let mut conn = Conn {
        listener,
        shared,
        mx: mx.clone(),
        peer,
        stop,
        users: HashMap::new(),
        remote: Vec::new(),
        incoming: None,
    };
    let mut tcp = tcp;
    if listener != Listener::Submissions {
        if tcp.write_all(&session.greeting().to_bytes()).await.is_err() {
            return;
        }
        match conn.drive(&mut tcp, &mut session).await {
            Ok(End::StartTls) => {}
            Ok(End::Closed) => return,
            Err(e) => {
                tracing::debug!(error = %e, "smtp connection ended");
                return;
            }
        }
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(conn.shared.tls.clone());
    let handshake = conn.shared.settings.handshake_timeout;
    let mut tls = match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            return;
        }
    };
    session.tls_started();
    if listener == Listener::Submissions
        && tls.write_all(&session.greeting().to_bytes()).await.is_err()
    {
        return;
    }
    match conn.drive(&mut tls, &mut session).await {
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "smtp connection ended"),
    }
    let _ = tls.shutdown().await;
}

impl Conn {
    /// Runs the session over `stream` until it closes or asks for TLS.
    /// Input buffered here is dropped on return: after STARTTLS, whatever
    /// came in clear is never looked at.
    async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        session: &mut Session,
    ) -> std::io::Result<End> {
        let mut buf: Vec<u8> = Vec::with_capacity(READ);
        let mut start = 0;
        let mut out: Vec<u8> = Vec::new();
        loop {
            let (used, event) = session.step(&buf[start..]);
            start += used;
            match event {
                Event::NeedMore => {
                    if !out.is_empty() {
                        stream.write_all(&out).await?;
                        out.clear();
                    }
                    buf.drain(..start);
                    start = 0;
                    if !self.read_more(stream, session, &mut buf).await? {
                        return Ok(End::Closed);
                    }
                }
                Event::Reply(r) => r.write(&mut out),
                Event::StartTls(r) => {
                    r.write(&mut out);
                    stream.write_all(&out).await?;
                    return Ok(End::StartTls);
                }
                Event::Sender(from) => {
                    let verdict = self.sender(&from, session.user()).await;
                    session.sender_verdict(&from, verdict).write(&mut out);
                }
                Event::Auth { login, password } => {
                    let verdict = self.login(&login, &password.0).await;
                    session.auth_verdict(verdict).write(&mut out);
                }
                Event::Recipient(to) => {
                    let verdict = self.recipient(&to).await;
                    session.recipient_verdict(&to, verdict).write(&mut out);
                }
                Event::Data(bytes) => {
                    let incoming = self
                        .incoming
                        .get_or_insert_with(|| self.mx.spool.incoming());
                    if let Err(e) = incoming.write(&bytes).await {
                        tracing::error!(error = %e, "cannot spool incoming data");
                        Reply::new(451, "4.3.0", "Local error; try again later").write(&mut out);
                        stream.write_all(&out).await?;
                        return Ok(End::Closed);
                    }
                }
                Event::MessageEnd { too_big } => {
                    let reply = self.message_end(session, too_big).await;
                    session.message_done();
                    reply.write(&mut out);
                }
                Event::Close(r) => {
                    r.write(&mut out);
                    stream.write_all(&out).await?;
                    let _ = stream.shutdown().await;
                    return Ok(End::Closed);
                }
            }
        }
    }

    /// Reads more input with the timeout the session's state calls for;
    /// `false` at the end of input. An idle session of a stopping server
    /// is told 421 and ends.
    async fn read_more<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        session: &Session,
        buf: &mut Vec<u8>,
    ) -> std::io::Result<bool> {
        let settings = &self.mx.settings;
        let timeout = if session.receiving() {
            settings.data_timeout
        } else {
            settings.command_timeout
        };
        let old = buf.len();
        buf.resize(old + READ, 0);
        let idle = session.idle();
        let mut stop = self.stop.clone();
        let stopping = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let read = tokio::select! {
            r = tokio::time::timeout(timeout, stream.read(&mut buf[old..])) => r,
            () = stopping, if idle => {
                buf.truncate(old);
                let bye = Reply::new(421, "4.3.2", format!("{} Service shutting down", settings.hostname));
                stream.write_all(&bye.to_bytes()).await?;
                return Ok(false);
            }
        };
        let n = match read {
            Ok(r) => r?,
            Err(_) => {
                buf.truncate(old);
                let bye = Reply::new(
                    421,
                    "4.4.2",
                    format!("{} Timeout; closing", settings.hostname),
                );
                stream.write_all(&bye.to_bytes()).await?;
                return Ok(false);
            }
        };
        buf.truncate(old + n);
        Ok(n > 0)
    }

    /// AUTH on a submission listener: a mail app password.
    async fn login(&mut self, login: &str, password: &str) -> Result<String, Reply> {
        match self
            .shared
            .mail_login(self.peer.ip(), login, password)
            .await
        {
            Ok((user, cred)) => {
                tracing::Span::current().record("user", user.as_str());
                tracing::info!(user, credential = cred.id, "logged in");
                Ok(user)
            }
            Err(LoginRefused::Limited) => Err(Reply::new(
                454,
                "4.7.0",
                "Too many failed logins; try again in a few minutes",
            )),
            Err(LoginRefused::Invalid) => Err(Reply::new(
                535,
                "5.7.8",
                "Authentication credentials invalid",
            )),
        }
    }

    async fn sender(&mut self, from: &str, user: Option<&str>) -> Result<(), Reply> {
        self.users.clear();
        self.remote.clear();
        self.incoming = None;
        let s = &self.mx.settings;
        if self.listener == Listener::Mx {
            if !self
                .mx
                .limits
                .may_send(self.peer.ip(), s.max_messages_per_ip)
            {
                tracing::info!("message rate limit reached for this address");
                return Err(Reply::new(
                    451,
                    "4.7.1",
                    "Too many messages from your address this hour; try later",
                ));
            }
            return Ok(());
        }
        // Submission: the session asks for AUTH before MAIL.
        let Some(user) = user else {
            return Err(Reply::new(530, "5.7.0", "Authentication required"));
        };
        if !self.mx.per_user.may(&user.to_owned(), s.send_per_hour) {
            tracing::info!(user, "send rate limit reached");
            return Err(Reply::new(
                451,
                "4.7.1",
                format!(
                    "You sent {} messages this hour, the most allowed; try later",
                    s.send_per_hour
                ),
            ));
        }
        if self.owns(user, from).await {
            Ok(())
        } else {
            tracing::info!(user, from, "refused a sender that is not the user's");
            Err(Reply::new(
                553,
                "5.7.1",
                format!("<{from}>: not one of your addresses"),
            ))
        }
    }

    /// Whether `user` may send as `address` (theirs by name, tag or alias).
    async fn owns(&self, user: &str, address: &str) -> bool {
        !address.is_empty()
            && self
                .shared
                .directory
                .mail_sender_owner(address)
                .await
                .as_deref()
                == Some(user)
    }

    async fn recipient(&mut self, to: &str) -> Result<(), Reply> {
        match self.shared.directory.mail_recipient(to).await {
            MailRecipient::User(user) => {
                self.users.insert(to.to_owned(), user);
                Ok(())
            }
            MailRecipient::Unknown => Err(Reply::new(
                550,
                "5.1.1",
                format!("<{to}>: no such user here"),
            )),
            MailRecipient::NotLocal if self.listener == Listener::Mx => Err(Reply::new(
                550,
                "5.7.1",
                format!("<{to}>: relaying denied; this server takes mail only for its own domains"),
            )),
            MailRecipient::NotLocal => {
                // Submission, logged in: ours to send on.
                self.remote.push(to.to_owned());
                Ok(())
            }
            MailRecipient::TryLater => Err(Reply::new(
                451,
                "4.3.0",
                format!("<{to}>: cannot look up this address now; try later"),
            )),
        }
    }

    async fn message_end(&mut self, session: &Session, too_big: bool) -> Reply {
        let incoming = self.incoming.take();
        if too_big {
            return Reply::new(
                552,
                "5.3.4",
                format!(
                    "Message too big: this server takes at most {} bytes",
                    self.mx.settings.max_message_bytes
                ),
            );
        }
        let message = match incoming {
            Some(i) => match i.finish().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the incoming message back");
                    return Reply::new(451, "4.3.0", "Local error; try again later");
                }
            },
            None => Vec::new(),
        };
        let from = session.sender().unwrap_or("").to_owned();
        let helo = session.helo().unwrap_or("").to_owned();
        let recipients: Vec<Recipient> = session
            .recipients()
            .iter()
            .filter_map(|a| {
                self.users.get(a).map(|u| Recipient {
                    address: a.clone(),
                    user: u.clone(),
                })
            })
            .collect();
        if header_block(&message).len() > MAX_HEADER_BYTES {
            return Reply::new(552, "5.3.4", "Message header too large");
        }
        let fields = fields(&message);
        let count = |name: &[u8]| {
            fields
                .iter()
                .filter(|(_, n)| n.eq_ignore_ascii_case(name))
                .count()
        };
        let (hops, froms, dates, ids) = (
            count(b"Received"),
            count(b"From"),
            count(b"Date"),
            count(b"Message-ID"),
        );
        drop(fields);
        if hops > MAX_HOPS {
            return Reply::new(554, "5.4.6", "Too many hops: a mail loop");
        }
        // RFC 5322 allows one From; with two, DMARC could check one while
        // the reader sees the other (RFC 7489 §6.6.1 says reject).
        if froms > 1 {
            return Reply::new(550, "5.7.1", "More than one From header field");
        }
        let ip = self.peer.ip();
        let hostname = self.mx.settings.hostname.clone();
        let id = Spool::new_id();
        let now = unix_now();
        let user = session.user().map(str::to_owned);
        let mut added = String::new();
        let mut sign_domain = None;
        let sender_verified;
        let mut message = message;
        if let Some(user) = &user {
            // Submission: the From the reader sees must be the user's too:
            // exactly one mailbox, no group.
            let author = match author(&message) {
                Ok(a) => a,
                Err(why) => return Reply::new(553, "5.7.1", why),
            };
            if !self.owns(user, &author).await {
                tracing::info!(user, author, "refused a From: that is not the user's");
                return Reply::new(
                    553,
                    "5.7.1",
                    format!("From: <{author}> is not one of your addresses"),
                );
            }
            sign_domain = granary_model::MailAddress::parse(&author)
                .ok()
                .map(|a| a.domain.to_string());
            sender_verified = true;
            // Every line ends in CRLF before it is signed and sent: a bare
            // CR or LF is read differently by different receivers (SMTP
            // smuggling, broken signatures).
            message = crlf_lines(message);
            if dates == 0 {
                added.push_str(&format!("Date: {}\r\n", rfc2822(now)));
            }
            if ids == 0 {
                added.push_str(&format!("Message-ID: <{id}@{hostname}>\r\n"));
            }
        } else {
            let verdict = self.mx.checker.check(&message, ip, &helo, &from).await;
            if let Some(reject) = verdict.reject {
                tracing::info!(from, "refused by the sender's DMARC policy");
                return reject;
            }
            added = verdict.header;
            sender_verified = verdict.sender_verified;
        }
        let forged = own_auth_results(&message, &hostname);
        if !forged.is_empty() {
            tracing::info!(
                count = forged.len(),
                "removed Authentication-Results claiming to be ours"
            );
            remove_ranges(&mut message, &forged);
        }
        let mut head = received(
            &helo,
            &self.peer,
            &hostname,
            (session.tls(), user.is_some()),
            &id,
            match (recipients.as_slice(), self.remote.as_slice()) {
                ([one], []) => Some(one.address.as_str()),
                ([], [one]) => Some(one.as_str()),
                _ => None,
            },
            now,
        );
        head.extend_from_slice(added.as_bytes());
        let size = message.len();
        let client = show_ip(&self.peer);
        let remote = std::mem::take(&mut self.remote);
        // Mail for other domains is queued paused: if the local copy then
        // fails, it is deleted and the client's retry sends it once.
        if !remote.is_empty() {
            let Some(domain) = sign_domain else {
                return Reply::new(451, "4.3.0", "Local error; try again later");
            };
            match self
                .queue_out(
                    &id, &from, &remote, &domain, &head, &message, now, &client, &helo,
                )
                .await
            {
                Ok(()) => {}
                Err(reply) => return reply,
            }
        }
        // Should this task be cancelled before the 250 (a server stopping
        // past its drain time), the paused copy goes: the client sends again.
        let mut paused = (!remote.is_empty()).then(|| PausedOut {
            spool: self.mx.outbound.clone(),
            id: id.clone(),
        });
        if !recipients.is_empty() {
            let envelope = Envelope {
                id: id.clone(),
                from: from.clone(),
                recipients,
                received_at: now,
                client,
                helo,
                sender_verified,
            };
            if let Err(e) = self.mx.spool.commit(envelope, head, message).await {
                tracing::error!(error = %e, "cannot spool a message");
                drop(paused);
                return Reply::new(451, "4.3.0", "Local error; try again later");
            }
        }
        if let Some(p) = paused.take() {
            p.resume();
        }
        match user {
            Some(user) => self.mx.per_user.count(user, 1),
            None => self.mx.limits.sent(ip),
        }
        tracing::info!(id, from, bytes = size, remote = remote.len(), "accepted");
        Reply::new(250, "2.0.0", format!("Ok: queued as {id}"))
    }

    /// Signs a submitted message with `domain`'s DKIM keys and commits it
    /// to the outbound queue for `remote` (durable before this returns).
    #[allow(clippy::too_many_arguments)]
    async fn queue_out(
        &self,
        id: &str,
        from: &str,
        remote: &[String],
        domain: &str,
        head: &[u8],
        message: &[u8],
        now: i64,
        client: &str,
        helo: &str,
    ) -> Result<(), Reply> {
        let local_error = || Reply::new(451, "4.3.0", "Local error; try again later");
        let mut full = head.to_vec();
        full.extend_from_slice(message);
        let dkim = self.mx.dkim.clone();
        let signing_domain = domain.to_owned();
        let signed = tokio::task::spawn_blocking(move || dkim.sign(&signing_domain, &full)).await;
        let signatures = match signed {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::error!(id, domain, error = %e, "cannot DKIM-sign");
                return Err(local_error());
            }
            Err(e) => {
                tracing::error!(id, error = %e, "DKIM signing failed");
                return Err(local_error());
            }
        };
        if signatures.is_empty() {
            tracing::warn!(id, domain, "no DKIM keys for this domain; sending unsigned");
        }
        let mut out_head = signatures.into_bytes();
        out_head.extend_from_slice(head);
        let envelope = Envelope {
            id: id.to_owned(),
            from: from.to_owned(),
            recipients: remote
                .iter()
                .map(|a| Recipient {
                    address: a.clone(),
                    user: a.to_ascii_lowercase(),
                })
                .collect(),
            received_at: now,
            client: client.to_owned(),
            helo: helo.to_owned(),
            sender_verified: true,
        };
        self.mx
            .outbound
            .commit_paused(envelope, out_head, message.to_vec())
            .await
            .map_err(|e| {
                tracing::error!(id, error = %e, "cannot queue a message for sending");
                local_error()
            })
    }
}

/// An outbound copy committed paused: resumed once the message is
/// accepted, deleted if it is not (dropped unresumed).
struct PausedOut {
    spool: Arc<Spool>,
    id: String,
}

impl PausedOut {
    fn resume(mut self) {
        self.spool.resume(&self.id);
        self.id.clear();
    }
}

impl Drop for PausedOut {
    fn drop(&mut self) {
        if self.id.is_empty() {
            return;
        }
        let (spool, id) = (self.spool.clone(), std::mem::take(&mut self.id));
        tracing::info!(id, "dropping an outbound copy that was never acknowledged");
        // Removing files blocks; off the async worker.
        std::thread::spawn(move || {
            if let Err(e) = spool.delete(&id) {
                tracing::warn!(id, error = %e, "cannot drop an unacknowledged outbound copy");
            }
        });
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The `Received` field this host adds (RFC 5321 §4.4).
fn received(
    helo: &str,
    peer: &SocketAddr,
    hostname: &str,
    (tls, authenticated): (bool, bool),
    id: &str,
    single_recipient: Option<&str>,
    now: i64,
) -> Vec<u8> {
    // What the client said is shown, never trusted: no line breaks or
    // parentheses from it reach the header.
    let helo: String = helo
        .chars()
        .filter(|c| c.is_ascii_graphic() && !"()<>;".contains(*c))
        .take(255)
        .collect();
    // RFC 3848's names for TLS (S) and AUTH (A).
    let with = match (tls, authenticated) {
        (true, true) => "ESMTPSA",
        (false, true) => "ESMTPA",
        (true, false) => "ESMTPS",
        (false, false) => "ESMTP",
    };
    let date = rfc2822(now);
    let mut h = format!(
        "Received: from {} ([{}])\r\n\tby {hostname} (Granary) with {with} id {id}",
        if helo.is_empty() { "unknown" } else { &helo },
        show_ip(peer)
    );
    if let Some(r) = single_recipient {
        let r: String = r.chars().filter(|c| !c.is_control() && *c != '>').collect();
        h.push_str(&format!("\r\n\tfor <{r}>"));
    }
    h.push_str(&format!("; {date}\r\n"));
    h.into_bytes()
}

/// `now` as an RFC 5322 date.
fn rfc2822(now: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(now)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc2822)
                .ok()
        })
        .unwrap_or_default()
}

/// The one mailbox of the message's `From:` field, lowercased; anything
/// else (none, several, a group, an entry without an address) is refused,
/// as a reader could see an address other than the one checked.
fn author(message: &[u8]) -> Result<String, &'static str> {
    const NEEDED: &str = "The message needs a From: header field with one of your addresses";
    let parsed = mail_parser::MessageParser::new()
        .parse_headers(header_block(message))
        .ok_or(NEEDED)?;
    match parsed.from() {
        Some(mail_parser::Address::List(list)) => match list.as_slice() {
            [one] => one
                .address()
                .filter(|a| a.contains('@'))
                .map(str::to_ascii_lowercase)
                .ok_or(NEEDED),
            [] => Err(NEEDED),
            _ => Err("The From: header field must name one address, yours"),
        },
        Some(mail_parser::Address::Group(_)) => {
            Err("The From: header field must name one address, yours, not a group")
        }
        None => Err(NEEDED),
    }
}

/// `message` with every bare CR and bare LF made a CRLF.
fn crlf_lines(message: Vec<u8>) -> Vec<u8> {
    let bare = message
        .windows(2)
        .any(|w| (w[0] == b'\r') != (w[1] == b'\n'))
        || message.first() == Some(&b'\n')
        || message.last() == Some(&b'\r');
    if !bare {
        return message;
    }
    let mut out = Vec::with_capacity(message.len() + message.len() / 32);
    let mut i = 0;
    while i < message.len() {
        match message[i] {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                if message.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_plain_mailbox_is_an_author() {
        let a = |h: &str| author(format!("{h}\r\nSubject: x\r\n\r\nbody\r\n").as_bytes());
        assert_eq!(
            a("From: Alice <Alice@Example.org>").unwrap(),
            "alice@example.org"
        );
        assert_eq!(a("From: alice@example.org").unwrap(), "alice@example.org");
        assert!(a("From: <ceo@victim.com>:alice@example.org;").is_err());
        assert!(a("From: Victim Name, alice@example.org").is_err());
        assert!(a("From: a@example.org, b@example.org").is_err());
        assert!(a("Subject: none").is_err());
        assert!(a("From: undisclosed").is_err());
    }

    #[test]
    fn bare_line_ends_become_crlf() {
        assert_eq!(crlf_lines(b"a\r\nb\r\n".to_vec()), b"a\r\nb\r\n");
        assert_eq!(
            crlf_lines(b"a\nb\r.\r\nc\r".to_vec()),
            b"a\r\nb\r\n.\r\nc\r\n"
        );
        assert_eq!(crlf_lines(b"\nx".to_vec()), b"\r\nx");
    }
}
