//! An XMPP client's stream before it has logged in (RFC 6120 §4, §5,
//! §6), sans I/O: the stream header, STARTTLS, and the SASL elements
//! (`auth`, `response`, `abort`), read one top-level unit at a time from
//! untrusted bytes (fuzzed: `xmpp_pre_auth`).
//!
//! `parse(buf)` answers `Ok(None)` when it needs more bytes, or the first
//! unit and how many bytes it took. No DTD, no entity but the five
//! predefined ones and character references, at most [`MAX_UNIT`] bytes
//! per unit before login, so a client that never finishes one is cut off.

use base64::Engine;
use quick_xml::events::Event;

/// The largest unit read before login.
pub const MAX_UNIT: usize = 16 * 1024;

pub const NS_CLIENT: &str = "jabber:client";
pub const NS_STREAMS: &str = "http://etherx.jabber.org/streams";
pub const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
pub const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";

pub const NS_STREAM_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-streams";

/// The server's stream header for `domain`, with stream id `id`.
pub fn stream_header(domain: &str, id: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream xmlns='{NS_CLIENT}' \
         xmlns:stream='{NS_STREAMS}' id='{}' from='{}' version='1.0' xml:lang='en'>",
        crate::stanza::escape(id),
        crate::stanza::escape(domain)
    )
}

pub const NS_SERVER: &str = "jabber:server";
pub const NS_DIALBACK: &str = "jabber:server:dialback";

/// A server-to-server stream header (RFC 6120 §4.7, with the dialback
/// prefix of XEP-0220 declared): `id` only on the receiving side.
pub fn s2s_stream_header(from: &str, to: &str, id: Option<&str>) -> String {
    let id = match id {
        Some(id) => format!(" id='{}'", crate::stanza::escape(id)),
        None => String::new(),
    };
    format!(
        "<?xml version='1.0'?><stream:stream xmlns='{NS_SERVER}' xmlns:db='{NS_DIALBACK}' \
         xmlns:stream='{NS_STREAMS}'{id} from='{}' to='{}' version='1.0'>",
        crate::stanza::escape(from),
        crate::stanza::escape(to)
    )
}

