//! Sharing files (XEP-0363 HTTP upload) and push notifications
//! (XEP-0357), end to end with slixmpp: the slot from the uploader's chat
//! grain, the upload and download through the gateway's `upload.<domain>`
//! to that grain, the limits; a push registration and the notification an
//! app server (here a client of this server, listed in `push_servers`)
//! receives when a message arrives while the user is away.

use granary_testkit::xmpp::XmppHost;

fn check(h: &XmppHost, script: &str) {
    let (ok, out) = h.python(script);
    assert!(ok, "the client script failed:\n{out}");
}

/// Resolves `*.chat.test` to loopback for urllib (the names are the
/// certificate's; there is no DNS for them here), and an HTTPS helper
/// that trusts the local CA.
const HTTP: &str = r#"
from granary_xmpp_test import *
import socket, ssl, urllib.request, urllib.error
from slixmpp.exceptions import IqError

_getaddrinfo = socket.getaddrinfo
def _loopback(host, *args, **kwargs):
    if isinstance(host, str) and host.endswith("chat.test"):
        host = "127.0.0.1"
    return _getaddrinfo(host, *args, **kwargs)
socket.getaddrinfo = _loopback

def http(method, url, data=None, headers=None):
    """(status, headers, body) of one request, errors included."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, context=ctx(), timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()
"#;

#[test]
fn a_picture_is_shared_through_an_upload_slot() {
    let h = XmppHost::start(
        &["alice", "bob"],
        "[grains]\nidle_timeout = \"60s\"\n[xmpp]\nupload_max_mib = 1\n",
    );
    let script = format!(
        "{HTTP}{}",
        r#"
import os, struct, zlib

def png(w, h):
    """A real PNG of w x h pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\0" + bytes((x * 7 + y * 3) % 256 for x in range(w * 3)) for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))

async def main():
    alice = await Client("alice", "phone", plugins=("xep_0363",)).online()
    bob = await Client("bob", "laptop").online()
    # Found as the clients find it: disco items of the server, then info.
    service = await alice.plugin["xep_0363"].find_upload_service()
    assert service is not None, "no upload service"
    assert service["from"] == "upload.chat.test", service["from"]
    picture = png(200, 150)
    slot = await alice.plugin["xep_0363"].request_slot(
        service["from"], "cat picture.png", len(picture), "image/png")
    put = slot["http_upload_slot"]["put"]["url"]
    get = slot["http_upload_slot"]["get"]["url"]
    assert put == get and get.startswith("https://upload.chat.test:"), get
    assert "/alice/" in get and get.endswith("/cat%20picture.png"), get
    # Nothing there before the upload.
    status, _, body = http("GET", get)
    assert status == 404, (status, body)
    # A body of the wrong size is refused, and the slot still works.
    status, _, _ = http("PUT", put, picture[:-1], {"Content-Type": "image/png"})
    assert status == 413, status
    status, _, _ = http("PUT", put, picture, {"Content-Type": "image/png"})
    assert status == 201, status
    # One upload per slot.
    status, _, body = http("PUT", put, picture, {"Content-Type": "image/png"})
    assert status == 404, (status, body)
    # Alice shares the address; Bob fetches it.
    alice.send_message(mto="bob@chat.test", mbody=get, mtype="chat")
    m = await next_of(bob.messages, lambda m: m["body"] == get)
    status, headers, body = http("GET", m["body"])
    assert status == 200 and body == picture, (status, len(body))
    assert headers["Content-Type"] == "image/png", headers
    assert headers["X-Content-Type-Options"] == "nosniff", headers
    assert "sandbox" in headers["Content-Security-Policy"], headers
    # A type a browser could run is never served as itself.
    slot = await alice.plugin["xep_0363"].request_slot(
        service["from"], "page.html", 30, "text/html")
    url = slot["http_upload_slot"]["put"]["url"]
    assert http("PUT", url, b"<script>alert(1)</script>     ", {"Content-Type": "text/html"})[0] == 201
    status, headers, _ = http("GET", url)
    assert status == 200 and headers["Content-Type"] == "application/octet-stream", headers
    assert headers["Content-Disposition"].startswith("attachment"), headers
    # Too large for the limit (1 MiB): refused at the slot, saying the limit.
    try:
        await alice.plugin["xep_0363"].request_slot(
            service["from"], "big.bin", 2 * 1024 * 1024, "application/octet-stream")
        raise AssertionError("a 2 MiB slot was granted")
    except IqError as e:
        assert e.iq["error"]["condition"] == "not-acceptable", e.iq
        assert "file-too-large" in str(e.iq), e.iq
        assert "1048576" in str(e.iq), e.iq
    # Nothing can be listed or guessed.
    base = get.rsplit("/", 2)[0]
    for url in (base, base + "/", "https://upload.chat.test:" + get.split(":")[2].split("/")[0] + "/alice/",
                base + "/" + "A" * 32 + "/cat%20picture.png",
                get.rsplit("/", 1)[0] + "/other-name.png",
                get.replace("/alice/", "/bob/")):
        status = http("GET", url)[0]
        assert status == 404, (url, status)
    for c in (alice, bob):
        c.disconnect()

