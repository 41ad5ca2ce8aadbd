//! Sending to other mail servers: the outbound queue's [`Destination`].
//!
//! For each recipient the host looks up where its domain takes mail (RFC
//! 5321 §5.1: MX hosts in preference order, the domain itself without MX,
//! nothing for a null MX), connects to port 25 of each address in turn,
//! says EHLO, takes STARTTLS whenever it is offered, and hands the message
//! over. The certificate is always checked against the system's roots (and
//! `mail.outbound_ca`), and the result is logged with the delivery; mail
//! still goes over TLS when it does not verify (opportunistic TLS, RFC
//! 7435), as every MTA does without a policy saying otherwise.
//!
//! A 5xx to RCPT or to the data is final and the sender gets a bounce; a
//! 4xx, a lost connection or a DNS failure is retried by the queue.
//!
//! MTA-STS (RFC 8461): a recipient domain publishing `_mta-sts` has its
//! policy fetched over HTTPS (certificate verified) and cached for its
//! `max_age`. In `enforce` mode only MX hosts the policy lists are used,
//! only over TLS whose certificate verifies for the MX name; otherwise the
//! message waits in the queue and is never sent in clear. In `testing`
//! mode a failure is logged and the mail goes as usual.

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use granary_spool::{Destination, Envelope, Outcome};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::checks::{Checker, DnsProblem};

/// Connections open to one destination domain at once.
const PER_DOMAIN: usize = 4;
/// MX hosts, and addresses of each (IPv6 and IPv4 taken in turn), tried
/// in one attempt.
const MAX_HOSTS: usize = 5;
const MAX_ADDRESSES: usize = 4;
/// The longest reply line and the most lines taken from a server.
const MAX_REPLY_LINE: usize = 4096;
const MAX_REPLY_LINES: usize = 100;

/// How the outbound side behaves, from `[mail]`.
#[derive(Debug, Clone)]
pub struct RemoteSettings {
    /// The name given in EHLO.
    pub hostname: String,
    /// The port of other servers' MX (25).
    pub port: u16,
    pub connect_timeout: Duration,
    /// For each reply (RFC 5321 §4.5.3.2 asks for minutes).
    pub command_timeout: Duration,
    /// For the reply to the end of the data.
    pub data_timeout: Duration,
    /// The HTTPS port MTA-STS policies are fetched from (443; another only
    /// for tests).
    pub mta_sts_port: u16,
}

/// How a session uses TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsUse {
    /// When offered; a broken handshake is retried in clear.
    Opportunistic,
    /// Never (the retry after a broken handshake).
    Off,
    /// Required, with a certificate that verifies (MTA-STS enforce).
    Verified,
}

/// A domain's policy as last fetched: its id, until when it holds.
struct CachedPolicy {
    id: String,
    until: std::time::Instant,
    policy: granary_wire::mta_sts::Policy,
}