/// A stream error with `condition` (RFC 6120 §4.9.3) and a text, and the
/// stream's end.
pub fn stream_error(condition: &str, text: &str) -> String {
    format!(
        "<stream:error><{condition} xmlns='{NS_STREAM_ERRORS}'/><text xmlns='{NS_STREAM_ERRORS}'>{}</text></stream:error></stream:stream>",
        crate::stanza::escape(text)
    )
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unit {
    /// `<stream:stream ...>`: the attributes that matter.
    StreamHeader {
        to: Option<String>,
        from: Option<String>,
        version: Option<String>,
        lang: Option<String>,
        /// The default namespace the client declared (`jabber:client`).
        default_ns: Option<String>,
        /// The stream id (a server's header has one; it keys dialback).
        id: Option<String>,
        /// The dialback namespace, when `xmlns:db` is declared (s2s).
        dialback: Option<String>,
    },
    /// `</stream:stream>`.
    StreamEnd,
    /// `<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>`.
    StartTls,
    /// `<auth mechanism='...'>initial response</auth>`; `None` when empty,
    /// `Some(vec![])` for `=` (an empty initial response).
    Auth {
        mechanism: String,
        initial: Option<Vec<u8>>,
    },
    /// `<response>data</response>`.
    Response(Vec<u8>),
    /// `<abort/>`.
    Abort,
    /// An `<iq/>` in `jabber:client` (before login: in-band registration
    /// and its invite token), parsed whole.
    Iq(crate::stanza::Element),
    /// Any other element (a stanza before login, an unknown element): its
    /// local name and namespace, for the error the server answers.
    Other { name: String, ns: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmppError {
    #[error("not well-formed: {0}")]
    NotWellFormed(&'static str),
    #[error("a unit over {MAX_UNIT} bytes")]
    TooLarge,
    #[error("document type declarations are not allowed")]
    Dtd,
    #[error("the SASL data is not base64")]
    Base64,
}

/// The end of the tag starting at `buf[0] == '<'`: the index just past
/// its `>`, outside quotes; `None` when it has not arrived.
fn tag_end(buf: &[u8]) -> Option<usize> {
    let mut quote = None;
    for (i, &b) in buf.iter().enumerate().skip(1) {
        match (quote, b) {
            (None, b'"' | b'\'') => quote = Some(b),
            (Some(q), b) if b == q => quote = None,
            (None, b'>') => return Some(i + 1),
            _ => {}
        }
    }
    None
}

/// The length of one whole element starting at `buf[0] == '<'`, counting
/// nested tags; `None` when it has not all arrived.
fn element_end(buf: &[u8]) -> Result<Option<usize>, XmppError> {
    let mut depth = 0usize;
    let mut i = 0;
    while i < buf.len() {
        if buf[i] != b'<' {
            i += 1;
            continue;
        }
        let Some(len) = tag_end(&buf[i..]) else {
            return Ok(None);
        };
        let tag = &buf[i..i + len];
        if tag.starts_with(b"<!") || tag.starts_with(b"<?") {
            return Err(XmppError::NotWellFormed("a declaration inside a stanza"));
        }
        if tag.starts_with(b"</") {
            depth = depth
                .checked_sub(1)
                .ok_or(XmppError::NotWellFormed("an end tag without a start"))?;
        } else if !tag.ends_with(b"/>") {
            depth += 1;
        }
        i += len;
        if depth == 0 {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

fn attr_value(
    start: &quick_xml::events::BytesStart<'_>,
    name: &[u8],
) -> Result<Option<String>, XmppError> {
    for a in start.attributes() {
        let a = a.map_err(|_| XmppError::NotWellFormed("a bad attribute"))?;
        if a.key.as_ref() == name {
            let v = a
                .unescape_value()
                .map_err(|_| XmppError::NotWellFormed("a bad attribute value"))?;
            return Ok(Some(v.into_owned()));
        }
    }
    Ok(None)
}

fn sasl_data(text: &str) -> Result<Vec<u8>, XmppError> {
    let t = text.trim();
    if t == "=" || t.is_empty() {
        return Ok(Vec::new());
    }
    base64::engine::general_purpose::STANDARD
        .decode(t)
        .map_err(|_| XmppError::Base64)
}

/// The next unit of `buf`, or `None` if more bytes are needed. Leading
/// whitespace and one XML declaration are skipped (and counted against
/// [`MAX_UNIT`] with the unit, so neither can grow without end).
pub fn parse(buf: &[u8]) -> Result<Option<(Unit, usize)>, XmppError> {
    let mut skip = 0;
    let mut declarations = 0;
    let (rest, head) = loop {
        skip += buf[skip..]
            .iter()
            .take_while(|b| b.is_ascii_whitespace())
            .count();
        if skip > MAX_UNIT {
            return Err(XmppError::TooLarge);
        }
        let rest = &buf[skip..];
        if rest.is_empty() {
            return Ok(None);
        }
        if rest[0] != b'<' {
            return Err(XmppError::NotWellFormed("text outside a stanza"));
        }
        if rest.starts_with(b"<!") {
            return Err(XmppError::Dtd);
        }
        let Some(head) = tag_end(rest) else {
            return if skip + rest.len() > MAX_UNIT {
                Err(XmppError::TooLarge)
            } else {
                Ok(None)
            };
        };
        if skip + head > MAX_UNIT {
            return Err(XmppError::TooLarge);
        }
        let tag = &rest[..head];
        // The XML declaration: skipped, once.
        if tag.starts_with(b"<?") {
            declarations += 1;
            if declarations > 1 || !tag.starts_with(b"<?xml") || !tag.ends_with(b"?>") {
                return Err(XmppError::NotWellFormed("a processing instruction"));
            }
            skip += head;
            continue;
        }
        break (rest, head);
    };
    let tag = &rest[..head];
    if let Some(end) = tag.strip_prefix(b"</") {
        let name = end.strip_suffix(b">").unwrap_or(end);
        return if name.trim_ascii() == b"stream:stream" {
            Ok(Some((Unit::StreamEnd, skip + head)))
        } else {
            Err(XmppError::NotWellFormed("an end tag without a start"))
        };
    }
    let name_end = tag
        .iter()
        .position(|b| b.is_ascii_whitespace() || *b == b'>' || *b == b'/')
        .unwrap_or(tag.len());
    let qname = &tag[1..name_end];
    if qname == b"stream:stream" {
        let text = std::str::from_utf8(tag).map_err(|_| XmppError::NotWellFormed("not UTF-8"))?;
        // Read as an empty element so the reader sees a whole document.
        let closed = format!("{}/>", &text[..text.len() - 1]);
        let mut reader = quick_xml::Reader::from_str(&closed);
        let Ok(Event::Empty(start)) = reader.read_event() else {
            return Err(XmppError::NotWellFormed("a bad stream header"));
        };
        let ns = attr_value(&start, b"xmlns:stream")?;
        if ns.as_deref() != Some(NS_STREAMS) {
            return Err(XmppError::NotWellFormed("the stream namespace is wrong"));
        }
        return Ok(Some((
            Unit::StreamHeader {
                to: attr_value(&start, b"to")?,
                from: attr_value(&start, b"from")?,
                version: attr_value(&start, b"version")?,
                lang: attr_value(&start, b"xml:lang")?,
                default_ns: attr_value(&start, b"xmlns")?,
                id: attr_value(&start, b"id")?,
                dialback: attr_value(&start, b"xmlns:db")?,
            },
            skip + head,
        )));
    }
    let Some(len) = element_end(rest)? else {
        return if rest.len() > MAX_UNIT {
            Err(XmppError::TooLarge)
        } else {
            Ok(None)
        };
    };
    if len > MAX_UNIT {
        return Err(XmppError::TooLarge);
    }
    let unit = match element(&rest[..len])? {
        Unit::Other { name, ns } if name == "iq" && ns == NS_CLIENT => {
            Unit::Iq(crate::stanza::parse_element(&rest[..len], NS_CLIENT)?)
        }
        unit => unit,
    };
    Ok(Some((unit, skip + len)))
}

/// One whole element, read by quick-xml with namespaces resolved against
/// its own declarations (the stream's default is `jabber:client`).
fn element(bytes: &[u8]) -> Result<Unit, XmppError> {
    let mut reader = quick_xml::NsReader::from_reader(bytes);
    reader.config_mut().expand_empty_elements = true;
    let mut name = String::new();
    let mut ns = String::new();
    let mut mechanism = None;
    let mut text = String::new();
    let mut depth = 0;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let (resolved, event) = reader
            .read_resolved_event_into(&mut buf)
            .map_err(|_| XmppError::NotWellFormed("a bad element"))?;
        match event {
            Event::Start(start) => {
                depth += 1;
                if depth == 1 {
                    name = String::from_utf8_lossy(start.local_name().as_ref()).into_owned();
                    ns = match resolved {
                        quick_xml::name::ResolveResult::Bound(n) => {
                            String::from_utf8_lossy(n.as_ref()).into_owned()
                        }
                        quick_xml::name::ResolveResult::Unbound => NS_CLIENT.to_owned(),
                        quick_xml::name::ResolveResult::Unknown(_) => {
                            return Err(XmppError::NotWellFormed("an undeclared prefix"));
                        }
                    };
                    mechanism = attr_value(&start, b"mechanism")?;
                }
            }
            Event::End(_) => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            Event::Text(t) if depth == 1 => {
                text.push_str(
                    &t.unescape()
                        .map_err(|_| XmppError::NotWellFormed("a bad entity"))?,
                );
            }
            Event::DocType(_) => return Err(XmppError::Dtd),
            Event::Eof => return Err(XmppError::NotWellFormed("an unfinished element")),
            _ => {}
        }
    }
    Ok(match (ns.as_str(), name.as_str()) {
        (NS_TLS, "starttls") => Unit::StartTls,
        (NS_SASL, "auth") => Unit::Auth {
            mechanism: mechanism.ok_or(XmppError::NotWellFormed("auth without a mechanism"))?,
            initial: if text.trim().is_empty() {
                None
            } else {
                Some(sasl_data(&text)?)
            },
        },
        (NS_SASL, "response") => Unit::Response(sasl_data(&text)?),
        (NS_SASL, "abort") => Unit::Abort,
        _ => Unit::Other { name, ns },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(mut buf: &[u8]) -> Vec<Unit> {
        let mut out = Vec::new();
        while let Some((u, n)) = parse(buf).unwrap() {
            out.push(u);
            buf = &buf[n..];
        }
        out
    }

    #[test]
    fn a_login_as_conversations_sends_it() {
        let text = b"<?xml version='1.0'?><stream:stream to='example.org' xmlns='jabber:client' \
            xmlns:stream='http://etherx.jabber.org/streams' version='1.0' xml:lang='en'>\
            <starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>\
            <auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>biwsbj1hbGljZSxyPWFiYw==</auth>\
            <response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>Yz1iaXdz</response>\
            <auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>=</auth>\
            <abort xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>\
            <iq type='get' id='1'><query xmlns='jabber:iq:roster'/></iq></stream:stream>";
        let units = all(text);
        assert_eq!(
            units[0],
            Unit::StreamHeader {
                to: Some("example.org".into()),
                from: None,
                version: Some("1.0".into()),
                lang: Some("en".into()),
                default_ns: Some(NS_CLIENT.into()),
                id: None,
                dialback: None,
            }
        );
        assert_eq!(units[1], Unit::StartTls);
        assert_eq!(
            units[2],
            Unit::Auth {
                mechanism: "SCRAM-SHA-256".into(),
                initial: Some(b"n,,n=alice,r=abc".to_vec())
            }
        );
        assert_eq!(units[3], Unit::Response(b"c=biws".to_vec()));
        assert_eq!(
            units[4],
            Unit::Auth {
                mechanism: "PLAIN".into(),
                initial: Some(Vec::new())
            }
        );
        assert_eq!(units[5], Unit::Abort);
        // An iq before login is parsed whole (registration with an invite).
        let Unit::Iq(iq) = &units[6] else {
            panic!("{:?}", units[6]);
        };
        assert_eq!(iq.name, "iq");
        assert_eq!(iq.ns, NS_CLIENT);
        assert_eq!(units[7], Unit::StreamEnd);
    }

    #[test]
    fn waits_for_whole_units_and_refuses_bad_ones() {
        let full =
            b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAHB3</auth>";
        for cut in 0..full.len() {
            assert_eq!(parse(&full[..cut]), Ok(None), "at {cut}");
        }
        assert!(parse(full).unwrap().is_some());
        assert_eq!(
            parse(b"<!DOCTYPE x [<!ENTITY a 'b'>]>"),
            Err(XmppError::Dtd)
        );
        assert!(
            parse(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>!!</auth>")
                .is_err()
        );
        assert!(parse(b"<stream:stream xmlns:stream='wrong'>").is_err());
        assert!(parse(b"hello").is_err());
        let big = format!("<a>{}", "x".repeat(MAX_UNIT + 1));
        assert_eq!(parse(big.as_bytes()), Err(XmppError::TooLarge));
        assert!(parse(b"<a><!-- x --></a>").is_err());
    }
}
