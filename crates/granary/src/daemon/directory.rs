//! What the gateway asks of the daemon's state ([`granary_gateway::Directory`]):
//! app-password and SSH-key checks, public resources, registered hosts.
//! SQLite and argon2 run on the blocking pool.

use std::sync::Arc;

use granary_gateway::{BoxFuture, Credential, Directory, MailRecipient};
use granary_grains::AuthMethod;
use granary_model::{MailAddress, UserName};
use granary_state::{MailRoute, Store};

pub(super) struct StateDirectory {
    pub(super) store: Arc<Store>,
    /// `mail.postmaster`: who gets postmaster@ and abuse@.
    pub(super) postmaster: Option<String>,
}

/// Runs a lookup on the blocking pool; a failure (or a panic) answers
/// `fallback`, which is always the refusing answer.
fn lookup<T: Send + 'static>(
    fallback: T,
    work: impl FnOnce() -> T + Send + 'static,
) -> BoxFuture<T> {
    Box::pin(async move { tokio::task::spawn_blocking(work).await.unwrap_or(fallback) })
}

impl Directory for StateDirectory {
    fn check_password(
        &self,
        user: &str,
        kind: &str,
        password: &str,
    ) -> BoxFuture<Option<Credential>> {
        let (store, kind, password) = (self.store.clone(), kind.to_owned(), password.to_owned());
        let Ok(user) = UserName::existing(user) else {
            return Box::pin(async { None });
        };
        lookup(None, move || {
            // App passwords only: a device never holds the account password.
            let Ok(Some(creds)) = store.credentials(&user, Some(&kind)) else {
                return None;
            };
            for (id, hash) in &creds.app_passwords {
                if granary_auth::verify_password(&password, hash).unwrap_or(false) {
                    let _ = store.touch_app_password(*id);
                    return Some(Credential {
                        method: AuthMethod::AppPassword,
                        id: *id,
                    });
                }
            }
            None
        })
    }

    fn scram_verifiers(&self, user: &str, kind: &str) -> BoxFuture<Vec<(i64, String)>> {
        let (store, kind) = (self.store.clone(), kind.to_owned());
        let Ok(user) = UserName::existing(user) else {
            return Box::pin(async { Vec::new() });
        };
        lookup(Vec::new(), move || {
            store.scram_verifiers(&user, &kind).unwrap_or_default()
        })
    }

    fn check_ssh_key(&self, user: &str, key: &str) -> BoxFuture<Option<Credential>> {
        let (store, user, key) = (self.store.clone(), user.to_owned(), key.to_owned());
        lookup(None, move || {
            store
                .check_ssh_key(&user, &key)
                .ok()
                .flatten()
                .map(|id| Credential {
                    method: AuthMethod::SshKey,
                    id,
                })
        })
    }

    fn is_public(&self, owner: &str, kind: &str, resource: &str) -> BoxFuture<bool> {
        let (store, owner, resource) = (self.store.clone(), owner.to_owned(), resource.to_owned());
        // Only git repositories can be made public so far.
        if kind != "git" {
            return Box::pin(async { false });
        }
        lookup(false, move || {
            store.repo_public(&owner, &resource).unwrap_or(false)
        })
    }

    fn registered_host(&self, host: &str) -> BoxFuture<Option<(String, String)>> {
        let (store, host) = (self.store.clone(), host.to_owned());
        // Only blogs register hosts so far.
        lookup(None, move || {
            store
                .blog_domain_owner(&host)
                .ok()
                .flatten()
                .map(|owner| (owner, "blog".to_owned()))
        })
    }

    fn mail_recipient(&self, address: &str) -> BoxFuture<MailRecipient> {
        let (store, postmaster) = (self.store.clone(), self.postmaster.clone());
        // RFC 5321 §4.1.1.3: plain <postmaster> works without a domain.
        if address.eq_ignore_ascii_case("postmaster") {
            return Box::pin(async move {
                match postmaster {
                    Some(p) => MailRecipient::User(p),
                    None => MailRecipient::Unknown,
                }
            });
        }
        let Ok(address) = MailAddress::parse(address) else {
            return Box::pin(async { MailRecipient::Unknown });
        };
        lookup(MailRecipient::TryLater, move || {
            match store.route_mail(&address, postmaster.as_deref()) {
                Ok(MailRoute::User(u)) => MailRecipient::User(u),
                Ok(MailRoute::Unknown) => MailRecipient::Unknown,
                Ok(MailRoute::NotLocal) => MailRecipient::NotLocal,
                Err(e) => {
                    tracing::error!(error = %e, "mail recipient lookup failed");
                    MailRecipient::TryLater
                }
            }
        })
    }

    fn mail_sender_owner(&self, address: &str) -> BoxFuture<Option<String>> {
        let (store, postmaster) = (self.store.clone(), self.postmaster.clone());
        let Ok(address) = MailAddress::parse(address) else {
            return Box::pin(async { None });
        };
        lookup(None, move || {
            match store.address_owner(&address, postmaster.as_deref()) {
                Ok(owner) => owner,
                Err(e) => {
                    tracing::error!(error = %e, "mail sender lookup failed");
                    None
                }
            }
        })
    }

    fn client_secret(&self, sha256: [u8; 32]) -> BoxFuture<Option<(String, Credential)>> {
        let store = self.store.clone();
        lookup(None, move || match store.task_client_by_hash(&sha256) {
            Ok(found) => found.map(|(user, id)| {
                (
                    user,
                    Credential {
                        method: AuthMethod::ClientSecret,
                        id,
                    },
                )
            }),
            Err(e) => {
                tracing::error!(error = %e, "client id lookup failed");
                None
            }
        })
    }

    fn task_certificate(
        &self,
        sha256: [u8; 32],
    ) -> BoxFuture<Option<(String, Credential, String)>> {
        let store = self.store.clone();
        lookup(None, move || {
            match store.task_cert_by_fingerprint(&sha256) {
                Ok(found) => found.map(|(user, id, key)| {
                    (
                        user,
                        Credential {
                            method: AuthMethod::ClientSecret,
                            id,
                        },
                        key,
                    )
                }),
                Err(e) => {
                    tracing::error!(error = %e, "taskd certificate lookup failed");
                    None
                }
            }
        })
    }

    fn xmpp_domains(&self) -> BoxFuture<Option<Vec<String>>> {
        let store = self.store.clone();
        lookup(None, move || match store.xmpp_domain_names() {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::error!(error = %e, "chat domain lookup failed");
                None
            }
        })
    }
}
