//! git over HTTP: each request runs `git http-backend` as a CGI in the
//! grain, bodies streamed both ways.

use std::cell::Cell;
use std::process::Stdio;
use std::rc::Rc;

use futures::TryStreamExt;
use granary_sdk::Host;
use granary_wire::http::valid_repo;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::config::{BACKEND, REPOS, configure, create_repo};
use crate::read::notify_push;
use crate::report::ReportWatch;
use crate::storage;

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

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

pub(crate) async fn handle(req: Request<Incoming>, host: Host, admin: bool) -> Response<Body> {
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
    let pushing = rest == "git-receive-pack"
        || granary_wire::http::query_value(&query, "service").as_deref()
            == Some("git-receive-pack");
    // Only the grain's owner pushes (the gateway checks it too).
    if pushing && user != crate::config::owner() {
        return text(
            StatusCode::FORBIDDEN,
            "only the owner pushes to these repositories",
        );
    }
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
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    // Reached only by the owner when pushing (checked above).
    configure(
        &mut cmd,
        &[("http.receivepack", if pushing { "true" } else { "false" })],
    );
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
    let pushed = rest == "git-receive-pack";
    let room_before = if pushed { storage::space() } else { None };
    // The request body to the CGI's stdin, as it arrives (pushes are
    // streamed chunked; the backend reads to the end), counted.
    let stdin = child.stdin.take().expect("piped");
    let received = Rc::new(Cell::new(0u64));
    let fed = granary_sdk::spawn_local(feed(req.into_body(), stdin, received.clone()));
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
    if !pushed {
        drop(fed);
        granary_sdk::spawn_local(async move {
            let _ = child.wait().await;
        });
        let stream =
            tokio_util::io::ReaderStream::with_capacity(reader, 64 << 10).map_ok(Frame::data);
        return response
            .status(status)
            .body(BodyExt::boxed_unsync(StreamBody::new(stream)))
            .unwrap_or_else(|_| text(StatusCode::BAD_GATEWAY, "bad CGI header"));
    }
    // A push's answer is relayed packet by packet, so that when it failed
    // for lack of room the user is told so, in words, before it ends.
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(8);
    // Once receive-pack said how unpacking went: wait for the CGI and for
    // the whole request body (so the answer ends after the upload, as HTTP
    // expects), then tell `notify`, or say why the push did not fit.
    let outcome = move |unpacked: Option<bool>| async move {
        let _ = child.wait().await;
        let _ = fed.await;
        match unpacked {
            Some(true) => {
                notify_push(host, repo).await;
                None
            }
            _ => room_before.and_then(|before| storage::push_did_not_fit(before, received.get())),
        }
    };
    granary_sdk::spawn_local(relay_push(reader, tx, outcome));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item.map(Frame::data), rx))
    });
    response
        .status(status)
        .body(BodyExt::boxed_unsync(StreamBody::new(stream)))
        .unwrap_or_else(|_| text(StatusCode::BAD_GATEWAY, "bad CGI header"))
}

