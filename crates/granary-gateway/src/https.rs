//! The HTTPS listener: TLS by rustls, HTTP/1.1 and HTTP/2 by hyper.
//!
//! Every request is routed on its own (HTTP/2 coalesces host names on one
//! connection): the health check is answered here, everything else by the
//! [`Gateway`](crate::proxy::Gateway), which forwards to grains.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::proxy::{Body, Gateway};
use granary_wire::http as route;

/// The path of the health check, answered on every host name.
pub const HEALTH_PATH: &str = "/.well-known/granary/health";

/// Timeouts that bound what a slow or silent client can hold.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From TCP accept to a finished TLS handshake.
    pub handshake: Duration,
    /// From the first byte of a request head to its end.
    pub header_read: Duration,
    /// How long open connections get to finish when the server stops.
    pub drain: Duration,
    /// The largest request head (HTTP/1.1) accepted.
    pub max_header_bytes: usize,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: Duration::from_secs(10),
            header_read: Duration::from_secs(30),
            drain: Duration::from_secs(10),
            max_header_bytes: 64 << 10,
        }
    }
}

/// Serves HTTPS on `listener` until `shutdown` completes, then lets open
/// connections finish for up to `timeouts.drain`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    timeouts: Timeouts,
    gateway: Option<Arc<Gateway>>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header_read)
        .max_buf_size(timeouts.max_header_bytes.max(8192));
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);

    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of fds or similar: keep serving the connections we have.
                    tracing::warn!(error = %e, "https accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let gateway = gateway.clone();
        let span = tracing::info_span!("https", %peer);
        tokio::spawn(
            async move {
                let tls = match tokio::time::timeout(timeouts.handshake, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "tls handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("tls handshake timed out");
                        return;
                    }
                };
                let sni = tls.get_ref().1.server_name().map(str::to_owned);
                let service = hyper::service::service_fn(move |req| {
                    let (sni, gateway) = (sni.clone(), gateway.clone());
                    async move { Ok::<_, Infallible>(answer(req, sni.as_deref(), peer, gateway).await) }
                });
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                if let Err(e) = watcher.watch(conn.into_owned()).await {
                    tracing::debug!(error = %e, "https connection ended with an error");
                }
            }
            .instrument(span),
        );
    }

    drop(listener);
    if tokio::time::timeout(timeouts.drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("https connections still open after the drain timeout; closing them");
    }
}

async fn answer(
    req: Request<Incoming>,
    sni: Option<&str>,
    peer: SocketAddr,
    gateway: Option<Arc<Gateway>>,
) -> Response<Body> {
    let host = route::request_host(
        req.uri().authority().map(|a| a.as_str()),
        req.headers().get(header::HOST).map(|h| h.as_bytes()),
    )
    .or_else(|| sni.map(str::to_owned))
    .unwrap_or_default();
    tracing::debug!(method = %req.method(), path = req.uri().path(), %host, %peer, "request");
    if req.uri().path() == HEALTH_PATH {
        let body = format!(
            "{{\"status\":\"ok\",\"version\":\"{}\"}}\n",
            env!("CARGO_PKG_VERSION")
        );
        return respond(StatusCode::OK, "application/json", body);
    }
    if let Some(gateway) = gateway {
        return gateway.serve(req, &host, peer.ip()).await;
    }
    respond(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        format!(
            "No Granary app serves https://{host}{} yet.\n",
            req.uri().path()
        ),
    )
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-store")
        .body(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("static response parts are valid")
}
