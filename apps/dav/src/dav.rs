//! The WebDAV methods over the owner's collections: requests and answers
//! as plain values, so the same code serves the owner's own client (over
//! HTTP) and another user's grain that was granted one collection (over
//! `DavCollection`).

use std::sync::Arc;

use crate::filter::{self, CalendarData, Refusal};
use crate::ical;
use crate::paths::{self, CollectionRef, PathError, Target};
use crate::props::{self, MAX_RESOURCE, Resource, Viewer, Wanted};
use crate::store::{
    self, Collection, Kind, LiveProp, NewCollection, Preconditions, Store, StoreError,
};
use crate::xml::{self, CALDAV, CARDDAV, DAV, Element, ICAL};

/// A request, its body read whole (bounded by the caller).
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn text(status: u16, text: impl Into<String>) -> Response {
        let mut r = Response::new(status);
        r.headers
            .push(("content-type".into(), "text/plain; charset=utf-8".into()));
        r.body = format!("{}\n", text.into()).into_bytes();
        r
    }

    pub fn xml(status: u16, body: Vec<u8>) -> Response {
        let mut r = Response::new(status);
        r.headers.push((
            "content-type".into(),
            "application/xml; charset=utf-8".into(),
        ));
        r.body = body;
        r
    }

    pub fn precondition(status: u16, ns: &str, name: &str, inner: &str) -> Response {
        Response::xml(status, props::error_body(ns, name, inner))
    }

    fn refused(r: Refusal) -> Response {
        Response::precondition(403, r.ns, r.precondition, &xml::escape(&r.reason))
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Response {
        self.headers.push((name.into(), value.into()));
        self
    }
}

fn server_error(e: impl std::fmt::Display) -> Response {
    granary_sdk::log::warn(&format!("dav: {e}"));
    Response::text(500, "the calendar store failed; nothing was changed")
}

/// How a request reaches one collection: whose principal the viewer is,
/// the collection's href as the viewer's client sees it, and whether the
/// viewer may write.
pub struct Scope<'a> {
    pub viewer: Viewer<'a>,
    pub base: &'a str,
    pub writable: bool,
    pub shared: bool,
}

pub const DAV_HEADER: &str = "1, 3, calendar-access, addressbook, extended-mkcol";
pub const ALLOW: &str =
    "OPTIONS, GET, HEAD, PUT, DELETE, PROPFIND, PROPPATCH, REPORT, MKCOL, MKCALENDAR";

pub fn options() -> Response {
    Response::new(200)
        .header("dav", DAV_HEADER)
        .header("allow", ALLOW)
        .header("content-length", "0")
}

/// Depth 0 or 1; infinity (stated or by omission) is refused.
fn depth(req: &Request) -> Result<u8, Response> {
    match req.header("depth").map(str::trim) {
        Some("0") => Ok(0),
        Some("1") => Ok(1),
        _ => Err(Response::precondition(
            403,
            DAV,
            "propfind-finite-depth",
            "",
        )),
    }
}

fn parse_body(req: &Request) -> Result<Option<Element>, Response> {
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    xml::parse(&req.body)
        .map(Some)
        .map_err(|e| Response::text(400, format!("the request body is not accepted: {e}")))
}

fn wanted(body: Option<&Element>) -> Result<Wanted, Response> {
    let Some(b) = body else {
        return Ok(Wanted::AllProp);
    };
    if !b.is(DAV, "propfind") {
        return Err(Response::text(400, "a PROPFIND body must be DAV:propfind"));
    }
    if b.child(DAV, "propname").is_some() {
        return Ok(Wanted::PropName);
    }
    if b.child(DAV, "prop").is_some() {
        return Ok(Wanted::Props(filter::requested_props(b)));
    }
    Ok(Wanted::AllProp)
}

/// A PROPFIND's depth and what it asks for.
fn propfind_request(req: &Request) -> Result<(u8, Wanted), Response> {
    let depth = depth(req)?;
    let body = parse_body(req)?;
    Ok((depth, wanted(body.as_ref())?))
}

fn preconditions(req: &Request) -> Preconditions {
    let list = |v: &str| -> Vec<String> { v.split(',').map(|t| t.trim().to_owned()).collect() };
    Preconditions {
        if_match: req.header("if-match").map(list),
        if_none_match: req.header("if-none-match").map(list),
    }
}

/// The dead-property key of a resource.
fn dead_path(c: &Collection, object: Option<&str>) -> String {
    format!(
        "{}/{}/{}",
        c.kind.home_segment(),
        c.name,
        object.unwrap_or("")
    )
}

