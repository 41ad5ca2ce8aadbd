//! The example Granary app (see README.md beside this file).

use std::cell::RefCell;
use std::io::Write;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Instant;

use granary_sdk::services_capnp::{notify, ping, xmpp_router};
use granary_sdk::{Accepted, App, AuthMethod, GrainRef, Host, LogLevel, WakeLock};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const NOTIFICATIONS: &str = "/var/notifications";
/// `put N` appends "N\n" here and syncs it before it answers.
const ACKED: &str = "/var/acked.log";

fn put(n: &str) -> std::io::Result<()> {
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return Err(std::io::Error::other("put takes a number"));
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ACKED)?;
    f.write_all(format!("{n}\n").as_bytes())?;
    f.sync_all()
}
const TOKENS: &str = "/var/tokens";
/// The ledger: `writer` appends "N\n" lines to LEDGER and then replaces
/// COUNT with N, as fast as it can. Whatever instant a snapshot catches,
/// the lines are whole and numbered 1..=k and COUNT is k-1 or k.
const LEDGER: &str = "/var/ledger.log";
const COUNT: &str = "/var/ledger.count";

struct Hello {
    host: Host,
    held: RefCell<Option<capnp::capability::Client>>,
    wake: RefCell<Option<WakeLock>>,
    /// The last stanza the host delivered (installed as kind `xmpp`, this
    /// grain stands in for a chat grain in the router's tests).
    last_stanza: Rc<RefCell<Option<String>>>,
}

/// `xmpp.deliver`: records what the host hands over.
struct StanzaRecorder {
    last: Rc<RefCell<Option<String>>>,
}

impl xmpp_router::Server for StanzaRecorder {
    async fn route(
        self: capnp::capability::Rc<Self>,
        params: xmpp_router::RouteParams,
        _: xmpp_router::RouteResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        *self.last.borrow_mut() = Some(format!(
            "from={} to={} stanza={}",
            p.get_from()?.to_str()?,
            p.get_to()?.to_str()?,
            p.get_stanza()?.to_str()?
        ));
        Ok(())
    }
}

/// The `Notify` object this grain offers: appends each change durably.
struct Notifications {
    subject: Option<String>,
}

impl notify::Server for Notifications {
    async fn changed(
        self: capnp::capability::Rc<Self>,
        params: notify::ChangedParams,
        _: notify::ChangedResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let subject = p.get_subject()?.to_str()?;
        let revision = p.get_revision()?.to_str()?;
        if let Some(only) = &self.subject
            && only != subject
        {
            return Err(capnp::Error::failed(format!(
                "this capability is for {only}, not {subject}"
            )));
        }
        let line = format!("{subject} {revision}\n");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(NOTIFICATIONS)?;
            f.write_all(line.as_bytes())?;
            f.sync_data()
        };
        write().map_err(|e| capnp::Error::failed(format!("{NOTIFICATIONS}: {e}")))
    }
}

/// The `Ping` object this grain offers.
struct Pong;

impl ping::Server for Pong {
    async fn ping(
        self: capnp::capability::Rc<Self>,
        _: ping::PingParams,
        _: ping::PingResults,
    ) -> Result<(), capnp::Error> {
        Ok(())
    }
}

fn count_notifications() -> usize {
    std::fs::read_to_string(NOTIFICATIONS).map_or(0, |s| s.lines().count())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

async fn call_changed(
    cap: &capnp::capability::Client,
    subject: &str,
    revision: &str,
) -> Result<(), capnp::Error> {
    let notify: notify::Client = capnp::capability::FromClientHook::new(cap.hook.add_ref());
    let mut req = notify.changed_request();
    req.get().set_subject(subject);
    req.get().set_revision(revision);
    req.send().promise.await.map(drop)
}

/// How the grain was told a client authenticated, as `whoami` prints it.
fn method_name(m: AuthMethod) -> &'static str {
    match m {
        AuthMethod::Anonymous => "anonymous",
        AuthMethod::Password => "password",
        AuthMethod::AppPassword => "app-password",
        AuthMethod::SshKey => "ssh-key",
        AuthMethod::ClientSecret => "client-secret",
        AuthMethod::Admin => "admin",
    }
}

/// Who a connection is for, as `Grain.accept` said.
struct Who {
    user: String,
    method: AuthMethod,
    credential_id: i64,
    protocol: String,
}

