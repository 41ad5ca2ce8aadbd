//! Presence (RFC 6121 §3–§4): the subscription state machine on both
//! sides, broadcast to the contacts that may see it, probes, directed
//! presence.

use std::rc::Rc;

use granary_wire::stanza::Element;

use crate::account::roster_push;
use crate::jid::Jid;
use crate::ns;
use crate::server::{Server, Session};
use crate::store::Item;

fn presence(kind: Option<&str>) -> Element {
    let p = Element::new("presence", ns::CLIENT);
    match kind {
        Some(k) => p.with_attr("type", k),
        None => p,
    }
}

/// Presence a client sent.
pub fn outbound(server: &Rc<Server>, session: &Rc<Session>, mut el: Element) {
    let kind = el.attr("type").map(str::to_owned);
    let to = match el.attr("to") {
        Some(t) => match Jid::parse(t) {
            Ok(j) => Some(j),
            Err(_) => {
                session.send(crate::server::error_reply(
                    &el,
                    "modify",
                    "jid-malformed",
                    None,
                ));
                return;
            }
        },
        None => None,
    };
    match (kind.as_deref(), to) {
        (None | Some("unavailable"), None) => broadcast(server, session, el),
        (None | Some("unavailable"), Some(to)) => {
            // Directed presence (RFC 6121 §4.6).
            {
                let mut st = session.state.borrow_mut();
                if kind.is_none() {
                    st.directed.insert(to.to_string());
                } else if st.directed.remove(&to.to_string()) {
                    if st.leaving.len() >= 64 {
                        st.leaving.clear();
                    }
                    st.leaving.insert(to.to_string());
                }
            }
            el.remove_attr("from");
            server.route(&session.full, &to, el);
        }
        (Some(k @ ("subscribe" | "subscribed" | "unsubscribe" | "unsubscribed")), Some(to)) => {
            subscription_out(server, k, &to.bare(), el);
        }
        // Probes are the server's to send; anything else is an error.
        (Some("probe"), _) => {}
        _ => session.send(crate::server::error_reply(
            &el,
            "modify",
            "bad-request",
            None,
        )),
    }
}

/// The user's side of the subscription state machine (RFC 6121 §3).
fn subscription_out(server: &Rc<Server>, kind: &str, contact: &Jid, mut el: Element) {
    let jid = contact.to_string();
    if jid == server.bare.to_string() {
        return;
    }
    let store = &server.store;
    let mut item = store
        .item(&jid)
        .ok()
        .flatten()
        .unwrap_or_else(|| Item::new(&jid));
    let before = item.clone();
    let mut send_presence = false;
    let mut unavailable = false;
    match kind {
        "subscribe" => {
            if !item.sub.to() {
                item.ask = true;
            }
        }
        "subscribed" => {
            let pending = store.remove_pending(&jid).unwrap_or(false);
            if !pending && item.sub.from() {
                return;
            }
            if !pending {
                // Pre-approval is not offered: nothing to approve.
                return;
            }
            item.sub = item.sub.with_from(true);
            send_presence = true;
        }
        "unsubscribe" => {
            item.sub = item.sub.with_to(false);
            item.ask = false;
        }
        _ => {
            // unsubscribed: cancel their subscription or refuse a request.
            let _ = store.remove_pending(&jid);
            if item.sub.from() {
                unavailable = true;
            }
            item.sub = item.sub.with_from(false);
        }
    }
    let exists = store.item(&jid).ok().flatten().is_some();
    if (item != before || (!exists && kind == "subscribe"))
        && let Ok(ver) = store.put_item(&item)
    {
        roster_push(server, &item, ver, false);
    }
    el.attrs.retain(|(k, _)| k == "type" || k == "id");
    server.route(&server.bare.clone(), contact, el);
    if send_presence {
        for s in server.all_sessions() {
            let current = s.state.borrow().presence.clone();
            if let Some(p) = current {
                server.route(&s.full, contact, strip_addresses(p));
            }
        }
    }
    if unavailable {
        for s in server.all_sessions() {
            if s.available() {
                server.route(&s.full, contact, presence(Some("unavailable")));
            }
        }
    }
}

fn strip_addresses(mut el: Element) -> Element {
    el.remove_attr("from");
    el.remove_attr("to");
    el
}