/// The object name an href in a multiget names inside `base`, if it does.
fn href_in(href: &str, base: &str) -> Option<String> {
    let path = match href.find("://") {
        Some(i) => {
            let rest = &href[i + 3..];
            &rest[rest.find('/')?..]
        }
        None => href,
    };
    let (segs, _) = paths::segments(path).ok()?;
    let (base_segs, _) = paths::segments(base).ok()?;
    (segs.len() == base_segs.len() + 1 && segs[..base_segs.len()] == base_segs[..])
        .then(|| segs[base_segs.len()].clone())
}

/// Dead properties by object name.
type DeadProps = std::collections::HashMap<String, Vec<(String, String)>>;

/// One multistatus answer's shared context (`Dav::listing`).
struct Listing<'a> {
    c: &'a Collection,
    scope: &'a Scope<'a>,
    wanted: &'a Wanted,
    shape: CalendarData,
    dead: DeadProps,
}

/// The owner's side: everything a request path may name.
pub struct Dav {
    pub store: Arc<Store>,
    pub owner: String,
}

impl Dav {
    fn viewer<'a>(&'a self, domain: &'a str) -> Viewer<'a> {
        Viewer {
            user: &self.owner,
            domain,
        }
    }

    /// Serves a request of the owner's on something of their own (shared
    /// collections are the caller's: `None` means "forward it").
    pub async fn handle(self: &Arc<Self>, req: Request, domain: &str) -> Option<Response> {
        let target = match paths::resolve(&req.path, &self.owner) {
            Ok(t) => t,
            Err(PathError::Invalid) => return Some(Response::text(400, "invalid path")),
            // Making something under a parent that does not exist is a
            // conflict (RFC 4918 §9.3.1, §9.7.1), not a 404.
            Err(PathError::NotFound)
                if matches!(req.method.as_str(), "MKCOL" | "MKCALENDAR" | "PUT") =>
            {
                return Some(Response::text(
                    409,
                    format!("no parent collection for {}", req.path),
                ));
            }
            Err(PathError::NotFound) => {
                return Some(Response::text(404, format!("nothing at {}", req.path)));
            }
        };
        if req.method == "OPTIONS" {
            return Some(options());
        }
        let xml_body = req.header("content-type").is_none_or(|t| {
            let t = t.to_ascii_lowercase();
            t.starts_with("application/xml") || t.starts_with("text/xml")
        });
        if req.method == "MKCOL" && !xml_body && !req.body.is_empty() {
            // RFC 4918 §9.3: a body we do not understand.
            return Some(Response::text(
                415,
                "MKCOL takes an XML body (RFC 5689) or none",
            ));
        }
        let viewer = self.viewer(domain);
        Some(match &target {
            Target::Collection(_, CollectionRef::Shared { .. })
            | Target::Object(_, CollectionRef::Shared { .. }, _) => return None,
            Target::Root | Target::PrincipalsRoot | Target::Principal | Target::Home(_) => {
                self.on_fixed(&target, &req, &viewer).await
            }
            Target::Collection(kind, CollectionRef::Own(name)) => {
                let base = paths::href(&self.owner, &target);
                let scope = Scope {
                    viewer,
                    base: &base,
                    writable: true,
                    shared: false,
                };
                if matches!(req.method.as_str(), "MKCOL" | "MKCALENDAR") {
                    self.make_collection(*kind, name, &req).await
                } else {
                    self.on_collection(*kind, name, None, &scope, req).await
                }
            }
            Target::Object(kind, CollectionRef::Own(name), object) => {
                let base = paths::href(
                    &self.owner,
                    &Target::Collection(*kind, CollectionRef::Own(name.clone())),
                );
                let scope = Scope {
                    viewer,
                    base: &base,
                    writable: true,
                    shared: false,
                };
                self.on_collection(*kind, name, Some(object), &scope, req)
                    .await
            }
        })
    }

    /// The root, the principal and the homes.
    async fn on_fixed(&self, target: &Target, req: &Request, viewer: &Viewer<'_>) -> Response {
        let resource = match target {
            Target::Root => Resource::Root,
            Target::PrincipalsRoot => Resource::PrincipalsRoot,
            Target::Principal => Resource::Principal,
            Target::Home(k) => Resource::Home(*k),
            _ => unreachable!("on_fixed takes fixed targets"),
        };
        match req.method.as_str() {
            "PROPFIND" => {
                let (depth, wanted) = match propfind_request(req) {
                    Ok(p) => p,
                    Err(r) => return r,
                };
                let href = paths::href(&self.owner, target);
                let mut out = props::response(&href, &resource, viewer, &wanted, &[]);
                if depth == 1
                    && let Target::Home(kind) = target
                {
                    let collections = match self.store.collections(*kind) {
                        Ok(c) => c,
                        Err(e) => return server_error(e),
                    };
                    for c in &collections {
                        let r = Resource::Collection {
                            c,
                            writable: true,
                            shared: false,
                        };
                        let dead = self
                            .store
                            .dead_props(&dead_path(c, None))
                            .unwrap_or_default();
                        let h = paths::href(
                            &self.owner,
                            &Target::Collection(*kind, CollectionRef::Own(c.name.clone())),
                        );
                        out.push_str(&props::response(&h, &r, viewer, &wanted, &dead));
                    }
                }
                Response::xml(207, props::multistatus(&out, ""))
            }
            "GET" | "HEAD" => Response::text(
                200,
                format!(
                    "This is {}'s calendars and contacts. Point a CalDAV or CardDAV client \
                     (DAVx5, Thunderbird, Apple Calendar) at https://dav.{}/ and log in with \
                     an app password of kind dav.",
                    self.owner, viewer.domain
                ),
            ),
            "PROPPATCH" | "PUT" | "DELETE" | "MKCOL" | "MKCALENDAR" => Response::text(
                403,
                "this resource cannot be changed; make collections inside your home",
            ),
            "REPORT" => Response::precondition(403, DAV, "supported-report", ""),
            _ => Response::text(405, format!("{} is not allowed here", req.method))
                .header("allow", "OPTIONS, GET, HEAD, PROPFIND, REPORT"),
        }
    }

