//! Streams we open to other servers: one per domain, set up when the
//! first stanza for it arrives and closed when it has been idle; and
//! short ones to ask a domain's server whether a dialback key is real.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use granary_grains::mail::XmppStanza;
use granary_wire::stanza::{Element, Frame, escape, parse_element};
use granary_wire::xmpp::{NS_CLIENT, NS_DIALBACK, NS_SERVER, NS_STREAMS, NS_TLS, Unit};
use tokio::io::{AsyncRead, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;

use super::wire::{self, Ended, Reader};
use super::{Federation, Pending, is_global};
use crate::smtp::checks::DnsProblem;

const WRITE_WAIT: Duration = Duration::from_secs(30);
/// From connecting to a stream we may send on.
const SETUP_WAIT: Duration = Duration::from_secs(60);
/// After a domain could not be reached, stanzas for it fail at once for
/// this long instead of each waiting for another attempt.
const FAILED_FOR: Duration = Duration::from_secs(30);

type Tls = TlsStream<TcpStream>;

/// Why a stream could not be set up: the stanza error condition the
/// senders get, and the reason.
struct Failed {
    condition: &'static str,
    why: String,
}

fn failed(condition: &'static str, why: impl Into<String>) -> Failed {
    Failed {
        condition,
        why: why.into(),
    }
}

/// How long a domain's task waits for more when its last attempt failed
/// (it keeps nothing open meanwhile).
const LINGER_FAILED: Duration = Duration::from_secs(30);

/// Sends the queued stanzas from our domain `local` to `domain` over one
/// stream, set up on demand, until the queue has been idle and empty.
pub(super) async fn run(
    fed: Arc<Federation>,
    local: String,
    domain: String,
    mut rx: mpsc::Receiver<Pending>,
) {
    let mut stream: Option<(WriteHalf<Tls>, tokio::task::JoinHandle<()>)> = None;
    let mut failed_at: Option<(tokio::time::Instant, Failed)> = None;
    let mut stop = fed.stop.clone();
    let stopping = loop {
        let wait = if stream.is_some() {
            fed.settings.idle
        } else {
            LINGER_FAILED.min(fed.settings.idle)
        };
        let next = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break true,
            n = tokio::time::timeout(wait, rx.recv()) => n,
        };
        let pending = match next {
            Ok(Some(p)) => p,
            Ok(None) => break false,
            Err(_) => {
                // Idle: the stream closes; the task ends unless something
                // has just been queued.
                if let Some((mut w, reader)) = stream.take() {
                    wire::end(&mut w, &Ended::Quiet).await;
                    reader.abort();
                }
                if fed.retire(&local, &domain, &rx) {
                    return;
                }
                continue;
            }
        };
        let stanza = pending.stanza;
        if stream.as_ref().is_some_and(|(_, r)| r.is_finished()) {
            stream = None;
        }
        let Some(text) = on_the_wire(&stanza) else {
            fed.bounce(stanza, "bad-request", "not a stanza");
            continue;
        };
        // At most two attempts: the stream we have (or a new one), then,
        // if writing to an old one failed, one new stream.
        let mut sent = false;
        for attempt in 0..2 {
            if stream.is_none() {
                if let Some((at, _)) = &failed_at
                    && at.elapsed() < FAILED_FOR
                {
                    break;
                }
                match tokio::time::timeout(
                    SETUP_WAIT,
                    connect(&fed, &local, &domain, Purpose::Send),
                )
                .await
                {
                    Ok(Ok(Connected { io, reader })) => {
                        failed_at = None;
                        let (r, w) = tokio::io::split(io);
                        let handle = tokio::spawn(drain(r, reader, domain.clone()));
                        stream = Some((w, handle));
                    }
                    Ok(Err(f)) => {
                        tracing::warn!(domain, why = %f.why, "cannot reach that chat server");
                        failed_at = Some((tokio::time::Instant::now(), f));
                        break;
                    }
                    Err(_) => {
                        let f = failed(
                            "remote-server-timeout",
                            "setting up the stream took too long",
                        );
                        failed_at = Some((tokio::time::Instant::now(), f));
                        break;
                    }
                }
            }
            let Some((w, _)) = stream.as_mut() else {
                break;
            };
            if wire::send(w, &text, WRITE_WAIT).await.is_ok() {
                sent = true;
                break;
            }
            stream = None;
            if attempt == 1 {
                failed_at = Some((
                    tokio::time::Instant::now(),
                    failed("remote-server-timeout", "the stream broke"),
                ));
            }
        }
        if !sent {
            let (condition, why) = match &failed_at {
                Some((_, f)) => (f.condition, f.why.clone()),
                None => ("remote-server-timeout", "the stream broke".to_owned()),
            };
            fed.bounce(stanza, condition, &why);
        }
    };
    if let Some((mut w, reader)) = stream.take() {
        wire::end(&mut w, &Ended::Stopping).await;
        reader.abort();
    }
    // What is still queued is not silently dropped.
    if stopping {
        rx.close();
        while let Ok(p) = rx.try_recv() {
            fed.bounce(p.stanza, "remote-server-timeout", "this server is stopping");
        }
    }
}

