//! Collections shared between users, through grants.
//!
//! The provider (Alice's grain) offers `dav.calendar.read:<name>` (or
//! `.write`, or the same for address books) as a `DavCollection` bound to
//! that one collection: every request names an object of it or nothing,
//! and runs through the same code as Alice's own requests, with hrefs under
//! the `base` the holder gives and writes refused unless granted.
//!
//! The holder (Bob's grain) lists its grants (`Host.grants`) whenever a
//! client looks at a home, so a shared collection appears as
//! `<owner>~<name>` while the grant lives and is gone at the next sync
//! after it is revoked; requests under it are forwarded through the
//! membrane. Sync tokens are the provider's own, so they survive restarts
//! on both sides.

use std::cell::RefCell;
use std::collections::HashMap;

use granary_sdk::services_capnp::dav_collection;
use granary_sdk::{GrainRef, Host};

use crate::dav::{Dav, Request, Response, Scope};
use crate::props::Viewer;
use crate::store::Kind;

/// What a descriptor grants: kind, collection name, writable.
pub fn parse_descriptor(descriptor: &str) -> Option<(Kind, String, bool)> {
    let (interface, name) = descriptor.split_once(':')?;
    let (kind, writable) = match interface {
        "dav.calendar.read" => (Kind::Calendar, false),
        "dav.calendar.write" => (Kind::Calendar, true),
        "dav.addressbook.read" => (Kind::AddressBook, false),
        "dav.addressbook.write" => (Kind::AddressBook, true),
        _ => return None,
    };
    (!name.is_empty()).then(|| (kind, name.to_owned(), writable))
}

/// The provider's side: one collection offered to another user's grain.
pub struct Offered {
    pub dav: std::sync::Arc<Dav>,
    pub kind: Kind,
    pub name: String,
    pub writable: bool,
    /// Who holds it: their principal appears in the answers.
    pub holder: GrainRef,
    /// The collection's incarnation when it was offered: one deleted and
    /// made again under the same name is another collection, which this
    /// grant never named.
    pub incarnation: String,
}

impl Offered {
    fn collection(&self) -> Result<crate::store::Collection, capnp::Error> {
        self.dav
            .store
            .collection(self.kind, &self.name)
            .map_err(failed)?
            .filter(|c| c.incarnation == self.incarnation)
            .ok_or_else(|| {
                failed(format!(
                    "{} {} no longer exists",
                    self.kind.as_str(),
                    self.name
                ))
            })
    }
}

fn failed(e: impl std::fmt::Display) -> capnp::Error {
    capnp::Error::failed(e.to_string())
}

impl dav_collection::Server for Offered {
    async fn info(
        self: capnp::capability::Rc<Self>,
        _: dav_collection::InfoParams,
        mut results: dav_collection::InfoResults,
    ) -> Result<(), capnp::Error> {
        let c = self.collection()?;
        let mut out = results.get().init_collection();
        out.set_kind(self.kind.as_str());
        out.set_display_name(if c.display_name.is_empty() {
            &c.name
        } else {
            &c.display_name
        });
        out.set_color(&c.color);
        out.set_description(&c.description);
        out.set_writable(self.writable);
        out.set_sync_token(c.sync_token());
        let mut comps = out.init_components(c.components.len() as u32);
        for (i, comp) in c.components.iter().enumerate() {
            comps.set(i as u32, comp);
        }
        Ok(())
    }

    async fn request(
        self: capnp::capability::Rc<Self>,
        params: dav_collection::RequestParams,
        mut results: dav_collection::RequestResults,
    ) -> Result<(), capnp::Error> {
        self.collection()?;
        let r = params.get()?.get_request()?;
        let method = r.get_method()?.to_string()?;
        let object = r.get_path()?.to_string()?;
        let base = r.get_base()?.to_string()?;
        if object.contains('/') || object == "." || object == ".." {
            return Err(failed("a shared collection holds only objects"));
        }
        if !base.starts_with('/') || !base.ends_with('/') || base.len() > 1024 {
            return Err(failed("the base must be an absolute collection path"));
        }
        let mut headers = Vec::new();
        for h in r.get_headers()?.iter() {
            headers.push((
                h.get_name()?.to_string()?.to_ascii_lowercase(),
                h.get_value()?.to_string()?,
            ));
        }
        let req = Request {
            method,
            path: format!("{base}{}", crate::paths::encode(&object)),
            headers,
            body: r.get_body()?.to_vec(),
        };
        let scope = Scope {
            viewer: Viewer {
                user: &self.holder.owner,
                domain: "",
            },
            base: &base,
            writable: self.writable,
            shared: true,
        };
        let object = (!object.is_empty()).then_some(object.as_str());
        let response = self
            .dav
            .on_collection(self.kind, &self.name, object, &scope, req)
            .await;
        let mut out = results.get().init_response();
        out.set_status(response.status);
        out.set_body(&response.body);
        let mut hs = out.init_headers(response.headers.len() as u32);
        for (i, (n, v)) in response.headers.iter().enumerate() {
            let mut h = hs.reborrow().get(i as u32);
            h.set_name(n);
            h.set_value(v);
        }
        Ok(())
    }
}

