//! XMPP stanzas after login, sans I/O: a stream cut into whole top-level
//! elements, each read into an [`Element`] tree, and elements written
//! back out. Used by the chat grain for its clients' streams and for
//! stanzas other grains route to it (fuzzed: `xmpp_stanza`).
//!
//! The same rules as before login ([`crate::xmpp`]): no DTD, no comments
//! or processing instructions inside a stanza, the five predefined
//! entities and character references only, and bounds on the size of one
//! stanza and on how deep elements nest, checked before anything is
//! allocated for the tree.

use quick_xml::events::Event;
use quick_xml::name::ResolveResult;

use crate::xmpp::{NS_STREAMS, Unit, XmppError};

/// How deep elements may nest inside one stanza (the stanza is level 1).
pub const MAX_DEPTH: usize = 24;

/// One node of an element's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Element(Element),
    Text(String),
}

/// An XML element with its namespace resolved: `name` is the local name,
/// `ns` the namespace URI, `attrs` the attributes other than namespace
/// declarations, by qualified name (`xml:lang` stays `xml:lang`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub ns: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Node>,
}

/// What comes next on a stream after login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A (restarted) stream header.
    Header(Unit),
    /// `</stream:stream>`.
    End,
    /// One top-level element.
    Stanza(Element),
}

impl Element {
    pub fn new(name: &str, ns: &str) -> Element {
        Element {
            name: name.to_owned(),
            ns: ns.to_owned(),
            attrs: Vec::new(),
            children: Vec::new(),
        }
    }

    pub fn is(&self, name: &str, ns: &str) -> bool {
        self.name == name && self.ns == ns
    }

    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn set_attr(&mut self, key: &str, value: impl Into<String>) {
        let value = value.into();
        match self.attrs.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.attrs.push((key.to_owned(), value)),
        }
    }

    pub fn remove_attr(&mut self, key: &str) {
        self.attrs.retain(|(k, _)| k != key);
    }

    pub fn with_attr(mut self, key: &str, value: impl Into<String>) -> Element {
        self.set_attr(key, value);
        self
    }

    pub fn with_child(mut self, child: Element) -> Element {
        self.children.push(Node::Element(child));
        self
    }

    pub fn with_text(mut self, text: impl Into<String>) -> Element {
        self.children.push(Node::Text(text.into()));
        self
    }

    pub fn push(&mut self, child: Element) {
        self.children.push(Node::Element(child));
    }

    /// The child elements.
    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    /// The first child element named `name` in `ns`.
    pub fn child(&self, name: &str, ns: &str) -> Option<&Element> {
        self.elements().find(|e| e.is(name, ns))
    }

    /// The first child element of namespace `ns`, whatever its name.
    pub fn child_ns(&self, ns: &str) -> Option<&Element> {
        self.elements().find(|e| e.ns == ns)
    }

    /// The element's own text (not its children's).
    pub fn text(&self) -> String {
        self.children
            .iter()
            .filter_map(|n| match n {
                Node::Text(t) => Some(t.as_str()),
                Node::Element(_) => None,
            })
            .collect()
    }

    /// Drops child elements `keep` says no to.
    pub fn retain_children(&mut self, mut keep: impl FnMut(&Element) -> bool) {
        self.children.retain(|n| match n {
            Node::Element(e) => keep(e),
            Node::Text(_) => true,
        });
    }

    /// The element as XML, declaring its namespace unless it is
    /// `parent_ns` (the stream's `jabber:client` for a stanza).
    pub fn to_xml(&self, parent_ns: &str) -> String {
        let mut out = String::new();
        self.write(parent_ns, &mut out);
        out
    }

    pub fn write(&self, parent_ns: &str, out: &mut String) {
        out.push('<');
        out.push_str(&self.name);
        if self.ns != parent_ns {
            out.push_str(" xmlns='");
            escape_into(&self.ns, out);
            out.push('\'');
        }
        let mut prefixes = 0;
        for (k, v) in &self.attrs {
            out.push(' ');
            match k.strip_prefix('{').and_then(|k| k.split_once('}')) {
                Some((ns, local)) => {
                    let p = format!("a{prefixes}");
                    prefixes += 1;
                    out.push_str(&format!("xmlns:{p}='"));
                    escape_into(ns, out);
                    out.push_str(&format!("' {p}:{local}"));
                }
                None => out.push_str(k),
            }
            out.push_str("='");
            escape_into(v, out);
            out.push('\'');
        }
        if self.children.is_empty() {
            out.push_str("/>");
            return;
        }
        out.push('>');
        for n in &self.children {
            match n {
                Node::Element(e) => e.write(&self.ns, out),
                Node::Text(t) => escape_into(t, out),
            }
        }
        out.push_str("</");
        out.push_str(&self.name);
        out.push('>');
    }
}

