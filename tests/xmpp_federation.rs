//! Federation end to end: the daemon's `xmpp-s2s` listener and its
//! streams to other servers, against two of Debian's Prosody on loopback
//! addresses of their own (`prosody.test` and `other.test`, on
//! 127.<10+n>.<pid>.2 and .3 for the n-th test), every name resolved by a DNS server the test starts
//! (dnsmasq; SRV records for each domain). `prosody.test` has a
//! certificate from a CA Granary is told to trust (`xmpp.s2s_ca`), so it
//! logs in to us with SASL EXTERNAL; `other.test`'s CA is not trusted, so
//! it is checked with dialback; we prove ourselves to both with dialback.
//! Real clients (slixmpp) on both sides.

use std::net::Ipv4Addr;

use granary_testkit::mail::{Dns, Record};
use granary_testkit::prosody::{Prosody, TestCa};
use granary_testkit::xmpp::XmppHost;

struct World {
    // Dropped in this order: clients' servers, then DNS.
    host: XmppHost,
    trusted: Prosody,
    untrusted: Prosody,
    dns: Dns,
    trusted_ca: TestCa,
    records: Vec<Record>,
    _certs: tempfile::TempDir,
    ca_bundle: std::path::PathBuf,
}

fn srv(domain: &str, ip: &str, port: u16) -> [Record; 2] {
    let host = format!("host.{domain}");
    [
        Record::Srv(
            format!("_xmpp-server._tcp.{domain}"),
            host.clone(),
            port,
            0,
            5,
        ),
        Record::A(host, ip.to_owned()),
    ]
}

/// Loopback addresses of this test's own for the two Prosody servers:
/// tests run side by side, and a port is only free per address.
fn peer_addresses() -> (Ipv4Addr, Ipv4Addr) {
    static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let third = (std::process::id() % 250) as u8 + 1;
    (
        Ipv4Addr::new(127, 10 + n, third, 2),
        Ipv4Addr::new(127, 10 + n, third, 3),
    )
}

fn world(extra_xmpp: &str) -> World {
    let (trusted_ip, untrusted_ip) = peer_addresses();
    let certs = tempfile::tempdir().unwrap();
    let trusted_ca = TestCa::new(certs.path(), "trusted-ca");
    let untrusted_ca = TestCa::new(certs.path(), "untrusted-ca");
    let mut dns = Dns::start(&[]);
    let host = XmppHost::start_listening(
        &["alice", "bob"],
        &format!(
            "[grains]\nidle_timeout = \"60s\"\n[xmpp]\ns2s_resolver = \"{}\"\ns2s_ca = \"{}\"\n\
             s2s_allow_private_addresses = true\n{extra_xmpp}\n",
            dns.addr,
            trusted_ca.pem().display()
        ),
        "xmpp-s2s = \"127.0.0.1:0\"",
    );
    let trusted = Prosody::start(
        "prosody.test",
        trusted_ip,
        &trusted_ca,
        dns.addr,
        &[("carol", "carol-pw")],
    );
    let untrusted = Prosody::start(
        "other.test",
        untrusted_ip,
        &untrusted_ca,
        dns.addr,
        &[("dave", "dave-pw")],
    );
    let s2s = host.daemon.listener("xmpp-s2s");
    let mut records = Vec::new();
    records.extend(srv("chat.test", "127.0.0.1", s2s.port()));
    records.extend(srv("prosody.test", &trusted_ip.to_string(), trusted.s2s));
    records.extend(srv("other.test", &untrusted_ip.to_string(), untrusted.s2s));
    dns.replace(&records);
    // The clients of the Prosody users trust both test CAs.
    let ca_bundle = certs.path().join("bundle.pem");
    let mut bundle = std::fs::read(trusted_ca.pem()).unwrap();
    bundle.extend(std::fs::read(untrusted_ca.pem()).unwrap());
    std::fs::write(&ca_bundle, bundle).unwrap();
    World {
        host,
        trusted,
        untrusted,
        dns,
        trusted_ca,
        records,
        _certs: certs,
        ca_bundle,
    }
}

