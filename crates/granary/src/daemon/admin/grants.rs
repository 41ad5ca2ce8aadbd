//! `Grants`: the routes an owner allows between their own grains, and
//! the interfaces an app shares to another user's grain.

use std::rc::Rc;

use capnp::capability::Rc as CapRc;
use granary_schema::admin_capnp::{self, grants};

use super::{Ctx, blocking, fail, grain_failure, grain_ref, state_failure};

pub(super) struct Grants(pub(super) Rc<Ctx>);

fn fill_grant(mut out: admin_capnp::grant::Builder<'_>, g: &granary_state::Grant) {
    out.set_id(g.id);
    out.set_from(&g.from_grain);
    out.set_to(&g.to_grain);
    out.set_capability(&g.capability);
    out.set_created_at(g.created_at);
}

impl grants::Server for Grants {
    async fn add(
        self: CapRc<Self>,
        params: grants::AddParams,
        mut results: grants::AddResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let p = params.get()?;
        let from = grain_ref(p.get_from()?)?;
        let to = grain_ref(p.get_to()?)?;
        let cap = p.get_capability()?.to_str()?.to_owned();
        granary_model::check_descriptor(&cap).map_err(fail)?;
        if from == to {
            return Err(fail("a grain needs no grant to reach itself"));
        }
        let across_users = from.user() != to.user();
        let store = self.0.store.clone();
        let grant = blocking(move || {
            for g in [&from, &to] {
                if store.grain(g).map_err(state_failure)?.is_none() {
                    return Err(fail(format!("no grain {}", g.shown())));
                }
            }
            let app = store
                .app(to.kind())
                .map_err(state_failure)?
                .ok_or_else(|| fail(format!("no app of kind {} is installed", to.kind())))?;
            let manifest = granary_model::Manifest::parse(&app.manifest).map_err(fail)?;
            if !manifest.offers(&cap) {
                return Err(fail(format!(
                    "{} ({}) does not offer {}; it offers: {}",
                    to.kind(),
                    manifest.id,
                    cap,
                    if manifest.offers.is_empty() {
                        "nothing".to_owned()
                    } else {
                        manifest.offers.join(", ")
                    }
                )));
            }
            if across_users && !manifest.shares(&cap) {
                return Err(fail(format!(
                    "{} and {} belong to different users, and {} ({}) does not share {} with \
                     other users' grains; it shares: {}",
                    from.shown(),
                    to.shown(),
                    to.kind(),
                    manifest.id,
                    cap,
                    if manifest.shares.is_empty() {
                        "nothing".to_owned()
                    } else {
                        manifest.shares.join(", ")
                    }
                )));
            }
            store
                .add_grant(&from, &to, &cap, actor)
                .map_err(state_failure)
        })
        .await?;
        tracing::info!(grant = grant.id, from = %grant.from_grain, to = %grant.to_grain, cap = %grant.capability, "grant added");
        fill_grant(results.get().init_grant(), &grant);
        Ok(())
    }

    async fn list(
        self: CapRc<Self>,
        _: grants::ListParams,
        mut results: grants::ListResults,
    ) -> Result<(), capnp::Error> {
        let store = self.0.store.clone();
        let grants = blocking(move || store.live_grants().map_err(state_failure)).await?;
        let mut list = results.get().init_grants(grants.len() as u32);
        for (i, g) in grants.iter().enumerate() {
            fill_grant(list.reborrow().get(i as u32), g);
        }
        Ok(())
    }

    async fn revoke(
        self: CapRc<Self>,
        params: grants::RevokeParams,
        _: grants::RevokeResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let id = params.get()?.get_id();
        let store = self.0.store.clone();
        let revoked =
            blocking(move || store.revoke_grant(id, actor).map_err(state_failure)).await?;
        if !revoked {
            return Err(fail(format!("no live grant {id}")));
        }
        self.0
            .grains
            .grant_revoked(id)
            .await
            .map_err(grain_failure)?;
        tracing::info!(grant = id, "grant revoked");
        Ok(())
    }
}
