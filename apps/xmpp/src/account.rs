//! Requests (iq) to the account or to the server: the roster with
//! versioning (RFC 6121 §2), disco and caps (XEP-0030, XEP-0115), ping
//! (XEP-0199), carbons (XEP-0280), vCard-temp (XEP-0054), blocking
//! (XEP-0191), software version; MAM in [`crate::mam`], PEP in
//! [`crate::pep`].

use std::rc::Rc;

use granary_wire::stanza::Element;

use crate::jid::Jid;
use crate::ns;
use crate::server::{Server, Session, error_reply};
use crate::store::{Item, Sub};

/// Who an iq is addressed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The domain: the server.
    Server,
    /// The user's bare address (or no `to` from the user's own client).
    Account,
}

/// What the server says of itself in disco#info.
pub const SERVER_FEATURES: &[&str] = &[
    ns::DISCO_INFO,
    ns::DISCO_ITEMS,
    ns::PING,
    ns::CARBONS,
    ns::BLOCKING,
    ns::VCARD,
    ns::ROSTER_VER,
    "jabber:iq:version",
    "msgoffline",
];

/// What the account says of itself in disco#info (XEP-0313, XEP-0163).
pub const ACCOUNT_FEATURES: &[&str] = &[
    ns::DISCO_INFO,
    ns::DISCO_ITEMS,
    ns::MAM,
    ns::SID,
    "http://jabber.org/protocol/pubsub#publish",
    "http://jabber.org/protocol/pubsub#publish-options",
    "http://jabber.org/protocol/pubsub#retrieve-items",
    "http://jabber.org/protocol/pubsub#retract-items",
    "http://jabber.org/protocol/pubsub#delete-nodes",
    "http://jabber.org/protocol/pubsub#access-presence",
    "http://jabber.org/protocol/pubsub#access-whitelist",
    "http://jabber.org/protocol/pubsub#auto-create",
    "http://jabber.org/protocol/pubsub#last-published",
    "urn:xmpp:bookmarks:1#compat-pep",
    crate::push::NS,
];

/// XEP-0082 time.
pub fn stamp(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// XEP-0082 time read back (seconds, fractions and zones allowed).
pub fn parse_stamp(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text.trim())
        .ok()
        .map(|t| t.timestamp_millis())
}

pub fn result_for(el: &Element) -> Element {
    let mut r = Element::new("iq", ns::CLIENT).with_attr("type", "result");
    if let Some(id) = el.attr("id") {
        r.set_attr("id", id);
    }
    if let Some(to) = el.attr("to") {
        r.set_attr("from", to);
    }
    if let Some(from) = el.attr("from") {
        r.set_attr("to", from);
    }
    r
}

fn item_element(item: &Item, removed: bool) -> Element {
    let mut e = Element::new("item", ns::ROSTER).with_attr("jid", item.jid.clone());
    if removed {
        return e.with_attr("subscription", "remove");
    }
    if let Some(n) = &item.name {
        e.set_attr("name", n.clone());
    }
    e.set_attr("subscription", item.sub.as_str());
    if item.ask {
        e.set_attr("ask", "subscribe");
    }
    for g in &item.groups {
        e.push(Element::new("group", ns::ROSTER).with_text(g.clone()));
    }
    e
}

/// A roster push to every session that asked for the roster.
pub fn roster_push(server: &Server, item: &Item, ver: u64, removed: bool) {
    for s in server.all_sessions() {
        if !s.state.borrow().interested {
            continue;
        }
        let push = Element::new("iq", ns::CLIENT)
            .with_attr("type", "set")
            .with_attr("id", format!("push{}", crate::server::random_id()))
            .with_attr("to", s.full.to_string())
            .with_child(
                Element::new("query", ns::ROSTER)
                    .with_attr("ver", ver.to_string())
                    .with_child(item_element(item, removed)),
            );
        s.send(push);
    }
}

