//! The CLI side of the admin interface: connect to the running daemon's
//! socket, make one call, print the answer as a table or JSON.

pub(crate) mod apps;
pub(crate) mod backup;
pub(crate) mod certificates;
pub(crate) mod client;
pub(crate) mod cluster;
mod connection;
pub(crate) mod doctor;
pub(crate) mod git;
pub(crate) mod grains;
pub(crate) mod grants;
pub(crate) mod invites;
pub(crate) mod mail;
mod mail_dns;
pub(crate) mod snapshots;
pub(crate) mod table;
pub(crate) mod tasks;
pub(crate) mod xmpp;

use granary_schema::admin_capnp::{self, admin};

/// Grain ids are `<user>-<kind>`; show them as `user/kind`.
pub(crate) fn shown(id: &str) -> String {
    granary_model::GrainId::parse(id).map_or_else(|_| id.to_owned(), |g| g.shown())
}

/// The admin root's capability for one concern; calls on it are pipelined
/// (one round trip for `users(&admin).add_request()...`).
macro_rules! concern {
    ($name:ident, $method:ident, $get:ident) => {
        pub(crate) fn $name(admin: &admin::Client) -> admin_capnp::$name::Client {
            admin.$method().send().pipeline.$get()
        }
    };
}

concern!(users, users_request, get_users);
concern!(apps, apps_request, get_apps);
concern!(grains, grains_request, get_grains);
concern!(grants, grants_request, get_grants);
concern!(snapshots, snapshots_request, get_snapshots);
concern!(backups, backups_request, get_backups);
concern!(git, git_request, get_git);
concern!(blog, blog_request, get_blog);
concern!(mail, mail_request, get_mail);
concern!(xmpp, xmpp_request, get_xmpp);
concern!(tasks, tasks_request, get_tasks);
concern!(invites, invites_request, get_invites);
concern!(certificates, certificates_request, get_certificates);

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
