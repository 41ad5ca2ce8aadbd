//! Backups to another Granary node: `granary backup receive` on the far
//! end, a [`RemoteTarget`] on this one.
//!
//! The link is TLS 1.3 with raw public keys (RFC 7250) on both ends: each
//! node presents its Ed25519 node key, the sender pins the receiver's key
//! and the receiver accepts only the keys it was told to allow. There are
//! no certificates, CAs or names to get wrong. Over it, plain HTTP/1.1:
//!
//! - `GET /v1/file/<name>`: a file, or 404;
//! - `PUT /v1/file/<name>` with `x-granary-sha256`: stored (temporary
//!   file, fsync, rename, fsync of the directory) before the answer, so
//!   nothing is acknowledged before it is durable; a body whose hash does
//!   not match is refused and not kept;
//! - `DELETE /v1/file/<name>`;
//! - `GET /v1/list/<prefix>`: JSON `[[name, size], ...]`.
//!
//! Each sender's files live under `<dir>/<sender key fingerprint>/`, so
//! senders never see each other's. Everything a sender stores is already
//! encrypted and signed: the receiver never sees plaintext or keys.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use granary_package::{PublicKey, SigningKey};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::target::{DirTarget, Target};
use crate::{BackupError, sha256};

/// What `granary backup receive` serves.
pub struct Receiver {
    pub key: SigningKey,
    pub allowed: Vec<PublicKey>,
    pub dir: PathBuf,
    /// Largest file accepted (a chunk plus its age overhead, or a catalogue).
    pub max_file_bytes: u64,
}

impl Receiver {
    fn tls(&self) -> Result<rustls::ServerConfig, BackupError> {
        let allowed = self.allowed.clone();
        let mut config = crate::pinned::server_config(&self.key, move |k| allowed.contains(k))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// Serves until the listener fails. Every connection is its own task;
    /// one that fails (bad handshake, unknown key) ends alone.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
    ) -> Result<(), BackupError> {
        if self.allowed.is_empty() {
            return Err(BackupError::Config(
                "no sender is allowed: pass --allow with each sending node's key (`granary backup key` on that node)".to_owned(),
            ));
        }
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(self.tls()?));
        loop {
            let (tcp, peer) = listener
                .accept()
                .await
                .map_err(|e| BackupError::Io(format!("accept: {e}")))?;
            let (acceptor, me) = (acceptor.clone(), self.clone());
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp))
                        .await;
                let tls = match handshake {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::warn!(%peer, error = %e, "backup sender refused at the handshake");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%peer, "backup sender's handshake timed out");
                        return;
                    }
                };
                let Some(sender) = crate::pinned::peer_key(tls.get_ref().1) else {
                    return;
                };
                let root = me.dir.join(crate::catalogue::fingerprint(&sender));
                tracing::info!(%peer, sender = %crate::catalogue::fingerprint(&sender), "backup sender connected");
                let service = hyper::service::service_fn(move |req| {
                    let (root, max) = (root.clone(), me.max_file_bytes);
                    async move { Ok::<_, std::convert::Infallible>(handle(req, root, max).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await
                {
                    tracing::debug!(%peer, error = %e, "backup connection ended");
                }
            });
        }
    }
}

