//! Chat against Prosody, in one run, on this machine, both over direct
//! TLS (TLS 1.3), both driven by the same load generator (this file: a
//! plain XMPP client over rustls, SCRAM-SHA-1 with the salted password
//! cached per salt as real clients cache it):
//!
//! 1. one-way messages/s: Alice sends chat messages to Bob's bare address
//!    as fast as the server takes them; the clock stops when Bob has
//!    them all (and again against a Prosody without MAM, which writes
//!    nothing per message);
//! 2. logins/s: 100 logins (TCP, TLS, SASL, stream restart, bind), 10 at
//!    a time;
//! 3. memory per idle session: the servers' PSS (Granary: the daemon and
//!    every process under it; Prosody: its process) before and after 200
//!    more bound sessions of one user, divided by 200; and what one more
//!    user costs Granary (their chat grain's PSS);
//! 4. group chat (XEP-0045), 20 members in one room (Granary: a room
//!    grain; Prosody: mod_muc with mod_muc_mam, both archiving): group
//!    messages/s from one member until all 19 others have every one; the
//!    latency of one message, warm, and on Granary cold (the room grain
//!    stopped first: it starts on that message); and the memory one more
//!    room with one occupant costs (10 rooms made, PSS before and after).
//!
//! Granary is reached through its gateway (`xmpps`), each session handed
//! to the user's chat grain, every message archived (MAM) there and routed
//! between grains by the host. Prosody 0.12 (Debian) runs with the epoll
//! backend, internal_hashed auth, its SQLite storage (Debian's
//! lua-dbi-sqlite3; the file store it uses by default rewrites a user's
//! archive and falls to ~170 messages/s), and mod_mam (archiving
//! everything, its default policy), carbons, smacks and csi_simple.
//!
//! Full run, against an optimised daemon and grain:
//!   cargo build --release -p granary --bins && apps/xmpp/build && \
//!     GRANARY_BIN=$PWD/target/release/granary GRANARY_XMPP_APP=$PWD/apps/xmpp/dist/granary-xmpp \
//!     cargo bench -p granary-e2e --bench xmpp
//! Smoke (./run-tests), with the debug builds:
//!   GRANARY_BIN=$PWD/target/debug/granary cargo bench -p granary-e2e --bench xmpp -- --smoke

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use base64::Engine;
use granary_testkit::xmpp::XmppHost;
use granary_testkit::{DEADLINE, eventually};

#[path = "support.rs"]
mod support;
use support::{free_port, openssl_leaf, tls_config};

type Salted = Arc<Mutex<HashMap<(Vec<u8>, u32, String), Vec<u8>>>>;

struct Side {
    name: &'static str,
    addr: SocketAddr,
    domain: String,
    config: Arc<rustls::ClientConfig>,
    passwords: HashMap<String, String>,
    /// The processes whose memory counts.
    pids: Box<dyn Fn() -> Vec<u32> + Send + Sync>,
    salted: Salted,
}

struct Conn {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    buf: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Conn {
    fn send(&mut self, text: &str) {
        self.tls.write_all(text.as_bytes()).unwrap();
        self.tls.flush().unwrap();
    }