/// Whether every character is one XML 1.0 allows (a character reference
/// can name others, `&#x1;`, which no client could read back).
fn xml_chars(text: &str) -> bool {
    text.chars().all(|c| {
        matches!(c, '\t' | '\n' | '\r') || (c >= ' ' && c != '\u{FFFE}' && c != '\u{FFFF}')
    })
}

/// A name (or one side of a prefixed one) as XML allows it, roughly: a
/// letter, `_` or any non-ASCII character first, then those, digits, `-`
/// and `.`; never a control or markup character.
fn xml_name(name: &str) -> bool {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    let start = |c: char| c.is_ascii_alphabetic() || c == '_' || (!c.is_ascii() && !c.is_control());
    start(first) && chars.all(|c| start(c) || c.is_ascii_digit() || c == '-' || c == '.')
}

/// Escapes text or an attribute value (either quote style).
pub fn escape_into(text: &str, out: &mut String) {
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
}

pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    escape_into(text, &mut out);
    out
}

/// The next frame of `buf`, or `None` when more bytes are needed. A stanza
/// over `max` bytes, or nested deeper than [`MAX_DEPTH`], is an error as
/// soon as that is known, whether or not it has all arrived. `default_ns`
/// is the stream's content namespace (`jabber:client`, `jabber:server`).
pub fn next_frame(
    buf: &[u8],
    max: usize,
    default_ns: &str,
) -> Result<Option<(Frame, usize)>, XmppError> {
    let skip = buf.iter().take_while(|b| b.is_ascii_whitespace()).count();
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
    if rest.starts_with(b"<?") || rest.starts_with(b"<stream:stream") || rest.starts_with(b"</") {
        // Headers and the stream's end read as before login.
        return Ok(crate::xmpp::parse(buf)?.map(|(unit, n)| match unit {
            Unit::StreamEnd => (Frame::End, n),
            other => (Frame::Header(other), n),
        }));
    }
    let Some(len) = element_end(rest, max)? else {
        return Ok(None);
    };
    let element = parse_element(&rest[..len], default_ns)?;
    Ok(Some((Frame::Stanza(element), skip + len)))
}

/// The length of the whole element at `buf[0] == '<'`, or `None` if it
/// has not all arrived; errors past `max` bytes or [`MAX_DEPTH`].
fn element_end(buf: &[u8], max: usize) -> Result<Option<usize>, XmppError> {
    let mut depth = 0usize;
    let mut quote = None;
    let mut in_tag = false;
    let mut tag_start = 0;
    for (i, &b) in buf.iter().enumerate() {
        if i >= max {
            return Err(XmppError::TooLarge);
        }
        if in_tag {
            match (quote, b) {
                (None, b'"' | b'\'') => quote = Some(b),
                (Some(q), b) if b == q => quote = None,
                (None, b'>') => {
                    in_tag = false;
                    let tag = &buf[tag_start..=i];
                    if tag.starts_with(b"<!") || tag.starts_with(b"<?") {
                        return Err(XmppError::NotWellFormed(
                            "a declaration, comment or instruction inside a stanza",
                        ));
                    }
                    if tag.starts_with(b"</") {
                        depth = depth
                            .checked_sub(1)
                            .ok_or(XmppError::NotWellFormed("an end tag without a start"))?;
                    } else if !tag.ends_with(b"/>") {
                        depth += 1;
                        if depth > MAX_DEPTH {
                            return Err(XmppError::NotWellFormed("elements nested too deep"));
                        }
                    }
                    if depth == 0 {
                        return Ok(Some(i + 1));
                    }
                }
                _ => {}
            }
        } else if b == b'<' {
            in_tag = true;
            tag_start = i;
        }
    }
    Ok(None)
}

