//! Sending mail out, against Postfix, in one run, on this machine.
//!
//! A client submits 4 KB messages for `bob@sink.example` over several
//! sessions; each server queues them (fsynced before the 250) and relays
//! them to the same Postfix `smtp-sink` on loopback. Throughput is
//! messages per second from the first submission until the server's
//! queue is empty again:
//! - Granary: `submissions` (TLS, AUTH PLAIN with an app password), the
//!   outbound queue, MX lookup in the test's DNS server, delivery; once
//!   with DKIM off (the domain's keys removed) and once with both
//!   signatures (Ed25519 and RSA-2048) on;
//! - Postfix: smtpd taking the same messages from loopback (mynetworks;
//!   no TLS and no AUTH, which favours Postfix), queued and relayed with
//!   `relayhost` to the sink, without DKIM.
//!
//! Root; apt's postfix (smtp-sink) and dnsmasq.
//!
//! Full run, against an optimised daemon and grain:
//!   cargo build --release -p granary -p granary-jail --bins && apps/mail/build && \
//!     GRANARY_BIN=$PWD/target/release/granary GRANARY_MAIL_APP=$PWD/apps/mail/dist/granary-mail \
//!     cargo bench -p granary-e2e --bench mail_outbound
//! Smoke (./run-tests), with the debug builds:
//!   GRANARY_BIN=$PWD/target/debug/granary cargo bench -p granary-e2e --bench mail_outbound -- --smoke

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use granary_testkit::mail::{MailHost, Record};
use granary_testkit::{DEADLINE, eventually};

#[path = "support.rs"]
mod support;
use support::{Postfix, free_port, have, median, tls_config};

/// Postfix's `smtp-sink`: takes every message and throws it away.
struct Sink {
    child: Child,
    port: u16,
}