/// Delivers to other mail servers.
pub struct Remote {
    settings: RemoteSettings,
    checker: Checker,
    tls: Arc<rustls::ClientConfig>,
    webpki: Arc<WebPkiServerVerifier>,
    /// For fetching MTA-STS policies: certificates verified.
    strict: Arc<rustls::ClientConfig>,
    policies: Mutex<HashMap<String, CachedPolicy>>,
    slots: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Remote {
    /// `extra_ca`: PEM certificates trusted besides the system's roots.
    pub fn new(
        settings: RemoteSettings,
        checker: Checker,
        extra_ca: Option<&std::path::Path>,
    ) -> Result<Remote, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            let _ = roots.add(cert);
        }
        if let Some(path) = extra_ca {
            use rustls::pki_types::pem::PemObject;
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("mail.outbound_ca {}: {e}", path.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("mail.outbound_ca {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("mail.outbound_ca {}: {e}", path.display()))?;
            }
        }
        let roots = Arc::new(roots);
        let webpki = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| format!("no root certificates to check other servers with: {e}"))?;
        let strict = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(crate::tls::AnyCertificate(provider, false)))
            .with_no_client_auth();
        Ok(Remote {
            settings,
            checker,
            tls: Arc::new(tls),
            webpki,
            strict: Arc::new(strict),
            policies: Mutex::new(HashMap::new()),
            slots: Mutex::new(HashMap::new()),
        })
    }

    fn slot(&self, domain: &str) -> Arc<Semaphore> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots.len() > 10_000 {
            slots.retain(|_, s| s.available_permits() < PER_DOMAIN);
        }
        slots
            .entry(domain.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(PER_DOMAIN)))
            .clone()
    }

    async fn send(&self, envelope: &Envelope, addresses: &[String], message: &[u8]) -> Outcome {
        let id = envelope.id.as_str();
        // Addresses came through our parsers (or, for bounces, a remote
        // MAIL FROM): check them again before they go into a command.
        if let Some(bad) = addresses
            .iter()
            .find(|a| granary_model::MailAddress::parse(a).is_err())
        {
            return Outcome::Failed(format!("5.1.3 <{bad}> is not a valid address"));
        }
        if !envelope.from.is_empty() && granary_model::MailAddress::parse(&envelope.from).is_err() {
            return Outcome::Failed(format!("5.1.7 <{}> is not a valid sender", envelope.from));
        }
        let Some(domain) = addresses
            .first()
            .and_then(|a| a.rsplit_once('@'))
            .map(|(_, d)| d.to_ascii_lowercase())
        else {
            return Outcome::Failed("5.1.3 not an address with a domain".to_owned());
        };
        let hosts = match self.checker.mail_exchangers(&domain).await {
            Ok(h) if h.is_empty() => {
                return Outcome::Failed(format!(
                    "5.1.10 {domain} takes no mail (it publishes a null MX)"
                ));
            }
            Ok(h) => h,
            Err(DnsProblem::NoSuchDomain) => {
                return Outcome::Failed(format!("5.1.2 the domain {domain} does not exist"));
            }
            Err(DnsProblem::NoRecords) => vec![domain.clone()],
            Err(DnsProblem::Failed(e)) => {
                return Outcome::Retry(format!("4.4.3 cannot look up {domain}'s MX: {e}"));
            }
        };
        let _slot = self.slot(&domain).acquire_owned().await;
        let mut last = format!("4.4.1 no mail server of {domain} could be reached");
        let policy = self.policy(&domain).await;
        let enforce = policy
            .as_ref()
            .is_some_and(|p| p.mode == granary_wire::mta_sts::Mode::Enforce);
        if let Some(p) = &policy
            && p.mode != granary_wire::mta_sts::Mode::None
        {
            let listed: Vec<&String> = hosts.iter().filter(|h| p.allows(h)).collect();
            if listed.len() < hosts.len() {
                tracing::warn!(id, domain, mode = ?p.mode, "MX hosts not in the domain's MTA-STS policy");
            }
            if enforce && listed.is_empty() {
                return Outcome::Retry(format!(
                    "4.7.5 no MX host of {domain} is in its MTA-STS policy; held, never sent in clear"
                ));
            }
        }
        for host in hosts.iter().take(MAX_HOSTS) {
            if enforce && !policy.as_ref().is_some_and(|p| p.allows(host)) {
                continue;
            }
            let ips = match self.checker.host_addresses(host).await {
                Ok(ips) => ips,
                Err(e) => {
                    last = format!("4.4.3 cannot look up {host}: {e:?}");
                    continue;
                }
            };
            for ip in interleave(ips).into_iter().take(MAX_ADDRESSES) {
                let addr = SocketAddr::new(ip, self.settings.port);
                let first = if enforce {
                    TlsUse::Verified
                } else {
                    TlsUse::Opportunistic
                };
                let mut attempt = self
                    .session(addr, host, envelope, addresses, message, first)
                    .await;
                if let (Attempt::TlsFailed(why), false) = (&attempt, enforce) {
                    // Opportunistic TLS (RFC 7435): a server whose TLS is
                    // broken still gets the mail, in clear, as Postfix's does.
                    tracing::warn!(id, host, %ip, why, "TLS failed; sending without it");
                    attempt = self
                        .session(addr, host, envelope, addresses, message, TlsUse::Off)
                        .await;
                }
                match attempt {
                    Attempt::Done(outcome) => {
                        tracing::info!(id, host, %ip, ?outcome, "outbound attempt");
                        return outcome;
                    }
                    Attempt::NextHost(why) | Attempt::TlsFailed(why) => {
                        tracing::info!(id, host, %ip, why, "trying the next mail server");
                        last = why;
                    }
                }
            }
        }
        Outcome::Retry(last)
    }

    /// One connection to `addr` (`host`): TLS when offered, then the
    /// transaction.
    async fn session(
        &self,
        addr: SocketAddr,
        host: &str,
        envelope: &Envelope,
        addresses: &[String],
        message: &[u8],
        tls_use: TlsUse,
    ) -> Attempt {
        let s = &self.settings;
        let tcp = match tokio::time::timeout(s.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Attempt::NextHost(format!("4.4.1 connect to {addr}: {e}")),
            Err(_) => return Attempt::NextHost(format!("4.4.1 connect to {addr}: timed out")),
        };
        let _ = tcp.set_nodelay(true);
        let mut plain = Conn::new(tcp, s.command_timeout);
        match plain.reply().await {
            Ok((220, _)) => {}
            Ok((code, text)) => return Attempt::NextHost(format!("{code} greeting: {text}")),
            Err(e) => return Attempt::NextHost(format!("4.4.2 {host}: {e}")),
        }
        let ehlo = match plain.ehlo(&s.hostname).await {
            Ok(e) => e,
            Err(why) => return Attempt::NextHost(why),
        };
        if tls_use == TlsUse::Verified && !ehlo.starttls {
            let _ = plain.command("QUIT").await;
            return Attempt::TlsFailed(format!(
                "4.7.5 {host} offers no STARTTLS, which the domain's MTA-STS policy requires; held, never sent in clear"
            ));
        }
        if !ehlo.starttls || tls_use == TlsUse::Off {
            tracing::info!(id = envelope.id, host, tls = "none", "sending without TLS");
            return plain
                .transaction(&ehlo, envelope, addresses, message, s.data_timeout)
                .await;
        }
        match plain.command("STARTTLS").await {
            Ok((220, _)) => {}
            Ok((code, text)) => {
                return Attempt::TlsFailed(format!("{code} STARTTLS refused: {text}"));
            }
            Err(e) => return Attempt::NextHost(format!("4.4.2 {host}: {e}")),
        }
        let Some(tcp) = plain.into_inner() else {
            return Attempt::NextHost(format!("4.7.0 {host} sent data before the TLS handshake"));
        };
        let Ok(name) = ServerName::try_from(host.to_owned()) else {
            return Attempt::NextHost(format!("4.4.0 {host} is not a host name"));
        };
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let tls =
            match tokio::time::timeout(s.connect_timeout, connector.connect(name.clone(), tcp))
                .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return Attempt::TlsFailed(format!("4.7.5 TLS with {host}: {e}")),
                Err(_) => return Attempt::TlsFailed(format!("4.7.5 TLS with {host}: timed out")),
            };
        let verified = {
            let (_, conn) = tls.get_ref();
            match conn.peer_certificates() {
                Some([leaf, rest @ ..]) => self
                    .webpki
                    .verify_server_cert(leaf, rest, &name, &[], UnixTime::now())
                    .is_ok(),
                _ => false,
            }
        };
        tracing::info!(
            id = envelope.id,
            host,
            tls = if verified { "verified" } else { "unverified" },
            "TLS with the receiving server"
        );
        let mut secure = Conn::new(tls, s.command_timeout);
        if tls_use == TlsUse::Verified && !verified {
            let _ = secure.command("QUIT").await;
            return Attempt::TlsFailed(format!(
                "4.7.5 the certificate of {host} does not verify, which the domain's MTA-STS policy requires; held, never sent in clear"
            ));
        }
        let ehlo = match secure.ehlo(&s.hostname).await {
            Ok(e) => e,
            Err(why) => return Attempt::NextHost(why),
        };
        secure
            .transaction(&ehlo, envelope, addresses, message, s.data_timeout)
            .await
    }
}

