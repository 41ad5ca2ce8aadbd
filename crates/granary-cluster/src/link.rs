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
//!
//! A node also fetches an app's package from a peer by its content
//! address, to run a grain of an app installed on another node:
//!
//! ```text
//! → {"op":"package","kind":"blog","sha256":"<64 hex>"}
//! ← {"ok":true,"size":N}            then N bytes: the signed package file
//! ```
//!
//! The fetching node checks the signature and that the package's SHA-256
//! is the one the shared app record names before it unpacks anything.
//!
//! And a node moving a grain here sends it step by step, its data in
//! frames ([`crate::moves`]).
//!
//! Mail from the spool of the node that took it, and chat stanzas from
//! another server, are handed to the node that runs the grain:
//!
//! ```text
//! → {"op":"deliver","grain":"alice-mail","what":{"kind":"mail",..},"size":N}  then N bytes
//! ← {"ok":true}                     once the grain has stored it
//! ← {"ok":false,"problem":{..}}     the grain's or the node's refusal, as a local one
//! ```

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use granary_grains::{Connection, GrainError, Grains, Identity, Peer, Problem};
use granary_model::GrainId;
use granary_package::{PublicKey, SigningKey};
use serde::{Deserialize, Serialize};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt, BufReader,
};

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
pub(crate) enum Request {
    Connect {
        grain: String,
        service: String,
        identity: Identity,
        peer: Peer,
        /// How far the asking node has applied the shared records' log:
        /// the owner catches up that far before it looks the grain up.
        #[serde(default)]
        seen: u64,
    },
    Package {
        kind: String,
        sha256: String,
    },
    /// Something for a grain this node runs, followed by `size` bytes.
    Deliver {
        grain: String,
        what: Delivery,
        size: u64,
        #[serde(default)]
        seen: u64,
    },
    /// A capability of a grain this node runs, for a grain on the asking
    /// node that holds grant `grant` ([`Grains::serve_grant`]).
    Grant {
        grant: i64,
        holder: String,
        #[serde(default)]
        seen: u64,
    },
    /// One step of moving a grain here ([`crate::moves`]).
    Move {
        grain: String,
        id: String,
        step: crate::moves::Step,
    },
    /// A move or drain this node drives ([`crate::moves::run`]).
    Run {
        job: crate::moves::Job,
    },
    /// A copy of the asking node's spool entry, or its release
    /// ([`crate::spools`]).
    Spool {
        #[serde(flatten)]
        request: crate::spools::SpoolRequest,
    },
    /// This node's wall clock ([`clock_offset`]).
    Clock {},
}

/// The answer to [`Request::Clock`]: milliseconds since the Unix epoch.
#[derive(Debug, Serialize, Deserialize)]
struct ClockAnswer {
    clock_ms: i64,
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What a [`Request::Deliver`] carries; its bytes follow the request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub(crate) enum Delivery {
    /// A message from the asking node's spool (its bytes):
    /// [`Grains::deliver_mail`].
    Mail {
        id: String,
        from: String,
        to: Vec<String>,
    },
    /// A stanza from another server (its XML): [`Grains::deliver_xmpp`].
    Xmpp { from: String, to: String },
}

impl Delivery {
    /// The largest one a node takes for one of its grains (far above what
    /// the MX and the chat listeners accept).
    fn limit(&self) -> u64 {
        match self {
            Delivery::Mail { .. } => 256 << 20,
            Delivery::Xmpp { .. } => 16 << 20,
        }
    }
}

/// Deliveries a node takes from other nodes at once; more wait.
static DELIVERIES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(16);
/// How long a delivery's body may stall before the link is dropped.
const BODY_IDLE: Duration = Duration::from_secs(30);

/// Copies `size` bytes from `r` to `w`, failing if `r` sends nothing for
/// [`BODY_IDLE`]; the bytes copied (fewer when `r` ended early).
pub(crate) async fn copy_body<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
    size: u64,
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 << 10];
    let mut left = size;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let got = tokio::time::timeout(BODY_IDLE, r.read(&mut buf[..want]))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("nothing came for {BODY_IDLE:?}"),
                )
            })??;
        if got == 0 {
            break;
        }
        w.write_all(&buf[..got]).await?;
        left -= got as u64;
    }
    w.flush().await?;
    Ok(size - left)
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Answer {
    pub(crate) ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) problem: Option<Problem>,
    /// The bytes that follow a package answer; the bytes a move's stream
    /// carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) size: Option<u64>,
    /// A running job's progress report (JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) progress: Option<String>,
    /// A finished job's report (JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) report: Option<String>,
}

