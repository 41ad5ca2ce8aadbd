//! WebDAV properties: the live ones each kind of resource has, their values
//! as XML, and the multistatus answers that carry them.

use crate::paths::{self, Target};
use crate::store::{Collection, Kind, Object};
use crate::xml::{CALDAV, CARDDAV, CS, DAV, ICAL, escape};

/// The largest object accepted (`max-resource-size`).
pub const MAX_RESOURCE: usize = 4 << 20;

/// Prefixes declared on every multistatus we write.
pub const NAMESPACES: &str = "xmlns:D=\"DAV:\" xmlns:C=\"urn:ietf:params:xml:ns:caldav\" \
     xmlns:CR=\"urn:ietf:params:xml:ns:carddav\" xmlns:CS=\"http://calendarserver.org/ns/\" \
     xmlns:A=\"http://apple.com/ns/ical/\"";

fn prefix(ns: &str) -> Option<&'static str> {
    match ns {
        DAV => Some("D"),
        CALDAV => Some("C"),
        CARDDAV => Some("CR"),
        CS => Some("CS"),
        ICAL => Some("A"),
        _ => None,
    }
}

/// `<P:name>inner</P:name>`, declaring the namespace when it has no
/// prefix of ours.
pub fn element(ns: &str, name: &str, inner: &str) -> String {
    let (open, close) = match prefix(ns) {
        Some(p) => (format!("{p}:{name}"), format!("{p}:{name}")),
        None if ns.is_empty() => (format!("{name} xmlns=\"\""), name.to_owned()),
        None => (
            format!("X:{name} xmlns:X=\"{}\"", escape(ns)),
            format!("X:{name}"),
        ),
    };
    if inner.is_empty() {
        format!("<{open}/>")
    } else {
        format!("<{open}>{inner}</{close}>")
    }
}

/// What a property is asked of.
pub enum Resource<'a> {
    Root,
    PrincipalsRoot,
    Principal,
    Home(Kind),
    Collection {
        c: &'a Collection,
        writable: bool,
        shared: bool,
    },
    Object {
        c: &'a Collection,
        o: &'a Object,
        /// The content, when calendar-data or address-data is asked for.
        data: Option<&'a str>,
        writable: bool,
    },
}

/// Who is looking, and where things are for them.
pub struct Viewer<'a> {
    /// The user whose principal this is.
    pub user: &'a str,
    /// Their mail domain (for calendar-user-address-set).
    pub domain: &'a str,
}

const COLLECTION_PRIVILEGES: &[&str] = &[
    "read",
    "write",
    "write-properties",
    "write-content",
    "bind",
    "unbind",
    "read-current-user-privilege-set",
];
const READ_PRIVILEGES: &[&str] = &["read", "read-current-user-privilege-set"];

fn privileges(list: &[&str]) -> String {
    list.iter()
        .map(|p| format!("<D:privilege><D:{p}/></D:privilege>"))
        .collect()
}

fn href(h: &str) -> String {
    format!("<D:href>{}</D:href>", escape(h))
}

/// The live properties `allprop` returns for a resource, and `propname`
/// lists.
pub fn live_names(r: &Resource<'_>) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![
        (DAV, "resourcetype"),
        (DAV, "current-user-principal"),
        (DAV, "current-user-privilege-set"),
    ];
    match r {
        Resource::Root | Resource::PrincipalsRoot => {}
        Resource::Principal => v.extend([
            (DAV, "displayname"),
            (DAV, "principal-URL"),
            (CALDAV, "calendar-home-set"),
            (CARDDAV, "addressbook-home-set"),
            (CALDAV, "calendar-user-address-set"),
        ]),
        Resource::Home(_) => v.extend([(DAV, "displayname"), (DAV, "owner")]),
        Resource::Collection { c, .. } => {
            v.extend([
                (DAV, "displayname"),
                (DAV, "owner"),
                (DAV, "supported-report-set"),
                (DAV, "sync-token"),
                (CS, "getctag"),
            ]);
            match c.kind {
                Kind::Calendar => v.extend([
                    (CALDAV, "supported-calendar-component-set"),
                    (CALDAV, "supported-calendar-data"),
                    (CALDAV, "max-resource-size"),
                    (CALDAV, "calendar-description"),
                    (ICAL, "calendar-color"),
                ]),
                Kind::AddressBook => v.extend([
                    (CARDDAV, "supported-address-data"),
                    (CARDDAV, "max-resource-size"),
                    (CARDDAV, "addressbook-description"),
                ]),
            }
        }
        Resource::Object { .. } => v.extend([
            (DAV, "getetag"),
            (DAV, "getcontenttype"),
            (DAV, "getcontentlength"),
        ]),
    }
    v
}

