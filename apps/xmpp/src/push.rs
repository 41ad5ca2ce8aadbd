//! Push notifications (XEP-0357): a client registers its app server
//! (`<enable jid node>` with the publish options it needs); when a message
//! arrives and no connected session can take it (the user is offline, or
//! every session is detached waiting to be resumed, as a phone's is while
//! it sleeps), the account publishes a notification to each registered app
//! server through the host, like any stanza it sends.
//!
//! Notifications go only to app servers the admin named
//! (`[xmpp] push_servers`, given to the grain as
//! `GRANARY_XMPP_PUSH_SERVERS`); registrations for others are kept, and
//! served once their server is named. A notification carries the message
//! count and nothing of the message (not its sender, not its body): the
//! app server, usually someone else's, learns only that something arrived.

use std::rc::Rc;

use granary_wire::stanza::Element;

use crate::account::result_for;
use crate::jid::Jid;
use crate::ns;
use crate::server::Server;

pub const NS: &str = "urn:xmpp:push:0";
const SUMMARY: &str = "urn:xmpp:push:summary";
/// Registrations one account keeps (each is a stanza per message).
const MAX_REGISTRATIONS: u64 = 16;
/// The publish options form a client gives, at most.
const MAX_OPTIONS: usize = 8 * 1024;
/// At most one notification per registration this often: the first
/// wakes the app, which then fetches everything waiting.
const MIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
/// The id prefix of notifications, so an app server's refusal is known.
const ID_PREFIX: &str = "xep0357-";

/// The app servers notifications may go to, from the environment.
pub fn servers_from_env() -> Vec<String> {
    std::env::var("GRANARY_XMPP_PUSH_SERVERS")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// `<enable/>` and `<disable/>` from the user's own client.
pub fn handle(server: &Rc<Server>, el: &Element, payload: &Element) -> Element {
    let bad = |text: &str| crate::server::error_reply(el, "modify", "bad-request", Some(text));
    let Some(jid) = payload.attr("jid").and_then(|j| Jid::parse(j).ok()) else {
        return bad("the app server's jid is missing or malformed");
    };
    let jid = jid.to_string();
    let node = payload.attr("node").filter(|n| !n.is_empty());
    let store = &server.store;
    let failed = || crate::server::error_reply(el, "wait", "internal-server-error", None);
    if payload.name == "disable" {
        return match store.push_remove(&jid, node) {
            Ok(_) => result_for(el),
            Err(_) => failed(),
        };
    }
    let Some(node) = node else {
        return bad("enable names a node");
    };
    if node.len() > 1024 {
        return bad("the node is too long");
    }
    // The publish options (a data form with the secret the app server
    // wants back), kept as the client sent them.
    let options = payload
        .child("x", ns::DATA)
        .map(|x| x.to_xml(ns::CLIENT))
        .unwrap_or_default();
    if options.len() > MAX_OPTIONS {
        return bad("the publish options are too large");
    }
    match store.push_add(&jid, node, &options, MAX_REGISTRATIONS) {
        Ok(true) => {
            if !server
                .push_servers
                .iter()
                .any(|s| s.eq_ignore_ascii_case(&jid))
            {
                // What the admin needs to know to serve it.
                granary_sdk::log::info(&format!(
                    "push: a client registered {jid}, which is not in [xmpp] push_servers: \
                     kept, but no notifications go there"
                ));
            }
            result_for(el)
        }
        Ok(false) => crate::server::error_reply(
            el,
            "wait",
            "resource-constraint",
            Some("too many push registrations; disable one first"),
        ),
        Err(_) => failed(),
    }
}

/// A message arrived that no connected session took: tells each
/// registered app server that the admin named.
pub fn notify(server: &Rc<Server>) {
    if server.push_servers.is_empty() {
        return;
    }
    let Ok(registrations) = server.store.push_registrations() else {
        return;
    };
    let waiting = server.store.offline_count().unwrap_or(0).max(1);
    let now = std::time::Instant::now();
    for (jid, node, options) in registrations {
        if !server
            .push_servers
            .iter()
            .any(|s| s.eq_ignore_ascii_case(&jid))
        {
            continue;
        }
        {
            let mut sent = server.push_sent.borrow_mut();
            let key = format!("{jid}\0{node}");
            if sent
                .get(&key)
                .is_some_and(|t| now.duration_since(*t) < MIN_INTERVAL)
            {
                continue;
            }
            sent.insert(key, now);
        }
        let Ok(to) = Jid::parse(&jid) else {
            continue;
        };
        let form = Element::new("x", ns::DATA)
            .with_child(field("FORM_TYPE", SUMMARY))
            .with_child(field("message-count", &waiting.to_string()));
        let mut publish = Element::new("pubsub", ns::PUBSUB).with_child(
            Element::new("publish", ns::PUBSUB)
                .with_attr("node", node)
                .with_child(
                    Element::new("item", ns::PUBSUB)
                        .with_child(Element::new("notification", NS).with_child(form)),
                ),
        );
        if let Ok(x) = granary_wire::stanza::parse_element(options.as_bytes(), ns::CLIENT)
            && x.is("x", ns::DATA)
        {
            publish.push(Element::new("publish-options", ns::PUBSUB).with_child(x));
        }
        let iq = Element::new("iq", ns::CLIENT)
            .with_attr("type", "set")
            .with_attr("id", format!("{ID_PREFIX}{}", crate::server::random_id()))
            .with_child(publish);
        server.route(&server.bare.clone(), &to, iq);
    }
}

/// An error answered to a notification: the app server no longer takes
/// this account's notifications (the app was removed, the token expired),
/// so its registrations go, as XEP-0357 §7 advises.
pub fn refused(server: &Server, from: &Jid, el: &Element) -> bool {
    if el.attr("type") != Some("error") || !el.attr("id").is_some_and(|i| i.starts_with(ID_PREFIX))
    {
        return false;
    }
    let jid = from.to_string();
    if let Ok(n) = server.store.push_remove(&jid, None)
        && n > 0
    {
        granary_sdk::log::info(&format!(
            "push: {jid} refused a notification; its {n} registration(s) are removed"
        ));
    }
    true
}

fn field(var: &str, value: &str) -> Element {
    Element::new("field", ns::DATA)
        .with_attr("var", var)
        .with_child(Element::new("value", ns::DATA).with_text(value))
}
