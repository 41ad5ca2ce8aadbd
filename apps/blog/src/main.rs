//! A static site in a grain. Its owner grants it `git.read:<repo>` on
//! their git grain and grants the git grain `notify:<repo>` to it; after
//! each push the git grain tells it, and it exports the new commit's files
//! through the capability (no shared files, no network) into a fresh
//! directory, then switches `/var/current` to it with one rename: a
//! request sees the old version or the new one, never a mix.
//!
//! Serving: `index.html` for directories, content types by extension,
//! strong ETags (If-None-Match answers 304), gzip when accepted for text,
//! the site's own `404.html` when it has one.

use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::rc::Rc;

use granary_sdk::services_capnp::{file_sink, git_repo_read, notify};
use granary_sdk::{Accepted, App, GrainRef, Host};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;

const SITES: &str = "/var/sites";
const CURRENT: &str = "/var/current";

/// The link to the published version: `/var/current` in a grain; the
/// benchmark's standalone mode points it elsewhere.
static CURRENT_LINK: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn current_link() -> &'static Path {
    CURRENT_LINK.get_or_init(|| PathBuf::from(CURRENT))
}

struct Blog {
    host: Host,
}

/// Receives one commit's files into a staging directory.
struct Sink {
    dir: PathBuf,
    done: std::cell::RefCell<Option<tokio::sync::oneshot::Sender<String>>>,
}

/// A relative path of plain components, as the schema promises; checked
/// again here.
fn clean(path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    (!path.is_empty()
        && path.len() <= 1024
        && p.components().all(|c| matches!(c, Component::Normal(_))))
    .then(|| p.to_path_buf())
}

impl file_sink::Server for Sink {
    async fn file(
        self: capnp::capability::Rc<Self>,
        params: file_sink::FileParams,
        _: file_sink::FileResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let path = p.get_path()?.to_str()?;
        let rel = clean(path).ok_or_else(|| capnp::Error::failed(format!("bad path {path:?}")))?;
        let target = self.dir.join(rel);
        let io = |e: std::io::Error| capnp::Error::failed(format!("{path}: {e}"));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
            .map_err(io)?;
        f.write_all(p.get_data()?).map_err(io)?;
        Ok(())
    }

    async fn done(
        self: capnp::capability::Rc<Self>,
        params: file_sink::DoneParams,
        _: file_sink::DoneResults,
    ) -> Result<(), capnp::Error> {
        let commit = params.get()?.get_commit()?.to_str()?.to_owned();
        if let Some(tx) = self.done.borrow_mut().take() {
            let _ = tx.send(commit);
        }
        Ok(())
    }
}

/// Builds the site of `repo` at its newest commit and switches to it.
async fn rebuild(host: Host, repo: String) -> Result<String, capnp::Error> {
    let io = |e: std::io::Error| capnp::Error::failed(e.to_string());
    let source: git_repo_read::Client = host.request_as(&format!("git.read:{repo}")).await?;
    let mut resolve = source.resolve_request();
    resolve.get().set_ref("HEAD");
    let commit = resolve
        .send()
        .promise
        .await?
        .get()?
        .get_commit()?
        .to_str()?
        .to_owned();
    if commit.len() != 40 || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(capnp::Error::failed(format!("not a commit: {commit:?}")));
    }
    let version = Path::new(SITES).join(&commit);
    if version.exists() && std::fs::read_link(CURRENT).ok().as_deref() == Some(version.as_path()) {
        return Ok(commit);
    }
    std::fs::create_dir_all(SITES).map_err(io)?;
    let staging = Path::new(SITES).join(format!(".incoming-{commit}"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir(&staging).map_err(io)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let sink: file_sink::Client = granary_sdk::new_client(Sink {
        dir: staging.clone(),
        done: std::cell::RefCell::new(Some(tx)),
    });
    let mut export = source.export_request();
    export.get().set_commit(&commit);
    export.get().set_sink(sink);
    export.send().promise.await?;
    let got = rx
        .await
        .map_err(|_| capnp::Error::failed("the export ended without done".to_owned()))?;
    if got != commit {
        return Err(capnp::Error::failed(
            "the export sent another commit".to_owned(),
        ));
    }
    // Complete: into place, then one rename switches the site over.
    let _ = std::fs::remove_dir_all(&version);
    std::fs::rename(&staging, &version).map_err(io)?;
    let link = Path::new(SITES).join(".current-new");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&version, &link).map_err(io)?;
    let previous = std::fs::read_link(CURRENT).ok();
    std::fs::rename(&link, CURRENT).map_err(io)?;
    // Keep the version just replaced (requests may still read it); older
    // ones go.
    for entry in std::fs::read_dir(SITES).map_err(io)?.flatten() {
        let p = entry.path();
        let keep = p == version
            || Some(&p) == previous.as_ref()
            || entry.file_name().to_string_lossy().starts_with('.');
        if !keep {
            let _ = std::fs::remove_dir_all(p);
        }
    }
    granary_sdk::log::info(&format!("site {repo} now at {commit}"));
    Ok(commit)
}