/// A collection someone shared with this grain's owner.
#[derive(Debug, Clone)]
pub struct SharedRoute {
    pub owner: String,
    pub name: String,
    pub kind: Kind,
    pub writable: bool,
    pub descriptor: String,
    pub provider: String,
}

/// The holder's side: which collections are shared with the owner, and
/// the capabilities to reach them (kept while they work).
pub struct Shares {
    host: Host,
    caps: RefCell<HashMap<String, dav_collection::Client>>,
}

/// Request headers a shared collection needs.
const FORWARDED: &[&str] = &[
    "depth",
    "if-match",
    "if-none-match",
    "content-type",
    "prefer",
    "brief",
];

impl Shares {
    pub fn new(host: Host) -> Shares {
        Shares {
            host,
            caps: RefCell::new(HashMap::new()),
        }
    }

    /// The collections of `kind` shared with the owner now (the write
    /// grant wins over a read one of the same collection).
    pub async fn list(&self, kind: Kind) -> Vec<SharedRoute> {
        let routes = match self.host.grants().await {
            Ok(r) => r,
            Err(e) => {
                granary_sdk::log::warn(&format!("cannot list grants: {e}"));
                return Vec::new();
            }
        };
        let mut out: Vec<SharedRoute> = Vec::new();
        for r in routes {
            if r.provider.kind != "dav" {
                continue;
            }
            let Some((k, name, writable)) = parse_descriptor(&r.descriptor) else {
                continue;
            };
            if k != kind || name.contains('~') || r.provider.owner.contains('~') {
                continue;
            }
            let route = SharedRoute {
                owner: r.provider.owner.clone(),
                name,
                kind: k,
                writable,
                descriptor: r.descriptor.clone(),
                provider: r.provider.id.clone(),
            };
            match out
                .iter_mut()
                .find(|s| s.owner == route.owner && s.name == route.name)
            {
                Some(s) if route.writable && !s.writable => *s = route,
                Some(_) => {}
                None => out.push(route),
            }
        }
        out
    }

    async fn cap(&self, route: &SharedRoute) -> Result<dav_collection::Client, capnp::Error> {
        let key = format!("{}\n{}", route.provider, route.descriptor);
        if let Some(c) = self.caps.borrow().get(&key) {
            return Ok(c.clone());
        }
        let cap = self
            .host
            .request_from(&route.descriptor, &route.provider)
            .await?;
        let client: dav_collection::Client = capnp::capability::FromClientHook::new(cap.hook);
        self.caps.borrow_mut().insert(key, client.clone());
        Ok(client)
    }

    fn forget(&self, route: &SharedRoute) {
        self.caps
            .borrow_mut()
            .remove(&format!("{}\n{}", route.provider, route.descriptor));
    }

    /// Forwards a request on a shared collection (`object` empty for the
    /// collection itself); 404 when nothing is shared under that name.
    pub async fn forward(
        &self,
        kind: Kind,
        owner: &str,
        name: &str,
        object: &str,
        base: &str,
        req: &Request,
    ) -> Response {
        let routes = self.list(kind).await;
        let Some(route) = routes.iter().find(|r| r.owner == owner && r.name == name) else {
            return Response::text(404, format!("nothing is shared with you as {owner}~{name}"));
        };
        for attempt in 0..2 {
            let cap = match self.cap(route).await {
                Ok(c) => c,
                Err(e) => return unreachable(route, e),
            };
            let mut call = cap.request_request();
            {
                let mut r = call.get().init_request();
                r.set_method(&req.method);
                r.set_path(object);
                r.set_base(base);
                r.set_body(&req.body);
                let headers: Vec<_> = req
                    .headers
                    .iter()
                    .filter(|(n, _)| FORWARDED.contains(&n.as_str()))
                    .collect();
                let mut hs = r.init_headers(headers.len() as u32);
                for (i, (n, v)) in headers.iter().enumerate() {
                    let mut h = hs.reborrow().get(i as u32);
                    h.set_name(n);
                    h.set_value(v);
                }
            }
            match call.send().promise.await {
                Ok(answer) => {
                    return response_of(answer, kind, base)
                        .unwrap_or_else(|e| unreachable(route, e));
                }
                // Only what is safe to repeat is asked again (a lost reply
                // to a PUT may have been a success).
                Err(e) if attempt == 0 && idempotent(&req.method) => {
                    // A stale capability (the provider restarted, the grant
                    // was revoked and made again): ask once more.
                    granary_sdk::log::info(&format!("shared {owner}~{name}: {e}; asking again"));
                    self.forget(route);
                }
                Err(e) => {
                    self.forget(route);
                    return unreachable(route, e);
                }
            }
        }
        Response::text(502, "unreachable")
    }
}

