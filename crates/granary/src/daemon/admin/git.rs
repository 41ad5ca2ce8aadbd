//! `Git`: making repositories and setting who may read them.

use std::rc::Rc;

use capnp::capability::Rc as CapRc;
use granary_grains::{AuthMethod, Connection, GrainId, Identity, Peer};
use granary_schema::admin_capnp::git;

use super::{Ctx, blocking, fail, state_failure, user_name};

pub(super) struct Git(pub(super) Rc<Ctx>);

/// Asks a git grain to create `repo`, over a connection to its http
/// service accepted as the admin's (the only connection its app takes a
/// create from). Returns whether it was made.
async fn ask_git_create(conn: Connection, user: &str, repo: &str) -> Result<bool, capnp::Error> {
    use http_body_util::BodyExt;
    let fail = |e: String| capnp::Error::failed(format!("the git grain: {e}"));
    conn.stream
        .set_nonblocking(true)
        .map_err(|e| fail(e.to_string()))?;
    let stream = tokio::net::UnixStream::from_std(conn.stream).map_err(|e| fail(e.to_string()))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| fail(e.to_string()))?;
    let keep = conn.keep;
    tokio::task::spawn_local(async move {
        let _ = connection.await;
        drop(keep);
    });
    let req = hyper::Request::post(format!("/{user}/{repo}.git/"))
        .header("host", "git.local")
        .header("x-granary-admin", "create")
        .header("x-granary-user", user)
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(|e| fail(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
        .unwrap_or_default();
    match status.as_u16() {
        201 => Ok(true),
        200 => Ok(false),
        _ => Err(fail(format!("{status}: {body}"))),
    }
}

impl git::Server for Git {
    async fn repo(
        self: CapRc<Self>,
        params: git::RepoParams,
        mut results: git::RepoResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let p = params.get()?;
        let user = user_name(p.get_user()?)?;
        let repo = p.get_repo()?.to_str()?.trim_end_matches(".git").to_owned();
        if !granary_wire::http::valid_repo(&repo) {
            return Err(fail(format!(
                "{repo:?} is not a repository name: 1 to 100 of A-Z, a-z, 0-9, '.', '_' and '-', not starting with '.' or '-'"
            )));
        }
        let mut created = false;
        if p.get_create() {
            let id = GrainId::for_user(user.as_str(), "git").map_err(fail)?;
            if self.0.grains.status(&id).await.is_err() {
                return Err(fail(format!(
                    "{user} has no git grain: is the git app installed? (granary app list)"
                )));
            }
            let conn = self
                .0
                .grains
                .connect(
                    &id,
                    "http",
                    Identity::new(user.as_str(), AuthMethod::Admin, 0),
                    Peer::new("admin socket", "admin"),
                )
                .await
                .map_err(super::grain_failure)?;
            created = ask_git_create(conn, user.as_str(), &repo).await?;
        }
        let visibility = p.get_visibility()?.to_str()?.to_owned();
        let store = self.0.store.clone();
        let (u, r) = (user.clone(), repo.clone());
        let public = blocking(move || {
            match visibility.as_str() {
                "" => {}
                "public" | "private" => store
                    .set_repo_public(&u, &r, visibility == "public", actor)
                    .map_err(state_failure)?,
                other => {
                    return Err(fail(format!(
                        "visibility {other:?} is neither public nor private"
                    )));
                }
            }
            store.repo_public(u.as_str(), &r).map_err(state_failure)
        })
        .await?;
        let mut r = results.get();
        r.set_public(public);
        r.set_created(created);
        Ok(())
    }
}
