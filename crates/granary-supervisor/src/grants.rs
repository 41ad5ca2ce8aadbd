//! Grants at run time: a provider's object obtained through its `offer`,
//! wrapped for the holder in a membrane that checks the grant on every
//! call, and recognised again when the holder saves it.

use std::cell::RefCell;
use std::rc::Rc;

use granary_grains::Problem;

use crate::inner::{Inner, db};
use crate::membrane::{Membrane, MembraneCap};
use crate::slot::Running;

impl Inner {
    /// Wraps a provider's object in a new membrane for `holder`.
    pub(crate) fn wrap(
        self: &Rc<Self>,
        grant: &granary_state::Grant,
        generation: u64,
        target: capnp::capability::Client,
    ) -> capnp::capability::Client {
        let membrane = Rc::new(Membrane {
            sup: Rc::downgrade(self),
            grant_id: grant.id,
            holder: grant.from_grain.clone(),
            provider: grant.to_grain.clone(),
            descriptor: grant.capability.clone(),
            target: RefCell::new(Some((generation, target))),
        });
        {
            let mut by_grant = self.by_grant.borrow_mut();
            let list = by_grant.entry(grant.id).or_default();
            list.retain(|w| w.strong_count() > 0);
            list.push(Rc::downgrade(&membrane));
        }
        let mut set = self.membranes.borrow_mut();
        set.gc();
        set.new_client_from_rc(membrane).client
    }

    /// The membrane behind a capability a grain passed back, if it is one.
    pub(crate) async fn membrane_of(&self, cap: capnp::capability::Client) -> Option<Rc<Membrane>> {
        let resolved: MembraneCap =
            capnp::capability::get_resolved_cap(MembraneCap { client: cap }).await;
        self.membranes
            .borrow()
            .get_local_server_of_resolved(&resolved)
    }

    /// Obtains `grant`'s object from its provider (starting it) and wraps
    /// it for the holder; logs the first use of a grant.
    pub(crate) async fn obtain(
        self: &Rc<Self>,
        grant: &granary_state::Grant,
        how: &'static str,
    ) -> Result<capnp::capability::Client, capnp::Error> {
        let fail = |e: Problem| capnp::Error::failed(format!("{}: {e}", grant.capability));
        let running = self.ensure_running(&grant.to_grain).await.map_err(fail)?;
        let _busy = running.activity.busy();
        let target = self
            .offer(&running, &grant.capability, &grant.from_grain)
            .await
            .map_err(fail)?;
        if self.used.borrow_mut().insert(grant.id) {
            let (id, holder, detail) = (
                grant.id,
                grant.from_grain.clone(),
                format!("grant={} cap={} via={how}", grant.id, grant.capability),
            );
            let _ = db(&self.params.store, move |s| {
                s.record_event(&holder, "grant.first-use", &id.to_string(), &detail)
            })
            .await;
        }
        Ok(self.wrap(grant, running.generation, target))
    }

    /// Asks a running provider for the object a descriptor names.
    pub(crate) async fn offer(
        &self,
        provider: &Rc<Running>,
        descriptor: &str,
        requester: &str,
    ) -> Result<capnp::capability::Client, Problem> {
        let requester = self.slots.borrow().get(requester).cloned();
        let mut request = provider.grain.offer_request();
        request.get().set_descriptor(descriptor);
        if let Some(r) = requester {
            let mut g = request.get().init_requester();
            g.set_id(&r.id);
            g.set_owner(&r.user);
            g.set_kind(&r.kind);
        }
        let answer = tokio::time::timeout(self.params.config.call_timeout, request.send().promise)
            .await
            .map_err(|_| Problem::Grain(format!("offer {descriptor} timed out")))?
            .map_err(|e| Problem::Grain(format!("offer {descriptor}: {e}")))?;
        answer
            .get()
            .and_then(|r| r.get_cap().get_as_capability())
            .map_err(|e| Problem::Grain(format!("offer {descriptor}: {e}")))
    }
}
