//! What the gateway asks of the daemon: app-password checks (SQLite and
//! argon2 on the blocking pool) and connections to grains, which only the
//! supervisor on the admin thread can make; requests cross over a channel.

use std::sync::Arc;

use granary_gateway::proxy::{Backend, BoxFuture, Upstream};
use granary_model::UserName;
use granary_state::Store;
use tokio::sync::{mpsc, oneshot};

/// A connection the gateway wants, answered on the admin thread.
pub(super) struct ConnectRequest {
    pub(super) grain: String,
    pub(super) service: String,
    pub(super) reply: oneshot::Sender<Result<Upstream, String>>,
}

pub(super) struct DaemonBackend {
    pub(super) store: Arc<Store>,
    pub(super) connect: mpsc::Sender<ConnectRequest>,
}

impl Backend for DaemonBackend {
    fn check_password(&self, user: &str, kind: &str, password: &str) -> BoxFuture<bool> {
        let (store, kind, password) = (self.store.clone(), kind.to_owned(), password.to_owned());
        let Ok(user) = UserName::new(user) else {
            return Box::pin(async { false });
        };
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                // App passwords only: a device never holds the account password.
                let Ok(Some(creds)) = store.credentials(&user, Some(&kind)) else {
                    return false;
                };
                for (id, hash) in &creds.app_passwords {
                    if granary_auth::verify_password(&password, hash).unwrap_or(false) {
                        let _ = store.touch_app_password(*id);
                        return true;
                    }
                }
                false
            })
            .await
            .unwrap_or(false)
        })
    }

    fn repo_public(&self, owner: &str, repo: &str) -> BoxFuture<bool> {
        let (store, owner, repo) = (self.store.clone(), owner.to_owned(), repo.to_owned());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || store.repo_public(&owner, &repo).unwrap_or(false))
                .await
                .unwrap_or(false)
        })
    }

    fn check_ssh_key(&self, user: &str, key: &str) -> BoxFuture<bool> {
        let (store, user, key) = (self.store.clone(), user.to_owned(), key.to_owned());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || store.check_ssh_key(&user, &key).unwrap_or(false))
                .await
                .unwrap_or(false)
        })
    }

    fn domain_owner(&self, host: &str) -> BoxFuture<Option<String>> {
        let (store, host) = (self.store.clone(), host.to_owned());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || store.blog_domain_owner(&host).ok().flatten())
                .await
                .ok()
                .flatten()
        })
    }

    fn connect(
        &self,
        owner: &str,
        kind: &str,
        service: &str,
    ) -> BoxFuture<Result<Upstream, String>> {
        let (tx, grain, service) = (
            self.connect.clone(),
            super::grain_admin::grain_id(&format!("{owner}/{kind}")),
            service.to_owned(),
        );
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            tx.send(ConnectRequest {
                grain,
                service,
                reply,
            })
            .await
            .map_err(|_| "the daemon is stopping".to_owned())?;
            answer
                .await
                .map_err(|_| "the daemon is stopping".to_owned())?
        })
    }
}

/// Serves the gateway's connection requests on the admin thread (inside
/// its `LocalSet`). Each connection holds its grain awake until the
/// gateway drops it.
pub(super) async fn serve_connects(
    sup: granary_supervisor::Supervisor,
    mut requests: mpsc::Receiver<ConnectRequest>,
) {
    while let Some(req) = requests.recv().await {
        let sup = sup.clone();
        tokio::task::spawn_local(async move {
            let identity = granary_supervisor::Identity::user("gateway", "http");
            let answer = match sup.connect(&req.grain, &req.service, identity).await {
                Ok(conn) => match conn.stream.into_std() {
                    Ok(stream) => {
                        let (keep, dropped) = oneshot::channel::<()>();
                        let guard = conn.guard;
                        tokio::task::spawn_local(async move {
                            let _ = dropped.await;
                            drop(guard);
                        });
                        Ok(Upstream {
                            stream,
                            keep: Box::new(keep),
                        })
                    }
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e.to_string()),
            };
            let _ = req.reply.send(answer);
        });
    }
}
