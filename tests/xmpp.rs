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
    # go-sendxmpp (Go's TLS, the local CA through SSL_CERT_FILE), over
    # direct TLS and over STARTTLS.
    import subprocess, tempfile
    home = tempfile.mkdtemp()
    env = dict(os.environ, SSL_CERT_FILE=os.environ["XMPP_CA"], HOME=home)
    for i, flags in enumerate((["-t", "-j", "127.0.0.1:" + os.environ["XMPPS_PORT"]], ["-j", "127.0.0.1:" + os.environ["XMPP_PORT"]])):
        p = await asyncio.create_subprocess_exec(
            "go-sendxmpp", "-u", "alice@chat.test", "-p", os.environ["XMPP_PASSWORD_ALICE"], *flags, "bob@chat.test",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        out, _ = await asyncio.wait_for(p.communicate(f"from go-sendxmpp {i}".encode()), 30)
        assert p.returncode == 0, out
        m = await next_of(bob.messages, lambda m: m["body"] == f"from go-sendxmpp {i}")
        assert m["from"].bare == "alice@chat.test", m["from"]
    for c in (alice, bob):
        c.disconnect()

run(main)
"#,
    );
}

#[test]
fn carbons_offline_messages_the_archive_and_resumption() {
    let h = host(&["alice", "bob"]);
    check(
        &h,
        r#"
from granary_xmpp_test import *
from slixmpp import JID

async def main():
    alice = await Client("alice", "laptop", plugins=("xep_0280", "xep_0313", "xep_0059")).online()
    phone = await Client("alice", "phone", "tls", plugins=("xep_0280",)).online()
    bob = await Client("bob", "desk").online()
    alice.send_presence_subscription(pto="bob@chat.test")
    await next_of(alice.presences, lambda p: p["from"].bare == "bob@chat.test")

    # Carbons: Alice's phone sees what her laptop sends and receives.
    got = asyncio.Queue()
    phone.add_event_handler("carbon_sent", lambda m: got.put_nowait(("sent", m)))
    phone.add_event_handler("carbon_received", lambda m: got.put_nowait(("received", m)))
    await phone.plugin["xep_0280"].enable()
    alice.send_message(mto="bob@chat.test/desk", mbody="from the laptop", mtype="chat")
    kind, m = await next_of(got)
    assert kind == "sent" and m["carbon_sent"]["body"] == "from the laptop", m
    bob.send_message(mto="alice@chat.test/laptop", mbody="to the laptop", mtype="chat")
    kind, m = await next_of(got)
    assert kind == "received" and m["carbon_received"]["body"] == "to the laptop", m
    await next_of(alice.messages, lambda m: m["body"] == "to the laptop")

    # Bob goes offline; what Alice sends meanwhile waits for him.
    bob.disconnect()
    await bob.disconnected
    for i in range(3):
        alice.send_message(mto="bob@chat.test", mbody=f"while away {i}", mtype="chat")
    await alice.plugin["xep_0199"].ping(jid="bob@chat.test", timeout=10)
    bob2 = await Client("bob", "desk2").online()
    bodies = [ (await next_of(bob2.messages, lambda m: m["body"].startswith("while away")))["body"] for _ in range(3)]
    assert bodies == [f"while away {i}" for i in range(3)], bodies

    # The archive: everything Alice exchanged with Bob, in pages of two.
    seen = []
    async for m in alice.plugin["xep_0313"].iterate(with_jid=JID("bob@chat.test"), rsm={"max": 2}):
        seen.append(m["mam_result"]["forwarded"]["stanza"]["body"])
    assert seen == ["from the laptop", "to the laptop"] + [f"while away {i}" for i in range(3)], seen

    # Stream management: the connection drops without a goodbye; what
    # arrives meanwhile is not lost once the client resumes.
    sm = await Client("bob", "mobile", plugins=("xep_0198",)).online()
    resumed = asyncio.get_event_loop().create_future()
    sm.add_event_handler("session_resumed", lambda _: resumed.done() or resumed.set_result(True))
    assert sm.plugin["xep_0198"].sm_id, "stream management was not enabled"
    sm.transport.abort()
    for i in range(3):
        alice.send_message(mto="bob@chat.test/mobile", mbody=f"during the drop {i}", mtype="chat")
    await alice.plugin["xep_0199"].ping(jid="bob@chat.test", timeout=10)
    sm.connect(host="127.0.0.1", port=int(os.environ["XMPP_PORT"]))
    await asyncio.wait_for(resumed, 20)
    got = [(await next_of(sm.messages, lambda m: m["body"].startswith("during")))["body"] for _ in range(3)]
    assert got == [f"during the drop {i}" for i in range(3)], got
    for c in (alice, phone, bob2, sm):
        c.disconnect()

run(main)
"#,
    );
    // What the admin sees of the accounts.
    let alice = h
        .daemon
        .granary(&["xmpp", "status", "alice", "--json"])
        .success()
        .json();
    assert_eq!(alice["address"], "alice@chat.test", "{alice}");
    assert_eq!(alice["contacts"], 1, "{alice}");
    // Five with Bob in the MAM check, three more during the drop.
    assert_eq!(alice["archived"], 8, "{alice}");
    assert_eq!(alice["offline"], 0, "{alice}");
    let text = h
        .daemon
        .granary(&["xmpp", "status", "bob"])
        .success()
        .stdout;
    assert!(text.contains("bob@chat.test"), "{text}");
    let refused = h.daemon.granary(&["xmpp", "status", "nobody"]).failure();
    assert!(refused.stderr.contains("no user named nobody"), "{refused}");
}