/// Reads what the other server sends on our stream (nothing but
/// keepalives, or the end) until it ends.
async fn drain(mut r: ReadHalf<Tls>, mut reader: Reader, domain: String) {
    loop {
        match reader.frame(&mut r, Duration::from_secs(24 * 3600)).await {
            Ok(Frame::End) | Err(_) => break,
            Ok(Frame::Stanza(el)) if el.is("error", NS_STREAMS) => {
                tracing::warn!(domain, error = %el.to_xml(NS_SERVER), "the other server ended our stream");
                break;
            }
            Ok(_) => {}
        }
    }
}

/// A grain's stanza as it goes on a server stream: `jabber:server`, with
/// the addresses the host checked.
fn on_the_wire(s: &XmppStanza) -> Option<String> {
    let mut el = parse_element(s.stanza.as_bytes(), NS_CLIENT).ok()?;
    if el.ns != NS_CLIENT || !matches!(el.name.as_str(), "message" | "presence" | "iq") {
        return None;
    }
    el.set_attr("from", s.from.clone());
    el.set_attr("to", s.to.clone());
    granary_wire::s2s::to_server(&mut el);
    Some(el.to_xml(NS_SERVER))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// A stream to send stanzas on: we prove our domain.
    Send,
    /// Only to ask about a key: nothing to prove.
    Verify,
}

struct Connected {
    io: Tls,
    reader: Reader,
}

/// The addresses to try for `domain`: its `_xmpp-server._tcp` SRV targets
/// in priority order, or the domain itself on the default port.
async fn targets(fed: &Federation, domain: &str) -> Result<Vec<(String, u16)>, Failed> {
    let name = format!("_xmpp-server._tcp.{domain}");
    match fed.checker.lookup(&name, "SRV").await {
        Ok(records) if !records.is_empty() => {
            let mut out: Vec<(u16, u16, String, u16)> = Vec::new();
            for r in records {
                let parts: Vec<&str> = r.split_whitespace().collect();
                if let [prio, weight, port, target] = parts[..]
                    && let (Ok(p), Ok(w), Ok(port)) = (
                        prio.parse::<u16>(),
                        weight.parse::<u16>(),
                        port.parse::<u16>(),
                    )
                {
                    out.push((
                        p,
                        u16::MAX - w,
                        target.trim_end_matches('.').to_owned(),
                        port,
                    ));
                }
            }
            out.sort();
            // "." alone: the domain says it has no such service (RFC 2782).
            if out.len() == 1 && out[0].2.is_empty() {
                return Err(failed(
                    "remote-server-not-found",
                    format!("{domain} takes no server connections"),
                ));
            }
            Ok(out.into_iter().map(|(_, _, t, p)| (t, p)).collect())
        }
        Ok(_) | Err(DnsProblem::NoRecords) | Err(DnsProblem::NoSuchDomain) => {
            Ok(vec![(domain.to_owned(), fed.settings.default_port)])
        }
        Err(DnsProblem::Failed(e)) => Err(failed(
            "remote-server-timeout",
            format!("cannot look up {domain}: {e}"),
        )),
    }
}

/// Opens a stream from our `local` to `domain`'s server: TCP to the
/// first target that answers, STARTTLS, and (to send) dialback.
async fn connect(
    fed: &Arc<Federation>,
    local: &str,
    domain: &str,
    purpose: Purpose,
) -> Result<Connected, Failed> {
    let mut last = failed(
        "remote-server-not-found",
        format!("no server of {domain} could be reached"),
    );
    for (host, port) in targets(fed, domain).await? {
        let ips = match fed.checker.host_addresses(&host).await {
            Ok(ips) => ips,
            Err(e) => {
                last = failed(
                    "remote-server-not-found",
                    format!("{host} has no address: {e:?}"),
                );
                continue;
            }
        };
        for ip in ips.into_iter().take(2) {
            let addr = SocketAddr::new(ip, port);
            if !fed.settings.allow_private_addresses && !is_global(ip) {
                last = failed(
                    "remote-server-not-found",
                    format!(
                        "{host} is at {ip}, not a public address \
                         (xmpp.s2s_allow_private_addresses)"
                    ),
                );
                continue;
            }
            let tcp =
                match tokio::time::timeout(fed.settings.connect_timeout, TcpStream::connect(addr))
                    .await
                {
                    Ok(Ok(t)) => t,
                    _ => {
                        last = failed(
                            "remote-server-not-found",
                            format!("cannot connect to {addr}"),
                        );
                        continue;
                    }
                };
            let _ = tcp.set_nodelay(true);
            match negotiate(fed, local, domain, tcp, purpose).await {
                Ok(c) => return Ok(c),
                Err(f) => {
                    tracing::info!(domain, %addr, why = %f.why, "s2s stream setup failed");
                    last = f;
                }
            }
        }
    }
    Err(last)
}