/// Answers an iq sent to the account or the server. `session` is the
/// user's own session that sent it (`None` for someone else's request,
/// answered through the host).
pub fn handle_iq(server: &Rc<Server>, from: &Jid, session: Option<&Rc<Session>>, el: Element) {
    let target = match el.attr("to").and_then(|t| Jid::parse(t).ok()) {
        Some(t) if t.local.is_none() => Target::Server,
        _ => Target::Account,
    };
    let own = from.bare() == server.bare;
    let reply = answer(server, from, session, target, own, &el);
    let Some(mut reply) = reply else {
        return;
    };
    if reply.attr("from").is_none() {
        let who = match target {
            Target::Server => server.domain.clone(),
            Target::Account => server.bare.to_string(),
        };
        reply.set_attr("from", who);
    }
    reply.set_attr("to", from.to_string());
    match session {
        Some(s) => s.send(reply),
        None => server.route_from_account(reply),
    }
}

fn answer(
    server: &Rc<Server>,
    from: &Jid,
    session: Option<&Rc<Session>>,
    target: Target,
    own: bool,
    el: &Element,
) -> Option<Element> {
    let kind = el.attr("type").unwrap_or("");
    // Results and errors are never answered (RFC 6120 §8.2.3).
    if !matches!(kind, "get" | "set") {
        return None;
    }
    let Some(payload) = el.elements().next() else {
        return Some(error_reply(
            el,
            "modify",
            "bad-request",
            Some("an iq carries one element"),
        ));
    };
    let forbidden = || Some(error_reply(el, "auth", "forbidden", None));
    match (kind, payload.ns.as_str(), payload.name.as_str()) {
        ("get", ns::PING, "ping") => Some(result_for(el)),
        ("get", ns::DISCO_INFO, "query") => Some(disco_info(server, target, own, el, payload)),
        ("get", ns::DISCO_ITEMS, "query") => {
            let mut q = Element::new("query", ns::DISCO_ITEMS);
            if target == Target::Server {
                q.push(
                    Element::new("item", ns::DISCO_ITEMS)
                        .with_attr("jid", crate::room::service_jid(&server.domain))
                        .with_attr("name", "Group chats"),
                );
            }
            if target == Target::Server && server.upload.enabled() {
                q.push(
                    Element::new("item", ns::DISCO_ITEMS)
                        .with_attr("jid", crate::upload::service_jid(&server.domain))
                        .with_attr("name", "HTTP file upload"),
                );
            }
            if target == Target::Account && own {
                for (node, _) in server.store.nodes().unwrap_or_default() {
                    q.push(
                        Element::new("item", ns::DISCO_ITEMS)
                            .with_attr("jid", server.bare.to_string())
                            .with_attr("node", node),
                    );
                }
            }
            Some(result_for(el).with_child(q))
        }
        ("get", "jabber:iq:version", "query") => Some(
            result_for(el).with_child(
                Element::new("query", "jabber:iq:version")
                    .with_child(Element::new("name", "jabber:iq:version").with_text("Granary"))
                    .with_child(
                        Element::new("version", "jabber:iq:version")
                            .with_text(env!("CARGO_PKG_VERSION")),
                    ),
            ),
        ),
        ("set", ns::SESSION, "session") if own => Some(result_for(el)),
        (_, ns::ROSTER, "query") if own => Some(roster(server, session, el, payload)),
        (_, ns::ROSTER, "query") => forbidden(),
        ("get", ns::VCARD, "vCard") if target == Target::Account => {
            let card = server
                .store
                .vcard()
                .ok()
                .flatten()
                .and_then(|x| granary_wire::stanza::parse_element(x.as_bytes(), ns::CLIENT).ok())
                .unwrap_or_else(|| Element::new("vCard", ns::VCARD));
            Some(result_for(el).with_child(card))
        }
        ("set", ns::VCARD, "vCard") if own && target == Target::Account => {
            match server.store.set_vcard(&payload.to_xml("")) {
                Ok(()) => Some(result_for(el)),
                Err(_) => Some(error_reply(el, "wait", "internal-server-error", None)),
            }
        }
        (_, ns::CARBONS, name @ ("enable" | "disable")) if own && kind == "set" => {
            if let Some(s) = session {
                s.state.borrow_mut().carbons = name == "enable";
            }
            Some(result_for(el))
        }
        (_, ns::BLOCKING, _) if own => Some(blocking(server, session, el, payload)),
        ("set", crate::push::NS, "enable" | "disable") if own => {
            Some(crate::push::handle(server, el, payload))
        }
        (_, ns::MAM, _) if own => crate::mam::query(server, session, el, payload),
        (_, ns::PUBSUB | ns::PUBSUB_OWNER, "pubsub") if target == Target::Account => {
            Some(crate::pep::handle(server, from, own, el, payload))
        }
        (_, ns::BLOCKING | ns::MAM | ns::CARBONS | ns::VCARD, _) => forbidden(),
        ("get" | "set", _, _) => Some(error_reply(el, "cancel", "service-unavailable", None)),
        _ => None,
    }
}

