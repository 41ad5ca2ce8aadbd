//! Git hosting in a grain. The gateway authenticates the client, routes
//! `git.<domain>/<owner>/<repo>.git/...` here and forwards each request
//! over HTTP/1.1 with the user in `x-granary-user`. Each request runs
//! Debian's `git http-backend` as a CGI inside the jail: repositories live
//! in `/var/repos/<repo>.git` (the grain's dataset) and one is created on
//! its first push. Hooks run here too, in the sandbox.
//!
//! It offers `git.read:<repo>` (services.capnp `GitRepoRead`: resolve a
//! ref, export a commit's files) to grains the owner granted it to, and
//! after every push to a repository it tells `notify:<repo>` if the owner
//! granted this grain that route (a blog that rebuilds, say).

use std::process::{ExitCode, Stdio};
use std::rc::Rc;

use futures::TryStreamExt;
use granary_sdk::services_capnp::{git_repo_read, notify};
use granary_sdk::{Accepted, App, AuthMethod, GrainRef, Host};
use granary_wire::http::valid_repo;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const REPOS: &str = "/var/repos";
const BACKEND: &str = "/usr/lib/git-core/git-http-backend";
const GIT: &str = "/usr/bin/git";

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

struct Git {
    host: Host,
}

/// A ref as `git rev-parse` may take it: no options, no revision syntax
/// beyond `^{commit}` that we add.
fn valid_ref(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 200
        && !r.starts_with('-')
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b))
        && !r.contains("..")
}

fn git_command(dir: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(GIT);
    cmd.arg("-C")
        .arg(dir)
        .env_clear()
        .env("HOME", "/tmp")
        .env("PATH", "/usr/bin:/bin")
        .env("GIT_CONFIG_COUNT", "1")
        .env("GIT_CONFIG_KEY_0", "safe.directory")
        .env("GIT_CONFIG_VALUE_0", "*");
    cmd
}