impl Answer {
    pub(crate) fn refused(why: String) -> Answer {
        Answer {
            ok: false,
            problem: Some(Problem::Host(why)),
            size: None,
            progress: None,
            report: None,
        }
    }
}

pub(crate) fn answer_line(problem: Option<Problem>, size: Option<u64>) -> Vec<u8> {
    let mut line = serde_json::to_vec(&Answer {
        ok: problem.is_none(),
        problem,
        size,
        progress: None,
        report: None,
    })
    .expect("answers serialize");
    line.push(b'\n');
    line
}

/// Where a node keeps the package file of an installed app, under its
/// apps directory: `<kind>/<sha256>.gpkg`, beside the unpacked image.
/// `None` for a kind or hash that could not be one.
pub fn package_path(
    apps_dir: &std::path::Path,
    kind: &str,
    sha256: &str,
) -> Option<std::path::PathBuf> {
    let hex = sha256.len() == 64
        && sha256
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    (hex && granary_model::GrainKind::new(kind).is_ok())
        .then(|| apps_dir.join(kind).join(format!("{sha256}.gpkg")))
}

/// One line, newline included, at most [`MAX_LINE`] bytes; whatever
/// follows it stays in the reader's buffer for the stream.
pub(crate) async fn read_line<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
) -> std::io::Result<Vec<u8>> {
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

/// What a node link serves: this node's own grains, the package files
/// kept under its apps dir, its shared records' position, and grains
/// moved here.
pub struct Served {
    pub grains: Arc<dyn Grains>,
    pub apps_dir: std::path::PathBuf,
    /// Where a delivery's bytes wait (unlinked files) until its grain has
    /// them: on the data dir's disk, not in a tmpfs.
    pub scratch: std::path::PathBuf,
    pub records: Arc<dyn crate::Records>,
    pub moves: Arc<dyn crate::Moves>,
    /// Other nodes' spool copies kept here.
    pub spools: Arc<dyn crate::SpoolCopies>,
}

/// Serves node links on `listener` until it fails: each connection asks
/// for one grain connection and carries it, asks for a package file, or
/// takes one step of a move.
pub async fn serve(
    listener: tokio::net::TcpListener,
    key: &SigningKey,
    members: Members,
    served: Served,
) -> std::io::Result<()> {
    let served = Arc::new(served);
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
        let (acceptor, members, served) = (acceptor.clone(), members.clone(), served.clone());
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
            if let Err(e) = carry(tls, &node, &served).await {
                tracing::debug!(%from, node, error = %e, "node link ended");
            }
        });
    }
}

async fn carry<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    node: &str,
    served: &Served,
) -> std::io::Result<()> {
    let (grains, records) = (&*served.grains, &*served.records);
    let mut stream = BufReader::new(stream);
    let line = tokio::time::timeout(HANDSHAKE, read_line(&mut stream))
        .await
        .map_err(|_| std::io::Error::other("no request in time"))??;
    let (grain, service, identity, peer, seen) = match serde_json::from_slice(&line)
        .map_err(std::io::Error::other)?
    {
        Request::Connect {
            grain,
            service,
            identity,
            peer,
            seen,
        } => (grain, service, identity, peer, seen),
        Request::Package { kind, sha256 } => {
            return send_package(stream, node, &served.apps_dir, &kind, &sha256).await;
        }
        Request::Deliver {
            grain,
            what,
            size,
            seen,
        } => {
            return deliver_here(stream, node, served, &grain, what, size, seen).await;
        }
        Request::Grant {
            grant,
            holder,
            seen,
        } => {
            return serve_grant(stream, node, served, grant, &holder, seen).await;
        }
        Request::Move { grain, id, step } => {
            return crate::moves::serve_step(stream, node, &*served.moves, &grain, &id, step).await;
        }
        Request::Run { job } => {
            return crate::moves::serve_run(stream, node, &*served.moves, job).await;
        }
        Request::Spool { request } => {
            return crate::spools::serve(stream, node, &served.spools, request).await;
        }
        Request::Clock {} => {
            let mut line = serde_json::to_vec(&ClockAnswer {
                clock_ms: unix_ms(),
            })
            .expect("answers serialize");
            line.push(b'\n');
            stream.write_all(&line).await?;
            return stream.flush().await;
        }
    };
    let answer = |problem: Option<Problem>| answer_line(problem, None);
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
    if !caught_up(&mut stream, records, seen).await? {
        return Ok(());
    }
    let connected = grains.connect(&id, &service, identity, peer).await;
    carry_stream(stream, connected).await
}

