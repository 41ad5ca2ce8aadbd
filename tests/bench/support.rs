//! What the mail benchmarks share: tools on PATH, free ports, medians,
//! commands that must succeed, waiting for a peer's processes to go, and
//! a TLS client trusting one CA.

#![allow(dead_code)]

use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use granary_testkit::{DEADLINE, eventually};

pub(crate) fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) fn sh(cmd: &mut Command) {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until nothing answers at /proc/PID (stopped by its own tool),
/// else SIGKILLs it.
pub(crate) fn wait_gone(pid: u32) {
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

pub(crate) fn tls_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// Postfix's smtpd on a port of its own, from a directory of its own;
/// `main_cf` adds what it does with the mail.
pub(crate) struct Postfix {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) port: u16,
    pub(crate) master: u32,
}

impl Postfix {
    pub(crate) fn start(main_cf: &str) -> Postfix {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir(d.join("queue")).unwrap();
        std::fs::create_dir(d.join("data")).unwrap();
        sh(Command::new("chown").args(["postfix", d.join("data").to_str().unwrap()]));
        let port = free_port();
        let master_cf = std::fs::read_to_string("/etc/postfix/master.cf").unwrap();
        let mut lines: Vec<String> = master_cf
            .lines()
            .filter(|l| !l.starts_with("smtp      inet"))
            .map(str::to_owned)
            .collect();
        lines.push(format!("127.0.0.1:{port} inet n - n - - smtpd"));
        std::fs::write(d.join("master.cf"), lines.join("\n") + "\n").unwrap();
        std::fs::write(
            d.join("main.cf"),
            format!(
                "compatibility_level = 3.6\nqueue_directory = {q}\ndata_directory = {data}\n\
                 maillog_file = {d}/postfix.log\nmaillog_file_prefixes = {d}\n\
                 inet_interfaces = loopback-only\ninet_protocols = ipv4\nmyhostname = mx.example.org\n\
                 alias_maps =\nalias_database =\nmynetworks = 127.0.0.0/8\n\
                 smtpd_client_connection_count_limit = 0\nsmtpd_client_connection_rate_limit = 0\n\
                 default_process_limit = 100\n{main_cf}",
                q = d.join("queue").display(),
                data = d.join("data").display(),
                d = d.display(),
            ),
        )
        .unwrap();
        sh(Command::new("postfix").args(["-c", d.to_str().unwrap(), "start"]));
        let pid_file = d.join("queue/pid/master.pid");
        let master = eventually("postfix's master", DEADLINE, || {
            std::fs::read_to_string(&pid_file)
                .ok()?
                .trim()
                .parse::<u32>()
                .ok()
        });
        eventually("postfix's smtpd to listen", DEADLINE, || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Postfix { dir, port, master }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .args(["-c", self.dir.path().to_str().unwrap(), "stop"])
            .output();
        wait_gone(self.master);
    }
}
