//! Node links: how one node reaches a grain another node runs.
//!
//! TLS 1.3 with raw Ed25519 node keys on both ends
//! ([`granary_backup::pinned`]): the client pins the key the target's
//! member record carries, the server accepts only keys of current members.
//! Over it, one request line of JSON, one answer line, then the
//! connection's bytes both ways:
//!
//! ```text
//! → {"op":"connect","grain":"alice-git","service":"http","identity":{..},"peer":{..}}
//! ← {"ok":true}                     then the grain's stream
//! ← {"ok":false,"problem":{..}}     and the link closes
//! ```
//!
//! The identity is the one the first node's gateway authenticated: nodes
//! trust each other's gateways (they are one cluster, under one admin),
//! and the grain sees the same identity wherever the client came in.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use granary_grains::{Connection, GrainError, Grains, Identity, Peer, Problem};
use granary_model::GrainId;
use granary_package::{PublicKey, SigningKey};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

/// The longest request or answer line.
const MAX_LINE: usize = 64 << 10;
/// How long a handshake and its request may take.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// How long the owner may take to answer a request: it may have to start
/// the grain first.
const ANSWER: Duration = Duration::from_secs(60);
/// Handshakes in progress at once; more wait in the listen backlog.
const HANDSHAKES: usize = 64;
/// The ALPN both ends speak, so a link never talks to a backup receiver
/// (same keys, same TLS) by mistake.
const ALPN: &[u8] = b"granary-link/1";

/// A forwarded connection whose far end vanished (power cut, partition)
/// must end: TCP keepalive after 30 s idle, every 10 s, 3 probes, and
/// unacknowledged data given up after 60 s.
fn keep_alive(tcp: &tokio::net::TcpStream) {
    let sock = socket2::SockRef::from(tcp);
    let _ = tcp.set_nodelay(true);
    let _ = sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(30))
            .with_interval(Duration::from_secs(10))
            .with_retries(3),
    );
    let _ = sock.set_tcp_user_timeout(Some(Duration::from_secs(60)));
}

/// The node keys (hex) and names the link server accepts: members that
/// hold a live lease, refreshed from etcd by the daemon.
#[derive(Clone, Default)]
pub struct Members(Arc<RwLock<HashMap<String, String>>>);

impl Members {
    pub fn set(&self, keys: impl IntoIterator<Item = (String, String)>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = keys.into_iter().collect();
    }

    fn name_of(&self, key: &PublicKey) -> Option<String> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key.hex())
            .cloned()
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
enum Request {
    Connect {
        grain: String,
        service: String,
        identity: Identity,
        peer: Peer,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    problem: Option<Problem>,
}

/// One line, newline included, at most [`MAX_LINE`] bytes; whatever
/// follows it stays in the reader's buffer for the stream.
async fn read_line<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the link closed before a whole line",
            ));
        }
        let (take, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if line.len() > MAX_LINE {
            return Err(std::io::Error::other("no complete line within 64 KiB"));
        }
        if done {
            return Ok(line);
        }
    }
}

/// Serves node links on `listener` until it fails: each connection asks
/// `grains` (this node's own) for one grain connection and carries it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    key: &SigningKey,
    members: Members,
    grains: Arc<dyn Grains>,
) -> std::io::Result<()> {
    let accepting = members.clone();
    let mut config =
        granary_backup::pinned::server_config(key, move |k| accepting.name_of(k).is_some())
            .map_err(|e| std::io::Error::other(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES));
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of descriptors, a connection reset before accept: the
            // listener itself is fine.
            Err(e) => {
                tracing::warn!(error = %e, "node link accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = handshakes.clone().acquire_owned().await else {
            return Ok(());
        };
        keep_alive(&tcp);
        let (acceptor, members, grains) = (acceptor.clone(), members.clone(), grains.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await;
            drop(permit);
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%from, error = %e, "node link refused at the handshake");
                    return;
                }
                Err(_) => return,
            };
            let node =
                granary_backup::pinned::peer_key(tls.get_ref().1).and_then(|k| members.name_of(&k));
            let Some(node) = node else {
                tracing::warn!(%from, "node link from a key that is no longer a live member; closed");
                return;
            };
            if tls.get_ref().1.alpn_protocol() != Some(ALPN) {
                tracing::warn!(%from, node, "node link without the link protocol (ALPN); closed");
                return;
            }
            if let Err(e) = carry(tls, &node, &*grains).await {
                tracing::debug!(%from, node, error = %e, "node link ended");
            }
        });
    }
}