fn answer(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    root: PathBuf,
    max: u64,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let (op, name) = match path.strip_prefix("/v1/file/") {
        Some(n) => ("file", n.to_owned()),
        None => match path.strip_prefix("/v1/list/") {
            Some(n) => ("list", n.to_owned()),
            None => return answer(StatusCode::NOT_FOUND, "unknown path\n"),
        },
    };
    if !crate::target::valid_name(&name) {
        return answer(StatusCode::BAD_REQUEST, "not a backup file name\n");
    }
    let method = req.method().clone();
    let expected = req
        .headers()
        .get("x-granary-sha256")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = if method == Method::PUT {
        match Limited::new(req.into_body(), max as usize).collect().await {
            Ok(b) => Some(b.to_bytes()),
            Err(_) => return answer(StatusCode::PAYLOAD_TOO_LARGE, "too large or cut off\n"),
        }
    } else {
        None
    };
    let work =
        tokio::task::spawn_blocking(move || -> Result<Response<Full<Bytes>>, BackupError> {
            let mut dir = DirTarget::new(&root)?;
            Ok(match (op, method) {
                ("file", Method::GET) => match dir.read(&name, max)? {
                    Some(bytes) => answer(StatusCode::OK, bytes),
                    None => answer(StatusCode::NOT_FOUND, "no such file\n"),
                },
                ("file", Method::PUT) => {
                    let body = body.expect("read above");
                    if expected.as_deref() != Some(sha256(&body).as_str()) {
                        answer(
                            StatusCode::BAD_REQUEST,
                            "body does not match x-granary-sha256\n",
                        )
                    } else {
                        dir.write(&name, &body)?;
                        answer(StatusCode::NO_CONTENT, Bytes::new())
                    }
                }
                ("file", Method::DELETE) => {
                    dir.remove(&name)?;
                    answer(StatusCode::NO_CONTENT, Bytes::new())
                }
                ("list", Method::GET) => {
                    let list = dir.list(&name)?;
                    answer(
                        StatusCode::OK,
                        serde_json::to_vec(&list).unwrap_or_default(),
                    )
                }
                _ => answer(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
            })
        })
        .await;
    match work {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "backup receiver failed a request");
            answer(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
        }
        Err(e) => answer(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// Another node's `granary backup receive`, as a [`Target`]. Blocking: it
/// runs its own small runtime, for the export's blocking thread.
pub struct RemoteTarget {
    address: String,
    runtime: tokio::runtime::Runtime,
    config: Arc<rustls::ClientConfig>,
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl RemoteTarget {
    /// Connects to `address` (`host:port`), which must present `server_key`.
    pub fn connect(
        address: &str,
        key: &SigningKey,
        server_key: PublicKey,
    ) -> Result<RemoteTarget, BackupError> {
        let mut config = crate::pinned::client_config(key, server_key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| BackupError::Other(format!("runtime: {e}")))?;
        let mut target = RemoteTarget {
            address: address.to_owned(),
            runtime,
            config: Arc::new(config),
            sender: None,
        };
        target.reconnect()?;
        Ok(target)
    }

    fn reconnect(&mut self) -> Result<(), BackupError> {
        let (address, config) = (self.address.clone(), self.config.clone());
        let sender = self.runtime.block_on(async move {
            let io = |e: std::io::Error| BackupError::Io(format!("cannot reach the backup node {address}: {e}"));
            let tcp = tokio::time::timeout(
                std::time::Duration::from_secs(15),
                tokio::net::TcpStream::connect(&address),
            )
            .await
            .map_err(|_| BackupError::Io(format!("cannot reach the backup node {address}: timed out")))?
            .map_err(io)?;
            tcp.set_nodelay(true).map_err(io)?;
            let name = crate::pinned::server_name();
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| {
                    BackupError::Io(format!(
                        "TLS with the backup node {address} failed: {e} (does its key match, and does it allow this node's key?)"
                    ))
                })?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| BackupError::Io(format!("HTTP with {address}: {e}")))?;
            tokio::spawn(conn);
            Ok::<_, BackupError>(sender)
        })?;
        self.sender = Some(sender);
        Ok(())
    }

    /// One request; the answer's body may be at most `max` bytes (the far
    /// end may be hostile).
    fn call(
        &mut self,
        method: Method,
        path: String,
        body: Bytes,
        sha: Option<String>,
        max: u64,
    ) -> Result<(StatusCode, Bytes), BackupError> {
        for attempt in 0..2 {
            if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
                self.reconnect()?;
            }
            let mut req = Request::builder()
                .method(method.clone())
                .uri(&path)
                .header("host", "granary-node");
            if let Some(sha) = &sha {
                req = req.header("x-granary-sha256", sha);
            }
            let req = req
                .body(Full::new(body.clone()))
                .map_err(|e| BackupError::Other(e.to_string()))?;
            let sender = self.sender.as_mut().expect("connected");
            let result = self.runtime.block_on(async {
                let resp = sender.send_request(req).await?;
                let status = resp.status();
                let body = Limited::new(resp.into_body(), max as usize).collect().await;
                Ok::<_, hyper::Error>((status, body))
            });
            match result {
                Ok((status, Ok(body))) => return Ok((status, body.to_bytes())),
                Ok((_, Err(e))) => {
                    // The connection is in an unknown state: start afresh.
                    self.sender = None;
                    return Err(BackupError::Integrity(format!(
                        "the backup node {} sent more than {max} bytes for {path} or broke off: {e}",
                        self.address
                    )));
                }
                Err(e) if attempt == 0 => {
                    tracing::debug!(error = %e, "backup node connection lost; reconnecting");
                    self.sender = None;
                }
                Err(e) => {
                    return Err(BackupError::Io(format!(
                        "the backup node {} closed the connection ({e}); does it allow this node's key? (`granary backup key` prints it)",
                        self.address
                    )));
                }
            }
        }
        unreachable!("the loop returns")
    }
}

fn refused(address: &str, status: StatusCode, body: &[u8]) -> BackupError {
    BackupError::Io(format!(
        "the backup node {address} answered {status}: {}",
        String::from_utf8_lossy(body).trim()
    ))
}

impl Target for RemoteTarget {
    fn describe(&self) -> String {
        format!("granary node {}", self.address)
    }

    fn read(&mut self, name: &str, max: u64) -> Result<Option<Vec<u8>>, BackupError> {
        let (status, body) = self.call(
            Method::GET,
            format!("/v1/file/{name}"),
            Bytes::new(),
            None,
            max.max(4096),
        )?;
        match status {
            StatusCode::OK => Ok(Some(body.to_vec())),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(refused(&self.address, s, &body)),
        }
    }

    fn write(&mut self, name: &str, bytes: &[u8]) -> Result<(), BackupError> {
        let sha = sha256(bytes);
        let (status, body) = self.call(
            Method::PUT,
            format!("/v1/file/{name}"),
            Bytes::copy_from_slice(bytes),
            Some(sha),
            4096,
        )?;
        if status.is_success() {
            Ok(())
        } else {
            Err(refused(&self.address, status, &body))
        }
    }

    fn list(&mut self, prefix: &str) -> Result<Vec<(String, u64)>, BackupError> {
        let (status, body) = self.call(
            Method::GET,
            format!("/v1/list/{prefix}"),
            Bytes::new(),
            None,
            64 << 20,
        )?;
        if !status.is_success() {
            return Err(refused(&self.address, status, &body));
        }
        serde_json::from_slice(&body)
            .map_err(|e| BackupError::Io(format!("bad listing from {}: {e}", self.address)))
    }

    fn remove(&mut self, name: &str) -> Result<(), BackupError> {
        let (status, body) = self.call(
            Method::DELETE,
            format!("/v1/file/{name}"),
            Bytes::new(),
            None,
            4096,
        )?;
        if status.is_success() {
            Ok(())
        } else {
            Err(refused(&self.address, status, &body))
        }
    }
}

/// Where a receiver keeps one sender's files.
pub fn sender_dir(dir: &Path, sender: &PublicKey) -> PathBuf {
    dir.join(crate::catalogue::fingerprint(sender))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutual_keys_are_required() {
        let tmp = tempfile::tempdir().unwrap();
        let receiver_key = SigningKey::generate().unwrap();
        let receiver_public = receiver_key.public();
        let sender = SigningKey::generate().unwrap();
        let stranger = SigningKey::generate().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let receiver = Arc::new(Receiver {
            key: receiver_key,
            allowed: vec![sender.public()],
            dir: tmp.path().to_path_buf(),
            max_file_bytes: 1 << 20,
        });
        let server = rt.spawn(receiver.serve(listener));

        let mut remote = RemoteTarget::connect(&address, &sender, receiver_public).unwrap();
        remote.write("streams/g/1/00000000.age", b"cipher").unwrap();
        assert_eq!(
            remote.read("streams/g/1/00000000.age", 6).unwrap().unwrap(),
            b"cipher"
        );
        assert_eq!(remote.read("missing", 9).unwrap(), None);
        assert_eq!(
            remote.list("streams").unwrap(),
            vec![("streams/g/1/00000000.age".to_owned(), 6)]
        );
        assert!(
            remote.write("x", &vec![0; 2 << 20]).is_err(),
            "over the size limit"
        );
        let on_disk = sender_dir(tmp.path(), &sender.public()).join("streams/g/1/00000000.age");
        assert_eq!(std::fs::read(on_disk).unwrap(), b"cipher");
        remote.remove("streams/g/1/00000000.age").unwrap();

        // A sender the receiver does not allow, and a receiver that is not
        // the one pinned, are both refused.
        let e = RemoteTarget::connect(&address, &stranger, receiver_public)
            .and_then(|mut r| r.read("x", 9))
            .map(drop)
            .unwrap_err();
        assert!(e.to_string().contains("allow"), "{e}");
        let e = RemoteTarget::connect(&address, &sender, stranger.public())
            .map(drop)
            .unwrap_err();
        assert!(e.to_string().contains("TLS"), "{e}");
        server.abort();
    }
}
