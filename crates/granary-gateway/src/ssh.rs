//! The SSH listener, for git: public-key authentication only, and on a
//! session only `git-upload-pack` / `git-receive-pack` for a repository the
//! user may read or write, with `GIT_PROTOCOL` passed on. No shell, no pty,
//! no forwarding, no subsystems. The host key is made once and kept.
//!
//! A command runs in the repository owner's git grain (its `git-ssh`
//! service): the gateway sends one line, `<command> <repo> <user>
//! <git-protocol or ->`, then the client's bytes; the grain answers in
//! frames (`o` stdout, `e` stderr, `x` exit status: a tag byte, a 4-byte
//! big-endian length, the payload), so the client gets the exit status.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use russh::keys::{HashAlg, PrivateKey, PublicKey};
use russh::server::{Auth, Msg, Server as _, Session};
use russh::{Channel, ChannelId, MethodKind, MethodSet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::proxy::{Backend, LoginLimiter};

/// A public key line (`ssh-ed25519 AAAA... comment`) checked and
/// normalised to `type base64`, with its SHA-256 fingerprint.
pub fn parse_public_key(line: &str) -> Result<(String, String), String> {
    let key = PublicKey::from_openssh(line.trim())
        .map_err(|e| format!("not an OpenSSH public key line: {e}"))?;
    let normal = key
        .to_openssh()
        .map_err(|e| e.to_string())?
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    Ok((normal, key.fingerprint(HashAlg::Sha256).to_string()))
}

/// The host key at `path` (OpenSSH format, 0600), made on first use.
pub fn host_key(path: &Path) -> Result<PrivateKey, String> {
    if let Ok(text) = std::fs::read_to_string(path) {
        return PrivateKey::from_openssh(text).map_err(|e| format!("{}: {e}", path.display()));
    }
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|_| "no randomness".to_owned())?;
    let key = PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(
        &seed,
    ));
    let text = key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| e.to_string())?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    granary_files::write_atomic(path, text.as_bytes(), 0o600).map_err(|e| e.to_string())?;
    Ok(key)
}

/// The server config: the host key, public keys only, bounded attempts.
pub fn config(host_key: PrivateKey, idle: std::time::Duration) -> Arc<russh::server::Config> {
    let mut methods = MethodSet::empty();
    methods.push(MethodKind::PublicKey);
    Arc::new(russh::server::Config {
        methods,
        keys: vec![host_key],
        auth_rejection_time: std::time::Duration::from_millis(300),
        auth_rejection_time_initial: Some(std::time::Duration::ZERO),
        max_auth_attempts: 6,
        inactivity_timeout: Some(idle),
        ..Default::default()
    })
}

struct Listener {
    backend: Arc<dyn Backend>,
    limiter: Arc<LoginLimiter>,
}

impl russh::server::Server for Listener {
    type Handler = Connection;
    fn new_client(&mut self, peer: Option<std::net::SocketAddr>) -> Connection {
        Connection {
            backend: self.backend.clone(),
            limiter: self.limiter.clone(),
            peer,
            user: None,
            channels: HashMap::new(),
            protocol: HashMap::new(),
        }
    }
}

/// Serves SSH on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Arc<russh::server::Config>,
    backend: Arc<dyn Backend>,
    limiter: Arc<LoginLimiter>,
) {
    let mut server = Listener { backend, limiter };
    if let Err(e) = server.run_on_socket(config, &listener).await {
        tracing::error!(error = %e, "the SSH listener stopped");
    }
}

struct Connection {
    backend: Arc<dyn Backend>,
    limiter: Arc<LoginLimiter>,
    peer: Option<std::net::SocketAddr>,
    user: Option<String>,
    channels: HashMap<ChannelId, Channel<Msg>>,
    protocol: HashMap<ChannelId, String>,
}