impl Who {
    fn of(conn: &Accepted) -> Who {
        Who {
            user: conn.user.clone(),
            method: conn.method,
            credential_id: conn.credential_id,
            protocol: conn.protocol.clone(),
        }
    }
}

impl Hello {
    async fn command(&self, who: &Who, line: &str) -> String {
        let conn_user = &who.user;
        let words: Vec<&str> = line.split_whitespace().collect();
        let err = |e: capnp::Error| format!("error: {}", granary_sdk::message(&e));
        match words.as_slice() {
            ["ping"] => "pong".to_owned(),
            ["whoami"] => match self.host.info().await {
                Ok(i) => format!(
                    "user={conn_user} method={} grain={} owner={} kind={}",
                    method_name(who.method),
                    i.id,
                    i.owner,
                    i.kind
                ),
                Err(e) => err(e),
            },
            ["notifications"] => count_notifications().to_string(),
            // A write acknowledged only once it is durable: the move and
            // failover tests check that nothing acknowledged is lost.
            ["put", n] => match put(n) {
                Ok(()) => format!("stored {n}"),
                Err(e) => format!("error: {e}"),
            },
            ["acked"] => std::fs::read_to_string(ACKED)
                .map(|t| t.split_whitespace().collect::<Vec<_>>().join(","))
                .unwrap_or_default(),
            // Sends a stanza through the host's chat router, claiming
            // whatever `from` it likes.
            ["xmpp-route", from, to, stanza @ ..] => {
                match self.host.request_as::<xmpp_router::Client>("xmpp.route").await {
                    Ok(router) => {
                        let mut req = router.route_request();
                        req.get().set_from(*from);
                        req.get().set_to(*to);
                        req.get().set_stanza(stanza.join(" "));
                        match req.send().promise.await {
                            Ok(_) => "ok".to_owned(),
                            Err(e) => err(e),
                        }
                    }
                    Err(e) => err(e),
                }
            }
            ["xmpp-last"] => self
                .last_stanza
                .borrow()
                .clone()
                .unwrap_or_else(|| "none".to_owned()),
            ["notify", descriptor, subject, revision] => {
                match self.host.request(descriptor).await {
                    Ok(cap) => match call_changed(&cap, subject, revision).await {
                        Ok(()) => "ok".to_owned(),
                        Err(e) => err(e),
                    },
                    Err(e) => err(e),
                }
            }
            ["hold", descriptor] => match self.host.request(descriptor).await {
                Ok(cap) => {
                    *self.held.borrow_mut() = Some(cap);
                    "ok".to_owned()
                }
                Err(e) => err(e),
            },
            ["call", subject, revision] => {
                let cap = self.held.borrow().clone();
                match cap {
                    Some(cap) => match call_changed(&cap, subject, revision).await {
                        Ok(()) => "ok".to_owned(),
                        Err(e) => err(e),
                    },
                    None => "error: nothing held".to_owned(),
                }
            }
            ["save", label] => {
                let cap = self.held.borrow().clone();
                let Some(cap) = cap else {
                    return "error: nothing held".to_owned();
                };
                match self.host.save(&cap, label).await {
                    Ok(token) => {
                        let line = format!("{label} {}\n", hex(&token));
                        let saved = std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(TOKENS)
                            .and_then(|mut f| {
                                f.write_all(line.as_bytes())?;
                                f.sync_data()
                            });
                        match saved {
                            Ok(()) => hex(&token),
                            Err(e) => format!("error: {TOKENS}: {e}"),
                        }
                    }
                    Err(e) => err(e),
                }
            }
            ["restore", label] => {
                let tokens = std::fs::read_to_string(TOKENS).unwrap_or_default();
                let Some(token) = tokens
                    .lines()
                    .rev()
                    .find_map(|l| l.strip_prefix(&format!("{label} ")))
                    .and_then(unhex)
                else {
                    return format!("error: no token saved as {label}");
                };
                match self.host.restore(&token).await {
                    Ok(cap) => {
                        *self.held.borrow_mut() = Some(cap);
                        "ok".to_owned()
                    }
                    Err(e) => err(e),
                }
            }
            ["bench", n] => {
                let Ok(n) = n.parse::<u32>() else {
                    return "error: bench N".to_owned();
                };
                let cap = self.held.borrow().clone();
                let Some(cap) = cap else {
                    return "error: nothing held".to_owned();
                };
                let pinger: ping::Client =
                    capnp::capability::FromClientHook::new(cap.hook.add_ref());
                let mut times = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let start = Instant::now();
                    if let Err(e) = pinger.ping_request().send().promise.await {
                        return err(e);
                    }
                    times.push(start.elapsed().as_nanos() as u64);
                }
                times.sort_unstable();
                let pct = |p: usize| times[(times.len() - 1) * p / 100] as f64 / 1000.0;
                format!("p50_us={:.1} p99_us={:.1}", pct(50), pct(99))
            }
            ["benchhost", n] => {
                let Ok(n) = n.parse::<u32>() else {
                    return "error: benchhost N".to_owned();
                };
                let mut times = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let start = Instant::now();
                    if let Err(e) = self.host.info().await {
                        return err(e);
                    }
                    times.push(start.elapsed().as_nanos() as u64);
                }
                times.sort_unstable();
                let pct = |p: usize| times[(times.len() - 1) * p / 100] as f64 / 1000.0;
                format!("p50_us={:.1} p99_us={:.1}", pct(50), pct(99))
            }
            ["writer"] => {
                granary_sdk::spawn_local(async {
                    let mut n: u64 = std::fs::read_to_string(COUNT)
                        .ok()
                        .and_then(|c| c.trim().parse().ok())
                        .unwrap_or(0);
                    loop {
                        n += 1;
                        let step = std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(LEDGER)
                            .and_then(|mut f| f.write_all(format!("{n}\n").as_bytes()))
                            .and_then(|()| std::fs::write(format!("{COUNT}.tmp"), n.to_string()))
                            .and_then(|()| std::fs::rename(format!("{COUNT}.tmp"), COUNT));
                        if step.is_err() {
                            return;
                        }
                        // Busy, but leaving the CPU to others now and then.
                        if n.is_multiple_of(16) {
                            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                        } else {
                            tokio::task::yield_now().await;
                        }
                    }
                });
                "ok".to_owned()
            }
            ["ledger"] => {
                let log = std::fs::read_to_string(LEDGER).unwrap_or_default();
                let count: u64 = std::fs::read_to_string(COUNT)
                    .ok()
                    .and_then(|c| c.trim().parse().ok())
                    .unwrap_or(0);
                if !log.is_empty() && !log.ends_with('\n') {
                    return "broken: a torn line".to_owned();
                }
                let mut k = 0u64;
                for line in log.lines() {
                    k += 1;
                    if line.parse::<u64>() != Ok(k) {
                        return format!("broken: line {k} is {line:?}");
                    }
                }
                if count == k || count + 1 == k {
                    format!("ok lines={k} count={count}")
                } else {
                    format!("broken: {k} lines but count {count}")
                }
            }
            ["ls", path] => match std::fs::read_dir(path) {
                Ok(entries) => {
                    let mut names: Vec<String> = entries
                        .filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect();
                    names.sort();
                    names.join(" ")
                }
                Err(e) => format!("error: {path}: {e}"),
            },
            ["awake", reason @ ..] => match self.host.stay_awake(&reason.join(" ")).await {
                Ok(lock) => {
                    *self.wake.borrow_mut() = Some(lock);
                    "ok".to_owned()
                }
                Err(e) => err(e),
            },
            ["sleep"] => {
                self.wake.borrow_mut().take();
                "ok".to_owned()
            }
            ["flood", n] => {
                let Ok(n) = n.parse::<usize>() else {
                    return "error: flood N".to_owned();
                };
                // Each `request` makes the host look the grant up in its
                // database, so the calls pile up in flight.
                let calls = (0..n).map(|i| {
                    let host = self.host.clone();
                    async move { host.request(&format!("notify:flood{i}")).await.map(drop) }
                });
                let results = futures_join_all(calls).await;
                // By kind, never by message: the host answers the in-flight
                // bound with `overloaded`, a missing grant with `failed`.
                let refused = results
                    .iter()
                    .filter(|r| matches!(r, Err(e) if e.kind == capnp::ErrorKind::Overloaded))
                    .count();
                let denied = results
                    .iter()
                    .filter(|r| matches!(r, Err(e) if e.kind == capnp::ErrorKind::Failed))
                    .count();
                format!("refused={refused} denied={denied} other={}", n - refused - denied)
            }
            ["biglog", kib] => {
                let Ok(kib) = kib.parse::<usize>() else {
                    return "error: biglog KIB".to_owned();
                };
                match self.host.log(LogLevel::Info, &"x".repeat(kib * 1024)).await {
                    Ok(()) => "ok".to_owned(),
                    Err(e) => err(e),
                }
            }
            ["crash"] => std::process::exit(3),
            ["hog", mib] => {
                // Touches `mib` MiB, a page at a time: past the grain's
                // memory limit the kernel kills this process.
                let Ok(mib) = mib.parse::<usize>() else {
                    return "error: hog MIB".to_owned();
                };
                let mut held: Vec<Vec<u8>> = Vec::new();
                for _ in 0..mib {
                    held.push(vec![1u8; 1 << 20]);
                }
                format!("held {} MiB", held.len())
            }
            ["help"] => "commands: ping whoami ls notifications notify hold call save restore bench benchhost awake sleep flood biglog writer ledger crash hog".to_owned(),
            _ => format!("error: unknown command {line:?} (try help)"),
        }
    }
}

