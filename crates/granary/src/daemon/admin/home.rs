//! The web home's authority: the `Home` of one signed-in user (the gate
//! that signs users in is `sign_in.rs`).
//!
//! The web code (`crate::web`) holds only the gate, on a socket pair of
//! its own. Each `Home` is a membrane over the admin capabilities with the
//! user pinned: it calls the same `Users`, `Grants` and `Invites` servers
//! the CLI does (so the checks, the audit events and the revocation of
//! cached logins are the same), and answers an id that is not this user's
//! as unknown.

use std::rc::Rc;

use capnp::capability::Rc as CapRc;
use granary_model::UserName;
use granary_schema::admin_capnp::{
    grants, home, home_grain, invites, revoke_selector, tasks, users,
};

use super::{Ctx, blocking, fail, state_failure};

/// Recovery codes made when the second factor is turned on.
const RECOVERY_CODES: usize = 10;
/// What a wrong user name and a wrong password both say.
pub(super) const WRONG: &str = "wrong user name or password";

/// Now in Unix seconds, as the TOTP steps count it.
pub(super) fn now() -> u64 {
    crate::daemon::unix_now().max(0) as u64
}

/// A hash to verify against when the user does not exist, so a missing
/// user costs the same argon2 as a wrong password.
fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| {
        granary_auth::hash_password("decoy password, never anyone's").unwrap_or_default()
    })
}

/// Whether `password` is `user`'s account password (argon2, on the
/// blocking pool). An unknown user is simply `false`.
pub(super) async fn account_password_ok(
    ctx: &Ctx,
    user: &str,
    password: &str,
) -> Result<bool, capnp::Error> {
    let (store, user, password) = (ctx.store.clone(), user.to_owned(), password.to_owned());
    blocking(move || {
        let hash = match UserName::existing(&user) {
            Ok(name) => store
                .credentials(&name, None)
                .map_err(state_failure)?
                .map(|c| c.password_hash),
            Err(_) => None,
        };
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| decoy_hash().to_owned());
        // Always verified (no `&&` short cut): unknown users cost the same.
        let right = granary_auth::verify_password(&password, &hash).unwrap_or(false);
        Ok(known && right)
    })
    .await
}

/// A `Home` for `user`, valid while their password hash stays the one it
/// was made under: a password set by the admin, or a user removed (and a
/// new one of the same name added), ends it.
pub(super) async fn home_for(ctx: &Rc<Ctx>, user: UserName) -> Result<home::Client, capnp::Error> {
    let hash = current_hash(ctx, &user).await?.ok_or_else(|| fail(WRONG))?;
    Ok(capnp_rpc::new_client(Home {
        ctx: ctx.for_web(user.as_str()),
        user,
        hash: std::cell::RefCell::new(hash),
    }))
}

async fn current_hash(ctx: &Ctx, user: &UserName) -> Result<Option<String>, capnp::Error> {
    let (store, user) = (ctx.store.clone(), user.clone());
    blocking(move || {
        Ok(store
            .credentials(&user, None)
            .map_err(state_failure)?
            .map(|c| c.password_hash))
    })
    .await
}

/// The SHA-256 of a recovery code as typed (spaces and case ignored).
pub(super) fn recovery_hash(code: &str) -> [u8; 32] {
    let normal: String = code
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    granary_auth::token_hash(normal.as_bytes())
}

struct Home {
    ctx: Rc<Ctx>,
    user: UserName,
    /// The account's password hash when this was made.
    hash: std::cell::RefCell<String>,
}

/// What a `Home` answers once its account changed under it.
pub(super) const ENDED: &str = "signed out: the account's password was changed";

impl Home {
    /// Whether this user is one of `web.admins`.
    fn is_admin(&self) -> bool {
        self.ctx.info.admins.iter().any(|a| a == self.user.as_str())
    }