/// Reads the other server's header (and its id) and its features.
async fn header_and_features<S: AsyncRead + Unpin>(
    reader: &mut Reader,
    io: &mut S,
) -> Result<(Option<String>, Element), Failed> {
    let broke = |e: Ended| {
        failed(
            "remote-server-not-found",
            format!("the stream ended: {e:?}"),
        )
    };
    let id = match reader.frame(io, SETUP_WAIT).await.map_err(broke)? {
        Frame::Header(Unit::StreamHeader { default_ns, id, .. }) => {
            if default_ns.as_deref() != Some(NS_SERVER) {
                return Err(failed(
                    "remote-server-not-found",
                    "the other side does not speak jabber:server",
                ));
            }
            id
        }
        _ => return Err(failed("remote-server-not-found", "no stream header")),
    };
    match reader.frame(io, SETUP_WAIT).await.map_err(broke)? {
        Frame::Stanza(el) if el.is("features", NS_STREAMS) => Ok((id, el)),
        Frame::Stanza(el) if el.is("error", NS_STREAMS) => Err(failed(
            "remote-server-not-found",
            format!("stream error: {}", el.to_xml(NS_SERVER)),
        )),
        _ => Err(failed("remote-server-not-found", "no stream features")),
    }
}

async fn negotiate(
    fed: &Arc<Federation>,
    ours: &str,
    domain: &str,
    mut tcp: TcpStream,
    purpose: Purpose,
) -> Result<Connected, Failed> {
    let header = granary_wire::xmpp::s2s_stream_header(ours, domain, None);
    let broke = |_| failed("remote-server-not-found", "the connection broke");
    let mut reader = Reader::new(64 << 10, fed.stop.clone());
    wire::send(&mut tcp, &header, WRITE_WAIT)
        .await
        .map_err(broke)?;
    let (_, features) = header_and_features(&mut reader, &mut tcp).await?;
    if features.child("starttls", NS_TLS).is_none() {
        return Err(failed(
            "remote-server-not-found",
            format!("{domain} does not offer TLS; nothing is sent in clear"),
        ));
    }
    let starttls = format!("<starttls xmlns='{NS_TLS}'/>");
    wire::send(&mut tcp, &starttls, WRITE_WAIT)
        .await
        .map_err(broke)?;
    match reader.frame(&mut tcp, SETUP_WAIT).await {
        Ok(Frame::Stanza(el)) if el.is("proceed", NS_TLS) => {}
        _ => return Err(failed("remote-server-not-found", "STARTTLS was refused")),
    }
    reader.clear();
    let name = rustls_pki_types::ServerName::try_from(domain.to_owned())
        .map_err(|_| failed("remote-server-not-found", "not a domain name"))?;
    let connector = tokio_rustls::TlsConnector::from(fed.client_tls.clone());
    let mut tls = match tokio::time::timeout(SETUP_WAIT, connector.connect(name, tcp)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            return Err(failed(
                "remote-server-not-found",
                format!("TLS failed: {e}"),
            ));
        }
        Err(_) => return Err(failed("remote-server-timeout", "TLS took too long")),
    };
    let chain = tls.get_ref().1.peer_certificates().map(<[_]>::to_vec);
    let verified = fed.certificate_verifies(chain.as_deref(), domain);
    if fed.settings.require_verified && !verified {
        return Err(failed(
            "remote-server-not-found",
            format!("{domain}'s certificate does not verify (xmpp.s2s_require_verified)"),
        ));
    }
    wire::send(&mut tls, &header, WRITE_WAIT)
        .await
        .map_err(broke)?;
    let (id, features) = header_and_features(&mut reader, &mut tls).await?;
    if purpose == Purpose::Verify {
        return Ok(Connected { io: tls, reader });
    }
    // We prove our domain with dialback: the other server asks ours
    // whether this key is real.
    let offers_dialback = features
        .child("dialback", "urn:xmpp:features:dialback")
        .is_some();
    let Some(id) = id else {
        return Err(failed("remote-server-not-found", "the stream has no id"));
    };
    if !offers_dialback {
        tracing::debug!(domain, "no dialback feature offered; trying it anyway");
    }
    let key = fed.dialback_key(domain, ours, &id);
    let ask = format!(
        "<db:result from='{}' to='{}'>{key}</db:result>",
        escape(ours),
        escape(domain)
    );
    wire::send(&mut tls, &ask, WRITE_WAIT)
        .await
        .map_err(broke)?;
    // One deadline for the whole answer, however the other side trickles.
    let deadline = tokio::time::Instant::now() + SETUP_WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match reader.frame(&mut tls, left).await {
            Ok(Frame::Stanza(el)) if el.is("result", NS_DIALBACK) => {
                let about_us = el
                    .attr("from")
                    .is_some_and(|f| f.eq_ignore_ascii_case(domain))
                    && el.attr("to").is_some_and(|t| t.eq_ignore_ascii_case(ours));
                return match el.attr("type") {
                    Some("valid") if about_us => {
                        tracing::info!(domain, verified, "s2s stream to another server ready");
                        reader.max = fed.settings.max_stanza;
                        Ok(Connected { io: tls, reader })
                    }
                    _ => Err(failed(
                        "remote-server-not-found",
                        format!("{domain} refused our dialback: {}", el.to_xml(NS_SERVER)),
                    )),
                };
            }
            Ok(Frame::Stanza(el)) if el.is("error", NS_STREAMS) => {
                return Err(failed(
                    "remote-server-not-found",
                    format!("stream error: {}", el.to_xml(NS_SERVER)),
                ));
            }
            Ok(Frame::Stanza(_)) => {}
            Ok(_) | Err(_) => {
                return Err(failed(
                    "remote-server-not-found",
                    "the stream ended during dialback",
                ));
            }
        }
    }
}

