//! Chat under test: a daemon with the chat app, users with `xmpp` app
//! passwords, and real clients (Python `slixmpp`, `go-sendxmpp`) pointed
//! at the gateway's `xmpp` and `xmpps` listeners with the local CA
//! trusted. Names need no resolving: clients are given the address.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::Daemon;

/// The domain every chat test serves.
pub const DOMAIN: &str = "chat.test";

/// A small library the test scripts import (`from granary_xmpp_test import
/// ...`): a client that connects to the given listener with the local CA
/// trusted and records what it receives.
const HELPER: &str = r#"
import asyncio, os, ssl, sys, time, logging
import slixmpp

logging.basicConfig(level=os.environ.get("XMPP_LOG", "WARNING"))

def ctx():
    c = ssl.create_default_context(cafile=os.environ["XMPP_CA"])
    return c

class Client(slixmpp.ClientXMPP):
    """A client of user `user` with `resource`, over `mode` ("starttls" or
    "tls"), recording messages, presences and subscription requests."""

    def __init__(self, user, resource="py", mode="starttls", password=None, plugins=(),
                 domain=None, address=None, cafile=None):
        """`domain`, `address` (host, port) and `cafile`: another server's
        user (a federation peer); by default, this host's."""
        jid = f"{user}@{domain or os.environ['XMPP_DOMAIN']}/{resource}"
        password = password or os.environ["XMPP_PASSWORD_" + user.upper()]
        super().__init__(jid, password)
        self.ssl_context = ssl.create_default_context(cafile=cafile) if cafile else ctx()
        self.address = address
        self.mode = mode
        for p in ("xep_0030", "xep_0199") + tuple(plugins):
            self.register_plugin(p)
        self.messages = asyncio.Queue()
        self.presences = asyncio.Queue()
        self.requests = asyncio.Queue()
        self.add_event_handler("message", lambda m: self.messages.put_nowait(m))
        # Errors too (slixmpp reports them apart, as message_error).
        self.add_event_handler("message_error", lambda m: self.messages.put_nowait(m))
        self.add_event_handler("presence_available", lambda p: self.presences.put_nowait(p))
        self.add_event_handler("presence_subscribe", lambda p: self.requests.put_nowait(p))
        self.ready = asyncio.get_event_loop().create_future()
        self.add_event_handler("session_start", self._started)
        self.add_event_handler("failed_auth", lambda *_: self.ready.done() or self.ready.set_exception(RuntimeError("auth failed")))

    async def _started(self, _):
        if not self.ready.done():
            self.ready.set_result(True)

    async def online(self, presence=True, timeout=20):
        port = int(os.environ["XMPPS_PORT" if self.mode == "tls" else "XMPP_PORT"])
        if self.mode == "tls":
            self.enable_direct_tls = True
            self.enable_starttls = False
        host, port = self.address or ("127.0.0.1", port)
        self.connect(host=host, port=port)
        await asyncio.wait_for(self.ready, timeout)
        if presence:
            self.send_presence()
            await self.get_roster()
        return self

async def next_of(queue, pred=lambda x: True, timeout=20):
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("nothing arrived")
        item = await asyncio.wait_for(queue.get(), left)
        if pred(item):
            return item

def read_until(s, *markers):
    """Reads until one of `markers` has arrived or the server closed; all of it."""
    data = b""
    while not any(m in data for m in markers):
        try:
            chunk = s.recv(65536)
        except (ConnectionError, OSError):
            break
        if not chunk:
            break
        data += chunk
    return data

def read_to_end(s):
    return read_until(s, b"\0never\0")

HEADER = ("<?xml version='1.0'?><stream:stream to='{d}' xmlns='jabber:client' "
          "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")

def raw_stream():
    """A direct-TLS connection that has sent its header and read the features."""
    import socket
    s = socket.create_connection(("127.0.0.1", int(os.environ["XMPPS_PORT"])))
    s = ctx().wrap_socket(s, server_hostname=os.environ["XMPP_DOMAIN"])
    s.settimeout(30)
    s.sendall(HEADER.format(d=os.environ["XMPP_DOMAIN"]).encode())
    read_until(s, b"</stream:features>")
    return s