    /// Everything up to the end of the first of `markers`.
    fn until(&mut self, markers: &[&str]) -> String {
        loop {
            let hit = markers
                .iter()
                .filter_map(|m| find(&self.buf, m.as_bytes()).map(|at| at + m.len()))
                .min();
            if let Some(end) = hit {
                let out: Vec<u8> = self.buf.drain(..end).collect();
                return String::from_utf8_lossy(&out).into_owned();
            }
            let mut chunk = [0u8; 16 << 10];
            let n = self.tls.read(&mut chunk).unwrap();
            assert!(
                n > 0,
                "the server closed: {}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn header(domain: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream to='{domain}' xmlns='jabber:client' \
         xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
    )
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, key);
    ring::hmac::sign(&k, data).as_ref().to_vec()
}

fn text_of(element: &str) -> String {
    let start = element
        .rfind("'>")
        .or_else(|| element.rfind("\">"))
        .unwrap()
        + 2;
    let end = element.rfind("</").unwrap();
    element[start..end].to_owned()
}

/// A logged-in, bound session of `user`.
fn login(side: &Side, user: &str, resource: &str) -> Conn {
    let b64 = base64::engine::general_purpose::STANDARD;
    let tcp = TcpStream::connect(side.addr).unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(side.addr.ip().into());
    let conn = rustls::ClientConnection::new(side.config.clone(), name).unwrap();
    let mut c = Conn {
        tls: rustls::StreamOwned::new(conn, tcp),
        buf: Vec::new(),
    };
    c.send(&header(&side.domain));
    c.until(&["</stream:features>"]);
    let mut nonce = [0u8; 18];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce).unwrap();
    let bare = format!("n={user},r={}", b64.encode(nonce));
    c.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1'>{}</auth>",
        b64.encode(format!("n,,{bare}"))
    ));
    let challenge = c.until(&["</challenge>"]);
    let server_first = String::from_utf8(b64.decode(text_of(&challenge)).unwrap()).unwrap();
    let attrs: HashMap<&str, &str> = server_first
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let salt = b64.decode(attrs["s"]).unwrap();
    let iterations: u32 = attrs["i"].parse().unwrap();
    let password = &side.passwords[user];
    let key = (salt.clone(), iterations, password.clone());
    let salted = side
        .salted
        .lock()
        .unwrap()
        .entry(key)
        .or_insert_with(|| {
            let mut out = vec![0u8; 20];
            ring::pbkdf2::derive(
                ring::pbkdf2::PBKDF2_HMAC_SHA1,
                std::num::NonZeroU32::new(iterations).unwrap(),
                &salt,
                password.as_bytes(),
                &mut out,
            );
            out
        })
        .clone();
    let client_key = hmac(&salted, b"Client Key");
    let stored = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &client_key);
    let without = format!("c=biws,r={}", attrs["r"]);
    let auth_message = format!("{bare},{server_first},{without}");
    let signature = hmac(stored.as_ref(), auth_message.as_bytes());
    let proof: Vec<u8> = client_key
        .iter()
        .zip(&signature)
        .map(|(a, b)| a ^ b)
        .collect();
    c.send(&format!(
        "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
        b64.encode(format!("{without},p={}", b64.encode(proof)))
    ));
    let answer = c.until(&["</success>", "</failure>"]);
    assert!(answer.contains("<success"), "{}: {answer}", side.name);
    c.send(&header(&side.domain));
    c.until(&["</stream:features>"]);
    c.send(&format!(
        "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>"
    ));
    c.until(&["</iq>"]);
    c
}

/// Sends a ping and reads until its answer: everything before is
/// consumed.
fn sync(c: &mut Conn, id: &str) {
    c.send(&format!(
        "<iq type='get' id='{id}'><ping xmlns='urn:xmpp:ping'/></iq>"
    ));
    c.until(&[&format!("id='{id}'"), &format!("id=\"{id}\"")]);
}

fn messages_per_second(side: &Side, n: usize) -> f64 {
    let mut alice = login(side, "alice", "sender");
    let mut bob = login(side, "bob", "receiver");
    for c in [&mut alice, &mut bob] {
        c.send("<presence/>");
        sync(c, "ready");
    }
    let to = format!("bob@{}", side.domain);
    let start = Instant::now();
    let receiver = std::thread::spawn(move || {
        let marker = b"</message>";
        let mut seen = 0;
        let mut tail: Vec<u8> = std::mem::take(&mut bob.buf);
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            seen += tail.windows(marker.len()).filter(|w| *w == marker).count();
            if seen >= n {
                return bob;
            }
            let keep = tail.len().saturating_sub(marker.len() - 1);
            tail.drain(..keep);
            let got = bob.tls.read(&mut chunk).unwrap();
            assert!(got > 0, "the server closed Bob's stream");
            // Only what arrived now is counted next round (the kept tail
            // holds no whole marker).
            tail.extend_from_slice(&chunk[..got]);
        }
    });
    let mut batch = String::new();
    for i in 0..n {
        batch.push_str(&format!(
            "<message to='{to}' type='chat' id='m{i}'><body>message number {i}</body></message>"
        ));
        if batch.len() > 16 << 10 || i + 1 == n {
            alice.tls.write_all(batch.as_bytes()).unwrap();
            batch.clear();
        }
    }
    alice.tls.flush().unwrap();
    let _bob = receiver.join().unwrap();
    n as f64 / start.elapsed().as_secs_f64()
}