run(main)
"#
    );
    check(&h, &script);
}

#[test]
fn shared_files_expire() {
    let h = XmppHost::start(
        &["alice"],
        "[grains]\nidle_timeout = \"60s\"\n[xmpp]\nupload_expire_secs = 2\n",
    );
    let script = format!(
        "{HTTP}{}",
        r#"
import time

async def main():
    alice = await Client("alice", "phone", plugins=("xep_0363",)).online()
    slot = await alice.plugin["xep_0363"].request_slot("upload.chat.test", "note.txt", 5, "text/plain")
    url = slot["http_upload_slot"]["put"]["url"]
    assert http("PUT", url, b"hello", {"Content-Type": "text/plain"})[0] == 201
    # Gone once its time is up: the address answers as if it never was.
    deadline = time.monotonic() + 30
    while http("GET", url)[0] != 404:
        assert time.monotonic() < deadline, "the file did not expire"
        await asyncio.sleep(0.2)
    alice.disconnect()

run(main)
"#
    );
    check(&h, &script);
}

#[test]
fn a_message_while_away_wakes_the_app_through_its_push_server() {
    let h = XmppHost::start(
        &["alice", "bob", "pushsrv"],
        "[grains]\nidle_timeout = \"60s\"\n[xmpp]\npush_servers = [\"pushsrv@chat.test/app\"]\n",
    );
    check(
        &h,
        r#"
from granary_xmpp_test import *
import xml.etree.ElementTree as ET

ENABLE = """<enable xmlns='urn:xmpp:push:0' jid='{jid}' node='{node}'>
  <x xmlns='jabber:x:data' type='submit'>
    <field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field>
    <field var='secret'><value>s3cret-for-{node}</value></field>
  </x></enable>"""

async def main():
    # The app server: a client that records what it is sent.
    app = raw_login("pushsrv", "app")
    alice = await Client("alice", "phone").online()
    info = await alice.plugin["xep_0030"].get_info(jid="alice@chat.test")
    assert "urn:xmpp:push:0" in info["disco_info"]["features"], info
    for jid, node in (("pushsrv@chat.test/app", "alice-phone"),
                      ("unlisted@chat.test/app", "elsewhere")):
        iq = alice.make_iq_set()
        iq.append(ET.fromstring(ENABLE.format(jid=jid, node=node)))
        await iq.send(timeout=20)
    # Away: no connected session.
    alice.disconnect()
    await alice.disconnected
    bob = await Client("bob", "laptop").online()
    bob.send_message(mto="alice@chat.test", mbody="are you there? secret words", mtype="chat")
    # Read in a thread: the clients' event loop must go on sending.
    got = (await asyncio.to_thread(read_until, app, b"</iq>")).decode()
    assert "urn:xmpp:push:0" in got, got
    assert "alice-phone" in got, got
    assert "s3cret-for-alice-phone" in got, got
    assert "message-count" in got, got
    # The app server learns that something arrived, not what or from whom.
    assert "secret words" not in got and "bob@" not in got, got
    assert "from=\"alice@chat.test\"" in got or "from='alice@chat.test'" in got, got
    # The message waits for Alice.
    alice = await Client("alice", "phone").online()
    m = await next_of(alice.messages, lambda m: m["body"] == "are you there? secret words")
    # Disabled: no more registrations for that app server.
    iq = alice.make_iq_set()
    iq.append(ET.fromstring("<disable xmlns='urn:xmpp:push:0' jid='pushsrv@chat.test/app'/>"))
    await iq.send(timeout=20)
    app.close()
    for c in (alice, bob):
        c.disconnect()

run(main)
"#,
    );
    // The registration for a server the admin did not name was kept, and
    // the grain said so where the admin looks.
    let logs = h
        .daemon
        .granary(&["grain", "logs", "alice/xmpp"])
        .success()
        .stdout;
    assert!(
        logs.contains("registered unlisted@chat.test/app, which is not in [xmpp] push_servers"),
        "{logs}"
    );
}