/// One whole element, namespaces resolved with `default_ns` as the default
/// and `stream:` bound, as a stream header declares them.
pub fn parse_element(bytes: &[u8], default_ns: &str) -> Result<Element, XmppError> {
    let body = std::str::from_utf8(bytes).map_err(|_| XmppError::NotWellFormed("not UTF-8"))?;
    // A server stream declares the dialback prefix in its header
    // (XEP-0220): `<db:result>` is read as that namespace.
    let dialback = if default_ns == crate::xmpp::NS_SERVER {
        " xmlns:db='jabber:server:dialback'"
    } else {
        ""
    };
    let wrapped = format!(
        "<w xmlns='{}' xmlns:stream='{NS_STREAMS}'{dialback}>{body}</w>",
        escape(default_ns)
    );
    let mut reader = quick_xml::NsReader::from_str(&wrapped);
    reader.config_mut().expand_empty_elements = true;
    let mut stack: Vec<Element> = Vec::new();
    let mut done: Option<Element> = None;
    loop {
        let (resolved, event) = reader
            .read_resolved_event()
            .map_err(|_| XmppError::NotWellFormed("a bad element"))?;
        match event {
            Event::Start(start) => {
                let ns = match resolved {
                    ResolveResult::Bound(n) => String::from_utf8_lossy(n.as_ref()).into_owned(),
                    ResolveResult::Unbound => String::new(),
                    ResolveResult::Unknown(_) => {
                        return Err(XmppError::NotWellFormed("an undeclared prefix"));
                    }
                };
                if start.local_name().as_ref() == b"w" && stack.is_empty() && done.is_none() {
                    // The wrapper itself.
                    stack.push(Element::new("w", &ns));
                    continue;
                }
                let local = start.local_name();
                let name = std::str::from_utf8(local.as_ref())
                    .map_err(|_| XmppError::NotWellFormed("not UTF-8"))?;
                if !xml_name(name) {
                    return Err(XmppError::NotWellFormed("a bad element name"));
                }
                let mut el = Element::new(name, &ns);
                for a in start.attributes() {
                    let a = a.map_err(|_| XmppError::NotWellFormed("a bad attribute"))?;
                    let key = std::str::from_utf8(a.key.as_ref())
                        .map_err(|_| XmppError::NotWellFormed("not UTF-8"))?;
                    if key == "xmlns" || key.starts_with("xmlns:") {
                        continue;
                    }
                    if !key.split(':').all(xml_name) || key.matches(':').count() > 1 {
                        return Err(XmppError::NotWellFormed("a bad attribute name"));
                    }
                    // A prefixed attribute keeps its namespace, not its
                    // prefix: `{urn:p}a` (written back with a declaration).
                    let key = match key.split_once(':') {
                        Some(("xml", _)) | None => key.to_owned(),
                        Some((_, local)) => match reader.resolve_attribute(a.key) {
                            (ResolveResult::Bound(ns), _) if !ns.as_ref().contains(&b'}') => {
                                format!("{{{}}}{local}", String::from_utf8_lossy(ns.as_ref()))
                            }
                            _ => return Err(XmppError::NotWellFormed("an undeclared prefix")),
                        },
                    };
                    let v = a
                        .unescape_value()
                        .map_err(|_| XmppError::NotWellFormed("a bad attribute value"))?;
                    if !xml_chars(&v) {
                        return Err(XmppError::NotWellFormed("a character XML does not allow"));
                    }
                    if el.attr(&key).is_some() {
                        return Err(XmppError::NotWellFormed("an attribute given twice"));
                    }
                    el.attrs.push((key, v.into_owned()));
                }
                stack.push(el);
                // The wrapper is level 0.
                if stack.len() > MAX_DEPTH + 1 {
                    return Err(XmppError::NotWellFormed("elements nested too deep"));
                }
            }
            Event::End(_) => {
                let el = stack
                    .pop()
                    .ok_or(XmppError::NotWellFormed("an end tag without a start"))?;
                match stack.len() {
                    // The wrapper closed.
                    0 => break,
                    1 => {
                        if done.is_some() {
                            return Err(XmppError::NotWellFormed("two elements in one"));
                        }
                        done = Some(el);
                    }
                    _ => stack
                        .last_mut()
                        .expect("checked")
                        .children
                        .push(Node::Element(el)),
                }
            }
            Event::Text(t) => {
                let text = t
                    .unescape()
                    .map_err(|_| XmppError::NotWellFormed("a bad entity"))?;
                if !xml_chars(&text) {
                    return Err(XmppError::NotWellFormed("a character XML does not allow"));
                }
                match stack.len() {
                    0 => {}
                    1 if text.trim().is_empty() => {}
                    1 => return Err(XmppError::NotWellFormed("text outside a stanza")),
                    _ => {
                        let top = stack.last_mut().expect("checked");
                        match top.children.last_mut() {
                            Some(Node::Text(prev)) => prev.push_str(&text),
                            _ => top.children.push(Node::Text(text.into_owned())),
                        }
                    }
                }
            }
            Event::CData(c) => {
                let text = std::str::from_utf8(&c)
                    .map_err(|_| XmppError::NotWellFormed("not UTF-8"))?
                    .to_owned();
                if !xml_chars(&text) {
                    return Err(XmppError::NotWellFormed("a character XML does not allow"));
                }
                if stack.len() > 1 {
                    let top = stack.last_mut().expect("checked");
                    top.children.push(Node::Text(text));
                }
            }
            Event::DocType(_) => return Err(XmppError::Dtd),
            Event::Comment(_) | Event::PI(_) | Event::Decl(_) => {
                return Err(XmppError::NotWellFormed(
                    "a declaration, comment or instruction inside a stanza",
                ));
            }
            Event::Eof => return Err(XmppError::NotWellFormed("an unfinished element")),
            Event::Empty(_) => unreachable!("empty elements are expanded"),
        }
    }
    done.ok_or(XmppError::NotWellFormed("no element"))
}