/// `notify:<subject>`: a push to the repository `subject`.
struct Changed {
    host: Host,
}

impl notify::Server for Changed {
    async fn changed(
        self: capnp::capability::Rc<Self>,
        params: notify::ChangedParams,
        _: notify::ChangedResults,
    ) -> Result<(), capnp::Error> {
        let subject = params.get()?.get_subject()?.to_str()?.to_owned();
        // Built in the background: the pusher does not wait for the site.
        let host = self.host.clone();
        granary_sdk::spawn_local(async move {
            if let Err(e) = rebuild(host, subject.clone()).await {
                granary_sdk::log::warn(&format!("cannot rebuild from {subject}: {}", e.extra));
            }
        });
        Ok(())
    }
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" => "application/json",
        "txt" | "md" => "text/plain; charset=utf-8",
        "xml" => "application/xml",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "pdf" => "application/pdf",
        _ => "application/octet-stream",
    }
}

fn answer(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("valid parts")
}

fn serve(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return answer(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            b"GET only\n".to_vec(),
        );
    }
    // One version for the whole request.
    let Ok(root) = std::fs::read_link(current_link()) else {
        return answer(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            b"Nothing published yet.\n".to_vec(),
        );
    };
    let path = req.uri().path().trim_start_matches('/');
    let rel = if path.is_empty() {
        Some(PathBuf::new())
    } else {
        clean(path)
    };
    let mut file = rel.map(|r| root.join(r));
    if let Some(f) = &file
        && f.is_dir()
    {
        file = Some(f.join("index.html"));
    }
    let found = file.as_ref().and_then(|f| {
        // Never a symlink (an export writes none), never outside.
        let meta = std::fs::symlink_metadata(f).ok()?;
        meta.is_file().then(|| std::fs::read(f).ok()).flatten()
    });
    let Some(body) = found else {
        let page =
            std::fs::read(root.join("404.html")).unwrap_or_else(|_| b"Not found.\n".to_vec());
        return answer(StatusCode::NOT_FOUND, "text/html; charset=utf-8", page);
    };
    let file = file.expect("found implies a path");
    let digest = ring::digest::digest(&ring::digest::SHA256, &body);
    let etag = format!(
        "\"{}\"",
        digest.as_ref()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let ctype = content_type(&file);
    if req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return Response::builder()
            .status(StatusCode::NOT_MODIFIED)
            .header(header::ETAG, &etag)
            .body(Full::new(Bytes::new()))
            .expect("valid parts");
    }
    let gzip_ok = req
        .headers()
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|e| e.trim().split(';').next() == Some("gzip"))
        });
    let compressible = ctype.starts_with("text/")
        || ctype.contains("json")
        || ctype.contains("xml")
        || ctype.contains("svg");
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, ctype)
        .header(header::ETAG, &etag)
        .header(header::VARY, "Accept-Encoding")
        .header(header::CACHE_CONTROL, "no-cache");
    let body = if gzip_ok && compressible && body.len() > 256 {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let _ = gz.write_all(&body);
        builder = builder.header(header::CONTENT_ENCODING, "gzip");
        gz.finish().unwrap_or(body)
    } else {
        body
    };
    let body = if req.method() == hyper::Method::HEAD {
        Vec::new()
    } else {
        body
    };
    builder
        .body(Full::new(Bytes::from(body)))
        .expect("valid parts")
}

impl App for Blog {
    async fn accept(self: Rc<Self>, conn: Accepted) {
        if conn.service != "http" {
            return;
        }
        let service = hyper::service::service_fn(|req| async move {
            Ok::<_, std::convert::Infallible>(serve(&req))
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
        match descriptor.split_once(':').map_or(descriptor, |(i, _)| i) {
            "notify" => {
                let client: notify::Client = granary_sdk::new_client(Changed {
                    host: self.host.clone(),
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

/// `granary-blog --standalone SOCKET LINK`: serves the site `LINK` points
/// to on a unix socket, outside any grain: the peer the gateway benchmark
/// puts behind nginx, so both serve the same code.
fn standalone(socket: &str, link: &str) -> ExitCode {
    let _ = CURRENT_LINK.set(PathBuf::from(link));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let _ = std::fs::remove_file(socket);
        let listener = match tokio::net::UnixListener::bind(socket) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("cannot listen on {socket}: {e}");
                return ExitCode::FAILURE;
            }
        };
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req| async move {
                    Ok::<_, std::convert::Infallible>(serve(&req))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, socket, link] = args.as_slice()
        && flag == "--standalone"
    {
        return standalone(socket, link);
    }
    granary_sdk::run(|host| Blog { host })
}
