//! PEP (XEP-0163): the account's own pubsub nodes, as avatars (XEP-0084)
//! and bookmarks (XEP-0402) use them. Access is `presence` (contacts with
//! a subscription to the user's presence), `whitelist` (the user alone)
//! or `open`; items are kept up to the node's `max_items`.

use std::rc::Rc;

use granary_wire::stanza::{Element, parse_element};

use crate::account::{result_for, sees_presence};
use crate::jid::Jid;
use crate::ns;
use crate::server::{Server, error_reply};

/// Items a node keeps when `max_items` says `max`.
const MAX_ITEMS: u32 = 1000;
/// The largest item payload kept.
const MAX_PAYLOAD: usize = 128 << 10;

/// A node's options from `publish-options`, with XEP-0402's defaults for
/// bookmarks; and whether any were given.
fn options(node: &str, pubsub: &Element) -> (String, u32, bool) {
    let bookmarks = node == ns::BOOKMARKS2;
    let mut access = if bookmarks { "whitelist" } else { "presence" }.to_owned();
    let mut max = if bookmarks { MAX_ITEMS } else { 1 };
    let form = pubsub
        .child("publish-options", ns::PUBSUB)
        .and_then(|o| o.child("x", ns::DATA));
    let given = form.is_some();
    for f in form.iter().flat_map(|x| x.elements()) {
        let value = f
            .child("value", ns::DATA)
            .map(|v| v.text())
            .unwrap_or_default();
        match f.attr("var") {
            Some("pubsub#access_model")
                if matches!(value.as_str(), "presence" | "whitelist" | "open") =>
            {
                access = value;
            }
            Some("pubsub#max_items") => {
                max = match value.as_str() {
                    "max" => MAX_ITEMS,
                    n => n.parse().unwrap_or(max).clamp(1, MAX_ITEMS),
                }
            }
            _ => {}
        }
    }
    (access, max, given)
}

fn may_read(server: &Server, who: &Jid, own: bool, access: &str) -> bool {
    own || access == "open" || (access == "presence" && sees_presence(server, who))
}

/// Sends an event to the user's sessions and, for nodes contacts may
/// read, to those contacts.
fn notify(server: &Rc<Server>, node: &str, access: &str, items: Element) {
    let event = |to: &str| {
        Element::new("message", ns::CLIENT)
            .with_attr("from", server.bare.to_string())
            .with_attr("to", to)
            .with_attr("type", "headline")
            .with_child(Element::new("event", ns::PUBSUB_EVENT).with_child(items.clone()))
    };
    for s in server.all_sessions().into_iter().filter(|s| s.available()) {
        s.send(event(&s.full.to_string()));
    }
    if access == "whitelist" {
        return;
    }
    let _ = node;
    let bare = server.bare.clone();
    for item in server.store.roster().unwrap_or_default() {
        if item.sub.from()
            && let Ok(to) = Jid::parse(&item.jid)
        {
            server.route(&bare, &to, event(&item.jid));
        }
    }
}

