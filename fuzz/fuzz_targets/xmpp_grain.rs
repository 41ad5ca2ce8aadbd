//! The chat grain's stanza handling: a client's stream after binding
//! (any bytes, cut into stanzas) and stanzas another grain routes here
//! (`from NUL to NUL stanza`) go through the account's logic (roster,
//! presence, MAM, PEP, blocking, delivery) against a real store without
//! panicking; whatever the session is sent reads back as XML.

#![no_main]

use std::cell::RefCell;
use std::rc::Rc;

use granary_wire::stanza::{Frame, next_frame, parse_element};
use granary_xmpp::server::{Out, Server, Session, SessionState};
use granary_xmpp::store::Store;
use libfuzzer_sys::fuzz_target;

thread_local! {
    static ACCOUNT: (tempfile::TempDir, Rc<Server>) = {
        let dir = tempfile::tempdir().unwrap();
        // Uploads on, so slot requests are fuzzed too (set before any
        // thread reads the environment).
        unsafe { std::env::set_var("GRANARY_XMPP_UPLOAD_URL", "https://upload.fuzz.test") };
        let store = Rc::new(Store::open(dir.path()).unwrap());
        (dir, Rc::new(Server::new(store, "alice", "fuzz.test").unwrap()))
    };
}

fuzz_target!(|data: &[u8]| {
    ACCOUNT.with(|(_, server)| {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let session = Rc::new(Session {
            resource: "fuzz".to_owned(),
            full: server.bare.with_resource("fuzz"),
            state: RefCell::new(SessionState {
                out: Some(tx),
                ..Default::default()
            }),
            spill: None,
        });
        server.sessions.borrow_mut().insert("fuzz".to_owned(), session.clone());
        if let Some(routed) = data.strip_prefix(b"R") {
            let mut parts = routed.splitn(3, |&b| b == 0);
            let (from, to, stanza) = (parts.next(), parts.next(), parts.next());
            if let (Some(from), Some(to), Some(stanza)) = (from, to, stanza) {
                let _ = server.deliver_routed(
                    &String::from_utf8_lossy(from),
                    &String::from_utf8_lossy(to),
                    &String::from_utf8_lossy(stanza),
                );
            }
        } else {
            let mut rest = data;
            while let Ok(Some((frame, n))) = next_frame(rest, 64 << 10, "jabber:client") {
                if let Frame::Stanza(el) = frame
                    && granary_xmpp::session::stanza(server, &session, el).is_err()
                {
                    break;
                }
                rest = &rest[n..];
            }
        }
        server.sessions.borrow_mut().remove("fuzz");
        while let Ok(out) = rx.try_recv() {
            if let Out::Xml(xml) = out {
                parse_element(xml.as_bytes(), "jabber:client").expect("what we send is XML");
            }
        }
    });
});
