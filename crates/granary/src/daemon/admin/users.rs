//! `Users`: accounts and their credentials (account passwords, per-device
//! app passwords, SSH keys).

use std::rc::Rc;

use capnp::capability::Rc as CapRc;
use granary_model::GrainKind;
use granary_schema::admin_capnp::{self, users};
use granary_state::{RevokeSelector, StateError};

use super::{Ctx, blocking, fail, grain_kind, state_failure, user_name};

pub(super) struct Users(pub(super) Rc<Ctx>);

/// A password chosen by the admin, or a generated one (returned to show once).
fn chosen_or_generated(password: &str) -> Result<(String, Option<String>), capnp::Error> {
    if password.is_empty() {
        let generated = granary_auth::generate_password().map_err(fail)?;
        Ok((generated.clone(), Some(generated)))
    } else {
        granary_auth::check_password_policy(password).map_err(fail)?;
        Ok((password.to_owned(), None))
    }
}

fn hash(password: &str) -> Result<String, capnp::Error> {
    granary_auth::hash_password(password).map_err(fail)
}

fn fill_ssh_key(mut out: admin_capnp::ssh_key::Builder<'_>, k: &granary_state::SshKey) {
    out.set_id(k.id);
    out.set_user(&k.user);
    out.set_key(&k.key);
    out.set_fingerprint(&k.fingerprint);
    out.set_label(&k.label);
    out.set_created_at(k.created_at);
    out.set_last_used_at(k.last_used_at.unwrap_or(0));
}

fn fill_user(mut out: admin_capnp::user::Builder<'_>, user: &granary_state::User) {
    out.set_name(&user.name);
    out.set_created_at(user.created_at);
    out.set_app_passwords(user.app_passwords as u32);
    out.set_disabled_at(user.disabled_at.unwrap_or(0));
}

fn fill_app_password(
    mut out: admin_capnp::app_password::Builder<'_>,
    p: &granary_state::AppPassword,
) {
    out.set_id(p.id);
    out.set_user(&p.user);
    out.set_kind(&p.kind);
    out.set_label(&p.label);
    out.set_created_at(p.created_at);
    out.set_last_used_at(p.last_used_at.unwrap_or(0));
}

impl users::Server for Users {
    async fn add(
        self: CapRc<Self>,
        params: users::AddParams,
        mut results: users::AddResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let p = params.get()?;
        // A new user: the reservation applies.
        let name = granary_model::UserName::new(p.get_name()?.to_str()?).map_err(fail)?;
        let (password, generated) = chosen_or_generated(p.get_password()?.to_str()?)?;
        let store = self.0.store.clone();
        let user = blocking(move || {
            // Check first so a taken name costs no hashing.
            if store.user(&name).map_err(state_failure)?.is_some() {
                return Err(state_failure(StateError::UserExists(name.to_string())));
            }
            let hash = hash(&password)?;
            store.add_user(&name, &hash, actor).map_err(state_failure)
        })
        .await?;
        tracing::info!(user = %user.name, "user added");
        let (store, uids) = (self.0.store.clone(), self.0.uids);
        let made =
            blocking(move || store.ensure_grains(uids, actor).map_err(state_failure)).await?;
        for g in made {
            tracing::info!(grain = %g.id, "grain record created");
        }
        let ctx = &self.0;
        crate::daemon::certificate::refresh(&ctx.store, ctx.local_ca.clone(), &ctx.info.domain)
            .await;
        let mut r = results.get();
        fill_user(r.reborrow().init_user(), &user);
        r.set_generated_password(generated.as_deref().unwrap_or(""));
        Ok(())
    }

    async fn list(
        self: CapRc<Self>,
        _: users::ListParams,
        mut results: users::ListResults,
    ) -> Result<(), capnp::Error> {
        let store = self.0.store.clone();
        let users = blocking(move || store.list_users().map_err(state_failure)).await?;
        let mut list = results.get().init_users(users.len() as u32);
        for (i, user) in users.iter().enumerate() {
            fill_user(list.reborrow().get(i as u32), user);
        }
        Ok(())
    }

