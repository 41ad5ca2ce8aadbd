//! ENVELOPE (RFC 3501 §7.4.2): date, subject and message ids as written;
//! addresses parsed, display names re-encoded as RFC 2047 words when they
//! are not ASCII so clients decode them as they would any header.

use base64::Engine;
use mail_parser::{Addr, Address, HeaderName, HeaderValue, MessagePart};

use crate::imap::text::{nstring, string};

/// Writes the ENVELOPE of the message whose root part is `parts[root]`.
pub(crate) fn write(out: &mut Vec<u8>, parts: &[MessagePart<'_>], root: usize, raw: &[u8]) {
    let headers: &[mail_parser::Header<'_>] =
        parts.get(root).map(|p| &p.headers[..]).unwrap_or(&[]);
    let raw_of = |name: HeaderName<'_>| -> Option<Vec<u8>> {
        let h = headers.iter().find(|h| h.name == name)?;
        let start = (h.offset_start as usize).min(raw.len());
        let end = (h.offset_end as usize).clamp(start, raw.len());
        let v: Vec<u8> = raw[start..end]
            .iter()
            .copied()
            .filter(|&b| b != b'\r' && b != b'\n')
            .collect();
        Some(v.trim_ascii().to_vec())
    };
    let address_of = |name: HeaderName<'_>| -> Option<&Address<'_>> {
        headers
            .iter()
            .find(|h| h.name == name)
            .and_then(|h| match &h.value {
                HeaderValue::Address(a) => Some(a),
                _ => None,
            })
    };
    out.push(b'(');
    nstring(out, raw_of(HeaderName::Date).as_deref());
    out.push(b' ');
    nstring(out, raw_of(HeaderName::Subject).as_deref());
    let from = address_of(HeaderName::From);
    for (name, default) in [
        (HeaderName::From, None),
        (HeaderName::Sender, from),
        (HeaderName::ReplyTo, from),
        (HeaderName::To, None),
        (HeaderName::Cc, None),
        (HeaderName::Bcc, None),
    ] {
        out.push(b' ');
        write_addresses(out, address_of(name).or(default));
    }
    out.push(b' ');
    nstring(out, raw_of(HeaderName::InReplyTo).as_deref());
    out.push(b' ');
    nstring(out, raw_of(HeaderName::MessageId).as_deref());
    out.push(b')');
}

fn write_addresses(out: &mut Vec<u8>, a: Option<&Address<'_>>) {
    let Some(a) = a else {
        out.extend_from_slice(b"NIL");
        return;
    };
    let mut items = Vec::new();
    match a {
        Address::List(list) => {
            for addr in list {
                write_addr(&mut items, addr);
            }
        }
        Address::Group(groups) => {
            for g in groups {
                match &g.name {
                    Some(name) => {
                        // A group: its name as a mailbox with no host, its
                        // members, then the end marker.
                        items.extend_from_slice(b"(NIL NIL ");
                        string(&mut items, name.as_bytes());
                        items.extend_from_slice(b" NIL)");
                        for addr in &g.addresses {
                            write_addr(&mut items, addr);
                        }
                        items.extend_from_slice(b"(NIL NIL NIL NIL)");
                    }
                    None => {
                        for addr in &g.addresses {
                            write_addr(&mut items, addr);
                        }
                    }
                }
            }
        }
    }
    if items.is_empty() {
        out.extend_from_slice(b"NIL");
    } else {
        out.push(b'(');
        out.extend_from_slice(&items);
        out.push(b')');
    }
}

fn write_addr(out: &mut Vec<u8>, a: &Addr<'_>) {
    let Some(address) = a.address.as_deref() else {
        return;
    };
    out.push(b'(');
    match a.name.as_deref().filter(|n| !n.is_empty()) {
        Some(name) if name.is_ascii() => string(out, name.as_bytes()),
        Some(name) => string(out, encoded_word(name).as_bytes()),
        None => out.extend_from_slice(b"NIL"),
    }
    out.extend_from_slice(b" NIL ");
    match address.rsplit_once('@') {
        Some((local, host)) => {
            string(out, local.as_bytes());
            out.push(b' ');
            string(out, host.as_bytes());
        }
        None => {
            string(out, address.as_bytes());
            out.extend_from_slice(b" NIL");
        }
    }
    out.push(b')');
}

/// `=?utf-8?b?...?=` for a display name that is not ASCII.
fn encoded_word(name: &str) -> String {
    format!(
        "=?utf-8?b?{}?=",
        base64::engine::general_purpose::STANDARD.encode(name.as_bytes())
    )
}
