//! `Invites`: invite links. A token is 128 random bits, returned once;
//! only its SHA-256 is stored. The gateway checks and redeems tokens (the
//! landing page, in-band registration); this makes, lists and revokes them.

use std::rc::Rc;

use base64::Engine;
use capnp::capability::Rc as CapRc;
use granary_schema::admin_capnp::{invite, invites};
use granary_state::{Invite, InviteKind};

use super::{Ctx, blocking, fail, state_failure, user_name};

pub(super) struct Invites(pub(super) Rc<Ctx>);

/// Random bytes in a token: 128 bits, as the issue of a bearer secret
/// that stands for an account asks.
const TOKEN_BYTES: usize = 16;

fn set_invite(mut out: invite::Builder<'_>, i: &Invite) {
    out.set_id(i.id);
    out.set_kind(i.kind.as_str());
    out.set_inviter(i.inviter.as_deref().unwrap_or(""));
    out.set_max_uses(i.max_uses.clamp(0, u32::MAX as i64) as u32);
    out.set_uses(i.uses.clamp(0, u32::MAX as i64) as u32);
    out.set_created_at(i.created_at);
    out.set_expires_at(i.expires_at);
    out.set_revoked_at(i.revoked_at.unwrap_or(0));
    out.set_status(i.status(crate::daemon::unix_now()));
    out.set_group(i.room.as_deref().unwrap_or(""));
    let mut used = out.init_used_by(i.used_by.len() as u32);
    for (n, u) in i.used_by.iter().enumerate() {
        used.set(n as u32, u);
    }
}

impl invites::Server for Invites {
    async fn create(
        self: CapRc<Self>,
        params: invites::CreateParams,
        mut results: invites::CreateResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let p = params.get()?;
        let mut inviter = match p.get_inviter()?.to_str()? {
            "" => None,
            _ => Some(user_name(p.get_inviter()?)?),
        };
        let group = match p.get_group()?.to_str()? {
            "" => None,
            g => Some(g.to_owned()),
        };
        if let Some(g) = &group {
            // The room's owner invites; naming anyone else is a mistake
            // worth telling.
            let (store, name) = (self.0.store.clone(), g.clone());
            let room = blocking(move || store.instance_grain("room", &name).map_err(state_failure))
                .await?
                .ok_or_else(|| {
                    fail(format!(
                        "no group chat named {g}: a room is made when someone first joins {g}@rooms.<domain>"
                    ))
                })?;
            match &inviter {
                Some(u) if u.as_str() != room.user => {
                    return Err(fail(format!(
                        "the group chat {g} is {}'s; a group invite comes from its owner",
                        room.user
                    )));
                }
                _ => inviter = Some(granary_model::UserName::existing(&room.user).map_err(fail)?),
            }
        }
        let secs = p.get_expires_secs();
        if !(1..=366 * 86_400).contains(&secs) {
            return Err(fail("an invite expires within a year"));
        }
        let uses = p.get_uses().max(1) as i64;
        let store = self.0.store.clone();
        if blocking(move || Ok(store.app("xmpp").map_err(state_failure)?.is_none())).await? {
            return Err(fail(
                "invites make chat accounts, and the chat app is not installed \
                 (granary app install xmpp.gpkg)",
            ));
        }
        let mut raw = [0u8; TOKEN_BYTES];
        getrandom::fill(&mut raw).map_err(fail)?;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        let hash = granary_auth::token_hash(token.as_bytes());
        let kind = match (&inviter, &group) {
            (_, Some(_)) => InviteKind::Group,
            (Some(_), None) => InviteKind::Contact,
            (None, None) => InviteKind::Account,
        };
        let store = self.0.store.clone();
        let inv = inviter.clone();
        let (made, inviter_domain) = blocking(move || {
            let made = store
                .add_invite(
                    kind,
                    inv.as_ref(),
                    group.as_deref(),
                    &hash,
                    crate::daemon::unix_now() + secs,
                    uses,
                    actor,
                )
                .map_err(state_failure)?;
            let domain = match &inv {
                Some(u) => store.xmpp_domain_of(u.as_str()).map_err(state_failure)?,
                None => None,
            };
            Ok((made, domain))
        })
        .await?;
        let domain = &self.0.info.domain;
        let jid = inviter
            .as_ref()
            .map(|u| format!("{u}@{}", inviter_domain.as_deref().unwrap_or(domain)));
        let host = match self.0.info.listener("https").map(|a| a.port()) {
            Some(443) | None => domain.clone(),
            Some(port) => format!("{domain}:{port}"),
        };
        tracing::info!(invite = made.id, kind = kind.as_str(), "invite made");
        let mut r = results.get();
        set_invite(r.reborrow().init_invite(), &made);
        r.set_token(&token);
        r.set_link(granary_gateway::invite::link(&host, &token));
        r.set_uri(granary_gateway::invite::xmpp_uri(
            domain,
            jid.as_deref(),
            &token,
        ));
        Ok(())
    }

    async fn list(
        self: CapRc<Self>,
        _: invites::ListParams,
        mut results: invites::ListResults,
    ) -> Result<(), capnp::Error> {
        let store = self.0.store.clone();
        let list = blocking(move || store.invites().map_err(state_failure)).await?;
        let mut out = results.get().init_invites(list.len() as u32);
        for (n, i) in list.iter().enumerate() {
            set_invite(out.reborrow().get(n as u32), i);
        }
        Ok(())
    }

    async fn revoke(
        self: CapRc<Self>,
        params: invites::RevokeParams,
        _: invites::RevokeResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let id = params.get()?.get_id();
        let store = self.0.store.clone();
        let revoked =
            blocking(move || store.revoke_invite(id, actor).map_err(state_failure)).await?;
        if !revoked {
            return Err(fail(format!("no invite {id} that is not revoked already")));
        }
        tracing::info!(invite = id, "invite revoked");
        Ok(())
    }
}