    async fn remove(
        self: CapRc<Self>,
        params: users::RemoveParams,
        _: users::RemoveResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let p = params.get()?;
        let name = user_name(p.get_name()?)?;
        let purge = p.get_purge();
        let store = self.0.store.clone();
        let (s, n) = (store.clone(), name.clone());
        if blocking(move || s.user(&n).map_err(state_failure))
            .await?
            .is_none()
        {
            return Err(state_failure(StateError::NoSuchUser(name.to_string())));
        }
        let (s, n) = (store.clone(), name.to_string());
        let grains =
            blocking(move || s.grains_where(Some(&n), None).map_err(state_failure)).await?;
        super::grains::remove_grains(&self.0, grains, purge, &format!("user {name}"))
            .await
            .map_err(super::any_failure)?;
        let shown = name.to_string();
        blocking(move || store.remove_user(&name, actor).map_err(state_failure)).await?;
        tracing::info!(user = %shown, "user removed");
        let ctx = &self.0;
        crate::daemon::certificate::refresh(&ctx.store, ctx.local_ca.clone(), &ctx.info.domain)
            .await;
        Ok(())
    }

    async fn set_disabled(
        self: CapRc<Self>,
        params: users::SetDisabledParams,
        mut results: users::SetDisabledResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let p = params.get()?;
        let name = user_name(p.get_name()?)?;
        let disabled = p.get_disabled();
        let (store, n) = (self.0.store.clone(), name.clone());
        let changed = blocking(move || {
            store
                .set_user_disabled(&n, disabled, actor)
                .map_err(state_failure)
        })
        .await?;
        let mut stopped = 0;
        if disabled {
            // Logins verified in the last minute would still pass.
            self.0.verified.forget_all();
            // Their open sessions (IMAP IDLE, chat) end with the grains,
            // wherever they run.
            stopped = crate::daemon::ledger::stop_user_grains(
                &self.0.store,
                &*self.0.grains,
                name.as_str(),
            )
            .await;
        }
        tracing::info!(user = %name, disabled, changed, stopped, "user state set");
        let mut r = results.get();
        r.set_changed(changed);
        r.set_stopped_grains(stopped);
        Ok(())
    }

    async fn set_password(
        self: CapRc<Self>,
        params: users::SetPasswordParams,
        mut results: users::SetPasswordResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let p = params.get()?;
        let name = user_name(p.get_name()?)?;
        let (password, generated) = chosen_or_generated(p.get_password()?.to_str()?)?;
        let store = self.0.store.clone();
        blocking(move || {
            if store.user(&name).map_err(state_failure)?.is_none() {
                return Err(state_failure(StateError::NoSuchUser(name.to_string())));
            }
            let hash = hash(&password)?;
            store
                .set_password_hash(&name, &hash, actor)
                .map_err(state_failure)
        })
        .await?;
        results
            .get()
            .set_generated_password(generated.as_deref().unwrap_or(""));
        Ok(())
    }

    async fn check_password(
        self: CapRc<Self>,
        params: users::CheckPasswordParams,
        mut results: users::CheckPasswordResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let name = user_name(p.get_name()?)?;
        let kind = match p.get_kind()?.to_str()? {
            "" => None,
            k => Some(grain_kind(k)?),
        };
        let password = p.get_password()?.to_str()?.to_owned();
        let store = self.0.store.clone();
        let valid = blocking(move || {
            let Some(creds) = store
                .credentials(&name, kind.as_ref().map(GrainKind::as_str))
                .map_err(state_failure)?
            else {
                return Ok(false);
            };
            if granary_auth::verify_password(&password, &creds.password_hash).map_err(fail)? {
                return Ok(true);
            }
            for (id, hash) in &creds.app_passwords {
                if granary_auth::verify_password(&password, hash).map_err(fail)? {
                    store.touch_app_password(*id).map_err(state_failure)?;
                    return Ok(true);
                }
            }
            Ok(false)
        })
        .await?;
        results.get().set_valid(valid);
        Ok(())
    }