impl Remote {
    /// The MTA-STS policy of `domain`, if it publishes one: cached while
    /// its id is unchanged and its `max_age` lasts; a policy that cannot
    /// be fetched leaves the cached one in force (RFC 8461 §5.1).
    async fn policy(&self, domain: &str) -> Option<granary_wire::mta_sts::Policy> {
        let now = std::time::Instant::now();
        let cached = || {
            let policies = self.policies.lock().unwrap_or_else(|p| p.into_inner());
            policies
                .get(domain)
                .filter(|c| c.until > now)
                .map(|c| (c.id.clone(), c.policy.clone()))
        };
        let id = match self
            .checker
            .lookup(&format!("_mta-sts.{domain}"), "TXT")
            .await
        {
            Ok(records) => records.iter().find_map(|r| {
                let mut tags = r.split(';').map(str::trim);
                (tags.next()? == "v=STSv1")
                    .then(|| tags.find_map(|t| t.strip_prefix("id=").map(str::to_owned)))
                    .flatten()
            }),
            Err(_) => None,
        };
        let Some(id) = id else {
            return cached().map(|(_, p)| p);
        };
        if let Some((cached_id, policy)) = cached()
            && cached_id == id
        {
            return Some(policy);
        }
        match self.fetch_policy(domain).await {
            Ok(policy) => {
                let mut policies = self.policies.lock().unwrap_or_else(|p| p.into_inner());
                if policies.len() > 10_000 {
                    policies.retain(|_, c| c.until > now);
                }
                policies.insert(
                    domain.to_owned(),
                    CachedPolicy {
                        id,
                        until: now + Duration::from_secs(policy.max_age),
                        policy: policy.clone(),
                    },
                );
                tracing::info!(domain, mode = ?policy.mode, "MTA-STS policy fetched");
                Some(policy)
            }
            Err(why) => {
                tracing::warn!(domain, why, "cannot fetch the MTA-STS policy");
                cached().map(|(_, p)| p)
            }
        }
    }