async fn git_out(dir: &str, args: &[&str]) -> Result<Vec<u8>, capnp::Error> {
    let out = git_command(dir)
        .args(args)
        .output()
        .await
        .map_err(|e| capnp::Error::failed(format!("git: {e}")))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(capnp::Error::failed(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// `git.read:<repo>`: one repository, read-only.
struct RepoRead {
    dir: String,
}

impl git_repo_read::Server for RepoRead {
    async fn resolve(
        self: capnp::capability::Rc<Self>,
        params: git_repo_read::ResolveParams,
        mut results: git_repo_read::ResolveResults,
    ) -> Result<(), capnp::Error> {
        let r = params.get()?.get_ref()?.to_str()?.to_owned();
        if !valid_ref(&r) {
            return Err(capnp::Error::failed(format!("{r:?} is not a ref")));
        }
        let out = git_out(
            &self.dir,
            &[
                "rev-parse",
                "--verify",
                "--quiet",
                &format!("{r}^{{commit}}"),
            ],
        )
        .await?;
        results
            .get()
            .set_commit(String::from_utf8_lossy(&out).trim());
        Ok(())
    }

    async fn export(
        self: capnp::capability::Rc<Self>,
        params: git_repo_read::ExportParams,
        _: git_repo_read::ExportResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let commit = p.get_commit()?.to_str()?.to_owned();
        let sink = p.get_sink()?;
        if commit.len() != 40 || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(capnp::Error::failed(
                "export takes a full commit id".to_owned(),
            ));
        }
        let listing = git_out(&self.dir, &["ls-tree", "-r", "-z", "--full-tree", &commit]).await?;
        let mut files = Vec::new();
        for entry in listing.split(|b| *b == 0).filter(|e| !e.is_empty()) {
            let entry = String::from_utf8_lossy(entry);
            let Some((meta, path)) = entry.split_once('\t') else {
                continue;
            };
            let mut parts = meta.split(' ');
            let (Some(mode), Some("blob"), Some(sha)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            // Regular files only: symlinks and submodules are not a site's.
            let mode = match mode {
                "100644" => 0o644,
                "100755" => 0o755,
                _ => continue,
            };
            files.push((path.to_owned(), mode, sha.to_owned()));
        }
        // One `cat-file --batch` for every blob, in tree order.
        let mut child = git_command(&self.dir)
            .args(["cat-file", "--batch"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| capnp::Error::failed(format!("git: {e}")))?;
        let mut stdin = child.stdin.take().expect("piped");
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        let io = |e: std::io::Error| capnp::Error::failed(e.to_string());
        for (path, mode, sha) in files {
            stdin
                .write_all(format!("{sha}\n").as_bytes())
                .await
                .map_err(io)?;
            let mut header = String::new();
            out.read_line(&mut header).await.map_err(io)?;
            let size: usize = header
                .split_whitespace()
                .nth(2)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| capnp::Error::failed(format!("git cat-file: {header:?}")))?;
            let mut data = vec![0u8; size + 1];
            tokio::io::AsyncReadExt::read_exact(&mut out, &mut data)
                .await
                .map_err(io)?;
            data.truncate(size);
            let mut req = sink.file_request();
            req.get().set_path(&path);
            req.get().set_mode(mode);
            req.get().set_data(&data);
            req.send().promise.await?;
        }
        drop(stdin);
        let mut done = sink.done_request();
        done.get().set_commit(&commit);
        done.send().promise.await?;
        Ok(())
    }
}

/// Tells `notify:<repo>` that the repository changed, if the owner granted
/// this grain that route; otherwise nothing.
async fn notify_push(host: Host, repo: String) {
    let dir = format!("{REPOS}/{repo}.git");
    let head = match git_out(&dir, &["rev-parse", "--verify", "--quiet", "HEAD^{commit}"]).await {
        Ok(h) => String::from_utf8_lossy(&h).trim().to_owned(),
        Err(_) => return,
    };
    match host
        .request_as::<notify::Client>(&format!("notify:{repo}"))
        .await
    {
        Ok(client) => {
            let mut req = client.changed_request();
            req.get().set_subject(&repo);
            req.get().set_revision(&head);
            if let Err(e) = req.send().promise.await {
                granary_sdk::log::warn(&format!("notify:{repo}: {e}"));
            }
        }
        // No grant: nobody asked to be told.
        Err(e) => granary_sdk::log::info(&format!("no notify:{repo} route ({})", e.extra)),
    }
}

fn text(status: StatusCode, message: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{message}\n")))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r
}

/// `/<owner>/<repo>.git/<rest>` as (repo, rest); the gateway checked the
/// names, and this checks again.
fn split_path(path: &str) -> Option<(String, String)> {
    let mut parts = path.trim_start_matches('/').splitn(3, '/');
    let _owner = parts.next()?;
    let repo = parts.next()?.strip_suffix(".git")?;
    let rest = parts.next().unwrap_or("");
    let ok = valid_repo(repo) && !rest.split('/').any(|c| c == "..");
    ok.then(|| (repo.to_owned(), rest.to_owned()))
}

/// Makes the bare repository `dir` unless it exists; whether it made it.
async fn create_repo(dir: &str) -> Result<bool, String> {
    if std::path::Path::new(dir).exists() {
        return Ok(false);
    }
    std::fs::create_dir_all(REPOS).map_err(|e| format!("{REPOS}: {e}"))?;
    git_out(
        REPOS,
        &["init", "--bare", "--quiet", "--initial-branch=main", dir],
    )
    .await
    .map_err(|e| e.extra)?;
    Ok(true)
}

async fn handle(req: Request<Incoming>, host: Host, admin: bool) -> Response<Body> {
    let user = req
        .headers()
        .get("x-granary-user")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let Some((repo, rest)) = split_path(req.uri().path()) else {
        return text(StatusCode::NOT_FOUND, "not a repository path");
    };
    let query = req.uri().query().unwrap_or("").to_owned();
    let dir = format!("{REPOS}/{repo}.git");
    // `granary git create`: only on a connection the host accepted as the
    // admin's (the gateway never opens one of those).
    if admin
        && req
            .headers()
            .get("x-granary-admin")
            .is_some_and(|v| v == "create")
    {
        return match create_repo(&dir).await {
            Ok(false) => text(StatusCode::OK, "exists"),
            Ok(true) => text(StatusCode::CREATED, "created"),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("cannot create the repository: {e}"),
            ),
        };
    }
    let pushing = rest == "git-receive-pack" || query.contains("service=git-receive-pack");
    if !std::path::Path::new(&dir).exists() {
        if !pushing {
            return text(StatusCode::NOT_FOUND, "no such repository");
        }
        // The first push makes the repository.
        if let Err(e) = create_repo(&dir).await {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("cannot create the repository: {e}"),
            );
        }
        granary_sdk::log::info(&format!("created {dir} for {user}"));
    }
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let mut cmd = tokio::process::Command::new(BACKEND);
    cmd.env_clear()
        .env("GIT_PROJECT_ROOT", REPOS)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", format!("/{repo}.git/{rest}"))
        .env("REQUEST_METHOD", req.method().as_str())
        .env("QUERY_STRING", &query)
        .env("CONTENT_TYPE", header("content-type"))
        .env("REMOTE_USER", &user)
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("GIT_PROTOCOL", header("git-protocol"))
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("HOME", "/tmp")
        .env("PATH", "/usr/bin:/bin")
        .env("GIT_CONFIG_COUNT", "2")
        .env("GIT_CONFIG_KEY_0", "http.receivepack")
        .env("GIT_CONFIG_VALUE_0", "true")
        .env("GIT_CONFIG_KEY_1", "safe.directory")
        .env("GIT_CONFIG_VALUE_1", "*")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if let Some(len) = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
    {
        cmd.env("CONTENT_LENGTH", len);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("git http-backend: {e}"),
            );
        }
    };
    // The request body to the CGI's stdin, as it arrives (pushes are
    // streamed chunked; the backend reads to the end).
    let mut stdin = child.stdin.take().expect("piped");
    let mut body = req.into_body();
    granary_sdk::spawn_local(async move {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            if let Ok(data) = frame.into_data()
                && stdin.write_all(&data).await.is_err()
            {
                break;
            }
        }
        let _ = stdin.shutdown().await;
    });
    let stdout = child.stdout.take().expect("piped");
    let mut reader = BufReader::with_capacity(64 << 10, stdout);
    // CGI headers, then the body as it comes.
    let mut response = Response::builder();
    let mut status = StatusCode::OK;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line).await {
            Ok(0) => return text(StatusCode::BAD_GATEWAY, "git http-backend said nothing"),
            Ok(_) if line.len() > 8192 => return text(StatusCode::BAD_GATEWAY, "bad CGI header"),
            Ok(_) => {}
            Err(e) => return text(StatusCode::BAD_GATEWAY, &format!("git http-backend: {e}")),
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            return text(StatusCode::BAD_GATEWAY, "bad CGI header");
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            status = value
                .split_whitespace()
                .next()
                .and_then(|c| c.parse::<u16>().ok())
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::BAD_GATEWAY);
        } else {
            response = response.header(name, value);
        }
    }
    let pushed = rest == "git-receive-pack";
    granary_sdk::spawn_local(async move {
        let status = child.wait().await;
        if pushed && status.is_ok_and(|s| s.success()) {
            notify_push(host, repo).await;
        }
    });
    let stream = tokio_util::io::ReaderStream::with_capacity(reader, 64 << 10).map_ok(Frame::data);
    response
        .status(status)
        .body(BodyExt::boxed_unsync(StreamBody::new(stream)))
        .unwrap_or_else(|_| text(StatusCode::BAD_GATEWAY, "bad CGI header"))
}

