//! Federation with other chat servers (RFC 6120 server-to-server streams):
//! the `xmpp-s2s` listener (like port 5269) for streams other servers open
//! to us ([`inbound`]), and streams we open to them ([`outbound`]), one
//! domain at a time.
//!
//! Every stream starts with STARTTLS; nothing is exchanged in clear. A
//! server proves its domain either with a certificate that verifies for it
//! (then it may log in with SASL EXTERNAL) or, unless
//! `xmpp.s2s_require_verified`, with dialback (XEP-0220): it sends a key
//! only the real domain's server can confirm, and we ask that server,
//! found through DNS (`_xmpp-server._tcp` SRV records, from the configured
//! resolver). Our own keys are an HMAC of the two domains and the stream
//! id under a secret derived from the SSH host key (XEP-0185), so any of
//! our listeners can confirm them, across restarts too.
//!
//! What comes in is checked before it goes anywhere: its `from` must be a
//! domain the stream proved, its `to` a user of this server; the stanza
//! goes to that user's chat grain (started if stopped), which applies the
//! user's blocking and subscription rules as for local senders. What the
//! grains send to other domains reaches [`Federation::submit`] through
//! the supervisor (which has stamped the sender), waits in a queue per
//! domain while a stream is set up, and is bounced back to the sender as
//! a stanza error if it cannot be delivered. Each domain gets a few streams
//! at most and a stanza rate; a stream with nothing on it for
//! `xmpp.s2s_idle_secs` is closed.

mod inbound;
mod outbound;
mod wire;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use granary_grains::mail::XmppStanza;
use granary_grains::{GrainId, Grains};
use granary_wire::s2s::domain_of;
use granary_wire::stanza::{self, Element, parse_element};
use granary_wire::xmpp::NS_CLIENT;
use rustls::client::WebPkiServerVerifier;
use tokio::sync::{mpsc, watch};

use crate::smtp::checks::Checker;

pub use inbound::serve;

/// How federation behaves (`[xmpp]` `s2s_*`).
#[derive(Debug, Clone)]
pub struct S2sSettings {
    pub require_verified: bool,
    pub idle: Duration,
    pub connections_per_domain: u32,
    pub stanzas_per_second: u32,
    pub max_stanza: usize,
    /// The port tried when a domain has no SRV records (5269).
    pub default_port: u16,
    pub connect_timeout: Duration,
    /// Whether other servers may be reached at loopback, private and
    /// link-local addresses (tests on one machine; a LAN peer). Off: what
    /// DNS names is not a way into the home network.
    pub allow_private_addresses: bool,
}

/// Stanzas per second for one other domain, across its streams.
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Federation: shared by the listener and the outbound streams.
pub struct Federation {
    settings: S2sSettings,
    /// Which domains are ours.
    domains: Arc<crate::ChatDomains>,
    checker: Checker,
    grains: Arc<dyn Grains>,
    /// Opportunistic: the certificate is checked after the handshake, with
    /// `webpki`, and only required to verify when the settings say so.
    client_tls: Arc<rustls::ClientConfig>,
    webpki: Arc<WebPkiServerVerifier>,
    /// The listener's: our certificates, and a client certificate asked
    /// for (not required).
    server_tls: Arc<rustls::ServerConfig>,
    secret: ring::hmac::Key,
    /// One queue (and task) per pair of our domain and theirs.
    queues: Mutex<HashMap<(String, String), mpsc::Sender<Pending>>>,
    streams_from: Mutex<HashMap<String, u32>>,
    rates: Mutex<HashMap<String, Bucket>>,
    /// Inbound streams per source address (an IPv6 one by its /64), and
    /// in all.
    inbound: Mutex<(HashMap<String, u32>, u32)>,
    /// Dialback checks under way (each opens a stream to another server).
    verifying: Arc<tokio::sync::Semaphore>,
    /// Stanzas (and their bytes) of each local sender waiting in outbound
    /// queues.
    pending: Mutex<HashMap<String, (usize, usize)>>,
    /// Bounces on their way to grains.
    bouncing: Arc<tokio::sync::Semaphore>,
    /// Deliveries from other servers under way (some may have outlived
    /// the stream's wait for them).
    pub(crate) delivering: Arc<tokio::sync::Semaphore>,
    stop: watch::Receiver<bool>,
}