/// A live property's value (the element's content), or `None` when the
/// resource does not have it.
pub fn live(r: &Resource<'_>, v: &Viewer<'_>, ns: &str, name: &str) -> Option<String> {
    let principal = paths::href(v.user, &Target::Principal);
    Some(match (ns, name, r) {
        (DAV, "resourcetype", r) => match r {
            Resource::Principal => "<D:collection/><D:principal/>".into(),
            Resource::Collection { c, .. } => match c.kind {
                Kind::Calendar => "<D:collection/><C:calendar/>".into(),
                Kind::AddressBook => "<D:collection/><CR:addressbook/>".into(),
            },
            Resource::Object { .. } => String::new(),
            _ => "<D:collection/>".into(),
        },
        (DAV, "current-user-principal", _) => href(&principal),
        (DAV, "principal-URL", Resource::Principal) => href(&principal),
        (DAV, "owner", Resource::Home(_) | Resource::Principal) => href(&principal),
        (DAV, "owner", Resource::Collection { shared: false, .. }) => href(&principal),
        (DAV, "current-user-privilege-set", r) => match r {
            Resource::Collection { writable: true, .. }
            | Resource::Object { writable: true, .. } => privileges(COLLECTION_PRIVILEGES),
            Resource::Home(_) => {
                privileges(&["read", "bind", "unbind", "read-current-user-privilege-set"])
            }
            _ => privileges(READ_PRIVILEGES),
        },
        (DAV, "displayname", Resource::Principal) => escape(v.user),
        (DAV, "displayname", Resource::Home(Kind::Calendar)) => "Calendars".into(),
        (DAV, "displayname", Resource::Home(Kind::AddressBook)) => "Address books".into(),
        (DAV, "displayname", Resource::Collection { c, .. }) => {
            escape(if c.display_name.is_empty() {
                &c.name
            } else {
                &c.display_name
            })
        }
        (CALDAV, "calendar-home-set", Resource::Principal) => {
            href(&paths::href(v.user, &Target::Home(Kind::Calendar)))
        }
        (CARDDAV, "addressbook-home-set", Resource::Principal) => {
            href(&paths::href(v.user, &Target::Home(Kind::AddressBook)))
        }
        (CALDAV, "calendar-user-address-set", Resource::Principal) => {
            format!(
                "{}{}",
                href(&format!("mailto:{}@{}", v.user, v.domain)),
                href(&principal)
            )
        }
        (DAV, "supported-report-set", Resource::Collection { c, .. }) => {
            let reports: &[&str] = match c.kind {
                Kind::Calendar => &[
                    "C:calendar-query",
                    "C:calendar-multiget",
                    "C:free-busy-query",
                    "D:sync-collection",
                ],
                Kind::AddressBook => &[
                    "CR:addressbook-query",
                    "CR:addressbook-multiget",
                    "D:sync-collection",
                ],
            };
            reports
                .iter()
                .map(|r| {
                    format!("<D:supported-report><D:report><{r}/></D:report></D:supported-report>")
                })
                .collect()
        }
        (DAV, "sync-token", Resource::Collection { c, .. }) => escape(&c.sync_token()),
        (CS, "getctag", Resource::Collection { c, .. }) => escape(&c.sync_token()),
        (CALDAV, "supported-calendar-component-set", Resource::Collection { c, .. })
            if c.kind == Kind::Calendar =>
        {
            c.components
                .iter()
                .map(|n| format!("<C:comp name=\"{}\"/>", escape(n)))
                .collect()
        }
        (CALDAV, "supported-calendar-data", Resource::Collection { c, .. })
            if c.kind == Kind::Calendar =>
        {
            "<C:calendar-data content-type=\"text/calendar\" version=\"2.0\"/>".into()
        }
        (CARDDAV, "supported-address-data", Resource::Collection { c, .. })
            if c.kind == Kind::AddressBook =>
        {
            "<CR:address-data-type content-type=\"text/vcard\" version=\"3.0\"/>\
             <CR:address-data-type content-type=\"text/vcard\" version=\"4.0\"/>"
                .into()
        }
        (CALDAV, "max-resource-size", Resource::Collection { c, .. })
            if c.kind == Kind::Calendar =>
        {
            MAX_RESOURCE.to_string()
        }
        (CARDDAV, "max-resource-size", Resource::Collection { c, .. })
            if c.kind == Kind::AddressBook =>
        {
            MAX_RESOURCE.to_string()
        }
        (CALDAV, "calendar-description", Resource::Collection { c, .. })
            if c.kind == Kind::Calendar && !c.description.is_empty() =>
        {
            escape(&c.description)
        }
        (CARDDAV, "addressbook-description", Resource::Collection { c, .. })
            if c.kind == Kind::AddressBook && !c.description.is_empty() =>
        {
            escape(&c.description)
        }
        (ICAL, "calendar-color", Resource::Collection { c, .. })
            if c.kind == Kind::Calendar && !c.color.is_empty() =>
        {
            escape(&c.color)
        }
        (DAV, "getetag", Resource::Object { o, .. }) => escape(&o.etag),
        (DAV, "getcontenttype", Resource::Object { c, .. }) => c.kind.content_type().into(),
        (DAV, "getcontentlength", Resource::Object { o, .. }) => o.size.to_string(),
        (CALDAV, "calendar-data", Resource::Object { c, data, .. }) if c.kind == Kind::Calendar => {
            escape((*data)?)
        }
        (CARDDAV, "address-data", Resource::Object { c, data, .. })
            if c.kind == Kind::AddressBook =>
        {
            escape((*data)?)
        }
        _ => return None,
    })
}