    /// `https://mta-sts.<domain>/.well-known/mta-sts.txt`, certificate
    /// verified, no redirects, bounded in size and time.
    async fn fetch_policy(&self, domain: &str) -> Result<granary_wire::mta_sts::Policy, String> {
        use tokio::io::AsyncReadExt;
        let host = format!("mta-sts.{domain}");
        let ips = self
            .checker
            .host_addresses(&host)
            .await
            .map_err(|e| format!("{host}: {e:?}"))?;
        let ip = *ips.first().ok_or("no address")?;
        let name = ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        let fetch = async {
            let tcp = TcpStream::connect(SocketAddr::new(ip, self.settings.mta_sts_port))
                .await
                .map_err(|e| e.to_string())?;
            let mut tls = tokio_rustls::TlsConnector::from(self.strict.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            tls.write_all(
                format!(
                    "GET /.well-known/mta-sts.txt HTTP/1.0\r\nHost: {host}\r\nUser-Agent: Granary\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .map_err(|e| e.to_string())?;
            let mut response = Vec::new();
            (&mut tls)
                .take((granary_wire::mta_sts::MAX_POLICY + 8192) as u64)
                .read_to_end(&mut response)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<Vec<u8>, String>(response)
        };
        let response = tokio::time::timeout(Duration::from_secs(20), fetch)
            .await
            .map_err(|_| "timed out".to_owned())??;
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("no HTTP header end")?;
        let head = String::from_utf8_lossy(&response[..split]);
        let status = head.split_whitespace().nth(1).unwrap_or("");
        if status != "200" {
            return Err(format!("HTTP status {status}"));
        }
        granary_wire::mta_sts::parse(&response[split + 4..]).map_err(str::to_owned)
    }
}

impl Destination for Remote {
    fn deliver(
        &self,
        envelope: Arc<Envelope>,
        _key: String,
        addresses: Vec<String>,
        message: std::fs::File,
        size: u64,
    ) -> Pin<Box<dyn std::future::Future<Output = Outcome> + Send + '_>> {
        Box::pin(async move {
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = Vec::with_capacity(size as usize);
                message.take(size).read_to_end(&mut buf).map(|_| buf)
            })
            .await;
            let message = match read {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => return Outcome::Retry(format!("4.3.0 reading the queue: {e}")),
                Err(e) => return Outcome::Retry(format!("4.3.0 reading the queue: {e}")),
            };
            self.send(&envelope, &addresses, &message).await
        })
    }
}

/// How one connection ended.
enum Attempt {
    /// The server decided: done with this message for now.
    Done(Outcome),
    /// This server could not be used; try the next.
    NextHost(String),
    /// Its TLS failed: try it again without.
    TlsFailed(String),
}

/// IPv6 and IPv4 addresses in turn, so a host without a route of one
/// family still reaches the other within the first few tries.
fn interleave(ips: Vec<std::net::IpAddr>) -> Vec<std::net::IpAddr> {
    let (v6, v4): (Vec<_>, Vec<_>) = ips.into_iter().partition(|ip| ip.is_ipv6());
    let mut out = Vec::with_capacity(v6.len() + v4.len());
    let (mut a, mut b) = (v6.into_iter(), v4.into_iter());
    loop {
        match (a.next(), b.next()) {
            (None, None) => return out,
            (x, y) => out.extend(x.into_iter().chain(y)),
        }
    }
}

/// What EHLO said.
#[derive(Debug, Default)]
struct Ehlo {
    starttls: bool,
    size: Option<u64>,
    eight_bit: bool,
    smtputf8: bool,
}