/// Inbound streams from one address, and in all.
const INBOUND_PER_ADDRESS: u32 = 16;
const INBOUND_TOTAL: u32 = 1024;
/// Dialback checks at once.
const VERIFYING: usize = 32;
/// What one local user may have waiting for other servers.
const PENDING_STANZAS: usize = 1000;
const PENDING_BYTES: usize = 16 << 20;
/// Bounces delivered at once; past it they are logged and dropped.
const BOUNCING: usize = 256;
/// Deliveries from other servers under way at once; past it streams wait.
const DELIVERING: usize = 1024;

/// Stanzas that may wait for one domain's stream.
const QUEUE_PER_DOMAIN: usize = 10_000;
/// Other domains reached at once (each has a task and a queue).
const MAX_REMOTE_DOMAINS: usize = 10_000;

impl Federation {
    /// `ca`: PEM certificates trusted besides the system's roots;
    /// `secret`: bytes the dialback key is derived from (kept across
    /// restarts).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: S2sSettings,
        checker: Checker,
        grains: Arc<dyn Grains>,
        domains: Arc<crate::ChatDomains>,
        certs: Arc<dyn rustls::server::ResolvesServerCert>,
        ca: Option<&std::path::Path>,
        secret: &[u8],
        stop: watch::Receiver<bool>,
    ) -> Result<Arc<Federation>, String> {
        let provider = crate::tls::provider();
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        if let Some(path) = ca {
            use rustls_pki_types::pem::PemObject;
            let bad = |e: String| format!("xmpp.s2s_ca {}: {e}", path.display());
            for cert in rustls_pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(e.to_string()))?
            {
                let cert = cert.map_err(|e| bad(e.to_string()))?;
                roots.add(cert).map_err(|e| bad(e.to_string()))?;
            }
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| format!("no root certificates to check other servers with: {e}"))?;
        let versions: &[&rustls::SupportedProtocolVersion] =
            &[&rustls::version::TLS13, &rustls::version::TLS12];
        let client_tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(crate::tls::AnyCertificate(
                provider.clone(),
                false,
            )))
            .with_no_client_auth();
        let server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(Arc::new(crate::tls::AnyCertificate(provider, false)))
            .with_cert_resolver(certs);
        let mut tagged = b"granary xmpp dialback\0".to_vec();
        tagged.extend_from_slice(secret);
        let key = ring::digest::digest(&ring::digest::SHA256, &tagged);
        Ok(Arc::new(Federation {
            settings,
            domains,
            checker,
            grains,
            client_tls: Arc::new(client_tls),
            webpki,
            server_tls: Arc::new(server_tls),
            secret: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_ref()),
            queues: Mutex::new(HashMap::new()),
            streams_from: Mutex::new(HashMap::new()),
            rates: Mutex::new(HashMap::new()),
            inbound: Mutex::new((HashMap::new(), 0)),
            verifying: Arc::new(tokio::sync::Semaphore::new(VERIFYING)),
            pending: Mutex::new(HashMap::new()),
            bouncing: Arc::new(tokio::sync::Semaphore::new(BOUNCING)),
            delivering: Arc::new(tokio::sync::Semaphore::new(DELIVERING)),
            stop,
        }))
    }

    /// Takes the grains' stanzas for other domains from `from_grains`
    /// until it closes.
    pub fn start(self: &Arc<Self>, mut from_grains: mpsc::Receiver<XmppStanza>) {
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(s) = from_grains.recv().await {
                me.submit(s);
            }
        });
    }

    /// What a dialback key is the HMAC of: the receiving and originating
    /// domains and the stream id (XEP-0185).
    fn dialback_text(receiving: &str, originating: &str, id: &str) -> String {
        format!(
            "{} {} {id}",
            receiving.to_ascii_lowercase(),
            originating.to_ascii_lowercase()
        )
    }

    /// The dialback key for a stream from `originating` to `receiving`
    /// with stream id `id`, as hex.
    fn dialback_key(&self, receiving: &str, originating: &str, id: &str) -> String {
        let text = Self::dialback_text(receiving, originating, id);
        let tag = ring::hmac::sign(&self.secret, text.as_bytes());
        hex::encode(tag.as_ref())
    }

    /// Whether `key` is ours for that stream (checked by ring in constant
    /// time).
    fn dialback_valid(&self, receiving: &str, originating: &str, id: &str, key: &str) -> bool {
        let Some(tag) = from_hex(key) else {
            return false;
        };
        let text = Self::dialback_text(receiving, originating, id);
        ring::hmac::verify(&self.secret, text.as_bytes(), &tag).is_ok()
    }

    /// Whether a certificate chain verifies for `domain`.
    fn certificate_verifies(
        &self,
        chain: Option<&[rustls_pki_types::CertificateDer<'static>]>,
        domain: &str,
    ) -> bool {
        use rustls::client::danger::ServerCertVerifier;
        let Some((end, rest)) = chain.and_then(|c| c.split_first()) else {
            return false;
        };
        let Ok(name) = rustls_pki_types::ServerName::try_from(domain.to_owned()) else {
            return false;
        };
        self.webpki
            .verify_server_cert(end, rest, &name, &[], rustls_pki_types::UnixTime::now())
            .is_ok()
    }

    /// Counts a stream from `domain`; `None` when it has its share.
    fn stream_from(self: &Arc<Self>, domain: &str) -> Option<StreamSlot> {
        let mut counts = self.streams_from.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(domain.to_owned()).or_insert(0);
        if *n >= self.settings.connections_per_domain {
            return None;
        }
        *n += 1;
        Some(StreamSlot {
            fed: self.clone(),
            domain: domain.to_owned(),
        })
    }

    /// Counts an inbound connection from `ip`; `None` past the limits.
    fn admit_inbound(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<InboundSlot> {
        let key = crate::smtp::limits::bucket(ip).to_string();
        let mut guard = self.inbound.lock().unwrap_or_else(|p| p.into_inner());
        let (per, total) = &mut *guard;
        let n = per.entry(key.clone()).or_insert(0);
        if *n >= INBOUND_PER_ADDRESS || *total >= INBOUND_TOTAL {
            if *n == 0 {
                per.remove(&key);
            }
            return None;
        }
        *n += 1;
        *total += 1;
        Some(InboundSlot {
            fed: self.clone(),
            key,
        })
    }

    /// Takes one stanza from `domain` out of its rate; `false` when it is
    /// sending too fast.
    fn within_rate(&self, domain: &str) -> bool {
        let rate = self.settings.stanzas_per_second as f64;
        let burst = rate * 2.0;
        let now = Instant::now();
        let mut rates = self.rates.lock().unwrap_or_else(|p| p.into_inner());
        if rates.len() > 10_000 && !rates.contains_key(domain) {
            rates.retain(|_, b| now.duration_since(b.at) < Duration::from_secs(60));
        }
        let b = rates.entry(domain.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens < 1.0 {
            return false;
        }
        b.tokens -= 1.0;
        true
    }

    /// Queues a stanza from one of our users for another domain; bounces
    /// it at once when that domain's queue is full.
    pub fn submit(self: &Arc<Self>, stanza: XmppStanza) {
        let (Some(local), Some(remote)) = (domain_of(&stanza.from), domain_of(&stanza.to)) else {
            self.bounce(stanza, "jid-malformed", "not an address");
            return;
        };
        // One of ours after all (the host's view was stale): not sent
        // out to come back to us.
        if self.domains.known(&remote) {
            self.bounce(stanza, "service-unavailable", "try again");
            return;
        }
        let key = (local, remote);
        let Some(ticket) = self.take_pending(&stanza) else {
            self.bounce(
                stanza,
                "resource-constraint",
                "too many of your stanzas wait for other servers",
            );
            return;
        };
        let stanza = Pending { stanza, ticket };
        let refused = {
            let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            if !queues.contains_key(&key) && queues.len() >= MAX_REMOTE_DOMAINS {
                Some((stanza, "too many other servers are being reached at once"))
            } else {
                let queue = queues.entry(key.clone()).or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(QUEUE_PER_DOMAIN);
                    tokio::spawn(outbound::run(
                        self.clone(),
                        key.0.clone(),
                        key.1.clone(),
                        rx,
                    ));
                    tx
                });
                match queue.try_send(stanza) {
                    Ok(()) => None,
                    Err(mpsc::error::TrySendError::Full(p)) => {
                        Some((p, "too many stanzas wait for that server"))
                    }
                    Err(mpsc::error::TrySendError::Closed(p)) => {
                        // Its task ended idle between our lookup and now:
                        // uncounted, and submitted again.
                        queues.remove(&key);
                        drop(queues);
                        let Pending { stanza, ticket } = p;
                        drop(ticket);
                        self.submit(stanza);
                        return;
                    }
                }
            }
        };
        if let Some((p, why)) = refused {
            self.bounce(p.stanza, "resource-constraint", why);
        }
    }

    /// Counts a stanza against its sender's share of the outbound queues.
    fn take_pending(self: &Arc<Self>, stanza: &XmppStanza) -> Option<PendingTicket> {
        let sender = stanza.from.split('/').next().unwrap_or("").to_owned();
        let bytes = stanza.stanza.len();
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let (n, b) = pending.entry(sender.clone()).or_insert((0, 0));
        if *n >= PENDING_STANZAS || *b + bytes > PENDING_BYTES {
            if *n == 0 {
                pending.remove(&sender);
            }
            return None;
        }
        *n += 1;
        *b += bytes;
        Some(PendingTicket {
            fed: Arc::downgrade(self),
            sender,
            bytes,
        })
    }

    /// Called by a domain's outbound task as it ends: it is forgotten
    /// unless something was queued meanwhile (then it goes on).
    fn retire(&self, local: &str, remote: &str, rx: &mpsc::Receiver<Pending>) -> bool {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if !rx.is_empty() {
            return false;
        }
        queues.remove(&(local.to_owned(), remote.to_owned()));
        true
    }

    /// Tells the local sender of `stanza` that it could not be delivered
    /// (messages and requests only; never an error for an error).
    fn bounce(self: &Arc<Self>, stanza: XmppStanza, condition: &str, why: &str) {
        tracing::info!(to = %stanza.to, condition, why, "chat stanza not delivered to another server");
        let Ok(el) = parse_element(stanza.stanza.as_bytes(), NS_CLIENT) else {
            return;
        };
        let Some(reply) = error_reply(&el, &stanza.from, &stanza.to, condition, why) else {
            return;
        };
        // Only users' chat grains send to other servers; a room's address
        // (name@rooms.<domain>) must never be read as a user's.
        if stanza
            .from
            .split_once('@')
            .is_some_and(|(_, d)| d.to_ascii_lowercase().starts_with("rooms."))
        {
            return;
        }
        let Some(local) = stanza.from.split('@').next().map(str::to_lowercase) else {
            return;
        };
        let Ok(grain) = GrainId::for_user(&local, "xmpp") else {
            return;
        };
        let Ok(permit) = self.bouncing.clone().try_acquire_owned() else {
            tracing::warn!(to = %stanza.from, "too many bounces under way; one is dropped");
            return;
        };
        let grains = self.grains.clone();
        let back = XmppStanza {
            from: stanza.to,
            to: stanza.from,
            stanza: reply.to_xml(NS_CLIENT),
        };
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = grains.deliver_xmpp(&grain, back).await {
                tracing::debug!(error = %e, "the bounce was not delivered either");
            }
        });
    }
}

