//! The MIME part tree with byte ranges into the stored message, and
//! BODYSTRUCTURE / BODY written from it (RFC 3501 §7.4.2).

use std::ops::Range;

use mail_parser::{Encoding, HeaderName, HeaderValue, Message, MessagePart, PartType};

use super::{MAX_DEPTH, MAX_PARTS, envelope};
use crate::imap::text::{nstring, string};

/// One MIME part.
#[derive(Debug, Clone)]
pub struct Part {
    /// Its header block (for a message, the message's header).
    pub header: Range<usize>,
    /// Its body, as stored (transfer-encoded).
    pub body: Range<usize>,
    pub mime: Mime,
    pub kind: PartKind,
}

#[derive(Debug, Clone)]
pub enum PartKind {
    Leaf,
    Multipart(Vec<Part>),
    /// A `message/rfc822` part: the enclosed message's root part (whose
    /// `header` is the enclosed message's header), and its ENVELOPE.
    Message(Box<Part>, Vec<u8>),
}

/// What the part's MIME headers say.
#[derive(Debug, Clone, Default)]
pub struct Mime {
    pub ctype: String,
    pub subtype: String,
    pub params: Vec<(String, String)>,
    pub id: Option<Vec<u8>>,
    pub description: Option<Vec<u8>>,
    pub encoding: String,
    pub md5: Option<Vec<u8>>,
    pub disposition: Option<(String, Vec<(String, String)>)>,
    pub language: Vec<String>,
    pub location: Option<Vec<u8>>,
}

/// Parses a stored message into its part tree.
pub fn parse(raw: &[u8]) -> Part {
    let parsed = mail_parser::MessageParser::default().parse(raw);
    from_parsed(parsed.as_ref(), raw)
}

pub(crate) fn from_parsed(parsed: Option<&Message<'_>>, raw: &[u8]) -> Part {
    match parsed {
        Some(m) if !m.parts.is_empty() => {
            let mut count = 0;
            build(&m.parts, 0, raw, 0, &mut count)
        }
        _ => {
            // Not a message mail-parser can read: one opaque text part.
            let split = header_end(raw);
            Part {
                header: 0..split,
                body: split..raw.len(),
                mime: Mime {
                    ctype: "text".into(),
                    subtype: "plain".into(),
                    params: vec![("charset".into(), "us-ascii".into())],
                    encoding: "7bit".into(),
                    ..Mime::default()
                },
                kind: PartKind::Leaf,
            }
        }
    }
}

/// Where the header block ends (after its empty line).
fn header_end(raw: &[u8]) -> usize {
    raw.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|p| p + 2))
        .unwrap_or(raw.len())
}

fn clamp(raw: &[u8], r: Range<usize>) -> Range<usize> {
    let end = r.end.min(raw.len());
    r.start.min(end)..end
}

fn build(
    parts: &[MessagePart<'_>],
    id: usize,
    raw: &[u8],
    depth: usize,
    count: &mut usize,
) -> Part {
    *count += 1;
    let p = &parts[id];
    let header = clamp(raw, p.offset_header as usize..p.offset_body as usize);
    let body = clamp(raw, p.offset_body as usize..p.offset_end as usize);
    let mut mime = mime_of(p, raw);
    let opaque = depth >= MAX_DEPTH || *count >= MAX_PARTS;
    let kind = match &p.body {
        PartType::Multipart(children) if !children.is_empty() && !opaque => {
            let mut out = Vec::new();
            for &c in children {
                if (c as usize) < parts.len() && (c as usize) != id {
                    out.push(build(parts, c as usize, raw, depth + 1, count));
                }
            }
            if out.is_empty() {
                mime = octet_stream(mime);
                PartKind::Leaf
            } else {
                PartKind::Multipart(out)
            }
        }
        PartType::Message(nested)
            if p.encoding == Encoding::None && !nested.parts.is_empty() && !opaque =>
        {
            let mut env = Vec::new();
            envelope::write(&mut env, &nested.parts, 0, raw);
            let root = build(&nested.parts, 0, raw, depth + 1, count);
            // The enclosed message's body ends where this part's does.
            PartKind::Message(Box::new(root), env)
        }
        PartType::Multipart(_) | PartType::Message(_) => {
            mime = octet_stream(mime);
            PartKind::Leaf
        }
        _ => PartKind::Leaf,
    };
    if matches!(kind, PartKind::Leaf) && mime.ctype == "message" && mime.subtype == "rfc822" {
        // An enclosed message IMAP cannot show as one (transfer-encoded):
        // its bytes, typed as opaque.
        mime = octet_stream(mime);
    }
    Part {
        header,
        body,
        mime,
        kind,
    }
}

/// A part shown as opaque: its bytes, typed application/octet-stream.
fn octet_stream(mut m: Mime) -> Mime {
    m.ctype = "application".into();
    m.subtype = "octet-stream".into();
    m.params.clear();
    m
}

/// A header's raw value, unfolded and trimmed.
fn raw_value(raw: &[u8], h: &mail_parser::Header<'_>) -> Vec<u8> {
    let r = clamp(raw, h.offset_start as usize..h.offset_end as usize);
    let v: Vec<u8> = raw[r]
        .iter()
        .copied()
        .filter(|&b| b != b'\r' && b != b'\n')
        .collect();
    v.trim_ascii().to_vec()
}

fn params(ct: &mail_parser::ContentType<'_>) -> Vec<(String, String)> {
    ct.attributes()
        .unwrap_or(&[])
        .iter()
        .map(|a| (a.name.to_string(), a.value.to_string()))
        .collect()
}

fn mime_of(p: &MessagePart<'_>, raw: &[u8]) -> Mime {
    let mut m = Mime {
        ctype: "text".into(),
        subtype: "plain".into(),
        encoding: "7bit".into(),
        ..Mime::default()
    };
    let mut typed = false;
    for h in &p.headers {
        match (&h.name, &h.value) {
            (HeaderName::ContentType, HeaderValue::ContentType(ct)) => {
                typed = true;
                m.ctype = ct.ctype().to_ascii_lowercase();
                m.subtype = ct.subtype().unwrap_or("").to_ascii_lowercase();
                m.params = params(ct);
            }
            (HeaderName::ContentTransferEncoding, _) => {
                let v = raw_value(raw, h);
                if !v.is_empty() {
                    m.encoding = String::from_utf8_lossy(&v).to_ascii_lowercase();
                }
            }
            (HeaderName::ContentId, _) => m.id = Some(raw_value(raw, h)),
            (HeaderName::ContentDescription, _) => m.description = Some(raw_value(raw, h)),
            (HeaderName::ContentLocation, _) => m.location = Some(raw_value(raw, h)),
            (HeaderName::ContentLanguage, v) => {
                m.language = match v {
                    HeaderValue::Text(t) => vec![t.to_string()],
                    HeaderValue::TextList(l) => l.iter().map(|t| t.to_string()).collect(),
                    _ => Vec::new(),
                }
            }
            (HeaderName::ContentDisposition, HeaderValue::ContentType(ct)) => {
                m.disposition = Some((ct.ctype().to_ascii_lowercase(), params(ct)));
            }
            (HeaderName::Other(name), _) if name.eq_ignore_ascii_case("Content-MD5") => {
                m.md5 = Some(raw_value(raw, h))
            }
            _ => {}
        }
    }
    if !typed || m.subtype.is_empty() {
        m.ctype = "text".into();
        m.subtype = "plain".into();
    }
    if m.ctype == "text"
        && !m
            .params
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("charset"))
    {
        m.params.push(("charset".into(), "us-ascii".into()));
    }
    m
}