fn unreachable(route: &SharedRoute, e: capnp::Error) -> Response {
    let text = granary_sdk::message(&e).to_owned();
    if text.contains("revoked") || text.contains("no grant") {
        return Response::text(
            404,
            format!(
                "{}~{} is no longer shared with you",
                route.owner, route.name
            ),
        );
    }
    granary_sdk::log::warn(&format!(
        "shared {}~{} unreachable: {text}",
        route.owner, route.name
    ));
    Response::text(
        502,
        format!("{}'s calendars cannot be reached now", route.owner),
    )
}

fn idempotent(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS" | "PROPFIND" | "REPORT")
}

/// The provider's answer, rebuilt for the holder's client: the status only
/// if it is a final one, the ETag, DAV and Allow headers only if they are
/// plain, the content type set here (never the provider's), and a
/// multistatus re-read and kept to what lies under `base`.
fn response_of(
    answer: capnp::capability::Response<dav_collection::request_results::Owned>,
    kind: Kind,
    base: &str,
) -> Result<Response, capnp::Error> {
    let r = answer.get()?.get_response()?;
    let status = r.get_status();
    if !(200..600).contains(&status) {
        return Ok(Response::text(
            502,
            "the shared collection's owner answered wrongly",
        ));
    }
    let mut out = Response::new(status);
    for h in r.get_headers()?.iter() {
        let name = h.get_name()?.to_string()?.to_ascii_lowercase();
        let value = h.get_value()?.to_string()?;
        let plain = value.len() <= 200 && value.bytes().all(|b| (0x20..0x7f).contains(&b));
        if plain && matches!(name.as_str(), "etag" | "dav" | "allow") {
            out.headers.push((name, value));
        }
    }
    let body = r.get_body()?;
    if status == 207 {
        let Some(rebuilt) = multistatus_under(body, base) else {
            return Ok(Response::text(
                502,
                "the shared collection's owner answered wrongly",
            ));
        };
        return Ok(Response::xml(207, rebuilt));
    }
    let content_type = if body.first() == Some(&b'<') {
        "application/xml; charset=utf-8"
    } else if status == 200 {
        kind.content_type()
    } else {
        "text/plain; charset=utf-8"
    };
    out.headers
        .push(("content-type".into(), content_type.into()));
    out.body = body.to_vec();
    Ok(out)
}

/// Whether `href` names `base` or something inside it, segment by segment
/// (so `base/../other/` is not inside).
fn inside(href: &str, base: &str) -> bool {
    let (Ok((h, _)), Ok((b, _))) = (crate::paths::segments(href), crate::paths::segments(base))
    else {
        return false;
    };
    h.len() >= b.len() && h[..b.len()] == b[..] && h.len() <= b.len() + 1
}

/// A provider's multistatus, re-read by our parser and written again by
/// our writer with only the responses under `base` and its sync token.
fn multistatus_under(body: &[u8], base: &str) -> Option<Vec<u8>> {
    let root = crate::xml::parse_with(body, crate::xml::ANSWER).ok()?;
    if !root.is(crate::xml::DAV, "multistatus") {
        return None;
    }
    let responses = responses_of(&root, base);
    let extra = root
        .child(crate::xml::DAV, "sync-token")
        .map(|t| {
            format!(
                "<D:sync-token>{}</D:sync-token>",
                crate::xml::escape(&t.text)
            )
        })
        .unwrap_or_default();
    Some(crate::props::multistatus(&responses, &extra))
}

fn responses_of(root: &crate::xml::Element, base: &str) -> String {
    let mut out = String::new();
    for r in root.children_named(crate::xml::DAV, "response") {
        let ok = r
            .children_named(crate::xml::DAV, "href")
            .all(|h| inside(&h.text, base))
            && r.child(crate::xml::DAV, "href").is_some();
        if ok {
            out.push_str(&r.to_xml());
        }
    }
    out
}

/// The `<D:response>` elements of a provider's multistatus whose hrefs lie
/// under `base` (segment by segment), re-serialised by our own writer (a
/// provider's answer is not trusted to be well-formed or to stay inside
/// its collection).
pub fn responses_under(body: &[u8], base: &str) -> String {
    match crate::xml::parse_with(body, crate::xml::ANSWER) {
        Ok(root) => responses_of(&root, base),
        Err(_) => String::new(),
    }
}
