//! Writing IMAP strings: quoted when that is safe, a literal otherwise.

/// Appends `s` as an IMAP string: `"quoted"` when it is 7-bit text without
/// CR, LF or NUL, else a literal (`{n}\r\n...`). NUL, which no string may
/// hold, becomes a space.
pub fn string(out: &mut Vec<u8>, s: &[u8]) {
    let quotable = s.len() < 1024
        && s.iter()
            .all(|&b| b != 0 && b != b'\r' && b != b'\n' && b < 0x80);
    if quotable {
        out.push(b'"');
        for &b in s {
            if b == b'"' || b == b'\\' {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'"');
    } else {
        out.extend_from_slice(format!("{{{}}}\r\n", s.len()).as_bytes());
        out.extend(s.iter().map(|&b| if b == 0 { b' ' } else { b }));
    }
}

/// `NIL` or the string.
pub fn nstring(out: &mut Vec<u8>, s: Option<&[u8]>) {
    match s {
        Some(s) => string(out, s),
        None => out.extend_from_slice(b"NIL"),
    }
}

/// A literal of raw bytes (message data): `{n}\r\n` then the bytes as
/// they are; `~{n}` (literal8) when they hold a NUL.
pub fn literal(out: &mut Vec<u8>, data: &[u8], binary: bool) {
    if binary && data.contains(&0) {
        out.push(b'~');
    }
    out.extend_from_slice(format!("{{{}}}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
}

/// A mailbox name as IMAP4rev1 clients expect it: modified UTF-7 (RFC
/// 3501 §5.1.3) when it has non-ASCII characters, unless the client
/// enabled UTF8=ACCEPT or IMAP4rev2.
pub fn mailbox(out: &mut Vec<u8>, name: &str, utf8: bool) {
    if utf8 || name.is_ascii() {
        string(out, name.as_bytes());
    } else {
        string(out, utf7::encode(name).as_bytes());
    }
}

/// Modified UTF-7 for mailbox names.
pub mod utf7 {
    use base64::Engine;
    use base64::alphabet::IMAP_MUTF7;
    use base64::engine::{GeneralPurpose, GeneralPurposeConfig, general_purpose::NO_PAD};

    const ENGINE: GeneralPurpose = GeneralPurpose::new(&IMAP_MUTF7, NO_PAD);

    pub fn encode(s: &str) -> String {
        let mut out = String::new();
        let mut pending: Vec<u16> = Vec::new();
        let flush = |pending: &mut Vec<u16>, out: &mut String| {
            if pending.is_empty() {
                return;
            }
            let bytes: Vec<u8> = pending.iter().flat_map(|u| u.to_be_bytes()).collect();
            out.push('&');
            out.push_str(&ENGINE.encode(bytes));
            out.push('-');
            pending.clear();
        };
        for c in s.chars() {
            if (' '..='~').contains(&c) {
                flush(&mut pending, &mut out);
                if c == '&' {
                    out.push_str("&-");
                } else {
                    out.push(c);
                }
            } else {
                let mut buf = [0u16; 2];
                pending.extend_from_slice(c.encode_utf16(&mut buf));
            }
        }
        flush(&mut pending, &mut out);
        out
    }

    /// The name a client sent, decoded; `None` when it is not valid
    /// modified UTF-7 (then it is taken as it is).
    pub fn decode(s: &str) -> Option<String> {
        if !s.contains('&') {
            return Some(s.to_owned());
        }
        let mut out = String::new();
        let mut rest = s;
        while let Some(i) = rest.find('&') {
            out.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            let end = after.find('-')?;
            let encoded = &after[..end];
            if encoded.is_empty() {
                out.push('&');
            } else {
                let bytes = ENGINE.decode(encoded).ok()?;
                if bytes.len() % 2 != 0 {
                    return None;
                }
                let units: Vec<u16> = bytes
                    .chunks(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                out.push_str(&String::from_utf16(&units).ok()?);
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Some(out)
    }

    #[allow(dead_code)]
    const _: GeneralPurposeConfig = GeneralPurposeConfig::new();

    #[cfg(test)]
    mod tests {
        #[test]
        fn round_trips_the_rfc_example() {
            let name = "~peter/mail/台北/日本語";
            let enc = super::encode(name);
            assert_eq!(enc, "~peter/mail/&U,BTFw-/&ZeVnLIqe-");
            assert_eq!(super::decode(&enc).unwrap(), name);
            assert_eq!(super::encode("A&B"), "A&-B");
            assert_eq!(super::decode("A&-B").unwrap(), "A&B");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_quoted_or_literal() {
        let mut out = Vec::new();
        string(&mut out, b"say \"hi\"");
        assert_eq!(out, b"\"say \\\"hi\\\"\"");
        out.clear();
        string(&mut out, "héllo".as_bytes());
        assert_eq!(out, b"{6}\r\nh\xc3\xa9llo");
        out.clear();
        nstring(&mut out, None);
        assert_eq!(out, b"NIL");
    }
}