fn write_params(out: &mut Vec<u8>, params: &[(String, String)]) {
    if params.is_empty() {
        out.extend_from_slice(b"NIL");
        return;
    }
    out.push(b'(');
    for (i, (k, v)) in params.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        string(out, k.as_bytes());
        out.push(b' ');
        string(out, v.as_bytes());
    }
    out.push(b')');
}

/// Disposition, language and location: the extension data both
/// single-part and multipart bodies end with.
fn write_extensions(out: &mut Vec<u8>, m: &Mime) {
    out.push(b' ');
    match &m.disposition {
        Some((kind, params)) => {
            out.push(b'(');
            string(out, kind.as_bytes());
            out.push(b' ');
            write_params(out, params);
            out.push(b')');
        }
        None => out.extend_from_slice(b"NIL"),
    }
    out.push(b' ');
    match m.language.as_slice() {
        [] => out.extend_from_slice(b"NIL"),
        langs => {
            out.push(b'(');
            for (i, l) in langs.iter().enumerate() {
                if i > 0 {
                    out.push(b' ');
                }
                string(out, l.as_bytes());
            }
            out.push(b')');
        }
    }
    out.push(b' ');
    nstring(out, m.location.as_deref());
}

fn lines(body: &[u8]) -> usize {
    let n = body.iter().filter(|&&b| b == b'\n').count();
    if body.last().is_some_and(|&b| b != b'\n') {
        n + 1
    } else {
        n
    }
}

/// BODYSTRUCTURE (`ext`) or BODY of `part`.
pub fn write(out: &mut Vec<u8>, part: &Part, raw: &[u8], ext: bool) {
    let m = &part.mime;
    out.push(b'(');
    match &part.kind {
        PartKind::Multipart(children) => {
            for c in children {
                write(out, c, raw, ext);
            }
            out.push(b' ');
            string(out, m.subtype.as_bytes());
            if ext {
                out.push(b' ');
                let params: Vec<(String, String)> = m.params.clone();
                write_params(out, &params);
                write_extensions(out, m);
            }
        }
        kind => {
            string(out, m.ctype.as_bytes());
            out.push(b' ');
            string(out, m.subtype.as_bytes());
            out.push(b' ');
            write_params(out, &m.params);
            out.push(b' ');
            nstring(out, m.id.as_deref());
            out.push(b' ');
            nstring(out, m.description.as_deref());
            out.push(b' ');
            string(out, m.encoding.as_bytes());
            out.push_str_bytes(&format!(" {}", part.body.len()));
            let body = &raw[part.body.clone()];
            match kind {
                PartKind::Message(root, env) => {
                    out.push(b' ');
                    out.extend_from_slice(env);
                    out.push(b' ');
                    write(out, root, raw, ext);
                    out.push_str_bytes(&format!(" {}", lines(body)));
                }
                _ if m.ctype == "text" => out.push_str_bytes(&format!(" {}", lines(body))),
                _ => {}
            }
            if ext {
                out.push(b' ');
                nstring(out, m.md5.as_deref());
                write_extensions(out, m);
            }
        }
    }
    out.push(b')');
}

trait PushStr {
    fn push_str_bytes(&mut self, s: &str);
}

impl PushStr for Vec<u8> {
    fn push_str_bytes(&mut self, s: &str) {
        self.extend_from_slice(s.as_bytes());
    }
}
