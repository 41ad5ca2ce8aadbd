//! An XMPP stream after login: any bytes are cut into frames or refused
//! without panicking, and every stanza read, written back out, reads as
//! the same tree.

#![no_main]

use granary_wire::stanza::{Frame, next_frame, parse_element};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((frame, n))) = next_frame(rest, 64 << 10, "jabber:client") {
        assert!(n > 0 && n <= rest.len());
        if let Frame::Stanza(el) = frame {
            let xml = el.to_xml("jabber:client");
            let again = parse_element(xml.as_bytes(), "jabber:client").expect("our own output reads");
            assert_eq!(again, el);
        }
        rest = &rest[n..];
    }
});
