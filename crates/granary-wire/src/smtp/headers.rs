//! Reading a message's header block as the MX must before it adds its own
//! headers: which `Authentication-Results` fields claim to come from this
//! host (RFC 8601 §5: a receiver removes those before adding its own,
//! or a sender could forge our verdict).

use std::ops::Range;

/// The header block: up to and including the empty line that ends it (or
/// the whole message when there is none).
pub fn header_block(message: &[u8]) -> &[u8] {
    let mut pos = 0;
    while pos < message.len() {
        let end = message[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(message.len(), |p| pos + p + 1);
        let line = &message[pos..end];
        if line == b"\r\n" || line == b"\n" {
            return &message[..end];
        }
        pos = end;
    }
    message
}

/// Every header field of the block: its byte range (all its lines) and
/// its name.
pub fn fields(message: &[u8]) -> Vec<(Range<usize>, &[u8])> {
    let block = header_block(message);
    let mut out: Vec<(Range<usize>, &[u8])> = Vec::new();
    let mut pos = 0;
    while pos < block.len() {
        let end = block[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(block.len(), |p| pos + p + 1);
        let line = &block[pos..end];
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        match (line[0], out.last_mut()) {
            (b' ' | b'\t', Some((range, _))) => range.end = end,
            _ => {
                let name_end = line.iter().position(|&b| b == b':').unwrap_or(0);
                let name = trim_end(&line[..name_end]);
                out.push((pos..end, name));
            }
        }
        pos = end;
    }
    out
}

fn trim_end(mut s: &[u8]) -> &[u8] {
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// The ranges of `Authentication-Results` fields whose authserv-id is
/// `authserv_id` (compared without case), in order.
pub fn own_auth_results(message: &[u8], authserv_id: &str) -> Vec<Range<usize>> {
    fields(message)
        .into_iter()
        .filter(|(_, name)| name.eq_ignore_ascii_case(b"Authentication-Results"))
        .filter(|(range, name)| {
            let value = &message[range.start + name.len()..range.end];
            let value = value
                .iter()
                .position(|&b| b == b':')
                .map_or(&value[..0], |p| &value[p + 1..]);
            authserv_id_of(value).eq_ignore_ascii_case(authserv_id.as_bytes())
        })
        .map(|(range, _)| range)
        .collect()
}

/// The first token of an `Authentication-Results` value, past white space,
/// folding and comments; unquoted.
fn authserv_id_of(value: &[u8]) -> &[u8] {
    let mut i = 0;
    let mut depth = 0usize;
    while i < value.len() {
        match value[i] {
            // A quoted-pair in a comment: `\)` does not close it.
            b'\\' if depth > 0 => i += 1,
            b'(' => depth += 1,
            b')' if depth > 0 => depth -= 1,
            b' ' | b'\t' | b'\r' | b'\n' => {}
            _ if depth > 0 => {}
            _ => break,
        }
        i += 1;
    }
    let rest = &value[i..];
    if let Some(quoted) = rest.strip_prefix(b"\"") {
        let end = quoted
            .iter()
            .position(|&b| b == b'"')
            .unwrap_or(quoted.len());
        return &quoted[..end];
    }
    let end = rest
        .iter()
        .position(|&b| matches!(b, b';' | b' ' | b'\t' | b'\r' | b'\n' | b'('))
        .unwrap_or(rest.len());
    &rest[..end]
}

/// `message` without the byte `ranges` (sorted, not overlapping), in place
/// and in one pass: each kept span moves once, however many are removed.
/// A range out of order or out of bounds is skipped.
pub fn remove_ranges(message: &mut Vec<u8>, ranges: &[Range<usize>]) {
    let len = message.len();
    let (mut read, mut write) = (0, 0);
    for r in ranges {
        if r.start < read || r.start > r.end || r.end > len {
            continue;
        }
        message.copy_within(read..r.start, write);
        write += r.start - read;
        read = r.end;
    }
    message.copy_within(read..len, write);
    write += len - read;
    message.truncate(write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_own_verdicts_are_found_folded_or_not() {
        let m = b"Authentication-Results: mx.example.org; spf=pass\r\nSubject: x\r\n\
authentication-results:\r\n (forged) MX.Example.ORG;\r\n\tdkim=pass\r\n\
Authentication-Results: other.example; spf=fail\r\n\
Authentication-Results: \"mx.example.org\"; dmarc=pass\r\n\
Authentication-Results: (a \\) b) mx.example.org; arc=pass\r\n\r\n\
Authentication-Results: mx.example.org; in the body\r\n";
        let ranges = own_auth_results(m, "mx.example.org");
        assert_eq!(ranges.len(), 4);
        let mut stripped = m.to_vec();
        remove_ranges(&mut stripped, &ranges);
        assert_eq!(
            String::from_utf8(stripped).unwrap(),
            "Subject: x\r\nAuthentication-Results: other.example; spf=fail\r\n\r\nAuthentication-Results: mx.example.org; in the body\r\n"
        );
    }

    #[test]
    fn a_message_without_headers_or_an_end_is_handled() {
        assert!(own_auth_results(b"", "h").is_empty());
        assert!(own_auth_results(b"no colon here", "h").is_empty());
        assert_eq!(header_block(b"A: b\nC: d"), b"A: b\nC: d");
        assert_eq!(fields(b" folded first\r\nA: b\r\n").len(), 2);
    }

    #[test]
    fn removing_many_ranges_keeps_everything_else_in_order() {
        let mut m = b"0123456789".to_vec();
        remove_ranges(&mut m, &[1..3, 3..4, 2..5, 6..6, 8..20, 9..10]);
        assert_eq!(m, b"045678");
        let mut m = b"abc".to_vec();
        remove_ranges(&mut m, &[]);
        assert_eq!(m, b"abc");
        // 100,000 forged fields go in linear time.
        let mut big = b"Authentication-Results: mx.example.org; x\r\n".repeat(100_000);
        big.extend_from_slice(b"\r\nbody\r\n");
        let ranges = own_auth_results(&big, "mx.example.org");
        assert_eq!(ranges.len(), 100_000);
        remove_ranges(&mut big, &ranges);
        assert_eq!(big, b"\r\nbody\r\n");
    }
}
