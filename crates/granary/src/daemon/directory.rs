//! What the gateway asks of the daemon's state ([`granary_gateway::Directory`]):
//! app-password and SSH-key checks, public resources, registered hosts.
//! SQLite and argon2 run on the blocking pool.

use std::path::PathBuf;
use std::sync::Arc;

use granary_gateway::{
    BoxFuture, Credential, Directory, InviteInfo, InviteRedeemed, LookupFailed, MailRecipient,
    RedeemRefused,
};
use granary_grains::AuthMethod;
use granary_model::{MailAddress, UserName};
use granary_state::{HostUid, MailRoute, NewAccount, RedeemError, Store};

pub(super) struct StateDirectory {
    pub(super) store: Arc<Store>,
    /// `mail.postmaster`: who gets postmaster@ and abuse@.
    pub(super) postmaster: Option<String>,
    /// Granary's own domain.
    pub(super) domain: String,
    /// Where a new user's grains get their host uid (an invite makes users).
    pub(super) uids: HostUid,
    /// The local CA's directory, when it issues the certificate (its names
    /// follow the users).
    pub(super) local_ca: Option<PathBuf>,
}

/// Who redeems invites, in the audit trail.
const INVITE_ACTOR: &str = "invite";

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
            if store.is_disabled(user.as_str()).unwrap_or(true) {
                return Vec::new();
            }
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
                // A disabled user sends nothing, even in a session that
                // logged in before.
                Ok(Some(owner)) if store.is_disabled(&owner).unwrap_or(true) => None,
                Ok(owner) => owner,
                Err(e) => {
                    tracing::error!(error = %e, "mail sender lookup failed");
                    None
                }
            }
        })
    }

    fn disabled(&self, user: &str) -> BoxFuture<bool> {
        let (store, user) = (self.store.clone(), user.to_owned());
        lookup(false, move || store.is_disabled(&user).unwrap_or(false))
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

    fn invite(&self, token: &str) -> BoxFuture<Result<Option<InviteInfo>, LookupFailed>> {
        let (store, domain) = (self.store.clone(), self.domain.clone());
        let hash = granary_auth::token_hash(token.as_bytes());
        lookup(Err(LookupFailed), move || match store.valid_invite(&hash) {
            Ok(found) => Ok(found.map(|i| {
                let home = i.inviter_domain.unwrap_or(domain);
                InviteInfo {
                    room: i.room.map(|r| format!("{r}@rooms.{home}")),
                    inviter: i.inviter.map(|u| format!("{u}@{home}")),
                }
            })),
            Err(e) => {
                tracing::error!(error = %e, "invite lookup failed");
                Err(LookupFailed)
            }
        })
    }

    fn redeem_invite(
        &self,
        token: &str,
        user: &str,
        password: &str,
        domain: &str,
    ) -> BoxFuture<Result<InviteRedeemed, RedeemRefused>> {
        let refuse = |why: String| -> BoxFuture<Result<InviteRedeemed, RedeemRefused>> {
            Box::pin(async move { Err(RedeemRefused::Unacceptable(why)) })
        };
        // A new user: the reservations apply.
        let user = match UserName::new(user) {
            Ok(u) => u,
            Err(e) => return refuse(format!("that name cannot be used: {e}")),
        };
        if let Err(e) = granary_auth::check_password_policy(password) {
            return refuse(format!("the password: {e}"));
        }
        let hash = granary_auth::token_hash(token.as_bytes());
        let (store, primary) = (self.store.clone(), self.domain.clone());
        let chat_domain =
            (!domain.eq_ignore_ascii_case(&primary)).then(|| domain.to_ascii_lowercase());
        let (uids, local_ca, password) = (self.uids, self.local_ca.clone(), password.to_owned());
        Box::pin(async move {
            let s = store.clone();
            let made = tokio::task::spawn_blocking(move || {
                // The cheap checks first, so a bad token or a taken name
                // costs no hashing; the redemption checks both again.
                match s.valid_invite(&hash) {
                    Ok(Some(_)) => {}
                    Ok(None) => return Err(RedeemRefused::NotValid),
                    Err(e) => {
                        tracing::error!(error = %e, "invite lookup failed");
                        return Err(RedeemRefused::TryLater);
                    }
                }
                match s.user(&user) {
                    Ok(None) => {}
                    Ok(Some(_)) => return Err(RedeemRefused::NameTaken),
                    Err(_) => return Err(RedeemRefused::TryLater),
                }
                let hashed = || -> anyhow::Result<(String, String, String)> {
                    // Nobody holds the account password until one is set
                    // (`granary user passwd`): the device keeps an app
                    // password, as every device does.
                    let account = granary_auth::hash_password(&granary_auth::generate_password()?)?;
                    let xmpp = granary_auth::hash_password(&password)?;
                    let scram = super::admin::scram_verifiers(&password, std::iter::empty())
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    Ok((account, xmpp, scram))
                };
                let (account_hash, xmpp_hash, xmpp_scram) = hashed().map_err(|e| {
                    tracing::error!(error = %e, "hashing a new user's password failed");
                    RedeemRefused::TryLater
                })?;
                let account = NewAccount {
                    user: &user,
                    account_hash: &account_hash,
                    xmpp_hash: &xmpp_hash,
                    xmpp_scram: &xmpp_scram,
                    chat_domain: chat_domain.as_deref(),
                };
                let redeemed = match s.redeem_invite(&hash, &account, INVITE_ACTOR) {
                    Ok(r) => r,
                    Err(RedeemError::NotValid) => return Err(RedeemRefused::NotValid),
                    Err(RedeemError::NameTaken(_)) => return Err(RedeemRefused::NameTaken),
                    Err(RedeemError::State(e)) => {
                        tracing::error!(error = %e, "redeeming an invite failed");
                        return Err(RedeemRefused::TryLater);
                    }
                };
                tracing::info!(user = %user, invite = redeemed.invite.id, "user added with an invite");
                // The grains of every installed app, as `user add` makes;
                // without them the account is no use, so it is taken back.
                if let Err(e) = s.retrying(|s| s.ensure_grains(uids, INVITE_ACTOR)) {
                    tracing::error!(error = %e, user = %user, "making the new user's grain records failed; the account is taken back");
                    if let Err(e) =
                        s.retrying(|s| s.undo_redemption(redeemed.invite.id, &user, INVITE_ACTOR))
                    {
                        tracing::error!(error = %e, user = %user, "taking back the account failed");
                    }
                    return Err(RedeemRefused::TryLater);
                }
                Ok(redeemed)
            })
            .await
            .unwrap_or(Err(RedeemRefused::TryLater))?;
            super::certificate::refresh(&store, local_ca, &primary).await;
            let invite = made.invite;
            Ok(InviteRedeemed {
                room: invite.room,
                credential: made.credential,
                inviter: invite
                    .inviter
                    .map(|u| format!("{u}@{}", invite.inviter_domain.unwrap_or(primary))),
            })
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
