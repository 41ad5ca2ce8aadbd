//! Debian's Postfix as a peer the tests and benchmarks start: in a
//! directory of its own (queue, data, log), optionally with an smtpd on a
//! free loopback port, stopped by `postfix stop` and its master's pid on
//! drop.

use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{DEADLINE, eventually};

pub struct Postfix {
    pub dir: tempfile::TempDir,
    /// The smtpd's port, when it has one.
    pub port: Option<u16>,
    pub master: u32,
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .expect("postfix is installed (./run-tests does it)");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Postfix {
    /// Starts Postfix with `main_cf` after the base settings (later
    /// settings win); with `smtpd`, an smtpd listens on a free loopback
    /// port.
    pub fn start(smtpd: bool, main_cf: &str) -> Postfix {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        // Postfix's daemons run as the postfix user: they must get in, and
        // own the data directory.
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir(d.join("queue")).unwrap();
        std::fs::create_dir(d.join("data")).unwrap();
        run(Command::new("chown").args(["postfix", d.join("data").to_str().unwrap()]));
        let master_cf = std::fs::read_to_string("/etc/postfix/master.cf")
            .expect("postfix is installed (./run-tests does it)");
        let mut lines: Vec<String> = master_cf
            .lines()
            .filter(|l| !l.starts_with("smtp      inet"))
            .map(str::to_owned)
            .collect();
        let port = smtpd.then(|| {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            lines.push(format!("127.0.0.1:{port} inet n - n - - smtpd"));
            port
        });
        std::fs::write(d.join("master.cf"), lines.join("\n") + "\n").unwrap();
        std::fs::write(
            d.join("main.cf"),
            format!(
                "compatibility_level = 3.6\nqueue_directory = {q}\ndata_directory = {data}\n\
                 maillog_file = {d}/postfix.log\nmaillog_file_prefixes = {d}\n\
                 inet_interfaces = loopback-only\ninet_protocols = ipv4\nmyhostname = postfix.test\n\
                 alias_maps =\nalias_database =\nmynetworks = 127.0.0.0/8\n{main_cf}\n",
                q = d.join("queue").display(),
                data = d.join("data").display(),
                d = d.display(),
            ),
        )
        .unwrap();
        run(Command::new("postfix").args(["-c", d.to_str().unwrap(), "start"]));
        let pid_file = d.join("queue/pid/master.pid");
        let master = eventually("postfix's master", DEADLINE, || {
            std::fs::read_to_string(&pid_file)
                .ok()?
                .trim()
                .parse::<u32>()
                .ok()
        });
        if let Some(port) = port {
            eventually("postfix's smtpd to listen", DEADLINE, || {
                TcpStream::connect(("127.0.0.1", port)).ok()
            });
        }
        Postfix { dir, port, master }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postfix.log")).unwrap_or_default()
    }

    /// `postfix reload`: re-reads its configuration and maps.
    pub fn reload(&self) {
        run(Command::new("postfix").args(["-c", self.dir.path().to_str().unwrap(), "reload"]));
    }

    /// Hands a message to Postfix with its own `sendmail`.
    pub fn send(&self, from: &str, to: &[&str], message: &str) {
        use std::io::Write;
        let mut child = Command::new("/usr/sbin/sendmail")
            .args(["-C", self.dir.path().to_str().unwrap(), "-f", from])
            .args(to)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("sendmail");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(message.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
    }

    /// Whether its queue is empty.
    pub fn queue_empty(&self) -> bool {
        let out = Command::new("postqueue")
            .args(["-c", self.dir.path().to_str().unwrap(), "-p"])
            .output()
            .expect("postqueue");
        String::from_utf8_lossy(&out.stdout).contains("Mail queue is empty")
    }
}

/// Waits until nothing answers at /proc/PID (stopped by its own tool),
/// else SIGKILLs it.
pub fn wait_gone(pid: u32) {
    let gone = || !Path::new(&format!("/proc/{pid}")).exists();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !gone() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !gone() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        // SIGTERM to the master stops it and its daemons; `postfix stop`
        // was seen to hang in its own `master -t` check.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.master as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        wait_gone(self.master);
    }
}