/// How long the rest of a request body is read and dropped once the CGI
/// stopped reading it.
const DRAIN_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// Copies the request body into the CGI, counting what it took in
/// `received`. Once
/// the CGI stops reading (it failed), the rest is read and dropped for a
/// while, so the client gets the answer instead of a reset stream.
async fn feed(mut body: Incoming, mut stdin: tokio::process::ChildStdin, received: Rc<Cell<u64>>) {
    loop {
        let Some(Ok(frame)) = body.frame().await else {
            let _ = stdin.shutdown().await;
            return;
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if stdin.write_all(&data).await.is_err() {
            break;
        }
        received.set(received.get() + data.len() as u64);
    }
    drop(stdin);
    let _ = tokio::time::timeout(DRAIN_FOR, async {
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
}

/// Relays `git receive-pack`'s answer (pkt-lines) to the client. The final
/// flush is held back until the CGI is done; `outcome` is then told how
/// unpacking went (the report's `unpack <result>`: `Some(true)` for
/// `unpack ok`), and if it has words for the user and the answer is
/// multiplexed (side-band-64k), they go out on band 2 (shown as
/// `remote: ...`) before the flush.
async fn relay_push<F, Fut>(
    mut reader: impl tokio::io::AsyncRead + Unpin,
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    outcome: F,
) where
    F: FnOnce(Option<bool>) -> Fut,
    Fut: std::future::Future<Output = Option<String>>,
{
    use tokio::io::AsyncReadExt;
    const FLUSH: &[u8] = b"0000";
    let mut held_flush = false;
    let mut open = true;
    let mut watch = ReportWatch::default();
    loop {
        let mut head = [0u8; 4];
        if reader.read_exact(&mut head).await.is_err() {
            break;
        }
        let len = std::str::from_utf8(&head)
            .ok()
            .and_then(|h| usize::from_str_radix(h, 16).ok());
        let mut packet = head.to_vec();
        match len {
            Some(0) => {
                if held_flush && open {
                    open = tx.send(Ok(Bytes::from_static(FLUSH))).await.is_ok();
                }
                held_flush = true;
                continue;
            }
            Some(n) if (5..=65520).contains(&n) => {
                let mut payload = vec![0u8; n - 4];
                if reader.read_exact(&mut payload).await.is_err() {
                    break;
                }
                packet.extend_from_slice(&payload);
                watch.feed(&packet);
            }
            // Not a pkt-line: pass the rest through as it is.
            _ => {
                let mut rest = Vec::new();
                let _ = reader.read_to_end(&mut rest).await;
                packet.extend_from_slice(&rest);
                watch.feed(&packet);
            }
        }
        if held_flush && open {
            open = tx.send(Ok(Bytes::from_static(FLUSH))).await.is_ok();
            held_flush = false;
        }
        if open {
            open = tx.send(Ok(Bytes::from(packet))).await.is_ok();
        }
    }
    if let (Some(words), Some(true)) = (outcome(watch.unpacked()).await, watch.sideband())
        && open
    {
        let line = format!("{words}\n");
        let mut packet = format!("{:04x}", line.len() + 5).into_bytes();
        packet.push(2);
        packet.extend_from_slice(line.as_bytes());
        let _ = tx.send(Ok(Bytes::from(packet))).await;
    }
    if held_flush && open {
        let _ = tx.send(Ok(Bytes::from_static(FLUSH))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the relay sends, given what receive-pack wrote and its outcome.
    fn relayed(input: &[u8], words: Option<&str>) -> Vec<u8> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async {
            let (tx, mut rx) = tokio::sync::mpsc::channel(8);
            let words = words.map(str::to_owned);
            let input = input.to_vec();
            tokio::task::spawn_local(relay_push(
                std::io::Cursor::new(input),
                tx,
                |_| async move { words },
            ));
            let mut out = Vec::new();
            while let Some(chunk) = rx.recv().await {
                out.extend_from_slice(&chunk.unwrap());
            }
            out
        })
    }

    use crate::report::pkt;

    #[test]
    fn words_go_out_on_band_two_before_the_final_flush() {
        let report = [pkt(b"unpack ok\n"), b"0000".to_vec()].concat();
        let answer = [
            pkt(b"\x02done\n"),
            pkt(&[&[1u8][..], &report].concat()),
            b"0000".to_vec(),
        ]
        .concat();
        // Nothing to add: passed through as it came.
        assert_eq!(relayed(&answer, None), answer);
        let out = relayed(&answer, Some("full"));
        let expected = [&answer[..answer.len() - 4], &pkt(b"\x02full\n"), b"0000"].concat();
        assert_eq!(
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&expected)
        );
        // Without side-band the words cannot be said in-band.
        assert_eq!(relayed(&report, Some("full")), report);
    }
}
