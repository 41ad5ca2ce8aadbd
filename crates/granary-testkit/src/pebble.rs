//! Debian's `pebble`, Let's Encrypt's ACME test CA, as the tests start
//! it: its directory on a free loopback port over HTTPS (a certificate
//! from a test CA made here by openssl), names resolved through the
//! test's own DNS server, and the challenges checked on the ports given
//! (the gateway's `http` and `https` listeners). Killed by pid on drop.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::{DEADLINE, eventually};

/// Where pebble will listen, and the root its directory's certificate
/// chains to: known before the daemon that uses it starts.
pub struct PebblePlan {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub management: u16,
}

pub struct Pebble {
    pub plan: PebblePlan,
    child: Option<Child>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn sh(dir: &Path, script: &str) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PebblePlan {
    /// Picks the ports and makes the directory's TLS certificate.
    pub fn new() -> PebblePlan {
        let dir = tempfile::Builder::new()
            .prefix("granary-pebble-")
            .tempdir()
            .expect("temp dir");
        std::fs::write(
            dir.path().join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .expect("ext.cnf");
        sh(
            dir.path(),
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=granary-test-pebble-ca 2>/dev/null \
             && openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout key.pem -out req.csr -subj /CN=localhost 2>/dev/null \
             && openssl x509 -req -in req.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cert.pem -days 2 -extfile ext.cnf 2>/dev/null",
        );
        PebblePlan {
            dir,
            port: free_port(),
            management: free_port(),
        }
    }

    /// The ACME directory URL.
    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    /// The root of the directory's own HTTPS certificate (`tls.acme_ca`).
    pub fn tls_root(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Starts pebble: names resolved by `dns`, HTTP-01 checked on
    /// `http_port` and TLS-ALPN-01 on `tls_port` of the address a name
    /// resolves to, certificates valid `validity_secs`.
    pub fn start(
        self,
        dns: SocketAddr,
        http_port: u16,
        tls_port: u16,
        validity_secs: u64,
    ) -> Pebble {
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{}", self.port),
                "managementListenAddress": format!("127.0.0.1:{}", self.management),
                "certificate": self.dir.path().join("cert.pem"),
                "privateKey": self.dir.path().join("key.pem"),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": validity_secs,
            }
        });
        let config_path = self.dir.path().join("pebble.json");
        std::fs::write(&config_path, config.to_string()).expect("pebble.json");
        let log = std::fs::File::create(self.dir.path().join("pebble.log")).expect("pebble.log");
        let child = Command::new("pebble")
            .arg("-config")
            .arg(&config_path)
            .arg("-dnsserver")
            .arg(dns.to_string())
            // No random waits before a check, no nonces refused for practice,
            // every order checked afresh.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("pebble (apt install pebble; ./run-tests does)");
        let mut pebble = Pebble {
            plan: self,
            child: Some(child),
        };
        let port = pebble.plan.port;
        eventually("pebble to listen", DEADLINE, || {
            if let Some(status) = pebble
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("pebble exited ({status}):\n{}", pebble.log());
            }
            TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        });
        pebble
    }
}

impl Default for PebblePlan {
    fn default() -> Self {
        PebblePlan::new()
    }
}

impl Pebble {
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.plan.dir.path().join("pebble.log")).unwrap_or_default()
    }

    /// The root pebble issues certificates under (it makes a new one at
    /// each start), written to a file.
    pub fn issuing_root(&self) -> PathBuf {
        let path = self.plan.dir.path().join("issuing-root.pem");
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--cacert"])
            .arg(self.plan.tls_root())
            .arg(format!(
                "https://127.0.0.1:{}/roots/0",
                self.plan.management
            ))
            .arg("-o")
            .arg(&path)
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "pebble's root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        path
    }

    /// Stops pebble now (the CA is down from here on).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
    }
}
