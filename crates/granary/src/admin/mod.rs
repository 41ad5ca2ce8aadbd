//! The CLI side of the admin interface: connect to the running daemon's
//! socket, make one call, print the answer as a table or JSON.

pub(crate) mod backup;
pub(crate) mod client;
mod connection;
pub(crate) mod grains;
mod table;

/// A two-party Cap'n Proto RPC system over a unix socket, as both ends of
/// the admin socket use it.
pub(crate) fn rpc_over_unix(
    stream: tokio::net::UnixStream,
    side: capnp_rpc::rpc_twoparty_capnp::Side,
    bootstrap: Option<capnp::capability::Client>,
) -> capnp_rpc::RpcSystem<capnp_rpc::rpc_twoparty_capnp::Side> {
    use futures::AsyncReadExt;
    use tokio_util::compat::TokioAsyncReadCompatExt;
    let (reader, writer) = stream.compat().split();
    let network = capnp_rpc::twoparty::VatNetwork::new(
        futures::io::BufReader::new(reader),
        futures::io::BufWriter::new(writer),
        side,
        Default::default(),
    );
    capnp_rpc::RpcSystem::new(Box::new(network), bootstrap)
}
