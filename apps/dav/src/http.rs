//! The grain's `http` service: HTTP/1.1 from the gateway (one identity per
//! connection, the owner's), bodies read whole under a limit, then the
//! request served by [`Dav`] or forwarded to a collection shared with the
//! owner.

use std::convert::Infallible;
use std::rc::Rc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::dav::{Dav, Request, Response};
use crate::paths::{self, CollectionRef, Target};
use crate::props::MAX_RESOURCE;
use crate::share::{Shares, responses_under};
use crate::store::Kind;

pub struct Server {
    pub dav: std::sync::Arc<Dav>,
    pub shares: Rc<Shares>,
}

/// Serves one connection from the gateway.
pub async fn serve(server: Rc<Server>, conn: granary_sdk::Accepted) {
    let user = conn.user.clone();
    let service = hyper::service::service_fn(move |req| {
        let (server, user) = (server.clone(), user.clone());
        async move { Ok::<_, Infallible>(server.answer(req, &user).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(conn.stream), service)
        .await
    {
        granary_sdk::log::info(&format!("http connection ended: {e}"));
    }
}

fn to_hyper(r: Response) -> hyper::Response<Full<Bytes>> {
    let mut b = hyper::Response::builder()
        .status(r.status)
        // Nothing served here is a page: a calendar object shared by
        // someone else never runs as one on this origin.
        .header("x-content-type-options", "nosniff")
        .header("content-security-policy", "sandbox");
    for (n, v) in &r.headers {
        b = b.header(n.as_str(), v.as_str());
    }
    b.body(Full::new(Bytes::from(r.body))).unwrap_or_else(|_| {
        let mut r = hyper::Response::new(Full::new(Bytes::from_static(b"bad answer\n")));
        *r.status_mut() = hyper::StatusCode::BAD_GATEWAY;
        r
    })
}

impl Server {
    async fn answer(
        &self,
        req: hyper::Request<Incoming>,
        conn_user: &str,
    ) -> hyper::Response<Full<Bytes>> {
        // The gateway names who each request is for; only the owner's are
        // served (the connection was accepted for them).
        let user = req
            .headers()
            .get("x-granary-user")
            .and_then(|v| v.to_str().ok())
            .unwrap_or(conn_user)
            .to_owned();
        if user != self.dav.owner {
            return to_hyper(Response::text(403, "this grain serves its owner only"));
        }
        let host = req
            .headers()
            .get("x-granary-host")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let domain = host.strip_prefix("dav.").unwrap_or(&host).to_owned();
        let method = req.method().as_str().to_owned();
        let path = req.uri().path().to_owned();
        let headers: Vec<(String, String)> = req
            .headers()
            .iter()
            .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        let limit = if method == "PUT" {
            MAX_RESOURCE
        } else {
            crate::xml::MAX_BODY
        };
        let declared = req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if declared.is_some_and(|n| n > limit) {
            drain(req.into_body()).await;
            return to_hyper(too_large(&path, limit));
        }
        let mut body = req.into_body();
        let mut bytes = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return to_hyper(Response::text(400, "the request body ended early"));
            };
            if let Ok(data) = frame.into_data() {
                if bytes.len() + data.len() > limit {
                    drain(body).await;
                    return to_hyper(too_large(&path, limit));
                }
                bytes.extend_from_slice(&data);
            }
        }
        let body = bytes;
        let request = Request {
            method,
            path,
            headers,
            body,
        };
        to_hyper(self.route(request, &domain).await)
    }

    async fn route(&self, req: Request, domain: &str) -> Response {
        let target = paths::resolve(&req.path, &self.dav.owner);
        match &target {
            Ok(Target::Collection(kind, CollectionRef::Shared { owner, name })) => {
                let base = paths::href(&self.dav.owner, target.as_ref().expect("matched Ok"));
                if matches!(req.method.as_str(), "MKCOL" | "MKCALENDAR") {
                    return Response::text(405, "that name is a collection shared with you");
                }
                return self
                    .shares
                    .forward(*kind, owner, name, "", &base, &req)
                    .await;
            }
            Ok(Target::Object(kind, CollectionRef::Shared { owner, name }, object)) => {
                let base = paths::href(
                    &self.dav.owner,
                    &Target::Collection(
                        *kind,
                        CollectionRef::Shared {
                            owner: owner.clone(),
                            name: name.clone(),
                        },
                    ),
                );
                return self
                    .shares
                    .forward(*kind, owner, name, object, &base, &req)
                    .await;
            }
            _ => {}
        }
        let home_listing = match (&target, req.method.as_str(), req.header("depth")) {
            (Ok(Target::Home(kind)), "PROPFIND", Some("1")) => Some(*kind),
            _ => None,
        };
        let forwarded = home_listing.map(|_| req.clone());
        let Some(mut response) = self.dav.handle(req, domain).await else {
            return Response::text(404, "not found");
        };
        if let (Some(kind), Some(req)) = (home_listing, forwarded)
            && response.status == 207
        {
            let extra = self.shared_listing(kind, &req).await;
            splice(&mut response.body, &extra);
        }
        response
    }

    /// The `<D:response>`s of every collection of `kind` shared with the
    /// owner, each asked of its provider with the client's PROPFIND body.
    async fn shared_listing(&self, kind: Kind, req: &Request) -> String {
        let mut out = String::new();
        for route in self.shares.list(kind).await {
            let base = paths::href(
                &self.dav.owner,
                &Target::Collection(
                    kind,
                    CollectionRef::Shared {
                        owner: route.owner.clone(),
                        name: route.name.clone(),
                    },
                ),
            );
            let mut one = req.clone();
            one.headers.retain(|(n, _)| n != "depth");
            one.headers.push(("depth".into(), "0".into()));
            // A provider that does not answer in time is left out.
            let answer = tokio::time::timeout(
                SHARED_LISTING_TIMEOUT,
                self.shares
                    .forward(kind, &route.owner, &route.name, "", &base, &one),
            )
            .await;
            if let Ok(answer) = answer
                && answer.status == 207
            {
                out.push_str(&responses_under(&answer.body, &base));
            }
        }
        out
    }
}

/// How long a home listing waits for each collection shared with the owner.
const SHARED_LISTING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Puts `extra` responses before the multistatus's closing tag.
fn splice(body: &mut Vec<u8>, extra: &str) {
    if extra.is_empty() {
        return;
    }
    let close = b"</D:multistatus>";
    if let Some(at) = body.windows(close.len()).rposition(|w| w == close) {
        body.splice(at..at, extra.bytes());
    }
}

/// Reads and drops the rest of a refused body (up to [`DRAIN_LIMIT`] bytes
/// and [`DRAIN_TIME`]), so the client reads the refusal instead of a
/// reset stream.
async fn drain(mut body: Incoming) {
    let mut seen = 0usize;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                seen += data.len();
                if seen > DRAIN_LIMIT {
                    break;
                }
            }
        }
    })
    .await;
}

const DRAIN_LIMIT: usize = 64 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(30);

fn too_large(path: &str, limit: usize) -> Response {
    let ns = if path.starts_with("/addressbooks/") {
        crate::xml::CARDDAV
    } else {
        crate::xml::CALDAV
    };
    let r = Response::precondition(413, ns, "max-resource-size", "");
    granary_sdk::log::info(&format!("refused a body over {limit} bytes for {path}"));
    r
}