/// One SMTP client connection.
struct Conn<S> {
    io: BufReader<S>,
    timeout: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(stream: S, timeout: Duration) -> Conn<S> {
        Conn {
            io: BufReader::new(stream),
            timeout,
        }
    }

    /// The stream, unless the server sent more than was asked for (which,
    /// before a TLS handshake, would be read as if it came over TLS).
    fn into_inner(self) -> Option<S> {
        if self.io.buffer().is_empty() {
            Some(self.io.into_inner())
        } else {
            None
        }
    }

    /// Reads one reply: its code and its lines' text, joined.
    async fn reply(&mut self) -> std::io::Result<(u16, String)> {
        self.reply_within(self.timeout).await
    }

    async fn reply_within(&mut self, timeout: Duration) -> std::io::Result<(u16, String)> {
        tokio::time::timeout(timeout, self.read_reply())
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply in time"))?
    }

    async fn read_reply(&mut self) -> std::io::Result<(u16, String)> {
        let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_owned());
        let mut text = String::new();
        for _ in 0..MAX_REPLY_LINES {
            let mut line = Vec::new();
            let n = tokio::io::AsyncReadExt::take(&mut self.io, MAX_REPLY_LINE as u64)
                .read_until(b'\n', &mut line)
                .await?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                ));
            }
            if !line.ends_with(b"\n") {
                return Err(bad("a reply line too long"));
            }
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end();
            if line.len() < 3 || !line.as_bytes()[..3].iter().all(u8::is_ascii_digit) {
                return Err(bad("not an SMTP reply"));
            }
            let code: u16 = line[..3].parse().map_err(|_| bad("not an SMTP reply"))?;
            let rest = &line[3..];
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(rest.get(1..).unwrap_or(""));
            match rest.as_bytes().first() {
                Some(b'-') => continue,
                None | Some(b' ') => return Ok((code, text)),
                Some(_) => return Err(bad("not an SMTP reply")),
            }
        }
        Err(bad("a reply of too many lines"))
    }

    async fn command(&mut self, line: &str) -> std::io::Result<(u16, String)> {
        let s = self.io.get_mut();
        s.write_all(line.as_bytes()).await?;
        s.write_all(b"\r\n").await?;
        s.flush().await?;
        self.reply().await
    }

    async fn ehlo(&mut self, hostname: &str) -> Result<Ehlo, String> {
        let (code, text) = self
            .command(&format!("EHLO {hostname}"))
            .await
            .map_err(|e| format!("4.4.2 EHLO: {e}"))?;
        if code != 250 {
            return Err(format!("{code} EHLO refused: {text}"));
        }
        let mut e = Ehlo::default();
        for line in text.lines().skip(1) {
            let mut words = line.split_whitespace();
            match words.next().map(str::to_ascii_uppercase).as_deref() {
                Some("STARTTLS") => e.starttls = true,
                Some("8BITMIME") => e.eight_bit = true,
                Some("SMTPUTF8") => e.smtputf8 = true,
                Some("SIZE") => e.size = words.next().and_then(|n| n.parse().ok()),
                _ => {}
            }
        }
        Ok(e)
    }

    /// MAIL, RCPT for each address, DATA, the message, QUIT.
    async fn transaction(
        mut self,
        ehlo: &Ehlo,
        envelope: &Envelope,
        addresses: &[String],
        message: &[u8],
        data_timeout: Duration,
    ) -> Attempt {
        let utf8 = !envelope.from.is_ascii() || addresses.iter().any(|a| !a.is_ascii());
        if utf8 && !ehlo.smtputf8 {
            return Attempt::Done(Outcome::Failed(
                "5.6.7 the receiving server does not take non-ASCII addresses".to_owned(),
            ));
        }
        if let Some(max) = ehlo.size.filter(|m| *m > 0)
            && message.len() as u64 > max
        {
            return Attempt::Done(Outcome::Failed(format!(
                "5.3.4 the message is bigger than the {max} bytes the receiving server takes"
            )));
        }
        let mut mail = format!("MAIL FROM:<{}>", envelope.from);
        if ehlo.size.is_some() {
            mail.push_str(&format!(" SIZE={}", message.len()));
        }
        if ehlo.eight_bit && !message.is_ascii() {
            mail.push_str(" BODY=8BITMIME");
        }
        if utf8 {
            mail.push_str(" SMTPUTF8");
        }
        let io_err = |e: std::io::Error| Attempt::NextHost(format!("4.4.2 {e}"));
        match self.command(&mail).await {
            Ok((250, _)) => {}
            Ok((code, text)) => return Attempt::Done(verdict(code, "MAIL", &text)),
            Err(e) => return io_err(e),
        }
        let mut accepted = 0;
        let mut refused = None;
        for a in addresses {
            match self.command(&format!("RCPT TO:<{a}>")).await {
                Ok((250 | 251, _)) => accepted += 1,
                Ok((code, text)) => refused = Some(verdict(code, &format!("RCPT <{a}>"), &text)),
                Err(e) => return io_err(e),
            }
        }
        if accepted == 0 {
            let _ = self.command("QUIT").await;
            return Attempt::Done(
                refused.unwrap_or_else(|| Outcome::Retry("4.4.0 no recipient taken".to_owned())),
            );
        }
        match self.command("DATA").await {
            Ok((354, _)) => {}
            Ok((code, text)) => return Attempt::Done(verdict(code, "DATA", &text)),
            Err(e) => return io_err(e),
        }
        let stuffed = dot_stuff(message);
        let sent = async {
            let s = self.io.get_mut();
            s.write_all(&stuffed).await?;
            s.flush().await
        };
        if let Err(e) = tokio::time::timeout(data_timeout, sent)
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
        {
            return io_err(e);
        }
        let outcome = match self.reply_within(data_timeout).await {
            Ok((250, _)) => Outcome::Delivered,
            Ok((code, text)) => verdict(code, "the message", &text),
            Err(e) => return io_err(e),
        };
        let _ = self.command("QUIT").await;
        // One key is one address, so a refused RCPT among several (not
        // done today) would still be reported as the whole outcome.
        Attempt::Done(match refused {
            Some(r) if !matches!(outcome, Outcome::Delivered) => r,
            _ => outcome,
        })
    }
}

