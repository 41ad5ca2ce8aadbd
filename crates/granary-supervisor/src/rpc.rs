//! The host's end of a grain's Cap'n Proto channel, with the limits that
//! keep one grain from exhausting the host.

use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{RpcSystem, twoparty};
use futures::AsyncReadExt;
use tokio_util::compat::TokioAsyncReadCompatExt;

/// A two-party RPC system over `stream` whose incoming messages may not
/// exceed `max_message_bytes`: a larger one ends the connection (the
/// reader refuses it from its segment table, before allocating it).
pub(crate) fn system(
    stream: tokio::net::UnixStream,
    side: Side,
    bootstrap: Option<capnp::capability::Client>,
    max_message_bytes: u64,
) -> RpcSystem<Side> {
    let (reader, writer) = stream.compat().split();
    let options = capnp::message::ReaderOptions {
        traversal_limit_in_words: Some((max_message_bytes / 8) as usize),
        nesting_limit: 64,
    };
    let network = twoparty::VatNetwork::new(
        futures::io::BufReader::new(reader),
        futures::io::BufWriter::new(writer),
        side,
        options,
    );
    RpcSystem::new(Box::new(network), bootstrap)
}
