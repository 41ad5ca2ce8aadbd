//! Calendars against Radicale, in one run, on this machine, both over TLS:
//!
//! 1. PUT/s: new events into an empty calendar, with 1 client and with 8
//!    (each its own keep-alive connection).
//! 2. A time-range calendar-query REPORT over 300 events (some weekly):
//!    the median time, and both must return the same hrefs.
//! 3. sync-collection after 10 changes among 5,000 objects: the median
//!    time, and both must name exactly the 10.
//! 4. PROPFIND Depth 1 over 1,000 objects: the median time, same count.
//!
//! Granary is reached through its gateway (HTTP Basic with an argon2id app
//! password, verified once a minute; TLS 1.3), each request forwarded to
//! the user's DAV grain; Radicale 3 (PyPI, in the project's .venv) serves
//! TLS itself, with a plain-text htpasswd file (no hashing cost at all,
//! which favours it) and its default fsync.
//!
//! Full run, against an optimised daemon and grain:
//!   cargo build --release -p granary --bins && apps/dav/build && \
//!     GRANARY_BIN=$PWD/target/release/granary GRANARY_DAV_APP=$PWD/apps/dav/dist/granary-dav \
//!     cargo bench -p granary-e2e --bench dav
//! Smoke (./run-tests), with the debug builds:
//!   GRANARY_BIN=$PWD/target/debug/granary cargo bench -p granary-e2e --bench dav -- --smoke

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use granary_testkit::dav::{DOMAIN, DavHost};
use granary_testkit::{DEADLINE, eventually};

#[path = "support.rs"]
mod support;
use support::{free_port, median, tls_config};

/// One keep-alive HTTP/1.1 connection over TLS.
struct Http {
    tls: BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
    host: String,
    auth: String,
    /// To connect again when the server closes after an answer (Radicale
    /// speaks HTTP/1.0-style, one request per connection).
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    name: rustls_pki_types::ServerName<'static>,
    closed: bool,
}

struct Answer {
    status: u16,
    body: String,
}