impl Federation {
    /// Asks `domain`'s own server whether `key` is one it gave for our
    /// (`ours`) stream `id`: `Ok(true)` only if it says so.
    pub(super) async fn verify_remote_key(
        self: Arc<Self>,
        ours: &str,
        domain: &str,
        id: &str,
        key: &str,
    ) -> Result<bool, String> {
        let work = async {
            let Connected {
                io: mut tls,
                mut reader,
            } = connect(&self, ours, domain, Purpose::Verify)
                .await
                .map_err(|f| f.why)?;
            let ask = format!(
                "<db:verify from='{}' to='{}' id='{}'>{}</db:verify>",
                escape(ours),
                escape(domain),
                escape(id),
                escape(key)
            );
            wire::send(&mut tls, &ask, WRITE_WAIT)
                .await
                .map_err(|_| "the connection broke".to_owned())?;
            let deadline = tokio::time::Instant::now() + SETUP_WAIT;
            let answer = loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match reader.frame(&mut tls, left).await {
                    Ok(Frame::Stanza(el)) if el.is("verify", NS_DIALBACK) => {
                        break el.attr("type") == Some("valid")
                            && el.attr("id") == Some(id)
                            && el
                                .attr("from")
                                .is_some_and(|f| f.eq_ignore_ascii_case(domain))
                            && el.attr("to").is_some_and(|t| t.eq_ignore_ascii_case(ours));
                    }
                    Ok(Frame::Stanza(el)) if el.is("error", NS_STREAMS) => {
                        return Err(format!("stream error: {}", el.to_xml(NS_SERVER)));
                    }
                    Ok(Frame::Stanza(_)) => {}
                    Ok(_) | Err(_) => return Err("the stream ended".to_owned()),
                }
            };
            wire::end(&mut tls, &Ended::Quiet).await;
            Ok(answer)
        };
        tokio::time::timeout(SETUP_WAIT, work)
            .await
            .unwrap_or_else(|_| Err("the domain's server did not answer in time".to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grain_stanza_goes_out_in_the_server_namespace_with_checked_addresses() {
        let s = XmppStanza {
            from: "alice@chat.test/phone".into(),
            to: "bob@other.test".into(),
            stanza: "<message from='mallory@chat.test' type='chat'><body>hi</body></message>"
                .into(),
        };
        let out = on_the_wire(&s).unwrap();
        let el = parse_element(out.as_bytes(), NS_SERVER).unwrap();
        assert_eq!(el.attr("from"), Some("alice@chat.test/phone"));
        assert_eq!(el.attr("to"), Some("bob@other.test"));
        assert!(el.child("body", NS_SERVER).is_some(), "{out}");
        assert!(!out.contains("jabber:client"), "{out}");
    }
}