/// The asking node has seen records this one has not read yet (a user
/// or grant made a moment ago): reads them first, or says why not (and
/// answers `false`) rather than "no such grain".
async fn caught_up<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut BufReader<S>,
    records: &dyn crate::Records,
    seen: u64,
) -> std::io::Result<bool> {
    if records.position() >= seen {
        return Ok(true);
    }
    let Err(e) = records.reach(seen).await else {
        return Ok(true);
    };
    tracing::warn!(error = %e, "cannot catch up with the asking node's records");
    let why = format!("node behind the cluster's records: {e}");
    stream
        .write_all(&answer_line(Some(Problem::Busy(why)), None))
        .await?;
    stream.flush().await?;
    Ok(false)
}

/// Answers a request for a stream, and carries it both ways until either
/// end closes.
async fn carry_stream<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: BufReader<S>,
    local: Result<Connection, GrainError>,
) -> std::io::Result<()> {
    match local {
        Ok(conn) => {
            stream.write_all(&answer_line(None, None)).await?;
            stream.flush().await?;
            conn.stream.set_nonblocking(true)?;
            let mut local = tokio::net::UnixStream::from_std(conn.stream)?;
            let _keep = conn.keep;
            tokio::io::copy_bidirectional(&mut stream, &mut local).await?;
            Ok(())
        }
        Err(e) => {
            stream
                .write_all(&answer_line(Some(e.problem), None))
                .await?;
            stream.flush().await
        }
    }
}

/// Takes a delivery's bytes, hands them to the grain, and answers with
/// the grain's answer. Bytes cut short are never delivered.
async fn deliver_here<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: BufReader<S>,
    node: &str,
    served: &Served,
    grain: &str,
    what: Delivery,
    size: u64,
    seen: u64,
) -> std::io::Result<()> {
    let refuse = async |stream: &mut BufReader<S>, problem: Problem| {
        stream.write_all(&answer_line(Some(problem), None)).await?;
        stream.flush().await
    };
    if size > what.limit() {
        // The sender checks this first; one that did not is cut off.
        let why = format!("{size} bytes is more than a node takes for a grain at once");
        return refuse(&mut stream, Problem::Grain(why)).await;
    }
    let Ok(_slot) = DELIVERIES.acquire().await else {
        return Ok(());
    };
    let Ok(id) = GrainId::parse(grain) else {
        // Read to its end, so the sender hears this rather than a reset.
        copy_body(&mut stream, &mut tokio::io::sink(), size).await?;
        return refuse(&mut stream, Problem::NoSuchGrain).await;
    };
    tracing::debug!(grain, node, size, "a delivery forwarded from another node");
    let file = tempfile::tempfile_in(&served.scratch)?;
    let mut file = tokio::fs::File::from_std(file);
    let got = copy_body(&mut stream, &mut file, size).await?;
    if got != size {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the delivery ended after {got} of {size} bytes"),
        ));
    }
    if !caught_up(&mut stream, &*served.records, seen).await? {
        return Ok(());
    }
    let grains = &served.grains;
    let delivered = match what {
        Delivery::Mail {
            id: spool,
            from,
            to,
        } => {
            file.rewind().await?;
            let message = file.into_std().await;
            let mail = granary_grains::mail::MailDelivery {
                id: spool,
                from,
                to,
                message,
                size,
            };
            grains.deliver_mail(&id, mail).await
        }
        Delivery::Xmpp { from, to } => {
            file.rewind().await?;
            let mut stanza = String::new();
            file.read_to_string(&mut stanza).await?;
            let stanza = granary_grains::mail::XmppStanza { from, to, stanza };
            grains.deliver_xmpp(&id, stanza).await
        }
    };
    stream
        .write_all(&answer_line(delivered.err().map(|e| e.problem), None))
        .await?;
    stream.flush().await
}