    /// Fails once the account's password is no longer the one this was
    /// made under (or the account is gone).
    async fn live(&self) -> Result<(), capnp::Error> {
        let now = current_hash(&self.ctx, &self.user).await?;
        match now {
            Some(h) if granary_auth::same_bytes(h.as_bytes(), self.hash.borrow().as_bytes()) => {
                Ok(())
            }
            _ => Err(fail(ENDED)),
        }
    }

    fn users_cap(&self) -> users::Client {
        capnp_rpc::new_client(super::users::Users(self.ctx.clone()))
    }

    fn tasks_cap(&self) -> tasks::Client {
        capnp_rpc::new_client(super::tasks::Tasks(self.ctx.clone()))
    }

    fn grants_cap(&self) -> grants::Client {
        capnp_rpc::new_client(super::grants::Grants(self.ctx.clone()))
    }

    /// This user's grain ids.
    async fn grain_ids(&self) -> Result<Vec<granary_state::Grain>, capnp::Error> {
        let (store, user) = (self.ctx.store.clone(), self.user.to_string());
        blocking(move || {
            Ok(store
                .list_grains()
                .map_err(state_failure)?
                .into_iter()
                .filter(|g| g.user == user)
                .collect())
        })
        .await
    }

    async fn owns_device(&self, id: i64) -> Result<bool, capnp::Error> {
        let mut req = self.users_cap().list_app_passwords_request();
        req.get().set_user(self.user.as_str());
        req.get().set_kind("");
        let r = req.send().promise.await?;
        Ok(r.get()?
            .get_app_passwords()?
            .iter()
            .any(|p| p.get_id() == id))
    }
}

impl home::Server for Home {
    async fn whoami(
        self: CapRc<Self>,
        _: home::WhoamiParams,
        mut results: home::WhoamiResults,
    ) -> Result<(), capnp::Error> {
        self.live().await?;
        let (store, user) = (self.ctx.store.clone(), self.user.clone());
        let totp = blocking(move || store.totp(&user).map_err(state_failure)).await?;
        let mut r = results.get();
        r.set_user(self.user.as_str());
        r.set_totp(totp.is_some());
        r.set_recovery_left(totp.map_or(0, |t| t.recovery_left));
        r.set_domain(&self.ctx.info.domain);
        r.set_admin(self.is_admin());
        Ok(())
    }

    async fn add_task_list(
        self: CapRc<Self>,
        params: home::AddTaskListParams,
        results: home::AddTaskListResults,
    ) -> Result<(), capnp::Error> {
        self.live().await?;
        super::home_tasks::add(&self.tasks_cap(), &self.user, params, results).await
    }

    async fn task_lists(
        self: CapRc<Self>,
        _: home::TaskListsParams,
        results: home::TaskListsResults,
    ) -> Result<(), capnp::Error> {
        self.live().await?;
        super::home_tasks::list(&self.tasks_cap(), &self.user, results).await
    }

    async fn revoke_task_list(
        self: CapRc<Self>,
        params: home::RevokeTaskListParams,
        results: home::RevokeTaskListResults,
    ) -> Result<(), capnp::Error> {
        self.live().await?;
        super::home_tasks::revoke(&self.tasks_cap(), &self.user, params, results).await
    }

    async fn admin(
        self: CapRc<Self>,
        _: home::AdminParams,
        mut results: home::AdminResults,
    ) -> Result<(), capnp::Error> {
        self.live().await?;
        if !self.is_admin() {
            return Err(fail("not an admin"));
        }
        results.get().set_admin(super::root(self.ctx.clone()));
        Ok(())
    }

    async fn devices(
        self: CapRc<Self>,
        _: home::DevicesParams,
        mut results: home::DevicesResults,
    ) -> Result<(), capnp::Error> {
        self.live().await?;
        let mut req = self.users_cap().list_app_passwords_request();
        req.get().set_user(self.user.as_str());
        req.get().set_kind("");
        let r = req.send().promise.await?;
        results.get().set_devices(r.get()?.get_app_passwords()?)?;
        Ok(())
    }