/// Broadcast presence from a session (RFC 6121 §4.2, §4.4, §4.5).
fn broadcast(server: &Rc<Server>, session: &Rc<Session>, el: Element) {
    let el = strip_addresses(el);
    let available = el.attr("type").is_none();
    let priority = el
        .child("priority", ns::CLIENT)
        .and_then(|p| p.text().trim().parse::<i32>().ok())
        .unwrap_or(0)
        .clamp(-128, 127);
    let (initial, directed, raised) = {
        let mut st = session.state.borrow_mut();
        let initial = available && st.presence.is_none();
        let raised = available && !initial && st.priority < 0 && priority >= 0;
        if !available && st.presence.is_none() {
            // Unavailable without ever being available: nothing to say.
            return;
        }
        st.presence = available.then(|| el.clone());
        st.priority = priority;
        let directed: Vec<String> = if available {
            Vec::new()
        } else {
            st.directed.drain().collect()
        };
        (initial, directed, raised)
    };
    if raised {
        deliver_offline(server, session);
    }
    let roster = server.store.roster().unwrap_or_default();
    for item in roster.iter().filter(|i| i.sub.from()) {
        if let Ok(to) = Jid::parse(&item.jid) {
            server.route(&session.full, &to, el.clone());
        }
    }
    for d in directed {
        if let Ok(to) = Jid::parse(&d) {
            server.route(&session.full, &to, el.clone());
        }
    }
    // The user's other resources see it, and it sees theirs.
    for other in server.all_sessions() {
        if other.resource == session.resource {
            continue;
        }
        if other.available() {
            let mut copy = el.clone();
            copy.set_attr("from", session.full.to_string());
            copy.set_attr("to", other.full.to_string());
            other.send(copy);
        }
        if initial {
            let theirs = other.state.borrow().presence.clone();
            if let Some(mut p) = theirs {
                p.set_attr("from", other.full.to_string());
                p.set_attr("to", session.full.to_string());
                session.send(p);
            }
        }
    }
    // Its own presence comes back to it too.
    let mut own = el.clone();
    own.set_attr("from", session.full.to_string());
    own.set_attr("to", session.full.to_string());
    session.send(own);
    if initial {
        let bare = server.bare.clone();
        for item in roster.iter().filter(|i| i.sub.to()) {
            if let Ok(to) = Jid::parse(&item.jid) {
                server.route(&bare, &to, presence(Some("probe")));
            }
        }
        if priority >= 0 {
            deliver_offline(server, session);
        }
        for stanza in server.store.pending().unwrap_or_default() {
            if let Ok(mut p) = granary_wire::stanza::parse_element(stanza.as_bytes(), ns::CLIENT) {
                p.set_attr("to", server.bare.to_string());
                session.send(p);
            }
        }
    }
}

/// At most this much of the offline store goes to one session at once
/// (well under what a session may have queued or unacknowledged); the rest
/// stays for its next presence.
const OFFLINE_BATCH: usize = 2_000;
const OFFLINE_BATCH_BYTES: usize = 4 << 20;

/// Hands offline messages to a session that just became available; those
/// handed over are removed.
pub fn deliver_offline(server: &Rc<Server>, session: &Rc<Session>) {
    let Ok(stored) = server.store.offline(OFFLINE_BATCH) else {
        return;
    };
    let mut last = None;
    let mut bytes = 0;
    for (count, (id, xml)) in stored.into_iter().enumerate() {
        if count >= OFFLINE_BATCH || bytes + xml.len() > OFFLINE_BATCH_BYTES {
            break;
        }
        bytes += xml.len();
        if let Ok(el) = granary_wire::stanza::parse_element(xml.as_bytes(), ns::CLIENT) {
            session.send(el);
        }
        last = Some(id);
    }
    if let Some(last) = last {
        let _ = server.store.forget_offline(last);
    }
}