    /// MKCALENDAR (RFC 4791 §5.3.1) or MKCOL, extended (RFC 5689) or
    /// plain (which makes a collection of the home's kind).
    async fn make_collection(&self, home: Kind, name: &str, req: &Request) -> Response {
        if !paths::valid_collection_name(name) {
            return Response::text(
                403,
                "collection names may not start with '.' or contain '~'",
            );
        }
        let body = match parse_body(req) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let mut new = NewCollection::default();
        let mut kind = home;
        let mut unsupported = Vec::new();
        if let Some(b) = &body {
            let ok_root = if req.method == "MKCALENDAR" {
                b.is(CALDAV, "mkcalendar")
            } else {
                b.is(DAV, "mkcol")
            };
            if !ok_root {
                return Response::text(400, format!("unexpected body for {}", req.method));
            }
            for set in b.children_named(DAV, "set") {
                for prop in set.children_named(DAV, "prop") {
                    for p in &prop.children {
                        match (p.ns.as_str(), p.name.as_str()) {
                            (DAV, "displayname") => new.display_name = p.text.clone(),
                            (CALDAV, "calendar-description")
                            | (CARDDAV, "addressbook-description") => {
                                new.description = p.text.clone()
                            }
                            (ICAL, "calendar-color") => new.color = p.text.clone(),
                            (CALDAV, "supported-calendar-component-set") => {
                                new.components = p
                                    .children_named(CALDAV, "comp")
                                    .filter_map(|c| c.attr("name"))
                                    .map(str::to_ascii_uppercase)
                                    .collect();
                            }
                            (DAV, "resourcetype") => {
                                if p.child(CARDDAV, "addressbook").is_some() {
                                    kind = Kind::AddressBook;
                                } else if p.child(CALDAV, "calendar").is_some() {
                                    kind = Kind::Calendar;
                                } else {
                                    unsupported.push(p.key());
                                }
                            }
                            (CALDAV, "calendar-timezone") | (ICAL, "calendar-order") => {}
                            _ => unsupported.push(p.key()),
                        }
                    }
                }
            }
        }
        if req.method == "MKCALENDAR" {
            kind = Kind::Calendar;
        }
        if kind != home {
            return Response::text(
                403,
                format!(
                    "a {} belongs in the {} home",
                    kind.as_str(),
                    kind.home_segment()
                ),
            );
        }
        if !unsupported.is_empty() {
            return Response::xml(
                403,
                props::multistatus(
                    "",
                    &format!(
                        "<D:responsedescription>not settable here: {}</D:responsedescription>",
                        xml::escape(&unsupported.join(", "))
                    ),
                ),
            );
        }
        if kind == Kind::Calendar {
            let allowed = ["VEVENT", "VTODO", "VJOURNAL", "VFREEBUSY"];
            if new
                .components
                .iter()
                .any(|c| !allowed.contains(&c.as_str()))
            {
                return Response::precondition(403, CALDAV, "supported-calendar-component", "");
            }
            if new.components.is_empty() {
                new.components = vec!["VEVENT".into(), "VTODO".into(), "VJOURNAL".into()];
            }
        }
        let store = self.store.clone();
        let name = name.to_owned();
        match blocking(move || store.create_collection(kind, &name, &new)).await {
            Ok(_) => Response::new(201).header("content-length", "0"),
            Err(StoreError::Exists(_)) => {
                Response::text(405, "a collection of that name exists already")
            }
            Err(e) => server_error(e),
        }
    }

