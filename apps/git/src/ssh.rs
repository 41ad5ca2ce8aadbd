//! git over SSH: the gateway forwards one command line and the client's
//! bytes; the answer goes back in frames.

use std::cell::Cell;
use std::process::Stdio;
use std::rc::Rc;

use granary_sdk::Host;
use granary_wire::http::valid_repo;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::config::{REPOS, create_repo, git_command};
use crate::read::notify_push;
use crate::report::ReportWatch;
use crate::storage;

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
pub(crate) async fn git_over_ssh(
    stream: tokio::net::UnixStream,
    host: Host,
) -> std::io::Result<()> {
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
    // Only the grain's owner pushes (the gateway checks it too).
    if command == "receive-pack" && *user != crate::config::owner() {
        frame(
            &write,
            b'e',
            b"fatal: only the owner pushes to these repositories\n",
        )
        .await?;
        return frame(&write, b'x', &128u32.to_be_bytes()).await;
    }
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
    let room_before = if command == "receive-pack" {
        storage::space()
    } else {
        None
    };
    let received = Rc::new(Cell::new(0u64));
    let counted = received.clone();
    let feed = granary_sdk::spawn_local(async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    counted.set(counted.get() + n as u64);
                    if stdin.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
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
    // receive-pack exits 0 whether or not unpacking worked: its report
    // says.
    let mut watch = ReportWatch::after_advertisement();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match stdout.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                watch.feed(&buf[..n]);
                frame(&write, b'o', &buf[..n]).await?
            }
        }
    }
    let status = child.wait().await?;
    let _ = errors.await;
    feed.abort();
    let code = status.code().unwrap_or(128) as u32;
    let failed = !status.success() || watch.unpacked() == Some(false);
    if failed
        && let Some(words) =
            room_before.and_then(|before| storage::push_did_not_fit(before, received.get()))
    {
        frame(&write, b'e', format!("{words}\n").as_bytes()).await?;
    }
    frame(&write, b'x', &code.to_be_bytes()).await?;
    if command == "receive-pack" && !failed {
        notify_push(host, repo.to_string()).await;
    }
    Ok(())
}
