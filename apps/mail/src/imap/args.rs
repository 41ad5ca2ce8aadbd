//! A small reader of IMAP arguments (atoms, strings, literals, lists) for
//! what `imap-codec` 2.0.0-alpha.10 does not parse yet: LIST with
//! selection and return options (RFC 5258, RFC 5819) and SEARCH RETURN
//! (ESEARCH, RFC 4731, part of IMAP4rev2). Everything else is parsed by
//! `imap-codec`.

/// One argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    /// An atom, as written (`INBOX`, `RETURN`, `%`).
    Atom(Vec<u8>),
    /// A quoted string or a literal, unescaped.
    Str(Vec<u8>),
    List(Vec<Arg>),
}

impl Arg {
    /// The text of an atom or string.
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Arg::Atom(a) | Arg::Str(a) => Some(a),
            Arg::List(_) => None,
        }
    }

    pub fn is_atom(&self, word: &str) -> bool {
        matches!(self, Arg::Atom(a) if a.eq_ignore_ascii_case(word.as_bytes()))
    }
}

/// Reads the arguments of a whole command (literals inline, as the
/// framing assembled them) up to its final CRLF. `None` when malformed.
pub fn parse(input: &[u8]) -> Option<Vec<Arg>> {
    let mut pos = 0;
    let args = list_items(input, &mut pos, false)?;
    Some(args)
}

fn list_items(input: &[u8], pos: &mut usize, nested: bool) -> Option<Vec<Arg>> {
    let mut out = Vec::new();
    loop {
        while *pos < input.len() && input[*pos] == b' ' {
            *pos += 1;
        }
        match input.get(*pos) {
            None | Some(b'\r') | Some(b'\n') => return (!nested).then_some(out),
            Some(b')') => {
                *pos += 1;
                return nested.then_some(out);
            }
            Some(b'(') => {
                *pos += 1;
                out.push(Arg::List(list_items(input, pos, true)?));
            }
            Some(b'"') => out.push(Arg::Str(quoted(input, pos)?)),
            Some(b'{') | Some(b'~') => out.push(Arg::Str(literal(input, pos)?)),
            Some(_) => {
                let start = *pos;
                while *pos < input.len()
                    && !matches!(input[*pos], b' ' | b'(' | b')' | b'\r' | b'\n')
                {
                    // Brackets belong to the atom (BODY[...]).
                    if input[*pos] == b'[' {
                        let close = input[*pos..].iter().position(|&b| b == b']')?;
                        *pos += close;
                    }
                    *pos += 1;
                }
                out.push(Arg::Atom(input[start..*pos].to_vec()));
            }
        }
        if out.len() > 10_000 {
            return None;
        }
    }
}

fn quoted(input: &[u8], pos: &mut usize) -> Option<Vec<u8>> {
    *pos += 1;
    let mut out = Vec::new();
    loop {
        match *input.get(*pos)? {
            b'"' => {
                *pos += 1;
                return Some(out);
            }
            b'\\' => {
                out.push(*input.get(*pos + 1)?);
                *pos += 2;
            }
            b'\r' | b'\n' => return None,
            b => {
                out.push(b);
                *pos += 1;
            }
        }
    }
}

fn literal(input: &[u8], pos: &mut usize) -> Option<Vec<u8>> {
    if input.get(*pos) == Some(&b'~') {
        *pos += 1;
    }
    if input.get(*pos) != Some(&b'{') {
        return None;
    }
    let close = input[*pos..].iter().position(|&b| b == b'}')?;
    let spec = std::str::from_utf8(&input[*pos + 1..*pos + close]).ok()?;
    let n: usize = spec.trim_end_matches('+').parse().ok()?;
    *pos += close + 1;
    if input.get(*pos..*pos + 2)? != b"\r\n" {
        return None;
    }
    *pos += 2;
    let end = pos.checked_add(n)?;
    let data = input.get(*pos..end)?.to_vec();
    *pos = end;
    Some(data)
}

/// `tag [UID] SEARCH RETURN (opts) rest`: the options and the command
/// without them (`tag [UID] SEARCH rest`), for `imap-codec`. `None` when
/// the command has no RETURN.
pub fn split_search_return(command: &[u8]) -> Option<(Vec<String>, Vec<u8>)> {
    let words: Vec<(usize, usize)> = word_spans(command, 4);
    let (search_at, _) = words
        .iter()
        .enumerate()
        .find(|(i, (s, e))| *i <= 2 && command[*s..*e].eq_ignore_ascii_case(b"SEARCH"))?;
    let (_, search_end) = words[search_at];
    let rest = &command[search_end..];
    let trimmed = rest.strip_prefix(b" ")?;
    if trimmed.len() < 7 || !trimmed[..6].eq_ignore_ascii_case(b"RETURN") || trimmed[6] != b' ' {
        return None;
    }
    let after = &trimmed[7..];
    if after.first() != Some(&b'(') {
        return None;
    }
    let close = after.iter().position(|&b| b == b')')?;
    let opts: Vec<String> = String::from_utf8_lossy(&after[1..close])
        .split_whitespace()
        .map(|s| s.to_ascii_uppercase())
        .collect();
    let mut out = command[..search_end].to_vec();
    let tail = &after[close + 1..];
    if tail.trim_ascii().is_empty() {
        // RETURN (...) with no criteria: search everything.
        out.extend_from_slice(b" ALL\r\n");
    } else {
        out.extend_from_slice(tail);
    }
    Some((opts, out))
}

/// Byte spans of the first `n` space-separated words.
fn word_spans(input: &[u8], n: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while out.len() < n && i < input.len() {
        while i < input.len() && input[i] == b' ' {
            i += 1;
        }
        let start = i;
        while i < input.len() && !matches!(input[i], b' ' | b'\r' | b'\n') {
            i += 1;
        }
        if start == i {
            break;
        }
        out.push((start, i));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_strings_and_literals() {
        let a = parse(b"(SPECIAL-USE) \"\" (\"INBOX\" {4}\r\nSe t) RETURN (STATUS (MESSAGES))\r\n")
            .unwrap();
        assert_eq!(a.len(), 5);
        assert_eq!(a[0], Arg::List(vec![Arg::Atom(b"SPECIAL-USE".to_vec())]));
        assert_eq!(a[1], Arg::Str(Vec::new()));
        assert_eq!(
            a[2],
            Arg::List(vec![
                Arg::Str(b"INBOX".to_vec()),
                Arg::Str(b"Se t".to_vec())
            ])
        );
        assert!(a[3].is_atom("return"));
        assert!(parse(b"(unclosed\r\n").is_none());
        assert!(parse(b"{99}\r\nshort\r\n").is_none());
        // Found by the fuzzer: `~` not followed by `{`, and a length
        // that overflows.
        assert!(parse(b"~}|\n\n").is_none());
        assert!(parse(b"~x{1}\r\na").is_none());
        assert!(parse(b"{18446744073709551615}\r\nx").is_none());
    }

    #[test]
    fn search_return_is_split_off() {
        let (opts, rest) =
            split_search_return(b"a1 UID SEARCH RETURN (MIN COUNT) UNSEEN\r\n").unwrap();
        assert_eq!(opts, ["MIN", "COUNT"]);
        assert_eq!(rest, b"a1 UID SEARCH UNSEEN\r\n");
        let (opts, rest) = split_search_return(b"a2 SEARCH RETURN () \r\n").unwrap();
        assert!(opts.is_empty());
        assert_eq!(rest, b"a2 SEARCH ALL\r\n");
        assert!(split_search_return(b"a3 SEARCH UNSEEN\r\n").is_none());
    }
}