/// Presence from someone else for this account.
pub fn inbound(server: &Rc<Server>, from: &Jid, to: &Jid, el: Element) {
    let kind = el.attr("type").map(str::to_owned);
    let contact = from.bare_text();
    let store = &server.store;
    let item = store.item(&contact).ok().flatten();
    let interested = || -> Vec<Rc<Session>> {
        server
            .all_sessions()
            .into_iter()
            .filter(|s| s.state.borrow().interested || s.available())
            .collect()
    };
    let to_sessions = |el: &Element| {
        for s in interested() {
            let mut copy = el.clone();
            copy.set_attr("to", server.bare.to_string());
            s.send(copy);
        }
    };
    match kind.as_deref() {
        Some("subscribe") => {
            if item.as_ref().is_some_and(|i| i.sub.from()) {
                server.route(
                    &server.bare.clone(),
                    &from.bare(),
                    presence(Some("subscribed")),
                );
                return;
            }
            let mut keep = el.clone();
            keep.set_attr("from", contact.clone());
            let _ = store.add_pending(&contact, &keep.to_xml(ns::CLIENT));
            to_sessions(&keep);
        }
        Some("subscribed") => {
            let Some(mut item) = item.filter(|i| i.ask) else {
                return;
            };
            item.ask = false;
            item.sub = item.sub.with_to(true);
            if let Ok(ver) = store.put_item(&item) {
                roster_push(server, &item, ver, false);
            }
            to_sessions(&el);
        }
        Some("unsubscribe") => {
            let _ = store.remove_pending(&contact);
            let Some(mut item) = item.filter(|i| i.sub.from()) else {
                return;
            };
            item.sub = item.sub.with_from(false);
            if let Ok(ver) = store.put_item(&item) {
                roster_push(server, &item, ver, false);
            }
            to_sessions(&el);
            // They no longer see the user's presence (RFC 6121 §3.3.3).
            for s in server.all_sessions().into_iter().filter(|s| s.available()) {
                server.route(&s.full, &from.bare(), presence(Some("unavailable")));
            }
        }
        Some("unsubscribed") => {
            let Some(mut item) = item.filter(|i| i.sub.to() || i.ask) else {
                return;
            };
            item.sub = item.sub.with_to(false);
            item.ask = false;
            if let Ok(ver) = store.put_item(&item) {
                roster_push(server, &item, ver, false);
            }
            to_sessions(&el);
        }
        Some("probe") => {
            if !item.is_some_and(|i| i.sub.from()) {
                return;
            }
            for s in server.all_sessions() {
                let current = s.state.borrow().presence.clone();
                if let Some(p) = current {
                    server.route(&s.full, from, strip_addresses(p));
                }
            }
        }
        None | Some("unavailable") | Some("error") => {
            let subscribed = item.is_some_and(|i| i.sub.to());
            let full = from.to_string();
            // A room's occupants answer from their own nick addresses
            // (XEP-0045): presence sent to room/nick lets the room in.
            let room_of = |d: &String| d.split_once('/').is_some_and(|(b, _)| *b == *contact);
            let directed = server.all_sessions().iter().any(|s| {
                let st = s.state.borrow();
                st.directed.contains(&full)
                    || st.directed.contains(&contact)
                    || st.directed.iter().any(room_of)
            });
            // Leaving a room ends the directed presence before the room's
            // answer (XEP-0045 §7.14: unavailable, 110 "this is you").
            let left_room = kind.as_deref() == Some("unavailable")
                && el.child("x", crate::room::MUC_USER).is_some_and(|x| {
                    x.elements()
                        .any(|s| s.name == "status" && s.attr("code") == Some("110"))
                })
                && to
                    .resource
                    .as_deref()
                    .and_then(|r| server.session(r))
                    .is_some_and(|s| s.state.borrow_mut().leaving.remove(&full));
            if !subscribed && !directed && !left_room && kind.as_deref() != Some("error") {
                return;
            }
            match to.resource.as_deref() {
                Some(r) => {
                    if let Some(s) = server.session(r) {
                        s.send(el);
                    }
                }
                None => {
                    for s in server.all_sessions().into_iter().filter(|s| s.available()) {
                        let mut copy = el.clone();
                        copy.set_attr("to", s.full.to_string());
                        s.send(copy);
                    }
                }
            }
        }
        _ => {}
    }
}

/// Makes `contact` (a bare address) the account's contact with a
/// subscription both ways, as the host asks when someone redeemed an
/// invite this user made: no request and no approval, because the user
/// approved by inviting. The user's current presence goes to the new
/// contact, and a probe asks for theirs.
pub fn befriend(server: &Rc<Server>, contact: &Jid, name: &str) -> Result<(), String> {
    let jid = contact.bare_text();
    if contact.bare() == server.bare {
        return Err("bad-request: that is this account".to_owned());
    }
    let store = &server.store;
    let mut item = store
        .item(&jid)
        .map_err(|e| format!("internal-server-error: {e}"))?
        .unwrap_or_else(|| Item::new(&jid));
    item.sub = item.sub.with_to(true).with_from(true);
    item.ask = false;
    if item.name.is_none() && !name.is_empty() {
        item.name = Some(name.to_owned());
    }
    let _ = store.remove_pending(&jid);
    let ver = store
        .put_item(&item)
        .map_err(|e| format!("internal-server-error: {e}"))?;
    roster_push(server, &item, ver, false);
    for s in server.all_sessions() {
        let current = s.state.borrow().presence.clone();
        if let Some(p) = current {
            server.route(&s.full, &contact.bare(), strip_addresses(p));
        }
    }
    // And ask for theirs: whichever of the two accounts is told second,
    // this gets both sides each other's presence (what the first one sent
    // was dropped, as the second did not know it yet).
    if server.all_sessions().iter().any(|s| s.available()) {
        server.route(
            &server.bare.clone(),
            &contact.bare(),
            presence(Some("probe")),
        );
    }
    Ok(())
}
