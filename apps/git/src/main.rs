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

mod config;
mod http;
mod read;
mod report;
mod ssh;
mod storage;

use std::process::ExitCode;
use std::rc::Rc;

use granary_sdk::services_capnp::git_repo_read;
use granary_sdk::{Accepted, App, AuthMethod, GrainRef, Host};
use granary_wire::http::valid_repo;
use hyper_util::rt::TokioIo;

use crate::config::REPOS;

struct Git {
    host: Host,
}

impl App for Git {
    async fn accept(self: Rc<Self>, conn: Accepted) {
        if conn.service == "git-ssh" {
            if let Err(e) = ssh::git_over_ssh(conn.stream, self.host.clone()).await {
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
            async move { Ok::<_, std::convert::Infallible>(http::handle(req, host, admin).await) }
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
                let client: git_repo_read::Client = granary_sdk::new_client(read::RepoRead { dir });
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
