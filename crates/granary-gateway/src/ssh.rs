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

use russh::keys::PrivateKey;
use russh::server::{Auth, Msg, Server as _, Session};
use russh::{Channel, ChannelId, MethodKind, MethodSet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::Instrument;

use granary_grains::{GrainId, Identity, Peer};
use granary_wire::ssh::git_command;

use crate::{Credential, Shared};

/// The SSH host key could not be read or made.
#[derive(Debug, thiserror::Error)]
#[error("the SSH host key {path}: {detail}")]
pub struct HostKeyError {
    pub path: std::path::PathBuf,
    pub detail: String,
}

/// The host key at `path` (OpenSSH format, 0600), made on first use.
pub fn host_key(path: &Path) -> Result<PrivateKey, HostKeyError> {
    let fail = |detail: String| HostKeyError {
        path: path.to_path_buf(),
        detail,
    };
    if let Ok(text) = std::fs::read_to_string(path) {
        return PrivateKey::from_openssh(text).map_err(|e| fail(e.to_string()));
    }
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|_| fail("no randomness".to_owned()))?;
    let key = PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(
        &seed,
    ));
    let text = key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| fail(e.to_string()))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    }
    granary_files::write_atomic(path, text.as_bytes(), 0o600).map_err(|e| fail(e.to_string()))?;
    Ok(key)
}

/// The server config: the host key, public keys only, bounded attempts.
fn config(host_key: PrivateKey, idle: std::time::Duration) -> Arc<russh::server::Config> {
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
    shared: Arc<Shared>,
}

impl russh::server::Server for Listener {
    type Handler = Connection;
    fn new_client(&mut self, peer: Option<std::net::SocketAddr>) -> Connection {
        self.shared.stats.connection("ssh");
        let peer_text = peer.map(|p| p.to_string()).unwrap_or_default();
        Connection {
            shared: self.shared.clone(),
            span: tracing::info_span!("ssh", peer = %peer_text, user = tracing::field::Empty),
            peer,
            login: None,
            key_refused: false,
            channels: HashMap::new(),
            protocol: HashMap::new(),
        }
    }
}

/// Serves SSH on `listener` until `shutdown` completes; open sessions are
/// then told the server is stopping and closed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let config = config(shared.ssh_host_key.clone(), shared.settings.ssh_idle);
    let mut server = Listener { shared };
    tokio::pin!(shutdown);
    loop {
        let running = server.run_on_socket(config.clone(), &listener);
        let handle = running.handle();
        tokio::pin!(running);
        tokio::select! {
            result = &mut running => {
                // russh stops at the first failed accept (out of fds, say):
                // start it again after a moment; sessions go on meanwhile.
                if let Err(e) = result {
                    tracing::warn!(error = %e, "SSH accept failed; listening again");
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            () = &mut shutdown => {
                handle.shutdown("granary is stopping".to_owned());
                let _ = running.await;
                return;
            }
        }
    }
}

struct Connection {
    shared: Arc<Shared>,
    span: tracing::Span,
    peer: Option<std::net::SocketAddr>,
    /// The user and which of their keys logged in.
    login: Option<(String, Credential)>,
    /// A key was refused on this connection (counted once).
    key_refused: bool,
    channels: HashMap<ChannelId, Channel<Msg>>,
    protocol: HashMap<ChannelId, String>,
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        // Normalised the one way keys are registered; a key registered
        // before that rule (say a short RSA key) still matches by its
        // `type base64`.
        let line = key.public_key.to_openssh().unwrap_or_default();
        let normal = granary_wire::ssh::public_key(&line)
            .map(|k| k.normal)
            .unwrap_or_else(|_| {
                line.split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            });
        // A registered key always gets in: it cannot be guessed (russh has
        // checked the client's signature), so no failure from its address
        // (a stale password on a phone behind the same NAT) refuses it.
        if granary_wire::http::valid_user(user)
            && let Some(credential) = self.shared.directory.check_ssh_key(user, &normal).await
        {
            self.span.record("user", user);
            self.login = Some((user.to_owned(), credential));
            return Ok(Auth::Accept);
        }
        tracing::info!(parent: &self.span, user, "SSH key refused");
        // Once per connection: an agent offers every key it holds.
        if !self.key_refused {
            self.key_refused = true;
            let peer = self
                .peer
                .map(|p| p.ip())
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
            self.shared.login_failed_as(peer, user).await;
        }
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
        let Some((user, credential)) = self.login.clone() else {
            return Err(russh::Error::NotAuthenticated);
        };
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
        let Some(command) = git_command(data) else {
            return refuse(
                session,
                "only git-upload-pack and git-receive-pack run here",
            );
        };
        // A connection kept open (ControlMaster) outlives a disable.
        if self.shared.directory.disabled(&user).await {
            return refuse(session, "this account is disabled");
        }
        let (owner, repo) = (command.owner.clone(), command.repo.clone());
        let allowed = owner == user
            || (!command.writes() && self.shared.directory.is_public(&owner, "git", &repo).await);
        if !allowed {
            // The same answer whether or not the repository exists.
            return refuse(session, "you cannot access this repository");
        }
        let Some(ch) = self.channels.remove(&channel) else {
            return refuse(session, "no such channel");
        };
        let Ok(grain) = GrainId::for_user(&owner, "git") else {
            return refuse(session, "you cannot access this repository");
        };
        let peer = Peer::new(self.peer.map(|p| p.to_string()).unwrap_or_default(), "ssh");
        let identity = Identity::new(&user, credential.method, credential.id);
        let upstream = match self
            .shared
            .grains
            .connect(&grain, "git-ssh", identity, peer)
            .await
        {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(parent: &self.span, %grain, error = %e, "cannot reach the git grain");
                return refuse(session, "the git service is not available right now");
            }
        };
        session.channel_success(channel)?;
        let protocol = self
            .protocol
            .remove(&channel)
            .unwrap_or_else(|| "-".to_owned());
        let header = format!("{} {repo} {user} {protocol}\n", command.service);
        tokio::spawn(bridge(ch, upstream, header).instrument(self.span.clone()));
        Ok(())
    }
}

/// Client bytes to the grain, the grain's frames to the client, then its
/// exit status.
async fn bridge(channel: Channel<Msg>, upstream: granary_grains::Connection, header: String) {
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