/// One frame to the gateway: a tag (`o` stdout, `e` stderr, `x` exit
/// status), a 4-byte big-endian length, the payload.
async fn frame(
    out: &tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>,
    tag: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut head = [tag, 0, 0, 0, 0];
    head[1..].copy_from_slice(&(payload.len() as u32).to_be_bytes());
    let mut w = out.lock().await;
    w.write_all(&head).await?;
    w.write_all(payload).await
}

/// An SSH session's command, as the gateway forwards it: one line
/// `<upload-pack|receive-pack> <repo> <user> <GIT_PROTOCOL or ->`, then
/// the client's bytes; the answer goes back in frames.
async fn git_over_ssh(stream: tokio::net::UnixStream, host: Host) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let (read, write) = stream.into_split();
    let write = Rc::new(tokio::sync::Mutex::new(write));
    let mut read = BufReader::new(read);
    let mut line = String::new();
    (&mut read).take(4096).read_line(&mut line).await?;
    let fields: Vec<&str> = line.trim().split(' ').collect();
    let [command, repo, user, protocol] = fields.as_slice() else {
        return frame(&write, b'x', &1u32.to_be_bytes()).await;
    };
    let command = match *command {
        "upload-pack" => "upload-pack",
        "receive-pack" => "receive-pack",
        _ => return frame(&write, b'x', &1u32.to_be_bytes()).await,
    };
    if !valid_repo(repo) {
        return frame(&write, b'x', &1u32.to_be_bytes()).await;
    }
    let dir = format!("{REPOS}/{repo}.git");
    if !std::path::Path::new(&dir).exists() {
        if command != "receive-pack" {
            frame(
                &write,
                b'e',
                format!("fatal: no repository {repo}\n").as_bytes(),
            )
            .await?;
            return frame(&write, b'x', &128u32.to_be_bytes()).await;
        }
        if let Err(e) = create_repo(&dir).await {
            frame(&write, b'e', format!("fatal: {e}\n").as_bytes()).await?;
            return frame(&write, b'x', &128u32.to_be_bytes()).await;
        }
        granary_sdk::log::info(&format!("created {dir} for {user}"));
    }
    let mut cmd = git_command(REPOS);
    cmd.arg(command)
        .arg(&dir)
        .env("GIT_PROTOCOL", if *protocol == "-" { "" } else { protocol })
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let mut stdin = child.stdin.take().expect("piped");
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let feed = granary_sdk::spawn_local(async move {
        let _ = tokio::io::copy(&mut read, &mut stdin).await;
        let _ = stdin.shutdown().await;
    });
    let w = write.clone();
    let errors = granary_sdk::spawn_local(async move {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match stderr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if frame(&w, b'e', &buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match stdout.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => frame(&write, b'o', &buf[..n]).await?,
        }
    }
    let status = child.wait().await?;
    let _ = errors.await;
    feed.abort();
    let code = status.code().unwrap_or(128) as u32;
    frame(&write, b'x', &code.to_be_bytes()).await?;
    if command == "receive-pack" && status.success() {
        notify_push(host, repo.to_string()).await;
    }
    Ok(())
}

