//! A real etcd cluster on loopback for tests: Debian's `etcd` (3.4), each
//! member on ports the kernel picked, in a temp dir of its own. Plain
//! HTTP by default (tests stay on loopback); [`Etcd::start_tls`] serves
//! clients over TLS and asks them for a certificate, as production etcd
//! does (members still talk to each other over loopback HTTP). Dropping it
//! kills the members it started, by pid, and removes their data.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::prosody::free_port_on;

pub struct Member {
    pub name: String,
    pub client_url: String,
    child: Option<Child>,
}

pub struct Etcd {
    pub members: Vec<Member>,
    /// For a TLS etcd: its CA and a client certificate it accepts.
    pub tls: Option<TlsFiles>,
    dir: tempfile::TempDir,
}

/// PEM files of a TLS etcd ([`Etcd::start_tls`]), in its temp dir.
pub struct TlsFiles {
    /// The CA that signed the members' and the client's certificates.
    pub ca: std::path::PathBuf,
    pub client_cert: std::path::PathBuf,
    pub client_key: std::path::PathBuf,
    server_cert: std::path::PathBuf,
    server_key: std::path::PathBuf,
}

/// Makes a CA, a server certificate for 127.0.0.1 and a client
/// certificate in `dir`.
fn make_tls(dir: &std::path::Path) -> TlsFiles {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "granary test etcd CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issue = |name: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.subject_alt_names
            .push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server, server_key) = issue("etcd", ExtendedKeyUsagePurpose::ServerAuth);
    let (client, client_key) = issue("n1", ExtendedKeyUsagePurpose::ClientAuth);
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
    };
    for (path, text) in [
        (&files.ca, ca_cert.pem()),
        (&files.client_cert, client),
        (&files.client_key, client_key),
        (&files.server_cert, server),
        (&files.server_key, server_key),
    ] {
        std::fs::write(path, text).unwrap();
    }
    files
}

impl Etcd {
    /// Starts `n` members as one cluster and waits until every one is
    /// healthy. Ports are picked free, then handed to etcd: if another
    /// process took one in between, a member exits at once, and the whole
    /// cluster is started again on new ports (three tries).
    pub fn start(n: usize) -> Etcd {
        Etcd::start_with(n, false, Ipv4Addr::LOCALHOST)
    }

    /// Like [`Etcd::start`], listening on `ip` (the bridge of a test's
    /// network namespaces, where their nodes reach it).
    pub fn start_on(n: usize, ip: Ipv4Addr) -> Etcd {
        Etcd::start_with(n, false, ip)
    }

    /// Like [`Etcd::start`], with clients served over TLS only and asked
    /// for a certificate from the CA in [`Etcd::tls`].
    pub fn start_tls(n: usize) -> Etcd {
        Etcd::start_with(n, true, Ipv4Addr::LOCALHOST)
    }

    fn start_with(n: usize, tls: bool, ip: Ipv4Addr) -> Etcd {
        let mut why = String::new();
        for _ in 0..3 {
            match Etcd::try_start(n, tls, ip) {
                Ok(etcd) => return etcd,
                Err(e) => why = e,
            }
        }
        panic!("etcd did not start: {why}");
    }

    fn try_start(n: usize, tls: bool, ip: Ipv4Addr) -> Result<Etcd, String> {
        let dir = tempfile::tempdir().expect("a temp dir");
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| (free_port_on(ip), free_port_on(ip)))
            .collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("e{i}=http://{ip}:{peer}"))
            .collect();
        let initial = initial.join(",");
        let token = format!("granary-test-{}", std::process::id());
        // Members are added as they start, so a failure part-way kills
        // the ones already running (on drop).
        let tls = tls.then(|| make_tls(dir.path()));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut etcd = Etcd {
            members: Vec::new(),
            tls,
            dir,
        };
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("e{i}");
            let data = etcd.dir.path().join(&name);
            let log = std::fs::File::create(etcd.dir.path().join(format!("{name}.log")))
                .expect("a log file");
            let client_url = format!("{scheme}://{ip}:{client}");
            let peer_url = format!("http://{ip}:{peer}");
            let mut command = Command::new("etcd");
            if let Some(t) = &etcd.tls {
                command
                    .arg("--cert-file")
                    .arg(&t.server_cert)
                    .arg("--key-file")
                    .arg(&t.server_key)
                    .arg("--trusted-ca-file")
                    .arg(&t.ca)
                    .arg("--client-cert-auth");
            }
            let child = command
                .args(["--name", &name])
                .arg("--data-dir")
                .arg(&data)
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-token", &token])
                .args(["--initial-cluster-state", "new"])
                // Quick elections, and a small backend quota: tests.
                .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
                .args(["--quota-backend-bytes", "268435456"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("etcd starts (Debian's etcd-server; ./run-tests installs it)");
            etcd.members.push(Member {
                name,
                client_url,
                child: Some(child),
            });
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            for (i, m) in etcd.members.iter_mut().enumerate() {
                if let Some(status) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    m.child = None;
                    return Err(format!("member e{i} exited ({status}):\n{}", etcd.log(i)));
                }
            }
            if etcd.healthy() {
                return Ok(etcd);
            }
            if std::time::Instant::now() > deadline {
                let logs: Vec<String> = (0..n).map(|i| format!("e{i}:\n{}", etcd.log(i))).collect();
                return Err(format!("not healthy after 30 s:\n{}", logs.join("\n")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The client URLs of every member, running or not.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// `etcdctl` for the running members, with the client certificate
    /// when etcd speaks TLS.
    fn etcdctl(&self) -> Command {
        let running: Vec<&str> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.client_url.as_str())
            .collect();
        let mut command = Command::new("etcdctl");
        if let Some(t) = &self.tls {
            command
                .arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.client_cert)
                .arg("--key")
                .arg(&t.client_key);
        }
        command.env("ETCDCTL_API", "3").args([
            "--endpoints",
            &running.join(","),
            "--dial-timeout",
            "1s",
        ]);
        command
    }

    /// Whether every running member answers healthy.
    pub fn healthy(&self) -> bool {
        self.etcdctl()
            .args(["endpoint", "health"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Which running member leads the cluster now, as they say.
    pub fn leader(&self) -> Option<usize> {
        let out = self
            .etcdctl()
            .args(["endpoint", "status", "-w", "json"])
            .output()
            .ok()?;
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let leader = list.as_array()?.iter().find(|e| {
            let s = &e["Status"];
            s["leader"].as_u64().is_some() && s["leader"] == s["header"]["member_id"]
        })?;
        let url = leader["Endpoint"].as_str()?;
        self.members.iter().position(|m| m.client_url == url)
    }

    /// Kills member `i` hard (SIGKILL), as a dead box would go.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The log of member `i`, for failure messages.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("e{i}.log"))).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