    async fn add_app_password(
        self: CapRc<Self>,
        params: users::AddAppPasswordParams,
        mut results: users::AddAppPasswordResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let p = params.get()?;
        let user = user_name(p.get_user()?)?;
        let kind = grain_kind(p.get_kind()?.to_str()?)?;
        let label = p.get_label()?.to_str()?.trim().to_owned();
        if label.len() > 200 || label.chars().any(char::is_control) {
            return Err(fail("label must be at most 200 printable characters"));
        }
        let store = self.0.store.clone();
        let (record, password) = blocking(move || {
            if store.user(&user).map_err(state_failure)?.is_none() {
                return Err(state_failure(StateError::NoSuchUser(user.to_string())));
            }
            let password = granary_auth::generate_password().map_err(fail)?;
            let hash = hash(&password)?;
            let scram = if SCRAM_KINDS.contains(&kind.as_str()) {
                let existing = store
                    .scram_verifiers(&user, kind.as_str())
                    .map_err(state_failure)?;
                scram_verifiers(&password, existing.iter().map(|(_, v)| v.as_str()))?
            } else {
                String::new()
            };
            let record = store
                .add_app_password_with_scram(&user, kind.as_str(), &label, &hash, &scram, actor)
                .map_err(state_failure)?;
            Ok((record, password))
        })
        .await?;
        let mut r = results.get();
        fill_app_password(r.reborrow().init_app_password(), &record);
        r.set_password(&password);
        Ok(())
    }

    async fn list_app_passwords(
        self: CapRc<Self>,
        params: users::ListAppPasswordsParams,
        mut results: users::ListAppPasswordsResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let user = user_name(p.get_user()?)?;
        let kind = match p.get_kind()?.to_str()? {
            "" => None,
            k => Some(grain_kind(k)?),
        };
        let store = self.0.store.clone();
        let list = blocking(move || {
            store
                .list_app_passwords(&user, kind.as_ref().map(GrainKind::as_str))
                .map_err(state_failure)
        })
        .await?;
        let mut out = results.get().init_app_passwords(list.len() as u32);
        for (i, p) in list.iter().enumerate() {
            fill_app_password(out.reborrow().get(i as u32), p);
        }
        Ok(())
    }

    async fn revoke_app_passwords(
        self: CapRc<Self>,
        params: users::RevokeAppPasswordsParams,
        mut results: users::RevokeAppPasswordsResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        use admin_capnp::revoke_selector::Which;
        let p = params.get()?;
        let user = user_name(p.get_user()?)?;
        let selector = match p.get_selector()?.which()? {
            Which::Id(id) => RevokeSelector::Id(id),
            Which::Kind(kind) => RevokeSelector::Kind(grain_kind(kind?.to_str()?)?.to_string()),
        };
        let store = self.0.store.clone();
        let which = selector.clone();
        let n = blocking(move || {
            store
                .revoke_app_passwords(&user, &which, actor)
                .map_err(state_failure)
        })
        .await?;
        // Logins verified in the last minute would still pass at the gateway.
        match selector {
            RevokeSelector::Id(id) => self.0.verified.forget_credential(id),
            RevokeSelector::Kind(_) => self.0.verified.forget_all(),
        }
        results.get().set_revoked(n as u32);
        Ok(())
    }

    async fn add_ssh_key(
        self: CapRc<Self>,
        params: users::AddSshKeyParams,
        mut results: users::AddSshKeyResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let p = params.get()?;
        let user = user_name(p.get_user()?)?;
        let line = p.get_key()?.to_str()?.to_owned();
        let key = granary_wire::ssh::public_key(&line).map_err(fail)?;
        // The key line's comment when no label is given.
        let label = match p.get_label()?.to_str()? {
            "" => key.comment.clone(),
            l => l.to_owned(),
        };
        let store = self.0.store.clone();
        let added = blocking(move || {
            store
                .add_ssh_key(&user, &key.normal, &key.fingerprint, &label, actor)
                .map_err(state_failure)
        })
        .await?;
        fill_ssh_key(results.get().init_key(), &added);
        Ok(())
    }