fn logins_per_second(side: &Side, n: usize, parallel: usize) -> f64 {
    // The salted password is computed once, as a client caches it.
    drop(login(side, "alice", "warm"));
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..parallel {
            s.spawn(move || {
                for i in 0..n / parallel {
                    let mut c = login(side, "alice", &format!("l{t}-{i}"));
                    c.send("</stream:stream>");
                }
            });
        }
    });
    n as f64 / start.elapsed().as_secs_f64()
}

/// PSS of these processes, in KiB.
fn pss(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).ok())
        .filter_map(|t| {
            t.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

/// `root` and every process under it.
fn tree(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let ppid: u32 = after.split(' ').nth(1).unwrap().parse().unwrap();
        parents.push((pid, ppid));
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

fn kib_per_session(side: &Side, n: usize) -> f64 {
    let mut warm = login(side, "alice", "baseline");
    sync(&mut warm, "warm");
    let before = pss(&(side.pids)());
    let sessions: Vec<Conn> = (0..n)
        .map(|i| login(side, "alice", &format!("idle{i}")))
        .collect();
    let after = pss(&(side.pids)());
    drop(sessions);
    (after as f64 - before as f64) / n as f64
}

/// The members of the benchmark's room.
const ROOM_MEMBERS: usize = 20;

fn room_users() -> Vec<String> {
    (0..ROOM_MEMBERS).map(|i| format!("m{i:02}")).collect()
}

/// Joins `room` as `nick` without history; back once the subject came
/// (the last thing a join sends, XEP-0045 §7.2.16).
fn join(c: &mut Conn, room: &str, nick: &str) {
    c.send(&format!(
        "<presence to='{room}/{nick}'><x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='0'/></x></presence>"
    ));
    loop {
        let got = c.until(&["</message>", "type='error'", "type=\"error\""]);
        assert!(
            !got.contains("type='error'") && !got.contains("type=\"error\""),
            "joining {room}: {got}"
        );
        if got.contains("<subject") {
            return;
        }
    }
}

/// Reads until a message whose text holds `needle`.
fn until_message_with(c: &mut Conn, needle: &str) {
    loop {
        if c.until(&["</message>"]).contains(needle) {
            return;
        }
    }
}

/// Reads what has arrived without waiting (the sender's own copies).
fn drain(c: &mut Conn) {
    c.tls.sock.set_nonblocking(true).unwrap();
    let mut chunk = [0u8; 64 << 10];
    loop {
        match c.tls.read(&mut chunk) {
            Ok(0) => panic!("the server closed the sender's stream"),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("reading the sender's stream: {e}"),
        }
    }
    c.tls.sock.set_nonblocking(false).unwrap();
    c.buf.clear();
}

struct RoomResults {
    messages: f64,
    warm_ms: f64,
    cold_ms: Option<f64>,
    kib_per_room: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Scenario 4. `stop_room`: stops the room's grain (Granary), for the
/// cold start.
fn group_chat(side: &Side, n: usize, stop_room: Option<&dyn Fn()>) -> RoomResults {
    let room = format!("bench@rooms.{}", side.domain);
    let users = room_users();
    let mut conns: Vec<Conn> = users
        .iter()
        .map(|u| {
            let mut c = login(side, u, "room");
            c.send("<presence/>");
            sync(&mut c, "ready");
            join(&mut c, &room, u);
            c
        })
        .collect();
    // Every join's presences have gone out once each member answers a
    // ping after the last join.
    for (i, c) in conns.iter_mut().enumerate() {
        sync(c, &format!("joined{i}"));
    }
    let mut sender = conns.remove(0);
    let start = Instant::now();
    let receivers: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let marker = b"</message>";
                let mut seen = 0;
                let mut tail: Vec<u8> = std::mem::take(&mut c.buf);
                let mut chunk = vec![0u8; 64 << 10];
                loop {
                    seen += tail.windows(marker.len()).filter(|w| *w == marker).count();
                    if seen >= n {
                        return c;
                    }
                    let keep = tail.len().saturating_sub(marker.len() - 1);
                    tail.drain(..keep);
                    let got = c.tls.read(&mut chunk).unwrap();
                    assert!(got > 0, "the server closed a member's stream");
                    tail.extend_from_slice(&chunk[..got]);
                }
            })
        })
        .collect();
    let mut batch = String::new();
    for i in 0..n {
        batch.push_str(&format!(
            "<message to='{room}' type='groupchat' id='g{i}'><body>group message {i}</body></message>"
        ));
        if i % 50 == 49 || i + 1 == n {
            sender.tls.write_all(batch.as_bytes()).unwrap();
            sender.tls.flush().unwrap();
            batch.clear();
            drain(&mut sender);
        }
    }
    let mut conns: Vec<Conn> = receivers.into_iter().map(|r| r.join().unwrap()).collect();
    let messages = n as f64 / start.elapsed().as_secs_f64();
    drain(&mut sender);
    for c in conns.iter_mut() {
        c.buf.clear();
    }
    // One message from one member to another, through the room.
    let one = |tag: &str, conns: &mut Vec<Conn>| -> f64 {
        let start = Instant::now();
        conns[0].send(&format!(
            "<message to='{room}' type='groupchat' id='{tag}'><body>{tag}</body></message>"
        ));
        until_message_with(&mut conns[1], tag);
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        until_message_with(&mut conns[0], tag);
        ms
    };
    let warm_ms = median(
        (0..5)
            .map(|i| one(&format!("warm{i}"), &mut conns))
            .collect(),
    );
    let cold_ms = stop_room.map(|stop| {
        median(
            (0..3)
                .map(|i| {
                    stop();
                    one(&format!("cold{i}"), &mut conns)
                })
                .collect(),
        )
    });
    // Memory: ten more rooms, one occupant each.
    let before = pss(&(side.pids)());
    for i in 0..10 {
        join(
            &mut sender,
            &format!("extra{i}@rooms.{}", side.domain),
            "m00",
        );
    }
    sync(&mut sender, "rooms-made");
    let after = pss(&(side.pids)());
    RoomResults {
        messages,
        warm_ms,
        cold_ms,
        kib_per_room: (after as f64 - before as f64) / 10.0,
    }
}