impl Http {
    fn connect(
        addr: SocketAddr,
        config: &Arc<rustls::ClientConfig>,
        host: &str,
        user: &str,
        password: &str,
    ) -> Http {
        use base64::Engine;
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_nodelay(true).unwrap();
        let name: rustls_pki_types::ServerName<'static> = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => rustls_pki_types::ServerName::IpAddress(ip.into()),
            Err(_) => rustls_pki_types::ServerName::try_from(host.to_owned()).unwrap(),
        };
        let conn = rustls::ClientConnection::new(config.clone(), name.clone()).unwrap();
        Http {
            tls: BufReader::new(rustls::StreamOwned::new(conn, tcp)),
            host: format!("{host}:{}", addr.port()),
            auth: base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")),
            addr,
            config: config.clone(),
            name,
            closed: false,
        }
    }

    fn reconnect(&mut self) {
        let tcp = TcpStream::connect(self.addr).unwrap();
        tcp.set_nodelay(true).unwrap();
        let conn = rustls::ClientConnection::new(self.config.clone(), self.name.clone()).unwrap();
        self.tls = BufReader::new(rustls::StreamOwned::new(conn, tcp));
        self.closed = false;
    }

    fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Answer {
        if self.closed {
            self.reconnect();
        }
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Basic {}\r\nContent-Length: {}\r\n",
            self.host,
            self.auth,
            body.len()
        );
        for (n, v) in headers {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let stream = self.tls.get_mut();
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body.as_bytes()).unwrap();
        stream.flush().unwrap();
        let mut line = String::new();
        self.tls.read_line(&mut line).unwrap();
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        self.closed = line.starts_with("HTTP/1.0");
        let mut length = None;
        let mut chunked = false;
        loop {
            line.clear();
            self.tls.read_line(&mut line).unwrap();
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (n, v) = l.split_once(':').unwrap();
            match n.to_ascii_lowercase().as_str() {
                "content-length" => length = v.trim().parse::<usize>().ok(),
                "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
                "connection" => self.closed = v.trim().eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.tls.read_line(&mut line).unwrap();
                let n = usize::from_str_radix(line.trim().split(';').next().unwrap(), 16).unwrap();
                let mut chunk = vec![0u8; n + 2];
                self.tls.read_exact(&mut chunk).unwrap();
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = length {
            body.resize(n, 0);
            self.tls.read_exact(&mut body).unwrap();
        } else if self.closed {
            // No length: the body runs to the close.
            let _ = self.tls.read_to_end(&mut body);
        }
        Answer {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }
}

/// A server under test: where it listens, its TLS name, credentials, and
/// the collection prefix of the user's calendars.
struct Side {
    name: &'static str,
    addr: SocketAddr,
    host: String,
    config: Arc<rustls::ClientConfig>,
    user: String,
    password: String,
    home: String,
}

impl Side {
    fn http(&self) -> Http {
        Http::connect(
            self.addr,
            &self.config,
            &self.host,
            &self.user,
            &self.password,
        )
    }

    fn calendar(&self, name: &str) -> String {
        let path = format!("{}{name}/", self.home);
        let a = self.http().request(
            "MKCALENDAR",
            &path,
            &[("Content-Type", "application/xml")],
            "",
        );
        assert!(
            a.status == 201,
            "{}: MKCALENDAR {path}: {} {}",
            self.name,
            a.status,
            a.body
        );
        path
    }
}

fn event(i: usize) -> String {
    let day = 1 + (i * 7) % 360;
    let date = chrono::NaiveDate::from_yo_opt(2024, day as u32).unwrap();
    let rrule = if i.is_multiple_of(50) {
        "RRULE:FREQ=WEEKLY;COUNT=30\r\n"
    } else {
        ""
    };
    format!(
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//bench//EN\r\nBEGIN:VEVENT\r\nUID:bench-{i}\r\n\
         DTSTAMP:20240101T000000Z\r\nDTSTART:{}T{:02}0000Z\r\nDURATION:PT1H\r\n{rrule}\
         SUMMARY:event {i}\r\nDESCRIPTION:some words to make it a realistic size for a calendar entry\r\n\
         END:VEVENT\r\nEND:VCALENDAR\r\n",
        date.format("%Y%m%d"),
        i % 24
    )
}

/// PUTs events `range` into `path` from `clients` connections; PUTs/s.
fn put_rate(side: &Side, path: &str, total: usize, clients: usize, offset: usize) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for c in 0..clients {
            s.spawn(move || {
                let mut h = side.http();
                let mut i = offset + c;
                while i < offset + total {
                    let a = h.request(
                        "PUT",
                        &format!("{path}bench-{i}.ics"),
                        &[("Content-Type", "text/calendar"), ("If-None-Match", "*")],
                        &event(i),
                    );
                    assert!(
                        a.status == 201,
                        "{}: PUT: {} {}",
                        side.name,
                        a.status,
                        a.body
                    );
                    i += clients;
                }
            });
        }
    });
    total as f64 / start.elapsed().as_secs_f64()
}

/// The object names in a multistatus, sorted.
fn names(body: &str) -> Vec<String> {
    let mut out: Vec<String> = body
        .split("href>")
        .filter_map(|s| s.strip_suffix("</D:").or_else(|| s.strip_suffix("</")))
        .filter(|h| h.ends_with(".ics"))
        .map(|h| h.rsplit('/').next().unwrap().to_owned())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Median seconds of `runs` runs of `f`, and its last answer.
fn timed(runs: usize, mut f: impl FnMut() -> Answer) -> (f64, Answer) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        let a = f();
        times.push(t.elapsed().as_secs_f64());
        last = Some(a);
    }
    (median(times), last.unwrap())
}