    async fn list_ssh_keys(
        self: CapRc<Self>,
        params: users::ListSshKeysParams,
        mut results: users::ListSshKeysResults,
    ) -> Result<(), capnp::Error> {
        let user = user_name(params.get()?.get_user()?)?;
        let store = self.0.store.clone();
        let keys = blocking(move || store.list_ssh_keys(&user).map_err(state_failure)).await?;
        let mut list = results.get().init_keys(keys.len() as u32);
        for (i, k) in keys.iter().enumerate() {
            fill_ssh_key(list.reborrow().get(i as u32), k);
        }
        Ok(())
    }

    async fn remove_ssh_key(
        self: CapRc<Self>,
        params: users::RemoveSshKeyParams,
        mut results: users::RemoveSshKeyResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let p = params.get()?;
        let user = user_name(p.get_user()?)?;
        let id = p.get_id();
        let store = self.0.store.clone();
        let removed = blocking(move || {
            store
                .remove_ssh_key(&user, id, actor)
                .map_err(state_failure)
        })
        .await?;
        results.get().set_removed(removed);
        Ok(())
    }
}

/// App-password kinds whose protocol logs in with SCRAM (XMPP): they also
/// get salted, iterated verifiers, never the password itself.
const SCRAM_KINDS: &[&str] = &["xmpp"];

/// SCRAM-SHA-1 and SCRAM-SHA-256 verifiers of `password`, one per line.
///
/// All of one user's passwords of a kind share the salt of each mechanism
/// (taken from `existing`, the user's verifiers so far; random for the
/// first): SCRAM sends the salt before the client proves anything, so only
/// a shared salt lets one exchange be checked against every device's
/// password. Salts still differ between users, which is what defeats
/// precomputed tables.
pub(crate) fn scram_verifiers<'a>(
    password: &str,
    existing: impl Iterator<Item = &'a str>,
) -> Result<String, capnp::Error> {
    use granary_wire::scram::{Hash, ITERATIONS, Verifier};
    let existing: Vec<Verifier> = existing
        .flat_map(|text| text.lines())
        .filter_map(|l| Verifier::decode(l).ok())
        .collect();
    let mut lines = Vec::new();
    for hash in [Hash::Sha1, Hash::Sha256] {
        let salt = match existing.iter().find(|v| v.hash == hash) {
            Some(v) => v.salt.clone(),
            None => {
                let mut salt = vec![0u8; 16];
                getrandom::fill(&mut salt).map_err(|e| fail(format!("random salt: {e}")))?;
                salt
            }
        };
        lines.push(
            Verifier::new(hash, password, &salt, ITERATIONS)
                .map_err(fail)?
                .encode(),
        );
    }
    Ok(lines.join("\n"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn scram_verifiers_are_both_mechanisms_and_never_the_password() {
        use granary_wire::scram::{Hash, Verifier};
        let text = super::scram_verifiers("correct horse", std::iter::empty()).unwrap();
        assert!(!text.contains("correct horse"));
        let v: Vec<Verifier> = text.lines().map(|l| Verifier::decode(l).unwrap()).collect();
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].hash, v[1].hash), (Hash::Sha1, Hash::Sha256));
        // The same password and salt give the same keys: the verifier
        // stands for that password.
        let again =
            Verifier::new(Hash::Sha256, "correct horse", &v[1].salt, v[1].iterations).unwrap();
        assert_eq!(again, v[1]);
        assert_ne!(v[0].salt, v[1].salt);
        // A second password of the same user shares the salts.
        let second =
            super::scram_verifiers("battery staple", std::iter::once(text.as_str())).unwrap();
        let w: Vec<Verifier> = second
            .lines()
            .map(|l| Verifier::decode(l).unwrap())
            .collect();
        assert_eq!((&w[0].salt, &w[1].salt), (&v[0].salt, &v[1].salt));
        assert_ne!(w[1].stored_key, v[1].stored_key);
    }
}
