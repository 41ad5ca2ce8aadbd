//! Reading whole IMAP commands: lines and the literals inside them.
//! A synchronising literal (`{n}`) gets a `+` continuation first; a
//! non-synchronising one (`{n+}`, LITERAL+) is read right away. A literal
//! over the limit is refused before its data for `{n}` and read past for
//! `{n+}`, so the connection stays in step either way.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The longest line outside literals.
pub const MAX_LINE: usize = 64 << 10;
/// A client silent this long is logged out (RFC 3501 asks for at least
/// 30 minutes).
pub const IDLE_LOGOUT: Duration = Duration::from_secs(31 * 60);

/// What the client sent next.
pub enum Frame {
    /// A whole command, literals inline, ending in CRLF.
    Command(Vec<u8>),
    /// A literal over the limit; the rest of that command was skipped.
    TooBig {
        tag: String,
    },
    /// A line over [`MAX_LINE`]; the connection must end.
    TooLong,
    Closed,
}

pub struct Reader<R> {
    inner: R,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(inner: R) -> Reader<R> {
        Reader {
            inner,
            buf: Vec::with_capacity(8192),
        }
    }

    /// Reads more into the buffer; `false` at the end of input (or after
    /// [`IDLE_LOGOUT`] of silence). Cancel-safe: IDLE races it with
    /// changes to the store.
    async fn fill(&mut self) -> std::io::Result<bool> {
        let mut chunk = [0u8; 16384];
        let n = match tokio::time::timeout(IDLE_LOGOUT, self.inner.read(&mut chunk)).await {
            Ok(r) => r?,
            Err(_) => 0,
        };
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// One line, CRLF (or LF) included; `None` at the end of input, or
    /// `Some(Err)` past [`MAX_LINE`].
    pub async fn line(&mut self) -> std::io::Result<Option<Result<Vec<u8>, ()>>> {
        let mut scanned = 0;
        loop {
            if let Some(p) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + p + 1;
                let line: Vec<u8> = self.buf.drain(..end).collect();
                return Ok(Some(Ok(line)));
            }
            scanned = self.buf.len();
            if scanned > MAX_LINE {
                return Ok(Some(Err(())));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    async fn exactly(&mut self, n: usize, out: Option<&mut Vec<u8>>) -> std::io::Result<bool> {
        let mut left = n;
        let mut out = out;
        loop {
            let take = left.min(self.buf.len());
            if let Some(o) = out.as_deref_mut() {
                o.extend_from_slice(&self.buf[..take]);
            }
            self.buf.drain(..take);
            left -= take;
            if left == 0 {
                return Ok(true);
            }
            if !self.fill().await? {
                return Ok(false);
            }
        }
    }

    /// The next command, its literals read in (literals up to
    /// `max_literal` bytes).
    pub async fn command<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        max_literal: u64,
    ) -> std::io::Result<Frame> {
        let mut command = Vec::new();
        // The command's text outside literals, and its literals together,
        // each have their own bound: an APPEND's message is limited by
        // `max_literal`, not by the line length.
        let mut text = 0usize;
        let mut literals = 0u64;
        loop {
            let line = match self.line().await? {
                None => return Ok(Frame::Closed),
                Some(Err(())) => return Ok(Frame::TooLong),
                Some(Ok(l)) => l,
            };
            command.extend_from_slice(&line);
            text += line.len();
            if text > MAX_LINE * 4 {
                return Ok(Frame::TooLong);
            }
            let Some((n, sync)) = literal_at_end(&line) else {
                return Ok(Frame::Command(command));
            };
            literals = literals.saturating_add(n);
            if literals > max_literal {
                let tag = tag_of(&command);
                if sync {
                    // Refused before the client sends it; the command ends.
                    return Ok(Frame::TooBig { tag });
                }
                if !self.exactly(n as usize, None).await? {
                    return Ok(Frame::Closed);
                }
                // Skip what remains of that command.
                loop {
                    match self.line().await? {
                        None => return Ok(Frame::Closed),
                        Some(Err(())) => return Ok(Frame::TooLong),
                        Some(Ok(l)) => match literal_at_end(&l) {
                            None => break,
                            // The client waits for a `+` it will not get:
                            // the tagged NO ends the command instead.
                            Some((_, true)) => break,
                            // Sent regardless: read past all of it.
                            Some((m, false)) => {
                                if !self.exactly(m as usize, None).await? {
                                    return Ok(Frame::Closed);
                                }
                            }
                        },
                    }
                }
                return Ok(Frame::TooBig { tag });
            }
            if sync {
                writer.write_all(b"+ Ready for literal data\r\n").await?;
                writer.flush().await?;
            }
            if !self.exactly(n as usize, Some(&mut command)).await? {
                return Ok(Frame::Closed);
            }
        }
    }
}

/// `{n}` or `{n+}` (or `~{n}`) right before the line's end: the literal's
/// length and whether it synchronises.
pub fn literal_at_end(line: &[u8]) -> Option<(u64, bool)> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let spec = &inner[open + 1..];
    let (digits, sync) = match spec.strip_suffix(b"+") {
        Some(d) => (d, false),
        None => (spec, true),
    };
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some((std::str::from_utf8(digits).ok()?.parse().ok()?, sync))
}

/// The tag of a command, as far as it can be read.
pub fn tag_of(command: &[u8]) -> String {
    let end = command
        .iter()
        .position(|&b| b == b' ' || b == b'\r' || b == b'\n')
        .unwrap_or(command.len());
    let tag = &command[..end.min(64)];
    if !tag.is_empty()
        && tag
            .iter()
            .all(|&b| b.is_ascii_graphic() && b != b'+' && b != b'*')
    {
        String::from_utf8_lossy(tag).into_owned()
    } else {
        "*".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_found_at_the_end_of_a_line() {
        assert_eq!(
            literal_at_end(b"a APPEND INBOX {310}\r\n"),
            Some((310, true))
        );
        assert_eq!(
            literal_at_end(b"a APPEND INBOX ~{5+}\r\n"),
            Some((5, false))
        );
        assert_eq!(literal_at_end(b"a LOGIN \"{5}\"\r\n"), None);
        assert_eq!(literal_at_end(b"a X {}\r\n"), None);
        assert_eq!(tag_of(b"a01 NOOP\r\n"), "a01");
        assert_eq!(tag_of(b"\r\n"), "*");
    }

    #[tokio::test]
    async fn a_command_with_literals_is_read_whole() {
        let input: &[u8] = b"a LOGIN {5}\r\nalice {3+}\r\npwd\r\nb NOOP\r\n";
        let mut r = Reader::new(input);
        let mut out = Vec::new();
        let Frame::Command(c) = r.command(&mut out, 100).await.unwrap() else {
            panic!()
        };
        assert_eq!(c, b"a LOGIN {5}\r\nalice {3+}\r\npwd\r\n");
        assert_eq!(out, b"+ Ready for literal data\r\n");
        let Frame::Command(c) = r.command(&mut out, 100).await.unwrap() else {
            panic!()
        };
        assert_eq!(c, b"b NOOP\r\n");
        let input: &[u8] = b"c APPEND INBOX {5000+}\r\n";
        let mut data = input.to_vec();
        data.extend(std::iter::repeat_n(b'x', 5000));
        data.extend_from_slice(b"\r\nd NOOP\r\n");
        let mut r = Reader::new(&data[..]);
        let Frame::TooBig { tag } = r.command(&mut out, 100).await.unwrap() else {
            panic!()
        };
        assert_eq!(tag, "c");
        let Frame::Command(c) = r.command(&mut out, 100).await.unwrap() else {
            panic!()
        };
        assert_eq!(c, b"d NOOP\r\n");
    }

    #[tokio::test]
    async fn a_literal_may_be_far_longer_than_a_line() {
        // An APPEND of 1 MiB: the message counts against the literal
        // limit, not the line limit.
        let mut data = b"e APPEND Sent {1048576}\r\n".to_vec();
        data.extend(std::iter::repeat_n(b'x', 1 << 20));
        data.extend_from_slice(b"\r\n");
        let mut r = Reader::new(&data[..]);
        let mut out = Vec::new();
        let Frame::Command(c) = r.command(&mut out, 50 << 20).await.unwrap() else {
            panic!("a 1 MiB APPEND was refused")
        };
        assert_eq!(c.len(), data.len());
        // Two literals are limited together.
        let mut data = b"f X {60+}\r\n".to_vec();
        data.extend(std::iter::repeat_n(b'y', 60));
        data.extend_from_slice(b" {60+}\r\n");
        data.extend(std::iter::repeat_n(b'z', 60));
        data.extend_from_slice(b"\r\ng NOOP\r\n");
        let mut r = Reader::new(&data[..]);
        assert!(matches!(
            r.command(&mut out, 100).await.unwrap(),
            Frame::TooBig { .. }
        ));
        let Frame::Command(c) = r.command(&mut out, 100).await.unwrap() else {
            panic!()
        };
        assert_eq!(c, b"g NOOP\r\n");
    }
}
