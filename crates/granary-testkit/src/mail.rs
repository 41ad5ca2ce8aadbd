//! Mail test helpers: a DNS server the test starts on loopback (Debian's
//! `dnsmasq`) with its own records, and a daemon serving mail for a domain
//! with the mail app installed and users made.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{DEADLINE, Daemon, DaemonMode, app_password, eventually};

/// The mail app as a signed package: the static debug build, or
/// `$GRANARY_MAIL_APP` (a release build, for benchmarks).
pub fn mail_package(dir: &Path) -> PathBuf {
    match std::env::var_os("GRANARY_MAIL_APP") {
        Some(bin) => crate::app_package_from(dir, "mail", "granary-mail", "", Path::new(&bin)),
        None => crate::app_package(dir, "mail", "granary-mail", ""),
    }
}

/// One DNS record the test server answers.
#[derive(Debug, Clone)]
pub enum Record {
    /// A TXT record; long values are split into 255-byte strings.
    Txt(String, String),
    /// An MX record: domain, host, preference.
    Mx(String, String, u16),
    /// An A record.
    A(String, String),
    /// An SRV record: name, target, port, priority, weight.
    Srv(String, String, u16, u16, u16),
    /// A CNAME: name, target (a name this server has records for).
    Cname(String, String),
    /// An A record for a domain and every name under it.
    Wildcard(String, String),
}

/// `dnsmasq` on a loopback port, answering only its records (every other
/// name is NXDOMAIN, nothing is asked upstream). Killed by pid on drop.
pub struct Dns {
    child: Child,
    pub addr: SocketAddr,
}

impl Dns {
    pub fn start(records: &[Record]) -> Dns {
        Dns::start_on(std::net::Ipv4Addr::LOCALHOST, records)
    }

    /// A server on `ip` (the host's end of test network namespaces, say).
    pub fn start_on(ip: std::net::Ipv4Addr, records: &[Record]) -> Dns {
        for _ in 0..20 {
            // A free port: bind, note it, release it for dnsmasq.
            let port = UdpSocket::bind((ip, 0))
                .and_then(|s| s.local_addr())
                .expect("a free UDP port")
                .port();
            if let Some(dns) = Dns::try_at(SocketAddr::from((ip, port)), records) {
                return dns;
            }
        }
        panic!("dnsmasq did not start on a port of {ip}");
    }

    /// Answers `records` from now on, at the same address (the server is
    /// restarted on its port).
    pub fn replace(&mut self, records: &[Record]) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
        for _ in 0..50 {
            if let Some(dns) = Dns::try_at(self.addr, records) {
                // Swap in the new child; the old one has been reaped.
                let old = std::mem::replace(self, dns);
                std::mem::forget(old);
                return;
            }
        }
        panic!("dnsmasq did not start again on {}", self.addr);
    }

    fn try_at(addr: SocketAddr, records: &[Record]) -> Option<Dns> {
        {
            let mut cmd = Command::new("dnsmasq");
            cmd.args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--conf-file=/dev/null",
                "--bind-interfaces",
                "--pid-file=",
                "--user=root",
                "--local=/#/",
                "--log-facility=-",
                "--cache-size=0",
                // A TTL, as real zones give, so resolvers may cache answers.
                "--local-ttl=300",
            ])
            .arg(format!("--listen-address={}", addr.ip()))
            .arg(format!("--port={}", addr.port()));
            for r in records {
                cmd.arg(match r {
                    Record::Txt(name, value) => {
                        // Given in argv, dnsmasq takes quotes literally; the
                        // 255-byte strings are separated by commas (no
                        // record here has a comma of its own).
                        assert!(!value.contains(','), "a TXT value with a comma: {value}");
                        let parts: Vec<String> = value
                            .as_bytes()
                            .chunks(255)
                            .map(|c| String::from_utf8_lossy(c).into_owned())
                            .collect();
                        format!("--txt-record={name},{}", parts.join(","))
                    }
                    Record::Mx(name, host, pref) => format!("--mx-host={name},{host},{pref}"),
                    Record::A(name, ip) => format!("--host-record={name},{ip}"),
                    Record::Srv(name, target, port, priority, weight) => {
                        format!("--srv-host={name},{target},{port},{priority},{weight}")
                    }
                    Record::Cname(name, target) => format!("--cname={name},{target}"),
                    Record::Wildcard(domain, ip) => format!("--address=/{domain}/{ip}"),
                });
            }
            let mut child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("dnsmasq (apt install dnsmasq; ./run-tests does)");
            // Ready when it answers; gone when the port was taken meanwhile.
            let mut dns = None;
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if answers(addr) {
                    dns = Some(());
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if dns.is_some() {
                return Some(Dns { child, addr });
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        None
    }
}

