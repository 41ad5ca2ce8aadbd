//! Calendars and contacts under test: a daemon with the DAV app, users
//! with `dav` app passwords, and the real clients (Python `caldav`,
//! `vdirsyncer`, `curl`, `litmus`) pointed at `dav.<DOMAIN>`, with names
//! resolved per client (a `sitecustomize` on the clients' `PYTHONPATH`,
//! curl's `--resolve`), never through /etc/hosts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Daemon;

/// The domain every DAV test serves.
pub const DOMAIN: &str = "example.test";

/// Resolves `DOMAIN` and its subdomains to loopback inside any Python
/// process that has this directory on its `PYTHONPATH`.
const SITECUSTOMIZE: &str = r#"
import socket
_getaddrinfo = socket.getaddrinfo
def _granary_test_getaddrinfo(host, *args, **kwargs):
    if isinstance(host, bytes):
        host = host.decode()
    if isinstance(host, str) and (host == "example.test" or host.endswith(".example.test")):
        host = "127.0.0.1"
    return _getaddrinfo(host, *args, **kwargs)
socket.getaddrinfo = _granary_test_getaddrinfo
# aiohttp (vdirsyncer) resolves through c-ares when aiodns is installed
# (slixmpp brings it), which never calls getaddrinfo: it is told to use
# the threaded resolver, which does.
try:
    import aiohttp.resolver, aiohttp.connector
    aiohttp.resolver.DefaultResolver = aiohttp.resolver.ThreadedResolver
    aiohttp.connector.DefaultResolver = aiohttp.resolver.ThreadedResolver
except ImportError:
    pass
"#;

pub struct DavHost {
    pub daemon: Daemon,
    pub dir: tempfile::TempDir,
    pub passwords: HashMap<String, String>,
}

impl DavHost {
    /// A daemon serving `DOMAIN` with the DAV app and `users`, each with a
    /// `dav` app password; `extra` is appended to the config.
    pub fn start(users: &[&str], extra: &str) -> DavHost {
        let (daemon, dir, passwords) =
            crate::app_host(DOMAIN, extra, "", crate::dav_package, "dav", users);
        let site = dir.path().join("site");
        std::fs::create_dir_all(&site).unwrap();
        std::fs::write(site.join("sitecustomize.py"), SITECUSTOMIZE).unwrap();
        DavHost {
            daemon,
            dir,
            passwords,
        }
    }

    pub fn password(&self, user: &str) -> &str {
        &self.passwords[user]
    }

    pub fn port(&self) -> u16 {
        self.daemon.https_addr().port()
    }

    /// `https://dav.<DOMAIN>:<port>/`.
    pub fn url(&self) -> String {
        format!("https://dav.{DOMAIN}:{}/", self.port())
    }

    /// The environment a Python client gets: names resolved, the local CA
    /// trusted, and the server, user and password.
    pub fn client_env(&self, user: &str) -> Vec<(&'static str, String)> {
        let ca = self.daemon.ca_file().display().to_string();
        vec![
            (
                "PYTHONPATH",
                self.dir.path().join("site").display().to_string(),
            ),
            ("DAV_URL", self.url()),
            ("DAV_USER", user.to_owned()),
            ("DAV_PASSWORD", self.password(user).to_owned()),
            ("DAV_CA", ca.clone()),
            ("SSL_CERT_FILE", ca.clone()),
            ("REQUESTS_CA_BUNDLE", ca),
        ]
    }

    /// Runs a Python script as `user`'s client with `env` added; (success,
    /// output).
    pub fn python(&self, user: &str, script: &str, env: &[(&str, String)]) -> (bool, String) {
        let mut all = self.client_env(user);
        all.extend(env.iter().cloned());
        crate::mail::run_python(script, &all)
    }

    /// `curl` against the gateway with names resolved to it; (status line
    /// and headers, body).
    pub fn curl(&self, args: &[&str]) -> (String, String) {
        let port = self.port();
        let out = Command::new("curl")
            .args(["-sS", "-D", "-", "--cacert"])
            .arg(self.daemon.ca_file())
            .args([
                "--resolve",
                &format!("{DOMAIN}:{port}:127.0.0.1"),
                "--resolve",
                &format!("dav.{DOMAIN}:{port}:127.0.0.1"),
            ])
            .args(args)
            .output()
            .expect("curl");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.is_empty() {
            text = format!("curl: {}", String::from_utf8_lossy(&out.stderr));
        }
        match text.split_once("\r\n\r\n") {
            Some((h, b)) => (h.to_owned(), b.to_owned()),
            None => (text, String::new()),
        }
    }

    /// Where a test may keep client state.
    pub fn path(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    pub fn site_dir(&self) -> &Path {
        self.dir.path()
    }
}

/// An HTTP CONNECT proxy on loopback that sends every tunnel to `target`
/// whatever name the client asked for: how a client that resolves names
/// itself (litmus) reaches `dav.<DOMAIN>` without /etc/hosts. Stops
/// accepting when dropped.
pub struct ConnectProxy {
    pub addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ConnectProxy {
    pub fn start(target: std::net::SocketAddr) -> ConnectProxy {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(client.try_clone().unwrap());
                    let mut line = String::new();
                    // The CONNECT line and headers, up to the blank line.
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" || line == "\n" {
                            break;
                        }
                    }
                    let Ok(upstream) = std::net::TcpStream::connect(target) else {
                        return;
                    };
                    let mut client_w = client.try_clone().unwrap();
                    if client_w
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .is_err()
                    {
                        return;
                    }
                    let mut up_r = upstream.try_clone().unwrap();
                    let mut up_w = upstream;
                    let t = std::thread::spawn(move || {
                        let _ = std::io::copy(&mut up_r, &mut client_w);
                        let _ = client_w.shutdown(std::net::Shutdown::Write);
                    });
                    let _ = std::io::copy(&mut reader, &mut up_w);
                    let _ = up_w.shutdown(std::net::Shutdown::Write);
                    let _ = t.join();
                });
            }
        });
        ConnectProxy { addr, stop }
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(self.addr);
    }
}