/// Serves a grant's object to its holder on the asking node.
async fn serve_grant<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: BufReader<S>,
    node: &str,
    served: &Served,
    grant: i64,
    holder: &str,
    seen: u64,
) -> std::io::Result<()> {
    let Ok(holder) = GrainId::parse(holder) else {
        stream
            .write_all(&answer_line(Some(Problem::NoSuchGrain), None))
            .await?;
        return stream.flush().await;
    };
    tracing::debug!(grant, %holder, node, "a capability asked for by another node");
    if !caught_up(&mut stream, &*served.records, seen).await? {
        return Ok(());
    }
    let served = served.grains.serve_grant(grant, &holder).await;
    carry_stream(stream, served).await
}

/// Answers a package request with the file, if this node keeps it.
async fn send_package<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: BufReader<S>,
    node: &str,
    apps_dir: &std::path::Path,
    kind: &str,
    sha256: &str,
) -> std::io::Result<()> {
    let file = match package_path(apps_dir, kind, sha256) {
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                // Never a symlink swapped in for the package.
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .ok()
                .filter(|f| f.metadata().is_ok_and(|m| m.is_file()))
        }
        None => None,
    };
    let Some(file) = file else {
        let problem = Problem::Host(format!("no package {kind} {sha256} on this node"));
        stream.write_all(&answer_line(Some(problem), None)).await?;
        return stream.flush().await;
    };
    let size = file.metadata()?.len();
    tracing::debug!(
        node,
        kind,
        sha256,
        size,
        "sending a package to another node"
    );
    stream.write_all(&answer_line(None, Some(size))).await?;
    let mut file = tokio::fs::File::from_std(file);
    let send = async {
        tokio::io::copy(&mut file, &mut stream).await?;
        stream.flush().await?;
        stream.shutdown().await
    };
    tokio::time::timeout(PACKAGE, send)
        .await
        .map_err(|_| std::io::Error::other("the package was not taken in time"))?
}

/// Fetches the package of app `kind` with content address `sha256` from
/// the node at `address` (node key `node_key`, hex), at most `max_bytes`.
/// The caller verifies what it gets.
pub async fn fetch_package(
    address: &str,
    node_key: &str,
    key: &SigningKey,
    kind: &str,
    sha256: &str,
    max_bytes: u64,
) -> Result<Vec<u8>, String> {
    use tokio::io::AsyncReadExt;
    let mut stream = open(address, node_key, key).await?;
    let mut request = serde_json::to_vec(&Request::Package {
        kind: kind.to_owned(),
        sha256: sha256.to_owned(),
    })
    .expect("requests serialize");
    request.push(b'\n');
    let io = |e: std::io::Error| format!("node link to {address}: {e}");
    stream.write_all(&request).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let transfer = async {
        let line = read_line(&mut stream).await.map_err(io)?;
        let answer: Answer = serde_json::from_slice(&line)
            .map_err(|e| format!("node link to {address}: a bad answer: {e}"))?;
        if !answer.ok {
            return Err(match answer.problem {
                Some(Problem::Host(why)) => why,
                other => format!("{other:?}"),
            });
        }
        let size = answer.size.unwrap_or(0);
        if size > max_bytes {
            return Err(format!(
                "the package is {size} bytes, more than packages.max_package_mib allows"
            ));
        }
        let mut bytes = Vec::with_capacity(size as usize);
        (&mut stream)
            .take(size)
            .read_to_end(&mut bytes)
            .await
            .map_err(io)?;
        if bytes.len() as u64 != size {
            return Err(format!(
                "node link to {address}: the package ended after {} of {size} bytes",
                bytes.len()
            ));
        }
        Ok(bytes)
    };
    tokio::time::timeout(PACKAGE, transfer)
        .await
        .map_err(|_| format!("node link to {address}: the package took over {PACKAGE:?}"))?
}