impl World {
    /// Runs a client script after [`CLIENTS`] (its helpers).
    fn check(&self, script: &str) {
        let script = format!("{CLIENTS}{script}");
        let mut env = self.host.env();
        env.push(("PEER_CA".into(), self.ca_bundle.display().to_string()));
        env.push(("CAROL_C2S".into(), self.trusted.c2s.to_string()));
        env.push(("CAROL_IP".into(), self.trusted.ip.to_string()));
        env.push(("DAVE_C2S".into(), self.untrusted.c2s.to_string()));
        env.push(("DAVE_IP".into(), self.untrusted.ip.to_string()));
        env.push((
            "S2S_PORT".into(),
            self.host.daemon.listener("xmpp-s2s").port().to_string(),
        ));
        let (cert, key) = self.trusted_ca.leaf("fake.test");
        env.push(("FAKE_CERT".into(), cert.display().to_string()));
        env.push(("FAKE_KEY".into(), key.display().to_string()));
        let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let (ok, out) = granary_testkit::mail::run_python(&script, &env);
        let ok = ok && out.lines().any(|l| l.trim() == "ok");
        assert!(
            ok,
            "the client script failed:\n{out}\n--- granary log ---\n{}\n--- prosody.test log (tail) ---\n{}\n--- other.test log (tail) ---\n{}",
            self.host.daemon.log(),
            tail(&self.trusted.log()),
            tail(&self.untrusted.log()),
        );
        let _ = &self.dns;
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

const CLIENTS: &str = r#"
from granary_xmpp_test import *
import socket

S2S_HEADER = ("<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
              "xmlns:db='jabber:server:dialback' xmlns:stream='http://etherx.jabber.org/streams' "
              "from='{claim}' to='chat.test' version='1.0'>")

def s2s_stream(claim, cert=None, key=None):
    """A server stream to Granary claiming to be `claim`, after STARTTLS
    (presenting `cert` when given): the socket and the features."""
    s = socket.create_connection(("127.0.0.1", int(os.environ["S2S_PORT"])))
    s.settimeout(30)
    s.sendall(S2S_HEADER.format(claim=claim).encode())
    f = read_until(s, b"</stream:features>")
    assert b"<required/>" in f, f
    s.sendall(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    assert b"<proceed" in read_until(s, b"<proceed"), "no proceed"
    c = ssl.create_default_context(cafile=os.environ["XMPP_CA"])
    if cert:
        c.load_cert_chain(cert, key)
    s = c.wrap_socket(s, server_hostname="chat.test")
    s.sendall(S2S_HEADER.format(claim=claim).encode())
    return s, read_until(s, b"</stream:features>")

def fake_server():
    """fake.test, with a certificate from a CA Granary trusts: logged in by
    SASL EXTERNAL, its stream restarted."""
    s, f = s2s_stream("fake.test", os.environ["FAKE_CERT"], os.environ["FAKE_KEY"])
    assert b"<mechanism>EXTERNAL</mechanism>" in f, f
    s.sendall(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>")
    r = read_until(s, b"<success", b"</failure>")
    assert b"<success" in r, r
    s.sendall(S2S_HEADER.format(claim="fake.test").encode())
    read_until(s, b"</stream:features>", b"<stream:features/>")
    return s

def send_all(s, data):
    try:
        s.sendall(data)
    except OSError:
        pass

def carol():
    return Client("carol", "pc", domain="prosody.test", password="carol-pw",
                  address=(os.environ["CAROL_IP"], int(os.environ["CAROL_C2S"])), cafile=os.environ["PEER_CA"])

def dave():
    return Client("dave", "pc", domain="other.test", password="dave-pw",
                  address=(os.environ["DAVE_IP"], int(os.environ["DAVE_C2S"])), cafile=os.environ["PEER_CA"])
"#;

#[test]
fn messages_and_subscriptions_go_both_ways_with_prosody() {
    let w = world("");
    w.check(
        r#"
async def main():
    alice = await Client("alice", "laptop").online()
    c = await carol().online()
    d = await dave().online()
    # Alice asks Carol (prosody.test) for her presence; Carol's client
    # approves and asks back (slixmpp's defaults), through both servers.
    alice.send_presence_subscription(pto="carol@prosody.test")
    await next_of(alice.presences, lambda p: p["from"].bare == "carol@prosody.test", timeout=60)
    await next_of(c.presences, lambda p: p["from"].bare == "alice@chat.test", timeout=60)
    await alice.get_roster()
    assert alice.client_roster["carol@prosody.test"]["subscription"] == "both", alice.client_roster
    await c.get_roster()
    assert c.client_roster["alice@chat.test"]["subscription"] == "both"
    # Messages both ways, with the senders' full addresses.
    alice.send_message(mto="carol@prosody.test", mbody="hello prosody", mtype="chat")
    m = await next_of(c.messages, lambda m: m["body"] == "hello prosody")
    assert m["from"] == alice.boundjid, m["from"]
    c.send_message(mto=m["from"], mbody="hello granary", mtype="chat")
    m = await next_of(alice.messages, lambda m: m["body"] == "hello granary")
    assert m["from"] == c.boundjid, m["from"]
    # Dave's server (other.test) is not trusted by certificate: dialback,
    # both ways; a subscription from his side first.
    d.send_presence_subscription(pto="alice@chat.test")
    await next_of(d.presences, lambda p: p["from"].bare == "alice@chat.test", timeout=60)
    await d.get_roster()
    assert d.client_roster["alice@chat.test"]["subscription"] == "both", d.client_roster
    d.send_message(mto="alice@chat.test", mbody="from other.test", mtype="chat")
    m = await next_of(alice.messages, lambda m: m["body"] == "from other.test", timeout=60)
    assert m["from"] == d.boundjid, m["from"]
    alice.send_message(mto="dave@other.test", mbody="back to other.test", mtype="chat")
    await next_of(d.messages, lambda m: m["body"] == "back to other.test", timeout=60)
    # A message for Bob while he is offline reaches him at his next login.
    c.send_message(mto="bob@chat.test", mbody="for later", mtype="chat")
    # Errors come back as stanzas: no such user here, no such server there.
    c.send_message(mto="nobody@chat.test", mbody="anyone?", mtype="chat")
    e = await next_of(c.messages, lambda m: m["type"] == "error" and m["from"].bare == "nobody@chat.test")
    assert e["error"]["condition"] == "service-unavailable", e
    alice.send_message(mto="someone@nowhere.test", mbody="anyone?", mtype="chat")
    e = await next_of(alice.messages, lambda m: m["type"] == "error" and m["from"].bare == "someone@nowhere.test")
    assert e["error"]["condition"] == "remote-server-not-found", e
    # Pings across: Carol's client pings Alice's server.
    await c.plugin["xep_0199"].ping(jid="chat.test", timeout=20)
    bob = Client("bob", "phone")
    bob.register_plugin("xep_0313")
    await bob.online()
    m = await next_of(bob.messages, lambda m: m["body"] == "for later", timeout=30)
    assert m["from"].bare == "carol@prosody.test", m["from"]
    for x in (alice, bob, c, d):
        x.disconnect()

run(main)
"#,
    );
    // How each server proved itself, as the daemon's log tells it: the
    // trusted certificate by SASL EXTERNAL, the other by dialback.
    let log = w.host.daemon.log();
    for (domain, how) in [
        ("prosody.test", "sasl-external"),
        ("other.test", "dialback"),
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("s2s stream from another server proven")
                    && l.contains(&format!("domain=\"{domain}\""))
                    && l.contains(&format!("how=\"{how}\""))),
            "{domain} did not log in with {how}:\n{log}"
        );
    }
}

#[test]
fn spoofed_and_misbehaving_servers_are_refused_and_nobody_else_notices() {
    let w = world("s2s_stanzas_per_second = 100\ns2s_connections_per_domain = 2\n");
    w.check(
        r#"
async def main():
    alice = await Client("alice", "laptop").online()
    c = await carol().online()
    alice.send_presence_subscription(pto="carol@prosody.test")
    await next_of(alice.presences, lambda p: p["from"].bare == "carol@prosody.test", timeout=60)
    loop = asyncio.get_event_loop()
    def refused():
        # Dialback spoofing: claims other.test with a key other.test's own
        # server (Prosody, asked by Granary) never gave.
        s, f = s2s_stream("other.test")
        assert b"EXTERNAL" not in f and b"urn:xmpp:features:dialback" in f, f
        s.sendall(b"<db:result from='other.test' to='chat.test'>" + b"ab" * 32 + b"</db:result>")
        r = read_to_end(s)
        assert b"type='invalid'" in r and b"<not-authorized" in r, r
        # EXTERNAL without a certificate for the claimed domain.
        s, f = s2s_stream("prosody.test")
        s.sendall(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>")
        r = read_to_end(s)
        assert b"<failure" in r and b"<success" not in r, r
        # Stanzas from a domain the stream has not proven.
        s, f = s2s_stream("other.test")
        s.sendall(b"<message from='dave@other.test' to='alice@chat.test' type='chat'><body>spoofed 1</body></message>")
        r = read_to_end(s)
        assert b"<invalid-from" in r, r
        s = fake_server()
        s.sendall(b"<message from='carol@prosody.test' to='alice@chat.test' type='chat'><body>spoofed 2</body></message>")
        r = read_to_end(s)
        assert b"<invalid-from" in r, r
        # Bad input from a proven server: each ends that stream.
        cases = [
            (b"<!DOCTYPE x [<!ENTITY a 'b'>]><message/>", b"not-well-formed"),
            (b"<message from='m@fake.test' to='alice@chat.test'>" + b"<a>" * 40 + b"</a>" * 40 + b"</message>", b"not-well-formed"),
            (b"<message from='m@fake.test' to='alice@chat.test'><body>" + b"x" * (10 << 20) + b"</body></message>", b"policy-violation"),
            (b"<message from='m@fake.test' to='al ice@chat.test'><body>x</body></message>", b"jid-malformed"),
            (b"<message from='m@fake.test' to='alice@elsewhere.test'><body>x</body></message>", b"host-unknown"),
            (b"<presence from='m@fake.test' to='alice@chat.test'/>" * 2000, b"policy-violation"),
        ]
        for data, condition in cases:
            s = fake_server()
            send_all(s, data)
            r = read_to_end(s)
            assert condition in r, (condition, r[-400:])
        # Two streams at once from one domain, no more.
        held = [fake_server(), fake_server()]
        s, f = s2s_stream("fake.test", os.environ["FAKE_CERT"], os.environ["FAKE_KEY"])
        s.sendall(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>")
        r = read_to_end(s)
        assert b"policy-violation" in r, r
        for h in held:
            h.close()
    await loop.run_in_executor(None, refused)
    # Meanwhile, and after, the real servers' users go on.
    c.send_message(mto="alice@chat.test", mbody="still here", mtype="chat")
    await next_of(alice.messages, lambda m: m["body"] == "still here", timeout=60)
    alice.send_message(mto="carol@prosody.test", mbody="me too", mtype="chat")
    await next_of(c.messages, lambda m: m["body"] == "me too", timeout=60)
    while not alice.messages.empty():
        m = alice.messages.get_nowait()
        assert "spoofed" not in str(m["body"]), m
    for x in (alice, c):
        x.disconnect()

run(main)
"#,
    );
    let log = w.host.daemon.log();
    assert!(
        log.contains("dialback refused: the domain's server does not know that key"),
        "{log}"
    );
}

#[test]
fn with_verified_certificates_required_dialback_is_not_taken() {
    let w = world("s2s_require_verified = true\n");
    w.check(
        r#"
async def main():
    alice = await Client("alice", "laptop").online()
    c = await carol().online()
    d = await dave().online()
    # prosody.test's certificate verifies: both ways work.
    c.send_message(mto="alice@chat.test", mbody="verified", mtype="chat")
    await next_of(alice.messages, lambda m: m["body"] == "verified", timeout=60)
    alice.send_message(mto="carol@prosody.test", mbody="verified too", mtype="chat")
    await next_of(c.messages, lambda m: m["body"] == "verified too", timeout=60)
    # other.test's does not: nothing goes either way, and both senders
    # are told.
    alice.send_message(mto="dave@other.test", mbody="unverified", mtype="chat")
    e = await next_of(alice.messages, lambda m: m["type"] == "error" and m["from"].bare == "dave@other.test", timeout=60)
    assert e["error"]["condition"] == "remote-server-not-found", e
    d.send_message(mto="alice@chat.test", mbody="unverified too", mtype="chat")
    e = await next_of(d.messages, lambda m: m["type"] == "error", timeout=90)
    # Dialback is not even offered.
    s, f = s2s_stream("other.test")
    assert b"urn:xmpp:features:dialback" not in f, f
    for x in (alice, c, d):
        x.disconnect()

run(main)
"#,
    );
}

#[test]
fn chat_domains_give_users_addresses_of_their_own() {
    let mut w = world("");
    let d = &w.host.daemon;
    let out = d
        .granary(&["xmpp", "domain", "add", "family.test", "--user", "bob"])
        .success();
    assert!(
        out.stdout
            .contains("bob's chat address is now bob@family.test"),
        "{}",
        out.stdout
    );
    let list = d
        .granary(&["xmpp", "domain", "list", "--json"])
        .success()
        .json();
    assert_eq!(list[0]["domain"], "chat.test");
    assert_eq!(list[0]["primary"], true);
    assert_eq!(list[1]["domain"], "family.test");
    assert_eq!(list[1]["users"], serde_json::json!(["bob"]));
    assert_eq!(list[1]["has_certificate"], false);
    let s2s_port = d.listener("xmpp-s2s").port();
    assert!(
        list[1]["records"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap().contains(&format!(
                "_xmpp-server._tcp.family.test. IN SRV 0 5 {s2s_port} "
            ))),
        "{list}"
    );
    // Its certificate where the list says, and its SRV record.
    let (cert, key) = w.trusted_ca.leaf("family.test");
    let dir = d.data_dir().join("tls/domains/family.test");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(cert, dir.join("cert.pem")).unwrap();
    std::fs::copy(key, dir.join("key.pem")).unwrap();
    let list = d
        .granary(&["xmpp", "domain", "list", "--json"])
        .success()
        .json();
    assert_eq!(list[1]["has_certificate"], true);
    let text = d.granary(&["xmpp", "domain", "list"]).success().stdout;
    assert!(text.contains("_xmpp-server._tcp.family.test."), "{text}");
    let status = d
        .granary(&["xmpp", "status", "bob", "--json"])
        .success()
        .json();
    assert_eq!(status["address"], "bob@family.test");
    let mut records = w.records.clone();
    records.extend(srv(
        "family.test",
        "127.0.0.1",
        d.listener("xmpp-s2s").port(),
    ));
    w.dns.replace(&records);
    w.check(
        r#"
async def main():
    alice = await Client("alice", "laptop").online()
    bob = await Client("bob", "phone", domain="family.test", cafile=os.environ["PEER_CA"]).online()
    assert str(bob.boundjid.bare) == "bob@family.test", bob.boundjid
    c = await carol().online()
    # Between two domains of this host, through the host.
    alice.send_message(mto="bob@family.test", mbody="hi bob", mtype="chat")
    m = await next_of(bob.messages, lambda m: m["body"] == "hi bob")
    assert m["from"] == alice.boundjid, m["from"]
    bob.send_message(mto="alice@chat.test", mbody="hi alice", mtype="chat")
    m = await next_of(alice.messages, lambda m: m["body"] == "hi alice")
    assert m["from"] == bob.boundjid, m["from"]
    # Bob is no longer at chat.test.
    alice.send_message(mto="bob@chat.test", mbody="old address", mtype="chat")
    e = await next_of(alice.messages, lambda m: m["type"] == "error" and m["from"].bare == "bob@chat.test")
    assert e["error"]["condition"] in ("item-not-found", "service-unavailable"), e
    # Nor from another server.
    c.send_message(mto="bob@chat.test", mbody="old address too", mtype="chat")
    e = await next_of(c.messages, lambda m: m["type"] == "error" and m["from"].bare == "bob@chat.test", timeout=60)
    # With another server, both ways, from the second domain.
    c.send_message(mto="bob@family.test", mbody="from prosody", mtype="chat")
    m = await next_of(bob.messages, lambda m: m["body"] == "from prosody", timeout=60)
    assert m["from"] == c.boundjid, m["from"]
    bob.send_message(mto="carol@prosody.test", mbody="from family", mtype="chat")
    m = await next_of(c.messages, lambda m: m["body"] == "from family", timeout=60)
    assert m["from"] == bob.boundjid, m["from"]
    # Bob's password opens no stream to chat.test.
    def wrong_domain():
        import base64
        s = raw_stream()
        auth = base64.b64encode(f"\0bob\0{os.environ['XMPP_PASSWORD_BOB']}".encode()).decode()
        s.sendall(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>".encode())
        assert b"<success" in read_until(s, b"success", b"</failure>")
        s.sendall(HEADER.format(d="chat.test").encode())
        r = read_to_end(s)
        assert b"host-unknown" in r and b"bob@family.test" in r, r
    await asyncio.get_event_loop().run_in_executor(None, wrong_domain)
    # A bare JID of his domain as the login name works too.
    def bare_login():
        import base64
        s = socket.create_connection(("127.0.0.1", int(os.environ["XMPPS_PORT"])))
        s = ssl.create_default_context(cafile=os.environ["PEER_CA"]).wrap_socket(s, server_hostname="family.test")
        s.settimeout(30)
        s.sendall(HEADER.format(d="family.test").encode())
        read_until(s, b"</stream:features>")
        auth = base64.b64encode(f"\0bob@family.test\0{os.environ['XMPP_PASSWORD_BOB']}".encode()).decode()
        s.sendall(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>".encode())
        r = read_until(s, b"success", b"</failure>")
        assert b"<success" in r, r
        s.close()
    await asyncio.get_event_loop().run_in_executor(None, bare_login)
    while not bob.messages.empty():
        m = bob.messages.get_nowait()
        assert "old address" not in str(m["body"]), m
    for x in (alice, bob, c):
        x.disconnect()

run(main)
"#,
    );
    // And back to Granary's domain.
    let d = &w.host.daemon;
    d.granary(&["xmpp", "domain", "add", "chat.test", "--user", "bob"])
        .success();
    let status = d
        .granary(&["xmpp", "status", "bob", "--json"])
        .success()
        .json();
    assert_eq!(status["address"], "bob@chat.test");
}
