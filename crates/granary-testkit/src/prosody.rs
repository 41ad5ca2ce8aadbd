//! Debian's Prosody as a peer chat server for federation tests: its own
//! domain on its own loopback address, names resolved only through the
//! test's DNS server (libunbound, from `lua-unbound`, forwarding to it),
//! STARTTLS on every server stream and dialback allowed
//! (`s2s_secure_auth = false`), everything under a temp dir. Killed by pid
//! on drop.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::{DEADLINE, eventually};

/// A CA made for one test, and leaf certificates it signs.
pub struct TestCa {
    pub dir: PathBuf,
    pub name: String,
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().expect("openssl");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const EC: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
];

impl TestCa {
    /// A new CA, `<dir>/<name>.pem`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        std::fs::create_dir_all(dir).unwrap();
        let p = |f: &str| dir.join(f).to_str().unwrap().to_owned();
        sh(Command::new("openssl")
            .args(["req", "-x509"])
            .args(EC)
            .args(["-keyout", &p(&format!("{name}.key"))])
            .args(["-out", &p(&format!("{name}.pem")), "-days", "2"])
            .args(["-subj", &format!("/CN={name}")])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign"]));
        TestCa {
            dir: dir.to_owned(),
            name: name.to_owned(),
        }
    }

    pub fn pem(&self) -> PathBuf {
        self.dir.join(format!("{}.pem", self.name))
    }

    /// A certificate for `domain` (server and client use, as XMPP servers
    /// present theirs both ways): (cert, key) paths.
    pub fn leaf(&self, domain: &str) -> (PathBuf, PathBuf) {
        let p = |f: &str| self.dir.join(f).to_str().unwrap().to_owned();
        let (crt, key, csr) = (
            p(&format!("{domain}.crt")),
            p(&format!("{domain}.key")),
            p(&format!("{domain}.csr")),
        );
        sh(Command::new("openssl")
            .arg("req")
            .args(EC)
            .args(["-keyout", &key, "-out", &csr])
            .args(["-subj", &format!("/CN={domain}")])
            .args(["-addext", &format!("subjectAltName=DNS:{domain}")])
            .args(["-addext", "extendedKeyUsage=serverAuth,clientAuth"]));
        sh(Command::new("openssl")
            .args([
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &self.pem().display().to_string(),
            ])
            .args(["-CAkey", &p(&format!("{}.key", self.name))])
            .args(["-CAcreateserial", "-copy_extensions", "copy", "-days", "2"])
            .args(["-out", &crt]));
        (crt.into(), key.into())
    }
}

/// A port free on `ip` right now (bound and released).
pub fn free_port_on(ip: Ipv4Addr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

pub struct Prosody {
    child: Child,
    pub dir: tempfile::TempDir,
    pub domain: String,
    pub ip: Ipv4Addr,
    /// Client-to-server (STARTTLS).
    pub c2s: u16,
    /// Server-to-server.
    pub s2s: u16,
}

impl Prosody {
    /// Prosody serving `domain` on `ip` with a certificate from `ca`,
    /// resolving through `dns`, with `users` (name, password).
    pub fn start(
        domain: &str,
        ip: Ipv4Addr,
        ca: &TestCa,
        dns: SocketAddr,
        users: &[(&str, &str)],
    ) -> Prosody {
        let dir = tempfile::Builder::new()
            .prefix("prosody-")
            .tempdir()
            .unwrap();
        let d = dir.path().display().to_string();
        let (crt, key) = ca.leaf(domain);
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::create_dir_all(dir.path().join("certs")).unwrap();
        let (c2s, s2s) = (free_port_on(ip), free_port_on(ip));
        let config = dir.path().join("prosody.cfg.lua");
        std::fs::write(
            &config,
            format!(
                r#"run_as_root = true
pidfile = "{d}/prosody.pid"
data_path = "{d}/data"
plugin_paths = {{}}
network_backend = "epoll"
interfaces = {{ "{ip}" }}
local_interfaces = {{ "{ip}" }}
c2s_ports = {{ {c2s} }}
s2s_ports = {{ {s2s} }}
c2s_direct_tls_ports = {{}}
s2s_direct_tls_ports = {{}}
legacy_ssl_ports = {{}}
use_ipv6 = false
unbound = {{
    resolvconf = false;
    hoststxt = false;
    forward = "{dns_ip}@{dns_port}";
    options = {{ ["local-zone:"] = "test. transparent" }};
}}
modules_enabled = {{ "disco"; "roster"; "saslauth"; "tls"; "dialback"; "ping"; "posix" }}
authentication = "internal_plain"
storage = "internal"
c2s_require_encryption = true
s2s_require_encryption = true
s2s_secure_auth = false
s2s_timeout = 30
certificates = "{d}/certs"
log = {{
    {{ levels = {{ min = "debug" }}, to = "file", filename = "{d}/prosody.log" }};
}}
VirtualHost "{domain}"
    ssl = {{ certificate = "{crt}"; key = "{key}"; }}
"#,
                dns_ip = dns.ip(),
                dns_port = dns.port(),
                crt = crt.display(),
                key = key.display(),
            ),
        )
        .unwrap();
        for (user, password) in users {
            let out = Command::new("prosodyctl")
                .args(["--config", config.to_str().unwrap(), "register"])
                .args([user, domain, password])
                .output()
                .expect("prosodyctl (Debian's prosody package)");
            assert!(out.status.success(), "prosodyctl register: {out:?}");
        }
        let child = Command::new("prosody")
            .args(["--config", config.to_str().unwrap(), "-F"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prosody (Debian's prosody package)");
        let mut p = Prosody {
            child,
            dir,
            domain: domain.to_owned(),
            ip,
            c2s,
            s2s,
        };
        eventually("prosody to listen", DEADLINE, || {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("prosody exited ({status}):\n{}", p.log());
            }
            TcpStream::connect((ip, s2s))
                .ok()
                .and(TcpStream::connect((ip, c2s)).ok())
        });
        p
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prosody.log")).unwrap_or_default()
    }
}

impl Drop for Prosody {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