/// Properties that exist but no PROPPATCH may change.
pub fn protected(ns: &str, name: &str) -> bool {
    matches!(
        (ns, name),
        (
            DAV,
            "resourcetype"
                | "getetag"
                | "getcontenttype"
                | "getcontentlength"
                | "getlastmodified"
                | "current-user-principal"
                | "current-user-privilege-set"
                | "supported-report-set"
                | "sync-token"
                | "owner"
                | "principal-URL"
                | "lockdiscovery"
                | "supportedlock"
                | "creationdate"
        ) | (
            CALDAV,
            "supported-calendar-component-set"
                | "supported-calendar-data"
                | "max-resource-size"
                | "calendar-home-set"
                | "calendar-data"
        ) | (
            CARDDAV,
            "supported-address-data"
                | "max-resource-size"
                | "addressbook-home-set"
                | "address-data"
        ) | (CS, "getctag")
    )
}

/// What a PROPFIND or REPORT asks for.
#[derive(Debug, Clone)]
pub enum Wanted {
    AllProp,
    PropName,
    Props(Vec<(String, String)>),
}

/// One `<D:response>`: the resource's href and the asked properties,
/// found ones under 200 and missing ones under 404. `dead` are the
/// resource's dead properties (key `{ns}name`, element XML).
pub fn response(
    href_: &str,
    r: &Resource<'_>,
    v: &Viewer<'_>,
    wanted: &Wanted,
    dead: &[(String, String)],
) -> String {
    let mut found = String::new();
    let mut missing = String::new();
    match wanted {
        Wanted::AllProp => {
            for (ns, name) in live_names(r) {
                if let Some(value) = live(r, v, ns, name) {
                    found.push_str(&element(ns, name, &value));
                }
            }
            for (_, xml) in dead {
                found.push_str(xml);
            }
        }
        Wanted::PropName => {
            for (ns, name) in live_names(r) {
                found.push_str(&element(ns, name, ""));
            }
            for (key, _) in dead {
                if let Some((ns, name)) = split_key(key) {
                    found.push_str(&element(ns, name, ""));
                }
            }
        }
        Wanted::Props(list) => {
            for (ns, name) in list {
                if let Some(value) = live(r, v, ns, name) {
                    found.push_str(&element(ns, name, &value));
                } else if let Some((_, xml)) =
                    dead.iter().find(|(k, _)| *k == format!("{{{ns}}}{name}"))
                {
                    found.push_str(xml);
                } else {
                    missing.push_str(&element(ns, name, ""));
                }
            }
        }
    }
    let mut out = format!("<D:response>{}", href(href_));
    if !found.is_empty() || missing.is_empty() {
        out.push_str(&format!(
            "<D:propstat><D:prop>{found}</D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat>"
        ));
    }
    if !missing.is_empty() {
        out.push_str(&format!(
            "<D:propstat><D:prop>{missing}</D:prop><D:status>HTTP/1.1 404 Not Found</D:status></D:propstat>"
        ));
    }
    out.push_str("</D:response>");
    out
}

/// `{ns}name` into its parts.
pub fn split_key(key: &str) -> Option<(&str, &str)> {
    key.strip_prefix('{')?.split_once('}')
}

/// A response for an href with a status and no properties.
pub fn status_response(href_: &str, status: &str) -> String {
    format!(
        "<D:response>{}<D:status>HTTP/1.1 {status}</D:status></D:response>",
        href(href_)
    )
}

/// The whole multistatus document around `responses`.
pub fn multistatus(responses: &str, extra: &str) -> Vec<u8> {
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<D:multistatus {NAMESPACES}>{responses}{extra}</D:multistatus>\n"
    )
    .into_bytes()
}

/// A `DAV:error` body with one precondition element (RFC 4918 §16).
pub fn error_body(ns: &str, precondition: &str, inner: &str) -> Vec<u8> {
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<D:error {NAMESPACES}>{}</D:error>\n",
        element(ns, precondition, inner)
    )
    .into_bytes()
}
