//! Mail against Postfix and Dovecot, in one run, on this machine:
//!
//! 1. SMTP in: `smtp-source` (Postfix's load tool) sends 4 KB messages to
//!    Granary's MX and to a Postfix smtpd set up in a directory of its own
//!    (`local_transport = discard`), with 1 and with 20 sessions. Both
//!    answer 250 only once the message is fsynced (Granary's spool;
//!    Postfix's queue file). Messages/s and the ratio; for Granary also
//!    how long until every message is in the mailbox.
//! 2. IMAP cycles: our own load generator (8 clients, each: TLS connect,
//!    LOGIN, SELECT INBOX, FETCH 10 headers, FETCH 1 body, APPEND, LOGOUT)
//!    against Dovecot (`mail_fsync = always`, TLS, maildir, a SHA512-CRYPT
//!    password and its auth cache) and against Granary through the
//!    gateway (argon2id app passwords, verified logins kept a minute). Cycles/s, p99 of a cycle, ratios.
//! 3. Memory per idle logged-in IMAP connection: PSS of the server's whole
//!    process tree with 200 connections logged in and a mailbox selected,
//!    minus before, over 200.
//!
//! Root; apt's postfix and dovecot-imapd, dnsmasq.
//!
//! Full run, against an optimised daemon and grain:
//!   cargo build --release -p granary -p granary-jail --bins && apps/mail/build && \
//!     GRANARY_BIN=$PWD/target/release/granary GRANARY_MAIL_APP=$PWD/apps/mail/dist/granary-mail \
//!     cargo bench -p granary-e2e --bench mail
//! Smoke (./run-tests), with the debug builds:
//!   GRANARY_BIN=$PWD/target/debug/granary cargo bench -p granary-e2e --bench mail -- --smoke

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use granary_testkit::mail::{MailHost, sender_records};
use granary_testkit::{DEADLINE, eventually};

#[path = "support.rs"]
mod support;
use support::{Postfix, free_port, have, median, sh, tls_config, wait_gone};

/// Dovecot serving IMAP with TLS from a directory of its own.
struct Dovecot {
    dir: tempfile::TempDir,
    port: u16,
    master: u32,
}