/// A server's refusal, as the queue keeps it: `x.y.z` first.
fn verdict(code: u16, what: &str, text: &str) -> Outcome {
    let first = text.lines().next().unwrap_or("");
    let (status, rest) = match first.split_once(' ') {
        Some((s, rest))
            if s.len() >= 5
                && s.split('.').count() == 3
                && s.bytes().all(|b| b.is_ascii_digit() || b == b'.') =>
        {
            (s.to_owned(), rest)
        }
        _ => (
            if code >= 500 { "5.0.0" } else { "4.0.0" }.to_owned(),
            first,
        ),
    };
    let why = format!("{status} the receiving server refused {what}: {code} {rest}");
    if code >= 500 {
        Outcome::Failed(why)
    } else {
        Outcome::Retry(why)
    }
}

/// The message as DATA sends it: lines starting with "." doubled, a final
/// CRLF, then "." on a line of its own.
fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + message.len() / 64 + 8);
    let mut at_line_start = true;
    for &b in message {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !out.ends_with(b"\r\n") {
        if out.ends_with(b"\n") {
            out.pop();
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dots_are_stuffed_and_the_end_is_marked() {
        assert_eq!(
            dot_stuff(b".a\r\nb\r\n..c\r\n"),
            b"..a\r\nb\r\n...c\r\n.\r\n"
        );
        assert_eq!(dot_stuff(b"no end"), b"no end\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b"\r\n.\r\n");
    }

    #[test]
    fn refusals_keep_their_status_code() {
        assert_eq!(
            verdict(550, "RCPT <a@b>", "5.1.1 <a@b>: no such user"),
            Outcome::Failed(
                "5.1.1 the receiving server refused RCPT <a@b>: 550 <a@b>: no such user".into()
            )
        );
        assert!(
            matches!(verdict(451, "DATA", "try later"), Outcome::Retry(w) if w.starts_with("4.0.0 "))
        );
    }

    #[tokio::test]
    async fn multi_line_replies_are_joined() {
        let (a, mut b) = tokio::io::duplex(1024);
        b.write_all(b"250-mx.example Hello\r\n250-STARTTLS\r\n250-SIZE 1000\r\n250 8BITMIME\r\n")
            .await
            .unwrap();
        let mut c = Conn::new(a, Duration::from_secs(5));
        let (code, text) = c.reply().await.unwrap();
        assert_eq!(code, 250);
        assert_eq!(text, "mx.example Hello\nSTARTTLS\nSIZE 1000\n8BITMIME");
        b.write_all(b"hello\r\n").await.unwrap();
        assert!(c.reply().await.is_err());
    }
}