impl Sink {
    fn start() -> Sink {
        let port = free_port();
        let child = Command::new("smtp-sink")
            .args(["-u", "postfix", &format!("127.0.0.1:{port}"), "256"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("smtp-sink (apt install postfix)");
        eventually("smtp-sink to listen", DEADLINE, || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Sink { child, port }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn message(n: u32) -> Vec<u8> {
    let mut m = format!(
        "From: Alice <alice@example.org>\r\nTo: bob@sink.example\r\nSubject: load {n}\r\n\
         Message-ID: <load-{n}@example.org>\r\nDate: Sat, 05 Dec 2026 12:00:00 +0000\r\n\r\n"
    )
    .into_bytes();
    while m.len() < 4096 {
        m.extend_from_slice(b"The quick brown fox jumps over the lazy dog, again and again.\r\n");
    }
    m
}

/// One SMTP session sending `count` messages starting at `first`.
fn session<S: Read + Write>(stream: S, auth: Option<&str>, first: u32, count: u32) {
    let mut r = BufReader::new(stream);
    let reply = |r: &mut BufReader<S>, want: &str| {
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.starts_with(want), "expected {want}, got {line:?}");
            if line.as_bytes().get(3) != Some(&b'-') {
                break;
            }
        }
    };
    let send = |r: &mut BufReader<S>, bytes: &[u8]| {
        r.get_mut().write_all(bytes).unwrap();
        r.get_mut().flush().unwrap();
    };
    reply(&mut r, "220");
    send(&mut r, b"EHLO load.example\r\n");
    reply(&mut r, "250");
    if let Some(b64) = auth {
        send(&mut r, format!("AUTH PLAIN {b64}\r\n").as_bytes());
        reply(&mut r, "235");
    }
    for n in first..first + count {
        send(&mut r, b"MAIL FROM:<alice@example.org>\r\n");
        reply(&mut r, "250");
        send(&mut r, b"RCPT TO:<bob@sink.example>\r\n");
        reply(&mut r, "250");
        send(&mut r, b"DATA\r\n");
        reply(&mut r, "354");
        let mut m = message(n);
        m.extend_from_slice(b".\r\n");
        send(&mut r, &m);
        reply(&mut r, "250");
    }
    send(&mut r, b"QUIT\r\n");
}

/// Submits `messages` over `sessions` sessions, then waits until `empty`
/// says the queue is empty: messages per second.
fn load(
    sessions: u32,
    messages: u32,
    connect: impl Fn(u32, u32) + Send + Sync,
    empty: impl Fn() -> bool,
) -> f64 {
    let start = Instant::now();
    let per = messages / sessions;
    std::thread::scope(|s| {
        for i in 0..sessions {
            let connect = &connect;
            s.spawn(move || connect(i * per, per));
        }
    });
    eventually("the queue to empty", Duration::from_secs(3600), || {
        empty().then_some(())
    });
    f64::from(per * sessions) / start.elapsed().as_secs_f64()
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    if !nix::unistd::geteuid().is_root() {
        println!("mail_outbound benchmark: skipped (needs root)");
        return;
    }
    for tool in ["smtp-sink", "postfix", "dnsmasq"] {
        if !have(tool) {
            println!(
                "mail_outbound benchmark: skipped ({tool} is missing; ./run-tests installs it)"
            );
            return;
        }
    }
    let (mut messages, sessions, rounds) = if smoke { (40, 2, 1) } else { (2000, 8, 3) };
    // `--messages=N`: a shorter (or longer) run.
    if let Some(n) =
        std::env::args().find_map(|a| a.strip_prefix("--messages=").and_then(|n| n.parse().ok()))
    {
        messages = n;
    }
    let sink = Sink::start();
    let host = MailHost::start(
        &["alice"],
        &[
            Record::Mx("sink.example".into(), "mx.sink.example".into(), 10),
            Record::A("mx.sink.example".into(), "127.0.0.1".into()),
        ],
        &format!(
            "outbound_port = {}\nsend_per_hour = 100000000\nmax_connections_per_ip = 1000\n",
            sink.port
        ),
        "",
    );
    let password = host.password("alice");
    let plain = {
        use std::fmt::Write as _;
        let raw = format!("\0alice\0{password}");
        // base64 by hand: the bench has no base64 crate of its own.
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in raw.as_bytes().chunks(3) {
            let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= c.len() {
                    let _ = out.write_char(A[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    };
    let config = tls_config(&host.daemon.ca_file());
    let submissions: SocketAddr = host.submissions();
    let granary = |dkim: bool| {
        if !dkim {
            // DKIM off: the domain without keys sends unsigned.
            for entry in std::fs::read_dir(host.daemon.data_dir().join("dkim/example.org")).unwrap()
            {
                std::fs::remove_file(entry.unwrap().path()).unwrap();
            }
        }
        load(
            sessions,
            messages,
            |first, count| {
                let tcp = TcpStream::connect(submissions).unwrap();
                tcp.set_nodelay(true).unwrap();
                let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
                let conn = rustls::ClientConnection::new(Arc::clone(&config), name).unwrap();
                session(
                    rustls::StreamOwned::new(conn, tcp),
                    Some(&plain),
                    first,
                    count,
                );
            },
            || {
                host.daemon
                    .granary(&["mail", "queue", "list", "--json"])
                    .success()
                    .json()
                    == serde_json::json!([])
            },
        )
    };
    let mut with_dkim = Vec::new();
    for _ in 0..rounds {
        with_dkim.push(granary(true));
    }
    let mut without = Vec::new();
    for _ in 0..rounds {
        without.push(granary(false));
    }

    let postfix = Postfix::start(
        true,
        &format!(
            "mydestination =\nrelayhost = [127.0.0.1]:{}\nsmtpd_relay_restrictions = permit_mynetworks, reject\n\
             smtp_tls_security_level = none\nsmtpd_client_connection_count_limit = 0\n\
             smtpd_client_connection_rate_limit = 0\ndefault_process_limit = 100\n",
            sink.port
        ),
    );
    let postfix_port = postfix.port.unwrap();
    let mut pf = Vec::new();
    for _ in 0..rounds {
        pf.push(load(
            sessions,
            messages,
            |first, count| {
                let tcp = TcpStream::connect(("127.0.0.1", postfix_port)).unwrap();
                tcp.set_nodelay(true).unwrap();
                session(tcp, None, first, count);
            },
            || postfix.queue_empty(),
        ));
    }
    let (g, gd, p) = (median(without), median(with_dkim), median(pf));
    println!(
        "Outbound: {messages} messages of 4 KB over {sessions} sessions, submitted and relayed to smtp-sink"
    );
    println!("  {:<24} {:>10}", "", "msg/s");
    println!("  {:<24} {g:>10.1}", "Granary, DKIM off");
    println!("  {:<24} {gd:>10.1}", "Granary, DKIM on (2 sigs)");
    println!("  {:<24} {p:>10.1}", "Postfix, no DKIM");
    println!(
        "mail_outbound: Granary/Postfix {:.2}x without DKIM (goal >= 1.0x), {:.2}x with DKIM",
        g / p,
        gd / p
    );
    drop(postfix);
    drop(host);
    drop(sink);
}