const QUERY: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<C:calendar-query xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">
  <D:prop><D:getetag/></D:prop>
  <C:filter><C:comp-filter name="VCALENDAR"><C:comp-filter name="VEVENT">
    <C:time-range start="20240301T000000Z" end="20240415T000000Z"/>
  </C:comp-filter></C:comp-filter></C:filter>
</C:calendar-query>"#;

const PROPFIND: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<D:propfind xmlns:D="DAV:"><D:prop><D:getetag/><D:getcontenttype/></D:prop></D:propfind>"#;

fn sync_body(token: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<D:sync-collection xmlns:D=\"DAV:\">\
         <D:sync-token>{token}</D:sync-token><D:sync-level>1</D:sync-level>\
         <D:prop><D:getetag/></D:prop></D:sync-collection>"
    )
}

fn token_of(body: &str) -> String {
    let start = body.find("sync-token>").expect("a sync-token") + "sync-token>".len();
    body[start..].split('<').next().unwrap().to_owned()
}

struct Results {
    put1: f64,
    put8: f64,
    report: f64,
    report_names: Vec<String>,
    sync: f64,
    sync_names: Vec<String>,
    propfind: f64,
    propfind_count: usize,
}

fn measure(side: &Side, smoke: bool) -> Results {
    let (n1, n8, objects, listing, runs) = if smoke {
        (20, 40, 200, 100, 3)
    } else {
        (300, 1000, 5000, 1000, 9)
    };
    let puts = side.calendar("puts");
    let put1 = put_rate(side, &puts, n1, 1, 0);
    let put8 = put_rate(side, &puts, n8, 8, n1);

    let q = side.calendar("query");
    put_rate(side, &q, 300, 8, 0);
    let mut h = side.http();
    let (report, a) = timed(runs, || {
        h.request(
            "REPORT",
            &q,
            &[("Depth", "1"), ("Content-Type", "application/xml")],
            QUERY,
        )
    });
    assert_eq!(a.status, 207, "{}: {}", side.name, a.body);
    let report_names = names(&a.body);

    let s = side.calendar("sync");
    put_rate(side, &s, objects, 8, 0);
    let a = h.request(
        "REPORT",
        &s,
        &[("Content-Type", "application/xml")],
        &sync_body(""),
    );
    assert_eq!(a.status, 207, "{}: {}", side.name, a.body);
    let token = token_of(&a.body);
    for i in 0..10 {
        let n = i * (objects / 10);
        let a = h.request(
            "PUT",
            &format!("{s}bench-{n}.ics"),
            &[("Content-Type", "text/calendar")],
            &event(n).replace("SUMMARY:event", "SUMMARY:changed event"),
        );
        assert!(
            a.status == 204 || a.status == 201,
            "{}: {}",
            side.name,
            a.status
        );
    }
    let (sync, a) = timed(runs, || {
        h.request(
            "REPORT",
            &s,
            &[("Content-Type", "application/xml")],
            &sync_body(&token),
        )
    });
    assert_eq!(a.status, 207, "{}: {}", side.name, a.body);
    let sync_names = names(&a.body);

    let l = side.calendar("listing");
    put_rate(side, &l, listing, 8, 0);
    let (propfind, a) = timed(runs, || {
        h.request(
            "PROPFIND",
            &l,
            &[("Depth", "1"), ("Content-Type", "application/xml")],
            PROPFIND,
        )
    });
    assert_eq!(a.status, 207, "{}: {}", side.name, a.body);
    let propfind_count = names(&a.body).len();
    Results {
        put1,
        put8,
        report,
        report_names,
        sync,
        sync_names,
        propfind,
        propfind_count,
    }
}

/// Radicale with TLS in a directory of its own, stopped (by pid) on drop.
struct Radicale {
    _dir: tempfile::TempDir,
    child: Child,
    port: u16,
    ca: std::path::PathBuf,
}

