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
        out.set_address(format!("{user}@{}", self.0.info.domain));
        let mut list = out.reborrow().init_resources(status.resources.len() as u32);
        for (i, r) in status.resources.iter().enumerate() {
            list.set(i as u32, r);
        }
        out.set_contacts(status.contacts);
        out.set_archived(status.archived);
        out.set_offline(status.offline);
        Ok(())
    }
}
