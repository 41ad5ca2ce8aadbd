//! Handing a client connection to a grain, two ways:
//!
//! - [`send_fd`]/[`recv_fd`]: the plaintext end of a socketpair travels to
//!   the grain with SCM_RIGHTS over a host-only unix socket beside the
//!   Cap'n Proto one, tagged with a token the `Grain.accept` call names.
//!   After that the host is out of the data path.
//! - [`ByteStreamWriter`] and [`pump_to`]: the bytes themselves travel in
//!   `ByteStream.write` calls over the capnp channel.
//!
//! `granary-supervisor`'s `benches/handoff.rs` measures both against a
//! direct socket. The host (`granary-supervisor`) and apps (`granary-sdk`)
//! both link this crate; neither links the other.

#![allow(unsafe_code)] // adopting descriptors received with SCM_RIGHTS

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use granary_schema::stream_capnp::byte_stream;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Sends `fd` tagged with `token` over the unix socket `channel`.
pub fn send_fd(channel: &impl AsRawFd, token: u64, fd: RawFd) -> io::Result<()> {
    let bytes = token.to_le_bytes();
    let iov = [IoSlice::new(&bytes)];
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(channel.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)?;
    Ok(())
}

/// Receives one descriptor and its token from the unix socket `channel`.
pub fn recv_fd(channel: &impl AsRawFd) -> io::Result<(u64, OwnedFd)> {
    let mut bytes = [0u8; 8];
    let mut iov = [IoSliceMut::new(&mut bytes)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        channel.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    if msg.bytes != 8 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "hand-off message cut short",
        ));
    }
    let mut received = None;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: the kernel just installed this descriptor for us;
                // nothing else owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if received.is_none() {
                    received = Some(owned);
                }
            }
        }
    }
    let fd = received.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "hand-off message carried no descriptor",
        )
    })?;
    Ok((u64::from_le_bytes(bytes), fd))
}

/// A `ByteStream` server that writes what it is given to a local socket.
pub struct ByteStreamWriter<W> {
    out: std::rc::Rc<tokio::sync::Mutex<W>>,
}

impl<W> ByteStreamWriter<W> {
    pub fn new(out: W) -> ByteStreamWriter<W> {
        ByteStreamWriter {
            out: std::rc::Rc::new(tokio::sync::Mutex::new(out)),
        }
    }
}

impl<W: AsyncWrite + Unpin + 'static> byte_stream::Server for ByteStreamWriter<W> {
    async fn write(
        self: capnp::capability::Rc<Self>,
        params: byte_stream::WriteParams,
        _: byte_stream::WriteResults,
    ) -> Result<(), capnp::Error> {
        let bytes = params.get()?.get_bytes()?.to_vec();
        let mut out = self.out.lock().await;
        out.write_all(&bytes)
            .await
            .map_err(|e| capnp::Error::failed(format!("writing to the connection: {e}")))
    }

    async fn end(
        self: capnp::capability::Rc<Self>,
        _: byte_stream::EndParams,
        _: byte_stream::EndResults,
    ) -> Result<(), capnp::Error> {
        let mut out = self.out.lock().await;
        out.shutdown()
            .await
            .map_err(|e| capnp::Error::failed(format!("closing the connection: {e}")))
    }
}

/// Largest chunk one `write` call carries.
pub const CHUNK: usize = 64 * 1024;
/// How many `write` calls may be in flight at once (flow control is the
/// caller's; see `schema/stream.capnp`).
pub const WINDOW: usize = 8;

/// Copies `input` into the remote `stream` until EOF, then ends it.
pub async fn pump_to(
    mut input: impl AsyncRead + Unpin,
    stream: byte_stream::Client,
) -> Result<u64, capnp::Error> {
    use futures::stream::{FuturesUnordered, StreamExt};
    let mut in_flight = FuturesUnordered::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = input
            .read(&mut buf)
            .await
            .map_err(|e| capnp::Error::failed(format!("reading the connection: {e}")))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        let mut req = stream.write_request();
        req.get().set_bytes(&buf[..n]);
        in_flight.push(req.send().promise);
        while in_flight.len() >= WINDOW {
            in_flight.next().await.expect("non-empty")?;
        }
    }
    while let Some(done) = in_flight.next().await {
        done?;
    }
    stream.end_request().send().promise.await?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_descriptor_and_its_token_cross_a_unix_socket() {
        let (host, grain) = UnixStream::pair().unwrap();
        let (mut client, server_end) = UnixStream::pair().unwrap();
        send_fd(&host, 42, server_end.as_raw_fd()).unwrap();
        drop(server_end);
        let (token, fd) = recv_fd(&grain).unwrap();
        assert_eq!(token, 42);
        let mut handed = UnixStream::from(fd);
        client.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        handed.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
    }

    #[test]
    fn a_message_without_a_descriptor_is_an_error() {
        let (mut host, grain) = UnixStream::pair().unwrap();
        host.write_all(&7u64.to_le_bytes()).unwrap();
        let err = recv_fd(&grain).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