/// Stanza error conditions (RFC 6120 §8.3.3).
pub const NS_STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";

/// A stanza error in reply to `el` (RFC 6120 §8.3): from and to swapped,
/// the original's id kept.
pub fn error_reply(el: &Element, kind: &str, condition: &str, text: Option<&str>) -> Element {
    let mut reply = Element::new(&el.name, crate::xmpp::NS_CLIENT).with_attr("type", "error");
    if let Some(id) = el.attr("id") {
        reply.set_attr("id", id);
    }
    if let Some(to) = el.attr("to") {
        reply.set_attr("from", to);
    }
    if let Some(from) = el.attr("from") {
        reply.set_attr("to", from);
    }
    let mut error = Element::new("error", crate::xmpp::NS_CLIENT)
        .with_attr("type", kind)
        .with_child(Element::new(condition, NS_STANZAS));
    if let Some(t) = text {
        error.push(
            Element::new("text", NS_STANZAS)
                .with_attr("xml:lang", "en")
                .with_text(t),
        );
    }
    reply.push(error);
    reply
}

/// Whether a failure to deliver `el` is answered with an error: messages
/// and requests (iq get/set), never an error itself (no error loops).
pub fn wants_error_reply(el: &Element) -> bool {
    let asks = el.name == "message"
        || (el.name == "iq" && matches!(el.attr("type"), Some("get") | Some("set")));
    asks && el.attr("type") != Some("error")
}