    /// Everything on one collection or an object in it.
    pub async fn on_collection(
        self: &Arc<Self>,
        kind: Kind,
        name: &str,
        object: Option<&str>,
        scope: &Scope<'_>,
        req: Request,
    ) -> Response {
        let c = match self.store.collection(kind, name) {
            Ok(Some(c)) => c,
            Ok(None) if req.method == "PUT" => {
                return Response::text(409, "the collection does not exist");
            }
            Ok(None) => return Response::text(404, format!("no collection {name}")),
            Err(e) => return server_error(e),
        };
        let write = matches!(
            req.method.as_str(),
            "PUT" | "DELETE" | "PROPPATCH" | "MKCOL" | "MKCALENDAR" | "MOVE" | "COPY"
        );
        if write && !scope.writable {
            return Response::precondition(
                403,
                DAV,
                "need-privileges",
                &format!(
                    "<D:resource><D:href>{}</D:href><D:privilege><D:write/></D:privilege></D:resource>",
                    xml::escape(scope.base)
                ),
            );
        }
        match (req.method.as_str(), object) {
            ("OPTIONS", _) => options(),
            ("PROPFIND" | "REPORT", _) | ("GET" | "HEAD", Some(_)) => {
                self.read_off_loop(c, object, scope, req).await
            }
            ("PROPPATCH", _) => self.proppatch(&c, object, scope, &req).await,
            ("GET" | "HEAD", None) => Response::text(
                200,
                format!("{} {} ({})", c.kind.as_str(), c.name, c.display_name),
            ),
            ("PUT", Some(o)) => self.put(&c, o, req).await,
            ("DELETE", Some(o)) => {
                let store = self.store.clone();
                let (pre, o, c2) = (preconditions(&req), o.to_owned(), c.clone());
                match blocking(move || store.delete(&c2, &o, &pre)).await {
                    Ok(true) => Response::new(204),
                    Ok(false) => Response::text(404, "no such object"),
                    Err(StoreError::Precondition) => Response::text(412, "precondition failed"),
                    Err(e) => server_error(e),
                }
            }
            ("DELETE", None) if !scope.shared => {
                let store = self.store.clone();
                match blocking(move || store.delete_collection(&c)).await {
                    Ok(()) => Response::new(204),
                    Err(e) => server_error(e),
                }
            }
            ("DELETE", None) => Response::text(403, "a shared collection is deleted by its owner"),
            ("MKCOL" | "MKCALENDAR", None) => {
                Response::text(405, "a collection of that name exists already")
            }
            // RFC 4791 §4.2: no collection inside a calendar (nor, here,
            // inside an address book).
            ("MKCOL" | "MKCALENDAR", Some(_)) => Response::text(
                403,
                "calendars and address books hold objects, not collections",
            ),
            ("PUT", None) => Response::text(405, "PUT an object into the collection instead"),
            ("MOVE" | "COPY", _) => Response::text(501, format!("{} is not supported", req.method)),
            (m, _) => {
                Response::text(405, format!("{m} is not allowed here")).header("allow", ALLOW)
            }
        }
    }

    /// PROPFIND, REPORT and GET on the blocking pool: they read files and
    /// parse calendars, and the grain's one event-loop thread must keep
    /// serving everyone else meanwhile.
    async fn read_off_loop(
        self: &Arc<Self>,
        c: Collection,
        object: Option<&str>,
        scope: &Scope<'_>,
        req: Request,
    ) -> Response {
        let dav = self.clone();
        let object = object.map(str::to_owned);
        let (user, domain, base) = (
            scope.viewer.user.to_owned(),
            scope.viewer.domain.to_owned(),
            scope.base.to_owned(),
        );
        let (writable, shared) = (scope.writable, scope.shared);
        let answer = tokio::task::spawn_blocking(move || {
            let scope = Scope {
                viewer: Viewer {
                    user: &user,
                    domain: &domain,
                },
                base: &base,
                writable,
                shared,
            };
            match (req.method.as_str(), object.as_deref()) {
                ("PROPFIND", o) => dav.propfind(&c, o, &scope, &req),
                ("REPORT", _) => dav.report(&c, &scope, &req),
                (_, Some(o)) => dav.get(&c, o, &req),
                (_, None) => Response::text(405, "not here"),
            }
        })
        .await;
        answer.unwrap_or_else(server_error)
    }

    fn propfind(
        &self,
        c: &Collection,
        object: Option<&str>,
        scope: &Scope<'_>,
        req: &Request,
    ) -> Response {
        let (depth, wanted) = match propfind_request(req) {
            Ok(p) => p,
            Err(r) => return r,
        };
        let l = self.listing(c, scope, &wanted, CalendarData::AsIs);
        let mut out = String::new();
        match object {
            Some(name) => {
                let o = match self.store.object(c, name) {
                    Ok(Some(o)) => o,
                    Ok(None) => return Response::text(404, "no such object"),
                    Err(e) => return server_error(e),
                };
                out.push_str(&self.object_response(&l, &o, None));
            }
            None => {
                let r = Resource::Collection {
                    c,
                    writable: scope.writable,
                    shared: scope.shared,
                };
                let own = self
                    .store
                    .dead_props(&dead_path(c, None))
                    .unwrap_or_default();
                out.push_str(&props::response(
                    scope.base,
                    &r,
                    &scope.viewer,
                    &wanted,
                    &own,
                ));
                if depth == 1 {
                    let objects = match self.store.objects(c) {
                        Ok(o) => o,
                        Err(e) => return server_error(e),
                    };
                    for o in &objects {
                        out.push_str(&self.object_response(&l, o, None));
                    }
                }
            }
        }
        Response::xml(207, props::multistatus(&out, ""))
    }