/// `git-upload-pack '/alice/site.git'` as (command, owner, repo).
fn parse_command(data: &[u8]) -> Option<(&'static str, String, String)> {
    let text = std::str::from_utf8(data).ok()?;
    let (cmd, arg) = text.trim().split_once(' ')?;
    let cmd = match cmd {
        "git-upload-pack" => "upload-pack",
        "git-receive-pack" => "receive-pack",
        _ => return None,
    };
    let path = arg.trim().trim_matches('\'').trim_start_matches('/');
    let (owner, repo) = path.split_once('/')?;
    let repo = repo.strip_suffix(".git").unwrap_or(repo);
    (granary_wire::http::valid_user(owner) && granary_wire::http::valid_repo(repo))
        .then(|| (cmd, owner.to_owned(), repo.to_owned()))
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let normal = key
            .public_key
            .to_openssh()
            .map(|k| k.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        let by_peer = format!(
            "ip:{}",
            self.peer.map(|p| p.ip().to_string()).unwrap_or_default()
        );
        let by_user = format!("user:{user}");
        // Past the limit nothing is looked up, as for HTTPS.
        if self.limiter.limited(&by_peer) || self.limiter.limited(&by_user) {
            tracing::warn!(peer = ?self.peer, user, "SSH login rate limit hit");
            return Ok(Auth::reject());
        }
        if granary_wire::http::valid_user(user) && self.backend.check_ssh_key(user, &normal).await {
            self.user = Some(user.to_owned());
            return Ok(Auth::Accept);
        }
        tracing::info!(peer = ?self.peer, user, "SSH key refused");
        self.limiter.fail(by_peer);
        self.limiter.fail(by_user);
        Ok(Auth::reject())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "GIT_PROTOCOL"
            && value.len() <= 100
            && value.bytes().all(|b| b.is_ascii_graphic())
        {
            self.protocol.insert(channel, value.to_owned());
        }
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Accepted only to say why there is nothing here.
        session.channel_success(channel)?;
        session.extended_data(
            channel,
            1,
            hyper::body::Bytes::from_static(
                b"granary: git over SSH only (clone, fetch, push); there is no shell\n",
            ),
        )?;
        session.exit_status_request(channel, 1)?;
        session.eof(channel)?;
        session.close(channel)?;
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let user = self.user.clone().unwrap_or_default();
        // Accepted, then answered on stderr with a failing exit status: the
        // client shows the reason (a failed exec shows only "exec request
        // failed").
        let refuse = |session: &mut Session, why: &str| -> Result<(), russh::Error> {
            session.channel_success(channel)?;
            session.extended_data(
                channel,
                1,
                hyper::body::Bytes::from(format!("granary: {why}\n")),
            )?;
            session.exit_status_request(channel, 1)?;
            session.eof(channel)?;
            session.close(channel)
        };
        let Some((command, owner, repo)) = parse_command(data) else {
            return refuse(
                session,
                "only git-upload-pack and git-receive-pack run here",
            );
        };
        let allowed = owner == user
            || (command == "upload-pack" && self.backend.repo_public(&owner, &repo).await);
        if !allowed {
            // The same answer whether or not the repository exists.
            return refuse(session, "you cannot access this repository");
        }
        let Some(ch) = self.channels.remove(&channel) else {
            return refuse(session, "no such channel");
        };
        let upstream = match self.backend.connect(&owner, "git", "git-ssh").await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(owner, error = %e, "cannot reach the git grain");
                return refuse(session, "the git service is not available right now");
            }
        };
        session.channel_success(channel)?;
        let protocol = self
            .protocol
            .remove(&channel)
            .unwrap_or_else(|| "-".to_owned());
        let header = format!("{command} {repo} {user} {protocol}\n");
        tokio::spawn(bridge(ch, upstream, header));
        Ok(())
    }
}

/// Client bytes to the grain, the grain's frames to the client, then its
/// exit status.
async fn bridge(channel: Channel<Msg>, upstream: crate::proxy::Upstream, header: String) {
    let keep = upstream.keep;
    let Ok(()) = upstream.stream.set_nonblocking(true) else {
        return;
    };
    let Ok(stream) = tokio::net::UnixStream::from_std(upstream.stream) else {
        return;
    };
    let (mut up_read, mut up_write) = stream.into_split();
    let (mut read_half, write_half) = channel.split();
    let to_grain = async move {
        if up_write.write_all(header.as_bytes()).await.is_err() {
            return;
        }
        let mut client = read_half.make_reader();
        let copied = tokio::io::copy(&mut client, &mut up_write).await;
        tracing::debug!(?copied, "ssh client input ended");
        let _ = up_write.shutdown().await;
    };
    let from_grain = async {
        let mut stdout = write_half.make_writer();
        let mut stderr = write_half.make_writer_ext(Some(1));
        let mut code = 1u32;
        loop {
            let mut head = [0u8; 5];
            if up_read.read_exact(&mut head).await.is_err() {
                break;
            }
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            if len > 1 << 20 {
                break;
            }
            let mut payload = vec![0u8; len];
            if up_read.read_exact(&mut payload).await.is_err() {
                break;
            }
            tracing::debug!(tag = head[0], len, "ssh frame from the grain");
            match head[0] {
                b'o' => {
                    if stdout.write_all(&payload).await.is_err() {
                        break;
                    }
                }
                b'e' => {
                    let _ = stderr.write_all(&payload).await;
                }
                b'x' if len == 4 => {
                    code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    break;
                }
                _ => break,
            }
        }
        let _ = stdout.flush().await;
        let _ = write_half.exit_status(code).await;
        let _ = write_half.eof().await;
        let _ = write_half.close().await;
    };
    tokio::pin!(to_grain);
    tokio::pin!(from_grain);
    tokio::select! {
        // The command ended: whatever the client still sends is moot.
        () = &mut from_grain => {}
        // The client finished sending; the grain still answers.
        () = &mut to_grain => from_grain.await,
    }
    drop(keep);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_git_commands_for_valid_repositories() {
        assert_eq!(
            parse_command(b"git-upload-pack '/alice/site.git'"),
            Some(("upload-pack", "alice".into(), "site".into()))
        );
        assert_eq!(
            parse_command(b"git-receive-pack 'alice/site'"),
            Some(("receive-pack", "alice".into(), "site".into()))
        );
        for bad in [
            &b"sh -c id"[..],
            b"git-upload-pack '/alice/../etc.git'",
            b"git-upload-archive '/alice/site.git'",
            b"git-upload-pack",
            b"\xff\xfe",
        ] {
            assert_eq!(parse_command(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn public_keys_normalise() {
        let (normal, fp) = parse_public_key(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB6lM2pxOr4VHXAzRZA3XcIfnSa9MJnqXaT8FdbrwUc9 alice@laptop",
        )
        .unwrap();
        assert!(normal.starts_with("ssh-ed25519 AAAA") && !normal.contains("alice"));
        assert!(fp.starts_with("SHA256:"));
        assert!(parse_public_key("not a key").is_err());
    }
}