impl Drop for Radicale {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Radicale {
    fn start() -> Radicale {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        support::openssl_leaf(d);
        let port = free_port();
        std::fs::write(d.join("users"), "alice:secret-password\n").unwrap();
        std::fs::write(
            d.join("config"),
            format!(
                "[server]\nhosts = 127.0.0.1:{port}\nssl = True\ncertificate = {d}/cert.pem\nkey = {d}/key.pem\n\
                 max_connections = 40\n[auth]\ntype = htpasswd\nhtpasswd_filename = {d}/users\n\
                 htpasswd_encryption = plain\n[rights]\ntype = owner_only\n\
                 [storage]\nfilesystem_folder = {d}/collections\n[logging]\nlevel = warning\n",
                d = d.display()
            ),
        )
        .unwrap();
        let python = granary_testkit::mail::python();
        let child = Command::new(&python)
            .args(["-m", "radicale", "--config"])
            .arg(d.join("config"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("radicale (in .venv; ./run-tests installs it)");
        // Up when it answers an unauthenticated OPTIONS over TLS.
        let config = tls_config(&d.join("ca.pem"));
        eventually("Radicale to answer", DEADLINE, || {
            TcpStream::connect(("127.0.0.1", port)).ok()?;
            let mut h = Http::connect(
                SocketAddr::from(([127, 0, 0, 1], port)),
                &config,
                "127.0.0.1",
                "alice",
                "secret-password",
            );
            (h.request("OPTIONS", "/", &[], "").status > 0).then_some(())
        });
        Radicale {
            ca: d.join("ca.pem"),
            _dir: dir,
            child,
            port,
        }
    }
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let granary = DavHost::start(&["alice"], "[grains]\nidle_timeout = \"300s\"\n");
    let radicale = Radicale::start();
    let sides = [
        Side {
            name: "granary",
            addr: granary.daemon.https_addr(),
            host: format!("dav.{DOMAIN}"),
            config: tls_config(&granary.daemon.ca_file()),
            user: "alice".into(),
            password: granary.password("alice").to_owned(),
            home: "/calendars/alice/".into(),
        },
        Side {
            name: "radicale",
            addr: SocketAddr::from(([127, 0, 0, 1], radicale.port)),
            host: "127.0.0.1".into(),
            config: tls_config(&radicale.ca),
            user: "alice".into(),
            password: "secret-password".into(),
            home: "/alice/".into(),
        },
    ];
    let g = measure(&sides[0], smoke);
    let r = measure(&sides[1], smoke);
    assert_eq!(g.report_names, r.report_names, "the REPORTs differ");
    assert_eq!(g.sync_names, r.sync_names, "the sync answers differ");
    assert_eq!(g.sync_names.len(), 10);
    assert_eq!(g.propfind_count, r.propfind_count, "the listings differ");
    println!(
        "dav benchmark{}: {} objects in range, {} listed",
        if smoke { " (smoke)" } else { "" },
        g.report_names.len(),
        g.propfind_count
    );
    println!("| | Granary | Radicale | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| PUT/s, 1 client | {:.0} | {:.0} | {:.2}x |",
        g.put1,
        r.put1,
        g.put1 / r.put1
    );
    println!(
        "| PUT/s, 8 clients | {:.0} | {:.0} | {:.2}x |",
        g.put8,
        r.put8,
        g.put8 / r.put8
    );
    println!(
        "| time-range REPORT, 300 events (ms) | {:.2} | {:.2} | {:.2}x the time |",
        g.report * 1e3,
        r.report * 1e3,
        g.report / r.report
    );
    println!(
        "| sync-collection, 10 changes (ms) | {:.2} | {:.2} | {:.2}x the time |",
        g.sync * 1e3,
        r.sync * 1e3,
        g.sync / r.sync
    );
    println!(
        "| PROPFIND Depth 1 (ms) | {:.2} | {:.2} | {:.2}x the time |",
        g.propfind * 1e3,
        r.propfind * 1e3,
        g.propfind / r.propfind
    );
}