def raw_login(user, resource="raw"):
    """A logged-in, bound raw stream (SASL PLAIN)."""
    import base64
    s = raw_stream()
    pw = os.environ["XMPP_PASSWORD_" + user.upper()]
    auth = base64.b64encode(f"\0{user}\0{pw}".encode()).decode()
    s.sendall(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>".encode())
    r = read_until(s, b"success", b"</failure>")
    assert b"<success" in r, r
    s.sendall(HEADER.format(d=os.environ["XMPP_DOMAIN"]).encode())
    read_until(s, b"</stream:features>")
    s.sendall(f"<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>".encode())
    read_until(s, b"</iq>")
    return s

def scram_attempt(user, password, mech="SCRAM-SHA-256"):
    """One SCRAM exchange on a fresh stream; the server's last answer."""
    import base64, hashlib, hmac, secrets
    h = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-1": "sha1"}[mech]
    s = raw_stream()
    nonce = secrets.token_urlsafe(18)
    bare = f"n={user},r={nonce}"
    first = base64.b64encode(("n,," + bare).encode()).decode()
    s.sendall(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='{mech}'>{first}</auth>".encode())
    r = read_until(s, b"</challenge>", b"</failure>")
    if b"<challenge" not in r:
        s.close()
        return r.decode()
    chal = r.split(b">", 1)[1].split(b"<", 1)[0]
    server_first = base64.b64decode(chal).decode()
    parts = dict(p.split("=", 1) for p in server_first.split(","))
    salted = hashlib.pbkdf2_hmac(h, password.encode(), base64.b64decode(parts["s"]), int(parts["i"]))
    ck = hmac.new(salted, b"Client Key", h).digest()
    sk = hashlib.new(h, ck).digest()
    without = f"c=biws,r={parts['r']}"
    auth_msg = f"{bare},{server_first},{without}".encode()
    sig = hmac.new(sk, auth_msg, h).digest()
    proof = bytes(a ^ b for a, b in zip(ck, sig))
    final = base64.b64encode(f"{without},p={base64.b64encode(proof).decode()}".encode()).decode()
    s.sendall(f"<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{final}</response>".encode())
    r = read_until(s, b"</failure>", b"</success>", b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
    s.close()
    return r.decode()

def run(main):
    asyncio.run(main())
    print("ok")
"#;

/// Writes the `granary_xmpp_test` Python module into `dir/lib` and
/// returns that directory (for `PYTHONPATH`).
pub fn helper_lib(dir: &std::path::Path) -> std::path::PathBuf {
    let lib = dir.join("lib");
    std::fs::create_dir_all(&lib).unwrap();
    std::fs::write(lib.join("granary_xmpp_test.py"), HELPER).unwrap();
    lib
}

/// A client that makes its account with an invite token by in-band
/// registration (XEP-0445 preauth, then XEP-0077), as Conversations does:
/// prepend it to a script (`Newcomer(user, password, token)`).
pub const NEWCOMER: &str = r#"
from granary_xmpp_test import *
import xml.etree.ElementTree as ET
from slixmpp.exceptions import IqError

class Newcomer(Client):
    """A client that makes its account with an invite token first (the
    XEP-0445 preauth iq, then XEP-0077), then logs in as usual."""
    def __init__(self, user, password, token):
        super().__init__(user, "phone", password=password, plugins=("xep_0077",))
        self.token = token
        self.registered = asyncio.get_event_loop().create_future()
        self.add_event_handler("register", self._register)

    async def _register(self, form):
        try:
            iq = self.make_iq_set(ito=self.boundjid.domain)
            iq.append(ET.fromstring(f"<preauth xmlns='urn:xmpp:pars:0' token='{self.token}'/>"))
            # slixmpp holds back stanzas before login unless they carry
            # a registration query; the XEP-0445 preauth step is part of
            # registration, so let it through.
            self._always_send_everything = True
            try:
                await iq.send(timeout=20)
            finally:
                self._always_send_everything = False
            reg = self.Iq()
            reg["type"] = "set"
            reg["register"]["username"] = self.boundjid.user
            reg["register"]["password"] = self.password
            await reg.send(timeout=20)
            self.registered.set_result(True)
        except IqError as e:
            failed = RuntimeError(e.iq["error"]["condition"])
            self.registered.set_exception(failed)
            if not self.ready.done():
                self.ready.set_exception(failed)
            self.disconnect()
"#;

pub struct XmppHost {
    pub daemon: Daemon,
    pub dir: tempfile::TempDir,
    pub passwords: HashMap<String, String>,
}

impl XmppHost {
    /// A daemon serving `DOMAIN` with the chat app and `users`, each with
    /// an `xmpp` app password; `extra` is appended to the config.
    pub fn start(users: &[&str], extra: &str) -> XmppHost {
        XmppHost::start_listening(users, extra, "")
    }

    /// [`XmppHost::start`] with more listeners (`listen`: lines inside
    /// `[listen]`, such as `xmpp-s2s = "127.0.0.1:0"`).
    pub fn start_listening(users: &[&str], extra: &str, listen: &str) -> XmppHost {
        let (daemon, dir, passwords) =
            crate::app_host(DOMAIN, extra, listen, crate::xmpp_package, "xmpp", users);
        helper_lib(dir.path());
        XmppHost {
            daemon,
            dir,
            passwords,
        }
    }

    /// An invite made with the CLI (`granary invite create ARGS`): (link,
    /// xmpp: URI, token).
    pub fn invite(&self, args: &[&str]) -> (String, String, String) {
        let mut full = vec!["invite", "create"];
        full.extend_from_slice(args);
        let out = self.daemon.granary(&full).success().stdout;
        let shown: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("    ")).collect();
        let [link, uri] = shown[..] else {
            panic!("expected the link and the URI, indented:\n{out}");
        };
        let token = link.rsplit('/').next().unwrap().to_owned();
        assert!(token.len() >= 22, "a token of 128 bits or more: {token}");
        assert!(uri.contains(&format!("preauth={token}")), "{uri}");
        (link.to_owned(), uri.to_owned(), token)
    }

    /// Installs group chats (the room app), as an admin would.
    pub fn install_rooms(&self) {
        let pkg = crate::room_package(self.dir.path());
        self.daemon
            .granary(&["app", "install", pkg.to_str().unwrap()])
            .success();
    }

    pub fn password(&self, user: &str) -> &str {
        &self.passwords[user]
    }

    pub fn xmpp(&self) -> SocketAddr {
        self.daemon.listener("xmpp")
    }

    pub fn xmpps(&self) -> SocketAddr {
        self.daemon.listener("xmpps")
    }

    /// What a script gets: the listeners, the CA, the domain, and
    /// `XMPP_PASSWORD_<USER>` for each user.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "PYTHONPATH".to_owned(),
                self.dir.path().join("lib").display().to_string(),
            ),
            ("XMPP_PORT".to_owned(), self.xmpp().port().to_string()),
            ("XMPPS_PORT".to_owned(), self.xmpps().port().to_string()),
            (
                "XMPP_CA".to_owned(),
                self.daemon.ca_file().display().to_string(),
            ),
            ("XMPP_DOMAIN".to_owned(), DOMAIN.to_owned()),
        ];
        for (u, p) in &self.passwords {
            env.push((format!("XMPP_PASSWORD_{}", u.to_uppercase()), p.clone()));
        }
        env
    }

    /// Runs a Python script (which imports `granary_xmpp_test`); (success,
    /// output). It must print `ok` at the end to count as passed.
    pub fn python(&self, script: &str) -> (bool, String) {
        self.python_with(script, &[])
    }

    /// [`XmppHost::python`] with more environment variables.
    pub fn python_with(&self, script: &str, extra: &[(&str, String)]) -> (bool, String) {
        let mut env = self.env();
        env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let (ok, out) = crate::mail::run_python(script, &env);
        (ok && out.lines().any(|l| l.trim() == "ok"), out)
    }
}