/// A stanza waiting for another server, counted against its sender.
pub(crate) struct Pending {
    pub(crate) stanza: XmppStanza,
    #[allow(dead_code)] // held for its Drop
    ticket: PendingTicket,
}

/// Uncounts a pending stanza when it is sent or bounced.
struct PendingTicket {
    fed: std::sync::Weak<Federation>,
    sender: String,
    bytes: usize,
}

impl Drop for PendingTicket {
    fn drop(&mut self) {
        let Some(fed) = self.fed.upgrade() else {
            return;
        };
        let mut pending = fed.pending.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((n, b)) = pending.get_mut(&self.sender) {
            *n = n.saturating_sub(1);
            *b = b.saturating_sub(self.bytes);
            if *n == 0 {
                pending.remove(&self.sender);
            }
        }
    }
}

/// One inbound connection counted against its address.
struct InboundSlot {
    fed: Arc<Federation>,
    key: String,
}

impl Drop for InboundSlot {
    fn drop(&mut self) {
        let mut guard = self.fed.inbound.lock().unwrap_or_else(|p| p.into_inner());
        let (per, total) = &mut *guard;
        *total = total.saturating_sub(1);
        if let Some(n) = per.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.key);
            }
        }
    }
}

/// Whether an address is one on the public internet (not loopback,
/// private, link-local, shared, documentation, multicast or unspecified).
fn is_global(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || o[0] == 0
                || o[0] >= 240
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (18..20).contains(&o[1])))
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                std::net::Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)
            };
            // Addresses that carry an IPv4 one: judged by it (mapped,
            // compatible, NAT64, 6to4).
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_global(IpAddr::V4(v4));
            }
            if s[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified() {
                return is_global(IpAddr::V4(embedded(s[6], s[7])));
            }
            if s[0] == 0x64 && s[1] == 0xff9b {
                return is_global(IpAddr::V4(embedded(s[6], s[7])));
            }
            if s[0] == 0x2002 {
                return is_global(IpAddr::V4(embedded(s[1], s[2])));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
                || s[0] == 0x2001 && s[1] == 0x0db8)
        }
    }
}

