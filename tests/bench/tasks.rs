//! Taskwarrior 3 sync: Granary against the same server core run alone in
//! process, in one run, on this machine.
//!
//! The peer is what taskchampion-sync-server is: the TaskChampion server
//! core (taskchampion-sync-server-core) and the same SQLite storage and
//! request handling as the tasks grain, served by hyper in this process
//! over plain HTTP on loopback, the client id taken from `X-Client-Id`.
//! Granary is the real daemon: TLS, the client id hashed and looked up,
//! the request forwarded over a pooled connection into the user's jailed
//! tasks grain. Both on CPU 1, the load on CPU 0.
//!
//! 1. get-child-version requests/s with `wrk -t1 -c20` (the child of the
//!    first version: a 200 with its history segment), the median of
//!    alternating rounds. Also the in-process server behind nginx
//!    terminating TLS (one worker, upstream keep-alive): how
//!    taskchampion-sync-server is deployed, since clients need HTTPS.
//! 2. The add-version round trip: each version on top of the last, one
//!    keep-alive connection, the median time.
//!
//! Full run, against an optimised daemon and grain:
//!   cargo build --release -p granary -p granary-jail --bins && apps/tasks/build && \
//!     GRANARY_BIN=$PWD/target/release/granary GRANARY_TASKS_APP=$PWD/apps/tasks/dist/granary-tasks \
//!     cargo bench -p granary-e2e --bench tasks
//! Smoke (./run-tests), with the debug builds:
//!   GRANARY_BIN=$PWD/target/debug/granary cargo bench -p granary-e2e --bench tasks -- --smoke

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use granary_tasks::http::{HISTORY_SEGMENT, Sync};
use granary_tasks::store::{Store, Versions};
use taskchampion_sync_server_core::{Server, ServerConfig};

#[path = "support.rs"]
mod support;
use support::{free_port, have, median, tls_config};

const DOMAIN: &str = "example.test";
const NIL: &str = "00000000-0000-0000-0000-000000000000";