fn identity(category: &str, kind: &str, name: Option<&str>) -> Element {
    let mut i = Element::new("identity", ns::DISCO_INFO)
        .with_attr("category", category)
        .with_attr("type", kind);
    if let Some(n) = name {
        i.set_attr("name", n);
    }
    i
}

fn feature(var: &str) -> Element {
    Element::new("feature", ns::DISCO_INFO).with_attr("var", var)
}

fn disco_info(server: &Server, target: Target, own: bool, el: &Element, q: &Element) -> Element {
    let mut out = Element::new("query", ns::DISCO_INFO);
    if let Some(node) = q.attr("node") {
        out.set_attr("node", node);
    }
    match target {
        Target::Server => {
            out.push(identity("server", "im", Some("Granary")));
            for f in SERVER_FEATURES {
                out.push(feature(f));
            }
        }
        Target::Account => {
            out.push(identity("account", "registered", None));
            out.push(identity("pubsub", "pep", None));
            for f in ACCOUNT_FEATURES {
                out.push(feature(f));
            }
            let _ = (server, own);
        }
    }
    result_for(el).with_child(out)
}

/// The server's XEP-0115 verification string and its SHA-1 hash.
pub fn server_caps() -> String {
    use base64::Engine;
    let mut features: Vec<&str> = SERVER_FEATURES.to_vec();
    features.sort_unstable();
    let mut s = String::from("server/im//Granary<");
    for f in features {
        s.push_str(f);
        s.push('<');
    }
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, s.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

fn roster(
    server: &Rc<Server>,
    session: Option<&Rc<Session>>,
    el: &Element,
    q: &Element,
) -> Element {
    let store = &server.store;
    if el.attr("type") == Some("get") {
        if let Some(s) = session {
            s.state.borrow_mut().interested = true;
        }
        let ver = store.roster_version().unwrap_or(0).to_string();
        // The client has this version: nothing to send (RFC 6121 §2.6.3).
        if q.attr("ver") == Some(ver.as_str()) {
            return result_for(el);
        }
        let mut query = Element::new("query", ns::ROSTER).with_attr("ver", ver);
        for item in store.roster().unwrap_or_default() {
            query.push(item_element(&item, false));
        }
        return result_for(el).with_child(query);
    }
    if el.attr("type") != Some("set") {
        return error_reply(el, "modify", "bad-request", None);
    }
    let items: Vec<&Element> = q.elements().collect();
    let [item] = items.as_slice() else {
        return error_reply(el, "modify", "bad-request", Some("one item per roster set"));
    };
    let Some(jid) = item.attr("jid").and_then(|j| Jid::parse(j).ok()) else {
        return error_reply(
            el,
            "modify",
            "bad-request",
            Some("the item needs a valid jid"),
        );
    };
    let jid = jid.bare_text();
    if jid == server.bare.to_string() {
        return error_reply(
            el,
            "cancel",
            "not-allowed",
            Some("you are not your own contact"),
        );
    }
    if item.attr("subscription") == Some("remove") {
        let Some(existing) = store.item(&jid).ok().flatten() else {
            return error_reply(el, "cancel", "item-not-found", None);
        };
        let Ok(ver) = store.remove_item(&jid) else {
            return error_reply(el, "wait", "internal-server-error", None);
        };
        roster_push(server, &existing, ver, true);
        // Removing cancels both directions (RFC 6121 §2.5.2).
        if let Ok(to) = Jid::parse(&jid) {
            let bare = server.bare.clone();
            if existing.sub.to() || existing.ask {
                server.route(
                    &bare,
                    &to,
                    Element::new("presence", ns::CLIENT).with_attr("type", "unsubscribe"),
                );
            }
            if existing.sub.from() {
                server.route(
                    &bare,
                    &to,
                    Element::new("presence", ns::CLIENT).with_attr("type", "unsubscribed"),
                );
            }
        }
        return result_for(el);
    }
    let mut new = store
        .item(&jid)
        .ok()
        .flatten()
        .unwrap_or_else(|| Item::new(&jid));
    new.name = item
        .attr("name")
        .filter(|n| !n.is_empty())
        .map(str::to_owned);
    let mut groups: Vec<String> = item
        .elements()
        .filter(|g| g.is("group", ns::ROSTER))
        .map(|g| g.text())
        .filter(|g| !g.is_empty() && g.len() <= 1024)
        .collect();
    groups.sort();
    groups.dedup();
    if groups.len() > 64 || new.name.as_ref().is_some_and(|n| n.len() > 1024) {
        return error_reply(
            el,
            "modify",
            "not-acceptable",
            Some("too many groups or too long a name"),
        );
    }
    new.groups = groups;
    match store.put_item(&new) {
        Ok(ver) => {
            roster_push(server, &new, ver, false);
            result_for(el)
        }
        Err(_) => error_reply(el, "wait", "internal-server-error", None),
    }
}

fn blocking(
    server: &Rc<Server>,
    session: Option<&Rc<Session>>,
    el: &Element,
    q: &Element,
) -> Element {
    let store = &server.store;
    let jids: Vec<String> = q
        .elements()
        .filter(|i| i.name == "item")
        .filter_map(|i| i.attr("jid"))
        .filter_map(|j| Jid::parse(j).ok())
        .map(|j| j.to_string())
        .collect();
    match (el.attr("type"), q.name.as_str()) {
        (Some("get"), "blocklist") => {
            if let Some(s) = session {
                s.state.borrow_mut().blocklist_pushes = true;
            }
            let mut list = Element::new("blocklist", ns::BLOCKING);
            for j in store.blocked().unwrap_or_default() {
                list.push(Element::new("item", ns::BLOCKING).with_attr("jid", j));
            }
            result_for(el).with_child(list)
        }
        (Some("set"), name @ ("block" | "unblock")) => {
            if name == "block" && jids.is_empty() {
                return error_reply(
                    el,
                    "modify",
                    "bad-request",
                    Some("block at least one address"),
                );
            }
            let done = match name {
                "block" => store.block(&jids),
                _ => store.unblock(&jids),
            };
            if done.is_err() {
                return error_reply(el, "wait", "internal-server-error", None);
            }
            if name == "block" {
                // Blocked contacts stop seeing the user's presence.
                for j in &jids {
                    if let Ok(to) = Jid::parse(j) {
                        let subscribed = store
                            .item(&to.bare_text())
                            .ok()
                            .flatten()
                            .is_some_and(|i| i.sub.from());
                        if subscribed {
                            for s in server.all_sessions().into_iter().filter(|s| s.available()) {
                                server.route(
                                    &s.full,
                                    &to,
                                    Element::new("presence", ns::CLIENT)
                                        .with_attr("type", "unavailable"),
                                );
                            }
                        }
                    }
                }
            }
            for s in server.all_sessions() {
                if !s.state.borrow().blocklist_pushes {
                    continue;
                }
                let mut push = Element::new(name, ns::BLOCKING);
                for j in &jids {
                    push.push(Element::new("item", ns::BLOCKING).with_attr("jid", j.clone()));
                }
                s.send(
                    Element::new("iq", ns::CLIENT)
                        .with_attr("type", "set")
                        .with_attr("id", format!("block{}", crate::server::random_id()))
                        .with_attr("to", s.full.to_string())
                        .with_child(push),
                );
            }
            result_for(el)
        }
        _ => error_reply(el, "modify", "bad-request", None),
    }
}

/// Whether the contact may see what the user shares with presence
/// subscribers.
pub fn sees_presence(server: &Server, who: &Jid) -> bool {
    who.bare() == server.bare
        || server
            .store
            .item(&who.bare_text())
            .ok()
            .flatten()
            .is_some_and(|i| matches!(i.sub, Sub::From | Sub::Both))
}