struct Prosody {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Prosody {
    /// Prosody with its SQLite storage; `archive`: with mod_mam.
    fn start(passwords: &HashMap<String, String>, archive: bool) -> Prosody {
        let dir = tempfile::tempdir().unwrap();
        openssl_leaf(dir.path());
        let d = dir.path().display().to_string();
        let (c2s, tls) = (free_port(), free_port());
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::create_dir_all(dir.path().join("certs")).unwrap();
        let config = dir.path().join("prosody.cfg.lua");
        std::fs::write(
            &config,
            format!(
                "pidfile = \"{d}/prosody.pid\"\ndata_path = \"{d}/data\"\ncertificates = \"{d}/certs\"\n\
                 network_backend = \"epoll\"\nrun_as_root = true\n\
                 log = {{ error = \"{d}/prosody.err\" }}\ninterfaces = {{ \"127.0.0.1\" }}\n\
                 modules_enabled = {{ \"roster\"; \"saslauth\"; \"tls\"; \"disco\"; \"ping\"; \"carbons\"; {mam}\"smacks\"; \"csi_simple\"; \"blocklist\"; \"vcard_legacy\"; \"pep\" }}\n\
                 modules_disabled = {{ \"s2s\" }}\nauthentication = \"internal_hashed\"\n\
                 storage = \"sql\"\nsql = {{ driver = \"SQLite3\"; database = \"{d}/prosody.sqlite\" }}\n\
                 c2s_ports = {{ {c2s} }}\nc2s_direct_tls_ports = {{ {tls} }}\ns2s_ports = {{ }}\n\
                 c2s_require_encryption = true\n\
                 ssl = {{ certificate = \"{d}/cert.pem\"; key = \"{d}/key.pem\" }}\n\
                 VirtualHost \"peer.test\"\n\
                 Component \"rooms.peer.test\" \"muc\"\n\
                 modules_enabled = {{ \"muc_mam\" }}\nmuc_room_locking = false\n\
                 muc_room_default_persistent = true\n",
                mam = if archive { "\"mam\"; " } else { "" },
            ),
        )
        .unwrap();
        for (user, password) in passwords {
            let out = Command::new("prosodyctl")
                .args([
                    "--config",
                    config.to_str().unwrap(),
                    "register",
                    user,
                    "peer.test",
                    password,
                ])
                .output()
                .unwrap();
            assert!(out.status.success(), "prosodyctl register: {out:?}");
        }
        let child = Command::new("prosody")
            .args(["--config", config.to_str().unwrap(), "-F"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prosody (Debian's prosody package)");
        eventually("prosody to listen", DEADLINE, || {
            TcpStream::connect(("127.0.0.1", tls)).ok()
        });
        Prosody {
            child,
            port: tls,
            dir,
        }
    }
}

impl Drop for Prosody {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Results {
    messages: f64,
    logins: f64,
    kib_per_session: f64,
}

fn measure(side: &Side, smoke: bool) -> Results {
    let (mut messages, logins, sessions) = if smoke {
        (2_000, 20, 20)
    } else {
        (20_000, 100, 200)
    };
    if let Some(n) =
        std::env::args().find_map(|a| a.strip_prefix("--messages=").and_then(|n| n.parse().ok()))
    {
        messages = n;
    }
    // Memory first, on a fresh server (a heap that has grown and freed
    // hides new sessions).
    let kib_per_session = kib_per_session(side, sessions);
    let logins = logins_per_second(side, logins, 10);
    let messages = messages_per_second(side, messages);
    if std::env::var_os("XMPP_BENCH_MEMORY").is_some() {
        for pid in (side.pids)() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let rollup =
                std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
            let pss = rollup.lines().find(|l| l.starts_with("Pss:")).unwrap_or("");
            let anon = rollup
                .lines()
                .find(|l| l.starts_with("Pss_Anon:"))
                .unwrap_or("");
            let file = rollup
                .lines()
                .find(|l| l.starts_with("Pss_File:"))
                .unwrap_or("");
            println!("  {pid} {} {pss} {anon} {file}", comm.trim());
        }
    }
    let r = Results {
        messages,
        logins,
        kib_per_session,
    };
    println!(
        "{:>8}: {:>9.0} messages/s, {:>7.1} logins/s, {:>6.1} KiB per idle session",
        side.name, r.messages, r.logins, r.kib_per_session
    );
    r
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let mut users: Vec<String> = vec!["alice".to_owned(), "bob".to_owned()];
    users.extend(room_users());
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    let granary = XmppHost::start(&names, "[grains]\nidle_timeout = \"300s\"\n");
    granary.install_rooms();
    let passwords: HashMap<String, String> = users
        .iter()
        .map(|u| (u.to_string(), format!("bench password of {u}")))
        .collect();
    let prosody = Prosody::start(&passwords, true);
    let daemon = granary.daemon.pid();
    let prosody_pid = prosody.child.id();
    let sides = [
        Side {
            name: "granary",
            addr: granary.xmpps(),
            domain: granary_testkit::xmpp::DOMAIN.to_owned(),
            config: tls_config(&granary.daemon.ca_file()),
            passwords: granary.passwords.clone(),
            pids: Box::new(move || tree(daemon)),
            salted: Salted::default(),
        },
        Side {
            name: "prosody",
            addr: SocketAddr::from(([127, 0, 0, 1], prosody.port)),
            domain: "peer.test".to_owned(),
            config: tls_config(&prosody.dir.path().join("ca.pem")),
            passwords,
            pids: Box::new(move || vec![prosody_pid]),
            salted: Salted::default(),
        },
    ];
    let g = measure(&sides[0], smoke);
    let p = measure(&sides[1], smoke);
    // The same Prosody without an archive: what its messages/s are when
    // it writes nothing per message (Granary always archives).
    let bare = Prosody::start(&sides[1].passwords, false);
    let unarchived = Side {
        name: "prosody without MAM",
        addr: SocketAddr::from(([127, 0, 0, 1], bare.port)),
        config: tls_config(&bare.dir.path().join("ca.pem")),
        pids: Box::new(Vec::new),
        salted: Salted::default(),
        domain: "peer.test".to_owned(),
        passwords: sides[1].passwords.clone(),
    };
    let bare_rate = messages_per_second(&unarchived, if smoke { 2_000 } else { 20_000 });
    println!("prosody without MAM: {bare_rate:>9.0} messages/s");
    // What one more user costs Granary: their chat grain.
    let grains: Vec<u32> = tree(daemon)
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "granary-xmpp")
        })
        .collect();
    let per_grain = pss(&grains) as f64 / grains.len().max(1) as f64;
    println!(
        "ratios (granary / prosody): messages/s {:.2}x, logins/s {:.2}x, memory per idle session {:.2}x (goals: >= 1.0x, >= 1.0x, <= 1.0x)",
        g.messages / p.messages,
        g.logins / p.logins,
        g.kib_per_session / p.kib_per_session
    );
    println!(
        "messages/s against prosody without MAM: {:.2}x",
        g.messages / bare_rate
    );
    println!(
        "one more user costs granary their chat grain: {per_grain:.0} KiB PSS ({} grains running)",
        grains.len()
    );