    async fn add_device(
        self: CapRc<Self>,
        params: home::AddDeviceParams,
        mut results: home::AddDeviceResults,
    ) -> Result<(), capnp::Error> {
        self.live().await?;
        let p = params.get()?;
        let mut req = self.users_cap().add_app_password_request();
        req.get().set_user(self.user.as_str());
        req.get().set_kind(p.get_kind()?);
        req.get().set_label(p.get_label()?);
        let r = req.send().promise.await?;
        let r = r.get()?;
        let mut out = results.get();
        out.set_device(r.get_app_password()?)?;
        out.set_password(r.get_password()?);
        Ok(())
    }

    async fn revoke_device(
        self: CapRc<Self>,
        params: home::RevokeDeviceParams,
        mut results: home::RevokeDeviceResults,
    ) -> Result<(), capnp::Error> {
        self.live().await?;
        let id = params.get()?.get_id();
        if !self.owns_device(id).await? {
            results.get().set_found(false);
            return Ok(());
        }
        let mut req = self.users_cap().revoke_app_passwords_request();
        req.get().set_user(self.user.as_str());
        let sel: revoke_selector::Builder<'_> = req.get().init_selector();
        let mut sel = sel;
        sel.set_id(id);
        req.send().promise.await?;
        results.get().set_found(true);
        Ok(())
    }

    async fn grains(
        self: CapRc<Self>,
        _: home::GrainsParams,
        mut results: home::GrainsResults,
    ) -> Result<(), capnp::Error> {
        self.live().await?;
        let grains = self.grain_ids().await?;
        // The storage's own account, for all grains in one look (ZFS).
        let datasets = self.ctx.datasets.clone();
        let spaces = blocking(move || Ok(datasets.spaces().unwrap_or_default())).await?;
        let mut rows = Vec::new();
        for g in grains {
            let Ok(id) = granary_grains::GrainId::parse(&g.id) else {
                continue;
            };
            let state = match self.ctx.grains.status(&id).await {
                Ok(s) => s.state,
                Err(_) => "unknown".to_owned(),
            };
            let last_snapshot = match self.ctx.grains.snapshots(&id).await {
                Ok(s) => s.iter().map(|s| s.created).max().unwrap_or(0),
                Err(_) => 0,
            };
            let (used, quota, last_backup) =
                super::usage::grain(&self.ctx, &g.id, spaces.get(&g.id).copied()).await?;
            rows.push((g, state, used, quota, last_snapshot, last_backup));
        }
        let mut list = results.get().init_grains(rows.len() as u32);
        for (i, (g, state, used, quota, snap, backup)) in rows.iter().enumerate() {
            let mut out: home_grain::Builder<'_> = list.reborrow().get(i as u32);
            out.set_id(&g.id);
            out.set_kind(&g.kind);
            out.set_state(state);
            out.set_used_bytes(*used);
            out.set_quota_bytes(quota.unwrap_or(0));
            out.set_last_snapshot(*snap);
            out.set_last_backup(*backup);
        }
        Ok(())
    }