    /// The content of an object a REPORT listed; `None` when it was deleted
    /// since (it is then not part of the answer).
    fn listed_content(
        &self,
        c: &Collection,
        o: &store::Object,
    ) -> Result<Option<Vec<u8>>, Response> {
        match self.store.read(c, o) {
            Ok(d) => Ok(Some(d)),
            Err(StoreError::Gone) => Ok(None),
            Err(e) => Err(server_error(e)),
        }
    }

    /// What every `<D:response>` of one answer shares, with the
    /// collection's dead properties read once.
    fn listing<'a>(
        &self,
        c: &'a Collection,
        scope: &'a Scope<'a>,
        wanted: &'a Wanted,
        shape: CalendarData,
    ) -> Listing<'a> {
        Listing {
            c,
            scope,
            wanted,
            shape,
            dead: self
                .store
                .dead_props_under(&dead_path(c, None))
                .unwrap_or_default(),
        }
    }

    /// One object's `<D:response>`. Its content is read only when asked
    /// for, and not again when the caller has it (`content`) already.
    fn object_response(
        &self,
        l: &Listing<'_>,
        o: &store::Object,
        content: Option<Vec<u8>>,
    ) -> String {
        let href = format!("{}{}", l.scope.base, paths::encode(&o.name));
        let needs_data = matches!(l.wanted, Wanted::Props(list) if list.iter().any(|(ns, n)| {
            (ns == CALDAV && n == "calendar-data") || (ns == CARDDAV && n == "address-data")
        }));
        let data = if needs_data {
            let read = match content {
                Some(d) => Ok(d),
                None => self.store.read(l.c, o),
            };
            match read {
                Ok(d) => {
                    let text = String::from_utf8_lossy(&d).into_owned();
                    Some(match l.shape {
                        CalendarData::AsIs => text,
                        CalendarData::Expand(r) => ical::expand(&text, r),
                        CalendarData::LimitRecurrence(r) => ical::limit_recurrence(&text, r),
                    })
                }
                Err(StoreError::Gone) => return props::status_response(&href, "404 Not Found"),
                Err(_) => return props::status_response(&href, "500 Internal Server Error"),
            }
        } else {
            None
        };
        let dead = l.dead.get(&o.name).map(Vec::as_slice).unwrap_or(&[]);
        let r = Resource::Object {
            c: l.c,
            o,
            data: data.as_deref(),
            writable: l.scope.writable,
        };
        props::response(&href, &r, &l.scope.viewer, l.wanted, dead)
    }

    async fn proppatch(
        &self,
        c: &Collection,
        object: Option<&str>,
        scope: &Scope<'_>,
        req: &Request,
    ) -> Response {
        let body = match parse_body(req) {
            Ok(Some(b)) if b.is(DAV, "propertyupdate") => b,
            Ok(_) => return Response::text(400, "PROPPATCH needs a DAV:propertyupdate body"),
            Err(r) => return r,
        };
        if let Some(o) = object {
            match self.store.object(c, o) {
                Ok(Some(_)) => {}
                Ok(None) => return Response::text(404, "no such object"),
                Err(e) => return server_error(e),
            }
        }
        // Every instruction, in order; all succeed or none is applied.
        let mut live: Vec<(LiveProp, String)> = Vec::new();
        let mut dead: Vec<(String, Option<String>)> = Vec::new();
        let mut results: Vec<(String, String, &'static str)> = Vec::new();
        let mut failed = false;
        for instruction in &body.children {
            let set = match (instruction.ns.as_str(), instruction.name.as_str()) {
                (DAV, "set") => true,
                (DAV, "remove") => false,
                _ => continue,
            };
            for prop in instruction.children_named(DAV, "prop") {
                for p in &prop.children {
                    let value = if set { p.text.clone() } else { String::new() };
                    let livep = match (p.ns.as_str(), p.name.as_str(), object) {
                        (DAV, "displayname", None) => Some(LiveProp::DisplayName),
                        (ICAL, "calendar-color", None) if c.kind == Kind::Calendar => {
                            Some(LiveProp::Color)
                        }
                        (CALDAV, "calendar-description", None) if c.kind == Kind::Calendar => {
                            Some(LiveProp::Description)
                        }
                        (CARDDAV, "addressbook-description", None)
                            if c.kind == Kind::AddressBook =>
                        {
                            Some(LiveProp::Description)
                        }
                        _ => None,
                    };
                    if let Some(lp) = livep {
                        live.push((lp, value));
                        results.push((p.ns.clone(), p.name.clone(), "200 OK"));
                    } else if props::protected(&p.ns, &p.name) {
                        failed = true;
                        results.push((p.ns.clone(), p.name.clone(), "403 Forbidden"));
                    } else {
                        dead.push((p.key(), set.then(|| p.to_xml())));
                        results.push((p.ns.clone(), p.name.clone(), "200 OK"));
                    }
                }
            }
        }
        if !failed {
            let store = self.store.clone();
            let (c2, path) = (c.clone(), dead_path(c, object));
            let applied = blocking(move || store.proppatch(&c2, &live, &path, &dead)).await;
            if let Err(e) = applied {
                return server_error(e);
            }
        }
        let mut propstats = String::new();
        for (ns, name, status) in &results {
            let status = if failed && *status == "200 OK" {
                "424 Failed Dependency"
            } else {
                status
            };
            propstats.push_str(&format!(
                "<D:propstat><D:prop>{}</D:prop><D:status>HTTP/1.1 {status}</D:status></D:propstat>",
                props::element(ns, name, "")
            ));
        }
        let href = match object {
            Some(o) => format!("{}{}", scope.base, paths::encode(o)),
            None => scope.base.to_owned(),
        };
        Response::xml(
            207,
            props::multistatus(
                &format!(
                    "<D:response><D:href>{}</D:href>{propstats}</D:response>",
                    xml::escape(&href)
                ),
                "",
            ),
        )
    }

    fn get(&self, c: &Collection, name: &str, req: &Request) -> Response {
        let o = match self.store.object(c, name) {
            Ok(Some(o)) => o,
            Ok(None) => return Response::text(404, "no such object"),
            Err(e) => return server_error(e),
        };
        if let Some(inm) = req.header("if-none-match")
            && inm
                .split(',')
                .any(|t| t.trim() == o.etag || t.trim() == "*")
        {
            return Response::new(304).header("etag", o.etag.clone());
        }
        let data = match self.store.read(c, &o) {
            Ok(d) => d,
            Err(StoreError::Gone) => return Response::text(404, "no such object"),
            Err(e) => return server_error(e),
        };
        let mut r = Response::new(200)
            .header("content-type", c.kind.content_type())
            .header("etag", o.etag.clone());
        if req.method == "HEAD" {
            r.headers
                .push(("content-length".into(), data.len().to_string()));
        } else {
            r.body = data;
        }
        r
    }

    async fn put(&self, c: &Collection, name: &str, req: Request) -> Response {
        let (ns, data_pre, kind_name) = match c.kind {
            Kind::Calendar => (CALDAV, "valid-calendar-data", "calendar"),
            Kind::AddressBook => (CARDDAV, "valid-address-data", "vCard"),
        };
        if req.body.len() > MAX_RESOURCE {
            return Response::precondition(413, ns, "max-resource-size", "");
        }
        if name.starts_with('.') {
            return Response::text(403, "object names may not start with '.'");
        }
        if let Some(ct) = req.header("content-type") {
            let ct = ct.to_ascii_lowercase();
            let expected = match c.kind {
                Kind::Calendar => ct.starts_with("text/calendar"),
                Kind::AddressBook => ct.starts_with("text/vcard") || ct.starts_with("text/x-vcard"),
            };
            if !expected && !ct.starts_with("application/octet-stream") {
                let pre = match c.kind {
                    Kind::Calendar => "supported-calendar-data",
                    Kind::AddressBook => "supported-address-data",
                };
                return Response::precondition(403, ns, pre, "");
            }
        }
        // Parsing and expanding happen off the event loop too.
        let (kind, components) = (c.kind, c.components.clone());
        let mut req = req;
        let body = std::mem::take(&mut req.body);
        let (ingested, body) = match tokio::task::spawn_blocking(move || {
            (ical::ingest(kind, &body, &components), body)
        })
        .await
        {
            Ok(r) => r,
            Err(e) => return server_error(e),
        };
        req.body = body;
        let meta = match ingested {
            Ok(m) => m,
            Err(invalid) => {
                granary_sdk::log::info(&format!(
                    "refused a {kind_name} object {name}: {}",
                    invalid.reason
                ));
                let pre = if invalid.precondition.is_empty() {
                    data_pre
                } else {
                    invalid.precondition
                };
                return Response::precondition(403, ns, pre, &xml::escape(&invalid.reason));
            }
        };
        let pre = preconditions(&req);
        let store = self.store.clone();
        let (c2, name2, body) = (c.clone(), name.to_owned(), req.body);
        match blocking(move || store.put(&c2, &name2, &body, &meta, &pre)).await {
            Ok((etag, created)) => Response::new(if created { 201 } else { 204 })
                .header("etag", etag)
                .header("content-length", "0"),
            Err(StoreError::Precondition) => Response::text(412, "precondition failed"),
            Err(StoreError::UidConflict(_, other)) => Response::precondition(
                403,
                ns,
                "no-uid-conflict",
                &format!(
                    "<D:href>{}</D:href>",
                    xml::escape(&format!("{}{}", c_base(&req.path), paths::encode(&other)))
                ),
            ),
            Err(e) => server_error(e),
        }
    }

    fn report(&self, c: &Collection, scope: &Scope<'_>, req: &Request) -> Response {
        let body = match parse_body(req) {
            Ok(Some(b)) => b,
            Ok(None) => return Response::text(400, "REPORT needs a body"),
            Err(r) => return r,
        };
        let result = match (c.kind, body.ns.as_str(), body.name.as_str()) {
            (Kind::Calendar, CALDAV, "calendar-query") => self.calendar_query(c, scope, &body),
            (Kind::Calendar, CALDAV, "calendar-multiget")
            | (Kind::AddressBook, CARDDAV, "addressbook-multiget") => {
                self.multiget(c, scope, &body)
            }
            (Kind::Calendar, CALDAV, "free-busy-query") => self.free_busy(c, &body),
            (Kind::AddressBook, CARDDAV, "addressbook-query") => {
                self.addressbook_query(c, scope, &body)
            }
            (_, DAV, "sync-collection") => self.sync_collection(c, scope, &body),
            _ => return Response::precondition(403, DAV, "supported-report", ""),
        };
        result.unwrap_or_else(|r| r)
    }

    fn calendar_query(
        &self,
        c: &Collection,
        scope: &Scope<'_>,
        body: &Element,
    ) -> Result<Response, Response> {
        let f = filter::calendar_filter(body).map_err(Response::refused)?;
        let shape = filter::calendar_data(body).map_err(Response::refused)?;
        let wanted = Wanted::Props(filter::requested_props(body));
        let range = f.as_ref().and_then(ical::outer_range);
        let objects = match range {
            Some(r) => self.store.objects_in(c, r.start, r.end),
            None => self.store.objects(c),
        }
        .map_err(server_error)?;
        let fast = f.as_ref().and_then(ical::only_time_range);
        let l = self.listing(c, scope, &wanted, shape);
        let mut out = String::new();
        for o in &objects {
            if out.len() > MAX_RESPONSE {
                return Err(too_many());
            }
            if let Some((component, r)) = fast
                && o.single
                && o.component == component
                && let (Some(s), Some(e)) = (o.start, o.end)
            {
                // One instance: the index holds its span exactly.
                if ical::overlaps(s, e, &r) {
                    out.push_str(&self.object_response(&l, o, None));
                }
                continue;
            }
            let mut content = None;
            if let Some(f) = &f {
                if !ical::component_may_match(&o.component, f) {
                    continue;
                }
                let Some(data) = self.listed_content(c, o)? else {
                    continue;
                };
                if !ical::calendar_matches(&String::from_utf8_lossy(&data), f) {
                    continue;
                }
                content = Some(data);
            }
            out.push_str(&self.object_response(&l, o, content));
        }
        Ok(Response::xml(207, props::multistatus(&out, "")))
    }

    fn addressbook_query(
        &self,
        c: &Collection,
        scope: &Scope<'_>,
        body: &Element,
    ) -> Result<Response, Response> {
        let f = filter::card_filter(body).map_err(Response::refused)?;
        let limit = filter::nresults(body);
        let wanted = Wanted::Props(filter::requested_props(body));
        let objects = self.store.objects(c).map_err(server_error)?;
        let l = self.listing(c, scope, &wanted, CalendarData::AsIs);
        let mut out = String::new();
        let mut n = 0;
        let mut truncated = false;
        for o in &objects {
            if out.len() > MAX_RESPONSE {
                return Err(too_many());
            }
            let mut content = None;
            if !f.props.is_empty() {
                let Some(data) = self.listed_content(c, o)? else {
                    continue;
                };
                if !ical::card_matches(&String::from_utf8_lossy(&data), &f) {
                    continue;
                }
                content = Some(data);
            }
            if limit.is_some_and(|l| n >= l) {
                truncated = true;
                break;
            }
            n += 1;
            out.push_str(&self.object_response(&l, o, content));
        }
        if truncated {
            out.push_str(&props::status_response(
                scope.base,
                "507 Insufficient Storage",
            ));
        }
        Ok(Response::xml(207, props::multistatus(&out, "")))
    }

    fn multiget(
        &self,
        c: &Collection,
        scope: &Scope<'_>,
        body: &Element,
    ) -> Result<Response, Response> {
        let wanted = Wanted::Props(filter::requested_props(body));
        let shape = if c.kind == Kind::Calendar {
            filter::calendar_data(body).map_err(Response::refused)?
        } else {
            CalendarData::AsIs
        };
        let l = self.listing(c, scope, &wanted, shape);
        let mut out = String::new();
        let mut seen = std::collections::HashSet::new();
        for h in body.children_named(DAV, "href") {
            if !seen.insert(h.text.as_str()) {
                continue;
            }
            if out.len() > MAX_RESPONSE {
                return Err(too_many());
            }
            let Some(name) = href_in(&h.text, scope.base) else {
                out.push_str(&props::status_response(&h.text, "404 Not Found"));
                continue;
            };
            match self.store.object(c, &name).map_err(server_error)? {
                Some(o) => out.push_str(&self.object_response(&l, &o, None)),
                None => out.push_str(&props::status_response(&h.text, "404 Not Found")),
            }
        }
        Ok(Response::xml(207, props::multistatus(&out, "")))
    }

    fn sync_collection(
        &self,
        c: &Collection,
        scope: &Scope<'_>,
        body: &Element,
    ) -> Result<Response, Response> {
        let token = body
            .child(DAV, "sync-token")
            .map(|t| t.text.trim().to_owned())
            .unwrap_or_default();
        let wanted = Wanted::Props(filter::requested_props(body));
        let l = self.listing(c, scope, &wanted, CalendarData::AsIs);
        let mut out = String::new();
        let now;
        if token.is_empty() {
            let objects = self.store.objects(c).map_err(server_error)?;
            // The collection's number as it was when the listing was read
            // (a change racing with it is sent again next time).
            now = c.seq;
            for o in &objects {
                if out.len() > MAX_RESPONSE {
                    return Err(too_many());
                }
                out.push_str(&self.object_response(&l, o, None));
            }
        } else {
            let Some(seq) = store::parse_sync_token(c, &token) else {
                return Err(Response::precondition(403, DAV, "valid-sync-token", ""));
            };
            let (changes, current) = self.store.changes_since(c, seq).map_err(server_error)?;
            now = current;
            for (name, deleted) in changes {
                if out.len() > MAX_RESPONSE {
                    return Err(too_many());
                }
                let object = if deleted {
                    None
                } else {
                    self.store.object(c, &name).map_err(server_error)?
                };
                match object {
                    Some(o) => out.push_str(&self.object_response(&l, &o, None)),
                    None => {
                        let href = format!("{}{}", scope.base, paths::encode(&name));
                        out.push_str(&props::status_response(&href, "404 Not Found"));
                    }
                }
            }
        }
        let token = store::sync_token(&c.incarnation, now);
        Ok(Response::xml(
            207,
            props::multistatus(
                &out,
                &format!("<D:sync-token>{}</D:sync-token>", xml::escape(&token)),
            ),
        ))
    }

    fn free_busy(&self, c: &Collection, body: &Element) -> Result<Response, Response> {
        let range = body.child(CALDAV, "time-range").ok_or_else(|| {
            Response::precondition(403, CALDAV, "valid-filter", "a time-range is needed")
        })?;
        let start = range.attr("start").and_then(filter::parse_utc);
        let end = range.attr("end").and_then(filter::parse_utc);
        let (Some(start), Some(end)) = (start, end) else {
            return Err(Response::precondition(
                403,
                CALDAV,
                "valid-filter",
                "free-busy-query needs a start and an end in UTC",
            ));
        };
        let objects = self
            .store
            .objects_in(c, Some(start), Some(end))
            .map_err(server_error)?;
        let mut busy = Vec::new();
        for o in objects.iter().filter(|o| o.component == "VEVENT") {
            let Some(data) = self.listed_content(c, o)? else {
                continue;
            };
            busy.extend(ical::busy(
                &String::from_utf8_lossy(&data),
                filter::TimeRange {
                    start: Some(start),
                    end: Some(end),
                },
            ));
        }
        let mut r = Response::new(200).header("content-type", "text/calendar; charset=utf-8");
        r.body = ical::freebusy_calendar(start, end, &mut busy).into_bytes();
        Ok(r)
    }
}

/// The largest multistatus a REPORT builds; beyond it the client is told to
/// narrow its query.
const MAX_RESPONSE: usize = 32 << 20;

fn too_many() -> Response {
    Response::precondition(507, DAV, "number-of-matches-within-limits", "")
}

/// The collection part of an object's path ("/calendars/u/c/").
fn c_base(path: &str) -> String {
    match path.rfind('/') {
        Some(i) => path[..=i].to_owned(),
        None => "/".into(),
    }
}

/// Runs store work off the event loop (fsyncs).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(StoreError::Io(std::io::Error::other(e.to_string()))),
    }
}
