//! A real etcd cluster on loopback for tests: Debian's `etcd` (3.4), each
//! member on ports the kernel picked, in a temp dir of its own. Plain
//! HTTP: tests stay on loopback (production etcd runs with TLS and client
//! certificates). Dropping it kills the members it started, by pid, and
//! removes their data.

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
    dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts `n` members as one cluster and waits until every one is
    /// healthy. Ports are picked free, then handed to etcd: if another
    /// process took one in between, a member exits at once, and the whole
    /// cluster is started again on new ports (three tries).
    pub fn start(n: usize) -> Etcd {
        let mut why = String::new();
        for _ in 0..3 {
            match Etcd::try_start(n) {
                Ok(etcd) => return etcd,
                Err(e) => why = e,
            }
        }
        panic!("etcd did not start: {why}");
    }

    fn try_start(n: usize) -> Result<Etcd, String> {
        let dir = tempfile::tempdir().expect("a temp dir");
        let lo = Ipv4Addr::LOCALHOST;
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| (free_port_on(lo), free_port_on(lo)))
            .collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}"))
            .collect();
        let initial = initial.join(",");
        let token = format!("granary-test-{}", std::process::id());
        // Members are added as they start, so a failure part-way kills
        // the ones already running (on drop).
        let mut etcd = Etcd {
            members: Vec::new(),
            dir,
        };
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("e{i}");
            let data = etcd.dir.path().join(&name);
            let log = std::fs::File::create(etcd.dir.path().join(format!("{name}.log")))
                .expect("a log file");
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let child = Command::new("etcd")
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

    /// Whether every running member answers healthy.
    pub fn healthy(&self) -> bool {
        let running: Vec<&str> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.client_url.as_str())
            .collect();
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &running.join(","),
                "--dial-timeout",
                "1s",
                "endpoint",
                "health",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
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