/// The error type a condition is sent with.
pub fn error_kind(condition: &str) -> &'static str {
    match condition {
        "remote-server-timeout" | "resource-constraint" | "internal-server-error" => "wait",
        "not-authorized" | "forbidden" => "auth",
        "bad-request" | "jid-malformed" | "not-acceptable" | "policy-violation" => "modify",
        _ => "cancel",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: &str = "jabber:client";

    #[test]
    fn reads_stanzas_whole_and_writes_them_back() {
        let text = b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='example.org' version='1.0'>\
            <iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>phone &amp; co</resource></bind></iq>\
            <message to='bob@example.org' type='chat'><body>a &lt;b&gt; &#x263A;</body><x:y xmlns:x='urn:x' a='1'/></message>\
            </stream:stream>";
        let mut at = 0;
        let mut frames = Vec::new();
        while let Some((f, n)) = next_frame(&text[at..], 1 << 20, C).unwrap() {
            frames.push(f);
            at += n;
        }
        assert!(matches!(
            frames[0],
            Frame::Header(Unit::StreamHeader { .. })
        ));
        let Frame::Stanza(iq) = &frames[1] else {
            panic!()
        };
        assert!(iq.is("iq", C));
        let bind = iq
            .child("bind", "urn:ietf:params:xml:ns:xmpp-bind")
            .unwrap();
        assert_eq!(
            bind.child("resource", "urn:ietf:params:xml:ns:xmpp-bind")
                .unwrap()
                .text(),
            "phone & co"
        );
        let Frame::Stanza(msg) = &frames[2] else {
            panic!()
        };
        assert_eq!(msg.child("body", C).unwrap().text(), "a <b> \u{263A}");
        let y = msg.child("y", "urn:x").unwrap();
        assert_eq!(y.attr("a"), Some("1"));
        assert_eq!(frames[3], Frame::End);
        // Written out and read again, the same tree.
        let xml = msg.to_xml(C);
        assert_eq!(&parse_element(xml.as_bytes(), C).unwrap(), msg);
        assert!(xml.starts_with("<message to='bob@example.org'"));
    }

    #[test]
    fn refuses_what_a_stream_must_not_carry() {
        let deep = format!(
            "{}{}",
            "<a>".repeat(MAX_DEPTH + 1),
            "</a>".repeat(MAX_DEPTH + 1)
        );
        assert!(next_frame(deep.as_bytes(), 1 << 20, C).is_err());
        // Refused before it has all arrived.
        let big = format!("<message><body>{}", "x".repeat(2000));
        assert_eq!(
            next_frame(big.as_bytes(), 1000, C),
            Err(XmppError::TooLarge)
        );
        assert_eq!(
            next_frame(b"<!DOCTYPE x [<!ENTITY a 'b'>]>", 1000, C),
            Err(XmppError::Dtd)
        );
        assert!(next_frame(b"<message>&a;</message>", 1000, C).is_err());
        assert!(next_frame(b"<message><!-- c --></message>", 1000, C).is_err());
        assert!(next_frame(b"<message a='1' a='2'/>", 1000, C).is_err());
        assert!(next_frame(b"<x:message/>", 1000, C).is_err());
        assert_eq!(next_frame(b"<message><body>hi", 1000, C), Ok(None));
        assert!(next_frame(b"<message><body>&#x1;</body></message>", 1000, C).is_err());
        assert!(next_frame(b"<message a='&#xFFFE;'/>", 1000, C).is_err());
        assert!(next_frame(b"<message><x\x01 xmlns='urn:x'/></message>", 1000, C).is_err());
        assert!(
            next_frame(
                b"<message><x xmlns:p='urn:a}b' p:c='1'/></message>",
                1000,
                C
            )
            .is_err()
        );
    }

    #[test]
    fn prefixed_attributes_keep_their_namespace() {
        let x = b"<message><x xmlns='urn:x' xmlns:p='urn:p' p:a='1' xml:lang='en'/></message>";
        let Some((Frame::Stanza(el), _)) = next_frame(x, 1000, C).unwrap() else {
            panic!()
        };
        let inner = el.child("x", "urn:x").unwrap();
        assert_eq!(inner.attr("{urn:p}a"), Some("1"));
        assert_eq!(inner.attr("xml:lang"), Some("en"));
        let xml = el.to_xml(C);
        assert!(xml.contains("xmlns:a0='urn:p' a0:a='1'"), "{xml}");
        assert_eq!(parse_element(xml.as_bytes(), C).unwrap(), el);
    }

    #[test]
    fn a_server_stream_reads_dialback_and_its_header_id() {
        let s = crate::xmpp::NS_SERVER;
        let buf = b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' \
            xmlns:db='jabber:server:dialback' xmlns:stream='http://etherx.jabber.org/streams' \
            id='s1' from='a.test' to='b.test' version='1.0'>\
            <db:result from='a.test' to='b.test'>abc</db:result>";
        let (Frame::Header(Unit::StreamHeader { id, dialback, .. }), n) =
            next_frame(buf, 4096, s).unwrap().unwrap()
        else {
            panic!("not a header");
        };
        assert_eq!(id.as_deref(), Some("s1"));
        assert_eq!(dialback.as_deref(), Some(crate::xmpp::NS_DIALBACK));
        let (Frame::Stanza(el), _) = next_frame(&buf[n..], 4096, s).unwrap().unwrap() else {
            panic!("not a stanza");
        };
        assert!(el.is("result", crate::xmpp::NS_DIALBACK));
        assert_eq!(el.text(), "abc");
        // Written back on a server stream, it declares its namespace.
        assert!(el.to_xml(s).contains("xmlns='jabber:server:dialback'"));
    }
}
