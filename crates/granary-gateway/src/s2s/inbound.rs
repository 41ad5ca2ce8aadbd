//! Streams other servers open to us, on the `xmpp-s2s` listener: STARTTLS,
//! then the peer proves its domain (SASL EXTERNAL with a certificate that
//! verifies, or dialback), then its stanzas go to our users' grains.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use granary_grains::GrainId;
use granary_grains::mail::XmppStanza;
use granary_wire::stanza::{Element, Frame, escape};
use granary_wire::xmpp::{NS_CLIENT, NS_DIALBACK, NS_SASL, NS_SERVER, NS_TLS, Unit, stream_error};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use super::wire::{self, Ended, Reader};
use super::{Federation, StreamSlot, error_reply};
use crate::Shared;

/// From accepting a connection to a proven domain.
const LOGIN_WAIT: Duration = Duration::from_secs(60);
/// Bytes before the peer has proven anything.
const MAX_BEFORE_AUTH: usize = 16 << 10;
const WRITE_WAIT: Duration = Duration::from_secs(30);
/// Domains one stream may prove (dialback lets a stream carry several).
const MAX_PROVEN: usize = 8;
/// How long a stanza may wait for its recipient's grain (started if
/// stopped) before the sender is told to try later.
const DELIVER_WAIT: Duration = Duration::from_secs(30);

/// Serves the `xmpp-s2s` listener until `shutdown`. Without federation
/// set up (`shared.s2s`), every stream is refused.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let s = shared.clone();
    crate::accept_loop(
        listener,
        &shared,
        shutdown,
        "xmpp-s2s",
        move |tcp, peer, stop| {
            let fed = s.s2s.clone();
            async move {
                let Some(fed) = fed else {
                    return;
                };
                // Streams from one address, and in all, are bounded: an
                // unproven stream costs a task and may make us dial out.
                let Some(_slot) = fed.admit_inbound(peer.ip()) else {
                    tracing::info!("too many server streams from that address; refused");
                    return;
                };
                let _ = tcp.set_nodelay(true);
                let stream = Inbound {
                    fed,
                    peer,
                    reader: Reader::new(MAX_BEFORE_AUTH, stop),
                    id: String::new(),
                    login_by: tokio::time::Instant::now() + LOGIN_WAIT,
                    proven: HashSet::new(),
                    local: None,
                    locals: HashSet::new(),
                    slots: Vec::new(),
                };
                stream.run(tcp).await;
            }
        },
    )
    .await
}

struct Inbound {
    fed: Arc<Federation>,
    peer: SocketAddr,
    reader: Reader,
    /// Our stream id (the latest header's): dialback keys name it.
    id: String,
    /// The stream must have proven a domain by then.
    login_by: tokio::time::Instant,
    /// Domains this stream has proven; only these may be `from`.
    proven: HashSet<String>,
    /// The domain of ours the stream's header named.
    local: Option<String>,
    /// Our domains stanzas on this stream may be for: the header's and
    /// any dialback named.
    locals: HashSet<String>,
    slots: Vec<StreamSlot>,
}

fn fresh_id() -> String {
    let mut id = [0u8; 12];
    let _ = getrandom::fill(&mut id);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id)
}

impl Inbound {
    /// How long the next frame may take: until the login deadline while
    /// nothing is proven, then the idle timeout.
    fn wait(&self) -> Duration {
        if self.proven.is_empty() {
            self.login_by
                .saturating_duration_since(tokio::time::Instant::now())
        } else {
            self.fed.settings.idle
        }
    }

    async fn run(mut self, mut tcp: TcpStream) {
        // In clear: the header, then STARTTLS and nothing else.
        let starttls = format!("<starttls xmlns='{NS_TLS}'><required/></starttls>");
        if let Err(e) = self.open(&mut tcp, &starttls).await {
            wire::end(&mut tcp, &e).await;
            return;
        }
        let step = match self.reader.frame(&mut tcp, self.wait()).await {
            Ok(Frame::Stanza(el)) if el.is("starttls", NS_TLS) => Ok(()),
            Ok(Frame::End) => Err(Ended::Quiet),
            Ok(_) => Err(Ended::Error(stream_error(
                "policy-violation",
                "use STARTTLS first: nothing is exchanged in clear",
            ))),
            Err(e) => Err(e),
        };
        if let Err(e) = step {
            wire::end(&mut tcp, &e).await;
            return;
        }
        let proceed = format!("<proceed xmlns='{NS_TLS}'/>");
        if wire::send(&mut tcp, &proceed, WRITE_WAIT).await.is_err() {
            return;
        }
        self.reader.clear();
        let acceptor = tokio_rustls::TlsAcceptor::from(self.fed.server_tls.clone());
        let mut tls =
            match tokio::time::timeout(Duration::from_secs(30), acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                _ => {
                    tracing::debug!("s2s TLS handshake failed or timed out");
                    return;
                }
            };
        let chain = tls.get_ref().1.peer_certificates().map(<[_]>::to_vec);
        let why = self.secured(&mut tls, chain).await;
        wire::end(&mut tls, &why).await;
    }

