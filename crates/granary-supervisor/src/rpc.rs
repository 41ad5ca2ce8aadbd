//! The host's end of a grain's Cap'n Proto channel, with the limits that
//! keep one grain from exhausting the host.

use std::cell::{Cell, RefCell};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{RpcSystem, twoparty};
use futures::AsyncReadExt;
use futures::io::{AsyncRead, AsyncWrite};
use tokio_util::compat::TokioAsyncReadCompatExt;

/// A two-party RPC system over `stream` whose incoming messages may not
/// exceed `max_message_bytes` (a larger one ends the connection: the reader
/// refuses it from its segment table, before allocating it), and which
/// stops reading a grain's calls while the grain is not reading the
/// answers (otherwise answers would queue in the host without bound).
pub(crate) fn system(
    stream: tokio::net::UnixStream,
    side: Side,
    bootstrap: Option<capnp::capability::Client>,
    max_message_bytes: u64,
) -> RpcSystem<Side> {
    let (reader, writer) = stream.compat().split();
    let gate = Rc::new(Gate::default());
    let options = capnp::message::ReaderOptions {
        traversal_limit_in_words: Some((max_message_bytes / 8) as usize),
        nesting_limit: 64,
    };
    let network = twoparty::VatNetwork::new(
        futures::io::BufReader::new(GatedReader {
            inner: reader,
            gate: gate.clone(),
        }),
        futures::io::BufWriter::new(GatedWriter {
            inner: writer,
            gate,
        }),
        side,
        options,
    );
    RpcSystem::new(Box::new(network), bootstrap)
}

/// Shared between the two halves: whether the writer is stuck on a full
/// socket, and the reader to wake when it is not.
#[derive(Default)]
struct Gate {
    blocked: Cell<bool>,
    reader: RefCell<Option<Waker>>,
}

impl Gate {
    fn set_blocked(&self, blocked: bool) {
        let was = self.blocked.replace(blocked);
        if was
            && !blocked
            && let Some(w) = self.reader.borrow_mut().take()
        {
            w.wake();
        }
    }
}

struct GatedReader<R> {
    inner: R,
    gate: Rc<Gate>,
}

impl<R: AsyncRead + Unpin> AsyncRead for GatedReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if self.gate.blocked.get() {
            *self.gate.reader.borrow_mut() = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

struct GatedWriter<W> {
    inner: W,
    gate: Rc<Gate>,
}

impl<W: AsyncWrite + Unpin> GatedWriter<W> {
    fn track<T>(&self, poll: Poll<T>) -> Poll<T> {
        self.gate.set_blocked(poll.is_pending());
        poll
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for GatedWriter<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.track(poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.track(poll)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reader_waits_while_the_writer_is_blocked() {
        let gate = Rc::new(Gate::default());
        let mut reader = GatedReader {
            inner: futures::io::Cursor::new(vec![1u8, 2, 3]),
            gate: gate.clone(),
        };
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut buf = [0u8; 3];
        gate.set_blocked(true);
        assert!(
            Pin::new(&mut reader)
                .poll_read(&mut cx, &mut buf)
                .is_pending()
        );
        assert!(gate.reader.borrow().is_some());
        gate.set_blocked(false);
        assert!(gate.reader.borrow().is_none(), "the reader was woken");
        assert!(matches!(
            Pin::new(&mut reader).poll_read(&mut cx, &mut buf),
            Poll::Ready(Ok(3))
        ));
    }
}
