//! The HTTPS listener: TLS by rustls, HTTP/1.1 and HTTP/2 by hyper.
//!
//! Every request is routed on its own (HTTP/2 coalesces host names on one
//! connection). The gateway answers its own pages here (the health check
//! on every host, and the domain's front page); everything else goes to
//! the [`Gateway`](crate::proxy::Gateway), which routes it by the service
//! table and forwards it to a grain.

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
use tokio::net::TcpListener;
use tokio_rustls::LazyConfigAcceptor;
use tracing::Instrument;

use crate::Shared;
use crate::proxy::{Body, Gateway};
use granary_wire::http as wire;

/// The path of the health check, answered on every host name.
pub const HEALTH_PATH: &str = "/.well-known/granary/health";

/// Serves HTTPS on `listener` until `shutdown` completes, then lets open
/// connections finish for up to the drain timeout.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: impl Future<Output = ()>) {
    let settings = shared.settings;
    let configs = Configs::new(&shared.tls, &shared.domain, shared.acme.clone());
    let gateway = Gateway::new(shared);
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .max_buf_size(settings.max_header_bytes.max(8192));
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
        // Answers are written as they are ready (a head, then a body):
        // without this, Nagle holds a body's first segment back until the
        // client's delayed ACK of the head, 40 ms later.
        let _ = tcp.set_nodelay(true);
        gateway.shared().stats.connection("https");
        let configs = configs.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let gateway = gateway.clone();
        let span = tracing::info_span!("https", %peer);
        tokio::spawn(
            async move {
                let tls =
                    match tokio::time::timeout(settings.handshake_timeout, configs.accept(tcp))
                        .await
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
                let session = tls.get_ref().1;
                let sni = session.server_name().map(str::to_owned);
                let version: &'static str = match session.protocol_version() {
                    Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
                    Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
                    _ => "",
                };
                let service = hyper::service::service_fn(move |req| {
                    let (sni, gateway) = (sni.clone(), gateway.clone());
                    async move {
                        let started = std::time::Instant::now();
                        let answer = answer(req, sni.as_deref(), peer, version, &gateway).await;
                        let stats = &gateway.shared().stats;
                        stats.answered(answer.status().as_u16(), started.elapsed());
                        Ok::<_, Infallible>(answer)
                    }
                });
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                if let Err(e) = watcher.watch(conn.into_owned()).await {
                    // With its cause: hyper's own text is only "connection error".
                    let cause = std::error::Error::source(&*e).map(|c| c.to_string());
                    tracing::debug!(error = %e, cause, "https connection ended with an error");
                }
            }
            .instrument(span),
        );
    }

    drop(listener);
    if tokio::time::timeout(settings.drain_timeout, graceful.shutdown())
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
    tls_version: &str,
    gateway: &Arc<Gateway>,
) -> Response<Body> {
    let host = wire::request_host(
        req.uri().authority().map(|a| a.as_str()),
        req.headers().get(header::HOST).map(|h| h.as_bytes()),
    )
    .or_else(|| sni.map(str::to_owned))
    .unwrap_or_default();
    // Invite tokens and upload slots are secrets: never logged.
    let shown = if req.uri().path().starts_with(crate::invite::PATH_PREFIX) {
        "/invite/…"
    } else if host.starts_with("upload.") {
        "/…"
    } else {
        req.uri().path()
    };
    tracing::debug!(method = %req.method(), path = shown, %host, "request");
    if req.uri().path() == HEALTH_PATH {
        let body = format!(
            "{{\"status\":\"ok\",\"version\":\"{}\"}}\n",
            env!("CARGO_PKG_VERSION")
        );
        return respond(StatusCode::OK, "application/json", body);
    }
    if let Some(redirect) = dav_discovery(&req, &host, &gateway.shared().domain) {
        return redirect;
    }
    if let Some(page) = mail_page(gateway.shared(), &req, &host, peer).await {
        return page;
    }
    if req.uri().path().starts_with(crate::invite::PATH_PREFIX) {
        let host_header = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .unwrap_or(&host)
            .to_owned();
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        if let Some(page) =
            crate::invite::page(gateway.shared(), &method, &host_header, &host, &path).await
        {
            return page;
        }
    }
    let domain = &gateway.shared().domain;
    if let (true, Some(home)) = (&host == domain, gateway.shared().home.clone()) {
        return web_home(req, peer, &host, home).await;
    }
    if &host == domain && req.uri().path() == "/" {
        return respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            front_page(domain),
        );
    }
    gateway.serve(req, &host, peer, tls_version).await
}