impl App for Git {
    async fn accept(self: Rc<Self>, conn: Accepted) {
        if conn.service == "git-ssh" {
            if let Err(e) = git_over_ssh(conn.stream, self.host.clone()).await {
                granary_sdk::log::warn(&format!("git over ssh: {e}"));
            }
            return;
        }
        if conn.service != "http" {
            return;
        }
        let admin = conn.method == AuthMethod::Admin;
        let service = hyper::service::service_fn(|req| {
            let host = self.host.clone();
            async move { Ok::<_, std::convert::Infallible>(handle(req, host, admin).await) }
        });
        if let Err(e) = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(conn.stream), service)
            .await
        {
            granary_sdk::log::debug(&format!("http connection ended: {e}"));
        }
    }

    fn offer(
        &self,
        descriptor: &str,
        requester: GrainRef,
    ) -> Result<capnp::capability::Client, capnp::Error> {
        match descriptor.split_once(':') {
            Some(("git.read", repo)) if valid_repo(repo) => {
                let dir = format!("{REPOS}/{repo}.git");
                if !std::path::Path::new(&dir).exists() {
                    return Err(capnp::Error::failed(format!("no repository {repo}")));
                }
                let client: git_repo_read::Client = granary_sdk::new_client(RepoRead { dir });
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
    granary_sdk::run(|host| Git { host })
}
