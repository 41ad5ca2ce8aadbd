//! Connecting to the admin socket, after checking that it is the daemon's:
//! a socket planted by another user could otherwise collect the passwords we
//! send.

use std::future::Future;
use std::os::unix::fs::FileTypeExt;

use anyhow::{Context, anyhow};
use capnp_rpc::rpc_twoparty_capnp;
use granary_config::Config;
use granary_schema::admin_capnp::admin;

/// The daemon is not running: no socket, or nobody listening on it.
#[derive(Debug, thiserror::Error)]
#[error(
    "not running: no granary daemon serves data dir {data_dir} (no socket at {socket}); start one with `granary serve`"
)]
pub(crate) struct NotRunning {
    pub(crate) data_dir: String,
    pub(crate) socket: String,
}

/// Checks the socket and its directory belong to us (or root) and are not
/// open to others.
fn check_socket(config: &Config, me: u32) -> anyhow::Result<()> {
    let socket = config.admin_socket();
    let not_running = || NotRunning {
        data_dir: config.data_dir.display().to_string(),
        socket: socket.display().to_string(),
    };
    let run_dir = config.run_dir();
    let dir_meta = match std::fs::metadata(&run_dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_running().into()),
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", run_dir.display())),
    };
    granary_files::check_private(&run_dir, &dir_meta, me)
        .context("refusing to use the admin socket")?;
    let meta = match std::fs::symlink_metadata(&socket) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_running().into()),
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", socket.display())),
    };
    if !meta.file_type().is_socket() {
        return Err(anyhow!(
            "{} is not a socket; refusing to use it",
            socket.display()
        ));
    }
    granary_files::check_private(&socket, &meta, me).context("refusing to use the admin socket")?;
    Ok(())
}

/// Runs `call` with a connected admin client on a single-threaded runtime
/// (Cap'n Proto RPC is `!Send`).
pub(crate) fn with_admin<T, F, Fut>(config: &Config, call: F) -> anyhow::Result<T>
where
    F: FnOnce(admin::Client) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let me = nix::unistd::geteuid().as_raw();
    check_socket(config, me)?;
    let socket = config.admin_socket();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let stream = match tokio::net::UnixStream::connect(&socket).await {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) =>
            {
                return Err(NotRunning {
                    data_dir: config.data_dir.display().to_string(),
                    socket: socket.display().to_string(),
                }
                .into());
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot connect to {}", socket.display()));
            }
        };
        let mut rpc = super::rpc_over_unix(stream, rpc_twoparty_capnp::Side::Client, None);
        let client: admin::Client = rpc.bootstrap(rpc_twoparty_capnp::Side::Server);
        let disconnector = rpc.get_disconnector();
        tokio::task::spawn_local(rpc);
        let result = call(client).await;
        let _ = disconnector.await;
        result
    })
}

/// What the admin should read from a failed call: the daemon's own message.
pub(crate) fn remote(e: capnp::Error) -> anyhow::Error {
    // The RPC layer prefixes messages that crossed the wire.
    let message = e
        .extra
        .strip_prefix("remote exception: ")
        .unwrap_or(&e.extra);
    if e.kind == capnp::ErrorKind::Failed && !message.is_empty() {
        anyhow!("{message}")
    } else if e.kind == capnp::ErrorKind::Disconnected {
        anyhow!("the daemon closed the admin connection: {}", e.extra)
    } else {
        anyhow!("admin call failed: {e}")
    }
}

pub(crate) fn text(r: capnp::Result<capnp::text::Reader<'_>>) -> anyhow::Result<String> {
    Ok(r.map_err(remote)?
        .to_str()
        .context("daemon sent invalid UTF-8")?
        .to_owned())
}

/// A list of texts from a reply.
pub(crate) fn texts(l: capnp::Result<capnp::text_list::Reader<'_>>) -> anyhow::Result<Vec<String>> {
    let l = l.map_err(remote)?;
    l.iter().map(text).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_run_dir_means_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let env = granary_config::Environment {
            cwd: dir.path().to_path_buf(),
            data_dir: Some(dir.path().join("data")),
            log_level: None,
        };
        let config = Config::load(None, &env).unwrap();
        let err = check_socket(&config, 0).unwrap_err();
        assert!(err.downcast_ref::<NotRunning>().is_some(), "{err}");
    }
}