/// How far the clock of the node at `address` (node key `node_key`, hex)
/// is ahead of this node's (behind when negative), in milliseconds, and
/// the round trip the answer took, which bounds the error: the answer was
/// read somewhere within it, so the offset is within half of it.
pub async fn clock_offset(
    address: &str,
    node_key: &str,
    key: &SigningKey,
) -> Result<(i64, u64), String> {
    let mut stream = open(address, node_key, key).await?;
    let mut request = serde_json::to_vec(&Request::Clock {}).expect("requests serialize");
    request.push(b'\n');
    let io = |e: std::io::Error| match e.kind() {
        // An older granary closes the link on a request it does not know.
        std::io::ErrorKind::UnexpectedEof => {
            format!("node link to {address}: it did not say its clock (an older granary?)")
        }
        _ => format!("node link to {address}: {e}"),
    };
    let (sent_ms, sent) = (unix_ms(), std::time::Instant::now());
    let asked = async {
        stream.write_all(&request).await.map_err(io)?;
        stream.flush().await.map_err(io)?;
        read_line(&mut stream).await.map_err(io)
    };
    let line = tokio::time::timeout(HANDSHAKE, asked)
        .await
        .map_err(|_| format!("node link to {address}: no answer in {HANDSHAKE:?}"))??;
    let round_trip = sent.elapsed().as_millis() as u64;
    let answer: ClockAnswer = serde_json::from_slice(&line)
        .map_err(|_| format!("node link to {address}: no clock in the answer"))?;
    Ok((offset(sent_ms, round_trip, answer.clock_ms), round_trip))
}

/// The peer's clock `peer_ms`, read halfway through a round trip of
/// `round_trip` ms that began at `sent_ms` here, less ours then.
fn offset(sent_ms: i64, round_trip: u64, peer_ms: i64) -> i64 {
    peer_ms - (sent_ms + (round_trip / 2) as i64)
}

/// How long fetching one package may take.
const PACKAGE: Duration = Duration::from_secs(300);

/// A link to the node at `address` with node key `node_key` (hex), as
/// this node (`key`): TLS done, nothing asked yet.
pub(crate) async fn open(
    address: &str,
    node_key: &str,
    key: &SigningKey,
) -> Result<BufReader<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>, String> {
    let server_key = granary_backup::catalogue::parse_key(node_key)
        .map_err(|e| format!("the node's key: {e}"))?;
    let mut config =
        granary_backup::pinned::client_config(key, server_key).map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    let tcp = tokio::time::timeout(HANDSHAKE, tokio::net::TcpStream::connect(address))
        .await
        .map_err(|_| format!("node link to {address}: timed out"))?
        .map_err(|e| format!("node link to {address}: {e}"))?;
    keep_alive(&tcp);
    let tls = tokio::time::timeout(
        HANDSHAKE,
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(granary_backup::pinned::server_name(), tcp),
    )
    .await
    .map_err(|_| format!("node link to {address}: TLS timed out"))?
    .map_err(|e| format!("node link to {address}: TLS: {e} (does its node key match?)"))?;
    Ok(BufReader::new(tls))
}

/// Opens a connection to `service` of `grain` on the node at `address`
/// with node key `node_key` (hex), as this node (`key`), for `identity`.
/// The answer is a local stream: bytes written to it reach the grain.
/// `seen` is how far this node applied the shared records' log.
#[allow(clippy::too_many_arguments)] // one link request's fields
pub async fn connect(
    address: &str,
    node_key: &str,
    key: &SigningKey,
    grain: &GrainId,
    service: &str,
    identity: Identity,
    peer: Peer,
    seen: u64,
) -> Result<Connection, GrainError> {
    let request = Request::Connect {
        grain: grain.to_string(),
        service: service.to_owned(),
        identity,
        peer,
        seen,
    };
    ask_stream(address, node_key, key, grain, &request).await
}