    /// Reads the peer's header and answers with ours (a new id) and
    /// `features`.
    async fn open<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        features: &str,
    ) -> Result<(), Ended> {
        match self.reader.frame(io, self.wait()).await? {
            Frame::Header(unit) => self.answer_header(io, unit, features).await,
            _ => Err(Ended::Error(stream_error(
                "not-well-formed",
                "a stream starts with its header",
            ))),
        }
    }

    /// The stream after TLS, until it ends; what ended it.
    async fn secured<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        chain: Option<Vec<rustls_pki_types::CertificateDer<'static>>>,
    ) -> Ended {
        // The header names the peer's domain; its certificate may prove it.
        let mut features = String::new();
        let unit = match self.reader.frame(io, self.wait()).await {
            Ok(Frame::Header(u)) => u,
            Ok(_) => {
                // Our header first, so the error is inside a stream.
                let header = granary_wire::xmpp::s2s_stream_header(
                    self.local.as_deref().unwrap_or(self.fed.domains.primary()),
                    "",
                    Some(&self.id),
                );
                return Ended::Error(format!(
                    "{header}{}",
                    stream_error("not-well-formed", "a stream starts with its header")
                ));
            }
            Err(e) => return e,
        };
        // The header names the peer's domain; its certificate may prove it.
        let verified = match &unit {
            Unit::StreamHeader {
                from: Some(from), ..
            } => {
                let from = from.to_ascii_lowercase();
                self.fed
                    .certificate_verifies(chain.as_deref(), &from)
                    .then_some(from)
            }
            _ => None,
        };
        if verified.is_some() {
            features.push_str(&format!(
                "<mechanisms xmlns='{NS_SASL}'><mechanism>EXTERNAL</mechanism></mechanisms>"
            ));
        }
        if !self.fed.settings.require_verified {
            features.push_str("<dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>");
        }
        if let Err(e) = self.answer_header(io, unit, &features).await {
            return e;
        }
        loop {
            let frame = match self.reader.frame(io, self.wait()).await {
                Ok(f) => f,
                Err(e) => return e,
            };
            let el = match frame {
                Frame::End => return Ended::Quiet,
                Frame::Header(_) => {
                    return Ended::Error(stream_error("not-well-formed", "a header mid-stream"));
                }
                Frame::Stanza(el) => el,
            };
            let step = if el.is("auth", NS_SASL) {
                self.external(io, &el, verified.as_deref()).await
            } else if el.is("result", NS_DIALBACK) {
                self.dialback_result(io, &el).await
            } else if el.is("verify", NS_DIALBACK) {
                self.dialback_verify(io, &el).await
            } else if el.ns == NS_SERVER
                && matches!(el.name.as_str(), "message" | "presence" | "iq")
            {
                self.stanza(el).await
            } else {
                Err(Ended::Error(stream_error(
                    "unsupported-stanza-type",
                    "not a stanza this server takes",
                )))
            };
            if let Err(e) = step {
                return e;
            }
        }
    }

    /// Answers a header already read: it must be a server stream to one
    /// of our chat domains (the same one after a restart).
    async fn answer_header<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        unit: Unit,
        features: &str,
    ) -> Result<(), Ended> {
        let Unit::StreamHeader {
            to,
            from,
            default_ns,
            ..
        } = unit
        else {
            return Err(Ended::Error(stream_error(
                "not-well-formed",
                "a bad header",
            )));
        };
        self.id = fresh_id();
        let to = to.unwrap_or_default().to_ascii_lowercase();
        let served = match &self.local {
            Some(local) => *local == to,
            None => self.fed.domains.serves(&to).await,
        };
        // Our header first, so a stream error has a stream to be in.
        let ours = if served {
            to.clone()
        } else {
            self.fed.domains.primary().to_owned()
        };
        let header = granary_wire::xmpp::s2s_stream_header(
            &ours,
            from.as_deref().unwrap_or(""),
            Some(&self.id),
        );
        if default_ns.as_deref() != Some(NS_SERVER) {
            let _ = wire::send(io, &header, WRITE_WAIT).await;
            return Err(Ended::Error(stream_error(
                "invalid-namespace",
                "this is a server stream: jabber:server",
            )));
        }
        if !served {
            let _ = wire::send(io, &header, WRITE_WAIT).await;
            return Err(Ended::Error(stream_error(
                "host-unknown",
                "that domain is not served here",
            )));
        }
        self.local = Some(to.clone());
        self.locals.insert(to);
        let text = format!("{header}<stream:features>{features}</stream:features>");
        wire::send(io, &text, WRITE_WAIT).await
    }

    /// Takes a domain as proven on this stream (within its share of
    /// streams).
    async fn prove(&mut self, domain: &str, how: &'static str) -> Result<(), Ended> {
        if self.proven.contains(domain) {
            return Ok(());
        }
        if self.proven.len() >= MAX_PROVEN {
            return Err(Ended::Error(stream_error(
                "policy-violation",
                "too many domains on one stream",
            )));
        }
        if !self.fed.domains.foreign(domain).await {
            return Err(Ended::Error(stream_error(
                "invalid-from",
                "that is this server's own domain",
            )));
        }
        let Some(slot) = self.fed.stream_from(domain) else {
            return Err(Ended::Error(stream_error(
                "policy-violation",
                "too many streams from that domain",
            )));
        };
        tracing::info!(peer = %self.peer, domain, how, "s2s stream from another server proven");
        self.slots.push(slot);
        self.proven.insert(domain.to_owned());
        self.reader.max = self.fed.settings.max_stanza;
        Ok(())
    }

    /// SASL EXTERNAL: the certificate verified for the header's `from`.
    async fn external<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        el: &Element,
        verified: Option<&str>,
    ) -> Result<(), Ended> {
        let failure = |c: &str| format!("<failure xmlns='{NS_SASL}'><{c}/></failure>");
        let Some(domain) = verified else {
            wire::send(io, &failure("invalid-mechanism"), WRITE_WAIT).await?;
            return Err(Ended::Quiet);
        };
        if el.attr("mechanism") != Some("EXTERNAL") {
            wire::send(io, &failure("invalid-mechanism"), WRITE_WAIT).await?;
            return Ok(());
        }
        // The authorization identity, when given, must be that domain.
        let text = el.text();
        let text = text.trim();
        if !text.is_empty() && text != "=" {
            let asked = base64::engine::general_purpose::STANDARD
                .decode(text)
                .ok()
                .and_then(|b| String::from_utf8(b).ok());
            if !asked.is_some_and(|a| a.eq_ignore_ascii_case(domain)) {
                wire::send(io, &failure("invalid-authzid"), WRITE_WAIT).await?;
                return Err(Ended::Quiet);
            }
        }
        let domain = domain.to_owned();
        self.prove(&domain, "sasl-external").await?;
        wire::send(io, &format!("<success xmlns='{NS_SASL}'/>"), WRITE_WAIT).await?;
        // The stream restarts; no features are left to offer.
        let unit = match self.reader.frame(io, self.wait()).await? {
            Frame::Header(u) => u,
            _ => {
                return Err(Ended::Error(stream_error(
                    "not-well-formed",
                    "the stream restarts with a header",
                )));
            }
        };
        self.answer_header(io, unit, "").await
    }

    /// `<db:result>`: the peer says it is `from`; we ask `from`'s own
    /// server whether the key is real before believing it.
    async fn dialback_result<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        el: &Element,
    ) -> Result<(), Ended> {
        let (Some(from), Some(to)) = (el.attr("from"), el.attr("to")) else {
            return Err(Ended::Error(stream_error(
                "improper-addressing",
                "dialback needs from and to",
            )));
        };
        // A request has no type; an answer has no business here.
        if el.attr("type").is_some() {
            return Err(Ended::Error(stream_error(
                "not-authorized",
                "a db:result with a type is an answer, not a request",
            )));
        }
        // Both domains as addresses parse them.
        let (Ok(from), Ok(to)) = (
            granary_wire::jid::Jid::parse(from),
            granary_wire::jid::Jid::parse(to),
        ) else {
            return Err(Ended::Error(stream_error(
                "invalid-from",
                "not domain names",
            )));
        };
        if from.local.is_some() || from.resource.is_some() || to.local.is_some() {
            return Err(Ended::Error(stream_error(
                "invalid-from",
                "not domain names",
            )));
        }
        let (from, to) = (from.domain, to.domain);
        // Never ask ourselves about ourselves.
        if !self.fed.domains.foreign(&from).await {
            return Err(Ended::Error(stream_error(
                "invalid-from",
                "that is this server's own domain",
            )));
        }
        let served = self.fed.domains.serves(&to).await;
        let ours = if served {
            to.clone()
        } else {
            self.local.clone().unwrap_or_default()
        };
        let answer = |kind: &str, extra: &str| {
            format!(
                "<db:result from='{}' to='{}' type='{kind}'>{extra}</db:result>",
                escape(&ours),
                escape(&from)
            )
        };
        if !served {
            let e = "<error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>";
            return wire::send(io, &answer("error", e), WRITE_WAIT).await;
        }
        if self.fed.settings.require_verified {
            let e = "<error type='auth'><not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>";
            wire::send(io, &answer("error", e), WRITE_WAIT).await?;
            return Err(Ended::Error(stream_error(
                "not-authorized",
                "this server takes only servers whose certificates verify",
            )));
        }
        let key = el.text();
        // A few checks at once, in all: each opens a stream to another
        // server.
        let Ok(_checking) = self.fed.verifying.clone().try_acquire_owned() else {
            let e = "<error type='wait'><resource-constraint xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>";
            return wire::send(io, &answer("error", e), WRITE_WAIT).await;
        };
        let valid = self
            .fed
            .clone()
            .verify_remote_key(&ours, &from, &self.id, key.trim())
            .await;
        match valid {
            Ok(true) => {
                self.prove(&from, "dialback").await?;
                self.locals.insert(ours.clone());
                wire::send(io, &answer("valid", ""), WRITE_WAIT).await
            }
            Ok(false) => {
                tracing::warn!(peer = %self.peer, domain = %from, "dialback refused: the domain's server does not know that key");
                wire::send(io, &answer("invalid", ""), WRITE_WAIT).await?;
                Err(Ended::Error(stream_error(
                    "not-authorized",
                    "dialback failed: that domain's server did not confirm the key",
                )))
            }
            Err(why) => {
                tracing::warn!(peer = %self.peer, domain = %from, why, "dialback could not be checked");
                let e = "<error type='cancel'><remote-server-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>";
                wire::send(io, &answer("error", e), WRITE_WAIT).await?;
                Err(Ended::Error(stream_error(
                    "remote-connection-failed",
                    "dialback could not be checked with that domain's server",
                )))
            }
        }
    }

    /// `<db:verify>`: another server asks whether a key is one of ours.
    async fn dialback_verify<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        el: &Element,
    ) -> Result<(), Ended> {
        let (Some(from), Some(to), Some(id)) = (el.attr("from"), el.attr("to"), el.attr("id"))
        else {
            return Err(Ended::Error(stream_error(
                "improper-addressing",
                "db:verify needs from, to and id",
            )));
        };
        // `from` received our stream; `to` must be us, the originator.
        let ours = to.to_ascii_lowercase();
        let valid = self.fed.domains.serves(&ours).await
            && self.fed.dialback_valid(from, &ours, id, el.text().trim());
        let text = format!(
            "<db:verify from='{}' to='{}' id='{}' type='{}'/>",
            escape(&ours),
            escape(from),
            escape(id),
            if valid { "valid" } else { "invalid" }
        );
        wire::send(io, &text, WRITE_WAIT).await
    }

    /// A stanza from a proven domain for one of our users.
    async fn stanza(&mut self, mut el: Element) -> Result<(), Ended> {
        let checked = granary_wire::s2s::addressed(
            &el,
            |d| self.proven.contains(d),
            |d| self.locals.contains(d),
        )
        .map_err(|r| Ended::Error(stream_error(r.condition, r.text)))?;
        if !self.fed.within_rate(&checked.from.domain) {
            return Err(Ended::Error(stream_error(
                "policy-violation",
                "too many stanzas from your domain; slow down",
            )));
        }
        granary_wire::s2s::to_client(&mut el);
        let (from, to) = (checked.from.to_string(), checked.to.to_string());
        let Some(local) = checked.to.local.as_deref() else {
            self.to_server(&from, &to, &el);
            return Ok(());
        };
        let stanza = XmppStanza {
            from: from.clone(),
            to: to.clone(),
            stanza: el.to_xml(NS_CLIENT),
        };
        // Whether an account exists is not told (RFC 6121 §8.5.1): no such
        // user and a refusal for internal reasons read the same.
        let unavailable = "service-unavailable: not available".to_owned();
        let refused = match GrainId::for_user(local, "xmpp") {
            Ok(grain) => {
                // The delivery runs on its own, holding one of a bounded
                // number of places: past the stream's wait, it goes on
                // (its grain may be starting) and the stream goes on to
                // its next stanza, telling the other server nothing.
                let place = self.fed.delivering.clone().acquire_owned().await;
                let grains = self.fed.grains.clone();
                let delivery = tokio::spawn(async move {
                    let _place = place;
                    grains.deliver_xmpp(&grain, stanza).await
                });
                match tokio::time::timeout(DELIVER_WAIT, delivery).await {
                    Ok(Ok(Ok(()))) => None,
                    // The grain's own refusals (blocked, not subscribed)
                    // are stanza conditions.
                    Ok(Ok(Err(granary_grains::GrainError {
                        problem: granary_grains::Problem::Grain(text),
                        ..
                    }))) if !text.starts_with("item-not-found") => Some(text),
                    Ok(_) => Some(unavailable),
                    Err(_) => {
                        tracing::warn!(to = %to, "a delivery from another server is slow; the stream goes on");
                        None
                    }
                }
            }
            Err(_) => Some(unavailable),
        };
        if let Some(text) = refused {
            // Only the condition goes to the other server: the text of a
            // refusal may say things about this host it has no need of.
            let condition = text
                .split_once(':')
                .map(|(c, _)| c.trim())
                .filter(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'))
                .unwrap_or("service-unavailable");
            if let Some(reply) = error_reply(&el, &from, &to, condition, "") {
                self.fed.submit(XmppStanza {
                    from: to,
                    to: from,
                    stanza: reply.to_xml(NS_CLIENT),
                });
            }
        }
        Ok(())
    }

    /// A stanza for this server itself: pings and disco answered, other
    /// requests refused, the rest dropped.
    fn to_server(&self, from: &str, to: &str, el: &Element) {
        if el.name != "iq" || !matches!(el.attr("type"), Some("get") | Some("set")) {
            return;
        }
        let child = el.elements().next();
        let answer = match child {
            Some(c) if c.is("ping", "urn:xmpp:ping") => {
                Some(Element::new("iq", NS_CLIENT).with_attr("type", "result"))
            }
            Some(c)
                if c.is("query", "http://jabber.org/protocol/disco#info")
                    && c.attr("node").is_none() =>
            {
                let query = Element::new("query", "http://jabber.org/protocol/disco#info")
                    .with_child(
                        Element::new("identity", "http://jabber.org/protocol/disco#info")
                            .with_attr("category", "server")
                            .with_attr("type", "im")
                            .with_attr("name", "Granary"),
                    )
                    .with_child(
                        Element::new("feature", "http://jabber.org/protocol/disco#info")
                            .with_attr("var", "http://jabber.org/protocol/disco#info"),
                    )
                    .with_child(
                        Element::new("feature", "http://jabber.org/protocol/disco#info")
                            .with_attr("var", "urn:xmpp:ping"),
                    );
                Some(
                    Element::new("iq", NS_CLIENT)
                        .with_attr("type", "result")
                        .with_child(query),
                )
            }
            _ => None,
        };
        let reply = match answer {
            Some(mut r) => {
                r.set_attr("from", to);
                r.set_attr("to", from);
                if let Some(id) = el.attr("id") {
                    r.set_attr("id", id);
                }
                r
            }
            None => match error_reply(el, from, to, "service-unavailable", "") {
                Some(r) => r,
                None => return,
            },
        };
        self.fed.submit(XmppStanza {
            from: to.to_owned(),
            to: from.to_owned(),
            stanza: reply.to_xml(NS_CLIENT),
        });
    }
}