    // Group chat.
    let n = if smoke { 200 } else { 5_000 };
    let stop = || {
        granary
            .daemon
            .granary(&["grain", "stop", "m00/room/bench"])
            .success();
    };
    let gr = group_chat(&sides[0], n, Some(&stop));
    let room_grain: Vec<u32> = tree(daemon)
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"room"))
                && std::fs::read_to_string(format!("/proc/{pid}/environ"))
                    .is_ok_and(|e| e.contains("GRANARY_GRAIN=m00-room--bench"))
        })
        .collect();
    let pr = group_chat(&sides[1], n, None);
    for (name, r) in [("granary", &gr), ("prosody", &pr)] {
        println!(
            "{name:>8}: {:>7.0} group messages/s to {} members ({:.0} deliveries/s), one message {:.2} ms warm{}, {:>6.0} KiB per more room",
            r.messages,
            ROOM_MEMBERS,
            r.messages * ROOM_MEMBERS as f64,
            r.warm_ms,
            r.cold_ms
                .map(|c| format!(", {c:.1} ms cold (the room grain stopped)"))
                .unwrap_or_default(),
            r.kib_per_room,
        );
    }
    println!(
        "room grain with {ROOM_MEMBERS} members, idle: {} KiB PSS",
        pss(&room_grain)
    );
    // Prosody's rooms are tables in its heap: ten of them may not move
    // its PSS at all, and no ratio is honest then.
    let memory = match pr.kib_per_room {
        k if k >= 1.0 => format!("{:.0}x", gr.kib_per_room / k),
        _ => "n/a (prosody's PSS did not grow)".to_owned(),
    };
    println!(
        "ratios (granary / prosody): group messages/s {:.2}x (goal >= 1.0x), warm latency {:.2}x (goal <= 1.0x), memory per room {memory} (a room here is a sandboxed process)",
        gr.messages / pr.messages,
        gr.warm_ms / pr.warm_ms,
    );
}
