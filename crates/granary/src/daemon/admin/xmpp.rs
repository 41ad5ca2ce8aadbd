//! `Xmpp`: each user's chat grain (through `Grains`).

use std::rc::Rc;

use capnp::capability::Rc as CapRc;
use granary_grains::GrainId;
use granary_schema::admin_capnp::xmpp;

use super::{Ctx, blocking, fail, grain_failure, state_failure, user_name};

pub(super) struct Xmpp(pub(super) Rc<Ctx>);

impl xmpp::Server for Xmpp {
    async fn status(
        self: CapRc<Self>,
        params: xmpp::StatusParams,
        mut results: xmpp::StatusResults,
    ) -> Result<(), capnp::Error> {
        let user = user_name(params.get()?.get_user()?)?;
        let store = self.0.store.clone();
        let who = user.clone();
        let installed = blocking(move || {
            if store.user(&who).map_err(state_failure)?.is_none() {
                return Err(fail(format!("no user named {who}")));
            }
            Ok(store.app("xmpp").map_err(state_failure)?.is_some())
        })
        .await?;
        if !installed {
            return Err(fail("the chat app (xmpp) is not installed"));
        }
        let grain = GrainId::for_user(user.as_str(), "xmpp").map_err(fail)?;
        let status = self
            .0
            .grains
            .xmpp_status(&grain)
            .await
            .map_err(grain_failure)?;
        let mut out = results.get().init_status();
        out.set_user(user.as_str());
        let store = self.0.store.clone();
        let who = user.to_string();
        let domain = blocking(move || store.xmpp_domain_of(&who).map_err(state_failure))
            .await?
            .unwrap_or_else(|| self.0.info.domain.clone());
        out.set_address(format!("{user}@{domain}"));
        let mut list = out.reborrow().init_resources(status.resources.len() as u32);
        for (i, r) in status.resources.iter().enumerate() {
            list.set(i as u32, r);
        }
        out.set_contacts(status.contacts);
        out.set_archived(status.archived);
        out.set_offline(status.offline);
        Ok(())
    }

    async fn add_domain(
        self: CapRc<Self>,
        params: xmpp::AddDomainParams,
        mut results: xmpp::AddDomainResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let p = params.get()?;
        let domain = granary_model::MailDomain::parse(p.get_domain()?.to_str()?)
            .map_err(|e| fail(e.to_string()))?;
        // rooms.<domain> is every chat domain's group chat service: a user
        // there would share addresses with rooms.
        if domain.as_str().starts_with("rooms.") {
            return Err(fail(format!(
                "{domain} cannot be a chat domain: rooms.<domain> names group chats"
            )));
        }
        let mut users = Vec::new();
        for u in p.get_users()? {
            users.push(user_name(u?)?);
        }
        let primary = domain.as_str() == self.0.info.domain;
        let store = self.0.store.clone();
        let moved = users.clone();
        let added = blocking(move || {
            if primary {
                // Granary's own domain: the users move back to it.
                store
                    .reset_xmpp_domain(&moved, actor)
                    .map_err(state_failure)?;
                return Ok(false);
            }
            store
                .add_xmpp_domain(&domain, &moved, actor)
                .map_err(state_failure)
        })
        .await?;
        // Their grains restart to take the new address (sessions end; the
        // clients reconnect).
        for u in &users {
            if let Ok(grain) = GrainId::for_user(u.as_str(), "xmpp") {
                let _ = self.0.grains.stop(&grain).await;
            }
        }
        results.get().set_added(added);
        Ok(())
    }

    async fn domains(
        self: CapRc<Self>,
        _: xmpp::DomainsParams,
        mut results: xmpp::DomainsResults,
    ) -> Result<(), capnp::Error> {
        let store = self.0.store.clone();
        let list = blocking(move || store.xmpp_domains().map_err(state_failure)).await?;
        let mut r = results.get();
        r.set_primary(&self.0.info.domain);
        let port = |name: &str| {
            self.0
                .info
                .listeners
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, a)| a.parse::<std::net::SocketAddr>().ok())
                .map_or(0, |a| a.port())
        };
        r.set_client_port(port("xmpp"));
        r.set_tls_port(port("xmpps"));
        r.set_server_port(port("xmpp-s2s"));
        let mut out = r.init_domains(list.len() as u32);
        for (i, d) in list.iter().enumerate() {
            let mut o = out.reborrow().get(i as u32);
            o.set_domain(&d.domain);
            o.set_created_at(d.created_at);
            let mut users = o.init_users(d.users.len() as u32);
            for (j, u) in d.users.iter().enumerate() {
                users.set(j as u32, u);
            }
        }
        Ok(())
    }
}