/// Asks the node at `address` for the object grant `grant` gives
/// `holder`, a grain of this node: a local stream carrying one Cap'n
/// Proto connection, whose bootstrap is that object.
pub async fn open_grant(
    address: &str,
    node_key: &str,
    key: &SigningKey,
    grant: i64,
    holder: &GrainId,
    seen: u64,
) -> Result<Connection, GrainError> {
    let request = Request::Grant {
        grant,
        holder: holder.to_string(),
        seen,
    };
    ask_stream(address, node_key, key, holder, &request).await
}

/// Hands `size` bytes read from `body`, described by `what`, to `grain` on
/// the node at `address`; resolves once that node's grain has them (or
/// with its refusal, as a local grain's would be).
#[allow(clippy::too_many_arguments)] // one link request's fields
pub(crate) async fn deliver(
    address: &str,
    node_key: &str,
    key: &SigningKey,
    grain: &GrainId,
    what: Delivery,
    size: u64,
    mut body: impl AsyncRead + Unpin,
    seen: u64,
) -> Result<(), GrainError> {
    let host = |what: String| GrainError::new(grain, Problem::Host(what));
    if size > what.limit() {
        let why = format!("{size} bytes is more than a node takes for a grain at once");
        return Err(GrainError::new(grain, Problem::Grain(why)));
    }
    // The far node may start the grain, which then stores it durably: a
    // minute, and half a minute more per 8 MiB.
    let answer_within = ANSWER + Duration::from_secs(30 * (size >> 23));
    let mut stream = open(address, node_key, key).await.map_err(host)?;
    let request = Request::Deliver {
        grain: grain.to_string(),
        what,
        size,
        seen,
    };
    let mut line = serde_json::to_vec(&request).expect("requests serialize");
    line.push(b'\n');
    let io = |e: std::io::Error| host(format!("node link to {address}: {e}"));
    stream.write_all(&line).await.map_err(io)?;
    let sent = tokio::io::copy(&mut (&mut body).take(size), &mut stream)
        .await
        .map_err(io)?;
    if sent != size {
        return Err(host(format!(
            "the delivery's body ended after {sent} of {size} bytes"
        )));
    }
    stream.flush().await.map_err(io)?;
    let line = tokio::time::timeout(answer_within, read_line(&mut stream))
        .await
        .map_err(|_| {
            GrainError::new(
                grain,
                Problem::Busy(format!(
                    "node link to {address}: no answer within {answer_within:?}"
                )),
            )
        })?
        .map_err(io)?;
    let answer: Answer = serde_json::from_slice(&line)
        .map_err(|e| host(format!("node link to {address}: a bad answer: {e}")))?;
    match answer.ok {
        true => Ok(()),
        false => Err(GrainError::new(
            grain,
            answer
                .problem
                .unwrap_or_else(|| Problem::Host("the owner node refused without a reason".into())),
        )),
    }
}

/// Sends `request` and, once the far node says yes, carries the link's
/// bytes to a local stream; errors name `grain`.
async fn ask_stream(
    address: &str,
    node_key: &str,
    key: &SigningKey,
    grain: &GrainId,
    request: &Request,
) -> Result<Connection, GrainError> {
    let host = |what: String| GrainError::new(grain, Problem::Host(what));
    let mut stream = open(address, node_key, key).await.map_err(host)?;
    let mut request = serde_json::to_vec(request).expect("requests serialize");
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_offset_is_taken_halfway_through_the_round_trip() {
        // Asked at 1000 ms, answered 40 ms later, the peer said 1020:
        // it read its clock at our 1020, so it is right on time.
        assert_eq!(super::offset(1_000, 40, 1_020), 0);
        assert_eq!(super::offset(1_000, 40, 4_020), 3_000);
        assert_eq!(super::offset(1_000, 0, 500), -500);
    }
}