    async fn grants(
        self: CapRc<Self>,
        _: home::GrantsParams,
        mut results: home::GrantsResults,
    ) -> Result<(), capnp::Error> {
        self.live().await?;
        let mine: Vec<String> = self.grain_ids().await?.into_iter().map(|g| g.id).collect();
        let r = self.grants_cap().list_request().send().promise.await?;
        let all = r.get()?.get_grants()?;
        let keep: Vec<u32> = (0..all.len())
            .filter(|&i| {
                let g = all.get(i);
                let is_mine = |t: capnp::Result<capnp::text::Reader<'_>>| {
                    t.ok()
                        .and_then(|t| t.to_str().ok())
                        .is_some_and(|t| mine.iter().any(|m| m == t))
                };
                is_mine(g.get_from()) || is_mine(g.get_to())
            })
            .collect();
        let mut list = results.get().init_grants(keep.len() as u32);
        for (i, &k) in keep.iter().enumerate() {
            list.set_with_caveats(i as u32, all.get(k))?;
        }
        Ok(())
    }

    async fn revoke_grant(
        self: CapRc<Self>,
        params: home::RevokeGrantParams,
        mut results: home::RevokeGrantResults,
    ) -> Result<(), capnp::Error> {
        self.live().await?;
        let id = params.get()?.get_id();
        let mine: Vec<String> = self.grain_ids().await?.into_iter().map(|g| g.id).collect();
        let store = self.ctx.store.clone();
        let grant = blocking(move || store.grant(id).map_err(state_failure)).await?;
        let owned = grant.is_some_and(|(g, live)| {
            live && (mine.contains(&g.from_grain) || mine.contains(&g.to_grain))
        });
        if !owned {
            results.get().set_found(false);
            return Ok(());
        }
        let mut req = self.grants_cap().revoke_request();
        req.get().set_id(id);
        req.send().promise.await?;
        results.get().set_found(true);
        Ok(())
    }

    async fn ssh_keys(
        self: CapRc<Self>,
        _: home::SshKeysParams,
        mut results: home::SshKeysResults,
    ) -> Result<(), capnp::Error> {
        self.live().await?;
        let mut req = self.users_cap().list_ssh_keys_request();
        req.get().set_user(self.user.as_str());
        let r = req.send().promise.await?;
        results.get().set_keys(r.get()?.get_keys()?)?;
        Ok(())
    }

    async fn add_ssh_key(
        self: CapRc<Self>,
        params: home::AddSshKeyParams,
        mut results: home::AddSshKeyResults,
    ) -> Result<(), capnp::Error> {
        self.live().await?;
        let p = params.get()?;
        let mut req = self.users_cap().add_ssh_key_request();
        req.get().set_user(self.user.as_str());
        req.get().set_key(p.get_key()?);
        req.get().set_label(p.get_label()?);
        let r = req.send().promise.await?;
        results.get().set_key(r.get()?.get_key()?)?;
        Ok(())
    }

    async fn remove_ssh_key(
        self: CapRc<Self>,
        params: home::RemoveSshKeyParams,
        mut results: home::RemoveSshKeyResults,
    ) -> Result<(), capnp::Error> {
        self.live().await?;
        let id = params.get()?.get_id();
        let mut req = self.users_cap().remove_ssh_key_request();
        req.get().set_user(self.user.as_str());
        req.get().set_id(id);
        let r = req.send().promise.await?;
        results.get().set_found(r.get()?.get_removed());
        Ok(())
    }

    async fn change_password(
        self: CapRc<Self>,
        params: home::ChangePasswordParams,
        _: home::ChangePasswordResults,
    ) -> Result<(), capnp::Error> {
        self.live().await?;
        let p = params.get()?;
        let (old, new) = (p.get_old()?.to_str()?, p.get_new()?.to_str()?);
        if new.is_empty() {
            return Err(fail("choose a new password"));
        }
        granary_auth::check_password_policy(new).map_err(fail)?;
        if !account_password_ok(&self.ctx, self.user.as_str(), old).await? {
            return Err(fail("wrong password"));
        }
        let mut req = self.users_cap().set_password_request();
        req.get().set_name(self.user.as_str());
        req.get().set_password(new);
        req.send().promise.await?;
        // This session goes on under the new password; the others end.
        if let Some(h) = current_hash(&self.ctx, &self.user).await? {
            *self.hash.borrow_mut() = h;
        }
        tracing::info!(user = %self.user, "account password changed on the web");
        Ok(())
    }

    async fn totp_begin(
        self: CapRc<Self>,
        _: home::TotpBeginParams,
        mut results: home::TotpBeginResults,
    ) -> Result<(), capnp::Error> {
        self.live().await?;
        let secret = granary_auth::totp::new_secret().map_err(fail)?;
        let domain = &self.ctx.info.domain;
        let account = format!("{}@{domain}", self.user);
        let mut r = results.get();
        r.set_secret(granary_auth::totp::base32(&secret));
        r.set_uri(granary_auth::totp::uri(domain, &account, &secret));
        Ok(())
    }

    async fn totp_enable(
        self: CapRc<Self>,
        params: home::TotpEnableParams,
        mut results: home::TotpEnableResults,
    ) -> Result<(), capnp::Error> {
        self.live().await?;
        let p = params.get()?;
        let (store, user) = (self.ctx.store.clone(), self.user.clone());
        if blocking(move || store.totp(&user).map_err(state_failure))
            .await?
            .is_some()
        {
            // Replacing it takes turning it off first, which asks for the
            // password: a session alone cannot swap in another phone.
            return Err(fail("two-step sign-in is already on; turn it off first"));
        }
        let secret = granary_auth::totp::from_base32(p.get_secret()?.to_str()?)
            .filter(|s| s.len() == granary_auth::totp::SECRET_BYTES)
            .ok_or_else(|| fail("that is not the secret this page made"))?;
        let now = granary_auth::totp::step_at(now());
        let step = granary_auth::totp::verify(&secret, p.get_code()?.to_str()?, now, 0)
            .ok_or_else(|| fail("wrong code: check the app's clock and try the newest code"))?;
        let mut codes = Vec::new();
        let mut hashes = Vec::new();
        for _ in 0..RECOVERY_CODES {
            let mut raw = [0u8; 10];
            getrandom::fill(&mut raw).map_err(fail)?;
            let code = granary_auth::totp::base32(&raw);
            hashes.push(recovery_hash(&code));
            codes.push(format!(
                "{}-{}-{}-{}",
                &code[..4],
                &code[4..8],
                &code[8..12],
                &code[12..]
            ));
        }
        let sealed = granary_auth::totp::seal(&self.ctx.web_key, self.user.as_str(), &secret)
            .map_err(fail)?;
        let (store, user) = (self.ctx.store.clone(), self.user.clone());
        blocking(move || {
            let actor = user.to_string();
            store
                .set_totp(&user, &sealed, step as i64, &hashes, &actor)
                .map_err(state_failure)
        })
        .await?;
        tracing::info!(user = %self.user, "second factor turned on");
        let mut list = results.get().init_recovery_codes(codes.len() as u32);
        for (i, c) in codes.iter().enumerate() {
            list.set(i as u32, c);
        }
        Ok(())
    }

    async fn totp_disable(
        self: CapRc<Self>,
        params: home::TotpDisableParams,
        _: home::TotpDisableResults,
    ) -> Result<(), capnp::Error> {
        self.live().await?;
        let password = params.get()?.get_password()?.to_str()?;
        if !account_password_ok(&self.ctx, self.user.as_str(), password).await? {
            return Err(fail("wrong password"));
        }
        let (store, user) = (self.ctx.store.clone(), self.user.clone());
        blocking(move || {
            let actor = user.to_string();
            store.clear_totp(&user, &actor).map_err(state_failure)
        })
        .await?;
        tracing::info!(user = %self.user, "second factor turned off");
        Ok(())
    }

    async fn invite(
        self: CapRc<Self>,
        params: home::InviteParams,
        mut results: home::InviteResults,
    ) -> Result<(), capnp::Error> {
        self.live().await?;
        let secs = params.get()?.get_expires_secs();
        let invites: invites::Client =
            capnp_rpc::new_client(super::invites::Invites(self.ctx.clone()));
        let mut req = invites.create_request();
        req.get().set_inviter(self.user.as_str());
        req.get().set_expires_secs(secs);
        req.get().set_uses(1);
        req.get().set_group("");
        let r = req.send().promise.await?;
        let r = r.get()?;
        let mut out = results.get();
        out.set_link(r.get_link()?);
        out.set_uri(r.get_uri()?);
        Ok(())
    }
}
