//! Chat end to end: the real daemon and gateway (STARTTLS and direct TLS,
//! SASL with `xmpp` app passwords), each user's chat grain started on
//! demand in its jail, stanzas between grains through the host, and real
//! clients: Python `slixmpp`, `go-sendxmpp`.

use granary_testkit::xmpp::XmppHost;

fn host(users: &[&str]) -> XmppHost {
    XmppHost::start(users, "[grains]\nidle_timeout = \"60s\"\n")
}

fn check(h: &XmppHost, script: &str) {
    let (ok, out) = h.python(script);
    assert!(ok, "the client script failed:\n{out}");
}

#[test]
fn two_users_subscribe_and_chat_over_starttls_and_direct_tls() {
    let h = host(&["alice", "bob"]);
    check(
        &h,
        r#"
from granary_xmpp_test import *

async def main():
    alice = await Client("alice", "laptop", "starttls").online()
    bob = await Client("bob", "phone", "tls").online()
    # Bob's client approves and subscribes back (slixmpp's defaults).
    alice.send_presence_subscription(pto=bob.boundjid.bare)
    await next_of(alice.presences, lambda p: p["from"].bare == bob.boundjid.bare)
    await next_of(bob.presences, lambda p: p["from"].bare == alice.boundjid.bare)
    # The roster (versioned: the pushes kept the client's copy current).
    await alice.get_roster()
    assert alice.client_roster[bob.boundjid.bare]["subscription"] == "both"
    assert bob.client_roster[alice.boundjid.bare]["subscription"] == "both"
    alice.send_message(mto=bob.boundjid.bare, mbody="hello bob", mtype="chat")
    m = await next_of(bob.messages, lambda m: m["body"] == "hello bob")
    assert m["from"] == alice.boundjid, m["from"]
    bob.send_message(mto=m["from"], mbody="hi alice", mtype="chat")
    m = await next_of(alice.messages, lambda m: m["body"] == "hi alice")
    assert m["from"] == bob.boundjid, m["from"]
    # A ping to the server and to the other account.
    await alice.plugin["xep_0199"].ping(jid=alice.boundjid.domain, timeout=10)
    info = await alice.plugin["xep_0030"].get_info(jid=alice.boundjid.domain)
    assert "urn:xmpp:carbons:2" in info["disco_info"]["features"], info
    for c in (alice, bob):
        c.disconnect()

run(main)
"#,
    );
}