/// Hands a request for the domain to the web home, its body read first
/// (413 above [`crate::home::MAX_BODY`]).
async fn web_home(
    req: Request<Incoming>,
    peer: SocketAddr,
    host: &str,
    home: Arc<dyn crate::home::WebHome>,
) -> Response<Body> {
    let authority = authority(&req).unwrap_or_else(|| host.to_owned());
    let (parts, body) = req.into_parts();
    let body = match http_body_util::Limited::new(body, crate::home::MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return respond(
                StatusCode::PAYLOAD_TOO_LARGE,
                "text/plain; charset=utf-8",
                "That form was too large.\n".to_owned(),
            );
        }
    };
    let answer = home
        .answer(crate::home::HomeRequest {
            method: parts.method,
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().unwrap_or_default().to_owned(),
            headers: parts.headers,
            body,
            peer: peer.ip(),
            authority,
        })
        .await;
    answer.map(|b| Full::new(b).map_err(|never| match never {}).boxed())
}

/// The host and port the client asked for, as sent (`example.org:8443`):
/// the URI's authority (HTTP/2), else the `Host` header.
fn authority(req: &Request<Incoming>) -> Option<String> {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
}

/// RFC 6764 §5: `/.well-known/caldav` and `/.well-known/carddav` on the
/// domain (or on `dav.<domain>` itself) redirect to the root of
/// `dav.<domain>`, on the port the client used, where the DAV grain
/// answers `current-user-principal`.
fn dav_discovery(req: &Request<Incoming>, host: &str, domain: &str) -> Option<Response<Body>> {
    let path = req.uri().path().trim_end_matches('/');
    if path != "/.well-known/caldav" && path != "/.well-known/carddav" {
        return None;
    }
    let dav = format!("dav.{domain}");
    if host != domain && host != dav {
        return None;
    }
    let raw = authority(req).unwrap_or_default();
    let port = raw
        .rsplit_once(':')
        .map(|(_, p)| p)
        .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && *p != "443");
    let location = match port {
        Some(p) => format!("https://{dav}:{p}/"),
        None => format!("https://{dav}/"),
    };
    let mut r = respond(
        StatusCode::MOVED_PERMANENTLY,
        "text/plain; charset=utf-8",
        format!("Calendars and contacts are at {location}\n"),
    );
    r.headers_mut().insert(
        header::LOCATION,
        hyper::header::HeaderValue::from_str(&location).ok()?,
    );
    Some(r)
}

/// Where senders fetch a mail domain's MTA-STS policy (RFC 8461 §3.3).
const MTA_STS_PATH: &str = "/.well-known/mta-sts.txt";

/// The pages the gateway answers itself for mail, each for a host of one
/// of this host's mail domains (`None`: not one of them, the request goes
/// on to the service table):
///
/// | host | path | answer |
/// |---|---|---|
/// | `mta-sts.<d>` | `/.well-known/mta-sts.txt` | the MTA-STS policy |
/// | `autoconfig.<d>` | `/mail/config-v1.1.xml` | Thunderbird's autoconfig |
/// | `<d>` | `/.well-known/autoconfig/mail/config-v1.1.xml` | the same |
/// | `mail.<d>` | `/mobileconfig` | an Apple profile, after a `mail` login |
async fn mail_page(
    shared: &crate::Shared,
    req: &Request<Incoming>,
    host: &str,
    peer: SocketAddr,
) -> Option<Response<Body>> {
    use crate::autoconfig::{MOBILECONFIG_PATH, THUNDERBIRD_PATH, THUNDERBIRD_WELL_KNOWN};
    let mx = shared.mx.as_ref()?;
    let path = req.uri().path();
    let (page, domain) = match path {
        MTA_STS_PATH => ("mta-sts", host.strip_prefix("mta-sts.")?),
        THUNDERBIRD_PATH => ("autoconfig", host.strip_prefix("autoconfig.")?),
        THUNDERBIRD_WELL_KNOWN => ("autoconfig", host),
        MOBILECONFIG_PATH => ("mobileconfig", host.strip_prefix("mail.")?),
        _ => return None,
    };
    let local = shared
        .directory
        .mail_recipient(&format!("postmaster@{domain}"))
        .await;
    if matches!(local, crate::MailRecipient::NotLocal) {
        return None;
    }
    let settings = &mx.settings;
    Some(match page {
        "mta-sts" => respond(
            StatusCode::OK,
            "text/plain",
            crate::smtp::records::mta_sts_policy(&settings.hostname, &settings.mta_sts_mode),
        ),
        "autoconfig" => respond(
            StatusCode::OK,
            "application/xml; charset=utf-8",
            settings.clients.thunderbird(domain),
        ),
        _ => mobileconfig(shared, req, domain, peer).await,
    })
}