async fn carry<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    node: &str,
    grains: &dyn Grains,
) -> std::io::Result<()> {
    let mut stream = BufReader::new(stream);
    let line = tokio::time::timeout(HANDSHAKE, read_line(&mut stream))
        .await
        .map_err(|_| std::io::Error::other("no request in time"))??;
    let Request::Connect {
        grain,
        service,
        identity,
        peer,
    } = serde_json::from_slice(&line).map_err(std::io::Error::other)?;
    let answer = |problem: Option<Problem>| {
        let mut line = serde_json::to_vec(&Answer {
            ok: problem.is_none(),
            problem,
        })
        .expect("answers serialize");
        line.push(b'\n');
        line
    };
    let id = match GrainId::parse(&grain) {
        Ok(id) => id,
        Err(_) => {
            stream
                .write_all(&answer(Some(Problem::NoSuchGrain)))
                .await?;
            return Ok(());
        }
    };
    tracing::debug!(grain, service, node, user = %identity.user, "connection forwarded from another node");
    match grains.connect(&id, &service, identity, peer).await {
        Ok(conn) => {
            stream.write_all(&answer(None)).await?;
            stream.flush().await?;
            conn.stream.set_nonblocking(true)?;
            let mut local = tokio::net::UnixStream::from_std(conn.stream)?;
            let _keep = conn.keep;
            tokio::io::copy_bidirectional(&mut stream, &mut local).await?;
            Ok(())
        }
        Err(e) => {
            stream.write_all(&answer(Some(e.problem))).await?;
            stream.flush().await
        }
    }
}

/// Opens a connection to `service` of `grain` on the node at `address`
/// with node key `node_key` (hex), as this node (`key`), for `identity`.
/// The answer is a local stream: bytes written to it reach the grain.
pub async fn connect(
    address: &str,
    node_key: &str,
    key: &SigningKey,
    grain: &GrainId,
    service: &str,
    identity: Identity,
    peer: Peer,
) -> Result<Connection, GrainError> {
    let host = |what: String| GrainError::new(grain, Problem::Host(what));
    let server_key = granary_backup::catalogue::parse_key(node_key)
        .map_err(|e| host(format!("the owner node's key: {e}")))?;
    let mut config =
        granary_backup::pinned::client_config(key, server_key).map_err(|e| host(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    let tcp = tokio::time::timeout(HANDSHAKE, tokio::net::TcpStream::connect(address))
        .await
        .map_err(|_| host(format!("node link to {address}: timed out")))?
        .map_err(|e| host(format!("node link to {address}: {e}")))?;
    keep_alive(&tcp);
    let tls = tokio::time::timeout(
        HANDSHAKE,
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(granary_backup::pinned::server_name(), tcp),
    )
    .await
    .map_err(|_| host(format!("node link to {address}: TLS timed out")))?
    .map_err(|e| {
        host(format!(
            "node link to {address}: TLS: {e} (does its node key match?)"
        ))
    })?;
    let mut stream = BufReader::new(tls);
    let mut request = serde_json::to_vec(&Request::Connect {
        grain: grain.to_string(),
        service: service.to_owned(),
        identity,
        peer,
    })
    .expect("requests serialize");
    request.push(b'\n');
    let io = |e: std::io::Error| host(format!("node link to {address}: {e}"));
    stream.write_all(&request).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    // The far node may start the grain first.
    let line = tokio::time::timeout(ANSWER, read_line(&mut stream))
        .await
        .map_err(|_| {
            GrainError::new(
                grain,
                Problem::Busy(format!(
                    "node link to {address}: no answer within {ANSWER:?}"
                )),
            )
        })?
        .map_err(io)?;
    let answer: Answer = serde_json::from_slice(&line)
        .map_err(|e| host(format!("node link to {address}: a bad answer: {e}")))?;
    if !answer.ok {
        let problem = answer
            .problem
            .unwrap_or_else(|| Problem::Host("the owner node refused without a reason".into()));
        return Err(GrainError::new(grain, problem));
    }
    // The caller wants a Unix stream, as a local grain gives: one end of a
    // socket pair, the other carried to the link by a task of its own.
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(io)?;
    theirs.set_nonblocking(true).map_err(io)?;
    let mut theirs = tokio::net::UnixStream::from_std(theirs).map_err(io)?;
    tokio::spawn(async move {
        let _ = tokio::io::copy_bidirectional(&mut stream, &mut theirs).await;
    });
    Ok(Connection {
        stream: ours,
        keep: Box::new(()),
    })
}