impl Dovecot {
    fn start() -> Dovecot {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir(d.join("home")).unwrap();
        sh(Command::new("chown").args(["nobody:nogroup", d.join("home").to_str().unwrap()]));
        // A CA and a certificate it signed for 127.0.0.1.
        support::openssl_leaf(d);
        let port = free_port();
        // SHA512-CRYPT, the scheme Dovecot set-ups commonly use, with the
        // auth cache on. (Its ARGON2ID, at 64 MiB and 3 passes, held it to
        // ~10 cycles/s here: every login verifies the hash again, cache or
        // not. Granary verifies an argon2id app password once a minute.)
        let hash = Command::new("doveadm")
            .args(["pw", "-s", "SHA512-CRYPT", "-p", "secret-password"])
            .output()
            .expect("doveadm pw");
        assert!(hash.status.success());
        let hash = String::from_utf8(hash.stdout).unwrap();
        std::fs::write(d.join("passwd"), format!("alice:{}::::::\n", hash.trim())).unwrap();
        std::fs::write(
            d.join("dovecot.conf"),
            format!(
                "protocols = imap\nlisten = 127.0.0.1\nbase_dir = {d}/run\nstate_dir = {d}/state\n\
                 log_path = {d}/dovecot.log\nssl = required\nssl_cert = <{d}/cert.pem\nssl_key = <{d}/key.pem\n\
                 auth_mechanisms = plain\nauth_cache_size = 10M\nauth_cache_ttl = 1 min\npassdb {{\n driver = passwd-file\n args = {d}/passwd\n}}\n\
                 userdb {{\n driver = static\n args = uid=nobody gid=nogroup home={d}/home/%u\n}}\n\
                 mail_location = maildir:~/Maildir\nmail_fsync = always\nfirst_valid_uid = 1\n\
                 service imap-login {{\n process_limit = 1024\n inet_listener imap {{\n port = 0\n }}\n inet_listener imaps {{\n address = 127.0.0.1\n port = {port}\n }}\n}}\n\
                 service imap {{\n process_limit = 1024\n}}\ndefault_client_limit = 2000\nprotocol imap {{\n mail_max_userip_connections = 1000\n}}\n",
                d = d.display()
            ),
        )
        .unwrap();
        // imap-login refuses to run as root: Dovecot starts it as dovenull.
        // Its master daemonizes and would hold captured pipes open: no
        // capture, only the exit status of the starting process.
        let started = Command::new("setsid")
            .args(["dovecot", "-c", d.join("dovecot.conf").to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run dovecot");
        assert!(
            started.success(),
            "dovecot did not start: see {}/dovecot.log",
            d.display()
        );
        let master = eventually("dovecot's master", DEADLINE, || {
            std::fs::read_to_string(d.join("run/master.pid"))
                .ok()?
                .trim()
                .parse::<u32>()
                .ok()
        });
        eventually("dovecot to listen", DEADLINE, || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Dovecot { dir, port, master }
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        let _ = Command::new("doveadm")
            .args([
                "-c",
                self.dir.path().join("dovecot.conf").to_str().unwrap(),
                "stop",
            ])
            .output();
        wait_gone(self.master);
    }
}

/// `smtp-source` with `sessions` sessions sending `messages` of 4 KB:
/// messages per second until the last 250.
fn smtp_source(addr: SocketAddr, sessions: u32, messages: u32) -> f64 {
    let start = Instant::now();
    sh(Command::new("smtp-source").args([
        "-s",
        &sessions.to_string(),
        "-m",
        &messages.to_string(),
        "-l",
        "4096",
        "-M",
        "client.remote.example",
        "-f",
        "sender@remote.example",
        "-t",
        "alice@example.org",
        &format!("{}:{}", addr.ip(), addr.port()),
    ]));
    f64::from(messages) / start.elapsed().as_secs_f64()
}

/// A minimal IMAP client over TLS: enough to drive load.
struct Imap {
    tls: BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
    n: u32,
}

impl Imap {
    fn connect(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> Imap {
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
        let conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
        let mut c = Imap {
            tls: BufReader::new(rustls::StreamOwned::new(conn, tcp)),
            n: 0,
        };
        let greeting = c.line();
        assert!(greeting.starts_with("* OK"), "{greeting}");
        c
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.tls.read_line(&mut l).unwrap();
        l
    }

    /// Sends a command (with an optional literal after a synchronising
    /// `{n}`) and reads to its tagged answer, which must be OK.
    fn cmd(&mut self, text: &str, literal: Option<&[u8]>) {
        self.n += 1;
        let tag = format!("t{}", self.n);
        let stream = self.tls.get_mut();
        match literal {
            Some(data) => {
                stream
                    .write_all(format!("{tag} {text} {{{}}}\r\n", data.len()).as_bytes())
                    .unwrap();
                stream.flush().unwrap();
                let l = self.line();
                assert!(l.starts_with('+'), "{l}");
                let stream = self.tls.get_mut();
                stream.write_all(data).unwrap();
                stream.write_all(b"\r\n").unwrap();
            }
            None => stream
                .write_all(format!("{tag} {text}\r\n").as_bytes())
                .unwrap(),
        }
        self.tls.get_mut().flush().unwrap();
        loop {
            let l = self.line();
            assert!(!l.is_empty(), "connection closed during {text}");
            if let Some(rest) = l.strip_prefix(&format!("{tag} ")) {
                assert!(rest.starts_with("OK"), "{text}: {l}");
                return;
            }
            // Skip literal data inside untagged answers.
            if let Some(open) = l
                .trim_end()
                .strip_suffix('}')
                .and_then(|s| s.rfind('{').map(|i| &s[i + 1..]))
                && let Ok(n) = open.parse::<usize>()
            {
                let mut skip = vec![0u8; n];
                self.tls.read_exact(&mut skip).unwrap();
            }
        }
    }
}

const MESSAGE: &[u8] =
    b"From: load@remote.example\r\nTo: alice@example.org\r\nSubject: load\r\n\r\n\
a message the load generator appends, about one kilobyte once padded with this line of text.\r\n";

/// `clients` each running cycles for `secs`: (cycles/s, p99 seconds).
fn imap_load(
    addr: SocketAddr,
    ca: &Path,
    user: &str,
    password: &str,
    clients: usize,
    secs: u64,
) -> (f64, f64) {
    let config = tls_config(ca);
    let until = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (config, user, password) = (config.clone(), user.to_owned(), password.to_owned());
            std::thread::spawn(move || {
                let mut times = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    let mut c = Imap::connect(addr, &config);
                    c.cmd(&format!("LOGIN {user} {password}"), None);
                    c.cmd("SELECT INBOX", None);
                    c.cmd("FETCH 1:10 (UID FLAGS BODY.PEEK[HEADER])", None);
                    c.cmd("FETCH 1 (BODY.PEEK[])", None);
                    c.cmd("APPEND INBOX", Some(MESSAGE));
                    c.cmd("LOGOUT", None);
                    times.push(t.elapsed().as_secs_f64());
                }
                times
            })
        })
        .collect();
    let mut all: Vec<f64> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    let p99 = all[((all.len() as f64 * 0.99) as usize).min(all.len() - 1)];
    (all.len() as f64 / elapsed, p99)
}

/// PSS in KiB of `root` and every process under it.
fn tree_pss(root: u32) -> u64 {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
        let ppid: u32 = after
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        parents.push((pid, ppid));
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .sum()
}

/// KiB of PSS each idle, logged-in connection with INBOX selected adds.
fn idle_memory(
    addr: SocketAddr,
    ca: &Path,
    user: &str,
    password: &str,
    root: u32,
    n: usize,
) -> f64 {
    let config = tls_config(ca);
    // One connection first, so what starts once (the grain) is in the base.
    let mut first = Imap::connect(addr, &config);
    first.cmd(&format!("LOGIN {user} {password}"), None);
    first.cmd("SELECT INBOX", None);
    std::thread::sleep(Duration::from_millis(500));
    let before = tree_pss(root);
    let mut held = Vec::new();
    for _ in 0..n {
        let mut c = Imap::connect(addr, &config);
        c.cmd(&format!("LOGIN {user} {password}"), None);
        c.cmd("SELECT INBOX", None);
        held.push(c);
    }
    // Let allocators settle (this is a measurement, not a test).
    std::thread::sleep(Duration::from_secs(1));
    let after = tree_pss(root);
    drop(held);
    drop(first);
    after.saturating_sub(before) as f64 / n as f64
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    if !nix::unistd::geteuid().is_root() {
        println!("mail benchmark: skipped (needs root)");
        return;
    }
    for tool in ["smtp-source", "postfix", "dovecot", "dnsmasq", "openssl"] {
        if !have(tool) {
            println!("mail benchmark: skipped ({tool} is missing; ./run-tests installs it)");
            return;
        }
    }
    let (mut messages, clients, secs, idle_conns, rounds) = if smoke {
        (200, 2, 2, 20, 1)
    } else {
        (5000, 8, 10, 200, 3)
    };
    // `--messages=N`: a shorter SMTP part.
    if let Some(n) =
        std::env::args().find_map(|a| a.strip_prefix("--messages=").and_then(|n| n.parse().ok()))
    {
        messages = n;
    }

    // alice takes the SMTP load; bob's mailbox, like Dovecot's, starts the
    // IMAP load with 20 messages.
    let host = MailHost::start(
        &["alice", "bob"],
        &sender_records("remote.example"),
        "max_messages_per_ip = 10000000\nmax_connections_per_ip = 1000\n",
        "",
    );
    let password = host.password("bob");
    // Receiving mail for example.org and throwing it away once it is
    // queued (durably).
    let postfix = Postfix::start(
        true,
        "myhostname = mx.example.org\nmydestination = example.org\nlocal_recipient_maps =\n\
         local_transport = discard:\nsmtpd_client_connection_count_limit = 0\n\
         smtpd_client_connection_rate_limit = 0\ndefault_process_limit = 100\n",
    );
    let postfix_addr: SocketAddr = format!("127.0.0.1:{}", postfix.port.unwrap())
        .parse()
        .unwrap();

    println!("SMTP in: 4 KB messages by smtp-source, 250 only once durable");
    println!(
        "  {:<10} {:>14} {:>14} {:>8}",
        "sessions", "Granary msg/s", "Postfix msg/s", "ratio"
    );
    let mut smtp_ratios = Vec::new();
    for sessions in [1u32, 20] {
        let mut g = Vec::new();
        let mut p = Vec::new();
        for _ in 0..rounds {
            g.push(smtp_source(host.smtp(), sessions, messages));
            p.push(smtp_source(postfix_addr, sessions, messages));
        }
        let (g, p) = (median(g), median(p));
        smtp_ratios.push(g / p);
        println!("  {sessions:<10} {g:>14.0} {p:>14.0} {:>7.2}x", g / p);
    }
    let delivered_by = Instant::now();
    let total = u64::from(messages) * 2 * rounds as u64;
    eventually(
        "every message in the mailbox",
        Duration::from_secs(3600),
        || (host.count("alice", "INBOX") + host.count("alice", "Junk") == total).then_some(()),
    );
    println!(
        "  (Granary: every one of {total} messages in alice's mail grain {:.1} s after the last 250)",
        delivered_by.elapsed().as_secs_f64()
    );
    drop(postfix);

    let dovecot = Dovecot::start();
    let dovecot_addr: SocketAddr = format!("127.0.0.1:{}", dovecot.port).parse().unwrap();
    let dovecot_ca: PathBuf = dovecot.dir.path().join("ca.pem");
    // Both mailboxes start with the same 20 messages.
    {
        let config = tls_config(&host.daemon.ca_file());
        let mut c = Imap::connect(host.imaps(), &config);
        c.cmd(&format!("LOGIN bob {password}"), None);
        for _ in 0..20 {
            c.cmd("APPEND INBOX", Some(MESSAGE));
        }
        c.cmd("LOGOUT", None);
    }
    {
        let config = tls_config(&dovecot_ca);
        let mut c = Imap::connect(dovecot_addr, &config);
        c.cmd("LOGIN alice secret-password", None);
        for _ in 0..20 {
            c.cmd("APPEND INBOX", Some(MESSAGE));
        }
        c.cmd("LOGOUT", None);
    }
    let granary_ca = host.daemon.ca_file();
    println!(
        "IMAP: {clients} clients, each cycle TLS + LOGIN, SELECT, FETCH 10 headers, FETCH 1 body, APPEND, LOGOUT"
    );
    let mut g = Vec::new();
    let mut d = Vec::new();
    for _ in 0..rounds {
        g.push(imap_load(
            host.imaps(),
            &granary_ca,
            "bob",
            &password,
            clients,
            secs,
        ));
        d.push(imap_load(
            dovecot_addr,
            &dovecot_ca,
            "alice",
            "secret-password",
            clients,
            secs,
        ));
    }
    let (gc, gp) = (
        median(g.iter().map(|x| x.0).collect()),
        median(g.iter().map(|x| x.1).collect()),
    );
    let (dc, dp) = (
        median(d.iter().map(|x| x.0).collect()),
        median(d.iter().map(|x| x.1).collect()),
    );
    println!("  {:<10} {:>12} {:>12}", "", "cycles/s", "p99 ms");
    println!("  {:<10} {gc:>12.1} {:>12.1}", "Granary", gp * 1000.0);
    println!("  {:<10} {dc:>12.1} {:>12.1}", "Dovecot", dp * 1000.0);
    println!(
        "  Granary/Dovecot: {:.2}x cycles/s (goal >= 1.0x), p99 {:.2}x (goal <= 1.0x)",
        gc / dc,
        gp / dp
    );

    println!("Memory per idle logged-in IMAP connection, PSS over {idle_conns} connections");
    let gm = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        idle_memory(
            host.imaps(),
            &granary_ca,
            "bob",
            &password,
            host.daemon.pid(),
            idle_conns,
        )
    })) {
        Ok(gm) => gm,
        Err(panic) => {
            let log = host.daemon.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- daemon log (last lines) ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
            let grain = host.daemon.granary(&["grain", "logs", "bob/mail"]);
            eprintln!("--- bob's mail grain ---\n{}", grain.stdout);
            std::panic::resume_unwind(panic);
        }
    };
    let dm = idle_memory(
        dovecot_addr,
        &dovecot_ca,
        "alice",
        "secret-password",
        dovecot.master,
        idle_conns,
    );
    println!(
        "  Granary {gm:.0} KiB, Dovecot {dm:.0} KiB: {:.2}x (goal <= 0.5x)",
        gm / dm
    );
    println!(
        "mail: smtp 1 session {:.2}x, 20 sessions {:.2}x Postfix; imap {:.2}x Dovecot cycles/s, p99 {:.2}x; memory {:.2}x",
        smtp_ratios[0],
        smtp_ratios[1],
        gc / dc,
        gp / dp,
        gm / dm
    );
}
