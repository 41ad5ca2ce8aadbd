//! One server-to-server stream's bytes: frames read with
//! `granary_wire::stanza::next_frame` in `jabber:server`, a deadline for
//! each, and what ends a stream.

use granary_wire::stanza::{Frame, next_frame};
use granary_wire::xmpp::{NS_SERVER, XmppError, stream_error};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{Duration, Instant};

/// Why a stream stopped.
#[derive(Debug)]
pub(crate) enum Ended {
    /// The peer closed the connection (or it broke).
    Closed,
    /// Nothing came in time.
    Quiet,
    /// This server is stopping.
    Stopping,
    /// The peer sent something we must end the stream for: the stream
    /// error to send (already formatted, with `</stream:stream>`).
    Error(String),
}

/// The reading side: buffered bytes and the largest frame allowed.
pub(crate) struct Reader {
    buf: Vec<u8>,
    pub(crate) max: usize,
    stop: watch::Receiver<bool>,
}

impl Reader {
    pub(crate) fn new(max: usize, stop: watch::Receiver<bool>) -> Reader {
        Reader {
            buf: Vec::new(),
            max,
            stop,
        }
    }

    /// Forgets what was read (after STARTTLS: bytes sent in clear after
    /// `<starttls/>` are not trusted).
    pub(crate) fn clear(&mut self) {
        self.buf.clear();
    }

    /// The next frame, waiting at most `wait` for it to arrive whole.
    pub(crate) async fn frame<S: AsyncRead + Unpin>(
        &mut self,
        io: &mut S,
        wait: Duration,
    ) -> Result<Frame, Ended> {
        let deadline = Instant::now() + wait;
        loop {
            // Whitespace between stanzas (keepalives) is dropped as it
            // comes, so it cannot pile up.
            let ws = self
                .buf
                .iter()
                .take_while(|b| b.is_ascii_whitespace())
                .count();
            self.buf.drain(..ws);
            match next_frame(&self.buf, self.max, NS_SERVER) {
                Ok(Some((frame, n))) => {
                    self.buf.drain(..n);
                    return Ok(frame);
                }
                Ok(None) => {}
                Err(XmppError::TooLarge) => {
                    return Err(Ended::Error(stream_error(
                        "policy-violation",
                        "that stanza is too large",
                    )));
                }
                Err(e) => {
                    return Err(Ended::Error(stream_error(
                        "not-well-formed",
                        &e.to_string(),
                    )));
                }
            }
            match crate::read_more(io, &mut self.buf, deadline, &self.stop).await {
                crate::ReadMore::More => {}
                crate::ReadMore::Ended => return Err(Ended::Closed),
                crate::ReadMore::TooSlow => return Err(Ended::Quiet),
                crate::ReadMore::Stopping => return Err(Ended::Stopping),
            }
        }
    }
}

/// Writes `text`, failing after `wait`.
pub(crate) async fn send<S: AsyncWrite + Unpin>(
    io: &mut S,
    text: &str,
    wait: Duration,
) -> Result<(), Ended> {
    match tokio::time::timeout(wait, io.write_all(text.as_bytes())).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(Ended::Closed),
    }
}

/// Ends a stream as `why` asks (a stream error, or just our end tag) and
/// closes the connection.
pub(crate) async fn end<S: AsyncWrite + Unpin>(io: &mut S, why: &Ended) {
    let text = match why {
        Ended::Error(e) => e.clone(),
        Ended::Stopping => stream_error("system-shutdown", "the server is stopping"),
        Ended::Quiet => "</stream:stream>".to_owned(),
        Ended::Closed => return,
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = io.write_all(text.as_bytes()).await;
        let _ = io.shutdown().await;
    })
    .await;
}
