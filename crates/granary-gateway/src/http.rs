//! The plain HTTP listener (`listen.http`, port 80 as the world sees it):
//! it answers ACME HTTP-01 checks ([`crate::acme`]) and sends every other
//! request to the same host and path over HTTPS. Nothing else is served
//! in the clear.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::Shared;
use crate::acme::HTTP_CHALLENGE_PATH;

/// Serves plain HTTP on `listener` until `shutdown` completes.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        shared.stats.connection("http");
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let answer = answer(&shared, &req);
                async move { Ok::<_, Infallible>(answer) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_buf_size(16 << 10)
                .serve_connection(TokioIo::new(tcp), service);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

fn answer(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if let Some(token) = path.strip_prefix(HTTP_CHALLENGE_PATH) {
        let answer = shared.acme.as_ref().and_then(|a| a.http_answer(token));
        return match (req.method(), answer) {
            (&Method::GET | &Method::HEAD, Some(key_authorization)) => {
                plain(StatusCode::OK, key_authorization)
            }
            _ => plain(StatusCode::NOT_FOUND, "No such challenge.\n".to_owned()),
        };
    }
    let host = granary_wire::http::request_host(
        req.uri().authority().map(|a| a.as_str()),
        req.headers().get(header::HOST).map(|h| h.as_bytes()),
    );
    let Some(host) = host else {
        return plain(
            StatusCode::BAD_REQUEST,
            "A Host header naming this server is needed.\n".to_owned(),
        );
    };
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut r = plain(
        StatusCode::PERMANENT_REDIRECT,
        "This server answers over HTTPS.\n".to_owned(),
    );
    // Built from a checked host name and hyper's already-valid path.
    if let Ok(location) = header::HeaderValue::from_str(&format!("https://{host}{target}")) {
        r.headers_mut().insert(header::LOCATION, location);
    }
    r
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

#[cfg(test)]
mod tests {
    use granary_wire::http::request_host;

    /// The redirect's host: a plain DNS name, port dropped, or nothing.
    fn host_name(value: &str) -> Option<String> {
        request_host(None, Some(value.as_bytes()))
    }

    #[test]
    fn redirects_only_to_plain_host_names() {
        assert_eq!(host_name("Example.org:80").as_deref(), Some("example.org"));
        assert_eq!(
            host_name("git.example.org").as_deref(),
            Some("git.example.org")
        );
        assert_eq!(host_name("evil.org/x"), None);
        assert_eq!(host_name("a b"), None);
        assert_eq!(host_name("[::1]:80"), None);
        assert_eq!(host_name(""), None);
    }
}
