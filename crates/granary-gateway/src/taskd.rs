//! The `taskd` listener: Taskwarrior 2.6's sync (like port 53589).
//!
//! TLS with a client certificate the local CA issued (`granary tasks
//! cert`); a certificate from any other CA fails the handshake. The
//! certificate is known by the SHA-256 of its DER, which names its user
//! and the key its client must send. A connection carries one request and
//! one reply: the gateway reads the request's frame (its length checked
//! before anything is allocated), checks that its org, user and key are
//! the certificate's, then hands the frame to the user's tasks grain
//! (service `taskd`) and passes the grain's reply back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use granary_grains::{GrainId, Identity, Peer};
use granary_wire::taskd::{FrameError, MAX_REQUEST, Message, check_request, frame_len, reply};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::Shared;

/// How long a client has to send its whole request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the grain has to answer a sync.
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);
/// The largest reply passed on from a grain.
const MAX_REPLY: usize = 4 * MAX_REQUEST;
/// The organisation every credential names (`granary tasks cert`).
pub const ORG: &str = "granary";

pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let Some(clients) = shared.taskd_clients.clone() else {
        tracing::error!(
            "listen.taskd is on, but taskd client certificates come from the local CA, which \
             this host does not use; taskd is not served"
        );
        return;
    };
    let config = match &clients {
        crate::TaskdClients::LocalCa(ca) => crate::tls::with_client_auth(&shared.tls, ca),
        crate::TaskdClients::Issued => crate::tls::with_any_client_certificate(&shared.tls),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "taskd is not served");
            return;
        }
    };
    let acceptor = TlsAcceptor::from(config);
    let s = shared.clone();
    crate::accept_loop(
        listener,
        &shared,
        shutdown,
        "taskd",
        move |tcp, peer, _stop| connection(tcp, peer, s.clone(), acceptor.clone()),
    )
    .await
}

async fn send<S: AsyncWrite + Unpin>(client: &mut S, code: u16, status: &str) {
    let _ = client
        .write_all(&reply(code, status, String::new()).encode())
        .await;
    let _ = client.shutdown().await;
}

/// Reads one frame: its announced length is checked against
/// [`MAX_REQUEST`] before the buffer is made.
async fn read_frame<S: AsyncRead + Unpin>(client: &mut S) -> Result<Vec<u8>, (u16, String)> {
    let mut prefix = [0u8; 4];
    client
        .read_exact(&mut prefix)
        .await
        .map_err(|_| (500, "The request ended early".to_owned()))?;
    let total = match frame_len(prefix, MAX_REQUEST) {
        Ok(n) => n,
        Err(e @ FrameError::TooLarge(_)) => return Err((504, format!("Request too big: {e}"))),
        Err(e) => return Err((500, e.to_string())),
    };
    let mut body = vec![0u8; total - 4];
    client
        .read_exact(&mut body)
        .await
        .map_err(|_| (500, "The request ended early".to_owned()))?;
    Ok(body)
}

async fn connection(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>, acceptor: TlsAcceptor) {
    let _ = tcp.set_nodelay(true);
    let settings = shared.settings;
    let mut tls = match tokio::time::timeout(settings.handshake_timeout, acceptor.accept(tcp)).await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "taskd handshake failed");
            return;
        }
        Err(_) => return,
    };
    let Some(der) = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
    else {
        return send(&mut tls, 430, "Access denied").await;
    };
    // A certificate this host issued cannot be guessed: one that is still
    // issued gets in whatever its address did; others count against it.
    let mut fingerprint = [0u8; 32];
    fingerprint.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &der).as_ref());
    let Some((user, credential, key)) = shared.directory.task_certificate(fingerprint).await else {
        if shared.source_refused(peer.ip()) {
            return send(&mut tls, 420, "Service temporarily unavailable").await;
        }
        // Issued by our CA, but revoked (or from before a restore).
        tracing::info!(%peer, "taskd: a certificate not (or no longer) issued to anyone");
        shared.login_failed(peer.ip());
        return send(&mut tls, 430, "Access denied").await;
    };
    tracing::Span::current().record("user", user.as_str());
    let body = match tokio::time::timeout(REQUEST_TIMEOUT, read_frame(&mut tls)).await {
        Ok(Ok(body)) => body,
        Ok(Err((code, status))) => {
            tracing::info!(%peer, code, status, "taskd: refused a request");
            return send(&mut tls, code, &status).await;
        }
        Err(_) => return send(&mut tls, 500, "The request took too long").await,
    };
    let message = match Message::parse(&body) {
        Ok(m) => m,
        Err(e) => return send(&mut tls, 500, &e).await,
    };
    let request = match check_request(&message) {
        Ok(c) => c,
        Err(e) => return send(&mut tls, e.code, &e.status).await,
    };
    if request.org != ORG || request.user != user || request.key != key {
        tracing::info!(%peer, user, "taskd: credentials do not match the certificate");
        shared.login_failed(peer.ip());
        return send(&mut tls, 430, "Access denied").await;
    }
    let Ok(grain) = GrainId::for_user(&user, "tasks") else {
        return send(&mut tls, 430, "Access denied").await;
    };
    let identity = Identity::new(&user, credential.method, credential.id);
    let mut who = Peer::new(peer, "taskd");
    who.tls_version = match tls.get_ref().1.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
        _ => "TLSv1.2".to_owned(),
    };
    let conn = match shared.grains.connect(&grain, "taskd", identity, who).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot reach the tasks grain");
            return send(&mut tls, 420, "Service temporarily unavailable").await;
        }
    };
    let _keep = conn.keep;
    let mut grain_stream = match conn
        .stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(conn.stream))
    {
        Ok(s) => s,
        Err(_) => return send(&mut tls, 420, "Service temporarily unavailable").await,
    };
    let total = u32::try_from(body.len() + 4).unwrap_or(u32::MAX);
    let handed = async {
        grain_stream.write_all(&total.to_be_bytes()).await?;
        grain_stream.write_all(&body).await?;
        drop(body);
        // The reply is passed on as it comes (an initial sync returns the
        // whole task list), after its length is checked.
        let mut prefix = [0u8; 4];
        grain_stream.read_exact(&mut prefix).await?;
        let length = frame_len(prefix, MAX_REPLY)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        Ok::<_, std::io::Error>((prefix, length))
    };
    match tokio::time::timeout(REPLY_TIMEOUT, handed).await {
        Ok(Ok((prefix, length))) => {
            let passed = tokio::time::timeout(REPLY_TIMEOUT, async {
                tls.write_all(&prefix).await?;
                let mut rest = (&mut grain_stream).take(length as u64 - 4);
                tokio::io::copy(&mut rest, &mut tls).await?;
                tls.shutdown().await
            })
            .await;
            if !matches!(passed, Ok(Ok(()))) {
                tracing::info!(%peer, "taskd: the reply was not passed on whole");
            }
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "taskd: the tasks grain gave no reply");
            send(&mut tls, 500, "The task store failed; try again").await
        }
        Err(_) => send(&mut tls, 420, "Service temporarily unavailable").await,
    }
}