#[test]
fn nobody_can_send_as_someone_else_or_read_another_account() {
    let h = host(&["alice", "bob", "carol"]);
    check(
        &h,
        r#"
from granary_xmpp_test import *

async def main():
    alice = await Client("alice", "laptop", plugins=("xep_0313",)).online()
    carol = await Client("carol", "pc").online()
    bob = raw_login("bob", "desk")
    # Bob's client claims to be Alice: the message arrives from Bob.
    bob.sendall(b"<message to='carol@chat.test' from='alice@chat.test/laptop' type='chat'><body>forged</body></message>")
    m = await next_of(carol.messages, lambda m: m["body"] == "forged")
    assert m["from"] == "bob@chat.test/desk", m["from"]
    # Bob asks Alice's account for her roster, her archive, her bookmarks.
    probes = {
        "roster": "<iq type='get' id='r1' to='alice@chat.test'><query xmlns='jabber:iq:roster'/></iq>",
        "mam": "<iq type='set' id='m1' to='alice@chat.test'><query xmlns='urn:xmpp:mam:2'/></iq>",
        "blocklist": "<iq type='get' id='k1' to='alice@chat.test'><blocklist xmlns='urn:xmpp:blocking'/></iq>",
        "bookmarks": "<iq type='get' id='p1' to='alice@chat.test'><pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='urn:xmpp:bookmarks:1'/></pubsub></iq>",
    }
    # Alice has bookmarks (whitelist) and an archive worth stealing.
    alice.send_raw("<iq type='set' id='pub'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='urn:xmpp:bookmarks:1'><item id='room@rooms.chat.test'><conference xmlns='urn:xmpp:bookmarks:1' name='secret room'/></item></publish></pubsub></iq>")
    alice.send_message(mto="carol@chat.test", mbody="a private word", mtype="chat")
    await alice.plugin["xep_0199"].ping(jid="chat.test", timeout=10)
    for name, iq in probes.items():
        bob.sendall(iq.encode())
        r = read_until(bob, b"</iq>").decode()
        assert "type='error'" in r or 'type="error"' in r, (name, r)
        assert "secret room" not in r and "private word" not in r, (name, r)
    # Alice herself reads them.
    page = await alice.plugin["xep_0313"].retrieve(with_jid=slixmpp.JID("carol@chat.test"))
    assert [r["mam_result"]["forwarded"]["stanza"]["body"] for r in page["mam"]["results"]] == ["a private word"]
    bob.close()
    for c in (alice, carol):
        c.disconnect()

run(main)
"#,
    );

    // A wrong SCRAM proof fails and counts: after ten, even Alice's right
    // password is refused for now, from this address.
    let (ok, out) = h.python(
        r#"
from granary_xmpp_test import *
good = os.environ["XMPP_PASSWORD_ALICE"]
r = scram_attempt("alice", good)
assert "<success" in r, r
r = scram_attempt("alice", good, "SCRAM-SHA-1")
assert "<success" in r, r
for i in range(10):
    r = scram_attempt("alice", "wrong " + str(i))
    assert "not-authorized" in r, r
r = scram_attempt("alice", good)
assert "temporary-auth-failure" in r, r
print("ok")
"#,
    );
    assert!(ok, "{out}\n{}", h.daemon.log());
}

#[test]
fn bad_input_ends_that_stream_and_no_other() {
    // A low stanza rate, so a flood is one on any machine.
    let h = XmppHost::start(
        &["alice", "bob"],
        "[grains]\nidle_timeout = \"60s\"\n[xmpp]\nstanzas_per_second = 200\nstanza_burst = 1000\n",
    );
    check(
        &h,
        r#"
from granary_xmpp_test import *

def ends_with_stream_error(payload, condition):
    s = raw_login("bob", "bad")
    try:
        s.sendall(payload)
    except (ConnectionError, OSError):
        pass
    r = read_to_end(s).decode(errors="replace")
    assert "<stream:error>" in r and condition in r and r.rstrip().endswith("</stream:stream>"), (condition, r[-500:])
    s.close()

async def main():
    alice = await Client("alice", "laptop").online()
    bob = await Client("bob", "good").online()
    ends_with_stream_error(b"<!DOCTYPE x [<!ENTITY a 'aaaaaaaaaa'><!ENTITY b '&a;&a;&a;&a;'>]><message><body>&b;</body></message>", "restricted-xml")
    ends_with_stream_error(b"<message>" + b"<a>" * 5000 + b"</a>" * 5000 + b"</message>", "not-well-formed")
    ends_with_stream_error(b"<message to='alice@chat.test'><body>" + b"x" * (10 << 20) + b"</body></message>", "policy-violation")
    ends_with_stream_error(b"<iq type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>" * 5000, "policy-violation")
    ends_with_stream_error(b"<message to='alice@chat.test'><body>&nope;</body></message>", "not-well-formed")
    # An invalid address is the stanza's error (RFC 6120 8.3.3.8); the stream goes on.
    s = raw_login("bob", "jid")
    s.sendall(b"<message id='j1' to='a@b@c' type='chat'><body>x</body></message><iq type='get' id='after'><ping xmlns='urn:xmpp:ping'/></iq>")
    r = read_until(s, b"id='after'").decode()
    assert "jid-malformed" in r and "id='after'" in r, r
    s.close()
    # The others never noticed.
    bob.send_message(mto="alice@chat.test", mbody="still here", mtype="chat")
    await next_of(alice.messages, lambda m: m["body"] == "still here")
    for c in (alice, bob):
        c.disconnect()

run(main)
"#,
    );
}