pub fn handle(
    server: &Rc<Server>,
    from: &Jid,
    own: bool,
    el: &Element,
    pubsub: &Element,
) -> Element {
    let kind = el.attr("type").unwrap_or("");
    let Some(op) = pubsub.elements().next() else {
        return error_reply(el, "modify", "bad-request", None);
    };
    let node = op.attr("node").unwrap_or("").to_owned();
    if node.is_empty() || node.len() > 1024 {
        return error_reply(el, "modify", "bad-request", Some("a node is named"));
    }
    let store = &server.store;
    match (kind, pubsub.ns.as_str(), op.name.as_str()) {
        ("set", ns::PUBSUB, "publish") if own => {
            let Some(item) = op.child("item", ns::PUBSUB) else {
                return error_reply(el, "modify", "bad-request", Some("publish one item"));
            };
            let Some(payload) = item.elements().next() else {
                return error_reply(el, "modify", "bad-request", Some("the item is empty"));
            };
            let xml = payload.to_xml("");
            if xml.len() > MAX_PAYLOAD {
                return error_reply(
                    el,
                    "modify",
                    "not-acceptable",
                    Some("the item is too large"),
                );
            }
            let id = item
                .attr("id")
                .map(str::to_owned)
                .unwrap_or_else(crate::server::random_id);
            let (mut access, max, given) = options(&node, pubsub);
            // An existing node keeps its options; publish-options that
            // differ are a precondition that fails (XEP-0060 §7.1.5).
            if let Some((current, current_max)) = store.node_config(&node).ok().flatten() {
                if given && (current != access || current_max != max) {
                    let mut e =
                        error_reply(el, "cancel", "conflict", Some("the node has other options"));
                    if let Some(granary_wire::stanza::Node::Element(err)) = e.children.last_mut() {
                        err.push(Element::new(
                            "precondition-not-met",
                            "http://jabber.org/protocol/pubsub#errors",
                        ));
                    }
                    return e;
                }
                access = current;
            }
            if store.publish(&node, &id, &xml, &access, max).is_err() {
                return error_reply(el, "wait", "internal-server-error", None);
            }
            let event_item = Element::new("items", ns::PUBSUB_EVENT)
                .with_attr("node", node.clone())
                .with_child(
                    Element::new("item", ns::PUBSUB_EVENT)
                        .with_attr("id", id.clone())
                        .with_child(payload.clone()),
                );
            notify(server, &node, &access, event_item);
            result_for(el).with_child(
                Element::new("pubsub", ns::PUBSUB).with_child(
                    Element::new("publish", ns::PUBSUB)
                        .with_attr("node", node)
                        .with_child(Element::new("item", ns::PUBSUB).with_attr("id", id)),
                ),
            )
        }
        ("get", ns::PUBSUB, "items") => {
            let Some(access) = store.node_access(&node).ok().flatten() else {
                return error_reply(el, "cancel", "item-not-found", None);
            };
            if !may_read(server, from, own, &access) {
                return error_reply(el, "auth", "forbidden", None);
            }
            let ids: Vec<String> = op
                .elements()
                .filter_map(|i| i.attr("id"))
                .map(str::to_owned)
                .collect();
            let max = op
                .attr("max_items")
                .and_then(|m| m.parse().ok())
                .unwrap_or(MAX_ITEMS as usize);
            let mut items = Element::new("items", ns::PUBSUB).with_attr("node", node.clone());
            for (id, payload) in store.items(&node, &ids, max).unwrap_or_default() {
                let mut item = Element::new("item", ns::PUBSUB).with_attr("id", id);
                if let Ok(p) = parse_element(payload.as_bytes(), ns::CLIENT) {
                    item.push(p);
                }
                items.push(item);
            }
            result_for(el).with_child(Element::new("pubsub", ns::PUBSUB).with_child(items))
        }
        ("set", ns::PUBSUB, "retract") if own => {
            let access = store.node_access(&node).ok().flatten().unwrap_or_default();
            for item in op.elements().filter_map(|i| i.attr("id")) {
                if store.retract(&node, item).unwrap_or(false)
                    && op.attr("notify").is_some_and(|n| n == "true" || n == "1")
                {
                    let retract = Element::new("items", ns::PUBSUB_EVENT)
                        .with_attr("node", node.clone())
                        .with_child(
                            Element::new("retract", ns::PUBSUB_EVENT).with_attr("id", item),
                        );
                    notify(server, &node, &access, retract);
                }
            }
            result_for(el)
        }
        ("set", ns::PUBSUB_OWNER, "delete") if own => match store.delete_node(&node) {
            Ok(true) => result_for(el),
            Ok(false) => error_reply(el, "cancel", "item-not-found", None),
            Err(_) => error_reply(el, "wait", "internal-server-error", None),
        },
        (_, _, _) if !own => error_reply(el, "auth", "forbidden", None),
        _ => error_reply(el, "cancel", "feature-not-implemented", None),
    }
}
