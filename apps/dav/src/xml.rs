//! WebDAV request bodies: untrusted XML read into a small namespace-aware
//! tree under fixed limits, and the escaping our answers need.
//!
//! Refused outright: any DTD (`<!DOCTYPE`, so no entity can be defined and
//! no entity bomb expanded), entities other than the five predefined ones
//! and character references, nesting deeper than [`MAX_DEPTH`], more than
//! [`MAX_NODES`] elements, and bodies over [`MAX_BODY`]. Memory is bounded
//! by the body size times a small constant.

use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use quick_xml::reader::NsReader;

/// The `DAV:` namespace.
pub const DAV: &str = "DAV:";
/// CalDAV (RFC 4791).
pub const CALDAV: &str = "urn:ietf:params:xml:ns:caldav";
/// CardDAV (RFC 6352).
pub const CARDDAV: &str = "urn:ietf:params:xml:ns:carddav";
/// Calendar Server extensions (getctag).
pub const CS: &str = "http://calendarserver.org/ns/";
/// Apple's iCal namespace (calendar-color, calendar-order).
pub const ICAL: &str = "http://apple.com/ns/ical/";

/// The largest XML request body read.
pub const MAX_BODY: usize = 1 << 20;
/// The deepest element nesting accepted.
pub const MAX_DEPTH: usize = 32;
/// The most elements in one body.
pub const MAX_NODES: usize = 20_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// The namespace URI ("" when none).
    pub ns: String,
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Element>,
    /// The element's own text (concatenated), trimmed.
    pub text: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum XmlError {
    #[error("the body is larger than the limit")]
    TooLarge,
    #[error("document type declarations are not accepted")]
    Dtd,
    #[error("elements are nested too deeply")]
    TooDeep,
    #[error("too many elements")]
    TooMany,
    #[error("the body has no root element")]
    Empty,
    #[error("malformed XML: {0}")]
    Malformed(String),
}

impl Element {
    pub fn is(&self, ns: &str, name: &str) -> bool {
        self.ns == ns && self.name == name
    }

    /// The first child with this name.
    pub fn child(&self, ns: &str, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.is(ns, name))
    }

    pub fn children_named<'a>(
        &'a self,
        ns: &'a str,
        name: &'a str,
    ) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.is(ns, name))
    }

    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// `{ns}name`, as property keys are stored.
    pub fn key(&self) -> String {
        format!("{{{}}}{}", self.ns, self.name)
    }

    /// The element written back as XML (for dead properties), with its
    /// namespace declared on itself.
    pub fn to_xml(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, None);
        out
    }

    fn write(&self, out: &mut String, parent_ns: Option<&str>) {
        out.push('<');
        out.push_str(&self.name);
        if parent_ns != Some(self.ns.as_str()) {
            out.push_str(" xmlns=\"");
            out.push_str(&escape(&self.ns));
            out.push('"');
        }
        for (n, v) in &self.attrs {
            out.push(' ');
            out.push_str(n);
            out.push_str("=\"");
            out.push_str(&escape(v));
            out.push('"');
        }
        if self.children.is_empty() && self.text.is_empty() {
            out.push_str("/>");
            return;
        }
        out.push('>');
        out.push_str(&escape(&self.text));
        for c in &self.children {
            c.write(out, Some(&self.ns));
        }
        out.push_str("</");
        out.push_str(&self.name);
        out.push('>');
    }
}

/// How much a document may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub body: usize,
    pub depth: usize,
    pub nodes: usize,
}

/// A client's request body.
pub const REQUEST: Limits = Limits {
    body: MAX_BODY,
    depth: MAX_DEPTH,
    nodes: MAX_NODES,
};

/// A multistatus another user's grain answers for a shared collection:
/// as large as a REPORT may be (32 MiB), one level deeper than a request
/// (a dead property inside a response), and elements in proportion.
pub const ANSWER: Limits = Limits {
    body: 33 << 20,
    depth: MAX_DEPTH + 8,
    nodes: 500_000,
};

/// Parses a request body into its root element.
pub fn parse(body: &[u8]) -> Result<Element, XmlError> {
    parse_with(body, REQUEST)
}

