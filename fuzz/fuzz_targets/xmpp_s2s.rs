//! A server-to-server stream from another server: any bytes are cut into
//! frames (dialback elements included) or refused without panicking; a
//! stanza that passes the addressing checks has a `from` in a proven
//! domain and a `to` in ours, and survives the move to `jabber:client`
//! and back unchanged.

#![no_main]

use granary_wire::s2s::{addressed, to_client, to_server};
use granary_wire::stanza::{Element, Frame, Node, next_frame, parse_element};
use granary_wire::xmpp::{NS_CLIENT, NS_SERVER};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((frame, n))) = next_frame(rest, 64 << 10, NS_SERVER) {
        assert!(n > 0 && n <= rest.len());
        if let Frame::Stanza(el) = frame
            && let Ok(a) = addressed(&el, |d| d == "a.test", |d| d == "b.test")
        {
            assert_eq!(a.from.domain, "a.test");
            assert_eq!(a.to.domain, "b.test");
            let mut inside = el.clone();
            to_client(&mut inside);
            let xml = inside.to_xml(NS_CLIENT);
            let mut back = parse_element(xml.as_bytes(), NS_CLIENT).expect("our own output reads");
            to_server(&mut back);
            // (An element already in jabber:client on the wire comes back
            // in jabber:server: the one namespace both sides mean.)
            if !mentions(&el, NS_CLIENT) {
                assert_eq!(back, el);
            }
        }
        rest = &rest[n..];
    }
});

fn mentions(el: &Element, ns: &str) -> bool {
    el.ns == ns
        || el
            .children
            .iter()
            .any(|c| matches!(c, Node::Element(e) if mentions(e, ns)))
}