/// Awaits every future, in order (the SDK keeps dependencies small, so no
/// `futures` crate here).
async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + 'static,
    F::Output: 'static,
{
    let handles: Vec<_> = futs.map(granary_sdk::spawn_local).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

/// `http`: what `hello.<domain>` serves through the gateway. `GET
/// /whoami` answers who the connection is for (as `Grain.accept` said)
/// and who the request says it is for (the gateway's headers); any other
/// path answers a greeting.
async fn http(who: Rc<Who>, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<String> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let body = if req.uri().path() == "/whoami" {
        format!(
            "user={} method={} credential={} protocol={} request-user={} request-auth={} request-peer={}\n",
            who.user,
            method_name(who.method),
            who.credential_id,
            who.protocol,
            header("x-granary-user"),
            header("x-granary-auth"),
            header("x-granary-peer"),
        )
    } else {
        format!("Hello, {}! This is your own hello grain.\n", who.user)
    };
    let mut r = hyper::Response::new(body);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

impl App for Hello {
    async fn accept(self: Rc<Self>, conn: Accepted) {
        let who = Rc::new(Who::of(&conn));
        if conn.service == "http" {
            let service = hyper::service::service_fn(move |req| {
                let who = who.clone();
                async move { Ok::<_, std::convert::Infallible>(http(who, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(conn.stream), service)
                .await
            {
                granary_sdk::log::warn(&format!("http connection ended: {e}"));
            }
            return;
        }
        let (read, mut write) = conn.stream.into_split();
        let mut lines = BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let answer = self.command(&who, line.trim()).await;
            if write
                .write_all(format!("{answer}\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    }

    fn offer(
        &self,
        descriptor: &str,
        requester: GrainRef,
    ) -> Result<capnp::capability::Client, capnp::Error> {
        let (interface, subject) = match descriptor.split_once(':') {
            Some((i, s)) => (i, Some(s.to_owned())),
            None => (descriptor, None),
        };
        match interface {
            "notify" => {
                let client: notify::Client = granary_sdk::new_client(Notifications { subject });
                Ok(client.client)
            }
            "ping" => {
                let client: ping::Client = granary_sdk::new_client(Pong);
                Ok(client.client)
            }
            // The host's alone, as a chat grain offers it.
            "xmpp.deliver" if requester.id.is_empty() => {
                let client: xmpp_router::Client = granary_sdk::new_client(StanzaRecorder {
                    last: self.last_stanza.clone(),
                });
                Ok(client.client)
            }
            _ => Err(capnp::Error::failed(format!(
                "{descriptor} is not offered here (asked by {})",
                requester.id
            ))),
        }
    }
}

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--migrate") {
        // The migration hook: record what it migrated, durably.
        let from = std::env::var("GRANARY_PREVIOUS_VERSION").unwrap_or_default();
        let to = std::env::var("GRANARY_APP_VERSION").unwrap_or_default();
        let line = format!("from={from} to={to}\n");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open("/var/migrations")
            .and_then(|mut f| {
                f.write_all(line.as_bytes())?;
                f.sync_all()
            });
        return match written {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hello: migration failed: {e}");
                ExitCode::from(1)
            }
        };
    }
    if std::env::args().any(|a| a == "--crash-at-start") {
        eprintln!("hello: crashing at start, as asked");
        return ExitCode::from(3);
    }
    granary_sdk::run(|host| Hello {
        host,
        held: RefCell::new(None),
        wake: RefCell::new(None),
        last_stanza: Rc::default(),
    })
}