/// [`parse`] under other limits.
pub fn parse_with(body: &[u8], limits: Limits) -> Result<Element, XmlError> {
    if body.len() > limits.body {
        return Err(XmlError::TooLarge);
    }
    let mut reader = NsReader::from_reader(body);
    reader.config_mut().trim_text(true);
    reader.config_mut().expand_empty_elements = true;
    let mut stack: Vec<Element> = Vec::new();
    let mut nodes = 0usize;
    let mut buf = Vec::new();
    let malformed = |e: &dyn std::fmt::Display| XmlError::Malformed(e.to_string());
    loop {
        buf.clear();
        let (resolved, event) = reader
            .read_resolved_event_into(&mut buf)
            .map_err(|e| malformed(&e))?;
        match event {
            Event::Start(start) => {
                nodes += 1;
                if nodes > limits.nodes {
                    return Err(XmlError::TooMany);
                }
                if stack.len() >= limits.depth {
                    return Err(XmlError::TooDeep);
                }
                let ns = match resolved {
                    ResolveResult::Bound(ns) => String::from_utf8_lossy(ns.as_ref()).into_owned(),
                    ResolveResult::Unbound => String::new(),
                    ResolveResult::Unknown(p) => {
                        return Err(XmlError::Malformed(format!(
                            "undeclared namespace prefix {}",
                            String::from_utf8_lossy(&p)
                        )));
                    }
                };
                let name = String::from_utf8_lossy(start.local_name().as_ref()).into_owned();
                if !is_name(&name) {
                    return Err(XmlError::Malformed(format!(
                        "{name:.40} is not an element name"
                    )));
                }
                let mut attrs = Vec::new();
                for a in start.attributes() {
                    let a = a.map_err(|e| malformed(&e))?;
                    let key = a.key.as_ref();
                    // Namespace declarations are resolved already; prefixed
                    // attributes mean nothing to WebDAV and are dropped (kept,
                    // they could collide by local name when written back).
                    if key.starts_with(b"xmlns") || key.contains(&b':') {
                        continue;
                    }
                    if !is_name(&String::from_utf8_lossy(key)) {
                        return Err(XmlError::Malformed(
                            "an attribute name is not a name".into(),
                        ));
                    }
                    let value = a
                        .decode_and_unescape_value(reader.decoder())
                        .map_err(|e| malformed(&e))?;
                    attrs.push((
                        String::from_utf8_lossy(a.key.local_name().as_ref()).into_owned(),
                        value.into_owned(),
                    ));
                }
                stack.push(Element {
                    ns,
                    name,
                    attrs,
                    children: Vec::new(),
                    text: String::new(),
                });
            }
            Event::End(_) => {
                let done = stack
                    .pop()
                    .ok_or_else(|| XmlError::Malformed("unbalanced end tag".into()))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(done),
                    None => {
                        // Only whitespace, comments and PIs may follow.
                        return finish(&mut reader, done);
                    }
                }
            }
            Event::Text(t) => {
                let text = t.unescape().map_err(|e| malformed(&e))?;
                match stack.last_mut() {
                    Some(e) => e.text.push_str(text.trim()),
                    None if text.trim().is_empty() => {}
                    None => return Err(XmlError::Malformed("text outside the root".into())),
                }
            }
            Event::CData(t) => {
                if let Some(e) = stack.last_mut() {
                    e.text.push_str(&String::from_utf8_lossy(&t));
                }
            }
            Event::DocType(_) => return Err(XmlError::Dtd),
            Event::Empty(_) => unreachable!("expand_empty_elements is on"),
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => {
                return Err(if stack.is_empty() {
                    XmlError::Empty
                } else {
                    XmlError::Malformed("the document ends inside an element".into())
                });
            }
        }
    }
}

/// A name our writer can put back as it is: ASCII letters, digits, `_`,
/// `-` and `.`, not starting with a digit, `-` or `.` (a subset of XML's
/// NCName, which is all WebDAV uses).
fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && name.len() <= 128
}

fn finish(reader: &mut NsReader<&[u8]>, root: Element) -> Result<Element, XmlError> {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_event_into(&mut buf) {
            Ok(Event::Eof) => return Ok(root),
            Ok(Event::Comment(_) | Event::PI(_)) => {}
            Ok(Event::Text(t)) if t.iter().all(u8::is_ascii_whitespace) => {}
            Ok(Event::DocType(_)) => return Err(XmlError::Dtd),
            Ok(_) => return Err(XmlError::Malformed("content after the root element".into())),
            Err(e) => return Err(XmlError::Malformed(e.to_string())),
        }
    }
}

/// Escapes text for XML content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Characters XML 1.0 cannot carry are dropped.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {}
            '\u{fffe}' | '\u{ffff}' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_namespaces_and_text() {
        let e = parse(
            br#"<?xml version="1.0"?><D:propfind xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav"><D:prop><D:displayname/><C:calendar-description>a &amp; b</C:calendar-description></D:prop></D:propfind>"#,
        )
        .unwrap();
        assert!(e.is(DAV, "propfind"));
        let prop = e.child(DAV, "prop").unwrap();
        assert_eq!(prop.children.len(), 2);
        assert_eq!(
            prop.child(CALDAV, "calendar-description").unwrap().text,
            "a & b"
        );
    }

    #[test]
    fn refuses_dtds_depth_and_garbage() {
        let bomb = br#"<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]><a xmlns="DAV:">&lol2;</a>"#;
        assert_eq!(parse(bomb), Err(XmlError::Dtd));
        let deep = format!("{}{}", "<a xmlns=\"DAV:\">".repeat(40), "</a>".repeat(40));
        assert_eq!(parse(deep.as_bytes()), Err(XmlError::TooDeep));
        assert!(parse(b"<a xmlns=\"DAV:\"><b></a>").is_err());
        assert!(parse(b"<x:a/>").is_err());
        assert_eq!(parse(b"   "), Err(XmlError::Empty));
        assert!(parse(b"<a/><b/>").is_err());
        assert!(parse(b"<a>&undefined;</a>").is_err());
        assert!(parse(b"<D:a\"b xmlns:D=\"DAV:\"/>").is_err());
        let e = parse(b"<a xmlns:p=\"x\" xmlns:q=\"y\" p:x=\"1\" q:x=\"2\"/>").unwrap();
        assert!(e.attrs.is_empty());
    }

    #[test]
    fn dead_properties_round_trip() {
        let e =
            parse(br#"<Z:foo xmlns:Z="http://example.com/ns/" a="1">x<Z:bar>y</Z:bar></Z:foo>"#)
                .unwrap();
        let again = parse(e.to_xml().as_bytes()).unwrap();
        assert_eq!(e, again);
    }
}