/// One counted stream from a domain; uncounted when dropped.
struct StreamSlot {
    fed: Arc<Federation>,
    domain: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut counts = self
            .fed
            .streams_from
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.domain) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.domain);
            }
        }
    }
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() > 256 {
        return None;
    }
    hex::decode(text).ok()
}

/// The stanza error (RFC 6120 §8.3) answering `el`, which went from
/// `from` to `to`; `None` for what is never answered with an error.
fn error_reply(el: &Element, from: &str, to: &str, condition: &str, why: &str) -> Option<Element> {
    if !stanza::wants_error_reply(el) {
        return None;
    }
    let mut original = el.clone();
    original.set_attr("from", from);
    original.set_attr("to", to);
    let text = (!why.is_empty()).then_some(why);
    Some(stanza::error_reply(
        &original,
        stanza::error_kind(condition),
        condition,
        text,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_global() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.1.1",
            "169.254.0.1",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:192.168.0.1",
        ] {
            assert!(!is_global(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "2a00:1450:4001::1",
            "::ffff:93.184.216.34",
            "64:ff9b::93.184.216.34",
        ] {
            assert!(is_global(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn errors_answer_requests_but_never_errors() {
        let m = parse_element(
            b"<message id='1' type='chat'><body>x</body></message>",
            NS_CLIENT,
        )
        .unwrap();
        let r = error_reply(
            &m,
            "a@x.test/r",
            "b@y.test",
            "remote-server-not-found",
            "no",
        )
        .unwrap();
        let xml = r.to_xml(NS_CLIENT);
        assert!(
            xml.contains("type='error'") && xml.contains("from='b@y.test'"),
            "{xml}"
        );
        assert!(xml.contains("<remote-server-not-found"), "{xml}");
        let e = parse_element(b"<message type='error'/>", NS_CLIENT).unwrap();
        assert!(error_reply(&e, "a@x", "b@y", "x", "y").is_none());
        let p = parse_element(b"<presence/>", NS_CLIENT).unwrap();
        assert!(error_reply(&p, "a@x", "b@y", "x", "y").is_none());
    }
}