/// The in-process peer: hyper on a current-thread runtime (the core's
/// futures are not `Send`), pinned to CPU 1. Returns its port.
fn in_process(dir: std::path::PathBuf) -> u16 {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut one = nix::sched::CpuSet::new();
        one.set(1).unwrap();
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async move {
            let store = Arc::new(Store::open(&dir).unwrap());
            let sync = Rc::new(Sync {
                server: Server::new(ServerConfig::default(), Versions(store)),
                owner: String::new(),
            });
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap().port()).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let sync = sync.clone();
                tokio::task::spawn_local(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let sync = sync.clone();
                        async move {
                            let client = req
                                .headers()
                                .get("x-client-id")
                                .and_then(|v| v.to_str().ok())
                                .and_then(uuid_of)
                                .unwrap_or_default();
                            Ok::<_, std::convert::Infallible>(sync.answer(req, client).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
    });
    rx.recv().unwrap()
}

fn uuid_of(text: &str) -> Option<uuid::Uuid> {
    uuid::Uuid::parse_str(text).ok()
}

/// One keep-alive HTTP/1.1 connection (plain or TLS).
struct Http<S: Read + Write> {
    stream: BufReader<S>,
    host: String,
    client: String,
}

impl<S: Read + Write> Http<S> {
    /// Sends a request; (status, `X-Version-Id`).
    fn request(&mut self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nX-Client-Id: {}\r\nContent-Type: {HISTORY_SEGMENT}\r\nContent-Length: {}\r\n\r\n",
            self.host,
            self.client,
            body.len()
        );
        let s = self.stream.get_mut();
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        s.flush().unwrap();
        let mut line = String::new();
        self.stream.read_line(&mut line).unwrap();
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let (mut length, mut version) = (0usize, String::new());
        loop {
            line.clear();
            self.stream.read_line(&mut line).unwrap();
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (n, v) = l.split_once(':').unwrap();
            match n.to_ascii_lowercase().as_str() {
                "content-length" => length = v.trim().parse().unwrap(),
                "x-version-id" => version = v.trim().to_owned(),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).unwrap();
        (status, version)
    }

    /// `n` versions, each on top of the last: the median round trip (ms).
    fn add_versions(&mut self, n: usize) -> f64 {
        // The latest version: the first is on NIL, then the chain.
        let (mut parent, mut times) = (self.first_version(), Vec::new());
        let segment = vec![b'x'; 200];
        for _ in 0..n {
            let t = Instant::now();
            let (status, version) = self.request(
                "POST",
                &format!("/v1/client/add-version/{parent}"),
                &segment,
            );
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(status, 200);
            parent = version;
        }
        median(times)
    }

    /// Adds the first version (on NIL) if there is none; the latest one.
    fn first_version(&mut self) -> String {
        let mut parent = NIL.to_owned();
        loop {
            let (status, version) = self.request(
                "GET",
                &format!("/v1/client/get-child-version/{parent}"),
                b"",
            );
            match status {
                200 => parent = version,
                404 if parent == NIL => {
                    let (s, v) =
                        self.request("POST", &format!("/v1/client/add-version/{NIL}"), b"first");
                    assert_eq!(s, 200);
                    return v;
                }
                404 => return parent,
                other => panic!("get-child-version answered {other}"),
            }
        }
    }
}

/// wrk on CPU 0: requests/s.
fn wrk(url: &str, host: &str, client: &str, secs: u32) -> f64 {
    let out = Command::new("taskset")
        .args(["-c", "0", "wrk", "-t1", "-c20", &format!("-d{secs}s"), "-H"])
        .arg(format!("Host: {host}"))
        .arg("-H")
        .arg(format!("X-Client-Id: {client}"))
        .arg(url)
        .output()
        .expect("wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    if let Some(e) = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
    {
        panic!("wrk {url}: {}\n{text}", e.trim());
    }
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("wrk said:\n{text}"))
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    for tool in ["wrk", "taskset", "nginx"] {
        if !have(tool) {
            eprintln!(
                "{tool} is missing (apt install wrk util-linux); skipping the tasks benchmark"
            );
            return;
        }
    }
    // The daemon and the grain it starts on CPU 1 from their start, as the
    // peers; the load on CPU 0.
    granary_testkit::pin_daemons_to(1);
    let (daemon, dir, _) = granary_testkit::app_host(
        DOMAIN,
        "[grains]\nidle_timeout = \"1h\"\n[gateway]\nupstream_idle = \"1h\"\n",
        "",
        granary_testkit::tasks_package,
        "tasks",
        &["alice"],
    );
    let out = daemon
        .granary(&["tasks", "client", "add", "alice"])
        .success()
        .stdout;
    let client = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("task config sync.server.client_id "))
        .unwrap()
        .trim()
        .to_owned();
    let peer_dir = dir.path().join("peer");
    let peer_port = in_process(peer_dir);
    let https = daemon.https_addr();
    let host = format!("tasks.{DOMAIN}");

    let config = tls_config(&daemon.ca_file());
    let name = rustls_pki_types::ServerName::try_from(host.clone()).unwrap();
    let tls = || {
        let tcp = TcpStream::connect(https).unwrap();
        tcp.set_nodelay(true).unwrap();
        let conn = rustls::ClientConnection::new(config.clone(), name.clone()).unwrap();
        Http {
            stream: BufReader::new(rustls::StreamOwned::new(conn, tcp)),
            host: host.clone(),
            client: client.clone(),
        }
    };
    let plain = || {
        let tcp = TcpStream::connect(("127.0.0.1", peer_port)).unwrap();
        tcp.set_nodelay(true).unwrap();
        Http {
            stream: BufReader::new(tcp),
            host: format!("127.0.0.1:{peer_port}"),
            client: client.clone(),
        }
    };
    // The in-process server behind nginx (TLS with the same certificate).
    let t = dir.path();
    let nginx_port = free_port();
    let conf = t.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            r#"user root;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/nginx-body;
    proxy_temp_path {dir}/nginx-proxy;
    fastcgi_temp_path {dir}/nginx-fastcgi;
    uwsgi_temp_path {dir}/nginx-uwsgi;
    scgi_temp_path {dir}/nginx-scgi;
    upstream tasks {{ server 127.0.0.1:{peer_port}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{nginx_port} ssl;
        server_name _;
        ssl_certificate {tls}/server.pem;
        ssl_certificate_key {tls}/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://tasks;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#,
            dir = t.display(),
            tls = daemon.data_dir().join("tls").display(),
        ),
    )
    .unwrap();
    let mut nginx = Command::new("taskset")
        .args(["-c", "1", "nginx", "-c"])
        .arg(&conf)
        .args(["-g", "daemon off;"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    granary_testkit::eventually("nginx", granary_testkit::DEADLINE, || {
        TcpStream::connect(("127.0.0.1", nginx_port)).ok()
    });

    // Both have a first version (the one wrk asks the child of NIL for).
    let (mut granary, mut peer) = (tls(), plain());
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| granary.first_version())).is_err() {
        panic!("Granary failed; its log:\n{}", daemon.log());
    }
    peer.first_version();

    let (rounds, secs, adds) = if smoke { (1, 1, 20) } else { (5, 5, 500) };
    let path = std::env::var("TASKS_BENCH_PATH")
        .unwrap_or_else(|_| format!("/v1/client/get-child-version/{NIL}"));
    let (mut ours, mut theirs, mut fronted) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        fronted.push(wrk(
            &format!("https://127.0.0.1:{nginx_port}{path}"),
            &host,
            &client,
            secs,
        ));
        ours.push(wrk(
            &format!("https://127.0.0.1:{}{path}", https.port()),
            &host,
            &client,
            secs,
        ));
        theirs.push(wrk(
            &format!("http://127.0.0.1:{peer_port}{path}"),
            &format!("127.0.0.1:{peer_port}"),
            &client,
            secs,
        ));
    }
    let (ours, theirs, fronted) = (median(ours), median(theirs), median(fronted));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(nginx.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = nginx.wait();
    // Fresh connections (the gateway closes idle ones).
    let (add_ours, add_theirs) = (tls().add_versions(adds), plain().add_versions(adds));

    println!(
        "Taskwarrior 3 sync, Granary (TLS, gateway, jailed grain) against the server core in process (plain HTTP):"
    );
    println!(
        "  get-child-version, wrk -c20, median of {rounds} x {secs} s: Granary {ours:.0} req/s, in-process {theirs:.0} req/s, ratio {:.2}x",
        ours / theirs
    );
    println!(
        "  the same behind nginx (TLS), as it is deployed: {fronted:.0} req/s, Granary's ratio {:.2}x",
        ours / fronted
    );
    println!(
        "  add-version round trip, median of {adds}: Granary {add_ours:.2} ms, in-process {add_theirs:.2} ms, ratio {:.2}x (lower is better)",
        add_ours / add_theirs
    );
}