/// Whether a DNS server answers a query at `addr`.
fn answers(addr: SocketAddr) -> bool {
    let Ok(s) = UdpSocket::bind((addr.ip(), 0)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    // A query for "ready." type A.
    let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    q.extend_from_slice(b"\x05ready\x00\x00\x01\x00\x01");
    if s.send_to(&q, addr).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    matches!(s.recv_from(&mut buf), Ok((n, _)) if n >= 12 && buf[0] == 0x12)
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

/// The domain test mail hosts serve.
pub const DOMAIN: &str = "example.org";

/// DNS records for a sending domain whose SPF passes from loopback.
pub fn sender_records(domain: &str) -> Vec<Record> {
    vec![
        Record::Txt(domain.to_owned(), "v=spf1 ip4:127.0.0.0/8 -all".to_owned()),
        Record::Mx(DOMAIN.to_owned(), format!("mx.{DOMAIN}"), 10),
        Record::A(format!("mx.{DOMAIN}"), "127.0.0.1".to_owned()),
    ]
}

/// A daemon receiving mail for [`DOMAIN`], with the mail app installed,
/// `users` made and a DNS server of its own.
pub struct MailHost {
    /// Dropped first: the daemon stops before the DNS server.
    pub daemon: Daemon,
    pub dns: Dns,
    pub dir: tempfile::TempDir,
}

impl MailHost {
    /// `extra` is TOML added to the config (inside `[mail]` keys go after
    /// a `[mail]` line of their own: the helper writes the resolver and
    /// the postmaster there).
    pub fn start(users: &[&str], records: &[Record], extra_mail: &str, extra: &str) -> MailHost {
        MailHost::start_for(DOMAIN, users, records, extra_mail, extra)
    }

    /// [`MailHost::start`] for another `domain`.
    pub fn start_for(
        domain: &str,
        users: &[&str],
        records: &[Record],
        extra_mail: &str,
        extra: &str,
    ) -> MailHost {
        let dir = tempfile::tempdir().expect("temp dir");
        let package = mail_package(dir.path());
        let dns = Dns::start(records);
        let postmaster = users.first().copied().unwrap_or("postmaster");
        let config = format!(
            "domain = \"{domain}\"\n{extra}\n[mail]\nresolver = \"{}\"\npostmaster = \"{postmaster}\"\n\
             retry_first = \"1s\"\nretry_max = \"2s\"\n{extra_mail}\n",
            dns.addr
        );
        let daemon = Daemon::start_with(DaemonMode::Serve, &config);
        daemon
            .granary(&["app", "install", package.to_str().expect("utf-8 path")])
            .success();
        for u in users {
            daemon
                .granary_with_stdin(&["user", "add", u], None)
                .success();
        }
        daemon.granary(&["mail", "domain", "add", domain]).success();
        MailHost { daemon, dns, dir }
    }

    pub fn smtp(&self) -> SocketAddr {
        self.daemon.listener("smtp")
    }

    pub fn imaps(&self) -> SocketAddr {
        self.daemon.listener("imaps")
    }

    pub fn imap(&self) -> SocketAddr {
        self.daemon.listener("imap")
    }

    /// Submission with STARTTLS (like 587).
    pub fn submission(&self) -> SocketAddr {
        self.daemon.listener("submission")
    }

    /// Submission over TLS from the start (like 465).
    pub fn submissions(&self) -> SocketAddr {
        self.daemon.listener("submissions")
    }

    /// A new app password of kind `mail` for `user`.
    pub fn password(&self, user: &str) -> String {
        app_password(&self.daemon, user, "mail")
    }

    /// `granary mail status USER --json`.
    pub fn status(&self, user: &str) -> serde_json::Value {
        self.daemon
            .granary(&["mail", "status", user, "--json"])
            .success()
            .json()
    }

    /// Messages in `user`'s `mailbox`, as `granary mail status` counts.
    pub fn count(&self, user: &str, mailbox: &str) -> u64 {
        let s = self.status(user);
        s["mailboxes"]
            .as_array()
            .expect("mailboxes")
            .iter()
            .find(|m| m["name"] == mailbox)
            .and_then(|m| m["messages"].as_u64())
            .unwrap_or(0)
    }

    /// Waits until `user`'s `mailbox` holds `n` messages.
    pub fn wait_for(&self, user: &str, mailbox: &str, n: u64) {
        eventually(
            &format!("{n} message(s) in {user}'s {mailbox}"),
            DEADLINE,
            || (self.count(user, mailbox) == n).then_some(()),
        );
    }

    /// The spool as `granary mail spool list --json` shows it.
    pub fn spool(&self) -> Vec<serde_json::Value> {
        self.daemon
            .granary(&["mail", "spool", "list", "--json"])
            .success()
            .json()
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Runs Debian's `swaks` against the MX with `args`; (success, output).
    pub fn swaks(&self, args: &[&str]) -> (bool, String) {
        self.swaks_at(self.smtp(), args)
    }

    /// Runs Debian's `swaks` against `server` with `args`; (success,
    /// output).
    pub fn swaks_at(&self, server: SocketAddr, args: &[&str]) -> (bool, String) {
        swaks_at(server, args)
    }
}

/// Runs Debian's `swaks` against `server`, saying HELO as a host of
/// remote.example, with `args`; (success, output).
pub fn swaks_at(server: SocketAddr, args: &[&str]) -> (bool, String) {
    let out = Command::new("swaks")
        .args(["--server", &server.ip().to_string()])
        .args(["--port", &server.port().to_string()])
        .args(["--helo", "client.remote.example"])
        .args(args)
        .output()
        .expect("swaks (apt install swaks; ./run-tests does)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The Python the tests drive clients with: the project's `.venv` (made by
/// `./run-tests` from `tests/python/requirements.txt`), else `python3`.
pub fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// Runs a Python `script` with `env`; (success, stdout + stderr).
pub fn run_python(script: &str, env: &[(&str, String)]) -> (bool, String) {
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("python");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

impl MailHost {
    /// What a Python client needs to reach this host as `user`: IMAP_HOST,
    /// IMAPS_PORT, IMAP_PORT, SMTP_PORT, SUBMISSION_PORT,
    /// SUBMISSIONS_PORT, CA, USER, PASSWORD.
    pub fn client_env(&self, user: &str, password: &str) -> Vec<(&'static str, String)> {
        vec![
            ("IMAP_HOST", "127.0.0.1".to_owned()),
            ("IMAPS_PORT", self.imaps().port().to_string()),
            ("IMAP_PORT", self.imap().port().to_string()),
            ("SMTP_PORT", self.smtp().port().to_string()),
            ("SUBMISSION_PORT", self.submission().port().to_string()),
            ("SUBMISSIONS_PORT", self.submissions().port().to_string()),
            ("CA", self.daemon.ca_file().display().to_string()),
            ("USER", user.to_owned()),
            ("PASSWORD", password.to_owned()),
        ]
    }
}
