//! The account's logic without a network: a session's stanzas in, what
//! the session is sent out.

use std::cell::RefCell;
use std::rc::Rc;

use granary_wire::stanza::{Element, parse_element};
use tokio::sync::mpsc;

use crate::server::{Out, Server, Session, SessionState};
use crate::store::Store;

struct Account {
    _dir: tempfile::TempDir,
    server: Rc<Server>,
}

fn account() -> Account {
    let dir = tempfile::tempdir().unwrap();
    let store = Rc::new(Store::open(dir.path()).unwrap());
    let server = Rc::new(Server::new(store, "alice", "example.org").unwrap());
    Account { _dir: dir, server }
}

fn session(a: &Account, resource: &str) -> (Rc<Session>, mpsc::UnboundedReceiver<Out>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let s = Rc::new(Session {
        resource: resource.to_owned(),
        full: a.server.bare.with_resource(resource),
        state: RefCell::new(SessionState {
            out: Some(tx),
            ..Default::default()
        }),
        spill: None,
    });
    a.server
        .sessions
        .borrow_mut()
        .insert(resource.to_owned(), s.clone());
    (s, rx)
}

fn send(a: &Account, s: &Rc<Session>, xml: &str) {
    let el = parse_element(xml.as_bytes(), crate::ns::CLIENT).unwrap();
    crate::session::stanza(&a.server, s, el).unwrap();
}

fn received(rx: &mut mpsc::UnboundedReceiver<Out>) -> Vec<Element> {
    let mut out = Vec::new();
    while let Ok(Out::Xml(x)) = rx.try_recv() {
        out.push(parse_element(x.as_bytes(), crate::ns::CLIENT).unwrap());
    }
    out
}

/// The item of a roster push.
fn pushed_item(push: &Element) -> &Element {
    push.child("query", "jabber:iq:roster")
        .and_then(|q| q.child("item", "jabber:iq:roster"))
        .expect("a roster push")
}

#[test]
fn roster_versions_and_pushes() {
    let a = account();
    let (s, mut rx) = session(&a, "laptop");
    send(
        &a,
        &s,
        "<iq type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>",
    );
    let r = received(&mut rx);
    assert_eq!(
        r[0].child("query", "jabber:iq:roster").unwrap().attr("ver"),
        Some("0")
    );
    send(
        &a,
        &s,
        "<iq type='set' id='r2'><query xmlns='jabber:iq:roster'><item jid='Bob@Example.org' name='Bob'><group>Friends</group></item></query></iq>",
    );
    let r = received(&mut rx);
    // The push, then the result.
    let push = r.iter().find(|e| e.attr("type") == Some("set")).unwrap();
    let item = pushed_item(push);
    assert_eq!(item.attr("jid"), Some("bob@example.org"));
    assert_eq!(item.attr("subscription"), Some("none"));
    assert!(
        r.iter()
            .any(|e| e.attr("id") == Some("r2") && e.attr("type") == Some("result"))
    );
    // The same version: an empty result.
    send(
        &a,
        &s,
        "<iq type='get' id='r3'><query xmlns='jabber:iq:roster' ver='1'/></iq>",
    );
    let r = received(&mut rx);
    assert!(r[0].children.is_empty(), "{r:?}");
    // Subscribing sets ask; bob's answer (routed here) makes it "to".
    send(&a, &s, "<presence to='bob@example.org' type='subscribe'/>");
    let r = received(&mut rx);
    let item = pushed_item(&r[0]);
    assert_eq!(item.attr("ask"), Some("subscribe"));
    a.server
        .deliver_routed(
            "bob@example.org",
            "alice@example.org",
            "<presence type='subscribed'/>",
        )
        .unwrap();
    let r = received(&mut rx);
    let item = pushed_item(&r[0]);
    assert_eq!(
        (item.attr("subscription"), item.attr("ask")),
        (Some("to"), None)
    );
    // A subscribed from someone never asked is ignored.
    a.server
        .deliver_routed(
            "carol@example.org",
            "alice@example.org",
            "<presence type='subscribed'/>",
        )
        .unwrap();
    assert!(received(&mut rx).is_empty());
    // Presence from bob now reaches an available session; carol's does not.
    send(&a, &s, "<presence/>");
    received(&mut rx);
    a.server
        .deliver_routed("bob@example.org/phone", "alice@example.org", "<presence/>")
        .unwrap();
    a.server
        .deliver_routed(
            "carol@example.org/phone",
            "alice@example.org",
            "<presence/>",
        )
        .unwrap();
    let r = received(&mut rx);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].attr("from"), Some("bob@example.org/phone"));
}

#[test]
fn offline_then_blocked() {
    let a = account();
    a.server
        .deliver_routed(
            "bob@example.org/x",
            "alice@example.org",
            "<message type='chat'><body>one</body></message>",
        )
        .unwrap();
    assert_eq!(a.server.store.offline_count().unwrap(), 1);
    let (s, mut rx) = session(&a, "laptop");
    send(&a, &s, "<presence/>");
    let r = received(&mut rx);
    let m = r
        .iter()
        .find(|e| e.name == "message")
        .expect("the offline message");
    assert_eq!(m.child("body", crate::ns::CLIENT).unwrap().text(), "one");
    assert!(m.child("delay", crate::ns::DELAY).is_some());
    assert_eq!(a.server.store.offline_count().unwrap(), 0);
    send(
        &a,
        &s,
        "<iq type='set' id='b'><block xmlns='urn:xmpp:blocking'><item jid='bob@example.org'/></block></iq>",
    );
    received(&mut rx);
    a.server
        .deliver_routed(
            "bob@example.org/x",
            "alice@example.org",
            "<message type='chat'><body>two</body></message>",
        )
        .unwrap();
    assert!(received(&mut rx).is_empty());
    // Sending to a blocked address is refused with the blocking error.
    send(
        &a,
        &s,
        "<message to='bob@example.org' id='m' type='chat'><body>x</body></message>",
    );
    let r = received(&mut rx);
    let err = r[0].child("error", crate::ns::CLIENT).unwrap();
    assert!(
        err.child("blocked", crate::ns::BLOCKING_ERRORS).is_some(),
        "{r:?}"
    );
}

#[test]
fn pep_items_follow_access() {
    let a = account();
    let (s, mut rx) = session(&a, "laptop");
    send(
        &a,
        &s,
        "<iq type='set' id='p'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='urn:xmpp:avatar:metadata'><item id='abc'><metadata xmlns='urn:xmpp:avatar:metadata'><info id='abc' bytes='1' type='image/png'/></metadata></item></publish></pubsub></iq>",
    );
    let r = received(&mut rx);
    assert!(
        r.iter()
            .any(|e| e.attr("id") == Some("p") && e.attr("type") == Some("result")),
        "{r:?}"
    );
    // Her own read.
    send(
        &a,
        &s,
        "<iq type='get' id='g' to='alice@example.org'><pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='urn:xmpp:avatar:metadata'/></pubsub></iq>",
    );
    let r = received(&mut rx);
    let xml = r[0].to_xml(crate::ns::CLIENT);
    assert!(xml.contains("image/png"), "{xml}");
}
