//! What other grains may read, through routes the owner granted:
//! `git.read:<repo>` (resolve a ref, export a commit's files), and the
//! `notify:<repo>` this grain calls after each push.

use std::process::Stdio;

use granary_sdk::Host;
use granary_sdk::services_capnp::{git_repo_read, notify};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::config::{REPOS, git_command, git_out, valid_ref};

/// `git.read:<repo>`: one repository, read-only.
pub(crate) struct RepoRead {
    pub(crate) dir: String,
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
pub(crate) async fn notify_push(host: Host, repo: String) {
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