/// The Apple profile of whoever logs in with a `mail` app password.
async fn mobileconfig(
    shared: &crate::Shared,
    req: &Request<Incoming>,
    domain: &str,
    peer: SocketAddr,
) -> Response<Body> {
    let refuse = |status: StatusCode, text: &str| {
        let mut r = respond(status, "text/plain; charset=utf-8", format!("{text}\n"));
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Basic realm=\"mail\", charset=\"UTF-8\""),
            );
        }
        r
    };
    let Some((login, password)) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| wire::basic_credentials(h.as_bytes()))
    else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "Log in with your user name and an app password of kind mail.",
        );
    };
    match shared.mail_login(peer.ip(), &login, &password).await {
        Ok((user, _)) => {
            let address = if login.contains('@') {
                login.to_ascii_lowercase()
            } else {
                format!("{user}@{domain}")
            };
            let Some(mx) = shared.mx.as_ref() else {
                return refuse(StatusCode::NOT_FOUND, "Mail is not served here.");
            };
            let mut r = respond(
                StatusCode::OK,
                "application/x-apple-aspen-config",
                mx.settings.clients.mobileconfig(&user, &address),
            );
            r.headers_mut().insert(
                header::CONTENT_DISPOSITION,
                hyper::header::HeaderValue::from_static(
                    "attachment; filename=\"mail.mobileconfig\"",
                ),
            );
            r
        }
        Err(crate::LoginRefused::Limited) => refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many failed logins; try again in a few minutes.",
        ),
        Err(crate::LoginRefused::Invalid) => refuse(
            StatusCode::UNAUTHORIZED,
            "Wrong user name or app password (it must be of kind mail).",
        ),
    }
}

/// The domain's front page: what this is and where each service lives.
fn front_page(domain: &str) -> String {
    format!(
        "<!doctype html>
<html lang=\"en\">
<head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">
<title>Granary on {domain}</title>
<style>body{{font:1.05rem/1.5 system-ui,sans-serif;max-width:40rem;margin:2rem auto;padding:0 1rem;color:#1b1b1b}}code{{background:#f2f2f2;padding:0 .2em}}</style>
</head>
<body>
<h1>Granary on {domain}</h1>
<p>This server hosts its users' own services. Each user's git, blog and
other apps run in a grain of their own, isolated from everyone else's.</p>
<h2>Where to go</h2>
<ul>
<li>Git: <code>https://git.{domain}/USER/REPOSITORY.git</code>, with your user name and an
app password of kind <code>git</code> (ask your admin: <code>granary app-password add USER --kind git</code>).</li>
<li>A user's blog: <code>https://USER.{domain}/</code>.</li>
<li>Health: <a href=\"{HEALTH_PATH}\"><code>{HEALTH_PATH}</code></a>.</li>
</ul>
</body>
</html>
"
    )
}

pub(crate) fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Body> {
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

/// The TLS configurations of the HTTPS listener, chosen by the name the
/// client asks for (SNI) before the handshake goes on.
///
/// Git's host is offered HTTP/1.1 only. Git gains nothing from HTTP/2 (one
/// request at a time), and the libcurl of Debian 12 (7.88; fixed in 8.2)
/// sends an upload chunk a second time when its socket would block,
/// which an HTTP/2 server must refuse ("content-length overflow"): a push
/// of a few hundred kilobytes over a real network, or through another
/// node, failed with `HTTP/2 stream 5 was not closed cleanly:
/// PROTOCOL_ERROR`. Over HTTP/1.1 the same push works.
#[derive(Clone)]
struct Configs {
    any: Arc<rustls::ServerConfig>,
    http1: Arc<rustls::ServerConfig>,
    /// `git.<domain>`.
    git: Arc<str>,
    /// Answers TLS-ALPN-01 checks, with `tls.acme`.
    acme: Option<Arc<crate::acme::Acme>>,
}

impl Configs {
    fn new(
        tls: &Arc<rustls::ServerConfig>,
        domain: &str,
        acme: Option<Arc<crate::acme::Acme>>,
    ) -> Configs {
        let mut http1 = (**tls).clone();
        http1.alpn_protocols = vec![b"http/1.1".to_vec()];
        Configs {
            any: tls.clone(),
            http1: Arc::new(http1),
            git: format!("git.{domain}").into(),
            acme,
        }
    }

    async fn accept(
        &self,
        tcp: tokio::net::TcpStream,
    ) -> std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
        let hello = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
        if let Some(acme) = &self.acme
            && crate::acme::Acme::is_alpn_check(&hello.client_hello())
        {
            // The CA's check ends with the handshake: no request follows.
            let _ = hello.into_stream(acme.alpn_config()).await?;
            return Err(std::io::Error::other("answered a TLS-ALPN-01 check"));
        }
        let git = hello
            .client_hello()
            .server_name()
            .is_some_and(|name| name.eq_ignore_ascii_case(&self.git));
        let config = if git { &self.http1 } else { &self.any };
        hello.into_stream(config.clone()).await
    }
}
